//! The CORS decision: which browser origins may call the gateway with credentials.
//!
//! The allow-list is exact (`scheme://host[:port]`, compared case-insensitively on the
//! scheme and host). Never `*` — a wildcard together with credentials would let any site
//! read a logged-in user's data — never `null` (sandboxed iframes, `file:` pages), and
//! never a suffix match (`https://allowed.example.evil.example` is not
//! `https://allowed.example`). Every response carries `Vary: Origin`, so a cache never
//! serves one origin's CORS answer to another.

/// Methods a preflight may ask for.
pub const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// Request headers a preflight may ask for.
pub const ALLOWED_HEADERS: &str =
    "authorization, content-type, last-event-id, x-request-id, traceparent, accept";
/// Response headers scripts may read.
pub const EXPOSED_HEADERS: &str = "x-request-id, retry-after";
/// How long a browser may cache a preflight answer, in seconds.
pub const MAX_AGE_SECS: u32 = 600;

/// The allow-list of browser origins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsPolicy {
    allowed: Vec<String>,
}

/// What to answer a preflight (`OPTIONS` with `Access-Control-Request-Method`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// Always 204: a refused preflight is told so by the missing allow headers, which is
    /// what browsers act on.
    pub status: u16,
    /// Headers to send.
    pub headers: Vec<(&'static str, String)>,
}

/// `scheme://host[:port]` lower-cased, or `None` if `s` is not an origin.
fn normalize_origin(s: &str) -> Option<String> {
    let s = s.trim();
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return None;
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ', '*', '\\']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 5 {
                return None;
            }
            (h, Some(p))
        }
        _ => (rest, None),
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
    {
        return None;
    }
    Some(match port {
        Some(p) => format!("{scheme}://{}:{p}", host.to_ascii_lowercase()),
        None => format!("{scheme}://{}", host.to_ascii_lowercase()),
    })
}

impl CorsPolicy {
    /// Parses a comma-separated allow-list (`CORS_ALLOWED_ORIGINS`). `*`, `null` and
    /// anything that is not a bare origin are refused with a message naming the entry.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut allowed = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" || entry.eq_ignore_ascii_case("null") {
                return Err(format!(
                    "{entry:?} cannot be allowed: credentials are sent, so only exact origins are"
                ));
            }
            let origin = normalize_origin(entry).ok_or_else(|| {
                format!("{entry:?} is not an origin (scheme://host[:port], no path)")
            })?;
            allowed.push(origin);
        }
        Ok(Self { allowed })
    }

    /// True if `origin` (the request's `Origin` header) is on the list, exactly.
    pub fn is_allowed(&self, origin: &str) -> bool {
        normalize_origin(origin).is_some_and(|o| self.allowed.contains(&o))
    }

    /// Headers for a normal (non-preflight) response.
    pub fn response_headers(&self, origin: Option<&str>) -> Vec<(&'static str, String)> {
        let mut h = vec![("vary", "Origin".to_owned())];
        if let Some(o) = origin.filter(|o| self.is_allowed(o)) {
            h.push(("access-control-allow-origin", o.trim().to_owned()));
            h.push(("access-control-allow-credentials", "true".to_owned()));
            h.push(("access-control-expose-headers", EXPOSED_HEADERS.to_owned()));
        }
        h
    }

    /// The answer to a preflight.
    pub fn preflight(&self, origin: Option<&str>, requested_method: Option<&str>) -> Preflight {
        let mut headers = vec![("vary", "Origin".to_owned())];
        let method_ok = requested_method.is_some_and(|m| {
            ALLOWED_METHODS
                .split(", ")
                .any(|a| a.eq_ignore_ascii_case(m.trim()))
        });
        if let Some(o) = origin.filter(|o| self.is_allowed(o) && method_ok) {
            headers.push(("access-control-allow-origin", o.trim().to_owned()));
            headers.push(("access-control-allow-credentials", "true".to_owned()));
            headers.push(("access-control-allow-methods", ALLOWED_METHODS.to_owned()));
            headers.push(("access-control-allow-headers", ALLOWED_HEADERS.to_owned()));
            headers.push(("access-control-max-age", MAX_AGE_SECS.to_string()));
        }
        Preflight {
            status: 204,
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> CorsPolicy {
        CorsPolicy::parse("https://allowed.example, http://localhost:5173").unwrap()
    }

    fn has_acao(h: &[(&str, String)]) -> bool {
        h.iter().any(|(k, _)| *k == "access-control-allow-origin")
    }

    #[test]
    fn exact_origins_are_allowed_with_credentials_and_vary() {
        let h = policy().response_headers(Some("https://allowed.example"));
        assert!(h.contains(&(
            "access-control-allow-origin",
            "https://allowed.example".into()
        )));
        assert!(h.contains(&("access-control-allow-credentials", "true".into())));
        assert!(h.contains(&("vary", "Origin".into())));
        assert!(policy().is_allowed("HTTPS://Allowed.Example"));
        assert!(policy().is_allowed("http://localhost:5173"));
    }

    #[test]
    fn null_suffix_and_lookalike_origins_are_refused_but_still_vary() {
        for evil in [
            "https://evil.example",
            "null",
            "https://allowed.example.evil.example",
            "https://evilallowed.example",
            "http://allowed.example",
            "https://allowed.example:8443",
            "https://allowed.example/",
            "https://allowed.example@evil.example",
            "http://localhost:5174",
            "",
        ] {
            let h = policy().response_headers(Some(evil));
            assert!(!has_acao(&h), "{evil:?} was allowed");
            assert!(h.contains(&("vary", "Origin".into())));
            assert!(
                !has_acao(&policy().preflight(Some(evil), Some("POST")).headers),
                "{evil:?}"
            );
        }
    }

    #[test]
    fn wildcards_and_null_cannot_be_configured() {
        assert!(CorsPolicy::parse("*").is_err());
        assert!(CorsPolicy::parse("https://a.example,null").is_err());
        assert!(CorsPolicy::parse("https://a.example/path").is_err());
        assert!(CorsPolicy::parse("*.example.com").is_err());
        assert!(CorsPolicy::parse("").unwrap().allowed.is_empty());
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_names_methods_and_headers() {
        let p = policy().preflight(Some("https://allowed.example"), Some("POST"));
        assert_eq!(p.status, 204);
        assert!(p
            .headers
            .iter()
            .any(|(k, v)| *k == "access-control-allow-methods" && v.contains("POST")));
        assert!(p
            .headers
            .iter()
            .any(|(k, v)| *k == "access-control-allow-headers" && v.contains("authorization")));
        let p = policy().preflight(Some("https://allowed.example"), Some("TRACE"));
        assert!(!has_acao(&p.headers));
    }

    proptest! {
        #[test]
        fn only_listed_origins_ever_get_an_allow_origin_header(o in ".{0,60}") {
            let h = policy().response_headers(Some(&o));
            if has_acao(&h) {
                prop_assert!(policy().is_allowed(&o));
                let n = normalize_origin(&o).unwrap();
                prop_assert!(n == "https://allowed.example" || n == "http://localhost:5173");
            }
        }
    }
}
