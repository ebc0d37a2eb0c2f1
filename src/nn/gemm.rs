//! Matrix products for kiln's own CPU kernels, through the `gemm` crate (the one candle's CPU
//! matmul uses), on strided views so that transposes and head slices are never copied.

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
    let par = match threads {
        Threads::All if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the bounds of every operand were checked above against its strides; the three
    // slices cannot alias (dst is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
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

    #[test]
    fn strided_products_match_the_naive_product() {
        let (m, n, k) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        let want = naive(m, n, k, &a, &b);
        // b given as its transpose [n, k]; dst a column block of a [m, 7] matrix; scaled and
        // accumulated onto ones.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut dst = vec![1f32; m * 7];
        for threads in [Threads::All, Threads::One] {
            dst.fill(1.0);
            sgemm(
                (m, n, k),
                &mut dst[2..],
                7,
                Mat::rows(&a, k),
                Mat::transposed(&bt, k),
                0.5,
                true,
                threads,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..7 {
                    let expect = if (2..2 + n).contains(&j) {
                        1.0 + 0.5 * want[i * n + j - 2]
                    } else {
                        1.0
                    };
                    assert!((dst[i * 7 + j] - expect).abs() < 1e-5, "{i},{j}");
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
