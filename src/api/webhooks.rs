//! Webhook endpoints, as OpenAI's API has them (`/v1/webhook_endpoints`, which the official
//! client's `client.webhooks` manages), plus kiln's delivery log
//! (`GET /v1/webhook_endpoints/{id}/deliveries`). `/v1/webhooks` is an alias.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::pagination::{ListParams, list_body};
use super::{AppState, Caller, unix};
use crate::store::files::Order;
use crate::store::webhooks::{AttemptRow, DeliveryRow, EndpointRow, EndpointUpdate};
use crate::webhooks::{EVENT_TYPES, client, send};

/// Endpoints a project may have.
const MAX_ENDPOINTS: i64 = 100;

fn endpoint_object(row: &EndpointRow) -> Value {
    json!({
        "id": row.id,
        "object": "webhook_endpoint",
        "name": row.name,
        "url": row.url,
        "event_types": row.event_types,
        "signing_secret_hint": hint(&row.secret),
        "created_at": unix(row.created_at),
        "updated_at": unix(row.updated_at),
    })
}

/// With the secret: only the responses to create and rotate carry it.
fn endpoint_with_secret(row: &EndpointRow) -> Value {
    let mut object = endpoint_object(row);
    object["signing_secret"] = json!(row.secret);
    object
}

/// `whsec_` and the secret's last four characters.
fn hint(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("whsec_****{tail}")
}

fn attempt_object(a: &AttemptRow) -> Value {
    json!({
        "attempt": a.attempt,
        "status_code": a.status_code,
        "error": a.error,
        "duration_ms": a.duration_ms,
        "created_at": unix(a.created_at),
    })
}

fn delivery_object(d: &DeliveryRow, attempts: &[AttemptRow]) -> Value {
    let payload: Value = serde_json::from_str(&d.payload).unwrap_or(Value::Null);
    json!({
        "id": d.id,
        "object": "webhook_endpoint.delivery",
        "webhook_endpoint_id": d.endpoint_id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "status": d.state,
        "attempts": d.attempts,
        "next_attempt_at": (d.state == "pending").then(|| unix(d.next_attempt_at)),
        "last_status_code": d.last_status,
        "last_error": d.last_error,
        "created_at": unix(d.created_at),
        "finished_at": d.finished_at.map(unix),
        "payload": payload,
        "attempt_log": attempts.iter().map(attempt_object).collect::<Vec<_>>(),
    })
}

