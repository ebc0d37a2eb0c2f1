//! The fine-tuning jobs API as a user sees it: a job trains to success with events,
//! checkpoints and a result file; bad requests are rejected with the field named; idempotency
//! keys; cancel, pause and resume; priorities; retries. Real PostgreSQL, real HTTP, a real
//! (tiny) training engine.

mod common;
mod jobs_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestApp, assert_error_shape};
use jobs_support::*;
use serde_json::{Value, json};

fn metrics_steps(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_job_trains_to_success_with_events_checkpoints_and_a_result_file() {
    let app = spawn_app(ToyExecutor::new(20), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 30).await;
    let (status, created) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": MODEL,
            "training_file": file,
            "suffix": "reviews",
            "seed": 42,
            "metadata": {"team": "search"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 4, "batch_size": 5, "checkpoint_every_steps": 5, "strategy": "full"}}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ftjob-"));
    assert_eq!(created["object"], "fine_tuning.job");
    // An idle worker may claim it (NOTIFY) before the response is written.
    assert!(
        ["queued", "running"].contains(&created["status"].as_str().unwrap()),
        "{created}"
    );
    assert_eq!(created["seed"], 42);
    assert_eq!(created["model"], MODEL);
    assert_eq!(created["user_provided_suffix"], "reviews");
    assert_eq!(created["priority"], 5);
    for field in [
        "fine_tuned_model",
        "finished_at",
        "error",
        "trained_tokens",
        "validation_file",
    ] {
        assert!(
            created.get(field).is_some_and(Value::is_null),
            "{field}: {created}"
        );
    }
    let hp = &created["method"]["supervised"]["hyperparameters"];
    assert_eq!(hp["n_epochs"], 4);
    assert_eq!(hp["strategy"], "full");
    assert_eq!(
        hp["learning_rate"], "auto",
        "not given: auto until the engine decides"
    );
    assert_eq!(created["hyperparameters"]["batch_size"], 5);

    let job = wait_for(&app, &key, &id, Duration::from_secs(60), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["fine_tuned_model"],
        format!("ft:{MODEL}:acme:reviews:{id}")
    );
    assert!(job["finished_at"].as_i64().unwrap() >= job["created_at"].as_i64().unwrap());
    assert_eq!(job["trained_tokens"], 24 * 5 * 8);
    assert_eq!(job["progress"]["step"], 24);
    assert_eq!(job["progress"]["total_steps"], 24);
    assert!(job["metrics"]["train_loss"].as_f64().unwrap() < 0.69);
    // The engine's resolved values are echoed.
    assert_eq!(
        job["method"]["supervised"]["hyperparameters"]["learning_rate"],
        0.5
    );
    assert_eq!(job["metadata"], json!({"team": "search"}));

    // Events: newest first, one metrics event per step, pagination that ends.
    let events = all_events(&app, &key, &id).await;
    assert_eq!(metrics_steps(&events), (1..=24).collect::<Vec<_>>());
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Created fine-tuning job")
    );
    assert!(
        events.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("successfully completed")
    );
    for e in &events {
        assert_eq!(e["object"], "fine_tuning.job.event");
        assert!(["info", "warn", "error"].contains(&e["level"].as_str().unwrap()));
    }
    let metric = events.iter().find(|e| e["type"] == "metrics").unwrap();
    assert!(metric["data"]["train_loss"].is_f64(), "{metric}");
    let (_, page) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{id}/events?limit=2"))
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    assert!(
        page["data"][0]["message"]
            .as_str()
            .unwrap()
            .contains("successfully completed")
    );

    // Checkpoints: latest step first, with metrics and a checkpoint model id.
    let (status, ckpts) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{id}/checkpoints"))
        .await;
    assert_eq!(status, 200);
    let steps: Vec<i64> = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![20, 15, 10, 5]);
    assert_eq!(ckpts["first_id"], ckpts["data"][0]["id"]);
    assert_eq!(
        ckpts["data"][0]["fine_tuned_model_checkpoint"],
        format!("ft:{MODEL}:acme:reviews:{id}:ckpt-step-20")
    );
    assert_eq!(ckpts["data"][0]["metrics"]["step"], 20.0);
    assert!(ckpts["data"][0]["metrics"]["train_loss"].is_f64());

    // The result file: a CSV row per step.
    let result = job["result_files"][0].as_str().unwrap();
    let (status, result_file) = app.get_json(&key, &format!("/v1/files/{result}")).await;
    assert_eq!(status, 200);
    assert_eq!(result_file["purpose"], "fine-tune-results");
    let csv = app
        .client
        .get(app.url(&format!("/v1/files/{result}/content")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("step,epoch,"), "{csv}");
    assert!(lines[0].contains("train_loss"), "{csv}");
    assert_eq!(lines.len(), 25, "{csv}");
    assert!(lines[24].starts_with("24,"), "{csv}");

    // The model files are in the artifact store.
    assert!(
        app.data_dir
            .path()
            .join(format!("artifacts/models/{id}/weights.json"))
            .exists()
    );

    // Streaming a finished job replays its events and ends.
    let body = app
        .client
        .get(app.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(body.matches("\"type\":\"metrics\"").count(), 24);

    // Another project sees nothing; a fine-tuned model can be fine-tuned further.
    let other = app.key_for("other").await;
    let (status, _) = app
        .get_json(&other, &format!("/v1/fine_tuning/jobs/{id}"))
        .await;
    assert_eq!(status, 404);
    let (status, again) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({"model": job["fine_tuned_model"], "training_file": file,
               "hyperparameters": {"n_epochs": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    let again = wait_for(
        &app,
        &key,
        again["id"].as_str().unwrap(),
        Duration::from_secs(60),
        |j| j["status"] == "succeeded" || j["status"] == "failed",
    )
    .await;
    assert_eq!(again["status"], "succeeded", "{again}");
    assert!(
        again["fine_tuned_model"]
            .as_str()
            .unwrap()
            .starts_with(&format!("ft:{MODEL}:acme::"))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_running_job_streams_its_events_until_it_ends() {
    let app = spawn_app(ToyExecutor::new(2000), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 20).await;
    let job = create_job(&app, &key, &file, json!({"n_epochs": 2, "batch_size": 2})).await;
    let id = job["id"].as_str().unwrap();
    let res = app
        .client
        .get(app.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = tokio::time::timeout(Duration::from_secs(120), res.text())
        .await
        .expect("the stream ends when the job ends")
        .unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(body.matches("\"type\":\"metrics\"").count(), 20, "{body}");
    assert!(body.contains("successfully completed"));
    app.shutdown().await;
}

#[tokio::test]
async fn bad_requests_name_the_field_and_queue_nothing() {
    let app = spawn_app(ToyExecutor::new(1), 0).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let other_key = app.key_for("other").await;
    let others_file = upload_processed(&app, &other_key, 12).await;
    let broken = app
        .upload(&key, "fine-tune", "bad.jsonl", b"{\"text\": 1}\n".to_vec())
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_validated(&key, &broken).await;
    let batch_file = app
        .upload(&key, "batch", "b.jsonl", b"{}\n".to_vec())
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let hp = |h: Value| json!({"type": "supervised", "supervised": {"hyperparameters": h}});
    let cases = [
        (json!({"training_file": file}), "model"),
        (
            json!({"model": "no/such-model", "training_file": file}),
            "model",
        ),
        (
            json!({"model": "../../etc", "training_file": file}),
            "model",
        ),
        (
            json!({"model": "ft:nothing:acme::ftjob-x", "training_file": file}),
            "model",
        ),
        (json!({"model": MODEL}), "training_file"),
        (
            json!({"model": MODEL, "training_file": "file-missing"}),
            "training_file",
        ),
        (
            json!({"model": MODEL, "training_file": others_file}),
            "training_file",
        ),
        (
            json!({"model": MODEL, "training_file": broken}),
            "training_file",
        ),
        (
            json!({"model": MODEL, "training_file": batch_file}),
            "training_file",
        ),
        (
            json!({"model": MODEL, "training_file": file, "validation_file": broken}),
            "validation_file",
        ),
        (
            json!({"model": MODEL, "training_file": file, "method": {"type": "dpo"}}),
            "method.type",
        ),
        (
            json!({"model": MODEL, "training_file": file, "method": {"type": "unsupervised"}}),
            "method.type",
        ),
        (
            json!({"model": MODEL, "training_file": file, "method": hp(json!({"n_epochs": 0}))}),
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            json!({"model": MODEL, "training_file": file, "method": hp(json!({"learning_rate": -1.0}))}),
            "method.supervised.hyperparameters.learning_rate",
        ),
        (
            json!({"model": MODEL, "training_file": file, "method": hp(json!({"strategy": "magic"}))}),
            "method.supervised.hyperparameters.strategy",
        ),
        (
            json!({"model": MODEL, "training_file": file, "method": hp(json!({"colour": "blue"}))}),
            "method.supervised.hyperparameters.colour",
        ),
        (
            json!({"model": MODEL, "training_file": file, "hyperparameters": {"batch_size": -1}}),
            "hyperparameters.batch_size",
        ),
        (
            json!({"model": MODEL, "training_file": file, "suffix": "a:b"}),
            "suffix",
        ),
        (
            json!({"model": MODEL, "training_file": file, "seed": "x"}),
            "seed",
        ),
        (
            json!({"model": MODEL, "training_file": file, "priority": 0}),
            "priority",
        ),
        (
            json!({"model": MODEL, "training_file": file, "metadata": {"k": 1}}),
            "metadata.k",
        ),
        (
            json!({"model": MODEL, "training_file": file, "surprise": true}),
            "surprise",
        ),
    ];
    for (body, param) in cases {
        let (status, err) = post_json(&app, &key, "/v1/fine_tuning/jobs", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {err}");
        assert_eq!(assert_error_shape(&err)["param"], param, "{body} -> {err}");
    }
    let (status, err) = app.get_json(&key, "/v1/fine_tuning/jobs/ftjob-nope").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["param"], "fine_tuning_job_id");
    let (status, _) = post_empty(&app, &key, "/v1/fine_tuning/jobs/ftjob-nope/cancel").await;
    assert_eq!(status, 404);

    let (status, list) = app.get_json(&key, "/v1/fine_tuning/jobs").await;
    assert_eq!(status, 200);
    assert_eq!(list["data"], json!([]), "nothing was queued");
    assert_eq!(list["has_more"], false);
    app.shutdown().await;
}

#[tokio::test]
async fn idempotency_keys_make_exactly_one_job_per_key_under_concurrency() {
    let app = spawn_app(ToyExecutor::new(1), 0).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let body = json!({"model": MODEL, "training_file": file});

    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = app.client.clone();
        let url = app.url("/v1/fine_tuning/jobs");
        let (key, body) = (key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let res = client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", format!("key-{}", i % 40))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (i % 40, status, res.json::<Value>().await.unwrap())
        }));
    }
    let mut ids: Vec<Option<String>> = vec![None; 40];
    for t in tasks {
        let (k, status, job) = t.await.unwrap();
        assert_eq!(status, 200, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        match &ids[k] {
            Some(seen) => assert_eq!(seen, &id, "one job per key"),
            None => ids[k] = Some(id),
        }
    }
    let (_, list) = app.get_json(&key, "/v1/fine_tuning/jobs?limit=100").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 40);

    // The same key with another body is refused; without a key, a second job is made.
    let res = app
        .client
        .post(app.url("/v1/fine_tuning/jobs"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "key-0")
        .json(&json!({"model": MODEL, "training_file": file, "seed": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "idempotency_key_reused");
    let (status, _) = post_json(&app, &key, "/v1/fine_tuning/jobs", body.clone()).await;
    assert_eq!(status, 200);
    let (_, list) = app.get_json(&key, "/v1/fine_tuning/jobs?limit=100").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 41);
    app.shutdown().await;
}

#[tokio::test]
async fn jobs_list_newest_first_with_cursor_and_metadata_filter() {
    let app = spawn_app(ToyExecutor::new(1), 0).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let (_, job) = post_json(
            &app,
            &key,
            "/v1/fine_tuning/jobs",
            json!({"model": MODEL, "training_file": file, "metadata": {"team": team}}),
        )
        .await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    ids.reverse();
    let (_, page) = app.get_json(&key, "/v1/fine_tuning/jobs?limit=2").await;
    let got: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[0].as_str(), ids[1].as_str()]);
    assert_eq!(page["has_more"], true);
    let (_, page) = app
        .get_json(
            &key,
            &format!("/v1/fine_tuning/jobs?limit=10&after={}", ids[1]),
        )
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    assert_eq!(page["has_more"], false);
    let (_, page) = app
        .get_json(&key, "/v1/fine_tuning/jobs?metadata[team]=b")
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let (_, page) = app
        .get_json(&key, "/v1/fine_tuning/jobs?metadata=null")
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 0);
    let (status, err) = app.get_json(&key, "/v1/fine_tuning/jobs?limit=0").await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "limit");
    app.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_queued_job_is_immediate_and_a_running_one_stops_within_5_s() {
    let app = spawn_app(ToyExecutor::new(10000), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 40).await;
    // A long job holds the only slot; the second waits.
    let running = create_job(&app, &key, &file, json!({"n_epochs": 50, "batch_size": 2})).await;
    let running_id = running["id"].as_str().unwrap().to_owned();
    wait_for(&app, &key, &running_id, Duration::from_secs(30), |j| {
        j["progress"]["step"].as_u64().is_some_and(|s| s >= 3)
    })
    .await;
    let queued = create_job(&app, &key, &file, json!({"n_epochs": 1})).await;
    let queued_id = queued["id"].as_str().unwrap();

    let (status, job) = post_empty(
        &app,
        &key,
        &format!("/v1/fine_tuning/jobs/{queued_id}/cancel"),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "cancelled");
    assert!(job["finished_at"].is_i64());

    let asked = Instant::now();
    let (status, job) = post_empty(
        &app,
        &key,
        &format!("/v1/fine_tuning/jobs/{running_id}/cancel"),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let job = wait_for(&app, &key, &running_id, Duration::from_secs(5), |j| {
        j["status"] == "cancelled"
    })
    .await;
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert!(job["fine_tuned_model"].is_null());
    let last_step = job["progress"]["step"].as_u64().unwrap();
    assert!(last_step < 2000, "stopped long before the end");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = wait_for(&app, &key, &running_id, Duration::from_secs(1), |_| true).await;
    assert_eq!(
        after["progress"]["step"], last_step,
        "no training after the cancel"
    );

    // Cancelling again is harmless; a finished job cannot be paused or resumed.
    let (status, _) = post_empty(
        &app,
        &key,
        &format!("/v1/fine_tuning/jobs/{running_id}/cancel"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, err) = post_empty(
        &app,
        &key,
        &format!("/v1/fine_tuning/jobs/{running_id}/resume"),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    app.shutdown().await;
}

#[tokio::test]
async fn pause_checkpoints_and_frees_the_slot_and_resume_continues_from_there() {
    let app = spawn_app(ToyExecutor::new(20000), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 20).await;
    let long = create_job(
        &app,
        &key,
        &file,
        json!({"n_epochs": 6, "batch_size": 2, "checkpoint_every_steps": 1000}),
    )
    .await;
    let long_id = long["id"].as_str().unwrap().to_owned();
    wait_for(&app, &key, &long_id, Duration::from_secs(30), |j| {
        j["progress"]["step"].as_u64().is_some_and(|s| s >= 5)
    })
    .await;
    let (status, job) =
        post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{long_id}/pause")).await;
    assert_eq!(status, 200, "{job}");
    let paused = wait_for(&app, &key, &long_id, Duration::from_secs(10), |j| {
        j["paused"] == true
    })
    .await;
    assert_eq!(
        paused["status"], "queued",
        "strict clients see a paused job as queued"
    );
    let (_, ckpts) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{long_id}/checkpoints"))
        .await;
    let paused_at = ckpts["data"][0]["step_number"]
        .as_u64()
        .expect("pausing saved a checkpoint");
    assert!(paused_at >= 5);

    // The slot is free: another job runs to completion while the first stays paused.
    let short = create_job(&app, &key, &file, json!({"n_epochs": 1, "batch_size": 10})).await;
    let short = wait_for(
        &app,
        &key,
        short["id"].as_str().unwrap(),
        Duration::from_secs(60),
        |j| j["status"] == "succeeded",
    )
    .await;
    assert_eq!(short["status"], "succeeded");
    let still = wait_for(&app, &key, &long_id, Duration::from_secs(1), |_| true).await;
    assert_eq!(still["paused"], true);

    let (status, job) = post_empty(
        &app,
        &key,
        &format!("/v1/fine_tuning/jobs/{long_id}/resume"),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["paused"], false);
    let done = wait_for(&app, &key, &long_id, Duration::from_secs(90), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // The second attempt started right after the checkpoint: no step before it was redone.
    let events = all_events(&app, &key, &long_id).await;
    let resumed = events
        .iter()
        .position(|e| e["message"] == format!("Resumed from the checkpoint of step {paused_at}"))
        .expect("the engine resumed from the pause checkpoint");
    let after: Vec<u64> = metrics_steps(&events[resumed..]);
    assert_eq!(after.first().copied(), Some(paused_at + 1));
    assert_eq!(*after.last().unwrap(), 60);
    let (status, err) =
        post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{long_id}/pause")).await;
    assert_eq!(status, 400, "{err}");
    app.shutdown().await;
}

#[tokio::test]
async fn higher_priority_jobs_are_claimed_first() {
    let executor = ToyExecutor::new(1);
    let app = spawn_app(executor.clone(), 0).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let mut jobs = Vec::new();
    for priority in [9, 1, 5, 1] {
        let (status, job) = post_json(
            &app,
            &key,
            "/v1/fine_tuning/jobs",
            json!({"model": MODEL, "training_file": file, "priority": priority,
                   "hyperparameters": {"n_epochs": 1}}),
        )
        .await;
        assert_eq!(status, 200, "{job}");
        jobs.push(job["id"].as_str().unwrap().to_owned());
    }
    // A worker process with one slot joins and drains the queue.
    let models = app.data_dir.path().join("models");
    let workers = kiln::server::start_workers(
        &app.db.url,
        app.data_dir.path(),
        models,
        kiln::worker::WorkerSettings {
            slots: 1,
            executor: Some(executor),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for id in &jobs {
        wait_for(&app, &key, id, Duration::from_secs(60), |j| {
            j["status"] == "succeeded"
        })
        .await;
    }
    // Compare by the database's own order of claims: attempt start events' sequence.
    let claim_order: Vec<String> = {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT job_id FROM fine_tuning_job_events
             WHERE message = 'Fine-tuning job started' ORDER BY seq",
        )
        .fetch_all(&sqlx::PgPool::connect(&app.db.url).await.unwrap())
        .await
        .unwrap();
        rows.into_iter().map(|r| r.0).collect()
    };
    assert_eq!(
        claim_order,
        vec![
            jobs[1].clone(),
            jobs[3].clone(),
            jobs[2].clone(),
            jobs[0].clone()
        ],
        "priority 1 (oldest first), then 5, then 9"
    );
    workers.shutdown().await;
    app.shutdown().await;
}

/// Scheduling by device memory: a job states what it needs (`device_memory_gb`), and a
/// worker whose device has `memory_bytes` claims it only while it fits in what the jobs
/// already running there leave free. A job larger than the device stays queued while smaller
/// ones behind it run.
#[tokio::test]
async fn workers_claim_only_jobs_that_fit_in_their_free_device_memory() {
    let executor = ToyExecutor::new(200);
    let app = spawn_app(executor.clone(), 0).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let create = |gb: Value| {
        let (app, key, file) = (&app, &key, &file);
        async move {
            post_json(
                app,
                key,
                "/v1/fine_tuning/jobs",
                json!({"model": MODEL, "training_file": file, "device_memory_gb": gb,
                       "hyperparameters": {"n_epochs": 4}}),
            )
            .await
        }
    };
    for bad in [
        json!(0),
        json!(-2),
        json!("8"),
        json!(true),
        json!(1e6),
        json!([1]),
    ] {
        let (status, err) = create(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_eq!(err["error"]["param"], "device_memory_gb", "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("gigabytes"),
            "{err}"
        );
    }
    let (_, list) = app.get_json(&key, "/v1/fine_tuning/jobs").await;
    assert_eq!(list["data"], json!([]), "refused requests queue nothing");

    let mut ids = Vec::new();
    for gb in [30.0, 20.0, 50.0, 5.0] {
        let (status, job) = create(json!(gb)).await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["device_memory_gb"], gb, "{job}");
        assert_eq!(job["device_memory_estimated"], false, "{job}");
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let (big, other, huge, small) = (&ids[0], &ids[1], &ids[2], &ids[3]);

    // One device with 40 GB and two slots: 30 + 5 fit together, 30 + 20 do not, 50 never.
    let workers = kiln::server::start_workers(
        &app.db.url,
        app.data_dir.path(),
        app.data_dir.path().join("models"),
        kiln::worker::WorkerSettings {
            slots: 2,
            devices: vec![kiln::worker::SlotDevice {
                memory_bytes: Some(40_000_000_000),
                ..kiln::worker::SlotDevice::cpu()
            }],
            executor: Some(executor),
            poll_interval: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for id in [big, other, small] {
        wait_for(&app, &key, id, Duration::from_secs(120), |j| {
            j["status"] == "succeeded"
        })
        .await;
    }
    // Give the worker a few more polls: the 50 GB job must still be waiting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, job) = app
        .get_json(&key, &format!("/v1/fine_tuning/jobs/{huge}"))
        .await;
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(job["attempt"], 0, "never claimed: {job}");

    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let span = |id: &str| {
        let pool = pool.clone();
        let id = id.to_owned();
        async move {
            let (started, finished): (
                chrono::DateTime<chrono::Utc>,
                chrono::DateTime<chrono::Utc>,
            ) = sqlx::query_as(
                "SELECT started_at, finished_at FROM fine_tuning_jobs WHERE id = $1",
            )
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
            (started, finished)
        }
    };
    let (big_span, other_span, small_span) =
        (span(big).await, span(other).await, span(small).await);
    // The 20 GB job is behind the 30 GB one in the queue and did not fit beside it: it
    // started only once the 30 GB job had finished.
    assert!(
        other_span.0 >= big_span.1,
        "30 + 20 GB ran at once on a 40 GB device: {big_span:?} {other_span:?}"
    );
    // The 5 GB job, queued last, did not wait for the 20 GB one: it fitted beside the 30.
    assert!(
        small_span.0 < other_span.0,
        "the small job waited behind one that did not fit: {small_span:?} {other_span:?}"
    );
    workers.shutdown().await;
    app.shutdown().await;
}

#[tokio::test]
async fn infrastructure_faults_are_retried_and_user_errors_are_not() {
    let flaky = Arc::new(ToyExecutor {
        flaky_attempts: 1,
        ..ToyExecutor::plain(1)
    });
    let app = spawn_app(flaky.clone(), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let job = create_job(&app, &key, &file, json!({"n_epochs": 1})).await;
    let id = job["id"].as_str().unwrap();
    let job = wait_for(&app, &key, id, Duration::from_secs(30), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2);
    let events = all_events(&app, &key, id).await;
    assert!(events.iter().any(|e| {
        e["level"] == "warn"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("simulated fault on attempt 1")
    }));
    app.shutdown().await;

    // Always failing: gives up after max_attempts.
    let broken = Arc::new(ToyExecutor {
        flaky_attempts: 100,
        ..ToyExecutor::plain(1)
    });
    let app = spawn_app(broken.clone(), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let job = create_job(&app, &key, &file, json!({"n_epochs": 1})).await;
    let job = wait_for(
        &app,
        &key,
        job["id"].as_str().unwrap(),
        Duration::from_secs(30),
        |j| j["status"] == "failed",
    )
    .await;
    assert_eq!(job["error"]["code"], "infrastructure_error");
    assert_eq!(broken.started.load(std::sync::atomic::Ordering::SeqCst), 3);
    app.shutdown().await;

    // A user error fails at once.
    let wrong = Arc::new(ToyExecutor {
        user_error: Some("label column is empty".into()),
        ..ToyExecutor::plain(1)
    });
    let app = spawn_app(wrong.clone(), 1).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let job = create_job(&app, &key, &file, json!({"n_epochs": 1})).await;
    let job = wait_for(
        &app,
        &key,
        job["id"].as_str().unwrap(),
        Duration::from_secs(30),
        |j| j["status"] == "failed",
    )
    .await;
    assert_eq!(job["error"]["message"], "label column is empty");
    assert_eq!(job["error"]["code"], "training_failed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(wrong.started.load(std::sync::atomic::Ordering::SeqCst), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn without_a_training_engine_jobs_fail_with_a_clear_message() {
    let app = TestApp::spawn_with(|s| {
        jobs_support::install_model(&s.models_dir);
        s.jobs.executor = None;
    })
    .await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 12).await;
    let job = create_job(&app, &key, &file, json!({})).await;
    let job = wait_for(
        &app,
        &key,
        job["id"].as_str().unwrap(),
        Duration::from_secs(30),
        |j| j["status"] == "failed",
    )
    .await;
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no training engine configured")
    );
    app.shutdown().await;
}

#[tokio::test]
async fn event_streams_are_capped_and_a_closed_stream_frees_its_place() {
    // No training slots: the job stays queued and its stream stays open.
    let app = TestApp::spawn_with(|s| {
        jobs_support::install_model(&s.models_dir);
        s.jobs.slots = 0;
        s.api.max_streams = 1;
    })
    .await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 20).await;
    let job = create_job(&app, &key, &file, json!({"n_epochs": 1})).await;
    let url = app.url(&format!(
        "/v1/fine_tuning/jobs/{}/events?stream=true",
        job["id"].as_str().unwrap()
    ));
    let open = |app: &TestApp| app.client.get(&url).bearer_auth(&key).send();
    let first = open(&app).await.unwrap();
    assert_eq!(first.status(), 200);
    let second = open(&app).await.unwrap();
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    // The events list still answers.
    let (status, _) = app
        .get_json(
            &key,
            &format!(
                "/v1/fine_tuning/jobs/{}/events",
                job["id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(status, 200);
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = open(&app).await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed stream's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_file_an_unfinished_job_trains_on_cannot_be_deleted_and_no_job_names_a_deleted_file() {
    let app = spawn_app(ToyExecutor::new(10000), 1).await;
    let key = app.key_for("acme").await;
    let train = upload_processed(&app, &key, 40).await;
    let valid = upload_processed(&app, &key, 20).await;
    let (status, job) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": MODEL, "training_file": train, "validation_file": valid,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 2}}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    wait_for(&app, &key, &id, Duration::from_secs(30), |j| {
        j["status"] == "running"
    })
    .await;

    for file in [&train, &valid] {
        let (status, err) = delete(&app, &key, &format!("/v1/files/{file}")).await;
        assert_eq!(status, 400, "{err}");
        let e = assert_error_shape(&err);
        assert_eq!(e["code"], "file_in_use", "{err}");
        assert_eq!(e["param"], "file_id", "{err}");
        assert!(e["message"].as_str().unwrap().contains(&id), "{err}");
        // Nothing was deleted: the row and the bytes are both still there.
        let res = app
            .client
            .get(app.url(&format!("/v1/files/{file}/content")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(!res.bytes().await.unwrap().is_empty());
    }

    // Once the job has ended, its files may go.
    let (status, _) = post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{id}/cancel")).await;
    assert_eq!(status, 200);
    wait_for(&app, &key, &id, Duration::from_secs(10), |j| {
        j["status"] == "cancelled"
    })
    .await;
    for file in [&train, &valid] {
        let (status, body) = delete(&app, &key, &format!("/v1/files/{file}")).await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = app.get_json(&key, &format!("/v1/files/{file}")).await;
        assert_eq!(status, 404);
    }

    // The insert itself locks the job's files and inserts nothing when one is gone (the
    // request was checked before the delete; the statement ran after it).
    let live = upload_processed(&app, &key, 20).await;
    let project = app.store().ensure_project("acme").await.unwrap();
    let queue = kiln::queue::Queue::new(app.store(), Default::default());
    let method = json!({"type": "supervised", "supervised": {"hyperparameters": {}}});
    for (training, validation, missing) in [
        (train.as_str(), None, "training_file"),
        (live.as_str(), Some(valid.as_str()), "validation_file"),
    ] {
        let job = kiln::queue::NewJob {
            id: &format!("ftjob-gone-{missing}"),
            project_id: &project,
            model: MODEL,
            base_model: MODEL,
            training_file: training,
            validation_file: validation,
            training_format: "text_classification",
            suffix: None,
            seed: 1,
            metadata: None,
            integrations: None,
            method: &method,
            priority: 0,
            idempotency: None,
            device_memory: None,
        };
        match queue.insert_job(&job).await.unwrap() {
            kiln::queue::InsertOutcome::FileGone(param) => assert_eq!(param, missing),
            other => panic!("a job was queued on a deleted file: {other:?}"),
        }
        let (status, _) = app
            .get_json(&key, &format!("/v1/fine_tuning/jobs/ftjob-gone-{missing}"))
            .await;
        assert_eq!(status, 404);
    }

    // A delete racing job creations: either it wins and no job was created from the file,
    // or a job won and the delete was refused. Never a job naming a file that is gone.
    for round in 0..3 {
        let file = upload_processed(&app, &key, 40).await;
        let creates = (0..8u64).map(|i| {
            let (app, key, file) = (&app, &key, &file);
            async move {
                tokio::time::sleep(Duration::from_millis(2 * i)).await;
                post_json(
                    app,
                    key,
                    "/v1/fine_tuning/jobs",
                    json!({
                        "model": MODEL, "training_file": file, "suffix": format!("r{round}-{i}"),
                        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
                    }),
                )
                .await
            }
        });
        let path = format!("/v1/files/{file}");
        let (created, (deleted, body)) =
            tokio::join!(futures_util::future::join_all(creates), async {
                tokio::time::sleep(Duration::from_millis([0, 6, 40][round])).await;
                delete(&app, &key, &path).await
            });
        let made: Vec<&Value> = created
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, j)| j)
            .collect();
        for (status, err) in created.iter().filter(|(s, _)| *s != 200) {
            assert_eq!(*status, 400, "{err}");
            assert_eq!(assert_error_shape(err)["param"], "training_file", "{err}");
        }
        eprintln!(
            "round {round}: delete {deleted}, {} of 8 jobs created",
            made.len()
        );
        match deleted {
            200 => assert!(made.is_empty(), "jobs were created from a deleted file"),
            400 => {
                assert_eq!(assert_error_shape(&body)["code"], "file_in_use", "{body}");
                assert!(
                    !made.is_empty(),
                    "refused, yet no job uses the file: {body}"
                );
                let (status, _) = app.get_json(&key, &path).await;
                assert_eq!(status, 200, "a refused delete keeps the file");
            }
            other => panic!("delete answered {other}: {body}"),
        }
        for job in made {
            let id = job["id"].as_str().unwrap();
            post_empty(&app, &key, &format!("/v1/fine_tuning/jobs/{id}/cancel")).await;
        }
    }
    app.shutdown().await;
}

/// `GET /v1/models` is streamed a page of rows at a time (it grows with every checkpoint):
/// across several pages every model and checkpoint appears once, newest first, and the
/// answer is the same list the API gives one object at a time.
#[tokio::test]
async fn the_models_list_streams_every_model_and_checkpoint_once_across_pages() {
    let app = spawn_app(ToyExecutor::new(0), 2).await;
    let key = app.key_for("acme").await;
    let file = upload_processed(&app, &key, 160).await;
    // 2 × 160 steps with a checkpoint at each: 640 checkpoints, several pages of 256.
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let job = create_job(
            &app,
            &key,
            &file,
            json!({"n_epochs": 2, "batch_size": 1, "checkpoint_every_steps": 1}),
        )
        .await;
        jobs.push(job["id"].as_str().unwrap().to_owned());
    }
    let mut expected = std::collections::BTreeSet::new();
    for id in &jobs {
        let job = wait_for(&app, &key, id, Duration::from_secs(120), |j| {
            j["finished_at"].is_number()
        })
        .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        expected.insert(job["fine_tuned_model"].as_str().unwrap().to_owned());
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100&after={a}"),
                None => format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100"),
            };
            let (status, page) = app.get_json(&key, &path).await;
            assert_eq!(status, 200, "{page}");
            for c in page["data"].as_array().unwrap() {
                expected.insert(
                    c["fine_tuned_model_checkpoint"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                );
                after = Some(c["id"].as_str().unwrap().to_owned());
            }
            if page["has_more"] != true {
                break;
            }
        }
    }
    assert_eq!(expected.len(), 2 + 2 * 320);

    let res = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "application/json",
        "{:?}",
        res.headers()
    );
    assert!(
        res.headers().get("content-length").is_none(),
        "streamed, not built whole: {:?}",
        res.headers()
    );
    let list: Value = res.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], false);
    let data = list["data"].as_array().unwrap();
    let bases = data.iter().take_while(|m| m["kind"] == "base").count();
    assert!(
        data[bases..].iter().all(|m| m["kind"] != "base"),
        "base models first"
    );
    let tuned: Vec<&Value> = data.iter().filter(|m| m["kind"] != "base").collect();
    let ids: Vec<String> = tuned
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "no model listed twice");
    assert_eq!(
        unique, expected,
        "every model and checkpoint, and nothing else"
    );
    let created: Vec<i64> = tuned
        .iter()
        .map(|m| m["created"].as_i64().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");
    // Each entry is what the API says about that model alone.
    for m in [tuned[0], tuned[300], tuned[tuned.len() - 1]] {
        let id = m["id"].as_str().unwrap();
        let (status, one) = app.get_json(&key, &format!("/v1/models/{id}")).await;
        assert_eq!(status, 200, "{one}");
        assert_eq!(&one, m);
    }
    // Another project's list holds none of them.
    let other = app.key_for("globex").await;
    let (_, list) = app.get_json(&other, "/v1/models").await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["kind"] == "base")
    );
    app.shutdown().await;
}
