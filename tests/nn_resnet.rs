//! Specifications of the trainable ResNet: every trainable weight learns and frozen ones do
//! not, BatchNorm running statistics move only in training, transformers' names and timm's load
//! onto the same model, outputs and gradients match transformers' `ResNetForImageClassification`
//! on the same weights, the export reloads there, and the conv/pool kernels have the right
//! backward.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use kiln::nn::NnError;
use kiln::nn::autograd::Backprop;
use kiln::nn::conv;
use kiln::nn::lora::LoraConfig;
use kiln::nn::resnet::{
    LayerType, ResNetConfig, ResNetForImageClassification, hf_to_timm_names, tiny_resnet_config,
    write_tiny_resnet,
};
use kiln::nn::vision::{ImageClassifier, VisionLoadOptions};

fn bottleneck_config() -> ResNetConfig {
    ResNetConfig {
        embedding_size: 8,
        hidden_sizes: vec![16, 32],
        depths: vec![1, 2],
        layer_type: LayerType::Bottleneck,
        ..tiny_resnet_config()
    }
}

fn tiny_dir(config: &ResNetConfig, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_resnet(dir.path(), config, seed).unwrap();
    dir
}

fn load(
    dir: &Path,
    labels: Option<Vec<String>>,
    opts: &VisionLoadOptions,
) -> ResNetForImageClassification {
    ResNetForImageClassification::from_dir(dir, labels, &VarMap::new(), &Device::Cpu, opts, 3)
        .unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(seed: u32, n: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503))
                .wrapping_mul(2_246_822_519);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn pixels(b: usize, h: usize, w: usize, seed: u32) -> Tensor {
    Tensor::from_vec(values(seed, b * 3 * h * w), (b, 3, h, w), &Device::Cpu).unwrap()
}

fn targets(b: usize, classes: usize) -> Tensor {
    Tensor::from_vec(
        (0..b as u32)
            .map(|i| i % classes as u32)
            .collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )
    .unwrap()
}

fn loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    candle_nn::loss::cross_entropy(logits, labels).unwrap()
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
        .to_scalar()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn snapshot(vars: &[(String, Var)]) -> HashMap<String, Vec<f32>> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn tiny_models_write_hf_configs_that_load_for_inference() {
    for config in [tiny_resnet_config(), bottleneck_config()] {
        let dir = tiny_dir(&config, 1);
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(raw["model_type"], "resnet");
        assert_eq!(raw["architectures"][0], "ResNetForImageClassification");
        assert_eq!(raw["label2id"]["dog"], 1);
        assert_eq!(
            ResNetConfig::from_file(&dir.path().join("config.json")).unwrap(),
            config
        );
        let pre: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(pre["size"]["shortest_edge"], 224);

        let model = load(dir.path(), None, &VisionLoadOptions::default());
        assert_eq!(model.labels(), ["cat", "dog", "bird"]);
        assert_eq!(model.feature_dim(), *config.hidden_sizes.last().unwrap());
        assert_eq!(model.image_size(), 224);
        let feats = model.features(&pixels(2, 32, 32, 1), false).unwrap();
        assert_eq!(feats.dims(), [2, model.feature_dim()]);
        let logits = model.forward(&pixels(2, 32, 32, 1), false).unwrap();
        assert_eq!(logits.dims(), [2, 3]);
        assert!(
            logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())
        );
    }
    let mut bad = tiny_resnet_config();
    bad.hidden_act = "gelu".into();
    assert!(matches!(
        write_tiny_resnet(tempfile::tempdir().unwrap().path(), &bad, 1),
        Err(NnError::InvalidConfig(_))
    ));
}

/// One full-strategy training step on a model: every trainable variable (convolutions,
/// BatchNorm scale and shift, head) gets a non-zero gradient.
fn assert_all_vars_learn(model: &ResNetForImageClassification, what: &str) {
    let x = pixels(4, 32, 32, 7);
    let logits = model.forward(&x, true).unwrap();
    let grads = loss(&logits, &targets(4, 3)).backprop().unwrap();
    let vars: Vec<(String, Var)> = model
        .backbone_vars()
        .into_iter()
        .chain(model.head_vars())
        .collect();
    assert!(!vars.is_empty());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        assert!(max_abs(g) > 0.0, "{what}: zero gradient for {name}");
    }
}

#[test]
fn every_trainable_variable_gets_a_gradient_basic_and_bottleneck() {
    for (what, config) in [
        ("basic", tiny_resnet_config()),
        ("bottleneck", bottleneck_config()),
    ] {
        let dir = tiny_dir(&config, 2);
        let model = load(dir.path(), None, &VisionLoadOptions::default());
        let names: Vec<String> = model.backbone_vars().into_iter().map(|(n, _)| n).collect();
        for expected in [
            "resnet.embedder.embedder.convolution.weight",
            "resnet.embedder.embedder.normalization.weight",
            "resnet.embedder.embedder.normalization.bias",
            "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight",
            "resnet.encoder.stages.1.layers.0.shortcut.normalization.bias",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{what}: {expected} not trainable"
            );
        }
        assert!(!names.iter().any(|n| n.contains("running")));
        let heads: Vec<String> = model.head_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(heads.len(), 2);
        assert!(heads.contains(&"classifier.1.weight".to_string()));
        assert_all_vars_learn(&model, what);
    }
}

/// The candle-op path (what runs on a GPU: candle's convolution, BatchNorm and max-pool as
/// plain ops) gives the CPU kernels' logits, gradients and running statistics, in eval and in
/// training mode, for basic and bottleneck blocks.
#[test]
fn the_candle_op_path_matches_the_cpu_kernels() {
    for (what, config) in [
        ("basic", tiny_resnet_config()),
        ("bottleneck", bottleneck_config()),
    ] {
        let dir = tiny_dir(&config, 4);
        let kernels = load(dir.path(), None, &VisionLoadOptions::default());
        let mut ops = load(dir.path(), None, &VisionLoadOptions::default());
        ops.candle_ops(true);
        let x = pixels(4, 33, 31, 12);
        let y = targets(4, 3);
        let close = |a: &Tensor, b: &Tensor, what: String| {
            let scale = max_abs(a).max(1e-3);
            let diff = max_abs_diff(a, b);
            assert!(
                diff <= 1e-4 * scale,
                "{what}: differs by {diff} (values up to {scale})"
            );
        };
        for train in [false, true] {
            let (a, b) = (
                kernels.forward(&x, train).unwrap(),
                ops.forward(&x, train).unwrap(),
            );
            close(&a, &b, format!("{what} logits (train {train})"));
            let (ga, gb) = (
                loss(&a, &y).backprop().unwrap(),
                loss(&b, &y).backprop().unwrap(),
            );
            let vars = kernels.backbone_vars().into_iter().zip(ops.backbone_vars());
            for ((name, va), (_, vb)) in
                vars.chain(kernels.head_vars().into_iter().zip(ops.head_vars()))
            {
                let (Some(da), Some(db)) = (ga.get(va.as_tensor()), gb.get(vb.as_tensor())) else {
                    panic!("{what}: {name} has no gradient on one path (train {train})");
                };
                close(da, db, format!("{what}: {name}'s gradient (train {train})"));
            }
        }
        for ((name, a), (_, b)) in kernels.buffers().into_iter().zip(ops.buffers()) {
            close(a.as_tensor(), b.as_tensor(), format!("{what}: {name}"));
        }
    }
}

