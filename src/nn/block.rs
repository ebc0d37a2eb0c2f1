//! A transformer's residual half-layers as single CPU ops: `r + f(n)` where `f` is a block
//! kernel (the attention block of [`super::attention::residual_attention`], the feed-forward
//! blocks of [`super::mlp::residual_mlp_block`] and [`super::mlp::residual_swiglu`]), or, for
//! pre-norm models, `x + f(norm(x))` with the RMSNorm (decoders) or LayerNorm (ViT) inside the
//! op too.
//!
//! Why: candle's backward gives every op input a fresh zero tensor and adds its gradient into
//! it, on the thread driving the step while the pool waits. A pre-norm decoder layer as
//! RMSNorm, block, RMSNorm, block has six activation-sized inputs to do that for; as two
//! normed blocks it has two. The blocks' weights are not op inputs at all: the kernels read
//! them in place ([`Weights`]) and their gradients go beside candle's graph
//! ([`super::autograd`]).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{
    Mat, Threads, linear_input_gradient, linear_rows, linear_weight_gradient, sgemm, zeroed,
};
use super::layers::{LayerNorm, Linear};
use super::mlp::{Dropout, TASK};
use super::ops::{
    cpu_f32, layer_norm_rows, layer_norm_rows_backward, rms_norm_rows, rms_norm_rows_backward,
    with_cpu_f32,
};

/// A block's input gradient and its weights' gradients (one per weight, in the weights'
/// order), each where asked for.
pub(super) type Gradients = (Option<Vec<f32>>, Option<Vec<Vec<f32>>>);

/// A residual block's computation on contiguous f32 rows.
pub(super) trait BlockKernel: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Row widths of the block's input `n` and of its output (the residual's).
    fn widths(&self) -> (usize, usize);

    /// `r + f(n, p)`, `p` being the block's weights in place, in the order the kernel was
    /// built for. A kernel built to keep what its backward needs keeps it here.
    fn forward(&self, n: &[f32], r: &[f32], p: &[&[f32]]) -> candle_core::Result<Vec<f32>>;

    /// The gradients of `n` (when `want_n`) and of each weight in `p` (when `want_p`) for the
    /// output's gradient `g` (the residual's is `g` itself).
    fn backward(
        &self,
        n: &[f32],
        p: &[&[f32]],
        g: &[f32],
        want_n: bool,
        want_p: bool,
    ) -> candle_core::Result<Gradients>;
}

/// What a fused op's forward keeps for its backward: taken once, by the backward (which
/// recomputes it when the forward kept nothing).
pub(super) struct Kept<T>(Mutex<Option<T>>);

impl<T> Kept<T> {
    pub(super) fn new() -> Self {
        Kept(Mutex::new(None))
    }

    /// Keeps `value` when `keep` (a gradient will be asked for).
    pub(super) fn keep(&self, keep: bool, value: T) {
        if keep && let Ok(mut slot) = self.0.lock() {
            *slot = Some(value);
        }
    }

    pub(super) fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// What a fused block takes: its input and residual, or one input normed inside the op.
#[derive(Clone, Debug)]
pub enum BlockInput {
    /// `r + f(n)`.
    Residual { n: Tensor, r: Tensor },
    /// `x + f(rms_norm(x) · weight)`: a pre-norm decoder's half layer, its RMSNorm included.
    RmsNormed { x: Tensor, weight: Tensor, eps: f64 },
    /// `x + f(layer_norm(x) · weight + bias)`: a pre-norm encoder's (ViT's) half layer, its
    /// LayerNorm included.
    LayerNormed {
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
}

impl BlockInput {
    /// The tensor the block's rows come from (`n`, or `x` before its norm).
    pub fn input(&self) -> &Tensor {
        match self {
            BlockInput::Residual { n, .. } => n,
            BlockInput::RmsNormed { x, .. } | BlockInput::LayerNormed { x, .. } => x,
        }
    }

