//! The NoETL server stand-in: the one test double the project accepts.
//!
//! It stands in for the real NoETL server in end-to-end tests and is the demo upstream of
//! `make dev`. It follows PROTOCOL.md §6 to the field, including the real server's quirks
//! (string execution id from `/api/execute`, numbers above 2^53 everywhere else, a failed
//! run without `playbook.failed`, a `playbook.completed` for a run that failed), and speaks
//! every NoETL event shape, one per run (`--event-shape`, below).
//!
//! Layout, one concern per module:
//! - [`config`] — the one `Config` struct (clap, every flag also from the environment).
//! - [`ids`] — execution/event ids (snowflake-like numbers above 2^53) and user ids.
//! - [`idp`] — the dev identity provider: an RSA key made at start, RS256 ID tokens, JWKS.
//! - [`sessions`] — the session table and the access policy (pure decisions, unit-tested).
//! - [`auth`] — login / validate / check-access as data, shared by the REST routes and the
//!   auth playbooks so both modes answer the same thing.
//! - [`events`] — the event vocabularies, the event row, its wire shapes (Rust, Python,
//!   4.x), and the publisher that flushes buffered events to NATS in bursts (like the real
//!   server tailing its event table).
//! - [`store`] — executions: status, progress, event history; the single place where a
//!   run's state changes, so a cancel and a finishing run can never both win.
//! - [`playbooks`] — the demo catalog and the runner that plays a run step by step.
//! - [`script`] — a run as data: the events, waits, progress reports and end a plan plays
//!   in one vocabulary (pure; the runner interprets it).
//! - [`callbacks`] — result/progress callbacks to the gateway, with retries and a log.
//! - [`http`] — the JSON error type and hostile-input-proof extractors.
//! - [`api`], [`debug`], [`dev`], [`control`] — HTTP handlers: NoETL's `/api`, the proxy-test
//!   debug routes, the IdP's `/dev` routes, and the `/_standin` test-control routes (plus
//!   the fault middleware).
//! - [`state`] — the shared state handed to every handler and run.
//! - [`app`] — the router: every route and layer visible in one place.
//!
//! A request flows: router → `control::observe_api` (call count, injected faults) →
//! handler → `store`/`sessions`. `POST /api/execute` spawns a `playbooks` run, which writes
//! events into `store` (which queues them for `events`) and finally calls `callbacks`.
//!
//! Event shapes (`--event-shape rust|python|v4|none`, env `STANDIN_EVENT_SHAPE`;
//! `--python-events` still means `python`):
//! - `rust` (default, the Rust control plane): subject `noetl.events.<event_type>`,
//!   published through JetStream (stream `noetl_events`) with `Nats-Msg-Id: <event_id>`;
//!   payload the whole event row ([`events::EventRow`], 40 keys). When JetStream is
//!   unavailable the stand-in falls back to core NATS publishes on the same subjects.
//! - `python` (the older Python server): subject
//!   `noetl.events.default.default.<execution_id>.0`, core NATS publish, payload
//!   `{event_id, event_type, execution_id, node_name, status, timestamp, payload}` with
//!   Python names: `playbook_started`, `step_started`, `step_completed`, `step_failed`,
//!   `playbook_completed`, `playbook_cancelled` (see [`events::python_event_type`]).
//! - `v4` (NoETL 4.x's event mirror): JetStream stream `NOETL_EVENTS` (`--v4-stream`,
//!   created with `<prefix>.>` if missing), subjects
//!   `<prefix>.<tenant>.<organization>.<execution_id>.<shard>` (`--v4-subject-prefix`,
//!   default `noetl.events`; `--tenant`, `--organization` sanitised, `acme/EU west` →
//!   `acme-EU-west`; shard = id % `--shard-count`), no `Nats-Msg-Id`, payload the canonical
//!   envelope as Python's sorted compact JSON, in 4.x's vocabulary (`playbook.initialized`,
//!   `workflow.initialized`, …, native `step.exit`, `workflow.*` and `playbook.*` terminals,
//!   `execution.cancelled`). What was read in NoETL's sources: [`events::v4`].
//! - `none` (a NoETL without the event mirror, 4.x's default): nothing on NATS; the
//!   execution record (its `events` array, 4.x's vocabulary) and `/status` are the only
//!   signal.

pub mod api;
pub mod app;
pub mod auth;
pub mod callbacks;
pub mod config;
pub mod control;
pub mod debug;
pub mod dev;
pub mod events;
pub mod http;
pub mod idp;
pub mod ids;
pub mod playbooks;
pub mod script;
pub mod sessions;
pub mod state;
pub mod store;

pub use config::Config;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs the stand-in until SIGINT/SIGTERM: makes the signing key, binds, connects NATS (if
/// configured), serves, and flushes the last buffered events on the way out.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    // Key first, bind second: a health probe must never connect to a port that is not
    // being served yet while a 2048-bit key is being made.
    let started = Instant::now();
    let key = tokio::task::spawn_blocking(idp::generate_key).await??;
    let keygen_ms = started.elapsed().as_millis();

    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let local = listener.local_addr()?;
    let public_url = config.public_url_for(local);
    let idp = idp::DevIdp::new(key, &public_url, &config.audience)?;

    let publisher = events::Publisher::start(&config).await;
    let state = Arc::new(state::AppState::new(
        config.clone(),
        public_url.clone(),
        idp,
        publisher.sink(),
    )?);

    tracing::info!(keygen_ms, ?config, "noetl-standin configured");
    println!("noetl-standin listening on {public_url} (RSA-2048 dev key made in {keygen_ms} ms)");
    println!(
        "dev IdP issuer {} · JWKS {} · audience {}",
        state.idp.issuer(),
        state.idp.jwks_url(),
        config.audience
    );

    serve(listener, app::router(state)).await?;
    publisher.shutdown().await;
    Ok(())
}

/// How long open requests (a `demo` stream, `/api/debug/slow`) may finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves until a shutdown signal, then lets open requests finish for [`SHUTDOWN_GRACE`]
/// at most: a test's `ChildGuard` must not have to fall back to SIGKILL.
async fn serve(listener: tokio::net::TcpListener, app: axum::Router) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let stopping = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // An Err means the sender is gone, which only happens after it sent `true`.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(stopping(rx.clone()))
        .into_future();
    let deadline = async {
        stopping(rx).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result?,
        () = deadline => tracing::warn!("requests still open {SHUTDOWN_GRACE:?} after the signal; exiting"),
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (the harness stops children with SIGTERM).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
