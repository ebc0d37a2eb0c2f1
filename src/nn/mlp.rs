//! A transformer's feed-forward block and its residual as one CPU kernel:
//! `y = r + dropout(gelu(x · w1ᵀ + b1) · w2ᵀ + b2)` ([`residual_mlp`]).
//!
//! Why one op: candle's backward gives every input of every op a fresh zero tensor and adds
//! the gradient into it, on the thread that drives the step while the pool waits. The
//! primitive block (two linears, the GELU, the add) hands it four inputs of the block's size,
//! two of them the width of the inner layer; this op hands it two of the hidden width (`x` and
//! `r`) and one of the parameters' size. In ViT-tiny training that accumulation was ~12% of
//! the samples, half of it this block's.
//!
//! The forward keeps the pre-activation (`x · w1ᵀ + b1`) and the GELU's output for the
//! backward when a gradient is tracked, as the primitive path does (recomputing the GELU
//! instead cost MiniLM's short rows more than it saved). The backward recomputes the dropout
//! mask from its seed (each element's
//! keep-or-drop is a hash of the seed and its index, so the mask is never stored and is
//! drawn in parallel).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::block::{Adapter, BlockInput, BlockKernel, Gradients, Kept, Weights, zeroed_where};
use super::gemm::{
    linear, linear_input_gradient, linear_rows, linear_weight_gradient, repeated, zeroed,
};
use super::layers::Linear;
use super::ops::{column_sums, exp_f32, gelu_chunk, gelu_grad_chunk};
use super::simd::wide_fn;

/// `r + dropout(fc2(gelu(fc1(x))), p)` (exact, erf GELU; inverted dropout, none when `p` is 0)
/// over the last dimension of `x` `[.., in]`, with `r` of the output's shape `[.., out]`: one
/// fused CPU kernel forward and one backward. The layers' LoRA adapters are computed inside
/// the op, their dropout (when `train`) included. `None` where it does not apply (off the
/// CPU, not f32, a layer without a bias, a weight derived from a variable): the caller's
/// primitive path then runs. Gradients flow to `x` and `r` through candle and to the
/// parameters that are variables through [`super::autograd`].
pub fn residual_mlp(
    x: &Tensor,
    r: &Tensor,
    fc1: &Linear,
    fc2: &Linear,
    p: f32,
    train: bool,
) -> candle_core::Result<Option<Tensor>> {
    let input = BlockInput::Residual {
        n: x.clone(),
        r: r.clone(),
    };
    residual_mlp_block(&input, fc1, fc2, p, train)
}

/// [`residual_mlp`] on any [`BlockInput`]: with [`BlockInput::LayerNormed`], a pre-norm
/// encoder's (ViT's) whole feed-forward half layer, `x + dropout(fc2(gelu(fc1(ln(x)))))`, as
/// one op.
pub fn residual_mlp_block(
    input: &BlockInput,
    fc1: &Linear,
    fc2: &Linear,
    p: f32,
    train: bool,
) -> candle_core::Result<Option<Tensor>> {
    let (Some(b1), Some(b2)) = (&fc1.bias, &fc2.bias) else {
        return Ok(None);
    };
    if !input.native() || !Adapter::native(fc1) || !Adapter::native(fc2) {
        return Ok(None);
    }
    let (inner, hidden) = fc1.weight.dims2()?;
    let (out, inner2) = fc2.weight.dims2()?;
    if inner2 != inner {
        candle_core::bail!("residual mlp: fc1 [{inner}, {hidden}], fc2 [{out}, {inner2}]")
    }
    input.check(hidden, out)?;
    let mut flat = vec![
        fc1.weight.clone(),
        b1.clone(),
        fc2.weight.clone(),
        b2.clone(),
    ];
    let adapters = [
        Adapter::of(fc1, (inner, hidden), &mut flat, train)?,
        Adapter::of(fc2, (out, inner), &mut flat, train)?,
    ];
    let Some(weights) = Weights::new(flat) else {
        return Ok(None);
    };
    let kernel = ResidualMlp {
        hidden,
        inner,
        out,
        keep: input.tracked(&weights),
        variables: weights.variables(),
        adapters,
        kept: Kept::new(),
        dropout: Dropout::new(p),
    };
    let mut out_dims = input.input().dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    let y = input.rows(hidden, out)?.apply(kernel, weights)?;
    Ok(Some(y.reshape(out_dims)?))
}

/// [`residual_mlp`]'s kernel: inputs `(x [rows, hidden], r [rows, out], params)`, the
/// parameters flat in the order `w1 [inner, hidden]`, `b1`, `w2 [out, inner]`, `b2`, then
/// the adapters' `A` and `B` (fc1's, fc2's).
struct ResidualMlp {
    hidden: usize,
    inner: usize,
    out: usize,
    /// Whether the forward keeps the pre-activation for a backward.
    keep: bool,
    /// Which weights are variables (the others get no gradient computed).
    variables: Vec<bool>,
    /// fc1's and fc2's adapters, where they have one.
    adapters: [Option<Adapter>; 2],
    /// What the forward keeps for the backward.
    kept: Kept<MlpSaved>,
    dropout: Option<Dropout>,
}

/// What [`ResidualMlp`]'s backward needs of its forward.
struct MlpSaved {
    /// The pre-activation and the activation, `[rows, inner]`.
    pre: Vec<f32>,
    act: Vec<f32>,
    /// The adapters' first products (fc1's, fc2's).
    down: [Option<Vec<f32>>; 2],
}

/// Inverted dropout with a hashed mask: element `i` is kept when the top 32 bits of
/// `splitmix64(seed ^ i·φ)` fall below `keep · 2³²`, and scaled by `1 / keep`.
#[derive(Clone, Copy)]
pub(crate) struct Dropout {
    seed: u64,
    threshold: u64,
    scale: f32,
}

