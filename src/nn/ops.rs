//! Differentiable building blocks, and fused CPU kernels with a hand-written backward.
//!
//! The `*_primitive` functions are compositions of candle ops that all have a backward: they are
//! the reference. The fused versions ([`layer_norm`], [`gelu_erf`], [`rms_norm`], [`rope`]) run one
//! CPU kernel forward and one backward; on a CUDA GPU, [`layer_norm`], [`rms_norm`] and
//! [`softmax_last_dim`] in f32, [`attention_softmax`] (scores in any float dtype, the softmax in
//! f32) and [`gelu_erf`], [`silu_mul`] and [`rope`] in f32, bf16 or f16 run kiln's CUDA kernels
//! (`crate::cuda`); on any other device, dtype or layout they fall back to the primitive
//! version, so callers never need to know where they run.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::simd::{dot_f32, max_f32, sum_f32, sum_f64_lanes, wide_fn};

/// Softmax over the last dimension, built from ops that all have a backward.
///
/// candle's `softmax_last_dim` is a fused kernel without backward; this is the differentiable
/// equivalent. The max is detached: softmax does not depend on the shift, so it needs no gradient
/// and detaching saves the reduce-max backward. On a CUDA GPU in f32, kiln's kernels instead
/// (one forward, one backward).
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if device_kernel_ok(xs) {
        let op = DeviceSoftmax {
            scale: 1.0,
            mask: None,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Attention's probabilities, in f32: `softmax(scale · scores + mask)` over the last
/// dimension, for `scores` `[batch, .., q, s]` in any float dtype and an additive f32 `mask`
/// of the same rank broadcast to them (`[batch or 1, 1, .., q or 1, s]`), or none. As
/// separate ops, the scores are scaled in their own dtype, then taken to f32, then masked.
/// On a CUDA GPU it is kiln's softmax kernel instead, the scores taken to f32 first and the
/// scale and mask applied inside: candle's graph then has one node where it had three, and
/// makes no gradient for the mask.
pub fn attention_softmax(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if device_kernel_takes(scores, true) {
        // `None` for a mask the kernel cannot place (the separate ops below take it).
        let placed = match mask {
            None => Some(None),
            Some(m) if m.dtype() == DType::F32 && m.device().same_device(scores.device()) => {
                mask_rows(scores.dims(), m.dims()).map(|rows| Some((m, rows)))
            }
            Some(_) => None,
        };
        if let Some(placed) = placed {
            let mask = match placed {
                Some((m, [per_batch, q, batch_rows, query_rows])) => {
                    let rows = crate::cuda::MaskRows {
                        per_batch,
                        q,
                        batch_rows,
                        query_rows,
                    };
                    Some((m.contiguous()?, rows))
                }
                None => None,
            };
            let op = DeviceSoftmax {
                scale: scale as f32,
                mask,
            };
            return scores.to_dtype(DType::F32)?.contiguous()?.apply_op1(op);
        }
    }
    let scaled = if scale == 1.0 {
        scores.clone()
    } else {
        (scores * scale)?
    };
    let scaled = scaled.to_dtype(DType::F32)?;
    match mask {
        Some(m) => softmax_last_dim(&scaled.broadcast_add(m)?),
        None => softmax_last_dim(&scaled),
    }
}

/// For scores of `scores` dims and a mask of `mask` dims broadcast to them (the same rank,
/// its first dimension the batch or 1, its second-to-last the queries or 1, its last the
/// keys, every other 1): `[per_batch, q, batch_rows, query_rows]`, where the scores' rows are
/// `per_batch` per batch, their query cycling every `q`, and the mask row of batch `b` and
/// query `i` is `b · batch_rows + i · query_rows`. `None` for any other mask.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn mask_rows(scores: &[usize], mask: &[usize]) -> Option<[usize; 4]> {
    let r = scores.len();
    if r < 3 || mask.len() != r || mask[r - 1] != scores[r - 1] {
        return None;
    }
    let (b, q) = (scores[0], scores[r - 2]);
    let (mb, mq) = (mask[0], mask[r - 2]);
    if !(mb == 1 || mb == b) || !(mq == 1 || mq == q) || mask[1..r - 2].iter().any(|&d| d != 1) {
        return None;
    }
    let per_batch = scores[1..r - 1].iter().product::<usize>();
    let query_rows = usize::from(mq == q && q > 1);
    let batch_rows = if mb == b && b > 1 { mq } else { 0 };
    Some([per_batch, q, batch_rows, query_rows])
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

/// True when kiln's CUDA kernels can take this tensor (f32 on a CUDA GPU, the kernels on:
/// `crate::cuda`); never in a CPU-only build.
fn device_kernel_ok(xs: &Tensor) -> bool {
    device_kernel_takes(xs, false)
}

/// [`device_kernel_ok`], with bf16 and f16 too when `half` (the kernels that have those).
fn device_kernel_takes(xs: &Tensor, half: bool) -> bool {
    #[cfg(feature = "cuda")]
    if crate::cuda::kernel_device(xs.device()).is_some() {
        return match xs.dtype() {
            DType::F32 => true,
            DType::BF16 | DType::F16 => half,
            _ => false,
        };
    }
    let _ = (xs, half);
    false
}

/// GELU (erf form) on a CUDA GPU (kiln's kernels; f32, bf16 or f16): one kernel each way.
#[cfg(feature = "cuda")]
struct DeviceGelu;

#[cfg(feature = "cuda")]
impl CustomOp1 for DeviceGelu {
    fn name(&self) -> &'static str {
        "kiln-gelu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-gelu: CUDA only (the CPU has its fused kernel)")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::elementwise("kiln_gelu_fwd", &[(x, l)], 1)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = x
            .detach()
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &DeviceElementwise("kiln_gelu_bwd", 1))?;
        Ok(Some(dx))
    }
}

/// `silu(gate) · up` on a CUDA GPU (kiln's kernels; f32, bf16 or f16): one kernel each way.
#[cfg(feature = "cuda")]
struct DeviceSiluMul;

#[cfg(feature = "cuda")]
impl CustomOp2 for DeviceSiluMul {
    fn name(&self) -> &'static str {
        "kiln-silu-mul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-silu-mul: CUDA only (the CPU has its fused kernel)")
    }

    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::elementwise("kiln_silu_mul_fwd", &[(g, gl), (u, ul)], 1)?;
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let out = gate.detach().contiguous()?.apply_op3_no_bwd(
            &up.detach().contiguous()?,
            &grad.contiguous()?,
            &DeviceElementwise("kiln_silu_mul_bwd", 2),
        )?;
        let n = gate.elem_count();
        let dgate = out.narrow(0, 0, n)?.reshape(gate.shape())?;
        let dup = out.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// A backward kernel of kiln's (`.0`, without its dtype suffix) over its inputs (contiguous,
/// of one size `n` and dtype): a flat output of `.1 · n` elements. No backward of its own.
#[cfg(feature = "cuda")]
struct DeviceElementwise(&'static str, usize);

#[cfg(feature = "cuda")]
impl DeviceElementwise {
    fn run(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::elementwise(self.0, inputs, self.1)?;
        let n = inputs.first().map_or(0, |(_, l)| l.shape().elem_count());
        Ok((out, Shape::from(self.1 * n)))
    }
}

#[cfg(feature = "cuda")]
impl CustomOp2 for DeviceElementwise {
    fn name(&self) -> &'static str {
        self.0
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: CUDA only", self.0)
    }

    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.run(&[(a, al), (b, bl)])
    }
}

#[cfg(feature = "cuda")]
impl CustomOp3 for DeviceElementwise {
    fn name(&self) -> &'static str {
        self.0
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: CUDA only", self.0)
    }

    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.run(&[(a, al), (b, bl), (c, cl)])
    }
}

