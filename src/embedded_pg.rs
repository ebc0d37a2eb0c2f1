//! A private PostgreSQL cluster for `kiln serve` when no `DATABASE_URL` is given.
//!
//! The cluster lives in `<data_dir>/pg`:
//!
//! ```text
//! <data_dir>/pg/
//!   data/          the cluster itself (PGDATA), owned by the user the server runs as
//!   password       random password of the `kiln` role (0600, owned by the kiln process user)
//!   postgres.log   server log (`pg_ctl -l`)
//!   owner.lock     flock held by the kiln process that owns the running server (holds its pid)
//! ```
//!
//! The server listens on 127.0.0.1 only, on a free port picked at every start, and has no Unix
//! socket. Other kiln processes (e.g. `kiln keys create`) find a running cluster through
//! `data/postmaster.pid`, which records the port, and the password file.
//!
//! The server is detached from kiln (pg_ctl puts it in its own session), so it outlives a
//! crashed kiln. The owning kiln process holds an exclusive `flock` on `owner.lock`, which the
//! kernel releases when that process dies, so the next [`EmbeddedPostgres::start`] can tell such
//! an orphan (adopt it) from a server another live kiln process owns (refuse).
//!
//! PostgreSQL refuses to run as root, so when kiln runs as root the server runs as an
//! unprivileged user (`postgres`, or `KILN_PG_USER`).

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::process::Command;

/// Name of the role created by initdb and used by kiln.
const ROLE: &str = "kiln";
/// Name of the database kiln uses.
const DATABASE: &str = "kiln";
/// Environment variable naming a directory holding `initdb`, `pg_ctl` and `postgres`.
pub const PG_BIN_ENV: &str = "KILN_PG_BIN";
/// Environment variable naming the unprivileged user the server runs as when kiln runs as root.
pub const PG_USER_ENV: &str = "KILN_PG_USER";
/// User the server runs as when kiln runs as root and `KILN_PG_USER` is unset.
const DEFAULT_PG_USER: &str = "postgres";
/// Binaries that must all live in one directory for it to count as a PostgreSQL install.
const REQUIRED_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long to keep retrying the first connection after the server is up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times to try starting when the port we picked was taken in the meantime or the
/// previous (killed) server's processes still hold its shared memory.
const START_ATTEMPTS: usize = 5;
/// Size beyond which `postgres.log` is moved to `postgres.log.1` at start.
const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Lines of `postgres.log` quoted in start errors.
const LOG_TAIL_LINES: usize = 20;
/// Settings appended to `postgresql.conf` right after initdb.
const KILN_SETTINGS: &str = "
# --- added by kiln (embedded PostgreSQL) ---
listen_addresses = '127.0.0.1'
# No Unix socket: avoids socket path length limits and directory permission problems.
unix_socket_directories = ''
shared_buffers = 128MB
fsync = on
password_encryption = 'scram-sha-256'
# The port is chosen by kiln at every start and passed on the command line.
";

/// What to do when the embedded PostgreSQL cluster cannot be used.
const HOW_TO_PROCEED: &str = "To proceed, either: \
install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; \
Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql`) \
and, if its binaries are not on PATH, set KILN_PG_BIN to the directory holding initdb and pg_ctl; \
or set DATABASE_URL to an existing PostgreSQL server; \
or run `docker compose up` to start kiln together with PostgreSQL";

