//! TLS on the gRPC port (issue 11, transport): rustls from `grpc.tls.cert_file` and `grpc.tls.key_file`,
//! reloaded when the files change, and optional client certificates (mTLS, `grpc.tls.client_ca_file`).
//!
//! - **Handshakes off the accept path.** `incoming` takes the bounded connections of
//!   `super::connections` and runs their TLS handshakes concurrently (at most one per connection permit),
//!   each within `grpc.handshake_timeout`, so a client that stalls its handshake holds only its own
//!   connection. A failed handshake (a plaintext client, an unknown CA, no client certificate) closes that
//!   connection and is logged at debug.
//! - **Reload.** `Tls::watch` polls the files' modification time and size every
//!   `grpc.tls.reload_interval` and, on a change, builds a new rustls `ServerConfig` (certificate, key and
//!   client CAs together, so a new CA file is picked up too). New connections get it; open ones keep theirs.
//!   Files that do not load (unreadable, not PEM, a key that does not match the certificate, e.g. between
//!   the writes of the two files) keep the previous configuration and log why, once per change.
//! - **Client identity.** With mTLS, the verified client certificate's subject (its CN, else its first
//!   DNS, URI or e-mail SAN) is a [`ClientSubject`], put in every request's extensions by
//!   `connections::CallTrackingLayer` and in each call's span (`client`). On a replica's connection
//!   (`grpc.tls.replica_subjects`) that layer puts the caller the forwarding standby names instead.
//! - **Secrets.** The key file's bytes are held as a [`SecretSlice`] (zeroed when dropped) only while
//!   parsed; errors describe what is wrong with a file, never its contents.
//!
//! Knows nothing of the services served over it.

use std::{
    future::ready,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt as _};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use secrecy::{ExposeSecret as _, SecretSlice};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use super::connections::{Conn, ConnInfo};
use crate::config::TlsConfig;

/// The subject of a verified client certificate (mTLS): its CN, else its first DNS, URI or e-mail SAN.
/// Every request on an mTLS connection carries it in its extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientSubject(pub String);

/// TLS files that cannot be loaded. The messages name the setting and the file, never their contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{setting} ({}): cannot read it: {source}", path.display())]
    Read {
        /// The configuration key naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file holds no PEM item of the kind wanted, or malformed PEM.
    #[error("{setting} ({}): {what}", path.display())]
    Pem {
        /// The configuration key naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, in words (never the file's contents).
        what: &'static str,
    },
    /// rustls refused the certificate and key (e.g. they do not match) or the client CAs.
    #[error("{setting}: {source}")]
    Rustls {
        /// The configuration key(s) at fault.
        setting: &'static str,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// The client CAs make no verifier.
    #[error("grpc.tls.client_ca_file: {0}")]
    ClientCa(#[source] rustls::server::VerifierBuilderError),
}

/// The files of an enabled TLS configuration.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// TLS of the gRPC port: the current rustls configuration, replaced when the files change.
#[derive(Clone)]
pub struct Tls {
    files: Files,
    alpn: Vec<Vec<u8>>,
    reload_interval: Duration,
    // A std lock: held to clone or swap an `Arc`, never across an await.
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

// By hand: the rustls configuration holds the key.
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("reload_interval", &self.reload_interval)
            .finish()
    }
}

impl Tls {
    /// Loads the configured files; `None` when TLS is off. `http1` offers HTTP/1.1 next to h2 in ALPN
    /// (gRPC-Web).
    ///
    /// # Errors
    /// A [`TlsError`] naming the setting whose file does not load.
    pub async fn load(config: &TlsConfig, http1: bool) -> Result<Option<Self>, TlsError> {
        let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else { return Ok(None) };
        let files = Files { cert: cert.clone(), key: key.clone(), client_ca: config.client_ca_file.clone() };
        let mut alpn = vec![b"h2".to_vec()];
        if http1 {
            alpn.push(b"http/1.1".to_vec());
        }
        let server_config = build(&files, &alpn).await?;
        Ok(Some(Self {
            files,
            alpn,
            reload_interval: config.reload_interval,
            current: Arc::new(RwLock::new(Arc::new(server_config))),
        }))
    }

    /// Whether clients must present a certificate.
    pub(crate) fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Re-reads the files whenever their modification time or size changes, forever; spawned by `serve`
    /// and aborted when it returns. Exit policy: never ends by itself; a failed reload is logged and the
    /// previous configuration stays.
    pub(crate) async fn watch(self) {
        let mut seen = fingerprint(&self.files).await;
        let mut ticks = tokio::time::interval(self.reload_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        loop {
            ticks.tick().await;
            let now = fingerprint(&self.files).await;
            if now == seen {
                continue;
            }
            seen = now;
            match build(&self.files, &self.alpn).await {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                    tracing::info!(cert_file = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => tracing::warn!(
                    error = %crate::telemetry::ErrorChain(&e),
                    "TLS files changed but do not load; new connections keep the previous certificate"
                ),
            }
        }
    }
}

/// Modification time and size of each file (`None` where it cannot be read): what a change is.
async fn fingerprint(files: &Files) -> Vec<Option<(SystemTime, u64)>> {
    let mut out = Vec::with_capacity(3);
    for path in [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()].into_iter().flatten() {
        let meta = tokio::fs::metadata(path).await.ok();
        out.push(meta.and_then(|m| Some((m.modified().ok()?, m.len()))));
    }
    out
}

async fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|source| TlsError::Read { setting, path: path.to_path_buf(), source })
}

fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |what| TlsError::Pem { setting, path: path.to_path_buf(), what };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("malformed PEM"))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it"));
    }
    Ok(certs)
}

