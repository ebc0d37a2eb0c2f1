//! The training engine on text, as a library: it learns, every strategy trains what it
//! should and nothing else, runs are reproducible, resuming continues the same run, stop
//! requests are honoured, and exported models reload with the same outputs.

mod train_support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use kiln::data::text::TextTokenizer;
use kiln::nn::classifier::SequenceClassifier;
use kiln::nn::tiny::TinyLayout;
use kiln::train::{StopRequest, TrainEvent, TrainOutcome};
use serde_json::json;
use train_support::*;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(layout: TinyLayout) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(&dir.path().join("base"), layout);
        sentiment_jsonl(&dir.path().join("train.jsonl"), 120, 1);
        sentiment_jsonl(&dir.path().join("valid.jsonl"), 40, 2);
        Fixture { dir }
    }
    fn p(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn job(&self, hp: serde_json::Value, seed: u64, work: &str) -> kiln::train::TrainingJob {
        job(
            &self.p("base"),
            &self.p("train.jsonl"),
            Some(&self.p("valid.jsonl")),
            &self.p(work),
            hp,
            seed,
        )
    }
}

fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

#[test]
fn full_fine_tuning_learns_a_task_that_needs_the_words() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let run = run(&f.job(
        json!({"n_epochs": 10, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3}),
        1,
        "a",
    ));
    let s = run.summary();
    assert!(s.metrics["valid_accuracy"] >= 0.9, "{:?}", s.metrics);
    assert_eq!(s.labels, ["negative", "positive"]);
    assert!(
        s.metrics.contains_key("valid_roc_auc"),
        "binary tasks report ROC-AUC"
    );
    let losses = run.losses();
    assert_eq!(losses.len() as u64, s.steps);
    assert!(losses.last().unwrap().1 < losses[0].1 * 0.5, "{losses:?}");
    // The chosen checkpoint is the best by valid_loss, and its figures come from that step.
    let evals: Vec<_> = run
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Evaluated(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 10, "one evaluation per epoch");
    let best = evals
        .iter()
        .min_by(|a, b| a.metrics["valid_loss"].total_cmp(&b.metrics["valid_loss"]))
        .unwrap();
    assert_eq!(s.selected_step, Some(best.step));
    assert_eq!(s.metrics, best.metrics);
    let details = &best.details;
    assert_eq!(details["confusion_matrix"].as_array().unwrap().len(), 2);
    assert!(details["per_class"][0]["f1"].is_number());
}

#[test]
fn the_exported_model_reloads_and_gives_the_evaluated_predictions() {
    let f = Fixture::new(TinyLayout::Prefixed);
    let run = run(&f.job(
        json!({"n_epochs": 6, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3}),
        3,
        "a",
    ));
    let s = run.summary();
    let model = SequenceClassifier::load_exported(&s.model_dir, &Device::Cpu).unwrap();
    assert_eq!(model.labels, s.labels);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["1"], "positive");
    assert!(s.model_dir.join("tokenizer.json").exists());
    let weights = load(&s.model_dir.join("model.safetensors"));
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.pooler.dense.weight",
        "classifier.weight",
        "classifier.bias",
    ] {
        assert!(weights.contains_key(name), "{name}");
    }
    // Accuracy of the reloaded model on the validation file equals the reported figure.
    let tok = TextTokenizer::load(&s.model_dir, s.hyperparameters.max_length as usize).unwrap();
    let lines = std::fs::read_to_string(f.p("valid.jsonl")).unwrap();
    let (mut right, mut n) = (0, 0);
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let b = tok.encode_batch(&[v["text"].as_str().unwrap()]).unwrap();
        let shape = (1, b.seq_len);
        let ids = Tensor::from_vec(b.input_ids, shape, &Device::Cpu).unwrap();
        let types = Tensor::from_vec(b.token_type_ids, shape, &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(b.attention_mask, shape, &Device::Cpu).unwrap();
        let logits = model.forward(&ids, Some(&types), &mask, false).unwrap();
        // Evaluation's path (the last layer for the first token alone) gives the same logits.
        let inference = model.forward_inference(&ids, Some(&types), &mask).unwrap();
        let diff = (&logits - &inference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "forward_inference differs by {diff}");
        let predicted = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0] as usize;
        right += usize::from(model.labels[predicted] == v["label"]);
        n += 1;
    }
    assert!((right as f64 / n as f64 - s.metrics["valid_accuracy"]).abs() < 1e-9);
}

