//! Vision transfer learning end to end over HTTP, on real data (scikit-learn's handwritten
//! digits): a small ResNet trained from scratch on digits 0-4 is registered as a base model
//! (`POST /v1/models`), then fine-tuned `head_only` on ten images each of digits 5-9; the same
//! network trained from scratch on those fifty images is the comparison, on held-out digits
//! 5-9 (both accuracies printed).
//! The fine-tuned model then answers `/v1/images/classifications`.

mod common;
mod jobs_support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::{TestApp, assert_error_shape};
use jobs_support::{post_json, wait_for};
use serde_json::{Value, json};

/// An architecture only (config.json, no weights): it can only train from scratch.
const ARCH: &str = "kiln-test/digits-resnet";
const REGISTERED: &str = "kiln-test/digits-0-4";

fn write_architecture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "model_type": "resnet",
        "num_channels": 3,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128],
        "depths": [1, 1, 1],
        "layer_type": "basic",
        "hidden_act": "relu",
        "downsample_in_first_stage": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // 8x8 digits, scaled to 32x32: the stem's stride-4 then leaves 8x8 for the stages.
    let pre = json!({
        "do_normalize": true, "do_resize": true, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"height": 32, "width": 32},
        "image_processor_type": "ViTImageProcessor",
    });
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();
}

/// Runs scripts/digits_zip.py; None when python3 or scikit-learn is missing.
fn digits_zip(out: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/digits_zip.py");
    let status = std::process::Command::new("python3")
        .arg(script)
        .arg(out)
        .args(args)
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    std::fs::read(out).ok()
}

async fn upload(app: &TestApp, key: &str, name: &str, bytes: Vec<u8>) -> String {
    let res = app.upload(key, "fine-tune", name, bytes).await;
    let file: Value = res.json().await.unwrap();
    let id = file["id"].as_str().unwrap().to_owned();
    let file = app.wait_validated(key, &id).await;
    assert_eq!(file["status"], "processed", "{file}");
    id
}

