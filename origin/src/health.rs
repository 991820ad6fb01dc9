//! `/health` (liveness: the process serves requests) and `/ready` (readiness: "send me
//! traffic" — the shared store and the bus answer and the replica's revocation set is
//! current, so this replica can serve what it can serve).
//!
//! Kubernetes restarts a pod whose liveness fails and stops routing to one whose readiness
//! fails; so `/health` never checks dependencies (a NoETL outage must not restart every
//! gateway pod) and `/ready` checks them with short timeouts (a probe must not hang).
//! **NoETL is reported, not required**: while it is down, cached sessions, open streams,
//! replays and callbacks still work on every replica, and taking every replica out of the
//! Service at once would turn a NoETL outage into a gateway outage. Its state is in the
//! body (a code, never NoETL's own error text: probe bodies can be read by whoever reaches
//! the port) and in the `gateway_noetl_up` gauge. Readiness asks the [`KvStore`] and [`Bus`]
//! traits, not a NATS client: what the replica uses is what is checked.
//!
//! **Draining**: from SIGTERM on, `/ready` answers 503 `{"status":"draining"}` without
//! checking anything (see `server::serve` for the whole shutdown order), so the
//! endpoint is removed while the replica still answers what reaches it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::auth::revocations::Revocations;
use crate::bus::Bus;
use crate::error::json_response;
use crate::metrics::Metrics;
use crate::noetl::NoetlClient;
use crate::store::KvStore;

/// How long `/ready` waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/ready` checks.
#[derive(Clone)]
pub struct Readiness {
    /// The shared store.
    pub kv: Arc<dyn KvStore>,
    /// Client delivery.
    pub bus: Arc<dyn Bus>,
    /// NoETL.
    pub noetl: NoetlClient,
    /// The replica's revocation set: until its watch has loaded the `revoked` bucket, callers
    /// that come only with an edge assertion are refused (503), so the replica is not ready.
    pub revocations: Arc<Revocations>,
    /// True when the store and bus are the embedded in-memory ones (no NATS configured):
    /// reported as `embedded`, always up.
    pub embedded: bool,
    /// Where NoETL's state from the last probe goes (`gateway_noetl_up`).
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM ([`Readiness::start_draining`]); never cleared.
    pub draining: Arc<AtomicBool>,
}

impl Readiness {
    /// From now on `/ready` answers 503 `draining` (the process is shutting down).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// True once [`Readiness::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// `GET /health` → 200.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthBody {
    /// Always `ok`.
    pub status: String,
}

/// `GET /ready`: the verdict and what was checked.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ReadyBody {
    /// `ready`, `not_ready`, or `draining` (from SIGTERM on).
    pub status: String,
    /// Each check's state as a code (`nats`: `ok`, `embedded`, `store unavailable`, …;
    /// `noetl`: `ok` or NoETL's error code; `revocations`: `current`, `catching up`) —
    /// never an upstream's error text. Absent while draining.
    #[schema(value_type = Option<Object>)]
    pub checks: Option<serde_json::Value>,
}

/// Liveness: 200 while the process can answer.
#[utoipa::path(
    get, path = "/health", tag = "health",
    responses((status = 200, description = "The process answers (both listeners)", body = HealthBody))
)]
pub async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Readiness: 200 when the store, the bus and the revocation set are usable, else 503
/// naming what is not; NoETL's state is reported either way (module docs). The `nats`
/// check covers the store and the bus (both are NATS in production).
#[utoipa::path(
    get, path = "/ready", tag = "health",
    responses(
        (status = 200, description = "Ready: send this replica traffic (both listeners; 404 at the edge). NoETL's state is reported in `checks.noetl`, not required", body = ReadyBody),
        (status = 503, description = "`not_ready` (`checks` names what is not), or `draining` from SIGTERM on (no `checks`)", body = ReadyBody),
    )
)]
pub async fn ready(State(r): State<Readiness>) -> Response {
    if r.is_draining() {
        r.metrics.ready.set(0);
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "draining"}),
        );
    }
    let shared = async {
        if r.embedded {
            return "embedded".to_owned();
        }
        let both = async { tokio::join!(r.kv.is_healthy(), r.bus.is_healthy()) };
        match tokio::time::timeout(CHECK_TIMEOUT, both).await {
            Ok((true, true)) => "ok".to_owned(),
            Ok((false, _)) => "store unavailable".to_owned(),
            Ok((true, false)) => "bus unavailable".to_owned(),
            Err(_) => "timed out".to_owned(),
        }
    };
    let noetl = async {
        match r.noetl.health(CHECK_TIMEOUT).await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::info!(error = %e, "readiness probe: NoETL is not answering (still ready)");
                e.code()
            }
        }
    };
    let (nats, noetl) = tokio::join!(shared, noetl);
    let revocations = if r.revocations.is_current() {
        "current"
    } else {
        "catching up"
    };
    r.metrics.noetl_up.set(i64::from(noetl == "ok"));
    let ok = (nats == "ok" || nats == "embedded") && revocations == "current";
    r.metrics.ready.set(i64::from(ok));
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !ok {
        tracing::warn!(%nats, %noetl, %revocations, "not ready");
    }
    json_response(
        status,
        &json!({"status": if ok { "ready" } else { "not_ready" }, "checks": {"nats": nats, "noetl": noetl, "revocations": revocations}}),
    )
}
