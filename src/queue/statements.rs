//! The job state machine as a handful of named SQL statements (after River's
//! `river_job.sql`). The schema's CHECK constraints (migrations/0002_jobs.sql) make the
//! impossible states unrepresentable; these statements are the only ways between states.
//!
//! Every statement a worker runs is fenced on `(id, attempt, state = 'running')`: once a
//! job has been taken away (lease reaped, cancelled and acknowledged elsewhere), the old
//! attempt's writes match no row. NOTIFYs are sent by the `kiln_notify_job` trigger.

/// Columns of a job row, for a table aliased `j`, plus the two derived columns every read
/// carries: `progress` (the latest metrics event's data) and `current_metrics` (the job's
/// selected metrics, else its latest checkpoint's).
pub(crate) const JOB_COLUMNS: &str = "j.id, j.project_id, j.model, j.base_model, \
    j.training_file, j.validation_file, j.training_format, j.suffix, j.seed, j.metadata, \
    j.integrations, j.method, j.priority, j.state, j.attempt, j.failed_attempts, \
    j.max_attempts, j.scheduled_at, j.worker_id, j.lease_expires_at, j.started_at, \
    j.finished_at, j.cancel_requested_at, j.pause_requested_at, j.error, j.fine_tuned_model, \
    j.result_files, j.trained_tokens, j.created_at, j.device_memory_bytes, \
    j.device_memory_estimated, \
    (SELECT e.data FROM fine_tuning_job_events e \
      WHERE e.job_id = j.id AND e.type = 'metrics' ORDER BY e.seq DESC LIMIT 1) AS progress, \
    coalesce(j.metrics, (SELECT c.metrics FROM fine_tuning_job_checkpoints c \
      WHERE c.job_id = j.id ORDER BY c.step DESC LIMIT 1)) AS current_metrics";

/// Create: a new `queued` job and its first event. With an idempotency key already used in
/// the project, inserts nothing and returns no row (the caller then reads the existing job).
/// The job's files are locked (`FOR KEY SHARE`) by the same statement and the job is only
/// inserted while they all exist: a file deleted in between (`DELETE_FILE_IF_UNUSED` takes
/// the row lock first) leaves no job naming it.
pub(crate) const INSERT_JOB: &str = "
WITH held AS (
    SELECT id FROM files
    WHERE project_id = $2 AND id IN ($5, $6)
    FOR KEY SHARE
), ins AS (
    INSERT INTO fine_tuning_jobs AS j
        (id, project_id, model, base_model, training_file, validation_file, training_format,
         suffix, seed, metadata, integrations, method, priority, state, max_attempts,
         idempotency_key, request_sha256, device_memory_bytes, device_memory_estimated)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'queued', $14, $15, $16,
           $17, $18
    WHERE (SELECT count(*) FROM held)
        = (SELECT count(DISTINCT f) FROM unnest(ARRAY[$5, $6]) AS f)
    ON CONFLICT (project_id, idempotency_key) DO NOTHING
    RETURNING j.id
), created AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, level, type, message)
    SELECT ins.id, 0, 'info', 'message', 'Created fine-tuning job: ' || ins.id FROM ins
)
SELECT id FROM ins";

/// Claim: the most urgent claimable jobs that fit in `$4` bytes of device memory (NULL: no
/// limit), skipping rows other workers hold, become `running` under this worker with a new
/// attempt and a fresh lease. Commits at once. A job too large for this worker's free memory
/// stays queued for another worker (or until memory frees up); smaller jobs behind it go on.
pub(crate) const CLAIM_JOBS: &str = "
WITH next AS (
    SELECT id FROM fine_tuning_jobs
    WHERE state = 'queued' AND scheduled_at <= now()
      AND ($4::bigint IS NULL OR coalesce(device_memory_bytes, 0) <= $4)
    ORDER BY priority, created_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE fine_tuning_jobs AS j
    SET state = 'running', attempt = j.attempt + 1, worker_id = $1,
        lease_expires_at = now() + make_interval(secs => $3), heartbeat_at = now(),
        started_at = coalesce(j.started_at, now())
    FROM next WHERE j.id = next.id
    RETURNING j.*
), started AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, worker_id, level, type, message)
    SELECT c.id, c.attempt, c.worker_id, 'info', 'message',
           CASE WHEN c.attempt = 1 THEN 'Fine-tuning job started'
                ELSE 'Fine-tuning job started again (attempt ' || c.attempt || ')' END
    FROM claimed c
)
SELECT {JOB_COLUMNS} FROM claimed AS j";

