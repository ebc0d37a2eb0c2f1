//! Webhooks end to end over real HTTP: a real training job's events reach a receiver (a
//! real HTTP server in the test) signed the Standard Webhooks way; a receiver that fails is
//! retried with backoff under the same `webhook-id` until it answers, and one that never
//! does is given up after the configured attempts; every attempt is visible through the API;
//! bad input gets a 400 naming the field; projects see only their own endpoints. (The
//! official client's signature check runs in tests/openai_client.rs.)

mod common;
mod jobs_support;
mod train_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::{TestApp, assert_error_shape};
use jobs_support::{post_empty, post_json, wait_for};
use kiln::nn::tiny::TinyLayout;
use serde_json::{Value, json};

const BASE: &str = "kiln-test/tiny-bert";

/// What a receiver saw: headers and raw body of each request.
type Seen = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A real HTTP receiver that answers `fail_first` requests with 503, then 200 (or fails
/// forever when `fail_first` is `usize::MAX`).
async fn receiver(fail_first: usize) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let record = record.clone();
            async move {
                let mut seen = record.lock().unwrap();
                seen.push((headers, body));
                if seen.len() <= fail_first {
                    (StatusCode::SERVICE_UNAVAILABLE, "busy, try later")
                } else {
                    (StatusCode::OK, "thanks")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

async fn app(max_attempts: u32) -> TestApp {
    TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.jobs.poll_interval = Duration::from_millis(300);
        s.webhooks.retry_base = Duration::from_millis(200);
        s.webhooks.max_attempts = max_attempts;
        s.webhooks.poll = Duration::from_millis(100);
    })
    .await
}

async fn upload(app: &TestApp, key: &str, n: usize) -> String {
    let path = app.data_dir.path().join(format!("data-{n}.jsonl"));
    train_support::sentiment_jsonl(&path, n, 3);
    let res = app
        .upload(
            key,
            "fine-tune",
            "sentiment.jsonl",
            std::fs::read(&path).unwrap(),
        )
        .await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.wait_validated(key, &id).await["status"], "processed");
    id
}

