//! OpenAI's grader objects, for reinforcement fine-tuning and `/v1/fine_tuning/alpha/graders`:
//! `string_check` (`eq`, `ne`, `like`, `ilike`), `text_similarity` (`fuzzy_match`, `bleu`,
//! `gleu`, `meteor`, `rouge_1`…`rouge_5`, `rouge_l`, `cosine`) and `multi` (sub-graders
//! combined by a formula).
//! `input` and `reference` are templates over `item.*` (the dataset line) and
//! `sample.output_text` / `sample.output_json` (the model's reply), rendered with minijinja.
//!
//! `score_model` and `label_model` ask a decoder (a base model kiln has, by id) through a
//! [`ModelSampler`]: the first number of its reply, clamped to `range`, is the score; the
//! label its reply names passes when it is one of `passing_labels`.
//!
//! `meteor` is NLTK's sentence METEOR (alpha 0.9, beta 3, gamma 0.5) over exact and
//! Snowball-stem matches; WordNet synonyms are not matched. `cosine` is the cosine of the two
//! texts' sentence embeddings from a base encoder: the grader's `embedding_model` (a kiln
//! extension) or the server's `KILN_GRADER_EMBEDDING_MODEL` ([`fill_embedding_model`]),
//! computed through the [`ModelSampler`].
//!
//! Not in this version (rejected by [`Grader::parse`] with the reason): `python` graders.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// A grader that failed to parse: `path` names the field (`grader.graders.a.operation`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct GraderError {
    pub path: String,
    pub message: String,
}

fn err(path: &str, message: impl Into<String>) -> GraderError {
    GraderError {
        path: path.to_owned(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringOp {
    Eq,
    Ne,
    Like,
    Ilike,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    FuzzyMatch,
    Bleu,
    Gleu,
    Rouge(usize),
    RougeL,
    Meteor,
    /// Needs embeddings: graded through [`ModelSampler::embed`], never by [`similarity`].
    Cosine,
}

/// Runs a grader model: the reply of `model` to `messages`.
pub trait ModelSampler {
    fn complete(
        &self,
        model: &str,
        messages: &[Value],
        params: &ModelParams,
    ) -> Result<String, String>;

    /// Sentence embeddings of `texts` from base encoder `model` (`cosine` similarity).
    fn embed(&self, model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        let _ = texts;
        Err(format!("embedding model '{model}' is not available here"))
    }
}

/// A model grader's `sampling_params`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: Option<u64>,
}

/// A parsed grader.
#[derive(Debug, Clone)]
pub enum Grader {
    ScoreModel {
        name: String,
        model: String,
        input: Vec<(String, String)>,
        range: (f64, f64),
        params: ModelParams,
    },
    LabelModel {
        name: String,
        model: String,
        input: Vec<(String, String)>,
        labels: Vec<String>,
        passing: Vec<String>,
    },
    StringCheck {
        name: String,
        input: String,
        reference: String,
        op: StringOp,
    },
    TextSimilarity {
        name: String,
        input: String,
        reference: String,
        metric: Similarity,
        /// The base encoder of `cosine` (None until [`fill_embedding_model`] names one).
        embedding_model: Option<String>,
    },
    Multi {
        name: String,
        graders: Vec<(String, Grader)>,
        formula: Formula,
    },
}

fn string_field<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, GraderError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(err(&format!("{path}.{key}"), "must be a string")),
        None => Err(err(&format!("{path}.{key}"), "is required")),
    }
}

/// The rendering environment for templates (strict: an unknown `item` field is an error).
fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    // Grader templates come with the request: one that loops without end is an error.
    env.set_fuel(Some(1_000_000));
    env
}

fn check_template(template: &str, path: &str) -> Result<(), GraderError> {
    template_env()
        .template_from_str(template)
        .map(|_| ())
        .map_err(|e| err(path, format!("invalid template: {e}")))
}

