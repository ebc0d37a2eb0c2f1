//! Serving over real HTTP: the models API, classifications and embeddings checked against
//! Hugging Face (transformers, sentence-transformers) on the same weights, a model trained by
//! a job while the server runs served at once (and its checkpoints), deletion, the memory-
//! bounded cache, back-pressure, deadlines and every kind of bad input.

mod common;
mod jobs_support;
mod serve_support;
mod train_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::{TestApp, assert_error_shape};
use jobs_support::{delete, post_json, wait_for};
use kiln::nn::tiny::TinyLayout;
use serde_json::{Value, json};
use serve_support::{embeddings_of, matrix, max_diff, reference, scores_of, write_pooling};

const BASE: &str = "kiln-test/tiny-bert";

fn texts() -> Vec<&'static str> {
    vec![
        "the movie was really good",
        "awful plot",
        "this film is quite boring and the actors are poor",
        "love",
        "a story",
    ]
}

async fn upload_sentiment(app: &TestApp, key: &str, n: usize, seed: u64) -> String {
    let path = app.data_dir.path().join(format!("data-{n}-{seed}.jsonl"));
    train_support::sentiment_jsonl(&path, n, seed);
    let res = app
        .upload(
            key,
            "fine-tune",
            "sentiment.jsonl",
            std::fs::read(&path).unwrap(),
        )
        .await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.wait_validated(key, &id).await["status"], "processed");
    id
}

fn model_path(id: &str) -> String {
    format!("/v1/models/{id}")
}

