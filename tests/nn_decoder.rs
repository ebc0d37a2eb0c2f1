//! Specifications of the trainable Llama-family decoder (Llama, Qwen2, Mistral): every trainable
//! weight learns and frozen ones do not, LoRA starts as the base model and merges into it,
//! outputs match candle-transformers' (inference-only) implementations on the same weights,
//! and incremental decoding with a KV cache gives the logits of a full forward pass.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use kiln::nn::NnError;
use kiln::nn::autograd::Backprop;
use kiln::nn::decoder::{Decoder, DecoderConfig, DecoderLoadOptions};
use kiln::nn::lora::LoraConfig;
use kiln::nn::tiny::{
    CHATML_TEMPLATE, TINY_DECODER_SPECIAL_TOKENS, tiny_decoder_config, write_tiny_decoder,
    write_tiny_decoder_with,
};

const TYPES: [&str; 3] = ["llama", "qwen2", "mistral"];

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

/// Deterministic token ids in `[0, 256)`.
fn ids_from(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 256)
        .collect()
}

/// A batch of 3 right-padded rows of length 9 (real lengths 9, 6, 4), pads = `<|endoftext|>`.
fn padded_batch(dev: &Device) -> (Tensor, Tensor) {
    padded_batch_of(&[9, 6, 4], dev)
}

/// Rows of these real lengths, right-padded to the longest.
fn padded_batch_of(lens: &[usize], dev: &Device) -> (Tensor, Tensor) {
    let width = lens.iter().copied().max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (row, &len) in lens.iter().enumerate() {
        let mut real = ids_from(row as u32 + 1, len);
        real.resize(width, 256);
        ids.extend(real);
        mask.extend((0..width).map(|i| u32::from(i < len)));
    }
    (
        Tensor::from_vec(ids, (lens.len(), width), dev).unwrap(),
        Tensor::from_vec(mask, (lens.len(), width), dev).unwrap(),
    )
}

/// Mean next-token cross-entropy over the positions whose next token is real.
fn causal_lm_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let (b, t, v) = logits.dims3().unwrap();
    let mask = mask.to_vec2::<u32>().unwrap();
    let ids = ids.to_vec2::<u32>().unwrap();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b {
        for p in 0..t - 1 {
            if mask[r][p + 1] == 1 {
                rows.push((r * t + p) as u32);
                targets.push(ids[r][p + 1]);
            }
        }
    }
    let dev = logits.device();
    let picked = logits
        .reshape((b * t, v))
        .unwrap()
        .index_select(&Tensor::new(rows.as_slice(), dev).unwrap(), 0)
        .unwrap();
    candle_nn::loss::cross_entropy(&picked, &Tensor::new(targets.as_slice(), dev).unwrap()).unwrap()
}

fn grad_norm(grads: &candle_core::backprop::GradStore, v: &Var) -> f32 {
    grads
        .get(v.as_tensor())
        .map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .unwrap_or(0.0)
}

/// Names of variables whose gradient is absent or zero.
fn without_gradient(
    grads: &candle_core::backprop::GradStore,
    vars: &[(String, Var)],
) -> Vec<String> {
    vars.iter()
        .filter(|(_, v)| grad_norm(grads, v) == 0.0)
        .map(|(n, _)| n.clone())
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

/// Weight tensors per layer: 7 projections, their biases, 2 norms.
fn tensors_per_layer(cfg: &DecoderConfig) -> usize {
    let biases = match cfg.model_type.as_str() {
        "qwen2" => 3,
        "llama" if cfg.attention_bias => 4,
        _ => 0,
    };
    7 + biases + 2
}

#[test]
fn every_trainable_variable_receives_a_nonzero_gradient() {
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let varmap = VarMap::new();
        let dec = load(dir.path(), &varmap, &DecoderLoadOptions::default());
        let cfg = dec.config().clone();
        // Embeddings, layers, final norm, and the LM head unless it is the embedding table.
        let expected = 1
            + tensors_per_layer(&cfg) * cfg.num_hidden_layers
            + 1
            + usize::from(!cfg.tie_word_embeddings);
        assert_eq!(dec.named_trainable_vars().len(), expected, "{model_type}");
        assert_eq!(varmap.all_vars().len(), expected);
        assert!(dec.named_frozen_tensors().is_empty());

        let logits = dec.forward(&ids, &mask, true).unwrap();
        assert_eq!(logits.dims(), &[3, 9, cfg.vocab_size]);
        assert_eq!(logits.dtype(), DType::F32);
        let loss = causal_lm_loss(&logits, &ids, &mask);
        // Near-uniform predictions at init: about ln(vocab).
        let l = loss.to_scalar::<f32>().unwrap();
        assert!((l - (cfg.vocab_size as f32).ln()).abs() < 0.5, "loss {l}");
        let grads = loss.backprop().unwrap();
        let missing = without_gradient(&grads, dec.named_trainable_vars());
        assert!(
            missing.is_empty(),
            "{model_type}: no gradient for {missing:?}"
        );
    }
}

#[test]
fn fused_and_primitive_ops_give_the_same_logits_and_gradients() {
    let dev = Device::Cpu;
    fused_and_primitive_agree(padded_batch(&dev));
}

#[test]
fn long_batches_take_the_fused_gated_feed_forward_block_with_the_same_gradients() {
    // 8 × 40 rows, over 4× the hidden width: the gated feed-forward block runs as one kernel
    // (nn::mlp::residual_swiglu).
    let dev = Device::Cpu;
    fused_and_primitive_agree(padded_batch_of(&[40, 37, 33, 30, 26, 21, 17, 12], &dev));
}

#[test]
fn lora_adapters_give_the_same_logits_and_gradients_inside_the_fused_blocks_as_in_separate_ops() {
    // The fused attention and gated feed-forward blocks compute the adapters inside (frozen
    // base weights, trainable A and B); the primitive path adds them as separate ops. B is
    // made non-zero so every adapter matrix gets a gradient.
    let dev = Device::Cpu;
    let long = padded_batch_of(&[40, 37, 33, 30, 26, 21, 17, 12], &dev);
    fused_and_primitive_agree_with(long, &lora_options(&["all-linear"]));
    fused_and_primitive_agree_with(padded_batch(&dev), &lora_options(&["q_proj", "v_proj"]));
}

