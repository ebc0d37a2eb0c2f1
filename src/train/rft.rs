//! Reinforcement fine-tuning (OpenAI's `reinforcement` method) of decoder LMs, GRPO-style.
//!
//! Each step, for every prompt of the batch the policy samples a group of completions
//! (temperature 1), the job's grader scores each one (`item.*` is the dataset line,
//! `sample.output_text` the completion), and rewards become advantages normalised within the
//! group. The loss is `−A · log π(token)` over the completion tokens plus a KL penalty to
//! the reference model (the base as loaded, kept frozen beside the policy; the k3 estimator
//! `exp(r) − r − 1` with `r = log π_ref − log π`), averaged over tokens. One update per
//! sampled batch, so the policy ratio is 1 and needs no clipping.
//!
//! Reported per step: `train_reward_mean`, `train_reward_std`, `train_kl`; every
//! `eval_interval` steps (and each epoch end): `valid_reward`, the mean reward of
//! `eval_samples` greedy-or-sampled completions per validation prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::causal_lm::{export_decoder, load_options, read_decoder_config, token_logps};
use super::graders::{Grader, ModelParams, ModelSampler};
use super::spec::{Hyperparameters, ResolveContext};
use super::trainer::{SummaryParts, Task, ValidationResult, VarGroup, run_and_export, total_steps};
use super::{StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob};
use crate::data::chat::{DecoderTokenizer, LmExample};
use crate::data::text::length_quantile;
use crate::nn::decoder::{Decoder, DecoderLoadOptions};
use crate::nn::sampling::sample_token;
use crate::serve::generate::{GenEvent, GenerativeModel, Prompt as GenPrompt, SamplingParams};
use crate::serve::model::{EncoderModel, Implementation, Purpose};

/// Completions sampled per prompt at `compute_multiplier` 1.
const BASE_GROUP: f64 = 4.0;
/// Longest completion sampled during training and validation.
const MAX_COMPLETION_TOKENS: usize = 64;
/// Weight of the KL penalty.
const KL_COEF: f64 = 0.04;

/// Runs grader models (`score_model`, `label_model`) and embedding models (`cosine`) in the
/// training process: base models from the models directory, each loaded once.
struct LocalSampler {
    models_dir: PathBuf,
    device: Device,
    loaded: Loaded<GenerativeModel>,
    encoders: Loaded<EncoderModel>,
}

type Loaded<M> = std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<M>>>;

/// The model `id` from `cache`, loaded from the models directory on first use.
fn load_once<M>(
    cache: &Loaded<M>,
    models_dir: &Path,
    id: &str,
    what: &str,
    load: impl FnOnce(&Path) -> Result<M, String>,
) -> Result<std::rc::Rc<M>, String> {
    if let Some(m) = cache.borrow().get(id) {
        return Ok(m.clone());
    }
    if !crate::models::valid_id(id) {
        return Err(format!("'{id}' is not a base model id"));
    }
    let dir = models_dir.join(id);
    if !dir.join("config.json").is_file() {
        return Err(format!(
            "no base model '{id}' in the models directory ({what})"
        ));
    }
    let model = std::rc::Rc::new(load(&dir)?);
    cache.borrow_mut().insert(id.to_owned(), model.clone());
    Ok(model)
}

impl LocalSampler {
    fn model(&self, id: &str) -> Result<std::rc::Rc<GenerativeModel>, String> {
        load_once(
            &self.loaded,
            &self.models_dir,
            id,
            "grader models are base models",
            |dir| GenerativeModel::load(dir, &self.device),
        )
    }

    fn encoder(&self, id: &str) -> Result<std::rc::Rc<EncoderModel>, String> {
        load_once(
            &self.encoders,
            &self.models_dir,
            id,
            "embedding models are base encoders",
            |dir| {
                EncoderModel::load(dir, &self.device, Implementation::Auto)
                    .map_err(|e| e.to_string())
            },
        )
    }
}

