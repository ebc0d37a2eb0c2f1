//! The fine-tuning jobs API, as the official OpenAI client calls it, with kiln's additions
//! (`priority`, `paused`, `metrics`, `progress`, kiln's knobs in the method's
//! hyperparameters) inside the same objects.
//!
//! A paused job is reported with `status: "queued"` (it waits to be resumed, holding no
//! slot) and `paused: true`: OpenAI's clients validate `status` against a fixed list that has
//! no "paused".

mod dry_run;
mod method;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery};
use super::pagination::{ListParams, list_body};
use super::{AppState, Caller, unix};
use crate::queue::{
    CheckpointRow, EventRow, InsertOutcome, JobRow, NewJob, Transition, is_terminal,
};
use crate::store::files::{FileRow, Order};
use crate::store::new_id;

/// Fields a create request may carry.
const CREATE_FIELDS: [&str; 12] = [
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "metadata",
    "method",
    "hyperparameters",
    "integrations",
    "priority",
    "dry_run",
    "device_memory_gb",
];
const DEFAULT_PRIORITY: i64 = 5;

/// The wire shape of a job.
pub fn job_object(row: &JobRow) -> Value {
    let kind = row.method["type"].as_str().unwrap_or("supervised");
    let hp = &row.method[kind]["hyperparameters"];
    let mut hyperparameters = json!({
        "n_epochs": hp["n_epochs"],
        "batch_size": hp["batch_size"],
        "learning_rate_multiplier": hp["learning_rate_multiplier"],
    });
    if kind == "dpo" {
        hyperparameters["beta"] = hp["beta"].clone();
    }
    let status = match row.state.as_str() {
        "paused" => "queued",
        other => other,
    };
    let progress = row.progress.as_ref().map(|p| {
        json!({
            "step": p["step"],
            "total_steps": p["total_steps"],
            "epoch": p["epoch"],
            "examples_per_second": p["examples_per_second"],
            "eta_seconds": p["eta_seconds"],
        })
    });
    let estimated_finish = match (&row.state[..], &row.progress) {
        ("running", Some(p)) => p["eta_seconds"]
            .as_f64()
            .map(|eta| Utc::now().timestamp() + eta.round() as i64),
        _ => None,
    };
    json!({
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": unix(row.created_at),
        "model": row.model,
        "organization_id": row.project_id,
        "seed": row.seed,
        "status": status,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "hyperparameters": hyperparameters,
        "result_files": row.result_files,
        "error": row.error,
        "fine_tuned_model": row.fine_tuned_model,
        "finished_at": row.finished_at.map(unix),
        "trained_tokens": row.trained_tokens,
        "method": row.method,
        "estimated_finish": estimated_finish,
        "integrations": row.integrations,
        "metadata": row.metadata,
        "user_provided_suffix": row.suffix,
        "priority": row.priority,
        "paused": row.state == "paused",
        "cancel_requested": row.cancel_requested_at.is_some() && row.state == "running",
        "attempt": row.attempt,
        "metrics": row.current_metrics,
        "progress": progress,
        "device_memory_gb": row.device_memory_bytes.map(gigabytes),
        "device_memory_estimated": row.device_memory_estimated,
    })
}

/// Bytes as (decimal) gigabytes, to three decimals.
fn gigabytes(bytes: i64) -> f64 {
    (bytes as f64 / 1e6).round() / 1e3
}

/// Largest `device_memory_gb` a request may state.
const MAX_DEVICE_MEMORY_GB: f64 = 100_000.0;

