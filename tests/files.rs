//! The Files API as a user sees it: upload, validation, listing, download, delete,
//! size limits and project isolation.

mod common;

use common::{TestApp, assert_error_shape, classification_jsonl, count_files};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn upload_retrieve_download_and_delete_a_file() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let data = classification_jsonl(12);

    let res = app
        .upload(&key, "fine-tune", "train.jsonl", data.clone())
        .await;
    assert_eq!(res.status(), 200);
    let file: Value = res.json().await.unwrap();
    let id = file["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], data.len());
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["sha256"], hex::encode(Sha256::digest(&data)));
    assert!(file["created_at"].as_i64().unwrap() > 1_600_000_000);

    let (status, got) = app.get_json(&key, &format!("/v1/files/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["id"], id.as_str());

    let res = app
        .client
        .get(app.url(&format!("/v1/files/{id}/content")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().to_vec(), data);

    let res = app
        .client
        .delete(app.url(&format!("/v1/files/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let deleted: Value = res.json().await.unwrap();
    assert_eq!(
        deleted,
        serde_json::json!({"id": id, "object": "file", "deleted": true})
    );

    let (status, body) = app.get_json(&key, &format!("/v1/files/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(assert_error_shape(&body)["param"], "file_id");
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts/files")),
        0,
        "bytes removed with the file"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_valid_dataset_is_processed_with_its_format_and_label_counts() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let res = app
        .upload(&key, "fine-tune", "train.jsonl", classification_jsonl(12))
        .await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let file = app.wait_validated(&key, &id).await;
    assert_eq!(file["status"], "processed", "{file}");
    assert_eq!(file["status_details"], Value::Null);
    let v = &file["validation"];
    assert_eq!(v["format"], "text_classification");
    assert_eq!(v["examples"], 12);
    assert_eq!(v["labels"]["positive"], 6);
    assert_eq!(v["labels"]["negative"], 6);
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_lines_are_reported_with_their_line_numbers() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let mut data = String::from_utf8(classification_jsonl(12)).unwrap();
    data.push_str("{not json\n");
    data.push_str("{\"text\": \"no label here\", \"label\": \"positive\", \"labels\": 3}\n");
    data.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n");
    let res = app
        .upload(&key, "fine-tune", "bad.jsonl", data.into_bytes())
        .await;
    assert_eq!(
        res.status(),
        200,
        "the upload itself succeeds; validation runs after"
    );
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let file = app.wait_validated(&key, &id).await;
    assert_eq!(file["status"], "error", "{file}");
    let details = file["status_details"].as_str().unwrap();
    assert!(
        details.contains("line 13"),
        "bad JSON on line 13: {details}"
    );
    let problems = file["validation"]["problems"].as_array().unwrap();
    let lines: Vec<i64> = problems.iter().filter_map(|p| p["line"].as_i64()).collect();
    assert!(lines.contains(&13), "{problems:?}");
    assert!(
        lines.contains(&15),
        "mixed formats on line 15: {problems:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn too_few_examples_is_a_validation_error() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let res = app
        .upload(&key, "fine-tune", "small.jsonl", classification_jsonl(3))
        .await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = app.wait_validated(&key, &id).await;
    assert_eq!(file["status"], "error");
    assert!(
        file["status_details"].as_str().unwrap().contains("10"),
        "{file}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn files_for_other_purposes_are_not_parsed() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let res = app
        .upload(&key, "batch", "anything.bin", vec![0, 159, 146, 150])
        .await;
    assert_eq!(res.status(), 200);
    let file: Value = res.json().await.unwrap();
    assert_eq!(file["status"], "processed");
    assert_eq!(file["purpose"], "batch");
    app.shutdown().await;
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_and_leaves_nothing_behind() {
    let app = TestApp::spawn_with(|s| s.max_upload_bytes = 100 * 1024).await;
    let key = app.key_for("acme").await;
    let res = app
        .upload(&key, "fine-tune", "big.jsonl", vec![b'x'; 300 * 1024])
        .await;
    assert_eq!(res.status(), 413);
    assert_error_shape(&res.json::<Value>().await.unwrap());

    // Just over the limit, where only the handler's own count can tell.
    let res = app
        .upload(&key, "fine-tune", "big.jsonl", vec![b'x'; 100 * 1024 + 1])
        .await;
    assert_eq!(res.status(), 413);

    let (_, list) = app.get_json(&key, "/v1/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "no row");
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts")),
        0,
        "no partial blob"
    );

    // Exactly at the limit is fine.
    let res = app
        .upload(&key, "batch", "ok.bin", vec![b'x'; 100 * 1024])
        .await;
    assert_eq!(res.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_upload_requests_name_the_field() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;

    let res = app
        .upload(&key, "not-a-purpose", "a.jsonl", classification_jsonl(10))
        .await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(assert_error_shape(&body)["param"], "purpose");

    let form = reqwest::multipart::Form::new().text("purpose", "fine-tune");
    let res = app
        .client
        .post(app.url("/v1/files"))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(assert_error_shape(&body)["param"], "file");

    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("a.jsonl"),
    );
    let res = app
        .client
        .post(app.url("/v1/files"))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(assert_error_shape(&body)["param"], "purpose");

    let res = app
        .client
        .post(app.url("/v1/files"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"purpose": "fine-tune"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_error_shape(&res.json::<Value>().await.unwrap());
    assert_eq!(count_files(&app.data_dir.path().join("artifacts")), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn listing_pages_through_every_file_and_ends() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let purpose = if i == 2 { "batch" } else { "fine-tune" };
        let res = app
            .upload(
                &key,
                purpose,
                &format!("f{i}.jsonl"),
                classification_jsonl(10),
            )
            .await;
        ids.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    // Default order is newest first.
    let (_, all) = app.get_json(&key, "/v1/files").await;
    let listed: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let mut newest_first: Vec<&str> = ids.iter().map(String::as_str).collect();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["object"], "list");

    // Pages of two, oldest first, following the cursor until has_more is false.
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..10 {
        let (status, page) = app
            .get_json(&key, &format!("/v1/files?limit=2&order=asc&after={after}"))
            .await;
        assert_eq!(status, 200);
        let data = page["data"].as_array().unwrap();
        seen.extend(data.iter().map(|f| f["id"].as_str().unwrap().to_owned()));
        assert_eq!(
            page["first_id"],
            data.first().map_or(Value::Null, |f| f["id"].clone())
        );
        assert_eq!(
            page["last_id"],
            data.last().map_or(Value::Null, |f| f["id"].clone())
        );
        if page["has_more"] == false {
            break;
        }
        after = page["last_id"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, ids);

    let (_, batch) = app.get_json(&key, "/v1/files?purpose=batch").await;
    assert_eq!(batch["data"].as_array().unwrap().len(), 1);
    assert_eq!(batch["data"][0]["id"], ids[2].as_str());

    for bad in ["limit=0", "limit=10001", "limit=abc", "order=sideways"] {
        let (status, body) = app.get_json(&key, &format!("/v1/files?{bad}")).await;
        assert_eq!(status, 400, "{bad}");
        let param = bad.split('=').next().unwrap();
        assert_eq!(assert_error_shape(&body)["param"], param);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn another_projects_file_is_404_and_never_listed() {
    let app = TestApp::spawn().await;
    let alice = app.key_for("alice").await;
    let bob = app.key_for("bob").await;
    let res = app
        .upload(
            &alice,
            "fine-tune",
            "secret.jsonl",
            classification_jsonl(10),
        )
        .await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        let res = app
            .client
            .get(app.url(&path))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{path}");
        let body = res.text().await.unwrap();
        assert!(
            !body.contains("secret.jsonl") && !body.contains("example number"),
            "{body}"
        );
    }
    let res = app
        .client
        .delete(app.url(&format!("/v1/files/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let (_, list) = app.get_json(&bob, "/v1/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);

    // Still there for its owner.
    let (status, _) = app.get_json(&alice, &format!("/v1/files/{id}")).await;
    assert_eq!(status, 200);
    app.shutdown().await;
}

#[tokio::test]
async fn validation_interrupted_by_a_restart_finishes_at_the_next_start() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let res = app
        .upload(&key, "fine-tune", "train.jsonl", classification_jsonl(12))
        .await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_validated(&key, &id).await;

    // Put the file back into the state a crash mid-validation would leave, then start a
    // second server on the same database and data directory.
    sqlx::query("UPDATE files SET status = 'uploaded', validated_at = NULL, validation = NULL WHERE id = $1")
        .bind(&id)
        .execute(&kiln_pool(&app.db.url).await)
        .await
        .unwrap();
    let url = app.db.url.clone();
    let dir = app.data_dir.path().to_owned();
    let second = kiln::server::start(kiln::server::Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        database_url: url,
        models_dir: dir.join("models"),
        data_dir: dir,
        admin_key: Some(common::ADMIN_KEY.into()),
        max_upload_bytes: 1 << 20,
        artifacts: None,
        jobs: Default::default(),
        serve: Default::default(),
        webhooks: Default::default(),
        api: Default::default(),
    })
    .await
    .unwrap();
    let file = app.wait_validated(&key, &id).await;
    assert_eq!(file["status"], "processed");
    second.shutdown().await.unwrap();
    app.shutdown().await;
}

async fn kiln_pool(url: &str) -> sqlx::PgPool {
    sqlx::PgPool::connect(url).await.unwrap()
}

/// Writes the start of a multipart upload by hand and then stalls, as a slow client does.
async fn stalled_upload(app: &TestApp, key: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let boundary = "kilnboundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let request = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n{head}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 4096]).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

/// `KILN_MAX_UPLOADS` bounds the uploads in progress: one more gets 429 with `retry-after`
/// (nothing stored), and a place frees when an upload ends, even one the client abandoned.
#[tokio::test]
async fn uploads_in_progress_are_capped_and_an_abandoned_one_frees_its_place() {
    let app = TestApp::spawn_with(|s| s.api.max_uploads = 1).await;
    let key = app.key_for("acme").await;
    let mut stalled = stalled_upload(&app, &key).await;
    // The stalled upload holds the only place once its handler runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        let res = app
            .upload(&key, "fine-tune", "a.jsonl", classification_jsonl(20))
            .await;
        if res.status() == 429 {
            break res;
        }
        // The stalled request may not have reached its handler yet: that upload succeeded.
        assert_eq!(res.status(), 200);
        assert!(std::time::Instant::now() < deadline, "never refused");
        // Or its handler ran while that upload held the place, and it was the one refused
        // (an answer, or a closed connection): start another.
        let mut answer = [0u8; 64];
        match stalled.try_read(&mut answer) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => stalled = stalled_upload(&app, &key).await,
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(assert_error_shape(&body)["code"], "overloaded", "{body}");
    let (_, list) = app.get_json(&key, "/v1/files").await;
    let stored = list["data"].as_array().unwrap().len();

    // The client goes away: its upload ends, leaves nothing, and the place is free again.
    drop(stalled);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let res = app
            .upload(&key, "fine-tune", "b.jsonl", classification_jsonl(20))
            .await;
        if res.status() == 200 {
            break;
        }
        assert_eq!(res.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, list) = app.get_json(&key, "/v1/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), stored + 1);
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["filename"] != "slow.jsonl"),
        "the abandoned upload left no row"
    );
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts").join("tmp")),
        0,
        "the abandoned upload left no partial blob"
    );
    app.shutdown().await;
}

/// Hundreds of generated hostile uploads (bad boundaries, missing or repeated parts,
/// invalid UTF-8, header injection and traversal in file names, truncated bodies): each is
/// stored with a clean name or refused with a 4xx in the OpenAI error shape; none is a 5xx,
/// and a refused upload leaves no row and no partial bytes.
#[tokio::test]
async fn generated_hostile_uploads_are_stored_cleanly_or_refused_with_4xx() {
    use rand::SeedableRng;
    let app = TestApp::spawn_with(|s| s.max_upload_bytes = 64 * 1024).await;
    let key = app.key_for("acme").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6e);
    let mut stored = 0;
    let mut statuses = std::collections::BTreeMap::new();
    for case in 0..300 {
        let (content_type, body) = common::hostile_multipart(&mut rng, "file");
        let res = app
            .client
            .post(app.url("/v1/files"))
            .bearer_auth(&key)
            .header("content-type", content_type.as_str())
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        *statuses.entry(status).or_insert(0) += 1;
        let answer: Value = res.json().await.unwrap_or(Value::Null);
        match status {
            200 => {
                stored += 1;
                let name = answer["filename"].as_str().unwrap();
                assert!(
                    !name.contains('/')
                        && !name.contains('\\')
                        && !name.chars().any(char::is_control),
                    "case {case}: unclean stored name {name:?}"
                );
            }
            400 | 413 => {
                let e = assert_error_shape(&answer);
                assert!(!e["message"].as_str().unwrap().is_empty(), "case {case}");
            }
            other => panic!("case {case}: {content_type}: status {other}: {answer}"),
        }
    }
    eprintln!("hostile uploads by status: {statuses:?}");
    let (_, list) = app.get_json(&key, "/v1/files?limit=1000").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        stored,
        "a refused upload left a row"
    );
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts").join("tmp")),
        0,
        "a refused upload left partial bytes"
    );
    assert!(
        stored > 0 && statuses.contains_key(&400) && statuses.contains_key(&413),
        "the generator covers every outcome: {statuses:?}"
    );
    app.shutdown().await;
}
