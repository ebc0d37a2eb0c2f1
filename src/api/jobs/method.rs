//! The `method` of a job request (and the older top-level `hyperparameters`): which method
//! fits the training data, and every hyperparameter checked against its range and filled
//! with the value kiln will use (`"auto"` where the engine decides from the data and model).

use serde_json::{Map, Value, json};

use crate::api::error::ApiError;
use crate::train::spec::HyperparameterRequest;

/// The methods OpenAI's API names.
pub const METHODS: [&str; 3] = ["supervised", "dpo", "reinforcement"];

/// The method a dataset format trains with.
pub fn method_for_format(format: &str) -> &'static str {
    match format {
        "preference" => "dpo",
        "reinforcement" => "reinforcement",
        _ => "supervised",
    }
}

/// kiln's knobs every method takes (DESIGN.md "The job spec"), next to OpenAI's three:
/// the training engine's own list, so the two cannot drift apart. Their ranges are the
/// engine's ([`HyperparameterRequest::check`]); a knob not given is `"auto"` until the engine
/// records the value it used.
const COMMON: &[&str] = crate::train::spec::KEYS;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int { min: i64, max: i64 },
    Float { min: f64, max: f64 },
    Choice(&'static [&'static str]),
}

/// A method-specific knob (DPO's and reinforcement's own): its range and default.
struct Knob {
    name: &'static str,
    kind: Kind,
    auto: bool,
    default: fn() -> Value,
}

const fn int(name: &'static str, min: i64, max: i64) -> Knob {
    Knob {
        name,
        kind: Kind::Int { min, max },
        auto: true,
        default: auto,
    }
}

/// A number greater than `min` and at most `max`.
const fn float(name: &'static str, min: f64, max: f64) -> Knob {
    Knob {
        name,
        kind: Kind::Float { min, max },
        auto: true,
        default: auto,
    }
}

fn auto() -> Value {
    json!("auto")
}

/// Mixed precision, for every method: absent unless given; the engine echoes what it used
/// (`auto` is bf16 on GPUs that compute it natively).
const MIXED_PRECISION: Knob = Knob {
    name: "mixed_precision",
    kind: Kind::Choice(&["fp32", "bf16"]),
    auto: true,
    default: || Value::Null,
};

const DPO: &[Knob] = &[float("beta", 0.0, 100.0), MIXED_PRECISION];

const REINFORCEMENT: &[Knob] = &[
    float("compute_multiplier", 0.0, 100.0),
    int("eval_interval", 1, i32::MAX as i64),
    int("eval_samples", 1, 10_000),
    Knob {
        name: "reasoning_effort",
        kind: Kind::Choice(&["default", "low", "medium", "high"]),
        auto: false,
        default: || json!("default"),
    },
    MIXED_PRECISION,
];

/// Image classification's augmentation rides on the supervised method. Absent unless given:
/// text jobs never resolve it, and an image job's engine echoes the value it used.
const SUPERVISED: &[Knob] = &[
    Knob {
        name: "augmentation",
        kind: Kind::Choice(&["none", "crop", "crop_flip"]),
        auto: true,
        default: || Value::Null,
    },
    MIXED_PRECISION,
];

fn method_knobs(method: &str) -> &'static [Knob] {
    match method {
        "supervised" => SUPERVISED,
        "dpo" => DPO,
        "reinforcement" => REINFORCEMENT,
        _ => &[],
    }
}

fn bad(message: String, param: String) -> ApiError {
    ApiError::BadRequest {
        message,
        param: Some(param),
        code: None,
    }
}

fn check(knob: &Knob, value: &Value, param: &str) -> Result<Value, ApiError> {
    if value.is_null() {
        return Ok((knob.default)());
    }
    if knob.auto && value.as_str() == Some("auto") {
        return Ok(auto());
    }
    let auto_hint = if knob.auto { " or \"auto\"" } else { "" };
    match knob.kind {
        Kind::Int { min, max } => match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(json!(n)),
            _ => Err(bad(
                format!(
                    "{} must be an integer from {min} to {max}{auto_hint}, got {value}",
                    knob.name
                ),
                param.to_owned(),
            )),
        },
        Kind::Float { min, max } => match value.as_f64() {
            Some(f) if f.is_finite() && f > min && f <= max => Ok(json!(f)),
            _ => Err(bad(
                format!(
                    "{} must be a number greater than {min} and at most {max}{auto_hint}, got {value}",
                    knob.name
                ),
                param.to_owned(),
            )),
        },
        Kind::Choice(choices) => match value.as_str() {
            Some(s) if choices.contains(&s) => Ok(json!(s)),
            _ => Err(bad(
                format!(
                    "{} must be one of {}{auto_hint}, got {value}",
                    knob.name,
                    choices.join(", ")
                ),
                param.to_owned(),
            )),
        },
    }
}

