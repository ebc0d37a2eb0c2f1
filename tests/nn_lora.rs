//! Specifications of LoRA on the BERT encoder: starts as the base model, trains only adapters,
//! and merging gives a plain model computing the same function.

use candle_core::{Device, IndexOp, Tensor, Var};
use candle_nn::VarMap;
use kiln::nn::autograd::Backprop;
use kiln::nn::bert::{BertEncoder, LoadOptions, mean_pool};
use kiln::nn::lora::{LoraConfig, LoraTarget};
use kiln::nn::tiny::{tiny_bert_config, write_tiny_bert};
use kiln::train::optim::{AdamW, AdamWConfig};

fn batch(dev: &Device) -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[2u32, 15, 27, 33, 3], [2, 90, 3, 0, 0]], dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dev).unwrap();
    (ids, mask)
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

fn lora_options() -> LoadOptions {
    LoadOptions {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![
                LoraTarget::Query,
                LoraTarget::Value,
                LoraTarget::AttentionOutput,
                LoraTarget::Intermediate,
                LoraTarget::Output,
            ],
            seed: 3,
        }),
        ..LoadOptions::default()
    }
}

#[test]
fn lora_trains_only_adapters_and_merges_to_the_same_function() {
    let dev = Device::Cpu;
    let cfg = tiny_bert_config();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &cfg, 11).unwrap();
    let (ids, mask) = batch(&dev);

    let base =
        BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &LoadOptions::default()).unwrap();
    let base_out = base.forward(&ids, None, &mask, false).unwrap();

    let varmap = VarMap::new();
    let mut enc = BertEncoder::load_dir(dir.path(), &varmap, &dev, &lora_options()).unwrap();
    assert!(enc.has_lora());
    // Only adapters are trainable: 2 matrices x 5 targets x 2 layers, all PEFT-named.
    let names: Vec<&String> = enc.named_trainable_vars().iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 5 * cfg.num_hidden_layers);
    assert!(
        names
            .iter()
            .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
    );
    assert!(
        names.contains(&&"bert.encoder.layer.1.attention.self.query.lora_B.weight".to_string())
    );
    assert_eq!(varmap.all_vars().len(), names.len());

    // B starts at zero: the adapted model is exactly the base model.
    let out = enc.forward(&ids, None, &mask, false).unwrap();
    assert_eq!(max_abs_diff(&out, &base_out), 0.0);

    let loss_of = |enc: &BertEncoder| {
        let h = enc.forward(&ids, None, &mask, true).unwrap();
        (mean_pool(&h, &mask).unwrap() - 0.5)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    // At step 0 only B gets a gradient (A's gradient goes through B = 0).
    let grads = loss_of(&enc).backprop().unwrap();
    for (name, v) in enc.named_trainable_vars() {
        let norm = grad_norm(&grads, v);
        if name.contains("lora_B") {
            assert!(norm > 0.0, "{name} has no gradient at step 0");
        } else {
            assert_eq!(norm, 0.0, "{name}");
        }
    }
    for (name, t) in enc.named_frozen_tensors() {
        assert!(
            grads.get(t).is_none(),
            "frozen base weight {name} got a gradient"
        );
    }

    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("lora", 1e-2, 0.0, enc.named_trainable_vars().to_vec())
        .unwrap();
    opt.step(&grads).unwrap();
    for _ in 0..3 {
        let grads = loss_of(&enc).backprop().unwrap();
        // After one step B != 0, and every adapter matrix learns.
        for (name, v) in enc.named_trainable_vars() {
            assert!(
                grad_norm(&grads, v) > 0.0,
                "{name} has no gradient after step 1"
            );
        }
        opt.step(&grads).unwrap();
    }

    let adapted = enc.forward(&ids, None, &mask, false).unwrap();
    assert!(
        max_abs_diff(&adapted, &base_out) > 1e-3,
        "training changed nothing"
    );
    // Evaluation's first-token path (the last layer for token 0 alone) goes through the
    // adapters too: it equals the full forward's first token.
    let first = enc.forward_first_token(&ids, None, &mask).unwrap();
    let expected = adapted.i((.., 0, ..)).unwrap().contiguous().unwrap();
    assert!(max_abs_diff(&first, &expected) < 1e-5);

    // The exported checkpoint (LoRA merged) reloads as a plain BERT computing the same function.
    let exported = enc.export_weights().unwrap();
    assert!(exported.keys().all(|k| !k.contains("lora")));
    let out_dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&exported, out_dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        out_dir.path().join("config.json"),
    )
    .unwrap();
    let reloaded = BertEncoder::load_dir(
        out_dir.path(),
        &VarMap::new(),
        &dev,
        &LoadOptions::default(),
    )
    .unwrap();
    let reloaded_out = reloaded.forward(&ids, None, &mask, false).unwrap();
    assert!(max_abs_diff(&reloaded_out, &adapted) < 1e-5);

    // Merging in place gives the same function too, with no adapters left.
    enc.merge_lora().unwrap();
    assert!(!enc.has_lora());
    let merged = enc.forward(&ids, None, &mask, false).unwrap();
    assert!(max_abs_diff(&merged, &adapted) < 1e-5);
}

