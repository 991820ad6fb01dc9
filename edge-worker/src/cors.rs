//! The CORS step: answer preflights at the edge, and say which CORS headers a response gets.
//!
//! The decision itself is `gateway_shared::cors::CorsPolicy` (exact allow-list, never `*`
//! with credentials, `Vary: Origin` always). Here is only the glue: recognising a
//! preflight, and merging `Vary` with whatever the origin already varies on. The headers
//! are put on the response by `reply::finish`, the one place every response leaves through.

use gateway_shared::cors::{CorsPolicy, Preflight};

/// True for a CORS preflight: `OPTIONS` with `Access-Control-Request-Method`. A plain
/// `OPTIONS` without it is an ordinary request and goes to the origin.
pub fn is_preflight(method: &str, access_control_request_method: Option<&str>) -> bool {
    method.eq_ignore_ascii_case("OPTIONS") && access_control_request_method.is_some()
}

/// True for response headers only the edge may set (`access-control-*`): the edge is the
/// single CORS authority, whatever the origin says.
pub fn is_cors_header(name: &str) -> bool {
    const PREFIX: &[u8] = b"access-control-";
    name.len() > PREFIX.len() && name.as_bytes()[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
}

/// A `Vary` value that includes `Origin`, keeping what the origin already varies on.
pub fn merge_vary(existing: Option<&str>) -> String {
    match existing.map(str::trim).filter(|v| !v.is_empty()) {
        None => "Origin".to_owned(),
        Some(v)
            if v.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("origin")) =>
        {
            v.to_owned()
        }
        Some(v) => format!("{v}, Origin"),
    }
}

/// The preflight answer for a request, or `None` if it is not a preflight.
pub fn preflight(
    policy: &CorsPolicy,
    method: &str,
    origin: Option<&str>,
    access_control_request_method: Option<&str>,
) -> Option<Preflight> {
    is_preflight(method, access_control_request_method)
        .then(|| policy.preflight(origin, access_control_request_method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_options_with_a_requested_method_is_a_preflight() {
        assert!(is_preflight("OPTIONS", Some("POST")));
        assert!(!is_preflight("OPTIONS", None));
        assert!(!is_preflight("POST", Some("POST")));
        let p = CorsPolicy::parse("https://allowed.example").unwrap();
        assert!(preflight(&p, "GET", Some("https://allowed.example"), None).is_none());
        let answer = preflight(&p, "OPTIONS", Some("https://allowed.example"), Some("POST"))
            .expect("a preflight");
        assert_eq!(answer.status, 204);
    }

    #[test]
    fn vary_always_names_origin_and_keeps_the_origins_own_values() {
        assert_eq!(merge_vary(None), "Origin");
        assert_eq!(merge_vary(Some("")), "Origin");
        assert_eq!(
            merge_vary(Some("Accept-Encoding")),
            "Accept-Encoding, Origin"
        );
        assert_eq!(merge_vary(Some("origin, Accept")), "origin, Accept");
        assert_eq!(merge_vary(Some("*")), "*");
    }

    #[test]
    fn access_control_headers_are_recognised_in_any_case() {
        assert!(is_cors_header("access-control-allow-origin"));
        assert!(is_cors_header("Access-Control-Allow-Credentials"));
        assert!(!is_cors_header("access-control-"));
        assert!(!is_cors_header("content-type"));
        assert!(!is_cors_header("accéss-control-allow-origin"));
    }
}
