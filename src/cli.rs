//! The `kiln` command line: the server, its maintenance commands, and a client that talks
//! to a server over HTTP (`client`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

mod client;
mod predict;
mod train;

use crate::embedded_pg::EmbeddedPostgres;
use crate::server::{self, Settings};
use crate::store::Store;
use crate::worker::WorkerSettings;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Self-hosted fine-tuning server with an OpenAI-compatible API"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API server (with an embedded PostgreSQL unless DATABASE_URL is set).
    Serve(ServeArgs),
    /// Run training slots only (no API), for extra machines sharing the database.
    Worker(WorkerArgs),
    /// Fine-tune a model locally, without a server.
    Train(train::TrainArgs),
    /// Run a model locally, without a server: classify, embed, generate or classify images
    /// through the serving engine, one JSON line per input.
    Predict(predict::PredictArgs),
    /// Models: the server's (list, get, rm), or the local models directory's (list --local, pull).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Datasets on a server: upload, list, get, rm.
    Files {
        #[command(subcommand)]
        command: client::FilesCommand,
    },
    /// Fine-tuning jobs on a server: create, list, get, cancel, pause, resume, events, watch.
    Jobs {
        #[command(subcommand)]
        command: client::JobsCommand,
    },
    /// Classify texts with a served model.
    Classify(client::ClassifyArgs),
    /// Embed texts with a served encoder.
    Embed(client::EmbedArgs),
    /// Chat with a served generative model (OpenAI's /v1/chat/completions).
    Chat(client::ChatArgs),
    /// Check that a device trains what the CPU trains: one training step of a small random
    /// model of every family on the device and on the CPU, every gradient compared.
    CheckDevice(CheckDeviceArgs),
    /// Apply database migrations and exit.
    Migrate(DbArgs),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// `kiln check-device`'s default: the first GPU in a CUDA build, the CPU otherwise.
const DEFAULT_CHECK_DEVICE: &str = if crate::device::CUDA_BUILT {
    "cuda:0"
} else {
    "cpu"
};

#[derive(Debug, Args)]
struct CheckDeviceArgs {
    /// The device to check: `cuda:N`, or `cpu` (candle's ops, the path a GPU takes, against
    /// kiln's CPU kernels).
    #[arg(long, default_value = DEFAULT_CHECK_DEVICE)]
    device: crate::device::DeviceSpec,
}

/// Where the database is: `DATABASE_URL`, or the embedded cluster under the data directory.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL. When unset, kiln runs its own cluster under `$KILN_DATA_DIR/pg`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory for uploads, artifacts and the embedded database.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Address to listen on.
    #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Directory of base models in Hugging Face layout [default: $KILN_DATA_DIR/models].
    #[arg(long, env = "KILN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// An admin API key to accept (acts on the `default` project).
    #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Largest accepted upload, in bytes.
    #[arg(long, env = "KILN_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_upload_bytes: u64,
    /// Where artifacts live: `s3://bucket/prefix` for S3-compatible object storage
    /// (configured by the usual AWS_* variables), or a local directory
    /// [default: $KILN_DATA_DIR/artifacts].
    #[arg(long, env = "KILN_ARTIFACTS")]
    pub artifacts: Option<String>,
    /// Training slots (jobs this process trains at once); 0 serves the API only.
    #[arg(long, env = "KILN_WORKERS", default_value_t = 1)]
    pub workers: usize,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub inference: InferenceArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    /// Requests per second allowed per API key (0: no limit); bursts of twice that pass.
    #[arg(long, env = "KILN_RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,
    /// Event streams (`?stream=true`) open at once; more get 429.
    #[arg(long, env = "KILN_MAX_STREAMS", default_value_t = 1024)]
    pub max_streams: usize,
    /// File uploads in progress at once; more get 429.
    #[arg(long, env = "KILN_MAX_UPLOADS", default_value_t = 16)]
    pub max_uploads: usize,
    /// Largest file assembled from parts through the Uploads API (`/v1/uploads`), in bytes.
    #[arg(long, env = "KILN_MAX_LARGE_UPLOAD_BYTES", default_value_t = 8 << 30)]
    pub max_large_upload_bytes: u64,
    /// Seconds a client may take to send a request's headers, or each next piece of its
    /// body, before it is disconnected.
    #[arg(long, env = "KILN_CLIENT_TIMEOUT_SECS", default_value_t = 30.0)]
    pub client_timeout_secs: f64,
    /// The base encoder (a model id in the models directory, e.g.
    /// sentence-transformers/all-MiniLM-L6-v2) that `cosine` text-similarity graders embed
    /// with when they name no `embedding_model`.
    #[arg(long, env = "KILN_GRADER_EMBEDDING_MODEL")]
    pub grader_embedding_model: Option<String>,
}

