//! The origin's configuration: one struct, read once at start from flags and the
//! environment (`clap` with `env`), validated, and printed with secrets redacted.
//!
//! Nothing else in the origin reads environment variables; handlers get what they need
//! from [`Config`] through the application state.

use clap::{Parser, ValueEnum};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;
use url::Url;

use crate::ratelimit::Cidr;

/// A secret value (token, key): its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() < 16 {
            return Err("a secret must be at least 16 characters long".into());
        }
        Ok(Secret(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// How the origin authenticates sessions against NoETL (PROTOCOL.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// NoETL's synchronous auth routes (`/api/auth/*`).
    Rest,
    /// NoETL's auth playbooks, answered through `/api/internal/callback`.
    Playbook,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines for a terminal.
    Text,
    /// One JSON object per line, for log collectors (GKE / Cloud Logging).
    Json,
}

/// A rate-limit flag: `N/period`, or `off` (`None`). An alias, so clap takes the parser's
/// `Option` as the value instead of making the flag optional.
pub type RateFlag = Option<crate::ratelimit::RateSpec>;

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 300s, 5m, 1h)"))
}

/// Every setting of the origin. Each flag can also be given by the environment variable
/// named in its help; the README's configuration table lists them.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "origin",
    version,
    about = "The NoETL edge gateway's origin service"
)]
pub struct Config {
    /// Public listener (auth, GraphQL, SSE, /noetl proxy). Use 0.0.0.0:8090 in a pod.
    #[arg(long, env = "PUBLIC_ADDR", default_value = "127.0.0.1:8090")]
    pub public_addr: SocketAddr,

    /// Internal listener (callbacks, metrics): reachable in-cluster only, never through the edge.
    #[arg(long, env = "INTERNAL_ADDR", default_value = "127.0.0.1:8091")]
    pub internal_addr: SocketAddr,

    /// NoETL server base URL (its API lives under /api).
    #[arg(long, env = "NOETL_BASE_URL", default_value = "http://127.0.0.1:8082")]
    pub noetl_base_url: Url,

    /// Path of NoETL's health route, checked by /ready.
    #[arg(long, env = "NOETL_HEALTH_PATH", default_value = "/api/health")]
    pub noetl_health_path: String,

    /// Timeout for one call to NoETL (connect + response).
    #[arg(long, env = "NOETL_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub noetl_timeout: Duration,

    /// Connect timeout for NoETL.
    #[arg(long, env = "NOETL_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "2s")]
    pub noetl_connect_timeout: Duration,

    /// Extra attempts for idempotent NoETL calls that fail to connect or get 502/503/504.
    #[arg(long, env = "NOETL_RETRIES", default_value_t = 2)]
    pub noetl_retries: u32,

    /// NATS server URL. Unset: the embedded in-memory store (one replica only).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,

    /// Prefix for the K/V bucket names (lets two gateways share one NATS).
    #[arg(long, env = "NATS_KV_PREFIX")]
    pub nats_kv_prefix: Option<String>,

    /// JetStream replicas of the gateway's buckets and frames stream (1–5; 3 on a
    /// three-node cluster). Applied at start to what exists, too; unset leaves them as
    /// they are (new ones get the server's default, one).
    #[arg(long, env = "NATS_REPLICAS")]
    pub nats_replicas: Option<usize>,

    /// How sessions are validated against NoETL.
    #[arg(long, env = "AUTH_MODE", value_enum, default_value = "rest")]
    pub auth_mode: AuthMode,

    /// `AUTH_MODE=playbook`: how long an auth playbook may take to call back before it is
    /// cancelled and the caller gets 504.
    #[arg(long, env = "AUTH_PLAYBOOK_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub auth_playbook_timeout: Duration,

    /// Auth0 tenant domain (e.g. `example.eu.auth0.com`): gives the JWKS URL and issuer.
    #[arg(long, env = "AUTH0_DOMAIN")]
    pub auth0_domain: Option<String>,

    /// JWKS URL for ID tokens; overrides the one derived from AUTH0_DOMAIN.
    #[arg(long, env = "AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<Url>,

    /// Required `iss` of ID tokens; default `https://{AUTH0_DOMAIN}/`.
    #[arg(long, env = "AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// Required `aud` of ID tokens (the Auth0 application's client id).
    #[arg(long, env = "AUTH_AUDIENCE")]
    pub auth_audience: String,

    /// Clock skew allowed when checking `exp` / `nbf` of ID tokens.
    #[arg(long, env = "AUTH_LEEWAY", value_parser = parse_duration, default_value = "30s")]
    pub auth_leeway: Duration,

    /// The longest time since an ID token's `iat` it may be exchanged for a session (`0s`:
    /// no limit beyond its `exp`). A leaked ID token cannot mint sessions for hours.
    #[arg(long, env = "AUTH_MAX_TOKEN_AGE", value_parser = parse_duration, default_value = "10m")]
    pub auth_max_token_age: Duration,