/// The device memory a job needs: `device_memory_gb` as requested, else kiln's estimate from
/// the base model, the method and the training file (`train::memory`). `Ok(None)` when the
/// base model cannot be read to estimate (the job then fits anywhere).
async fn device_memory(
    state: &AppState,
    requested: Option<&Value>,
    base_model: &str,
    method: &Value,
    train_row: &FileRow,
) -> Result<Option<DeviceMemory>, ApiError> {
    match requested {
        None | Some(Value::Null) => {}
        Some(v) => {
            return match v.as_f64() {
                Some(gb) if gb.is_finite() && gb > 0.0 && gb <= MAX_DEVICE_MEMORY_GB => {
                    Ok(Some(DeviceMemory {
                        bytes: ((gb * 1e9).round() as i64).max(1),
                        estimate: None,
                    }))
                }
                _ => Err(bad(
                    format!(
                        "device_memory_gb must be a number of gigabytes above 0 and at most \
                         {MAX_DEVICE_MEMORY_GB}, got {v}"
                    ),
                    "device_memory_gb",
                )),
            };
        }
    }
    let Some(dir) = base_model_dir(&state.models_dir, base_model) else {
        return Ok(None);
    };
    let id = base_model.to_owned();
    let described = tokio::task::spawn_blocking(move || {
        let model = crate::models::describe(&id, &dir).ok()?;
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()?;
        Some((model, config))
    })
    .await
    .ok()
    .flatten();
    let Some((model, config)) = described else {
        return Ok(None);
    };
    let Some(family) = model.family else {
        return Ok(None);
    };
    let kind = method["type"].as_str().unwrap_or("supervised");
    let hyperparameters = method[kind]["hyperparameters"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let estimate = crate::train::memory::estimate(&crate::train::memory::MemoryInputs {
        parameters: model.parameters,
        config: &config,
        family,
        method: kind,
        hyperparameters: &hyperparameters,
        train_examples: train_row
            .validation
            .as_ref()
            .and_then(|v| v["examples"].as_u64())
            .unwrap_or(1),
        train_bytes: train_row.bytes.max(0) as u64,
    });
    Ok(Some(DeviceMemory {
        bytes: estimate.total_bytes.min(i64::MAX as u64).max(1) as i64,
        estimate: Some(estimate),
    }))
}

/// What a job needs on its device, and the estimate's parts when kiln estimated it.
pub(super) struct DeviceMemory {
    pub(super) bytes: i64,
    pub(super) estimate: Option<crate::train::memory::MemoryEstimate>,
}

impl DeviceMemory {
    fn column(&self) -> (i64, bool) {
        (self.bytes, self.estimate.is_some())
    }

    /// The dry run's account of it.
    pub(super) fn describe(&self) -> Value {
        match &self.estimate {
            None => json!({"gb": gigabytes(self.bytes), "bytes": self.bytes, "estimated": false}),
            Some(e) => json!({
                "gb": gigabytes(self.bytes),
                "bytes": self.bytes,
                "estimated": true,
                "weights_bytes": e.weights_bytes,
                "gradients_and_optimizer_bytes": e.optimizer_bytes,
                "activations_bytes": e.activation_bytes,
                "batch_size": e.batch_size,
                "sequence_length": e.sequence_length,
            }),
        }
    }
}

fn event_object(e: &EventRow) -> Value {
    json!({
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": unix(e.created_at),
        "level": e.level,
        "message": e.message,
        "type": e.kind,
        "data": e.data,
    })
}

fn checkpoint_object(c: &CheckpointRow) -> Value {
    let mut metrics = match &c.metrics {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    metrics.insert("step".into(), json!(c.step as f64));
    json!({
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(c.created_at),
        "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": c.job_id,
        "metrics": metrics,
        "step_number": c.step,
    })
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        param: Some(param.to_owned()),
        code: None,
    }
}

fn bad_code(message: impl Into<String>, param: Option<&str>, code: &'static str) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        param: param.map(str::to_owned),
        code: Some(code),
    }
}

fn optional_string<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad(format!("{field} must be a string, got {other}"), field)),
    }
}

/// A base model id is a relative path of plain names under the models directory.
fn base_model_dir(models_dir: &Path, id: &str) -> Option<PathBuf> {
    let plain = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (id.len() <= 512 && id.split('/').all(plain)).then(|| models_dir.join(id))
}

/// The model's root base id, or 400 naming `model`.
async fn resolve_model(
    state: &AppState,
    project_id: &str,
    model: &str,
) -> Result<String, ApiError> {
    let missing = || {
        bad_code(
            format!(
                "The model '{model}' does not exist or you do not have access to it. Base models \
                 are directories with a config.json under the models directory; fine-tuned \
                 models are the `ft:` ids of succeeded jobs."
            ),
            Some("model"),
            "model_not_found",
        )
    };
    if model.starts_with("ft:") {
        let parent = state
            .queue
            .succeeded_job_for_model(project_id, model)
            .await?
            .ok_or_else(missing)?;
        return Ok(parent.base_model);
    }
    let dir = base_model_dir(&state.models_dir, model).ok_or_else(missing)?;
    match tokio::fs::metadata(dir.join("config.json")).await {
        Ok(m) if m.is_file() => Ok(model.to_owned()),
        _ => Err(missing()),
    }
}

