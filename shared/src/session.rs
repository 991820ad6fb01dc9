//! Session tokens and the session record both sides cache.
//!
//! A raw session token is a bearer secret: it is never a cache key and never logged. The
//! cache key is [`SessionHash`], `hex(sha256(token))` (PROTOCOL.md §1). Extraction follows
//! the order clients use: `Authorization: Bearer`, then the `session_token` cookie, then
//! `?session_token=` (EventSource cannot set headers).

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// The longest session token accepted; anything longer is refused before hashing.
pub const MAX_TOKEN_LEN: usize = 512;

/// `hex(sha256(token))`: the only form in which a session token is stored or logged. Read
/// back from JSON only through [`SessionHash::parse`], so every value is 64 hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct SessionHash(String);

impl From<SessionHash> for String {
    fn from(h: SessionHash) -> Self {
        h.0
    }
}

impl TryFrom<String> for SessionHash {
    type Error = &'static str;

    fn try_from(hex: String) -> Result<Self, Self::Error> {
        Self::parse(&hex).ok_or("a session hash is 64 lowercase hex characters")
    }
}

impl SessionHash {
    /// Hashes a raw token.
    pub fn of(token: &str) -> Self {
        Self(hex::encode(Sha256::digest(token.as_bytes())))
    }

    /// A hash received in its hex form (an edge assertion's `sid`, a K/V key): exactly 64
    /// lowercase hex characters, else `None`.
    pub fn parse(hex: &str) -> Option<Self> {
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(hex.to_owned()))
    }

    /// The 64 lowercase hex characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short prefix for log lines: enough to correlate, useless to an attacker.
    pub fn short(&self) -> &str {
        self.0.get(..12).unwrap_or(&self.0)
    }
}

impl fmt::Debug for SessionHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionHash({}…)", self.short())
    }
}

impl fmt::Display for SessionHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True if `token` looks like a session token at all: 1..=512 visible ASCII characters.
///
/// Checked before any hashing or upstream call so junk never reaches NoETL.
pub fn is_well_formed_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= MAX_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The token in an `Authorization` header value, if it is `Bearer <token>`.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    is_well_formed_token(token).then_some(token)
}

/// The `session_token` cookie in a `Cookie` header value.
pub fn cookie_token(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == "session_token")
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|v| is_well_formed_token(v))
}

/// The `session_token` query parameter in a raw (still percent-encoded) query string.
pub fn query_token(query: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "session_token")
        .and_then(|(_, value)| {
            let plus_as_space = value.replace('+', " ");
            percent_encoding::percent_decode_str(&plus_as_space)
                .decode_utf8()
                .ok()
                .map(|v| v.into_owned())
        })
        .filter(|v| is_well_formed_token(v))
}

/// True if a raw query string carries a non-empty `ticket` parameter: a single-use SSE
/// ticket (`POST /api/events/ticket`) that the origin redeems for `/events`. The edge lets
/// such a request through without a session token; it cannot check the ticket itself.
pub fn query_has_ticket(query: &str) -> bool {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(name, value)| name == "ticket" && !value.is_empty())
}

/// The session token of a request, from the first place that has a well-formed one:
/// `Authorization: Bearer`, the `session_token` cookie, then `?session_token=`.
pub fn extract_token(
    authorization: Option<&str>,
    cookie: Option<&str>,
    query: Option<&str>,
) -> Option<String> {
    authorization
        .and_then(bearer_token)
        .map(str::to_owned)
        .or_else(|| cookie.and_then(cookie_token).map(str::to_owned))
        .or_else(|| query.and_then(query_token))
}

/// A user as the gateway reports it (PROTOCOL.md §1, `user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct User {
    /// NoETL's user id. NoETL may send a number; it is kept as its exact decimal text.
    #[serde(deserialize_with = "string_or_number")]
    pub user_id: String,
    /// The user's e-mail address.
    #[serde(default)]
    pub email: String,
    /// A display name (may be empty).
    #[serde(default)]
    pub display_name: String,
    /// Role names, e.g. `admin`, `user`.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A validated session as cached at the origin (K/V `sessions`) and the edge (Workers KV).
///
/// A record is honoured only while [`SessionRecord::is_honoured`] holds: a cache may keep
/// an entry longer than the session lives, and must not extend it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Who the session belongs to.
    pub user: User,
    /// The expiry as NoETL reported it (RFC 3339), echoed to clients unchanged.
    pub expires_at: String,
    /// The same instant in seconds since the Unix epoch, for cheap comparisons.
    pub expires_at_unix: i64,
    /// False once NoETL or a logout has ended the session.
    pub is_active: bool,
}

impl SessionRecord {
    /// True while the session may be served from a cache: active and not yet expired.
    pub fn is_honoured(&self, now_unix: i64) -> bool {
        self.is_active && self.expires_at_unix > now_unix
    }

    /// Seconds of life left at `now_unix` (0 once expired).
    pub fn remaining_secs(&self, now_unix: i64) -> u64 {
        u64::try_from(self.expires_at_unix - now_unix).unwrap_or(0)
    }
}

/// Deserialises a JSON string or integer into its exact decimal text.
///
/// NoETL ids exceed 2^53, so they must never pass through `f64`: serde_json keeps
/// integers up to 2^64 exact, and a float or other type is refused.
pub fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        other => Err(D::Error::custom(format!(
            "expected a string or an integer id, got {other}"
        ))),
    }
}

