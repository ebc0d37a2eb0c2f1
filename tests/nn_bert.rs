//! Specifications of the trainable BERT encoder: every trainable weight learns, frozen weights
//! do not, and outputs match candle-transformers' (inference-only) BERT on the same weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use kiln::nn::NnError;
use kiln::nn::autograd::Backprop;
use kiln::nn::bert::{BertConfig, BertEncoder, LoadOptions, cls_pool, mean_pool};
use kiln::nn::tiny::{TinyLayout, tiny_bert_config, write_tiny_bert, write_tiny_bert_with};

/// A batch of 3 sequences of length 7 with padding in rows 1 and 2, and both token types.
fn batch(dev: &Device) -> (Tensor, Tensor, Tensor) {
    let ids: [[u32; 7]; 3] = [
        [2, 15, 27, 33, 41, 8, 3],
        [2, 90, 11, 3, 0, 0, 0],
        [2, 5, 3, 0, 0, 0, 0],
    ];
    let types: [[u32; 7]; 3] = [
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ];
    let mask: [[u32; 7]; 3] = [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
    ];
    (
        Tensor::new(&ids, dev).unwrap(),
        Tensor::new(&types, dev).unwrap(),
        Tensor::new(&mask, dev).unwrap(),
    )
}

fn tiny_dir(config: &BertConfig, layout: TinyLayout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert_with(dir.path(), config, 7, layout).unwrap();
    dir
}

/// Classification-style loss: mean-pooled states -> linear head -> cross-entropy.
/// The head is created through a VarBuilder on the same VarMap, as kiln's heads will be.
fn classification_loss(
    enc: &BertEncoder,
    varmap: &VarMap,
    dev: &Device,
    train: bool,
) -> (Tensor, Vec<(String, Var)>) {
    let (ids, types, mask) = batch(dev);
    let hidden = enc.forward(&ids, Some(&types), &mask, train).unwrap();
    let pooled = mean_pool(&hidden, &mask).unwrap();
    let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
    let head = candle_nn::linear(enc.config().hidden_size, 3, vb.pp("classifier")).unwrap();
    let logits = candle_nn::Module::forward(&head, &pooled).unwrap();
    let labels = Tensor::new(&[0u32, 2, 1], dev).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let head_vars = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n.starts_with("classifier"))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    (loss, head_vars)
}

/// Names of variables whose gradient is absent or has zero norm.
fn without_gradient(
    grads: &candle_core::backprop::GradStore,
    vars: &[(String, Var)],
) -> Vec<String> {
    vars.iter()
        .filter(|(_, v)| match grads.get(v.as_tensor()) {
            None => true,
            Some(g) => {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            }
        })
        .map(|(n, _)| n.clone())
        .collect()
}

fn both_fused_settings() -> [LoadOptions; 2] {
    [
        LoadOptions::default(),
        LoadOptions {
            fused_ops: false,
            ..LoadOptions::default()
        },
    ]
}

#[test]
fn fused_kernels_give_the_primitive_ops_gradients() {
    fused_and_primitive_gradients_agree(batch(&Device::Cpu), false);
}

#[test]
fn long_batches_take_the_fused_feed_forward_block_with_the_same_gradients() {
    // In train mode (which the tiny config's zero dropout leaves deterministic) the attention
    // block and the feed-forward block each run as one op (nn::block), their weights' gradients
    // deposited beside candle's graph (nn::autograd), against candle's separate ops.
    let dev = Device::Cpu;
    let (n, len) = (6usize, 24usize);
    let ids: Vec<u32> = (0..n * len)
        .map(|i| {
            if i % len == 0 {
                2
            } else {
                4 + (i * 37 % 90) as u32
            }
        })
        .collect();
    let types: Vec<u32> = (0..n * len)
        .map(|i| u32::from(i % len >= len / 2))
        .collect();
    let mask: Vec<u32> = (0..n * len)
        .map(|i| u32::from(i % len < len - (i / len) * 2))
        .collect();
    let t = |v: Vec<u32>| Tensor::from_vec(v, (n, len), &dev).unwrap();
    fused_and_primitive_gradients_agree((t(ids), t(types), t(mask)), true);
}

