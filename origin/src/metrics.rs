//! `/metrics` (internal listener): a few counters in the Prometheus text format.
//!
//! Deliberately small — plain atomics, no registry crate — and only what operators and the
//! end-to-end tests need today: how often sessions are validated at the origin (the edge's
//! KV cache should keep this near zero), SSE connections open on this replica, callbacks,
//! and the replica's revocation set (how many it holds, and whether it is current).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::hub::Hub;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The origin's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `POST /api/auth/validate` requests received.
    pub validate_requests: Counter,
    /// Callbacks (result, sync and progress) received.
    pub callbacks: Counter,
}

/// What `/metrics` reads.
#[derive(Clone)]
pub struct MetricsState {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// This replica's open SSE streams (the connections gauge).
    pub hub: Arc<Hub>,
    /// This replica's revocation set (its size and currency gauges).
    pub revocations: Arc<dyn RevocationGauges>,
}

/// What `/metrics` reads of the replica's revocation set (`auth::revocations` implements
/// it; a trait so this module depends on nothing in `auth`, which counts into it).
pub trait RevocationGauges: Send + Sync {
    /// Revoked sessions held in memory.
    fn held(&self) -> u64;
    /// Whether the set is loaded and its watch is up.
    fn is_current(&self) -> bool;
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<MetricsState>) -> Response {
    let m = &state.metrics;
    // (name, type, help, value), in the order they are exported.
    let series: [(&str, &str, &str, u64); 5] = [
        (
            "gateway_auth_validate_requests_total",
            "counter",
            "POST /api/auth/validate requests received by this replica.",
            m.validate_requests.get(),
        ),
        (
            "gateway_callbacks_total",
            "counter",
            "Playbook callbacks received by this replica.",
            m.callbacks.get(),
        ),
        (
            "gateway_sse_connections",
            "gauge",
            "SSE streams open on this replica.",
            state.hub.len() as u64,
        ),
        (
            "gateway_revocations",
            "gauge",
            "Revoked sessions this replica holds in memory.",
            state.revocations.held(),
        ),
        (
            "gateway_revocations_current",
            "gauge",
            "1 while this replica's revocation set is loaded and its watch is up; 0 while asserted callers are refused with 503.",
            u64::from(state.revocations.is_current()),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}
