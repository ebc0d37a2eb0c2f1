//! `kiln jobs watch ID`: follows a job's server-sent events to its end, with a progress bar
//! over its steps (train loss, throughput, ETA) and its messages printed above the bar.
//!
//! The stream (`GET .../events?stream=true`) replays the job's events oldest first, then
//! sends new ones as they happen, and ends with `[DONE]` once the job has ended. A dropped
//! connection is reopened (events already shown are skipped by id). The job itself is read
//! every few seconds for its status (queued, paused, running), which events do not carry.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::Value;

use super::jobs::status;
use super::table;
use super::{Server, ServerError};

const TERMINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];
/// How long a lost connection is retried before giving up.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// How often the job is read for its status.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Without a terminal, at most one progress line this often (evaluations always print).
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub async fn watch(server: &Server, id: &str) -> anyhow::Result<()> {
    let job_path = ["v1", "fine_tuning", "jobs", id];
    let job = server.get(&job_path, &[]).await?;
    let mut view = View::new(server.json);
    view.status(&job);
    let mut seen = HashSet::new();
    let mut lost_since: Option<Instant> = None;
    loop {
        match follow(server, id, &mut seen, &mut view).await {
            Ok(true) => break,
            // The stream closed before `[DONE]` (a server restart, a proxy's timeout).
            Ok(false) => lost_since = None,
            Err(e) if e.downcast_ref::<ServerError>().is_some() => return Err(e),
            Err(e) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    view.clear();
                    return Err(e);
                }
                view.line(format!("connection lost ({e:#}); reconnecting"));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let job = server.get(&job_path, &[]).await?;
    view.finish(&job)
}

/// Reads the event stream until `[DONE]` (true) or until it closes early (false).
async fn follow(
    server: &Server,
    id: &str,
    seen: &mut HashSet<String>,
    view: &mut View,
) -> anyhow::Result<bool> {
    let request = server
        .request(Method::GET, &["v1", "fine_tuning", "jobs", id, "events"])
        .query(&[("stream", "true")]);
    let response = server.respond(request).await?;
    let mut chunks = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.reset(); // the caller has just read the job
    loop {
        tokio::select! {
            chunk = chunks.next() => {
                let Some(chunk) = chunk else { return Ok(false) };
                let chunk = chunk.map_err(|e| anyhow::anyhow!("the event stream broke: {e}"))?;
                for data in parser.push(&chunk) {
                    if data == "[DONE]" {
                        return Ok(true);
                    }
                    let Ok(event) = serde_json::from_str::<Value>(&data) else {
                        continue;
                    };
                    let event_id = event["id"].as_str().unwrap_or_default().to_owned();
                    if event_id.is_empty() || seen.insert(event_id) {
                        view.event(&event);
                    }
                }
            }
            _ = status_tick.tick() => {
                if let Ok(job) = server.get(&["v1", "fine_tuning", "jobs", id], &[]).await {
                    view.status(&job);
                }
            }
        }
    }
}

/// The `data:` payloads of a server-sent event stream, fed in arbitrary chunks.
#[derive(Default)]
struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                out.extend(self.data.take());
            } else if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
            // Comments (`:` keep-alives) and other fields (`event:`, `id:`) are not used.
        }
        out
    }
}

/// One event as a line: `2024-05-01 12:00:00  info   Step 3/10: training loss=0.6931`.
pub fn event_line(e: &Value) -> String {
    format!(
        "{}  {:<5}  {}",
        table::time(&e["created_at"]),
        e["level"].as_str().unwrap_or("info"),
        e["message"].as_str().unwrap_or_default()
    )
}

/// What the watcher shows: a progress bar on a terminal, plain lines otherwise, or one
/// JSON object per event with `--json`.
struct View {
    json: bool,
    bar: Option<ProgressBar>,
    last_plain_progress: Option<Instant>,
    last_status: String,
    /// The latest value of every figure: an evaluation's event lacks the step's throughput.
    figures: serde_json::Map<String, Value>,
}

impl View {
    fn new(json: bool) -> View {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                // Two lines, so the figures never squeeze the bar out of a narrow terminal.
                ProgressStyle::with_template(
                    "{spinner} {prefix:10} [{elapsed_precise}] {wide_bar} {pos}/{len} steps\n  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        View {
            json,
            bar,
            last_plain_progress: None,
            last_status: String::new(),
            figures: serde_json::Map::new(),
        }
    }

