//! `/metrics` (internal listener): the origin's metrics in the OpenMetrics text format,
//! through `prometheus-client`.
//!
//! One registry per process ([`global`]): the instrumented places (the HTTP layer in
//! `observe`, the NoETL client, the K/V and bus decorators, the bridge, SSE streams,
//! callbacks, JWKS, rate limits, the listeners) are deep in the stack and many are built
//! before any state exists, so they record into the process's [`Metrics`] instead of
//! threading a handle through every constructor. Handles that were threaded before (the
//! auth counters) are clones of the same `Arc`.
//!
//! The catalogue (names, labels and types are a contract with the chart's dashboard and
//! alert rules — change them together):
//! - `gateway_build_info{version,commit}` gauge = 1; `gateway_ready` gauge.
//! - `gateway_http_request_duration_seconds{listener,route,method,status}` histogram (time
//!   to the response head; `route` is the matched template or `unmatched`) and
//!   `gateway_http_requests_in_flight{listener}`.
//! - `gateway_noetl_request_duration_seconds{route,outcome}`, `gateway_noetl_up`,
//!   `gateway_noetl_retries_total`, `gateway_noetl_retries_over_budget_total`.
//! - `gateway_kv_operation_duration_seconds{bucket,op,outcome}`,
//!   `gateway_bus_operation_duration_seconds{op,outcome}`.
//! - `gateway_bridge_lag_seconds`, `gateway_bridge_events_total{outcome}`,
//!   `gateway_bridge_naks_total`, `gateway_bridge_reader`.
//! - `gateway_sse_streams_open`, `gateway_sse_streams_total`,
//!   `gateway_sse_streams_evicted_total`, `gateway_sse_replayed_frames_total`,
//!   `gateway_sse_resets_total`, `gateway_sse_presence_deferred_total`,
//!   `gateway_bus_resumes_total{reads}`.
//! - `gateway_service_request_duration_seconds{service,outcome}` (registered services,
//!   `crate::services`), `gateway_service_events_total{outcome}`,
//!   `gateway_questions_total{outcome}` (`crate::questions`).
//! - `gateway_callbacks_total{outcome}`, `gateway_jwks_refreshes_total{outcome}`,
//!   `gateway_rate_limited_total{limit}`, `gateway_connections_refused_total{listener,reason}`.
//! - Auth: `gateway_auth_validate_requests_total`, `gateway_session_negative_hits_total`,
//!   `gateway_session_validations_coalesced_total`, `gateway_auth_busy_total`,
//!   `gateway_revocations`, `gateway_revocations_current`.
//!
//! Every label value is from a closed set (route templates, not paths; no user or client
//! ids), so the series count is bounded. `METRICS_ENABLED=false` turns the histograms and
//! labelled families off (nothing is looked up or observed: [`enabled`] is checked first)
//! and `/metrics` answers 404; the few plain counters the auth code bumps stay single
//! atomic adds.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::hub::Hub;

/// A monotonically increasing counter (`prometheus-client`'s; clones share the value).
pub type Counter = prometheus_client::metrics::counter::Counter;

/// A value that goes up and down (`prometheus-client`'s, `i64`; clones share the value).
pub type Gauge = prometheus_client::metrics::gauge::Gauge;

/// A label set of `N` fixed names with values from closed sets.
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// The HTTP label set: listener, route template, method, status.
type HttpLabels = [(&'static str, Cow<'static, str>); 4];

/// A histogram family whose members share one bucket layout.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The `limit` label's values: `auth` (`AUTH_RATE_LIMIT`), `login` (`LOGIN_RATE_LIMIT`),
/// `stream_open` (`STREAM_OPEN_RATE_LIMIT`), `streams` (`USER_MAX_STREAMS`), `replay`
/// (`REPLAY_RATE_LIMIT`), `clients` (`USER_MAX_CLIENTS`).
pub const RATE_LIMITS: [&str; 6] = [
    "auth",
    "login",
    "stream_open",
    "streams",
    "replay",
    "clients",
];

/// Latency buckets for requests and backend calls: 0.5 ms … 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bridge lag buckets (NoETL's event time → frame published): 5 ms … 60 s.
pub const LAG_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A registered histogram family with [`LATENCY_BUCKETS`].
fn histograms<L>(r: &mut Registry, name: &str, help: &str) -> Histograms<L>
where
    L: prometheus_client::encoding::EncodeLabelSet
        + Clone
        + std::hash::Hash
        + Eq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f: Histograms<L> = Family::new_with_constructor(latency_histogram);
    r.register(name, help, f.clone());
    f
}

