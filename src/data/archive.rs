//! Zip validation for image classification: one folder per class, or a manifest.
//!
//! A zip with a `metadata.jsonl` at its top (or inside one wrapper folder) is labelled by
//! that manifest, as Hugging Face's ImageFolder reads it: one line per image,
//! `{"file_name": "path/in/zip.png", "label": ...}` (`image` is accepted for `file_name`),
//! paths relative to the manifest's folder. Otherwise every `CLASS/image` is an example.
//!
//! Only the central directory, the manifest and the first [`SNIFF_LEN`] bytes of each image
//! are read, so a zip bomb costs nothing: no image is fully decompressed here.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek};

use ::zip::ZipArchive;
use ::zip::result::ZipError;

use super::image::{
    ImageKind, SNIFF_LEN, has_image_extension, has_parent_component, is_absolute,
    unsupported_extension_message,
};
use super::{
    DatasetFormat, DatasetSource, MAX_ZIP_ENTRIES, MAX_ZIP_ENTRY_BYTES, Tally, ValidationReport,
    finish, read_up_to,
};

/// Resource limits for zip validation; parameters so tests can use small ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZipLimits {
    /// Archives with more entries are refused without looking at any entry.
    pub max_entries: usize,
    /// Entries declaring a larger uncompressed size are reported, not read.
    pub max_entry_bytes: u64,
}

impl ZipLimits {
    const DEFAULT: ZipLimits = ZipLimits {
        max_entries: MAX_ZIP_ENTRIES,
        max_entry_bytes: MAX_ZIP_ENTRY_BYTES,
    };
}

/// Validates a zip of images laid out as `CLASS/image.ext`, optionally inside one
/// common top-level folder (`dataset/CLASS/image.ext`).
///
/// The report's labels map each class to its number of valid images. Damage to
/// the archive is reported as problems; `Err` is only for failures of the reader.
pub fn validate_zip<R: Read + Seek>(reader: R) -> io::Result<ValidationReport> {
    validate_zip_limited(reader, ZipLimits::DEFAULT)
}

/// [`validate_zip`] with explicit limits.
pub(crate) fn validate_zip_limited<R: Read + Seek>(
    reader: R,
    limits: ZipLimits,
) -> io::Result<ValidationReport> {
    let mut t = Tally::new(DatasetSource::Zip);
    let mut archive = match ZipArchive::new(reader) {
        Ok(a) => a,
        // Truncated or garbled archives surface as EOF/invalid-data I/O errors;
        // those are the upload's fault, anything else is the reader's.
        Err(ZipError::Io(e))
            if !matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ) =>
        {
            return Err(e);
        }
        Err(e) => {
            t.problems.general(format!("not a valid zip archive: {e}"));
            return Ok(finish(t, false));
        }
    };
    let n = archive.len();
    if n == 0 {
        t.problems.general("the archive is empty");
        return Ok(finish(t, false));
    }
    if n > limits.max_entries {
        t.problems.general(format!(
            "the archive has {n} entries; at most {} are allowed",
            limits.max_entries
        ));
        return Ok(finish(t, false));
    }

    match read_manifest(&mut archive) {
        Ok(None) => {}
        Ok(Some(manifest)) => return Ok(validate_manifest(&mut archive, manifest, limits, t)),
        Err(message) => {
            t.problems.in_file(MANIFEST, message);
            return Ok(finish(t, false));
        }
    }

    // Pass 1 only looks at names, to find a wrapper folder to strip.
    let mut root = Root::Unknown;
    for name in archive.file_names() {
        if let EntryName::Path {
            comps,
            is_dir: false,
        } = classify(name)
            && has_image_extension(name)
        {
            root.observe(&comps);
        }
    }
    let root = match root {
        Root::Common(r) => Some(r),
        _ => None,
    };

    // Class folder → valid images. Folders seen without valid images stay at 0.
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..n {
        // Owned: reading the entry below borrows the archive mutably.
        let Some(name) = archive.name_for_index(i).map(str::to_string) else {
            continue;
        };
        let (comps, is_dir) = match classify(&name) {
            EntryName::Ignored => continue,
            EntryName::Unsafe(msg) => {
                t.problems.in_file(&name, msg);
                continue;
            }
            EntryName::Path { comps, is_dir } => (comps, is_dir),
        };
        let comps = match (&root, comps.split_first()) {
            (Some(r), Some((first, rest))) if first == r => rest,
            _ => &comps[..],
        };
        let Some((class, rest)) = comps.split_first() else {
            continue; // the wrapper folder itself
        };
        if is_dir {
            if rest.is_empty() {
                classes.entry(class.to_string()).or_insert(0);
            }
            continue;
        }
        if rest.len() == 1 {
            // Any file directly inside a folder makes it a class, so a folder
            // holding only unsupported files is reported as empty too.
            classes.entry(class.to_string()).or_insert(0);
        }
        if !has_image_extension(&name) {
            t.problems
                .in_file(&name, unsupported_extension_message(&name));
            continue;
        }
        match rest.len() {
            0 => {
                t.problems.in_file(
                    &name,
                    "image at the top level has no class folder (expected CLASS/image)",
                );
                continue;
            }
            1 => {}
            _ => {
                t.problems
                    .in_file(&name, "image is nested too deep (expected CLASS/image)");
                continue;
            }
        }
        let count = classes.entry(class.to_string()).or_insert(0);
        match check_image_entry(&mut archive, i, limits) {
            Ok(()) => *count += 1,
            Err(msg) => t.problems.in_file(&name, msg),
        }
    }

    for (class, &count) in &classes {
        if count == 0 {
            t.problems
                .in_file(&format!("{class}/"), "class folder has no valid images");
        } else {
            t.labels.add(class, count);
            t.examples += count;
        }
    }
    let with_images = classes.values().filter(|&&c| c > 0).count();
    if with_images < 2 {
        t.problems.general(format!(
            "fewer than 2 classes (found {with_images} class {} with images)",
            if with_images == 1 {
                "folder"
            } else {
                "folders"
            }
        ));
    }
    if t.examples > 0 {
        t.format = Some(DatasetFormat::ImageClassification);
    }
    Ok(finish(t, true))
}

