//! The queue's operations: what the API asks (create, read, cancel, pause, resume, list) and
//! what workers do (claim, heartbeat, append events, checkpoint, complete, fail, release,
//! reap). Each runs one statement of [`super::statements`] in its own short transaction.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::statements as sql;
use super::{JobRow, Queue};
use crate::store::StoreResult;
use crate::store::files::PageRequest;

static CLAIM_JOBS: LazyLock<String> =
    LazyLock::new(|| sql::CLAIM_JOBS.replace("{JOB_COLUMNS}", sql::JOB_COLUMNS));
static SELECT_JOB: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM fine_tuning_jobs j WHERE j.project_id = $1 AND j.id = $2",
        sql::JOB_COLUMNS
    )
});
static SELECT_JOB_BY_ID: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM fine_tuning_jobs j WHERE j.id = $1",
        sql::JOB_COLUMNS
    )
});
static SELECT_JOB_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, j.request_sha256 FROM fine_tuning_jobs j \
         WHERE j.project_id = $1 AND j.idempotency_key = $2",
        sql::JOB_COLUMNS
    )
});
static LIST_JOBS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM fine_tuning_jobs j
         WHERE j.project_id = $1
           AND ($2::text IS NULL OR j.id < $2)
           AND ($3::jsonb IS NULL OR j.metadata @> $3)
           AND (NOT $4 OR j.metadata IS NULL)
         ORDER BY j.id DESC
         LIMIT $5",
        sql::JOB_COLUMNS
    )
});

/// What the API records for a new job (already validated).
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// `ftjob-…`
    pub id: &'a str,
    /// Owning project.
    pub project_id: &'a str,
    /// Model as requested.
    pub model: &'a str,
    /// Root base model.
    pub base_model: &'a str,
    /// Training file id.
    pub training_file: &'a str,
    /// Validation file id.
    pub validation_file: Option<&'a str>,
    /// Detected format of the training file.
    pub training_format: &'a str,
    /// Model-name suffix.
    pub suffix: Option<&'a str>,
    /// Random seed.
    pub seed: i64,
    /// User metadata.
    pub metadata: Option<&'a Value>,
    /// Integrations as requested.
    pub integrations: Option<&'a Value>,
    /// The resolved method.
    pub method: &'a Value,
    /// Lower runs first.
    pub priority: i16,
    /// `Idempotency-Key` header, with the hash of the request it came with.
    pub idempotency: Option<(&'a str, &'a str)>,
    /// Device memory the job needs, and whether that is kiln's estimate.
    pub device_memory: Option<(i64, bool)>,
}

/// Result of [`Queue::insert_job`].
#[derive(Debug)]
pub enum InsertOutcome {
    /// A new job was queued.
    Created(Box<JobRow>),
    /// The idempotency key was used before with the same request: that job.
    Existing(Box<JobRow>),
    /// The idempotency key was used before with a different request.
    KeyReused,
    /// A file the job names was deleted after the request was checked: the field naming it.
    FileGone(&'static str),
}

/// The outcome of an API transition (cancel, pause, resume).
#[derive(Debug, Clone)]
pub struct Transition {
    /// State before the request.
    pub before: String,
    /// State after it.
    pub after: String,
    /// Whether anything changed.
    pub changed: bool,
}

/// A claim held by a worker: the fencing token of every write it makes.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The job.
    pub job_id: String,
    /// The attempt the claim started.
    pub attempt: i32,
    /// The worker holding it.
    pub worker_id: String,
}

/// Requests a heartbeat found pending on the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Control {
    /// A cancel is pending.
    pub cancel_requested: bool,
    /// A pause is pending.
    pub pause_requested: bool,
}

/// An event a worker appends.
#[derive(Debug, Clone, Serialize)]
pub struct NewEvent {
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    /// `message` or `metrics`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Human-readable text.
    pub message: String,
    /// Structured payload (metrics events: step, losses, ...).
    pub data: Option<Value>,
    /// The step, for metrics events.
    pub step: Option<i64>,
    /// When it happened (the worker's clock).
    pub created_at: DateTime<Utc>,
}

/// One stored event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Insertion order.
    pub seq: i64,
    /// `ftevent-…`
    pub id: String,
    /// The job.
    pub job_id: String,
    /// Claim that wrote it (0: the API).
    pub attempt: i32,
    /// Worker that wrote it.
    pub worker_id: Option<String>,
    /// `info`, `warn`, `error`.
    pub level: String,
    /// `message` or `metrics`.
    #[sqlx(rename = "type")]
    pub kind: String,
    /// Text.
    pub message: String,
    /// Payload.
    pub data: Option<Value>,
    /// Step of a metrics event.
    pub step: Option<i64>,
    /// Time.
    pub created_at: DateTime<Utc>,
}

