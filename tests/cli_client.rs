//! The command-line client as a person or a script runs it: the real `kiln` binary against a
//! real server (real PostgreSQL, real HTTP, kiln's engine training a tiny BERT).

mod common;
mod train_support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::TestApp;
use kiln::nn::tiny::TinyLayout;
use serde_json::Value;

const BASE: &str = "kiln-test/tiny-bert";

async fn app() -> TestApp {
    TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.jobs.poll_interval = Duration::from_millis(200);
    })
    .await
}

/// `kiln ARGS` with the server's URL and a key in the environment, as a user sets them.
fn command(url: &str, key: Option<&str>, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env("KILN_URL", url)
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_MODELS_DIR")
        .env_remove("KILN_DATA_DIR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(key) = key {
        cmd.env("KILN_API_KEY", key);
    }
    cmd
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts exit status 0 and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self}");
        &self.stdout
    }

    /// Asserts a failure with an `error: ` line on stderr and returns stderr.
    fn failed(&self) -> &str {
        assert_eq!(self.code, Some(1), "{self}");
        assert!(self.stderr.starts_with("error: "), "{self}");
        assert!(!self.stderr.contains("panicked"), "{self}");
        &self.stderr
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

async fn kiln(app: &TestApp, key: &str, args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        command(&app.base, Some(key), args).output(),
    )
    .await
    .expect("kiln finishes within 120 s")
    .expect("run kiln");
    Run::from(out)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Uploads `n` sentiment lines with `files upload --wait --json`; returns the file id.
async fn upload_sentiment(app: &TestApp, key: &str, n: usize, seed: u64) -> String {
    let path = app
        .data_dir
        .path()
        .join(format!("sentiment-{n}-{seed}.jsonl"));
    train_support::sentiment_jsonl(&path, n, seed);
    let file = kiln(
        app,
        key,
        &[
            "files",
            "upload",
            path.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(file["status"], "processed", "{file}");
    file["id"].as_str().unwrap().to_owned()
}

async fn create_job(app: &TestApp, key: &str, file: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "jobs",
        "create",
        "--model",
        BASE,
        "--training-file",
        file,
        "--suffix",
        "cli",
        "--seed",
        "11",
        "--json",
    ];
    args.extend_from_slice(extra);
    let job = kiln(app, key, &args).await.json();
    assert_eq!(job["model"], BASE, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

async fn job_status(app: &TestApp, key: &str, id: &str) -> Value {
    kiln(app, key, &["jobs", "get", id, "--json"]).await.json()
}

#[tokio::test]
async fn files_are_uploaded_validated_listed_shown_and_deleted() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let path = write(
        app.data_dir.path(),
        "train.jsonl",
        &common::classification_jsonl(20),
    );

    // A person uploads and waits for the verdict.
    let run = kiln(
        &app,
        &key,
        &["files", "upload", path.to_str().unwrap(), "--wait"],
    )
    .await;
    let out = run.ok();
    assert!(out.contains("uploaded file-"), "{run}");
    assert!(
        out.contains("processed: ok: 20 text_classification examples, 2 labels"),
        "{run}"
    );
    assert!(out.contains("negative: 10, positive: 10"), "{run}");
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("file-"))
        .unwrap()
        .to_owned();

    // A script lists and reads it as JSON.
    let list = kiln(&app, &key, &["files", "list", "--json"]).await.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()], "{list}");
    let file = kiln(&app, &key, &["files", "get", &id, "--json"])
        .await
        .json();
    assert_eq!(file["id"], id.as_str());
    assert_eq!(file["validation"]["examples"], 20, "{file}");

    // The table has a header and one aligned row per file.
    let run = kiln(&app, &key, &["files", "list"]).await;
    let lines: Vec<&str> = run.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{run}");
    assert!(lines[0].starts_with("ID "), "{run}");
    assert!(lines[1].starts_with(&id), "{run}");
    let status_column = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[1][status_column..status_column + 9], "processed");
    let run = kiln(&app, &key, &["files", "get", &id]).await;
    assert!(run.ok().contains("train.jsonl"), "{run}");
    assert!(run.ok().contains("text_classification"), "{run}");

    // Invalid data: the verdict names the line, and --wait makes it a failure.
    let broken = write(
        app.data_dir.path(),
        "broken.jsonl",
        b"{\"text\": \"great\", \"label\": \"pos\"}\n{\"text\": \"bad\"\n",
    );
    let run = kiln(
        &app,
        &key,
        &["files", "upload", broken.to_str().unwrap(), "--wait"],
    )
    .await;
    assert!(run.failed().contains("failed validation: line 2"), "{run}");
    assert!(run.stdout.contains(" error: "), "{run}");

    // Deleted, it is gone: the server's 404 is printed with its param and code.
    let run = kiln(&app, &key, &["files", "rm", &id]).await;
    assert_eq!(run.ok().trim(), format!("deleted {id}"));
    let run = kiln(&app, &key, &["files", "get", &id]).await;
    assert_eq!(
        run.failed().trim(),
        format!("error: No such file: '{id}' (param: file_id, code: not_found)")
    );
    let run = kiln(&app, &key, &["files", "upload", "/no/such/file.jsonl"]).await;
    assert!(
        run.failed().contains("cannot read /no/such/file.jsonl"),
        "{run}"
    );
    app.shutdown().await;
}

