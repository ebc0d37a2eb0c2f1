//! The artifact store on S3-compatible object storage (a real `moto` server started by each
//! test): blobs and directories round-trip through the bucket; two kiln servers with
//! different data directories share uploads, and an upload in parts sent to both; a job paused by one worker is resumed from its
//! S3 checkpoint by a worker on another data directory.
//!
//! Needs `python3 -m moto.server` (pip package `moto[server]`); without it these tests are
//! skipped with a message.

mod common;
mod jobs_support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::TestApp;
use jobs_support::*;
use kiln::artifacts::Artifacts;
use serde_json::{Value, json};

/// A moto S3 server on a free local port, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Starts moto and waits until it answers; `None` when moto is not installed.
    async fn start() -> Option<Moto> {
        let installed = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            eprintln!("skipping: python3 -m moto.server is not available");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Moto { child, port };
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if client.get(moto.endpoint()).send().await.is_ok() {
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not answer on port {port}");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts an unsigned PUT) and returns the store URL for it,
    /// endpoint and credentials given explicitly rather than through process-wide env.
    async fn bucket(&self, name: &str, prefix: &str) -> String {
        let res = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint()))
            .send()
            .await
            .expect("create bucket");
        assert!(res.status().is_success(), "create bucket: {}", res.status());
        format!(
            "s3://{name}/{prefix}?endpoint={}&allow_http=true&region=us-east-1\
             &access_key_id=test&secret_access_key=test",
            self.endpoint()
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_tree(dir: &Path, out: &mut Vec<(String, Vec<u8>)>, base: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            read_tree(&path, out, base);
        } else {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    read_tree(dir, &mut out, dir);
    out
}

#[tokio::test]
async fn blobs_and_directories_round_trip_through_the_bucket() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let url = moto.bucket("kiln-unit", "some/prefix").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Artifacts::open_setting(Some(url.as_str()), dir_a.path())
        .await
        .unwrap();
    let b = Artifacts::open_setting(Some(url.as_str()), dir_b.path())
        .await
        .unwrap();
    assert!(a.is_remote());

    // A small blob (one PUT) and a large one (multipart), committed on A, read on B.
    let small = b"hello, bucket\n".to_vec();
    let large: Vec<u8> = (0..9 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    for (key, bytes) in [("files/p/small", &small), ("files/p/large", &large)] {
        let mut blob = a.begin().await.unwrap();
        for chunk in bytes.chunks(100_000) {
            blob.write(chunk).await.unwrap();
        }
        a.commit(blob, key).await.unwrap();
        let path = b.local_path(key).await.unwrap();
        assert!(path.starts_with(dir_b.path()), "cached under B's data dir");
        assert_eq!(&std::fs::read(&path).unwrap(), bytes);
        // Cached: a second call gives the same file without going back to the bucket.
        assert_eq!(b.local_path(key).await.unwrap(), path);
    }
    // Nothing is left in A's temporary area.
    assert_eq!(
        std::fs::read_dir(dir_a.path().join("artifact-cache/tmp"))
            .unwrap()
            .count(),
        0
    );
    let mut content = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut a.open("files/p/small").await.unwrap(), &mut content)
        .await
        .unwrap();
    assert_eq!(content, small);

    // Delete on A: gone from the bucket (a fresh cache cannot fetch it).
    a.delete("files/p/small").await.unwrap();
    a.delete("files/p/small").await.unwrap(); // already gone is fine
    let dir_c = tempfile::tempdir().unwrap();
    let c = Artifacts::open_setting(Some(url.as_str()), dir_c.path())
        .await
        .unwrap();
    let err = c.local_path("files/p/small").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        std::fs::read(c.local_path("files/p/large").await.unwrap()).unwrap(),
        large
    );

    // Directories: one object per file; a key that is a prefix of another's name stays apart.
    for (key, marker) in [
        ("checkpoints/j/step-1", "one"),
        ("checkpoints/j/step-10", "ten"),
    ] {
        let src = dir_a.path().join(format!("out-{marker}"));
        std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
        std::fs::write(src.join("state.json"), marker).unwrap();
        std::fs::write(src.join("sub/deeper/weights.bin"), vec![7u8; 1000]).unwrap();
        let expected = tree(&src);
        a.put_dir(&src, key).await.unwrap();
        assert!(!src.exists(), "put_dir moves the directory");
        let fetched = b.local_dir(key).await.unwrap();
        assert_eq!(tree(&fetched), expected);
    }
    let fresh = c.local_dir("checkpoints/j/step-1").await.unwrap();
    assert_eq!(std::fs::read(fresh.join("state.json")).unwrap(), b"one");
    a.delete_dir("checkpoints/j/step-1").await.unwrap();
    let dir_d = tempfile::tempdir().unwrap();
    let d = Artifacts::open_setting(Some(url.as_str()), dir_d.path())
        .await
        .unwrap();
    let err = d.local_dir("checkpoints/j/step-1").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    let ten = d.local_dir("checkpoints/j/step-10").await.unwrap();
    assert_eq!(std::fs::read(ten.join("state.json")).unwrap(), b"ten");
}