fn fused_and_primitive_gradients_agree((ids, types, mask): (Tensor, Tensor, Tensor), train: bool) {
    // Dropout off: both paths then compute the same function, so every gradient must agree
    // (the fused attention, linear, LayerNorm, GELU and feed-forward kernels against
    // candle's own ops).
    let dev = Device::Cpu;
    let dir = tiny_dir(&tiny_bert_config(), TinyLayout::Prefixed);
    let mut runs = Vec::new();
    for opts in both_fused_settings() {
        let varmap = VarMap::new();
        let enc = BertEncoder::load_dir(dir.path(), &varmap, &dev, &opts).unwrap();
        // A fixed linear read-out of every position's state (a fresh head would be random).
        let hidden = enc.forward(&ids, Some(&types), &mask, train).unwrap();
        let n = hidden.elem_count();
        let weights: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
            .collect();
        let weights = Tensor::from_vec(weights, hidden.shape(), &dev).unwrap();
        let loss = (hidden * weights)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backprop().unwrap();
        let all = enc.named_trainable_vars().to_vec();
        let by_name: std::collections::BTreeMap<String, Tensor> = all
            .iter()
            .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        runs.push((loss.to_scalar::<f32>().unwrap(), by_name));
    }
    let ((loss_fused, fused), (loss_plain, plain)) = (&runs[0], &runs[1]);
    assert!(
        (loss_fused - loss_plain).abs() < 1e-5,
        "{loss_fused} vs {loss_plain}"
    );
    assert_eq!(fused.len(), plain.len());
    for (name, g) in fused {
        let want = &plain[name];
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (g - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{name}: fused gradient differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn every_trainable_variable_receives_a_nonzero_gradient() {
    let dev = Device::Cpu;
    let mut cfg = tiny_bert_config();
    // Dropout on, to check the training path end to end.
    cfg.hidden_dropout_prob = 0.1;
    cfg.attention_probs_dropout_prob = 0.1;
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    for opts in both_fused_settings() {
        let varmap = VarMap::new();
        let enc = BertEncoder::load_dir(dir.path(), &varmap, &dev, &opts).unwrap();
        // 5 embedding tensors + 16 per layer.
        assert_eq!(
            enc.named_trainable_vars().len(),
            5 + 16 * cfg.num_hidden_layers
        );
        let (loss, head) = classification_loss(&enc, &varmap, &dev, true);
        let grads = loss.backprop().unwrap();
        let mut all = enc.named_trainable_vars().to_vec();
        all.extend(head);
        let missing = without_gradient(&grads, &all);
        assert!(
            missing.is_empty(),
            "fused={}: no gradient for {missing:?}",
            opts.fused_ops
        );
    }
}

#[test]
fn pooler_and_mlm_head_receive_gradients_and_decoder_is_tied() {
    let dev = Device::Cpu;
    let cfg = tiny_bert_config();
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    let varmap = VarMap::new();
    let opts = LoadOptions {
        with_pooler: true,
        with_mlm_head: true,
        ..LoadOptions::default()
    };
    let enc = BertEncoder::load_dir(dir.path(), &varmap, &dev, &opts).unwrap();
    assert!(enc.has_pooler() && enc.has_mlm_head());
    let (ids, types, mask) = batch(&dev);
    let hidden = enc.forward(&ids, Some(&types), &mask, false).unwrap();
    let logits = enc.mlm_logits(&hidden).unwrap();
    assert_eq!(logits.dims(), &[3, 7, cfg.vocab_size]);
    let mlm_loss =
        candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &ids.flatten_all().unwrap())
            .unwrap();
    let pooled = enc.pooled_output(&hidden).unwrap();
    let loss = (mlm_loss + pooled.sum_all().unwrap()).unwrap();
    let grads = loss.backprop().unwrap();
    let names: Vec<&str> = enc
        .named_trainable_vars()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    for expected in [
        "bert.pooler.dense.weight",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.bias",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not loaded: {names:?}"
        );
    }
    let missing = without_gradient(&grads, enc.named_trainable_vars());
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn frozen_embeddings_and_layers_get_no_gradient_and_the_rest_do() {
    let dev = Device::Cpu;
    let mut cfg = tiny_bert_config();
    cfg.num_hidden_layers = 3;
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    for freeze_layers in [0, 1, 2, 3] {
        let varmap = VarMap::new();
        let opts = LoadOptions {
            freeze_embeddings: true,
            freeze_layers,
            ..LoadOptions::default()
        };
        let enc = BertEncoder::load_dir(dir.path(), &varmap, &dev, &opts).unwrap();
        let trainable: Vec<&String> = enc.named_trainable_vars().iter().map(|(n, _)| n).collect();
        let frozen: Vec<&String> = enc.named_frozen_tensors().iter().map(|(n, _)| n).collect();
        assert_eq!(trainable.len(), 16 * (3 - freeze_layers));
        assert_eq!(frozen.len(), 5 + 16 * freeze_layers);
        assert!(frozen.iter().all(|n| n.contains("embeddings")
            || (0..freeze_layers).any(|l| n.contains(&format!("layer.{l}.")))));
        // Frozen weights are plain tensors: not in the VarMap, so no optimizer can see them.
        let in_varmap = varmap.data().lock().unwrap().len();
        assert_eq!(in_varmap, trainable.len());

        // Train mode too: there the lowest trainable layer's attention and feed-forward
        // blocks are single ops whose inputs carry no gradient (nn::autograd's anchor).
        for train in [false, true] {
            let (loss, head) = classification_loss(&enc, &varmap, &dev, train);
            let grads = loss.backprop().unwrap();
            for (name, t) in enc.named_frozen_tensors() {
                assert!(grads.get(t).is_none(), "frozen {name} got a gradient");
            }
            let mut all = enc.named_trainable_vars().to_vec();
            all.extend(head);
            let missing = without_gradient(&grads, &all);
            assert!(
                missing.is_empty(),
                "freeze {freeze_layers}, train {train}: no gradient for {missing:?}"
            );
        }
    }
}

/// Max |a - b| over all elements.
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

/// Runs candle-transformers' BertModel (the reference) on the model in `dir`.
fn reference_hidden(dir: &Path, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Tensor {
    use candle_transformers::models::bert::{BertModel, Config};
    let dev = Device::Cpu;
    let cfg: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
            .unwrap()
    };
    let model = BertModel::load(vb, &cfg).unwrap();
    // The reference takes the [batch, seq] 0/1 mask and builds (1 - mask) * f32::MIN itself,
    // exactly what kiln's encoder does, so both see the same additive bias.
    model.forward(ids, types, Some(mask)).unwrap()
}

fn assert_parity(dir: &Path, ids: &Tensor, types: &Tensor, mask: &Tensor, tol: f32) {
    let dev = Device::Cpu;
    let expected = reference_hidden(dir, ids, types, mask);
    for opts in both_fused_settings() {
        let varmap = VarMap::new();
        let enc = BertEncoder::load_dir(dir, &varmap, &dev, &opts).unwrap();
        let got = enc.forward(ids, Some(types), mask, false).unwrap();
        assert_eq!(got.dims(), expected.dims());
        let diff = max_abs_diff(&got, &expected);
        println!("fused={} max abs diff {diff:e}", opts.fused_ops);
        assert!(diff < tol, "fused={}: max abs diff {diff}", opts.fused_ops);
        // The first-token path (the last layer for token 0 alone) gives the same [CLS] state.
        let first = enc.forward_first_token(ids, Some(types), mask).unwrap();
        let expected_first = expected.i((.., 0, ..)).unwrap().contiguous().unwrap();
        let diff = max_abs_diff(&first, &expected_first);
        assert!(
            diff < tol,
            "fused={}: first token differs by {diff}",
            opts.fused_ops
        );
    }
}

#[test]
fn matches_candle_transformers_bert_on_tiny_model_with_padding_and_token_types() {
    let mut cfg = tiny_bert_config();
    // Dropout in the config must not matter when train = false.
    cfg.hidden_dropout_prob = 0.1;
    let dev = Device::Cpu;
    let (ids, types, mask) = batch(&dev);
    for layout in [TinyLayout::Prefixed, TinyLayout::Unprefixed] {
        let dir = tiny_dir(&cfg, layout);
        assert_parity(dir.path(), &ids, &types, &mask, 1e-4);
    }
}

#[test]
fn eval_mode_is_deterministic_and_train_mode_applies_dropout() {
    let mut cfg = tiny_bert_config();
    cfg.hidden_dropout_prob = 0.2;
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    let dev = Device::Cpu;
    let enc =
        BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &LoadOptions::default()).unwrap();
    let (ids, types, mask) = batch(&dev);
    let a = enc.forward(&ids, Some(&types), &mask, false).unwrap();
    let b = enc.forward(&ids, Some(&types), &mask, false).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let c = enc.forward(&ids, Some(&types), &mask, true).unwrap();
    assert!(max_abs_diff(&a, &c) > 1e-3);
}

#[test]
fn ids_outside_the_tables_are_refused_before_the_lookup() {
    // A GPU's lookup kernel would fail an assertion that poisons the CUDA context; the encoder
    // names the id and the table instead, on every device.
    let cfg = tiny_bert_config();
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    let dev = Device::Cpu;
    let enc =
        BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &LoadOptions::default()).unwrap();
    let (ids, types, mask) = batch(&dev);
    let vocab = cfg.vocab_size as u32;
    let bad_ids = Tensor::new(&[[2u32, vocab, 3]], &dev).unwrap();
    let ones = Tensor::new(&[[1u32, 1, 1]], &dev).unwrap();
    for train in [false, true] {
        let err = enc.forward(&bad_ids, None, &ones, train).unwrap_err();
        assert!(matches!(err, NnError::InvalidInput(_)), "{err}");
        assert!(
            err.to_string().contains(&format!("token id {vocab}")),
            "{err}"
        );
    }
    let bad_types = (types + cfg.type_vocab_size as f64).unwrap();
    let err = enc
        .forward(&ids, Some(&bad_types), &mask, false)
        .unwrap_err();
    assert!(matches!(err, NnError::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("token type id"), "{err}");
    // The largest ids in range still work.
    let last = Tensor::new(&[[vocab - 1, 0, 1]], &dev).unwrap();
    let top = Tensor::new(&[[cfg.type_vocab_size as u32 - 1; 3]], &dev).unwrap();
    enc.forward(&last, Some(&top), &ones, false).unwrap();
}

#[test]
fn pooling_helpers() {
    let dev = Device::Cpu;
    // hidden [2, 3, 2]; second row has one pad.
    let hidden = Tensor::new(
        &[
            [[1f32, 2.], [3., 4.], [5., 6.]],
            [[1., 1.], [3., 3.], [100., 100.]],
        ],
        &dev,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev).unwrap();
    let mean = mean_pool(&hidden, &mask).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(mean, vec![vec![3., 4.], vec![2., 2.]]);
    let cls = cls_pool(&hidden).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(cls, vec![vec![1., 2.], vec![1., 1.]]);
}

#[test]
fn roberta_positions_start_after_padding_idx() {
    // RoBERTa: pad id 1, positions of real tokens are 2, 3, ..., pads get 1. We check this
    // against a BERT-typed copy of the same weights whose input is shifted by hand: the
    // embedding of position p in RoBERTa equals BERT's position p when positions are given
    // explicitly, so we compare against BERT run on a checkpoint whose position table is
    // rolled by padding_idx + 1.
    let dev = Device::Cpu;
    let mut cfg = tiny_bert_config();
    cfg.model_type = "roberta".into();
    cfg.pad_token_id = 1;
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    let rob =
        BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &LoadOptions::default()).unwrap();
    assert_eq!(rob.prefix(), "roberta.");

    // Same weights, BERT semantics, position table shifted so that row i = roberta row i + 2.
    let mut ckpt =
        kiln::nn::layers::load_safetensors(&dir.path().join("model.safetensors"), &dev).unwrap();
    let key = "roberta.embeddings.position_embeddings.weight";
    let table = ckpt[key].clone();
    let n = table.dim(0).unwrap();
    let shifted = Tensor::cat(
        &[
            table.narrow(0, 2, n - 2).unwrap(),
            table.narrow(0, 0, 2).unwrap(),
        ],
        0,
    )
    .unwrap();
    ckpt.insert(key.to_string(), shifted);
    let mut bert_cfg = cfg.clone();
    bert_cfg.model_type = "bert".into();
    let bert = BertEncoder::from_checkpoint(
        &bert_cfg,
        &ckpt,
        &VarMap::new(),
        &dev,
        &LoadOptions::default(),
    )
    .unwrap();

    // No padding inside the real tokens, pads (id 1) at the end: real tokens then sit at the
    // same positions in both schemes; pad rows differ but are masked out and not compared.
    let ids = Tensor::new(&[[0u32, 15, 27, 2, 1, 1]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0]], &dev).unwrap();
    let a = rob
        .forward(&ids, None, &mask, false)
        .unwrap()
        .narrow(1, 0, 4)
        .unwrap();
    let b = bert
        .forward(&ids, None, &mask, false)
        .unwrap()
        .narrow(1, 0, 4)
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn missing_and_misshapen_tensors_are_named_in_the_error() {
    let dev = Device::Cpu;
    let cfg = tiny_bert_config();
    let dir = tiny_dir(&cfg, TinyLayout::Prefixed);
    let path = dir.path().join("model.safetensors");
    let full = kiln::nn::layers::load_safetensors(&path, &dev).unwrap();

    let mut ckpt = full.clone();
    ckpt.remove("bert.encoder.layer.1.attention.self.key.bias");
    let err =
        BertEncoder::from_checkpoint(&cfg, &ckpt, &VarMap::new(), &dev, &LoadOptions::default())
            .err()
            .unwrap();
    assert!(
        matches!(&err, NnError::MissingTensor { name } if name == "bert.encoder.layer.1.attention.self.key.bias"),
        "{err}"
    );

    let mut bigger = cfg.clone();
    bigger.intermediate_size = 65;
    let err = BertEncoder::from_checkpoint(
        &bigger,
        &full,
        &VarMap::new(),
        &dev,
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .contains("bert.encoder.layer.0.intermediate.dense.weight"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = BertEncoder::load_dir(empty.path(), &VarMap::new(), &dev, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// all-MiniLM-L6-v2 directory from `KILN_TEST_MINILM` (see scripts/fetch-minilm.sh).
fn minilm_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("KILN_TEST_MINILM")?);
    if dir.join("model.safetensors").exists() {
        Some(dir)
    } else {
        None
    }
}

#[test]
fn matches_candle_transformers_bert_on_real_minilm() {
    let Some(dir) = minilm_dir() else {
        println!(
            "SKIPPED: set KILN_TEST_MINILM to an all-MiniLM-L6-v2 directory \
             (scripts/fetch-minilm.sh) to run the MiniLM parity test"
        );
        return;
    };
    let dev = Device::Cpu;
    // Real token ids from its tokenizer for "the cat sat on the mat" / "hello world" + padding.
    let ids = Tensor::new(
        &[
            [101u32, 1996, 4937, 2938, 2006, 1996, 13523, 102],
            [101, 7592, 2088, 102, 0, 0, 0, 0],
        ],
        &dev,
    )
    .unwrap();
    let types = Tensor::new(&[[0u32, 0, 0, 0, 0, 1, 1, 1], [0; 8]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32; 8], [1, 1, 1, 1, 0, 0, 0, 0]], &dev).unwrap();
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.hidden_size, 384);
    assert_parity(&dir, &ids, &types, &mask, 1e-4);

    // And every variable learns on the real model too.
    let varmap = VarMap::new();
    let enc = BertEncoder::load_dir(&dir, &varmap, &dev, &LoadOptions::default()).unwrap();
    assert_eq!(enc.prefix(), "");
    let hidden = enc.forward(&ids, Some(&types), &mask, true).unwrap();
    let loss = mean_pool(&hidden, &mask)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backprop().unwrap();
    let missing = without_gradient(&grads, enc.named_trainable_vars());
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn write_tiny_bert_default_layout_is_loadable() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &tiny_bert_config(), 1).unwrap();
    let cfg = BertConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(cfg, tiny_bert_config());
    let enc = BertEncoder::load_dir(
        dir.path(),
        &VarMap::new(),
        &Device::Cpu,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(enc.prefix(), "bert.");
}

