//! kiln's own CUDA kernels (`kernels.cu`, compiled to PTX by build.rs in the CUDA build): the
//! optimizer's fused AdamW update and gradient norm (`train::optim`), LayerNorm, RMSNorm,
//! softmax (with attention's scale and mask), GELU, gated SiLU and rotary embeddings forward
//! and backward (`nn::ops::layer_norm`, `rms_norm`, `softmax_last_dim`, `attention_softmax`,
//! `gelu_erf`, `silu_mul`, `rope`) and hashed dropout (`nn::layers::dropout`), where candle's
//! ops would take many launches and allocations or a copy from the host. The environment's
//! `KILN_DEVICE_KERNELS=candle` turns them off (candle's ops then run, as before), and with
//! them `nn::dense` and `nn::heads`' single-node layers, for A/B measurements. `kiln
//! check-device` compares each with the CPU.

use std::sync::Arc;

use candle_core::CudaStorage;
use candle_core::Layout;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "kiln_kernels";
/// Threads per block (a multiple of 32, at most 1024: the sum's block reduction assumes both).
const THREADS: u32 = 256;
/// At most this many blocks; the kernels stride over whatever is left.
const MAX_BLOCKS: u32 = 4096;

/// A kernel of `kernels.cu` on a device's stream (candle's, so it runs in order with candle's
/// own kernels).
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// A launch of this kernel, its arguments to be pushed in the order of its signature.
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The kernel `name` of `kernels.cu` on `device` (the module is loaded once; candle keeps it).
pub(crate) fn func(device: &CudaDevice, name: &str) -> candle_core::Result<Kernel> {
    Ok(Kernel {
        func: device
            .get_or_load_custom_func(name, MODULE, PTX)?
            .into_cuda_function(),
        stream: device.cuda_stream(),
    })
}

/// The launch shape for `n` elements: 256-thread blocks, one element per thread up to
/// [`MAX_BLOCKS`] blocks (the kernels loop over the rest).
pub(crate) fn config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A CUDA driver error as a candle error.
pub(crate) fn wrap(e: impl std::fmt::Display + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The CUDA device of a tensor on one when kiln's kernels are on (the default; the
/// environment's `KILN_DEVICE_KERNELS=candle` turns them off) and loaded there, else `None`.
pub(crate) fn kernel_device(device: &candle_core::Device) -> Option<&CudaDevice> {
    match device {
        candle_core::Device::Cuda(cuda) if kernels_on() && load_error(cuda).is_none() => Some(cuda),
        _ => None,
    }
}

/// A kernel every build has, whose loading loads (and so checks) the whole module.
const PROBE: &str = "kiln_adamw_list_f32";

/// Why kiln's kernels cannot run on `device` (its driver rejected the PTX: built for a newer
/// architecture or toolkit than the card and driver take, say), or `None` once they are
/// loaded. Tried once per device: on failure an error is logged and candle's ops run there
/// instead (slower, the same results); `kiln check-device` reports it as a failed check.
pub(crate) fn load_error(device: &CudaDevice) -> Option<String> {
    use candle_core::cuda_backend::DeviceId;
    static TRIED: std::sync::Mutex<Vec<(DeviceId, Option<String>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut tried = TRIED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, error)) = tried.iter().find(|(id, _)| *id == device.id()) {
        return error.clone();
    }
    let error = device
        .get_or_load_custom_func(PROBE, MODULE, PTX)
        .err()
        .map(|e| e.to_string());
    if let Some(e) = &error {
        use candle_core::backend::BackendDevice;
        let at = match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            other => format!("{other:?}"),
        };
        tracing::error!(
            "kiln's CUDA kernels did not load on {at}: {e}; candle's ops run there instead (slower)"
        );
    }
    tried.push((device.id(), error.clone()));
    error
}

/// Whether kiln's kernels are on (`KILN_DEVICE_KERNELS`, read once).
pub(crate) fn kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("KILN_DEVICE_KERNELS") {
        Ok(v) if v.eq_ignore_ascii_case("candle") => {
            tracing::info!(
                "KILN_DEVICE_KERNELS=candle: the optimizer, norms, softmax, activations and dropout run as candle ops"
            );
            false
        }
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("kiln") => true,
        Ok(v) => {
            tracing::warn!(
                "KILN_DEVICE_KERNELS={v:?} is neither `kiln` nor `candle`; using kiln's"
            );
            true
        }
        Err(_) => true,
    })
}

