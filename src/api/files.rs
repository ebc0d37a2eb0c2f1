//! The Files API, as the official OpenAI client calls it.

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::io::ReaderStream;

use super::error::ApiError;
use super::extract::ApiQuery;
use super::pagination::{ListParams, list_body};
use super::{AppState, Caller, unix};
use crate::artifacts::PendingBlob;
use crate::datasets::VALIDATED_PURPOSE;
use crate::store::files::{FileDeletion, FileRow, NewFile, Order};
use crate::store::new_id;

pub use crate::datasets::FileValidator;

/// Purposes a user may upload with (OpenAI's set; `fine-tune-results` is written by kiln).
pub(super) const UPLOAD_PURPOSES: &[&str] = &[
    "fine-tune",
    "batch",
    "assistants",
    "vision",
    "user_data",
    "evals",
];
/// Room for multipart boundaries and the small text fields around the file.
pub(super) const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// The wire shape of a file: OpenAI's fields, plus kiln's `sha256` and `validation`.
pub fn file_object(row: &FileRow) -> Value {
    json!({
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": row.status_details,
        "expires_at": null,
        "sha256": row.sha256,
        "validation": row.validation,
    })
}

fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "The file is larger than the maximum upload size of {limit} bytes."
    ))
}

pub(super) fn multipart_error(err: MultipartError, limit: u64) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::bad_request(
            format!("Malformed multipart body: {}", err.body_text()),
            None,
        )
    }
}

/// `POST /v1/files`: streams the `file` part to the artifact store (never whole in memory),
/// hashing as it goes; only a complete upload within the limit becomes a row.
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let limit = state.limits.max_upload_bytes;
    if declared_length(&headers).is_some_and(|n| n > limit.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(too_large(limit));
    }
    // Held until the upload is stored or refused.
    let _uploading = upload_slot(&state)?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(
            format!(
                "Expected a multipart/form-data body with `purpose` and `file`: {}",
                e.body_text()
            ),
            None,
        )
    })?;

    let mut purpose: Option<String> = None;
    let mut upload: Option<(String, PendingBlob)> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name() {
            Some("purpose") => purpose = Some(small_text(field, "purpose", limit).await?),
            Some("file") => {
                if upload.is_some() {
                    return Err(ApiError::bad_request(
                        "Only one `file` part is allowed.",
                        "file",
                    ));
                }
                let filename = field
                    .file_name()
                    .map(sanitize_filename)
                    .unwrap_or_else(|| "upload".to_owned());
                let blob = stream_to_blob(&state, field, limit, || too_large(limit)).await?;
                upload = Some((filename, blob));
            }
            // Other OpenAI form fields (e.g. `expires_after[...]`) are accepted and ignored,
            // but read with a small cap so they cannot be used to smuggle large bodies.
            _ => {
                small_text(field, "form field", limit).await?;
            }
        }
    }

    let purpose = purpose.ok_or_else(|| {
        ApiError::bad_request("Missing required parameter: 'purpose'.", "purpose")
    })?;
    if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
        return Err(purpose_error(&purpose));
    }
    let (filename, blob) = upload
        .ok_or_else(|| ApiError::bad_request("Missing required parameter: 'file'.", "file"))?;

    let id = new_id("file-");
    let storage_key = format!("files/{}/{}", caller.project_id, id);
    let bytes = blob.bytes();
    let sha256 = blob.sha256_hex();
    state.artifacts.commit(blob, &storage_key).await?;
    let new = NewFile {
        id: &id,
        project_id: &caller.project_id,
        filename: &filename,
        purpose: &purpose,
        bytes: bytes as i64,
        sha256: &sha256,
        storage_key: &storage_key,
    };
    let needs_validation = purpose == VALIDATED_PURPOSE;
    let row = match state.store.insert_file(&new, needs_validation).await {
        Ok(row) => row,
        Err(e) => {
            // No row, no blob: a failed upload leaves nothing behind.
            let _ = state.artifacts.delete(&storage_key).await;
            return Err(e.into());
        }
    };
    metrics::counter!("kiln_uploads_total").increment(1);
    metrics::counter!("kiln_upload_bytes_total").increment(bytes);
    if needs_validation {
        state.validator.spawn(row.clone());
    }
    Ok(Json(file_object(&row)))
}

/// The request's declared body length, when it declares one.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A place among the uploads in progress (`KILN_MAX_UPLOADS`), held while the permit lives;
/// 429 when none is free.
pub(super) fn upload_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state
        .limits
        .uploads
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::TooManyRequests(
                "Too many uploads are in progress on this server; retry shortly.".into(),
            )
        })
}

