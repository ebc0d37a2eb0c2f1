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
//! Convolutions with small weights (the early, wide stages) unfold a tile of output rows at a
//! time, each tile on one core into a buffer that stays in its cache, and multiply it there
//! ([`Unfold`]); at stride 1 their input gradient is the forward kernel run on the output
//! gradient with the kernel flipped. Large weights (the late stages) unfold whole images and
//! make one product over the batch. 3×3 stride-1 convolutions with at least 128 × 128
//! channels, over enough of the batch's pixels, take Winograd's F(2×2, 3×3) instead
//! ([`super::winograd`]): 2.25× fewer multiplications, forward and backward.
//!
//! Where the weights stay fixed (serving), [`PreparedWeight`] keeps them in the forms the
//! forward product reads, made once instead of on every pass.
//!
//! Activations are `[batch, height, width, channels]`: every per-channel operation is then over
//! the last (contiguous) dimension, the convolution's output is the GEMM's output as is, and
//! 1x1 stride-1 convolutions need no im2col at all. Weights keep PyTorch's layouts
//! (`[out, in, kh, kw]` for convolutions), so checkpoints load as they are.
//!
//! The kernels run on the CPU in f32. On other devices ResNet uses the `*_ops` versions
//! ([`conv2d_ops`], [`max_pool2d_ops`], [`batch_norm_ops`]): candle's convolution (with a
//! backward of kiln's: candle 0.9.2's gives wrong weight gradients on CUDA) and plain tensor
//! ops, which stay on the device. Called directly with inputs elsewhere, the kernels
//! move them to the CPU in f32 and the result back (correct, not fast).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{Mat, Threads};
use super::simd::wide_fn;
use super::winograd::Winograd;

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
        cols.par_chunks_mut(self.k())
            .enumerate()
            .for_each(|(r, row)| self.unfold_row(x, r / self.wo, r % self.wo, row));
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

    /// The weight `[cout, cin, kh, kw]` rearranged to `[k, cout]` in im2col's column order.
    fn pack_weight(&self, w: &[f32]) -> Vec<f32> {
        let (cin, khw, k) = (self.cin, self.kh * self.kw, self.k());
        // Row kk = (pos, ci) of the result reads w[co, ci, pos] for every co.
        gather((k, self.cout), w, |kk| (kk % cin) * khw + kk / cin, k)
    }

    /// The inverse of [`Self::pack_weight`]: `[k, cout]` back to `[cout, cin, kh, kw]`.
    fn unpack_weight(&self, wp: &[f32]) -> Vec<f32> {
        let (cin, cout, khw, k) = (self.cin, self.cout, self.kh * self.kw, self.k());
        // The transpose `[cout, (pos, ci)]`, then each row reordered to `(ci, pos)`.
        let t = gather((cout, k), wp, |co| co, cout);
        let mut w = vec![0f32; k * cout];
        w.par_chunks_mut(k)
            .zip(t.par_chunks(k))
            .for_each(|(row, trow)| {
                for (pos, tpos) in trow.chunks_exact(cin).enumerate() {
                    for (ci, &v) in tpos.iter().enumerate() {
                        row[ci * khw + pos] = v;
                    }
                }
            });
        w
    }

    /// Convolutions with small weights (the early, wide stages) are unfolded and multiplied a
    /// tile of output rows at a time, each tile on one core with its columns in that core's
    /// cache; large weights (the late stages) make one product of the whole batch instead,
    /// since a tile's product would pack the weight again for few rows.
    fn tiled(&self) -> bool {
        self.k() * self.cout <= TILED_WEIGHT_FLOATS
            && self.k() * MIN_WEIGHT_TILE_ROWS <= MAX_TILE_FLOATS
    }

    /// Output rows per tile: about [`TILE_FLOATS`] floats of columns.
    fn tile_rows(&self) -> usize {
        (TILE_FLOATS / self.k().max(1)).max(MIN_TILE_ROWS)
    }

    /// im2col of output rows `r0..` (numbered across the batch) into `cols: [n, k]`.
    fn im2col_rows(&self, x: &[f32], r0: usize, cols: &mut [f32]) {
        let (k, cin, rows) = (self.k(), self.cin, self.rows());
        let img = self.h * self.w * cin;
        for (i, row) in cols.chunks_mut(k).enumerate() {
            let (b, r) = ((r0 + i) / rows, (r0 + i) % rows);
            let x = &x[b * img..][..img];
            self.unfold_row(x, r / self.wo, r % self.wo, row);
        }
    }

    /// One im2col row: the `kh·kw·cin` inputs that output `(oy, ox)` of image `x` reads. The
    /// kernel offsets of one kernel row that fall inside the image read one contiguous run of
    /// `x`, copied at once; those in the padding are zeros.
    #[inline]
    fn unfold_row(&self, x: &[f32], oy: usize, ox: usize, row: &mut [f32]) {
        let (cin, kw) = (self.cin, self.kw);
        // Kernel columns kx0..kx1 land inside the image: 0 <= ox·stride + kx - pad < w.
        let left = ox * self.stride;
        let kx0 = self.pad.saturating_sub(left).min(kw);
        let kx1 = (self.w + self.pad).saturating_sub(left).clamp(kx0, kw);
        for (ky, dst) in row.chunks_mut(kw * cin).enumerate() {
            let iy = (oy * self.stride + ky).checked_sub(self.pad);
            match iy.filter(|&iy| iy < self.h) {
                Some(iy) if kx1 > kx0 => {
                    let ix0 = left + kx0 - self.pad;
                    dst[..kx0 * cin].fill(0.0);
                    dst[kx0 * cin..kx1 * cin]
                        .copy_from_slice(&x[(iy * self.w + ix0) * cin..][..(kx1 - kx0) * cin]);
                    dst[kx1 * cin..].fill(0.0);
                }
                _ => dst.fill(0.0),
            }
        }
    }

    /// `out [b·rows, cout] = im2col(x) · wp` in tiles of `t` rows (see [`Self::tiled`]).
    fn forward_tiled(
        &self,
        x: &[f32],
        wp: &[f32],
        out: &mut [f32],
        t: usize,
    ) -> candle_core::Result<()> {
        let (k, n) = (self.k(), self.cout);
        out.par_chunks_mut(t * n)
            .enumerate()
            .try_for_each(|(i, dst)| {
                let m = dst.len() / n;
                with_tile(m * k, |cols| {
                    self.im2col_rows(x, i * t, cols);
                    super::gemm::sgemm(
                        (m, n, k),
                        dst,
                        n,
                        Mat::rows(cols, k),
                        Mat::rows(wp, n),
                        1.0,
                        false,
                        Threads::One,
                    )
                })
            })
    }

    /// `dwp [k, cout] = im2col(x)ᵀ · g` in tiles of `t` rows: each core sums the tiles of its
    /// share of the rows into its own partial, and the partials are added.
    fn weight_grad_tiled(
        &self,
        x: &[f32],
        g: &[f32],
        dwp: &mut [f32],
        t: usize,
    ) -> candle_core::Result<()> {
        let (k, n) = (self.k(), self.cout);
        let total = self.b * self.rows();
        let parts = rayon::current_num_threads().clamp(1, total.div_ceil(t).max(1));
        let share = total.div_ceil(parts);
        let partials = (0..parts)
            .into_par_iter()
            .map(|p| {
                let (start, end) = (p * share, ((p + 1) * share).min(total));
                let mut dw = vec![0f32; k * n];
                for r0 in (start..end).step_by(t) {
                    let m = t.min(end - r0);
                    with_tile(m * k, |cols| {
                        self.im2col_rows(x, r0, cols);
                        super::gemm::sgemm(
                            (k, n, m),
                            &mut dw,
                            n,
                            Mat::transposed(cols, k),
                            Mat::rows(&g[r0 * n..][..m * n], n),
                            1.0,
                            r0 > start,
                            Threads::One,
                        )
                    })?;
                }
                Ok(dw)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        dwp.fill(0.0);
        for dw in &partials {
            for (d, s) in dwp.iter_mut().zip(dw) {
                *d += s;
            }
        }
        Ok(())
    }

    /// For a stride-1 convolution, the input gradient is itself a convolution: of the output
    /// gradient, with the kernel flipped in both axes and its two channel axes swapped, and
    /// padding `k - 1 - pad`. This is that convolution's geometry (None where it does not
    /// apply: strided, or a non-square kernel or padding beyond it).
    fn input_grad_geometry(&self) -> Option<Geom> {
        if self.stride != 1 || self.kh != self.kw || self.pad >= self.kh {
            return None;
        }
        Some(Geom {
            h: self.ho,
            w: self.wo,
            cin: self.cout,
            cout: self.cin,
            pad: self.kh - 1 - self.pad,
            ho: self.h,
            wo: self.w,
            ..*self
        })
    }

    /// The weight of [`Self::input_grad_geometry`]'s convolution, packed `[(ky, kx, co), ci]`.
    fn pack_flipped_weight(&self, w: &[f32]) -> Vec<f32> {
        let (cin, cout, khw) = (self.cin, self.cout, self.kh * self.kw);
        // Row (pos, co) reads w[co, ci, flipped pos] for every ci; the flipped position of
        // (ky, kx) is (kh-1-ky, kw-1-kx), i.e. khw-1-pos.
        gather(
            (khw * cout, cin),
            w,
            |r| (r % cout) * cin * khw + (khw - 1 - r / cout),
            khw,
        )
    }

    /// Images per im2col batch: as many as keep the column buffer within `limit` floats, so
    /// late stages (few output positions per image) still make one large GEMM.
    fn images_per_chunk(&self, limit: usize) -> usize {
        let per_image = (self.rows() * self.k()).max(1);
        (limit / per_image).clamp(1, self.b.max(1))
    }
}

/// A fresh row-major `[rows, cols]` matrix with element `(r, c)` = `src[base(r) + c · stride]`:
/// a weight rearrangement whose reads stride across the source. It is filled in blocks of
/// [`GATHER_BLOCK`]² so that the source lines a block reads are reused from cache, rows of
/// blocks in parallel.
fn gather(
    (rows, cols): (usize, usize),
    src: &[f32],
    base: impl Fn(usize) -> usize + Sync,
    stride: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(GATHER_BLOCK * cols)
        .enumerate()
        .for_each(|(i, block)| {
            let r0 = i * GATHER_BLOCK;
            for c0 in (0..cols).step_by(GATHER_BLOCK) {
                let c1 = (c0 + GATHER_BLOCK).min(cols);
                for (dr, row) in block.chunks_mut(cols).enumerate() {
                    let at = base(r0 + dr);
                    for (c, d) in (c0..c1).zip(&mut row[c0..c1]) {
                        *d = src[at + c * stride];
                    }
                }
            }
        });
    out
}

/// The side of [`gather`]'s blocks.
const GATHER_BLOCK: usize = 32;

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
    conv2d_with(x, weight, stride, padding, Unfold::Auto)
}