/// `x` (contiguous, f32, bf16 or f16) times the hashed dropout mask of `(seed, threshold,
/// scale)` (`nn::mlp::Dropout`'s): element i kept, times `scale`, when the top 32 bits of its
/// hash fall below `threshold`. A new buffer; one kernel.
pub(crate) fn dropout(
    x: &CudaStorage,
    layout: &Layout,
    seed: u64,
    threshold: u64,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kiln-dropout: the input is not contiguous")
    };
    let device = x.device.clone();
    // The same launch for each element type, its kernel named after it.
    macro_rules! by_dtype {
        ($($variant:ident => $kernel:literal),*) => {
            match &x.slice {
                $(CudaStorageSlice::$variant(s) => CudaStorageSlice::$variant(dropout_into(
                    &func(&device, $kernel)?,
                    &device,
                    s.slice(start..end),
                    (seed, threshold, scale),
                )?),)*
                _ => candle_core::bail!("kiln-dropout: {:?} is not f32, bf16 or f16", x.dtype()),
            }
        };
    }
    let slice = by_dtype!(F32 => "kiln_dropout_f32", BF16 => "kiln_dropout_bf16", F16 => "kiln_dropout_f16");
    Ok(CudaStorage { slice, device })
}

/// One dropout kernel over `x`, with `(seed, threshold, scale)`, into a new buffer.
fn dropout_into<T: DeviceRepr>(
    kernel: &Kernel,
    device: &CudaDevice,
    x: CudaView<'_, T>,
    (seed, threshold, scale): (u64, u64, f32),
) -> candle_core::Result<CudaSlice<T>> {
    let n = x.len();
    // SAFETY: every element is written by the kernel below before anything reads it.
    let y = unsafe { device.alloc::<T>(n)? };
    if n == 0 {
        return Ok(y);
    }
    let mut builder = kernel.builder();
    builder.arg(&x);
    builder.arg(&y);
    builder.arg(&n);
    builder.arg(&seed);
    builder.arg(&threshold);
    builder.arg(&scale);
    // SAFETY: the arguments match KILN_DROPOUT's signature in kernels.cu, in order and type
    // (T is the kernel's element type; size_t and unsigned long long are 64 bits); `x` and `y`
    // hold `n` elements.
    unsafe { builder.launch(config(n)) }.map_err(wrap)?;
    Ok(y)
}

/// The f32 elements behind a contiguous storage.
fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, f32>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("kiln-norm: the {what} is not contiguous")
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// `(rows, dim)` of a norm over the last dimension of `l`, the weight's length checked.
fn norm_dims(l: &Layout, w: &CudaView<'_, f32>) -> candle_core::Result<(usize, usize)> {
    let dim = l.dims().last().copied().unwrap_or(1);
    if dim == 0 || w.len() != dim || dim > i32::MAX as usize {
        candle_core::bail!(
            "kiln-norm: weight length {} for a last dimension of {dim}",
            w.len()
        )
    }
    let rows = l.shape().elem_count() / dim;
    if rows > i32::MAX as usize {
        candle_core::bail!("kiln-norm: {rows} rows is more than one launch takes")
    }
    Ok((rows, dim))
}

