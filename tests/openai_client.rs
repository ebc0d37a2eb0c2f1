//! The official `openai` Python client (strict response validation) against a real
//! `kiln serve` process. Needs `pip install -r tests/python/requirements.txt`.

mod common;

use common::{ADMIN_KEY, KilnProcess, TestDatabase};

async fn run_script(script: &str) {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::serve(&[
        ("DATABASE_URL", &db.url),
        ("KILN_DATA_DIR", dir.path().to_str().unwrap()),
        ("KILN_ADMIN_KEY", ADMIN_KEY),
    ])
    .await;
    let output = tokio::process::Command::new("python3")
        .arg(format!(
            "{}/tests/python/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("OPENAI_BASE_URL", format!("{}/v1", kiln.base))
        .env("OPENAI_API_KEY", ADMIN_KEY)
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
        "{script} failed:\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(kiln.terminate().await.success());
}

#[tokio::test]
async fn the_official_client_uploads_lists_downloads_and_deletes_files() {
    run_script("openai_files.py").await;
}
