//! Direct preference optimisation (OpenAI's `dpo` method) for decoder LMs.
//!
//! `loss = -log σ(β · ((log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))))`, the
//! log-probabilities summed over each reply's tokens. The reference is the base model as
//! loaded: its log-probabilities are computed once, before the first step, and cached (the
//! policy starts equal to it: LoRA's `B` is zero, full fine-tuning starts from the same
//! weights). Metrics: loss, the reward margin `β · (…)` and how often it is positive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde_json::{Value, json};

use super::causal_lm::{export_decoder, load_options, read_decoder_config, token_logps};
use super::cores::map_on_cores;
use super::spec::{Hyperparameters, ResolveContext};
use super::trainer::{SummaryParts, Task, ValidationResult, VarGroup, run_and_export, total_steps};
use super::{StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob};
use crate::data::chat::{DecoderTokenizer, LmExample, read_preference_pairs};
use crate::data::text::length_quantile;
use crate::nn::decoder::Decoder;

const DEFAULT_BETA: f64 = 0.1;
const EVAL_BATCH: usize = 8;

/// One pair, tokenised, with the reference model's log-probabilities of both replies.
struct Pair {
    chosen: LmExample,
    rejected: LmExample,
    ref_chosen: f32,
    ref_rejected: f32,
}

struct Dpo {
    model: Decoder,
    _varmap: VarMap,
    train: Vec<Pair>,
    valid: Vec<Pair>,
    beta: f64,
    pad_id: u32,
    device: Device,
    config_json: Value,
    base_dir: PathBuf,
}

/// Summed log-probability of each row's trained tokens under `model`, `[rows]`.
fn sequence_logps(
    model: &Decoder,
    rows: &[&LmExample],
    pad_id: u32,
    device: &Device,
    train: bool,
) -> Result<Tensor, TrainError> {
    let (token_logp, owners) = token_logps(model, rows, pad_id, device, train)?;
    // Sum per row: a [rows, n] matrix of ones where the token belongs to the row.
    let n = owners.len();
    let mut owner = vec![0f32; rows.len() * n];
    for (i, &row) in owners.iter().enumerate() {
        owner[row * n + i] = 1.0;
    }
    let owner = Tensor::from_vec(owner, (rows.len(), n), device)?;
    Ok(owner.matmul(&token_logp.unsqueeze(1)?)?.squeeze(1)?)
}

impl Dpo {
    /// Mean loss of the pairs (a tensor, differentiable when `train`), and each pair's
    /// reward margin.
    fn pairs_loss(&self, pairs: &[&Pair], train: bool) -> Result<(Tensor, Vec<f32>), TrainError> {
        let k = pairs.len();
        let rows: Vec<&LmExample> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let logps = sequence_logps(&self.model, &rows, self.pad_id, &self.device, train)?;
        let chosen = logps.narrow(0, 0, k)?;
        let rejected = logps.narrow(0, k, k)?;
        let reference: Vec<f32> = pairs
            .iter()
            .map(|p| p.ref_chosen - p.ref_rejected)
            .collect();
        let reference = Tensor::from_vec(reference, k, &self.device)?;
        let margin = ((chosen - rejected)?.sub(&reference)? * self.beta)?;
        // -log σ(x) = softplus(-x) = relu(-x) + log(1 + exp(-|x|)), stable for any x.
        let neg = margin.neg()?;
        let loss = (neg.relu()? + (margin.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?;
        let margins = margin.detach().to_vec1::<f32>()?;
        Ok((loss, margins))
    }
}

impl Task for Dpo {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn groups(&self, hp: &Hyperparameters) -> Vec<VarGroup> {
        vec![VarGroup {
            name: "backbone",
            lr: hp.learning_rate,
            vars: self.model.named_trainable_vars().to_vec(),
        }]
    }

    fn loss(&mut self, batch: &[usize], _step: u64) -> Result<(Tensor, usize), TrainError> {
        let pairs: Vec<&Pair> = batch.iter().map(|&i| &self.train[i]).collect();
        let tokens = pairs
            .iter()
            .map(|p| p.chosen.ids.len() + p.rejected.ids.len())
            .sum();
        let (loss, _) = self.pairs_loss(&pairs, true)?;
        Ok((loss, tokens))
    }

    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        // The batches run side by side on the cores; their sums are added in order.
        let chunks: Vec<&[Pair]> = self.valid.chunks(EVAL_BATCH).collect();
        let parts = map_on_cores(&self.device, chunks.len(), |i| {
            let pairs: Vec<&Pair> = chunks[i].iter().collect();
            let (loss, m) = self.pairs_loss(&pairs, false)?;
            Ok::<_, TrainError>((f64::from(loss.to_scalar::<f32>()?) * pairs.len() as f64, m))
        })?;
        let (mut loss_sum, mut margins) = (0f64, Vec::new());
        for (l, m) in parts {
            loss_sum += l;
            margins.extend(m);
        }
        let n = margins.len().max(1) as f64;
        let mut metrics = BTreeMap::new();
        metrics.insert("valid_loss".to_owned(), loss_sum / n);
        metrics.insert(
            "valid_reward_margin".to_owned(),
            margins.iter().map(|&m| f64::from(m)).sum::<f64>() / n,
        );
        metrics.insert(
            "valid_reward_accuracy".to_owned(),
            margins.iter().filter(|&&m| m > 0.0).count() as f64 / n,
        );
        Ok(Some((metrics, json!({"pairs": margins.len()}))))
    }

    fn export(&mut self, dir: &Path) -> Result<(), TrainError> {
        export_decoder(&self.model, dir, &self.config_json, &self.base_dir)
    }
}

/// Tokenises the pairs and caches the reference log-probabilities of both replies.
fn encode_pairs(
    pairs: &[crate::data::chat::PreferencePair],
    tok: &DecoderTokenizer,
    model: &Decoder,
    max_length: usize,
    device: &Device,
) -> Result<(Vec<Pair>, usize), TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut truncated = 0;
    for (i, p) in pairs.iter().enumerate() {
        let encode = |preferred| {
            p.encode(tok, preferred)
                .map_err(|e| TrainError::Data(format!("pair {}: {e}", i + 1)))
        };
        let (mut chosen, mut rejected) = (encode(true)?, encode(false)?);
        let cut = chosen.truncate(max_length) | rejected.truncate(max_length);
        truncated += usize::from(cut);
        if chosen.trained_tokens() == 0 || rejected.trained_tokens() == 0 {
            return Err(TrainError::Data(format!(
                "pair {}: a reply does not fit in max_length = {max_length} tokens after its prompt",
                i + 1
            )));
        }
        out.push(Pair {
            chosen,
            rejected,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        });
    }
    // The reference pass: its batches run side by side on the cores.
    let chunks: Vec<&[Pair]> = out.chunks(EVAL_BATCH).collect();
    let logps = map_on_cores(device, chunks.len(), |i| {
        let rows: Vec<&LmExample> = chunks[i]
            .iter()
            .map(|p| &p.chosen)
            .chain(chunks[i].iter().map(|p| &p.rejected))
            .collect();
        let logps = sequence_logps(model, &rows, tok.pad_id(), device, false)?;
        Ok::<_, TrainError>(logps.detach().to_vec1::<f32>()?)
    })?;
    for (chunk, logps) in out.chunks_mut(EVAL_BATCH).zip(logps) {
        let k = chunk.len();
        for (j, p) in chunk.iter_mut().enumerate() {
            p.ref_chosen = logps[j];
            p.ref_rejected = logps[k + j];
        }
    }
    Ok((out, truncated))
}

