//! The isolation matrix: project A owns a file, a trained job (events, checkpoints, a
//! fine-tuned model, a checkpoint model) and a webhook endpoint; project B's key tries every
//! route on each of them and gets 404 with nothing of A's in the body, and A's objects are
//! unchanged afterwards. The matrix must name every route with an id in the router
//! (src/api/mod.rs), so a new route cannot skip it. A key revoked mid-session fails its very
//! next request.

mod common;
mod jobs_support;
mod train_support;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{TestApp, assert_error_shape};
use jobs_support::{post_json, wait_for};
use kiln::nn::tiny::TinyLayout;
use serde_json::{Value, json};

const BASE: &str = "kiln-test/tiny-bert";

/// Route templates with an object id, as written in the router.
fn routes_with_ids() -> BTreeSet<String> {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/mod.rs")).unwrap();
    let mut paths = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let start = rest.find('"').unwrap() + 1;
        let len = rest[start..].find('"').unwrap();
        let path = &rest[start..start + len];
        if path.contains('{') {
            paths.insert(path.to_owned());
        }
    }
    paths
}

/// One attempt of B on A's object.
struct Probe {
    /// The router's template it exercises.
    route: &'static str,
    method: &'static str,
    path: String,
    body: Option<Value>,
}

fn probe(route: &'static str, method: &'static str, path: String) -> Probe {
    Probe {
        route,
        method,
        path,
        body: None,
    }
}

async fn send(app: &TestApp, key: &str, p: &Probe) -> (u16, String) {
    let mut req = app
        .client
        .request(p.method.parse().unwrap(), app.url(&p.path))
        .bearer_auth(key);
    if let Some(b) = &p.body {
        req = req.json(b);
    } else if p.method == "POST" {
        req = req.header("content-type", "application/json").body("{}");
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.text().await.unwrap())
}