fn fused_and_primitive_agree(batch: (Tensor, Tensor)) {
    fused_and_primitive_agree_with(batch, &DecoderLoadOptions::default());
}

/// Sets every LoRA `B` (zero at creation) to small values fixed by its position.
fn perturb_lora_b(dec: &Decoder) {
    for (i, (name, v)) in dec.named_trainable_vars().iter().enumerate() {
        if name.contains("lora_B") {
            let (o, r) = v.as_tensor().dims2().unwrap();
            let vals: Vec<f32> = ids_from(i as u32, o * r)
                .into_iter()
                .map(|x| (x as f32 / 128.0 - 1.0) * 0.2)
                .collect();
            v.set(&Tensor::from_vec(vals, (o, r), v.device()).unwrap())
                .unwrap();
        }
    }
}

fn fused_and_primitive_agree_with((ids, mask): (Tensor, Tensor), opts: &DecoderLoadOptions) {
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let run = |fused: bool| {
            let mut dec = load(dir.path(), &VarMap::new(), opts);
            perturb_lora_b(&dec);
            dec.set_fused_ops(fused);
            let logits = dec.forward(&ids, &mask, true).unwrap();
            let grads = causal_lm_loss(&logits, &ids, &mask).backprop().unwrap();
            let g: Vec<Tensor> = dec
                .named_trainable_vars()
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (logits, g)
        };
        let (l1, g1) = run(true);
        let (l0, g0) = run(false);
        assert!(max_abs_diff(&l1, &l0) < 1e-5);
        for (a, b) in g1.iter().zip(&g0) {
            let scale = b.abs().unwrap().max_keepdim(0).unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1e-6);
            let diff = max_abs_diff(a, b);
            assert!(
                diff / scale < 1e-3,
                "{model_type}: gradient differs by {diff}"
            );
        }
    }
}

#[test]
fn frozen_embeddings_and_layers_are_plain_tensors_without_gradient() {
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let varmap = VarMap::new();
        let opts = DecoderLoadOptions {
            freeze_embeddings: true,
            freeze_layers: 1,
            ..DecoderLoadOptions::default()
        };
        let dec = load(dir.path(), &varmap, &opts);
        let cfg = dec.config().clone();
        let names: Vec<&str> = dec
            .named_trainable_vars()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(!names.contains(&"model.embed_tokens.weight"));
        assert!(!names.iter().any(|n| n.starts_with("model.layers.0.")));
        assert!(names.iter().any(|n| n.starts_with("model.layers.1.")));
        assert!(names.contains(&"model.norm.weight"));
        // An untied LM head is not an embedding: it still trains.
        assert_eq!(
            names.contains(&"lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{model_type}"
        );
        assert_eq!(varmap.all_vars().len(), names.len());
        let frozen: Vec<&str> = dec
            .named_frozen_tensors()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(frozen.len(), 1 + tensors_per_layer(&cfg));
        assert!(frozen.contains(&"model.embed_tokens.weight"));

        let logits = dec.forward(&ids, &mask, true).unwrap();
        let grads = causal_lm_loss(&logits, &ids, &mask).backprop().unwrap();
        for (name, t) in dec.named_frozen_tensors() {
            assert!(grads.get(t).is_none(), "frozen {name} got a gradient");
        }
        let missing = without_gradient(&grads, dec.named_trainable_vars());
        assert!(
            missing.is_empty(),
            "{model_type}: no gradient for {missing:?}"
        );
    }
}

fn lora_options(modules: &[&str]) -> DecoderLoadOptions {
    DecoderLoadOptions {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 3,
            ..LoraConfig::default()
        }),
        lora_modules: modules.iter().map(|m| m.to_string()).collect(),
        ..DecoderLoadOptions::default()
    }
}

#[test]
fn lora_trains_only_adapters_starts_as_the_base_model_and_merges_to_the_same_function() {
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let base = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
        let base_out = base.forward(&ids, &mask, false).unwrap();

        let varmap = VarMap::new();
        let mut dec = load(dir.path(), &varmap, &lora_options(&["all-linear"]));
        assert!(dec.has_lora());
        let cfg = dec.config().clone();
        let names: Vec<&String> = dec.named_trainable_vars().iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2 * 7 * cfg.num_hidden_layers);
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
        );
        for expected in [
            "model.layers.1.self_attn.q_proj.lora_A.weight",
            "model.layers.0.mlp.down_proj.lora_B.weight",
        ] {
            assert!(names.contains(&&expected.to_string()), "{expected}");
        }
        assert_eq!(varmap.all_vars().len(), names.len());

        // B = 0: the adapted model is the base model (to rounding).
        let out = dec.forward(&ids, &mask, false).unwrap();
        let d = max_abs_diff(&out, &base_out);
        assert!(d < 1e-5, "{model_type}: {d}");

        // At step 0 only B gets a gradient (A's goes through B = 0); no base weight does.
        let loss = causal_lm_loss(&dec.forward(&ids, &mask, true).unwrap(), &ids, &mask);
        let grads = loss.backprop().unwrap();
        for (name, v) in dec.named_trainable_vars() {
            let norm = grad_norm(&grads, v);
            if name.contains("lora_B") {
                assert!(norm > 0.0, "{name} has no gradient at step 0");
            } else {
                assert_eq!(norm, 0.0, "{name}");
            }
        }
        for (name, t) in dec.named_frozen_tensors() {
            assert!(
                grads.get(t).is_none(),
                "frozen base weight {name} got a gradient"
            );
        }

        // Give B non-zero values (as training would): then every adapter matrix learns, and
        // the model differs from the base.
        perturb_lora_b(&dec);
        let loss = causal_lm_loss(&dec.forward(&ids, &mask, true).unwrap(), &ids, &mask);
        let grads = loss.backprop().unwrap();
        let missing = without_gradient(&grads, dec.named_trainable_vars());
        assert!(
            missing.is_empty(),
            "{model_type}: no gradient for {missing:?}"
        );
        let adapted = dec.forward(&ids, &mask, false).unwrap();
        assert!(max_abs_diff(&adapted, &base_out) > 1e-3);

        // The export (LoRA merged, HF names) reloads as a plain model computing the same thing.
        let exported = dec.export_weights().unwrap();
        assert!(exported.keys().all(|k| !k.contains("lora")));
        assert_eq!(
            exported.contains_key("lm_head.weight"),
            !cfg.tie_word_embeddings
        );
        let original =
            kiln::nn::layers::load_safetensors(&dir.path().join("model.safetensors"), &dev)
                .unwrap();
        let mut keys: Vec<&String> = exported.keys().collect();
        let mut original_keys: Vec<&String> = original.keys().collect();
        keys.sort();
        original_keys.sort();
        assert_eq!(keys, original_keys);
        let out_dir = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(&exported, out_dir.path().join("model.safetensors"))
            .unwrap();
        std::fs::copy(
            dir.path().join("config.json"),
            out_dir.path().join("config.json"),
        )
        .unwrap();
        let reloaded = load(
            out_dir.path(),
            &VarMap::new(),
            &DecoderLoadOptions::default(),
        );
        let reloaded_out = reloaded.forward(&ids, &mask, false).unwrap();
        assert!(max_abs_diff(&reloaded_out, &adapted) < 1e-5);

        // Merging in place too.
        dec.merge_lora().unwrap();
        assert!(!dec.has_lora());
        let merged = dec.forward(&ids, &mask, false).unwrap();
        assert!(max_abs_diff(&merged, &adapted) < 1e-5, "{model_type}");
    }
}

