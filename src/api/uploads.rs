//! The Uploads API, as OpenAI's `/v1/uploads`: a file larger than one request comfortably
//! carries, sent in parts of up to 64 MiB and assembled when the client completes it.
//!
//! - `POST /v1/uploads` declares the file (name, purpose, MIME type, size); the upload takes
//!   parts for an hour.
//! - `POST /v1/uploads/{id}/parts` stores one part (multipart field `data`).
//! - `POST /v1/uploads/{id}/complete` names the parts in order (and optionally their MD5);
//!   their bytes must add up to the declared size. They are copied into one new file, which
//!   from then on is an ordinary file (a `fine-tune` one is validated like any upload).
//! - `POST /v1/uploads/{id}/cancel` drops the parts.
//! - `GET /v1/uploads/{id}` (kiln's addition) shows where an upload stands.
//!
//! Parts of uploads that can no longer complete are removed by [`sweep`], once a minute.

use std::time::Duration;

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::HeaderMap;
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::error::ApiError;
use super::extract::ApiJson;
use super::files::{
    MULTIPART_OVERHEAD, UPLOAD_PURPOSES, declared_length, file_object, multipart_error,
    purpose_error, sanitize_filename, small_text, stream_to_blob, upload_slot,
};
use super::{AppState, Caller, unix};
use crate::artifacts::Artifacts;
use crate::datasets::VALIDATED_PURPOSE;
use crate::store::Store;
use crate::store::files::{FileRow, NewFile};
use crate::store::new_id;
use crate::store::uploads::{Completed, NewUpload, PartAdded, PartRow, UploadRow};

/// The largest part, as OpenAI's (and its client's default part size).
pub const PART_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// How long an upload takes parts.
const LIFETIME: Duration = Duration::from_secs(3600);
/// How long after its expiry an upload's parts are kept, so that a completion that began
/// just before the expiry can finish copying them.
const EXPIRED_PARTS_GRACE: Duration = Duration::from_secs(3600);

/// The wire shape: OpenAI's fields, plus kiln's `mime_type`.
fn upload_object(row: &UploadRow, file: Option<&FileRow>) -> Value {
    json!({
        "id": row.id,
        "object": "upload",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "expires_at": unix(row.expires_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "file": file.map(file_object),
        "mime_type": row.mime_type,
    })
}

fn part_object(part: &PartRow) -> Value {
    json!({
        "id": part.id,
        "object": "upload.part",
        "created_at": unix(part.created_at),
        "upload_id": part.upload_id,
    })
}

fn closed(id: &str, status: &str, verb: &str) -> ApiError {
    let message = if status == "expired" {
        format!(
            "Upload {id} has expired (uploads take parts for {} minutes); it cannot be {verb}. Start a new upload.",
            LIFETIME.as_secs() / 60
        )
    } else {
        format!("Upload {id} is already {status}; it cannot be {verb}.")
    };
    ApiError::BadRequest {
        message,
        param: Some("upload_id".into()),
        code: Some("invalid_upload_state"),
    }
}

async fn find(state: &AppState, project_id: &str, id: &str) -> Result<UploadRow, ApiError> {
    state
        .store
        .get_upload(project_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("upload", id, "upload_id"))
}

async fn with_file(state: &AppState, row: &UploadRow) -> Result<Value, ApiError> {
    let file = match &row.file_id {
        Some(id) => state.store.get_file(&row.project_id, id).await?,
        None => None,
    };
    Ok(upload_object(row, file.as_ref()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUpload {
    bytes: u64,
    filename: String,
    mime_type: String,
    purpose: String,
    /// The resulting file's expiry policy in OpenAI's API. kiln keeps files until they are
    /// deleted, as it does for `POST /v1/files`, so this is accepted and not used.
    #[serde(default)]
    #[allow(dead_code)]
    expires_after: Option<Value>,
}

/// `POST /v1/uploads`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateUpload>,
) -> Result<Json<Value>, ApiError> {
    if body.filename.trim().is_empty() {
        return Err(ApiError::bad_request(
            "`filename` must not be empty.",
            "filename",
        ));
    }
    let filename = sanitize_filename(&body.filename);
    if !UPLOAD_PURPOSES.contains(&body.purpose.as_str()) {
        return Err(purpose_error(&body.purpose));
    }
    let mime_type = body.mime_type.trim();
    if mime_type.is_empty() || mime_type.len() > 255 || mime_type.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "`mime_type` must be a MIME type such as `text/jsonl` (at most 255 characters).",
            "mime_type",
        ));
    }
    let limit = state.limits.max_large_upload_bytes;
    if body.bytes > limit {
        return Err(ApiError::bad_request(
            format!(
                "An upload may hold at most {limit} bytes (KILN_MAX_LARGE_UPLOAD_BYTES); this one declares {}.",
                body.bytes
            ),
            "bytes",
        ));
    }
    let bytes = i64::try_from(body.bytes)
        .map_err(|_| ApiError::bad_request("`bytes` is too large.", "bytes"))?;
    let id = new_id("upload_");
    let row = state
        .store
        .insert_upload(&NewUpload {
            id: &id,
            project_id: &caller.project_id,
            filename: &filename,
            purpose: &body.purpose,
            mime_type,
            bytes,
            lifetime: LIFETIME,
        })
        .await?;
    Ok(Json(upload_object(&row, None)))
}

