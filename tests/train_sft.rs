//! Supervised fine-tuning of decoder LMs with the training engine (no server): tiny decoders
//! with random weights learn to answer fixed prompts exactly (chat with the loss on assistant
//! turns, `full` and `lora`; prompt/completion pairs), domain text lowers held-out perplexity,
//! and data the decoder path cannot take gets a clear error.

mod train_support;

use std::path::{Path, PathBuf};

use kiln::serve::{GenEvent, GenerativeModel, Prompt, SamplingParams};
use kiln::train::{TrainEvent, TrainOutcome, TrainSummary};
use serde_json::{Value, json};

const PAIRS: [(&str, &str); 4] = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a cat have?", "Four."),
    ("Say hello.", "Hello!"),
];

fn write_jsonl(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Each pair three times: a training file needs at least 10 examples.
fn chat_lines() -> Vec<Value> {
    PAIRS
        .iter()
        .cycle()
        .take(3 * PAIRS.len())
        .map(|(q, a)| {
            json!({"messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]})
        })
        .collect()
}

fn tiny_decoder(dir: &Path, model_type: &str) -> PathBuf {
    let base = dir.join("base");
    kiln::nn::tiny::write_tiny_decoder(&base, model_type, 5).unwrap();
    base
}

/// Greedy generation, as the chat endpoint runs it.
fn generate(model: &GenerativeModel, prompt: Prompt, max_tokens: usize) -> (String, String) {
    let ids = model.encode(&prompt).unwrap();
    let params = SamplingParams {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        n: 1,
        seed: Some(0),
        stop: Vec::new(),
    };
    let mut text = String::new();
    let mut reason = String::new();
    let mut emit = |e: GenEvent| {
        match e {
            GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::Finished { reason: r, .. } => reason = r.as_str().to_owned(),
        }
        true
    };
    model.generate(&ids, &params, &mut emit).unwrap();
    (text, reason)
}

fn chat_prompt(q: &str) -> Prompt {
    Prompt::Chat(vec![
        json!({"role": "system", "content": "Answer briefly."}),
        json!({"role": "user", "content": q}),
    ])
}

fn answers(model_dir: &Path) -> Vec<(String, String)> {
    let model = GenerativeModel::load(model_dir, &candle_core::Device::Cpu).unwrap();
    PAIRS
        .iter()
        .map(|(q, _)| generate(&model, chat_prompt(q), 16))
        .collect()
}

fn summary(run: &train_support::Run) -> &TrainSummary {
    match &run.outcome {
        TrainOutcome::Finished(s) => s,
        other => panic!("the run did not finish: {other:?}"),
    }
}

fn sft(dir: &Path, base: &Path, hp: Value) -> train_support::Run {
    let train = dir.join("chat.jsonl");
    write_jsonl(&train, &chat_lines());
    let job = train_support::job(base, &train, None, &dir.join("run"), hp, 3);
    train_support::run(&job)
}

#[test]
fn chat_sft_teaches_a_decoder_exact_answers() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let before = answers(&base);
    assert!(
        PAIRS.iter().zip(&before).all(|((_, a), (got, _))| got != a),
        "the random model already answers: {before:?}"
    );
    let run = sft(
        dir.path(),
        &base,
        json!({"n_epochs": 60, "batch_size": 4, "learning_rate": 3e-3, "warmup_ratio": 0.0, "weight_decay": 0.0}),
    );
    let s = summary(&run);
    assert_eq!(s.task, "chat");
    assert!(s.trained_tokens > 0);
    let after = answers(&s.model_dir);
    for ((q, a), (got, reason)) in PAIRS.iter().zip(&after) {
        assert_eq!(got, a, "{q}");
        assert_eq!(
            reason, "stop",
            "{q}: the reply must end with the end-of-turn token"
        );
    }
    // The exported directory is a complete model in Hugging Face layout.
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(s.model_dir.join(f).is_file(), "{f}");
    }
    // The loss fell.
    let losses: Vec<f64> = run
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(p) => Some(p.train_loss),
            _ => None,
        })
        .collect();
    assert!(losses.last().unwrap() < &(losses[0] * 0.2), "{losses:?}");
}

