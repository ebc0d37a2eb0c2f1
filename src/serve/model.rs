//! One loaded encoder, ready for inference: its tokenizer, the transformer (kiln's own
//! implementation or candle-transformers' where that one is faster), the classification head
//! when the checkpoint has one, and the sentence-transformers pooling its directory describes.
//!
//! Everything here is synchronous and runs on the serving threads, never on tokio's.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::Value;

use crate::data::text::{EncodedBatch, EncodedText, TextTokenizer, pad_batch};
use crate::nn::bert::{BertConfig, BertEncoder, HiddenAct, LoadOptions};
use crate::nn::classifier::{ClassificationHead, HeadNaming, labels_from_config};
use crate::nn::layers::load_model_weights;

/// Which transformer implementation runs the forward pass.
///
/// `Auto` picks the faster one, as measured by `cargo bench --bench serve_forward`
/// (bench/README.md): on CPU, kiln's own encoder (fused LayerNorm/GELU kernels, pre-shaped
/// attention) beats candle-transformers' BERT by 10-25 % at batch 1, 8 and 64 on
/// all-MiniLM-L6-v2, so `Auto` runs kiln's. candle-transformers' stays selectable and is
/// tested to give the same outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Implementation {
    /// The faster implementation for the architecture (kiln's, by measurement).
    #[default]
    Auto,
    /// kiln's training implementation (`nn::bert`).
    Kiln,
    /// candle-transformers' BERT; an error for architectures it does not cover.
    Candle,
}

impl std::str::FromStr for Implementation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Implementation::Auto),
            "kiln" => Ok(Implementation::Kiln),
            "candle" => Ok(Implementation::Candle),
            other => Err(format!(
                "unknown implementation '{other}' (auto, kiln, candle)"
            )),
        }
    }
}

/// A model directory kiln cannot serve, or a failure while running it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model is not something this endpoint can run (wrong family, no head, ...).
    #[error("{0}")]
    Unsupported(String),
    /// The directory is incomplete or inconsistent.
    #[error("{0}")]
    Invalid(String),
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<crate::nn::NnError> for ModelError {
    fn from(e: crate::nn::NnError) -> Self {
        ModelError::Invalid(e.to_string())
    }
}

/// How token states become one sentence vector (sentence-transformers' `Pooling` module,
/// optionally followed by `Normalize`). Several modes concatenate in sentence-transformers'
/// order: CLS, max, mean, mean/sqrt(len).
#[derive(Debug, Clone, PartialEq)]
pub struct Pooling {
    pub cls: bool,
    pub max: bool,
    pub mean: bool,
    pub mean_sqrt_len: bool,
    pub normalize: bool,
}

impl Pooling {
    /// sentence-transformers' default for a plain transformers checkpoint: mean pooling.
    fn default_mean() -> Pooling {
        Pooling {
            cls: false,
            max: false,
            mean: true,
            mean_sqrt_len: false,
            normalize: false,
        }
    }

