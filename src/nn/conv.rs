//! Convolutional building blocks with hand-written backward passes, on channels-last (NHWC)
//! activations: convolution as im2col + GEMM ([`conv2d`]), BatchNorm with an optional fused
//! ReLU ([`batch_norm`]), and a max-pool whose backward is right for overlapping windows
//! ([`max_pool2d`]).
//!
//! Why not candle's own: `max_pool2d`'s backward is only correct when kernel == stride (the
//! stem's 3x3/2 pool is not), and `conv2d`'s backward goes through `conv_transpose2d`, a
//! scalar loop on the CPU, and a weight-gradient convolution with the whole output as kernel.
//! Here each op is one kernel forward and one backward; im2col columns are rebuilt in the
//! backward instead of being kept, so a training step holds only the activations.
//!
//! Activations are `[batch, height, width, channels]`: every per-channel operation is then over
//! the last (contiguous) dimension, the convolution's output is the GEMM's output as is, and
//! 1x1 stride-1 convolutions need no im2col at all. Weights keep PyTorch's layouts
//! (`[out, in, kh, kw]` for convolutions), so checkpoints load as they are.
//!
//! The kernels run on the CPU in f32. On any other device or dtype the inputs are moved to the
//! CPU in f32 and the result moved back (correct, not fast).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{Mat, Threads};

/// Runs `f` on copies of `inputs` on the CPU in f32 when any is elsewhere, moving the result
/// back; calls it directly otherwise. Both moves have a backward, so gradients flow either way.
fn on_cpu_f32(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let first = inputs
        .first()
        .ok_or_else(|| candle_core::Error::Msg("no inputs".into()))?;
    let (device, dtype) = (first.device().clone(), first.dtype());
    let native = inputs
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if native {
        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        return f(&owned);
    }
    let moved = inputs
        .iter()
        .map(|t| t.to_device(&Device::Cpu)?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    f(&moved)?.to_dtype(dtype)?.to_device(&device)
}

/// The contiguous f32 slice behind a CPU storage, or an error naming `op`.
fn cpu_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: needs a contiguous input"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu_f32(cpu, layout, op)?),
        _ => candle_core::bail!("{op}: runs on the CPU only"),
    }
}

