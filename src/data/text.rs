//! Loading text datasets for training: classification examples with their labels,
//! unlabelled domain text, stratified splits, and tokenisation into padded batches.
//!
//! Files reaching here have passed [`super::validate_dataset`]; errors are still reported
//! with line numbers, because `kiln train` reads files no server has validated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;

/// A problem with a training file, or with the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TextDataError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// One text with its labels (one for single-label tasks).
#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    pub text: String,
    pub labels: Vec<String>,
}

/// A classification dataset as read from JSONL.
#[derive(Debug, Clone)]
pub struct TextClassificationData {
    pub examples: Vec<TextExample>,
    /// True when the file uses `labels` (a list per example).
    pub multi_label: bool,
}

fn label_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(crate) fn read_lines(path: &Path) -> Result<Vec<(usize, Value)>, TextDataError> {
    let io = |source| TextDataError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| TextDataError::Line {
            line: i + 1,
            message: format!("invalid JSON: {e}"),
        })?;
        out.push((i + 1, value));
    }
    Ok(out)
}

/// Reads `{"text", "label"}` or `{"text", "labels": [...]}` lines.
pub fn read_text_classification(path: &Path) -> Result<TextClassificationData, TextDataError> {
    let mut examples = Vec::new();
    let mut multi_label = None;
    for (line, value) in read_lines(path)? {
        let err = |message: &str| TextDataError::Line {
            line,
            message: message.to_owned(),
        };
        let text = value
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing string \"text\""))?;
        if text.trim().is_empty() {
            return Err(err("empty \"text\""));
        }
        let (labels, is_multi) = match (value.get("label"), value.get("labels")) {
            (Some(l), None) => (
                vec![
                    label_string(l)
                        .ok_or_else(|| err("\"label\" must be a string, number or boolean"))?,
                ],
                false,
            ),
            (None, Some(Value::Array(ls))) => {
                let labels: Option<Vec<String>> = ls.iter().map(label_string).collect();
                (
                    labels
                        .ok_or_else(|| err("\"labels\" must hold strings, numbers or booleans"))?,
                    true,
                )
            }
            _ => return Err(err("expected \"label\" or a \"labels\" list")),
        };
        match multi_label {
            None => multi_label = Some(is_multi),
            Some(m) if m != is_multi => return Err(err("mixes \"label\" and \"labels\" lines")),
            _ => {}
        }
        examples.push(TextExample {
            text: text.to_owned(),
            labels,
        });
    }
    if examples.is_empty() {
        return Err(TextDataError::Invalid(format!(
            "{} has no examples",
            path.display()
        )));
    }
    Ok(TextClassificationData {
        examples,
        multi_label: multi_label.unwrap_or(false),
    })
}

/// Reads `{"text"}` lines (unlabelled domain text).
pub fn read_domain_text(path: &Path) -> Result<Vec<String>, TextDataError> {
    let mut texts = Vec::new();
    for (line, value) in read_lines(path)? {
        let text =
            value
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| TextDataError::Line {
                    line,
                    message: "missing string \"text\"".into(),
                })?;
        if !text.trim().is_empty() {
            texts.push(text.to_owned());
        }
    }
    if texts.is_empty() {
        return Err(TextDataError::Invalid(format!(
            "{} has no text",
            path.display()
        )));
    }
    Ok(texts)
}

