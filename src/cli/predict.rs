//! `kiln predict`: a model's outputs without a server or a database, through the same
//! inference engine `kiln serve` runs (its batching, its devices). For people at a terminal
//! trying an exported model, for scripts, and for checking a device (the GPU build's serving
//! on each model family) on a machine with no PostgreSQL.
//!
//! One JSON object per input on standard output, in input order.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::api::scored_labels;
use crate::models::Family;
use crate::serve::{
    GenEvent, ModelLocation, ModelRef, Prompt, SamplingParams, ServeError, ServeSettings, Serving,
};

/// What to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PredictTask {
    /// Label scores of each text (a text classifier).
    Classify,
    /// A sentence embedding of each text (any text encoder).
    Embed,
    /// A greedy completion of each prompt (a decoder).
    Generate,
    /// Label scores of each image file (an image classifier).
    Image,
}

#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// A model directory in Hugging Face layout (an exported fine-tuned model, or a base
    /// model), or a base model's id under the models directory.
    #[arg(long)]
    pub model: String,
    /// Inputs: texts, prompts, or image file paths with `--task image`; without any, one per
    /// line of standard input.
    pub inputs: Vec<String>,
    /// What to compute [default: what the model does: `classify` for a classifier, `embed`
    /// for a plain encoder, `generate` for a decoder, `image` for an image classifier].
    #[arg(long, value_enum)]
    pub task: Option<PredictTask>,
    /// The device the engine runs on: `cpu` or `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    /// Cut texts longer than the model's limit instead of refusing them.
    #[arg(long)]
    pub truncate: bool,
    /// Tokens to generate per prompt (greedy decoding).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Complete prompts as raw text (as `/v1/completions` does) instead of as a chat's one
    /// user message (`/v1/chat/completions`, with the model's chat template).
    #[arg(long)]
    pub raw: bool,
    /// Directory of base models [default: $KILN_DATA_DIR/models].
    #[arg(long, env = "KILN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
    pub data_dir: PathBuf,
}

fn resolve_model(args: &PredictArgs) -> anyhow::Result<(String, PathBuf)> {
    let as_path = PathBuf::from(&args.model);
    if as_path.join("config.json").is_file() {
        return Ok((args.model.clone(), as_path));
    }
    if as_path.is_dir() {
        bail!(
            "{}: no config.json (a model directory in Hugging Face layout is needed)",
            as_path.display()
        );
    }
    if as_path.is_absolute() || args.model.starts_with('.') {
        bail!("{}: no such directory", as_path.display());
    }
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("models"));
    let base = crate::models::resolve(&models_dir, &args.model)?;
    Ok((base.id, base.dir))
}

/// What the model in `dir` does by default.
fn default_task(id: &str, dir: &Path) -> anyhow::Result<PredictTask> {
    let model = crate::models::describe(id, dir)?;
    Ok(match (model.family, model.labels.is_empty()) {
        (Some(Family::Encoder), false) => PredictTask::Classify,
        (Some(Family::Encoder), true) => PredictTask::Embed,
        (Some(Family::Decoder), _) => PredictTask::Generate,
        (Some(Family::Vision), _) => PredictTask::Image,
        (None, _) => bail!(
            "{}: '{}' is not an architecture kiln serves; pass --task to try anyway",
            dir.display(),
            model.architecture
        ),
    })
}

fn inputs(args: &PredictArgs) -> anyhow::Result<Vec<String>> {
    if !args.inputs.is_empty() {
        return Ok(args.inputs.clone());
    }
    let mut lines = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading standard input")?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    if lines.is_empty() {
        bail!("no inputs: pass them as arguments or one per line on standard input");
    }
    Ok(lines)
}

fn engine_error(e: ServeError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

pub async fn run(args: PredictArgs) -> anyhow::Result<()> {
    let device = args
        .device
        .open()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let (id, dir) = resolve_model(&args)?;
    let task = match args.task {
        Some(task) => task,
        None => default_task(&id, &dir)?,
    };
    let inputs = inputs(&args)?;
    // The engine keeps fine-tuned models in an artifact store; a directory needs none, so an
    // empty one stands in.
    let scratch = crate::ScratchDir::new("kiln-predict");
    let artifacts = crate::artifacts::Artifacts::local(scratch.path().to_path_buf())
        .await
        .with_context(|| format!("creating {}", scratch.path().display()))?;
    let settings = ServeSettings {
        device,
        max_inputs: usize::MAX,
        // A terminal waits as long as the inputs take.
        timeout: std::time::Duration::from_secs(24 * 3600),
        ..ServeSettings::default()
    };
    let serving = Serving::new(settings, artifacts);
    let model = ModelRef {
        id,
        location: ModelLocation::Dir(dir),
    };
    let mut out = Vec::with_capacity(inputs.len());
    match task {
        PredictTask::Classify => {
            let (loaded, results) = serving
                .classify(&model, inputs, args.truncate)
                .await
                .map_err(engine_error)?;
            for (c, tokens) in results {
                let mut v =
                    scored_labels(&loaded.model.labels, &c.scores, loaded.model.multi_label);
                v["prompt_tokens"] = json!(tokens);
                out.push(v);
            }
        }
        PredictTask::Embed => {
            let (_, results) = serving
                .embed(&model, inputs, args.truncate)
                .await
                .map_err(engine_error)?;
            for (embedding, tokens) in results {
                out.push(json!({"embedding": embedding, "prompt_tokens": tokens}));
            }
        }
        PredictTask::Image => {
            let mut images = Vec::with_capacity(inputs.len());
            for path in &inputs {
                images.push(std::fs::read(path).with_context(|| format!("reading {path}"))?);
            }
            let (loaded, results) = serving
                .classify_images(&model, images)
                .await
                .map_err(engine_error)?;
            for (path, probs) in inputs.iter().zip(results) {
                let mut v = scored_labels(&loaded.model.labels, &probs, false);
                v["image"] = json!(path);
                out.push(v);
            }
        }
        PredictTask::Generate => {
            for prompt in inputs {
                out.push(generate(&serving, &model, prompt, args.max_tokens, args.raw).await?);
            }
        }
    }
    for v in out {
        println!("{v}");
    }
    Ok(())
}

/// A greedy completion of `prompt`: of the raw text, or of a chat whose one user message it is.
async fn generate(
    serving: &Serving,
    model: &ModelRef,
    prompt: String,
    max_tokens: usize,
    raw: bool,
) -> anyhow::Result<Value> {
    let params = SamplingParams {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        n: 1,
        seed: Some(0),
        stop: Vec::new(),
    };
    let prompt = if raw {
        Prompt::Text(prompt)
    } else {
        Prompt::Chat(vec![json!({"role": "user", "content": prompt})])
    };
    let mut generation = serving
        .generate(model, prompt, params)
        .await
        .map_err(engine_error)?;
    let (mut text, mut finish, mut tokens) = (String::new(), Value::Null, 0);
    while let Some(event) = generation.events.recv().await {
        match event.map_err(engine_error)? {
            GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::Finished {
                reason, tokens: n, ..
            } => {
                finish = json!(reason.as_str());
                tokens = n;
            }
        }
    }
    Ok(json!({
        "text": text,
        "finish_reason": finish,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": tokens,
    }))
}