/// The im2col buffer whole-batch unfolding allows itself, in floats (64 MiB).
pub const DEFAULT_COLUMN_FLOATS: usize = 16 << 20;

/// How a convolution unfolds its input into im2col columns. Every choice computes the same
/// result; [`conv2d`] takes [`Unfold::Auto`], and tests force each path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfold {
    /// Tiles for small weights (the early, wide stages), whole batches for large ones.
    Auto,
    /// Tiles of this many output rows, numbered across the batch (a tile may span images).
    Tiles(usize),
    /// Groups of whole images whose columns fit this many floats (at least one image).
    Batches(usize),
    /// Winograd's F(2×2, 3×3) wherever it applies (3×3 kernels at stride 1 and padding 1),
    /// [`Unfold::Im2col`] elsewhere.
    Winograd,
    /// [`Unfold::Auto`]'s choice between tiles and whole batches, never Winograd's form.
    Im2col,
}

/// [`Unfold::Auto`] takes Winograd's form for 3×3 stride-1 convolutions with at least this
/// many channel pairs (`cin · cout`). Below it (ResNet's first stage, 64 × 64), the products
/// are too short to make up for the transforms, which read and write four times the
/// activations; the tiled im2col path keeps its columns in cache instead.
const WINOGRAD_MIN_CHANNEL_PAIRS: usize = 128 * 128;