/// `softmax(scale · x + mask)` over the last dimension on a CUDA GPU (kiln's kernel, f32): one
/// kernel forward and one backward, from the output. The mask (additive, f32) is a constant
/// the op holds, not an input of candle's graph: it gets no gradient, and costs none.
#[cfg(feature = "cuda")]
struct DeviceSoftmax {
    scale: f32,
    mask: Option<(Tensor, crate::cuda::MaskRows)>,
}

#[cfg(feature = "cuda")]
impl CustomOp1 for DeviceSoftmax {
    fn name(&self) -> &'static str {
        "kiln-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-softmax: CUDA only (the CPU takes candle's ops)")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = match &self.mask {
            Some((mask, rows)) => {
                let (ms, ml) = mask.storage_and_layout();
                let Storage::Cuda(m) = &*ms else {
                    candle_core::bail!("kiln-softmax: the mask is not on the GPU")
                };
                crate::cuda::softmax_forward(x, l, self.scale, Some((m, ml, *rows)))?
            }
            None => crate::cuda::softmax_forward(x, l, self.scale, None)?,
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = y.detach().contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &DeviceSoftmaxBackward { scale: self.scale },
        )?;
        Ok(Some(dx))
    }
}

/// Rotary position embeddings on a CUDA GPU (kiln's kernel; f32, bf16 or f16, the tables in
/// the input's dtype): one kernel forward, and the inverse rotation of the gradient backward.
/// The tables are constants the op holds, not inputs of candle's graph.
#[cfg(feature = "cuda")]
struct DeviceRope {
    cos: Tensor,
    sin: Tensor,
    /// 1: rotate; -1: rotate back (the backward).
    sign: f32,
}

#[cfg(feature = "cuda")]
impl CustomOp1 for DeviceRope {
    fn name(&self) -> &'static str {
        "kiln-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-rope: CUDA only (the CPU has its fused kernel)")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (Storage::Cuda(c), Storage::Cuda(s)) = (&*cs, &*ss) else {
            candle_core::bail!("kiln-rope: the tables are not on the GPU")
        };
        let y = crate::cuda::rope((x, l), (c, cl), (s, sl), self.sign)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = DeviceRope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            sign: -self.sign,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// [`DeviceSoftmax`]'s backward: inputs `(y, dy)`, the input's gradient out.
#[cfg(feature = "cuda")]
struct DeviceSoftmaxBackward {
    scale: f32,
}

#[cfg(feature = "cuda")]
impl CustomOp2 for DeviceSoftmaxBackward {
    fn name(&self) -> &'static str {
        "kiln-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-softmax-backward: CUDA only")
    }

    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dx = crate::cuda::softmax_backward((y, yl), (dy, dyl), self.scale)?;
        Ok((dx, yl.shape().clone()))
    }
}

/// The backward of a norm on a CUDA GPU (kiln's kernels): inputs `(x, w, dy)`, all contiguous
/// f32; one flat output, the input's gradient then the weight's (then the shift's for
/// LayerNorm). No backward of its own.
#[cfg(feature = "cuda")]
struct DeviceNormBackward {
    eps: f32,
    /// LayerNorm (true) or RMSNorm.
    centered: bool,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for DeviceNormBackward {
    fn name(&self) -> &'static str {
        "kiln-norm-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-norm-backward: CUDA only (the CPU has its fused kernels)")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::norm_backward((x, xl), (w, wl), (dy, dyl), self.eps, self.centered)?;
        let dim = xl.dims().last().copied().unwrap_or(1);
        let params = if self.centered { 2 } else { 1 };
        Ok((out, Shape::from(xl.shape().elem_count() + params * dim)))
    }
}

/// A norm's gradients on a CUDA GPU: `(dx, dw, db)`, `dw` and `db` only where `w` and `b`
/// track gradients (`db` always none for RMSNorm).
#[cfg(feature = "cuda")]
fn device_norm_backward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let op = DeviceNormBackward {
        eps,
        centered: b.is_some(),
    };
    let out = x
        .contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &op)?;
    let (n, dim) = (x.elem_count(), x.dim(D::Minus1)?);
    let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = w.track_op().then(|| out.narrow(0, n, dim)).transpose()?;
    let db = match b {
        Some(b) if b.track_op() => Some(out.narrow(0, n + dim, dim)?),
        _ => None,
    };
    Ok((dx, dw, db))
}

/// Rows `ids` of a trainable lookup table `[num, dim]` (an embedding): `[ids.len(), dim]`.
/// `None` where it does not apply (a frozen table, off the CPU, not f32): candle's
/// `index_select` then runs. The table is read in place and its gradient deposited beside
/// candle's graph ([`super::autograd`]): candle's `index_select` backward zeroes a dense
/// table-sized gradient and adds it into another fresh zero tensor, three passes over the
/// whole table (11.7M values for BERT's vocabulary) on the thread driving the step; this
/// fills one on the pool and adds the rows into it.
pub fn embedding_rows(table: &Tensor, ids: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !(fused_ok(table) && table.is_variable() && table.is_contiguous()) {
        return Ok(None);
    }
    let (num, dim) = table.dims2()?;
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= num) {
        candle_core::bail!("embedding: id {bad} is out of range for a table of {num} rows")
    }
    let op = EmbeddingRows {
        table: table.clone(),
        ids,
        dim,
    };
    let anchor = super::autograd::anchor(true)?;
    Ok(Some(
        anchor.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?,
    ))
}

/// [`embedding_rows`]'s op: its one input is the anchor; the table and ids are its own.
struct EmbeddingRows {
    table: Tensor,
    ids: Vec<u32>,
    dim: usize,
}

impl CustomOp1 for EmbeddingRows {
    fn name(&self) -> &'static str {
        "kiln-embedding-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = self.dim;
        let mut out = super::gemm::zeroed(self.ids.len() * dim);
        with_cpu_f32(&self.table, self.name(), |t| {
            out.par_chunks_mut(dim)
                .zip(self.ids.par_iter())
                .for_each(|(row, &i)| {
                    let i = i as usize;
                    row.copy_from_slice(&t[i * dim..(i + 1) * dim]);
                });
            Ok(())
        })?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.ids.len(), self.dim)),
        ))
    }

    fn bwd(
        &self,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dim = self.dim;
        let mut dt = super::gemm::zeroed(self.table.elem_count());
        with_cpu_f32(&grad, self.name(), |g| {
            for (&i, row) in self.ids.iter().zip(g.chunks_exact(dim)) {
                let i = i as usize;
                for (d, v) in dt[i * dim..(i + 1) * dim].iter_mut().zip(row) {
                    *d += v;
                }
            }
            Ok(())
        })?;
        let dt = Tensor::from_vec(dt, self.table.shape(), self.table.device())?;
        super::autograd::deposit(&self.table, dt);
        Ok(None)
    }
}

/// Multi-head attention for inference, fused (no backward): `q` `[batch, sq, hidden]`, `k` and
/// `v` `[batch, s, hidden]` with the heads side by side in the last dimension (as the
/// projections give them, so no head transposes are copied), `mask` the `[batch, s]` 0/1
/// attention mask on the host. Softmax of `scale · q·k` over the real tokens, times `v`:
/// `[batch, sq, hidden]`. `None` off the CPU, for other dtypes, or when a gradient is tracked
/// through any input (the caller's primitive path then runs). Equal to adding `f32::MIN` at pads before the softmax, where `exp` gives them
/// exactly zero weight.
pub fn attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    heads: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    // No backward: only where no gradient is tracked (frozen weights, as when serving).
    if !(fused_ok(q) && fused_ok(k) && fused_ok(v)) || q.track_op() || k.track_op() || v.track_op()
    {
        return Ok(None);
    }
    let (b, s, h) = k.dims3()?;
    if v.dims() != [b, s, h] || q.dim(0)? != b || q.dim(2)? != h || mask.len() != b * s {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}, mask of {}",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.len()
        )
    }
    if heads == 0 || h % heads != 0 {
        candle_core::bail!("attention: hidden {h} is not a multiple of {heads} heads")
    }
    let op = FusedAttention {
        mask: mask.to_vec(),
        heads,
        scale,
    };
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &op,
    )?))
}