/// The rustls configuration of `files`: the certificate chain and key, and client verification by the
/// client CAs when set.
async fn build(files: &Files, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain =
        certificates("grpc.tls.cert_file", &files.cert, &read("grpc.tls.cert_file", &files.cert).await?)?;
    let key_pem: SecretSlice<u8> = read("grpc.tls.key_file", &files.key).await?.into();
    // The PEM error would quote a line of the file: not for a key.
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose_secret()).map_err(|_| TlsError::Pem {
        setting: "grpc.tls.key_file",
        path: files.key.clone(),
        what: "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
    })?;
    drop(key_pem);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { setting: "grpc.tls", source })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let setting = "grpc.tls.client_ca_file";
            let mut roots = RootCertStore::empty();
            for ca in certificates(setting, path, &read(setting, path).await?)? {
                roots.add(ca).map_err(|source| TlsError::Rustls { setting, source })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(TlsError::ClientCa)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls { setting: "grpc.tls.cert_file and grpc.tls.key_file", source })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// The subject of a client certificate: its CN, else its first DNS, URI or e-mail SAN.
pub(crate) fn subject_of(cert: &CertificateDer<'_>) -> Option<ClientSubject> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Some(cn) = cert.subject().iter_common_name().find_map(|cn| cn.as_str().ok()) {
        return Some(ClientSubject(cn.to_string()));
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
            Some(ClientSubject((*s).to_string()))
        }
        _ => None,
    })
}

/// A connection the server speaks over: plain, or under TLS with the client's subject under mTLS.
#[derive(Debug)]
pub(crate) enum ServerConn {
    /// TLS is off.
    Plain(Conn),
    /// After a TLS handshake.
    Tls(Box<TlsStream<Conn>>, Option<ClientSubject>),
}

/// The connections to serve: `conns` as they are when `tls` is `None`, else after their TLS handshakes,
/// which run concurrently (at most `max_handshakes`) and each within `handshake_timeout`. Connections whose
/// handshake fails are closed and left out.
pub(crate) fn incoming(
    conns: impl Stream<Item = Result<Conn, io::Error>>,
    tls: Option<Tls>,
    handshake_timeout: Duration,
    max_handshakes: usize,
) -> impl Stream<Item = Result<ServerConn, io::Error>> {
    conns
        .map(move |conn| {
            let acceptor = tls.as_ref().map(|tls| (tls.acceptor(), tls.mutual()));
            async move {
                let conn = match conn {
                    Ok(conn) => conn,
                    Err(e) => return Some(Err(e)),
                };
                let Some((acceptor, mutual)) = acceptor else { return Some(Ok(ServerConn::Plain(conn))) };
                let remote = conn.remote();
                match tokio::time::timeout(handshake_timeout, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        let subject = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(subject_of);
                        if mutual {
                            tracing::debug!(%remote, client = subject.as_ref().map(|s| s.0.as_str()), "TLS client certificate verified");
                        }
                        Some(Ok(ServerConn::Tls(Box::new(stream), subject)))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed; connection closed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "no TLS handshake within grpc.handshake_timeout; connection closed");
                        None
                    }
                }
            }
        })
        .buffer_unordered(max_handshakes.max(1))
        .filter_map(ready)
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(c) => c.is_write_vectored(),
            Self::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_flush(cx),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for ServerConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Self::Plain(c) => c.connect_info(),
            Self::Tls(s, subject) => s.get_ref().0.connect_info().with_subject(subject.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(cn: Option<&str>, sans: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.subject_alt_names =
            sans.iter().map(|s| rcgen::SanType::URI((*s).try_into().expect("uri"))).collect();
        (params.self_signed(&key).expect("cert"), key)
    }

    #[test]
    fn the_subject_is_the_common_name_else_the_first_san() {
        let (with_cn, _) = leaf(Some("team-a"), &["spiffe://x/ci"]);
        assert_eq!(subject_of(with_cn.der()), Some(ClientSubject("team-a".into())));
        let (san_only, _) = leaf(None, &["spiffe://x/ci", "spiffe://x/other"]);
        assert_eq!(subject_of(san_only.der()), Some(ClientSubject("spiffe://x/ci".into())));
        let (nothing, _) = leaf(None, &[]);
        assert_eq!(subject_of(nothing.der()), None);
    }

    #[tokio::test]
    async fn files_that_do_not_load_are_named_and_never_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = leaf(Some("localhost"), &[]);
        let (_, other_key) = leaf(Some("localhost"), &[]);
        let files = Files {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            client_ca: Some(dir.path().join("missing-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write");
        let secret_line = "-----BEGIN PRIVATE KEY-----\nTOP-SECRET-KEY-MATERIAL\n";
        std::fs::write(&files.key, secret_line).expect("write");
        let e = build(&files, &[]).await.expect_err("broken key").to_string();
        assert!(e.contains("grpc.tls.key_file") && !e.contains("TOP-SECRET"), "{e}");

        std::fs::write(&files.key, other_key.serialize_pem()).expect("write");
        let e = build(&files, &[]).await.expect_err("missing CA").to_string();
        assert!(e.contains("grpc.tls.client_ca_file") && e.contains("missing-ca.pem"), "{e}");

        let files = Files { client_ca: None, ..files };
        let e = build(&files, &[]).await.expect_err("mismatched key").to_string();
        assert!(e.contains("grpc.tls.cert_file and grpc.tls.key_file"), "{e}");

        std::fs::write(&files.key, key.serialize_pem()).expect("write");
        let config = build(&files, &[b"h2".to_vec()]).await.expect("a matching pair loads");
        assert_eq!(config.alpn_protocols, [b"h2".to_vec()]);
    }
}