    /// Accept ID tokens whose `email_verified` is `false` (refused by default).
    #[arg(long, env = "AUTH_ALLOW_UNVERIFIED_EMAIL", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_allow_unverified_email: bool,

    /// How long a validated session is served from the cache before NoETL is asked again
    /// (the entry itself is kept for the session's life, up to `SESSION_MAX_LIFE`).
    #[arg(long, env = "SESSION_CACHE_TTL", value_parser = parse_duration, default_value = "300s")]
    pub session_cache_ttl: Duration,

    /// How long a replica serves a session it validated from its own memory, without
    /// reading K/V `sessions` (`0s`: off). Capped at `SESSION_CACHE_TTL`. A logout still
    /// ends it everywhere at once: the revocation set is checked before this cache.
    #[arg(long, env = "SESSION_LOCAL_TTL", value_parser = parse_duration, default_value = "10s")]
    pub session_local_ttl: Duration,

    /// The longest a NoETL session is expected to live (K/V `sessions` and `clients` TTL).
    #[arg(long, env = "SESSION_MAX_LIFE", value_parser = parse_duration, default_value = "24h")]
    pub session_max_life: Duration,

    /// The longest a revocation is kept (K/V `revoked` max age): each marker lives for its
    /// session's remaining life up to this, and this long when that life is unknown.
    /// At least `SESSION_MAX_LIFE`.
    #[arg(long, env = "REVOKED_MAX_AGE", value_parser = parse_duration, default_value = "30d")]
    pub revoked_max_age: Duration,

    /// How long a check-access decision is reused per (user, playbook, permission).
    #[arg(long, env = "ACCESS_CACHE_TTL", value_parser = parse_duration, default_value = "30s")]
    pub access_cache_ttl: Duration,

    /// TTL of request-store entries (K/V `requests`): at least the longest playbook.
    #[arg(long, env = "REQUEST_TTL", value_parser = parse_duration, default_value = "1h")]
    pub request_ttl: Duration,

    /// How long the gateway remembers who started an execution (K/V `owners` TTL): at least
    /// the longest run, since a run whose record expired is readable by read-all roles only.
    #[arg(long, env = "EXECUTION_OWNER_TTL", value_parser = parse_duration, default_value = "7d")]
    pub execution_owner_ttl: Duration,

