//! A dense layer `x · wᵀ + b` as one node of candle's graph, for GPUs.
//!
//! candle's backward accumulates every gradient it passes along an edge of the graph into a
//! fresh zero tensor (`zeros_like`, then `add`: two more kernels and two allocations per edge,
//! whatever the edge). `Linear` written as candle ops is eight edges: the input flattened to
//! rows, the weight transposed, the product (two), the bias broadcast, the add (two) and the
//! output reshaped back; the weight's gradient comes back transposed, to be copied; and the
//! product's backward computes the weight's gradient even when the weight is frozen (a third
//! of a LoRA layer's GEMMs, thrown away). Here the layer
//! is one op on the input alone: the weight and bias are read in place, like the fused CPU
//! blocks' ([`super::autograd`]), and their gradients are deposited beside the graph, so
//! candle's backward has one edge left, the input's. The forward pass is candle's own cuBLAS
//! product and broadcast add, through the storage API; the backward is candle's tensor ops on
//! detached tensors. Both are device-agnostic, so the CPU tests run the very same code; models
//! take it on a CUDA GPU (the CPU has its fused [`super::ops::linear`]).

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Shape, Storage, Tensor};

/// `x · wᵀ + b` (`x` `[.., in]`, `w` `[out, in]`, `b` `[out]`) as one graph node, the weight
/// and bias gradients deposited ([`super::autograd`]), when a CUDA GPU runs kiln's kernels
/// (`KILN_DEVICE_KERNELS` not `candle`); `None` elsewhere (the caller's ops then run).
pub(crate) fn on_device(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if runs_on(x.device()) {
        return dense(x, w, b);
    }
    Ok(None)
}

/// Whether models take [`dense`] (and `nn::heads`' nodes) on `device`: a CUDA GPU with kiln's
/// kernels on, or the CPU inside [`with_nodes_on_cpu`].
pub(crate) fn runs_on(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    if crate::cuda::kernel_device(device).is_some() {
        return true;
    }
    device.is_cpu() && NODES_ON_CPU.with(std::cell::Cell::get)
}

thread_local! {
    static NODES_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with models taking these nodes on the CPU too (on this thread, where candle builds
/// the graph): `kiln check-device`'s stand-in on the CPU for a GPU's path, so that the test
/// suite checks them inside every model family's training step.
pub(crate) fn with_nodes_on_cpu<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back however `f` ends, a panic included.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NODES_ON_CPU.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NODES_ON_CPU.with(|c| c.replace(true)));
    f()
}

/// [`on_device`] on any device: `None` where it does not apply (a weight or bias derived from
/// a variable rather than one, or frozen; a non-float input; shapes that do not fit).
/// `w` may be in another float dtype than `x` (f32 master weights under mixed precision): it
/// is cast to `x`'s in the forward pass and its gradient comes back in its own.
pub(crate) fn dense(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    // A weight the op can deposit a gradient for, or one that needs none.
    let leaf = |t: &Tensor| !t.track_op() || t.is_variable();
    let in_dim = x.dim(D::Minus1)?;
    let fits = w.rank() == 2
        && w.dim(1)? == in_dim
        && b.is_none_or(|b| b.dims() == [w.dims()[0]])
        && x.dtype().is_float()
        && w.dtype().is_float()
        && b.is_none_or(|b| b.dtype().is_float())
        && leaf(w)
        && b.is_none_or(leaf)
        && w.is_contiguous()
        && b.is_none_or(Tensor::is_contiguous);
    if !fits || in_dim == 0 {
        return Ok(None);
    }
    let op = Dense {
        w: w.clone(),
        b: b.cloned(),
    };
    let x = x.contiguous()?;
    let weights_learn = w.is_variable() || b.is_some_and(Tensor::is_variable);
    if weights_learn && !x.track_op() {
        // Nothing below tracks the input (frozen layers beneath): a one-value variable keeps
        // the node in candle's graph so that its backward runs and deposits.
        let anchor = candle_core::Var::from_tensor(&Tensor::zeros(1, DType::F32, x.device())?)?;
        return Ok(Some(x.apply_op2_arc(
            anchor.as_tensor(),
            std::sync::Arc::new(Box::new(op)),
        )?));
    }
    Ok(Some(x.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?))
}

