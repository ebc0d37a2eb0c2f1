fn main() -> anyhow::Result<()> {
    kiln::cli::main()
}
