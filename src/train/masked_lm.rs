//! Domain adaptation: continued masked-language-model pretraining of an encoder on the
//! user's unlabelled text, reusing the checkpoint's MLM head when it has one. The result is a
//! base model for later jobs; masked-token loss and accuracy on held-out text are reported
//! before and after.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::cores::map_on_cores;
use super::export::write_masked_lm;
use super::spec::{Hyperparameters, Strategy};
use super::trainer::{SummaryParts, Task, ValidationResult, VarGroup, run_and_export, total_steps};
use super::{
    StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob, read_base_config,
    resolve_context,
};
use crate::data::text::{EncodedText, TextTokenizer, pad_batch, read_domain_text};
use crate::nn::bert::{BertConfig, BertEncoder, LoadOptions};
use crate::nn::classifier::HeadNaming;
use crate::nn::layers::load_model_weights;
use crate::nn::lora::{LoraConfig, LoraTarget};

/// Share of tokens chosen for prediction, as in BERT.
const MASK_PROBABILITY: f64 = 0.15;
const EVAL_BATCH: usize = 64;

/// A batch with some tokens hidden: the model sees `input_ids` and must predict `labels`
/// at `positions` (flat indices into `[batch * seq]`).
struct MaskedBatch {
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    attention_mask: Vec<u32>,
    shape: (usize, usize),
    positions: Vec<u32>,
    labels: Vec<u32>,
    tokens: usize,
}

/// BERT's masking: 15% of the real tokens (never the first and last, which are the special
/// tokens that open and close a sequence) are chosen; of those 80% become the mask token,
/// 10% a random token and 10% stay. At least one token per row is chosen.
fn mask_batch(
    rows: &[&EncodedText],
    pad_id: u32,
    mask_id: u32,
    vocab: u32,
    rng: &mut StdRng,
) -> MaskedBatch {
    let padded = pad_batch(rows, pad_id);
    let (b, s) = (padded.batch, padded.seq_len);
    let mut input_ids = padded.input_ids;
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let len = row.ids.len();
        if len < 3 {
            continue;
        }
        let mut chosen: Vec<usize> = (1..len - 1)
            .filter(|_| rng.random_bool(MASK_PROBABILITY))
            .collect();
        if chosen.is_empty() {
            chosen.push(rng.random_range(1..len - 1));
        }
        for j in chosen {
            let flat = r * s + j;
            labels.push(input_ids[flat]);
            positions.push(flat as u32);
            let roll: f64 = rng.random();
            if roll < 0.8 {
                input_ids[flat] = mask_id;
            } else if roll < 0.9 {
                input_ids[flat] = rng.random_range(0..vocab);
            }
        }
    }
    MaskedBatch {
        input_ids,
        token_type_ids: padded.token_type_ids,
        attention_mask: padded.attention_mask,
        shape: (b, s),
        positions,
        labels,
        tokens: padded.tokens,
    }
}

pub(crate) struct MaskedLm {
    encoder: BertEncoder,
    _varmap: VarMap,
    train: Vec<EncodedText>,
    /// Held-out batches masked once, so every evaluation scores the same predictions.
    valid: Vec<MaskedBatch>,
    pad_id: u32,
    mask_id: u32,
    vocab: u32,
    seed: u64,
    device: Device,
    naming: HeadNaming,
    base_config: Value,
    base_dir: std::path::PathBuf,
}

impl MaskedLm {
    /// Mean cross-entropy over the masked positions, and how many were predicted right.
    fn masked_loss(
        &self,
        batch: &MaskedBatch,
        train: bool,
    ) -> Result<(Tensor, usize, usize), TrainError> {
        let d = &self.device;
        let ids = Tensor::from_vec(batch.input_ids.clone(), batch.shape, d)?;
        let types = Tensor::from_vec(batch.token_type_ids.clone(), batch.shape, d)?;
        let mask = Tensor::from_vec(batch.attention_mask.clone(), batch.shape, d)?;
        let hidden = self.encoder.forward(&ids, Some(&types), &mask, train)?;
        let (b, s, h) = hidden.dims3()?;
        let positions = Tensor::from_vec(batch.positions.clone(), batch.positions.len(), d)?;
        // Only the masked positions go through the vocabulary-sized decoder.
        let picked = hidden.reshape((b * s, h))?.index_select(&positions, 0)?;
        let logits = self.encoder.mlm_logits(&picked)?;
        let loss = crate::nn::ops::label_log_probs(&logits, &batch.labels)?
            .mean_all()?
            .neg()?;
        let predicted = logits.detach().argmax(1)?.to_vec1::<u32>()?;
        let correct = predicted
            .iter()
            .zip(&batch.labels)
            .filter(|(p, l)| p == l)
            .count();
        Ok((loss, correct, batch.labels.len()))
    }
}

