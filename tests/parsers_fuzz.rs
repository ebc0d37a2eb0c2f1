//! Property-based fuzzing of everything that parses what users upload: JSONL of every
//! format, zips of images, images themselves (PNG, JPEG, WebP, data URLs), chat templates
//! and the messages rendered through them. Inputs are generated from valid examples, then
//! broken (cut, spliced, bytes flipped, nesting deepened, names made hostile); the property
//! is always the same: a clear result or a clear error, never a panic, with bounded output.
//!
//! `PROPTEST_CASES` raises the number of cases for a long run (the figures and the command
//! are in bench/README.md, "fuzzing"); failures found are kept in `proptest-regressions/`
//! and replayed first on every run.

use std::io::{Cursor, Write};
use std::path::Path;

use kiln::data::chat::{ChatTemplate, DecoderTokenizer, read_lm_records, read_preference_pairs};
use kiln::data::images::{decode_data_url, decode_rgb, read_image_dataset};
use kiln::data::text::{read_domain_text, read_text_classification};
use kiln::data::{MAX_REPORTED_PROBLEMS, validate_dataset, validate_jsonl, validate_zip};
use proptest::prelude::*;
use serde_json::{Value, json};

// ---- valid material to start from --------------------------------------------------------

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([seed ^ x as u8, y as u8, seed.wrapping_mul(3)])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([seed, x as u8, y as u8]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

fn webp(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([seed, x as u8, y as u8, 255]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::WebP)
        .unwrap();
    out
}

fn data_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A valid line of each dataset format kiln accepts.
fn example_line(kind: u8, i: usize) -> Value {
    match kind % 7 {
        0 => {
            json!({"text": format!("example {i} is good"), "label": if i.is_multiple_of(2) { "pos" } else { "neg" }})
        }
        1 => json!({"text": format!("example {i}"), "labels": ["a", "b"]}),
        2 => json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": format!("question {i}")},
            {"role": "assistant", "content": format!("answer {i}"), "weight": 1}
        ]}),
        3 => json!({"prompt": format!("say {i}"), "completion": format!(" {i}")}),
        4 => json!({
            "input": {"messages": [{"role": "user", "content": format!("pick {i}")}]},
            "preferred_output": [{"role": "assistant", "content": "yes"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}]
        }),
        5 => json!({"text": format!("some unlabelled domain text number {i}")}),
        _ => json!({"image": data_url(&png(4, 4, i as u8)), "label": format!("c{}", i % 2)}),
    }
}

// ---- ways to break it ----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Damage {
    /// Cut the input at a fraction of its length.
    Truncate(f64),
    /// Overwrite bytes at fractions of the length.
    Flip(Vec<(f64, u8)>),
    /// Insert bytes at a fraction of the length.
    Insert(f64, Vec<u8>),
    /// Remove a range.
    Delete(f64, f64),
    /// Duplicate a slice somewhere else.
    Splice(f64, f64, f64),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::Truncate),
        prop::collection::vec((0.0..1.0f64, any::<u8>()), 1..8).prop_map(Damage::Flip),
        (
            0.0..1.0f64,
            prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    Just(b'"'),
                    Just(b'{'),
                    Just(b'['),
                    Just(b'\n'),
                    Just(0u8),
                    Just(0xff),
                    Just(0xc3),
                ],
                1..32
            )
        )
            .prop_map(|(at, bytes)| Damage::Insert(at, bytes)),
        (0.0..1.0f64, 0.0..0.2f64).prop_map(|(a, l)| Damage::Delete(a, l)),
        (0.0..1.0f64, 0.0..0.2f64, 0.0..1.0f64).prop_map(|(a, l, to)| Damage::Splice(a, l, to)),
    ]
}

fn at(len: usize, f: f64) -> usize {
    ((len as f64) * f).floor().min(len as f64) as usize
}

