-- Fine-tuning jobs: the durable queue (state machine in src/queue/statements.rs), their
-- append-only events and their checkpoints.
--
--   queued ──claim──► running ──complete──► succeeded
--     ▲  │              │  ├──fail (user error, or out of attempts)──► failed
--     │  │              │  ├──cancel acknowledged──► cancelled
--     │  │              │  └──pause acknowledged──► paused ──resume──► queued
--     │  └─cancel──► cancelled        (paused ──cancel──► cancelled)
--     └──retry with backoff / reaped lease / shutdown requeue── running
CREATE TABLE fine_tuning_jobs (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    -- The model as requested (a base id under KILN_MODELS_DIR, or an `ft:` id) and the base
    -- model at the root of its lineage (names the fine-tuned model).
    model               text NOT NULL,
    base_model          text NOT NULL,
    training_file       text NOT NULL,
    validation_file     text,
    -- The training file's detected format (the task follows from it).
    training_format     text NOT NULL,
    suffix              text CHECK (length(suffix) BETWEEN 1 AND 64),
    seed                bigint NOT NULL,
    metadata            jsonb,
    integrations        jsonb,
    -- {"type": ..., "<type>": {"hyperparameters": {...}}} with every value actually used.
    method              jsonb NOT NULL,
    -- Lower runs first (1 = most urgent).
    priority            smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),

    state               text NOT NULL CHECK (state IN
                            ('queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
    -- The fencing token: incremented by every claim; every worker write names it.
    attempt             integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Attempts charged against max_attempts (infrastructure failures and lost leases; a
    -- shutdown requeue or a pause is not charged).
    failed_attempts     integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL CHECK (max_attempts >= 1),
    -- Earliest time a queued job may be claimed (retry backoff).
    scheduled_at        timestamptz NOT NULL DEFAULT now(),
    worker_id           text,
    lease_expires_at    timestamptz,
    heartbeat_at        timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    cancel_requested_at timestamptz,
    pause_requested_at  timestamptz,

    error               jsonb,
    fine_tuned_model    text,
    result_files        text[] NOT NULL DEFAULT '{}',
    trained_tokens      bigint,
    -- The selected checkpoint's metrics (set on success).
    metrics             jsonb,

    idempotency_key     text,
    request_sha256      text,
    created_at          timestamptz NOT NULL DEFAULT now(),

    CHECK (failed_attempts BETWEEN 0 AND max_attempts),
    -- A finish time exactly when the job has ended.
    CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    -- A worker and a lease exactly while running.
    CHECK ((state = 'running') = (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK (state = 'running' OR heartbeat_at IS NULL),
    -- Only a running job has been claimed at least once.
    CHECK (state <> 'running' OR (attempt >= 1 AND started_at IS NOT NULL)),
    -- A model exactly when succeeded; an error exactly when failed.
    CHECK ((state = 'succeeded') = (fine_tuned_model IS NOT NULL)),
    CHECK ((state = 'failed') = (error IS NOT NULL)),
    -- Requests to stop only exist on jobs they can still apply to (or did apply to).
    CHECK (cancel_requested_at IS NULL OR state IN ('running', 'cancelled')),
    CHECK (pause_requested_at IS NULL OR state IN ('running', 'paused')),
    CHECK (state <> 'paused' OR pause_requested_at IS NOT NULL),
    CHECK ((idempotency_key IS NULL) = (request_sha256 IS NULL)),
    UNIQUE (project_id, idempotency_key)
);
-- The claim query walks this index in order.
CREATE INDEX fine_tuning_jobs_claim ON fine_tuning_jobs (priority, created_at, id)
    WHERE state = 'queued';
-- The reaper's scan.
CREATE INDEX fine_tuning_jobs_leases ON fine_tuning_jobs (lease_expires_at)
    WHERE state = 'running';
CREATE INDEX fine_tuning_jobs_project ON fine_tuning_jobs (project_id, id);
CREATE INDEX fine_tuning_jobs_fine_tuned_model ON fine_tuning_jobs (fine_tuned_model)
    WHERE fine_tuned_model IS NOT NULL;

-- NOTIFY carries only ids, and is only a hint: workers also poll.
--   kiln_jobs_queued:  a job became claimable (created, retried, resumed, requeued)
--   kiln_jobs_control: a running job was asked to cancel or pause
CREATE FUNCTION kiln_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'queued' AND (TG_OP = 'INSERT' OR OLD.state <> 'queued') THEN
        PERFORM pg_notify('kiln_jobs_queued', NEW.id);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.state = 'running'
       AND ((NEW.cancel_requested_at IS NOT NULL AND OLD.cancel_requested_at IS NULL)
         OR (NEW.pause_requested_at IS NOT NULL AND OLD.pause_requested_at IS NULL)) THEN
        PERFORM pg_notify('kiln_jobs_control', NEW.id);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER fine_tuning_jobs_notify AFTER INSERT OR UPDATE ON fine_tuning_jobs
    FOR EACH ROW EXECUTE FUNCTION kiln_notify_job();

-- Event ids made inside SQL statements (multi-row inserts); ordering is by `seq`, not by id.
CREATE FUNCTION kiln_event_id() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT 'ftevent-' || replace(gen_random_uuid()::text, '-', '')
$$;

-- Progress, messages and metrics: appended, never rewritten. `attempt` and `worker_id` say
-- which claim wrote the row (0/NULL for rows the API wrote), so a history shows who trained.
CREATE TABLE fine_tuning_job_events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text NOT NULL UNIQUE DEFAULT kiln_event_id(),
    job_id      text NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL CHECK (attempt >= 0),
    worker_id   text,
    level       text NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    type        text NOT NULL CHECK (type IN ('message', 'metrics')),
    message     text NOT NULL,
    data        jsonb,
    step        bigint,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((type = 'metrics') = (step IS NOT NULL))
);
CREATE INDEX fine_tuning_job_events_job ON fine_tuning_job_events (job_id, seq);
CREATE INDEX fine_tuning_job_events_metrics ON fine_tuning_job_events (job_id, seq)
    WHERE type = 'metrics';

CREATE FUNCTION kiln_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fine_tuning_job_events is append-only';
END
$$;
CREATE TRIGGER fine_tuning_job_events_append_only BEFORE UPDATE ON fine_tuning_job_events
    FOR EACH ROW EXECUTE FUNCTION kiln_events_append_only();

-- Checkpoints saved by workers; their files live in the artifact store under storage_key.
CREATE TABLE fine_tuning_job_checkpoints (
    id           text PRIMARY KEY,
    job_id       text NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
    attempt      integer NOT NULL CHECK (attempt >= 1),
    step         bigint NOT NULL CHECK (step >= 0),
    metrics      jsonb NOT NULL DEFAULT '{}',
    storage_key  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, step)
);
