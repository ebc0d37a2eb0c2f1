//! Blob storage for uploaded files, checkpoints and models.
//!
//! A local directory by default (`$KILN_DATA_DIR/artifacts`), or S3-compatible object storage
//! (`KILN_ARTIFACTS=s3://bucket/prefix`) so that workers on other machines share one store.
//!
//! Writes go to a temporary file first and become visible under their key only when
//! complete, so a failed or oversized upload never leaves a partial blob under a real key.
//! With object storage, readers that need a filesystem path ([`Artifacts::local_path`],
//! [`Artifacts::local_dir`]) get a copy downloaded once into a local cache directory; keys are
//! made by kiln and never rewritten with different bytes, so a cached copy stays valid.
//! Directories (checkpoints, models) are stored as one object per file under the key.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

/// Files up to this size are uploaded with one PUT; larger ones in parts.
const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;
/// Parts of a multipart upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 4;

/// Handle to the artifact store.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The local directory: the store itself, or the cache in front of object storage. Its
    /// `tmp/` holds blobs being written and job scratch space.
    root: PathBuf,
    remote: Option<Remote>,
}

#[derive(Debug, Clone)]
struct Remote {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket (no leading or trailing `/`; may be empty).
    prefix: String,
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
    pub async fn local(root: impl Into<PathBuf>) -> io::Result<Artifacts> {
        let root = root.into();
        tokio::fs::create_dir_all(root.join("tmp")).await?;
        Ok(Artifacts { root, remote: None })
    }

