//! The Models API (OpenAI's shape, with kiln's fields): base models from the models
//! directory, and the project's fine-tuned models and checkpoints.
//!
//! Base ids contain `/` and fine-tuned ids contain `:`, so the routes take the id as a
//! wildcard (`/v1/models/{*id}`); clients may also percent-encode it.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::error::ApiError;
use super::{AppState, Caller, unix};
use crate::models::{self, BaseModel, Family};
use crate::queue::ModelRow;
use crate::serve::{ModelLocation, ModelRef};

/// `owned_by` of base models.
const BASE_OWNER: &str = "kiln";

fn task_of_format(format: &str) -> &'static str {
    match format {
        "text_classification" => "text_classification",
        "multi_label_classification" => "multi_label_classification",
        "domain_text" => "domain_adaptation",
        "image_classification" => "image_classification",
        "chat" | "prompt_completion" => "text_generation",
        "preference" => "preference",
        _ => "unknown",
    }
}

fn base_object(m: &BaseModel, loaded: bool) -> Value {
    let created = m
        .modified
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    json!({
        "id": m.id,
        "object": "model",
        "created": created,
        "owned_by": BASE_OWNER,
        "kind": "base",
        "base": null,
        "parent": null,
        "task": m.task(),
        "labels": if m.labels.is_empty() { Value::Null } else { json!(m.labels) },
        "job": null,
        "metrics": null,
        "architecture": m.architecture,
        "family": m.family,
        "parameters": m.parameters,
        "capabilities": m.capabilities,
        "loaded": loaded,
    })
}

fn fine_tuned_object(row: &ModelRow, loaded: bool) -> Value {
    let info = row.model_info.as_ref();
    let task = info
        .and_then(|i| i["task"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| task_of_format(&row.training_format).to_owned());
    let labels = info
        .and_then(|i| i.get("labels"))
        .filter(|l| l.as_array().is_some_and(|a| !a.is_empty()))
        .cloned()
        .unwrap_or(Value::Null);
    let metrics = row
        .metrics
        .clone()
        .filter(|m| m.as_object().is_some_and(|o| !o.is_empty()));
    json!({
        "id": row.id,
        "object": "model",
        "created": unix(row.created_at),
        "owned_by": row.owner,
        "kind": row.kind,
        "base": row.base_model,
        "parent": row.parent_model,
        "task": task,
        "labels": labels,
        "job": row.job_id,
        "metrics": metrics,
        "step": row.step,
        "loaded": loaded,
    })
}

async fn base_models(state: &AppState) -> Result<Vec<BaseModel>, ApiError> {
    let dir = state.models_dir.clone();
    tokio::task::spawn_blocking(move || models::scan(&dir))
        .await
        .map_err(|e| ApiError::Internal(e.into()))
}

async fn base_model(state: &AppState, id: &str) -> Result<BaseModel, ApiError> {
    let dir = state.models_dir.clone();
    let owned = id.to_owned();
    tokio::task::spawn_blocking(move || models::resolve(&dir, &owned))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| match e {
            models::ModelError::Invalid(m) => {
                ApiError::bad_request(format!("model '{id}' cannot be used: {m}"), "model")
            }
            _ => model_not_found(id),
        })
}

pub(crate) fn model_not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("The model '{id}' does not exist or you do not have access to it."),
        param: Some("model".into()),
    }
}

/// Model ids arrive percent-decoded by axum; a client that escaped `/` as `%2F` gets the same.
fn decode(id: &str) -> String {
    id.trim_start_matches('/').to_owned()
}

fn is_loaded(state: &AppState, id: &str) -> bool {
    state.serving.is_loaded(id)
}

/// `GET /v1/models`: base models, then the project's fine-tuned models and checkpoints
/// (newest first).
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let loaded = state.serving.loaded();
    let mut data: Vec<Value> = base_models(&state)
        .await?
        .iter()
        .map(|m| base_object(m, loaded.contains(&m.id)))
        .collect();
    for row in state.queue.list_models(&caller.project_id).await? {
        let is_loaded = loaded.contains(&row.id);
        data.push(fine_tuned_object(&row, is_loaded));
    }
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": false}),
    ))
}

/// `GET /v1/models/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = decode(&id);
    if id.starts_with("ft:") {
        let row = state
            .queue
            .find_model(&caller.project_id, &id)
            .await?
            .ok_or_else(|| model_not_found(&id))?;
        return Ok(Json(fine_tuned_object(&row, is_loaded(&state, &id))));
    }
    let m = base_model(&state, &id).await?;
    Ok(Json(base_object(&m, is_loaded(&state, &id))))
}