#[test]
fn lora_sft_on_llama_learns_with_the_base_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "llama");
    let run = sft(
        dir.path(),
        &base,
        json!({"strategy": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
               "lora_target_modules": ["all-linear"],
               "n_epochs": 80, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.0}),
    );
    let s = summary(&run);
    // PEFT's shorthand, resolved to every projection of the layers.
    assert_eq!(
        s.hyperparameters.lora_target_modules,
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ]
    );
    let after = answers(&s.model_dir);
    let right = PAIRS
        .iter()
        .zip(&after)
        .filter(|((_, a), (got, _))| got == a)
        .count();
    assert_eq!(right, PAIRS.len(), "{after:?}");
    // The export is merged: no adapter tensors, the base names only.
    let weights = candle_core::safetensors::load(
        s.model_dir.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        weights.keys().all(|k| !k.contains("lora_")),
        "{:?}",
        weights.keys()
    );
}

#[test]
fn prompt_completion_sft_learns_the_completions() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "mistral");
    let train = dir.path().join("pc.jsonl");
    let lines: Vec<Value> = PAIRS
        .iter()
        .cycle()
        .take(3 * PAIRS.len())
        .map(|(q, a)| json!({"prompt": format!("Q: {q}\nA:"), "completion": format!(" {a}")}))
        .collect();
    write_jsonl(&train, &lines);
    let job = train_support::job(
        &base,
        &train,
        Some(&train),
        &dir.path().join("run"),
        json!({"n_epochs": 60, "batch_size": 4, "learning_rate": 3e-3, "warmup_ratio": 0.0, "weight_decay": 0.0}),
        3,
    );
    let run = train_support::run(&job);
    let s = summary(&run);
    assert_eq!(s.task, "completion");
    assert!(
        s.metrics["valid_mean_token_accuracy"] > 0.99,
        "{:?}",
        s.metrics
    );
    let model = GenerativeModel::load(&s.model_dir, &candle_core::Device::Cpu).unwrap();
    for (q, a) in PAIRS {
        let (got, _) = generate(&model, Prompt::Text(format!("Q: {q}\nA:")), 12);
        assert_eq!(got, format!(" {a}"), "{q}");
    }
}

#[test]
fn domain_text_lowers_held_out_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let train = dir.path().join("domain.jsonl");
    // A small "domain": sentences drawn from a fixed vocabulary and pattern.
    let words = [
        "kiln", "fires", "clay", "glaze", "pots", "at", "high", "heat",
    ];
    let lines: Vec<Value> = (0..40)
        .map(|i| {
            let text: Vec<&str> = (0..8)
                .map(|j| words[(i * 3 + j * 5) % words.len()])
                .collect();
            json!({"text": text.join(" ")})
        })
        .collect();
    write_jsonl(&train, &lines);
    let job = train_support::job(
        &base,
        &train,
        None,
        &dir.path().join("run"),
        json!({"n_epochs": 10, "batch_size": 8, "learning_rate": 3e-3}),
        3,
    );
    let run = train_support::run(&job);
    let s = summary(&run);
    assert_eq!(s.task, "causal_domain_adaptation");
    let before = s.baseline_metrics.as_ref().expect("a baseline")["valid_perplexity"];
    let after = s.metrics["valid_perplexity"];
    assert!(after < before * 0.5, "perplexity {before} -> {after}");
}

