//! How much device memory a job needs, estimated before it runs, so that workers claim only
//! jobs that fit on their device (`KILN_DEVICE_MEMORY`, or a GPU's own size).
//!
//! The estimate is the sum of what training keeps resident, all in f32:
//! - the weights: 4 bytes per parameter;
//! - for each trainable parameter its gradient and AdamW's two moments: 12 bytes;
//! - the activations kept for the backward pass. kiln's fused attention recomputes the
//!   attention probabilities in the backward pass, so no `seq × seq` matrix is stored: per
//!   token and layer, about `10 · hidden + 3 · intermediate` floats (inputs of the four
//!   projections and the norms, queries, keys and values, the MLP's inner activations), plus
//!   the logits and their gradient for language models (`vocab` floats each per token);
//!   `head_only` runs the backbone without a graph, so one layer's worth at a time;
//! - a fixed allowance for the runtime (CUDA context, cuBLAS workspace): 512 MiB;
//!
//! and a quarter more for the allocator's fragmentation. It is an estimate, on the high side
//! for the common cases; a job can state what it needs instead (`device_memory_gb`).

use serde_json::{Map, Value};

use crate::models::Family;
use crate::train::spec::{ALL_LINEAR, DECODER_LORA_MODULES, LORA_MODULES};

/// What the estimate is made from.
#[derive(Debug, Clone)]
pub struct MemoryInputs<'a> {
    /// The base model's parameter count.
    pub parameters: u64,
    /// The base model's config.json.
    pub config: &'a Value,
    pub family: Family,
    /// `supervised`, `dpo` or `reinforcement`.
    pub method: &'a str,
    /// The job's hyperparameters as requested (`"auto"` or absent where kiln chooses).
    pub hyperparameters: &'a Map<String, Value>,
    /// Examples and bytes of the training file (for the `auto` batch size and length).
    pub train_examples: u64,
    pub train_bytes: u64,
}

/// The estimate and its parts, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    pub total_bytes: u64,
    pub weights_bytes: u64,
    /// Gradients and optimizer moments of the trainable parameters.
    pub optimizer_bytes: u64,
    pub activation_bytes: u64,
    /// The batch size and sequence length (image side for vision) the estimate assumed.
    pub batch_size: u64,
    pub sequence_length: u64,
}

const RUNTIME_BYTES: u64 = 512 << 20;
const F32: u64 = 4;

fn number(config: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter()
        .find_map(|k| config.get(*k).and_then(Value::as_u64))
}

/// A requested value, or `None` for `"auto"` or absent.
fn requested(hp: &Map<String, Value>, key: &str) -> Option<u64> {
    hp.get(key).and_then(Value::as_u64)
}