/// `DELETE /v1/models/{id}`: a fine-tuned model of the project and its files. Base models
/// live in the models directory and are not deleted through the API; checkpoints go with
/// their job's artifacts.
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = decode(&id);
    if !id.starts_with("ft:") {
        // Tell a base model apart from an unknown id.
        base_model(&state, &id).await?;
        return Err(ApiError::BadRequest {
            message: format!(
                "'{id}' is a base model: base models are files in the models directory and are not deleted through the API"
            ),
            param: Some("model".into()),
            code: Some("base_model_not_deletable"),
        });
    }
    if id.contains(":ckpt-step-") {
        state
            .queue
            .find_model(&caller.project_id, &id)
            .await?
            .ok_or_else(|| model_not_found(&id))?;
        return Err(ApiError::BadRequest {
            message: format!(
                "'{id}' is a checkpoint: checkpoints are kept with their job; delete the fine-tuned model instead"
            ),
            param: Some("model".into()),
            code: Some("checkpoint_not_deletable"),
        });
    }
    let job_id = state
        .queue
        .delete_model(&caller.project_id, &id)
        .await?
        .ok_or_else(|| model_not_found(&id))?;
    state.serving.evict(&id);
    if let Err(e) = state
        .artifacts
        .delete_dir(&crate::worker::model_key(&job_id))
        .await
    {
        // The row says deleted (nothing serves it any more); the files are only garbage.
        tracing::warn!(model = %id, error = %e, "could not remove the files of a deleted model");
    }
    Ok(Json(json!({"id": id, "object": "model", "deleted": true})))
}

/// Resolves a model named in an inference request to its files, checking it is a text
/// encoder (the family the inference endpoints serve).
pub(crate) async fn resolve_for_inference(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<ModelRef, ApiError> {
    if id.starts_with("ft:") {
        let row = state
            .queue
            .find_model(&caller.project_id, id)
            .await?
            .ok_or_else(|| model_not_found(id))?;
        if row.training_format != "text_classification"
            && row.training_format != "multi_label_classification"
            && row.training_format != "domain_text"
        {
            return Err(not_an_encoder(id, task_of_format(&row.training_format)));
        }
        return Ok(ModelRef {
            id: id.to_owned(),
            location: ModelLocation::Stored(row.storage_key),
        });
    }
    if !models::valid_id(id) {
        return Err(model_not_found(id));
    }
    // A base model in the cache was checked when it loaded: skip reading its files again.
    if state.serving.is_loaded(id) {
        return Ok(ModelRef {
            id: id.to_owned(),
            location: ModelLocation::Dir(state.models_dir.join(id)),
        });
    }
    let m = base_model(state, id).await?;
    if m.family != Some(Family::Encoder) {
        return Err(not_an_encoder(id, &m.architecture));
    }
    Ok(ModelRef {
        id: id.to_owned(),
        location: ModelLocation::Dir(m.dir),
    })
}

fn not_an_encoder(id: &str, what: &str) -> ApiError {
    ApiError::BadRequest {
        message: format!(
            "model '{id}' ({what}) is not a text encoder: classifications and embeddings are served for BERT-family encoders"
        ),
        param: Some("model".into()),
        code: Some("model_not_supported"),
    }
}

/// Resolves a model named in a generation request (`/v1/chat/completions`,
/// `/v1/completions`) to its files, checking it is a decoder LM.
pub(crate) async fn resolve_for_generation(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<ModelRef, ApiError> {
    if id.starts_with("ft:") {
        let row = state
            .queue
            .find_model(&caller.project_id, id)
            .await?
            .ok_or_else(|| model_not_found(id))?;
        // Domain text trains encoders and decoders alike; the engine checks which on load.
        if !matches!(
            row.training_format.as_str(),
            "chat" | "prompt_completion" | "domain_text" | "preference" | "reinforcement"
        ) {
            return Err(not_a_decoder(id, task_of_format(&row.training_format)));
        }
        return Ok(ModelRef {
            id: id.to_owned(),
            location: ModelLocation::Stored(row.storage_key),
        });
    }
    if !models::valid_id(id) {
        return Err(model_not_found(id));
    }
    if state.serving.is_loaded(id) {
        return Ok(ModelRef {
            id: id.to_owned(),
            location: ModelLocation::Dir(state.models_dir.join(id)),
        });
    }
    let m = base_model(state, id).await?;
    if !crate::nn::decoder::DecoderConfig::is_decoder_type(&m.architecture) {
        return Err(not_a_decoder(id, &m.architecture));
    }
    Ok(ModelRef {
        id: id.to_owned(),
        location: ModelLocation::Dir(m.dir),
    })
}

fn not_a_decoder(id: &str, what: &str) -> ApiError {
    ApiError::BadRequest {
        message: format!(
            "model '{id}' ({what}) is not a generative model: chat and text completions are served for decoder LMs (Llama, Qwen2, Mistral)"
        ),
        param: Some("model".into()),
        code: Some("model_not_supported"),
    }
}