/// The data formats each model family trains on in this version of kiln.
fn formats_for(model_type: &str) -> Option<&'static [&'static str]> {
    use crate::models::Family;
    if crate::nn::decoder::DecoderConfig::is_decoder_type(model_type) {
        return Some(&[
            "chat",
            "prompt_completion",
            "preference",
            "reinforcement",
            "domain_text",
        ]);
    }
    match crate::models::family_of(model_type) {
        Some(Family::Encoder) => Some(&[
            "text_classification",
            "multi_label_classification",
            "domain_text",
        ]),
        Some(Family::Vision) => Some(&["image_classification"]),
        _ => None,
    }
}

/// 400 when the base model's family cannot train on the data's format (a BERT on chat data,
/// a Llama on labelled text), before anything is queued. Models kiln does not know are left
/// to the engine.
async fn check_model_trains(
    state: &AppState,
    base_model: &str,
    format: &str,
) -> Result<(), ApiError> {
    let Some(dir) = base_model_dir(&state.models_dir, base_model) else {
        return Ok(());
    };
    let Ok(text) = tokio::fs::read_to_string(dir.join("config.json")).await else {
        return Ok(());
    };
    let model_type = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|c| {
            c.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    match formats_for(&model_type) {
        Some(formats) if !formats.contains(&format) => Err(bad_code(
            format!(
                "The model's architecture ({model_type}) cannot be fine-tuned on {format} data; it trains on {}.",
                formats.join(", ")
            ),
            Some("training_file"),
            "invalid_training_file",
        )),
        _ => Ok(()),
    }
}

/// A processed fine-tuning file of the project, and its detected format.
async fn training_data(
    state: &AppState,
    project_id: &str,
    id: &str,
    param: &str,
) -> Result<(FileRow, String), ApiError> {
    let file =
        state.store.get_file(project_id, id).await?.ok_or_else(|| {
            bad_code(format!("No such file: '{id}'"), Some(param), "invalid_file")
        })?;
    if file.purpose != "fine-tune" {
        return Err(bad_code(
            format!(
                "File '{id}' has purpose '{}'; training data must be uploaded with purpose 'fine-tune'.",
                file.purpose
            ),
            Some(param),
            "invalid_file",
        ));
    }
    match file.status.as_str() {
        "processed" => {}
        "uploaded" => {
            return Err(bad_code(
                format!(
                    "File '{id}' is still being validated; retry when its status is 'processed'."
                ),
                Some(param),
                "file_not_ready",
            ));
        }
        _ => {
            return Err(bad_code(
                format!(
                    "File '{id}' failed validation: {}",
                    file.status_details.as_deref().unwrap_or("unknown problem")
                ),
                Some(param),
                "invalid_file",
            ));
        }
    }
    let format = file
        .validation
        .as_ref()
        .and_then(|v| v["format"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            bad_code(
                format!("File '{id}' has no detected dataset format."),
                Some(param),
                "invalid_file",
            )
        })?;
    let image_paths = file
        .validation
        .as_ref()
        .and_then(|v| v["image_paths"].as_u64())
        .unwrap_or(0);
    if image_paths > 0 {
        return Err(bad_code(
            format!(
                "File '{id}' names {image_paths} images by path, and a JSONL file cannot reach the images of another upload: upload the images and this file together as one zip, with the file as metadata.jsonl at its top (paths relative to it), or embed the images as data URLs."
            ),
            Some(param),
            "invalid_file",
        ));
    }
    Ok((file, format))
}

fn check_metadata(value: Option<&Value>) -> Result<Option<Value>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if map.len() > 16 {
                return Err(bad("metadata may have at most 16 keys", "metadata"));
            }
            for (k, v) in map {
                let param = format!("metadata.{k}");
                if k.is_empty() || k.chars().count() > 64 {
                    return Err(bad("metadata keys are 1 to 64 characters", "metadata"));
                }
                match v {
                    Value::String(s) if s.chars().count() <= 512 => {}
                    _ => {
                        return Err(ApiError::BadRequest {
                            message: format!(
                                "metadata values must be strings of at most 512 characters ({k})"
                            ),
                            param: Some(param),
                            code: None,
                        });
                    }
                }
            }
            Ok(Some(Value::Object(map.clone())))
        }
        Some(other) => Err(bad(
            format!("metadata must be an object, got {other}"),
            "metadata",
        )),
    }
}

/// Canonical JSON (sorted keys at every level), so the same request always hashes the same.
fn canonical(value: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match raw.to_str() {
        Ok(k) if !k.trim().is_empty() && k.len() <= 255 => Ok(Some(k.trim().to_owned())),
        _ => Err(bad(
            "The Idempotency-Key header must be 1 to 255 visible ASCII characters.",
            "Idempotency-Key",
        )),
    }
}