/// `dst[m, n] = a[m, k] · b[k, n]` (`+=` when `accumulate`), `dst` row-major, on every core.
fn sgemm(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
) -> candle_core::Result<()> {
    super::gemm::sgemm(dims, dst, dims.1, a, b, 1.0, accumulate, Threads::All)
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> candle_core::Result<Self> {
        let (&[b, h, wd, cin], &[cout, wcin, kh, kw]) = (x, w) else {
            candle_core::bail!(
                "conv2d: input {x:?} must be [b, h, w, c], weight {w:?} [o, i, kh, kw]"
            )
        };
        if wcin != cin {
            candle_core::bail!("conv2d: input has {cin} channels, weight expects {wcin}")
        }
        if stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} does not fit {h}x{wd} (padding {pad})")
        }
        Ok(Geom {
            b,
            h,
            w: wd,
            cin,
            cout,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wd + 2 * pad - kw) / stride + 1,
        })
    }

    /// Columns of the im2col matrix: `(ky, kx, ci)`.
    fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }

    /// Output positions per image.
    fn rows(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1 stride-1 convolution is a plain matrix product of the input.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// The input position `(iy, ix)` that output `(oy, ox)` reads at kernel offset `(ky, kx)`.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ky).checked_sub(self.pad)?;
        let ix = (ox * self.stride + kx).checked_sub(self.pad)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }

    /// im2col of one image `x: [h, w, cin]` into `cols: [ho*wo, k]`.
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, cin) = (self.k(), self.cin);
        cols.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
            let (oy, ox) = (r / self.wo, r % self.wo);
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let dst = &mut row[(ky * self.kw + kx) * cin..][..cin];
                    match self.source(oy, ox, ky, kx) {
                        Some((iy, ix)) => {
                            dst.copy_from_slice(&x[(iy * self.w + ix) * cin..][..cin])
                        }
                        None => dst.fill(0.0),
                    }
                }
            }
        });
    }

    /// col2im of one image: adds `cols: [ho*wo, k]` back into `dx: [h, w, cin]`.
    fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let (k, cin) = (self.k(), self.cin);
        // Parallel over input rows: each thread owns its rows of dx and gathers every column
        // entry that lands in them.
        dx.par_chunks_mut(self.w * cin)
            .enumerate()
            .for_each(|(iy, dx_row)| {
                for ky in 0..self.kh {
                    // oy * stride + ky - pad == iy
                    let Some(t) = (iy + self.pad).checked_sub(ky) else {
                        continue;
                    };
                    if t % self.stride != 0 || t / self.stride >= self.ho {
                        continue;
                    }
                    let oy = t / self.stride;
                    for ox in 0..self.wo {
                        let row = &cols[(oy * self.wo + ox) * k..][..k];
                        for kx in 0..self.kw {
                            let Some(ix) = (ox * self.stride + kx).checked_sub(self.pad) else {
                                continue;
                            };
                            if ix >= self.w {
                                continue;
                            }
                            let src = &row[(ky * self.kw + kx) * cin..][..cin];
                            let dst = &mut dx_row[ix * cin..][..cin];
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            });
    }

    /// The weight `[cout, cin, kh, kw]` rearranged to `[k, cout]` in im2col's column order
    /// (parallel over rows of the result, so writes stay contiguous).
    fn pack_weight(&self, w: &[f32]) -> Vec<f32> {
        let (cout, khw) = (self.cout, self.kh * self.kw);
        let mut wp = vec![0f32; self.k() * cout];
        wp.par_chunks_mut(cout).enumerate().for_each(|(kk, row)| {
            let (pos, ci) = (kk / self.cin, kk % self.cin);
            let src = ci * khw + pos;
            for (co, d) in row.iter_mut().enumerate() {
                *d = w[co * self.k() + src];
            }
        });
        wp
    }

    /// The inverse of [`Self::pack_weight`]: `[k, cout]` back to `[cout, cin, kh, kw]`.
    fn unpack_weight(&self, wp: &[f32]) -> Vec<f32> {
        let (cout, khw) = (self.cout, self.kh * self.kw);
        let mut w = vec![0f32; self.k() * cout];
        w.par_chunks_mut(self.k())
            .enumerate()
            .for_each(|(co, row)| {
                for (src, d) in row.iter_mut().enumerate() {
                    let (ci, pos) = (src / khw, src % khw);
                    *d = wp[(pos * self.cin + ci) * cout + co];
                }
            });
        w
    }

    /// Images per im2col batch: as many as keep the column buffer within `limit` floats, so
    /// late stages (few output positions per image) still make one large GEMM.
    fn images_per_chunk(&self, limit: usize) -> usize {
        let per_image = (self.rows() * self.k()).max(1);
        (limit / per_image).clamp(1, self.b.max(1))
    }
}

/// 2-D convolution without bias of NHWC input `x: [b, h, w, cin]` with a PyTorch-layout weight
/// `[cout, cin, kh, kw]`, the same stride and zero padding on both axes: `[b, ho, wo, cout]`.
///
/// Gradients flow to `x` and `weight` (each only when it is tracked).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv2d_chunked(x, weight, stride, padding, DEFAULT_COLUMN_FLOATS)
}

/// The im2col buffer [`conv2d`] allows itself, in floats (64 MiB).
pub const DEFAULT_COLUMN_FLOATS: usize = 16 << 20;

/// [`conv2d`] with a chosen bound on the im2col buffer (`column_floats`): images are unfolded
/// and multiplied in groups that fit it (at least one image at a time).
pub fn conv2d_chunked(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    column_floats: usize,
) -> candle_core::Result<Tensor> {
    on_cpu_f32(&[x, weight], |t| {
        t[0].contiguous()?.apply_op2(
            &t[1].contiguous()?,
            Conv2dNhwc {
                stride,
                padding,
                column_floats,
            },
        )
    })
}

