//! Dataset validation for uploaded training files.
//!
//! Pure library code: no async, no HTTP, no SQL. Callers hand over a file (path or
//! reader) and get back a [`ValidationReport`] describing the detected
//! [`DatasetFormat`], example and label counts, and the first
//! [`MAX_REPORTED_PROBLEMS`] problems. Memory stays bounded by the longest
//! accepted line ([`MAX_LINE_BYTES`]) or, for zips, by the central directory.

mod archive;
pub mod chat;
mod formats;
mod image;
pub mod images;
mod jsonl;
pub mod text;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use archive::validate_zip;
pub use image::{IMAGE_EXTENSIONS, ImageKind};
pub use jsonl::validate_jsonl;

/// A dataset needs at least this many valid examples.
pub const MIN_EXAMPLES: u64 = 10;
/// At most this many problems are kept in [`ValidationReport::problems`].
pub const MAX_REPORTED_PROBLEMS: usize = 20;
/// Longest accepted JSONL line in bytes (excluding the newline).
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;
/// Deepest accepted JSON nesting (objects and arrays) in a line.
pub const MAX_JSON_DEPTH: usize = 64;
/// Most zip entries examined; larger archives are refused outright.
pub const MAX_ZIP_ENTRIES: usize = 1_000_000;
/// Largest declared uncompressed size of a single zip entry.
pub const MAX_ZIP_ENTRY_BYTES: u64 = 256 * 1024 * 1024;
/// Most distinct labels tracked; more almost always means the wrong column was
/// used as the label, and tracking them all would bloat the report.
pub const MAX_DISTINCT_LABELS: usize = 10_000;
/// Problems quoted by [`ValidationReport::summary`] before "and N more".
const SUMMARY_PROBLEMS: usize = 3;

/// Training data layouts kiln understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `{"messages": [...]}` conversations with at least one assistant turn.
    Chat,
    /// `{"prompt": ..., "completion": ...}` pairs.
    PromptCompletion,
    /// `{"text": ..., "label": ...}` single-label classification.
    TextClassification,
    /// `{"text": ..., "labels": [...]}` multi-label classification.
    MultiLabelClassification,
    /// DPO pairs: `{"input": ..., "preferred_output": ..., "non_preferred_output": ...}`.
    Preference,
    /// OpenAI RFT: prompt `messages` plus grader reference fields.
    Reinforcement,
    /// `{"image": ..., "label": ...}` lines or a zip with one folder per class.
    ImageClassification,
    /// `{"text": ...}` unlabelled text for domain adaptation.
    DomainText,
}

impl DatasetFormat {
    /// Every format, in detection-message order.
    pub const ALL: [DatasetFormat; 8] = [
        DatasetFormat::Chat,
        DatasetFormat::PromptCompletion,
        DatasetFormat::TextClassification,
        DatasetFormat::MultiLabelClassification,
        DatasetFormat::Preference,
        DatasetFormat::Reinforcement,
        DatasetFormat::ImageClassification,
        DatasetFormat::DomainText,
    ];

    /// The snake_case name, identical to the serde representation.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "chat",
            DatasetFormat::PromptCompletion => "prompt_completion",
            DatasetFormat::TextClassification => "text_classification",
            DatasetFormat::MultiLabelClassification => "multi_label_classification",
            DatasetFormat::Preference => "preference",
            DatasetFormat::Reinforcement => "reinforcement",
            DatasetFormat::ImageClassification => "image_classification",
            DatasetFormat::DomainText => "domain_text",
        }
    }

    /// Short description of the training task the format feeds.
    pub fn task(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "supervised fine-tuning on conversations",
            DatasetFormat::PromptCompletion => "supervised fine-tuning on prompt/completion pairs",
            DatasetFormat::TextClassification => "text classification",
            DatasetFormat::MultiLabelClassification => "multi-label text classification",
            DatasetFormat::Preference => "preference optimisation (DPO)",
            DatasetFormat::Reinforcement => "reinforcement fine-tuning with a grader",
            DatasetFormat::ImageClassification => "image classification",
            DatasetFormat::DomainText => "domain adaptation on unlabelled text",
        }
    }

    /// The keys that identify the format, as shown in "cannot tell the format".
    pub fn signature(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "messages",
            DatasetFormat::PromptCompletion => "prompt+completion",
            DatasetFormat::TextClassification => "text+label",
            DatasetFormat::MultiLabelClassification => "text+labels",
            DatasetFormat::Preference => "input+preferred_output+non_preferred_output",
            DatasetFormat::Reinforcement => "messages+reference fields",
            DatasetFormat::ImageClassification => "image+label",
            DatasetFormat::DomainText => "text",
        }
    }

    /// Whether the report carries a label histogram for this format.
    pub fn has_labels(self) -> bool {
        matches!(
            self,
            DatasetFormat::TextClassification
                | DatasetFormat::MultiLabelClassification
                | DatasetFormat::ImageClassification
        )
    }
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the report's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetSource {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// A zip archive with one folder per class.
    Zip,
}

