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

use super::gemm::{Mat, Threads, sgemm};
use super::ops::{cpu_f32, exp_f32, with_cpu_f32};

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

/// Sum of `xs` in eight lanes, so it vectorises (a single running sum cannot be reordered).
fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `a · b` in eight lanes.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest of `xs` (`-inf` when empty) in eight lanes.
fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// A well-mixed 64-bit hash of `x` (the SplitMix64 finaliser).
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
/// residual, as one CPU op with its own backward (the projections, [`attention`]'s kernel and
/// the residual add): candle's backward then gives fresh zero tensors to two inputs of the
/// hidden width instead of eight (see `nn::mlp` for why that matters). `n` and `r` are
/// `[batch, seq, hidden]`; the four projections are `[hidden, hidden]` with biases (no
/// grouped-query heads). `None` where it does not apply (off the CPU, not f32, an adapter, a
/// projection without a bias or of another shape, fewer rows than 4× the hidden width): the
/// caller's separate ops then run.
pub fn residual_attention(
    n: &Tensor,
    r: &Tensor,
    [q, k, v, o]: [&super::layers::Linear; 4],
    spec: AttentionSpec,
) -> candle_core::Result<Option<Tensor>> {
    let layers = [q, k, v, o];
    let native = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Ok((b, s, h)) = n.dims3() else {
        return Ok(None);
    };
    let fits = layers.iter().all(|l| {
        l.lora.is_none()
            && native(&l.weight)
            && l.weight.dims() == [h, h]
            && l.bias
                .as_ref()
                .is_some_and(|b| native(b) && b.dims() == [h])
    });
    if !fits || !native(n) || !native(r) || spec.heads != spec.kv_heads || b * s < 4 * h {
        return Ok(None);
    }
    if r.dims() != n.dims() {
        candle_core::bail!(
            "residual attention: n {:?}, residual {:?}",
            n.dims(),
            r.dims()
        )
    }
    let g = Geometry::new(n.dims(), n.dims(), &spec)?;
    g.check(&spec)?;
    let mut flat = Vec::with_capacity(8);
    for l in layers {
        flat.push(l.weight.flatten_all()?);
        if let Some(bias) = &l.bias {
            flat.push(bias.clone());
        }
    }
    let params = Tensor::cat(&flat, 0)?;
    let op = ResidualAttention {
        attn: FusedAttention { spec },
        g,
        keep: n.track_op() || params.track_op(),
        kept: std::sync::Mutex::new(None),
    };
    Ok(Some(n.contiguous()?.apply_op3_arc(
        &r.contiguous()?,
        &params,
        std::sync::Arc::new(Box::new(op)),
    )?))
}

/// [`residual_attention`]'s kernel: inputs `(n, r, params)`, the parameters flat as the four
/// projections' `(weight [h, h], bias [h])` in the order q, k, v, o.
struct ResidualAttention {
    attn: FusedAttention,
    g: Geometry,
    keep: bool,
    /// `q`, `k`, `v` and the attention's output, kept by the forward for the backward.
    kept: std::sync::Mutex<Option<[Vec<f32>; 4]>>,
}

impl ResidualAttention {
    /// Projection `i`'s (weight, bias) in the flat parameters.
    fn projection<'a>(&self, p: &'a [f32], i: usize) -> (&'a [f32], &'a [f32]) {
        let h = self.g.hq;
        let at = i * (h * h + h);
        (&p[at..at + h * h], &p[at + h * h..at + h * h + h])
    }

    /// `n · wᵀ + b`.
    fn project(&self, n: &[f32], (w, b): (&[f32], &[f32])) -> candle_core::Result<Vec<f32>> {
        let h = self.g.hq;
        let rows = n.len() / h.max(1);
        let mut y = super::gemm::repeated(b, rows);
        sgemm(
            (rows, h, h),
            &mut y,
            h,
            Mat::rows(n, h),
            Mat::transposed(w, h),
            1.0,
            true,
            Threads::All,
        )?;
        Ok(y)
    }

    /// `q`, `k`, `v` and the attention's output for `n`.
    fn inner(&self, n: &[f32], p: &[f32]) -> candle_core::Result<[Vec<f32>; 4]> {
        let q = self.project(n, self.projection(p, 0))?;
        let k = self.project(n, self.projection(p, 1))?;
        let v = self.project(n, self.projection(p, 2))?;
        let ctx = self.attn.forward(&self.g, &q, &k, &v)?;
        Ok([q, k, v, ctx])
    }
}

