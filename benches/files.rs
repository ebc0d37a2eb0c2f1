//! Files API benchmark (issue #2): upload throughput and server memory for a large upload,
//! the same bytes through the Uploads API in 64 MiB parts (one at a time and four at once)
//! with the completion's assembly timed apart, validation cost for a fine-tuning dataset,
//! and `GET /v1/files/{id}` latency under load.
//!
//! Runs a real `kiln serve` (release build) against a fresh database on the local
//! PostgreSQL, talks to it over loopback only, prints a table and writes the figures to
//! `bench/results/files-<date>.json`. See `bench/README.md`.
//!
//! ```text
//! cargo bench --bench files                 # everything
//! cargo bench --bench files -- upload       # only the upload / validation / parts part
//! cargo bench --bench files -- parts        # only the Uploads API part
//! cargo bench --bench files -- get          # only the GET latency part
//! ```
//!
//! Environment: `KILN_BENCH_DATABASE_URL` (admin connection, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `KILN_BENCH_DATA_DIR` (parent of the
//! temporary data directory, default cargo's target tmp dir), `KILN_BENCH_UPLOAD_MIB`
//! (default 1024), `KILN_BENCH_JSONL_MIB` (default 256), `KILN_BENCH_GET_SECS` (default 10),
//! `KILN_BENCH_NO_WRK=1` to skip the optional wrk comparison.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};

const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
const MIB: u64 = 1024 * 1024;
const CHUNK: usize = 1 << 20;
/// How often the server's RSS is sampled during an upload.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Upper bound on waiting for one upload or one validation.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(1800);
const GET_CONCURRENCY: &[usize] = &[1, 16, 64];

fn main() -> anyhow::Result<()> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    let config = Config {
        upload_bytes: env_u64("KILN_BENCH_UPLOAD_MIB", 1024) * MIB,
        jsonl_bytes: env_u64("KILN_BENCH_JSONL_MIB", 256) * MIB,
        get_duration: Duration::from_secs(env_u64("KILN_BENCH_GET_SECS", 10)),
        run_upload: wants("upload") && !filters.iter().any(|f| f == "parts"),
        run_parts: wants("upload") || wants("parts"),
        run_get: wants("get"),
        use_wrk: std::env::var("KILN_BENCH_NO_WRK").map_or(true, |v| v.is_empty() || v == "0"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(config))
}

struct Config {
    upload_bytes: u64,
    jsonl_bytes: u64,
    get_duration: Duration,
    run_upload: bool,
    run_parts: bool,
    run_get: bool,
    use_wrk: bool,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let db = BenchDatabase::create().await?;
    let parent = std::env::var_os("KILN_BENCH_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&parent)?;
    let data_dir = tempfile::Builder::new()
        .prefix("kiln-bench-")
        .tempdir_in(&parent)
        .context("creating the data directory")?;

    let outcome = match Server::spawn(&db.url, data_dir.path()).await {
        Ok(server) => {
            let result = measure(&config, &server, data_dir.path()).await;
            server.terminate().await;
            result
        }
        Err(e) => Err(e),
    };
    db.drop_database().await;
    drop(data_dir); // removes everything the server wrote
    let report = outcome?;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!(
        "files-{}.json",
        chrono::Utc::now().format("%Y-%m-%d-%H%M%S")
    ));
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("\nfigures written to {}", path.display());
    Ok(())
}

