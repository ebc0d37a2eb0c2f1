//! Specifications of the trainable ViT image classifier: every trainable weight learns and
//! frozen ones are plain tensors, LoRA starts as the base model and merges into it on export,
//! logits and gradients match transformers' `ViTForImageClassification` on the same weights,
//! the export reloads there, and a scratch model needs only `config.json` and trains.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use kiln::nn::NnError;
use kiln::nn::autograd::Backprop;
use kiln::nn::layers::seed_dropout;
use kiln::nn::lora::{LoraConfig, LoraTarget};
use kiln::nn::vision::{ImageClassifier, VisionLoadOptions};
use kiln::nn::vit::{VitConfig, VitForImageClassification, tiny_vit_config, write_tiny_vit};

fn tiny_dir(config: &VitConfig, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_vit(dir.path(), config, seed).unwrap();
    dir
}

fn load(
    dir: &Path,
    labels: Option<Vec<String>>,
    varmap: &VarMap,
    opts: &VisionLoadOptions,
) -> VitForImageClassification {
    VitForImageClassification::from_dir(dir, labels, varmap, &Device::Cpu, opts, 11).unwrap()
}

/// Deterministic pixels in [-1, 1), `[batch, channels, size, size]`.
fn pixels(config: &VitConfig, batch: usize, seed: u32) -> Tensor {
    let (c, s) = (config.num_channels, config.image_size);
    let n = batch * c * s * s;
    let data: Vec<f32> = (0..n as u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, (batch, c, s, s), &Device::Cpu).unwrap()
}