#[tokio::test]
async fn two_servers_with_different_data_dirs_share_uploads_through_s3() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let url = moto.bucket("kiln-files", "kiln").await;
    let app_a = TestApp::spawn_with(|s| s.artifacts = Some(url.clone())).await;
    let shared_db = app_a.db.url.clone();
    let app_b = TestApp::spawn_with(|s| {
        s.artifacts = Some(url.clone());
        s.database_url = shared_db;
    })
    .await;
    assert_ne!(app_a.data_dir.path(), app_b.data_dir.path());
    let key = app_a.key_for("acme").await;

    let bytes = dataset(30);
    let res = app_a
        .upload(&key, "fine-tune", "train.jsonl", bytes.clone())
        .await;
    assert_eq!(res.status(), 200);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = app_a.wait_validated(&key, &id).await;
    assert_eq!(file["status"], "processed", "{file}");
    // The bytes live in the bucket, not in A's data dir as a store.
    assert!(!app_a.data_dir.path().join("artifacts/files").exists());

    let res = app_b
        .client
        .get(app_b.url(&format!("/v1/files/{id}/content")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().to_vec(), bytes);

    // Deleting through B removes the object: a fresh store cannot fetch it.
    let storage_key: String = sqlx::query_scalar("SELECT storage_key FROM files WHERE id = $1")
        .bind(&id)
        .fetch_one(&sqlx::PgPool::connect(&app_a.db.url).await.unwrap())
        .await
        .unwrap();
    let res = app_b
        .client
        .delete(app_b.url(&format!("/v1/files/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = Artifacts::open_setting(Some(url.as_str()), probe_dir.path())
        .await
        .unwrap();
    let err = probe.local_path(&storage_key).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);

    app_b.shutdown().await;
    app_a.shutdown().await;
}

/// Behind a load balancer: an upload's parts land on two servers with different data
/// directories, and the one that completes it assembles them from the bucket; the parts'
/// objects are removed afterwards.
#[tokio::test]
async fn an_upload_in_parts_spread_over_two_servers_completes_from_s3() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let url = moto.bucket("kiln-parts", "kiln").await;
    let app_a = TestApp::spawn_with(|s| s.artifacts = Some(url.clone())).await;
    let shared_db = app_a.db.url.clone();
    let app_b = TestApp::spawn_with(|s| {
        s.artifacts = Some(url.clone());
        s.database_url = shared_db;
    })
    .await;
    let key = app_a.key_for("acme").await;
    let bytes = dataset(60);
    let res = app_a
        .client
        .post(app_a.url("/v1/uploads"))
        .bearer_auth(&key)
        .json(&json!({"bytes": bytes.len(), "filename": "train.jsonl",
                      "mime_type": "text/jsonl", "purpose": "fine-tune"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let upload = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut part_ids = Vec::new();
    for (i, chunk) in bytes.chunks(700).enumerate() {
        let app = if i % 2 == 0 { &app_a } else { &app_b };
        let form = reqwest::multipart::Form::new().part(
            "data",
            reqwest::multipart::Part::bytes(chunk.to_vec()).file_name("part"),
        );
        let res = app
            .client
            .post(app.url(&format!("/v1/uploads/{upload}/parts")))
            .bearer_auth(&key)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        part_ids.push(res.json::<Value>().await.unwrap()["id"].clone());
    }
    assert!(part_ids.len() >= 3);
    let pool = sqlx::PgPool::connect(&app_a.db.url).await.unwrap();
    let part_keys: Vec<String> = sqlx::query_scalar("SELECT storage_key FROM upload_parts")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(part_keys.len(), part_ids.len());

    let res = app_b
        .client
        .post(app_b.url(&format!("/v1/uploads/{upload}/complete")))
        .bearer_auth(&key)
        .json(&json!({ "part_ids": part_ids }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let done: Value = res.json().await.unwrap();
    let file_id = done["file"]["id"].as_str().unwrap().to_owned();
    let file = app_a.wait_validated(&key, &file_id).await;
    assert_eq!(file["status"], "processed", "{file}");
    let res = app_a
        .client
        .get(app_a.url(&format!("/v1/files/{file_id}/content")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.bytes().await.unwrap().to_vec(), bytes);

    let probe_dir = tempfile::tempdir().unwrap();
    let probe = Artifacts::open_setting(Some(url.as_str()), probe_dir.path())
        .await
        .unwrap();
    for key in &part_keys {
        let err = probe.local_path(key).await.unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::NotFound,
            "{key} is still stored"
        );
    }
    app_b.shutdown().await;
    app_a.shutdown().await;
}

fn worker_settings(executor: std::sync::Arc<ToyExecutor>) -> kiln::worker::WorkerSettings {
    let mut jobs = kiln::worker::WorkerSettings {
        slots: 1,
        executor: Some(executor),
        poll_interval: Duration::from_millis(500),
        reap_interval: Duration::from_millis(500),
        ..Default::default()
    };
    jobs.queue.lease = Duration::from_secs(3);
    jobs.queue.retry_base = Duration::from_millis(200);
    jobs.queue.retry_max = Duration::from_secs(1);
    jobs
}

#[tokio::test]
async fn a_job_paused_on_one_machine_resumes_on_another_from_its_s3_checkpoint() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let url = moto.bucket("kiln-jobs", "").await;
    // The API alone (no slots); the workers below stand for two other machines.
    let app = TestApp::spawn_with(|s| {
        s.artifacts = Some(url.clone());
        install_model(&s.models_dir);
        s.jobs.slots = 0;
    })
    .await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 20).await;

    let dir_a = machine();
    let worker_a = kiln::server::start_workers_with(
        &app.db.url,
        dir_a.path(),
        dir_a.path().join("models"),
        Some(url.as_str()),
        worker_settings(ToyExecutor::new(20000)),
    )
    .await
    .unwrap();
    let job = create_job(
        &app,
        &key,
        &file,
        json!({"n_epochs": 6, "batch_size": 2, "checkpoint_every_steps": 1000}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    wait_for(&app, &key, &id, Duration::from_secs(60), |j| {
        j["progress"]["step"].as_u64().is_some_and(|s| s >= 5)
    })
    .await;
    let (status, body) = post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{id}/pause")).await;
    assert_eq!(status, 200, "{body}");
    wait_for(&app, &key, &id, Duration::from_secs(20), |j| {
        j["paused"] == true
    })
    .await;
    let (_, ckpts) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{id}/checkpoints"))
        .await;
    let paused_at = ckpts["data"][0]["step_number"]
        .as_u64()
        .expect("pausing saved a checkpoint");
    worker_a.shutdown().await;
    // Machine A is gone, its disk with it.
    drop(dir_a);

    let dir_b = machine();
    let worker_b = kiln::server::start_workers_with(
        &app.db.url,
        dir_b.path(),
        dir_b.path().join("models"),
        Some(url.as_str()),
        worker_settings(ToyExecutor::new(1)),
    )
    .await
    .unwrap();
    let (status, body) = post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{id}/resume")).await;
    assert_eq!(status, 200, "{body}");
    let done = wait_for(&app, &key, &id, Duration::from_secs(120), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events = all_events(&app, &key, &id).await;
    assert!(
        events
            .iter()
            .any(|e| e["message"] == format!("Resumed from the checkpoint of step {paused_at}")),
        "machine B resumed from A's checkpoint: {events:?}"
    );
    worker_b.shutdown().await;

    // The fine-tuned model is in the bucket too.
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = Artifacts::open_setting(Some(url.as_str()), probe_dir.path())
        .await
        .unwrap();
    let model = probe.local_dir(&format!("models/{id}")).await.unwrap();
    assert!(std::fs::read_dir(model).unwrap().count() > 0);
    app.shutdown().await;
}

/// A data directory standing for another machine's disk, with the toy model installed.
fn machine() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    install_model(&dir.path().join("models"));
    dir
}