async fn measure(config: &Config, server: &Server, data_dir: &Path) -> anyhow::Result<Value> {
    let mut report = json!({
        "benchmark": "files",
        "date": chrono::Utc::now().to_rfc3339(),
        "machine": machine(),
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "settings": {
            "upload_bytes": config.upload_bytes,
            "jsonl_bytes_requested": config.jsonl_bytes,
            "get_seconds_per_level": config.get_duration.as_secs(),
            "get_concurrency": GET_CONCURRENCY,
            "rss_sample_ms": SAMPLE_EVERY.as_millis() as u64,
        },
    });
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("building the HTTP client")?;

    if config.run_upload {
        println!("== Files API: uploads (server pid {}) ==", server.pid);
        let disk_before = disk_write_speed(data_dir, config.upload_bytes).await?;
        println!(
            "disk write before the uploads, {} MiB + fsync, same directory: {:.2} s, {:.1} MB/s",
            config.upload_bytes / MIB,
            disk_before.seconds,
            disk_before.mb_per_s
        );
        let batch = upload(
            server,
            &client,
            "batch",
            "big.bin",
            config.upload_bytes,
            Payload::Binary,
        )
        .await?;
        let jsonl = upload(
            server,
            &client,
            "fine-tune",
            "train.jsonl",
            config.jsonl_bytes,
            Payload::Jsonl,
        )
        .await?;
        // The disk of a shared machine varies: measure again after and compare with both.
        let disk_after = disk_write_speed(data_dir, config.upload_bytes).await?;
        let disk = DiskSpeed::combine(&[disk_before, disk_after]);
        print_upload_table(&disk, &[&batch, &jsonl]);
        report["disk_write"] = disk.to_json();
        report["upload_batch"] = batch.to_json(disk.mb_per_s);
        report["upload_fine_tune"] = jsonl.to_json(disk.mb_per_s);
    }

    if config.run_parts {
        println!(
            "\n== Uploads API: {} MiB in parts of {} MiB ==",
            config.upload_bytes / MIB,
            PART / MIB
        );
        let mut runs = Vec::new();
        // Twice each, interleaved: the disk's writeback state varies from run to run.
        for _round in 0..2 {
            for (concurrency, with_md5) in [(1, false), (4, false), (4, true)] {
                runs.push(
                    upload_in_parts(server, &client, config.upload_bytes, concurrency, with_md5)
                        .await?,
                );
            }
        }
        print_parts_table(&runs);
        report["upload_parts"] = json!(runs.iter().map(PartsResult::to_json).collect::<Vec<_>>());
    }

    if config.run_get {
        println!(
            "\n== Files API: GET /v1/files/{{id}} for {} s per level ==",
            config.get_duration.as_secs()
        );
        let id = small_file(server, &client).await?;
        let url = format!("{}/v1/files/{id}", server.base);
        let rss_before = proc_status_kib(server.pid, "VmRSS");
        let mut levels = Vec::new();
        for &concurrency in GET_CONCURRENCY {
            let level = hammer(&url, concurrency, config.get_duration).await?;
            levels.push(level);
        }
        let rss_after = proc_status_kib(server.pid, "VmRSS");
        print_get_table(&levels);
        println!(
            "server RSS before/after the GET runs: {} / {} MiB",
            fmt_mib(rss_before),
            fmt_mib(rss_after)
        );
        let mut get = json!({
            "path": "/v1/files/{id}",
            "duration_s_per_level": config.get_duration.as_secs(),
            "client": "reqwest (tokio, keep-alive pool), in the bench process",
            "levels": levels.iter().map(GetLevel::to_json).collect::<Vec<_>>(),
            "server_rss_before_kib": rss_before,
            "server_rss_after_kib": rss_after,
        });
        if config.use_wrk
            && let Some(wrk) = run_wrk(&url, config.get_duration).await
        {
            get["wrk"] = wrk;
        }
        report["get_file"] = get;
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// The server under test

struct Server {
    child: tokio::process::Child,
    pid: u32,
    base: String,
}

impl Server {
    async fn spawn(database_url: &str, data_dir: &Path) -> anyhow::Result<Server> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("serve")
            .env("DATABASE_URL", database_url)
            .env("KILN_DATA_DIR", data_dir)
            .env("KILN_ADDR", "127.0.0.1:0")
            .env("KILN_ADMIN_KEY", ADMIN_KEY)
            .env("KILN_MAX_UPLOAD_BYTES", (2 * 1024 * MIB).to_string())
            .env("KILN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning kiln")?;
        let pid = child.id().context("kiln pid")?;
        let stdout = child.stdout.take().context("kiln stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("kiln listening on ") {
                    return Ok(addr.trim().to_owned());
                }
            }
            bail!("kiln exited before listening")
        })
        .await
        .context("kiln did not listen within 90 s")??;
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if !addr.starts_with("http://127.0.0.1:") {
            bail!("kiln listens on {addr}, expected loopback");
        }
        Ok(Server {
            child,
            pid,
            base: addr,
        })
    }

    async fn terminate(mut self) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A database of its own on the local server, dropped at the end.
struct BenchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    async fn create() -> anyhow::Result<BenchDatabase> {
        let admin_url = std::env::var("KILN_BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("kiln_bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .context("the bench needs PostgreSQL: set KILN_BENCH_DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b.to_owned(), format!("?{q}")),
            None => (admin_url.clone(), String::new()),
        };
        let prefix = &base[..base.rfind('/').context("database URL has no path")?];
        Ok(BenchDatabase {
            url: format!("{prefix}/{name}{query}"),
            admin_url,
            name,
        })
    }