/// The device path's convolution (candle's forward, kiln's backward: candle 0.9.2's backward
/// hands its CUDA convolution a strided kernel it multiplies in the wrong order) gives the
/// kernel's outputs and gradients, at every stride, padding and leftover ResNet has, and
/// computes no gradient nothing asked for.
#[test]
fn convolution_as_candle_ops_matches_the_kernel() {
    // (batch, h, w, cin, cout, k, stride, padding)
    let shapes = [
        (3, 9, 8, 4, 5, 3, 1, 1),
        (3, 9, 8, 4, 5, 3, 2, 1),
        (2, 11, 10, 3, 6, 7, 2, 3),
        (2, 7, 9, 6, 4, 1, 2, 0),
        (1, 5, 5, 2, 3, 1, 1, 0),
        (4, 6, 6, 8, 8, 3, 1, 0),
    ];
    for (i, &(b, h, w, cin, cout, k, stride, padding)) in shapes.iter().enumerate() {
        let seed = 100 + i as u32;
        let x0 = Tensor::from_vec(values(seed, b * h * w * cin), (b, h, w, cin), &Device::Cpu);
        let w0 = Tensor::from_vec(
            values(seed + 50, cout * cin * k * k),
            (cout, cin, k, k),
            &Device::Cpu,
        );
        let (x0, w0) = (x0.unwrap(), w0.unwrap());
        let what =
            format!("[{b}, {h}, {w}, {cin}] * [{cout}, {cin}, {k}, {k}] /{stride} pad {padding}");
        let mut runs = Vec::new();
        for ops in [false, true] {
            let x = Var::from_tensor(&x0).unwrap();
            let wv = Var::from_tensor(&w0).unwrap();
            let y = if ops {
                conv::conv2d_ops(x.as_tensor(), wv.as_tensor(), stride, padding)
            } else {
                conv::conv2d(x.as_tensor(), wv.as_tensor(), stride, padding)
            }
            .unwrap();
            let r = Tensor::from_vec(values(seed + 7, y.elem_count()), y.shape(), &Device::Cpu);
            let grads = (&y * r.unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let dx = grads.get(x.as_tensor()).unwrap().clone();
            let dw = grads.get(wv.as_tensor()).unwrap().clone();
            runs.push((y, dx, dw));
        }
        let (kernel, ops) = (&runs[0], &runs[1]);
        for (name, a, b) in [
            ("output", &kernel.0, &ops.0),
            ("dx", &kernel.1, &ops.1),
            ("dw", &kernel.2, &ops.2),
        ] {
            assert_eq!(a.dims(), b.dims(), "{what}: {name}");
            let (diff, scale) = (max_abs_diff(a, b), max_abs(a).max(1e-3));
            assert!(
                diff <= 1e-4 * scale,
                "{what}: {name} differs by {diff} (up to {scale})"
            );
        }
        // A frozen weight gets no gradient, an input that tracks none gets none.
        let x = Var::from_tensor(&x0).unwrap();
        let y = conv::conv2d_ops(x.as_tensor(), &w0, stride, padding).unwrap();
        let grads = y.sum_all().unwrap().backprop().unwrap();
        assert!(
            grads.get(x.as_tensor()).is_some() && grads.get(&w0).is_none(),
            "{what}"
        );
        let wv = Var::from_tensor(&w0).unwrap();
        let y = conv::conv2d_ops(&x0, wv.as_tensor(), stride, padding).unwrap();
        let grads = y.sum_all().unwrap().backprop().unwrap();
        assert!(
            grads.get(wv.as_tensor()).is_some() && grads.get(&x0).is_none(),
            "{what}"
        );
    }
}

/// The device path's max-pool gives the kernel's outputs and input gradients (on inputs with
/// no ties), for the stem's overlapping 3×3/2 windows and others, on odd and even sizes.
#[test]
fn max_pool_as_candle_ops_matches_the_kernel() {
    for (k, stride, pad, h, w) in [
        (3, 2, 1, 9, 8),
        (3, 2, 1, 10, 11),
        (2, 2, 0, 6, 7),
        (3, 1, 1, 5, 5),
        (1, 2, 0, 7, 6),
    ] {
        let x = Var::from_vec(values(13, 2 * h * w * 3), (2, h, w, 3), &Device::Cpu).unwrap();
        let a = conv::max_pool2d(x.as_tensor(), k, stride, pad).unwrap();
        let b = conv::max_pool2d_ops(x.as_tensor(), k, stride, pad).unwrap();
        assert_eq!(a.dims(), b.dims());
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{k}/{stride}/{pad} on {h}x{w}");
        let r = Tensor::from_vec(values(14, a.elem_count()), a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &r).unwrap().sum_all().unwrap().backprop().unwrap();
        let gb = (&b * &r).unwrap().sum_all().unwrap().backprop().unwrap();
        let diff = max_abs_diff(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(
            diff < 1e-6,
            "{k}/{stride}/{pad} on {h}x{w}: input gradients differ by {diff}"
        );
    }
    let x = Tensor::zeros((1, 4, 4, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(conv::max_pool2d_ops(&x, 2, 2, 2).is_err());
}

#[test]
fn running_statistics_move_in_training_mode_only() {
    let dir = tiny_dir(&tiny_resnet_config(), 3);
    let model = load(dir.path(), None, &VisionLoadOptions::default());
    let buffers = model.buffers();
    // Two per BatchNorm: stem, 2 + 2 convs, 1 shortcut.
    assert_eq!(buffers.len(), 2 * 6);
    assert!(
        buffers
            .iter()
            .any(|(n, _)| n == "resnet.embedder.embedder.normalization.running_var")
    );
    let before = snapshot(&buffers);
    model.forward(&pixels(2, 32, 32, 1), false).unwrap();
    assert_eq!(
        snapshot(&buffers),
        before,
        "eval mode changed running statistics"
    );
    model.forward(&pixels(2, 32, 32, 1), true).unwrap();
    let after = snapshot(&buffers);
    for (name, old) in &before {
        assert_ne!(&after[name], old, "{name} did not move in training mode");
    }
    // The export carries the moved statistics.
    let exported = model.export_weights().unwrap();
    let stem_mean: Vec<f32> = exported["resnet.embedder.embedder.normalization.running_mean"]
        .to_vec1()
        .unwrap();
    assert_eq!(
        stem_mean,
        after["resnet.embedder.embedder.normalization.running_mean"]
    );
}

#[test]
fn frozen_parts_are_plain_tensors_and_run_in_eval_mode() {
    let dir = tiny_dir(&tiny_resnet_config(), 4);
    let stage0 = "resnet.encoder.stages.0.";
    let stem = "resnet.embedder.";

    // Lowest stage frozen: no Vars there, no buffers there, but the stem below still learns
    // (its gradient flows through the frozen stage).
    let opts = VisionLoadOptions {
        freeze_layers: 1,
        ..Default::default()
    };
    let model = load(dir.path(), None, &opts);
    let names: Vec<String> = model.backbone_vars().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.starts_with(stage0)));
    assert!(names.iter().any(|n| n.starts_with(stem)));
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("resnet.encoder.stages.1."))
    );
    assert!(!model.buffers().iter().any(|(n, _)| n.starts_with(stage0)));
    let frozen_before = model.export_weights().unwrap()
        ["resnet.encoder.stages.0.layers.0.layer.0.normalization.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    assert_all_vars_learn(&model, "freeze_layers=1");
    let frozen_after = model.export_weights().unwrap()
        ["resnet.encoder.stages.0.layers.0.layer.0.normalization.running_mean"]
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        frozen_before, frozen_after,
        "a frozen BatchNorm updated its statistics"
    );

    let opts = VisionLoadOptions {
        freeze_embeddings: true,
        ..Default::default()
    };
    let model = load(dir.path(), None, &opts);
    assert!(
        !model
            .backbone_vars()
            .iter()
            .any(|(n, _)| n.starts_with(stem))
    );
    assert_all_vars_learn(&model, "freeze_embeddings");

    // Feature extraction: only the head trains; no buffer can move.
    let opts = VisionLoadOptions {
        freeze_backbone: true,
        ..Default::default()
    };
    let model = load(dir.path(), None, &opts);
    assert!(model.backbone_vars().is_empty());
    assert!(model.buffers().is_empty());
    assert_eq!(model.head_vars().len(), 2);
    let x = pixels(2, 32, 32, 5);
    // Eval and train mode agree when everything below the head is frozen.
    let a = model.forward(&x, false).unwrap();
    let b = model.forward(&x, true).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
    assert_all_vars_learn(&model, "freeze_backbone");

    let opts = VisionLoadOptions {
        lora: Some(LoraConfig::default()),
        ..Default::default()
    };
    let err = ResNetForImageClassification::from_dir(
        dir.path(),
        None,
        &VarMap::new(),
        &Device::Cpu,
        &opts,
        0,
    );
    assert!(matches!(err, Err(NnError::InvalidConfig(m)) if m.contains("LoRA")));
}

