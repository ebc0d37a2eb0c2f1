//! A trainable decoder-only language model (Llama, Qwen2, Mistral) that loads Hugging Face
//! checkpoints by their tensor names.
//!
//! Mirrors `transformers`' `LlamaForCausalLM` and its near-identical siblings: pre-norm layers
//! with RMSNorm, grouped-query attention with rotary positions (the `rotate_half` convention), a
//! SiLU-gated MLP, and an LM head that may be tied to the token embeddings. The families differ
//! only by config: Qwen2 has q/k/v biases, Mistral may have a sliding attention window, Llama
//! optional biases and `llama3` rope scaling. None of them uses dropout, so the base model has
//! none; LoRA adapters have their own.
//!
//! Every op on the training path has a backward (see DESIGN.md, "Training on candle"): RMSNorm
//! and RoPE are kiln's fused kernels from [`ops`], softmax is the differentiable one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::attention::{self, AttentionSpec};
use super::block::BlockInput;
use super::layers::{Checkpoint, Embedding, Linear, RmsNorm, WeightSource, load_model_weights};
use super::lora::{LoraAdapter, LoraConfig, lora_rng};
use super::{NnError, Result, mlp, ops};

/// How a layer's attention hides keys.
#[derive(Clone, Copy)]
struct Masks<'a> {
    /// The additive mask (`f32::MIN` where hidden), when anything is hidden.
    bias: Option<&'a Tensor>,
    /// Training and scoring: the real length of each right-padded row, so the fused kernel
    /// can build its own causal and padding masks.
    lengths: Option<&'a [usize]>,
    /// Decoding with a cache of left-padded rows: where each row's real tokens start.
    starts: Option<&'a [usize]>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

/// The model types this module builds.
const DECODER_TYPES: [&str; 3] = ["llama", "qwen2", "mistral"];

/// The subset of a Hugging Face Llama / Qwen2 / Mistral `config.json` that the architecture
/// depends on.
///
/// Unknown keys are ignored. [`DecoderConfig::from_file`] fills the defaults that depend on
/// other keys (`num_key_value_heads`, Qwen2's `attention_bias`) and reads transformers 5's
/// `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// `"llama"`, `"qwen2"` or `"mistral"`.
    pub model_type: String,
    /// Hugging Face class names (`["LlamaForCausalLM"]`), kept so a written config loads in
    /// `transformers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Rows of the embedding table and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one head; `hidden_size / num_attention_heads` when absent. Never written as
    /// `null`: transformers' Qwen2 would take that for the width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Only `"silu"` is supported; kept to reject other activations loudly.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// `null`, or `{"rope_type" (or "type"): "default" | "linear" | "llama3", ...}`; other
    /// scalings are rejected by [`DecoderConfig::validate`].
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub max_position_embeddings: usize,
    /// The LM head is the embedding table (no `lm_head.weight` in the checkpoint).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (and on o for Llama). Defaults to true for Qwen2, false otherwise.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections (a Llama option).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's attention window: a position attends to this many most recent positions,
    /// itself included. Ignored for Llama; Qwen2 uses it only with `use_sliding_window`.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for its (per-layer) sliding window; kiln rejects `true`.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Qwen2's count of full-attention layers; kept for round trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Beginning-of-sequence token id, if the model has one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id: a number or a list of numbers in HF configs.
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Storage dtype of the checkpoint (`"bfloat16"`, `"float32"`); kiln computes in f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RopeScaling {
    None,
    /// Positions divided by `factor` (frequencies likewise).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

impl DecoderConfig {
    /// Reads, completes and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |source| NnError::ConfigParse {
            path: path.to_path_buf(),
            source,
        };
        let mut value: Value = serde_json::from_str(&text).map_err(parse_err)?;
        fill_defaults(&mut value);
        let cfg: Self = serde_json::from_value(value).map_err(parse_err)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether `model_type` is one this module builds (`llama`, `qwen2`, `mistral`).
    pub fn is_decoder_type(model_type: &str) -> bool {
        DECODER_TYPES.contains(&model_type)
    }

    /// Checks the invariants the architecture relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NnError::InvalidConfig(m));
        if !Self::is_decoder_type(&self.model_type) {
            return bad(format!(
                "model_type `{}` is not a decoder kiln can build ({})",
                self.model_type,
                DECODER_TYPES.join(", ")
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.max_position_embeddings == 0
        {
            return bad(
                "vocab_size, hidden_size, intermediate_size, num_hidden_layers and \
                 max_position_embeddings must be > 0"
                    .into(),
            );
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return bad(format!(
                "head_dim {hd} must be even and > 0 for rotary positions"
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps must be > 0, got {}",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta must be > 0, got {}", self.rope_theta));
        }
        if self.model_type == "qwen2" && self.use_sliding_window {
            return bad("Qwen2's use_sliding_window is not supported".into());
        }
        if self.sliding_window == Some(0) && self.attention_window().is_some() {
            return bad("sliding_window must be > 0".into());
        }
        self.rope_scaling_kind()?;
        if self
            .eos_token_id
            .as_ref()
            .is_some_and(|v| eos_ids(v).is_none())
        {
            return bad(format!(
                "eos_token_id must be a token id or a list of them, got {}",
                self.eos_token_id
                    .as_ref()
                    .map(Value::to_string)
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The end-of-sequence ids (`eos_token_id` as a number or a list); empty when absent.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .and_then(eos_ids)
            .unwrap_or_default()
    }

    /// The attention window, for the model types that have one (Mistral).
    fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            _ => None,
        }
    }

    fn rope_scaling_kind(&self) -> Result<RopeScaling> {
        let Some(value) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let bad = |m: String| NnError::InvalidConfig(format!("rope_scaling: {m}"));
        let obj = value
            .as_object()
            .ok_or_else(|| bad(format!("expected an object or null, got {value}")))?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f32> {
            obj.get(key)
                .and_then(Value::as_f64)
                .filter(|v| *v > 0.0 && v.is_finite())
                .map(|v| v as f32)
                .ok_or_else(|| bad(format!("`{kind}` needs a positive number `{key}`")))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let scaling = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    ..
                } = scaling
                    && hi <= lo
                {
                    return Err(bad("high_freq_factor must exceed low_freq_factor".into()));
                }
                Ok(scaling)
            }
            other => Err(bad(format!(
                "type `{other}` is not supported (default, linear, llama3)"
            ))),
        }
    }

    /// The rotary inverse frequencies, `[head_dim / 2]`, computed in f32 as `transformers` does.
    fn inv_freq(&self) -> Result<Vec<f32>> {
        let d = self.head_dim();
        let theta = self.rope_theta as f32;
        let base = (0..d)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / d as f32));
        Ok(match self.rope_scaling_kind()? {
            RopeScaling::None => base.collect(),
            RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                base.map(|freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
            }
        })
    }

    /// Biases on q/k/v.
    fn qkv_bias(&self) -> bool {
        self.attention_bias
    }

    /// Bias on o: Llama puts `attention_bias` on all four projections, Qwen2 only on q/k/v.
    fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type == "llama"
    }

    /// Biases on the MLP projections (Llama only).
    fn mlp_bias(&self) -> bool {
        self.mlp_bias && self.model_type == "llama"
    }
}