impl Grader {
    /// Parses and checks a grader object; `path` is where it sits in the request.
    pub fn parse(value: &Value, path: &str) -> Result<Grader, GraderError> {
        let obj = value
            .as_object()
            .ok_or_else(|| err(path, "must be an object"))?;
        let kind = string_field(obj, "type", path)?;
        let name = match obj.get("name") {
            Some(Value::String(s)) => s.clone(),
            None => kind.to_owned(),
            Some(_) => return Err(err(&format!("{path}.name"), "must be a string")),
        };
        match kind {
            "string_check" => {
                let input = string_field(obj, "input", path)?.to_owned();
                let reference = string_field(obj, "reference", path)?.to_owned();
                check_template(&input, &format!("{path}.input"))?;
                check_template(&reference, &format!("{path}.reference"))?;
                let op = match string_field(obj, "operation", path)? {
                    "eq" => StringOp::Eq,
                    "ne" => StringOp::Ne,
                    "like" => StringOp::Like,
                    "ilike" => StringOp::Ilike,
                    other => {
                        return Err(err(
                            &format!("{path}.operation"),
                            format!("'{other}' is not one of eq, ne, like, ilike"),
                        ));
                    }
                };
                Ok(Grader::StringCheck {
                    name,
                    input,
                    reference,
                    op,
                })
            }
            "text_similarity" => {
                let input = string_field(obj, "input", path)?.to_owned();
                let reference = string_field(obj, "reference", path)?.to_owned();
                check_template(&input, &format!("{path}.input"))?;
                check_template(&reference, &format!("{path}.reference"))?;
                let metric_path = format!("{path}.evaluation_metric");
                let metric = match string_field(obj, "evaluation_metric", path)? {
                    "fuzzy_match" => Similarity::FuzzyMatch,
                    "bleu" => Similarity::Bleu,
                    "gleu" => Similarity::Gleu,
                    "rouge_l" => Similarity::RougeL,
                    m @ ("rouge_1" | "rouge_2" | "rouge_3" | "rouge_4" | "rouge_5") => {
                        Similarity::Rouge(usize::from(m.as_bytes()[6] - b'0'))
                    }
                    "meteor" => Similarity::Meteor,
                    "cosine" => Similarity::Cosine,
                    other => {
                        return Err(err(
                            &metric_path,
                            format!("'{other}' is not an evaluation metric"),
                        ));
                    }
                };
                let embedding_model = match obj.get("embedding_model") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(m)) if metric == Similarity::Cosine => {
                        if !crate::models::valid_id(m) {
                            return Err(err(
                                &format!("{path}.embedding_model"),
                                format!("'{m}' is not a base model id"),
                            ));
                        }
                        Some(m.clone())
                    }
                    Some(Value::String(_)) => {
                        return Err(err(
                            &format!("{path}.embedding_model"),
                            "is only used by the 'cosine' evaluation metric",
                        ));
                    }
                    Some(_) => {
                        return Err(err(&format!("{path}.embedding_model"), "must be a string"));
                    }
                };
                Ok(Grader::TextSimilarity {
                    name,
                    input,
                    reference,
                    metric,
                    embedding_model,
                })
            }
            "multi" => {
                let graders_path = format!("{path}.graders");
                let graders = match obj.get("graders") {
                    // OpenAI's documented form: {name: grader}.
                    Some(Value::Object(map)) if !map.contains_key("type") => map
                        .iter()
                        .map(|(k, g)| {
                            Ok((k.clone(), Grader::parse(g, &format!("{graders_path}.{k}"))?))
                        })
                        .collect::<Result<Vec<_>, GraderError>>()?,
                    // The client's typed form: one grader, known by its name.
                    Some(single @ Value::Object(_)) => {
                        let g = Grader::parse(single, &graders_path)?;
                        vec![(g.name().to_owned(), g)]
                    }
                    _ => return Err(err(&graders_path, "must map names to graders")),
                };
                if graders.is_empty() {
                    return Err(err(&graders_path, "needs at least one grader"));
                }
                let formula_path = format!("{path}.calculate_output");
                let formula = Formula::parse(string_field(obj, "calculate_output", path)?)
                    .map_err(|m| err(&formula_path, m))?;
                if let Some(v) = formula
                    .variables()
                    .into_iter()
                    .find(|v| !graders.iter().any(|(n, _)| n == v))
                {
                    return Err(err(
                        &formula_path,
                        format!("'{v}' is not the name of one of the graders"),
                    ));
                }
                Ok(Grader::Multi {
                    name,
                    graders,
                    formula,
                })
            }
            "score_model" | "label_model" => {
                let model = string_field(obj, "model", path)?.to_owned();
                let input_path = format!("{path}.input");
                let input = obj
                    .get("input")
                    .and_then(Value::as_array)
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| err(&input_path, "must be a non-empty list of messages"))?
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let at = format!("{input_path}[{i}]");
                        let o = m
                            .as_object()
                            .ok_or_else(|| err(&at, "must be a message object"))?;
                        let role = string_field(o, "role", &at)?.to_owned();
                        let content = string_field(o, "content", &at)?.to_owned();
                        check_template(&content, &format!("{at}.content"))?;
                        Ok((role, content))
                    })
                    .collect::<Result<Vec<_>, GraderError>>()?;
                if kind == "score_model" {
                    let range = match obj.get("range") {
                        None | Some(Value::Null) => (0.0, 1.0),
                        Some(Value::Array(r)) if r.len() == 2 => {
                            match (r[0].as_f64(), r[1].as_f64()) {
                                (Some(lo), Some(hi)) if lo < hi => (lo, hi),
                                _ => {
                                    return Err(err(
                                        &format!("{path}.range"),
                                        "must be [low, high] with low < high",
                                    ));
                                }
                            }
                        }
                        Some(_) => {
                            return Err(err(&format!("{path}.range"), "must be [low, high]"));
                        }
                    };
                    let sp = obj.get("sampling_params").cloned().unwrap_or(Value::Null);
                    let params = ModelParams {
                        temperature: sp.get("temperature").and_then(Value::as_f64).unwrap_or(0.0),
                        top_p: sp.get("top_p").and_then(Value::as_f64).unwrap_or(1.0),
                        max_tokens: sp
                            .get("max_completions_tokens")
                            .and_then(Value::as_u64)
                            .unwrap_or(16)
                            .clamp(1, 1024) as usize,
                        seed: sp.get("seed").and_then(Value::as_u64),
                    };
                    return Ok(Grader::ScoreModel {
                        name,
                        model,
                        input,
                        range,
                        params,
                    });
                }
                let strings = |key: &str| -> Result<Vec<String>, GraderError> {
                    obj.get(key)
                        .and_then(Value::as_array)
                        .filter(|a| !a.is_empty())
                        .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_owned)).collect())
                        .ok_or_else(|| {
                            err(
                                &format!("{path}.{key}"),
                                "must be a non-empty list of strings",
                            )
                        })
                };
                let labels = strings("labels")?;
                let passing = strings("passing_labels")?;
                if let Some(p) = passing.iter().find(|p| !labels.contains(p)) {
                    return Err(err(
                        &format!("{path}.passing_labels"),
                        format!("'{p}' is not one of the labels"),
                    ));
                }
                Ok(Grader::LabelModel {
                    name,
                    model,
                    input,
                    labels,
                    passing,
                })
            }
            t @ "python" => Err(err(
                &format!("{path}.type"),
                format!(
                    "'{t}' graders are not supported by kiln yet; use string_check, text_similarity, multi, score_model or label_model"
                ),
            )),
            other => Err(err(
                &format!("{path}.type"),
                format!("'{other}' is not a grader type"),
            )),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Grader::StringCheck { name, .. }
            | Grader::TextSimilarity { name, .. }
            | Grader::Multi { name, .. }
            | Grader::ScoreModel { name, .. }
            | Grader::LabelModel { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Grader::StringCheck { .. } => "string_check",
            Grader::TextSimilarity { .. } => "text_similarity",
            Grader::Multi { .. } => "multi",
            Grader::ScoreModel { .. } => "score_model",
            Grader::LabelModel { .. } => "label_model",
        }
    }

    /// The models this grader runs (empty for graders that run none).
    pub fn models(&self) -> Vec<&str> {
        match self {
            Grader::ScoreModel { model, .. } | Grader::LabelModel { model, .. } => vec![model],
            Grader::Multi { graders, .. } => graders.iter().flat_map(|(_, g)| g.models()).collect(),
            _ => Vec::new(),
        }
    }

    /// The base encoders this grader embeds with (`cosine`), each once.
    pub fn embedding_models(&self) -> Vec<&str> {
        let mut out: Vec<&str> = match self {
            Grader::TextSimilarity {
                embedding_model: Some(m),
                ..
            } => vec![m],
            Grader::Multi { graders, .. } => graders
                .iter()
                .flat_map(|(_, g)| g.embedding_models())
                .collect(),
            _ => Vec::new(),
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The reward of `sample` for dataset line `item`, and each sub-grader's score.
    pub fn grade(
        &self,
        item: &Value,
        sample: &str,
    ) -> Result<(f64, BTreeMap<String, f64>), String> {
        self.grade_with(item, sample, None)
    }

    /// As [`Grader::grade`], running model graders through `sampler`.
    pub fn grade_with(
        &self,
        item: &Value,
        sample: &str,
        sampler: Option<&dyn ModelSampler>,
    ) -> Result<(f64, BTreeMap<String, f64>), String> {
        let output_json: Value = serde_json::from_str(sample).unwrap_or(Value::Null);
        let ctx =
            json!({"item": item, "sample": {"output_text": sample, "output_json": output_json}});
        let env = template_env();
        let mut scores = BTreeMap::new();
        let reward = self.grade_in(&env, &ctx, sampler, &mut scores)?;
        Ok((reward, scores))
    }

    fn grade_in(
        &self,
        env: &minijinja::Environment<'static>,
        ctx: &Value,
        sampler: Option<&dyn ModelSampler>,
        scores: &mut BTreeMap<String, f64>,
    ) -> Result<f64, String> {
        let render = |t: &str| {
            env.render_str(t, ctx)
                .map_err(|e| format!("grader '{}': {e}", self.name()))
        };
        let score = match self {
            Grader::StringCheck {
                input,
                reference,
                op,
                ..
            } => {
                let (a, b) = (render(input)?, render(reference)?);
                let pass = match op {
                    StringOp::Eq => a == b,
                    StringOp::Ne => a != b,
                    StringOp::Like => a.contains(&b),
                    StringOp::Ilike => a.to_lowercase().contains(&b.to_lowercase()),
                };
                if pass { 1.0 } else { 0.0 }
            }
            Grader::TextSimilarity {
                input,
                reference,
                metric: Similarity::Cosine,
                embedding_model,
                ..
            } => {
                let model = embedding_model.as_deref().ok_or_else(|| {
                    format!(
                        "grader '{}': 'cosine' needs an embedding model (`embedding_model`, or the server's KILN_GRADER_EMBEDDING_MODEL)",
                        self.name()
                    )
                })?;
                let sampler = sampler.ok_or_else(|| {
                    format!(
                        "grader '{}' embeds with '{model}', which is not available here",
                        self.name()
                    )
                })?;
                let texts = [render(input)?, render(reference)?];
                let vectors = sampler
                    .embed(model, &texts)
                    .map_err(|e| format!("grader '{}': model '{model}': {e}", self.name()))?;
                match vectors.as_slice() {
                    [a, b] => cosine(a, b),
                    _ => {
                        return Err(format!(
                            "grader '{}': model '{model}' gave {} embeddings for 2 texts",
                            self.name(),
                            vectors.len()
                        ));
                    }
                }
            }
            Grader::TextSimilarity {
                input,
                reference,
                metric,
                ..
            } => similarity(*metric, &render(input)?, &render(reference)?),
            Grader::Multi {
                graders, formula, ..
            } => {
                let mut vars = HashMap::new();
                for (name, g) in graders {
                    let s = g.grade_in(env, ctx, sampler, scores)?;
                    vars.insert(name.clone(), s);
                }
                formula.eval(&vars)?
            }
            Grader::ScoreModel {
                model,
                input,
                range,
                params,
                ..
            } => {
                let reply = self.ask(env, ctx, sampler, model, input, params)?;
                // The first number of the reply; none is the lowest score.
                first_number(&reply).map_or(range.0, |x| x.clamp(range.0, range.1))
            }
            Grader::LabelModel {
                model,
                input,
                labels,
                passing,
                ..
            } => {
                let params = ModelParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    max_tokens: 16,
                    seed: None,
                };
                let reply = self.ask(env, ctx, sampler, model, input, &params)?;
                let said = reply.trim().to_lowercase();
                let label = labels
                    .iter()
                    .find(|l| said == l.to_lowercase())
                    .or_else(|| labels.iter().find(|l| said.contains(&l.to_lowercase())));
                if label.is_some_and(|l| passing.contains(l)) {
                    1.0
                } else {
                    0.0
                }
            }
        };
        scores.insert(self.name().to_owned(), score);
        Ok(score)
    }
}