#[test]
fn lora_modules_choose_the_adapted_projections_and_unknown_names_are_rejected() {
    let dir = tiny_dir("llama");
    let dec = load(
        dir.path(),
        &VarMap::new(),
        &lora_options(&["v_proj", "gate_proj"]),
    );
    let names: Vec<&str> = dec
        .named_trainable_vars()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names.len(), 2 * 2 * 2);
    assert!(
        names
            .iter()
            .all(|n| n.contains("v_proj") || n.contains("gate_proj"))
    );
    // No modules named: PEFT's default for these models, q_proj and v_proj.
    let dec = load(dir.path(), &VarMap::new(), &lora_options(&[]));
    assert!(
        dec.named_trainable_vars()
            .iter()
            .all(|(n, _)| n.contains("q_proj") || n.contains("v_proj"))
    );
    for bad in [&["query"][..], &["q_proj", "lm_head"]] {
        let err = Decoder::load_dir(dir.path(), &VarMap::new(), &Device::Cpu, &lora_options(bad))
            .err()
            .unwrap();
        assert!(matches!(err, NnError::InvalidConfig(_)), "{err}");
    }
}

/// A copy of the tiny model in `dir` with weights large enough that attention is far from
/// uniform and every norm scale matters, so parity checks are sensitive: projections and
/// embeddings x6 (std ~0.12), norm scales in [0.7, 1.3].
fn sharpened(dir: &Path) -> tempfile::TempDir {
    let dev = Device::Cpu;
    let ckpt = kiln::nn::layers::load_safetensors(&dir.join("model.safetensors"), &dev).unwrap();
    let mut out = std::collections::HashMap::new();
    // Sorted, so each tensor gets the same values in every run.
    let mut ckpt: Vec<(String, Tensor)> = ckpt.into_iter().collect();
    ckpt.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (name, t)) in ckpt.into_iter().enumerate() {
        let t = if name.contains("norm") {
            let n = t.elem_count();
            let vals: Vec<f32> = ids_from(i as u32, n)
                .into_iter()
                .map(|x| 0.7 + 0.6 * x as f32 / 255.0)
                .collect();
            Tensor::from_vec(vals, n, &dev).unwrap()
        } else {
            (t * 6.0).unwrap()
        };
        out.insert(name, t);
    }
    let new = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&out, new.path().join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), new.path().join("config.json")).unwrap();
    new
}

fn reference_vb(dir: &Path) -> VarBuilder<'static> {
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }
}

/// Last-position logits `[b, vocab]` of candle-transformers' implementation of `cfg`.
fn reference_last_logits(dir: &Path, cfg: &DecoderConfig, ids: &Tensor) -> Tensor {
    use candle_nn::Activation;
    use candle_transformers::models::{llama, mistral, qwen2};
    let vb = reference_vb(dir);
    match cfg.model_type.as_str() {
        "llama" => {
            let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
            let lcfg: llama::LlamaConfig = serde_json::from_str(&raw).unwrap();
            let lcfg = lcfg.into_config(false);
            let model = llama::Llama::load(vb, &lcfg).unwrap();
            let mut cache = llama::Cache::new(false, DType::F32, &lcfg, &Device::Cpu).unwrap();
            model.forward(ids, 0, &mut cache).unwrap()
        }
        "qwen2" => {
            let mut model = qwen2::ModelForCausalLM::new(&qwen2_config(cfg), vb).unwrap();
            model.forward(ids, 0).unwrap().squeeze(1).unwrap()
        }
        "mistral" => {
            let mcfg = mistral::Config {
                vocab_size: cfg.vocab_size,
                hidden_size: cfg.hidden_size,
                intermediate_size: cfg.intermediate_size,
                num_hidden_layers: cfg.num_hidden_layers,
                num_attention_heads: cfg.num_attention_heads,
                head_dim: cfg.head_dim,
                num_key_value_heads: cfg.num_key_value_heads,
                hidden_act: Activation::Silu,
                max_position_embeddings: cfg.max_position_embeddings,
                rms_norm_eps: cfg.rms_norm_eps,
                rope_theta: cfg.rope_theta,
                sliding_window: cfg.sliding_window,
                use_flash_attn: false,
            };
            let mut model = mistral::Model::new(&mcfg, vb).unwrap();
            model.forward(ids, 0).unwrap().squeeze(1).unwrap()
        }
        other => panic!("no reference for {other}"),
    }
}

