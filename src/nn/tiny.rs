//! Tiny random checkpoints in Hugging Face layout, for tests (kiln's included): BERT encoders
//! and Llama / Qwen2 / Mistral decoders.
//!
//! No hub access is available in tests, so they build their own models: a `config.json` and a
//! `model.safetensors` with every tensor a real checkpoint has, random but reproducible, plus a
//! tokenizer.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::bert::{BertConfig, HiddenAct};
use super::decoder::DecoderConfig;
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

/// Special tokens of the tiny decoders' tokenizer, ids 256, 257, 258 (after the 256 bytes).
pub const TINY_DECODER_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Qwen2's ChatML chat template, as written to the tiny decoders' `tokenizer_config.json`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The Hugging Face class written to `architectures` for a decoder `model_type`.
fn decoder_architecture(model_type: &str) -> Option<&'static str> {
    match model_type {
        "llama" => Some("LlamaForCausalLM"),
        "qwen2" => Some("Qwen2ForCausalLM"),
        "mistral" => Some("MistralForCausalLM"),
        _ => None,
    }
}

/// A small decoder config for tests: hidden 64, 2 layers, 4 query heads sharing 2 key/value
/// heads, intermediate 128, vocab 259 (the byte-level tokenizer of [`write_tiny_decoder`]),
/// 512 positions, `eos_token_id` = `<|im_end|>`.
///
/// The families differ as their real configs do: `llama` is untied without biases (rope theta
/// 1e4); `qwen2` ties its embeddings and has q/k/v biases (theta 1e6); `mistral` is untied, with
/// a sliding window (4096, so inactive at 512 positions) and an explicit `head_dim` of 32,
/// wider than hidden / heads. Any other `model_type` gives a llama-like config that does not
/// validate.
pub fn tiny_decoder_config(model_type: &str) -> DecoderConfig {
    let mut cfg = DecoderConfig {
        model_type: model_type.to_string(),
        architectures: decoder_architecture(model_type)
            .map(|a| vec![a.to_string()])
            .unwrap_or_default(),
        vocab_size: 259,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: None,
        hidden_act: "silu".to_string(),
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
        use_sliding_window: false,
        max_window_layers: None,
        bos_token_id: None,
        eos_token_id: Some(serde_json::json!(258)),
        torch_dtype: Some("float32".to_string()),
    };
    match model_type {
        "qwen2" => {
            cfg.rope_theta = 1_000_000.0;
            cfg.tie_word_embeddings = true;
            cfg.attention_bias = true;
            cfg.sliding_window = Some(512);
            cfg.max_window_layers = Some(2);
        }
        "mistral" => {
            cfg.rope_theta = 1_000_000.0;
            cfg.sliding_window = Some(4096);
            cfg.head_dim = Some(32);
        }
        _ => {}
    }
    cfg
}

/// Writes a tiny random decoder of `model_type` (`llama`, `qwen2`, `mistral`) to `dir`: see
/// [`tiny_decoder_config`] and [`write_tiny_decoder_with`].
pub fn write_tiny_decoder(dir: &Path, model_type: &str, seed: u64) -> Result<()> {
    write_tiny_decoder_with(dir, &tiny_decoder_config(model_type), seed)
}