struct FusedAttention {
    mask: Vec<f32>,
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "kiln-attention-inference"
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
        let q = cpu_f32(s1, l1, self.name())?;
        let k = cpu_f32(s2, l2, self.name())?;
        let v = cpu_f32(s3, l3, self.name())?;
        let (b, sq, h) = l1.shape().dims3()?;
        let s = l2.shape().dims3()?.1;
        let dh = h / self.heads;
        let mut out = super::gemm::zeroed(b * sq * h);
        let (heads, scale) = (self.heads, self.scale);
        out.par_chunks_mut(sq * h.max(1))
            .enumerate()
            .for_each(|(bi, out)| {
                let mask = &self.mask[bi * s..(bi + 1) * s];
                let q = &q[bi * sq * h..][..sq * h];
                let (k, v) = (&k[bi * s * h..][..s * h], &v[bi * s * h..][..s * h]);
                attention_inference_row(out, (q, k, v), mask, (h, dh, heads), scale)
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

wide_fn! {
    /// One batch row of [`FusedAttention`]: `out [sq, h]` (zeroed) += softmax(q·kᵀ·scale)·v
    /// per head over the keys the mask shows, for `q [sq, h]` and `k`, `v` `[s, h]`.
    fn attention_inference_row(
        out: &mut [f32],
        qkv: (&[f32], &[f32], &[f32]),
        mask: &[f32],
        dims: (usize, usize, usize),
        scale: f32,
    ) {
        let (q, k, v) = qkv;
        let (h, dh, heads) = dims;
        // The real tokens (all of them for a row of pads only, as the additive mask would
        // weigh them alike).
        let mut keys: Vec<usize> = (0..mask.len()).filter(|&j| mask[j] != 0.0).collect();
        if keys.is_empty() {
            keys = (0..mask.len()).collect();
        }
        let mut weights = vec![0f32; keys.len()];
        for (qrow, orow) in q.chunks_exact(h.max(1)).zip(out.chunks_exact_mut(h.max(1))) {
            for head in 0..heads {
                let off = head * dh;
                let qh = &qrow[off..off + dh];
                for (w, &j) in weights.iter_mut().zip(&keys) {
                    *w = scale * dot_f32(qh, &k[j * h + off..][..dh]);
                }
                let max = max_f32(&weights);
                // Separate passes, so the exponentials vectorise (a running sum would not).
                weights.iter_mut().for_each(|w| *w = exp_f32(*w - max));
                let inv = 1.0 / sum_f32(&weights);
                let o = &mut orow[off..off + dh];
                for (w, &j) in weights.iter().zip(&keys) {
                    let p = w * inv;
                    let vrow = &v[j * h + off..][..dh];
                    for (o, x) in o.iter_mut().zip(vrow) {
                        *o += p * x;
                    }
                }
            }
        }
    }
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
    if (fused_ok(xs) && fused_ok(weight) && fused_ok(bias))
        || (device_kernel_ok(xs) && device_kernel_ok(weight) && device_kernel_ok(bias))
    {
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
    #[cfg(feature = "cuda")]
    if device_kernel_takes(xs, true) {
        return xs.contiguous()?.apply_op1(DeviceGelu);
    }
    if fused_ok(xs) {
        xs.contiguous()?.apply_op1(FusedGelu)
    } else {
        gelu_erf_primitive(xs)
    }
}

/// The contiguous f32 slice behind a CPU storage, or an error naming `op`.
pub(super) fn cpu_f32<'a>(
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
pub(super) fn with_cpu_f32<R>(
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

/// A dense layer `x · wᵀ + b` on a 2-D `x` `[rows, in]` with the PyTorch weight layout
/// `w` `[out, in]`: one gemm forward with the bias added in its output, and in backward one
/// gemm per operand that needs a gradient and a parallel column sum for the bias. `None` off
/// the CPU or for other dtypes (the caller's primitive path then runs).
///
/// candle's `x.matmul(&w.t())` + `broadcast_add` is the same function, but its backward
/// writes the weight gradient transposed and copies it back through a fresh zero tensor, sums
/// the bias gradient over a non-last dimension on one core, and computes gradients for frozen
/// weights only to drop them.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Option<Tensor>> {
    if !(fused_ok(x) && fused_ok(w) && b.is_none_or(fused_ok)) {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(Some(match b {
        Some(b) => x.apply_op3_arc(
            &w,
            &b.contiguous()?,
            std::sync::Arc::new(Box::new(FusedLinear)),
        )?,
        None => x.apply_op2_arc(&w, std::sync::Arc::new(Box::new(FusedLinear)))?,
    }))
}

/// [`linear`]'s kernel: inputs `(x, w)` or `(x, w, b)`.
struct FusedLinear;

impl FusedLinear {
    fn forward(
        x: &[f32],
        xl: &Layout,
        w: &[f32],
        wl: &Layout,
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k || b.is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "linear: x [{m}, {k}], w [{n}, {wk}], bias of {:?}",
                b.map(<[f32]>::len)
            )
        }
        let mut y = match b {
            Some(b) => super::gemm::repeated(b, m),
            None => super::gemm::zeroed(m * n),
        };
        super::gemm::sgemm(
            (m, n, k),
            &mut y,
            n,
            super::gemm::Mat::rows(x, k),
            super::gemm::Mat::transposed(w, k),
            1.0,
            b.is_some(),
            super::gemm::Threads::All,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// Gradients of `x`, `w` and (when given) the bias, each only where it is tracked.
    fn backward(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use super::gemm::{Mat, Threads, sgemm};
        let grad = grad.contiguous()?;
        let (m, k) = x.dims2()?;
        let n = w.dim(0)?;
        let dev = x.device();
        let name = "kiln-linear";
        with_cpu_f32(&grad, name, |g| {
            let dx = if x.track_op() {
                let mut dx = super::gemm::zeroed(m * k);
                with_cpu_f32(w, name, |w| {
                    // dx [m, k] = g [m, n] · w [n, k]
                    sgemm(
                        (m, k, n),
                        &mut dx,
                        k,
                        Mat::rows(g, n),
                        Mat::rows(w, k),
                        1.0,
                        false,
                        Threads::All,
                    )
                })?;
                Some(Tensor::from_vec(dx, (m, k), dev)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = super::gemm::zeroed(n * k);
                with_cpu_f32(x, name, |x| {
                    // dw [n, k] = gᵀ [n, m] · x [m, k]
                    sgemm(
                        (n, k, m),
                        &mut dw,
                        k,
                        Mat::transposed(g, n),
                        Mat::rows(x, k),
                        1.0,
                        false,
                        Threads::All,
                    )
                })?;
                Some(Tensor::from_vec(dw, (n, k), dev)?)
            } else {
                None
            };
            let db = match b {
                Some(b) if b.track_op() => Some(Tensor::from_vec(column_sums(g, n), n, dev)?),
                _ => None,
            };
            Ok((dx, dw, db))
        })
    }
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "kiln-linear")?;
        let w = cpu_f32(s2, l2, "kiln-linear")?;
        Self::forward(x, l1, w, l2, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::backward(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "kiln-linear"
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
        let x = cpu_f32(s1, l1, "kiln-linear")?;
        let w = cpu_f32(s2, l2, "kiln-linear")?;
        let b = cpu_f32(s3, l3, "kiln-linear")?;
        Self::forward(x, l1, w, l2, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::backward(x, w, Some(b), grad)
    }
}

/// LayerNorm of the rows of `x` (`[rows, w.len()]`) with scale `w` and shift `b`, on the pool.
pub(super) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len().max(1);
    let mut out = super::gemm::zeroed(x.len());
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| layer_norm_chunk(out, x, w, b, eps));
    out
}

wide_fn! {
    /// [`layer_norm_rows`] for the rows of one task.
    fn layer_norm_chunk(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let dim = w.len().max(1);
        for (xr, yr) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let (mean, rstd) = row_stats(xr, eps);
            for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        }
    }
}

/// Lanes of the row sums in the norms' backward (one AVX-512 vector), so they vectorise.
const LANES: usize = 16;

wide_fn! {
    /// [`layer_norm_rows_backward`] for the rows of one task: the input's gradient added into
    /// `dx`, the scale's and shift's into `dw` and `db`.
    fn layer_norm_grad_chunk(
        dx: &mut [f32],
        x: &[f32],
        g: &[f32],
        w: &[f32],
        eps: f32,
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let dim = w.len().max(1);
        let full = dim / LANES * LANES;
        let rows = x.chunks_exact(dim).zip(g.chunks_exact(dim));
        for ((xr, gr), dxr) in rows.zip(dx.chunks_exact_mut(dim)) {
            let (mean, rstd) = row_stats(xr, eps);
            // dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w.
            let mut sum_gw = [0f32; LANES];
            let mut sum_gw_xhat = [0f32; LANES];
            let blocks = xr[..full]
                .chunks_exact(LANES)
                .zip(gr[..full].chunks_exact(LANES))
                .zip(w[..full].chunks_exact(LANES))
                .zip(dw[..full].chunks_exact_mut(LANES).zip(db[..full].chunks_exact_mut(LANES)));
            for (((xc, gc), wc), (dwc, dbc)) in blocks {
                for l in 0..LANES {
                    let xhat = (xc[l] - mean) * rstd;
                    let gw = gc[l] * wc[l];
                    sum_gw[l] += gw;
                    sum_gw_xhat[l] += gw * xhat;
                    dwc[l] += gc[l] * xhat;
                    dbc[l] += gc[l];
                }
            }
            let (mut tail_gw, mut tail_gw_xhat) = (0f32, 0f32);
            for i in full..dim {
                let xhat = (xr[i] - mean) * rstd;
                let gw = gr[i] * w[i];
                tail_gw += gw;
                tail_gw_xhat += gw * xhat;
                dw[i] += gr[i] * xhat;
                db[i] += gr[i];
            }
            let mean_gw = (sum_gw.iter().sum::<f32>() + tail_gw) / dim as f32;
            let mean_gw_xhat = (sum_gw_xhat.iter().sum::<f32>() + tail_gw_xhat) / dim as f32;
            for (((d, &x), &g), &w) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                let xhat = (x - mean) * rstd;
                *d += rstd * (g * w - mean_gw - xhat * mean_gw_xhat);
            }
        }
    }
}

/// [`layer_norm_rows`]'s backward for the output's gradient `g`: the input's gradient added
/// into `dx`, and the scale's and shift's gradients returned.
pub(super) fn layer_norm_rows_backward(
    x: &[f32],
    w: &[f32],
    eps: f32,
    g: &[f32],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let dim = w.len().max(1);
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(g.par_chunks(chunk))
        .map(|((dx, x), g)| {
            let mut dw = vec![0f32; dim];
            let mut db = vec![0f32; dim];
            layer_norm_grad_chunk(dx, x, g, w, eps, &mut dw, &mut db);
            (dw, db)
        })
        .reduce(
            || (vec![0f32; dim], vec![0f32; dim]),
            |(aw, ab), (bw, bb)| (add_columns(aw, bw), add_columns(ab, bb)),
        )
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
        let out = layer_norm_rows(x, w, b, self.eps);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::norm_forward((s1, l1), (s2, l2), Some((s3, l3)), self.eps)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, db) = device_norm_backward(x, w, Some(b), grad, self.eps)?;
            return Ok((Some(dx), dw, db));
        }
        let grad = grad.contiguous()?;
        let dim = x.dim(D::Minus1)?;
        let mut dx = super::gemm::zeroed(x.elem_count());
        let (dw, db) = with_cpu_f32(x, self.name(), |x| {
            with_cpu_f32(w, self.name(), |w| {
                with_cpu_f32(&grad, self.name(), |g| {
                    Ok(layer_norm_rows_backward(x, w, self.eps, g, &mut dx))
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

/// Per-column sums of a row-major `[rows, n]` matrix, over the pool.
pub(super) fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let rows = g.len() / n.max(1);
    let rows_per_task = rows
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .max(1);
    g.par_chunks(rows_per_task * n.max(1))
        .map(|part| {
            let mut sum = vec![0f32; n];
            for row in part.chunks_exact(n.max(1)) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sum
        })
        .reduce(
            || vec![0f32; n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// Rows per parallel task for a row-wise kernel over `rows` rows of `dim` values: a few tasks
/// per core, none smaller than about 16k values (below that a task costs more than it saves).
fn rows_per_task(rows: usize, dim: usize) -> usize {
    let by_cores = rows.div_ceil(4 * rayon::current_num_threads().max(1));
    by_cores.max((1 << 14) / dim.max(1)).max(1)
}

/// Per-column sums of the parts, added together (the weight and bias gradients of a row-wise
/// kernel, reduced over its parallel tasks).
fn add_columns(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
    a
}

/// Mean and 1/std of one row, accumulated in f64 so long rows do not lose precision.
#[inline(always)]
fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let n = xr.len() as f64;
    let mean = sum_f64_lanes(xr, |v| v) / n;
    let var = sum_f64_lanes(xr, |v| {
        let d = v - mean;
        d * d
    }) / n;
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

/// e^x for f32 without a libm call, branch-free so loops over it vectorise: x = n·ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r from a degree-6 polynomial, 2^n put straight into the exponent bits.
/// Within 2 ulp of libm's `expf` over the f32 range; 0 below -87.3 (where `expf` is subnormal
/// or 0), so masked scores of `-inf` give exactly 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.7);
    // Round to nearest through the float adder (1.5 · 2^23), which vectorises; `round` is a
    // libm call.
    const SHIFTER: f32 = 12_582_912.0;
    let t = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_66;
    p = p * r + 0.5;
    let e = (p * r * r + r) + 1.0;
    // 2^n: t's low mantissa bits hold n itself (t lies in [2^23, 2^24), where the step is 1),
    // so integer arithmetic on its bits gives the exponent field. `n as i32` would be a
    // saturating conversion, which compiles to a scalar sequence per lane.
    let n_bits = t.to_bits().wrapping_sub(SHIFTER.to_bits());
    let scaled = e * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.3 { 0.0 } else { scaled }
}

wide_fn! {
    /// `a = gelu(p)`, element by element.
    pub(super) fn gelu_chunk(a: &mut [f32], p: &[f32]) {
        for (a, &v) in a.iter_mut().zip(p) {
            *a = 0.5 * v * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
        }
    }
}

wide_fn! {
    /// `pre = d ⊙ gelu'(pre)`, element by element.
    pub(super) fn gelu_grad_chunk(pre: &mut [f32], d: &[f32]) {
        for (v, &d) in pre.iter_mut().zip(d) {
            let cdf = 0.5 * (1.0 + erf_f32(*v * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * *v * *v);
            *v = d * (cdf + *v * pdf);
        }
    }
}

pub(super) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2*pi), the normal density's constant.
pub(super) const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

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
        let mut out = super::gemm::zeroed(x.len());
        out.par_chunks_mut(super::mlp::TASK)
            .zip(x.par_chunks(super::mlp::TASK))
            .for_each(|(a, p)| gelu_chunk(a, p));
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
        let mut out = x.to_vec();
        out.par_chunks_mut(super::mlp::TASK)
            .zip(g.par_chunks(super::mlp::TASK))
            .for_each(|(v, d)| gelu_grad_chunk(v, d));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) · up`, the gated activation of Llama-family MLPs: one parallel CPU kernel
/// forward and one backward (candle's `silu` and its backward are half a dozen single-threaded
/// passes); primitive ops off the CPU or for other dtypes.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if device_kernel_takes(gate, true) && up.dtype() == gate.dtype() && gate.dims() == up.dims() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, DeviceSiluMul);
    }
    if fused_ok(gate) && fused_ok(up) && gate.dims() == up.dims() {
        gate.contiguous()?
            .apply_op2(&up.contiguous()?, FusedSiluMul)
    } else {
        gate.silu()? * up
    }
}

/// [`silu_mul`]'s kernel: inputs `(gate, up)`.
struct FusedSiluMul;

impl CustomOp2 for FusedSiluMul {
    fn name(&self) -> &'static str {
        "kiln-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate = cpu_f32(s1, l1, self.name())?;
        let up = cpu_f32(s2, l2, self.name())?;
        if gate.len() != up.len() {
            candle_core::bail!(
                "silu-mul: {} gate values, {} up values",
                gate.len(),
                up.len()
            )
        }
        let mut out = super::gemm::zeroed(gate.len());
        out.par_chunks_mut(super::mlp::TASK)
            .zip(
                gate.par_chunks(super::mlp::TASK)
                    .zip(up.par_chunks(super::mlp::TASK)),
            )
            .for_each(|(a, (g, u))| super::mlp::swiglu_chunk(a, g, u));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The gradients are written over copies of the gate and up values.
        let mut dgate = with_cpu_f32(gate, self.name(), |g| Ok(g.to_vec()))?;
        let mut dup = with_cpu_f32(up, self.name(), |u| Ok(u.to_vec()))?;
        if dgate.len() != dup.len() {
            candle_core::bail!(
                "silu-mul bwd: {} gate values, {} up values",
                dgate.len(),
                dup.len()
            )
        }
        with_cpu_f32(&grad, self.name(), |d| {
            if d.len() != dgate.len() {
                candle_core::bail!(
                    "silu-mul bwd: {} gradients for {} values",
                    d.len(),
                    dgate.len()
                )
            }
            dgate
                .par_chunks_mut(super::mlp::TASK)
                .zip(dup.par_chunks_mut(super::mlp::TASK))
                .zip(d.par_chunks(super::mlp::TASK))
                .for_each(|((gs, us), ds)| super::mlp::swiglu_grad_chunk(gs, us, ds));
            Ok(())
        })?;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dgate, gate.shape(), dev)?),
            Some(Tensor::from_vec(dup, up.shape(), dev)?),
        ))
    }
}

/// `log softmax(logits)[i, labels[i]]` for each row of `logits` `[n, vocab]`: the
/// log-probability of each label, `[n]` (the negated terms of a cross-entropy). One parallel
/// CPU kernel forward, and one backward, `g · (onehot − softmax)`, that recomputes the softmax
/// from the logits: no vocabulary-sized temporaries beyond the gradient itself (candle's
/// `log_softmax` + `gather` keep several, a real cost with 150k-token vocabularies).
/// Primitive ops off the CPU or for other dtypes.
pub fn label_log_probs(logits: &Tensor, labels: &[u32]) -> candle_core::Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if labels.len() != n {
        candle_core::bail!("label-log-probs: {} labels for {n} rows", labels.len())
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= vocab) {
        candle_core::bail!("label-log-probs: label {bad} outside a vocabulary of {vocab}")
    }
    if fused_ok(logits) {
        logits
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(LabelLogProbs {
                labels: labels.to_vec(),
            })))
    } else {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let index = Tensor::from_vec(labels.to_vec(), (n, 1), logits.device())?;
        logp.gather(&index, 1)?.squeeze(1)
    }
}

/// [`label_log_probs`]'s kernel.
struct LabelLogProbs {
    labels: Vec<u32>,
}

wide_fn! {
    /// Largest value and `ln Σ exp(x − max)` of a row.
    fn row_log_sum_exp(row: &[f32]) -> (f32, f32) {
        row_log_sum_exp_inline(row)
    }
}

wide_fn! {
    /// One row of [`LabelLogProbs`]'s backward: `d = g · (onehot(label) − softmax(row))`.
    fn label_grad_row(d: &mut [f32], row: &[f32], g: f32, label: usize) {
        let (max, lse) = row_log_sum_exp_inline(row);
        let shift = max + lse;
        for (d, &x) in d.iter_mut().zip(row) {
            *d = -g * exp_f32(x - shift);
        }
        if let Some(d) = d.get_mut(label) {
            *d += g;
        }
    }
}

/// [`row_log_sum_exp`]'s body, inlined into the wide copies of its callers.
#[inline(always)]
fn row_log_sum_exp_inline(row: &[f32]) -> (f32, f32) {
    let max = max_f32(row);
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp_f32(x - max)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += exp_f32(c[i] - max);
        }
    }
    (max, (acc.iter().sum::<f32>() + tail).ln())
}

impl CustomOp1 for LabelLogProbs {
    fn name(&self) -> &'static str {
        "kiln-label-log-probs"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, self.name())?;
        let (n, vocab) = layout.shape().dims2()?;
        let out: Vec<f32> = x
            .par_chunks(vocab.max(1))
            .zip(self.labels.par_iter())
            .map(|(row, &label)| {
                let (max, lse) = row_log_sum_exp(row);
                row[label as usize] - max - lse
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, vocab) = logits.dims2()?;
        let grad = grad.contiguous()?;
        let mut dx = super::gemm::zeroed(n * vocab);
        with_cpu_f32(logits, self.name(), |x| {
            with_cpu_f32(&grad, self.name(), |g| {
                dx.par_chunks_mut(vocab.max(1))
                    .zip(x.par_chunks(vocab.max(1)))
                    .zip(g.par_iter().zip(self.labels.par_iter()))
                    .for_each(|((d, row), (&g, &label))| label_grad_row(d, row, g, label as usize));
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, vocab), logits.device())?))
    }
}

/// RMSNorm over the last dimension from primitive differentiable ops (the reference):
/// `x / sqrt(mean(x²) + eps) * weight`, as Llama-family models compute it.
pub fn rms_norm_primitive(xs: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let rstd = (xs.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xs.broadcast_mul(&rstd)?.broadcast_mul(weight)
}

/// RMSNorm over the last dimension: fused CPU kernel when possible, primitive ops otherwise.
///
/// candle's own `rms_norm` has no backward; gradients flow to `xs` and `weight` here in both
/// paths.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if (fused_ok(xs) && fused_ok(weight)) || (device_kernel_ok(xs) && device_kernel_ok(weight)) {
        xs.contiguous()?
            .apply_op2(&weight.contiguous()?, FusedRmsNorm { eps: eps as f32 })
    } else {
        rms_norm_primitive(xs, weight, eps)
    }
}

/// Rotary position embedding, Hugging Face's `rotate_half` convention, from primitive
/// differentiable ops (the reference): `x·cos + rotate_half(x)·sin` with
/// `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// `xs` is `[batch, heads, seq, head_dim]`; `cos` and `sin` are `[seq, head_dim / 2]` (one value
/// per frequency, the layout candle's `rotary_emb::rope` takes).
pub fn rope_primitive(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Rotary position embedding (see [`rope_primitive`]): fused CPU kernel when possible,
/// primitive ops otherwise. candle's `rotary_emb::rope` has no backward; here gradients flow
/// to `xs` (the tables are constants).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if device_kernel_takes(xs, true) && cos.dtype() == xs.dtype() && sin.dtype() == xs.dtype() {
        let op = DeviceRope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            sign: 1.0,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    if fused_ok(xs) && fused_ok(cos) && fused_ok(sin) {
        xs.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            FusedRope {
                inverse: false,
                heads: 1,
            },
        )
    } else {
        rope_primitive(xs, cos, sin)
    }
}

/// [`rope`] on `xs` `[batch, seq, heads · head_dim]`, the heads side by side as a projection
/// gives them (no transposes): the layout kiln's fused attention takes.
pub fn rope_seq_major(
    xs: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (b, t, width) = xs.dims3()?;
    if heads == 0 || width % heads != 0 {
        candle_core::bail!("rope: width {width} is not a multiple of {heads} heads")
    }
    if fused_ok(xs) && fused_ok(cos) && fused_ok(sin) {
        xs.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            FusedRope {
                inverse: false,
                heads,
            },
        )
    } else {
        let split = xs.reshape((b, t, heads, width / heads))?.transpose(1, 2)?;
        rope_primitive(&split, cos, sin)?
            .transpose(1, 2)?
            .reshape((b, t, width))
    }
}

/// RMSNorm of the rows of `x` (`[rows, w.len()]`) scaled by `w`, on the pool.
pub(super) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len().max(1);
    let mut out = super::gemm::zeroed(x.len());
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| rms_norm_chunk(out, x, w, eps));
    out
}

wide_fn! {
    /// [`rms_norm_rows`] for the rows of one task.
    fn rms_norm_chunk(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let dim = w.len().max(1);
        for (xr, yr) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let rstd = row_rstd(xr, eps);
            for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                *y = x * rstd * w;
            }
        }
    }
}

wide_fn! {
    /// [`rms_norm_rows_backward`] for the rows of one task: the input's gradient added into
    /// `dx`, the scale's into `dw`.
    fn rms_norm_grad_chunk(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32, dw: &mut [f32]) {
        let dim = w.len().max(1);
        let full = dim / LANES * LANES;
        let rows = x.chunks_exact(dim).zip(g.chunks_exact(dim));
        for ((xr, gr), dxr) in rows.zip(dx.chunks_exact_mut(dim)) {
            let rstd = row_rstd(xr, eps);
            // dx = rstd * (gw - xhat * mean(gw * xhat)), gw = g * w, xhat = x * rstd.
            let mut sum_gw_xhat = [0f32; LANES];
            let blocks = xr[..full]
                .chunks_exact(LANES)
                .zip(gr[..full].chunks_exact(LANES))
                .zip(w[..full].chunks_exact(LANES).zip(dw[..full].chunks_exact_mut(LANES)));
            for ((xc, gc), (wc, dwc)) in blocks {
                for l in 0..LANES {
                    let xhat = xc[l] * rstd;
                    sum_gw_xhat[l] += gc[l] * wc[l] * xhat;
                    dwc[l] += gc[l] * xhat;
                }
            }
            let mut tail = 0f32;
            for i in full..dim {
                let xhat = xr[i] * rstd;
                tail += gr[i] * w[i] * xhat;
                dw[i] += gr[i] * xhat;
            }
            let mean_gw_xhat = (sum_gw_xhat.iter().sum::<f32>() + tail) / dim as f32;
            for (((d, &x), &g), &w) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                let xhat = x * rstd;
                *d += rstd * (g * w - xhat * mean_gw_xhat);
            }
        }
    }
}

/// [`rms_norm_rows`]'s backward for the output's gradient `g`: adds the input's gradient into
/// `dx` and returns the scale's.
pub(super) fn rms_norm_rows_backward(
    x: &[f32],
    w: &[f32],
    eps: f32,
    g: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    let dim = w.len().max(1);
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(g.par_chunks(chunk))
        .map(|((dx, x), g)| {
            let mut dw = vec![0f32; dim];
            rms_norm_grad_chunk(dx, x, g, w, eps, &mut dw);
            dw
        })
        .reduce(|| vec![0f32; dim], add_columns)
}

/// Fused RMSNorm over the last dimension; inputs `(x, weight)`.
struct FusedRmsNorm {
    eps: f32,
}

/// 1/sqrt(mean(x²) + eps) of one row, accumulated in f64.
#[inline(always)]
fn row_rstd(xr: &[f32], eps: f32) -> f32 {
    let ms = sum_f64_lanes(xr, |v| v * v) / xr.len() as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "kiln-rms-norm"
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
        let dim = l1.dims().last().copied().unwrap_or(1);
        if w.len() != dim {
            candle_core::bail!("rms-norm: weight length {} != hidden {dim}", w.len())
        }
        let out = rms_norm_rows(x, w, self.eps);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::norm_forward((s1, l1), (s2, l2), None, self.eps)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, _) = device_norm_backward(x, w, None, grad, self.eps)?;
            return Ok((Some(dx), dw));
        }
        let grad = grad.contiguous()?;
        let dim = x.dim(D::Minus1)?;
        let mut dx = super::gemm::zeroed(x.elem_count());
        let dw = with_cpu_f32(x, self.name(), |x| {
            with_cpu_f32(w, self.name(), |w| {
                with_cpu_f32(&grad, self.name(), |g| {
                    Ok(rms_norm_rows_backward(x, w, self.eps, g, &mut dx))
                })
            })
        })?;
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        let dw = w
            .track_op()
            .then(|| Tensor::from_vec(dw, dim, dev))
            .transpose()?;
        Ok((Some(dx), dw))
    }
}