#[test]
fn heads_are_reused_for_the_same_labels_and_fresh_and_seeded_otherwise() {
    let dir = tiny_dir(&tiny_resnet_config(), 5);
    let opts = VisionLoadOptions::default();
    let ckpt =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let head_of = |m: &ResNetForImageClassification| {
        m.export_weights().unwrap()["classifier.1.weight"].clone()
    };

    let same = load(
        dir.path(),
        Some(vec!["cat".into(), "dog".into(), "bird".into()]),
        &opts,
    );
    assert_eq!(
        max_abs_diff(&head_of(&same), &ckpt["classifier.1.weight"]),
        0.0
    );

    let reordered = vec!["dog".to_string(), "cat".into(), "bird".into()];
    let fresh = load(dir.path(), Some(reordered.clone()), &opts);
    assert!(max_abs_diff(&head_of(&fresh), &ckpt["classifier.1.weight"]) > 0.0);
    let bias = &fresh.export_weights().unwrap()["classifier.1.bias"];
    assert_eq!(max_abs(bias), 0.0);
    let again = load(dir.path(), Some(reordered), &opts);
    assert_eq!(
        max_abs_diff(&head_of(&fresh), &head_of(&again)),
        0.0,
        "same seed, same head"
    );

    let five: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    let model = load(dir.path(), Some(five.clone()), &opts);
    assert_eq!(model.labels(), five.as_slice());
    assert_eq!(
        model.forward(&pixels(1, 32, 32, 2), false).unwrap().dims(),
        [1, 5]
    );
    let cfg = model.export_config();
    assert_eq!(cfg["id2label"]["4"], "c4");
    assert_eq!(cfg["label2id"]["c0"], 0);
    assert_eq!(cfg["architectures"][0], "ResNetForImageClassification");
}

#[test]
fn scratch_needs_only_config_json_and_initialises_like_torchvision() {
    for config in [tiny_resnet_config(), bottleneck_config()] {
        let full = tiny_dir(&config, 6);
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            full.path().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let opts = VisionLoadOptions {
            scratch: true,
            ..Default::default()
        };
        let model = load(dir.path(), None, &opts);
        let w = model.export_weights().unwrap();
        assert_eq!(
            w["resnet.embedder.embedder.normalization.weight"]
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0; 8]
        );
        assert_eq!(
            w["resnet.embedder.embedder.normalization.running_var"]
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0; 8]
        );
        // Kaiming normal, fan-out: std sqrt(2 / (8 * 7 * 7)) = 0.0714 for the stem.
        let stem = &w["resnet.embedder.embedder.convolution.weight"];
        let std = stem
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((std - 0.0714).abs() < 0.01, "stem std {std}");
        assert_all_vars_learn(&model, "scratch");
        // Seeded: the same seed gives the same weights.
        let again = load(dir.path(), None, &opts);
        assert_eq!(
            max_abs_diff(
                stem,
                &again.export_weights().unwrap()["resnet.embedder.embedder.convolution.weight"]
            ),
            0.0
        );
    }
}

#[test]
fn timm_named_checkpoints_load_onto_the_same_model() {
    let config = bottleneck_config();
    let dir = tiny_dir(&config, 8);
    let hf =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut timm = hf_to_timm_names(&hf);
    assert_eq!(timm.len(), hf.len());
    for name in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv3.weight",
        "layer1.0.bn2.bias",
        "layer2.1.conv2.weight",
        "layer1.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "fc.bias",
    ] {
        assert!(timm.contains_key(name), "{name}");
    }
    // timm checkpoints carry BatchNorm step counters; they are ignored.
    timm.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::new(&[7i64], &Device::Cpu).unwrap(),
    );
    let timm_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        timm_dir.path().join("config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(&timm, timm_dir.path().join("model.safetensors")).unwrap();

    let x = pixels(2, 33, 29, 9);
    let a = load(dir.path(), None, &VisionLoadOptions::default())
        .forward(&x, false)
        .unwrap();
    let b = load(timm_dir.path(), None, &VisionLoadOptions::default())
        .forward(&x, false)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // A timm config.json (architecture name, classes) maps onto transformers' config.
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("config.json"),
        r#"{"architecture": "resnet18", "num_classes": 4, "num_features": 512,
            "pretrained_cfg": {"input_size": [3, 160, 160], "classifier": "fc"}}"#,
    )
    .unwrap();
    let opts = VisionLoadOptions {
        scratch: true,
        freeze_backbone: true,
        ..Default::default()
    };
    let model = load(tdir.path(), None, &opts);
    assert_eq!(model.labels().len(), 4);
    assert_eq!(model.labels()[3], "LABEL_3");
    assert_eq!(model.feature_dim(), 512);
    assert_eq!(model.image_size(), 160);
    assert_eq!(
        model.forward(&pixels(1, 64, 64, 1), false).unwrap().dims(),
        [1, 4]
    );
    let cfg = model.export_config();
    assert_eq!(cfg["model_type"], "resnet");
    assert_eq!(cfg["layer_type"], "basic");
    assert_eq!(cfg["depths"], serde_json::json!([2, 2, 2, 2]));
    assert_eq!(cfg["hidden_sizes"], serde_json::json!([64, 128, 256, 512]));
    assert!(cfg.get("architecture").is_none());
    let names: Vec<String> = model.export_weights().unwrap().into_keys().collect();
    assert!(names.contains(
        &"resnet.encoder.stages.3.layers.1.layer.1.normalization.running_var".to_string()
    ));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("resnet.encoder.stages.0.layers.0.shortcut"))
    );
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("resnet.encoder.stages.1.layers.0.shortcut"))
    );

    let unknown = tempfile::tempdir().unwrap();
    std::fs::write(
        unknown.path().join("config.json"),
        r#"{"architecture": "resnet50d"}"#,
    )
    .unwrap();
    let err = ResNetForImageClassification::from_dir(
        unknown.path(),
        None,
        &VarMap::new(),
        &Device::Cpu,
        &opts,
        0,
    );
    assert!(matches!(err, Err(NnError::InvalidConfig(_))));
}

