//! No Docker engine runs here, so the Docker files are checked by reading them: the build
//! stage of each image (Dockerfile for the CPU, Dockerfile.cuda for the GPU) copies everything
//! the crate needs to compile (the manifest's bench targets, the files
//! `include_str!`/`include_bytes!`/`sqlx::migrate!` embed), every `COPY` source exists,
//! docker-compose.yml wires kiln to its PostgreSQL with volumes for data and models, and
//! docker-compose.cuda.yml turns that into the GPU variant.

use std::collections::BTreeSet;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The CPU image and the GPU (`--features cuda`) image.
const DOCKERFILES: [&str; 2] = ["Dockerfile", "Dockerfile.cuda"];

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
/// the build script (it compiles the CUDA build's kernels), the manifest's explicit targets,
/// and whatever the sources embed at compile time.
fn needed() -> BTreeSet<String> {
    let mut out: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if Path::new(ROOT).join("build.rs").exists() {
        out.insert("build.rs".into());
    }
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
    let needed = needed();
    assert!(
        needed.contains("migrations") && needed.contains("web"),
        "{needed:?}"
    );
    for dockerfile in DOCKERFILES {
        let copied = copied(&read(dockerfile));
        let missing: Vec<_> = needed.difference(&copied).collect();
        assert!(
            missing.is_empty(),
            "the build stage of {dockerfile} does not copy {missing:?}"
        );
        for src in &copied {
            assert!(
                Path::new(ROOT).join(src).exists(),
                "{dockerfile}: COPY {src}: no such path"
            );
        }
    }
}

#[test]
fn the_runtime_image_runs_kiln_serve_with_a_data_volume_and_a_health_check() {
    for name in DOCKERFILES {
        let dockerfile = read(name);
        let stages = dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count();
        assert_eq!(stages, 2, "{name}: a build stage and a runtime stage");
        for expected in [
            "COPY --from=build /src/target/release/kiln /usr/local/bin/kiln",
            "ENTRYPOINT [\"kiln\"]",
            "CMD [\"serve\"]",
            "KILN_ADDR=0.0.0.0:8080",
            "KILN_DATA_DIR=/var/lib/kiln/data",
            "VOLUME [\"/var/lib/kiln/data\"]",
            "EXPOSE 8080",
            "HEALTHCHECK",
            "/readyz",
            "USER kiln",
            // The embedded database needs PostgreSQL's binaries.
            "postgresql",
        ] {
            assert!(dockerfile.contains(expected), "{name} lacks {expected}");
        }
        // /dev/tcp is a bash feature: Debian's and Ubuntu's /bin/sh (dash) cannot open it,
        // and a health check run by it would fail forever.
        let check = dockerfile
            .lines()
            .skip_while(|l| !l.starts_with("HEALTHCHECK"))
            .nth(1)
            .unwrap();
        assert!(
            !check.contains("/dev/tcp") || check.contains("\"/bin/bash\""),
            "{name}: {check}"
        );
    }
}

/// Values of the `ARG NAME=default` lines before the first `FROM`.
fn global_args(dockerfile: &str) -> Vec<(String, String)> {
    dockerfile
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("FROM "))
        .filter_map(|l| l.strip_prefix("ARG "))
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The stages' `FROM` lines with the global `ARG` defaults substituted, and each stage's text.
fn stages(dockerfile: &str) -> Vec<(String, String)> {
    let args = global_args(dockerfile);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in dockerfile.lines() {
        if let Some(from) = line.strip_prefix("FROM ") {
            let mut from = from.to_owned();
            for (k, v) in &args {
                from = from.replace(&format!("${{{k}}}"), v);
            }
            out.push((from, String::new()));
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

#[test]
fn the_cuda_image_builds_the_cuda_feature_on_matching_nvidia_images() {
    let dockerfile = read("Dockerfile.cuda");
    let stages = stages(&dockerfile);
    let [(build_from, build), (runtime_from, runtime)] = &stages[..] else {
        panic!("Dockerfile.cuda: two stages, not {}", stages.len());
    };
    // The toolkit in the builder, its runtime libraries (cuBLAS, cuRAND, NVRTC) in the image,
    // of the same CUDA release: 13.0, the newest the R580 driver runs.
    let version = build_from
        .strip_prefix("nvidia/cuda:")
        .and_then(|t| t.strip_suffix("-devel-ubuntu24.04 AS build"))
        .unwrap_or_else(|| panic!("build stage FROM {build_from}"));
    assert!(version.starts_with("13.0."), "CUDA {version}");
    assert_eq!(
        runtime_from,
        &format!("nvidia/cuda:{version}-runtime-ubuntu24.04")
    );
    // Rust from rustup; the GPU architecture from a build argument (no GPU while building).
    assert!(build.contains("sh.rustup.rs"), "{build}");
    assert!(build.contains("ARG CUDA_COMPUTE_CAP=90\n"), "{build}");
    assert!(
        build.contains("CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}"),
        "{build}"
    );
    let cargo = build
        .lines()
        .find(|l| l.starts_with("RUN cargo build"))
        .expect("a RUN cargo build line");
    assert!(
        cargo.contains("--release")
            && cargo.contains("--locked")
            && cargo.contains("--features cuda"),
        "{cargo}"
    );
    assert!(runtime.contains("KILN_DEVICES=cuda"), "{runtime}");
    // And the CPU image stays CPU-only.
    let cpu = read("Dockerfile");
    assert!(!cpu.contains("cuda"), "Dockerfile mentions cuda");
    // The feature the image builds exists.
    assert!(
        read("Cargo.toml").contains("\ncuda = [\"candle-core/cuda\""),
        "Cargo.toml has no cuda feature"
    );
}

#[test]
fn the_cuda_compose_override_builds_the_gpu_image_and_reserves_the_gpus() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.cuda.yml")).expect("valid YAML");
    let base = &YamlLoader::load_from_str(&read("docker-compose.yml")).unwrap()[0];
    let services = docs[0]["services"].as_hash().expect("services");
    // An override: it only changes services docker-compose.yml defines.
    for name in services.keys() {
        let name = name.as_str().unwrap();
        assert!(
            !base["services"][name].is_badvalue(),
            "docker-compose.cuda.yml defines {name}, which docker-compose.yml lacks"
        );
    }
    let kiln = &docs[0]["services"]["kiln"];
    let build = &kiln["build"];
    assert_eq!(build["context"].as_str(), Some("."));
    let dockerfile = build["dockerfile"].as_str().unwrap();
    assert_eq!(dockerfile, "Dockerfile.cuda");
    assert!(Path::new(ROOT).join(dockerfile).exists());
    assert!(
        build["args"]["CUDA_COMPUTE_CAP"]
            .as_str()
            .is_some_and(|v| v.contains("90")),
        "{build:?}"
    );
    // Not the CPU image's tag.
    assert!(kiln["image"].as_str().is_some_and(|i| i.contains("cuda")));
    assert!(
        kiln["environment"]["KILN_DEVICES"]
            .as_str()
            .is_some_and(|v| v.contains("cuda"))
    );
    let devices = kiln["deploy"]["resources"]["reservations"]["devices"]
        .as_vec()
        .expect("deploy.resources.reservations.devices");
    assert!(
        devices
            .iter()
            .any(|d| d["driver"].as_str() == Some("nvidia")
                && d["count"].as_str() == Some("all")
                && d["capabilities"]
                    .as_vec()
                    .is_some_and(|c| c.iter().any(|c| c.as_str() == Some("gpu")))),
        "{devices:?}"
    );
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
