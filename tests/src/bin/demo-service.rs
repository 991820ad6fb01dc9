//! `demo-service`: the demo backend stand-in for end-to-end tests and `make dev` (the
//! service `demo` behind `/api/v1/demo/*`).
//!
//! Thin on purpose: parse the configuration (flags or environment), start logging
//! (`RUST_LOG` honoured, default `info`, on stderr), and run [`gateway_tests::demo::run`],
//! which prints `listening on http://ADDR` on stdout once bound.

use clap::Parser;
use gateway_tests::demo::{self, Config};
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
    demo::run(config).await
}