async fn train(
    app: &TestApp,
    key: &str,
    model: &str,
    train: &str,
    valid: Option<&str>,
    hp: Value,
) -> Value {
    let (status, job) = post_json(
        app,
        key,
        "/v1/fine_tuning/jobs",
        json!({
            "model": model,
            "training_file": train,
            "validation_file": valid,
            "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let job = wait_for(app, key, &id, Duration::from_secs(900), |j| {
        matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

fn accuracy(job: &Value) -> f64 {
    job["metrics"]["valid_accuracy"]
        .as_f64()
        .unwrap_or_else(|| panic!("no valid_accuracy: {job}"))
}

#[tokio::test]
async fn a_network_trained_on_digits_0_to_4_transfers_to_5_to_9() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(pretrain) = digits_zip(&tmp.path().join("a.zip"), &["--digits", "0-4"]) else {
        println!(
            "SKIPPED: python3 with scikit-learn is needed (pip install -r tests/python/requirements.txt)"
        );
        return;
    };
    let few = digits_zip(
        &tmp.path().join("b.zip"),
        &["--digits", "5-9", "--per-class", "10"],
    )
    .unwrap();
    let heldout = digits_zip(
        &tmp.path().join("c.zip"),
        &["--digits", "5-9", "--skip", "10", "--per-class", "40"],
    )
    .unwrap();
    let app = TestApp::spawn_with(|s| {
        write_architecture(&s.models_dir.join(ARCH));
        s.jobs.poll_interval = Duration::from_millis(200);
    })
    .await;
    let key = app.key_for("vision").await;

    // The architecture is listed as a vision model that trains image classification.
    let (status, arch) = app.get_json(&key, &format!("/v1/models/{ARCH}")).await;
    assert_eq!(status, 200, "{arch}");
    assert_eq!(arch["family"], "vision");
    assert_eq!(arch["capabilities"], json!(["image_classification"]));

    let pretrain = upload(&app, &key, "digits-0-4.zip", pretrain).await;
    let few = upload(&app, &key, "digits-5-9-few.zip", few).await;
    let heldout = upload(&app, &key, "digits-5-9-heldout.zip", heldout).await;

    // 1. From scratch on digits 0-4 (~900 images).
    let source = train(
        &app,
        &key,
        ARCH,
        &pretrain,
        None,
        json!({"strategy": "scratch", "n_epochs": 10, "batch_size": 32, "augmentation": "crop"}),
    )
    .await;
    println!("digits 0-4 from scratch: {}", source["metrics"]);
    assert!(accuracy(&source) > 0.8, "{source}");
    let used = &source["method"]["supervised"]["hyperparameters"];
    assert_eq!(used["strategy"], "scratch", "{source}");
    assert_eq!(used["augmentation"], "crop", "{source}");

    // 2. Registered as a base model.
    let ft = source["fine_tuned_model"].as_str().unwrap();
    let (status, registered) = post_json(
        &app,
        &key,
        "/v1/models",
        json!({"id": REGISTERED, "model": ft}),
    )
    .await;
    assert_eq!(status, 201, "{registered}");
    assert_eq!(registered["id"], REGISTERED);
    assert_eq!(registered["kind"], "base");
    assert_eq!(registered["task"], "image_classification");
    assert_eq!(registered["labels"], json!(["0", "1", "2", "3", "4"]));
    // Registering the same id twice, or from something that is not a fine-tuned model: 400.
    let (status, again) = post_json(
        &app,
        &key,
        "/v1/models",
        json!({"id": REGISTERED, "model": ft}),
    )
    .await;
    assert_eq!(status, 400, "{again}");
    assert_eq!(assert_error_shape(&again)["param"], "id");
    let (status, bad) = post_json(
        &app,
        &key,
        "/v1/models",
        json!({"id": "kiln-test/x", "model": ARCH}),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(assert_error_shape(&bad)["param"], "model");

    // 3. Transfer: the registered network as a fixed feature extractor, ten images a class.
    let hp = json!({"n_epochs": 40, "batch_size": 10, "augmentation": "none"});
    let mut transfer_hp = hp.clone();
    transfer_hp["strategy"] = json!("head_only");
    transfer_hp["learning_rate"] = json!(2e-2);
    let transfer = train(&app, &key, REGISTERED, &few, Some(&heldout), transfer_hp).await;
    // 4. The same network and budget from scratch on the same fifty images.
    let mut scratch_hp = hp.clone();
    scratch_hp["strategy"] = json!("scratch");
    let scratch = train(&app, &key, ARCH, &few, Some(&heldout), scratch_hp).await;
    let (t, s) = (accuracy(&transfer), accuracy(&scratch));
    println!(
        "transfer: {}\nscratch: {}",
        transfer["metrics"], scratch["metrics"]
    );
    println!(
        "held-out digits 5-9 (200 images), 10 training images per class: transfer (head_only from digits 0-4) {t:.3}, from scratch {s:.3}"
    );
    // Both learn digits 5-9 from fifty images. Which wins is the measurement, printed above,
    // and on these 8x8 digits scratch wins: 0.91-0.97 over seeds and architectures against
    // 0.74-0.91 for head_only on the 0-4 features (21 recipes tried: pretraining epochs,
    // augmentation, learning rates, widths, depths, input sizes). The data explains it: a
    // logistic regression on the raw pixels of the same fifty images already scores 0.94, and
    // frozen random features 0.89-0.905, above the trained 0-4 features (0.855-0.865): 5-class
    // training specialises them. So the comparison is reported rather than asserted.
    assert!(t > 0.7, "transfer: {}", transfer["metrics"]);
    assert!(s > 0.7, "scratch: {}", scratch["metrics"]);

    // 5. The fine-tuned model serves image classifications: JSON data URLs and multipart.
    let model = transfer["fine_tuned_model"].as_str().unwrap();
    let digit = digits_zip(
        &tmp.path().join("d.zip"),
        &["--digits", "7", "--skip", "50", "--per-class", "1"],
    )
    .unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(digit)).unwrap();
    let mut png = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_index(0).unwrap(), &mut png).unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let (status, out) = post_json(
        &app,
        &key,
        "/v1/images/classifications",
        json!({"model": model, "input": [url, url]}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["object"], "list");
    assert_eq!(out["data"].as_array().unwrap().len(), 2);
    let scores = out["data"][0]["scores"].as_object().unwrap();
    assert_eq!(scores.len(), 5);
    let total: f64 = scores.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{out}");
    assert_eq!(out["data"][0]["scores"], out["data"][1]["scores"]);
    println!("a held-out 7 is classified as {}", out["data"][0]["label"]);

    let form = reqwest::multipart::Form::new()
        .text("model", model.to_owned())
        .part(
            "file",
            reqwest::multipart::Part::bytes(png.clone()).file_name("seven.png"),
        );
    let res = app
        .client
        .post(app.url("/v1/images/classifications"))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let multipart: Value = res.json().await.unwrap();
    assert_eq!(multipart["data"][0]["scores"], out["data"][0]["scores"]);

    // Bad inputs name the field and the image.
    let broken = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png[..png.len() / 2])
    );
    let (status, err) = post_json(
        &app,
        &key,
        "/v1/images/classifications",
        json!({"model": model, "input": [url, broken]}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let e = assert_error_shape(&err);
    assert_eq!(e["param"], "input");
    assert!(
        e["message"].as_str().unwrap().starts_with("input[1]"),
        "{err}"
    );
    let (status, err) = post_json(
        &app,
        &key,
        "/v1/images/classifications",
        json!({"model": ARCH, "input": url}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(assert_error_shape(&err)["param"], "model");
    app.shutdown().await;
}

/// A small PNG of one colour with a little noise.
fn colour_png(rgb: [u8; 3], seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| {
        let n = ((x * 7 + y * 13 + seed * 31) % 17) as u8;
        image::Rgb([
            rgb[0].saturating_add(n),
            rgb[1].saturating_add(n),
            rgb[2].saturating_add(n),
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// JSONL lines that name images by path: alone, the file cannot reach the images (400 at
/// job creation, saying what to do); uploaded with them as one zip (the file as its
/// `metadata.jsonl`), the job trains on the labels the file gives.
#[tokio::test]
async fn images_named_by_path_train_from_one_zip_with_their_manifest() {
    let app = TestApp::spawn_with(|s| {
        write_architecture(&s.models_dir.join(ARCH));
        s.jobs.poll_interval = Duration::from_millis(200);
    })
    .await;
    let key = app.key_for("vision").await;
    let colours = [("red", [220, 20, 20]), ("blue", [20, 20, 220])];
    let mut manifest = String::new();
    let mut images = Vec::new();
    for i in 0..24u32 {
        let (label, rgb) = colours[(i % 2) as usize];
        // The folders say nothing about the labels: only the manifest does.
        let path = format!("photos/batch{}/{i}.png", i % 3);
        manifest.push_str(&json!({"image": path, "label": label}).to_string());
        manifest.push('\n');
        images.push((path, colour_png(rgb, i)));
    }

    let alone = upload(&app, &key, "labels.jsonl", manifest.clone().into_bytes()).await;
    let (status, err) = post_json(
        &app,
        &key,
        "/v1/fine_tuning/jobs",
        json!({"model": ARCH, "training_file": alone,
               "method": {"type": "supervised", "supervised": {"hyperparameters": {"strategy": "scratch"}}}}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let e = assert_error_shape(&err);
    assert_eq!(e["param"], "training_file", "{err}");
    assert!(
        e["message"].as_str().unwrap().contains("metadata.jsonl"),
        "{err}"
    );

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    zip.start_file("metadata.jsonl", options).unwrap();
    std::io::Write::write_all(&mut zip, manifest.as_bytes()).unwrap();
    for (path, bytes) in &images {
        zip.start_file(path.as_str(), options).unwrap();
        std::io::Write::write_all(&mut zip, bytes).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    let file = upload(&app, &key, "photos.zip", zip).await;
    let (_, described) = app.get_json(&key, &format!("/v1/files/{file}")).await;
    eprintln!("manifest zip: {}", described["status_details"]);
    let job = train(
        &app,
        &key,
        ARCH,
        &file,
        None,
        json!({"strategy": "scratch", "n_epochs": 8, "batch_size": 8, "learning_rate": 0.01}),
    )
    .await;
    let model = job["fine_tuned_model"].as_str().unwrap();
    let (_, got) = app.get_json(&key, &format!("/v1/models/{model}")).await;
    let mut labels: Vec<String> = got["labels"]
        .as_array()
        .unwrap_or_else(|| panic!("{got}"))
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    labels.sort();
    assert_eq!(labels, ["blue", "red"], "the manifest's labels: {got}");
    app.shutdown().await;
}