/// One block of `threads` per row.
fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// LayerNorm (`b` given: `(x - mean) / std · w + b`) or RMSNorm (`b` none: `x / rms · w`) of
/// contiguous f32 `x` over its last dimension: one kernel, a block per row.
pub(crate) fn norm_forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let device = x.0.device.clone();
    let xs = f32_view(x.0, x.1, "input")?;
    let ws = f32_view(w.0, w.1, "weight")?;
    let (rows, dim) = norm_dims(x.1, &ws)?;
    let bs = match b {
        Some((s, l)) => {
            let bs = f32_view(s, l, "shift")?;
            if bs.len() != dim {
                candle_core::bail!("kiln-norm: shift length {} for {dim}", bs.len())
            }
            Some(bs)
        }
        None => None,
    };
    // SAFETY: the kernel writes every element.
    let y = unsafe { device.alloc::<f32>(rows * dim)? };
    if rows > 0 {
        let kernel = func(&device, "kiln_norm_fwd_f32")?;
        let (dim_i, centered) = (dim as i32, i32::from(bs.is_some()));
        let mut builder = kernel.builder();
        builder.arg(&xs);
        builder.arg(&ws);
        // RMSNorm reads no shift; the weight stands in for the pointer.
        builder.arg(bs.as_ref().unwrap_or(&ws));
        builder.arg(&y);
        builder.arg(&dim_i);
        builder.arg(&eps);
        builder.arg(&centered);
        // SAFETY: kiln_norm_fwd_f32's signature (pointers to rows·dim, dim, dim floats and
        // rows·dim floats out; int, float, int); one block per row.
        unsafe { builder.launch(rows_config(rows, THREADS)) }.map_err(wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(y, device))
}

/// Rows per chunk of the weight gradients' partial sums.
const NORM_CHUNK: usize = 32;

