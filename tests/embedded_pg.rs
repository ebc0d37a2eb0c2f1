//! Specifications of the embedded PostgreSQL cluster, run against real PostgreSQL processes.
//! Each test gets its own data directory under the system temp dir (which the `postgres` user
//! must be able to reach when the tests run as root).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::embedded_pg::{
    BinarySearch, EmbeddedPgError, EmbeddedPostgres, find_binaries, versioned_bin_dirs,
};
use sqlx::{Connection, PgConnection};

/// A fresh directory, removed when the test ends.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-pg-test-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TestDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the `postgres` user, via `id` (independent of the code under test).
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// Exit code of `pg_ctl status` on `data` (0 running, 3 stopped), run as `postgres` when root
/// because pg_ctl refuses to run as root.
fn pg_ctl_status(data: &Path) -> i32 {
    let bin = find_binaries(&BinarySearch::from_environment()).unwrap();
    let mut cmd = std::process::Command::new(bin.pg_ctl());
    cmd.arg("status").arg("-D").arg(data).current_dir("/");
    if is_root() {
        let (uid, gid) = postgres_ids();
        cmd.uid(uid).gid(gid);
    }
    cmd.output().unwrap().status.code().unwrap()
}

async fn select_one(url: &str) -> i32 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    one
}

fn postmaster_pid(data: &Path) -> i32 {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

fn process_exists(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test]
async fn start_serves_the_kiln_database_and_stop_stops_it() {
    let dir = TestDir::new("basic");
    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    assert!(pg.owns_server());
    assert!(pg.url().starts_with("postgres://kiln:"));
    assert!(pg.url().contains(&format!("@127.0.0.1:{}/kiln", pg.port())));
    assert_eq!(select_one(pg.url()).await, 1);

    let mut conn = PgConnection::connect(pg.url()).await.unwrap();
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(db, "kiln");
    conn.close().await.unwrap();

    let data = pg.data_dir().to_path_buf();
    assert_eq!(pg_ctl_status(&data), 0);
    pg.stop().await.unwrap();
    assert_eq!(pg_ctl_status(&data), 3, "pg_ctl status should say stopped");
}

#[tokio::test]
async fn cluster_files_have_the_right_owners_and_modes() {
    let dir = TestDir::new("modes");
    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    let password = std::fs::metadata(dir.path().join("pg/password")).unwrap();
    assert_eq!(password.mode() & 0o777, 0o600);
    assert_eq!(password.uid(), unsafe { libc::geteuid() });
    let data = std::fs::metadata(pg.data_dir()).unwrap();
    let expected_owner = if is_root() {
        postgres_ids().0
    } else {
        unsafe { libc::geteuid() }
    };
    assert_eq!(data.uid(), expected_owner);
    assert!(dir.path().join("pg/postgres.log").exists());
    assert!(!dir.path().join("pg/initdb-pwfile").exists());
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn restart_reuses_the_cluster_and_keeps_data() {
    let dir = TestDir::new("restart");
    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    let mut conn = PgConnection::connect(pg.url()).await.unwrap();
    sqlx::query("CREATE TABLE survivors (name text)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO survivors VALUES ('first run')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    pg.stop().await.unwrap();

    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    let mut conn = PgConnection::connect(pg.url()).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT name FROM survivors")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "first run");
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_process_attaches_without_owning_the_server() {
    let dir = TestDir::new("attach");
    let owner = EmbeddedPostgres::start(dir.path()).await.unwrap();

    let attached = EmbeddedPostgres::connect_existing_or_start(dir.path())
        .await
        .unwrap();
    assert!(!attached.owns_server());
    assert_eq!(attached.port(), owner.port());
    assert_eq!(attached.url(), owner.url());
    assert_eq!(select_one(attached.url()).await, 1);
    drop(attached);
    assert_eq!(pg_ctl_status(owner.data_dir()), 0);
    assert_eq!(select_one(owner.url()).await, 1);

    // stop() on an attached handle leaves the server running too.
    let attached = EmbeddedPostgres::connect_existing(dir.path())
        .await
        .unwrap()
        .expect("the server is running");
    attached.stop().await.unwrap();
    assert_eq!(select_one(owner.url()).await, 1);

    match EmbeddedPostgres::start(dir.path()).await {
        Err(EmbeddedPgError::AlreadyRunning { port, .. }) => {
            assert_eq!(port, Some(owner.port()))
        }
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    owner.stop().await.unwrap();
    assert!(
        EmbeddedPostgres::connect_existing(dir.path())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn connect_existing_or_start_starts_when_nothing_runs() {
    let dir = TestDir::new("or-start");
    let pg = EmbeddedPostgres::connect_existing_or_start(dir.path())
        .await
        .unwrap();
    assert!(pg.owns_server());
    assert_eq!(select_one(pg.url()).await, 1);
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn dropping_an_owning_handle_stops_the_server() {
    let dir = TestDir::new("drop");
    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    let data = pg.data_dir().to_path_buf();
    drop(pg);
    assert_eq!(pg_ctl_status(&data), 3);
}

#[tokio::test]
async fn start_succeeds_after_the_postmaster_was_killed() {
    let dir = TestDir::new("kill9");
    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    let data = pg.data_dir().to_path_buf();
    let pid = postmaster_pid(&data);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    for _ in 0..100 {
        if !process_exists(pid) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!process_exists(pid), "postmaster {pid} did not go away");
    // The crash left a stale postmaster.pid behind.
    assert!(data.join("postmaster.pid").exists());
    // Dropping the handle tries pg_ctl stop, which cannot help with a dead server.
    drop(pg);
    assert!(data.join("postmaster.pid").exists());

    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    assert!(pg.owns_server());
    assert_eq!(select_one(pg.url()).await, 1);
    pg.stop().await.unwrap();
    assert_eq!(pg_ctl_status(&data), 3);
}

#[tokio::test]
async fn an_unreachable_data_dir_is_reported_before_initdb() {
    if !is_root() {
        eprintln!("skipped: only meaningful when the tests run as root");
        return;
    }
    let dir = TestDir::new("private");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data_dir = dir.path().join("kiln");
    let err = EmbeddedPostgres::start(&data_dir).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, EmbeddedPgError::DataDirUnreachable { .. }),
        "{message}"
    );
    assert!(message.contains("KILN_DATA_DIR"), "{message}");
    assert!(message.contains("DATABASE_URL"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(!data_dir.join("pg/data").exists());
}

#[test]
fn missing_binaries_say_how_to_proceed() {
    let empty = TestDir::new("empty-bin");
    let search = BinarySearch {
        override_dir: Some(empty.path().to_path_buf()),
        path_dirs: Vec::new(),
        versioned_dirs: Vec::new(),
    };
    let err = find_binaries(&search).unwrap_err();
    assert!(matches!(err, EmbeddedPgError::NotInstalled { .. }));
    let message = err.to_string();
    for hint in [
        "apt-get install postgresql",
        "dnf install postgresql-server",
        "brew install postgresql",
        "DATABASE_URL",
        "docker compose up",
        "KILN_PG_BIN",
    ] {
        assert!(message.contains(hint), "missing {hint:?} in: {message}");
    }

    let search = BinarySearch {
        override_dir: None,
        path_dirs: vec![empty.path().to_path_buf()],
        versioned_dirs: Vec::new(),
    };
    assert!(matches!(
        find_binaries(&search),
        Err(EmbeddedPgError::NotInstalled { .. })
    ));
}

/// Makes `dir/<name>` executable stubs for each name.
fn fake_install(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for name in names {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn binaries_come_from_the_override_then_path_then_versioned_dirs() {
    let root = TestDir::new("discovery");
    let all = ["initdb", "pg_ctl", "postgres"];
    let partial = root.path().join("partial");
    fake_install(&partial, &["pg_ctl", "postgres"]);
    let on_path = root.path().join("on-path");
    fake_install(&on_path, &all);
    let versioned = root.path().join("versioned");
    fake_install(&versioned, &all);

    // A directory with only some of the tools is skipped.
    let search = BinarySearch {
        override_dir: None,
        path_dirs: vec![partial.clone(), on_path.clone()],
        versioned_dirs: vec![versioned.clone()],
    };
    assert_eq!(find_binaries(&search).unwrap().dir, on_path);

    let search = BinarySearch {
        override_dir: None,
        path_dirs: vec![partial.clone()],
        versioned_dirs: vec![versioned.clone()],
    };
    assert_eq!(find_binaries(&search).unwrap().dir, versioned);

    let search = BinarySearch {
        override_dir: Some(versioned.clone()),
        path_dirs: vec![on_path.clone()],
        versioned_dirs: Vec::new(),
    };
    assert_eq!(find_binaries(&search).unwrap().dir, versioned);

    // An override without the tools does not fall back to PATH.
    let search = BinarySearch {
        override_dir: Some(partial),
        path_dirs: vec![on_path],
        versioned_dirs: Vec::new(),
    };
    assert!(find_binaries(&search).is_err());
}

#[test]
fn versioned_installs_are_ordered_highest_first() {
    let root = TestDir::new("versions");
    for version in ["9.6", "13", "16", "notes"] {
        std::fs::create_dir_all(root.path().join(version).join("bin")).unwrap();
    }
    std::fs::create_dir_all(root.path().join("17")).unwrap(); // no bin/: not an install
    let dirs = versioned_bin_dirs(root.path(), "");
    let expected: Vec<PathBuf> = ["16", "13", "9.6"]
        .iter()
        .map(|v| root.path().join(v).join("bin"))
        .collect();
    assert_eq!(dirs, expected);

    let rpm = TestDir::new("rpm");
    for name in ["pgsql-15", "pgsql-16", "other"] {
        std::fs::create_dir_all(rpm.path().join(name).join("bin")).unwrap();
    }
    assert_eq!(
        versioned_bin_dirs(rpm.path(), "pgsql-"),
        vec![
            rpm.path().join("pgsql-16/bin"),
            rpm.path().join("pgsql-15/bin")
        ]
    );
}

/// Env var telling [`helper_start_and_exit_without_stopping`] which data dir to use.
const HELPER_DIR_ENV: &str = "KILN_PG_TEST_ORPHAN_DIR";

/// Not a test: run by `a_server_orphaned_by_a_dead_kiln_is_adopted` in a child process, it
/// starts the server and exits without stopping it, as a crashed `kiln serve` would.
#[tokio::test]
#[ignore]
async fn helper_start_and_exit_without_stopping() {
    let Some(dir) = std::env::var_os(HELPER_DIR_ENV) else {
        return;
    };
    let pg = EmbeddedPostgres::start(Path::new(&dir)).await.unwrap();
    println!("ORPHAN_PORT={}", pg.port());
    std::mem::forget(pg);
}

#[tokio::test]
async fn a_server_orphaned_by_a_dead_kiln_is_adopted() {
    let dir = TestDir::new("orphan");
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "helper_start_and_exit_without_stopping",
            "--nocapture",
        ])
        .env(HELPER_DIR_ENV, dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helper failed: {stdout}");
    let port: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ORPHAN_PORT="))
        .expect("helper printed its port")
        .parse()
        .unwrap();

    // A short-lived command attaches without taking it over...
    let attached = EmbeddedPostgres::connect_existing_or_start(dir.path())
        .await
        .unwrap();
    assert!(!attached.owns_server());
    assert_eq!(attached.port(), port);
    drop(attached);

    // ...while the next `kiln serve` adopts it, and so stops it at the end.
    let pg = EmbeddedPostgres::start(dir.path()).await.unwrap();
    assert!(pg.owns_server());
    assert_eq!(pg.port(), port);
    assert_eq!(select_one(pg.url()).await, 1);
    let data = pg.data_dir().to_path_buf();
    pg.stop().await.unwrap();
    assert_eq!(pg_ctl_status(&data), 3);
}