impl Task for MaskedLm {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn groups(&self, hp: &Hyperparameters) -> Vec<VarGroup> {
        vec![VarGroup {
            name: "backbone",
            lr: hp.learning_rate,
            vars: self.encoder.named_trainable_vars().to_vec(),
        }]
    }

    fn loss(&mut self, batch: &[usize], step: u64) -> Result<(Tensor, usize), TrainError> {
        let mut rng = StdRng::seed_from_u64(
            self.seed
                ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03)
                ^ batch.first().copied().unwrap_or(0) as u64,
        );
        let rows: Vec<&EncodedText> = batch.iter().map(|&i| &self.train[i]).collect();
        let masked = mask_batch(&rows, self.pad_id, self.mask_id, self.vocab, &mut rng);
        let (loss, _, _) = self.masked_loss(&masked, true)?;
        Ok((loss, masked.tokens))
    }

    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        // The batches run side by side on the cores; their sums are added in order.
        let sums = map_on_cores(&self.device, self.valid.len(), |i| {
            let (loss, c, n) = self.masked_loss(&self.valid[i], false)?;
            let loss = f64::from(loss.detach().to_scalar::<f32>()?);
            Ok::<_, TrainError>((loss * n as f64, c, n))
        })?;
        let (mut loss_sum, mut correct, mut total) = (0f64, 0usize, 0usize);
        for (l, c, n) in sums {
            loss_sum += l;
            correct += c;
            total += n;
        }
        let total = total.max(1);
        let mut metrics = BTreeMap::new();
        metrics.insert("valid_loss".to_owned(), loss_sum / total as f64);
        metrics.insert(
            "valid_masked_token_accuracy".to_owned(),
            correct as f64 / total as f64,
        );
        Ok(Some((metrics, json!({"masked_tokens": total}))))
    }

    fn export(&mut self, dir: &Path) -> Result<(), TrainError> {
        let prefix = self.encoder.prefix().to_owned();
        let target = self.naming.encoder_prefix();
        let mut weights = HashMap::new();
        for (name, t) in self.encoder.export_weights()? {
            let bare = name.strip_prefix(prefix.as_str()).unwrap_or(&name);
            if bare.starts_with("embeddings.") || bare.starts_with("encoder.") {
                weights.insert(format!("{target}{bare}"), t);
            } else if !bare.starts_with("pooler.") {
                weights.insert(name.clone(), t);
            }
        }
        // transformers ties the decoder to the word embeddings; writing the tied copies keeps
        // loaders that do not tie happy too.
        let word = format!("{target}embeddings.word_embeddings.weight");
        if let (Some(w), Some(bias)) = (
            weights.get(&word).cloned(),
            weights.get("cls.predictions.bias").cloned(),
        ) {
            weights.insert("cls.predictions.decoder.weight".into(), w);
            weights.insert("cls.predictions.decoder.bias".into(), bias);
        }
        write_masked_lm(dir, &self.base_config, &self.base_dir, &weights)
    }
}

/// Adds a fresh MLM head (transformers' initialisation) to a checkpoint that lacks one.
fn add_fresh_mlm_head(
    ckpt: &mut HashMap<String, Tensor>,
    config: &BertConfig,
    seed: u64,
    device: &Device,
) -> Result<(), TrainError> {
    let h = config.hidden_size;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4D4C4D);
    let dense: Vec<f32> = (0..h * h)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos() * 0.02
        })
        .collect();
    ckpt.insert(
        "cls.predictions.transform.dense.weight".into(),
        Tensor::from_vec(dense, (h, h), device)?,
    );
    ckpt.insert(
        "cls.predictions.transform.dense.bias".into(),
        Tensor::zeros(h, DType::F32, device)?,
    );
    ckpt.insert(
        "cls.predictions.transform.LayerNorm.weight".into(),
        Tensor::ones(h, DType::F32, device)?,
    );
    ckpt.insert(
        "cls.predictions.transform.LayerNorm.bias".into(),
        Tensor::zeros(h, DType::F32, device)?,
    );
    ckpt.insert(
        "cls.predictions.bias".into(),
        Tensor::zeros(config.vocab_size, DType::F32, device)?,
    );
    Ok(())
}

