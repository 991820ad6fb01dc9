//! The edge's route table: what the edge does with a request, decided by its path alone.
//!
//! Policy is data: the table is a value loaded from the `ROUTES` variable, not `if` chains
//! in the worker. Each entry is `kind:path`; a path ending in `/` matches everything below
//! it, any other path matches itself and what lies below it as whole segments
//! (`/graphql` matches `/graphql` and `/graphql/ws`, not `/graphqlx`). The longest match
//! wins; an unmatched path is a [`RouteKind::Session`] route (the origin answers 404 for
//! what it does not serve, after the caller proved who they are).
//!
//! Beside the table, [`is_event_stream`] names the requests that are a browser's event
//! stream — `GET /events` and its compatibility alias `GET /api/v1/events/{client_id}` —
//! which the edge treats alike (a single-use `?ticket=` forwarded without a session, a
//! passing failure answered as a stream that says retry).

/// What the edge does with a matched request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Forwarded without a session (login, health of the origin, GraphiQL page).
    Public,
    /// A valid session is required; the edge validates it (KV cache, then the origin) and
    /// forwards with a signed assertion of the caller.
    Session,
    /// Answered 404 at the edge: internal routes (`/api/internal/*`, `/metrics`) must never
    /// be reachable from the internet.
    Deny,
    /// Partner / machine routes: forwarded without session handling; the origin checks
    /// the caller's own credential.
    Service,
    /// Answered by the edge itself (`/health`).
    Edge,
}

impl RouteKind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "public" => RouteKind::Public,
            "session" => RouteKind::Session,
            "deny" | "internal-deny" => RouteKind::Deny,
            "service" => RouteKind::Service,
            "edge" => RouteKind::Edge,
            _ => return None,
        })
    }
}

/// The default table: PROTOCOL.md's public auth routes, internal routes denied — `/ready`
/// too: it is the kubelet's question to one replica, not the internet's (the edge answers
/// its own `/health`). The registered services (`/api/v1/{service}/…`, `/noetl/…`) and
/// the event stream's alias (`/api/v1/events/…`) are session routes.
///
/// `check-access` is public at the edge: PROTOCOL.md §1 lets its token come in the JSON body,
/// which the edge does not read, so the origin (whose `Caller` reads the body token) decides.
pub const DEFAULT_ROUTES: &str = "edge:/health,\
public:/api/auth/login,public:/api/auth/validate,public:/api/auth/logout,\
public:/api/auth/check-access,\
session:/graphql,session:/events,session:/api/events/ticket,\
session:/noetl/,session:/api/v1/,deny:/api/internal/,deny:/metrics,deny:/ready";

/// The browser's event stream (PROTOCOL §3).
pub const EVENTS_PATH: &str = "/events";

/// What lies below this prefix is the compatibility alias of [`EVENTS_PATH`] for one
/// client (`GET /api/v1/events/{client_id}`) and that client's answers to questions
/// (`POST /api/v1/events/{client_id}/response`).
pub const EVENTS_ALIAS_PREFIX: &str = "/api/v1/events/";

/// Whether `path` is an event stream's path: [`EVENTS_PATH`], or
/// `/api/v1/events/{client_id}` — one non-empty segment below [`EVENTS_ALIAS_PREFIX`]
/// (`…/{client_id}/response` is not a stream).
pub fn is_event_stream_path(path: &str) -> bool {
    path == EVENTS_PATH
        || path
            .strip_prefix(EVENTS_ALIAS_PREFIX)
            .is_some_and(|client_id| !client_id.is_empty() && !client_id.contains('/'))
}

/// Whether a request is a browser's event stream: a `GET` of an
/// [`is_event_stream_path`] path. The edge treats every such request alike: one without a
/// session token but with a `?ticket=` is forwarded for the origin to redeem, and a
/// passing failure (502, 503, 504) is answered as a 200 stream that says retry.
pub fn is_event_stream(method: &str, path: &str) -> bool {
    method == "GET" && is_event_stream_path(path)
}

/// An ordered route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    entries: Vec<(RouteKind, String)>,
}

impl RouteTable {
    /// Parses `kind:path,kind:path,…`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (kind, path) = entry
                .split_once(':')
                .ok_or_else(|| format!("{entry:?} is not kind:path"))?;
            let kind = RouteKind::parse(kind.trim())
                .ok_or_else(|| format!("{kind:?} is not public, session, deny, service or edge"))?;
            let path = path.trim();
            if !path.starts_with('/') || path.contains("..") || path.contains("//") {
                return Err(format!(
                    "{path:?} must be an absolute path without '..' or '//'"
                ));
            }
            entries.push((kind, path.to_owned()));
        }
        Ok(Self { entries })
    }

    /// The kind of the longest entry matching `path`; [`RouteKind::Session`] if none.
    pub fn classify(&self, path: &str) -> RouteKind {
        self.lookup(path).0
    }

    /// The kind and the path of the longest entry matching `path` (the table's own
    /// spelling, e.g. `/noetl/`: what a log names instead of the raw path); the path is
    /// `None` when no entry matches (a [`RouteKind::Session`] route).
    pub fn lookup(&self, path: &str) -> (RouteKind, Option<&str>) {
        self.entries
            .iter()
            .filter(|(_, p)| matches(p, path))
            .max_by_key(|(_, p)| p.len())
            .map_or((RouteKind::Session, None), |(k, p)| (*k, Some(p.as_str())))
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::parse(DEFAULT_ROUTES).expect("the default route table parses")
    }
}

