-- Projects own everything a key can see: files now, jobs and models later.
CREATE TABLE projects (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys are stored as SHA-256 of the whole key; `prefix` is the public part used to find
-- the row, so the secret itself is only ever compared (in constant time) as a hash.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    project_id    text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    prefix        text NOT NULL UNIQUE,
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    name          text,
    is_admin      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE INDEX api_keys_project ON api_keys (project_id);

-- Uploaded files. Ids are UUIDv7-based, so ordering by id is ordering by creation time and
-- the id alone is the pagination cursor.
CREATE TABLE files (
    id              text PRIMARY KEY,
    project_id      text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    filename        text NOT NULL,
    purpose         text NOT NULL,
    bytes           bigint NOT NULL CHECK (bytes >= 0),
    sha256          text NOT NULL CHECK (length(sha256) = 64),
    storage_key     text NOT NULL,
    status          text NOT NULL CHECK (status IN ('uploaded', 'processed', 'error')),
    status_details  text,
    validation      jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    validated_at    timestamptz,
    -- A file has a validation verdict exactly when it has left 'uploaded'.
    CHECK ((status = 'uploaded') = (validated_at IS NULL)),
    -- Only an error carries details.
    CHECK (status = 'error' OR status_details IS NULL)
);
CREATE INDEX files_project_id ON files (project_id, id);
CREATE INDEX files_pending_validation ON files (created_at) WHERE status = 'uploaded';