impl Grader {
    fn ask(
        &self,
        env: &minijinja::Environment<'static>,
        ctx: &Value,
        sampler: Option<&dyn ModelSampler>,
        model: &str,
        input: &[(String, String)],
        params: &ModelParams,
    ) -> Result<String, String> {
        let sampler = sampler.ok_or_else(|| {
            format!(
                "grader '{}' runs model '{model}', which is not available here",
                self.name()
            )
        })?;
        let messages = input
            .iter()
            .map(|(role, content)| {
                env.render_str(content, ctx)
                    .map(|c| json!({"role": role, "content": c}))
                    .map_err(|e| format!("grader '{}': {e}", self.name()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        sampler
            .complete(model, &messages, params)
            .map_err(|e| format!("grader '{}': model '{model}': {e}", self.name()))
    }
}

/// The first decimal number in `text` (`-1`, `0.75`, `7`).
fn first_number(text: &str) -> Option<f64> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let digit_at = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_digit);
        if digit_at(i) || (bytes[i] == b'-' && digit_at(i + 1)) {
            let start = i;
            i += 1;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            return text[start..i].trim_end_matches('.').parse().ok();
        }
        i += 1;
    }
    None
}

/// A similarity in [0, 1].
pub fn similarity(metric: Similarity, input: &str, reference: &str) -> f64 {
    match metric {
        Similarity::Meteor => meteor(&words(input), &words(reference)),
        // Embeddings are compared in `Grader::grade_with`; here there are none.
        Similarity::Cosine => f64::NAN,
        Similarity::FuzzyMatch => {
            let (a, b): (Vec<char>, Vec<char>) =
                (input.chars().collect(), reference.chars().collect());
            if a.is_empty() && b.is_empty() {
                return 1.0;
            }
            2.0 * lcs(&a, &b) as f64 / (a.len() + b.len()) as f64
        }
        Similarity::Bleu => bleu(&words(input), &words(reference)),
        Similarity::Gleu => gleu(&words(input), &words(reference)),
        Similarity::Rouge(n) => {
            let (hw, rw) = (words(input), words(reference));
            let (h, r) = (ngrams(&hw, n), ngrams(&rw, n));
            f1(overlap(&h, &r), count(&h), count(&r))
        }
        Similarity::RougeL => {
            let (h, r) = (words(input), words(reference));
            f1(lcs(&h, &r), h.len(), r.len())
        }
    }
}

/// The cosine of two vectors (0 when either is all zeros).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 || a.len() != b.len() {
        return 0.0;
    }
    (dot / (na * nb)).clamp(-1.0, 1.0)
}

