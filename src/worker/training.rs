//! The executor that runs jobs on kiln's candle training engine (`train/`), translating
//! between the engine's events and the worker's context: progress and messages become job
//! events, checkpoints go to the artifact store, and the job's stop requests become the
//! engine's stop signal.

use std::path::Path;

use serde_json::{Map, Value};

use super::engine::{
    JobContext, JobExecutor, JobFailure, JobOutcome, JobSpec, Level, Metrics, Progress, StopReason,
};
use crate::train::{
    self, HyperparameterRequest, StopRequest, StopSignal, TrainError, TrainEvent, TrainOutcome,
    TrainingJob,
};

/// Trains jobs with kiln's engine, each on the device of the slot that claimed it.
#[derive(Debug, Default)]
pub struct EngineExecutor;

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// What a job stop means to the engine.
fn stop_request(reason: StopReason) -> StopRequest {
    match reason {
        StopReason::Pause | StopReason::Shutdown => StopRequest::CheckpointAndStop,
        StopReason::Cancel | StopReason::LeaseLost => StopRequest::Cancel,
    }
}

fn failure(e: TrainError) -> JobFailure {
    if e.is_user_error() {
        JobFailure::UserError(e.to_string())
    } else {
        JobFailure::Infrastructure(e.to_string())
    }
}

/// A job's failure, with running out of device memory told as what it is and what to change
/// (once kiln has no smaller batch left to retry with, see `smaller_batch`). `batch` is the
/// batch size and accumulation the failed attempt resolved, where it got that far.
fn job_failure(job: &JobSpec, e: TrainError, batch: Option<(u32, u32)>) -> JobFailure {
    let text = e.to_string();
    if !e.is_out_of_memory() {
        return failure(e);
    }
    let batch = match (batch, job.hyperparameters.get("batch_size")) {
        (Some((1, _)), _) => "batch size 1".to_owned(),
        (_, Some(Value::Number(n))) => format!("batch size {n}"),
        (Some((b, _)), _) => format!("batch size {b}, the smallest kiln's retries reached"),
        (None, _) => "the automatically chosen batch size".to_owned(),
    };
    JobFailure::UserError(format!(
        "{} ran out of memory training this job at {batch}: lower `batch_size` and raise \
         `gradient_accumulation_steps` to keep the same effective batch, or lower \
         `max_length`. ({text})",
        job.device.spec
    ))
}

/// The hyperparameters of a retry after running out of memory at `batch` × `accumulation`:
/// half the batch (rounded up) and twice the accumulation, so the effective batch stays (one
/// example more when the batch was odd). `None` where the job does not allow it: its request
/// (as posted, not a retry's) fixed `batch_size` (kiln changes only what it chose), the batch
/// is already 1, or the accumulation would pass its limit.
fn smaller_batch(
    request: &Map<String, Value>,
    batch: u32,
    accumulation: u32,
) -> Option<Map<String, Value>> {
    let chosen_by_kiln = match request.get("batch_size") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s == "auto",
        Some(_) => false,
    };
    if !chosen_by_kiln || batch <= 1 || accumulation.saturating_mul(2) > MAX_ACCUMULATION {
        return None;
    }
    let mut next = request.clone();
    next.insert("batch_size".into(), Value::from(batch.div_ceil(2)));
    next.insert(
        "gradient_accumulation_steps".into(),
        Value::from(accumulation * 2),
    );
    Some(next)
}

/// The largest `gradient_accumulation_steps` a job may have (the API's limit).
const MAX_ACCUMULATION: u32 = 1024;

impl JobExecutor for EngineExecutor {
    fn execute(&self, job: &JobSpec, ctx: &mut JobContext) -> Result<JobOutcome, JobFailure> {
        let mut request = job.hyperparameters.clone();
        loop {
            let attempt = attempt(job, ctx, &request);
            if let Some(f) = attempt.checkpoint_failure {
                return Err(f);
            }
            let e = match attempt.outcome {
                Ok(outcome) => return finished(outcome, ctx),
                Err(e) => e,
            };
            let retry = match attempt.batch {
                // A resumed run keeps its batch: its data position counts in batches.
                Some((batch, accumulation))
                    if attempt.checkpoints == 0 && job.resume.is_none() && e.is_out_of_memory() =>
                {
                    smaller_batch(&job.hyperparameters, batch, accumulation)
                }
                _ => None,
            };
            let Some(next) = retry else {
                return Err(job_failure(job, e, attempt.batch));
            };
            let batch = attempt.batch.map_or(0, |(b, _)| b);
            ctx.log(
                Level::Warn,
                format!(
                    "{} ran out of memory at batch size {batch}; starting again at batch size {} \
                     with {} gradient accumulation steps, the same effective batch.",
                    job.device.spec, next["batch_size"], next["gradient_accumulation_steps"]
                ),
            );
            // The failed attempt's files go; nothing of it was saved (no checkpoint).
            let _ = std::fs::remove_dir_all(ctx.scratch_dir().join("work"));
            let _ = std::fs::remove_dir_all(ctx.scratch_dir().join("model"));
            request = next;
        }
    }
}