    async fn drop_database(self) {
        match sqlx::PgConnection::connect(&self.admin_url).await {
            Ok(mut conn) => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                    eprintln!("could not drop database {}: {e}", self.name);
                }
                let _ = conn.close().await;
            }
            Err(e) => eprintln!("could not drop database {}: {e}", self.name),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Memory and CPU of the server process

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM), 0 when unreadable.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    kib_field(&format!("/proc/{pid}/status"), field)
}

/// A `Name:   123 kB` field of a /proc file, 0 when unreadable.
fn kib_field(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(str::to_owned))
        })
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds used so far by a process (all threads).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Samples VmRSS of a process every 50 ms on a thread of its own until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize)>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            let mut samples = 0;
            // Bounded: at most OPERATION_TIMEOUT worth of samples.
            let limit = (OPERATION_TIMEOUT.as_millis() / SAMPLE_EVERY.as_millis()) as usize * 2;
            while !flag.load(Ordering::Relaxed) && samples < limit {
                max = max.max(proc_status_kib(pid, "VmRSS"));
                samples += 1;
                std::thread::sleep(SAMPLE_EVERY);
            }
            (max.max(proc_status_kib(pid, "VmRSS")), samples + 1)
        });
        RssSampler { stop, thread }
    }

    /// Returns (max VmRSS in KiB, number of samples).
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

// ---------------------------------------------------------------------------------------
// Uploads

struct DiskSpeed {
    bytes: u64,
    seconds: f64,
    mb_per_s: f64,
    /// MB/s of each run when this combines several.
    runs_mb_per_s: Vec<f64>,
}

impl DiskSpeed {
    /// Several runs of the same size as one: total bytes over total time.
    fn combine(runs: &[DiskSpeed]) -> DiskSpeed {
        let bytes = runs.first().map_or(0, |r| r.bytes);
        let seconds = runs.iter().map(|r| r.seconds).sum::<f64>() / runs.len().max(1) as f64;
        DiskSpeed {
            bytes,
            seconds,
            mb_per_s: mb_per_s(bytes, seconds),
            runs_mb_per_s: runs.iter().map(|r| r.mb_per_s).collect(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "what": "write the upload's size to a file in the data directory in 1 MiB writes, then fsync; \
                     once before and once after the uploads, mb_per_s from the mean time",
            "bytes": self.bytes,
            "seconds_mean": round3(self.seconds),
            "mb_per_s": round1(self.mb_per_s),
            "runs_mb_per_s": self.runs_mb_per_s.iter().map(|v| round1(*v)).collect::<Vec<_>>(),
        })
    }
}

