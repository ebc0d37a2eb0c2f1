//! `kiln files upload|list|get|rm`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use super::table::{self, Table};
use super::{Server, ServerArgs, check_id};
use crate::data::ValidationReport;

#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Upload a dataset (streamed; `fine-tune` files are validated by the server).
    Upload {
        path: PathBuf,
        /// OpenAI's purposes: fine-tune, batch, assistants, vision, user_data, evals.
        #[arg(long, default_value = "fine-tune")]
        purpose: String,
        /// Wait for validation and print its verdict; exit 1 when the file is invalid.
        #[arg(long)]
        wait: bool,
        /// Files larger than this go through the Uploads API (`/v1/uploads`) in parts of
        /// this size, MD5 checked, up to the server's KILN_MAX_LARGE_UPLOAD_BYTES (8 GiB by
        /// default); at most 64 MiB.
        #[arg(long, default_value_t = PART_MAX, value_parser = clap::value_parser!(u64).range(1..=PART_MAX))]
        part_size: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List files, newest first.
    List {
        /// Only files with this purpose.
        #[arg(long)]
        purpose: Option<String>,
        /// At most this many files.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show one file and its validation report.
    Get {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a file.
    Rm {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub async fn run(command: FilesCommand) -> anyhow::Result<()> {
    match command {
        FilesCommand::Upload {
            path,
            purpose,
            wait,
            part_size,
            server,
        } => upload(&Server::connect(&server)?, path, purpose, wait, part_size).await,
        FilesCommand::List {
            purpose,
            limit,
            server,
        } => list(&Server::connect(&server)?, purpose, limit).await,
        FilesCommand::Get { id, server } => {
            let server = Server::connect(&server)?;
            let file = server
                .get(&["v1", "files", check_id("file", &id)?], &[])
                .await?;
            if server.json {
                return server.print_json(&file);
            }
            print_file(&file);
            Ok(())
        }
        FilesCommand::Rm { id, server } => {
            let server = Server::connect(&server)?;
            let deleted = server
                .delete(&["v1", "files", check_id("file", &id)?])
                .await?;
            if server.json {
                return server.print_json(&deleted);
            }
            println!("deleted {}", table::text(&deleted["id"]));
            Ok(())
        }
    }
}

/// The server's largest part (`/v1/uploads/{id}/parts`).
const PART_MAX: u64 = crate::api::uploads::PART_MAX_BYTES;

async fn upload(
    server: &Server,
    path: PathBuf,
    purpose: String,
    wait: bool,
    part_size: u64,
) -> anyhow::Result<()> {
    let meta = tokio::fs::metadata(&path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a file", path.display());
    }
    let mut file = if meta.len() > part_size {
        upload_in_parts(server, &path, meta.len(), &purpose, part_size).await?
    } else {
        let part = Part::file(&path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        let form = Form::new().text("purpose", purpose).part("file", part);
        server
            .send(
                server
                    .request(Method::POST, &["v1", "files"])
                    .multipart(form),
            )
            .await?
    };
    let id = file["id"]
        .as_str()
        .context("the server's answer has no file id")?
        .to_owned();
    if !server.json {
        println!(
            "uploaded {} ({}, {}, {})",
            id,
            table::text(&file["filename"]),
            table::bytes(&file["bytes"]),
            table::text(&file["status"]),
        );
    }
    if wait {
        file = wait_validated(server, &id, file).await?;
    }
    if server.json {
        server.print_json(&file)?;
    } else if wait {
        println!("{}", verdict(&file));
    }
    if wait && file["status"] == "error" {
        let details = file["status_details"].as_str().unwrap_or("invalid data");
        anyhow::bail!("file {id} failed validation: {details}");
    }
    Ok(())
}

/// Sends a file through the Uploads API: declared, sent in parts one after another (each
/// read into memory, at most 64 MiB), completed with the parts' MD5 so that the server checks
/// it holds exactly these bytes. A failure cancels the upload, so no parts are left waiting.
/// Returns the file.
async fn upload_in_parts(
    server: &Server,
    path: &std::path::Path,
    bytes: u64,
    purpose: &str,
    part_size: u64,
) -> anyhow::Result<Value> {
    use md5::{Digest, Md5};
    use tokio::io::AsyncReadExt;

    let filename = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".to_owned());
    let mime_type = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => "text/jsonl",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    };
    let upload = server
        .post(
            &["v1", "uploads"],
            &json!({"bytes": bytes, "filename": filename, "mime_type": mime_type, "purpose": purpose}),
        )
        .await?;
    let id = upload["id"]
        .as_str()
        .context("the server's answer has no upload id")?
        .to_owned();
    let sent = async {
        let mut source = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut md5 = Md5::new();
        let mut part_ids = Vec::new();
        let mut left = bytes;
        while left > 0 {
            let mut chunk = vec![0u8; left.min(part_size) as usize];
            source
                .read_exact(&mut chunk)
                .await
                .with_context(|| format!("cannot read {} (did it change?)", path.display()))?;
            left -= chunk.len() as u64;
            md5.update(&chunk);
            let form = Form::new().part("data", Part::bytes(chunk).file_name(filename.clone()));
            let part = server
                .send(
                    server
                        .request(Method::POST, &["v1", "uploads", &id, "parts"])
                        .multipart(form),
                )
                .await?;
            part_ids.push(part["id"].clone());
            if !server.json {
                eprint!("\rsent {} of {}", bytes - left, bytes);
            }
        }
        if !server.json {
            eprintln!();
        }
        server
            .post(
                &["v1", "uploads", &id, "complete"],
                &json!({"part_ids": part_ids, "md5": hex::encode(md5.finalize())}),
            )
            .await
    }
    .await;
    match sent {
        Ok(done) => {
            let file = done["file"].clone();
            anyhow::ensure!(
                file["id"].is_string(),
                "the server's answer has no file for upload {id}"
            );
            Ok(file)
        }
        Err(e) => {
            let _ = server.post_empty(&["v1", "uploads", &id, "cancel"]).await;
            Err(e.context(format!("upload {id} failed and was cancelled")))
        }
    }
}

/// Polls until the server has validated the file (its status leaves `uploaded`).
async fn wait_validated(server: &Server, id: &str, mut file: Value) -> anyhow::Result<Value> {
    let mut delay = Duration::from_millis(100);
    while file["status"] == "uploaded" {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
        file = server.get(&["v1", "files", id], &[]).await?;
    }
    Ok(file)
}

/// `file-… processed: ok: 120 text_classification examples, 2 labels (negative: 60, positive: 60)`.
fn verdict(file: &Value) -> String {
    let id = table::text(&file["id"]);
    let status = table::text(&file["status"]);
    match report(file) {
        Some(r) => {
            let mut line = format!("{id} {status}: {}", r.summary());
            if let Some(labels) = r.labels.filter(|l| !l.is_empty()) {
                let counts: Vec<String> = labels.iter().map(|(l, n)| format!("{l}: {n}")).collect();
                line.push_str(&format!(" ({})", counts.join(", ")));
            }
            line
        }
        None => match file["status_details"].as_str() {
            Some(details) => format!("{id} {status}: {details}"),
            None => format!("{id} {status}"),
        },
    }
}

fn report(file: &Value) -> Option<ValidationReport> {
    serde_json::from_value(file["validation"].clone()).ok()
}

async fn list(server: &Server, purpose: Option<String>, limit: u32) -> anyhow::Result<()> {
    if limit == 0 {
        anyhow::bail!("--limit must be at least 1");
    }
    let mut query = vec![("limit", limit.min(10_000).to_string())];
    if let Some(p) = purpose {
        query.push(("purpose", p));
    }
    let page = server.get(&["v1", "files"], &query).await?;
    if server.json {
        return server.print_json(&page);
    }
    let files = page["data"].as_array().cloned().unwrap_or_default();
    if files.is_empty() {
        eprintln!("no files");
        return Ok(());
    }
    let mut t = Table::new(&[
        "ID", "PURPOSE", "STATUS", "SIZE", "CREATED", "FORMAT", "EXAMPLES", "FILENAME",
    ]);
    for f in &files {
        let v = &f["validation"];
        t.row(vec![
            table::text(&f["id"]),
            table::text(&f["purpose"]),
            table::text(&f["status"]),
            table::bytes(&f["bytes"]),
            table::time(&f["created_at"]),
            table::text(&v["format"]),
            table::text(&v["examples"]),
            table::text(&f["filename"]),
        ]);
    }
    t.print();
    if page["has_more"] == json!(true) {
        eprintln!("(more files: raise --limit)");
    }
    Ok(())
}

fn print_file(file: &Value) {
    let v = &file["validation"];
    let labels = v["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(l, n)| format!("{l}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    table::print_fields(&[
        ("id", table::text(&file["id"])),
        ("filename", table::text(&file["filename"])),
        ("purpose", table::text(&file["purpose"])),
        ("status", table::text(&file["status"])),
        ("size", table::bytes(&file["bytes"])),
        ("created", table::time(&file["created_at"])),
        ("sha256", table::optional(&file["sha256"])),
        ("format", table::optional(&v["format"])),
        ("examples", table::optional(&v["examples"])),
        ("labels", labels),
        ("details", table::optional(&file["status_details"])),
    ]);
    if let Some(r) = report(file).filter(|r| !r.problems.is_empty()) {
        println!("problems ({}):", r.total_problems);
        for p in &r.problems {
            println!("  {p}");
        }
    }
}