/// `eos_token_id` as ids: a number or a list of numbers.
fn eos_ids(value: &Value) -> Option<Vec<u32>> {
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match value {
        Value::Null => Some(Vec::new()),
        Value::Array(items) => items.iter().map(one).collect(),
        v => one(v).map(|id| vec![id]),
    }
}

/// Completes a raw `config.json` with the defaults that depend on other keys.
fn fill_defaults(value: &mut Value) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    // `null` means "default" in HF configs; every optional field here defaults when absent.
    obj.retain(|_, v| !v.is_null());
    let model_type = obj
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !obj.contains_key("num_key_value_heads")
        && let Some(heads) = obj.get("num_attention_heads").cloned()
    {
        obj.insert("num_key_value_heads".into(), heads);
    }
    if model_type == "qwen2" && !obj.contains_key("attention_bias") {
        obj.insert("attention_bias".into(), Value::Bool(true));
    }
    // transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
    if let Some(params) = obj.get("rope_parameters").cloned() {
        if !obj.contains_key("rope_theta")
            && let Some(theta) = params.get("rope_theta")
        {
            obj.insert("rope_theta".into(), theta.clone());
        }
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str);
        if !obj.contains_key("rope_scaling") && kind.is_some_and(|k| k != "default") {
            obj.insert("rope_scaling".into(), params);
        }
    }
    if !obj.contains_key("max_position_embeddings") {
        // The defaults of transformers' config classes.
        let default = match model_type.as_str() {
            "llama" => 2048,
            "qwen2" => 32768,
            _ => 131_072,
        };
        obj.insert("max_position_embeddings".into(), default.into());
    }
}

/// How to build the decoder: what to freeze and where to put LoRA adapters.
#[derive(Debug, Clone, Default)]
pub struct DecoderLoadOptions {
    /// Keep `embed_tokens` (and the LM head when tied to it) frozen.
    pub freeze_embeddings: bool,
    /// Keep the lowest N layers frozen (plain tensors; no gradient computed).
    pub freeze_layers: usize,
    /// Add LoRA adapters (rank, alpha, dropout and seed are used; `targets`, which names BERT
    /// layers, is ignored in favour of [`DecoderLoadOptions::lora_modules`]). Then every base
    /// weight is frozen and only the adapters train.
    pub lora: Option<LoraConfig>,
    /// PEFT module names to adapt: `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`,
    /// or `all-linear` for all seven. Empty means PEFT's default for these models, q_proj and
    /// v_proj.
    pub lora_modules: Vec<String>,
}

