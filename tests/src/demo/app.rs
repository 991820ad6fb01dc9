//! The router and the state every handler shares: every route and the one layer (the
//! body limit) in one place. Unknown routes and wrong methods get JSON errors.

use super::answers::{Answers, Refusals};
use super::gateway::Gateway;
use super::{error, hitl, probe, MAX_BODY_BYTES};
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use axum::Router;
use std::sync::{Arc, Mutex};

/// What every handler sees.
#[derive(Debug)]
pub struct DemoState {
    /// The service's name (`--name`).
    pub name: String,
    /// How the gateway reaches this service, without a trailing slash.
    pub public_url: String,
    /// The client to the gateway's internal listener.
    pub gateway: Gateway,
    /// The deliveries received on `POST /answers`.
    pub answers: Mutex<Answers>,
    /// Deliveries a test asked to refuse (`POST /_demo/refuse-answers`).
    pub refusals: Mutex<Refusals>,
}

/// The shared state handed to handlers.
pub type Shared = Arc<DemoState>;

/// The whole application.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(probe::health))
        .route("/echo", any(probe::echo))
        .route("/echo/{*rest}", any(probe::echo))
        .route("/slow", get(probe::slow))
        .route("/stream", get(probe::stream))
        .route("/ask", post(hitl::ask))
        .route("/answers", post(hitl::receive_answer))
        .route("/answers/{question_id}", get(hitl::answer_of))
        .route("/emit", post(hitl::emit))
        .route("/_demo/deliveries", get(hitl::deliveries))
        .route("/_demo/gateway", post(hitl::set_gateway))
        .route(
            "/_demo/refuse-answers",
            get(hitl::refusals).post(hitl::refuse_answers),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
