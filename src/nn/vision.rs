//! What kiln's image classifiers share (ResNet in [`super::resnet`], ViT in [`super::vit`]):
//! the load options the strategies map to, and the trait the trainer and the server use, so
//! neither needs to know which backbone it holds.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use serde_json::Value;

use super::lora::LoraConfig;
use super::{NnError, Result};

/// How a backbone is loaded for a strategy.
#[derive(Debug, Clone, Default)]
pub struct VisionLoadOptions {
    /// Ignore the checkpoint's weights and start from a seeded random initialisation (only
    /// `config.json` is read): `strategy: "scratch"`.
    pub scratch: bool,
    /// Keep the stem (ResNet) or patch and position embeddings (ViT) fixed.
    pub freeze_embeddings: bool,
    /// Keep the lowest N stages (ResNet) or encoder layers (ViT) fixed; BatchNorm layers in
    /// them run in eval mode with their running statistics.
    pub freeze_layers: usize,
    /// Freeze the whole backbone (feature extraction, inference); only the head is trainable.
    pub freeze_backbone: bool,
    /// Low-rank adapters with the base frozen (ViT; a ResNet refuses it).
    pub lora: Option<LoraConfig>,
}

/// An image classifier: a backbone that pools an image into a feature vector, and a linear
/// head over it, in transformers' `*ForImageClassification` layout.
pub trait ImageClassifier: Send + Sync {
    /// Class names, in logit order.
    fn labels(&self) -> &[String];
    /// Width of the pooled feature vector.
    fn feature_dim(&self) -> usize;
    /// The square input side the model expects (ViT's `image_size`; 224 for a ResNet unless
    /// its preprocessing says otherwise).
    fn image_size(&self) -> usize;
    /// Pooled features `[batch, feature_dim]` of normalised pixels `[batch, 3, h, w]`;
    /// `train` turns on dropout and batch statistics in the BatchNorm layers that train.
    fn features(&self, pixels: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Logits `[batch, labels]` from pooled features.
    fn head(&self, features: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Logits of normalised pixels.
    fn forward(&self, pixels: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.head(&self.features(pixels, train)?, train)
    }
    /// Trainable backbone variables (LoRA adapters only, under LoRA), by checkpoint name.
    fn backbone_vars(&self) -> Vec<(String, Var)>;
    /// The head's trainable variables.
    fn head_vars(&self) -> Vec<(String, Var)>;
    /// State that training changes without the optimizer (BatchNorm running statistics),
    /// saved and restored with checkpoints.
    fn buffers(&self) -> Vec<(String, Var)>;
    /// Every weight under transformers' names (LoRA merged), buffers included.
    fn export_weights(&self) -> Result<HashMap<String, Tensor>>;
    /// `config.json` of the exported model: the base's keys, with `architectures`,
    /// `id2label` and `label2id` for these labels.
    fn export_config(&self) -> Value;
    /// Prepares the weights for inference once (a convolution's product form, a linear's
    /// packing) where the model has such a form: passes with `train` false then read the
    /// prepared copies. Only while the weights stay as they are (serving, a frozen backbone);
    /// returns the bytes the copies take.
    fn prepare_for_inference(&mut self) -> Result<u64> {
        Ok(0)
    }
    /// Drops what [`ImageClassifier::prepare_for_inference`] made (before the weights change).
    fn unprepare(&mut self) {}
}

/// The vision families kiln trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionFamily {
    /// transformers' ResNet, or a timm `resnet*` checkpoint.
    ResNet,
    /// transformers' ViT (google/vit-*).
    Vit,
}

fn read_config(dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn family_of(config: &Value) -> Option<VisionFamily> {
    match config.get("model_type").and_then(Value::as_str) {
        Some("resnet") => return Some(VisionFamily::ResNet),
        Some("vit") => return Some(VisionFamily::Vit),
        Some(_) => return None,
        None => {}
    }
    // timm writes `architecture: "resnet50"` and no model_type.
    match config.get("architecture").and_then(Value::as_str) {
        Some(a) if a.starts_with("resnet") => Some(VisionFamily::ResNet),
        _ => None,
    }
}

/// The vision family of the model in `dir`, or `None` when it is not an image classifier.
pub fn vision_family(dir: &Path) -> Option<VisionFamily> {
    family_of(&read_config(dir)?)
}

/// The depth `freeze_layers` counts in (ResNet stages, ViT layers) and the square input
/// side the model's config implies (ViT's `image_size`; 224 for a ResNet).
pub fn vision_layers(dir: &Path) -> Result<(usize, usize)> {
    let config = read_config(dir).ok_or_else(|| {
        NnError::InvalidConfig(format!("{}: no readable config.json", dir.display()))
    })?;
    let get = |k: &str| config.get(k).and_then(Value::as_u64).map(|v| v as usize);
    match family_of(&config) {
        Some(VisionFamily::Vit) => Ok((
            get("num_hidden_layers").unwrap_or(12),
            get("image_size").unwrap_or(224),
        )),
        Some(VisionFamily::ResNet) => Ok((
            config
                .get("depths")
                .and_then(Value::as_array)
                .map_or(4, Vec::len),
            224,
        )),
        None => Err(NnError::InvalidConfig(format!(
            "{}: not a ResNet or ViT image classifier",
            dir.display()
        ))),
    }
}

/// Loads the image classifier in `dir` (ResNet or ViT) for `labels` (`None`: the
/// checkpoint's own, for inference).
pub fn load_image_classifier(
    dir: &Path,
    labels: Option<Vec<String>>,
    varmap: &VarMap,
    device: &Device,
    opts: &VisionLoadOptions,
    seed: u64,
) -> Result<Box<dyn ImageClassifier>> {
    match vision_family(dir) {
        Some(VisionFamily::ResNet) => Ok(Box::new(
            super::resnet::ResNetForImageClassification::from_dir(
                dir, labels, varmap, device, opts, seed,
            )?,
        )),
        Some(VisionFamily::Vit) => Ok(Box::new(super::vit::VitForImageClassification::from_dir(
            dir, labels, varmap, device, opts, seed,
        )?)),
        None => Err(NnError::InvalidConfig(format!(
            "{}: not a ResNet or ViT image classifier",
            dir.display()
        ))),
    }
}
