//! A zip upload (class folders or a metadata.jsonl manifest): validated, then read for
//! training; nothing outside the archive's folders may become an example.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let report = kiln::data::validate_zip(std::io::Cursor::new(data)).expect("in memory");
    assert!(report.problems.len() <= kiln::data::MAX_REPORTED_PROBLEMS);
    let path = std::env::temp_dir().join(format!("kiln-fuzz-zip-{}", std::process::id()));
    std::fs::write(&path, data).expect("temp file");
    if let Ok(examples) = kiln::data::images::read_image_dataset(&path) {
        for e in examples {
            assert!(!e.source.contains("..") && !e.source.starts_with('/'), "{}", e.source);
        }
    }
});