/// One thing wrong with a dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// 1-based line number in a JSONL file.
    pub line: Option<u64>,
    /// Entry name inside a zip archive.
    pub file: Option<String>,
    /// What is wrong, without the line/file prefix.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, &self.file) {
            (Some(l), Some(file)) => write!(f, "line {l} ({file}): {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            (None, Some(file)) => write!(f, "{file}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

/// Outcome of validating one dataset file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValidationReport {
    /// Whether the data was read as JSONL or as a zip of class folders.
    #[serde(default)]
    pub source: DatasetSource,
    /// Detected format; `None` when no line/image was valid.
    pub format: Option<DatasetFormat>,
    /// Number of valid examples (lines or images).
    pub examples: u64,
    /// Label → frequency for classification formats (multi-label counts each label).
    pub labels: Option<BTreeMap<String, u64>>,
    /// The first [`MAX_REPORTED_PROBLEMS`] problems, in file order.
    pub problems: Vec<Problem>,
    /// Every problem found, including those not kept in `problems`.
    pub total_problems: u64,
    /// Image-classification examples that name an image by path (to be found in
    /// a separately uploaded zip) instead of embedding a data URL.
    #[serde(default)]
    pub image_paths: u64,
}

impl ValidationReport {
    /// True when a format was detected and nothing is wrong.
    pub fn is_valid(&self) -> bool {
        self.total_problems == 0 && self.problems.is_empty() && self.format.is_some()
    }

