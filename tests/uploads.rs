//! The Uploads API (`/v1/uploads`) as a user sees it: a file sent in parts and assembled in
//! the order the client names, MD5 checked; bad requests named by field; cancelled,
//! completed and expired uploads refusing more; and parts never left behind.

mod common;
mod jobs_support;

use std::path::PathBuf;

use common::{TestApp, assert_error_shape, classification_jsonl, count_files};
use jobs_support::post_json;
use md5::{Digest, Md5};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::Sha256;

async fn create(app: &TestApp, key: &str, bytes: usize, purpose: &str) -> String {
    let (status, upload) = post_json(
        app,
        key,
        "/v1/uploads",
        json!({"bytes": bytes, "filename": "train.jsonl", "mime_type": "text/jsonl", "purpose": purpose}),
    )
    .await;
    assert_eq!(status, 200, "{upload}");
    upload["id"].as_str().unwrap().to_owned()
}

async fn add_part(app: &TestApp, key: &str, upload: &str, data: Vec<u8>) -> (u16, Value) {
    let form = Form::new().part("data", Part::bytes(data).file_name("blob"));
    let res = app
        .client
        .post(app.url(&format!("/v1/uploads/{upload}/parts")))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn part_id(app: &TestApp, key: &str, upload: &str, data: &[u8]) -> String {
    let (status, part) = add_part(app, key, upload, data.to_vec()).await;
    assert_eq!(status, 200, "{part}");
    part["id"].as_str().unwrap().to_owned()
}

fn parts_dir(app: &TestApp) -> PathBuf {
    app.data_dir.path().join("artifacts").join("uploads")
}

fn expect_error(status: u16, body: &Value, want_status: u16, param: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    let err = assert_error_shape(body);
    assert_eq!(err["param"], param, "{body}");
    err["message"].as_str().unwrap().to_owned()
}

/// A completed, cancelled or expired upload (`word` names which) refuses parts and
/// completion.
async fn assert_closed(app: &TestApp, key: &str, id: &str, part: &str, word: &str) {
    let (status, err) = add_part(app, key, id, b"x".to_vec()).await;
    let message = expect_error(status, &err, 400, "upload_id");
    assert!(message.contains(word), "{message}");
    assert_eq!(err["error"]["code"], "invalid_upload_state");
    let (status, err) = post_json(
        app,
        key,
        &format!("/v1/uploads/{id}/complete"),
        json!({ "part_ids": [part] }),
    )
    .await;
    let message = expect_error(status, &err, 400, "upload_id");
    assert!(message.contains(word), "{message}");
}

/// Moves an upload's expiry to `minutes` ago.
async fn expired_since(app: &TestApp, id: &str, minutes: i32) {
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    sqlx::query("UPDATE uploads SET expires_at = now() - make_interval(mins => $2) WHERE id = $1")
        .bind(id)
        .bind(minutes)
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn parts_become_one_file_in_the_order_listed() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let data = classification_jsonl(40);
    let (a, rest) = data.split_at(300);
    let (b, c) = rest.split_at(500);
    let id = create(&app, &key, data.len(), "fine-tune").await;
    assert!(id.starts_with("upload_"), "{id}");

    let (status, upload) = app.get_json(&key, &format!("/v1/uploads/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(upload["object"], "upload");
    assert_eq!(upload["status"], "pending");
    assert_eq!(upload["bytes"], data.len());
    assert_eq!(upload["mime_type"], "text/jsonl");
    assert_eq!(upload["file"], Value::Null);
    let created = upload["created_at"].as_i64().unwrap();
    assert_eq!(upload["expires_at"].as_i64().unwrap() - created, 3600);

    // Sent out of order (as parallel senders would), listed in order.
    let pc = part_id(&app, &key, &id, c).await;
    let (status, part) = add_part(&app, &key, &id, a.to_vec()).await;
    assert_eq!(status, 200, "{part}");
    assert_eq!(part["object"], "upload.part");
    assert_eq!(part["upload_id"], id.as_str());
    let pa = part["id"].as_str().unwrap().to_owned();
    let pb = part_id(&app, &key, &id, b).await;
    assert_eq!(count_files(&parts_dir(&app)), 3);

    let md5 = hex::encode(Md5::digest(&data));
    let (status, done) = post_json(
        &app,
        &key,
        &format!("/v1/uploads/{id}/complete"),
        json!({"part_ids": [pa, pb, pc], "md5": md5}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["status"], "completed");
    let file = &done["file"];
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], data.len());
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["sha256"], hex::encode(Sha256::digest(&data)));
    let file_id = file["id"].as_str().unwrap().to_owned();

    // An ordinary file from here on: validated, downloadable.
    let validated = app.wait_validated(&key, &file_id).await;
    assert_eq!(validated["status"], "processed", "{validated}");
    assert_eq!(validated["validation"]["examples"], 40);
    assert_eq!(app.file_content(&key, &file_id).await, data);

    // The parts are gone; the upload shows its file.
    assert_eq!(count_files(&parts_dir(&app)), 0);
    let (_, upload) = app.get_json(&key, &format!("/v1/uploads/{id}")).await;
    assert_eq!(upload["status"], "completed");
    assert_eq!(upload["file"]["id"], file_id.as_str());

    // A completed upload takes nothing more.
    assert_closed(&app, &key, &id, &pa, "completed").await;
    let (status, body) =
        post_json(&app, &key, &format!("/v1/uploads/{id}/cancel"), json!({})).await;
    expect_error(status, &body, 400, "upload_id");
    assert_eq!(count_files(&parts_dir(&app)), 0);

    // Deleting the file leaves the upload completed, without a file.
    let res = app
        .client
        .delete(app.url(&format!("/v1/files/{file_id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (_, upload) = app.get_json(&key, &format!("/v1/uploads/{id}")).await;
    assert_eq!(upload["status"], "completed");
    assert_eq!(upload["file"], Value::Null);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_uploads_are_refused_with_the_field_named() {
    let app = TestApp::spawn_with(|s| s.api.max_large_upload_bytes = 1000).await;
    let key = app.key_for("acme").await;
    let good = json!({"bytes": 10, "filename": "a.jsonl", "mime_type": "text/jsonl", "purpose": "fine-tune"});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    for (body, param) in [
        (without("bytes"), "bytes"),
        (without("filename"), "filename"),
        (without("mime_type"), "mime_type"),
        (without("purpose"), "purpose"),
        (with("bytes", json!(-1)), "bytes"),
        (with("bytes", json!("ten")), "bytes"),
        (with("bytes", json!(1001)), "bytes"),
        (with("purpose", json!("nonsense")), "purpose"),
        (with("filename", json!("  ")), "filename"),
        (with("mime_type", json!("")), "mime_type"),
        (with("colour", json!("blue")), "colour"),
    ] {
        let (status, err) = post_json(&app, &key, "/v1/uploads", body.clone()).await;
        expect_error(status, &err, 400, param);
    }
    // The limit is named, and exactly at it is fine.
    let (status, err) = post_json(&app, &key, "/v1/uploads", with("bytes", json!(1001))).await;
    assert!(expect_error(status, &err, 400, "bytes").contains("1000"));
    let (status, _) = post_json(&app, &key, "/v1/uploads", with("bytes", json!(1000))).await;
    assert_eq!(status, 200);
    // OpenAI's `expires_after` is accepted (kiln keeps files until deleted).
    let (status, _) = post_json(
        &app,
        &key,
        "/v1/uploads",
        with(
            "expires_after",
            json!({"anchor": "created_at", "seconds": 3600}),
        ),
    )
    .await;
    assert_eq!(status, 200);

    let id = create(&app, &key, 10, "batch").await;
    // A part without `data`, or an empty one.
    let form = Form::new().text("other", "x");
    let res = app
        .client
        .post(app.url(&format!("/v1/uploads/{id}/parts")))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    expect_error(status, &res.json().await.unwrap(), 400, "data");
    let (status, err) = add_part(&app, &key, &id, Vec::new()).await;
    expect_error(status, &err, 400, "data");
    let (status, err) = add_part(&app, &key, "upload_nope", b"x".to_vec()).await;
    expect_error(status, &err, 404, "upload_id");

    // Completion: parts that are not the upload's, listed twice, the wrong total, a
    // malformed or wrong MD5. Each is refused and the upload still completes afterwards.
    let p1 = part_id(&app, &key, &id, b"01234").await;
    let p2 = part_id(&app, &key, &id, b"56789").await;
    let other = create(&app, &key, 10, "batch").await;
    let foreign = part_id(&app, &key, &other, b"xxxxx").await;
    let complete_path = format!("/v1/uploads/{id}/complete");
    let complete = |body: Value| post_json(&app, &key, &complete_path, body);
    for (body, param) in [
        (json!({}), "part_ids"),
        (json!({"part_ids": "p"}), "part_ids"),
        (json!({"part_ids": [p1, foreign]}), "part_ids"),
        (json!({"part_ids": [p1, "part_nope"]}), "part_ids"),
        (json!({"part_ids": [p1, p1]}), "part_ids"),
        (json!({"part_ids": [p1]}), "part_ids"),
        (json!({"part_ids": [p1, p2], "md5": "abc"}), "md5"),
        (
            json!({"part_ids": [p1, p2], "md5": hex::encode(Md5::digest(b"9876543210"))}),
            "md5",
        ),
        (json!({"part_ids": [p1, p2], "extra": 1}), "extra"),
    ] {
        let (status, err) = complete(body.clone()).await;
        let message = expect_error(status, &err, 400, param);
        if body["part_ids"] == json!([p1]) {
            assert!(
                message.contains("5 bytes") && message.contains("10"),
                "{message}"
            );
        }
    }
    let (_, files) = app.get_json(&key, "/v1/files").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 0, "no file yet");
    let (status, done) =
        complete(json!({"part_ids": [p2, p1], "md5": hex::encode(Md5::digest(b"5678901234"))}))
            .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["file"]["bytes"], 10);

    // Another project sees none of it.
    let stranger = app.key_for("other").await;
    let (status, err) = app
        .get_json(&stranger, &format!("/v1/uploads/{other}"))
        .await;
    expect_error(status, &err, 404, "upload_id");
    let (status, err) = add_part(&app, &stranger, &other, b"x".to_vec()).await;
    expect_error(status, &err, 404, "upload_id");
    let (status, err) = post_json(
        &app,
        &stranger,
        &format!("/v1/uploads/{other}/cancel"),
        json!({}),
    )
    .await;
    expect_error(status, &err, 404, "upload_id");
    app.shutdown().await;
}

#[tokio::test]
async fn parts_are_capped_at_64_mib_and_at_what_the_upload_can_use() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let id = create(&app, &key, 3, "batch").await;
    const MIB64: usize = 64 * 1024 * 1024;
    let (status, err) = add_part(&app, &key, &id, vec![b'x'; MIB64 + 1]).await;
    assert_eq!(status, 413, "{err}");
    assert_error_shape(&err);
    assert_eq!(count_files(&parts_dir(&app)), 0);
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts").join("tmp")),
        0,
        "no partial blob"
    );
    // Room for one part more than the upload needs (a retry), and no more.
    part_id(&app, &key, &id, &vec![b'x'; MIB64]).await;
    let p = part_id(&app, &key, &id, b"abc").await;
    let (status, err) = add_part(&app, &key, &id, b"d".to_vec()).await;
    let message = expect_error(status, &err, 400, "data");
    assert!(message.contains("cancel"), "{message}");
    assert_eq!(count_files(&parts_dir(&app)), 2);
    let (status, done) = post_json(
        &app,
        &key,
        &format!("/v1/uploads/{id}/complete"),
        json!({"part_ids": [p]}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(count_files(&parts_dir(&app)), 0, "the unused part goes too");
    app.shutdown().await;
}

#[tokio::test]
async fn cancelled_and_expired_uploads_take_nothing_and_lose_their_parts() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;

    let id = create(&app, &key, 10, "batch").await;
    let p = part_id(&app, &key, &id, b"0123456789").await;
    let (status, cancelled) =
        post_json(&app, &key, &format!("/v1/uploads/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(count_files(&parts_dir(&app)), 0);
    // Cancelling again answers the same; nothing else is taken.
    let (status, again) =
        post_json(&app, &key, &format!("/v1/uploads/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "cancelled");
    assert_closed(&app, &key, &id, &p, "cancelled").await;

    // An upload past its hour reads `expired` and takes nothing.
    let id = create(&app, &key, 10, "batch").await;
    let p = part_id(&app, &key, &id, b"0123456789").await;
    expired_since(&app, &id, 1).await;
    let (_, upload) = app.get_json(&key, &format!("/v1/uploads/{id}")).await;
    assert_eq!(upload["status"], "expired");
    assert_closed(&app, &key, &id, &p, "expired").await;
    let (status, err) = post_json(&app, &key, &format!("/v1/uploads/{id}/cancel"), json!({})).await;
    expect_error(status, &err, 400, "upload_id");

    // The sweep keeps a just-expired upload's parts (a completion may be copying them) and
    // removes them an hour later; a pending upload's parts are never touched.
    let live = create(&app, &key, 10, "batch").await;
    part_id(&app, &key, &live, b"abc").await;
    let artifacts = kiln::artifacts::Artifacts::local(app.data_dir.path().join("artifacts"))
        .await
        .unwrap();
    assert_eq!(kiln::api::uploads::sweep(app.store(), &artifacts).await, 0);
    assert_eq!(count_files(&parts_dir(&app)), 2);
    expired_since(&app, &id, 61).await;
    // (The server's own sweep, at its start and once a minute, may take it first.)
    assert!(kiln::api::uploads::sweep(app.store(), &artifacts).await <= 1);
    assert_eq!(count_files(&parts_dir(&app)), 1);
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_parts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 1, "only the live upload's part");
    app.shutdown().await;
}

/// Two completions at once: one file, one refusal, and the loser's copy removed.
#[tokio::test]
async fn concurrent_completions_make_one_file() {
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let data = classification_jsonl(30);
    let id = create(&app, &key, data.len(), "batch").await;
    let mut ids = Vec::new();
    for chunk in data.chunks(200) {
        ids.push(part_id(&app, &key, &id, chunk).await);
    }
    let path = format!("/v1/uploads/{id}/complete");
    let body = json!({ "part_ids": ids });
    let (a, b) = tokio::join!(
        post_json(&app, &key, &path, body.clone()),
        post_json(&app, &key, &path, body.clone())
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 400], "{a:?} {b:?}");
    let (_, files) = app.get_json(&key, "/v1/files").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts").join("files")),
        1,
        "one stored file"
    );
    assert_eq!(count_files(&parts_dir(&app)), 0);
    app.shutdown().await;
}

/// The files test's generated hostile multipart bodies, sent as parts: each is stored or
/// refused with a 4xx in the OpenAI error shape, never a 5xx; every stored part has its row
/// and its bytes, and a refused one leaves neither.
#[tokio::test]
async fn generated_hostile_parts_are_stored_cleanly_or_refused_with_4xx() {
    use rand::SeedableRng;
    let app = TestApp::spawn().await;
    let key = app.key_for("acme").await;
    let id = create(&app, &key, 1 << 20, "fine-tune").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x70617274);
    let mut statuses = std::collections::BTreeMap::new();
    for case in 0..300 {
        let (content_type, body) = common::hostile_multipart(&mut rng, "data");
        let res = app
            .client
            .post(app.url(&format!("/v1/uploads/{id}/parts")))
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
            200 => assert_eq!(answer["upload_id"], id.as_str(), "case {case}"),
            400 | 413 => {
                assert_error_shape(&answer);
            }
            other => panic!("case {case}: {content_type}: status {other}: {answer}"),
        }
    }
    eprintln!("hostile parts by status: {statuses:?}");
    let stored = statuses.get(&200).copied().unwrap_or(0);
    assert!(
        stored > 0 && statuses.contains_key(&400),
        "the generator covers both outcomes: {statuses:?}"
    );
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM upload_parts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, stored, "a refused part left a row");
    assert_eq!(
        count_files(&parts_dir(&app)),
        stored,
        "part bytes without rows"
    );
    assert_eq!(
        count_files(&app.data_dir.path().join("artifacts").join("tmp")),
        0,
        "a refused part left partial bytes"
    );
    app.shutdown().await;
}
