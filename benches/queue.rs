//! Job queue benchmark (issue #4): time from `POST /v1/fine_tuning/jobs` to the training
//! engine being called on an idle worker, `GET /v1/fine_tuning/jobs/{id}` throughput and
//! latency under concurrent load from loopback, and claim throughput with many queued jobs.
//!
//! Runs kiln in-process (`server::start`) against a fresh database on the local PostgreSQL,
//! with an engine that returns at once (so the figures are the queue's, not training's).
//!
//! ```text
//! cargo bench --bench queue                 # everything
//! cargo bench --bench queue -- start        # POST-to-start latency only
//! cargo bench --bench queue -- get          # GET under load only
//! cargo bench --bench queue -- claim        # claim throughput only
//! ```
//!
//! Environment: `KILN_BENCH_DATABASE_URL` (admin connection, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `KILN_BENCH_JOBS` (POST-to-start samples,
//! default 200), `KILN_BENCH_GET_SECS` (default 5), `KILN_BENCH_CLAIM_JOBS` (default 5000).

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln::queue::{NewJob, Queue, QueueConfig};
use kiln::server::{self, Settings};
use kiln::worker::{JobContext, JobExecutor, JobFailure, JobOutcome, JobSpec, WorkerSettings};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::sync::mpsc;

const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
const MODEL: &str = "bench/instant";

/// An engine that reports when it was called and succeeds at once.
struct Instant0 {
    started: Mutex<mpsc::UnboundedSender<(String, Instant)>>,
}

