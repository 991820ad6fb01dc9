//! The one proxy core of every registered service (PROTOCOL.md §5):
//! `/api/v1/{service}/{*path}` → `{service base URL}/{path}` ([`crate::services`]), and
//! NoETL, the built-in entry, also under its historical `/noetl/{*path}` →
//! `{NOETL_BASE_URL}/api/{path}` (`/api/v1/noetl/{*path}` is the same).
//!
//! Every service gets the same treatment: a session is required, identity headers come from
//! the session and the client's are stripped, the path policy and the service's allow-list
//! (403/405), its body limit both ways, its time to the answer's head (504) and its idle
//! timeout between chunks, streaming both ways (an upstream SSE stream passes frame by
//! frame), one connection pool per service. An unknown service is 404 `service_not_found`.
//! What only NoETL gets: the execution-owner check below and the scrubbing of JSON answers.
//!
//! The pure part decides (is this path safe? is this method and prefix allowed? which
//! headers pass?) and is unit-tested with plain values; the shell streams bodies both ways
//! with a byte limit, a time-to-headers timeout and an idle timeout between chunks.
//!
//! JSON answers are the exception to streaming: they are read whole (within the same
//! limit) and rewritten by [`crate::scrub`] without what the gateway injected into
//! workloads and without users' tokens, so nothing secret leaves through the proxy.
//!
//! Paths are judged on the raw, still percent-encoded request path: decoding first is how
//! `..%2f` traversals get through. Anything that could change which resource is addressed
//! once decoded (`%2e`, `%2f`, `%5c`, `%25`, `%00`), a dot segment, an empty segment
//! (`//`), `@` or a backslash is refused outright.
//!
//! Executions are their owners' ([`crate::owners`]): after the allow-list, a request for one
//! execution (`/api/executions/<id>` and anything under it) passes only for its owner or a
//! read-all role, and the listing (`/api/executions`, if an operator allow-lists it) only
//! for a read-all role; anyone else gets 404 `not_found`, as for a run that does not exist.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use gateway_shared::headers::{
    is_client_identity_header, is_credential_header, is_request_override_header,
};

use crate::auth::edge::EdgeIdentity;
use crate::auth::session::SessionService;
use crate::auth::Caller;
use crate::error::AppError;
use crate::extract::find_body_timeout;
use crate::noetl::{Forward, NoetlClient, NoetlError};
use crate::owners::Owners;
use crate::scrub::{self, Scrubber};
use crate::upstream::{ServiceClient, UpstreamError};

/// Identity headers the gateway sets on proxied requests; never taken from the client.
pub const IDENTITY_HEADERS: [&str; 4] = [
    "x-noetl-user-id",
    "x-noetl-user-email",
    "x-noetl-user-roles",
    "x-request-id",
];

/// What the proxy routes need, and nothing else.
#[derive(Clone, FromRef)]
pub struct ProxyState {
    /// The proxy's policy and limits, and the NoETL client it streams through.
    pub proxy: Arc<Proxy>,
    /// Who is calling.
    pub sessions: Arc<SessionService>,
}

/// The proxy routes, mounted on the public listener (`/api/v1/events/…` is the events
/// module's: its routes are more specific and win).
pub fn router() -> Router<ProxyState> {
    Router::new()
        .route("/noetl", any(refuse_root))
        .route("/noetl/", any(refuse_root))
        .route("/noetl/{*rest}", any(noetl_proxy))
        .route("/api/v1/{service}", any(service_proxy))
        .route("/api/v1/{service}/", any(service_proxy))
        .route("/api/v1/{service}/{*rest}", any(service_proxy))
}

async fn refuse_root() -> AppError {
    AppError::NotFound("name a NoETL API path after /noetl/".into())
}

/// The allow-list: `METHOD /api/prefix` pairs from `PROXY_ALLOW`. A prefix covers itself
/// and whole segments below it (`/api/catalog` covers `/api/catalog/x`, not
/// `/api/catalogs`); a prefix written with a trailing `/*` covers only what is below it
/// (`/api/executions/*` covers one execution, not the listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList(Vec<AllowRule>);

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowRule {
    method: Method,
    prefix: String,
    /// Written `prefix/*`: the prefix itself is not covered.
    below_only: bool,
}

impl std::fmt::Display for AllowList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules: Vec<String> = self
            .0
            .iter()
            .map(|r| {
                let star = if r.below_only { "/*" } else { "" };
                format!("{} {}{star}", r.method, r.prefix)
            })
            .collect();
        f.write_str(&rules.join(","))
    }
}

