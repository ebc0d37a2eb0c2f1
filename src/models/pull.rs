//! `kiln models pull ORG/NAME`: copies a model from the Hugging Face hub into the models
//! directory, where the network allows it (set `HF_ENDPOINT` for a mirror, `HF_TOKEN` for
//! gated models).

use std::path::{Path, PathBuf};

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("'{0}' is not a hub model id (expected ORG/NAME)")]
    InvalidId(String),
    #[error("the hub could not be reached or refused the request: {0}")]
    Hub(String),
    #[error("{0} has no .safetensors weights; kiln loads safetensors only")]
    NoSafetensors(String),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Files a model directory needs (weights, config, tokenizer, sentence-transformers and
/// preprocessing settings); everything else in a repository (other weight formats,
/// ONNX exports, READMEs) is skipped.
fn wanted(name: &str) -> bool {
    let keep_exact = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "merges.txt",
        "vocab.json",
        "generation_config.json",
        "preprocessor_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    ];
    keep_exact.contains(&name) || (name.ends_with(".safetensors") && !name.contains('/'))
}

/// Downloads `id` into `models_dir/id` (written to a temporary directory first, renamed
/// when complete). Returns the model directory.
pub fn pull(models_dir: &Path, id: &str) -> Result<PathBuf, PullError> {
    if !super::valid_id(id) || id.split('/').count() != 2 {
        return Err(PullError::InvalidId(id.to_owned()));
    }
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| PullError::Io { path, source }
    };
    let target = models_dir.join(id);
    let staging = models_dir.join(format!(".pull-{}", uuid::Uuid::new_v4().simple()));
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(staging.join(".cache"))
        .with_progress(true)
        .build()
        .map_err(|e| PullError::Hub(e.to_string()))?;
    let repo = api.model(id.to_owned());
    let info = repo.info().map_err(|e| PullError::Hub(e.to_string()))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f))
        .collect();
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(PullError::NoSafetensors(id.to_owned()));
    }
    let result = (|| {
        for file in &files {
            let cached = repo
                .get(file)
                .map_err(|e| PullError::Hub(format!("{file}: {e}")))?;
            let dest = staging.join(file);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::copy(&cached, &dest).map_err(io(&dest))?;
        }
        std::fs::remove_dir_all(staging.join(".cache")).map_err(io(&staging))?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        std::fs::rename(&staging, &target).map_err(io(&target))?;
        Ok(target.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn only_what_kiln_loads_is_downloaded() {
        for f in [
            "config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "1_Pooling/config.json",
            "tokenizer.json",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "onnx/model.onnx",
            "README.md",
            "tf_model.h5",
            "openvino/x.safetensors",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
