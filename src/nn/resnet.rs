//! A trainable ResNet for image classification, in transformers' `ResNetForImageClassification`
//! layout (microsoft/resnet-*), that also loads timm/torchvision-named checkpoints
//! (`conv1`, `bn1`, `layer1.0.conv1`, `fc`, ...) onto the same model.
//!
//! Stem: 7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool. Stages of basic (two 3x3) or
//! bottleneck (1x1, 3x3, 1x1 with a 4x reduction) residual blocks; the first block of every
//! stage but the first downsamples with stride 2 (in the 3x3 convolution, or in the first 1x1
//! with `downsample_in_bottleneck`), and a 1x1 convolution + BatchNorm shortcut projects the
//! residual whenever the shape changes. Global average pooling, then a linear head
//! (`classifier.1`).
//!
//! Activations run channels-last through kiln's kernels in [`super::conv`], which carry their
//! own backward. BatchNorm layers that train use batch statistics in training mode and update
//! their running statistics (kept as `Var`s outside the `VarMap`, see
//! [`ImageClassifier::buffers`]); frozen layers, and every layer in eval mode, use the running
//! statistics.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::classifier::labels_from_config;
use super::conv::{self, BatchNormStats};
use super::layers::{Checkpoint, Linear, WeightSource, load_model_weights};
use super::vision::{ImageClassifier, VisionLoadOptions};
use super::{NnError, Result};

/// BatchNorm epsilon of `nn.BatchNorm2d` (transformers and timm keep the default).
const BN_EPS: f64 = 1e-5;
/// Weight of the new batch statistics in the running statistics (torch's default).
const BN_MOMENTUM: f64 = 0.1;

/// The residual block type (`layer_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerType {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152).
    Bottleneck,
}

fn default_channels() -> usize {
    3
}
fn default_embedding() -> usize {
    64
}
fn default_hidden_sizes() -> Vec<usize> {
    vec![256, 512, 1024, 2048]
}
fn default_depths() -> Vec<usize> {
    vec![3, 4, 6, 3]
}
fn default_layer_type() -> LayerType {
    LayerType::Bottleneck
}
fn default_act() -> String {
    "relu".into()
}

/// The architecture part of transformers' `ResNetConfig` (defaults are transformers').
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Output channels of the stem.
    #[serde(default = "default_embedding")]
    pub embedding_size: usize,
    /// Output channels of each stage.
    #[serde(default = "default_hidden_sizes")]
    pub hidden_sizes: Vec<usize>,
    /// Residual blocks per stage.
    #[serde(default = "default_depths")]
    pub depths: Vec<usize>,
    /// Basic or bottleneck blocks.
    #[serde(default = "default_layer_type")]
    pub layer_type: LayerType,
    /// Only `"relu"` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Whether the first stage downsamples (stride 2) too.
    #[serde(default)]
    pub downsample_in_first_stage: bool,
    /// Bottleneck blocks downsample in their first 1x1 convolution rather than the 3x3.
    #[serde(default)]
    pub downsample_in_bottleneck: bool,
    /// Class names by id (string keys, as in `config.json`); empty when the config has none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub id2label: BTreeMap<String, String>,
}

