//! Fine-tuned models and checkpoints as the models API sees them: rows derived from succeeded
//! jobs (`fine_tuned_model`) and from stored checkpoints (`…:ckpt-step-N`).

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Queue;
use crate::store::StoreResult;

/// A fine-tuned model or a checkpoint of one.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelRow {
    /// `ft:{base}:{project}:{suffix}:{job}` (`:ckpt-step-N` for checkpoints).
    pub id: String,
    /// `fine_tuned` or `checkpoint`.
    pub kind: String,
    pub job_id: String,
    /// The project's name (the `owned_by` of the model).
    pub owner: String,
    /// The base model at the root of the lineage, and the model the job started from.
    pub base_model: String,
    pub parent_model: String,
    pub training_format: String,
    pub created_at: DateTime<Utc>,
    /// Where its files are in the artifact store.
    pub storage_key: String,
    /// Validation metrics (the selected checkpoint's, or this checkpoint's).
    pub metrics: Option<Value>,
    /// The worker's description of the model (`task`, `labels`); for checkpoints, the job's
    /// once it has succeeded.
    pub model_info: Option<Value>,
    /// The training step (checkpoints only).
    pub step: Option<i64>,
}

/// The rows of both kinds, newest first; `$1` the project, `$2` one id or NULL for all, `$3`
/// the job that id names (so one lookup reads one job's rows, by primary key); `$4`, `$5` the
/// `(created_at, id)` of the last row of the previous page (NULL for the first) and `$6` the
/// page's size.
const MODELS: &str = "
SELECT * FROM (
    SELECT j.fine_tuned_model AS id, 'fine_tuned' AS kind, j.id AS job_id, p.name AS owner,
           j.base_model, j.model AS parent_model, j.training_format,
           j.finished_at AS created_at, 'models/' || j.id AS storage_key, j.metrics,
           j.model_info, NULL::bigint AS step
    FROM fine_tuning_jobs j JOIN projects p ON p.id = j.project_id
    WHERE j.project_id = $1 AND j.state = 'succeeded' AND j.model_deleted_at IS NULL
      AND ($3::text IS NULL OR j.id = $3)
    UNION ALL
    SELECT 'ft:' || j.base_model || ':' || p.name || ':' || coalesce(j.suffix, '') || ':' || j.id
               || ':ckpt-step-' || c.step,
           'checkpoint', j.id, p.name, j.base_model, j.model, j.training_format, c.created_at,
           c.storage_key || '/model', c.metrics, j.model_info, c.step
    FROM fine_tuning_job_checkpoints c
    JOIN fine_tuning_jobs j ON j.id = c.job_id
    JOIN projects p ON p.id = j.project_id
    WHERE j.project_id = $1 AND ($3::text IS NULL OR j.id = $3)
) m
WHERE ($2::text IS NULL OR m.id = $2)
  AND ($4::timestamptz IS NULL OR m.created_at < $4 OR (m.created_at = $4 AND m.id > $5::text))
ORDER BY m.created_at DESC, m.id
LIMIT $6";

impl Queue {
    /// One page of the project's fine-tuned models and checkpoints, newest first: at most
    /// `limit` rows after `after` (the `(created_at, id)` of the previous page's last row).
    pub async fn list_models_page(
        &self,
        project_id: &str,
        after: Option<&(DateTime<Utc>, String)>,
        limit: i64,
    ) -> StoreResult<Vec<ModelRow>> {
        Ok(sqlx::query_as(MODELS)
            .bind(project_id)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1.as_str()))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// One fine-tuned model or checkpoint of the project.
    pub async fn find_model(&self, project_id: &str, id: &str) -> StoreResult<Option<ModelRow>> {
        // `ft:{base}:{project}:{suffix}:{job}[:ckpt-step-N]`: the job is the last part before
        // the checkpoint's step.
        let job = id
            .rsplit_once(":ckpt-step-")
            .map_or(id, |(model, _)| model)
            .rsplit(':')
            .next()
            .unwrap_or(id);
        Ok(sqlx::query_as(MODELS)
            .bind(project_id)
            .bind(id)
            .bind(job)
            .bind(None::<DateTime<Utc>>)
            .bind(None::<String>)
            .bind(1_i64)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Marks a fine-tuned model deleted; returns its job id, or None when the project has no
    /// such (undeleted) model. The caller removes the files.
    pub async fn delete_model(&self, project_id: &str, id: &str) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "UPDATE fine_tuning_jobs SET model_deleted_at = now()
             WHERE project_id = $1 AND fine_tuned_model = $2 AND state = 'succeeded'
               AND model_deleted_at IS NULL
             RETURNING id",
        )
        .bind(project_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }
}
