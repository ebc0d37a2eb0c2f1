//! The HTTP layer: routes, extractors, wire types, error mapping and auth.
//! It knows only handles (Store, Artifacts); it never calls candle or writes SQL.

mod completions;
mod dashboard;
mod docs;
pub mod error;
pub mod extract;
mod files;
mod graders;
mod inference;
mod jobs;
mod keys;
pub mod limits;
mod models;
mod ops;
pub mod pagination;
pub mod uploads;
mod webhooks;

pub(crate) use inference::scored_labels;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::artifacts::Artifacts;
use crate::queue::Queue;
use crate::serve::Serving;
use crate::store::Store;
use crate::store::keys::{Principal, matches_admin_key};
use error::{ApiError, error_body};

pub use files::FileValidator;

/// Everything a handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub artifacts: Artifacts,
    pub validator: FileValidator,
    pub limits: Arc<Limits>,
    pub admin: Option<Arc<AdminKey>>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub queue: Queue,
    /// Base models in Hugging Face layout (`KILN_MODELS_DIR`).
    pub models_dir: Arc<PathBuf>,
    /// The inference engine.
    pub serving: Serving,
    /// How webhook deliveries are sent (test events go out from the API).
    pub webhooks: Arc<crate::webhooks::WebhookSettings>,
    /// The base encoder of `cosine` graders that name none (`KILN_GRADER_EMBEDDING_MODEL`).
    pub grader_embedding_model: Option<Arc<str>>,
    /// Where dry runs time their few steps: the first training device (`KILN_DEVICES`).
    pub estimate_device: crate::worker::SlotDevice,
}

/// Request size and rate limits.
#[derive(Debug)]
pub struct Limits {
    pub max_upload_bytes: u64,
    /// Body limit for JSON routes.
    pub max_json_bytes: usize,
    /// Per-key request rate (`KILN_RATE_LIMIT`); none when off.
    pub rate: Option<limits::RateLimiter>,
    /// Event streams (`?stream=true`) open at once across all clients.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// File uploads in progress at once across all clients (`KILN_MAX_UPLOADS`): each holds
    /// a file being written to disk.
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// Largest file assembled from parts (`KILN_MAX_LARGE_UPLOAD_BYTES`).
    pub max_large_upload_bytes: u64,
}

