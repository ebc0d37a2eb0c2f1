//! Supervised fine-tuning of decoder LMs (OpenAI's `supervised` method): chat conversations
//! with the loss on the assistant turns (per-message `weight` respected), prompt/completion
//! pairs with the loss on the completion, and unlabelled `text` for domain adaptation
//! (continued causal-LM pretraining, perplexity on held-out text reported before and after).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::cores::map_on_cores;
use super::export::write_model_dir;
use super::spec::{Hyperparameters, ResolveContext, Strategy};
use super::trainer::{SummaryParts, Task, ValidationResult, VarGroup, run_and_export, total_steps};
use super::{StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob};
use crate::data::chat::{DecoderTokenizer, LmExample, LmRecord, read_lm_records};
use crate::data::text::length_quantile;
use crate::nn::decoder::{Decoder, DecoderConfig, DecoderLoadOptions};
use crate::nn::lora::LoraConfig;
use crate::nn::ops;

const EVAL_BATCH: usize = 16;

/// Files a decoder brings besides its tokenizer, carried into the exported model.
const DECODER_FILES: &[&str] = &["generation_config.json", "chat_template.jinja"];

/// Inputs and targets of one padded batch: position `p` (flat in `[batch * seq]`) predicts
/// `labels[i]` for `p = positions[i]`.
pub(crate) struct LmBatch {
    pub(crate) input_ids: Vec<u32>,
    pub(crate) attention_mask: Vec<u32>,
    pub(crate) shape: (usize, usize),
    pub(crate) positions: Vec<u32>,
    pub(crate) labels: Vec<u32>,
    pub(crate) tokens: usize,
}

/// The model's logits at the batch's scored positions, `[n, vocab]`: only those positions
/// go through the vocabulary-sized head.
pub(crate) fn scored_logits(
    model: &Decoder,
    batch: &LmBatch,
    device: &Device,
    train: bool,
) -> Result<Tensor, TrainError> {
    let ids = Tensor::from_vec(batch.input_ids.clone(), batch.shape, device)?;
    let mask = Tensor::from_vec(batch.attention_mask.clone(), batch.shape, device)?;
    let hidden = model.hidden_states(&ids, &mask, train)?;
    let (b, s, h) = hidden.dims3()?;
    let positions = Tensor::from_vec(batch.positions.clone(), batch.positions.len(), device)?;
    let picked = hidden.reshape((b * s, h))?.index_select(&positions, 0)?;
    Ok(model.logits(&picked, train)?)
}

/// Log-probability of each scored token of `rows`, `[n]`, and the row each belongs to.
pub(crate) fn token_logps(
    model: &Decoder,
    rows: &[&LmExample],
    pad_id: u32,
    device: &Device,
    train: bool,
) -> Result<(Tensor, Vec<usize>), TrainError> {
    let batch = lm_batch(rows, pad_id);
    let n = batch.positions.len();
    if n == 0 {
        return Err(TrainError::Data(
            "a reply has no tokens within max_length".into(),
        ));
    }
    let logp = ops::label_log_probs(&scored_logits(model, &batch, device, train)?, &batch.labels)?;
    let seq = batch.shape.1;
    let owners = batch.positions.iter().map(|&p| p as usize / seq).collect();
    Ok((logp, owners))
}

pub(crate) fn lm_batch(rows: &[&LmExample], pad_id: u32) -> LmBatch {
    let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(1);
    let mut input_ids = vec![pad_id; rows.len() * seq];
    let mut attention_mask = vec![0u32; rows.len() * seq];
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    let mut tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        for (j, &id) in row.ids.iter().enumerate() {
            input_ids[r * seq + j] = id;
            attention_mask[r * seq + j] = 1;
            if j > 0 && row.trained[j] {
                positions.push((r * seq + j - 1) as u32);
                labels.push(id);
            }
        }
        tokens += row.ids.len();
    }
    LmBatch {
        input_ids,
        attention_mask,
        shape: (rows.len(), seq),
        positions,
        labels,
        tokens,
    }
}

/// What the run trains on, for names in events and summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LmKind {
    Chat,
    Completion,
    Domain,
}

impl LmKind {
    fn task(self) -> &'static str {
        match self {
            LmKind::Chat => "chat",
            LmKind::Completion => "completion",
            LmKind::Domain => "causal_domain_adaptation",
        }
    }
}

struct CausalLm {
    model: Decoder,
    _varmap: VarMap,
    train: Vec<LmExample>,
    valid: Vec<LmExample>,
    pad_id: u32,
    device: Device,
    config_json: Value,
    base_dir: PathBuf,
}