fn check_url(url: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("url {why}, got '{url}'"), "url");
    if url.len() > 2048 {
        return Err(ApiError::bad_request(
            "url must be at most 2048 characters",
            "url",
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&format!("is not a valid URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must be an http:// or https:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("must name a host"));
    }
    Ok(())
}

fn check_event_types(types: &[String]) -> Result<Vec<String>, ApiError> {
    if types.is_empty() {
        return Err(ApiError::bad_request(
            format!(
                "event_types must name at least one event; kiln sends {}",
                EVENT_TYPES.join(", ")
            ),
            "event_types",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for t in types {
        if !EVENT_TYPES.contains(&t.as_str()) {
            return Err(ApiError::bad_request(
                format!(
                    "kiln does not send '{t}' events; it sends {}",
                    EVENT_TYPES.join(", ")
                ),
                "event_types",
            ));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 256 {
        return Err(ApiError::bad_request(
            "name must be 1 to 256 characters",
            "name",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    url: String,
    event_types: Vec<String>,
    /// Defaults to the URL.
    name: Option<String>,
}

/// `POST /v1/webhook_endpoints`: the signing secret is in this response and in rotations'.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateEndpoint>,
) -> Result<Json<Value>, ApiError> {
    check_url(&body.url)?;
    let event_types = check_event_types(&body.event_types)?;
    let name = body.name.unwrap_or_else(|| body.url.clone());
    check_name(&name)?;
    if state
        .store
        .count_webhook_endpoints(&caller.project_id)
        .await?
        >= MAX_ENDPOINTS
    {
        return Err(ApiError::bad_request(
            format!(
                "a project may have at most {MAX_ENDPOINTS} webhook endpoints; delete one first"
            ),
            None,
        ));
    }
    let row = state
        .store
        .create_webhook_endpoint(&caller.project_id, &name, &body.url, &event_types)
        .await?;
    metrics::counter!("kiln_webhook_endpoints_created_total").increment(1);
    Ok(Json(endpoint_with_secret(&row)))
}

/// `GET /v1/webhook_endpoints`: newest first.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let page = params.page(20, 100, Order::Desc)?;
    let (rows, has_more) = state
        .store
        .list_webhook_endpoints(&caller.project_id, &page)
        .await?;
    let ids = (
        rows.first().map(|r| r.id.clone()),
        rows.last().map(|r| r.id.clone()),
    );
    let data: Vec<Value> = rows.iter().map(endpoint_object).collect();
    Ok(Json(list_body(data, has_more, Some(ids))))
}

async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<EndpointRow, ApiError> {
    state
        .store
        .get_webhook_endpoint(&caller.project_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", id, "webhook_endpoint_id"))
}

/// `GET /v1/webhook_endpoints/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(endpoint_object(&find(&state, &caller, &id).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpoint {
    url: Option<String>,
    event_types: Option<Vec<String>>,
    name: Option<String>,
}

/// `POST /v1/webhook_endpoints/{id}`: changes the fields given. Deliveries already queued
/// keep going to the endpoint at its new URL.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateEndpoint>,
) -> Result<Json<Value>, ApiError> {
    if let Some(url) = &body.url {
        check_url(url)?;
    }
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    let event_types = body
        .event_types
        .as_deref()
        .map(check_event_types)
        .transpose()?;
    let update = EndpointUpdate {
        name: body.name.as_deref(),
        url: body.url.as_deref(),
        event_types: event_types.as_deref(),
    };
    let row = state
        .store
        .update_webhook_endpoint(&caller.project_id, &id, &update)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id, "webhook_endpoint_id"))?;
    Ok(Json(endpoint_object(&row)))
}

/// `DELETE /v1/webhook_endpoints/{id}`: its undelivered events are dropped with it.
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !state
        .store
        .delete_webhook_endpoint(&caller.project_id, &id)
        .await?
    {
        return Err(ApiError::not_found(
            "webhook endpoint",
            &id,
            "webhook_endpoint_id",
        ));
    }
    Ok(Json(json!({
        "id": id,
        "object": "webhook_endpoint.deleted",
        "deleted": true,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateSecret {
    #[serde(default)]
    keep_old_secret_active_for_24_hours: bool,
}

/// A JSON body that may also be empty (curl posts without one).
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        ApiError::BadRequest {
            param: super::extract::field_named_in(&message),
            message: format!("Invalid request body: {message}"),
            code: None,
        }
    })
}

/// `POST /v1/webhook_endpoints/{id}/rotate_secret`: a new secret at once; the old one keeps
/// signing (as a second signature) for 24 hours when asked.
pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: RotateSecret = optional_body(&body)?;
    let keep = body
        .keep_old_secret_active_for_24_hours
        .then(|| std::time::Duration::from_secs(24 * 3600));
    let row = state
        .store
        .rotate_webhook_secret(&caller.project_id, &id, keep)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id, "webhook_endpoint_id"))?;
    Ok(Json(endpoint_with_secret(&row)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestEvent {
    event_type: String,
}

/// `POST /v1/webhook_endpoints/{id}/test`: sends a sample event now, signed like any other,
/// and answers with the receiver's status. It is logged with the deliveries, and not retried.
pub async fn test(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TestEvent>,
) -> Result<Json<Value>, ApiError> {
    if !EVENT_TYPES.contains(&body.event_type.as_str()) {
        return Err(ApiError::bad_request(
            format!(
                "kiln does not send '{}' events; it sends {}",
                body.event_type,
                EVENT_TYPES.join(", ")
            ),
            "event_type",
        ));
    }
    let endpoint = find(&state, &caller, &id).await?;
    let event_id = crate::store::new_id("evt_");
    let payload = json!({
        "id": event_id,
        "object": "event",
        "type": body.event_type,
        "created_at": chrono::Utc::now().timestamp(),
        "data": {"id": "ftjob-test", "test": true},
    })
    .to_string();
    let delivery = state
        .store
        .insert_test_delivery(&endpoint.id, &event_id, &body.event_type, &payload)
        .await?;
    let secrets = state
        .store
        .webhook_signing_secrets(&endpoint.id)
        .await?
        .unwrap_or_else(|| vec![endpoint.secret.clone()]);
    let result = send(
        &client(&state.webhooks),
        &endpoint.url,
        &delivery.id,
        &secrets,
        &payload,
    )
    .await;
    state
        .store
        .finish_webhook_attempt(&delivery.id, 1, &result, 1, std::time::Duration::ZERO)
        .await?;
    match result.status_code {
        Some(code) => Ok(Json(json!({
            "object": "webhook_endpoint.test",
            "webhook_endpoint_id": endpoint.id,
            "event_type": body.event_type,
            "status_code": code,
            "success": true,
        }))),
        // No HTTP answer at all: the user's URL is wrong or down (400, not a 5xx that
        // clients would retry).
        None => Err(ApiError::BadRequest {
            message: format!(
                "The test event could not be delivered to {}: {}",
                endpoint.url,
                result.error.unwrap_or_default()
            ),
            param: Some("url".into()),
            code: Some("webhook_unreachable"),
        }),
    }
}

/// `GET /v1/webhook_endpoints/{id}/deliveries` (kiln): newest first, each with its attempts.
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let endpoint = find(&state, &caller, &id).await?;
    let page = params.page(20, 100, Order::Desc)?;
    let (rows, has_more) = state
        .store
        .list_webhook_deliveries(&endpoint.id, &page)
        .await?;
    let ids = (
        rows.first().map(|(d, _)| d.id.clone()),
        rows.last().map(|(d, _)| d.id.clone()),
    );
    let data: Vec<Value> = rows
        .iter()
        .map(|(d, attempts)| delivery_object(d, attempts))
        .collect();
    Ok(Json(list_body(data, has_more, Some(ids))))
}

/// `GET /v1/webhook_event_types`.
pub async fn event_types(_caller: Caller) -> Json<Value> {
    Json(json!({"object": "list", "data": EVENT_TYPES}))
}
