//! One attempt of one job: resolve its spec, run the executor on its own OS thread,
//! heartbeat the lease, forward reports (fenced), and record how it ended.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc, oneshot};

use super::engine::{
    JobContext, JobFailure, JobOutcome, JobSpec, Level, Metrics, Progress, Report, ResumeFrom,
    StopFlag, StopReason,
};
use super::{Shared, SlotControl};
use crate::queue::{JobRow, Lease, NewEvent, ResultFile};
use crate::store::{StoreError, new_id};

/// Events kept in memory while the database is unreachable.
const MAX_BUFFERED_EVENTS: usize = 100_000;
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Tracks when our lease ends by our own clock, so we stop before anyone else may start.
struct LeaseClock {
    deadline: Mutex<Instant>,
}

impl LeaseClock {
    fn expired(&self) -> bool {
        Instant::now() >= *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn renew(&self, from: Instant, lease: Duration) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = from + lease;
    }
}

/// Runs one claimed job to the end of this attempt.
pub(crate) async fn run(shared: Arc<Shared>, job: JobRow, device: super::SlotDevice) {
    let lease = Lease {
        job_id: job.id.clone(),
        attempt: job.attempt,
        worker_id: shared.worker_id.clone(),
    };
    let control = Arc::new(SlotControl {
        stop: Arc::new(StopFlag::default()),
        poke: Notify::new(),
    });
    shared.running().insert(job.id.clone(), control.clone());
    if shared
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        control.stop.raise(StopReason::Shutdown);
    }
    let clock = Arc::new(LeaseClock {
        deadline: Mutex::new(Instant::now() + shared.queue.config().lease),
    });
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        lease.clone(),
        control.clone(),
        clock.clone(),
    ));

    let tmp = shared.artifacts.root().join("tmp");
    // Earlier attempts of this job are over (a later attempt fences them out); one that was
    // killed left its scratch space behind.
    for earlier in 1..job.attempt {
        let dir = tmp.join(format!("{}-attempt-{earlier}", job.id));
        if tokio::fs::remove_dir_all(&dir).await.is_ok() {
            tracing::info!(job = %job.id, attempt = earlier, "removed the scratch space of an earlier attempt");
        }
    }
    let scratch = tmp.join(format!("{}-attempt-{}", job.id, job.attempt));
    let result = match prepare(&shared, &job, device).await {
        Ok(spec) => match shared.executor.clone() {
            Some(executor) => {
                execute(&shared, &lease, &control, &clock, executor, spec, &scratch).await
            }
            None => Err(JobFailure::UserError(
                "no training engine configured: this kiln build or process cannot train".into(),
            )),
        },
        Err(failure) => Err(failure),
    };
    finish(&shared, &job, &lease, &control, &clock, result).await;
    heartbeat.abort();
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    shared.running().remove(&job.id);
}

