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
//!   bounds its use); 401 with `WWW-Authenticate: Bearer error="invalid_token"` (the
//!   session itself is refused) → `neg:<hash>` for 60 s and 401; any other 401/403 (the
//!   origin refused the *edge*: an assertion that does not verify during a key rotation,
//!   a misconfigured key) → 502 `origin_refused_edge`, nothing cached, so a valid session
//!   is never remembered as refused; origin down → 502/503/504.
//!
//! Forgetting a session (`forget`): after a logout through the edge answered 204, and
//! after the origin answered a forwarded request for session S with a session-refused 401
//! (it revoked S: a logout at the origin directly, a session NoETL ended). The session the
//! origin ended is remembered as refused in this isolate and in KV (`neg:<hash>`) and its
//! positive entry is deleted; any other token the logout carried (a header token beside a
//! body token) is only dropped from both caches, so its next request is validated again.
//!
//! What closes the gap between isolates and locations is the origin, not these caches:
//! another isolate may serve its L1 entry for `EDGE_L1_TTL` seconds, and KV is eventually
//! consistent across Cloudflare locations (a location may serve its cached copy for up to
//! a minute). The origin refuses a revoked session even when it arrives as an edge
//! assertion, and its 401 makes that isolate forget the session at once — so a revoked
//! session is refused everywhere from its first request after the revocation.

use crate::config::MIN_SESSION_TTL_SECS;
use gateway_shared::session::{SessionHash, SessionRecord, User};
use serde::Deserialize;

/// How long a refused token is remembered (KV's minimum TTL).
pub const NEGATIVE_TTL_SECS: u64 = 60;
/// How long the origin may take to validate a session.
pub const VALIDATE_TIMEOUT_MS: u64 = 10_000;
/// The logout route, after which the tokens it carried are forgotten.
pub const LOGOUT_PATH: &str = "/api/auth/logout";

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
    /// Invalid, expired or logged out (a 401 with the session-refused challenge).
    Invalid,
    /// The origin refused the edge's call itself (401/403 without the session-refused
    /// challenge): says nothing about the session.
    EdgeRefused(u16),
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

