//! `kiln classify`, `kiln embed` and `kiln chat`: the served models, from a terminal.

use std::io::{IsTerminal, Write};

use anyhow::Context;
use clap::Args;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::table::{self, Table};
use super::{Server, ServerArgs};

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// A fine-tuned classifier (`ft:` id) or a base model with a classification head.
    #[arg(long)]
    pub model: String,
    /// Texts to classify; without any, one text per line of stdin.
    pub texts: Vec<String>,
    /// Cut texts longer than the model's limit instead of refusing them.
    #[arg(long)]
    pub truncate: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A text encoder (base or fine-tuned).
    #[arg(long)]
    pub model: String,
    /// Texts to embed; without any, one text per line of stdin.
    pub texts: Vec<String>,
    /// Cut texts longer than the model's limit instead of refusing them.
    #[arg(long)]
    pub truncate: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A generative model (base or fine-tuned).
    #[arg(long)]
    pub model: String,
    /// Send one message, print the reply and exit; without it, a conversation on stdin
    /// (one message per line; an empty input or Ctrl-D ends it).
    #[arg(long, short = 'm')]
    pub message: Option<String>,
    /// A system message that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The texts from the command line, or the non-empty lines of stdin.
async fn texts_or_stdin(texts: Vec<String>) -> anyhow::Result<Vec<String>> {
    if !texts.is_empty() {
        return Ok(texts);
    }
    if std::io::stdin().is_terminal() {
        anyhow::bail!("give the texts as arguments, or one per line on stdin");
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = Vec::new();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if !line.trim().is_empty() {
            out.push(line);
        }
    }
    if out.is_empty() {
        anyhow::bail!("no texts: stdin was empty");
    }
    Ok(out)
}

/// The first `max` characters of a text on one line.
fn excerpt(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub async fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let texts = texts_or_stdin(args.texts).await?;
    let answer = server
        .post(
            &["v1", "classifications"],
            &json!({"model": args.model, "input": texts, "truncate": args.truncate}),
        )
        .await?;
    if server.json {
        return server.print_json(&answer);
    }
    let mut t = Table::new(&["LABEL", "SCORE", "TEXT"]);
    for item in answer["data"].as_array().into_iter().flatten() {
        let index = item["index"].as_u64().unwrap_or(0) as usize;
        // Multi-label models answer every label over 0.5; single-label ones the best.
        let label = match item["labels"].as_array() {
            Some(labels) => labels.iter().map(table::text).collect::<Vec<_>>().join(","),
            None => table::text(&item["label"]),
        };
        let score = item["score"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.4}"));
        let text = texts.get(index).map_or("", String::as_str);
        t.row(vec![label, score, excerpt(text, 60)]);
    }
    t.print();
    Ok(())
}

pub async fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let texts = texts_or_stdin(args.texts).await?;
    let answer = server
        .post(
            &["v1", "embeddings"],
            &json!({"model": args.model, "input": texts, "truncate": args.truncate}),
        )
        .await?;
    if server.json {
        return server.print_json(&answer);
    }
    // One vector per line, as a JSON array: easy to paste or pipe.
    for item in answer["data"].as_array().into_iter().flatten() {
        println!("{}", item["embedding"]);
    }
    Ok(())
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    if let Some(message) = &args.message {
        messages.push(json!({"role": "user", "content": message}));
        let answer = complete(&server, &args, &messages).await?;
        if server.json {
            return server.print_json(&answer);
        }
        println!("{}", reply(&answer)?);
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next_line().await.context("reading stdin")? else {
            break;
        };
        let line = line.trim();
        if line.is_empty() {
            if interactive {
                break;
            }
            continue;
        }
        messages.push(json!({"role": "user", "content": line}));
        let answer = complete(&server, &args, &messages).await?;
        if server.json {
            println!("{answer}");
        }
        let text = reply(&answer)?;
        if !server.json {
            println!("{text}");
        }
        messages.push(json!({"role": "assistant", "content": text}));
    }
    Ok(())
}

/// `POST /v1/chat/completions` as OpenAI defines it.
async fn complete(server: &Server, args: &ChatArgs, messages: &[Value]) -> anyhow::Result<Value> {
    let mut body = Map::new();
    body.insert("model".into(), json!(args.model));
    body.insert("messages".into(), json!(messages));
    if let Some(n) = args.max_tokens {
        body.insert("max_tokens".into(), json!(n));
    }
    if let Some(t) = args.temperature {
        body.insert("temperature".into(), json!(t));
    }
    server
        .post(&["v1", "chat", "completions"], &Value::Object(body))
        .await
}

fn reply(answer: &Value) -> anyhow::Result<String> {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .context("the server's answer has no choices[0].message.content")
}

#[cfg(test)]
mod tests {
    use super::excerpt;

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt("short", 10), "short");
        assert_eq!(excerpt("a\nb", 10), "a b");
        assert_eq!(excerpt("abcdefghijkl", 5), "abcd…");
    }
}
