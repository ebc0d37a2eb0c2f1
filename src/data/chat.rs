//! Text for decoder language models: the model's own chat template (a Jinja template from
//! `tokenizer_config.json` or `chat_template.jinja`, rendered with minijinja, or a plain
//! fallback), and tokenisation into examples that carry a loss mask — which tokens the model
//! is trained to produce (assistant turns with `weight` ≠ 0, completions, or every token of
//! domain text).
//!
//! The mask is computed on characters, then mapped to tokens through the tokenizer's offsets:
//! a conversation is rendered once, and each trained assistant turn is located by rendering
//! the conversation up to it (with the generation prompt) and through it. Templates that do
//! not render conversations incrementally fall back to finding the turn's text.

use std::ops::Range;
use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde_json::Value;

use super::text::TextDataError;

/// Used when a model ships no chat template: `role: content` lines, the end-of-sequence token
/// closing each assistant turn so the model learns where to stop.
const FALLBACK_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message.role }}: {{ message.content }}{% if message.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

/// Instructions one rendering may run (minijinja's fuel): about a second of work.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// A rendered chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    from_model: bool,
    bos_token: String,
    eos_token: String,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

fn template_error(e: minijinja::Error) -> TextDataError {
    let mut message = format!("chat template: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    TextDataError::Invalid(message)
}

impl ChatTemplate {
    /// The template of a model directory: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json` (a string, or a list of named templates, `default` chosen),
    /// else the plain fallback.
    pub fn load(model_dir: &Path) -> Result<ChatTemplate, TextDataError> {
        let config_path = model_dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TextDataError::Invalid(format!("{}: {e}", config_path.display())))?,
            Err(_) => Value::Null,
        };
        let file = model_dir.join("chat_template.jinja");
        let source = if file.is_file() {
            Some(
                std::fs::read_to_string(&file).map_err(|source| TextDataError::Io {
                    path: file.display().to_string(),
                    source,
                })?,
            )
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| named.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => None,
            }
        };
        Self::new(
            source,
            token_string(config.get("bos_token")),
            token_string(config.get("eos_token")),
        )
    }

    /// A template from its source (`None`: the plain fallback).
    pub fn new(
        source: Option<String>,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate, TextDataError> {
        let mut env = Environment::new();
        // A template that loops without end (nested `range`s) fails instead of holding a
        // training or serving thread for ever; real templates use a tiny part of this.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function(
            "strftime_now",
            |format: String| -> Result<String, minijinja::Error> {
                // Written, not `to_string()`: an unknown specifier is an error, not a panic.
                use std::fmt::Write;
                let mut out = String::new();
                write!(out, "{}", chrono::Utc::now().format(&format)).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: invalid format {format:?}"),
                    )
                })?;
                Ok(out)
            },
        );
        let from_model = source.is_some();
        let source = source.unwrap_or_else(|| FALLBACK_TEMPLATE.to_owned());
        env.add_template_owned("chat", source)
            .map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            from_model,
            bos_token,
            eos_token,
        })
    }

    /// Whether the model brought its own template.
    pub fn from_model(&self) -> bool {
        self.from_model
    }

    /// The end-of-sequence token the template closes turns with (may be empty).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages` (OpenAI-shaped message objects).
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, TextDataError> {
        let template = self.env.get_template("chat").map_err(template_error)?;
        let messages: Vec<Value> = messages.iter().map(normalise_message).collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(template_error)
    }

    /// Character ranges of the rendered conversation that the model is trained to produce:
    /// each assistant turn whose `weight` is not 0, with the tokens that close it.
    fn trained_spans(
        &self,
        messages: &[Value],
        full: &str,
    ) -> Result<Vec<Range<usize>>, TextDataError> {
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let weight = m.get("weight").and_then(Value::as_f64).unwrap_or(1.0);
            let incremental = self.render(&messages[..i], true).and_then(|before| {
                self.render(&messages[..=i], false)
                    .map(|through| (before, through))
            });
            let span = match incremental {
                Ok((before, through))
                    if full.starts_with(&before)
                        && full.starts_with(&through)
                        && before.len() <= through.len() =>
                {
                    Some(before.len()..through.len())
                }
                _ => {
                    // Not incremental (e.g. a template that drops earlier reasoning): find
                    // the turn's text after the previous one.
                    let content = content_text(m.get("content"));
                    (!content.is_empty())
                        .then(|| full[cursor..].find(&content))
                        .flatten()
                        .map(|at| {
                            let start = cursor + at;
                            let mut end = start + content.len();
                            if !self.eos_token.is_empty()
                                && full[end..].starts_with(&self.eos_token)
                            {
                                end += self.eos_token.len();
                            }
                            start..end
                        })
                }
            };
            let Some(span) = span else {
                return Err(TextDataError::Invalid(format!(
                    "messages[{i}]: the chat template does not render this assistant turn where it can be found"
                )));
            };
            cursor = span.end;
            if weight != 0.0 && !span.is_empty() {
                spans.push(span);
            }
        }
        Ok(spans)
    }
}