/// The manifest's file name (Hugging Face ImageFolder's).
pub(crate) const MANIFEST: &str = "metadata.jsonl";

/// The largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// One line of a manifest: where its image is and its label, or why it is unusable.
pub(crate) struct ManifestRow {
    /// 1-based line number in the manifest.
    pub line: u64,
    /// The image's entry index and name, and its label.
    pub example: Result<(usize, String, String), String>,
}

/// A zip's `metadata.jsonl`, read.
pub(crate) struct Manifest {
    /// The manifest's own entry name.
    pub name: String,
    pub rows: Vec<ManifestRow>,
}

/// Finds and reads the manifest of a zip (`metadata.jsonl` at the top or inside one
/// wrapper folder); `Ok(None)` when there is none. Lines are resolved to entries here,
/// so validation and training read the same examples.
pub(crate) fn read_manifest<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
) -> Result<Option<Manifest>, String> {
    let mut entries: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut found: Option<(usize, String, Vec<String>)> = None;
    for i in 0..archive.len() {
        let Some(name) = archive.name_for_index(i) else {
            continue;
        };
        let EntryName::Path { comps, is_dir } = classify(name) else {
            continue;
        };
        if is_dir {
            continue;
        }
        if comps.last().is_some_and(|c| c == MANIFEST)
            && comps.len() <= 2
            && found.as_ref().is_none_or(|(_, _, f)| comps.len() < f.len())
        {
            let folder = comps[..comps.len() - 1].to_vec();
            found = Some((i, name.to_string(), folder));
        }
        entries.insert(comps.join("/"), i);
    }
    let Some((index, name, folder)) = found else {
        return Ok(None);
    };
    let text = read_entry(archive, index, &name, MAX_MANIFEST_BYTES)?;
    let rows = text
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| ManifestRow {
            line: i as u64 + 1,
            example: manifest_example(line, &folder, &entries),
        })
        .collect();
    Ok(Some(Manifest { name, rows }))
}

