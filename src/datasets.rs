//! Background validation of uploaded fine-tuning datasets.
//!
//! An upload returns as soon as its bytes are stored (`status: "uploaded"`); the validator
//! then parses the file off the async runtime and records `processed` or `error` with the
//! problems found. Files left `uploaded` by a process that stopped are picked up again at
//! start.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::artifacts::Artifacts;
use crate::data;
use crate::store::Store;
use crate::store::files::FileRow;

/// Purposes whose uploads are parsed as training data.
pub const VALIDATED_PURPOSE: &str = "fine-tune";

/// Handle that validates files in the background, a bounded number at a time.
#[derive(Clone)]
pub struct FileValidator {
    store: Store,
    artifacts: Artifacts,
    permits: Arc<Semaphore>,
}

impl FileValidator {
    pub fn new(store: Store, artifacts: Artifacts, concurrency: usize) -> FileValidator {
        FileValidator {
            store,
            artifacts,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Queues a file for validation and returns at once.
    pub fn spawn(&self, file: FileRow) {
        let this = self.clone();
        tokio::spawn(async move { this.validate(file).await });
    }

    /// Re-queues files whose validation never finished.
    pub async fn resume_pending(&self) -> anyhow::Result<usize> {
        let pending = self.store.files_pending_validation().await?;
        let n = pending.len();
        for file in pending {
            self.spawn(file);
        }
        Ok(n)
    }

    async fn validate(&self, file: FileRow) {
        let Ok(_permit) = self.permits.acquire().await else {
            return;
        };
        let path = match self.artifacts.local_path(&file.storage_key).await {
            Ok(path) => path,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return, // deleted meanwhile
            Err(e) => {
                tracing::error!(file = %file.id, error = %e, "could not fetch file for validation");
                return;
            }
        };
        let filename = file.filename.clone();
        let report =
            tokio::task::spawn_blocking(move || data::validate_dataset(&path, &filename)).await;
        let report = match report {
            Ok(Ok(report)) => report,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return, // deleted meanwhile
            Ok(Err(e)) => {
                tracing::error!(file = %file.id, error = %e, "could not read file for validation");
                return;
            }
            Err(e) => {
                tracing::error!(file = %file.id, error = %e, "validation task failed");
                return;
            }
        };
        let ok = report.is_valid();
        let details = (!ok).then(|| report.summary());
        let json = match serde_json::to_value(&report) {
            Ok(json) => json,
            Err(e) => {
                tracing::error!(file = %file.id, error = %e, "could not encode validation report");
                return;
            }
        };
        // The database may be briefly away: retry, then leave it to the next start.
        for attempt in 0..5u32 {
            match self
                .store
                .finish_file_validation(&file.id, ok, details.as_deref(), &json)
                .await
            {
                Ok(_) => {
                    tracing::info!(file = %file.id, ok, "file validated");
                    return;
                }
                Err(e) => {
                    tracing::warn!(file = %file.id, error = %e, attempt, "could not record validation");
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
            }
        }
    }
}
