//! The artifact store: content named by its SHA-256, so identical content is stored once, in one of two
//! backends behind one API:
//!
//! - a directory (the default): each file is written to a temp file and renamed into place, so a reader
//!   never sees a partial file. Each write is one blocking task (create, write, optionally fsync, rename),
//!   not one thread hop per system call; with [`Durability::Power`] the file and its directory are fsynced
//!   before the write returns, otherwise the data is in the kernel's cache, which survives a process crash.
//! - an object store (`storage.artifacts_url`: S3 or S3-compatible, or `file://` for tests), shared by
//!   replicas without a shared volume. Keys are `<prefix>/<sha[..2]>/<sha>`, like the directory layout; an
//!   object store's put is atomic and durable when it returns.
//!
//! Whatever the backend, what is read back is checked against its digest: a corrupted artifact is an
//! error ([`ArtifactError::Corrupt`]), never served.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use object_store::{ObjectStore, PutPayload, WriteMultipart, path::Path as ObjectPath};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _, ReadBuf};

use super::Durability;

/// Bytes a streamed write keeps in memory before it spills to a temp file.
const SPILL_AT: usize = 4 << 20;

/// The part size of a multipart upload (S3 wants at least 5 MiB per part but the last).
const PART_SIZE: usize = 8 << 20;

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// An artifact failure. Messages never hold credentials (they are read from the environment, never part of
/// the URL).
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Filesystem failure.
    #[error("artifact i/o")]
    Io(#[from] io::Error),
    /// The digest is not 64 lowercase hex characters.
    #[error("invalid digest")]
    InvalidDigest,
    /// The object store failed.
    #[error("artifact object store")]
    Object(#[from] object_store::Error),
    /// `storage.artifacts_url` is not a supported URL.
    #[error("storage.artifacts_url: {0}")]
    InvalidUrl(&'static str),
    /// The stored bytes do not hash to their name: the artifact is corrupted.
    #[error("artifact {sha256} failed its integrity check (its bytes do not match its SHA-256)")]
    Corrupt {
        /// The digest it is stored under.
        sha256: String,
    },
}

/// A stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// An artifact opened for streaming (see [`ArtifactStore::open_file`]): its bytes, checked against the
/// digest at the end (a mismatch is an `InvalidData` error instead of the end of the stream).
pub type ArtifactReader = Box<dyn AsyncRead + Send + Unpin>;

/// Checks an `storage.artifacts_url` without echoing it: `s3://bucket[/prefix]` or `file:///absolute/dir`.
///
/// # Errors
/// Why the URL is refused.
pub fn check_artifacts_url(url: &str) -> Result<(), &'static str> {
    const WHAT: &str = "must be s3://bucket/prefix or file:///absolute/path";
    let parsed = url::Url::parse(url).map_err(|_| WHAT)?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not hold credentials (use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("must not have a query or fragment");
    }
    match parsed.scheme() {
        "s3" => {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err("must name a bucket (s3://bucket/prefix)");
            }
            let prefix = parsed.path();
            let ok = |b: u8| b.is_ascii_alphanumeric() || b"/-_.".contains(&b);
            if !prefix.bytes().all(ok) || prefix.split('/').any(|p| p == "." || p == "..") {
                return Err("the prefix may only hold letters, digits, '-', '_', '.' and '/'");
            }
            Ok(())
        }
        "file" => {
            if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                return Err("must be file:///absolute/path (three slashes, no host)");
            }
            match parsed.to_file_path() {
                Ok(p) if p.is_absolute() && p.parent().is_some() => Ok(()),
                _ => Err("must be file:///absolute/path naming a directory other than /"),
            }
        }
        _ => Err(WHAT),
    }
}

/// The content-addressed artifact store.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Dir(Dir),
    Objects(Objects),
}

/// The directory backend.
#[derive(Debug, Clone)]
struct Dir {
    root: PathBuf,
    sync: bool,
}