/// The bytes of entry `index` (named `name`, for messages): refused when it declares more
/// than `max`, and never read past its declared size (plus one byte, to notice a lie), so a
/// bomb whose headers understate what it inflates to costs no more than an honest entry.
pub(crate) fn read_entry<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    index: usize,
    name: &str,
    max: u64,
) -> Result<Vec<u8>, String> {
    let mut entry = archive
        .by_index(index)
        .map_err(|e| format!("{name}: cannot read entry: {e}"))?;
    let declared = entry.size();
    if declared > max {
        return Err(format!(
            "{name}: {declared} bytes uncompressed, more than the {max} allowed"
        ));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    entry
        .by_ref()
        .take(declared + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: cannot read entry: {e}"))?;
    if bytes.len() as u64 > declared {
        return Err(format!(
            "{name}: the entry inflates to more than the {declared} bytes its header declares (a corrupt archive, or a zip bomb)"
        ));
    }
    Ok(bytes)
}

/// One manifest line: its image's entry (index and name) and its label.
fn manifest_example(
    line: &[u8],
    folder: &[String],
    entries: &std::collections::HashMap<String, usize>,
) -> Result<(usize, String, String), String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "each line must be a JSON object".to_string())?;
    let (key, path) = match (obj.get("file_name"), obj.get("image")) {
        (Some(serde_json::Value::String(p)), _) => ("file_name", p),
        (None, Some(serde_json::Value::String(p))) => ("image", p),
        (None, None) => return Err("missing key \"file_name\"".to_string()),
        _ => return Err("\"file_name\" must be a string (a path inside the zip)".to_string()),
    };
    let label = match obj.get("label") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => b.to_string(),
        None => return Err("missing key \"label\"".to_string()),
        Some(_) => return Err("\"label\" must be a non-empty string or a number".to_string()),
    };
    super::image::check_image_path(path)
        .map_err(|m| m.replacen("\"image\"", &format!("\"{key}\""), 1))?;
    let EntryName::Path { comps, .. } = classify(path) else {
        return Err(format!("\"{key}\": {path:?} is not a usable path"));
    };
    let full: Vec<String> = folder.iter().cloned().chain(comps).collect();
    let entry = full.join("/");
    match entries.get(&entry) {
        Some(&index) => Ok((index, entry, label)),
        None => Err(format!("no entry {entry:?} in the archive")),
    }
}

/// Validates the images a manifest names: each problem carries the manifest line.
fn validate_manifest<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    manifest: Manifest,
    limits: ZipLimits,
    mut t: Tally,
) -> ValidationReport {
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    for row in manifest.rows {
        let file = Some(manifest.name.as_str());
        match row.example {
            Err(message) => t.problems.push(Some(row.line), file, message),
            Ok((index, name, label)) => match check_image_entry(archive, index, limits) {
                Ok(()) => *classes.entry(label).or_insert(0) += 1,
                Err(message) => t
                    .problems
                    .push(Some(row.line), file, format!("{name}: {message}")),
            },
        }
    }
    for (class, &count) in &classes {
        t.labels.add(class, count);
        t.examples += count;
    }
    if classes.len() < 2 {
        t.problems.general(format!(
            "fewer than 2 labels with images in {} (found {})",
            manifest.name,
            classes.len()
        ));
    }
    if t.examples > 0 {
        t.format = Some(DatasetFormat::ImageClassification);
    }
    finish(t, true)
}

/// How an entry's name is treated.
enum EntryName {
    /// macOS resource forks and dotfiles: silently skipped.
    Ignored,
    /// Would escape the extraction folder.
    Unsafe(&'static str),
    /// Normalised components (`/` and `\` both separate; `.` and empty dropped).
    Path { comps: Vec<String>, is_dir: bool },
}

fn classify(name: &str) -> EntryName {
    // Backslashes count as separators: Windows tools write them, and an
    // extractor on Windows would honour them.
    if is_absolute(name) {
        return EntryName::Unsafe("unsafe path: absolute paths are not allowed");
    }
    if has_parent_component(name) {
        return EntryName::Unsafe("unsafe path: \"..\" would lead outside the archive");
    }
    let comps: Vec<String> = name
        .split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect();
    if comps.is_empty() || comps.iter().any(|c| c == "__MACOSX" || c.starts_with('.')) {
        return EntryName::Ignored;
    }
    EntryName::Path {
        comps,
        is_dir: name.ends_with(['/', '\\']),
    }
}

/// A zip entry name as `(components, is_dir)`; `None` for ignored or unsafe names.
pub(crate) fn classify_entry(name: &str) -> Option<(Vec<String>, bool)> {
    match classify(name) {
        EntryName::Path { comps, is_dir } => Some((comps, is_dir)),
        EntryName::Ignored | EntryName::Unsafe(_) => None,
    }
}

/// Tracks whether every image sits under one common wrapper folder.
pub(crate) enum Root {
    Unknown,
    Common(String),
    None,
}

impl Root {
    /// The wrapper folder every image sits under, if there is one.
    pub(crate) fn common(self) -> Option<String> {
        match self {
            Root::Common(r) => Some(r),
            _ => None,
        }
    }

