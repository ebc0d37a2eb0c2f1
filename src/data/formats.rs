//! Per-line format detection and validation for JSONL datasets.

use serde_json::{Map, Value};

use super::DatasetFormat;
use super::image::{check_data_url, check_image_path};

type Object = Map<String, Value>;

/// Roles accepted in chat-style `messages`.
const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];
/// Top-level keys of a chat line that are not RFT reference fields.
const CHAT_KEYS: [&str; 3] = ["messages", "tools", "parallel_tool_calls"];
/// Keys that mark a preference (DPO) line, new and legacy spellings.
const PREFERENCE_KEYS: [&str; 5] = [
    "input",
    "preferred_output",
    "non_preferred_output",
    "preferred_completion",
    "non_preferred_completion",
];

/// What one valid-or-not line contributed.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct LineCheck {
    /// Problems, without the line prefix; empty when the line is a valid example.
    pub problems: Vec<String>,
    /// Labels (string form) for classification lines.
    pub labels: Vec<String>,
    /// The line refers to an image by path rather than a data URL.
    pub image_path: bool,
}

/// Decides a line's format from its keys.
///
/// `established` is the file's format so far: a `messages` line with reference
/// fields whose last turn is a prompt but which also contains earlier assistant
/// turns is valid as both chat and reinforcement, so it follows the file.
pub(crate) fn detect(
    obj: &Object,
    established: Option<DatasetFormat>,
) -> Result<DatasetFormat, String> {
    if let Some(messages) = obj.get("messages") {
        return Ok(detect_messages_line(obj, messages, established));
    }
    if PREFERENCE_KEYS.iter().any(|k| obj.contains_key(*k)) {
        return Ok(DatasetFormat::Preference);
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        return Ok(DatasetFormat::PromptCompletion);
    }
    if obj.contains_key("image") {
        return Ok(DatasetFormat::ImageClassification);
    }
    if obj.contains_key("labels") {
        return Ok(DatasetFormat::MultiLabelClassification);
    }
    if obj.contains_key("label") {
        return Ok(DatasetFormat::TextClassification);
    }
    // Domain text must be `text` alone: with any other key it is more likely a
    // misspelt label than deliberate unlabelled text.
    if obj.contains_key("text") && obj.len() == 1 {
        return Ok(DatasetFormat::DomainText);
    }
    let signatures: Vec<&str> = [
        DatasetFormat::Chat,
        DatasetFormat::PromptCompletion,
        DatasetFormat::TextClassification,
        DatasetFormat::MultiLabelClassification,
        DatasetFormat::Preference,
        DatasetFormat::ImageClassification,
        DatasetFormat::DomainText,
    ]
    .iter()
    .map(|f| f.signature())
    .collect();
    Err(format!(
        "cannot tell the format: expected one of {}; found {}",
        signatures.join(" | "),
        describe_keys(obj)
    ))
}

fn describe_keys(obj: &Object) -> String {
    const SHOWN: usize = 8;
    if obj.is_empty() {
        return "an empty object".to_string();
    }
    // Sorted so the message is stable whatever map order serde_json uses.
    let mut sorted: Vec<&String> = obj.keys().collect();
    sorted.sort();
    let mut keys: Vec<String> = sorted
        .iter()
        .take(SHOWN)
        .map(|k| format!("{k:?}"))
        .collect();
    if obj.len() > SHOWN {
        keys.push(format!("and {} more", obj.len() - SHOWN));
    }
    format!("keys {}", keys.join(", "))
}

fn detect_messages_line(
    obj: &Object,
    messages: &Value,
    established: Option<DatasetFormat>,
) -> DatasetFormat {
    let has_reference_fields = obj.keys().any(|k| !CHAT_KEYS.contains(&k.as_str()));
    let roles: Vec<Option<&str>> = messages
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m.get("role").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let any_assistant = roles.contains(&Some("assistant"));
    let ends_with_prompt = roles.last().is_some_and(|r| *r != Some("assistant"));
    match (any_assistant, has_reference_fields && ends_with_prompt) {
        (false, true) => DatasetFormat::Reinforcement,
        (true, true) if established != Some(DatasetFormat::Chat) => DatasetFormat::Reinforcement,
        // Everything else is chat; chat validation reports a missing assistant turn.
        _ => DatasetFormat::Chat,
    }
}

