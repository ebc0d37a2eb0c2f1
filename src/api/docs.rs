//! `/docs`: the API reference rendered from openapi.yaml (embedded at build time) into one
//! self-contained HTML page, on the server: no scripts, no fonts, nothing from the internet.
//! `/openapi.yaml` and `/openapi.json` serve the spec itself.

use std::fmt::Write;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

const SPEC: &str = include_str!("../../openapi.yaml");
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The spec as JSON (numbers, strings, lists and maps: all openapi.yaml uses).
fn spec_json() -> &'static Value {
    static JSON: OnceLock<Value> = OnceLock::new();
    JSON.get_or_init(|| match YamlLoader::load_from_str(SPEC) {
        Ok(docs) => docs.first().map(to_json).unwrap_or(Value::Null),
        Err(e) => {
            tracing::error!(error = %e, "openapi.yaml does not parse");
            Value::Null
        }
    })
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => format!("{other:?}"),
                };
                out.insert(key, to_json(v));
            }
            Value::Object(out)
        }
        _ => Value::Null,
    }
}

/// `GET /openapi.yaml`.
pub async fn yaml() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml; charset=utf-8")],
        SPEC,
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn json() -> Response {
    axum::Json(spec_json().clone()).into_response()
}

/// `GET /docs`.
pub async fn page() -> Response {
    static HTML: OnceLock<String> = OnceLock::new();
    let html = HTML.get_or_init(|| render(spec_json()));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
            ),
        ],
        html.clone(),
    )
        .into_response()
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// Escaped text with `code` spans and paragraphs (the little Markdown the spec uses).
fn prose(text: &str) -> String {
    let mut out = String::new();
    for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
        out.push_str("<p>");
        for (i, part) in esc(para.trim()).split('`').enumerate() {
            if i % 2 == 1 {
                let _ = write!(out, "<code>{part}</code>");
            } else {
                out.push_str(part);
            }
        }
        out.push_str("</p>");
    }
    out
}

fn anchor(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn ref_name(v: &Value) -> Option<&str> {
    v["$ref"].as_str().and_then(|r| r.rsplit('/').next())
}

/// A schema in one line: a type, a link to a named schema, an enum, an array of something.
fn type_of(schema: &Value) -> String {
    if let Some(name) = ref_name(schema) {
        return format!("<a href=\"#schema-{}\">{}</a>", anchor(name), esc(name));
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all.iter().map(type_of).collect::<Vec<_>>().join(" &amp; ");
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(any) = schema[key].as_array() {
            return any.iter().map(type_of).collect::<Vec<_>>().join(" | ");
        }
    }
    let mut t = match schema["type"].as_str() {
        Some("array") => format!("array of {}", type_of(&schema["items"])),
        Some(t) => esc(t),
        None if schema.get("properties").is_some() => "object".into(),
        None => "any".into(),
    };
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .map(|v| format!("<code>{}</code>", esc(&v.to_string().replace('"', ""))))
            .collect();
        let _ = write!(t, " — one of {}", values.join(", "));
    }
    if schema["nullable"] == Value::Bool(true) {
        t.push_str(" or null");
    }
    t
}

