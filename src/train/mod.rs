//! The training engine: a pure library (no HTTP, no SQL, no tokio). A run takes a base model,
//! data files and hyperparameters, and gives metrics, checkpoints and an exported model.
//! Progress leaves through a callback; a stop request arrives through a flag that the loop
//! checks before every step.
//!
//! ```text
//! run(job) ─► detect the task from the training file
//!          ─► task (model + tokenised data) ─► Trainer::run (the shared loop) ─► export
//! ```

mod causal_lm;
mod classify;
pub(crate) mod cores;
mod dpo;
mod estimate;
mod export;
pub mod graders;
mod image_classify;
mod masked_lm;
pub mod memory;
pub mod metrics;
pub mod optim;
#[cfg(feature = "cuda")]
mod optim_cuda;
mod rft;
pub mod schedule;
pub mod spec;
mod trainer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Device;
use serde::Serialize;
use serde_json::Value;

use crate::data::{self, DatasetFormat};
pub(crate) use causal_lm::is_decoder_dir;
pub use estimate::{Estimate, estimate};
pub use spec::{HyperparameterError, HyperparameterRequest, Hyperparameters, Strategy};
pub use trainer::CHECKPOINT_MODEL_DIR;

/// One training run, described with plain values.
#[derive(Debug, Clone)]
pub struct TrainingJob {
    /// Base model directory in Hugging Face layout.
    pub base_model: PathBuf,
    pub training_file: PathBuf,
    /// Without one, a stratified tenth of the training data is held out.
    pub validation_file: Option<PathBuf>,
    pub hyperparameters: HyperparameterRequest,
    pub seed: u64,
    /// Checkpoints go to `work_dir/checkpoints`.
    pub work_dir: PathBuf,
    /// Where the finished model is written (Hugging Face layout).
    pub model_dir: PathBuf,
    /// Reinforcement fine-tuning's grader object (OpenAI's shape), as the job gave it.
    pub grader: Option<Value>,
    /// Where base models are, for graders that run a model (`score_model`, `label_model`).
    pub models_dir: Option<PathBuf>,
    /// A checkpoint directory to continue from.
    pub resume_from: Option<PathBuf>,
    pub device: Device,
}

/// What a stop request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// Stop now; the run is over (cancellation).
    Cancel,
    /// Write a checkpoint, then stop (pause, shutdown): the run resumes later.
    CheckpointAndStop,
}

/// The flag a run checks before every step. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicU8>);

impl StopSignal {
    pub fn request(&self, what: StopRequest) {
        let code = match what {
            StopRequest::Cancel => 1,
            StopRequest::CheckpointAndStop => 2,
        };
        // A cancel wins over a pause that came first.
        self.0.fetch_max(code, Ordering::SeqCst);
    }

    pub fn requested(&self) -> Option<StopRequest> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            2 => Some(StopRequest::CheckpointAndStop),
            _ => Some(StopRequest::Cancel),
        }
    }
}

/// Progress after one optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepProgress {
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epochs done (1.5 = half way through the second).
    pub epoch: f64,
    pub train_loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub examples_per_second: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    pub trained_tokens: u64,
    /// Task-specific figures of this step (reinforcement: `train_reward_mean`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// Validation figures at a step.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub step: u64,
    pub epoch: f64,
    /// `valid_loss`, `valid_accuracy`, `valid_macro_f1`, ... (DESIGN.md's metric names).
    pub metrics: BTreeMap<String, f64>,
    /// Per-class figures, confusion matrix, labels.
    pub details: Value,
}

/// A checkpoint written to disk. Observers that keep checkpoints elsewhere must copy it
/// before returning: the engine keeps only the newest one locally.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    pub step: u64,
    pub epoch: u32,
    pub dir: PathBuf,
    /// The latest validation metrics at this step (empty before the first evaluation).
    pub metrics: BTreeMap<String, f64>,
}

/// Everything a run reports while it works.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// A handful of events per step: the Started variant's size costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
pub enum TrainEvent {
    Started {
        task: &'static str,
        hyperparameters: Hyperparameters,
        /// One line per value kiln chose ("n_epochs = 10 (180 training examples)").
        notes: Vec<String>,
        train_examples: usize,
        valid_examples: usize,
        total_steps: u64,
        labels: Vec<String>,
        /// Tokens in one pass over the training examples (after truncation to max_length).
        train_tokens: u64,
    },
    /// Something a person should read (choices made, truncation, early stopping).
    Message {
        text: String,
    },
    Step(StepProgress),
    Evaluated(Evaluation),
    Checkpoint(CheckpointInfo),
}

/// A finished run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub task: &'static str,
    /// The exported model (Hugging Face layout).
    pub model_dir: PathBuf,
    pub hyperparameters: Hyperparameters,
    pub steps: u64,
    /// The step whose weights were exported (the best by the selected metric).
    pub selected_step: Option<u64>,
    /// Validation metrics of the exported weights.
    pub metrics: BTreeMap<String, f64>,
    pub details: Value,
    /// Metrics before any training (domain adaptation reports before and after).
    pub baseline_metrics: Option<BTreeMap<String, f64>>,
    pub trained_tokens: u64,
    pub train_examples_per_second: f64,
    pub labels: Vec<String>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum TrainOutcome {
    Finished(Box<TrainSummary>),
    /// Stopped on request; `checkpoint` is set when one was written to resume from.
    Stopped {
        step: u64,
        checkpoint: Option<PathBuf>,
    },
}