/// The op: the input is its argument, the weights its own.
struct Dense {
    w: Tensor,
    b: Option<Tensor>,
}

/// `x · wᵀ + b` on one backend's storages: candle's matrix product with the weight's
/// transposed layout (no copy) and its broadcast add; `w` and `b` cast to `x`'s dtype first
/// where theirs differs.
fn forward<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
    b: Option<(&S, &Layout)>,
) -> candle_core::Result<(S, Shape)> {
    let k = xl.dims().last().copied().unwrap_or(1);
    let (n, wk) = wl.shape().dims2()?;
    if k == 0 || wk != k || !xl.is_contiguous() || !wl.is_contiguous() {
        candle_core::bail!("kiln-dense: input {:?}, weight {:?}", xl.dims(), wl.dims())
    }
    let m = xl.shape().elem_count() / k;
    let dtype = x.dtype();
    let cast_w;
    let (w, wl) = if w.dtype() != dtype {
        cast_w = w.to_dtype(wl, dtype)?;
        (&cast_w, Layout::contiguous((n, k)))
    } else {
        (w, wl.clone())
    };
    let rows = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let mut y = x.matmul(w, (1, m, n, k), &rows, &wl.transpose(0, 1)?)?;
    if let Some((b, bl)) = b {
        if bl.dims() != [n] {
            candle_core::bail!("kiln-dense: bias {:?} for {n} outputs", bl.dims())
        }
        let cast_b;
        let (b, bl) = if b.dtype() != dtype {
            cast_b = b.to_dtype(bl, dtype)?;
            (&cast_b, Layout::contiguous(n))
        } else {
            (b, bl.clone())
        };
        y = y.binary_impl::<Add>(b, &Layout::contiguous((m, n)), &bl.broadcast_as((m, n))?)?;
    }
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((y, Shape::from(dims)))
}

impl Dense {
    /// The forward pass on the storages of one backend, `pick` taking each weight's.
    fn run<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let elsewhere = |t: &Tensor| {
            candle_core::Error::Msg(format!(
                "kiln-dense: a weight is on {:?}, the input is not",
                t.device()
            ))
        };
        let (ws, wl) = self.w.storage_and_layout();
        let w = pick(&ws).ok_or_else(|| elsewhere(&self.w))?;
        match &self.b {
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                let bias = pick(&bs).ok_or_else(|| elsewhere(b))?;
                forward(x, xl, w, wl, Some((bias, bl)))
            }
            None => forward(x, xl, w, wl, None),
        }
    }

    /// The input's gradient (where it is tracked); the weight's and bias's deposited.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let k = x.dim(D::Minus1)?;
        let n = self.w.dim(0)?;
        let m = x.elem_count() / k;
        let g = grad.contiguous()?.reshape((m, n))?;
        let dx = if x.track_op() {
            // dx [m, k] = g [m, n] · w [n, k]
            let w = self.w.detach().to_dtype(g.dtype())?;
            Some(g.matmul(&w)?.reshape(x.shape())?)
        } else {
            None
        };
        if self.w.is_variable() {
            // dw [n, k] = gᵀ [n, m] · x [m, k] (candle's product takes the transposed view)
            let dw = g.t()?.matmul(&x.detach().reshape((m, k))?)?;
            super::autograd::deposit(&self.w, dw.to_dtype(self.w.dtype())?);
        }
        if let Some(b) = self.b.as_ref().filter(|b| b.is_variable()) {
            // Summed in f32 whatever the activations' dtype.
            let db = g.to_dtype(DType::F32)?.sum(0)?;
            super::autograd::deposit(b, db.to_dtype(b.dtype())?);
        }
        Ok(dx)
    }
}

