//! A trainable Vision Transformer for image classification, in the layout of transformers'
//! `ViTForImageClassification` (google/vit-*): patch embedding, a `[CLS]` token and learned
//! position embeddings, pre-norm encoder layers, a final LayerNorm, and a linear classifier over
//! the final-normalised `[CLS]` token.
//!
//! The patch embedding is a convolution whose kernel equals its stride, so it is computed as
//! what it is: the image cut into patches (a reshape and permute of the pixels, which need no
//! gradient) and one matrix product with the flattened kernel. Everything else reuses kiln's
//! differentiable pieces (flattened 2-D [`Linear`], fused [`ops::layer_norm`] and
//! [`ops::gelu_erf`], [`ops::softmax_last_dim`]).
//!
//! All weights are handled under transformers' `ViTForImageClassification` names
//! (`vit.embeddings.*`, `vit.encoder.layer.N.*`, `vit.layernorm.*`, `classifier.*`), whatever
//! prefix the checkpoint used: a bare `ViTModel` checkpoint (`embeddings.*`) loads too, and its
//! pooler is ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::attention::{self, AttentionSpec};
use super::bert::HiddenAct;
use super::block::BlockInput;
use super::layers::{
    Checkpoint, LayerNorm, Linear, WeightSource, dropout, dropout_seed, load_model_weights,
};
use super::lora::{LoraAdapter, LoraTarget, lora_rng};
use super::packed::PackedWeight;
use super::vision::{ImageClassifier, VisionLoadOptions};
use super::{NnError, Result, mlp, ops};

fn default_model_type() -> String {
    "vit".to_string()
}
fn default_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    16
}
fn default_num_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_init_range() -> f64 {
    0.02
}

/// The subset of a transformers ViT `config.json` the architecture depends on.
///
/// Unknown keys are ignored here (the model keeps the raw JSON to write them back on export);
/// missing optional keys take `ViTConfig`'s defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Must be `"vit"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    /// Dropout on embeddings and sub-layer outputs during training.
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Side of the square input image.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Side of a square patch (the patch convolution's kernel and stride).
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Input channels.
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Whether query, key and value projections have a bias.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Std of transformers' (truncated normal) initialiser; used by scratch initialisation.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Class names by id (string keys, as transformers writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Class ids by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
}

