//! Writing finished models in Hugging Face layout: `config.json`, `model.safetensors` under
//! transformers' names, and the base model's tokenizer files, so `AutoModelFor…` loads them.
//! A model is written to a temporary directory and renamed into place when complete.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{Value, json};

use super::TrainError;

/// Tokenizer (and sentence-transformers) files carried over from the base model.
const CARRIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
];

fn io(dir: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io(format!("writing the model to {}: {e}", dir.display()))
}

/// Writes `config`, `weights` and the carried files into `dir` atomically.
pub(crate) fn write_model_dir(
    dir: &Path,
    config: &Value,
    weights: &HashMap<String, Tensor>,
    source_dir: &Path,
    extra_files: &[&str],
) -> Result<(), TrainError> {
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(dir))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(dir))?;
    let text = serde_json::to_string_pretty(config).map_err(|e| TrainError::Io(e.to_string()))?;
    std::fs::write(partial.join("config.json"), text).map_err(io(dir))?;
    // transformers reads the `format` metadata to know these are PyTorch-layout weights.
    let data: Vec<(&String, &Tensor)> = weights.iter().collect();
    let metadata: Option<HashMap<String, String>> =
        Some([("format".to_owned(), "pt".to_owned())].into());
    let views: Result<Vec<(String, TensorBytes)>, TrainError> = data
        .iter()
        .map(|(n, t)| Ok(((*n).clone(), TensorBytes::of(t)?)))
        .collect();
    safetensors::tensor::serialize_to_file(views?, metadata, &partial.join("model.safetensors"))
        .map_err(|e| TrainError::Io(format!("writing model.safetensors: {e}")))?;
    for name in CARRIED_FILES.iter().chain(extra_files) {
        let from = source_dir.join(name);
        if from.is_file() {
            let to = partial.join(name);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(dir))?;
            }
            std::fs::copy(&from, &to).map_err(io(dir))?;
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&partial, dir).map_err(io(dir))?;
    Ok(())
}

/// An f32 tensor's bytes for safetensors.
struct TensorBytes {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl TensorBytes {
    fn of(t: &Tensor) -> Result<TensorBytes, TrainError> {
        let shape = t.dims().to_vec();
        let values = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(TensorBytes {
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    }
}

impl safetensors::View for TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A sequence classifier: the base config with transformers' classification keys.
pub(crate) fn write_classifier(
    dir: &Path,
    base_config: &Value,
    base_dir: &Path,
    weights: &HashMap<String, Tensor>,
    labels: &[String],
    multi_label: bool,
    architecture: &str,
) -> Result<(), TrainError> {
    let mut config = base_config.clone();
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
    config["architectures"] = json!([architecture]);
    config["id2label"] = Value::Object(id2label);
    config["label2id"] = Value::Object(label2id);
    config["problem_type"] = json!(if multi_label {
        "multi_label_classification"
    } else {
        "single_label_classification"
    });
    if let Some(obj) = config.as_object_mut() {
        obj.remove("_name_or_path");
    }
    // The sentence-transformers files too: the fine-tuned encoder's embeddings are pooled
    // and normalised as the base model's were (served by /v1/embeddings).
    write_model_dir(dir, &config, weights, base_dir, SENTENCE_TRANSFORMERS_FILES)
}

/// sentence-transformers' description of how to pool and normalise the encoder's output.
const SENTENCE_TRANSFORMERS_FILES: &[&str] = &[
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// A domain-adapted encoder with its masked-LM head (`BertForMaskedLM` layout), usable as a
/// base model by later jobs.
pub(crate) fn write_masked_lm(
    dir: &Path,
    base_config: &Value,
    base_dir: &Path,
    weights: &HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    let mut config = base_config.clone();
    config["architectures"] = json!(["BertForMaskedLM"]);
    if let Some(obj) = config.as_object_mut() {
        obj.remove("_name_or_path");
        obj.remove("id2label");
        obj.remove("label2id");
    }
    // Keep the sentence-transformers pooling settings so embeddings stay as before.
    write_model_dir(dir, &config, weights, base_dir, SENTENCE_TRANSFORMERS_FILES)
}