/// What one run of the engine left: its outcome, the batch size and accumulation it resolved,
/// and how many checkpoints it saved.
struct Attempt {
    outcome: Result<TrainOutcome, TrainError>,
    batch: Option<(u32, u32)>,
    checkpoints: usize,
    checkpoint_failure: Option<JobFailure>,
}

/// Runs the engine once with these hyperparameters.
fn attempt(job: &JobSpec, ctx: &mut JobContext, request: &Map<String, Value>) -> Attempt {
    // kiln's knobs next to OpenAI's; the API checked them when the job was created.
    let hyperparameters: HyperparameterRequest =
        match serde_json::from_value(Value::Object(request.clone())) {
            Ok(h) => h,
            Err(e) => {
                return Attempt {
                    outcome: Err(TrainError::Data(format!("hyperparameters: {e}"))),
                    batch: None,
                    checkpoints: 0,
                    checkpoint_failure: None,
                };
            }
        };
    let scratch = ctx.scratch_dir().to_owned();
    let spec = TrainingJob {
        base_model: job.model_dir.clone(),
        training_file: job.training_file.clone(),
        validation_file: job.validation_file.clone(),
        hyperparameters,
        seed: job.seed,
        work_dir: scratch.join("work"),
        model_dir: scratch.join("model"),
        grader: job.method_config.get("grader").cloned(),
        models_dir: Some(job.models_dir.clone()),
        resume_from: job.resume.as_ref().map(|r| r.dir.clone()),
        device: job.device.device.clone(),
    };
    let stop = StopSignal::default();
    let mut checkpoint_failure: Option<JobFailure> = None;
    let mut checkpoints = 0usize;
    let mut batch: Option<(u32, u32)> = None;
    let mut last_step: Option<(f64, u64, f64)> = None; // train loss, total steps, examples/s
    let mut on_event = |event: &TrainEvent| {
        if let Some(reason) = ctx.should_stop() {
            stop.request(stop_request(reason));
        }
        match event {
            TrainEvent::Started {
                task,
                hyperparameters,
                notes,
                train_examples,
                valid_examples,
                total_steps,
                labels,
                ..
            } => {
                batch = Some((
                    hyperparameters.batch_size,
                    hyperparameters.gradient_accumulation_steps,
                ));
                ctx.record_hyperparameters(hyperparameters.echo());
                let labels = if labels.is_empty() {
                    String::new()
                } else {
                    format!(", labels: {}", labels.join(", "))
                };
                ctx.log(
                        Level::Info,
                        format!("Training {task} on {}: {train_examples} training and {valid_examples} validation examples, {total_steps} steps{labels}.", job.device.spec),
                    );
                for note in notes {
                    ctx.log(Level::Info, format!("Chose {note}."));
                }
            }
            TrainEvent::Message { text } => ctx.log(Level::Info, text.clone()),
            TrainEvent::Step(p) => {
                last_step = Some((p.train_loss, p.total_steps, p.examples_per_second));
                let mut metrics = Metrics::new();
                metrics.insert("train_loss".into(), p.train_loss);
                metrics.insert("learning_rate".into(), p.learning_rate);
                metrics.insert("grad_norm".into(), p.grad_norm);
                metrics.insert("tokens_per_second".into(), p.tokens_per_second);
                metrics.extend(p.extra.iter().map(|(k, v)| (k.clone(), *v)));
                ctx.report_progress(Progress {
                    step: p.step,
                    total_steps: p.total_steps,
                    epoch: p.epoch,
                    examples_per_second: Some(p.examples_per_second),
                    metrics,
                });
            }
            TrainEvent::Evaluated(e) => {
                let mut metrics: Metrics = e.metrics.clone();
                let (loss, total_steps, speed) = last_step.unwrap_or((f64::NAN, 0, 0.0));
                if loss.is_finite() {
                    metrics.insert("train_loss".into(), loss);
                }
                ctx.report_progress(Progress {
                    step: e.step,
                    total_steps,
                    epoch: e.epoch,
                    examples_per_second: Some(speed),
                    metrics,
                });
                if !e.details.is_null() {
                    ctx.log(
                        Level::Info,
                        format!("Evaluation at step {}: {}", e.step, e.details),
                    );
                }
            }
            TrainEvent::Checkpoint(c) => {
                if checkpoint_failure.is_none() {
                    match ctx.save_checkpoint(c.step, &c.metrics, |dst| copy_dir(&c.dir, dst)) {
                        Ok(()) => checkpoints += 1,
                        Err(f) => {
                            checkpoint_failure = Some(f);
                            stop.request(StopRequest::Cancel);
                        }
                    }
                }
            }
        }
    };
    let outcome = train::run(&spec, &mut on_event, &stop);
    Attempt {
        outcome,
        batch,
        checkpoints,
        checkpoint_failure,
    }
}

