//! What the jobs tests share: a small real training engine ([`ToyExecutor`]) and helpers
//! to upload data, create jobs and wait for them.
//!
//! The toy engine fits a logistic regression on hashed character features of the training
//! file's `text`/`label` lines with plain-Rust SGD: every step does real, bounded work
//! (`inner` passes over its batch), reports its loss, checkpoints its weights every
//! `checkpoint_every_steps`, and resumes from a checkpoint's weights and step.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kiln::worker::{
    JobContext, JobExecutor, JobFailure, JobOutcome, JobSpec, Level, Metrics, Progress, StopReason,
};
use serde_json::{Value, json};

use crate::common::TestApp;

/// The base model id tests use; [`install_model`] creates it.
pub const MODEL: &str = "kiln-test/toy-logreg";
const FEATURES: usize = 64;

/// Creates the toy base model under `models_dir`.
pub fn install_model(models_dir: &Path) {
    let dir = models_dir.join(MODEL);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        json!({"model_type": "toy-logreg", "features": FEATURES}).to_string(),
    )
    .unwrap();
}

/// A real (tiny) training engine for the service tests.
pub struct ToyExecutor {
    /// SGD passes over the batch per step: the step's amount of work.
    pub inner: usize,
    /// Fail the first N attempts with an infrastructure error.
    pub flaky_attempts: u32,
    /// Fail every attempt with this user error.
    pub user_error: Option<String>,
    /// Attempts started (all jobs).
    pub started: AtomicU32,
}

impl ToyExecutor {
    pub fn new(inner: usize) -> Arc<ToyExecutor> {
        Arc::new(ToyExecutor::plain(inner))
    }

    pub fn plain(inner: usize) -> ToyExecutor {
        ToyExecutor {
            inner,
            flaky_attempts: 0,
            user_error: None,
            started: AtomicU32::new(0),
        }
    }
}

fn features(text: &str) -> Vec<f64> {
    let mut x = vec![0.0; FEATURES];
    for w in text.as_bytes().windows(2) {
        let h = (w[0] as usize * 31 + w[1] as usize) % FEATURES;
        x[h] += 1.0;
    }
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
    x.iter().map(|v| v / norm).collect()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn int_knob(hp: &serde_json::Map<String, Value>, name: &str, auto: u64) -> u64 {
    hp.get(name).and_then(Value::as_u64).unwrap_or(auto)
}

impl JobExecutor for ToyExecutor {
    fn execute(&self, job: &JobSpec, ctx: &mut JobContext) -> Result<JobOutcome, JobFailure> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if let Some(message) = &self.user_error {
            return Err(JobFailure::UserError(message.clone()));
        }
        if job.attempt <= self.flaky_attempts {
            return Err(JobFailure::Infrastructure(format!(
                "simulated fault on attempt {}",
                job.attempt
            )));
        }
        let text = std::fs::read_to_string(&job.training_file)
            .map_err(|e| JobFailure::Infrastructure(e.to_string()))?;
        let mut data: Vec<(Vec<f64>, f64)> = Vec::new();
        let mut first_label: Option<String> = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| JobFailure::UserError(format!("bad line: {e}")))?;
            let label = v["label"].as_str().unwrap_or("").to_owned();
            let first = first_label.get_or_insert_with(|| label.clone());
            let y = if *first == label { 1.0 } else { 0.0 };
            data.push((features(v["text"].as_str().unwrap_or("")), y));
        }
        let n = data.len().max(1) as u64;
        let hp = &job.hyperparameters;
        let n_epochs = int_knob(hp, "n_epochs", 3);
        let batch = int_knob(hp, "batch_size", 4).clamp(1, n);
        let every = int_knob(hp, "checkpoint_every_steps", 10);
        let lr = hp
            .get("learning_rate")
            .and_then(Value::as_f64)
            .unwrap_or(0.5);
        let steps_per_epoch = n.div_ceil(batch);
        let total = n_epochs * steps_per_epoch;
        let mut resolved = serde_json::Map::new();
        resolved.insert("n_epochs".into(), json!(n_epochs));
        resolved.insert("batch_size".into(), json!(batch));
        resolved.insert("learning_rate".into(), json!(lr));
        resolved.insert("checkpoint_every_steps".into(), json!(every));
        ctx.record_hyperparameters(resolved);

        let mut w = vec![0.0f64; FEATURES];
        let mut done = 0u64;
        if let Some(resume) = &job.resume {
            let state: Value = std::fs::read_to_string(resume.dir.join("state.json"))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .ok_or_else(|| JobFailure::Infrastructure("unreadable checkpoint".into()))?;
            w = serde_json::from_value(state["weights"].clone())
                .map_err(|e| JobFailure::Infrastructure(e.to_string()))?;
            done = state["step"].as_u64().unwrap_or(0);
            assert_eq!(done, resume.step, "checkpoint state matches its row");
            ctx.log(
                Level::Info,
                format!("Resumed from the checkpoint of step {done}"),
            );
        }

        let save = |ctx: &mut JobContext, step: u64, w: &[f64], loss: f64| {
            let mut m = Metrics::new();
            m.insert("train_loss".into(), loss);
            let state = json!({"step": step, "weights": w});
            ctx.save_checkpoint(step, &m, |dir| {
                std::fs::write(dir.join("state.json"), state.to_string())
            })
        };
        let mut loss = f64::NAN;
        for step in done + 1..=total {
            match ctx.should_stop() {
                Some(reason @ (StopReason::Pause | StopReason::Shutdown)) => {
                    save(ctx, step - 1, &w, loss)?;
                    return Err(JobFailure::Stopped(reason));
                }
                Some(reason) => return Err(JobFailure::Stopped(reason)),
                None => {}
            }
            let start = ((step - 1) % steps_per_epoch) * batch;
            let idx: Vec<usize> = (start..(start + batch).min(n))
                .map(|i| i as usize)
                .collect();
            for _ in 0..self.inner.max(1) {
                let mut grad = vec![0.0; FEATURES];
                for &i in &idx {
                    let (x, y) = &data[i];
                    let p = sigmoid(x.iter().zip(&w).map(|(a, b)| a * b).sum());
                    for (g, xi) in grad.iter_mut().zip(x) {
                        *g += (p - y) * xi;
                    }
                }
                for (wi, g) in w.iter_mut().zip(&grad) {
                    *wi -= lr / self.inner.max(1) as f64 * g / idx.len() as f64;
                }
            }
            loss = idx
                .iter()
                .map(|&i| {
                    let (x, y) = &data[i];
                    let p =
                        sigmoid(x.iter().zip(&w).map(|(a, b)| a * b).sum()).clamp(1e-9, 1.0 - 1e-9);
                    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
                })
                .sum::<f64>()
                / idx.len() as f64;
            let mut metrics = Metrics::new();
            metrics.insert("train_loss".into(), loss);
            ctx.report_progress(Progress {
                step,
                total_steps: total,
                epoch: step as f64 / steps_per_epoch as f64,
                examples_per_second: None,
                metrics,
            });
            if step % every == 0 {
                save(ctx, step, &w, loss)?;
            }
        }
        let model = ctx.scratch_dir().join("model");
        std::fs::create_dir_all(&model).map_err(|e| JobFailure::Infrastructure(e.to_string()))?;
        std::fs::write(
            model.join("config.json"),
            json!({"model_type": "toy-logreg"}).to_string(),
        )
        .and_then(|()| std::fs::write(model.join("weights.json"), json!(w).to_string()))
        .map_err(|e| JobFailure::Infrastructure(e.to_string()))?;
        let mut metrics = Metrics::new();
        metrics.insert("train_loss".into(), loss);
        Ok(JobOutcome {
            trained_tokens: Some(total * batch * 8),
            metrics,
            model_dir: Some(model),
            model_info: None,
        })
    }
}