fn labels_of(n: usize, classes: usize) -> Tensor {
    let v: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

fn loss_of(model: &dyn ImageClassifier, x: &Tensor, train: bool) -> Tensor {
    let logits = model.forward(x, train).unwrap();
    let targets = labels_of(x.dim(0).unwrap(), model.labels().len());
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
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

/// Names of trainable variables whose gradient is absent or zero after one backward.
fn without_gradient(model: &VitForImageClassification, train: bool) -> Vec<String> {
    let x = pixels(model.config(), 4, 1);
    let grads = loss_of(model, &x, train).backprop().unwrap();
    model
        .named_trainable_vars()
        .iter()
        .filter(|(_, v)| grad_norm(&grads, v) == 0.0)
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

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn names(vars: &[(String, Var)]) -> Vec<String> {
    let mut n: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    n.sort();
    n
}

/// Tensors of one encoder layer: 6 linears with biases, 2 LayerNorms.
const PER_LAYER: usize = 16;

#[test]
fn tiny_vit_writes_a_hub_style_directory_that_loads() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(raw["architectures"][0], "ViTForImageClassification");
    assert_eq!(raw["model_type"], "vit");
    assert_eq!(raw["id2label"]["1"], "dog");
    let pre: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(pre["image_processor_type"], "ViTImageProcessor");
    assert_eq!(pre["size"]["height"], 16);
    assert_eq!(pre["image_mean"], serde_json::json!([0.5, 0.5, 0.5]));

    let model = load(dir.path(), None, &VarMap::new(), &Default::default());
    assert_eq!(model.labels(), ["cat", "dog", "bird"]);
    assert_eq!(model.image_size(), 16);
    assert_eq!(model.feature_dim(), 32);
    assert!(model.buffers().is_empty());
    let x = pixels(&cfg, 2, 5);
    assert_eq!(model.features(&x, false).unwrap().dims(), [2, 32]);
    assert_eq!(model.forward(&x, false).unwrap().dims(), [2, 3]);
    // cls, position, patch weight and bias; the layers; the final LayerNorm; the head.
    assert_eq!(
        model.named_trainable_vars().len(),
        4 + 2 * PER_LAYER + 2 + 2
    );
    assert_eq!(
        names(&model.head_vars()),
        ["classifier.bias", "classifier.weight"]
    );
    let backbone = names(&model.backbone_vars());
    for n in [
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.encoder.layer.1.attention.attention.query.bias",
        "vit.encoder.layer.0.layernorm_before.weight",
        "vit.encoder.layer.0.output.dense.weight",
        "vit.layernorm.bias",
    ] {
        assert!(backbone.contains(&n.to_string()), "{n} missing");
    }
}

#[test]
fn every_trainable_variable_receives_a_nonzero_gradient() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    // Full fine-tuning, in eval and train mode; and without q/k/v biases.
    let model = load(dir.path(), None, &VarMap::new(), &Default::default());
    assert_eq!(without_gradient(&model, false), Vec::<String>::new());
    assert_eq!(without_gradient(&model, true), Vec::<String>::new());
    let mut no_bias = cfg.clone();
    no_bias.qkv_bias = false;
    no_bias.hidden_dropout_prob = 0.1;
    no_bias.attention_probs_dropout_prob = 0.1;
    let nb_dir = tiny_dir(&no_bias, 4);
    let model = load(nb_dir.path(), None, &VarMap::new(), &Default::default());
    assert_eq!(
        model.named_trainable_vars().len(),
        4 + 2 * (PER_LAYER - 3) + 4
    );
    seed_dropout(5);
    assert_eq!(without_gradient(&model, true), Vec::<String>::new());
}

/// Packed for inference (serving: a frozen backbone), a ViT gives its unpacked logits, both
/// where the packed kernel runs (few images) and where the fused half-layers do (many; the
/// last layer's [CLS] rows still packed). Also without q/k/v biases. A trainable model
/// prepared the same way still trains from its weights.
#[test]
fn vits_prepared_for_inference_give_the_same_logits() {
    let mut no_bias = tiny_vit_config();
    no_bias.qkv_bias = false;
    for (i, cfg) in [tiny_vit_config(), no_bias].into_iter().enumerate() {
        let dir = tiny_dir(&cfg, 3 + i as u64);
        let frozen = VisionLoadOptions {
            freeze_backbone: true,
            ..Default::default()
        };
        let mut model = load(dir.path(), None, &VarMap::new(), &frozen);
        // 17 tokens an image: 51 rows, 340 rows.
        let inputs = [pixels(&cfg, 3, 1), pixels(&cfg, 20, 2)];
        let before: Vec<Tensor> = inputs
            .iter()
            .map(|x| model.forward(x, false).unwrap())
            .collect();
        let bytes = model.prepare_for_inference().unwrap();
        if bytes == 0 {
            assert!(!kiln::nn::packed::PackedWeight::available());
            eprintln!("no packed kernel on this CPU: nothing is packed");
            return;
        }
        for (x, want) in inputs.iter().zip(&before) {
            let diff = max_abs_diff(&model.forward(x, false).unwrap(), want);
            assert!(diff < 1e-5, "prepared logits differ by {diff}");
        }
        model.unprepare();
        let again = model.forward(&inputs[0], false).unwrap();
        assert!(max_abs_diff(&again, &before[0]) < 1e-6);

        let mut trainable = load(dir.path(), None, &VarMap::new(), &Default::default());
        assert!(trainable.prepare_for_inference().unwrap() > 0);
        let diff = max_abs_diff(&trainable.forward(&inputs[0], false).unwrap(), &before[0]);
        assert!(diff < 1e-5, "prepared trainable logits differ by {diff}");
        assert_eq!(without_gradient(&trainable, true), Vec::<String>::new());
        assert_eq!(without_gradient(&trainable, false), Vec::<String>::new());
    }
}

#[test]
fn frozen_weights_are_plain_tensors_and_the_rest_learn() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let opts = VisionLoadOptions {
        freeze_embeddings: true,
        freeze_layers: 1,
        ..Default::default()
    };
    let varmap = VarMap::new();
    let model = load(dir.path(), None, &varmap, &opts);
    let trainable = names(model.named_trainable_vars());
    assert_eq!(trainable.len(), PER_LAYER + 2 + 2);
    assert!(
        trainable
            .iter()
            .all(|n| !n.starts_with("vit.embeddings.") && !n.starts_with("vit.encoder.layer.0."))
    );
    assert_eq!(varmap.all_vars().len(), trainable.len());
    assert_eq!(without_gradient(&model, false), Vec::<String>::new());

    // Feature extraction: only the head trains (the final LayerNorm is frozen too).
    let opts = VisionLoadOptions {
        freeze_backbone: true,
        ..Default::default()
    };
    let model = load(dir.path(), None, &VarMap::new(), &opts);
    assert!(model.backbone_vars().is_empty());
    assert_eq!(
        names(model.named_trainable_vars()),
        ["classifier.bias", "classifier.weight"]
    );
    assert_eq!(without_gradient(&model, true), Vec::<String>::new());
}

