//! The origin service of the NoETL edge gateway.
//!
//! A request enters through one of two listeners composed in [`app`]: the public one
//! (auth REST, GraphQL, SSE, the `/noetl/*` proxy, health) and the internal one (callbacks,
//! metrics — in-cluster only). Each handler module exports a router over its own substate
//! of [`state`]; handlers are thin: they call the services below and map failures through
//! the one error type in [`error`].
//!
//! Start-up and composition:
//! - [`config`] — the one configuration struct (flags + env), validated at start.
//! - [`server`] — start-up (NATS, stores, clients, the bridge) and graceful shutdown.
//! - [`state`] — `AppState`: one substate per handler module, `FromRef`.
//! - [`app`] — routers and middleware, in request order.
//! - [`listener`] — the accept loop: hyper, or the lean HTTP/1.1 writer for `GET /events`.
//!
//! Handlers (each a router over its own substate):
//! - [`auth`] — who is calling (`Caller`), ID-token verification, the session service, the
//!   revocation set (`auth/revocations.rs`, fed by a watch on K/V `revoked`) and the auth
//!   REST API.
//! - [`graphql`] — the GraphQL schema, `/graphql` and `/graphql/ws`.
//! - [`events`] — SSE `/events` and its tickets.
//! - [`callbacks`] — playbook callbacks and progress (internal listener).
//! - [`proxy`] — `/api/v1/{service}/*` and `/noetl/*`: one proxy core for every
//!   registered service (path policy, allow-list, limits, streaming).
//! - [`service_events`] — `POST /api/internal/events`: a backend's event for a client, a
//!   user's clients or everyone watching an execution, as `service/event` frames.
//! - [`questions`] — human-in-the-loop questions: asked on the internal listener, answered
//!   by the client's owner (first answer wins across replicas), delivered to the asker at
//!   least once, expired with a notice.
//! - [`health`] — liveness and readiness.
//! - [`metrics`] — the `prometheus-client` registry and `/metrics` (internal listener).
//! - [`observe`] — per request: W3C trace context, HTTP metrics, the access log.
//! - [`logs`] — the JSON log line (Cloud Logging `severity`, trace and span ids).
//! - [`openapi`] — the OpenAPI 3.1 document of every HTTP route (`docs/openapi.json`),
//!   from the handlers' `utoipa` annotations.
//! - [`otel`] — optional OTLP trace export (`OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! Services and stores:
//! - [`noetl`] — the one HTTP client to NoETL: timeouts, retries, redirects off, errors.
//! - [`services`] — the service registry (`SERVICES`, `SERVICE_<NAME>_*`), parsed purely.
//! - [`upstream`] — the HTTP client of each registered service (its own pool), and the
//!   proxy's one send.
//! - [`h1pool`] — the plain-HTTP/1.1 pool the proxy sends through, its connections driven
//!   on the request's own task.
//! - [`store`] — the K/V trait with its in-memory and NATS JetStream implementations.
//! - [`requests`] — the request store (promised deliveries) and callback tokens.
//! - [`clients`] — client ids: ownership, pending requests, presence.
//! - [`bus`] — client delivery: frames per client with replay, in-memory and NATS.
//! - [`hub`] — this replica's SSE connections, one generation per client id.
//! - [`bridge`] — NoETL execution events on NATS → `playbook/state` frames for interested clients.
//! - [`interest`] — which clients want an execution's frames, and the bridge's claims (K/V).
//! - [`lanes`] — one replica's turns at a shared record per key (client index, run slots, watch lists).
//! - [`runs`] — a run's status as NoETL reports it.
//! - [`owners`] — who started each execution, the one rule for who may touch it, and
//!   each user's runs newest first (K/V).
//! - [`settle`] — the one `playbook/result` for a run that ended FAILED or CANCELLED
//!   without its callback (after the bridge's terminal frame).
//! - [`scrub`] — NoETL's JSON without injected workload values and users' tokens, before a
//!   client sees it (proxy, GraphQL, callback results).
//! - [`ratelimit`] — GCRA limiters per client address or user, and who the client is
//!   behind trusted proxies (`TRUSTED_PROXIES`).
//! - [`quotas`] — per-user realtime quotas: open streams and sockets, stream opens, replays.
//! - [`extract`] — hostile-input extractors (size-limited JSON, body limits).
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
pub mod h1pool;
pub mod health;
pub mod hub;
pub mod interest;
pub mod lanes;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod noetl;
pub mod observe;
pub mod openapi;
pub mod otel;
pub mod owners;
pub mod proxy;
pub mod questions;
pub mod quotas;
pub mod ratelimit;
pub mod requests;
pub mod runs;
pub mod scrub;
pub mod server;
pub mod service_events;
pub mod services;
pub mod settle;
pub mod state;
pub mod store;
pub mod upstream;
