//! API keys (kiln extension, admin only): make keys for projects, list and revoke them.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::pagination::list_body;
use super::{AppState, Caller, require_admin, unix};
use crate::store::keys::ApiKeyRow;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    project: String,
    name: Option<String>,
    #[serde(default)]
    admin: bool,
}

fn key_object(row: &ApiKeyRow) -> Value {
    json!({
        "id": row.id,
        "object": "api_key",
        "project": row.project_name,
        "project_id": row.project_id,
        "name": row.name,
        "prefix": row.prefix,
        "admin": row.is_admin,
        "created_at": unix(row.created_at),
        "revoked_at": row.revoked_at.map(unix),
    })
}

/// `POST /v1/keys`: the secret is in this response and never again.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&caller)?;
    let project = body.project.trim();
    if project.is_empty() || project.len() > 128 {
        return Err(ApiError::bad_request(
            "project must be a name of 1 to 128 characters",
            "project",
        ));
    }
    let new = state
        .store
        .create_api_key(project, body.name.as_deref(), body.admin)
        .await?;
    let mut object = key_object(&new.row);
    object["key"] = json!(new.secret);
    Ok(Json(object))
}

/// `GET /v1/keys`: every key of every project, without secrets.
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    require_admin(&caller)?;
    let rows = state.store.list_api_keys().await?;
    let data: Vec<Value> = rows.iter().map(key_object).collect();
    Ok(Json(list_body(data, false, None)))
}

/// `DELETE /v1/keys/{id}`: revoked keys fail on their very next request.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&caller)?;
    let row = state
        .store
        .revoke_api_key(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("api key", &id, "key_id"))?;
    let mut object = key_object(&row);
    object["deleted"] = json!(true);
    Ok(Json(object))
}