/// Whether metrics are recorded (`METRICS_ENABLED`); true until [`set_enabled`].
static ENABLED: AtomicBool = AtomicBool::new(true);

/// The process's metrics.
static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// The process's metrics (created on first use).
pub fn global() -> &'static Arc<Metrics> {
    GLOBAL.get_or_init(|| Arc::new(Metrics::default()))
}

/// Turns recording on or off for the whole process (`METRICS_ENABLED`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether metrics are recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The origin's metrics: every family of the catalogue, and the registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    /// `POST /api/auth/validate` requests received.
    pub validate_requests: Counter,
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
    /// 1 while this replica reports ready, 0 while not ready or draining.
    pub ready: Gauge,
    /// 1 while this replica holds the bridge's stream reader lease.
    pub bridge_reader: Gauge,
    /// NAKs the bridge sent (an event to be redelivered later).
    pub bridge_naks: Counter,
    /// NoETL event time → frame published.
    pub bridge_lag: Histogram,
    /// SSE streams opened.
    pub sse_opened: Counter,
    /// SSE streams ended because a newer connection of the same client took over, or
    /// because they fell behind (`stream/evicted`).
    pub sse_evicted: Counter,
    /// Frames replayed to resuming SSE streams.
    pub sse_replayed: Counter,
    /// `stream/reset` frames sent.
    pub sse_resets: Counter,
    /// Resumes opened in a burst of opens, whose presence marker waited for their
    /// stream's first ping.
    pub sse_presence_deferred: Counter,
    sse_open: Gauge,
    revocations: Gauge,
    revocations_current: Gauge,
    http: Histograms<HttpLabels>,
    in_flight: Family<Labels<1>, Gauge>,
    noetl: Histograms<Labels<2>>,
    services: Histograms<Labels<2>>,
    service_events: Family<Labels<1>, Counter>,
    questions: Family<Labels<1>, Counter>,
    kv: Histograms<Labels<3>>,
    bus: Histograms<Labels<2>>,
    bridge_events: Family<Labels<1>, Counter>,
    callbacks: Family<Labels<1>, Counter>,
    bus_resumes: Family<Labels<1>, Counter>,
    jwks_refreshes: Family<Labels<1>, Counter>,
    rate_limited: Family<Labels<1>, Counter>,
    refused: Family<Labels<2>, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered (build info set to 1).
    pub fn new() -> Self {
        let mut r = Registry::default();
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };

        let build_info = Family::<Labels<2>, Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", option_env!("GATEWAY_COMMIT").unwrap_or("unknown")),
            ])
            .set(1);
        r.register(
            "gateway_build_info",
            "The origin's version and commit (GATEWAY_COMMIT at build time); always 1.",
            build_info,
        );
        let ready = gauge(
            &mut r,
            "gateway_ready",
            "1 while this replica reports ready; 0 while it is not ready or draining.",
        );
        let http = histograms(
            &mut r,
            "gateway_http_request_duration_seconds",
            "Time to the response head by listener, route template, method and status (streams count their setup).",
        );
        let in_flight = Family::<Labels<1>, Gauge>::default();
        r.register(
            "gateway_http_requests_in_flight",
            "Requests being answered (until their response head), by listener.",
            in_flight.clone(),
        );
        let noetl = histograms(
            &mut r,
            "gateway_noetl_request_duration_seconds",
            "NoETL calls by route template (proxy for /noetl/*) and outcome, retries included.",
        );
        let services = histograms(
            &mut r,
            "gateway_service_request_duration_seconds",
            "Calls to registered backend services (proxied requests to the head, answer deliveries) by service and outcome.",
        );
        let service_events = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_service_events",
            "Service events received on the internal listener, by outcome (published, rejected, failed).",
            service_events.clone(),
        );
        let questions = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_questions",
            "Human-in-the-loop questions by outcome (asked, answered, expired, delivered, delivery_failed).",
            questions.clone(),
        );
        let noetl_up = gauge(
            &mut r,
            "gateway_noetl_up",
            "1 when this replica's last readiness probe reached NoETL, else 0 (NoETL's state does not fail /ready).",
        );
        let noetl_retries = counter(
            &mut r,
            "gateway_noetl_retries",
            "Retries of idempotent NoETL calls (502/503/504, connect errors).",
        );
        let noetl_retries_over_budget = counter(
            &mut r,
            "gateway_noetl_retries_over_budget",
            "NoETL retries not made: the retry budget (NOETL_RETRY_BUDGET) was spent.",
        );
        let kv = histograms(
            &mut r,
            "gateway_kv_operation_duration_seconds",
            "Shared K/V store operations by bucket, operation and outcome.",
        );
        let bus = histograms(
            &mut r,
            "gateway_bus_operation_duration_seconds",
            "Frame bus operations (publish, replay, subscribe) by outcome.",
        );
        let bridge_lag = Histogram::new(LAG_BUCKETS);
        r.register(
            "gateway_bridge_lag_seconds",
            "NoETL's event time to the frame published on the bus (clock skew included).",
            bridge_lag.clone(),
        );
        let bridge_events = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_bridge_events",
            "NoETL events the bridge handled, by outcome (handled, ignored, duplicate, failed).",
            bridge_events.clone(),
        );
        let bridge_naks = counter(
            &mut r,
            "gateway_bridge_naks",
            "Events the bridge NAKed for a later redelivery.",
        );
        let bridge_reader = gauge(
            &mut r,
            "gateway_bridge_reader",
            "1 while this replica holds the bridge's stream reader lease.",
        );
        let sse_open = gauge(
            &mut r,
            "gateway_sse_streams_open",
            "SSE streams open on this replica.",
        );
        let sse_opened = counter(
            &mut r,
            "gateway_sse_streams",
            "SSE streams opened on this replica.",
        );
        let sse_evicted = counter(
            &mut r,
            "gateway_sse_streams_evicted",
            "SSE streams ended by a newer connection of the same client or for falling behind.",
        );
        let sse_replayed = counter(
            &mut r,
            "gateway_sse_replayed_frames",
            "Frames replayed to resuming SSE streams.",
        );
        let sse_resets = counter(
            &mut r,
            "gateway_sse_resets",
            "stream/reset frames sent (a resume that could not replay everything).",
        );
        let sse_presence_deferred = counter(
            &mut r,
            "gateway_sse_presence_deferred",
            "Resumes opened in a burst of opens whose presence marker waited for the stream's first ping.",
        );
        let callbacks = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_callbacks",
            "Playbook callbacks by outcome (delivered, duplicate, rejected, kept).",
            callbacks.clone(),
        );
        let bus_resumes = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_bus_resumes",
            "Resumes of a client's frames by what they read: none (the router had seen nothing new for the client), stream.",
            bus_resumes.clone(),
        );
        let jwks_refreshes = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_jwks_refreshes",
            "JWKS fetches by outcome.",
            jwks_refreshes.clone(),
        );
        let rate_limited = Family::<Labels<1>, Counter>::default();
        r.register(
            "gateway_rate_limited",
            "Requests refused 429 by an origin rate limit, by limit.",
            rate_limited.clone(),
        );
        let refused = Family::<Labels<2>, Counter>::default();
        r.register(
            "gateway_connections_refused",
            "Connections or requests refused at once, by listener and reason (too_many_connections, overloaded).",
            refused.clone(),
        );
        let validate_requests = counter(
            &mut r,
            "gateway_auth_validate_requests",
            "POST /api/auth/validate requests received by this replica.",
        );
        let session_negative_hits = counter(
            &mut r,
            "gateway_session_negative_hits",
            "Session validations answered invalid from the negative cache (SESSION_NEGATIVE_TTL), NoETL not asked.",
        );
        let session_validations_coalesced = counter(
            &mut r,
            "gateway_session_validations_coalesced",
            "Session validations that waited for another request's NoETL answer about the same token.",
        );
        let auth_busy = counter(
            &mut r,
            "gateway_auth_busy",
            "Auth playbook runs refused 503 auth_busy: AUTH_PLAYBOOK_CONCURRENCY runs already in flight.",
        );
        let revocations = gauge(
            &mut r,
            "gateway_revocations",
            "Revoked sessions this replica holds in memory.",
        );
        let revocations_current = gauge(
            &mut r,
            "gateway_revocations_current",
            "1 while this replica's revocation set is loaded and its watch is up; 0 while asserted callers are refused with 503.",
        );
        // Every child of a closed label set exists from the start, so each series is
        // exported (as 0) before its first event and `rate()` sees it start.
        for outcome in ["handled", "ignored", "duplicate", "failed"] {
            bridge_events.get_or_create_owned(&[("outcome", outcome)]);
        }
        for outcome in ["delivered", "duplicate", "rejected", "kept"] {
            callbacks.get_or_create_owned(&[("outcome", outcome)]);
        }
        for outcome in ["ok", "error"] {
            jwks_refreshes.get_or_create_owned(&[("outcome", outcome)]);
        }
        for limit in RATE_LIMITS {
            rate_limited.get_or_create_owned(&[("limit", limit)]);
        }
        for listener in ["public", "internal"] {
            for reason in ["too_many_connections", "overloaded"] {
                refused.get_or_create_owned(&[("listener", listener), ("reason", reason)]);
            }
        }
        for outcome in ["published", "rejected", "failed"] {
            service_events.get_or_create_owned(&[("outcome", outcome)]);
        }
        for outcome in [
            "asked",
            "answered",
            "expired",
            "delivered",
            "delivery_failed",
        ] {
            questions.get_or_create_owned(&[("outcome", outcome)]);
        }
        Self {
            validate_requests,
            rate_limited_auth: rate_limited.get_or_create_owned(&[("limit", "auth")]),
            rate_limited_login: rate_limited.get_or_create_owned(&[("limit", "login")]),
            session_negative_hits,
            session_validations_coalesced,
            auth_busy,
            noetl_retries,
            noetl_retries_over_budget,
            noetl_up,
            ready,
            bridge_reader,
            bridge_naks,
            bridge_lag,
            sse_opened,
            sse_evicted,
            sse_replayed,
            sse_resets,
            sse_presence_deferred,
            sse_open,
            revocations,
            revocations_current,
            http,
            in_flight,
            noetl,
            services,
            service_events,
            questions,
            kv,
            bus,
            bridge_events,
            callbacks,
            bus_resumes,
            jwks_refreshes,
            rate_limited,
            refused,
            registry: r,
        }
    }

    /// One HTTP request's time to its response head.
    pub fn observe_http(
        &self,
        listener: &'static str,
        route: Cow<'static, str>,
        method: &'static str,
        status: u16,
        took: Duration,
    ) {
        let labels: HttpLabels = [
            ("listener", Cow::Borrowed(listener)),
            ("route", route),
            ("method", Cow::Borrowed(method)),
            ("status", Cow::Owned(status.to_string())),
        ];
        self.http.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// The in-flight gauge of `listener`.
    pub fn in_flight(&self, listener: &'static str) -> Gauge {
        self.in_flight
            .get_or_create_owned(&[("listener", listener)])
    }

    /// One NoETL call (retries included) by route template and outcome.
    pub fn observe_noetl(&self, route: &'static str, outcome: &'static str, took: Duration) {
        if enabled() {
            self.noetl
                .get_or_create(&[("route", route), ("outcome", outcome)])
                .observe(took.as_secs_f64());
        }
    }

    /// One call to a registered service (to the answer's head) by service and outcome.
    /// `service` is a configured name (a closed set, leaked once at start).
    pub fn observe_service(&self, service: &'static str, outcome: &'static str, took: Duration) {
        if enabled() {
            self.services
                .get_or_create(&[("service", service), ("outcome", outcome)])
                .observe(took.as_secs_f64());
        }
    }

    /// One service event received: `published`, `rejected` or `failed`.
    pub fn service_event(&self, outcome: &'static str) {
        if enabled() {
            self.service_events
                .get_or_create(&[("outcome", outcome)])
                .inc();
        }
    }

    /// One question step: `asked`, `answered`, `expired`, `delivered`, `delivery_failed`.
    pub fn question(&self, outcome: &'static str) {
        if enabled() {
            self.questions.get_or_create(&[("outcome", outcome)]).inc();
        }
    }

    /// One K/V operation.
    pub fn observe_kv(
        &self,
        bucket: &'static str,
        op: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        if enabled() {
            self.kv
                .get_or_create(&[("bucket", bucket), ("op", op), ("outcome", outcome)])
                .observe(took.as_secs_f64());
        }
    }

    /// One bus operation.
    pub fn observe_bus(&self, op: &'static str, outcome: &'static str, took: Duration) {
        if enabled() {
            self.bus
                .get_or_create(&[("op", op), ("outcome", outcome)])
                .observe(took.as_secs_f64());
        }
    }

    /// One bridge event by outcome (`handled`, `ignored`, `duplicate`, `failed`).
    pub fn bridge_event(&self, outcome: &'static str) {
        if enabled() {
            self.bridge_events
                .get_or_create(&[("outcome", outcome)])
                .inc();
        }
    }

    /// The lag of a frame published for an event NoETL recorded at `event_time` (RFC 3339);
    /// nothing if the time does not parse. A clock behind NoETL's counts as zero.
    pub fn observe_bridge_lag(&self, event_time: &str) {
        if !enabled() {
            return;
        }
        if let Ok(at) = chrono::DateTime::parse_from_rfc3339(event_time) {
            let lag = chrono::Utc::now().signed_duration_since(at);
            let secs = lag.num_microseconds().unwrap_or(i64::MAX).max(0) as f64 / 1e6;
            self.bridge_lag.observe(secs);
        }
    }

    /// One callback by outcome (`delivered`, `duplicate`, `rejected`, `kept`).
    pub fn callback(&self, outcome: &'static str) {
        if enabled() {
            self.callbacks.get_or_create(&[("outcome", outcome)]).inc();
        }
    }

    /// One resume of a client's frames on the NATS bus (a frame id or the client's first
    /// position to start after) by what it read: `none` or `stream`.
    pub fn bus_resume(&self, reads: &'static str) {
        if enabled() {
            self.bus_resumes.get_or_create(&[("reads", reads)]).inc();
        }
    }

    /// One JWKS fetch by outcome (`ok`, `error`).
    pub fn jwks_refresh(&self, outcome: &'static str) {
        if enabled() {
            self.jwks_refreshes
                .get_or_create(&[("outcome", outcome)])
                .inc();
        }
    }

    /// One request refused by the rate limit `limit`.
    pub fn rate_limited(&self, limit: &'static str) {
        if enabled() {
            self.rate_limited.get_or_create(&[("limit", limit)]).inc();
        }
    }

    /// One connection (or request) refused at once on `listener` for `reason`.
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        if enabled() {
            self.refused
                .get_or_create(&[("listener", listener), ("reason", reason)])
                .inc();
        }
    }

    /// The exposition text (OpenMetrics, ending in `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What `/metrics` reads besides [`global`].