#[tokio::test]
async fn another_projects_key_finds_nothing_on_any_route_and_revoked_keys_stop_at_once() {
    let app = TestApp::spawn_with(|s| {
        train_support::tiny_model(&s.models_dir.join(BASE), TinyLayout::Unprefixed);
        s.jobs.poll_interval = Duration::from_millis(200);
    })
    .await;
    let a = app.key_for("acme").await;
    let b = app.key_for("globex").await;

    // Project A's objects.
    let path = app.data_dir.path().join("secret-reviews.jsonl");
    train_support::sentiment_jsonl(&path, 60, 9);
    let res = app
        .upload(
            &a,
            "fine-tune",
            "secret-reviews.jsonl",
            std::fs::read(&path).unwrap(),
        )
        .await;
    let file = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_validated(&a, &file).await;
    let (status, job) = post_json(
        &app,
        &a,
        "/v1/fine_tuning/jobs",
        json!({"model": BASE, "training_file": file, "suffix": "secret",
               "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    let job = wait_for(&app, &a, &job_id, Duration::from_secs(120), |j| {
        matches!(j["status"].as_str(), Some("succeeded" | "failed"))
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let model = job["fine_tuned_model"].as_str().unwrap().to_owned();
    let (_, checkpoints) = app
        .get_json(&a, &format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"))
        .await;
    let checkpoint_model = checkpoints["data"][0]["fine_tuned_model_checkpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, hook) = post_json(
        &app,
        &a,
        "/v1/webhook_endpoints",
        json!({"url": "http://127.0.0.1:9/hook", "event_types": ["fine_tuning.job.failed"], "name": "acme-private-hook"}),
    )
    .await;
    assert_eq!(status, 200, "{hook}");
    let hook = hook["id"].as_str().unwrap().to_owned();
    let (status, upload) = post_json(
        &app,
        &a,
        "/v1/uploads",
        json!({"bytes": 6, "filename": "secret-upload.jsonl", "mime_type": "text/jsonl", "purpose": "fine-tune"}),
    )
    .await;
    assert_eq!(status, 200, "{upload}");
    let upload = upload["id"].as_str().unwrap().to_owned();
    let res = app
        .client
        .post(app.url(&format!("/v1/uploads/{upload}/parts")))
        .bearer_auth(&a)
        .multipart(reqwest::multipart::Form::new().part(
            "data",
            reqwest::multipart::Part::bytes(b"abc".to_vec()).file_name("p"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let part = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Everything of A's that must never appear in B's answers (ids B sent may be echoed).
    let secrets = [
        "secret-reviews.jsonl".to_owned(),
        "acme-private-hook".to_owned(),
        "secret-upload.jsonl".to_owned(),
        "127.0.0.1:9".to_owned(),
        "whsec_".to_owned(),
    ];

    let enc = |id: &str| id.replace('/', "%2F");
    let mut probes = vec![
        probe("/v1/files/{id}", "GET", format!("/v1/files/{file}")),
        probe("/v1/files/{id}", "DELETE", format!("/v1/files/{file}")),
        probe(
            "/v1/files/{id}/content",
            "GET",
            format!("/v1/files/{file}/content"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}",
            "GET",
            format!("/v1/fine_tuning/jobs/{job_id}"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}/cancel",
            "POST",
            format!("/v1/fine_tuning/jobs/{job_id}/cancel"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}/pause",
            "POST",
            format!("/v1/fine_tuning/jobs/{job_id}/pause"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}/resume",
            "POST",
            format!("/v1/fine_tuning/jobs/{job_id}/resume"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}/events",
            "GET",
            format!("/v1/fine_tuning/jobs/{job_id}/events"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}/events",
            "GET",
            format!("/v1/fine_tuning/jobs/{job_id}/events?stream=true"),
        ),
        probe(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            "GET",
            format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ),
        probe("/v1/models/{*id}", "GET", format!("/v1/models/{model}")),
        probe(
            "/v1/models/{*id}",
            "GET",
            format!("/v1/models/{}", enc(&model)),
        ),
        probe(
            "/v1/models/{*id}",
            "GET",
            format!("/v1/models/{checkpoint_model}"),
        ),
        probe("/v1/models/{*id}", "DELETE", format!("/v1/models/{model}")),
        probe(
            "/v1/webhook_endpoints/{id}",
            "GET",
            format!("/v1/webhook_endpoints/{hook}"),
        ),
        probe(
            "/v1/webhook_endpoints/{id}",
            "DELETE",
            format!("/v1/webhook_endpoints/{hook}"),
        ),
        probe(
            "/v1/webhook_endpoints/{id}/rotate_secret",
            "POST",
            format!("/v1/webhook_endpoints/{hook}/rotate_secret"),
        ),
        probe(
            "/v1/webhook_endpoints/{id}/deliveries",
            "GET",
            format!("/v1/webhook_endpoints/{hook}/deliveries"),
        ),
        probe("/v1/webhooks/{id}", "GET", format!("/v1/webhooks/{hook}")),
        probe(
            "/v1/webhooks/{id}",
            "DELETE",
            format!("/v1/webhooks/{hook}"),
        ),
    ];
    probes.push(Probe {
        body: Some(json!({"name": "stolen"})),
        ..probe(
            "/v1/webhook_endpoints/{id}",
            "POST",
            format!("/v1/webhook_endpoints/{hook}"),
        )
    });
    probes.push(Probe {
        body: Some(json!({"name": "stolen"})),
        ..probe("/v1/webhooks/{id}", "POST", format!("/v1/webhooks/{hook}"))
    });
    probes.push(probe(
        "/v1/uploads/{id}",
        "GET",
        format!("/v1/uploads/{upload}"),
    ));
    probes.push(Probe {
        body: Some(json!({"data": "abc"})),
        ..probe(
            "/v1/uploads/{id}/parts",
            "POST",
            format!("/v1/uploads/{upload}/parts"),
        )
    });
    probes.push(Probe {
        body: Some(json!({ "part_ids": [part] })),
        ..probe(
            "/v1/uploads/{id}/complete",
            "POST",
            format!("/v1/uploads/{upload}/complete"),
        )
    });
    probes.push(probe(
        "/v1/uploads/{id}/cancel",
        "POST",
        format!("/v1/uploads/{upload}/cancel"),
    ));
    probes.push(Probe {
        body: Some(json!({"event_type": "fine_tuning.job.failed"})),
        ..probe(
            "/v1/webhook_endpoints/{id}/test",
            "POST",
            format!("/v1/webhook_endpoints/{hook}/test"),
        )
    });
    // Inference on A's models (the id travels in the body).
    for m in [&model, &checkpoint_model] {
        probes.push(Probe {
            body: Some(json!({"model": m, "input": ["great"]})),
            ..probe(
                "(body) /v1/classifications",
                "POST",
                "/v1/classifications".into(),
            )
        });
        probes.push(Probe {
            body: Some(json!({"model": m, "input": "great"})),
            ..probe("(body) /v1/embeddings", "POST", "/v1/embeddings".into())
        });
    }

    // The matrix covers every route with an id, except admin-only key management (keys
    // belong to the operator, not to a project).
    let covered: BTreeSet<String> = probes.iter().map(|p| p.route.to_owned()).collect();
    let uncovered: Vec<String> = routes_with_ids()
        .into_iter()
        .filter(|r| !covered.contains(r) && r != "/v1/keys/{id}")
        .collect();
    assert!(
        uncovered.is_empty(),
        "routes missing from the isolation matrix: {uncovered:?}"
    );

    for p in &probes {
        let (status, body) = send(&app, &b, p).await;
        assert_eq!(status, 404, "{} {}: {status} {body}", p.method, p.path);
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_error_shape(&parsed);
        for s in &secrets {
            assert!(
                !body.contains(s.as_str()),
                "{} {} leaks {s}: {body}",
                p.method,
                p.path
            );
        }
    }

    // Creating a job from A's file or model is refused the same way (400 naming the field,
    // as for an id that does not exist).
    for (body, param) in [
        (
            json!({"model": BASE, "training_file": file}),
            "training_file",
        ),
        (
            json!({"model": model, "training_file": "file-missing"}),
            "model",
        ),
    ] {
        let (status, err) = post_json(&app, &b, "/v1/fine_tuning/jobs", body.clone()).await;
        assert!(status == 400 || status == 404, "{body}: {status} {err}");
        assert_eq!(err["error"]["param"], param, "{err}");
        for s in &secrets {
            assert!(!err.to_string().contains(s.as_str()), "leaks {s}: {err}");
        }
    }

    // B's lists hold none of A's objects.
    for list in [
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/models",
        "/v1/webhook_endpoints",
    ] {
        let (status, body) = app.get_json(&b, list).await;
        assert_eq!(status, 200, "{list}: {body}");
        let text = body.to_string();
        for id in [&file, &job_id, &model, &hook] {
            assert!(!text.contains(id.as_str()), "{list} shows A's {id}: {body}");
        }
    }

    // A's objects are untouched by B's attempts.
    let (status, f) = app.get_json(&a, &format!("/v1/files/{file}")).await;
    assert_eq!(
        (status, f["filename"].as_str()),
        (200, Some("secret-reviews.jsonl"))
    );
    let (status, m) = app.get_json(&a, &format!("/v1/models/{model}")).await;
    assert_eq!(status, 200, "{m}");
    let (status, u) = app.get_json(&a, &format!("/v1/uploads/{upload}")).await;
    assert_eq!(
        (status, u["status"].as_str(), u["filename"].as_str()),
        (200, Some("pending"), Some("secret-upload.jsonl"))
    );
    let (status, w) = app
        .get_json(&a, &format!("/v1/webhook_endpoints/{hook}"))
        .await;
    assert_eq!(
        (status, w["name"].as_str()),
        (200, Some("acme-private-hook"))
    );
    let (status, j) = app
        .get_json(&a, &format!("/v1/fine_tuning/jobs/{job_id}"))
        .await;
    assert_eq!((status, j["status"].as_str()), (200, Some("succeeded")));
    let (status, c) = post_json(
        &app,
        &a,
        "/v1/classifications",
        json!({"model": model, "input": ["great"]}),
    )
    .await;
    assert_eq!(status, 200, "A still serves its model: {c}");

    // A key revoked mid-session fails on its very next request.
    let created: Value = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"project": "acme", "name": "short-lived"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let temp = created["key"].as_str().unwrap();
    let (status, _) = app.get_json(temp, &format!("/v1/files/{file}")).await;
    assert_eq!(status, 200, "the new key works");
    let res = app
        .client
        .delete(app.url(&format!("/v1/keys/{}", created["id"].as_str().unwrap())))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for path in [
        format!("/v1/files/{file}"),
        "/v1/fine_tuning/jobs".to_owned(),
    ] {
        let (status, body) = app.get_json(temp, &path).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert_error_shape(&body);
    }
    let (status, body) = post_json(
        &app,
        temp,
        "/v1/classifications",
        json!({"model": model, "input": ["great"]}),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // Project B never needed admin rights for any of this, and cannot manage keys.
    let (status, _) = app.get_json(&b, "/v1/keys").await;
    assert_eq!(status, 403);
    app.shutdown().await;
}