/// Heartbeat: extends the lease and reports pending cancel/pause requests. No row means
/// the job was taken away: the worker stops at once.
pub(crate) const HEARTBEAT: &str = "
UPDATE fine_tuning_jobs
SET lease_expires_at = now() + make_interval(secs => $3), heartbeat_at = now()
WHERE id = $1 AND attempt = $2 AND state = 'running'
RETURNING cancel_requested_at IS NOT NULL AS cancel_requested,
          pause_requested_at IS NOT NULL AS pause_requested";

/// Append events written by a worker (a JSON array of `{level, type, message, data, step,
/// created_at}`), fenced: a stale attempt appends nothing.
pub(crate) const APPEND_EVENTS: &str = "
INSERT INTO fine_tuning_job_events
    (job_id, attempt, worker_id, level, type, message, data, step, created_at)
SELECT j.id, j.attempt, j.worker_id, e.level, e.type, e.message, e.data, e.step, e.created_at
FROM fine_tuning_jobs j,
     jsonb_to_recordset($3) AS e(level text, type text, message text, data jsonb, step bigint,
                                 created_at timestamptz, ord int)
WHERE j.id = $1 AND j.attempt = $2 AND j.state = 'running'
ORDER BY e.ord";

/// Record a checkpoint saved by the current attempt (fenced), with its event.
pub(crate) const RECORD_CHECKPOINT: &str = "
WITH owner AS (
    SELECT id, attempt, worker_id FROM fine_tuning_jobs
    WHERE id = $1 AND attempt = $2 AND state = 'running'
), saved AS (
    INSERT INTO fine_tuning_job_checkpoints (id, job_id, attempt, step, metrics, storage_key)
    SELECT $3, owner.id, owner.attempt, $4, $5, $6 FROM owner
    ON CONFLICT (job_id, step) DO UPDATE
        SET attempt = EXCLUDED.attempt, metrics = EXCLUDED.metrics,
            storage_key = EXCLUDED.storage_key, created_at = now()
    RETURNING id, job_id, attempt, step
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, worker_id, level, type, message)
    SELECT owner.id, owner.attempt, owner.worker_id, 'info', 'message',
           'Checkpoint saved at step ' || $4
    FROM owner
)
SELECT id FROM saved";