#[tokio::test]
async fn a_model_trained_while_the_server_runs_is_served_at_once_and_matches_transformers() {
    let app = TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.jobs.poll_interval = Duration::from_millis(300);
    })
    .await;
    let key = app.key_for("acme").await;

    // Before any job: the base model is listed, the project has no fine-tuned model.
    let (status, list) = app.get_json(&key, "/v1/models").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [BASE]);
    let (status, base) = app.get_json(&key, &model_path(BASE)).await;
    assert_eq!(status, 200, "{base}");
    assert_eq!(base["object"], "model");
    assert_eq!(base["owned_by"], "kiln");
    assert_eq!(base["kind"], "base");
    assert_eq!(base["task"], "embeddings");

    let train = upload_sentiment(&app, &key, 120, 1).await;
    let valid = upload_sentiment(&app, &key, 40, 2).await;
    let (status, job) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": BASE, "training_file": train, "validation_file": valid, "suffix": "sentiment",
            "seed": 11,
            "method": {"type": "supervised", "supervised": {"hyperparameters":
                {"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3,
                 "checkpoint_every_steps": 40}}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    let job = wait_for(&app, &key, &job_id, Duration::from_secs(180), |j| {
        ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let ft = job["fine_tuned_model"].as_str().unwrap().to_owned();

    // Listed with what it is, without a restart.
    let (_, list) = app.get_json(&key, "/v1/models").await;
    let data = list["data"].as_array().unwrap();
    let model = data
        .iter()
        .find(|m| m["id"] == ft.as_str())
        .expect("listed");
    assert_eq!(model["kind"], "fine_tuned");
    assert_eq!(model["owned_by"], "acme");
    assert_eq!(model["base"], BASE);
    assert_eq!(model["job"], job_id.as_str());
    assert_eq!(model["task"], "text_classification");
    assert_eq!(model["labels"], json!(["negative", "positive"]));
    assert!(model["metrics"]["valid_accuracy"].is_number(), "{model}");
    let checkpoints: Vec<&Value> = data.iter().filter(|m| m["kind"] == "checkpoint").collect();
    assert!(!checkpoints.is_empty(), "{list}");
    for c in &checkpoints {
        assert!(
            c["id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{ft}:ckpt-step-"))
        );
        assert!(c["step"].as_i64().unwrap() > 0);
    }
    let (status, got) = app.get_json(&key, &model_path(&ft)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], ft.as_str());
    // Another project sees neither the model nor its checkpoints.
    let other = app.key_for("globex").await;
    let (status, body) = app.get_json(&other, &model_path(&ft)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post_json(
        &app,
        &other,
        "/v1/classifications",
        json!({"model": ft, "input": "good"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Classifications equal transformers' on the exported model.
    let (status, out) = post_json(
        &app,
        &key,
        "/v1/classifications",
        json!({"model": ft, "input": texts()}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["object"], "list");
    assert_eq!(out["model"], ft.as_str());
    let items = out["data"].as_array().unwrap();
    assert_eq!(items.len(), texts().len());
    let mut tokens = 0;
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["index"], i);
        let scores = item["scores"].as_object().unwrap();
        let sum: f64 = scores.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{item}");
        let best = scores
            .iter()
            .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
            .unwrap();
        assert_eq!(item["label"], best.0.as_str());
        assert!(item["prompt_tokens"].as_u64().unwrap() >= 3);
        tokens += item["prompt_tokens"].as_u64().unwrap();
    }
    assert_eq!(out["usage"]["prompt_tokens"], tokens);
    assert_eq!(items[0]["label"], "positive", "{out} {job}");
    assert_eq!(items[1]["label"], "negative", "{out}");

    let exported = app.data_dir.path().join("artifacts/models").join(&job_id);
    assert!(exported.join("config.json").is_file());
    let hf = reference(&exported, "classify", &texts());
    let labels: Vec<String> = serde_json::from_value(hf["labels"].clone()).unwrap();
    let diff = max_diff(&scores_of(&out, &labels), &matrix(&hf["scores"]));
    assert!(diff < 1e-4, "kiln and transformers differ by {diff}");

    // A single string works too, and a checkpoint is a servable model.
    let (status, one) = post_json(
        &app,
        &key,
        "/v1/classifications",
        json!({"model": ft, "input": "good"}),
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    let ckpt = checkpoints[0]["id"].as_str().unwrap().to_owned();
    let (status, body) = post_json(
        &app,
        &key,
        "/v1/classifications",
        json!({"model": ckpt, "input": ["good", "bad"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, got) = app.get_json(&key, &model_path(&ckpt)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["kind"], "checkpoint");
    assert_eq!(got["loaded"], true, "{got}");

    // Its encoder embeds, mean-pooled (no sentence-transformers config in the base).
    let (status, emb) = post_json(
        &app,
        &key,
        "/v1/embeddings",
        json!({"model": ft, "input": texts()}),
    )
    .await;
    assert_eq!(status, 200, "{emb}");
    let hf = reference(&exported, "embed", &texts());
    assert_eq!(hf["pooling"], "mean");
    let diff = max_diff(&embeddings_of(&emb), &matrix(&hf["embeddings"]));
    assert!(
        diff < 1e-4,
        "embeddings differ from sentence-transformers by {diff}"
    );

    // Deleting: base models and checkpoints are refused; the model goes, with its files.
    let (status, body) = delete(&app, &key, &model_path(BASE)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(assert_error_shape(&body)["param"], "model");
    let (status, body) = delete(&app, &key, &model_path(&ckpt)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = delete(&app, &other, &model_path(&ft)).await;
    assert_eq!(status, 404, "another project cannot delete it: {body}");
    // Deleted while requests are using it: those finish (200); later ones get 404; none 500.
    let heavy: Vec<String> = (0..64).map(|_| vec!["good movie"; 30].join(" ")).collect();
    let in_flight = (0..6).map(|_| {
        post_json(
            &app,
            &key,
            "/v1/classifications",
            json!({"model": ft, "input": heavy, "truncate": true}),
        )
    });
    let ((status, body), answers) = tokio::join!(
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            delete(&app, &key, &model_path(&ft)).await
        },
        futures_util::future::join_all(in_flight)
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"id": ft, "object": "model", "deleted": true}));
    for (status, answer) in &answers {
        assert!(
            *status == 200 || *status == 404,
            "a request racing the delete got {status}: {answer}"
        );
        if *status == 200 {
            assert_eq!(answer["data"].as_array().unwrap().len(), 64);
        }
    }
    eprintln!(
        "requests racing the delete: {} answered, {} got 404",
        answers.iter().filter(|(s, _)| *s == 200).count(),
        answers.iter().filter(|(s, _)| *s == 404).count()
    );
    assert!(!exported.exists(), "the model's files are removed");
    let (status, _) = app.get_json(&key, &model_path(&ft)).await;
    assert_eq!(status, 404);
    let (status, body) = delete(&app, &key, &model_path(&ft)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post_json(
        &app,
        &key,
        "/v1/classifications",
        json!({"model": ft, "input": "good"}),
    )
    .await;
    assert_eq!(
        status, 404,
        "a deleted model is not served from the cache: {body}"
    );
    let (_, list) = app.get_json(&key, "/v1/models").await;
    assert!(
        !list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == ft.as_str())
    );
    // The job still names it; a new job cannot start from it.
    let (_, job) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{job_id}"))
        .await;
    assert_eq!(job["fine_tuned_model"], ft.as_str());
    app.shutdown().await;
}

/// Tiny encoders with each sentence-transformers pooling set-up.
fn pooling_models(models: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for (name, modes, normalize) in [
        ("mean-normalized", vec!["mean"], true),
        ("cls", vec!["cls"], false),
        ("max", vec!["max"], false),
        ("cls-mean", vec!["cls", "mean"], true),
        ("plain", vec![], false),
    ] {
        let id = format!("pooling/{name}");
        let dir = train_support::tiny_model(&models.join(&id), TinyLayout::Unprefixed);
        if !modes.is_empty() {
            write_pooling(&dir, 32, &modes, normalize);
        }
        out.push((id, dir));
    }
    out
}

#[tokio::test]
async fn embeddings_are_pooled_as_sentence_transformers_says_and_match_it() {
    let mut dirs = Vec::new();
    let app = TestApp::spawn_with(|s| dirs = pooling_models(&s.models_dir)).await;
    let key = app.key_for("acme").await;
    for (id, dir) in &dirs {
        let (status, float) = post_json(
            &app,
            &key,
            "/v1/embeddings",
            json!({"model": id, "input": texts(), "encoding_format": "float"}),
        )
        .await;
        assert_eq!(status, 200, "{id}: {float}");
        assert_eq!(float["model"], id.as_str());
        let ours = embeddings_of(&float);
        let hf = reference(dir, "embed", &texts());
        let diff = max_diff(&ours, &matrix(&hf["embeddings"]));
        assert!(
            diff < 1e-4,
            "{id}: differs from sentence-transformers by {diff}: {hf}"
        );
        if hf["normalize"] == true {
            for v in &ours {
                let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "{id}: norm {norm}");
            }
        }

        // base64 carries the same little-endian f32s.
        let (status, b64) = post_json(
            &app,
            &key,
            "/v1/embeddings",
            json!({"model": id, "input": texts(), "encoding_format": "base64", "dimensions": ours[0].len()}),
        )
        .await;
        assert_eq!(status, 200, "{id}: {b64}");
        for (item, expected) in b64["data"].as_array().unwrap().iter().zip(&ours) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(item["embedding"].as_str().unwrap())
                .unwrap();
            let decoded: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(&decoded, expected);
        }
        assert_eq!(b64["usage"], float["usage"]);
    }
    // The listing says which are loaded.
    let (_, list) = app.get_json(&key, "/v1/models").await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["loaded"] == true),
        "{list}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_real_minilm_embeds_like_sentence_transformers() {
    let Ok(minilm) = std::env::var("KILN_TEST_MINILM") else {
        eprintln!("KILN_TEST_MINILM is not set (scripts/fetch-minilm.sh): skipped");
        return;
    };
    let minilm = PathBuf::from(minilm);
    let app = TestApp::spawn_with(|s| {
        let dest = s.models_dir.join("sentence-transformers");
        std::fs::create_dir_all(&dest).unwrap();
        std::os::unix::fs::symlink(&minilm, dest.join("all-MiniLM-L6-v2")).unwrap();
    })
    .await;
    let key = app.key_for("acme").await;
    let inputs = [
        "A man is eating food.",
        "A man is riding a white horse on an enclosed ground.",
        "Transfer learning reuses what a pretrained model learned.",
        "kiln fine-tunes models on your own hardware",
    ];
    let (status, out) = post_json(
        &app,
        &key,
        "/v1/embeddings",
        json!({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": inputs}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let ours = embeddings_of(&out);
    assert_eq!(ours[0].len(), 384);
    let hf = reference(&minilm, "embed", &inputs);
    assert_eq!(hf["normalize"], true);
    let diff = max_diff(&ours, &matrix(&hf["embeddings"]));
    assert!(
        diff < 1e-4,
        "MiniLM embeddings differ from sentence-transformers by {diff}"
    );
    app.shutdown().await;
}

/// A `cosine` text-similarity grader embeds both texts with the configured encoder (the real
/// MiniLM): its reward is the cosine of what `/v1/embeddings` returns for them, and it ranks a
/// paraphrase above an unrelated sentence.
#[tokio::test]
async fn cosine_graders_embed_with_the_configured_encoder() {
    let Ok(minilm) = std::env::var("KILN_TEST_MINILM") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set KILN_TEST_MINILM"
        );
        eprintln!("KILN_TEST_MINILM is not set (scripts/fetch-minilm.sh): skipped");
        return;
    };
    const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";
    let minilm = PathBuf::from(minilm);
    let app = TestApp::spawn_with(|s| {
        let dest = s.models_dir.join("sentence-transformers");
        std::fs::create_dir_all(&dest).unwrap();
        std::os::unix::fs::symlink(&minilm, dest.join("all-MiniLM-L6-v2")).unwrap();
        s.api.grader_embedding_model = Some(MINILM.into());
    })
    .await;
    let key = app.key_for("acme").await;
    let grader = json!({"type": "text_similarity", "name": "cos", "input": "{{ sample.output_text }}",
                        "reference": "{{ item.answer }}", "evaluation_metric": "cosine"});
    // Validation names the server's model in the grader it gives back.
    let (status, valid) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/alpha/graders/validate",
        json!({"grader": grader}),
    )
    .await;
    assert_eq!(status, 200, "{valid}");
    assert_eq!(valid["grader"]["embedding_model"], MINILM);

    let answer = "A man is eating food.";
    let mut rewards = Vec::new();
    for sample in [
        "A man is eating a meal.",
        "The stock market fell sharply today.",
    ] {
        let (status, run) = post_json(
            &app,
            &key,
            "/v1/fine_tuning/alpha/graders/run",
            json!({"grader": grader, "item": {"answer": answer}, "model_sample": sample}),
        )
        .await;
        assert_eq!(status, 200, "{run}");
        let reward = run["reward"].as_f64().unwrap();
        let (status, out) = post_json(
            &app,
            &key,
            "/v1/embeddings",
            json!({"model": MINILM, "input": [sample, answer]}),
        )
        .await;
        assert_eq!(status, 200, "{out}");
        let e = embeddings_of(&out);
        let dot: f64 = e[0]
            .iter()
            .zip(&e[1])
            .map(|(a, b)| f64::from(*a * *b))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(&e[0]) * norm(&e[1]));
        assert!(
            (reward - cosine).abs() < 1e-5,
            "{sample}: reward {reward}, cosine of the embeddings {cosine}"
        );
        rewards.push(reward);
    }
    assert!(
        rewards[0] > 0.7 && rewards[1] < 0.3,
        "a paraphrase scores high, an unrelated sentence low: {rewards:?}"
    );

    // An embedding model that is not here, or not an encoder's metric: 400 naming the field.
    for (bad, param) in [
        (
            json!({"type": "text_similarity", "name": "c", "input": "a", "reference": "b",
                   "evaluation_metric": "cosine", "embedding_model": "org/missing"}),
            "grader",
        ),
        (
            json!({"type": "text_similarity", "name": "c", "input": "a", "reference": "b",
                   "evaluation_metric": "meteor", "embedding_model": MINILM}),
            "grader.embedding_model",
        ),
    ] {
        for (path, body) in [
            ("validate", json!({"grader": bad})),
            (
                "run",
                json!({"grader": bad, "item": {}, "model_sample": "x"}),
            ),
        ] {
            let (status, err) = post_json(
                &app,
                &key,
                &format!("/v1/fine_tuning/alpha/graders/{path}"),
                body,
            )
            .await;
            assert_eq!(status, 400, "{path} {bad}: {err}");
            assert_eq!(assert_error_shape(&err)["param"], param, "{err}");
        }
    }
    app.shutdown().await;
}

#[tokio::test]
async fn bad_inference_requests_get_clear_errors() {
    let app = TestApp::spawn_with(|s| {
        let tiny = train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        // A decoder: listed, but not an encoder.
        let llama = s.models_dir.join("kiln-test/tiny-llama");
        std::fs::create_dir_all(&llama).unwrap();
        std::fs::write(
            llama.join("config.json"),
            json!({"model_type": "llama", "hidden_size": 8}).to_string(),
        )
        .unwrap();
        std::fs::copy(
            tiny.join("model.safetensors"),
            llama.join("model.safetensors"),
        )
        .unwrap();
        s.serve.max_inputs = 4;
    })
    .await;
    let key = app.key_for("acme").await;
    let long = vec!["good"; 80].join(" ");
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (
            "/v1/embeddings",
            json!({"model": "nope/none", "input": "x"}),
            404,
            Some("model"),
        ),
        (
            "/v1/embeddings",
            json!({"model": "ft:kiln-test/tiny-bert:acme::ftjob-x", "input": "x"}),
            404,
            Some("model"),
        ),
        (
            "/v1/classifications",
            json!({"model": "../etc", "input": "x"}),
            404,
            Some("model"),
        ),
        (
            "/v1/embeddings",
            json!({"model": "kiln-test/tiny-llama", "input": "x"}),
            400,
            Some("model"),
        ),
        (
            "/v1/classifications",
            json!({"model": BASE, "input": "good"}),
            400,
            Some("model"),
        ),
        ("/v1/embeddings", json!({"input": "x"}), 400, Some("model")),
        (
            "/v1/embeddings",
            json!({"model": 3, "input": "x"}),
            400,
            Some("model"),
        ),
        ("/v1/embeddings", json!({"model": BASE}), 400, Some("input")),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": ""}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": []}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": ["good", " "]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": [[1, 2, 3]]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": {"text": "x"}}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": ["a", "b", "c", "d", "e"]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": ["good", long]}),
            400,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": "x", "encoding_format": "int8"}),
            400,
            Some("encoding_format"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": "x", "dimensions": 7}),
            400,
            Some("dimensions"),
        ),
        (
            "/v1/embeddings",
            json!({"model": BASE, "input": "x", "truncate": "yes"}),
            400,
            Some("truncate"),
        ),
        ("/v1/embeddings", json!(["not", "an", "object"]), 400, None),
    ];
    for (path, body, want, param) in cases {
        let (status, err) = post_json(&app, &key, path, body.clone()).await;
        assert_eq!(status, want, "{path} {body} -> {err}");
        let e = assert_error_shape(&err);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body} -> {err}");
        }
    }
    // The over-long input's error says which input and what to do.
    let (_, err) = post_json(
        &app,
        &key,
        "/v1/embeddings",
        json!({"model": BASE, "input": ["good", long]}),
    )
    .await;
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("input[1]") && message.contains("truncate"),
        "{message}"
    );
    // Asking for truncation serves it.
    let (status, out) = post_json(
        &app,
        &key,
        "/v1/embeddings",
        json!({"model": BASE, "input": ["good", long], "truncate": true}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["data"][1]["embedding"].as_array().unwrap().len(), 32);
    assert_eq!(out["usage"]["prompt_tokens"], 3 + 64);
    // Bad JSON and no key: the usual shapes.
    let res = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app
        .client
        .post(app.url("/v1/classifications"))
        .json(&json!({"model": BASE, "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    app.shutdown().await;
}

async fn loaded(app: &TestApp, key: &str) -> Vec<String> {
    let (_, list) = app.get_json(key, "/v1/models").await;
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["loaded"] == true)
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_cache_keeps_the_most_recently_used_models_within_its_memory() {
    let mut bytes = 0;
    let app = TestApp::spawn_with(|s| {
        for name in ["a", "b", "c"] {
            let dir = train_support::tiny_model(
                &s.models_dir.join(format!("cache/{name}")),
                TinyLayout::Unprefixed,
            );
            bytes = std::fs::metadata(dir.join("model.safetensors"))
                .unwrap()
                .len();
        }
        // Room for two tiny models, not three.
        s.serve.memory_bytes = bytes * 5 / 2;
        // And one bigger than the budget.
        let big = kiln::nn::bert::BertConfig {
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 4,
            ..train_support::tiny_config()
        };
        kiln::nn::tiny::write_tiny_bert_with(
            &s.models_dir.join("cache/big"),
            &big,
            1,
            TinyLayout::Unprefixed,
        )
        .unwrap();
        std::fs::copy(
            s.models_dir.join("cache/a/tokenizer.json"),
            s.models_dir.join("cache/big/tokenizer.json"),
        )
        .unwrap();
    })
    .await;
    let key = app.key_for("acme").await;
    let embed = |model: &'static str| {
        let app = &app;
        let key = key.clone();
        async move {
            let (status, body) = post_json(
                app,
                &key,
                "/v1/embeddings",
                json!({"model": model, "input": "good"}),
            )
            .await;
            assert_eq!(status, 200, "{model}: {body}");
            embeddings_of(&body)
        }
    };
    let first_a = embed("cache/a").await;
    embed("cache/b").await;
    let mut now = loaded(&app, &key).await;
    now.sort();
    assert_eq!(now, ["cache/a", "cache/b"]);
    embed("cache/a").await; // a is now the most recent
    embed("cache/c").await; // evicts b, the least recently used
    let mut now = loaded(&app, &key).await;
    now.sort();
    assert_eq!(now, ["cache/a", "cache/c"]);
    embed("cache/b").await; // loads again, evicting a
    let mut now = loaded(&app, &key).await;
    now.sort();
    assert_eq!(now, ["cache/b", "cache/c"]);
    assert_eq!(
        embed("cache/a").await,
        first_a,
        "a reloaded model answers the same"
    );

    let (status, body) = post_json(
        &app,
        &key,
        "/v1/embeddings",
        json!({"model": "cache/big", "input": "good"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "model_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KILN_SERVE_MEMORY")
    );

    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kiln_serve_model_evictions_total"),
        "{metrics}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn too_many_waiting_requests_get_429_and_late_ones_503() {
    let app = TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.serve.max_waiting = 2;
    })
    .await;
    let key = app.key_for("acme").await;
    let heavy: Vec<String> = (0..64).map(|_| vec!["good movie"; 30].join(" ")).collect();
    // Warm the model so the burst measures queueing, not loading.
    let (status, _) = post_json(
        &app,
        &key,
        "/v1/embeddings",
        json!({"model": BASE, "input": "good"}),
    )
    .await;
    assert_eq!(status, 200);
    let burst = (0..32).map(|_| {
        let body = json!({"model": BASE, "input": heavy, "truncate": true});
        let req = app
            .client
            .post(app.url("/v1/embeddings"))
            .bearer_auth(&key)
            .json(&body);
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let retry = res.headers().get("retry-after").is_some();
            let body: Value = res.json().await.unwrap();
            (status, retry, body)
        }
    });
    let results = futures_util::future::join_all(burst).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let rejected: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok + rejected.len(), results.len(), "only 200s and 429s");
    assert!(ok >= 1, "some requests are served");
    assert!(
        !rejected.is_empty(),
        "a burst past the bound is turned away"
    );
    for (_, retry, body) in rejected {
        assert!(retry, "429 says when to retry");
        assert_eq!(assert_error_shape(body)["code"], "overloaded");
    }
    app.shutdown().await;

    // A deadline shorter than the work: 503 with retry-after, and the server stays healthy.
    let app = TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.serve.timeout = Duration::from_micros(1);
    })
    .await;
    let key = app.key_for("acme").await;
    let res = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": BASE, "input": heavy, "truncate": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_some());
    let body: Value = res.json().await.unwrap();
    assert!(
        assert_error_shape(&body)["message"]
            .as_str()
            .unwrap()
            .contains("did not finish"),
        "{body}"
    );
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    app.shutdown().await;
}