fn qwen2_config(cfg: &DecoderConfig) -> candle_transformers::models::qwen2::Config {
    candle_transformers::models::qwen2::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        max_position_embeddings: cfg.max_position_embeddings,
        sliding_window: cfg.sliding_window.unwrap_or(cfg.max_position_embeddings),
        max_window_layers: cfg.max_window_layers.unwrap_or(cfg.num_hidden_layers),
        tie_word_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.rms_norm_eps,
        use_sliding_window: cfg.use_sliding_window,
        hidden_act: candle_nn::Activation::Silu,
    }
}

/// Two unpadded rows of 11 tokens.
fn unpadded_batch(dev: &Device) -> (Tensor, Tensor) {
    let ids: Vec<u32> = [ids_from(5, 11), ids_from(6, 11)].concat();
    (
        Tensor::from_vec(ids, (2, 11), dev).unwrap(),
        Tensor::ones((2, 11), DType::U32, dev).unwrap(),
    )
}

fn assert_last_position_parity(dir: &Path, ids: &Tensor, mask: &Tensor) {
    let cfg = DecoderConfig::from_file(&dir.join("config.json")).unwrap();
    let expected = reference_last_logits(dir, &cfg, ids);
    let dec = load(dir, &VarMap::new(), &DecoderLoadOptions::default());
    let t = ids.dim(1).unwrap();
    let got = dec
        .forward(ids, mask, false)
        .unwrap()
        .i((.., t - 1))
        .unwrap();
    assert_eq!(got.dims(), expected.dims());
    let diff = max_abs_diff(&got, &expected);
    let spread = expected.abs().unwrap().max_all().unwrap();
    println!(
        "{}: max abs diff {diff:e} (logits up to {})",
        cfg.model_type,
        spread.to_scalar::<f32>().unwrap()
    );
    assert!(diff < 1e-4, "{}: max abs diff {diff}", cfg.model_type);
}

#[test]
fn last_position_logits_match_candle_transformers() {
    let dev = Device::Cpu;
    let (ids, mask) = unpadded_batch(&dev);
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        assert_last_position_parity(sharpened(dir.path()).path(), &ids, &mask);
        // And with the writer's own (small) weights.
        assert_last_position_parity(dir.path(), &ids, &mask);
    }
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    let dev = Device::Cpu;
    let mut cfg = tiny_decoder_config("llama");
    // Short original context so the low, medium and high frequencies of head_dim 16 all occur.
    cfg.rope_scaling = Some(serde_json::json!({
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16
    }));
    let dir = tempfile::tempdir().unwrap();
    write_tiny_decoder_with(dir.path(), &cfg, 9).unwrap();
    let ids = Tensor::from_vec(ids_from(8, 40), (1, 40), &dev).unwrap();
    let mask = Tensor::ones((1, 40), DType::U32, &dev).unwrap();
    let sharp = sharpened(dir.path());
    assert_last_position_parity(sharp.path(), &ids, &mask);
    // The scaling matters: the same weights without it give other logits.
    let plain = load(sharp.path(), &VarMap::new(), &DecoderLoadOptions::default());
    let mut unscaled = plain.config().clone();
    unscaled.rope_scaling = None;
    let ckpt =
        kiln::nn::layers::load_safetensors(&sharp.path().join("model.safetensors"), &dev).unwrap();
    let other = Decoder::from_checkpoint(
        &unscaled,
        &ckpt,
        &VarMap::new(),
        &dev,
        &DecoderLoadOptions::default(),
    )
    .unwrap();
    let a = plain.forward(&ids, &mask, false).unwrap();
    let b = other.forward(&ids, &mask, false).unwrap();
    assert!(max_abs_diff(&a, &b) > 1e-3);
}

#[test]
fn qwen2_full_sequence_hidden_states_and_logits_match_candle_transformers() {
    let dev = Device::Cpu;
    let (ids, mask) = unpadded_batch(&dev);
    let dir = tiny_dir("qwen2");
    let dir = sharpened(dir.path());
    let cfg = DecoderConfig::from_file(&dir.path().join("config.json")).unwrap();
    let mut reference = candle_transformers::models::qwen2::Model::new(
        &qwen2_config(&cfg),
        reference_vb(dir.path()),
    )
    .unwrap();
    let expected_hidden = reference.forward(&ids, 0, None).unwrap();
    let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
    let hidden = dec.hidden_states(&ids, &mask, false).unwrap();
    assert!(max_abs_diff(&hidden, &expected_hidden) < 1e-4);
    // The tied head applied to the reference's states gives our logits, at every position.
    let logits = dec.forward(&ids, &mask, false).unwrap();
    let embed = reference_vb(dir.path())
        .get(
            (cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens.weight",
        )
        .unwrap();
    let expected = expected_hidden
        .broadcast_matmul(&embed.t().unwrap())
        .unwrap();
    let diff = max_abs_diff(&logits, &expected);
    assert!(diff < 1e-4, "max abs diff {diff}");
}

#[test]
fn right_padding_does_not_change_the_real_positions() {
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    let lens = [9usize, 6, 4];
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let dir = sharpened(dir.path());
        let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
        let batched = dec.forward(&ids, &mask, false).unwrap();
        for (row, &len) in lens.iter().enumerate() {
            let alone_ids = ids.i((row..row + 1, ..len)).unwrap();
            let alone_mask = Tensor::ones((1, len), DType::U32, &dev).unwrap();
            let alone = dec.forward(&alone_ids, &alone_mask, false).unwrap();
            let in_batch = batched.i((row..row + 1, ..len)).unwrap();
            let diff = max_abs_diff(&alone, &in_batch);
            assert!(diff < 1e-5, "{model_type} row {row}: {diff}");
        }
        // Pad positions stay finite (an all-pad row too).
        let all_pad = Tensor::zeros((1, 4), DType::U32, &dev).unwrap();
        let out = dec
            .forward(&ids.i((0..1, ..4)).unwrap(), &all_pad, false)
            .unwrap();
        let finite = out
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{model_type}");
    }
}