impl ModelSampler for LocalSampler {
    fn embed(&self, model: &str, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        let m = self.encoder(model)?;
        let rows = texts
            .iter()
            .map(|t| m.tokenize(t, Purpose::Embed, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let refs: Vec<_> = rows.iter().collect();
        m.embed(&refs).map_err(|e| e.to_string())
    }

    fn complete(
        &self,
        model: &str,
        messages: &[Value],
        params: &ModelParams,
    ) -> Result<String, String> {
        let m = self.model(model)?;
        let prompt = m.encode(&GenPrompt::Chat(messages.to_vec()))?;
        let params = SamplingParams {
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            n: 1,
            seed: params.seed,
            stop: Vec::new(),
        };
        let mut text = String::new();
        m.generate(&prompt, &params, &mut |e| {
            if let GenEvent::Text { text: t, .. } = e {
                text.push_str(&t);
            }
            true
        })
        .map_err(|e| format!("{e:?}"))?;
        Ok(text)
    }
}

/// One prompt: its tokens and the dataset line the grader sees as `item`.
struct Prompt {
    ids: Vec<u32>,
    item: Value,
}

struct Rft {
    policy: Decoder,
    _varmap: VarMap,
    reference: Decoder,
    _reference_vars: VarMap,
    tok: DecoderTokenizer,
    grader: Grader,
    sampler: Option<LocalSampler>,
    train: Vec<Prompt>,
    valid: Vec<Prompt>,
    group: usize,
    eval_samples: usize,
    max_new: usize,
    stop_ids: Vec<u32>,
    seed: u64,
    device: Device,
    last: BTreeMap<String, f64>,
    config_json: Value,
    base_dir: PathBuf,
}

impl Rft {
    /// `n` completions of `prompt` (token ids, without the stop token) and their text.
    fn sample(
        &self,
        prompt: &[u32],
        n: usize,
        temperature: f64,
        rng: &mut StdRng,
    ) -> Result<Vec<(Vec<u32>, String)>, TrainError> {
        let mut cache = self.policy.new_cache();
        let rows: Vec<u32> = prompt
            .iter()
            .copied()
            .cycle()
            .take(n * prompt.len())
            .collect();
        let mut input = Tensor::from_vec(rows, (n, prompt.len()), &self.device)?;
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut done = vec![false; n];
        for _ in 0..self.max_new {
            let logits = self
                .policy
                .forward_cached(&input, &mut cache)?
                .to_vec2::<f32>()?;
            let mut next = Vec::with_capacity(n);
            for (i, row) in logits.iter().enumerate() {
                let t = if done[i] {
                    self.stop_ids.first().copied().unwrap_or(0)
                } else {
                    sample_token(row, temperature, 1.0, rng)
                };
                if !done[i] {
                    if self.stop_ids.contains(&t) {
                        done[i] = true;
                    } else {
                        out[i].push(t);
                    }
                }
                next.push(t);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            input = Tensor::from_vec(next, (n, 1), &self.device)?;
        }
        out.into_iter()
            .map(|ids| {
                let text = self
                    .tok
                    .decode(&ids)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                Ok((ids, text))
            })
            .collect()
    }

    fn reward(&self, item: &Value, text: &str) -> Result<f64, TrainError> {
        let sampler = self.sampler.as_ref().map(|s| s as &dyn ModelSampler);
        self.grader
            .grade_with(item, text, sampler)
            .map(|(r, _)| r)
            .map_err(TrainError::Data)
    }
}

impl Task for Rft {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn groups(&self, hp: &Hyperparameters) -> Vec<VarGroup> {
        vec![VarGroup {
            name: "backbone",
            lr: hp.learning_rate,
            vars: self.policy.named_trainable_vars().to_vec(),
        }]
    }

    fn loss(&mut self, batch: &[usize], step: u64) -> Result<(Tensor, usize), TrainError> {
        let mut rng = StdRng::seed_from_u64(
            self.seed
                ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ batch.first().copied().unwrap_or(0) as u64,
        );
        let mut rows: Vec<LmExample> = Vec::new();
        let mut advantages: Vec<f32> = Vec::new();
        let mut rewards_all = Vec::new();
        for &i in batch {
            let prompt = &self.train[i];
            let samples = self.sample(&prompt.ids, self.group, 1.0, &mut rng)?;
            let rewards: Vec<f64> = samples
                .iter()
                .map(|(_, text)| self.reward(&prompt.item, text))
                .collect::<Result<_, _>>()?;
            let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
            let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>()
                / rewards.len() as f64)
                .sqrt();
            for ((ids, _), r) in samples.into_iter().zip(&rewards) {
                // A completion cut at the length limit still learns from its tokens; an
                // empty one (the stop token first) is scored but has nothing to train.
                if ids.is_empty() {
                    continue;
                }
                let mut all = prompt.ids.clone();
                let mut trained = vec![false; all.len()];
                trained.extend(std::iter::repeat_n(true, ids.len()));
                all.extend(ids);
                rows.push(LmExample { ids: all, trained });
                advantages.push(if std > 1e-8 {
                    ((r - mean) / std) as f32
                } else {
                    0.0
                });
            }
            rewards_all.extend(rewards);
        }
        let mean = rewards_all.iter().sum::<f64>() / rewards_all.len().max(1) as f64;
        let std = (rewards_all.iter().map(|r| (r - mean).powi(2)).sum::<f64>()
            / rewards_all.len().max(1) as f64)
            .sqrt();
        self.last = BTreeMap::from([
            ("train_reward_mean".to_owned(), mean),
            ("train_reward_std".to_owned(), std),
        ]);
        if rows.is_empty() {
            // Nothing sampled had a token: a zero loss that still touches every variable.
            let zero = self
                .policy
                .named_trainable_vars()
                .iter()
                .map(|(_, v)| v.as_tensor().sum_all().and_then(|s| s * 0.0))
                .try_fold(Tensor::new(0f32, &self.device)?, |acc, t| acc + t?)?;
            self.last.insert("train_kl".into(), 0.0);
            return Ok((zero, 0));
        }
        let refs: Vec<&LmExample> = rows.iter().collect();
        let pad = self.tok.pad_id();
        let (logp, owners) = token_logps(&self.policy, &refs, pad, &self.device, true)?;
        let (ref_logp, _) = token_logps(&self.reference, &refs, pad, &self.device, false)?;
        let ref_logp = ref_logp.detach();
        let adv: Vec<f32> = owners.iter().map(|&o| advantages[o]).collect();
        let adv = Tensor::from_vec(adv, owners.len(), &self.device)?;
        let policy_term = (adv * &logp)?.neg()?;
        let r = (ref_logp - &logp)?;
        let kl = ((r.exp()? - &r)? - 1.0)?;
        self.last.insert(
            "train_kl".into(),
            f64::from(kl.detach().mean_all()?.to_scalar::<f32>()?),
        );
        let loss = (policy_term + (kl * KL_COEF)?)?.mean_all()?;
        let tokens = rows.iter().map(|r| r.ids.len()).sum();
        Ok((loss, tokens))
    }

    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0xE7A1);
        // One sample per prompt is greedy (the policy's answer); more are drawn at temperature 1.
        let temperature = if self.eval_samples == 1 { 0.0 } else { 1.0 };
        let mut rewards = Vec::new();
        for p in &self.valid {
            for (_, text) in self.sample(&p.ids, self.eval_samples, temperature, &mut rng)? {
                rewards.push(self.reward(&p.item, &text)?);
            }
        }
        let n = rewards.len().max(1) as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let mut metrics = BTreeMap::new();
        metrics.insert("valid_reward".to_owned(), mean);
        metrics.insert(
            "valid_reward_std".to_owned(),
            (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt(),
        );
        Ok(Some((metrics, json!({"samples": rewards.len()}))))
    }

    fn export(&mut self, dir: &Path) -> Result<(), TrainError> {
        export_decoder(&self.policy, dir, &self.config_json, &self.base_dir)
    }

    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.last)
    }
}

