//! A chat template and messages to render through it: the input is the template's source,
//! a NUL byte, then the messages as JSON (a list of message objects).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (source, messages) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"[]"[..]),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let messages: Vec<serde_json::Value> = match serde_json::from_slice(messages) {
        Ok(serde_json::Value::Array(m)) => m,
        _ => vec![serde_json::json!({"role": "user", "content": "hi"})],
    };
    if let Ok(t) = kiln::data::chat::ChatTemplate::new(
        Some(source.to_owned()),
        "<s>".into(),
        "</s>".into(),
    ) {
        let _ = t.render(&messages, true);
    }
});