/// [`Unfold::Auto`] takes Winograd's form only with at least one 2×2 output tile (across the
/// batch) per this many channel pairs. Its transformed kernel is 16/9 of the weight; with few
/// tiles the product is bound by reading the kernel rather than by multiplying, and im2col's
/// smaller one wins. Measured (`conv_shapes_timing`, weights prepared, 2-core Xeon): ResNet-18's
/// last stage (7×7, 512 × 512 channels, 16 tiles an image) took 1.9 ms in Winograd's form
/// against 1.1 ms for im2col at batch 1 and 5.3 against 3.5 ms at batch 4, but 10.6 against
/// 13.1 ms at batch 16; the stage before (14×14, 256 × 256) was ahead from batch 1.
const WINOGRAD_CHANNEL_PAIRS_PER_TILE: usize = 2048;

/// Floats of im2col columns in one tile (512 KiB: within a core's L2 cache).
const TILE_FLOATS: usize = 1 << 17;

/// The fewest output rows a tile holds (so a tile's product amortises packing the weight).
const MIN_TILE_ROWS: usize = 64;

/// The fewest output rows a weight-gradient tile holds.
const MIN_WEIGHT_TILE_ROWS: usize = 256;

/// Convolutions whose weight has at most this many floats (4 MiB) run in tiles. Above it
/// (ResNet-18's last stage), each tile's product would pack the whole weight again for few
/// rows, and one product over the whole batch is faster.
const TILED_WEIGHT_FLOATS: usize = 1 << 20;

/// The largest tile [`Unfold::Auto`] makes, in floats (4 MiB, kept by each thread): a kernel
/// whose columns are too long for it unfolds whole images instead.
const MAX_TILE_FLOATS: usize = 1 << 20;

thread_local! {
    /// Each thread's im2col tile, kept between calls.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's tile buffer, `len` floats long (contents unspecified). `f` must
/// not enter rayon (another task on this thread would find the buffer borrowed).
fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    TILE.with(|tile| {
        let mut tile = tile.borrow_mut();
        if tile.len() < len {
            tile.resize(len, 0.0);
        }
        f(&mut tile[..len])
    })
}

/// [`conv2d`] with a chosen way of unfolding the input.
pub fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    unfold: Unfold,
) -> candle_core::Result<Tensor> {
    let op = Conv2dNhwc {
        stride,
        padding,
        unfold,
        prepared: None,
    };
    op.apply(x, weight)
}

/// A convolution's weight in the forms [`conv2d`]'s forward product reads it: the `[k, cout]`
/// im2col packing, and Winograd's transformed kernel where [`Unfold::Auto`] may take that form.
/// [`conv2d`] makes them again on every call, as training must (the weight changes each step);
/// a model whose weights stay fixed (serving) makes them once. At batch 1 remaking them was a
/// third of ResNet-18's inference.
#[derive(Debug)]
pub struct PreparedWeight {
    /// The weight's dims `[cout, cin, kh, kw]`, stride and padding it was made for.
    dims: Vec<usize>,
    stride: usize,
    padding: usize,
    packed: Vec<f32>,
    winograd: Option<Vec<f32>>,
}

impl PreparedWeight {
    /// `weight` (`[cout, cin, kh, kw]`, f32 on the CPU) prepared for [`conv2d_prepared`] at
    /// this stride and padding; None on any other device or dtype (there [`conv2d`] moves the
    /// operands to the CPU anyway).
    pub fn new(
        weight: &Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Option<std::sync::Arc<PreparedWeight>>> {
        if !weight.device().is_cpu() || weight.dtype() != DType::F32 {
            return Ok(None);
        }
        let dims = weight.dims().to_vec();
        let &[_, cin, kh, kw] = dims.as_slice() else {
            candle_core::bail!("conv2d: weight {dims:?} must be [o, i, kh, kw]")
        };
        // The forms depend on the weight alone: any input the kernel fits will do.
        let x = [1, kh, kw, cin];
        let w = weight.flatten_all()?.to_vec1::<f32>()?;
        let winograd = Winograd::new(&x, &dims, stride, padding)
            .filter(|wg| wg.channel_pairs() >= WINOGRAD_MIN_CHANNEL_PAIRS)
            .map(|wg| wg.transform_weight(&w, false));
        Ok(Some(std::sync::Arc::new(PreparedWeight {
            packed: Geom::new(&x, &dims, stride, padding)?.pack_weight(&w),
            winograd,
            dims,
            stride,
            padding,
        })))
    }

    /// The memory it takes.
    pub fn bytes(&self) -> u64 {
        let floats = self.packed.len() + self.winograd.as_ref().map_or(0, Vec::len);
        (floats * std::mem::size_of::<f32>()) as u64
    }
}

/// [`conv2d`] reading the weight's [`PreparedWeight`] instead of preparing it again. For a
/// weight that has not changed since `prepared` was made from it (gradients, to `x` and to
/// `weight`, come out right: they are computed from `weight` itself).
pub fn conv2d_prepared(
    x: &Tensor,
    weight: &Tensor,
    prepared: &std::sync::Arc<PreparedWeight>,
) -> candle_core::Result<Tensor> {
    conv2d_prepared_with(x, weight, prepared, Unfold::Auto)
}

/// [`conv2d_prepared`] with a chosen way of unfolding the input (a form `prepared` lacks is
/// made on the spot).
pub fn conv2d_prepared_with(
    x: &Tensor,
    weight: &Tensor,
    prepared: &std::sync::Arc<PreparedWeight>,
    unfold: Unfold,
) -> candle_core::Result<Tensor> {
    let op = Conv2dNhwc {
        stride: prepared.stride,
        padding: prepared.padding,
        unfold,
        prepared: Some(prepared.clone()),
    };
    op.apply(x, weight)
}

/// The convolution kernel behind [`conv2d`].
struct Conv2dNhwc {
    stride: usize,
    padding: usize,
    unfold: Unfold,
    /// The weight in the form the forward product reads, made beforehand.
    prepared: Option<std::sync::Arc<PreparedWeight>>,
}

impl Conv2dNhwc {
    /// The convolution of `x` with `weight` (on the CPU in f32; see [`on_cpu_f32`]).
    fn apply(self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        on_cpu_f32(&[x, weight], |t| {
            t[0].contiguous()?.apply_op2(&t[1].contiguous()?, self)
        })
    }

