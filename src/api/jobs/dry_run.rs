//! `dry_run: true` on job creation (kiln): the job as it would run, measured by the engine,
//! with nothing queued.

use chrono::Utc;
use serde_json::{Value, json};

use super::{bad, base_model_dir};
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::store::files::FileRow;

/// A validated create request that `dry_run` plans instead of queueing.
pub(super) struct PlannedJob<'a> {
    pub(super) project_id: &'a str,
    pub(super) model: &'a str,
    pub(super) training_file: &'a FileRow,
    pub(super) validation_file: Option<&'a FileRow>,
    pub(super) suffix: Option<&'a str>,
    pub(super) seed: i64,
    pub(super) metadata: Option<&'a Value>,
    pub(super) method: &'a Value,
    pub(super) priority: i64,
    pub(super) device_memory: Option<&'a super::DeviceMemory>,
}

/// Estimates run one at a time per process: each trains for a few steps.
static ESTIMATES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// `dry_run: true` (kiln): the job as it would run, without queueing anything. The engine
/// reads the data and model, resolves every `"auto"`, and times a few real training steps on
/// this machine; the answer is a job object (placeholder id, `dry_run: true`) whose method
/// carries the resolved hyperparameters, plus an `estimate`.
pub(super) async fn dry_run_job(state: &AppState, job: &PlannedJob<'_>) -> Result<Value, ApiError> {
    let Ok(_permit) = ESTIMATES.try_acquire() else {
        return Err(ApiError::TooManyRequests(
            "Another dry run is being measured on this server; retry in a few seconds.".into(),
        ));
    };
    let fetch = |row: &FileRow| {
        let key = row.storage_key.clone();
        let artifacts = state.artifacts.clone();
        async move {
            artifacts
                .local_path(&key)
                .await
                .map_err(|e| ApiError::Internal(anyhow::anyhow!("fetching a training file: {e}")))
        }
    };
    let training_file = fetch(job.training_file).await?;
    let validation_file = match job.validation_file {
        Some(row) => Some(fetch(row).await?),
        None => None,
    };
    let model_dir = if job.model.starts_with("ft:") {
        let parent = state
            .queue
            .succeeded_job_for_model(job.project_id, job.model)
            .await?
            .ok_or_else(|| bad(format!("The model '{}' is gone.", job.model), "model"))?;
        state
            .artifacts
            .local_dir(&crate::worker::model_key(&parent.id))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("fetching the model: {e}")))?
    } else {
        base_model_dir(&state.models_dir, job.model).ok_or_else(|| {
            bad(
                format!("The model '{}' does not exist.", job.model),
                "model",
            )
        })?
    };
    let kind = job.method["type"]
        .as_str()
        .unwrap_or("supervised")
        .to_owned();
    let requested = job.method[&kind]["hyperparameters"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let estimate = crate::worker::estimate(crate::worker::EstimateRequest {
        model_dir,
        training_file,
        validation_file,
        hyperparameters: requested.clone(),
        seed: job.seed.max(0) as u64,
        grader: job.method[&kind].get("grader").cloned(),
        models_dir: Some(state.models_dir.as_ref().clone()),
        device: state.estimate_device.device.clone(),
    })
    .await
    .map_err(|f| match f {
        crate::worker::JobFailure::UserError(message) => ApiError::BadRequest {
            message: format!("This job could not run: {message}"),
            param: Some("training_file".into()),
            code: Some("invalid_training_job"),
        },
        other => ApiError::Internal(anyhow::anyhow!("estimating the job: {other:?}")),
    })?;

    // The method as the job would record it: every "auto" replaced by the value it resolves to.
    let mut resolved = requested;
    for (k, v) in estimate.hyperparameters.echo() {
        resolved.insert(k, v);
    }
    let mut method = job.method.clone();
    method[&kind]["hyperparameters"] = Value::Object(resolved.clone());
    let now = Utc::now().timestamp();
    metrics::counter!("kiln_job_dry_runs_total").increment(1);
    let estimate_object = json!({
        "task": estimate.task,
        "train_examples": estimate.train_examples,
        "valid_examples": estimate.valid_examples,
        "labels": estimate.labels,
        "total_steps": estimate.total_steps,
        "train_tokens_per_epoch": estimate.train_tokens_per_epoch,
        "trained_tokens": estimate.trained_tokens,
        "notes": estimate.notes,
        "measured_steps": estimate.measured_steps,
        "seconds_per_step": estimate.seconds_per_step,
        "setup_seconds": estimate.setup_seconds,
        "evaluations": estimate.evaluations,
        "evaluation_seconds": estimate.evaluation_seconds,
        "estimated_seconds": estimate.estimated_seconds,
        "ran_to_completion": estimate.ran_to_completion,
        "device": state.estimate_device.spec.to_string(),
        "device_memory": job.device_memory.map(super::DeviceMemory::describe),
    });
    Ok(json!({
        "id": "ftjob-dry-run",
        "object": "fine_tuning.job",
        "created_at": now,
        "model": job.model,
        "organization_id": job.project_id,
        "seed": job.seed,
        "status": "queued",
        "training_file": job.training_file.id,
        "validation_file": job.validation_file.map(|f| f.id.clone()),
        "hyperparameters": {
            "n_epochs": resolved.get("n_epochs"),
            "batch_size": resolved.get("batch_size"),
            "learning_rate_multiplier": resolved.get("learning_rate_multiplier"),
        },
        "result_files": [],
        "error": null,
        "fine_tuned_model": null,
        "finished_at": null,
        "trained_tokens": estimate.trained_tokens,
        "method": method,
        "estimated_finish": now + estimate.estimated_seconds.round() as i64,
        "integrations": null,
        "metadata": job.metadata,
        "user_provided_suffix": job.suffix,
        "priority": job.priority,
        "device_memory_gb": job.device_memory.map(|m| super::gigabytes(m.bytes)),
        "device_memory_estimated": job.device_memory.is_some_and(|m| m.estimate.is_some()),
        "dry_run": true,
        "estimate": estimate_object,
    }))
}