/// `POST /v1/fine_tuning/jobs`: validates everything, then queues the job in one statement.
/// Nothing is queued for a rejected request.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let key = idempotency_key(&headers)?;
    let Value::Object(fields) = &body else {
        return Err(ApiError::bad_request(
            "The body must be a JSON object.",
            None,
        ));
    };
    if let Some(unknown) = fields.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(bad(format!("Unknown parameter: '{unknown}'."), unknown));
    }
    let model = optional_string(fields, "model")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("Missing required parameter: 'model'.", "model"))?;
    let training_file = optional_string(fields, "training_file")?
        .filter(|f| !f.is_empty())
        .ok_or_else(|| {
            bad(
                "Missing required parameter: 'training_file'.",
                "training_file",
            )
        })?;
    let validation_file = optional_string(fields, "validation_file")?;
    let suffix = optional_string(fields, "suffix")?;
    if let Some(s) = suffix {
        let ok = !s.is_empty()
            && s.chars().count() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(bad(
                "suffix must be 1 to 64 characters of letters, digits, '-', '_' and '.'",
                "suffix",
            ));
        }
    }
    let seed = match fields.get("seed") {
        None | Some(Value::Null) => rand::random::<u32>() as i64 & 0x7fff_ffff,
        Some(v) => match v.as_i64() {
            Some(n) if (0..=i32::MAX as i64).contains(&n) => n,
            _ => {
                return Err(bad(
                    format!("seed must be an integer from 0 to {}", i32::MAX),
                    "seed",
                ));
            }
        },
    };
    let priority = match fields.get("priority") {
        None | Some(Value::Null) => DEFAULT_PRIORITY,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=10).contains(&n) => n,
            _ => {
                return Err(bad(
                    "priority must be an integer from 1 (most urgent) to 10",
                    "priority",
                ));
            }
        },
    };
    let metadata = check_metadata(fields.get("metadata"))?;
    let integrations = match fields.get("integrations") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if items.is_empty() => Some(json!([])),
        Some(_) => {
            return Err(bad(
                "kiln does not support integrations (such as wandb) yet; omit them.",
                "integrations",
            ));
        }
    };

    let dry_run = match fields.get("dry_run") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                format!("dry_run must be true or false, got {other}"),
                "dry_run",
            ));
        }
    };

    let base_model = resolve_model(&state, &caller.project_id, model).await?;
    let (train_row, format) =
        training_data(&state, &caller.project_id, training_file, "training_file").await?;
    let mut valid_row = None;
    if let Some(v) = validation_file {
        let (row, v_format) =
            training_data(&state, &caller.project_id, v, "validation_file").await?;
        valid_row = Some(row);
        if v_format != format {
            return Err(bad(
                format!(
                    "The validation file's format ({v_format}) differs from the training file's ({format})."
                ),
                "validation_file",
            ));
        }
    }
    check_model_trains(&state, &base_model, format.as_str()).await?;
    let mut method =
        method::resolve_method(fields.get("method"), fields.get("hyperparameters"), &format)?;
    // A `cosine` grader that names no embedding model gets the server's, stored with the job
    // so the worker that trains it grades alike.
    if let Some(grader) = method
        .get_mut("reinforcement")
        .and_then(|r| r.get_mut("grader"))
    {
        crate::train::graders::fill_embedding_model(
            grader,
            state.grader_embedding_model.as_deref(),
            "method.reinforcement.grader",
        )
        .map_err(|e| bad_code(e.to_string(), Some(e.path.as_str()), "invalid_grader"))?;
    }
    // Grader models are base models the training process loads: they must be here now.
    if let Some(grader) = method.get("reinforcement").and_then(|r| r.get("grader"))
        && let Ok(grader) = crate::train::graders::Grader::parse(grader, "grader")
    {
        for id in grader.embedding_models() {
            super::graders::resolve_embedding_model(
                &state,
                &caller,
                id,
                "method.reinforcement.grader",
            )
            .await?;
        }
        for id in grader.models() {
            let present = match base_model_dir(&state.models_dir, id) {
                Some(dir) => tokio::fs::metadata(dir.join("config.json")).await.is_ok(),
                None => false,
            };
            if !present {
                return Err(bad_code(
                    format!(
                        "The grader's model '{id}' is not a base model in the models directory (grader models are base models)."
                    ),
                    Some("method.reinforcement.grader"),
                    "model_not_found",
                ));
            }
        }
    }

    let memory = device_memory(
        &state,
        fields.get("device_memory_gb"),
        &base_model,
        &method,
        &train_row,
    )
    .await?;

    if dry_run {
        let planned = dry_run::PlannedJob {
            device_memory: memory.as_ref(),
            project_id: &caller.project_id,
            model,
            training_file: &train_row,
            validation_file: valid_row.as_ref(),
            suffix,
            seed,
            metadata: metadata.as_ref(),
            method: &method,
            priority,
        };
        return dry_run::dry_run_job(&state, &planned).await.map(Json);
    }

    let hash = hex::encode(Sha256::digest(canonical(&body).as_bytes()));
    let id = new_id("ftjob-");
    let new = NewJob {
        id: &id,
        project_id: &caller.project_id,
        model,
        base_model: &base_model,
        training_file,
        validation_file,
        training_format: &format,
        suffix,
        seed,
        metadata: metadata.as_ref(),
        integrations: integrations.as_ref(),
        method: &method,
        priority: priority as i16,
        idempotency: key.as_deref().map(|k| (k, hash.as_str())),
        device_memory: memory.as_ref().map(DeviceMemory::column),
    };
    match state.queue.insert_job(&new).await? {
        InsertOutcome::Created(row) => {
            metrics::counter!("kiln_jobs_created_total").increment(1);
            Ok(Json(job_object(&row)))
        }
        InsertOutcome::Existing(row) => Ok(Json(job_object(&row))),
        InsertOutcome::KeyReused => Err(bad_code(
            "This Idempotency-Key was already used with a different request body.",
            Some("Idempotency-Key"),
            "idempotency_key_reused",
        )),
        InsertOutcome::FileGone(param) => Err(bad_code(
            format!(
                "No such file: the file named by '{param}' was deleted while the job was being created."
            ),
            Some(param),
            "invalid_file",
        )),
    }
}

