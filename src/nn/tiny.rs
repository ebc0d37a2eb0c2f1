//! Tiny random BERT checkpoints in Hugging Face layout, for tests (kiln's included).
//!
//! No hub access is available in tests, so they build their own models: a `config.json` and a
//! `model.safetensors` with every tensor a real BERT checkpoint has, random but reproducible.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::bert::{BertConfig, HiddenAct};
use super::{NnError, Result};

/// How tensor names are laid out in the written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyLayout {
    /// `bert.embeddings...` (or `roberta.` etc., from `model_type`), plus the pooler and the
    /// MLM head (`cls.predictions.*` for BERT, `lm_head.*` for RoBERTa) as `*ForPreTraining`
    /// checkpoints have.
    Prefixed,
    /// `embeddings...` with no head, as sentence-transformers' MiniLM is saved.
    Unprefixed,
}

/// A small config for tests: hidden 32, 2 layers, 4 heads, vocab 100, no dropout.
pub fn tiny_bert_config() -> BertConfig {
    BertConfig {
        vocab_size: 100,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        model_type: "bert".to_string(),
        position_embedding_type: Some("absolute".to_string()),
        initializer_range: 0.02,
    }
}

/// Writes a random model for `config` to `dir` (created if needed) in the prefixed layout.
pub fn write_tiny_bert(dir: &Path, config: &BertConfig, seed: u64) -> Result<()> {
    write_tiny_bert_with(dir, config, seed, TinyLayout::Prefixed)
}

/// Writes a random model for `config` to `dir` with the given name layout.
///
/// Weights are uniform with std ~0.1 (larger than BERT's 0.02 init so parity tests exercise
/// non-trivial values); LayerNorm scales are around 1; biases are non-zero so a dropped bias
/// would show up in parity tests.
pub fn write_tiny_bert_with(
    dir: &Path,
    config: &BertConfig,
    seed: u64,
    layout: TinyLayout,
) -> Result<()> {
    config.validate()?;
    let io = |source| NnError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let json = serde_json::to_string_pretty(config)
        .map_err(|e| NnError::InvalidConfig(format!("cannot serialise config: {e}")))?;
    std::fs::write(dir.join("config.json"), json).map_err(io)?;

    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    // Uniform on [-a, a] has std a/sqrt(3); a = 0.17 gives ~0.1.
    let mut put = |name: String, shape: &[usize], center: f32, half_width: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| center + rng.random_range(-half_width..=half_width))
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &dev)?);
        Ok(())
    };
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let prefix = match layout {
        TinyLayout::Prefixed => format!("{}.", config.model_type.replace('-', "_")),
        TinyLayout::Unprefixed => String::new(),
    };
    let w = 0.17;
    let e = format!("{prefix}embeddings");
    put(format!("{e}.word_embeddings.weight"), &[v, h], 0.0, w)?;
    put(
        format!("{e}.position_embeddings.weight"),
        &[config.max_position_embeddings, h],
        0.0,
        w,
    )?;
    put(
        format!("{e}.token_type_embeddings.weight"),
        &[config.type_vocab_size, h],
        0.0,
        w,
    )?;
    put(format!("{e}.LayerNorm.weight"), &[h], 1.0, 0.1)?;
    put(format!("{e}.LayerNorm.bias"), &[h], 0.0, 0.1)?;
    for l in 0..config.num_hidden_layers {
        let p = format!("{prefix}encoder.layer.{l}");
        for (name, out_dim, in_dim) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            put(format!("{p}.{name}.weight"), &[out_dim, in_dim], 0.0, w)?;
            put(format!("{p}.{name}.bias"), &[out_dim], 0.0, 0.05)?;
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(format!("{p}.{ln}.weight"), &[h], 1.0, 0.1)?;
            put(format!("{p}.{ln}.bias"), &[h], 0.0, 0.1)?;
        }
    }
    if layout == TinyLayout::Prefixed {
        put(format!("{prefix}pooler.dense.weight"), &[h, h], 0.0, w)?;
        put(format!("{prefix}pooler.dense.bias"), &[h], 0.0, 0.05)?;
        let (dense, ln, bias) = if config.roberta_positions() {
            ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")
        } else {
            (
                "cls.predictions.transform.dense",
                "cls.predictions.transform.LayerNorm",
                "cls.predictions.bias",
            )
        };
        put(format!("{dense}.weight"), &[h, h], 0.0, w)?;
        put(format!("{dense}.bias"), &[h], 0.0, 0.05)?;
        put(format!("{ln}.weight"), &[h], 1.0, 0.1)?;
        put(format!("{ln}.bias"), &[h], 0.0, 0.1)?;
        put(bias.to_string(), &[v], 0.0, 0.05)?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Special tokens of the tiny tokenizer, ids 0..=4.
pub const TINY_SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Writes a WordPiece `tokenizer.json` (BERT normalisation and `[CLS] … [SEP]` template)
/// whose vocabulary is the special tokens followed by `words`, lowercased. Whole words only:
/// anything else becomes `[UNK]`. Pair it with a config whose `vocab_size` covers it.
pub fn write_tiny_tokenizer(dir: &Path, words: &[&str]) -> Result<()> {
    use serde_json::{Map, Value, json};
    let mut vocab = Map::new();
    for (i, t) in TINY_SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert((*t).to_owned(), json!(i));
    }
    for w in words {
        let w = w.to_lowercase();
        if !vocab.contains_key(&w) {
            let id = vocab.len();
            vocab.insert(w, json!(id));
        }
    }
    let added: Vec<Value> = TINY_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let special = |t: &str, id: usize| json!({"id": t, "ids": [id], "tokens": [t]});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": special("[CLS]", 2), "[SEP]": special("[SEP]", 3)}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::create_dir_all(dir).map_err(|source| NnError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).map_err(|source| NnError::Io { path, source })
}