#[test]
fn data_a_decoder_cannot_train_on_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let train = dir.path().join("cls.jsonl");
    write_jsonl(
        &train,
        &(0..12)
            .map(|i| json!({"text": format!("good {i}"), "label": if i % 2 == 0 { "pos" } else { "neg" }}))
            .collect::<Vec<_>>(),
    );
    let job = train_support::job(&base, &train, None, &dir.path().join("run"), json!({}), 1);
    let err = kiln::train::run(&job, &mut |_| {}, &Default::default()).unwrap_err();
    assert!(err.is_user_error());
    assert!(err.to_string().contains("cannot train a decoder"), "{err}");
    // head_only has no meaning for a generative model.
    let chat = dir.path().join("chat.jsonl");
    write_jsonl(&chat, &chat_lines());
    let job = train_support::job(
        &base,
        &chat,
        None,
        &dir.path().join("run2"),
        json!({"strategy": "head_only"}),
        1,
    );
    let err = kiln::train::run(&job, &mut |_| {}, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("strategy"), "{err}");
}

fn preference_lines(things: &[&str]) -> Vec<Value> {
    things
        .iter()
        .map(|t| {
            json!({
                "input": {"messages": [{"role": "user", "content": format!("Tell me about {t}.")}]},
                "preferred_output": [{"role": "assistant", "content": format!("{t} is lovely.")}],
                "non_preferred_output": [{"role": "assistant", "content": format!("{t} is awful.")}],
            })
        })
        .collect()
}

#[test]
fn dpo_raises_the_margin_of_preferred_answers_on_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let train = dir.path().join("pref.jsonl");
    let valid = dir.path().join("pref_valid.jsonl");
    write_jsonl(
        &train,
        &preference_lines(&[
            "tea", "rain", "cats", "bread", "jazz", "snow", "maps", "wool", "figs", "bees",
            "lamps", "ink",
        ]),
    );
    write_jsonl(
        &valid,
        &preference_lines(&["moss", "kites", "soup", "owls"]),
    );
    let job = train_support::job(
        &base,
        &train,
        Some(&valid),
        &dir.path().join("run"),
        json!({"n_epochs": 15, "batch_size": 4, "learning_rate": 2e-3, "beta": 0.5, "warmup_ratio": 0.0}),
        3,
    );
    let run = train_support::run(&job);
    let s = summary(&run);
    assert_eq!(s.task, "preference");
    assert_eq!(s.hyperparameters.beta, Some(0.5));
    let before = s.baseline_metrics.as_ref().expect("a baseline");
    // The policy starts as the reference: no margin at all.
    assert!(before["valid_reward_margin"].abs() < 1e-3, "{before:?}");
    let after = &s.metrics;
    assert!(after["valid_reward_margin"] > 1.0, "{after:?}");
    assert_eq!(after["valid_reward_accuracy"], 1.0, "{after:?}");
    assert!(
        after["valid_loss"] < before["valid_loss"],
        "{before:?} -> {after:?}"
    );
}

/// Prompts of the reinforcement runs (the model is to reply with the item's target).
const RFT_PROMPTS: &[&str] = &[
    "Say something.",
    "Write a word.",
    "Go on.",
    "Tell me.",
    "Answer now.",
    "Reply.",
    "Speak.",
    "Begin.",
    "Type.",
    "Write.",
    "Say it.",
    "Once more.",
];

fn rft_lines(prompts: &[&str]) -> Vec<Value> {
    prompts
        .iter()
        .map(|p| json!({"messages": [{"role": "user", "content": p}], "target": "x"}))
        .collect()
}