/// The `KILN_ADMIN_KEY` from configuration: only its hash is kept, and it acts on the
/// default project.
#[derive(Debug, Clone)]
pub struct AdminKey {
    pub sha256: [u8; 32],
    pub project_id: String,
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the whole router. A plain function so tests and `kiln serve` use the same app.
/// Routes are written with their full paths: `tests/openapi.rs` reads them from this file
/// to check that openapi.yaml describes exactly what is served. The dashboard's pages
/// (`/`, `/assets/...`) are not API operations: they come from [`dashboard::routes`].
pub fn router(state: AppState) -> Router {
    let json_limit = state.limits.max_json_bytes;
    let v1 = Router::new()
        .route(
            "/v1/files",
            get(files::list)
                .post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::max(upload_body_limit(
                    state.limits.max_upload_bytes,
                ))),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::remove))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/uploads", post(uploads::create))
        .route("/v1/uploads/{id}", get(uploads::retrieve))
        .route(
            "/v1/uploads/{id}/parts",
            post(uploads::add_part).layer(axum::extract::DefaultBodyLimit::max(upload_body_limit(
                uploads::PART_MAX_BYTES,
            ))),
        )
        .route("/v1/uploads/{id}/complete", post(uploads::complete))
        .route("/v1/uploads/{id}/cancel", post(uploads::cancel))
        .route("/v1/fine_tuning/jobs", get(jobs::list).post(jobs::create))
        .route("/v1/fine_tuning/jobs/{id}", get(jobs::retrieve))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/fine_tuning/jobs/{id}/pause", post(jobs::pause))
        .route("/v1/fine_tuning/jobs/{id}/resume", post(jobs::resume))
        .route("/v1/fine_tuning/jobs/{id}/events", get(jobs::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(jobs::checkpoints),
        )
        .route("/v1/models", get(models::list).post(models::register))
        .route(
            "/v1/models/{*id}",
            get(models::retrieve).delete(models::remove),
        )
        .route("/v1/classifications", post(inference::classify))
        .route("/v1/embeddings", post(inference::embed))
        .route(
            "/v1/images/classifications",
            post(inference::classify_images),
        )
        .route("/v1/chat/completions", post(completions::chat))
        .route(
            "/v1/fine_tuning/alpha/graders/validate",
            post(graders::validate),
        )
        .route("/v1/fine_tuning/alpha/graders/run", post(graders::run))
        .route("/v1/completions", post(completions::completions))
        .route(
            "/v1/webhook_endpoints",
            get(webhooks::list).post(webhooks::create),
        )
        .route(
            "/v1/webhook_endpoints/{id}",
            get(webhooks::retrieve)
                .post(webhooks::update)
                .delete(webhooks::remove),
        )
        .route(
            "/v1/webhook_endpoints/{id}/rotate_secret",
            post(webhooks::rotate_secret),
        )
        .route("/v1/webhook_endpoints/{id}/test", post(webhooks::test))
        .route(
            "/v1/webhook_endpoints/{id}/deliveries",
            get(webhooks::deliveries),
        )
        .route("/v1/webhook_event_types", get(webhooks::event_types))
        .route("/v1/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/v1/webhooks/{id}",
            get(webhooks::retrieve)
                .post(webhooks::update)
                .delete(webhooks::remove),
        )
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{id}", delete(keys::revoke))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(json_limit));

    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/docs", get(docs::page))
        .route("/openapi.yaml", get(docs::yaml))
        .route("/openapi.json", get(docs::json))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(v1)
        .merge(dashboard::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(ensure_error_body))
        .layer(middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

/// The upload route's body limit: the file plus room for the multipart framing. The handler
/// enforces the file size itself; this bounds what reaches it.
fn upload_body_limit(max_upload_bytes: u64) -> usize {
    usize::try_from(max_upload_bytes.saturating_add(files::MULTIPART_OVERHEAD))
        .unwrap_or(usize::MAX)
}

/// Resolves the bearer key to a [`Principal`] for the handlers, or answers 401.
async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(key) = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return Err(ApiError::Unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
        ));
    };
    let principal = match &state.admin {
        Some(admin) if matches_admin_key(key, &admin.sha256) => Principal {
            project_id: admin.project_id.clone(),
            key_id: "admin".into(),
            is_admin: true,
        },
        _ => state
            .store
            .authenticate(key)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("Incorrect API key provided.".into()))?,
    };
    if let Some(rate) = &state.limits.rate
        && let Err(wait) = rate.check(&principal.key_id)
    {
        return Err(ApiError::RateLimited {
            message: format!(
                "Rate limit reached for this API key; retry in {:.1} s.",
                wait.as_secs_f64()
            ),
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
        });
    }
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// Only admin keys pass.
pub(crate) fn require_admin(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "This operation needs an admin key.".into(),
        ))
    }
}

async fn not_found(req: Request) -> Response {
    let message = format!("Unknown route: {} {}", req.method(), req.uri().path());
    error_body(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        None,
        Some("unknown_route"),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "Method {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// Last line of defence for the error contract: any error response that is not already
/// JSON (from a layer or a rejection we did not wrap) gets the OpenAI error body.
async fn ensure_error_body(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let mut fixed = error_body(status, &message, kind, None, None);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

/// Prometheus request count and latency per route template (not per raw path, which
/// would make one series per object id).
async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("kiln_http_requests_total", &labels).increment(1);
    metrics::histogram!("kiln_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Used by handlers that need the caller.
pub(crate) type Caller = Extension<Principal>;

pub(crate) fn unix(ts: chrono::DateTime<chrono::Utc>) -> i64 {
    ts.timestamp()
}
