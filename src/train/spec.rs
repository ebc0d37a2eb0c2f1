//! What a training run is asked to do: the task, the strategy and the hyperparameters.
//!
//! Jobs carry OpenAI's hyperparameters (`n_epochs`, `batch_size`,
//! `learning_rate_multiplier`) plus kiln's knobs next to them (DESIGN.md, "The job spec").
//! Each may be `"auto"`. [`HyperparameterRequest::check`] validates a request without any
//! data (used when a job is created); [`HyperparameterRequest::resolve`] turns it into the
//! concrete [`Hyperparameters`] a run uses once the data is known, and every value chosen
//! automatically is echoed back.

use serde::{Deserialize, Serialize};

use super::schedule::LrScheduler;

/// A value, or `"auto"` to let kiln choose.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Auto(Auto),
    Value(T),
}

/// The literal string `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    Auto,
}

// By hand rather than `#[serde(untagged)]`, whose error ("data did not match any variant")
// would hide what was wrong with the value.
impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for AutoOr<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        if value == "auto" {
            return Ok(AutoOr::Auto(Auto::Auto));
        }
        T::deserialize(value)
            .map(AutoOr::Value)
            .map_err(|e| serde::de::Error::custom(format!("{e} (or \"auto\")")))
    }
}

/// `lora_target_modules`' value: module names, or PEFT's bare string `"all-linear"` (kept as
/// the one-name list `["all-linear"]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ModuleList(pub Vec<String>);

impl<'de> Deserialize<'de> for ModuleList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(s) if s == ALL_LINEAR => Ok(ModuleList(vec![s])),
            serde_json::Value::String(s) => Err(serde::de::Error::custom(format!(
                "expected an array of module names or \"{ALL_LINEAR}\", got the string \"{s}\""
            ))),
            value => Vec::<String>::deserialize(value)
                .map(ModuleList)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl<T: Clone> AutoOr<T> {
    fn value(&self) -> Option<T> {
        match self {
            AutoOr::Auto(_) => None,
            AutoOr::Value(v) => Some(v.clone()),
        }
    }
}

/// Which weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Every weight trains.
    Full,
    /// Embeddings and the lowest `freeze_layers` layers stay fixed.
    Freeze,
    /// The backbone is a fixed feature extractor (features cached); only the head trains.
    HeadOnly,
    /// Low-rank adapters on chosen projections; the base stays fixed.
    Lora,
    /// Fresh random weights (vision; not for pretrained text encoders).
    Scratch,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Full => "full",
            Strategy::Freeze => "freeze",
            Strategy::HeadOnly => "head_only",
            Strategy::Lora => "lora",
            Strategy::Scratch => "scratch",
        }
    }
}

/// Hyperparameters as a job states them; every field optional, most accept `"auto"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperparameterRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_epochs: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<AutoOr<Strategy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_layers: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_target_modules: Option<AutoOr<ModuleList>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<AutoOr<f64>>,
    /// Learning rate of the freshly initialised head (default: 20x the backbone's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_learning_rate: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<AutoOr<LrScheduler>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation_steps: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every_steps: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every_steps: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping_patience: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_metric: Option<AutoOr<String>>,
    /// DPO's `beta` (a method knob of OpenAI's `dpo` method, not one of kiln's common keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<AutoOr<f64>>,
    /// Reinforcement's knobs (OpenAI's `reinforcement` method): samples per prompt scale
    /// with `compute_multiplier`; validation reward every `eval_interval` steps over
    /// `eval_samples` samples per prompt; `reasoning_effort` is accepted and has no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_multiplier: Option<AutoOr<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_samples: Option<AutoOr<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// Image classification's training augmentation (default `crop_flip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<AutoOr<Augmentation>>,
    /// The precision text models compute in: `bf16` (mixed precision: bf16 activations and
    /// products, f32 master weights, optimizer state, norms, softmax and loss) or `fp32`;
    /// `auto` is bf16 on GPUs that compute it natively and fp32 elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<AutoOr<Precision>>,
}

/// The precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    /// The dtype activations and matrix products use.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::Fp32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Random augmentation of training images (evaluation always center-crops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augmentation {
    /// The evaluation transform only.
    None,
    /// Random resized crops.
    Crop,
    /// Random resized crops and horizontal flips.
    CropFlip,
}