    /// Roles that may read and act on every execution (comma-separated); everyone else only
    /// on the runs they started through the gateway. Empty: nobody reads all.
    #[arg(
        long,
        env = "READ_ALL_ROLES",
        value_delimiter = ',',
        default_value = "admin"
    )]
    pub read_all_roles: Vec<String>,

    // --- rate limits (ratelimit.rs) ---
    /// Proxies whose `x-forwarded-for` is believed, as comma-separated CIDRs or addresses
    /// (the GKE load balancer's ranges `130.211.0.0/22,35.191.0.0/16` and its own address,
    /// an ingress). Empty: the connection's peer is the client and the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Cidr>,

    // --- auth abuse limits (auth/routes.rs, auth/session.rs, auth/backend.rs, noetl.rs) ---
    /// Per client address (`ratelimit::ClientIp`), requests to validate, check-access and
    /// logout not vouched for by the edge (`N/period`, or `off`). A replica's own limit.
    #[arg(long, env = "AUTH_RATE_LIMIT", value_parser = crate::ratelimit::parse_rate, default_value = "120/1m")]
    pub auth_rate_limit: RateFlag,

    /// Per client address, logins not vouched for by the edge (`N/period`, or `off`).
    #[arg(long, env = "LOGIN_RATE_LIMIT", value_parser = crate::ratelimit::parse_rate, default_value = "20/1m")]
    pub login_rate_limit: RateFlag,

    /// How long a token NoETL called invalid is answered 401 from memory without asking
    /// again (`0s`: never remembered).
    #[arg(long, env = "SESSION_NEGATIVE_TTL", value_parser = parse_duration, default_value = "10s")]
    pub session_negative_ttl: Duration,

    /// `AUTH_MODE=playbook`: auth playbooks running at once on this replica; a run that
    /// finds none free within 1 s is answered 503 `auth_busy`.
    #[arg(long, env = "AUTH_PLAYBOOK_CONCURRENCY", default_value_t = 32)]
    pub auth_playbook_concurrency: usize,

    /// Retries of idempotent NoETL calls may add at most this fraction to the calls made
    /// over the last 10 s (plus `NOETL_RETRY_MIN_PER_SEC`), so an overloaded NoETL is not
    /// sent `NOETL_RETRIES`× its load.
    #[arg(long, env = "NOETL_RETRY_BUDGET", default_value_t = 0.2)]
    pub noetl_retry_budget: f64,

    /// Retries per second always allowed, whatever the budget (a quiet replica can retry).
    #[arg(long, env = "NOETL_RETRY_MIN_PER_SEC", default_value_t = 5)]
    pub noetl_retry_min_per_sec: u32,

    /// Largest JSON body accepted by the auth API, in bytes.
    #[arg(long, env = "AUTH_BODY_LIMIT", default_value_t = 64 * 1024)]
    pub auth_body_limit: usize,

    /// `/noetl/*` allow-list: comma-separated `METHOD /api/prefix` pairs; a prefix ending in
    /// `/*` covers what is under it but not the prefix itself (one execution, not the list).
    #[arg(
        long,
        env = "PROXY_ALLOW",
        value_delimiter = ',',
        default_value = "GET /api/executions/*,GET /api/catalog"
    )]
    pub proxy_allow: Vec<String>,

    /// Largest body streamed through `/noetl/*`, each way, in bytes.
    #[arg(long, env = "PROXY_MAX_BODY", default_value_t = 10 * 1024 * 1024)]
    pub proxy_max_body: u64,

    /// Time NoETL has to start answering a proxied request (then 504).
    #[arg(long, env = "PROXY_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub proxy_timeout: Duration,

    /// Longest pause between two chunks of a proxied body before it is cut.
    #[arg(long, env = "PROXY_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub proxy_idle_timeout: Duration,

    /// Backend services behind `/api/v1/{name}/…`: `name=url` pairs, or a JSON array of
    /// `{name, url, allow, timeout, idle_timeout, max_body}` (`SERVICE_<NAME>_URL` and friends
    /// add more; docs/OPERATIONS.md "Services").
    #[arg(long, env = "SERVICES")]
    pub services: Option<String>,

    /// The `SERVICE_<NAME>_*` variables of the environment (read by [`Config::with_service_env`]).
    #[arg(skip)]
    pub service_vars: Vec<(String, String)>,

    /// The longest a service may ask a question for (`timeout_seconds` is capped to it).
    #[arg(long, env = "QUESTION_MAX_TIMEOUT", value_parser = parse_duration, default_value = "1h")]
    pub question_max_timeout: Duration,

    /// A question's timeout when the service names none.
    #[arg(long, env = "QUESTION_DEFAULT_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub question_default_timeout: Duration,

    /// Service token NoETL presents on callbacks (`Authorization: Bearer`); unset → 503.
    #[arg(long, env = "GATEWAY_INTERNAL_TOKEN")]
    pub internal_token: Option<Secret>,

    /// The internal listener's URL as NoETL's workers reach it; injected into workloads as
    /// `gateway_url` for callbacks. Default: `http://{INTERNAL_ADDR}`.
    #[arg(long, env = "GATEWAY_CALLBACK_URL")]
    pub callback_url: Option<Url>,

    /// Key for per-request callback tokens (HMAC-SHA256 over the request id). Must be the
    /// same on every replica; unset → a random per-process key (one replica only).
    #[arg(long, env = "GATEWAY_CALLBACK_SECRET")]
    pub callback_secret: Option<Secret>,

    /// Largest callback or progress body, in bytes.
    #[arg(long, env = "CALLBACK_BODY_LIMIT", default_value_t = 1024 * 1024)]
    pub callback_body_limit: usize,

    /// How long frames are kept for `Last-Event-ID` replay (stream GATEWAY_FRAMES max age).
    #[arg(long, env = "FRAME_RETENTION", value_parser = parse_duration, default_value = "10m")]
    pub frame_retention: Duration,

    /// Frames kept per client for replay.
    #[arg(long, env = "FRAME_RETENTION_PER_CLIENT", default_value_t = 1000)]
    pub frame_retention_per_client: usize,

    /// Interval of the `ping` frame on `/events`.
    #[arg(long, env = "SSE_PING_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub sse_ping_interval: Duration,

    /// Interval of the `:` comment keep-alive on `/events`.
    #[arg(long, env = "SSE_KEEPALIVE_INTERVAL", value_parser = parse_duration, default_value = "15s")]
    pub sse_keepalive_interval: Duration,

    /// Serve a connection whose first request is `GET /events` with the origin's lean
    /// HTTP/1.1 writer (no per-connection buffers while idle) instead of hyper.
    #[arg(long, env = "SSE_LEAN_HTTP", default_value_t = true, action = clap::ArgAction::Set)]
    pub sse_lean_http: bool,

    /// Frames queued per SSE connection before a slow reader is evicted.
    #[arg(long, env = "SSE_QUEUE", default_value_t = 256)]
    pub sse_queue: usize,

    // --- realtime quotas (quotas.rs) ---
    /// Open SSE streams plus graphql-ws sockets per user, per replica (0: no cap); beyond
    /// it `/events` answers 429 and a socket closes with 4429 at `connection_init`.
    #[arg(long, env = "USER_MAX_STREAMS", default_value_t = 16)]
    pub user_max_streams: usize,

    /// Stream and socket opens per user, per replica (`N/period` or `off`); over it 429
    /// with `Retry-After` (sockets: 4429).
    #[arg(long, env = "STREAM_OPEN_RATE_LIMIT", value_parser = crate::ratelimit::parse_rate, default_value = "120/1m")]
    pub stream_open_rate_limit: RateFlag,

    /// Resumes that replay retained frames, per user, per replica (`N/period` or `off`);
    /// over it a stream starts at live frames with `stream/reset` first.
    #[arg(long, env = "REPLAY_RATE_LIMIT", value_parser = crate::ratelimit::parse_rate, default_value = "60/1m")]
    pub replay_rate_limit: RateFlag,

    /// Client ids one user may hold (0: no cap); a new one beyond it replaces the user's
    /// oldest client with no open stream, or is refused (429) when every one is connected.
    #[arg(long, env = "USER_MAX_CLIENTS", default_value_t = 64)]
    pub user_max_clients: usize,
    // --- end realtime quotas ---
    /// NoETL's JetStream streams of execution events, tried in order (comma-separated;
    /// `noetl_events` = the Rust control plane, `NOETL_EVENTS` = NoETL 4.x). None found, or
    /// set empty → executions are followed over HTTP (the bridge's fallback).
    #[arg(
        long,
        env = "NOETL_EVENTS_STREAM",
        value_delimiter = ',',
        default_value = "noetl_events,NOETL_EVENTS"
    )]
    pub noetl_events_stream: Vec<String>,

    /// Subjects NoETL publishes execution events on.
    #[arg(long, env = "NOETL_EVENTS_SUBJECT", default_value = "noetl.events.>")]
    pub noetl_events_subject: String,

    /// The bridge's durable consumer: the same on every replica.
    #[arg(long, env = "BRIDGE_CONSUMER", default_value = "gateway-bridge")]
    pub bridge_consumer: String,

    /// Normalised event types forwarded as `playbook/state` frames (comma-separated).
    #[arg(
        long,
        env = "BRIDGE_FORWARD",
        value_delimiter = ',',
        default_value = "playbook.started,step.enter,step.exit,step.failed,playbook.completed,playbook.failed,playbook.cancelled,calendar.event.touched"
    )]
    pub bridge_forward: Vec<String>,

    /// How long an event waits for executePlaybook to record who is interested.
    #[arg(long, env = "BRIDGE_MAX_INTEREST_WAIT", value_parser = parse_duration, default_value = "10s")]
    pub bridge_max_interest_wait: Duration,

    /// Bridge worker tasks: events of one execution stay in order on one worker, different
    /// executions are handled concurrently (1..=1024).
    #[arg(long, env = "BRIDGE_CONCURRENCY", default_value_t = 32)]
    pub bridge_concurrency: usize,

    /// How long the shared durable consumer waits for the reader's ack before redelivering
    /// (how soon the next reader handles the events a dead one held; the live reader
    /// recognises its own redelivered messages). Applied when the consumer is created.
    #[arg(long, env = "BRIDGE_ACK_WAIT", value_parser = parse_duration, default_value = "5s")]
    pub bridge_ack_wait: Duration,

    /// HTTP fallback (no event stream): the shortest interval between two reads of a
    /// followed execution's record (its request-rate bound per execution).
    #[arg(long, env = "BRIDGE_POLL_INTERVAL", value_parser = parse_duration, default_value = "250ms")]
    pub bridge_poll_interval: Duration,

    /// HTTP fallback: the longest interval between reads, reached by backing off while a
    /// run is quiet (at most a third of `BRIDGE_LEASE_TTL`).
    #[arg(long, env = "BRIDGE_POLL_MAX_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    pub bridge_poll_max_interval: Duration,

    /// How long a bridge lease lasts without renewal: the durable reader's (one replica
    /// reads NoETL's stream at a time, so each run's events stay in order) and the HTTP
    /// fallback's per run — how soon another replica takes over from one that died.
    #[arg(long, env = "BRIDGE_LEASE_TTL", value_parser = parse_duration, default_value = "6s")]
    pub bridge_lease_ttl: Duration,

    /// HTTP fallback: most executions one replica follows at once.
    #[arg(long, env = "BRIDGE_POLL_MAX_FOLLOWED", default_value_t = 1000)]
    pub bridge_poll_max_followed: usize,

    /// Whether GraphQL introspection (and so GraphiQL's schema browser) is on.
    #[arg(long, env = "GRAPHQL_INTROSPECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub graphql_introspection: bool,

    // --- GraphQL cost and callbacks (graphql/cost.rs, callbacks.rs) ---
    /// Most root fields one GraphQL operation may select (fragments expanded).
    #[arg(long, env = "GRAPHQL_MAX_ROOT_FIELDS", default_value_t = 10)]
    pub graphql_max_root_fields: u64,

    /// Most aliases one GraphQL operation may use, at any depth (fragments expanded).
    #[arg(long, env = "GRAPHQL_MAX_ALIASES", default_value_t = 30)]
    pub graphql_max_aliases: u64,

    /// Most `executePlaybook` fields one GraphQL request may select (a batch: in total).
    #[arg(long, env = "GRAPHQL_MAX_EXECUTE_PER_REQUEST", default_value_t = 1)]
    pub graphql_max_execute_per_request: u64,

    /// Most root fields that call NoETL (`execution`, `myExecutions`, …) per operation.
    #[arg(long, env = "GRAPHQL_MAX_NOETL_FIELDS", default_value_t = 5)]
    pub graphql_max_noetl_fields: u64,

    /// `executePlaybook` fields per user (`N/period`, e.g. `5/1s`, or `off`).
    #[arg(long, env = "EXECUTE_RATE_LIMIT", value_parser = crate::ratelimit::parse_rate, default_value = "5/1s")]
    pub execute_rate_limit: std::option::Option<crate::ratelimit::RateSpec>,

    /// GraphQL mutation operations per user (`N/period` or `off`).
    #[arg(long, env = "GRAPHQL_MUTATION_RATE_LIMIT", value_parser = crate::ratelimit::parse_rate, default_value = "20/1s")]
    pub graphql_mutation_rate_limit: std::option::Option<crate::ratelimit::RateSpec>,

    /// Accept batched GraphQL requests (a JSON array); off → 400 `batch_not_enabled`.
    #[arg(long, env = "GRAPHQL_BATCH", default_value_t = false, action = clap::ArgAction::Set)]
    pub graphql_batch: bool,

    /// The edge's Ed25519 public key (base64url, 32 bytes): `x-gateway-assertion` headers
    /// signed with it are trusted as the caller's identity. Unset: assertions are ignored.
    #[arg(long, env = "EDGE_ASSERTION_PUBLIC_KEY")]
    pub edge_assertion_public_key: Option<String>,

    /// Refuse public-listener traffic that did not come through the edge (no valid
    /// assertion). Set in production once the edge is in front.
    #[arg(long, env = "REQUIRE_EDGE_ASSERTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_edge_assertion: bool,

    // --- connection limits ---
    /// How long a client has to send a whole request head: from accept for a connection's
    /// first request, from its first byte for a later one on a kept-alive connection. Both
    /// listeners, hyper and the lean `GET /events` path; the connection is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,

    /// How long a kept-alive connection with no request in flight and no byte received is
    /// kept before it is closed gracefully. Longer than the idle timeout of the load
    /// balancer in front (600 s on a Google Cloud HTTP(S) load balancer), so the balancer,
    /// not the origin, closes its idle connections.
    #[arg(long, env = "KEEPALIVE_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "620s")]
    pub keepalive_idle_timeout: Duration,

    /// How long a request body may take to arrive whole, from the end of its head; a body
    /// still arriving then is answered 408 (`body_timeout`).
    #[arg(long, env = "BODY_READ_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub body_read_timeout: Duration,

    /// How long a request may take to get its response head (finite routes and the start of
    /// streams; an SSE stream, a socket or a proxied body is not cut by it): then 504
    /// `request_timeout`. `/noetl/*`, `/health` and `/ready` have their own limits.
    #[arg(long, env = "REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub request_timeout: Duration,

    /// Requests being answered at once per listener before new ones are shed with 503
    /// `overloaded` and `Retry-After` (`/health` and `/ready` are never shed).
    #[arg(long, env = "MAX_INFLIGHT_REQUESTS", default_value_t = 2048)]
    pub max_inflight_requests: usize,

    /// Open connections on the public listener (SSE streams included: one each); one more
    /// is answered 503 `too_many_connections` and closed. Keep the process's open-file
    /// limit above both caps together.
    #[arg(long, env = "PUBLIC_MAX_CONNECTIONS", default_value_t = 32_768)]
    pub public_max_connections: usize,

    /// Open connections on the internal listener (NoETL's callbacks, metrics scrapes).
    #[arg(long, env = "INTERNAL_MAX_CONNECTIONS", default_value_t = 1024)]
    pub internal_max_connections: usize,
    // --- end of connection limits ---
    /// Log format; the filter comes from RUST_LOG (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Record metrics and serve `/metrics` on the internal listener; `false` records
    /// nothing and `/metrics` answers 404 (to measure what metrics cost).
    #[arg(long, env = "METRICS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics_enabled: bool,

    /// After SIGTERM, how long the replica keeps serving with `/ready` failing before its
    /// listeners close: the time the load balancer and kube-proxy need to stop sending it
    /// new connections (a request that arrives meanwhile is still answered).
    #[arg(long, env = "DRAIN_DELAY", value_parser = parse_duration, default_value = "5s")]
    pub drain_delay: Duration,

    /// After the listeners close: the time allowed for in-flight requests, over which open
    /// SSE streams are ended spread out (over its first three quarters), before the
    /// process exits.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "20s")]
    pub shutdown_grace: Duration,
}

