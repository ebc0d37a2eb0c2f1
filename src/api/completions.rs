//! Generation endpoints in OpenAI's shapes: `POST /v1/chat/completions` and
//! `POST /v1/completions`, for base and fine-tuned decoders, streamed (server-sent chunks
//! ending with `data: [DONE]`) or not. The handlers check the request and hand the prompt to
//! the serving engine, which runs the model on its own thread.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::models::resolve_for_generation;
use super::{AppState, Caller};
use crate::serve::{GenEvent, Generation, Prompt, SamplingParams, ServeError};

/// Samples one request may ask for.
const MAX_N: u64 = 16;
/// Stop strings one request may give (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Tokens a chat reply may take when the request does not say.
const DEFAULT_CHAT_MAX_TOKENS: usize = 512;
/// `/v1/completions`' default, as OpenAI's.
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "echo",
    "best_of",
    "suffix",
];

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(message, param)
}

fn unsupported(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        param: Some(param.into()),
        code: Some("unsupported_parameter"),
    }
}

fn number(fields: &Map<String, Value>, key: &'static str) -> Result<Option<f64>, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| bad(format!("'{key}' must be a number."), key)),
    }
}

fn integer(fields: &Map<String, Value>, key: &'static str) -> Result<Option<i64>, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| bad(format!("'{key}' must be an integer."), key)),
    }
}

fn boolean(fields: &Map<String, Value>, key: &'static str) -> Result<bool, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("'{key}' must be true or false."), key)),
    }
}

/// What both endpoints take besides the prompt.
struct Request {
    model: String,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
}

fn common(
    body: &Value,
    allowed: &[&str],
    default_max_tokens: usize,
) -> Result<(Request, Map<String, Value>), ApiError> {
    let fields = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object.", None))?
        .clone();
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::BadRequest {
            message: format!("Unrecognized request argument supplied: {unknown}"),
            param: Some(unknown.clone()),
            code: Some("unknown_parameter"),
        });
    }
    let model = match fields.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(bad("'model' must be a non-empty string.", "model")),
        None => return Err(bad("Missing required parameter: 'model'.", "model")),
    };
    let temperature = number(&fields, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("'temperature' must be between 0 and 2, got {temperature}."),
            "temperature",
        ));
    }
    let top_p = number(&fields, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("'top_p' must be above 0 and at most 1, got {top_p}."),
            "top_p",
        ));
    }
    let mut max_tokens = None;
    for key in ["max_completion_tokens", "max_tokens"] {
        if let Some(m) = integer(&fields, key)? {
            if m < 1 {
                return Err(bad(format!("'{key}' must be at least 1, got {m}."), key));
            }
            max_tokens.get_or_insert(m as usize);
        }
    }
    let n = integer(&fields, "n")?.unwrap_or(1);
    if n < 1 || n as u64 > MAX_N {
        return Err(bad(format!("'n' must be from 1 to {MAX_N}, got {n}."), "n"));
    }
    let seed = match fields.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| bad("'seed' must be an integer.", "seed"))?,
        ),
    };
    let stop = match fields.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(bad(
                    format!("'stop' may hold at most {MAX_STOP} sequences."),
                    "stop",
                ));
            }
            items
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("'stop' must hold strings.", "stop"))
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(bad("'stop' must be a string or a list of strings.", "stop"));
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad("'stop' sequences must not be empty.", "stop"));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if number(&fields, key)?.is_some_and(|x| x != 0.0) {
            return Err(unsupported(
                format!("'{key}' is not supported by kiln; omit it or send 0."),
                key,
            ));
        }
    }
    match fields.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(unsupported(
                "'logprobs' is not supported by kiln yet.",
                "logprobs",
            ));
        }
    }
    let stream = boolean(&fields, "stream")?;
    let include_usage = match fields.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) if stream => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(
                    "'stream_options.include_usage' must be true or false.",
                    "stream_options",
                ));
            }
        },
        Some(Value::Object(_)) => {
            return Err(bad(
                "'stream_options' is only allowed when 'stream' is true.",
                "stream_options",
            ));
        }
        Some(_) => return Err(bad("'stream_options' must be an object.", "stream_options")),
    };
    let request = Request {
        model,
        params: SamplingParams {
            max_tokens: max_tokens.unwrap_or(default_max_tokens),
            temperature,
            top_p,
            n: n as usize,
            seed,
            stop,
        },
        stream,
        include_usage,
    };
    Ok((request, fields))
}

