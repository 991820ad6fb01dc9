//! Authentication: who is calling, and may they do this?
//!
//! - [`caller`] — the [`Caller`] extractor: the one place a request's caller is decided
//!   (edge assertion or session token).
//! - [`edge`] — the `x-gateway-assertion` middleware: verifies the edge's signed assertion.
//! - [`id_token`] — the pure check of an Auth0 ID token (RS256 signature over a given key
//!   set, then the claim rules); no I/O.
//! - [`jwks`] — fetches and caches the provider's key set; its `IdTokenVerifier` runs the
//!   pure check over it before any session is created.
//! - [`backend`] — NoETL's REST auth routes or its auth playbooks, behind one trait.
//! - [`local`] — the replica's own session cache in front of K/V `sessions`: a cached
//!   session's request makes no NATS round trip.
//! - [`negative`] — invalid tokens are cheap: the negative cache of tokens NoETL called
//!   invalid, and one NoETL call per token however many ask at once.
//! - [`session`] — the session service: NoETL is the source of truth, K/V `sessions` the
//!   shared cache, K/V `revoked` the logout markers.
//! - [`revocations`] — the replica's in-memory revocation set, fed by a watch on K/V
//!   `revoked`; tells open connections when their session is revoked.
//! - [`routes`] — the auth REST API of PROTOCOL.md §1.

pub mod backend;
pub mod caller;
pub mod edge;
pub mod id_token;
pub mod jwks;
pub mod local;
pub mod negative;
pub mod revocations;
pub mod routes;
pub mod session;
#[cfg(test)]
mod test_tokens;

pub use caller::Caller;
