//! The `origin` binary: read the configuration, set up logging, run until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use origin::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(config.log_format);
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
    match origin::server::serve(&config, state, drain).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "origin failed");
            ExitCode::FAILURE
        }
    }
}