/// The label vocabulary of a run: sorted, so the same data always gives the same ids.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl LabelSet {
    pub fn from_examples(examples: &[TextExample]) -> LabelSet {
        let names: BTreeSet<&String> = examples.iter().flat_map(|e| &e.labels).collect();
        Self::from_names(names.into_iter().cloned().collect())
    }

    pub fn from_names(names: Vec<String>) -> LabelSet {
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        LabelSet { names, index }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn id(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

/// Splits off about `fraction` of each class as validation data (at least one example of
/// every class with two or more), shuffled with `seed`. For multi-label data the first
/// label stands for the class.
pub fn stratified_split(
    examples: &[TextExample],
    fraction: f64,
    seed: u64,
) -> (Vec<TextExample>, Vec<TextExample>) {
    stratified_split_by(
        examples,
        |e| e.labels.first().map_or("", String::as_str),
        fraction,
        seed ^ SPLIT_SEED_SALT,
    )
}

/// [`stratified_split`] for any examples: `label` names each one's class, and `seed` draws
/// which of each class are held out.
pub fn stratified_split_by<T: Clone>(
    examples: &[T],
    label: impl Fn(&T) -> &str,
    fraction: f64,
    seed: u64,
) -> (Vec<T>, Vec<T>) {
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_class.entry(label(e)).or_default().push(i);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut valid_idx = BTreeSet::new();
    for members in by_class.values_mut() {
        members.shuffle(&mut rng);
        if members.len() >= 2 {
            let take =
                ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len() - 1);
            valid_idx.extend(members.iter().take(take).copied());
        }
    }
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (i, e) in examples.iter().enumerate() {
        if valid_idx.contains(&i) {
            valid.push(e.clone());
        } else {
            train.push(e.clone());
        }
    }
    (train, valid)
}

/// Mixed into split seeds so the split and the training order are independent.
const SPLIT_SEED_SALT: u64 = 0x5EED_0000_5B11_7000;

/// A tokenised, padded batch in row-major `[batch, seq]` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedBatch {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    /// Real (non-pad) tokens in the batch.
    pub tokens: usize,
    /// Examples whose text was cut at `max_length`.
    pub truncated: usize,
}

/// The model's own tokenizer (`tokenizer.json`), truncating at `max_length` and padding
/// each batch to its longest member.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn load(model_dir: &Path, max_length: usize) -> Result<TextTokenizer, TextDataError> {
        let path = model_dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TextDataError::Tokenizer(format!("{}: {e}", path.display())))?;
        // Batching and truncation are ours: the file's own settings (e.g. fixed padding to
        // 128) would waste compute on pad tokens.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TextDataError::Tokenizer(e.to_string()))?;
        let pad_id = inner
            .token_to_id("[PAD]")
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        Ok(TextTokenizer {
            inner,
            max_length: max_length.max(2),
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of a token such as `[MASK]`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of one text with special tokens, not truncated.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, TextDataError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TextDataError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Length in tokens (with special tokens) of each text, untruncated.
    pub fn lengths(&self, texts: &[&str]) -> Result<Vec<usize>, TextDataError> {
        texts
            .iter()
            .map(|t| self.token_ids(t).map(|ids| ids.len()))
            .collect()
    }

    /// Tokenises one text and truncates it to `max_length`, keeping the final special token
    /// as transformers' truncation does. The flag says whether anything was cut.
    pub fn encode(&self, text: &str) -> Result<(EncodedText, bool), TextDataError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TextDataError::Tokenizer(e.to_string()))?;
        let mut row = EncodedText {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        };
        let cut = row.truncate(self.max_length);
        Ok((row, cut))
    }

    /// Tokenises, truncates and pads a batch.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<EncodedBatch, TextDataError> {
        let mut rows = Vec::with_capacity(texts.len());
        let mut truncated = 0;
        for text in texts {
            let (row, cut) = self.encode(text)?;
            truncated += usize::from(cut);
            rows.push(row);
        }
        let refs: Vec<&EncodedText> = rows.iter().collect();
        let mut batch = pad_batch(&refs, self.pad_id);
        batch.truncated = truncated;
        Ok(batch)
    }
}

/// One tokenised text.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedText {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl EncodedText {
    /// Cuts to `max` tokens (at least 2), keeping the final special token as transformers'
    /// truncation does. Returns whether anything was cut.
    pub fn truncate(&mut self, max: usize) -> bool {
        let max = max.max(2);
        if self.ids.len() <= max {
            return false;
        }
        let last = self.ids[self.ids.len() - 1];
        let last_type = self.type_ids[self.type_ids.len() - 1];
        self.ids.truncate(max - 1);
        self.type_ids.truncate(max - 1);
        self.ids.push(last);
        self.type_ids.push(last_type);
        true
    }
}