/// Errors from starting, attaching to or stopping the embedded PostgreSQL cluster.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    /// No directory holding `initdb`, `pg_ctl` and `postgres` was found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found; searched {searched}. {HOW_TO_PROCEED}."
    )]
    NotInstalled {
        /// Human-readable list of the places searched.
        searched: String,
    },

    /// kiln runs as root, and the unprivileged user to run PostgreSQL as does not exist.
    #[error(
        "kiln runs as root and PostgreSQL refuses to run as root, so the embedded server runs as the user `{user}`, but no such user exists. Create it (e.g. `useradd --system postgres`, or install the postgresql package which creates it), set KILN_PG_USER to another unprivileged user, or set DATABASE_URL to an existing PostgreSQL server."
    )]
    NoServiceUser {
        /// The user name that was looked up.
        user: String,
    },

    /// kiln runs as root and `KILN_PG_USER` names a user with uid 0.
    #[error(
        "KILN_PG_USER names `{user}`, which has uid 0; PostgreSQL refuses to run as root. Name an unprivileged user instead."
    )]
    ServiceUserIsRoot {
        /// The user name configured.
        user: String,
    },

    /// The user the server runs as cannot reach the cluster directory.
    #[error(
        "the embedded PostgreSQL server runs as the user `{user}`, which cannot reach {path}{hint}. Point KILN_DATA_DIR at a directory that user can reach (e.g. under /var/lib), or set DATABASE_URL to an existing PostgreSQL server."
    )]
    DataDirUnreachable {
        /// The user the server runs as.
        user: String,
        /// The directory it needs.
        path: PathBuf,
        /// Which ancestor blocks it, when that could be worked out.
        hint: String,
    },

    /// The cluster was created by a different major version of PostgreSQL than the binaries found.
    #[error(
        "the PostgreSQL cluster in {data_dir} was created by PostgreSQL {cluster}, but the binaries in {bin_dir} are PostgreSQL {binaries}. Set KILN_PG_BIN to the bin directory of PostgreSQL {cluster} (e.g. /usr/lib/postgresql/{cluster}/bin), or upgrade the cluster with pg_upgrade."
    )]
    VersionMismatch {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// Major version recorded in `PG_VERSION`.
        cluster: String,
        /// Major version reported by `pg_ctl --version`.
        binaries: String,
        /// Directory of the binaries found.
        bin_dir: PathBuf,
    },

    /// `start` was called while another live kiln process owns this cluster.
    #[error("the embedded PostgreSQL cluster in {} is owned by another running kiln process{owner}; stop that process first, or give this one its own data directory", data_dir.display())]
    AlreadyRunning {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// The port its server listens on, if it is up.
        port: Option<u16>,
        /// Who owns it, e.g. " (pid 1234, port 5433)", for the message.
        owner: String,
    },

    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A PostgreSQL command-line tool failed.
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        /// The command line, for the reader.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },

    /// `pg_ctl start` failed; the log tail usually says why.
    #[error("the embedded PostgreSQL server failed to start: {detail}\n--- last lines of {} ---\n{log_tail}", log.display())]
    StartFailed {
        /// What pg_ctl said.
        detail: String,
        /// The server log file.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },

    /// The cluster's bookkeeping files are missing or unreadable.
    #[error("the embedded PostgreSQL cluster in {} is in an unexpected state: {detail}", path.display())]
    BadState {
        /// The file or directory concerned.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// The server is running but kiln could not connect to it or create its database.
    #[error("could not use the embedded PostgreSQL server on 127.0.0.1:{port}: {source}")]
    Database {
        /// The port connected to.
        port: u16,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
}

type Result<T, E = EmbeddedPgError> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedPgError {
    let context = context.into();
    move |source| EmbeddedPgError::Io { context, source }
}

// ---------------------------------------------------------------------------------------------
// Finding the binaries
// ---------------------------------------------------------------------------------------------

/// Where to look for the PostgreSQL server binaries, in order of preference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BinarySearch {
    /// The directory named by `KILN_PG_BIN`; when set it is the only place searched.
    pub override_dir: Option<PathBuf>,
    /// The directories of `PATH`, in order.
    pub path_dirs: Vec<PathBuf>,
    /// Versioned install directories such as `/usr/lib/postgresql/16/bin`, best first.
    pub versioned_dirs: Vec<PathBuf>,
}

impl BinarySearch {
    /// The search kiln uses: `KILN_PG_BIN`, else `PATH`, else the highest version under
    /// `/usr/lib/postgresql/*/bin`, else under `/usr/pgsql-*/bin`.
    pub fn from_environment() -> Self {
        let override_dir = std::env::var_os(PG_BIN_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let mut versioned_dirs = versioned_bin_dirs(Path::new("/usr/lib/postgresql"), "");
        versioned_dirs.extend(versioned_bin_dirs(Path::new("/usr"), "pgsql-"));
        BinarySearch {
            override_dir,
            path_dirs,
            versioned_dirs,
        }
    }
}

/// The `bin` directories of versioned installs under `parent`, highest version first.
///
/// Entries are named `<prefix><version>` (e.g. `/usr/lib/postgresql/15` with an empty prefix, or
/// `/usr/pgsql-16` with prefix `pgsql-`); entries whose version is not numeric are skipped.
pub fn versioned_bin_dirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let version = name.to_str()?.strip_prefix(prefix)?;
            let parsed: Option<Vec<u32>> = version.split('.').map(|p| p.parse().ok()).collect();
            Some((parsed?, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.is_dir())
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, bin)| bin).collect()
}

/// A directory holding `initdb`, `pg_ctl` and `postgres`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// The directory.
    pub dir: PathBuf,
}

