//! Image-classification data for training and serving: reading a dataset (a zip with one
//! folder per class, or JSONL lines with an `image` data URL and a `label`), decoding PNG,
//! JPEG and WebP, and turning an image into the normalised `[3, h, w]` pixels a model takes,
//! following the model's own `preprocessor_config.json` (resize, crop, mean, std), with
//! random resized crops and flips for training.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use ::image::imageops::FilterType;
use ::image::{ImageReader, Limits, RgbImage};
use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::archive::{Root, classify_entry, read_entry};
use super::image::{B64, has_image_extension};

/// Largest image side accepted when decoding (a guard against decompression bombs).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most bytes the decoder may allocate for one image.
const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// One labelled image, still encoded (decoding happens per batch, off the training thread).
#[derive(Debug, Clone)]
pub struct ImageExample {
    /// Where it came from, for error messages: the zip entry, or `line N`.
    pub source: String,
    pub bytes: Arc<[u8]>,
    pub label: String,
}

/// Decodes PNG, JPEG or WebP bytes into 8-bit RGB (grey and alpha are converted).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let format = reader.format();
    if !matches!(
        format,
        Some(::image::ImageFormat::Png | ::image::ImageFormat::Jpeg | ::image::ImageFormat::WebP)
    ) {
        return Err("not a PNG, JPEG or WebP image".to_string());
    }
    let img = reader
        .decode()
        .map_err(|e| format!("corrupt or unreadable image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("the image has no pixels".to_string());
    }
    Ok(img.to_rgb8())
}

/// The bytes of a `data:image/...;base64,...` URL.
pub fn decode_data_url(url: &str) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or_else(|| "expected a data URL (data:image/png;base64,...)".to_string())?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| "malformed data URL (no comma)".to_string())?;
    if !meta
        .split(';')
        .any(|p| p.trim().eq_ignore_ascii_case("base64"))
    {
        return Err("the data URL must be base64-encoded (\";base64,\")".to_string());
    }
    B64.decode(payload.trim())
        .map_err(|e| format!("invalid base64 data: {e}"))
}

/// Where an image of a dataset is: a zip entry or a JSONL line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Entry(String),
    Line(u64),
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::Entry(name) => f.write_str(name),
            ImageSource::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// Reads an image-classification dataset: a zip of `CLASS/image` entries (optionally under
/// one wrapper folder) or JSONL lines `{"image": data URL, "label": ...}`. Every image is
/// decoded once here, so a corrupt one is reported (by name or line) before training starts.
pub fn read_image_dataset(path: &Path) -> Result<Vec<ImageExample>, String> {
    let mut examples = Vec::new();
    let mut problems = Vec::new();
    visit_images(path, &mut |source, label, bytes| {
        match decode_rgb(&bytes) {
            Ok(_) => examples.push(ImageExample {
                source: source.to_string(),
                bytes: bytes.into(),
                label,
            }),
            Err(msg) => problems.push(format!("{source}: {msg}")),
        }
        Ok(())
    })?;
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(3);
        let more = if n > 3 {
            format!("; and {} more", n - 3)
        } else {
            String::new()
        };
        return Err(format!("{}{more}", problems.join("; ")));
    }
    if examples.is_empty() {
        return Err("the dataset holds no images".to_string());
    }
    Ok(examples)
}

/// Decodes every image of a dataset that passed the structural checks, for the upload
/// validator: each image that does not decode is a problem naming its entry or line.
pub(crate) fn decode_problems(path: &Path) -> Result<Vec<super::Problem>, String> {
    let mut problems = Vec::new();
    visit_images(path, &mut |source, _label, bytes| {
        if let Err(message) = decode_rgb(&bytes) {
            problems.push(match source {
                ImageSource::Entry(name) => super::Problem {
                    line: None,
                    file: Some(name),
                    message,
                },
                ImageSource::Line(n) => super::Problem {
                    line: Some(n),
                    file: None,
                    message: format!("\"image\": {message}"),
                },
            });
        }
        Ok(())
    })?;
    Ok(problems)
}

type Visitor<'a> = dyn FnMut(ImageSource, String, Vec<u8>) -> Result<(), String> + 'a;