/// A configuration that cannot work, with the message an operator needs.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks what clap cannot: relations between settings and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_owned()));
        if !matches!(self.noetl_base_url.scheme(), "http" | "https") {
            return err("NOETL_BASE_URL must be an http(s) URL");
        }
        if let Some(d) = &self.auth0_domain {
            let bare = !d.is_empty()
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                && !d.starts_with('.');
            if !bare {
                return err("AUTH0_DOMAIN must be a bare host name such as example.eu.auth0.com (no scheme, no path)");
            }
        }
        if self.auth_jwks_url.is_none() && self.auth0_domain.is_none() {
            return err(
                "set AUTH0_DOMAIN or AUTH_JWKS_URL: ID tokens cannot be verified without a JWKS",
            );
        }
        if self.auth_issuer.is_none() && self.auth0_domain.is_none() {
            return err("set AUTH_ISSUER (or AUTH0_DOMAIN, which implies https://{domain}/)");
        }
        if self.auth_audience.trim().is_empty() {
            return err("AUTH_AUDIENCE must not be empty");
        }
        if self.auth_mode == AuthMode::Playbook
            && self.auth_playbook_timeout < Duration::from_secs(1)
        {
            return err("AUTH_PLAYBOOK_TIMEOUT must be at least 1s");
        }
        if self.public_addr == self.internal_addr {
            return err(
                "PUBLIC_ADDR and INTERNAL_ADDR must differ: callbacks must never be public",
            );
        }
        if self.session_cache_ttl < Duration::from_secs(1) {
            return err("SESSION_CACHE_TTL must be at least 1s");
        }
        if self.session_max_life < self.session_cache_ttl {
            return err("SESSION_MAX_LIFE must be at least SESSION_CACHE_TTL");
        }
        if self.execution_owner_ttl < self.request_ttl {
            return err("EXECUTION_OWNER_TTL must be at least REQUEST_TTL (the longest run)");
        }
        if self
            .read_all_roles
            .iter()
            .any(|r| r.trim() != r || r.contains(char::is_whitespace))
        {
            return err("READ_ALL_ROLES must be comma-separated role names without spaces");
        }
        if self.revoked_max_age < self.session_max_life {
            return err("REVOKED_MAX_AGE must be at least SESSION_MAX_LIFE");
        }
        if self.auth_body_limit < 1024 {
            return err("AUTH_BODY_LIMIT must be at least 1024 bytes");
        }
        if self.auth_playbook_concurrency == 0 || self.auth_playbook_concurrency > 4096 {
            return err("AUTH_PLAYBOOK_CONCURRENCY must be between 1 and 4096");
        }
        if !(0.0..=1.0).contains(&self.noetl_retry_budget) {
            return err("NOETL_RETRY_BUDGET must be between 0 and 1 (a fraction of calls)");
        }
        if self.sse_queue == 0 || self.sse_queue > 65_536 {
            return err("SSE_QUEUE must be between 1 and 65536");
        }
        if self.frame_retention < Duration::from_secs(10) {
            return err("FRAME_RETENTION must be at least 10s");
        }
        // --- connection limits ---
        if self.header_read_timeout < Duration::from_secs(1) {
            return err("HEADER_READ_TIMEOUT must be at least 1s");
        }
        if self.keepalive_idle_timeout < Duration::from_secs(1) {
            return err("KEEPALIVE_IDLE_TIMEOUT must be at least 1s");
        }
        if self.body_read_timeout < Duration::from_secs(1) {
            return err("BODY_READ_TIMEOUT must be at least 1s");
        }
        if self.request_timeout < self.body_read_timeout {
            return err("REQUEST_TIMEOUT must be at least BODY_READ_TIMEOUT (a body is read within the request)");
        }
        if self.max_inflight_requests == 0 {
            return err("MAX_INFLIGHT_REQUESTS must be at least 1");
        }
        if self.public_max_connections == 0 || self.internal_max_connections == 0 {
            return err("PUBLIC_MAX_CONNECTIONS and INTERNAL_MAX_CONNECTIONS must be at least 1");
        }
        if self.nats_replicas.is_some_and(|n| !(1..=5).contains(&n)) {
            return err("NATS_REPLICAS must be between 1 and 5 (JetStream's limit)");
        }
        if self.drain_delay > Duration::from_secs(300)
            || self.shutdown_grace > Duration::from_secs(600)
        {
            return err("DRAIN_DELAY must be at most 5m and SHUTDOWN_GRACE at most 10m (the pod's terminationGracePeriodSeconds must exceed both together)");
        }
        if let Some(k) = &self.edge_assertion_public_key {
            if gateway_shared::assertion::verifying_key_from_b64(k).is_err() {
                return err(
                    "EDGE_ASSERTION_PUBLIC_KEY must be a base64url Ed25519 public key (32 bytes)",
                );
            }
        }
        if self.require_edge_assertion && self.edge_assertion_public_key.is_none() {
            return err("REQUIRE_EDGE_ASSERTION=true needs EDGE_ASSERTION_PUBLIC_KEY");
        }
        Ok(())
    }

    /// The JWKS URL ID tokens are checked against.
    pub fn jwks_url(&self) -> Url {
        self.auth_jwks_url.clone().unwrap_or_else(|| {
            let domain = self.auth0_domain.as_deref().unwrap_or_default();
            Url::parse(&format!("https://{domain}/.well-known/jwks.json"))
                .expect("validate() checked AUTH0_DOMAIN is a bare host name")
        })
    }

    /// The issuer ID tokens must name.
    pub fn issuer(&self) -> String {
        self.auth_issuer.clone().unwrap_or_else(|| {
            format!(
                "https://{}/",
                self.auth0_domain.as_deref().unwrap_or_default()
            )
        })
    }

    /// The roles that read every execution, empty entries dropped.
    pub fn read_all_roles(&self) -> Vec<String> {
        self.read_all_roles
            .iter()
            .filter(|r| !r.is_empty())
            .cloned()
            .collect()
    }

    /// The URL NoETL's playbooks call back on (`gateway_url` in workloads).
    pub fn callback_url(&self) -> String {
        self.callback_url
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_else(|| format!("http://{}", self.internal_addr))
    }

    /// The same configuration with the environment's `SERVICE_<NAME>_*` variables (their
    /// names are the services', so clap cannot declare them), sorted by name.
    pub fn with_service_env(mut self) -> Self {
        // Only the registry's own suffixes: an unrelated `SERVICE_…` variable (a secret of
        // something else, perhaps) is neither read nor printed.
        let ours = |k: &str| {
            k.starts_with("SERVICE_")
                && ["_URL", "_ALLOW", "_TIMEOUT", "_MAX_BODY"]
                    .iter()
                    .any(|s| k.ends_with(s))
        };
        let mut vars: Vec<(String, String)> = std::env::vars().filter(|(k, _)| ours(k)).collect();
        vars.sort();
        self.service_vars = vars;
        self
    }

    /// The configuration as printed at start: secrets and URL credentials redacted.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        shown.nats_url = self.nats_url.as_deref().map(redact_url_credentials);
        format!("{shown:?}")
    }
}