/// The convolution kernel behind [`conv2d`].
struct Conv2dNhwc {
    stride: usize,
    padding: usize,
    /// Bound on the im2col buffer, in floats.
    column_floats: usize,
}

impl CustomOp2 for Conv2dNhwc {
    fn name(&self) -> &'static str {
        "kiln-conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let w = cpu_f32(s2, l2, self.name())?;
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let wp = g.pack_weight(w);
        let (rows, k, n) = (g.rows(), g.k(), g.cout);
        let mut out = super::gemm::zeroed(g.b * rows * n);
        if g.pointwise() {
            sgemm(
                (g.b * rows, n, k),
                &mut out,
                Mat::rows(x, k),
                Mat::rows(&wp, n),
                false,
            )?;
        } else {
            let img = g.h * g.w * g.cin;
            let per = g.images_per_chunk(self.column_floats);
            let mut cols = super::gemm::zeroed(per * rows * k);
            for b0 in (0..g.b).step_by(per) {
                let nb = per.min(g.b - b0);
                for i in 0..nb {
                    g.im2col(
                        &x[(b0 + i) * img..][..img],
                        &mut cols[i * rows * k..][..rows * k],
                    );
                }
                sgemm(
                    (nb * rows, n, k),
                    &mut out[b0 * rows * n..][..nb * rows * n],
                    Mat::rows(&cols, k),
                    Mat::rows(&wp, n),
                    false,
                )?;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.ho, g.wo, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.padding)?;
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (rows, k, n) = (g.rows(), g.k(), g.cout);
        let img = g.h * g.w * g.cin;
        let mut dx = if want_dx {
            super::gemm::zeroed(g.b * img)
        } else {
            Vec::new()
        };
        let mut dwp = if want_dw {
            super::gemm::zeroed(k * n)
        } else {
            Vec::new()
        };
        let name = self.name();
        with_f32(x, name, |xs| {
            with_f32(w, name, |ws| {
                with_f32(grad, name, |gs| {
                    let wp = g.pack_weight(ws);
                    if g.pointwise() {
                        let m = g.b * rows;
                        if want_dw {
                            // dW' [k, n] = xᵀ [k, m] · g [m, n]
                            sgemm(
                                (k, n, m),
                                &mut dwp,
                                Mat::transposed(xs, k),
                                Mat::rows(gs, n),
                                false,
                            )?;
                        }
                        if want_dx {
                            // dx [m, k] = g [m, n] · W'ᵀ [n, k]
                            sgemm(
                                (m, k, n),
                                &mut dx,
                                Mat::rows(gs, n),
                                Mat::transposed(&wp, n),
                                false,
                            )?;
                        }
                        return Ok(());
                    }
                    let per = g.images_per_chunk(self.column_floats);
                    let mut cols = super::gemm::zeroed(per * rows * k);
                    for b0 in (0..g.b).step_by(per) {
                        let nb = per.min(g.b - b0);
                        let gb = &gs[b0 * rows * n..][..nb * rows * n];
                        let cols = &mut cols[..nb * rows * k];
                        if want_dw {
                            for i in 0..nb {
                                let xi = &xs[(b0 + i) * img..][..img];
                                g.im2col(xi, &mut cols[i * rows * k..][..rows * k]);
                            }
                            sgemm(
                                (k, n, nb * rows),
                                &mut dwp,
                                Mat::transposed(cols, k),
                                Mat::rows(gb, n),
                                b0 > 0,
                            )?;
                        }
                        if want_dx {
                            sgemm(
                                (nb * rows, k, n),
                                cols,
                                Mat::rows(gb, n),
                                Mat::transposed(&wp, n),
                                false,
                            )?;
                            for i in 0..nb {
                                let dxi = &mut dx[(b0 + i) * img..][..img];
                                g.col2im(&cols[i * rows * k..][..rows * k], dxi);
                            }
                        }
                    }
                    Ok(())
                })
            })
        })?;
        let dev = x.device();
        let dx = want_dx
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let dw = want_dw
            .then(|| Tensor::from_vec(g.unpack_weight(&dwp), w.shape(), dev))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// Per-channel mean and biased variance of `x: [.., c]` over every other position, in f64.
pub fn channel_stats(x: &Tensor) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let c = x.dims().last().copied().unwrap_or(1).max(1);
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    with_f32(&x, "channel-stats", |xs| {
        let rows = xs.len() / c;
        if rows == 0 {
            candle_core::bail!("batch-norm: statistics of an empty batch")
        }
        // One parallel pass of sums and squares shifted by the first row (so a large mean
        // cannot cancel the variance away), combined in f64.
        let shift: Vec<f32> = xs[..c].to_vec();
        let (s, ss) = xs
            .par_chunks(row_chunk(rows) * c)
            .map(|part| {
                let mut s = vec![0f64; c];
                let mut ss = vec![0f64; c];
                for row in part.chunks_exact(c) {
                    for i in 0..c {
                        let d = (row[i] - shift[i]) as f64;
                        s[i] += d;
                        ss[i] += d * d;
                    }
                }
                (s, ss)
            })
            .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
        let n = rows as f64;
        let mean = (0..c).map(|i| shift[i] as f64 + s[i] / n).collect();
        let var = (0..c)
            .map(|i| (ss[i] / n - (s[i] / n) * (s[i] / n)).max(0.0))
            .collect();
        Ok((mean, var))
    })
}

/// Rows per parallel task for a per-channel reduction over `rows` rows.
fn row_chunk(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads().max(1))
        .max(1)
}

