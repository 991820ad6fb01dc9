//! End-to-end support for the gateway: the process harness, the NoETL stand-in and the
//! benchmark drivers.
//!
//! - [`harness`] — starts nats-server, the NoETL stand-in and the origin binary on free
//!   loopback ports, each killed when its guard drops.
//! - [`standin`] — a NoETL server stand-in that follows PROTOCOL.md §6 to the field: the
//!   HTTP API, the auth routes, a dev identity provider, and execution events on NATS.
//!   `noetl-standin` (src/bin) runs it; `make dev` uses it as the demo upstream.
//! - [`demo`] — a backend service stand-in behind the gateway's `/api/v1/<name>/*`: echo,
//!   slow and SSE routes and a human-in-the-loop asker. `demo-service` (src/bin) runs it;
//!   `make dev` registers it as the service `demo`.

pub mod bench;
pub mod demo;
pub mod harness;
pub mod standin;