/// Mixed precision (half-precision layers from f32 master weights): the same function as f32
/// within half precision, every trainable variable (LoRA adapters included) still gets an f32
/// gradient pointing the same way as f32's, and the outputs come back in the half dtype.
/// GPUs train in bf16; candle's CPU matmul has no bf16, so the CPU runs the same casts with
/// f16 (the code path is the dtype's, not bf16's).
#[test]
fn mixed_precision_follows_f32_and_every_variable_gets_an_f32_gradient() {
    let dev = Device::Cpu;
    let dir = tiny_dir(&tiny_bert_config(), TinyLayout::Prefixed);
    let lora = LoadOptions {
        lora: Some(kiln::nn::lora::LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![
                kiln::nn::lora::LoraTarget::Query,
                kiln::nn::lora::LoraTarget::Value,
            ],
            seed: 7,
        }),
        ..LoadOptions::default()
    };
    for opts in [LoadOptions::default(), lora] {
        let mut runs = Vec::new();
        for dtype in [DType::F32, DType::F16] {
            let varmap = VarMap::new();
            let mut enc = BertEncoder::load_dir(dir.path(), &varmap, &dev, &opts).unwrap();
            if opts.lora.is_some() {
                // Adapters start at zero (B = 0): move them so their gradients are not trivial.
                for (name, v) in enc.named_trainable_vars() {
                    if name.contains("lora_B") {
                        let t = (v.as_tensor().ones_like().unwrap() * 0.05).unwrap();
                        v.set(&t).unwrap();
                    }
                }
            }
            enc.set_compute_dtype(dtype);
            let (ids, types, mask) = batch(&dev);
            let hidden = enc.forward(&ids, Some(&types), &mask, false).unwrap();
            assert_eq!(hidden.dtype(), dtype);
            let hidden = hidden.to_dtype(DType::F32).unwrap();
            let n = hidden.elem_count();
            let weights: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
                .collect();
            let weights = Tensor::from_vec(weights, hidden.shape(), &dev).unwrap();
            let loss = (&hidden * weights)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            let grads = loss.backprop().unwrap();
            let vars = enc.named_trainable_vars().to_vec();
            assert!(!vars.is_empty());
            assert_eq!(without_gradient(&grads, &vars), Vec::<String>::new());
            let by_name: Vec<(String, Vec<f32>)> = vars
                .iter()
                .map(|(name, v)| {
                    let g = grads.get(v.as_tensor()).unwrap();
                    assert_eq!(g.dtype(), DType::F32, "{name}: master gradients are f32");
                    (
                        name.clone(),
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
                .collect();
            runs.push((hidden, loss.to_scalar::<f32>().unwrap(), by_name));
        }
        let ((h32, loss32, g32), (h16, loss16, g16)) = (&runs[0], &runs[1]);
        let scale = h32
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(h32, h16);
        assert!(
            diff <= 0.05 * scale,
            "hidden states differ by {diff} (scale {scale})"
        );
        assert!(
            (loss32 - loss16).abs() <= 0.03 * loss32.abs(),
            "loss {loss32} (f32) vs {loss16} (half)"
        );
        // Each variable's gradient points the same way as f32's (cosine similarity).
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
                "{name}: gradient cosine {cosine} between f32 and half"
            );
        }
    }
}

