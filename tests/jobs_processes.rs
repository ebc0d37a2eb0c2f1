//! The job queue under faults, over real processes and real PostgreSQL: `kill -9` of the
//! process training a job, SIGTERM, PostgreSQL going away mid-job, and the official OpenAI
//! client driving a whole job.
//!
//! The processes are this test binary re-run as [`helper_kiln_with_toy_engine`]: a real
//! `kiln` server (`server::start`) with the tests' toy training engine.

mod common;
mod jobs_support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ADMIN_KEY, TestDatabase};
use jobs_support::{MODEL, ToyExecutor, dataset, install_model};
use kiln::queue::{Lease, NewEvent, Queue, QueueConfig};
use kiln::server::{self, Settings};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const HELPER_DB: &str = "KILN_JOBS_HELPER_DB";
const HELPER_DIR: &str = "KILN_JOBS_HELPER_DIR";
const HELPER_INNER: &str = "KILN_JOBS_HELPER_INNER";

fn settings(database_url: &str, data_dir: &Path, inner: usize, lease: Duration) -> Settings {
    let models_dir = data_dir.join("models");
    install_model(&models_dir);
    let mut jobs = kiln::worker::WorkerSettings {
        slots: 1,
        executor: Some(ToyExecutor::new(inner)),
        poll_interval: Duration::from_millis(500),
        reap_interval: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(20),
        ..Default::default()
    };
    jobs.queue.lease = lease;
    jobs.queue.retry_base = Duration::from_millis(200);
    Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        database_url: database_url.to_owned(),
        data_dir: data_dir.to_owned(),
        models_dir,
        admin_key: Some(ADMIN_KEY.to_owned()),
        max_upload_bytes: 8 * 1024 * 1024,
        artifacts: None,
        jobs,
        serve: Default::default(),
        webhooks: Default::default(),
        api: Default::default(),
    }
}

/// Not a test: the kiln process the tests below start, kill and terminate.
#[tokio::test]
#[ignore]
async fn helper_kiln_with_toy_engine() {
    let (Ok(db), Ok(dir)) = (std::env::var(HELPER_DB), std::env::var(HELPER_DIR)) else {
        return;
    };
    let inner = std::env::var(HELPER_INNER)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let running = server::start(settings(
        &db,
        Path::new(&dir),
        inner,
        Duration::from_secs(3),
    ))
    .await
    .unwrap();
    println!("HELPER_LISTENING http://{}", running.addr);
    server::shutdown_signal().await;
    running.shutdown().await.unwrap();
    println!("HELPER_STOPPED");
}

struct Helper {
    /// None when the server runs inside the test process.
    child: Option<tokio::process::Child>,
    base: String,
    client: reqwest::Client,
}