/// Reads reinforcement lines: `messages` is the prompt; the whole line is the grader's `item`.
fn read_prompts(path: &Path, tok: &DecoderTokenizer) -> Result<Vec<Prompt>, TrainError> {
    crate::data::text::read_lines(path)?
        .into_iter()
        .map(|(line, value)| {
            let messages = value
                .get("messages")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    TrainError::Data(format!("line {line}: \"messages\" must be a list"))
                })?;
            let ids = tok
                .encode_prompt(messages)
                .map_err(|e| TrainError::Data(format!("line {line}: {e}")))?;
            Ok(Prompt { ids, item: value })
        })
        .collect()
}

pub(crate) fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let grader_json = job.grader.as_ref().ok_or_else(|| {
        TrainError::Data(
            "reinforcement fine-tuning needs a grader (method.reinforcement.grader)".into(),
        )
    })?;
    let grader = Grader::parse(grader_json, "method.reinforcement.grader")
        .map_err(|e| TrainError::Data(e.to_string()))?;
    let sampler = if grader.models().is_empty() && grader.embedding_models().is_empty() {
        None
    } else {
        let models_dir = job.models_dir.clone().ok_or_else(|| {
            TrainError::Data(
                "this grader runs a model, and no models directory is configured".into(),
            )
        })?;
        let sampler = LocalSampler {
            models_dir,
            device: job.device.clone(),
            loaded: Default::default(),
            encoders: Default::default(),
        };
        // Load every grader model now: a missing one fails the job before any training.
        for id in grader.models() {
            sampler
                .model(id)
                .map_err(|e| TrainError::Data(format!("grader model: {e}")))?;
        }
        for id in grader.embedding_models() {
            sampler
                .encoder(id)
                .map_err(|e| TrainError::Data(format!("grader embedding model: {e}")))?;
        }
        Some(sampler)
    };
    let (config, config_json) = read_decoder_config(&job.base_model)?;
    let tok = DecoderTokenizer::load(&job.base_model)?;
    let train = read_prompts(&job.training_file, &tok)?;
    let valid = match &job.validation_file {
        Some(p) => read_prompts(p, &tok)?,
        None => Vec::new(),
    };
    let lengths: Vec<usize> = train
        .iter()
        .map(|p| p.ids.len() + MAX_COMPLETION_TOKENS)
        .collect();
    let ctx = ResolveContext {
        train_examples: train.len(),
        num_layers: config.num_hidden_layers,
        max_positions: config.max_position_embeddings,
        p99_tokens: length_quantile(&lengths, 0.99),
        decoder: true,
        vision: false,
        bf16_native: crate::device::supports_bf16(&job.device),
    };
    let mut request = job.hyperparameters.clone();
    if request.select_metric.is_none() {
        request.select_metric = Some(super::spec::AutoOr::Value("valid_reward".into()));
    }
    let (mut hp, mut notes) = request.resolve(&ctx)?;
    let multiplier = hp.compute_multiplier.unwrap_or(1.0);
    let group = (BASE_GROUP * multiplier).round().clamp(2.0, 64.0) as usize;
    notes.push(format!(
        "{group} completions sampled per prompt (compute_multiplier = {multiplier})"
    ));
    hp.compute_multiplier = Some(multiplier);
    let eval_samples = hp.eval_samples.unwrap_or(1) as usize;
    hp.eval_samples = Some(eval_samples as u32);
    if let Some(k) = hp.eval_interval {
        hp.eval_every_steps.get_or_insert(k);
    }
    let longest_prompt = train
        .iter()
        .chain(&valid)
        .map(|p| p.ids.len())
        .max()
        .unwrap_or(0);
    let max_length = hp.max_length as usize;
    if longest_prompt >= max_length {
        return Err(TrainError::Data(format!(
            "a prompt is {longest_prompt} tokens long, leaving no room for a completion within max_length = {max_length}"
        )));
    }
    let max_new = (max_length - longest_prompt).min(MAX_COMPLETION_TOKENS);

    let varmap = VarMap::new();
    let mut policy = Decoder::load_dir(
        &job.base_model,
        &varmap,
        &job.device,
        &load_options(&hp, job.seed),
    )?;
    policy.set_compute_dtype(hp.compute_dtype());
    let reference_vars = VarMap::new();
    let mut reference = Decoder::load_dir(
        &job.base_model,
        &reference_vars,
        &job.device,
        &DecoderLoadOptions {
            freeze_embeddings: true,
            freeze_layers: config.num_hidden_layers,
            ..DecoderLoadOptions::default()
        },
    )?;
    reference.set_compute_dtype(hp.compute_dtype());
    let mut stop_ids = config.eos_token_ids();
    stop_ids.extend(tok.eos_id());
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let train_tokens = train.iter().map(|p| p.ids.len() as u64).sum();
    let mut task = Rft {
        policy,
        _varmap: varmap,
        reference,
        _reference_vars: reference_vars,
        tok,
        grader,
        sampler,
        train,
        valid,
        group,
        eval_samples,
        max_new,
        stop_ids,
        seed: job.seed,
        device: job.device.clone(),
        last: BTreeMap::new(),
        config_json,
        base_dir: job.base_model.clone(),
    };
    on_event(&TrainEvent::Started {
        task: "reinforcement",
        hyperparameters: hp.clone(),
        notes,
        train_examples: task.train.len(),
        valid_examples: task.valid.len(),
        total_steps: total_steps(&hp, task.train.len()),
        labels: Vec::new(),
        train_tokens,
    });
    let baseline = task.evaluate()?.map(|(m, _)| m);
    if let Some(m) = &baseline {
        on_event(&TrainEvent::message(format!(
            "Before training, mean validation reward {:.4}.",
            m.get("valid_reward").copied().unwrap_or(f64::NAN)
        )));
    }
    run_and_export(
        &mut task,
        job,
        hp,
        on_event,
        stop,
        SummaryParts {
            task: "reinforcement",
            baseline_metrics: baseline,
            labels: Vec::new(),
        },
    )
}