#[test]
fn cached_decoding_gives_the_logits_of_a_full_forward() {
    let dev = Device::Cpu;
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let dir = sharpened(dir.path());
        let mut dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
        // Both cache layouts: the fused kernel's and the primitive ops'.
        for fused in [true, false] {
            dec.set_fused_ops(fused);
            let seq = ids_from(11, 12);
            let full_ids = Tensor::from_vec(seq.clone(), (1, 12), &dev).unwrap();
            let full = dec
                .forward(
                    &full_ids,
                    &Tensor::ones((1, 12), DType::U32, &dev).unwrap(),
                    false,
                )
                .unwrap();
            // Prefill 5, then one at a time, then a chunk of 3 on top of the cache.
            let mut cache = dec.new_cache();
            assert!(cache.is_empty());
            let mut steps = vec![(0usize, 5usize)];
            steps.extend((5..9).map(|p| (p, 1)));
            steps.push((9, 3));
            for (start, n) in steps {
                let chunk = Tensor::from_vec(seq[start..start + n].to_vec(), (1, n), &dev).unwrap();
                let got = dec.forward_cached(&chunk, &mut cache).unwrap();
                assert_eq!(got.dims(), &[1, dec.config().vocab_size]);
                let expected = full.i((.., start + n - 1)).unwrap();
                let diff = max_abs_diff(&got, &expected);
                assert!(diff < 1e-4, "{model_type} at {}: {diff}", start + n);
                assert_eq!(cache.len(), start + n);
            }

            // One prompt's cache repeated for 3 samples, each continued with its own token.
            let prompt = Tensor::from_vec(seq[..6].to_vec(), (1, 6), &dev).unwrap();
            let mut cache = dec.new_cache();
            dec.forward_cached(&prompt, &mut cache).unwrap();
            let mut batch = cache.repeat(3).unwrap();
            assert_eq!(batch.batch_size(), Some(3));
            assert_eq!(batch.len(), 6);
            let next = [7u32, 100, 258];
            let got = dec
                .forward_cached(
                    &Tensor::new(&[[7u32], [100], [258]], &dev).unwrap(),
                    &mut batch,
                )
                .unwrap();
            let rows: Vec<u32> = next
                .iter()
                .flat_map(|&n| seq[..6].iter().copied().chain([n]))
                .collect();
            let expected = dec
                .forward(
                    &Tensor::from_vec(rows, (3, 7), &dev).unwrap(),
                    &Tensor::ones((3, 7), DType::U32, &dev).unwrap(),
                    false,
                )
                .unwrap()
                .i((.., 6))
                .unwrap();
            assert!(max_abs_diff(&got, &expected) < 1e-4);

            // A clone is independent of its original.
            let mut a = cache.clone();
            let mut b = cache.clone();
            let la = dec
                .forward_cached(&Tensor::new(&[[7u32]], &dev).unwrap(), &mut a)
                .unwrap();
            let lb = dec
                .forward_cached(&Tensor::new(&[[100u32]], &dev).unwrap(), &mut b)
                .unwrap();
            assert!(max_abs_diff(&la, &expected.i(0..1).unwrap()) < 1e-4);
            assert!(max_abs_diff(&lb, &expected.i(1..2).unwrap()) < 1e-4);
            assert_eq!(cache.len(), 6);

            // Selecting rows keeps their sequences (here: drop the first sample).
            let mut kept = batch.select(&[2, 1]).unwrap();
            assert_eq!((kept.batch_size(), kept.len()), (Some(2), 7));
            let got = dec
                .forward_cached(&Tensor::new(&[[3u32], [3]], &dev).unwrap(), &mut kept)
                .unwrap();
            let rows: Vec<u32> = [258u32, 100]
                .iter()
                .flat_map(|&n| seq[..6].iter().copied().chain([n, 3]))
                .collect();
            let expected = dec
                .forward(
                    &Tensor::from_vec(rows, (2, 8), &dev).unwrap(),
                    &Tensor::ones((2, 8), DType::U32, &dev).unwrap(),
                    false,
                )
                .unwrap()
                .i((.., 7))
                .unwrap();
            assert!(max_abs_diff(&got, &expected) < 1e-4);
            assert!(batch.select(&[3]).is_err());

            // A batch of the wrong size is refused and leaves the cache as it was.
            let err = dec
                .forward_cached(&Tensor::new(&[[1u32], [2]], &dev).unwrap(), &mut batch)
                .err()
                .unwrap();
            assert!(matches!(err, NnError::InvalidInput(_)), "{err}");
            assert_eq!(batch.len(), 7);
        }
    }
}

