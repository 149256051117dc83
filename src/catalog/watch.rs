//! The catalog's reload task: watches the workflows directory (the `notify` crate) and SIGHUP, debounces
//! bursts of file events, and reloads. A rejected reload keeps the last good catalog (see
//! [`Catalog::reload`]).
//!
//! Knows nothing of what a workflow is.

use std::path::PathBuf;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Catalog;

/// Quiet time after the last file event before reloading: editors and `cp -r` write several files.
const DEBOUNCE: Duration = Duration::from_millis(250);

pub(super) async fn run(catalog: Catalog, dir: PathBuf, cancel: CancellationToken) {
    // Capacity 1 with `try_send`: events only say "something changed"; one pending is enough.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        // Reading the files during a reload produces access events; they must not trigger reloads.
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(_) => {
            let _ = tx.try_send(());
        }
        Err(e) => tracing::warn!(error = %e, "workflow directory watcher error"),
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::Recursive).map(|()| w));
    // Kept alive for the task's lifetime: dropping the watcher stops the events.
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the workflow directory; reloads only on SIGHUP");
            None
        }
    };
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    catalog.set_watching(true);
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(()) = rx.recv() => {
                // Debounce: wait until events stop for DEBOUNCE.
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            catalog.set_watching(false);
                            return;
                        }
                        () = tokio::time::sleep(DEBOUNCE) => break,
                        Some(()) = rx.recv() => {}
                    }
                }
                tracing::debug!("workflow files changed; reloading");
                let _ = reload(&catalog).await;
            }
            Some(()) = hup => {
                tracing::info!("SIGHUP; reloading the workflow catalog");
                let _ = reload(&catalog).await;
            }
        }
    }
    catalog.set_watching(false);
}

/// Reloads off the async threads (it reads files); the outcome is logged by `Catalog::reload`.
async fn reload(catalog: &Catalog) -> Result<(), ()> {
    let catalog = catalog.clone();
    match tokio::task::spawn_blocking(move || catalog.reload()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(e) => {
            tracing::error!(error = %e, "the catalog reload panicked");
            Err(())
        }
    }
}