#[derive(Clone)]
pub struct MetricsState {
    /// The metrics (the process's, [`global`]).
    pub metrics: Arc<Metrics>,
    /// This replica's open SSE streams (the open-streams gauge).
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

/// The OpenMetrics content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`: 404 when `METRICS_ENABLED=false`.
pub async fn metrics(State(state): State<MetricsState>) -> Response {
    if !enabled() {
        // Not `AppError`: the error module depends on the stores, which record here.
        let body = gateway_shared::error::ErrorBody::new(
            "not_found",
            "metrics are disabled (METRICS_ENABLED=false)",
        );
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    let m = &state.metrics;
    m.sse_open
        .set(i64::try_from(state.hub.len()).unwrap_or(i64::MAX));
    m.revocations
        .set(i64::try_from(state.revocations.held()).unwrap_or(i64::MAX));
    m.revocations_current
        .set(i64::from(state.revocations.is_current()));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        m.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_catalogue_names_and_types() {
        let m = Metrics::new();
        m.validate_requests.inc();
        m.rate_limited_login.inc();
        m.observe_http(
            "public",
            Cow::Borrowed("/noetl/{*path}"),
            "GET",
            200,
            Duration::from_millis(3),
        );
        m.observe_kv("sessions", "get", "not_found", Duration::from_micros(40));
        m.observe_bridge_lag(&chrono::Utc::now().to_rfc3339());
        let text = m.encode();
        for line in [
            "# TYPE gateway_http_request_duration_seconds histogram",
            "gateway_http_request_duration_seconds_count{listener=\"public\",route=\"/noetl/{*path}\",method=\"GET\",status=\"200\"} 1",
            "gateway_kv_operation_duration_seconds_count{bucket=\"sessions\",op=\"get\",outcome=\"not_found\"} 1",
            "gateway_auth_validate_requests_total 1",
            "gateway_rate_limited_total{limit=\"login\"} 1",
            "gateway_rate_limited_total{limit=\"auth\"} 0",
            "gateway_bridge_lag_seconds_count 1",
            "# TYPE gateway_sse_streams_open gauge",
            "# TYPE gateway_build_info gauge",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(text.contains("gateway_build_info{version=\""), "{text}");
    }
}