/// What the allow-list says about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Allowed,
    /// The path is proxied, but not for this method; these methods are.
    MethodNotAllowed(Vec<Method>),
    /// The path is not proxied at all.
    Forbidden,
}

impl AllowList {
    /// Parses entries such as `GET /api/executions` (NoETL's, `PROXY_ALLOW`: every prefix
    /// under `/api/`).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        Self::parse_under(entries, "/api")
    }

    /// Parses `METHOD /prefix` entries whose prefixes lie below `root` (`""`: any plain
    /// path; a service's rules are written relative to its base URL).
    pub fn parse_under(entries: &[String], root: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (m, p) = entry
                .split_once(' ')
                .ok_or_else(|| format!("{entry:?} is not `METHOD {root}/prefix`"))?;
            let method = Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("{m:?} is not an HTTP method"))?;
            let p = p.trim();
            let (p, below_only) = match p.strip_suffix("/*") {
                Some(parent) => (parent, true),
                None => (p, false),
            };
            let prefix = p.trim_end_matches('/').to_owned();
            // `METHOD /` of a service: that method on every path.
            let whole_service = root.is_empty() && prefix.is_empty();
            let under = prefix
                .strip_prefix(root)
                .and_then(|r| r.strip_prefix('/'))
                .filter(|r| normalize_rest(r).is_ok());
            if under.is_none() && !whole_service {
                return Err(format!("{p:?} must be a plain path under {root}/"));
            }
            out.push(AllowRule {
                method,
                prefix,
                below_only: below_only || whole_service,
            });
        }
        Ok(AllowList(out))
    }

    /// Every one of `methods` on every path (a service registered without an allow-list).
    pub fn everything(methods: &[Method]) -> Self {
        AllowList(
            methods
                .iter()
                .map(|m| AllowRule {
                    method: m.clone(),
                    prefix: String::new(),
                    below_only: true,
                })
                .collect(),
        )
    }

    /// The verdict for `method` on the upstream path `path` (which starts with `/api/`).
    pub fn verdict(&self, method: &Method, path: &str) -> Verdict {
        let covers = |rule: &AllowRule| {
            let p = rule.prefix.as_str();
            (path == p && !rule.below_only)
                || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
        };
        let methods: Vec<Method> = self
            .0
            .iter()
            .filter(|r| covers(r))
            .map(|r| r.method.clone())
            .collect();
        if methods.contains(method) {
            Verdict::Allowed
        } else if methods.is_empty() {
            Verdict::Forbidden
        } else {
            Verdict::MethodNotAllowed(methods)
        }
    }
}

/// What an upstream path addresses among NoETL's executions.
#[derive(Debug, PartialEq, Eq)]
pub enum ExecutionTarget {
    /// `/api/executions`: every execution (with or without a query).
    Listing,
    /// `/api/executions/<id>` or below it; the id percent-decoded, as NoETL will read it.
    One(String),
}

/// The execution a [`normalize_path`]-checked upstream path addresses, if any. Segments are
/// compared percent-decoded and case-insensitively, so `/api/%65xecutions/1` or
/// `/api/Executions/1` cannot slip past the owner check under a wider allow-list entry.
pub fn execution_target(path: &str) -> Option<ExecutionTarget> {
    let mut segments = path.strip_prefix("/api/")?.split('/').map(|s| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    });
    if !segments.next()?.eq_ignore_ascii_case("executions") {
        return None;
    }
    Some(match segments.next() {
        None => ExecutionTarget::Listing,
        Some(id) => ExecutionTarget::One(id),
    })
}

/// Checks the raw path after `/noetl/` and returns the upstream path `/api/<rest>`.
pub fn normalize_path(raw_rest: &str) -> Result<String, &'static str> {
    normalize_rest(raw_rest).map(|rest| format!("/api/{rest}"))
}

/// Checks the raw path below a service's mount (after `/api/v1/{service}/`, or
/// `/noetl/`) and returns it without a trailing slash (segments joined by `/`).
pub fn normalize_rest(raw_rest: &str) -> Result<String, &'static str> {
    if raw_rest.is_empty() {
        return Err("empty path");
    }
    if raw_rest.contains('@') || raw_rest.contains('\\') {
        return Err("'@' and '\\' are not allowed in proxied paths");
    }
    check_escapes(raw_rest)?;
    let segments: Vec<&str> = raw_rest.trim_end_matches('/').split('/').collect();
    for seg in &segments {
        if seg.is_empty() {
            return Err("empty path segments ('//') are not allowed");
        }
        if *seg == "." || *seg == ".." {
            return Err("dot segments are not allowed");
        }
        let ok = seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:%".contains(&b));
        if !ok {
            return Err("path contains characters that are not allowed");
        }
    }
    Ok(segments.join("/"))
}

