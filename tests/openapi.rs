//! openapi.yaml describes exactly the routes kiln serves: no route without a spec entry,
//! no spec entry without a route, and the same methods on each.

mod common;

use std::collections::BTreeSet;

use common::TestApp;
use yaml_rust2::{Yaml, YamlLoader};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `/v1/files/{file_id}` and `/v1/files/{id}` are the same route.
fn normalise(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

fn spec_operations() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("openapi.yaml parses");
    let paths = docs[0]["paths"].as_hash().expect("paths");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().unwrap();
        for method in METHODS {
            if !matches!(item[method], Yaml::BadValue) {
                ops.insert((method.to_owned(), normalise(path)));
            }
        }
    }
    ops
}

/// Route paths as written in the router (src/api/mod.rs).
fn served_paths() -> BTreeSet<String> {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/mod.rs")).unwrap();
    let mut paths = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let start = rest.find('"').unwrap() + 1;
        let len = rest[start..].find('"').unwrap();
        paths.insert(rest[start..start + len].to_owned());
    }
    assert!(paths.len() >= 5, "found the routes: {paths:?}");
    paths
}

#[tokio::test]
async fn the_spec_and_the_router_describe_the_same_operations() {
    let app = TestApp::spawn().await;
    let mut served = BTreeSet::new();
    for path in served_paths() {
        let concrete = path
            .replace("{id}", "probe-id")
            .replace("{*id}", "probe-id");
        for method in METHODS {
            let res = app
                .client
                .request(method.to_uppercase().parse().unwrap(), app.url(&concrete))
                .bearer_auth(&app.admin_key)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            let unknown = status == 404 && body["error"]["code"] == "unknown_route";
            if status != 405 && !unknown {
                served.insert((method.to_owned(), normalise(&path)));
            }
        }
    }
    let spec = spec_operations();
    let undocumented: Vec<_> = served.difference(&spec).collect();
    let unserved: Vec<_> = spec.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but missing from openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml but not served: {unserved:?}"
    );
    app.shutdown().await;
}
