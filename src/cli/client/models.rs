//! `kiln models list|get|rm` against a server (`kiln models list --local` and `kiln models
//! pull` work on the local models directory instead; see `cli.rs`).

use clap::Args;
use serde_json::Value;

use super::table::{self, Table};
use super::{Server, ServerArgs, check_id};

#[derive(Debug, Args)]
pub struct ModelsListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ModelsGetArgs {
    /// A base model id (`org/name`), a fine-tuned `ft:` id or a checkpoint's.
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ModelsRmArgs {
    /// A fine-tuned model's `ft:` id.
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn list(args: ModelsListArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let page = server.get(&["v1", "models"], &[]).await?;
    if server.json {
        return server.print_json(&page);
    }
    let models = page["data"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        eprintln!("no models");
        return Ok(());
    }
    let mut t = Table::new(&["ID", "KIND", "TASK", "LOADED", "CREATED", "DETAILS"]);
    for m in &models {
        t.row(vec![
            table::text(&m["id"]),
            table::text(&m["kind"]),
            table::text(&m["task"]),
            if m["loaded"] == Value::Bool(true) {
                "yes"
            } else {
                "no"
            }
            .to_owned(),
            table::time(&m["created"]),
            details(m),
        ]);
    }
    t.print();
    Ok(())
}

/// What sets a model apart in a list: size and architecture for a base model, labels and
/// the selected metrics for a fine-tuned one.
fn details(m: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(arch) = m["architecture"].as_str() {
        parts.push(arch.to_owned());
    }
    if let Some(p) = m["parameters"].as_f64() {
        parts.push(format!("{:.1}M parameters", p / 1e6));
    }
    if let Some(labels) = m["labels"].as_array().filter(|l| !l.is_empty()) {
        let names: Vec<String> = labels.iter().map(table::text).collect();
        parts.push(format!("labels {}", names.join(",")));
    }
    for key in ["valid_accuracy", "valid_macro_f1", "valid_loss"] {
        if let Some(x) = m["metrics"][key].as_f64() {
            parts.push(format!("{key} {x:.4}"));
            break;
        }
    }
    parts.join("  ")
}

pub async fn get(args: ModelsGetArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let m = server
        .get(&["v1", "models", check_id("model", &args.id)?], &[])
        .await?;
    if server.json {
        return server.print_json(&m);
    }
    let labels = m["labels"]
        .as_array()
        .map(|l| l.iter().map(table::text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let metrics = m["metrics"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| format!("{k}={x:.4}")))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    table::print_fields(&[
        ("id", table::text(&m["id"])),
        ("kind", table::optional(&m["kind"])),
        ("task", table::optional(&m["task"])),
        ("base", table::optional(&m["base"])),
        ("job", table::optional(&m["job"])),
        ("architecture", table::optional(&m["architecture"])),
        ("parameters", table::optional(&m["parameters"])),
        ("labels", labels),
        ("metrics", metrics),
        ("loaded", table::optional(&m["loaded"])),
        ("created", table::time(&m["created"])),
    ]);
    Ok(())
}

pub async fn remove(args: ModelsRmArgs) -> anyhow::Result<()> {
    let server = Server::connect(&args.server)?;
    let deleted = server
        .delete(&["v1", "models", check_id("model", &args.id)?])
        .await?;
    if server.json {
        return server.print_json(&deleted);
    }
    println!("deleted {}", table::text(&deleted["id"]));
    Ok(())
}
