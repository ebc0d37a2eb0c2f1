//! Image classification through the engine (no HTTP): tiny ResNet and ViT models on a small
//! synthetic image set (colour decides the class, position and size vary), every strategy,
//! exact resume with BatchNorm statistics, and bad data reported by file name.

mod train_support;

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln::train::{StopRequest, TrainEvent, TrainOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use train_support::{job, run, run_with};

const CLASSES: [(&str, [u8; 3]); 3] = [
    ("red", [220, 40, 40]),
    ("green", [40, 200, 60]),
    ("blue", [40, 60, 220]),
];

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// `per_class` images of each colour: a square of the class colour at a random place and
/// size on a grey, noisy background.
fn colour_zip(path: &Path, per_class: usize, seed: u64, corrupt: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for (name, colour) in CLASSES {
        for i in 0..per_class {
            let side = rng.random_range(8..16u32);
            let (x0, y0) = (
                rng.random_range(0..20 - side),
                rng.random_range(0..20 - side),
            );
            let mut img = image::RgbImage::new(20, 20);
            for (x, y, px) in img.enumerate_pixels_mut() {
                let inside = x >= x0 && x < x0 + side && y >= y0 && y < y0 + side;
                for c in 0..3 {
                    let base = if inside { colour[c] } else { 128 };
                    px[c] = (i32::from(base) + rng.random_range(-20..20)).clamp(0, 255) as u8;
                }
            }
            w.start_file(format!("shapes/{name}/{i}.png"), opts)
                .unwrap();
            w.write_all(&png(&img)).unwrap();
        }
    }
    if corrupt {
        let good = png(&image::RgbImage::new(20, 20));
        w.start_file("shapes/red/broken.png", opts).unwrap();
        w.write_all(&good[..good.len() / 2]).unwrap();
    }
    w.finish().unwrap();
}

/// 32x32 inputs (the tiny models' own configs ask for more than this test needs).
fn small_preprocessing(dir: &Path) {
    let pre = json!({"do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 2, "size": {"height": 32, "width": 32}});
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        let resnet = f.p("resnet");
        std::fs::create_dir_all(&resnet).unwrap();
        kiln::nn::resnet::write_tiny_resnet(&resnet, &kiln::nn::resnet::tiny_resnet_config(), 5)
            .unwrap();
        small_preprocessing(&resnet);
        let vit = f.p("vit");
        std::fs::create_dir_all(&vit).unwrap();
        let mut config = kiln::nn::vit::tiny_vit_config();
        config.image_size = 32;
        kiln::nn::vit::write_tiny_vit(&vit, &config, 5).unwrap();
        small_preprocessing(&vit);
        colour_zip(&f.p("train.zip"), 16, 1, false);
        colour_zip(&f.p("valid.zip"), 6, 2, false);
        f
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn job(&self, model: &str, hp: serde_json::Value, work: &str) -> kiln::train::TrainingJob {
        job(
            &self.p(model),
            &self.p("train.zip"),
            Some(&self.p("valid.zip")),
            &self.p(work),
            hp,
            4,
        )
    }
}

/// Whether `python3` can import torch and transformers (the export check).
fn transformers_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Loads a finished job's export in kiln, runs it on a few images, and has
/// scripts/check_hf_image_export.py check that transformers gives the same logits.
fn check_export_in_transformers(model_dir: &Path, images: &Path) {
    if !transformers_available() {
        println!("SKIPPED: python3 with torch and transformers is needed for the export check");
        return;
    }
    let device = candle_core::Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let model = kiln::nn::vision::load_image_classifier(
        model_dir,
        None,
        &varmap,
        &device,
        &kiln::nn::vision::VisionLoadOptions {
            freeze_backbone: true,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let pre = kiln::data::images::Preprocess::from_model_dir(model_dir, model.image_size() as u32)
        .unwrap();
    let examples = kiln::data::images::read_image_dataset(images).unwrap();
    let mut pixels = Vec::new();
    for e in examples.iter().take(4) {
        pixels.extend(pre.eval(&kiln::data::images::decode_rgb(&e.bytes).unwrap()));
    }
    let (h, w) = (pre.crop.0 as usize, pre.crop.1 as usize);
    let n = pixels.len() / (3 * h * w);
    let x = candle_core::Tensor::from_vec(pixels.clone(), (n, 3, h, w), &device).unwrap();
    let logits = model.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let cases = model_dir.with_extension("cases.json");
    std::fs::write(
        &cases,
        json!({"pixel_values": pixels, "shape": [n, 3, h, w], "logits": logits}).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new("python3")
        .arg(format!(
            "{}/scripts/check_hf_image_export.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(model_dir)
        .arg(&cases)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn accuracy(r: &train_support::Run) -> f64 {
    r.summary().metrics["valid_accuracy"]
}

#[test]
fn resnet_strategies_learn_colours_and_export_a_transformers_layout() {
    let f = Fixture::new();
    let full = run(&f.job(
        "resnet",
        json!({"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "augmentation": "crop_flip"}),
        "full",
    ));
    let s = full.summary();
    assert_eq!(s.task, "image_classification");
    assert_eq!(s.labels, vec!["blue", "green", "red"]);
    println!("resnet full: {:?}", s.metrics);
    assert!(accuracy(&full) >= 0.9, "{:?}", s.metrics);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["architectures"],
        json!(["ResNetForImageClassification"])
    );
    assert_eq!(config["id2label"]["0"], "blue");
    assert!(s.model_dir.join("preprocessor_config.json").is_file());
    let weights = candle_core::safetensors::load(
        s.model_dir.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(weights.keys().any(|k| k.ends_with("running_mean")));
    check_export_in_transformers(&s.model_dir, &f.p("valid.zip"));

    // head_only caches features once; freeze keeps the stem and first stage fixed.
    let head = run(&f.job(
        "resnet",
        json!({"strategy": "head_only", "n_epochs": 20, "batch_size": 16, "learning_rate": 1e-2}),
        "head",
    ));
    assert!(
        head.events
            .iter()
            .any(|e| matches!(e, TrainEvent::Message { text } if text.starts_with("Feature bank")))
    );
    println!("resnet head_only: {:?}", head.summary().metrics);
    let frozen = run(&f.job(
        "resnet",
        json!({"strategy": "freeze", "freeze_layers": 1, "n_epochs": 6, "batch_size": 8, "learning_rate": 3e-3}),
        "freeze",
    ));
    println!("resnet freeze: {:?}", frozen.summary().metrics);
    assert!(accuracy(&frozen) >= 0.6, "{:?}", frozen.summary().metrics);
}

#[test]
fn vit_trains_full_and_with_lora() {
    let f = Fixture::new();
    let full = run(&f.job(
        "vit",
        json!({"n_epochs": 8, "batch_size": 8, "learning_rate": 2e-3}),
        "full",
    ));
    println!("vit full: {:?}", full.summary().metrics);
    assert!(accuracy(&full) >= 0.9, "{:?}", full.summary().metrics);
    let lora = run(&f.job(
        "vit",
        json!({"strategy": "lora", "lora_rank": 4, "n_epochs": 8, "batch_size": 8, "learning_rate": 5e-3,
               "lora_target_modules": ["query", "value", "intermediate.dense"]}),
        "lora",
    ));
    println!("vit lora: {:?}", lora.summary().metrics);
    assert!(accuracy(&lora) >= 0.6, "{:?}", lora.summary().metrics);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lora.summary().model_dir.join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["architectures"],
        json!(["ViTForImageClassification"])
    );
    // LoRA merged into the exported weights: transformers computes the same logits.
    check_export_in_transformers(&lora.summary().model_dir, &f.p("valid.zip"));
}

#[test]
fn an_interrupted_resnet_run_resumes_exactly_batchnorm_statistics_included() {
    let f = Fixture::new();
    let hp =
        json!({"n_epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "checkpoint_every_steps": 3});
    let whole = run(&f.job("resnet", hp.clone(), "whole"));
    let first = run_with(&f.job("resnet", hp.clone(), "parts"), |step, stop| {
        if step == 4 {
            stop.request(StopRequest::CheckpointAndStop);
        }
    });
    let TrainOutcome::Stopped {
        step: 4,
        checkpoint: Some(checkpoint),
    } = first.outcome.clone()
    else {
        panic!("expected a stop with a checkpoint at step 4");
    };
    let mut resumed = f.job("resnet", hp, "parts");
    resumed.resume_from = Some(checkpoint);
    let second = run(&resumed);
    let mut stitched = first.losses();
    stitched.extend(second.losses());
    assert_eq!(
        stitched,
        whole.losses(),
        "same crops, same statistics, same losses"
    );
    assert_eq!(second.summary().metrics, whole.summary().metrics);
}

#[test]
fn bad_images_and_impossible_strategies_are_user_errors() {
    let f = Fixture::new();
    colour_zip(&f.p("broken.zip"), 4, 3, true);
    let mut j = f.job("resnet", json!({"n_epochs": 1}), "broken");
    j.training_file = f.p("broken.zip");
    let err = kiln::train::run(&j, &mut |_| {}, &Default::default()).unwrap_err();
    assert!(err.is_user_error());
    assert!(err.to_string().contains("shapes/red/broken.png"), "{err}");

    let j = f.job("resnet", json!({"strategy": "lora", "n_epochs": 1}), "lora");
    let err = kiln::train::run(&j, &mut |_| {}, &Default::default()).unwrap_err();
    assert!(err.is_user_error());
    assert!(err.to_string().to_lowercase().contains("lora"), "{err}");

    let j = f.job("resnet", json!({"max_length": 64, "n_epochs": 1}), "len");
    let err = kiln::train::run(&j, &mut |_| {}, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("max_length"), "{err}");
}
