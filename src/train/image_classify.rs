//! Image classification on a ResNet or ViT backbone, with every strategy: `full`, `freeze`
//! (the stem and lowest stages or layers), `head_only` (features computed once with the
//! evaluation transform and cached, then only the head trains), `lora` (ViT) and `scratch`
//! (random initialisation: a network trained here can then be registered as a base model).
//!
//! Images stay encoded in memory; each batch is decoded, randomly cropped and flipped on
//! worker threads, the next batch while the current one trains.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde_json::json;

use super::classify::lora_targets;
use super::cores::map_on_cores;
use super::export::write_model_dir;
use super::metrics::classification_report;
use super::spec::{Augmentation, Hyperparameters, ResolveContext, Strategy};
use super::trainer::{SummaryParts, Task, ValidationResult, VarGroup, run_and_export, total_steps};
use super::{StopSignal, TrainError, TrainEvent, TrainOutcome, TrainingJob};
use crate::data::images::{
    Augment, ImageExample, Preprocess, preprocess_batch, read_image_dataset,
    stratified_split_images,
};
use crate::nn::lora::LoraConfig;
use crate::nn::vision::{ImageClassifier, VisionLoadOptions, load_image_classifier, vision_layers};

/// Images per forward pass when evaluating or computing features.
const EVAL_BATCH: usize = 32;
/// Preprocessed validation pixels are kept in memory up to this many floats (1 GiB).
const EVAL_CACHE_FLOATS: usize = 256 * 1024 * 1024;

type Prefetch = (u64, Vec<usize>, JoinHandle<Result<Vec<f32>, String>>);

struct Split {
    images: Vec<Arc<[u8]>>,
    targets: Vec<u32>,
    /// Cached pooled features `[n, dim]` (head_only).
    features: Option<Tensor>,
    /// Cached evaluation pixels `[n, 3, h, w]` (validation, when small enough).
    pixels: Option<Tensor>,
}

pub(crate) struct ImageClassification {
    model: Box<dyn ImageClassifier>,
    _varmap: VarMap,
    pre: Arc<Preprocess>,
    augment: Augment,
    train: Split,
    valid: Split,
    device: Device,
    seed: u64,
    threads: usize,
    pending: Option<Prefetch>,
    base_dir: PathBuf,
}