async fn find(state: &AppState, project_id: &str, id: &str) -> Result<JobRow, ApiError> {
    state
        .queue
        .get_job(project_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("fine-tuning job", id, "fine_tuning_job_id"))
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job_object(
        &find(&state, &caller.project_id, &id).await?,
    )))
}

/// `GET /v1/fine_tuning/jobs`: newest first; `after`, `limit`, `metadata[k]=v` (all must
/// match) or `metadata=null` (jobs without metadata).
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let mut params = ListParams::default();
    let mut metadata = Map::new();
    let mut metadata_is_null = false;
    for (k, v) in pairs {
        match k.as_str() {
            "after" => params.after = Some(v),
            "limit" => params.limit = Some(v),
            "metadata" if v == "null" => metadata_is_null = true,
            _ => {
                if let Some(field) = k
                    .strip_prefix("metadata[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    metadata.insert(field.to_owned(), Value::String(v));
                }
            }
        }
    }
    if metadata_is_null && !metadata.is_empty() {
        return Err(bad(
            "Use either metadata=null or metadata[key]=value, not both.",
            "metadata",
        ));
    }
    let page = params.page(20, 100, Order::Desc)?;
    let filter = (!metadata.is_empty()).then_some(Value::Object(metadata));
    let (rows, has_more) = state
        .queue
        .list_jobs(&caller.project_id, filter.as_ref(), metadata_is_null, &page)
        .await?;
    let data: Vec<Value> = rows.iter().map(job_object).collect();
    Ok(Json(list_body(data, has_more, None)))
}

fn ended(id: &str, state: &str, verb: &str) -> ApiError {
    bad_code(
        format!("Job {id} has already {state}; it cannot be {verb}."),
        Some("fine_tuning_job_id"),
        "invalid_job_state",
    )
}

async fn after_transition(
    state: &AppState,
    project_id: &str,
    id: &str,
    t: Option<Transition>,
) -> Result<(Transition, JobRow), ApiError> {
    let t = t.ok_or_else(|| ApiError::not_found("fine-tuning job", id, "fine_tuning_job_id"))?;
    let row = find(state, project_id, id).await?;
    Ok((t, row))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: a queued or paused job is cancelled at once; a
/// running one stops within seconds (its status stays `running` with `cancel_requested`
/// until the worker acknowledges). Cancelling a cancelled job is a no-op.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let t = state.queue.cancel_job(&caller.project_id, &id).await?;
    let (t, row) = after_transition(&state, &caller.project_id, &id, t).await?;
    if matches!(t.before.as_str(), "succeeded" | "failed") {
        return Err(ended(&id, &t.before, "cancelled"));
    }
    Ok(Json(job_object(&row)))
}

