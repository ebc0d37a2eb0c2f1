//! What kiln's image classifiers share (ResNet in [`super::resnet`], ViT in [`super::vit`]):
//! the load options the strategies map to, and the trait the trainer and the server use, so
//! neither needs to know which backbone it holds.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde_json::Value;

use super::Result;
use super::lora::LoraConfig;

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
}