pub(crate) fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let (config, base_config) = read_base_config(&job.base_model)?;
    let texts = read_domain_text(&job.training_file)?;
    let (train_texts, valid_texts) = match &job.validation_file {
        Some(p) => (texts, read_domain_text(p)?),
        None => {
            // Hold out a seeded tenth (at least one text) to measure the adaptation.
            let mut order: Vec<usize> = (0..texts.len()).collect();
            rand::seq::SliceRandom::shuffle(
                order.as_mut_slice(),
                &mut StdRng::seed_from_u64(job.seed ^ 0x5EED),
            );
            let held = (texts.len() / 10).max(1).min(texts.len().saturating_sub(1));
            let valid: Vec<String> = order[..held].iter().map(|&i| texts[i].clone()).collect();
            let train: Vec<String> = order[held..].iter().map(|&i| texts[i].clone()).collect();
            (train, valid)
        }
    };
    if train_texts.is_empty() {
        return Err(TrainError::Data(
            "domain adaptation needs at least two texts".into(),
        ));
    }
    let refs: Vec<&str> = train_texts.iter().map(String::as_str).collect();
    let ctx = resolve_context(&config, &job.base_model, &refs, &job.device)?;
    let (hp, notes) = job.hyperparameters.resolve(&ctx)?;
    if hp.strategy == Strategy::HeadOnly {
        return Err(TrainError::Data("strategy head_only has no head to train in domain adaptation; use full, freeze or lora".into()));
    }
    let tokenizer = TextTokenizer::load(&job.base_model, hp.max_length as usize)?;
    let mask_id = tokenizer
        .token_id("[MASK]")
        .or_else(|| tokenizer.token_id("<mask>"))
        .ok_or_else(|| TrainError::Data("the tokenizer has no [MASK] token".into()))?;
    let encode = |texts: &[String]| -> Result<Vec<EncodedText>, TrainError> {
        texts.iter().map(|t| Ok(tokenizer.encode(t)?.0)).collect()
    };
    let train = encode(&train_texts)?;
    let valid_rows = encode(&valid_texts)?;

    let mut ckpt = load_model_weights(&job.base_model, &job.device)?;
    let has_head = ckpt.contains_key("cls.predictions.transform.dense.weight")
        || ckpt.contains_key("lm_head.dense.weight");
    if !has_head {
        add_fresh_mlm_head(&mut ckpt, &config, job.seed, &job.device)?;
    }
    let opts = LoadOptions {
        with_mlm_head: true,
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
            targets: vec![LoraTarget::Query, LoraTarget::Value],
            seed: job.seed,
        }),
        ..LoadOptions::default()
    };
    let varmap = VarMap::new();
    let mut encoder = BertEncoder::from_checkpoint(&config, &ckpt, &varmap, &job.device, &opts)?;
    encoder.set_compute_dtype(hp.compute_dtype());
    drop(ckpt);
    let vocab = tokenizer.vocab_size().min(config.vocab_size) as u32;
    let mut valid_rng = StdRng::seed_from_u64(job.seed ^ 0xE7A1);
    let valid: Vec<MaskedBatch> = valid_rows
        .chunks(EVAL_BATCH)
        .map(|chunk| {
            let rows: Vec<&EncodedText> = chunk.iter().collect();
            mask_batch(&rows, tokenizer.pad_id(), mask_id, vocab, &mut valid_rng)
        })
        .collect();
    let train_tokens: u64 = train.iter().map(|t| t.ids.len() as u64).sum();
    let mut task = MaskedLm {
        encoder,
        _varmap: varmap,
        train,
        valid,
        pad_id: tokenizer.pad_id(),
        mask_id,
        vocab,
        seed: job.seed,
        device: job.device.clone(),
        naming: HeadNaming::for_model_type(&config.model_type),
        base_config,
        base_dir: job.base_model.clone(),
    };

    on_event(&TrainEvent::Started {
        task: "domain_adaptation",
        hyperparameters: hp.clone(),
        notes,
        train_examples: task.train.len(),
        valid_examples: valid_texts.len(),
        total_steps: total_steps(&hp, task.train.len()),
        labels: Vec::new(),
        train_tokens,
    });
    if !has_head {
        on_event(&TrainEvent::message(
            "The base model has no masked-LM head; training a fresh one with the encoder.",
        ));
    }
    let baseline = task.evaluate()?.map(|(m, _)| m);
    if let Some(m) = &baseline {
        on_event(&TrainEvent::message(format!(
            "Before training, on held-out text: masked-token loss {:.4}, accuracy {:.4}.",
            m.get("valid_loss").copied().unwrap_or(f64::NAN),
            m.get("valid_masked_token_accuracy")
                .copied()
                .unwrap_or(f64::NAN)
        )));
    }
    run_and_export(
        &mut task,
        job,
        hp,
        on_event,
        stop,
        SummaryParts {
            task: "domain_adaptation",
            baseline_metrics: baseline,
            labels: Vec::new(),
        },
    )
}