/// The augmentation seed of training example `idx` at optimizer step `step`: the same crops
/// whether the run got there directly or through a resume.
fn augment_seed(seed: u64, step: u64, idx: usize) -> u64 {
    let mut x = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (idx as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

impl ImageClassification {
    fn side(&self) -> (usize, usize) {
        (self.pre.crop.0 as usize, self.pre.crop.1 as usize)
    }

    fn to_tensor(&self, pixels: Vec<f32>, n: usize) -> candle_core::Result<Tensor> {
        let (h, w) = self.side();
        Tensor::from_vec(pixels, (n, 3, h, w), &self.device)
    }

    /// Starts decoding and augmenting `batch` for `step` on worker threads.
    fn spawn_train_pixels(
        &self,
        batch: &[usize],
        step: u64,
    ) -> JoinHandle<Result<Vec<f32>, String>> {
        let images: Vec<Arc<[u8]>> = batch
            .iter()
            .map(|&i| self.train.images[i].clone())
            .collect();
        let seeds: Vec<u64> = batch
            .iter()
            .map(|&i| augment_seed(self.seed, step, i))
            .collect();
        let pre = self.pre.clone();
        let augment = self.augment;
        let threads = self.threads;
        std::thread::spawn(move || {
            preprocess_batch(&pre, &images, Some((augment, &seeds)), threads)
        })
    }

    fn train_pixels(&mut self, batch: &[usize], step: u64) -> Result<Tensor, TrainError> {
        let handle = match self.pending.take() {
            Some((s, b, h)) if s == step && b == batch => h,
            // A prefetch for another batch (a resume, a stop) is simply dropped.
            _ => self.spawn_train_pixels(batch, step),
        };
        let pixels = handle
            .join()
            .map_err(|_| TrainError::Io("the image decoding thread panicked".into()))?
            .map_err(TrainError::Data)?;
        Ok(self.to_tensor(pixels, batch.len())?)
    }

    /// Evaluation pixels of `idx` in `split` (center crop, no augmentation).
    fn eval_pixels(&self, split: &Split, idx: &[usize]) -> Result<Tensor, TrainError> {
        if let Some(all) = &split.pixels {
            let rows = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                idx.len(),
                &self.device,
            )?;
            return Ok(all.index_select(&rows, 0)?);
        }
        let images: Vec<Arc<[u8]>> = idx.iter().map(|&i| split.images[i].clone()).collect();
        // One decoding thread per core this runs on (one, in a batch beside others).
        let threads = self.threads.min(rayon::current_num_threads());
        let px = preprocess_batch(&self.pre, &images, None, threads).map_err(TrainError::Data)?;
        Ok(self.to_tensor(px, idx.len())?)
    }

    /// `f` over the evaluation pixels of every image of `split`, in batches that run side by
    /// side on the cores (no gradient); its rows come back in the images' order.
    fn map_batches<F>(&self, split: &Split, f: F) -> Result<Tensor, TrainError>
    where
        F: Fn(&Tensor) -> candle_core::Result<Tensor> + Sync,
    {
        let all: Vec<usize> = (0..split.images.len()).collect();
        let batches: Vec<&[usize]> = all.chunks(EVAL_BATCH).collect();
        let parts = map_on_cores(&self.device, batches.len(), |b| {
            let px = self.eval_pixels(split, batches[b])?;
            Ok::<_, TrainError>(f(&px)?.detach())
        })?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Pooled features of every image of `split`, computed once with the frozen backbone.
    fn features(&self, split: &Split) -> Result<Option<Tensor>, TrainError> {
        if split.images.is_empty() {
            return Ok(None);
        }
        let model = &self.model;
        Ok(Some(
            self.map_batches(split, |px| model.features(px, false))?,
        ))
    }

    fn targets(&self, split: &Split, idx: &[usize]) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            idx.iter().map(|&i| split.targets[i]).collect::<Vec<_>>(),
            idx.len(),
            &self.device,
        )
    }

    fn rows(&self, idx: &[usize]) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &self.device,
        )
    }
}

impl Task for ImageClassification {
    fn train_len(&self) -> usize {
        self.train.images.len()
    }

    fn groups(&self, hp: &Hyperparameters) -> Vec<VarGroup> {
        let mut groups = Vec::new();
        if hp.strategy != Strategy::HeadOnly {
            groups.push(VarGroup {
                name: "backbone",
                lr: hp.learning_rate,
                vars: self.model.backbone_vars(),
            });
        }
        groups.push(VarGroup {
            name: "head",
            lr: hp.head_learning_rate,
            vars: self.model.head_vars(),
        });
        groups
    }

    fn prefetch(&mut self, batch: &[usize], step: u64) {
        if self.train.features.is_some() {
            return;
        }
        let handle = self.spawn_train_pixels(batch, step);
        self.pending = Some((step, batch.to_vec(), handle));
    }

    fn loss(&mut self, batch: &[usize], step: u64) -> Result<(Tensor, usize), TrainError> {
        let logits = match &self.train.features {
            Some(features) => {
                let x = features.index_select(&self.rows(batch)?, 0)?;
                self.model.head(&x, true)?
            }
            None => {
                let px = self.train_pixels(batch, step)?;
                self.model.forward(&px, true)?
            }
        };
        let targets = self.targets(&self.train, batch)?;
        // One "token" per image: the throughput meter then reads images per second.
        Ok((
            candle_nn::loss::cross_entropy(&logits, &targets)?,
            batch.len(),
        ))
    }