/// The object store backend.
#[derive(Clone)]
struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl std::fmt::Debug for Objects {
    // Not the store's own Debug: it may show its configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").field("prefix", &self.prefix.as_ref()).finish_non_exhaustive()
    }
}

fn check_digest(sha256: &str) -> Result<(), ArtifactError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ArtifactError::InvalidDigest);
    }
    Ok(())
}

fn verify(sha256: &str, data: &[u8]) -> Result<(), ArtifactError> {
    if hex::encode(Sha256::digest(data)) != sha256 {
        return Err(ArtifactError::Corrupt { sha256: sha256.to_string() });
    }
    Ok(())
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
        Ok(Self { backend: Backend::Dir(Dir { root, sync: durability == Durability::Power }) })
    }

    /// Opens an object store (`storage.artifacts_url`): `s3://bucket/prefix`, with credentials, region and
    /// endpoint from the standard `AWS_*` environment variables, or `file:///absolute/path` (created,
    /// readable by this user only). Nothing is contacted yet.
    ///
    /// # Errors
    /// An unsupported URL, or an S3 configuration object_store refuses.
    pub async fn open_url(url: &str) -> Result<Self, ArtifactError> {
        check_artifacts_url(url).map_err(ArtifactError::InvalidUrl)?;
        let parsed = url::Url::parse(url).map_err(|_| ArtifactError::InvalidUrl("unparsable"))?;
        let (store, prefix): (Arc<dyn ObjectStore>, _) = match parsed.scheme() {
            "s3" => {
                let s3 = object_store::aws::AmazonS3Builder::from_env().with_url(url).build()?;
                let prefix =
                    ObjectPath::parse(parsed.path().trim_matches('/')).map_err(object_store::Error::from)?;
                (Arc::new(s3), prefix)
            }
            _ => {
                let dir = parsed.to_file_path().map_err(|()| ArtifactError::InvalidUrl("not a file path"))?;
                let create = dir.clone();
                tokio::task::spawn_blocking(move || super::sqlite::create_private_dir(&create))
                    .await
                    .map_err(io::Error::other)??;
                (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?), ObjectPath::default())
            }
        };
        Ok(Self::with_object_store(store, prefix))
    }

    /// An object store backend over `store`, keys under `prefix`.
    fn with_object_store(store: Arc<dyn ObjectStore>, prefix: ObjectPath) -> Self {
        Self { backend: Backend::Objects(Objects { store, prefix }) }
    }

    /// Stores `data` (hashing it on the way), returning its digest.
    ///
    /// # Errors
    /// Filesystem or object store failures.
    pub async fn put(&self, data: Bytes) -> Result<StoredArtifact, ArtifactError> {
        match &self.backend {
            Backend::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    let sha256 = hex::encode(Sha256::digest(&data));
                    dir.place(&sha256, Source::Bytes(&data))?;
                    Ok(StoredArtifact { sha256, size: data.len() as u64 })
                })
                .await
                .map_err(io::Error::other)?
            }
            Backend::Objects(objects) => {
                let sha256 = hex::encode(Sha256::digest(&data));
                let size = data.len() as u64;
                objects.put(&sha256, data).await?;
                Ok(StoredArtifact { sha256, size })
            }
        }
    }

    /// Starts a streamed write (an output being downloaded).
    pub fn writer(&self) -> ArtifactWriter {
        ArtifactWriter { store: self.clone(), buf: Vec::new(), spill: None, hasher: Sha256::new(), size: 0 }
    }

    /// Reads a whole artifact, checking it against its digest.
    ///
    /// # Errors
    /// Missing artifact, invalid digest, or [`ArtifactError::Corrupt`].
    pub async fn read(&self, sha256: &str) -> Result<Vec<u8>, ArtifactError> {
        let data = match &self.backend {
            Backend::Dir(dir) => tokio::fs::read(dir.path_of(sha256)?).await?,
            Backend::Objects(objects) => {
                objects.store.get(&objects.key(sha256)?).await?.bytes().await?.to_vec()
            }
        };
        verify(sha256, &data)?;
        Ok(data)
    }

    /// Opens an artifact for streaming from byte `offset` on (to resume a cut download): a reader that fails
    /// with `InvalidData` at the end instead of ending when the bytes do not match the digest. The bytes
    /// before `offset` are read and hashed, not passed on, so the whole file is still checked.
    ///
    /// # Errors
    /// Missing artifact or invalid digest. The prefix is read by the reader's first read, where its
    /// failures (and an `offset` past the end: `UnexpectedEof`) surface, so a caller's read loop bounds it
    /// as it bounds the rest (its shutdown, its client going away).
    pub async fn open_file(&self, sha256: &str, offset: u64) -> Result<ArtifactReader, ArtifactError> {
        let mut verified = self.verified(sha256).await?;
        verified.skip = offset;
        Ok(Box::new(verified))
    }

    /// The artifact's bytes through a [`Verified`] reader.
    async fn verified(&self, sha256: &str) -> Result<Verified, ArtifactError> {
        let inner: ArtifactReader = match &self.backend {
            Backend::Dir(dir) => Box::new(tokio::fs::File::open(dir.path_of(sha256)?).await?),
            Backend::Objects(objects) => {
                use futures::TryStreamExt as _;
                let stream = objects.store.get(&objects.key(sha256)?).await?.into_stream();
                Box::new(tokio_util::io::StreamReader::new(stream.map_err(io::Error::other)))
            }
        };
        Ok(Verified {
            inner,
            hasher: Sha256::new(),
            expected: sha256.to_string(),
            ended: false,
            skip: 0,
            scratch: Vec::new(),
        })
    }

    /// Deletes an artifact; a missing one is not an error.
    ///
    /// # Errors
    /// Filesystem or object store failures.
    pub async fn delete(&self, sha256: &str) -> Result<(), ArtifactError> {
        match &self.backend {
            Backend::Dir(dir) => match tokio::fs::remove_file(dir.path_of(sha256)?).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
            Backend::Objects(objects) => match objects.store.delete(&objects.key(sha256)?).await {
                Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => Err(e.into()),
                _ => Ok(()),
            },
        }
    }

    /// Whether the artifact exists.
    pub async fn exists(&self, sha256: &str) -> bool {
        match &self.backend {
            Backend::Dir(dir) => match dir.path_of(sha256) {
                Ok(p) => tokio::fs::try_exists(p).await.unwrap_or(false),
                Err(_) => false,
            },
            Backend::Objects(objects) => match objects.key(sha256) {
                Ok(key) => objects.store.head(&key).await.is_ok(),
                Err(_) => false,
            },
        }
    }

    /// The root directory; `None` for an object store.
    pub fn root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Dir(dir) => Some(&dir.root),
            Backend::Objects(_) => None,
        }
    }
}

