//! Keys, projects, the error contract and the operations endpoints.

mod common;

use common::{TestApp, assert_error_shape};
use serde_json::{Value, json};

#[tokio::test]
async fn requests_without_a_valid_key_are_401() {
    let app = TestApp::spawn().await;
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("no header", None),
        ("empty bearer", Some("Bearer ")),
        ("wrong scheme", Some("Basic dXNlcjpwYXNz")),
        (
            "unknown key",
            Some("Bearer sk-kiln-AAAAAAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"),
        ),
        ("garbage", Some("Bearer not-a-key")),
    ];
    for (what, header) in cases {
        let mut req = app.client.get(app.url("/v1/files"));
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{what}");
        let body: Value = res.json().await.unwrap();
        let err = assert_error_shape(&body);
        assert_eq!(err["type"], "authentication_error", "{what}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    let app = TestApp::spawn().await;
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"project": "acme", "name": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let created: Value = res.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(created["project"], "acme");
    assert_eq!(created["name"], "ci");
    assert_eq!(created["admin"], false);

    let (status, _) = app.get_json(&key, "/v1/files").await;
    assert_eq!(status, 200);

    let (_, list) = app.get_json(&app.admin_key, "/v1/keys").await;
    let listed = list["data"].as_array().unwrap();
    assert!(listed.iter().any(|k| k["id"] == created["id"]));
    assert!(!list.to_string().contains(&key), "secrets are never listed");

    let res = app
        .client
        .delete(app.url(&format!("/v1/keys/{}", created["id"].as_str().unwrap())))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, body) = app.get_json(&key, "/v1/files").await;
    assert_eq!(status, 401);
    assert_error_shape(&body);
    app.shutdown().await;
}

#[tokio::test]
async fn keys_are_stored_hashed() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let dump: String = sqlx::query_scalar("SELECT string_agg(k::text, ' ') FROM api_keys k")
        .fetch_one(&pool)
        .await
        .unwrap();
    let secret = key.split('_').nth(1).unwrap();
    assert!(!dump.contains(secret), "the secret is not in the table");
    app.shutdown().await;
}