    /// Reads `modules.json` and the pooling module's `config.json`.
    pub fn from_dir(dir: &Path) -> Result<Pooling, ModelError> {
        let modules_path = dir.join("modules.json");
        let Ok(text) = std::fs::read_to_string(&modules_path) else {
            return Ok(Pooling::default_mean());
        };
        let invalid = |m: String| ModelError::Invalid(format!("{}: {m}", modules_path.display()));
        let modules: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut pooling = None;
        let mut normalize = false;
        for module in &modules {
            let kind = module["type"].as_str().unwrap_or("");
            let path = module["path"].as_str().unwrap_or("");
            match kind.rsplit('.').next().unwrap_or("") {
                "Transformer" => {}
                "Normalize" => normalize = true,
                "Pooling" => {
                    if path.contains("..") || path.starts_with('/') {
                        return Err(invalid(format!("module path '{path}' is not allowed")));
                    }
                    let config_path = dir.join(path).join("config.json");
                    let text = std::fs::read_to_string(&config_path).map_err(|e| {
                        ModelError::Invalid(format!("{}: {e}", config_path.display()))
                    })?;
                    let c: Value = serde_json::from_str(&text).map_err(|e| {
                        ModelError::Invalid(format!("{}: {e}", config_path.display()))
                    })?;
                    let flag = |k: &str| c[k].as_bool().unwrap_or(false);
                    for unsupported in
                        ["pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"]
                    {
                        if flag(unsupported) {
                            return Err(ModelError::Unsupported(format!(
                                "{}: {unsupported} is not supported",
                                config_path.display()
                            )));
                        }
                    }
                    let p = Pooling {
                        cls: flag("pooling_mode_cls_token"),
                        max: flag("pooling_mode_max_tokens"),
                        mean: flag("pooling_mode_mean_tokens"),
                        mean_sqrt_len: flag("pooling_mode_mean_sqrt_len_tokens"),
                        normalize: false,
                    };
                    if !(p.cls || p.max || p.mean || p.mean_sqrt_len) {
                        return Err(invalid(format!(
                            "{} selects no pooling mode",
                            config_path.display()
                        )));
                    }
                    pooling = Some(p);
                }
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "{}: the sentence-transformers module '{other}' is not supported",
                        modules_path.display()
                    )));
                }
            }
        }
        let mut pooling = pooling.unwrap_or_else(Pooling::default_mean);
        pooling.normalize = normalize;
        Ok(pooling)
    }

    /// Sentence vectors `[batch, dim]` from hidden states `[batch, seq, hidden]`.
    fn apply(&self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let mask3 = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?; // [b, s, 1]
        let mut parts = Vec::new();
        if self.cls {
            parts.push(hidden.narrow(1, 0, 1)?.squeeze(1)?);
        }
        if self.max {
            // Padding positions get a large negative value so they never win.
            let neg = ((mask3.ones_like()? - &mask3)? * -1e9)?;
            parts.push(hidden.broadcast_add(&neg)?.max(1)?);
        }
        if self.mean || self.mean_sqrt_len {
            let summed = hidden.broadcast_mul(&mask3)?.sum(1)?;
            let count = mask3.sum(1)?.clamp(1e-9, f64::INFINITY)?;
            if self.mean {
                parts.push(summed.broadcast_div(&count)?);
            }
            if self.mean_sqrt_len {
                parts.push(summed.broadcast_div(&count.sqrt()?)?);
            }
        }
        let pooled = Tensor::cat(&parts, 1)?;
        if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?;
            pooled.broadcast_div(&norm)
        } else {
            Ok(pooled)
        }
    }
}

enum Transformer {
    Kiln(Box<BertEncoder>),
    Candle(Box<candle_transformers::models::bert::BertModel>),
}

/// The scores of one classified input.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Probability per label, in the model's label order (softmax, or sigmoid per label for
    /// multi-label models).
    pub scores: Vec<f32>,
}

/// A loaded BERT-family encoder.
pub struct EncoderModel {
    transformer: Transformer,
    head: Option<ClassificationHead>,
    pub labels: Vec<String>,
    pub multi_label: bool,
    pub pooling: Pooling,
    pub tokenizer: TextTokenizer,
    /// Longest input for embeddings (sentence-transformers' `max_seq_length` where given).
    pub embed_max_tokens: usize,
    /// Longest input for classification (the position table's size).
    pub classify_max_tokens: usize,
    pub hidden_size: usize,
    pub architecture: String,
    /// Which implementation runs it.
    pub implementation: Implementation,
    device: Device,
}

/// Bytes a model's weights take in memory once loaded as f32 (what the serving cache counts).
pub fn weight_bytes(dir: &Path) -> Result<u64, ModelError> {
    let files = crate::models::weight_files(dir).map_err(|e| ModelError::Invalid(e.to_string()))?;
    if files.is_empty() {
        return Err(ModelError::Invalid(format!(
            "{} has no .safetensors weights",
            dir.display()
        )));
    }
    let mut total = 0u64;
    for file in files {
        for (_, numel) in crate::models::safetensors_header(&file)
            .map_err(|e| ModelError::Invalid(e.to_string()))?
        {
            total += numel * 4;
        }
    }
    Ok(total)
}

