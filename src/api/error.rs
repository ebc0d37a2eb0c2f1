//! The one error type of the HTTP layer, rendered as OpenAI's error body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

/// Every error a handler returns. Rendered as
/// `{"error": {"message", "type", "param", "code"}}` with a fitting status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is wrong; `param` names the offending field when there is one.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401: no key, or a key kiln does not know.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid key without the right to do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such object in the caller's project (other projects' objects look the same).
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
    },
    /// 405: the route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: the body or upload is larger than allowed.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429: too much work is waiting; the client should retry after `retry-after`.
    #[error("{0}")]
    TooManyRequests(String),
    /// 429: the key is over its request rate; `retry-after` says when the next one passes.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// 503: a dependency (the database) is unavailable; clients may retry.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected fault; details are logged, not returned.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: param.into().map(str::to_owned),
            code: None,
        }
    }

    pub fn not_found(what: &str, id: &str, param: &'static str) -> Self {
        ApiError::NotFound {
            message: format!("No such {what}: '{id}'"),
            param: Some(param.to_owned()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(_) | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object, for errors that arrive inside an event stream (the status
    /// line has gone out already). Internal details stay in the log.
    pub fn body(&self) -> serde_json::Value {
        let message = match self {
            ApiError::Internal(err) => {
                tracing::error!(error = %err, "error inside a stream");
                "The server had an error while processing your request.".to_owned()
            }
            other => other.to_string(),
        };
        json!({"error": {"message": message, "type": self.kind(), "param": self.param(), "code": self.code()}})
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::TooManyRequests(_) | ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { code, .. } => *code,
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::NotFound { .. } => Some("not_found"),
            ApiError::PayloadTooLarge(_) => Some("payload_too_large"),
            ApiError::MethodNotAllowed(_) => Some("method_not_allowed"),
            ApiError::TooManyRequests(_) => Some("overloaded"),
            ApiError::RateLimited { .. } => Some("rate_limit_exceeded"),
            _ => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } | ApiError::NotFound { param, .. } => {
                param.as_deref()
            }
            _ => None,
        }
    }
}

/// The OpenAI error body for a status and message; used by the fallbacks too.
pub fn error_body(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                "The server had an error while processing your request.".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = error_body(status, &message, self.kind(), self.param(), self.code());
        if let ApiError::RateLimited { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable("The database is unavailable; retry shortly.".into())
            }
            // PostgreSQL text cannot hold NUL characters: a request that carries one (in a
            // query parameter, a name, metadata) is the caller's mistake, not a fault.
            StoreError::Other(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("22021" | "22P05")) =>
            {
                ApiError::bad_request(
                    "Text in this request contains a character PostgreSQL cannot store (such as \\u0000).",
                    None,
                )
            }
            StoreError::Other(e) => ApiError::Internal(e.into()),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(err: std::io::Error) -> Self {
        ApiError::Internal(err.into())
    }
}