/// Validates a line already detected as `format`.
pub(crate) fn check(format: DatasetFormat, obj: &Object) -> LineCheck {
    let mut c = LineCheck::default();
    match format {
        DatasetFormat::Chat => check_chat(obj, &mut c),
        DatasetFormat::Reinforcement => check_reinforcement(obj, &mut c),
        DatasetFormat::PromptCompletion => {
            non_empty_string(obj, "prompt", &mut c.problems);
            non_empty_string(obj, "completion", &mut c.problems);
        }
        DatasetFormat::TextClassification => {
            non_empty_string(obj, "text", &mut c.problems);
            if obj.contains_key("labels") {
                c.problems
                    .push("both \"label\" and \"labels\" are present".into());
            }
            if let Some(l) = label(obj, "label", &mut c.problems) {
                c.labels.push(l);
            }
        }
        DatasetFormat::MultiLabelClassification => check_multi_label(obj, &mut c),
        DatasetFormat::Preference => check_preference(obj, &mut c),
        DatasetFormat::ImageClassification => check_image(obj, &mut c),
        DatasetFormat::DomainText => non_empty_string(obj, "text", &mut c.problems),
    }
    if !c.problems.is_empty() {
        c.labels.clear();
    }
    c
}

/// Article + JSON type, for "expected X, found Y" messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> String {
    format!("{key:?} should be {expected}, found {}", type_name(found))
}

fn missing(key: &str) -> String {
    format!("missing key {key:?}")
}

/// Requires `obj[key]` to be a string with non-whitespace content.
fn non_empty_string(obj: &Object, key: &str, problems: &mut Vec<String>) {
    match obj.get(key) {
        None => problems.push(missing(key)),
        Some(Value::String(s)) if s.trim().is_empty() => problems.push(format!("{key:?} is empty")),
        Some(Value::String(_)) => {}
        Some(v) => problems.push(wrong_type(key, "a string", v)),
    }
}

/// String form of a single label: a non-empty string, an integer or a boolean.
fn label(obj: &Object, key: &str, problems: &mut Vec<String>) -> Option<String> {
    match obj.get(key) {
        None => {
            problems.push(missing(key));
            None
        }
        Some(v) => match label_value(v) {
            Ok(l) => Some(l),
            Err(expected) => {
                problems.push(match v {
                    Value::String(_) => format!("{key:?} is empty"),
                    _ => wrong_type(key, expected, v),
                });
                None
            }
        },
    }
}

fn label_value(v: &Value) -> Result<String, &'static str> {
    const EXPECTED: &str = "a string, integer or boolean";
    match v {
        Value::String(s) if s.trim().is_empty() => Err(EXPECTED),
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => Err(EXPECTED),
    }
}