/// A file larger than `--part-size` goes through the Uploads API in parts, MD5 checked,
/// and becomes an ordinary validated file; a server that refuses the upload leaves no
/// upload pending.
#[tokio::test]
async fn a_large_file_is_uploaded_in_parts() {
    let app = TestApp::spawn_with(|s| s.api.max_large_upload_bytes = 4000).await;
    let key = app.key_for("acme").await;
    let data = common::classification_jsonl(40);
    assert!(data.len() > 1500 && data.len() <= 4000, "{}", data.len());
    let path = write(app.data_dir.path(), "train.jsonl", &data);
    let run = kiln(
        &app,
        &key,
        &[
            "files",
            "upload",
            path.to_str().unwrap(),
            "--part-size",
            "500",
            "--wait",
            "--json",
        ],
    )
    .await;
    let file = run.json();
    assert_eq!(file["status"], "processed", "{run}");
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["validation"]["examples"], 40, "{file}");
    let id = file["id"].as_str().unwrap();
    assert_eq!(app.file_content(&key, id).await, data);
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let uploads: Vec<(String, String)> =
        sqlx::query_as("SELECT status, coalesce(file_id, '') FROM uploads")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(uploads, [("completed".to_owned(), id.to_owned())]);

    // Over the server's limit: refused at once, the limit named.
    let big = write(
        app.data_dir.path(),
        "big.jsonl",
        &common::classification_jsonl(200),
    );
    let run = kiln(
        &app,
        &key,
        &[
            "files",
            "upload",
            big.to_str().unwrap(),
            "--part-size",
            "500",
        ],
    )
    .await;
    assert!(run.failed().contains("at most 4000 bytes"), "{run}");
    let run = kiln(
        &app,
        &key,
        &[
            "files",
            "upload",
            path.to_str().unwrap(),
            "--part-size",
            "0",
        ],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run}");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM uploads WHERE status = 'pending'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_job_created_and_watched_from_the_cli_trains_and_its_model_is_served() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let file = upload_sentiment(&app, &key, 120, 1).await;
    let id = create_job(
        &app,
        &key,
        &file,
        &[
            "--hyperparameters",
            r#"{"n_epochs": 6, "batch_size": 8}"#,
            "-H",
            "learning_rate=3e-3",
            "-H",
            "head_learning_rate=3e-3",
        ],
    )
    .await;

    // Without a terminal, watch prints progress lines; it exits 0 once the job succeeds.
    let run = kiln(&app, &key, &["jobs", "watch", &id]).await;
    let out = run.ok();
    assert!(out.contains("Created fine-tuning job"), "{run}");
    let progress: Vec<&str> = out.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(
        progress
            .iter()
            .any(|l| l.contains("loss ") && l.contains(" ex/s") && l.contains(" ETA ")),
        "{run}"
    );
    let last = out.lines().rev().find(|l| l.contains("succeeded")).unwrap();
    assert!(
        last.starts_with(&format!("{id} succeeded: ft:{BASE}:")),
        "{run}"
    );
    assert!(out.contains("valid_accuracy"), "{run}");

    // What the job used comes back from `get`, the hyperparameters merged from both flags.
    let job = job_status(&app, &key, &id).await;
    assert_eq!(job["status"], "succeeded");
    let hp = &job["method"]["supervised"]["hyperparameters"];
    assert_eq!(hp["n_epochs"], 6, "{hp}");
    assert_eq!(hp["learning_rate"], 3e-3, "{hp}");
    let model = job["fine_tuned_model"].as_str().unwrap().to_owned();
    let run = kiln(&app, &key, &["jobs", "get", &id]).await;
    assert!(run.ok().contains(&model), "{run}");
    assert!(run.ok().contains("strategy=full"), "{run}");

    // With --json, watch is a stream of JSON lines: every event, then the job.
    let run = kiln(&app, &key, &["jobs", "watch", &id, "--json"]).await;
    let lines: Vec<Value> = run
        .ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.iter().any(|e| e["type"] == "metrics"), "{run}");
    assert_eq!(lines.last().unwrap()["status"], "succeeded", "{run}");

    let listed = kiln(
        &app,
        &key,
        &["jobs", "list", "--status", "succeeded", "--json"],
    )
    .await
    .json();
    assert_eq!(listed["data"][0]["id"], id.as_str(), "{listed}");
    let listed = kiln(
        &app,
        &key,
        &["jobs", "list", "--status", "running", "--json"],
    )
    .await
    .json();
    assert_eq!(listed["data"], serde_json::json!([]), "{listed}");
    let run = kiln(&app, &key, &["jobs", "events", &id]).await;
    assert!(run.ok().contains("Step "), "{run}");

    // The model is listed and served; classify prints a label and score per input.
    let models = kiln(&app, &key, &["models", "list", "--json"]).await.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&BASE) && ids.contains(&model.as_str()),
        "{ids:?}"
    );
    let run = kiln(&app, &key, &["models", "list"]).await;
    assert!(run.ok().contains("fine_tuned"), "{run}");
    let run = kiln(
        &app,
        &key,
        &[
            "classify",
            "--model",
            &model,
            "the movie was great and wonderful",
            "awful boring plot",
        ],
    )
    .await;
    let rows: Vec<&str> = run.ok().lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{run}");
    assert!(rows[0].starts_with("positive "), "{run}");
    assert!(rows[1].starts_with("negative "), "{run}");
    let answer = kiln(
        &app,
        &key,
        &["classify", "--model", &model, "great", "--json"],
    )
    .await
    .json();
    assert_eq!(answer["data"][0]["label"], "positive", "{answer}");

    // Removing the model: its id has `/` and `:`, and it goes through as one path segment.
    let run = kiln(&app, &key, &["models", "rm", &model]).await;
    assert_eq!(run.ok().trim(), format!("deleted {model}"));
    let run = kiln(&app, &key, &["models", "get", &model]).await;
    assert!(run.failed().contains("does not exist"), "{run}");
    assert!(run.failed().contains("code: not_found"), "{run}");
    let run = kiln(&app, &key, &["models", "rm", BASE]).await;
    assert!(
        run.failed().contains("code: base_model_not_deletable"),
        "{run}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn jobs_are_paused_resumed_and_cancelled_and_watch_reports_the_cancel() {
    let app = app().await;
    let key = app.key_for("acme").await;
    // Long enough (about a minute) that it is still running when it is cancelled.
    let file = upload_sentiment(&app, &key, 1000, 3).await;
    let long = create_job(
        &app,
        &key,
        &file,
        &["-H", "n_epochs=100", "-H", "batch_size=4"],
    )
    .await;

    let watcher = command(&app.base, Some(&key), &["jobs", "watch", &long])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let job = job_status(&app, &key, &long).await;
        if job["status"] == "running" && job["progress"]["step"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The one slot is busy: a second job waits in the queue, where it can be paused.
    let queued = create_job(&app, &key, &file, &[]).await;
    let run = kiln(&app, &key, &["jobs", "pause", &queued]).await;
    assert_eq!(run.ok().trim(), format!("{queued} paused"));
    let paused = kiln(
        &app,
        &key,
        &["jobs", "list", "--status", "paused", "--json"],
    )
    .await
    .json();
    assert_eq!(paused["data"].as_array().unwrap().len(), 1, "{paused}");
    assert_eq!(paused["data"][0]["id"], queued.as_str());
    let run = kiln(&app, &key, &["jobs", "list"]).await;
    let row = run.ok().lines().find(|l| l.starts_with(&queued)).unwrap();
    assert!(row.contains(" paused "), "{run}");
    let run = kiln(&app, &key, &["jobs", "resume", &queued]).await;
    assert_eq!(run.ok().trim(), format!("{queued} queued"));
    let run = kiln(&app, &key, &["jobs", "resume", &queued]).await;
    assert!(run.failed().contains("is not paused"), "{run}");
    let run = kiln(&app, &key, &["jobs", "cancel", &queued]).await;
    assert_eq!(run.ok().trim(), format!("{queued} cancelled"));

    // Cancelling the running job ends its watcher with an error.
    let run = kiln(&app, &key, &["jobs", "cancel", &long]).await;
    let out = run.ok();
    assert!(
        out.contains("cancelling") || out.contains("cancelled"),
        "{run}"
    );
    let watched = tokio::time::timeout(Duration::from_secs(30), watcher.wait_with_output())
        .await
        .expect("watch ends once the job is cancelled")
        .unwrap();
    let watched = Run::from(watched);
    assert_eq!(
        watched.failed().trim(),
        format!("error: job {long} was cancelled")
    );
    assert!(watched.stdout.contains("status: "), "{watched}");
    assert!(watched.stdout.contains("step "), "{watched}");
    app.shutdown().await;
}

#[tokio::test]
async fn watching_a_job_that_fails_prints_its_error_and_exits_non_zero() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let file = upload_sentiment(&app, &key, 40, 1).await;
    let id = create_job(&app, &key, &file, &["-H", "max_length=1000"]).await;
    let run = kiln(&app, &key, &["jobs", "watch", &id]).await;
    let stderr = run.failed();
    assert!(
        stderr.starts_with(&format!("error: job {id} failed: ")),
        "{run}"
    );
    assert!(stderr.contains("max_length"), "{run}");
    app.shutdown().await;
}