/// Training under mixed precision tracks f32 training: the same AdamW steps from the same
/// weights give a loss curve within half precision's noise of f32's (f16 on the CPU, as above).
#[test]
fn mixed_precision_training_tracks_the_f32_loss_curve() {
    use kiln::train::optim::{AdamW, AdamWConfig};
    let dev = Device::Cpu;
    let dir = tiny_dir(&tiny_bert_config(), TinyLayout::Prefixed);
    let (ids, types, mask) = batch(&dev);
    let mut curves = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        let varmap = VarMap::new();
        let mut enc =
            BertEncoder::load_dir(dir.path(), &varmap, &dev, &LoadOptions::default()).unwrap();
        enc.set_compute_dtype(dtype);
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("all", 1e-3, 0.01, enc.named_trainable_vars().to_vec())
            .unwrap();
        let mut losses = Vec::new();
        for _ in 0..25 {
            let hidden = enc
                .forward(&ids, Some(&types), &mask, false)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            // Pull every position's state towards a fixed target pattern.
            let target = Tensor::arange(0f32, hidden.elem_count() as f32, &dev)
                .unwrap()
                .reshape(hidden.shape())
                .unwrap()
                .affine(0.37, 0.0)
                .unwrap()
                .sin()
                .unwrap();
            let loss = (hidden - target)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let grads = loss.backprop().unwrap();
            opt.clip_grad_norm(&grads, 1.0).unwrap();
            opt.step(&grads).unwrap();
        }
        curves.push(losses);
    }
    let (f32_curve, half_curve) = (&curves[0], &curves[1]);
    assert!(
        f32_curve[24] < 0.8 * f32_curve[0],
        "the loss must fall: {f32_curve:?}"
    );
    for (step, (a, b)) in f32_curve.iter().zip(half_curve).enumerate() {
        assert!(
            (a - b).abs() <= 0.02 * a.abs().max(1e-3),
            "step {step}: f32 {a} vs half {b}\n{f32_curve:?}\n{half_curve:?}"
        );
    }
}