/// Gradients of `sum(f(x) * r)` with respect to x at positions `at`, by central finite
/// differences. The two outputs are subtracted before the reduction, so outputs that a step does
/// not touch cancel exactly instead of adding f32 round-off.
fn finite_difference(
    f: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    r: &Tensor,
    h: f32,
    at: &[usize],
) -> Vec<f32> {
    let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eval = |v: Vec<f32>| f(&Tensor::from_vec(v, x.shape(), x.device()).unwrap());
    at.iter()
        .map(|&i| {
            let mut p = base.clone();
            p[i] += h;
            let mut m = base.clone();
            m[i] -= h;
            let d = ((eval(p) - eval(m)).unwrap() * r).unwrap();
            d.sum_all().unwrap().to_scalar::<f32>().unwrap() / (2.0 * h)
        })
        .collect()
}

#[test]
fn max_pool_backward_matches_finite_differences_and_sends_ties_to_the_first_maximum() {
    let dev = Device::Cpu;
    // Distinct values (a permutation scaled), so the argmax is stable under small steps.
    let n = 2 * 7 * 6 * 3;
    let mut vals: Vec<f32> = (0..n).map(|i| ((i * 37) % n) as f32 * 0.1).collect();
    vals.rotate_left(5);
    let x = Var::from_vec(vals, (2, 7, 6, 3), &dev).unwrap();
    let y = conv::max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
    assert_eq!(y.dims(), [2, 4, 3, 3]);
    let r = Tensor::from_vec(values(3, y.elem_count()), y.shape(), &dev).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backprop().unwrap();
    let gx = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let f = |t: &Tensor| conv::max_pool2d(t, 3, 2, 1).unwrap();
    let all: Vec<usize> = (0..n).collect();
    let fd = finite_difference(&f, x.as_tensor(), &r, 0.01, &all);
    for i in 0..n {
        assert!(
            (gx[i] - fd[i]).abs() < 1e-3,
            "position {i}: {} vs {}",
            gx[i],
            fd[i]
        );
    }
    // Overlapping windows accumulate: some input must receive from several outputs.
    let r1 = y.ones_like().unwrap();
    let g = (&y * &r1).unwrap().sum_all().unwrap().backprop().unwrap();
    let counts = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(counts.iter().any(|&c| c >= 2.0));
    assert_eq!(counts.iter().sum::<f32>(), y.elem_count() as f32);

    // Ties: the whole gradient goes to the first maximum of each window in scan order, as
    // PyTorch does (max_pool2d(ones(1,1,4,4), 3, 2, 1) sends 1 to (0,0), (0,1), (1,0), (1,1)).
    let x = Var::from_vec(vec![1f32; 16], (1, 4, 4, 1), &dev).unwrap();
    let y = conv::max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
    let g = y.sum_all().unwrap().backprop().unwrap();
    let gx = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut expected = vec![0f32; 16];
    for i in [0, 1, 4, 5] {
        expected[i] = 1.0;
    }
    assert_eq!(gx, expected);
}