/// Fused rotary embedding; inputs `(x, cos [t, d/2], sin [t, d/2])` with `x` `[.., t, d]`
/// when `heads` is 1 and `[b, t, heads · d]` otherwise. Its backward is the inverse rotation
/// (`sin` negated), the same kernel.
struct FusedRope {
    inverse: bool,
    heads: usize,
}

impl CustomOp3 for FusedRope {
    fn name(&self) -> &'static str {
        "kiln-rope"
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
        let cos = cpu_f32(s2, l2, self.name())?;
        let sin = cpu_f32(s3, l3, self.name())?;
        let dims = l1.dims();
        let heads = self.heads.max(1);
        let (t, d) = match dims {
            [_, t, w] if heads > 1 && w % heads == 0 => (*t, w / heads),
            [.., t, d] if heads == 1 => (*t, *d),
            _ => candle_core::bail!("rope: input {dims:?} does not hold {heads} heads"),
        };
        let half = d / 2;
        if d % 2 != 0 || cos.len() != t * half || sin.len() != t * half {
            candle_core::bail!(
                "rope: head_dim {d} must be even and tables [{t}, {half}], got {} values",
                cos.len()
            )
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = super::gemm::zeroed(x.len());
        let row = heads * d;
        for (xs, ys) in x.chunks_exact(t * row).zip(out.chunks_exact_mut(t * row)) {
            for p in 0..t {
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                let (xp, yp) = (&xs[p * row..(p + 1) * row], &mut ys[p * row..(p + 1) * row]);
                for (xr, yr) in xp.chunks_exact(d).zip(yp.chunks_exact_mut(d)) {
                    for i in 0..half {
                        let (x1, x2, s) = (xr[i], xr[i + half], sign * s[i]);
                        yr[i] = x1 * c[i] - x2 * s;
                        yr[i + half] = x2 * c[i] + x1 * s;
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A rotation's transpose is the rotation by the opposite angle.
        let dx = grad.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &FusedRope {
                inverse: !self.inverse,
                heads: self.heads,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mask_rows_place_broadcast_masks_and_refuse_others() {
        use super::mask_rows;
        // BERT: scores [b, heads, q, s], a padding mask [b, 1, 1, s].
        assert_eq!(
            mask_rows(&[4, 12, 9, 9], &[4, 1, 1, 9]),
            Some([108, 9, 1, 0])
        );
        // A decoder: scores [b, kv, rep, t, s], causal and padding [b, 1, 1, t, s]; causal
        // alone [1, 1, 1, t, s].
        assert_eq!(
            mask_rows(&[2, 2, 3, 5, 5], &[2, 1, 1, 5, 5]),
            Some([30, 5, 5, 1])
        );
        assert_eq!(
            mask_rows(&[2, 2, 3, 5, 5], &[1, 1, 1, 5, 5]),
            Some([30, 5, 0, 1])
        );
        // One batch, one query.
        assert_eq!(mask_rows(&[1, 3, 1, 4], &[1, 1, 1, 4]), Some([3, 1, 0, 0]));
        // Not broadcastable this way: another key count, a head dimension, a rank, a batch.
        assert_eq!(mask_rows(&[4, 12, 9, 9], &[4, 1, 1, 8]), None);
        assert_eq!(mask_rows(&[4, 12, 9, 9], &[4, 12, 1, 9]), None);
        assert_eq!(mask_rows(&[4, 12, 9, 9], &[4, 1, 9]), None);
        assert_eq!(mask_rows(&[4, 12, 9, 9], &[2, 1, 1, 9]), None);
        assert_eq!(mask_rows(&[9, 9], &[1, 9]), None);
    }

    use super::*;
    use crate::nn::autograd::Backprop;
    use candle_core::{Device, Var};

    #[test]
    fn embedding_rows_match_index_select_and_deposit_the_table_gradient() {
        let dev = Device::Cpu;
        let (num, dim) = (7usize, 5usize);
        let init: Vec<f32> = (0..num * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let table = Var::from_vec(init, (num, dim), &dev).unwrap();
        // Repeated ids: their rows' gradients add up.
        let ids = Tensor::new(&[[3u32, 1, 3], [6, 0, 3]], &dev).unwrap();
        let up: Vec<f32> = (0..6 * dim).map(|i| (i as f32 * 0.71).cos()).collect();
        let up = Tensor::from_vec(up, (6, dim), &dev).unwrap();
        let fused = embedding_rows(table.as_tensor(), &ids).unwrap().unwrap();
        let reference = table
            .as_tensor()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap();
        assert_eq!(max_abs_diff(&fused, &reference), 0.0);
        let g1 = (&fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        let g2 = (&reference * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        let (a, b) = (
            g1.get(table.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            g2.get(table.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        );
        for (ra, rb) in a.iter().zip(&b) {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        }
        // Rows never looked up get zero, not a missing gradient.
        assert!(a[2].iter().all(|&v| v == 0.0));
        // A frozen table takes candle's op; an id past the table is an error.
        assert!(
            embedding_rows(&table.as_tensor().detach(), &ids)
                .unwrap()
                .is_none()
        );
        let bad = Tensor::new(&[7u32], &dev).unwrap();
        let err = embedding_rows(table.as_tensor(), &bad).unwrap_err();
        assert!(err.to_string().contains("id 7"), "{err}");
    }

    #[test]
    fn fused_attention_matches_masked_softmax_attention() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            let (b, s, heads, dh) = (3, 7, 4, 8);
            let h = heads * dh;
            let t = |seed| Tensor::from_vec(values(b * s * h, seed, 2.0), (b, s, h), &dev).unwrap();
            let (q, k, v) = (t(1), t(2), t(3));
            // Row 0 full, row 1 with three pads, row 2 with one real token.
            let lens = [7usize, 4, 1];
            let mask: Vec<f32> = lens
                .iter()
                .flat_map(|&n| (0..s).map(move |j| if j < n { 1.0 } else { 0.0 }))
                .collect();
            let scale = 1.0 / (dh as f64).sqrt();
            let split = |x: &Tensor| {
                x.reshape((b, x.dim(1).unwrap(), heads, dh))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let bias = ((1.0 - Tensor::from_vec(mask.clone(), (b, 1, 1, s), &dev).unwrap())
                .unwrap()
                * f32::MIN as f64)
                .unwrap();
            for sq in [s, 1] {
                let qs = q.narrow(1, 0, sq).unwrap();
                let scores = (split(&qs).matmul(&split(&k).t().unwrap()).unwrap() * scale).unwrap();
                let probs = softmax_last_dim(&scores.broadcast_add(&bias).unwrap()).unwrap();
                let want = probs
                    .matmul(&split(&v))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((b, sq, h))
                    .unwrap();
                let got = attention_inference(&qs, &k, &v, &mask, heads, scale as f32)
                    .unwrap()
                    .expect("the fused kernel runs on CPU f32");
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-5, "queries {sq}: differs by {diff}");
            }
            // A tracked input (training) is left to the differentiable path.
            let var = Var::from_tensor(&q).unwrap();
            assert!(
                attention_inference(var.as_tensor(), &k, &v, &mask, heads, scale as f32)
                    .unwrap()
                    .is_none()
            );
        });
    }

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
    fn exp_approximation_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let want = x.exp();
            let rel = ((exp_f32(x) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
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
    fn fused_silu_mul_matches_primitive_in_values_and_gradients() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            let gate = Var::from_vec(values(6 * 50, 5, 6.0), (2, 3, 50), &dev).unwrap();
            let up = Var::from_vec(values(6 * 50, 6, 2.0), (2, 3, 50), &dev).unwrap();
            let w = Tensor::from_vec(values(6 * 50, 7, 1.0), (2, 3, 50), &dev).unwrap();
            let fused = silu_mul(&gate, &up).unwrap();
            let want = (gate.silu().unwrap() * up.as_tensor()).unwrap();
            assert!(max_abs_diff(&fused, &want) < 1e-5);
            let gf = (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let gw = (&want * &w).unwrap().sum_all().unwrap().backprop().unwrap();
            for var in [&gate, &up] {
                let diff = max_abs_diff(gf.get(var).unwrap(), gw.get(var).unwrap());
                assert!(diff < 1e-5, "gradient differs by {diff}");
            }
        });
    }

    #[test]
    fn fused_label_log_probs_match_log_softmax_and_gather() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            let (n, vocab) = (7, 300);
            let logits = Var::from_vec(values(n * vocab, 9, 8.0), (n, vocab), &dev).unwrap();
            let labels: Vec<u32> = (0..n as u32).map(|i| (i * 41) % vocab as u32).collect();
            let w = Tensor::from_vec(values(n, 10, 1.0), n, &dev).unwrap();
            let fused = label_log_probs(&logits, &labels).unwrap();
            let index = Tensor::from_vec(labels.clone(), (n, 1), &dev).unwrap();
            let want = candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .gather(&index, 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            assert!(max_abs_diff(&fused, &want) < 1e-5);
            let gf = (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let gw = (&want * &w).unwrap().sum_all().unwrap().backprop().unwrap();
            let diff = max_abs_diff(gf.get(&logits).unwrap(), gw.get(&logits).unwrap());
            assert!(diff < 1e-6, "gradient differs by {diff}");
            // The primitive path (f64) agrees, and a label outside the vocabulary is an error.
            let l64 = logits.as_tensor().to_dtype(DType::F64).unwrap();
            let p64 = label_log_probs(&l64, &labels)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert!(max_abs_diff(&p64, &fused) < 1e-5);
            assert!(label_log_probs(&logits, &[0, 1, 2, 3, 4, 5, 300]).is_err());
            assert!(label_log_probs(&logits, &[0]).is_err());
        });
    }

    #[test]
    fn fused_linear_matches_matmul_and_bias_in_values_and_gradients() {
        let dev = Device::Cpu;
        let (m, k, n) = (13, 24, 10);
        let x = Var::from_vec(values(m * k, 1, 2.0), (m, k), &dev).unwrap();
        let w = Var::from_vec(values(n * k, 2, 1.0), (n, k), &dev).unwrap();
        let b = Var::from_vec(values(n, 3, 1.0), n, &dev).unwrap();
        let loss_w = Tensor::from_vec(values(m * n, 4, 1.0), (m, n), &dev).unwrap();
        let primitive = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        for bias in [true, false] {
            let fused = linear(&x, &w, bias.then_some(b.as_tensor()))
                .unwrap()
                .unwrap();
            let want = if bias {
                primitive.clone()
            } else {
                x.matmul(&w.t().unwrap()).unwrap()
            };
            assert!(max_abs_diff(&fused, &want) < 1e-5);
            let g_fused = (&fused * &loss_w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let g_want = (&want * &loss_w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            for var in [&x, &w] {
                let (a, b) = (g_fused.get(var).unwrap(), g_want.get(var).unwrap());
                assert!(
                    max_abs_diff(a, b) < 1e-4,
                    "gradient differs by {}",
                    max_abs_diff(a, b)
                );
            }
            if bias {
                let diff = max_abs_diff(g_fused.get(&b).unwrap(), g_want.get(&b).unwrap());
                assert!(diff < 1e-4, "bias gradient differs by {diff}");
            }
        }
        // A frozen weight (a plain tensor) gets no gradient computed; the input still does.
        let frozen = w.as_tensor().detach();
        let y = linear(&x, &frozen, None).unwrap().unwrap();
        let grads = y.sum_all().unwrap().backprop().unwrap();
        assert!(grads.get(&frozen).is_none());
        assert!(grads.get(&x).is_some());
        // Off the fused path (f64 here), the caller's primitive path runs.
        let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
        assert!(linear(&x64, &x64, None).unwrap().is_none());
    }

    #[test]
    fn fused_layer_norm_matches_primitive_in_values_and_gradients() {
        crate::nn::simd::test_cap::at_each_level(|_| {
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
                let grads = (&y * &up).unwrap().sum_all().unwrap().backprop().unwrap();
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
        });
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
            .backprop()
            .unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    }

    #[test]
    fn fused_gelu_matches_primitive_in_values_and_gradients() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            let x = Var::from_vec(values(4000, 7, 6.0), (40, 100), &dev).unwrap();
            let up = Tensor::from_vec(values(4000, 8, 1.0), (40, 100), &dev).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    gelu_erf(&x).unwrap()
                } else {
                    gelu_erf_primitive(&x).unwrap()
                };
                let grads = (&y * &up).unwrap().sum_all().unwrap().backprop().unwrap();
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
        });
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
            .backprop()
            .unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        // Analytic: dx = p * (up - sum(p * up)).
        let p = ours.detach();
        let s = (&p * &up).unwrap().sum_keepdim(1).unwrap();
        let expected = (&p * up.broadcast_sub(&s).unwrap()).unwrap();
        assert!(max_abs_diff(g, &expected) < 1e-6);
    }

    #[test]
    fn fused_rms_norm_matches_primitive_in_values_and_gradients() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            let (rows, dim) = (6, 48);
            let x = Var::from_vec(values(rows * dim, 11, 3.0), (2, 3, dim), &dev).unwrap();
            let w = Var::from_vec(values(dim, 12, 1.5), dim, &dev).unwrap();
            let up = Tensor::from_vec(values(rows * dim, 13, 1.0), (2, 3, dim), &dev).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    rms_norm(&x, &w, 1e-6).unwrap()
                } else {
                    rms_norm_primitive(&x, &w, 1e-6).unwrap()
                };
                let grads = (&y * &up).unwrap().sum_all().unwrap().backprop().unwrap();
                let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                (y, g(&x), g(&w))
            };
            let (y1, dx1, dw1) = run(true);
            let (y0, dx0, dw0) = run(false);
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
            // candle's own fused kernel (no backward) agrees on values.
            let theirs = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
            assert!(max_abs_diff(&y1, &theirs) < 1e-5);
        });
    }

