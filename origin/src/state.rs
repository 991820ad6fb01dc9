//! The application state: one substate per handler module, composed here and nowhere else.
//!
//! Each handler module declares the state it needs (`AuthRoutesState`, `EventsState`, …)
//! and exports a router over it alone; [`AppState`] holds one of each and derives
//! [`FromRef`], so [`crate::app`] hands every router its own substate. A handler therefore
//! cannot reach a service it was not given, and can be tested over just its substate.
//! Built by [`crate::server::build_state`] (start-up) — or, in tests, over the embedded
//! store and bus by the same function.

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;

use crate::auth::edge::EdgeTrust;
use crate::auth::routes::AuthRoutesState;
use crate::callbacks::CallbackState;
use crate::events::EventsState;
use crate::graphql::GraphqlState;
use crate::health::Readiness;
use crate::listener::RequestLimits;
use crate::metrics::MetricsState;
use crate::proxy::ProxyState;
use crate::questions::QuestionsState;
use crate::ratelimit::TrustedProxies;
use crate::service_events::ServiceEventsState;

/// Everything the two listeners serve, as per-module substates; cheap to clone (each
/// substate is a handful of `Arc`s).
#[derive(Clone, FromRef)]
pub struct AppState {
    /// `/api/auth/*`.
    pub auth: AuthRoutesState,
    /// `/graphql`, `/graphql/ws`.
    pub graphql: GraphqlState,
    /// `/events`, `/api/events/ticket`.
    pub events: EventsState,
    /// `/api/v1/{service}/*`, `/noetl/*`.
    pub proxy: ProxyState,
    /// `POST /api/internal/events` (internal listener).
    pub service_events: ServiceEventsState,
    /// `POST /api/internal/questions` (internal), `POST /api/v1/events/{client_id}/response`.
    pub questions: QuestionsState,
    /// `/api/internal/*` (internal listener).
    pub callbacks: CallbackState,
    /// `/ready`.
    pub readiness: Readiness,
    /// `/metrics` (internal listener).
    pub metrics: MetricsState,
    /// The edge's key: the assertion middleware of the public listener.
    pub edge_trust: EdgeTrust,
    /// Whose `x-forwarded-for` is believed: the client-address middleware.
    pub trusted_proxies: TrustedProxies,
    /// The request timeout and load shedding of both listeners (`app.rs` layers).
    pub limits: RequestLimits,
    /// Cancelled on SIGTERM; the listeners drain with it.
    pub shutdown: CancellationToken,
}
