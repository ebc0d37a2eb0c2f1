//! Winograd's minimal filtering F(2×2, 3×3) for 3×3 convolutions at stride 1 and padding 1
//! (every 3×3 convolution of a ResNet but the strided first of a stage), forward and
//! backward, on NHWC activations.
//!
//! Each 2×2 block of outputs (a "tile") needs a 4×4 patch of input. Transformed, a patch
//! becomes 16 values per channel (`V = Bᵀ d B`) and a 3×3 filter 16 values per channel pair
//! (`U = G g Gᵀ`); the tile's transformed outputs are 16 elementwise products summed over
//! input channels, i.e. 16 matrix products `M[ξ] = V[ξ] · U[ξ]` over all tiles at once, and
//! the outputs are `Y = Aᵀ M A`. That is 16 multiplications per output pair of channels for 4
//! outputs, against 36 for the direct convolution: 2.25× fewer. The products are GEMMs like
//! im2col's, with `cin` instead of `9 · cin` in the reduction; the transforms are cheap
//! passes over the activations.
//!
//! The backward passes are the transposes of the same linear maps: the input's gradient goes
//! back through `A`, the products (with `U[ξ]ᵀ`) and `B`, where overlapping patches add up;
//! the weight's gradient is `Vᵀ · dM` per `ξ`, brought back through `G`.
//!
//! Layouts: `V` is `[tiles][16][cin]` and `M` `[tiles][16][cout]` (each tile's 16 rows
//! together, so the transforms write and read one contiguous block per tile, and each `ξ` is
//! a strided matrix for the products); `U` is `[cin][16][cout]`, and `[cout][16][cin]` for
//! the input gradient's products.

use rayon::prelude::*;

use super::gemm::{Mat, Threads, sgemm, zeroed};

/// Floats of transformed inputs and outputs kept at once (64 MiB); larger batches run in
/// groups of images.
const GROUP_FLOATS: usize = 16 << 20;

/// The geometry of one Winograd convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Winograd {
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    /// Tile rows and columns per image (the output is `h × w`, so `⌈h/2⌉ × ⌈w/2⌉`).
    th: usize,
    tw: usize,
}