/// Message content as text: a string, or the text parts of a list of content parts.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// A message as templates expect it: `content` a string (content parts joined), `weight`
/// dropped.
fn normalise_message(m: &Value) -> Value {
    let mut m = m.clone();
    if let Some(obj) = m.as_object_mut() {
        obj.remove("weight");
        let content = obj.get("content");
        if matches!(content, Some(Value::Array(_))) || content.is_none() {
            let text = content_text(content);
            obj.insert("content".into(), Value::String(text));
        }
    }
    m
}

/// A tokenised example: `ids`, and for each token whether the model is trained to produce it.
#[derive(Debug, Clone, PartialEq)]
pub struct LmExample {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl LmExample {
    /// Tokens the loss is computed on (each predicted from the tokens before it).
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }

    /// Keeps the first `max` tokens; true when something was cut.
    pub fn truncate(&mut self, max: usize) -> bool {
        if self.ids.len() <= max {
            return false;
        }
        self.ids.truncate(max);
        self.trained.truncate(max);
        true
    }
}

/// A decoder's tokenizer and chat template.
pub struct DecoderTokenizer {
    inner: tokenizers::Tokenizer,
    template: ChatTemplate,
    eos_id: Option<u32>,
    pad_id: u32,
}

impl DecoderTokenizer {
    /// Loads `tokenizer.json` and the chat template of a model directory.
    pub fn load(model_dir: &Path) -> Result<DecoderTokenizer, TextDataError> {
        let path = model_dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TextDataError::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TextDataError::Tokenizer(e.to_string()))?;
        let template = ChatTemplate::load(model_dir)?;
        let eos_id = (!template.eos_token().is_empty())
            .then(|| inner.token_to_id(template.eos_token()))
            .flatten();
        let pad_id = ["<|endoftext|>", "<pad>", "[PAD]", "</s>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .or(eos_id)
            .unwrap_or(0);
        Ok(DecoderTokenizer {
            inner,
            template,
            eos_id,
            pad_id,
        })
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The end-of-sequence token's id, when the tokenizer config names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn encode_raw(&self, text: &str, special: bool) -> Result<tokenizers::Encoding, TextDataError> {
        self.inner
            .encode(text, special)
            .map_err(|e| TextDataError::Tokenizer(e.to_string()))
    }

    /// Token ids of `text`, as the template wrote it (special tokens already in the text).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TextDataError> {
        Ok(self.encode_raw(text, false)?.get_ids().to_vec())
    }

    /// A conversation with the loss on its trained assistant turns.
    pub fn encode_chat(&self, messages: &[Value]) -> Result<LmExample, TextDataError> {
        let full = self.template.render(messages, false)?;
        let spans = self.template.trained_spans(messages, &full)?;
        let enc = self.encode_raw(&full, false)?;
        let trained = enc
            .get_offsets()
            .iter()
            .map(|&(start, end)| end > start && spans.iter().any(|s| s.contains(&start)))
            .collect();
        Ok(LmExample {
            ids: enc.get_ids().to_vec(),
            trained,
        })
    }

    /// The prompt of a conversation, ready for the assistant's reply.
    pub fn encode_prompt(&self, messages: &[Value]) -> Result<Vec<u32>, TextDataError> {
        let text = self.template.render(messages, true)?;
        self.encode_text(&text)
    }

    /// `prompt` then `completion` and the end-of-sequence token; the loss on the completion.
    pub fn encode_completion(
        &self,
        prompt: &str,
        completion: &str,
    ) -> Result<LmExample, TextDataError> {
        let mut ids = self.encode_raw(prompt, true)?.get_ids().to_vec();
        let mut trained = vec![false; ids.len()];
        let tail = self.encode_text(completion)?;
        trained.extend(std::iter::repeat_n(true, tail.len()));
        ids.extend(tail);
        if let Some(eos) = self.eos_id {
            ids.push(eos);
            trained.push(true);
        }
        Ok(LmExample { ids, trained })
    }

    /// Unlabelled text: every token trained (continued pretraining).
    pub fn encode_document(&self, text: &str) -> Result<LmExample, TextDataError> {
        let mut ids = self.encode_raw(text, true)?.get_ids().to_vec();
        if let Some(eos) = self.eos_id {
            ids.push(eos);
        }
        Ok(LmExample {
            trained: vec![true; ids.len()],
            ids,
        })
    }

    /// Text of `ids`, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextDataError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TextDataError::Tokenizer(e.to_string()))
    }
}