#[test]
fn reinforcement_with_a_string_check_grader_raises_validation_reward() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let train = dir.path().join("rft.jsonl");
    let valid = dir.path().join("rft_valid.jsonl");
    write_jsonl(&train, &rft_lines(RFT_PROMPTS));
    write_jsonl(
        &valid,
        &rft_lines(&["Talk.", "Say more.", "Next.", "Continue."]),
    );
    let mut job = train_support::job(
        &base,
        &train,
        Some(&valid),
        &dir.path().join("run"),
        json!({"n_epochs": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "max_length": 72, "eval_interval": 3, "compute_multiplier": 2}),
        3,
    );
    // The reply must contain the item's target letter: a random model's greedy reply does not.
    job.grader = Some(json!({
        "type": "string_check", "name": "has_target",
        "input": "{{ sample.output_text }}", "reference": "{{ item.target }}", "operation": "like",
    }));
    let run = train_support::run(&job);
    let s = summary(&run);
    assert_eq!(s.task, "reinforcement");
    let before = s.baseline_metrics.as_ref().expect("a baseline")["valid_reward"];
    let after = s.metrics["valid_reward"];
    println!("validation reward: {before:.3} before, {after:.3} after");
    assert!(
        before <= 0.25,
        "the task must be one the model cannot do at the start: {before}"
    );
    assert!(after >= 0.75, "validation reward {before} -> {after}");
    // Every step reports its reward, spread and KL.
    let steps: Vec<&kiln::train::StepProgress> = run
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(p) => Some(p),
            _ => None,
        })
        .collect();
    assert!(steps.iter().all(|p| {
        ["train_reward_mean", "train_reward_std", "train_kl"]
            .iter()
            .all(|k| p.extra.contains_key(*k))
    }));
    assert_eq!(s.hyperparameters.compute_multiplier, Some(2.0));
}

/// A `cosine` grader embeds in the training process with the base encoder it names: the
/// rewards are cosines (within [-1, 1], not zero), and an encoder that is not in the
/// models directory fails the run before any training.
#[test]
fn reinforcement_with_a_cosine_grader_embeds_with_its_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let models = dir.path().join("models");
    train_support::tiny_model(
        &models.join("kiln-test/tiny-bert"),
        kiln::nn::tiny::TinyLayout::Unprefixed,
    );
    let train = dir.path().join("rft.jsonl");
    write_jsonl(&train, &rft_lines(&RFT_PROMPTS[..10]));
    let mut job = train_support::job(
        &base,
        &train,
        Some(&train),
        &dir.path().join("run"),
        json!({"n_epochs": 1, "batch_size": 5, "max_length": 48, "eval_interval": 2}),
        3,
    );
    job.models_dir = Some(models);
    let grader = |encoder: &str| {
        json!({
            "type": "text_similarity", "name": "close", "evaluation_metric": "cosine",
            "input": "{{ sample.output_text }}", "reference": "a great film",
            "embedding_model": encoder,
        })
    };
    job.grader = Some(grader("kiln-test/tiny-bert"));
    let run = train_support::run(&job);
    let rewards: Vec<f64> = run
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(p) => p.extra.get("train_reward_mean").copied(),
            _ => None,
        })
        .collect();
    assert!(!rewards.is_empty());
    assert!(
        rewards
            .iter()
            .all(|r| r.is_finite() && (-1.0..=1.0).contains(r) && *r != 0.0),
        "{rewards:?}"
    );
    let s = summary(&run);
    assert!(s.metrics["valid_reward"].is_finite(), "{:?}", s.metrics);

    job.grader = Some(grader("kiln-test/missing"));
    job.work_dir = dir.path().join("run2/work");
    job.model_dir = dir.path().join("run2/model");
    let stop = kiln::train::StopSignal::default();
    let err = kiln::train::run(&job, &mut |_| {}, &stop).unwrap_err();
    assert!(err.to_string().contains("grader embedding model"), "{err}");
}

/// Collects one request's text per sample and finish reasons.
fn collector(n: usize) -> (Vec<String>, Vec<String>) {
    (vec![String::new(); n], vec![String::new(); n])
}

fn record(out: &mut (Vec<String>, Vec<String>), e: GenEvent) -> bool {
    match e {
        GenEvent::Text { index, text } => out.0[index].push_str(&text),
        GenEvent::Finished { index, reason, .. } => out.1[index] = reason.as_str().to_owned(),
    }
    true
}

