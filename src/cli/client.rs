//! The command-line client: `kiln files|jobs|models|classify|embed|chat` talk to a kiln
//! server over its HTTP API, by URL (`KILN_URL`) and key (`KILN_API_KEY`).
//!
//! Every command prints a human-readable table or summary, or with `--json` the server's
//! own JSON (for scripts). Failures print `error: ...` on stderr and exit with status 1:
//! the server's OpenAI-shaped error as `message (param: x, code: y)`, or what kept the
//! request from reaching the server.

mod files;
mod inference;
mod jobs;
mod models;
mod table;
mod watch;

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use reqwest::{Method, RequestBuilder, Url};
use serde_json::Value;

pub use files::FilesCommand;
pub use inference::{ChatArgs, ClassifyArgs, EmbedArgs};
pub use jobs::JobsCommand;
pub use models::{ModelsGetArgs, ModelsListArgs, ModelsRmArgs};

/// Where the server is and how to talk to it; every client command takes these.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The kiln server.
    #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key (`kiln keys create`, or the admin key `kiln serve` printed on its first start).
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON instead of a table, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// A client command, ready to run.
#[derive(Debug)]
pub enum Request {
    Files(FilesCommand),
    Jobs(JobsCommand),
    ModelsList(ModelsListArgs),
    ModelsGet(ModelsGetArgs),
    ModelsRm(ModelsRmArgs),
    Classify(ClassifyArgs),
    Embed(EmbedArgs),
    Chat(ChatArgs),
}

/// Runs a client command; returns the process exit status (errors are printed here).
pub async fn run(request: Request) -> i32 {
    let result = match request {
        Request::Files(command) => files::run(command).await,
        Request::Jobs(command) => jobs::run(command).await,
        Request::ModelsList(args) => models::list(args).await,
        Request::ModelsGet(args) => models::get(args).await,
        Request::ModelsRm(args) => models::remove(args).await,
        Request::Classify(args) => inference::classify(args).await,
        Request::Embed(args) => inference::embed(args).await,
        Request::Chat(args) => inference::chat(args).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = e.downcast_ref::<ServerError>().and_then(ServerError::hint) {
                eprintln!("hint: {hint}");
            }
            1
        }
    }
}

/// An error answer from the server: OpenAI's `{"error": {"message", "type", "param",
/// "code"}}`, or a status with whatever body came (a proxy's page, say).
#[derive(Debug)]
pub struct ServerError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ServerError {
    fn from_body(status: reqwest::StatusCode, body: &[u8]) -> ServerError {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let error = parsed.as_ref().map(|v| &v["error"]);
        let text = |field: &str| {
            error
                .and_then(|e| e[field].as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let message = text("message").unwrap_or_else(|| {
            let body = String::from_utf8_lossy(body);
            let body = body.trim();
            let reason = status.canonical_reason().unwrap_or("error");
            if body.is_empty() {
                format!("HTTP {} {reason}", status.as_u16())
            } else {
                let snippet: String = body.chars().take(300).collect();
                format!("HTTP {} {reason}: {snippet}", status.as_u16())
            }
        });
        ServerError {
            status: status.as_u16(),
            message,
            param: text("param"),
            code: text("code"),
        }
    }

    /// What to do about it, where the message alone does not say.
    fn hint(&self) -> Option<String> {
        match (self.status, self.code.as_deref()) {
            (401, _) => Some(
                "pass a valid key with --api-key or KILN_API_KEY (`kiln keys create --project NAME` makes one)"
                    .into(),
            ),
            (404, Some("unknown_route")) => Some(
                "this kiln server does not have that route yet (it may be older than this client)"
                    .into(),
            ),
            _ => None,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match (&self.param, &self.code) {
            (Some(p), Some(c)) => write!(f, " (param: {p}, code: {c})"),
            (Some(p), None) => write!(f, " (param: {p})"),
            (None, Some(c)) => write!(f, " (code: {c})"),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for ServerError {}

/// A connection to one kiln server with one key.
pub struct Server {
    http: reqwest::Client,
    base: Url,
    key: String,
    /// `--json`: print the server's JSON.
    pub json: bool,
}

impl Server {
    pub fn connect(args: &ServerArgs) -> anyhow::Result<Server> {
        let base = parse_base_url(&args.url)?;
        let key = args
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no API key: set KILN_API_KEY or pass --api-key (`kiln keys create --project NAME` makes one; \
                     `kiln serve` prints an admin key on its first start)"
                )
            })?
            .to_owned();
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("setting up the HTTP client")?;
        Ok(Server {
            http,
            base,
            key,
            json: args.json,
        })
    }

    /// The URL of a route given as path segments; each segment is percent-encoded on its
    /// own, so an id with `/` or `?` stays one segment.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    pub fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.http
            .request(method, self.url(segments))
            .bearer_auth(&self.key)
    }

    /// Sends a request and returns the server's JSON answer, or the error it reported.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Value> {
        let response = self.respond(request).await?;
        let url = response.url().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        serde_json::from_slice(&body).with_context(|| {
            format!("the server at {url} did not answer with JSON: is KILN_URL pointing at kiln?")
        })
    }

    /// Sends a request and returns the response if its status is a success.
    pub async fn respond(&self, request: RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(ServerError::from_body(status, &body).into())
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.send(self.request(Method::GET, segments).query(query))
            .await
    }

    pub async fn post(&self, segments: &[&str], body: &Value) -> anyhow::Result<Value> {
        self.send(self.request(Method::POST, segments).json(body))
            .await
    }

    /// A POST with no body (cancel, pause, resume), sent as OpenAI's client sends it.
    pub async fn post_empty(&self, segments: &[&str]) -> anyhow::Result<Value> {
        self.send(
            self.request(Method::POST, segments)
                .header(reqwest::header::CONTENT_TYPE, "application/json"),
        )
        .await
    }

    pub async fn delete(&self, segments: &[&str]) -> anyhow::Result<Value> {
        self.send(self.request(Method::DELETE, segments)).await
    }

    /// A failure to talk to the server at all, said plainly.
    fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let cause = root_cause(e);
        if e.is_connect() {
            anyhow::anyhow!("cannot reach kiln at {}: {cause}", self.base)
        } else if e.is_timeout() {
            anyhow::anyhow!("kiln at {} did not answer in time: {cause}", self.base)
        } else {
            anyhow::anyhow!("request to kiln at {} failed: {cause}", self.base)
        }
    }