/// What a decoder trains on: conversations, prompt/completion pairs or plain text.
#[derive(Debug, Clone)]
pub enum LmRecord {
    Chat(Vec<Value>),
    Completion { prompt: String, completion: String },
    Document(String),
}

impl LmRecord {
    pub fn encode(&self, tok: &DecoderTokenizer) -> Result<LmExample, TextDataError> {
        match self {
            LmRecord::Chat(messages) => tok.encode_chat(messages),
            LmRecord::Completion { prompt, completion } => {
                tok.encode_completion(prompt, completion)
            }
            LmRecord::Document(text) => tok.encode_document(text),
        }
    }
}

/// Reads chat (`messages`), prompt/completion or `text` lines, each error with its line.
pub fn read_lm_records(path: &Path) -> Result<Vec<LmRecord>, TextDataError> {
    let mut out = Vec::new();
    for (line, value) in super::text::read_lines(path)? {
        let record = if let Some(messages) = value.get("messages") {
            let messages = messages
                .as_array()
                .ok_or_else(|| TextDataError::Line {
                    line,
                    message: "\"messages\" must be a list".into(),
                })?
                .clone();
            LmRecord::Chat(messages)
        } else if let (Some(p), Some(c)) = (value.get("prompt"), value.get("completion")) {
            match (p.as_str(), c.as_str()) {
                (Some(p), Some(c)) => LmRecord::Completion {
                    prompt: p.to_owned(),
                    completion: c.to_owned(),
                },
                _ => {
                    return Err(TextDataError::Line {
                        line,
                        message: "\"prompt\" and \"completion\" must be strings".into(),
                    });
                }
            }
        } else if let Some(t) = value.get("text").and_then(Value::as_str) {
            LmRecord::Document(t.to_owned())
        } else {
            return Err(TextDataError::Line {
                line,
                message: "expected \"messages\", \"prompt\" and \"completion\", or \"text\"".into(),
            });
        };
        out.push(record);
    }
    if out.is_empty() {
        return Err(TextDataError::Invalid(format!(
            "{} has no examples",
            path.display()
        )));
    }
    Ok(out)
}

/// One DPO example: a conversation so far, and the preferred and non-preferred replies
/// (each a list of assistant messages).
#[derive(Debug, Clone)]
pub struct PreferencePair {
    pub prompt: Vec<Value>,
    pub chosen: Vec<Value>,
    pub rejected: Vec<Value>,
}

impl PreferencePair {
    /// The prompt with one of the replies; the loss (and log-probabilities) on the reply only.
    pub fn encode(
        &self,
        tok: &DecoderTokenizer,
        preferred: bool,
    ) -> Result<LmExample, TextDataError> {
        let mut messages: Vec<Value> = self
            .prompt
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(o) = m.as_object_mut() {
                    o.insert("weight".into(), Value::from(0));
                }
                m
            })
            .collect();
        messages.extend(
            if preferred {
                &self.chosen
            } else {
                &self.rejected
            }
            .iter()
            .cloned(),
        );
        tok.encode_chat(&messages)
    }
}