/// `Bᵀ` applied to 4 values: one axis of the input transform.
#[inline(always)]
fn bt(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// `B` applied to 4 values: the input transform's transpose.
#[inline(always)]
fn b(v: [f32; 4]) -> [f32; 4] {
    [v[0], v[1] - v[2] + v[3], v[1] + v[2] - v[0], -v[3]]
}

/// `Aᵀ` applied to 4 values: one axis of the output transform (4 → 2).
#[inline(always)]
fn at(m: [f32; 4]) -> [f32; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// `A` applied to 2 values: the output transform's transpose (2 → 4).
#[inline(always)]
fn a(g: [f32; 2]) -> [f32; 4] {
    [g[0], g[0] + g[1], g[0] - g[1], -g[1]]
}

/// `G` applied to 3 values: one axis of the filter transform (3 → 4).
#[inline(always)]
fn gf(k: [f32; 3]) -> [f32; 4] {
    [
        k[0],
        0.5 * (k[0] + k[1] + k[2]),
        0.5 * (k[0] - k[1] + k[2]),
        k[2],
    ]
}

/// `Gᵀ` applied to 4 values: the filter transform's transpose (4 → 3).
#[inline(always)]
fn gt(u: [f32; 4]) -> [f32; 3] {
    [
        u[0] + 0.5 * (u[1] + u[2]),
        0.5 * (u[1] - u[2]),
        0.5 * (u[1] + u[2]) + u[3],
    ]
}

/// Applies `f` channel by channel: `out[j][c] = f(inp[..][c])[j]` for `N` input rows and `K`
/// output rows of `n` channels each (`out` holds the `K` rows one after another).
#[inline(always)]
fn per_channel<const N: usize, const K: usize>(
    inp: [&[f32]; N],
    out: &mut [f32],
    n: usize,
    f: impl Fn([f32; N]) -> [f32; K],
) {
    let inp = inp.map(|r| &r[..n]);
    let out = &mut out[..K * n];
    for c in 0..n {
        let y = f(std::array::from_fn(|i| inp[i][c]));
        for (j, v) in y.into_iter().enumerate() {
            out[j * n + c] = v;
        }
    }
}

impl Winograd {
    /// The Winograd form of a convolution of `x: [b, h, w, cin]` with a `[cout, cin, kh, kw]`
    /// kernel at this stride and padding, where it applies (3×3, stride 1, padding 1).
    pub(super) fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Option<Self> {
        let (&[b, h, wd, cin], &[cout, wcin, 3, 3]) = (x, w) else {
            return None;
        };
        let nonempty = b > 0 && h > 0 && wd > 0 && cin > 0 && cout > 0;
        (stride == 1 && pad == 1 && wcin == cin && nonempty).then_some(Winograd {
            b,
            h,
            w: wd,
            cin,
            cout,
            th: h.div_ceil(2),
            tw: wd.div_ceil(2),
        })
    }

    /// Input channels times output channels.
    pub(super) fn channel_pairs(&self) -> usize {
        self.cin * self.cout
    }

    fn tiles_per_image(&self) -> usize {
        self.th * self.tw
    }

    /// 2×2 output tiles across the batch.
    pub(super) fn tiles(&self) -> usize {
        self.b * self.tiles_per_image()
    }

    /// Images per group, so that a group's transformed inputs and outputs fit
    /// [`GROUP_FLOATS`] (at least one image).
    fn images_per_group(&self) -> usize {
        let per_image = self.tiles_per_image() * 16 * (self.cin + self.cout);
        (GROUP_FLOATS / per_image.max(1)).clamp(1, self.b.max(1))
    }

    /// `U = G g Gᵀ` for every channel pair of the `[cout, cin, 3, 3]` weight: `[cin][16][cout]`
    /// for the forward products, or (`transposed`) `[cout][16][cin]` for the input gradient's,
    /// which multiply by `U[ξ]ᵀ` (gemm reads a right-hand side with long column strides
    /// slowly: twice the time of the forward products, measured).
    pub(super) fn transform_weight(&self, w: &[f32], transposed: bool) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let (outer, inner) = if transposed { (cout, cin) } else { (cin, cout) };
        let mut u = zeroed(outer * 16 * inner);
        u.par_chunks_mut(16 * inner)
            .enumerate()
            .for_each(|(o, block)| {
                for i in 0..inner {
                    let (ci, co) = if transposed { (i, o) } else { (o, i) };
                    let k = &w[(co * cin + ci) * 9..][..9];
                    // Rows of the kernel through G, then columns.
                    let rows: [[f32; 4]; 3] =
                        std::array::from_fn(|r| gf([k[r * 3], k[r * 3 + 1], k[r * 3 + 2]]));
                    for col in 0..4 {
                        let t = gf([rows[0][col], rows[1][col], rows[2][col]]);
                        for (row, v) in t.into_iter().enumerate() {
                            block[(row * 4 + col) * inner + i] = v;
                        }
                    }
                }
            });
        u
    }

    /// The weight's gradient `[cout, cin, 3, 3]` from the gradient of `U` (`[cin][16][cout]`):
    /// `Gᵀ dU G`. Output channels go in blocks of 16, so that each read of `dU` takes a whole
    /// cache line.
    pub(super) fn weight_gradient(&self, du: &[f32]) -> Vec<f32> {
        const BLOCK: usize = 16;
        let (cin, cout) = (self.cin, self.cout);
        let mut dw = zeroed(cout * cin * 9);
        dw.par_chunks_mut(BLOCK * cin * 9)
            .enumerate()
            .for_each(|(blk, out)| {
                let co0 = blk * BLOCK;
                let lanes = out.len() / (cin * 9);
                for ci in 0..cin {
                    let block = &du[ci * 16 * cout..][..16 * cout];
                    let m: [&[f32]; 16] =
                        std::array::from_fn(|xi| &block[xi * cout + co0..][..lanes]);
                    for l in 0..lanes {
                        // Columns through Gᵀ (4 → 3 rows), then rows.
                        let cols: [[f32; 3]; 4] = std::array::from_fn(|j| {
                            gt([m[j][l], m[4 + j][l], m[8 + j][l], m[12 + j][l]])
                        });
                        let k = &mut out[(l * cin + ci) * 9..][..9];
                        for r in 0..3 {
                            let row = gt([cols[0][r], cols[1][r], cols[2][r], cols[3][r]]);
                            k[r * 3..r * 3 + 3].copy_from_slice(&row);
                        }
                    }
                }
            });
        dw
    }

    /// `V = Bᵀ d B` for every tile of images `x: [nb, h, w, cin]`, as `[tiles][16][cin]`.
    fn transform_input(&self, x: &[f32], nb: usize) -> Vec<f32> {
        let (h, w, cin, th, tw) = (self.h, self.w, self.cin, self.th, self.tw);
        let zeros = vec![0f32; cin];
        let mut v = zeroed(nb * th * tw * 16 * cin);
        v.par_chunks_mut(16 * cin).enumerate().for_each_init(
            || vec![0f32; 16 * cin],
            |tmp, (t, out)| {
                let (img, ty, tx) = (t / (th * tw), t / tw % th, t % tw);
                let pixel = |p: usize, q: usize| {
                    let (y, xx) = ((2 * ty + p).wrapping_sub(1), (2 * tx + q).wrapping_sub(1));
                    if y < h && xx < w {
                        &x[((img * h + y) * w + xx) * cin..][..cin]
                    } else {
                        &zeros[..]
                    }
                };
                // Columns q through Bᵀ into tmp[q][i], then rows i into out[i][j].
                for q in 0..4 {
                    let col = [pixel(0, q), pixel(1, q), pixel(2, q), pixel(3, q)];
                    per_channel(col, &mut tmp[q * 4 * cin..], cin, bt);
                }
                for i in 0..4 {
                    let row: [&[f32]; 4] =
                        std::array::from_fn(|q| &tmp[(q * 4 + i) * cin..][..cin]);
                    per_channel(row, &mut out[i * 4 * cin..], cin, bt);
                }
            },
        );
        v
    }

    /// `Y = Aᵀ M A` for every tile, written into `y: [nb, h, w, cout]` (the last tile row and
    /// column are cut where `h` or `w` is odd).
    fn transform_output(&self, m: &[f32], y: &mut [f32]) {
        let (h, w, cout, th, tw) = (self.h, self.w, self.cout, self.th, self.tw);
        y.par_chunks_mut(h * w * cout)
            .enumerate()
            .for_each(|(img, yi)| {
                yi.par_chunks_mut(2 * w * cout).enumerate().for_each_init(
                    || vec![0f32; 8 * cout],
                    |tmp, (ty, rows)| {
                        let height = rows.len() / (w * cout);
                        for tx in 0..tw {
                            let block = &m[((img * th + ty) * tw + tx) * 16 * cout..][..16 * cout];
                            // Columns j through Aᵀ into tmp[j][r], then rows r into the outputs.
                            for j in 0..4 {
                                let col: [&[f32]; 4] =
                                    std::array::from_fn(|i| &block[(i * 4 + j) * cout..][..cout]);
                                per_channel(col, &mut tmp[j * 2 * cout..], cout, at);
                            }
                            let width = (w - 2 * tx).min(2);
                            for r in 0..height {
                                let row: [&[f32]; 4] =
                                    std::array::from_fn(|j| &tmp[(j * 2 + r) * cout..][..cout]);
                                let at_px = (r * w + 2 * tx) * cout;
                                if width == 2 {
                                    per_channel(row, &mut rows[at_px..], cout, at);
                                } else {
                                    per_channel(row, &mut rows[at_px..], cout, |m| [at(m)[0]]);
                                }
                            }
                        }
                    },
                );
            });
    }

    /// `dM = A dY Aᵀ` for every tile from the output gradient `dy: [nb, h, w, cout]` (zero
    /// beyond the image), as `[tiles][16][cout]`.
    fn output_gradient(&self, dy: &[f32], nb: usize) -> Vec<f32> {
        let (h, w, cout, th, tw) = (self.h, self.w, self.cout, self.th, self.tw);
        let zeros = vec![0f32; cout];
        let mut dm = zeroed(nb * th * tw * 16 * cout);
        dm.par_chunks_mut(16 * cout).enumerate().for_each_init(
            || vec![0f32; 8 * cout],
            |tmp, (t, out)| {
                let (img, ty, tx) = (t / (th * tw), t / tw % th, t % tw);
                let pixel = |r: usize, s: usize| {
                    let (yy, xx) = (2 * ty + r, 2 * tx + s);
                    if yy < h && xx < w {
                        &dy[((img * h + yy) * w + xx) * cout..][..cout]
                    } else {
                        &zeros[..]
                    }
                };
                // Columns s through A into tmp[s][i], then rows i into out[i][j].
                for s in 0..2 {
                    per_channel(
                        [pixel(0, s), pixel(1, s)],
                        &mut tmp[s * 4 * cout..],
                        cout,
                        a,
                    );
                }
                for i in 0..4 {
                    let row = [&tmp[i * cout..][..cout], &tmp[(4 + i) * cout..][..cout]];
                    per_channel(row, &mut out[i * 4 * cout..], cout, a);
                }
            },
        );
        dm
    }

    /// The input's gradient from `dV` (`[tiles][16][cin]`, overwritten): each tile's patch
    /// gradient `B dV Bᵀ`, then every input pixel sums the patches that cover it.
    fn input_gradient(&self, dv: &mut [f32], dx: &mut [f32]) {
        let (h, w, cin, th, tw) = (self.h, self.w, self.cin, self.th, self.tw);
        // Patch gradients in place, as [q][p].
        dv.par_chunks_mut(16 * cin).for_each_init(
            || vec![0f32; 16 * cin],
            |tmp, block| {
                // Rows i through B into tmp[i][q], then columns q into block[q][p].
                for i in 0..4 {
                    let row: [&[f32]; 4] =
                        std::array::from_fn(|j| &block[(i * 4 + j) * cin..][..cin]);
                    per_channel(row, &mut tmp[i * 4 * cin..], cin, b);
                }
                for q in 0..4 {
                    let col: [&[f32]; 4] =
                        std::array::from_fn(|i| &tmp[(i * 4 + q) * cin..][..cin]);
                    per_channel(col, &mut block[q * 4 * cin..], cin, b);
                }
            },
        );
        let dv = &*dv;
        // The (tile, offset) pairs along one axis that read input position `pos` (two at most:
        // patches start every 2 positions, one before the tile's outputs).
        let covering = |pos: usize, tiles: usize| {
            let hi = pos.div_ceil(2);
            let first = (hi < tiles).then_some((hi, pos + 1 - 2 * hi));
            let second = (hi >= 1 && hi - 1 < tiles).then(|| (hi - 1, pos + 1 - 2 * (hi - 1)));
            [first, second]
        };
        dx.par_chunks_mut(w * cin)
            .enumerate()
            .for_each(|(row, out)| {
                let (img, yy) = (row / h, row % h);
                for (xx, px) in out.chunks_exact_mut(cin).enumerate() {
                    px.fill(0.0);
                    for (ty, p) in covering(yy, th).into_iter().flatten() {
                        for (tx, q) in covering(xx, tw).into_iter().flatten() {
                            let t = (img * th + ty) * tw + tx;
                            let src = &dv[(t * 16 + q * 4 + p) * cin..][..cin];
                            for (d, s) in px.iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            });
    }

    /// The convolution of `x: [b, h, w, cin]` with the transformed weight `u` (see
    /// [`Winograd::transform_weight`]): `[b, h, w, cout]`.
    pub(super) fn forward(&self, x: &[f32], u: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (h, w, cin, cout) = (self.h, self.w, self.cin, self.cout);
        let mut y = zeroed(self.b * h * w * cout);
        let per = self.images_per_group();
        for b0 in (0..self.b).step_by(per) {
            let nb = per.min(self.b - b0);
            let tiles = nb * self.tiles_per_image();
            let v = self.transform_input(&x[b0 * h * w * cin..][..nb * h * w * cin], nb);
            let mut m = zeroed(tiles * 16 * cout);
            for xi in 0..16 {
                // M[·][ξ] = V[·][ξ] · U[ξ], U[ξ] = u[ci][ξ][·].
                sgemm(
                    (tiles, cout, cin),
                    &mut m[xi * cout..],
                    16 * cout,
                    Mat::rows(&v[xi * cin..], 16 * cin),
                    Mat::rows(&u[xi * cout..], 16 * cout),
                    1.0,
                    false,
                    Threads::All,
                )?;
            }
            self.transform_output(&m, &mut y[b0 * h * w * cout..][..nb * h * w * cout]);
        }
        Ok(y)
    }

    /// The gradients of the input (when `want_dx`) and of the transformed weight `U` (when
    /// `want_du`, as `[cin][16][cout]`) from the output gradient `dy`, for the weight `weight`.
    pub(super) fn backward(
        &self,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        want_dx: bool,
        want_du: bool,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (h, w, cin, cout) = (self.h, self.w, self.cin, self.cout);
        let mut dx = if want_dx {
            zeroed(self.b * h * w * cin)
        } else {
            Vec::new()
        };
        let mut du = if want_du {
            zeroed(cin * 16 * cout)
        } else {
            Vec::new()
        };
        // The weight laid out for the input gradient's products, made once for all groups.
        let ut = want_dx.then(|| self.transform_weight(weight, true));
        let per = self.images_per_group();
        for b0 in (0..self.b).step_by(per) {
            let nb = per.min(self.b - b0);
            let tiles = nb * self.tiles_per_image();
            let dm = self.output_gradient(&dy[b0 * h * w * cout..][..nb * h * w * cout], nb);
            if want_du {
                let v = self.transform_input(&x[b0 * h * w * cin..][..nb * h * w * cin], nb);
                for xi in 0..16 {
                    // dU[ξ] (+)= V[·][ξ]ᵀ · dM[·][ξ].
                    sgemm(
                        (cin, cout, tiles),
                        &mut du[xi * cout..],
                        16 * cout,
                        Mat::transposed(&v[xi * cin..], 16 * cin),
                        Mat::rows(&dm[xi * cout..], 16 * cout),
                        1.0,
                        b0 > 0,
                        Threads::All,
                    )?;
                }
            }
            if let Some(ut) = &ut {
                let mut dv = zeroed(tiles * 16 * cin);
                for xi in 0..16 {
                    // dV[·][ξ] = dM[·][ξ] · U[ξ]ᵀ.
                    sgemm(
                        (tiles, cin, cout),
                        &mut dv[xi * cin..],
                        16 * cin,
                        Mat::rows(&dm[xi * cout..], 16 * cout),
                        Mat::rows(&ut[xi * cin..], 16 * cin),
                        1.0,
                        false,
                        Threads::All,
                    )?;
                }
                self.input_gradient(&mut dv, &mut dx[b0 * h * w * cin..][..nb * h * w * cin]);
            }
        }
        Ok((dx, du))
    }
}
