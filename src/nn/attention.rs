//! Multi-head attention as one CPU kernel forward and one backward, for training.
//!
//! candle computes attention as a dozen separate ops (head transposes, batched matrix
//! products, the masked softmax, dropout), each a fresh buffer written by one core, twice as
//! many in backward, and keeps `[batch, heads, seq, seq]` tensors alive between the two. Here
//! the batch rows run in parallel; each head's products go through gemm on strided views of
//! `q`, `k` and `v` as the projections give them (`[batch, seq, heads · head_dim]`, heads side
//! by side), so nothing is transposed; and the backward recomputes the probabilities from `q`
//! and `k` instead of keeping them. Padding, causal and sliding-window masks, grouped-query
//! heads and attention dropout are all handled inside the kernel.
//!
//! The masks mean what the additive `f32::MIN` masks of the primitive path mean: a masked key
//! gets exactly zero weight, and a query that sees no key at all (a row of pure padding)
//! weighs every key alike.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::block::{Adapter, BlockInput, BlockKernel, Gradients, Kept, Weights, zeroed_where};
use super::gemm::{
    Mat, Threads, linear, linear_input_gradient, linear_rows, linear_weight_gradient, sgemm,
};
use super::ops::{cpu_f32, exp_f32, with_cpu_f32};
use super::simd::{dot_f32, max_f32, sum_f32, wide_fn};

/// What one attention call computes, besides its inputs.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads` is a multiple of it (equal without grouped-query attention).
    pub kv_heads: usize,
    /// Multiplies `q·k` (usually `1/sqrt(head_dim)`).
    pub scale: f32,
    /// Query `i` (at position `s - sq + i` of the `s` keys) sees no later key.
    pub causal: bool,
    /// With `causal`, the number of positions a query sees, itself included (Mistral's
    /// sliding window).
    pub window: Option<usize>,
    /// Per batch row and key, `0` for a key nobody attends to (padding): `[batch · s]`.
    pub key_mask: Option<Vec<f32>>,
    /// Dropout probability on the attention weights (training only; 0 for none).
    pub dropout: f32,
    /// Seed of the dropout masks: the same seed gives the same masks, forward and backward.
    pub seed: u64,
}

impl AttentionSpec {
    /// Plain attention over every key: `heads` query and key/value heads, no mask, no dropout.
    pub fn new(heads: usize, kv_heads: usize, scale: f32) -> Self {
        AttentionSpec {
            heads,
            kv_heads,
            scale,
            causal: false,
            window: None,
            key_mask: None,
            dropout: 0.0,
            seed: 0,
        }
    }

    /// The factor dropout leaves on weight `(batch row, head, query, key)`: `0` when dropped,
    /// `1 / (1 - p)` when kept. A hash of the seed and the position, so the backward draws the
    /// same masks and the batch rows can draw theirs in parallel.
    pub fn dropout_factor(
        &self,
        (bi, head, i, j): (usize, usize, usize, usize),
        sq: usize,
        s: usize,
    ) -> f32 {
        if self.dropout <= 0.0 {
            return 1.0;
        }
        let index = (((bi * self.heads + head) * sq + i) * s + j) as u64;
        let bits = splitmix64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep = 1.0 - self.dropout as f64;
        if ((bits >> 32) as f64) < keep * 4_294_967_296.0 {
            (1.0 / keep) as f32
        } else {
            0.0
        }
    }
}

wide_fn! {
    /// Softmax of one row of scores in place; `false` (the row untouched) when every score is
    /// `-inf` (a query that sees no key).
    fn softmax_row(seen: &mut [f32]) -> bool {
        let max = max_f32(seen);
        if max == f32::NEG_INFINITY {
            return false;
        }
        // Separate passes so each vectorises (a running sum would serialise the exps).
        // exp_f32 gives exactly 0 for a hidden key's -inf.
        seen.iter_mut().for_each(|x| *x = exp_f32(*x - max));
        let inv = 1.0 / sum_f32(seen);
        seen.iter_mut().for_each(|x| *x *= inv);
        true
    }
}

wide_fn! {
    /// Softmax backward for one row: `dp = p ∘ (dp − Σ_j dp·p)`.
    fn softmax_grad_row(prow: &[f32], dprow: &mut [f32]) {
        let dot = dot_f32(prow, dprow);
        for (d, &pj) in dprow.iter_mut().zip(prow) {
            *d = pj * (*d - dot);
        }
    }
}

/// A well-mixed 64-bit hash of `x` (the SplitMix64 finaliser).
#[inline(always)]
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Attention of `q` `[batch, sq, heads · head_dim]` over `k` and `v` `[batch, s, kv_heads ·
/// head_dim]`: `[batch, sq, heads · head_dim]`, differentiable in all three. `None` off the CPU
/// or for other dtypes (the caller's primitive path then runs).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: AttentionSpec,
) -> candle_core::Result<Option<Tensor>> {
    let native = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(native(q) && native(k) && native(v)) {
        return Ok(None);
    }
    let g = Geometry::new(q.dims(), k.dims(), &spec)?;
    if v.dims() != k.dims() {
        candle_core::bail!("attention: v is {:?}, k is {:?}", v.dims(), k.dims())
    }
    g.check(&spec)?;
    let op = FusedAttention { spec };
    Ok(Some(q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )?))
}

/// `r + o(attention(q(n), k(n), v(n)))`, a transformer's self-attention block and its
/// residual, as one CPU op with its own backward (the projections, rotary embeddings where
/// given, [`attention`]'s kernel and the residual add): candle's backward then gives fresh
/// zero tensors to two inputs of the hidden width instead of eight or more (see `nn::mlp` for
/// why that matters). `n` and `r` are `[batch, seq, hidden]` (with [`BlockInput::RmsNormed`],
/// `n` is the RMSNorm of `x` inside the op and `r` is `x`); the projections are `q`
/// `[heads · head_dim, hidden]`, `k` and `v` `[kv_heads · head_dim, hidden]`, `o`
/// `[hidden, heads · head_dim]`, each with or without a bias. `rope` is the rotary tables
/// `(cos, sin)`, `[seq, head_dim / 2]` each, applied to the queries and keys at positions
/// `0..seq` (decoders). A projection's LoRA adapter is computed inside the op too, its
/// dropout (when `train`) included. The weights are read in place and their gradients
/// deposited beside candle's graph ([`super::autograd`]); frozen weights get none computed.
/// `None` where it does not apply (off the CPU, not f32, a weight derived from a variable):
/// the caller's separate ops then run.
pub fn residual_attention(
    input: &BlockInput,
    [q, k, v, o]: [&super::layers::Linear; 4],
    spec: AttentionSpec,
    rope: Option<(&Tensor, &Tensor)>,
    train: bool,
) -> candle_core::Result<Option<Tensor>> {
    let layers = [q, k, v, o];
    let native = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Ok((b, s, h)) = input.input().dims3() else {
        return Ok(None);
    };
    let fused_ok = layers
        .iter()
        .all(|l| native(&l.weight) && l.bias.as_ref().is_none_or(native) && Adapter::native(l));
    if !fused_ok || !input.native() {
        return Ok(None);
    }
    input.check(h, h)?;
    let hq = q.weight.dim(0)?;
    let hk = k.weight.dim(0)?;
    let g = Geometry::new(&[b, s, hq], &[b, s, hk], &spec)?;
    g.check(&spec)?;
    let shapes = Projections::shapes(h, hq, hk);
    let mut flat = Vec::with_capacity(8);
    let mut bias = [false; 4];
    for (i, l) in layers.iter().enumerate() {
        let (out, inp) = shapes[i];
        if l.weight.dims() != [out, inp] {
            candle_core::bail!(
                "residual attention: projection {i} is {:?}, expected [{out}, {inp}]",
                l.weight.dims()
            )
        }
        flat.push(l.weight.clone());
        if let Some(b) = &l.bias {
            if b.dims() != [out] {
                candle_core::bail!("residual attention: bias {i} is {:?}", b.dims())
            }
            flat.push(b.clone());
            bias[i] = true;
        }
    }
    // The adapters' `A` and `B` follow the projections' weights, in the order q, k, v, o.
    let mut adapters: [Option<Adapter>; 4] = Default::default();
    for (i, l) in layers.iter().enumerate() {
        adapters[i] = Adapter::of(l, shapes[i], &mut flat, train)?;
    }
    let rope = match rope {
        Some((cos, sin)) => {
            let half = g.dh / 2;
            let (cos, sin) = (cos.flatten_all()?, sin.flatten_all()?);
            if g.dh % 2 != 0 || cos.elem_count() != s * half || sin.elem_count() != s * half {
                candle_core::bail!(
                    "residual attention: rotary tables of {} for {s} positions, head_dim {}",
                    cos.elem_count(),
                    g.dh
                )
            }
            let table = |t: Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
            Some(Rotary {
                cos: table(cos)?,
                sin: table(sin)?,
            })
        }
        None => None,
    };
    let Some(weights) = Weights::new(flat) else {
        return Ok(None);
    };
    let kernel = ResidualAttention {
        attn: FusedAttention { spec },
        g,
        p: Projections::new(shapes, bias, adapters),
        rope,
        keep: input.tracked(&weights),
        variables: weights.variables(),
        kept: Kept::new(),
    };
    Ok(Some(input.apply(kernel, weights)?))
}