/// Weights packed for inference (`pack_for_inference`, used by serving on AVX-512 and AVX2
/// CPUs) give
/// the same hidden states as the general path, for the full sequence and the first token;
/// training (a tracked gradient) keeps the general path and still gets every gradient.
#[test]
fn packed_inference_weights_give_the_same_outputs() {
    let dev = Device::Cpu;
    let dir = tiny_dir(&tiny_bert_config(), TinyLayout::Prefixed);
    let (ids, types, mask) = batch(&dev);
    let opts = LoadOptions {
        freeze_embeddings: true,
        freeze_layers: tiny_bert_config().num_hidden_layers,
        ..LoadOptions::default()
    };
    let plain = BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &opts).unwrap();
    let mut packed = BertEncoder::load_dir(dir.path(), &VarMap::new(), &dev, &opts).unwrap();
    let bytes = packed.pack_for_inference().unwrap();
    if kiln::nn::packed::PackedWeight::available() {
        assert!(
            bytes > 0,
            "the packed kernel runs here: the layers must be packed"
        );
    } else {
        assert_eq!(bytes, 0, "no packed kernel here: nothing is packed");
    }
    let a = plain.forward(&ids, Some(&types), &mask, false).unwrap();
    let b = packed.forward(&ids, Some(&types), &mask, false).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));
    let a = plain
        .forward_first_token(&ids, Some(&types), &mask)
        .unwrap();
    let b = packed
        .forward_first_token(&ids, Some(&types), &mask)
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));

    // A trainable encoder packed anyway still trains through the general path.
    let varmap = VarMap::new();
    let mut trainable =
        BertEncoder::load_dir(dir.path(), &varmap, &dev, &LoadOptions::default()).unwrap();
    trainable.pack_for_inference().unwrap();
    let hidden = trainable.forward(&ids, Some(&types), &mask, true).unwrap();
    let grads = hidden
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backprop()
        .unwrap();
    assert_eq!(
        without_gradient(&grads, trainable.named_trainable_vars()),
        Vec::<String>::new()
    );
}

