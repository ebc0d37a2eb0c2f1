//! Inference endpoints for text encoders: `POST /v1/classifications` (kiln's) and
//! `POST /v1/embeddings` (OpenAI's shape). The handlers parse and check the request, resolve
//! the model, and hand plain strings to the serving engine (`serve/`); they never run a model.

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::models::resolve_for_inference;
use super::{AppState, Caller};
use crate::serve::ServeError;

/// The request fields every inference endpoint shares.
struct Common {
    model: String,
    texts: Vec<String>,
    truncate: bool,
}

fn object_body(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object.", None))
}

fn common(fields: &Map<String, Value>, max_inputs: usize) -> Result<Common, ApiError> {
    let model = match fields.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) => return Err(ApiError::bad_request("'model' is empty.", "model")),
        Some(_) => return Err(ApiError::bad_request("'model' must be a string.", "model")),
        None => {
            return Err(ApiError::bad_request(
                "Missing required parameter: 'model'.",
                "model",
            ));
        }
    };
    let texts = match fields.get("input") {
        None => {
            return Err(ApiError::bad_request(
                "Missing required parameter: 'input'.",
                "input",
            ));
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::bad_request(
                    "'input' is an empty list: send at least one text.",
                    "input",
                ));
            }
            if items.len() > max_inputs {
                return Err(ApiError::bad_request(
                    format!(
                        "'input' has {} items; at most {max_inputs} are allowed in one request.",
                        items.len()
                    ),
                    "input",
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(_) | Value::Array(_) => Err(ApiError::bad_request(
                        format!(
                            "input[{i}] is a token array: send text, which kiln tokenises with the model's own tokenizer."
                        ),
                        "input",
                    )),
                    _ => Err(ApiError::bad_request(
                        format!("input[{i}] must be a string."),
                        "input",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "'input' must be a string or a list of strings.",
                "input",
            ));
        }
    };
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::bad_request(
            if texts.len() == 1 {
                "'input' is empty: send some text.".to_owned()
            } else {
                format!("input[{i}] is empty: every input needs some text.")
            },
            "input",
        ));
    }
    let truncate = match fields.get("truncate") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'truncate' must be true or false.",
                "truncate",
            ));
        }
    };
    Ok(Common {
        model,
        texts,
        truncate,
    })
}

pub(crate) fn serve_error(e: ServeError) -> ApiError {
    match e {
        ServeError::Unsupported(m) => ApiError::BadRequest {
            message: m,
            param: Some("model".into()),
            code: Some("model_not_supported"),
        },
        ServeError::BadInput { index, message } => ApiError::BadRequest {
            message: format!("input[{index}]: {message}"),
            param: Some("input".into()),
            code: Some("input_too_long"),
        },
        ServeError::Overloaded(_) => ApiError::TooManyRequests(e.to_string()),
        ServeError::Timeout(_) => {
            ApiError::Unavailable(format!("{e}; retry, or send fewer inputs"))
        }
        ServeError::TooLarge(m) => ApiError::BadRequest {
            message: m,
            param: Some("model".into()),
            code: Some("model_too_large"),
        },
        ServeError::Deleted(id) => super::models::model_not_found(&id),
        ServeError::Load(m) | ServeError::Internal(m) => ApiError::Internal(anyhow::anyhow!(m)),
    }
}

fn usage(tokens: usize) -> Value {
    json!({"prompt_tokens": tokens, "total_tokens": tokens})
}

/// `POST /v1/classifications`: label probabilities per input from a fine-tuned classifier.
pub async fn classify(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let fields = object_body(&body)?;
    let req = common(fields, state.serving.settings().max_inputs)?;
    let model = resolve_for_inference(&state, &caller, &req.model).await?;
    let (loaded, results) = state
        .serving
        .classify(&model, req.texts, req.truncate)
        .await
        .map_err(serve_error)?;
    let labels = &loaded.model.labels;
    let multi_label = loaded.model.multi_label;
    let mut total = 0;
    let data: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, (c, tokens))| {
            total += tokens;
            let mut item = json!({
                "object": "classification",
                "index": index,
            });
            extend(&mut item, scored_labels(labels, &c.scores, multi_label));
            item["prompt_tokens"] = json!(tokens);
            item
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "model": model.id,
        "data": data,
        "usage": usage(total),
    })))
}

/// `POST /v1/embeddings`: OpenAI's embeddings endpoint for encoders, pooled and normalised
/// as the model's sentence-transformers configuration says.
pub async fn embed(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let fields = object_body(&body)?;
    let req = common(fields, state.serving.settings().max_inputs)?;
    let base64 = match fields.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'encoding_format' must be 'float' or 'base64'.",
                "encoding_format",
            ));
        }
    };
    let dimensions = match fields.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|d| d > 0) => n.as_u64(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "'dimensions' must be a positive integer.",
                "dimensions",
            ));
        }
    };
    let model = resolve_for_inference(&state, &caller, &req.model).await?;
    let (loaded, results) = state
        .serving
        .embed(&model, req.texts, req.truncate)
        .await
        .map_err(serve_error)?;
    let dim = loaded.model.embedding_dim() as u64;
    if let Some(d) = dimensions
        && d != dim
    {
        return Err(ApiError::bad_request(
            format!(
                "model '{}' returns {dim}-dimensional embeddings; 'dimensions' must be {dim} or absent.",
                model.id
            ),
            "dimensions",
        ));
    }
    let mut total = 0;
    let data: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, (vector, tokens))| {
            total += tokens;
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.id,
        "usage": usage(total),
    })))
}

/// The images of a `/v1/images/classifications` request and the model named.
struct ImageRequest {
    model: String,
    images: Vec<Vec<u8>>,
}