/// Record the hyperparameters the engine resolved (merged into the method's), fenced.
pub(crate) const RECORD_HYPERPARAMETERS: &str = "
UPDATE fine_tuning_jobs
SET method = jsonb_set(method, ARRAY[method->>'type', 'hyperparameters'],
                       coalesce(method #> ARRAY[method->>'type', 'hyperparameters'], '{}') || $3)
WHERE id = $1 AND attempt = $2 AND state = 'running'";

/// Complete: `succeeded` with its model and result file, fenced. The completing UPDATE
/// respects a cancel that arrived meanwhile (then `cancelled`, no model, no file). Returns
/// the new state, or no row when the attempt no longer owns the job.
pub(crate) const COMPLETE_JOB: &str = "
WITH done AS (
    UPDATE fine_tuning_jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'succeeded' ELSE 'cancelled' END,
        fine_tuned_model = CASE WHEN j.cancel_requested_at IS NULL THEN
            'ft:' || j.base_model || ':' || (SELECT p.name FROM projects p WHERE p.id = j.project_id)
            || ':' || coalesce(j.suffix, '') || ':' || j.id END,
        result_files = CASE WHEN j.cancel_requested_at IS NULL THEN ARRAY[$3::text]
                            ELSE '{}'::text[] END,
        trained_tokens = $4, metrics = $5, finished_at = now(),
        model_info = CASE WHEN j.cancel_requested_at IS NULL THEN $11::jsonb END,
        worker_id = NULL, lease_expires_at = NULL, heartbeat_at = NULL, pause_requested_at = NULL
    WHERE j.id = $1 AND j.attempt = $2 AND j.state = 'running'
    RETURNING j.id, j.project_id, j.state, j.attempt, j.fine_tuned_model
), result_file AS (
    INSERT INTO files (id, project_id, filename, purpose, bytes, sha256, storage_key, status,
                       validated_at)
    SELECT $3, done.project_id, $6, 'fine-tune-results', $7, $8, $9, 'processed', now()
    FROM done WHERE done.state = 'succeeded'
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, worker_id, level, type, message, data)
    SELECT done.id, done.attempt, $10, 'info', 'message',
           CASE WHEN done.state = 'succeeded'
                THEN 'The job has successfully completed. New fine-tuned model created: '
                     || done.fine_tuned_model
                ELSE 'The job has been cancelled' END,
           CASE WHEN done.state = 'succeeded'
                THEN jsonb_build_object('fine_tuned_model', done.fine_tuned_model,
                                        'result_files', jsonb_build_array($3::text)) END
    FROM done
)
SELECT state FROM done";

/// Fail an attempt, fenced. An infrastructure failure (`$3` true) is retried after an
/// exponential backoff with jitter while attempts remain; a user error fails at once. A
/// pending cancel wins; a pending pause turns a retry into `paused`.
pub(crate) const FAIL_JOB: &str = "
WITH cur AS (
    SELECT id,
           CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN NOT $3 OR failed_attempts + 1 >= max_attempts THEN 'failed'
                WHEN pause_requested_at IS NOT NULL THEN 'paused'
                ELSE 'queued' END AS next_state
    FROM fine_tuning_jobs
    WHERE id = $1 AND attempt = $2 AND state = 'running'
    FOR UPDATE
), moved AS (
    UPDATE fine_tuning_jobs AS j
    SET state = cur.next_state,
        failed_attempts = j.failed_attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
        scheduled_at = CASE WHEN cur.next_state = 'queued' THEN now() + make_interval(secs =>
            least($5 * power(2, j.failed_attempts), $6) * (0.5 + random())) ELSE j.scheduled_at END,
        finished_at = CASE WHEN cur.next_state IN ('failed', 'cancelled') THEN now() END,
        error = CASE WHEN cur.next_state = 'failed' THEN $4 END,
        cancel_requested_at = CASE WHEN cur.next_state = 'cancelled' THEN j.cancel_requested_at END,
        pause_requested_at = CASE WHEN cur.next_state = 'paused' THEN j.pause_requested_at END,
        worker_id = NULL, lease_expires_at = NULL, heartbeat_at = NULL
    FROM cur WHERE j.id = cur.id
    RETURNING j.id, j.attempt, j.state, j.scheduled_at
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, worker_id, level, type, message)
    SELECT moved.id, moved.attempt, $7,
           CASE WHEN moved.state = 'failed' THEN 'error' ELSE 'warn' END, 'message',
           CASE moved.state
               WHEN 'failed' THEN 'Fine-tuning job failed: ' || ($4->>'message')
               WHEN 'queued' THEN 'Attempt ' || moved.attempt || ' failed (' || ($4->>'message')
                   || '); retrying in ' || greatest(0, round(extract(epoch FROM
                   moved.scheduled_at - now())))::bigint || ' s'
               WHEN 'paused' THEN 'Attempt failed (' || ($4->>'message') || '); job paused'
               ELSE 'The job has been cancelled' END
    FROM moved
)
SELECT state FROM moved";

