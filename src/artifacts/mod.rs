//! Blob storage for uploaded files (and later checkpoints and models).
//!
//! A local directory by default. Writes go to a temporary file first and are renamed into
//! place only when complete, so a failed or oversized upload never leaves a partial blob
//! under a real key.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, BufWriter};

/// Handle to the artifact store.
#[derive(Debug, Clone)]
pub struct Artifacts {
    root: PathBuf,
}

/// A blob being written: removed on drop unless committed.
pub struct PendingBlob {
    path: PathBuf,
    writer: Option<BufWriter<tokio::fs::File>>,
    hasher: Sha256,
    bytes: u64,
}

impl Artifacts {
    /// Opens (creating) a local artifact directory.
    pub async fn local(root: impl Into<PathBuf>) -> std::io::Result<Artifacts> {
        let root = root.into();
        tokio::fs::create_dir_all(root.join("tmp")).await?;
        Ok(Artifacts { root })
    }

    /// Where a key lives on disk. Keys are made by kiln (`files/{project}/{id}`), never by users.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Starts a new blob in the temporary area.
    pub async fn begin(&self) -> std::io::Result<PendingBlob> {
        let path = self
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        Ok(PendingBlob {
            path,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Moves a complete blob under its key (durably: data flushed and synced first).
    pub async fn commit(&self, mut blob: PendingBlob, key: &str) -> std::io::Result<()> {
        let target = self.path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        if let Some(mut writer) = blob.writer.take() {
            writer.flush().await?;
            writer.get_mut().sync_all().await?;
        }
        tokio::fs::rename(&blob.path, &target).await?;
        blob.path = PathBuf::new(); // nothing left to clean up
        Ok(())
    }

    pub async fn open(&self, key: &str) -> std::io::Result<tokio::fs::File> {
        tokio::fs::File::open(self.path(key)).await
    }

    /// Removes a blob; a blob already gone is not an error.
    pub async fn delete(&self, key: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes temporary blobs older than `age` left by a process that died mid-upload.
    /// Younger ones may belong to a live upload of another process sharing the directory.
    pub async fn sweep_tmp(&self, age: std::time::Duration) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut dir = tokio::fs::read_dir(self.root.join("tmp")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|elapsed| elapsed > age);
            if old && tokio::fs::remove_file(entry.path()).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl PendingBlob {
    /// Appends bytes, hashing as they pass.
    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        match self.writer.as_mut() {
            Some(writer) => writer.write_all(chunk).await,
            None => Err(std::io::Error::other("blob already committed")),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hex SHA-256 of everything written so far.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            // Best effort: an upload that failed or was rejected leaves nothing behind.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