    fn evaluate(&mut self) -> Result<Option<ValidationResult>, TrainError> {
        let n = self.valid.images.len();
        if n == 0 {
            return Ok(None);
        }
        let logits = match &self.valid.features {
            Some(f) => self.model.head(f, false)?,
            None => {
                let model = &self.model;
                self.map_batches(&self.valid, |px| model.forward(px, false))?
            }
        }
        .to_dtype(DType::F32)?;
        let all: Vec<usize> = (0..n).collect();
        let targets = self.targets(&self.valid, &all)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let labels = self.model.labels().to_vec();
        let truth: Vec<usize> = self.valid.targets.iter().map(|&t| t as usize).collect();
        let r = classification_report(&labels, &truth, &probs);
        let mut metrics = BTreeMap::new();
        metrics.insert("valid_loss".to_owned(), f64::from(loss));
        metrics.insert("valid_accuracy".into(), r.accuracy);
        metrics.insert("valid_macro_f1".into(), r.macro_f1);
        if let Some(auc) = r.roc_auc {
            metrics.insert("valid_roc_auc".into(), auc);
        }
        for k in [3usize, 5] {
            if labels.len() > k {
                metrics.insert(
                    format!("valid_top{k}_accuracy"),
                    top_k_accuracy(&probs, &truth, k),
                );
            }
        }
        Ok(Some((
            metrics,
            json!({"labels": labels, "per_class": r.per_class, "confusion_matrix": r.confusion_matrix}),
        )))
    }

    fn export(&mut self, dir: &Path) -> Result<(), TrainError> {
        let weights = self.model.export_weights()?;
        let config = self.model.export_config();
        write_model_dir(
            dir,
            &config,
            &weights,
            &self.base_dir,
            &["preprocessor_config.json"],
        )?;
        let pre = dir.join("preprocessor_config.json");
        if !pre.exists() {
            let (h, w) = self.pre.crop;
            let v = json!({
                "do_normalize": true, "do_rescale": true, "do_resize": true,
                "image_mean": self.pre.mean, "image_std": self.pre.std,
                "resample": 2, "rescale_factor": 1.0 / 255.0,
                "size": {"height": h, "width": w},
                "image_processor_type": "ViTImageProcessor",
            });
            let text =
                serde_json::to_string_pretty(&v).map_err(|e| TrainError::Io(e.to_string()))?;
            std::fs::write(&pre, text)
                .map_err(|e| TrainError::Io(format!("{}: {e}", pre.display())))?;
        }
        Ok(())
    }

    fn buffers(&self) -> Vec<(String, Var)> {
        self.model.buffers()
    }
}

/// Fraction of rows whose true class is among the `k` highest probabilities.
fn top_k_accuracy(probs: &[Vec<f32>], truth: &[usize], k: usize) -> f64 {
    if probs.is_empty() {
        return 0.0;
    }
    let hits = probs
        .iter()
        .zip(truth)
        .filter(|(p, t)| {
            let Some(&pt) = p.get(**t) else { return false };
            // Rank = classes scoring strictly higher (ties count in the true class's favour).
            p.iter().filter(|&&x| x > pt).count() < k
        })
        .count();
    hits as f64 / probs.len() as f64
}

