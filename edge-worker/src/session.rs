//! The session step: who is calling, from Workers KV when possible, from the origin when not.
//!
//! First the isolate's own memory ([`crate::l1`], `EDGE_L1_TTL` seconds: what KV or the
//! origin said about this session a moment ago), then KV namespace `SESSIONS`,
//! key = `hex(sha256(token))` (the raw token is never a key):
//! - hit, and the record is still honoured (`SessionRecord::is_honoured`) → the caller;
//! - `neg:<hash>` present (the origin refused this token within the last minute) → 401
//!   at the edge, without asking the origin again;
//! - miss → `POST {ORIGIN_URL}/api/auth/validate` with the token as `Bearer`: 200 → the
//!   record is cached with `expirationTtl` = the session's remaining life capped at
//!   `EDGE_SESSION_TTL`, never under KV's 60 s minimum (the record's own expiry still
//!   bounds its use); 401 → `neg:<hash>` for 60 s and 401; origin down → 502/503/504.
//!
//! `POST /api/auth/logout` through the edge deletes the token's entry once the origin
//! answered 204. KV is eventually consistent across Cloudflare locations: another
//! location may serve its cached copy for up to a minute (KV's cache), never longer than
//! `EDGE_SESSION_TTL`; the origin's own revocation list closes that gap for identity it
//! checks itself.

use crate::config::MIN_SESSION_TTL_SECS;
use gateway_shared::session::{SessionHash, SessionRecord, User};
use serde::Deserialize;

/// How long a refused token is remembered (KV's minimum TTL).
pub const NEGATIVE_TTL_SECS: u64 = 60;
/// How long the origin may take to validate a session.
pub const VALIDATE_TIMEOUT_MS: u64 = 10_000;
/// The logout route, after which the token's KV entry is deleted.
pub const LOGOUT_PATH: &str = "/api/auth/logout";
/// The largest logout body the edge reads to find a `session_token` in it.
pub const MAX_LOGOUT_BODY: usize = 16 * 1024;

/// The KV key of a positive entry.
pub fn cache_key(session: &SessionHash) -> String {
    session.as_str().to_owned()
}

/// The KV key of a negative entry.
pub fn negative_key(session: &SessionHash) -> String {
    format!("neg:{}", session.as_str())
}

/// The `expirationTtl` for caching `record` at `now_unix`: its remaining life capped at
/// `cap_secs`, raised to KV's 60 s minimum; `None` if it has no life left (not cached).
pub fn cache_ttl(record: &SessionRecord, now_unix: i64, cap_secs: u64) -> Option<u64> {
    match record.remaining_secs(now_unix) {
        0 => None,
        left => Some(left.min(cap_secs).max(MIN_SESSION_TTL_SECS)),
    }
}

/// Seconds since the epoch of an `expires_at` as NoETL writes it: RFC 3339, or the same
/// without an offset (taken as UTC).
pub fn parse_expires_at(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp());
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc().timestamp())
}

/// What the origin said about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// Valid: the session's record.
    Valid(SessionRecord),
    /// Invalid, expired or logged out.
    Invalid,
    /// The origin could not decide (NoETL down or overloaded): its status.
    Unavailable(u16),
}

#[derive(Deserialize)]
struct ValidateReply {
    #[serde(default)]
    valid: bool,
    user: Option<User>,
    expires_at: Option<String>,
}

/// Reads the origin's answer to `POST /api/auth/validate` (PROTOCOL.md §1).
///
/// An answer the edge cannot read is `Unavailable(502)`, never `Valid`. An `expires_at`
/// that does not parse gives the record KV's minimum life, so the session is re-checked
/// within a minute rather than trusted indefinitely.
pub fn interpret_validate(status: u16, body: &str, now_unix: i64) -> Validation {
    match status {
        200 => {}
        401 | 403 => return Validation::Invalid,
        503 | 504 => return Validation::Unavailable(status),
        _ => return Validation::Unavailable(502),
    }
    let Ok(reply) = serde_json::from_str::<ValidateReply>(body) else {
        return Validation::Unavailable(502);
    };
    match (reply.valid, reply.user) {
        (true, Some(user)) => {
            let expires_at = reply.expires_at.unwrap_or_default();
            let expires_at_unix =
                parse_expires_at(&expires_at).unwrap_or(now_unix + MIN_SESSION_TTL_SECS as i64);
            Validation::Valid(SessionRecord {
                user,
                expires_at,
                expires_at_unix,
                is_active: true,
            })
        }
        (true, None) => Validation::Unavailable(502),
        (false, _) => Validation::Invalid,
    }
}

