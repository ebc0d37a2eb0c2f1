//! Element-wise loops compiled for the CPU they run on.
//!
//! kiln is built for the baseline x86-64 instruction set, so that one binary runs on any
//! x86-64 machine. The matrix products already choose AVX-512 or AVX2 kernels at run time (the
//! `gemm` crate and [`super::packed`]), but kiln's own element-wise loops (GELU, softmax's
//! exponentials, LayerNorm, the optimizer) were compiled four lanes wide. [`wide_fn!`] compiles a
//! function's body three times, for AVX-512, for AVX2 with FMA and for the baseline, and runs
//! the widest copy the CPU supports. The body is the same source each time: the compiler
//! vectorises it for the features it may use (the loops must be branch-free to vectorise, as
//! [`super::ops::exp_f32`] and [`super::ops::erf_f32`] are).

/// The instruction-set level the element-wise loops run at on this CPU (ordered, narrowest
/// first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The x86-64 baseline (SSE2), or another architecture.
    Base,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 (F, BW, DQ, VL): 16 f32 lanes.
    Avx512,
}

/// The level of this CPU (detected once).
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    let detected = *LEVEL.get_or_init(detect);
    #[cfg(test)]
    if let Some(cap) = test_cap::get() {
        return detected.min(cap);
    }
    detected
}

/// Tests run the kernels at every level the CPU has, not only its widest (which is all a
/// process would otherwise see).
#[cfg(test)]
pub(crate) mod test_cap {
    use super::Level;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// 0: no cap; otherwise 1 + the capped level's rank.
    static CAP: AtomicU8 = AtomicU8::new(0);

    pub(super) fn get() -> Option<Level> {
        match CAP.load(Ordering::Relaxed) {
            1 => Some(Level::Base),
            2 => Some(Level::Avx2),
            3 => Some(Level::Avx512),
            _ => None,
        }
    }

    /// Lifts the cap when dropped, also when a test panics.
    struct Lift;
    impl Drop for Lift {
        fn drop(&mut self) {
            CAP.store(0, Ordering::Relaxed);
        }
    }

    /// Runs `f` once per level up to the CPU's own, with the element-wise kernels capped at
    /// it. The cap is process-wide, so other tests running meanwhile may run narrower copies
    /// too (which compute the same values); the callers of this take turns.
    pub(crate) fn at_each_level(mut f: impl FnMut(Level)) {
        static TURN: Mutex<()> = Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let _lift = Lift;
        CAP.store(0, Ordering::Relaxed);
        let top = super::level();
        for cap in [Level::Base, Level::Avx2, Level::Avx512] {
            if cap > top {
                break;
            }
            CAP.store(cap as u8 + 1, Ordering::Relaxed);
            f(cap);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    // `KILN_SIMD=avx2` or `base` caps the level (for A/B measurements, and to run the narrower
    // copies on a wide CPU).
    let cap = std::env::var("KILN_SIMD").unwrap_or_default();
    let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
    let avx2 = has!("avx2") && has!("fma");
    match cap.as_str() {
        "base" => Level::Base,
        _ if avx512 && cap != "avx2" => Level::Avx512,
        _ if avx2 => Level::Avx2,
        _ => Level::Base,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Base
}

/// Defines a function whose body is compiled for AVX-512, for AVX2 and for the baseline, and
/// runs the copy for [`level`]. Arguments are plain `name: Type` pairs (no patterns, no
/// generics other than lifetimes); closures in the body passed to other functions (rayon's)
/// are not covered, so put this on the sequential per-chunk kernel instead.
macro_rules! wide_fn {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $(<$($lt:lifetime),*>)? ($($arg:ident : $ty:ty),* $(,)?)
            $(-> $ret:ty)? $body:block
    ) => {
        $(#[$attr])*
        $vis fn $name $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512 $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2 $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? $body
                match $crate::nn::simd::level() {
                    // SAFETY: `level` found these features on this CPU.
                    $crate::nn::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::nn::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::nn::simd::Level::Base => {}
                }
            }
            $body
        }
    };
}
pub(crate) use wide_fn;

/// `Σ f(x)` over a slice, in f64, in eight lanes (a single running sum cannot be reordered, so
/// it would not vectorise).
#[inline(always)]
pub(crate) fn sum_f64_lanes(xr: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xr.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i] as f64);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Sum of `xs` in eight lanes, so it vectorises (a single running sum cannot be reordered).
#[inline(always)]
pub(crate) fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `a · b` in eight lanes.
#[inline(always)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest of `xs` (`-inf` when empty) in eight lanes.
#[inline(always)]
pub(crate) fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    wide_fn! {
        /// A branch-free loop like the real kernels'.
        fn scaled_exp(out: &mut [f32], x: &[f32], s: f32) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = s * crate::nn::ops::exp_f32(v);
            }
        }
    }

    #[test]
    fn every_copy_computes_the_same_values() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| 0.5 * crate::nn::ops::exp_f32(v))
            .collect();
        let mut levels = Vec::new();
        test_cap::at_each_level(|cap| {
            assert_eq!(level(), cap);
            let mut got = vec![0f32; x.len()];
            scaled_exp(&mut got, &x, 0.5);
            // The same operations in the same order (no contraction into FMAs): equal bits.
            assert_eq!(got, want, "level {cap:?}");
            levels.push(cap);
        });
        assert_eq!(levels.first(), Some(&Level::Base));
        assert_eq!(test_cap::get(), None, "the cap is lifted afterwards");
    }
}