/// Resolves files, model and resume point to local paths.
async fn prepare(
    shared: &Shared,
    job: &JobRow,
    device: super::SlotDevice,
) -> Result<JobSpec, JobFailure> {
    let infra = |e: StoreError| JobFailure::Infrastructure(format!("database: {e}"));
    let local_file = |id: String| async move {
        let row = shared
            .store
            .get_file(&job.project_id, &id)
            .await
            .map_err(infra)?
            .ok_or_else(|| JobFailure::UserError(format!("file {id} was deleted")))?;
        match shared.artifacts.local_path(&row.storage_key).await {
            Ok(path) => Ok::<PathBuf, JobFailure>(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(JobFailure::Infrastructure(
                format!("the bytes of file {id} are missing from the artifact store"),
            )),
            Err(e) => Err(JobFailure::Infrastructure(format!(
                "could not fetch file {id} from the artifact store: {e}"
            ))),
        }
    };
    let training_file = local_file(job.training_file.clone()).await?;
    let validation_file = match &job.validation_file {
        Some(id) => Some(local_file(id.clone()).await?),
        None => None,
    };
    let model_dir = if job.model.starts_with("ft:") {
        let parent = shared
            .queue
            .succeeded_job_for_model(&job.project_id, &job.model)
            .await
            .map_err(infra)?
            .ok_or_else(|| JobFailure::UserError(format!("model {} is gone", job.model)))?;
        shared
            .artifacts
            .local_dir(&model_key(&parent.id))
            .await
            .map_err(|e| {
                JobFailure::Infrastructure(format!(
                    "could not fetch model {} from the artifact store: {e}",
                    job.model
                ))
            })?
    } else {
        shared.models_dir.join(&job.model)
    };
    if tokio::fs::metadata(model_dir.join("config.json"))
        .await
        .is_err()
    {
        return Err(JobFailure::UserError(format!(
            "model {} has no config.json in {}",
            job.model,
            model_dir.display()
        )));
    }
    let resume = match shared
        .queue
        .latest_checkpoint(&job.id)
        .await
        .map_err(infra)?
    {
        Some(c) => Some(ResumeFrom {
            step: c.step.max(0) as u64,
            dir: shared
                .artifacts
                .local_dir(&c.storage_key)
                .await
                .map_err(|e| {
                    JobFailure::Infrastructure(format!(
                        "could not fetch the checkpoint of step {} from the artifact store: {e}",
                        c.step
                    ))
                })?,
            metrics: metrics_of(&c.metrics),
        }),
        None => None,
    };
    let method = job.method["type"]
        .as_str()
        .unwrap_or("supervised")
        .to_owned();
    let method_config = job.method[&method].clone();
    let hyperparameters = method_config["hyperparameters"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    Ok(JobSpec {
        models_dir: shared.models_dir.clone(),
        id: job.id.clone(),
        model: job.model.clone(),
        model_dir,
        training_file,
        validation_file,
        training_format: job.training_format.clone(),
        method,
        method_config,
        hyperparameters,
        seed: job.seed.max(0) as u64,
        attempt: job.attempt.max(0) as u32,
        resume,
        device,
    })
}

/// Where a fine-tuned model's files live in the artifact store.
pub(crate) fn model_key(job_id: &str) -> String {
    format!("models/{job_id}")
}

fn metrics_of(value: &Value) -> Metrics {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default()
}

/// Heartbeats every third of the lease (at most every 2 s) and at once when poked; turns
/// pending requests and a lost lease into the stop flag.
async fn heartbeat_loop(
    shared: Arc<Shared>,
    lease: Lease,
    control: Arc<SlotControl>,
    clock: Arc<LeaseClock>,
) {
    let length = shared.queue.config().lease;
    let every = (length / 3).min(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = control.poke.notified() => {}
        }
        let sent = Instant::now();
        match shared.queue.heartbeat(&lease).await {
            Ok(Some(c)) => {
                clock.renew(sent, length);
                if c.cancel_requested {
                    control.stop.raise(StopReason::Cancel);
                }
                if c.pause_requested {
                    control.stop.raise(StopReason::Pause);
                }
            }
            Ok(None) => {
                tracing::warn!(job = %lease.job_id, attempt = lease.attempt, "lease lost; stopping");
                control.stop.raise(StopReason::LeaseLost);
                return;
            }
            Err(e) => {
                tracing::warn!(job = %lease.job_id, error = %e, "heartbeat failed");
                if clock.expired() {
                    tracing::warn!(job = %lease.job_id, "lease ran out without a heartbeat; stopping");
                    control.stop.raise(StopReason::LeaseLost);
                    return;
                }
            }
        }
    }
}

/// Runs the executor on a dedicated thread and pumps its reports until it returns.
async fn execute(
    shared: &Arc<Shared>,
    lease: &Lease,
    control: &Arc<SlotControl>,
    clock: &Arc<LeaseClock>,
    executor: Arc<dyn super::JobExecutor>,
    spec: JobSpec,
    scratch: &Path,
) -> Result<JobOutcome, JobFailure> {
    if let Err(e) = tokio::fs::create_dir_all(scratch).await {
        return Err(JobFailure::Infrastructure(format!(
            "cannot create {}: {e}",
            scratch.display()
        )));
    }
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (result_tx, result_rx) = oneshot::channel();
    let stop = control.stop.clone();
    let thread_scratch = scratch.to_owned();
    let spawned = std::thread::Builder::new()
        .name(format!(
            "kiln-train-{}",
            &spec.id[spec.id.len().saturating_sub(8)..]
        ))
        .spawn(move || {
            let mut ctx = JobContext::new(stop, reports_tx, thread_scratch);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                executor.execute(&spec, &mut ctx)
            }));
            drop(ctx);
            let result = result.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(JobFailure::Infrastructure(format!(
                    "the training engine panicked: {what}"
                )))
            });
            let _ = result_tx.send(result);
        });
    if let Err(e) = spawned {
        return Err(JobFailure::Infrastructure(format!(
            "cannot start a training thread: {e}"
        )));
    }

    let mut buffer: Vec<NewEvent> = Vec::new();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            report = reports.recv() => match report {
                Some(Report::Progress(p, eta)) => buffer.push(metrics_event(p, eta)),
                Some(Report::Message(level, message)) => buffer.push(message_event(level, message)),
                Some(Report::Hyperparameters(values)) => {
                    flush(shared, lease, control, clock, &mut buffer, true).await;
                    let values = Value::Object(values);
                    let recorded = persist(clock, control, || shared.queue.record_hyperparameters(lease, &values)).await;
                    if recorded == Some(false) {
                        control.stop.raise(StopReason::LeaseLost);
                    }
                }
                Some(Report::Checkpoint { step, metrics, dir, done }) => {
                    flush(shared, lease, control, clock, &mut buffer, true).await;
                    let stored = store_checkpoint(shared, lease, control, clock, step, &metrics, &dir).await;
                    let _ = done.send(stored);
                }
                None => break,
            },
            _ = tick.tick() => flush(shared, lease, control, clock, &mut buffer, false).await,
        }
    }
    flush(shared, lease, control, clock, &mut buffer, true).await;
    result_rx.await.unwrap_or_else(|_| {
        Err(JobFailure::Infrastructure(
            "the training thread ended without a result".into(),
        ))
    })
}

