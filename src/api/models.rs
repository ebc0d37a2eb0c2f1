//! The Models API (OpenAI's shape, with kiln's fields): base models from the models
//! directory, and the project's fine-tuned models and checkpoints.
//!
//! Base ids contain `/` and fine-tuned ids contain `:`, so the routes take the id as a
//! wildcard (`/v1/models/{*id}`); clients may also percent-encode it.

use std::collections::HashSet;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
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

/// Rows of fine-tuned models and checkpoints read (and written out) at a time by
/// `GET /v1/models`.
const LIST_PAGE: i64 = 256;

/// `GET /v1/models`: base models, then the project's fine-tuned models and checkpoints
/// (newest first). The list is unpaginated, like OpenAI's, and grows with every job and
/// checkpoint, so it is streamed: read from the database a page at a time and written out as
/// it is read, never held whole in memory. The first page is read before the answer starts, so
/// a database that is down still gets a proper error; a failure later cuts the answer short
/// (the client sees a truncated body, never a complete-looking wrong list).
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let loaded: HashSet<String> = state.serving.loaded().into_iter().collect();
    let mut head = br#"{"object":"list","data":["#.to_vec();
    let mut first = true;
    for m in base_models(&state).await? {
        write_item(
            &mut head,
            &mut first,
            &base_object(&m, loaded.contains(&m.id)),
        );
    }
    let page = state
        .queue
        .list_models_page(&caller.project_id, None, LIST_PAGE)
        .await?;
    let listing = Listing {
        queue: state.queue.clone(),
        project_id: caller.project_id.clone(),
        loaded,
        buf: head,
        first,
        page: Some(page),
        after: None,
        done: false,
    };
    let body = Body::from_stream(futures_util::stream::try_unfold(listing, Listing::next));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Where a streamed `GET /v1/models` is.
struct Listing {
    queue: crate::queue::Queue,
    project_id: String,
    loaded: HashSet<String>,
    /// What goes out with the next chunk before its rows (the list's head, at first).
    buf: Vec<u8>,
    first: bool,
    /// A page already read (the first), else the next is read after `after`.
    page: Option<Vec<ModelRow>>,
    after: Option<(chrono::DateTime<chrono::Utc>, String)>,
    done: bool,
}

impl Listing {
    async fn next(mut self) -> Result<Option<(Bytes, Listing)>, crate::store::StoreError> {
        if self.done {
            return Ok(None);
        }
        let rows = match self.page.take() {
            Some(rows) => rows,
            None => self
                .queue
                .list_models_page(&self.project_id, self.after.as_ref(), LIST_PAGE)
                .await
                .inspect_err(|e| tracing::error!(error = %e, "GET /v1/models cut short"))?,
        };
        let mut buf = std::mem::take(&mut self.buf);
        for row in &rows {
            let object = fine_tuned_object(row, self.loaded.contains(&row.id));
            write_item(&mut buf, &mut self.first, &object);
        }
        if rows.len() < LIST_PAGE as usize {
            buf.extend_from_slice(br#"],"has_more":false}"#);
            self.done = true;
        }
        self.after = rows.last().map(|r| (r.created_at, r.id.clone()));
        Ok(Some((Bytes::from(buf), self)))
    }
}

fn write_item(buf: &mut Vec<u8>, first: &mut bool, item: &Value) {
    if !std::mem::take(first) {
        buf.push(b',');
    }
    // Writing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, item);
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
    // Requests already using the model finish before its files go (new ones get 404).
    if !state
        .serving
        .retire(&id, state.serving.settings().timeout)
        .await
    {
        tracing::warn!(model = %id, "requests were still using a deleted model when its files were removed");
    }
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

/// Copies a directory tree (regular files and folders only).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `POST /v1/models` (kiln): registers a fine-tuned model (or checkpoint) of the project as a
/// base model under a new id in the models directory, `{"id": "org/name", "model": "ft:..."}`.
/// Later jobs and inference name it like any base model; this closes the transfer-learning
/// loop (train a network here from scratch on one set, fine-tune it on another).
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("The request body is not valid JSON: {e}"), "body")
    })?;
    let field = |name: &'static str| -> Result<String, ApiError> {
        match body.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(ApiError::bad_request(
                format!("'{name}' must be a non-empty string"),
                name,
            )),
            None => Err(ApiError::bad_request(
                format!("Missing required parameter: '{name}'."),
                name,
            )),
        }
    };
    let id = field("id")?;
    let source = field("model")?;
    if !models::valid_id(&id) || id.starts_with("ft:") {
        return Err(ApiError::bad_request(
            format!(
                "'{id}' is not a valid base model id: use a relative path of letters, digits, '-', '_' and '.', such as 'acme/digits-resnet'"
            ),
            "id",
        ));
    }
    if !source.starts_with("ft:") {
        return Err(ApiError::bad_request(
            format!(
                "'{source}' is not a fine-tuned model: name an `ft:` model or checkpoint of a succeeded job"
            ),
            "model",
        ));
    }
    let row = state
        .queue
        .find_model(&caller.project_id, &source)
        .await?
        .ok_or_else(|| model_not_found(&source))?;
    let target = state.models_dir.join(&id);
    if target.exists() {
        return Err(ApiError::BadRequest {
            message: format!("A base model '{id}' already exists in the models directory."),
            param: Some("id".into()),
            code: Some("model_exists"),
        });
    }
    let files = state
        .artifacts
        .local_dir(&row.storage_key)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let partial = state
        .models_dir
        .join(format!(".register-{}", uuid::Uuid::new_v4()));
    let copy_target = target.clone();
    let copy_partial = partial.clone();
    let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let result = copy_tree(&files, &copy_partial).and_then(|()| {
            if let Some(parent) = copy_target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // rename refuses to replace a non-empty directory: a racing registration of the
            // same id fails here rather than mixing two models' files.
            std::fs::rename(&copy_partial, &copy_target)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&copy_partial);
        }
        result
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    if let Err(e) = copied {
        if target.exists() {
            return Err(ApiError::BadRequest {
                message: format!("A base model '{id}' already exists in the models directory."),
                param: Some("id".into()),
                code: Some("model_exists"),
            });
        }
        return Err(ApiError::Internal(e.into()));
    }
    let m = base_model(&state, &id).await?;
    tracing::info!(model = %id, from = %source, "registered a fine-tuned model as a base model");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(base_object(&m, false)),
    ))
}

/// Resolves a model named in `/v1/images/classifications` to its files, checking it is an
/// image classifier.
pub(crate) async fn resolve_for_images(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<ModelRef, ApiError> {
    let not_images = |what: &str| ApiError::BadRequest {
        message: format!(
            "model '{id}' is not an image classifier ({what}); /v1/images/classifications serves ResNet and ViT classifiers"
        ),
        param: Some("model".into()),
        code: Some("model_not_supported"),
    };
    if id.starts_with("ft:") {
        let row = state
            .queue
            .find_model(&caller.project_id, id)
            .await?
            .ok_or_else(|| model_not_found(id))?;
        if row.training_format != "image_classification" {
            return Err(not_images(task_of_format(&row.training_format)));
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
    if m.family != Some(Family::Vision) {
        return Err(not_images(&m.architecture));
    }
    if m.labels.is_empty() || m.parameters == 0 {
        return Err(ApiError::BadRequest {
            message: format!(
                "model '{id}' has no trained classification head; fine-tune it on labelled images first"
            ),
            param: Some("model".into()),
            code: Some("model_not_supported"),
        });
    }
    Ok(ModelRef {
        id: id.to_owned(),
        location: ModelLocation::Dir(m.dir),
    })
}