/// Reads the images, resolves the hyperparameters, builds the model and runs the loop.
pub(crate) fn run(
    job: &TrainingJob,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &StopSignal,
) -> Result<TrainOutcome, TrainError> {
    let all = read_image_dataset(&job.training_file).map_err(TrainError::Data)?;
    let (train_examples, valid_examples) = match &job.validation_file {
        Some(path) => (
            all,
            read_image_dataset(path)
                .map_err(|e| TrainError::Data(format!("validation file: {e}")))?,
        ),
        None => stratified_split_images(&all, 0.1, job.seed),
    };
    let names: std::collections::BTreeSet<&str> =
        train_examples.iter().map(|e| e.label.as_str()).collect();
    let labels: Vec<String> = names.into_iter().map(str::to_owned).collect();
    if labels.len() < 2 {
        return Err(TrainError::Data(format!(
            "classification needs at least two classes; the training data has {}",
            labels.len()
        )));
    }
    let (num_layers, side) = vision_layers(&job.base_model)?;
    let pre = Preprocess::from_model_dir(&job.base_model, side as u32).map_err(TrainError::Data)?;
    let ctx = ResolveContext {
        train_examples: train_examples.len(),
        num_layers,
        max_positions: pre.crop.0 as usize,
        p99_tokens: pre.crop.0 as usize,
        decoder: false,
        vision: true,
        bf16_native: crate::device::supports_bf16(&job.device),
    };
    let (hp, notes) = job.hyperparameters.resolve(&ctx)?;
    let opts = VisionLoadOptions {
        scratch: hp.strategy == Strategy::Scratch,
        freeze_embeddings: matches!(hp.strategy, Strategy::Freeze | Strategy::HeadOnly),
        freeze_layers: if hp.strategy == Strategy::Freeze {
            hp.freeze_layers as usize
        } else {
            0
        },
        freeze_backbone: hp.strategy == Strategy::HeadOnly,
        lora: (hp.strategy == Strategy::Lora).then(|| LoraConfig {
            rank: hp.lora_rank as usize,
            alpha: hp.lora_alpha,
            dropout: hp.lora_dropout,
            targets: lora_targets(&hp.lora_target_modules),
            seed: job.seed,
        }),
    };
    let varmap = VarMap::new();
    let model = load_image_classifier(
        &job.base_model,
        Some(labels.clone()),
        &varmap,
        &job.device,
        &opts,
        job.seed,
    )?;
    let index = |e: &ImageExample| -> Result<u32, TrainError> {
        labels
            .iter()
            .position(|l| *l == e.label)
            .map(|i| i as u32)
            .ok_or_else(|| {
                TrainError::Data(format!(
                    "{}: the validation data has class '{}', which the training data does not",
                    e.source, e.label
                ))
            })
    };
    let split = |examples: &[ImageExample]| -> Result<Split, TrainError> {
        Ok(Split {
            images: examples.iter().map(|e| e.bytes.clone()).collect(),
            targets: examples.iter().map(index).collect::<Result<_, _>>()?,
            features: None,
            pixels: None,
        })
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut task = ImageClassification {
        train: split(&train_examples)?,
        valid: split(&valid_examples)?,
        model,
        _varmap: varmap,
        pre: Arc::new(pre),
        augment: match hp.augmentation.unwrap_or(Augmentation::CropFlip) {
            Augmentation::None => Augment::None,
            Augmentation::Crop => Augment::Crop,
            Augmentation::CropFlip => Augment::CropFlip,
        },
        device: job.device.clone(),
        seed: job.seed,
        threads,
        pending: None,
        base_dir: job.base_model.clone(),
    };
    let total_steps = total_steps(&hp, task.train_len());
    on_event(&TrainEvent::Started {
        task: "image_classification",
        hyperparameters: hp.clone(),
        notes,
        train_examples: task.train.images.len(),
        valid_examples: task.valid.images.len(),
        total_steps,
        labels: labels.clone(),
        train_tokens: task.train.images.len() as u64,
    });
    let per = task.pre.pixels_per_image();
    if task.valid.images.len() * per <= EVAL_CACHE_FLOATS && !task.valid.images.is_empty() {
        let all: Vec<usize> = (0..task.valid.images.len()).collect();
        let px = task.eval_pixels(&task.valid, &all)?;
        task.valid.pixels = Some(px);
    }
    if hp.strategy == Strategy::HeadOnly {
        let started = std::time::Instant::now();
        // Not prepared for inference (`ImageClassifier::prepare_for_inference`), though the
        // backbone is frozen: at the bank's 32 images a batch, remaking the product forms each
        // pass costs little (ResNet-18 bank measured 59.8 against 59.8 images/s), and they
        // would take 100 MiB more.
        task.train.features = task.features(&task.train)?;
        task.valid.features = task.features(&task.valid)?;
        task.valid.pixels = None;
        on_event(&TrainEvent::message(format!(
            "Feature bank: {} images through the frozen backbone once in {:.1} s; only the head trains.",
            task.train.images.len() + task.valid.images.len(),
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
            task: "image_classification",
            baseline_metrics: None,
            labels,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k() {
        let probs = vec![vec![0.1, 0.2, 0.7], vec![0.5, 0.3, 0.2]];
        assert_eq!(top_k_accuracy(&probs, &[2, 2], 1), 0.5);
        assert_eq!(top_k_accuracy(&probs, &[1, 2], 2), 0.5);
        assert_eq!(top_k_accuracy(&probs, &[0, 2], 3), 1.0);
    }

    #[test]
    fn augment_seeds_differ_by_step_and_example() {
        assert_eq!(augment_seed(1, 2, 3), augment_seed(1, 2, 3));
        assert_ne!(augment_seed(1, 2, 3), augment_seed(1, 3, 3));
        assert_ne!(augment_seed(1, 2, 3), augment_seed(1, 2, 4));
    }
}
