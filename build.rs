//! The CUDA build's own kernels: with the `cuda` feature, `src/cuda/kernels.cu` is compiled to
//! PTX by nvcc (as candle-kernels compiles candle's), for the architecture `CUDA_COMPUTE_CAP`
//! names (else the first GPU `nvidia-smi` reports). The default build needs no CUDA and does
//! nothing here.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &str = "src/cuda/kernels.cu";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={KERNELS}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    let cap = compute_cap();
    let nvcc = nvcc();
    // --fmad=false: no fused multiply-adds, so the update rounds as the CPU's loop does.
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--fmad=false", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(KERNELS)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "could not run nvcc ({}): {e}; set NVCC or CUDA_HOME",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {KERNELS} ({status})");
}

/// `CUDA_COMPUTE_CAP` without the dot (`90`), else the first GPU's, from nvidia-smi.
fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        let cap = cap.replace('.', "");
        assert!(
            !cap.is_empty() && cap.bytes().all(|b| b.is_ascii_digit()),
            "CUDA_COMPUTE_CAP={cap}: give the architecture as digits, e.g. 90 or 8.6"
        );
        return cap;
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().replace('.', "")))
        .filter(|c| !c.is_empty());
    smi.unwrap_or_else(|| {
        panic!("the CUDA build needs CUDA_COMPUTE_CAP (e.g. 90 for H100/H200) where nvidia-smi cannot say")
    })
}

/// `NVCC`, else `$CUDA_HOME/bin/nvcc` (or `CUDA_PATH`), else `nvcc` on the PATH.
fn nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let nvcc = PathBuf::from(home).join("bin/nvcc");
            if nvcc.exists() {
                return nvcc;
            }
        }
    }
    "nvcc".into()
}