fn lora_opts(targets: Vec<LoraTarget>) -> VisionLoadOptions {
    VisionLoadOptions {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets,
            seed: 9,
        }),
        ..Default::default()
    }
}

fn all_targets() -> Vec<LoraTarget> {
    vec![
        LoraTarget::Query,
        LoraTarget::Key,
        LoraTarget::Value,
        LoraTarget::AttentionOutput,
        LoraTarget::Intermediate,
        LoraTarget::Output,
    ]
}

#[test]
fn lora_trains_only_adapters_and_the_head() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let model = load(dir.path(), None, &VarMap::new(), &lora_opts(all_targets()));
    assert!(model.has_lora());
    let backbone = names(&model.backbone_vars());
    assert_eq!(backbone.len(), 2 * 6 * 2);
    assert!(
        backbone
            .iter()
            .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
    );
    for n in [
        "vit.encoder.layer.0.attention.attention.query.lora_A.weight",
        "vit.encoder.layer.1.attention.attention.key.lora_B.weight",
        "vit.encoder.layer.1.attention.attention.value.lora_A.weight",
        "vit.encoder.layer.0.attention.output.dense.lora_B.weight",
        "vit.encoder.layer.0.intermediate.dense.lora_A.weight",
        "vit.encoder.layer.1.output.dense.lora_B.weight",
    ] {
        assert!(backbone.contains(&n.to_string()), "{n} missing");
    }
    assert_eq!(
        names(&model.head_vars()),
        ["classifier.bias", "classifier.weight"]
    );
    // B starts at zero, so A's gradient is zero on the first step: only B and the head learn.
    let missing = without_gradient(&model, true);
    assert!(
        missing.iter().all(|n| n.ends_with(".lora_A.weight")),
        "{missing:?}"
    );
    // Once B is non-zero, every adapter learns.
    perturb_lora_b(&model, 0.05);
    seed_dropout(3);
    assert_eq!(without_gradient(&model, true), Vec::<String>::new());
}