#[tokio::test]
async fn only_admin_keys_manage_keys() {
    let app = TestApp::spawn().await;
    let member = app.key_for("acme").await;
    let res = app
        .client
        .get(app.url("/v1/keys"))
        .bearer_auth(&member)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        assert_error_shape(&res.json::<Value>().await.unwrap())["type"],
        "permission_error"
    );
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&member)
        .json(&json!({"project": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    app.shutdown().await;
}

#[tokio::test]
async fn every_error_has_the_openai_shape_and_a_fitting_status() {
    let app = TestApp::spawn().await;
    let key = &app.admin_key;

    // Unknown routes, inside and outside /v1.
    for path in ["/v1/nope", "/nope", "/v1/files/x/y/z"] {
        let res = app
            .client
            .get(app.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{path}");
        assert_error_shape(&res.json::<Value>().await.unwrap());
    }
    // Wrong method.
    let res = app
        .client
        .put(app.url("/v1/files"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    let res = app.client.patch(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    assert_error_shape(&res.json::<Value>().await.unwrap());

    // Malformed JSON, wrong content type, wrong field types and missing fields: 400.
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body("{\"project\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(key)
        .body("project=x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(key)
        .json(&json!({"project": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        assert_error_shape(&res.json::<Value>().await.unwrap())["param"],
        "project"
    );
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        assert_error_shape(&res.json::<Value>().await.unwrap())["param"],
        "project"
    );

    // Oversized JSON body: 413.
    let huge = json!({"project": "x".repeat(3 * 1024 * 1024)});
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(key)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    app.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_key() {
    let app = TestApp::spawn().await;
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["database"], "ok");

    let key = app.key_for("acme").await;
    app.upload(&key, "batch", "x.bin", vec![1, 2, 3]).await;
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(text.contains("kiln_http_requests_total"), "{text}");
    assert!(
        text.contains("route=\"/v1/files\""),
        "series per route template: {text}"
    );
    assert!(
        text.contains("kiln_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("kiln_uploads_total"), "{text}");
    app.shutdown().await;
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = TestApp::spawn().await;
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-me-42");
    let res = app.client.get(app.url("/v1/nope")).send().await.unwrap();
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    app.shutdown().await;
}

#[tokio::test]
async fn the_first_start_without_an_admin_key_creates_one_once() {
    let db = common::TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = kiln::server::Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        database_url: db.url.clone(),
        data_dir: dir.path().to_owned(),
        models_dir: dir.path().join("models"),
        admin_key: None,
        max_upload_bytes: 1 << 20,
        artifacts: None,
        jobs: Default::default(),
        serve: Default::default(),
        webhooks: Default::default(),
        api: Default::default(),
    };
    let first = kiln::server::start(settings.clone()).await.unwrap();
    let key = first
        .bootstrap_key
        .clone()
        .expect("a key is created and shown");
    let client = reqwest::Client::new();
    let res = client
        .get(format!("http://{}/v1/keys", first.addr))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the bootstrap key is an admin key");
    first.shutdown().await.unwrap();

    let second = kiln::server::start(settings).await.unwrap();
    assert!(second.bootstrap_key.is_none(), "never a second time");
    second.shutdown().await.unwrap();
}

/// PostgreSQL text cannot hold NUL: a request carrying one (found by schemathesis in a query
/// parameter) is a 400, not a 500, wherever it arrives.
#[tokio::test]
async fn text_with_nul_characters_is_a_bad_request_not_a_server_error() {
    let app = TestApp::spawn().await;
    let key = app.admin_key.clone();
    let (status, body) = app.get_json(&key, "/v1/files?purpose=a%00b").await;
    assert_eq!(status, 400, "{body}");
    assert_error_shape(&body);
    let res = app
        .client
        .post(app.url("/v1/webhook_endpoints"))
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "url": "http://127.0.0.1:9/h",
            "event_types": ["fine_tuning.job.failed"],
            "name": "a\u{0}b",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let (_, list) = app.get_json(&key, "/v1/webhook_endpoints").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "nothing written: {list}"
    );
    app.shutdown().await;
}

/// With `KILN_RATE_LIMIT`, each key has its own token bucket: a burst passes, the next
/// request gets 429 `rate_limit_exceeded` with `retry-after`, other keys are unaffected, and
/// the key passes again once its bucket refills.
#[tokio::test]
async fn keys_over_their_rate_get_429_with_retry_after() {
    let app = TestApp::spawn_with(|s| s.api.rate_limit = Some((4.0, 3))).await;
    let a = app.key_for("acme").await;
    let b = app.key_for("globex").await;
    for _ in 0..3 {
        let (status, body) = app.get_json(&a, "/v1/files").await;
        assert_eq!(status, 200, "{body}");
    }
    let res = app
        .client
        .get(app.url("/v1/files"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let (status, _) = app.get_json(&b, "/v1/files").await;
    assert_eq!(status, 200, "another key has its own bucket");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, _) = app.get_json(&a, "/v1/files").await;
    assert_eq!(status, 200, "refilled");
    // Unauthenticated routes are not counted against anyone.
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    app.shutdown().await;
}

/// Reads until the server closes the connection (or `within` passes); returns what it sent
/// and how long it took to close.
async fn until_closed(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<(String, std::time::Duration)> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&got).into_owned(),
                    started.elapsed(),
                ));
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow clients (slowloris) cannot hold connections: headers trickled past
/// `KILN_CLIENT_TIMEOUT_SECS`, or a body that stops arriving, end the connection, while
/// other clients are served throughout.
#[tokio::test]
async fn clients_that_send_too_slowly_are_disconnected() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(|s| s.api.client_timeout = Duration::from_secs(1)).await;
    let key = app.key_for("acme").await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // Headers, one byte every 200 ms: the connection is closed after about a second.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let trickle = {
        let addr = addr.clone();
        async move {
            let headers = format!(
                "GET /v1/files HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {}",
                "a".repeat(100)
            );
            for byte in headers.bytes() {
                if slow.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if until_closed(&mut slow, Duration::from_millis(1))
                    .await
                    .is_some()
                {
                    return Some(());
                }
            }
            None
        }
    };
    let started = std::time::Instant::now();
    let (closed, served) = tokio::join!(trickle, async {
        // Meanwhile everyone else is served.
        let mut served = 0;
        for _ in 0..10 {
            let (status, _) = app.get_json(&key, "/v1/files").await;
            assert_eq!(status, 200);
            served += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        served
    });
    assert!(
        closed.is_some(),
        "a client trickling its headers was never disconnected"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "disconnected only after {took:?} (timeout 1 s)"
    );
    assert_eq!(served, 10);

    // A body that stops arriving: the request fails and the connection ends.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\": "
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let (answer, took) = until_closed(&mut stalled, Duration::from_secs(10))
        .await
        .expect("a stalled body was never given up on");
    assert!(took < Duration::from_secs(5), "gave up only after {took:?}");
    if !answer.is_empty() {
        let status: u16 = answer[9..12].parse().unwrap();
        assert!((400..500).contains(&status), "{answer}");
    }
    let (status, _) = app.get_json(&key, "/v1/fine_tuning/jobs").await;
    assert_eq!(status, 200);
    app.shutdown().await;
}