/// A run that failed. [`TrainError::is_user_error`] separates the user's mistakes (no
/// retry) from faults of the machine (retry elsewhere).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("hyperparameter {0}")]
    Hyperparameter(#[from] HyperparameterError),
    #[error("model: {0}")]
    Model(#[from] crate::nn::NnError),
    #[error("the loss became NaN or infinite at step {step}; lower the learning rate")]
    Diverged { step: u64 },
    #[error("checkpoint {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Io(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("optimizer: {0}")]
    Optimizer(#[from] optim::OptimError),
}

impl TrainEvent {
    pub(crate) fn message(text: impl Into<String>) -> TrainEvent {
        TrainEvent::Message { text: text.into() }
    }
}

/// Whether an error's text says the device ran out of memory (see
/// [`TrainError::is_out_of_memory`]).
pub(crate) fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_uppercase();
    m.contains("OUT_OF_MEMORY") || m.contains("OUT OF MEMORY") || m.contains("ALLOC_FAILED")
}

impl TrainError {
    /// Whether the device ran out of memory: CUDA's allocator (`CUDA_ERROR_OUT_OF_MEMORY`) or
    /// cuBLAS failing to allocate its workspace.
    pub fn is_out_of_memory(&self) -> bool {
        is_out_of_memory(&self.to_string())
    }

    /// True when retrying cannot help: the data, the settings or the model are wrong.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            TrainError::Data(_)
                | TrainError::Hyperparameter(_)
                | TrainError::Model(_)
                | TrainError::Diverged { .. }
        )
    }
}

impl From<data::text::TextDataError> for TrainError {
    fn from(e: data::text::TextDataError) -> Self {
        match e {
            data::text::TextDataError::Io { .. } => TrainError::Io(e.to_string()),
            other => TrainError::Data(other.to_string()),
        }
    }
}

/// A base encoder's config, typed for building the model and raw for the export (which
/// keeps every key the base had).
pub(crate) fn read_base_config(
    dir: &Path,
) -> Result<(crate::nn::bert::BertConfig, Value), TrainError> {
    let path = dir.join("config.json");
    let config = crate::nn::bert::BertConfig::from_file(&path)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let raw = serde_json::from_str(&text)
        .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
    Ok((config, raw))
}

/// What resolving `"auto"` hyperparameters needs to know: the model's depth and longest
/// sequence, and how long the training texts are in its tokens (untruncated).
pub(crate) fn resolve_context(
    config: &crate::nn::bert::BertConfig,
    model_dir: &Path,
    texts: &[&str],
    device: &candle_core::Device,
) -> Result<spec::ResolveContext, TrainError> {
    let lengths = data::text::TextTokenizer::load(model_dir, usize::MAX)?.lengths(texts)?;
    // RoBERTa-style positions start after the padding id.
    let offset = if config.roberta_positions() {
        config.pad_token_id as usize + 1
    } else {
        0
    };
    Ok(spec::ResolveContext {
        train_examples: texts.len(),
        num_layers: config.num_hidden_layers,
        max_positions: config.max_position_embeddings.saturating_sub(offset),
        p99_tokens: data::text::length_quantile(&lengths, 0.99),
        decoder: false,
        vision: false,
        bf16_native: crate::device::supports_bf16(device),
    })
}

/// The training-file format, as the validator detects it.
pub fn detect_format(path: &Path) -> Result<DatasetFormat, TrainError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = data::validate_dataset(path, &name)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    if !report.is_valid() {
        return Err(TrainError::Data(format!(
            "{}: {}",
            path.display(),
            report.summary()
        )));
    }
    report
        .format
        .ok_or_else(|| TrainError::Data(format!("{}: no recognisable examples", path.display())))
}

/// Runs a job to completion, to a stop request, or to an error. Call it on a thread of its
/// own: it computes for as long as training takes.
pub fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let format = detect_format(&job.training_file)?;
    if crate::nn::vision::vision_family(&job.base_model).is_some() {
        return match format {
            DatasetFormat::ImageClassification => image_classify::run(job, on_event, stop),
            other => Err(TrainError::Data(format!(
                "{} data ({}) cannot train an image model; use image+label lines or a zip with one folder per class",
                other.as_str(),
                other.task()
            ))),
        };
    }
    if causal_lm::is_decoder_dir(&job.base_model) {
        return match format {
            DatasetFormat::Chat | DatasetFormat::PromptCompletion | DatasetFormat::DomainText => {
                causal_lm::run(job, on_event, stop)
            }
            DatasetFormat::Preference => dpo::run(job, on_event, stop),
            DatasetFormat::Reinforcement => rft::run(job, on_event, stop),
            other => Err(TrainError::Data(format!(
                "{} data ({}) cannot train a decoder in this version of kiln; use chat, prompt/completion, preference, reinforcement or domain text",
                other.as_str(),
                other.task()
            ))),
        };
    }
    match format {
        DatasetFormat::TextClassification | DatasetFormat::MultiLabelClassification => {
            classify::run(job, on_event, stop)
        }
        DatasetFormat::DomainText => masked_lm::run(job, on_event, stop),
        other => Err(TrainError::Data(format!(
            "{} data ({}) cannot train a BERT-style encoder; use text classification or domain text",
            other.as_str(),
            other.task()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_told_apart_from_other_engine_errors() {
        for text in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cublas: CUBLAS_STATUS_ALLOC_FAILED",
            "CUDA out of memory",
        ] {
            assert!(is_out_of_memory(text), "{text}");
            assert!(TrainError::Io(text.into()).is_out_of_memory(), "{text}");
        }
        for text in ["shape mismatch in matmul", "the loss became NaN", ""] {
            assert!(!is_out_of_memory(text), "{text}");
        }
    }
}