fn check_multi_label(obj: &Object, c: &mut LineCheck) {
    non_empty_string(obj, "text", &mut c.problems);
    if obj.contains_key("label") {
        c.problems
            .push("both \"label\" and \"labels\" are present".into());
    }
    let items = match obj.get("labels") {
        Some(Value::Array(items)) if items.is_empty() => {
            c.problems.push("\"labels\" is empty".into());
            return;
        }
        Some(Value::Array(items)) => items,
        Some(v) => {
            c.problems
                .push(wrong_type("labels", "an array of strings or integers", v));
            return;
        }
        None => {
            c.problems.push(missing("labels"));
            return;
        }
    };
    for (i, item) in items.iter().enumerate() {
        let l = match item {
            Value::String(s) if s.trim().is_empty() => {
                c.problems.push(format!("labels[{i}] is empty"));
                continue;
            }
            Value::String(s) => s.clone(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            v => {
                c.problems.push(format!(
                    "labels[{i}] should be a string or integer, found {}",
                    type_name(v)
                ));
                continue;
            }
        };
        if c.labels.contains(&l) {
            c.problems
                .push(format!("duplicate label {l:?} in \"labels\""));
        } else {
            c.labels.push(l);
        }
    }
}

fn check_image(obj: &Object, c: &mut LineCheck) {
    match obj.get("image") {
        None => c.problems.push(missing("image")),
        Some(Value::String(s)) if s.starts_with("data:") => {
            if let Err(e) = check_data_url(s) {
                c.problems.push(e);
            }
        }
        Some(Value::String(s)) => match check_image_path(s) {
            Ok(()) => c.image_path = true,
            Err(e) => c.problems.push(e),
        },
        Some(v) => c
            .problems
            .push(wrong_type("image", "a string (data URL or path)", v)),
    }
    if let Some(l) = label(obj, "label", &mut c.problems) {
        c.labels.push(l);
    }
}

/// What a `messages` array contained, for the format-level rules.
struct MessagesInfo {
    any_assistant: bool,
}

fn check_chat(obj: &Object, c: &mut LineCheck) {
    check_tools(obj, "tools", &mut c.problems);
    if let Some(v) = obj.get("parallel_tool_calls")
        && !v.is_boolean()
    {
        c.problems
            .push(wrong_type("parallel_tool_calls", "a boolean", v));
    }
    if let Some(info) = messages_field(obj, "messages", "messages", &mut c.problems)
        && !info.any_assistant
    {
        c.problems.push("no assistant message".into());
    }
}

fn check_reinforcement(obj: &Object, c: &mut LineCheck) {
    // Detection guarantees reference fields and a trailing prompt turn.
    check_tools(obj, "tools", &mut c.problems);
    messages_field(obj, "messages", "messages", &mut c.problems);
}

fn check_tools(obj: &Object, key: &str, problems: &mut Vec<String>) {
    if let Some(v) = obj.get(key)
        && !v.is_array()
    {
        problems.push(wrong_type(key, "an array", v));
    }
}

/// Validates `obj[key]` as a non-empty messages array; `path` prefixes messages.
fn messages_field(
    obj: &Object,
    key: &str,
    path: &str,
    problems: &mut Vec<String>,
) -> Option<MessagesInfo> {
    match obj.get(key) {
        None => {
            problems.push(missing(path));
            None
        }
        Some(v) => check_messages(v, path, problems),
    }
}

fn check_messages(v: &Value, path: &str, problems: &mut Vec<String>) -> Option<MessagesInfo> {
    let Value::Array(messages) = v else {
        problems.push(wrong_type(path, "an array of messages", v));
        return None;
    };
    if messages.is_empty() {
        problems.push(format!("{path:?} is empty"));
        return None;
    }
    let mut info = MessagesInfo {
        any_assistant: false,
    };
    for (i, m) in messages.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Value::Object(m) = m else {
            problems.push(format!("{at} should be an object, found {}", type_name(m)));
            continue;
        };
        let role = match m.get("role") {
            None => {
                problems.push(format!("{at}: missing key \"role\""));
                None
            }
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => Some(r.as_str()),
            Some(Value::String(r)) => {
                problems.push(format!(
                    "{at}: unknown role {r:?} (expected system, user, assistant, tool or developer)"
                ));
                None
            }
            Some(v) => {
                problems.push(format!("{at}: {}", wrong_type("role", "a string", v)));
                None
            }
        };
        if role == Some("assistant") {
            info.any_assistant = true;
        }
        check_message_fields(m, role, &at, problems);
    }
    Some(info)
}

fn check_message_fields(m: &Object, role: Option<&str>, at: &str, problems: &mut Vec<String>) {
    let has_tool_calls = match m.get("tool_calls") {
        None | Some(Value::Null) => false,
        Some(Value::Array(calls)) => !calls.is_empty(),
        Some(v) => {
            problems.push(format!("{at}: {}", wrong_type("tool_calls", "an array", v)));
            false
        }
    };
    match m.get("content") {
        Some(Value::String(_)) => {}
        None | Some(Value::Null) if has_tool_calls => {}
        None => problems.push(format!("{at}: missing key \"content\"")),
        Some(Value::Null) => problems.push(format!(
            "{at}: \"content\" is null but the message has no tool_calls"
        )),
        Some(Value::Array(parts)) => check_content_parts(parts, at, problems),
        Some(v) => problems.push(format!(
            "{at}: {}",
            wrong_type("content", "a string, null or an array of text parts", v)
        )),
    }
    if let Some(w) = m.get("weight") {
        if role.is_some_and(|r| r != "assistant") {
            problems.push(format!(
                "{at}: \"weight\" is only allowed on assistant messages"
            ));
        } else if !(w.as_u64() == Some(0) || w.as_u64() == Some(1)) {
            problems.push(format!("{at}: \"weight\" must be 0 or 1, found {w}"));
        }
    }
    for key in ["name", "tool_call_id"] {
        if let Some(v) = m.get(key)
            && !v.is_string()
        {
            problems.push(format!("{at}: {}", wrong_type(key, "a string", v)));
        }
    }
}

