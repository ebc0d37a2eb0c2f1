//! The web dashboard at `/`: served from the binary without a key, with a strict
//! Content-Security-Policy, next to an unchanged API; and used in a real headless Chromium
//! (tests/browser/dashboard.mjs, Playwright) against a real kiln training a real (tiny) model:
//! sign in, watch a running job's loss curve grow live, cancel it, read a finished
//! classifier's confusion matrix, the files' validation results, try the fine-tuned model,
//! chat with a decoder and classify images with an image classifier.
//!
//! The browser part needs Node.js, Chromium (`/usr/bin/chromium`, or `CHROMIUM`) and
//! `npm ci` in tests/browser; `.ci/run` installs them. Without them the test fails when `CI`
//! is set and is skipped (saying why) otherwise.

mod common;
mod jobs_support;
mod train_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ADMIN_KEY, KilnProcess, TestApp, TestDatabase, assert_error_shape};
use jobs_support::{post_json, wait_for};
use kiln::nn::tiny::TinyLayout;
use serde_json::{Value, json};

const BASE: &str = "kiln-test/tiny-bert";
/// A base image classifier (a tiny ResNet with labels) the browser classifies images with.
const IMAGE_MODEL: &str = "kiln-test/tiny-resnet";
const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

fn web_file(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("web").join(name)).unwrap()
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn the_dashboard_is_served_without_a_key_and_the_api_is_unchanged() {
    let app = TestApp::spawn().await;
    let client = &app.client;

    let page = client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    let csp = header(&page, "content-security-policy").to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("http") && !csp.contains("unsafe"), "{csp}");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    let etag = header(&page, "etag").to_owned();
    let html = page.bytes().await.unwrap();
    assert_eq!(
        html,
        web_file("index.html"),
        "the binary serves web/index.html"
    );

    for (name, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let res = client
            .get(app.url(&format!("/assets/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{name}");
        assert_eq!(header(&res, "content-type"), content_type, "{name}");
        assert!(!header(&res, "content-security-policy").is_empty());
        assert_eq!(res.bytes().await.unwrap(), web_file(name), "{name}");
    }

    // The browser revalidates its copy and gets an empty 304 while it is current.
    let again = client
        .get(app.url("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert!(again.bytes().await.unwrap().is_empty());

    // Unknown assets and routes keep the API's 404 body; the API still wants its key.
    for path in [
        "/assets/nope.js",
        "/assets/../Cargo.toml",
        "/nope",
        "/v1/nope",
    ] {
        let res = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(
            assert_error_shape(&body)["code"],
            "unknown_route",
            "{path}: {body}"
        );
    }
    let res = client.get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    let res = client.post(app.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    app.shutdown().await;
}

#[tokio::test]
async fn a_dashboard_directory_replaces_the_embedded_page_for_development() {
    let db = TestDatabase::create().await;
    let data = tempfile::tempdir().unwrap();
    let web = tempfile::tempdir().unwrap();
    std::fs::write(web.path().join("index.html"), "<p>edited</p>").unwrap();
    let server = KilnProcess::serve(&[
        ("DATABASE_URL", &db.url),
        ("KILN_DATA_DIR", data.path().to_str().unwrap()),
        ("KILN_ADMIN_KEY", ADMIN_KEY),
        ("KILN_WORKERS", "0"),
        ("KILN_DASHBOARD_DIR", web.path().to_str().unwrap()),
    ])
    .await;
    let client = reqwest::Client::new();
    let page = client
        .get(format!("{}/", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.text().await.unwrap(),
        "<p>edited</p>",
        "read from disk"
    );
    // Files missing from the directory fall back to the embedded copy.
    let css = client
        .get(format!("{}/assets/app.css", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(css.bytes().await.unwrap(), web_file("app.css"));
    assert!(server.terminate().await.success());
}

/// Node, Chromium and playwright-core, or why they cannot be used.
fn browser_tools() -> Result<PathBuf, String> {
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()));
    if !chromium.is_file() {
        return Err(format!(
            "no Chromium at {} (apt-get install chromium, or set CHROMIUM)",
            chromium.display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("no working `node` on PATH (apt-get install nodejs)".to_owned());
    }
    if !Path::new(BROWSER_DIR)
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Err(format!(
            "playwright-core is not installed: run `npm ci` in {BROWSER_DIR}"
        ));
    }
    Ok(chromium)
}

/// Where screenshots go: `target/dashboard-screenshots` (of the target directory in use).
fn screenshot_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KILN_SCREENSHOT_DIR") {
        return PathBuf::from(dir);
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("dashboard-screenshots")
}

async fn upload_jsonl(app: &TestApp, key: &str, name: &str, bytes: Vec<u8>) -> Value {
    let res = app.upload(key, "fine-tune", name, bytes).await;
    assert_eq!(res.status(), 200);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_validated(key, &id).await
}

async fn sentiment_file(app: &TestApp, key: &str, name: &str, n: usize, seed: u64) -> String {
    let path = app.data_dir.path().join(format!("{name}-{seed}"));
    train_support::sentiment_jsonl(&path, n, seed);
    let file = upload_jsonl(app, key, name, std::fs::read(&path).unwrap()).await;
    assert_eq!(file["status"], "processed", "{file}");
    file["id"].as_str().unwrap().to_owned()
}

async fn create_job(app: &TestApp, key: &str, train: &str, valid: &str, hp: Value) -> String {
    let (status, job) = post_json(
        app,
        key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": BASE,
            "training_file": train,
            "validation_file": valid,
            "suffix": "sentiment",
            "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR"
    );
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (be(16), be(20))
}

#[tokio::test]
async fn a_person_watches_a_job_train_and_cancels_it_in_a_real_browser() {
    let chromium = match browser_tools() {
        Ok(c) => c,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!(
                "CI is set, so the browser test must run, but {why}. .ci/run installs what it needs."
            )
        }
        Err(why) => {
            eprintln!("SKIPPED the browser test of the dashboard: {why}");
            return;
        }
    };
    let app = TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        kiln::nn::tiny::write_tiny_decoder(&s.models_dir.join("kiln-test/tiny-qwen2"), "qwen2", 5)
            .expect("a tiny decoder");
        kiln::nn::resnet::write_tiny_resnet(
            &s.models_dir.join(IMAGE_MODEL),
            &kiln::nn::resnet::tiny_resnet_config(),
            5,
        )
        .expect("a tiny ResNet");
        s.jobs.poll_interval = Duration::from_millis(300);
    })
    .await;
    let key = app.key_for("dashboard").await;
    // A base ResNet with id2label is an image classifier the server serves as it is.
    let (status, image_model) = app
        .get_json(&key, &format!("/v1/models/{IMAGE_MODEL}"))
        .await;
    assert_eq!(status, 200, "{image_model}");
    assert_eq!(image_model["task"], "image_classification", "{image_model}");
    assert_eq!(image_model["labels"], json!(["cat", "dog", "bird"]));
    let train = sentiment_file(&app, &key, "reviews-train.jsonl", 160, 1).await;
    let valid = sentiment_file(&app, &key, "reviews-valid.jsonl", 40, 2).await;
    // The tiny model trains ~3,000 examples a second on two cores: big batches of a big
    // file make a job that runs for a couple of minutes, at ~13 steps a second.
    let big = sentiment_file(&app, &key, "reviews-large.jsonl", 3840, 4).await;
    let broken = upload_jsonl(
        &app,
        &key,
        "broken.jsonl",
        b"{\"text\": \"great\", \"label\": \"pos\"}\n{\"text\": \"bad\"\n{\"label\": \"neg\"}\n"
            .to_vec(),
    )
    .await;
    assert_eq!(broken["status"], "error", "{broken}");

    // A classifier that finishes first (its model and checkpoints are then served), and a
    // long job the browser watches and cancels. One training slot: the second waits.
    let done = create_job(
        &app,
        &key,
        &train,
        &valid,
        json!({"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-3,
               "eval_every_steps": 10, "checkpoint_every_steps": 20}),
    )
    .await;
    let running = create_job(
        &app,
        &key,
        &big,
        &valid,
        json!({"n_epochs": 100, "batch_size": 256, "learning_rate": 1e-3, "head_learning_rate": 1e-3,
               "eval_every_steps": 10, "checkpoint_every_steps": 50}),
    )
    .await;
    let finished = wait_for(&app, &key, &done, Duration::from_secs(180), |j| {
        ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
    })
    .await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    wait_for(&app, &key, &running, Duration::from_secs(60), |j| {
        j["status"] == "running"
    })
    .await;

    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);
    let script = tokio::process::Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(BROWSER_DIR)
        .env("KILN_URL", &app.base)
        .env("KILN_KEY", &key)
        .env("KILN_RUNNING_JOB", &running)
        .env("KILN_DONE_JOB", &done)
        .env("KILN_BROKEN_FILE", broken["id"].as_str().unwrap())
        .env("KILN_IMAGE_MODEL", IMAGE_MODEL)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(420), script)
        .await
        .expect("the browser script finishes within 7 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the browser session failed ({}); screenshots in {}\n{stdout}\n{stderr}",
        output.status,
        shots.display()
    );

    // What the browser did reached the server: the job was cancelled, not finished.
    let (_, job) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{running}"))
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["fine_tuned_model"].is_null());
    for name in [
        "01-sign-in.png",
        "02-jobs.png",
        "04-job-running.png",
        "06-job-cancelled.png",
        "07-job-succeeded.png",
        "08-files.png",
        "09-models.png",
        "11-models-image.png",
    ] {
        let (width, height) = png_size(&shots.join(name));
        assert_eq!(width, 1440, "{name}");
        assert!(height >= 900, "{name}: {height}");
    }
    app.shutdown().await;
}
