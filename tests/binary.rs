//! The `kiln` binary itself: `serve` with an external or embedded PostgreSQL, graceful
//! shutdown on SIGTERM, `migrate`, and `keys create`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{ADMIN_KEY, KilnProcess, TestDatabase};
use serde_json::Value;

fn kiln() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("KILN_ADMIN_KEY")
        .env("KILN_LOG", "warn");
    cmd
}

/// A data directory the unprivileged PostgreSQL user can enter when tests run as root.
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kiln-bin-test-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn serve_with_database_url_answers_and_stops_cleanly_on_sigterm() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let server = KilnProcess::serve(&[
        ("DATABASE_URL", &db.url),
        ("KILN_DATA_DIR", dir.path().to_str().unwrap()),
        ("KILN_ADMIN_KEY", ADMIN_KEY),
    ])
    .await;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let files = client
        .get(format!("{}/v1/files", server.base))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(files.status(), 200);
    assert!(
        server.banner.lines().all(|l| !l.contains("sk-kiln-")),
        "no bootstrap key when KILN_ADMIN_KEY is set"
    );
    let status = server.terminate().await;
    assert!(status.success(), "graceful exit: {status:?}");
}

#[tokio::test]
async fn serve_without_database_url_runs_its_own_postgres_and_stops_it() {
    let dir = open_tempdir();
    let data_dir = dir.path().join("data");
    let server = KilnProcess::serve(&[("KILN_DATA_DIR", data_dir.to_str().unwrap())]).await;

    // First start: an admin key is made and printed once.
    let key = server
        .banner
        .split_whitespace()
        .find(|w| w.starts_with("sk-kiln-"))
        .expect("bootstrap key printed")
        .to_owned();
    let client = reqwest::Client::new();
    let res = client
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(common::classification_jsonl(10)).file_name("t.jsonl"),
        );
    let res = client
        .post(format!("{}/v1/files", server.base))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let file_id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        data_dir.join("pg/data/PG_VERSION").exists(),
        "the cluster lives under $KILN_DATA_DIR/pg"
    );

    // `kiln keys create` attaches to the running cluster.
    let out = kiln()
        .args(["keys", "create", "--project", "team-a"])
        .env("KILN_DATA_DIR", &data_dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let team_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let res = client
        .get(format!("{}/v1/files", server.base))
        .bearer_auth(&team_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "team-a sees only its own files"
    );

    assert!(server.terminate().await.success());
    assert!(
        !data_dir.join("pg/data/postmaster.pid").exists(),
        "PostgreSQL stopped with kiln"
    );

    // Second start: same data, no new key printed.
    let server = KilnProcess::serve(&[("KILN_DATA_DIR", data_dir.to_str().unwrap())]).await;
    assert!(!server.banner.contains("sk-kiln-"), "{}", server.banner);
    let res = client
        .get(format!("{}/v1/files/{file_id}", server.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "data survives a restart");
    assert!(server.terminate().await.success());
}

#[tokio::test]
async fn serve_without_postgres_binaries_fails_at_once_and_says_what_to_do() {
    let dir = open_tempdir();
    let empty = dir.path().join("no-pg-here");
    std::fs::create_dir(&empty).unwrap();
    let out = kiln()
        .arg("serve")
        .env("KILN_DATA_DIR", dir.path().join("data"))
        .env("KILN_PG_BIN", &empty)
        .env("KILN_ADDR", "127.0.0.1:0")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for hint in ["DATABASE_URL", "docker compose up", "apt-get install"] {
        assert!(stderr.contains(hint), "mentions {hint}: {stderr}");
    }
}

/// Devices are opened before anything else starts: a GPU this binary cannot use, or a
/// `KILN_DEVICES` that does not parse, stops `serve`, `worker` and `train` at once with the
/// reason, and no data directory or database is touched.
#[tokio::test]
async fn devices_that_cannot_be_used_stop_the_start_with_the_reason() {
    let dir = open_tempdir();
    let data = dir.path().join("data");
    let run = |args: &'static [&'static str], env: &'static [(&'static str, &'static str)]| {
        let data = data.clone();
        async move {
            let mut cmd = kiln();
            cmd.args(args)
                .env("KILN_DATA_DIR", &data)
                .env("KILN_ADDR", "127.0.0.1:0")
                .env_remove("KILN_DEVICES")
                .env_remove("KILN_SERVE_DEVICE");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
                .await
                .expect("kiln exits at once")
                .unwrap();
            assert!(!out.status.success(), "{args:?} {env:?} must fail");
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    if !kiln::device::CUDA_BUILT {
        for command in [&["serve"][..], &["worker"][..]] {
            for devices in ["cuda:0", "cpu,cuda:1", "cuda"] {
                let env: &'static [(&str, &str)] = match devices {
                    "cuda:0" => &[("KILN_DEVICES", "cuda:0")],
                    "cpu,cuda:1" => &[("KILN_DEVICES", "cpu,cuda:1")],
                    _ => &[("KILN_DEVICES", "cuda")],
                };
                let stderr = run(command, env).await;
                for hint in [
                    "KILN_DEVICES",
                    "built without CUDA support",
                    "--features cuda",
                ] {
                    assert!(
                        stderr.contains(hint),
                        "{command:?} {devices}: {hint}: {stderr}"
                    );
                }
            }
        }
        let stderr = run(&["serve"], &[("KILN_SERVE_DEVICE", "cuda:0")]).await;
        assert!(
            stderr.contains("KILN_SERVE_DEVICE") && stderr.contains("built without CUDA support"),
            "{stderr}"
        );
        let stderr = run(
            &[
                "train",
                "--model",
                "/nonexistent",
                "--training-file",
                "/nonexistent.jsonl",
                "--output",
                "/tmp/kiln-never-written",
                "--device",
                "cuda:0",
            ],
            &[],
        )
        .await;
        assert!(
            stderr.contains("--device") && stderr.contains("built without CUDA support"),
            "{stderr}"
        );
    }
    for (value, reason) in [
        ("gpu", "expected `cpu`, `cuda` (every GPU) or `cuda:N`"),
        ("cuda:x", "must be a number"),
        ("cpu,cpu", "listed twice"),
    ] {
        let env: &'static [(&str, &str)] = match value {
            "gpu" => &[("KILN_DEVICES", "gpu")],
            "cuda:x" => &[("KILN_DEVICES", "cuda:x")],
            _ => &[("KILN_DEVICES", "cpu,cpu")],
        };
        let stderr = run(&["serve"], env).await;
        assert!(
            stderr.contains("--devices") && stderr.contains(reason),
            "{value}: {stderr}"
        );
    }
    assert!(!data.join("pg").exists(), "no database was started");
}

#[tokio::test]
async fn migrate_and_keys_work_against_database_url() {
    let db = TestDatabase::create().await;
    let out = kiln()
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kiln()
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "migrations are idempotent");

    let out = kiln()
        .args(["keys", "create", "--project", "acme", "--name", "laptop"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("sk-kiln-"), "{key}");

    let out = kiln()
        .args(["keys", "list"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("acme") && listing.contains("laptop"),
        "{listing}"
    );
    assert!(!listing.contains(&key), "secrets are not listed");

    let dir = tempfile::tempdir().unwrap();
    let server = KilnProcess::serve(&[
        ("DATABASE_URL", &db.url),
        ("KILN_DATA_DIR", dir.path().to_str().unwrap()),
    ])
    .await;
    let client = reqwest::Client::new();
    let res = client
        .get(format!("{}/v1/files", server.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(server.terminate().await.success());
}
