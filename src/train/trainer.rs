//! The training loop every task shares: epochs over a seeded order, gradient accumulation,
//! clipping, the learning-rate schedule, evaluation, best-checkpoint selection, early
//! stopping, checkpoints that resume exactly, progress events, and stopping on request.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::optim::{AdamW, AdamWConfig, split_decay};
use super::schedule::lr_factor;
use super::spec::{Hyperparameters, higher_is_better};
use super::{
    CheckpointInfo, Evaluation, StepProgress, StopRequest, StopSignal, TrainError, TrainEvent,
    TrainOutcome, TrainSummary, TrainingJob,
};
use crate::nn::layers::{seed_dropout, unseed_dropout};

/// Validation metrics (`valid_*`) and their details (confusion matrix, per-class figures).
pub(crate) type ValidationResult = (BTreeMap<String, f64>, Value);

/// A trainable group of variables sharing a learning rate.
pub(crate) struct VarGroup {
    pub name: &'static str,
    pub lr: f64,
    pub vars: Vec<(String, Var)>,
}

/// What the loop needs from a task (a model plus its data).
pub(crate) trait Task {
    /// Training examples (the loop shuffles their indices).
    fn train_len(&self) -> usize;
    /// The variables that train, by learning-rate group.
    fn groups(&self, hp: &Hyperparameters) -> Vec<VarGroup>;
    /// Mean loss over the training examples `batch` at optimizer step `step` (tasks that draw
    /// random numbers, such as masking, seed them from it), with dropout on, and the number
    /// of real tokens in the batch.
    fn loss(&mut self, batch: &[usize], step: u64) -> Result<(Tensor, usize), TrainError>;
    /// Validation metrics (`valid_*`) and details (confusion matrix, per-class figures), no
    /// gradients. None when there is no validation data.
    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError>;
    /// Writes the finished model in Hugging Face layout.
    fn export(&mut self, dir: &Path) -> Result<(), TrainError>;
    /// Task-specific figures of the last optimizer step (reinforcement: reward, its spread,
    /// KL), reported with the step.
    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// State that training changes without the optimizer (BatchNorm running statistics):
    /// checkpointed, restored on resume and kept with the best weights like the variables.
    fn buffers(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// A hint that `batch` comes next, at optimizer step `step`: tasks with costly input
    /// preparation (image decoding and augmentation) start it in the background.
    fn prefetch(&mut self, _batch: &[usize], _step: u64) {}
}

/// The subdirectory of a checkpoint holding the model as of that step.
pub const CHECKPOINT_MODEL_DIR: &str = "model";

/// Loop position and history, saved in every checkpoint as `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LoopState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Current epoch (0-based) and the next micro-batch in it.
    pub epoch: u32,
    pub next_batch: usize,
    pub trained_tokens: u64,
    pub best: Option<Best>,
    /// Evaluations since the selected metric last improved (early stopping).
    pub evals_without_improvement: u32,
    /// The last evaluation's metrics.
    pub last_metrics: Option<BTreeMap<String, f64>>,
    pub last_details: Option<Value>,
    /// Training-set example count the run started with (a resumed run must see the same data).
    pub train_examples: usize,
}

/// The best evaluation so far by the selected metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Best {
    pub step: u64,
    pub value: f64,
    pub metrics: BTreeMap<String, f64>,
    pub details: Value,
}

/// How a loop run ended.
pub(crate) enum LoopEnd {
    Finished {
        state: LoopState,
        examples_per_second: f64,
    },
    Stopped {
        step: u64,
        checkpoint: Option<PathBuf>,
    },
}

pub(crate) struct Trainer<'a> {
    pub hp: &'a Hyperparameters,
    pub seed: u64,
    pub work_dir: &'a Path,
    pub on_event: &'a mut dyn FnMut(&TrainEvent),
    pub stop: &'a StopSignal,
}

/// One sample of the throughput meter.
struct Timing {
    started: Instant,
    examples: u64,
    tokens: u64,
}