#[test]
fn adapters_inside_the_fused_blocks_match_the_primitive_ops() {
    // In training on the CPU, BERT's attention and feed-forward blocks run as fused ops that
    // compute the adapters inside; with `fused_ops: false` the adapters are separate ops.
    // Both must give the same outputs and the same gradient to every adapter matrix.
    let dev = Device::Cpu;
    let cfg = tiny_bert_config();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &cfg, 11).unwrap();
    let (b, s) = (6, 20);
    let ids: Vec<u32> = (0..b * s).map(|i| 4 + (i as u32 * 37) % 90).collect();
    let lengths = [20, 17, 14, 11, 8, 5];
    let mask: Vec<u32> = lengths
        .iter()
        .flat_map(|&n| (0..s).map(move |j| u32::from(j < n)))
        .collect();
    let ids = Tensor::from_vec(ids, (b, s), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (b, s), &dev).unwrap();
    let run = |fused_ops: bool| {
        let opts = LoadOptions {
            fused_ops,
            ..lora_options()
        };
        let enc = BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &opts).unwrap();
        // B starts at zero; give it values fixed by its position so A learns too.
        for (i, (name, v)) in enc.named_trainable_vars().iter().enumerate() {
            if name.contains("lora_B") {
                let n = v.as_tensor().elem_count();
                let vals: Vec<f32> = (0..n)
                    .map(|j| (((i * 131 + j * 17) % 97) as f32 / 97.0 - 0.5) * 0.4)
                    .collect();
                v.set(&Tensor::from_vec(vals, v.as_tensor().shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        let h = enc.forward(&ids, None, &mask, true).unwrap();
        let loss = (mean_pool(&h, &mask).unwrap() - 0.5)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backprop().unwrap();
        let g: Vec<(String, Tensor)> = enc
            .named_trainable_vars()
            .iter()
            .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        (h, g)
    };
    let (h1, g1) = run(true);
    let (h0, g0) = run(false);
    assert!(max_abs_diff(&h1, &h0) < 1e-5);
    assert_eq!(g1.len(), 2 * 5 * cfg.num_hidden_layers);
    for ((name, a), (_, e)) in g1.iter().zip(&g0) {
        let scale = e
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(scale > 0.0, "{name} has no gradient");
        let d = max_abs_diff(a, e);
        assert!(
            d / scale < 1e-4,
            "{name}: gradient differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn lora_config_is_validated() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &tiny_bert_config(), 1).unwrap();
    let mut opts = lora_options();
    if let Some(l) = opts.lora.as_mut() {
        l.rank = 0;
    }
    let err = BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &opts)
        .err()
        .unwrap();
    assert!(err.to_string().contains("rank"), "{err}");
}