    /// One human sentence for a status line, e.g.
    /// `line 3: missing key "label"; line 7: "text" is empty; and 4 more problems`
    /// or `ok: 120 text_classification examples, 3 labels`.
    pub fn summary(&self) -> String {
        if self.problems.is_empty() && self.total_problems == 0 {
            return match self.format {
                Some(format) => {
                    let mut s = format!(
                        "ok: {} {format} {}",
                        self.examples,
                        plural(self.examples, "example")
                    );
                    if let Some(labels) = &self.labels {
                        let n = labels.len() as u64;
                        s.push_str(&format!(", {n} {}", plural(n, "label")));
                    }
                    s
                }
                None => "no examples found".to_string(),
            };
        }
        let shown: Vec<String> = self
            .problems
            .iter()
            .take(SUMMARY_PROBLEMS)
            .map(|p| p.to_string())
            .collect();
        let mut s = shown.join("; ");
        let rest = self.total_problems.saturating_sub(shown.len() as u64);
        if rest > 0 {
            if !s.is_empty() {
                s.push_str("; ");
            }
            s.push_str(&format!("and {rest} more {}", plural(rest, "problem")));
        }
        s
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// Validates an uploaded file, choosing zip or JSONL handling.
///
/// A file is treated as a zip when it starts with a zip signature or `filename`
/// ends in `.zip`; everything else is read as JSONL. I/O errors (the file cannot
/// be opened or read) are returned as `Err`; everything wrong with the content is
/// reported as problems.
pub fn validate_dataset(path: &Path, filename: &str) -> io::Result<ValidationReport> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut file, &mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    let is_zip_name = filename.to_ascii_lowercase().ends_with(".zip");
    // PK\x05\x06 is an empty archive (end-of-central-directory first).
    let is_zip_magic = got == 4 && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06");
    let mut report = if is_zip_name || is_zip_magic {
        validate_zip(BufReader::new(file))?
    } else {
        validate_jsonl(BufReader::with_capacity(256 * 1024, file))?
    };
    // The structural pass only sniffs image headers; a set that passed it has every image
    // decoded, so a truncated or corrupt one is reported now rather than mid-training.
    if report.format == Some(DatasetFormat::ImageClassification)
        && report.total_problems == 0
        && report.image_paths == 0
    {
        match images::decode_problems(path) {
            Ok(problems) => {
                for p in problems {
                    report.total_problems += 1;
                    if report.problems.len() < MAX_REPORTED_PROBLEMS {
                        report.problems.push(p);
                    }
                }
            }
            Err(message) => {
                report.total_problems += 1;
                report.problems.push(Problem {
                    line: None,
                    file: None,
                    message,
                });
            }
        }
    }
    Ok(report)
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
pub(crate) fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Collects problems, keeping the first [`MAX_REPORTED_PROBLEMS`] and counting all.
#[derive(Debug, Default)]
pub(crate) struct ProblemLog {
    kept: Vec<Problem>,
    total: u64,
}

impl ProblemLog {
    pub(crate) fn push(
        &mut self,
        line: Option<u64>,
        file: Option<&str>,
        message: impl Into<String>,
    ) {
        self.total += 1;
        if self.kept.len() < MAX_REPORTED_PROBLEMS {
            self.kept.push(Problem {
                line,
                file: file.map(str::to_string),
                message: message.into(),
            });
        }
    }

    pub(crate) fn at_line(&mut self, line: u64, message: impl Into<String>) {
        self.push(Some(line), None, message);
    }

    pub(crate) fn in_file(&mut self, file: &str, message: impl Into<String>) {
        self.push(None, Some(file), message);
    }

    pub(crate) fn general(&mut self, message: impl Into<String>) {
        self.push(None, None, message);
    }
}

/// Label histogram bounded to [`MAX_DISTINCT_LABELS`] entries.
#[derive(Debug, Default)]
pub(crate) struct LabelCounts {
    map: BTreeMap<String, u64>,
    overflowed: bool,
}

impl LabelCounts {
    /// Adds `n` occurrences; a label beyond the distinct-label cap is dropped
    /// (and remembered, so [`finish`] can report it once).
    pub(crate) fn add(&mut self, label: &str, n: u64) {
        if let Some(count) = self.map.get_mut(label) {
            *count += n;
        } else if self.map.len() < MAX_DISTINCT_LABELS {
            self.map.insert(label.to_string(), n);
        } else {
            self.overflowed = true;
        }
    }
}

/// Everything a validator gathered; [`finish`] adds dataset-level problems.
pub(crate) struct Tally {
    pub source: DatasetSource,
    pub format: Option<DatasetFormat>,
    pub examples: u64,
    pub labels: LabelCounts,
    pub problems: ProblemLog,
    pub image_paths: u64,
}

impl Tally {
    pub(crate) fn new(source: DatasetSource) -> Tally {
        Tally {
            source,
            format: None,
            examples: 0,
            labels: LabelCounts::default(),
            problems: ProblemLog::default(),
            image_paths: 0,
        }
    }
}

/// Adds the dataset-wide checks (label count, minimum examples) and builds the report.
/// `check_minimums` is false when a more fundamental problem (empty file, not a
/// zip) was already reported, so the user is not told the obvious twice.
pub(crate) fn finish(mut t: Tally, check_minimums: bool) -> ValidationReport {
    let labelled = t.format.is_some_and(DatasetFormat::has_labels);
    if labelled {
        if t.labels.overflowed {
            t.problems.general(format!(
                "more than {MAX_DISTINCT_LABELS} distinct labels; is the right field used as the label?"
            ));
        }
        let n = t.labels.map.len();
        // Zips word this as "classes" themselves, counting empty folders too.
        if check_minimums && n < 2 && t.source == DatasetSource::Jsonl {
            t.problems.general(format!(
                "classification needs at least 2 distinct labels (found {n})"
            ));
        }
    }
    if check_minimums && t.examples < MIN_EXAMPLES {
        t.problems.general(format!(
            "fewer than {MIN_EXAMPLES} examples (found {})",
            t.examples
        ));
    }
    ValidationReport {
        source: t.source,
        format: t.format,
        examples: t.examples,
        labels: labelled.then_some(t.labels.map),
        problems: t.problems.kept,
        total_problems: t.problems.total,
        image_paths: t.image_paths,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn report(
        problems: Vec<Problem>,
        total: u64,
        format: Option<DatasetFormat>,
    ) -> ValidationReport {
        ValidationReport {
            source: DatasetSource::Jsonl,
            format,
            examples: 120,
            labels: None,
            problems,
            total_problems: total,
            image_paths: 0,
        }
    }

    fn line_problem(line: u64, message: &str) -> Problem {
        Problem {
            line: Some(line),
            file: None,
            message: message.to_string(),
        }
    }

    #[test]
    fn format_names_match_serde() {
        for f in DatasetFormat::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            let back: DatasetFormat = serde_json::from_str(&json).unwrap();
            assert_eq!(back, f);
            assert!(!f.task().is_empty());
        }
    }

    #[test]
    fn summary_ok_with_and_without_labels() {
        let mut r = report(vec![], 0, Some(DatasetFormat::TextClassification));
        r.labels = Some([("a".into(), 60), ("b".into(), 50), ("c".into(), 10)].into());
        assert!(r.is_valid());
        assert_eq!(
            r.summary(),
            "ok: 120 text_classification examples, 3 labels"
        );
        let r = report(vec![], 0, Some(DatasetFormat::Chat));
        assert_eq!(r.summary(), "ok: 120 chat examples");
        let r = report(vec![], 0, None);
        assert!(!r.is_valid());
        assert_eq!(r.summary(), "no examples found");
    }

    #[test]
    fn summary_lists_first_problems_and_counts_the_rest() {
        let problems = vec![
            line_problem(3, "missing key \"label\""),
            line_problem(7, "\"text\" is empty"),
            Problem {
                line: None,
                file: Some("cat/x.gif".into()),
                message: "unsupported".into(),
            },
            line_problem(9, "not shown"),
        ];
        let r = report(problems, 7, Some(DatasetFormat::TextClassification));
        assert!(!r.is_valid());
        assert_eq!(
            r.summary(),
            "line 3: missing key \"label\"; line 7: \"text\" is empty; cat/x.gif: unsupported; and 4 more problems"
        );
        let r = report(vec![line_problem(1, "bad")], 2, None);
        assert_eq!(r.summary(), "line 1: bad; and 1 more problem");
        let r = report(
            vec![Problem {
                line: None,
                file: None,
                message: "fewer than 10 examples (found 3)".into(),
            }],
            1,
            Some(DatasetFormat::Chat),
        );
        assert_eq!(r.summary(), "fewer than 10 examples (found 3)");
    }

    #[test]
    fn report_round_trips_through_json_and_tolerates_missing_extras() {
        let r = report(
            vec![line_problem(2, "x")],
            1,
            Some(DatasetFormat::Preference),
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"source\":\"jsonl\""), "{json}");
        assert_eq!(serde_json::from_str::<ValidationReport>(&json).unwrap(), r);
        // Reports stored before `source`/`image_paths` existed still load.
        let old =
            r#"{"format":"chat","examples":3,"labels":null,"problems":[],"total_problems":0}"#;
        let r: ValidationReport = serde_json::from_str(old).unwrap();
        assert_eq!(r.source, DatasetSource::Jsonl);
        assert_eq!(r.image_paths, 0);
    }

    #[test]
    fn problem_log_caps_but_counts() {
        let mut log = ProblemLog::default();
        for i in 0..25 {
            log.at_line(i, "x");
        }
        assert_eq!(log.kept.len(), MAX_REPORTED_PROBLEMS);
        assert_eq!(log.total, 25);
    }

    #[test]
    fn label_cap_is_reported_once() {
        let mut t = Tally::new(DatasetSource::Jsonl);
        t.format = Some(DatasetFormat::TextClassification);
        for i in 0..MAX_DISTINCT_LABELS + 5 {
            t.labels.add(&i.to_string(), 1);
            t.examples += 1;
        }
        t.labels.add("0", 1); // existing labels still count after the cap
        let r = finish(t, true);
        let labels = r.labels.unwrap();
        assert_eq!(labels.len(), MAX_DISTINCT_LABELS);
        assert_eq!(labels["0"], 2);
        assert_eq!(r.total_problems, 1);
        assert!(
            r.problems[0]
                .message
                .starts_with("more than 10000 distinct labels")
        );
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    #[test]
    fn validate_dataset_dispatches_on_magic_and_name() {
        let jsonl: String = (0..10)
            .map(|i| format!("{{\"text\":\"doc {i}\"}}\n"))
            .collect();
        let path = temp_file("d.jsonl", jsonl.as_bytes());
        let r = validate_dataset(&path, "upload.jsonl").unwrap();
        assert_eq!(r.source, DatasetSource::Jsonl);
        assert_eq!(r.format, Some(DatasetFormat::DomainText));
        assert!(r.is_valid(), "{}", r.summary());

        // Zip content under a misleading name is still read as a zip.
        let zip = archive::tests::class_zip(&[("cat", 5), ("dog", 5)]);
        let path = temp_file("z.bin", &zip);
        let r = validate_dataset(&path, "images.jsonl").unwrap();
        assert_eq!(r.source, DatasetSource::Zip);
        assert!(r.is_valid(), "{}", r.summary());

        // A .zip name that is not a zip gets a zip problem, not JSONL ones.
        let path = temp_file("bad.zip", jsonl.as_bytes());
        let r = validate_dataset(&path, "Images.ZIP").unwrap();
        assert_eq!(r.source, DatasetSource::Zip);
        assert!(
            r.problems[0].message.starts_with("not a valid zip archive"),
            "{:?}",
            r.problems
        );

        let path = temp_file("empty.jsonl", b"");
        let r = validate_dataset(&path, "empty.jsonl").unwrap();
        assert_eq!(r.problems[0].message, "the file is empty");

        assert!(validate_dataset(Path::new("/nonexistent/kiln/x"), "x.jsonl").is_err());
    }
}