/// One stored checkpoint.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CheckpointRow {
    /// `ftckpt-…`
    pub id: String,
    /// The job.
    pub job_id: String,
    /// The attempt that saved it.
    pub attempt: i32,
    /// Training step.
    pub step: i64,
    /// Metrics at that step.
    pub metrics: Value,
    /// Where its files are in the artifact store.
    pub storage_key: String,
    /// Time.
    pub created_at: DateTime<Utc>,
    /// `ft:…:ckpt-step-N`.
    pub fine_tuned_model_checkpoint: String,
}

/// The result file a completing worker registers with the job.
#[derive(Debug, Clone)]
pub struct ResultFile<'a> {
    /// `file-…`
    pub id: &'a str,
    /// Name shown in the Files API.
    pub filename: &'a str,
    /// Size.
    pub bytes: i64,
    /// Hex SHA-256.
    pub sha256: &'a str,
    /// Key in the artifact store.
    pub storage_key: &'a str,
}

const CHECKPOINT_COLUMNS: &str = "c.id, c.job_id, c.attempt, c.step, c.metrics, c.storage_key, \
    c.created_at, 'ft:' || j.base_model || ':' || p.name || ':' || coalesce(j.suffix, '') || ':' \
    || j.id || ':ckpt-step-' || c.step AS fine_tuned_model_checkpoint";

const EVENT_COLUMNS: &str =
    "seq, id, job_id, attempt, worker_id, level, type, message, data, step, created_at";

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

impl Queue {
    // ---- API side -----------------------------------------------------------------------

    /// Queues a validated job (and its "created" event) in one statement. With an
    /// idempotency key seen before, returns that job when the request hash matches.
    pub async fn insert_job(&self, job: &NewJob<'_>) -> StoreResult<InsertOutcome> {
        let inserted: Option<String> = sqlx::query_scalar(sql::INSERT_JOB)
            .bind(job.id)
            .bind(job.project_id)
            .bind(job.model)
            .bind(job.base_model)
            .bind(job.training_file)
            .bind(job.validation_file)
            .bind(job.training_format)
            .bind(job.suffix)
            .bind(job.seed)
            .bind(job.metadata)
            .bind(job.integrations)
            .bind(job.method)
            .bind(job.priority)
            .bind(self.config.max_attempts)
            .bind(job.idempotency.map(|(k, _)| k))
            .bind(job.idempotency.map(|(_, h)| h))
            .bind(job.device_memory.map(|(bytes, _)| bytes))
            .bind(job.device_memory.is_some_and(|(_, estimated)| estimated))
            .fetch_optional(&self.pool)
            .await?;
        if let Some(id) = inserted {
            let row = self.job_by_id(&id).await?;
            return Ok(match row {
                Some(row) => InsertOutcome::Created(Box::new(row)),
                None => InsertOutcome::KeyReused, // deleted in between: unreachable in practice
            });
        }
        if let Some((key, hash)) = job.idempotency {
            let existing = sqlx::query(&SELECT_JOB_BY_KEY)
                .bind(job.project_id)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(existing) = existing {
                use sqlx::{FromRow, Row};
                let stored_hash: Option<String> = existing.try_get("request_sha256")?;
                let row = JobRow::from_row(&existing)?;
                return Ok(if stored_hash.as_deref() == Some(hash) {
                    InsertOutcome::Existing(Box::new(row))
                } else {
                    InsertOutcome::KeyReused
                });
            }
        }
        // No conflict on the key, so a file was missing when the statement locked them.
        let present: Vec<String> =
            sqlx::query_scalar("SELECT id FROM files WHERE project_id = $1 AND id IN ($2, $3)")
                .bind(job.project_id)
                .bind(job.training_file)
                .bind(job.validation_file)
                .fetch_all(&self.pool)
                .await?;
        Ok(InsertOutcome::FileGone(
            if present.iter().any(|f| f == job.training_file) {
                "validation_file"
            } else {
                "training_file"
            },
        ))
    }