impl VitConfig {
    /// Reads and validates a `config.json`; also returns the raw JSON.
    pub fn from_file(path: &Path) -> Result<(Self, Value)> {
        let text = std::fs::read_to_string(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parse = |source| NnError::ConfigParse {
            path: path.to_path_buf(),
            source,
        };
        let raw: Value = serde_json::from_str(&text).map_err(parse)?;
        let cfg: Self = serde_json::from_value(raw.clone()).map_err(parse)?;
        cfg.validate()?;
        Ok((cfg, raw))
    }

    /// Checks the invariants the architecture relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NnError::InvalidConfig(m));
        if self.model_type != "vit" {
            return bad(format!(
                "model_type `{}` is not a ViT (expected \"vit\")",
                self.model_type
            ));
        }
        if self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.num_channels == 0
        {
            return bad(
                "hidden_size, intermediate_size, num_hidden_layers and num_channels must be > 0"
                    .into(),
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0
            || self.image_size == 0
            || !self.image_size.is_multiple_of(self.patch_size)
        {
            return bad(format!(
                "image_size {} is not a positive multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    /// Patches along one side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens of the encoder: one per patch, plus `[CLS]`.
    pub fn seq_len(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Class names in id order from `id2label`, when it is present and its ids are `0..n`.
    pub fn labels(&self) -> Option<Vec<String>> {
        let map = self.id2label.as_ref()?;
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
            .collect();
        pairs.sort();
        let ok = pairs.len() == map.len() && pairs.iter().enumerate().all(|(i, (k, _))| i == *k);
        (ok && !pairs.is_empty()).then(|| pairs.into_iter().map(|(_, v)| v).collect())
    }
}

/// One pre-norm encoder layer.
struct Layer {
    ln_before: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    ln_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    /// The six linears' weights packed for inference (`prepare_for_inference`), in
    /// [`Layer::linears`] order.
    packed: Option<Vec<Arc<PackedWeight>>>,
}

impl Layer {
    /// Applies linear `index` (of [`Layer::linears`]): from the packed weights where they
    /// exist and no gradient is tracked, the general path otherwise.
    fn project(&self, index: usize, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let packed = self.packed.as_ref().map(|p| &*p[index]);
        super::packed::project(packed, self.linears()[index], x, train)
    }

    /// Whether a pass of `rows` token rows without training reads the packed weights (the
    /// fused half-layer ops, which read the weights themselves, are then skipped).
    fn packed_for(&self, rows: usize, train: bool) -> bool {
        !train && self.packed.is_some() && PackedWeight::takes(rows)
    }

    fn linear_mut(&mut self, target: LoraTarget) -> &mut Linear {
        match target {
            LoraTarget::Query => &mut self.query,
            LoraTarget::Key => &mut self.key,
            LoraTarget::Value => &mut self.value,
            LoraTarget::AttentionOutput => &mut self.attn_out,
            LoraTarget::Intermediate => &mut self.intermediate,
            LoraTarget::Output => &mut self.output,
        }
    }

    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
    }
}

/// Loads `{name}.weight` (`[out, in]`) and, when `bias`, `{name}.bias`.
fn load_linear(
    src: &mut WeightSource,
    name: String,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    trainable: bool,
) -> Result<Linear> {
    if bias {
        return Linear::load(src, &name, in_dim, out_dim, trainable);
    }
    let weight = src.get(&format!("{name}.weight"), &[out_dim, in_dim], trainable)?;
    Ok(Linear {
        name,
        weight,
        bias: None,
        lora: None,
    })
}

/// The sub-name of a LoRA target's linear inside `vit.encoder.layer.N`.
pub fn lora_module_name(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Query => "attention.attention.query",
        LoraTarget::Key => "attention.attention.key",
        LoraTarget::Value => "attention.attention.value",
        LoraTarget::AttentionOutput => "attention.output.dense",
        LoraTarget::Intermediate => "intermediate.dense",
        LoraTarget::Output => "output.dense",
    }
}

const CLS: &str = "vit.embeddings.cls_token";
const POS: &str = "vit.embeddings.position_embeddings";
const PATCH: &str = "vit.embeddings.patch_embeddings.projection";
const FINAL_LN: &str = "vit.layernorm";
const HEAD: &str = "classifier";

/// A ViT image classifier whose trainable weights are candle `Var`s registered in a `VarMap`
/// under transformers' `ViTForImageClassification` names.
pub struct VitForImageClassification {
    config: VitConfig,
    raw_config: Value,
    labels: Vec<String>,
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// `[hidden, channels, patch, patch]`, as the checkpoint stores it.
    patch_weight: Tensor,
    patch_bias: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    classifier: Linear,
    trainable: Vec<(String, Var)>,
}

/// Renames a checkpoint's tensors to `ViTForImageClassification`'s names: a bare `ViTModel`
/// (`embeddings.*`, `encoder.*`, `layernorm.*`) gets the `vit.` prefix; the pooler is dropped;
/// transformers 5's module names (`layers.N.attention.q_proj`, `mlp.fc1`, ..., written by
/// `save_pretrained(save_original_format=False)`) are mapped back to the checkpoint names its
/// default save and every transformers 4 checkpoint use.
fn canonical_names(ckpt: Checkpoint) -> Checkpoint {
    ckpt.into_iter()
        .filter_map(|(name, t)| {
            let bare = name.strip_prefix("vit.").unwrap_or(&name);
            if bare.starts_with("pooler.") {
                return None;
            }
            if let Some(rest) = bare.strip_prefix("layers.") {
                let (index, module) = rest.split_once('.')?;
                let module = [
                    ("attention.q_proj.", "attention.attention.query."),
                    ("attention.k_proj.", "attention.attention.key."),
                    ("attention.v_proj.", "attention.attention.value."),
                    ("attention.o_proj.", "attention.output.dense."),
                    ("mlp.fc1.", "intermediate.dense."),
                    ("mlp.fc2.", "output.dense."),
                ]
                .iter()
                .find_map(|(new, old)| module.strip_prefix(new).map(|p| format!("{old}{p}")))
                .unwrap_or_else(|| module.to_string());
                return Some((format!("vit.encoder.layer.{index}.{module}"), t));
            }
            let renamed = if bare.starts_with("embeddings.")
                || bare.starts_with("encoder.")
                || bare.starts_with("layernorm.")
            {
                format!("vit.{bare}")
            } else {
                name
            };
            Some((renamed, t))
        })
        .collect()
}

/// What a weight is, for initialisation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Linear/conv weights and the cls/position embeddings.
    Weight,
    Bias,
    NormScale,
    NormShift,
}

/// Every backbone tensor of a config with its shape and kind (no head).
fn backbone_shapes(config: &VitConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let (h, i, c, p) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_channels,
        config.patch_size,
    );
    let mut out = vec![
        (CLS.to_string(), vec![1, 1, h], Kind::Weight),
        (POS.to_string(), vec![1, config.seq_len(), h], Kind::Weight),
        (format!("{PATCH}.weight"), vec![h, c, p, p], Kind::Weight),
        (format!("{PATCH}.bias"), vec![h], Kind::Bias),
    ];
    for l in 0..config.num_hidden_layers {
        let pre = format!("vit.encoder.layer.{l}");
        for ln in ["layernorm_before", "layernorm_after"] {
            out.push((format!("{pre}.{ln}.weight"), vec![h], Kind::NormScale));
            out.push((format!("{pre}.{ln}.bias"), vec![h], Kind::NormShift));
        }
        for (name, out_dim, in_dim, bias) in [
            ("attention.attention.query", h, h, config.qkv_bias),
            ("attention.attention.key", h, h, config.qkv_bias),
            ("attention.attention.value", h, h, config.qkv_bias),
            ("attention.output.dense", h, h, true),
            ("intermediate.dense", i, h, true),
            ("output.dense", h, i, true),
        ] {
            out.push((
                format!("{pre}.{name}.weight"),
                vec![out_dim, in_dim],
                Kind::Weight,
            ));
            if bias {
                out.push((format!("{pre}.{name}.bias"), vec![out_dim], Kind::Bias));
            }
        }
    }
    out.push((format!("{FINAL_LN}.weight"), vec![h], Kind::NormScale));
    out.push((format!("{FINAL_LN}.bias"), vec![h], Kind::NormShift));
    out
}

/// A standard normal draw (Box-Muller), truncated to ±2 like timm's `trunc_normal_`.
fn trunc_normal(rng: &mut StdRng) -> f32 {
    loop {
        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            return z;
        }
    }
}

/// `n` truncated-normal values with standard deviation `std`.
fn trunc_normal_vec(n: usize, std: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| trunc_normal(rng) * std).collect()
}

/// transformers' `_init_weights` for a ViT: truncated normal (std `initializer_range`) for
/// linear and patch weights and the cls/position embeddings, zero biases, LayerNorm 1/0.
fn scratch_checkpoint(config: &VitConfig, seed: u64, device: &Device) -> Result<Checkpoint> {
    let mut rng = StdRng::seed_from_u64(seed);
    let std = config.initializer_range as f32;
    let mut ckpt = Checkpoint::new();
    for (name, shape, kind) in backbone_shapes(config) {
        let n: usize = shape.iter().product();
        let data = match kind {
            Kind::Weight => trunc_normal_vec(n, std, &mut rng),
            Kind::Bias | Kind::NormShift => vec![0.0; n],
            Kind::NormScale => vec![1.0; n],
        };
        ckpt.insert(name, Tensor::from_vec(data, shape, device)?);
    }
    Ok(ckpt)
}

/// `labels` as transformers' `id2label` / `label2id` JSON objects.
fn label_maps(labels: &[String]) -> (Value, Value) {
    let id2label: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    (Value::Object(id2label), Value::Object(label2id))
}

impl VitForImageClassification {
    /// Loads a ViT from a transformers model directory (`config.json`, and
    /// `model.safetensors` unless `opts.scratch`).
    ///
    /// `labels: None` keeps the checkpoint's classes (`id2label`) for inference. The
    /// checkpoint's head is reused when the labels are its `id2label` (same names, same order)
    /// and it has one; otherwise a fresh head is initialised from `seed` (truncated normal,
    /// zero bias). `seed` also drives scratch initialisation. Trainable weights are
    /// registered in `varmap` under `ViTForImageClassification`'s names.
    pub fn from_dir(
        dir: &Path,
        labels: Option<Vec<String>>,
        varmap: &VarMap,
        device: &Device,
        opts: &VisionLoadOptions,
        seed: u64,
    ) -> Result<Self> {
        let (config, raw) = VitConfig::from_file(&dir.join("config.json"))?;
        let ckpt = if opts.scratch {
            scratch_checkpoint(&config, seed, device)?
        } else {
            canonical_names(load_model_weights(dir, device)?)
        };
        Self::from_checkpoint(&config, raw, ckpt, labels, varmap, device, opts, seed)
    }

