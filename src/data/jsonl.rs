//! Streaming JSONL validation: one line in memory at a time, each capped.

use std::io::{self, BufRead};

use serde_json::Value;

use super::formats::{check, detect};
use super::{DatasetSource, MAX_JSON_DEPTH, MAX_LINE_BYTES, Tally, ValidationReport, finish};

/// Validates a JSONL dataset read from `reader`.
///
/// Reads line by line without holding the file in memory; a line longer than
/// [`MAX_LINE_BYTES`] is skipped (not buffered) and reported. Only read errors
/// are returned as `Err`.
pub fn validate_jsonl<R: BufRead>(reader: R) -> io::Result<ValidationReport> {
    validate_jsonl_capped(reader, MAX_LINE_BYTES)
}

/// [`validate_jsonl`] with the line cap as a parameter so tests can use a small one.
pub(crate) fn validate_jsonl_capped<R: BufRead>(
    mut reader: R,
    cap: usize,
) -> io::Result<ValidationReport> {
    let mut t = Tally::new(DatasetSource::Jsonl);
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    let mut data_lines: u64 = 0;
    loop {
        let status = read_capped_line(&mut reader, &mut buf, cap)?;
        if status == LineStatus::Eof {
            break;
        }
        line_no += 1;
        if status == LineStatus::TooLong {
            data_lines += 1;
            t.problems.at_line(
                line_no,
                format!("line {line_no} is longer than {}", human_bytes(cap)),
            );
            buf = Vec::new(); // release the cap-sized allocation
            continue;
        }
        let mut bytes = buf.as_slice();
        if line_no == 1 {
            // Editors on Windows like to prepend a UTF-8 byte-order mark.
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let bytes = bytes.trim_ascii();
        if bytes.is_empty() {
            continue;
        }
        data_lines += 1;
        check_line(&mut t, line_no, bytes);
        // Don't keep a huge allocation around after one long line.
        if buf.capacity() > 1 << 20 {
            buf = Vec::new();
        }
    }
    if line_no == 0 {
        t.problems.general("the file is empty");
    } else if data_lines == 0 {
        t.problems.general("the file contains only blank lines");
    }
    Ok(finish(t, data_lines > 0))
}

fn check_line(t: &mut Tally, line_no: u64, bytes: &[u8]) {
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            t.problems.at_line(
                line_no,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            );
            return;
        }
    };
    // serde_json would stop at 128 levels anyway; checking first gives a clear
    // message and keeps the parser's recursion shallow.
    if exceeds_depth(bytes, MAX_JSON_DEPTH) {
        t.problems.at_line(
            line_no,
            format!("JSON is nested deeper than {MAX_JSON_DEPTH} levels"),
        );
        return;
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            t.problems.at_line(line_no, json_error_message(&e));
            return;
        }
    };
    let Value::Object(obj) = value else {
        t.problems.at_line(
            line_no,
            format!("expected a JSON object, found {}", value_kind(&value)),
        );
        return;
    };
    let detected = match detect(&obj, t.format) {
        Ok(f) => f,
        Err(msg) => {
            t.problems.at_line(line_no, msg);
            return;
        }
    };
    if let Some(established) = t.format
        && detected != established
    {
        t.problems.at_line(
            line_no,
            format!(
                "mixed formats: line {line_no} looks like {detected} but the file is {established}"
            ),
        );
        return;
    }
    let c = check(detected, &obj);
    if !c.problems.is_empty() {
        for p in c.problems {
            t.problems.at_line(line_no, p);
        }
        return;
    }
    // The first valid line decides the file's format.
    t.format = Some(detected);
    t.examples += 1;
    if c.image_path {
        t.image_paths += 1;
    }
    for l in &c.labels {
        t.labels.add(l, 1);
    }
}

