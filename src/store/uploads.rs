//! Uploads in parts (OpenAI's Uploads API) and their parts.
//!
//! An upload's parts are blobs under `uploads/…`, one row each. Completing the upload
//! copies the listed parts, in order, into one new file; the file row and the upload's
//! `completed` state are written in one transaction, so a completion either happened
//! whole or not at all. Parts of uploads that can no longer complete (completed,
//! cancelled, or expired an hour or more ago) are removed by [`Store::take_dead_parts`].

use chrono::{DateTime, Utc};

use super::files::{FileRow, NewFile, insert_file};
use super::{Store, StoreResult};

/// An upload as the API shows it. `status` reads `expired` for a pending upload past its
/// `expires_at` (the table only ever stores `pending`, `completed` and `cancelled`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UploadRow {
    pub id: String,
    pub project_id: String,
    pub filename: String,
    pub purpose: String,
    pub mime_type: String,
    pub bytes: i64,
    pub status: String,
    pub file_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PartRow {
    pub id: String,
    pub upload_id: String,
    pub bytes: i64,
    pub storage_key: String,
    pub created_at: DateTime<Utc>,
}

/// What a new upload records.
#[derive(Debug, Clone)]
pub struct NewUpload<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub filename: &'a str,
    pub purpose: &'a str,
    pub mime_type: &'a str,
    pub bytes: i64,
    /// How long the upload takes parts.
    pub lifetime: std::time::Duration,
}

/// What [`Store::add_upload_part`] did.
#[derive(Debug)]
pub enum PartAdded {
    Added(PartRow),
    /// No such upload in the project.
    NotFound,
    /// The upload no longer takes parts; its status (`completed`, `cancelled`, `expired`).
    Closed(String),
    /// The parts would hold more than the upload may; nothing was recorded.
    Full {
        stored: i64,
    },
}

/// What [`Store::complete_upload`] did.
#[derive(Debug)]
pub enum Completed {
    Done(Box<(UploadRow, FileRow)>),
    NotFound,
    /// Completed, cancelled or expired meanwhile: nothing was recorded.
    Closed(String),
}

const UPLOAD_COLUMNS: &str = "id, project_id, filename, purpose, mime_type, bytes, \
     CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired' ELSE status END \
     AS status, file_id, created_at, expires_at";
const PART_COLUMNS: &str = "id, upload_id, bytes, storage_key, created_at";

impl Store {
    pub async fn insert_upload(&self, upload: &NewUpload<'_>) -> StoreResult<UploadRow> {
        let sql = format!(
            "INSERT INTO uploads (id, project_id, filename, purpose, mime_type, bytes, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
             RETURNING {UPLOAD_COLUMNS}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(upload.id)
            .bind(upload.project_id)
            .bind(upload.filename)
            .bind(upload.purpose)
            .bind(upload.mime_type)
            .bind(upload.bytes)
            .bind(upload.lifetime.as_secs_f64())
            .fetch_one(&self.pool)
            .await?)
    }