/// The linear layers of a decoder layer, by their PEFT names, in checkpoint order.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The modules named by `names` (validated), in [`LORA_MODULES`] order.
fn lora_modules(names: &[String]) -> Result<Vec<&'static str>> {
    let mut chosen = Vec::new();
    for name in names {
        if name == "all-linear" {
            chosen.extend(LORA_MODULES);
            continue;
        }
        match LORA_MODULES.iter().find(|m| **m == name.as_str()) {
            Some(m) => chosen.push(*m),
            None => {
                return Err(NnError::InvalidConfig(format!(
                    "unknown LoRA module `{name}`; expected {} or all-linear",
                    LORA_MODULES.join(", ")
                )));
            }
        }
    }
    if chosen.is_empty() {
        chosen = vec!["q_proj", "v_proj"];
    }
    Ok(LORA_MODULES
        .into_iter()
        .filter(|m| chosen.contains(m))
        .collect())
}

/// One pre-norm decoder layer.
struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    /// The seven linears packed for inference (`Decoder::pack_for_inference`), in
    /// [`LORA_MODULES`] order.
    packed: Option<Vec<std::sync::Arc<crate::nn::packed::PackedWeight>>>,
}

impl Layer {
    /// Applies linear `index` (of [`Layer::linears`]): from the packed weights where they
    /// exist and no gradient is tracked, the general path otherwise.
    fn project(&self, index: usize, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let packed = self.packed.as_ref().map(|p| &*p[index]);
        crate::nn::packed::project(packed, self.linears()[index], x, train)
    }

    /// The linears in [`LORA_MODULES`] order.
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// The linears in [`LORA_MODULES`] order, mutably.
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// Keys and values of every layer for the positions seen so far, for incremental decoding.
///
/// Tensors are detached (`[batch, kv_heads, positions, head_dim]`, after RoPE), so a cache holds
/// no autograd graph. Cloning is cheap (tensors are shared, and appending makes new ones), so
/// one prompt's cache can be cloned per continuation, or [`KvCache::repeat`]ed into a batch.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Per row, the first real position: prompts of different lengths share a batch
    /// left-padded, and a row's padding is never attended to. Empty: no padding.
    starts: Vec<usize>,
}

impl KvCache {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows of the cached batch; `None` while empty.
    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(0).ok())
    }

    /// A cache of `n` times the rows: row `i` of the result is row `i / n` of this one (so a
    /// batch-1 prompt becomes `n` identical rows, one per sample to draw).
    pub fn repeat(&self, n: usize) -> Result<KvCache> {
        if n == 0 {
            return Err(NnError::InvalidInput(
                "cannot repeat a cache 0 times".into(),
            ));
        }
        let tile = |t: &Tensor| -> candle_core::Result<Tensor> {
            let mut dims = t.dims().to_vec();
            let b = dims[0];
            let mut expanded = dims.clone();
            expanded.insert(1, n);
            let t = t.unsqueeze(1)?.broadcast_as(expanded)?;
            dims[0] = b * n;
            t.reshape(dims)
        };
        let layers = self
            .layers
            .iter()
            .map(|slot| match slot {
                Some((k, v)) => Ok(Some((tile(k)?, tile(v)?))),
                None => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: self.len,
            starts: self
                .starts
                .iter()
                .flat_map(|&s| std::iter::repeat_n(s, n))
                .collect(),
        })
    }

    /// A cache of the chosen rows only, in the order given (e.g. to drop finished sequences
    /// from a batch).
    pub fn select(&self, rows: &[usize]) -> Result<KvCache> {
        let batch = self.batch_size().unwrap_or(0);
        if let Some(bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(NnError::InvalidInput(format!(
                "row {bad} is outside the cached batch of {batch}"
            )));
        }
        let layers = match self.layers.iter().flatten().next() {
            Some((k, _)) => {
                let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let index = Tensor::new(index.as_slice(), k.device())?;
                self.layers
                    .iter()
                    .map(|slot| match slot {
                        Some((k, v)) => Ok(Some((
                            k.index_select(&index, 0)?,
                            v.index_select(&index, 0)?,
                        ))),
                        None => Ok(None),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            }
            None => self.layers.clone(),
        };
        Ok(KvCache {
            layers,
            len: self.len,
            starts: if self.starts.is_empty() {
                Vec::new()
            } else {
                rows.iter().map(|&r| self.starts[r]).collect()
            },
        })
    }
}

/// A Llama-family decoder whose trainable weights are candle `Var`s.
pub struct Decoder {
    config: DecoderConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// Shares its weight with `embed_tokens` when the config ties them.
    lm_head: Linear,
    inv_freq: Vec<f32>,
    fused: bool,
    trainable: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
    device: Device,
    /// The dtype the layers compute in during training: f32, or bf16 under mixed precision.
    compute_dtype: DType,
    /// The LM head packed for inference (`Decoder::pack_for_inference`).
    packed_head: Option<std::sync::Arc<crate::nn::packed::PackedWeight>>,
}

/// This step's keys and values appended (detached) to a layer's cache along the sequence
/// `axis`, and the whole of them returned; without a cache, the step's own.
fn through_cache(
    cache: Option<&mut Option<(Tensor, Tensor)>>,
    k: Tensor,
    v: Tensor,
    axis: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Some(slot) = cache else {
        return Ok((k, v));
    };
    let (k, v) = match slot.take() {
        None => (k.detach(), v.detach()),
        Some((pk, pv)) => (
            Tensor::cat(&[&pk, &k.detach()], axis)?,
            Tensor::cat(&[&pv, &v.detach()], axis)?,
        ),
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

/// `model.` for `*ForCausalLM` checkpoints, nothing for bare `*Model` ones.
fn find_prefix(ckpt: &Checkpoint) -> Result<&'static str> {
    ["model.", ""]
        .into_iter()
        .find(|p| ckpt.contains_key(&format!("{p}embed_tokens.weight")))
        .ok_or_else(|| NnError::MissingTensor {
            name: "model.embed_tokens.weight".into(),
        })
}

/// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias`.
fn load_linear(
    src: &mut WeightSource,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    trainable: bool,
) -> Result<Linear> {
    let weight = src.get(&format!("{prefix}.weight"), &[out_dim, in_dim], trainable)?;
    let bias = if bias {
        Some(src.get(&format!("{prefix}.bias"), &[out_dim], trainable)?)
    } else {
        None
    };
    Ok(Linear {
        name: prefix.to_string(),
        weight,
        bias,
        lora: None,
    })
}

/// Lengths of the rows of a right-padded 0/1 mask `[b, t]`.
fn right_padded_lengths(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let len = row.iter().take_while(|&&m| m != 0).count();
            if row[len..].iter().any(|&m| m != 0) {
                return Err(NnError::InvalidInput(format!(
                    "attention_mask must be right-padded (1s then 0s); row {i} is not"
                )));
            }
            Ok(len)
        })
        .collect()
}

