//! kiln: a self-hosted fine-tuning server with an OpenAI-compatible API.
//!
//! The map is in DESIGN.md: `api/` (HTTP) talks to `store/` (all SQL) and `artifacts/`
//! (blobs); `data/` is a pure library that parses and validates datasets.

pub mod api;
pub mod artifacts;
pub mod cli;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(test)]
mod cuda_emulated;
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

/// A directory under the system's temporary directory, named `{prefix}-{uuid}` and removed
/// with what it holds when dropped; whoever writes to it first creates it.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> Self {
        ScratchDir(std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple())))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
