//! Differentiable building blocks, and fused CPU kernels with a hand-written backward.
//!
//! The `*_primitive` functions are compositions of candle ops that all have a backward: they are
//! the reference. The fused versions ([`layer_norm`], [`gelu_erf`]) run one CPU kernel forward and
//! one backward; on any other device, dtype or layout they fall back to the primitive version, so
//! callers never need to know where they run.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor,
};

/// Softmax over the last dimension, built from ops that all have a backward.
///
/// candle's `softmax_last_dim` is a fused kernel without backward; this is the differentiable
/// equivalent. The max is detached: softmax does not depend on the shift, so it needs no gradient
/// and detaching saves the reduce-max backward.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// LayerNorm over the last dimension from primitive differentiable ops (the reference).
///
/// `weight` and `bias` have shape `[hidden]`. Uses the biased variance, like PyTorch.
pub fn layer_norm_primitive(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// GELU, erf form, from candle's `gelu_erf` (which has a backward in candle 0.9).
pub fn gelu_erf_primitive(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.gelu_erf()
}

/// True when the fused CPU kernels can take this tensor (f32 on the CPU).
fn fused_ok(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// LayerNorm over the last dimension: fused CPU kernel when possible, primitive ops otherwise.
///
/// Gradients flow to `xs`, `weight` and `bias` in both paths.
pub fn layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if fused_ok(xs) && fused_ok(weight) && fused_ok(bias) {
        let xs = xs.contiguous()?;
        let weight = weight.contiguous()?;
        let bias = bias.contiguous()?;
        xs.apply_op3_arc(
            &weight,
            &bias,
            std::sync::Arc::new(Box::new(FusedLayerNorm { eps: eps as f32 })),
        )
    } else {
        layer_norm_primitive(xs, weight, bias, eps)
    }
}

/// GELU (erf form): fused CPU kernel when possible, candle's `gelu_erf` otherwise.
pub fn gelu_erf(xs: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(xs) {
        xs.contiguous()?.apply_op1(FusedGelu)
    } else {
        gelu_erf_primitive(xs)
    }
}

/// The contiguous f32 slice behind a CPU storage, or an error naming `op`.
fn cpu_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        _ => candle_core::bail!("{op}: fused kernel only supports f32"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: fused kernel needs a contiguous input"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_cpu_f32<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu_f32(cpu, layout, op)?),
        _ => candle_core::bail!("{op}: fused kernel only runs on the CPU"),
    }
}

/// Fused LayerNorm over the last dimension; inputs `(x, weight, bias)`.
struct FusedLayerNorm {
    eps: f32,
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "kiln-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let w = cpu_f32(s2, l2, self.name())?;
        let b = cpu_f32(s3, l3, self.name())?;
        let dim = l1.dims().last().copied().unwrap_or(1);
        if w.len() != dim || b.len() != dim {
            candle_core::bail!("layer-norm: weight/bias length {} != hidden {dim}", w.len())
        }
        let mut out = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let (mean, rstd) = row_stats(xr, self.eps);
            for i in 0..dim {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dim = x.dim(D::Minus1)?;
        let n = x.elem_count();
        let mut dx = vec![0f32; n];
        let mut dw = vec![0f32; dim];
        let mut db = vec![0f32; dim];
        with_cpu_f32(x, self.name(), |x| {
            with_cpu_f32(w, self.name(), |w| {
                with_cpu_f32(&grad, self.name(), |g| {
                    let rows = x.chunks_exact(dim).zip(g.chunks_exact(dim));
                    for ((xr, gr), dxr) in rows.zip(dx.chunks_exact_mut(dim)) {
                        let (mean, rstd) = row_stats(xr, self.eps);
                        // dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w.
                        let mut sum_gw = 0f32;
                        let mut sum_gw_xhat = 0f32;
                        for i in 0..dim {
                            let xhat = (xr[i] - mean) * rstd;
                            let gw = gr[i] * w[i];
                            sum_gw += gw;
                            sum_gw_xhat += gw * xhat;
                            dw[i] += gr[i] * xhat;
                            db[i] += gr[i];
                        }
                        let mean_gw = sum_gw / dim as f32;
                        let mean_gw_xhat = sum_gw_xhat / dim as f32;
                        for i in 0..dim {
                            let xhat = (xr[i] - mean) * rstd;
                            dxr[i] = rstd * (gr[i] * w[i] - mean_gw - xhat * mean_gw_xhat);
                        }
                    }
                    Ok(())
                })
            })
        })?;
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        // Frozen (non-tracked) weights need no gradient; skipping them keeps the store clean.
        let dw = w
            .track_op()
            .then(|| Tensor::from_vec(dw, dim, dev))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| Tensor::from_vec(db, dim, dev))
            .transpose()?;
        Ok((Some(dx), dw, db))
    }
}

/// Mean and 1/std of one row, accumulated in f64 so long rows do not lose precision.
fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let n = xr.len() as f64;
    let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = xr
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// erf for f32 without a libm call: a rational minimax approximation on [-4, 4] (the one used by
/// Eigen/XLA), outside which erf is ±1 to f32 precision. It is branch-free so the loop
/// vectorises; libm's scalar erf was a measurable cost per step (DESIGN.md).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_3e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_5e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329_7e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2*pi), the normal density's constant.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Fused GELU (erf form).
struct FusedGelu;