    /// Whether every tensor is f32 on the CPU (the kernels' only case).
    pub(super) fn native(&self) -> bool {
        let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        match self {
            BlockInput::Residual { n, r } => ok(n) && ok(r),
            BlockInput::RmsNormed { x, weight, .. } => ok(x) && ok(weight),
            BlockInput::LayerNormed {
                x, weight, bias, ..
            } => ok(x) && ok(weight) && ok(bias),
        }
    }

    /// The same input with its activations reshaped to `[rows, width]` (and the residual to
    /// `[rows, out]`).
    pub(super) fn rows(&self, width: usize, out: usize) -> candle_core::Result<BlockInput> {
        let rows = self.input().elem_count() / width.max(1);
        Ok(match self {
            BlockInput::Residual { n, r } => BlockInput::Residual {
                n: n.reshape((rows, width))?,
                r: r.reshape((rows, out))?,
            },
            BlockInput::RmsNormed { x, weight, eps } => BlockInput::RmsNormed {
                x: x.reshape((rows, width))?,
                weight: weight.clone(),
                eps: *eps,
            },
            BlockInput::LayerNormed {
                x,
                weight,
                bias,
                eps,
            } => BlockInput::LayerNormed {
                x: x.reshape((rows, width))?,
                weight: weight.clone(),
                bias: bias.clone(),
                eps: *eps,
            },
        })
    }

    /// Checks the shapes against a block taking `width` and giving `out` values a row.
    pub(super) fn check(&self, width: usize, out: usize) -> candle_core::Result<()> {
        let dims = self.input().dims();
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out;
        }
        let ok = dims.last() == Some(&width)
            && match self {
                BlockInput::Residual { r, .. } => r.dims() == out_dims,
                BlockInput::RmsNormed { weight, .. } => width == out && weight.dims() == [width],
                BlockInput::LayerNormed { weight, bias, .. } => {
                    width == out && weight.dims() == [width] && bias.dims() == [width]
                }
            };
        if !ok {
            candle_core::bail!("residual block: {self:?} does not fit widths {width} -> {out}")
        }
        Ok(())
    }

    /// Whether a gradient is wanted of the input or of the weights (the kernel keeps its
    /// intermediates for the backward then).
    pub(super) fn tracked(&self, weights: &Weights) -> bool {
        weights.trainable()
            || match self {
                BlockInput::Residual { n, .. } => n.track_op(),
                BlockInput::RmsNormed { x, weight, .. } => x.track_op() || weight.track_op(),
                BlockInput::LayerNormed {
                    x, weight, bias, ..
                } => x.track_op() || weight.track_op() || bias.track_op(),
            }
    }

    /// Runs `kernel` as one op on this input and `weights`.
    pub(super) fn apply<K: BlockKernel>(
        &self,
        kernel: K,
        weights: Weights,
    ) -> candle_core::Result<Tensor> {
        let anchor = weights.anchor()?;
        match self {
            BlockInput::Residual { n, r } => n.contiguous()?.apply_op3_arc(
                &r.contiguous()?,
                &anchor,
                Arc::new(Box::new(Residual { kernel, weights })),
            ),
            BlockInput::RmsNormed { x, weight, eps } => {
                PreNormed::apply(kernel, weights, Norm::Rms, x, weight, *eps, anchor)
            }
            BlockInput::LayerNormed {
                x,
                weight,
                bias,
                eps,
            } => {
                // The scale and shift travel as one small tensor (2 · width values).
                let params = Tensor::cat(&[weight, bias], 0)?;
                PreNormed::apply(kernel, weights, Norm::Layer, x, &params, *eps, anchor)
            }
        }
    }
}

/// A fused block's weights, read in place by its op rather than passed as a candle input (a
/// custom op takes three tensors; see [`super::autograd`] for what concatenating them cost).
/// The kernels see each as a slice of its own storage (no copy), in the order given; the
/// gradients of those that are variables go to [`super::autograd::deposit`].
pub(super) struct Weights {
    tensors: Vec<Tensor>,
    trainable: bool,
}

impl Weights {
    /// `None` where a tensor is not contiguous f32 on the CPU, or is tracked without being a
    /// variable (a gradient deposited for it would not flow on to the variables it comes
    /// from): the caller's separate ops then run.
    pub(super) fn new(tensors: Vec<Tensor>) -> Option<Self> {
        let fits = |t: &Tensor| {
            t.device().is_cpu()
                && t.dtype() == DType::F32
                && t.is_contiguous()
                && (t.is_variable() || !t.track_op())
        };
        if !tensors.iter().all(fits) {
            return None;
        }
        let trainable = tensors.iter().any(|t| t.is_variable());
        Some(Weights { tensors, trainable })
    }

