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

/// An error and every cause under it, `: `-separated, for one log field (`error = %chain(&e)`): "storage
/// failed" alone says nothing an operator can act on.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
