//! `/metrics` (internal listener): a few counters in the Prometheus text format.
//!
//! Deliberately small — plain atomics, no registry crate — and only what operators and the
//! end-to-end tests need today: how often sessions are validated at the origin (the edge's
//! KV cache should keep this near zero), SSE connections open on this replica, callbacks,
//! and the replica's revocation set (how many it holds, and whether it is current); what
//! the abuse limits refused (origin rate limits, the negative session cache, coalesced
//! validations, `auth_busy`, NoETL retries and the retry budget); whether NoETL answered
//! the last readiness probe.

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

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
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
    /// Auth requests refused 429 by `AUTH_RATE_LIMIT` (validate, check-access, logout).
    pub rate_limited_auth: Counter,
    /// Logins refused 429 by `LOGIN_RATE_LIMIT`.
    pub rate_limited_login: Counter,
    /// Validations answered "invalid" from the negative cache, without asking NoETL.
    pub session_negative_hits: Counter,
    /// Validations that joined one already asking NoETL about the same token.
    pub session_validations_coalesced: Counter,
    /// Auth playbook runs refused 503 `auth_busy` (`AUTH_PLAYBOOK_CONCURRENCY` all taken).
    pub auth_busy: Counter,
    /// Retries of idempotent NoETL calls made.
    pub noetl_retries: Counter,
    /// Retries of NoETL calls not made because the retry budget was spent.
    pub noetl_retries_over_budget: Counter,
    /// 1 when the last readiness probe reached NoETL, 0 when it did not (or before the
    /// first probe).
    pub noetl_up: Gauge,
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
    // A name with `{labels}` shares the HELP and TYPE lines of the series before it.
    let series: [(&str, &str, &str, u64); 13] = [
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
        (
            "gateway_rate_limited_total{limit=\"auth\"}",
            "counter",
            "Requests refused 429 by an origin rate limit (auth: AUTH_RATE_LIMIT, login: LOGIN_RATE_LIMIT).",
            m.rate_limited_auth.get(),
        ),
        (
            "gateway_rate_limited_total{limit=\"login\"}",
            "counter",
            "",
            m.rate_limited_login.get(),
        ),
        (
            "gateway_session_negative_hits_total",
            "counter",
            "Session validations answered invalid from the negative cache (SESSION_NEGATIVE_TTL), NoETL not asked.",
            m.session_negative_hits.get(),
        ),
        (
            "gateway_session_validations_coalesced_total",
            "counter",
            "Session validations that waited for another request's NoETL answer about the same token.",
            m.session_validations_coalesced.get(),
        ),
        (
            "gateway_auth_busy_total",
            "counter",
            "Auth playbook runs refused 503 auth_busy: AUTH_PLAYBOOK_CONCURRENCY runs already in flight.",
            m.auth_busy.get(),
        ),
        (
            "gateway_noetl_retries_total",
            "counter",
            "Retries of idempotent NoETL calls (502/503/504, connect errors).",
            m.noetl_retries.get(),
        ),
        (
            "gateway_noetl_retries_over_budget_total",
            "counter",
            "NoETL retries not made: the retry budget (NOETL_RETRY_BUDGET) was spent.",
            m.noetl_retries_over_budget.get(),
        ),
        (
            "gateway_noetl_up",
            "gauge",
            "1 when this replica's last readiness probe reached NoETL, else 0 (NoETL's state does not fail /ready).",
            m.noetl_up.get(),
        ),
    ];
    let mut out = String::new();
    let mut previous = "";
    for (name, kind, help, value) in series {
        let family = name.split('{').next().unwrap_or(name);
        if family != previous {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            previous = family;
        }
        let _ = writeln!(out, "{name} {value}");
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}