/// Optimizer steps in one epoch over `train_len` examples.
pub(crate) fn steps_per_epoch(hp: &Hyperparameters, train_len: usize) -> u64 {
    let micro = train_len.div_ceil(hp.batch_size as usize);
    micro.div_ceil(hp.gradient_accumulation_steps as usize) as u64
}

/// Optimizer steps of the whole run.
pub(crate) fn total_steps(hp: &Hyperparameters, train_len: usize) -> u64 {
    steps_per_epoch(hp, train_len) * u64::from(hp.n_epochs)
}

impl Trainer<'_> {
    /// Runs (or resumes) the loop to the end, to early stopping, or to a stop request.
    pub fn run(
        &mut self,
        task: &mut dyn Task,
        resume: Option<&Path>,
    ) -> Result<LoopEnd, TrainError> {
        let hp = self.hp;
        let n = task.train_len();
        let total_steps = total_steps(hp, n);
        let warmup = (total_steps as f64 * hp.warmup_ratio).round() as usize;

        let groups = task.groups(hp);
        let mut optimizer = AdamW::new(AdamWConfig::default());
        let mut group_lrs = Vec::new();
        let mut all_vars: Vec<(String, Var)> = Vec::new();
        for g in groups {
            let (decay, no_decay) = split_decay(&g.vars);
            for (suffix, vars, wd) in [
                ("decay", decay, hp.weight_decay),
                ("no_decay", no_decay, 0.0),
            ] {
                if vars.is_empty() {
                    continue;
                }
                all_vars.extend(vars.iter().cloned());
                optimizer.add_group(&format!("{}/{suffix}", g.name), g.lr, wd, vars)?;
                group_lrs.push(g.lr);
            }
        }

        // What checkpoints and the best-weights snapshot keep: the variables and the buffers.
        let mut kept_vars = all_vars.clone();
        kept_vars.extend(task.buffers());
        let mut state = LoopState {
            train_examples: n,
            ..LoopState::default()
        };
        let mut best_weights: Option<HashMap<String, Tensor>> = None;
        if let Some(dir) = resume {
            let (s, best) = load_checkpoint(dir, &kept_vars, &mut optimizer)?;
            if s.train_examples != n {
                return Err(TrainError::Data(format!(
                    "the checkpoint was trained on {} examples but the data now has {n}",
                    s.train_examples
                )));
            }
            (self.on_event)(&TrainEvent::message(format!(
                "Resumed from the checkpoint at step {} (epoch {}).",
                s.step,
                s.epoch + 1
            )));
            state = s;
            best_weights = best;
        }

        let mut timing = Timing {
            started: Instant::now(),
            examples: 0,
            tokens: 0,
        };
        let mut last_checkpoint: Option<PathBuf> = None;
        let mut stopped_early = false;
        let result = (|| -> Result<Option<LoopEnd>, TrainError> {
            while state.epoch < hp.n_epochs && !stopped_early {
                let epoch = state.epoch;
                let order = epoch_order(self.seed, epoch, n);
                let batches: Vec<&[usize]> = order.chunks(hp.batch_size as usize).collect();
                while state.epoch == epoch && state.next_batch < batches.len() {
                    if let Some(req) = self.stop.requested() {
                        let checkpoint = match req {
                            StopRequest::Cancel => None,
                            StopRequest::CheckpointAndStop => Some(self.checkpoint(
                                task,
                                &state,
                                &kept_vars,
                                &optimizer,
                                &best_weights,
                                &mut last_checkpoint,
                            )?),
                        };
                        return Ok(Some(LoopEnd::Stopped {
                            step: state.step,
                            checkpoint,
                        }));
                    }
                    // One optimizer step over up to `accumulation` micro-batches.
                    let micro = (hp.gradient_accumulation_steps as usize)
                        .min(batches.len() - state.next_batch);
                    seed_dropout(
                        self.seed
                            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            .wrapping_add(state.step),
                    );
                    let mut grads: Option<GradStore> = None;
                    let mut loss_sum = 0.0f64;
                    let mut examples = 0usize;
                    let mut tokens = 0usize;
                    for (j, batch) in batches[state.next_batch..state.next_batch + micro]
                        .iter()
                        .enumerate()
                    {
                        if let Some(next) = batches.get(state.next_batch + j + 1) {
                            let next_step = state.step + u64::from(j + 1 == micro);
                            task.prefetch(next, next_step);
                        }
                        let (loss, t) = task.loss(batch, state.step)?;
                        loss_sum += f64::from(loss.to_scalar::<f32>()?);
                        let g = crate::nn::backward(&(loss / micro as f64)?)?;
                        grads = Some(match grads {
                            None => g,
                            Some(acc) => add_grads(acc, g, &all_vars)?,
                        });
                        examples += batch.len();
                        tokens += t;
                    }
                    let train_loss = loss_sum / micro as f64;
                    if !train_loss.is_finite() {
                        return Err(TrainError::Diverged {
                            step: state.step + 1,
                        });
                    }
                    let grads = grads.ok_or_else(|| TrainError::Data("empty batch".into()))?;
                    let grad_norm = if hp.max_grad_norm > 0.0 {
                        optimizer.clip_grad_norm(&grads, hp.max_grad_norm)?
                    } else {
                        optimizer.grad_norm(&grads)?
                    };
                    let factor = lr_factor(
                        hp.lr_scheduler,
                        state.step as usize,
                        warmup,
                        total_steps as usize,
                    );
                    for (i, lr) in group_lrs.iter().enumerate() {
                        optimizer.set_lr(i, lr * factor)?;
                    }
                    optimizer.step(&grads)?;
                    drop(grads);
                    state.step += 1;
                    state.next_batch += micro;
                    state.trained_tokens += tokens as u64;
                    timing.examples += examples as u64;
                    timing.tokens += tokens as u64;

                    let elapsed = timing.started.elapsed().as_secs_f64().max(1e-9);
                    let steps_done_here = timing.examples as f64
                        / (hp.batch_size as f64 * hp.gradient_accumulation_steps as f64);
                    let secs_per_step = elapsed / steps_done_here.max(1e-9);
                    let epoch_progress =
                        state.epoch as f64 + state.next_batch as f64 / batches.len() as f64;
                    (self.on_event)(&TrainEvent::Step(StepProgress {
                        step: state.step,
                        total_steps,
                        epoch: epoch_progress,
                        train_loss,
                        learning_rate: group_lrs.first().copied().unwrap_or(0.0) * factor,
                        grad_norm,
                        examples_per_second: timing.examples as f64 / elapsed,
                        tokens_per_second: timing.tokens as f64 / elapsed,
                        eta_seconds: (total_steps.saturating_sub(state.step)) as f64
                            * secs_per_step,
                        trained_tokens: state.trained_tokens,
                        extra: task.step_metrics(),
                    }));

                    let epoch_end = state.next_batch >= batches.len();
                    let eval_now = epoch_end
                        || hp
                            .eval_every_steps
                            .is_some_and(|k| state.step.is_multiple_of(u64::from(k)));
                    if eval_now
                        && self.evaluate(
                            task,
                            &mut state,
                            &kept_vars,
                            &mut best_weights,
                            epoch_progress,
                        )?
                    {
                        stopped_early = true;
                    }
                    let checkpoint_now = epoch_end
                        || stopped_early
                        || hp
                            .checkpoint_every_steps
                            .is_some_and(|k| state.step.is_multiple_of(u64::from(k)));
                    if epoch_end {
                        state.epoch += 1;
                        state.next_batch = 0;
                    }
                    if checkpoint_now {
                        self.checkpoint(
                            task,
                            &state,
                            &kept_vars,
                            &optimizer,
                            &best_weights,
                            &mut last_checkpoint,
                        )?;
                    }
                    if stopped_early {
                        (self.on_event)(&TrainEvent::message(format!(
                            "Early stopping: {} did not improve for {} evaluations.",
                            hp.select_metric, state.evals_without_improvement
                        )));
                        break;
                    }
                }
            }
            Ok(None)
        })();
        unseed_dropout();
        if let Some(end) = result? {
            return Ok(end);
        }
        // Finish on the best weights, if an evaluation ever chose some.
        if let Some(best) = &best_weights {
            for (name, var) in &kept_vars {
                if let Some(t) = best.get(name) {
                    var.set(t)?;
                }
            }
        }
        let elapsed = timing.started.elapsed().as_secs_f64().max(1e-9);
        Ok(LoopEnd::Finished {
            examples_per_second: timing.examples as f64 / elapsed,
            state,
        })
    }

    /// Evaluates, records the best, and says whether early stopping should end the run.
    fn evaluate(
        &mut self,
        task: &mut dyn Task,
        state: &mut LoopState,
        vars: &[(String, Var)],
        best_weights: &mut Option<HashMap<String, Tensor>>,
        epoch: f64,
    ) -> Result<bool, TrainError> {
        let Some((metrics, details)) = task.evaluate()? else {
            return Ok(false);
        };
        (self.on_event)(&TrainEvent::Evaluated(Evaluation {
            step: state.step,
            epoch,
            metrics: metrics.clone(),
            details: details.clone(),
        }));
        let metric = &self.hp.select_metric;
        let Some(&value) = metrics.get(metric) else {
            return Ok(false);
        };
        let improved = match &state.best {
            None => true,
            Some(b) if higher_is_better(metric) => value > b.value,
            Some(b) => value < b.value,
        };
        state.last_metrics = Some(metrics.clone());
        state.last_details = Some(details.clone());
        if improved {
            state.best = Some(Best {
                step: state.step,
                value,
                metrics,
                details,
            });
            state.evals_without_improvement = 0;
            let mut copy = HashMap::new();
            for (name, var) in vars {
                copy.insert(name.clone(), var.as_tensor().copy()?);
            }
            *best_weights = Some(copy);
        } else {
            state.evals_without_improvement += 1;
        }
        Ok(self
            .hp
            .early_stopping_patience
            .is_some_and(|p| state.evals_without_improvement >= p))
    }

    /// Saves what a resume needs (trainable variables, optimizer moments, loop position)
    /// plus the model as of this step in Hugging Face layout under `model/`, so every
    /// checkpoint can be served and downloaded like a finished model.
    fn checkpoint(
        &mut self,
        task: &mut dyn Task,
        state: &LoopState,
        vars: &[(String, Var)],
        optimizer: &AdamW,
        best: &Option<HashMap<String, Tensor>>,
        last: &mut Option<PathBuf>,
    ) -> Result<PathBuf, TrainError> {
        let dir = self
            .work_dir
            .join("checkpoints")
            .join(format!("step-{}", state.step));
        let partial = dir.with_extension("partial");
        let io = |e: std::io::Error| {
            TrainError::Io(format!("writing checkpoint {}: {e}", dir.display()))
        };
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io)?;
        }
        std::fs::create_dir_all(&partial).map_err(io)?;
        let current: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&current, partial.join("trainable.safetensors"))?;
        if let Some(best) = best {
            candle_core::safetensors::save(best, partial.join("best.safetensors"))?;
        }
        optimizer.save(&partial.join("optimizer.safetensors"))?;
        let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Io(e.to_string()))?;
        std::fs::write(partial.join("state.json"), json).map_err(io)?;
        task.export(&partial.join(CHECKPOINT_MODEL_DIR))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io)?;
        }
        std::fs::rename(&partial, &dir).map_err(io)?;
        (self.on_event)(&TrainEvent::Checkpoint(CheckpointInfo {
            step: state.step,
            epoch: state.epoch,
            dir: dir.clone(),
            metrics: state.last_metrics.clone().unwrap_or_default(),
        }));
        // The observer has persisted it by now (the worker uploads synchronously): keep only
        // the newest locally.
        if let Some(prev) = last.replace(dir.clone())
            && prev != dir
        {
            let _ = std::fs::remove_dir_all(prev);
        }
        Ok(dir)
    }
}