/// Candle's own NCHW conv2d (forward trusted; its backward is compared here too).
fn candle_conv(x_nhwc: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Tensor {
    x_nhwc
        .permute((0, 3, 1, 2))
        .unwrap()
        .conv2d(w, pad, stride, 1, 1)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap()
}

#[test]
fn conv2d_matches_candle_and_finite_differences_for_the_resnet_shapes() {
    let dev = Device::Cpu;
    // (cin, cout, k, stride, pad, h, w): stem 7x7/2 pad 3, 3x3/2 pad 1, 3x3/1, 1x1/2 and 1x1/1
    // shortcuts; odd, even and non-square sizes.
    for (i, &(cin, cout, k, stride, pad, h, w)) in [
        (3, 4, 7, 2, 3, 11, 10),
        (3, 4, 7, 2, 3, 10, 10),
        (3, 5, 3, 2, 1, 9, 8),
        (3, 5, 3, 2, 1, 9, 9),
        (4, 3, 3, 1, 1, 6, 7),
        (4, 6, 1, 2, 0, 7, 6),
        (4, 6, 1, 2, 0, 8, 8),
        (5, 3, 1, 1, 0, 4, 5),
    ]
    .iter()
    .enumerate()
    {
        let x = Var::from_vec(values(i as u32, 2 * h * w * cin), (2, h, w, cin), &dev).unwrap();
        let wt = Var::from_vec(
            values(100 + i as u32, cout * cin * k * k),
            (cout, cin, k, k),
            &dev,
        )
        .unwrap();
        let ours = conv::conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
        let theirs = candle_conv(x.as_tensor(), wt.as_tensor(), stride, pad);
        assert_eq!(ours.dims(), theirs.dims(), "case {i}");
        assert!(
            max_abs_diff(&ours, &theirs) < 1e-4,
            "case {i}: forward differs"
        );

        let r = Tensor::from_vec(
            values(200 + i as u32, ours.elem_count()),
            ours.shape(),
            &dev,
        )
        .unwrap();
        let g = (&ours * &r).unwrap().sum_all().unwrap().backprop().unwrap();
        let (gx, gw) = (
            g.get(x.as_tensor()).unwrap(),
            g.get(wt.as_tensor()).unwrap(),
        );
        // candle's conv2d backward takes the output padding of its transposed convolution from
        // the height alone, so it fails when height and width differ in parity under stride 2
        // ("shape mismatch in add"); where it runs, it must agree with kiln's.
        let candle_grads = (&theirs * &r).unwrap().sum_all().unwrap().backprop();
        let same_parity = stride == 1 || h % 2 == w % 2;
        assert_eq!(
            candle_grads.is_ok(),
            same_parity,
            "case {i}: candle backward"
        );
        if let Ok(gc) = candle_grads {
            let (cx, cw) = (
                gc.get(x.as_tensor()).unwrap(),
                gc.get(wt.as_tensor()).unwrap(),
            );
            assert!(
                max_abs_diff(gx, cx) < 1e-3 * max_abs(cx).max(1.0),
                "case {i}: input gradients differ from candle's"
            );
            assert!(
                max_abs_diff(gw, cw) < 1e-3 * max_abs(cw).max(1.0),
                "case {i}: weight gradients differ from candle's"
            );
        }

        // And kiln's matches finite differences (the function is linear in each argument, so
        // central differences are exact up to round-off).
        let n = x.elem_count();
        let at: Vec<usize> = (0..n).step_by(7).collect();
        let fx = |t: &Tensor| conv::conv2d(t, wt.as_tensor(), stride, pad).unwrap();
        let fd = finite_difference(&fx, x.as_tensor(), &r, 0.05, &at);
        let gxv = gx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (j, &p) in at.iter().enumerate() {
            assert!(
                (gxv[p] - fd[j]).abs() < 2e-2,
                "case {i}: dx[{p}] {} vs {}",
                gxv[p],
                fd[j]
            );
        }
        let fw = |t: &Tensor| conv::conv2d(x.as_tensor(), t, stride, pad).unwrap();
        let at: Vec<usize> = (0..wt.elem_count()).step_by(5).collect();
        let fd = finite_difference(&fw, wt.as_tensor(), &r, 0.05, &at);
        let gwv = gw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (j, &p) in at.iter().enumerate() {
            assert!(
                (gwv[p] - fd[j]).abs() < 2e-2,
                "case {i}: dw[{p}] {} vs {}",
                gwv[p],
                fd[j]
            );
        }
    }
}

#[test]
fn winograd_convolutions_at_resnet_widths_match_im2col() {
    use conv::Unfold;
    let dev = Device::Cpu;
    // 128 x 128 channels (where Auto takes Winograd's form); odd and even sizes (tiles cut at
    // the bottom and right edges, or none).
    for (b, h, w) in [(2, 7, 7), (1, 8, 6), (3, 5, 9)] {
        let (cin, cout) = (128, 128);
        let x = Var::from_vec(values(4, b * h * w * cin), (b, h, w, cin), &dev).unwrap();
        let wt = Var::from_vec(values(5, cout * cin * 9), (cout, cin, 3, 3), &dev).unwrap();
        let run = |unfold: Unfold| {
            let y = conv::conv2d_with(x.as_tensor(), wt.as_tensor(), 1, 1, unfold).unwrap();
            let r = Tensor::from_vec(values(6, y.elem_count()), y.shape(), &dev).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backprop().unwrap();
            let gx = g.get(x.as_tensor()).unwrap().clone();
            let gw = g.get(wt.as_tensor()).unwrap().clone();
            [y, gx, gw]
        };
        let direct = run(Unfold::Im2col);
        let winograd = run(Unfold::Winograd);
        let names = ["output", "input gradient", "weight gradient"];
        for ((what, d), wg) in names.into_iter().zip(&direct).zip(&winograd) {
            let scale = max_abs_diff(d, &d.zeros_like().unwrap());
            let diff = max_abs_diff(d, wg);
            eprintln!("{b}x{h}x{w}: {what} differs by {diff:.2e}, values up to {scale:.1}");
            assert!(
                diff <= 2e-6 * scale,
                "{b}x{h}x{w}: {what} differs by {diff} (values up to {scale})"
            );
        }
    }
}

/// Weights prepared once (serving) give the convolution's results on every path: Winograd's
/// form and im2col's (tiled, whole-batch, pointwise), strided, and at both sides of Auto's
/// choice; a weight of other dims is refused rather than read wrongly.
#[test]
fn prepared_weights_give_the_same_convolutions() {
    use conv::Unfold;
    let dev = Device::Cpu;
    // (batch, size, cin, cout, kernel, stride, padding)
    let shapes = [
        (1, 7, 128, 128, 3, 1, 1),  // Winograd's kind; Auto keeps im2col at batch 1
        (12, 7, 128, 128, 3, 1, 1), // ... and takes Winograd's form at batch 12
        (2, 9, 8, 16, 3, 1, 1),     // small weight: tiles
        (2, 11, 3, 8, 7, 2, 3),     // stem-like
        (3, 6, 16, 32, 1, 1, 0),    // pointwise
        (2, 8, 16, 32, 1, 2, 0),    // strided shortcut
        (1, 9, 520, 512, 3, 2, 1),  // large weight: whole images
    ];
    for (b, h, cin, cout, k, stride, pad) in shapes {
        let x = Tensor::from_vec(values(7, b * h * h * cin), (b, h, h, cin), &dev).unwrap();
        let w = Tensor::from_vec(values(8, cout * cin * k * k), (cout, cin, k, k), &dev).unwrap();
        let prepared = conv::PreparedWeight::new(&w, stride, pad).unwrap().unwrap();
        assert!(prepared.bytes() >= (cout * cin * k * k * 4) as u64);
        for unfold in [Unfold::Auto, Unfold::Im2col, Unfold::Winograd] {
            let plain = conv::conv2d_with(&x, &w, stride, pad, unfold).unwrap();
            let served = conv::conv2d_prepared_with(&x, &w, &prepared, unfold).unwrap();
            let scale = max_abs(&plain);
            let diff = max_abs_diff(&plain, &served);
            assert!(
                diff <= 1e-6 * scale,
                "{b}x{h}x{h}x{cin} -> {cout}, {k}x{k}/{stride} ({unfold:?}): differs by {diff} \
                 (values up to {scale})"
            );
        }
    }
    let w = Tensor::from_vec(values(9, 8 * 4 * 9), (8, 4, 3, 3), &dev).unwrap();
    let other = Tensor::from_vec(values(9, 8 * 8 * 9), (8, 8, 3, 3), &dev).unwrap();
    let prepared = conv::PreparedWeight::new(&w, 1, 1).unwrap().unwrap();
    let x = Tensor::from_vec(values(10, 5 * 5 * 8), (1, 5, 5, 8), &dev).unwrap();
    let err = conv::conv2d_prepared(&x, &other, &prepared).unwrap_err();
    assert!(err.to_string().contains("was prepared as"), "{err}");
}

/// A model prepared for inference gives its unprepared logits in eval mode, trains from its
/// weights as before, and after `unprepare` follows weights that changed.
#[test]
fn resnets_prepared_for_inference_give_the_same_logits() {
    for config in [tiny_resnet_config(), bottleneck_config()] {
        let dir = tiny_dir(&config, 3);
        let mut model = load(dir.path(), None, &VisionLoadOptions::default());
        let x = pixels(3, 32, 32, 11);
        let before = model.forward(&x, false).unwrap();
        let bytes = model.prepare_for_inference().unwrap();
        assert!(bytes > 0);
        let after = model.forward(&x, false).unwrap();
        assert!(max_abs_diff(&before, &after) <= 1e-5 * max_abs(&before).max(1.0));
        // Training mode reads the weights themselves, and gradients reach every variable.
        let grads = loss(&model.forward(&x, true).unwrap(), &targets(3, 3))
            .backprop()
            .unwrap();
        for (name, var) in model.backbone_vars() {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{name} has no gradient"
            );
        }
        // A changed weight shows once the prepared forms are dropped.
        let (name, stem) = model
            .backbone_vars()
            .into_iter()
            .find(|(n, _)| n.contains("embedder") && n.ends_with("convolution.weight"))
            .unwrap();
        stem.set(&(stem.as_tensor() * 2.0).unwrap()).unwrap();
        let stale = model.forward(&x, false).unwrap();
        model.unprepare();
        let fresh = model.forward(&x, false).unwrap();
        assert!(
            max_abs_diff(&stale, &fresh) > 1e-4,
            "doubling {name} changed nothing after unprepare"
        );
    }
}