impl Dropout {
    /// `None` for `p` 0 (or not a probability below 1).
    pub(crate) fn new(p: f32) -> Option<Self> {
        if !(p > 0.0 && p < 1.0) {
            return None;
        }
        let keep = 1.0 - p as f64;
        Some(Dropout {
            seed: super::layers::dropout_seed(),
            threshold: (keep * 4_294_967_296.0) as u64,
            scale: (1.0 / keep) as f32,
        })
    }

    /// Multiplies every element of `v` (element 0 being index `offset`) by its factor:
    /// `1 / keep` or 0.
    pub(super) fn apply(&self, v: &mut [f32], offset: usize) {
        dropout_chunk(v, offset as u64, self.seed, self.threshold, self.scale);
    }

    /// The seed, the keep threshold (of the hash's top 32 bits) and the scale, for a device
    /// kernel that hashes the same mask.
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn parts(&self) -> (u64, u64, f32) {
        (self.seed, self.threshold, self.scale)
    }

    /// [`Dropout::apply`] to the whole of `v` (element 0 being index 0), on every core.
    pub(super) fn apply_parallel(&self, v: &mut [f32]) {
        v.par_chunks_mut(TASK)
            .enumerate()
            .for_each(|(c, part)| self.apply(part, c * TASK));
    }
}

/// 2⁶⁴ / φ, the multiplier that spreads consecutive indices over the hash's input.
const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

wide_fn! {
    /// [`Dropout::apply`]'s loop, branch-free so that the hashes vectorise (AVX-512 multiplies
    /// 64-bit lanes).
    fn dropout_chunk(v: &mut [f32], offset: u64, seed: u64, threshold: u64, scale: f32) {
        for (i, v) in v.iter_mut().enumerate() {
            let bits = super::attention::splitmix64(seed ^ (offset + i as u64).wrapping_mul(PHI));
            *v *= if (bits >> 32) < threshold { scale } else { 0.0 };
        }
    }
}

/// The four weights of a [`ResidualMlp`] block.
struct Params<'a> {
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
}

impl ResidualMlp {
    fn sizes(&self) -> [usize; 4] {
        [
            self.inner * self.hidden,
            self.inner,
            self.out * self.inner,
            self.out,
        ]
    }

    fn params<'a>(&self, p: &[&'a [f32]]) -> candle_core::Result<Params<'a>> {
        let sizes: Vec<usize> = p.iter().map(|w| w.len()).collect();
        let count = 4 + 2 * self.adapters.iter().flatten().count();
        let adapters_fit = self.adapters.iter().flatten().all(|a| a.fits(p));
        match p {
            &[w1, b1, w2, b2, ..]
                if p.len() == count && adapters_fit && sizes[..4] == self.sizes() =>
            {
                Ok(Params { w1, b1, w2, b2 })
            }
            _ => candle_core::bail!(
                "residual mlp: weights of {sizes:?}, {:?} expected",
                self.sizes()
            ),
        }
    }

    /// The pre-activation `x · w1ᵀ + b1` (+ fc1's adapter), `[rows, inner]`, the activation,
    /// and fc1's and fc2's adapters' first products.
    fn forward_parts(
        &self,
        x: &[f32],
        p: &Params,
        weights: &[&[f32]],
    ) -> candle_core::Result<MlpSaved> {
        let mut pre = linear(x, p.w1, Some(p.b1), (self.inner, self.hidden))?;
        let down1 = match &self.adapters[0] {
            Some(a) => {
                let u = a.down(weights, x)?;
                a.up(weights, &u, &mut pre)?;
                Some(u)
            }
            None => None,
        };
        let act = gelu(&pre);
        let down2 = self.adapters[1]
            .as_ref()
            .map(|a| a.down(weights, &act))
            .transpose()?;
        Ok(MlpSaved {
            pre,
            act,
            down: [down1, down2],
        })
    }
}

/// Elements per parallel task of the element-wise passes.
pub(super) const TASK: usize = 1 << 14;

/// GELU (erf form) of every element.
fn gelu(pre: &[f32]) -> Vec<f32> {
    let mut act = zeroed(pre.len());
    act.par_chunks_mut(TASK)
        .zip(pre.par_chunks(TASK))
        .for_each(|(a, p)| gelu_chunk(a, p));
    act
}