async fn endpoint(app: &TestApp, key: &str, url: &str, events: &[&str]) -> Value {
    let (status, body) = post_json(
        app,
        key,
        "/v1/webhook_endpoints",
        json!({"url": url, "event_types": events, "name": "test receiver"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The Standard Webhooks check, written out here independently of kiln's signer.
fn verify(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let id = headers["webhook-id"].to_str().unwrap();
    let ts = headers["webhook-timestamp"].to_str().unwrap();
    let now = chrono::Utc::now().timestamp();
    if (now - ts.parse::<i64>().unwrap()).abs() > 300 {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    headers["webhook-signature"]
        .to_str()
        .unwrap()
        .split(' ')
        .any(|s| s == expected)
}

async fn wait_seen(seen: &Seen, what: &str, done: impl Fn(&[(HeaderMap, String)]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if done(&seen.lock().unwrap()) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn types(seen: &[(HeaderMap, String)]) -> Vec<String> {
    seen.iter()
        .map(|(_, b)| {
            serde_json::from_str::<Value>(b).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

async fn deliveries(app: &TestApp, key: &str, endpoint: &str) -> Vec<Value> {
    let (status, body) = app
        .get_json(
            key,
            &format!("/v1/webhook_endpoints/{endpoint}/deliveries?limit=100"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_training_jobs_events_arrive_signed_and_a_failing_receiver_is_retried() {
    let app = app(5).await;
    let key = app.key_for("acme").await;
    // The receiver is down for the first two requests.
    let (url, seen) = receiver(2).await;
    let hook = endpoint(
        &app,
        &key,
        &url,
        &[
            "fine_tuning.job.running",
            "fine_tuning.job.checkpoint",
            "fine_tuning.job.succeeded",
        ],
    )
    .await;
    let secret = hook["signing_secret"].as_str().unwrap().to_owned();
    let hook_id = hook["id"].as_str().unwrap().to_owned();

    let train = upload(&app, &key, 60).await;
    let (status, job) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({"model": BASE, "training_file": train,
               "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    let job = wait_for(&app, &key, &job_id, Duration::from_secs(120), |j| {
        matches!(j["status"].as_str(), Some("succeeded" | "failed"))
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    wait_seen(&seen, "the succeeded event", |s| {
        types(s).contains(&"fine_tuning.job.succeeded".to_owned())
    })
    .await;

    // Then until the refused deliveries have been retried.
    let deadline = Instant::now() + Duration::from_secs(60);
    while deliveries(&app, &key, &hook_id)
        .await
        .iter()
        .any(|d| d["status"] == "pending")
    {
        assert!(Instant::now() < deadline, "deliveries still pending");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen.lock().unwrap().clone();
    // Every request verifies. Requests are grouped by webhook-id: a refused one is retried
    // under the same id with the same body.
    let mut unique: Vec<(String, String, usize)> = Vec::new(); // id, body, requests
    for (headers, body) in &seen {
        assert!(verify(&secret, headers, body), "bad signature on {body}");
        assert_eq!(headers["content-type"], "application/json");
        let id = headers["webhook-id"].to_str().unwrap().to_owned();
        match unique.iter_mut().find(|(i, _, _)| *i == id) {
            Some((_, first_body, n)) => {
                assert_eq!(first_body, body, "the body is the same on every attempt");
                *n += 1;
            }
            None => unique.push((id, body.clone(), 1)),
        }
    }
    assert_eq!(
        seen.len(),
        unique.len() + 2,
        "exactly the two refusals were retried"
    );

    // Each event once (after the retries): running, a checkpoint per epoch, succeeded.
    let mut events: Vec<Value> = unique
        .iter()
        .map(|(_, b, _)| serde_json::from_str(b).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"fine_tuning.job.running"), "{kinds:?}");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "fine_tuning.job.succeeded")
            .count(),
        1,
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .filter(|k| **k == "fine_tuning.job.checkpoint")
            .count()
            >= 2,
        "{kinds:?}"
    );
    for e in &events {
        assert_eq!(e["object"], "event");
        assert_eq!(e["data"]["id"], job_id.as_str());
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
        assert!(e["created_at"].as_i64().unwrap() > 1_700_000_000);
    }
    events.sort_by_key(|e| e["type"] != "fine_tuning.job.succeeded");
    let done = &events[0];
    assert_eq!(done["data"]["fine_tuned_model"], job["fine_tuned_model"]);
    let checkpoint = events
        .iter()
        .find(|e| e["type"] == "fine_tuning.job.checkpoint")
        .unwrap();
    assert!(
        checkpoint["data"]["step"].as_i64().unwrap() > 0,
        "{checkpoint}"
    );
    assert!(
        checkpoint["data"]["checkpoint_id"].is_string(),
        "{checkpoint}"
    );

    // The delivery log has every event, each attempt as the receiver answered it.
    let log = deliveries(&app, &key, &hook_id).await;
    assert_eq!(log.len(), unique.len(), "{log:?}");
    for (id, _, requests) in &unique {
        let d = log.iter().find(|d| d["id"] == id.as_str()).unwrap();
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(d["attempts"].as_u64().unwrap() as usize, *requests, "{d}");
        let attempts = d["attempt_log"].as_array().unwrap();
        let codes: Vec<i64> = attempts
            .iter()
            .map(|a| a["status_code"].as_i64().unwrap())
            .collect();
        let mut expected = vec![503; requests - 1];
        expected.push(200);
        assert_eq!(codes, expected, "{d}");
        if *requests > 1 {
            assert!(
                attempts[0]["error"].as_str().unwrap().contains("503"),
                "{d}"
            );
        }
    }
    assert!(log.iter().all(|d| d["status"] == "succeeded"), "{log:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_receiver_that_never_accepts_is_given_up_after_the_last_attempt() {
    let app = app(3).await;
    let key = app.key_for("acme").await;
    let (url, seen) = receiver(usize::MAX).await;
    let hook = endpoint(&app, &key, &url, &["fine_tuning.job.cancelled"]).await;
    let hook_id = hook["id"].as_str().unwrap();

    // A cancelled job (while queued, or just after a worker took it): its event needs no
    // training to finish.
    let train = upload(&app, &key, 20).await;
    let (_, job) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({"model": BASE, "training_file": train, "priority": 10}),
    )
    .await;
    let job_id = job["id"].as_str().unwrap();
    let (status, cancelled) =
        post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{job_id}/cancel")).await;
    assert_eq!(status, 200, "{cancelled}");

    let deadline = Instant::now() + Duration::from_secs(60);
    let delivery = loop {
        let log = deliveries(&app, &key, hook_id).await;
        let cancelled = log
            .iter()
            .find(|d| d["event_type"] == "fine_tuning.job.cancelled")
            .cloned();
        if let Some(d) = cancelled
            && d["status"] != "pending"
        {
            break d;
        }
        assert!(Instant::now() < deadline, "{log:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(delivery["status"], "failed", "{delivery}");
    assert_eq!(delivery["attempts"], 3, "{delivery}");
    assert_eq!(delivery["attempt_log"].as_array().unwrap().len(), 3);
    assert_eq!(delivery["last_status_code"], 503);
    assert!(delivery["finished_at"].is_i64());
    assert!(delivery["next_attempt_at"].is_null());
    assert_eq!(delivery["payload"]["data"]["id"], job_id);
    // Exactly three requests reached the receiver, and no more come.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(seen.lock().unwrap().len(), 3);

    // The test route reports the receiver's status; an address nobody listens on is the
    // user's mistake (400), not a server fault.
    let (status, result) = post_json(
        &app,
        &key,
        &format!("/v1/webhook_endpoints/{hook_id}/test"),
        json!({"event_type": "fine_tuning.job.failed"}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["status_code"], 503);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dead = endpoint(
        &app,
        &key,
        &format!("http://{closed}/hook"),
        &["fine_tuning.job.failed"],
    )
    .await;
    let (status, body) = post_json(
        &app,
        &key,
        &format!(
            "/v1/webhook_endpoints/{}/test",
            dead["id"].as_str().unwrap()
        ),
        json!({"event_type": "fine_tuning.job.failed"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(assert_error_shape(&body)["code"], "webhook_unreachable");
    app.shutdown().await;
}

#[tokio::test]
async fn bad_webhook_requests_get_clear_errors_and_projects_are_isolated() {
    let app = app(3).await;
    let key = app.key_for("acme").await;
    let other = app.key_for("globex").await;
    let cases = [
        (
            json!({"url": "ftp://x.example", "event_types": ["fine_tuning.job.failed"]}),
            "url",
        ),
        (
            json!({"url": "not a url", "event_types": ["fine_tuning.job.failed"]}),
            "url",
        ),
        (
            json!({"url": "http://x.example/h", "event_types": []}),
            "event_types",
        ),
        (
            json!({"url": "http://x.example/h", "event_types": ["batch.completed"]}),
            "event_types",
        ),
        (
            json!({"url": "http://x.example/h", "event_types": "fine_tuning.job.failed"}),
            "event_types",
        ),
        (json!({"event_types": ["fine_tuning.job.failed"]}), "url"),
        (
            json!({"url": "http://x.example/h", "event_types": ["fine_tuning.job.failed"], "colour": 1}),
            "colour",
        ),
        (
            json!({"url": "http://x.example/h", "event_types": ["fine_tuning.job.failed"], "name": ""}),
            "name",
        ),
    ];
    for (body, param) in cases {
        let (status, err) = post_json(&app, &key, "/v1/webhook_endpoints", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {err}");
        assert_eq!(assert_error_shape(&err)["param"], param, "{body} -> {err}");
    }
    let (_, list) = app.get_json(&key, "/v1/webhook_endpoints").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "nothing half-made: {list}"
    );

    // The alias route creates the same object; the name defaults to the URL.
    let (status, made) = post_json(
        &app,
        &key,
        "/v1/webhooks",
        json!({"url": "http://x.example/h", "event_types": ["fine_tuning.job.failed", "fine_tuning.job.failed"]}),
    )
    .await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["name"], "http://x.example/h");
    assert_eq!(made["event_types"], json!(["fine_tuning.job.failed"]));
    let id = made["id"].as_str().unwrap();

    // Updates check their fields too, and change only what is given.
    let (status, err) = post_json(
        &app,
        &key,
        &format!("/v1/webhook_endpoints/{id}"),
        json!({"event_types": ["nope"]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "event_types");
    let (status, updated) = post_json(
        &app,
        &key,
        &format!("/v1/webhook_endpoints/{id}"),
        json!({"url": "https://y.example/h"}),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["url"], "https://y.example/h");
    assert_eq!(updated["event_types"], json!(["fine_tuning.job.failed"]));
    assert!(updated.get("signing_secret").is_none());

    // Rotation with an empty body (curl's `-X POST`) gives a new secret.
    let (status, rotated) = post_empty(
        &app,
        &key,
        &format!("/v1/webhook_endpoints/{id}/rotate_secret"),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    assert_ne!(rotated["signing_secret"], made["signing_secret"]);

    // Another project sees none of it.
    for path in [
        format!("/v1/webhook_endpoints/{id}"),
        format!("/v1/webhook_endpoints/{id}/deliveries"),
    ] {
        let (status, body) = app.get_json(&other, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (_, theirs) = app.get_json(&other, "/v1/webhook_endpoints").await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
    let res = app
        .client
        .delete(app.url(&format!("/v1/webhook_endpoints/{id}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    let res = app
        .client
        .delete(app.url(&format!("/v1/webhook_endpoints/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, _) = app
        .get_json(&key, &format!("/v1/webhook_endpoints/{id}"))
        .await;
    assert_eq!(status, 404);
    app.shutdown().await;
}