#[test]
fn mistral_sliding_window_limits_attention_in_full_and_cached_forwards() {
    let dev = Device::Cpu;
    let mut cfg = tiny_decoder_config("mistral");
    // One layer: position i then depends on tokens i-w+1..=i only, and rotary attention scores
    // depend only on relative positions, so it equals the window run on its own.
    cfg.num_hidden_layers = 1;
    cfg.sliding_window = Some(3);
    let dir = tempfile::tempdir().unwrap();
    write_tiny_decoder_with(dir.path(), &cfg, 5).unwrap();
    let dir = sharpened(dir.path());
    let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
    let seq = ids_from(21, 8);
    let full = dec
        .forward(
            &Tensor::from_vec(seq.clone(), (1, 8), &dev).unwrap(),
            &Tensor::ones((1, 8), DType::U32, &dev).unwrap(),
            false,
        )
        .unwrap();
    for i in 2..8 {
        let window = Tensor::from_vec(seq[i - 2..=i].to_vec(), (1, 3), &dev).unwrap();
        let alone = dec
            .forward(
                &window,
                &Tensor::ones((1, 3), DType::U32, &dev).unwrap(),
                false,
            )
            .unwrap()
            .i((.., 2))
            .unwrap();
        let diff = max_abs_diff(&alone, &full.i((.., i)).unwrap());
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
    let mut cache = dec.new_cache();
    dec.forward_cached(
        &Tensor::from_vec(seq[..4].to_vec(), (1, 4), &dev).unwrap(),
        &mut cache,
    )
    .unwrap();
    for (i, &tok) in seq.iter().enumerate().skip(4) {
        let got = dec
            .forward_cached(&Tensor::new(&[[tok]], &dev).unwrap(), &mut cache)
            .unwrap();
        assert!(max_abs_diff(&got, &full.i((.., i)).unwrap()) < 1e-4);
    }
}

#[test]
fn invalid_inputs_are_refused_with_a_reason() {
    let dev = Device::Cpu;
    let dir = tiny_dir("llama");
    let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let left_padded = Tensor::new(&[[0u32, 1, 1]], &dev).unwrap();
    let err = dec.forward(&ids, &left_padded, false).err().unwrap();
    assert!(err.to_string().contains("right-padded"), "{err}");
    let out_of_vocab = Tensor::new(&[[1u32, 259]], &dev).unwrap();
    let err = dec
        .forward(
            &out_of_vocab,
            &Tensor::ones((1, 2), DType::U32, &dev).unwrap(),
            false,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let too_long = Tensor::zeros((1, 513), DType::U32, &dev).unwrap();
    let err = dec
        .forward(
            &too_long,
            &Tensor::ones((1, 513), DType::U32, &dev).unwrap(),
            false,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    let err = dec
        .forward(
            &ids,
            &Tensor::ones((1, 2), DType::U32, &dev).unwrap(),
            false,
        )
        .err()
        .unwrap();
    assert!(matches!(err, NnError::InvalidInput(_)), "{err}");
    let mut cache = dec.new_cache();
    dec.forward_cached(
        &Tensor::zeros((1, 510), DType::U32, &dev).unwrap(),
        &mut cache,
    )
    .unwrap();
    let err = dec
        .forward_cached(
            &Tensor::zeros((1, 3), DType::U32, &dev).unwrap(),
            &mut cache,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    assert_eq!(cache.len(), 510);
}

#[test]
fn missing_and_misshapen_tensors_are_named_in_the_error() {
    let dev = Device::Cpu;
    let dir = tiny_dir("qwen2");
    let cfg = DecoderConfig::from_file(&dir.path().join("config.json")).unwrap();
    let full =
        kiln::nn::layers::load_safetensors(&dir.path().join("model.safetensors"), &dev).unwrap();
    let mut ckpt = full.clone();
    ckpt.remove("model.layers.1.self_attn.k_proj.bias");
    let err = Decoder::from_checkpoint(&cfg, &ckpt, &VarMap::new(), &dev, &Default::default())
        .err()
        .unwrap();
    assert!(
        matches!(&err, NnError::MissingTensor { name } if name == "model.layers.1.self_attn.k_proj.bias"),
        "{err}"
    );
    let mut untied = cfg.clone();
    untied.tie_word_embeddings = false;
    let err = Decoder::from_checkpoint(&untied, &full, &VarMap::new(), &dev, &Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
    let mut wider = cfg.clone();
    wider.intermediate_size = 130;
    let err = Decoder::from_checkpoint(&wider, &full, &VarMap::new(), &dev, &Default::default())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("model.layers.0.mlp.gate_proj.weight"),
        "{err}"
    );
}

/// Writes `json` as a config.json and parses it.
fn parse_config(json: serde_json::Value) -> kiln::nn::Result<DecoderConfig> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    DecoderConfig::from_file(&path)
}

#[test]
fn configs_take_hugging_face_defaults_and_reject_what_kiln_cannot_build() {
    let base = serde_json::json!({
        "model_type": "qwen2",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "eos_token_id": [5, 7],
        "rope_scaling": null,
        "sliding_window": null,
        "hidden_act": "silu"
    });
    let cfg = parse_config(base.clone()).unwrap();
    assert_eq!(cfg.num_key_value_heads, 4);
    assert!(cfg.attention_bias, "Qwen2 has q/k/v biases by default");
    assert_eq!(cfg.rope_theta, 10_000.0);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.eos_token_ids(), vec![5, 7]);
    assert_eq!(cfg.head_dim(), 16);

    let with = |key: &str, value: serde_json::Value| {
        let mut v = base.clone();
        v[key] = value;
        v
    };
    let llama = parse_config(with("model_type", "llama".into())).unwrap();
    assert!(!llama.attention_bias);
    // transformers 5 keeps rope settings in rope_parameters.
    let v5 = parse_config(with(
        "rope_parameters",
        serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ))
    .unwrap();
    assert_eq!(v5.rope_theta, 500_000.0);
    assert!(v5.rope_scaling.is_some());

    assert!(DecoderConfig::is_decoder_type("mistral"));
    assert!(!DecoderConfig::is_decoder_type("bert"));
    for bad in [
        with("model_type", "gemma".into()),
        with("hidden_act", "gelu".into()),
        with("num_key_value_heads", 3.into()),
        with(
            "rope_scaling",
            serde_json::json!({"type": "yarn", "factor": 4.0}),
        ),
        with(
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
        ),
        with("use_sliding_window", true.into()),
        with("eos_token_id", "</s>".into()),
    ] {
        let err = parse_config(bad.clone()).err().unwrap();
        assert!(matches!(err, NnError::InvalidConfig(_)), "{bad}: {err}");
    }
    let linear = parse_config(with(
        "rope_scaling",
        serde_json::json!({"type": "linear", "factor": 2.0}),
    ))
    .unwrap();
    assert!(linear.rope_scaling.is_some());
}

#[test]
fn loss_decreases_when_training_the_tiny_decoder() {
    use kiln::train::optim::{AdamW, AdamWConfig};
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    let dir = tiny_dir("qwen2");
    let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("all", 1e-2, 0.0, dec.named_trainable_vars().to_vec())
        .unwrap();
    let mut losses = Vec::new();
    for _ in 0..10 {
        let loss = causal_lm_loss(&dec.forward(&ids, &mask, true).unwrap(), &ids, &mask);
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&loss.backprop().unwrap()).unwrap();
    }
    assert!(losses[9] < losses[0] * 0.7, "{losses:?}");
    // Logits of the last step, in a shape the loss used.
    assert_eq!(
        dec.forward(&ids, &mask, false).unwrap().dims(),
        &[3, 9, 259]
    );
}

#[test]
fn decoder_and_cache_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Decoder>();
    assert_send_sync::<kiln::nn::decoder::KvCache>();
}