impl BlockKernel for ResidualMlp {
    fn name(&self) -> &'static str {
        "kiln-residual-mlp"
    }

    fn widths(&self) -> (usize, usize) {
        (self.hidden, self.out)
    }

    fn forward(&self, x: &[f32], r: &[f32], weights: &[&[f32]]) -> candle_core::Result<Vec<f32>> {
        let p = self.params(weights)?;
        let rows = x.len() / self.hidden.max(1);
        if r.len() != rows * self.out {
            candle_core::bail!("residual mlp: {} residual values for {rows} rows", r.len())
        }
        let saved = self.forward_parts(x, &p, weights)?;
        // z = act · w2ᵀ + b2 (+ fc2's adapter); y = r + dropout(z).
        let mut y = repeated(p.b2, rows);
        linear_rows(&mut y, &saved.act, p.w2, (self.out, self.inner), true)?;
        if let (Some(a), Some(u)) = (&self.adapters[1], &saved.down[1]) {
            a.up(weights, u, &mut y)?;
        }
        y.par_chunks_mut(TASK)
            .zip(r.par_chunks(TASK))
            .enumerate()
            .for_each(|(c, (y, r))| {
                if let Some(d) = &self.dropout {
                    d.apply(y, c * TASK);
                }
                for (y, r) in y.iter_mut().zip(r) {
                    *y += r;
                }
            });
        self.kept.keep(self.keep, saved);
        Ok(y)
    }

    fn backward(
        &self,
        x: &[f32],
        weights: &[&[f32]],
        g: &[f32],
        want_x: bool,
        want_p: bool,
    ) -> candle_core::Result<Gradients> {
        // The gradient through the dropout (the residual's is `g` itself).
        let gz;
        let g = match &self.dropout {
            Some(d) => {
                gz = {
                    let mut gz = g.to_vec();
                    d.apply_parallel(&mut gz);
                    gz
                };
                &gz[..]
            }
            None => g,
        };
        let (hidden, inner, out) = (self.hidden, self.inner, self.out);
        let kept = self.kept.take();
        let p = self.params(weights)?;
        let rows = x.len() / hidden.max(1);
        let MlpSaved { mut pre, act, down } = match kept {
            Some(saved) if saved.pre.len() == rows * inner => saved,
            _ => self.forward_parts(x, &p, weights)?,
        };
        if !(want_x || want_p) {
            return Ok((None, None));
        }
        // Frozen weights (a LoRA adapter's base layers) keep empty slots: no gradient.
        let mut dp = if want_p {
            zeroed_where(weights, &self.variables)
        } else {
            Vec::new()
        };
        if want_p {
            // dw2 [out, inner] = gᵀ · gelu(pre); db2 = column sums of g.
            if !dp[2].is_empty() {
                linear_weight_gradient(&mut dp[2], g, &act, (out, inner))?;
            }
            if !dp[3].is_empty() {
                dp[3].copy_from_slice(&column_sums(g, out));
            }
        }
        // d(pre) = (g · w2 + fc2's adapter's share) ⊙ gelu'(pre), written over `pre`.
        let mut dpre = zeroed(rows * inner);
        linear_input_gradient(&mut dpre, g, p.w2, (out, inner), false)?;
        if let (Some(a), Some(u)) = (&self.adapters[1], &down[1]) {
            let dp = want_p.then_some(dp.as_mut_slice());
            a.backward((weights, dp), (g, &act, u), Some(&mut dpre))?;
        }
        drop(act);
        pre.par_chunks_mut(TASK)
            .zip(dpre.par_chunks(TASK))
            .for_each(|(pre, d)| gelu_grad_chunk(pre, d));
        drop(dpre);
        let dpre = pre;
        if want_p {
            // dw1 [inner, hidden] = dpreᵀ · x; db1 = column sums of dpre.
            if !dp[0].is_empty() {
                linear_weight_gradient(&mut dp[0], &dpre, x, (inner, hidden))?;
            }
            if !dp[1].is_empty() {
                dp[1].copy_from_slice(&column_sums(&dpre, inner));
            }
        }
        let mut dx = if want_x {
            // dx [rows, hidden] = dpre · w1 (+ fc1's adapter's share, below).
            let mut dx = zeroed(rows * hidden);
            linear_input_gradient(&mut dx, &dpre, p.w1, (inner, hidden), false)?;
            Some(dx)
        } else {
            None
        };
        if let (Some(a), Some(u)) = (&self.adapters[0], &down[0]) {
            let dp = want_p.then_some(dp.as_mut_slice());
            a.backward((weights, dp), (&dpre, x, u), dx.as_deref_mut())?;
        }
        Ok((dx, Some(dp).filter(|_| want_p)))
    }
}

/// `r + down(silu(gate(n)) ⊙ up(n))`, the gated feed-forward block of Llama/Qwen-family
/// decoders, with its residual (and, for [`BlockInput::RmsNormed`], the RMSNorm before it:
/// `x + down(..(rms_norm(x)))`): one fused CPU kernel forward and one backward, as
/// [`residual_mlp`]. The projections' LoRA adapters are computed inside the op, their dropout
/// (when `train`) included; frozen weights get no gradient computed. `None` where it does not
/// apply (off the CPU, not f32, a projection with a bias, a weight derived from a variable).
pub fn residual_swiglu(
    input: &BlockInput,
    gate: &Linear,
    up: &Linear,
    down: &Linear,
    train: bool,
) -> candle_core::Result<Option<Tensor>> {
    let layers = [gate, up, down];
    if layers.iter().any(|l| l.bias.is_some()) {
        return Ok(None);
    }
    let native = layers.iter().all(|l| {
        l.weight.device().is_cpu() && l.weight.dtype() == DType::F32 && Adapter::native(l)
    });
    if !native || !input.native() {
        return Ok(None);
    }
    let (inner, hidden) = gate.weight.dims2()?;
    let (out, inner2) = down.weight.dims2()?;
    if up.weight.dims() != [inner, hidden] || inner2 != inner {
        candle_core::bail!(
            "residual swiglu: gate [{inner}, {hidden}], up {:?}, down [{out}, {inner2}]",
            up.weight.dims()
        )
    }
    input.check(hidden, out)?;
    let mut flat = vec![gate.weight.clone(), up.weight.clone(), down.weight.clone()];
    let shapes = [(inner, hidden), (inner, hidden), (out, inner)];
    let mut adapters: [Option<Adapter>; 3] = Default::default();
    for (i, l) in layers.iter().enumerate() {
        adapters[i] = Adapter::of(l, shapes[i], &mut flat, train)?;
    }
    let Some(weights) = Weights::new(flat) else {
        return Ok(None);
    };
    let kernel = ResidualSwiglu {
        hidden,
        inner,
        out,
        keep: input.tracked(&weights),
        variables: weights.variables(),
        adapters,
        kept: Kept::new(),
    };
    let mut out_dims = input.input().dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    let y = input.rows(hidden, out)?.apply(kernel, weights)?;
    Ok(Some(y.reshape(out_dims)?))
}