    /// The prepared form `form` picks (checked against the weight's dims), or else `make`'s.
    fn prepared_or<'a>(
        &'a self,
        w: &[usize],
        form: impl FnOnce(&'a PreparedWeight) -> Option<&'a Vec<f32>>,
        make: impl FnOnce() -> Vec<f32>,
    ) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
        if let Some(p) = &self.prepared {
            if p.dims != w {
                candle_core::bail!("conv2d: weight {w:?} was prepared as {:?}", p.dims)
            }
            if let Some(data) = form(p) {
                return Ok(std::borrow::Cow::Borrowed(data));
            }
        }
        Ok(std::borrow::Cow::Owned(make()))
    }

    /// The convolution's Winograd form, where it applies and is chosen.
    fn winograd(&self, x: &[usize], w: &[usize]) -> Option<Winograd> {
        let wg = Winograd::new(x, w, self.stride, self.padding)?;
        match self.unfold {
            Unfold::Winograd => Some(wg),
            Unfold::Auto => (wg.channel_pairs() >= WINOGRAD_MIN_CHANNEL_PAIRS
                && wg.tiles() * WINOGRAD_CHANNEL_PAIRS_PER_TILE >= wg.channel_pairs())
            .then_some(wg),
            Unfold::Tiles(_) | Unfold::Batches(_) | Unfold::Im2col => None,
        }
    }

    /// Output rows per tile of the product and of the weight gradient, or None to unfold whole
    /// images (always for a pointwise convolution, which needs no columns).
    fn tiles(&self, g: &Geom) -> Option<(usize, usize)> {
        match self.unfold {
            _ if g.pointwise() => None,
            Unfold::Auto | Unfold::Im2col | Unfold::Winograd => g.tiled().then(|| {
                let t = g.tile_rows();
                // Each weight-gradient tile reads and writes the whole partial gradient:
                // longer tiles keep that small beside the product.
                (t, t.max(MIN_WEIGHT_TILE_ROWS))
            }),
            Unfold::Tiles(t) => Some((t.max(1), t.max(1))),
            Unfold::Batches(_) => None,
        }
    }

