//! A trainable BERT-family encoder (BERT, RoBERTa, XLM-R, MiniLM, ...) that loads Hugging Face
//! checkpoints by their tensor names.
//!
//! Mirrors `transformers`' `BertModel` (post-LayerNorm, absolute positions). RoBERTa-family
//! models differ only by where position ids start (`padding_idx + 1`, pads get `padding_idx`),
//! which [`BertConfig::model_type`] selects.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::attention::{self, AttentionSpec};
use super::block::BlockInput;
use super::layers::{
    Checkpoint, Embedding, LayerNorm, Linear, WeightSource, dropout, dropout_seed,
};
use super::lora::{LoraAdapter, LoraConfig, LoraTarget, lora_rng};
use super::{NnError, Result, block, mlp, ops};

/// The activation of the feed-forward block (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiddenAct {
    /// Exact GELU, `x * Phi(x)` (`"gelu"`).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    /// ReLU (`"relu"`).
    #[serde(rename = "relu")]
    Relu,
}

fn default_hidden_dropout() -> f64 {
    0.1
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}
fn default_max_positions() -> usize {
    512
}
fn default_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn default_model_type() -> String {
    "bert".to_string()
}
fn default_init_range() -> f64 {
    0.02
}

/// The subset of a Hugging Face BERT-family `config.json` that the architecture depends on.
///
/// Unknown keys are ignored; missing optional keys take BERT's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    /// Dropout on embeddings and sub-layer outputs during training.
    #[serde(default = "default_hidden_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    #[serde(default = "default_hidden_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position embedding table.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) embedding table.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token (RoBERTa's `padding_idx`).
    #[serde(default)]
    pub pad_token_id: u32,
    /// `"bert"`, `"roberta"`, `"xlm-roberta"`, `"camembert"`, ...; selects the position scheme
    /// and the checkpoint prefix to try.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Only `"absolute"` is supported; kept to reject relative-position checkpoints loudly.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// Std of the initialiser; not used here, but written so other tools can read our configs.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

impl BertConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| NnError::ConfigParse {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the architecture relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NnError::InvalidConfig(m));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, hidden_size and intermediate_size must be > 0".into());
        }
        if let Some(p) = &self.position_embedding_type
            && p != "absolute"
        {
            return bad(format!("position_embedding_type `{p}` is not supported"));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    /// True for the RoBERTa family, whose position ids start after `padding_idx`.
    pub fn roberta_positions(&self) -> bool {
        matches!(
            self.model_type.as_str(),
            "roberta" | "xlm-roberta" | "camembert" | "xlm_roberta"
        )
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// How to build the encoder: what to freeze and which optional heads to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Keep the embeddings (word, position, type, their LayerNorm) as frozen plain tensors.
    pub freeze_embeddings: bool,
    /// Keep the lowest N transformer layers frozen (plain tensors; no gradient computed).
    pub freeze_layers: usize,
    /// Load `pooler.dense` when the checkpoint has it.
    pub with_pooler: bool,
    /// Load the masked-LM head (`cls.predictions.*` or `lm_head.*`) when the checkpoint has it.
    pub with_mlm_head: bool,
    /// Use kiln's fused CPU LayerNorm/GELU kernels (falls back to primitive ops off-CPU).
    pub fused_ops: bool,
    /// Add LoRA adapters. Then every base weight (embeddings, layers, pooler, MLM head) is
    /// frozen and only the adapters are trainable, whatever the freeze settings say.
    pub lora: Option<LoraConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            freeze_embeddings: false,
            freeze_layers: 0,
            with_pooler: false,
            with_mlm_head: false,
            fused_ops: true,
            lora: None,
        }
    }
}

/// Word + position + token-type embeddings, LayerNorm, dropout.
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
}

/// One post-LN transformer layer.
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
    /// The six linears' weights packed for inference (`BertEncoder::pack_for_inference`),
    /// in [`Layer::linears`] order.
    packed: Option<Vec<std::sync::Arc<crate::nn::packed::PackedWeight>>>,
}

