//! The `origin` binary: read the configuration, set up logging, run until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use opentelemetry_sdk::trace::SdkTracerProvider;
use origin::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// mimalloc instead of glibc malloc: per-thread free lists, no arena lock on the proxy's
/// per-request allocations (docs/BENCHMARKS.md, "The proxy path and sessions without a
/// network hop (issue 16)"). The `system-allocator` feature keeps glibc's, for heap
/// profilers that interpose `malloc` (docs/OPERATIONS.md, "Profiling memory").
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logging: `RUST_LOG` (default `info`; the per-request `access` lines are at info), text
/// or JSON lines (`origin::logs`: Cloud Logging `severity`, trace and span ids;
/// `GOOGLE_CLOUD_PROJECT`, when set, makes the trace id Cloud Logging's trace name); and
/// OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`origin::otel`), whose
/// provider is returned to be shut down (flushed) at exit.
fn init_tracing(format: LogFormat) -> Option<SdkTracerProvider> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (otel, provider, otel_error) = match origin::otel::layer() {
        Ok(Some((layer, provider))) => (Some(layer), Some(provider), None),
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e)),
    };
    // RUST_LOG filters the log only: the export layer has its own filter (`otel`), so
    // `RUST_LOG=warn` does not turn export off.
    let registry = tracing_subscriber::registry().with(otel);
    match format {
        LogFormat::Json => {
            let project = std::env::var("GOOGLE_CLOUD_PROJECT")
                .ok()
                .filter(|p| !p.is_empty());
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .fmt_fields(JsonFields::new())
                        .event_format(origin::logs::JsonLines { project })
                        .with_filter(filter),
                )
                .init()
        }
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_filter(filter))
            .init(),
    }
    match (&provider, otel_error) {
        (Some(_), _) => tracing::info!(
            endpoint = origin::otel::endpoint().unwrap_or_default(),
            "exporting traces over OTLP (HTTP/protobuf)"
        ),
        (None, Some(e)) => {
            tracing::error!(error = %e, "OTLP trace export is configured but cannot start; not exporting")
        }
        (None, None) => {}
    }
    provider
}

/// mimalloc returns freed memory to the system at once (`purge_delay` 0, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise). Its default is to purge a second later, and
/// only when the thread that freed the memory allocates again: after a burst of stream
/// opens the workers go quiet, so everything the opens used transiently stayed resident —
/// 4.5–4.9 KiB per idle stream where 2.2 KiB is live; purged at once, 3.3 KiB
/// (docs/BENCHMARKS.md, "Density: what an idle stream holds"). The proxy does not pay for
/// it (measured in the same section).
#[cfg(not(feature = "system-allocator"))]
fn tune_allocator() {
    use std::ffi::{c_int, c_long};
    /// `mi_option_purge_delay`: the same number in mimalloc v2 and v3 (`mimalloc.h`).
    const MI_OPTION_PURGE_DELAY: c_int = 15;
    extern "C" {
        fn mi_option_set(option: c_int, value: c_long);
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options by its number; any value is valid for
        // this one, and mimalloc reads it on each purge, so setting it late is fine.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    #[cfg(not(feature = "system-allocator"))]
    tune_allocator();
    let config = Config::parse().with_service_env();
    let traces = init_tracing(config.log_format);
    if let Err(e) = config
        .validate()
        .and_then(|()| origin::server::check_policies(&config))
    {
        tracing::error!("{e}");
        eprintln!("origin: {e}");
        return ExitCode::from(2);
    }
    tracing::info!(config = %config.redacted(), version = env!("CARGO_PKG_VERSION"), "starting origin");
    let (drain, shutdown) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(origin::server::cancel_on_signal(
        drain.clone(),
        shutdown.clone(),
    ));
    let state = match origin::server::build_state(config.clone(), shutdown).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "start-up failed");
            return ExitCode::FAILURE;
        }
    };
    let code = match origin::server::serve(&config, state, drain).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "origin failed");
            ExitCode::FAILURE
        }
    };
    if let Some(provider) = traces {
        // Flushes the last batch; blocking, so off the runtime's worker.
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
    code
}
