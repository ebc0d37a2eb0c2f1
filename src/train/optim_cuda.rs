//! The optimizer's CUDA kernels (`src/cuda/kernels.cu`): AdamW's update of
//! one parameter as one kernel, in place, with its moments in device buffers the optimizer
//! owns, and the gradients' sum of squares for the global norm, one kernel per gradient into
//! a single f64 read back once. candle's tensor ops take a dozen kernels and as many
//! allocations per parameter for the update (`ParamState::step_with_tensor_ops`, still the
//! path where `KILN_DEVICE_KERNELS=candle`).

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, InplaceOp2, Layout, Storage, Tensor};

use super::optim::UpdateConsts;
use crate::cuda::{config, func, wrap};

/// One parameter's AdamW moments in device memory.
pub(crate) struct Moments {
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    device: CudaDevice,
}

impl Moments {
    /// Copies host moments to `device`.
    pub(crate) fn upload(device: &CudaDevice, m: &[f32], v: &[f32]) -> candle_core::Result<Self> {
        Ok(Self {
            m: device.clone_htod(m)?,
            v: device.clone_htod(v)?,
            device: device.clone(),
        })
    }

    /// The moments, copied to the host.
    pub(crate) fn download(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.device.clone_dtoh(&self.m)?,
            self.device.clone_dtoh(&self.v)?,
        ))
    }
}

/// AdamW on a CUDA parameter, in place: `s1` is the parameter, `s2` the gradient (both f32 and
/// contiguous); the moments are borrowed through a mutex since candle's trait takes `&self`.
pub(crate) struct CudaAdamW<'a> {
    pub(crate) k: UpdateConsts,
    pub(crate) moments: Mutex<&'a mut Moments>,
}

impl InplaceOp2 for CudaAdamW<'_> {
    fn name(&self) -> &'static str {
        "kiln-adamw-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("kiln-adamw-cuda: a CPU parameter takes the CPU's update")
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("kiln-adamw-cuda: parameter and gradient must be contiguous")
        };
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("kiln-adamw-cuda: poisoned".into()))?;
        let n = a1 - a0;
        if b1 - b0 != n || moments.m.len() != n || moments.v.len() != n {
            candle_core::bail!(
                "kiln-adamw-cuda: size mismatch between parameter, gradient and state"
            )
        }
        if n == 0 {
            return Ok(());
        }
        let device = s1.device.clone();
        let func = func(&device, "kiln_adamw_f32")?;
        let grad = s2.as_cuda_slice::<f32>()?.slice(b0..b1);
        let mut theta = s1.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a1);
        let Moments { m, v, .. } = &mut **moments;
        let k = self.k;
        let mut builder = func.builder();
        builder.arg(&mut theta);
        builder.arg(m);
        builder.arg(v);
        builder.arg(&grad);
        builder.arg(&n);
        builder.arg(&k.beta1);
        builder.arg(&k.beta2);
        builder.arg(&k.eps);
        builder.arg(&k.decay);
        builder.arg(&k.step_size);
        builder.arg(&k.inv_sqrt_bc2);
        builder.arg(&k.grad_scale);
        // SAFETY: the arguments match the kernel's signature in kernels.cu, in order and type
        // (size_t is usize on every platform CUDA supports); every buffer holds `n` elements.
        unsafe { builder.launch(config(n)) }.map_err(wrap)?;
        Ok(())
    }
}

/// The sum of the squares of every gradient in `grads` (all on `device`), in f64, read back
/// once. A gradient that is not contiguous f32 is made so first.
pub(crate) fn sum_squares(device: &CudaDevice, grads: &[&Tensor]) -> candle_core::Result<f64> {
    let func = func(device, "kiln_sum_squares_f32")?;
    let mut out = device.alloc_zeros::<f64>(1)?;
    for g in grads {
        let g = if g.dtype() == DType::F32 {
            g.contiguous()?
        } else {
            g.to_dtype(DType::F32)?
        };
        let (storage, layout) = g.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            candle_core::bail!("kiln-sum-squares: a gradient is not on the GPU")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("kiln-sum-squares: a gradient is not contiguous")
        };
        let n = end - start;
        if n == 0 {
            continue;
        }
        let x = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&n);
        builder.arg(&mut out);
        // SAFETY: as in kernels.cu: a pointer to `n` floats, `n`, a pointer to one double.
        unsafe { builder.launch(config(n)) }.map_err(wrap)?;
    }
    let sum = device.clone_dtoh(&out)?;
    Ok(sum.first().copied().unwrap_or(0.0))
}