/// `nats://user:pass@host` → `nats://<redacted>@host`; anything else unchanged.
fn redact_url_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}<redacted>{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// The flags without which [`Config`] does not parse, for the crate's tests.
#[cfg(test)]
pub(crate) const TEST_REQUIRED_FLAGS: [&str; 7] = [
    "origin",
    "--auth-audience",
    "aud",
    "--auth-jwks-url",
    "http://127.0.0.1:1/jwks",
    "--auth-issuer",
    "http://127.0.0.1:1/",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        TEST_REQUIRED_FLAGS.to_vec()
    }

    #[test]
    fn defaults_are_valid_and_listen_on_the_documented_ports() {
        let c = Config::try_parse_from(base()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.public_addr.port(), 8090);
        assert_eq!(c.internal_addr.port(), 8091);
        assert_eq!(c.noetl_base_url.port(), Some(8082));
        assert_eq!(c.session_cache_ttl, Duration::from_secs(300));
        assert_eq!(c.execution_owner_ttl, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.read_all_roles(), ["admin"]);
    }

    #[test]
    fn realtime_quotas_default_on_and_can_be_switched_off() {
        let c = Config::try_parse_from(base()).unwrap();
        assert_eq!(c.user_max_streams, 16);
        assert_eq!(c.user_max_clients, 64);
        let open = c.stream_open_rate_limit.expect("on by default");
        assert_eq!(
            (open.count.get(), open.period),
            (120, Duration::from_secs(60))
        );
        assert!(c.replay_rate_limit.is_some());
        let mut args = base();
        args.extend_from_slice(&[
            "--stream-open-rate-limit",
            "off",
            "--replay-rate-limit",
            "OFF",
        ]);
        let off = Config::try_parse_from(args).unwrap();
        assert_eq!(off.stream_open_rate_limit, None);
        assert_eq!(off.replay_rate_limit, None);
        let mut args = base();
        args.extend_from_slice(&["--replay-rate-limit", "lots"]);
        assert!(Config::try_parse_from(args).is_err());
    }

    #[test]
    fn owner_records_outlive_the_longest_run_and_read_all_roles_are_plain_names() {
        let with = |extra: &[&'static str]| {
            let mut args = base();
            args.extend_from_slice(extra);
            Config::try_parse_from(args).unwrap()
        };
        let c = with(&["--execution-owner-ttl", "30m", "--request-ttl", "1h"]);
        assert!(c.validate().is_err(), "an owner TTL below REQUEST_TTL");
        with(&["--execution-owner-ttl", "1h", "--request-ttl", "1h"])
            .validate()
            .unwrap();
        let c = with(&["--read-all-roles", "admin, ops"]);
        assert!(c.validate().is_err(), "a role name with a space");
        let c = with(&["--read-all-roles", "admin,ops"]);
        c.validate().unwrap();
        assert_eq!(c.read_all_roles(), ["admin", "ops"]);
        let c = with(&["--read-all-roles", ""]);
        c.validate().unwrap();
        assert!(c.read_all_roles().is_empty(), "empty: nobody reads all");
    }

    #[test]
    fn connection_limits_default_above_the_benchmarked_load_and_are_checked() {
        let with = |extra: &[&'static str]| {
            let mut args = base();
            args.extend_from_slice(extra);
            Config::try_parse_from(args).unwrap()
        };
        let c = with(&[]);
        c.validate().unwrap();
        // bench-abuse holds 10k half-open connections while normal traffic flows, and
        // bench-realtime 19k SSE streams on one origin.
        assert!(c.public_max_connections > 20_000);
        assert!(c.internal_max_connections < c.public_max_connections);
        // Idle connections outlive a Google Cloud load balancer's 600 s idle timeout.
        assert!(c.keepalive_idle_timeout > Duration::from_secs(600));
        assert!(c.header_read_timeout < c.keepalive_idle_timeout);
        assert!(c.request_timeout >= c.body_read_timeout);
        for bad in [
            &["--header-read-timeout", "0s"][..],
            &["--body-read-timeout", "30s", "--request-timeout", "10s"],
            &["--max-inflight-requests", "0"],
            &["--public-max-connections", "0"],
            &["--internal-max-connections", "0"],
        ] {
            assert!(with(bad).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_and_nats_credentials_are_redacted_when_printed() {
        let mut args = base();
        args.extend([
            "--internal-token",
            "super-secret-token-value",
            "--nats-url",
            "nats://alice:pw@nats:4222",
        ]);
        let shown = Config::try_parse_from(args).unwrap().redacted();
        assert!(!shown.contains("super-secret-token-value"), "{shown}");
        assert!(
            !shown.contains("alice") && !shown.contains(":pw"),
            "{shown}"
        );
        assert!(shown.contains("nats://<redacted>@nats:4222"), "{shown}");
    }

    #[test]
    fn an_auth0_domain_with_a_scheme_is_refused() {
        let c = Config::try_parse_from([
            "origin",
            "--auth-audience",
            "a",
            "--auth0-domain",
            "https://evil.example/x",
        ])
        .unwrap();
        assert!(c.validate().is_err());
        let c = Config::try_parse_from([
            "origin",
            "--auth-audience",
            "a",
            "--auth0-domain",
            "t.eu.auth0.com",
        ])
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.jwks_url().as_str(),
            "https://t.eu.auth0.com/.well-known/jwks.json"
        );
        assert_eq!(c.issuer(), "https://t.eu.auth0.com/");
    }

    #[test]
    fn auth_abuse_limits_parse_and_are_checked() {
        let c = Config::try_parse_from(base()).unwrap();
        c.validate().unwrap();
        let auth = c.auth_rate_limit.expect("on by default");
        assert_eq!(
            (auth.count.get(), auth.period),
            (120, Duration::from_secs(60))
        );
        assert_eq!(c.login_rate_limit.map(|r| r.count.get()), Some(20));
        assert_eq!(c.session_negative_ttl, Duration::from_secs(10));
        assert_eq!(c.auth_playbook_concurrency, 32);
        let with = |extra: &[&'static str]| {
            let mut args = base();
            args.extend_from_slice(extra);
            Config::try_parse_from(args)
        };
        let c = with(&["--auth-rate-limit", "off", "--login-rate-limit", "3/10s"]).unwrap();
        assert_eq!(c.auth_rate_limit, None);
        assert_eq!(
            c.login_rate_limit.map(|r| r.period),
            Some(Duration::from_secs(10))
        );
        assert!(with(&["--login-rate-limit", "often"]).is_err());
        for bad in [
            ["--auth-playbook-concurrency", "0"],
            ["--noetl-retry-budget", "1.5"],
            ["--noetl-retry-budget=-0.1", "--noetl-retries=2"],
        ] {
            assert!(with(&bad).unwrap().validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn short_secrets_and_equal_listeners_are_refused() {
        let mut args = base();
        args.extend(["--internal-token", "short"]);
        assert!(Config::try_parse_from(args).is_err());
        let mut args = base();
        args.extend([
            "--public-addr",
            "127.0.0.1:9000",
            "--internal-addr",
            "127.0.0.1:9000",
        ]);
        assert!(Config::try_parse_from(args).unwrap().validate().is_err());
    }
}