/// Release: the attempt stopped on request (cancel, pause, or this process shutting down),
/// fenced. The state follows the request on the row: `cancelled`, `paused`, else `queued`
/// again at once, without charging an attempt.
pub(crate) const RELEASE_JOB: &str = "
WITH cur AS (
    SELECT id,
           CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN pause_requested_at IS NOT NULL THEN 'paused'
                ELSE 'queued' END AS next_state
    FROM fine_tuning_jobs
    WHERE id = $1 AND attempt = $2 AND state = 'running'
    FOR UPDATE
), moved AS (
    UPDATE fine_tuning_jobs AS j
    SET state = cur.next_state,
        scheduled_at = CASE WHEN cur.next_state = 'queued' THEN now() ELSE j.scheduled_at END,
        finished_at = CASE WHEN cur.next_state = 'cancelled' THEN now() END,
        cancel_requested_at = CASE WHEN cur.next_state = 'cancelled' THEN j.cancel_requested_at END,
        pause_requested_at = CASE WHEN cur.next_state = 'paused' THEN j.pause_requested_at END,
        worker_id = NULL, lease_expires_at = NULL, heartbeat_at = NULL
    FROM cur WHERE j.id = cur.id
    RETURNING j.id, j.attempt, j.state
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, worker_id, level, type, message)
    SELECT moved.id, moved.attempt, $3, 'info', 'message',
           CASE moved.state
               WHEN 'cancelled' THEN 'The job has been cancelled'
               WHEN 'paused' THEN 'The job has been paused'
               ELSE 'The job was requeued: its worker is shutting down' END
    FROM moved
)
SELECT state FROM moved";

/// Reap: `running` jobs whose lease expired (their worker died or lost the database) are
/// requeued with backoff and charged an attempt; a pending cancel or pause is honoured.
/// SKIP LOCKED makes it safe to run in every process at once.
pub(crate) const REAP_EXPIRED_LEASES: &str = "
WITH expired AS (
    SELECT id,
           CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN failed_attempts + 1 >= max_attempts THEN 'failed'
                WHEN pause_requested_at IS NOT NULL THEN 'paused'
                ELSE 'queued' END AS next_state
    FROM fine_tuning_jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE fine_tuning_jobs AS j
    SET state = x.next_state,
        failed_attempts = j.failed_attempts + CASE WHEN x.next_state = 'cancelled' THEN 0 ELSE 1 END,
        scheduled_at = CASE WHEN x.next_state = 'queued' THEN now() + make_interval(secs =>
            least($1 * power(2, j.failed_attempts), $2) * (0.5 + random())) ELSE j.scheduled_at END,
        finished_at = CASE WHEN x.next_state IN ('failed', 'cancelled') THEN now() END,
        error = CASE WHEN x.next_state = 'failed' THEN jsonb_build_object(
            'code', 'worker_lost', 'param', NULL,
            'message', 'The worker running this job stopped responding ' || j.failed_attempts + 1
                       || ' time(s); giving up.') END,
        cancel_requested_at = CASE WHEN x.next_state = 'cancelled' THEN j.cancel_requested_at END,
        pause_requested_at = CASE WHEN x.next_state = 'paused' THEN j.pause_requested_at END,
        worker_id = NULL, lease_expires_at = NULL, heartbeat_at = NULL
    FROM expired x WHERE j.id = x.id
    RETURNING j.id, j.attempt, j.state, j.worker_id
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, level, type, message)
    SELECT moved.id, moved.attempt, 'warn', 'message',
           'The worker running attempt ' || moved.attempt || ' stopped responding; job '
           || CASE moved.state WHEN 'queued' THEN 'requeued' ELSE moved.state END
    FROM moved
)
SELECT id, state FROM moved";