    #[test]
    fn fused_rms_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let dim = 8;
        let xv = values(2 * dim, 14, 2.0);
        let w = Tensor::from_vec(values(dim, 15, 1.5), dim, &dev).unwrap();
        let up = Tensor::from_vec(values(2 * dim, 16, 1.0), (2, dim), &dev).unwrap();
        let loss = |xv: &[f32]| -> f32 {
            let x = Tensor::from_vec(xv.to_vec(), (2, dim), &dev).unwrap();
            (rms_norm(&x, &w, 1e-6).unwrap() * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let x = Var::from_vec(xv.clone(), (2, dim), &dev).unwrap();
        let grads = (rms_norm(&x, &w, 1e-6).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        let analytic = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic = analytic.to_vec1::<f32>().unwrap();
        let h = 1e-2;
        for i in 0..xv.len() {
            let (mut plus, mut minus) = (xv.clone(), xv.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 2e-2,
                "x[{i}]: numeric {numeric}, analytic {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn fused_rope_matches_primitive_and_candle_and_has_gradient() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 8);
        let n = b * h * t * d;
        let x = Var::from_vec(values(n, 17, 2.0), (b, h, t, d), &dev).unwrap();
        let cos = Tensor::from_vec(values(t * d / 2, 18, 1.0), (t, d / 2), &dev).unwrap();
        let sin = Tensor::from_vec(values(t * d / 2, 19, 1.0), (t, d / 2), &dev).unwrap();
        let up = Tensor::from_vec(values(n, 20, 1.0), (b, h, t, d), &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                rope(&x, &cos, &sin).unwrap()
            } else {
                rope_primitive(&x, &cos, &sin).unwrap()
            };
            let grads = (&y * &up).unwrap().sum_all().unwrap().backprop().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, dx1) = run(true);
        let (y0, dx0) = run(false);
        assert!(max_abs_diff(&y1, &y0) < 1e-6);
        assert!(max_abs_diff(&dx1, &dx0) < 1e-6);
        // The same convention as candle's (non-interleaved) fused rope and HF's rotate_half.
        let theirs = candle_nn::rotary_emb::rope(x.as_tensor(), &cos, &sin).unwrap();
        assert!(max_abs_diff(&y1, &theirs) < 1e-6);

        // The same rotation with the heads side by side in the last dimension, [b, t, h·d].
        let xs = Var::from_tensor(
            &x.as_tensor()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap(),
        )
        .unwrap();
        let ups = up
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap();
        let to_seq_major = |y: &Tensor| {
            y.transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap()
        };
        let ys = rope_seq_major(&xs, &cos, &sin, h).unwrap();
        assert!(max_abs_diff(&ys, &to_seq_major(&y0)) < 1e-6);
        let grads = (&ys * &ups).unwrap().sum_all().unwrap().backprop().unwrap();
        assert!(max_abs_diff(grads.get(xs.as_tensor()).unwrap(), &to_seq_major(&dx0)) < 1e-6);
        // Off the fused path (f64), the primitive path gives the same rotation.
        let ys64 = rope_seq_major(
            &xs.as_tensor().to_dtype(DType::F64).unwrap(),
            &cos.to_dtype(DType::F64).unwrap(),
            &sin.to_dtype(DType::F64).unwrap(),
            h,
        )
        .unwrap();
        assert!(max_abs_diff(&ys64.to_dtype(DType::F32).unwrap(), &ys) < 1e-6);
    }
}