fn check_content_parts(parts: &[Value], at: &str, problems: &mut Vec<String>) {
    if parts.is_empty() {
        problems.push(format!("{at}: \"content\" is an empty array"));
    }
    for (j, part) in parts.iter().enumerate() {
        let pat = format!("{at}.content[{j}]");
        let Value::Object(part) = part else {
            problems.push(format!(
                "{pat} should be an object, found {}",
                type_name(part)
            ));
            continue;
        };
        match part.get("type") {
            Some(Value::String(t)) if t == "text" => match part.get("text") {
                Some(Value::String(_)) => {}
                None => problems.push(format!("{pat}: missing key \"text\"")),
                Some(v) => problems.push(format!("{pat}: {}", wrong_type("text", "a string", v))),
            },
            Some(Value::String(t)) => problems.push(format!(
                "{pat}: unsupported part type {t:?} (only \"text\")"
            )),
            Some(v) => problems.push(format!("{pat}: {}", wrong_type("type", "a string", v))),
            None => problems.push(format!("{pat}: missing key \"type\"")),
        }
    }
}

fn check_preference(obj: &Object, c: &mut LineCheck) {
    match obj.get("input") {
        None => c.problems.push(missing("input")),
        Some(Value::Object(input)) => {
            messages_field(input, "messages", "input.messages", &mut c.problems);
            check_tools(input, "tools", &mut c.problems);
        }
        Some(v) => c
            .problems
            .push(wrong_type("input", "an object with \"messages\"", v)),
    }
    let preferred = output(
        obj,
        "preferred_output",
        "preferred_completion",
        &mut c.problems,
    );
    let rejected = output(
        obj,
        "non_preferred_output",
        "non_preferred_completion",
        &mut c.problems,
    );
    if let (Some((pk, p)), Some((rk, r))) = (preferred, rejected)
        && p == r
    {
        c.problems.push(format!("{pk:?} and {rk:?} are identical"));
    }
}

