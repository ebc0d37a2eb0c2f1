//! Inference-only matrix products against weights packed once, at load: `y = x · Wᵀ + b`.
//!
//! A general gemm packs both operands on every call; serving multiplies the same weights by
//! a few short texts at a time, where that packing is a quarter of the work. Here `W`
//! (`[n, k]`, PyTorch's layout) is rearranged once into panels of 16 output columns, each
//! stored k-major (`[k][16]`), so the kernel streams a panel with one vector load per step
//! while broadcasting the activations straight from their rows. With AVX-512 the micro-kernel
//! keeps a tile of up to 8 rows × 32 columns (two panels) in registers; with AVX2 and FMA, a
//! tile of up to 6 rows × 16 columns (one panel, two 8-lane vectors per row), and for one to
//! three rows both panels of the block at once, so that enough independent multiply-add
//! chains hide their latency (decoding one token is one row per sequence). The layout is the
//! same for both. Each output sums its `k` products in order in one accumulator whatever the
//! tile height, so a row's result is the same bits however many rows share the product
//! (serving batches whatever requests arrive together). On CPUs with neither
//! (`PackedWeight::available`), or with `KILN_SIMD=base`, callers keep the general path.

use std::sync::Arc;

use candle_core::DType;

use crate::nn::layers::Linear;
use crate::nn::simd::{self, Level};

/// Output columns per panel (one AVX-512 vector of f32, two AVX2 vectors).
const NR: usize = 16;
/// Rows per AVX-512 micro-tile: 8 × 2 accumulator vectors, the 2 weight vectors and a
/// broadcast take 19 of the 32 AVX-512 registers. Each tile streams its column block's two
/// panels (`2 · k · NR` values, from L2 once `k` is past a few hundred), so taller tiles stream
/// them fewer times per product.
const MR: usize = 8;
/// Rows per AVX2 micro-tile: 6 × 2 accumulator vectors, the 2 weight vectors and a broadcast
/// take 15 of the 16 AVX2 registers.
const MR_AVX2: usize = 6;
/// Products with more rows than this go to the general gemm (measured on MiniLM serving:
/// the packed kernel is ahead up to a few hundred rows, behind at 800; the AVX2 kernel ties
/// with the general path at 128-256 rows, `packed_products_timing` in tests/nn_bert.rs).
const MAX_ROWS: usize = 256;

/// Each layer's packed linears ([`PackedWeight::pack_layers`]).
pub type PackedLayers = Vec<Vec<Arc<PackedWeight>>>;

/// A weight `[n, k]` (and its bias) packed for [`PackedWeight::matmul`].
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `panels` panels (an even number: a zero panel pads an odd count) of `k × NR` values.
    data: Vec<f32>,
    panels: usize,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}]", self.n, self.k)
    }
}

impl PackedWeight {
    /// Whether this CPU runs the packed kernel (AVX-512, or AVX2 with FMA: the element-wise
    /// loops' [`simd::level`], so `KILN_SIMD` caps this too).
    pub fn available() -> bool {
        simd::level() >= Level::Avx2
    }