/// The `WWW-Authenticate` value the origin sends with a 401 that is about the session itself
/// (unknown, expired, logged out or revoked — RFC 6750 `invalid_token`). The edge forgets a
/// session only on a 401 that carries it; any other 401 (a bad edge assertion, a
/// misconfiguration) says nothing about the session and is never cached as "refused".
pub const SESSION_REFUSED_CHALLENGE: &str = "Bearer error=\"invalid_token\"";

/// Whether a 401's `WWW-Authenticate` header says the session itself was refused.
pub fn is_session_refused(www_authenticate: Option<&str>) -> bool {
    www_authenticate.is_some_and(|v| {
        let v = v.trim();
        v.len() > 7
            && v[..7].eq_ignore_ascii_case("bearer ")
            && v[7..]
                .split(',')
                .any(|p| p.trim().replace(' ', "") == "error=\"invalid_token\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_hash_parses_only_from_its_own_hex_form() {
        let h = SessionHash::of("tok");
        assert_eq!(SessionHash::parse(h.as_str()), Some(h.clone()));
        assert_eq!(SessionHash::parse(&h.as_str().to_uppercase()), None);
        assert_eq!(SessionHash::parse(&h.as_str()[..63]), None);
        assert_eq!(SessionHash::parse(""), None);
        assert_eq!(SessionHash::parse(&"g".repeat(64)), None);
    }

    #[test]
    fn session_hash_is_hex_sha256() {
        assert_eq!(
            SessionHash::of("abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!format!("{:?}", SessionHash::of("abc")).contains("ba7816bf8f01cfea41414"));
    }

    #[test]
    fn bearer_header_wins_over_cookie_and_query() {
        let t = extract_token(
            Some("Bearer from-header"),
            Some("a=b; session_token=from-cookie"),
            Some("session_token=from-query"),
        );
        assert_eq!(t.as_deref(), Some("from-header"));
        let t = extract_token(
            None,
            Some("a=b; session_token=from-cookie"),
            Some("session_token=q"),
        );
        assert_eq!(t.as_deref(), Some("from-cookie"));
        let t = extract_token(Some("Basic xyz"), None, Some("x=1&session_token=q%2Bv"));
        assert_eq!(t.as_deref(), Some("q+v"));
        assert_eq!(extract_token(None, None, Some("session_token=")), None);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        assert_eq!(bearer_token(&format!("Bearer {}", "x".repeat(513))), None);
        assert_eq!(query_token("session_token=%FF%FE"), None);
        assert_eq!(cookie_token("session_token=caf\u{e9}"), None);
        assert_eq!(bearer_token("bearer ok"), Some("ok"));
    }

    #[test]
    fn record_is_honoured_only_while_active_and_unexpired() {
        let mut r = SessionRecord {
            user: User {
                user_id: "1".into(),
                email: "a@b".into(),
                display_name: String::new(),
                roles: vec![],
            },
            expires_at: "2026-01-01T00:00:00Z".into(),
            expires_at_unix: 100,
            is_active: true,
        };
        assert!(r.is_honoured(99));
        assert!(!r.is_honoured(100));
        assert_eq!(r.remaining_secs(40), 60);
        assert_eq!(r.remaining_secs(400), 0);
        r.is_active = false;
        assert!(!r.is_honoured(0));
    }

    #[test]
    fn ids_above_2_pow_53_keep_every_digit() {
        #[derive(Deserialize)]
        struct X {
            #[serde(deserialize_with = "string_or_number")]
            id: String,
        }
        let x: X = serde_json::from_str(r#"{"id": 9007199254740993123}"#).unwrap();
        assert_eq!(x.id, "9007199254740993123");
        let x: X = serde_json::from_str(r#"{"id": 18014398509481985}"#).unwrap();
        assert_eq!(x.id, "18014398509481985");
        let x: X = serde_json::from_str(r#"{"id": "42"}"#).unwrap();
        assert_eq!(x.id, "42");
        assert!(serde_json::from_str::<X>(r#"{"id": 1.5}"#).is_err());
    }

    proptest! {
        #[test]
        fn extraction_never_panics_and_only_yields_well_formed_tokens(
            a in ".{0,80}", c in ".{0,80}", q in ".{0,80}"
        ) {
            if let Some(t) = extract_token(Some(&a), Some(&c), Some(&q)) {
                prop_assert!(is_well_formed_token(&t));
            }
        }
    }

    #[test]
    fn a_ticket_is_a_non_empty_ticket_parameter() {
        assert!(query_has_ticket("ticket=abc"));
        assert!(query_has_ticket("client_id=x&ticket=abc&last_event_id=3"));
        assert!(!query_has_ticket("ticket="));
        assert!(!query_has_ticket("ticketx=abc"));
        assert!(!query_has_ticket("xticket=abc"));
        assert!(!query_has_ticket(""));
    }

    #[test]
    fn only_an_invalid_token_challenge_refuses_the_session() {
        assert!(is_session_refused(Some(SESSION_REFUSED_CHALLENGE)));
        assert!(is_session_refused(Some(
            "bearer realm=\"gw\", error = \"invalid_token\""
        )));
        assert!(!is_session_refused(None));
        assert!(!is_session_refused(Some("Bearer")));
        assert!(!is_session_refused(Some(
            "Bearer error=\"invalid_request\""
        )));
        assert!(!is_session_refused(Some("Basic error=\"invalid_token\"")));
    }

    #[test]
    fn a_session_hash_is_read_back_only_in_its_own_form() {
        let h = SessionHash::of("tok");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", h.as_str()));
        assert_eq!(serde_json::from_str::<SessionHash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<SessionHash>("\"short\"").is_err());
        assert!(serde_json::from_str::<SessionHash>(&json.to_uppercase()).is_err());
    }
}