    /// A line above the bar (or on stdout without one).
    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if !self.json => println!("{text}"),
            None => eprintln!("{text}"),
        }
    }

    fn status(&mut self, job: &Value) {
        let now = status(job);
        if let Some(bar) = &self.bar {
            bar.set_prefix(now.clone());
        } else if !self.json && now != self.last_status {
            println!("status: {now}");
        }
        self.last_status = now;
    }

    fn event(&mut self, e: &Value) {
        if self.json {
            println!("{e}");
            return;
        }
        if e["type"] != "metrics" {
            self.line(event_line(e));
            return;
        }
        let data = &e["data"];
        let step = data["step"].as_u64().unwrap_or(0);
        let total = data["total_steps"].as_u64().unwrap_or(0);
        let evaluation = evaluation_summary(data);
        if let Some(fields) = data.as_object() {
            self.figures
                .extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let summary = progress_summary(&Value::Object(self.figures.clone()));
        match &self.bar {
            Some(bar) => {
                if total > 0 {
                    bar.set_length(total);
                }
                bar.set_position(step);
                bar.set_message(summary);
                if let Some(eval) = evaluation {
                    bar.println(format!("step {step}: {eval}"));
                }
            }
            None => {
                let due = self
                    .last_plain_progress
                    .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY);
                if due || evaluation.is_some() || (total > 0 && step >= total) {
                    self.last_plain_progress = Some(Instant::now());
                    let mut line = format!("step {step}/{total}  {summary}");
                    if let Some(eval) = evaluation {
                        line.push_str(&format!("  {eval}"));
                    }
                    println!("{}", line.trim_end());
                }
            }
        }
    }

    fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// The end: a summary for a job that succeeded, an error for one that did not.
    fn finish(self, job: &Value) -> anyhow::Result<()> {
        self.clear();
        let id = table::text(&job["id"]);
        let state = job["status"].as_str().unwrap_or_default();
        if self.json {
            println!("{job}");
        }
        match state {
            "succeeded" => {
                if !self.json {
                    println!("{id} succeeded: {}", table::text(&job["fine_tuned_model"]));
                    if let Some(m) = job["metrics"].as_object().filter(|m| !m.is_empty()) {
                        let figures: Vec<String> = m
                            .iter()
                            .filter_map(|(k, v)| v.as_f64().map(|x| format!("{k} {x:.4}")))
                            .collect();
                        println!("metrics: {}", figures.join("  "));
                    }
                }
                Ok(())
            }
            "failed" => {
                let message = job["error"]["message"]
                    .as_str()
                    .unwrap_or("no error message recorded");
                anyhow::bail!("job {id} failed: {message}")
            }
            "cancelled" => anyhow::bail!("job {id} was cancelled"),
            other if !TERMINAL.contains(&other) => {
                anyhow::bail!("the event stream ended but job {id} is still {other}")
            }
            other => anyhow::bail!("job {id} ended as {other}"),
        }
    }
}

/// `loss 0.6931  12.3 ex/s  1.2k tok/s  ETA 1m20s`.
fn progress_summary(data: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(loss) = data["train_loss"].as_f64() {
        parts.push(format!("loss {loss:.4}"));
    }
    if let Some(speed) = data["examples_per_second"].as_f64().filter(|s| *s > 0.0) {
        parts.push(format!("{speed:.1} ex/s"));
    }
    if let Some(tokens) = data["tokens_per_second"].as_f64().filter(|s| *s > 0.0) {
        parts.push(format!("{} tok/s", table::count(tokens)));
    }
    if let Some(eta) = data["eta_seconds"].as_f64() {
        parts.push(format!("ETA {}", table::duration(eta)));
    }
    parts.join("  ")
}

/// `valid_loss 0.3012  valid_accuracy 0.9500` when the event carries validation figures.
fn evaluation_summary(data: &Value) -> Option<String> {
    let figures: Vec<String> = data
        .as_object()?
        .iter()
        .filter(|(k, _)| k.starts_with("valid_"))
        .filter_map(|(k, v)| v.as_f64().map(|x| format!("{k} {x:.4}")))
        .collect();
    (!figures.is_empty()).then(|| figures.join("  "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sse_payloads_survive_any_chunking() {
        let stream = b": keep-alive\n\ndata: {\"a\":1}\n\ndata:[DONE]\r\n\r\n";
        for size in 1..stream.len() {
            let mut p = SseParser::default();
            let got: Vec<String> = stream.chunks(size).flat_map(|c| p.push(c)).collect();
            assert_eq!(got, vec!["{\"a\":1}".to_owned(), "[DONE]".to_owned()]);
        }
    }

    #[test]
    fn progress_shows_loss_speed_and_eta() {
        let data = json!({"step": 3, "total_steps": 10, "train_loss": 0.61234,
            "examples_per_second": 12.34, "tokens_per_second": 15000.0, "eta_seconds": 80.0});
        assert_eq!(
            progress_summary(&data),
            "loss 0.6123  12.3 ex/s  15.0k tok/s  ETA 1m20s"
        );
        assert_eq!(evaluation_summary(&data), None);
        let eval = json!({"step": 5, "valid_loss": 0.3, "valid_accuracy": 0.95});
        assert_eq!(
            evaluation_summary(&eval).unwrap(),
            "valid_accuracy 0.9500  valid_loss 0.3000"
        );
    }
}