/// Validates the given hyperparameters of `method` (at `prefix`, e.g.
/// `method.supervised.hyperparameters`) and returns every knob with the value to use.
fn resolve_hyperparameters(
    method: &str,
    given: Option<&Value>,
    prefix: &str,
) -> Result<Map<String, Value>, ApiError> {
    let empty = Map::new();
    let given = match given {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(bad(
                format!("{prefix} must be an object, got {other}"),
                prefix.to_owned(),
            ));
        }
    };
    let mut out = Map::new();
    let mut common = Map::new();
    for (key, value) in given {
        let param = format!("{prefix}.{key}");
        if let Some(knob) = method_knobs(method).iter().find(|k| k.name == key) {
            let value = check(knob, value, &param)?;
            if !value.is_null() {
                out.insert(key.clone(), value);
            }
            continue;
        }
        // One key at a time, so a type error names its field.
        let one = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        let parsed = serde_json::from_value::<HyperparameterRequest>(one).and_then(|r| {
            // Another method's knob (beta under supervised) would otherwise vanish silently.
            if COMMON.contains(&key.as_str()) {
                Ok(r)
            } else {
                Err(serde::de::Error::custom(format!(
                    "'{key}' belongs to another method"
                )))
            }
        });
        if let Err(e) = parsed {
            let message = if COMMON.contains(&key.as_str()) {
                format!("{key} has an invalid value {value}: expected a valid {key} or \"auto\"")
            } else {
                let mut known: Vec<&str> = COMMON.to_vec();
                known.extend(method_knobs(method).iter().map(|k| k.name));
                format!(
                    "Unknown hyperparameter '{key}' for the {method} method ({e}). Known: {}.",
                    known.join(", ")
                )
            };
            return Err(bad(message, param));
        }
        common.insert(key.clone(), value.clone());
    }
    let request: HyperparameterRequest = serde_json::from_value(Value::Object(common.clone()))
        .map_err(|e| bad(format!("Invalid hyperparameters: {e}"), prefix.to_owned()))?;
    request.check().map_err(|e| {
        bad(
            format!("{}: {}", e.param, e.message),
            format!("{prefix}.{}", e.param),
        )
    })?;
    for &name in COMMON {
        let value = common.get(name).filter(|v| !v.is_null()).cloned();
        out.insert(name.to_owned(), value.unwrap_or_else(auto));
    }
    for knob in method_knobs(method) {
        let default = (knob.default)();
        if !default.is_null() {
            out.entry(knob.name).or_insert(default);
        }
    }
    Ok(out)
}