/// Which of a block's weights are the four projections' weights, biases and adapters.
struct Projections {
    /// `(out, in)` of q, k, v, o.
    shapes: [(usize, usize); 4],
    /// Index of each weight among the block's weights; its bias (where it has one) follows it.
    at: [usize; 4],
    bias: [bool; 4],
    /// Each projection's LoRA adapter, where it has one (after every weight and bias).
    adapters: [Option<Adapter>; 4],
    /// How many weights the block has.
    count: usize,
}

impl Projections {
    fn shapes(h: usize, hq: usize, hk: usize) -> [(usize, usize); 4] {
        [(hq, h), (hk, h), (hk, h), (h, hq)]
    }

    fn new(shapes: [(usize, usize); 4], bias: [bool; 4], adapters: [Option<Adapter>; 4]) -> Self {
        let mut at = [0; 4];
        let mut count = 0;
        for i in 0..4 {
            at[i] = count;
            count += 1 + usize::from(bias[i]);
        }
        count += adapters.iter().flatten().count() * 2;
        Projections {
            shapes,
            at,
            bias,
            adapters,
            count,
        }
    }

    /// Checks that `p` holds the block's weights, each of its size.
    fn check(&self, p: &[&[f32]]) -> candle_core::Result<()> {
        let fits = p.len() == self.count
            && (0..4).all(|i| {
                let (out, inp) = self.shapes[i];
                p[self.at[i]].len() == out * inp
                    && (!self.bias[i] || p[self.at[i] + 1].len() == out)
                    && self.adapters[i].as_ref().is_none_or(|a| a.fits(p))
            });
        if !fits {
            candle_core::bail!("residual attention: weights do not fit {:?}", self.shapes)
        }
        Ok(())
    }

    /// Projection `i`'s weight `[out, in]` and bias.
    fn get<'a>(&self, p: &[&'a [f32]], i: usize) -> (&'a [f32], Option<&'a [f32]>) {
        (p[self.at[i]], self.bias[i].then(|| p[self.at[i] + 1]))
    }

    /// Projection `i`'s weight and bias gradients in `dp`.
    fn get_mut<'a>(
        &self,
        dp: &'a mut [Vec<f32>],
        i: usize,
    ) -> (&'a mut [f32], Option<&'a mut [f32]>) {
        let (w, rest) = dp[self.at[i]..].split_at_mut(1);
        let b = if self.bias[i] {
            rest.first_mut().map(|b| b.as_mut_slice())
        } else {
            None
        };
        (w[0].as_mut_slice(), b)
    }

    /// `x · wᵀ + b` for projection `i`, `x` being `[rows, in]`, its adapter included; with an
    /// adapter, also the adapter's first product (see [`Adapter::down`], for the backward).
    fn apply(
        &self,
        p: &[&[f32]],
        i: usize,
        x: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
        let (w, b) = self.get(p, i);
        let mut y = linear(x, w, b, self.shapes[i])?;
        let u = self.adapter_down(p, i, x)?;
        if let (Some(a), Some(u)) = (&self.adapters[i], &u) {
            a.up(p, u, &mut y)?;
        }
        Ok((y, u))
    }

    /// Projection `i`'s adapter's first product, or `None` without an adapter.
    fn adapter_down(
        &self,
        p: &[&[f32]],
        i: usize,
        x: &[f32],
    ) -> candle_core::Result<Option<Vec<f32>>> {
        self.adapters[i].as_ref().map(|a| a.down(p, x)).transpose()
    }

    /// Projection `i`'s weight and bias gradients into `dp`, from its output's gradient `d`
    /// `[rows, out]` and its input `x` `[rows, in]`: dW = dᵀ · x, db = column sums of d. A
    /// weight whose slot in `dp` is empty (frozen, see [`zeroed_where`]) gets none.
    fn gradients(
        &self,
        dp: &mut [Vec<f32>],
        i: usize,
        d: &[f32],
        x: &[f32],
    ) -> candle_core::Result<()> {
        let (dw, db) = self.get_mut(dp, i);
        if !dw.is_empty() {
            linear_weight_gradient(dw, d, x, self.shapes[i])?;
        }
        if let Some(db) = db.filter(|db| !db.is_empty()) {
            db.copy_from_slice(&super::ops::column_sums(d, self.shapes[i].0));
        }
        Ok(())
    }

    /// `Σ dᵢ · wᵢ` over projections `is` (the gradient of their shared input).
    fn input_gradient(
        &self,
        p: &[&[f32]],
        ds: &[(usize, &[f32])],
        rows: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let inp = ds.first().map_or(0, |&(i, _)| self.shapes[i].1);
        let mut dx = super::gemm::zeroed(rows * inp);
        for (j, &(i, d)) in ds.iter().enumerate() {
            linear_input_gradient(&mut dx, d, self.get(p, i).0, self.shapes[i], j > 0)?;
        }
        Ok(dx)
    }
}

/// Rotary tables for positions `0..seq`, `[seq, head_dim / 2]` each.
struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    /// Rotates every head of `x` (`[batch, seq, width]`, heads of `dh` side by side) by its
    /// position's angles, or by their opposites (`inverse`, the rotation's transpose).
    fn rotate(&self, x: &mut [f32], seq: usize, width: usize, dh: usize, inverse: bool) {
        let half = dh / 2;
        let sign = if inverse { -1f32 } else { 1f32 };
        x.par_chunks_mut(width * 16)
            .enumerate()
            .for_each(|(c, rows)| {
                for (ri, row) in rows.chunks_exact_mut(width).enumerate() {
                    let pos = (c * 16 + ri) % seq.max(1);
                    let (cos, sin) = (
                        &self.cos[pos * half..(pos + 1) * half],
                        &self.sin[pos * half..(pos + 1) * half],
                    );
                    for head in row.chunks_exact_mut(dh) {
                        let (x1, x2) = head.split_at_mut(half);
                        for i in 0..half {
                            let (a, b, s) = (x1[i], x2[i], sign * sin[i]);
                            x1[i] = a * cos[i] - b * s;
                            x2[i] = b * cos[i] + a * s;
                        }
                    }
                }
            });
    }
}

