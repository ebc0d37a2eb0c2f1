//! `POST /v1/fine_tuning/alpha/graders/validate` and `/run` (OpenAI's shapes): check a grader
//! object, or score one model sample with it, before a reinforcement job uses it.

use std::collections::HashMap;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::models::{resolve_for_generation, resolve_for_inference};
use super::{AppState, Caller};
use crate::serve::{GenEvent, ModelRef, Prompt, SamplingParams, Serving};
use crate::train::graders::{Grader, ModelParams, ModelSampler, fill_embedding_model};

/// Runs grader models through the serving engine (from a blocking thread).
struct ServedSampler {
    serving: Serving,
    /// Grader models and embedding models, by id.
    models: HashMap<String, ModelRef>,
    runtime: tokio::runtime::Handle,
}

impl ModelSampler for ServedSampler {
    fn complete(
        &self,
        model: &str,
        messages: &[Value],
        params: &ModelParams,
    ) -> Result<String, String> {
        let model = self
            .models
            .get(model)
            .ok_or_else(|| format!("model '{model}' was not resolved"))?;
        let params = SamplingParams {
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            n: 1,
            seed: params.seed,
            stop: Vec::new(),
        };
        let mut generation = self
            .runtime
            .block_on(
                self.serving
                    .generate(model, Prompt::Chat(messages.to_vec()), params),
            )
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        while let Some(event) = self.runtime.block_on(generation.events.recv()) {
            if let GenEvent::Text { text: t, .. } = event.map_err(|e| e.to_string())? {
                text.push_str(&t);
            }
        }
        Ok(text)
    }

    fn embed(&self, model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        let model = self
            .models
            .get(model)
            .ok_or_else(|| format!("model '{model}' was not resolved"))?;
        let (_, out) = self
            .runtime
            .block_on(self.serving.embed(model, texts.to_vec(), true))
            .map_err(|e| e.to_string())?;
        Ok(out.into_iter().map(|(v, _)| v).collect())
    }
}

fn fields(body: &Value, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object.", None))?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::BadRequest {
            message: format!("Unrecognized request argument supplied: {k}"),
            param: Some(k.clone()),
            code: Some("unknown_parameter"),
        });
    }
    Ok(obj.clone())
}

/// The request's grader, with the server's embedding model named where `cosine` needs one.
fn parse(state: &AppState, fields: &Map<String, Value>) -> Result<(Grader, Value), ApiError> {
    let mut raw = fields
        .get("grader")
        .ok_or_else(|| ApiError::bad_request("Missing required parameter: 'grader'.", "grader"))?
        .clone();
    let invalid = |e: crate::train::graders::GraderError| ApiError::BadRequest {
        message: e.to_string(),
        param: Some(e.path.clone()),
        code: Some("invalid_grader"),
    };
    fill_embedding_model(&mut raw, state.grader_embedding_model.as_deref(), "grader")
        .map_err(invalid)?;
    let grader = Grader::parse(&raw, "grader").map_err(invalid)?;
    Ok((grader, raw))
}

/// The base encoder a `cosine` grader embeds with, as the serving engine loads it.
pub(crate) async fn resolve_embedding_model(
    state: &AppState,
    caller: &Caller,
    id: &str,
    param: &str,
) -> Result<ModelRef, ApiError> {
    if id.starts_with("ft:") {
        return Err(ApiError::BadRequest {
            message: format!(
                "The grader's embedding model '{id}' must be a base model (a text encoder in the models directory)."
            ),
            param: Some(param.to_owned()),
            code: Some("model_not_supported"),
        });
    }
    resolve_for_inference(state, caller, id)
        .await
        .map_err(|e| match e {
            ApiError::NotFound { .. } => ApiError::BadRequest {
                message: format!(
                    "The grader's embedding model '{id}' is not a base model in the models directory."
                ),
                param: Some(param.to_owned()),
                code: Some("model_not_found"),
            },
            ApiError::BadRequest { message, code, .. } => ApiError::BadRequest {
                message: format!("The grader's embedding model: {message}"),
                param: Some(param.to_owned()),
                code,
            },
            other => other,
        })
}

/// `POST /v1/fine_tuning/alpha/graders/validate`: the grader back when it is usable.
pub async fn validate(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let fields = fields(&body, &["grader"])?;
    let (grader, raw) = parse(&state, &fields)?;
    for id in grader.embedding_models() {
        resolve_embedding_model(&state, &caller, id, "grader").await?;
    }
    Ok(Json(json!({"grader": raw})))
}

/// `POST /v1/fine_tuning/alpha/graders/run`: the reward of `model_sample` for `item`.
pub async fn run(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let fields = fields(&body, &["grader", "model_sample", "item"])?;
    let (grader, _) = parse(&state, &fields)?;
    let sample = match fields.get("model_sample") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "'model_sample' must be a string.",
                "model_sample",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "Missing required parameter: 'model_sample'.",
                "model_sample",
            ));
        }
    };
    let item = fields.get("item").cloned().unwrap_or_else(|| json!({}));
    let started = Instant::now();
    let mut models = HashMap::new();
    for id in grader.models() {
        models.insert(
            id.to_owned(),
            resolve_for_generation(&state, &caller, id).await?,
        );
    }
    for id in grader.embedding_models() {
        models.insert(
            id.to_owned(),
            resolve_embedding_model(&state, &caller, id, "grader").await?,
        );
    }
    let sampled_model = grader.models().first().map(|m| (*m).to_owned());
    let sampler = ServedSampler {
        serving: state.serving.clone(),
        models,
        runtime: tokio::runtime::Handle::current(),
    };
    let graded = grader.clone();
    let (reward, scores) =
        tokio::task::spawn_blocking(move || graded.grade_with(&item, &sample, Some(&sampler)))
            .await
            .map_err(|e| ApiError::Internal(e.into()))?
            // A template naming a field the item lacks is the request's mistake: 400, not a reward.
            .map_err(|e| {
                let param = if e.contains(": model '") {
                    "grader"
                } else {
                    "item"
                };
                ApiError::bad_request(e, param)
            })?;
    let sub_rewards: Map<String, Value> = match &grader {
        Grader::Multi { graders, .. } => graders
            .iter()
            .filter_map(|(n, _)| scores.get(n).map(|s| (n.clone(), json!(s))))
            .collect(),
        _ => Map::new(),
    };
    let scores: Map<String, Value> = scores.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Ok(Json(json!({
        "reward": reward,
        "sub_rewards": sub_rewards,
        "model_grader_token_usage_per_model": {},
        "metadata": {
            "name": grader.name(),
            "type": grader.kind(),
            "execution_time": started.elapsed().as_secs_f64(),
            "scores": scores,
            "token_usage": null,
            "sampled_model_name": sampled_model,
            "errors": {
                "formula_parse_error": false,
                "invalid_variable_error": false,
                "model_grader_parse_error": false,
                "model_grader_refusal_error": false,
                "model_grader_server_error": false,
                "model_grader_server_error_details": null,
                "other_error": false,
                "python_grader_runtime_error": false,
                "python_grader_runtime_error_details": null,
                "python_grader_server_error": false,
                "python_grader_server_error_type": null,
                "sample_parse_error": false,
                "truncated_observation_error": false,
                "unresponsive_reward_error": false,
            },
        },
    })))
}
