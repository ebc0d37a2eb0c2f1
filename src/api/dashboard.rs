//! The web dashboard: one HTML page, its script, stylesheet and icon, compiled into the
//! binary and served at `/` and `/assets/...` without a key. The page is public; every API
//! call it makes carries the key the user typed, from the browser's session storage.
//!
//! These routes are pages, not API operations, so they live here and not in openapi.yaml.
//! Setting `KILN_DASHBOARD_DIR` to a directory with the same files (`web/` in the repository)
//! serves them from disk, read on every request, so the page can be edited without
//! recompiling.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::error::error_body;

/// Everything the page loads: its own origin only, no inline script or style, no frames.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One file of the dashboard, as compiled in.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    embedded: &'static [u8],
}

const INDEX: &str = "index.html";

const ASSETS: [Asset; 4] = [
    Asset {
        name: INDEX,
        content_type: "text/html; charset=utf-8",
        embedded: include_bytes!("../../web/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        embedded: include_bytes!("../../web/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        embedded: include_bytes!("../../web/app.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        embedded: include_bytes!("../../web/favicon.svg"),
    },
];

/// Where the dashboard's files come from.
#[derive(Clone)]
struct Source {
    /// `KILN_DASHBOARD_DIR`: read from disk on every request (development).
    dir: Option<Arc<PathBuf>>,
}

/// The dashboard's routes, merged into the app's router by [`super::router`].
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let dir = std::env::var_os("KILN_DASHBOARD_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| Arc::new(PathBuf::from(d)));
    if let Some(dir) = &dir {
        tracing::info!(dir = %dir.display(), "serving the dashboard from disk (KILN_DASHBOARD_DIR)");
    }
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .with_state(Source { dir })
}

async fn index(State(source): State<Source>, headers: HeaderMap) -> Response {
    serve(&source, INDEX, &headers).await
}

async fn asset(
    State(source): State<Source>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(&source, &name, &headers).await
}

/// Answers with the named file, `304 Not Modified` when the browser's copy is current, or
/// the API's 404 body for a name that is not one of the dashboard's files.
async fn serve(source: &Source, name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return error_body(
            StatusCode::NOT_FOUND,
            &format!("Unknown dashboard asset: {name}"),
            "invalid_request_error",
            None,
            Some("unknown_route"),
        );
    };
    let body: Vec<u8> = match &source.dir {
        None => asset.embedded.to_vec(),
        Some(dir) => match tokio::fs::read(dir.join(asset.name)).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(file = asset.name, error = %e, "KILN_DASHBOARD_DIR: cannot read; serving the embedded copy");
                asset.embedded.to_vec()
            }
        },
    };
    // Revalidate every time (cheap: a 304 has no body), so a new binary's page is never
    // mixed with an old script from the browser's cache.
    let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..12]));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            body,
        )
            .into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::ASSETS;

    #[test]
    fn the_page_names_only_assets_that_are_served() {
        let index = String::from_utf8_lossy(ASSETS[0].embedded);
        for reference in index.split("/assets/").skip(1) {
            let name: String = reference
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "index.html loads /assets/{name}, which is not served"
            );
        }
        assert!(!index.contains("http://") && !index.contains("https://"));
    }
}