impl PgBinaries {
    /// Path of `initdb`.
    pub fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }

    /// Path of `pg_ctl`.
    pub fn pg_ctl(&self) -> PathBuf {
        self.dir.join("pg_ctl")
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn has_server_binaries(dir: &Path) -> bool {
    REQUIRED_BINARIES
        .iter()
        .all(|b| is_executable_file(&dir.join(b)))
}

/// Picks the first directory of `search` that holds all of `initdb`, `pg_ctl` and `postgres`
/// (requiring all three in one place avoids mixing versions).
pub fn find_binaries(search: &BinarySearch) -> Result<PgBinaries> {
    if let Some(dir) = &search.override_dir {
        return if has_server_binaries(dir) {
            Ok(PgBinaries { dir: dir.clone() })
        } else {
            Err(EmbeddedPgError::NotInstalled {
                searched: format!("{} (from {PG_BIN_ENV}) only", dir.display()),
            })
        };
    }
    search
        .path_dirs
        .iter()
        .chain(&search.versioned_dirs)
        .find(|dir| dir.is_absolute() && has_server_binaries(dir))
        .map(|dir| PgBinaries { dir: dir.clone() })
        .ok_or_else(|| EmbeddedPgError::NotInstalled {
            searched: "PATH, /usr/lib/postgresql/*/bin and /usr/pgsql-*/bin".to_string(),
        })
}

// ---------------------------------------------------------------------------------------------
// Running as another user
// ---------------------------------------------------------------------------------------------

/// The unprivileged user the server runs as when kiln runs as root.
#[derive(Debug, Clone)]
struct ServiceUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// Looks up `name` in the user database; `Ok(None)` when there is no such user.
fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: all-zero is a valid bit pattern for `passwd` (integers and null pointers).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is the
        // true length of `buf`; getpwnam_r is the reentrant variant.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if result.is_null() {
            // "Not found" is reported as 0 or as one of these, depending on the libc.
            return match rc {
                0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Ok(None),
                _ => Err(io::Error::from_raw_os_error(rc)),
            };
        }
        return Ok(Some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// `None` when kiln does not run as root (the server then runs as kiln's own user).
async fn resolve_service_user() -> Result<Option<ServiceUser>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::env::var(PG_USER_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_PG_USER.to_string());
    let lookup_name = name.clone();
    // The lookup may go through NSS (LDAP, ...), so keep it off the runtime threads.
    let found = tokio::task::spawn_blocking(move || lookup_user(&lookup_name))
        .await
        .map_err(|e| EmbeddedPgError::Io {
            context: format!("looking up user `{name}`"),
            source: io::Error::other(e),
        })?
        .map_err(io_err(format!("looking up user `{name}`")))?;
    match found {
        None => Err(EmbeddedPgError::NoServiceUser { user: name }),
        Some((0, _)) => Err(EmbeddedPgError::ServiceUserIsRoot { user: name }),
        Some((uid, gid)) => Ok(Some(ServiceUser { name, uid, gid })),
    }
}

/// For the error message: the first ancestor of `path` (inclusive) whose mode bits do not let
/// `user` enter it. Ignores ACLs and supplementary groups, so it is only a hint.
fn first_blocking_dir(path: &Path, user: &ServiceUser) -> Option<PathBuf> {
    let mut dirs: Vec<&Path> = path.ancestors().collect();
    dirs.reverse();
    dirs.into_iter()
        .find(|dir| match std::fs::metadata(dir) {
            Ok(m) => {
                let mode = m.mode();
                let allowed = if m.uid() == user.uid {
                    mode & 0o100 != 0
                } else if m.gid() == user.gid {
                    mode & 0o010 != 0
                } else {
                    mode & 0o001 != 0
                };
                !allowed
            }
            Err(_) => false,
        })
        .map(Path::to_path_buf)
}

// ---------------------------------------------------------------------------------------------
// The cluster on disk
// ---------------------------------------------------------------------------------------------

/// Paths, binaries and credentials of one cluster; shared by the start, attach and stop paths.
#[derive(Debug, Clone)]
struct Cluster {
    /// `<data_dir>/pg`
    root: PathBuf,
    /// `<data_dir>/pg/data`
    data: PathBuf,
    /// `<data_dir>/pg/postgres.log`
    log: PathBuf,
    /// `<data_dir>/pg/password`
    password_file: PathBuf,
    /// `<data_dir>/pg/owner.lock`
    owner_lock_file: PathBuf,
    bin: PgBinaries,
    run_as: Option<ServiceUser>,
}

