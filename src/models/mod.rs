//! The base-model registry: every model directory in Hugging Face layout under
//! `KILN_MODELS_DIR`, with its architecture, parameter count and what kiln can fine-tune it
//! for. A model's id is its path under that directory (`sentence-transformers/all-MiniLM-L6-v2`).
//!
//! Pure library code (no async): the API calls it from a blocking task.

mod pull;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub use pull::{PullError, pull};

/// Architecture families kiln knows how to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-R, ...).
    Encoder,
    /// Llama/Qwen2/Mistral-style decoders.
    Decoder,
    /// ResNet / ViT image backbones.
    Vision,
}

/// One base model found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct BaseModel {
    pub id: String,
    #[serde(skip)]
    pub dir: PathBuf,
    /// `model_type` from config.json (`bert`, `roberta`, ...).
    pub architecture: String,
    pub family: Option<Family>,
    pub parameters: u64,
    /// What jobs may do with it, e.g. `text_classification`, `domain_adaptation`.
    pub capabilities: Vec<&'static str>,
    pub has_tokenizer: bool,
    /// The checkpoint carries a masked-LM head (domain adaptation reuses it).
    pub has_mlm_head: bool,
    /// Labels of a `*ForSequenceClassification` checkpoint (empty for plain encoders).
    pub labels: Vec<String>,
    /// `problem_type` of a classifier (`multi_label_classification`, ...).
    pub problem_type: Option<String>,
    /// Last change of its config.json (what the models API reports as `created`).
    #[serde(skip)]
    pub modified: Option<std::time::SystemTime>,
}

impl BaseModel {
    /// What the model does as it is: a classifier's task, `embeddings` for a plain encoder.
    pub fn task(&self) -> Option<&'static str> {
        match self.family {
            Some(Family::Encoder) if !self.labels.is_empty() => {
                Some(match self.problem_type.as_deref() {
                    Some("multi_label_classification") => "multi_label_classification",
                    _ => "text_classification",
                })
            }
            Some(Family::Encoder) => Some("embeddings"),
            Some(Family::Decoder) => Some("text_generation"),
            Some(Family::Vision) if !self.labels.is_empty() => Some("image_classification"),
            _ => None,
        }
    }
}

/// A model id that does not resolve to a usable directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("'{0}' is not a valid model id")]
    InvalidId(String),
    #[error("no base model '{id}' under {dir}")]
    NotFound { id: String, dir: String },
    #[error("{0}")]
    Invalid(String),
}

const ENCODER_TYPES: &[&str] = &[
    "bert",
    "roberta",
    "xlm-roberta",
    "xlm_roberta",
    "camembert",
    "distilbert",
    "electra",
    "mpnet",
];
const DECODER_TYPES: &[&str] = &["llama", "qwen2", "qwen3", "mistral"];
const VISION_TYPES: &[&str] = &["resnet", "vit"];

/// The family a `model_type` belongs to, if kiln knows it.
pub fn family_of(model_type: &str) -> Option<Family> {
    if ENCODER_TYPES.contains(&model_type) {
        Some(Family::Encoder)
    } else if DECODER_TYPES.contains(&model_type) {
        Some(Family::Decoder)
    } else if VISION_TYPES.contains(&model_type) {
        Some(Family::Vision)
    } else {
        None
    }
}

/// Checks that an id is a relative path of plain components (no `..`, no absolute paths).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('/')
        && id.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The base model with this id, read from disk.
pub fn resolve(models_dir: &Path, id: &str) -> Result<BaseModel, ModelError> {
    if !valid_id(id) {
        return Err(ModelError::InvalidId(id.to_owned()));
    }
    let dir = models_dir.join(id);
    if !dir.join("config.json").is_file() {
        return Err(ModelError::NotFound {
            id: id.to_owned(),
            dir: models_dir.display().to_string(),
        });
    }
    describe(id, &dir)
}

/// Every base model under `models_dir` (directories holding a config.json and weights),
/// sorted by id. Unreadable entries are skipped.
pub fn scan(models_dir: &Path) -> Vec<BaseModel> {
    let mut found = Vec::new();
    walk(models_dir, models_dir, 0, &mut found);
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

fn walk(root: &Path, dir: &Path, depth: usize, found: &mut Vec<BaseModel>) {
    if depth > 4 {
        return;
    }
    if dir.join("config.json").is_file() && dir != root {
        if let Ok(rel) = dir.strip_prefix(root) {
            let id = rel.to_string_lossy().replace('\\', "/");
            if valid_id(&id)
                && let Ok(model) = describe(&id, dir)
            {
                found.push(model);
            }
        }
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
            walk(root, &path, depth + 1, found);
        }
    }
}

