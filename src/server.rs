//! `kiln serve`: wires the store, artifact store and API together and runs them until a
//! shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AdminKey, AppState, FileValidator, Limits};
use crate::artifacts::Artifacts;
use crate::queue::Queue;
use crate::serve::{ServeSettings, Serving};
use crate::store::Store;
use crate::store::keys::{DEFAULT_PROJECT, sha256};
use crate::webhooks::WebhookSettings;
use crate::worker::{WorkerPool, WorkerSettings};

/// Everything `kiln serve` needs, already resolved (the database URL is known by now).
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    pub database_url: String,
    pub data_dir: PathBuf,
    pub models_dir: PathBuf,
    pub admin_key: Option<String>,
    pub max_upload_bytes: u64,
    /// Where artifacts live: `s3://bucket/prefix` for S3-compatible object storage, a local
    /// directory, or none for `$data_dir/artifacts` (`KILN_ARTIFACTS`).
    pub artifacts: Option<String>,
    /// Training slots, engine and queue policy (`KILN_WORKERS`).
    pub jobs: WorkerSettings,
    /// The inference engine's share of the machine (`KILN_SERVE_*`).
    pub serve: ServeSettings,
    /// Webhook delivery retries and timeouts (`KILN_WEBHOOK_*`).
    pub webhooks: WebhookSettings,
    /// Request rate and stream limits (`KILN_RATE_LIMIT`, `KILN_MAX_STREAMS`).
    pub api: ApiSettings,
}

/// Limits on what clients may ask of the API.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Requests per second per key, with a burst; none: unlimited.
    pub rate_limit: Option<(f64, u32)>,
    /// Event streams open at once; more get 429.
    pub max_streams: usize,
    /// File uploads in progress at once (parts of uploads, and their completions, count);
    /// more get 429.
    pub max_uploads: usize,
    /// Largest file the Uploads API (`/v1/uploads`) assembles from parts.
    pub max_large_upload_bytes: u64,
    /// Time a client may take to send a request's headers, and to send each next piece of
    /// a request body; slower clients (slowloris) are disconnected.
    pub client_timeout: Duration,
    /// The base encoder `cosine` graders embed with when they name none
    /// (`KILN_GRADER_EMBEDDING_MODEL`); none: such graders are refused.
    pub grader_embedding_model: Option<String>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            rate_limit: None,
            max_streams: 1024,
            max_uploads: 16,
            max_large_upload_bytes: 8 << 30,
            client_timeout: Duration::from_secs(30),
            grader_embedding_model: None,
        }
    }
}

/// A server that is listening. Dropping it does not stop it: call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The admin key created at first start (no `KILN_ADMIN_KEY`, no keys yet), shown once.
    pub bootstrap_key: Option<String>,
    pub store: Store,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    workers: WorkerPool,
    deliverer: JoinHandle<()>,
}

/// The process-wide Prometheus recorder (the `metrics` facade allows one per process).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding program);
            // then our handle simply renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Connects, migrates, bootstraps keys and starts listening.
