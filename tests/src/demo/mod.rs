//! The demo backend stand-in (`demo-service`): a small service behind the gateway's
//! `/api/v1/<name>/*` route, so the generic proxy, service events and human-in-the-loop
//! questions are tested — and tried in `make dev` — against real HTTP.
//!
//! The contract (paths as the service receives them; through the gateway they are
//! `/api/v1/<name>/…`):
//! - `ANY /echo`, `ANY /echo/{*rest}` → 200 `{service, method, path, query, headers,
//!   header_names, body_bytes}`: what arrived, so a test sees the identity headers the
//!   gateway set and that client identity headers were stripped.
//! - `GET /slow?ms=N` → waits N ms, then 200 `{"slept_ms":N}`.
//! - `GET /stream?count=N&interval_ms=M` → `text/event-stream`: N events `event: tick`,
//!   `id: i`, `data: {"i":i}` (i = 1..=N), one every M ms, each written when due; then ends.
//! - `POST /ask` `{"client_id","prompt","options"?,"timeout_seconds"?,"context"?}` → the
//!   gateway's `POST /api/internal/questions` with `service` = name, `user_id` = the
//!   `x-noetl-user-id` header received, `reply_to.url` = `<public-url>/answers`; its answer
//!   relayed (201 `{"question_id","expires_at"}`, or its error with its status).
//! - `POST /answers` (the gateway's delivery, `idempotency-key` header) → 200, recorded.
//! - `GET /answers/{question_id}` → 200 `{"status":"answered","answer","user":{user_id,
//!   email},…}` or `{"status":"expired","answer":null,"user":null,…}`; 404 JSON until a
//!   delivery arrives.
//! - `POST /emit` `{"client_id"?,"user_id"?,"execution_id"?,"event","data"}` → the
//!   gateway's `POST /api/internal/events` with `service` = name; its answer relayed.
//! - `GET /_demo/deliveries` → `[{question_id, idempotency_key, body}]`, every delivery,
//!   duplicates included; `POST /_demo/gateway` `{"url","token"?}` sets the gateway after
//!   start (a test knows the origin's internal URL only after the origin, which needs this
//!   service's URL, has started); `POST /_demo/refuse-answers` `{"count","status"?}` makes
//!   the next `count` deliveries fail with `status` (default 503), not recorded, so a test
//!   sees the gateway retry (`{"remaining","status","refused"}` answered; `GET` reads it).
//! - `GET /health` → 200.
//!
//! Errors are the gateway's `{"error":{"code","message"}}`; request bodies are limited to
//! [`MAX_BODY_BYTES`] (413), waits and streams have ceilings, and the records are bounded.
//!
//! Layout, one concern per module:
//! - [`config`] — the one `Config` struct (clap, every flag also from the environment).
//! - [`error`] — the JSON error type and hostile-input-proof extractors.
//! - [`answers`] — the record of deliveries and each question's outcome (pure, bounded).
//! - [`gateway`] — the one HTTP client to the gateway's internal listener.
//! - [`probe`] — `/echo`, `/slow`, `/stream`, `/health`.
//! - [`hitl`] — `/ask`, `/answers`, `/emit`, `/_demo/*`.
//! - [`app`] — the state and the router: every route in one place.

pub mod answers;
pub mod app;
pub mod config;
pub mod error;
pub mod gateway;
pub mod hitl;
pub mod probe;

pub use config::Config;

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request body accepted on any route (1 MiB); longer is 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How long open requests (a `/stream`, a `/slow`) may finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs the service until SIGINT/SIGTERM: validates the configuration, binds, prints
/// `listening on http://ADDR` on stdout, serves.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let local = listener.local_addr()?;
    let public_url = config.public_url_for(local);
    let target = config
        .gateway_internal_url
        .as_ref()
        .map(|url| gateway::Target {
            url: url.trim_end_matches('/').to_owned(),
            token: config.internal_token.clone(),
        });
    let state = Arc::new(app::DemoState {
        name: config.name.clone(),
        public_url: public_url.clone(),
        gateway: gateway::Gateway::new(target)?,
        answers: Mutex::new(answers::Answers::default()),
        refusals: Mutex::new(answers::Refusals::default()),
    });
    tracing::info!(?config, %public_url, "demo-service configured");
    println!("listening on http://{local}");
    serve(listener, app::router(state)).await
}

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
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            None
        }
    };
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot listen for ctrl-c");
                std::future::pending::<()>().await;
            }
        }
        () = term => {}
    }
    tracing::info!("shutting down");
}