/// The backward of [`norm_forward`] for contiguous f32 `x`, `w` and output gradient `dy`: one
/// buffer holding the input's gradient (`rows · dim`), then the weight's (`dim`), then, for
/// LayerNorm (`centered`), the shift's (`dim`). Four kernels: the input's gradient and each
/// row's statistics, the weight gradients' partial sums over chunks of rows, their total.
pub(crate) fn norm_backward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    eps: f32,
    centered: bool,
) -> candle_core::Result<CudaStorage> {
    let device = x.0.device.clone();
    let xs = f32_view(x.0, x.1, "input")?;
    let ws = f32_view(w.0, w.1, "weight")?;
    let gs = f32_view(dy.0, dy.1, "gradient")?;
    let (rows, dim) = norm_dims(x.1, &ws)?;
    if gs.len() != rows * dim {
        candle_core::bail!("kiln-norm: a gradient of {} for {rows}x{dim}", gs.len())
    }
    let params = if centered { 2 } else { 1 };
    if rows == 0 {
        let zeros = device.alloc_zeros::<f32>(params * dim)?;
        return Ok(CudaStorage::wrap_cuda_slice(zeros, device));
    }
    let chunks = rows.div_ceil(NORM_CHUNK);
    if chunks > 65_535 {
        candle_core::bail!("kiln-norm: {rows} rows is more than one launch takes")
    }
    let (dim_i, centered_i) = (dim as i32, i32::from(centered));
    // SAFETY: the kernels below write every element (the input's gradient row by row, the
    // weight's and shift's column by column).
    let out = unsafe { device.alloc::<f32>(rows * dim + params * dim)? };
    // SAFETY (the three allocations): the kernels below write every element before reading.
    let stats = unsafe { device.alloc::<f32>(2 * rows)? };
    let partial_dw = unsafe { device.alloc::<f32>(chunks * dim)? };
    let partial_db = unsafe { device.alloc::<f32>(if centered { chunks * dim } else { 1 })? };
    // The views of `out` end with this block, before it is handed over.
    {
        let dx = out.slice(0..rows * dim);
        let dw = out.slice(rows * dim..rows * dim + dim);
        // RMSNorm has no shift: the weight's gradient stands in for the pointer it never writes.
        let db = out.slice(rows * dim + (params - 1) * dim..rows * dim + params * dim);

        let kernel = func(&device, "kiln_norm_bwd_dx_f32")?;
        let mut builder = kernel.builder();
        builder.arg(&xs);
        builder.arg(&ws);
        builder.arg(&gs);
        builder.arg(&dx);
        builder.arg(&stats);
        builder.arg(&dim_i);
        builder.arg(&eps);
        builder.arg(&centered_i);
        // SAFETY: kiln_norm_bwd_dx_f32's signature; x, dy, dx hold rows·dim floats, w dim,
        // stats 2·rows; one block per row.
        unsafe { builder.launch(rows_config(rows, THREADS)) }.map_err(wrap)?;

        let column_blocks = dim.div_ceil(THREADS as usize) as u32;
        let (chunk_i, chunks_i) = (NORM_CHUNK as i32, chunks as i32);
        let kernel = func(&device, "kiln_norm_bwd_dw_partial_f32")?;
        let mut builder = kernel.builder();
        builder.arg(&xs);
        builder.arg(&gs);
        builder.arg(&stats);
        builder.arg(&partial_dw);
        builder.arg(&partial_db);
        builder.arg(&rows);
        builder.arg(&dim_i);
        builder.arg(&chunk_i);
        builder.arg(&centered_i);
        let cfg = LaunchConfig {
            grid_dim: (column_blocks, chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: kiln_norm_bwd_dw_partial_f32's signature; the partial buffers hold chunks·dim
        // floats (the shift's 1 for RMSNorm, which it does not write).
        unsafe { builder.launch(cfg) }.map_err(wrap)?;

        let kernel = func(&device, "kiln_norm_bwd_dw_final_f32")?;
        let mut builder = kernel.builder();
        builder.arg(&partial_dw);
        builder.arg(&partial_db);
        builder.arg(&dw);
        builder.arg(&db);
        builder.arg(&chunks_i);
        builder.arg(&dim_i);
        builder.arg(&centered_i);
        let cfg = LaunchConfig {
            grid_dim: (column_blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: kiln_norm_bwd_dw_final_f32's signature; dw and db are dim floats each (the
        // same for RMSNorm, whose db it does not write).
        unsafe { builder.launch(cfg) }.map_err(wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, device))
}

/// One block per row of `dim` elements: a multiple of 32 threads, no more than the row needs,
/// at most [`THREADS`].
fn softmax_config(rows: usize, dim: usize) -> LaunchConfig {
    rows_config(
        rows,
        (dim.div_ceil(32) * 32).clamp(32, THREADS as usize) as u32,
    )
}

/// `(rows, dim)` of a softmax over the last dimension of `l`.
fn softmax_dims(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let dim = l.dims().last().copied().unwrap_or(1);
    let rows = l.shape().elem_count().checked_div(dim).unwrap_or(0);
    if dim > i32::MAX as usize || rows > i32::MAX as usize {
        candle_core::bail!("kiln-softmax: {rows} rows of {dim} is more than one launch takes")
    }
    Ok((rows, dim))
}

/// Where a softmax's additive mask rows come from (see `kiln_softmax_fwd_f32`): the scores'
/// rows are `per_batch` per batch, their query cycling every `q` rows; the mask row of batch
/// `b` and query `i` is `b · batch_rows + i · query_rows` (0 where the mask is broadcast).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskRows {
    pub per_batch: usize,
    pub q: usize,
    pub batch_rows: usize,
    pub query_rows: usize,
}

/// `softmax(scale · x + mask)` over the last dimension of contiguous f32 `x`, the mask (f32,
/// contiguous, rows of the same width, placed by [`MaskRows`]) optional: one kernel, a block
/// per row.
pub(crate) fn softmax_forward(
    x: &CudaStorage,
    l: &Layout,
    scale: f32,
    mask: Option<(&CudaStorage, &Layout, MaskRows)>,
) -> candle_core::Result<CudaStorage> {
    let device = x.device.clone();
    let xs = f32_view(x, l, "input")?;
    let (rows, dim) = softmax_dims(l)?;
    let mut geometry = MaskRows {
        per_batch: rows.max(1),
        q: 1,
        batch_rows: 0,
        query_rows: 0,
    };
    let mut mask_view = None;
    if let Some((m, ml, g)) = mask {
        let view = f32_view(m, ml, "mask")?;
        // The last row any scores' row reads, inside the mask.
        let batches = rows.div_ceil(g.per_batch.max(1));
        let last = batches.saturating_sub(1) * g.batch_rows + (g.q.max(1) - 1) * g.query_rows;
        if g.per_batch == 0 || g.q == 0 || g.per_batch % g.q != 0 || (last + 1) * dim > view.len() {
            candle_core::bail!(
                "kiln-softmax: a mask of {} for {rows}x{dim} scores placed by {g:?}",
                view.len()
            )
        }
        geometry = g;
        mask_view = Some(view);
    }
    let too_big = |v: usize| v > i32::MAX as usize;
    if too_big(geometry.q) || too_big(geometry.query_rows) {
        candle_core::bail!("kiln-softmax: {geometry:?} is more than one launch takes")
    }
    // SAFETY: the kernel writes every element.
    let y = unsafe { device.alloc::<f32>(rows * dim)? };
    if rows > 0 {
        let kernel = func(&device, "kiln_softmax_fwd_f32")?;
        let dim_i = dim as i32;
        let null = 0u64;
        let per_batch = geometry.per_batch as i64;
        let q = geometry.q as i32;
        let batch_rows = geometry.batch_rows as i64;
        let query_rows = geometry.query_rows as i32;
        let mut builder = kernel.builder();
        builder.arg(&xs);
        builder.arg(&y);
        builder.arg(&dim_i);
        builder.arg(&scale);
        match &mask_view {
            Some(view) => builder.arg(view),
            None => builder.arg(&null),
        };
        builder.arg(&per_batch);
        builder.arg(&q);
        builder.arg(&batch_rows);
        builder.arg(&query_rows);
        // SAFETY: kiln_softmax_fwd_f32's signature (rows·dim floats in and out; int; float;
        // the mask's pointer, checked above to hold every row read, or null; long long, int,
        // long long, int).
        unsafe { builder.launch(softmax_config(rows, dim)) }.map_err(wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(y, device))
}

/// The softmax's input gradient from its output `y` and output gradient `dy` (contiguous
/// f32, the same shape): `y · (dy - Σ dy·y) · scale` per row, one kernel.
pub(crate) fn softmax_backward(
    y: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let device = y.0.device.clone();
    let ys = f32_view(y.0, y.1, "output")?;
    let gs = f32_view(dy.0, dy.1, "gradient")?;
    let (rows, dim) = softmax_dims(y.1)?;
    if gs.len() != rows * dim {
        candle_core::bail!("kiln-softmax: a gradient of {} for {rows}x{dim}", gs.len())
    }
    // SAFETY: the kernel writes every element.
    let dx = unsafe { device.alloc::<f32>(rows * dim)? };
    if rows > 0 {
        let kernel = func(&device, "kiln_softmax_bwd_f32")?;
        let dim_i = dim as i32;
        let mut builder = kernel.builder();
        builder.arg(&ys);
        builder.arg(&gs);
        builder.arg(&dx);
        builder.arg(&dim_i);
        builder.arg(&scale);
        // SAFETY: kiln_softmax_bwd_f32's signature (rows·dim floats: y, dy, dx; int; float).
        unsafe { builder.launch(softmax_config(rows, dim)) }.map_err(wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dx, device))
}

/// Rotary position embeddings of contiguous `x` `[.., t, d]` by the tables `cos` and `sin`
/// `[t, d / 2]` (contiguous, `x`'s dtype: f32, bf16 or f16): `sign` 1 rotates, -1 rotates
/// back (the backward). One kernel, a thread per pair of elements.
pub(crate) fn rope(
    x: (&CudaStorage, &Layout),
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
    sign: f32,
) -> candle_core::Result<CudaStorage> {
    let dims = x.1.dims();
    let (t, d) = match dims {
        [.., t, d] if d % 2 == 0 && *d > 0 && *t > 0 => (*t, *d),
        _ => candle_core::bail!("kiln-rope: an input of {dims:?}"),
    };
    let half = d / 2;
    for table in [cos.1, sin.1] {
        if table.dims() != [t, half] {
            candle_core::bail!("kiln-rope: a table of {:?} for {dims:?}", table.dims())
        }
    }
    if t > i32::MAX as usize || half > i32::MAX as usize {
        candle_core::bail!("kiln-rope: {dims:?} is more than one launch takes")
    }
    let device = x.0.device.clone();
    let pairs = x.1.shape().elem_count() / 2;
    macro_rules! run {
        ($variant:ident, $name:literal) => {{
            let (
                CudaStorageSlice::$variant(xd),
                CudaStorageSlice::$variant(cd),
                CudaStorageSlice::$variant(sd),
            ) = (&x.0.slice, &cos.0.slice, &sin.0.slice)
            else {
                candle_core::bail!("kiln-rope: the tables are not the input's dtype")
            };
            let (xs, cs, ss) = (
                contiguous(xd, x.1)?,
                contiguous(cd, cos.1)?,
                contiguous(sd, sin.1)?,
            );
            // SAFETY: the kernel writes every element.
            let y = unsafe { device.alloc(2 * pairs)? };
            if pairs > 0 {
                let kernel = func(&device, $name)?;
                let (t_i, half_i) = (t as i32, half as i32);
                let mut builder = kernel.builder();
                builder.arg(&xs);
                builder.arg(&cs);
                builder.arg(&ss);
                builder.arg(&y);
                builder.arg(&pairs);
                builder.arg(&t_i);
                builder.arg(&half_i);
                builder.arg(&sign);
                // SAFETY: KILN_ROPE's signature (x, cos, sin, y of the element type: x and y
                // hold 2·pairs elements, the tables t·half, checked above; size_t, int, int,
                // float).
                unsafe { builder.launch(config(pairs)) }.map_err(wrap)?;
            }
            CudaStorageSlice::$variant(y)
        }};
    }
    let slice = match &x.0.slice {
        CudaStorageSlice::F32(_) => run!(F32, "kiln_rope_f32"),
        CudaStorageSlice::BF16(_) => run!(BF16, "kiln_rope_bf16"),
        CudaStorageSlice::F16(_) => run!(F16, "kiln_rope_f16"),
        _ => candle_core::bail!("kiln-rope: {:?} is not f32, bf16 or f16", x.0.dtype()),
    };
    Ok(CudaStorage { slice, device })
}

/// The elements of a contiguous layout of `data`.
fn contiguous<'a, T>(data: &'a CudaSlice<T>, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("kiln: a kernel's input is not contiguous")
    };
    Ok(data.slice(start..end))
}

/// An element-wise kernel of `kernels.cu` over `inputs` (contiguous, `n` elements each, all
/// f32, bf16 or f16): `{base}_{f32,bf16,f16}` by their dtype, which takes the inputs'
/// pointers, then the output's (`outputs · n` elements of the same dtype), then `n`.
pub(crate) fn elementwise(
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    outputs: usize,
) -> candle_core::Result<CudaStorage> {
    let Some(&(first, _)) = inputs.first() else {
        candle_core::bail!("{base}: no input")
    };
    let device = first.device.clone();
    // The inputs' views as the variant's element type, and the launch for that type.
    macro_rules! run {
        ($variant:ident, $suffix:literal) => {{
            let mut views = Vec::with_capacity(inputs.len());
            for &(s, l) in inputs {
                let CudaStorageSlice::$variant(data) = &s.slice else {
                    candle_core::bail!("{base}: inputs of different dtypes")
                };
                views.push(contiguous(data, l)?);
            }
            let name = format!("{base}_{}", $suffix);
            CudaStorageSlice::$variant(launch_elementwise(&device, &name, &views, outputs)?)
        }};
    }
    let slice = match &first.slice {
        CudaStorageSlice::F32(_) => run!(F32, "f32"),
        CudaStorageSlice::BF16(_) => run!(BF16, "bf16"),
        CudaStorageSlice::F16(_) => run!(F16, "f16"),
        _ => candle_core::bail!("{base}: {:?} is not f32, bf16 or f16", first.dtype()),
    };
    Ok(CudaStorage { slice, device })
}

fn launch_elementwise<T: DeviceRepr>(
    device: &CudaDevice,
    name: &str,
    views: &[CudaView<'_, T>],
    outputs: usize,
) -> candle_core::Result<CudaSlice<T>> {
    let n = views.first().map_or(0, |v| v.len());
    if views.iter().any(|v| v.len() != n) {
        candle_core::bail!("{name}: inputs of different sizes")
    }
    // SAFETY: the kernel writes every element.
    let out = unsafe { device.alloc::<T>(outputs * n)? };
    if n > 0 {
        let kernel = func(device, name)?;
        let mut builder = kernel.builder();
        for v in views {
            builder.arg(v);
        }
        builder.arg(&out);
        builder.arg(&n);
        // SAFETY: the element-wise kernels' signatures: the inputs' pointers (n elements of
        // T each), the output's (outputs·n of T), size_t n.
        unsafe { builder.launch(config(n)) }.map_err(wrap)?;
    }
    Ok(out)
}