/// Reads the origin's answer to `POST /api/auth/validate` (PROTOCOL.md §1), with its
/// `WWW-Authenticate` header.
///
/// Only a 401 that says the session itself was refused
/// ([`gateway_shared::session::is_session_refused`]) is `Invalid`; any other 401 or 403 is
/// `EdgeRefused` and is not cached. An answer the edge cannot read is `Unavailable(502)`,
/// never `Valid`. An `expires_at` that does not parse gives the record KV's minimum life,
/// so the session is re-checked within a minute rather than trusted indefinitely.
pub fn interpret_validate(
    status: u16,
    www_authenticate: Option<&str>,
    body: &str,
    now_unix: i64,
) -> Validation {
    match status {
        200 => {}
        401 if gateway_shared::session::is_session_refused(www_authenticate) => {
            return Validation::Invalid
        }
        401 | 403 => return Validation::EdgeRefused(status),
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

/// True for a JSON `Content-Type` (`application/json`, any parameters) — the only body
/// encoding the origin's auth routes read (anything else non-empty is 415 there).
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The tokens a logout request carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogoutTokens {
    /// The one the origin ends on 204: the JSON body's `session_token` when it has one,
    /// else the request's (`Authorization`, cookie, query — the origin's order).
    pub ended: Option<String>,
    /// Every other well-formed token the request carried (a header token beside a body
    /// token, a cookie beside a bearer): forgotten too, so the edge asks the origin about
    /// each again rather than trusting what it cached.
    pub others: Vec<String>,
}

/// Every token of a logout request, from its `Authorization`, `Cookie`, query,
/// `Content-Type` and whole body, mirroring how the origin's logout picks the one it ends.
pub fn logout_tokens(
    authorization: Option<&str>,
    cookie: Option<&str>,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> LogoutTokens {
    use gateway_shared::session::{bearer_token, cookie_token, extract_token, query_token};
    let body_token = is_json_content_type(content_type)
        .then(|| token_in_body(body))
        .flatten();
    let ended = body_token
        .clone()
        .or_else(|| extract_token(authorization, cookie, query));
    let mut others: Vec<String> = Vec::new();
    let carried = [
        authorization.and_then(bearer_token).map(str::to_owned),
        cookie.and_then(cookie_token).map(str::to_owned),
        query.and_then(query_token),
        body_token,
    ];
    for t in carried.into_iter().flatten() {
        if ended.as_ref() != Some(&t) && !others.contains(&t) {
            others.push(t);
        }
    }
    LogoutTokens { ended, others }
}

/// Whether a response the origin gave to a request asserted for a session says the
/// session was refused (revoked, expired, ended by NoETL): a 401 with the
/// session-refused challenge. The edge then forgets the session.
pub fn origin_refused_session(status: u16, www_authenticate: Option<&str>) -> bool {
    status == 401 && gateway_shared::session::is_session_refused(www_authenticate)
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::*;
    use crate::boundary::{self, Head};
    use crate::caller::Caller;
    use crate::config::EdgeConfig;
    use crate::error::EdgeError;
    use crate::l1::Entry;
    use gateway_shared::assertion;
    use worker::wasm_bindgen::JsValue;
    use worker::worker_sys::web_sys;
    use worker::{kv::KvStore, Env, Response};

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
    pub fn token(head: &Head, url: &boundary::RequestUrl<'_>) -> Option<String> {
        gateway_shared::session::extract_token(
            head.get("authorization"),
            head.get("cookie"),
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
            Validation::EdgeRefused(status) => Err(EdgeError::OriginRefusedEdge(format!(
                "validate answered {status} without the session-refused challenge: \
                 does the origin's EDGE_ASSERTION_PUBLIC_KEY match EDGE_ASSERTION_KEY?"
            ))),
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
        let mut headers = String::new();
        boundary::push(&mut headers, "authorization", &format!("Bearer {token}"));
        boundary::push(&mut headers, "x-request-id", rid);
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
        boundary::push(&mut headers, assertion::HEADER, &anon);
        let url = format!("{}/api/auth/validate", cfg.origin_url);
        let sent = crate::forward::send(
            &url,
            "POST",
            &headers,
            &JsValue::NULL,
            false,
            VALIDATE_TIMEOUT_MS,
        )
        .await?;
        let mut resp = Response::from(sent);
        let status = resp.status_code();
        let challenge = resp.headers().get("www-authenticate").ok().flatten();
        let body = resp.text().await.unwrap_or_default();
        Ok(interpret_validate(
            status,
            challenge.as_deref(),
            &body,
            crate::time::now_unix(),
        ))
    }

    /// Reads a logout request's whole body (bounded by `limit`: more → 413, as the
    /// origin would answer) and the tokens it carries, and returns the body to forward in
    /// place of the stream the edge read. Chunked bodies are read the same way.
    pub async fn logout_tokens_of(
        req: &web_sys::Request,
        head: &Head,
        url: &boundary::RequestUrl<'_>,
        limit: u64,
    ) -> Result<(LogoutTokens, crate::forward::Body), EdgeError> {
        let body = crate::forward::read_bounded(req, limit).await?;
        let tokens = super::logout_tokens(
            head.get("authorization"),
            head.get("cookie"),
            url.query(),
            head.get("content-type"),
            &body,
        );
        Ok((tokens, crate::forward::Body::Bytes(body)))
    }

    /// Forgets what the edge knows about a session. `refused`: the origin ended it (a
    /// logout it answered 204, a session-refused 401), so this isolate and KV remember it
    /// as refused (`neg:<hash>`, positive entry deleted); otherwise it is only dropped
    /// from both, and its next request is validated at the origin again. KV failures are
    /// logged: the origin still refuses a revoked session.
    pub async fn forget(env: &Env, cfg: &EdgeConfig, session: &SessionHash, refused: bool) {
        if refused {
            crate::l1::put(cfg.l1_ttl_secs, session, Entry::Refused);
        } else {
            crate::l1::forget(session);
        }
        let Some(kv) = kv(env) else { return };
        let delete = async {
            if let Err(e) = kv.delete(&cache_key(session)).await {
                worker::console_warn!("session cache delete failed: {e}");
            }
        };
        if refused {
            let negative = CacheWrite {
                kv: kv.clone(),
                key: negative_key(session),
                value: "1".into(),
                ttl: NEGATIVE_TTL_SECS,
            };
            futures_util::future::join(delete, negative.apply()).await;
        } else {
            delete.await;
        }
    }

    /// Forgets every token of a logout the origin answered 204 (see [`LogoutTokens`]).
    pub async fn forget_logout(env: &Env, cfg: &EdgeConfig, tokens: &LogoutTokens) {
        // At most four tokens (header, cookie, query, body): one after the other.
        let ended = tokens.ended.iter().map(|t| (t, true));
        let others = tokens.others.iter().map(|t| (t, false));
        for (token, refused) in ended.chain(others) {
            forget(env, cfg, &SessionHash::of(token), refused).await;
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{forget, forget_logout, logout_tokens_of, resolve, token, CacheWrite, BINDING};

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
        match interpret_validate(200, None, body, 1_000) {
            Validation::Valid(r) => {
                assert_eq!(r.user.user_id, "612345678901234567");
                assert_eq!(r.user.roles, ["user"]);
                assert_eq!(r.expires_at_unix, 2_000_000_000);
                assert!(r.is_honoured(1_000));
            }
            other => panic!("{other:?}"),
        }
        let no_expiry = r#"{"valid":true,"user":{"user_id":"1"}}"#;
        match interpret_validate(200, None, no_expiry, 1_000) {
            Validation::Valid(r) => assert_eq!(r.expires_at_unix, 1_060),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_outages_and_garbage_are_never_valid() {
        let refused = r#"{"valid":false,"user":null,"expires_at":null,"message":"no"}"#;
        let challenge = Some(gateway_shared::session::SESSION_REFUSED_CHALLENGE);
        assert_eq!(
            interpret_validate(401, challenge, refused, 0),
            Validation::Invalid
        );
        assert_eq!(
            interpret_validate(200, None, refused, 0),
            Validation::Invalid
        );
        assert_eq!(
            interpret_validate(503, None, "", 0),
            Validation::Unavailable(503)
        );
        assert_eq!(
            interpret_validate(504, None, "", 0),
            Validation::Unavailable(504)
        );
        assert_eq!(
            interpret_validate(500, None, "", 0),
            Validation::Unavailable(502)
        );
        assert_eq!(
            interpret_validate(302, None, "", 0),
            Validation::Unavailable(502)
        );
        assert_eq!(
            interpret_validate(200, None, "<html>", 0),
            Validation::Unavailable(502)
        );
        assert_eq!(
            interpret_validate(200, None, r#"{"valid":true}"#, 0),
            Validation::Unavailable(502)
        );
    }

    #[test]
    fn a_401_or_403_that_is_not_about_the_session_is_never_invalid() {
        // An assertion the origin does not trust (key rotation, wrong key): 401 without
        // the session-refused challenge. A valid session must not be cached as refused.
        let assertion = r#"{"error":{"code":"invalid_signature","message":"no"}}"#;
        assert_eq!(
            interpret_validate(401, None, assertion, 0),
            Validation::EdgeRefused(401)
        );
        assert_eq!(
            interpret_validate(401, Some("Bearer error=\"invalid_request\""), assertion, 0),
            Validation::EdgeRefused(401)
        );
        assert_eq!(
            interpret_validate(
                403,
                Some(gateway_shared::session::SESSION_REFUSED_CHALLENGE),
                "",
                0
            ),
            Validation::EdgeRefused(403)
        );
    }

    #[test]
    fn only_a_session_refused_401_makes_the_edge_forget_a_forwarded_session() {
        let challenge = Some(gateway_shared::session::SESSION_REFUSED_CHALLENGE);
        assert!(origin_refused_session(401, challenge));
        assert!(!origin_refused_session(401, None));
        assert!(!origin_refused_session(403, challenge));
        assert!(!origin_refused_session(200, challenge));
    }

    #[test]
    fn a_logout_forgets_every_token_it_carries_and_ends_the_one_the_origin_ends() {
        let json = Some("application/json; charset=utf-8");
        let body = br#"{"session_token":"body-token"}"#;
        // Body and header differ: the origin ends the body's; the header's is forgotten.
        let t = logout_tokens(Some("Bearer header-token"), None, None, json, body);
        assert_eq!(t.ended.as_deref(), Some("body-token"));
        assert_eq!(t.others, ["header-token"]);
        // Every place at once, duplicates once.
        let t = logout_tokens(
            Some("Bearer a"),
            Some("x=1; session_token=b"),
            Some("session_token=c&y=2"),
            json,
            br#"{"session_token":"a"}"#,
        );
        assert_eq!(t.ended.as_deref(), Some("a"));
        assert_eq!(t.others, ["b", "c"]);
        // No body token: the request's first, in the origin's order.
        let t = logout_tokens(
            None,
            Some("session_token=b"),
            Some("session_token=c"),
            None,
            b"",
        );
        assert_eq!(t.ended.as_deref(), Some("b"));
        assert_eq!(t.others, ["c"]);
        // A body the origin would not read as JSON names no token.
        let t = logout_tokens(None, None, None, Some("text/plain"), body);
        assert_eq!(t, LogoutTokens::default());
        let t = logout_tokens(None, None, None, None, body);
        assert_eq!(t, LogoutTokens::default());
        // A body of any size the edge read whole (the origin allows 64 KiB).
        let mut big = br#"{"pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', 40 * 1024));
        big.extend(br#"","session_token":"late-token"}"#);
        let t = logout_tokens(None, None, None, json, &big);
        assert_eq!(t.ended.as_deref(), Some("late-token"));
    }

    #[test]
    fn json_content_types_are_recognised_with_parameters() {
        assert!(is_json_content_type(Some("application/json")));
        assert!(is_json_content_type(Some(
            "Application/JSON ; charset=utf-8"
        )));
        assert!(!is_json_content_type(Some(
            "application/x-www-form-urlencoded"
        )));
        assert!(!is_json_content_type(None));
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