impl ResNetConfig {
    /// Parses a `config.json`: transformers' `ResNetConfig`, or a timm one
    /// (`"architecture": "resnet50"`, `num_classes`, `label_names`).
    pub fn from_value(raw: &Value) -> Result<Self> {
        let cfg = match raw.get("architecture").and_then(Value::as_str) {
            Some(arch) => Self::from_timm(arch, raw)?,
            None => serde_json::from_value::<Self>(raw.clone())
                .map_err(|e| NnError::InvalidConfig(format!("not a ResNet config.json: {e}")))?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json` (see [`Self::from_value`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?)
    }

    /// The HF equivalent of a timm ResNet (`resnet18`, `resnet34`, `resnet26`, `resnet50`,
    /// `resnet101`, `resnet152`, `resnet200`; an optional `.tag` or `tv_` prefix is ignored).
    fn from_timm(arch: &str, raw: &Value) -> Result<Self> {
        let base = arch.split('.').next().unwrap_or(arch);
        let base = base.strip_prefix("tv_").unwrap_or(base);
        let (layer_type, depths) = match base {
            "resnet18" => (LayerType::Basic, vec![2, 2, 2, 2]),
            "resnet34" => (LayerType::Basic, vec![3, 4, 6, 3]),
            "resnet26" => (LayerType::Bottleneck, vec![2, 2, 2, 2]),
            "resnet50" => (LayerType::Bottleneck, vec![3, 4, 6, 3]),
            "resnet101" => (LayerType::Bottleneck, vec![3, 4, 23, 3]),
            "resnet152" => (LayerType::Bottleneck, vec![3, 8, 36, 3]),
            "resnet200" => (LayerType::Bottleneck, vec![3, 24, 36, 3]),
            _ => {
                return Err(NnError::InvalidConfig(format!(
                    "timm architecture `{arch}` is not a plain ResNet kiln supports (resnet18, \
                     resnet34, resnet26, resnet50, resnet101, resnet152, resnet200)"
                )));
            }
        };
        let hidden_sizes = match layer_type {
            LayerType::Basic => vec![64, 128, 256, 512],
            LayerType::Bottleneck => vec![256, 512, 1024, 2048],
        };
        let id2label = timm_labels(raw)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l))
            .collect();
        Ok(Self {
            num_channels: raw
                .get("in_chans")
                .and_then(Value::as_u64)
                .map_or(3, |c| c as usize),
            embedding_size: 64,
            hidden_sizes,
            depths,
            layer_type,
            hidden_act: "relu".into(),
            downsample_in_first_stage: false,
            downsample_in_bottleneck: false,
            id2label,
        })
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NnError::InvalidConfig(m));
        if self.hidden_sizes.is_empty() || self.hidden_sizes.len() != self.depths.len() {
            return bad(format!(
                "hidden_sizes {:?} and depths {:?} must be non-empty and of the same length",
                self.hidden_sizes, self.depths
            ));
        }
        if self.num_channels == 0
            || self.embedding_size == 0
            || self.hidden_sizes.contains(&0)
            || self.depths.contains(&0)
        {
            return bad("channels, sizes and depths must all be > 0".into());
        }
        if self.layer_type == LayerType::Bottleneck && self.hidden_sizes.iter().any(|&h| h < 4) {
            return bad("bottleneck stages need hidden sizes of at least 4 (reduction 4)".into());
        }
        if self.hidden_act != "relu" {
            return bad(format!(
                "hidden_act `{}` is not supported (kiln's ResNet uses relu)",
                self.hidden_act
            ));
        }
        Ok(())
    }

    /// Labels in id order from `id2label`, when it is complete.
    pub fn labels(&self) -> Option<Vec<String>> {
        labels_from_config(&json!({ "id2label": self.id2label }))
    }

    /// transformers' `config.json` for this architecture (no labels, no `architectures`).
    pub fn to_hf_json(&self) -> Value {
        json!({
            "model_type": "resnet",
            "num_channels": self.num_channels,
            "embedding_size": self.embedding_size,
            "hidden_sizes": self.hidden_sizes,
            "depths": self.depths,
            "layer_type": self.layer_type,
            "hidden_act": self.hidden_act,
            "downsample_in_first_stage": self.downsample_in_first_stage,
            "downsample_in_bottleneck": self.downsample_in_bottleneck,
        })
    }

    /// The convolutions of the network, in forward order.
    fn layout(&self) -> (ConvSpec, Vec<BlockSpec>) {
        let stem = ConvSpec {
            prefix: "resnet.embedder.embedder".into(),
            cin: self.num_channels,
            cout: self.embedding_size,
            k: 7,
            stride: 2,
            relu: true,
        };
        let mut blocks = Vec::new();
        let mut cin = self.embedding_size;
        for (s, (&cout, &depth)) in self.hidden_sizes.iter().zip(&self.depths).enumerate() {
            let stage_stride = if s > 0 || self.downsample_in_first_stage {
                2
            } else {
                1
            };
            for l in 0..depth {
                let (bin, stride) = if l == 0 {
                    (cin, stage_stride)
                } else {
                    (cout, 1)
                };
                let p = format!("resnet.encoder.stages.{s}.layers.{l}");
                let conv =
                    |k: usize, cin: usize, cout: usize, stride: usize, relu: bool, i| ConvSpec {
                        prefix: format!("{p}.layer.{i}"),
                        cin,
                        cout,
                        k,
                        stride,
                        relu,
                    };
                let layers = match self.layer_type {
                    LayerType::Basic => vec![
                        conv(3, bin, cout, stride, true, 0),
                        conv(3, cout, cout, 1, false, 1),
                    ],
                    LayerType::Bottleneck => {
                        let r = cout / 4;
                        let (s1, s3) = if self.downsample_in_bottleneck {
                            (stride, 1)
                        } else {
                            (1, stride)
                        };
                        vec![
                            conv(1, bin, r, s1, true, 0),
                            conv(3, r, r, s3, true, 1),
                            conv(1, r, cout, 1, false, 2),
                        ]
                    }
                };
                let shortcut = (bin != cout || stride != 1).then(|| ConvSpec {
                    prefix: format!("{p}.shortcut"),
                    cin: bin,
                    cout,
                    k: 1,
                    stride,
                    relu: false,
                });
                blocks.push(BlockSpec {
                    stage: s,
                    layers,
                    shortcut,
                });
            }
            cin = cout;
        }
        (stem, blocks)
    }

    /// Width of the pooled features.
    pub fn feature_dim(&self) -> usize {
        self.hidden_sizes.last().copied().unwrap_or(0)
    }
}

/// One convolution + BatchNorm (+ ReLU) of the network.
#[derive(Debug, Clone)]
struct ConvSpec {
    /// `...{convolution,normalization}` live under this prefix.
    prefix: String,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    relu: bool,
}

impl ConvSpec {
    fn weight_shape(&self) -> [usize; 4] {
        [self.cout, self.cin, self.k, self.k]
    }
}

/// One residual block.
#[derive(Debug, Clone)]
struct BlockSpec {
    stage: usize,
    layers: Vec<ConvSpec>,
    shortcut: Option<ConvSpec>,
}

/// The class names of a timm config (`label_names`), or `LABEL_i` for `num_classes`.
fn timm_labels(raw: &Value) -> Option<Vec<String>> {
    if let Some(names) = raw.get("label_names").and_then(Value::as_array) {
        let names: Option<Vec<String>> =
            names.iter().map(|v| v.as_str().map(String::from)).collect();
        return names.filter(|n| !n.is_empty());
    }
    let n = raw.get("num_classes").and_then(Value::as_u64)?;
    (n > 0).then(|| (0..n).map(|i| format!("LABEL_{i}")).collect())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| NnError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| NnError::ConfigParse {
        path: path.to_path_buf(),
        source,
    })
}

/// Renames a timm/torchvision ResNet checkpoint (`conv1`, `bn1`, `layerN.i.convK`, `bnK`,
/// `downsample.{0,1}`, `fc`) to transformers' names; other tensors are dropped.
pub fn timm_to_hf_names(ckpt: &Checkpoint) -> Checkpoint {
    let mut out = Checkpoint::new();
    for (name, t) in ckpt {
        if let Some(hf) = timm_name_to_hf(name) {
            out.insert(hf, t.clone());
        }
    }
    out
}

/// One timm name to its transformers name (`None` for tensors transformers has no place for,
/// such as `num_batches_tracked`).
fn timm_name_to_hf(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let bn_leaf = |leaf: &str| {
        matches!(
            leaf,
            "weight" | "bias" | "running_mean" | "running_var" | "num_batches_tracked"
        )
    };
    match parts.as_slice() {
        ["conv1", "weight"] => Some("resnet.embedder.embedder.convolution.weight".into()),
        ["bn1", leaf] if bn_leaf(leaf) => {
            Some(format!("resnet.embedder.embedder.normalization.{leaf}"))
        }
        ["fc", leaf @ ("weight" | "bias")] => Some(format!("classifier.1.{leaf}")),
        [layer, block, module, rest @ ..] => {
            let stage = layer
                .strip_prefix("layer")?
                .parse::<usize>()
                .ok()?
                .checked_sub(1)?;
            let block: usize = block.parse().ok()?;
            let p = format!("resnet.encoder.stages.{stage}.layers.{block}");
            match (*module, rest) {
                ("downsample", ["0", "weight"]) => Some(format!("{p}.shortcut.convolution.weight")),
                ("downsample", ["1", leaf]) if bn_leaf(leaf) => {
                    Some(format!("{p}.shortcut.normalization.{leaf}"))
                }
                (m, ["weight"]) if m.starts_with("conv") => {
                    let k = m
                        .strip_prefix("conv")?
                        .parse::<usize>()
                        .ok()?
                        .checked_sub(1)?;
                    Some(format!("{p}.layer.{k}.convolution.weight"))
                }
                (m, [leaf]) if m.starts_with("bn") && bn_leaf(leaf) => {
                    let k = m
                        .strip_prefix("bn")?
                        .parse::<usize>()
                        .ok()?
                        .checked_sub(1)?;
                    Some(format!("{p}.layer.{k}.normalization.{leaf}"))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Brings a checkpoint to transformers' `ResNetForImageClassification` names: timm names are
/// renamed, a bare `ResNetModel` (no `resnet.` prefix) gets the prefix.
fn normalise_names(ckpt: Checkpoint) -> Checkpoint {
    if ckpt.contains_key("resnet.embedder.embedder.convolution.weight") {
        return ckpt;
    }
    if ckpt.contains_key("embedder.embedder.convolution.weight") {
        return ckpt
            .into_iter()
            .map(|(n, t)| {
                if n.starts_with("classifier.") {
                    (n, t)
                } else {
                    (format!("resnet.{n}"), t)
                }
            })
            .collect();
    }
    if ckpt.contains_key("conv1.weight") && ckpt.contains_key("layer1.0.conv1.weight") {
        return timm_to_hf_names(&ckpt);
    }
    ckpt
}

/// How [`random_checkpoint`] initialises BatchNorm.
#[derive(Clone, Copy, PartialEq)]
enum BnInit {
    /// weight 1, bias 0, running mean 0, running variance 1 (training from scratch).
    Identity,
    /// Random affine parameters and running statistics (test models that exercise them).
    Random,
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A fresh linear head `[labels, features]` like torch's `nn.Linear` init (uniform within
/// `1/sqrt(features)`), zero bias.
fn fresh_head(
    labels: usize,
    features: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (features as f32).sqrt();
    let w: Vec<f32> = (0..labels * features)
        .map(|_| rng.random_range(-bound..=bound))
        .collect();
    Ok((
        Tensor::from_vec(w, (labels, features), device)?,
        Tensor::zeros(labels, DType::F32, device)?,
    ))
}

/// Every backbone tensor of `config`, seeded: convolutions Kaiming-normal (fan-out, ReLU gain)
/// as torchvision and transformers initialise them, BatchNorm per `bn`.
fn random_backbone(
    config: &ResNetConfig,
    seed: u64,
    bn: BnInit,
    device: &Device,
) -> Result<Checkpoint> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (stem, blocks) = config.layout();
    let convs = std::iter::once(&stem).chain(
        blocks
            .iter()
            .flat_map(|b| b.layers.iter().chain(b.shortcut.iter())),
    );
    let mut out = Checkpoint::new();
    for spec in convs {
        let shape = spec.weight_shape();
        let std = (2.0 / (spec.cout * spec.k * spec.k) as f32).sqrt();
        let w: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| normal(&mut rng) * std)
            .collect();
        out.insert(
            format!("{}.convolution.weight", spec.prefix),
            Tensor::from_vec(w, &shape, device)?,
        );
        let c = spec.cout;
        let mut vec_of = |f: &mut dyn FnMut(&mut StdRng) -> f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..c).map(|_| f(&mut rng)).collect();
            Ok(Tensor::from_vec(v, c, device)?)
        };
        let n = format!("{}.normalization", spec.prefix);
        let (w, b, m, v) = match bn {
            BnInit::Identity => (
                vec_of(&mut |_| 1.0)?,
                vec_of(&mut |_| 0.0)?,
                vec_of(&mut |_| 0.0)?,
                vec_of(&mut |_| 1.0)?,
            ),
            BnInit::Random => (
                vec_of(&mut |r| r.random_range(0.5..1.5))?,
                vec_of(&mut |r| r.random_range(-0.2..0.2))?,
                vec_of(&mut |r| r.random_range(-0.3..0.3))?,
                vec_of(&mut |r| r.random_range(0.5..2.0))?,
            ),
        };
        out.insert(format!("{n}.weight"), w);
        out.insert(format!("{n}.bias"), b);
        out.insert(format!("{n}.running_mean"), m);
        out.insert(format!("{n}.running_var"), v);
        let tracked = if bn == BnInit::Random { 100 } else { 0 };
        out.insert(
            format!("{n}.num_batches_tracked"),
            Tensor::new(tracked as i64, device)?,
        );
    }
    Ok(out)
}

/// BatchNorm2d with trainable (or frozen) affine parameters and running statistics.
struct BatchNorm {
    prefix: String,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    /// Trains: batch statistics in training mode, running statistics updated.
    trainable: bool,
    /// torch's `num_batches_tracked` (the checkpoint's, plus training-mode forwards since).
    /// Only exported: with a fixed momentum nothing reads it, so it is not a buffer.
    batches_tracked: AtomicI64,
    /// Candle ops instead of the CPU kernels (see `ResNetForImageClassification::candle_ops`).
    candle_ops: bool,
}

impl BatchNorm {
    fn load(src: &mut WeightSource, prefix: &str, c: usize, trainable: bool) -> Result<Self> {
        let weight = src.get(&format!("{prefix}.weight"), &[c], trainable)?;
        let bias = src.get(&format!("{prefix}.bias"), &[c], trainable)?;
        let mean = src.get(&format!("{prefix}.running_mean"), &[c], false)?;
        let var = src.get(&format!("{prefix}.running_var"), &[c], false)?;
        let tracked_name = format!("{prefix}.num_batches_tracked");
        // A 0-d integer in torch's checkpoints; any single number is accepted, and a missing
        // or odd one counts as 0 (nothing reads it with a fixed momentum).
        let tracked = [&[][..], &[1][..]]
            .iter()
            .find_map(|shape| src.get(&tracked_name, shape, false).ok())
            .and_then(|t| {
                t.flatten_all()
                    .ok()?
                    .to_dtype(DType::F64)
                    .ok()?
                    .to_vec1::<f64>()
                    .ok()
            })
            .and_then(|v| v.first().copied())
            .map_or(0, |v| v as i64);
        Ok(Self {
            prefix: prefix.to_string(),
            weight,
            bias,
            running_mean: Var::from_tensor(&mean)?,
            running_var: Var::from_tensor(&var)?,
            trainable,
            batches_tracked: AtomicI64::new(tracked),
            candle_ops: false,
        })
    }

    /// The running mean and variance, in f64.
    fn running_stats(&self) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
        let to_f64 = |v: &Var| -> candle_core::Result<Vec<f64>> {
            Ok(v.as_tensor()
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        Ok((to_f64(&self.running_mean)?, to_f64(&self.running_var)?))
    }

    /// Moves the running statistics toward a training batch's `mean` and biased `var` (over
    /// `n` values a channel), as torch does (the variance unbiased).
    fn update_running(&self, mean: &[f64], var: &[f64], n: usize) -> candle_core::Result<()> {
        if n < 2 {
            candle_core::bail!(
                "BatchNorm `{}` in training needs more than one value per channel",
                self.prefix
            )
        }
        let (running_mean, running_var) = self.running_stats()?;
        let unbiased = n as f64 / (n - 1) as f64;
        let m = BN_MOMENTUM;
        let new_mean: Vec<f32> = running_mean
            .iter()
            .zip(mean)
            .map(|(r, b)| ((1.0 - m) * r + m * b) as f32)
            .collect();
        let new_var: Vec<f32> = running_var
            .iter()
            .zip(var)
            .map(|(r, b)| ((1.0 - m) * r + m * b * unbiased) as f32)
            .collect();
        let (c, dev) = (mean.len(), self.running_mean.device());
        let dtype = self.running_mean.dtype();
        self.running_mean
            .set(&Tensor::from_vec(new_mean, c, dev)?.to_dtype(dtype)?)?;
        self.running_var
            .set(&Tensor::from_vec(new_var, c, dev)?.to_dtype(dtype)?)?;
        self.batches_tracked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`BatchNorm::update_running`] as candle ops on the statistics' device (in f32): nothing
    /// is read back, so a GPU is not made to wait for the batch's statistics at every layer
    /// (four transfers a layer, 80 a ResNet-18 step, each a synchronisation).
    fn update_running_ops(&self, mean: &Tensor, var: &Tensor, n: usize) -> candle_core::Result<()> {
        if n < 2 {
            candle_core::bail!(
                "BatchNorm `{}` in training needs more than one value per channel",
                self.prefix
            )
        }
        let unbiased = n as f64 / (n - 1) as f64;
        let m = BN_MOMENTUM;
        let dtype = self.running_mean.dtype();
        let moved = |running: &Var, batch: &Tensor, scale: f64| -> candle_core::Result<Tensor> {
            running.as_tensor().affine(1.0 - m, 0.0)?
                + batch.detach().to_dtype(dtype)?.affine(m * scale, 0.0)?
        };
        let new_mean = moved(&self.running_mean, mean, 1.0)?;
        let new_var = moved(&self.running_var, var, unbiased)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        self.batches_tracked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`BatchNorm::forward`] as candle ops, on the activations' device.
    fn forward_ops(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (mean, var) = if train && self.trainable {
            let (mean, var) = conv::channel_stats_ops(x)?;
            let c = self.weight.dim(0)?;
            self.update_running_ops(&mean, &var, x.elem_count() / c.max(1))?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().detach(),
                self.running_var.as_tensor().detach(),
            )
        };
        conv::batch_norm_ops(
            x,
            &self.weight,
            &self.bias,
            (&mean, &var),
            BN_EPS,
            relu,
            residual,
        )
    }

    /// BatchNorm of `x`, then ReLU when `relu`; with a `residual`, `relu(bn(x) + residual)`.
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if self.candle_ops || !x.device().is_cpu() {
            return self.forward_ops(x, train, relu, residual);
        }
        let c = self.weight.dim(0)?;
        let (mean, var, batch_stats) = if train && self.trainable {
            let (mean, var) = conv::channel_stats(x)?;
            self.update_running(&mean, &var, x.elem_count() / c.max(1))?;
            (mean, var, true)
        } else {
            let (mean, var) = self.running_stats()?;
            (mean, var, false)
        };
        let stats = BatchNormStats {
            mean,
            var,
            eps: BN_EPS,
            batch_stats,
            relu,
        };
        match residual {
            Some(r) => conv::batch_norm_add_relu(x, &self.weight, &self.bias, r, &stats),
            None => conv::batch_norm(x, &self.weight, &self.bias, &stats),
        }
    }

    fn export(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let p = &self.prefix;
        let tracked = self.batches_tracked.load(Ordering::Relaxed);
        out.insert(
            format!("{p}.num_batches_tracked"),
            Tensor::new(tracked, self.weight.device())?,
        );
        out.insert(format!("{p}.weight"), self.weight.detach());
        out.insert(format!("{p}.bias"), self.bias.detach());
        out.insert(
            format!("{p}.running_mean"),
            self.running_mean.as_tensor().detach(),
        );
        out.insert(
            format!("{p}.running_var"),
            self.running_var.as_tensor().detach(),
        );
        Ok(())
    }

    fn buffers(&self) -> [(String, Var); 2] {
        [
            (
                format!("{}.running_mean", self.prefix),
                self.running_mean.clone(),
            ),
            (
                format!("{}.running_var", self.prefix),
                self.running_var.clone(),
            ),
        ]
    }
}

/// Convolution, BatchNorm, optional ReLU.
struct ConvBn {
    name: String,
    weight: Tensor,
    stride: usize,
    padding: usize,
    bn: BatchNorm,
    relu: bool,
    /// The weight prepared for inference (`prepare_for_inference`): passes without training
    /// read it instead of preparing the weight again.
    prepared: Option<Arc<conv::PreparedWeight>>,
}

impl ConvBn {
    fn load(src: &mut WeightSource, spec: &ConvSpec, trainable: bool) -> Result<Self> {
        let name = format!("{}.convolution.weight", spec.prefix);
        Ok(Self {
            weight: src.get(&name, &spec.weight_shape(), trainable)?,
            name,
            stride: spec.stride,
            padding: spec.k / 2,
            bn: BatchNorm::load(
                src,
                &format!("{}.normalization", spec.prefix),
                spec.cout,
                trainable,
            )?,
            relu: spec.relu,
            prepared: None,
        })
    }

    fn conv(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.prepared {
            _ if self.bn.candle_ops || !x.device().is_cpu() => {
                conv::conv2d_ops(x, &self.weight, self.stride, self.padding)
            }
            Some(p) if !train => conv::conv2d_prepared(x, &self.weight, p),
            _ => conv::conv2d(x, &self.weight, self.stride, self.padding),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.conv(x, train)?;
        self.bn.forward(&y, train, self.relu, None)
    }

    /// `relu(bn(conv(x)) + residual)`: a block's last layer with its shortcut (one op).
    fn forward_add_relu(
        &self,
        x: &Tensor,
        train: bool,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let y = self.conv(x, train)?;
        self.bn.forward(&y, train, true, Some(residual))
    }

    fn export(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        out.insert(self.name.clone(), self.weight.detach());
        self.bn.export(out)
    }
}

/// One residual block.
struct Block {
    layers: Vec<ConvBn>,
    shortcut: Option<ConvBn>,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let residual = match &self.shortcut {
            Some(s) => s.forward(x, train)?,
            None => x.clone(),
        };
        let Some((last, first)) = self.layers.split_last() else {
            return residual.relu();
        };
        let mut h = x.clone();
        for layer in first {
            h = layer.forward(&h, train)?;
        }
        last.forward_add_relu(&h, train, &residual)
    }

    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        self.layers.iter().chain(self.shortcut.iter())
    }
}

/// A ResNet with a linear classification head, as transformers' `ResNetForImageClassification`.
pub struct ResNetForImageClassification {
    config: ResNetConfig,
    /// The base's `config.json`, kept for export.
    raw_config: Value,
    /// The base is a timm checkpoint (its config is rewritten on export).
    timm: bool,
    labels: Vec<String>,
    image_size: usize,
    stem: ConvBn,
    blocks: Vec<Block>,
    classifier: Linear,
    backbone_vars: Vec<(String, Var)>,
    head_vars: Vec<(String, Var)>,
}

impl ResNetForImageClassification {
    /// Loads a model directory (`config.json`, `model.safetensors`; transformers or timm
    /// names), registering trainable weights in `varmap` under transformers' names.
    ///
    /// `labels: None` keeps the checkpoint's classes and head (inference). With labels equal to
    /// the checkpoint's (same names, same order) the checkpoint's head is kept; otherwise a
    /// fresh head (`classifier.1`, seeded by `seed`) is created. `opts` selects scratch
    /// initialisation (only `config.json` is read) and what to freeze; LoRA is refused.
    pub fn from_dir(
        dir: &Path,
        labels: Option<Vec<String>>,
        varmap: &VarMap,
        device: &Device,
        opts: &VisionLoadOptions,
        seed: u64,
    ) -> Result<Self> {
        if opts.lora.is_some() {
            return Err(NnError::InvalidConfig(
                "LoRA adapts the linear layers of transformer backbones; a ResNet has none to \
                 adapt: use strategy full, freeze, head_only or scratch"
                    .into(),
            ));
        }
        let raw = read_json(&dir.join("config.json"))?;
        let config = ResNetConfig::from_value(&raw)?;
        let timm = raw.get("architecture").is_some();
        let ckpt_labels = config.labels();
        let feat = config.feature_dim();
        let mut ckpt = if opts.scratch {
            random_backbone(&config, seed, BnInit::Identity, device)?
        } else {
            normalise_names(load_model_weights(dir, device)?)
        };
        let labels = match labels {
            Some(l) if l.is_empty() => {
                return Err(NnError::InvalidConfig(
                    "a classifier needs at least one label".into(),
                ));
            }
            Some(l) => l,
            None => ckpt_labels.clone().ok_or_else(|| {
                NnError::InvalidConfig(format!(
                    "{} has no id2label (or label_names): pass the labels",
                    dir.join("config.json").display()
                ))
            })?,
        };
        let head_fits = |c: &Checkpoint| {
            c.get("classifier.1.weight")
                .is_some_and(|w| w.dims() == [labels.len(), feat])
                && c.get("classifier.1.bias")
                    .is_some_and(|b| b.dims() == [labels.len()])
        };
        let reuse_head = !opts.scratch && ckpt_labels.as_ref() == Some(&labels) && head_fits(&ckpt);
        if !reuse_head {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x4EAD_0F2E);
            let (w, b) = fresh_head(labels.len(), feat, &mut rng, device)?;
            ckpt.insert("classifier.1.weight".into(), w);
            ckpt.insert("classifier.1.bias".into(), b);
        }

        let mut src = WeightSource::new(&ckpt, varmap);
        let base = !opts.freeze_backbone;
        let (stem_spec, block_specs) = config.layout();
        let stem = ConvBn::load(&mut src, &stem_spec, base && !opts.freeze_embeddings)?;
        let mut blocks = Vec::with_capacity(block_specs.len());
        for spec in &block_specs {
            let t = base && spec.stage >= opts.freeze_layers;
            blocks.push(Block {
                layers: spec
                    .layers
                    .iter()
                    .map(|l| ConvBn::load(&mut src, l, t))
                    .collect::<Result<_>>()?,
                shortcut: spec
                    .shortcut
                    .as_ref()
                    .map(|s| ConvBn::load(&mut src, s, t))
                    .transpose()?,
            });
        }
        let classifier = Linear::load(&mut src, "classifier.1", feat, labels.len(), true)?;
        let (trainable, _frozen) = src.into_parts();
        let (head_vars, backbone_vars) = trainable
            .into_iter()
            .partition(|(n, _)| n.starts_with("classifier."));
        let image_size = raw
            .get("image_size")
            .and_then(Value::as_u64)
            .or_else(|| {
                raw.pointer("/pretrained_cfg/input_size/2")
                    .and_then(Value::as_u64)
            })
            .map_or(224, |s| s as usize);
        Ok(Self {
            config,
            raw_config: raw,
            timm,
            labels,
            image_size,
            stem,
            blocks,
            classifier,
            backbone_vars,
            head_vars,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(self.blocks.iter().flat_map(Block::conv_bns))
    }

    /// Runs the model through candle's convolution and plain tensor ops (`conv::*_ops`)
    /// instead of kiln's CPU kernels. Off the CPU it always does (the kernels would move every
    /// activation through host memory); this turns it on for the CPU too, so tests compare
    /// the two paths there.
    pub fn candle_ops(&mut self, on: bool) {
        for layer in self.conv_bns_mut() {
            layer.bn.candle_ops = on;
        }
    }

    fn conv_bns_mut(&mut self) -> impl Iterator<Item = &mut ConvBn> {
        std::iter::once(&mut self.stem).chain(
            self.blocks
                .iter_mut()
                .flat_map(|b| b.layers.iter_mut().chain(b.shortcut.iter_mut())),
        )
    }
}

impl ImageClassifier for ResNetForImageClassification {
    fn labels(&self) -> &[String] {
        &self.labels
    }

    fn feature_dim(&self) -> usize {
        self.config.feature_dim()
    }

    fn image_size(&self) -> usize {
        self.image_size
    }

    fn features(&self, pixels: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, c, _, _) = pixels.dims4()?;
        if c != self.config.num_channels {
            candle_core::bail!(
                "pixels have {c} channels, the model expects {}",
                self.config.num_channels
            )
        }
        // Channels-last from here on (see conv.rs).
        let x = pixels.permute((0, 2, 3, 1))?.contiguous()?;
        let x = self.stem.forward(&x, train)?;
        let mut x = if self.stem.bn.candle_ops || !x.device().is_cpu() {
            conv::max_pool2d_ops(&x, 3, 2, 1)?
        } else {
            conv::max_pool2d(&x, 3, 2, 1)?
        };
        for block in &self.blocks {
            x = block.forward(&x, train)?;
        }
        let (_, h, w, c) = x.dims4()?;
        x.reshape((b, h * w, c))?.mean(1)
    }

    fn head(&self, features: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.classifier.forward(features)
    }

    fn backbone_vars(&self) -> Vec<(String, Var)> {
        self.backbone_vars.clone()
    }

    fn head_vars(&self) -> Vec<(String, Var)> {
        self.head_vars.clone()
    }

    fn buffers(&self) -> Vec<(String, Var)> {
        self.conv_bns()
            .filter(|cb| cb.bn.trainable)
            .flat_map(|cb| cb.bn.buffers())
            .collect()
    }

    fn export_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for cb in self.conv_bns() {
            cb.export(&mut out)?;
        }
        out.insert(
            "classifier.1.weight".into(),
            self.classifier.weight.detach(),
        );
        if let Some(b) = &self.classifier.bias {
            out.insert("classifier.1.bias".into(), b.detach());
        }
        Ok(out)
    }

    fn export_config(&self) -> Value {
        let mut cfg = if self.timm {
            json!({})
        } else {
            self.raw_config.clone()
        };
        if let (Some(obj), Some(arch)) = (cfg.as_object_mut(), self.config.to_hf_json().as_object())
        {
            obj.remove("num_labels");
            for (k, v) in arch {
                obj.insert(k.clone(), v.clone());
            }
            let id2label: serde_json::Map<String, Value> = self
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), Value::from(l.as_str())))
                .collect();
            let label2id: serde_json::Map<String, Value> = self
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), Value::from(i)))
                .collect();
            obj.insert(
                "architectures".into(),
                json!(["ResNetForImageClassification"]),
            );
            obj.insert("id2label".into(), Value::Object(id2label));
            obj.insert("label2id".into(), Value::Object(label2id));
            obj.entry("torch_dtype").or_insert(json!("float32"));
        }
        cfg
    }

    fn prepare_for_inference(&mut self) -> Result<u64> {
        let mut bytes = 0;
        for layer in self.conv_bns_mut() {
            layer.prepared = conv::PreparedWeight::new(&layer.weight, layer.stride, layer.padding)?;
            bytes += layer.prepared.as_ref().map_or(0, |p| p.bytes());
        }
        Ok(bytes)
    }

    fn unprepare(&mut self) {
        for layer in self.conv_bns_mut() {
            layer.prepared = None;
        }
    }
}

/// A tiny ResNet for tests: basic blocks, stem 8 channels, two stages `[8, 16]` of one block
/// each (the second downsamples, with a projection shortcut), three labels.
pub fn tiny_resnet_config() -> ResNetConfig {
    ResNetConfig {
        num_channels: 3,
        embedding_size: 8,
        hidden_sizes: vec![8, 16],
        depths: vec![1, 1],
        layer_type: LayerType::Basic,
        hidden_act: "relu".into(),
        downsample_in_first_stage: false,
        downsample_in_bottleneck: false,
        id2label: [("0", "cat"), ("1", "dog"), ("2", "bird")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Writes a random (seeded) ResNet in transformers' layout: `config.json`,
/// `model.safetensors` (with non-trivial BatchNorm parameters and running statistics, and a head
/// for the config's labels — three `LABEL_i` when it has none) and a `preprocessor_config.json`
/// like microsoft/resnet-50's.
pub fn write_tiny_resnet(dir: &Path, config: &ResNetConfig, seed: u64) -> Result<()> {
    config.validate()?;
    let mut config = config.clone();
    if config.labels().is_none() {
        config.id2label = (0..3)
            .map(|i| (i.to_string(), format!("LABEL_{i}")))
            .collect();
    }
    let labels = config.labels().unwrap_or_default();
    let io = |source| NnError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let write_json = |name: &str, value: &Value| -> Result<()> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| NnError::InvalidConfig(format!("cannot serialise {name}: {e}")))?;
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| NnError::Io { path, source })
    };
    let mut cfg = config.to_hf_json();
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert(
            "architectures".into(),
            json!(["ResNetForImageClassification"]),
        );
        obj.insert("id2label".into(), json!(config.id2label));
        let label2id: BTreeMap<&str, usize> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        obj.insert("label2id".into(), json!(label2id));
        obj.insert("torch_dtype".into(), json!("float32"));
    }
    write_json("config.json", &cfg)?;
    write_json(
        "preprocessor_config.json",
        &json!({
            "crop_pct": 0.875,
            "do_normalize": true,
            "do_resize": true,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "resample": 3,
            "size": {"shortest_edge": 224},
            "image_processor_type": "ConvNextImageProcessor"
        }),
    )?;
    let dev = Device::Cpu;
    let mut tensors = random_backbone(&config, seed, BnInit::Random, &dev)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7E57);
    let feat = config.feature_dim();
    let (w, _) = fresh_head(labels.len(), feat, &mut rng, &dev)?;
    let b: Vec<f32> = (0..labels.len())
        .map(|_| rng.random_range(-0.1..0.1))
        .collect();
    tensors.insert("classifier.1.weight".into(), w);
    tensors.insert(
        "classifier.1.bias".into(),
        Tensor::from_vec(b, labels.len(), &dev)?,
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// A timm/torchvision-named copy of transformers-named tensors (the inverse of
/// [`timm_to_hf_names`]); names without a timm counterpart are dropped.
pub fn hf_to_timm_names(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        if let Some(timm) = hf_name_to_timm(name) {
            out.insert(timm, t.clone());
        }
    }
    out
}

fn hf_name_to_timm(name: &str) -> Option<String> {
    if let Some(leaf) = name.strip_prefix("classifier.1.") {
        return Some(format!("fc.{leaf}"));
    }
    if name == "resnet.embedder.embedder.convolution.weight" {
        return Some("conv1.weight".into());
    }
    if let Some(leaf) = name.strip_prefix("resnet.embedder.embedder.normalization.") {
        return Some(format!("bn1.{leaf}"));
    }
    let rest = name.strip_prefix("resnet.encoder.stages.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [stage, "layers", block, tail @ ..] = parts.as_slice() else {
        return None;
    };
    let layer = format!("layer{}.{block}", stage.parse::<usize>().ok()? + 1);
    match tail {
        ["shortcut", "convolution", "weight"] => Some(format!("{layer}.downsample.0.weight")),
        ["shortcut", "normalization", leaf] => Some(format!("{layer}.downsample.1.{leaf}")),
        ["layer", k, "convolution", "weight"] => Some(format!(
            "{layer}.conv{}.weight",
            k.parse::<usize>().ok()? + 1
        )),
        ["layer", k, "normalization", leaf] => {
            Some(format!("{layer}.bn{}.{leaf}", k.parse::<usize>().ok()? + 1))
        }
        _ => None,
    }
}