    /// The bound on whole-batch columns, in floats.
    fn column_floats(&self) -> usize {
        match self.unfold {
            Unfold::Batches(floats) => floats,
            _ => DEFAULT_COLUMN_FLOATS,
        }
    }
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
        if let Some(wg) = self.winograd(l1.dims(), l2.dims()) {
            let u = self.prepared_or(
                l2.dims(),
                |p| p.winograd.as_ref(),
                || wg.transform_weight(w, false),
            )?;
            let out = wg.forward(x, &u)?;
            return Ok((CpuStorage::F32(out), Shape::from((g.b, g.ho, g.wo, g.cout))));
        }
        let wp = self.prepared_or(l2.dims(), |p| Some(&p.packed), || g.pack_weight(w))?;
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
        } else if let Some((t, _)) = self.tiles(&g) {
            g.forward_tiled(x, &wp, &mut out, t)?;
        } else {
            let img = g.h * g.w * g.cin;
            let per = g.images_per_chunk(self.column_floats());
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
        let dev = x.device();
        if let Some(wg) = self.winograd(x.dims(), w.dims()) {
            let name = self.name();
            let (dx, du) = with_f32(x, name, |xs| {
                with_f32(w, name, |ws| {
                    with_f32(grad, name, |gs| wg.backward(xs, ws, gs, want_dx, want_dw))
                })
            })?;
            let dx = want_dx
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?;
            let dw = want_dw
                .then(|| Tensor::from_vec(wg.weight_gradient(&du), w.shape(), dev))
                .transpose()?;
            return Ok((dx, dw));
        }
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
                            let wp = g.pack_weight(ws);
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
                    // Tiled convolutions take their gradients tile by tile when both can be
                    // (the input's only at stride 1). Otherwise both go through whole-batch
                    // columns below, which serve the weight's and the input's gradients at
                    // once (measured faster than tiles for one and columns for the other).
                    let flipped = g.input_grad_geometry();
                    let tiles = self.tiles(&g).filter(|_| !want_dx || flipped.is_some());
                    if let Some((t, tw)) = tiles {
                        if want_dw {
                            g.weight_grad_tiled(xs, gs, &mut dwp, tw)?;
                        }
                        if let Some(flipped) = flipped.filter(|_| want_dx) {
                            flipped.forward_tiled(gs, &g.pack_flipped_weight(ws), &mut dx, t)?;
                        }
                        return Ok(());
                    }
                    if !want_dw && !want_dx {
                        return Ok(());
                    }
                    let wp = if want_dx {
                        g.pack_weight(ws)
                    } else {
                        Vec::new()
                    };
                    let per = g.images_per_chunk(self.column_floats());
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
        let dx = want_dx
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let dw = want_dw
            .then(|| Tensor::from_vec(g.unpack_weight(&dwp), w.shape(), dev))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// [`conv2d`] as candle's own convolution (channels-first; the backward is `DeviceConv`'s,
/// not candle's), for devices the kernels here do not run on: on a GPU it keeps the
/// activations there instead of moving them through host memory. `x: [b, h, w, cin]` (any
/// float dtype; the weight is cast to it), `weight: [cout, cin, kh, kw]`; returns
/// `[b, ho, wo, cout]`.
pub fn conv2d_ops(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?;
    let (_, h, wd, _) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        candle_core::bail!("conv2d: kernel {kh}x{kw} does not fit {h}x{wd} (padding {padding})")
    }
    let x = x.permute((0, 3, 1, 2))?.contiguous()?;
    let leftover = !(h + 2 * padding - kh).is_multiple_of(stride)
        || !(wd + 2 * padding - kw).is_multiple_of(stride);
    let (x, padding) = if leftover {
        // Rows or columns past the last window: a transposed convolution (the input
        // gradient) would give a gradient of the wrong size. Padded here and cut to the
        // windows' extent instead, the convolution has none (the gradient of the cut is zero
        // there).
        let extent = |n: usize, k: usize| (n + 2 * padding - k) / stride * stride + k;
        let x = x
            .pad_with_zeros(2, padding, padding)?
            .narrow(2, 0, extent(h, kh))?
            .pad_with_zeros(3, padding, padding)?
            .narrow(3, 0, extent(wd, kw))?;
        (x, 0)
    } else {
        (x, padding)
    };
    // candle computes the forward; its result then passes through `DeviceConv`, whose
    // backward replaces candle's (see there). Without gradients to take it is candle's alone.
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    let y = if x.track_op() || w.track_op() {
        x.apply_op3(&w, &y, DeviceConv { padding, stride })?
    } else {
        y
    };
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// The gradients of candle's convolution (channels-first, dilation 1, one group), for
/// [`conv2d_ops`]: `(x, w, y)` → `y`, a copy of the forward candle computed, with a backward
/// that takes the weight gradient from a contiguous copy of the output gradient.
///
/// candle 0.9.2's own backward computes the weight gradient as a convolution whose kernel is
/// the output gradient with batch and channels swapped (a strided view), and its CUDA
/// convolution (built without cuDNN, as kiln's is) copies a strided kernel to a contiguous
/// buffer, then multiplies by the original storage instead (candle issue #3893, fixed after
/// 0.9.2). Every convolution weight's gradient on a GPU would be silently wrong: the CPU's
/// convolution multiplies the copy, so no CPU test shows it. This backward hands candle's
/// convolution only contiguous kernels.
struct DeviceConv {
    padding: usize,
    stride: usize,
}

impl DeviceConv {
    /// `y`'s storage as it is: the convolution's output is a fresh contiguous buffer.
    fn whole(layout: &Layout) -> candle_core::Result<()> {
        if layout.is_contiguous() && layout.start_offset() == 0 {
            Ok(())
        } else {
            candle_core::bail!("kiln-device-conv2d: the convolution's output is not a whole buffer")
        }
    }
}

impl CustomOp3 for DeviceConv {
    fn name(&self) -> &'static str {
        "kiln-device-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Self::whole(yl)?;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Self::whole(yl)?;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (padding, stride) = (self.padding, self.stride);
        let grad = grad.contiguous()?;
        let (_, _, kh, kw) = w.dims4()?;
        let (_, _, gh, gw) = grad.dims4()?;
        let (_, _, h, wd) = x.dims4()?;
        // The transposed convolution's output size, before its extra rows and columns.
        let size = |g: usize, k: usize| ((g - 1) * stride + k).checked_sub(2 * padding);
        let extra = |n: usize, g: usize, k: usize| size(g, k).and_then(|s| n.checked_sub(s));
        let out_padding = match (extra(h, gh, kh), extra(wd, gw, kw)) {
            (Some(a), Some(b)) if a == b && a < stride.max(1) => a,
            _ => candle_core::bail!(
                "kiln-device-conv2d: no transposed convolution gives the input's {h}x{wd}"
            ),
        };
        // Only the gradients something needs (candle's own backward computes both: an
        // image's, or a frozen layer's weight's, for nothing).
        let dx = if x.track_op() {
            Some(grad.conv_transpose2d(w, padding, out_padding, stride, 1)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // The input (batch as channels) convolved with the output gradient (batch as
            // channels, made contiguous), dilated by the stride.
            let kernel = grad.transpose(0, 1)?.contiguous()?;
            let dw = x
                .transpose(0, 1)?
                .conv2d(&kernel, padding, 1, stride, 1)?
                .transpose(0, 1)?;
            let (_, _, dh, dwd) = dw.dims4()?;
            Some(if dh != kh || dwd != kw {
                dw.narrow(2, 0, kh)?.narrow(3, 0, kw)?
            } else {
                dw
            })
        } else {
            None
        };
        Ok((dx, dw, None))
    }
}

/// [`max_pool2d`] as candle ops (the device path; candle's own max-pool has a wrong backward
/// for overlapping windows): the maximum of the `kernel²` strided views of `x` padded with a
/// large negative value. Its backward splits a gradient evenly between tied maxima, where
/// [`max_pool2d`]'s sends it to the first.
pub fn max_pool2d_ops(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let g = MaxPool::new(kernel, stride, padding)?.geom(x.dims())?;
    let (b, h, w, c, ho, wo) = (g.b, g.h, g.w, g.cin, g.ho, g.wo);
    // Padded so that every view `offset + stride · i` (i < ho) exists, as rows of `stride`.
    let (hp, wp) = (kernel - 1 + stride * ho, kernel - 1 + stride * wo);
    let fill = |dims: (usize, usize, usize, usize)| {
        Tensor::full(-1e30f32, dims, x.device())?.to_dtype(x.dtype())
    };
    let pad_axis = |t: &Tensor, axis: usize, before: usize, after: usize| {
        let mut parts = Vec::with_capacity(3);
        let mut dims = t.dims4()?;
        if before > 0 {
            match axis {
                1 => dims.1 = before,
                _ => dims.2 = before,
            }
            parts.push(fill(dims)?);
        }
        parts.push(t.clone());
        if after > 0 {
            match axis {
                1 => dims.1 = after,
                _ => dims.2 = after,
            }
            parts.push(fill(dims)?);
        }
        Tensor::cat(&parts, axis)
    };
    let x = pad_axis(x, 1, padding, hp.saturating_sub(h + padding))?;
    let x = pad_axis(&x, 2, padding, wp.saturating_sub(w + padding))?;
    let mut out: Option<Tensor> = None;
    for dy in 0..kernel {
        let rows = x
            .narrow(1, dy, stride * ho)?
            .reshape((b, ho, stride, wp, c))?
            .narrow(2, 0, 1)?
            .reshape((b, ho, wp, c))?;
        for dx in 0..kernel {
            let view = rows
                .narrow(2, dx, stride * wo)?
                .reshape((b, ho, wo, stride, c))?
                .narrow(3, 0, 1)?
                .reshape((b, ho, wo, c))?;
            out = Some(match out {
                Some(m) => m.maximum(&view)?,
                None => view,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("max-pool: empty kernel".into()))
}

/// BatchNorm over the last dimension as candle ops (the device path of [`batch_norm`] and
/// [`batch_norm_add_relu`]): `(x - mean) / sqrt(var + eps) · weight + bias`, then
/// `relu(· + residual)` with a residual, else ReLU when `relu`. `mean` and `var` are `[c]`
/// tensors: the batch's own (computed from `x` with ops, so gradients flow through them) or
/// the running statistics. Computed in f32, returned in `x`'s dtype.
pub fn batch_norm_ops(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (mean, var): (&Tensor, &Tensor),
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let scale = f32(weight)?.broadcast_div(&(f32(var)? + eps)?.sqrt()?)?;
    let y = f32(x)?
        .broadcast_sub(&f32(mean)?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&f32(bias)?)?;
    let y = match residual {
        Some(r) => (y + f32(r)?)?.relu()?,
        None if relu => y.relu()?,
        None => y,
    };
    y.to_dtype(x.dtype())
}

/// Per-channel mean and biased variance `[c]` of `x: [.., c]` as candle ops, in f32 (the
/// device path's [`channel_stats`]; differentiable).
pub fn channel_stats_ops(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let c = x.dims().last().copied().unwrap_or(1).max(1);
    let flat = x.to_dtype(DType::F32)?.reshape(((), c))?;
    let mean = flat.mean(0)?;
    let var = flat.broadcast_sub(&mean)?.sqr()?.mean(0)?;
    Ok((mean, var))
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
            .map(|part| channel_sums(part, &shift))
            .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
        let n = rows as f64;
        let mean = (0..c).map(|i| shift[i] as f64 + s[i] / n).collect();
        let var = (0..c)
            .map(|i| (ss[i] / n - (s[i] / n) * (s[i] / n)).max(0.0))
            .collect();
        Ok((mean, var))
    })
}

wide_fn! {
    /// Per-channel sums and sums of squares of `part`'s rows (`shift.len()` channels),
    /// shifted by `shift`, in f64.
    fn channel_sums(part: &[f32], shift: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let c = shift.len().max(1);
        let mut s = vec![0f64; c];
        let mut ss = vec![0f64; c];
        for row in part.chunks_exact(c) {
            for (((s, ss), &v), &m) in s.iter_mut().zip(ss.iter_mut()).zip(row).zip(shift) {
                let d = (v - m) as f64;
                *s += d;
                *ss += d * d;
            }
        }
        (s, ss)
    }
}

wide_fn! {
    /// BatchNorm's forward for a chunk of rows: `y = x · scale + shift` per channel, then the
    /// fused ReLU.
    fn bn_forward_chunk(yo: &mut [f32], xi: &[f32], scale: &[f32], shift: &[f32], relu: bool) {
        let c = scale.len().max(1);
        for (yr, xr) in yo.chunks_exact_mut(c).zip(xi.chunks_exact(c)) {
            for (((y, &x), &a), &b) in yr.iter_mut().zip(xr).zip(scale).zip(shift) {
                let v = x * a + b;
                *y = if relu { v.max(0.0) } else { v };
            }
        }
    }
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

/// Per-channel `Σ g` and `Σ g · x̂` of a BatchNorm backward (the bias's and weight's
/// gradients).
type ChannelSums = (Vec<f64>, Vec<f64>);

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
    let op = BatchNormOp::new(x, weight, bias, stats)?;
    on_cpu_f32(&[x, weight, bias], |t| {
        t[0].contiguous()?
            .apply_op3_arc(&t[1], &t[2], std::sync::Arc::new(Box::new(op)))
    })
}

/// `relu(batch_norm(x) + residual)`: a residual block's last BatchNorm, the shortcut's add and
/// the ReLU as one op, with the same statistics and gradients as [`batch_norm`] (`stats.relu`
/// is implied). As three ops, the graph kept three activation tensors per block for the
/// backward (BatchNorm's output, the sum, the ReLU's output); this keeps one. The backward is
/// BatchNorm's, gated by the output, and the residual's gradient is the gated output
/// gradient. ResNet-18 at batch 16: peak memory 1221 → 1073 MiB; the step time is the same
/// within this machine's noise.
pub fn batch_norm_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    stats: &BatchNormStats,
) -> candle_core::Result<Tensor> {
    if residual.dims() != x.dims() {
        candle_core::bail!(
            "batch-norm-add-relu: residual {:?} for input {:?}",
            residual.dims(),
            x.dims()
        )
    }
    let op = BatchNormOp::new(x, weight, bias, stats)?;
    // The weight and bias as one `[2, c]` input (a custom op takes three tensors).
    let wb = Tensor::stack(&[weight, bias], 0)?;
    on_cpu_f32(&[x, &wb, residual], |t| {
        t[0].contiguous()?.apply_op3_arc(
            &t[1],
            &t[2].contiguous()?,
            std::sync::Arc::new(Box::new(BatchNormAddRelu(op))),
        )
    })
}

/// The kernel behind [`batch_norm_add_relu`]; inputs `(x, [weight; bias], residual)`.
struct BatchNormAddRelu(BatchNormOp);

impl CustomOp3 for BatchNormAddRelu {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-add-relu"
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
        let wb = cpu_f32(s2, l2, self.name())?;
        let r = cpu_f32(s3, l3, self.name())?;
        let c = self.0.mean.len();
        if c == 0 || wb.len() != 2 * c || r.len() != x.len() {
            candle_core::bail!("batch-norm-add-relu: weight/bias do not have {c} channels")
        }
        let (scale, shift) = self.0.scale_shift(&wb[..c], &wb[c..]);
        let mut out = super::gemm::zeroed(x.len());
        out.par_chunks_mut(c * 64)
            .zip(x.par_chunks(c * 64).zip(r.par_chunks(c * 64)))
            .for_each(|(yo, (xi, ri))| bn_add_relu_chunk(yo, xi, ri, &scale, &shift));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.0.mean.len();
        let name = self.name();
        let (want_dx, want_wb, want_r) = (x.track_op(), wb.track_op(), r.track_op());
        let (dx, (sum_g, sum_gx)) = with_f32(wb, name, |wbs| {
            self.0.backward(x, &wbs[..c], res, grad, true, want_dx)
        })?;
        let dev = x.device();
        let dx = want_dx
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let dwb = want_wb
            .then(|| {
                let v: Vec<f32> = sum_gx.iter().chain(&sum_g).map(|&s| s as f32).collect();
                Tensor::from_vec(v, (2, c), dev)
            })
            .transpose()?;
        let dr = if want_r {
            let dr = with_f32(res, name, |ys| {
                with_f32(grad, name, |gs| {
                    let mut dr = super::gemm::zeroed(gs.len());
                    dr.par_chunks_mut(c * 64)
                        .zip(gs.par_chunks(c * 64).zip(ys.par_chunks(c * 64)))
                        .for_each(|(d, (g, y))| relu_gate(d, g, y));
                    Ok(dr)
                })
            })?;
            Some(Tensor::from_vec(dr, r.shape(), dev)?)
        } else {
            None
        };
        Ok((dx, dwb, dr))
    }
}