/// The `session_token` in a logout body (`{"session_token": "…"}`), if any.
pub fn token_in_body(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct LogoutBody {
        session_token: Option<String>,
    }
    serde_json::from_slice::<LogoutBody>(body)
        .ok()?
        .session_token
        .filter(|t| gateway_shared::session::is_well_formed_token(t))
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::*;
    use crate::caller::Caller;
    use crate::config::EdgeConfig;
    use crate::error::EdgeError;
    use crate::l1::Entry;
    use gateway_shared::assertion;
    use worker::{kv::KvStore, Env, Headers, Method, Request, RequestInit};

    /// The KV binding.
    pub const BINDING: &str = "SESSIONS";

    /// A session record to write to KV, alongside the forward.
    pub struct CacheWrite {
        kv: KvStore,
        key: String,
        value: String,
        ttl: u64,
    }

    impl CacheWrite {
        /// Writes it; a failure is logged (the next request validates again).
        pub async fn apply(self) {
            let put = match self.kv.put(&self.key, self.value) {
                Ok(p) => p.expiration_ttl(self.ttl),
                Err(e) => return worker::console_warn!("session cache put failed: {e}"),
            };
            if let Err(e) = put.execute().await {
                worker::console_warn!("session cache put failed: {e}");
            }
        }
    }

    /// The session token of a request: `Authorization: Bearer`, `session_token` cookie,
    /// `?session_token=`.
    pub fn token(req: &Request, url: &worker::Url) -> Option<String> {
        let h = req.headers();
        gateway_shared::session::extract_token(
            h.get("authorization").ok().flatten().as_deref(),
            h.get("cookie").ok().flatten().as_deref(),
            url.query(),
        )
    }

    fn kv(env: &Env) -> Option<KvStore> {
        env.kv(BINDING)
            .map_err(|e| worker::console_warn!("KV {BINDING} unavailable: {e}"))
            .ok()
    }

    /// The caller behind `token`, plus the KV write to run alongside the forward when the
    /// origin had to be asked.
    pub async fn resolve(
        env: &Env,
        cfg: &EdgeConfig,
        token: &str,
        session: SessionHash,
        rid: &str,
        now_unix: i64,
    ) -> Result<(Caller, Option<CacheWrite>), EdgeError> {
        let ttl = cfg.l1_ttl_secs;
        match crate::l1::get(ttl, &session) {
            Some(Entry::Valid(record)) if record.is_honoured(now_unix) => {
                return Ok((Caller::User { record, session }, None));
            }
            Some(Entry::Refused) => return Err(EdgeError::InvalidSession),
            _ => {}
        }
        let kv = kv(env);
        if let Some(kv) = &kv {
            if let Some(record) = cached(kv, &session, now_unix).await {
                crate::l1::put(ttl, &session, Entry::Valid(record.clone()));
                return Ok((Caller::User { record, session }, None));
            }
            if matches!(kv.get(&negative_key(&session)).text().await, Ok(Some(_))) {
                crate::l1::put(ttl, &session, Entry::Refused);
                return Err(EdgeError::InvalidSession);
            }
        }
        match validate_at_origin(cfg, token, rid).await? {
            Validation::Valid(record) => {
                crate::l1::put(ttl, &session, Entry::Valid(record.clone()));
                let write = kv
                    .zip(cache_ttl(&record, now_unix, cfg.session_ttl_secs))
                    .and_then(|(kv, ttl)| {
                        serde_json::to_string(&record).ok().map(|value| CacheWrite {
                            kv,
                            key: cache_key(&session),
                            value,
                            ttl,
                        })
                    });
                Ok((Caller::User { record, session }, write))
            }
            Validation::Invalid => {
                crate::l1::put(ttl, &session, Entry::Refused);
                if let Some(kv) = kv {
                    CacheWrite {
                        kv,
                        key: negative_key(&session),
                        value: "1".into(),
                        ttl: NEGATIVE_TTL_SECS,
                    }
                    .apply()
                    .await;
                }
                Err(EdgeError::InvalidSession)
            }
            Validation::Unavailable(503) => Err(EdgeError::OriginUnavailable),
            Validation::Unavailable(504) => Err(EdgeError::OriginTimeout),
            Validation::Unavailable(s) => Err(EdgeError::OriginUnreachable(format!(
                "validate answered {s} or an unreadable body"
            ))),
        }
    }

    /// A cached record that may still be served; an unreadable or dead one is a miss.
    async fn cached(kv: &KvStore, session: &SessionHash, now_unix: i64) -> Option<SessionRecord> {
        let text = kv.get(&cache_key(session)).text().await.ok()??;
        serde_json::from_str::<SessionRecord>(&text)
            .ok()
            .filter(|r| r.is_honoured(now_unix))
    }

    async fn validate_at_origin(
        cfg: &EdgeConfig,
        token: &str,
        rid: &str,
    ) -> Result<Validation, EdgeError> {
        let headers = Headers::new();
        headers.set("authorization", &format!("Bearer {token}"))?;
        headers.set("x-request-id", rid)?;
        // An anonymous assertion: the origin may refuse traffic that did not come through
        // the edge (REQUIRE_EDGE_ASSERTION), and this call is the edge's own.
        let anon = crate::sign::assertion(
            &Caller::Anonymous,
            rid,
            &cfg.signing_key,
            crate::time::now_unix(),
        )
        .await
        .map_err(|e| EdgeError::Internal(format!("signing the assertion failed: {e}")))?;
        headers.set(assertion::HEADER, &anon)?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post).with_headers(headers);
        let url = format!("{}/api/auth/validate", cfg.origin_url);
        let mut resp =
            crate::forward::send(Request::new_with_init(&url, &init)?, VALIDATE_TIMEOUT_MS).await?;
        let status = resp.status_code();
        let body = resp.text().await.unwrap_or_default();
        Ok(interpret_validate(status, &body, crate::time::now_unix()))
    }

    /// The token a logout request ends, from its headers or (small) JSON body, and the body
    /// to forward in place of the stream the edge had to read.
    pub async fn logout_token(
        req: &mut Request,
        url: &worker::Url,
    ) -> Result<(Option<SessionHash>, crate::forward::Body), EdgeError> {
        if let Some(t) = token(req, url) {
            return Ok((Some(SessionHash::of(&t)), crate::forward::Body::of(req)));
        }
        let small = req
            .headers()
            .get("content-length")
            .ok()
            .flatten()
            .and_then(|l| l.trim().parse::<usize>().ok())
            .is_some_and(|l| l <= MAX_LOGOUT_BODY);
        if !small {
            return Ok((None, crate::forward::Body::of(req)));
        }
        let body = req.bytes().await?;
        let session = token_in_body(&body).map(|t| SessionHash::of(&t));
        Ok((session, crate::forward::Body::Bytes(body)))
    }

    /// Forgets a session at the edge (after a logout): this isolate's entry at once, then
    /// the KV entry.
    pub async fn forget(env: &Env, session: &SessionHash) {
        crate::l1::forget(session);
        if let Some(kv) = kv(env) {
            if let Err(e) = kv.delete(&cache_key(session)).await {
                worker::console_warn!("session cache delete failed: {e}");
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{forget, logout_token, resolve, token, CacheWrite, BINDING};

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires_at_unix: i64) -> SessionRecord {
        SessionRecord {
            user: User {
                user_id: "1".into(),
                email: "a@example.com".into(),
                display_name: String::new(),
                roles: vec![],
            },
            expires_at: String::new(),
            expires_at_unix,
            is_active: true,
        }
    }

    #[test]
    fn the_cache_ttl_is_the_remaining_life_capped_and_never_under_a_minute() {
        assert_eq!(cache_ttl(&record(1_000 + 3_600), 1_000, 300), Some(300));
        assert_eq!(cache_ttl(&record(1_000 + 200), 1_000, 300), Some(200));
        assert_eq!(cache_ttl(&record(1_000 + 10), 1_000, 300), Some(60));
        assert_eq!(cache_ttl(&record(1_000), 1_000, 300), None);
        assert_eq!(cache_ttl(&record(500), 1_000, 300), None);
    }

    #[test]
    fn keys_hold_the_hash_and_negatives_are_prefixed() {
        let h = SessionHash::of("tok");
        assert_eq!(cache_key(&h), h.as_str());
        assert_eq!(negative_key(&h), format!("neg:{}", h.as_str()));
        assert!(!negative_key(&h).contains("tok"));
    }

    #[test]
    fn expiry_parses_rfc3339_and_naive_utc() {
        assert_eq!(
            parse_expires_at("2033-05-18T03:33:20Z"),
            Some(2_000_000_000)
        );
        assert_eq!(
            parse_expires_at("2033-05-18T05:33:20+02:00"),
            Some(2_000_000_000)
        );
        assert_eq!(
            parse_expires_at("2033-05-18T03:33:20.123456"),
            Some(2_000_000_000)
        );
        assert_eq!(parse_expires_at("tomorrow"), None);
    }

    #[test]
    fn a_valid_answer_becomes_a_record() {
        let body = r#"{"valid":true,"user":{"user_id":612345678901234567,"email":"ada@example.com","display_name":"Ada","roles":["user"]},"expires_at":"2033-05-18T03:33:20Z","message":"ok"}"#;
        match interpret_validate(200, body, 1_000) {
            Validation::Valid(r) => {
                assert_eq!(r.user.user_id, "612345678901234567");
                assert_eq!(r.user.roles, ["user"]);
                assert_eq!(r.expires_at_unix, 2_000_000_000);
                assert!(r.is_honoured(1_000));
            }
            other => panic!("{other:?}"),
        }
        let no_expiry = r#"{"valid":true,"user":{"user_id":"1"}}"#;
        match interpret_validate(200, no_expiry, 1_000) {
            Validation::Valid(r) => assert_eq!(r.expires_at_unix, 1_060),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_outages_and_garbage_are_never_valid() {
        let refused = r#"{"valid":false,"user":null,"expires_at":null,"message":"no"}"#;
        assert_eq!(interpret_validate(401, refused, 0), Validation::Invalid);
        assert_eq!(interpret_validate(200, refused, 0), Validation::Invalid);
        assert_eq!(interpret_validate(403, "", 0), Validation::Invalid);
        assert_eq!(interpret_validate(503, "", 0), Validation::Unavailable(503));
        assert_eq!(interpret_validate(504, "", 0), Validation::Unavailable(504));
        assert_eq!(interpret_validate(500, "", 0), Validation::Unavailable(502));
        assert_eq!(interpret_validate(302, "", 0), Validation::Unavailable(502));
        assert_eq!(
            interpret_validate(200, "<html>", 0),
            Validation::Unavailable(502)
        );
        assert_eq!(
            interpret_validate(200, r#"{"valid":true}"#, 0),
            Validation::Unavailable(502)
        );
    }

    #[test]
    fn a_logout_body_may_carry_the_token() {
        assert_eq!(
            token_in_body(br#"{"session_token":"abc"}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(token_in_body(br#"{"session_token":"a b"}"#), None);
        assert_eq!(token_in_body(b"{}"), None);
        assert_eq!(token_in_body(b"not json"), None);
    }
}
