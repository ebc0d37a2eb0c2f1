//! The optimizer's CUDA kernels (`src/cuda/kernels.cu`), over many tensors per launch as
//! PyTorch's fused AdamW: AdamW's update in place, the moments in device buffers the optimizer
//! owns, up to [`LIST`] parameters a launch; and the gradients' sum of squares for the global
//! norm, up to [`LIST`] gradients a launch, into a single f64 read back once. A MiniLM step
//! (~105 parameters) is then 3 launches for each where it was one per tensor, and where
//! candle's tensor ops take a dozen kernels and as many allocations per parameter
//! (`ParamState::step_with_tensor_ops`, still the path where `KILN_DEVICE_KERNELS=candle`).

use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{DType, Storage, Tensor};

use super::optim::UpdateConsts;
use crate::cuda::{func, wrap};

/// Tensors per launch (`KILN_LIST` in kernels.cu).
const LIST: usize = 48;
/// Elements per block (`KILN_LIST_CHUNK`).
const CHUNK: usize = 4096;
/// Threads per block.
const THREADS: u32 = 256;

/// `KilnAdamWList` of kernels.cu, field for field (device pointers as `u64`).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWList {
    theta: [u64; LIST],
    m: [u64; LIST],
    v: [u64; LIST],
    grad: [u64; LIST],
    n: [u64; LIST],
    decay: [f32; LIST],
    step_size: [f32; LIST],
    inv_sqrt_bc2: [f32; LIST],
    block_start: [u32; LIST + 1],
    count: i32,
}

// SAFETY: plain data in kernels.cu's layout (`#[repr(C)]`, the same field types and order), so
// the kernel reads it as its by-value argument; nvcc's PTX declares that argument 2,696 bytes.
unsafe impl DeviceRepr for AdamWList {}
const _: () = assert!(std::mem::size_of::<AdamWList>() == 2696);

/// `KilnSumList` of kernels.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct SumList {
    x: [u64; LIST],
    n: [u64; LIST],
    block_start: [u32; LIST + 1],
    count: i32,
}

// SAFETY: as for `AdamWList` (968 bytes in the PTX).
unsafe impl DeviceRepr for SumList {}
const _: () = assert!(std::mem::size_of::<SumList>() == 968);

/// The grid's size once a tensor of `n` elements is added to a list whose blocks so far are
/// `total` (a block per [`CHUNK`]).
fn add_blocks(total: u32, n: usize) -> candle_core::Result<u32> {
    u32::try_from(n.div_ceil(CHUNK))
        .ok()
        .and_then(|b| total.checked_add(b))
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("kiln-optim: {n} more elements in one launch"))
        })
}

/// A launch of `blocks` blocks.
fn grid(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

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

/// One parameter's update: the parameter (f32, on the device), its moments, its constants
/// and its gradient (f32, contiguous, the parameter's shape).
pub(crate) struct Update<'a> {
    pub(crate) param: Tensor,
    pub(crate) moments: &'a mut Moments,
    pub(crate) k: UpdateConsts,
    pub(crate) grad: Tensor,
}