#[test]
fn freeze_keeps_the_embeddings_and_lowest_layers_fixed() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let run = run(&f.job(json!({"strategy": "freeze", "freeze_layers": 1, "n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3}), 1, "a"));
    let base = load(&f.p("base/model.safetensors"));
    let out = load(&run.summary().model_dir.join("model.safetensors"));
    for (name, t) in &base {
        let exported = &out[&format!("bert.{name}")];
        let frozen = name.starts_with("embeddings.") || name.starts_with("encoder.layer.0.");
        if name.starts_with("pooler.") || name.contains("position_ids") {
            continue;
        }
        let d = max_diff(t, exported);
        if frozen {
            assert_eq!(d, 0.0, "{name} must not change");
        } else {
            assert!(d > 0.0, "{name} must train");
        }
    }
}

#[test]
fn lora_trains_adapters_only_and_exports_them_merged() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    // 20 epochs: at 10 the held-out accuracy of seeds 1-8 spread over 0.50-0.85 (under-trained,
    // so any change to the dropout draws moved it across the bar); at 20 it is 0.875-0.975.
    let run = run(&f.job(json!({"strategy": "lora", "lora_rank": 8, "n_epochs": 20, "batch_size": 8, "learning_rate": 1e-2, "head_learning_rate": 3e-3}), 1, "a"));
    let s = run.summary();
    assert!(s.metrics["valid_accuracy"] >= 0.75, "{:?}", s.metrics);
    let base = load(&f.p("base/model.safetensors"));
    let out = load(&s.model_dir.join("model.safetensors"));
    assert!(
        !out.keys().any(|k| k.contains("lora")),
        "adapters are merged on export"
    );
    for (name, t) in &base {
        if name.starts_with("pooler.") || name.contains("position_ids") {
            continue;
        }
        let d = max_diff(t, &out[&format!("bert.{name}")]);
        let adapted = name.ends_with("attention.self.query.weight")
            || name.ends_with("attention.self.value.weight");
        assert_eq!(d > 0.0, adapted, "{name}: changed = {}", d > 0.0);
    }
}

#[test]
fn head_only_encodes_each_example_once_and_trains_only_the_head_of_a_fine_tuned_base() {
    // Transfer learning inside kiln: a model fine-tuned on this task is a base whose frozen
    // features already separate the classes; a fresh head on them learns quickly.
    let f = Fixture::new(TinyLayout::Unprefixed);
    let tuned = run(&f.job(
        json!({"n_epochs": 10, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3}),
        1,
        "tuned",
    ));
    let tuned_dir = tuned.summary().model_dir.clone();
    let mut job = f.job(
        json!({"strategy": "head_only", "n_epochs": 10, "batch_size": 16}),
        1,
        "head",
    );
    job.base_model = tuned_dir.clone();
    let run = run(&job);
    let s = run.summary();
    assert!(run.events.iter().any(|e| matches!(e, TrainEvent::Message { text: m } if m.starts_with("Feature cache: encoded 160 examples once"))));
    assert!(s.metrics["valid_accuracy"] >= 0.9, "{:?}", s.metrics);
    let base = load(&tuned_dir.join("model.safetensors"));
    let out = load(&s.model_dir.join("model.safetensors"));
    for (name, t) in &base {
        if name.starts_with("bert.embeddings.") || name.starts_with("bert.encoder.") {
            assert_eq!(max_diff(t, &out[name]), 0.0, "{name}");
        }
    }
}

#[test]
fn multi_label_classification_reports_per_label_figures() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("base"), TinyLayout::Unprefixed);
    multi_label_jsonl(&dir.path().join("train.jsonl"), 160, 1);
    let run = run(&job(
        &base,
        &dir.path().join("train.jsonl"),
        None,
        &dir.path().join("w"),
        json!({"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3}),
        1,
    ));
    let s = run.summary();
    assert_eq!(s.task, "multi_label_classification");
    assert_eq!(s.labels, ["complaint", "neutral", "praise"]);
    for key in [
        "valid_loss",
        "valid_accuracy",
        "valid_micro_f1",
        "valid_macro_f1",
        "valid_label_accuracy",
    ] {
        assert!(s.metrics.contains_key(key), "{key}");
    }
    assert!(s.metrics["valid_label_accuracy"] > 0.8, "{:?}", s.metrics);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["problem_type"], "multi_label_classification");
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let hp =
        json!({"n_epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3});
    let a = run(&f.job(hp.clone(), 5, "a"));
    let b = run(&f.job(hp.clone(), 5, "b"));
    let c = run(&f.job(hp, 6, "c"));
    assert_eq!(a.losses(), b.losses());
    assert_eq!(a.summary().metrics, b.summary().metrics);
    assert_ne!(a.losses(), c.losses());
}

#[test]
fn an_interrupted_and_resumed_run_matches_an_uninterrupted_one() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let hp = json!({"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3, "checkpoint_every_steps": 4, "eval_every_steps": 6});
    let whole = run(&f.job(hp.clone(), 9, "whole"));

    // Stop after step 10 (mid-epoch), keeping a checkpoint; then resume from it.
    let first = run_with(&f.job(hp.clone(), 9, "parts"), |step, stop| {
        if step == 10 {
            stop.request(StopRequest::CheckpointAndStop);
        }
    });
    let TrainOutcome::Stopped {
        step: 10,
        checkpoint: Some(checkpoint),
    } = first.outcome.clone()
    else {
        panic!("expected a stop with a checkpoint at step 10");
    };
    let mut resumed_job = f.job(hp, 9, "parts");
    resumed_job.resume_from = Some(checkpoint);
    let second = run(&resumed_job);

    let mut stitched = first.losses();
    stitched.extend(second.losses());
    assert_eq!(
        stitched,
        whole.losses(),
        "same steps, same losses, bit for bit"
    );
    assert_eq!(second.summary().metrics, whole.summary().metrics);
    assert_eq!(
        second.summary().selected_step,
        whole.summary().selected_step
    );
    let a = load(&whole.summary().model_dir.join("model.safetensors"));
    let b = load(&second.summary().model_dir.join("model.safetensors"));
    for (name, t) in &a {
        assert_eq!(max_diff(t, &b[name]), 0.0, "{name}");
    }
}

#[test]
fn a_cancel_stops_before_the_next_step_without_a_checkpoint() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let run = run_with(
        &f.job(json!({"n_epochs": 5, "batch_size": 8}), 1, "a"),
        |step, stop| {
            if step == 3 {
                stop.request(StopRequest::Cancel);
            }
        },
    );
    assert!(matches!(
        run.outcome,
        TrainOutcome::Stopped {
            step: 3,
            checkpoint: None
        }
    ));
    assert_eq!(run.losses().len(), 3);
}

#[test]
fn early_stopping_ends_the_run_when_the_metric_stalls() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    // A learning rate this small cannot move valid_loss much: patience 1 ends it early... but
    // accuracy as the selected metric stalls at once.
    let run = run(&f.job(json!({"n_epochs": 20, "batch_size": 16, "learning_rate": 1e-9, "head_learning_rate": 1e-9, "early_stopping_patience": 2, "select_metric": "valid_accuracy"}), 1, "a"));
    let s = run.summary();
    assert!(s.steps < 20 * 8, "stopped after {} steps", s.steps);
    assert!(
        run.events.iter().any(
            |e| matches!(e, TrainEvent::Message { text: m } if m.starts_with("Early stopping"))
        )
    );
}

#[test]
fn domain_adaptation_lowers_the_masked_token_loss_on_held_out_text() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("base"), TinyLayout::Prefixed);
    domain_jsonl(&dir.path().join("domain.jsonl"), 200, 4);
    let run = run(&job(
        &base,
        &dir.path().join("domain.jsonl"),
        None,
        &dir.path().join("w"),
        json!({"n_epochs": 6, "batch_size": 16, "learning_rate": 2e-3}),
        1,
    ));
    let s = run.summary();
    assert_eq!(s.task, "domain_adaptation");
    let before = s
        .baseline_metrics
        .as_ref()
        .expect("measured before training");
    assert!(
        s.metrics["valid_loss"] < before["valid_loss"] * 0.8,
        "before {before:?} after {:?}",
        s.metrics
    );
    assert!(s.metrics["valid_masked_token_accuracy"] > before["valid_masked_token_accuracy"]);
    // The result is a base model: a classifier trains on it.
    let adapted = s.model_dir.clone();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapted.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    sentiment_jsonl(&dir.path().join("train.jsonl"), 60, 1);
    let next = train_support::run(&job(
        &adapted,
        &dir.path().join("train.jsonl"),
        None,
        &dir.path().join("w2"),
        json!({"n_epochs": 1, "batch_size": 8}),
        1,
    ));
    assert_eq!(next.summary().task, "text_classification");
}