/// The training order of an epoch: a permutation that depends only on (seed, epoch), so a
/// resumed run continues in the same order.
pub(crate) fn epoch_order(seed: u64, epoch: u32, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        StdRng::seed_from_u64(seed ^ (u64::from(epoch) + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    order.shuffle(&mut rng);
    order
}

fn add_grads(
    mut acc: GradStore,
    g: GradStore,
    vars: &[(String, Var)],
) -> Result<GradStore, TrainError> {
    for (_, var) in vars {
        let t = var.as_tensor();
        if let Some(new) = g.get(t) {
            let sum = match acc.get(t) {
                Some(old) => (old + new)?,
                None => new.clone(),
            };
            acc.insert(t, sum);
        }
    }
    Ok(acc)
}

type Resumed = (LoopState, Option<HashMap<String, Tensor>>);

/// Restores variables, optimizer state and loop position from a checkpoint directory.
fn load_checkpoint(
    dir: &Path,
    vars: &[(String, Var)],
    optimizer: &mut AdamW,
) -> Result<Resumed, TrainError> {
    let bad = |what: String| TrainError::Checkpoint(format!("{}: {what}", dir.display()));
    let state: LoopState = serde_json::from_slice(
        &std::fs::read(dir.join("state.json")).map_err(|e| bad(e.to_string()))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let saved = candle_core::safetensors::load(dir.join("trainable.safetensors"), &device)?;
    for (name, var) in vars {
        let t = saved
            .get(name)
            .ok_or_else(|| bad(format!("no tensor {name}: a different model or strategy")))?;
        if t.dims() != var.dims() {
            return Err(bad(format!(
                "{name} has shape {:?}, the model {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(t)?;
    }
    optimizer.load(&dir.join("optimizer.safetensors"))?;
    let best_path = dir.join("best.safetensors");
    let best = if best_path.exists() {
        Some(candle_core::safetensors::load(best_path, &device)?)
    } else {
        None
    };
    Ok((state, best))
}

/// What a task adds to its run's summary.
pub(crate) struct SummaryParts {
    pub task: &'static str,
    /// Metrics before any training, when the task measures them.
    pub baseline_metrics: Option<BTreeMap<String, f64>>,
    pub labels: Vec<String>,
}

/// The end every task shares: runs (or resumes) the loop, exports the finished model to
/// `job.model_dir`, and reports the selected step's metrics, or the stop.
pub(crate) fn run_and_export(
    task: &mut dyn Task,
    job: &TrainingJob,
    hp: Hyperparameters,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
    parts: SummaryParts,
) -> Result<TrainOutcome, TrainError> {
    let mut trainer = Trainer {
        hp: &hp,
        seed: job.seed,
        work_dir: &job.work_dir,
        on_event,
        stop,
    };
    let (state, examples_per_second) = match trainer.run(task, job.resume_from.as_deref())? {
        LoopEnd::Stopped { step, checkpoint } => {
            return Ok(TrainOutcome::Stopped { step, checkpoint });
        }
        LoopEnd::Finished {
            state,
            examples_per_second,
        } => (state, examples_per_second),
    };
    let model_dir = job.model_dir.clone();
    task.export(&model_dir)?;
    let (metrics, details, selected_step) = match &state.best {
        Some(b) => (b.metrics.clone(), b.details.clone(), Some(b.step)),
        None => (
            state.last_metrics.clone().unwrap_or_default(),
            state.last_details.clone().unwrap_or(Value::Null),
            None,
        ),
    };
    Ok(TrainOutcome::Finished(Box::new(TrainSummary {
        task: parts.task,
        model_dir,
        hyperparameters: hp,
        steps: state.step,
        selected_step,
        metrics,
        details,
        baseline_metrics: parts.baseline_metrics,
        trained_tokens: state.trained_tokens,
        train_examples_per_second: examples_per_second,
        labels: parts.labels,
    })))
}

#[cfg(test)]
mod tests {
    use super::epoch_order;

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(1, 0, 100);
        assert_eq!(a, epoch_order(1, 0, 100));
        assert_ne!(a, epoch_order(1, 1, 100));
        assert_ne!(a, epoch_order(2, 0, 100));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
