//! `noetl-standin`: the NoETL server stand-in for end-to-end tests and `make dev`.
//!
//! Thin on purpose: parse the configuration (flags or environment), start logging
//! (`RUST_LOG` honoured, default `info`), and run [`gateway_tests::standin::run`].

use clap::Parser;
use gateway_tests::standin::{self, Config};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Colour codes only on a terminal: the harness writes logs to files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    standin::run(config).await
}
