//! What a run would do and how long it would take, measured rather than guessed: the real
//! pipeline (data, tokenizer, model, `"auto"` resolution) runs, then a few real optimizer
//! steps on this machine are timed and the run is cancelled. Nothing is kept.

use std::time::Instant;

use serde::Serialize;

use super::{
    Hyperparameters, StopRequest, StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob,
};

/// The plan and the measured cost of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub task: &'static str,
    /// Every `"auto"` resolved.
    pub hyperparameters: Hyperparameters,
    /// One line per value kiln chose.
    pub notes: Vec<String>,
    pub train_examples: usize,
    pub valid_examples: usize,
    pub labels: Vec<String>,
    pub total_steps: u64,
    /// Tokens per pass over the training data, and over the whole run.
    pub train_tokens_per_epoch: u64,
    pub trained_tokens: u64,
    /// Steps timed (after one warm-up step), and their mean.
    pub measured_steps: u64,
    pub seconds_per_step: f64,
    /// Loading, tokenising (and for `head_only` the feature cache) before the first step.
    pub setup_seconds: f64,
    /// The evaluations the run would make and their estimated total time.
    pub evaluations: u64,
    pub evaluation_seconds: f64,
    /// setup + steps + evaluations.
    pub estimated_seconds: f64,
    /// True when the run was short enough to finish during the measurement: the estimate is
    /// then the measured duration itself.
    pub ran_to_completion: bool,
}

/// What the run's `Started` event said.
struct Plan {
    task: &'static str,
    hp: Hyperparameters,
    notes: Vec<String>,
    train_examples: usize,
    valid_examples: usize,
    total_steps: u64,
    labels: Vec<String>,
    train_tokens: u64,
}

/// Forward-only evaluation costs about a third of a training step per example.
const EVAL_COST: f64 = 1.0 / 3.0;

/// Runs `job` for `probe_steps` timed steps (plus a warm-up step) and extrapolates.
pub fn estimate(job: &TrainingJob, probe_steps: u64) -> Result<Estimate, TrainError> {
    let probe_steps = probe_steps.max(1);
    let started = Instant::now();
    let stop = StopSignal::default();
    let mut plan: Option<Plan> = None;
    let mut first_step: Option<Instant> = None;
    let mut last_step: Option<Instant> = None;
    let mut timed: Vec<f64> = Vec::new();
    // Set when something other than a step (an evaluation, a checkpoint) happened since the
    // previous step: that interval is not a step's time.
    let mut interrupted = false;
    let mut evaluation_times: Vec<f64> = Vec::new();
    let mut on_event = |event: &TrainEvent| match event {
        TrainEvent::Started {
            task,
            hyperparameters,
            notes,
            train_examples,
            valid_examples,
            total_steps,
            labels,
            train_tokens,
        } => {
            plan = Some(Plan {
                task,
                hp: hyperparameters.clone(),
                notes: notes.clone(),
                train_examples: *train_examples,
                valid_examples: *valid_examples,
                total_steps: *total_steps,
                labels: labels.clone(),
                train_tokens: *train_tokens,
            });
        }
        TrainEvent::Step(_) => {
            let now = Instant::now();
            match last_step {
                None => first_step = Some(now),
                Some(prev) if !interrupted => timed.push((now - prev).as_secs_f64()),
                Some(_) => {}
            }
            interrupted = false;
            last_step = Some(now);
            if timed.len() as u64 >= probe_steps {
                stop.request(StopRequest::Cancel);
            }
        }
        TrainEvent::Evaluated(_) => {
            if let Some(prev) = last_step {
                evaluation_times.push(prev.elapsed().as_secs_f64());
            }
            interrupted = true;
        }
        TrainEvent::Checkpoint(_) => interrupted = true,
        TrainEvent::Message { .. } => {}
    };
    let outcome = super::run(job, &mut on_event, &stop)?;
    let total_elapsed = started.elapsed().as_secs_f64();
    let Some(Plan {
        task,
        hp,
        notes,
        train_examples,
        valid_examples,
        total_steps,
        labels,
        train_tokens,
    }) = plan
    else {
        return Err(TrainError::Data(
            "the run stopped before it started training".into(),
        ));
    };
    let setup_seconds = first_step.map_or(total_elapsed, |t| (t - started).as_secs_f64());
    let seconds_per_step = if timed.is_empty() {
        // A single step, or every interval interrupted: fall back to the first step's time
        // (it includes warm-up, so this errs long).
        last_step.map_or(0.0, |_| (total_elapsed - setup_seconds).max(0.0))
    } else {
        timed.iter().sum::<f64>() / timed.len() as f64
    };
    let evaluations = u64::from(hp.n_epochs)
        + hp.eval_every_steps
            .map_or(0, |k| total_steps / u64::from(k.max(1)));
    let per_evaluation = if evaluation_times.is_empty() {
        let per_example =
            seconds_per_step / (hp.batch_size as f64 * hp.gradient_accumulation_steps as f64);
        valid_examples as f64 * per_example * EVAL_COST
    } else {
        evaluation_times.iter().sum::<f64>() / evaluation_times.len() as f64
    };
    let ran_to_completion = matches!(outcome, TrainOutcome::Finished(_));
    let (evaluation_seconds, estimated_seconds) = if ran_to_completion {
        (per_evaluation * evaluations as f64, total_elapsed)
    } else {
        let evaluation_seconds = per_evaluation * evaluations as f64;
        (
            evaluation_seconds,
            setup_seconds + seconds_per_step * total_steps as f64 + evaluation_seconds,
        )
    };
    Ok(Estimate {
        task,
        trained_tokens: train_tokens * u64::from(hp.n_epochs),
        hyperparameters: hp,
        notes,
        train_examples,
        valid_examples,
        labels,
        total_steps,
        train_tokens_per_epoch: train_tokens,
        measured_steps: timed.len() as u64,
        seconds_per_step,
        setup_seconds,
        evaluations,
        evaluation_seconds,
        estimated_seconds,
        ran_to_completion,
    })
}
