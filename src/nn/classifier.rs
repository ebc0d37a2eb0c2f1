//! A BERT-family encoder with a sequence-classification head, in Hugging Face's layout:
//! `dense` + tanh over the first token, dropout, then a linear classifier. For BERT the dense
//! layer is the pooler (`bert.pooler.dense`, `classifier`); for RoBERTa-style models it is
//! `classifier.dense` and the output `classifier.out_proj`. The computation is the same, so
//! a model exported in either naming loads in transformers' `AutoModelForSequenceClassification`
//! and gives the same logits.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::bert::{BertConfig, BertEncoder, LoadOptions, cls_pool};
use super::layers::{Checkpoint, Linear, dropout, load_model_weights};
use super::{NnError, Result};

/// How the head's weights are named in exported checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadNaming {
    /// `bert.pooler.dense.*` + `classifier.*` (BertForSequenceClassification).
    Bert,
    /// `classifier.dense.*` + `classifier.out_proj.*` (RobertaForSequenceClassification).
    Roberta,
}

impl HeadNaming {
    pub fn for_model_type(model_type: &str) -> HeadNaming {
        match model_type {
            "roberta" | "xlm-roberta" | "xlm_roberta" | "camembert" => HeadNaming::Roberta,
            _ => HeadNaming::Bert,
        }
    }

    /// The transformers class name of the exported model.
    pub fn architecture(self) -> &'static str {
        match self {
            HeadNaming::Bert => "BertForSequenceClassification",
            HeadNaming::Roberta => "RobertaForSequenceClassification",
        }
    }

    /// The encoder's prefix in exported checkpoints.
    pub fn encoder_prefix(self) -> &'static str {
        match self {
            HeadNaming::Bert => "bert.",
            HeadNaming::Roberta => "roberta.",
        }
    }

    fn dense(self) -> &'static str {
        match self {
            HeadNaming::Bert => "bert.pooler.dense",
            HeadNaming::Roberta => "classifier.dense",
        }
    }

    fn out(self) -> &'static str {
        match self {
            HeadNaming::Bert => "classifier",
            HeadNaming::Roberta => "classifier.out_proj",
        }
    }
}

/// The classification head: `out(dropout(tanh(dense(h[:, 0]))))`.
pub struct ClassificationHead {
    pub dense: Linear,
    pub out: Linear,
    pub dropout: f64,
}

impl ClassificationHead {
    /// Logits `[batch, labels]` from the first token's hidden state `[batch, hidden]`.
    pub fn forward(&self, first_token: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = dropout(first_token, self.dropout, train)?;
        let x = self.dense.forward(&x)?.tanh()?;
        let x = dropout(&x, self.dropout, train)?;
        self.out.forward(&x)
    }
}

impl ClassificationHead {
    /// The frozen head of an exported classifier (`naming` says where its tensors are).
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        naming: HeadNaming,
        hidden: usize,
        labels: usize,
        dropout: f64,
    ) -> Result<ClassificationHead> {
        let missing = |n: &str| NnError::MissingTensor {
            name: format!("{n}.weight / {n}.bias"),
        };
        let (dw, db) = tensor_pair(ckpt, naming.dense(), (hidden, hidden))
            .ok_or_else(|| missing(naming.dense()))?;
        let (ow, ob) = tensor_pair(ckpt, naming.out(), (labels, hidden))
            .ok_or_else(|| missing(naming.out()))?;
        let varmap = VarMap::new();
        let mut none = Vec::new();
        Ok(ClassificationHead {
            dense: var_linear(naming.dense(), dw, db, false, &mut none, &varmap)?,
            out: var_linear(naming.out(), ow, ob, false, &mut none, &varmap)?,
            dropout,
        })
    }
}

/// Encoder + head. Trainable weights are `Var`s in the `VarMap` passed at load.
pub struct SequenceClassifier {
    pub encoder: BertEncoder,
    pub head: ClassificationHead,
    pub naming: HeadNaming,
    pub labels: Vec<String>,
    /// Trainable head variables with their export names.
    pub head_vars: Vec<(String, Var)>,
}

fn var_linear(
    name: &str,
    weight: Tensor,
    bias: Tensor,
    trainable: bool,
    vars: &mut Vec<(String, Var)>,
    varmap: &VarMap,
) -> Result<Linear> {
    let (weight, bias) = if trainable {
        let w = Var::from_tensor(&weight)?;
        let b = Var::from_tensor(&bias)?;
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| NnError::InvalidInput("VarMap mutex poisoned".into()))?;
        for (suffix, v) in [("weight", &w), ("bias", &b)] {
            let full = format!("{name}.{suffix}");
            data.insert(full.clone(), v.clone());
            vars.push((full, v.clone()));
        }
        (w.as_tensor().clone(), b.as_tensor().clone())
    } else {
        (weight, bias)
    };
    Ok(Linear {
        name: name.to_owned(),
        weight,
        bias: Some(bias),
        lora: None,
    })
}

/// Fresh weights as transformers initialises them: normal(0, 0.02), zero bias.
fn init_linear(
    out_dim: usize,
    in_dim: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let w: Vec<f32> = (0..out_dim * in_dim)
        .map(|_| {
            // Box-Muller from two uniforms: a normal draw with no extra dependency.
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos() * 0.02
        })
        .collect();
    Ok((
        Tensor::from_vec(w, (out_dim, in_dim), device)?,
        Tensor::zeros(out_dim, DType::F32, device)?,
    ))
}