/// Sets every LoRA B to small deterministic non-zero values.
fn perturb_lora_b(model: &VitForImageClassification, scale: f32) {
    for (i, (name, var)) in model.backbone_vars().iter().enumerate() {
        if name.ends_with(".lora_B.weight") {
            let n = var.elem_count();
            let data: Vec<f32> = (0..n)
                .map(|j| scale * (((j * 7 + i * 13) % 11) as f32 / 5.0 - 1.0))
                .collect();
            var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// Writes `model`'s export (weights, config, preprocessing) to a new directory.
fn export(model: &dyn ImageClassifier, from: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(
        &model.export_weights().unwrap(),
        out.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        out.path().join("config.json"),
        serde_json::to_string_pretty(&model.export_config()).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        from.join("preprocessor_config.json"),
        out.path().join("preprocessor_config.json"),
    )
    .unwrap();
    out
}

#[test]
fn lora_starts_as_the_base_model_and_export_merges_it() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let x = pixels(&cfg, 3, 2);
    let base = load(dir.path(), None, &VarMap::new(), &Default::default());
    let lora = load(dir.path(), None, &VarMap::new(), &lora_opts(all_targets()));
    let base_logits = base.forward(&x, false).unwrap();
    assert!(max_abs_diff(&base_logits, &lora.forward(&x, false).unwrap()) < 1e-6);

    perturb_lora_b(&lora, 0.05);
    let adapted = lora.forward(&x, false).unwrap();
    assert!(max_abs_diff(&base_logits, &adapted) > 1e-3);

    let exported = export(&lora, dir.path());
    let weights = lora.export_weights().unwrap();
    assert!(weights.keys().all(|k| !k.contains("lora_")));
    assert_eq!(weights.len(), 4 + 2 * PER_LAYER + 2 + 2);
    let reloaded = load(exported.path(), None, &VarMap::new(), &Default::default());
    assert_eq!(reloaded.labels(), lora.labels());
    let merged = reloaded.forward(&x, false).unwrap();
    assert!(max_abs_diff(&adapted, &merged) < 1e-5);
}

#[test]
fn export_config_keeps_the_base_keys_and_names_the_new_labels() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let labels = vec!["left".to_string(), "right".to_string()];
    let model = load(
        dir.path(),
        Some(labels),
        &VarMap::new(),
        &Default::default(),
    );
    let out = model.export_config();
    assert_eq!(
        out["architectures"],
        serde_json::json!(["ViTForImageClassification"])
    );
    assert_eq!(
        out["id2label"],
        serde_json::json!({"0": "left", "1": "right"})
    );
    assert_eq!(out["label2id"], serde_json::json!({"left": 0, "right": 1}));
    assert_eq!(out["encoder_stride"], 4);
    assert_eq!(out["patch_size"], 4);
    assert_eq!(out["torch_dtype"], "float32");
    let weights = model.export_weights().unwrap();
    assert_eq!(weights["classifier.weight"].dims(), [2, 32]);
    assert_eq!(
        weights["vit.embeddings.patch_embeddings.projection.weight"].dims(),
        [32, 3, 4, 4]
    );
}

#[test]
fn the_checkpoint_head_is_reused_only_for_its_own_labels() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let x = pixels(&cfg, 2, 8);
    let own = load(dir.path(), None, &VarMap::new(), &Default::default());
    let same: Vec<String> = ["cat", "dog", "bird"].map(String::from).to_vec();
    let explicit = load(dir.path(), Some(same), &VarMap::new(), &Default::default());
    let logits = own.forward(&x, false).unwrap();
    assert!(max_abs_diff(&logits, &explicit.forward(&x, false).unwrap()) < 1e-7);

    // Reordered labels: a fresh, seeded head with zero bias.
    let reordered: Vec<String> = ["dog", "cat", "bird"].map(String::from).to_vec();
    let fresh = load(
        dir.path(),
        Some(reordered.clone()),
        &VarMap::new(),
        &Default::default(),
    );
    let fresh_logits = fresh.forward(&x, false).unwrap();
    assert!(max_abs_diff(&logits, &fresh_logits) > 1e-3);
    let w = fresh.export_weights().unwrap();
    assert_eq!(max_abs(&w["classifier.bias"]), 0.0);
    assert!(max_abs(&w["classifier.weight"]) <= 0.04 + 1e-6);
    let again = load(
        dir.path(),
        Some(reordered),
        &VarMap::new(),
        &Default::default(),
    );
    assert!(max_abs_diff(&fresh_logits, &again.forward(&x, false).unwrap()) < 1e-7);
    // Features do not depend on the head.
    assert!(
        max_abs_diff(
            &own.features(&x, false).unwrap(),
            &fresh.features(&x, false).unwrap()
        ) < 1e-7
    );
}

