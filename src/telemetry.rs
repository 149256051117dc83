//! Tracing setup in one place: pretty output for people, JSON for log pipelines.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. `filter` is an `EnvFilter` directive such as `info,comfyrelay=debug`;
/// `RUST_LOG`, when set, wins (read by `main` and passed in).
///
/// Calling it twice is harmless: the second call does nothing.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => {
            registry.with(fmt::layer().json().with_current_span(true).with_span_list(false)).try_init()
        }
        LogFormat::Pretty => registry.with(fmt::layer().with_target(true)).try_init(),
    };
}

/// For tests: logs to the test writer when `TEST_LOG` is set, otherwise nothing.
pub fn init_for_tests(enabled: bool) {
    if enabled {
        let _ = tracing_subscriber::registry()
            .with(EnvFilter::new("info,comfyrelay=debug"))
            .with(fmt::layer().with_test_writer())
            .try_init();
    }
}

/// Displays an error with its whole cause chain (`outer: cause: root cause`), for logs: many errors say
/// little without their sources (`StoreError::Database` is "database error", a transport error hides the
/// connection failure under it). Use as `error = %ErrorChain(&e)`.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
