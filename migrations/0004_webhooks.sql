-- Webhook endpoints (OpenAI's /v1/webhook_endpoints) and their deliveries: a transactional
-- outbox. The job and checkpoint triggers below write a delivery for every subscribed
-- endpoint in the same transaction as the state change, so an event is never lost to a
-- crash between "the job succeeded" and "tell someone"; deliverers (src/webhooks.rs) claim
-- due rows with SKIP LOCKED and retry with backoff.
CREATE TABLE webhook_endpoints (
    id                          text PRIMARY KEY,
    project_id                  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name                        text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    url                         text NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    event_types                 text[] NOT NULL CHECK (cardinality(event_types) >= 1),
    -- `whsec_` + base64 of 32 random bytes (Standard Webhooks). Kept because kiln signs
    -- with it; it is shown only when created or rotated.
    secret                      text NOT NULL,
    -- After a rotation that keeps the old secret for a while, deliveries carry both
    -- signatures until it expires.
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CHECK ((previous_secret IS NULL) = (previous_secret_expires_at IS NULL))
);
CREATE INDEX webhook_endpoints_project ON webhook_endpoints (project_id, id);

-- One row per (event, endpoint). `id` is the `webhook-id` header: the same on every retry,
-- so receivers can deduplicate. `payload` is the exact body (text, so its bytes and key
-- order never change between attempts).
CREATE TABLE webhook_deliveries (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              text NOT NULL UNIQUE,
    endpoint_id     text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    payload         text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'succeeded', 'failed')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- When the next attempt is due. A deliverer that claims the row pushes this past the
    -- attempt's timeout: a deliverer that dies mid-attempt leaves the row to be retried.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CHECK ((state = 'pending') = (finished_at IS NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq);

-- Every attempt, as the receiver answered it (visible through the API).
CREATE TABLE webhook_delivery_attempts (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  text NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL CHECK (attempt >= 1),
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL CHECK (duration_ms >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (delivery_id, attempt)
);

-- Writes one delivery per endpoint of `p_project` subscribed to `p_type`, all carrying the
-- same event id and body, and wakes the deliverers.
CREATE FUNCTION kiln_webhook_enqueue(p_project text, p_type text, p_data json)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    evt text := 'evt_' || replace(gen_random_uuid()::text, '-', '');
    body text := json_build_object(
        'id', evt,
        'object', 'event',
        'type', p_type,
        'created_at', floor(extract(epoch FROM clock_timestamp()))::bigint,
        'data', p_data)::text;
BEGIN
    INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event_type, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.id, evt, p_type, body
    FROM webhook_endpoints e
    WHERE e.project_id = p_project AND p_type = ANY (e.event_types);
    IF FOUND THEN
        PERFORM pg_notify('kiln_webhooks', '');
    END IF;
END
$$;

-- fine_tuning.job.{running,succeeded,failed,cancelled} on each transition into that state.
CREATE FUNCTION kiln_webhook_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('running', 'succeeded', 'failed', 'cancelled') THEN
        PERFORM kiln_webhook_enqueue(
            NEW.project_id,
            'fine_tuning.job.' || NEW.state,
            json_strip_nulls(json_build_object(
                'id', NEW.id,
                'fine_tuned_model', NEW.fine_tuned_model,
                'attempt', CASE WHEN NEW.state = 'running' THEN NEW.attempt END,
                'error', NEW.error)));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER fine_tuning_jobs_webhooks AFTER UPDATE OF state ON fine_tuning_jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION kiln_webhook_job();

-- fine_tuning.job.checkpoint (kiln) for every checkpoint saved.
CREATE FUNCTION kiln_webhook_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM kiln_webhook_enqueue(
        j.project_id,
        'fine_tuning.job.checkpoint',
        json_build_object(
            'id', NEW.job_id,
            'checkpoint_id', NEW.id,
            'step', NEW.step,
            'metrics', NEW.metrics))
    FROM fine_tuning_jobs j WHERE j.id = NEW.job_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER fine_tuning_job_checkpoints_webhooks AFTER INSERT ON fine_tuning_job_checkpoints
    FOR EACH ROW EXECUTE FUNCTION kiln_webhook_checkpoint();