    /// Whether any weight is a variable (the kernel then computes the weights' gradients).
    pub(super) fn trainable(&self) -> bool {
        self.trainable
    }

    /// Which weights are variables, in the weights' order: a kernel holding frozen weights
    /// beside trainable ones (a LoRA adapter's base layer) need not compute the frozen ones'
    /// gradients, which [`Weights::deposit`] would drop.
    pub(super) fn variables(&self) -> Vec<bool> {
        self.tensors.iter().map(Tensor::is_variable).collect()
    }

    /// The op's third input (see [`super::autograd::anchor`]).
    fn anchor(&self) -> candle_core::Result<Tensor> {
        super::autograd::anchor(self.trainable)
    }

    /// Runs `f` on the weights' values, read in place (their storages stay read-locked
    /// meanwhile, as candle does for an op's inputs).
    fn with_slices<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let held: Vec<_> = self
            .tensors
            .iter()
            .map(|t| t.storage_and_layout())
            .collect();
        let mut slices = Vec::with_capacity(held.len());
        for (storage, layout) in &held {
            match &**storage {
                candle_core::Storage::Cpu(cpu) => slices.push(cpu_f32(cpu, layout, op)?),
                _ => candle_core::bail!("{op}: fused kernel only runs on the CPU"),
            }
        }
        f(&slices)
    }

    /// Deposits the gradient of each weight that is a variable (`dp` in the weights' order).
    fn deposit(&self, dp: Vec<Vec<f32>>) -> candle_core::Result<()> {
        if dp.len() != self.tensors.len() {
            candle_core::bail!(
                "block weights: {} gradients for {} weights",
                dp.len(),
                self.tensors.len()
            )
        }
        for (t, g) in self.tensors.iter().zip(dp) {
            if !t.is_variable() {
                continue;
            }
            if g.len() != t.elem_count() {
                candle_core::bail!("block weights: gradient of {} for {:?}", g.len(), t.shape())
            }
            super::autograd::deposit(t, Tensor::from_vec(g, t.shape(), t.device())?);
        }
        Ok(())
    }
}

/// A linear layer's LoRA adapter inside a fused block: `y += scale · (dropout(x) · Aᵀ) · Bᵀ`
/// for the layer's input `x` `[rows, in]` and output `y` `[rows, out]`, with `A` `[rank, in]`
/// the block's weight `at` and `B` `[out, rank]` the next one.
pub(super) struct Adapter {
    at: usize,
    rank: usize,
    /// The layer's `(out, in)`.
    shape: (usize, usize),
    scale: f32,
    /// The dropout on the adapter's input (training only).
    dropout: Option<Dropout>,
}