/// Whether `python3` can import torch and transformers (the Hugging Face reference).
fn transformers_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn logits_tokenizer_and_chat_template_match_hugging_face_transformers() {
    if !transformers_available() {
        println!(
            "SKIPPED: python3 with torch and transformers is needed for the transformers \
             parity test (pip install -r tests/python/requirements.txt)"
        );
        return;
    }
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    // The three families, llama3 rope scaling, and a Mistral window (3) shorter than the
    // sequence, where implementations have disagreed by one position.
    let mut dirs = Vec::new();
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        dirs.push((model_type.to_string(), sharpened(dir.path())));
    }
    let mut scaled = tiny_decoder_config("llama");
    scaled.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 4}));
    let mut windowed = tiny_decoder_config("mistral");
    windowed.sliding_window = Some(3);
    for (name, cfg) in [("llama3-scaled", scaled), ("mistral-window-3", windowed)] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_decoder_with(dir.path(), &cfg, 4).unwrap();
        dirs.push((name.to_string(), sharpened(dir.path())));
    }
    let text = "Hello, wörld!\n  <|im_start|>ok<|im_end|>";
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"}
    ]);
    let cases: Vec<serde_json::Value> = dirs
        .iter()
        .map(|(_, dir)| {
            // The sharpened copies have no tokenizer: reuse a tiny model's files.
            let tok_dir = tiny_dir("qwen2");
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(tok_dir.path().join(f), dir.path().join(f)).unwrap();
            }
            serde_json::json!({
                "model_dir": dir.path(),
                "input_ids": ids.to_vec2::<u32>().unwrap(),
                "attention_mask": mask.to_vec2::<u32>().unwrap(),
                "text": text,
                "messages": messages,
            })
        })
        .collect();
    let cases_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cases_file.path(), serde_json::to_string(&cases).unwrap()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/decoder_reference.py"
    );
    let out = std::process::Command::new("python3")
        .args([script, cases_file.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "decoder_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();

    let tok = tokenizers::Tokenizer::from_file(dirs[0].1.path().join("tokenizer.json")).unwrap();
    let our_ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    for ((name, dir), hf) in dirs.iter().zip(&results) {
        let dec = load(dir.path(), &VarMap::new(), &DecoderLoadOptions::default());
        let ours = dec.forward(&ids, &mask, false).unwrap();
        let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(hf["logits"].clone()).unwrap();
        let (b, t, v) = ours.dims3().unwrap();
        let flat: Vec<f32> = theirs.into_iter().flatten().flatten().collect();
        let theirs = Tensor::from_vec(flat, (b, t, v), &dev).unwrap();
        // Every position, pads included: both mask pad keys the same way.
        let diff = max_abs_diff(&ours, &theirs);
        println!("{name}: max |kiln - transformers| = {diff:e}");
        assert!(
            diff < 1e-4,
            "{name}: logits differ from transformers by {diff}"
        );

        let hf_ids: Vec<u32> = serde_json::from_value(hf["text_ids"].clone()).unwrap();
        assert_eq!(hf_ids, our_ids, "transformers tokenizes differently");
        assert_eq!(hf["decoded"], text);
        assert_eq!(
            hf["chat"],
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(hf["eos_token_id"], 258);
        assert_eq!(hf["pad_token_id"], 256);
    }
}

/// Prompts of different lengths decode as one left-padded batch: each row's logits, at the
/// prefill and at every later step, equal those of the prompt decoded alone.
#[test]
fn left_padded_rows_decode_as_they_would_alone() {
    for model_type in TYPES {
        let dir = tiny_dir(model_type);
        let varmap = VarMap::new();
        let mut model = load(dir.path(), &varmap, &DecoderLoadOptions::default());
        let dev = Device::Cpu;
        for fused in [true, false] {
            model.set_fused_ops(fused);
            let prompts = [ids_from(1, 9), ids_from(2, 4), ids_from(3, 6)];
            let longest = prompts.iter().map(Vec::len).max().unwrap();
            let follow = [[7u32, 8, 9], [10, 11, 12], [13, 14, 15]];
            // Alone.
            let alone: Vec<Vec<Tensor>> = prompts
                .iter()
                .zip(&follow)
                .map(|(p, f)| {
                    let mut cache = model.new_cache();
                    let mut out = vec![
                        model
                            .forward_cached(
                                &Tensor::new(p.as_slice(), &dev)
                                    .unwrap()
                                    .unsqueeze(0)
                                    .unwrap(),
                                &mut cache,
                            )
                            .unwrap(),
                    ];
                    for &t in f {
                        out.push(
                            model
                                .forward_cached(&Tensor::new(&[[t]], &dev).unwrap(), &mut cache)
                                .unwrap(),
                        );
                    }
                    out
                })
                .collect();
            // Together, left-padded with a token that must not matter.
            let starts: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
            let mut rows = Vec::new();
            for p in &prompts {
                rows.extend(std::iter::repeat_n(200u32, longest - p.len()));
                rows.extend(p);
            }
            let mut cache = model.new_cache_left_padded(starts);
            let mut together = vec![
                model
                    .forward_cached(
                        &Tensor::from_vec(rows, (3, longest), &dev).unwrap(),
                        &mut cache,
                    )
                    .unwrap(),
            ];
            for step in 0..3 {
                let next: Vec<u32> = follow.iter().map(|f| f[step]).collect();
                together.push(
                    model
                        .forward_cached(&Tensor::from_vec(next, (3, 1), &dev).unwrap(), &mut cache)
                        .unwrap(),
                );
            }
            for (step, batch) in together.iter().enumerate() {
                for (row, alone) in alone.iter().enumerate() {
                    let d = max_abs_diff(&batch.i(row).unwrap(), &alone[step].i(0).unwrap());
                    assert!(d < 1e-4, "{model_type} row {row} step {step}: {d}");
                }
            }
            // Dropping a row keeps the others' padding right.
            let mut kept = cache.select(&[2, 0]).unwrap();
            let next = model
                .forward_cached(&Tensor::new(&[[16u32], [16]], &dev).unwrap(), &mut kept)
                .unwrap();
            assert_eq!(next.dims(), &[2, model.config().vocab_size]);
        }
    }
}

/// Mixed precision (half-precision layers from f32 master weights) for every decoder family,
/// full and LoRA: f32 logits close to f32 training's, the same loss within half precision,
/// and an f32 gradient for every trainable variable pointing the same way as f32's. GPUs train
/// in bf16; candle's CPU matmul has no bf16, so the CPU runs the same casts with f16.
#[test]
fn mixed_precision_follows_f32_and_every_variable_gets_an_f32_gradient() {
    let dev = Device::Cpu;
    let (ids, mask) = padded_batch(&dev);
    for model_type in TYPES {
        let dir = sharpened(tiny_dir(model_type).path());
        for opts in [
            DecoderLoadOptions::default(),
            lora_options(&["q_proj", "v_proj", "down_proj"]),
        ] {
            let mut runs = Vec::new();
            for dtype in [DType::F32, DType::F16] {
                let varmap = VarMap::new();
                let mut dec = load(dir.path(), &varmap, &opts);
                for (name, v) in dec.named_trainable_vars() {
                    if name.contains("lora_B") {
                        let t = (v.as_tensor().ones_like().unwrap() * 0.05).unwrap();
                        v.set(&t).unwrap();
                    }
                }
                dec.set_compute_dtype(dtype);
                let logits = dec.forward(&ids, &mask, true).unwrap();
                assert_eq!(logits.dtype(), DType::F32, "logits come back in f32");
                let loss = causal_lm_loss(&logits, &ids, &mask);
                let grads = loss.backprop().unwrap();
                let vars = dec.named_trainable_vars().to_vec();
                let missing = without_gradient(&grads, &vars);
                assert!(
                    missing.is_empty(),
                    "{model_type} {dtype:?}: no gradient for {missing:?}"
                );
                let by_name: Vec<(String, Vec<f32>)> = vars
                    .iter()
                    .map(|(name, v)| {
                        let g = grads.get(v.as_tensor()).unwrap();
                        assert_eq!(g.dtype(), DType::F32, "{name}");
                        (
                            name.clone(),
                            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        )
                    })
                    .collect();
                runs.push((logits, loss.to_scalar::<f32>().unwrap(), by_name));
            }
            let ((l32, loss32, g32), (l16, loss16, g16)) = (&runs[0], &runs[1]);
            let scale = l32
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(l32, l16);
            assert!(
                diff <= 0.05 * scale,
                "{model_type}: logits differ by {diff} (scale {scale})"
            );
            assert!(
                (loss32 - loss16).abs() <= 0.03 * loss32.abs(),
                "{model_type}: loss {loss32} (f32) vs {loss16} (half)"
            );
            for ((name, a), (_, b)) in g32.iter().zip(g16) {
                let dot: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (*x as f64) * (*y as f64))
                    .sum();
                let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                // A key bias moves every score of a query alike, which the softmax ignores: its
                // gradient is zero up to rounding, and its direction is noise in both runs.
                if name.ends_with("key.bias") || name.ends_with("k_proj.bias") {
                    continue;
                }
                let cosine = dot / (na * nb).max(1e-30);
                assert!(
                    cosine > 0.98,
                    "{model_type} {name}: gradient cosine {cosine}"
                );
            }
        }
    }
}

/// Weights packed for inference (`pack_for_inference`, used by serving on AVX-512 and AVX2
/// CPUs) give
/// the logits of the general path, for a full forward and for cached decoding, in every
/// family (biases included); a decoder with LoRA adapters is left unpacked.
#[test]
fn packed_inference_weights_give_the_same_logits() {
    let dev = Device::Cpu;
    let frozen = |cfg: &DecoderConfig| DecoderLoadOptions {
        freeze_embeddings: true,
        freeze_layers: cfg.num_hidden_layers,
        ..DecoderLoadOptions::default()
    };
    for model_type in TYPES {
        let dir = sharpened(tiny_dir(model_type).path());
        let cfg = DecoderConfig::from_file(&dir.path().join("config.json")).unwrap();
        let plain = load(dir.path(), &VarMap::new(), &frozen(&cfg));
        let mut packed = load(dir.path(), &VarMap::new(), &frozen(&cfg));
        let bytes = packed.pack_for_inference().unwrap();
        assert_eq!(
            bytes > 0,
            kiln::nn::packed::PackedWeight::available(),
            "{model_type}: packed exactly when the CPU has the packed kernel"
        );
        let seq = ids_from(5, 10);
        let ids = Tensor::from_vec(seq.clone(), (1, 10), &dev).unwrap();
        let mask = Tensor::ones((1, 10), DType::U32, &dev).unwrap();
        let a = plain.forward(&ids, &mask, false).unwrap();
        let b = packed.forward(&ids, &mask, false).unwrap();
        assert!(
            max_abs_diff(&a, &b) < 1e-4,
            "{model_type}: {}",
            max_abs_diff(&a, &b)
        );
        let (mut ca, mut cb) = (plain.new_cache(), packed.new_cache());
        for (start, n) in [(0usize, 6usize), (6, 1), (7, 3)] {
            let chunk = Tensor::from_vec(seq[start..start + n].to_vec(), (1, n), &dev).unwrap();
            let a = plain.forward_cached(&chunk, &mut ca).unwrap();
            let b = packed.forward_cached(&chunk, &mut cb).unwrap();
            assert!(
                max_abs_diff(&a, &b) < 1e-4,
                "{model_type} at {start}: {}",
                max_abs_diff(&a, &b)
            );
        }
    }
    let dir = tiny_dir("qwen2");
    let mut with_lora = load(dir.path(), &VarMap::new(), &lora_options(&["q_proj"]));
    assert_eq!(
        with_lora.pack_for_inference().unwrap(),
        0,
        "LoRA layers stay unpacked"
    );
}