/// [`residual_swiglu`]'s kernel on rows `[rows, hidden]` (see `nn::block`), the parameters
/// flat in the order `gate [inner, hidden]`, `up [inner, hidden]`, `down [out, inner]`, then
/// the adapters' `A` and `B` in the same order.
struct ResidualSwiglu {
    hidden: usize,
    inner: usize,
    out: usize,
    keep: bool,
    /// Which weights are variables (the others get no gradient computed).
    variables: Vec<bool>,
    /// The gate's, the up and the down projection's adapters, where they have one.
    adapters: [Option<Adapter>; 3],
    /// The gate's and the up projection's outputs `[rows, inner]` and the activation, kept by
    /// the forward for the backward.
    kept: Kept<SwigluSaved>,
}

/// What [`ResidualSwiglu`]'s backward needs of its forward.
struct SwigluSaved {
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// Each adapter's first product (gate, up, down).
    down: [Option<Vec<f32>>; 3],
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-v))
}

impl ResidualSwiglu {
    /// The `(gate, up, down)` weights.
    #[allow(clippy::type_complexity)]
    fn params<'a>(
        &self,
        p: &[&'a [f32]],
    ) -> candle_core::Result<(&'a [f32], &'a [f32], &'a [f32])> {
        let (gate, down) = (self.inner * self.hidden, self.out * self.inner);
        let count = 3 + 2 * self.adapters.iter().flatten().count();
        let adapters_fit = self.adapters.iter().flatten().all(|a| a.fits(p));
        match p {
            &[wg, wu, wd, ..]
                if p.len() == count
                    && adapters_fit
                    && wg.len() == gate
                    && wu.len() == gate
                    && wd.len() == down =>
            {
                Ok((wg, wu, wd))
            }
            _ => candle_core::bail!(
                "residual swiglu: weights of {:?}, [{gate}, {gate}, {down}] expected",
                p.iter().map(|w| w.len()).collect::<Vec<_>>()
            ),
        }
    }

    /// `x · wᵀ` (+ its adapter's output) for one of the two input projections (`i` 0 or 1),
    /// `[rows, inner]`, and the adapter's first product.
    fn project(
        &self,
        p: &[&[f32]],
        i: usize,
        x: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut y = linear(x, p[i], None, (self.inner, self.hidden))?;
        let Some(a) = &self.adapters[i] else {
            return Ok((y, None));
        };
        let u = a.down(p, x)?;
        a.up(p, &u, &mut y)?;
        Ok((y, Some(u)))
    }

    fn forward_parts(&self, x: &[f32], p: &[&[f32]]) -> candle_core::Result<SwigluSaved> {
        let (gate, down_gate) = self.project(p, 0, x)?;
        let (up, down_up) = self.project(p, 1, x)?;
        let mut act = zeroed(gate.len());
        act.par_chunks_mut(TASK)
            .zip(gate.par_chunks(TASK).zip(up.par_chunks(TASK)))
            .for_each(|(a, (g, u))| swiglu_chunk(a, g, u));
        let down_down = self.adapters[2]
            .as_ref()
            .map(|a| a.down(p, &act))
            .transpose()?;
        Ok(SwigluSaved {
            gate,
            up,
            act,
            down: [down_gate, down_up, down_down],
        })
    }
}

wide_fn! {
    /// `a = silu(g) ⊙ u`, element by element.
    pub(super) fn swiglu_chunk(a: &mut [f32], g: &[f32], u: &[f32]) {
        for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
            *a = g * sigmoid(g) * u;
        }
    }
}

wide_fn! {
    /// From `d(act)`: `d(gate)` over `gs` and `d(up)` over `us`, element by element.
    pub(super) fn swiglu_grad_chunk(gs: &mut [f32], us: &mut [f32], ds: &[f32]) {
        for ((g, u), &d) in gs.iter_mut().zip(us.iter_mut()).zip(ds) {
            let s = sigmoid(*g);
            let silu = *g * s;
            let dsilu = s * (1.0 + *g * (1.0 - s));
            let uv = *u;
            *g = d * uv * dsilu;
            *u = d * silu;
        }
    }
}

