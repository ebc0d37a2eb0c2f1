//! Extractors whose rejections are OpenAI-shaped errors, not axum's plain-text ones.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// `axum::Json` with errors that name the offending field where serde tells us.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge("The request body is too large.".into());
    }
    let detail = match &rejection {
        JsonRejection::JsonDataError(e) => {
            std::error::Error::source(e).map_or_else(|| e.body_text(), |s| s.to_string())
        }
        JsonRejection::JsonSyntaxError(e) => {
            std::error::Error::source(e).map_or_else(|| e.body_text(), |s| s.to_string())
        }
        other => other.body_text(),
    };
    let message = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "Expected a JSON body with `Content-Type: application/json`.".to_owned()
        }
        JsonRejection::JsonSyntaxError(_) => format!("The body is not valid JSON: {detail}"),
        _ => format!("Invalid request body: {detail}"),
    };
    ApiError::BadRequest {
        param: field_named_in(&detail),
        message,
        code: None,
    }
}

/// The field a deserialisation error is about. axum reports the path first
/// ("project: invalid type: ..."); for a missing or unknown field serde names it in
/// backticks ("missing field `purpose`").
pub(crate) fn field_named_in(message: &str) -> Option<String> {
    if let Some((path, _)) = message.split_once(": ") {
        let is_path = !path.is_empty()
            && path != "."
            && path
                .chars()
                .all(|c| c.is_alphanumeric() || "_.[]".contains(c));
        if is_path {
            return Some(path.to_owned());
        }
    }
    if !(message.contains("missing field") || message.contains("unknown field")) {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// `axum::extract::Query` with OpenAI-shaped errors.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let detail =
                    std::error::Error::source(&e).map_or_else(|| e.body_text(), |s| s.to_string());
                Err(ApiError::BadRequest {
                    param: field_named_in(&detail),
                    message: format!("Invalid query string: {detail}"),
                    code: None,
                })
            }
            Err(other) => Err(ApiError::bad_request(other.body_text(), None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::field_named_in;

    #[test]
    fn finds_backticked_field() {
        assert_eq!(
            field_named_in("missing field `purpose` at line 1").as_deref(),
            Some("purpose")
        );
        assert_eq!(field_named_in("no field here"), None);
        assert_eq!(
            field_named_in("project: invalid type: integer `7`, expected a string").as_deref(),
            Some("project")
        );
        assert_eq!(
            field_named_in("method.hyperparameters.n_epochs: invalid value").as_deref(),
            Some("method.hyperparameters.n_epochs")
        );
        assert_eq!(field_named_in("invalid type: integer `7`"), None);
    }
}
