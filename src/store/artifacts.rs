//! The artifact directory: files named by their SHA-256, written to a temp file and renamed into place, so
//! a reader never sees a partial file and identical content is stored once.
//!
//! Each write is one blocking task (create, write, optionally fsync, rename), not one thread hop per
//! system call; with [`Durability::Power`] the file and its directory are fsynced before the write
//! returns, otherwise the data is in the kernel's cache, which survives a process crash.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::Durability;

/// Bytes a streamed write keeps in memory before it spills to a temp file.
const SPILL_AT: usize = 4 << 20;

/// An artifact failure.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Filesystem failure.
    #[error("artifact i/o")]
    Io(#[from] io::Error),
    /// The digest is not 64 lowercase hex characters.
    #[error("invalid digest")]
    InvalidDigest,
}

/// A stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The content-addressed artifact directory.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    sync: bool,
}

impl ArtifactStore {
    /// Opens (and creates, readable by this user only) the directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub async fn open(root: impl Into<PathBuf>, durability: Durability) -> Result<Self, ArtifactError> {
        let root = root.into();
        let dir = root.clone();
        tokio::task::spawn_blocking(move || {
            super::sqlite::create_private_dir(&dir)?;
            super::sqlite::create_private_dir(&dir.join("tmp"))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Self { root, sync: durability == Durability::Power })
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ArtifactError::InvalidDigest);
        }
        Ok(self.root.join(&sha256[..2]).join(sha256))
    }

    /// Stores `data` (hashing it on the way), returning its digest.
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn put(&self, data: bytes::Bytes) -> Result<StoredArtifact, ArtifactError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let sha256 = hex::encode(Sha256::digest(&data));
            store.place(&sha256, Source::Bytes(&data))?;
            Ok(StoredArtifact { sha256, size: data.len() as u64 })
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Moves content into place under its digest (blocking). Content already there is kept: same digest,
    /// same bytes.
    fn place(&self, sha256: &str, source: Source<'_>) -> Result<(), ArtifactError> {
        let path = self.path_of(sha256)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        if path.exists() {
            if let Source::File(tmp) = source {
                let _ = std::fs::remove_file(tmp);
            }
            return Ok(());
        }
        let tmp = match source {
            Source::File(tmp) => tmp.to_path_buf(),
            Source::Bytes(data) => {
                let tmp = self.temp_path();
                let mut f = create_private_file(&tmp)?;
                f.write_all(data)?;
                if self.sync {
                    f.sync_data()?;
                }
                tmp
            }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        }
        std::fs::rename(&tmp, &path)?;
        if self.sync {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        Ok(())
    }

    fn temp_path(&self) -> PathBuf {
        self.root.join("tmp").join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Starts a streamed write (an output being downloaded).
    pub fn writer(&self) -> ArtifactWriter {
        ArtifactWriter { store: self.clone(), buf: Vec::new(), spill: None, hasher: Sha256::new(), size: 0 }
    }

    /// Reads a whole artifact.
    ///
    /// # Errors
    /// Missing file or invalid digest.
    pub async fn read(&self, sha256: &str) -> Result<Vec<u8>, ArtifactError> {
        Ok(tokio::fs::read(self.path_of(sha256)?).await?)
    }

    /// Opens an artifact for streaming.
    ///
    /// # Errors
    /// Missing file or invalid digest.
    pub async fn open_file(&self, sha256: &str) -> Result<tokio::fs::File, ArtifactError> {
        Ok(tokio::fs::File::open(self.path_of(sha256)?).await?)
    }

    /// Deletes an artifact; a missing one is not an error.
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn delete(&self, sha256: &str) -> Result<(), ArtifactError> {
        match tokio::fs::remove_file(self.path_of(sha256)?).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Whether the artifact exists.
    pub async fn exists(&self, sha256: &str) -> bool {
        match self.path_of(sha256) {
            Ok(p) => tokio::fs::try_exists(p).await.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// A new file readable by this user only.
fn create_private_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// A streamed artifact write: bytes are hashed on the way and kept in memory up to 4 MiB (beyond that they
/// spill to a temp file); [`ArtifactWriter::finish`] moves them into place in one blocking task.
#[derive(Debug)]
pub struct ArtifactWriter {
    store: ArtifactStore,
    buf: Vec<u8>,
    spill: Option<(PathBuf, std::fs::File)>,
    hasher: Sha256,
    size: u64,
}

impl ArtifactWriter {
    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if let Some((_, file)) = &mut self.spill {
            // Past 4 MiB (large outputs only): a blocking write on the runtime, bounded by the chunk size.
            return file.write_all(data);
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SPILL_AT {
            let path = self.store.temp_path();
            let mut file = create_private_file(&path)?;
            file.write_all(&self.buf)?;
            self.buf = Vec::new();
            self.spill = Some((path, file));
        }
        Ok(())
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// Filesystem failures (only once spilled).
    pub async fn write_chunk(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        Ok(self.push(data)?)
    }

    /// Moves the content into place under its digest (syncing it with `Durability::Power`).
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn finish(mut self) -> Result<StoredArtifact, ArtifactError> {
        let sha256 = hex::encode(self.hasher.finalize_reset());
        let size = self.size;
        let (store, buf, spill) = (self.store.clone(), std::mem::take(&mut self.buf), self.spill.take());
        tokio::task::spawn_blocking(move || {
            match spill {
                Some((path, file)) => {
                    if store.sync {
                        file.sync_data()?;
                    }
                    drop(file);
                    store.place(&sha256, Source::File(&path))?;
                }
                None => store.place(&sha256, Source::Bytes(&buf))?,
            }
            Ok(StoredArtifact { sha256, size })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        if let Some((path, _)) = self.spill.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl tokio::io::AsyncWrite for ArtifactWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(self.push(buf).map(|()| buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_is_content_addressed_and_atomic() {
        for durability in [Durability::Crash, Durability::Power] {
            let dir = tempfile::tempdir().unwrap();
            let store = ArtifactStore::open(dir.path(), durability).await.unwrap();
            let a = store.put(bytes::Bytes::from_static(b"hello")).await.unwrap();
            assert_eq!(a.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
            assert_eq!(a.size, 5);
            assert_eq!(store.read(&a.sha256).await.unwrap(), b"hello");
            let b = store.put(bytes::Bytes::from_static(b"hello")).await.unwrap();
            assert_eq!(a, b);
            // Streamed, in memory and spilled to a temp file: the same digest as a put.
            let mut w = store.writer();
            w.write_chunk(b"hel").await.unwrap();
            w.write_chunk(b"lo").await.unwrap();
            assert_eq!(w.finish().await.unwrap(), a);
            let big = vec![7u8; SPILL_AT + 10];
            let mut w = store.writer();
            for chunk in big.chunks(1 << 20) {
                w.write_chunk(chunk).await.unwrap();
            }
            let stored = w.finish().await.unwrap();
            assert_eq!(store.read(&stored.sha256).await.unwrap(), big);
            // No temp files are left behind.
            assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
            store.delete(&a.sha256).await.unwrap();
            assert!(!store.exists(&a.sha256).await);
            assert!(matches!(store.read("../etc/passwd").await, Err(ArtifactError::InvalidDigest)));
        }
    }
}