pub async fn start(settings: Settings) -> anyhow::Result<RunningServer> {
    let store = Store::connect(&settings.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("running migrations")?;

    let admin = match &settings.admin_key {
        Some(key) => {
            let project_id = store.ensure_project(DEFAULT_PROJECT).await?;
            Some(Arc::new(AdminKey {
                sha256: sha256(key.as_bytes()),
                project_id,
            }))
        }
        None => None,
    };
    let bootstrap_key = match admin {
        Some(_) => None,
        None => store.bootstrap_admin_key().await?.map(|k| k.secret),
    };

    let artifacts = Artifacts::open_setting(settings.artifacts.as_deref(), &settings.data_dir)
        .await
        .with_context(|| {
            format!(
                "opening the artifact store under {}",
                settings.data_dir.display()
            )
        })?;
    if let Err(e) = artifacts.sweep_tmp(Duration::from_secs(3600)).await {
        tracing::warn!(error = %e, "could not sweep temporary uploads");
    }
    let validator = FileValidator::new(store.clone(), artifacts.clone(), 2);
    match validator.resume_pending().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "resuming validation of files"),
        Err(e) => tracing::warn!(error = %e, "could not resume pending validations"),
    }

    let metrics = prometheus();
    let queue = Queue::new(&store, settings.jobs.queue.clone());
    let workers = WorkerPool::start(
        store.clone(),
        artifacts.clone(),
        settings.models_dir.clone(),
        settings.jobs.clone(),
    );
    let state = AppState {
        store: store.clone(),
        artifacts: artifacts.clone(),
        validator,
        limits: Arc::new(Limits {
            max_upload_bytes: settings.max_upload_bytes,
            max_json_bytes: 2 * 1024 * 1024,
            rate: settings
                .api
                .rate_limit
                .map(|(per_second, burst)| api::limits::RateLimiter::new(per_second, burst)),
            streams: Arc::new(tokio::sync::Semaphore::new(settings.api.max_streams.max(1))),
            uploads: Arc::new(tokio::sync::Semaphore::new(settings.api.max_uploads.max(1))),
            max_large_upload_bytes: settings.api.max_large_upload_bytes,
        }),
        admin,
        metrics: metrics.clone(),
        queue,
        models_dir: Arc::new(settings.models_dir.clone()),
        serving: Serving::new(settings.serve.clone(), artifacts.clone()),
        webhooks: Arc::new(settings.webhooks.clone()),
        grader_embedding_model: settings.api.grader_embedding_model.clone().map(Arc::from),
        estimate_device: settings
            .jobs
            .devices
            .first()
            .cloned()
            .unwrap_or_else(crate::worker::SlotDevice::cpu),
    };
    // A body that stops arriving for `client_timeout` fails its request (the handlers see a
    // read error); the body is then handed on as the plain type the routes expect.
    let app = api::router(state).layer(
        tower::ServiceBuilder::new()
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                settings.api.client_timeout,
            ))
            .map_request(
                |req: axum::http::Request<tower_http::timeout::TimeoutBody<axum::body::Body>>| {
                    req.map(axum::body::Body::new)
                },
            ),
    );

    let listener = TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("binding {}", settings.addr))?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let deliverer =
        crate::webhooks::spawn(store.clone(), settings.webhooks.clone(), stop.subscribe());
    // Parts of uploads that can no longer complete, once a minute (the first sweep at start
    // takes what a stopped process left).
    let (sweep_store, sweep_artifacts, mut sweep_stop) =
        (store.clone(), artifacts.clone(), stop.subscribe());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sweep_stop.wait_for(|s| *s) => break,
            }
            let removed = api::uploads::sweep(&sweep_store, &sweep_artifacts).await;
            if removed > 0 {
                tracing::info!(parts = removed, "removed ended uploads' parts");
            }
        }
    });
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        for n in 1u64.. {
            tick.tick().await;
            upkeep.run_upkeep();
            if n % 12 == 0 {
                let _ = tokio::task::spawn_blocking(release_free_memory).await;
            }
        }
    });
    let client_timeout = settings.api.client_timeout;
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        serve_http(listener, app, client_timeout, stop).await
    });
    tracing::info!(%addr, "kiln is listening");
    Ok(RunningServer {
        addr,
        bootstrap_key,
        store,
        stop,
        task,
        workers,
        deliverer,
    })
}

/// Hands memory that the allocator holds but nothing uses back to the system, once a minute.
/// `main` tunes glibc to keep freed memory (training reuses its buffers at once, and fresh
/// pages cost faults); without this a server's RSS would stay at its largest passing peak,
/// such as one large list answer, for ever (the soak run saw +110 MiB that never went).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Serves `app` until `stop`, then lets open connections finish: `axum::serve`, plus a
/// deadline on reading each request's headers, so that clients that trickle them
/// (slowloris) cannot hold connections open.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

impl RunningServer {
    /// Stops claiming jobs and accepting connections; running jobs checkpoint and are
    /// requeued, in-flight requests finish; then closes the pool.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let (served, (), delivered) =
            tokio::join!(self.task, self.workers.shutdown(), self.deliverer);
        served??;
        delivered?;
        self.store.close().await;
        Ok(())
    }
}

/// `kiln worker`: training slots without the API.
pub struct RunningWorkers {
    pub store: Store,
    workers: WorkerPool,
}

/// Connects, migrates and starts the worker pool (no HTTP listener), with artifacts in
/// `$data_dir/artifacts`.
pub async fn start_workers(
    database_url: &str,
    data_dir: &std::path::Path,
    models_dir: PathBuf,
    jobs: WorkerSettings,
) -> anyhow::Result<RunningWorkers> {
    start_workers_with(database_url, data_dir, models_dir, None, jobs).await
}

/// Connects, migrates and starts the worker pool (no HTTP listener); `artifacts` names the
/// artifact store as [`Settings::artifacts`] does.
pub async fn start_workers_with(
    database_url: &str,
    data_dir: &std::path::Path,
    models_dir: PathBuf,
    artifacts: Option<&str>,
    jobs: WorkerSettings,
) -> anyhow::Result<RunningWorkers> {
    let store = Store::connect(database_url)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("running migrations")?;
    let artifacts = Artifacts::open_setting(artifacts, data_dir)
        .await
        .with_context(|| format!("opening the artifact store under {}", data_dir.display()))?;
    let workers = WorkerPool::start(store.clone(), artifacts, models_dir, jobs);
    Ok(RunningWorkers { store, workers })
}

impl RunningWorkers {
    /// This process's worker id.
    pub fn worker_id(&self) -> &str {
        self.workers.worker_id()
    }

    /// Stops claiming; running jobs checkpoint and are requeued; closes the pool.
    pub async fn shutdown(self) {
        self.workers.shutdown().await;
        self.store.close().await;
    }
}

/// A future that resolves on SIGTERM or Ctrl-C. The handlers are installed when this is
/// called, not when the future is first polled: call it before announcing readiness, or a
/// signal arriving in between would kill the process instead of shutting it down.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {},
                _ = wait(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