/// [`residual_attention`]'s kernel: inputs `(n, r)`, the weights the four projections'
/// weights (and biases, where they have them) in the order q, k, v, o, then their adapters'.
struct ResidualAttention {
    attn: FusedAttention,
    g: Geometry,
    p: Projections,
    rope: Option<Rotary>,
    keep: bool,
    /// Which weights are variables (the others get no gradient computed).
    variables: Vec<bool>,
    kept: Kept<Saved>,
}

/// What the forward keeps for the backward.
struct Saved {
    /// `q`, `k` (both rotated), `v` and the attention's output.
    qkvc: [Vec<f32>; 4],
    /// Each adapted projection's `scale · dropout(x) · Aᵀ`.
    down: [Option<Vec<f32>>; 4],
}

impl ResidualAttention {
    /// `q`, `k` (both rotated), `v` and the attention's output for `n`, and the adapters'
    /// first products (the output projection's too).
    fn inner(&self, n: &[f32], p: &[&[f32]]) -> candle_core::Result<Saved> {
        let g = &self.g;
        let (mut q, dq) = self.p.apply(p, 0, n)?;
        let (mut k, dk) = self.p.apply(p, 1, n)?;
        let (v, dv) = self.p.apply(p, 2, n)?;
        if let Some(rope) = &self.rope {
            rope.rotate(&mut q, g.sq, g.hq, g.dh, false);
            rope.rotate(&mut k, g.s, g.hk, g.dh, false);
        }
        let ctx = self.attn.forward(g, &q, &k, &v)?;
        let down_o = self.p.adapter_down(p, 3, &ctx)?;
        Ok(Saved {
            qkvc: [q, k, v, ctx],
            down: [dq, dk, dv, down_o],
        })
    }
}

impl BlockKernel for ResidualAttention {
    fn name(&self) -> &'static str {
        "kiln-residual-attention"
    }

    fn widths(&self) -> (usize, usize) {
        let h = self.p.shapes[3].0;
        (h, h)
    }

    fn forward(&self, n: &[f32], r: &[f32], p: &[&[f32]]) -> candle_core::Result<Vec<f32>> {
        let h = self.p.shapes[3].0;
        self.p.check(p)?;
        if n.len() != r.len() {
            candle_core::bail!(
                "residual attention: input of {}, residual of {}",
                n.len(),
                r.len()
            )
        }
        let saved = self.inner(n, p)?;
        // y = r (+ bo), then += ctx · woᵀ (+ its adapter's output).
        let (wo, bo) = self.p.get(p, 3);
        let mut y = super::gemm::zeroed(r.len());
        y.par_chunks_mut(h * 64)
            .zip(r.par_chunks(h * 64))
            .for_each(|(y, r)| match bo {
                Some(bo) => {
                    for (yr, rr) in y.chunks_exact_mut(h).zip(r.chunks_exact(h)) {
                        for ((y, r), b) in yr.iter_mut().zip(rr).zip(bo) {
                            *y = r + b;
                        }
                    }
                }
                None => y.copy_from_slice(r),
            });
        linear_rows(&mut y, &saved.qkvc[3], wo, (h, self.g.hq), true)?;
        if let (Some(a), Some(u)) = (&self.p.adapters[3], &saved.down[3]) {
            a.up(p, u, &mut y)?;
        }
        self.kept.keep(self.keep, saved);
        Ok(y)
    }

    fn backward(
        &self,
        n: &[f32],
        p: &[&[f32]],
        g: &[f32],
        want_n: bool,
        want_p: bool,
    ) -> candle_core::Result<Gradients> {
        self.p.check(p)?;
        let att = &self.g;
        let h = self.p.shapes[3].0;
        let kept = self.kept.take();
        let rows = n.len() / h.max(1);
        let Saved { qkvc, down } = match kept {
            Some(saved) if saved.qkvc[3].len() == rows * att.hq => saved,
            _ => self.inner(n, p)?,
        };
        let [q, k, v, ctx] = qkvc;
        if !(want_n || want_p) {
            return Ok((None, None));
        }
        let mut dp = if want_p {
            zeroed_where(p, &self.variables)
        } else {
            Vec::new()
        };
        if want_p {
            self.p.gradients(&mut dp, 3, g, &ctx)?;
        }
        // d(ctx) = g · wo (+ the adapter's share), then through the attention and the
        // rotations.
        let mut dctx = self.p.input_gradient(p, &[(3, g)], rows)?;
        if let (Some(a), Some(u)) = (&self.p.adapters[3], &down[3]) {
            a.backward(
                (p, want_p.then_some(dp.as_mut_slice())),
                (g, &ctx, u),
                Some(&mut dctx),
            )?;
        }
        drop(ctx);
        let (mut dq, mut dk, dv) = self.attn.backward(att, (&q, &k, &v), &dctx)?;
        drop((q, k, v, dctx));
        if let Some(rope) = &self.rope {
            rope.rotate(&mut dq, att.sq, att.hq, att.dh, true);
            rope.rotate(&mut dk, att.s, att.hk, att.dh, true);
        }
        if want_p {
            for (i, d) in [&dq, &dk, &dv].into_iter().enumerate() {
                self.p.gradients(&mut dp, i, d, n)?;
            }
        }
        let mut dn = if want_n {
            Some(
                self.p
                    .input_gradient(p, &[(0, &dq), (1, &dk), (2, &dv)], rows)?,
            )
        } else {
            None
        };
        for (i, d) in [&dq, &dk, &dv].into_iter().enumerate() {
            if let (Some(a), Some(u)) = (&self.p.adapters[i], &down[i]) {
                a.backward(
                    (p, want_p.then_some(dp.as_mut_slice())),
                    (d, n, u),
                    dn.as_deref_mut(),
                )?;
            }
        }
        Ok((dn, Some(dp).filter(|_| want_p)))
    }
}

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    sq: usize,
    s: usize,
    dh: usize,
    /// Query row width, `heads · dh`.
    hq: usize,
    /// Key/value row width, `kv_heads · dh`.
    hk: usize,
}

impl Geometry {
    /// Whether the spec's key mask and dropout fit this call.
    fn check(&self, spec: &AttentionSpec) -> candle_core::Result<()> {
        if let Some(mask) = &spec.key_mask
            && mask.len() != self.b * self.s
        {
            candle_core::bail!(
                "attention: key mask of {} for [{}, {}]",
                mask.len(),
                self.b,
                self.s
            )
        }
        if !(0.0..1.0).contains(&spec.dropout) {
            candle_core::bail!("attention: dropout {} is not in [0, 1)", spec.dropout)
        }
        Ok(())
    }

    fn new(q: &[usize], k: &[usize], spec: &AttentionSpec) -> candle_core::Result<Self> {
        let ([b, sq, hq], [kb, s, hk]) = (q, k) else {
            candle_core::bail!("attention: q {q:?} and k {k:?} must be [batch, seq, width]")
        };
        let (heads, kv) = (spec.heads, spec.kv_heads);
        if heads == 0 || kv == 0 || heads % kv != 0 || hq % heads != 0 {
            candle_core::bail!("attention: {heads} heads over {kv} key/value heads, width {hq}")
        }
        let dh = hq / heads;
        if kb != b || *hk != kv * dh || (spec.causal && sq > s) {
            candle_core::bail!("attention: q {q:?} does not fit k {k:?} ({kv} key/value heads)")
        }
        Ok(Geometry {
            b: *b,
            sq: *sq,
            s: *s,
            dh,
            hq: *hq,
            hk: *hk,
        })
    }
}