/// Calls `f(source, label, bytes)` for every image of a zip or JSONL dataset, one at a time.
fn visit_images(path: &Path, f: &mut Visitor) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut magic = [0u8; 4];
    let got = super::read_up_to(&mut file, &mut magic).map_err(|e| e.to_string())?;
    drop(file);
    if got == 4 && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06") {
        visit_zip(path, f)
    } else {
        visit_jsonl(path, f)
    }
}

fn visit_zip(path: &Path, f: &mut Visitor) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut archive = ::zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format!("not a valid zip archive: {e}"))?;
    if let Some(manifest) = super::archive::read_manifest(&mut archive)? {
        for row in manifest.rows {
            let (index, name, label) = row
                .example
                .map_err(|m| format!("{} line {}: {m}", manifest.name, row.line))?;
            let bytes = read_entry(&mut archive, index, &name, super::MAX_ZIP_ENTRY_BYTES)?;
            f(ImageSource::Entry(name), label, bytes)?;
        }
        return Ok(());
    }
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let mut root = Root::Unknown;
    for name in &names {
        if let Some((comps, false)) = classify_entry(name)
            && has_image_extension(name)
        {
            root.observe(&comps);
        }
    }
    let root = root.common();
    for i in 0..archive.len() {
        let Some(name) = archive.name_for_index(i).map(str::to_string) else {
            continue;
        };
        let Some((comps, false)) = classify_entry(&name) else {
            continue;
        };
        if !has_image_extension(&name) {
            continue;
        }
        let comps = match (&root, comps.split_first()) {
            (Some(r), Some((first, rest))) if first == r => rest.to_vec(),
            _ => comps,
        };
        let [class, _file] = comps.as_slice() else {
            continue;
        };
        let class = class.clone();
        let bytes = read_entry(&mut archive, i, &name, super::MAX_ZIP_ENTRY_BYTES)?;
        f(ImageSource::Entry(name), class, bytes)?;
    }
    Ok(())
}

fn visit_jsonl(path: &Path, f: &mut Visitor) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| format!("line {n}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("line {n}: {e}"))?;
        let image = v
            .get("image")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("line {n}: \"image\" must be a data URL string"))?;
        let label = match v.get("label") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => return Err(format!("line {n}: \"label\" must be a string or number")),
        };
        if !image.starts_with("data:") {
            return Err(format!(
                "line {n}: \"image\" is a path ({image:?}); upload the images and this file together as one zip, with the file as metadata.jsonl at its top (its paths relative to it), or use a zip with one folder per class, or embed the images as data URLs"
            ));
        }
        let bytes = decode_data_url(image).map_err(|e| format!("line {n}: \"image\": {e}"))?;
        f(ImageSource::Line(n), label, bytes)?;
    }
    Ok(())
}

/// Holds out about `fraction` of each class (at least one image of every class with two or
/// more), seeded, for validation.
pub fn stratified_split_images(
    examples: &[ImageExample],
    fraction: f64,
    seed: u64,
) -> (Vec<ImageExample>, Vec<ImageExample>) {
    super::text::stratified_split_by(
        examples,
        |e| e.label.as_str(),
        fraction,
        seed ^ 0x5EED_1AA6_E000_0001,
    )
}

/// How an image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// Scale so the shorter side is this long, keeping the aspect ratio.
    ShortestEdge(u32),
    /// Scale to exactly `(height, width)`.
    Exact(u32, u32),
}

/// Which random augmentations training applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Augment {
    None,
    /// Random resized crop.
    Crop,
    /// Random resized crop and horizontal flip.
    CropFlip,
}

/// A model's preprocessing: resize, center crop, rescale to [0, 1], normalise per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub resize: Resize,
    /// Final `(height, width)` after the crop.
    pub crop: (u32, u32),
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub filter: FilterType,
}

fn filter_of(resample: Option<u64>) -> FilterType {
    // PIL's codes: 0 nearest, 2 bilinear, 3 bicubic, 1 Lanczos.
    match resample {
        Some(0) => FilterType::Nearest,
        Some(1) => FilterType::Lanczos3,
        Some(3) => FilterType::CatmullRom,
        _ => FilterType::Triangle,
    }
}