impl CustomOp3 for ResidualAttention {
    fn name(&self) -> &'static str {
        "kiln-residual-attention"
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
        let n = cpu_f32(s1, l1, self.name())?;
        let r = cpu_f32(s2, l2, self.name())?;
        let p = cpu_f32(s3, l3, self.name())?;
        let h = self.g.hq;
        if p.len() != 4 * (h * h + h) || n.len() != r.len() {
            candle_core::bail!("residual attention: {} parameters for width {h}", p.len())
        }
        let saved = self.inner(n, p)?;
        let (wo, bo) = self.projection(p, 3);
        // y = r + bo, then += ctx · woᵀ.
        let mut y = super::gemm::zeroed(r.len());
        y.par_chunks_mut(h * 64)
            .zip(r.par_chunks(h * 64))
            .for_each(|(y, r)| {
                for (yr, rr) in y.chunks_exact_mut(h).zip(r.chunks_exact(h)) {
                    for ((y, r), b) in yr.iter_mut().zip(rr).zip(bo) {
                        *y = r + b;
                    }
                }
            });
        let rows = n.len() / h.max(1);
        sgemm(
            (rows, h, h),
            &mut y,
            h,
            Mat::rows(&saved[3], h),
            Mat::transposed(wo, h),
            1.0,
            true,
            Threads::All,
        )?;
        if self.keep
            && let Ok(mut slot) = self.kept.lock()
        {
            *slot = Some(saved);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        n: &Tensor,
        r: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (want_n, want_p) = (n.track_op(), params.track_op());
        let name = self.name();
        let h = self.g.hq;
        let kept = self.kept.lock().ok().and_then(|mut slot| slot.take());
        let (dn, dp) = with_cpu_f32(n, name, |n| {
            with_cpu_f32(params, name, |p| {
                with_cpu_f32(&grad, name, |g| {
                    let rows = n.len() / h.max(1);
                    let [q, k, v, ctx] = match kept {
                        Some(saved) if saved[0].len() == rows * h => saved,
                        _ => self.inner(n, p)?,
                    };
                    let mut dp = if want_p {
                        super::gemm::zeroed(p.len())
                    } else {
                        Vec::new()
                    };
                    // Projection i's (weight, bias) gradients from its output's gradient `d`
                    // and its input `x`: dW = dᵀ · x, db = column sums of d.
                    let param_grads = |dp: &mut [f32],
                                       i: usize,
                                       d: &[f32],
                                       x: &[f32]|
                     -> candle_core::Result<()> {
                        let at = i * (h * h + h);
                        let (dw, db) = dp[at..at + h * h + h].split_at_mut(h * h);
                        sgemm(
                            (h, h, rows),
                            dw,
                            h,
                            Mat::transposed(d, h),
                            Mat::rows(x, h),
                            1.0,
                            false,
                            Threads::All,
                        )?;
                        db.copy_from_slice(&super::ops::column_sums(d, h));
                        Ok(())
                    };
                    if want_p {
                        param_grads(&mut dp, 3, g, &ctx)?;
                    }
                    if !(want_n || want_p) {
                        return Ok((None, None));
                    }
                    // d(ctx) = g · wo, then through the attention.
                    let mut dctx = super::gemm::zeroed(rows * h);
                    sgemm(
                        (rows, h, h),
                        &mut dctx,
                        h,
                        Mat::rows(g, h),
                        Mat::rows(self.projection(p, 3).0, h),
                        1.0,
                        false,
                        Threads::All,
                    )?;
                    drop(ctx);
                    let (dq, dk, dv) = self.attn.backward(&self.g, (&q, &k, &v), &dctx)?;
                    drop((q, k, v, dctx));
                    if want_p {
                        for (i, d) in [&dq, &dk, &dv].into_iter().enumerate() {
                            param_grads(&mut dp, i, d, n)?;
                        }
                    }
                    let dn = if want_n {
                        // dn = dq · wq + dk · wk + dv · wv.
                        let mut dn = super::gemm::zeroed(rows * h);
                        for (i, d) in [&dq, &dk, &dv].into_iter().enumerate() {
                            sgemm(
                                (rows, h, h),
                                &mut dn,
                                h,
                                Mat::rows(d, h),
                                Mat::rows(self.projection(p, i).0, h),
                                1.0,
                                i > 0,
                                Threads::All,
                            )?;
                        }
                        Some(dn)
                    } else {
                        None
                    };
                    Ok((dn, Some(dp).filter(|_| want_p)))
                })
            })
        })?;
        super::mlp::block_gradients((n, r, params), &grad, dn, dp)
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

    /// The attention weights of one head, before dropout, into `p` `[sq, s]`; `dead[i]` is set
    /// for a query that sees no key (its weights are uniform and do not depend on the scores).
    fn probs(
        &self,
        g: &Geometry,
        h: Head,
        (q, k): (&[f32], &[f32]),
        p: &mut [f32],
        dead: &mut [bool],
    ) -> candle_core::Result<()> {
        let (sq, s) = (g.sq, g.s);
        sgemm(
            (sq, s, g.dh),
            p,
            s,
            Mat {
                data: &q[h.qo..],
                rs: g.hq,
                cs: 1,
            },
            Mat {
                data: &k[h.ko..],
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
            .map(|m| &m[h.bi * s..(h.bi + 1) * s]);
        for (i, (row, dead)) in p.chunks_exact_mut(s).zip(dead.iter_mut()).enumerate() {
            // The causal window is a range of keys; the padding mask picks within it.
            let (lo, hi) = self.window(g, i);
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
            let max = max_f32(seen);
            *dead = max == f32::NEG_INFINITY;
            if *dead {
                row.fill(1.0 / s as f32);
                continue;
            }
            // Separate passes so each vectorises (a running sum would serialise the exps).
            // exp_f32 gives exactly 0 for a hidden key's -inf.
            seen.iter_mut().for_each(|x| *x = exp_f32(*x - max));
            let inv = 1.0 / sum_f32(seen);
            seen.iter_mut().for_each(|x| *x *= inv);
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

    /// Multiplies `p` `[sq, s]` by the dropout factors of head `h`.
    fn apply_dropout(&self, g: &Geometry, h: Head, p: &mut [f32]) {
        if self.spec.dropout <= 0.0 {
            return;
        }
        for (i, row) in p.chunks_exact_mut(g.s).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x *= self.spec.dropout_factor((h.bi, h.head, i, j), g.sq, g.s);
            }
        }
    }

    /// The dropout factors of head `h` into `f` `[sq, s]` (drawn once for the two uses in
    /// backward).
    fn dropout_factors(&self, g: &Geometry, h: Head, f: &mut [f32]) {
        f.fill(1.0);
        self.apply_dropout(g, h, f);
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
                let mut p = vec![0f32; g.sq * g.s];
                let mut dead = vec![false; g.sq];
                for h in self.heads(g, bi) {
                    self.probs(g, h, (q, k), &mut p, &mut dead)?;
                    self.apply_dropout(g, h, &mut p);
                    // out_h [sq, dh] = p [sq, s] · v_h [s, dh]
                    sgemm(
                        (g.sq, g.dh, g.s),
                        &mut out[h.qo..],
                        g.hq,
                        Mat::rows(&p, g.s),
                        Mat {
                            data: &v[h.ko..],
                            rs: g.hk,
                            cs: 1,
                        },
                        1.0,
                        false,
                        Threads::One,
                    )?;
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
        let (sq, s) = (g.sq, g.s);
        let mut p = vec![0f32; sq * s];
        let mut pd = vec![0f32; sq * s];
        let mut dp = vec![0f32; sq * s];
        let mut dead = vec![false; sq];
        let dropout = self.spec.dropout > 0.0;
        let mut factors = if dropout {
            vec![0f32; sq * s]
        } else {
            Vec::new()
        };
        let go_head = |h: Head| Mat {
            data: &go[h.qo..],
            rs: g.hq,
            cs: 1,
        };
        for h in self.heads(g, bi) {
            self.probs(g, h, (q, k), &mut p, &mut dead)?;
            pd.copy_from_slice(&p);
            if dropout {
                self.dropout_factors(g, h, &mut factors);
                pd.iter_mut().zip(&factors).for_each(|(x, f)| *x *= f);
            }
            // dv_h [s, dh] += pdᵀ [s, sq] · go_h [sq, dh]
            sgemm(
                (s, g.dh, sq),
                &mut dv[h.ko..],
                g.hk,
                Mat::transposed(&pd, s),
                go_head(h),
                1.0,
                true,
                Threads::One,
            )?;
            // d(pd) [sq, s] = go_h [sq, dh] · v_hᵀ [dh, s]
            sgemm(
                (sq, s, g.dh),
                &mut dp,
                s,
                go_head(h),
                Mat {
                    data: &v[h.ko..],
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
            // Softmax backward: d(scores) = p ∘ (dp − Σ_j dp·p); zero where the weights did not
            // depend on the scores.
            for ((prow, dprow), &dead) in p.chunks_exact(s).zip(dp.chunks_exact_mut(s)).zip(&dead) {
                if dead {
                    dprow.fill(0.0);
                    continue;
                }
                let dot = dot_f32(prow, dprow);
                for (d, &pj) in dprow.iter_mut().zip(prow) {
                    *d = pj * (*d - dot);
                }
            }
            // dq_h [sq, dh] = scale · ds [sq, s] · k_h [s, dh]
            sgemm(
                (sq, g.dh, s),
                &mut dq[h.qo..],
                g.hq,
                Mat::rows(&dp, s),
                Mat {
                    data: &k[h.ko..],
                    rs: g.hk,
                    cs: 1,
                },
                self.spec.scale,
                false,
                Threads::One,
            )?;
            // dk_h [s, dh] += scale · dsᵀ [s, sq] · q_h [sq, dh]
            sgemm(
                (s, g.dh, sq),
                &mut dk[h.ko..],
                g.hk,
                Mat::transposed(&dp, s),
                Mat {
                    data: &q[h.qo..],
                    rs: g.hq,
                    cs: 1,
                },
                self.spec.scale,
                true,
                Threads::One,
            )?;
        }
        Ok(())
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
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = splitmix64(seed.wrapping_mul(1_000_003) + i as u64) >> 40;
                (x as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
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
        let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
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
    }

    #[test]
    fn a_query_that_sees_no_key_weighs_every_key_alike() {
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
        let grads = out.sum_all().unwrap().backward().unwrap();
        let dq = grads.get(&q).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(dq.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn matches_the_primitive_path_causal_grouped_and_windowed() {
        let mut spec = AttentionSpec::new(6, 2, 0.25);
        spec.causal = true;
        assert_matches(spec.clone(), (2, 9, 9, 4));
        // Fewer queries than keys: the last queries of a longer sequence.
        assert_matches(spec.clone(), (2, 3, 9, 4));
        spec.window = Some(3);
        spec.key_mask = Some((0..18).map(|j| if j % 9 < 8 { 1.0 } else { 0.0 }).collect());
        assert_matches(spec, (2, 9, 9, 4));
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
            let fused = residual_attention(n.as_tensor(), r.as_tensor(), ls, spec.clone())
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
                .backward()
                .unwrap();
            let g2 = (separate * &loss_weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
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
        // Too few rows for the fusion to pay: the separate ops run.
        let short = n.as_tensor().narrow(1, 0, 2).unwrap();
        let ls = [&layers[0], &layers[1], &layers[2], &layers[3]];
        let spec = AttentionSpec::new(heads, heads, 0.5);
        assert!(
            residual_attention(&short, &short, ls, spec)
                .unwrap()
                .is_none()
        );
    }
}
