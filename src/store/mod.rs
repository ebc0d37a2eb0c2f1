//! All SQL of kiln's API objects lives here, one module per table family.
//! (The job queue's state machine lives in `queue/`.)

pub mod files;
pub mod keys;
pub mod uploads;
pub mod webhooks;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// A failed store call: either the database is away (callers answer 503 and retry later)
/// or something else went wrong (a bug, a constraint we did not expect).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error(transparent)]
    Other(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_connectivity_error(&err) {
            StoreError::Unavailable(err)
        } else {
            StoreError::Other(err)
        }
    }
}

/// True for errors that mean "the database cannot be reached right now" rather than
/// "this query is wrong": pool timeouts, broken sockets, and the server shutting down
/// (SQLSTATE class 08 connection exceptions, 57P operator intervention).
pub fn is_connectivity_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The handle the API layer holds: a connection pool plus the queries of each table family.
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: PgPool,
}

impl Store {
    /// Connects lazily-tolerant: the pool gives up on a connection after a few seconds so a
    /// request fails with 503 rather than hanging while PostgreSQL is away.
    pub async fn connect(database_url: &str) -> anyhow::Result<Store> {
        let options: PgConnectOptions = database_url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// Applies the migrations in `migrations/` (embedded at build time).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// Used by `/readyz`.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A new time-ordered identifier with a type prefix (`file-…`, `proj_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}
