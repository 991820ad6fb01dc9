//! Wire types and pure policy shared by the edge worker and the origin.
//!
//! Nothing in this crate does I/O or depends on an async runtime, so it compiles for
//! `wasm32-unknown-unknown` (the Workers runtime) as well as the host, and every
//! decision in it is unit-tested natively with plain values.
//!
//! - [`error`] — the one JSON error body every gateway error uses.
//! - [`session`] — session tokens: extraction from a request, hashing into cache keys,
//!   the cached session record and the user it names.
//! - [`frames`] — SSE frames (JSON-RPC), callback and progress bodies.
//! - [`cors`] — the CORS decision (exact allow-list, `Vary: Origin` always).
//! - [`routes`] — the edge's route table (public / session / deny / service / edge).
//! - [`assertion`] — the edge's signed Ed25519 assertion of the caller.
//! - [`ct`] — constant-time comparison for secrets.
//! - [`ids`] — `ClientId`, `RequestId`, `ExecutionId`: ids checked once, where they enter.
//! - [`client_ip`] — which rate-limit bucket a client address counts in (IPv6 by /64).
//! - [`headers`] — what a client may bring in its headers: accepted request ids, identity
//!   and credential headers stripped from what is forwarded.
//! - [`trace`] — W3C `traceparent`: parse, format, continue the client's trace or start one.

pub mod assertion;
pub mod client_ip;
pub mod cors;
pub mod ct;
pub mod error;
pub mod frames;
pub mod headers;
pub mod ids;
pub mod routes;
pub mod session;
pub mod trace;