    /// Builds the model from tensors already in memory (any of the accepted name layouts);
    /// `raw_config` is the `config.json` written back, updated, by [`ImageClassifier::export_config`].
    #[allow(clippy::too_many_arguments)]
    pub fn from_checkpoint(
        config: &VitConfig,
        raw_config: Value,
        ckpt: Checkpoint,
        labels: Option<Vec<String>>,
        varmap: &VarMap,
        device: &Device,
        opts: &VisionLoadOptions,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(lora) = &opts.lora {
            lora.validate()?;
        }
        let mut ckpt = canonical_names(ckpt);
        if !ckpt.contains_key(CLS) {
            return Err(NnError::MissingTensor {
                name: format!("{CLS} (or embeddings.cls_token)"),
            });
        }
        let h = config.hidden_size;

        // The head: the checkpoint's when the labels are its own, a fresh one otherwise.
        let head_rows = match (
            ckpt.get(&format!("{HEAD}.weight")),
            ckpt.get(&format!("{HEAD}.bias")),
        ) {
            (Some(w), Some(b)) => match (w.dims(), b.dims()) {
                ([n, hh], [nb]) if *hh == h && n == nb && *n > 0 => Some(*n),
                _ => None,
            },
            _ => None,
        };
        let own_labels = config
            .labels()
            .or_else(|| head_rows.map(|n| (0..n).map(|i| format!("LABEL_{i}")).collect()));
        let labels = match labels {
            Some(l) => l,
            None => own_labels.clone().ok_or_else(|| {
                NnError::InvalidConfig(
                    "no labels given, and the config has no id2label nor the checkpoint a head"
                        .into(),
                )
            })?,
        };
        if labels.is_empty() {
            return Err(NnError::InvalidConfig(
                "an image classifier needs at least one label".into(),
            ));
        }
        let reuse_head = head_rows == Some(labels.len()) && own_labels.as_ref() == Some(&labels);
        if !reuse_head {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x4EAD_0F71);
            let std = config.initializer_range as f32;
            let w = trunc_normal_vec(labels.len() * h, std, &mut rng);
            ckpt.insert(
                format!("{HEAD}.weight"),
                Tensor::from_vec(w, (labels.len(), h), device)?,
            );
            ckpt.insert(
                format!("{HEAD}.bias"),
                Tensor::zeros(labels.len(), DType::F32, device)?,
            );
        }