/// Pads already tokenised texts to the longest of them.
pub fn pad_batch(rows: &[&EncodedText], pad_id: u32) -> EncodedBatch {
    let seq_len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(1);
    let batch = rows.len();
    let mut out = EncodedBatch {
        input_ids: Vec::with_capacity(batch * seq_len),
        token_type_ids: Vec::with_capacity(batch * seq_len),
        attention_mask: Vec::with_capacity(batch * seq_len),
        batch,
        seq_len,
        tokens: 0,
        truncated: 0,
    };
    for row in rows {
        let len = row.ids.len();
        let pad = seq_len - len;
        out.tokens += len;
        out.attention_mask
            .extend(std::iter::repeat_n(1, len).chain(std::iter::repeat_n(0, pad)));
        out.input_ids.extend(
            row.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        out.token_type_ids.extend(
            row.type_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
    }
    out
}

/// The token count under which `quantile` of the texts fall.
pub fn length_quantile(lengths: &[usize], quantile: f64) -> usize {
    if lengths.is_empty() {
        return 0;
    }
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let idx = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, label: &str) -> TextExample {
        TextExample {
            text: text.into(),
            labels: vec![label.into()],
        }
    }

    #[test]
    fn reads_single_and_multi_label_files_with_line_numbers_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": \"x\"}\n",
        )
        .unwrap();
        let data = read_text_classification(&p).unwrap();
        assert!(!data.multi_label);
        assert_eq!(data.examples[0].labels, vec!["1"]);

        std::fs::write(&p, "{\"text\": \"a\", \"labels\": [\"x\", \"y\"]}\n").unwrap();
        assert!(read_text_classification(&p).unwrap().multi_label);

        std::fs::write(&p, "{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\"}\n").unwrap();
        let err = read_text_classification(&p).unwrap_err().to_string();
        assert!(err.starts_with("line 3:"), "{err}");
    }

    #[test]
    fn labels_are_sorted_and_stable() {
        let set = LabelSet::from_examples(&[ex("a", "pos"), ex("b", "neg"), ex("c", "pos")]);
        assert_eq!(set.names(), ["neg", "pos"]);
        assert_eq!(set.id("pos"), Some(1));
        assert_eq!(set.id("meh"), None);
    }

    #[test]
    fn the_split_keeps_every_class_on_both_sides_and_is_seeded() {
        let mut all = Vec::new();
        for i in 0..50 {
            all.push(ex(&format!("a{i}"), "a"));
        }
        for i in 0..10 {
            all.push(ex(&format!("b{i}"), "b"));
        }
        all.push(ex("lonely", "c"));
        let (train, valid) = stratified_split(&all, 0.2, 7);
        assert_eq!(train.len() + valid.len(), all.len());
        assert_eq!(valid.iter().filter(|e| e.labels[0] == "a").count(), 10);
        assert_eq!(valid.iter().filter(|e| e.labels[0] == "b").count(), 2);
        assert!(
            train.iter().any(|e| e.labels[0] == "c"),
            "a class of one stays in training"
        );
        assert_eq!(
            stratified_split(&all, 0.2, 7),
            (train.clone(), valid.clone())
        );
        assert_ne!(stratified_split(&all, 0.2, 8).1, valid);
    }

    #[test]
    fn quantiles() {
        assert_eq!(length_quantile(&[5, 1, 3, 2, 4], 0.99), 5);
        assert_eq!(length_quantile(&[5, 1, 3, 2, 4], 0.5), 3);
        assert_eq!(length_quantile(&[], 0.5), 0);
    }
}

#[cfg(test)]
mod tiny_tokenizer_tests {
    use super::*;

    #[test]
    fn the_tiny_tokenizer_loads_and_wraps_with_cls_and_sep() {
        let dir = tempfile::tempdir().unwrap();
        crate::nn::tiny::write_tiny_tokenizer(dir.path(), &["good", "movie", "bad"]).unwrap();
        let tok = TextTokenizer::load(dir.path(), 4).unwrap();
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(tok.token_id("[MASK]"), Some(4));
        let (enc, cut) = tok.encode("Good movie").unwrap();
        assert_eq!(enc.ids, vec![2, 5, 6, 3]);
        assert!(!cut);
        let (enc, cut) = tok.encode("good bad movie zebra").unwrap();
        assert_eq!(
            enc.ids,
            vec![2, 5, 7, 3],
            "truncated to 4, closing [SEP] kept"
        );
        assert!(cut);
        let batch = tok.encode_batch(&["good", "bad movie"]).unwrap();
        assert_eq!(batch.seq_len, 4);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 0, 1, 1, 1, 1]);
        assert_eq!(batch.tokens, 7);
    }
}
