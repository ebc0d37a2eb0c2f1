//! Matrix products for kiln's own CPU kernels, through the `gemm` crate (the one candle's CPU
//! matmul uses), on strided views so that transposes and head slices are never copied.

use std::mem::MaybeUninit;

/// A read-only matrix view: data, row stride, column stride (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `[rows, cols]`.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows, cols]` matrix, i.e. `[cols, rows]`.
    pub(crate) fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether a `[r, c]` matrix with these strides fits in the data.
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Every thread of the current rayon pool (a product that is the only work in flight).
    All,
    /// The calling thread only (products inside an already parallel loop).
    One,
}

/// A linear layer on rows: `x [rows, inp] · wᵀ + b` for a PyTorch-layout weight
/// `w [out, inp]` and an optional bias `b [out]`, as a fresh `[rows, out]`.
pub(crate) fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (out, inp): (usize, usize),
) -> candle_core::Result<Vec<f32>> {
    let rows = x.len() / inp.max(1);
    let mut y = match b {
        Some(b) => repeated(b, rows),
        None => zeroed(rows * out),
    };
    linear_rows(&mut y, x, w, (out, inp), b.is_some())?;
    Ok(y)
}

/// A linear layer's forward product on rows: `y [rows, out] (+)= x [rows, inp] · wᵀ` for a
/// PyTorch-layout weight `w [out, inp]`, on every core (`+=` when `accumulate`: `y` holds the
/// bias rows or a residual).
pub(crate) fn linear_rows(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    (out, inp): (usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    let rows = x.len() / inp.max(1);
    sgemm(
        (rows, out, inp),
        y,
        out,
        Mat::rows(x, inp),
        Mat::transposed(w, inp),
        1.0,
        accumulate,
        Threads::All,
    )
}

/// A linear layer's weight gradient: `dw [out, inp] = dᵀ · x` for its output's gradient
/// `d [rows, out]` and its input `x [rows, inp]`.
pub(crate) fn linear_weight_gradient(
    dw: &mut [f32],
    d: &[f32],
    x: &[f32],
    (out, inp): (usize, usize),
) -> candle_core::Result<()> {
    let rows = x.len() / inp.max(1);
    sgemm(
        (out, inp, rows),
        dw,
        inp,
        Mat::transposed(d, out),
        Mat::rows(x, inp),
        1.0,
        false,
        Threads::All,
    )
}

/// A linear layer's input gradient: `dx [rows, inp] (+)= d [rows, out] · w` (`+=` when
/// `accumulate`, for an input shared by several layers).
pub(crate) fn linear_input_gradient(
    dx: &mut [f32],
    d: &[f32],
    w: &[f32],
    (out, inp): (usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    let rows = d.len() / out.max(1);
    sgemm(
        (rows, inp, out),
        dx,
        inp,
        Mat::rows(d, out),
        Mat::rows(w, inp),
        1.0,
        accumulate,
        Threads::All,
    )
}

/// `dst[m, n] = scale · a[m, k] · b[k, n]` (`+=` when `accumulate`), `dst` row-major with row
/// stride `dst_rs` (≥ n, so a column block of a wider matrix can be written in place).
// BLAS-shaped on purpose: every argument is one of sgemm's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
    threads: Threads,
) -> candle_core::Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_fits = dst_rs >= n && (m - 1) * dst_rs + n <= dst.len();
    if !dst_fits || !a.fits(m, k) || !b.fits(k, n) {
        candle_core::bail!("sgemm: operands too small for [{m}, {k}] x [{k}, {n}]")
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    // The threads of the rayon pool this runs in (a serving part's one-thread pool runs its
    // products on its own core): asking gemm for more than the pool has only splits the work
    // into parts that run one after another, each packing its operands again.
    let pool = rayon::current_num_threads();
    if threads == Threads::All && pool > 1 && m < SMALL_ROWS && n >= 2 * COLUMN_BLOCK {
        // Few rows: gemm's own split of such a product is poor (the threads mostly wait), so
        // the columns are cut into one block per thread, each a one-thread product.
        return split_columns((m, n, k), dst, dst_rs, a, b, scale, accumulate, pool);
    }
    if threads == Threads::All && pool > 1 && k >= 2 * m.max(n) && m.max(n) >= 2 * COLUMN_BLOCK {
        // A long reduction into a small output (a weight gradient: the batch's rows are `k`):
        // gemm's split of it is poor too (2 threads reach ~1.5× one), so the output's wider
        // side is cut into one block per thread (~1.8×; 2× for a convolution's).
        return if n >= m {
            split_columns((m, n, k), dst, dst_rs, a, b, scale, accumulate, pool)
        } else {
            split_rows((m, n, k), dst, dst_rs, a, b, scale, accumulate, pool)
        };
    }
    if threads == Threads::All && pool > 1 && m >= SPLIT_ROWS_PER_THREAD * pool {
        // Many rows (ViT's 197 tokens × the batch): one block of rows per thread, each a
        // one-thread product, beat gemm's own split by 3-20% at ViT-tiny's shapes
        // (`linear_products_timing`), while at MiniLM's 512 rows they were level.
        return split_rows((m, n, k), dst, dst_rs, a, b, scale, accumulate, pool);
    }
    let par = match threads {
        Threads::All if pool > 1 => gemm::Parallelism::Rayon(pool),
        _ => gemm::Parallelism::None,
    };
    // A product with few rows (one short text being served) is computed as its transpose,
    // `dstᵀ = bᵀ · aᵀ` (only the strides change): gemm's micro-kernels cover rows in blocks
    // of up to 48 with AVX-512, so 20 rows would be padded to 48, while the wide side is a
    // multiple of the block and the few rows become the kernel's narrow side.
    let transposed = m < SMALL_ROWS && n > m;
    // (rows, cols, dst column and row strides, lhs with its column and row strides, rhs
    // likewise), in gemm's argument order.
    let (rows, cols, dst_cs, dst_rs, lhs, rhs) = if transposed {
        (n, m, dst_rs, 1, (b.data, b.rs, b.cs), (a.data, a.rs, a.cs))
    } else {
        (m, n, 1, dst_rs, (a.data, a.cs, a.rs), (b.data, b.cs, b.rs))
    };
    // SAFETY: the bounds of every operand were checked above against its strides; the three
    // slices cannot alias (dst is borrowed mutably). The transposed call reads and writes the
    // same elements through swapped strides.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Columns per block (a multiple of every micro-kernel's width) when products with few rows
/// are split over threads by columns.
const COLUMN_BLOCK: usize = 16;

/// The destination's address, shared by threads that write disjoint columns of it.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: each thread writes only its own block of columns (see `split_columns`).
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `sgemm` with the columns cut into `threads` blocks computed side by side on the pool.
#[allow(clippy::too_many_arguments)]
fn split_columns(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    let per = n.div_ceil(threads).div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
    let blocks: Vec<(usize, usize)> = (0..n).step_by(per).map(|j| (j, (j + per).min(n))).collect();
    let len = dst.len();
    let base = DstPtr(dst.as_mut_ptr());
    blocks.into_par_iter().try_for_each(|(j0, j1)| {
        // SAFETY: block [j0, j1) of every row: rows are dst_rs apart and blocks are disjoint
        // column ranges, so no two threads touch the same element; the view is in bounds
        // (sgemm checked `(m - 1) * dst_rs + n <= len`).
        let dst = unsafe { std::slice::from_raw_parts_mut(base.get().add(j0), len - j0) };
        let b = Mat {
            data: &b.data[j0 * b.cs..],
            rs: b.rs,
            cs: b.cs,
        };
        sgemm(
            (m, j1 - j0, k),
            dst,
            dst_rs,
            a,
            b,
            scale,
            accumulate,
            Threads::One,
        )
    })
}

/// `sgemm` with the rows cut into `threads` blocks computed side by side on the pool.
#[allow(clippy::too_many_arguments)]
fn split_rows(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    let per = m.div_ceil(threads).div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
    dst.par_chunks_mut(per * dst_rs)
        .enumerate()
        .take(m.div_ceil(per))
        .try_for_each(|(i, dst)| {
            let i0 = i * per;
            let a = Mat {
                data: &a.data[i0 * a.rs..],
                rs: a.rs,
                cs: a.cs,
            };
            sgemm(
                ((m - i0).min(per), n, k),
                dst,
                dst_rs,
                a,
                b,
                scale,
                accumulate,
                Threads::One,
            )
        })
}

/// A buffer of `len` zeros, filled on the whole rayon pool when it is large. A product's or
/// kernel's output is allocated on the thread that drives the step while the pool waits, and
/// one core writing tens of MiB of zeros showed as ~5% of a training step's samples.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    fill_chunks(len, PARALLEL_FILL_CHUNK, |chunk| {
        chunk.fill(MaybeUninit::new(0.0))
    })
}

