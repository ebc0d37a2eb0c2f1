//! `kiln jobs create|list|get|cancel|pause|resume|events|watch`.

use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use super::table::{self, Table};
use super::{Server, ServerArgs, check_id, watch};

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Create a fine-tuning job.
    Create(Box<CreateArgs>),
    /// List jobs, newest first.
    List {
        /// At most this many jobs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only jobs with this status: validating_files, queued, running, succeeded,
        /// failed, cancelled, or paused.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show one job: status, progress, hyperparameters used, metrics, error.
    Get(JobArgs),
    /// Cancel a job (a running one stops within seconds).
    Cancel(JobArgs),
    /// Pause a job (a running one checkpoints and releases its slot).
    Pause(JobArgs),
    /// Resume a paused job from its latest checkpoint.
    Resume(JobArgs),
    /// Print a job's events, oldest first.
    Events {
        id: String,
        /// The latest this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Follow a job to its end with a progress bar (loss, throughput, ETA); exit 0 when it
    /// succeeds, 1 when it fails or is cancelled.
    Watch(JobArgs),
}

#[derive(Debug, Args)]
pub struct JobArgs {
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Base model id (e.g. sentence-transformers/all-MiniLM-L6-v2) or a fine-tuned `ft:` id.
    #[arg(long)]
    pub model: String,
    /// Id of an uploaded, processed `fine-tune` file.
    #[arg(long)]
    pub training_file: String,
    #[arg(long)]
    pub validation_file: Option<String>,
    /// Part of the fine-tuned model's name.
    #[arg(long)]
    pub suffix: Option<String>,
    /// supervised, dpo or reinforcement [default: the one the training file's format needs].
    #[arg(long)]
    pub method: Option<String>,
    /// Hyperparameters as a JSON object, e.g. '{"n_epochs": 3, "strategy": "lora"}'.
    #[arg(long, value_name = "JSON")]
    pub hyperparameters: Option<String>,
    /// One hyperparameter, repeatable: `-H n_epochs=3 -H strategy=lora` (values are JSON
    /// where they parse as JSON, strings otherwise; they override --hyperparameters).
    #[arg(short = 'H', long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long)]
    pub seed: Option<i64>,
    /// Queue priority, 1 (most urgent) to 10.
    #[arg(long)]
    pub priority: Option<i64>,
    /// Device memory the job needs, in GB (workers claim it only where it fits); without it
    /// the server estimates it.
    #[arg(long, value_name = "GB")]
    pub device_memory_gb: Option<f64>,
    /// Metadata, repeatable: `--metadata team=search`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Follow the job after creating it, as `kiln jobs watch` does.
    #[arg(long, conflicts_with = "dry_run")]
    pub watch: bool,
    /// Queue nothing: print the job as it would run (examples, tokens, steps, the resolved
    /// hyperparameters) and its duration, estimated from a few real steps on the server.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Statuses `--status` accepts (`paused` is kiln's: the wire says `queued` + `paused`).
const STATUSES: [&str; 7] = [
    "validating_files",
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "paused",
];

pub async fn run(command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::Create(args) => create(*args).await,
        JobsCommand::List {
            limit,
            status,
            server,
        } => list(&Server::connect(&server)?, limit, status).await,
        JobsCommand::Get(args) => {
            let server = Server::connect(&args.server)?;
            let job = server.get(&job_path(&args.id)?, &[]).await?;
            if server.json {
                return server.print_json(&job);
            }
            print_job(&job);
            Ok(())
        }
        JobsCommand::Cancel(args) => action(args, "cancel").await,
        JobsCommand::Pause(args) => action(args, "pause").await,
        JobsCommand::Resume(args) => action(args, "resume").await,
        JobsCommand::Events { id, limit, server } => {
            events(&Server::connect(&server)?, &id, limit).await
        }
        JobsCommand::Watch(args) => {
            let server = Server::connect(&args.server)?;
            watch::watch(&server, check_id("job", &args.id)?).await
        }
    }
}

fn job_path(id: &str) -> anyhow::Result<[&str; 4]> {
    Ok(["v1", "fine_tuning", "jobs", check_id("job", id)?])
}

/// `KEY=VALUE` pairs into an object; values are JSON where they parse, strings otherwise.
fn pairs(flag: &str, pairs: &[String], json_values: bool) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            anyhow::bail!("{flag} expects KEY=VALUE, got '{pair}'");
        };
        let key = key.trim();
        if key.is_empty() {
            anyhow::bail!("{flag} expects KEY=VALUE, got '{pair}'");
        }
        let value = if json_values {
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()))
        } else {
            Value::String(value.to_owned())
        };
        map.insert(key.to_owned(), value);
    }
    Ok(map)
}