impl Adapter {
    /// The adapter of `layer` (`shape` being its `(out, in)`), its `A` and `B` appended to the
    /// block's weights `flat`; `None` for a layer without one. `train` draws its dropout.
    pub(super) fn of(
        layer: &Linear,
        shape: (usize, usize),
        flat: &mut Vec<Tensor>,
        train: bool,
    ) -> candle_core::Result<Option<Adapter>> {
        let Some(lora) = &layer.lora else {
            return Ok(None);
        };
        let (out, inp) = shape;
        let rank = lora.a.dim(0)?;
        if lora.a.dims() != [rank, inp] || lora.b.dims() != [out, rank] {
            candle_core::bail!(
                "{}: adapter A {:?}, B {:?} on [{out}, {inp}]",
                layer.name,
                lora.a.dims(),
                lora.b.dims()
            )
        }
        let at = flat.len();
        flat.extend([lora.a.clone(), lora.b.clone()]);
        Ok(Some(Adapter {
            at,
            rank,
            shape,
            scale: lora.scale as f32,
            dropout: if train {
                Dropout::new(lora.dropout as f32)
            } else {
                None
            },
        }))
    }

    /// Whether `layer`'s adapter, where it has one, is f32 on the CPU, as the kernels need
    /// (checked before [`Adapter::of`] draws a dropout seed for it).
    pub(super) fn native(layer: &Linear) -> bool {
        let native = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        layer
            .lora
            .as_ref()
            .is_none_or(|a| native(&a.a) && native(&a.b))
    }

    /// Whether the block's weights `p` hold this adapter's `A` and `B`.
    pub(super) fn fits(&self, p: &[&[f32]]) -> bool {
        let (out, inp) = self.shape;
        self.at + 1 < p.len()
            && p[self.at].len() == self.rank * inp
            && p[self.at + 1].len() == out * self.rank
    }

    /// The adapter's input: `x` itself, or a copy with the dropout mask applied.
    fn input<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.dropout {
            None => std::borrow::Cow::Borrowed(x),
            Some(d) => {
                let mut dropped = x.to_vec();
                d.apply_parallel(&mut dropped);
                std::borrow::Cow::Owned(dropped)
            }
        }
    }

    /// The first product, `u = scale · dropout(x) · Aᵀ` `[rows, rank]`, which the backward
    /// takes again.
    pub(super) fn down(&self, p: &[&[f32]], x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let inp = self.shape.1;
        let rows = x.len() / inp.max(1);
        let mut u = zeroed(rows * self.rank);
        sgemm(
            (rows, self.rank, inp),
            &mut u,
            self.rank,
            Mat::rows(&self.input(x), inp),
            Mat::transposed(p[self.at], inp),
            self.scale,
            false,
            Threads::All,
        )?;
        Ok(u)
    }

    /// Adds the adapter's output `u · Bᵀ` into the layer's output `y`.
    pub(super) fn up(&self, p: &[&[f32]], u: &[f32], y: &mut [f32]) -> candle_core::Result<()> {
        linear_rows(y, u, p[self.at + 1], (self.shape.0, self.rank), true)
    }

    /// The backward, from the layer output's gradient `d` `[rows, out]`, its input `x` and
    /// [`Adapter::down`]'s `u`: `A`'s and `B`'s gradients into `dp` (where given and their
    /// slots are not empty, see [`zeroed_where`]), and the adapter's share of the input's
    /// gradient added into `dx` (where given).
    pub(super) fn backward(
        &self,
        (p, dp): (&[&[f32]], Option<&mut [Vec<f32>]>),
        (d, x, u): (&[f32], &[f32], &[f32]),
        dx: Option<&mut [f32]>,
    ) -> candle_core::Result<()> {
        let ((out, inp), rank) = (self.shape, self.rank);
        let rows = d.len() / out.max(1);
        let (a, b) = (p[self.at], p[self.at + 1]);
        // du = scale · d · B, the gradient of dropout(x) · Aᵀ.
        let mut du = zeroed(rows * rank);
        let (d_rows, b_rows) = (Mat::rows(d, out), Mat::rows(b, rank));
        sgemm(
            (rows, rank, out),
            &mut du,
            rank,
            d_rows,
            b_rows,
            self.scale,
            false,
            Threads::All,
        )?;
        if let Some(dp) = dp {
            if !dp[self.at + 1].is_empty() {
                linear_weight_gradient(&mut dp[self.at + 1], d, u, (out, rank))?;
            }
            if !dp[self.at].is_empty() {
                linear_weight_gradient(&mut dp[self.at], &du, &self.input(x), (rank, inp))?;
            }
        }
        let Some(dx) = dx else { return Ok(()) };
        match &self.dropout {
            None => linear_input_gradient(dx, &du, a, (rank, inp), true),
            Some(dropout) => {
                let mut share = zeroed(rows * inp);
                linear_input_gradient(&mut share, &du, a, (rank, inp), false)?;
                dropout.apply_parallel(&mut share);
                dx.par_chunks_mut(TASK)
                    .zip(share.par_chunks(TASK))
                    .for_each(|(dx, s)| dx.iter_mut().zip(s).for_each(|(x, s)| *x += s));
                Ok(())
            }
        }
    }
}