        let mut src = WeightSource::new(&ckpt, varmap);
        // LoRA and freeze_backbone freeze every base weight; the head always trains.
        let base_train = opts.lora.is_none() && !opts.freeze_backbone;
        let emb_train = base_train && !opts.freeze_embeddings;
        let (c, p) = (config.num_channels, config.patch_size);
        let cls_token = src.get(CLS, &[1, 1, h], emb_train)?;
        let position_embeddings = src.get(POS, &[1, config.seq_len(), h], emb_train)?;
        let patch_weight = src.get(&format!("{PATCH}.weight"), &[h, c, p, p], emb_train)?;
        let patch_bias = src.get(&format!("{PATCH}.bias"), &[h], emb_train)?;

        let eps = config.layer_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let t = base_train && l >= opts.freeze_layers;
            let pre = format!("vit.encoder.layer.{l}");
            let inter = config.intermediate_size;
            let qkv = config.qkv_bias;
            let n = |target| format!("{pre}.{}", lora_module_name(target));
            layers.push(Layer {
                ln_before: LayerNorm::load(
                    &mut src,
                    &format!("{pre}.layernorm_before"),
                    h,
                    eps,
                    true,
                    t,
                )?,
                query: load_linear(&mut src, n(LoraTarget::Query), h, h, qkv, t)?,
                key: load_linear(&mut src, n(LoraTarget::Key), h, h, qkv, t)?,
                value: load_linear(&mut src, n(LoraTarget::Value), h, h, qkv, t)?,
                attn_out: load_linear(&mut src, n(LoraTarget::AttentionOutput), h, h, true, t)?,
                ln_after: LayerNorm::load(
                    &mut src,
                    &format!("{pre}.layernorm_after"),
                    h,
                    eps,
                    true,
                    t,
                )?,
                intermediate: load_linear(
                    &mut src,
                    n(LoraTarget::Intermediate),
                    h,
                    inter,
                    true,
                    t,
                )?,
                output: load_linear(&mut src, n(LoraTarget::Output), inter, h, true, t)?,
                packed: None,
            });
        }
        let final_ln = LayerNorm::load(&mut src, FINAL_LN, h, eps, true, base_train)?;