#[test]
fn a_bare_vit_model_checkpoint_with_a_pooler_loads() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let prefixed = load(dir.path(), None, &VarMap::new(), &Default::default());
    // What ViTModel.save_pretrained writes: no `vit.` prefix, a pooler, no classifier.
    let ckpt =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut bare: HashMap<String, Tensor> = ckpt
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .map(|(k, t)| (k.trim_start_matches("vit.").to_string(), t))
        .collect();
    bare.insert(
        "pooler.dense.weight".into(),
        Tensor::ones((32, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    bare.insert(
        "pooler.dense.bias".into(),
        Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
    );
    let bare_dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&bare, bare_dir.path().join("model.safetensors")).unwrap();
    let mut raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    raw["architectures"] = serde_json::json!(["ViTModel"]);
    std::fs::write(bare_dir.path().join("config.json"), raw.to_string()).unwrap();

    let labels = vec!["a".to_string(), "b".to_string()];
    let model = load(
        bare_dir.path(),
        Some(labels),
        &VarMap::new(),
        &Default::default(),
    );
    let x = pixels(&cfg, 2, 4);
    assert!(
        max_abs_diff(
            &prefixed.features(&x, false).unwrap(),
            &model.features(&x, false).unwrap()
        ) < 1e-7
    );
    let weights = model.export_weights().unwrap();
    assert!(weights.contains_key("vit.embeddings.cls_token"));
    assert!(weights.keys().all(|k| !k.contains("pooler")));
    assert_eq!(model.forward(&x, true).unwrap().dims(), [2, 2]);
}

#[test]
fn a_checkpoint_with_transformers_5_module_names_loads() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let reference = load(dir.path(), None, &VarMap::new(), &Default::default());
    // What transformers 5 writes with save_pretrained(save_original_format=False).
    let renames = [
        ("vit.encoder.layer.", "vit.layers."),
        (".attention.attention.query.", ".attention.q_proj."),
        (".attention.attention.key.", ".attention.k_proj."),
        (".attention.attention.value.", ".attention.v_proj."),
        (".attention.output.dense.", ".attention.o_proj."),
        (".intermediate.dense.", ".mlp.fc1."),
        (".output.dense.", ".mlp.fc2."),
    ];
    let ckpt =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = ckpt
        .into_iter()
        .map(|(k, t)| {
            let k = renames.iter().fold(k, |k, (old, new)| k.replace(old, new));
            (k, t)
        })
        .collect();
    assert!(renamed.contains_key("vit.layers.1.mlp.fc2.weight"));
    assert!(renamed.contains_key("vit.layers.0.attention.o_proj.bias"));
    let new_dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&renamed, new_dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        new_dir.path().join("config.json"),
    )
    .unwrap();
    let model = load(new_dir.path(), None, &VarMap::new(), &Default::default());
    let x = pixels(&cfg, 2, 4);
    assert_eq!(
        max_abs_diff(
            &reference.forward(&x, false).unwrap(),
            &model.forward(&x, false).unwrap()
        ),
        0.0
    );
    assert_eq!(
        names(model.named_trainable_vars()),
        names(reference.named_trainable_vars())
    );
}

#[test]
fn eval_is_deterministic_and_train_applies_seeded_dropout() {
    let mut cfg = tiny_vit_config();
    cfg.hidden_dropout_prob = 0.2;
    cfg.attention_probs_dropout_prob = 0.2;
    let dir = tiny_dir(&cfg, 3);
    let model = load(dir.path(), None, &VarMap::new(), &Default::default());
    let x = pixels(&cfg, 2, 6);
    let eval = model.forward(&x, false).unwrap();
    assert_eq!(max_abs_diff(&eval, &model.forward(&x, false).unwrap()), 0.0);
    seed_dropout(42);
    let a = model.forward(&x, true).unwrap();
    seed_dropout(42);
    let b = model.forward(&x, true).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &eval) > 1e-4);
}