fn tensor_pair(ckpt: &Checkpoint, name: &str, shape: (usize, usize)) -> Option<(Tensor, Tensor)> {
    let w = ckpt.get(&format!("{name}.weight"))?;
    let b = ckpt.get(&format!("{name}.bias"))?;
    (w.dims() == [shape.0, shape.1] && b.dims() == [shape.0]).then(|| (w.clone(), b.clone()))
}

impl SequenceClassifier {
    /// A classifier on a pretrained base: the encoder per `opts`, the dense layer from the
    /// base's pooler when it has one (fresh otherwise), a fresh output layer for `labels`.
    /// The head trains unless `train_head` is false.
    pub fn from_base(
        dir: &Path,
        labels: Vec<String>,
        varmap: &VarMap,
        device: &Device,
        opts: &LoadOptions,
        seed: u64,
    ) -> Result<SequenceClassifier> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let ckpt = load_model_weights(dir, device)?;
        let encoder = BertEncoder::from_checkpoint(&config, &ckpt, varmap, device, opts)?;
        let naming = HeadNaming::for_model_type(&config.model_type);
        let h = config.hidden_size;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4EAD);
        let dense_init = match naming {
            HeadNaming::Bert => {
                tensor_pair(&ckpt, &format!("{}pooler.dense", encoder.prefix()), (h, h))
            }
            HeadNaming::Roberta => None,
        };
        let (dw, db) = match dense_init {
            Some(pair) => pair,
            None => init_linear(h, h, &mut rng, device)?,
        };
        let (ow, ob) = init_linear(labels.len(), h, &mut rng, device)?;
        let mut head_vars = Vec::new();
        let dense = var_linear(naming.dense(), dw, db, true, &mut head_vars, varmap)?;
        let out = var_linear(naming.out(), ow, ob, true, &mut head_vars, varmap)?;
        let dropout = config.hidden_dropout_prob;
        Ok(SequenceClassifier {
            encoder,
            head: ClassificationHead {
                dense,
                out,
                dropout,
            },
            naming,
            labels,
            head_vars,
        })
    }

    /// A classifier exported by kiln (or any `*ForSequenceClassification` checkpoint in
    /// BERT/RoBERTa layout), frozen, for inference and checks.
    pub fn load_exported(dir: &Path, device: &Device) -> Result<SequenceClassifier> {
        let config_path = dir.join("config.json");
        let config = BertConfig::from_file(&config_path)?;
        let raw: Value = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let labels = labels_from_config(&raw).ok_or_else(|| {
            NnError::InvalidConfig(format!("{} has no id2label", config_path.display()))
        })?;
        let ckpt = load_model_weights(dir, device)?;
        let varmap = VarMap::new();
        let opts = LoadOptions {
            freeze_embeddings: true,
            freeze_layers: config.num_hidden_layers,
            ..LoadOptions::default()
        };
        let encoder = BertEncoder::from_checkpoint(&config, &ckpt, &varmap, device, &opts)?;
        let naming = HeadNaming::for_model_type(&config.model_type);
        let head = ClassificationHead::from_checkpoint(
            &ckpt,
            naming,
            config.hidden_size,
            labels.len(),
            config.hidden_dropout_prob,
        )?;
        Ok(SequenceClassifier {
            encoder,
            head,
            naming,
            labels,
            head_vars: Vec::new(),
        })
    }

    /// Logits `[batch, labels]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self
            .encoder
            .forward(input_ids, token_type_ids, attention_mask, train)?;
        Ok(self.head.forward(&cls_pool(&hidden)?, train)?)
    }

    /// Logits `[batch, labels]` for evaluation and prediction: no dropout and no gradient,
    /// and the encoder's last layer computes the first token alone
    /// ([`BertEncoder::forward_first_token`]), the only one the head reads. Equal to
    /// `forward(.., false)`; not for a loss that is backpropagated.
    pub fn forward_inference(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let first = self
            .encoder
            .forward_first_token(input_ids, token_type_ids, attention_mask)?;
        Ok(self.head.forward(&first, false)?)
    }

    /// Every weight under its exported (transformers) name: encoder under `bert.`/`roberta.`,
    /// LoRA merged, plus the head.
    pub fn export_weights(&self) -> Result<HashMap<String, Tensor>> {
        let prefix = self.encoder.prefix().to_owned();
        let target = self.naming.encoder_prefix();
        let mut out = HashMap::new();
        for (name, t) in self.encoder.export_weights()? {
            let bare = name.strip_prefix(prefix.as_str()).unwrap_or(&name);
            if bare.starts_with("embeddings.") || bare.starts_with("encoder.") {
                out.insert(format!("{target}{bare}"), t);
            }
        }
        for lin in [&self.head.dense, &self.head.out] {
            out.insert(format!("{}.weight", lin.name), lin.weight.detach());
            if let Some(b) = &lin.bias {
                out.insert(format!("{}.bias", lin.name), b.detach());
            }
        }
        Ok(out)
    }
}

/// Labels in id order from a config's `id2label`.
pub fn labels_from_config(config: &Value) -> Option<Vec<String>> {
    let map = config.get("id2label")?.as_object()?;
    let mut pairs: Vec<(usize, String)> = map
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_owned())))
        .collect();
    pairs.sort();
    let ok = pairs.iter().enumerate().all(|(i, (k, _))| i == *k);
    (ok && !pairs.is_empty()).then(|| pairs.into_iter().map(|(_, v)| v).collect())
}