fn apply(mut bytes: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for d in damages {
        let len = bytes.len();
        match d {
            Damage::Truncate(f) => bytes.truncate(at(len, *f)),
            Damage::Flip(flips) => {
                for (f, b) in flips {
                    if len > 0 {
                        let i = at(len - 1, *f);
                        bytes[i] = *b;
                    }
                }
            }
            Damage::Insert(f, new) => {
                let i = at(len, *f);
                bytes.splice(i..i, new.iter().copied());
            }
            Damage::Delete(f, l) => {
                let i = at(len, *f);
                let j = (i + at(len, *l)).min(len);
                bytes.drain(i..j);
            }
            Damage::Splice(f, l, to) => {
                let i = at(len, *f);
                let j = (i + at(len, *l)).min(len);
                let piece: Vec<u8> = bytes[i..j].to_vec();
                let k = at(len, *to);
                bytes.splice(k..k, piece);
            }
        }
    }
    bytes
}

fn write_temp(bytes: &[u8], name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// What every report must satisfy, whatever the input.
fn check_report(report: &kiln::data::ValidationReport, lines: usize) {
    assert!(report.problems.len() <= MAX_REPORTED_PROBLEMS);
    assert!(report.total_problems >= report.problems.len() as u64);
    for p in &report.problems {
        assert!(!p.message.is_empty(), "a problem without a message: {p:?}");
        if let Some(line) = p.line {
            assert!(
                line >= 1 && line as usize <= lines.max(1),
                "problem on line {line} of {lines}: {p:?}"
            );
        }
    }
    let _ = report.summary();
}

/// The training-side readers see only validated files in production, but must not panic on
/// anything either.
fn read_everything(path: &Path) {
    let _ = read_text_classification(path);
    let _ = read_domain_text(path);
    let _ = read_lm_records(path);
    let _ = read_preference_pairs(path);
    let _ = read_image_dataset(path);
}

fn config() -> ProptestConfig {
    // 96 cases in CI; PROPTEST_CASES for long runs.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---- JSONL ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Damaged JSONL of any format: a report whose problems name real lines.
    #[test]
    fn damaged_jsonl_of_every_format_is_reported_not_panicked_on(
        kinds in prop::collection::vec(any::<u8>(), 1..40),
        damages in prop::collection::vec(damage(), 0..4),
    ) {
        let mut text = String::new();
        for (i, k) in kinds.iter().enumerate() {
            text.push_str(&example_line(*k, i).to_string());
            text.push('\n');
        }
        let bytes = apply(text.into_bytes(), &damages);
        let lines = bytes.split(|b| *b == b'\n').count();
        let report = validate_jsonl(Cursor::new(&bytes)).unwrap();
        check_report(&report, lines);
        if damages.is_empty() && kinds.len() >= 10 && kinds.iter().all(|k| k % 7 == kinds[0] % 7) {
            prop_assert!(report.is_valid(), "valid input refused: {}", report.summary());
        }
        let (_dir, path) = write_temp(&bytes, "data.jsonl");
        let report = validate_dataset(&path, "data.jsonl").unwrap();
        check_report(&report, lines);
        read_everything(&path);
    }

    /// Values of the wrong type in every field a format reads.
    #[test]
    fn wrong_types_in_every_field_are_problems(
        kind in any::<u8>(),
        replacement in prop_oneof![
            Just(Value::Null), Just(json!(1.5)), Just(json!(-3)), Just(json!(true)),
            Just(json!("")), Just(json!("\u{0}")), Just(json!([])), Just(json!({})),
            Just(json!([[[]]])), Just(json!({"content": {"x": 1}})), Just(json!("\u{1F600}")),
            Just(json!([{"role": 3}])), Just(json!([{"type": "image_url"}])),
        ],
        field in 0usize..6,
    ) {
        let mut lines = String::new();
        for i in 0..12 {
            let mut v = example_line(kind, i);
            if i == 5 {
                replace_nth_field(&mut v, field, replacement.clone());
            }
            lines.push_str(&v.to_string());
            lines.push('\n');
        }
        let report = validate_jsonl(Cursor::new(lines.as_bytes())).unwrap();
        check_report(&report, 12);
        let (_dir, path) = write_temp(lines.as_bytes(), "data.jsonl");
        read_everything(&path);
    }

    /// JSON nested past any sensible depth, in any position, is a problem on its line.
    #[test]
    fn deep_nesting_is_a_problem_on_its_line(depth in 60usize..5000, open in prop_oneof![Just('['), Just('{')]) {
        let deep = if open == '[' {
            format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
        };
        let line = format!("{{\"text\": \"x\", \"label\": {deep}}}\n");
        let report = validate_jsonl(Cursor::new(line.as_bytes())).unwrap();
        check_report(&report, 1);
        prop_assert!(report.total_problems >= 1);
        let (_dir, path) = write_temp(line.as_bytes(), "deep.jsonl");
        read_everything(&path);
    }

    /// Random bytes, including invalid UTF-8 and NULs.
    #[test]
    fn arbitrary_bytes_are_reported(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let lines = bytes.split(|b| *b == b'\n').count();
        let report = validate_jsonl(Cursor::new(&bytes)).unwrap();
        check_report(&report, lines);
        prop_assert!(bytes.is_empty() || !report.is_valid() || report.examples > 0);
        let (_dir, path) = write_temp(&bytes, "bytes.jsonl");
        read_everything(&path);
    }
}

fn replace_nth_field(v: &mut Value, n: usize, with: Value) {
    // Depth-first over objects: the n-th field found is replaced.
    fn walk(v: &mut Value, n: &mut usize, with: &Value) -> bool {
        match v {
            Value::Object(map) => {
                for (_, child) in map.iter_mut() {
                    if *n == 0 {
                        *child = with.clone();
                        return true;
                    }
                    *n -= 1;
                    if walk(child, n, with) {
                        return true;
                    }
                }
                false
            }
            Value::Array(items) => items.iter_mut().any(|c| walk(c, n, with)),
            _ => false,
        }
    }
    let mut n = n;
    walk(v, &mut n, &with);
}

// ---- zips and images ----------------------------------------------------------------------

fn entry_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u8..3, 0u16..500, prop_oneof![Just("png"), Just("jpg"), Just("webp"), Just("PNG")])
            .prop_map(|(c, i, ext)| format!("class{c}/img{i}.{ext}")),
        1 => Just("../escape/evil.png".to_string()),
        1 => Just("/etc/abs.png".to_string()),
        1 => Just("a/../../b/c.png".to_string()),
        1 => Just("C:\\windows\\x.png".to_string()),
        1 => Just("class0\\..\\..\\x.png".to_string()),
        1 => Just("wrapper/class1/deep/er/x.png".to_string()),
        1 => Just("class0/notes.txt".to_string()),
        1 => Just("__MACOSX/class0/._img.png".to_string()),
        1 => Just("class0/".to_string()),
        1 => "[a-z\u{0}-\u{7f}\u{e9}\u{4e2d}/.]{0,40}",
        1 => Just(format!("class0/{}.png", "n".repeat(300))),
    ]
}

