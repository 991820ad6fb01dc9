//! The router: every route of the stand-in and the one layer, in one place.
//!
//! `/api/*` (NoETL's surface) runs under [`control::observe_api`] (call counts, faults);
//! `/dev/*` (the IdP) and `/_standin/*` (test control) do not, so a test can inject a
//! fault and still mint tokens or clear it. Unknown routes and methods get JSON errors.

use super::state::Shared;
use super::{api, auth, control, debug, dev, http};
use axum::middleware::from_fn_with_state;
use axum::routing::{any, get, post};
use axum::Router;

/// The whole application.
pub fn router(state: Shared) -> Router {
    noetl_api(state.clone())
        .merge(dev_idp())
        .merge(test_control())
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .with_state(state)
}

/// What the real NoETL serves (plus the proxy-test debug routes).
fn noetl_api(state: Shared) -> Router<Shared> {
    Router::new()
        .route("/api/health", get(api::health))
        .route("/api/execute", post(api::execute))
        .route("/api/executions", get(api::list_executions))
        .route("/api/executions/{id}", get(api::get_execution))
        .route("/api/executions/{id}/status", get(api::execution_status))
        .route("/api/executions/{id}/cancel", post(api::cancel_execution))
        .route("/api/catalog/playbooks", get(api::catalog))
        .route("/api/auth/login", post(auth::login_route))
        .route("/api/auth/session/validate", post(auth::validate_route))
        .route(
            "/api/auth/check-playbook-access",
            post(auth::check_access_route),
        )
        .route("/api/auth/logout", post(auth::logout_route))
        .route("/api/debug/echo", any(debug::echo))
        .route("/api/debug/echo/{*rest}", any(debug::echo))
        .route("/api/debug/slow", get(debug::slow))
        .route("/api/debug/stream", get(debug::stream))
        .route_layer(from_fn_with_state(state, control::observe_api))
}

/// The dev identity provider.
fn dev_idp() -> Router<Shared> {
    Router::new()
        .route("/dev/token", get(dev::token))
        .route("/dev/.well-known/jwks.json", get(dev::jwks))
        .route("/dev/.well-known/openid-configuration", get(dev::discovery))
        .route("/dev/public-key.pem", get(dev::public_key_pem))
}

/// Test control.
fn test_control() -> Router<Shared> {
    Router::new()
        .route("/_standin/calls", get(control::calls))
        .route("/_standin/traces", get(control::traces))
        .route("/_standin/reset-calls", post(control::reset_calls))
        .route(
            "/_standin/faults",
            get(control::get_faults).post(control::set_faults),
        )
        .route("/_standin/callbacks", get(control::callbacks))
        .route("/_standin/stats", get(control::stats))
}