/// Every key a [`HyperparameterRequest`] accepts, in the order the job object shows them.
pub const KEYS: &[&str] = &[
    "n_epochs",
    "batch_size",
    "learning_rate_multiplier",
    "strategy",
    "freeze_layers",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "learning_rate",
    "head_learning_rate",
    "warmup_ratio",
    "weight_decay",
    "lr_scheduler",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "max_length",
    "eval_every_steps",
    "checkpoint_every_steps",
    "early_stopping_patience",
    "select_metric",
];

/// A hyperparameter that is out of range, naming it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct HyperparameterError {
    /// The key inside `hyperparameters`, e.g. `n_epochs`.
    pub param: &'static str,
    pub message: String,
}

fn bad(param: &'static str, message: impl Into<String>) -> HyperparameterError {
    HyperparameterError {
        param,
        message: message.into(),
    }
}

/// Metrics a run can select its best checkpoint by; `valid_loss` is minimised, the rest
/// maximised.
pub const SELECT_METRICS: &[&str] = &[
    "valid_loss",
    "valid_accuracy",
    "valid_macro_f1",
    "valid_roc_auc",
    "valid_masked_token_accuracy",
    "valid_mean_token_accuracy",
    "valid_perplexity",
    "valid_reward_margin",
    "valid_reward_accuracy",
    "valid_reward",
];

/// The concrete settings of a run, every `"auto"` replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    pub strategy: Strategy,
    pub freeze_layers: u32,
    pub lora_rank: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Vec<String>,
    /// Learning rate of the pretrained weights (or the adapters).
    pub learning_rate: f64,
    /// Learning rate of the freshly initialised head (higher: it starts from nothing).
    pub head_learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub lr_scheduler: LrScheduler,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub gradient_accumulation_steps: u32,
    pub max_length: u32,
    /// Evaluate every K optimizer steps as well as at each epoch end.
    pub eval_every_steps: Option<u32>,
    /// Checkpoint every K optimizer steps as well as at each epoch end.
    pub checkpoint_every_steps: Option<u32>,
    pub early_stopping_patience: Option<u32>,
    pub select_metric: String,
    /// DPO's strength of the pull towards the reference model (DPO runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// Reinforcement runs only (see [`HyperparameterRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_samples: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// Image classification runs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<Augmentation>,
    /// Text runs only (encoders and decoders); image runs compute in f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<Precision>,
}

impl Hyperparameters {
    /// The dtype the model's layers compute in.
    pub fn compute_dtype(&self) -> candle_core::DType {
        self.mixed_precision
            .unwrap_or(Precision::Fp32)
            .compute_dtype()
    }
}

