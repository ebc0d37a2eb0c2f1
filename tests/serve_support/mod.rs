//! Helpers for the serving tests: sentence-transformers configurations, the Hugging Face
//! reference (tests/python/reference_outputs.py) and HTTP shortcuts.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

/// Writes `modules.json` and `1_Pooling/config.json` as sentence-transformers saves them.
pub fn write_pooling(dir: &Path, hidden: usize, modes: &[&str], normalize: bool) {
    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if normalize {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        std::fs::create_dir_all(dir.join("2_Normalize")).unwrap();
    }
    std::fs::write(dir.join("modules.json"), Value::Array(modules).to_string()).unwrap();
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let has = |m: &str| modes.contains(&m);
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        json!({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": has("cls"),
            "pooling_mode_mean_tokens": has("mean"),
            "pooling_mode_max_tokens": has("max"),
            "pooling_mode_mean_sqrt_len_tokens": has("mean_sqrt_len"),
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true
        })
        .to_string(),
    )
    .unwrap();
}

/// What Hugging Face (transformers, sentence-transformers) computes for `texts`.
pub fn reference(model_dir: &Path, task: &str, texts: &[&str]) -> Value {
    let texts_path = model_dir.with_extension(format!("{task}-texts.json"));
    std::fs::write(&texts_path, json!(texts).to_string()).unwrap();
    let out = Command::new("python3")
        .arg(format!(
            "{}/tests/python/reference_outputs.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg("--model-dir")
        .arg(model_dir)
        .arg("--task")
        .arg(task)
        .arg("--texts-json")
        .arg(&texts_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "pip install -r tests/python/requirements.txt: {stderr}"
    );
    assert!(
        out.status.success(),
        "reference_outputs.py failed: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The largest absolute difference between two equally shaped matrices.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row widths differ");
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

pub fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("a list of rows")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect()
        })
        .collect()
}

/// The float embeddings of a `/v1/embeddings` response.
pub fn embeddings_of(body: &Value) -> Vec<Vec<f32>> {
    let data = body["data"].as_array().expect("data");
    data.iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i);
            assert_eq!(item["object"], "embedding");
            item["embedding"]
                .as_array()
                .expect("float embedding")
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Label probabilities (in label order) of a `/v1/classifications` response.
pub fn scores_of(body: &Value, labels: &[String]) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|item| {
            labels
                .iter()
                .map(|l| item["scores"][l].as_f64().expect("score per label") as f32)
                .collect()
        })
        .collect()
}