impl Dir {
    fn path_of(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        check_digest(sha256)?;
        Ok(self.root.join(&sha256[..2]).join(sha256))
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
}

impl Objects {
    fn key(&self, sha256: &str) -> Result<ObjectPath, ArtifactError> {
        check_digest(sha256)?;
        Ok(self.prefix.child(&sha256[..2]).child(sha256))
    }

    /// Whether the object is there (a HEAD request).
    async fn has(&self, key: &ObjectPath) -> Result<bool, ArtifactError> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads `data` under `sha256` unless it is already there.
    async fn put(&self, sha256: &str, data: Bytes) -> Result<(), ArtifactError> {
        let key = self.key(sha256)?;
        if !self.has(&key).await? {
            self.store.put(&key, PutPayload::from(data)).await?;
        }
        Ok(())
    }

    /// Uploads a spilled temp file under `sha256` (multipart) unless it is already there.
    async fn put_file(&self, sha256: &str, file: std::fs::File) -> Result<(), ArtifactError> {
        let key = self.key(sha256)?;
        if self.has(&key).await? {
            return Ok(());
        }
        let mut file = tokio::fs::File::from_std(file);
        file.seek(io::SeekFrom::Start(0)).await?;
        let mut upload =
            WriteMultipart::new_with_chunk_size(self.store.put_multipart(&key).await?, PART_SIZE);
        let sent = async {
            let mut chunk = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut chunk).await?;
                if n == 0 {
                    return Ok::<_, ArtifactError>(());
                }
                upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                upload.write(&chunk[..n]);
            }
        }
        .await;
        match sent {
            Ok(()) => {
                upload.finish().await?;
                Ok(())
            }
            Err(e) => {
                // Best effort: the store also expires abandoned uploads.
                let _ = upload.abort().await;
                Err(e)
            }
        }
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

/// Where a streamed write spills past 4 MiB: a named temp file under the directory (renamed into place), or,
/// for an object store, an unnamed temp file in the OS temp directory (gone when closed).
#[derive(Debug)]
struct Spill {
    path: Option<PathBuf>,
    file: std::fs::File,
}

/// A streamed artifact write: bytes are hashed on the way and kept in memory up to 4 MiB (beyond that they
/// spill to a temp file); [`ArtifactWriter::finish`] moves them into place (directory) or uploads them
/// (object store, multipart once spilled).
#[derive(Debug)]
pub struct ArtifactWriter {
    store: ArtifactStore,
    buf: Vec<u8>,
    spill: Option<Spill>,
    hasher: Sha256,
    size: u64,
}

impl ArtifactWriter {
    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if let Some(spill) = &mut self.spill {
            // Past 4 MiB (large outputs only): a blocking write on the runtime, bounded by the chunk size.
            return spill.file.write_all(data);
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SPILL_AT {
            let mut spill = match &self.store.backend {
                Backend::Dir(dir) => {
                    let path = dir.temp_path();
                    Spill { file: create_private_file(&path)?, path: Some(path) }
                }
                Backend::Objects(_) => Spill { path: None, file: tempfile::tempfile()? },
            };
            spill.file.write_all(&self.buf)?;
            self.buf = Vec::new();
            self.spill = Some(spill);
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

    /// Moves the content into place under its digest (syncing it with `Durability::Power`), or uploads it.
    ///
    /// # Errors
    /// Filesystem or object store failures.
    pub async fn finish(mut self) -> Result<StoredArtifact, ArtifactError> {
        let sha256 = hex::encode(self.hasher.finalize_reset());
        let size = self.size;
        let (buf, spill) = (std::mem::take(&mut self.buf), self.spill.take());
        match self.store.backend.clone() {
            Backend::Dir(dir) => tokio::task::spawn_blocking(move || {
                match spill {
                    Some(Spill { path: Some(path), file }) => {
                        if dir.sync {
                            file.sync_data()?;
                        }
                        drop(file);
                        dir.place(&sha256, Source::File(&path))?;
                    }
                    Some(Spill { path: None, .. }) => unreachable!("a directory spills to a named file"),
                    None => dir.place(&sha256, Source::Bytes(&buf))?,
                }
                Ok(StoredArtifact { sha256, size })
            })
            .await
            .map_err(io::Error::other)?,
            Backend::Objects(objects) => {
                match spill {
                    Some(spill) => objects.put_file(&sha256, spill.file).await?,
                    None => objects.put(&sha256, Bytes::from(buf)).await?,
                }
                Ok(StoredArtifact { sha256, size })
            }
        }
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        if let Some(Spill { path: Some(path), .. }) = self.spill.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl tokio::io::AsyncWrite for ArtifactWriter {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(self.push(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A reader that hashes what it passes on and fails at the end when the digest does not match. It first
/// reads and hashes `skip` bytes without passing them on (a download resumed at an offset).
struct Verified {
    inner: ArtifactReader,
    hasher: Sha256,
    expected: String,
    ended: bool,
    /// Bytes still to read and hash before passing any on.
    skip: u64,
    /// Where skipped bytes are read (allocated once, while skipping).
    scratch: Vec<u8>,
}

/// The bytes read at once while skipping.
const SKIP_CHUNK: usize = 64 * 1024;

impl AsyncRead for Verified {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.skip > 0 {
            let want = usize::try_from(this.skip).map_or(SKIP_CHUNK, |n| n.min(SKIP_CHUNK));
            this.scratch.resize(want, 0);
            let mut skipped = ReadBuf::new(&mut this.scratch[..want]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut skipped))?;
            let read = skipped.filled();
            if read.is_empty() {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the artifact ends {} bytes before the offset asked for", this.skip),
                );
                return Poll::Ready(Err(e));
            }
            this.hasher.update(read);
            this.skip -= read.len() as u64;
            if this.skip == 0 {
                this.scratch = Vec::new();
            }
        }
        let before = buf.filled().len();
        let room = buf.remaining();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            this.hasher.update(new);
        } else if room > 0 && !this.ended {
            this.ended = true;
            if hex::encode(this.hasher.finalize_reset()) != this.expected {
                let e = ArtifactError::Corrupt { sha256: this.expected.clone() };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
        Poll::Ready(Ok(()))
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

    /// Files under `dir`, recursively (the object store's layout on disk).
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() { stack.push(path) } else { out.push(path) }
            }
        }
        out.sort();
        out
    }

    async fn read_all(store: &ArtifactStore, sha256: &str) -> io::Result<Vec<u8>> {
        read_from(store, sha256, 0).await
    }

    async fn read_from(store: &ArtifactStore, sha256: &str, offset: u64) -> io::Result<Vec<u8>> {
        let mut reader = store.open_file(sha256, offset).await.unwrap();
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn objects_over_file_urls_are_content_addressed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("objects");
        let store = ArtifactStore::open_url(&format!("file://{}", root.display())).await.unwrap();
        assert_eq!(store.root(), None);
        let a = store.put(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(a.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        let key = root.join("2c").join(&a.sha256);
        let written = std::fs::metadata(&key).unwrap().modified().unwrap();
        // Put twice stores once: the second finds the object and uploads nothing.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(store.put(Bytes::from_static(b"hello")).await.unwrap(), a);
        assert_eq!(std::fs::metadata(&key).unwrap().modified().unwrap(), written);
        assert_eq!(files_under(&root), vec![key.clone()]);
        assert!(store.exists(&a.sha256).await);
        assert_eq!(store.read(&a.sha256).await.unwrap(), b"hello");
        assert_eq!(read_all(&store, &a.sha256).await.unwrap(), b"hello");

        // A small streamed write is one put; a few MiB spill to a temp file and go up multipart.
        let mut w = store.writer();
        w.write_chunk(b"hel").await.unwrap();
        w.write_chunk(b"lo").await.unwrap();
        assert_eq!(w.finish().await.unwrap(), a);
        let big: Vec<u8> = (0..(3 * PART_SIZE / 2 + 12345)).map(|i| (i * 31 % 251) as u8).collect();
        let mut w = store.writer();
        for chunk in big.chunks(300 * 1024) {
            w.write_chunk(chunk).await.unwrap();
        }
        let stored = w.finish().await.unwrap();
        assert_eq!(stored.size, big.len() as u64);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(&big)));
        assert_eq!(store.read(&stored.sha256).await.unwrap(), big);
        assert_eq!(read_all(&store, &stored.sha256).await.unwrap(), big);
        assert_eq!(files_under(&root).len(), 2, "{:?}", files_under(&root));

        // A corrupted object is refused, whole or streamed.
        std::fs::write(&key, b"jello").unwrap();
        let e = store.read(&a.sha256).await.unwrap_err();
        assert!(matches!(&e, ArtifactError::Corrupt { sha256 } if *sha256 == a.sha256), "{e:?}");
        let e = read_all(&store, &a.sha256).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        // Delete; deleting a missing one is fine; reading a missing one is an error.
        store.delete(&a.sha256).await.unwrap();
        assert!(!store.exists(&a.sha256).await);
        store.delete(&a.sha256).await.unwrap();
        assert!(store.read(&a.sha256).await.is_err());
        assert!(matches!(store.read("../etc/passwd").await, Err(ArtifactError::InvalidDigest)));
        assert!(matches!(store.delete("../etc/passwd").await, Err(ArtifactError::InvalidDigest)));
    }

    #[tokio::test]
    async fn objects_in_memory_use_the_prefixed_layout() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = ArtifactStore::with_object_store(memory.clone(), ObjectPath::from("replicas/artifacts"));
        let a = store.put(Bytes::from_static(b"hello")).await.unwrap();
        let key = ObjectPath::from(format!("replicas/artifacts/2c/{}", a.sha256));
        assert_eq!(memory.get(&key).await.unwrap().bytes().await.unwrap(), "hello");
        memory.put(&key, PutPayload::from_static(b"jello")).await.unwrap();
        assert!(matches!(store.read(&a.sha256).await, Err(ArtifactError::Corrupt { .. })));
        store.delete(&a.sha256).await.unwrap();
        store.delete(&a.sha256).await.unwrap();
        assert!(!store.exists(&a.sha256).await);
    }

    #[tokio::test]
    async fn a_corrupted_file_in_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path(), Durability::Crash).await.unwrap();
        let a = store.put(Bytes::from_static(b"hello")).await.unwrap();
        std::fs::write(dir.path().join("2c").join(&a.sha256), b"jello").unwrap();
        assert!(matches!(store.read(&a.sha256).await, Err(ArtifactError::Corrupt { .. })));
        assert_eq!(read_all(&store, &a.sha256).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // From an offset past the corrupted byte, too: the prefix is read and hashed, not skipped.
        assert_eq!(read_from(&store, &a.sha256, 3).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_file_opened_at_an_offset_streams_the_rest_on_either_backend() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(3 * PART_SIZE / 2 + 12345)).map(|i| (i * 31 % 251) as u8).collect();
        let stores = [
            ArtifactStore::open(&dir.path().join("dir"), Durability::Crash).await.unwrap(),
            ArtifactStore::open_url(&format!("file://{}", dir.path().join("objects").display()))
                .await
                .unwrap(),
        ];
        for store in &stores {
            let stored = store.put(Bytes::from(big.clone())).await.unwrap();
            for offset in [0, 1, PART_SIZE as u64, big.len() as u64 - 1, big.len() as u64] {
                let rest = read_from(store, &stored.sha256, offset).await.unwrap();
                assert_eq!(rest, big[offset as usize..], "from {offset}");
            }
            // Opening reads nothing: the prefix is read by the first read, which fails past the end.
            let mut past = store.open_file(&stored.sha256, big.len() as u64 + 1).await.expect("opened");
            let error = past.read(&mut [0u8; 16]).await.expect_err("past the end");
            assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error:?}");
        }
    }

    #[test]
    fn artifacts_urls_are_checked() {
        for ok in ["s3://bucket", "s3://bucket/", "s3://bucket/a/b-c_d.e", "file:///var/lib/x"] {
            assert_eq!(check_artifacts_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "gs://bucket/x",
            "s3://",
            "s3://key:secret@bucket/x",
            "s3://bucket/a b",
            "file://host/x",
            "file:///",
            "memory://",
            "relative/dir",
        ] {
            assert!(check_artifacts_url(bad).is_err(), "{bad}");
        }
    }
}