/// How webhook deliveries are retried.
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Attempts per delivery before it is marked failed.
    #[arg(long, env = "KILN_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8)]
    pub webhook_max_attempts: u32,
    /// Seconds before the second attempt; each later wait is four times longer (capped at
    /// six hours), with jitter.
    #[arg(long, env = "KILN_WEBHOOK_RETRY_SECS", default_value_t = 30.0)]
    pub webhook_retry_secs: f64,
    /// Seconds one attempt may take.
    #[arg(long, env = "KILN_WEBHOOK_TIMEOUT_SECS", default_value_t = 10.0)]
    pub webhook_timeout_secs: f64,
}

impl WebhookArgs {
    pub fn settings(&self) -> anyhow::Result<crate::webhooks::WebhookSettings> {
        let seconds = |name: &str, v: f64| positive_secs(v, name);
        if self.webhook_max_attempts == 0 {
            anyhow::bail!("KILN_WEBHOOK_MAX_ATTEMPTS must be at least 1");
        }
        Ok(crate::webhooks::WebhookSettings {
            max_attempts: self.webhook_max_attempts,
            retry_base: seconds("KILN_WEBHOOK_RETRY_SECS", self.webhook_retry_secs)?,
            timeout: seconds("KILN_WEBHOOK_TIMEOUT_SECS", self.webhook_timeout_secs)?,
            ..Default::default()
        })
    }
}

/// What the inference engine may use (serving and training share the machine).
#[derive(Debug, Clone, Args)]
pub struct InferenceArgs {
    /// Memory for loaded models (weights as f32), e.g. `4GiB`, `512MiB` or bytes; the least
    /// recently used models are unloaded past it.
    #[arg(long, env = "KILN_SERVE_MEMORY", default_value = "4GiB", value_parser = parse_bytes)]
    pub serve_memory: u64,
    /// Models computing at once (a text model's inference lanes share one slot).
    #[arg(long, env = "KILN_SERVE_SLOTS", default_value_t = 1)]
    pub serve_slots: usize,
    /// Inference requests that may wait; past it they get 429 with `retry-after`.
    #[arg(long, env = "KILN_SERVE_MAX_WAITING", default_value_t = 512)]
    pub serve_max_waiting: usize,
    /// Seconds an inference request may take before it gets 503.
    #[arg(long, env = "KILN_SERVE_TIMEOUT_SECS", default_value_t = 30.0)]
    pub serve_timeout_secs: f64,
    /// Padded tokens in one forward pass (the dynamic batch's size).
    #[arg(long, env = "KILN_SERVE_BATCH_TOKENS", default_value_t = 16_384)]
    pub serve_batch_tokens: usize,
    /// Inputs allowed in one request.
    #[arg(long, env = "KILN_SERVE_MAX_INPUTS", default_value_t = 2048)]
    pub serve_max_inputs: usize,
    /// Transformer implementation for inference: `auto` (the faster by measurement: kiln's
    /// own on CPU), `kiln`, or `candle` (candle-transformers' BERT).
    #[arg(long, env = "KILN_SERVE_IMPL", default_value = "auto")]
    pub serve_impl: crate::serve::Implementation,
    /// Inference lanes per loaded text model, each computing on its own core; also the parts
    /// a batch on every core is cut into (0: one per core).
    #[arg(long, env = "KILN_SERVE_THREADS", default_value_t = 0)]
    pub serve_threads: usize,
    /// The device models are served on, `cpu` or `cuda:N` [default: the first of
    /// KILN_DEVICES].
    #[arg(long, env = "KILN_SERVE_DEVICE")]
    pub serve_device: Option<crate::device::DeviceSpec>,
}