struct FusedAttention {
    spec: AttentionSpec,
}

/// One head of one batch row: where its operands start in the row's `q`, `k`, `v`.
#[derive(Clone, Copy)]
struct Head {
    bi: usize,
    head: usize,
    /// Offset of the query head in a row of `q` (and of the output).
    qo: usize,
    /// Offset of its key/value head in a row of `k` and `v`.
    ko: usize,
}

impl FusedAttention {
    /// Whether query `i` of batch row `bi` sees key `j`.
    fn visible(&self, g: &Geometry, bi: usize, i: usize, j: usize) -> bool {
        let spec = &self.spec;
        if let Some(mask) = &spec.key_mask
            && mask[bi * g.s + j] == 0.0
        {
            return false;
        }
        if spec.causal {
            let pos = g.s - g.sq + i;
            if j > pos || spec.window.is_some_and(|w| pos - j >= w) {
                return false;
            }
        }
        true
    }

    /// The attention weights of one head for query block `t`, before dropout, into `p`
    /// `[t.rows, t.keys]` (only the block's keys: every other key has weight 0 for these
    /// queries); `dead[i]` is set for a query that sees no key (its weights are uniform and do
    /// not depend on the scores; its block then spans every key).
    fn probs(
        &self,
        g: &Geometry,
        h: Head,
        t: &Tile,
        (q, k): (&[f32], &[f32]),
        p: &mut [f32],
        dead: &mut [bool],
    ) -> candle_core::Result<()> {
        let (rows, w) = (t.rows.len(), t.keys.len());
        let (p, dead) = (&mut p[..rows * w], &mut dead[..rows]);
        sgemm(
            (rows, w, g.dh),
            p,
            w,
            Mat {
                data: &q[t.rows.start * g.hq + h.qo..],
                rs: g.hq,
                cs: 1,
            },
            Mat {
                data: &k[t.keys.start * g.hk + h.ko..],
                rs: 1,
                cs: g.hk,
            },
            self.spec.scale,
            false,
            Threads::One,
        )?;
        let keys = self
            .spec
            .key_mask
            .as_ref()
            .map(|m| &m[h.bi * g.s + t.keys.start..h.bi * g.s + t.keys.end]);
        for (i, (row, dead)) in p
            .chunks_exact_mut(w.max(1))
            .zip(dead.iter_mut())
            .enumerate()
        {
            // The causal window is a range of keys; the padding mask picks within it.
            let (lo, hi) = self.window(g, t.rows.start + i);
            let (lo, hi) = (
                lo.clamp(t.keys.start, t.keys.end) - t.keys.start,
                hi.clamp(t.keys.start, t.keys.end) - t.keys.start,
            );
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let seen = &mut row[lo..hi];
            if let Some(keys) = keys {
                for (x, &k) in seen.iter_mut().zip(&keys[lo..hi]) {
                    if k == 0.0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            *dead = !softmax_row(seen);
            if *dead {
                row.fill(1.0 / g.s as f32);
            }
        }
        Ok(())
    }

    /// The keys query `i` may see before padding: `lo..hi` (all of them without `causal`).
    fn window(&self, g: &Geometry, i: usize) -> (usize, usize) {
        if !self.spec.causal {
            return (0, g.s);
        }
        let pos = g.s - g.sq + i;
        let lo = self.spec.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        (lo, pos + 1)
    }

    /// Batch row `bi`'s queries in blocks, each with the range of keys any of its queries
    /// sees: causal blocks skip the keys after their last query (half the products of a
    /// causal sequence), and keys hidden from the whole block (padding at either end) are
    /// skipped too. A block with a query that sees no key at all spans every key (such a
    /// query weighs them all alike).
    fn tiles(&self, g: &Geometry, bi: usize) -> Vec<Tile> {
        let mask = self
            .spec
            .key_mask
            .as_ref()
            .map(|m| &m[bi * g.s..(bi + 1) * g.s]);
        let shown = |j: usize| mask.is_none_or(|m| m[j] != 0.0);
        // Visible keys before position j, to tell a query that sees nothing.
        let mut before = vec![0usize; g.s + 1];
        for j in 0..g.s {
            before[j + 1] = before[j] + usize::from(shown(j));
        }
        let block = if self.spec.causal {
            TILE_ROWS
        } else {
            g.sq.max(1)
        };
        (0..g.sq)
            .step_by(block)
            .map(|i0| {
                let rows = i0..(i0 + block).min(g.sq);
                let sees_nothing = rows.clone().any(|i| {
                    let (lo, hi) = self.window(g, i);
                    before[hi] == before[lo]
                });
                if sees_nothing {
                    return Tile { rows, keys: 0..g.s };
                }
                let (mut lo, mut hi) = (self.window(g, i0).0, self.window(g, rows.end - 1).1);
                while lo < hi && !shown(lo) {
                    lo += 1;
                }
                while hi > lo && !shown(hi - 1) {
                    hi -= 1;
                }
                Tile { rows, keys: lo..hi }
            })
            .collect()
    }

    /// Multiplies `p` `[t.rows, t.keys]` by the dropout factors of head `h`.
    fn apply_dropout(&self, g: &Geometry, h: Head, t: &Tile, p: &mut [f32]) {
        if self.spec.dropout <= 0.0 {
            return;
        }
        let w = t.keys.len();
        for (i, row) in t.rows.clone().zip(p.chunks_exact_mut(w.max(1))) {
            for (j, x) in t.keys.clone().zip(row.iter_mut()) {
                *x *= self.spec.dropout_factor((h.bi, h.head, i, j), g.sq, g.s);
            }
        }
    }

    /// The dropout factors of head `h` for tile `t` into `f` (drawn once for the two uses in
    /// backward).
    fn dropout_factors(&self, g: &Geometry, h: Head, t: &Tile, f: &mut [f32]) {
        f.fill(1.0);
        self.apply_dropout(g, h, t, f);
    }

    fn heads(&self, g: &Geometry, bi: usize) -> impl Iterator<Item = Head> {
        let rep = self.spec.heads / self.spec.kv_heads;
        let dh = g.dh;
        (0..self.spec.heads).map(move |head| Head {
            bi,
            head,
            qo: head * dh,
            ko: (head / rep) * dh,
        })
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "kiln-attention"
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
        let g = Geometry::new(l1.dims(), l2.dims(), &self.spec)?;
        let q = cpu_f32(s1, l1, self.name())?;
        let k = cpu_f32(s2, l2, self.name())?;
        let v = cpu_f32(s3, l3, self.name())?;
        let out = self.forward(&g, q, k, v)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(q.dims(), k.dims(), &self.spec)?;
        let grad = grad.contiguous()?;
        let name = self.name();
        let (dq, dk, dv) = with_cpu_f32(q, name, |q| {
            with_cpu_f32(k, name, |k| {
                with_cpu_f32(v, name, |v| {
                    with_cpu_f32(&grad, name, |go| self.backward(&g, (q, k, v), go))
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

impl FusedAttention {
    /// The output `[b, sq, hq]` for `q`, `k`, `v` of geometry `g`.
    fn forward(
        &self,
        g: &Geometry,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let mut out = super::gemm::zeroed(g.b * g.sq * g.hq);
        out.par_chunks_mut((g.sq * g.hq).max(1))
            .enumerate()
            .try_for_each(|(bi, out)| -> candle_core::Result<()> {
                let (q, k, v) = (
                    &q[bi * g.sq * g.hq..][..g.sq * g.hq],
                    &k[bi * g.s * g.hk..][..g.s * g.hk],
                    &v[bi * g.s * g.hk..][..g.s * g.hk],
                );
                let tiles = self.tiles(g, bi);
                let mut p = vec![0f32; Tile::largest(&tiles)];
                let mut dead = vec![false; g.sq];
                for h in self.heads(g, bi) {
                    for t in &tiles {
                        let (rows, w) = (t.rows.len(), t.keys.len());
                        self.probs(g, h, t, (q, k), &mut p, &mut dead)?;
                        let p = &mut p[..rows * w];
                        self.apply_dropout(g, h, t, p);
                        // out_h [rows, dh] = p [rows, w] · v_h [w, dh]
                        sgemm(
                            (rows, g.dh, w),
                            &mut out[t.rows.start * g.hq + h.qo..],
                            g.hq,
                            Mat::rows(p, w),
                            Mat {
                                data: &v[t.keys.start * g.hk + h.ko..],
                                rs: g.hk,
                                cs: 1,
                            },
                            1.0,
                            false,
                            Threads::One,
                        )?;
                    }
                }
                Ok(())
            })?;
        Ok(out)
    }

    /// The gradients of `q`, `k` and `v` given the output's, `go`.
    fn backward(
        &self,
        g: &Geometry,
        (q, k, v): (&[f32], &[f32], &[f32]),
        go: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (qn, kn) = (g.sq * g.hq, g.s * g.hk);
        let mut dq = super::gemm::zeroed(g.b * qn);
        let mut dk = super::gemm::zeroed(g.b * kn);
        let mut dv = super::gemm::zeroed(g.b * kn);
        dq.par_chunks_mut(qn.max(1))
            .zip(dk.par_chunks_mut(kn.max(1)))
            .zip(dv.par_chunks_mut(kn.max(1)))
            .enumerate()
            .try_for_each(|(bi, ((dq, dk), dv))| {
                let rows = (
                    &q[bi * qn..][..qn],
                    &k[bi * kn..][..kn],
                    &v[bi * kn..][..kn],
                    &go[bi * qn..][..qn],
                );
                self.backward_row(g, bi, rows, (dq, dk, dv))
            })?;
        Ok((dq, dk, dv))
    }

    /// The gradients of one batch row: `rows` are its `q`, `k`, `v` and output gradient;
    /// `dq` is written, `dk` and `dv` (zeroed by the caller) accumulate over the query heads
    /// that share each key/value head.
    fn backward_row(
        &self,
        g: &Geometry,
        bi: usize,
        (q, k, v, go): (&[f32], &[f32], &[f32], &[f32]),
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) -> candle_core::Result<()> {
        let tiles = self.tiles(g, bi);
        let size = Tile::largest(&tiles);
        let mut p = vec![0f32; size];
        let mut pd = vec![0f32; size];
        let mut dp = vec![0f32; size];
        let mut dead = vec![false; g.sq];
        let dropout = self.spec.dropout > 0.0;
        let mut factors = if dropout {
            vec![0f32; size]
        } else {
            Vec::new()
        };
        for h in self.heads(g, bi) {
            for t in &tiles {
                let (rows, w) = (t.rows.len(), t.keys.len());
                let (qo, ko) = (t.rows.start * g.hq + h.qo, t.keys.start * g.hk + h.ko);
                // This head's query-block rows of `q` and the output's gradient, and its
                // key-block rows of `k`.
                let at_q = |m| strided(m, qo, g.hq);
                let at_k = |m| strided(m, ko, g.hk);
                self.probs(g, h, t, (q, k), &mut p, &mut dead)?;
                let (p, pd, dp) = (&p[..rows * w], &mut pd[..rows * w], &mut dp[..rows * w]);
                pd.copy_from_slice(p);
                if dropout {
                    let factors = &mut factors[..rows * w];
                    self.dropout_factors(g, h, t, factors);
                    pd.iter_mut().zip(&*factors).for_each(|(x, f)| *x *= f);
                }
                // dv_h [w, dh] += pdᵀ [w, rows] · go_h [rows, dh]
                sgemm(
                    (w, g.dh, rows),
                    &mut dv[ko..],
                    g.hk,
                    Mat::transposed(pd, w),
                    at_q(go),
                    1.0,
                    true,
                    Threads::One,
                )?;
                // d(pd) [rows, w] = go_h [rows, dh] · v_hᵀ [dh, w]
                sgemm(
                    (rows, w, g.dh),
                    dp,
                    w,
                    at_q(go),
                    Mat {
                        data: &v[ko..],
                        rs: 1,
                        cs: g.hk,
                    },
                    1.0,
                    false,
                    Threads::One,
                )?;
                if dropout {
                    dp.iter_mut().zip(&factors).for_each(|(x, f)| *x *= f);
                }
                // Softmax backward: d(scores) = p ∘ (dp − Σ_j dp·p); zero where the weights
                // did not depend on the scores.
                let rows_of = p.chunks_exact(w.max(1)).zip(dp.chunks_exact_mut(w.max(1)));
                for ((prow, dprow), &dead) in rows_of.zip(&dead[..rows]) {
                    if dead {
                        dprow.fill(0.0);
                        continue;
                    }
                    softmax_grad_row(prow, dprow);
                }
                // dq_h [rows, dh] = scale · ds [rows, w] · k_h [w, dh]; every tile of a
                // query block is the same block, so this writes it once.
                sgemm(
                    (rows, g.dh, w),
                    &mut dq[qo..],
                    g.hq,
                    Mat::rows(dp, w),
                    at_k(k),
                    self.spec.scale,
                    false,
                    Threads::One,
                )?;
                // dk_h [w, dh] += scale · dsᵀ [w, rows] · q_h [rows, dh]
                sgemm(
                    (w, g.dh, rows),
                    &mut dk[ko..],
                    g.hk,
                    Mat::transposed(dp, w),
                    at_q(q),
                    self.spec.scale,
                    true,
                    Threads::One,
                )?;
            }
        }
        Ok(())
    }
}

/// `[.., cols]` rows of `m` from element `at` on, with row stride `rs`.
fn strided(m: &[f32], at: usize, rs: usize) -> Mat<'_> {
    Mat {
        data: &m[at..],
        rs,
        cs: 1,
    }
}

/// Queries per block in causal attention: small enough that skipping the keys after a
/// block's last query saves most of the upper triangle, large enough for efficient products.
const TILE_ROWS: usize = 64;

/// A block of queries (`rows`) and the keys any of them sees (`keys`).
struct Tile {
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
}

impl Tile {
    /// The largest `rows × keys` of `tiles` (the scratch size the blocks need).
    fn largest(tiles: &[Tile]) -> usize {
        tiles
            .iter()
            .map(|t| t.rows.len() * t.keys.len())
            .max()
            .unwrap_or(0)
    }
}

/// The same attention from candle's differentiable primitives (the reference the kernel is
/// tested against, and the path on other devices): heads split out, `f32::MIN` added where a
/// key is hidden, softmax, dropout with the kernel's own factors, heads joined again.
pub fn attention_primitive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec,
) -> candle_core::Result<Tensor> {
    let (b, sq, hq) = q.dims3()?;
    let s = k.dim(1)?;
    let (nh, nkv) = (spec.heads, spec.kv_heads);
    let dh = hq / nh;
    let rep = nh / nkv;
    let split = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        let t = x.dim(1)?;
        x.reshape((b, t, n, dh))?.transpose(1, 2)?.contiguous()
    };
    let expand = |x: Tensor| -> candle_core::Result<Tensor> {
        if rep == 1 {
            return Ok(x);
        }
        x.unsqueeze(2)?
            .repeat((1, 1, rep, 1, 1))?
            .reshape((b, nh, s, dh))
    };
    let (qh, kh, vh) = (
        split(q, nh)?,
        expand(split(k, nkv)?)?,
        expand(split(v, nkv)?)?,
    );
    let scores = (qh.matmul(&kh.t()?)? * spec.scale as f64)?;
    let op = FusedAttention { spec: spec.clone() };
    let g = Geometry {
        b,
        sq,
        s,
        dh,
        hq,
        hk: nkv * dh,
    };
    let mut bias = vec![0f32; b * sq * s];
    let mut factors = vec![1f32; b * nh * sq * s];
    for bi in 0..b {
        for i in 0..sq {
            for j in 0..s {
                if !op.visible(&g, bi, i, j) {
                    bias[(bi * sq + i) * s + j] = f32::MIN;
                }
                for head in 0..nh {
                    factors[((bi * nh + head) * sq + i) * s + j] =
                        spec.dropout_factor((bi, head, i, j), sq, s);
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, 1, sq, s), q.device())?;
    let probs = super::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?;
    let probs = if spec.dropout > 0.0 {
        (probs * Tensor::from_vec(factors, (b, nh, sq, s), q.device())?)?
    } else {
        probs
    };
    probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, sq, hq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::autograd::Backprop;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = splitmix64(seed.wrapping_mul(1_000_003) + i as u64) >> 40;
                (x as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// RoPE's `(cos, sin)` tables for positions `0..s`, `[s, dh / 2]` each.
    fn rotary_tables(s: usize, dh: usize) -> (Tensor, Tensor) {
        let half = dh / 2;
        let angle = |p: usize, i: usize| p as f32 / 10f32.powf(i as f32 / half as f32);
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = (0..s * half)
                .map(|x| f(angle(x / half, x % half)))
                .collect();
            Tensor::from_vec(v, (s, half), &Device::Cpu).unwrap()
        };
        (table(f32::cos), table(f32::sin))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Output and the gradients of `q`, `k`, `v` under a random linear loss.
    fn run(
        spec: &AttentionSpec,
        (b, sq, s, dh): (usize, usize, usize, usize),
        fused: bool,
    ) -> Vec<Tensor> {
        let dev = Device::Cpu;
        let q = Var::from_vec(
            values(b * sq * spec.heads * dh, 1, 1.5),
            (b, sq, spec.heads * dh),
            &dev,
        )
        .unwrap();
        let k = Var::from_vec(
            values(b * s * spec.kv_heads * dh, 2, 1.5),
            (b, s, spec.kv_heads * dh),
            &dev,
        )
        .unwrap();
        let v = Var::from_vec(
            values(b * s * spec.kv_heads * dh, 3, 1.0),
            (b, s, spec.kv_heads * dh),
            &dev,
        )
        .unwrap();
        let out = if fused {
            attention(&q, &k, &v, spec.clone()).unwrap().unwrap()
        } else {
            attention_primitive(&q, &k, &v, spec).unwrap()
        };
        let w = Tensor::from_vec(values(out.elem_count(), 4, 1.0), out.shape(), &dev).unwrap();
        let grads = (&out * &w).unwrap().sum_all().unwrap().backprop().unwrap();
        let mut all = vec![out.detach()];
        for var in [&q, &k, &v] {
            all.push(grads.get(var).expect("every input gets a gradient").clone());
        }
        all
    }

    fn assert_matches(spec: AttentionSpec, dims: (usize, usize, usize, usize)) {
        let fused = run(&spec, dims, true);
        let reference = run(&spec, dims, false);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&reference))
        {
            let diff = max_diff(a, b);
            assert!(diff < 2e-5, "{spec:?} {dims:?}: {name} differs by {diff}");
        }
    }

    #[test]
    fn matches_the_primitive_path_with_padding_and_dropout() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let (b, s) = (3, 7);
            // Row 0 full, row 1 with three pads, row 2 with one real token.
            let lens = [7usize, 4, 1];
            let mask = lens
                .iter()
                .flat_map(|&n| (0..s).map(move |j| if j < n { 1.0 } else { 0.0 }))
                .collect();
            let mut spec = AttentionSpec::new(4, 4, 0.35);
            spec.key_mask = Some(mask);
            assert_matches(spec.clone(), (b, s, s, 8));
            spec.dropout = 0.3;
            spec.seed = 99;
            assert_matches(spec, (b, s, s, 8));
        });
    }

    #[test]
    fn a_query_that_sees_no_key_weighs_every_key_alike() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            let (s, dh) = (5, 4);
            let q = Var::from_vec(values(s * 2 * dh, 1, 1.0), (1, s, 2 * dh), &dev).unwrap();
            let k = Tensor::from_vec(values(s * 2 * dh, 2, 1.0), (1, s, 2 * dh), &dev).unwrap();
            let v = Tensor::from_vec(values(s * 2 * dh, 3, 1.0), (1, s, 2 * dh), &dev).unwrap();
            let mut spec = AttentionSpec::new(2, 2, 0.5);
            spec.key_mask = Some(vec![0.0; s]);
            let out = attention(&q, &k, &v, spec).unwrap().unwrap();
            let mean = v
                .mean_keepdim(1)
                .unwrap()
                .broadcast_as(out.shape())
                .unwrap();
            assert!(max_diff(&out, &mean) < 1e-6);
            // The weights do not depend on the scores, so q gets a zero gradient.
            let grads = out.sum_all().unwrap().backprop().unwrap();
            let dq = grads.get(&q).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(dq.to_scalar::<f32>().unwrap(), 0.0);
        });
    }

    #[test]
    fn matches_the_primitive_path_causal_grouped_and_windowed() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let mut spec = AttentionSpec::new(6, 2, 0.25);
            spec.causal = true;
            assert_matches(spec.clone(), (2, 9, 9, 4));
            // Fewer queries than keys: the last queries of a longer sequence.
            assert_matches(spec.clone(), (2, 3, 9, 4));
            spec.window = Some(3);
            spec.key_mask = Some((0..18).map(|j| if j % 9 < 8 { 1.0 } else { 0.0 }).collect());
            assert_matches(spec, (2, 9, 9, 4));
        });
    }

    #[test]
    fn long_causal_sequences_in_query_blocks_match_the_primitive_path() {
        // 150 positions: causal queries run in blocks of TILE_ROWS (the last one partial),
        // each over the keys its queries see. Right padding of several lengths (one ending on
        // a block's edge), left padding with fewer queries than keys, a sliding window
        // (whose blocks start after the first key too), dropout. (Queries that see no key at all are `a_query_that_sees_no_key...`'s case:
        // the primitive path gives their scores a gradient, the kernel does not.)
        let (b, s) = (4, 150);
        let right = [150usize, 97, 30, 64];
        let right: Vec<f32> = right
            .iter()
            .flat_map(|&n| (0..s).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        let left = [0usize, 70, 75, 5];
        let left: Vec<f32> = left
            .iter()
            .flat_map(|&n| (0..s).map(move |j| if j < n { 0.0 } else { 1.0 }))
            .collect();
        let mut spec = AttentionSpec::new(4, 2, 0.3);
        spec.causal = true;
        assert_matches(spec.clone(), (b, s, s, 4));
        spec.key_mask = Some(right.clone());
        assert_matches(spec.clone(), (b, s, s, 4));
        spec.key_mask = Some(left);
        assert_matches(spec.clone(), (b, 70, s, 4));
        spec.key_mask = None;
        spec.window = Some(40);
        assert_matches(spec.clone(), (b, s, s, 4));
        spec.window = None;
        spec.key_mask = Some(right);
        spec.dropout = 0.2;
        spec.seed = 5;
        assert_matches(spec.clone(), (b, s, s, 4));
        // Not causal: one block, the keys trimmed to what the padding leaves.
        spec.causal = false;
        assert_matches(spec, (b, s, s, 4));
    }

    #[test]
    fn dropout_keeps_about_the_right_share_and_depends_on_the_seed() {
        let mut spec = AttentionSpec::new(2, 2, 1.0);
        spec.dropout = 0.25;
        spec.seed = 7;
        let n = 40_000;
        let factors: Vec<f32> = (0..n)
            .map(|j| spec.dropout_factor((0, 1, 0, j), 1, n))
            .collect();
        let kept = factors.iter().filter(|&&f| f > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(
            factors
                .iter()
                .all(|&f| f == 0.0 || (f - 1.0 / 0.75).abs() < 1e-6)
        );
        spec.seed = 8;
        let other: Vec<f32> = (0..n)
            .map(|j| spec.dropout_factor((0, 1, 0, j), 1, n))
            .collect();
        assert_ne!(factors, other);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 3, 6), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, AttentionSpec::new(2, 2, 1.0)).is_err());
        let k = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let mut spec = AttentionSpec::new(2, 2, 1.0);
        spec.key_mask = Some(vec![1.0; 5]);
        assert!(attention(&q, &k, &k, spec).is_err());
        assert!(attention(&q, &k, &k, AttentionSpec::new(3, 3, 1.0)).is_err());
    }

    #[test]
    fn the_fused_block_matches_projections_attention_and_residual_as_separate_ops() {
        use crate::nn::layers::Linear;
        let dev = Device::Cpu;
        let (b, s, h, heads) = (3, 12, 8, 2);
        let var = |n: usize, seed: u64, shape: &[usize]| {
            Var::from_vec(values(n, seed, 0.5), shape, &dev).unwrap()
        };
        let mut vars = Vec::new();
        let mut layers = Vec::new();
        for i in 0..4u64 {
            let (w, bias) = (var(h * h, 10 + i, &[h, h]), var(h, 20 + i, &[h]));
            layers.push(Linear {
                name: format!("p{i}"),
                weight: w.as_tensor().clone(),
                bias: Some(bias.as_tensor().clone()),
                lora: None,
            });
            vars.extend([w, bias]);
        }
        let n = var(b * s * h, 1, &[b, s, h]);
        let r = var(b * s * h, 2, &[b, s, h]);
        let loss_weights = Tensor::from_vec(values(b * s * h, 3, 1.0), (b, s, h), &dev).unwrap();
        let mut mask = vec![1f32; b * s];
        mask[s - 3..s].fill(0.0);
        for (dropout, key_mask) in [(0.0, None), (0.3, Some(mask))] {
            let spec = AttentionSpec {
                dropout,
                seed: 7,
                key_mask,
                ..AttentionSpec::new(heads, heads, 0.5)
            };
            let ls = [&layers[0], &layers[1], &layers[2], &layers[3]];
            let input = BlockInput::Residual {
                n: n.as_tensor().clone(),
                r: r.as_tensor().clone(),
            };
            let fused = residual_attention(&input, ls, spec.clone(), None, true)
                .unwrap()
                .expect("CPU f32 with enough rows takes the fused block");
            let proj = |l: &Linear| {
                l.forward(n.as_tensor())
                    .unwrap()
                    .reshape((b, s, h))
                    .unwrap()
            };
            let ctx = attention(&proj(ls[0]), &proj(ls[1]), &proj(ls[2]), spec)
                .unwrap()
                .unwrap();
            let separate =
                (ls[3].forward(&ctx).unwrap().reshape((b, s, h)).unwrap() + r.as_tensor()).unwrap();
            assert!(
                max_diff(&fused, &separate) < 1e-5,
                "dropout {dropout}: outputs differ"
            );
            let g1 = (fused * &loss_weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let g2 = (separate * &loss_weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let all: Vec<&Var> = vars.iter().chain([&n, &r]).collect();
            for (i, v) in all.into_iter().enumerate() {
                let (a, e) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                let d = max_diff(a, e);
                assert!(d < 1e-4, "dropout {dropout}: gradient {i} differs by {d}");
            }
        }
        // A weight derived from a variable (its gradient would have to flow on through
        // candle's graph): the separate ops run.
        let mut derived = layers.clone();
        derived[1].weight = (derived[1].weight.clone() * 1.0).unwrap();
        let ls = [&derived[0], &derived[1], &derived[2], &derived[3]];
        let spec = AttentionSpec::new(heads, heads, 0.5);
        assert!(
            residual_attention(
                &BlockInput::Residual {
                    n: n.as_tensor().clone(),
                    r: r.as_tensor().clone()
                },
                ls,
                spec,
                None,
                true
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn lora_adapters_inside_the_fused_block_match_separate_ops_and_leave_frozen_weights_alone() {
        // A decoder's attention under LoRA: frozen projections (plain tensors), trainable
        // adapters on some of them, the adapters' input dropout drawn from the block's hashed
        // masks (rebuilt here from the same seeds), grouped heads, RoPE and right padding.
        use crate::nn::layers::{Linear, seed_dropout};
        use crate::nn::lora::LoraAdapter;
        use crate::nn::mlp::Dropout;
        use crate::nn::ops::rope_seq_major;
        let dev = Device::Cpu;
        let (b, s, h, heads, kv, dh) = (2, 10, 8, 4, 2, 4);
        let (hq, hk) = (heads * dh, kv * dh);
        let (cos, sin) = rotary_tables(s, dh);
        let tensor = |n: usize, seed: u64, shape: &[usize]| {
            Tensor::from_vec(values(n, seed, 0.5), shape, &dev).unwrap()
        };
        let var = |n: usize, seed: u64, shape: &[usize]| {
            Var::from_vec(values(n, seed, 0.5), shape, &dev).unwrap()
        };
        let shapes = [(hq, h), (hk, h), (hk, h), (h, hq)];
        let lengths = [s, 6];
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&len| (0..s).map(move |j| if j < len { 1.0 } else { 0.0 }))
            .collect();
        let spec = AttentionSpec {
            causal: true,
            key_mask: Some(mask),
            ..AttentionSpec::new(heads, kv, 0.5)
        };
        let n = var(b * s * h, 1, &[b, s, h]);
        let r = var(b * s * h, 2, &[b, s, h]);
        let loss_weights = tensor(b * s * h, 3, &[b, s, h]);
        // q and v (the usual targets), then every projection, with and without dropout.
        for (targets, dropout) in [
            ([true, false, true, false], 0.0),
            ([true, false, true, false], 0.25),
            ([true; 4], 0.1),
        ] {
            let mut adapters = Vec::new();
            let mut layers = Vec::new();
            for (i, &(out, inp)) in shapes.iter().enumerate() {
                let rank = 2 + i;
                let lora = targets[i].then(|| {
                    let a = var(rank * inp, 30 + i as u64, &[rank, inp]);
                    let bv = var(out * rank, 40 + i as u64, &[out, rank]);
                    adapters.push((a.clone(), bv.clone()));
                    LoraAdapter {
                        a: a.as_tensor().clone(),
                        b: bv.as_tensor().clone(),
                        scale: 1.5,
                        dropout,
                    }
                });
                layers.push(Linear {
                    name: format!("p{i}"),
                    weight: tensor(out * inp, 10 + i as u64, &[out, inp]),
                    bias: (i < 3).then(|| tensor(out, 20 + i as u64, &[out])),
                    lora,
                });
            }
            let ls = [&layers[0], &layers[1], &layers[2], &layers[3]];
            let input = BlockInput::Residual {
                n: n.as_tensor().clone(),
                r: r.as_tensor().clone(),
            };
            seed_dropout(99);
            let fused = residual_attention(&input, ls, spec.clone(), Some((&cos, &sin)), true)
                .unwrap()
                .expect("CPU f32 with adapters takes the fused block");
            // The separate ops, with each adapter's mask drawn from the same seeds in the same
            // order (q, k, v, o).
            seed_dropout(99);
            let project = |l: &Linear, x: &Tensor, width: usize| {
                let base = l.forward(x).unwrap();
                let y = match &l.lora {
                    None => base,
                    Some(a) => {
                        let inp = x.dim(2).unwrap();
                        let mut m = vec![1f32; b * s * inp];
                        if let Some(d) = Dropout::new(dropout as f32) {
                            d.apply_parallel(&mut m);
                        }
                        let m = Tensor::from_vec(m, (b * s, inp), &dev).unwrap();
                        let x = (x.reshape((b * s, inp)).unwrap() * m).unwrap();
                        let delta = x
                            .matmul(&a.a.t().unwrap())
                            .unwrap()
                            .matmul(&a.b.t().unwrap())
                            .unwrap();
                        (base.reshape((b * s, width)).unwrap() + (delta * a.scale).unwrap())
                            .unwrap()
                    }
                };
                y.reshape((b, s, width)).unwrap()
            };
            let x = n.as_tensor();
            let q = rope_seq_major(&project(ls[0], x, hq), &cos, &sin, heads).unwrap();
            let k = rope_seq_major(&project(ls[1], x, hk), &cos, &sin, kv).unwrap();
            let v = project(ls[2], x, hk);
            let ctx = attention(&q, &k, &v, spec.clone()).unwrap().unwrap();
            let separate = (project(ls[3], &ctx, h) + r.as_tensor()).unwrap();
            let case = format!("{targets:?}, dropout {dropout}");
            assert!(max_diff(&fused, &separate) < 1e-5, "{case}: outputs differ");
            let loss = |y: Tensor| (y * &loss_weights).unwrap().sum_all().unwrap();
            let (g1, g2) = (
                loss(fused).backprop().unwrap(),
                loss(separate).backprop().unwrap(),
            );
            let trained = adapters.iter().flat_map(|(a, b)| [a, b]);
            for (i, v) in trained.chain([&n, &r]).enumerate() {
                let (a, e) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                let d = max_diff(a, e);
                assert!(d < 1e-4, "{case}: gradient {i} differs by {d}");
                assert!(
                    a.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                );
            }
            for l in &layers {
                assert!(
                    g1.get(&l.weight).is_none(),
                    "{case}: a frozen weight got a gradient"
                );
            }
        }
    }

    #[test]
    fn the_fused_block_with_grouped_heads_rotary_embeddings_and_some_biases_matches_separate_ops() {
        // A decoder's attention: 4 query heads over 2 key/value heads, RoPE on q and k, causal
        // with right padding, biases on q/k/v only (Qwen2) or on none (Llama).
        use crate::nn::layers::Linear;
        use crate::nn::ops::rope_seq_major;
        let dev = Device::Cpu;
        let (b, s, h, heads, kv, dh) = (3, 12, 8, 4, 2, 4);
        let (hq, hk) = (heads * dh, kv * dh);
        let (cos, sin) = rotary_tables(s, dh);
        let var = |n: usize, seed: u64, shape: &[usize]| {
            Var::from_vec(values(n, seed, 0.5), shape, &dev).unwrap()
        };
        let shapes = [(hq, h), (hk, h), (hk, h), (h, hq)];
        for biased in [[true, true, true, false], [false; 4]] {
            let mut vars = Vec::new();
            let mut layers = Vec::new();
            for (i, &(out, inp)) in shapes.iter().enumerate() {
                let w = var(out * inp, 10 + i as u64, &[out, inp]);
                let bias = biased[i].then(|| var(out, 20 + i as u64, &[out]));
                layers.push(Linear {
                    name: format!("p{i}"),
                    weight: w.as_tensor().clone(),
                    bias: bias.as_ref().map(|b| b.as_tensor().clone()),
                    lora: None,
                });
                vars.push(w);
                vars.extend(bias);
            }
            let n = var(b * s * h, 1, &[b, s, h]);
            let r = var(b * s * h, 2, &[b, s, h]);
            let weights = Tensor::from_vec(values(b * s * h, 3, 1.0), (b, s, h), &dev).unwrap();
            let lengths = [s, s - 4, 5];
            let mask: Vec<f32> = lengths
                .iter()
                .flat_map(|&len| (0..s).map(move |j| if j < len { 1.0 } else { 0.0 }))
                .collect();
            let spec = AttentionSpec {
                causal: true,
                key_mask: Some(mask),
                ..AttentionSpec::new(heads, kv, 0.5)
            };
            let ls = [&layers[0], &layers[1], &layers[2], &layers[3]];
            let input = BlockInput::Residual {
                n: n.as_tensor().clone(),
                r: r.as_tensor().clone(),
            };
            let fused = residual_attention(&input, ls, spec.clone(), Some((&cos, &sin)), true)
                .unwrap()
                .expect("CPU f32 with enough rows takes the fused block");
            let proj = |l: &Linear, width: usize| {
                l.forward(n.as_tensor())
                    .unwrap()
                    .reshape((b, s, width))
                    .unwrap()
            };
            let q = rope_seq_major(&proj(ls[0], hq), &cos, &sin, heads).unwrap();
            let k = rope_seq_major(&proj(ls[1], hk), &cos, &sin, kv).unwrap();
            let ctx = attention(&q, &k, &proj(ls[2], hk), spec).unwrap().unwrap();
            let out = ls[3].forward(&ctx).unwrap().reshape((b, s, h)).unwrap();
            let separate = (out + r.as_tensor()).unwrap();
            assert!(
                max_diff(&fused, &separate) < 1e-5,
                "{biased:?}: outputs differ"
            );
            let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let (g1, g2) = (
                loss(fused).backprop().unwrap(),
                loss(separate).backprop().unwrap(),
            );
            for (i, v) in vars.iter().chain([&n, &r]).enumerate() {
                let (a, e) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                let d = max_diff(a, e);
                assert!(d < 1e-4, "{biased:?}: gradient {i} differs by {d}");
            }
        }
        // Rotary tables that do not cover the sequence are an error, not a silent misuse.
        let layers: Vec<Linear> = shapes
            .iter()
            .map(|&(out, inp)| Linear {
                name: "p".into(),
                weight: Tensor::zeros((out, inp), DType::F32, &dev).unwrap(),
                bias: None,
                lora: None,
            })
            .collect();
        let x = Tensor::zeros((b, s, h), DType::F32, &dev).unwrap();
        let short = cos.narrow(0, 0, s - 1).unwrap();
        let ls = [&layers[0], &layers[1], &layers[2], &layers[3]];
        let spec = AttentionSpec::new(heads, kv, 0.5);
        let input = BlockInput::Residual { n: x.clone(), r: x };
        assert!(residual_attention(&input, ls, spec, Some((&short, &short)), true).is_err());
    }
}