impl JobExecutor for Instant0 {
    fn execute(&self, job: &JobSpec, _ctx: &mut JobContext) -> Result<JobOutcome, JobFailure> {
        let now = Instant::now();
        if let Ok(tx) = self.started.lock() {
            let _ = tx.send((job.id.clone(), now));
        }
        Ok(JobOutcome::default())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct BenchDatabase {
    admin: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    async fn create() -> anyhow::Result<BenchDatabase> {
        let admin = std::env::var("KILN_BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("kiln_bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .context("connect to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        let prefix = &admin[..admin.rfind('/').context("URL has a path")?];
        Ok(BenchDatabase {
            url: format!("{prefix}/{name}"),
            admin,
            name,
        })
    }

    async fn drop_it(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

async fn upload(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let mut lines = String::new();
    for i in 0..20 {
        let label = if i % 2 == 0 { "pos" } else { "neg" };
        lines.push_str(&format!(
            "{{\"text\": \"example {i}\", \"label\": \"{label}\"}}\n"
        ));
    }
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(lines.into_bytes()).file_name("train.jsonl"),
        );
    let file: Value = client
        .post(format!("{base}/v1/files"))
        .bearer_auth(ADMIN_KEY)
        .multipart(form)
        .send()
        .await?
        .json()
        .await?;
    let id = file["id"].as_str().context("file id")?.to_owned();
    for _ in 0..200 {
        let f: Value = client
            .get(format!("{base}/v1/files/{id}"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await?
            .json()
            .await?;
        if f["status"] == "processed" {
            return Ok(id);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("file not processed")
}

async fn create(client: &reqwest::Client, base: &str, file: &str) -> anyhow::Result<String> {
    let job: Value = client
        .post(format!("{base}/v1/fine_tuning/jobs"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"model": MODEL, "training_file": file}))
        .send()
        .await?
        .json()
        .await?;
    Ok(job["id"].as_str().context("job id")?.to_owned())
}

fn main() -> anyhow::Result<()> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    let (run_start, run_get, run_claim) = (wants("start"), wants("get"), wants("claim"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let db = BenchDatabase::create().await?;
        let result = run(&db.url, run_start, run_get, run_claim).await;
        db.drop_it().await;
        result
    })
}

async fn run(url: &str, run_start: bool, run_get: bool, run_claim: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join(MODEL))?;
    std::fs::write(models.join(MODEL).join("config.json"), "{}")?;
    let (tx, mut started) = mpsc::unbounded_channel();
    let executor = Arc::new(Instant0 {
        started: Mutex::new(tx),
    });
    let running = server::start(Settings {
        addr: "127.0.0.1:0".parse()?,
        database_url: url.to_owned(),
        data_dir: dir.path().to_owned(),
        models_dir: models.clone(),
        admin_key: Some(ADMIN_KEY.to_owned()),
        max_upload_bytes: 1 << 20,
        artifacts: None,
        jobs: WorkerSettings {
            slots: 1,
            executor: Some(executor),
            // Polling is the fallback; this measures the NOTIFY path.
            poll_interval: Duration::from_secs(5),
            ..Default::default()
        },
        serve: Default::default(),
        webhooks: Default::default(),
        api: Default::default(),
    })
    .await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let file = upload(&client, &base).await?;
    println!("kiln job queue benchmark ({} cores)", num_cpus());

    let mut last_job = create(&client, &base, &file).await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), started.recv()).await;
    if run_start {
        let n = env_u64("KILN_BENCH_JOBS", 200);
        let mut latencies = Vec::new();
        for _ in 0..n {
            // Wait for the worker to be idle again (the previous job completed).
            tokio::time::sleep(Duration::from_millis(30)).await;
            let t0 = Instant::now();
            last_job = create(&client, &base, &file).await?;
            let (id, at) = tokio::time::timeout(Duration::from_secs(10), started.recv())
                .await
                .context("the job did not start within 10 s")?
                .context("engine gone")?;
            anyhow::ensure!(id == last_job, "another job started");
            latencies.push(at.duration_since(t0).as_secs_f64() * 1000.0);
        }
        latencies.sort_by(f64::total_cmp);
        println!(
            "POST-to-start on an idle worker ({n} jobs): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.9),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(f64::NAN)
        );
    }

    if run_get {
        let secs = env_u64("KILN_BENCH_GET_SECS", 5);
        for concurrency in [1usize, 16, 64] {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (client, url) = (
                    client.clone(),
                    format!("{base}/v1/fine_tuning/jobs/{last_job}"),
                );
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let res = client.get(&url).bearer_auth(ADMIN_KEY).send().await;
                        if let Ok(res) = res
                            && res.status() == 200
                            && res.bytes().await.is_ok()
                        {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    lat
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await?);
            }
            all.sort_by(f64::total_cmp);
            println!(
                "GET /v1/fine_tuning/jobs/{{id}}, {concurrency:>2} concurrent: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
                all.len() as f64 / secs as f64,
                percentile(&all, 0.5),
                percentile(&all, 0.99)
            );
        }
    }
    running.shutdown().await?;

    if run_claim {
        claim_throughput(url, &models).await?;
    }
    Ok(())
}

async fn claim_throughput(url: &str, _models: &Path) -> anyhow::Result<()> {
    let n = env_u64("KILN_BENCH_CLAIM_JOBS", 5000) as i64;
    let store = kiln::store::Store::connect(url).await?;
    let queue = Queue::new(&store, QueueConfig::default());
    let pool = sqlx::PgPool::connect(url).await?;
    let (project, file): (String, String) =
        sqlx::query_as("SELECT project_id, id FROM files LIMIT 1")
            .fetch_one(&pool)
            .await?;
    let method = json!({"type": "supervised", "supervised": {"hyperparameters": {}}});
    let t = Instant::now();
    for i in 0..n {
        let id = kiln::store::new_id("ftjob-");
        queue
            .insert_job(&NewJob {
                id: &id,
                project_id: &project,
                model: MODEL,
                base_model: MODEL,
                training_file: &file,
                validation_file: None,
                training_format: "text_classification",
                suffix: None,
                seed: 1,
                metadata: None,
                integrations: None,
                method: &method,
                priority: (1 + i % 10) as i16,
                idempotency: None,
                device_memory: None,
            })
            .await?;
    }
    println!(
        "queued {n} jobs in {:.1} s ({:.0} inserts/s, one at a time)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    for claimers in [1usize, 4] {
        // Put everything back in the queue.
        sqlx::query(
            "UPDATE fine_tuning_jobs SET state = 'queued', worker_id = NULL,
                lease_expires_at = NULL, heartbeat_at = NULL WHERE state = 'running'",
        )
        .execute(&pool)
        .await?;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..claimers {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let mut claimed = 0u64;
                loop {
                    match queue.claim_jobs(&format!("bench-{w}"), 1).await {
                        Ok(jobs) if jobs.is_empty() => return claimed,
                        Ok(_) => claimed += 1,
                        Err(e) => panic!("claim failed: {e}"),
                    }
                }
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await?;
        }
        anyhow::ensure!(total == n as u64, "claimed {total} of {n}");
        println!(
            "claim throughput, {n} queued, {claimers} concurrent claimer(s): {:.0} claims/s",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
    pool.close().await;
    store.close().await;
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