fn candle_config(cfg: &BertConfig) -> candle_transformers::models::bert::Config {
    use candle_transformers::models::bert;
    bert::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        intermediate_size: cfg.intermediate_size,
        hidden_act: match cfg.hidden_act {
            HiddenAct::Gelu => bert::HiddenAct::Gelu,
            HiddenAct::GeluTanh => bert::HiddenAct::GeluApproximate,
            HiddenAct::Relu => bert::HiddenAct::Relu,
        },
        hidden_dropout_prob: cfg.hidden_dropout_prob,
        max_position_embeddings: cfg.max_position_embeddings,
        type_vocab_size: cfg.type_vocab_size,
        initializer_range: cfg.initializer_range,
        layer_norm_eps: cfg.layer_norm_eps,
        pad_token_id: cfg.pad_token_id as usize,
        position_embedding_type: bert::PositionEmbeddingType::Absolute,
        use_cache: false,
        classifier_dropout: None,
        model_type: Some(cfg.model_type.clone()),
    }
}

/// Whether candle-transformers' BERT computes this architecture exactly: it numbers positions
/// from 0, so not the RoBERTa family (whose positions start after the padding index).
fn candle_supports(cfg: &BertConfig) -> bool {
    !cfg.roberta_positions()
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl EncoderModel {
    /// Loads a Hugging Face directory (base encoder, or a `*ForSequenceClassification`
    /// checkpoint) for inference on `device`.
    pub fn load(
        dir: &Path,
        device: &Device,
        implementation: Implementation,
    ) -> Result<EncoderModel, ModelError> {
        let config_path = dir.join("config.json");
        let raw = read_json(&config_path).ok_or_else(|| {
            ModelError::Invalid(format!("{} is missing or not JSON", config_path.display()))
        })?;
        let model_type = raw["model_type"].as_str().unwrap_or("unknown").to_owned();
        if crate::models::family_of(&model_type) != Some(crate::models::Family::Encoder) {
            return Err(ModelError::Unsupported(format!(
                "this model ({model_type}) is not a text encoder"
            )));
        }
        let config = BertConfig::from_file(&config_path)?;
        let ckpt = load_model_weights(dir, device)?;
        let naming = HeadNaming::for_model_type(&config.model_type);
        let labels = labels_from_config(&raw).unwrap_or_default();
        let head = if labels.is_empty() {
            None
        } else {
            // A config may carry default id2label entries without a trained head: only a
            // checkpoint with the head's tensors is a classifier.
            ClassificationHead::from_checkpoint(
                &ckpt,
                naming,
                config.hidden_size,
                labels.len(),
                0.0,
            )
            .ok()
        };
        let labels = if head.is_some() { labels } else { Vec::new() };
        let multi_label = raw["problem_type"].as_str() == Some("multi_label_classification");
        let chosen = match implementation {
            Implementation::Auto => Implementation::Kiln,
            Implementation::Candle if !candle_supports(&config) => {
                return Err(ModelError::Unsupported(format!(
                    "candle-transformers' BERT does not run {} models",
                    config.model_type
                )));
            }
            other => other,
        };
        let transformer = match chosen {
            Implementation::Candle => {
                let vb = candle_nn::VarBuilder::from_tensors(ckpt, DType::F32, device);
                Transformer::Candle(Box::new(
                    candle_transformers::models::bert::BertModel::load(
                        vb,
                        &candle_config(&config),
                    )?,
                ))
            }
            _ => {
                let opts = LoadOptions {
                    freeze_embeddings: true,
                    freeze_layers: config.num_hidden_layers,
                    ..LoadOptions::default()
                };
                let mut encoder =
                    BertEncoder::from_checkpoint(&config, &ckpt, &VarMap::new(), device, &opts)?;
                // Serving multiplies the same weights again and again: pack them once.
                encoder.pack_for_inference()?;
                Transformer::Kiln(Box::new(encoder))
            }
        };
        let position_limit = if config.roberta_positions() {
            config
                .max_position_embeddings
                .saturating_sub(config.pad_token_id as usize + 1)
        } else {
            config.max_position_embeddings
        };
        let st_max = read_json(&dir.join("sentence_bert_config.json"))
            .and_then(|c| c["max_seq_length"].as_u64())
            .map(|n| n as usize);
        let embed_max_tokens = st_max.map_or(position_limit, |m| m.min(position_limit));
        let tokenizer = TextTokenizer::load(dir, position_limit)
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        Ok(EncoderModel {
            transformer,
            head,
            labels,
            multi_label,
            pooling: Pooling::from_dir(dir)?,
            tokenizer,
            embed_max_tokens,
            classify_max_tokens: position_limit,
            hidden_size: config.hidden_size,
            architecture: config.model_type.clone(),
            implementation: chosen,
            device: device.clone(),
        })
    }

    /// Whether the checkpoint has a classification head.
    pub fn is_classifier(&self) -> bool {
        self.head.is_some()
    }

    /// The width of the embeddings this model returns.
    pub fn embedding_dim(&self) -> usize {
        let p = &self.pooling;
        self.hidden_size
            * [p.cls, p.max, p.mean, p.mean_sqrt_len]
                .iter()
                .filter(|x| **x)
                .count()
    }

    /// Tokenises one text for `purpose`, truncating when allowed. Err(length) when the text
    /// is too long and truncation was not asked for.
    pub fn tokenize(
        &self,
        text: &str,
        purpose: Purpose,
        truncate: bool,
    ) -> Result<EncodedText, TokenizeError> {
        let max = match purpose {
            Purpose::Classify => self.classify_max_tokens,
            Purpose::Embed => self.embed_max_tokens,
        };
        // `encode` already cuts at the position table's size and says whether it did.
        let (mut row, cut) = self
            .tokenizer
            .encode(text)
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?;
        if cut || row.ids.len() > max {
            if !truncate {
                let tokens = if cut {
                    self.tokenizer
                        .token_ids(text)
                        .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?
                        .len()
                } else {
                    row.ids.len()
                };
                return Err(TokenizeError::TooLong { tokens, max });
            }
            row.truncate(max);
        }
        Ok(row)
    }

    fn hidden(&self, batch: &EncodedBatch) -> Result<(Tensor, Tensor), ModelError> {
        let shape = (batch.batch, batch.seq_len);
        let ids = Tensor::from_slice(&batch.input_ids, shape, &self.device)?;
        let types = Tensor::from_slice(&batch.token_type_ids, shape, &self.device)?;
        let mask = Tensor::from_slice(&batch.attention_mask, shape, &self.device)?;
        let hidden = match &self.transformer {
            Transformer::Kiln(enc) => enc.forward(&ids, Some(&types), &mask, false)?,
            Transformer::Candle(model) => {
                model.forward(&ids, &types, Some(&mask.to_dtype(DType::F32)?))?
            }
        };
        Ok((hidden, mask))
    }

    /// The last hidden state of each row's first token, `[batch, hidden]` (what a
    /// classification head reads): kiln's encoder computes the last layer for that token only.
    fn first_token(&self, batch: &EncodedBatch) -> Result<Tensor, ModelError> {
        let shape = (batch.batch, batch.seq_len);
        let ids = Tensor::from_slice(&batch.input_ids, shape, &self.device)?;
        let types = Tensor::from_slice(&batch.token_type_ids, shape, &self.device)?;
        let mask = Tensor::from_slice(&batch.attention_mask, shape, &self.device)?;
        match &self.transformer {
            Transformer::Kiln(enc) => Ok(enc.forward_first_token(&ids, Some(&types), &mask)?),
            Transformer::Candle(_) => {
                let (hidden, _) = self.hidden(batch)?;
                Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)
            }
        }
    }

    /// Label probabilities for a batch of tokenised inputs.
    pub fn classify(&self, rows: &[&EncodedText]) -> Result<Vec<Classification>, ModelError> {
        let head = self.head.as_ref().ok_or_else(|| {
            ModelError::Unsupported("this model has no classification head".into())
        })?;
        let batch = pad_batch(rows, self.tokenizer.pad_id());
        let first = self.first_token(&batch)?;
        let logits = head.forward(&first, false)?;
        let probs = if self.multi_label {
            candle_nn::ops::sigmoid(&logits)?
        } else {
            candle_nn::ops::softmax(&logits, D::Minus1)?
        };
        Ok(probs
            .to_vec2::<f32>()?
            .into_iter()
            .map(|scores| Classification { scores })
            .collect())
    }

    /// Pooled (and, where configured, normalised) sentence embeddings.
    pub fn embed(&self, rows: &[&EncodedText]) -> Result<Vec<Vec<f32>>, ModelError> {
        let batch = pad_batch(rows, self.tokenizer.pad_id());
        let (hidden, mask) = self.hidden(&batch)?;
        Ok(self.pooling.apply(&hidden, &mask)?.to_vec2::<f32>()?)
    }
}

/// What an input is tokenised for (the two have different length limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Classify,
    Embed,
}

/// Why an input could not be tokenised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenizeError {
    #[error("{tokens} tokens, more than the model's limit of {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}