/// Aligns what is left of `hyp` and `reference` (position, form) on equal forms: from the
/// last hypothesis word back, each takes the latest unused reference word of its form (NLTK's
/// order). Matched pairs of positions go to `matches`; the unmatched words stay.
fn align_stage(
    hyp: &mut Vec<(usize, String)>,
    reference: &mut Vec<(usize, String)>,
    matches: &mut Vec<(usize, usize)>,
) {
    let mut positions: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, (_, w)) in reference.iter().enumerate() {
        positions.entry(w.as_str()).or_default().push(j);
    }
    let mut hyp_used = vec![false; hyp.len()];
    let mut ref_used = vec![false; reference.len()];
    for (i, (_, w)) in hyp.iter().enumerate().rev() {
        if let Some(j) = positions.get_mut(w.as_str()).and_then(Vec::pop) {
            hyp_used[i] = true;
            ref_used[j] = true;
            matches.push((hyp[i].0, reference[j].0));
        }
    }
    let mut keep = hyp_used.iter().map(|u| !u);
    hyp.retain(|_| keep.next().unwrap_or(true));
    let mut keep = ref_used.iter().map(|u| !u);
    reference.retain(|_| keep.next().unwrap_or(true));
}

/// Sentence METEOR (Lavie and Agarwal 2007, NLTK's `single_meteor_score`): exact matches,
/// then Snowball-stem matches of the rest; `Fmean = P·R / (0.9·P + 0.1·R)` times
/// `1 − 0.5·(chunks / matches)³`.
fn meteor(hyp: &[String], reference: &[String]) -> f64 {
    if hyp.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let mut h: Vec<(usize, String)> = hyp.iter().cloned().enumerate().collect();
    let mut r: Vec<(usize, String)> = reference.iter().cloned().enumerate().collect();
    let mut matches = Vec::new();
    align_stage(&mut h, &mut r, &mut matches);
    let stemmer = rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English);
    let mut h: Vec<(usize, String)> = h
        .into_iter()
        .map(|(i, w)| (i, stemmer.stem(&w).into_owned()))
        .collect();
    let mut r: Vec<(usize, String)> = r
        .into_iter()
        .map(|(j, w)| (j, stemmer.stem(&w).into_owned()))
        .collect();
    align_stage(&mut h, &mut r, &mut matches);
    if matches.is_empty() {
        return 0.0;
    }
    matches.sort_unstable_by_key(|m| m.0);
    let chunks = 1 + matches
        .windows(2)
        .filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1))
        .count();
    let m = matches.len() as f64;
    let (precision, recall) = (m / hyp.len() as f64, m / reference.len() as f64);
    let fmean = precision * recall / (0.9 * precision + 0.1 * recall);
    let penalty = 0.5 * (chunks as f64 / m).powi(3);
    (1.0 - penalty) * fmean
}