        if let Some(lcfg) = &opts.lora {
            let mut rng = lora_rng(lcfg);
            let mut targets = lcfg.targets.clone();
            targets.sort_by_key(|t| lora_module_name(*t));
            targets.dedup();
            for layer in &mut layers {
                for &target in &targets {
                    let lin = layer.linear_mut(target);
                    let (out_dim, in_dim) = lin.weight.dims2()?;
                    let name = lin.name.clone();
                    lin.lora = Some(LoraAdapter::create(
                        &mut src, &name, in_dim, out_dim, lcfg, &mut rng, device,
                    )?);
                }
            }
        }
        let classifier = Linear::load(&mut src, HEAD, h, labels.len(), true)?;
        let (trainable, _frozen) = src.into_parts();

        Ok(Self {
            config: config.clone(),
            raw_config,
            labels,
            cls_token,
            position_embeddings,
            patch_weight,
            patch_bias,
            layers,
            final_ln,
            classifier,
            trainable,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Every trainable variable (backbone then head) with its name.
    pub fn named_trainable_vars(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// Use kiln's fused CPU kernels (LayerNorm, attention, the feed-forward block: the
    /// default; they apply on the CPU in f32) or candle's primitive ops throughout, as off the
    /// CPU. Both compute the same function and gradients.
    pub fn set_fused_ops(&mut self, fused: bool) {
        for l in &mut self.layers {
            l.ln_before.fused = fused;
            l.ln_after.fused = fused;
        }
        self.final_ln.fused = fused;
    }

    /// Patch tokens `[b, patches, hidden]` of pixels `[b, c, s, s]`: the image cut into
    /// `p×p` patches flattened in `(c, y, x)` order (the kernel's layout), times the kernel.
    fn patch_embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, c, p, n) = (
            pixels.dim(0)?,
            cfg.num_channels,
            cfg.patch_size,
            cfg.patches_per_side(),
        );
        let h = cfg.hidden_size;
        let patches = pixels
            .reshape(vec![b, c, n, p, n, p])?
            .permute([0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * n * n, c * p * p))?;
        let proj = Linear {
            name: PATCH.to_string(),
            weight: self.patch_weight.reshape((h, c * p * p))?,
            bias: Some(self.patch_bias.clone()),
            lora: None,
        };
        proj.forward(&patches)?.reshape((b, n * n, h))
    }

    fn layer_forward(&self, l: &Layer, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, s, _) = x.dims3()?;
        let nh = cfg.num_attention_heads;
        let dh = cfg.head_dim();
        // One graph node each way on a GPU (`nn::heads`).
        let heads = |t: Tensor| super::heads::split(&t, nh);
        let scale = 1.0 / (dh as f64).sqrt();
        let p = if train {
            cfg.attention_probs_dropout_prob as f32
        } else {
            0.0
        };
        let spec = AttentionSpec {
            dropout: p,
            seed: if p > 0.0 { dropout_seed() } else { 0 },
            ..AttentionSpec::new(nh, nh, scale as f32)
        };
        // On the CPU, the whole attention half layer (its LayerNorm, the block and its
        // residual) as one op where it applies (no dropout after the output projection; LoRA
        // adapters run inside the op).
        let packed = l.packed_for(b * s, train);
        let block = if l.ln_before.fused && !(train && cfg.hidden_dropout_prob > 0.0) && !packed {
            let projections = [&l.query, &l.key, &l.value, &l.attn_out];
            attention::residual_attention(
                &normed_input(&l.ln_before, x),
                projections,
                spec.clone(),
                None,
                train,
            )?
        } else {
            None
        };
        let x = match block {
            Some(y) => y,
            None => {
                let normed = l.ln_before.forward(x)?;
                let (q, k, v) = (
                    l.project(0, &normed, train)?,
                    l.project(1, &normed, train)?,
                    l.project(2, &normed, train)?,
                );
                // On the CPU, kiln's fused attention (with its own backward) on the
                // projections' layout.
                let fused = if l.ln_before.fused {
                    attention::attention(&q, &k, &v, spec)?
                } else {
                    None
                };
                let ctx = match fused {
                    Some(ctx) => ctx,
                    None => {
                        // Scaling q (b·s·h values) is cheaper than scaling the scores
                        // (b·nh·s·s).
                        let (q, k, v) = (heads((q * scale)?)?, heads(k)?, heads(v)?);
                        let probs = ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
                        let probs = dropout(&probs, cfg.attention_probs_dropout_prob, train)?;
                        super::heads::join(&probs.matmul(&v)?)?
                    }
                };
                let attn = dropout(&l.project(3, &ctx, train)?, cfg.hidden_dropout_prob, train)?;
                (attn + x)?
            }
        };
        // On the CPU, the feed-forward half layer (its LayerNorm, the block, its dropout, its
        // residual and its LoRA adapters) as one op (exact GELU; `residual_mlp_block` says
        // None otherwise).
        let p = if train { cfg.hidden_dropout_prob } else { 0.0 };
        if l.ln_after.fused
            && !packed
            && matches!(cfg.hidden_act, HiddenAct::Gelu)
            && let Some(y) = mlp::residual_mlp_block(
                &normed_input(&l.ln_after, &x),
                &l.intermediate,
                &l.output,
                p as f32,
                train,
            )?
        {
            return Ok(y);
        }
        self.feed_forward(l, &x, train)
    }

