//! End-to-end support for the gateway: the process harness, the NoETL stand-in and the
//! benchmark drivers.
//!
//! - [`harness`] — starts nats-server, the NoETL stand-in and the origin binary on free
//!   loopback ports, each killed when its guard drops.
//! - [`standin`] — a NoETL server stand-in that follows PROTOCOL.md §6 to the field: the
//!   HTTP API, the auth routes, a dev identity provider, and execution events on NATS.
//!   `noetl-standin` (src/bin) runs it; `make dev` uses it as the demo upstream.

pub mod bench;
pub mod harness;
pub mod standin;