impl CausalLm {
    /// Summed cross-entropy over the batch's trained tokens (as a tensor when `train`), the
    /// number of them, and how many the model ranks first.
    fn batch_loss(
        &self,
        batch: &LmBatch,
        train: bool,
    ) -> Result<(Tensor, usize, usize), TrainError> {
        let n = batch.positions.len();
        if n == 0 {
            return Err(TrainError::Data(
                "a batch has no tokens to train on (every example's trained part was truncated away)"
                    .into(),
            ));
        }
        let picked = scored_logits(&self.model, batch, &self.device, train)?;
        // Mean cross-entropy over the trained tokens.
        let loss = ops::label_log_probs(&picked, &batch.labels)?
            .mean_all()?
            .neg()?;
        let predicted = picked.detach().argmax(1)?.to_vec1::<u32>()?;
        let correct = predicted
            .iter()
            .zip(&batch.labels)
            .filter(|(p, l)| p == l)
            .count();
        Ok((loss, n, correct))
    }
}

impl Task for CausalLm {
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
        let rows: Vec<&LmExample> = batch.iter().map(|&i| &self.train[i]).collect();
        let b = lm_batch(&rows, self.pad_id);
        let (loss, _, _) = self.batch_loss(&b, true)?;
        Ok((loss, b.tokens))
    }

    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        // The batches run side by side on the cores; their sums are added in order.
        let chunks: Vec<&[LmExample]> = self.valid.chunks(EVAL_BATCH).collect();
        let sums = map_on_cores(&self.device, chunks.len(), |i| {
            let rows: Vec<&LmExample> = chunks[i].iter().collect();
            let b = lm_batch(&rows, self.pad_id);
            if b.positions.is_empty() {
                return Ok((0.0, 0, 0));
            }
            let (loss, n, c) = self.batch_loss(&b, false)?;
            let loss = f64::from(loss.detach().to_scalar::<f32>()?);
            Ok::<_, TrainError>((loss * n as f64, n, c))
        })?;
        let (mut loss_sum, mut tokens, mut correct) = (0f64, 0usize, 0usize);
        for (l, n, c) in sums {
            loss_sum += l;
            tokens += n;
            correct += c;
        }
        if tokens == 0 {
            return Ok(None);
        }
        let loss = loss_sum / tokens as f64;
        let mut metrics = BTreeMap::new();
        metrics.insert("valid_loss".to_owned(), loss);
        metrics.insert(
            "valid_mean_token_accuracy".to_owned(),
            correct as f64 / tokens as f64,
        );
        metrics.insert("valid_perplexity".to_owned(), loss.exp());
        Ok(Some((metrics, json!({"valid_tokens": tokens}))))
    }

    fn export(&mut self, dir: &Path) -> Result<(), TrainError> {
        export_decoder(&self.model, dir, &self.config_json, &self.base_dir)
    }
}

/// Writes a trained decoder (adapters merged) with the base's config, tokenizer and
/// template, in Hugging Face layout.
pub(crate) fn export_decoder(
    model: &Decoder,
    dir: &Path,
    config_json: &Value,
    base_dir: &Path,
) -> Result<(), TrainError> {
    let weights = model.export_weights()?;
    let mut config = config_json.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), json!("float32"));
    }
    write_model_dir(dir, &config, &weights, base_dir, DECODER_FILES)
}

/// A decoder base model's typed config and its raw JSON (kept whole for the export).
pub(crate) fn read_decoder_config(dir: &Path) -> Result<(DecoderConfig, Value), TrainError> {
    let config_path = dir.join("config.json");
    let config = DecoderConfig::from_file(&config_path)?;
    let config_json: Value = std::fs::read_to_string(&config_path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", config_path.display())))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| TrainError::Data(format!("{}: {e}", config_path.display())))
        })?;
    Ok((config, config_json))
}

/// What trains, from the strategy: everything, all but the embeddings and lowest layers, or
/// LoRA adapters on the chosen projections.
pub(crate) fn load_options(hp: &Hyperparameters, seed: u64) -> DecoderLoadOptions {
    DecoderLoadOptions {
        freeze_embeddings: hp.strategy == Strategy::Freeze,
        freeze_layers: if hp.strategy == Strategy::Freeze {
            hp.freeze_layers as usize
        } else {
            0
        },
        lora: (hp.strategy == Strategy::Lora).then(|| LoraConfig {
            rank: hp.lora_rank as usize,
            alpha: hp.lora_alpha,
            dropout: hp.lora_dropout,
            targets: Vec::new(),
            seed,
        }),
        lora_modules: hp.lora_target_modules.clone(),
    }
}

/// Whether a base model directory holds a decoder kiln trains (by `config.json`'s
/// `model_type`).
pub(crate) fn is_decoder_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .is_some_and(|t| DecoderConfig::is_decoder_type(&t))
}

fn kind_of(records: &[LmRecord]) -> LmKind {
    match records.first() {
        Some(LmRecord::Chat(_)) => LmKind::Chat,
        Some(LmRecord::Completion { .. }) => LmKind::Completion,
        _ => LmKind::Domain,
    }
}

/// Encodes and truncates; returns the examples and how many were cut.
fn encode_all(
    records: &[LmRecord],
    tok: &DecoderTokenizer,
    max_length: usize,
) -> Result<(Vec<LmExample>, usize, usize), TrainError> {
    let mut out = Vec::with_capacity(records.len());
    let (mut truncated, mut emptied) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let mut ex = r
            .encode(tok)
            .map_err(|e| TrainError::Data(format!("example {}: {e}", i + 1)))?;
        if ex.truncate(max_length) {
            truncated += 1;
        }
        if ex.trained_tokens() == 0 {
            emptied += 1;
            continue;
        }
        out.push(ex);
    }
    Ok((out, truncated, emptied))
}