/// Requests of different lengths and settings decoded as one batch get exactly what each
/// gets alone (greedy, seeded sampling with n = 2, a stop string, a token budget).
#[test]
fn batched_requests_generate_what_they_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "llama");
    let model = GenerativeModel::load(&base, &candle_core::Device::Cpu).unwrap();
    let prompts = [
        model
            .encode(&chat_prompt("What is the capital of France?"))
            .unwrap(),
        model.encode(&Prompt::Text("Once".into())).unwrap(),
        model.encode(&chat_prompt("Hi")).unwrap(),
    ];
    let params = [
        SamplingParams {
            max_tokens: 12,
            temperature: 0.0,
            top_p: 1.0,
            n: 1,
            seed: None,
            stop: vec![],
        },
        SamplingParams {
            max_tokens: 9,
            temperature: 1.0,
            top_p: 0.9,
            n: 2,
            seed: Some(4),
            stop: vec![],
        },
        SamplingParams {
            max_tokens: 20,
            temperature: 0.7,
            top_p: 1.0,
            n: 1,
            seed: Some(5),
            stop: vec!["e".into()],
        },
    ];
    let alone: Vec<(Vec<String>, Vec<String>)> = prompts
        .iter()
        .zip(&params)
        .map(|(p, params)| {
            let mut out = collector(params.n);
            model
                .generate(p, params, &mut |e| record(&mut out, e))
                .unwrap();
            out
        })
        .collect();
    let mut outs: Vec<(Vec<String>, Vec<String>)> = params.iter().map(|p| collector(p.n)).collect();
    {
        let (a, rest) = outs.split_at_mut(1);
        let (b, c) = rest.split_at_mut(1);
        let mut ea = |e| record(&mut a[0], e);
        let mut eb = |e| record(&mut b[0], e);
        let mut ec = |e| record(&mut c[0], e);
        let mut requests = [
            kiln::serve::generate::GenRequest {
                prompt: &prompts[0],
                params: &params[0],
                emit: &mut ea,
            },
            kiln::serve::generate::GenRequest {
                prompt: &prompts[1],
                params: &params[1],
                emit: &mut eb,
            },
            kiln::serve::generate::GenRequest {
                prompt: &prompts[2],
                params: &params[2],
                emit: &mut ec,
            },
        ];
        for r in model.generate_batch(&mut requests) {
            r.unwrap();
        }
    }
    assert_eq!(outs, alone);
    assert!(alone[0].1[0] == "length" || alone[0].1[0] == "stop");
    assert!(alone[1].0.iter().all(|t| !t.is_empty()));
}

/// Model graders run a base model from the models directory inside the training process;
/// a grader model that is not there fails the job before any training.
#[test]
fn reinforcement_with_a_model_grader_runs_the_grader_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_decoder(dir.path(), "qwen2");
    let models = dir.path().join("models");
    kiln::nn::tiny::write_tiny_decoder(&models.join("judge/tiny"), "llama", 9).unwrap();
    let train = dir.path().join("rft.jsonl");
    write_jsonl(
        &train,
        &rft_lines(&["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]),
    );
    let mut job = train_support::job(
        &base,
        &train,
        Some(&train),
        &dir.path().join("run"),
        json!({"n_epochs": 1, "batch_size": 5, "max_length": 40}),
        3,
    );
    let grader = json!({
        "type": "multi", "name": "both",
        "graders": {
            "has": {"type": "string_check", "name": "has", "input": "{{ sample.output_text }}", "reference": "{{ item.target }}", "operation": "like"},
            "judge": {"type": "label_model", "name": "judge", "model": "judge/tiny",
                      "input": [{"role": "user", "content": "Is this good? {{ sample.output_text }}"}],
                      "labels": ["yes", "no"], "passing_labels": ["yes"]},
        },
        "calculate_output": "0.5 * has + 0.5 * judge",
    });
    job.grader = Some(grader.clone());
    job.models_dir = Some(models.clone());
    let run = train_support::run(&job);
    let s = summary(&run);
    let reward = s.metrics["valid_reward"];
    assert!((0.0..=1.0).contains(&reward), "{reward}");

    job.models_dir = Some(dir.path().join("elsewhere"));
    job.work_dir = dir.path().join("run2");
    let err = kiln::train::run(&job, &mut |_| {}, &Default::default()).unwrap_err();
    assert!(err.is_user_error());
    assert!(
        err.to_string().contains("no base model 'judge/tiny'"),
        "{err}"
    );
}
