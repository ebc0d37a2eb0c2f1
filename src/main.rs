fn main() -> anyhow::Result<()> {
    kiln::tune_allocator();
    kiln::cli::main()
}