/// Every `%` must start a valid `%XX` escape, and no escape may decode to something that
/// changes which resource is addressed (`.`, `/`, `\\`, `%`, `@`) or to a control byte.
fn check_escapes(raw: &str) -> Result<(), &'static str> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let decoded = hex
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("malformed percent escape in the path")?;
            if matches!(decoded, b'.' | b'/' | b'\\' | b'%' | b'@')
                || decoded < 0x20
                || decoded == 0x7f
            {
                return Err("encoded dots, slashes, percent signs and control characters are not allowed in proxied paths");
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// The query string without `session_token` (a secret that must not travel upstream).
pub fn upstream_query(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some("session_token"))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// True for headers that must not cross the proxy in either direction: hop-by-hop headers,
/// those named by `Connection`, and `content-length` (bodies are re-framed).
fn is_hop_header(name: &HeaderName, connection_named: &[String]) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n) || n == "content-length" || connection_named.iter().any(|c| c == n)
}

/// Names listed in a `Connection` header (they are hop-by-hop too).
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The headers forwarded upstream: the client's minus credentials, identity and address
/// claims, method-override and URL-rewrite headers (the shared rules the edge applies too),
/// its `x-request-id` (the gateway sets its own) and hop-by-hop headers.
pub fn upstream_request_headers(client: &HeaderMap) -> HeaderMap {
    let named = connection_named(client);
    let mut out = HeaderMap::new();
    for (name, value) in client {
        let n = name.as_str();
        let dropped = is_hop_header(name, &named)
            || is_credential_header(n)
            || is_client_identity_header(n)
            || is_request_override_header(n)
            || n == "x-request-id";
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Where a service's resources are, upstream and as the client addresses them: NoETL's
/// `/api/…` is the client's `/noetl/…`; a service's `{base path}/…` is the client's
/// `/api/v1/{name}/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The upstream base (scheme, host, port; its path is `upstream_root`).
    pub base: url::Url,
    /// The upstream path the client's root maps to, without a trailing slash (`/api`, or
    /// the service base URL's path, `""` for the host's root).
    pub upstream_root: String,
    /// The client's path for the same place (`/noetl`, `/api/v1/{name}`).
    pub client_root: String,
}

impl Mount {
    /// NoETL's mount: `{noetl_base}/api/…` is the client's `/noetl/…`.
    pub fn noetl(noetl_base: &url::Url) -> Self {
        Mount {
            base: noetl_base.clone(),
            upstream_root: "/api".into(),
            client_root: "/noetl".into(),
        }
    }

    /// A registered service's mount: `{base}/…` is the client's `/api/v1/{name}/…`.
    pub fn service(name: &str, base: &url::Url) -> Self {
        Mount {
            base: base.clone(),
            upstream_root: base.path().trim_end_matches('/').to_owned(),
            client_root: format!("/api/v1/{name}"),
        }
    }
}

/// The headers returned to the client: upstream's minus hop-by-hop headers, cookies, the
/// service's own CORS answer (the gateway's CORS policy is the edge's), `server` and
/// `x-powered-by` (what runs behind the gateway is nobody's business), and a `location` that
/// points at the service, which is rewritten to the same resource under its client path or
/// dropped.
pub fn client_response_headers(upstream: &HeaderMap, mount: &Mount) -> HeaderMap {
    let named = connection_named(upstream);
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        let n = name.as_str();
        let dropped = is_hop_header(name, &named)
            || name == header::SET_COOKIE
            || n.starts_with("access-control-")
            || n == "server"
            || n == "x-powered-by";
        if dropped {
            continue;
        }
        if name == header::LOCATION {
            if let Some(v) = value
                .to_str()
                .ok()
                .and_then(|v| client_location(v, mount))
                .and_then(|v| HeaderValue::from_str(&v).ok())
            {
                out.append(name.clone(), v);
            }
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// A service's `location` as the client may see it: a URL or absolute path of the service
/// under its mount becomes the same resource under the client's path (`/noetl/…`,
/// `/api/v1/{name}/…`); any other URL or path of the service's host is dropped (`None`); a
/// URL on another host (a third party) is kept as it is.
pub fn client_location(location: &str, mount: &Mount) -> Option<String> {
    let base = &mount.base;
    let resolved = base.join(location).ok()?;
    let same_origin = resolved.scheme() == base.scheme()
        && resolved.host_str() == base.host_str()
        && resolved.port_or_known_default() == base.port_or_known_default();
    if !same_origin {
        return Some(location.to_owned());
    }
    let rest = resolved
        .path()
        .strip_prefix(mount.upstream_root.as_str())?
        .strip_prefix('/')?;
    let mut out = format!("{}/{rest}", mount.client_root);
    if let Some(q) = resolved.query() {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

/// The client's address as the gateway knows it: the edge's `x-forwarded-for` when the
/// request carries a verified edge assertion (the edge sets that header itself, after
/// dropping the client's), else the peer of the connection.
fn client_address(parts: &axum::http::request::Parts) -> Option<String> {
    if parts.extensions.get::<EdgeIdentity>().is_some() {
        let from_edge = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| v.parse::<std::net::IpAddr>().is_ok());
        if let Some(ip) = from_edge {
            return Some(ip.to_owned());
        }
    }
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// The built-in NoETL entry's name (`/api/v1/noetl/…`, also `/noetl/…`).
pub const NOETL: &str = "noetl";

/// A proxied service's limits (`PROXY_TIMEOUT`, `PROXY_IDLE_TIMEOUT`, `PROXY_MAX_BODY`
/// unless its registry entry sets its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time the service has to send the answer's head.
    pub timeout: Duration,
    /// Longest pause between two chunks of a body, either way.
    pub idle_timeout: Duration,
    /// Largest body each way, in bytes.
    pub max_body: u64,
}

/// Where one service's requests go: NoETL's own client, or a registered service's.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// The built-in entry (`/noetl/*`, `/api/v1/noetl/*`).
    Noetl(NoetlClient),
    /// A registered service.
    Service(ServiceClient),
}

/// One proxied service: where it is, what may pass, its limits.
#[derive(Debug, Clone)]
pub struct ProxiedService {
    upstream: Upstream,
    mount: Mount,
    /// Allow-list rules are written against `rule_root` + the client's path: `/api` for
    /// NoETL (`PROXY_ALLOW`'s `/api/…`), `""` for a service (relative to its base URL).
    rule_root: &'static str,
    allow: AllowList,
    limits: Limits,
}

impl ProxiedService {
    /// The built-in NoETL entry.
    pub fn noetl(noetl: NoetlClient, allow: AllowList, limits: Limits) -> Self {
        let mount = Mount::noetl(noetl.base_url());
        ProxiedService {
            upstream: Upstream::Noetl(noetl),
            mount,
            rule_root: "/api",
            allow,
            limits,
        }
    }

    /// A registered service, over its own client (its name and base URL are the
    /// client's).
    pub fn service(client: ServiceClient, allow: AllowList, limits: Limits) -> Self {
        ProxiedService {
            mount: Mount::service(client.name(), client.base_url()),
            upstream: Upstream::Service(client),
            rule_root: "",
            allow,
            limits,
        }
    }
}

/// The proxy: every service by name, the owner rule for NoETL's executions and the scrubber
/// of NoETL's JSON answers.
#[derive(Debug, Clone)]
pub struct Proxy {
    services: HashMap<String, Arc<ProxiedService>>,
    owners: Owners,
    scrubber: Scrubber,
}

impl Proxy {
    /// The proxy with NoETL as its one service: bodies may stream for long, so there is no
    /// total timeout; `timeout` bounds the wait for the answer's head and `idle_timeout`
    /// each pause between chunks.
    pub fn new(
        noetl: NoetlClient,
        allow: AllowList,
        owners: Owners,
        max_body: u64,
        timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let limits = Limits {
            timeout,
            idle_timeout,
            max_body,
        };
        let mut services = HashMap::new();
        services.insert(
            NOETL.to_owned(),
            Arc::new(ProxiedService::noetl(noetl, allow, limits)),
        );
        Self {
            services,
            owners,
            scrubber: Scrubber::default(),
        }
    }

    /// The same proxy with the registered `services` too.
    pub fn with_services(mut self, services: Vec<ProxiedService>) -> Self {
        for s in services {
            let name = s.mount.client_root["/api/v1/".len()..].to_owned();
            self.services.insert(name, Arc::new(s));
        }
        self
    }

    /// The largest body any service takes (the declared-size check before routing; each
    /// service's own limit is checked once it is known).
    pub fn max_body(&self) -> u64 {
        self.services
            .values()
            .map(|s| s.limits.max_body)
            .max()
            .unwrap_or(0)
    }

    /// The registered names, NoETL's included, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.services.keys().cloned().collect();
        names.sort();
        names
    }

    /// The same proxy, rewriting NoETL's JSON answers with `scrubber` (the default one
    /// removes secret keys only; the gateway's also knows its callback URL and tokens).
    pub fn with_scrubber(mut self, scrubber: Scrubber) -> Self {
        self.scrubber = scrubber;
        self
    }
}

async fn noetl_proxy(State(state): State<ProxyState>, req: Request) -> Result<Response, AppError> {
    let raw_rest = req
        .uri()
        .path()
        .strip_prefix("/noetl/")
        .unwrap_or_default()
        .to_owned();
    forward(&state, NOETL, &raw_rest, req).await
}

async fn service_proxy(
    State(state): State<ProxyState>,
    req: Request,
) -> Result<Response, AppError> {
    let path = req
        .uri()
        .path()
        .strip_prefix("/api/v1/")
        .unwrap_or_default();
    let (name, raw_rest) = path.split_once('/').unwrap_or((path, ""));
    let (name, raw_rest) = (name.to_owned(), raw_rest.to_owned());
    if raw_rest.is_empty() {
        return Err(AppError::NotFound(format!(
            "name a path of the service after /api/v1/{name}/"
        )));
    }
    forward(&state, &name, &raw_rest, req).await
}

async fn forward(
    state: &ProxyState,
    name: &str,
    raw_rest: &str,
    req: Request,
) -> Result<Response, AppError> {
    let proxy = &state.proxy;
    let Some(service) = proxy.services.get(name).cloned() else {
        return Err(AppError::not_found(
            "service_not_found",
            format!("no service is registered as {name:?}"),
        ));
    };
    let (parts, body) = req.into_parts();
    let rest =
        normalize_rest(raw_rest).map_err(|m| AppError::bad_request("invalid_proxy_path", m))?;
    let rule_path = format!("{}/{rest}", service.rule_root);
    let caller = Caller::resolve(&state.sessions, &parts, None).await?;
    match service.allow.verdict(&parts.method, &rule_path) {
        Verdict::Allowed => {}
        Verdict::MethodNotAllowed(_) => return Err(AppError::MethodNotAllowed),
        Verdict::Forbidden => {
            return Err(AppError::forbidden(
                "proxy_route_forbidden",
                format!(
                    "{} {}/{rest} is not on the allow-list of service {name:?}",
                    parts.method, service.mount.client_root
                ),
            ))
        }
    }
    if let Upstream::Noetl(_) = service.upstream {
        let may = match execution_target(&rule_path) {
            None => true,
            Some(ExecutionTarget::Listing) => proxy.owners.reads_all(caller.user()),
            Some(ExecutionTarget::One(id)) => proxy.owners.may_access(caller.user(), &id).await?,
        };
        if !may {
            return Err(AppError::NotFound(format!("no such resource: {rule_path}")));
        }
    }
    let limits = service.limits;
    let limit = limits.max_body;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(AppError::PayloadTooLarge { limit });
    }
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let body_len = if http_body::Body::is_end_stream(&body) {
        Some(0)
    } else if chunked {
        None
    } else {
        declared
    };

    let mut headers = upstream_request_headers(&parts.headers);
    let request_id = parts
        .headers
        .get("x-request-id")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("unknown"));
    let user = caller.user();
    for (name, value) in [
        ("x-noetl-user-id", user.user_id.as_str()),
        ("x-noetl-user-email", user.email.as_str()),
        ("x-noetl-user-roles", &user.roles.join(",")),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    headers.insert(HeaderName::from_static("x-request-id"), request_id);
    if let Some(v) = client_address(&parts).and_then(|ip| HeaderValue::from_str(&ip).ok()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    let is_noetl = matches!(service.upstream, Upstream::Noetl(_));
    if is_noetl {
        scrub::ask_for_identity(&mut headers);
    }

    // A client too slow to send the body (its `BODY_READ_TIMEOUT`) is told so: 408.
    let upload_timed_out = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let timed_out = upload_timed_out.clone();
    let upload = LimitedStream::new(
        body.into_data_stream().map(move |r| {
            r.map_err(|e| {
                if let Some(t) = find_body_timeout(&e) {
                    *timed_out.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.0);
                }
                std::io::Error::other(e)
            })
        }),
        limit,
    );
    let upload_overflowed = upload.overflowed.clone();
    let upstream_path = format!("{}/{rest}", service.mount.upstream_root);
    let started = std::time::Instant::now();
    let request = Forward {
        method: parts.method.clone(),
        path: upstream_path.clone(),
        query: upstream_query(parts.uri.query()),
        headers,
        body: upload,
        body_len,
        first_byte_timeout: limits.timeout,
    };
    let forwarded = match &service.upstream {
        Upstream::Noetl(noetl) => noetl.forward(request).await.map_err(AppError::Noetl),
        Upstream::Service(client) => client.forward(request).await.map_err(AppError::Service),
    };
    let resp = match forwarded {
        Err(_) if upload_overflowed.load(Ordering::Relaxed) => {
            return Err(AppError::PayloadTooLarge { limit })
        }
        Err(e) => {
            let slow = *upload_timed_out.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = slow {
                return Err(AppError::BodyTimeout(t));
            }
            if let AppError::Service(cause) = &e {
                tracing::warn!(service = name, error = %cause, "proxied request failed");
            }
            return Err(e);
        }
        Ok(r) => r,
    };
    if resp.content_length.is_some_and(|n| n > limit) {
        let message = format!("upstream body larger than {limit} bytes");
        return Err(if is_noetl {
            AppError::Noetl(NoetlError::BadResponse(message))
        } else {
            AppError::Service(UpstreamError::Unreachable {
                service: name.to_owned(),
                message,
            })
        });
    }
    // One line per proxied request (the source design's): where it went, no query (it may
    // carry the caller's data), the upstream's status, the time to its answer's head.
    // The URL is built only when the line is wanted (`RUST_LOG=…,proxy=off`, or warn): it is
    // on every proxied request's path.
    if tracing::enabled!(target: "proxy", tracing::Level::INFO) {
        let mut target_url = service.mount.base.clone();
        target_url.set_path(&upstream_path);
        target_url.set_query(None);
        tracing::info!(
            target: "proxy",
            service = name,
            method = %parts.method,
            path = %parts.uri.path(),
            target_url = %target_url,
            status = resp.status,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "proxied"
        );
    }
    let mut headers = client_response_headers(&resp.headers, &service.mount);
    let body = if is_noetl && scrub::is_json(&resp.headers) {
        let (idle, scrubber) = (limits.idle_timeout, &proxy.scrubber);
        Body::from(scrub::scrubbed_body(&resp.headers, resp.body, limit, idle, scrubber).await?)
    } else {
        // Passed through unchanged, so the upstream's length still holds: the client gets
        // it instead of chunked framing (a shorter upstream body ends the connection).
        if let Some(n) = resp.content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let stream = LimitedStream::new(IdleTimeout::new(resp.body, limits.idle_timeout), limit);
        Body::from_stream(stream)
    };
    let mut out = Response::new(body);
    *out.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *out.headers_mut() = headers;
    Ok(out)
}

const BODY_LIMIT_MESSAGE: &str = "proxied body exceeds the size limit";

/// A byte stream that fails once more than `limit` bytes have passed, and says so in
/// `overflowed` (how the handler tells a too-large upload from a NoETL failure).
struct LimitedStream<S> {
    inner: S,
    seen: u64,
    limit: u64,
    overflowed: Arc<AtomicBool>,
}

impl<S> LimitedStream<S> {
    fn new(inner: S, limit: u64) -> Self {
        Self {
            inner,
            seen: 0,
            limit,
            overflowed: Arc::default(),
        }
    }
}

impl<S> Stream for LimitedStream<S>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.len() as u64;
                if self.seen > self.limit {
                    self.overflowed.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(std::io::Error::other(BODY_LIMIT_MESSAGE))))
                } else {
                    Poll::Ready(Some(Ok(chunk)))
                }
            }
            other => other,
        }
    }
}