/// Writes `bytes` to a file in the data directory with fsync: what the disk can do.
async fn disk_write_speed(dir: &Path, bytes: u64) -> anyhow::Result<DiskSpeed> {
    let path = dir.join("disk-speed.tmp");
    let seconds = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let chunk = pseudo_random(CHUNK, 0x5eed);
        let started = Instant::now();
        let mut file = std::fs::File::create(&path)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        let seconds = started.elapsed().as_secs_f64();
        drop(file);
        std::fs::remove_file(&path)?;
        Ok(seconds)
    })
    .await??;
    Ok(DiskSpeed {
        bytes,
        seconds,
        mb_per_s: mb_per_s(bytes, seconds),
        runs_mb_per_s: Vec::new(),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Payload {
    /// Incompressible bytes.
    Binary,
    /// Valid classification JSONL lines.
    Jsonl,
}

struct UploadResult {
    purpose: &'static str,
    bytes: u64,
    seconds: f64,
    mb_per_s: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    rss_peak_kib: u64,
    hwm_after_kib: u64,
    rss_samples: usize,
    server_cpu_s: f64,
    client_rss_growth_kib: i64,
    /// For validated purposes: from the upload's response until the status left `uploaded`.
    validation: Option<Validation>,
}

struct Validation {
    seconds: f64,
    status: String,
    status_details: Value,
    examples: Value,
    rss_peak_kib: u64,
    server_cpu_s: f64,
}

impl UploadResult {
    fn rss_growth_kib(&self) -> i64 {
        self.rss_peak_kib as i64 - self.rss_before_kib as i64
    }

    fn to_json(&self, disk_mb_per_s: f64) -> Value {
        let mut v = json!({
            "purpose": self.purpose,
            "bytes": self.bytes,
            "seconds": round3(self.seconds),
            "mb_per_s": round1(self.mb_per_s),
            "ratio_to_disk": round3(self.mb_per_s / disk_mb_per_s),
            "server_rss_before_kib": self.rss_before_kib,
            "server_rss_after_kib": self.rss_after_kib,
            "server_rss_peak_sampled_kib": self.rss_peak_kib,
            "server_rss_growth_kib": self.rss_growth_kib(),
            "server_vmhwm_after_kib": self.hwm_after_kib,
            "rss_samples": self.rss_samples,
            "server_cpu_s": round3(self.server_cpu_s),
            "client_rss_growth_kib": self.client_rss_growth_kib,
            "aim_rss_growth_under_50_mib": self.rss_growth_kib() < 50 * 1024,
        });
        if let Some(val) = &self.validation {
            v["validation"] = json!({
                "seconds_after_upload": round3(val.seconds),
                "status": val.status,
                "status_details": val.status_details,
                "examples": val.examples,
                "mb_per_s": round1(mb_per_s(self.bytes, val.seconds)),
                "server_rss_peak_sampled_kib": val.rss_peak_kib,
                "server_rss_growth_kib": val.rss_peak_kib as i64 - self.rss_before_kib as i64,
                "server_cpu_s": round3(val.server_cpu_s),
            });
        }
        v
    }
}

/// A stream of about `total` bytes in 1 MiB chunks that all share one buffer: the client
/// never holds more than that buffer, whatever the size. JSONL is cut to whole blocks of
/// whole lines (so slightly under `total`); returns the body and its exact length.
fn body_stream(total: u64, payload: Payload) -> (reqwest::Body, u64) {
    let block = match payload {
        Payload::Binary => Bytes::from(pseudo_random(CHUNK, 0xfeed)),
        Payload::Jsonl => Bytes::from(jsonl_block(CHUNK)),
    };
    let full = block.len() as u64;
    let total = match payload {
        Payload::Binary => total,
        Payload::Jsonl => (total / full).max(1) * full,
    };
    let chunks = total.div_ceil(full);
    let stream = futures_util::stream::iter((0..chunks).map(move |i| {
        let n = (total - i * full).min(full) as usize;
        Ok::<Bytes, std::io::Error>(block.slice(..n))
    }));
    (reqwest::Body::wrap_stream(stream), total)
}

/// Whole lines of a valid 3-class text-classification dataset, at most `max` bytes.
fn jsonl_block(max: usize) -> Vec<u8> {
    let labels = ["a", "b", "c"];
    let mut out = Vec::with_capacity(max);
    for i in 0usize.. {
        let line = format!(
            "{{\"text\": \"example {i}: the quick brown fox jumps over the lazy dog\", \"label\": \"{}\"}}\n",
            labels[i % labels.len()]
        );
        if out.len() + line.len() > max {
            break;
        }
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// Deterministic incompressible bytes (xorshift).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn upload(
    server: &Server,
    client: &reqwest::Client,
    purpose: &'static str,
    filename: &str,
    bytes: u64,
    payload: Payload,
) -> anyhow::Result<UploadResult> {
    // Let the previous operation's allocations settle before taking the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.pid;
    let rss_before_kib = proc_status_kib(pid, "VmRSS");
    let client_before = proc_status_kib(std::process::id(), "VmRSS");
    let cpu_before = cpu_seconds(pid);
    let sampler = RssSampler::start(pid);

    let (body, bytes) = body_stream(bytes, payload);
    let part = Part::stream_with_length(body, bytes)
        .file_name(filename.to_owned())
        .mime_str("application/octet-stream")?;
    let form = Form::new().text("purpose", purpose).part("file", part);
    let started = Instant::now();
    let response = tokio::time::timeout(
        OPERATION_TIMEOUT,
        client
            .post(format!("{}/v1/files", server.base))
            .bearer_auth(ADMIN_KEY)
            .multipart(form)
            .send(),
    )
    .await
    .context("upload timed out")??;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let seconds = started.elapsed().as_secs_f64();
    let client_after = proc_status_kib(std::process::id(), "VmRSS");
    let cpu_upload = cpu_seconds(pid) - cpu_before;
    if !status.is_success() {
        sampler.finish();
        bail!("upload of {bytes} bytes ({purpose}) answered {status}: {body}");
    }
    if body["bytes"].as_u64() != Some(bytes) {
        sampler.finish();
        bail!("upload stored {} bytes, sent {bytes}", body["bytes"]);
    }
    let id = body["id"].as_str().context("file id")?.to_owned();

    let mut validation = None;
    let (rss_peak_kib, rss_samples);
    if purpose == "fine-tune" {
        // The upload's own peak, then keep sampling while the validator parses.
        let upload_peak = sampler.finish();
        let sampler = RssSampler::start(pid);
        let cpu_start = cpu_seconds(pid);
        let waited = Instant::now();
        let file = wait_validated(server, client, &id).await?;
        let seconds = waited.elapsed().as_secs_f64();
        let (peak, _) = sampler.finish();
        validation = Some(Validation {
            seconds,
            status: file["status"].as_str().unwrap_or("?").to_owned(),
            status_details: file["status_details"].clone(),
            examples: file["validation"]["examples"].clone(),
            rss_peak_kib: peak,
            server_cpu_s: cpu_seconds(pid) - cpu_start,
        });
        (rss_peak_kib, rss_samples) = upload_peak;
    } else {
        (rss_peak_kib, rss_samples) = sampler.finish();
    }
    let result = UploadResult {
        purpose,
        bytes,
        seconds,
        mb_per_s: mb_per_s(bytes, seconds),
        rss_before_kib,
        rss_after_kib: proc_status_kib(pid, "VmRSS"),
        rss_peak_kib,
        hwm_after_kib: proc_status_kib(pid, "VmHWM"),
        rss_samples,
        server_cpu_s: cpu_upload,
        client_rss_growth_kib: client_after as i64 - client_before as i64,
        validation,
    };
    // Free the disk for what follows.
    let _ = client
        .delete(format!("{}/v1/files/{id}", server.base))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await;
    Ok(result)
}

/// Polls every 50 ms until the file leaves `uploaded` (bounded by OPERATION_TIMEOUT).
async fn wait_validated(
    server: &Server,
    client: &reqwest::Client,
    id: &str,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + OPERATION_TIMEOUT;
    while Instant::now() < deadline {
        let file: Value = client
            .get(format!("{}/v1/files/{id}", server.base))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await?
            .json()
            .await?;
        if file["status"] != "uploaded" {
            return Ok(file);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    bail!("file {id} was not validated within {OPERATION_TIMEOUT:?}")
}

fn print_upload_table(disk: &DiskSpeed, results: &[&UploadResult]) {
    println!();
    println!(
        "{:<22} {:>9} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "upload",
        "size MiB",
        "seconds",
        "MB/s",
        "x disk",
        "RSS0 MiB",
        "RSS1 MiB",
        "peak MiB",
        "grow MiB",
        "CPU s"
    );
    for r in results {
        println!(
            "{:<22} {:>9} {:>8.2} {:>8.1} {:>7.2} {:>9} {:>9} {:>9} {:>9} {:>8.2}",
            format!("purpose={}", r.purpose),
            r.bytes / MIB,
            r.seconds,
            r.mb_per_s,
            r.mb_per_s / disk.mb_per_s,
            fmt_mib(r.rss_before_kib),
            fmt_mib(r.rss_after_kib),
            fmt_mib(r.rss_peak_kib),
            fmt_mib_signed(r.rss_growth_kib()),
            r.server_cpu_s,
        );
    }
    println!(
        "{:<22} {:>9} {:>8.2} {:>8.1} {:>7.2}   (mean of runs at {})",
        "disk write + fsync",
        disk.bytes / MIB,
        disk.seconds,
        disk.mb_per_s,
        1.0,
        disk.runs_mb_per_s
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" and ")
            + " MB/s"
    );
    for r in results {
        if let Some(v) = &r.validation {
            println!(
                "validation of the {} MiB fine-tune file: {} after {:.2} s ({:.1} MB/s, {} examples), \
                 server RSS peak during it {} MiB (+{} over the pre-upload baseline), CPU {:.2} s",
                r.bytes / MIB,
                v.status,
                v.seconds,
                mb_per_s(r.bytes, v.seconds),
                v.examples,
                fmt_mib(v.rss_peak_kib),
                fmt_mib_signed(v.rss_peak_kib as i64 - r.rss_before_kib as i64),
                v.server_cpu_s,
            );
            if v.status != "processed" {
                println!("  status_details: {}", v.status_details);
            }
        }
    }
    for r in results {
        println!(
            "purpose={}: VmHWM after {} MiB, {} RSS samples, client RSS growth {} MiB; \
             aim (growth < 50 MiB, at disk speed): {}",
            r.purpose,
            fmt_mib(r.hwm_after_kib),
            r.rss_samples,
            fmt_mib_signed(r.client_rss_growth_kib),
            if r.rss_growth_kib() < 50 * 1024 {
                "memory ok"
            } else {
                "memory NOT met"
            }
        );
    }
}

// ---------------------------------------------------------------------------------------
// The Uploads API

/// The largest part the server takes, what OpenAI's client sends.
const PART: u64 = 64 * MIB;

struct PartsResult {
    bytes: u64,
    parts: u64,
    concurrency: usize,
    /// Whether the completion sent the file's MD5 (the server then computes it too).
    with_md5: bool,
    /// From creating the upload until the last part's answer.
    parts_seconds: f64,
    /// The completion: copying the parts into one file, hashing (SHA-256, MD5), fsync.
    complete_seconds: f64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    server_cpu_parts_s: f64,
    server_cpu_complete_s: f64,
}

impl PartsResult {
    fn total_seconds(&self) -> f64 {
        self.parts_seconds + self.complete_seconds
    }

    fn to_json(&self) -> Value {
        json!({
            "bytes": self.bytes,
            "part_bytes": PART,
            "parts": self.parts,
            "parts_in_flight": self.concurrency,
            "md5_sent": self.with_md5,
            "parts_seconds": round3(self.parts_seconds),
            "parts_mb_per_s": round1(mb_per_s(self.bytes, self.parts_seconds)),
            "complete_seconds": round3(self.complete_seconds),
            "complete_mb_per_s": round1(mb_per_s(self.bytes, self.complete_seconds)),
            "total_seconds": round3(self.total_seconds()),
            "total_mb_per_s": round1(mb_per_s(self.bytes, self.total_seconds())),
            "server_rss_before_kib": self.rss_before_kib,
            "server_rss_peak_sampled_kib": self.rss_peak_kib,
            "server_rss_growth_kib": self.rss_peak_kib as i64 - self.rss_before_kib as i64,
            "server_cpu_parts_s": round3(self.server_cpu_parts_s),
            "server_cpu_complete_s": round3(self.server_cpu_complete_s),
        })
    }
}

async fn post_json(client: &reqwest::Client, url: String, body: Value) -> anyhow::Result<Value> {
    let response = tokio::time::timeout(
        OPERATION_TIMEOUT,
        client.post(url).bearer_auth(ADMIN_KEY).json(&body).send(),
    )
    .await
    .context("request timed out")??;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("answered {status}: {body}");
    }
    Ok(body)
}

/// The MD5 of what `body_stream(bytes, Payload::Binary)` sends, cut into 64 MiB parts.
fn parts_md5(bytes: u64) -> String {
    use md5::{Digest, Md5};
    let block = pseudo_random(CHUNK, 0xfeed);
    let mut md5 = Md5::new();
    let mut left = bytes;
    while left > 0 {
        let mut part = left.min(PART);
        left -= part;
        while part > 0 {
            let n = part.min(CHUNK as u64);
            md5.update(&block[..n as usize]);
            part -= n;
        }
    }
    hex::encode(md5.finalize())
}

/// `bytes` through `/v1/uploads` in 64 MiB parts, `concurrency` parts in flight (each
/// streamed from the shared buffer, as the single upload is), then completed, with the
/// file's MD5 when `with_md5` (computed before the clock starts).
async fn upload_in_parts(
    server: &Server,
    client: &reqwest::Client,
    bytes: u64,
    concurrency: usize,
    with_md5: bool,
) -> anyhow::Result<PartsResult> {
    use futures_util::StreamExt;
    let md5 = with_md5.then(|| parts_md5(bytes));
    // Start from a clean page cache: earlier runs' dirty pages written out.
    let _ = std::process::Command::new("sync").status();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.pid;
    let rss_before_kib = proc_status_kib(pid, "VmRSS");
    let sampler = RssSampler::start(pid);
    let cpu_start = cpu_seconds(pid);
    let started = Instant::now();
    let upload = post_json(
        client,
        format!("{}/v1/uploads", server.base),
        json!({"bytes": bytes, "filename": "big.bin", "mime_type": "application/octet-stream",
               "purpose": "batch"}),
    )
    .await?;
    let id = upload["id"].as_str().context("upload id")?.to_owned();
    let parts = bytes.div_ceil(PART);
    let sent: Vec<anyhow::Result<(u64, String)>> = futures_util::stream::iter(0..parts)
        .map(|i| {
            let url = format!("{}/v1/uploads/{id}/parts", server.base);
            async move {
                let len = (bytes - i * PART).min(PART);
                let (body, len) = body_stream(len, Payload::Binary);
                let form = Form::new().part(
                    "data",
                    Part::stream_with_length(body, len).file_name("part"),
                );
                let response = tokio::time::timeout(
                    OPERATION_TIMEOUT,
                    client
                        .post(url)
                        .bearer_auth(ADMIN_KEY)
                        .multipart(form)
                        .send(),
                )
                .await
                .context("part timed out")??;
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!("part {i} answered {status}: {body}");
                }
                Ok((i, body["id"].as_str().context("part id")?.to_owned()))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut ids = sent.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    ids.sort();
    let parts_seconds = started.elapsed().as_secs_f64();
    let cpu_parts = cpu_seconds(pid);
    let completing = Instant::now();
    let mut body = json!({"part_ids": ids.into_iter().map(|(_, id)| id).collect::<Vec<_>>()});
    if let Some(md5) = md5 {
        body["md5"] = json!(md5);
    }
    let done = post_json(
        client,
        format!("{}/v1/uploads/{id}/complete", server.base),
        body,
    )
    .await?;
    let complete_seconds = completing.elapsed().as_secs_f64();
    let cpu_end = cpu_seconds(pid);
    let (rss_peak_kib, _) = sampler.finish();
    if done["file"]["bytes"].as_u64() != Some(bytes) {
        bail!("the upload made {}, not {bytes} bytes", done["file"]);
    }
    let file = done["file"]["id"].as_str().context("file id")?;
    let _ = client
        .delete(format!("{}/v1/files/{file}", server.base))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await;
    Ok(PartsResult {
        bytes,
        parts,
        concurrency,
        with_md5,
        parts_seconds,
        complete_seconds,
        rss_before_kib,
        rss_peak_kib,
        server_cpu_parts_s: cpu_parts - cpu_start,
        server_cpu_complete_s: cpu_end - cpu_parts,
    })
}

fn print_parts_table(runs: &[PartsResult]) {
    println!(
        "{:>9} {:>6} {:>9} {:>4} {:>9} {:>8} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9}",
        "size MiB",
        "parts",
        "in flight",
        "md5",
        "parts s",
        "MB/s",
        "complete s",
        "total MB/s",
        "grow MiB",
        "CPU parts",
        "CPU comp.",
        "peak MiB"
    );
    for r in runs {
        println!(
            "{:>9} {:>6} {:>9} {:>4} {:>9.2} {:>8.1} {:>10.2} {:>10.1} {:>8} {:>9.2} {:>9.2} {:>9}",
            r.bytes / MIB,
            r.parts,
            r.concurrency,
            if r.with_md5 { "yes" } else { "no" },
            r.parts_seconds,
            mb_per_s(r.bytes, r.parts_seconds),
            r.complete_seconds,
            mb_per_s(r.bytes, r.total_seconds()),
            fmt_mib_signed(r.rss_peak_kib as i64 - r.rss_before_kib as i64),
            r.server_cpu_parts_s,
            r.server_cpu_complete_s,
            fmt_mib(r.rss_peak_kib),
        );
    }
}

// ---------------------------------------------------------------------------------------
// GET latency

async fn small_file(server: &Server, client: &reqwest::Client) -> anyhow::Result<String> {
    let form = Form::new().text("purpose", "batch").part(
        "file",
        Part::bytes(b"{\"custom_id\": \"1\"}\n".to_vec()).file_name("small.jsonl"),
    );
    let body: Value = client
        .post(format!("{}/v1/files", server.base))
        .bearer_auth(ADMIN_KEY)
        .multipart(form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["id"].as_str().context("file id")?.to_owned())
}

struct GetLevel {
    concurrency: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl GetLevel {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn to_json(&self) -> Value {
        json!({
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round3(self.seconds),
            "requests_per_s": round1(self.rps()),
            "p50_ms": self.p50_us as f64 / 1000.0,
            "p99_ms": self.p99_us as f64 / 1000.0,
            "max_ms": self.max_us as f64 / 1000.0,
        })
    }
}

/// `concurrency` workers, each on its own keep-alive connection, send GETs back to back
/// until the deadline; every latency is kept (microseconds).
async fn hammer(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<GetLevel> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    // Warm the pool and the server's database connections.
    let warm = Instant::now() + Duration::from_millis(500);
    let mut warmers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_owned());
        warmers.spawn(async move {
            while Instant::now() < warm {
                let _ = get_once(&client, &url).await;
            }
        });
    }
    while warmers.join_next().await.is_some() {}

    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_owned());
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = get_once(&client, &url).await;
                latencies.push(t.elapsed().as_micros() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (latencies, e) = done?;
        all.extend(latencies);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pick = |q: f64| -> u64 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() - 1) as f64 * q).round() as usize]
        }
    };
    Ok(GetLevel {
        concurrency,
        requests: all.len(),
        errors,
        seconds,
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        max_us: all.last().copied().unwrap_or(0),
    })
}

