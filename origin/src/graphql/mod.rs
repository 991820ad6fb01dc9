//! GraphQL (PROTOCOL.md §2): `POST /graphql` (session required) and GraphiQL at
//! `GET /graphql`.
//!
//! The HTTP shell is ours rather than the integration crate's extractor, so the protocol's
//! rules hold before GraphQL runs: no session → 401 JSON, body over 2 MiB → 413, wrong
//! content type → 415, malformed JSON → 400. Inside, the schema has depth and complexity
//! limits and introspection can be switched off (`GRAPHQL_INTROSPECTION=false`).
//!
//! The old gateway's `proxyRequest` mutation is deliberately absent: it let any caller make
//! the gateway fetch arbitrary URLs.

pub mod schema;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub use schema::{build_schema, Caller, GatewaySchema};

use crate::app::AppState;
use crate::auth::routes::require_request_session;
use crate::error::{json_response, AppError};
use crate::extract::{is_json_content_type, parse_json, read_body_limited};

/// Largest GraphQL request body.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// The GraphQL routes (public listener).
pub fn router() -> Router<AppState> {
    Router::new().route("/graphql", get(graphiql).post(graphql))
}

async fn graphiql() -> Html<String> {
    Html(
        async_graphql::http::GraphiQLSource::build()
            .endpoint("/graphql")
            .finish(),
    )
}

async fn graphql(State(state): State<AppState>, req: Request) -> Result<Response, AppError> {
    let (parts, body) = req.into_parts();
    let (token, record) = require_request_session(&state, &parts).await?;
    if !is_json_content_type(&parts.headers) {
        return Err(AppError::UnsupportedMediaType);
    }
    let bytes = read_body_limited(body, MAX_BODY).await?;
    let request: async_graphql::Request = parse_json(&bytes)?;
    let caller = Caller {
        token,
        record,
        request_id: parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    let response = state.graphql.execute(request.data(caller)).await;
    Ok(json_response(StatusCode::OK, &response).into_response())
}