/// Reads config.json and the safetensors headers of one model directory.
pub fn describe(id: &str, dir: &Path) -> Result<BaseModel, ModelError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", config_path.display())))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", config_path.display())))?;
    let architecture = match config.get("model_type").and_then(Value::as_str) {
        Some(t) => t.to_owned(),
        // timm checkpoints name the architecture (`resnet50`) and have no model_type.
        None => match config.get("architecture").and_then(Value::as_str) {
            Some(a) if a.starts_with("resnet") => "resnet".to_owned(),
            _ => "unknown".to_owned(),
        },
    };
    let family = family_of(&architecture);
    let is_classifier = config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter().filter_map(Value::as_str).any(|n| {
                n.ends_with("ForSequenceClassification") || n.ends_with("ForImageClassification")
            })
        });
    let weights = weight_files(dir)?;
    // A vision architecture may come as config.json alone: it trains from scratch.
    if weights.is_empty() && family != Some(Family::Vision) {
        return Err(ModelError::Invalid(format!(
            "{} has no .safetensors weights",
            dir.display()
        )));
    }
    let mut parameters = 0u64;
    let mut has_mlm_head = false;
    for file in &weights {
        for (name, numel) in safetensors_header(file)? {
            parameters += numel;
            has_mlm_head |= name.starts_with("cls.predictions.") || name.starts_with("lm_head.");
        }
    }
    let capabilities: Vec<&'static str> = match family {
        Some(Family::Encoder) => {
            let mut c = vec![
                "text_classification",
                "multi_label_classification",
                "embeddings",
                "domain_adaptation",
            ];
            if !has_mlm_head {
                // Domain adaptation then starts a fresh MLM head; still possible, just slower.
                c.retain(|&x| x != "domain_adaptation");
                c.push("domain_adaptation");
            }
            c
        }
        Some(Family::Decoder) => vec![
            "chat",
            "completion",
            "preference",
            "reinforcement",
            "domain_adaptation",
        ],
        Some(Family::Vision) => vec!["image_classification"],
        None => vec![],
    };
    Ok(BaseModel {
        id: id.to_owned(),
        dir: dir.to_owned(),
        architecture,
        family,
        parameters,
        capabilities,
        has_tokenizer: dir.join("tokenizer.json").is_file(),
        has_mlm_head,
        labels: if is_classifier {
            crate::nn::classifier::labels_from_config(&config).unwrap_or_default()
        } else {
            Vec::new()
        },
        problem_type: config
            .get("problem_type")
            .and_then(Value::as_str)
            .map(str::to_owned),
        modified: std::fs::metadata(&config_path)
            .and_then(|m| m.modified())
            .ok(),
    })
}

/// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", index.display())))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", index.display())))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::Invalid(format!("{} has no weight_map", index.display())))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            if f.contains('/') || f.contains("..") {
                Err(ModelError::Invalid(format!(
                    "shard name '{f}' is not a plain file name"
                )))
            } else {
                Ok(dir.join(f))
            }
        })
        .collect()
}

/// Tensor names and element counts from a safetensors header, without reading the data.
pub fn safetensors_header(path: &Path) -> Result<Vec<(String, u64)>, ModelError> {
    use std::io::Read;
    let err = |e: String| ModelError::Invalid(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| err(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 * 1024 * 1024 {
        return Err(err("safetensors header is implausibly large".into()));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| err(e.to_string()))?;
    let header: Value = serde_json::from_slice(&header).map_err(|e| err(e.to_string()))?;
    let obj = header
        .as_object()
        .ok_or_else(|| err("header is not an object".into()))?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let numel = v
                .get("shape")
                .and_then(Value::as_array)
                .map_or(0, |dims| dims.iter().filter_map(Value::as_u64).product());
            (k.clone(), numel)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_relative_paths() {
        assert!(valid_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(valid_id("bert-base-uncased"));
        for bad in [
            "", "/etc", "../x", "a/../b", "a//b", "a/./b", "a b", "ft:x:y",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