#[test]
fn conv2d_gives_the_same_results_in_tiles_and_in_whole_batches() {
    use conv::Unfold;
    let dev = Device::Cpu;
    // (cin, cout, k, stride, pad): 3x3 at stride 2 (its input gradient always goes through
    // whole-image columns) and at stride 1 (there, in tiles, a convolution of the output
    // gradient with the flipped kernel); a 5x5 with padding 1 (a smaller output); a strided
    // 1x1.
    for (i, &(cin, cout, k, stride, pad)) in [
        (4, 5, 3, 2, 1),
        (4, 5, 3, 1, 1),
        (3, 6, 5, 1, 1),
        (4, 6, 1, 2, 0),
    ]
    .iter()
    .enumerate()
    {
        let (b, h, w) = (3, 9, 8);
        let x = Var::from_vec(values(1, b * h * w * cin), (b, h, w, cin), &dev).unwrap();
        let wt = Var::from_vec(values(2, cout * cin * k * k), (cout, cin, k, k), &dev).unwrap();
        let run = |unfold: Unfold| {
            let y = conv::conv2d_with(x.as_tensor(), wt.as_tensor(), stride, pad, unfold).unwrap();
            let r = Tensor::from_vec(values(3, y.elem_count()), y.shape(), &dev).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backprop().unwrap();
            let gx = g.get(x.as_tensor()).unwrap().clone();
            let gw = g.get(wt.as_tensor()).unwrap().clone();
            (y, gx, gw)
        };
        let reference = run(Unfold::Batches(conv::DEFAULT_COLUMN_FLOATS));
        let theirs = candle_conv(x.as_tensor(), wt.as_tensor(), stride, pad);
        assert!(max_abs_diff(&reference.0, &theirs) < 1e-4, "case {i}");
        if stride == 1 {
            // (candle's backward needs height and width of one parity under stride 2)
            let r = Tensor::from_vec(values(3, theirs.elem_count()), theirs.shape(), &dev).unwrap();
            let gc = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backprop()
                .unwrap();
            let (cx, cw) = (
                gc.get(x.as_tensor()).unwrap(),
                gc.get(wt.as_tensor()).unwrap(),
            );
            assert!(
                max_abs_diff(&reference.1, cx) < 1e-4,
                "case {i}: input gradient"
            );
            assert!(
                max_abs_diff(&reference.2, cw) < 1e-3,
                "case {i}: weight gradient"
            );
        }
        // One image at a time; tiles of 1 row, of 7 (edges inside images and across them), of
        // a whole image and more; the automatic choice.
        for unfold in [
            Unfold::Batches(1),
            Unfold::Tiles(1),
            Unfold::Tiles(7),
            Unfold::Tiles(1000),
            Unfold::Auto,
            Unfold::Im2col,
            Unfold::Winograd,
        ] {
            let other = run(unfold);
            // Winograd's transforms round differently from the direct sums.
            let loose = if unfold == Unfold::Winograd { 4.0 } else { 1.0 };
            assert!(
                max_abs_diff(&reference.0, &other.0) < 1e-5 * loose,
                "case {i} {unfold:?}: output"
            );
            assert!(
                max_abs_diff(&reference.1, &other.1) < 1e-5 * loose,
                "case {i} {unfold:?}: input gradient"
            );
            assert!(
                max_abs_diff(&reference.2, &other.2) < 1e-4 * loose,
                "case {i} {unfold:?}: weight gradient"
            );
        }
    }
}

#[test]
fn batch_norm_backward_in_training_mode_matches_finite_differences() {
    let dev = Device::Cpu;
    let x = Var::from_vec(values(1, 5 * 4), (5, 4), &dev).unwrap();
    let w = Var::from_vec(vec![0.5f32, 1.5, -1.0, 2.0], 4, &dev).unwrap();
    let b = Var::from_vec(vec![0.1f32, -0.2, 0.3, 0.0], 4, &dev).unwrap();
    let r = Tensor::from_vec(values(2, 20), (5, 4), &dev).unwrap();
    for relu in [false, true] {
        let f = |x: &Tensor, w: &Tensor, b: &Tensor| -> Tensor {
            let (mean, var) = conv::channel_stats(x).unwrap();
            let stats = conv::BatchNormStats {
                mean,
                var,
                eps: 1e-5,
                batch_stats: true,
                relu,
            };
            conv::batch_norm(x, w, b, &stats).unwrap()
        };
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor());
        // Reference from primitive candle ops.
        let mean = x.as_tensor().mean_keepdim(0).unwrap();
        let c = x.as_tensor().broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(0).unwrap();
        let prim = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let prim = if relu { prim.relu().unwrap() } else { prim };
        assert!(max_abs_diff(&y, &prim) < 1e-5);
        let g = (&y * &r).unwrap().sum_all().unwrap().backprop().unwrap();
        let gp = (&prim * &r).unwrap().sum_all().unwrap().backprop().unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let d = max_abs_diff(
                g.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "relu={relu}: d{name} differs by {d}");
        }
    }
}

#[test]
fn batch_norm_add_relu_equals_batch_norm_then_add_then_relu() {
    let dev = Device::Cpu;
    let (rows, c) = (70, 6);
    let x = Var::from_vec(values(1, rows * c), (rows, c), &dev).unwrap();
    let w = Var::from_vec(values(3, c), c, &dev).unwrap();
    let b = Var::from_vec(values(4, c), c, &dev).unwrap();
    let res = Var::from_vec(values(5, rows * c), (rows, c), &dev).unwrap();
    let r = Tensor::from_vec(values(2, rows * c), (rows, c), &dev).unwrap();
    // Batch statistics (training) and given ones (eval).
    for batch_stats in [true, false] {
        let (mean, var) = if batch_stats {
            conv::channel_stats(x.as_tensor()).unwrap()
        } else {
            (vec![0.1; c], vec![0.8; c])
        };
        let stats = conv::BatchNormStats {
            mean,
            var,
            eps: 1e-5,
            batch_stats,
            relu: false,
        };
        let (xt, wt, bt, rt) = (x.as_tensor(), w.as_tensor(), b.as_tensor(), res.as_tensor());
        let fused = conv::batch_norm_add_relu(xt, wt, bt, rt, &stats).unwrap();
        let apart = (conv::batch_norm(xt, wt, bt, &stats).unwrap() + rt)
            .unwrap()
            .relu()
            .unwrap();
        let zeros = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let cut = zeros.iter().filter(|&&v| v == 0.0).count();
        assert!(
            cut > 10 && cut < rows * c - 10,
            "the ReLU cuts some outputs ({cut})"
        );
        assert!(max_abs_diff(&fused, &apart) < 1e-6);
        let g = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        let ga = (&apart * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backprop()
            .unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b), ("residual", &res)] {
            let d = max_abs_diff(
                g.get(v.as_tensor()).unwrap(),
                ga.get(v.as_tensor()).unwrap(),
            );
            assert!(
                d < 1e-5,
                "batch_stats={batch_stats}: d{name} differs by {d}"
            );
        }
    }
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