fn image_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (1u32..12, 1u32..12, any::<u8>()).prop_map(|(w, h, s)| png(w, h, s)),
        2 => (1u32..12, 1u32..12, any::<u8>()).prop_map(|(w, h, s)| jpeg(w, h, s)),
        1 => (1u32..12, 1u32..12, any::<u8>()).prop_map(|(w, h, s)| webp(w, h, s)),
        2 => ((1u32..12, 1u32..12, any::<u8>()), prop::collection::vec(damage(), 1..3))
            .prop_map(|((w, h, s), d)| apply(png(w, h, s), &d)),
        1 => ((1u32..12, 1u32..12, any::<u8>()), prop::collection::vec(damage(), 1..3))
            .prop_map(|((w, h, s), d)| apply(jpeg(w, h, s), &d)),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => Just(Vec::new()),
    ]
}

fn zip_of(entries: &[(String, Vec<u8>)], compress: bool) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut out);
        let options = zip::write::SimpleFileOptions::default().compression_method(if compress {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        });
        let mut seen = std::collections::HashSet::new();
        for (name, bytes) in entries {
            if !seen.insert(name.clone()) {
                continue;
            }
            if name.ends_with('/') {
                let _ = zip.add_directory(name.as_str(), options);
                continue;
            }
            if zip.start_file(name.as_str(), options).is_ok() {
                zip.write_all(bytes).unwrap();
            }
        }
        zip.finish().unwrap();
    }
    out.into_inner()
}