pub(crate) fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let (config, config_json) = read_decoder_config(&job.base_model)?;
    let records = read_lm_records(&job.training_file)?;
    let kind = kind_of(&records);
    let (train_records, valid_records) = match &job.validation_file {
        Some(p) => (records, read_lm_records(p)?),
        // Domain adaptation measures itself on a held-out tenth; supervised runs without a
        // validation file train on everything (as OpenAI's do).
        None if kind == LmKind::Domain && records.len() >= 2 => {
            let mut order: Vec<usize> = (0..records.len()).collect();
            rand::seq::SliceRandom::shuffle(
                order.as_mut_slice(),
                &mut StdRng::seed_from_u64(job.seed ^ 0x5EED),
            );
            let held = (records.len() / 10).max(1);
            let valid = order[..held].iter().map(|&i| records[i].clone()).collect();
            let train = order[held..].iter().map(|&i| records[i].clone()).collect();
            (train, valid)
        }
        None => (records, Vec::new()),
    };
    let tok = DecoderTokenizer::load(&job.base_model)?;
    let lengths: Vec<usize> = train_records
        .iter()
        .map(|r| r.encode(&tok).map(|e| e.ids.len()))
        .collect::<Result<_, _>>()?;
    let ctx = ResolveContext {
        train_examples: train_records.len(),
        num_layers: config.num_hidden_layers,
        max_positions: config.max_position_embeddings,
        p99_tokens: length_quantile(&lengths, 0.99),
        decoder: true,
        vision: false,
        bf16_native: crate::device::supports_bf16(&job.device),
    };
    let (hp, notes) = job.hyperparameters.resolve(&ctx)?;
    let max_length = hp.max_length as usize;
    let (train, truncated, emptied) = encode_all(&train_records, &tok, max_length)?;
    let (valid, _, _) = encode_all(&valid_records, &tok, max_length)?;
    if train.is_empty() {
        return Err(TrainError::Data(format!(
            "no training example has a token to learn within max_length = {max_length}"
        )));
    }

    let opts = load_options(&hp, job.seed);
    let varmap = VarMap::new();
    let mut model = Decoder::load_dir(&job.base_model, &varmap, &job.device, &opts)?;
    model.set_compute_dtype(hp.compute_dtype());
    let train_tokens: u64 = train.iter().map(|e| e.ids.len() as u64).sum();
    let mut task = CausalLm {
        model,
        _varmap: varmap,
        train,
        valid,
        pad_id: tok.pad_id(),
        device: job.device.clone(),
        config_json,
        base_dir: job.base_model.clone(),
    };

    on_event(&TrainEvent::Started {
        task: kind.task(),
        hyperparameters: hp.clone(),
        notes,
        train_examples: task.train.len(),
        valid_examples: task.valid.len(),
        total_steps: total_steps(&hp, task.train.len()),
        labels: Vec::new(),
        train_tokens,
    });
    if kind == LmKind::Chat && !tok.template().from_model() {
        on_event(&TrainEvent::message(
            "The base model has no chat template; conversations are formatted as `role: content` lines.",
        ));
    }
    if truncated > 0 {
        on_event(&TrainEvent::message(format!(
            "{truncated} of {} training examples were longer than max_length = {max_length} tokens and were truncated.",
            train_records.len()
        )));
    }
    if emptied > 0 {
        on_event(&TrainEvent::message(format!(
            "{emptied} training examples were skipped: nothing they train on fits in max_length = {max_length} tokens."
        )));
    }
    let baseline = if kind == LmKind::Domain {
        let b = task.evaluate()?.map(|(m, _)| m);
        if let Some(m) = &b {
            on_event(&TrainEvent::message(format!(
                "Before training, on held-out text: loss {:.4}, perplexity {:.2}.",
                m.get("valid_loss").copied().unwrap_or(f64::NAN),
                m.get("valid_perplexity").copied().unwrap_or(f64::NAN),
            )));
        }
        b
    } else {
        None
    };
    run_and_export(
        &mut task,
        job,
        hp,
        on_event,
        stop,
        SummaryParts {
            task: kind.task(),
            baseline_metrics: baseline,
            labels: Vec::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_predicts_each_trained_token_from_the_one_before() {
        let a = LmExample {
            ids: vec![5, 6, 7, 8],
            trained: vec![false, false, true, true],
        };
        let b = LmExample {
            ids: vec![9, 10],
            trained: vec![false, true],
        };
        let batch = lm_batch(&[&a, &b], 0);
        assert_eq!(batch.shape, (2, 4));
        assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 9, 10, 0, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        // Row 0: positions 1 and 2 predict 7 and 8; row 1: position 4 predicts 10.
        assert_eq!(batch.positions, vec![1, 2, 4]);
        assert_eq!(batch.labels, vec![7, 8, 10]);
        assert_eq!(batch.tokens, 6);
    }
}