/// Not a test: prints the packed kernel's time against the general product's (`Linear`) for
/// MiniLM's and a small decoder's shapes at a range of row counts, to place `MAX_ROWS` and
/// to compare the kernels (`KILN_SIMD=avx2` runs the AVX2 one on an AVX-512 CPU).
///
///     cargo test --release --test nn_bert -- --ignored --nocapture packed_products_timing
#[test]
#[ignore]
fn packed_products_timing() {
    use kiln::nn::layers::Linear;
    use kiln::nn::packed::PackedWeight;
    use std::time::Instant;
    let dev = Device::Cpu;
    println!("packed kernel available: {}", PackedWeight::available());
    for (n, k) in [(384, 384), (1536, 384), (384, 1536), (1024, 256)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.05, n, &dev).unwrap();
        let lin = Linear {
            name: "timing".into(),
            weight: w,
            bias: Some(b),
            lora: None,
        };
        let Some(packed) = PackedWeight::from_linear(&lin).unwrap() else {
            panic!("[{n}, {k}] did not pack");
        };
        for rows in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            if packed.apply(&x).unwrap().is_none() {
                println!("[{n:>4}, {k:>4}] rows {rows:>3}: the packed kernel does not take it");
                continue;
            }
            let time = |f: &dyn Fn() -> Tensor| {
                let _ = f();
                let reps = (2_000_000 / (rows * n * k / 64).max(1)).clamp(5, 2000);
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let t = Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(f());
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                best * 1e6
            };
            let general = time(&|| lin.forward(&x).unwrap());
            let fast = time(&|| packed.apply(&x).unwrap().unwrap());
            println!(
                "[{n:>4}, {k:>4}] rows {rows:>3}: general {general:>9.1} µs  packed {fast:>9.1} µs  ({:.2}×, {:.1} GFLOP/s)",
                general / fast,
                2.0 * (rows * n * k) as f64 / fast / 1e3
            );
        }
    }
}