impl Decoder {
    /// Loads `config.json` and the safetensors weights from a Hugging Face model directory.
    ///
    /// Trainable weights are registered in `varmap` under their checkpoint names.
    pub fn load_dir(
        dir: &Path,
        varmap: &VarMap,
        device: &Device,
        opts: &DecoderLoadOptions,
    ) -> Result<Self> {
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let ckpt = load_model_weights(dir, device)?;
        Self::from_checkpoint(&config, &ckpt, varmap, device, opts)
    }

    /// Builds the decoder from tensors already in memory.
    pub fn from_checkpoint(
        config: &DecoderConfig,
        ckpt: &Checkpoint,
        varmap: &VarMap,
        device: &Device,
        opts: &DecoderLoadOptions,
    ) -> Result<Self> {
        config.validate()?;
        let modules = lora_modules(&opts.lora_modules)?;
        if let Some(lora) = &opts.lora {
            lora.validate()?;
        }
        let prefix = find_prefix(ckpt)?;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let (hd, inter) = (config.head_dim(), config.intermediate_size);
        let q_dim = config.num_attention_heads * hd;
        let kv_dim = config.num_key_value_heads * hd;
        let eps = config.rms_norm_eps;
        let mut src = WeightSource::new(ckpt, varmap);

        // With LoRA the whole base model is frozen: only adapters train.
        let base_train = opts.lora.is_none();
        let emb_train = base_train && !opts.freeze_embeddings;
        let embed_name = format!("{prefix}embed_tokens.weight");
        let embed_tokens = Embedding {
            weight: src.get(&embed_name, &[v, h], emb_train)?,
            name: embed_name,
        };

        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let t = base_train && i >= opts.freeze_layers;
            let p = format!("{prefix}layers.{i}");
            let (qkv_b, o_b, mlp_b) = (config.qkv_bias(), config.o_bias(), config.mlp_bias());
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let s = &mut src;
            layers.push(Layer {
                q_proj: load_linear(s, &format!("{a}.q_proj"), h, q_dim, qkv_b, t)?,
                k_proj: load_linear(s, &format!("{a}.k_proj"), h, kv_dim, qkv_b, t)?,
                v_proj: load_linear(s, &format!("{a}.v_proj"), h, kv_dim, qkv_b, t)?,
                o_proj: load_linear(s, &format!("{a}.o_proj"), q_dim, h, o_b, t)?,
                gate_proj: load_linear(s, &format!("{m}.gate_proj"), h, inter, mlp_b, t)?,
                up_proj: load_linear(s, &format!("{m}.up_proj"), h, inter, mlp_b, t)?,
                down_proj: load_linear(s, &format!("{m}.down_proj"), inter, h, mlp_b, t)?,
                input_layernorm: RmsNorm::load(
                    s,
                    &format!("{p}.input_layernorm.weight"),
                    h,
                    eps,
                    t,
                )?,
                post_attention_layernorm: RmsNorm::load(
                    s,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                    t,
                )?,
                packed: None,
            });
        }
        let norm = RmsNorm::load(
            &mut src,
            &format!("{prefix}norm.weight"),
            h,
            eps,
            base_train,
        )?;
        let lm_head = if config.tie_word_embeddings {
            Linear {
                name: "lm_head".into(),
                weight: embed_tokens.weight.clone(),
                bias: None,
                lora: None,
            }
        } else {
            load_linear(&mut src, "lm_head", h, v, false, base_train)?
        };

