//! Specifications of the trainable Llama-family decoder (Llama, Qwen2, Mistral): every trainable
//! weight learns and frozen ones do not, LoRA starts as the base model and merges into it,
//! outputs match candle-transformers' (inference-only) implementations on the same weights,
//! and incremental decoding with a KV cache gives the logits of a full forward pass.

use std::path::Path;

use candle_core::Device;
use candle_nn::VarMap;
use kiln::nn::NnError;
use kiln::nn::decoder::{Decoder, DecoderConfig, DecoderLoadOptions};
use kiln::nn::tiny::{
    CHATML_TEMPLATE, TINY_DECODER_SPECIAL_TOKENS, tiny_decoder_config, write_tiny_decoder,
    write_tiny_decoder_with,
};

fn tiny_dir(model_type: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_decoder(dir.path(), model_type, 7).unwrap();
    dir
}

fn load(dir: &Path, varmap: &VarMap, opts: &DecoderLoadOptions) -> Decoder {
    Decoder::load_dir(dir, varmap, &Device::Cpu, opts).unwrap()
}

#[test]
fn tiny_tokenizer_round_trips_any_text_and_maps_special_tokens_to_single_ids() {
    let dir = tiny_dir("qwen2");
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let text = "Hello, wörld!\n<|im_start|>";
    let enc = tok.encode(text, false).unwrap();
    let ids = enc.get_ids();
    // One id per byte of "Hello, wörld!\n" (ö is two bytes), then the special token.
    assert_eq!(ids.len(), "Hello, wörld!\n".len() + 1);
    assert_eq!(ids[0], b'H' as u32);
    assert_eq!(*ids.last().unwrap(), 257);
    assert_eq!(tok.decode(ids, false).unwrap(), text);
    for (i, special) in TINY_DECODER_SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(special), Some(256 + i as u32));
        assert_eq!(
            tok.encode(*special, false).unwrap().get_ids(),
            &[256 + i as u32]
        );
    }
    for text in ["  two  spaces\tand tabs\r\n", "日本語 😀", "\u{0}\u{7f}"] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), text.len());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    assert_eq!(tok.get_vocab_size(true), 259);

    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["chat_template"], CHATML_TEMPLATE);
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|endoftext|>");
    assert!(tc["bos_token"].is_null());
}

#[test]
fn tiny_decoders_write_hub_style_configs_that_load() {
    for (model_type, arch) in [
        ("llama", "LlamaForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ] {
        let dir = tiny_dir(model_type);
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(raw["architectures"], serde_json::json!([arch]));
        assert_eq!(raw["torch_dtype"], "float32");
        let cfg = DecoderConfig::from_file(&dir.path().join("config.json")).unwrap();
        assert_eq!(cfg, tiny_decoder_config(model_type));
        assert_eq!(cfg.eos_token_ids(), vec![258]);
        assert!(dir.path().join("generation_config.json").exists());
        let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
        assert_eq!(dec.config().model_type, model_type);
        let names: Vec<&str> = dec
            .named_trainable_vars()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(names.contains(&"model.embed_tokens.weight"));
        assert_eq!(
            names.contains(&"lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{model_type}"
        );
        assert_eq!(
            names.contains(&"model.layers.0.self_attn.q_proj.bias"),
            model_type == "qwen2"
        );
    }
    assert!(matches!(
        write_tiny_decoder(tempfile::tempdir().unwrap().path(), "gpt2", 1),
        Err(NnError::InvalidConfig(_))
    ));
    let mut small = tiny_decoder_config("llama");
    small.vocab_size = 100;
    assert!(write_tiny_decoder_with(tempfile::tempdir().unwrap().path(), &small, 1).is_err());
}
