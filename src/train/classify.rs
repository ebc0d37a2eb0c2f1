//! Text classification on a BERT-family encoder: single-label (softmax, cross-entropy) and
//! multi-label (sigmoid, binary cross-entropy), with every strategy: `full`, `freeze`,
//! `lora`, and `head_only`, where the encoder's features are computed once and cached.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{Value, json};

use super::cores::map_on_cores;
use super::export::write_classifier;
use super::metrics::{classification_report, multi_label_report};
use super::spec::{Hyperparameters, Strategy};
use super::trainer::{SummaryParts, Task, ValidationResult, VarGroup, run_and_export, total_steps};
use super::{
    StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob, read_base_config,
    resolve_context,
};
use crate::data::text::{
    EncodedText, LabelSet, TextExample, TextTokenizer, pad_batch, read_text_classification,
    stratified_split,
};
use crate::nn::bert::LoadOptions;
use crate::nn::classifier::SequenceClassifier;
use crate::nn::lora::{LoraConfig, LoraTarget};

/// Examples per forward pass when evaluating or computing features.
const EVAL_BATCH: usize = 64;

enum Targets {
    Single(Vec<u32>),
    Multi(Vec<Vec<f32>>),
}

impl Targets {
    fn build(
        examples: &[TextExample],
        labels: &LabelSet,
        multi: bool,
    ) -> Result<Targets, TrainError> {
        let unknown = |l: &str| {
            TrainError::Data(format!(
                "the validation data has label '{l}', which the training data does not"
            ))
        };
        if multi {
            let mut rows = Vec::with_capacity(examples.len());
            for e in examples {
                let mut row = vec![0f32; labels.len()];
                for l in &e.labels {
                    row[labels.id(l).ok_or_else(|| unknown(l))?] = 1.0;
                }
                rows.push(row);
            }
            Ok(Targets::Multi(rows))
        } else {
            let ids: Result<Vec<u32>, _> = examples
                .iter()
                .map(|e| {
                    labels
                        .id(&e.labels[0])
                        .map(|i| i as u32)
                        .ok_or_else(|| unknown(&e.labels[0]))
                })
                .collect();
            Ok(Targets::Single(ids?))
        }
    }

    fn tensor(&self, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Targets::Single(ids) => Tensor::from_vec(
                idx.iter().map(|&i| ids[i]).collect::<Vec<_>>(),
                idx.len(),
                device,
            ),
            Targets::Multi(rows) => {
                let k = rows.first().map_or(0, Vec::len);
                let flat: Vec<f32> = idx.iter().flat_map(|&i| rows[i].iter().copied()).collect();
                Tensor::from_vec(flat, (idx.len(), k), device)
            }
        }
    }
}

/// Binary cross-entropy on logits, averaged, in the numerically stable form
/// `max(x, 0) - x·y + log(1 + e^{-|x|})`; built from differentiable ops.
fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let pos = logits.relu()?;
    let log_term = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((pos - (logits * targets)?)? + log_term)?.mean_all()
}