impl CustomOp1 for FusedGelu {
    fn name(&self) -> &'static str {
        "kiln-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, self.name())?;
        let out: Vec<f32> = x
            .iter()
            .map(|&v| 0.5 * v * (1.0 + erf_f32(v * FRAC_1_SQRT_2)))
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d/dx x*Phi(x) = Phi(x) + x*phi(x).
        let dx = arg.apply_op2_no_bwd(&grad.contiguous()?, &FusedGeluBwd)?;
        Ok(Some(dx))
    }
}

/// Backward kernel of [`FusedGelu`]: inputs `(x, grad)`, output `grad * gelu'(x)`.
struct FusedGeluBwd;

impl CustomOp2 for FusedGeluBwd {
    fn name(&self) -> &'static str {
        "kiln-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let g = cpu_f32(s2, l2, self.name())?;
        if x.len() != g.len() {
            candle_core::bail!("gelu bwd: {} values but {} gradients", x.len(), g.len())
        }
        let out: Vec<f32> = x
            .iter()
            .zip(g)
            .map(|(&v, &g)| {
                let cdf = 0.5 * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * v * v).exp();
                g * (cdf + v * pdf)
            })
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic pseudo-random values in [-scale, scale] (no RNG state needed).
    fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x =
                    ((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40503)) % 10_000;
                (x as f32 / 5_000.0 - 1.0) * scale
            })
            .collect()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn erf_approximation_is_within_f32_precision_of_libm() {
        let candle_erf = |x: f32| {
            Tensor::new(&[x], &Device::Cpu)
                .unwrap()
                .erf()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
        };
        let mut worst = 0f32;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((erf_f32(x) - candle_erf(x)).abs());
        }
        assert!(worst < 1e-6, "max |erf error| {worst}");
    }

    #[test]
    fn fused_layer_norm_matches_primitive_in_values_and_gradients() {
        let dev = Device::Cpu;
        let (rows, dim) = (6, 40);
        let x = Var::from_vec(values(rows * dim, 1, 3.0), (2, 3, dim), &dev).unwrap();
        let w = Var::from_vec(values(dim, 2, 1.5), dim, &dev).unwrap();
        let b = Var::from_vec(values(dim, 3, 0.5), dim, &dev).unwrap();
        // A non-uniform upstream gradient so every term of the backward matters.
        let up = Tensor::from_vec(values(rows * dim, 4, 1.0), (2, 3, dim), &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                layer_norm(&x, &w, &b, 1e-5).unwrap()
            } else {
                layer_norm_primitive(&x, &w, &b, 1e-5).unwrap()
            };
            let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (y, g(&x), g(&w), g(&b))
        };
        let (y1, dx1, dw1, db1) = run(true);
        let (y0, dx0, dw0, db0) = run(false);
        assert!(max_abs_diff(&y1, &y0) < 1e-5);
        assert!(
            max_abs_diff(&dx1, &dx0) < 1e-4,
            "dx {}",
            max_abs_diff(&dx1, &dx0)
        );
        assert!(
            max_abs_diff(&dw1, &dw0) < 1e-4,
            "dw {}",
            max_abs_diff(&dw1, &dw0)
        );
        assert!(max_abs_diff(&db1, &db0) < 1e-5);
    }

    #[test]
    fn fused_layer_norm_gives_no_gradient_to_frozen_weights() {
        let dev = Device::Cpu;
        let x = Var::from_vec(values(64, 5, 2.0), (2, 32), &dev).unwrap();
        let w = Tensor::ones(32, DType::F32, &dev).unwrap();
        let b = Tensor::zeros(32, DType::F32, &dev).unwrap();
        let grads = layer_norm(&x, &w, &b, 1e-12)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    }

    #[test]
    fn fused_gelu_matches_primitive_in_values_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_vec(values(4000, 7, 6.0), (40, 100), &dev).unwrap();
        let up = Tensor::from_vec(values(4000, 8, 1.0), (40, 100), &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                gelu_erf(&x).unwrap()
            } else {
                gelu_erf_primitive(&x).unwrap()
            };
            let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, d1) = run(true);
        let (y0, d0) = run(false);
        assert!(
            max_abs_diff(&y1, &y0) < 5e-6,
            "y {}",
            max_abs_diff(&y1, &y0)
        );
        // candle's own gelu_erf backward rounds 1/sqrt(2*pi) to 6 digits, hence 1e-5.
        assert!(
            max_abs_diff(&d1, &d0) < 1e-5,
            "dx {}",
            max_abs_diff(&d1, &d0)
        );
    }

    #[test]
    fn differentiable_softmax_matches_candle_and_has_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_vec(values(60, 9, 4.0), (3, 20), &dev).unwrap();
        let ours = softmax_last_dim(&x).unwrap();
        let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-6);
        let up = Tensor::from_vec(values(60, 10, 1.0), (3, 20), &dev).unwrap();
        let grads = (&ours * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        // Analytic: dx = p * (up - sum(p * up)).
        let p = ours.detach();
        let s = (&p * &up).unwrap().sum_keepdim(1).unwrap();
        let expected = (&p * up.broadcast_sub(&s).unwrap()).unwrap();
        assert!(max_abs_diff(g, &expected) < 1e-6);
    }
}