/// serde_json's message without its " at line 1 column N" suffix (always line 1
/// here, which would be confusing), with the column moved up front.
fn json_error_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(msg) => format!("invalid JSON at column {}: {msg}", e.column()),
        None => format!("invalid JSON: {full}"),
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// True when brackets/braces outside strings nest deeper than `max`.
/// Malformed JSON may confuse the count; the parser reports it afterwards.
fn exceeds_depth(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn human_bytes(n: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else {
        format!("{n} bytes")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum LineStatus {
    /// No more input.
    Eof,
    /// `buf` holds the line without its `\n`.
    Line,
    /// The line exceeded the cap; it was consumed but not kept.
    TooLong,
}

/// Reads one `\n`-terminated line into `buf`, keeping at most `cap` bytes. Longer
/// lines are drained chunk by chunk straight from the reader's buffer.
fn read_capped_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<LineStatus> {
    buf.clear();
    let mut saw_any = false;
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(match (saw_any, too_long) {
                (false, _) => LineStatus::Eof,
                (true, false) => LineStatus::Line,
                (true, true) => LineStatus::TooLong,
            });
        }
        saw_any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if buf.len() + chunk.len() > cap {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            return Ok(if too_long {
                LineStatus::TooLong
            } else {
                LineStatus::Line
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::tests::{PNG, data_url};
    use crate::data::{DatasetFormat, MAX_REPORTED_PROBLEMS, MIN_EXAMPLES, Problem};
    use std::io::{BufReader, Cursor, Read};

    fn validate(s: &str) -> ValidationReport {
        validate_jsonl(Cursor::new(s.as_bytes())).unwrap()
    }

    fn lines(n: usize, f: impl Fn(usize) -> String) -> String {
        (0..n).map(|i| f(i) + "\n").collect()
    }

    fn at(line: u64, message: &str) -> Problem {
        Problem {
            line: Some(line),
            file: None,
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

    fn assert_ok(r: &ValidationReport, format: DatasetFormat, examples: u64) {
        assert!(r.is_valid(), "{}", r.summary());
        assert_eq!(r.format, Some(format));
        assert_eq!(r.examples, examples);
        assert_eq!(r.source, DatasetSource::Jsonl);
    }

    #[test]
    fn accepts_chat() {
        let r = validate(&lines(12, |i| {
            format!(
                r#"{{"messages":[{{"role":"system","content":"be nice"}},{{"role":"user","content":"q{i}"}},{{"role":"assistant","content":"a{i}","weight":1}}]}}"#
            )
        }));
        assert_ok(&r, DatasetFormat::Chat, 12);
        assert_eq!(r.labels, None);
        assert_eq!(r.summary(), "ok: 12 chat examples");
    }

    #[test]
    fn accepts_prompt_completion() {
        let r = validate(&lines(10, |i| {
            format!(r#"{{"prompt":"p{i}","completion":"c{i}"}}"#)
        }));
        assert_ok(&r, DatasetFormat::PromptCompletion, 10);
    }

    #[test]
    fn accepts_text_classification_with_label_counts() {
        let r = validate(&lines(12, |i| match i % 3 {
            0 => format!(r#"{{"text":"t{i}","label":"pos"}}"#),
            1 => format!(r#"{{"text":"t{i}","label":7}}"#),
            _ => format!(r#"{{"text":"t{i}","label":false}}"#),
        }));
        assert_ok(&r, DatasetFormat::TextClassification, 12);
        let labels = r.labels.clone().unwrap();
        assert_eq!(
            labels,
            [("7".into(), 4), ("false".into(), 4), ("pos".into(), 4)].into()
        );
        assert_eq!(r.summary(), "ok: 12 text_classification examples, 3 labels");
    }

    #[test]
    fn accepts_multi_label_counting_each_label() {
        let r = validate(&lines(10, |i| {
            if i % 2 == 0 {
                format!(r#"{{"text":"t{i}","labels":["a","b"]}}"#)
            } else {
                format!(r#"{{"text":"t{i}","labels":["a"]}}"#)
            }
        }));
        assert_ok(&r, DatasetFormat::MultiLabelClassification, 10);
        assert_eq!(
            r.labels.unwrap(),
            [("a".into(), 10), ("b".into(), 5)].into()
        );
    }

    #[test]
    fn accepts_preference() {
        let r = validate(&lines(10, |i| {
            let p = if i % 2 == 0 {
                "preferred_output"
            } else {
                "preferred_completion"
            };
            let n = if i % 2 == 0 {
                "non_preferred_output"
            } else {
                "non_preferred_completion"
            };
            format!(
                r#"{{"input":{{"messages":[{{"role":"user","content":"q{i}"}}]}},"{p}":[{{"role":"assistant","content":"good"}}],"{n}":[{{"role":"assistant","content":"bad"}}]}}"#
            )
        }));
        assert_ok(&r, DatasetFormat::Preference, 10);
    }

    #[test]
    fn accepts_reinforcement() {
        let r = validate(&lines(10, |i| {
            format!(
                r#"{{"messages":[{{"role":"user","content":"{i}+1?"}}],"reference_answer":"{}"}}"#,
                i + 1
            )
        }));
        assert_ok(&r, DatasetFormat::Reinforcement, 10);
    }

    #[test]
    fn accepts_image_classification() {
        let png = data_url("image/png", PNG);
        let r = validate(&lines(10, |i| {
            if i < 6 {
                format!(r#"{{"image":"{png}","label":"cat"}}"#)
            } else {
                format!(r#"{{"image":"dogs/{i}.jpg","label":"dog"}}"#)
            }
        }));
        assert_ok(&r, DatasetFormat::ImageClassification, 10);
        assert_eq!(
            r.labels.unwrap(),
            [("cat".into(), 6), ("dog".into(), 4)].into()
        );
        assert_eq!(r.image_paths, 4);
    }

    #[test]
    fn accepts_domain_text() {
        let r = validate(&lines(10, |i| format!(r#"{{"text":"paragraph {i}"}}"#)));
        assert_ok(&r, DatasetFormat::DomainText, 10);
    }

    #[test]
    fn blank_lines_are_skipped_but_counted() {
        let mut s = String::from("\n   \n");
        s += &lines(10, |i| format!(r#"{{"text":"t{i}"}}"#));
        s += "\r\n\n{\"text\": 3}\n\n";
        let r = validate(&s);
        assert_eq!(r.examples, 10);
        assert_eq!(
            r.problems,
            vec![at(15, "\"text\" should be a string, found an integer")]
        );
    }

    #[test]
    fn crlf_bom_and_missing_final_newline() {
        let mut s = String::from("\u{feff}");
        s += &lines(10, |i| format!("{{\"text\":\"t{i}\"}}\r"));
        s += "{\"text\":\"last\"}";
        let r = validate(&s);
        assert_ok(&r, DatasetFormat::DomainText, 11);
    }

    #[test]
    fn problems_have_exact_line_numbers() {
        let good = |i: usize| format!(r#"{{"text":"t{i}","label":"a{}"}}"#, i % 2);
        let mut s = lines(10, good);
        for bad in [
            r#"{"text":"x"#,                      // 11 bad JSON
            r#"[1,2]"#,                           // 12 not an object
            r#"{"text":"x"}"#,                    // 13 mixed formats
            r#"{"label":"x"}"#,                   // 14 missing key
            r#"{"text":"","label":"x"}"#,         // 15 empty text
            r#"{"text":"x","label":[1]}"#,        // 16 wrong type
            r#"{"foo":1,"bar":2}"#,               // 17 unrecognised keys
            r#"{"prompt":"p","completion":"c"}"#, // 18 mixed formats
        ] {
            s += bad;
            s.push('\n');
        }
        let r = validate(&s);
        assert_eq!(r.format, Some(DatasetFormat::TextClassification));
        assert_eq!(r.examples, 10);
        let m: Vec<(Option<u64>, &str)> = r
            .problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(m[0].0, Some(11));
        assert!(
            m[0].1
                .starts_with("invalid JSON at column 10: EOF while parsing a string"),
            "{}",
            m[0].1
        );
        assert_eq!(m[1], (Some(12), "expected a JSON object, found an array"));
        assert_eq!(
            m[2],
            (
                Some(13),
                "mixed formats: line 13 looks like domain_text but the file is text_classification"
            )
        );
        assert_eq!(m[3], (Some(14), "missing key \"text\""));
        assert_eq!(m[4], (Some(15), "\"text\" is empty"));
        assert_eq!(
            m[5],
            (
                Some(16),
                "\"label\" should be a string, integer or boolean, found an array"
            )
        );
        assert_eq!(m[6].0, Some(17));
        assert!(
            m[6].1.starts_with(
                "cannot tell the format: expected one of messages | prompt+completion | text+label"
            ),
            "{}",
            m[6].1
        );
        assert!(
            m[6].1.ends_with("found keys \"bar\", \"foo\""),
            "{}",
            m[6].1
        );
        assert_eq!(
            m[7],
            (
                Some(18),
                "mixed formats: line 18 looks like prompt_completion but the file is text_classification"
            )
        );
        assert_eq!(r.total_problems, 8);
        assert!(!r.is_valid());
        assert!(
            r.summary()
                .starts_with("line 11: invalid JSON at column 10"),
            "{}",
            r.summary()
        );
        assert!(
            r.summary().ends_with("; and 5 more problems"),
            "{}",
            r.summary()
        );
    }

    #[test]
    fn unknown_role_and_missing_assistant_in_chat_file() {
        let good =
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
        let mut s = lines(10, |_| good.to_string());
        s += r#"{"messages":[{"role":"user","content":"q"},{"role":"robot","content":"a"},{"role":"assistant","content":"a"}]}"#;
        s += "\n";
        s += r#"{"messages":[{"role":"user","content":"q"}]}"#;
        let r = validate(&s);
        assert_eq!(r.format, Some(DatasetFormat::Chat));
        assert_eq!(
            r.problems,
            vec![
                at(
                    11,
                    "messages[1]: unknown role \"robot\" (expected system, user, assistant, tool or developer)"
                ),
                at(12, "no assistant message"),
            ]
        );
    }

    #[test]
    fn first_valid_line_sets_the_format() {
        // Line 1 is invalid chat; the file becomes domain_text at line 2.
        let mut s = String::from(r#"{"messages":[{"role":"user","content":"q"}]}"#);
        s += "\n";
        s += &lines(10, |i| format!(r#"{{"text":"t{i}"}}"#));
        let r = validate(&s);
        assert_eq!(r.format, Some(DatasetFormat::DomainText));
        assert_eq!(r.problems, vec![at(1, "no assistant message")]);
    }

    #[test]
    fn caps_reported_problems_but_counts_all() {
        let s = lines(30, |_| "nope".to_string());
        let r = validate(&s);
        assert_eq!(r.problems.len(), MAX_REPORTED_PROBLEMS);
        assert_eq!(r.problems[19].line, Some(20));
        // 30 bad lines + "fewer than 10 examples".
        assert_eq!(r.total_problems, 31);
        assert_eq!(r.format, None);
        assert!(
            r.summary().ends_with("; and 28 more problems"),
            "{}",
            r.summary()
        );
    }

    #[test]
    fn too_few_examples() {
        let r = validate(&lines(3, |i| {
            format!(r#"{{"prompt":"p{i}","completion":"c"}}"#)
        }));
        assert_eq!(r.format, Some(DatasetFormat::PromptCompletion));
        assert_eq!(r.examples, 3);
        assert_eq!(
            r.problems,
            vec![general(&format!(
                "fewer than {MIN_EXAMPLES} examples (found 3)"
            ))]
        );
        assert!(!r.is_valid());
        assert_eq!(r.summary(), "fewer than 10 examples (found 3)");
    }

    #[test]
    fn classification_needs_two_labels() {
        let r = validate(&lines(10, |i| {
            format!(r#"{{"text":"t{i}","label":"only"}}"#)
        }));
        assert_eq!(
            r.problems,
            vec![general(
                "classification needs at least 2 distinct labels (found 1)"
            )]
        );
    }

    #[test]
    fn empty_and_blank_files() {
        let r = validate("");
        assert_eq!(r.problems, vec![general("the file is empty")]);
        assert_eq!(r.total_problems, 1);
        assert_eq!(r.format, None);
        let r = validate("\n  \n\r\n");
        assert_eq!(
            r.problems,
            vec![general("the file contains only blank lines")]
        );
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let mut bytes = lines(10, |i| format!(r#"{{"text":"t{i}"}}"#)).into_bytes();
        bytes.extend_from_slice(b"{\"text\":\"caf\xe9\"}\n");
        bytes.extend_from_slice(b"{\"text\":\"fine\"}\n");
        let r = validate_jsonl(Cursor::new(bytes)).unwrap();
        assert_eq!(r.problems, vec![at(11, "invalid UTF-8 at byte 12")]);
        assert_eq!(r.examples, 11);
    }

    #[test]
    fn deep_json_is_rejected_clearly() {
        let deep = format!("{{\"text\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        let ok_depth = format!(
            "{{\"text\":\"t\",\"x\":{}1{}}}",
            "[".repeat(62),
            "]".repeat(62)
        );
        // Brackets inside strings (with escaped quotes) don't count.
        let in_string = format!("{{\"text\":\"\\\"{}\"}}", "[".repeat(500));
        let r = validate(&format!("{deep}\n{ok_depth}\n{in_string}\n"));
        assert_eq!(r.problems[0], at(1, "JSON is nested deeper than 64 levels"));
        // Line 2 parses (63 levels) and is judged on its keys.
        assert!(
            r.problems[1].message.starts_with("cannot tell the format"),
            "{:?}",
            r.problems
        );
        assert_eq!(r.problems[1].line, Some(2));
        assert_eq!(r.examples, 1);
        // The limit is inclusive: 64 levels pass, 65 do not.
        let nest = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert!(!exceeds_depth(
            nest(MAX_JSON_DEPTH).as_bytes(),
            MAX_JSON_DEPTH
        ));
        assert!(exceeds_depth(
            nest(MAX_JSON_DEPTH + 1).as_bytes(),
            MAX_JSON_DEPTH
        ));
        assert!(exceeds_depth(b"[[[", 2));
        assert!(!exceeds_depth(b"[[]]", 2));
        assert!(!exceeds_depth(br#"["\\", "[[[["]"#, 1));
    }

    #[test]
    fn long_line_is_skipped_without_buffering() {
        let cap = 1000;
        let mut s = lines(5, |i| format!(r#"{{"text":"t{i}"}}"#));
        s += &format!("{{\"text\":\"{}\"}}\n", "x".repeat(5000)); // line 6
        s += &format!("{{\"text\":\"{}\"}}\n", "y".repeat(cap - 11)); // line 7: exactly cap
        s += &lines(5, |i| format!(r#"{{"text":"u{i}"}}"#));
        s += &"z".repeat(3000); // line 13, no trailing newline
        // A tiny BufReader forces the line to arrive in many chunks.
        let r = validate_jsonl_capped(BufReader::with_capacity(64, Cursor::new(s)), cap).unwrap();
        assert_eq!(r.examples, 11);
        assert_eq!(
            r.problems,
            vec![
                at(6, "line 6 is longer than 1000 bytes"),
                at(13, "line 13 is longer than 1000 bytes")
            ]
        );
    }

    #[test]
    fn line_of_65_mib_hits_the_real_cap() {
        // Generated lazily so the test itself never holds 65 MiB.
        let huge = std::io::repeat(b'a').take(65 * 1024 * 1024);
        let rest = Cursor::new(b"\n{\"text\":\"after\"}\n".to_vec());
        let reader = BufReader::new(huge.chain(rest));
        let r = validate_jsonl(reader).unwrap();
        assert_eq!(r.problems[0], at(1, "line 1 is longer than 64 MiB"));
        assert_eq!(r.examples, 1);
        assert_eq!(r.format, Some(DatasetFormat::DomainText));
    }

    #[test]
    fn read_errors_are_io_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let err = validate_jsonl(BufReader::new(Failing)).unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }

    #[test]
    fn human_bytes_formats() {
        assert_eq!(human_bytes(MAX_LINE_BYTES), "64 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