    pub(crate) fn observe(&mut self, comps: &[String]) {
        // `dataset/CLASS/img` has 3 components; anything shallower means the
        // first folder is already the class.
        let candidate = match comps {
            [first, _, _, ..] => first,
            _ => {
                *self = Root::None;
                return;
            }
        };
        match self {
            Root::Unknown => *self = Root::Common(candidate.clone()),
            Root::Common(r) if r != candidate => *self = Root::None,
            _ => {}
        }
    }
}

/// Checks one image entry: declared size, readability and magic bytes. Reads at
/// most [`SNIFF_LEN`] decompressed bytes.
fn check_image_entry<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    index: usize,
    limits: ZipLimits,
) -> Result<(), String> {
    let mut file = archive
        .by_index(index)
        .map_err(|e| format!("cannot read entry: {e}"))?;
    if file.is_symlink() {
        return Err("symbolic links are not allowed".to_string());
    }
    if file.size() > limits.max_entry_bytes {
        return Err(format!(
            "declared uncompressed size {} bytes exceeds the limit of {} bytes",
            file.size(),
            limits.max_entry_bytes
        ));
    }
    let mut head = [0u8; SNIFF_LEN];
    let got = read_up_to(&mut file, &mut head).map_err(|e| format!("cannot read entry: {e}"))?;
    if got == 0 {
        return Err("the file is empty".to_string());
    }
    match ImageKind::sniff(&head[..got]) {
        Some(_) => Ok(()),
        None => Err("not a valid PNG, JPEG or WebP image (unrecognised file header)".to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::image::tests::{JPEG, PNG, WEBP};
    use crate::data::{MAX_REPORTED_PROBLEMS, Problem};
    use ::zip::write::SimpleFileOptions;
    use ::zip::{CompressionMethod, ZipWriter};
    use std::io::{Cursor, Write};

    fn stored() -> SimpleFileOptions {
        SimpleFileOptions::default().compression_method(CompressionMethod::Stored)
    }

    /// Builds a zip from (name, contents); names ending in `/` become directories.
    pub(crate) fn build_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, stored()).unwrap();
            } else {
                let opts =
                    SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
                w.start_file(*name, opts).unwrap();
                w.write_all(data).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    /// A valid zip with `n` PNGs in each class folder.
    pub(crate) fn class_zip(classes: &[(&str, usize)]) -> Vec<u8> {
        let names: Vec<String> = classes
            .iter()
            .flat_map(|(c, n)| (0..*n).map(move |i| format!("{c}/{i}.png")))
            .collect();
        // Real (decodable) 2x2 PNGs: the upload validator decodes every image.
        let mut png = Vec::new();
        ::image::RgbImage::from_pixel(2, 2, ::image::Rgb([9, 99, 199]))
            .write_to(&mut Cursor::new(&mut png), ::image::ImageFormat::Png)
            .unwrap();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &png[..])).collect();
        build_zip(&entries)
    }

    fn validate(bytes: Vec<u8>) -> ValidationReport {
        validate_zip(Cursor::new(bytes)).unwrap()
    }

    fn file_problem(file: &str, message: &str) -> Problem {
        Problem {
            line: None,
            file: Some(file.to_string()),
            message: message.to_string(),
        }
    }

    fn general(message: &str) -> Problem {
        Problem {
            line: None,
            file: None,
            message: message.to_string(),
        }
    }

    #[test]
    fn accepts_class_folders() {
        let mut entries: Vec<(String, &[u8])> = vec![("cat/".into(), b"")];
        for i in 0..4 {
            entries.push((format!("cat/{i}.png"), PNG));
            entries.push((format!("dog/{i}.JPG"), JPEG));
            entries.push((format!("bird/{i}.webp"), WEBP));
        }
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let r = validate(build_zip(&refs));
        assert!(r.is_valid(), "{}", r.summary());
        assert_eq!(r.source, DatasetSource::Zip);
        assert_eq!(r.format, Some(DatasetFormat::ImageClassification));
        assert_eq!(r.examples, 12);
        assert_eq!(
            r.labels.clone().unwrap(),
            [("bird".into(), 4), ("cat".into(), 4), ("dog".into(), 4)].into()
        );
        assert_eq!(
            r.summary(),
            "ok: 12 image_classification examples, 3 labels"
        );
    }

    #[test]
    fn strips_a_common_top_level_folder_and_ignores_mac_junk() {
        let r = validate(build_zip(&[
            ("dataset/", b""),
            ("dataset/cat/", b""),
            ("dataset/cat/1.png", PNG),
            ("dataset/cat/2.png", PNG),
            ("dataset/cat/3.png", PNG),
            ("dataset/cat/4.png", PNG),
            ("dataset/cat/5.png", PNG),
            ("dataset/dog/1.png", PNG),
            ("dataset/dog/2.png", PNG),
            ("dataset/dog/3.png", PNG),
            ("dataset/dog/4.png", PNG),
            ("dataset/dog/5.png", PNG),
            ("dataset/.DS_Store", b"junk"),
            ("__MACOSX/dataset/cat/._1.png", b"junk"),
            ("dataset/cat/.hidden.png", b"junk"),
            ("./dataset/dog/6.png", PNG), // "./" prefix is harmless
        ]));
        assert!(r.is_valid(), "{}", r.summary());
        assert_eq!(
            r.labels.unwrap(),
            [("cat".into(), 5), ("dog".into(), 6)].into()
        );
    }

    #[test]
    fn single_class_is_not_mistaken_for_a_wrapper() {
        let r = validate(class_zip(&[("cat", 12)]));
        assert_eq!(r.examples, 12);
        assert_eq!(r.labels.clone().unwrap(), [("cat".into(), 12)].into());
        assert_eq!(
            r.problems,
            vec![general(
                "fewer than 2 classes (found 1 class folder with images)"
            )]
        );
    }

    #[test]
    fn reports_layout_problems_per_file() {
        let r = validate(build_zip(&[
            ("cat/1.png", PNG),
            ("cat/2.png", PNG),
            ("cat/3.png", PNG),
            ("cat/4.png", PNG),
            ("cat/5.png", PNG),
            ("dog/1.png", PNG),
            ("dog/2.png", PNG),
            ("dog/3.png", PNG),
            ("dog/4.png", PNG),
            ("dog/5.png", PNG),
            ("dog/anim.gif", b"GIF89a"),
            ("dog/notes.txt", b"hi"),
            ("README", b"hi"),
            ("loose.png", PNG),
            ("cat/sub/deep.png", PNG),
            ("empty/", b""),
        ]));
        assert_eq!(r.examples, 10);
        assert_eq!(
            r.problems,
            vec![
                file_problem(
                    "dog/anim.gif",
                    "unsupported file type \".gif\" (expected png, jpg, jpeg or webp)"
                ),
                file_problem(
                    "dog/notes.txt",
                    "unsupported file type \".txt\" (expected png, jpg, jpeg or webp)"
                ),
                file_problem(
                    "README",
                    "unsupported file type (no extension; expected png, jpg, jpeg or webp)"
                ),
                file_problem(
                    "loose.png",
                    "image at the top level has no class folder (expected CLASS/image)"
                ),
                file_problem(
                    "cat/sub/deep.png",
                    "image is nested too deep (expected CLASS/image)"
                ),
                file_problem("empty/", "class folder has no valid images"),
            ]
        );
    }

    #[test]
    fn rejects_path_traversal() {
        let r = validate(build_zip(&[
            ("../evil.png", PNG),
            ("cat/../../evil.png", PNG),
            ("/etc/evil.png", PNG),
            ("cat\\..\\..\\evil.png", PNG),
            ("C:/evil.png", PNG),
        ]));
        let msgs: Vec<(Option<&str>, &str)> = r
            .problems
            .iter()
            .map(|p| (p.file.as_deref(), p.message.as_str()))
            .collect();
        let dotdot = "unsafe path: \"..\" would lead outside the archive";
        let abs = "unsafe path: absolute paths are not allowed";
        assert_eq!(
            msgs[..5],
            [
                (Some("../evil.png"), dotdot),
                (Some("cat/../../evil.png"), dotdot),
                (Some("/etc/evil.png"), abs),
                (Some("cat\\..\\..\\evil.png"), dotdot),
                (Some("C:/evil.png"), abs),
            ]
        );
        assert_eq!(r.examples, 0);
        assert_eq!(r.format, None);
    }

    #[test]
    fn backslash_separators_are_understood() {
        let names: Vec<String> = (0..5)
            .flat_map(|i| [format!("cat\\{i}.png"), format!("dog\\{i}.png")])
            .collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), PNG)).collect();
        let r = validate(build_zip(&entries));
        assert!(r.is_valid(), "{}", r.summary());
    }

    #[test]
    fn reports_bad_and_corrupt_images() {
        let mut entries: Vec<(&str, &[u8])> = vec![("cat/corrupt.png", PNG)]; // corrupted below
        let names: Vec<String> = (0..5)
            .flat_map(|i| [format!("cat/{i}.png"), format!("dog/{i}.png")])
            .collect();
        entries.extend(names.iter().map(|n| (n.as_str(), PNG)));
        entries.push(("dog/fake.png", b"this is not an image"));
        entries.push(("dog/empty.jpg", b""));
        let mut bytes = build_zip(&entries);
        // The first entry's data starts after its 30-byte local header and name.
        // 0x07 = final block with the reserved block type 3: invalid deflate.
        let data_start = 30 + "cat/corrupt.png".len();
        bytes[data_start] = 0x07;
        let r = validate(bytes);
        assert_eq!(r.examples, 10);
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
        assert_eq!(r.problems[0].file.as_deref(), Some("cat/corrupt.png"));
        assert!(
            r.problems[0].message.starts_with("cannot read entry:"),
            "{}",
            r.problems[0].message
        );
        assert_eq!(
            r.problems[1],
            file_problem(
                "dog/fake.png",
                "not a valid PNG, JPEG or WebP image (unrecognised file header)"
            )
        );
        assert_eq!(
            r.problems[2],
            file_problem("dog/empty.jpg", "the file is empty")
        );
    }

    #[test]
    fn refuses_entries_declaring_huge_sizes() {
        let mut bytes = class_zip(&[("cat", 5), ("dog", 5)]);
        // Patch the first central directory record's uncompressed size (offset
        // 24) to ~4 GiB, as a zip bomb would declare; the data stays tiny.
        let cd = bytes.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        bytes[cd + 24..cd + 28].copy_from_slice(&0xF000_0000u32.to_le_bytes());
        let r = validate(bytes);
        assert_eq!(
            r.problems,
            vec![
                file_problem(
                    "cat/0.png",
                    "declared uncompressed size 4026531840 bytes exceeds the limit of 268435456 bytes"
                ),
                general("fewer than 10 examples (found 9)"),
            ]
        );
        // The same guard with a small limit on an honest entry.
        let big = vec![0x89u8; 2000];
        let zip = build_zip(&[("cat/big.png", &big), ("dog/a.png", PNG)]);
        let limits = ZipLimits {
            max_entries: 100,
            max_entry_bytes: 1000,
        };
        let r = validate_zip_limited(Cursor::new(zip), limits).unwrap();
        assert_eq!(
            r.problems[0],
            file_problem(
                "cat/big.png",
                "declared uncompressed size 2000 bytes exceeds the limit of 1000 bytes"
            )
        );
    }

    #[test]
    fn refuses_too_many_entries() {
        let zip = class_zip(&[("cat", 3), ("dog", 3)]);
        let limits = ZipLimits {
            max_entries: 5,
            max_entry_bytes: 1 << 20,
        };
        let r = validate_zip_limited(Cursor::new(zip), limits).unwrap();
        assert_eq!(
            r.problems,
            vec![general("the archive has 6 entries; at most 5 are allowed")]
        );
        assert_eq!(r.format, None);
    }

    #[test]
    fn empty_and_invalid_archives() {
        let r = validate(build_zip(&[]));
        assert_eq!(r.problems, vec![general("the archive is empty")]);
        let r = validate(b"PK\x03\x04 definitely not a zip".to_vec());
        assert_eq!(r.problems.len(), 1);
        assert!(
            r.problems[0].message.starts_with("not a valid zip archive"),
            "{:?}",
            r.problems
        );
        let mut truncated = class_zip(&[("cat", 5), ("dog", 5)]);
        truncated.truncate(truncated.len() / 2);
        let r = validate(truncated);
        assert!(
            r.problems[0].message.starts_with("not a valid zip archive"),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn many_bad_files_are_capped() {
        let names: Vec<String> = (0..30).map(|i| format!("cat/{i}.txt")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        let r = validate(build_zip(&entries));
        assert_eq!(r.problems.len(), MAX_REPORTED_PROBLEMS);
        // 30 files + empty class + fewer than 2 classes + fewer than 10 examples.
        assert_eq!(r.total_problems, 33);
    }

    fn real_png() -> Vec<u8> {
        let mut png = Vec::new();
        ::image::RgbImage::from_pixel(3, 2, ::image::Rgb([200, 10, 30]))
            .write_to(&mut Cursor::new(&mut png), ::image::ImageFormat::Png)
            .unwrap();
        png
    }

    #[test]
    fn a_manifest_labels_the_images_it_names_wherever_they_are() {
        let png = real_png();
        for wrapper in ["", "dataset/"] {
            let mut manifest = String::new();
            let mut names = Vec::new();
            for i in 0..12 {
                let file = format!("imgs/{}/{i}.png", i % 3); // folders say nothing
                let label = if i % 2 == 0 { "cat" } else { "dog" };
                manifest.push_str(&format!(
                    "{{\"file_name\": \"{file}\", \"label\": \"{label}\"}}\n"
                ));
                names.push(format!("{wrapper}{file}"));
            }
            names.push(format!("{wrapper}imgs/unlisted.png")); // not in the manifest: ignored
            let manifest_name = format!("{wrapper}metadata.jsonl");
            let mut entries: Vec<(&str, &[u8])> =
                vec![(manifest_name.as_str(), manifest.as_bytes())];
            entries.extend(names.iter().map(|n| (n.as_str(), &png[..])));
            let bytes = build_zip(&entries);
            let r = validate(bytes.clone());
            assert!(r.is_valid(), "{}", r.summary());
            assert_eq!(r.examples, 12);
            assert_eq!(
                r.labels.clone().unwrap(),
                [("cat".into(), 6), ("dog".into(), 6)].into()
            );
            // Training reads the same examples with the manifest's labels.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("set.zip");
            std::fs::write(&path, &bytes).unwrap();
            let examples = crate::data::images::read_image_dataset(&path).unwrap();
            assert_eq!(examples.len(), 12);
            assert_eq!(examples[1].label, "dog");
            assert_eq!(examples[1].source, format!("{wrapper}imgs/1/1.png"));
        }
    }

    #[test]
    fn manifest_problems_carry_their_line() {
        let png = real_png();
        let mut manifest = String::new();
        for i in 0..10 {
            manifest.push_str(&format!(
                "{{\"image\": \"a/{i}.png\", \"label\": {}}}\n",
                i % 2
            ));
        }
        manifest.push_str("{\"file_name\": \"a/missing.png\", \"label\": \"x\"}\n"); // 11
        manifest.push_str("not json\n"); // 12
        manifest.push_str("{\"file_name\": \"../../etc/passwd.png\", \"label\": \"x\"}\n"); // 13
        manifest.push_str("{\"file_name\": \"a/0.png\"}\n"); // 14
        manifest.push_str("{\"file_name\": \"a/notes.txt\", \"label\": \"x\"}\n"); // 15
        manifest.push_str("{\"file_name\": \"a/fake.png\", \"label\": \"x\"}\n"); // 16
        let names: Vec<String> = (0..10).map(|i| format!("a/{i}.png")).collect();
        let mut entries: Vec<(&str, &[u8])> = vec![("metadata.jsonl", manifest.as_bytes())];
        entries.extend(names.iter().map(|n| (n.as_str(), &png[..])));
        entries.push(("a/notes.txt", b"hello"));
        entries.push(("a/fake.png", b"not an image at all"));
        let r = validate(build_zip(&entries));
        assert!(!r.is_valid());
        assert_eq!(r.examples, 10, "{}", r.summary());
        let lines: Vec<u64> = r.problems.iter().filter_map(|p| p.line).collect();
        assert_eq!(lines, [11, 12, 13, 14, 15, 16], "{:?}", r.problems);
        assert!(
            r.problems
                .iter()
                .all(|p| p.file.as_deref() == Some("metadata.jsonl"))
        );
        assert!(
            r.problems[0].message.contains("no entry \"a/missing.png\""),
            "{:?}",
            r.problems[0]
        );
        assert!(r.problems[2].message.contains(".."), "{:?}", r.problems[2]);
        assert!(
            r.problems[3].message.contains("label"),
            "{:?}",
            r.problems[3]
        );
        assert!(
            r.problems[5].message.contains("a/fake.png"),
            "{:?}",
            r.problems[5]
        );
    }
}