#[test]
fn scratch_needs_only_the_config_initialises_like_transformers_and_trains() {
    let mut cfg = tiny_vit_config();
    cfg.hidden_dropout_prob = 0.1;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let opts = VisionLoadOptions {
        scratch: true,
        ..Default::default()
    };
    let varmap = VarMap::new();
    let model = load(dir.path(), None, &varmap, &opts);
    assert_eq!(model.labels(), ["cat", "dog", "bird"]);
    let w = model.export_weights().unwrap();
    assert_eq!(w.len(), 4 + 2 * PER_LAYER + 2 + 2);
    let ones = Tensor::ones(32, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&w["vit.layernorm.weight"], &ones), 0.0);
    assert_eq!(max_abs(&w["vit.encoder.layer.0.layernorm_after.bias"]), 0.0);
    assert_eq!(max_abs(&w["vit.encoder.layer.1.output.dense.bias"]), 0.0);
    let q = &w["vit.encoder.layer.0.attention.attention.query.weight"];
    let std = q
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((0.014..0.022).contains(&std), "std {std}");
    assert!(max_abs(q) <= 0.04 + 1e-6);
    // Seeded: the same seed gives the same model, another seed another.
    let again = load(dir.path(), None, &VarMap::new(), &opts);
    let x = pixels(&cfg, 6, 9);
    assert_eq!(
        max_abs_diff(
            &model.forward(&x, false).unwrap(),
            &again.forward(&x, false).unwrap()
        ),
        0.0
    );
    let other = VitForImageClassification::from_dir(
        dir.path(),
        None,
        &VarMap::new(),
        &Device::Cpu,
        &opts,
        12,
    )
    .unwrap();
    assert!(
        max_abs_diff(
            &model.forward(&x, false).unwrap(),
            &other.forward(&x, false).unwrap()
        ) > 0.0
    );

    // It learns: the training loss on a fixed batch goes down.
    let vars: Vec<Var> = model
        .named_trainable_vars()
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let first = loss_of(&model, &x, false).to_scalar::<f32>().unwrap();
    for step in 0..30 {
        seed_dropout(step);
        let loss = loss_of(&model, &x, true);
        opt.backward_step(&loss).unwrap();
    }
    let last = loss_of(&model, &x, false).to_scalar::<f32>().unwrap();
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn bad_configs_checkpoints_and_inputs_are_errors() {
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 3);
    let model = load(dir.path(), None, &VarMap::new(), &Default::default());
    for shape in [(2, 3, 15, 16), (2, 1, 16, 16), (2, 3, 32, 32)] {
        let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let err = model.forward(&x, false).unwrap_err().to_string();
        assert!(err.contains("[batch, 3, 16, 16]"), "{err}");
    }

    let mut bad = cfg.clone();
    bad.patch_size = 5;
    assert!(matches!(bad.validate(), Err(NnError::InvalidConfig(_))));
    let mut bad = cfg.clone();
    bad.num_attention_heads = 5;
    assert!(matches!(bad.validate(), Err(NnError::InvalidConfig(_))));
    let mut bad = cfg.clone();
    bad.model_type = "deit".into();
    assert!(matches!(bad.validate(), Err(NnError::InvalidConfig(_))));

    // A checkpoint for another image size: the position table is named in the error.
    let mut bigger = cfg.clone();
    bigger.image_size = 32;
    let big_dir = tiny_dir(&bigger, 3);
    std::fs::copy(
        dir.path().join("config.json"),
        big_dir.path().join("config.json"),
    )
    .unwrap();
    let err = VitForImageClassification::from_dir(
        big_dir.path(),
        None,
        &VarMap::new(),
        &Device::Cpu,
        &Default::default(),
        1,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, NnError::ShapeMismatch { name, .. } if name == "vit.embeddings.position_embeddings"),
        "{err}"
    );
    // No labels anywhere and no head: nothing to classify into.
    let mut unlabeled = cfg.clone();
    unlabeled.id2label = None;
    unlabeled.label2id = None;
    let un_dir = tiny_dir(&unlabeled, 3);
    let err = VitForImageClassification::from_dir(
        un_dir.path(),
        None,
        &VarMap::new(),
        &Device::Cpu,
        &Default::default(),
        1,
    )
    .err()
    .unwrap();
    assert!(matches!(err, NnError::InvalidConfig(_)), "{err}");
    let err = VitForImageClassification::from_dir(
        un_dir.path(),
        Some(vec![]),
        &VarMap::new(),
        &Device::Cpu,
        &Default::default(),
        1,
    )
    .err()
    .unwrap();
    assert!(matches!(err, NnError::InvalidConfig(_)), "{err}");
}

/// Whether `python3` can import torch and transformers (the Hugging Face reference).
fn transformers_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch, transformers, safetensors"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn skip_without_transformers(what: &str) -> bool {
    if transformers_available() {
        return false;
    }
    println!(
        "SKIPPED: python3 with torch and transformers is needed for {what} \
         (pip install -r tests/python/requirements.txt)"
    );
    true
}

