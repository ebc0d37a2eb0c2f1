//! The boundary between the worker and a training engine: a small synchronous trait called
//! on a dedicated OS thread, the job spec it receives and the context it reports through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

/// Named metric values (`train_loss`, `valid_loss`, `valid_accuracy`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// Runs fine-tuning jobs. kiln calls it on a dedicated OS thread, never on the async runtime.
pub trait JobExecutor: Send + Sync + 'static {
    /// Runs one attempt of a job until it succeeds, fails, or stops because
    /// [`JobContext::should_stop`] said so. When resuming (`job.resume` is set) it continues
    /// from that checkpoint's state. On a `Pause` or `Shutdown` stop it saves a checkpoint
    /// first, then returns [`JobFailure::Stopped`].
    fn execute(&self, job: &JobSpec, ctx: &mut JobContext) -> Result<JobOutcome, JobFailure>;
}

/// Everything an attempt needs, resolved to local paths.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `ftjob-…`
    pub id: String,
    /// The model as requested (a base id, or an `ft:` id).
    pub model: String,
    /// Local directory of the weights to start from (Hugging Face layout).
    pub model_dir: PathBuf,
    /// The training file, local.
    pub training_file: PathBuf,
    /// The validation file, local.
    pub validation_file: Option<PathBuf>,
    /// The training file's detected format (`text_classification`, `chat`, ...).
    pub training_format: String,
    /// `supervised`, `dpo` or `reinforcement`.
    pub method: String,
    /// `method.<type>` as stored: its `hyperparameters` (every knob, `"auto"` where the
    /// engine decides) and method-specific settings such as a grader.
    pub method_config: Value,
    /// The base models directory (model graders name base models by id).
    pub models_dir: std::path::PathBuf,
    /// `method.<type>.hyperparameters`.
    pub hyperparameters: Map<String, Value>,
    /// Random seed.
    pub seed: u64,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    /// The checkpoint to resume from, if an earlier attempt saved one.
    pub resume: Option<ResumeFrom>,
    /// The device of the slot that runs this attempt (`KILN_DEVICES`).
    pub device: SlotDevice,
}

/// A device a worker slot trains on: its `KILN_DEVICES` name and the opened candle device.
#[derive(Debug, Clone)]
pub struct SlotDevice {
    pub spec: crate::device::DeviceSpec,
    pub device: candle_core::Device,
    /// Memory the jobs on this device may need together (`KILN_DEVICE_MEMORY`, or a GPU's
    /// size); `None`: no limit.
    pub memory_bytes: Option<u64>,
}

impl SlotDevice {
    pub fn cpu() -> SlotDevice {
        SlotDevice {
            spec: crate::device::DeviceSpec::Cpu,
            device: candle_core::Device::Cpu,
            memory_bytes: None,
        }
    }
}

/// A checkpoint to continue from.
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    /// The step it was saved at.
    pub step: u64,
    /// Its files, local.
    pub dir: PathBuf,
    /// The metrics recorded with it.
    pub metrics: Metrics,
}

/// A successful attempt's result.
#[derive(Debug, Clone, Default)]
pub struct JobOutcome {
    /// Tokens processed, when the engine counts them.
    pub trained_tokens: Option<u64>,
    /// The selected checkpoint's (or the final) metrics.
    pub metrics: Metrics,
    /// The fine-tuned model's files (a directory the executor wrote, e.g. under
    /// [`JobContext::scratch_dir`]); kiln moves it into the artifact store.
    pub model_dir: Option<PathBuf>,
    /// What the model is, for the models API: `{"task": ..., "labels": [...]}`.
    pub model_info: Option<serde_json::Value>,
}

/// Why an attempt did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobFailure {
    /// The job itself is wrong (bad data, unknown architecture, out of memory at the requested
    /// batch size): fails at once, no retry. The message is shown to the user.
    #[error("{0}")]
    UserError(String),
    /// The machine or a dependency failed: retried with backoff while attempts remain.
    #[error("{0}")]
    Infrastructure(String),
    /// The attempt stopped because [`JobContext::should_stop`] asked it to.
    #[error("stopped: {0:?}")]
    Stopped(StopReason),
}

/// Why an attempt is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopReason {
    /// The user paused the job: checkpoint, then stop.
    Pause = 1,
    /// This process is shutting down: checkpoint, then stop; the job is requeued.
    Shutdown = 2,
    /// The user cancelled the job: stop at once.
    Cancel = 3,
    /// The job was taken away (lease expired): stop at once, write nothing.
    LeaseLost = 4,
}

impl StopReason {
    fn from_u8(v: u8) -> Option<StopReason> {
        match v {
            1 => Some(StopReason::Pause),
            2 => Some(StopReason::Shutdown),
            3 => Some(StopReason::Cancel),
            4 => Some(StopReason::LeaseLost),
            _ => None,
        }
    }
}

