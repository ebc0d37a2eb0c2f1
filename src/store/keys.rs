//! Projects and their API keys.

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Store, StoreResult, new_id};

/// Name of the project the bootstrap admin key belongs to.
pub const DEFAULT_PROJECT: &str = "default";

/// Who is calling: resolved from the bearer key on every request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub project_id: String,
    pub key_id: String,
    pub is_admin: bool,
}

/// A key as listed (never with its secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: String,
    pub project_id: String,
    pub project_name: String,
    pub prefix: String,
    pub name: Option<String>,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A newly made key: the only time its secret is visible.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub row: ApiKeyRow,
    pub secret: String,
}

const KEY_PREFIX: &str = "sk-kiln-";

/// Keys look like `sk-kiln-<12 char public prefix>_<40 char secret>`.
fn generate_key() -> (String, String) {
    let mut rng = rand::rng();
    let prefix: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .take(12)
        .map(char::from)
        .collect();
    let secret: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    (prefix.clone(), format!("{KEY_PREFIX}{prefix}_{secret}"))
}

/// The public prefix of a well-formed kiln key, or None.
fn key_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (prefix, secret) = rest.split_once('_')?;
    (prefix.len() == 12 && !secret.is_empty()).then_some(prefix)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Store {
    /// Finds or creates a project by name.
    pub async fn ensure_project(&self, name: &str) -> StoreResult<String> {
        let id: String = sqlx::query_scalar(
            "INSERT INTO projects (id, name) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
             RETURNING id",
        )
        .bind(new_id("proj_"))
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Makes a key for the named project (created if missing).
    pub async fn create_api_key(
        &self,
        project: &str,
        name: Option<&str>,
        is_admin: bool,
    ) -> StoreResult<NewApiKey> {
        let project_id = self.ensure_project(project).await?;
        let (prefix, secret) = generate_key();
        let row: ApiKeyRow = sqlx::query_as(
            "WITH k AS (
                INSERT INTO api_keys (id, project_id, prefix, secret_sha256, name, is_admin)
                VALUES ($1, $2, $3, $4, $5, $6)
                RETURNING *)
             SELECT k.id, k.project_id, p.name AS project_name, k.prefix, k.name, k.is_admin,
                    k.created_at, k.revoked_at
             FROM k JOIN projects p ON p.id = k.project_id",
        )
        .bind(new_id("key_"))
        .bind(&project_id)
        .bind(&prefix)
        .bind(sha256(secret.as_bytes()).as_slice())
        .bind(name)
        .bind(is_admin)
        .fetch_one(&self.pool)
        .await?;
        Ok(NewApiKey { row, secret })
    }

    /// Creates the first admin key when no key exists at all (returns it so it can be
    /// printed once). Serialised with an advisory lock so two servers starting together
    /// do not both make one.
    pub async fn bootstrap_admin_key(&self) -> StoreResult<Option<NewApiKey>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln.bootstrap_admin_key'))")
            .execute(&mut *tx)
            .await?;
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
            .fetch_one(&mut *tx)
            .await?;
        if any {
            return Ok(None);
        }
        let (prefix, secret) = generate_key();
        let project_id: String = sqlx::query_scalar(
            "INSERT INTO projects (id, name) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
        )
        .bind(new_id("proj_"))
        .bind(DEFAULT_PROJECT)
        .fetch_one(&mut *tx)
        .await?;
        let row: ApiKeyRow = sqlx::query_as(
            "WITH k AS (
                INSERT INTO api_keys (id, project_id, prefix, secret_sha256, name, is_admin)
                VALUES ($1, $2, $3, $4, 'bootstrap admin', true) RETURNING *)
             SELECT k.id, k.project_id, $5::text AS project_name, k.prefix, k.name, k.is_admin,
                    k.created_at, k.revoked_at FROM k",
        )
        .bind(new_id("key_"))
        .bind(&project_id)
        .bind(&prefix)
        .bind(sha256(secret.as_bytes()).as_slice())
        .bind(DEFAULT_PROJECT)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(NewApiKey { row, secret }))
    }

    /// Resolves a bearer key to its principal. Unknown, malformed and revoked keys all give
    /// None; the hash comparison is constant-time.
    pub async fn authenticate(&self, key: &str) -> StoreResult<Option<Principal>> {
        let Some(prefix) = key_prefix(key) else {
            return Ok(None);
        };
        let row: Option<(String, String, Vec<u8>, bool)> = sqlx::query_as(
            "SELECT id, project_id, secret_sha256, is_admin FROM api_keys
             WHERE prefix = $1 AND revoked_at IS NULL",
        )
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(key_id, project_id, stored, is_admin)| {
            let presented = sha256(key.as_bytes());
            bool::from(presented.ct_eq(stored.as_slice())).then_some(Principal {
                project_id,
                key_id,
                is_admin,
            })
        }))
    }

    pub async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRow>> {
        Ok(sqlx::query_as(
            "SELECT k.id, k.project_id, p.name AS project_name, k.prefix, k.name, k.is_admin,
                    k.created_at, k.revoked_at
             FROM api_keys k JOIN projects p ON p.id = k.project_id ORDER BY k.id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Revokes a key; it stops working on the next request. Returns the key, or None.
    pub async fn revoke_api_key(&self, key_id: &str) -> StoreResult<Option<ApiKeyRow>> {
        Ok(sqlx::query_as(
            "WITH k AS (
                UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                WHERE id = $1 RETURNING *)
             SELECT k.id, k.project_id, p.name AS project_name, k.prefix, k.name, k.is_admin,
                    k.created_at, k.revoked_at
             FROM k JOIN projects p ON p.id = k.project_id",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// Compares a presented key with the configured admin key (`KILN_ADMIN_KEY`) in constant
/// time: both sides are hashed first, so neither length nor content leaks through timing.
pub fn matches_admin_key(presented: &str, admin_key_sha256: &[u8; 32]) -> bool {
    bool::from(sha256(presented.as_bytes()).ct_eq(admin_key_sha256))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_to_their_prefix() {
        let (prefix, key) = generate_key();
        assert_eq!(key_prefix(&key), Some(prefix.as_str()));
        assert!(key.starts_with("sk-kiln-"));
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        for key in [
            "",
            "sk-kiln-",
            "sk-kiln-short_x",
            "sk-other-abcdefghijkl_x",
            "abc",
        ] {
            assert_eq!(key_prefix(key), None, "{key}");
        }
    }

    #[test]
    fn admin_key_comparison() {
        let hash = sha256(b"secret-admin");
        assert!(matches_admin_key("secret-admin", &hash));
        assert!(!matches_admin_key("secret-admin ", &hash));
        assert!(!matches_admin_key("", &hash));
    }
}