    /// Opens the store a setting names: `s3://bucket[/prefix][?option=value&...]` for object
    /// storage (configured from the usual `AWS_*` variables, which the query options
    /// override, e.g. `endpoint`, `region`, `allow_http`), any other value a local
    /// directory, and none `$data_dir/artifacts`. Object storage caches under
    /// `$data_dir/artifact-cache`.
    pub async fn open_setting(setting: Option<&str>, data_dir: &Path) -> io::Result<Artifacts> {
        match setting.map(str::trim).filter(|s| !s.is_empty()) {
            None => Artifacts::local(data_dir.join("artifacts")).await,
            Some(url) if url.starts_with("s3://") => {
                let (location, query) = url.split_once('?').unwrap_or((url, ""));
                let rest = &location["s3://".len()..];
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the artifact store URL names no bucket",
                    ));
                }
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
                    let key: AmazonS3ConfigKey = key
                        .parse()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
                    builder = builder.with_config(key, value);
                }
                let store = builder.build().map_err(io::Error::from)?;
                Artifacts::object_store(Arc::new(store), prefix, data_dir.join("artifact-cache"))
                    .await
            }
            Some(dir) => Artifacts::local(PathBuf::from(dir)).await,
        }
    }

    /// Object storage under `prefix`, cached in the local directory `cache`.
    pub async fn object_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        cache: impl Into<PathBuf>,
    ) -> io::Result<Artifacts> {
        let root = cache.into();
        tokio::fs::create_dir_all(root.join("tmp")).await?;
        Ok(Artifacts {
            root,
            remote: Some(Remote {
                store,
                prefix: prefix.trim_matches('/').to_owned(),
            }),
        })
    }

    /// Whether blobs live in object storage (and the local directory is only a cache).
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Where a key lives (or is cached) on disk. Keys are made by kiln
    /// (`files/{project}/{id}`), never by users.
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn temp_path(&self) -> PathBuf {
        self.root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Starts a new blob in the temporary area.
    pub async fn begin(&self) -> io::Result<PendingBlob> {
        let path = self.temp_path();
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

    /// Stores a complete blob under its key (durably: data flushed and synced first, or
    /// uploaded to object storage).
    pub async fn commit(&self, mut blob: PendingBlob, key: &str) -> io::Result<()> {
        if let Some(mut writer) = blob.writer.take() {
            writer.flush().await?;
            writer.get_mut().sync_all().await?;
        }
        if let Some(remote) = &self.remote {
            remote.upload_file(&blob.path, key).await?;
            // The temporary file is removed when `blob` drops.
            return Ok(());
        }
        let target = self.path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&blob.path, &target).await?;
        blob.path = PathBuf::new(); // nothing left to clean up
        Ok(())
    }

    /// A local file holding the blob: the blob itself, or (object storage) a cached copy,
    /// downloaded on first use.
    pub async fn local_path(&self, key: &str) -> io::Result<PathBuf> {
        let target = self.path(key);
        let Some(remote) = &self.remote else {
            tokio::fs::metadata(&target).await?;
            return Ok(target);
        };
        if tokio::fs::metadata(&target)
            .await
            .is_ok_and(|m| m.is_file())
        {
            return Ok(target);
        }
        let temp = self.temp_path();
        let downloaded = remote.download_file(&remote.location(key), &temp).await;
        if let Err(e) = downloaded {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        if let Err(e) = tokio::fs::rename(&temp, &target).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
        Ok(target)
    }

    /// Opens a blob for reading.
    pub async fn open(&self, key: &str) -> io::Result<tokio::fs::File> {
        tokio::fs::File::open(self.local_path(key).await?).await
    }

    /// Removes a blob; a blob already gone is not an error.
    pub async fn delete(&self, key: &str) -> io::Result<()> {
        let local = match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if let Some(remote) = &self.remote {
            match remote.store.delete(&remote.location(key)).await {
                Err(object_store::Error::NotFound { .. }) | Ok(()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        local
    }

    /// Moves a local directory (a checkpoint, a model) under `key`, replacing what was there.
    /// With object storage every file becomes one object under the key, and the directory
    /// moves into the cache.
    pub async fn put_dir(&self, dir: &Path, key: &str) -> io::Result<()> {
        if let Some(remote) = &self.remote {
            let mut files = Vec::new();
            list_files(dir, String::new(), &mut files).await?;
            // Replace, not merge: a rewritten key keeps none of its old files.
            remote.delete_prefix(key).await?;
            for (path, relative) in files {
                remote
                    .upload_file(&path, &format!("{key}/{relative}"))
                    .await?;
            }
        }
        let target = self.path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        if tokio::fs::metadata(&target).await.is_ok() {
            tokio::fs::remove_dir_all(&target).await?;
        }
        tokio::fs::rename(dir, &target).await
    }

    /// A local directory holding what [`Artifacts::put_dir`] stored under `key`: the
    /// directory itself, or (object storage) a cached copy, downloaded on first use.
    pub async fn local_dir(&self, key: &str) -> io::Result<PathBuf> {
        let target = self.path(key);
        let Some(remote) = &self.remote else {
            tokio::fs::metadata(&target).await?;
            return Ok(target);
        };
        if tokio::fs::metadata(&target).await.is_ok_and(|m| m.is_dir()) {
            return Ok(target);
        }
        let temp = self.temp_path();
        let fetched = async {
            let prefix = remote.location(key);
            let objects: Vec<_> = remote
                .store
                .list(Some(&prefix))
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            if objects.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no artifacts under {key}"),
                ));
            }
            for object in objects {
                let Some(parts) = object.location.prefix_match(&prefix) else {
                    continue;
                };
                let mut local = temp.clone();
                for part in parts {
                    let part = part.as_ref();
                    if part == ".." || part == "." || part.is_empty() {
                        return Err(io::Error::other(format!("odd object name under {key}")));
                    }
                    local.push(part);
                }
                if let Some(parent) = local.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                remote.download_file(&object.location, &local).await?;
            }
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::rename(&temp, &target).await
        };
        match fetched.await {
            Ok(()) => Ok(target),
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&temp).await;
                // Another task may have fetched the same directory first.
                if tokio::fs::metadata(&target).await.is_ok_and(|m| m.is_dir()) {
                    Ok(target)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Removes what [`Artifacts::put_dir`] stored under `key`; nothing there is not an error.
    pub async fn delete_dir(&self, key: &str) -> io::Result<()> {
        let local = match tokio::fs::remove_dir_all(self.path(key)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if let Some(remote) = &self.remote {
            remote.delete_prefix(key).await?;
        }
        local
    }

    /// Removes temporary blobs older than `age` left by a process that died mid-upload.
    /// Younger ones may belong to a live upload of another process sharing the directory.
    pub async fn sweep_tmp(&self, age: std::time::Duration) -> io::Result<usize> {
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

    /// The local directory: the store, or the cache in front of object storage.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Remote {
    fn location(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Uploads a local file: one PUT when small, in parts otherwise (never whole in memory).
    async fn upload_file(&self, path: &Path, key: &str) -> io::Result<()> {
        let location = self.location(key);
        let mut file = tokio::fs::File::open(path).await?;
        let size = file.metadata().await?.len();
        if size <= SINGLE_PUT_MAX {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await?;
            self.store
                .put(&location, PutPayload::from(bytes))
                .await
                .map_err(io::Error::from)?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&location)
            .await
            .map_err(io::Error::from)?;
        let mut writer = WriteMultipart::new(upload);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e);
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                return Err(e.into());
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(io::Error::from)?;
        Ok(())
    }

    /// Streams an object into a new local file (synced before returning).
    async fn download_file(&self, location: &ObjectPath, to: &Path) -> io::Result<()> {
        let result = self.store.get(location).await.map_err(io::Error::from)?;
        let mut stream = result.into_stream();
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .await?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        while let Some(chunk) = stream.next().await {
            writer.write_all(&chunk.map_err(io::Error::from)?).await?;
        }
        writer.flush().await?;
        writer.get_mut().sync_all().await
    }

    /// Deletes every object under `key/`.
    async fn delete_prefix(&self, key: &str) -> io::Result<()> {
        let prefix = self.location(key);
        let mut listing = self.store.list(Some(&prefix));
        while let Some(object) = listing.next().await {
            let object = object.map_err(io::Error::from)?;
            match self.store.delete(&object.location).await {
                Err(object_store::Error::NotFound { .. }) | Ok(()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Every regular file under `dir`, with its `/`-separated path relative to `dir`.
async fn list_files(
    dir: &Path,
    relative: String,
    out: &mut Vec<(PathBuf, String)>,
) -> io::Result<()> {
    let mut pending = vec![(dir.to_path_buf(), relative)];
    while let Some((dir, relative)) = pending.pop() {
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if relative.is_empty() {
                name
            } else {
                format!("{relative}/{name}")
            };
            let kind = entry.file_type().await?;
            if kind.is_dir() {
                pending.push((entry.path(), rel));
            } else if kind.is_file() {
                out.push((entry.path(), rel));
            }
        }
    }
    Ok(())
}

impl PendingBlob {
    /// Appends bytes, hashing as they pass.
    pub async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        match self.writer.as_mut() {
            Some(writer) => writer.write_all(chunk).await,
            None => Err(io::Error::other("blob already committed")),
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