/// What `resolve` needs to know about the run.
#[derive(Debug, Clone)]
pub struct ResolveContext {
    pub train_examples: usize,
    /// Transformer layers of the base model (bounds `freeze_layers`).
    pub num_layers: usize,
    /// Longest sequence the base model accepts.
    pub max_positions: usize,
    /// Token count under which this fraction of training examples falls (for `max_length: auto`).
    pub p99_tokens: usize,
    /// A decoder LM (LoRA module names, learning rates and lengths differ from encoders').
    pub decoder: bool,
    /// An image classifier (scratch training allowed; `max_length` is the image side).
    pub vision: bool,
    /// The training device computes bf16 natively (a GPU of compute capability 8.0 or newer):
    /// `mixed_precision: auto` is bf16 there.
    pub bf16_native: bool,
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    param: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, HyperparameterError> {
    if v < lo || v > hi {
        Err(bad(
            param,
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    } else {
        Ok(v)
    }
}

fn positive(param: &'static str, v: f64, hi: f64) -> Result<f64, HyperparameterError> {
    if !(v.is_finite() && v > 0.0 && v <= hi) {
        Err(bad(
            param,
            format!("must be a number greater than 0 and at most {hi}, got {v}"),
        ))
    } else {
        Ok(v)
    }
}

fn fraction(param: &'static str, v: f64, hi: f64) -> Result<f64, HyperparameterError> {
    if !(v.is_finite() && (0.0..=hi).contains(&v)) {
        Err(bad(param, format!("must be between 0 and {hi}, got {v}")))
    } else {
        Ok(v)
    }
}

/// The modules LoRA may adapt in an encoder layer.
pub const LORA_MODULES: &[&str] = &[
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// PEFT's shorthand in `lora_target_modules` for every module of the model's family above.
pub const ALL_LINEAR: &str = "all-linear";

/// The modules LoRA may adapt in a decoder layer (PEFT's names).
pub const DECODER_LORA_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl HyperparameterRequest {
    /// Checks every explicit value's range; needs no data. Errors name the key.
    pub fn check(&self) -> Result<(), HyperparameterError> {
        let v = |o: &Option<AutoOr<u32>>| o.as_ref().and_then(AutoOr::value);
        let f = |o: &Option<AutoOr<f64>>| o.as_ref().and_then(AutoOr::value);
        if let Some(n) = v(&self.n_epochs) {
            in_range("n_epochs", n, 1, 100)?;
        }
        if let Some(n) = v(&self.batch_size) {
            in_range("batch_size", n, 1, 4096)?;
        }
        if let Some(x) = f(&self.learning_rate_multiplier) {
            positive("learning_rate_multiplier", x, 100.0)?;
        }
        if let Some(x) = f(&self.learning_rate) {
            positive("learning_rate", x, 1.0)?;
        }
        if let Some(x) = f(&self.head_learning_rate) {
            positive("head_learning_rate", x, 1.0)?;
        }
        if let Some(n) = v(&self.freeze_layers) {
            in_range("freeze_layers", n, 0, 1000)?;
        }
        if let Some(n) = v(&self.lora_rank) {
            in_range("lora_rank", n, 1, 1024)?;
        }
        if let Some(x) = f(&self.lora_alpha) {
            positive("lora_alpha", x, 100_000.0)?;
        }
        if let Some(x) = f(&self.lora_dropout)
            && !(x.is_finite() && (0.0..1.0).contains(&x))
        {
            return Err(bad(
                "lora_dropout",
                format!("must be at least 0 and below 1, got {x}"),
            ));
        }
        if let Some(AutoOr::Value(ModuleList(modules))) = &self.lora_target_modules {
            if modules.is_empty() {
                return Err(bad("lora_target_modules", "must name at least one module"));
            }
            let known = |m: &String| {
                m == ALL_LINEAR
                    || LORA_MODULES.contains(&m.as_str())
                    || DECODER_LORA_MODULES.contains(&m.as_str())
            };
            if let Some(m) = modules.iter().find(|m| !known(m)) {
                return Err(bad(
                    "lora_target_modules",
                    format!(
                        "unknown module '{m}'; expected {ALL_LINEAR} or some of {} (encoders) \
                         or {} (decoders)",
                        LORA_MODULES.join(", "),
                        DECODER_LORA_MODULES.join(", ")
                    ),
                ));
            }
        }
        if let Some(x) = f(&self.warmup_ratio) {
            fraction("warmup_ratio", x, 0.9)?;
        }
        if let Some(x) = f(&self.weight_decay) {
            fraction("weight_decay", x, 1.0)?;
        }
        if let Some(x) = f(&self.max_grad_norm)
            && !(x.is_finite() && x >= 0.0)
        {
            return Err(bad(
                "max_grad_norm",
                format!("must be 0 (off) or positive, got {x}"),
            ));
        }
        if let Some(n) = v(&self.gradient_accumulation_steps) {
            in_range("gradient_accumulation_steps", n, 1, 1024)?;
        }
        if let Some(n) = v(&self.max_length) {
            in_range("max_length", n, 4, 131_072)?;
        }
        if let Some(n) = v(&self.eval_every_steps) {
            in_range("eval_every_steps", n, 1, u32::MAX)?;
        }
        if let Some(n) = v(&self.checkpoint_every_steps) {
            in_range("checkpoint_every_steps", n, 1, u32::MAX)?;
        }
        if let Some(x) = f(&self.compute_multiplier)
            && !(x > 0.0 && x <= 100.0)
        {
            return Err(bad(
                "compute_multiplier",
                format!("must be above 0 and at most 100, got {x}"),
            ));
        }
        if let Some(n) = v(&self.eval_interval) {
            in_range("eval_interval", n, 1, u32::MAX)?;
        }
        if let Some(n) = v(&self.eval_samples) {
            in_range("eval_samples", n, 1, 10_000)?;
        }
        if let Some(b) = f(&self.beta)
            && !(b > 0.0 && b <= 100.0)
        {
            return Err(bad(
                "beta",
                format!("must be above 0 and at most 100, got {b}"),
            ));
        }
        if let Some(n) = v(&self.early_stopping_patience) {
            in_range("early_stopping_patience", n, 1, 1000)?;
        }
        if let Some(AutoOr::Value(m)) = &self.select_metric
            && !SELECT_METRICS.contains(&m.as_str())
        {
            return Err(bad(
                "select_metric",
                format!(
                    "unknown metric '{m}'; expected one of {}",
                    SELECT_METRICS.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The concrete settings for this run, plus a note for each value kiln chose.
    pub fn resolve(
        &self,
        ctx: &ResolveContext,
    ) -> Result<(Hyperparameters, Vec<String>), HyperparameterError> {
        self.check()?;
        let mut notes = Vec::new();
        let mut chose =
            |name: &str, value: String, why: &str| notes.push(format!("{name} = {value} ({why})"));

        let strategy = self
            .strategy
            .as_ref()
            .and_then(AutoOr::value)
            .unwrap_or(Strategy::Full);
        if strategy == Strategy::Scratch && !ctx.vision {
            return Err(bad(
                "strategy",
                "scratch training is for vision backbones; text encoders are fine-tuned from pretrained weights",
            ));
        }
        if ctx.decoder && strategy == Strategy::HeadOnly {
            return Err(bad(
                "strategy",
                "head_only trains a new classification head on fixed features; a generative model has no such head: use full, freeze or lora",
            ));
        }
        let n = ctx.train_examples.max(1);

        let n_epochs = match self.n_epochs.as_ref().and_then(AutoOr::value) {
            Some(e) => e,
            None => {
                // Small sets need more passes; ~3 passes is plenty past a few thousand examples.
                let e = (3000 / n).clamp(3, 10) as u32;
                chose("n_epochs", e.to_string(), &format!("{n} training examples"));
                e
            }
        };
        let batch_size = match self.batch_size.as_ref().and_then(AutoOr::value) {
            Some(b) => b,
            None => {
                let b: u32 = if strategy == Strategy::HeadOnly {
                    64
                } else {
                    16
                };
                let b = b.min(n as u32).max(1);
                chose(
                    "batch_size",
                    b.to_string(),
                    "default for this strategy, at most the data size",
                );
                b
            }
        };
        let multiplier = self
            .learning_rate_multiplier
            .as_ref()
            .and_then(AutoOr::value)
            .unwrap_or(1.0);
        // Pretrained weights move slowly; a fresh head (or LoRA's fresh adapters) faster.
        let (base_lr, head_lr) = match strategy {
            Strategy::Full | Strategy::Freeze | Strategy::Scratch if ctx.decoder => (2e-5, 1e-3),
            Strategy::Lora if ctx.decoder => (2e-4, 1e-3),
            // A network trained from nothing: one rate for all of it.
            Strategy::Scratch => (1e-3, 1e-3),
            Strategy::Full | Strategy::Freeze if ctx.vision => (1e-4, 1e-3),
            Strategy::Full | Strategy::Freeze => (5e-5, 1e-3),
            Strategy::Lora => (5e-4, 1e-3),
            Strategy::HeadOnly => (0.0, 5e-3),
        };
        let (learning_rate, head_learning_rate) =
            match self.learning_rate.as_ref().and_then(AutoOr::value) {
                // An absolute rate overrides the multiplier; the head keeps its ratio to it.
                Some(lr) if strategy == Strategy::HeadOnly => (0.0, lr),
                Some(lr) => (lr, lr * head_lr / base_lr),
                None => (base_lr * multiplier, head_lr * multiplier),
            };
        let head_learning_rate = self
            .head_learning_rate
            .as_ref()
            .and_then(AutoOr::value)
            .unwrap_or(head_learning_rate);
        let freeze_layers = match strategy {
            Strategy::Freeze => match self.freeze_layers.as_ref().and_then(AutoOr::value) {
                Some(k) if k as usize > ctx.num_layers => {
                    return Err(bad(
                        "freeze_layers",
                        format!("the model has {} layers, cannot freeze {k}", ctx.num_layers),
                    ));
                }
                Some(k) => k,
                None => {
                    let k = (ctx.num_layers / 2) as u32;
                    chose(
                        "freeze_layers",
                        k.to_string(),
                        &format!("half of the model's {} layers", ctx.num_layers),
                    );
                    k
                }
            },
            _ => 0,
        };
        let max_length = match self.max_length.as_ref().and_then(AutoOr::value) {
            Some(m) if ctx.vision && m as usize != ctx.max_positions => {
                return Err(bad(
                    "max_length",
                    format!(
                        "images are resized to the model's input side ({} pixels); leave max_length out",
                        ctx.max_positions
                    ),
                ));
            }
            None if ctx.vision => ctx.max_positions as u32,
            Some(m) if m as usize > ctx.max_positions => {
                return Err(bad(
                    "max_length",
                    format!(
                        "the model accepts at most {} tokens, got {m}",
                        ctx.max_positions
                    ),
                ));
            }
            Some(m) => m,
            None => {
                let m = ctx.p99_tokens.div_ceil(8).max(1) * 8;
                let cap = if ctx.decoder { 2048 } else { 512 };
                let m = m.clamp(8, ctx.max_positions.min(cap)) as u32;
                chose(
                    "max_length",
                    m.to_string(),
                    "covers 99% of the training examples",
                );
                m
            }
        };
        let (family_modules, default_modules) = if ctx.decoder {
            (DECODER_LORA_MODULES, ["q_proj", "v_proj"])
        } else {
            (LORA_MODULES, ["query", "value"])
        };
        let requested_modules = self.lora_target_modules.as_ref().and_then(AutoOr::value);
        let lora_target_modules = match requested_modules.map(|m| m.0) {
            // PEFT's shorthand: every module of the family, listed as such in the job.
            Some(modules) if modules.iter().any(|m| m == ALL_LINEAR) => {
                family_modules.iter().map(|m| (*m).to_owned()).collect()
            }
            Some(modules) => {
                if let Some(m) = modules
                    .iter()
                    .find(|m| !family_modules.contains(&m.as_str()))
                {
                    return Err(bad(
                        "lora_target_modules",
                        format!(
                            "'{m}' is not a module of this model; expected {ALL_LINEAR} or some \
                             of {}",
                            family_modules.join(", ")
                        ),
                    ));
                }
                modules
            }
            None => default_modules.iter().map(|m| (*m).to_owned()).collect(),
        };
        let requested_precision = self.mixed_precision.as_ref().and_then(AutoOr::value);
        let mixed_precision = if ctx.vision {
            if requested_precision == Some(Precision::Bf16) {
                return Err(bad(
                    "mixed_precision",
                    "image models train in fp32 in this version of kiln; leave mixed_precision out",
                ));
            }
            None
        } else {
            Some(match requested_precision {
                Some(Precision::Bf16) if !ctx.bf16_native => {
                    return Err(bad(
                        "mixed_precision",
                        "bf16 needs a GPU that computes bf16 natively (compute capability 8.0 or \
                         newer, e.g. A100, H100), and this job's training device does not; \
                         leave mixed_precision as auto or fp32",
                    ));
                }
                Some(p) => p,
                None if ctx.bf16_native => {
                    chose(
                        "mixed_precision",
                        "bf16".into(),
                        "the GPU computes bf16 natively; weights and optimizer stay f32",
                    );
                    Precision::Bf16
                }
                None => Precision::Fp32,
            })
        };
        let hp = Hyperparameters {
            n_epochs,
            batch_size,
            learning_rate_multiplier: multiplier,
            strategy,
            freeze_layers,
            lora_rank: self.lora_rank.as_ref().and_then(AutoOr::value).unwrap_or(8),
            lora_alpha: self
                .lora_alpha
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(16.0),
            lora_dropout: self
                .lora_dropout
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(0.1),
            lora_target_modules,
            learning_rate,
            head_learning_rate,
            warmup_ratio: self
                .warmup_ratio
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(0.1),
            weight_decay: self
                .weight_decay
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(0.01),
            lr_scheduler: self
                .lr_scheduler
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(LrScheduler::Linear),
            max_grad_norm: self
                .max_grad_norm
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(1.0),
            gradient_accumulation_steps: self
                .gradient_accumulation_steps
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or(1),
            max_length,
            eval_every_steps: self.eval_every_steps.as_ref().and_then(AutoOr::value),
            checkpoint_every_steps: self.checkpoint_every_steps.as_ref().and_then(AutoOr::value),
            early_stopping_patience: self
                .early_stopping_patience
                .as_ref()
                .and_then(AutoOr::value),
            select_metric: self
                .select_metric
                .as_ref()
                .and_then(AutoOr::value)
                .unwrap_or_else(|| "valid_loss".to_owned()),
            beta: self.beta.as_ref().and_then(AutoOr::value),
            compute_multiplier: self.compute_multiplier.as_ref().and_then(AutoOr::value),
            eval_interval: self.eval_interval.as_ref().and_then(AutoOr::value),
            eval_samples: self.eval_samples.as_ref().and_then(AutoOr::value),
            reasoning_effort: self.reasoning_effort.clone(),
            augmentation: if ctx.vision {
                Some(
                    self.augmentation
                        .as_ref()
                        .and_then(AutoOr::value)
                        .unwrap_or(Augmentation::CropFlip),
                )
            } else {
                None
            },
            mixed_precision,
        };
        Ok((hp, notes))
    }
}

impl Hyperparameters {
    /// The values used, as a job's `hyperparameters` object: what the API echoes back, and
    /// what a resumed attempt reads (so it resolves to exactly these values again).
    pub fn echo(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        if self.strategy == Strategy::HeadOnly {
            // Nothing but the head trains: its rate is the run's learning rate.
            map.insert(
                "learning_rate".into(),
                serde_json::json!(self.head_learning_rate),
            );
        }
        map
    }
}

/// Whether a larger value of `metric` is better.
pub fn higher_is_better(metric: &str) -> bool {
    !(metric.ends_with("loss") || metric.ends_with("perplexity"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> ResolveContext {
        ResolveContext {
            train_examples: 200,
            num_layers: 6,
            max_positions: 512,
            p99_tokens: 37,
            decoder: false,
            vision: false,
            bf16_native: false,
        }
    }

    #[test]
    fn auto_and_missing_values_are_chosen_and_explained() {
        let req: HyperparameterRequest =
            serde_json::from_value(json!({"n_epochs": "auto", "batch_size": 8})).unwrap();
        let (hp, notes) = req.resolve(&ctx()).unwrap();
        assert_eq!(hp.n_epochs, 10);
        assert_eq!(hp.batch_size, 8);
        assert_eq!(hp.max_length, 40);
        assert_eq!(hp.strategy, Strategy::Full);
        assert!(
            notes.iter().any(|n| n.starts_with("n_epochs = 10")),
            "{notes:?}"
        );
        assert!(
            !notes.iter().any(|n| n.starts_with("batch_size")),
            "explicit values are not notes"
        );
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (body, param) in [
            (json!({"n_epochs": 0}), "n_epochs"),
            (json!({"batch_size": 100000}), "batch_size"),
            (
                json!({"learning_rate_multiplier": -1.0}),
                "learning_rate_multiplier",
            ),
            (json!({"lora_dropout": 1.0}), "lora_dropout"),
            (
                json!({"lora_target_modules": ["nope"]}),
                "lora_target_modules",
            ),
            (json!({"select_metric": "vibes"}), "select_metric"),
            (json!({"warmup_ratio": 2.0}), "warmup_ratio"),
        ] {
            let req: HyperparameterRequest = serde_json::from_value(body.clone()).unwrap();
            assert_eq!(req.check().unwrap_err().param, param, "{body}");
        }
        let req: HyperparameterRequest =
            serde_json::from_value(json!({"strategy": "freeze", "freeze_layers": 7})).unwrap();
        assert_eq!(req.resolve(&ctx()).unwrap_err().param, "freeze_layers");
        let req: HyperparameterRequest =
            serde_json::from_value(json!({"max_length": 1024})).unwrap();
        assert_eq!(req.resolve(&ctx()).unwrap_err().param, "max_length");
    }

    #[test]
    fn all_linear_adapts_every_module_of_the_family() {
        let req: HyperparameterRequest = serde_json::from_value(
            json!({"strategy": "lora", "lora_target_modules": ["all-linear"]}),
        )
        .unwrap();
        req.check().unwrap();
        let (hp, _) = req.resolve(&ctx()).unwrap();
        assert_eq!(hp.lora_target_modules, LORA_MODULES);
        let decoder = ResolveContext {
            decoder: true,
            ..ctx()
        };
        let (hp, _) = req.resolve(&decoder).unwrap();
        assert_eq!(hp.lora_target_modules, DECODER_LORA_MODULES);
        // A decoder's module on an encoder is still an error, naming the shorthand too.
        let req: HyperparameterRequest =
            serde_json::from_value(json!({"lora_target_modules": ["q_proj"]})).unwrap();
        let err = req.resolve(&ctx()).unwrap_err().to_string();
        assert!(err.contains("all-linear") && err.contains("query"), "{err}");
    }

    #[test]
    fn all_linear_may_be_a_bare_string_as_in_peft() {
        let req: HyperparameterRequest =
            serde_json::from_value(json!({"lora_target_modules": "all-linear"})).unwrap();
        let (hp, _) = req.resolve(&ctx()).unwrap();
        assert_eq!(hp.lora_target_modules, LORA_MODULES);
        // Another bare string is an error that says what is expected.
        let err = serde_json::from_value::<HyperparameterRequest>(
            json!({"lora_target_modules": "query"}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("all-linear") && err.contains("\"query\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_rejected_by_serde() {
        assert!(serde_json::from_value::<HyperparameterRequest>(json!({"epochs": 3})).is_err());
        assert!(
            serde_json::from_value::<HyperparameterRequest>(json!({"n_epochs": "many"})).is_err()
        );
        assert!(
            serde_json::from_value::<HyperparameterRequest>(json!({"strategy": "partial"}))
                .is_err()
        );
    }

    #[test]
    fn keys_lists_every_field_of_the_request() {
        let mut all = serde_json::Map::new();
        for k in KEYS {
            all.insert((*k).to_owned(), json!("auto"));
        }
        let req: HyperparameterRequest =
            serde_json::from_value(serde_json::Value::Object(all)).unwrap();
        let back = serde_json::to_value(&req).unwrap();
        let mut fields: Vec<&str> = back
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = KEYS.to_vec();
        fields.sort();
        keys.sort();
        assert_eq!(fields, keys);
    }

    #[test]
    fn the_echo_resolves_to_the_same_values() {
        for body in [
            json!({}),
            json!({"strategy": "head_only"}),
            json!({"strategy": "lora", "n_epochs": "auto"}),
            json!({"strategy": "freeze"}),
        ] {
            let req: HyperparameterRequest = serde_json::from_value(body.clone()).unwrap();
            let (hp, _) = req.resolve(&ctx()).unwrap();
            let again: HyperparameterRequest =
                serde_json::from_value(serde_json::Value::Object(hp.echo())).unwrap();
            assert_eq!(again.resolve(&ctx()).unwrap().0, hp, "{body}");
        }
    }

    #[test]
    fn absolute_learning_rate_overrides_the_multiplier() {
        let req: HyperparameterRequest = serde_json::from_value(
            json!({"learning_rate": 1e-4, "learning_rate_multiplier": 10.0}),
        )
        .unwrap();
        let (hp, _) = req.resolve(&ctx()).unwrap();
        assert_eq!(hp.learning_rate, 1e-4);
        assert!((hp.head_learning_rate - 2e-3).abs() < 1e-12);
        let req: HyperparameterRequest =
            serde_json::from_value(json!({"learning_rate_multiplier": 2.0})).unwrap();
        let (hp, _) = req.resolve(&ctx()).unwrap();
        assert!((hp.learning_rate - 1e-4).abs() < 1e-12);
    }
}
