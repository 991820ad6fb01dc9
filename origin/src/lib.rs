//! The origin service of the NoETL edge gateway.
//!
//! A request enters through one of two listeners composed in [`app`]: the public one
//! (auth REST, the `/noetl/*` proxy, health) and the internal one (callbacks, metrics —
//! in-cluster only). Handlers are thin: they call the services below and map failures
//! through the one error type in [`error`].
//!
//! - [`config`] — the one configuration struct (flags + env), validated at start.
//! - [`server`] — start-up (NATS, stores, clients) and graceful shutdown.
//! - [`app`] — routers and middleware, in request order.
//! - [`auth`] — ID-token verification, the session service and the auth REST API.
//! - [`proxy`] — `/noetl/*` → NoETL `/api/*`: path policy, allow-list, streaming.
//! - [`noetl`] — the one HTTP client to NoETL: timeouts, retries, error mapping.
//! - [`store`] — the K/V trait with its in-memory and NATS JetStream implementations.
//! - [`bus`] — client delivery: frames per client with replay, in-memory and NATS.
//! - [`bridge`] — NoETL execution events on NATS → `playbook/state` frames for interested clients.
//! - [`interest`] — which clients want an execution's frames (records in the K/V store).
//! - [`runs`] — a run's status as NoETL reports it, and which execution ids are usable.
//! - [`extract`] — hostile-input extractors (size-limited JSON, session token).
//! - [`health`] — liveness and readiness.
//! - [`error`] — `AppError` → `{"error":{"code","message"}}`.

pub mod app;
pub mod auth;
pub mod bridge;
pub mod bus;
pub mod callbacks;
pub mod clients;
pub mod config;
pub mod error;
pub mod events;
pub mod extract;
pub mod graphql;
pub mod health;
pub mod hub;
pub mod interest;
pub mod listener;
pub mod metrics;
pub mod noetl;
pub mod proxy;
pub mod requests;
pub mod runs;
pub mod server;
pub mod state;
pub mod store;