#[tokio::test]
async fn mistakes_and_unreachable_servers_get_clear_errors() {
    let app = app().await;
    let key = app.key_for("acme").await;

    let run = kiln(&app, "sk-kiln-wrong", &["files", "list"]).await;
    assert_eq!(
        run.failed().lines().next().unwrap(),
        "error: Incorrect API key provided. (code: invalid_api_key)"
    );
    assert!(run.stderr.contains("hint: pass a valid key"), "{run}");

    let out = command(&app.base, None, &["jobs", "list"])
        .output()
        .await
        .unwrap();
    let run = Run::from(out);
    assert!(
        run.failed().contains("no API key: set KILN_API_KEY"),
        "{run}"
    );

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = command(&url, Some(&key), &["models", "list"])
        .output()
        .await
        .unwrap();
    let run = Run::from(out);
    assert!(
        run.failed()
            .starts_with(&format!("error: cannot reach kiln at {url}/: ")),
        "{run}"
    );

    let run = kiln(&app, &key, &["jobs", "get", "ftjob-nope"]).await;
    assert_eq!(
        run.failed().trim(),
        "error: No such fine-tuning job: 'ftjob-nope' (param: fine_tuning_job_id, code: not_found)"
    );
    let run = kiln(
        &app,
        &key,
        &[
            "jobs",
            "create",
            "--model",
            "no/such-model",
            "--training-file",
            "file-x",
        ],
    )
    .await;
    assert!(
        run.failed()
            .contains("(param: model, code: model_not_found)"),
        "{run}"
    );
    let run = kiln(
        &app,
        &key,
        &[
            "jobs",
            "create",
            "--model",
            BASE,
            "--training-file",
            "f",
            "-H",
            "oops",
        ],
    )
    .await;
    assert!(
        run.failed()
            .contains("-H/--set expects KEY=VALUE, got 'oops'"),
        "{run}"
    );
    let run = kiln(&app, &key, &["jobs", "list", "--status", "done"]).await;
    assert!(run.failed().contains("not a job status"), "{run}");

    // Chatting with an encoder: the server's 400 comes through as it is, the field named.
    let run = kiln(&app, &key, &["chat", "--model", BASE, "--message", "hello"]).await;
    let stderr = run.failed();
    assert!(
        stderr.starts_with("error: model 'kiln-test/tiny-bert' (bert) is not a generative model")
            && stderr.contains("(param: model, code: model_not_supported)"),
        "{run}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn models_list_local_reads_the_models_directory_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    train_support::tiny_model(&dir.path().join(BASE), TinyLayout::Unprefixed);
    // Nothing listens at the URL, and there is no key: --local needs neither.
    let out = command(
        "http://127.0.0.1:9",
        None,
        &[
            "models",
            "list",
            "--local",
            "--models-dir",
            dir.path().to_str().unwrap(),
            "--json",
        ],
    )
    .output()
    .await
    .unwrap();
    let run = Run::from(out);
    let models = run.json();
    assert_eq!(models[0]["id"], BASE, "{run}");
}

#[tokio::test]
async fn a_dry_run_from_the_cli_prints_the_plan_and_queues_nothing() {
    let app = app().await;
    let key = app.key_for("acme").await;
    let file = upload_sentiment(&app, &key, 40, 2).await;
    let base = [
        "jobs",
        "create",
        "--model",
        BASE,
        "--training-file",
        file.as_str(),
        "-H",
        "n_epochs=2",
        "-H",
        "batch_size=8",
        "--dry-run",
    ];
    let run = kiln(&app, &key, &base).await;
    let out = run.ok();
    assert!(out.contains("dry run: nothing was queued"), "{run}");
    assert!(out.contains("text_classification"), "{run}");
    assert!(out.contains("estimated duration:"), "{run}");
    assert!(out.contains("n_epochs=2"), "{run}");
    let mut json_args = base.to_vec();
    json_args.push("--json");
    let plan = kiln(&app, &key, &json_args).await.json();
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert!(
        plan["estimate"]["total_steps"].as_u64().unwrap() >= 2,
        "{plan}"
    );
    let list = kiln(&app, &key, &["jobs", "list", "--json"]).await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    app.shutdown().await;
}