wide_fn! {
    /// `y = max(x · scale + shift + r, 0)` per channel, for a chunk of rows.
    fn bn_add_relu_chunk(yo: &mut [f32], xi: &[f32], ri: &[f32], scale: &[f32], shift: &[f32]) {
        let c = scale.len().max(1);
        let rows = yo.chunks_exact_mut(c).zip(xi.chunks_exact(c).zip(ri.chunks_exact(c)));
        for (yr, (xr, rr)) in rows {
            let (yr, xr, rr, scale, shift) = (&mut yr[..c], &xr[..c], &rr[..c], &scale[..c], &shift[..c]);
            for ch in 0..c {
                yr[ch] = (xr[ch] * scale[ch] + shift[ch] + rr[ch]).max(0.0);
            }
        }
    }
}

wide_fn! {
    /// `d = g` where the ReLU's output `y` is positive, else 0.
    fn relu_gate(d: &mut [f32], g: &[f32], y: &[f32]) {
        for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
            *d = if y > 0.0 { g } else { 0.0 };
        }
    }
}

/// The BatchNorm kernel behind [`batch_norm`]; inputs `(x, weight, bias)`.
struct BatchNormOp {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    batch_stats: bool,
    relu: bool,
}

impl BatchNormOp {
    /// The op for `x: [.., c]` with these statistics, after checking the shapes.
    fn new(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        stats: &BatchNormStats,
    ) -> candle_core::Result<Self> {
        let BatchNormStats {
            mean,
            var,
            eps,
            batch_stats,
            relu,
        } = stats;
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
        Ok(BatchNormOp {
            mean: mean.iter().map(|&m| m as f32).collect(),
            rstd: var
                .iter()
                .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
                .collect(),
            batch_stats: *batch_stats,
            relu: *relu,
        })
    }