/// `GET /v1/uploads/{id}` (kiln's addition): the upload, with its file once completed.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = find(&state, &caller.project_id, &id).await?;
    Ok(Json(with_file(&state, &row).await?))
}

fn part_too_large() -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "A part may hold at most {PART_MAX_BYTES} bytes (64 MiB); send the file in smaller parts."
    ))
}

/// `POST /v1/uploads/{id}/parts`: the multipart field `data` holds the part's bytes.
pub async fn add_part(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    if declared_length(&headers).is_some_and(|n| n > PART_MAX_BYTES + MULTIPART_OVERHEAD) {
        return Err(part_too_large());
    }
    // Refuse before reading the body when the upload cannot take the part anyway.
    let upload = find(&state, &caller.project_id, &id).await?;
    if upload.status != "pending" {
        return Err(closed(&id, &upload.status, "given parts"));
    }
    let _uploading = upload_slot(&state)?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(
            format!(
                "Expected a multipart/form-data body with the part in `data`: {}",
                e.body_text()
            ),
            None,
        )
    })?;

    let mut blob = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, PART_MAX_BYTES))?
    {
        if field.name() != Some("data") {
            small_text(field, "form field", PART_MAX_BYTES).await?;
            continue;
        }
        if blob.is_some() {
            return Err(ApiError::bad_request(
                "Only one `data` part is allowed.",
                "data",
            ));
        }
        blob = Some(stream_to_blob(&state, field, PART_MAX_BYTES, part_too_large).await?);
    }
    let blob =
        blob.ok_or_else(|| ApiError::bad_request("Missing required parameter: 'data'.", "data"))?;
    if blob.bytes() == 0 {
        return Err(ApiError::bad_request("The part is empty.", "data"));
    }

    let part_id = new_id("part_");
    let storage_key = format!("uploads/{}/{}/{}", caller.project_id, id, part_id);
    let part = PartRow {
        id: part_id,
        upload_id: id.clone(),
        bytes: blob.bytes() as i64,
        storage_key,
        created_at: chrono::Utc::now(),
    };
    state.artifacts.commit(blob, &part.storage_key).await?;
    // Parts may hold one part more than the upload needs: room for a part sent again after
    // its first answer was lost. Beyond that the upload could never use them.
    let max_stored = upload.bytes.saturating_add(PART_MAX_BYTES as i64);
    let added = state
        .store
        .add_upload_part(&caller.project_id, &part, max_stored)
        .await;
    let refusal = match added {
        Ok(PartAdded::Added(row)) => return Ok(Json(part_object(&row))),
        Ok(PartAdded::NotFound) => ApiError::not_found("upload", &id, "upload_id"),
        Ok(PartAdded::Closed(status)) => closed(&id, &status, "given parts"),
        Ok(PartAdded::Full { stored }) => ApiError::bad_request(
            format!(
                "Upload {id} already holds {stored} bytes of parts, and this part of {} bytes would take them past the {} bytes it was created for (plus one part of room for a retry). Complete it with the parts it needs, or cancel it.",
                part.bytes, upload.bytes
            ),
            "data",
        ),
        Err(e) => e.into(),
    };
    // No row, no blob: a refused part leaves nothing behind.
    if let Err(e) = state.artifacts.delete(&part.storage_key).await {
        tracing::warn!(part = %part.id, error = %e, "could not remove a refused part's bytes");
    }
    Err(refusal)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteUpload {
    part_ids: Vec<String>,
    #[serde(default)]
    md5: Option<String>,
}

