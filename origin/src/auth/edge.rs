//! Trusting the edge: the `x-gateway-assertion` check.
//!
//! The edge validates a session once and forwards the request with a short-lived EdDSA
//! assertion of the caller (`gateway_shared::assertion`). Here the origin checks it with
//! the edge's public key (`EDGE_ASSERTION_PUBLIC_KEY`) and, when it holds, records the
//! caller in the request's extensions so handlers skip a second session validation.
//!
//! - A valid assertion → [`EdgeIdentity`] in the request extensions.
//! - An assertion that does not verify (forged, expired, wrong party) → 401: a request
//!   that claims to come from the edge and cannot prove it is refused, never downgraded.
//! - No key configured → the header is removed and ignored: an origin that does not know
//!   the edge's key never takes a client's word for who it is.
//! - `REQUIRE_EDGE_ASSERTION=true` → public-listener traffic without a valid assertion is
//!   refused (except `/health` and `/ready`, which probes call directly).

use axum::extract::Request;
use gateway_shared::assertion::{self, AssertionClaims, PublicKey};

use super::session::now_unix;
use crate::error::AppError;

/// Clock skew allowed between the edge and the origin.
const LEEWAY_SECS: i64 = 5;

/// The caller as the edge vouched for it (present only after verification).
#[derive(Debug, Clone)]
pub struct EdgeIdentity(pub AssertionClaims);

/// The edge's verifying key, parsed once at start.
#[derive(Debug, Clone)]
pub struct EdgeTrust {
    key: Option<PublicKey>,
    required: bool,
}

impl EdgeTrust {
    /// From the configuration (already validated).
    pub fn new(public_key_b64: Option<&str>, required: bool) -> Self {
        Self {
            key: public_key_b64.and_then(|k| assertion::verifying_key_from_b64(k).ok()),
            required,
        }
    }
}

/// The check (public listener; `crate::app`'s `front` layer runs it before every route):
/// a verified assertion becomes [`EdgeIdentity`] in the request's extensions, and the
/// header never reaches a handler; `Err` is the refusal to answer instead (401 JSON).
pub fn admit(trust: &EdgeTrust, req: &mut Request) -> Result<(), AppError> {
    let header = req
        .headers_mut()
        .remove(assertion::HEADER)
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    let exempt = matches!(req.uri().path(), "/health" | "/ready");
    match (&trust.key, header) {
        (Some(key), Some(token)) => match assertion::verify(&token, key, now_unix(), LEEWAY_SECS) {
            Ok(claims) => {
                req.extensions_mut().insert(EdgeIdentity(claims));
            }
            Err(e) => {
                tracing::warn!(reason = e.code(), "edge assertion refused");
                return Err(AppError::unauthorized(
                    e.code(),
                    "the edge assertion does not verify",
                ));
            }
        },
        (None, Some(_)) => {
            tracing::debug!("x-gateway-assertion ignored: no EDGE_ASSERTION_PUBLIC_KEY")
        }
        (_, None) if trust.required && !exempt => {
            return Err(AppError::unauthorized(
                "edge_assertion_required",
                "this origin only serves requests that come through the edge",
            ));
        }
        _ => {}
    }
    Ok(())
}