        if let Some(lcfg) = &opts.lora {
            let mut rng = lora_rng(lcfg);
            for layer in &mut layers {
                for (module, lin) in LORA_MODULES.iter().zip(layer.linears_mut()) {
                    if !modules.contains(module) {
                        continue;
                    }
                    let (out_dim, in_dim) = lin.weight.dims2()?;
                    let name = lin.name.clone();
                    lin.lora = Some(LoraAdapter::create(
                        &mut src, &name, in_dim, out_dim, lcfg, &mut rng, device,
                    )?);
                }
            }
        }

        let (trainable, frozen) = src.into_parts();
        Ok(Self {
            inv_freq: config.inv_freq()?,
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            fused: true,
            trainable,
            frozen,
            device: device.clone(),
            compute_dtype: DType::F32,
            packed_head: None,
        })
    }

    /// Packs every layer's linear weights and the LM head for inference (`nn::packed`):
    /// later passes that track no gradient (serving's prompt pass and decoding) multiply
    /// against the packed copies. Only on CPUs with AVX-512 or AVX2, without LoRA adapters;
    /// returns the bytes the packed copies take (0 when nothing was packed).
    pub fn pack_for_inference(&mut self) -> Result<u64> {
        use crate::nn::packed::PackedWeight;
        if !(self.device.is_cpu() && PackedWeight::available() && !self.has_lora()) {
            return Ok(0);
        }
        let mut all = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            match PackedWeight::pack_all(&layer.linears())? {
                Some(packed) => all.push(packed),
                None => return Ok(0),
            }
        }
        let Some(head) = PackedWeight::from_linear(&self.lm_head)? else {
            return Ok(0);
        };
        let bytes = all.iter().flatten().map(|p| p.bytes()).sum::<u64>() + head.bytes();
        for (layer, packed) in self.layers.iter_mut().zip(all) {
            layer.packed = Some(packed);
        }
        self.packed_head = Some(head);
        Ok(bytes)
    }

    /// Mixed precision for [`Decoder::forward`] and [`Decoder::hidden_states`]: the layers
    /// compute in `dtype` (bf16) from the f32 master weights; embeddings, RMSNorm and the
    /// attention softmax stay f32 and the logits come back in f32. `F32` turns it off.
    /// Cached decoding (serving) always computes in f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// The config the decoder was built from.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable variables with their checkpoint names (PEFT names for adapters), in load
    /// order.
    pub fn named_trainable_vars(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// Frozen weights with their checkpoint names.
    pub fn named_frozen_tensors(&self) -> &[(String, Tensor)] {
        &self.frozen
    }

    /// Whether any layer carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.linears().iter().any(|lin| lin.lora.is_some()))
    }

    /// Use kiln's fused RMSNorm/RoPE kernels (the default; they apply on the CPU in f32) or
    /// candle's primitive ops throughout. Both compute the same function and gradients.
    pub fn set_fused_ops(&mut self, fused: bool) {
        self.fused = fused;
        self.norm.fused = fused;
        for l in &mut self.layers {
            l.input_layernorm.fused = fused;
            l.post_attention_layernorm.fused = fused;
        }
    }

    /// Training / scoring forward: logits `[b, t, vocab]` (f32) for every position.
    ///
    /// `input_ids` is `[b, t]` (integer), `attention_mask` `[b, t]` with 1 for real tokens and
    /// 0 for padding, which must be on the right. Differentiable w.r.t. every trainable var;
    /// `train` enables LoRA dropout (the base model has none).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, train)?;
        self.logits(&hidden, train)
    }

    /// The final hidden states `[b, t, hidden]` (after the last RMSNorm), for callers that
    /// apply the LM head themselves (e.g. in chunks, to bound the memory of large vocabularies).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids, 0)?;
        if attention_mask.dims() != [b, t] {
            return Err(NnError::InvalidInput(format!(
                "attention_mask is {:?}, input_ids is [{b}, {t}]",
                attention_mask.dims()
            )));
        }
        let lengths = right_padded_lengths(attention_mask)?;
        let (cos, sin) = self.rope_tables(0, t)?;
        // The fused kernel builds its own masks from the lengths.
        let mask = if self.fused_attention() && self.compute_dtype == DType::F32 {
            None
        } else {
            self.attention_bias(t, 0, &lengths)?
        };
        let mut x = self
            .embed_tokens
            .forward(&input_ids.to_dtype(DType::U32)?)?
            .to_dtype(self.compute_dtype)?;
        for layer in &self.layers {
            let masks = Masks {
                bias: mask.as_ref(),
                lengths: Some(&lengths),
                starts: None,
            };
            x = self.layer_forward(layer, &x, (&cos, &sin), masks, None, train)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Applies the LM head to hidden states `[.., hidden]`: logits `[.., vocab]`.
    pub fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        // f32 logits whatever the layers computed in: the loss is taken in f32.
        let head = self.packed_head.as_deref();
        Ok(crate::nn::packed::project(head, &self.lm_head, hidden, train)?.to_dtype(DType::F32)?)
    }

    /// A fresh, empty cache for [`Decoder::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            starts: Vec::new(),
        }
    }

    /// A fresh cache for a batch of left-padded rows: row `r`'s real tokens start at
    /// `starts[r]`, and the padding before them is never attended to. RoPE is relative, so
    /// a row's attention among its real tokens is the same as without the padding: prompts
    /// of different lengths decode together and each gets what it would alone.
    pub fn new_cache_left_padded(&self, starts: Vec<usize>) -> KvCache {
        KvCache {
            starts,
            ..self.new_cache()
        }
    }

    /// Appends `input_ids` `[b, t_new]` to the cache and returns the logits of the last new
    /// position, `[b, vocab]`, detached.
    ///
    /// Every row is at the same position (`cache.len()`): `b` is, say, several samples of one
    /// prompt. The cache is only updated when the call succeeds.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            return Err(NnError::InvalidInput(format!(
                "cache has {} layers, the model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let offset = cache.len;
        let (b, t) = self.check_ids(input_ids, offset)?;
        if let Some(cached) = cache.batch_size()
            && cached != b
        {
            return Err(NnError::InvalidInput(format!(
                "input has {b} rows, the cache {cached}"
            )));
        }
        let (cos, sin) = self.rope_tables(offset, t)?;
        // The fused attention builds its own masks from the cache's starts.
        let mut mask = if self.fused_attention() {
            None
        } else {
            self.attention_bias(t, offset, &vec![offset + t; b])?
        };
        let padded = cache.starts.iter().any(|&s| s > 0);
        if padded && cache.starts.len() != b {
            return Err(NnError::InvalidInput(format!(
                "the cache has padding for {} rows, the input {b}",
                cache.starts.len()
            )));
        }
        if padded && !self.fused_attention() {
            let s = offset + t;
            let left: Vec<f32> = cache
                .starts
                .iter()
                .flat_map(|&start| (0..s).map(move |j| if j < start { f32::MIN } else { 0.0 }))
                .collect();
            let left = Tensor::from_vec(left, (b, 1, 1, 1, s), &self.device)?;
            mask = Some(match mask {
                Some(m) => m.broadcast_minimum(&left)?,
                None => left,
            });
        }
        let starts = cache.starts.clone();
        let mut slots = cache.layers.clone();
        let mut x = self
            .embed_tokens
            .forward(&input_ids.to_dtype(DType::U32)?)?
            .detach();
        for (layer, slot) in self.layers.iter().zip(slots.iter_mut()) {
            // Detaching between layers lets each layer's autograd bookkeeping (the weights
            // may be Vars) be freed as soon as the layer is done.
            x = self
                .layer_forward(
                    layer,
                    &x,
                    (&cos, &sin),
                    Masks {
                        bias: mask.as_ref(),
                        lengths: None,
                        starts: Some(&starts),
                    },
                    Some(slot),
                    false,
                )?
                .detach();
        }
        let last = self.norm.forward(&x.narrow(1, t - 1, 1)?)?;
        let logits = self
            .logits(&last, false)?
            .reshape((b, self.config.vocab_size))?
            .detach();
        cache.layers = slots;
        cache.len += t;
        Ok(logits)
    }

    /// Checks `input_ids` (`[b, t]`, t > 0, ids in the vocabulary, positions `offset..offset+t`
    /// within `max_position_embeddings`) and returns `(b, t)`.
    fn check_ids(&self, input_ids: &Tensor, offset: usize) -> Result<(usize, usize)> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            NnError::InvalidInput(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(NnError::InvalidInput(format!(
                "input_ids is empty: [{b}, {t}]"
            )));
        }
        if offset + t > self.config.max_position_embeddings {
            return Err(NnError::InvalidInput(format!(
                "{} positions exceed max_position_embeddings {}",
                offset + t,
                self.config.max_position_embeddings
            )));
        }
        let max_id = input_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            return Err(NnError::InvalidInput(format!(
                "token id {max_id} is outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        Ok((b, t))
    }

    /// cos and sin of the rotary angles of positions `offset..offset + t`, `[t, head_dim / 2]`.
    fn rope_tables(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in offset..offset + t {
            for &f in &self.inv_freq {
                // The angle in f32, as transformers computes it.
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    /// The additive attention mask for `t` queries at positions `offset..offset + t` over
    /// `offset + t` keys: causal, within the sliding window if any, and over the first
    /// `lengths[row]` keys of each row. `[b or 1, 1, 1, t, s]` (the middle axes broadcast over
    /// key/value heads and the query heads sharing one); `None` when nothing is masked.
    fn attention_bias(&self, t: usize, offset: usize, lengths: &[usize]) -> Result<Option<Tensor>> {
        let s = offset + t;
        let window = self.config.attention_window();
        let causal_needed = t > 1 || window.is_some_and(|w| s > w);
        let pad_needed = lengths.iter().any(|&n| n < s);
        if !causal_needed && !pad_needed {
            return Ok(None);
        }
        // f32::MIN rather than -inf: a fully masked row (an all-pad sequence) stays finite.
        let neg = f32::MIN;
        let mut causal = vec![0f32; t * s];
        for i in 0..t {
            let q = offset + i;
            for (j, m) in causal[i * s..(i + 1) * s].iter_mut().enumerate() {
                if j > q || window.is_some_and(|w| q - j >= w) {
                    *m = neg;
                }
            }
        }
        let mut mask = Tensor::from_vec(causal, (1, t, s), &self.device)?;
        if pad_needed {
            let pad: Vec<f32> = lengths
                .iter()
                .flat_map(|&n| (0..s).map(move |j| if j < n { 0.0 } else { neg }))
                .collect();
            let pad = Tensor::from_vec(pad, (lengths.len(), 1, s), &self.device)?;
            mask = mask.broadcast_minimum(&pad)?;
        }
        let rows = mask.dim(0)?;
        Ok(Some(mask.reshape((rows, 1, 1, t, s))?))
    }

    /// Whether attention runs as kiln's fused CPU kernel (see [`Decoder::set_fused_ops`]).
    fn fused_attention(&self) -> bool {
        self.fused && self.device.is_cpu()
    }

    /// The fused kernel's spec for `s` keys: causal, the model's sliding window, and the keys
    /// nobody attends to (right padding in training, left padding in a cache).
    fn attention_spec(&self, masks: Masks, s: usize) -> AttentionSpec {
        let cfg = &self.config;
        let key_mask = match (masks.lengths, masks.starts) {
            (Some(lengths), _) if lengths.iter().any(|&n| n < s) => Some(
                lengths
                    .iter()
                    .flat_map(|&n| (0..s).map(move |j| if j < n { 1.0 } else { 0.0 }))
                    .collect(),
            ),
            (_, Some(starts)) if starts.iter().any(|&n| n > 0) => Some(
                starts
                    .iter()
                    .flat_map(|&n| (0..s).map(move |j| if j < n { 0.0 } else { 1.0 }))
                    .collect(),
            ),
            _ => None,
        };
        AttentionSpec {
            causal: true,
            window: cfg.attention_window(),
            key_mask,
            ..AttentionSpec::new(
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                1.0 / (cfg.head_dim() as f32).sqrt(),
            )
        }
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: Masks,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        // On the CPU in f32, each half of the layer as one kernel with its RMSNorm and
        // residual (`nn::block`): the attention half without a cache (training, scoring), and
        // the gated feed-forward half. `None` where they do not apply (adapters on the
        // feed-forward, biases there, too few rows, another dtype); served models keep their
        // packed path. The attention half computes its projections' adapters inside.
        let normed = |norm: &RmsNorm, x: &Tensor| BlockInput::RmsNormed {
            x: x.clone(),
            weight: norm.weight.clone(),
            eps: norm.eps,
        };
        let block = match &cache {
            None if self.fused_attention() && l.packed.is_none() && l.input_layernorm.fused => {
                let projections = [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj];
                let spec = self.attention_spec(mask, x.dim(1)?);
                let input = normed(&l.input_layernorm, x);
                attention::residual_attention(&input, projections, spec, Some(rope), train)?
            }
            _ => None,
        };
        let x = match block {
            Some(y) => y,
            None => {
                let h = l.input_layernorm.forward(x)?;
                (x + self.attention(l, &h, rope, mask, cache, train)?)?
            }
        };
        if self.fused && l.packed.is_none() && l.post_attention_layernorm.fused {
            let input = normed(&l.post_attention_layernorm, &x);
            if let Some(y) =
                mlp::residual_swiglu(&input, &l.gate_proj, &l.up_proj, &l.down_proj, train)?
            {
                return Ok(y);
            }
        }
        let h = l.post_attention_layernorm.forward(&x)?;
        let gate = l.project(4, &h, train)?;
        let up = l.project(5, &h, train)?;
        let act = if self.fused {
            ops::silu_mul(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        let mlp = l.project(6, &act, train)?;
        Ok((x + mlp)?)
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        masks: Masks,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let rep = nh / nkv;
        // On the CPU: kiln's fused attention, straight on the projections' layout (RoPE
        // applied there too), with its own backward in training. Its cache holds keys and
        // values in that layout as well, `[b, s, kv_heads · head_dim]`.
        if self.fused_attention() && x.dtype() == DType::F32 {
            let q = ops::rope_seq_major(&l.project(0, x, train)?, cos, sin, nh)?;
            let k = ops::rope_seq_major(&l.project(1, x, train)?, cos, sin, nkv)?;
            let v = l.project(2, x, train)?;
            let (k, v) = through_cache(cache, k, v, 1)?;
            let spec = self.attention_spec(masks, k.dim(1)?);
            let ctx = attention::attention(&q, &k, &v, spec)?.ok_or_else(|| {
                NnError::InvalidInput("fused attention refused CPU f32 inputs".into())
            })?;
            return Ok(l.project(3, &ctx, train)?);
        }
        let mask = masks.bias;
        // One graph node each way on a GPU (`nn::heads`).
        let heads = |y: Tensor, n: usize| super::heads::split(&y, n);
        // The tables in the activations' dtype (bf16 under mixed precision).
        let (cos, sin) = (&cos.to_dtype(x.dtype())?, &sin.to_dtype(x.dtype())?);
        let rope = |y: &Tensor| {
            if self.fused {
                ops::rope(y, cos, sin)
            } else {
                ops::rope_primitive(y, cos, sin)
            }
        };
        let q = rope(&heads(l.project(0, x, train)?, nh)?)?;
        let k = rope(&heads(l.project(1, x, train)?, nkv)?)?;
        let v = heads(l.project(2, x, train)?, nkv)?;
        let (k, v) = through_cache(cache, k, v, 2)?;
        let s = k.dim(2)?;
        // The query heads sharing a key/value head are stacked along the sequence axis: one
        // matmul per key/value head, and no repeated copies of keys and values. The 1/sqrt(d)
        // scale goes on the queries, smaller than the scores by a factor seq / head_dim.
        let q = (q.reshape((b, nkv, rep * t, hd))? * (1.0 / (hd as f64).sqrt()))?;
        // The softmax in f32 whatever the activations' dtype (mixed precision); on a GPU the
        // mask inside its kernel.
        let scores = q.matmul(&k.t()?)?;
        let probs = match mask {
            Some(m) => {
                let scores = scores.reshape((b, nkv, rep, t, s))?;
                ops::attention_softmax(&scores, 1.0, Some(m))?.reshape((b, nkv, rep * t, s))?
            }
            None => ops::attention_softmax(&scores, 1.0, None)?,
        }
        .to_dtype(v.dtype())?;
        let ctx = super::heads::join(&probs.matmul(&v)?.reshape((b, nh, t, hd))?)?;
        Ok(l.project(3, &ctx, train)?)
    }

    /// Folds every LoRA adapter into its base weight (`W += scale·B·A`) and removes the
    /// adapters: the decoder then computes the same function with plain linears (the adapter
    /// `Var`s stay in the `VarMap` but no longer take part in the forward pass).
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                if lin.lora.is_some() {
                    lin.weight = lin.merged_weight()?;
                    lin.lora = None;
                }
            }
        }
        Ok(())
    }

    /// Every weight under its Hugging Face name, current values, LoRA merged in, detached: what
    /// a fine-tuned checkpoint should contain. A tied model has no `lm_head.weight`.
    pub fn export_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(
            self.embed_tokens.name.clone(),
            self.embed_tokens.weight.detach(),
        );
        let mut norms = vec![&self.norm];
        let mut linears: Vec<&Linear> = Vec::new();
        for layer in &self.layers {
            linears.extend(layer.linears());
            norms.push(&layer.input_layernorm);
            norms.push(&layer.post_attention_layernorm);
        }
        if !self.config.tie_word_embeddings {
            linears.push(&self.lm_head);
        }
        for lin in linears {
            out.insert(
                format!("{}.weight", lin.name),
                lin.merged_weight()?.detach(),
            );
            if let Some(b) = &lin.bias {
                out.insert(format!("{}.bias", lin.name), b.detach());
            }
        }
        for norm in norms {
            out.insert(norm.name.clone(), norm.weight.detach());
        }
        Ok(out)
    }
}