impl Helper {
    async fn start(db: &str, dir: &Path, inner: usize) -> Helper {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "helper_kiln_with_toy_engine",
            "--nocapture",
        ])
        .env(HELPER_DB, db)
        .env(HELPER_DIR, dir)
        .env(HELPER_INNER, inner.to_string())
        .env("KILN_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
        // Its own process group, so a signal to it reaches nobody else.
        cmd.as_std_mut().process_group(0);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let base = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(base) = line.strip_prefix("HELPER_LISTENING ") {
                    return base.trim().to_owned();
                }
            }
            panic!("helper exited before listening");
        })
        .await
        .expect("helper listens within 60 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Helper {
            child: Some(child),
            base,
            client: reqwest::Client::new(),
        }
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running") as i32;
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    async fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        self.child.as_mut().unwrap().wait().await.unwrap();
    }

    async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        tokio::time::timeout(Duration::from_secs(40), self.child.as_mut().unwrap().wait())
            .await
            .expect("exits within 40 s of SIGTERM")
            .unwrap()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    /// Uploads a dataset, waits for it to be processed, creates a job; returns the job id.
    async fn create_job(&self, examples: usize, hyperparameters: Value) -> String {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part(
                "file",
                reqwest::multipart::Part::bytes(dataset(examples)).file_name("train.jsonl"),
            );
        let file: Value = self
            .client
            .post(format!("{}/v1/files", self.base))
            .bearer_auth(ADMIN_KEY)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let file_id = file["id"].as_str().unwrap().to_owned();
        self.wait(
            &format!("/v1/files/{file_id}"),
            Duration::from_secs(20),
            |f| f["status"] == "processed",
        )
        .await;
        let res = self
            .client
            .post(format!("{}/v1/fine_tuning/jobs", self.base))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"model": MODEL, "training_file": file_id,
                          "hyperparameters": hyperparameters}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn wait(&self, path: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} not done within {within:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// (attempt, worker_id, first and last event time, metrics steps) per attempt of a job.
struct AttemptHistory {
    attempt: i32,
    workers: Vec<String>,
    first: chrono::DateTime<chrono::Utc>,
    last: chrono::DateTime<chrono::Utc>,
    steps: Vec<i64>,
}

/// (attempt, worker_id, created_at, step) of one event.
type EventTrace = (
    i32,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
    Option<i64>,
);

async fn history(pool: &sqlx::PgPool, job: &str) -> Vec<AttemptHistory> {
    let rows: Vec<EventTrace> = sqlx::query_as(
        "SELECT attempt, worker_id, created_at, step FROM fine_tuning_job_events
             WHERE job_id = $1 AND attempt > 0 ORDER BY seq",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: Vec<AttemptHistory> = Vec::new();
    for (attempt, worker, at, step) in rows {
        if out.last().is_none_or(|h| h.attempt != attempt) {
            assert!(
                out.iter().all(|h| h.attempt < attempt),
                "attempts never interleave: attempt {attempt} wrote after a later one"
            );
            out.push(AttemptHistory {
                attempt,
                workers: Vec::new(),
                first: at,
                last: at,
                steps: Vec::new(),
            });
        }
        let h = out.last_mut().unwrap();
        if let Some(w) = worker
            && !h.workers.contains(&w)
        {
            h.workers.push(w);
        }
        h.first = h.first.min(at);
        h.last = h.last.max(at);
        h.steps.extend(step);
    }
    out
}

#[tokio::test]
async fn a_job_whose_process_is_killed_is_finished_by_another_from_its_last_checkpoint() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let first = Helper::start(&db.url, dir.path(), 20_000).await;
    let id = first
        .create_job(
            20,
            json!({"n_epochs": 10, "batch_size": 2, "checkpoint_every_steps": 7}),
        )
        .await;
    let path = format!("/v1/fine_tuning/jobs/{id}");
    // Past a checkpoint and a few steps beyond it.
    first
        .wait(&path, Duration::from_secs(60), |j| {
            j["progress"]["step"].as_u64().is_some_and(|s| s >= 17)
        })
        .await;
    first.kill9().await;
    // A COMMIT the process sent just before it died still completes in its PostgreSQL
    // backend: give such a checkpoint row a moment to land before reading the latest one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (ckpt_at_kill,): (i64,) =
        sqlx::query_as("SELECT max(step) FROM fine_tuning_job_checkpoints WHERE job_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(ckpt_at_kill >= 14);

    let second = Helper::start(&db.url, dir.path(), 20_000).await;
    let job = second
        .wait(&path, Duration::from_secs(120), |j| {
            j["status"] == "succeeded" || j["status"] == "failed"
        })
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2);
    // The killed attempt's scratch space went when the next attempt began.
    let scratch = dir
        .path()
        .join("artifacts/tmp")
        .join(format!("{id}-attempt-1"));
    assert!(!scratch.exists(), "{} was left behind", scratch.display());

    let attempts = history(&pool, &id).await;
    assert_eq!(attempts.len(), 2);
    let (a1, a2) = (&attempts[0], &attempts[1]);
    assert_eq!(a1.workers.len(), 1, "one process per attempt");
    assert_eq!(a2.workers.len(), 1);
    assert_ne!(a1.workers, a2.workers, "another process finished it");
    assert!(
        a1.last < a2.first,
        "the two processes never trained at the same time"
    );
    // The second attempt resumed right after the checkpoint: no step before it was repeated.
    assert_eq!(a2.steps.first().copied(), Some(ckpt_at_kill + 1));
    assert_eq!(a2.steps.last().copied(), Some(100));
    assert!(a2.steps.windows(2).all(|w| w[1] == w[0] + 1));
    let (resumed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM fine_tuning_job_events WHERE job_id = $1 AND attempt = 2
           AND message = 'Resumed from the checkpoint of step ' || $2",
    )
    .bind(&id)
    .bind(ckpt_at_kill)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(resumed, 1);

    // Fencing: the dead attempt's writes can no longer land.
    let queue = Queue::new(
        &kiln::store::Store::connect(&db.url).await.unwrap(),
        QueueConfig::default(),
    );
    let stale = Lease {
        job_id: id.clone(),
        attempt: 1,
        worker_id: a1.workers[0].clone(),
    };
    assert_eq!(queue.heartbeat(&stale).await.unwrap(), None);
    let event = NewEvent {
        level: "info",
        kind: "message",
        message: "from a zombie".into(),
        data: None,
        step: None,
        created_at: chrono::Utc::now(),
    };
    assert!(!queue.append_events(&stale, &[event]).await.unwrap());
    assert_eq!(queue.release_job(&stale).await.unwrap(), None);
    let error = json!({"code": "x", "message": "zombie", "param": null});
    assert_eq!(queue.fail_job(&stale, &error, false).await.unwrap(), None);
    let (state,): (String,) = sqlx::query_as("SELECT state FROM fine_tuning_jobs WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "succeeded");
    assert!(second.terminate().await.success());
}

#[tokio::test]
async fn sigterm_checkpoints_and_requeues_without_charging_an_attempt() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let first = Helper::start(&db.url, dir.path(), 20_000).await;
    let id = first
        .create_job(
            20,
            json!({"n_epochs": 6, "batch_size": 2, "checkpoint_every_steps": 1000}),
        )
        .await;
    let path = format!("/v1/fine_tuning/jobs/{id}");
    first
        .wait(&path, Duration::from_secs(60), |j| {
            j["progress"]["step"].as_u64().is_some_and(|s| s >= 5)
        })
        .await;
    let status = first.terminate().await;
    assert!(status.success(), "{status:?}");

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (state, failed, ckpt): (String, i32, Option<i64>) = sqlx::query_as(
        "SELECT state, failed_attempts,
                (SELECT max(step) FROM fine_tuning_job_checkpoints WHERE job_id = j.id)
         FROM fine_tuning_jobs j WHERE id = $1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(state, "queued", "requeued at once, not left to the reaper");
    assert_eq!(failed, 0, "a shutdown is not charged as a failed attempt");
    let ckpt = ckpt.expect("the shutdown saved a checkpoint");
    assert!(ckpt >= 5);

    let second = Helper::start(&db.url, dir.path(), 20_000).await;
    let job = second
        .wait(&path, Duration::from_secs(120), |j| {
            j["status"] == "succeeded"
        })
        .await;
    assert_eq!(job["attempt"], 2);
    let attempts = history(&pool, &id).await;
    assert_eq!(attempts[1].steps.first().copied(), Some(ckpt + 1));
    assert!(second.terminate().await.success());
}

/// Runs `pg_ctl` on a data directory as its owner (PostgreSQL refuses to run as root).
fn pg_ctl(data: &Path, args: &[&str]) {
    let bin =
        kiln::embedded_pg::find_binaries(&kiln::embedded_pg::BinarySearch::from_environment())
            .unwrap();
    let mut cmd = std::process::Command::new(bin.pg_ctl());
    cmd.args(args).arg("-D").arg(data).current_dir("/");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(data).unwrap();
        cmd.uid(meta.uid()).gid(meta.gid());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg_ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_job_survives_postgres_going_away_and_the_api_answers_503_meanwhile() {
    // A private cluster: stopping the machine's shared server would disturb other tests.
    let root = std::env::temp_dir().join(format!("kiln-jobs-pg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&root).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let pg = kiln::embedded_pg::EmbeddedPostgres::start(&root)
        .await
        .unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let running = server::start(settings(
        pg.url(),
        data_dir.path(),
        20_000,
        Duration::from_secs(30),
    ))
    .await
    .unwrap();
    let helper = Helper {
        child: None,
        base: format!("http://{}", running.addr),
        client: reqwest::Client::new(),
    };
    let id = helper
        .create_job(
            20,
            json!({"n_epochs": 8, "batch_size": 2, "checkpoint_every_steps": 10}),
        )
        .await;
    let path = format!("/v1/fine_tuning/jobs/{id}");
    helper
        .wait(&path, Duration::from_secs(60), |j| {
            j["progress"]["step"].as_u64().is_some_and(|s| s >= 3)
        })
        .await;

    pg_ctl(pg.data_dir(), &["stop", "-m", "fast", "-w"]);
    let (status, body) = helper.get(&path).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable");
    let (status, _) = helper.get("/readyz").await;
    assert_eq!(status, 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port = pg.port().to_string();
    let log = root.join("pg/postgres.log");
    pg_ctl(
        pg.data_dir(),
        &[
            "start",
            "-w",
            "-l",
            log.to_str().unwrap(),
            "-o",
            &format!("-p {port}"),
        ],
    );

    // The API recovers by itself and the job still succeeds, every step recorded once.
    let job = helper
        .wait(&path, Duration::from_secs(120), |j| {
            j["status"] == "succeeded" || j["status"] == "failed"
        })
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let pool = sqlx::PgPool::connect(pg.url()).await.unwrap();
    let attempts = history(&pool, &id).await;
    let steps: Vec<i64> = attempts.iter().flat_map(|a| a.steps.clone()).collect();
    assert_eq!(*steps.last().unwrap(), 80);
    let mut unique = steps.clone();
    unique.dedup();
    assert!(unique.windows(2).all(|w| w[1] > w[0]), "{steps:?}");
    pool.close().await;
    running.shutdown().await.unwrap();
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn the_official_client_runs_a_whole_job() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let kiln = Helper::start(&db.url, dir.path(), 5_000).await;
    let output = tokio::process::Command::new("python3")
        .arg(format!(
            "{}/tests/python/openai_jobs.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("OPENAI_BASE_URL", format!("{}/v1", kiln.base))
        .env("OPENAI_API_KEY", ADMIN_KEY)
        .env("KILN_TEST_MODEL", MODEL)
        .output()
        .await
        .expect("python3 is needed for the client conformance tests");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "install the client first: pip install -r tests/python/requirements.txt"
    );
    assert!(
        output.status.success(),
        "openai_jobs.py failed:\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(kiln.terminate().await.success());
}