/// Zeroed gradients shaped like the weights `p` where `wanted`, and empty ones (no gradient
/// computed) elsewhere.
pub(super) fn zeroed_where(p: &[&[f32]], wanted: &[bool]) -> Vec<Vec<f32>> {
    p.iter()
        .zip(wanted)
        .map(|(w, &want)| if want { zeroed(w.len()) } else { Vec::new() })
        .collect()
}

/// `r + f(n)`: inputs `(n, r, anchor)`.
struct Residual<K> {
    kernel: K,
    weights: Weights,
}

impl<K: BlockKernel> CustomOp3 for Residual<K> {
    fn name(&self) -> &'static str {
        self.kernel.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = cpu_f32(s1, l1, self.name())?;
        let r = cpu_f32(s2, l2, self.name())?;
        let (width, out) = self.kernel.widths();
        if n.len() / width.max(1) * out != r.len() {
            candle_core::bail!("{}: input {:?}, residual {:?}", self.name(), l1, l2)
        }
        let y = self
            .weights
            .with_slices(self.name(), |p| self.kernel.forward(n, r, p))?;
        Ok((CpuStorage::F32(y), l2.shape().clone()))
    }

    fn bwd(
        &self,
        n: &Tensor,
        r: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let name = self.name();
        let (want_n, want_p) = (n.track_op(), self.weights.trainable);
        let (dn, dp) = with_cpu_f32(n, name, |ns| {
            with_cpu_f32(&grad, name, |g| {
                self.weights
                    .with_slices(name, |p| self.kernel.backward(ns, p, g, want_n, want_p))
            })
        })?;
        if let Some(dp) = dp.filter(|_| want_p) {
            self.weights.deposit(dp)?;
        }
        let dn = dn
            .filter(|_| want_n)
            .map(|d| Tensor::from_vec(d, n.shape(), n.device()))
            .transpose()?;
        let dr = r.track_op().then(|| grad.clone());
        Ok((dn, dr, None))
    }
}

/// The norm a [`PreNormed`] block applies to its input.
#[derive(Clone, Copy, PartialEq)]
enum Norm {
    /// RMSNorm; the op's norm parameters are its scale `[width]`.
    Rms,
    /// LayerNorm; the op's norm parameters are its scale and shift, `[2 · width]`.
    Layer,
}

impl Norm {
    /// Norm parameter values per row value.
    fn params(self) -> usize {
        match self {
            Norm::Rms => 1,
            Norm::Layer => 2,
        }
    }

    fn forward(self, x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        match self {
            Norm::Rms => rms_norm_rows(x, w, eps),
            Norm::Layer => {
                let width = w.len() / 2;
                layer_norm_rows(x, &w[..width], &w[width..], eps)
            }
        }
    }

    /// Adds the input's gradient into `dx`; returns the norm parameters' gradient.
    fn backward(self, x: &[f32], w: &[f32], eps: f32, dn: &[f32], dx: &mut [f32]) -> Vec<f32> {
        match self {
            Norm::Rms => rms_norm_rows_backward(x, w, eps, dn, dx),
            Norm::Layer => {
                let (dw, db) = layer_norm_rows_backward(x, &w[..w.len() / 2], eps, dn, dx);
                [dw, db].concat()
            }
        }
    }
}

