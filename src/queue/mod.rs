//! The fine-tuning job queue: a durable state machine in PostgreSQL.
//!
//! Jobs are rows of `fine_tuning_jobs`; the only ways between states are the named
//! statements in [`statements`]. Workers claim with `FOR UPDATE SKIP LOCKED`, hold a lease
//! they extend with heartbeats, and fence every write on `(id, attempt, state = 'running')`,
//! so a worker that lost its job can no longer change it. Any process reaps expired leases.
//! NOTIFY (sent by a trigger, carrying only ids) wakes workers; they also poll.
//! Events are appended to `fine_tuning_job_events`, never rewritten.

mod jobs;
mod models;
pub mod notify;
mod statements;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::store::Store;

pub use jobs::{
    CheckpointRow, Control, EventRow, InsertOutcome, Lease, NewEvent, NewJob, ResultFile,
    Transition,
};
pub use models::ModelRow;

/// Timing and retry policy of the queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// How long a claim stays valid without a heartbeat. Workers heartbeat every third of it.
    pub lease: Duration,
    /// First retry delay after an infrastructure failure; doubles with every failed attempt
    /// (with ±50 % jitter).
    pub retry_base: Duration,
    /// Upper bound of the retry delay.
    pub retry_max: Duration,
    /// Attempts a job may fail (infrastructure faults, lost workers) before it fails for good.
    pub max_attempts: i32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease: Duration::from_secs(30),
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(600),
            max_attempts: 3,
        }
    }
}

/// Handle to the queue: a connection pool (shared with the [`Store`]) and the policy.
#[derive(Clone)]
pub struct Queue {
    pool: PgPool,
    config: QueueConfig,
}

/// One job as stored, with its latest progress and metrics.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    /// `ftjob-…`
    pub id: String,
    /// The owning project.
    pub project_id: String,
    /// The model as requested: a base model id or an `ft:` id.
    pub model: String,
    /// The base model at the root of the lineage.
    pub base_model: String,
    /// Training file id.
    pub training_file: String,
    /// Validation file id.
    pub validation_file: Option<String>,
    /// The training file's detected dataset format.
    pub training_format: String,
    /// The user's model-name suffix.
    pub suffix: Option<String>,
    /// Random seed.
    pub seed: i64,
    /// User metadata (string values).
    pub metadata: Option<Value>,
    /// Integrations as requested.
    pub integrations: Option<Value>,
    /// `{"type", "<type>": {"hyperparameters": {...}}}` with the values used.
    pub method: Value,
    /// Lower runs first.
    pub priority: i16,
    /// `queued`, `running`, `paused`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Claims so far (the fencing token of the current one).
    pub attempt: i32,
    /// Attempts charged against `max_attempts`.
    pub failed_attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Earliest claim time.
    pub scheduled_at: DateTime<Utc>,
    /// The worker holding the lease, while running.
    pub worker_id: Option<String>,
    /// When the lease ends unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// First claim.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
    /// A cancel was requested at.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// A pause was requested at.
    pub pause_requested_at: Option<DateTime<Utc>>,
    /// `{"code", "message", "param"}` for failed jobs.
    pub error: Option<Value>,
    /// Set on success.
    pub fine_tuned_model: Option<String>,
    /// Result file ids.
    pub result_files: Vec<String>,
    /// Tokens processed, when the engine counts them.
    pub trained_tokens: Option<i64>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The latest metrics event's data (`step`, `total_steps`, `epoch`, losses, ...).
    pub progress: Option<Value>,
    /// The selected checkpoint's metrics when finished, else the latest checkpoint's.
    pub current_metrics: Option<Value>,
    /// Device memory the job needs (workers claim it only where it fits); `None` for jobs
    /// queued before kiln scheduled by memory.
    pub device_memory_bytes: Option<i64>,
    /// Whether `device_memory_bytes` is kiln's estimate rather than the request's.
    pub device_memory_estimated: bool,
}

impl JobRow {
    /// True for `succeeded`, `failed` and `cancelled`.
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.state)
    }
}

/// True for the states a job never leaves.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

impl Queue {
    /// A queue over the store's pool.
    pub fn new(store: &Store, config: QueueConfig) -> Queue {
        Queue {
            pool: store.pool.clone(),
            config,
        }
    }

    /// The policy in force.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}