/// Names the base encoder of every `cosine` grader in `grader` (a grader object as a request
/// gives it, `multi` graders included) that names none: `default`, the server's
/// `KILN_GRADER_EMBEDDING_MODEL`. Without a default such a grader is an error at its
/// `evaluation_metric`. Jobs store the filled object, so every process grades alike.
pub fn fill_embedding_model(
    grader: &mut Value,
    default: Option<&str>,
    path: &str,
) -> Result<(), GraderError> {
    let Some(obj) = grader.as_object_mut() else {
        return Ok(());
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text_similarity")
            if obj.get("evaluation_metric").and_then(Value::as_str) == Some("cosine")
                && obj.get("embedding_model").is_none_or(Value::is_null) =>
        {
            let model = default.ok_or_else(|| {
                err(
                    &format!("{path}.evaluation_metric"),
                    "'cosine' needs an embedding model: give `embedding_model` (a base encoder's id, e.g. sentence-transformers/all-MiniLM-L6-v2) or set KILN_GRADER_EMBEDDING_MODEL on the server",
                )
            })?;
            obj.insert("embedding_model".into(), Value::String(model.to_owned()));
        }
        Some("multi") => match obj.get_mut("graders") {
            Some(Value::Object(map)) if !map.contains_key("type") => {
                for (k, g) in map.iter_mut() {
                    fill_embedding_model(g, default, &format!("{path}.graders.{k}"))?;
                }
            }
            Some(single @ Value::Object(_)) => {
                fill_embedding_model(single, default, &format!("{path}.graders"))?;
            }
            _ => {}
        },
        _ => {}
    }
    Ok(())
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| c.is_ascii_punctuation())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

fn lcs<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut out = HashMap::new();
    if n > 0 && tokens.len() >= n {
        for w in tokens.windows(n) {
            *out.entry(w).or_insert(0) += 1;
        }
    }
    out
}

fn count(grams: &HashMap<&[String], usize>) -> usize {
    grams.values().sum()
}

/// Clipped matches: each n-gram counts at most as often as the reference has it.
fn overlap(hyp: &HashMap<&[String], usize>, reference: &HashMap<&[String], usize>) -> usize {
    hyp.iter()
        .map(|(g, c)| (*c).min(reference.get(g).copied().unwrap_or(0)))
        .sum()
}

fn f1(matches: usize, hyp: usize, reference: usize) -> f64 {
    if matches == 0 || hyp == 0 || reference == 0 {
        return 0.0;
    }
    let p = matches as f64 / hyp as f64;
    let r = matches as f64 / reference as f64;
    2.0 * p * r / (p + r)
}

/// Sentence BLEU-4: geometric mean of clipped n-gram precisions (add-one smoothed for n > 1,
/// as Lin and Och's sentence-level BLEU) times the brevity penalty.
fn bleu(hyp: &[String], reference: &[String]) -> f64 {
    if hyp.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let (h, r) = (ngrams(hyp, n), ngrams(reference, n));
        let (m, total) = (overlap(&h, &r) as f64, count(&h) as f64);
        let p = if n == 1 {
            if m == 0.0 {
                return 0.0;
            }
            m / total
        } else {
            (m + 1.0) / (total + 1.0)
        };
        log_sum += p.ln() / 4.0;
    }
    let (c, r) = (hyp.len() as f64, reference.len() as f64);
    let bp = if c > r { 1.0 } else { (1.0 - r / c).exp() };
    bp * log_sum.exp()
}

/// Google-BLEU: matches over all 1- to 4-grams, the smaller of precision and recall.
fn gleu(hyp: &[String], reference: &[String]) -> f64 {
    let (mut m, mut h_total, mut r_total) = (0, 0, 0);
    for n in 1..=4 {
        let (h, r) = (ngrams(hyp, n), ngrams(reference, n));
        m += overlap(&h, &r);
        h_total += count(&h);
        r_total += count(&r);
    }
    if h_total == 0 || r_total == 0 {
        return 0.0;
    }
    (m as f64 / h_total as f64).min(m as f64 / r_total as f64)
}