/// `x + f(norm(x))`: inputs `(x, norm parameters, anchor)`.
struct PreNormed<K> {
    kernel: K,
    weights: Weights,
    norm: Norm,
    eps: f32,
    keep: bool,
    /// The normed input, kept by the forward for the backward.
    kept: Kept<Vec<f32>>,
}

impl<K: BlockKernel> PreNormed<K> {
    fn apply(
        kernel: K,
        weights: Weights,
        norm: Norm,
        x: &Tensor,
        params: &Tensor,
        eps: f64,
        anchor: Tensor,
    ) -> candle_core::Result<Tensor> {
        let keep = x.track_op() || params.track_op() || weights.trainable();
        x.contiguous()?.apply_op3_arc(
            &params.contiguous()?,
            &anchor,
            Arc::new(Box::new(PreNormed {
                kernel,
                weights,
                norm,
                eps: eps as f32,
                keep,
                kept: Kept::new(),
            })),
        )
    }
}

impl<K: BlockKernel> CustomOp3 for PreNormed<K> {
    fn name(&self) -> &'static str {
        self.kernel.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let w = cpu_f32(s2, l2, self.name())?;
        let (width, out) = self.kernel.widths();
        if width != out || w.len() != width * self.norm.params() || x.len() % width.max(1) != 0 {
            candle_core::bail!("{}: input {:?}, norm {:?}", self.name(), l1, l2)
        }
        let n = self.norm.forward(x, w, self.eps);
        let y = self
            .weights
            .with_slices(self.name(), |p| self.kernel.forward(&n, x, p))?;
        self.kept.keep(self.keep, n);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let name = self.name();
        let (want_x, want_w, want_p) = (x.track_op(), w.track_op(), self.weights.trainable);
        let kept = self.kept.take();
        let (dx, dw) = with_cpu_f32(x, name, |xs| {
            with_cpu_f32(w, name, |ws| {
                with_cpu_f32(&grad, name, |g| {
                    let n = match kept {
                        Some(n) if n.len() == xs.len() => n,
                        _ => self.norm.forward(xs, ws, self.eps),
                    };
                    let want_n = want_x || want_w;
                    let (dn, dp) = self
                        .weights
                        .with_slices(name, |p| self.kernel.backward(&n, p, g, want_n, want_p))?;
                    drop(n);
                    if let Some(dp) = dp.filter(|_| want_p) {
                        self.weights.deposit(dp)?;
                    }
                    Ok(match dn {
                        Some(dn) => {
                            // The residual's gradient, then the norm's added to it.
                            let mut dx = zeroed(g.len());
                            dx.par_chunks_mut(1 << 14)
                                .zip(g.par_chunks(1 << 14))
                                .for_each(|(d, g)| d.copy_from_slice(g));
                            let dw = self.norm.backward(xs, ws, self.eps, &dn, &mut dx);
                            (Some(dx), Some(dw))
                        }
                        None => (None, None),
                    })
                })
            })
        })?;
        let dev = x.device();
        let dx = match dx.filter(|_| want_x) {
            Some(d) => Some(Tensor::from_vec(d, x.shape(), dev)?),
            // Only the weights train: the residual's gradient still reaches `x`.
            None if want_x => Some(grad.clone()),
            None => None,
        };
        let dw = dw
            .filter(|_| want_w)
            .map(|d| Tensor::from_vec(d, w.shape(), dev))
            .transpose()?;
        Ok((dx, dw, None))
    }
}