impl Layer {
    /// Applies linear `index` (of [`Layer::linears`]): from the packed weights where they
    /// exist and no gradient is tracked, the general path otherwise.
    fn project(&self, index: usize, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let packed = self.packed.as_ref().map(|p| &*p[index]);
        crate::nn::packed::project(packed, self.linears()[index], x, train)
    }

    fn linear_mut(&mut self, target: LoraTarget) -> &mut Linear {
        match target {
            LoraTarget::Query => &mut self.query,
            LoraTarget::Key => &mut self.key,
            LoraTarget::Value => &mut self.value,
            LoraTarget::AttentionOutput => &mut self.attn_out,
            LoraTarget::Intermediate => &mut self.intermediate,
            LoraTarget::Output => &mut self.output,
        }
    }

    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
    }

    fn layer_norms(&self) -> [&LayerNorm; 2] {
        [&self.attn_ln, &self.out_ln]
    }
}

/// The optional masked-LM head; its decoder is tied to the word embeddings.
struct MlmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
    bias_name: String,
}

/// A BERT-family encoder whose trainable weights are candle `Var`s.
pub struct BertEncoder {
    config: BertConfig,
    /// Checkpoint prefix the weights were found under (`""`, `"bert."`, `"roberta."`, ...).
    prefix: String,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    mlm: Option<MlmHead>,
    trainable: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
    device: Device,
    /// The dtype the layers compute in: f32, or bf16 under mixed precision (the weights stay
    /// f32 masters; embeddings and norms run in f32).
    compute_dtype: DType,
}

