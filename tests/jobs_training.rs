//! Jobs trained by kiln's real engine (a tiny BERT), end to end over HTTP: the job's
//! hyperparameters come back with the values used, metrics and checkpoints are recorded, the
//! model is exported, a fine-tuned model can be fine-tuned again, and cancel reaches a
//! running training loop.

mod common;
mod jobs_support;
mod train_support;

use std::time::Duration;

use common::TestApp;
use jobs_support::{all_events, post_empty, post_json, wait_for};
use kiln::nn::tiny::TinyLayout;
use serde_json::{Value, json};

const BASE: &str = "kiln-test/tiny-bert";

async fn app() -> TestApp {
    TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.jobs.poll_interval = Duration::from_millis(300);
    })
    .await
}

async fn upload(app: &TestApp, key: &str, n: usize, seed: u64) -> String {
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

async fn create(
    app: &TestApp,
    key: &str,
    model: &str,
    train: &str,
    valid: Option<&str>,
    hp: Value,
) -> Value {
    let (status, job) = post_json(
        app,
        key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": model,
            "training_file": train,
            "validation_file": valid,
            "suffix": "sentiment",
            "seed": 11,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    job
}

#[tokio::test]
async fn a_job_trains_with_the_engine_and_reports_what_it_did() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let train = upload(&app, &key, 120, 1).await;
    let valid = upload(&app, &key, 40, 2).await;
    let job = create(
        &app,
        &key,
        BASE,
        &train,
        Some(&valid),
        json!({"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3, "checkpoint_every_steps": 20}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let job = wait_for(&app, &key, &id, Duration::from_secs(120), |j| {
        ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        job["fine_tuned_model"]
            .as_str()
            .unwrap()
            .starts_with("ft:kiln-test/tiny-bert:"),
        "{job}"
    );
    assert!(job["trained_tokens"].as_i64().unwrap() > 0);
    let hp = &job["method"]["supervised"]["hyperparameters"];
    assert_eq!(hp["strategy"], "full", "values used are echoed: {hp}");
    assert!(hp["max_length"].is_number(), "auto resolved: {hp}");
    assert!(
        job["metrics"]["valid_accuracy"].as_f64().unwrap() >= 0.9,
        "{job}"
    );

    let events = all_events(&app, &key, &id).await;
    let metrics: Vec<&Value> = events.iter().filter(|e| e["type"] == "metrics").collect();
    assert!(
        metrics.iter().any(|e| e["data"]["train_loss"].is_number()),
        "{events:?}"
    );
    assert!(
        metrics.iter().any(|e| e["data"]["valid_loss"].is_number()),
        "{events:?}"
    );
    assert!(events.iter().any(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("Training text_classification"))
    }));

    let (_, checkpoints) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{id}/checkpoints"))
        .await;
    let checkpoints = checkpoints["data"].as_array().unwrap();
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");

    // The result file is a CSV of per-step metrics.
    let result = job["result_files"][0].as_str().unwrap();
    let res = app
        .client
        .get(app.url(&format!("/v1/files/{result}/content")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let csv = res.text().await.unwrap();
    assert!(csv.lines().next().unwrap().contains("train_loss"), "{csv}");
    assert!(csv.lines().count() > 10);

    // A fine-tuned model is a base for the next job (it continues from its weights).
    let next = create(
        &app,
        &key,
        job["fine_tuned_model"].as_str().unwrap(),
        &train,
        Some(&valid),
        json!({"n_epochs": 1, "strategy": "head_only"}),
    )
    .await;
    let next = wait_for(
        &app,
        &key,
        next["id"].as_str().unwrap(),
        Duration::from_secs(60),
        |j| ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")),
    )
    .await;
    assert_eq!(next["status"], "succeeded", "{next}");
    assert!(
        next["metrics"]["valid_accuracy"].as_f64().unwrap() >= 0.9,
        "the features carry over: {next}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_running_training_job_stops_it_within_seconds() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let train = upload(&app, &key, 400, 3).await;
    let job = create(
        &app,
        &key,
        BASE,
        &train,
        None,
        json!({"n_epochs": 50, "batch_size": 4}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    wait_for(&app, &key, &id, Duration::from_secs(60), |j| {
        j["status"] == "running" && j["progress"]["step"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let (status, _) = post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{id}/cancel")).await;
    assert_eq!(status, 200);
    let started = std::time::Instant::now();
    let job = wait_for(&app, &key, &id, Duration::from_secs(10), |j| {
        j["status"] == "cancelled"
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
    assert!(job["fine_tuned_model"].is_null());
    app.shutdown().await;
}

#[tokio::test]
async fn data_the_engine_cannot_train_fails_the_job_without_retries() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let train = upload(&app, &key, 40, 1).await;
    let job = create(
        &app,
        &key,
        BASE,
        &train,
        None,
        json!({"n_epochs": 1, "max_length": 1000}),
    )
    .await;
    let job = wait_for(
        &app,
        &key,
        job["id"].as_str().unwrap(),
        Duration::from_secs(60),
        |j| j["status"] == "failed",
    )
    .await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_length"), "{message}");
    app.shutdown().await;
}

/// `dry_run: true` plans the job with the real engine (data read, `auto` resolved, a few real
/// steps timed) and queues nothing; the same job then runs for real, and its figures match
/// the plan's (the estimate and the real duration are printed, not asserted).
#[tokio::test]
async fn a_dry_run_plans_the_job_without_queueing_it() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let train = upload(&app, &key, 90, 5).await;
    let request = json!({
        "model": BASE, "training_file": train, "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
    });
    let mut dry = request.clone();
    dry["dry_run"] = json!(true);
    let (status, plan) = post_json(&app, &key, "/v1/fine_tuning/jobs", dry).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["object"], "fine_tuning.job");
    let estimate = &plan["estimate"];
    // 90 examples, about a tenth held out; 2 epochs of ceil(train / 8) steps.
    let n_train = estimate["train_examples"].as_u64().unwrap();
    let n_valid = estimate["valid_examples"].as_u64().unwrap();
    assert_eq!(n_train + n_valid, 90, "{estimate}");
    assert!((7..=11).contains(&n_valid), "{estimate}");
    assert_eq!(
        estimate["total_steps"],
        2 * n_train.div_ceil(8),
        "{estimate}"
    );
    assert_eq!(
        estimate["labels"],
        json!(["negative", "positive"]),
        "{estimate}"
    );
    let per_epoch = estimate["train_tokens_per_epoch"].as_u64().unwrap();
    assert!(per_epoch > n_train * 3, "{estimate}");
    assert_eq!(estimate["trained_tokens"].as_u64().unwrap(), 2 * per_epoch);
    assert_eq!(plan["trained_tokens"], estimate["trained_tokens"]);
    assert!(
        estimate["seconds_per_step"].as_f64().unwrap() > 0.0,
        "{estimate}"
    );
    assert_eq!(estimate["measured_steps"], 3, "{estimate}");
    let seconds = estimate["estimated_seconds"].as_f64().unwrap();
    assert!(seconds > 0.0, "{estimate}");
    // Every "auto" is resolved in the method it would record.
    let hp = &plan["method"]["supervised"]["hyperparameters"];
    assert_eq!(hp["n_epochs"], 2, "{hp}");
    for (k, v) in hp.as_object().unwrap() {
        assert_ne!(v, "auto", "{k} unresolved: {hp}");
    }
    assert!(hp["learning_rate"].as_f64().unwrap() > 0.0, "{hp}");
    // The device memory the job would be scheduled by: kiln's estimate, with its parts.
    let memory = &estimate["device_memory"];
    assert_eq!(memory["estimated"], true, "{memory}");
    assert_eq!(plan["device_memory_estimated"], true, "{plan}");
    assert_eq!(plan["device_memory_gb"], memory["gb"], "{plan}");
    assert_eq!(memory["batch_size"], 8, "{memory}");
    let part = |k: &str| memory[k].as_u64().unwrap();
    assert!(
        part("weights_bytes") > 0 && part("activations_bytes") > 0,
        "{memory}"
    );
    // Full fine-tuning: gradients and two moments per weight, three times the weights.
    assert_eq!(
        part("gradients_and_optimizer_bytes"),
        3 * part("weights_bytes"),
        "{memory}"
    );
    assert!(
        part("bytes") > part("weights_bytes") * 4 + part("activations_bytes"),
        "{memory}"
    );
    assert!((memory["gb"].as_f64().unwrap() - part("bytes") as f64 / 1e9).abs() < 1e-3);
    assert_eq!(estimate["device"], "cpu", "{estimate}");

    // Nothing was queued.
    let (_, jobs) = app.get_json(&key, "/v1/fine_tuning/jobs").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 0, "{jobs}");

    // Bad input still gets the usual errors, before anything is measured.
    let mut bad = request.clone();
    bad["dry_run"] = json!("yes");
    let (status, err) = post_json(&app, &key, "/v1/fine_tuning/jobs", bad).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "dry_run");
    let mut bad = request.clone();
    bad["dry_run"] = json!(true);
    bad["method"]["supervised"]["hyperparameters"]["n_epochs"] = json!(0);
    let (status, err) = post_json(&app, &key, "/v1/fine_tuning/jobs", bad).await;
    assert_eq!(status, 400, "{err}");

    // The real run takes the plan's steps and tokens.
    let started = std::time::Instant::now();
    let (status, job) = post_json(&app, &key, "/v1/fine_tuning/jobs", request).await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap();
    let done = wait_for(&app, &key, id, Duration::from_secs(120), |j| {
        matches!(j["status"].as_str(), Some("succeeded" | "failed"))
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["trained_tokens"], estimate["trained_tokens"], "{done}");
    assert_eq!(done["device_memory_gb"], plan["device_memory_gb"], "{done}");
    assert_eq!(done["device_memory_estimated"], true, "{done}");
    assert_eq!(
        done["method"]["supervised"]["hyperparameters"]["learning_rate"],
        hp["learning_rate"]
    );
    println!(
        "dry run estimated {seconds:.2} s; the job took {:.2} s from create to succeeded",
        started.elapsed().as_secs_f64()
    );
    app.shutdown().await;
}

/// A small filesystem of its own (tmpfs), unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// Mounts `mib` MiB at `dir`. This needs root (CI runs as root); elsewhere the caller
    /// skips, except under CI, where skipping would hide the test.
    fn mount(dir: &std::path::Path, mib: u32) -> Option<SmallDisk> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "kiln-test"])
            .arg(dir)
            .status();
        match status {
            Ok(s) if s.success() => Some(SmallDisk(dir.to_owned())),
            other => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must be able to mount a tmpfs for the disk-full test: {other:?}"
                );
                eprintln!("skipped: cannot mount a tmpfs here ({other:?})");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the filesystem is full.
fn fill(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 256 * 1024];
    let mut written = 0;
    while file.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    // The last partial chunk, byte by byte, until not one more fits.
    while file.write_all(&chunk[..4096]).is_ok() {
        written += 4096;
    }
    let _ = file.flush();
    written
}

async fn checkpoints(app: &TestApp, key: &str, id: &str) -> Vec<Value> {
    let (status, list) = app
        .get_json(
            key,
            &format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100"),
        )
        .await;
    assert_eq!(status, 200, "{list}");
    list["data"].as_array().unwrap().clone()
}

/// The disk filling up mid-job fails that checkpoint and nothing else: the checkpoints
/// already stored stay whole (and servable), no half-written one is left or recorded, the
/// attempt is retried as an infrastructure fault, and once there is room again the job
/// resumes from the latest checkpoint and succeeds.
#[tokio::test]
async fn a_full_disk_fails_the_checkpoint_cleanly_and_the_job_resumes_from_the_last_one() {
    let disk = tempfile::tempdir().unwrap();
    let Some(_mounted) = SmallDisk::mount(disk.path(), 256) else {
        return;
    };
    let artifacts = disk.path().join("artifacts");
    let app = TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.artifacts = Some(artifacts.to_string_lossy().into_owned());
        s.jobs.poll_interval = Duration::from_millis(300);
        s.jobs.queue.retry_base = Duration::from_secs(1);
        s.jobs.queue.retry_max = Duration::from_secs(2);
        s.jobs.queue.max_attempts = 30;
    })
    .await;
    let key = app.key_for("acme").await;
    let train = upload(&app, &key, 120, 4).await;
    let job = create(
        &app,
        &key,
        BASE,
        &train,
        None,
        json!({"n_epochs": 40, "batch_size": 4, "checkpoint_every_steps": 25}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while checkpoints(&app, &key, &id).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no first checkpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let filler = disk.path().join("filler");
    let filled = fill(&filler);
    eprintln!("filled the disk with {} MiB", filled >> 20);

    // The next checkpoint cannot be written: the attempt fails and is retried.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let failure = loop {
        let events = all_events(&app, &key, &id).await;
        if let Some(e) = events.iter().find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("No space left on device"))
        }) {
            break e["message"].as_str().unwrap().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no disk-full failure: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("failure event: {failure}");
    let (_, job) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{id}"))
        .await;
    assert_ne!(job["status"], "failed", "a full disk is retried: {job}");

    // What was stored before is whole: every recorded checkpoint's directory, and nothing
    // else, is under checkpoints/, and each serves as a model.
    let stored = checkpoints(&app, &key, &id).await;
    let dirs = std::fs::read_dir(artifacts.join("checkpoints").join(&id))
        .unwrap()
        .count();
    assert_eq!(
        dirs,
        stored.len(),
        "a half-written checkpoint was left behind"
    );
    for c in &stored {
        let (status, body) = post_json(
            &app,
            &key,
            "/v1/classifications",
            json!({"model": c["fine_tuned_model_checkpoint"], "input": "a good film"}),
        )
        .await;
        assert_eq!(status, 200, "checkpoint {c}: {body}");
    }
    let latest = stored
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .max()
        .unwrap();

    // Room again: the job resumes from its latest checkpoint and finishes.
    std::fs::remove_file(&filler).unwrap();
    let job = wait_for(&app, &key, &id, Duration::from_secs(240), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = all_events(&app, &key, &id).await;
    let resumed = format!("Resumed from the checkpoint at step {latest} ");
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&resumed))),
        "no '{resumed}' event: {events:?}"
    );
    app.shutdown().await;
}