/// Cancel (API): a queued or paused job is `cancelled` at once; a running one gets
/// `cancel_requested_at` (and, through the trigger, a NOTIFY its worker acts on). Returns the
/// state before and after; no row when the job is not the project's.
///
/// The new values are computed from `j`, the row as the UPDATE finally locks it, never from
/// `target`: when a worker claims the job between this statement's snapshot and its lock,
/// `target` can still say `queued` while the row is `running` (so is it for pause and resume).
pub(crate) const CANCEL_JOB: &str = "
WITH target AS (
    SELECT id, state FROM fine_tuning_jobs WHERE project_id = $1 AND id = $2 FOR UPDATE
), moved AS (
    UPDATE fine_tuning_jobs AS j
    SET state = CASE WHEN j.state = 'running' THEN 'running' ELSE 'cancelled' END,
        finished_at = CASE WHEN j.state = 'running' THEN NULL ELSE now() END,
        cancel_requested_at = coalesce(j.cancel_requested_at, now()),
        pause_requested_at = CASE WHEN j.state = 'running' THEN j.pause_requested_at END
    FROM target t
    WHERE j.id = t.id AND j.state IN ('queued', 'paused', 'running')
      AND NOT (j.state = 'running' AND j.cancel_requested_at IS NOT NULL)
    RETURNING j.id, j.state
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, level, type, message)
    SELECT moved.id, 0, 'info', 'message',
           CASE moved.state WHEN 'cancelled' THEN 'The job has been cancelled'
                ELSE 'Cancellation requested' END
    FROM moved
)
SELECT t.state AS before, coalesce(m.state, t.state) AS after
FROM target t LEFT JOIN moved m ON m.id = t.id";

/// Pause (API): a queued job is `paused` at once; a running one gets `pause_requested_at`
/// (its worker checkpoints, then releases it as `paused`).
pub(crate) const PAUSE_JOB: &str = "
WITH target AS (
    SELECT id, state FROM fine_tuning_jobs WHERE project_id = $1 AND id = $2 FOR UPDATE
), moved AS (
    UPDATE fine_tuning_jobs AS j
    SET state = CASE WHEN j.state = 'running' THEN 'running' ELSE 'paused' END,
        pause_requested_at = coalesce(j.pause_requested_at, now())
    FROM target t
    WHERE j.id = t.id AND (j.state = 'queued'
                           OR (j.state = 'running' AND j.pause_requested_at IS NULL))
    RETURNING j.id, j.state
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, level, type, message)
    SELECT moved.id, 0, 'info', 'message',
           CASE moved.state WHEN 'paused' THEN 'The job has been paused'
                ELSE 'Pause requested: the job will stop at its next checkpoint' END
    FROM moved
)
SELECT t.state AS before, coalesce(m.state, t.state) AS after
FROM target t LEFT JOIN moved m ON m.id = t.id";

/// Resume (API): a paused job is `queued` again at once (its next attempt resumes from the
/// latest checkpoint); a running job's pending pause request is withdrawn.
pub(crate) const RESUME_JOB: &str = "
WITH target AS (
    SELECT id, state, pause_requested_at FROM fine_tuning_jobs
    WHERE project_id = $1 AND id = $2 FOR UPDATE
), moved AS (
    UPDATE fine_tuning_jobs AS j
    SET state = CASE WHEN j.state = 'paused' THEN 'queued' ELSE j.state END,
        scheduled_at = CASE WHEN j.state = 'paused' THEN now() ELSE j.scheduled_at END,
        pause_requested_at = NULL
    FROM target t
    WHERE j.id = t.id AND j.pause_requested_at IS NOT NULL AND j.state IN ('paused', 'running')
    RETURNING j.id, j.state
), logged AS (
    INSERT INTO fine_tuning_job_events (job_id, attempt, level, type, message)
    SELECT moved.id, 0, 'info', 'message', 'The job has been resumed' FROM moved
)
SELECT t.state AS before, coalesce(m.state, t.state) AS after,
       m.id IS NOT NULL AS changed
FROM target t LEFT JOIN moved m ON m.id = t.id";
