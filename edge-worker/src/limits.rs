//! The request-body limits: how large a body the edge forwards on each route.
//!
//! The origin refuses an oversized body itself (413 JSON), but only once the edge has
//! started streaming it; a client that sent `Content-Length` learns at the edge, before a
//! byte is forwarded. The limits mirror the origin's: `EDGE_MAX_BODY` (default 10 MiB,
//! the origin's `PROXY_MAX_BODY`) for every route, and `EDGE_BODY_LIMITS` for the routes
//! whose origin limit is lower (default `/graphql` 2 MiB — the origin's
//! `graphql::MAX_BODY` —, `/api/auth/` 64 KiB — its `AUTH_BODY_LIMIT` — and
//! `/api/v1/events/` 8 KiB — its `questions::ANSWER_BODY_LIMIT`: below it only the event
//! stream's alias, which takes no body, and a client's answer to a question,
//! `{"question_id","answer"}`). The same table bounds what the edge reads of a logout
//! body ([`crate::session`]).
//!
//! `EDGE_BODY_LIMITS` is `path=bytes,…`; a path ending in `/` covers everything below it,
//! any other path is exact, and the longest match wins (as in the route table).

/// `EDGE_MAX_BODY` when unset: the origin's `PROXY_MAX_BODY` default, its largest public
/// limit.
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;

/// `EDGE_BODY_LIMITS` when unset: the origin's GraphQL and auth limits, and the answers
/// to questions (`POST /api/v1/events/{client_id}/response`, 8 KiB).
pub const DEFAULT_BODY_LIMITS: &str = "/graphql=2097152,/api/auth/=65536,/api/v1/events/=8192";

/// The body limit of every route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyLimits {
    default: u64,
    /// `(path, bytes)`; a path ending in `/` is a prefix.
    routes: Vec<(String, u64)>,
}

impl BodyLimits {
    /// Parses `EDGE_MAX_BODY` (`None` → [`DEFAULT_MAX_BODY`]) and `EDGE_BODY_LIMITS`
    /// (`None` → [`DEFAULT_BODY_LIMITS`]). The error names the variable.
    pub fn parse(max_body: Option<&str>, table: Option<&str>) -> Result<Self, String> {
        let default = match max_body.map(str::trim).filter(|v| !v.is_empty()) {
            None => DEFAULT_MAX_BODY,
            Some(v) => bytes(v)
                .ok_or_else(|| format!("EDGE_MAX_BODY {v:?} is not a positive number of bytes"))?,
        };
        let table = table
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .unwrap_or(DEFAULT_BODY_LIMITS);
        let mut routes = Vec::new();
        for entry in table.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let parsed = entry
                .split_once('=')
                .and_then(|(p, n)| Some((p.trim(), bytes(n)?)))
                .filter(|(p, _)| p.starts_with('/'));
            let Some((path, limit)) = parsed else {
                return Err(format!(
                    "EDGE_BODY_LIMITS entry {entry:?} is not /path=bytes"
                ));
            };
            routes.push((path.to_owned(), limit));
        }
        Ok(Self { default, routes })
    }

    /// The largest body the edge forwards to `path`.
    pub fn for_path(&self, path: &str) -> u64 {
        self.routes
            .iter()
            .filter(|(p, _)| {
                if p.ends_with('/') {
                    path.starts_with(p.as_str())
                } else {
                    path == p || path.strip_prefix(p.as_str()) == Some("/")
                }
            })
            .max_by_key(|(p, _)| p.len())
            .map_or(self.default, |(_, n)| *n)
    }
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self::parse(None, None).expect("the default body limits parse")
    }
}

fn bytes(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok().filter(|n| *n > 0)
}

/// What a request's `Content-Length` says about the route's limit: `Err(limit)` when the
/// declared body is larger (→ 413 before forwarding). An absent or unreadable length is
/// `Ok`: the body is streamed and the origin enforces its limit on the bytes it receives.
pub fn check_declared(content_length: Option<&str>, limit: u64) -> Result<(), u64> {
    match content_length.and_then(|l| l.trim().parse::<u64>().ok()) {
        Some(n) if n > limit => Err(limit),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_mirror_the_origins_limits() {
        let l = BodyLimits::default();
        assert_eq!(l.for_path("/graphql"), 2 * 1024 * 1024);
        assert_eq!(l.for_path("/graphql/"), 2 * 1024 * 1024);
        assert_eq!(l.for_path("/api/auth/logout"), 64 * 1024);
        assert_eq!(l.for_path("/noetl/executions"), DEFAULT_MAX_BODY);
        assert_eq!(l.for_path("/graphqlx"), DEFAULT_MAX_BODY);
        assert_eq!(l.for_path("/api/authx"), DEFAULT_MAX_BODY);
        assert_eq!(l.for_path("/api/v1/events/c1/response"), 8192);
        assert_eq!(l.for_path("/api/v1/events/c1"), 8192);
        assert_eq!(l.for_path("/api/v1/demo/echo"), DEFAULT_MAX_BODY);
    }

    #[test]
    fn the_longest_match_wins_and_exact_paths_are_exact() {
        let l = BodyLimits::parse(Some("100"), Some("/a/=10, /a/b/=5,/c=7")).unwrap();
        assert_eq!(l.for_path("/a/x"), 10);
        assert_eq!(l.for_path("/a/b/x"), 5);
        assert_eq!(l.for_path("/c"), 7);
        assert_eq!(l.for_path("/c/d"), 100);
        assert_eq!(l.for_path("/"), 100);
    }

    #[test]
    fn malformed_limits_name_the_variable() {
        assert!(BodyLimits::parse(Some("0"), None)
            .unwrap_err()
            .contains("EDGE_MAX_BODY"));
        assert!(BodyLimits::parse(Some("10MB"), None)
            .unwrap_err()
            .contains("EDGE_MAX_BODY"));
        for bad in ["graphql=1", "/x=", "/x=-1", "/x"] {
            assert!(
                BodyLimits::parse(None, Some(bad))
                    .unwrap_err()
                    .contains("EDGE_BODY_LIMITS"),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_a_declared_length_over_the_limit_is_refused_up_front() {
        assert_eq!(check_declared(Some("11"), 10), Err(10));
        assert_eq!(check_declared(Some(" 10 "), 10), Ok(()));
        assert_eq!(check_declared(None, 10), Ok(()));
        assert_eq!(check_declared(Some("lots"), 10), Ok(()));
    }
}