proptest! {
    #![proptest_config(config())]

    /// Zips of class folders with hostile names and broken images: every problem is named,
    /// and nothing outside the class folders (traversal, absolute paths) becomes an example.
    #[test]
    fn zips_with_hostile_names_and_broken_images_are_reported(
        entries in prop::collection::vec((entry_name(), image_bytes()), 1..24),
        manifest in prop::option::of((
            prop::collection::vec((entry_name(), "[a-z0-9]{0,4}", any::<bool>()), 0..24),
            prop::collection::vec(damage(), 0..2),
        )),
        compress in any::<bool>(),
        damages in prop::collection::vec(damage(), 0..2),
    ) {
        let mut entries = entries;
        if let Some((lines, manifest_damage)) = manifest {
            // A metadata.jsonl naming entries (or hostile paths), itself perhaps damaged.
            let mut text = String::new();
            for (name, label, listed) in &lines {
                let name = if *listed { entries[name.len() % entries.len()].0.clone() } else { name.clone() };
                text.push_str(&json!({"file_name": name, "label": label}).to_string());
                text.push('\n');
            }
            entries.insert(0, ("metadata.jsonl".to_string(), apply(text.into_bytes(), &manifest_damage)));
        }
        let clean = zip_of(&entries, compress);
        let bytes = apply(clean, &damages);
        // Problems of a manifest carry its line numbers (at most one per generated line).
        let report = validate_zip(Cursor::new(&bytes)).unwrap();
        check_report(&report, usize::MAX);
        let (_dir, path) = write_temp(&bytes, "images.zip");
        let report = validate_dataset(&path, "images.zip").unwrap();
        check_report(&report, usize::MAX);
        if let Ok(examples) = read_image_dataset(&path) {
            for e in &examples {
                prop_assert!(
                    !e.source.contains("..") && !e.source.starts_with('/') && !e.source.contains('\\'),
                    "a hostile entry became an example: {}", e.source
                );
                prop_assert!(decode_rgb(&e.bytes).is_ok());
            }
        }
    }

    /// Any bytes given as an image: decoded or refused, never a panic.
    #[test]
    fn images_decode_or_are_refused(bytes in image_bytes(), damages in prop::collection::vec(damage(), 0..3)) {
        let bytes = apply(bytes, &damages);
        if let Ok(img) = decode_rgb(&bytes) {
            prop_assert!(img.width() > 0 && img.height() > 0);
        }
        let url = data_url(&bytes);
        prop_assert_eq!(decode_data_url(&url).unwrap(), bytes);
    }

    /// Data URLs of any shape.
    #[test]
    fn data_urls_of_any_shape_decode_or_are_refused(url in "(data:)?[a-z/;=+, ]{0,30}[A-Za-z0-9+/=]{0,64}") {
        if let Ok(bytes) = decode_data_url(&url) {
            let _ = decode_rgb(&bytes);
        }
    }
}

/// A zip bomb: one entry that inflates to far more than any image may be, declaring its
/// true size or (headers patched) a small one. Validation and reading end with a clear
/// error naming the entry, quickly and in bounded memory.
#[test]
fn a_zip_bomb_ends_as_a_validation_error_in_bounded_memory() {
    for lie in [false, true] {
        zip_bomb(lie);
    }
}