#[test]
fn a_model_without_an_mlm_head_gets_a_fresh_one_for_domain_adaptation() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("base"), TinyLayout::Unprefixed);
    domain_jsonl(&dir.path().join("domain.jsonl"), 60, 4);
    let run = run(&job(
        &base,
        &dir.path().join("domain.jsonl"),
        None,
        &dir.path().join("w"),
        json!({"n_epochs": 1, "batch_size": 16}),
        1,
    ));
    assert!(
        run.events.iter().any(
            |e| matches!(e, TrainEvent::Message { text: m } if m.contains("no masked-LM head"))
        )
    );
    let out = load(&run.summary().model_dir.join("model.safetensors"));
    assert!(out.contains_key("cls.predictions.transform.dense.weight"));
}

#[test]
fn bad_data_and_bad_settings_are_user_errors_that_name_the_problem() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let stop = kiln::train::StopSignal::default();
    let mut ignore = |_: &TrainEvent| {};
    let err = kiln::train::run(
        &f.job(json!({"max_length": 1000}), 1, "a"),
        &mut ignore,
        &stop,
    )
    .unwrap_err();
    assert!(err.is_user_error());
    assert!(err.to_string().contains("max_length"), "{err}");

    std::fs::write(
        f.p("valid.jsonl"),
        "{\"text\": \"good\", \"label\": \"neutral\"}\n",
    )
    .unwrap();
    let err = kiln::train::run(&f.job(json!({}), 1, "b"), &mut ignore, &stop).unwrap_err();
    assert!(err.is_user_error());
    assert!(err.to_string().contains("'neutral'"), "{err}");

    std::fs::write(f.p("chat.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n".repeat(12)).unwrap();
    let mut chat = f.job(json!({}), 1, "c");
    chat.training_file = f.p("chat.jsonl");
    let err = kiln::train::run(&chat, &mut ignore, &stop).unwrap_err();
    assert!(
        err.is_user_error() && err.to_string().contains("chat"),
        "{err}"
    );
}

