-- The Uploads API (OpenAI's /v1/uploads): a large file sent in parts of up to 64 MiB, which
-- become one file when the client completes the upload with the parts' order. An upload
-- accepts parts for an hour; after that it reads as `expired`, and its parts are removed,
-- as a cancelled or completed upload's are.
CREATE TABLE uploads (
    id          text PRIMARY KEY,
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    filename    text NOT NULL,
    purpose     text NOT NULL,
    mime_type   text NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'completed', 'cancelled')),
    -- The file the upload became; NULL again once that file is deleted.
    file_id     text REFERENCES files (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    completed_at timestamptz,
    CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CHECK (status = 'completed' OR file_id IS NULL)
);
CREATE INDEX uploads_project_id ON uploads (project_id, id);

CREATE TABLE upload_parts (
    id          text PRIMARY KEY,
    upload_id   text NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    storage_key text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX upload_parts_upload ON upload_parts (upload_id);