    /// Packs a row-major `[n, k]` weight and its bias.
    pub fn pack(w: &[f32], bias: Option<&[f32]>, n: usize, k: usize) -> Option<Arc<PackedWeight>> {
        if w.len() != n * k || n == 0 || k == 0 || bias.is_some_and(|b| b.len() != n) {
            return None;
        }
        let panels = n.div_ceil(NR).next_multiple_of(2);
        let mut data = vec![0f32; panels * k * NR];
        for j in 0..n {
            let (p, c) = (j / NR, j % NR);
            let row = &w[j * k..(j + 1) * k];
            let panel = &mut data[p * k * NR..(p + 1) * k * NR];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * NR + c] = v;
            }
        }
        Some(Arc::new(PackedWeight {
            n,
            k,
            data,
            panels,
            bias: bias.map(<[f32]>::to_vec),
        }))
    }

    /// `x · Wᵀ + b` for a tensor `[.., k]` on the CPU in f32 that tracks no gradient:
    /// `Ok(None)` for anything else (or on a CPU without the kernel), and the caller's general
    /// path runs.
    pub fn apply(
        &self,
        x: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        use candle_core::{CpuStorage, Storage};
        if !x.device().is_cpu() || x.dtype() != DType::F32 || x.track_op() {
            return Ok(None);
        }
        let dims = x.dims().to_vec();
        if dims.last() != Some(&self.k) {
            return Ok(None);
        }
        let m = x.elem_count() / self.k;
        if m > MAX_ROWS {
            // Many rows: a general gemm's cache blocking wins over this kernel.
            return Ok(None);
        }
        let x = x.contiguous()?;
        let y = {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                return Ok(None);
            };
            let start = layout.start_offset();
            match self.matmul(&data[start..start + m * self.k], m, true) {
                Some(y) => y,
                None => return Ok(None),
            }
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.n;
        }
        Ok(Some(candle_core::Tensor::from_vec(y, out, x.device())?))
    }

    /// Packs a dense layer's weight `[out, in]` and bias, read as f32. `None` when the
    /// layer's sizes cannot be packed.
    pub fn from_linear(lin: &Linear) -> candle_core::Result<Option<Arc<PackedWeight>>> {
        let (n, k) = lin.weight.dims2()?;
        let w = lin
            .weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = match &lin.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self::pack(&w, b.as_deref(), n, k))
    }

    /// Packs every layer, or none (`None`) if one of them cannot be packed.
    pub fn pack_all(linears: &[&Linear]) -> candle_core::Result<Option<Vec<Arc<PackedWeight>>>> {
        let mut out = Vec::with_capacity(linears.len());
        for lin in linears {
            match Self::from_linear(lin)? {
                Some(p) => out.push(p),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// Packs each layer's linears ([`Self::pack_all`]), or nothing (`None`) if one of them
    /// cannot be packed; with the bytes the copies take.
    pub fn pack_layers<'a, const N: usize>(
        layers: impl IntoIterator<Item = [&'a Linear; N]>,
    ) -> candle_core::Result<Option<(PackedLayers, u64)>> {
        let mut all = Vec::new();
        for linears in layers {
            match Self::pack_all(&linears)? {
                Some(packed) => all.push(packed),
                None => return Ok(None),
            }
        }
        let bytes = all.iter().flatten().map(|p| p.bytes()).sum();
        Ok(Some((all, bytes)))
    }

    /// Whether a product of `rows` rows goes through the packed kernel (on this CPU).
    pub fn takes(rows: usize) -> bool {
        Self::available() && rows <= MAX_ROWS
    }

    /// Bytes the packed copy takes.
    pub fn bytes(&self) -> u64 {
        (self.data.len() * std::mem::size_of::<f32>()) as u64
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `y[m, n] = x[m, k] · Wᵀ (+ bias)`, `x` and `y` row-major. `parallel` spreads the column
    /// blocks over the current rayon pool. `None` when the CPU has no kernel or `x` does not
    /// have `m` rows of `k`.
    pub fn matmul(&self, x: &[f32], m: usize, parallel: bool) -> Option<Vec<f32>> {
        let level = simd::level();
        if level < Level::Avx2 || x.len() != m * self.k {
            return None;
        }
        let mut y = vec![0f32; m * self.n];
        if m == 0 {
            return Some(y);
        }
        let out = OutPtr(y.as_mut_ptr());
        // Column blocks of two panels (32 columns) for both kernels.
        let blocks = self.panels / 2;
        let rows_per_tile = match level {
            Level::Avx512 => MR,
            _ => MR_AVX2,
        };
        let run = |block: usize| {
            for i0 in (0..m).step_by(rows_per_tile) {
                let rows = rows_per_tile.min(m - i0);
                // SAFETY: `level` found the kernel's features on this CPU; `x` holds rows
                // i0..i0+rows of k values; the panels of this block hold k·NR values each;
                // each block writes only its own columns of `y`.
                unsafe {
                    match level {
                        Level::Avx512 => self.tile(x, i0, rows, block, out),
                        _ => self.tile_avx2(x, i0, rows, block, out),
                    }
                }
            }
        };
        if parallel && rayon::current_num_threads() > 1 && blocks > 1 {
            use rayon::prelude::*;
            (0..blocks).into_par_iter().for_each(run);
        } else {
            (0..blocks).for_each(run);
        }
        Some(y)
    }

    /// Adds the bias and writes a finished tile (`R` rows from `i0`, columns from `j0`) into
    /// `y`, clipped to its `n` columns.
    ///
    /// # Safety
    /// Rows `i0..i0 + R` of `out` (`n` columns each) exist and no other thread writes these
    /// columns of them.
    #[inline(always)]
    unsafe fn write_tile<const R: usize, const C: usize>(
        &self,
        tile: &[[f32; C]; R],
        i0: usize,
        j0: usize,
        out: OutPtr,
    ) {
        let cols = C.min(self.n.saturating_sub(j0));
        for (r, t) in tile.iter().enumerate() {
            // SAFETY: the caller's contract.
            let dst = unsafe { out.0.add((i0 + r) * self.n + j0) };
            for (c, v) in t.iter().enumerate().take(cols) {
                let b = self.bias.as_ref().map_or(0.0, |b| b[j0 + c]);
                // SAFETY: c < cols, inside row i0 + r.
                unsafe { *dst.add(c) = v + b };
            }
        }
    }

    /// The AVX2 tile: rows `i0..i0 + rows` × the 32 columns of column block `block` (its two
    /// panels, the second skipped where it only pads an odd count).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(&self, x: &[f32], i0: usize, rows: usize, block: usize, out: OutPtr) {
        // SAFETY: as `tile_avx2_rows`. Four to six rows keep enough independent multiply-add
        // chains on one panel; fewer rows take both panels at once (four to twelve chains).
        // Every output still sums its k products in order in one accumulator, whatever the
        // tile height, so a row's result does not depend on the rows batched with it.
        unsafe {
            let first = 2 * block;
            let second = first + 1 < self.n.div_ceil(NR);
            macro_rules! one_panel_each {
                ($r:literal) => {{
                    self.tile_avx2_rows::<$r, 1>(x, i0, first, out);
                    if second {
                        self.tile_avx2_rows::<$r, 1>(x, i0, first + 1, out);
                    }
                }};
            }
            match rows {
                6 => one_panel_each!(6),
                5 => one_panel_each!(5),
                4 => one_panel_each!(4),
                3 => self.tile_avx2_rows::<3, 2>(x, i0, first, out),
                2 => self.tile_avx2_rows::<2, 2>(x, i0, first, out),
                _ => self.tile_avx2_rows::<1, 2>(x, i0, first, out),
            }
        }
    }

    /// [`Self::tile_avx2`] for `R` rows × `P` panels from `panel` (16·`P` columns, two 8-lane
    /// accumulators per row and panel).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2_rows<const R: usize, const P: usize>(
        &self,
        x: &[f32],
        i0: usize,
        panel: usize,
        out: OutPtr,
    ) {
        // SAFETY: the caller (`matmul`) checked AVX2 and FMA and the sizes: rows i0..i0+R of
        // x exist, the P panels from `panel` hold k·NR values each (padding included), and
        // the columns written are theirs, clipped to n, inside row i0 + r of y.
        unsafe {
            use std::arch::x86_64::*;
            let k = self.k;
            let p = self.data.as_ptr().add(panel * k * NR);
            let xr = x.as_ptr().add(i0 * k);
            let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
            for kk in 0..k {
                let mut w = [[_mm256_setzero_ps(); 2]; P];
                for (q, wq) in w.iter_mut().enumerate() {
                    let at = p.add(q * k * NR + kk * NR);
                    wq[0] = _mm256_loadu_ps(at);
                    wq[1] = _mm256_loadu_ps(at.add(8));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xr.add(r * k + kk));
                    for (aq, wq) in a.iter_mut().zip(&w) {
                        aq[0] = _mm256_fmadd_ps(xv, wq[0], aq[0]);
                        aq[1] = _mm256_fmadd_ps(xv, wq[1], aq[1]);
                    }
                }
            }
            for q in 0..P {
                let mut tile = [[0f32; NR]; R];
                for (t, a) in tile.iter_mut().zip(&acc) {
                    _mm256_storeu_ps(t.as_mut_ptr(), a[q][0]);
                    _mm256_storeu_ps(t.as_mut_ptr().add(8), a[q][1]);
                }
                self.write_tile(&tile, i0, (panel + q) * NR, out);
            }
        }
    }

    /// One tile: rows `i0..i0 + rows` × the 32 columns of column block `block`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(&self, x: &[f32], i0: usize, rows: usize, block: usize, out: OutPtr) {
        // SAFETY: as `tile_rows`, whose row count each arm fixes at compile time (so its
        // loops unroll with no per-row test).
        unsafe {
            match rows {
                8 => self.tile_rows::<8>(x, i0, block, out),
                7 => self.tile_rows::<7>(x, i0, block, out),
                6 => self.tile_rows::<6>(x, i0, block, out),
                5 => self.tile_rows::<5>(x, i0, block, out),
                4 => self.tile_rows::<4>(x, i0, block, out),
                3 => self.tile_rows::<3>(x, i0, block, out),
                2 => self.tile_rows::<2>(x, i0, block, out),
                _ => self.tile_rows::<1>(x, i0, block, out),
            }
        }
    }

    /// [`Self::tile`] for `R` rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_rows<const R: usize>(&self, x: &[f32], i0: usize, block: usize, out: OutPtr) {
        // SAFETY: the caller (`matmul`) checked AVX-512 and the sizes: rows i0..i0+R of
        // x exist, the block's two panels hold 2·k·NR values, and the columns written are
        // this block's, inside row i0 + r of y.
        unsafe {
            use std::arch::x86_64::*;
            let k = self.k;
            let p0 = self.data.as_ptr().add(2 * block * k * NR);
            let p1 = p0.add(k * NR);
            let xr = x.as_ptr().add(i0 * k);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for kk in 0..k {
                let w0 = _mm512_loadu_ps(p0.add(kk * NR));
                let w1 = _mm512_loadu_ps(p1.add(kk * NR));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xr.add(r * k + kk));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                }
            }
            let mut tile = [[0f32; 2 * NR]; R];
            for (r, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile[r].as_mut_ptr(), a[0]);
                _mm512_storeu_ps(tile[r].as_mut_ptr().add(NR), a[1]);
            }
            self.write_tile(&tile, i0, block * 2 * NR, out);
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile(&self, _x: &[f32], _i0: usize, _rows: usize, _block: usize, _out: OutPtr) {
        unreachable!("PackedWeight::available is false off x86_64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile_avx2(&self, _x: &[f32], _i0: usize, _rows: usize, _block: usize, _out: OutPtr) {
        unreachable!("PackedWeight::available is false off x86_64")
    }
}