async fn get_once(client: &reqwest::Client, url: &str) -> bool {
    match client.get(url).bearer_auth(ADMIN_KEY).send().await {
        Ok(res) => {
            let ok = res.status().is_success();
            // Read the whole body so the connection goes back to the pool.
            res.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

fn print_get_table(levels: &[GetLevel]) {
    println!();
    println!(
        "{:>11} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9}",
        "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms"
    );
    for l in levels {
        println!(
            "{:>11} {:>9} {:>7} {:>10.0} {:>9.3} {:>9.3} {:>9.3}",
            l.concurrency,
            l.requests,
            l.errors,
            l.rps(),
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0
        );
    }
}

/// The same load from wrk, when it is installed (for comparison only).
async fn run_wrk(url: &str, duration: Duration) -> Option<Value> {
    let found = tokio::process::Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok();
    if !found {
        println!("(wrk not installed: skipping the wrk comparison)");
        return None;
    }
    println!("\nwrk, same URL and duration (2 wrk threads; 1 for concurrency 1):");
    println!(
        "{:>11} {:>10} {:>9} {:>9} {:>9}",
        "concurrency", "req/s", "p50 ms", "p99 ms", "max ms"
    );
    let mut levels = Vec::new();
    for &concurrency in GET_CONCURRENCY {
        let threads = concurrency.min(2);
        let output = tokio::process::Command::new("wrk")
            .args([
                "-t",
                &threads.to_string(),
                "-c",
                &concurrency.to_string(),
                "-d",
                &format!("{}s", duration.as_secs().max(1)),
                "--latency",
                "-H",
                &format!("Authorization: Bearer {ADMIN_KEY}"),
                url,
            ])
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let parsed = parse_wrk(&text);
        let ms = |k: &str| parsed.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "{:>11} {:>10.0} {:>9.3} {:>9.3} {:>9.3}",
            concurrency,
            ms("requests_per_s"),
            ms("p50_ms"),
            ms("p99_ms"),
            ms("max_ms")
        );
        let mut level = json!({"concurrency": concurrency, "threads": threads});
        for (k, v) in &parsed {
            level[*k] = json!(v);
        }
        if let Some(non2xx) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        {
            level["non_2xx"] = json!(non2xx.trim());
        }
        levels.push(level);
    }
    Some(json!({"levels": levels}))
}

/// Picks requests/s, p50, p99 and max latency out of `wrk --latency` output.
fn parse_wrk(text: &str) -> std::collections::BTreeMap<&'static str, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v, ..] => {
                if let Ok(v) = v.parse() {
                    out.insert("requests_per_s", v);
                }
            }
            ["Latency", _avg, _stdev, max, ..] => {
                if let Some(v) = wrk_ms(max) {
                    out.insert("max_ms", v);
                }
            }
            ["50%", v] => {
                if let Some(v) = wrk_ms(v) {
                    out.insert("p50_ms", v);
                }
            }
            ["99%", v] => {
                if let Some(v) = wrk_ms(v) {
                    out.insert("p99_ms", v);
                }
            }
            _ => {}
        }
    }
    out
}

/// wrk durations ("812.00us", "1.23ms", "2.01s", "1.5m") in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

// ---------------------------------------------------------------------------------------
// Formatting

fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds.max(1e-9)
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn fmt_mib_signed(kib: i64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_kib = kib_field("/proc/meminfo", "MemTotal");
    json!({
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu,
        "memory_gib": round1(mem_kib as f64 / 1024.0 / 1024.0),
    })
}