/// `layer_norm(dropout(a, p) + r)`: a post-norm transformer's (BERT's) sublayer output, its
/// dropout, the residual and the LayerNorm as one CPU op with its own backward. The separate
/// ops (a dropout mask drawn on the driving thread, a multiply, an add, the norm) hand
/// candle's backward five activation-sized inputs; this hands it two. The dropout mask is
/// hashed from a seed (see `mlp::Dropout`), so the backward recomputes it and the rows draw
/// theirs in parallel. `None` where it does not apply (off the CPU, not f32, an unfused norm):
/// the caller's separate ops then run.
pub fn dropout_residual_layer_norm(
    a: &Tensor,
    r: &Tensor,
    ln: &LayerNorm,
    p: f32,
) -> candle_core::Result<Option<Tensor>> {
    let native = [a, r, &ln.weight, &ln.bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !native || !ln.fused {
        return Ok(None);
    }
    let width = ln.weight.elem_count();
    if a.dims() != r.dims() || a.dims().last() != Some(&width) || ln.bias.dims() != [width] {
        candle_core::bail!(
            "residual layer norm: {:?} + {:?} for width {width}",
            a.dims(),
            r.dims()
        )
    }
    let params = Tensor::cat(&[&ln.weight, &ln.bias], 0)?;
    let op = ResidualLayerNorm {
        eps: ln.eps as f32,
        dropout: Dropout::new(p),
        keep: a.track_op() || r.track_op() || params.track_op(),
        sum: Kept::new(),
    };
    Ok(Some(a.contiguous()?.apply_op3_arc(
        &r.contiguous()?,
        &params,
        Arc::new(Box::new(op)),
    )?))
}

/// [`dropout_residual_layer_norm`]'s kernel: inputs `(a, r, [weight; bias])`.
struct ResidualLayerNorm {
    eps: f32,
    dropout: Option<Dropout>,
    keep: bool,
    /// `dropout(a) + r`, kept by the forward for the backward.
    sum: Kept<Vec<f32>>,
}

impl ResidualLayerNorm {
    fn sum(&self, a: &[f32], r: &[f32]) -> Vec<f32> {
        let mut s = zeroed(a.len());
        s.par_chunks_mut(TASK)
            .zip(a.par_chunks(TASK).zip(r.par_chunks(TASK)))
            .enumerate()
            .for_each(|(c, (s, (a, r)))| {
                s.copy_from_slice(a);
                if let Some(d) = &self.dropout {
                    d.apply(s, c * TASK);
                }
                for (s, r) in s.iter_mut().zip(r) {
                    *s += r;
                }
            });
        s
    }
}

impl CustomOp3 for ResidualLayerNorm {
    fn name(&self) -> &'static str {
        "kiln-residual-layer-norm"
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
        let a = cpu_f32(s1, l1, self.name())?;
        let r = cpu_f32(s2, l2, self.name())?;
        let p = cpu_f32(s3, l3, self.name())?;
        let width = p.len() / 2;
        if a.len() != r.len() || width == 0 || a.len() % width != 0 {
            candle_core::bail!(
                "{}: {:?} + {:?}, {} parameters",
                self.name(),
                l1,
                l2,
                p.len()
            )
        }
        let sum = self.sum(a, r);
        let y = layer_norm_rows(&sum, &p[..width], &p[width..], self.eps);
        self.sum.keep(self.keep, sum);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        r: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let name = self.name();
        let kept = self.sum.take();
        let (ds, dp) = with_cpu_f32(a, name, |av| {
            with_cpu_f32(r, name, |rv| {
                with_cpu_f32(params, name, |p| {
                    with_cpu_f32(&grad, name, |g| {
                        let width = p.len() / 2;
                        let sum = match kept {
                            Some(s) if s.len() == av.len() => s,
                            _ => self.sum(av, rv),
                        };
                        let mut ds = zeroed(g.len());
                        let (dw, db) =
                            layer_norm_rows_backward(&sum, &p[..width], self.eps, g, &mut ds);
                        Ok((ds, [dw, db].concat()))
                    })
                })
            })
        })?;
        let dev = a.device();
        let dr = r
            .track_op()
            .then(|| Tensor::from_vec(ds.clone(), r.shape(), dev))
            .transpose()?;
        let da = if a.track_op() {
            let mut da = ds;
            if let Some(d) = &self.dropout {
                da.par_chunks_mut(TASK)
                    .enumerate()
                    .for_each(|(c, v)| d.apply(v, c * TASK));
            }
            Some(Tensor::from_vec(da, a.shape(), dev)?)
        } else {
            None
        };
        let dp = params
            .track_op()
            .then(|| Tensor::from_vec(dp, params.shape(), dev))
            .transpose()?;
        Ok((da, dr, dp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::autograd::Backprop;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
    fn dropout_residual_and_layer_norm_in_one_op_match_the_separate_ops() {
        let dev = Device::Cpu;
        let (rows, h) = (50, 24);
        let var = |shape: &[usize], mean: f32| {
            Var::from_tensor(&Tensor::randn(mean, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (a, r) = (var(&[2, rows, h], 0.0), var(&[2, rows, h], 0.5));
        let (w, b) = (var(&[h], 1.0), var(&[h], 0.0));
        let ln = LayerNorm {
            names: ("w".into(), "b".into()),
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-5,
            fused: true,
        };
        let weights = Tensor::randn(0f32, 1.0, (2, rows, h), &dev).unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let grads_of = |y: &Tensor| {
            let g = loss(y).backprop().unwrap();
            [&a, &r, &w, &b].map(|v| g.get(v.as_tensor()).unwrap().clone())
        };
        let separate = |mask: Option<&Tensor>| {
            let a = match mask {
                Some(m) => (a.as_tensor() * m).unwrap(),
                None => a.as_tensor().clone(),
            };
            super::super::ops::layer_norm_primitive(
                &(a + r.as_tensor()).unwrap(),
                &ln.weight,
                &ln.bias,
                ln.eps,
            )
            .unwrap()
        };
        // Without dropout: the output and all four gradients.
        let fused = dropout_residual_layer_norm(a.as_tensor(), r.as_tensor(), &ln, 0.0)
            .unwrap()
            .expect("CPU f32 takes the fused op");
        let reference = separate(None);
        assert!(max_diff(&fused, &reference) < 1e-5);
        for (i, (x, y)) in grads_of(&fused)
            .iter()
            .zip(grads_of(&reference).iter())
            .enumerate()
        {
            assert!(max_diff(x, y) < 1e-4, "gradient {i} differs");
        }
        // With dropout: the residual's gradient is the sum's, the input's is that times the
        // mask, so their ratio is the mask the forward used; the separate ops with that mask
        // give the same output and gradients.
        let fused = dropout_residual_layer_norm(a.as_tensor(), r.as_tensor(), &ln, 0.25)
            .unwrap()
            .unwrap();
        let g = grads_of(&fused);
        let (da, dr): (Vec<f32>, Vec<f32>) = (
            g[0].flatten_all().unwrap().to_vec1().unwrap(),
            g[1].flatten_all().unwrap().to_vec1().unwrap(),
        );
        let mask: Vec<f32> = da
            .iter()
            .zip(&dr)
            .map(|(&x, &y)| if x == 0.0 { 0.0 } else { x / y })
            .collect();
        assert!(
            mask.iter()
                .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-3)
        );
        let kept = mask.iter().filter(|&&m| m > 0.0).count() as f32 / mask.len() as f32;
        assert!((kept - 0.75).abs() < 0.06, "kept {kept}");
        let mask: Vec<f32> = mask
            .into_iter()
            .map(|m| if m > 0.0 { 1.0 / 0.75 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (2, rows, h), &dev).unwrap();
        let reference = separate(Some(&mask));
        assert!(max_diff(&fused, &reference) < 1e-5);
        for (i, (x, y)) in g.iter().zip(grads_of(&reference).iter()).enumerate() {
            assert!(max_diff(x, y) < 1e-4, "gradient {i} differs with dropout");
        }
    }
}