fn cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda(s: &Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "kiln-dense"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, l, cpu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.run(x, l, cuda)
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.backward(x, grad)
    }
}

/// With an anchor as the second argument ([`dense`]), which gets no gradient.
impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "kiln-dense"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, l, cpu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.run(x, l, cuda)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.backward(x, grad)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::autograd::Backprop;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::nn::attention::splitmix64(s);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d.is_finite(), "a difference is not finite");
        d
    }

    /// The op against candle's `x · wᵀ + b` on the same values: the output and every
    /// gradient, for each combination of what is trainable, with and without a bias, with
    /// an f16 input against f32 master weights (mixed precision), a 3-D input and a
    /// non-contiguous one.
    #[test]
    fn matches_candle_ops_output_and_gradients() {
        let dev = Device::Cpu;
        let (rows, seq, k, n) = (3, 5, 7, 4);
        let cases = [
            // (input tracked, weight trainable, bias: None / Some(trainable), input dtype)
            (true, true, Some(true), DType::F32),
            (true, false, Some(false), DType::F32),
            (false, true, Some(true), DType::F32),
            (false, true, None, DType::F32),
            (true, true, Some(false), DType::F32),
            (true, false, Some(true), DType::F32),
            (true, true, Some(true), DType::F16),
        ];
        for (case, &(x_tracked, w_trainable, bias, dtype)) in cases.iter().enumerate() {
            let x0 = Tensor::from_vec(
                values(rows * seq * k, 1 + case as u64),
                (rows, seq, k),
                &dev,
            )
            .unwrap();
            let xv = Var::from_tensor(&x0).unwrap();
            let w0 = Tensor::from_vec(values(n * k, 11), (n, k), &dev).unwrap();
            let wv = Var::from_tensor(&w0).unwrap();
            let b0 = Tensor::from_vec(values(n, 12), n, &dev).unwrap();
            let bv = Var::from_tensor(&b0).unwrap();
            let pick = |trainable: bool, v: &Var, t: &Tensor| {
                if trainable {
                    v.as_tensor().clone()
                } else {
                    t.clone()
                }
            };
            let x = pick(x_tracked, &xv, &x0).to_dtype(dtype).unwrap();
            let w = pick(w_trainable, &wv, &w0);
            let b = bias.map(|t| pick(t, &bv, &b0));
            let reference = {
                let wd = w.to_dtype(dtype).unwrap();
                let y = x
                    .reshape((rows * seq, k))
                    .unwrap()
                    .matmul(&wd.t().unwrap())
                    .unwrap();
                let y = match &b {
                    Some(b) => y.broadcast_add(&b.to_dtype(dtype).unwrap()).unwrap(),
                    None => y,
                };
                y.reshape((rows, seq, n)).unwrap()
            };
            let fused = dense(&x, &w, b.as_ref()).unwrap().expect("the op applies");
            let tol = if dtype == DType::F32 { 1e-6 } else { 2e-3 };
            assert!(
                max_diff(&fused, &reference) < tol,
                "case {case}: outputs differ"
            );
            // A loss that weighs every output differently.
            let weights = Tensor::from_vec(values(rows * seq * n, 99), (rows, seq, n), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let loss = |y: &Tensor| {
                (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let g_ref = loss(&reference).backprop().unwrap();
            let g_op = loss(&fused).backprop().unwrap();
            let tracked = [
                (x_tracked, &xv, "x"),
                (w_trainable, &wv, "w"),
                (bias == Some(true), &bv, "b"),
            ];
            for (on, var, name) in tracked {
                let (a, r) = (g_op.get(var.as_tensor()), g_ref.get(var.as_tensor()));
                if !on {
                    assert!(
                        a.is_none() && r.is_none(),
                        "case {case}: {name} has a gradient"
                    );
                    continue;
                }
                let (a, r) = (a.expect("the op's gradient"), r.expect("candle's gradient"));
                assert_eq!(
                    a.dtype(),
                    var.dtype(),
                    "case {case}: {name}'s gradient dtype"
                );
                let scale = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(
                    max_diff(a, r) < scale,
                    "case {case}: {name}'s gradient differs"
                );
            }
        }
        // A non-contiguous input (a transposed view) is made contiguous first.
        let x = Tensor::from_vec(values(k * 6, 5), (k, 6), &dev)
            .unwrap()
            .t()
            .unwrap();
        let w = Tensor::from_vec(values(n * k, 6), (n, k), &dev).unwrap();
        let y = dense(&x, &w, None).unwrap().unwrap();
        let reference = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&y, &reference) < 1e-6);
    }

    /// A LoRA adapter as two of these nodes (the GPU's path) against its candle ops (the
    /// CPU's), dropout on: the same output and gradients for `A`, `B` and the input.
    #[test]
    fn lora_adapter_as_two_nodes_matches_its_candle_ops() {
        use crate::nn::layers::{seed_dropout, unseed_dropout};
        use crate::nn::lora::LoraAdapter;
        let dev = Device::Cpu;
        let (rows, seq, k, rank, n) = (2, 6, 9, 3, 5);
        let xv = Var::from_tensor(
            &Tensor::from_vec(values(rows * seq * k, 21), (rows, seq, k), &dev).unwrap(),
        )
        .unwrap();
        let a = Var::from_tensor(&Tensor::from_vec(values(rank * k, 22), (rank, k), &dev).unwrap())
            .unwrap();
        let b = Var::from_tensor(&Tensor::from_vec(values(n * rank, 23), (n, rank), &dev).unwrap())
            .unwrap();
        let adapter = LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 16.0 / rank as f64,
            dropout: 0.25,
        };
        let weights = Tensor::from_vec(values(rows * seq * n, 24), (rows, seq, n), &dev).unwrap();
        let run = |nodes: bool| {
            seed_dropout(7);
            let y = if nodes {
                adapter
                    .delta_nodes(xv.as_tensor(), true)
                    .unwrap()
                    .expect("applies")
            } else {
                adapter.delta(xv.as_tensor(), true).unwrap()
            };
            unseed_dropout();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            (y, grads)
        };
        let ((y_nodes, g_nodes), (y_ops, g_ops)) = (run(true), run(false));
        assert!(max_diff(&y_nodes, &y_ops) < 1e-5, "outputs differ");
        for (var, name) in [(&xv, "x"), (&a, "A"), (&b, "B")] {
            let (p, q) = (g_nodes.get(var.as_tensor()), g_ops.get(var.as_tensor()));
            let (p, q) = (
                p.expect("the nodes' gradient"),
                q.expect("the ops' gradient"),
            );
            assert!(max_diff(p, q) < 1e-5, "{name}'s gradient differs");
        }
    }

    /// A weight computed from a variable (not one itself) cannot take a deposit: the op
    /// declines, and so it does for shapes that do not fit.
    #[test]
    fn declines_derived_weights_and_bad_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let w = Var::ones((4, 3), DType::F32, &dev).unwrap();
        let derived = (w.as_tensor() * 2.0).unwrap();
        assert!(dense(&x, &derived, None).unwrap().is_none());
        assert!(dense(&x, w.as_tensor(), None).unwrap().is_some());
        let wrong = Tensor::ones((4, 5), DType::F32, &dev).unwrap();
        assert!(dense(&x, &wrong, None).unwrap().is_none());
        let bias = Tensor::ones(3, DType::F32, &dev).unwrap();
        assert!(dense(&x, w.as_tensor(), Some(&bias)).unwrap().is_none());
        // Not on the CPU's models, but for check-device's stand-in for a GPU.
        assert!(on_device(&x, w.as_tensor(), None).unwrap().is_none());
        assert!(
            with_nodes_on_cpu(|| on_device(&x, w.as_tensor(), None))
                .unwrap()
                .is_some()
        );
        assert!(on_device(&x, w.as_tensor(), None).unwrap().is_none());
    }
}