/// `lin` applied to `x` (its LoRA adapter included): from its packed copy where there is one
/// and no gradient is tracked, the general path otherwise.
pub fn project(
    packed: Option<&PackedWeight>,
    lin: &Linear,
    x: &candle_core::Tensor,
    train: bool,
) -> candle_core::Result<candle_core::Tensor> {
    if !train
        && let Some(packed) = packed
        && let Some(y) = packed.apply(x)?
    {
        return Ok(y);
    }
    lin.forward_t(x, train)
}

/// The output's address, shared by threads that write disjoint column blocks of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each column block is written by one thread only (`PackedWeight::matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_products_match_the_naive_product() {
        // Both kernels where the CPU has them (`at_each_level` caps the level), none at the
        // baseline.
        crate::nn::simd::test_cap::at_each_level(|level| {
            if level < Level::Avx2 {
                let p = PackedWeight::pack(&[1.0; 6], None, 2, 3).unwrap();
                assert!(!PackedWeight::available() && !PackedWeight::takes(1));
                assert!(
                    p.matmul(&[1.0; 3], 1, false).is_none(),
                    "no kernel at {level:?}"
                );
                return;
            }
            // Odd panel counts, partial panels and tiles, every tile height of both kernels,
            // k small and odd, one row, many rows.
            let mut shapes = vec![(7, 33, 17), (13, 64, 40), (6, 16, 1), (20, 100, 384)];
            shapes.extend((1..=9).map(|m| (m, 40, 7)));
            shapes.extend([(1, 5, 3), (1, 48, 1), (2, 17, 2), (3, 31, 5)]);
            for (m, n, k) in shapes {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.71).cos()).collect();
                let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.2).collect();
                for parallel in [false, true] {
                    for bias in [None, Some(b.as_slice())] {
                        let packed = PackedWeight::pack(&w, bias, n, k).unwrap();
                        let y = packed.matmul(&x, m, parallel).unwrap();
                        // Each row alone gives the same bits as in the batch (serving batches
                        // whatever requests arrive together).
                        for i in 0..m {
                            let alone = packed.matmul(&x[i * k..(i + 1) * k], 1, false).unwrap();
                            assert_eq!(
                                alone,
                                y[i * n..(i + 1) * n],
                                "{level:?} [{m}, {n}, {k}] row {i} alone"
                            );
                        }
                        for i in 0..m {
                            for j in 0..n {
                                let want: f32 =
                                    (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum::<f32>()
                                        + bias.map_or(0.0, |b| b[j]);
                                let got = y[i * n + j];
                                assert!(
                                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                    "{level:?} [{m}, {n}, {k}] ({i}, {j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
            assert!(PackedWeight::pack(&[1.0; 5], None, 2, 3).is_none());
            assert!(PackedWeight::pack(&[1.0; 6], Some(&[0.0]), 2, 3).is_none());
            let p = PackedWeight::pack(&[1.0; 6], None, 2, 3).unwrap();
            assert!(
                p.matmul(&[1.0; 4], 2, false).is_none(),
                "x of the wrong size"
            );
        });
    }
}