impl BlockKernel for ResidualSwiglu {
    fn name(&self) -> &'static str {
        "kiln-residual-swiglu"
    }

    fn widths(&self) -> (usize, usize) {
        (self.hidden, self.out)
    }

    fn forward(&self, x: &[f32], r: &[f32], p: &[&[f32]]) -> candle_core::Result<Vec<f32>> {
        let (_, _, wd) = self.params(p)?;
        let rows = x.len() / self.hidden.max(1);
        if r.len() != rows * self.out {
            candle_core::bail!(
                "residual swiglu: {} residual values for {rows} rows",
                r.len()
            )
        }
        let saved = self.forward_parts(x, p)?;
        let mut y = zeroed(r.len());
        y.par_chunks_mut(TASK)
            .zip(r.par_chunks(TASK))
            .for_each(|(y, r)| y.copy_from_slice(r));
        linear_rows(&mut y, &saved.act, wd, (self.out, self.inner), true)?;
        if let (Some(a), Some(u)) = (&self.adapters[2], &saved.down[2]) {
            a.up(p, u, &mut y)?;
        }
        self.kept.keep(self.keep, saved);
        Ok(y)
    }

    fn backward(
        &self,
        x: &[f32],
        p: &[&[f32]],
        g: &[f32],
        want_x: bool,
        want_p: bool,
    ) -> candle_core::Result<Gradients> {
        let (hidden, inner, out) = (self.hidden, self.inner, self.out);
        let kept = self.kept.take();
        let (wg, wu, wd) = self.params(p)?;
        let rows = x.len() / hidden.max(1);
        let SwigluSaved {
            gate,
            up,
            act,
            down,
        } = match kept {
            Some(saved) if saved.gate.len() == rows * inner => saved,
            _ => self.forward_parts(x, p)?,
        };
        if !(want_x || want_p) {
            return Ok((None, None));
        }
        // Frozen weights (a LoRA adapter's base layers) keep empty slots: no gradient.
        let mut dp = if want_p {
            zeroed_where(p, &self.variables)
        } else {
            Vec::new()
        };
        if want_p && !dp[2].is_empty() {
            // d(down) [out, inner] = gᵀ · act.
            linear_weight_gradient(&mut dp[2], g, &act, (out, inner))?;
        }
        // d(act) = g · down (+ its adapter's share); then d(gate) = d(act) ⊙ up ⊙ silu'(gate)
        // and d(up) = d(act) ⊙ silu(gate), written over `gate` and `up`.
        let mut dact = zeroed(rows * inner);
        linear_input_gradient(&mut dact, g, wd, (out, inner), false)?;
        if let (Some(a), Some(u)) = (&self.adapters[2], &down[2]) {
            let dp = want_p.then_some(dp.as_mut_slice());
            a.backward((p, dp), (g, &act, u), Some(&mut dact))?;
        }
        drop(act);
        let (mut dgate, mut dup) = (gate, up);
        dgate
            .par_chunks_mut(TASK)
            .zip(dup.par_chunks_mut(TASK))
            .zip(dact.par_chunks(TASK))
            .for_each(|((gs, us), ds)| swiglu_grad_chunk(gs, us, ds));
        drop(dact);
        if want_p {
            for (i, d) in [&dgate, &dup].into_iter().enumerate() {
                if !dp[i].is_empty() {
                    // d(w) [inner, hidden] = dᵀ · x.
                    linear_weight_gradient(&mut dp[i], d, x, (inner, hidden))?;
                }
            }
        }
        let mut dx = if want_x {
            // dx = d(gate) · gate_w + d(up) · up_w (+ their adapters' shares, below).
            let mut dx = zeroed(rows * hidden);
            for (i, (d, w)) in [(&dgate, wg), (&dup, wu)].into_iter().enumerate() {
                linear_input_gradient(&mut dx, d, w, (inner, hidden), i > 0)?;
            }
            Some(dx)
        } else {
            None
        };
        for (i, d) in [&dgate, &dup].into_iter().enumerate() {
            if let (Some(a), Some(u)) = (&self.adapters[i], &down[i]) {
                let dp = want_p.then_some(dp.as_mut_slice());
                a.backward((p, dp), (d, x, u), dx.as_deref_mut())?;
            }
        }
        Ok((dx, Some(dp).filter(|_| want_p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::autograd::Backprop;
    use candle_core::{Device, Var};

    fn linear(
        name: &str,
        out: usize,
        inp: usize,
        seed: f32,
        trainable: bool,
    ) -> (Linear, Vec<Var>) {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i as f32 + seed) * 0.37).sin() * 0.3)
            .collect();
        let b: Vec<f32> = (0..out)
            .map(|i| ((i as f32 + seed) * 0.91).cos() * 0.1)
            .collect();
        let w = Tensor::from_vec(w, (out, inp), &dev).unwrap();
        let b = Tensor::from_vec(b, out, &dev).unwrap();
        if trainable {
            let (w, b) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
            let layer = Linear {
                name: name.into(),
                weight: w.as_tensor().clone(),
                bias: Some(b.as_tensor().clone()),
                lora: None,
            };
            (layer, vec![w, b])
        } else {
            let layer = Linear {
                name: name.into(),
                weight: w,
                bias: Some(b),
                lora: None,
            };
            (layer, vec![])
        }
    }

    /// The same block from candle's primitive ops (and their backward).
    fn primitive(x: &Tensor, r: &Tensor, fc1: &Linear, fc2: &Linear) -> Tensor {
        let h = x
            .broadcast_matmul(&fc1.weight.t().unwrap())
            .unwrap()
            .broadcast_add(fc1.bias.as_ref().unwrap())
            .unwrap()
            .gelu_erf()
            .unwrap();
        let y = h
            .broadcast_matmul(&fc2.weight.t().unwrap())
            .unwrap()
            .broadcast_add(fc2.bias.as_ref().unwrap())
            .unwrap();
        (y + r).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len(), "{what}");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{what}: differs by {worst}");
    }

    #[test]
    fn fused_block_matches_primitive_ops_forward_and_backward() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            for trainable in [true, false] {
                let (b, s, h, inner) = (4, 9, 8, 12);
                let x =
                    Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, h), &dev).unwrap()).unwrap();
                let r =
                    Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, h), &dev).unwrap()).unwrap();
                let (fc1, mut vars) = linear("fc1", inner, h, 1.0, trainable);
                let (fc2, v2) = linear("fc2", h, inner, 2.0, trainable);
                vars.extend(v2);
                // A loss that weighs every output differently.
                let weights = Tensor::randn(0f32, 1.0, (b, s, h), &dev).unwrap();
                let fused = residual_mlp(x.as_tensor(), r.as_tensor(), &fc1, &fc2, 0.0, true)
                    .unwrap()
                    .expect("CPU f32 takes the fused kernel");
                let reference = primitive(x.as_tensor(), r.as_tensor(), &fc1, &fc2);
                close(&fused, &reference, "output");
                let g1 = (fused * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backprop()
                    .unwrap();
                let g2 = (reference * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backprop()
                    .unwrap();
                for (name, t) in [("x", x.as_tensor()), ("r", r.as_tensor())] {
                    close(g1.get(t).unwrap(), g2.get(t).unwrap(), name);
                }
                for (i, v) in vars.iter().enumerate() {
                    let got = g1
                        .get(v.as_tensor())
                        .expect("every parameter gets a gradient");
                    close(
                        got,
                        g2.get(v.as_tensor()).unwrap(),
                        &format!("parameter {i}"),
                    );
                }
                if !trainable {
                    assert!(
                        g1.get(&fc1.weight).is_none()
                            && g1.get(&fc2.bias.clone().unwrap()).is_none()
                    );
                }
            }
        });
    }

    #[test]
    fn dropout_drops_some_outputs_scales_the_rest_and_backpropagates_through_the_same_mask() {
        let dev = Device::Cpu;
        let (rows, h, inner) = (64, 16, 24);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap()).unwrap();
        let r = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap()).unwrap();
        let (fc1, mut vars) = linear("fc1", inner, h, 1.0, true);
        let (fc2, v2) = linear("fc2", h, inner, 2.0, true);
        vars.extend(v2);
        let weights = Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap();
        let fused = residual_mlp(x.as_tensor(), r.as_tensor(), &fc1, &fc2, 0.5, true)
            .unwrap()
            .unwrap();
        // The block without its residual, from primitive ops.
        let zero = Tensor::zeros((rows, h), DType::F32, &dev).unwrap();
        let z = primitive(x.as_tensor(), &zero, &fc1, &fc2);
        // Every element is dropped (y = r) or kept and doubled (y = r + 2z), both often.
        let delta: Vec<f32> = (&fused - r.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let zv: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
        let mask: Vec<f32> = delta
            .iter()
            .zip(&zv)
            .map(|(d, z)| {
                if d.abs() < 1e-6 {
                    0.0
                } else {
                    assert!((d - 2.0 * z).abs() < 1e-4, "kept {d} is not 2 x {z}");
                    2.0
                }
            })
            .collect();
        let kept = mask.iter().filter(|m| **m > 0.0).count();
        assert!((400..624).contains(&kept), "{kept} of 1024 kept at p = 0.5");
        // The same mask on primitive ops gives the same gradients.
        let mask = Tensor::from_vec(mask, (rows, h), &dev).unwrap();
        let reference = ((z * mask).unwrap() + r.as_tensor()).unwrap();
        close(&fused, &reference, "output");
        let g1 = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        let g2 = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        for (name, t) in [("x", x.as_tensor()), ("r", r.as_tensor())] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap(), name);
        }
        for (i, v) in vars.iter().enumerate() {
            close(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
                &format!("parameter {i}"),
            );
        }
    }

    fn no_bias(l: Linear) -> Linear {
        Linear { bias: None, ..l }
    }

    #[test]
    fn fused_gated_block_matches_primitive_ops_forward_and_backward() {
        crate::nn::simd::test_cap::at_each_level(|_| {
            let dev = Device::Cpu;
            for trainable in [true, false] {
                let (rows, h, inner) = (40, 8, 20);
                let x =
                    Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap()).unwrap();
                let r =
                    Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap()).unwrap();
                let (gate, mut vars) = linear("gate", inner, h, 1.0, trainable);
                let (up, v) = linear("up", inner, h, 2.0, trainable);
                vars.extend(v);
                let (down, v) = linear("down", h, inner, 3.0, trainable);
                vars.extend(v);
                // The bias Vars are not used (Llama-family projections have none).
                let vars: Vec<Var> = vars.into_iter().step_by(2).collect();
                let (gate, up, down) = (no_bias(gate), no_bias(up), no_bias(down));
                let weights = Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap();
                let input = BlockInput::Residual {
                    n: x.as_tensor().clone(),
                    r: r.as_tensor().clone(),
                };
                let fused = residual_swiglu(&input, &gate, &up, &down, true)
                    .unwrap()
                    .expect("CPU f32 takes the fused kernel");
                let xt = x.as_tensor();
                let act = (xt
                    .matmul(&gate.weight.t().unwrap())
                    .unwrap()
                    .silu()
                    .unwrap()
                    * xt.matmul(&up.weight.t().unwrap()).unwrap())
                .unwrap();
                let reference =
                    (act.matmul(&down.weight.t().unwrap()).unwrap() + r.as_tensor()).unwrap();
                close(&fused, &reference, "output");
                let g1 = (fused * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backprop()
                    .unwrap();
                let g2 = (reference * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backprop()
                    .unwrap();
                for (name, t) in [("x", x.as_tensor()), ("r", r.as_tensor())] {
                    close(g1.get(t).unwrap(), g2.get(t).unwrap(), name);
                }
                for (i, v) in vars.iter().enumerate() {
                    let got = g1.get(v.as_tensor()).expect("every weight gets a gradient");
                    close(got, g2.get(v.as_tensor()).unwrap(), &format!("weight {i}"));
                }
                if !trainable {
                    assert!(g1.get(&gate.weight).is_none());
                }
            }
            // A projection with a bias takes the primitive path.
            let x = Tensor::zeros((40, 8), DType::F32, &dev).unwrap();
            let (gate, _) = linear("gate", 20, 8, 1.0, false);
            let (up, _) = linear("up", 20, 8, 2.0, false);
            let (down, _) = linear("down", 8, 20, 3.0, false);
            let input = BlockInput::Residual {
                n: x.clone(),
                r: x.clone(),
            };
            assert!(
                residual_swiglu(&input, &gate, &no_bias(up), &no_bias(down), true)
                    .unwrap()
                    .is_none()
            );
        });
    }

    #[test]
    fn the_gated_block_with_its_rms_norm_inside_matches_norm_block_and_residual_as_separate_ops() {
        // A pre-norm decoder's feed-forward half: x + swiglu(rms_norm(x) · w), the norm's scale
        // and the projections trainable or frozen, the input always tracked.
        let dev = Device::Cpu;
        let (rows, h, inner, eps) = (40, 8, 20, 1e-5);
        for trainable in [true, false] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap()).unwrap();
            let scale = Tensor::randn(1f32, 0.2, h, &dev).unwrap();
            let scale_var = Var::from_tensor(&scale).unwrap();
            let norm_w = if trainable {
                scale_var.as_tensor().clone()
            } else {
                scale
            };
            let (gate, mut vars) = linear("gate", inner, h, 1.0, trainable);
            let (up, v) = linear("up", inner, h, 2.0, trainable);
            vars.extend(v);
            let (down, v) = linear("down", h, inner, 3.0, trainable);
            vars.extend(v);
            let mut vars: Vec<Var> = vars.into_iter().step_by(2).collect();
            if trainable {
                vars.push(scale_var);
            }
            let (gate, up, down) = (no_bias(gate), no_bias(up), no_bias(down));
            let weights = Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap();
            let input = BlockInput::RmsNormed {
                x: x.as_tensor().clone(),
                weight: norm_w.clone(),
                eps,
            };
            let fused = residual_swiglu(&input, &gate, &up, &down, true)
                .unwrap()
                .expect("CPU f32 takes the fused kernel");
            let n = super::super::ops::rms_norm_primitive(x.as_tensor(), &norm_w, eps).unwrap();
            let act = (n.matmul(&gate.weight.t().unwrap()).unwrap().silu().unwrap()
                * n.matmul(&up.weight.t().unwrap()).unwrap())
            .unwrap();
            let reference =
                (act.matmul(&down.weight.t().unwrap()).unwrap() + x.as_tensor()).unwrap();
            close(&fused, &reference, "output");
            let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let (g1, g2) = (
                loss(fused).backprop().unwrap(),
                loss(reference).backprop().unwrap(),
            );
            close(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
                "x",
            );
            for (i, v) in vars.iter().enumerate() {
                let got = g1.get(v.as_tensor()).expect("every weight gets a gradient");
                close(got, g2.get(v.as_tensor()).unwrap(), &format!("weight {i}"));
            }
            if !trainable {
                assert!(g1.get(&gate.weight).is_none() && g1.get(&norm_w).is_none());
            }
        }
    }

    /// `l`'s output with its adapter as separate ops, `l(x) + scale · ((x ⊙ mask) · Aᵀ) · Bᵀ`,
    /// the mask drawn from `dropout` as the fused kernels draw theirs.
    fn with_adapter(l: &Linear, x: &Tensor, dropout: Option<&Dropout>) -> Tensor {
        let base = l.forward(x).unwrap();
        let Some(a) = &l.lora else { return base };
        let x = match dropout {
            Some(d) => {
                let mut m = vec![1f32; x.elem_count()];
                d.apply_parallel(&mut m);
                (x * Tensor::from_vec(m, x.shape(), x.device()).unwrap()).unwrap()
            }
            None => x.clone(),
        };
        let delta = x
            .matmul(&a.a.t().unwrap())
            .unwrap()
            .matmul(&a.b.t().unwrap())
            .unwrap();
        (base + (delta * a.scale).unwrap()).unwrap()
    }

    /// `layers` with adapters of rank 3 (trainable `A` and `B`, random) where `targets` says,
    /// and the adapters' variables.
    fn adapted(
        mut layers: Vec<Linear>,
        targets: &[bool],
        scale: f64,
        dropout: f64,
    ) -> (Vec<Linear>, Vec<Var>) {
        let mut vars = Vec::new();
        for (l, _) in layers.iter_mut().zip(targets).filter(|(_, t)| **t) {
            let (out, inp) = l.weight.dims2().unwrap();
            let randn = |shape| Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
            let a = Var::from_tensor(&randn((3, inp))).unwrap();
            let b = Var::from_tensor(&randn((out, 3))).unwrap();
            l.lora = Some(crate::nn::lora::LoraAdapter {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale,
                dropout,
            });
            vars.extend([a, b]);
        }
        (layers, vars)
    }

    /// A fused block against its separate-op `reference`: the outputs, the gradients of the
    /// `trained` variables, and none for the frozen layers' weights.
    fn fused_matches_reference(
        fused: Tensor,
        reference: Tensor,
        loss_weights: &Tensor,
        trained: &[&Var],
        layers: &[Linear],
        case: &str,
    ) {
        close(&fused, &reference, &format!("{case}: output"));
        let loss = |y: Tensor| (y * loss_weights).unwrap().sum_all().unwrap();
        let (g1, g2) = (
            loss(fused).backprop().unwrap(),
            loss(reference).backprop().unwrap(),
        );
        for (i, v) in trained.iter().enumerate() {
            let got = g1
                .get(v.as_tensor())
                .expect("every variable gets a gradient");
            close(
                got,
                g2.get(v.as_tensor()).unwrap(),
                &format!("{case}: gradient {i}"),
            );
        }
        for l in layers {
            assert!(
                g1.get(&l.weight).is_none(),
                "{case}: a frozen weight got a gradient"
            );
        }
    }

    #[test]
    fn lora_adapters_inside_the_gated_block_match_separate_ops_and_leave_frozen_weights_alone() {
        // `all-linear` LoRA on a decoder's feed-forward half: frozen projections, adapters on
        // some or all of them, their input dropout rebuilt here from the same seeds.
        use crate::nn::layers::seed_dropout;
        let dev = Device::Cpu;
        let (rows, h, inner) = (24, 8, 20);
        let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
        let x = Var::from_tensor(&randn((rows, h))).unwrap();
        let r = Var::from_tensor(&randn((rows, h))).unwrap();
        let weights = randn((rows, h));
        for (targets, dropout) in [([true, false, true], 0.0), ([true; 3], 0.2)] {
            let base = [(inner, h), (inner, h), (h, inner)]
                .iter()
                .enumerate()
                .map(|(i, &(out, inp))| Linear {
                    name: format!("p{i}"),
                    weight: randn((out, inp)),
                    bias: None,
                    lora: None,
                })
                .collect();
            let (layers, adapters) = adapted(base, &targets, 2.0, dropout);
            let input = BlockInput::Residual {
                n: x.as_tensor().clone(),
                r: r.as_tensor().clone(),
            };
            seed_dropout(5);
            let fused = residual_swiglu(&input, &layers[0], &layers[1], &layers[2], true)
                .unwrap()
                .expect("CPU f32 with adapters takes the fused kernel");
            // The masks in the kernel's order: gate, up, down.
            seed_dropout(5);
            let masks: Vec<Option<Dropout>> = layers
                .iter()
                .map(|l| l.lora.as_ref().and_then(|_| Dropout::new(dropout as f32)))
                .collect();
            let project = |i: usize, x: &Tensor| with_adapter(&layers[i], x, masks[i].as_ref());
            let xt = x.as_tensor();
            let act = (project(0, xt).silu().unwrap() * project(1, xt)).unwrap();
            let reference = (project(2, &act) + r.as_tensor()).unwrap();
            let trained: Vec<&Var> = adapters.iter().chain([&x, &r]).collect();
            let case = format!("{targets:?}, dropout {dropout}");
            fused_matches_reference(fused, reference, &weights, &trained, &layers, &case);
        }
    }

    #[test]
    fn dropout_masks_are_the_same_at_every_simd_level_and_split() {
        let keep = 0.7f64;
        let d = Dropout {
            seed: 12_345,
            threshold: (keep * 4_294_967_296.0) as u64,
            scale: (1.0 / keep) as f32,
        };
        let n = 1003;
        let want: Vec<f32> = (0..n as u64)
            .map(|i| {
                let bits = crate::nn::attention::splitmix64(12_345 ^ i.wrapping_mul(PHI));
                if (bits >> 32) < d.threshold {
                    d.scale
                } else {
                    0.0
                }
            })
            .collect();
        let kept = want.iter().filter(|&&f| f > 0.0).count() as f64 / n as f64;
        assert!((kept - keep).abs() < 0.05, "kept {kept}");
        crate::nn::simd::test_cap::at_each_level(|cap| {
            let mut v = vec![1f32; n];
            let (a, b) = v.split_at_mut(500);
            d.apply(a, 0);
            d.apply(b, 500);
            assert_eq!(v, want, "level {cap:?}");
            let mut w = vec![1f32; n];
            d.apply_parallel(&mut w);
            assert_eq!(w, want, "level {cap:?}, in parallel");
        });
    }

    #[test]
    fn lora_adapters_inside_the_gelu_block_match_separate_ops() {
        // BERT's or ViT's feed-forward block with LoRA on `intermediate.dense` and
        // `output.dense` (biased, frozen), the adapters' input dropout rebuilt from the seeds.
        use crate::nn::layers::seed_dropout;
        let dev = Device::Cpu;
        let (rows, h, inner) = (24, 8, 20);
        let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
        let x = Var::from_tensor(&randn((rows, h))).unwrap();
        let r = Var::from_tensor(&randn((rows, h))).unwrap();
        let weights = randn((rows, h));
        for (targets, dropout) in [([false, true], 0.0), ([true, true], 0.3)] {
            let base = vec![
                linear("fc1", inner, h, 0.0, false).0,
                linear("fc2", h, inner, 1.0, false).0,
            ];
            let (layers, adapters) = adapted(base, &targets, 0.5, dropout);
            seed_dropout(11);
            let fused = residual_mlp(
                x.as_tensor(),
                r.as_tensor(),
                &layers[0],
                &layers[1],
                0.0,
                true,
            )
            .unwrap()
            .expect("CPU f32 with adapters takes the fused kernel");
            seed_dropout(11);
            let masks: Vec<Option<Dropout>> = layers
                .iter()
                .map(|l| l.lora.as_ref().and_then(|_| Dropout::new(dropout as f32)))
                .collect();
            let project = |i: usize, x: &Tensor| with_adapter(&layers[i], x, masks[i].as_ref());
            let act = project(0, x.as_tensor()).gelu_erf().unwrap();
            let reference = (project(1, &act) + r.as_tensor()).unwrap();
            let trained: Vec<&Var> = adapters.iter().chain([&x, &r]).collect();
            let case = format!("{targets:?}, dropout {dropout}");
            fused_matches_reference(fused, reference, &weights, &trained, &layers, &case);
        }
    }

    #[test]
    fn a_layer_without_a_bias_or_with_a_derived_weight_takes_the_primitive_path() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((32, 4), DType::F32, &dev).unwrap();
        let (fc1, _) = linear("fc1", 6, 4, 1.0, false);
        let (mut fc2, _) = linear("fc2", 4, 6, 2.0, false);
        assert!(
            residual_mlp(&x, &x, &fc1, &fc2, 0.0, true)
                .unwrap()
                .is_some()
        );
        // A weight derived from a variable: its gradient must flow on through candle's graph.
        let (mut derived, _) = linear("fc1", 6, 4, 1.0, true);
        derived.weight = (derived.weight * 1.0).unwrap();
        assert!(
            residual_mlp(&x, &x, &derived, &fc2, 0.0, true)
                .unwrap()
                .is_none()
        );
        fc2.bias = None;
        assert!(
            residual_mlp(&x, &x, &fc1, &fc2, 0.0, true)
                .unwrap()
                .is_none()
        );
        // An adapter runs inside the op, but not one of another dtype.
        let (mut fc2, _) = linear("fc2", 4, 6, 2.0, false);
        let adapter = crate::nn::lora::LoraAdapter {
            a: Tensor::zeros((2, 6), DType::F32, &dev).unwrap(),
            b: Tensor::zeros((4, 2), DType::F32, &dev).unwrap(),
            scale: 1.0,
            dropout: 0.0,
        };
        fc2.lora = Some(adapter.clone());
        assert!(
            residual_mlp(&x, &x, &fc1, &fc2, 0.0, true)
                .unwrap()
                .is_some()
        );
        fc2.lora = Some(crate::nn::lora::LoraAdapter {
            b: adapter.b.to_dtype(DType::BF16).unwrap(),
            ..adapter
        });
        assert!(
            residual_mlp(&x, &x, &fc1, &fc2, 0.0, true)
                .unwrap()
                .is_none()
        );
    }
}
