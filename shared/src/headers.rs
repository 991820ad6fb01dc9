//! What a client may bring in its request headers, decided once for the edge and the origin:
//! which request ids are kept, which headers claim an identity or an address only the gateway
//! may state, and which carry credentials.
//!
//! The edge (`edge-worker/src/ids.rs`, `forward.rs`) and the origin (its request-id middleware
//! and the `/noetl/*` proxy's upstream header filter) both call these, so a rule changed here
//! changes at both hops. Names are compared ASCII case-insensitively.

/// The longest client-sent request id that is kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Prefixes of headers by which a client could claim who it is or where it connects from:
/// the user headers the gateway sets for NoETL (`x-user-*`, `x-noetl-*`), the gateway's own
/// headers (`x-gateway-*`, among them the signed `x-gateway-assertion`), proxy address
/// headers (`x-forwarded-*`) and Cloudflare's (`cf-*`, e.g. `cf-connecting-ip`).
const IDENTITY_PREFIXES: [&str; 5] = ["x-user-", "x-noetl-", "x-gateway-", "x-forwarded-", "cf-"];

/// Whole names of identity headers that no prefix covers: the standard `forwarded` and the
/// client-address headers proxies and CDNs use.
const IDENTITY_NAMES: [&str; 7] = [
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "client-ip",
    "fastly-client-ip",
];

/// Headers by which a client could make a server behind the gateway act on another method
/// or path than the one the gateway checked (method override, URL rewrite).
const OVERRIDE_NAMES: [&str; 6] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-rewrite-url",
];

/// Headers that carry a credential of the client.
const CREDENTIAL_NAMES: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// True if a client-sent `x-request-id` may be kept: 1..=128 of `[A-Za-z0-9-_.:]`.
///
/// It lands in log lines and in the signed assertion, so anything else is replaced by a
/// minted id.
pub fn accept_client_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// True for a header a client must not be able to set: it claims an identity or an address
/// that only the gateway may state (the edge in its assertion and `x-forwarded-for`, the
/// origin in the `x-noetl-user-*` headers it sends NoETL).
pub fn is_client_identity_header(name: &str) -> bool {
    IDENTITY_PREFIXES
        .iter()
        .any(|p| starts_with_ignore_case(name, p))
        || IDENTITY_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// True for a header that carries a client credential (`authorization`, `cookie`,
/// `proxy-authorization`). The edge passes `authorization` and `cookie` to the origin, which
/// needs them; the origin never passes any of them on to NoETL.
pub fn is_credential_header(name: &str) -> bool {
    CREDENTIAL_NAMES
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
}

/// True for a header that would have a server behind the gateway treat the request as
/// another method or path than the one the gateway's route table and allow-list checked
/// (`x-http-method-override`, `x-original-url`, …). Dropped at both hops.
pub fn is_request_override_header(name: &str) -> bool {
    OVERRIDE_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_of_the_safe_alphabet_up_to_128_bytes_are_accepted() {
        assert!(accept_client_request_id("abc-123_x.y:z"));
        assert!(accept_client_request_id(&"x".repeat(128)));
        assert!(accept_client_request_id("0123456789abcdef0123456789abcdef"));
        assert!(accept_client_request_id(
            "3f1e2d4c-0000-4000-8000-000000000000"
        ));
    }

    #[test]
    fn empty_long_or_odd_request_ids_are_refused() {
        for bad in [
            "",
            " padded ",
            "has space",
            "new\nline",
            "quote\"",
            "semi;colon",
            "slash/",
            "caf\u{e9}",
            "tab\t",
            &"x".repeat(129),
        ] {
            assert!(!accept_client_request_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn identity_and_address_headers_are_recognised_in_any_case() {
        for h in [
            "x-user-id",
            "X-User-Email",
            "x-noetl-user-email",
            "x-noetl-user-roles",
            "x-gateway-assertion",
            crate::assertion::HEADER,
            "X-Forwarded-For",
            "x-forwarded-host",
            "x-forwarded-proto",
            "forwarded",
            "Forwarded",
            "x-real-ip",
            "X-Real-IP",
            "cf-connecting-ip",
            "CF-Ray",
            "True-Client-IP",
            "x-client-ip",
            "x-cluster-client-ip",
            "client-ip",
            "fastly-client-ip",
        ] {
            assert!(is_client_identity_header(h), "{h}");
        }
    }

    #[test]
    fn ordinary_and_credential_headers_are_not_identity_headers() {
        for h in [
            "authorization",
            "cookie",
            "accept",
            "content-type",
            "traceparent",
            "user-agent",
            "last-event-id",
            "x-request-id",
            "x-user",
            "x-forwarded",
            "forwarded-for",
            "cf",
            "x-real-ip-2",
        ] {
            assert!(!is_client_identity_header(h), "{h}");
        }
    }

    #[test]
    fn credential_headers_are_authorization_cookie_and_proxy_authorization() {
        for h in [
            "authorization",
            "Authorization",
            "cookie",
            "COOKIE",
            "proxy-authorization",
        ] {
            assert!(is_credential_header(h), "{h}");
        }
        for h in [
            "set-cookie",
            "x-authorization",
            "cookies",
            "accept",
            "x-user-id",
        ] {
            assert!(!is_credential_header(h), "{h}");
        }
    }

    #[test]
    fn method_override_and_url_rewrite_headers_are_recognised() {
        for h in [
            "x-http-method-override",
            "X-HTTP-Method-Override",
            "x-http-method",
            "x-method-override",
            "x-original-method",
            "x-original-url",
            "X-Rewrite-URL",
        ] {
            assert!(is_request_override_header(h), "{h}");
        }
        for h in [
            "x-http",
            "method",
            "x-url",
            "content-type",
            "x-request-id",
            "accept",
        ] {
            assert!(!is_request_override_header(h), "{h}");
        }
    }
}