impl InferenceArgs {
    /// The engine's settings; `training` are the opened training devices (the serving
    /// device defaults to the first of them, and reuses it when it is one of them).
    pub fn settings(
        &self,
        training: &[crate::worker::SlotDevice],
    ) -> anyhow::Result<crate::serve::ServeSettings> {
        let device = match self.serve_device {
            None => training
                .first()
                .map(|d| d.device.clone())
                .unwrap_or(candle_core::Device::Cpu),
            Some(spec) => match training.iter().find(|d| d.spec == spec) {
                Some(d) => d.device.clone(),
                None => spec
                    .open()
                    .map_err(|e| anyhow::anyhow!("KILN_SERVE_DEVICE={spec}: {e}"))?,
            },
        };
        if !(self.serve_timeout_secs.is_finite() && self.serve_timeout_secs > 0.0) {
            anyhow::bail!("KILN_SERVE_TIMEOUT_SECS must be a positive number of seconds");
        }
        Ok(crate::serve::ServeSettings {
            memory_bytes: self.serve_memory,
            slots: self.serve_slots.max(1),
            max_waiting: self.serve_max_waiting.max(1),
            timeout: std::time::Duration::from_secs_f64(self.serve_timeout_secs),
            max_batch_tokens: self.serve_batch_tokens.max(1),
            max_inputs: self.serve_max_inputs.max(1),
            implementation: self.serve_impl,
            device,
            threads: self.serve_threads,
        })
    }
}

/// `4GiB`, `512MiB`, `2GB`, `100k` or a plain byte count.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 4GiB, 512MiB, 1000000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024.0f64.powi(4),
        other => return Err(format!("unknown size unit '{other}' in '{text}'")),
    };
    Ok((value * scale) as u64)
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Where artifacts live: `s3://bucket/prefix` for S3-compatible object storage
    /// (configured by the usual AWS_* variables), or a local directory
    /// [default: $KILN_DATA_DIR/artifacts].
    #[arg(long, env = "KILN_ARTIFACTS")]
    pub artifacts: Option<String>,
    /// Directory of base models in Hugging Face layout [default: $KILN_DATA_DIR/models].
    #[arg(long, env = "KILN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Training slots (jobs this process trains at once).
    #[arg(long, env = "KILN_WORKERS", default_value_t = 1)]
    pub workers: usize,
    #[command(flatten)]
    pub devices: DeviceArgs,
}

/// The devices this process trains on.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Devices the training slots use: `cpu`, `cuda` (every GPU), or a list such as
    /// `cuda:0,cuda:1`. Slot i trains on device i mod their number, so KILN_WORKERS equal to
    /// the number of GPUs gives one job per GPU. A GPU needs a build with `--features cuda`.
    #[arg(long = "devices", env = "KILN_DEVICES", default_value = "cpu")]
    pub devices: crate::device::Devices,
    /// Memory the jobs training on one device may need together, e.g. `40GiB`; a job is
    /// claimed only where its `device_memory_gb` (stated or estimated) fits in what is left
    /// [default: a GPU's own memory; no limit on the CPU].
    #[arg(long, env = "KILN_DEVICE_MEMORY", value_parser = parse_bytes)]
    pub device_memory: Option<u64>,
}