/// Element-wise sum of two pairs of per-channel accumulators.
fn add_pairs(
    (mut a, mut b): (Vec<f64>, Vec<f64>),
    (c, d): (Vec<f64>, Vec<f64>),
) -> (Vec<f64>, Vec<f64>) {
    a.iter_mut().zip(c).for_each(|(x, y)| *x += y);
    b.iter_mut().zip(d).for_each(|(x, y)| *x += y);
    (a, b)
}

/// The statistics and mode of one [`batch_norm`] call.
#[derive(Debug, Clone)]
pub struct BatchNormStats {
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel (biased) variance.
    pub var: Vec<f64>,
    /// Added to the variance.
    pub eps: f64,
    /// The statistics are the input's own (training mode): gradients flow through them.
    pub batch_stats: bool,
    /// Apply ReLU to the output (fused).
    pub relu: bool,
}

/// BatchNorm over the last dimension of `x: [.., c]` with given statistics:
/// `y = (x - mean) / sqrt(var + eps) · weight + bias`, then ReLU when `relu`.
///
/// `batch_stats` says the statistics are `x`'s own (training): the backward then includes
/// their dependence on `x`. Otherwise they are constants (running statistics, eval mode).
/// Gradients flow to `x`, `weight` and `bias`, each when tracked.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: &BatchNormStats,
) -> candle_core::Result<Tensor> {
    let BatchNormStats {
        mean,
        var,
        eps,
        batch_stats,
        relu,
    } = stats;
    let (eps, batch_stats, relu) = (*eps, *batch_stats, *relu);
    let c = x.dims().last().copied().unwrap_or(0);
    if mean.len() != c || var.len() != c || weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "batch-norm: {c} channels, but {} means, {} variances, weight {:?}, bias {:?}",
            mean.len(),
            var.len(),
            weight.dims(),
            bias.dims()
        )
    }
    let op = BatchNormOp {
        mean: mean.iter().map(|&m| m as f32).collect(),
        rstd: var
            .iter()
            .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
            .collect(),
        batch_stats,
        relu,
    };
    on_cpu_f32(&[x, weight, bias], |t| {
        t[0].contiguous()?
            .apply_op3_arc(&t[1], &t[2], std::sync::Arc::new(Box::new(op)))
    })
}