fn triple(v: Option<&Value>, default: [f32; 3]) -> [f32; 3] {
    match v.and_then(Value::as_array) {
        Some(a) if a.len() == 3 => {
            let mut out = default;
            for (o, x) in out.iter_mut().zip(a) {
                if let Some(x) = x.as_f64() {
                    *o = x as f32;
                }
            }
            out
        }
        // A single number applies to every channel.
        _ => match v.and_then(Value::as_f64) {
            Some(x) => [x as f32; 3],
            None => default,
        },
    }
}

fn hw(v: Option<&Value>) -> Option<(u32, u32)> {
    let v = v?;
    if let Some(s) = v.as_u64() {
        return Some((s as u32, s as u32));
    }
    let h = v.get("height").and_then(Value::as_u64);
    let w = v.get("width").and_then(Value::as_u64);
    match (h, w) {
        (Some(h), Some(w)) => Some((h as u32, w as u32)),
        _ => None,
    }
}

impl Preprocess {
    /// ImageNet statistics, bilinear, a `side`-pixel square (what kiln assumes without a
    /// `preprocessor_config.json`).
    pub fn default_for(side: u32) -> Preprocess {
        Preprocess {
            resize: Resize::Exact(side, side),
            crop: (side, side),
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            filter: FilterType::Triangle,
        }
    }