fn loss_of(logits: &Tensor, targets: &Tensor, multi: bool) -> candle_core::Result<Tensor> {
    if multi {
        bce_with_logits(logits, targets)
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

struct Split {
    texts: Vec<EncodedText>,
    targets: Targets,
    /// Cached encoder features `[n, hidden]` (first token), for `head_only`.
    features: Option<Tensor>,
}

pub(crate) struct Classification {
    model: SequenceClassifier,
    _varmap: VarMap,
    pad_id: u32,
    train: Split,
    valid: Split,
    multi: bool,
    device: Device,
    config_json: Value,
    tokenizer_dir: std::path::PathBuf,
}

impl Classification {
    fn batch_tensors(
        &self,
        texts: &[&EncodedText],
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let b = pad_batch(texts, self.pad_id);
        let shape = (b.batch, b.seq_len);
        Ok((
            Tensor::from_vec(b.input_ids, shape, &self.device)?,
            Tensor::from_vec(b.token_type_ids, shape, &self.device)?,
            Tensor::from_vec(b.attention_mask, shape, &self.device)?,
        ))
    }

    /// `f(input_ids, token_type_ids, attention_mask)` over every text, in batches of similar
    /// length (longest first, so each batch pads little) that run side by side on the cores;
    /// its rows (f32) come back in the texts' order. For passes without a gradient.
    fn map_batches<F>(&self, texts: &[EncodedText], f: F) -> Result<Tensor, TrainError>
    where
        F: Fn(&Tensor, &Tensor, &Tensor) -> crate::nn::Result<Tensor> + Sync,
    {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].ids.len()));
        let batches: Vec<&[usize]> = order.chunks(EVAL_BATCH).collect();
        let parts = map_on_cores(&self.device, batches.len(), |b| {
            let refs: Vec<&EncodedText> = batches[b].iter().map(|&i| &texts[i]).collect();
            let (ids, types, mask) = self.batch_tensors(&refs)?;
            Ok::<_, TrainError>(f(&ids, &types, &mask)?.to_dtype(DType::F32)?.detach())
        })?;
        let sorted = Tensor::cat(&parts, 0)?;
        // Back to the texts' order: text i is row `rank[i]` of `sorted`.
        let mut rank = vec![0u32; texts.len()];
        for (row, &i) in order.iter().enumerate() {
            rank[i] = row as u32;
        }
        let rank = Tensor::from_vec(rank, texts.len(), &self.device)?;
        Ok(sorted.index_select(&rank, 0)?)
    }

    /// First-token features of every text, computed once with the frozen encoder.
    fn features(&self, texts: &[EncodedText]) -> Result<Option<Tensor>, TrainError> {
        if texts.is_empty() {
            return Ok(None);
        }
        let encoder = &self.model.encoder;
        let features = self.map_batches(texts, |ids, types, mask| {
            encoder.forward_first_token(ids, Some(types), mask)
        })?;
        Ok(Some(features))
    }

    /// `head_only`'s feature cache for both splits. The encoder is frozen, so its weights are
    /// packed for the pass where that helps (AVX-512 and AVX2 CPUs, as serving does) and
    /// unpacked after.
    fn cache_features(&mut self) -> Result<(), TrainError> {
        self.model.encoder.pack_for_inference()?;
        let cached = self
            .features(&self.train.texts)
            .and_then(|train| Ok((train, self.features(&self.valid.texts)?)));
        self.model.encoder.unpack();
        (self.train.features, self.valid.features) = cached?;
        Ok(())
    }

    /// Logits `[n, labels]` (f32) of every example of `split`, without dropout or gradient:
    /// from the cached features, or through the encoder (its batches side by side on the
    /// cores).
    fn predict(&self, split: &Split) -> Result<Tensor, TrainError> {
        if let Some(features) = &split.features {
            return Ok(self.model.head.forward(features, false)?);
        }
        let model = &self.model;
        self.map_batches(&split.texts, |ids, types, mask| {
            model.forward_inference(ids, Some(types), mask)
        })
    }

    /// Training logits of the examples `idx` (dropout on) and their token count.
    fn train_logits(&self, idx: &[usize]) -> Result<(Tensor, usize), TrainError> {
        let split = &self.train;
        let tokens = idx.iter().map(|&i| split.texts[i].ids.len()).sum();
        if let Some(features) = &split.features {
            let rows = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                idx.len(),
                &self.device,
            )?;
            let x = features.index_select(&rows, 0)?;
            return Ok((self.model.head.forward(&x, true)?, tokens));
        }
        let refs: Vec<&EncodedText> = idx.iter().map(|&i| &split.texts[i]).collect();
        let (ids, types, mask) = self.batch_tensors(&refs)?;
        // f32 logits under mixed precision too: the loss is taken in f32.
        Ok((
            self.model
                .forward(&ids, Some(&types), &mask, true)?
                .to_dtype(DType::F32)?,
            tokens,
        ))
    }
}

impl Task for Classification {
    fn train_len(&self) -> usize {
        self.train.texts.len()
    }

    fn groups(&self, hp: &Hyperparameters) -> Vec<VarGroup> {
        let mut groups = Vec::new();
        if hp.strategy != Strategy::HeadOnly {
            groups.push(VarGroup {
                name: "backbone",
                lr: hp.learning_rate,
                vars: self.model.encoder.named_trainable_vars().to_vec(),
            });
        }
        groups.push(VarGroup {
            name: "head",
            lr: hp.head_learning_rate,
            vars: self.model.head_vars.clone(),
        });
        groups
    }