/// The BatchNorm kernel behind [`batch_norm`]; inputs `(x, weight, bias)`.
struct BatchNormOp {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    batch_stats: bool,
    relu: bool,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "kiln-batch-norm"
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
        let c = self.mean.len();
        if c == 0 || w.len() != c || b.len() != c {
            candle_core::bail!("batch-norm: weight/bias do not have {c} channels")
        }
        let scale: Vec<f32> = (0..c).map(|i| self.rstd[i] * w[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| b[i] - self.mean[i] * scale[i]).collect();
        let mut out = super::gemm::zeroed(x.len());
        let relu = self.relu;
        out.par_chunks_mut(c * 64)
            .zip(x.par_chunks(c * 64))
            .for_each(|(yo, xi)| {
                for (yr, xr) in yo.chunks_exact_mut(c).zip(xi.chunks_exact(c)) {
                    for i in 0..c {
                        let v = xr[i] * scale[i] + shift[i];
                        yr[i] = if relu { v.max(0.0) } else { v };
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.mean.len();
        let name = self.name();
        let (want_dx, want_dw, want_db) = (x.track_op(), w.track_op(), b.track_op());
        let n = x.elem_count();
        let rows = (n / c.max(1)) as f32;
        let mut dx = if want_dx {
            super::gemm::zeroed(n)
        } else {
            Vec::new()
        };
        let mut sums = (vec![0f64; c], vec![0f64; c]);
        let (mean, rstd, relu) = (&self.mean, &self.rstd, self.relu);
        with_f32(x, name, |xs| {
            with_f32(w, name, |ws| {
                with_f32(res, name, |ys| {
                    with_f32(grad, name, |gs| {
                        // The gradient through the fused ReLU.
                        let gate = |g: f32, y: f32| if relu && y <= 0.0 { 0.0 } else { g };
                        let chunk = row_chunk(xs.len() / c) * c;
                        sums = xs
                            .par_chunks(chunk)
                            .zip(gs.par_chunks(chunk))
                            .zip(ys.par_chunks(chunk))
                            .map(|((xp, gp), yp)| {
                                let mut sg = vec![0f64; c];
                                let mut sgx = vec![0f64; c];
                                let rows = xp.chunks_exact(c).zip(gp.chunks_exact(c));
                                for ((xr, gr), yr) in rows.zip(yp.chunks_exact(c)) {
                                    for ch in 0..c {
                                        let gv = gate(gr[ch], yr[ch]);
                                        let xhat = (xr[ch] - mean[ch]) * rstd[ch];
                                        sg[ch] += gv as f64;
                                        sgx[ch] += (gv * xhat) as f64;
                                    }
                                }
                                (sg, sgx)
                            })
                            .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
                        if want_dx {
                            let (sum_g, sum_gx) = &sums;
                            let mg: Vec<f32> = sum_g.iter().map(|&s| s as f32 / rows).collect();
                            let mgx: Vec<f32> = sum_gx.iter().map(|&s| s as f32 / rows).collect();
                            let k: Vec<f32> = (0..c).map(|i| ws[i] * rstd[i]).collect();
                            let batch = self.batch_stats;
                            dx.par_chunks_mut(chunk)
                                .zip(xs.par_chunks(chunk))
                                .zip(gs.par_chunks(chunk).zip(ys.par_chunks(chunk)))
                                .for_each(|((dp, xp), (gp, yp))| {
                                    let rows = dp.chunks_exact_mut(c).zip(xp.chunks_exact(c));
                                    let grads = gp.chunks_exact(c).zip(yp.chunks_exact(c));
                                    for ((dr, xr), (gr, yr)) in rows.zip(grads) {
                                        for ch in 0..c {
                                            let gv = gate(gr[ch], yr[ch]);
                                            dr[ch] = if batch {
                                                let xhat = (xr[ch] - mean[ch]) * rstd[ch];
                                                k[ch] * (gv - mg[ch] - xhat * mgx[ch])
                                            } else {
                                                k[ch] * gv
                                            };
                                        }
                                    }
                                });
                        }
                        Ok(())
                    })
                })
            })
        })?;
        let (sum_g, sum_gx) = sums;
        let dev = x.device();
        let to_t = |v: &[f64]| Tensor::from_vec(v.iter().map(|&s| s as f32).collect(), c, dev);
        let dx = want_dx
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let dw = want_dw.then(|| to_t(&sum_gx)).transpose()?;
        let db = want_db.then(|| to_t(&sum_g)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// Max-pool of NHWC `x: [b, h, w, c]` with a square `kernel`, `stride` and padding (padded
/// positions never win), as PyTorch's `MaxPool2d` (floor mode). The backward routes each
/// output's gradient to the first maximal input of its window in scan order (PyTorch's choice
/// on ties); overlapping windows accumulate.
pub fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if kernel == 0 || stride == 0 || 2 * padding > kernel {
        candle_core::bail!(
            "max-pool: kernel {kernel}, stride {stride}, padding {padding} (padding must be at most half the kernel)"
        )
    }
    on_cpu_f32(&[x], |t| {
        t[0].contiguous()?.apply_op1(MaxPool {
            kernel,
            stride,
            padding,
        })
    })
}

/// The max-pool kernel behind [`max_pool2d`].
struct MaxPool {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool {
    fn geom(&self, dims: &[usize]) -> candle_core::Result<Geom> {
        let &[b, h, w, c] = dims else {
            candle_core::bail!("max-pool: input {dims:?} must be [b, h, w, c]")
        };
        Geom::new(
            &[b, h, w, c],
            &[c, c, self.kernel, self.kernel],
            self.stride,
            self.padding,
        )
    }

    /// Index (into one image `[h, w, c]`) of the first maximum of output `(oy, ox)`, channel
    /// `ch`.
    #[inline]
    fn argmax(g: &Geom, img: &[f32], oy: usize, ox: usize, ch: usize) -> usize {
        let mut best = usize::MAX;
        let mut best_v = f32::NEG_INFINITY;
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                if let Some((iy, ix)) = g.source(oy, ox, ky, kx) {
                    let i = (iy * g.w + ix) * g.cin + ch;
                    let v = img[i];
                    if best == usize::MAX || v > best_v || v.is_nan() {
                        best = i;
                        best_v = v;
                        if v.is_nan() {
                            return best;
                        }
                    }
                }
            }
        }
        best
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "kiln-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, self.name())?;
        let g = self.geom(l.dims())?;
        let c = g.cin;
        let img = g.h * g.w * c;
        let mut out = super::gemm::zeroed(g.b * g.rows() * c);
        out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let (b, p) = (r / g.rows(), r % g.rows());
            let (oy, ox) = (p / g.wo, p % g.wo);
            let xi = &x[b * img..][..img];
            o.fill(f32::NEG_INFINITY);
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    if let Some((iy, ix)) = g.source(oy, ox, ky, kx) {
                        let src = &xi[(iy * g.w + ix) * c..][..c];
                        for (d, &v) in o.iter_mut().zip(src) {
                            if v > *d || v.is_nan() {
                                *d = v;
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.ho, g.wo, c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = self.geom(arg.dims())?;
        let c = g.cin;
        let img = g.h * g.w * c;
        let mut dx = super::gemm::zeroed(arg.elem_count());
        with_f32(arg, self.name(), |xs| {
            with_f32(grad, self.name(), |gs| {
                // Parallel over images: each owns its slice of dx.
                dx.par_chunks_mut(img).enumerate().for_each(|(b, dimg)| {
                    let xi = &xs[b * img..][..img];
                    for oy in 0..g.ho {
                        for ox in 0..g.wo {
                            let go = &gs[((b * g.ho + oy) * g.wo + ox) * c..][..c];
                            for (ch, &gv) in go.iter().enumerate() {
                                let i = Self::argmax(&g, xi, oy, ox, ch);
                                if i != usize::MAX {
                                    dimg[i] += gv;
                                }
                            }
                        }
                    }
                });
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
