//! Attention heads split out of the projections' layout (`[b, s, n·d]` → `[b, n, s, d]`) and
//! joined back, each as one node of candle's graph, for GPUs.
//!
//! As candle ops a split is a reshape, a transpose and a copy, and a join a transpose, a copy
//! and a reshape: three edges, each of which candle's backward accumulates through a fresh
//! zero tensor and an add (`nn::dense` says more). As one op it is one copy forward and one
//! copy back, the inverse, and a single edge. The copies are candle's strided copy, through
//! the storage API, so the CPU tests run the very code a GPU does.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// `x` `[b, s, heads·d]` as `[b, heads, s, d]`, contiguous: one graph node on a CUDA GPU
/// with kiln's kernels on, candle's reshape, transpose and copy elsewhere.
pub(crate) fn split(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    if super::dense::runs_on(x.device()) {
        return split_node(x, heads);
    }
    let (b, s, h) = x.dims3()?;
    x.reshape((b, s, heads, h / heads.max(1)))?
        .transpose(1, 2)?
        .contiguous()
}

/// `x` `[b, heads, s, d]` as `[b, s, heads·d]`: [`split`]'s inverse, likewise.
pub(crate) fn join(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::dense::runs_on(x.device()) {
        return join_node(x);
    }
    let (b, n, s, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, s, n * d))
}

/// [`split`] as one node on any device.
pub(crate) fn split_node(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (_, _, h) = x.dims3()?;
    if heads == 0 || h % heads != 0 {
        candle_core::bail!("heads: {h} features do not split into {heads} heads")
    }
    x.contiguous()?.apply_op1(Heads { split: Some(heads) })
}

/// [`join`] as one node on any device.
pub(crate) fn join_node(x: &Tensor) -> candle_core::Result<Tensor> {
    x.dims4()?;
    x.contiguous()?.apply_op1(Heads { split: None })
}

/// The op: `split: Some(heads)` splits `[b, s, heads·d]`, `None` joins `[b, n, s, d]`.
struct Heads {
    split: Option<usize>,
}

impl Heads {
    /// The input's layout seen as the output's (a transposed view) and the output's shape.
    fn views(&self, l: &Layout) -> candle_core::Result<(Layout, Shape)> {
        let off = l.start_offset();
        match (self.split, l.dims()) {
            (Some(n), &[b, s, h]) => {
                let d = h / n;
                let src = Layout::contiguous_with_offset((b, s, n, d), off).transpose(1, 2)?;
                Ok((src, Shape::from((b, n, s, d))))
            }
            (None, &[b, n, s, d]) => {
                let src = Layout::contiguous_with_offset((b, n, s, d), off).transpose(1, 2)?;
                Ok((src, Shape::from((b, s, n * d))))
            }
            (_, dims) => candle_core::bail!("heads: an input of {dims:?}"),
        }
    }

    fn run<S>(&self, x: &S, l: &Layout) -> candle_core::Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        if !l.is_contiguous() {
            candle_core::bail!("heads: the input is not contiguous")
        }
        let (src, shape) = self.views(l)?;
        // SAFETY: the strided copy below writes every element of the new storage.
        let mut out = unsafe { x.device().alloc_uninit(&shape, x.dtype())? };
        x.copy_strided_src(&mut out, 0, &src)?;
        Ok((out, shape))
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "kiln-heads"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(x, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.run(x, l)
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Heads {
            split: match self.split {
                Some(_) => None,
                None => Some(x.dim(1)?),
            },
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::autograd::Backprop;
    use candle_core::{DType, Device, Var};

    #[test]
    fn split_and_join_match_candle_views_and_carry_gradients_back() {
        let dev = Device::Cpu;
        let (b, s, n, d) = (2, 5, 3, 4);
        let x = Var::from_tensor(
            &Tensor::arange(0f32, (b * s * n * d) as f32, &dev)
                .unwrap()
                .reshape((b, s, n * d))
                .unwrap(),
        )
        .unwrap();
        let want = x
            .as_tensor()
            .reshape((b, s, n, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let got = split_node(x.as_tensor(), n).unwrap();
        assert_eq!(got.dims(), [b, n, s, d]);
        let same = |a: &Tensor, c: &Tensor| {
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == c.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&got, &want), "split differs from candle's views");
        let back = join_node(&got).unwrap();
        assert_eq!(back.dims(), [b, s, n * d]);
        assert!(same(&back, x.as_tensor()), "join is not split's inverse");
        // Gradients: a weighted sum through split (and through split then join) gives each
        // input element its own weight back, in the input's layout.
        let w = Tensor::arange(1f32, 1.0 + (b * s * n * d) as f32, &dev)
            .unwrap()
            .reshape((b, n, s, d))
            .unwrap();
        let g = (&got * &w).unwrap().sum_all().unwrap().backprop().unwrap();
        let g_ref = (&want * &w).unwrap().sum_all().unwrap().backprop().unwrap();
        assert!(same(
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap()
        ));
        let w2 = w.reshape((b, s, n * d)).unwrap();
        let g = (&back * &w2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        assert!(same(g.get(x.as_tensor()).unwrap(), &w2));
        // Half dtypes copy the same way; a width that does not split is an error.
        let h = split_node(&x.as_tensor().to_dtype(DType::F16).unwrap(), n).unwrap();
        assert!(same(&h.to_dtype(DType::F32).unwrap(), &want));
        assert!(split_node(x.as_tensor(), 5).is_err());
        // Not on the CPU's models: the candle ops there.
        assert!(same(&split(x.as_tensor(), n).unwrap(), &want));
        assert!(same(&join(&want).unwrap(), x.as_tensor()));
    }
}