/// `POST /v1/fine_tuning/jobs/{id}/pause`: a queued job is paused at once; a running one
/// checkpoints and releases its slot.
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let t = state.queue.pause_job(&caller.project_id, &id).await?;
    let (t, row) = after_transition(&state, &caller.project_id, &id, t).await?;
    if is_terminal(&t.before) {
        return Err(ended(&id, &t.before, "paused"));
    }
    Ok(Json(job_object(&row)))
}

/// `POST /v1/fine_tuning/jobs/{id}/resume`: a paused job is queued again and continues
/// from its latest checkpoint.
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let t = state.queue.resume_job(&caller.project_id, &id).await?;
    let (t, row) = after_transition(&state, &caller.project_id, &id, t).await?;
    if is_terminal(&t.before) {
        return Err(ended(&id, &t.before, "resumed"));
    }
    if !t.changed {
        return Err(bad_code(
            format!("Job {id} is not paused."),
            Some("fine_tuning_job_id"),
            "invalid_job_state",
        ));
    }
    Ok(Json(job_object(&row)))
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct EventsQuery {
    #[serde(flatten)]
    page: ListParams,
    stream: Option<String>,
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: newest first, paginated; with `stream=true`,
/// server-sent events (oldest first, then live) ending with `[DONE]` when the job ends.
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller.project_id, &id).await?;
    match query.stream.as_deref() {
        None | Some("") | Some("false") => {}
        Some("true") => {
            // Each stream holds a permit until its client goes away.
            let Ok(permit) = state.limits.streams.clone().try_acquire_owned() else {
                return Err(ApiError::TooManyRequests(
                    "Too many event streams are open on this server; list the events instead, or retry shortly."
                        .into(),
                ));
            };
            return Ok(stream_events(state, job.id, permit).into_response());
        }
        Some(other) => {
            return Err(bad(
                format!("stream must be true or false, got '{other}'"),
                "stream",
            ));
        }
    }
    let page = query.page.page(20, 1000, Order::Desc)?;
    let (rows, has_more) = state.queue.list_events(&job.id, &page).await?;
    let data: Vec<Value> = rows.iter().map(event_object).collect();
    Ok(Json(list_body(data, has_more, None)).into_response())
}

fn stream_events(
    state: AppState,
    job_id: String,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let mut seq = 0i64;
        loop {
            let ended = match state.queue.job_by_id(&job_id).await {
                Ok(Some(job)) => job.is_terminal(),
                Ok(None) => true,
                Err(_) => false,
            };
            // Read events after reading the state, so none written before the end is missed.
            if let Ok(events) = state.queue.events_after(&job_id, seq, 500).await {
                let full_page = events.len() == 500;
                for e in &events {
                    seq = e.seq;
                    let event = Event::default().data(event_object(e).to_string());
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                if full_page {
                    continue;
                }
                if ended {
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: latest step first.
pub async fn checkpoints(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &caller.project_id, &id).await?;
    let page = params.page(10, 100, Order::Desc)?;
    let (rows, has_more) = state.queue.list_checkpoints(&job.id, &page).await?;
    let first = rows.first().map(|r| r.id.clone());
    let last = rows.last().map(|r| r.id.clone());
    let data: Vec<Value> = rows.iter().map(checkpoint_object).collect();
    Ok(Json(list_body(data, has_more, Some((first, last)))))
}

#[cfg(test)]
mod tests {
    use super::{base_model_dir, canonical};
    use serde_json::json;
    use std::path::Path;

    #[test]
    fn model_ids_are_plain_relative_paths() {
        let root = Path::new("/models");
        assert!(base_model_dir(root, "sentence-transformers/all-MiniLM-L6-v2").is_some());
        assert!(base_model_dir(root, "../etc").is_none());
        assert!(base_model_dir(root, "/etc/passwd").is_none());
        assert!(base_model_dir(root, "a//b").is_none());
        assert!(base_model_dir(root, "a/./b").is_none());
        assert!(base_model_dir(root, "").is_none());
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        assert_eq!(
            canonical(&json!({"b": 1, "a": {"y": [1, 2], "x": null}})),
            canonical(&json!({"a": {"x": null, "y": [1, 2]}, "b": 1}))
        );
    }
}