/// The resolved method of a request: `{"type": t, t: {...given settings, "hyperparameters":
/// {every knob}}}`. `format` is the training file's detected format.
pub fn resolve_method(
    method: Option<&Value>,
    top_level_hyperparameters: Option<&Value>,
    format: &str,
) -> Result<Value, ApiError> {
    let fitting = method_for_format(format);
    let method = match method {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => {
            return Err(bad(
                format!("method must be an object, got {other}"),
                "method".into(),
            ));
        }
    };
    let kind = match method.map(|m| m.get("type")) {
        None => fitting,
        Some(Some(Value::String(t))) => match METHODS.iter().find(|m| **m == t.as_str()) {
            Some(m) => m,
            None => {
                return Err(bad(
                    format!(
                        "method.type must be one of {}, got '{t}'",
                        METHODS.join(", ")
                    ),
                    "method.type".into(),
                ));
            }
        },
        Some(_) => {
            return Err(bad(
                "method.type is required: supervised, dpo or reinforcement".into(),
                "method.type".into(),
            ));
        }
    };
    if kind != fitting {
        return Err(bad(
            format!(
                "The training file's format ({format}) trains with the {fitting} method, not {kind}."
            ),
            "method.type".into(),
        ));
    }
    if let Some(other) = method
        .into_iter()
        .flat_map(|m| m.keys())
        .find(|k| *k != "type" && k.as_str() != kind)
    {
        return Err(bad(
            format!("method.{other} does not belong to a {kind} method"),
            format!("method.{other}"),
        ));
    }
    let mut config = match method.and_then(|m| m.get(kind)) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(c)) => c.clone(),
        Some(other) => {
            return Err(bad(
                format!("method.{kind} must be an object, got {other}"),
                format!("method.{kind}"),
            ));
        }
    };
    let nested = config.get("hyperparameters").filter(|v| !v.is_null());
    let top = top_level_hyperparameters.filter(|v| !v.is_null());
    let hyperparameters = match (nested, top) {
        (Some(_), Some(_)) => {
            return Err(bad(
                format!(
                    "Give hyperparameters either in method.{kind}.hyperparameters or in the \
                     deprecated top-level hyperparameters, not both."
                ),
                "hyperparameters".into(),
            ));
        }
        (Some(h), None) => {
            resolve_hyperparameters(kind, Some(h), &format!("method.{kind}.hyperparameters"))?
        }
        (None, Some(h)) => resolve_hyperparameters(kind, Some(h), "hyperparameters")?,
        (None, None) => {
            resolve_hyperparameters(kind, None, &format!("method.{kind}.hyperparameters"))?
        }
    };
    if kind == "reinforcement" && !config.get("grader").is_some_and(Value::is_object) {
        return Err(bad(
            "method.reinforcement.grader is required: an object describing how to score outputs"
                .into(),
            "method.reinforcement.grader".into(),
        ));
    }
    if let Some(grader) = config.get("grader").filter(|_| kind == "reinforcement") {
        crate::train::graders::Grader::parse(grader, "method.reinforcement.grader")
            .map_err(|e| bad(e.to_string(), e.path))?;
    }
    if let Some(unknown) = config
        .keys()
        .find(|k| !matches!(k.as_str(), "hyperparameters" | "grader"))
    {
        return Err(bad(
            format!("Unknown setting method.{kind}.{unknown}"),
            format!("method.{kind}.{unknown}"),
        ));
    }
    config.insert("hyperparameters".into(), Value::Object(hyperparameters));
    Ok(json!({"type": kind, kind: config}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(err: ApiError) -> Option<String> {
        match err {
            ApiError::BadRequest { param, .. } => param,
            _ => None,
        }
    }

    #[test]
    fn defaults_fill_every_knob_and_auto_stays_auto() {
        let m = resolve_method(None, None, "text_classification").unwrap();
        assert_eq!(m["type"], "supervised");
        let h = &m["supervised"]["hyperparameters"];
        assert_eq!(h["n_epochs"], "auto");
        assert_eq!(h["lr_scheduler"], "auto");
        assert!(
            h.get("augmentation").is_none(),
            "only image jobs resolve it"
        );
        assert_eq!(h.as_object().unwrap().len(), COMMON.len());
        // Another method's knob is refused, not dropped.
        let method =
            json!({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}});
        let err = resolve_method(Some(&method), None, "text_classification").unwrap_err();
        assert_eq!(
            param(err).as_deref(),
            Some("method.supervised.hyperparameters.beta")
        );
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let method =
            json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}});
        let err = resolve_method(Some(&method), None, "chat").unwrap_err();
        assert_eq!(
            param(err).as_deref(),
            Some("method.supervised.hyperparameters.n_epochs")
        );
        let err = resolve_method(None, Some(&json!({"batch_size": "big"})), "chat").unwrap_err();
        assert_eq!(param(err).as_deref(), Some("hyperparameters.batch_size"));
        let method = json!({"type": "supervised", "supervised": {"hyperparameters": {"strategy": "lora", "lora_rank": 4, "colour": 1}}});
        let err = resolve_method(Some(&method), None, "chat").unwrap_err();
        assert_eq!(
            param(err).as_deref(),
            Some("method.supervised.hyperparameters.colour")
        );
    }

    #[test]
    fn the_method_must_fit_the_data() {
        let method = json!({"type": "dpo"});
        let err = resolve_method(Some(&method), None, "text_classification").unwrap_err();
        assert_eq!(param(err).as_deref(), Some("method.type"));
        let m = resolve_method(None, None, "preference").unwrap();
        assert_eq!(m["type"], "dpo");
        assert_eq!(m["dpo"]["hyperparameters"]["beta"], "auto");
    }
}