/// Streams a multipart field into a new blob, refusing it with `over_limit()` past `limit`
/// bytes (the partial blob is removed when dropped).
pub(super) async fn stream_to_blob(
    state: &AppState,
    mut field: Field<'_>,
    limit: u64,
    over_limit: impl Fn() -> ApiError,
) -> Result<PendingBlob, ApiError> {
    let mut blob = state.artifacts.begin().await?;
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        if blob.bytes() + chunk.len() as u64 > limit {
            return Err(over_limit()); // dropping `blob` removes the partial file
        }
        blob.write(&chunk).await?;
    }
    Ok(blob)
}

pub(super) async fn small_text(
    mut field: Field<'_>,
    what: &'static str,
    limit: u64,
) -> Result<String, ApiError> {
    const MAX: usize = 4096;
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        text.extend_from_slice(&chunk);
        if text.len() > MAX {
            return Err(ApiError::bad_request(
                format!("The {what} field is too long."),
                None,
            ));
        }
    }
    String::from_utf8(text)
        .map(|s| s.trim().to_owned())
        .map_err(|_| ApiError::bad_request(format!("The {what} field is not valid UTF-8."), None))
}

pub(super) fn purpose_error(purpose: &str) -> ApiError {
    ApiError::bad_request(
        format!(
            "'{purpose}' is not a valid purpose. Expected one of: {}.",
            UPLOAD_PURPOSES.join(", ")
        ),
        "purpose",
    )
}

/// Keeps the last path component and at most 255 bytes: a name, not a path.
pub(super) fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name).trim();
    let mut out = String::new();
    for c in base.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > 255 {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        "upload".to_owned()
    } else {
        out
    }
}

#[derive(Debug, Deserialize)]
pub struct FileListQuery {
    #[serde(flatten)]
    page: ListParams,
    purpose: Option<String>,
}

/// `GET /v1/files`: newest first by default, cursor `after`, up to 10,000 a page.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<FileListQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = query.page.page(10_000, 10_000, Order::Desc)?;
    let purpose = query.purpose.as_deref().filter(|p| !p.is_empty());
    let (rows, has_more) = state
        .store
        .list_files(&caller.project_id, purpose, &page)
        .await?;
    let first = rows.first().map(|r| r.id.clone());
    let last = rows.last().map(|r| r.id.clone());
    let data: Vec<Value> = rows.iter().map(file_object).collect();
    Ok(Json(list_body(data, has_more, Some((first, last)))))
}

async fn find(state: &AppState, project_id: &str, id: &str) -> Result<FileRow, ApiError> {
    state
        .store
        .get_file(project_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", id, "file_id"))
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(file_object(
        &find(&state, &caller.project_id, &id).await?,
    )))
}

/// `GET /v1/files/{id}/content`: the raw bytes, streamed.
pub async fn content(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = find(&state, &caller.project_id, &id).await?;
    let file = state.artifacts.open(&row.storage_key).await?;
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::CONTENT_LENGTH, row.bytes.to_string()),
    ];
    Ok((
        headers,
        Body::from_stream(ReaderStream::with_capacity(file, 256 * 1024)),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`: the row goes first, then the bytes. A file that an unfinished
/// job trains on is refused (400 `file_in_use`): a retried or resumed attempt reads it again.
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = match state.store.delete_file(&caller.project_id, &id).await? {
        FileDeletion::Deleted(row) => row,
        FileDeletion::NotFound => return Err(ApiError::not_found("file", &id, "file_id")),
        FileDeletion::InUse(jobs) => {
            return Err(ApiError::BadRequest {
                message: format!(
                    "File '{id}' is used by unfinished fine-tuning jobs ({}); cancel them or wait for them to finish before deleting it.",
                    jobs.join(", ")
                ),
                param: Some("file_id".into()),
                code: Some("file_in_use"),
            });
        }
    };
    if let Err(e) = state.artifacts.delete(&row.storage_key).await {
        tracing::warn!(file = %row.id, error = %e, "file row deleted but its bytes could not be removed");
    }
    Ok(Json(
        json!({"id": row.id, "object": "file", "deleted": true}),
    ))
}

#[cfg(test)]
mod tests {
    use super::sanitize_filename;

    #[test]
    fn filenames_lose_their_paths_and_control_characters() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("C:\\data\\train.jsonl"), "train.jsonl");
        assert_eq!(sanitize_filename("a\nb.jsonl"), "ab.jsonl");
        assert_eq!(sanitize_filename(""), "upload");
        assert!(sanitize_filename(&"x".repeat(1000)).len() <= 255);
    }
}
