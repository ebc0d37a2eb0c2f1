//! No Docker engine runs here, so the Docker files are checked by reading them: the build
//! stage copies everything the crate needs to compile (the manifest's bench targets, the
//! files `include_str!`/`include_bytes!`/`sqlx::migrate!` embed), every `COPY` source exists,
//! and docker-compose.yml wires kiln to its PostgreSQL with volumes for data and models.

use std::collections::BTreeSet;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The sources of the build stage's `COPY` lines (not `COPY --from=...`).
fn copied(dockerfile: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stage = 0;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stage += 1;
        }
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if stage != 1 || rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            out.insert(
                src.trim_end_matches('/')
                    .trim_start_matches("./")
                    .to_owned(),
            );
        }
    }
    out
}

/// Top-level paths of the repository the build needs: `src`, `Cargo.toml`, `Cargo.lock`,
/// the manifest's explicit targets, and whatever the sources embed at compile time.
fn needed() -> BTreeSet<String> {
    let mut out: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let manifest = read("Cargo.toml");
    let mut section = String::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_owned();
        }
        if section == "[[bench]]" && line.starts_with("name") {
            out.insert("benches".into());
        }
    }
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for mac in ["include_str!(\"", "include_bytes!(\"", "migrate!(\""] {
                for piece in text.split(mac).skip(1) {
                    let rel = &piece[..piece.find('"').unwrap()];
                    // Relative to the file (include_*) or to the manifest (migrate!).
                    let base = if mac == "migrate!(\"" {
                        Path::new(ROOT).to_owned()
                    } else {
                        path.parent().unwrap().to_owned()
                    };
                    let full = base.join(rel).canonicalize().unwrap_or_else(|e| {
                        panic!("{} embeds {rel}, which is missing: {e}", path.display())
                    });
                    let top = full
                        .strip_prefix(ROOT)
                        .unwrap()
                        .components()
                        .next()
                        .unwrap();
                    out.insert(top.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
    }
    walk(&Path::new(ROOT).join("src"), &mut out);
    out
}

#[test]
fn the_build_stage_copies_everything_the_crate_compiles_from() {
    let copied = copied(&read("Dockerfile"));
    let needed = needed();
    assert!(
        needed.contains("migrations") && needed.contains("web"),
        "{needed:?}"
    );
    let missing: Vec<_> = needed.difference(&copied).collect();
    assert!(
        missing.is_empty(),
        "the Dockerfile's build stage does not copy {missing:?}"
    );
    for src in &copied {
        assert!(
            Path::new(ROOT).join(src).exists(),
            "COPY {src}: no such path"
        );
    }
}

#[test]
fn the_runtime_image_runs_kiln_serve_with_a_data_volume_and_a_health_check() {
    let dockerfile = read("Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "a build stage and a runtime stage");
    for expected in [
        "COPY --from=build /src/target/release/kiln /usr/local/bin/kiln",
        "ENTRYPOINT [\"kiln\"]",
        "CMD [\"serve\"]",
        "KILN_ADDR=0.0.0.0:8080",
        "VOLUME [\"/var/lib/kiln/data\"]",
        "HEALTHCHECK",
        "/readyz",
        "USER kiln",
    ] {
        assert!(dockerfile.contains(expected), "Dockerfile lacks {expected}");
    }
}

#[test]
fn compose_runs_postgres_and_kiln_with_volumes_for_data_and_models() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("valid YAML");
    let compose = &docs[0];
    let services = &compose["services"];
    let postgres = &services["postgres"];
    let kiln = &services["kiln"];
    assert!(postgres["image"].as_str().unwrap().starts_with("postgres:"));
    assert!(!postgres["healthcheck"].is_badvalue());
    assert_eq!(kiln["build"].as_str(), Some("."));
    assert_eq!(
        kiln["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    let env = &kiln["environment"];
    let url = env["DATABASE_URL"].as_str().unwrap();
    assert!(url.contains("@postgres:5432/"), "{url}");
    // The credentials in the URL are the ones the postgres service is created with.
    let pg = &postgres["environment"];
    for key in ["POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"] {
        assert!(
            url.contains(pg[key].as_str().unwrap()),
            "{key} not in {url}"
        );
    }
    assert_eq!(env["KILN_ADDR"].as_str(), Some("0.0.0.0:8080"));
    let mounts: Vec<&str> = kiln["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let data_dir = env["KILN_DATA_DIR"].as_str().unwrap();
    assert!(
        mounts.iter().any(|m| m.ends_with(&format!(":{data_dir}"))),
        "{mounts:?}"
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.contains(&format!("{data_dir}/models"))),
        "a models volume: {mounts:?}"
    );
    // Named volumes are declared.
    for m in &mounts {
        let name = m.split(':').next().unwrap();
        if !name.starts_with('.') && !name.starts_with('/') {
            assert!(
                !compose["volumes"][name].is_badvalue(),
                "volume {name} undeclared"
            );
        }
    }
    assert!(
        kiln["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some("8080:8080"))
    );
}
