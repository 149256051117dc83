//! The artifact directory: files named by their SHA-256, written to a temp file and renamed into place,
//! so a reader never sees a partial file and identical content is stored once.

use std::{
    io,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

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
}

impl ArtifactStore {
    /// Opens (and creates) the directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, ArtifactError> {
        let root = root.into();
        tokio::fs::create_dir_all(root.join("tmp")).await?;
        Ok(Self { root })
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ArtifactError::InvalidDigest);
        }
        Ok(self.root.join(&sha256[..2]).join(sha256))
    }

    /// Stores `data`, returning its digest.
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn put(&self, data: &[u8]) -> Result<StoredArtifact, ArtifactError> {
        let mut w = self.writer().await?;
        w.write_chunk(data).await?;
        w.finish().await
    }

    /// Starts a streamed write.
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn writer(&self) -> Result<ArtifactWriter, ArtifactError> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(ArtifactWriter { store: self.clone(), tmp, file, hasher: Sha256::new(), size: 0 })
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

/// A streamed artifact write: bytes are hashed on the way; `finish` renames into place.
#[derive(Debug)]
pub struct ArtifactWriter {
    store: ArtifactStore,
    tmp: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    size: u64,
}

impl ArtifactWriter {
    /// Appends bytes.
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn write_chunk(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.file.write_all(data).await?;
        Ok(())
    }

    /// Flushes, syncs and renames the file to its digest.
    ///
    /// # Errors
    /// Filesystem failures.
    pub async fn finish(mut self) -> Result<StoredArtifact, ArtifactError> {
        self.file.flush().await?;
        self.file.sync_data().await?;
        let sha256 = hex::encode(self.hasher.finalize_reset());
        let path = self.store.path_of(&sha256)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::rename(&self.tmp, &path).await?;
        Ok(StoredArtifact { sha256, size: self.size })
    }
}

impl tokio::io::AsyncWrite for ArtifactWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.file).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                this.hasher.update(&buf[..n]);
                this.size += n as u64;
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_is_content_addressed_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).await.unwrap();
        let a = store.put(b"hello").await.unwrap();
        assert_eq!(a.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(a.size, 5);
        assert_eq!(store.read(&a.sha256).await.unwrap(), b"hello");
        let b = store.put(b"hello").await.unwrap();
        assert_eq!(a, b);
        // No temp files are left behind.
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        store.delete(&a.sha256).await.unwrap();
        assert!(!store.exists(&a.sha256).await);
        assert!(matches!(store.read("../etc/passwd").await, Err(ArtifactError::InvalidDigest)));
    }
}