/// AdamW on every parameter of `updates` (all on `device`, all with the same betas, epsilon
/// and gradient scale), in place: one kernel per [`LIST`] of them.
pub(crate) fn adamw(device: &CudaDevice, updates: &mut [Update<'_>]) -> candle_core::Result<()> {
    let kernel = func(device, "kiln_adamw_list_f32")?;
    let stream = device.cuda_stream();
    let Some(first) = updates.first() else {
        return Ok(());
    };
    let k0 = first.k;
    for batch in updates.chunks_mut(LIST) {
        // The storages, held for reading until the launch is queued (the parameters are
        // written through their device pointers: candle runs everything on this one stream,
        // in order, and nothing else holds them during the optimizer's step).
        let mut params = Vec::with_capacity(batch.len());
        let mut grads = Vec::with_capacity(batch.len());
        let mut moments = Vec::with_capacity(batch.len());
        let mut consts = Vec::with_capacity(batch.len());
        for u in batch.iter_mut() {
            let Update {
                param,
                moments: m,
                k,
                grad,
            } = u;
            if (k.beta1, k.beta2, k.eps, k.grad_scale)
                != (k0.beta1, k0.beta2, k0.eps, k0.grad_scale)
            {
                candle_core::bail!("kiln-adamw: one launch's parameters differ in their betas")
            }
            params.push(param.storage_and_layout());
            grads.push(grad.storage_and_layout());
            moments.push(&mut **m);
            consts.push(*k);
        }
        let mut list = AdamWList {
            theta: [0; LIST],
            m: [0; LIST],
            v: [0; LIST],
            grad: [0; LIST],
            n: [0; LIST],
            decay: [0.0; LIST],
            step_size: [0.0; LIST],
            inv_sqrt_bc2: [0.0; LIST],
            block_start: [0; LIST + 1],
            count: 0,
        };
        let mut syncs = Vec::with_capacity(4 * consts.len());
        let mut total: u32 = 0;
        for (((p, g), m), k) in params.iter().zip(&grads).zip(moments).zip(&consts) {
            let ((Storage::Cuda(ps), pl), (Storage::Cuda(gs), gl)) = ((&*p.0, p.1), (&*g.0, g.1))
            else {
                candle_core::bail!("kiln-adamw: a parameter or gradient is not on the GPU")
            };
            let (Some((p0, p1)), Some((g0, g1))) =
                (pl.contiguous_offsets(), gl.contiguous_offsets())
            else {
                candle_core::bail!("kiln-adamw: parameter and gradient must be contiguous")
            };
            let n = p1 - p0;
            if g1 - g0 != n || m.m.len() != n || m.v.len() != n {
                candle_core::bail!(
                    "kiln-adamw: size mismatch between parameter, gradient and state"
                )
            }
            if n == 0 {
                continue;
            }
            let i = list.count as usize;
            let (theta, s1) = ps.as_cuda_slice::<f32>()?.slice(p0..p1).view_ptr(&stream);
            let (grad, s2) = gs.as_cuda_slice::<f32>()?.slice(g0..g1).view_ptr(&stream);
            let Moments { m: mm, v: vv, .. } = m;
            let (m_ptr, s3) = mm.device_ptr_mut(&stream);
            let (v_ptr, s4) = vv.device_ptr_mut(&stream);
            syncs.extend([s1, s2, s3, s4]);
            list.theta[i] = theta;
            list.grad[i] = grad;
            list.m[i] = m_ptr;
            list.v[i] = v_ptr;
            list.n[i] = n as u64;
            list.decay[i] = k.decay;
            list.step_size[i] = k.step_size;
            list.inv_sqrt_bc2[i] = k.inv_sqrt_bc2;
            list.block_start[i] = total;
            total = add_blocks(total, n)?;
            list.count += 1;
        }
        if list.count == 0 {
            continue;
        }
        list.block_start[list.count as usize] = total;
        let mut builder = kernel.builder();
        builder.arg(&list);
        builder.arg(&k0.beta1);
        builder.arg(&k0.beta2);
        builder.arg(&k0.eps);
        builder.arg(&k0.grad_scale);
        // SAFETY: kiln_adamw_list_f32's signature (the list by value, four floats); every
        // pointer in the list holds its `n` elements, and `block_start` covers the grid.
        unsafe { builder.launch(grid(total)) }.map_err(wrap)?;
        drop(syncs);
    }
    Ok(())
}

/// The sum of the squares of every gradient in `grads` (all on `device`), in f64, read back
/// once: one kernel per [`LIST`] of them. A gradient that is not contiguous f32 is made so
/// first.
pub(crate) fn sum_squares(device: &CudaDevice, grads: &[&Tensor]) -> candle_core::Result<f64> {
    let kernel = func(device, "kiln_sum_squares_list_f32")?;
    let stream = device.cuda_stream();
    let mut out = device.alloc_zeros::<f64>(1)?;
    let grads = grads
        .iter()
        .map(|g| {
            if g.dtype() == DType::F32 {
                g.contiguous()
            } else {
                g.to_dtype(DType::F32)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    for batch in grads.chunks(LIST) {
        let held: Vec<_> = batch.iter().map(Tensor::storage_and_layout).collect();
        let mut list = SumList {
            x: [0; LIST],
            n: [0; LIST],
            block_start: [0; LIST + 1],
            count: 0,
        };
        let mut syncs = Vec::with_capacity(batch.len());
        let mut total: u32 = 0;
        for (storage, layout) in &held {
            let Storage::Cuda(storage) = &**storage else {
                candle_core::bail!("kiln-sum-squares: a gradient is not on the GPU")
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("kiln-sum-squares: a gradient is not contiguous")
            };
            let n = end - start;
            if n == 0 {
                continue;
            }
            let i = list.count as usize;
            let (x, sync) = storage
                .as_cuda_slice::<f32>()?
                .slice(start..end)
                .view_ptr(&stream);
            syncs.push(sync);
            list.x[i] = x;
            list.n[i] = n as u64;
            list.block_start[i] = total;
            total = add_blocks(total, n)?;
            list.count += 1;
        }
        if list.count == 0 {
            continue;
        }
        list.block_start[list.count as usize] = total;
        let mut builder = kernel.builder();
        builder.arg(&list);
        builder.arg(&mut out);
        // SAFETY: kiln_sum_squares_list_f32's signature (the list by value, a pointer to one
        // double); every pointer in the list holds its `n` elements.
        unsafe { builder.launch(grid(total)) }.map_err(wrap)?;
        drop(syncs);
    }
    let sum = device.clone_dtoh(&out)?;
    Ok(sum.first().copied().unwrap_or(0.0))
}