#[test]
fn gradient_accumulation_matches_the_larger_batch() {
    // Without dropout, two accumulated micro-batches of 4 are one batch of 8.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    kiln::nn::tiny::write_tiny_bert_with(
        &base,
        &kiln::nn::tiny::tiny_bert_config(),
        7,
        TinyLayout::Unprefixed,
    )
    .unwrap();
    let words: Vec<&str> = POSITIVE
        .iter()
        .chain(&NEGATIVE)
        .chain(&FILLER)
        .copied()
        .collect();
    kiln::nn::tiny::write_tiny_tokenizer(&base, &words).unwrap();
    sentiment_jsonl(&dir.path().join("train.jsonl"), 64, 1);
    let hp = |batch: u32, accumulation: u32| json!({"n_epochs": 1, "batch_size": batch, "gradient_accumulation_steps": accumulation, "learning_rate": 3e-3, "head_learning_rate": 3e-3});
    let train = dir.path().join("train.jsonl");
    let big = run(&job(
        &base,
        &train,
        None,
        &dir.path().join("a"),
        hp(8, 1),
        3,
    ));
    let accumulated = run(&job(
        &base,
        &train,
        None,
        &dir.path().join("b"),
        hp(4, 2),
        3,
    ));
    let (a, b) = (big.losses(), accumulated.losses());
    assert_eq!(a.len(), b.len(), "the same number of optimizer steps");
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "step {step}: {x} vs {y}");
    }
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let base = f.p("base");
    let all = load(&base.join("model.safetensors"));
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut index = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, base.join(file)).unwrap();
        for n in part {
            index.insert((*n).clone(), json!(file));
        }
    }
    std::fs::write(
        base.join("model.safetensors.index.json"),
        json!({"weight_map": index}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(base.join("model.safetensors")).unwrap();

    let described = kiln::models::describe("tiny", &base).unwrap();
    let expected: u64 = all.values().map(|t| t.elem_count() as u64).sum();
    assert_eq!(described.parameters, expected);
    let run = run(&f.job(json!({"n_epochs": 1, "batch_size": 16}), 1, "a"));
    assert_eq!(run.summary().steps, 8);
}

/// `mixed_precision`: `auto` is fp32 on the CPU and the run records it; `bf16` on a device
/// without native bf16 (the CPU) is refused as a user error naming the setting, before any
/// step (the bf16 arithmetic itself is specified in tests/nn_bert.rs and nn_decoder.rs).
#[test]
fn mixed_precision_is_fp32_on_the_cpu_and_bf16_is_refused_there() {
    let f = Fixture::new(TinyLayout::Unprefixed);
    let hp = |precision: &str| {
        json!({"n_epochs": 1, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3,
               "mixed_precision": precision})
    };
    let auto = run(&f.job(hp("auto"), 1, "auto"));
    let recorded = auto
        .events
        .iter()
        .find_map(|e| match e {
            TrainEvent::Started {
                hyperparameters, ..
            } => Some(hyperparameters.mixed_precision),
            _ => None,
        })
        .unwrap();
    assert_eq!(recorded, Some(kiln::train::spec::Precision::Fp32));
    let stop = kiln::train::StopSignal::default();
    let err = kiln::train::run(&f.job(hp("bf16"), 1, "bf16"), &mut |_| {}, &stop).unwrap_err();
    assert!(err.is_user_error(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("mixed_precision") && text.contains("bf16"),
        "{text}"
    );
    assert!(!f.p("bf16/model").exists(), "nothing was written");
}
