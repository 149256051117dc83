//! Tracing setup in one place: pretty output for people, JSON for log pipelines (with the OpenTelemetry
//! trace and span ids of the current span), and, when an OTLP endpoint is configured, spans exported to it.
//!
//! The exporter is off unless `main` passes [`OtlpSettings`] (read once from the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_SERVICE_NAME` variables).
//! Spans are batched and sent over OTLP/gRPC; [`Telemetry::shutdown`] flushes them within a deadline.
//! [`JobTelemetry`] is one job's trace and metrics.

mod job;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, Layer as _, fmt, prelude::*};

pub use job::JobTelemetry;

use crate::config::LogFormat;

/// Where spans go: the OTLP/gRPC collector endpoint and the service name reported with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl OtlpSettings {
    /// Reads the standard variables from `vars` (pass `std::env::vars()` from `main`):
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` (unset or empty: no export),
    /// and `OTEL_SERVICE_NAME` (default `comfyrelay`).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Option<Self> {
        let (mut traces, mut generic, mut name) = (None, None, None);
        for (k, v) in vars {
            let v = v.trim().to_owned();
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => traces = Some(v),
                "OTEL_EXPORTER_OTLP_ENDPOINT" => generic = Some(v),
                "OTEL_SERVICE_NAME" => name = Some(v),
                _ => {}
            }
        }
        Some(Self {
            endpoint: traces.or(generic)?,
            service_name: name.unwrap_or_else(|| "comfyrelay".to_owned()),
        })
    }
}

/// The installed telemetry; keep it until the end of `main` and call [`Telemetry::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// The OTLP exporter could not be built (a malformed endpoint).
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for {endpoint}: {message}")]
pub struct TelemetryError {
    endpoint: String,
    message: String,
}

/// Installs the global subscriber. `filter` is an `EnvFilter` directive such as `info,comfyrelay=debug`;
/// `RUST_LOG`, when set, wins (read by `main` and passed in). With `otlp`, spans are exported there;
/// building the exporter needs a Tokio runtime (call it inside `Runtime::enter`).
///
/// Calling it twice is harmless: the second call installs nothing.
///
/// # Errors
/// The OTLP endpoint is not a valid URL.
pub fn init(
    format: LogFormat,
    filter: &str,
    otlp: Option<OtlpSettings>,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = match &otlp {
        Some(settings) => Some(provider(settings)?),
        None => None,
    };
    // Spans are exported whatever the log filter says about them (a span filtered out of the logs still
    // belongs in the job's trace), so the OTel layer sits beside the filtered log layer.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("comfyrelay"))
            .with_filter(EnvFilter::new("info,comfyrelay=debug"))
    });
    let log = match format {
        LogFormat::Json => json_subscriber::fmt::layer()
            .with_current_span(true)
            .with_span_list(false)
            .with_opentelemetry_ids(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => fmt::layer().with_target(true).with_filter(filter).boxed(),
    };
    let installed = tracing_subscriber::registry().with(otel).with(log).try_init().is_ok();
    if installed && let Some(settings) = &otlp {
        tracing::info!(endpoint = %settings.endpoint, service = %settings.service_name, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider: if installed { provider } else { None } })
}

fn provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .build()
        .map_err(|e| TelemetryError { endpoint: settings.endpoint.clone(), message: e.to_string() })?;
    let resource =
        opentelemetry_sdk::Resource::builder_empty().with_service_name(settings.service_name.clone()).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

impl Telemetry {
    /// Flushes and stops the span exporter, waiting at most `deadline`. Call outside the runtime's
    /// `block_on` (the exporter's sends run on the runtime), before the runtime is dropped.
    pub fn shutdown(self, deadline: Duration) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(deadline)
        {
            eprintln!("comfyrelay: flushing traces: {e}");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn otlp_is_off_unless_an_endpoint_is_set_and_the_traces_one_wins() {
        assert_eq!(OtlpSettings::from_vars(vars(&[("OTEL_SERVICE_NAME", "x")])), None);
        assert_eq!(OtlpSettings::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])), None);
        let s = OtlpSettings::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317")])).unwrap();
        assert_eq!((s.endpoint.as_str(), s.service_name.as_str()), ("http://a:4317", "comfyrelay"));
        let s = OtlpSettings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_SERVICE_NAME", "relay-eu"),
        ]))
        .unwrap();
        assert_eq!((s.endpoint.as_str(), s.service_name.as_str()), ("http://t:4317", "relay-eu"));
    }
}