    /// Reads `preprocessor_config.json` from a model directory: transformers'
    /// ViTImageProcessor (`size: {height, width}`), ConvNextImageProcessor (`size:
    /// {shortest_edge}` with `crop_pct`) and the shortest-edge + `crop_size` processors
    /// (BiT, CLIP). Without one, [`Preprocess::default_for`] the model's input side.
    pub fn from_model_dir(dir: &Path, side: u32) -> Result<Preprocess, String> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Preprocess::default_for(side));
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Preprocess::from_config(&v, side))
    }

    /// [`Preprocess::from_model_dir`] on an already parsed config.
    pub fn from_config(v: &Value, side: u32) -> Preprocess {
        let mut p = Preprocess::default_for(side);
        if v.get("do_normalize").and_then(Value::as_bool) == Some(false) {
            p.mean = [0.0; 3];
            p.std = [1.0; 3];
        } else {
            p.mean = triple(v.get("image_mean"), p.mean);
            p.std = triple(v.get("image_std"), p.std);
        }
        p.filter = filter_of(v.get("resample").and_then(Value::as_u64));
        let size = v.get("size");
        let shortest = size
            .and_then(|s| s.get("shortest_edge"))
            .and_then(Value::as_u64)
            .map(|s| s as u32);
        let crop_size = hw(v.get("crop_size"));
        let do_crop = v.get("do_center_crop").and_then(Value::as_bool);
        match (shortest, crop_size) {
            (Some(s), Some(c)) if do_crop != Some(false) => {
                p.resize = Resize::ShortestEdge(s);
                p.crop = c;
            }
            (Some(s), _) => match v.get("crop_pct").and_then(Value::as_f64) {
                // ConvNeXt's rule: below 384 resize to s / crop_pct, then crop s.
                Some(pct) if s < 384 && pct > 0.0 => {
                    p.resize = Resize::ShortestEdge(((f64::from(s)) / pct) as u32);
                    p.crop = (s, s);
                }
                _ => {
                    p.resize = Resize::Exact(s, s);
                    p.crop = (s, s);
                }
            },
            (None, _) => {
                if let Some((h, w)) = hw(size) {
                    p.resize = Resize::Exact(h, w);
                    p.crop = crop_size
                        .filter(|_| do_crop == Some(true))
                        .unwrap_or((h, w));
                }
            }
        }
        p
    }

    /// Evaluation pixels: resize, center crop, normalise; `[3, h, w]` row-major.
    pub fn eval(&self, img: &RgbImage) -> Vec<f32> {
        let resized = match self.resize {
            Resize::Exact(h, w) => resize(img, w, h, self.filter),
            Resize::ShortestEdge(s) => {
                let (w, h) = (img.width() as f64, img.height() as f64);
                let scale = f64::from(s) / w.min(h);
                let nw = ((w * scale).round() as u32).max(1);
                let nh = ((h * scale).round() as u32).max(1);
                resize(img, nw, nh, self.filter)
            }
        };
        let (ch, cw) = self.crop;
        let cropped = center_crop(&resized, cw, ch);
        self.normalise(&cropped)
    }

    /// Training pixels: a random resized crop (scale 0.25-1 of the area, aspect 3/4-4/3),
    /// an optional horizontal flip, then normalisation.
    pub fn train(&self, img: &RgbImage, augment: Augment, rng: &mut StdRng) -> Vec<f32> {
        if augment == Augment::None {
            return self.eval(img);
        }
        let (ch, cw) = self.crop;
        let (w, h) = (img.width() as f64, img.height() as f64);
        let area = w * h;
        let mut window = None;
        for _ in 0..10 {
            let target = area * rng.random_range(0.25..=1.0);
            let log_ratio = rng.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln());
            let ratio = log_ratio.exp();
            let cw_ = (target * ratio).sqrt().round();
            let chh = (target / ratio).sqrt().round();
            if cw_ >= 1.0 && chh >= 1.0 && cw_ <= w && chh <= h {
                let x = rng.random_range(0..=(w - cw_) as u32);
                let y = rng.random_range(0..=(h - chh) as u32);
                window = Some((x, y, cw_ as u32, chh as u32));
                break;
            }
        }
        let (x, y, ww, wh) = window.unwrap_or_else(|| {
            let s = w.min(h) as u32;
            ((w as u32 - s) / 2, (h as u32 - s) / 2, s, s)
        });
        let crop = ::image::imageops::crop_imm(img, x, y, ww, wh).to_image();
        let mut out = resize(&crop, cw, ch, self.filter);
        if augment == Augment::CropFlip && rng.random_bool(0.5) {
            ::image::imageops::flip_horizontal_in_place(&mut out);
        }
        self.normalise(&out)
    }

    fn normalise(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = vec![0f32; 3 * w * h];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * w * h + i] = (f32::from(px[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// Floats in one preprocessed image.
    pub fn pixels_per_image(&self) -> usize {
        3 * self.crop.0 as usize * self.crop.1 as usize
    }
}

fn resize(img: &RgbImage, w: u32, h: u32, filter: FilterType) -> RgbImage {
    if img.width() == w && img.height() == h {
        return img.clone();
    }
    ::image::imageops::resize(img, w, h, filter)
}

fn center_crop(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.width() == w && img.height() == h {
        return img.clone();
    }
    if img.width() < w || img.height() < h {
        // Smaller than the crop: scale up to cover it first (as torchvision pads; scaling
        // keeps the statistics closer to what the model saw).
        let scale =
            (f64::from(w) / f64::from(img.width())).max(f64::from(h) / f64::from(img.height()));
        let nw = ((f64::from(img.width()) * scale).ceil() as u32).max(w);
        let nh = ((f64::from(img.height()) * scale).ceil() as u32).max(h);
        let up = resize(img, nw, nh, FilterType::Triangle);
        return center_crop(&up, w, h);
    }
    let x = (img.width() - w) / 2;
    let y = (img.height() - h) / 2;
    ::image::imageops::crop_imm(img, x, y, w, h).to_image()
}

/// Decodes and preprocesses `images` on up to `threads` threads; `seeds[i]` (training)
/// draws image i's augmentation, `None` evaluates. Pixels are concatenated in order.
pub fn preprocess_batch(
    pre: &Preprocess,
    images: &[Arc<[u8]>],
    augment: Option<(Augment, &[u64])>,
    threads: usize,
) -> Result<Vec<f32>, String> {
    let per = pre.pixels_per_image();
    let mut out = vec![0f32; per * images.len()];
    let threads = threads.clamp(1, images.len().max(1));
    let chunk = images.len().div_ceil(threads).max(1);
    let result: Result<(), String> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (k, (imgs, dst)) in images
            .chunks(chunk)
            .zip(out.chunks_mut(chunk * per))
            .enumerate()
        {
            handles.push(s.spawn(move || -> Result<(), String> {
                for (j, (bytes, slot)) in imgs.iter().zip(dst.chunks_mut(per)).enumerate() {
                    let img = decode_rgb(bytes)?;
                    let px = match augment {
                        Some((a, seeds)) => {
                            let mut rng = StdRng::seed_from_u64(seeds[k * chunk + j]);
                            pre.train(&img, a, &mut rng)
                        }
                        None => pre.eval(&img),
                    };
                    slot.copy_from_slice(&px);
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| "an image worker panicked".to_string())??;
        }
        Ok(())
    });
    result?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| ::image::Rgb(f(x, y)));
        let mut out = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut out),
            ::image::ImageFormat::Png,
        )
        .unwrap();
        out
    }

    #[test]
    fn decodes_png_and_reports_corruption() {
        let bytes = png(4, 3, |x, y| [x as u8 * 10, y as u8 * 10, 7]);
        let img = decode_rgb(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (4, 3));
        assert_eq!(img.get_pixel(2, 1).0, [20, 10, 7]);
        let truncated = &bytes[..bytes.len() / 2];
        assert!(decode_rgb(truncated).unwrap_err().contains("corrupt"));
        assert!(decode_rgb(b"GIF89a....").is_err());
    }

    #[test]
    fn vit_and_convnext_preprocessing_configs() {
        let vit = Preprocess::from_config(
            &serde_json::json!({"image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5],
                "resample": 2, "size": {"height": 16, "width": 16}}),
            224,
        );
        assert_eq!(vit.resize, Resize::Exact(16, 16));
        assert_eq!(vit.crop, (16, 16));
        let img = decode_rgb(&png(32, 32, |_, _| [255, 0, 128])).unwrap();
        let px = vit.eval(&img);
        assert_eq!(px.len(), 3 * 16 * 16);
        assert!((px[0] - 1.0).abs() < 1e-6);
        assert!((px[256] + 1.0).abs() < 1e-6);
        let convnext = Preprocess::from_config(
            &serde_json::json!({"crop_pct": 0.875, "size": {"shortest_edge": 224}}),
            224,
        );
        assert_eq!(convnext.resize, Resize::ShortestEdge(256));
        assert_eq!(convnext.crop, (224, 224));
        let wide = decode_rgb(&png(40, 20, |x, _| [x as u8, 0, 0])).unwrap();
        let small = Preprocess {
            resize: Resize::ShortestEdge(10),
            crop: (8, 8),
            ..Preprocess::default_for(8)
        };
        assert_eq!(small.eval(&wide).len(), 3 * 64);
    }

    #[test]
    fn training_crops_are_seeded_and_shaped() {
        let img = decode_rgb(&png(20, 12, |x, y| [x as u8 * 9, y as u8 * 9, 0])).unwrap();
        let p = Preprocess::default_for(8);
        let a = p.train(&img, Augment::CropFlip, &mut StdRng::seed_from_u64(3));
        let b = p.train(&img, Augment::CropFlip, &mut StdRng::seed_from_u64(3));
        let c = p.train(&img, Augment::CropFlip, &mut StdRng::seed_from_u64(4));
        assert_eq!(a.len(), 3 * 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bytes: Vec<Arc<[u8]>> = (0..5)
            .map(|i| Arc::from(png(9, 9, move |_, _| [i * 40, 0, 0])))
            .collect();
        let seeds = [1u64, 2, 3, 4, 5];
        let par = preprocess_batch(&p, &bytes, Some((Augment::Crop, &seeds)), 2).unwrap();
        let one = preprocess_batch(&p, &bytes, Some((Augment::Crop, &seeds)), 1).unwrap();
        assert_eq!(par, one);
    }

    #[test]
    fn data_urls_decode() {
        let bytes = png(2, 2, |_, _| [1, 2, 3]);
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        );
        assert_eq!(decode_data_url(&url).unwrap(), bytes);
        assert!(decode_data_url("data:image/png,xx").is_err());
    }
}