pub(crate) fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let (config, config_json) = read_decoder_config(&job.base_model)?;
    let train_pairs = read_preference_pairs(&job.training_file)?;
    let valid_pairs = match &job.validation_file {
        Some(p) => read_preference_pairs(p)?,
        None => Vec::new(),
    };
    let tok = DecoderTokenizer::load(&job.base_model)?;
    let lengths: Vec<usize> = train_pairs
        .iter()
        .map(|p| {
            let a = p.encode(&tok, true)?.ids.len();
            let b = p.encode(&tok, false)?.ids.len();
            Ok(a.max(b))
        })
        .collect::<Result<_, crate::data::text::TextDataError>>()?;
    let ctx = ResolveContext {
        train_examples: train_pairs.len(),
        num_layers: config.num_hidden_layers,
        max_positions: config.max_position_embeddings,
        p99_tokens: length_quantile(&lengths, 0.99),
        decoder: true,
        vision: false,
        bf16_native: crate::device::supports_bf16(&job.device),
    };
    let (mut hp, mut notes) = job.hyperparameters.resolve(&ctx)?;
    let beta = match hp.beta {
        Some(b) => b,
        None => {
            notes.push(format!("beta = {DEFAULT_BETA} (DPO's usual default)"));
            DEFAULT_BETA
        }
    };
    hp.beta = Some(beta);
    let varmap = VarMap::new();
    let mut model = Decoder::load_dir(
        &job.base_model,
        &varmap,
        &job.device,
        &load_options(&hp, job.seed),
    )?;
    model.set_compute_dtype(hp.compute_dtype());
    let max_length = hp.max_length as usize;
    let (train, truncated) = encode_pairs(&train_pairs, &tok, &model, max_length, &job.device)?;
    let (valid, _) = encode_pairs(&valid_pairs, &tok, &model, max_length, &job.device)?;
    let train_tokens: u64 = train
        .iter()
        .map(|p| (p.chosen.ids.len() + p.rejected.ids.len()) as u64)
        .sum();
    let mut task = Dpo {
        model,
        _varmap: varmap,
        train,
        valid,
        beta,
        pad_id: tok.pad_id(),
        device: job.device.clone(),
        config_json,
        base_dir: job.base_model.clone(),
    };
    on_event(&TrainEvent::Started {
        task: "preference",
        hyperparameters: hp.clone(),
        notes,
        train_examples: task.train.len(),
        valid_examples: task.valid.len(),
        total_steps: total_steps(&hp, task.train.len()),
        labels: Vec::new(),
        train_tokens,
    });
    if truncated > 0 {
        on_event(&TrainEvent::message(format!(
            "{truncated} of {} pairs were longer than max_length = {max_length} tokens and were truncated.",
            task.train.len()
        )));
    }
    let baseline = task.evaluate()?.map(|(m, _)| m);
    run_and_export(
        &mut task,
        job,
        hp,
        on_event,
        stop,
        SummaryParts {
            task: "preference",
            baseline_metrics: baseline,
            labels: Vec::new(),
        },
    )
}