/// Reads OpenAI's preference lines: `input.messages`, `preferred_output` and
/// `non_preferred_output` (or the older `..._completion` names).
pub fn read_preference_pairs(path: &Path) -> Result<Vec<PreferencePair>, TextDataError> {
    let mut out = Vec::new();
    for (line, value) in super::text::read_lines(path)? {
        let list = |v: Option<&Value>, what: &str| -> Result<Vec<Value>, TextDataError> {
            v.and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| TextDataError::Line {
                    line,
                    message: format!("{what} must be a list of messages"),
                })
        };
        let prompt = list(
            value.get("input").and_then(|i| i.get("messages")),
            "input.messages",
        )?;
        let chosen = list(
            value
                .get("preferred_output")
                .or_else(|| value.get("preferred_completion")),
            "preferred_output",
        )?;
        let rejected = list(
            value
                .get("non_preferred_output")
                .or_else(|| value.get("non_preferred_completion")),
            "non_preferred_output",
        )?;
        out.push(PreferencePair {
            prompt,
            chosen,
            rejected,
        });
    }
    if out.is_empty() {
        return Err(TextDataError::Invalid(format!(
            "{} has no preference pairs",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(Some(CHATML.into()), String::new(), "<|im_end|>".into()).unwrap()
    }

    #[test]
    fn renders_chatml_with_and_without_generation_prompt() {
        let t = chatml();
        let msgs = [json!({"role": "user", "content": "hi"})];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n"
        );
    }

    #[test]
    fn trained_spans_cover_weighted_assistant_turns_only() {
        let t = chatml();
        let msgs = [
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "first", "weight": 0}),
            json!({"role": "user", "content": "b"}),
            json!({"role": "assistant", "content": [{"type": "text", "text": "second"}]}),
        ];
        let full = t.render(&msgs, false).unwrap();
        let spans = t.trained_spans(&msgs, &full).unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(&full[spans[0].clone()], "second<|im_end|>\n");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            Some("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() | upper }}".into()),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[json!({"role": "user", "content": "  x "})], false)
                .unwrap(),
            "X"
        );
        let err = t
            .render(&[json!({"role": "system", "content": "x"})], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }

    /// A template in the style of Qwen2.5's: whitespace control, a default system prompt,
    /// `loop.first`, attribute access to keys a message may lack, and tool calls through
    /// `tojson`; and one in Llama 3's style with `bos_token` and `.strip()`.
    #[test]
    fn hub_style_templates_render_and_locate_assistant_turns() {
        let qwen = r#"{%- if tools %}{{- '<|im_start|>system\n# Tools\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- elif message.role == "assistant" %}{{- '<|im_start|>assistant' }}{%- for tool_call in message.tool_calls %}{{- '\n<tool_call>\n' + (tool_call.function | tojson) + '\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"#;
        let t = ChatTemplate::new(Some(qwen.into()), String::new(), "<|im_end|>".into()).unwrap();
        let msgs = [
            json!({"role": "user", "content": "2+2?"}),
            json!({"role": "assistant", "content": "4"}),
        ];
        let full = t.render(&msgs, false).unwrap();
        assert!(
            full.starts_with("<|im_start|>system\nYou are a helpful assistant."),
            "{full}"
        );
        let spans = t.trained_spans(&msgs, &full).unwrap();
        assert_eq!(&full[spans[0].clone()], "4<|im_end|>\n");
        let with_tool = [
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}),
        ];
        assert!(t.render(&with_tool, false).unwrap().contains("<tool_call>"));

        let llama = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}";
        let t = ChatTemplate::new(
            Some(llama.into()),
            "<|begin_of_text|>".into(),
            "<|eot_id|>".into(),
        )
        .unwrap();
        let full = t.render(&msgs, false).unwrap();
        assert!(
            full.starts_with("<|begin_of_text|><|start_header_id|>user"),
            "{full}"
        );
        let spans = t.trained_spans(&msgs, &full).unwrap();
        assert_eq!(&full[spans[0].clone()], "4<|eot_id|>");
    }

    #[test]
    fn the_fallback_closes_assistant_turns_with_eos() {
        let t = ChatTemplate::new(None, "<s>".into(), "</s>".into()).unwrap();
        let msgs = [
            json!({"role": "user", "content": "q"}),
            json!({"role": "assistant", "content": "a"}),
        ];
        let full = t.render(&msgs, false).unwrap();
        assert_eq!(full, "<s>user: q\nassistant: a</s>\n");
        let spans = t.trained_spans(&msgs, &full).unwrap();
        assert_eq!(&full[spans[0].clone()], "a</s>\n");
        assert_eq!(
            t.render(&msgs[..1], true).unwrap(),
            "<s>user: q\nassistant: "
        );
    }
}