/// `n` lines of a two-class text dataset.
pub fn dataset(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let (text, label) = if i % 2 == 0 {
            (format!("wonderful great lovely film number {i}"), "pos")
        } else {
            (format!("awful terrible boring mess number {i}"), "neg")
        };
        out.push_str(&json!({"text": text, "label": label}).to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// Uploads a dataset and waits until it is processed; returns the file id.
pub async fn upload_processed(app: &TestApp, key: &str, n: usize) -> String {
    let res = app
        .upload(key, "fine-tune", "train.jsonl", dataset(n))
        .await;
    assert_eq!(res.status(), 200);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = app.wait_validated(key, &id).await;
    assert_eq!(file["status"], "processed", "{file}");
    id
}

/// Spawns the app with the toy engine and its model installed.
pub async fn spawn_app(executor: Arc<ToyExecutor>, slots: usize) -> TestApp {
    TestApp::spawn_with(|s| {
        install_model(&s.models_dir);
        s.jobs.slots = slots;
        s.jobs.executor = Some(executor);
        s.jobs.poll_interval = Duration::from_millis(500);
        s.jobs.reap_interval = Duration::from_millis(500);
        s.jobs.queue.lease = Duration::from_secs(3);
        s.jobs.queue.retry_base = Duration::from_millis(200);
        s.jobs.queue.retry_max = Duration::from_secs(1);
    })
    .await
}

pub async fn post_json(app: &TestApp, key: &str, path: &str, body: Value) -> (u16, Value) {
    let res = app
        .client
        .post(app.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// `DELETE path`: the status and the JSON body (null when there is none).
pub async fn delete(app: &TestApp, key: &str, path: &str) -> (u16, Value) {
    let res = app
        .client
        .delete(app.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// `POST .../{action}` as the OpenAI client sends it: JSON content type, empty body.
pub async fn post_empty(app: &TestApp, key: &str, path: &str) -> (u16, Value) {
    let res = app
        .client
        .post(app.url(path))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Creates a job on `file` with the given supervised hyperparameters; returns it.
pub async fn create_job(app: &TestApp, key: &str, file: &str, hyperparameters: Value) -> Value {
    let (status, job) = post_json(
        app,
        key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": MODEL,
            "training_file": file,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    job
}

/// Polls a job until `done(job)` holds (or panics after `within`).
pub async fn wait_for(
    app: &TestApp,
    key: &str,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, job) = app
            .get_json(key, &format!("/v1/fine_tuning/jobs/{id}"))
            .await;
        assert_eq!(status, 200, "{job}");
        if done(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not get there within {within:?}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event of a job, oldest first (following pagination to its end).
pub async fn all_events(app: &TestApp, key: &str, id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/fine_tuning/jobs/{id}/events?limit=100");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let (status, page) = app.get_json(key, &path).await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap().clone();
        after = data.last().map(|e| e["id"].as_str().unwrap().to_owned());
        events.extend(data);
        if page["has_more"] == false {
            break;
        }
    }
    events.reverse();
    events
}
