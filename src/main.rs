fn main() -> anyhow::Result<()> {
    tune_allocator();
    kiln::cli::main()
}

/// Keeps glibc from handing large freed buffers back to the kernel: training frees and
/// reallocates the same tensor sizes every step, and returning them made every step fault
/// its memory in again (bench/README.md: 12x fewer page faults, +16% training throughput).
/// The price: a process keeps the memory its largest job needed until it exits.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