impl Cluster {
    async fn new(data_dir: &Path) -> Result<Self> {
        let bin = find_binaries(&BinarySearch::from_environment())?;
        let run_as = resolve_service_user().await?;
        let data_dir = if data_dir.is_absolute() {
            data_dir.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(io_err("reading the current directory"))?
                .join(data_dir)
        };
        let root = data_dir.join("pg");
        Ok(Cluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            password_file: root.join("password"),
            owner_lock_file: root.join("owner.lock"),
            root,
            bin,
            run_as,
        })
    }

    /// A command for a PostgreSQL tool, run as the service user when kiln runs as root.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // "/" is always reachable, whereas kiln's working directory may not be for the
        // service user; PG* variables would override what we pass explicitly.
        cmd.current_dir("/")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env_remove("PGUSER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(u) = &self.run_as {
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd
    }

    /// Runs a tool to completion; an error when it exits unsuccessfully.
    async fn run(&self, program: &Path, args: &[&OsStr]) -> Result<String> {
        let (status, output) = self.run_status(program, args).await?;
        if status.success() {
            Ok(output)
        } else {
            Err(EmbeddedPgError::CommandFailed {
                command: command_line(program, args),
                status: status.to_string(),
                output,
            })
        }
    }

    /// Runs a tool to completion, returning its exit status and combined output.
    async fn run_status(&self, program: &Path, args: &[&OsStr]) -> Result<(ExitStatus, String)> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .await
            .map_err(io_err(format!("running {}", program.display())))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status, text.trim().to_string()))
    }

    /// Whether a server is running on this cluster, per `pg_ctl status`.
    async fn is_running(&self) -> Result<bool> {
        if !self.data.join("PG_VERSION").exists() {
            return Ok(false);
        }
        let (status, output) = self
            .run_status(
                &self.bin.pg_ctl(),
                &["status".as_ref(), "-D".as_ref(), self.data.as_os_str()],
            )
            .await?;
        // 0: running; 3: not running; 4: no accessible data directory.
        match status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => {
                // Usually the service user cannot reach the data directory; say so plainly.
                self.check_reachable(&self.data).await?;
                Err(EmbeddedPgError::CommandFailed {
                    command: format!("pg_ctl status -D {}", self.data.display()),
                    status: status.to_string(),
                    output,
                })
            }
        }
    }

    /// The port of the running server, from line 4 of `postmaster.pid`.
    async fn running_port(&self) -> Result<u16> {
        let pid_file = self.data.join("postmaster.pid");
        let text = tokio::fs::read_to_string(&pid_file)
            .await
            .map_err(io_err(format!("reading {}", pid_file.display())))?;
        text.lines()
            .nth(3)
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| EmbeddedPgError::BadState {
                path: pid_file,
                detail: "line 4 does not hold a port number".to_string(),
            })
    }

    async fn read_password(&self) -> Result<String> {
        let text = tokio::fs::read_to_string(&self.password_file)
            .await
            .map_err(|source| EmbeddedPgError::BadState {
                path: self.password_file.clone(),
                detail: format!(
                    "cannot read the password of the `{ROLE}` role ({source}); if it is lost, \
                     reset it with ALTER ROLE as a superuser, or delete {} to start over \
                     (this deletes all kiln data in it)",
                    self.root.display()
                ),
            })?;
        Ok(text.trim().to_string())
    }

    /// Creates `<data_dir>/pg`, reachable (but not listable) by the service user.
    async fn prepare_root(&self) -> Result<()> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(io_err(format!("creating {}", self.root.display())))?;
        let mode = if self.run_as.is_some() { 0o711 } else { 0o700 };
        tokio::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(io_err(format!(
                "setting permissions of {}",
                self.root.display()
            )))
    }

    /// Fails with [`EmbeddedPgError::DataDirUnreachable`] unless the service user can write
    /// `dir`. Asks the system itself (`test -w` as that user), so ACLs and mounts count.
    async fn check_reachable(&self, dir: &Path) -> Result<()> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        let (status, _) = self
            .run_status(
                Path::new("test"),
                &[
                    "-w".as_ref(),
                    dir.as_os_str(),
                    "-a".as_ref(),
                    "-x".as_ref(),
                    dir.as_os_str(),
                ],
            )
            .await?;
        if status.success() {
            return Ok(());
        }
        let hint = match first_blocking_dir(dir, user) {
            Some(blocking) if blocking != dir => format!(
                " (it cannot enter {}, mode {:o})",
                blocking.display(),
                std::fs::metadata(&blocking)
                    .map(|m| m.mode() & 0o7777)
                    .unwrap_or(0)
            ),
            _ => String::new(),
        };
        Err(EmbeddedPgError::DataDirUnreachable {
            user: user.name.clone(),
            path: dir.to_path_buf(),
            hint,
        })
    }

    fn chown_to_service_user(&self, path: &Path) -> Result<()> {
        if let Some(u) = &self.run_as {
            std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
                .map_err(io_err(format!("changing the owner of {}", path.display())))?;
        }
        Ok(())
    }

    /// Creates the cluster with initdb. It is built in `data.partial` and renamed to `data`
    /// only once fully configured, so a crash half-way never leaves a cluster that looks ready.
    async fn init(&self) -> Result<()> {
        let partial = self.root.join("data.partial");
        if tokio::fs::try_exists(&partial).await.unwrap_or(false) {
            tokio::fs::remove_dir_all(&partial)
                .await
                .map_err(io_err(format!("removing {}", partial.display())))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&partial)
            .map_err(io_err(format!("creating {}", partial.display())))?;
        self.chown_to_service_user(&partial)?;
        self.check_reachable(&partial).await.map_err(|e| match e {
            EmbeddedPgError::DataDirUnreachable { user, hint, .. } => {
                EmbeddedPgError::DataDirUnreachable {
                    user,
                    path: self.data.clone(),
                    hint,
                }
            }
            other => other,
        })?;

        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        write_private_file(&self.password_file, &password)?;

        // initdb reads the password from a file the service user must be able to read.
        let pwfile = self.root.join("initdb-pwfile");
        write_private_file(&pwfile, &password)?;
        self.chown_to_service_user(&pwfile)?;
        let mut pwfile_arg = OsString::from("--pwfile=");
        pwfile_arg.push(&pwfile);
        let result = self
            .run(
                &self.bin.initdb(),
                &[
                    "-D".as_ref(),
                    partial.as_os_str(),
                    "--auth=scram-sha-256".as_ref(),
                    format!("--username={ROLE}").as_ref(),
                    &pwfile_arg,
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    "--locale=C".as_ref(),
                ],
            )
            .await;
        let _ = tokio::fs::remove_file(&pwfile).await;
        result?;

        let conf = partial.join("postgresql.conf");
        let mut text = tokio::fs::read_to_string(&conf)
            .await
            .map_err(io_err(format!("reading {}", conf.display())))?;
        text.push_str(KILN_SETTINGS);
        // Rewriting in place keeps the file's owner (the service user).
        tokio::fs::write(&conf, text)
            .await
            .map_err(io_err(format!("writing {}", conf.display())))?;

        tokio::fs::rename(&partial, &self.data)
            .await
            .map_err(io_err(format!(
                "renaming {} to {}",
                partial.display(),
                self.data.display()
            )))?;
        tracing::info!(data = %self.data.display(), "created embedded PostgreSQL cluster");
        Ok(())
    }

    /// Checks an existing cluster before starting it: right major version, owned by the
    /// service user, reachable by it.
    async fn check_existing(&self) -> Result<()> {
        let version_file = self.data.join("PG_VERSION");
        let cluster_version = tokio::fs::read_to_string(&version_file)
            .await
            .map_err(io_err(format!("reading {}", version_file.display())))?
            .trim()
            .to_string();
        let output = self
            .run(&self.bin.pg_ctl(), &["--version".as_ref()])
            .await?;
        // "pg_ctl (PostgreSQL) 15.8 (Debian 15.8-1)" -> "15"; for 9.x the major is "9.6".
        let full = output.split_whitespace().nth(2).unwrap_or_default();
        let binaries_version = if full.starts_with("9.") {
            full.splitn(3, '.').take(2).collect::<Vec<_>>().join(".")
        } else {
            full.split('.').next().unwrap_or_default().to_string()
        };
        if !binaries_version.is_empty() && binaries_version != cluster_version {
            return Err(EmbeddedPgError::VersionMismatch {
                data_dir: self.data.clone(),
                cluster: cluster_version,
                binaries: binaries_version,
                bin_dir: self.bin.dir.clone(),
            });
        }

        if let Some(u) = &self.run_as {
            let meta = tokio::fs::metadata(&self.data)
                .await
                .map_err(io_err(format!("reading {}", self.data.display())))?;
            if meta.uid() != u.uid {
                // E.g. a data dir restored from a backup made on a machine where `postgres`
                // has another uid. The directory is kiln's own, so take it over.
                tracing::warn!(
                    data = %self.data.display(),
                    user = %u.name,
                    "embedded PostgreSQL cluster has the wrong owner; changing it"
                );
                let (data, uid, gid) = (self.data.clone(), u.uid, u.gid);
                tokio::task::spawn_blocking(move || chown_recursive(&data, uid, gid))
                    .await
                    .map_err(|e| EmbeddedPgError::Io {
                        context: "changing the owner of the cluster".to_string(),
                        source: io::Error::other(e),
                    })?
                    .map_err(io_err(format!(
                        "changing the owner of {}",
                        self.data.display()
                    )))?;
            }
        }
        self.check_reachable(&self.data).await
    }

    /// `pg_ctl start` on a freshly picked port; returns the port.
    async fn start_server(&self) -> Result<u16> {
        // The log is only appended to; keep one old generation once it gets large.
        if tokio::fs::metadata(&self.log)
            .await
            .is_ok_and(|m| m.len() > MAX_LOG_BYTES)
        {
            let old = self.log.with_extension("log.1");
            tokio::fs::rename(&self.log, &old)
                .await
                .map_err(io_err(format!("rotating {}", self.log.display())))?;
        }
        // pg_ctl appends to the log as the service user, so it must own the file.
        if !self.log.exists() {
            write_private_file(&self.log, "")?;
        }
        self.chown_to_service_user(&self.log)?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_loopback_port()?;
            let log_start = tokio::fs::metadata(&self.log)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            let (status, output) = self
                .run_status(
                    &self.bin.pg_ctl(),
                    &[
                        "start".as_ref(),
                        "-w".as_ref(),
                        "-t".as_ref(),
                        PG_CTL_TIMEOUT_SECS.as_ref(),
                        "-D".as_ref(),
                        self.data.as_os_str(),
                        "-l".as_ref(),
                        self.log.as_os_str(),
                        "-o".as_ref(),
                        format!("-p {port}").as_ref(),
                    ],
                )
                .await?;
            if status.success() {
                tracing::info!(port, data = %self.data.display(), "started embedded PostgreSQL");
                return Ok(port);
            }
            let new_log = read_log_from(&self.log, log_start).await;
            // Someone took the port between our probe and the server's bind, or the children
            // of a killed postmaster have not yet released its shared memory: both pass.
            let transient = new_log.contains("could not bind")
                || new_log.contains("Address already in use")
                || new_log.contains("pre-existing shared memory block");
            if transient && attempt < START_ATTEMPTS {
                tracing::warn!(port, attempt, "embedded PostgreSQL did not start; retrying");
                tokio::time::sleep(Duration::from_millis(500 * attempt as u64)).await;
                continue;
            }
            return Err(EmbeddedPgError::StartFailed {
                detail: output,
                log: self.log.clone(),
                log_tail: log_tail(&self.log).await,
            });
        }
    }

    /// `pg_ctl stop -m fast`; succeeds if the server is already gone.
    async fn stop_server(&self) -> Result<()> {
        let result = self
            .run(
                &self.bin.pg_ctl(),
                &[
                    "stop".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    PG_CTL_TIMEOUT_SECS.as_ref(),
                    "-m".as_ref(),
                    "fast".as_ref(),
                    "-D".as_ref(),
                    self.data.as_os_str(),
                ],
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if !self.is_running().await.unwrap_or(true) => {
                tracing::debug!(error = %e, "pg_ctl stop failed but the server is not running");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The blocking twin of [`Cluster::stop_server`], for `Drop`.
    fn stop_server_blocking(&self) {
        let mut cmd = std::process::Command::new(self.bin.pg_ctl());
        cmd.current_dir("/")
            .args(["stop", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", "fast", "-D"])
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(u) = &self.run_as {
            std::os::unix::process::CommandExt::uid(&mut cmd, u.uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, u.gid);
        }
        match cmd.status() {
            Ok(s) if s.success() => tracing::info!("stopped embedded PostgreSQL on drop"),
            Ok(s) => tracing::warn!(status = %s, "pg_ctl stop on drop failed"),
            Err(e) => tracing::warn!(error = %e, "could not run pg_ctl stop on drop"),
        }
    }
}

fn command_line(program: &Path, args: &[&OsStr]) -> String {
    let mut line = program.display().to_string();
    for a in args {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line
}

/// Writes `contents` to `path` with mode 0600 (also when the file already exists).
fn write_private_file(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let context = || format!("writing {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(context()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(context()))?;
    file.write_all(contents.as_bytes())
        .map_err(io_err(context()))
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A loopback port that was free a moment ago.
fn free_loopback_port() -> Result<u16> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("finding a free port on 127.0.0.1"))
}

async fn read_log_from(log: &Path, offset: u64) -> String {
    match tokio::fs::read(log).await {
        Ok(bytes) => {
            let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

async fn log_tail(log: &Path) -> String {
    let text = read_log_from(log, 0).await;
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Ownership
// ---------------------------------------------------------------------------------------------

/// An exclusive `flock` on `<data_dir>/pg/owner.lock`, held by the one kiln process that owns
/// (started or adopted, and will stop) the server. The kernel drops it when that process dies,
/// however it dies, so a held lock always means a live owner.
#[derive(Debug)]
struct OwnerLock {
    // Never read: holding the open descriptor is what holds the lock.
    _file: std::fs::File,
}

impl Cluster {
    /// Takes the owner lock, or `None` if another live handle (in any process) holds it.
    fn try_lock_owner(&self) -> Result<Option<OwnerLock>> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let path = &self.owner_lock_file;
        let context = || format!("locking {}", path.display());
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err(context()))?;
        // SAFETY: the descriptor is open for the duration of the call; LOCK_NB never blocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(io_err(context())(err))
            };
        }
        // The pid is for people and error messages only; the lock is what counts.
        file.set_len(0).map_err(io_err(context()))?;
        file.write_all(std::process::id().to_string().as_bytes())
            .map_err(io_err(context()))?;
        Ok(Some(OwnerLock { _file: file }))
    }

    /// [`Cluster::try_lock_owner`] again for a moment when the lock file names this process: a
    /// handle of ours has just released the lock (a stop, then a start), and a child process
    /// that another of our threads forked in between holds an inherited copy of the descriptor
    /// (and so the lock) until its `exec` closes it, a few milliseconds at most. `None` if the
    /// lock is still held after [`OWN_RELEASE_WAIT`], or names another process.
    async fn lock_after_own_release(&self) -> Result<Option<OwnerLock>> {
        let own = std::process::id().to_string();
        let deadline = tokio::time::Instant::now() + OWN_RELEASE_WAIT;
        loop {
            let pid = tokio::fs::read_to_string(&self.owner_lock_file)
                .await
                .unwrap_or_default();
            if pid.trim() != own {
                return Ok(None);
            }
            if let Some(lock) = self.try_lock_owner()? {
                return Ok(Some(lock));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The error for a cluster another live kiln process owns.
    async fn owned_elsewhere(&self) -> EmbeddedPgError {
        let pid = tokio::fs::read_to_string(&self.owner_lock_file)
            .await
            .unwrap_or_default();
        let port = if self.is_running().await.unwrap_or(false) {
            self.running_port().await.ok()
        } else {
            None
        };
        let mut owner = Vec::new();
        if !pid.trim().is_empty() {
            owner.push(format!("pid {}", pid.trim()));
        }
        if let Some(port) = port {
            owner.push(format!("port {port}"));
        }
        EmbeddedPgError::AlreadyRunning {
            data_dir: self.data.clone(),
            port,
            owner: if owner.is_empty() {
                String::new()
            } else {
                format!(" ({})", owner.join(", "))
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------------

/// How long [`EmbeddedPostgres::connect_existing_or_start`] waits for another kiln process that
/// is starting the server.
const WAIT_FOR_OTHER_STARTER: Duration = Duration::from_secs(120);

/// How long [`Cluster::lock_after_own_release`] retries a lock this process released.
const OWN_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// A running embedded PostgreSQL cluster, started by this handle or by another kiln process.
///
/// Call [`EmbeddedPostgres::stop`] at shutdown. If an owning handle is dropped instead, `Drop`
/// stops the server synchronously (best effort).
pub struct EmbeddedPostgres {
    cluster: Cluster,
    url: String,
    port: u16,
    /// Present when this handle owns the server and so must stop it.
    owner_lock: Option<OwnerLock>,
}

impl fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL holds the password.
        f.debug_struct("EmbeddedPostgres")
            .field("data", &self.cluster.data)
            .field("port", &self.port)
            .field("owns_server", &self.owns_server())
            .finish_non_exhaustive()
    }
}

impl EmbeddedPostgres {
    /// Starts the cluster in `<data_dir>/pg`, creating it on first use, and makes sure the
    /// `kiln` database exists. This is what `kiln serve` calls; the returned handle owns the
    /// server.
    ///
    /// A server left running by a kiln process that has since died (crashed, killed) is adopted
    /// rather than restarted. Fails with [`EmbeddedPgError::AlreadyRunning`] if another live
    /// handle (in this or another process) owns the cluster, and at once with
    /// [`EmbeddedPgError::NotInstalled`] if no PostgreSQL binaries are found.
    pub async fn start(data_dir: &Path) -> Result<EmbeddedPostgres> {
        let cluster = Cluster::new(data_dir).await?;
        cluster.prepare_root().await?;
        let lock = match cluster.try_lock_owner()? {
            Some(lock) => lock,
            None => match cluster.lock_after_own_release().await? {
                Some(lock) => lock,
                None => return Err(cluster.owned_elsewhere().await),
            },
        };
        if cluster.is_running().await? {
            tracing::warn!(
                data = %cluster.data.display(),
                "adopting an embedded PostgreSQL server left running by a kiln process that is gone"
            );
            let mut pg = Self::attach(cluster).await?;
            pg.owner_lock = Some(lock);
            return Ok(pg);
        }
        Self::start_cluster(cluster, lock).await
    }

    /// Attaches to the server running on `<data_dir>/pg` if there is one, else starts it like
    /// [`EmbeddedPostgres::start`]. This is what short-lived commands such as `kiln keys create`
    /// call.
    ///
    /// An attached handle does not own the server: [`EmbeddedPostgres::stop`] and `Drop` leave
    /// it running. If another kiln process is in the middle of starting the server, this waits
    /// for it and attaches.
    pub async fn connect_existing_or_start(data_dir: &Path) -> Result<EmbeddedPostgres> {
        let cluster = Cluster::new(data_dir).await?;
        cluster.prepare_root().await?;
        let deadline = tokio::time::Instant::now() + WAIT_FOR_OTHER_STARTER;
        loop {
            if cluster.is_running().await? {
                return Self::attach(cluster).await;
            }
            if let Some(lock) = cluster.try_lock_owner()? {
                // It may have come up between the check and the lock.
                if cluster.is_running().await? {
                    drop(lock);
                    return Self::attach(cluster).await;
                }
                return Self::start_cluster(cluster, lock).await;
            }
            // Another live kiln process owns the cluster but its server is not up (yet).
            if tokio::time::Instant::now() >= deadline {
                return Err(cluster.owned_elsewhere().await);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Attaches to the server running on `<data_dir>/pg`, if any; never starts one. The handle
    /// does not own the server.
    pub async fn connect_existing(data_dir: &Path) -> Result<Option<EmbeddedPostgres>> {
        let cluster = Cluster::new(data_dir).await?;
        if cluster.is_running().await? {
            Self::attach(cluster).await.map(Some)
        } else {
            Ok(None)
        }
    }

    async fn start_cluster(cluster: Cluster, lock: OwnerLock) -> Result<EmbeddedPostgres> {
        if cluster.data.join("PG_VERSION").exists() {
            cluster.check_existing().await?;
        } else {
            cluster.init().await?;
        }
        let password = cluster.read_password().await?;
        let port = cluster.start_server().await?;
        // From here on, dropping `pg` (e.g. on an error below) stops the server.
        let pg = EmbeddedPostgres {
            url: url_for(&password, port),
            cluster,
            port,
            owner_lock: Some(lock),
        };
        ensure_database(&password, port).await?;
        Ok(pg)
    }

    async fn attach(cluster: Cluster) -> Result<EmbeddedPostgres> {
        let port = cluster.running_port().await?;
        let password = cluster.read_password().await?;
        ensure_database(&password, port).await?;
        tracing::info!(port, data = %cluster.data.display(), "attached to running embedded PostgreSQL");
        Ok(EmbeddedPostgres {
            url: url_for(&password, port),
            cluster,
            port,
            owner_lock: None,
        })
    }

    /// A `postgres://` URL for the `kiln` database, for sqlx. It contains the password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether this handle owns the server (and so stops it).
    pub fn owns_server(&self) -> bool {
        self.owner_lock.is_some()
    }

    /// The cluster's data directory (`<data_dir>/pg/data`).
    pub fn data_dir(&self) -> &Path {
        &self.cluster.data
    }

    /// Stops the server (`pg_ctl stop -m fast`) if this handle owns it; otherwise does nothing.
    pub async fn stop(mut self) -> Result<()> {
        // Taken first so Drop does not try again, whatever happens; the lock is released only
        // once the server is down.
        let Some(lock) = self.owner_lock.take() else {
            return Ok(());
        };
        self.cluster.stop_server().await?;
        drop(lock);
        tracing::info!(data = %self.cluster.data.display(), "stopped embedded PostgreSQL");
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Some(lock) = self.owner_lock.take() {
            self.cluster.stop_server_blocking();
            drop(lock);
        }
    }
}

fn url_for(password: &str, port: u16) -> String {
    // The password is alphanumeric, so it needs no percent-encoding. There is no TLS on
    // loopback.
    format!("postgres://{ROLE}:{password}@127.0.0.1:{port}/{DATABASE}?sslmode=disable")
}

/// Waits until the server accepts connections, then creates the `kiln` database if missing.
async fn ensure_database(password: &str, port: u16) -> Result<()> {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(ROLE)
        .password(password)
        .database("postgres")
        .ssl_mode(PgSslMode::Disable)
        .disable_statement_logging();
    let db_err = |source| EmbeddedPgError::Database { port, source };

    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut conn = loop {
        match PgConnection::connect_with(&options).await {
            Ok(conn) => break conn,
            // A wrong password will not fix itself.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("28P01") => {
                return Err(db_err(sqlx::Error::Database(e)));
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(db_err(e)),
            Err(e) => {
                tracing::debug!(error = %e, "embedded PostgreSQL not accepting connections yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(DATABASE)
        .fetch_optional(&mut conn)
        .await
        .map_err(db_err)?;
    if exists.is_none() {
        let created = sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
            .execute(&mut conn)
            .await;
        match created {
            Ok(_) => tracing::info!("created database `{DATABASE}`"),
            // 42P04 duplicate_database / 23505 unique_violation: another kiln process won the
            // race to create it.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(db_err(e)),
        }
    }
    conn.close().await.map_err(db_err)
}