/// Validates one side of a preference pair, accepting the legacy key name;
/// returns the key used and its value when present.
fn output<'a>(
    obj: &'a Object,
    key: &'static str,
    legacy: &'static str,
    problems: &mut Vec<String>,
) -> Option<(&'static str, &'a Value)> {
    let (used, v) = match (obj.get(key), obj.get(legacy)) {
        (Some(v), _) => (key, v),
        (None, Some(v)) => (legacy, v),
        (None, None) => {
            problems.push(missing(key));
            return None;
        }
    };
    if let Some(info) = check_messages(v, used, problems)
        && !info.any_assistant
    {
        problems.push(format!("{used:?} has no assistant message"));
    }
    Some((used, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        match v {
            Value::Object(o) => o,
            _ => panic!("test value must be an object"),
        }
    }

    fn detect_v(v: Value) -> Result<DatasetFormat, String> {
        detect(&obj(v), None)
    }

    /// Detects then checks; returns the format and problems.
    fn run(v: Value) -> (DatasetFormat, LineCheck) {
        let o = obj(v);
        let f = detect(&o, None).expect("format detected");
        (f, check(f, &o))
    }

    fn problems(v: Value) -> Vec<String> {
        run(v).1.problems
    }

    fn assert_problem(v: Value, needle: &str) {
        let p = problems(v);
        assert!(
            p.iter().any(|m| m.contains(needle)),
            "expected {needle:?} in {p:?}"
        );
    }

    #[test]
    fn detection_by_keys() {
        use DatasetFormat::*;
        let chat = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]});
        assert_eq!(detect_v(chat), Ok(Chat));
        assert_eq!(
            detect_v(json!({"prompt": "a", "completion": "b"})),
            Ok(PromptCompletion)
        );
        assert_eq!(detect_v(json!({"prompt": "a"})), Ok(PromptCompletion));
        assert_eq!(
            detect_v(json!({"text": "a", "label": 1})),
            Ok(TextClassification)
        );
        assert_eq!(detect_v(json!({"label": 1})), Ok(TextClassification));
        assert_eq!(
            detect_v(json!({"text": "a", "labels": [1]})),
            Ok(MultiLabelClassification)
        );
        assert_eq!(
            detect_v(json!({"image": "a.png", "label": "x"})),
            Ok(ImageClassification)
        );
        assert_eq!(
            detect_v(json!({"input": {}, "preferred_output": []})),
            Ok(Preference)
        );
        assert_eq!(
            detect_v(json!({"preferred_completion": []})),
            Ok(Preference)
        );
        assert_eq!(detect_v(json!({"text": "a"})), Ok(DomainText));
        let err = detect_v(json!({"text": "a", "lable": "x"})).unwrap_err();
        assert!(err.starts_with("cannot tell the format: expected one of messages | prompt+completion | text+label | text+labels | input+preferred_output+non_preferred_output | image+label | text; found keys \"lable\", \"text\""), "{err}");
        assert!(
            detect_v(json!({}))
                .unwrap_err()
                .ends_with("found an empty object")
        );
    }

    #[test]
    fn messages_lines_chat_or_reinforcement() {
        use DatasetFormat::*;
        let user = json!({"role": "user", "content": "q"});
        let asst = json!({"role": "assistant", "content": "a"});
        // Any assistant → chat (also with extra keys if the assistant answers last).
        assert_eq!(detect_v(json!({"messages": [user, asst]})), Ok(Chat));
        assert_eq!(
            detect_v(json!({"messages": [user, asst], "id": 3})),
            Ok(Chat)
        );
        // No assistant + reference fields → reinforcement.
        assert_eq!(
            detect_v(json!({"messages": [user], "reference_answer": "42"})),
            Ok(Reinforcement)
        );
        // tools/parallel_tool_calls are not reference fields.
        let v = json!({"messages": [user], "tools": [], "parallel_tool_calls": true});
        assert_eq!(detect_v(v.clone()), Ok(Chat));
        assert_eq!(problems(v), vec!["no assistant message"]);
        assert_eq!(
            problems(json!({"messages": [user]})),
            vec!["no assistant message"]
        );
        // Multi-turn RFT prompt with an earlier assistant turn follows the file.
        let multi = obj(json!({"messages": [user, asst, user], "reference_answer": "x"}));
        assert_eq!(detect(&multi, None), Ok(Reinforcement));
        assert_eq!(detect(&multi, Some(Reinforcement)), Ok(Reinforcement));
        assert_eq!(detect(&multi, Some(Chat)), Ok(Chat));
        assert!(check(Chat, &multi).problems.is_empty());
        assert!(check(Reinforcement, &multi).problems.is_empty());
    }

    #[test]
    fn chat_message_rules() {
        let ok = json!({"messages": [
            {"role": "system", "content": "s"},
            {"role": "developer", "content": [{"type": "text", "text": "d"}]},
            {"role": "user", "content": "u", "name": "bob"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "weight": 0},
            {"role": "tool", "content": "r", "tool_call_id": "1"},
            {"role": "assistant", "content": "done", "weight": 1}
        ], "tools": [{"type": "function"}], "parallel_tool_calls": false});
        assert_eq!(problems(ok), Vec::<String>::new());

        let asst = json!({"role": "assistant", "content": "a"});
        assert_problem(
            json!({"messages": [{"role": "bot", "content": "x"}, asst]}),
            "messages[0]: unknown role \"bot\" (expected system, user, assistant, tool or developer)",
        );
        assert_problem(
            json!({"messages": [asst, {"content": "x"}]}),
            "messages[1]: missing key \"role\"",
        );
        assert_problem(
            json!({"messages": [asst, {"role": 5, "content": "x"}]}),
            "messages[1]: \"role\" should be a string, found an integer",
        );
        assert_problem(
            json!({"messages": [asst, "hi"]}),
            "messages[1] should be an object, found a string",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": "a", "weight": 2}]}),
            "messages[0]: \"weight\" must be 0 or 1, found 2",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": "a", "weight": 0.5}]}),
            "\"weight\" must be 0 or 1, found 0.5",
        );
        assert_problem(
            json!({"messages": [{"role": "user", "content": "a", "weight": 1}, asst]}),
            "messages[0]: \"weight\" is only allowed on assistant messages",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": null}]}),
            "messages[0]: \"content\" is null but the message has no tool_calls",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant"}]}),
            "messages[0]: missing key \"content\"",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": 3}]}),
            "\"content\" should be a string, null or an array of text parts, found an integer",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]: unsupported part type \"image_url\" (only \"text\")",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": [{"type": "text"}]}]}),
            "messages[0].content[0]: missing key \"text\"",
        );
        assert_problem(
            json!({"messages": [{"role": "assistant", "content": []}]}),
            "\"content\" is an empty array",
        );
        assert_problem(
            json!({"messages": [asst, {"role": "tool", "content": "r", "tool_call_id": 1}]}),
            "messages[1]: \"tool_call_id\" should be a string",
        );
        assert_problem(
            json!({"messages": [asst], "tools": {}}),
            "\"tools\" should be an array, found an object",
        );
        assert_problem(
            json!({"messages": [asst], "parallel_tool_calls": "yes"}),
            "\"parallel_tool_calls\" should be a boolean",
        );
        assert_problem(json!({"messages": []}), "\"messages\" is empty");
        assert_problem(
            json!({"messages": "hi"}),
            "\"messages\" should be an array of messages, found a string",
        );
    }

    #[test]
    fn reinforcement_rules() {
        let ok = json!({"messages": [{"role": "user", "content": "2+2?"}], "reference_answer": "4", "tools": []});
        assert_eq!(
            run(ok),
            (DatasetFormat::Reinforcement, LineCheck::default())
        );
        assert_problem(
            json!({"messages": [{"role": "usr", "content": "x"}], "reference_answer": "4"}),
            "unknown role \"usr\"",
        );
    }

    #[test]
    fn prompt_completion_rules() {
        assert!(problems(json!({"prompt": "p", "completion": "c"})).is_empty());
        assert_eq!(
            problems(json!({"prompt": "p"})),
            vec!["missing key \"completion\""]
        );
        assert_eq!(
            problems(json!({"completion": "c"})),
            vec!["missing key \"prompt\""]
        );
        assert_eq!(
            problems(json!({"prompt": "p", "completion": ""})),
            vec!["\"completion\" is empty"]
        );
        assert_eq!(
            problems(json!({"prompt": " ", "completion": "c"})),
            vec!["\"prompt\" is empty"]
        );
        assert_eq!(
            problems(json!({"prompt": ["p"], "completion": "c"})),
            vec!["\"prompt\" should be a string, found an array"]
        );
    }

    #[test]
    fn text_classification_rules() {
        assert_eq!(
            run(json!({"text": "t", "label": "pos"})).1.labels,
            vec!["pos"]
        );
        assert_eq!(run(json!({"text": "t", "label": 3})).1.labels, vec!["3"]);
        assert_eq!(
            run(json!({"text": "t", "label": true})).1.labels,
            vec!["true"]
        );
        assert_eq!(
            problems(json!({"label": "x"})),
            vec!["missing key \"text\""]
        );
        assert_eq!(
            problems(json!({"text": "", "label": "x"})),
            vec!["\"text\" is empty"]
        );
        assert_eq!(
            problems(json!({"text": "t", "label": 1.5})),
            vec!["\"label\" should be a string, integer or boolean, found a number"]
        );
        assert_eq!(
            problems(json!({"text": "t", "label": null})),
            vec!["\"label\" should be a string, integer or boolean, found null"]
        );
        assert_eq!(
            problems(json!({"text": "t", "label": ""})),
            vec!["\"label\" is empty"]
        );
        // Invalid lines contribute no labels.
        assert!(run(json!({"text": "", "label": "x"})).1.labels.is_empty());
    }

    #[test]
    fn multi_label_rules() {
        assert_eq!(
            run(json!({"text": "t", "labels": ["a", 2]})).1.labels,
            vec!["a", "2"]
        );
        assert_eq!(
            problems(json!({"text": "t", "labels": []})),
            vec!["\"labels\" is empty"]
        );
        assert_eq!(
            problems(json!({"text": "t", "labels": "a"})),
            vec!["\"labels\" should be an array of strings or integers, found a string"]
        );
        assert_eq!(
            problems(json!({"text": "t", "labels": ["a", "a"]})),
            vec!["duplicate label \"a\" in \"labels\""]
        );
        assert_eq!(
            problems(json!({"text": "t", "labels": [1, "1"]})),
            vec!["duplicate label \"1\" in \"labels\""]
        );
        assert_eq!(
            problems(json!({"text": "t", "labels": [true]})),
            vec!["labels[0] should be a string or integer, found a boolean"]
        );
        assert_eq!(
            problems(json!({"text": "t", "labels": ["a"], "label": "a"})),
            vec!["both \"label\" and \"labels\" are present"]
        );
    }

    #[test]
    fn preference_rules() {
        let input = json!({"messages": [{"role": "user", "content": "q"}]});
        let good = json!([{"role": "assistant", "content": "good"}]);
        let bad = json!([{"role": "assistant", "content": "bad"}]);
        assert_eq!(
            problems(
                json!({"input": input, "preferred_output": good, "non_preferred_output": bad})
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(
                json!({"input": input, "preferred_completion": good, "non_preferred_completion": bad})
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(
                json!({"input": input, "preferred_output": good, "non_preferred_output": good})
            ),
            vec!["\"preferred_output\" and \"non_preferred_output\" are identical"]
        );
        assert_eq!(
            problems(json!({"input": input, "preferred_output": good})),
            vec!["missing key \"non_preferred_output\""]
        );
        assert_eq!(
            problems(json!({"preferred_output": good, "non_preferred_output": bad})),
            vec!["missing key \"input\""]
        );
        assert_eq!(
            problems(json!({"input": {}, "preferred_output": good, "non_preferred_output": bad})),
            vec!["missing key \"input.messages\""]
        );
        assert_eq!(
            problems(json!({"input": "q", "preferred_output": good, "non_preferred_output": bad})),
            vec!["\"input\" should be an object with \"messages\", found a string"]
        );
        assert_eq!(
            problems(
                json!({"input": input, "preferred_output": [{"role": "user", "content": "x"}], "non_preferred_output": bad})
            ),
            vec!["\"preferred_output\" has no assistant message"]
        );
        assert_problem(
            json!({"input": {"messages": [{"role": "human", "content": "q"}]}, "preferred_output": good, "non_preferred_output": bad}),
            "input.messages[0]: unknown role \"human\"",
        );
        assert_problem(
            json!({"input": input, "preferred_output": good, "non_preferred_output": [{"role": "assistant", "content": "b", "weight": 3}]}),
            "non_preferred_output[0]: \"weight\" must be 0 or 1",
        );
    }

    #[test]
    fn image_rules() {
        use crate::data::image::tests::{JPEG, PNG, data_url};
        let (f, c) = run(json!({"image": data_url("image/png", PNG), "label": "cat"}));
        assert_eq!(
            (f, c.problems.len(), c.labels, c.image_path),
            (
                DatasetFormat::ImageClassification,
                0,
                vec!["cat".to_string()],
                false
            )
        );
        let c = run(json!({"image": "cats/1.jpg", "label": 0})).1;
        assert!(c.problems.is_empty() && c.image_path);
        assert_eq!(
            problems(json!({"image": "../x.png", "label": 0})),
            vec!["\"image\": \"..\" is not allowed in paths (\"../x.png\")"]
        );
        assert_problem(
            json!({"image": data_url("image/png", JPEG), "label": 0}),
            "the data is JPEG but the data URL says image/png",
        );
        assert_eq!(
            problems(json!({"image": "a.png"})),
            vec!["missing key \"label\""]
        );
        assert_eq!(
            problems(json!({"image": 5, "label": "x"})),
            vec!["\"image\" should be a string (data URL or path), found an integer"]
        );
    }

    #[test]
    fn domain_text_rules() {
        assert!(problems(json!({"text": "some prose"})).is_empty());
        assert_eq!(problems(json!({"text": "  \n"})), vec!["\"text\" is empty"]);
        assert_eq!(
            problems(json!({"text": 1})),
            vec!["\"text\" should be a string, found an integer"]
        );
    }
}
