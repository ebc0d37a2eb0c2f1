//! Webhook endpoints and the delivery outbox (migrations/0004_webhooks.sql). Deliveries are
//! written by triggers in the transaction that changes a job; this module lists them, and
//! claims and settles them for the deliverers.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::files::PageRequest;
use super::{Store, StoreResult, new_id};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const ENDPOINT_COLUMNS: &str =
    "id, project_id, name, url, event_types, secret, created_at, updated_at";

/// A change to an endpoint; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct EndpointUpdate<'a> {
    pub name: Option<&'a str>,
    pub url: Option<&'a str>,
    pub event_types: Option<&'a [String]>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event_type, payload, state, attempts, \
     next_attempt_at, last_status, last_error, created_at, finished_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub delivery_id: String,
    pub attempt: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
    pub created_at: DateTime<Utc>,
}

/// A delivery claimed for one attempt, with what sending it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: String,
    pub event_type: String,
    pub payload: String,
    /// This attempt's number (1 for the first).
    pub attempts: i32,
    pub url: String,
    /// The current secret, then a previous one that is still valid.
    pub secrets: Vec<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration: Duration,
    pub succeeded: bool,
}

/// A fresh signing secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

impl Store {
    pub async fn create_webhook_endpoint(
        &self,
        project_id: &str,
        name: &str,
        url: &str,
        event_types: &[String],
    ) -> StoreResult<EndpointRow> {
        let sql = format!(
            "INSERT INTO webhook_endpoints (id, project_id, name, url, event_types, secret)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ENDPOINT_COLUMNS}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(new_id("whep_"))
            .bind(project_id)
            .bind(name)
            .bind(url)
            .bind(event_types)
            .bind(new_secret())
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn count_webhook_endpoints(&self, project_id: &str) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE project_id = $1")
                .bind(project_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn get_webhook_endpoint(
        &self,
        project_id: &str,
        id: &str,
    ) -> StoreResult<Option<EndpointRow>> {
        let sql = format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE project_id = $1 AND id = $2"
        );
        Ok(sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn list_webhook_endpoints(
        &self,
        project_id: &str,
        page: &PageRequest,
    ) -> StoreResult<(Vec<EndpointRow>, bool)> {
        let (cmp, dir) = page.sql_order();
        let sql = format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints
             WHERE project_id = $1 AND ($2::text IS NULL OR id {cmp} $2)
             ORDER BY id {dir} LIMIT $3"
        );
        let rows: Vec<EndpointRow> = sqlx::query_as(&sql)
            .bind(project_id)
            .bind(page.after.as_deref())
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page.cut(rows))
    }

    /// Applies the fields given; `updated_at` moves only when something changed.
    pub async fn update_webhook_endpoint(
        &self,
        project_id: &str,
        id: &str,
        update: &EndpointUpdate<'_>,
    ) -> StoreResult<Option<EndpointRow>> {
        let sql = format!(
            "UPDATE webhook_endpoints SET
                 name = COALESCE($3, name),
                 url = COALESCE($4, url),
                 event_types = COALESCE($5, event_types),
                 updated_at = CASE
                     WHEN (COALESCE($3, name), COALESCE($4, url), COALESCE($5, event_types))
                          IS DISTINCT FROM (name, url, event_types) THEN now()
                     ELSE updated_at END
             WHERE project_id = $1 AND id = $2
             RETURNING {ENDPOINT_COLUMNS}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .bind(update.name)
            .bind(update.url)
            .bind(update.event_types)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A new secret; the old one keeps signing for `keep_old` when given.
    pub async fn rotate_webhook_secret(
        &self,
        project_id: &str,
        id: &str,
        keep_old: Option<Duration>,
    ) -> StoreResult<Option<EndpointRow>> {
        let sql = format!(
            "UPDATE webhook_endpoints SET
                 previous_secret = CASE WHEN $4 THEN secret END,
                 previous_secret_expires_at = CASE WHEN $4 THEN now() + make_interval(secs => $5) END,
                 secret = $3,
                 updated_at = now()
             WHERE project_id = $1 AND id = $2
             RETURNING {ENDPOINT_COLUMNS}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(project_id)
            .bind(id)
            .bind(new_secret())
            .bind(keep_old.is_some())
            .bind(keep_old.unwrap_or_default().as_secs_f64())
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Deletes the endpoint and (by cascade) its pending deliveries.
    pub async fn delete_webhook_endpoint(&self, project_id: &str, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE project_id = $1 AND id = $2")
            .bind(project_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A page of an endpoint's deliveries, newest first, with every attempt of each.
    pub async fn list_webhook_deliveries(
        &self,
        endpoint_id: &str,
        page: &PageRequest,
    ) -> StoreResult<(Vec<(DeliveryRow, Vec<AttemptRow>)>, bool)> {
        let (cmp, dir) = page.sql_order();
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
             WHERE endpoint_id = $1
               AND ($2::text IS NULL OR seq {cmp} (SELECT seq FROM webhook_deliveries WHERE id = $2))
             ORDER BY seq {dir} LIMIT $3"
        );
        let rows: Vec<DeliveryRow> = sqlx::query_as(&sql)
            .bind(endpoint_id)
            .bind(page.after.as_deref())
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let (rows, has_more) = page.cut(rows);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let attempts: Vec<AttemptRow> = sqlx::query_as(
            "SELECT delivery_id, attempt, status_code, error, duration_ms, created_at
             FROM webhook_delivery_attempts WHERE delivery_id = ANY($1) ORDER BY seq",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let out = rows
            .into_iter()
            .map(|d| {
                let mine = attempts
                    .iter()
                    .filter(|a| a.delivery_id == d.id)
                    .cloned()
                    .collect();
                (d, mine)
            })
            .collect();
        Ok((out, has_more))
    }

    /// Claims up to `limit` due deliveries for one attempt each. The claim pushes
    /// `next_attempt_at` out by `lease`, so a deliverer that dies mid-attempt leaves the row
    /// to another one once the lease passes; SKIP LOCKED keeps deliverers on different rows.
    pub async fn claim_webhook_deliveries(
        &self,
        limit: i64,
        lease: Duration,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        Ok(sqlx::query_as(
            "WITH due AS (
                 SELECT id FROM webhook_deliveries
                 WHERE state = 'pending' AND next_attempt_at <= now()
                 ORDER BY next_attempt_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE webhook_deliveries d
             SET attempts = d.attempts + 1,
                 next_attempt_at = now() + make_interval(secs => $2)
             FROM due, webhook_endpoints e
             WHERE d.id = due.id AND e.id = d.endpoint_id
             RETURNING d.id, d.event_type, d.payload, d.attempts, e.url,
                 array_remove(ARRAY[e.secret,
                     CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END],
                     NULL) AS secrets",
        )
        .bind(limit)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records an attempt and settles the delivery: succeeded, failed for good after
    /// `max_attempts`, or due again after `retry_in`. Fenced on the attempt number, so a
    /// deliverer whose lease ran out cannot overwrite a newer attempt's outcome.
    pub async fn finish_webhook_attempt(
        &self,
        id: &str,
        attempt: i32,
        result: &AttemptResult,
        max_attempts: i32,
        retry_in: Duration,
    ) -> StoreResult<()> {
        let status = result.status_code.map(i32::from);
        let duration_ms = result.duration.as_millis().min(i32::MAX as u128) as i32;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_delivery_attempts (delivery_id, attempt, status_code, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (delivery_id, attempt) DO NOTHING",
        )
        .bind(id)
        .bind(attempt)
        .bind(status)
        .bind(result.error.as_deref())
        .bind(duration_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET
                 state = CASE WHEN $3 THEN 'succeeded'
                              WHEN attempts >= $6 THEN 'failed'
                              ELSE 'pending' END,
                 finished_at = CASE WHEN $3 OR attempts >= $6 THEN now() END,
                 next_attempt_at = CASE WHEN $3 OR attempts >= $6 THEN next_attempt_at
                                        ELSE now() + make_interval(secs => $7) END,
                 last_status = $4,
                 last_error = $5
             WHERE id = $1 AND attempts = $2 AND state = 'pending'",
        )
        .bind(id)
        .bind(attempt)
        .bind(result.succeeded)
        .bind(status)
        .bind(result.error.as_deref())
        .bind(max_attempts)
        .bind(retry_in.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a sample event for one endpoint, claimed for its one attempt (the caller
    /// sends it at once and settles it with `max_attempts` 1).
    pub async fn insert_test_delivery(
        &self,
        endpoint_id: &str,
        event_id: &str,
        event_type: &str,
        payload: &str,
    ) -> StoreResult<DeliveryRow> {
        let sql = format!(
            "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event_type, payload,
                                             attempts, next_attempt_at)
             VALUES ($1, $2, $3, $4, $5, 1, now() + interval '1 hour')
             RETURNING {DELIVERY_COLUMNS}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(new_id("msg_"))
            .bind(endpoint_id)
            .bind(event_id)
            .bind(event_type)
            .bind(payload)
            .fetch_one(&self.pool)
            .await?)
    }
}

/// The channel the delivery triggers notify (no payload: a hint to look for due rows).
pub const WEBHOOKS_CHANNEL: &str = "kiln_webhooks";

impl Store {
    /// A connection listening for new deliveries.
    pub async fn webhook_listener(&self) -> StoreResult<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(WEBHOOKS_CHANNEL).await?;
        Ok(listener)
    }
}

impl Store {
    /// The secrets a delivery to this endpoint is signed with now: the current one, and a
    /// rotated-out one while it is still valid. None when the endpoint is gone.
    pub async fn webhook_signing_secrets(
        &self,
        endpoint_id: &str,
    ) -> StoreResult<Option<Vec<String>>> {
        Ok(sqlx::query_scalar(
            "SELECT array_remove(ARRAY[secret,
                 CASE WHEN previous_secret_expires_at > now() THEN previous_secret END], NULL)
             FROM webhook_endpoints WHERE id = $1",
        )
        .bind(endpoint_id)
        .fetch_optional(&self.pool)
        .await?)
    }
}