fn image_from_url(i: usize, url: &str) -> Result<Vec<u8>, ApiError> {
    if !url.starts_with("data:") {
        return Err(ApiError::bad_request(
            format!(
                "input[{i}] must be a data URL (data:image/png;base64,...); kiln does not fetch remote images."
            ),
            "input",
        ));
    }
    crate::data::images::decode_data_url(url)
        .map_err(|e| ApiError::bad_request(format!("input[{i}]: {e}"), "input"))
}

fn image_request_from_json(body: &Value, max_inputs: usize) -> Result<ImageRequest, ApiError> {
    let fields = object_body(body)?;
    let model = match fields.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "'model' must be a non-empty string.",
                "model",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "Missing required parameter: 'model'.",
                "model",
            ));
        }
    };
    let urls: Vec<&Value> = match fields.get("input") {
        None => {
            return Err(ApiError::bad_request(
                "Missing required parameter: 'input'.",
                "input",
            ));
        }
        Some(Value::Array(items)) => items.iter().collect(),
        Some(v) => vec![v],
    };
    if urls.is_empty() {
        return Err(ApiError::bad_request(
            "'input' is an empty list: send at least one image.",
            "input",
        ));
    }
    if urls.len() > max_inputs {
        return Err(ApiError::bad_request(
            format!(
                "'input' has {} images; at most {max_inputs} are allowed in one request.",
                urls.len()
            ),
            "input",
        ));
    }
    let images = urls
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => image_from_url(i, s),
            // OpenAI's image content part: {"type": "image_url", "image_url": {"url": ...}}.
            Value::Object(o) => match o
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
            {
                Some(url) => image_from_url(i, url),
                None => Err(ApiError::bad_request(
                    format!("input[{i}] must be a data URL string or {{\"image_url\": {{\"url\": ...}}}}."),
                    "input",
                )),
            },
            _ => Err(ApiError::bad_request(
                format!("input[{i}] must be a data URL string."),
                "input",
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ImageRequest { model, images })
}

async fn image_request_from_multipart(
    mut multipart: axum::extract::Multipart,
    max_inputs: usize,
) -> Result<ImageRequest, ApiError> {
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("Malformed multipart body: {}", e.body_text()), None)
    };
    let mut model = None;
    let mut images = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "model" {
            model = Some(field.text().await.map_err(malformed)?);
        } else if field.file_name().is_some()
            || name == "image"
            || name == "input"
            || name == "file"
        {
            if images.len() >= max_inputs {
                return Err(ApiError::bad_request(
                    format!("at most {max_inputs} images are allowed in one request."),
                    "input",
                ));
            }
            images.push(field.bytes().await.map_err(malformed)?.to_vec());
        }
    }
    let model = model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("Missing required parameter: 'model'.", "model"))?;
    if images.is_empty() {
        return Err(ApiError::bad_request(
            "No image in the request: send one or more file parts (PNG, JPEG or WebP).",
            "input",
        ));
    }
    Ok(ImageRequest { model, images })
}

/// `POST /v1/images/classifications` (kiln): class probabilities per image from an image
/// classifier, for `{"model", "input": data URL | [data URL]}` or a multipart upload of
/// image files (a `model` field and one or more files); answers like `/v1/classifications`.
pub async fn classify_images(
    State(state): State<AppState>,
    caller: Caller,
    request: axum::extract::Request,
) -> Result<Json<Value>, ApiError> {
    use axum::extract::FromRequest;
    let max_inputs = state.serving.settings().max_inputs;
    let is_multipart = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("multipart/form-data"));
    let req = if is_multipart {
        let multipart = axum::extract::Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::bad_request(format!("Malformed multipart body: {e}"), None))?;
        image_request_from_multipart(multipart, max_inputs).await?
    } else {
        let ApiJson(body) = ApiJson::<Value>::from_request(request, &state).await?;
        image_request_from_json(&body, max_inputs)?
    };
    let model = super::models::resolve_for_images(&state, &caller, &req.model).await?;
    let (loaded, results) = state
        .serving
        .classify_images(&model, req.images)
        .await
        .map_err(|e| match e {
            ServeError::BadInput { index, message } => ApiError::BadRequest {
                message: format!("input[{index}]: {message}"),
                param: Some("input".into()),
                code: Some("invalid_image"),
            },
            other => serve_error(other),
        })?;
    let labels = &loaded.model.labels;
    let n = results.len();
    let data: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, probs)| {
            let mut item = json!({
                "object": "classification",
                "index": index,
            });
            extend(&mut item, scored_labels(labels, &probs, false));
            item
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "model": model.id,
        "data": data,
        "usage": {"prompt_tokens": 0, "total_tokens": 0, "images": n},
    })))
}

/// A classification's fields as the API and `kiln predict` write them: `label` and `score`
/// (the highest-scoring label; the first of equals), `scores` (every label's, in the model's
/// label order) and, for a multi-label model, `labels` (those scoring 0.5 or more).
pub(crate) fn scored_labels(labels: &[String], scores: &[f32], multi_label: bool) -> Value {
    let best = crate::train::metrics::argmax(scores);
    let by_label: Map<String, Value> = labels
        .iter()
        .zip(scores)
        .map(|(l, s)| (l.clone(), json!(s)))
        .collect();
    let mut fields = json!({
        "label": labels.get(best),
        "score": scores.get(best),
        "scores": by_label,
    });
    if multi_label {
        fields["labels"] = json!(
            labels
                .iter()
                .zip(scores)
                .filter(|(_, s)| **s >= 0.5)
                .map(|(l, _)| l)
                .collect::<Vec<_>>()
        );
    }
    fields
}

/// Adds `more`'s fields to the object `item`.
fn extend(item: &mut Value, more: Value) {
    if let (Some(item), Value::Object(more)) = (item.as_object_mut(), more) {
        item.extend(more);
    }
}