fn metrics_event(p: Progress, eta: Option<f64>) -> NewEvent {
    let mut data = Map::new();
    data.insert("step".into(), json!(p.step));
    data.insert("total_steps".into(), json!(p.total_steps));
    data.insert("epoch".into(), json!(p.epoch));
    data.insert("examples_per_second".into(), json!(p.examples_per_second));
    data.insert("eta_seconds".into(), json!(eta.map(|s| s.round())));
    for (k, v) in &p.metrics {
        if v.is_finite() {
            data.insert(k.clone(), json!(v));
        }
    }
    let mut message = format!("Step {}/{}", p.step, p.total_steps);
    if let Some(loss) = p.metrics.get("train_loss") {
        message.push_str(&format!(": training loss={loss:.4}"));
    }
    if let Some(loss) = p.metrics.get("valid_loss") {
        message.push_str(&format!(", validation loss={loss:.4}"));
    }
    if let Some(r) = p.metrics.get("train_reward_mean") {
        message.push_str(&format!(", mean reward={r:.4}"));
    }
    if let Some(r) = p.metrics.get("valid_reward") {
        message.push_str(&format!(", validation reward={r:.4}"));
    }
    NewEvent {
        level: "info",
        kind: "metrics",
        message,
        data: Some(Value::Object(data)),
        step: Some(p.step.min(i64::MAX as u64) as i64),
        created_at: Utc::now(),
    }
}

fn message_event(level: Level, message: String) -> NewEvent {
    NewEvent {
        level: match level {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        },
        kind: "message",
        message,
        data: None,
        step: None,
        created_at: Utc::now(),
    }
}

/// Runs a database write, retrying while the database is unreachable and our lease lasts.
/// `None`: gave up (lease ran out, or an unexpected error).
async fn persist<T, F, Fut>(clock: &LeaseClock, control: &SlotControl, mut write: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(value) => return Some(value),
            Err(StoreError::Unavailable(e)) => {
                if clock.expired() || control.stop.get() == Some(StopReason::LeaseLost) {
                    tracing::warn!(error = %e, "database unreachable until the lease ran out");
                    return None;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, "unexpected database error");
                return None;
            }
        }
    }
}