struct Reference {
    info: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

/// Runs tests/python/resnet_reference.py on each (model dir, mode) with these inputs.
fn reference(cases: &[(&Path, &str)], x: &Tensor, labels: &Tensor) -> Vec<Reference> {
    let work = tempfile::tempdir().unwrap();
    let inputs = work.path().join("inputs.safetensors");
    let mut t = HashMap::new();
    t.insert("pixels".to_string(), x.clone());
    t.insert("labels".to_string(), labels.to_dtype(DType::I64).unwrap());
    candle_core::safetensors::save(&t, &inputs).unwrap();
    let spec: Vec<serde_json::Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (dir, mode))| {
            serde_json::json!({"model_dir": dir, "inputs": inputs, "mode": mode,
                "output": work.path().join(format!("out{i}.safetensors"))})
        })
        .collect();
    let spec_file = work.path().join("cases.json");
    std::fs::write(&spec_file, serde_json::to_string(&spec).unwrap()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/resnet_reference.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&spec_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "resnet_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let infos: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    infos
        .into_iter()
        .enumerate()
        .map(|(i, info)| Reference {
            info,
            tensors: candle_core::safetensors::load(
                work.path().join(format!("out{i}.safetensors")),
                &Device::Cpu,
            )
            .unwrap(),
        })
        .collect()
}

fn skip_without_transformers() -> bool {
    if transformers_available() {
        return false;
    }
    println!(
        "SKIPPED: python3 with torch and transformers is needed for the transformers parity test \
         (pip install -r tests/python/requirements.txt)"
    );
    true
}

#[test]
fn logits_gradients_and_running_stats_match_transformers() {
    if skip_without_transformers() {
        return;
    }
    let mut first_stage = tiny_resnet_config();
    first_stage.downsample_in_first_stage = true;
    first_stage.depths = vec![2, 1];
    let mut in_bottleneck = bottleneck_config();
    in_bottleneck.downsample_in_bottleneck = true;
    let variants = [
        ("basic", tiny_resnet_config()),
        ("basic, downsample_in_first_stage", first_stage),
        ("bottleneck", bottleneck_config()),
        ("bottleneck, downsample_in_bottleneck", in_bottleneck),
    ];
    let dirs: Vec<_> = variants
        .iter()
        .enumerate()
        .map(|(i, (_, c))| tiny_dir(c, 10 + i as u64))
        .collect();
    // Odd, non-square images exercise the padding and floor arithmetic of every stride.
    let x = pixels(3, 37, 45, 11);
    let labels = targets(3, 3);
    let cases: Vec<(&Path, &str)> = dirs
        .iter()
        .flat_map(|d| [(d.path(), "eval"), (d.path(), "train")])
        .collect();
    let refs = reference(&cases, &x, &labels);
    for (v, ((what, _), dir)) in variants.iter().zip(&dirs).enumerate() {
        let (eval, train) = (&refs[2 * v], &refs[2 * v + 1]);
        assert_eq!(eval.info["missing_keys"], serde_json::json!([]), "{what}");
        assert_eq!(
            eval.info["unexpected_keys"],
            serde_json::json!([]),
            "{what}"
        );

        let model = load(dir.path(), None, &VisionLoadOptions::default());
        let ours = model.forward(&x, false).unwrap();
        let diff = max_abs_diff(&ours, &eval.tensors["logits"]);
        println!("{what}: eval max |kiln - transformers| = {diff:e}");
        assert!(diff < 1e-4, "{what}: eval logits differ by {diff}");

        let logits = model.forward(&x, true).unwrap();
        let diff = max_abs_diff(&logits, &train.tensors["logits"]);
        assert!(diff < 1e-4, "{what}: train-mode logits differ by {diff}");
        let l = loss(&logits, &labels);
        let torch_loss = train.info["loss"].as_f64().unwrap() as f32;
        assert!((l.to_scalar::<f32>().unwrap() - torch_loss).abs() < 1e-4);
        let grads = l.backprop().unwrap();
        let vars: Vec<(String, Var)> = model
            .backbone_vars()
            .into_iter()
            .chain(model.head_vars())
            .collect();
        let mut worst = 0f32;
        for (name, var) in &vars {
            let ours = grads.get(var.as_tensor()).unwrap();
            let theirs = &train.tensors[&format!("grad.{name}")];
            let rel = max_abs_diff(ours, theirs) / max_abs(theirs).max(1e-3);
            worst = worst.max(rel);
            assert!(
                rel < 1e-3,
                "{what}: gradient of {name} differs (relative {rel})"
            );
        }
        let torch_grads = train
            .tensors
            .keys()
            .filter(|k| k.starts_with("grad."))
            .count();
        assert_eq!(
            torch_grads,
            vars.len(),
            "{what}: torch has {torch_grads} parameters"
        );
        println!("{what}: worst relative gradient difference {worst:e}");
        for (name, buf) in model.buffers() {
            let theirs = &train.tensors[&format!("buffer.{name}")];
            let diff = max_abs_diff(buf.as_tensor(), theirs);
            assert!(
                diff < 1e-5,
                "{what}: {name} after a training step differs by {diff}"
            );
        }
    }
}

#[test]
fn exported_weights_and_config_reload_in_transformers_with_the_same_logits() {
    if skip_without_transformers() {
        return;
    }
    let base = tiny_dir(&bottleneck_config(), 20);
    let labels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let model = load(
        base.path(),
        Some(labels.clone()),
        &VisionLoadOptions {
            freeze_layers: 1,
            ..Default::default()
        },
    );
    // One SGD step and a training-mode forward, so weights and statistics differ from the base.
    let x = pixels(4, 32, 32, 21);
    let grads = loss(&model.forward(&x, true).unwrap(), &targets(4, 4))
        .backprop()
        .unwrap();
    for (_, var) in model.backbone_vars().into_iter().chain(model.head_vars()) {
        let g = grads.get(var.as_tensor()).unwrap();
        var.set(&(var.as_tensor() - (g * 0.1).unwrap()).unwrap())
            .unwrap();
    }
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

    let probe = pixels(2, 40, 36, 22);
    let refs = reference(&[(out.path(), "eval")], &probe, &targets(2, 4));
    assert_eq!(refs[0].info["missing_keys"], serde_json::json!([]));
    assert_eq!(refs[0].info["unexpected_keys"], serde_json::json!([]));
    assert_eq!(refs[0].info["mismatched_keys"], serde_json::json!([]));
    let ours = model.forward(&probe, false).unwrap();
    let diff = max_abs_diff(&ours, &refs[0].tensors["logits"]);
    assert!(diff < 1e-4, "exported logits differ by {diff}");

    // And kiln reads its own export back, labels included.
    let again = load(out.path(), None, &VisionLoadOptions::default());
    assert_eq!(again.labels(), labels.as_slice());
    assert!(max_abs_diff(&again.forward(&probe, false).unwrap(), &ours) < 1e-6);
}