/// Overwrites the uncompressed size of every entry named `name` in both the local and the
/// central headers (a zip without zip64 fields).
fn patch_declared_size(zip: &mut [u8], name: &[u8], size: u32) {
    let mut i = 0;
    while i + 46 < zip.len() {
        let (sig, name_at, size_at) = match &zip[i..i + 4] {
            b"PK\x03\x04" => (true, i + 30, i + 22),
            b"PK\x01\x02" => (true, i + 46, i + 24),
            _ => (false, 0, 0),
        };
        if sig && zip[name_at..].starts_with(name) {
            zip[size_at..size_at + 4].copy_from_slice(&size.to_le_bytes());
        }
        i += 1;
    }
}

fn zip_bomb(lie: bool) {
    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.zip");
    {
        // 1 GiB of zeros under an image name, deflated to about a megabyte.
        let file = std::fs::File::create(&path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(1));
        zip.start_file("class0/bomb.png", options).unwrap();
        let mut header = png(2, 2, 1);
        header.truncate(33);
        zip.write_all(&header).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            zip.write_all(&zeros).unwrap();
        }
        for i in 0..10 {
            zip.start_file(format!("class1/ok{i}.png"), options)
                .unwrap();
            zip.write_all(&png(3, 3, i)).unwrap();
        }
        zip.finish().unwrap();
    }
    if lie {
        let mut bytes = std::fs::read(&path).unwrap();
        patch_declared_size(&mut bytes, b"class0/bomb.png", 4096);
        std::fs::write(&path, bytes).unwrap();
    }
    let compressed = std::fs::metadata(&path).unwrap().len();
    assert!(compressed < 16 << 20, "{compressed}");
    let before = peak_rss_kib();
    let started = std::time::Instant::now();
    let report = validate_dataset(&path, "bomb.zip").unwrap();
    assert!(!report.is_valid(), "a bomb passed: {}", report.summary());
    let named = report.problems.iter().any(|p| {
        p.file.as_deref() == Some("class0/bomb.png") || p.message.contains("class0/bomb.png")
    });
    assert!(named, "the bomb is not named: {:?}", report.problems);
    let err = read_image_dataset(&path).unwrap_err();
    assert!(err.contains("class0/bomb.png"), "{err}");
    let grew_mib = peak_rss_kib().saturating_sub(before) >> 10;
    eprintln!(
        "bomb ({} KiB compressed, declaring {}): refused in {:?} ({err}), peak RSS grew {grew_mib} MiB",
        compressed >> 10,
        if lie { "4 KiB" } else { "1 GiB" },
        started.elapsed()
    );
    assert!(grew_mib < 64, "validation used {grew_mib} MiB on a bomb");
}

/// A line far over the line limit is skipped as it streams, not buffered.
#[test]
fn a_huge_line_is_one_problem_without_being_held_in_memory() {
    let mut data = Vec::new();
    for i in 0..12 {
        data.extend_from_slice(example_line(0, i).to_string().as_bytes());
        data.push(b'\n');
    }
    let huge = 70usize << 20; // over the 64 MiB limit
    data.extend_from_slice(b"{\"text\": \"");
    data.resize(data.len() + huge, b'a');
    data.extend_from_slice(b"\", \"label\": \"pos\"}\n");
    let report = validate_jsonl(Cursor::new(&data)).unwrap();
    assert_eq!(report.total_problems, 1, "{}", report.summary());
    assert_eq!(report.problems[0].line, Some(13));
    assert_eq!(report.examples, 12);
}