/// `POST /v1/uploads/{id}/complete`: the listed parts, in order, become one file.
pub async fn complete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CompleteUpload>,
) -> Result<Json<Value>, ApiError> {
    let upload = find(&state, &caller.project_id, &id).await?;
    if upload.status != "pending" {
        return Err(closed(&id, &upload.status, "completed"));
    }
    let expected_md5 = match body.md5.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(m) if m.len() == 32 && m.chars().all(|c| c.is_ascii_hexdigit()) => {
            Some(m.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "`md5` must be 32 hexadecimal digits.",
                "md5",
            ));
        }
    };
    let stored = state.store.upload_parts(&id).await?;
    let by_id: std::collections::HashMap<&str, &PartRow> =
        stored.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut listed = std::collections::HashSet::with_capacity(body.part_ids.len());
    let mut parts = Vec::with_capacity(body.part_ids.len());
    for (i, part_id) in body.part_ids.iter().enumerate() {
        let Some(&part) = by_id.get(part_id.as_str()) else {
            return Err(ApiError::BadRequest {
                message: format!(
                    "part_ids[{i}]: '{part_id}' is not a part of upload {id}{}.",
                    if stored.is_empty() {
                        " (it has no parts)"
                    } else {
                        ""
                    }
                ),
                param: Some("part_ids".into()),
                code: None,
            });
        };
        if !listed.insert(part_id.as_str()) {
            return Err(ApiError::BadRequest {
                message: format!("part_ids[{i}]: '{part_id}' is listed twice."),
                param: Some("part_ids".into()),
                code: None,
            });
        }
        parts.push(part);
    }
    let total: i64 = parts.iter().map(|p| p.bytes).sum();
    if total != upload.bytes {
        return Err(ApiError::bad_request(
            format!(
                "The listed parts hold {total} bytes, but upload {id} was created for {} bytes.",
                upload.bytes
            ),
            "part_ids",
        ));
    }
    let _uploading = upload_slot(&state)?;

    // Copy the parts, in order, into one blob, hashing as they pass.
    let (blob, actual_md5) = match assemble(&state.artifacts, &parts, expected_md5.is_some()).await
    {
        Ok(both) => both,
        Err(e) => {
            // A completion running at the same time may have finished and removed the
            // parts: then this one is simply too late.
            let now = find(&state, &caller.project_id, &id).await?;
            if now.status != "pending" {
                return Err(closed(&id, &now.status, "completed"));
            }
            return Err(e);
        }
    };
    if let (Some(expected), Some(actual)) = (expected_md5, actual_md5)
        && expected != actual
    {
        return Err(ApiError::bad_request(
            format!(
                "The parts' MD5 is {actual}, not the {expected} given: the bytes are not what you sent. Nothing was stored; the upload still takes parts."
            ),
            "md5",
        ));
    }

    let file_id = new_id("file-");
    let storage_key = format!("files/{}/{}", caller.project_id, file_id);
    let sha256 = blob.sha256_hex();
    let bytes = blob.bytes();
    state.artifacts.commit(blob, &storage_key).await?;
    let new = NewFile {
        id: &file_id,
        project_id: &caller.project_id,
        filename: &upload.filename,
        purpose: &upload.purpose,
        bytes: bytes as i64,
        sha256: &sha256,
        storage_key: &storage_key,
    };
    let needs_validation = upload.purpose == VALIDATED_PURPOSE;
    let done = state
        .store
        .complete_upload(&caller.project_id, &id, &new, needs_validation)
        .await;
    let (row, file) = match done {
        Ok(Completed::Done(both)) => *both,
        other => {
            // No completion recorded: the assembled bytes go too.
            let _ = state.artifacts.delete(&storage_key).await;
            return Err(match other {
                Ok(Completed::Closed(status)) => closed(&id, &status, "completed"),
                Ok(_) => ApiError::not_found("upload", &id, "upload_id"),
                Err(e) => e.into(),
            });
        }
    };
    metrics::counter!("kiln_uploads_total").increment(1);
    metrics::counter!("kiln_upload_bytes_total").increment(bytes);
    if needs_validation {
        state.validator.spawn(file.clone());
    }
    remove_parts(&state.store, &state.artifacts, &id).await;
    Ok(Json(upload_object(&row, Some(&file))))
}

