//! Tiny models and data for engine tests: a random BERT with a word-level tokenizer, and a
//! sentiment-like task a model can only solve by reading the words.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln::nn::bert::BertConfig;
use kiln::nn::tiny::{TinyLayout, tiny_bert_config, write_tiny_bert_with, write_tiny_tokenizer};
use kiln::train::{StopSignal, TrainEvent, TrainOutcome, TrainSummary, TrainingJob};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

pub const POSITIVE: [&str; 6] = ["good", "great", "excellent", "love", "wonderful", "fine"];
pub const NEGATIVE: [&str; 6] = ["bad", "awful", "terrible", "hate", "poor", "boring"];
pub const FILLER: [&str; 12] = [
    "the", "movie", "film", "plot", "actors", "was", "is", "really", "quite", "story", "a", "this",
];

/// The tiny config with some dropout, so tests exercise seeded dropout.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        ..tiny_bert_config()
    }
}

/// Writes a tiny BERT (weights, config, tokenizer) into `dir`.
pub fn tiny_model(dir: &Path, layout: TinyLayout) -> PathBuf {
    let words: Vec<&str> = POSITIVE
        .iter()
        .chain(&NEGATIVE)
        .chain(&FILLER)
        .copied()
        .collect();
    write_tiny_bert_with(dir, &tiny_config(), 7, layout).unwrap();
    write_tiny_tokenizer(dir, &words).unwrap();
    dir.to_owned()
}

fn sentence(rng: &mut StdRng, positive: bool) -> String {
    let mut words: Vec<&str> = (0..rng.random_range(4..8))
        .map(|_| *FILLER.choose(rng).unwrap())
        .collect();
    let pool = if positive { &POSITIVE } else { &NEGATIVE };
    let at = rng.random_range(0..=words.len());
    words.insert(at, pool.choose(rng).unwrap());
    words.join(" ")
}

/// `n` single-label lines, balanced.
pub fn sentiment_jsonl(path: &Path, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let positive = i % 2 == 0;
            json!({"text": sentence(&mut rng, positive), "label": if positive { "positive" } else { "negative" }}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `n` multi-label lines: which of the two sentiment word groups appear.
pub fn multi_label_jsonl(path: &Path, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let (p, q) = (i % 4 == 0 || i % 4 == 1, i % 4 == 1 || i % 4 == 2);
            let mut words: Vec<&str> = (0..5).map(|_| *FILLER.choose(&mut rng).unwrap()).collect();
            let mut labels = Vec::new();
            if p {
                words.push(POSITIVE.choose(&mut rng).unwrap());
                labels.push("praise");
            }
            if q {
                words.push(NEGATIVE.choose(&mut rng).unwrap());
                labels.push("complaint");
            }
            if labels.is_empty() {
                labels.push("neutral");
            }
            json!({"text": words.join(" "), "labels": labels}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Unlabelled domain text.
pub fn domain_jsonl(path: &Path, n: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lines: Vec<String> = (0..n)
        .map(|i| json!({"text": sentence(&mut rng, i % 2 == 0)}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

pub struct Run {
    pub outcome: TrainOutcome,
    pub events: Vec<TrainEvent>,
}

impl Run {
    pub fn summary(&self) -> &TrainSummary {
        match &self.outcome {
            TrainOutcome::Finished(s) => s,
            TrainOutcome::Stopped { step, .. } => panic!("stopped at step {step}"),
        }
    }

    /// Training loss of every step, in order.
    pub fn losses(&self) -> Vec<(u64, f64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Step(p) => Some((p.step, p.train_loss)),
                _ => None,
            })
            .collect()
    }
}

pub fn job(
    model: &Path,
    train: &Path,
    valid: Option<&Path>,
    work: &Path,
    hp: serde_json::Value,
    seed: u64,
) -> TrainingJob {
    TrainingJob {
        base_model: model.to_owned(),
        training_file: train.to_owned(),
        validation_file: valid.map(Path::to_owned),
        hyperparameters: serde_json::from_value(hp).unwrap(),
        seed,
        work_dir: work.join("work"),
        model_dir: work.join("model"),
        grader: None,
        models_dir: None,
        resume_from: None,
        device: candle_core::Device::Cpu,
    }
}

/// Runs a job, collecting its events; `on_step` may request a stop.
pub fn run_with(job: &TrainingJob, mut on_step: impl FnMut(u64, &StopSignal)) -> Run {
    let stop = StopSignal::default();
    let mut events = Vec::new();
    let mut on_event = |e: &TrainEvent| {
        if let TrainEvent::Step(p) = e {
            on_step(p.step, &stop);
        }
        events.push(e.clone());
    };
    let outcome = kiln::train::run(job, &mut on_event, &stop).unwrap();
    Run { outcome, events }
}

pub fn run(job: &TrainingJob) -> Run {
    run_with(job, |_, _| {})
}