    fn loss(&mut self, batch: &[usize], _step: u64) -> Result<(Tensor, usize), TrainError> {
        let (logits, tokens) = self.train_logits(batch)?;
        let targets = self.train.targets.tensor(batch, &self.device)?;
        Ok((loss_of(&logits, &targets, self.multi)?, tokens))
    }

    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError> {
        let n = self.valid.texts.len();
        if n == 0 {
            return Ok(None);
        }
        let logits = self.predict(&self.valid)?;
        let all: Vec<usize> = (0..n).collect();
        let targets = self.valid.targets.tensor(&all, &self.device)?;
        let loss = loss_of(&logits, &targets, self.multi)?.to_scalar::<f32>()?;
        let probs = if self.multi {
            candle_nn::ops::sigmoid(&logits)?
        } else {
            candle_nn::ops::softmax(&logits, D::Minus1)?
        };
        let probs: Vec<Vec<f32>> = probs.to_vec2::<f32>()?;
        let labels = self.model.labels.clone();
        let mut metrics = BTreeMap::new();
        metrics.insert("valid_loss".to_owned(), f64::from(loss));
        let details = match &self.valid.targets {
            Targets::Single(truth) => {
                let truth: Vec<usize> = truth.iter().map(|&t| t as usize).collect();
                let r = classification_report(&labels, &truth, &probs);
                metrics.insert("valid_accuracy".into(), r.accuracy);
                metrics.insert("valid_macro_f1".into(), r.macro_f1);
                if let Some(auc) = r.roc_auc {
                    metrics.insert("valid_roc_auc".into(), auc);
                }
                json!({"labels": labels, "per_class": r.per_class, "confusion_matrix": r.confusion_matrix})
            }
            Targets::Multi(rows) => {
                let truth: Vec<Vec<bool>> = rows
                    .iter()
                    .map(|r| r.iter().map(|&x| x > 0.5).collect())
                    .collect();
                let r = multi_label_report(&labels, &truth, &probs);
                metrics.insert("valid_accuracy".into(), r.exact_match);
                metrics.insert("valid_label_accuracy".into(), r.label_accuracy);
                metrics.insert("valid_micro_f1".into(), r.micro_f1);
                metrics.insert("valid_macro_f1".into(), r.macro_f1);
                json!({"labels": labels, "per_class": r.per_class})
            }
        };
        Ok(Some((metrics, details)))
    }

    fn export(&mut self, dir: &Path) -> Result<(), TrainError> {
        let weights = self.model.export_weights()?;
        write_classifier(
            dir,
            &self.config_json,
            &self.tokenizer_dir,
            &weights,
            &self.model.labels,
            self.multi,
            self.model.naming.architecture(),
        )
    }
}

/// The adapters named by `lora_target_modules` (BERT's and ViT's module names are the same).
pub(crate) fn lora_targets(names: &[String]) -> Vec<LoraTarget> {
    names
        .iter()
        .filter_map(|n| match n.as_str() {
            "query" => Some(LoraTarget::Query),
            "key" => Some(LoraTarget::Key),
            "value" => Some(LoraTarget::Value),
            "attention.output.dense" => Some(LoraTarget::AttentionOutput),
            "intermediate.dense" => Some(LoraTarget::Intermediate),
            "output.dense" => Some(LoraTarget::Output),
            _ => None,
        })
        .collect()
}

