//! Test harness: every test gets the real app on port 0 against its own fresh database.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use kiln::server::{self, RunningServer, Settings};
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sqlx::Connection;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// The server used by tests: `KILN_TEST_DATABASE_URL`, else the machine's local PostgreSQL.
pub fn admin_database_url() -> String {
    std::env::var("KILN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database created for one test and dropped after it.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let admin = admin_database_url();
        let name = format!("kiln_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("tests need PostgreSQL: set KILN_TEST_DATABASE_URL or start the local server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b.to_owned(), format!("?{q}")),
            None => (admin.clone(), String::new()),
        };
        let prefix = &base[..base.rfind('/').expect("database URL has a path")];
        TestDatabase {
            url: format!("{prefix}/{name}{query}"),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_database_url()).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub admin_key: String,
    pub data_dir: tempfile::TempDir,
    server: Option<RunningServer>,
    // Declared last: dropped after the server is gone.
    pub db: TestDatabase,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
        let db = TestDatabase::create().await;
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings {
            addr: "127.0.0.1:0".parse().expect("addr"),
            database_url: db.url.clone(),
            data_dir: data_dir.path().to_owned(),
            models_dir: data_dir.path().join("models"),
            admin_key: Some(ADMIN_KEY.to_owned()),
            max_upload_bytes: 8 * 1024 * 1024,
            artifacts: None,
            jobs: Default::default(),
            serve: Default::default(),
            webhooks: Default::default(),
            api: Default::default(),
        };
        configure(&mut settings);
        let running = server::start(settings).await.expect("server starts");
        TestApp {
            base: format!("http://{}", running.addr),
            client: reqwest::Client::new(),
            admin_key: ADMIN_KEY.to_owned(),
            data_dir,
            server: Some(running),
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn store(&self) -> &kiln::store::Store {
        &self.server.as_ref().expect("running").store
    }

    /// A fresh key for a project (created if missing), made through the admin API.
    pub async fn key_for(&self, project: &str) -> String {
        let res = self
            .client
            .post(self.url("/v1/keys"))
            .bearer_auth(&self.admin_key)
            .json(&serde_json::json!({"project": project}))
            .send()
            .await
            .expect("create key");
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.expect("json");
        body["key"].as_str().expect("key").to_owned()
    }

    pub async fn upload(
        &self,
        key: &str,
        purpose: &str,
        filename: &str,
        bytes: Vec<u8>,
    ) -> reqwest::Response {
        let form = Form::new()
            .text("purpose", purpose.to_owned())
            .part("file", Part::bytes(bytes).file_name(filename.to_owned()));
        self.client
            .post(self.url("/v1/files"))
            .bearer_auth(key)
            .multipart(form)
            .send()
            .await
            .expect("upload request")
    }

    pub async fn get_json(&self, key: &str, path: &str) -> (u16, Value) {
        let res = self
            .client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("get");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// A file's bytes, from `GET /v1/files/{id}/content`.
    pub async fn file_content(&self, key: &str, id: &str) -> Vec<u8> {
        let res = self
            .client
            .get(self.url(&format!("/v1/files/{id}/content")))
            .bearer_auth(key)
            .send()
            .await
            .expect("download");
        assert_eq!(res.status(), 200);
        res.bytes().await.expect("body").to_vec()
    }

    /// Polls a file until validation leaves `uploaded`.
    pub async fn wait_validated(&self, key: &str, id: &str) -> Value {
        for _ in 0..200 {
            let (status, file) = self.get_json(key, &format!("/v1/files/{id}")).await;
            assert_eq!(status, 200, "{file}");
            if file["status"] != "uploaded" {
                return file;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("file {id} was not validated within 10 s");
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
    }
}

/// Asserts the OpenAI error shape and returns the error object.
pub fn assert_error_shape(body: &Value) -> &Value {
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message: {body}"
    );
    assert!(err["type"].is_string(), "type: {body}");
    assert!(err.get("param").is_some(), "param present: {body}");
    assert!(err.get("code").is_some(), "code present: {body}");
    err
}

/// `n` lines of a text-classification dataset.
pub fn classification_jsonl(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let label = if i % 2 == 0 { "positive" } else { "negative" };
        out.push_str(&format!(
            "{{\"text\": \"example number {i}\", \"label\": \"{label}\"}}\n"
        ));
    }
    out.into_bytes()
}

/// Files in a directory tree (to prove nothing was left behind).
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A real `kiln` process, for tests of the binary itself (signals, embedded database,
/// the official client).
pub struct KilnProcess {
    pub child: tokio::process::Child,
    pub base: String,
    /// Everything the process printed to stdout before it was listening.
    pub banner: String,
}

impl KilnProcess {
    /// Runs `kiln serve` with the given environment and waits until it prints its address.
    pub async fn serve(envs: &[(&str, &str)]) -> KilnProcess {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("serve")
            .env_remove("DATABASE_URL")
            .env_remove("KILN_ADMIN_KEY")
            .env("KILN_ADDR", "127.0.0.1:0")
            .env("KILN_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kiln");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = String::new();
        let base = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                banner.push_str(&line);
                banner.push('\n');
                if let Some(addr) = line.strip_prefix("kiln listening on ") {
                    return addr.trim().to_owned();
                }
            }
            panic!("kiln exited before listening; stdout:\n{banner}");
        })
        .await
        .expect("kiln listens within 90 s");
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        KilnProcess {
            child,
            base,
            banner,
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("kiln exits within 30 s of SIGTERM")
            .expect("wait")
    }
}

/// One generated multipart body: mostly well-formed uploads (`purpose` and the bytes in
/// `file_field`) broken in one or two ways: bad boundaries, missing or repeated parts,
/// invalid UTF-8, header injection and traversal in file names, truncated bodies, bodies
/// over a 64 KiB limit.
pub fn hostile_multipart(rng: &mut rand::rngs::StdRng, file_field: &str) -> (String, Vec<u8>) {
    use rand::Rng;
    let boundary = match rng.random_range(0..10) {
        0 => "".to_owned(),
        1 => "x".repeat(200),
        2 => "b\"q".to_owned(),
        _ => format!("kiln{}", rng.random::<u32>()),
    };
    let filename = match rng.random_range(0..8) {
        0 => "../../etc/passwd".to_owned(),
        1 => "a\r\nX-Injected: 1".to_owned(),
        2 => "\u{0}\u{1}".to_owned(),
        3 => "C:\\temp\\..\\x.jsonl".to_owned(),
        4 => "n".repeat(1000),
        5 => "".to_owned(),
        _ => "train.jsonl".to_owned(),
    };
    let purpose: Vec<u8> = match rng.random_range(0..10) {
        0 => b"".to_vec(),
        1 => vec![0xff, 0xfe, b'a'],
        2 => "p".repeat(10_000).into_bytes(),
        3 => b"fine-tune\0".to_vec(),
        4 => b"batch".to_vec(),
        _ => b"fine-tune".to_vec(),
    };
    let content: Vec<u8> = match rng.random_range(0..6) {
        0 => Vec::new(),
        5 => vec![b'x'; 70 * 1024], // over the test's 64 KiB limit
        1 => (0..rng.random_range(0..4096))
            .map(|_| rng.random())
            .collect(),
        2 => format!("--{boundary}\r\n").into_bytes(),
        _ => classification_jsonl(12),
    };
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let field = |name: &str, extra: &str, value: &[u8]| {
        let mut p =
            format!("Content-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n").into_bytes();
        p.extend_from_slice(value);
        p
    };
    if rng.random_bool(0.85) {
        parts.push(field("purpose", "", &purpose));
    }
    let files = if rng.random_bool(0.8) {
        1
    } else {
        rng.random_range(0..3) * 2 // none, or two
    };
    for _ in 0..files {
        parts.push(field(
            file_field,
            &format!("; filename=\"{filename}\"\r\nContent-Type: application/octet-stream"),
            &content,
        ));
    }
    if rng.random_bool(0.2) {
        parts.push(field("unknown", "", b"x"));
    }
    if rng.random_bool(0.1) {
        parts.push(b"No-Disposition: here\r\n\r\nvalue".to_vec());
    }
    let mut body = Vec::new();
    for p in &parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(p);
        body.extend_from_slice(b"\r\n");
    }
    if rng.random_bool(0.9) {
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    }
    if rng.random_bool(0.2) {
        let cut = rng.random_range(0..=body.len());
        body.truncate(cut);
    }
    let content_type = match rng.random_range(0..12) {
        0 => "multipart/form-data".to_owned(),
        1 => "application/json".to_owned(),
        2 => format!("multipart/mixed; boundary={boundary}"),
        _ => format!("multipart/form-data; boundary={boundary}"),
    };
    (content_type, body)
}