/// The estimate for one job.
pub fn estimate(inputs: &MemoryInputs<'_>) -> MemoryEstimate {
    let hp = inputs.hyperparameters;
    let config = inputs.config;
    let strategy = hp.get("strategy").and_then(Value::as_str).unwrap_or("full");
    let p = inputs.parameters.max(1);
    let hidden = number(config, &["hidden_size", "dim", "n_embd"])
        .or_else(|| {
            // ResNet: the widest stage.
            config
                .get("hidden_sizes")
                .and_then(Value::as_array)
                .and_then(|s| s.iter().filter_map(Value::as_u64).max())
        })
        .unwrap_or(768);
    let layers = number(config, &["num_hidden_layers", "n_layer", "num_layers"])
        .or_else(|| {
            config
                .get("depths")
                .and_then(Value::as_array)
                .map(|d| d.iter().filter_map(Value::as_u64).sum())
        })
        .unwrap_or(12)
        .max(1);
    let intermediate = number(config, &["intermediate_size", "n_inner"]).unwrap_or(4 * hidden);
    let vocab = number(config, &["vocab_size"]).unwrap_or(0);
    let max_positions = number(config, &["max_position_embeddings", "n_positions"]);

    let examples = inputs.train_examples.max(1);
    let batch = requested(hp, "batch_size")
        .unwrap_or(if strategy == "head_only" { 64 } else { 16 })
        .min(if requested(hp, "batch_size").is_some() {
            u64::MAX
        } else {
            examples
        })
        .max(1);

    let (sequence_length, activation_bytes) = match inputs.family {
        Family::Vision => {
            let side = number(config, &["image_size"]).unwrap_or(224).max(1);
            // ResNets keep every feature map: about 50 floats per input pixel per block for
            // ResNet-18-sized stages (~80 MB per 224² image; torch keeps ~90 MB).
            let per_image = if config.get("hidden_sizes").is_some()
                || config.get("depths").is_some()
                || config.get("architecture").is_some()
            {
                side * side * 50 * layers * F32 * hidden / 512
            } else {
                let patch = number(config, &["patch_size"]).unwrap_or(16).max(1);
                let tokens = (side / patch) * (side / patch) + 1;
                tokens * layers * (10 * hidden + 3 * intermediate) * F32
            };
            let per_image = if strategy == "head_only" {
                per_image / layers
            } else {
                per_image
            };
            (side, batch * per_image)
        }
        Family::Encoder | Family::Decoder => {
            let cap = match inputs.family {
                Family::Decoder => 2048,
                _ => 512,
            };
            let cap = max_positions.map_or(cap, |m| m.min(cap));
            let seq = requested(hp, "max_length").unwrap_or_else(|| {
                // `auto` covers 99% of the examples: take 2.5× the mean length, at ~4 bytes
                // per token of JSONL (keys and quotes included).
                let mean_tokens = inputs.train_bytes / examples / 4;
                (mean_tokens * 5 / 2).div_ceil(8) * 8
            });
            let seq = seq.clamp(8, cap.max(8));
            let tokens = batch * seq;
            let per_token_layer = (10 * hidden + 3 * intermediate) * F32;
            let mut bytes = if strategy == "head_only" {
                tokens * per_token_layer
            } else {
                tokens * layers * per_token_layer
            };
            if inputs.family == Family::Decoder || inputs.method != "supervised" {
                // Logits and their gradient, per token.
                bytes += tokens * vocab * 2 * F32;
            }
            if matches!(inputs.method, "dpo" | "reinforcement") {
                // Chosen and rejected (or several samples) go through together.
                bytes *= 2;
            }
            (seq, bytes)
        }
    };

    let trainable = match strategy {
        "head_only" => hidden * 1024,
        "lora" => {
            let rank = requested(hp, "lora_rank").unwrap_or(8);
            let all = if inputs.family == Family::Decoder {
                DECODER_LORA_MODULES.len()
            } else {
                LORA_MODULES.len()
            } as u64;
            let modules = match hp.get("lora_target_modules") {
                Some(Value::String(s)) if s == ALL_LINEAR => all,
                Some(Value::Array(m)) if m.iter().any(|v| v == ALL_LINEAR) => all,
                Some(Value::Array(m)) => m.len() as u64,
                _ => 2,
            }
            .max(1);
            2 * rank * hidden * modules * layers
        }
        "freeze" => {
            let frozen = requested(hp, "freeze_layers")
                .unwrap_or(layers / 2)
                .min(layers);
            p * (layers - frozen) / layers
        }
        _ => p,
    };
    let weights_bytes = p * F32;
    let optimizer_bytes = trainable * 3 * F32;
    let subtotal = weights_bytes + optimizer_bytes + activation_bytes + RUNTIME_BYTES;
    MemoryEstimate {
        total_bytes: subtotal + subtotal / 4,
        weights_bytes,
        optimizer_bytes,
        activation_bytes,
        batch_size: batch,
        sequence_length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minilm() -> Value {
        json!({"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
               "intermediate_size": 1536, "max_position_embeddings": 512, "vocab_size": 30522})
    }

    fn run(config: &Value, family: Family, hp: Value, method: &str) -> MemoryEstimate {
        let hp = hp.as_object().cloned().unwrap_or_default();
        estimate(&MemoryInputs {
            parameters: 22_700_000,
            config,
            family,
            method,
            hyperparameters: &hp,
            train_examples: 1000,
            train_bytes: 1000 * 200,
        })
    }

    #[test]
    fn the_estimate_grows_with_the_work_and_shrinks_with_what_is_frozen() {
        let c = minilm();
        let full = run(
            &c,
            Family::Encoder,
            json!({"batch_size": 16, "max_length": 128}),
            "supervised",
        );
        // 22.7M parameters: 91 MB of weights, 272 MB of gradients and moments.
        assert_eq!(full.weights_bytes, 22_700_000 * 4);
        assert_eq!(full.optimizer_bytes, 22_700_000 * 12);
        assert_eq!((full.batch_size, full.sequence_length), (16, 128));
        let bigger = run(
            &c,
            Family::Encoder,
            json!({"batch_size": 64, "max_length": 128}),
            "supervised",
        );
        assert!(bigger.activation_bytes == 4 * full.activation_bytes);
        let lora = run(
            &c,
            Family::Encoder,
            json!({"batch_size": 16, "max_length": 128, "strategy": "lora"}),
            "supervised",
        );
        assert!(lora.optimizer_bytes < full.optimizer_bytes / 50);
        assert_eq!(lora.activation_bytes, full.activation_bytes);
        // "all-linear" (bare or listed) counts all six of an encoder layer's modules.
        for modules in [json!("all-linear"), json!(["all-linear"])] {
            let all = run(
                &c,
                Family::Encoder,
                json!({"batch_size": 16, "max_length": 128, "strategy": "lora",
                       "lora_target_modules": modules}),
                "supervised",
            );
            assert_eq!(all.optimizer_bytes, lora.optimizer_bytes * 3, "{modules}");
        }
        let head = run(
            &c,
            Family::Encoder,
            json!({"batch_size": 16, "max_length": 128, "strategy": "head_only"}),
            "supervised",
        );
        assert!(head.activation_bytes * 6 == full.activation_bytes);
        assert!(head.total_bytes < lora.total_bytes && lora.total_bytes < full.total_bytes);
        // The total is the parts, the runtime allowance, and a quarter more.
        let parts = full.weights_bytes + full.optimizer_bytes + full.activation_bytes + (512 << 20);
        assert_eq!(full.total_bytes, parts + parts / 4);
    }

    #[test]
    fn auto_settings_follow_the_data_and_the_model() {
        let c = minilm();
        // 200 bytes per example → ~50 tokens, 2.5× → 128 after rounding to 8.
        let auto = run(&c, Family::Encoder, json!({}), "supervised");
        assert_eq!((auto.batch_size, auto.sequence_length), (16, 128));
        // Lengths are capped by the model's positions; small data caps the batch.
        let hp = json!({}).as_object().cloned().unwrap_or_default();
        let tiny = estimate(&MemoryInputs {
            parameters: 1000,
            config: &c,
            family: Family::Encoder,
            method: "supervised",
            hyperparameters: &hp,
            train_examples: 3,
            train_bytes: 3 * 100_000,
        });
        assert_eq!((tiny.batch_size, tiny.sequence_length), (3, 512));
    }

    #[test]
    fn language_models_pay_for_their_logits_and_preferences_for_both_answers() {
        let c = json!({"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                       "intermediate_size": 4864, "max_position_embeddings": 32768,
                       "vocab_size": 151936});
        let hp = json!({"batch_size": 4, "max_length": 512});
        let sft = run(&c, Family::Decoder, hp.clone(), "supervised");
        let per_token = (10 * 896 + 3 * 4864) * 4 * 24 + 151_936 * 8;
        assert_eq!(sft.activation_bytes, 4 * 512 * per_token);
        let dpo = run(&c, Family::Decoder, hp, "dpo");
        assert_eq!(dpo.activation_bytes, 2 * sft.activation_bytes);
    }

    #[test]
    fn vision_models_are_sized_by_their_images() {
        let vit = json!({"model_type": "vit", "hidden_size": 192, "num_hidden_layers": 12,
                         "intermediate_size": 768, "image_size": 224, "patch_size": 16});
        let e = run(&vit, Family::Vision, json!({"batch_size": 8}), "supervised");
        assert_eq!(e.sequence_length, 224);
        assert_eq!(e.activation_bytes, 8 * 197 * 12 * (10 * 192 + 3 * 768) * 4);
        let resnet = json!({"model_type": "resnet", "hidden_sizes": [64, 128, 256, 512],
                            "depths": [2, 2, 2, 2]});
        let r = run(
            &resnet,
            Family::Vision,
            json!({"batch_size": 8}),
            "supervised",
        );
        // ~100 MB per 224² image for a ResNet-18.
        let per_image = r.activation_bytes / 8;
        assert!((50 << 20..300 << 20).contains(&per_image), "{per_image}");
    }
}