/// A stop flag shared by the worker and the training thread; the most severe reason wins.
#[derive(Debug, Default)]
pub(crate) struct StopFlag(AtomicU8);

impl StopFlag {
    pub(crate) fn raise(&self, reason: StopReason) {
        self.0.fetch_max(reason as u8, Ordering::SeqCst);
    }

    pub(crate) fn get(&self) -> Option<StopReason> {
        StopReason::from_u8(self.0.load(Ordering::SeqCst))
    }
}

/// Training progress at one step; becomes a `metrics` event.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Optimizer steps done (1-based).
    pub step: u64,
    /// Steps the job will take in all.
    pub total_steps: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Throughput, when known.
    pub examples_per_second: Option<f64>,
    /// `train_loss`, and validation figures on evaluation steps.
    pub metrics: Metrics,
}

/// Event levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal progress.
    Info,
    /// Something the user should know.
    Warn,
    /// Something went wrong.
    Error,
}

/// What the training thread sends to the worker's async side, in order.
pub(crate) enum Report {
    Progress(Progress, Option<f64>),
    Message(Level, String),
    Hyperparameters(Map<String, Value>),
    Checkpoint {
        step: u64,
        metrics: Metrics,
        dir: PathBuf,
        done: oneshot::Sender<Result<(), JobFailure>>,
    },
}

/// The executor's line to kiln: progress, messages, checkpoints, and whether to stop.
pub struct JobContext {
    stop: Arc<StopFlag>,
    reports: mpsc::UnboundedSender<Report>,
    scratch: PathBuf,
    first_report: Option<(Instant, u64)>,
}

impl JobContext {
    pub(crate) fn new(
        stop: Arc<StopFlag>,
        reports: mpsc::UnboundedSender<Report>,
        scratch: PathBuf,
    ) -> JobContext {
        JobContext {
            stop,
            reports,
            scratch,
            first_report: None,
        }
    }

    /// Whether to stop, and why. Check it every step: a cancel must take effect within
    /// seconds.
    pub fn should_stop(&self) -> Option<StopReason> {
        self.stop.get()
    }

    /// Reports one step's progress and metrics (a `metrics` event; the job's `progress`).
    pub fn report_progress(&mut self, progress: Progress) {
        let now = Instant::now();
        let (t0, s0) = *self.first_report.get_or_insert((now, progress.step));
        let eta = if progress.step > s0 && progress.total_steps >= progress.step {
            let per_step = now.duration_since(t0).as_secs_f64() / (progress.step - s0) as f64;
            Some(per_step * (progress.total_steps - progress.step) as f64)
        } else {
            None
        };
        let _ = self.reports.send(Report::Progress(progress, eta));
    }

    /// Adds a `message` event.
    pub fn log(&mut self, level: Level, message: impl Into<String>) {
        let _ = self.reports.send(Report::Message(level, message.into()));
    }

    /// Records the hyperparameter values actually used (e.g. what `"auto"` resolved to);
    /// they are merged into the job's `method.<type>.hyperparameters`.
    pub fn record_hyperparameters(&mut self, values: Map<String, Value>) {
        let _ = self.reports.send(Report::Hyperparameters(values));
    }

    /// Saves a checkpoint: `write` fills a fresh local directory, which kiln then stores in
    /// the artifact store and records (fenced by this attempt). Blocks until recorded.
    /// An error means the attempt must stop (`Stopped(LeaseLost)`) or could not store it.
    pub fn save_checkpoint(
        &mut self,
        step: u64,
        metrics: &Metrics,
        write: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), JobFailure> {
        if self.stop.get() == Some(StopReason::LeaseLost) {
            return Err(JobFailure::Stopped(StopReason::LeaseLost));
        }
        let dir = self.scratch.join(format!(
            "checkpoint-{step}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let prepared = std::fs::create_dir_all(&dir).and_then(|()| write(&dir));
        if let Err(e) = prepared {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(JobFailure::Infrastructure(format!(
                "could not write checkpoint at step {step}: {e}"
            )));
        }
        let (done, wait) = oneshot::channel();
        let sent = self.reports.send(Report::Checkpoint {
            step,
            metrics: metrics.clone(),
            dir,
            done,
        });
        if sent.is_err() {
            return Err(JobFailure::Stopped(StopReason::LeaseLost));
        }
        wait.blocking_recv()
            .unwrap_or(Err(JobFailure::Stopped(StopReason::LeaseLost)))
    }

    /// A private local directory for this attempt (removed after it), e.g. for the final
    /// model before kiln stores it.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }
}
