//! The official `openai` Python client (strict response validation) against a real
//! `kiln serve` process. Needs `pip install -r tests/python/requirements.txt`.

mod common;
mod train_support;

use common::{ADMIN_KEY, KilnProcess, TestDatabase};

/// A real `kiln serve` (with the tiny BERT `kiln-test/tiny-bert` under its models directory
/// when asked), and what it needs kept alive.
struct Served {
    kiln: KilnProcess,
    dir: tempfile::TempDir,
    _db: TestDatabase,
}

const TINY: &str = "kiln-test/tiny-bert";

async fn serve(tiny_model: bool) -> Served {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    if tiny_model {
        train_support::tiny_model(&models.join(TINY), kiln::nn::tiny::TinyLayout::Unprefixed);
    }
    let kiln = KilnProcess::serve(&[
        ("DATABASE_URL", &db.url),
        ("KILN_DATA_DIR", dir.path().to_str().unwrap()),
        ("KILN_MODELS_DIR", models.to_str().unwrap()),
        ("KILN_ADMIN_KEY", ADMIN_KEY),
    ])
    .await;
    Served { kiln, dir, _db: db }
}

/// Runs tests/python/`script` against the server (OPENAI_BASE_URL and OPENAI_API_KEY set,
/// plus `env` and `args`), asserts it succeeded, then stops the server cleanly.
async fn python(served: Served, script: &str, env: &[(&str, &str)], args: &[&str]) {
    let output = tokio::process::Command::new("python3")
        .arg(format!(
            "{}/tests/python/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(args)
        .env("OPENAI_BASE_URL", format!("{}/v1", served.kiln.base))
        .env("OPENAI_API_KEY", ADMIN_KEY)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("python3 is needed for the client conformance tests");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "install the client first: pip install -r tests/python/requirements.txt"
    );
    assert!(
        output.status.success(),
        "{script} failed:\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(served.kiln.terminate().await.success());
}

#[tokio::test]
async fn the_official_client_uploads_lists_downloads_and_deletes_files() {
    python(serve(false).await, "openai_files.py", &[], &[]).await;
}

/// The Uploads API: the client's `upload_file_chunked` helper, parts by hand, completion
/// errors and cancelling (tests/python/openai_uploads.py).
#[tokio::test]
async fn the_official_client_uploads_a_file_in_parts() {
    python(serve(false).await, "openai_uploads.py", &[], &[]).await;
}

/// A real `kiln serve` trains a tiny BERT through the jobs API; then the official client lists
/// and retrieves the base model (an id with `/`) and the fine-tuned one (an id with `:`), and
/// embeds with both encodings (tests/python/openai_models.py).
#[tokio::test]
async fn the_official_client_lists_retrieves_and_embeds_with_served_models() {
    use serde_json::{Value, json};
    let served = serve(true).await;
    let kiln = &served.kiln;
    let client = reqwest::Client::new();
    let data = served.dir.path().join("train.jsonl");
    train_support::sentiment_jsonl(&data, 60, 4);
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(&data).unwrap()).file_name("train.jsonl"),
        );
    let file: Value = client
        .post(format!("{}/v1/files", kiln.base))
        .bearer_auth(ADMIN_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file_url = format!("{}/v1/files/{}", kiln.base, file["id"].as_str().unwrap());
    for _ in 0..200 {
        let f: Value = client
            .get(&file_url)
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if f["status"] != "uploaded" {
            assert_eq!(f["status"], "processed", "{f}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let job: Value = client
        .post(format!("{}/v1/fine_tuning/jobs", kiln.base))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({
            "model": TINY, "training_file": file["id"], "suffix": "client",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!(
        "{}/v1/fine_tuning/jobs/{}",
        kiln.base,
        job["id"].as_str().unwrap()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let ft = loop {
        let job: Value = client
            .get(&url)
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match job["status"].as_str() {
            Some("succeeded") => break job["fine_tuned_model"].as_str().unwrap().to_owned(),
            Some("failed" | "cancelled") => panic!("{job}"),
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    python(
        served,
        "openai_models.py",
        &[],
        &[
            "--base-model",
            TINY,
            "--fine-tuned-model",
            &ft,
            "--embedding-dim",
            "32",
        ],
    )
    .await;
}

/// Webhook endpoints through the official client, and real job events (one job trained to
/// the end, one cancelled) verified by `client.webhooks.unwrap` (tests/python/openai_webhooks.py).
#[tokio::test]
async fn the_official_client_manages_webhooks_and_verifies_job_events() {
    python(
        serve(true).await,
        "openai_webhooks.py",
        &[("KILN_TEST_MODEL", TINY)],
        &[],
    )
    .await;
}

/// The generative side through the official client: a tiny decoder fine-tuned on chat data
/// through the jobs API answers the trained questions exactly, plain and streamed, with `n`,
/// stop strings and usage; text completions are seeded; bad requests name their field
/// (tests/python/openai_chat.py).
#[tokio::test]
async fn the_official_client_fine_tunes_a_decoder_and_chats_with_it() {
    const TINY_DECODER: &str = "kiln-test/tiny-qwen2";
    let served = serve(false).await;
    kiln::nn::tiny::write_tiny_decoder(
        &served.dir.path().join("models").join(TINY_DECODER),
        "qwen2",
        5,
    )
    .unwrap();
    python(
        served,
        "openai_chat.py",
        &[("KILN_TEST_MODEL", TINY_DECODER)],
        &[],
    )
    .await;
}

/// Reinforcement fine-tuning through the official client: graders validated and run
/// (`fine_tuning.alpha.graders`), then a `reinforcement` job with a `string_check` grader
/// raises a tiny decoder's validation reward (tests/python/openai_rft.py).
#[tokio::test]
async fn the_official_client_runs_graders_and_a_reinforcement_job() {
    const TINY_DECODER: &str = "kiln-test/tiny-qwen2";
    let served = serve(false).await;
    kiln::nn::tiny::write_tiny_decoder(
        &served.dir.path().join("models").join(TINY_DECODER),
        "qwen2",
        5,
    )
    .unwrap();
    python(
        served,
        "openai_rft.py",
        &[("KILN_TEST_MODEL", TINY_DECODER)],
        &[],
    )
    .await;
}