/// Reads the data, resolves the hyperparameters, builds the model and runs the loop.
pub(crate) fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let (config, config_json) = read_base_config(&job.base_model)?;

    let data = read_text_classification(&job.training_file)?;
    let (train_examples, valid_examples) = match &job.validation_file {
        Some(path) => {
            let valid = read_text_classification(path)?;
            if valid.multi_label != data.multi_label {
                return Err(TrainError::Data("the training file is single-label and the validation file multi-label, or the reverse".into()));
            }
            (data.examples, valid.examples)
        }
        None => stratified_split(&data.examples, 0.1, job.seed),
    };
    let labels = LabelSet::from_examples(&train_examples);
    if labels.len() < 2 {
        return Err(TrainError::Data(format!(
            "classification needs at least two labels; the training data has {}",
            labels.len()
        )));
    }

    let texts: Vec<&str> = train_examples.iter().map(|e| e.text.as_str()).collect();
    let ctx = resolve_context(&config, &job.base_model, &texts, &job.device)?;
    let (hp, notes) = job.hyperparameters.resolve(&ctx)?;
    let tokenizer = TextTokenizer::load(&job.base_model, hp.max_length as usize)?;
    let encode = |examples: &[TextExample]| -> Result<(Vec<EncodedText>, usize), TrainError> {
        let mut out = Vec::with_capacity(examples.len());
        let mut cut = 0;
        for e in examples {
            let (t, c) = tokenizer.encode(&e.text)?;
            cut += usize::from(c);
            out.push(t);
        }
        Ok((out, cut))
    };
    let (train_texts, train_cut) = encode(&train_examples)?;
    let (valid_texts, _) = encode(&valid_examples)?;

    let opts = match hp.strategy {
        Strategy::Full | Strategy::Scratch => LoadOptions::default(),
        Strategy::Freeze => LoadOptions {
            freeze_embeddings: true,
            freeze_layers: hp.freeze_layers as usize,
            ..LoadOptions::default()
        },
        Strategy::HeadOnly => LoadOptions {
            freeze_embeddings: true,
            freeze_layers: config.num_hidden_layers,
            ..LoadOptions::default()
        },
        Strategy::Lora => LoadOptions {
            lora: Some(LoraConfig {
                rank: hp.lora_rank as usize,
                alpha: hp.lora_alpha,
                dropout: hp.lora_dropout,
                targets: lora_targets(&hp.lora_target_modules),
                seed: job.seed,
            }),
            ..LoadOptions::default()
        },
    };
    let varmap = VarMap::new();
    let mut model = SequenceClassifier::from_base(
        &job.base_model,
        labels.names().to_vec(),
        &varmap,
        &job.device,
        &opts,
        job.seed,
    )?;
    model.encoder.set_compute_dtype(hp.compute_dtype());
    let multi = data.multi_label;
    let mut task = Classification {
        train: Split {
            targets: Targets::build(&train_examples, &labels, multi)?,
            texts: train_texts,
            features: None,
        },
        valid: Split {
            targets: Targets::build(&valid_examples, &labels, multi)?,
            texts: valid_texts,
            features: None,
        },
        model,
        _varmap: varmap,
        pad_id: tokenizer.pad_id(),
        multi,
        device: job.device.clone(),
        config_json,
        tokenizer_dir: job.base_model.clone(),
    };

    let total_steps = total_steps(&hp, task.train_len());
    on_event(&TrainEvent::Started {
        task: if multi {
            "multi_label_classification"
        } else {
            "text_classification"
        },
        hyperparameters: hp.clone(),
        notes,
        train_examples: task.train.texts.len(),
        valid_examples: task.valid.texts.len(),
        total_steps,
        labels: labels.names().to_vec(),
        train_tokens: task.train.texts.iter().map(|t| t.ids.len() as u64).sum(),
    });
    if train_cut > 0 {
        on_event(&TrainEvent::message(format!(
            "{train_cut} of {} training examples were longer than max_length = {} tokens and were truncated.",
            task.train.texts.len(),
            hp.max_length
        )));
    }
    if hp.strategy == Strategy::HeadOnly {
        let started = std::time::Instant::now();
        task.cache_features()?;
        on_event(&TrainEvent::message(format!(
            "Feature cache: encoded {} examples once in {:.1} s; only the head trains.",
            task.train.texts.len() + task.valid.texts.len(),
            started.elapsed().as_secs_f64()
        )));
    }

    run_and_export(
        &mut task,
        job,
        hp,
        on_event,
        stop,
        SummaryParts {
            task: if multi {
                "multi_label_classification"
            } else {
                "text_classification"
            },
            baseline_metrics: None,
            labels: labels.names().to_vec(),
        },
    )
}