    /// Per-channel `scale = rstd · weight` and `shift = bias - mean · scale`.
    fn scale_shift(&self, w: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let c = self.mean.len();
        let scale: Vec<f32> = (0..c).map(|i| self.rstd[i] * w[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| b[i] - self.mean[i] * scale[i]).collect();
        (scale, shift)
    }

    /// The input gradient (when `want_dx`, else empty) and the per-channel sums `Σ g` and
    /// `Σ g · x̂` (the bias's and weight's gradients), for weight values `ws`, the op's output
    /// `res` and its gradient `grad`; `relu` gates the gradient where the output is not
    /// positive.
    fn backward(
        &self,
        x: &Tensor,
        ws: &[f32],
        res: &Tensor,
        grad: &Tensor,
        relu: bool,
        want_dx: bool,
    ) -> candle_core::Result<(Vec<f32>, ChannelSums)> {
        let c = self.mean.len();
        let name = self.name();
        let n = x.elem_count();
        let rows = (n / c.max(1)) as f32;
        let mut dx = if want_dx {
            super::gemm::zeroed(n)
        } else {
            Vec::new()
        };
        let (mean, rstd) = (&self.mean, &self.rstd);
        let sums = with_f32(x, name, |xs| {
            with_f32(res, name, |ys| {
                with_f32(grad, name, |gs| {
                    let chunk = row_chunk(xs.len() / c) * c;
                    let sums = xs
                        .par_chunks(chunk)
                        .zip(gs.par_chunks(chunk))
                        .zip(ys.par_chunks(chunk))
                        .map(|((xp, gp), yp)| bn_grad_sums(xp, gp, yp, mean, rstd, relu))
                        .reduce(|| (vec![0f64; c], vec![0f64; c]), add_pairs);
                    if want_dx {
                        let (sum_g, sum_gx) = &sums;
                        let mg: Vec<f32> = sum_g.iter().map(|&s| s as f32 / rows).collect();
                        let mgx: Vec<f32> = sum_gx.iter().map(|&s| s as f32 / rows).collect();
                        let k: Vec<f32> = (0..c).map(|i| ws[i] * rstd[i]).collect();
                        let batch = self.batch_stats.then_some((&mg[..], &mgx[..]));
                        dx.par_chunks_mut(chunk)
                            .zip(xs.par_chunks(chunk))
                            .zip(gs.par_chunks(chunk).zip(ys.par_chunks(chunk)))
                            .for_each(|((dp, xp), (gp, yp))| {
                                bn_input_grad(dp, xp, gp, yp, mean, rstd, &k, batch, relu)
                            });
                    }
                    Ok(sums)
                })
            })
        })?;
        Ok((dx, sums))
    }
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
        let (scale, shift) = self.scale_shift(w, b);
        let mut out = super::gemm::zeroed(x.len());
        let relu = self.relu;
        out.par_chunks_mut(c * 64)
            .zip(x.par_chunks(c * 64))
            .for_each(|(yo, xi)| bn_forward_chunk(yo, xi, &scale, &shift, relu));
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
        let (dx, sums) = with_f32(w, name, |ws| {
            self.backward(x, ws, res, grad, self.relu, want_dx)
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

/// Rows of a chunk summed in f32 before being added to the f64 totals.
const F32_SUM_ROWS: usize = 32;

wide_fn! {
    /// BatchNorm backward's per-channel sums over the rows of a chunk: `Σ g` and `Σ g · x̂`, with
    /// `g` the output gradient (zero where the fused ReLU cut the output `y`) and
    /// `x̂ = (x - mean) · rstd`. Blocks of rows are summed in f32 (vectorised), then into f64.
    fn bn_grad_sums(
        x: &[f32],
        g: &[f32],
        y: &[f32],
        mean: &[f32],
        rstd: &[f32],
        relu: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let c = mean.len();
        let (mut sg, mut sgx) = (vec![0f64; c], vec![0f64; c]);
        let (mut bg, mut bgx) = (vec![0f32; c], vec![0f32; c]);
        let block = F32_SUM_ROWS * c;
        for ((xb, gb), yb) in x.chunks(block).zip(g.chunks(block)).zip(y.chunks(block)) {
            bg.fill(0.0);
            bgx.fill(0.0);
            for ((xr, gr), yr) in xb
                .chunks_exact(c)
                .zip(gb.chunks_exact(c))
                .zip(yb.chunks_exact(c))
            {
                let (bg, bgx, mean, rstd) = (&mut bg[..c], &mut bgx[..c], &mean[..c], &rstd[..c]);
                let (xr, gr, yr) = (&xr[..c], &gr[..c], &yr[..c]);
                for ch in 0..c {
                    let gv = if relu && yr[ch] <= 0.0 { 0.0 } else { gr[ch] };
                    bg[ch] += gv;
                    bgx[ch] += gv * ((xr[ch] - mean[ch]) * rstd[ch]);
                }
            }
            for ch in 0..c {
                sg[ch] += f64::from(bg[ch]);
                sgx[ch] += f64::from(bgx[ch]);
            }
        }
        (sg, sgx)
    }
}

wide_fn! {
    /// BatchNorm backward's input gradient for a chunk of rows:
    /// `dx = k · (g - mean(g) - x̂ · mean(g · x̂))` with batch statistics (`batch` holds the two
    /// means), `dx = k · g` with running ones, where `k = weight · rstd` and `g` is gated by the
    /// fused ReLU as in [`bn_grad_sums`].
    #[allow(clippy::too_many_arguments)]
    fn bn_input_grad(
        dx: &mut [f32],
        x: &[f32],
        g: &[f32],
        y: &[f32],
        mean: &[f32],
        rstd: &[f32],
        k: &[f32],
        batch: Option<(&[f32], &[f32])>,
        relu: bool,
    ) {
        let c = mean.len();
        let rows = dx
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(g.chunks_exact(c).zip(y.chunks_exact(c)));
        for ((dr, xr), (gr, yr)) in rows {
            let (dr, xr, gr, yr) = (&mut dr[..c], &xr[..c], &gr[..c], &yr[..c]);
            let (mean, rstd, k) = (&mean[..c], &rstd[..c], &k[..c]);
            match batch {
                Some((mg, mgx)) => {
                    let (mg, mgx) = (&mg[..c], &mgx[..c]);
                    for ch in 0..c {
                        let gv = if relu && yr[ch] <= 0.0 { 0.0 } else { gr[ch] };
                        let xhat = (xr[ch] - mean[ch]) * rstd[ch];
                        dr[ch] = k[ch] * (gv - mg[ch] - xhat * mgx[ch]);
                    }
                }
                None => {
                    for ch in 0..c {
                        let gv = if relu && yr[ch] <= 0.0 { 0.0 } else { gr[ch] };
                        dr[ch] = k[ch] * gv;
                    }
                }
            }
        }
    }
}

wide_fn! {
    /// `o = max(o, v)` per channel; a NaN wins and stays, as in PyTorch.
    fn max_into(o: &mut [f32], v: &[f32]) {
        for (d, &v) in o.iter_mut().zip(v) {
            if v > *d || v.is_nan() {
                *d = v;
            }
        }
    }
}

wide_fn! {
    /// Per channel, where `v` (channel `ch` at `base + ch`) beats `best` (or is the first
    /// NaN): `best = v`, `at = base + ch`.
    fn argmax_into(best: &mut [f32], at: &mut [usize], v: &[f32], base: usize) {
        for (ch, ((bv, a), &v)) in best.iter_mut().zip(at.iter_mut()).zip(v).enumerate() {
            if v > *bv || (v.is_nan() && !bv.is_nan()) {
                *bv = v;
                *a = base + ch;
            }
        }
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
    let op = MaxPool::new(kernel, stride, padding)?;
    on_cpu_f32(&[x], |t| t[0].contiguous()?.apply_op1(op))
}

/// The max-pool kernel behind [`max_pool2d`].
struct MaxPool {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool {
    fn new(kernel: usize, stride: usize, padding: usize) -> candle_core::Result<MaxPool> {
        if kernel == 0 || stride == 0 || 2 * padding > kernel {
            candle_core::bail!(
                "max-pool: kernel {kernel}, stride {stride}, padding {padding} (padding must be at most half the kernel)"
            )
        }
        Ok(MaxPool {
            kernel,
            stride,
            padding,
        })
    }

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

    /// The input positions (pixel indices into one image) of output `(oy, ox)`'s window that
    /// lie inside the image, in scan order.
    fn window(g: &Geom, oy: usize, ox: usize) -> impl Iterator<Item = usize> + '_ {
        (0..g.kh).flat_map(move |ky| {
            (0..g.kw).filter_map(move |kx| g.source(oy, ox, ky, kx).map(|(iy, ix)| iy * g.w + ix))
        })
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
        // Parallel over output rows; each output's channels are one vector, maxed over the
        // window's pixels (a NaN wins and stays, as in PyTorch).
        out.par_chunks_mut(g.wo * c)
            .enumerate()
            .for_each(|(r, orow)| {
                let (b, oy) = (r / g.ho, r % g.ho);
                let xi = &x[b * img..][..img];
                for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
                    o.fill(f32::NEG_INFINITY);
                    for p in Self::window(&g, oy, ox) {
                        max_into(o, &xi[p * c..][..c]);
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
                // Parallel over images: each owns its slice of dx. Each output's gradient goes
                // to the first maximum of its window in scan order (the first NaN if any),
                // found for all channels at once.
                dx.par_chunks_mut(img).enumerate().for_each(|(b, dimg)| {
                    let xi = &xs[b * img..][..img];
                    let mut best = vec![0f32; c];
                    let mut at = vec![0usize; c];
                    for oy in 0..g.ho {
                        for ox in 0..g.wo {
                            let mut window = Self::window(&g, oy, ox);
                            let Some(first) = window.next() else {
                                continue;
                            };
                            best.copy_from_slice(&xi[first * c..][..c]);
                            for (ch, a) in at.iter_mut().enumerate() {
                                *a = first * c + ch;
                            }
                            for p in window {
                                argmax_into(&mut best, &mut at, &xi[p * c..][..c], p * c);
                            }
                            let go = &gs[((b * g.ho + oy) * g.wo + ox) * c..][..c];
                            for (&a, &gv) in at.iter().zip(go) {
                                dimg[a] += gv;
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
