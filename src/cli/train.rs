//! `kiln train`: the training engine without a server, for people at a terminal and for
//! tests. Shows progress on stderr; the last line of stdout is one JSON object with the
//! final metrics and the measured training throughput.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use serde_json::{Map, Value, json};

use crate::train::{
    self, HyperparameterRequest, StopRequest, StopSignal, TrainEvent, TrainOutcome, TrainingJob,
};

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Base model: an id under the models directory, or a directory path.
    #[arg(long)]
    pub model: String,
    /// Training data (JSONL).
    #[arg(long)]
    pub training_file: PathBuf,
    /// Validation data; without it a stratified tenth of the training data is held out.
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    /// Where the finished model is written (Hugging Face layout).
    #[arg(long)]
    pub output: PathBuf,
    /// Hyperparameters as in a job's `method.*.hyperparameters`, e.g. `--set n_epochs=3
    /// --set strategy=lora`. Values are JSON where they parse as JSON, strings otherwise.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue from a checkpoint directory (printed when a run is interrupted).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Checkpoints [default: OUTPUT.work].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Directory of base models [default: $KILN_DATA_DIR/models].
    #[arg(long, env = "KILN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
    pub data_dir: PathBuf,
    /// Print progress as JSON lines on stderr instead of a progress bar.
    #[arg(long)]
    pub json_progress: bool,
    /// The device to train on: `cpu` or `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
}

/// Parses `--set KEY=VALUE` pairs into the hyperparameters object.
pub fn hyperparameters_from_pairs(pairs: &[String]) -> anyhow::Result<HyperparameterRequest> {
    let mut map = Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--set expects KEY=VALUE, got '{pair}'");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        map.insert(key.trim().to_owned(), value);
    }
    serde_path_to_error::deserialize(Value::Object(map))
        .map_err(|e| anyhow::anyhow!("invalid --set {e}"))
}

fn resolve_model(args: &TrainArgs) -> anyhow::Result<PathBuf> {
    let as_path = PathBuf::from(&args.model);
    if as_path.join("config.json").is_file() {
        return Ok(as_path);
    }
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("models"));
    Ok(crate::models::resolve(&models_dir, &args.model)?.dir)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let device = args
        .device
        .open()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let base_model = resolve_model(&args)?;
    let hyperparameters = hyperparameters_from_pairs(&args.set)?;
    hyperparameters
        .check()
        .map_err(|e| anyhow::anyhow!("hyperparameter {e}"))?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.output.with_extension("work"));
    let job = TrainingJob {
        base_model,
        training_file: args.training_file.clone(),
        validation_file: args.validation_file.clone(),
        hyperparameters,
        seed: args.seed,
        work_dir,
        model_dir: args.output.clone(),
        grader: None,
        models_dir: None,
        resume_from: args.resume.clone(),
        device,
    };
    let stop = StopSignal::default();
    {
        let stop = stop.clone();
        // First Ctrl-C: checkpoint and stop; the run can be resumed with --resume.
        ctrlc_handler(move || stop.request(StopRequest::CheckpointAndStop));
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if args.json_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let json_progress = args.json_progress;
    // indicatif draws nothing when stderr is not a terminal: then print plain lines.
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut on_event = |event: &TrainEvent| {
        if json_progress {
            if let Ok(line) = serde_json::to_string(event) {
                eprintln!("{line}");
            }
            return;
        }
        match event {
            TrainEvent::Started {
                task,
                total_steps,
                train_examples,
                valid_examples,
                notes,
                ..
            } => {
                bar.set_length(*total_steps);
                say(format!(
                    "{task}: {train_examples} training and {valid_examples} validation examples, {total_steps} steps"
                ));
                for note in notes {
                    say(format!("  chose {note}"));
                }
            }
            TrainEvent::Message { text } => say(text.clone()),
            TrainEvent::Step(p) => {
                bar.set_position(p.step);
                bar.set_message(format!(
                    "epoch {:.2}  loss {:.4}  {:.1} ex/s  eta {:.0}s",
                    p.epoch, p.train_loss, p.examples_per_second, p.eta_seconds
                ));
            }
            TrainEvent::Evaluated(e) => {
                let figures: Vec<String> = e
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect();
                say(format!("step {}: {}", e.step, figures.join("  ")));
            }
            TrainEvent::Checkpoint(c) => say(format!(
                "checkpoint at step {}: {}",
                c.step,
                c.dir.display()
            )),
        }
    };
    let outcome = train::run(&job, &mut on_event, &stop);
    bar.finish_and_clear();
    let outcome = match outcome {
        Err(e) if e.is_out_of_memory() => bail!(
            "{} ran out of memory training at {}: lower `--set batch_size` and raise \
             `--set gradient_accumulation_steps` to keep the same effective batch, or lower \
             `--set max_length`. ({e})",
            args.device,
            match job.hyperparameters.batch_size {
                Some(crate::train::spec::AutoOr::Value(b)) => format!("batch size {b}"),
                _ => "the automatically chosen batch size".to_owned(),
            }
        ),
        other => other?,
    };
    match outcome {
        TrainOutcome::Finished(summary) => {
            let line = json!({
                "status": "succeeded",
                "task": summary.task,
                "model_dir": summary.model_dir,
                "steps": summary.steps,
                "selected_step": summary.selected_step,
                "metrics": summary.metrics,
                "baseline_metrics": summary.baseline_metrics,
                "trained_tokens": summary.trained_tokens,
                "train_examples_per_second": summary.train_examples_per_second,
                "hyperparameters": summary.hyperparameters,
                "labels": summary.labels,
            });
            println!("{line}");
        }
        TrainOutcome::Stopped { step, checkpoint } => {
            let line = json!({"status": "stopped", "step": step, "checkpoint": checkpoint});
            println!("{line}");
        }
    }
    Ok(())
}

/// Runs `f` on SIGINT/SIGTERM without pulling in an async runtime.
fn ctrlc_handler(f: impl Fn() + Send + 'static) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(runtime) = runtime {
        std::thread::spawn(move || {
            runtime.block_on(async {
                crate::server::shutdown_signal().await;
                f();
            })
        });
    }
}