    /// One upload of the project, or None (also for other projects' uploads).
    pub async fn get_upload(&self, project_id: &str, id: &str) -> StoreResult<Option<UploadRow>> {
        let sql = format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE project_id = $1 AND id = $2");
        Ok(sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Records a part whose bytes are already stored under `part.storage_key`, if the upload
    /// still takes parts and its parts would then hold at most `max_stored` bytes. The upload
    /// row is locked first, so parts arriving at once are counted one after the other.
    pub async fn add_upload_part(
        &self,
        project_id: &str,
        part: &PartRow,
        max_stored: i64,
    ) -> StoreResult<PartAdded> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE project_id = $1 AND id = $2 FOR UPDATE"
        );
        let upload: Option<UploadRow> = sqlx::query_as(&sql)
            .bind(project_id)
            .bind(&part.upload_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(upload) = upload else {
            return Ok(PartAdded::NotFound);
        };
        if upload.status != "pending" {
            return Ok(PartAdded::Closed(upload.status));
        }
        // A new statement, so a new snapshot: it sees parts committed while we waited.
        let stored: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(bytes), 0)::bigint FROM upload_parts WHERE upload_id = $1",
        )
        .bind(&part.upload_id)
        .fetch_one(&mut *tx)
        .await?;
        if stored + part.bytes > max_stored {
            return Ok(PartAdded::Full { stored });
        }
        let sql = format!(
            "INSERT INTO upload_parts (id, upload_id, bytes, storage_key)
             VALUES ($1, $2, $3, $4) RETURNING {PART_COLUMNS}"
        );
        let row: PartRow = sqlx::query_as(&sql)
            .bind(&part.id)
            .bind(&part.upload_id)
            .bind(part.bytes)
            .bind(&part.storage_key)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PartAdded::Added(row))
    }

    /// The upload's parts, oldest first.
    pub async fn upload_parts(&self, upload_id: &str) -> StoreResult<Vec<PartRow>> {
        let sql = format!(
            "SELECT {PART_COLUMNS} FROM upload_parts WHERE upload_id = $1 ORDER BY created_at, id"
        );
        Ok(sqlx::query_as(&sql)
            .bind(upload_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Records the assembled file and marks the upload completed, in one transaction, if
    /// the upload is still pending (an upload that expired while its parts were being
    /// copied still completes: it was open when the client asked).
    pub async fn complete_upload(
        &self,
        project_id: &str,
        upload_id: &str,
        file: &NewFile<'_>,
        needs_validation: bool,
    ) -> StoreResult<Completed> {
        let mut tx = self.pool.begin().await?;
        let state: Option<String> = sqlx::query_scalar(
            "SELECT status FROM uploads WHERE project_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(project_id)
        .bind(upload_id)
        .fetch_optional(&mut *tx)
        .await?;
        match state.as_deref() {
            None => return Ok(Completed::NotFound),
            Some("pending") => {}
            Some(other) => return Ok(Completed::Closed(other.to_owned())),
        }
        let file_row = insert_file(&mut *tx, file, needs_validation).await?;
        let sql = format!(
            "UPDATE uploads SET status = 'completed', file_id = $2, completed_at = now()
             WHERE id = $1 RETURNING {UPLOAD_COLUMNS}"
        );
        let upload: UploadRow = sqlx::query_as(&sql)
            .bind(upload_id)
            .bind(file.id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Completed::Done(Box::new((upload, file_row))))
    }

    /// Cancels a pending upload. Returns the upload as it is afterwards and whether this
    /// call cancelled it, or None when there is no such upload in the project.
    pub async fn cancel_upload(
        &self,
        project_id: &str,
        id: &str,
    ) -> StoreResult<Option<(UploadRow, bool)>> {
        let sql = format!(
            "UPDATE uploads SET status = 'cancelled'
             WHERE project_id = $1 AND id = $2 AND status = 'pending' AND expires_at > now()
             RETURNING {UPLOAD_COLUMNS}"
        );
        let cancelled: Option<UploadRow> = sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = cancelled {
            return Ok(Some((row, true)));
        }
        Ok(self
            .get_upload(project_id, id)
            .await?
            .map(|row| (row, false)))
    }

    /// Removes every part row of an upload (after it completed or was cancelled) and
    /// returns them: their bytes are the caller's to delete.
    pub async fn remove_upload_parts(&self, upload_id: &str) -> StoreResult<Vec<PartRow>> {
        let sql = format!("DELETE FROM upload_parts WHERE upload_id = $1 RETURNING {PART_COLUMNS}");
        Ok(sqlx::query_as(&sql)
            .bind(upload_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Removes up to `limit` rows of parts that no upload can use any more (completed or
    /// cancelled uploads, and uploads expired at least `grace` ago, so that a completion
    /// that began just before the expiry is not robbed of its parts) and returns them: their
    /// bytes are the caller's to delete. Rows are claimed with SKIP LOCKED, so several
    /// processes may sweep at once without taking the same part twice.
    pub async fn take_dead_parts(
        &self,
        grace: std::time::Duration,
        limit: i64,
    ) -> StoreResult<Vec<PartRow>> {
        let sql = format!(
            "DELETE FROM upload_parts WHERE id IN (
                 SELECT p.id FROM upload_parts p JOIN uploads u ON u.id = p.upload_id
                 WHERE u.status <> 'pending'
                    OR u.expires_at <= now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE OF p SKIP LOCKED)
             RETURNING {PART_COLUMNS}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(grace.as_secs_f64())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}
