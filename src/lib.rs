//! kiln: a self-hosted fine-tuning server with an OpenAI-compatible API.
//!
//! The map is in DESIGN.md: `api/` (HTTP) talks to `store/` (all SQL) and `artifacts/`
//! (blobs); `data/` is a pure library that parses and validates datasets.

pub mod api;
pub mod artifacts;
pub mod cli;
pub mod data;
pub mod datasets;
pub mod device;
pub mod embedded_pg;
pub mod models;
pub mod nn;
pub mod queue;
pub mod serve;
pub mod server;
pub mod store;
pub mod train;
pub mod webhooks;
pub mod worker;

/// Keeps glibc from handing large freed buffers back to the kernel: training frees and
/// reallocates the same tensor sizes every step, and returning them made every step fault
/// its memory in again (bench/README.md: 12x fewer page faults, +16% training throughput).
/// The price: a process keeps the memory its largest job needed until it exits. `kiln`'s
/// `main` calls it first; timing tests call it so that they measure what the binary runs.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds, and glibc's mallopt is thread-safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