    /// The feed-forward half layer through the separate ops: LayerNorm, the block, its dropout
    /// and its residual.
    fn feed_forward(&self, l: &Layer, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let normed = l.ln_after.forward(x)?;
        let inter = l.project(4, &normed, train)?;
        let inter = match cfg.hidden_act {
            HiddenAct::Gelu => ops::gelu_erf(&inter)?,
            HiddenAct::GeluTanh => inter.gelu()?,
            HiddenAct::Relu => inter.relu()?,
        };
        let out = dropout(
            &l.project(5, &inter, train)?,
            cfg.hidden_dropout_prob,
            train,
        )?;
        out + x
    }

    /// One layer's output for the first token ([CLS]) alone, `[batch, 1, hidden]`, without
    /// dropout: it attends to every token, but no other token's output is computed. For the
    /// last layer at inference, where only [CLS] is read. Plain differentiable ops.
    fn layer_forward_first_token(&self, l: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, s, h) = x.dims3()?;
        let (nh, dh) = (cfg.num_attention_heads, cfg.head_dim());
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, n, nh, dh))?.transpose(1, 2)?.contiguous()
        };
        let normed = l.ln_before.forward(x)?;
        let first = normed.narrow(1, 0, 1)?.contiguous()?;
        let scale = 1.0 / (dh as f64).sqrt();
        let q = heads((l.project(0, &first, false)? * scale)?, 1)?;
        let k = heads(l.project(1, &normed, false)?, s)?;
        let v = heads(l.project(2, &normed, false)?, s)?;
        let probs = ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, 1, h))?;
        let x = (l.project(3, &ctx, false)? + x.narrow(1, 0, 1)?)?;
        self.feed_forward(l, &x, false)
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    fn layer_norms(&self) -> impl Iterator<Item = &LayerNorm> {
        self.layers
            .iter()
            .flat_map(|l| [&l.ln_before, &l.ln_after])
            .chain(std::iter::once(&self.final_ln))
    }

    /// Whether any layer carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.linears().any(|l| l.lora.is_some())
    }
}