/// The create request's body from the command line.
fn create_body(args: &CreateArgs) -> anyhow::Result<Value> {
    let mut hyperparameters = match &args.hyperparameters {
        None => Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            Ok(other) => anyhow::bail!("--hyperparameters must be a JSON object, got {other}"),
            Err(e) => anyhow::bail!("--hyperparameters is not valid JSON: {e}"),
        },
    };
    hyperparameters.extend(pairs("-H/--set", &args.set, true)?);
    let mut body = Map::new();
    body.insert("model".into(), json!(args.model));
    body.insert("training_file".into(), json!(args.training_file));
    if let Some(v) = &args.validation_file {
        body.insert("validation_file".into(), json!(v));
    }
    if let Some(s) = &args.suffix {
        body.insert("suffix".into(), json!(s));
    }
    if let Some(s) = args.seed {
        body.insert("seed".into(), json!(s));
    }
    if let Some(p) = args.priority {
        body.insert("priority".into(), json!(p));
    }
    if let Some(gb) = args.device_memory_gb {
        body.insert("device_memory_gb".into(), json!(gb));
    }
    if args.dry_run {
        body.insert("dry_run".into(), json!(true));
    }
    if !args.metadata.is_empty() {
        body.insert(
            "metadata".into(),
            Value::Object(pairs("--metadata", &args.metadata, false)?),
        );
    }
    // Without a method or hyperparameters the server picks the method the data needs.
    if args.method.is_some() || !hyperparameters.is_empty() {
        let kind = args.method.as_deref().unwrap_or("supervised");
        let mut method = Map::new();
        method.insert("type".into(), json!(kind));
        if !hyperparameters.is_empty() {
            method.insert(
                kind.to_owned(),
                json!({"hyperparameters": Value::Object(hyperparameters)}),
            );
        }
        body.insert("method".into(), Value::Object(method));
    }
    Ok(Value::Object(body))
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let body = create_body(&args)?;
    let job = server.post(&["v1", "fine_tuning", "jobs"], &body).await?;
    if args.dry_run {
        if server.json {
            return server.print_json(&job);
        }
        print_estimate(&job);
        return Ok(());
    }
    let id = table::text(&job["id"]);
    if server.json && !args.watch {
        return server.print_json(&job);
    }
    if !server.json {
        println!("created {id} ({})", status(&job));
    }
    if args.watch {
        watch::watch(&server, &id).await?;
    }
    Ok(())
}

/// A dry run's plan for a person: what would train, with which settings, for how long.
fn print_estimate(job: &Value) {
    let e = &job["estimate"];
    let kind = table::text(&job["method"]["type"]);
    println!("dry run: nothing was queued");
    println!(
        "  {}: {} training and {} validation examples{}",
        table::text(&e["task"]),
        e["train_examples"],
        e["valid_examples"],
        match e["labels"].as_array() {
            Some(l) if !l.is_empty() => format!(
                ", labels: {}",
                l.iter().map(table::text).collect::<Vec<_>>().join(", ")
            ),
            _ => String::new(),
        }
    );
    println!(
        "  {} steps, {} tokens ({} per epoch)",
        e["total_steps"], e["trained_tokens"], e["train_tokens_per_epoch"]
    );
    if let Some(hp) = job["method"][&kind]["hyperparameters"].as_object() {
        let shown: Vec<String> = hp
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}", table::text(v)))
            .collect();
        println!("  hyperparameters: {}", shown.join(" "));
    }
    if let Some(notes) = e["notes"].as_array() {
        for note in notes {
            println!("  chose {}", table::text(note));
        }
    }
    let secs = e["estimated_seconds"].as_f64().unwrap_or(0.0);
    println!(
        "  estimated duration: {} ({:.3} s per step measured over {} steps, {:.1} s setup, {:.1} s evaluating)",
        human_duration(secs),
        e["seconds_per_step"].as_f64().unwrap_or(0.0),
        e["measured_steps"],
        e["setup_seconds"].as_f64().unwrap_or(0.0),
        e["evaluation_seconds"].as_f64().unwrap_or(0.0),
    );
}

fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{secs:.1} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The status a person wants to see: kiln's `paused` and a pending cancel included.
pub fn status(job: &Value) -> String {
    if job["paused"] == json!(true) {
        "paused".to_owned()
    } else if job["cancel_requested"] == json!(true) {
        "cancelling".to_owned()
    } else {
        table::text(&job["status"])
    }
}

/// Whether a job is in a `--status`: a paused job is `paused` (not `queued`), and a running
/// job waiting for its cancel is still `running`.
fn has_status(job: &Value, wanted: &str) -> bool {
    let paused = job["paused"] == json!(true);
    match wanted {
        "paused" => paused,
        _ => !paused && job["status"] == wanted,
    }
}

async fn list(server: &Server, limit: usize, wanted: Option<String>) -> anyhow::Result<()> {
    if limit == 0 {
        anyhow::bail!("--limit must be at least 1");
    }
    if let Some(s) = &wanted
        && !STATUSES.contains(&s.as_str())
    {
        anyhow::bail!(
            "--status '{s}' is not a job status; expected one of: {}",
            STATUSES.join(", ")
        );
    }
    // The server filters by metadata only: pages are read until `limit` jobs match.
    let mut jobs: Vec<Value> = Vec::new();
    let mut after: Option<String> = None;
    let has_more = loop {
        let page_size = if wanted.is_some() {
            100
        } else {
            (limit - jobs.len()).min(100)
        };
        let mut query = vec![("limit", page_size.to_string())];
        if let Some(a) = &after {
            query.push(("after", a.clone()));
        }
        let page = server.get(&["v1", "fine_tuning", "jobs"], &query).await?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        after = data
            .last()
            .and_then(|j| j["id"].as_str())
            .map(str::to_owned);
        let more = page["has_more"] == json!(true) && after.is_some();
        for job in data {
            if jobs.len() == limit {
                break;
            }
            if wanted.as_deref().is_none_or(|w| has_status(&job, w)) {
                jobs.push(job);
            }
        }
        if jobs.len() == limit || !more {
            break more;
        }
    };
    if server.json {
        return server.print_json(&json!({"object": "list", "data": jobs, "has_more": has_more}));
    }
    if jobs.is_empty() {
        eprintln!("no jobs");
        return Ok(());
    }
    let mut t = Table::new(&[
        "ID",
        "STATUS",
        "MODEL",
        "CREATED",
        "PROGRESS",
        "FINE-TUNED MODEL",
    ]);
    for job in &jobs {
        t.row(vec![
            table::text(&job["id"]),
            status(job),
            table::text(&job["model"]),
            table::time(&job["created_at"]),
            progress(job),
            table::text(&job["fine_tuned_model"]),
        ]);
    }
    t.print();
    if has_more {
        eprintln!("(more jobs: raise --limit)");
    }
    Ok(())
}

/// `120/400 steps`, or `-` before training starts.
fn progress(job: &Value) -> String {
    let p = &job["progress"];
    match (p["step"].as_u64(), p["total_steps"].as_u64()) {
        (Some(step), Some(total)) => format!("{step}/{total}"),
        _ => "-".to_owned(),
    }
}