    /// One job of the project (None for other projects' jobs too).
    pub async fn get_job(&self, project_id: &str, id: &str) -> StoreResult<Option<JobRow>> {
        Ok(sqlx::query_as(&SELECT_JOB)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// One job by id, whatever its project (workers).
    pub async fn job_by_id(&self, id: &str) -> StoreResult<Option<JobRow>> {
        Ok(sqlx::query_as(&SELECT_JOB_BY_ID)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A page of the project's jobs, newest first. `metadata` filters on key/value pairs
    /// (a JSON object); `metadata_is_null` selects jobs without metadata.
    pub async fn list_jobs(
        &self,
        project_id: &str,
        metadata: Option<&Value>,
        metadata_is_null: bool,
        page: &PageRequest,
    ) -> StoreResult<(Vec<JobRow>, bool)> {
        let rows: Vec<JobRow> = sqlx::query_as(&LIST_JOBS)
            .bind(project_id)
            .bind(page.after.as_deref())
            .bind(metadata)
            .bind(metadata_is_null)
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page.cut(rows))
    }

    /// A succeeded job of the project whose fine-tuned model is `model`.
    pub async fn succeeded_job_for_model(
        &self,
        project_id: &str,
        model: &str,
    ) -> StoreResult<Option<JobRow>> {
        let sql = format!(
            "SELECT {} FROM fine_tuning_jobs j
             WHERE j.project_id = $1 AND j.fine_tuned_model = $2 AND j.state = 'succeeded'
               AND j.model_deleted_at IS NULL",
            sql::JOB_COLUMNS
        );
        Ok(sqlx::query_as(&sql)
            .bind(project_id)
            .bind(model)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn transition(
        &self,
        statement: &str,
        project_id: &str,
        id: &str,
    ) -> StoreResult<Option<Transition>> {
        let row: Option<(String, String)> = sqlx::query_as(statement)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(before, after)| Transition {
            changed: before != after,
            before,
            after,
        }))
    }

    /// Cancels a job: at once when queued or paused, by request when running.
    /// None when the project has no such job.
    pub async fn cancel_job(&self, project_id: &str, id: &str) -> StoreResult<Option<Transition>> {
        self.transition(sql::CANCEL_JOB, project_id, id).await
    }

    /// Pauses a job: at once when queued, by request when running.
    pub async fn pause_job(&self, project_id: &str, id: &str) -> StoreResult<Option<Transition>> {
        self.transition(sql::PAUSE_JOB, project_id, id).await
    }

    /// Resumes a paused job (or withdraws a pending pause request).
    pub async fn resume_job(&self, project_id: &str, id: &str) -> StoreResult<Option<Transition>> {
        let row: Option<(String, String, bool)> = sqlx::query_as(sql::RESUME_JOB)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(before, after, changed)| Transition {
            before,
            after,
            changed,
        }))
    }

    /// A page of a job's events, newest first (cursor: an event id).
    pub async fn list_events(
        &self,
        job_id: &str,
        page: &PageRequest,
    ) -> StoreResult<(Vec<EventRow>, bool)> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM fine_tuning_job_events
             WHERE job_id = $1
               AND ($2::text IS NULL OR seq < (SELECT seq FROM fine_tuning_job_events
                                               WHERE job_id = $1 AND id = $2))
             ORDER BY seq DESC
             LIMIT $3"
        );
        let rows: Vec<EventRow> = sqlx::query_as(&sql)
            .bind(job_id)
            .bind(page.after.as_deref())
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page.cut(rows))
    }

    /// A job's events after `seq`, oldest first (for streaming).
    pub async fn events_after(
        &self,
        job_id: &str,
        seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM fine_tuning_job_events
             WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        Ok(sqlx::query_as(&sql)
            .bind(job_id)
            .bind(seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The metrics events of a job in order, the last one written for each step winning
    /// (steps redone after a resume replace the first try's).
    pub async fn metrics_history(&self, job_id: &str) -> StoreResult<Vec<(i64, Value)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (step) step, data FROM fine_tuning_job_events
             WHERE job_id = $1 AND type = 'metrics' AND data IS NOT NULL
             ORDER BY step, seq DESC",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A page of a job's checkpoints, latest step first (cursor: a checkpoint id).
    pub async fn list_checkpoints(
        &self,
        job_id: &str,
        page: &PageRequest,
    ) -> StoreResult<(Vec<CheckpointRow>, bool)> {
        let sql = format!(
            "SELECT {CHECKPOINT_COLUMNS}
             FROM fine_tuning_job_checkpoints c
             JOIN fine_tuning_jobs j ON j.id = c.job_id
             JOIN projects p ON p.id = j.project_id
             WHERE c.job_id = $1
               AND ($2::text IS NULL OR c.step < (SELECT step FROM fine_tuning_job_checkpoints
                                                  WHERE job_id = $1 AND id = $2))
             ORDER BY c.step DESC
             LIMIT $3"
        );
        let rows: Vec<CheckpointRow> = sqlx::query_as(&sql)
            .bind(job_id)
            .bind(page.after.as_deref())
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page.cut(rows))
    }

    /// The checkpoint a new attempt resumes from: the latest step saved by any attempt.
    pub async fn latest_checkpoint(&self, job_id: &str) -> StoreResult<Option<CheckpointRow>> {
        let sql = format!(
            "SELECT {CHECKPOINT_COLUMNS}
             FROM fine_tuning_job_checkpoints c
             JOIN fine_tuning_jobs j ON j.id = c.job_id
             JOIN projects p ON p.id = j.project_id
             WHERE c.job_id = $1 ORDER BY c.step DESC LIMIT 1"
        );
        Ok(sqlx::query_as(&sql)
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    // ---- Worker side --------------------------------------------------------------------

    /// Claims up to `limit` claimable jobs for `worker_id`, most urgent first.
    pub async fn claim_jobs(&self, worker_id: &str, limit: i64) -> StoreResult<Vec<JobRow>> {
        self.claim_jobs_fitting(worker_id, limit, None).await
    }

    /// Claims up to `limit` claimable jobs that need at most `free_bytes` of device memory
    /// (`None`: any), most urgent first.
    pub async fn claim_jobs_fitting(
        &self,
        worker_id: &str,
        limit: i64,
        free_bytes: Option<i64>,
    ) -> StoreResult<Vec<JobRow>> {
        Ok(sqlx::query_as(&CLAIM_JOBS)
            .bind(worker_id)
            .bind(limit)
            .bind(secs(self.config.lease))
            .bind(free_bytes)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Extends the lease. `Ok(None)`: the job is no longer this attempt's; stop at once.
    pub async fn heartbeat(&self, lease: &Lease) -> StoreResult<Option<Control>> {
        Ok(sqlx::query_as(sql::HEARTBEAT)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(secs(self.config.lease))
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Appends events in order. `Ok(false)`: the attempt lost the job; nothing was written.
    pub async fn append_events(&self, lease: &Lease, events: &[NewEvent]) -> StoreResult<bool> {
        if events.is_empty() {
            return Ok(true);
        }
        let rows: Vec<Value> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
                v["ord"] = Value::from(i);
                v
            })
            .collect();
        let done = sqlx::query(sql::APPEND_EVENTS)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(Value::Array(rows))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a checkpoint whose files are already in the artifact store.
    /// `Ok(false)`: the attempt lost the job.
    pub async fn record_checkpoint(
        &self,
        lease: &Lease,
        id: &str,
        step: i64,
        metrics: &Value,
        storage_key: &str,
    ) -> StoreResult<bool> {
        let saved: Option<String> = sqlx::query_scalar(sql::RECORD_CHECKPOINT)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(id)
            .bind(step)
            .bind(metrics)
            .bind(storage_key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(saved.is_some())
    }

    /// Merges the hyperparameters the engine resolved into the job's method.
    pub async fn record_hyperparameters(&self, lease: &Lease, values: &Value) -> StoreResult<bool> {
        let done = sqlx::query(sql::RECORD_HYPERPARAMETERS)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(values)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Completes the attempt: `succeeded` with its model and result file, or `cancelled`
    /// when a cancel arrived meanwhile. `Ok(None)`: the attempt lost the job.
    pub async fn complete_job(
        &self,
        lease: &Lease,
        result: &ResultFile<'_>,
        trained_tokens: Option<i64>,
        metrics: &Value,
        model_info: Option<&Value>,
    ) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(sql::COMPLETE_JOB)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(result.id)
            .bind(trained_tokens)
            .bind(metrics)
            .bind(result.filename)
            .bind(result.bytes)
            .bind(result.sha256)
            .bind(result.storage_key)
            .bind(&lease.worker_id)
            .bind(model_info)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Fails the attempt. `retryable` (an infrastructure fault) requeues it with backoff
    /// while attempts remain. Returns the new state; `Ok(None)`: the attempt lost the job.
    pub async fn fail_job(
        &self,
        lease: &Lease,
        error: &Value,
        retryable: bool,
    ) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(sql::FAIL_JOB)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(retryable)
            .bind(error)
            .bind(secs(self.config.retry_base))
            .bind(secs(self.config.retry_max))
            .bind(&lease.worker_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Releases a job the attempt stopped on request (cancel, pause, shutdown) without
    /// charging an attempt. Returns the new state; `Ok(None)`: the attempt lost the job.
    pub async fn release_job(&self, lease: &Lease) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(sql::RELEASE_JOB)
            .bind(&lease.job_id)
            .bind(lease.attempt)
            .bind(&lease.worker_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Requeues (or fails, cancels, pauses) running jobs whose lease expired. Returns the
    /// jobs moved with their new state.
    pub async fn reap_expired_leases(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(sql::REAP_EXPIRED_LEASES)
            .bind(secs(self.config.retry_base))
            .bind(secs(self.config.retry_max))
            .fetch_all(&self.pool)
            .await?)
    }
}