/// `row` repeated `times` times (a bias broadcast over a product's rows), filled like
/// [`zeroed`].
pub(crate) fn repeated(row: &[f32], times: usize) -> Vec<f32> {
    let n = row.len();
    if n == 0 {
        return Vec::new();
    }
    // Chunks are whole rows, so each starts at the row's first element.
    let rows_per_chunk = PARALLEL_FILL_CHUNK.div_ceil(n);
    fill_chunks(n * times, rows_per_chunk * n, |chunk| {
        for dst in chunk.chunks_exact_mut(n) {
            // SAFETY: `dst` holds `n` elements, as `row` does; the two cannot overlap (`dst`
            // is fresh capacity). Writing a `MaybeUninit<f32>` through an `f32` pointer is
            // what `MaybeUninit::write` does element by element.
            unsafe {
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst.as_mut_ptr().cast::<f32>(), n)
            };
        }
    })
}

/// A vector of `len` floats, every element written by `fill` over consecutive chunks of
/// `chunk` elements (in parallel when there is more than one chunk and more than one thread).
fn fill_chunks(
    len: usize,
    chunk: usize,
    fill: impl Fn(&mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    if len <= chunk || rayon::current_num_threads() < 2 {
        fill(spare);
    } else {
        spare.par_chunks_mut(chunk).for_each(&fill);
    }
    // SAFETY: `fill` wrote every one of the first `len` elements (the chunks cover them all).
    unsafe { v.set_len(len) };
    v
}

/// Elements per task when buffers are filled in parallel (1 MiB of f32).
const PARALLEL_FILL_CHUNK: usize = 1 << 18;

/// Products with fewer rows than this (and more columns) run transposed (see [`sgemm`]).
const SMALL_ROWS: usize = 48;
/// Rows per thread from which a product is cut into one block of rows per thread.
const SPLIT_ROWS_PER_THREAD: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        out
    }

    /// ViT-tiny's and MiniLM's linear products (forward, input and weight gradients) at one
    /// and two threads, in GFLOP/s. Not a test: prints timings; `bench/gemm_torch.py` times
    /// the same shapes in PyTorch.
    ///
    ///     cargo test --release --lib -- --ignored --nocapture linear_products_timing
    #[test]
    #[ignore]
    fn linear_products_timing() {
        // (name, rows, inp, out): ViT-tiny at batch 16 (197 tokens), MiniLM at 16 × 32 tokens.
        let shapes = [
            ("vit qkv", 3152, 192, 576),
            ("vit proj", 3152, 192, 192),
            ("vit fc1", 3152, 192, 768),
            ("vit fc2", 3152, 768, 192),
            ("minilm qkv", 512, 384, 1152),
            ("minilm fc1", 512, 384, 1536),
            ("minilm fc2", 512, 1536, 384),
        ];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (name, rows, inp, out) in shapes {
                    let x: Vec<f32> = (0..rows * inp).map(|i| (i % 7) as f32 * 0.1).collect();
                    let w: Vec<f32> = (0..out * inp).map(|i| (i % 5) as f32 * 0.1).collect();
                    let d: Vec<f32> = (0..rows * out).map(|i| (i % 3) as f32 * 0.1).collect();
                    let mut y = vec![0f32; rows * out];
                    let mut dx = vec![0f32; rows * inp];
                    let mut dw = vec![0f32; out * inp];
                    let best = |f: &mut dyn FnMut()| {
                        f();
                        (0..5)
                            .map(|_| {
                                let t = std::time::Instant::now();
                                f();
                                t.elapsed().as_secs_f64()
                            })
                            .fold(f64::INFINITY, f64::min)
                    };
                    let fwd = best(&mut || linear_rows(&mut y, &x, &w, (out, inp), false).unwrap());
                    let dxt = best(&mut || {
                        linear_input_gradient(&mut dx, &d, &w, (out, inp), false).unwrap()
                    });
                    let dwt =
                        best(&mut || linear_weight_gradient(&mut dw, &d, &x, (out, inp)).unwrap());
                    let gf = 2.0 * (rows * inp * out) as f64 / 1e9;
                    println!(
                        "threads {threads} {name:<11} [{rows}x{inp}]x[{inp}x{out}]  fwd {:6.1}  dx {:6.1}  dw {:6.1} GFLOP/s",
                        gf / fwd,
                        gf / dxt,
                        gf / dwt
                    );
                }
            });
        }
    }

    #[test]
    fn strided_products_match_the_naive_product() {
        // Few rows and many columns run transposed; many rows as they are.
        for (m, n, k) in [(5, 3, 4), (3, 70, 9), (1, 5, 2), (60, 80, 7)] {
            strided_product(m, n, k);
        }
    }

    #[test]
    fn parallel_fills_write_every_element() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            for len in [0, 5, PARALLEL_FILL_CHUNK, 3 * PARALLEL_FILL_CHUNK + 7] {
                assert_eq!(zeroed(len), vec![0f32; len]);
            }
            let row: Vec<f32> = (0..384).map(|i| i as f32).collect();
            for times in [0, 1, 3, 4096] {
                assert_eq!(repeated(&row, times), row.repeat(times), "{times} rows");
            }
            assert!(repeated(&[], 10).is_empty());
        });
    }

    #[test]
    fn products_split_over_threads_match_the_naive_product() {
        // In pools of 2 and 3 threads: few rows (split by columns), long reductions into
        // small outputs, split by columns when wider than tall and by rows otherwise (blocks
        // of uneven sizes included), and many rows (split by rows).
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (m, n, k) in [
                    (3, 70, 9),
                    (36, 70, 300),
                    (100, 33, 250),
                    (40, 36, 200),
                    (SPLIT_ROWS_PER_THREAD * threads + 37, 19, 11),
                ] {
                    strided_product(m, n, k);
                }
            });
        }
    }

    fn strided_product(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        let want = naive(m, n, k, &a, &b);
        // b given as its transpose [n, k]; dst a column block of a [m, 7] matrix; scaled and
        // accumulated onto ones.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let w = n + 4;
        let mut dst = vec![1f32; m * w];
        for threads in [Threads::All, Threads::One] {
            dst.fill(1.0);
            sgemm(
                (m, n, k),
                &mut dst[2..],
                w,
                Mat::rows(&a, k),
                Mat::transposed(&bt, k),
                0.5,
                true,
                threads,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..w {
                    let expect = if (2..2 + n).contains(&j) {
                        1.0 + 0.5 * want[i * n + j - 2]
                    } else {
                        1.0
                    };
                    assert!(
                        (dst[i * w + j] - expect).abs() < 1e-4,
                        "[{m}, {n}, {k}] {i},{j}: {} vs {expect}",
                        dst[i * w + j]
                    );
                }
            }
        }
        assert!(
            sgemm(
                (m, n, k),
                &mut dst[..3],
                n,
                Mat::rows(&a, k),
                Mat::rows(&b, n),
                1.0,
                false,
                Threads::One
            )
            .is_err()
        );
    }
}
