//! A JSONL upload: the validator, then every training-side reader on the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let report = kiln::data::validate_jsonl(std::io::Cursor::new(data)).expect("in memory");
    assert!(report.problems.len() <= kiln::data::MAX_REPORTED_PROBLEMS);
    let _ = report.summary();
    let path = std::env::temp_dir().join(format!("kiln-fuzz-jsonl-{}", std::process::id()));
    std::fs::write(&path, data).expect("temp file");
    let _ = kiln::data::text::read_text_classification(&path);
    let _ = kiln::data::text::read_domain_text(&path);
    let _ = kiln::data::chat::read_lm_records(&path);
    let _ = kiln::data::chat::read_preference_pairs(&path);
    let _ = kiln::data::images::read_image_dataset(&path);
});