fn matches(pattern: &str, path: &str) -> bool {
    if pattern.ends_with('/') {
        path.starts_with(pattern) || path == pattern.trim_end_matches('/')
    } else {
        path == pattern
            || (path.starts_with(pattern) && path.as_bytes().get(pattern.len()) == Some(&b'/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_denies_internal_routes_and_answers_health_at_the_edge() {
        let t = RouteTable::default();
        assert_eq!(t.classify("/api/internal/callback/async"), RouteKind::Deny);
        assert_eq!(t.classify("/api/internal/"), RouteKind::Deny);
        assert_eq!(t.classify("/api/internal"), RouteKind::Deny);
        assert_eq!(t.classify("/metrics"), RouteKind::Deny);
        assert_eq!(t.classify("/health"), RouteKind::Edge);
        assert_eq!(t.classify("/api/auth/login"), RouteKind::Public);
        assert_eq!(t.classify("/graphql"), RouteKind::Session);
        assert_eq!(t.classify("/graphql/ws"), RouteKind::Session);
        assert_eq!(t.classify("/noetl/executions/1"), RouteKind::Session);
        assert_eq!(t.classify("/somewhere/else"), RouteKind::Session);
    }

    #[test]
    fn services_and_the_events_alias_are_session_routes() {
        let t = RouteTable::default();
        for path in [
            "/api/v1",
            "/api/v1/demo/echo",
            "/api/v1/demo/stream",
            "/api/v1/noetl/executions/1",
            "/api/v1/events/4b1c2e3f-aaaa-bbbb-cccc-0123456789ab",
            "/api/v1/events/4b1c2e3f-aaaa-bbbb-cccc-0123456789ab/response",
        ] {
            assert_eq!(
                t.lookup(path),
                (RouteKind::Session, Some("/api/v1/")),
                "{path}"
            );
        }
        // The internal listener stays unreachable whatever is registered.
        assert_eq!(t.classify("/api/internal/events"), RouteKind::Deny);
        assert_eq!(t.classify("/api/internal/questions"), RouteKind::Deny);
    }

    #[test]
    fn the_events_alias_is_an_event_stream_and_its_response_route_is_not() {
        for path in [
            "/events",
            "/api/v1/events/c1",
            "/api/v1/events/4b1c2e3f-aaaa",
        ] {
            assert!(is_event_stream_path(path), "{path}");
            assert!(is_event_stream("GET", path), "{path}");
            for method in ["POST", "HEAD", "PUT"] {
                assert!(!is_event_stream(method, path), "{method} {path}");
            }
        }
        for path in [
            "/events/x",
            "/eventsx",
            "/api/v1/events",
            "/api/v1/events/",
            "/api/v1/events/c1/",
            "/api/v1/events/c1/response",
            "/api/v1/demo/stream",
            "/api/events/ticket",
            "/graphql",
        ] {
            assert!(!is_event_stream_path(path), "{path}");
            assert!(!is_event_stream("GET", path), "{path}");
        }
    }

    #[test]
    fn matching_is_by_whole_segments_and_the_longest_entry_wins() {
        let t = RouteTable::parse("public:/a,deny:/a/b,service:/p/").unwrap();
        assert_eq!(t.classify("/a"), RouteKind::Public);
        assert_eq!(t.classify("/a/x"), RouteKind::Public);
        assert_eq!(t.classify("/ab"), RouteKind::Session);
        assert_eq!(t.classify("/a/b/c"), RouteKind::Deny);
        assert_eq!(t.classify("/p/x"), RouteKind::Service);
        assert_eq!(t.classify("/p"), RouteKind::Service);
        assert_eq!(t.lookup("/a/b/c"), (RouteKind::Deny, Some("/a/b")));
        assert_eq!(t.lookup("/p/x?q"), (RouteKind::Service, Some("/p/")));
        assert_eq!(t.lookup("/ab"), (RouteKind::Session, None));
    }

    #[test]
    fn malformed_tables_are_refused() {
        assert!(RouteTable::parse("public").is_err());
        assert!(RouteTable::parse("open:/x").is_err());
        assert!(RouteTable::parse("public:x").is_err());
        assert!(RouteTable::parse("public:/a/../b").is_err());
    }
}