/// The parts' bytes in order, as one blob (hashed with SHA-256 as it is written), and
/// with `want_md5` their MD5 (hex), computed on a blocking thread beside the copy: on one
/// core MD5 alone would take about as long as the copy and SHA-256 together.
async fn assemble(
    artifacts: &Artifacts,
    parts: &[&PartRow],
    want_md5: bool,
) -> Result<(crate::artifacts::PendingBlob, Option<String>), ApiError> {
    let (md5_tx, md5) = if want_md5 {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut md5 = Md5::new();
            while let Some(chunk) = rx.blocking_recv() {
                md5.update(&chunk);
            }
            hex::encode(md5.finalize())
        });
        (Some(tx), Some(hasher))
    } else {
        (None, None)
    };
    let mut blob = artifacts.begin().await?;
    let mut buf = vec![0u8; 1 << 20];
    for part in parts {
        let mut file = artifacts.open(&part.storage_key).await?;
        let mut read = 0u64;
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            read += n as u64;
            blob.write(&buf[..n]).await?;
            if let Some(tx) = &md5_tx {
                tx.send(bytes::Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .map_err(|_| anyhow::anyhow!("the MD5 thread stopped"))?;
            }
        }
        if read != part.bytes as u64 {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "part {} holds {read} bytes on storage, {} recorded",
                part.id,
                part.bytes
            )));
        }
    }
    drop(md5_tx);
    let md5 = match md5 {
        Some(hasher) => Some(hasher.await.map_err(anyhow::Error::from)?),
        None => None,
    };
    Ok((blob, md5))
}

/// `POST /v1/uploads/{id}/cancel`: the parts are removed; cancelling again is harmless.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (row, cancelled_now) = state
        .store
        .cancel_upload(&caller.project_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("upload", &id, "upload_id"))?;
    if cancelled_now {
        remove_parts(&state.store, &state.artifacts, &id).await;
    } else if row.status != "cancelled" {
        return Err(closed(&id, &row.status, "cancelled"));
    }
    Ok(Json(upload_object(&row, None)))
}

/// Removes an ended upload's parts now (the sweep would, later).
async fn remove_parts(store: &Store, artifacts: &Artifacts, upload_id: &str) {
    match store.remove_upload_parts(upload_id).await {
        Ok(parts) => delete_bytes(artifacts, &parts).await,
        Err(e) => {
            tracing::warn!(upload = upload_id, error = %e, "could not remove an ended upload's parts; the sweep will")
        }
    }
}

async fn delete_bytes(artifacts: &Artifacts, parts: &[PartRow]) {
    for part in parts {
        if let Err(e) = artifacts.delete(&part.storage_key).await {
            tracing::warn!(part = %part.id, error = %e, "could not remove an upload part's bytes");
        }
    }
}

/// Removes the parts of uploads that can no longer complete: completed or cancelled ones
/// whose parts were not removed at once (the process stopped), and uploads expired an hour
/// or more ago. Returns how many parts went.
pub async fn sweep(store: &Store, artifacts: &Artifacts) -> usize {
    const BATCH: i64 = 500;
    let mut removed = 0;
    loop {
        match store.take_dead_parts(EXPIRED_PARTS_GRACE, BATCH).await {
            Ok(parts) => {
                delete_bytes(artifacts, &parts).await;
                removed += parts.len();
                if (parts.len() as i64) < BATCH {
                    return removed;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not sweep ended uploads' parts");
                return removed;
            }
        }
    }
}