/// Checks `messages` and makes them plain for the chat template (`developer` is `system`).
fn messages(fields: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
    let items = match fields.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(bad(
                "'messages' is empty: send at least one message.",
                "messages",
            ));
        }
        Some(_) => return Err(bad("'messages' must be a list of messages.", "messages")),
        None => return Err(bad("Missing required parameter: 'messages'.", "messages")),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let obj = m
            .as_object()
            .ok_or_else(|| bad(format!("messages[{i}] must be an object."), "messages"))?;
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            Some(other) => {
                return Err(bad(
                    format!(
                        "messages[{i}].role '{other}' is not one of system, developer, user, assistant, tool."
                    ),
                    "messages",
                ));
            }
            None => return Err(bad(format!("messages[{i}].role is required."), "messages")),
        };
        let content = match obj.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some(kind), _) => {
                            return Err(unsupported(
                                format!(
                                    "messages[{i}].content[{j}] is a '{kind}' part; kiln's decoders take text only."
                                ),
                                "messages",
                            ));
                        }
                        _ => {
                            return Err(bad(
                                format!(
                                    "messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": ...}}."
                                ),
                                "messages",
                            ));
                        }
                    }
                }
                text
            }
            _ => {
                return Err(bad(
                    format!("messages[{i}].content must be a string or a list of text parts."),
                    "messages",
                ));
            }
        };
        if content.contains('\0') {
            return Err(bad(
                format!("messages[{i}].content contains a NUL character."),
                "messages",
            ));
        }
        out.push(json!({"role": role, "content": content}));
    }
    Ok(out)
}

fn serve_error(e: ServeError, param: &'static str) -> ApiError {
    match e {
        ServeError::BadInput { message, .. } => ApiError::BadRequest {
            message,
            param: Some(param.into()),
            code: Some("context_length_exceeded"),
        },
        other => super::inference::serve_error(other),
    }
}

/// The finished text of each sample.
struct Collected {
    texts: Vec<String>,
    reasons: Vec<&'static str>,
    completion_tokens: usize,
}

async fn collect(
    generation: &mut Generation,
    n: usize,
    param: &'static str,
) -> Result<Collected, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut reasons = vec!["length"; n];
    let mut completion_tokens = 0;
    while let Some(event) = generation.events.recv().await {
        match event.map_err(|e| serve_error(e, param))? {
            GenEvent::Text { index, text } => {
                if let Some(t) = texts.get_mut(index) {
                    t.push_str(&text);
                }
            }
            GenEvent::Finished {
                index,
                reason,
                tokens,
            } => {
                if let Some(r) = reasons.get_mut(index) {
                    *r = reason.as_str();
                }
                completion_tokens += tokens;
            }
        }
    }
    Ok(Collected {
        texts,
        reasons,
        completion_tokens,
    })
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Which endpoint a stream serves: the chunk shapes differ.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Text,
}