fn print_job(job: &Value) {
    let kind = job["method"]["type"].as_str().unwrap_or("supervised");
    let hp = &job["method"][kind]["hyperparameters"];
    let hp = hp
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{k}={}", table::text(v)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let metrics = job["metrics"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| match v.as_f64() {
                    Some(x) => format!("{k}={x:.4}"),
                    None => format!("{k}={}", table::text(v)),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let p = &job["progress"];
    let mut progress_line = String::new();
    if let (Some(step), Some(total)) = (p["step"].as_u64(), p["total_steps"].as_u64()) {
        progress_line = format!("step {step}/{total}");
        if let Some(epoch) = p["epoch"].as_f64() {
            progress_line.push_str(&format!(", epoch {epoch:.2}"));
        }
        if let Some(speed) = p["examples_per_second"].as_f64() {
            progress_line.push_str(&format!(", {speed:.1} examples/s"));
        }
        if job["status"] == "running"
            && let Some(eta) = p["eta_seconds"].as_f64()
        {
            progress_line.push_str(&format!(", ETA {}", table::duration(eta)));
        }
    }
    let error = match &job["error"] {
        Value::Object(e) => table::optional(&e["message"]),
        _ => String::new(),
    };
    table::print_fields(&[
        ("id", table::text(&job["id"])),
        ("status", status(job)),
        ("model", table::text(&job["model"])),
        (
            "fine-tuned model",
            table::optional(&job["fine_tuned_model"]),
        ),
        ("method", kind.to_owned()),
        ("training file", table::text(&job["training_file"])),
        ("validation file", table::optional(&job["validation_file"])),
        ("suffix", table::optional(&job["user_provided_suffix"])),
        ("seed", table::optional(&job["seed"])),
        ("created", table::time(&job["created_at"])),
        (
            "finished",
            if job["finished_at"].is_null() {
                String::new()
            } else {
                table::time(&job["finished_at"])
            },
        ),
        ("progress", progress_line),
        ("trained tokens", table::optional(&job["trained_tokens"])),
        ("hyperparameters", hp),
        ("metrics", metrics),
        ("error", error),
    ]);
}

async fn action(args: JobArgs, verb: &str) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let [v1, ft, jobs, id] = job_path(&args.id)?;
    let job = server.post_empty(&[v1, ft, jobs, id, verb]).await?;
    if server.json {
        return server.print_json(&job);
    }
    println!("{} {}", table::text(&job["id"]), status(&job));
    Ok(())
}

async fn events(server: &Server, id: &str, limit: usize) -> anyhow::Result<()> {
    if limit == 0 {
        anyhow::bail!("--limit must be at least 1");
    }
    let [v1, ft, jobs, id] = job_path(id)?;
    let page = server
        .get(
            &[v1, ft, jobs, id, "events"],
            &[("limit", limit.min(1000).to_string())],
        )
        .await?;
    if server.json {
        return server.print_json(&page);
    }
    let mut data = page["data"].as_array().cloned().unwrap_or_default();
    data.reverse(); // the server sends newest first
    for e in &data {
        println!("{}", watch::event_line(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        create: CreateArgs,
    }

    fn body(args: &[&str]) -> anyhow::Result<Value> {
        let cli = Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))?;
        create_body(&cli.create)
    }

    #[test]
    fn create_sends_only_what_was_asked() {
        let b = body(&["--model", "m", "--training-file", "file-1"]).unwrap();
        assert_eq!(b, json!({"model": "m", "training_file": "file-1"}));
    }

    #[test]
    fn hyperparameters_merge_json_and_pairs_under_the_method() {
        let b = body(&[
            "--model",
            "m",
            "--training-file",
            "f",
            "--hyperparameters",
            r#"{"n_epochs": 2, "strategy": "full"}"#,
            "-H",
            "strategy=lora",
            "-H",
            "learning_rate=0.001",
            "--metadata",
            "team=42",
        ])
        .unwrap();
        assert_eq!(
            b["method"],
            json!({"type": "supervised", "supervised": {"hyperparameters":
                {"n_epochs": 2, "strategy": "lora", "learning_rate": 0.001}}})
        );
        assert_eq!(b["metadata"], json!({"team": "42"}));
    }

    #[test]
    fn bad_hyperparameters_are_refused_before_sending() {
        let args = ["--model", "m", "--training-file", "f"];
        let with = |extra: &[&str]| body(&[&args[..], extra].concat());
        assert!(with(&["--hyperparameters", "[1]"]).is_err());
        assert!(with(&["--hyperparameters", "{"]).is_err());
        assert!(with(&["-H", "n_epochs"]).is_err());
        assert!(with(&["-H", "=3"]).is_err());
    }
}
