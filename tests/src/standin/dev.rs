//! The dev identity provider's routes under `/dev/` (an Auth0 tenant in miniature).

use super::http::{ApiError, QueryParams};
use super::idp::TokenRequest;
use super::state::Shared;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

/// `GET /dev/token?sub=&email=&name=[&iss=&aud=&ttl=&nbf_in=&kid=&email_verified=&iat_ago=]` → `{"id_token"}`.
pub async fn token(
    State(st): State<Shared>,
    QueryParams(req): QueryParams<TokenRequest>,
) -> Result<Json<Value>, ApiError> {
    let token = st.idp.issue(&req).map_err(|e| {
        ApiError::Status(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot sign: {e}"),
        )
    })?;
    Ok(Json(json!({ "id_token": token })))
}

/// `GET /dev/.well-known/jwks.json`.
pub async fn jwks(State(st): State<Shared>) -> Json<Value> {
    Json(st.idp.jwks().clone())
}

/// `GET /dev/.well-known/openid-configuration`.
pub async fn discovery(State(st): State<Shared>) -> Json<Value> {
    Json(st.idp.discovery())
}

/// `GET /dev/public-key.pem` (SPKI PEM).
pub async fn public_key_pem(State(st): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        st.idp.public_key_pem().to_owned(),
    )
}