/// Writes buffered events. `required`: retry until written (or the lease is gone);
/// otherwise one try, keeping the events for later when the database is away.
async fn flush(
    shared: &Shared,
    lease: &Lease,
    control: &SlotControl,
    clock: &LeaseClock,
    buffer: &mut Vec<NewEvent>,
    required: bool,
) {
    if buffer.is_empty() || control.stop.get() == Some(StopReason::LeaseLost) {
        buffer.clear();
        return;
    }
    let written = if required {
        persist(clock, control, || shared.queue.append_events(lease, buffer)).await
    } else {
        match shared.queue.append_events(lease, buffer).await {
            Ok(written) => Some(written),
            Err(StoreError::Unavailable(_)) => {
                if buffer.len() > MAX_BUFFERED_EVENTS {
                    let excess = buffer.len() - MAX_BUFFERED_EVENTS;
                    buffer.drain(..excess);
                    tracing::warn!(dropped = excess, "database away: dropped old events");
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not append events");
                None
            }
        }
    };
    if written == Some(false) {
        control.stop.raise(StopReason::LeaseLost);
    }
    buffer.clear();
}

async fn store_checkpoint(
    shared: &Shared,
    lease: &Lease,
    control: &SlotControl,
    clock: &LeaseClock,
    step: u64,
    metrics: &Metrics,
    dir: &Path,
) -> Result<(), JobFailure> {
    let key = format!(
        "checkpoints/{}/step-{step:010}-attempt-{}",
        lease.job_id, lease.attempt
    );
    if let Err(e) = shared.artifacts.put_dir(dir, &key).await {
        let _ = tokio::fs::remove_dir_all(dir).await;
        return Err(JobFailure::Infrastructure(format!(
            "could not store the checkpoint of step {step}: {e}"
        )));
    }
    let metrics = json!(metrics);
    let id = new_id("ftckpt-");
    let step_i = step.min(i64::MAX as u64) as i64;
    let recorded = persist(clock, control, || {
        shared
            .queue
            .record_checkpoint(lease, &id, step_i, &metrics, &key)
    })
    .await;
    match recorded {
        Some(true) => Ok(()),
        Some(false) | None => {
            control.stop.raise(StopReason::LeaseLost);
            let _ = shared.artifacts.delete_dir(&key).await;
            Err(JobFailure::Stopped(StopReason::LeaseLost))
        }
    }
}

/// Records how the attempt ended.
async fn finish(
    shared: &Arc<Shared>,
    job: &JobRow,
    lease: &Lease,
    control: &SlotControl,
    clock: &LeaseClock,
    result: Result<JobOutcome, JobFailure>,
) {
    let stop = control.stop.get();
    if stop == Some(StopReason::LeaseLost) {
        tracing::warn!(job = %job.id, attempt = lease.attempt, "attempt lost its lease; recording nothing");
        if let Ok(JobOutcome {
            model_dir: Some(dir),
            ..
        }) = &result
        {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
        return;
    }
    let outcome = match result {
        Ok(outcome) => {
            complete(shared, job, lease, control, clock, outcome).await;
            return;
        }
        Err(failure) => failure,
    };
    let new_state = match (&outcome, stop) {
        (JobFailure::Stopped(_), Some(_))
        | (JobFailure::Infrastructure(_), Some(StopReason::Shutdown)) => {
            persist(clock, control, || shared.queue.release_job(lease)).await
        }
        (JobFailure::UserError(message), _) => {
            let error = json!({"code": "training_failed", "message": message, "param": null});
            persist(clock, control, || {
                shared.queue.fail_job(lease, &error, false)
            })
            .await
        }
        (JobFailure::Infrastructure(message), _) => {
            let error = json!({"code": "infrastructure_error", "message": message, "param": null});
            persist(clock, control, || {
                shared.queue.fail_job(lease, &error, true)
            })
            .await
        }
        (JobFailure::Stopped(_), None) => {
            let error = json!({
                "code": "infrastructure_error",
                "message": "the training engine stopped without being asked to",
                "param": null,
            });
            persist(clock, control, || {
                shared.queue.fail_job(lease, &error, true)
            })
            .await
        }
    };
    match new_state {
        Some(Some(state)) => {
            tracing::info!(job = %job.id, attempt = lease.attempt, %state, reason = %outcome, "attempt ended")
        }
        _ => {
            tracing::warn!(job = %job.id, "could not record the end of the attempt; the reaper will")
        }
    }
}

/// Stores the model and the result file, then completes the job (fenced).
async fn complete(
    shared: &Arc<Shared>,
    job: &JobRow,
    lease: &Lease,
    control: &SlotControl,
    clock: &LeaseClock,
    outcome: JobOutcome,
) {
    let final_key = model_key(&job.id);
    if let Some(dir) = &outcome.model_dir
        && let Err(e) = shared.artifacts.put_dir(dir, &final_key).await
    {
        let error = json!({"code": "infrastructure_error", "param": null,
                "message": format!("could not store the fine-tuned model: {e}")});
        persist(clock, control, || {
            shared.queue.fail_job(lease, &error, true)
        })
        .await;
        return;
    }
    let Some(history) = persist(clock, control, || shared.queue.metrics_history(&job.id)).await
    else {
        return;
    };
    let csv = results_csv(&history);
    let file_id = new_id("file-");
    let storage_key = format!("files/{}/{}", job.project_id, file_id);
    let stored = async {
        let mut blob = shared.artifacts.begin().await?;
        blob.write(csv.as_bytes()).await?;
        let (bytes, sha256) = (blob.bytes(), blob.sha256_hex());
        shared.artifacts.commit(blob, &storage_key).await?;
        Ok::<_, std::io::Error>((bytes, sha256))
    };
    let (bytes, sha256) = match stored.await {
        Ok(v) => v,
        Err(e) => {
            let error = json!({"code": "infrastructure_error", "param": null,
                "message": format!("could not store the result file: {e}")});
            persist(clock, control, || {
                shared.queue.fail_job(lease, &error, true)
            })
            .await;
            return;
        }
    };
    let filename = format!("{}-results.csv", job.id);
    let result = ResultFile {
        id: &file_id,
        filename: &filename,
        bytes: bytes as i64,
        sha256: &sha256,
        storage_key: &storage_key,
    };
    let metrics = json!(outcome.metrics);
    let tokens = outcome
        .trained_tokens
        .map(|t| t.min(i64::MAX as u64) as i64);
    let state = persist(clock, control, || {
        shared.queue.complete_job(
            lease,
            &result,
            tokens,
            &metrics,
            outcome.model_info.as_ref(),
        )
    })
    .await;
    match state.flatten().as_deref() {
        Some("succeeded") => {
            tracing::info!(job = %job.id, attempt = lease.attempt, "job succeeded");
        }
        other => {
            tracing::info!(job = %job.id, state = ?other, "job did not complete; discarding its outputs");
            let _ = shared.artifacts.delete(&storage_key).await;
            if other.is_some() {
                let _ = shared.artifacts.delete_dir(&final_key).await;
            }
        }
    }
}

/// The result file: one row per step, `step` and `epoch` first, then every metric seen.
fn results_csv(history: &[(i64, Value)]) -> String {
    const SKIP: [&str; 4] = ["step", "epoch", "total_steps", "eta_seconds"];
    let mut columns: Vec<String> = history
        .iter()
        .filter_map(|(_, d)| d.as_object())
        .flat_map(|m| m.keys().cloned())
        .filter(|k| !SKIP.contains(&k.as_str()))
        .collect();
    columns.sort();
    columns.dedup();
    let mut out = String::from("step,epoch");
    for c in &columns {
        out.push(',');
        out.push_str(c);
    }
    out.push('\n');
    let cell = |v: &Value| match v {
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    for (step, data) in history {
        out.push_str(&step.to_string());
        out.push(',');
        out.push_str(&cell(&data["epoch"]));
        for c in &columns {
            out.push(',');
            out.push_str(&cell(&data[c.as_str()]));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::results_csv;
    use serde_json::json;

    #[test]
    fn the_results_csv_has_a_row_per_step_and_a_column_per_metric() {
        let csv = results_csv(&[
            (
                1,
                json!({"step": 1, "epoch": 0.5, "train_loss": 0.9, "total_steps": 2}),
            ),
            (
                2,
                json!({"step": 2, "epoch": 1.0, "train_loss": 0.5, "valid_loss": 0.7}),
            ),
        ]);
        assert_eq!(
            csv,
            "step,epoch,train_loss,valid_loss\n1,0.5,0.9,\n2,1.0,0.5,0.7\n"
        );
    }
}