/// Writes a random decoder for `config` to `dir` (created if needed), as a hub model directory:
/// `config.json`, `model.safetensors` (weights and biases normal with std 0.02, norms 1),
/// `generation_config.json`, and a byte-level BPE `tokenizer.json` with its
/// `tokenizer_config.json` (ChatML template, eos `<|im_end|>`, pad `<|endoftext|>`, no bos).
///
/// The tokenizer's vocabulary is the 256 byte-level symbols (id = byte value) and no merges, so
/// any text round-trips exactly, one token per byte; the special tokens follow. `vocab_size`
/// must be at least 259.
pub fn write_tiny_decoder_with(dir: &Path, config: &DecoderConfig, seed: u64) -> Result<()> {
    use serde_json::{Value, json};
    config.validate()?;
    let specials = TINY_DECODER_SPECIAL_TOKENS.len() as u32;
    if config.vocab_size < 256 + specials as usize {
        return Err(NnError::InvalidConfig(format!(
            "a tiny decoder needs vocab_size >= {} for its byte-level tokenizer, got {}",
            256 + specials,
            config.vocab_size
        )));
    }
    let io = |source| NnError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let write_json = |name: &str, value: &Value| -> Result<()> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| NnError::InvalidConfig(format!("cannot serialise {name}: {e}")))?;
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| NnError::Io { path, source })
    };

    let mut cfg_json = serde_json::to_value(config)
        .map_err(|e| NnError::InvalidConfig(format!("cannot serialise config: {e}")))?;
    if let Some(obj) = cfg_json.as_object_mut() {
        if config.architectures.is_empty()
            && let Some(arch) = decoder_architecture(&config.model_type)
        {
            obj.insert("architectures".into(), json!([arch]));
        }
        obj.entry("torch_dtype").or_insert(json!("float32"));
    }
    write_json("config.json", &cfg_json)?;

    let (endoftext, im_end) = (256u32, 258u32);
    write_json(
        "generation_config.json",
        &json!({"eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}),
    )?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the logarithm finite.
                let u1: f32 = 1.0 - rng.random::<f32>();
                let u2: f32 = rng.random::<f32>();
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    };
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize], data: Vec<f32>| -> Result<()> {
        tensors.insert(name, Tensor::from_vec(data, shape, &dev)?);
        Ok(())
    };
    let std = 0.02;
    let (h, v, inter) = (
        config.hidden_size,
        config.vocab_size,
        config.intermediate_size,
    );
    let q_dim = config.num_attention_heads * config.head_dim();
    let kv_dim = config.num_key_value_heads * config.head_dim();
    let llama = config.model_type == "llama";
    put(
        "model.embed_tokens.weight".into(),
        &[v, h],
        normal(v * h, std),
    )?;
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, out_dim, in_dim, bias) in [
            ("self_attn.q_proj", q_dim, h, config.attention_bias),
            ("self_attn.k_proj", kv_dim, h, config.attention_bias),
            ("self_attn.v_proj", kv_dim, h, config.attention_bias),
            ("self_attn.o_proj", h, q_dim, config.attention_bias && llama),
            ("mlp.gate_proj", inter, h, config.mlp_bias && llama),
            ("mlp.up_proj", inter, h, config.mlp_bias && llama),
            ("mlp.down_proj", h, inter, config.mlp_bias && llama),
        ] {
            let w = normal(out_dim * in_dim, std);
            put(format!("{p}.{name}.weight"), &[out_dim, in_dim], w)?;
            if bias {
                put(format!("{p}.{name}.bias"), &[out_dim], normal(out_dim, std))?;
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            put(format!("{p}.{norm}.weight"), &[h], vec![1.0; h])?;
        }
    }
    put("model.norm.weight".into(), &[h], vec![1.0; h])?;
    if !config.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, h], normal(v * h, std))?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;

    write_byte_level_tokenizer(dir)?;
    let added: serde_json::Map<String, Value> = TINY_DECODER_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let entry = json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true});
            ((256 + i).to_string(), entry)
        })
        .collect();
    write_json(
        "tokenizer_config.json",
        &json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": null,
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": config.max_position_embeddings,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": null
        }),
    )
}

/// GPT-2's byte-to-symbol table: printable Latin-1 bytes stand for themselves, the others
/// (controls, space, ...) for code points from U+0100 on, in byte order.
fn byte_level_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            // Every code used is below U+0144: valid scalar values.
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

/// Writes the byte-level BPE `tokenizer.json` described in [`write_tiny_decoder_with`].
fn write_byte_level_tokenizer(dir: &Path) -> Result<()> {
    use serde_json::{Map, Value, json};
    let mut vocab = Map::new();
    for (id, symbol) in byte_level_symbols().into_iter().enumerate() {
        vocab.insert(symbol.to_string(), json!(id));
    }
    let added: Vec<Value> = TINY_DECODER_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).map_err(|source| NnError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_symbols_are_distinct_and_gpt2s() {
        let symbols = byte_level_symbols();
        let distinct: std::collections::HashSet<char> = symbols.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(symbols[b' ' as usize], 'Ġ');
        assert_eq!(symbols[b'\n' as usize], 'Ċ');
        assert_eq!(symbols[b'A' as usize], 'A');
    }
}