// ---- chat templates ------------------------------------------------------------------------

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn message() -> impl Strategy<Value = Value> {
    let content = prop_oneof![
        "[a-zA-Z0-9 \u{e9}\u{1F600}<|>{}%#\n]{0,40}".prop_map(Value::String),
        Just(Value::Null),
        Just(json!(42)),
        Just(
            json!([{"type": "text", "text": "part"}, {"type": "image_url", "image_url": {"url": "x"}}])
        ),
        Just(json!([{"type": "text"}])),
        Just(json!({"nested": {"deeper": [1, 2, 3]}})),
        Just(json!("{{ 7 * 7 }}{% raw %}")),
    ];
    let role = prop_oneof![
        Just(json!("system")),
        Just(json!("user")),
        Just(json!("assistant")),
        Just(json!("tool")),
        Just(json!("")),
        Just(json!(7)),
        Just(Value::Null),
    ];
    (
        role,
        content,
        prop::option::of(prop_oneof![
            Just(json!(0)),
            Just(json!(1)),
            Just(json!("x"))
        ]),
    )
        .prop_map(|(role, content, weight)| {
            let mut m = json!({"role": role, "content": content});
            if let Some(w) = weight {
                m["weight"] = w;
            }
            m
        })
}

/// Fragments real templates are made of, to build templates that are valid, nearly valid
/// or nonsense.
fn template_source() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{% for message in messages %}"),
        Just("{% endfor %}"),
        Just("{{ message['role'] }}"),
        Just("{{ message.content }}"),
        Just("{{ message.content | tojson }}"),
        Just("{% if add_generation_prompt %}"),
        Just("{% endif %}"),
        Just("{% else %}"),
        Just("{{ bos_token }}"),
        Just("{{ eos_token }}"),
        Just("{{ raise_exception('no') }}"),
        Just("{{ strftime_now('%d %b %Y') }}"),
        Just("{{ strftime_now('%Q %') }}"),
        Just("{{ messages[0]['content'].strip() }}"),
        Just("{{ message.content.split('x') | length }}"),
        Just("{% set ns = namespace(x=1) %}"),
        Just("{{ ns.x }}"),
        Just("{{ loop.index }}"),
        Just("{{ range(100000) | length }}"),
        Just("{{ 'a' * 100000 }}"),
        Just("{%"),
        Just("}}"),
        Just("{{"),
        Just("{# c #}"),
        Just("text "),
        Just("\n"),
        Just("{{ undefined_thing.attr }}"),
        Just("{{ 1 / 0 }}"),
        Just("{{ messages | first }}"),
        Just("{% macro m(x) %}{{ x }}{% endmacro %}{{ m(1) }}"),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config())]

    /// Any messages through real templates: rendered or a clear error.
    #[test]
    fn any_messages_render_or_fail_cleanly(
        messages in prop::collection::vec(message(), 0..8),
        add_prompt in any::<bool>(),
        chatml in any::<bool>(),
    ) {
        let source = chatml.then(|| CHATML.to_string());
        let t = ChatTemplate::new(source, String::new(), "<|im_end|>".into()).unwrap();
        if let Err(e) = t.render(&messages, add_prompt) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// Any template a model directory could bring: loaded and rendered, or a clear error.
    #[test]
    fn any_template_loads_and_renders_or_fails_cleanly(
        source in template_source(),
        messages in prop::collection::vec(message(), 0..4),
    ) {
        if let Ok(t) = ChatTemplate::new(Some(source), "<s>".into(), "</s>".into()) {
            let _ = t.render(&messages, true);
            let _ = t.render(&messages, false);
        }
    }
}

/// Messages through a real tokenizer and its template, as training encodes them.
#[test]
fn any_conversation_encodes_or_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    kiln::nn::tiny::write_tiny_decoder(dir.path(), "qwen2", 1).unwrap();
    let tok = DecoderTokenizer::load(dir.path()).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&prop::collection::vec(message(), 0..6), |messages| {
            let _ = tok.encode_chat(&messages);
            let _ = tok.encode_prompt(&messages);
            Ok(())
        })
        .unwrap();
}

/// A template that would loop for hours fails within about a second instead (fuel).
#[test]
fn a_template_that_never_ends_is_stopped() {
    let forever =
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
    let t = ChatTemplate::new(Some(forever.into()), String::new(), String::new()).unwrap();
    let started = std::time::Instant::now();
    let err = t.render(&[], true).unwrap_err().to_string();
    eprintln!("stopped after {:?}: {err}", started.elapsed());
    assert!(err.contains("fuel"), "{err}");
}
