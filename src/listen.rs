//! Binding TCP listeners with errors a person can act on: each names the address and the setting or flag
//! that chooses it, and a preferred port that is taken can give way to a free one (dev mode).
//!
//! Knows nothing of what is served on the listener.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpListener;

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (set by {setting}): {source}")]
pub struct BindError {
    /// The address tried.
    pub addr: SocketAddr,
    /// The configuration key or flag that sets it, e.g. `grpc.listen (COMFYRELAY_GRPC__LISTEN)`.
    pub setting: String,
    /// Why it failed.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr`.
///
/// # Errors
/// A [`BindError`] naming `addr` and `setting`.
pub async fn bind(addr: SocketAddr, setting: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, setting: setting.to_string(), source })
}

/// Binds `host:port`, or, if that port is in use, a free port on `host`. Returns the listener and
/// whether it fell back.
///
/// # Errors
/// A [`BindError`] naming the address and `setting` when neither can be bound.
pub async fn bind_preferred(
    host: IpAddr,
    port: u16,
    setting: &str,
) -> Result<(TcpListener, bool), BindError> {
    match bind(SocketAddr::new(host, port), setting).await {
        Ok(listener) => Ok((listener, false)),
        Err(e) if e.source.kind() == std::io::ErrorKind::AddrInUse => {
            Ok((bind(SocketAddr::new(host, 0), setting).await?, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_gives_way_and_errors_name_the_setting() {
        let held = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = held.local_addr().expect("addr").port();
        let (listener, fell_back) =
            bind_preferred([127, 0, 0, 1].into(), port, "--comfy-port").await.expect("fallback");
        assert!(fell_back);
        assert_ne!(listener.local_addr().expect("addr").port(), port);

        let e = bind(SocketAddr::from(([127, 0, 0, 1], port)), "grpc.listen (COMFYRELAY_GRPC__LISTEN)")
            .await
            .expect_err("taken");
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}")) && text.contains("COMFYRELAY_GRPC__LISTEN"),
            "{text}"
        );
    }
}
