//! Uploaded files and their validation verdicts.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Store, StoreResult};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub project_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub sha256: String,
    pub storage_key: String,
    pub status: String,
    pub status_details: Option<String>,
    pub validation: Option<Value>,
    pub created_at: DateTime<Utc>,
}

/// What an upload records once its bytes are safely stored.
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub filename: &'a str,
    pub purpose: &'a str,
    pub bytes: i64,
    pub sha256: &'a str,
    pub storage_key: &'a str,
}

/// What [`Store::delete_file`] did.
#[derive(Debug)]
pub enum FileDeletion {
    /// The row is gone; its bytes are the caller's to remove.
    Deleted(Box<FileRow>),
    /// No such file in the project.
    NotFound,
    /// Unfinished jobs (up to five, oldest first) train on it; nothing was deleted.
    InUse(Vec<String>),
}

/// Sort direction of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// A page request: items strictly after the cursor `after` (an id) in `order`.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: i64,
    pub order: Order,
}

impl PageRequest {
    /// The cursor comparison and the sort direction of this page's order.
    pub fn sql_order(&self) -> (&'static str, &'static str) {
        match self.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        }
    }

    /// Rows fetched with `LIMIT limit + 1`, cut to the page, and whether more follow.
    pub fn cut<T>(&self, mut rows: Vec<T>) -> (Vec<T>, bool) {
        let has_more = rows.len() as i64 > self.limit;
        rows.truncate(self.limit as usize);
        (rows, has_more)
    }
}

const FILE_COLUMNS: &str = "id, project_id, filename, purpose, bytes, sha256, storage_key, \
     status, status_details, validation, created_at";

impl Store {
    /// Records an uploaded file. Files that need no validation are `processed` at once.
    pub async fn insert_file(
        &self,
        file: &NewFile<'_>,
        needs_validation: bool,
    ) -> StoreResult<FileRow> {
        insert_file(&self.pool, file, needs_validation).await
    }

    /// One file of the project, or None (also for other projects' files).
    pub async fn get_file(&self, project_id: &str, id: &str) -> StoreResult<Option<FileRow>> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE project_id = $1 AND id = $2");
        Ok(sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A page of the project's files, fetching one extra row to know whether more follow.
    pub async fn list_files(
        &self,
        project_id: &str,
        purpose: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<(Vec<FileRow>, bool)> {
        let (cmp, dir) = page.sql_order();
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files
             WHERE project_id = $1
               AND ($2::text IS NULL OR purpose = $2)
               AND ($3::text IS NULL OR id {cmp} $3)
             ORDER BY id {dir}
             LIMIT $4"
        );
        let rows: Vec<FileRow> = sqlx::query_as(&sql)
            .bind(project_id)
            .bind(purpose)
            .bind(page.after.as_deref())
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page.cut(rows))
    }

    /// Deletes the row and returns it, so the caller can remove the stored bytes; refuses
    /// while an unfinished job (queued, running, paused or waiting for a retry) trains on
    /// the file, since its next attempt would read the bytes again.
    ///
    /// The file row is locked first, so a job being created from the file at the same
    /// moment either commits before this looks for users (and is seen) or finds the file
    /// gone (job creation locks its files; see `INSERT_JOB`).
    pub async fn delete_file(&self, project_id: &str, id: &str) -> StoreResult<FileDeletion> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE project_id = $1 AND id = $2 FOR UPDATE"
        );
        let row: Option<FileRow> = sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(FileDeletion::NotFound);
        };
        // A new statement, so a new snapshot: it sees jobs committed while we waited.
        // Unfinished is `finished_at IS NULL` (the schema ties it to the terminal states).
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM fine_tuning_jobs
             WHERE project_id = $1 AND (training_file = $2 OR validation_file = $2)
               AND finished_at IS NULL
             ORDER BY created_at, id LIMIT 5",
        )
        .bind(project_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        if !users.is_empty() {
            return Ok(FileDeletion::InUse(users));
        }
        sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(FileDeletion::Deleted(Box::new(row)))
    }

    /// Records the validator's verdict. Only a file still `uploaded` changes, so a verdict
    /// arriving twice (two processes re-validating after a restart) is harmless.
    pub async fn finish_file_validation(
        &self,
        id: &str,
        ok: bool,
        status_details: Option<&str>,
        validation: &Value,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE files SET status = CASE WHEN $2 THEN 'processed' ELSE 'error' END,
                              status_details = CASE WHEN $2 THEN NULL ELSE $3 END,
                              validation = $4, validated_at = now()
             WHERE id = $1 AND status = 'uploaded'",
        )
        .bind(id)
        .bind(ok)
        .bind(status_details)
        .bind(validation)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Files whose validation never finished (the process stopped mid-way).
    pub async fn files_pending_validation(&self) -> StoreResult<Vec<FileRow>> {
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE status = 'uploaded' ORDER BY created_at LIMIT 1000"
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }
}

/// Inserts a file row on `db` (the pool, or a transaction that records more with it).
pub(super) async fn insert_file<'e>(
    db: impl sqlx::PgExecutor<'e>,
    file: &NewFile<'_>,
    needs_validation: bool,
) -> StoreResult<FileRow> {
    let sql = format!(
        "INSERT INTO files (id, project_id, filename, purpose, bytes, sha256, storage_key,
                            status, validated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 CASE WHEN $8 THEN 'uploaded' ELSE 'processed' END,
                 CASE WHEN $8 THEN NULL ELSE now() END)
         RETURNING {FILE_COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(file.id)
        .bind(file.project_id)
        .bind(file.filename)
        .bind(file.purpose)
        .bind(file.bytes)
        .bind(file.sha256)
        .bind(file.storage_key)
        .bind(needs_validation)
        .fetch_one(db)
        .await?)
}