impl ImageClassifier for VitForImageClassification {
    fn labels(&self) -> &[String] {
        &self.labels
    }

    fn feature_dim(&self) -> usize {
        self.config.hidden_size
    }

    fn image_size(&self) -> usize {
        self.config.image_size
    }

    fn features(&self, pixels: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (s, c) = (cfg.image_size, cfg.num_channels);
        let b = match pixels.dims() {
            [b, cc, hh, ww] if *cc == c && *hh == s && *ww == s => *b,
            dims => candle_core::bail!(
                "ViT expects pixels [batch, {c}, {s}, {s}], got {dims:?} \
                 (resize images to the model's image_size)"
            ),
        };
        let pixels = pixels.to_dtype(DType::F32)?;
        let patches = self.patch_embed(&pixels)?;
        let h = cfg.hidden_size;
        let cls = self.cls_token.broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?;
        let mut x = dropout(&x, cfg.hidden_dropout_prob, train)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            // At inference only [CLS] leaves the last layer: it alone is computed there.
            x = if !train && i == last {
                self.layer_forward_first_token(layer, &x)?
            } else {
                self.layer_forward(layer, &x, train)?
            };
        }
        // The final LayerNorm is per token: only [CLS] is needed.
        self.final_ln.forward(&x.i((.., 0, ..))?.contiguous()?)
    }

    fn head(&self, features: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.classifier.forward_t(features, train)
    }

    fn backbone_vars(&self) -> Vec<(String, Var)> {
        self.trainable
            .iter()
            .filter(|(n, _)| !n.starts_with("classifier."))
            .cloned()
            .collect()
    }

    fn head_vars(&self) -> Vec<(String, Var)> {
        self.trainable
            .iter()
            .filter(|(n, _)| n.starts_with("classifier."))
            .cloned()
            .collect()
    }

    fn buffers(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn export_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(CLS.to_string(), self.cls_token.detach());
        out.insert(POS.to_string(), self.position_embeddings.detach());
        out.insert(format!("{PATCH}.weight"), self.patch_weight.detach());
        out.insert(format!("{PATCH}.bias"), self.patch_bias.detach());
        for lin in self.linears().chain(std::iter::once(&self.classifier)) {
            out.insert(
                format!("{}.weight", lin.name),
                lin.merged_weight()?.detach(),
            );
            if let Some(b) = &lin.bias {
                out.insert(format!("{}.bias", lin.name), b.detach());
            }
        }
        for ln in self.layer_norms() {
            out.insert(ln.names.0.clone(), ln.weight.detach());
            out.insert(ln.names.1.clone(), ln.bias.detach());
        }
        Ok(out)
    }

    fn export_config(&self) -> Value {
        let mut cfg = match &self.raw_config {
            Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        let (id2label, label2id) = label_maps(&self.labels);
        cfg.insert("architectures".into(), json!(["ViTForImageClassification"]));
        cfg.insert("model_type".into(), json!("vit"));
        cfg.insert("id2label".into(), id2label);
        cfg.insert("label2id".into(), label2id);
        // transformers derives num_labels from id2label; a stale count would contradict it.
        cfg.remove("num_labels");
        Value::Object(cfg)
    }

    /// Packs every layer's linear weights (`nn::packed`): on CPUs with AVX-512 or AVX2, for f32
    /// layers without adapters; passes of up to the packed kernel's rows (one image's tokens)
    /// then multiply against the packed copies.
    fn prepare_for_inference(&mut self) -> Result<u64> {
        let cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let plain = self
            .linears()
            .all(|l| l.lora.is_none() && cpu(&l.weight) && l.bias.as_ref().is_none_or(cpu));
        if !plain || !PackedWeight::available() {
            return Ok(0);
        }
        let Some((all, bytes)) = PackedWeight::pack_layers(self.layers.iter().map(Layer::linears))?
        else {
            return Ok(0);
        };
        for (layer, packed) in self.layers.iter_mut().zip(all) {
            layer.packed = Some(packed);
        }
        Ok(bytes)
    }

    fn unprepare(&mut self) {
        for layer in &mut self.layers {
            layer.packed = None;
        }
    }
}

