//! `kiln train` as a person runs it, the real pretrained all-MiniLM-L6-v2 fine-tuned to a
//! useful accuracy, and exported models checked against Hugging Face transformers.
//!
//! The MiniLM tests need the model: `scripts/fetch-minilm.sh DIR` and
//! `KILN_TEST_MINILM=DIR/sentence-transformers/all-MiniLM-L6-v2` (`.ci/run` does both).
//! The transformers check needs `pip install -r tests/python/requirements.txt`.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use kiln::data::text::TextTokenizer;
use kiln::nn::classifier::SequenceClassifier;
use kiln::nn::tiny::TinyLayout;
use serde_json::{Value, json};
use train_support::*;

fn kiln_train(args: &[&str]) -> (std::process::Output, Option<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("train")
        .args(args)
        .output()
        .expect("run kiln train");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    (out, last)
}

fn minilm() -> PathBuf {
    let dir = std::env::var("KILN_TEST_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/kiln-models/sentence-transformers/all-MiniLM-L6-v2")
        });
    assert!(
        dir.join("model.safetensors").exists(),
        "the real all-MiniLM-L6-v2 is needed at {}: run scripts/fetch-minilm.sh ~/.cache/kiln-models (or set KILN_TEST_MINILM)",
        dir.display()
    );
    dir
}

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Writes kiln's logits for `texts` next to the ids it used, and has transformers compare.
/// The exported classifier's logits for `texts` (one padded batch), and the batch.
fn exported_logits(
    model_dir: &Path,
    texts: &[&str],
    max_length: usize,
) -> (Tensor, kiln::data::text::EncodedBatch) {
    let model = SequenceClassifier::load_exported(model_dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::load(model_dir, max_length).unwrap();
    let b = tok.encode_batch(texts).unwrap();
    let shape = (b.batch, b.seq_len);
    let t = |v: &Vec<u32>| Tensor::from_vec(v.clone(), shape, &Device::Cpu).unwrap();
    let logits = model
        .forward(
            &t(&b.input_ids),
            Some(&t(&b.token_type_ids)),
            &t(&b.attention_mask),
            false,
        )
        .unwrap();
    (logits, b)
}

fn check_with_transformers(model_dir: &Path, texts: &[&str], max_length: usize) {
    let (logits, b) = exported_logits(model_dir, texts, max_length);
    let rows = |v: &Vec<u32>| v.chunks(b.seq_len).map(<[u32]>::to_vec).collect::<Vec<_>>();
    let cases = json!({
        "texts": texts,
        "input_ids": rows(&b.input_ids),
        "attention_mask": rows(&b.attention_mask),
        "token_type_ids": rows(&b.token_type_ids),
        "logits": logits.to_vec2::<f32>().unwrap(),
    });
    let path = model_dir.with_extension("cases.json");
    std::fs::write(&path, cases.to_string()).unwrap();
    let out = Command::new("python3")
        .arg(format!(
            "{}/scripts/check_hf_export.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(model_dir)
        .arg(&path)
        .output()
        .expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "pip install -r tests/python/requirements.txt: {stderr}"
    );
    assert!(
        out.status.success(),
        "transformers disagrees:\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn kiln_train_shows_progress_writes_the_model_and_ends_with_a_json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("base"), TinyLayout::Prefixed);
    sentiment_jsonl(&dir.path().join("train.jsonl"), 80, 1);
    let out_dir = dir.path().join("out");
    let (out, summary) = kiln_train(&[
        "--model",
        base.to_str().unwrap(),
        "--training-file",
        dir.path().join("train.jsonl").to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--set",
        "n_epochs=2",
        "--set",
        "batch_size=8",
        "--set",
        "strategy=freeze",
        "--set",
        "lr_scheduler=cosine",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = summary.expect("the last stdout line is JSON");
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["task"], "text_classification");
    assert!(summary["train_examples_per_second"].as_f64().unwrap() > 0.0);
    assert!(summary["metrics"]["valid_accuracy"].is_number());
    assert_eq!(summary["hyperparameters"]["strategy"], "freeze");
    assert_eq!(
        summary["hyperparameters"]["freeze_layers"], 1,
        "auto: half the layers"
    );
    assert!(out_dir.join("model.safetensors").exists() && out_dir.join("config.json").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("chose n_epochs") || stderr.contains("chose max_length"),
        "the chosen values are shown: {stderr}"
    );
}

#[test]
fn kiln_train_rejects_bad_settings_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("base"), TinyLayout::Prefixed);
    sentiment_jsonl(&dir.path().join("train.jsonl"), 20, 1);
    for (set, named) in [
        ("n_epochs=0", "n_epochs"),
        ("strategy=partial", "strategy"),
        ("epochs=3", "epochs"),
    ] {
        let (out, _) = kiln_train(&[
            "--model",
            base.to_str().unwrap(),
            "--training-file",
            dir.path().join("train.jsonl").to_str().unwrap(),
            "--output",
            dir.path().join("out").to_str().unwrap(),
            "--set",
            set,
        ]);
        assert!(!out.status.success(), "{set}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{set}: {stderr}");
    }
}

/// `kiln train` of a tiny BERT (written to `dir/base`) on 60 sentiment lines with `sets`
/// (`KEY=VALUE`) into `dir/out`: (the base, the exported model).
fn train_tiny_classifier(dir: &Path, sets: &[&str]) -> (PathBuf, PathBuf) {
    let base = tiny_model(&dir.join("base"), TinyLayout::Prefixed);
    sentiment_jsonl(&dir.join("train.jsonl"), 60, 1);
    let out_dir = dir.join("out");
    let mut args = vec![
        "--model".to_owned(),
        base.to_str().unwrap().to_owned(),
        "--training-file".to_owned(),
        dir.join("train.jsonl").to_str().unwrap().to_owned(),
        "--output".to_owned(),
        out_dir.to_str().unwrap().to_owned(),
    ];
    for set in sets {
        args.extend(["--set".to_owned(), (*set).to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, _) = kiln_train(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (base, out_dir)
}

#[test]
fn an_exported_tiny_classifier_gives_transformers_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out_dir) = train_tiny_classifier(dir.path(), &["n_epochs=1", "strategy=lora"]);
    check_with_transformers(
        &out_dir,
        &["the movie was good", "awful plot really", "great"],
        32,
    );
}

#[test]
fn minilm_fine_tunes_to_over_90_percent_on_held_out_topics_and_exports_for_transformers() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("topics");
    let (out, summary) = kiln_train(&[
        "--model",
        model.to_str().unwrap(),
        "--training-file",
        &data("topics-train.jsonl"),
        "--validation-file",
        &data("topics-valid.jsonl"),
        "--output",
        out_dir.to_str().unwrap(),
        "--set",
        "n_epochs=2",
        "--set",
        "batch_size=16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = summary.unwrap();
    let accuracy = summary["metrics"]["valid_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}: {summary}");
    check_with_transformers(
        &out_dir,
        &[
            "The goalkeeper saved a penalty in the last minute.",
            "Preheat the oven and bake the bread.",
            "A storm is coming tonight.",
        ],
        128,
    );
}

fn kiln_predict(args: &[&str], stdin: Option<&str>) -> (std::process::Output, Vec<Value>) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("predict")
        .args(args)
        .env("KILN_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln predict");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, rows)
}

#[test]
fn kiln_predict_runs_exported_models_through_the_serving_engine_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let (base, out_dir) = train_tiny_classifier(dir.path(), &["n_epochs=2"]);
    let model = out_dir.to_str().unwrap();

    // A classifier by default: each text's label scores are the softmax of the exported
    // model's logits.
    let texts = ["the movie was good", "awful plot really", "great"];
    let (out, rows) = kiln_predict(&["--model", model, texts[0], texts[1], texts[2]], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rows.len(), 3, "one line per input");
    let labels = SequenceClassifier::load_exported(&out_dir, &Device::Cpu)
        .unwrap()
        .labels;
    for (text, row) in texts.iter().zip(&rows) {
        let (logits, b) = exported_logits(&out_dir, &[*text], 32);
        let probs = candle_nn::ops::softmax(&logits, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, label) in labels.iter().enumerate() {
            let got = row["scores"][label].as_f64().unwrap();
            assert!((got - f64::from(probs[0][i])).abs() < 1e-4, "{text}: {row}");
        }
        assert_eq!(row["score"], row["scores"][row["label"].as_str().unwrap()]);
        assert_eq!(row["prompt_tokens"], json!(b.input_ids.len()));
    }
    // Inputs on standard input, one per line, give the same answers. The engine's lanes may
    // cut the batch differently from one run to the next (how many are idle when it arrives),
    // and a text padded to a longer neighbour may differ in the last bits of its scores.
    let (_, from_stdin) = kiln_predict(
        &["--model", model],
        Some(&format!("{}\n", texts.join("\n"))),
    );
    assert_eq!(from_stdin.len(), rows.len());
    for (a, b) in from_stdin.iter().zip(&rows) {
        assert_eq!(a["label"], b["label"], "{a} vs {b}");
        assert_eq!(a["prompt_tokens"], b["prompt_tokens"], "{a} vs {b}");
        for label in &labels {
            let (x, y) = (a["scores"][label].as_f64(), b["scores"][label].as_f64());
            assert!(
                x.zip(y).is_some_and(|(x, y)| (x - y).abs() < 1e-6),
                "{label}: {a} vs {b}"
            );
        }
    }

    // A multi-label classifier: independent sigmoid scores, and every label at 0.5 or more.
    let multi = dir.path().join("multi");
    std::fs::create_dir_all(&multi).unwrap();
    multi_label_jsonl(&multi.join("train.jsonl"), 80, 3);
    let multi_out = multi.join("out");
    let (out, _) = kiln_train(&[
        "--model",
        base.to_str().unwrap(),
        "--training-file",
        multi.join("train.jsonl").to_str().unwrap(),
        "--output",
        multi_out.to_str().unwrap(),
        "--set",
        "n_epochs=3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, rows) = kiln_predict(
        &[
            "--model",
            multi_out.to_str().unwrap(),
            "the film was good and awful",
            "the plot",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in &rows {
        let scores = row["scores"].as_object().unwrap();
        assert_eq!(scores.len(), 3, "{row}");
        let chosen: Vec<&str> = scores
            .iter()
            .filter(|(_, s)| s.as_f64().unwrap() >= 0.5)
            .map(|(l, _)| l.as_str())
            .collect();
        let listed: Vec<&str> = row["labels"]
            .as_array()
            .unwrap_or_else(|| panic!("a multi-label row lists its labels: {row}"))
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        assert_eq!(listed.len(), chosen.len(), "{row}");
        assert!(listed.iter().all(|l| chosen.contains(l)), "{row}");
    }
    let single: Vec<f64> = rows[0]["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert!(
        (single.iter().sum::<f64>() - 1.0).abs() > 1e-3,
        "sigmoid scores, not a softmax: {single:?}"
    );

    // Embeddings from any encoder.
    let (out, rows) = kiln_predict(
        &["--model", base.to_str().unwrap(), "--task", "embed", "good"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        rows[0]["embedding"].as_array().unwrap().len(),
        tiny_config().hidden_size
    );

    // A decoder generates (greedy, at most --max-tokens tokens).
    let decoder = dir.path().join("decoder");
    kiln::nn::tiny::write_tiny_decoder(&decoder, "qwen2", 5).unwrap();
    let generate = [
        "--model",
        decoder.to_str().unwrap(),
        "--max-tokens",
        "4",
        "Hello there",
    ];
    let (out, rows) = kiln_predict(&generate, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rows[0]["completion_tokens"].as_u64().unwrap() <= 4,
        "{}",
        rows[0]
    );
    assert!(rows[0]["finish_reason"].is_string(), "{}", rows[0]);
    let (_, again) = kiln_predict(&generate, None);
    assert_eq!(again, rows, "greedy decoding repeats");

    // An image classifier (a base ResNet with labels) by default for image files.
    let resnet = dir.path().join("resnet");
    kiln::nn::resnet::write_tiny_resnet(&resnet, &kiln::nn::resnet::tiny_resnet_config(), 5)
        .unwrap();
    let picture = dir.path().join("picture.png");
    image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    })
    .save(&picture)
    .unwrap();
    let (out, rows) = kiln_predict(
        &[
            "--model",
            resnet.to_str().unwrap(),
            picture.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = kiln::serve::ImageModel::load(&resnet, &Device::Cpu).unwrap();
    let pixels = served.prepare(&std::fs::read(&picture).unwrap()).unwrap();
    let probs = served.classify(pixels, 1).unwrap();
    assert_eq!(rows[0]["image"], json!(picture.to_str().unwrap()));
    for (label, p) in served.labels.iter().zip(&probs[0]) {
        let got = rows[0]["scores"][label].as_f64().unwrap();
        assert!((got - f64::from(*p)).abs() < 1e-5, "{label}: {}", rows[0]);
    }
    let not_an_image = dir.path().join("train.jsonl");

    // What cannot work says why, with a failing exit status.
    for (args, says) in [
        (
            vec!["--model", model, "--task", "generate", "hi"],
            "does not generate text",
        ),
        (
            vec!["--model", model, "--task", "image", "missing.png"],
            "missing.png",
        ),
        (vec!["--model", "no/such-model", "hi"], "no/such-model"),
        (vec!["--model", model], "no inputs"),
        (
            vec![
                "--model",
                resnet.to_str().unwrap(),
                not_an_image.to_str().unwrap(),
            ],
            "input[0]",
        ),
    ] {
        let (out, rows) = kiln_predict(&args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && rows.is_empty(), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// `kiln check-device`: on the CPU (candle's ops, the path a GPU takes, against kiln's
/// kernels) every family passes, with a line each and a JSON summary last; a GPU this build
/// cannot open is refused with the reason and a failing status.
#[test]
fn kiln_check_device_compares_every_family_and_ends_with_a_json_summary() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["check-device", "--device", "cpu"])
        .output()
        .expect("run kiln check-device");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["device"], "cpu");
    assert_eq!(summary["passed"], true);
    let checks = summary["checks"].as_array().unwrap();
    let names: Vec<String> = checks
        .iter()
        .map(|c| {
            format!(
                "{}-{}",
                c["family"].as_str().unwrap(),
                c["dtype"].as_str().unwrap()
            )
        })
        .collect();
    for family in [
        "bert-f32",
        "bert-f16",
        "decoder-f32",
        "decoder-lora-f32",
        "resnet-f32",
        "vit-f32",
    ] {
        assert!(
            names.iter().any(|n| n == family),
            "{family} missing from {names:?}"
        );
    }
    for c in checks {
        assert!(c["compared"].as_u64().unwrap() > 0, "{c}");
        assert!(
            c["worst"].as_f64().unwrap() <= c["tolerance"].as_f64().unwrap(),
            "{c}"
        );
    }
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("passed ")).count(),
        checks.len()
    );

    if !kiln::device::CUDA_BUILT {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["check-device", "--device", "cuda:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("--features cuda"), "{stderr}");
    }
}