/// A finished run's outcome as the worker's.
fn finished(outcome: TrainOutcome, ctx: &mut JobContext) -> Result<JobOutcome, JobFailure> {
    match outcome {
        TrainOutcome::Finished(summary) => {
            let mut metrics = summary.metrics.clone();
            if let Some(base) = &summary.baseline_metrics {
                for (k, v) in base {
                    metrics.insert(format!("baseline_{k}"), *v);
                }
            }
            metrics.insert(
                "train_examples_per_second".into(),
                summary.train_examples_per_second,
            );
            Ok(JobOutcome {
                trained_tokens: Some(summary.trained_tokens),
                metrics,
                model_dir: Some(summary.model_dir),
                model_info: Some(serde_json::json!({
                    "task": summary.task,
                    "labels": summary.labels,
                    "selected_step": summary.selected_step,
                })),
            })
        }
        TrainOutcome::Stopped { .. } => Err(JobFailure::Stopped(
            ctx.should_stop().unwrap_or(StopReason::Shutdown),
        )),
    }
}

/// A job as `dry_run` measures it: local paths, the request's hyperparameters and seed.
#[derive(Debug, Clone)]
pub struct EstimateRequest {
    pub model_dir: std::path::PathBuf,
    pub training_file: std::path::PathBuf,
    pub validation_file: Option<std::path::PathBuf>,
    pub hyperparameters: serde_json::Map<String, Value>,
    pub seed: u64,
    pub grader: Option<Value>,
    pub models_dir: Option<std::path::PathBuf>,
    /// The device the steps are timed on.
    pub device: candle_core::Device,
}

/// Steps timed by an estimate (after one warm-up step).
const ESTIMATE_STEPS: u64 = 3;

/// Runs [`train::estimate`] on an OS thread of its own (it trains for a few steps), in a
/// scratch directory that is removed afterwards. User errors (data the engine cannot train
/// on, bad settings) come back as [`JobFailure::UserError`].
pub async fn estimate(request: EstimateRequest) -> Result<train::Estimate, JobFailure> {
    let hyperparameters: HyperparameterRequest =
        serde_json::from_value(Value::Object(request.hyperparameters.clone()))
            .map_err(|e| JobFailure::UserError(format!("hyperparameters: {e}")))?;
    let scratch =
        std::env::temp_dir().join(format!("kiln-estimate-{}", uuid::Uuid::new_v4().simple()));
    let spec = TrainingJob {
        base_model: request.model_dir,
        training_file: request.training_file,
        validation_file: request.validation_file,
        hyperparameters,
        seed: request.seed,
        work_dir: scratch.join("work"),
        model_dir: scratch.join("model"),
        grader: request.grader,
        models_dir: request.models_dir,
        resume_from: None,
        device: request.device,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kiln-estimate".into())
        .spawn(move || {
            let result = train::estimate(&spec, ESTIMATE_STEPS);
            let _ = std::fs::remove_dir_all(&scratch);
            let _ = tx.send(result);
        })
        .map_err(|e| JobFailure::Infrastructure(format!("cannot start an estimate thread: {e}")))?;
    match rx.await {
        Ok(result) => result.map_err(failure),
        Err(_) => Err(JobFailure::Infrastructure(
            "the estimate thread stopped without an answer".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_memory_halves_a_batch_kiln_chose_and_keeps_the_effective_batch() {
        let auto = serde_json::json!({"batch_size": "auto", "n_epochs": 2});
        let auto = auto.as_object().unwrap();
        let next = smaller_batch(auto, 16, 1).unwrap();
        assert_eq!(next["batch_size"], 8);
        assert_eq!(next["gradient_accumulation_steps"], 2);
        assert_eq!(next["n_epochs"], 2, "the rest of the request stays");
        // Judged on the job's request, not the previous retry's (which names a number).
        let again = smaller_batch(auto, 8, 2).unwrap();
        assert_eq!(
            (
                again["batch_size"].clone(),
                again["gradient_accumulation_steps"].clone()
            ),
            (4.into(), 4.into())
        );
        // Odd batches round up: 5 × 1 becomes 3 × 2.
        let odd = smaller_batch(&Map::new(), 5, 1).unwrap();
        assert_eq!(
            (
                odd["batch_size"].clone(),
                odd["gradient_accumulation_steps"].clone()
            ),
            (3.into(), 2.into())
        );
        // The user's own batch size is not changed, nor a batch of 1, nor past the API's limit.
        let fixed = serde_json::json!({"batch_size": 16});
        assert!(smaller_batch(fixed.as_object().unwrap(), 16, 1).is_none());
        assert!(smaller_batch(auto, 1, 8).is_none());
        assert!(smaller_batch(auto, 4, 1024).is_none());
        assert!(smaller_batch(auto, 4, 512).is_some());
    }
}
