//! API fuzzing: schemathesis generates requests from openapi.yaml for every operation
//! (positive and negative cases, then stateful sequences) against a real `kiln serve`, and
//! checks that none gets a 5xx and every response matches its schema. At least 1,000
//! requests. Needs `pip install -r tests/python/requirements.txt` (the `st` command).

mod common;

use common::{ADMIN_KEY, KilnProcess, TestDatabase};

#[tokio::test]
async fn generated_requests_get_no_server_errors_and_responses_match_the_spec() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let kiln = KilnProcess::serve(&[
        ("DATABASE_URL", &db.url),
        ("KILN_DATA_DIR", dir.path().to_str().unwrap()),
        ("KILN_ADMIN_KEY", ADMIN_KEY),
        // Generated jobs would queue real training: the API alone is under test here.
        ("KILN_WORKERS", "0"),
    ])
    .await;
    let output = tokio::process::Command::new("st")
        .args(["run", concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")])
        .args(["--url", &kiln.base])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--max-examples", "30"])
        .arg("--no-color")
        .output()
        .await
        .expect("schemathesis's `st` is needed: pip install -r tests/python/requirements.txt");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}"
    );
    // "Test cases:\n  3813 generated, 3813 passed"
    let generated: u64 = stdout
        .lines()
        .find_map(|line| line.trim().split_once(" generated, "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in:\n{stdout}"));
    assert!(generated >= 1000, "only {generated} requests:\n{stdout}");
    println!("schemathesis: {generated} generated requests, no failures");
    assert!(kiln.terminate().await.success());
}