/// A byte stream that fails if no chunk arrives for `idle`.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<S> Stream for IdleTimeout<S>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                let deadline = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(item)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(std::io::Error::other("upstream body stalled"))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn traversal_and_smuggling_paths_are_refused() {
        for bad in [
            "..%2fadmin",
            "%2e%2e/admin",
            "%2E%2E/x",
            "a/../b",
            "./a",
            "a//b",
            "/@evil.example/x",
            "@evil.example",
            "a%2fb",
            "a%5cb",
            "a\\b",
            "a%00",
            "%2-",
            "a%",
            "a%4",
            "a%zz",
            "%0a",
            "a%7F",
            "a%252e%252e/x",
            "",
            "a/%2e/b",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn plain_paths_map_under_api() {
        assert_eq!(
            normalize_path("executions/123").unwrap(),
            "/api/executions/123"
        );
        assert_eq!(
            normalize_path("catalog/list/").unwrap(),
            "/api/catalog/list"
        );
        assert_eq!(normalize_path("a%20b").unwrap(), "/api/a%20b");
    }

    #[test]
    fn allow_list_matches_method_and_whole_segments() {
        let allow =
            AllowList::parse(&["GET /api/executions".into(), "post /api/execute".into()]).unwrap();
        assert_eq!(
            allow.verdict(&Method::GET, "/api/executions"),
            Verdict::Allowed
        );
        assert_eq!(
            allow.verdict(&Method::GET, "/api/executions/1/status"),
            Verdict::Allowed
        );
        assert_eq!(
            allow.verdict(&Method::GET, "/api/executionsX"),
            Verdict::Forbidden
        );
        assert_eq!(
            allow.verdict(&Method::DELETE, "/api/executions/1"),
            Verdict::MethodNotAllowed(vec![Method::GET])
        );
        assert_eq!(
            allow.verdict(&Method::POST, "/api/execute"),
            Verdict::Allowed
        );
        assert!(AllowList::parse(&["GET /etc/passwd".into()]).is_err());
        assert!(AllowList::parse(&["GET /api/../x".into()]).is_err());
        assert!(AllowList::parse(&["/api/x".into()]).is_err());
    }

    #[test]
    fn a_star_rule_covers_one_execution_but_not_the_listing() {
        let allow =
            AllowList::parse(&["GET /api/executions/*".into(), "GET /api/catalog".into()]).unwrap();
        for (path, verdict) in [
            ("/api/executions/1", Verdict::Allowed),
            ("/api/executions/1/status", Verdict::Allowed),
            ("/api/executions", Verdict::Forbidden),
            ("/api/executionsX/1", Verdict::Forbidden),
            ("/api/catalog", Verdict::Allowed),
            ("/api/catalog/x", Verdict::Allowed),
        ] {
            assert_eq!(allow.verdict(&Method::GET, path), verdict, "{path}");
        }
        assert_eq!(
            allow.verdict(&Method::DELETE, "/api/executions/1"),
            Verdict::MethodNotAllowed(vec![Method::GET])
        );
        assert_eq!(
            allow.verdict(&Method::DELETE, "/api/executions"),
            Verdict::Forbidden
        );
        // Both spellings of the listing entry still parse; the bare one covers the listing.
        let listed = AllowList::parse(&["GET /api/executions/".into()]).unwrap();
        assert_eq!(
            listed.verdict(&Method::GET, "/api/executions"),
            Verdict::Allowed
        );
        assert!(AllowList::parse(&["GET /api/../x/*".into()]).is_err());
        assert!(AllowList::parse(&["GET /api/*".into()]).is_err());
    }

    #[test]
    fn execution_paths_are_recognised_however_they_are_spelled() {
        use ExecutionTarget::*;
        for (raw, target) in [
            ("executions", Some(Listing)),
            ("executions/", Some(Listing)),
            ("executions/42", Some(One("42".into()))),
            ("executions/42/status", Some(One("42".into()))),
            ("%65xecutions/42", Some(One("42".into()))),
            ("Executions/%34%32/cancel", Some(One("42".into()))),
            ("EXECUTIONS", Some(Listing)),
            ("executionsX/42", None),
            ("catalog/executions/42", None),
            ("execute", None),
        ] {
            let path = normalize_path(raw).unwrap();
            assert_eq!(execution_target(&path), target, "{raw}");
        }
    }

    #[test]
    fn credentials_identity_and_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer t"),
            ("cookie", "session_token=t"),
            ("x-user-id", "admin"),
            ("x-noetl-user-roles", "admin"),
            ("x-gateway-assertion", "forged"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("accept", "application/json"),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("cf-connecting-ip", "1.2.3.4"),
            ("proxy-authorization", "Basic x"),
            ("x-request-id", "client-chosen"),
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/api/admin"),
            ("x-rewrite-url", "/api/admin"),
            ("true-client-ip", "1.2.3.4"),
            ("x-client-ip", "1.2.3.4"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_request_headers(&h);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("accept"));
    }

    #[test]
    fn noetl_cors_server_and_internal_locations_never_reach_the_client() {
        let base = Mount::noetl(&url::Url::parse("http://noetl.internal:8082").unwrap());
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("server", "uvicorn"),
            ("x-powered-by", "noetl"),
            ("set-cookie", "a=b"),
            (
                "location",
                "http://noetl.internal:8082/api/executions/42?x=1",
            ),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = client_response_headers(&h, &base);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["location"], "/noetl/executions/42?x=1");

        assert_eq!(
            client_location("/api/catalog/a", &base).as_deref(),
            Some("/noetl/catalog/a")
        );
        assert_eq!(
            client_location("http://noetl.internal:8082/docs", &base),
            None
        );
        assert_eq!(client_location("/internal/metrics", &base), None);
        assert_eq!(
            client_location("https://auth.example.com/login", &base).as_deref(),
            Some("https://auth.example.com/login"),
            "a third party's URL is not NoETL's"
        );
    }

    #[test]
    fn a_service_location_maps_to_its_client_path_under_its_base() {
        let mount = Mount::service(
            "demo",
            &url::Url::parse("http://demo.internal:9000/v2/").unwrap(),
        );
        assert_eq!(
            client_location("/v2/items/7?x=1", &mount).as_deref(),
            Some("/api/v1/demo/items/7?x=1")
        );
        assert_eq!(
            client_location("http://demo.internal:9000/v2/a", &mount).as_deref(),
            Some("/api/v1/demo/a")
        );
        assert_eq!(
            client_location("/v2x/a", &mount),
            None,
            "a sibling of the base is not under it"
        );
        assert_eq!(client_location("/admin", &mount), None);
        let root = Mount::service("r", &url::Url::parse("http://r:1").unwrap());
        assert_eq!(client_location("/x", &root).as_deref(), Some("/api/v1/r/x"));
    }

    #[test]
    fn a_service_allow_list_is_relative_to_its_base() {
        let allow = AllowList::parse_under(
            &["GET /echo".into(), "POST /ask".into(), "DELETE /".into()],
            "",
        )
        .unwrap();
        assert_eq!(allow.verdict(&Method::GET, "/echo/x"), Verdict::Allowed);
        assert_eq!(allow.verdict(&Method::POST, "/ask"), Verdict::Allowed);
        assert_eq!(
            allow.verdict(&Method::DELETE, "/anything"),
            Verdict::Allowed
        );
        assert_eq!(
            allow.verdict(&Method::GET, "/ask"),
            Verdict::MethodNotAllowed(vec![Method::POST, Method::DELETE])
        );
        assert_eq!(
            allow.verdict(&Method::GET, "/echoes"),
            Verdict::MethodNotAllowed(vec![Method::DELETE])
        );
        assert!(AllowList::parse_under(&["GET /a/../b".into()], "").is_err());
        assert!(AllowList::parse_under(&["GET echo".into()], "").is_err());
        assert_eq!(allow.to_string(), "GET /echo,POST /ask,DELETE /*");
    }

    #[test]
    fn session_token_never_travels_upstream_in_the_query() {
        assert_eq!(
            upstream_query(Some("session_token=s&a=1")).as_deref(),
            Some("a=1")
        );
        assert_eq!(upstream_query(Some("session_token=s")), None);
        assert_eq!(upstream_query(None), None);
    }

    proptest! {
        #[test]
        fn accepted_paths_decode_to_the_same_plain_segments(s in "[a-zA-Z0-9./%@\\\\-]{0,40}") {
            if let Ok(p) = normalize_path(&s) {
                prop_assert!(p.starts_with("/api/"));
                let decoded = percent_encoding::percent_decode_str(&p).decode_utf8_lossy().into_owned();
                let raw_segments = p.split('/').count();
                prop_assert_eq!(decoded.split('/').count(), raw_segments, "an escape decoded to '/': {}", p);
                for seg in decoded.split('/').skip(1) {
                    prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "{}", p);
                }
                prop_assert!(!decoded.contains('@') && !decoded.contains('\\'), "{}", p);
            }
        }
    }
}