/// The properties of an object schema as a table (nested objects one level down).
fn properties(schema: &Value, out: &mut String) {
    let Some(props) = schema["properties"].as_object() else {
        if let Some(all) = schema["allOf"].as_array() {
            for part in all {
                if ref_name(part).is_some() {
                    let _ = write!(
                        out,
                        "<p class=\"muted\">Everything in {}, and:</p>",
                        type_of(part)
                    );
                } else {
                    properties(part, out);
                }
            }
        } else {
            let _ = write!(out, "<p class=\"muted\">{}</p>", type_of(schema));
        }
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str(
        "<table><thead><tr><th>Field</th><th>Type</th><th>Description</th></tr></thead><tbody>",
    );
    for (name, prop) in props {
        let req = if required.contains(&name.as_str()) {
            " <span class=\"req\">required</span>"
        } else {
            ""
        };
        let mut desc = prose(prop["description"].as_str().unwrap_or(""));
        if let Some(d) = prop.get("default") {
            let _ = write!(
                desc,
                "<p class=\"muted\">Default <code>{}</code></p>",
                esc(&d.to_string())
            );
        }
        let _ = write!(
            out,
            "<tr><td><code>{}</code>{req}</td><td>{}</td><td>{desc}</td></tr>",
            esc(name),
            type_of(prop)
        );
    }
    out.push_str("</tbody></table>");
}

fn operation(path: &str, method: &str, op: &Value, shared_params: &Value, out: &mut String) {
    let id = op["operationId"].as_str().unwrap_or(path);
    let _ = write!(
        out,
        "<section class=\"op\" id=\"op-{}\"><h3><span class=\"method {method}\">{}</span> <code>{}</code></h3>",
        anchor(id),
        method.to_uppercase(),
        esc(path)
    );
    let _ = write!(
        out,
        "<p class=\"summary\">{}</p>",
        esc(op["summary"].as_str().unwrap_or(""))
    );
    if let Some(d) = op["description"].as_str() {
        out.push_str(&prose(d));
    }
    if op["security"].as_array().is_some_and(Vec::is_empty) {
        out.push_str("<p class=\"muted\">No API key needed.</p>");
    }
    let params: Vec<&Value> = shared_params
        .as_array()
        .into_iter()
        .flatten()
        .chain(op["parameters"].as_array().into_iter().flatten())
        .collect();
    if !params.is_empty() {
        out.push_str("<h4>Parameters</h4><table><thead><tr><th>Name</th><th>In</th><th>Type</th><th>Description</th></tr></thead><tbody>");
        for p in params {
            let req = if p["required"] == Value::Bool(true) {
                " <span class=\"req\">required</span>"
            } else {
                ""
            };
            let _ = write!(
                out,
                "<tr><td><code>{}</code>{req}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(p["name"].as_str().unwrap_or("")),
                esc(p["in"].as_str().unwrap_or("")),
                type_of(&p["schema"]),
                prose(p["description"].as_str().unwrap_or(""))
            );
        }
        out.push_str("</tbody></table>");
    }
    if let Some(content) = op["requestBody"]["content"].as_object() {
        for (mime, body) in content {
            let _ = write!(
                out,
                "<h4>Request body <span class=\"muted\">{}</span></h4>",
                esc(mime)
            );
            properties(&body["schema"], out);
        }
    }
    if let Some(responses) = op["responses"].as_object() {
        out.push_str("<h4>Responses</h4><table><tbody>");
        for (code, r) in responses {
            let (desc, schema) = match ref_name(r) {
                Some(name) => (format!("see {}", esc(name)), String::new()),
                None => (
                    esc(r["description"].as_str().unwrap_or("")),
                    r["content"]
                        .as_object()
                        .and_then(|c| c.values().next())
                        .map(|c| type_of(&c["schema"]))
                        .unwrap_or_default(),
                ),
            };
            let class = if code.starts_with('2') { "ok" } else { "err" };
            let _ = write!(
                out,
                "<tr><td><span class=\"code {class}\">{}</span></td><td>{desc}</td><td>{schema}</td></tr>",
                esc(code)
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");
}

fn render(spec: &Value) -> String {
    let title = spec["info"]["title"].as_str().unwrap_or("kiln");
    let version = spec["info"]["version"].as_str().unwrap_or("");
    let mut nav = String::new();
    let mut body = String::new();
    // Operations grouped by their first tag, in the order tags are declared.
    let mut tags: Vec<String> = spec["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let empty = Map::new();
    let paths = spec["paths"].as_object().unwrap_or(&empty);
    for item in paths.values() {
        for m in METHODS {
            if let Some(tag) = item[m]["tags"][0].as_str()
                && !tags.iter().any(|t| t == tag)
            {
                tags.push(tag.to_owned());
            }
        }
    }
    for tag in &tags {
        let _ = write!(
            nav,
            "<h2><a href=\"#tag-{0}\">{1}</a></h2><ul>",
            anchor(tag),
            esc(tag)
        );
        let _ = write!(
            body,
            "<h2 id=\"tag-{}\" class=\"tag\">{}</h2>",
            anchor(tag),
            esc(tag)
        );
        for (path, item) in paths {
            for m in METHODS {
                let op = &item[m];
                if op.is_null() || op["tags"][0].as_str() != Some(tag) {
                    continue;
                }
                let id = op["operationId"].as_str().unwrap_or(path);
                let _ = write!(
                    nav,
                    "<li><a href=\"#op-{}\"><span class=\"method {m}\">{}</span> {}</a></li>",
                    anchor(id),
                    m.to_uppercase(),
                    esc(path)
                );
                operation(path, m, op, &item["parameters"], &mut body);
            }
        }
        nav.push_str("</ul>");
    }
    nav.push_str("<h2><a href=\"#schemas\">schemas</a></h2>");
    let _ = write!(body, "<h2 id=\"schemas\" class=\"tag\">Schemas</h2>");
    if let Some(schemas) = spec["components"]["schemas"].as_object() {
        for (name, schema) in schemas {
            let _ = write!(
                body,
                "<section class=\"op\" id=\"schema-{}\"><h3>{}</h3>{}",
                anchor(name),
                esc(name),
                prose(schema["description"].as_str().unwrap_or(""))
            );
            properties(schema, &mut body);
            body.push_str("</section>");
        }
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} API reference</title><style>{CSS}</style></head><body>\
<nav><p class=\"brand\">{title} <span class=\"muted\">{version}</span></p>\
<p><a href=\"/openapi.yaml\">openapi.yaml</a> · <a href=\"/openapi.json\">json</a></p>{nav}</nav>\
<main><h1>{title} API reference</h1>{intro}{body}</main></body></html>",
        title = esc(title),
        version = esc(version),
        intro = prose(spec["info"]["description"].as_str().unwrap_or("")),
    )
}

const CSS: &str = "
:root{--fg:#1d2330;--muted:#5f6b7a;--line:#e3e7ee;--bg:#fff;--side:#f6f8fb;--accent:#c2410c}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#9aa5b4;--line:#2c3340;--bg:#12161d;--side:#181d25;--accent:#fb923c}}
*{box-sizing:border-box}body{margin:0;font:15px/1.55 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--fg);background:var(--bg);display:flex}
nav{position:sticky;top:0;height:100vh;overflow:auto;width:300px;flex:none;background:var(--side);border-right:1px solid var(--line);padding:18px 16px;font-size:13px}
nav h2{font-size:12px;text-transform:uppercase;letter-spacing:.06em;margin:18px 0 6px}nav ul{list-style:none;margin:0;padding:0}nav li a{display:block;padding:2px 0;color:var(--fg);text-decoration:none;word-break:break-all}
nav a:hover{color:var(--accent)}.brand{font-weight:700;font-size:18px;margin:0 0 4px}
main{padding:28px 40px;max-width:1050px;min-width:0}h1{margin-top:0}h2.tag{text-transform:capitalize;border-bottom:2px solid var(--line);padding-bottom:6px;margin-top:42px}
.op{border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:16px 0}.op h3{margin:0 0 6px;font-size:16px}.summary{font-weight:600;margin:4px 0}
h4{margin:14px 0 6px;font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
table{border-collapse:collapse;width:100%;font-size:13.5px}td,th{border-top:1px solid var(--line);padding:6px 8px;text-align:left;vertical-align:top}th{color:var(--muted);font-weight:600}
td p{margin:0 0 4px}code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace;background:var(--side);padding:1px 4px;border-radius:4px}
.method{display:inline-block;min-width:52px;text-align:center;font:700 11px ui-monospace,monospace;border-radius:4px;padding:2px 5px;color:#fff;background:#64748b}
.method.get{background:#2563eb}.method.post{background:#16a34a}.method.delete{background:#dc2626}.method.patch,.method.put{background:#d97706}
.req{color:var(--accent);font-size:11px;font-weight:600}.muted{color:var(--muted)}.code{font:600 12px ui-monospace,monospace}.code.ok{color:#16a34a}.code.err{color:#dc2626}
a{color:var(--accent)}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_renders_every_operation_and_schema_of_the_spec() {
        let spec = spec_json();
        assert!(spec["paths"].is_object(), "openapi.yaml parses");
        let html = render(spec);
        let mut ops = 0;
        for item in spec["paths"].as_object().unwrap().values() {
            for m in METHODS {
                if let Some(id) = item[m]["operationId"].as_str() {
                    ops += 1;
                    assert!(html.contains(&format!("id=\"op-{}\"", anchor(id))), "{id}");
                }
            }
        }
        assert!(ops > 20, "{ops} operations");
        for name in spec["components"]["schemas"].as_object().unwrap().keys() {
            assert!(
                html.contains(&format!("id=\"schema-{}\"", anchor(name))),
                "{name}"
            );
        }
        // Every in-page link has its target.
        for link in html.split("href=\"#").skip(1) {
            let target = &link[..link.find('"').unwrap()];
            assert!(
                html.contains(&format!("id=\"{target}\"")),
                "dangling #{target}"
            );
        }
        // Self-contained: no scripts, no stylesheets or images from elsewhere.
        assert!(!html.contains("<script"));
        assert!(!html.contains("<link"));
        assert!(!html.contains("src="));
    }
}