/// A directory with only the `config.json` of ResNet-18's shape (basic blocks, [64, 128, 256,
/// 512], depths [2, 2, 2, 2]), for models made from scratch.
fn resnet18_dir() -> tempfile::TempDir {
    let config = ResNetConfig {
        num_channels: 3,
        embedding_size: 64,
        hidden_sizes: vec![64, 128, 256, 512],
        depths: vec![2, 2, 2, 2],
        layer_type: LayerType::Basic,
        ..tiny_resnet_config()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&config.to_hf_json()).unwrap(),
    )
    .unwrap();
    dir
}

/// One training step (forward + backward) of a ResNet-18-shaped model, batch 8, 224x224.
/// Run: `cargo test --release --test nn_resnet -- --ignored --nocapture resnet18_step_timing`.
#[test]
#[ignore]
fn resnet18_step_timing() {
    kiln::tune_allocator();
    let dir = resnet18_dir();
    let labels: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let opts = VisionLoadOptions {
        scratch: true,
        ..Default::default()
    };
    let model = load(dir.path(), Some(labels), &opts);
    let x = pixels(8, 224, 224, 1);
    let y = targets(8, 10);
    let mut times = Vec::new();
    for step in 0..4 {
        let t0 = std::time::Instant::now();
        let logits = model.forward(&x, true).unwrap();
        let t1 = std::time::Instant::now();
        let grads = loss(&logits, &y).backprop().unwrap();
        let t2 = std::time::Instant::now();
        assert!(grads.get(model.head_vars()[0].1.as_tensor()).is_some());
        println!(
            "step {step}: forward {:.0} ms, backward {:.0} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3
        );
        times.push((t2 - t0).as_secs_f64());
    }
    let best = times[1..].iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "kiln ResNet-18 train step, batch 8, 224x224: best {:.0} ms ({:.1} images/s)",
        best * 1e3,
        8.0 / best
    );
}

/// Inference (eval mode, no gradients) of a ResNet-18-shaped model at 224x224 at the batch sizes
/// serving makes: 1, 4 and 16 images (`KILN_TIMING_BATCH` for one of them). PyTorch's side:
/// `bench/resnet_torch.py --infer`.
/// Run: `cargo test --release --test nn_resnet -- --ignored --nocapture resnet18_inference_timing`.
#[test]
#[ignore]
fn resnet18_inference_timing() {
    kiln::tune_allocator();
    let dir = resnet18_dir();
    let labels: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    let opts = VisionLoadOptions {
        scratch: true,
        freeze_backbone: true,
        ..Default::default()
    };
    let mut model = load(dir.path(), Some(labels), &opts);
    // KILN_TIMING_BATCH: one batch size only (for a profile), with KILN_TIMING_REPEATS passes.
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let batches = env("KILN_TIMING_BATCH").map_or(vec![1, 4, 16], |b| vec![b]);
    // As training's evaluation runs (weights prepared on every pass), then as serving does.
    for prepared in [false, true] {
        if prepared {
            let bytes = model.prepare_for_inference().unwrap();
            println!("weights prepared for inference: {} MiB", bytes >> 20);
        }
        for &b in &batches {
            let x = pixels(b, 224, 224, 1);
            let mut best = f64::INFINITY;
            for _ in 0..env("KILN_TIMING_REPEATS").unwrap_or(6) {
                let t0 = std::time::Instant::now();
                let logits = model.forward(&x, false).unwrap();
                assert_eq!(logits.dims(), &[b, 4]);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "kiln ResNet-18 inference{}, batch {b:2}: best {:6.1} ms ({:5.1} images/s)",
                if prepared { " (prepared)" } else { "" },
                best * 1e3,
                b as f64 / best
            );
        }
    }
}

/// Per-shape timing of kiln's convolution (forward, and backward to input and weight) on
/// ResNet-18's shapes at batch 16 (`KILN_TIMING_BATCH` for another); PyTorch's side is
/// `bench/conv_torch.py`.
/// Run: `cargo test --release --test nn_resnet -- --ignored --nocapture conv_shapes_timing`.
#[test]
#[ignore]
fn conv_shapes_timing() {
    kiln::tune_allocator();
    let b: usize = std::env::var("KILN_TIMING_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    println!("batch {b}");
    // name, cin, cout, kernel, stride, padding, input size
    let shapes = [
        ("stem", 3, 64, 7, 2, 3, 224),
        ("l1", 64, 64, 3, 1, 1, 56),
        ("l2a", 64, 128, 3, 2, 1, 56),
        ("l2", 128, 128, 3, 1, 1, 28),
        ("l2s", 64, 128, 1, 2, 0, 56),
        ("l3a", 128, 256, 3, 2, 1, 28),
        ("l3", 256, 256, 3, 1, 1, 14),
        ("l4a", 256, 512, 3, 2, 1, 14),
        ("l4", 512, 512, 3, 1, 1, 7),
    ];
    for (name, cin, cout, k, stride, pad, h) in shapes {
        let x = Var::from_tensor(
            &Tensor::from_vec(values(1, b * h * h * cin), (b, h, h, cin), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(
            &Tensor::from_vec(
                values(2, cout * cin * k * k),
                (cout, cin, k, k),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
        for (how, unfold) in [
            ("", conv::Unfold::Auto),
            (" im2col", conv::Unfold::Im2col),
            (" winograd", conv::Unfold::Winograd),
        ] {
            let winograd_applies = k == 3 && stride == 1 && pad == 1;
            if !how.is_empty() && !winograd_applies {
                continue;
            }
            let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..4 {
                let t0 = std::time::Instant::now();
                let y =
                    conv::conv2d_with(x.as_tensor(), w.as_tensor(), stride, pad, unfold).unwrap();
                let t1 = std::time::Instant::now();
                let grads = y.sum_all().unwrap().backprop().unwrap();
                let t2 = std::time::Instant::now();
                assert!(grads.get(w.as_tensor()).is_some());
                fwd = fwd.min((t1 - t0).as_secs_f64());
                bwd = bwd.min((t2 - t1).as_secs_f64());
            }
            // The forward pass again with the weight prepared beforehand (as served).
            let prepared = conv::PreparedWeight::new(w.as_tensor(), stride, pad)
                .unwrap()
                .unwrap();
            let mut served = f64::INFINITY;
            for _ in 0..4 {
                let t0 = std::time::Instant::now();
                conv::conv2d_prepared_with(x.as_tensor(), w.as_tensor(), &prepared, unfold)
                    .unwrap();
                served = served.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "{name:5} fwd {:7.1} ms  bwd {:7.1} ms  fwd prepared {:7.1} ms{how}",
                fwd * 1e3,
                bwd * 1e3,
                served * 1e3
            );
        }
    }
}