/// A multi grader's `calculate_output`: numbers, grader names, `+ - * /`, parentheses and
/// `min`, `max`, `abs`, `floor`, `ceil`, `exp`, `sqrt`, `log`.
#[derive(Debug, Clone, PartialEq)]
pub enum Formula {
    Num(f64),
    Var(String),
    Neg(Box<Formula>),
    Bin(char, Box<Formula>, Box<Formula>),
    Call(String, Vec<Formula>),
}

const FUNCTIONS: &[&str] = &["min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log"];

struct Parser<'a> {
    src: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.src.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip();
        self.src.get(self.at).copied()
    }

    fn expr(&mut self) -> Result<Formula, String> {
        let mut left = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            left = Formula::Bin(op as char, Box::new(left), Box::new(self.term()?));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Formula, String> {
        let mut left = self.unary()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.at += 1;
            left = Formula::Bin(op as char, Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Formula, String> {
        match self.peek() {
            Some(b'-') => {
                self.at += 1;
                Ok(Formula::Neg(Box::new(self.unary()?)))
            }
            Some(b'+') => {
                self.at += 1;
                self.unary()
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Result<Formula, String> {
        match self.peek() {
            Some(b'(') => {
                self.at += 1;
                let e = self.expr()?;
                self.expect(b')')?;
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                let start = self.at;
                while self
                    .src
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.at += 1;
                }
                let text = String::from_utf8_lossy(&self.src[start..self.at]);
                text.parse()
                    .map(Formula::Num)
                    .map_err(|_| format!("'{text}' is not a number"))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.at;
                while self
                    .src
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.at += 1;
                }
                let name = String::from_utf8_lossy(&self.src[start..self.at]).into_owned();
                if self.peek() == Some(b'(') && FUNCTIONS.contains(&name.as_str()) {
                    self.at += 1;
                    let mut args = vec![self.expr()?];
                    while self.peek() == Some(b',') {
                        self.at += 1;
                        args.push(self.expr()?);
                    }
                    self.expect(b')')?;
                    let want = if matches!(name.as_str(), "min" | "max") {
                        None
                    } else {
                        Some(1)
                    };
                    if want.is_some_and(|w| args.len() != w) {
                        return Err(format!("{name}() takes one argument"));
                    }
                    return Ok(Formula::Call(name, args));
                }
                Ok(Formula::Var(name))
            }
            Some(c) => Err(format!(
                "unexpected '{}' at position {}",
                c as char,
                self.at + 1
            )),
            None => Err("the formula ends too early".into()),
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at position {}",
                c as char,
                self.at + 1
            ))
        }
    }
}

impl Formula {
    pub fn parse(text: &str) -> Result<Formula, String> {
        let mut p = Parser {
            src: text.as_bytes(),
            at: 0,
        };
        let f = p.expr()?;
        match p.peek() {
            None => Ok(f),
            Some(c) => Err(format!(
                "unexpected '{}' at position {}",
                c as char,
                p.at + 1
            )),
        }
    }

    pub fn variables(&self) -> Vec<String> {
        match self {
            Formula::Num(_) => Vec::new(),
            Formula::Var(v) => vec![v.clone()],
            Formula::Neg(e) => e.variables(),
            Formula::Bin(_, a, b) => [a.variables(), b.variables()].concat(),
            Formula::Call(_, args) => args.iter().flat_map(Formula::variables).collect(),
        }
    }

    pub fn eval(&self, vars: &HashMap<String, f64>) -> Result<f64, String> {
        Ok(match self {
            Formula::Num(x) => *x,
            Formula::Var(v) => *vars
                .get(v)
                .ok_or_else(|| format!("unknown variable '{v}'"))?,
            Formula::Neg(e) => -e.eval(vars)?,
            Formula::Bin(op, a, b) => {
                let (a, b) = (a.eval(vars)?, b.eval(vars)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ if b == 0.0 => return Err("division by zero".into()),
                    _ => a / b,
                }
            }
            Formula::Call(f, args) => {
                let xs = args
                    .iter()
                    .map(|a| a.eval(vars))
                    .collect::<Result<Vec<_>, _>>()?;
                let x = xs[0];
                match f.as_str() {
                    "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
                    "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    "abs" => x.abs(),
                    "floor" => x.floor(),
                    "ceil" => x.ceil(),
                    "exp" => x.exp(),
                    "sqrt" => x.sqrt(),
                    _ => x.ln(),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grade(g: Value, item: Value, sample: &str) -> f64 {
        Grader::parse(&g, "grader")
            .unwrap()
            .grade(&item, sample)
            .unwrap()
            .0
    }

    #[test]
    fn a_grader_template_that_never_ends_is_an_error() {
        let forever =
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
        let g = json!({"type": "string_check", "name": "s", "input": forever, "reference": "x", "operation": "eq"});
        let err = Grader::parse(&g, "grader")
            .unwrap()
            .grade(&json!({}), "x")
            .unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn string_checks_compare_rendered_templates() {
        let g = |op: &str| json!({"type": "string_check", "name": "s", "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}", "operation": op});
        let item = json!({"answer": "Paris"});
        assert_eq!(grade(g("eq"), item.clone(), "Paris"), 1.0);
        assert_eq!(grade(g("eq"), item.clone(), "paris"), 0.0);
        assert_eq!(grade(g("ne"), item.clone(), "Lyon"), 1.0);
        assert_eq!(grade(g("like"), item.clone(), "It is Paris."), 1.0);
        assert_eq!(grade(g("like"), item.clone(), "It is PARIS."), 0.0);
        assert_eq!(grade(g("ilike"), item.clone(), "It is PARIS."), 1.0);
    }

    #[test]
    fn similarities_are_one_for_equal_texts_and_fall_with_difference() {
        for m in [
            Similarity::FuzzyMatch,
            Similarity::Bleu,
            Similarity::Gleu,
            Similarity::Rouge(1),
            Similarity::Rouge(2),
            Similarity::RougeL,
        ] {
            let same = similarity(m, "the cat sat on the mat", "the cat sat on the mat");
            let close = similarity(m, "the cat sat on a mat", "the cat sat on the mat");
            let far = similarity(m, "dogs bark loudly", "the cat sat on the mat");
            assert!((same - 1.0).abs() < 1e-9, "{m:?} {same}");
            assert!(close < same && close > far, "{m:?} {close} {far}");
        }
        // rapidfuzz's ratio: 2 * LCS / (|a| + |b|).
        assert!((similarity(Similarity::FuzzyMatch, "abcd", "abed") - 0.75).abs() < 1e-9);
        // ROUGE-1 F1: 5 of 6 words shared on each side.
        let r1 = similarity(
            Similarity::Rouge(1),
            "the cat sat on a mat",
            "the cat sat on the mat",
        );
        assert!((r1 - 5.0 / 6.0).abs() < 1e-9, "{r1}");
    }

    #[test]
    fn meteor_matches_exact_words_then_stems_and_penalises_fragments() {
        // "cats" meets "cat" by stem: 3 matches in one chunk, P = R = 1.
        let one_chunk = similarity(Similarity::Meteor, "the cats sat", "the cat sat");
        assert!((one_chunk - (1.0 - 0.5 / 27.0)).abs() < 1e-9, "{one_chunk}");
        // The same words out of order: "the cats" stays one chunk, "sat" another.
        let shuffled = similarity(Similarity::Meteor, "sat the cats", "the cat sat");
        assert!(
            (shuffled - (1.0 - 0.5 * 8.0 / 27.0)).abs() < 1e-9,
            "{shuffled}"
        );
        // Half the reference recalled: P = 1, R = 1/2, one chunk of 2.
        let half = similarity(Similarity::Meteor, "the cat", "the cat sat down");
        let fmean = 0.5 / (0.9 + 0.05);
        assert!((half - fmean * (1.0 - 0.5 / 8.0)).abs() < 1e-9, "{half}");
        assert_eq!(similarity(Similarity::Meteor, "dogs bark", "the cat"), 0.0);
        assert_eq!(similarity(Similarity::Meteor, "", "the cat"), 0.0);
    }

    /// Embeds each text as its counts of a few words.
    struct BagOfWords;

    impl ModelSampler for BagOfWords {
        fn complete(&self, _: &str, _: &[Value], _: &ModelParams) -> Result<String, String> {
            Err("no generation here".into())
        }

        fn embed(&self, model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
            assert_eq!(model, "org/encoder");
            Ok(texts
                .iter()
                .map(|t| {
                    ["cat", "dog", "sat"]
                        .iter()
                        .map(|w| t.split_whitespace().filter(|x| x == w).count() as f32)
                        .collect()
                })
                .collect())
        }
    }

    #[test]
    fn cosine_compares_the_embedding_models_vectors() {
        let mut g = json!({"type": "text_similarity", "name": "cos", "input": "{{ sample.output_text }}",
                           "reference": "{{ item.ref }}", "evaluation_metric": "cosine"});
        let err = fill_embedding_model(&mut g.clone(), None, "grader").unwrap_err();
        assert_eq!(err.path, "grader.evaluation_metric");
        // Inside a multi grader, the path names it.
        let mut multi = json!({"type": "multi", "name": "m", "graders": {"a": g.clone()}, "calculate_output": "a"});
        let err = fill_embedding_model(&mut multi, None, "grader").unwrap_err();
        assert_eq!(err.path, "grader.graders.a.evaluation_metric");
        fill_embedding_model(&mut multi, Some("org/encoder"), "grader").unwrap();
        assert_eq!(multi["graders"]["a"]["embedding_model"], "org/encoder");
        fill_embedding_model(&mut g, Some("org/encoder"), "grader").unwrap();
        let grader = Grader::parse(&g, "grader").unwrap();
        assert_eq!(grader.embedding_models(), vec!["org/encoder"]);
        let item = json!({"ref": "cat sat"});
        let (same, _) = grader
            .grade_with(&item, "sat cat", Some(&BagOfWords))
            .unwrap();
        assert!((same - 1.0).abs() < 1e-9, "{same}");
        let (part, _) = grader
            .grade_with(&item, "cat dog", Some(&BagOfWords))
            .unwrap();
        assert!((part - 0.5).abs() < 1e-6, "{part}");
        let (none, _) = grader.grade_with(&item, "dog", Some(&BagOfWords)).unwrap();
        assert_eq!(none, 0.0);
        // Without a sampler there is nothing to embed with: an error, not a score.
        assert!(grader.grade(&item, "cat").is_err());
    }

    #[test]
    fn multi_graders_combine_scores_with_a_formula() {
        let g = json!({
            "type": "multi", "name": "m",
            "graders": {
                "exact": {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}", "reference": "{{ item.a }}", "operation": "eq"},
                "fuzzy": {"type": "text_similarity", "name": "fuzzy", "input": "{{ sample.output_text }}", "reference": "{{ item.a }}", "evaluation_metric": "fuzzy_match"},
            },
            "calculate_output": "0.5 * exact + 0.5 * max(fuzzy, 0) - (1 - 1)",
        });
        let grader = Grader::parse(&g, "grader").unwrap();
        let (r, scores) = grader.grade(&json!({"a": "abcd"}), "abed").unwrap();
        assert!((r - 0.375).abs() < 1e-9, "{r}");
        assert_eq!(scores["exact"], 0.0);
        assert!((scores["fuzzy"] - 0.75).abs() < 1e-9);
    }

    /// A grader model that answers from a table, as a served decoder would.
    struct Canned;

    impl ModelSampler for Canned {
        fn complete(
            &self,
            model: &str,
            messages: &[Value],
            _: &ModelParams,
        ) -> Result<String, String> {
            assert_eq!(model, "judge/tiny");
            let asked = messages
                .last()
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default();
            Ok(if asked.contains("Paris") {
                " 0.9 out of 1"
            } else {
                "I would say positive"
            }
            .to_owned())
        }
    }

    #[test]
    fn model_graders_ask_the_sampler() {
        let score = Grader::parse(
            &json!({"type": "score_model", "name": "judge", "model": "judge/tiny", "range": [0, 1],
                    "input": [{"role": "user", "content": "Rate: {{ sample.output_text }}"}]}),
            "grader",
        )
        .unwrap();
        assert_eq!(score.models(), vec!["judge/tiny"]);
        assert_eq!(
            score
                .grade_with(&json!({}), "Paris", Some(&Canned))
                .unwrap()
                .0,
            0.9
        );
        // No number in the reply: the lowest score.
        assert_eq!(
            score
                .grade_with(&json!({}), "Lyon", Some(&Canned))
                .unwrap()
                .0,
            0.0
        );
        assert!(
            score
                .grade(&json!({}), "Paris")
                .unwrap_err()
                .contains("not available")
        );
        let label = Grader::parse(
            &json!({"type": "label_model", "name": "sentiment", "model": "judge/tiny",
                    "labels": ["positive", "negative"], "passing_labels": ["positive"],
                    "input": [{"role": "user", "content": "{{ sample.output_text }}"}]}),
            "grader",
        )
        .unwrap();
        assert_eq!(
            label
                .grade_with(&json!({}), "great", Some(&Canned))
                .unwrap()
                .0,
            1.0
        );
        assert_eq!(first_number("score: -2.5."), Some(-2.5));
        assert_eq!(first_number("none"), None);
    }

    #[test]
    fn bad_graders_name_the_field() {
        let cases = [
            (
                json!({"type": "string_check", "input": "x", "reference": "y", "operation": "contains"}),
                "grader.operation",
            ),
            (
                json!({"type": "text_similarity", "input": "x", "reference": "y", "evaluation_metric": "meteor", "embedding_model": "org/enc"}),
                "grader.embedding_model",
            ),
            (
                json!({"type": "text_similarity", "input": "x", "reference": "y", "evaluation_metric": "cosine", "embedding_model": "../etc"}),
                "grader.embedding_model",
            ),
            (
                json!({"type": "text_similarity", "input": "x", "reference": "y", "evaluation_metric": "cosine_ish"}),
                "grader.evaluation_metric",
            ),
            (
                json!({"type": "python", "source": "def grade(): pass"}),
                "grader.type",
            ),
            (
                json!({"type": "label_model", "model": "m", "input": [{"role": "user", "content": "x"}], "labels": ["a"], "passing_labels": ["b"]}),
                "grader.passing_labels",
            ),
            (
                json!({"type": "score_model", "model": "m", "input": []}),
                "grader.input",
            ),
            (
                json!({"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]}),
                "grader.range",
            ),
            (
                json!({"type": "string_check", "input": "{{ oops", "reference": "y", "operation": "eq"}),
                "grader.input",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y", "operation": "eq"}}, "calculate_output": "a + b"}),
                "grader.calculate_output",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y", "operation": "eq"}}, "calculate_output": "a +"}),
                "grader.calculate_output",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "nope"}}, "calculate_output": "a"}),
                "grader.graders.a.type",
            ),
            (json!("string_check"), "grader"),
        ];
        for (g, path) in cases {
            let e = Grader::parse(&g, "grader").unwrap_err();
            assert_eq!(e.path, path, "{g}: {e}");
        }
        // A template naming a field the item lacks fails when grading, with the grader named.
        let g = Grader::parse(
            &json!({"type": "string_check", "name": "s", "input": "{{ item.missing }}", "reference": "y", "operation": "eq"}),
            "grader",
        )
        .unwrap();
        assert!(g.grade(&json!({}), "x").unwrap_err().contains("grader 's'"));
    }
}