/// Runs tests/python/vit_reference.py on `dir`: its output tensors and loading info.
fn reference(
    dir: &Path,
    x: &Tensor,
    labels: Option<&Tensor>,
) -> (HashMap<String, Tensor>, serde_json::Value) {
    let io = tempfile::tempdir().unwrap();
    let mut input = HashMap::new();
    input.insert("pixel_values".to_string(), x.clone());
    if let Some(l) = labels {
        input.insert("labels".to_string(), l.to_dtype(DType::I64).unwrap());
    }
    let inp = io.path().join("in.safetensors");
    let out = io.path().join("out.safetensors");
    candle_core::safetensors::save(&input, &inp).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/vit_reference.py");
    let run = std::process::Command::new("python3")
        .args([
            script,
            dir.to_str().unwrap(),
            inp.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "vit_reference.py failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    (
        candle_core::safetensors::load(&out, &Device::Cpu).unwrap(),
        info,
    )
}

#[test]
fn logits_and_gradients_match_transformers() {
    if skip_without_transformers("the transformers parity test") {
        return;
    }
    let mut cfg = tiny_vit_config();
    for qkv_bias in [true, false] {
        cfg.qkv_bias = qkv_bias;
        let dir = tiny_dir(&cfg, 21);
        let x = pixels(&cfg, 4, 3);
        let targets = labels_of(4, 3);
        let (theirs, info) = reference(dir.path(), &x, Some(&targets));
        assert_eq!(info["missing_keys"], serde_json::json!([]));
        assert_eq!(info["unexpected_keys"], serde_json::json!([]));
        assert_eq!(info["labels"], serde_json::json!(["cat", "dog", "bird"]));

        let model = load(dir.path(), None, &VarMap::new(), &Default::default());
        let logits = model.forward(&x, false).unwrap();
        let diff = max_abs_diff(&logits, &theirs["logits"]);
        assert!(diff < 1e-4, "qkv_bias {qkv_bias}: logits differ by {diff}");

        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let their_loss = theirs["loss"].to_vec1::<f32>().unwrap()[0];
        assert!((loss.to_scalar::<f32>().unwrap() - their_loss).abs() < 1e-5);
        let grads = loss.backprop().unwrap();
        let mut compared = 0;
        let mut worst = 0f32;
        for (name, var) in model.named_trainable_vars() {
            let theirs = &theirs[&format!("grad.{name}")];
            let ours = grads.get(var.as_tensor()).unwrap();
            let scale = max_abs(theirs).max(1e-3);
            let diff = max_abs_diff(ours, theirs);
            assert!(
                diff / scale < 1e-3,
                "gradient of {name} differs by {diff} (scale {scale})"
            );
            worst = worst.max(diff / scale);
            compared += 1;
        }
        assert_eq!(compared, model.named_trainable_vars().len());
        println!(
            "qkv_bias {qkv_bias}: logits max |diff| {diff:.2e}; {compared} gradients, worst \
             max |diff| / max |grad| {worst:.2e}"
        );
    }
}

#[test]
fn exported_models_reload_in_transformers_with_the_same_logits() {
    if skip_without_transformers("the transformers export test") {
        return;
    }
    let cfg = tiny_vit_config();
    let dir = tiny_dir(&cfg, 5);
    let x = pixels(&cfg, 3, 7);
    // A LoRA model with new labels after a few training steps, merged on export.
    let labels: Vec<String> = ["x", "y"].map(String::from).to_vec();
    let mut opts = lora_opts(vec![
        LoraTarget::Query,
        LoraTarget::Value,
        LoraTarget::Output,
    ]);
    opts.freeze_layers = 1;
    let model = load(dir.path(), Some(labels.clone()), &VarMap::new(), &opts);
    perturb_lora_b(&model, 0.05);
    let vars: Vec<Var> = model
        .named_trainable_vars()
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = candle_nn::SGD::new(vars, 0.1).unwrap();
    for step in 0..3 {
        seed_dropout(step);
        opt.backward_step(&loss_of(&model, &x, true)).unwrap();
    }
    let ours = model.forward(&x, false).unwrap();
    let exported = export(&model, dir.path());
    let (theirs, info) = reference(exported.path(), &x, None);
    assert_eq!(info["missing_keys"], serde_json::json!([]));
    assert_eq!(info["unexpected_keys"], serde_json::json!([]));
    assert_eq!(info["mismatched_keys"], serde_json::json!([]));
    assert_eq!(info["labels"], serde_json::json!(labels));
    let diff = max_abs_diff(&ours, &theirs["logits"]);
    assert!(diff < 1e-4, "exported logits differ by {diff}");
}

/// The ViT-tiny shape (deit-tiny / vit-tiny-patch16-224): hidden 192, 12 layers, 3 heads.
fn vit_tiny_224() -> VitConfig {
    VitConfig {
        hidden_size: 192,
        num_hidden_layers: 12,
        num_attention_heads: 3,
        intermediate_size: 768,
        image_size: 224,
        patch_size: 16,
        ..tiny_vit_config()
    }
}

/// ViT-tiny's config at 224×224 and a directory with only its `config.json` (for models made
/// from scratch).
fn vit_tiny_224_dir() -> (VitConfig, tempfile::TempDir) {
    let cfg = vit_tiny_224();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    (cfg, dir)
}

/// Inference (eval mode, no gradients) of ViT-tiny at 224×224 at the batch sizes serving
/// makes: 1, 4 and 16 images (`KILN_TIMING_BATCH` for one of them, `KILN_TIMING_REPEATS`
/// passes). Not a test: prints timings; PyTorch's side is `bench/serve_images.py` (its
/// "forward alone" figures).
///
///     cargo test --release --test nn_vit -- --ignored --nocapture vit_tiny_inference_timing
#[test]
#[ignore]
fn vit_tiny_inference_timing() {
    let (cfg, dir) = vit_tiny_224_dir();
    let opts = VisionLoadOptions {
        scratch: true,
        freeze_backbone: true,
        ..Default::default()
    };
    let mut model = load(dir.path(), None, &VarMap::new(), &opts);
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let batches = env("KILN_TIMING_BATCH").map_or(vec![1, 4, 16], |b| vec![b]);
    for prepared in [false, true] {
        if prepared {
            let bytes = model.prepare_for_inference().unwrap();
            println!("weights prepared for inference: {} MiB", bytes >> 20);
        }
        for &b in &batches {
            let x = pixels(&cfg, b, 1);
            let mut best = f64::INFINITY;
            for _ in 0..env("KILN_TIMING_REPEATS").unwrap_or(6) {
                let t0 = std::time::Instant::now();
                model.forward(&x, false).unwrap();
                best = best.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "kiln ViT-tiny inference{}, batch {b:2}: best {:6.1} ms ({:5.1} images/s)",
                if prepared { " (prepared)" } else { "" },
                best * 1e3,
                b as f64 / best
            );
        }
    }
}

/// One training step (forward + backward, no optimizer) of ViT-tiny at 224×224, batch 8,
/// kiln against PyTorch + transformers on this machine. Not a test: prints timings.
///
///     cargo test --test nn_vit -- --ignored --nocapture step_timing
#[test]
#[ignore]
fn step_timing_vit_tiny_224_batch_8_against_torch() {
    let (cfg, dir) = vit_tiny_224_dir();
    let opts = VisionLoadOptions {
        scratch: true,
        ..Default::default()
    };
    let model = load(dir.path(), None, &VarMap::new(), &opts);
    let x = pixels(&cfg, 8, 1);
    let steps = 5;
    let mut forward = Vec::new();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        drop(loss_of(&model, &x, true));
        forward.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    forward.sort_by(f64::total_cmp);
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = std::time::Instant::now();
        let loss = loss_of(&model, &x, true);
        let grads = loss.backprop().unwrap();
        drop(grads);
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "kiln  ViT-tiny 224 batch 8 forward+backward: median {:.0} ms, min {:.0} ms ({} steps after 1 warm-up; forward alone: median {:.0} ms)",
        times[times.len() / 2],
        times[0],
        steps,
        forward[1],
    );
    if skip_without_transformers("the PyTorch timing") {
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/vit_step_timing.py"
    );
    let run = std::process::Command::new("python3")
        .args([
            script,
            dir.path().to_str().unwrap(),
            "8",
            &steps.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    print!("{}", String::from_utf8_lossy(&run.stdout));
}