/// Sends each event as an OpenAI chunk, then usage (when asked) and `[DONE]`.
fn stream_response(
    mut generation: Generation,
    shape: Shape,
    id: String,
    model: String,
    n: usize,
    include_usage: bool,
    param: &'static str,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let created = now();
        let object = match shape {
            Shape::Chat => "chat.completion.chunk",
            Shape::Text => "text_completion",
        };
        let frame = |choices: Value, usage: Value| {
            let mut body = json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": choices, "system_fingerprint": null,
            });
            if !usage.is_null() {
                body["usage"] = usage;
            }
            Event::default().data(body.to_string())
        };
        let choice = |index: usize, text: Option<&str>, role: bool, finish: Option<&str>| {
            match shape {
                Shape::Chat => {
                    let mut delta = json!({});
                    if role {
                        delta["role"] = json!("assistant");
                    }
                    if let Some(t) = text {
                        delta["content"] = json!(t);
                    }
                    json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": null})
                }
                Shape::Text => json!({
                    "index": index, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null,
                }),
            }
        };
        if matches!(shape, Shape::Chat) {
            for i in 0..n {
                if tx
                    .send(frame(json!([choice(i, Some(""), true, None)]), Value::Null))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let mut completion_tokens = 0;
        while let Some(event) = generation.events.recv().await {
            let frame = match event {
                Ok(GenEvent::Text { index, text }) => frame(
                    json!([choice(index, Some(&text), false, None)]),
                    Value::Null,
                ),
                Ok(GenEvent::Finished {
                    index,
                    reason,
                    tokens,
                }) => {
                    completion_tokens += tokens;
                    let text = match shape {
                        Shape::Chat => None,
                        Shape::Text => Some(""),
                    };
                    frame(
                        json!([choice(index, text, false, Some(reason.as_str()))]),
                        Value::Null,
                    )
                }
                Err(e) => {
                    let e = serve_error(e, param);
                    let _ = tx.send(Event::default().data(e.body().to_string())).await;
                    return;
                }
            };
            if tx.send(frame).await.is_err() {
                // The client went away: dropping the receiver stops the generation.
                return;
            }
        }
        if include_usage {
            let usage = usage(generation.prompt_tokens, completion_tokens);
            if tx.send(frame(json!([]), usage)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let (req, fields) = common(&body, CHAT_FIELDS, DEFAULT_CHAT_MAX_TOKENS)?;
    let messages = messages(&fields)?;
    for key in ["tools", "response_format"] {
        let given = match fields.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => o.get("type").and_then(Value::as_str) != Some("text"),
            Some(_) => true,
        };
        if given {
            return Err(unsupported(
                format!("'{key}' is not supported by kiln's decoders yet."),
                if key == "tools" {
                    "tools"
                } else {
                    "response_format"
                },
            ));
        }
    }
    let model = resolve_for_generation(&state, &caller, &req.model).await?;
    let n = req.params.n;
    let mut generation = state
        .serving
        .generate(&model, Prompt::Chat(messages), req.params)
        .await
        .map_err(|e| serve_error(e, "messages"))?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if req.stream {
        return Ok(stream_response(
            generation,
            Shape::Chat,
            id,
            req.model,
            n,
            req.include_usage,
            "messages",
        ));
    }
    let c = collect(&mut generation, n, "messages").await?;
    let choices: Vec<Value> = c
        .texts
        .iter()
        .zip(&c.reasons)
        .enumerate()
        .map(|(i, (text, reason))| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "finish_reason": reason,
                "logprobs": null,
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": req.model,
        "choices": choices,
        "usage": usage(generation.prompt_tokens, c.completion_tokens),
        "system_fingerprint": null,
    }))
    .into_response())
}

/// `POST /v1/completions`: one prompt (a string, or a list holding one string).
pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let (req, fields) = common(&body, COMPLETION_FIELDS, DEFAULT_COMPLETION_MAX_TOKENS)?;
    let prompt = match fields.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_owned()
        }
        Some(Value::Array(_)) => {
            return Err(unsupported(
                "'prompt' must be one string: kiln completes one prompt per request (use 'n' for several samples).",
                "prompt",
            ));
        }
        Some(_) => return Err(bad("'prompt' must be a string.", "prompt")),
        None => return Err(bad("Missing required parameter: 'prompt'.", "prompt")),
    };
    if prompt.is_empty() {
        return Err(bad("'prompt' is empty.", "prompt"));
    }
    for key in ["echo"] {
        if boolean(&fields, key)? {
            return Err(unsupported(
                format!("'{key}' is not supported by kiln."),
                "echo",
            ));
        }
    }
    for (key, ok) in [
        (
            "best_of",
            integer(&fields, "best_of")?.is_none_or(|b| b == 1),
        ),
        ("suffix", fields.get("suffix").is_none_or(Value::is_null)),
    ] {
        if !ok {
            return Err(unsupported(
                format!("'{key}' is not supported by kiln."),
                if key == "suffix" { "suffix" } else { "best_of" },
            ));
        }
    }
    let model = resolve_for_generation(&state, &caller, &req.model).await?;
    let n = req.params.n;
    let mut generation = state
        .serving
        .generate(&model, Prompt::Text(prompt), req.params)
        .await
        .map_err(|e| serve_error(e, "prompt"))?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    if req.stream {
        return Ok(stream_response(
            generation,
            Shape::Text,
            id,
            req.model,
            n,
            req.include_usage,
            "prompt",
        ));
    }
    let c = collect(&mut generation, n, "prompt").await?;
    let choices: Vec<Value> = c
        .texts
        .iter()
        .zip(&c.reasons)
        .enumerate()
        .map(|(i, (text, reason))| {
            json!({"index": i, "text": text, "finish_reason": reason, "logprobs": null})
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": now(),
        "model": req.model,
        "choices": choices,
        "usage": usage(generation.prompt_tokens, c.completion_tokens),
        "system_fingerprint": null,
    }))
    .into_response())
}