    /// Prints a value as pretty JSON on stdout.
    pub fn print_json(&self, value: &Value) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }
}

/// An id given on the command line, checked before it becomes a path segment (`.` and
/// `..` would be dropped from the URL and name another route).
pub fn check_id<'a>(what: &str, id: &'a str) -> anyhow::Result<&'a str> {
    let id = id.trim();
    if id.is_empty() || id == "." || id == ".." {
        anyhow::bail!("'{id}' is not a {what} id");
    }
    Ok(id)
}

/// `http://host:port`, with or without a trailing `/` or OpenAI's `/v1` (routes add it).
fn parse_base_url(raw: &str) -> anyhow::Result<Url> {
    let trimmed = raw.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let url = Url::parse(trimmed).map_err(|e| {
        anyhow::anyhow!("KILN_URL '{raw}' is not a URL ({e}); expected e.g. http://127.0.0.1:8080")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        anyhow::bail!("KILN_URL '{raw}' must be an http:// or https:// URL");
    }
    Ok(url)
}

/// The innermost cause of an error ("Connection refused (os error 111)"), which says more
/// than reqwest's "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_accept_trailing_slashes_and_v1() {
        for raw in [
            "http://h:8080",
            "http://h:8080/",
            "http://h:8080/v1",
            "http://h:8080/v1/",
        ] {
            assert_eq!(parse_base_url(raw).unwrap().as_str(), "http://h:8080/");
        }
        assert!(parse_base_url("h:8080").is_err());
        assert!(parse_base_url("ftp://h").is_err());
        assert!(parse_base_url("not a url").is_err());
    }

    #[test]
    fn ids_stay_one_path_segment() {
        let server = Server {
            http: reqwest::Client::new(),
            base: parse_base_url("http://h:1/prefix/").unwrap(),
            key: "k".into(),
            json: false,
        };
        assert_eq!(
            server
                .url(&["v1", "models", "ft:org/base:p:s:ftjob-1"])
                .as_str(),
            "http://h:1/prefix/v1/models/ft:org%2Fbase:p:s:ftjob-1"
        );
        assert_eq!(
            server.url(&["v1", "files", "../x?y"]).as_str(),
            "http://h:1/prefix/v1/files/..%2Fx%3Fy"
        );
    }

    #[test]
    fn server_errors_read_as_one_line() {
        let body = br#"{"error":{"message":"No such file: 'x'","type":"invalid_request_error","param":"file_id","code":"not_found"}}"#;
        let e = ServerError::from_body(reqwest::StatusCode::NOT_FOUND, body);
        assert_eq!(
            e.to_string(),
            "No such file: 'x' (param: file_id, code: not_found)"
        );
        let e = ServerError::from_body(reqwest::StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert_eq!(e.to_string(), "HTTP 502 Bad Gateway: <html>oops</html>");
    }
}