/// A small ViT for tests: hidden 32, 2 layers, 4 heads, intermediate 64, 16×16 images in
/// 4×4 patches (17 tokens), 3 labels, no dropout.
pub fn tiny_vit_config() -> VitConfig {
    let labels = ["cat", "dog", "bird"];
    VitConfig {
        model_type: "vit".to_string(),
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        layer_norm_eps: 1e-12,
        image_size: 16,
        patch_size: 4,
        num_channels: 3,
        qkv_bias: true,
        initializer_range: 0.02,
        id2label: Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.to_string()))
                .collect(),
        ),
        label2id: Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.to_string(), i))
                .collect(),
        ),
    }
}

/// Writes a random `ViTForImageClassification` for `config` to `dir` (created if needed):
/// `config.json`, `model.safetensors` (a head when the config has `id2label`) and a
/// `preprocessor_config.json` like google/vit-base-patch16-224's.
///
/// Weights are uniform with std ~0.1 (larger than ViT's 0.02 init, so parity tests exercise
/// non-trivial values); LayerNorm scales are around 1 and biases non-zero, so a dropped term
/// shows up in parity tests.
pub fn write_tiny_vit(dir: &Path, config: &VitConfig, seed: u64) -> Result<()> {
    config.validate()?;
    let io = |source| NnError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut cfg_json = serde_json::to_value(config)
        .map_err(|e| NnError::InvalidConfig(format!("cannot serialise config: {e}")))?;
    if let Value::Object(m) = &mut cfg_json {
        m.insert("architectures".into(), json!(["ViTForImageClassification"]));
        m.insert("torch_dtype".into(), json!("float32"));
        m.insert("encoder_stride".into(), json!(config.patch_size));
    }
    let pretty = |v: &Value| {
        serde_json::to_string_pretty(v)
            .map_err(|e| NnError::InvalidConfig(format!("cannot serialise JSON: {e}")))
    };
    std::fs::write(dir.join("config.json"), pretty(&cfg_json)?).map_err(io)?;
    let s = config.image_size;
    let preprocessor = json!({
        "do_normalize": true,
        "do_resize": true,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": {"height": s, "width": s},
        "image_processor_type": "ViTImageProcessor"
    });
    std::fs::write(dir.join("preprocessor_config.json"), pretty(&preprocessor)?).map_err(io)?;

    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut shapes = backbone_shapes(config);
    if let Some(labels) = config.labels() {
        let h = config.hidden_size;
        shapes.push((
            format!("{HEAD}.weight"),
            vec![labels.len(), h],
            Kind::Weight,
        ));
        shapes.push((format!("{HEAD}.bias"), vec![labels.len()], Kind::Bias));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape, kind) in shapes {
        // Uniform on [-a, a] has std a/sqrt(3).
        let (center, half_width) = match kind {
            Kind::Weight => (0.0, 0.17),
            Kind::Bias => (0.0, 0.05),
            Kind::NormScale => (1.0, 0.1),
            Kind::NormShift => (0.0, 0.1),
        };
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| center + rng.random_range(-half_width..=half_width))
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &dev)?);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// `x` as the input of a block that applies `ln` to it inside the op.
fn normed_input(ln: &LayerNorm, x: &Tensor) -> BlockInput {
    BlockInput::LayerNormed {
        x: x.clone(),
        weight: ln.weight.clone(),
        bias: ln.bias.clone(),
        eps: ln.eps,
    }
}