/// Prefixes tried, in order, to find `embeddings.word_embeddings.weight`.
fn find_prefix(ckpt: &Checkpoint, model_type: &str) -> Result<String> {
    let typed = format!("{}.", model_type.replace('-', "_"));
    let candidates = ["", typed.as_str(), "bert.", "roberta.", "model."];
    candidates
        .iter()
        .find(|p| ckpt.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
        .map(|p| p.to_string())
        .ok_or_else(|| NnError::MissingTensor {
            name: format!(
                "embeddings.word_embeddings.weight (tried prefixes {:?})",
                candidates
            ),
        })
}

impl BertEncoder {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model directory.
    ///
    /// Trainable weights are registered in `varmap` under their checkpoint names.
    pub fn load_dir(
        dir: &Path,
        varmap: &VarMap,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let ckpt = super::layers::load_model_weights(dir, device)?;
        Self::from_checkpoint(&config, &ckpt, varmap, device, opts)
    }

    /// Builds the encoder from tensors already in memory.
    pub fn from_checkpoint(
        config: &BertConfig,
        ckpt: &Checkpoint,
        varmap: &VarMap,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self> {
        config.validate()?;
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let fused = opts.fused_ops;
        let prefix = find_prefix(ckpt, &config.model_type)?;
        let mut src = WeightSource::new(ckpt, varmap);

        if let Some(lora) = &opts.lora {
            lora.validate()?;
        }
        // With LoRA the whole base model is frozen: only adapters (and heads built elsewhere)
        // train.
        let base_train = opts.lora.is_none();
        let emb_train = base_train && !opts.freeze_embeddings;
        let e = format!("{prefix}embeddings");
        let table = |src: &mut WeightSource, name: &str, rows: usize| -> Result<Embedding> {
            let name = format!("{e}.{name}.weight");
            let weight = src.get(&name, &[rows, h], emb_train)?;
            Ok(Embedding { name, weight })
        };
        let embeddings = Embeddings {
            word: table(&mut src, "word_embeddings", config.vocab_size)?,
            position: table(
                &mut src,
                "position_embeddings",
                config.max_position_embeddings,
            )?,
            token_type: table(&mut src, "token_type_embeddings", config.type_vocab_size)?,
            layer_norm: LayerNorm::load(
                &mut src,
                &format!("{e}.LayerNorm"),
                h,
                eps,
                fused,
                emb_train,
            )?,
        };

        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let t = base_train && i >= opts.freeze_layers;
            let p = format!("{prefix}encoder.layer.{i}");
            let inter = config.intermediate_size;
            layers.push(Layer {
                query: Linear::load(&mut src, &format!("{p}.attention.self.query"), h, h, t)?,
                key: Linear::load(&mut src, &format!("{p}.attention.self.key"), h, h, t)?,
                value: Linear::load(&mut src, &format!("{p}.attention.self.value"), h, h, t)?,
                attn_out: Linear::load(&mut src, &format!("{p}.attention.output.dense"), h, h, t)?,
                attn_ln: LayerNorm::load(
                    &mut src,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                    fused,
                    t,
                )?,
                intermediate: Linear::load(
                    &mut src,
                    &format!("{p}.intermediate.dense"),
                    h,
                    inter,
                    t,
                )?,
                output: Linear::load(&mut src, &format!("{p}.output.dense"), inter, h, t)?,
                out_ln: LayerNorm::load(
                    &mut src,
                    &format!("{p}.output.LayerNorm"),
                    h,
                    eps,
                    fused,
                    t,
                )?,
                packed: None,
            });
        }

        if let Some(lcfg) = &opts.lora {
            let mut rng = lora_rng(lcfg);
            let mut targets = lcfg.targets.clone();
            targets.dedup();
            for layer in &mut layers {
                for &target in &targets {
                    let lin = layer.linear_mut(target);
                    let (out_dim, in_dim) = lin.weight.dims2()?;
                    let name = lin.name.clone();
                    lin.lora = Some(LoraAdapter::create(
                        &mut src, &name, in_dim, out_dim, lcfg, &mut rng, device,
                    )?);
                }
            }
        }

        let pooler_name = format!("{prefix}pooler.dense");
        let pooler = if opts.with_pooler && src.contains(&format!("{pooler_name}.weight")) {
            Some(Linear::load(&mut src, &pooler_name, h, h, base_train)?)
        } else {
            None
        };

        let mlm = if opts.with_mlm_head {
            // BERT keeps its head under `cls.predictions`, RoBERTa under `lm_head`; neither is
            // under the model prefix.
            let names = if src.contains("cls.predictions.transform.dense.weight") {
                Some((
                    "cls.predictions.transform.dense",
                    "cls.predictions.transform.LayerNorm",
                    "cls.predictions.bias",
                ))
            } else if src.contains("lm_head.dense.weight") {
                Some(("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"))
            } else {
                None
            };
            match names {
                Some((dense, ln, bias)) => Some(MlmHead {
                    dense: Linear::load(&mut src, dense, h, h, base_train)?,
                    layer_norm: LayerNorm::load(&mut src, ln, h, eps, fused, base_train)?,
                    bias: src.get(bias, &[config.vocab_size], base_train)?,
                    bias_name: bias.to_string(),
                }),
                None => None,
            }
        } else {
            None
        };

        let (trainable, frozen) = src.into_parts();
        Ok(Self {
            config: config.clone(),
            prefix,
            embeddings,
            layers,
            pooler,
            mlm,
            trainable,
            frozen,
            device: device.clone(),
            compute_dtype: DType::F32,
        })
    }

    /// Mixed precision: the transformer layers compute in `dtype` (bf16) from the f32 master
    /// weights; embeddings, norms and attention's softmax stay f32, and the outputs come back
    /// in `dtype`. Gradients reach the f32 weights through the casts. `F32` turns it off.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// The dtype the layers compute in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Packs every layer's linear weights for inference (`nn::packed`): later forward passes
    /// that track no gradient multiply against the packed copies (the originals stay for
    /// training and export). Only on CPUs with AVX-512 or AVX2, for f32 layers without LoRA
    /// adapters; returns the bytes the packed copies take (0 when nothing was packed).
    pub fn pack_for_inference(&mut self) -> Result<u64> {
        use crate::nn::packed::PackedWeight;
        if !(self.device.is_cpu() && PackedWeight::available() && !self.has_lora()) {
            return Ok(0);
        }
        let Some((all, bytes)) = PackedWeight::pack_layers(self.layers.iter().map(Layer::linears))?
        else {
            return Ok(0);
        };
        for (layer, packed) in self.layers.iter_mut().zip(all) {
            layer.packed = Some(packed);
        }
        Ok(bytes)
    }

    /// Drops the packed copies [`BertEncoder::pack_for_inference`] made (after a one-off pass
    /// such as `head_only`'s feature cache), giving their memory back.
    pub fn unpack(&mut self) {
        for layer in &mut self.layers {
            layer.packed = None;
        }
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The checkpoint prefix the weights were found under (`""`, `"bert."`, ...).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable variables with their checkpoint names, in load order (embeddings first).
    pub fn named_trainable_vars(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// Frozen weights with their checkpoint names (so a full checkpoint can be written back).
    pub fn named_frozen_tensors(&self) -> &[(String, Tensor)] {
        &self.frozen
    }

    /// Whether the pooler was loaded.
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// Whether the masked-LM head was loaded.
    pub fn has_mlm_head(&self) -> bool {
        self.mlm.is_some()
    }

    /// Position ids `[batch, seq]` (u32): `0..seq` for BERT; for RoBERTa, pads get
    /// `padding_idx` and real tokens `padding_idx + 1 + (index among non-pads)`, as in
    /// `transformers`' `create_position_ids_from_input_ids`.
    fn position_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if !self.config.roberta_positions() {
            let row = Tensor::arange(0u32, s as u32, &self.device)?;
            return Ok(row.unsqueeze(0)?.broadcast_as((b, s))?.contiguous()?);
        }
        // Computed on the host: ids are tiny next to activations, and candle lacks an integer
        // cumsum.
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let pad = self.config.pad_token_id;
        let mut pos = Vec::with_capacity(b * s);
        for row in ids {
            let mut count = 0u32;
            for id in row {
                if id == pad {
                    pos.push(pad);
                } else {
                    count += 1;
                    pos.push(pad + count);
                }
            }
        }
        Ok(Tensor::from_vec(pos, (b, s), &self.device)?)
    }

    /// Runs the encoder and returns the last hidden states `[batch, seq, hidden]`.
    ///
    /// `input_ids` and `token_type_ids` are integer `[batch, seq]`; `token_type_ids` defaults to
    /// zeros. `attention_mask` is `[batch, seq]`, 1 for real tokens and 0 for padding, any dtype.
    /// Dropout is applied only when `train` is true.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.run(input_ids, token_type_ids, attention_mask, train, false)
    }

    /// Inference for what reads only the first token (`[CLS]` pooling, sequence
    /// classification): the last hidden state of token 0, `[batch, hidden]`, equal to
    /// `forward(..)[:, 0]`. The last layer computes attention and the feed-forward block for
    /// that token alone, since no other position's output is read.
    pub fn forward_first_token(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .run(input_ids, token_type_ids, attention_mask, false, true)?
            .squeeze(1)?)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
        first_token_only: bool,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2().map_err(|_| {
            NnError::InvalidInput(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if attention_mask.dims() != [b, s] {
            return Err(NnError::InvalidInput(format!(
                "attention_mask is {:?}, input_ids is [{b}, {s}]",
                attention_mask.dims()
            )));
        }
        let cfg = &self.config;
        let max_pos = if cfg.roberta_positions() {
            s + cfg.pad_token_id as usize + 1
        } else {
            s
        };
        if max_pos > cfg.max_position_embeddings {
            return Err(NnError::InvalidInput(format!(
                "sequence length {s} exceeds max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let token_type_ids = match token_type_ids {
            Some(t) if t.dims() == [b, s] => t.to_dtype(DType::U32)?,
            Some(t) => {
                return Err(NnError::InvalidInput(format!(
                    "token_type_ids is {:?}, input_ids is [{b}, {s}]",
                    t.dims()
                )));
            }
            None => Tensor::zeros((b, s), DType::U32, &self.device)?,
        };
        // Ids past a table are an error here rather than in the lookup: on the CPU candle
        // refuses them, but a GPU's lookup kernel fails an assertion, which poisons the whole
        // CUDA context (every later call in the process fails). A tokenizer whose added
        // tokens the config does not count is enough to send one.
        for (what, ids, size) in [
            ("token id", &input_ids, cfg.vocab_size),
            ("token type id", &token_type_ids, cfg.type_vocab_size),
        ] {
            if ids.elem_count() == 0 {
                continue;
            }
            let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
            if max as usize >= size {
                return Err(NnError::InvalidInput(format!(
                    "{what} {max} is outside the model's table of {size}"
                )));
            }
        }
        let position_ids = self.position_ids(&input_ids)?;

        let e = &self.embeddings;
        let x = ((e.word.forward(&input_ids)? + e.token_type.forward(&token_type_ids)?)?
            + e.position.forward(&position_ids)?)?;
        let x = e.layer_norm.forward(&x)?;
        let mut x = dropout(&x, cfg.hidden_dropout_prob, train)?.to_dtype(self.compute_dtype)?;

        // Additive mask [b, 1, 1, s]: 0 for tokens, f32::MIN for pads (as transformers does).
        let mask = attention_mask.to_dtype(DType::F32)?;
        // On the CPU attention runs as one fused kernel (inference's, or training's with its
        // backward), which reads the 0/1 mask.
        let fused_attention = self.layers.iter().any(|l| l.attn_ln.fused);
        let mask_host = if fused_attention && self.device.is_cpu() {
            Some(mask.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        let mask_bias = ((1.0 - mask)? * f32::MIN as f64)?.reshape((b, 1, 1, s))?;

        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let queries = (first_token_only && i == last).then_some(1);
            x = self.layer_forward(layer, &x, &mask_bias, mask_host.as_deref(), train, queries)?;
        }
        if first_token_only && self.layers.is_empty() {
            x = x.narrow(1, 0, 1)?;
        }
        Ok(x)
    }

    /// One encoder layer; `queries: Some(n)` computes the outputs of the first `n` positions
    /// only (all positions are still attended to). With `mask_host` (on the CPU) and the
    /// fused kernels on, attention is one kernel: [`ops::attention_inference`] where no
    /// gradient is needed, [`attention::attention`] (with its backward) in training.
    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        mask_bias: &Tensor,
        mask_host: Option<&[f32]>,
        train: bool,
        queries: Option<usize>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let s = x.dim(1)?;
        let xq = match queries {
            Some(n) => x.narrow(1, 0, n.min(s))?.contiguous()?,
            None => x.clone(),
        };
        let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
        let hidden_p = if train { cfg.hidden_dropout_prob } else { 0.0 };
        let attn = match self.attention_block(l, x, mask_host, train, queries, scale)? {
            Some(attn) => attn,
            None => self.attention_ops(l, x, &xq, mask_bias, mask_host, train, scale)?,
        };
        // The output projection's dropout, the residual and the LayerNorm in one CPU op where
        // it applies (`nn::block`), the separate ops otherwise.
        let x = match block::dropout_residual_layer_norm(&attn, &xq, &l.attn_ln, hidden_p as f32)? {
            Some(x) => x,
            None => l
                .attn_ln
                .forward(&(dropout(&attn, cfg.hidden_dropout_prob, train)? + xq)?)?,
        };

        // On the CPU, the feed-forward block, its dropout, its residual and its LoRA adapters
        // in one kernel (exact GELU; `residual_mlp` says None otherwise). Served models keep
        // their packed weights' path.
        let p = hidden_p;
        if l.out_ln.fused
            && l.packed.is_none()
            && matches!(cfg.hidden_act, HiddenAct::Gelu)
            && let Some(z) = mlp::residual_mlp(&x, &x, &l.intermediate, &l.output, p as f32, train)?
        {
            return Ok(l.out_ln.forward(&z)?);
        }
        let inter = self.activation(&l.project(4, &x, train)?, l.out_ln.fused)?;
        let out = l.project(5, &inter, train)?;
        if let Some(y) = block::dropout_residual_layer_norm(&out, &x, &l.out_ln, hidden_p as f32)? {
            return Ok(y);
        }
        let out = dropout(&out, cfg.hidden_dropout_prob, train)?;
        Ok(l.out_ln.forward(&(out + x)?)?)
    }

    /// Training on the CPU: the q/k/v projections, attention (its dropout included) and the
    /// output projection as one op with its own backward (`attention::residual_attention`, its
    /// residual zero: BERT's dropout and LayerNorm come after it). candle's backward then
    /// accumulates two activation-sized gradients for the block instead of nine. `None` where
    /// it does not apply (serving, packed weights, the first-token-only last layer). LoRA
    /// adapters on the projections run inside the op.
    fn attention_block(
        &self,
        l: &Layer,
        x: &Tensor,
        mask_host: Option<&[f32]>,
        train: bool,
        queries: Option<usize>,
        scale: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(mask) = mask_host else {
            return Ok(None);
        };
        if !train || queries.is_some() || l.packed.is_some() || !l.attn_ln.fused {
            return Ok(None);
        }
        let nh = self.config.num_attention_heads;
        let p = self.config.attention_probs_dropout_prob as f32;
        let spec = AttentionSpec {
            key_mask: Some(mask.to_vec()),
            dropout: p,
            seed: if p > 0.0 { dropout_seed() } else { 0 },
            ..AttentionSpec::new(nh, nh, scale as f32)
        };
        let input = BlockInput::Residual {
            n: x.clone(),
            r: x.zeros_like()?,
        };
        attention::residual_attention(
            &input,
            [&l.query, &l.key, &l.value, &l.attn_out],
            spec,
            None,
            train,
        )
    }

    /// Attention as separate ops: the projections, attention (one fused kernel on the CPU, the
    /// primitive ops elsewhere) and the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attention_ops(
        &self,
        l: &Layer,
        x: &Tensor,
        xq: &Tensor,
        mask_bias: &Tensor,
        mask_host: Option<&[f32]>,
        train: bool,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let nh = cfg.num_attention_heads;
        // One graph node each way on a GPU (`nn::heads`).
        let heads = |t: Tensor| super::heads::split(&t, nh);
        let (q, k, v) = (
            l.project(0, xq, train)?,
            l.project(1, x, train)?,
            l.project(2, x, train)?,
        );
        let fused = match mask_host {
            Some(mask) if l.attn_ln.fused => {
                let inference = if train {
                    None
                } else {
                    ops::attention_inference(&q, &k, &v, mask, nh, scale as f32)?
                };
                match inference {
                    Some(ctx) => Some(ctx),
                    None => {
                        let p = if train {
                            cfg.attention_probs_dropout_prob as f32
                        } else {
                            0.0
                        };
                        let spec = AttentionSpec {
                            key_mask: Some(mask.to_vec()),
                            dropout: p,
                            seed: if p > 0.0 { dropout_seed() } else { 0 },
                            ..AttentionSpec::new(nh, nh, scale as f32)
                        };
                        attention::attention(&q, &k, &v, spec)?
                    }
                }
            }
            _ => None,
        };
        let ctx = match fused {
            Some(ctx) => ctx,
            None => {
                let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
                // The softmax in f32 whatever the activations' dtype (mixed precision); on a
                // GPU the scale and mask inside its kernel.
                let scores = q.matmul(&k.t()?)?;
                let probs =
                    ops::attention_softmax(&scores, scale, Some(mask_bias))?.to_dtype(q.dtype())?;
                let probs = dropout(&probs, cfg.attention_probs_dropout_prob, train)?;
                super::heads::join(&probs.matmul(&v)?)?
            }
        };
        l.project(3, &ctx, train)
    }

    fn activation(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        match self.config.hidden_act {
            HiddenAct::Gelu if fused => ops::gelu_erf(x),
            HiddenAct::Gelu => ops::gelu_erf_primitive(x),
            HiddenAct::GeluTanh => x.gelu(),
            HiddenAct::Relu => x.relu(),
        }
    }

    /// Whether any layer carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.linears().iter().any(|lin| lin.lora.is_some()))
    }

    /// Folds every LoRA adapter into its base weight (`W += scale·B·A`) and removes the
    /// adapters: the encoder then computes the same function with plain linears (the adapter
    /// `Var`s stay in the `VarMap` but no longer take part in the forward pass).
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for target in [
                LoraTarget::Query,
                LoraTarget::Key,
                LoraTarget::Value,
                LoraTarget::AttentionOutput,
                LoraTarget::Intermediate,
                LoraTarget::Output,
            ] {
                let lin = layer.linear_mut(target);
                if lin.lora.is_some() {
                    lin.weight = lin.merged_weight()?;
                    lin.lora = None;
                }
            }
        }
        Ok(())
    }

    /// Every weight of the model under its checkpoint name, current values, LoRA merged in,
    /// detached: what a fine-tuned checkpoint in HF layout should contain (the MLM decoder is
    /// tied to the word embeddings and not written separately).
    pub fn export_weights(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        let e = &self.embeddings;
        for emb in [&e.word, &e.position, &e.token_type] {
            out.insert(emb.name.clone(), emb.weight.detach());
        }
        let mut lns = vec![&e.layer_norm];
        let mut lins: Vec<&Linear> = Vec::new();
        for layer in &self.layers {
            lins.extend(layer.linears());
            lns.extend(layer.layer_norms());
        }
        lins.extend(self.pooler.iter());
        if let Some(head) = &self.mlm {
            lins.push(&head.dense);
            lns.push(&head.layer_norm);
            out.insert(head.bias_name.clone(), head.bias.detach());
        }
        for lin in lins {
            out.insert(
                format!("{}.weight", lin.name),
                lin.merged_weight()?.detach(),
            );
            if let Some(b) = &lin.bias {
                out.insert(format!("{}.bias", lin.name), b.detach());
            }
        }
        for ln in lns {
            out.insert(ln.names.0.clone(), ln.weight.detach());
            out.insert(ln.names.1.clone(), ln.bias.detach());
        }
        Ok(out)
    }

    /// BERT's pooler: `tanh(dense(hidden[:, 0]))`, `[batch, hidden]`.
    ///
    /// Errors if the encoder was built without a pooler (see [`LoadOptions::with_pooler`]).
    pub fn pooled_output(&self, hidden: &Tensor) -> Result<Tensor> {
        let pooler = self.pooler.as_ref().ok_or_else(|| {
            NnError::InvalidInput(
                "this encoder has no pooler (not loaded or not in checkpoint)".into(),
            )
        })?;
        Ok(pooler.forward(&cls_pool(hidden)?)?.tanh()?)
    }

    /// Masked-LM logits `[batch, seq, vocab]`: transform (dense, activation, LayerNorm), then a
    /// decoder tied to the word embeddings, plus the head's own bias.
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.mlm.as_ref().ok_or_else(|| {
            NnError::InvalidInput(
                "this encoder has no MLM head (not loaded or not in checkpoint)".into(),
            )
        })?;
        let t = self.activation(&head.dense.forward(hidden)?, head.layer_norm.fused)?;
        let t = head.layer_norm.forward(&t)?;
        let decoder = Linear {
            name: "decoder".to_string(),
            weight: self.embeddings.word.weight.clone(),
            bias: Some(head.bias.clone()),
            lora: None,
        };
        // f32 logits whatever the layers computed in: the loss is taken in f32.
        Ok(decoder.forward(&t)?.to_dtype(DType::F32)?)
    }
}

/// The hidden state of the first token (`[CLS]` / `<s>`), `[batch, hidden]`.
pub fn cls_pool(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.i((.., 0, ..))?.contiguous()?)
}

/// Mean of the hidden states over real tokens (`attention_mask == 1`), `[batch, hidden]`.
///
/// This is sentence-transformers' mean pooling; the count is clamped so an all-pad row yields
/// zeros rather than NaN.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let count = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(summed.broadcast_div(&count)?)
}
