//! Serving image classifiers: decoding and preprocessing on tokio's blocking pool, forward
//! passes on the model's own thread, which batches every request waiting (images of several
//! requests in one pass), like the text encoders' threads.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use candle_core::{D, Device, Tensor};
use candle_nn::VarMap;
use tokio::sync::oneshot;

use super::{ServeError, Slots};
use crate::data::images::{Preprocess, decode_rgb};
use crate::nn::vision::{ImageClassifier, VisionLoadOptions, load_image_classifier};

/// Images in one forward pass at most.
const MAX_IMAGE_BATCH: usize = 32;

/// A loaded image classifier with its preprocessing.
pub struct ImageModel {
    model: Box<dyn ImageClassifier>,
    pub preprocess: Preprocess,
    pub labels: Vec<String>,
    device: Device,
    /// Bytes of the weights' inference forms (`ImageClassifier::prepare_for_inference`).
    pub prepared_bytes: u64,
    // The head's variables live here; nothing trains them.
    _varmap: VarMap,
}

impl ImageModel {
    /// Loads the classifier in `dir` with its own labels and preprocessing config.
    pub fn load(dir: &Path, device: &Device) -> Result<ImageModel, String> {
        let varmap = VarMap::new();
        let opts = VisionLoadOptions {
            freeze_backbone: true,
            ..VisionLoadOptions::default()
        };
        let mut model = load_image_classifier(dir, None, &varmap, device, &opts, 0)
            .map_err(|e| e.to_string())?;
        // Serving runs the same weights again and again: put them in their product forms once.
        let prepared_bytes = model.prepare_for_inference().map_err(|e| e.to_string())?;
        let preprocess = Preprocess::from_model_dir(dir, model.image_size() as u32)?;
        let labels = model.labels().to_vec();
        Ok(ImageModel {
            model,
            preprocess,
            labels,
            device: device.clone(),
            prepared_bytes,
            _varmap: varmap,
        })
    }

    /// Decodes and preprocesses one image into `[3, h, w]` floats.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        Ok(self.preprocess.eval(&decode_rgb(bytes)?))
    }

    /// Class probabilities of `n` preprocessed images laid end to end.
    pub fn classify(&self, pixels: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>, String> {
        let (h, w) = (
            self.preprocess.crop.0 as usize,
            self.preprocess.crop.1 as usize,
        );
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let x = Tensor::from_vec(pixels, (n, 3, h, w), &self.device)?;
            let logits = self.model.forward(&x, false)?.detach();
            candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()
        };
        run().map_err(|e| e.to_string())
    }
}

/// An image classifier with its batching thread. Dropping the last handle ends the thread.
pub struct LoadedImageModel {
    pub model: Arc<ImageModel>,
    pub bytes: u64,
    pub(super) queue: mpsc::Sender<ImageWork>,
}

pub(super) struct ImageWork {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, ServeError>>,
    pub deadline: Instant,
    pub timeout: Duration,
}

/// The model's thread: takes every request waiting and classifies their images together,
/// in passes of at most [`MAX_IMAGE_BATCH`], holding one inference slot.
pub(super) fn run_image_model(
    model: Arc<ImageModel>,
    rx: mpsc::Receiver<ImageWork>,
    slots: Arc<Slots>,
) {
    while let Ok(first) = rx.recv() {
        let mut works = vec![first];
        while let Ok(more) = rx.try_recv() {
            works.push(more);
        }
        let now = Instant::now();
        let mut live = Vec::with_capacity(works.len());
        for work in works {
            if work.deadline <= now {
                let _ = work.reply.send(Err(ServeError::Timeout(work.timeout)));
            } else {
                live.push(work);
            }
        }
        if live.is_empty() {
            continue;
        }
        let _slot = slots.acquire();
        let started = Instant::now();
        let per = model.preprocess.pixels_per_image();
        let total: usize = live.iter().map(|w| w.n).sum();
        let mut all = Vec::with_capacity(total * per);
        for w in &mut live {
            all.append(&mut w.pixels);
        }
        let mut probs: Vec<Vec<f32>> = Vec::with_capacity(total);
        let mut failed = None;
        for chunk in all.chunks(MAX_IMAGE_BATCH * per) {
            match model.classify(chunk.to_vec(), chunk.len() / per) {
                Ok(p) => probs.extend(p),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut rest = probs.into_iter();
        for w in live {
            let result = match &failed {
                Some(e) => Err(ServeError::Internal(e.clone())),
                None => Ok(rest.by_ref().take(w.n).collect()),
            };
            let _ = w.reply.send(result);
        }
        metrics::histogram!("kiln_serve_batch_inputs").record(total as f64);
        metrics::histogram!("kiln_serve_batch_seconds").record(started.elapsed().as_secs_f64());
    }
}