impl DeviceArgs {
    /// Opens every device, or says which one cannot be used and why.
    pub fn open(&self) -> anyhow::Result<Vec<crate::worker::SlotDevice>> {
        let opened = self
            .devices
            .open()
            .map_err(|e| anyhow::anyhow!("KILN_DEVICES={}: {e}", self.devices))?;
        Ok(opened
            .into_iter()
            .map(|(spec, device)| crate::worker::SlotDevice {
                memory_bytes: self
                    .device_memory
                    .or_else(|| crate::device::total_memory(&device)),
                spec,
                device,
            })
            .collect())
    }
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List the server's models: base models, then fine-tuned models and checkpoints. With
    /// --local: the base models under the local models directory, with their architecture,
    /// size and what they can be fine-tuned for.
    List {
        /// List the local models directory instead of asking a server.
        #[arg(long)]
        local: bool,
        /// With --local: the models directory [default: $KILN_DATA_DIR/models].
        #[arg(long, env = "KILN_MODELS_DIR")]
        models_dir: Option<PathBuf>,
        /// With --local: the data directory.
        #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
        data_dir: PathBuf,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Show one of the server's models.
    Get(client::ModelsGetArgs),
    /// Delete a fine-tuned model from the server.
    Rm(client::ModelsRmArgs),
    /// Download ORG/NAME from the Hugging Face hub into the models directory.
    Pull {
        id: String,
        #[arg(long, env = "KILN_MODELS_DIR")]
        models_dir: Option<PathBuf>,
        #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a key for a project (created if missing) and print it once.
    Create {
        #[arg(long)]
        project: String,
        #[arg(long)]
        name: Option<String>,
        /// Give the key admin rights (manage keys).
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List keys (without secrets).
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a key by id.
    Revoke {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let json = std::env::var("KILN_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A database to talk to: the configured URL, or the embedded cluster (started if needed,
/// and stopped again by [`Database::close`] only if this process started it).
pub struct Database {
    pub url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// For short-lived commands: attach to the embedded cluster a running server owns, or
    /// start it for the length of the command.
    pub async fn open(db: &DbArgs) -> anyhow::Result<Database> {
        Self::open_with(db, false).await
    }

    /// For `kiln serve`: this process owns the embedded cluster and stops it on shutdown.
    pub async fn open_owned(db: &DbArgs) -> anyhow::Result<Database> {
        Self::open_with(db, true).await
    }

    async fn open_with(db: &DbArgs, own: bool) -> anyhow::Result<Database> {
        if let Some(url) = &db.database_url {
            return Ok(Database {
                url: url.clone(),
                embedded: None,
            });
        }
        let embedded = if own {
            EmbeddedPostgres::start(&db.data_dir).await
        } else {
            EmbeddedPostgres::connect_existing_or_start(&db.data_dir).await
        }
        .context("starting the embedded PostgreSQL (set DATABASE_URL to use an existing server)")?;
        Ok(Database {
            url: embedded.url().to_owned(),
            embedded: Some(embedded),
        })
    }

    pub async fn close(self) -> anyhow::Result<()> {
        if let Some(pg) = self.embedded {
            pg.stop().await?;
        }
        Ok(())
    }
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let request = match dispatch(cli.command) {
        Dispatch::Client(request) => request,
        Dispatch::Local(command) => {
            init_tracing();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(run(*command));
        }
    };
    // A client's output may go to `head`: end quietly when the pipe closes, as Unix tools do
    // (Rust ignores SIGPIPE, which makes `println!` panic instead).
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let code = runtime.block_on(client::run(request));
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// A parsed command: a request to a server (the client), or work this process does itself.
enum Dispatch {
    Client(client::Request),
    Local(Box<Command>),
}

fn dispatch(command: Command) -> Dispatch {
    Dispatch::Client(match command {
        Command::Files { command } => client::Request::Files(command),
        Command::Jobs { command } => client::Request::Jobs(command),
        Command::Classify(args) => client::Request::Classify(args),
        Command::Embed(args) => client::Request::Embed(args),
        Command::Chat(args) => client::Request::Chat(args),
        Command::Models { command } => match command {
            ModelsCommand::List {
                local: false,
                server,
                ..
            } => client::Request::ModelsList(client::ModelsListArgs { server }),
            ModelsCommand::Get(args) => client::Request::ModelsGet(args),
            ModelsCommand::Rm(args) => client::Request::ModelsRm(args),
            local => return Dispatch::Local(Box::new(Command::Models { command: local })),
        },
        other => return Dispatch::Local(Box::new(other)),
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Worker(args) => worker(args).await,
        Command::Migrate(db) => {
            let database = Database::open(&db).await?;
            let store = Store::connect(&database.url).await?;
            store.migrate().await?;
            store.close().await;
            println!("migrations applied");
            database.close().await
        }
        Command::Keys { command } => keys(command).await,
        Command::Train(args) => tokio::task::spawn_blocking(move || train::run(args)).await?,
        Command::Predict(args) => predict::run(args).await,
        Command::CheckDevice(args) => {
            tokio::task::spawn_blocking(move || check_device(args)).await?
        }
        Command::Models { command } => tokio::task::spawn_blocking(move || models(command)).await?,
        Command::Files { .. }
        | Command::Jobs { .. }
        | Command::Classify(_)
        | Command::Embed(_)
        | Command::Chat(_) => anyhow::bail!("client commands run through client::run"),
    }
}

/// `kiln check-device`: a line per check, then one JSON object with every figure; fails
/// when a check did.
fn check_device(args: CheckDeviceArgs) -> anyhow::Result<()> {
    let device = args
        .device
        .open()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let checks = crate::nn::devcheck::check_device(&device)?;
    for c in &checks {
        let verdict = if c.passed { "passed" } else { "FAILED" };
        let detail = match &c.error {
            Some(e) => e.clone(),
            None => format!(
                "{} tensors, worst {:.1e} of {:.0e} allowed ({}); loss {:.6} on the CPU, {:.6} here",
                c.compared, c.worst, c.tolerance, c.worst_of, c.loss_cpu, c.loss_device
            ),
        };
        println!("{verdict} {:<12} {:<4} {detail}", c.family, c.dtype);
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    println!(
        "{}",
        serde_json::json!({
            "device": args.device.to_string(),
            "passed": failed == 0,
            "checks": checks,
        })
    );
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} checks failed on {}: the device does not compute what the CPU does",
            checks.len(),
            args.device
        );
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Devices first: a GPU that cannot be used is a configuration error, found before
    // anything else starts.
    let devices = args.devices.open()?;
    let serve_settings = args.inference.settings(&devices)?;
    let data_dir = absolute(&args.db.data_dir)?;
    tokio::fs::create_dir_all(&data_dir)
        .await
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let database = Database::open_owned(&DbArgs {
        data_dir: data_dir.clone(),
        ..args.db.clone()
    })
    .await?;
    let settings = Settings {
        addr: args.addr,
        database_url: database.url.clone(),
        models_dir: args
            .models_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("models")),
        data_dir,
        admin_key: args.admin_key.clone(),
        max_upload_bytes: args.max_upload_bytes,
        artifacts: args.artifacts.clone(),
        jobs: WorkerSettings {
            slots: args.workers,
            devices: devices.clone(),
            ..WorkerSettings::default()
        },
        serve: serve_settings,
        webhooks: args.webhooks.settings()?,
        api: server::ApiSettings {
            rate_limit: rate_limit(args.rate_limit)?,
            max_streams: args.max_streams,
            max_uploads: args.max_uploads,
            max_large_upload_bytes: args.max_large_upload_bytes,
            client_timeout: positive_secs(args.client_timeout_secs, "KILN_CLIENT_TIMEOUT_SECS")?,
            grader_embedding_model: args.grader_embedding_model.clone(),
        },
    };
    let running = match server::start(settings).await {
        Ok(running) => running,
        Err(e) => {
            let _ = database.close().await;
            return Err(e);
        }
    };
    if let Some(key) = &running.bootstrap_key {
        println!(
            "Created an admin API key. It is shown only this once; keep it safe:\n\n    {key}\n"
        );
    }
    let shutdown = server::shutdown_signal();
    println!("kiln listening on http://{}", running.addr);
    shutdown.await;
    tracing::info!("shutting down");
    let result = running.shutdown().await;
    database.close().await?;
    result
}

/// `KILN_RATE_LIMIT`: 0 is off; a rate r allows bursts of 2r.
/// A setting in seconds: positive and finite (under about 11 days).
fn positive_secs(v: f64, name: &str) -> anyhow::Result<std::time::Duration> {
    if v.is_finite() && v > 0.0 && v < 1e6 {
        Ok(std::time::Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("{name} must be a positive number of seconds, got {v}")
    }
}

fn rate_limit(r: f64) -> anyhow::Result<Option<(f64, u32)>> {
    if r == 0.0 {
        Ok(None)
    } else if r.is_finite() && r > 0.0 {
        Ok(Some((r, (2.0 * r).ceil().min(1e6) as u32)))
    } else {
        anyhow::bail!("KILN_RATE_LIMIT must be 0 (off) or a positive rate, got {r}")
    }
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let devices = args.devices.open()?;
    let data_dir = absolute(&args.db.data_dir)?;
    tokio::fs::create_dir_all(&data_dir)
        .await
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // Another machine's worker names DATABASE_URL; on the server's machine it attaches to
    // the embedded cluster `kiln serve` runs.
    let database = Database::open(&DbArgs {
        data_dir: data_dir.clone(),
        ..args.db.clone()
    })
    .await?;
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("models"));
    let jobs = WorkerSettings {
        slots: args.workers.max(1),
        devices: devices.clone(),
        ..WorkerSettings::default()
    };
    let running = match server::start_workers_with(
        &database.url,
        &data_dir,
        models_dir,
        args.artifacts.as_deref(),
        jobs,
    )
    .await
    {
        Ok(running) => running,
        Err(e) => {
            let _ = database.close().await;
            return Err(e);
        }
    };
    let shutdown = server::shutdown_signal();
    println!(
        "kiln worker {} running {} slot(s) on {}",
        running.worker_id(),
        args.workers.max(1),
        args.devices.devices
    );
    shutdown.await;
    tracing::info!("shutting down: checkpointing and requeueing running jobs");
    running.shutdown().await;
    database.close().await
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            project,
            name,
            admin,
            db,
        } => {
            let database = Database::open(&db).await?;
            let store = Store::connect(&database.url).await?;
            store.migrate().await?;
            let key = store
                .create_api_key(&project, name.as_deref(), admin)
                .await?;
            store.close().await;
            database.close().await?;
            println!("{}", key.secret);
            eprintln!(
                "key {} for project '{}' (shown only this once)",
                key.row.id, key.row.project_name
            );
        }
        KeysCommand::List { db } => {
            let database = Database::open(&db).await?;
            let store = Store::connect(&database.url).await?;
            for k in store.list_api_keys().await? {
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                let role = if k.is_admin { "admin" } else { "member" };
                println!(
                    "{}\t{}\tsk-kiln-{}_…\t{role}\t{state}\t{}",
                    k.id,
                    k.project_name,
                    k.prefix,
                    k.name.unwrap_or_default()
                );
            }
            store.close().await;
            database.close().await?;
        }
        KeysCommand::Revoke { id, db } => {
            let database = Database::open(&db).await?;
            let store = Store::connect(&database.url).await?;
            let found = store.revoke_api_key(&id).await?;
            store.close().await;
            database.close().await?;
            match found {
                Some(_) => println!("revoked {id}"),
                None => anyhow::bail!("no key with id {id}"),
            }
        }
    }
    Ok(())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()?.join(path)
    })
}

fn models(command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::List {
            models_dir,
            data_dir,
            server,
            ..
        } => {
            let json = server.json;
            let dir = models_dir.unwrap_or_else(|| data_dir.join("models"));
            let found = crate::models::scan(&dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else if found.is_empty() {
                eprintln!("no base models under {}", dir.display());
            } else {
                for m in found {
                    println!(
                        "{}\t{}\t{:.1}M parameters\t{}",
                        m.id,
                        m.architecture,
                        m.parameters as f64 / 1e6,
                        m.capabilities.join(",")
                    );
                }
            }
        }
        ModelsCommand::Pull {
            id,
            models_dir,
            data_dir,
        } => {
            let dir = models_dir.unwrap_or_else(|| data_dir.join("models"));
            let path = crate::models::pull(&dir, &id)?;
            println!("{}", path.display());
        }
        ModelsCommand::Get(_) | ModelsCommand::Rm(_) => {
            anyhow::bail!("`kiln models get|rm` talk to a server: they run through client::run")
        }
    }
    Ok(())
}
