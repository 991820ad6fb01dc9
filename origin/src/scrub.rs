//! Nothing secret leaves: NoETL's JSON without what the gateway put into workloads
//! (`callback_token`, `gateway_url`, `request_id`) and without users' auth tokens (session
//! tokens, Auth0 ID, access and refresh tokens, `authorization` values), before any of it
//! reaches a client (PROTOCOL.md §5).
//!
//! NoETL keeps a workload verbatim and returns it: in an execution record (`workload`), in
//! the context of its start event, and inside step results and errors that rendered it —
//! sometimes as a JSON document encoded in a string (the Python server's `context` and
//! `result` columns, the Rust server's text `error`). So the rule is applied by key at any
//! depth, inside strings that hold JSON too, and then by value: every string that contains
//! a removed value (or one the gateway always knows, its callback URL, or the callback
//! token of a removed request id) has that value replaced by `[redacted]`. That catches a
//! token rendered into an error message or a header after the workload key that carried
//! it is gone.
//!
//! The pure part is [`Scrubber`]; [`scrubbed_body`] is the proxy's use of it on a streamed
//! upstream body (read whole, within the proxy's byte limit).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use gateway_shared::frames::{PlaybookResult, ResultError};
use serde_json::{json, Value};

use crate::error::AppError;
use crate::noetl::NoetlError;
use crate::requests::CallbackTokens;

/// Keys removed wherever they occur, compared without case, `_` or `-` (so `sessionToken`
/// and `Session-Token` are the same key as `session_token`).
pub const SECRET_KEYS: [&str; 10] = [
    "callback_token",
    "gateway_url",
    "request_id",
    "session_token",
    "auth0_token",
    "auth0_refresh_token",
    "id_token",
    "access_token",
    "refresh_token",
    "authorization",
];

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Values shorter than this are removed with their key but not searched for elsewhere
/// (a short value would match innocent text).
const MIN_SECRET_LEN: usize = 8;

/// How many levels of JSON-in-a-string are opened.
const MAX_STRING_NESTING: usize = 4;

/// [`SECRET_KEYS`] as they are compared: lower case, without `_` and `-`.
const NORMALIZED_KEYS: [&str; 10] = [
    "callbacktoken",
    "gatewayurl",
    "requestid",
    "sessiontoken",
    "auth0token",
    "auth0refreshtoken",
    "idtoken",
    "accesstoken",
    "refreshtoken",
    "authorization",
];

/// True if `key`, compared without case, `_` or `-`, is `normalized` (no allocation: this
/// runs for every key of every document).
fn key_is(key: &str, normalized: &str) -> bool {
    key.bytes()
        .filter(|b| *b != b'_' && *b != b'-')
        .map(|b| b.to_ascii_lowercase())
        .eq(normalized.bytes())
}

/// True if `key` names a value that must not leave the gateway.
pub fn is_secret_key(key: &str) -> bool {
    NORMALIZED_KEYS.iter().any(|n| key_is(key, n))
}

/// Derives the callback token of a request id, so a token is redacted even where only its
/// request id was seen.
type Derive = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Rewrites JSON documents without secret keys and values. Cheap to clone.
#[derive(Clone, Default)]
pub struct Scrubber {
    known: Vec<String>,
    derive: Option<Derive>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("known", &self.known.len())
            .field("derives_tokens", &self.derive.is_some())
            .finish()
    }
}

impl Scrubber {
    /// A scrubber that also redacts `known` values wherever they occur.
    pub fn new(known: impl IntoIterator<Item = String>) -> Self {
        Self {
            known: known
                .into_iter()
                .filter(|k| k.len() >= MIN_SECRET_LEN)
                .collect(),
            derive: None,
        }
    }

    /// A scrubber that also redacts the callback token of every request id it removes.
    pub fn deriving_tokens(tokens: CallbackTokens) -> Self {
        Self {
            known: Vec::new(),
            derive: Some(Arc::new(move |request_id: &str| {
                tokens.token_for(request_id)
            })),
        }
    }

    /// The gateway's scrubber: [`Self::deriving_tokens`], and its callback URL is always
    /// redacted.
    pub fn for_gateway(callback_url: String, tokens: CallbackTokens) -> Self {
        Self::deriving_tokens(tokens).also(callback_url)
    }

    /// The same scrubber, also redacting `value` wherever it occurs.
    pub fn also(mut self, value: String) -> Self {
        if value.len() >= MIN_SECRET_LEN {
            self.known.push(value);
        }
        self
    }

    /// Scrubs `value` in place; true if anything was removed or redacted.
    pub fn scrub(&self, value: &mut Value) -> bool {
        let mut found = self.known.clone();
        let removed = self.remove(value, &mut found, 0);
        found.retain(|s| s.len() >= MIN_SECRET_LEN);
        // Longest first, so a value that contains another is replaced whole.
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        found.dedup();
        let redacted = redact(value, &found);
        removed || redacted
    }

    /// Redacts the values this scrubber knows from free text (a progress message).
    pub fn redact_text(&self, text: &mut String) {
        let mut known = self.known.clone();
        known.sort_by_key(|s| std::cmp::Reverse(s.len()));
        redact_str(text, &known);
    }

    /// Scrubs a JSON document: `Ok(None)` if it had nothing to remove (the caller keeps
    /// the original bytes), `Ok(Some(bytes))` with the rewritten document, `Err` if the
    /// bytes are not JSON.
    pub fn scrub_json(&self, body: &[u8]) -> Result<Option<Vec<u8>>, serde_json::Error> {
        let mut v: Value = serde_json::from_slice(body)?;
        if !self.scrub(&mut v) {
            return Ok(None);
        }
        serde_json::to_vec(&v).map(Some)
    }

    /// A playbook's result as its client sees it: `data`, `error.data` and the error's
    /// text scrubbed together (a value removed from the data is redacted from the message
    /// too). The result's own `requestId` is the client's and stays.
    pub fn scrub_result(&self, result: &mut PlaybookResult) {
        let error = result.error.take();
        let mut v = json!({
            "data": result.data.take(),
            "error": error.as_ref().map(|e| json!({"data": e.data, "code": e.code, "message": e.message})),
        });
        self.scrub(&mut v);
        let text = |v: &Value| v.as_str().map(str::to_owned);
        result.data = Some(v["data"].take()).filter(|d| !d.is_null());
        result.error = error.map(|_| ResultError {
            code: text(&v["error"]["code"]),
            message: text(&v["error"]["message"]),
            data: Some(v["error"]["data"].take()).filter(|d| !d.is_null()),
        });
    }

    /// Removes secret keys, collecting the string values they held into `found`.
    fn remove(&self, value: &mut Value, found: &mut Vec<String>, nesting: usize) -> bool {
        match value {
            Value::Object(map) => {
                let secret: Vec<String> =
                    map.keys().filter(|k| is_secret_key(k)).cloned().collect();
                let mut changed = !secret.is_empty();
                for key in secret {
                    if let Some(old) = map.remove(&key) {
                        let request_id = key_is(&key, "requestid");
                        collect(&old, found, self.derive.as_ref().filter(|_| request_id));
                    }
                }
                for child in map.values_mut() {
                    changed |= self.remove(child, found, nesting);
                }
                changed
            }
            Value::Array(items) => items
                .iter_mut()
                .fold(false, |changed, i| self.remove(i, found, nesting) | changed),
            Value::String(s) if nesting < MAX_STRING_NESTING && holds_json(s) => {
                let Ok(mut inner) = serde_json::from_str::<Value>(s) else {
                    return false;
                };
                if !self.remove(&mut inner, found, nesting + 1) {
                    return false;
                }
                *s = inner.to_string();
                true
            }
            _ => false,
        }
    }
}

/// True if a string looks like an encoded JSON object or array.
fn holds_json(s: &str) -> bool {
    matches!(s.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

/// Every string inside a removed value (numbers are not hunted: their text would match
/// innocent ids); with `derive`, also the callback token of each.
fn collect(value: &Value, found: &mut Vec<String>, derive: Option<&Derive>) {
    match value {
        Value::String(s) => {
            if let Some(d) = derive {
                found.push(d(s));
            }
            found.push(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|i| collect(i, found, derive)),
        Value::Object(map) => map.values().for_each(|v| collect(v, found, derive)),
        _ => {}
    }
}

/// Replaces every occurrence of a `secrets` value in strings and keys.
fn redact(value: &mut Value, secrets: &[String]) -> bool {
    if secrets.is_empty() {
        return false;
    }
    match value {
        Value::String(s) => redact_str(s, secrets),
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| redact(i, secrets) | changed),
        Value::Object(map) => {
            let mut changed = false;
            if map.keys().any(|k| contains_any(k, secrets)) {
                let old = std::mem::take(map);
                for (mut k, v) in old {
                    redact_str(&mut k, secrets);
                    map.insert(k, v);
                }
                changed = true;
            }
            for v in map.values_mut() {
                changed |= redact(v, secrets);
            }
            changed
        }
        _ => false,
    }
}

fn contains_any(s: &str, secrets: &[String]) -> bool {
    secrets.iter().any(|x| s.contains(x.as_str()))
}

fn redact_str(s: &mut String, secrets: &[String]) -> bool {
    if !contains_any(s, secrets) {
        return false;
    }
    let mut out = std::mem::take(s);
    for x in secrets {
        if out.contains(x.as_str()) {
            out = out.replace(x.as_str(), REDACTED);
        }
    }
    *s = out;
    true
}

/// True for a JSON media type (`application/json`, or any `+json` such as
/// `application/problem+json`), parameters allowed: the bodies [`scrubbed_body`] rewrites.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| m == "application/json" || m.ends_with("+json"))
}

/// Asks NoETL for an unencoded answer: a compressed JSON body could not be checked.
pub fn ask_for_identity(upstream_request: &mut HeaderMap) {
    upstream_request.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// Reads an upstream JSON body whole (at most `limit` bytes, pauses of at most `idle`) and
/// returns it scrubbed. Over the limit → the proxy's 502 for an oversized answer; a pause
/// → 504; a body that is compressed or not JSON → 502 (never the unchecked bytes). An
/// empty body (HEAD, 204) passes as it is.
pub async fn scrubbed_body<S>(
    upstream: &HeaderMap,
    mut body: S,
    limit: u64,
    idle: Duration,
    scrubber: &Scrubber,
) -> Result<Bytes, AppError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    let bad = |m: String| AppError::Noetl(NoetlError::BadResponse(m));
    let encoded = upstream
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
    if encoded {
        return Err(bad(
            "NoETL sent compressed JSON, which the gateway cannot check".into(),
        ));
    }
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(AppError::Noetl(NoetlError::Timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(bad(format!("upstream body: {e}"))),
            Ok(Some(Ok(chunk))) => {
                if (buf.len() + chunk.len()) as u64 > limit {
                    return Err(bad(format!("upstream body larger than {limit} bytes")));
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    let bytes = buf.freeze();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(bytes);
    }
    match scrubber.scrub_json(&bytes) {
        Ok(None) => Ok(bytes),
        Ok(Some(rewritten)) => Ok(Bytes::from(rewritten)),
        Err(_) => Err(bad(
            "NoETL sent a JSON content type with a body that is not JSON".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plain() -> Scrubber {
        Scrubber::default()
    }

    #[test]
    fn the_compared_keys_are_the_documented_ones() {
        for (key, normalized) in SECRET_KEYS.iter().zip(NORMALIZED_KEYS) {
            assert!(key_is(key, normalized), "{key} / {normalized}");
            assert!(is_secret_key(&key.to_ascii_uppercase().replace('_', "-")));
        }
        for innocent in [
            "x-request-id",
            "requests",
            "token",
            "session",
            "id",
            "url",
            "",
        ] {
            assert!(!is_secret_key(innocent), "{innocent}");
        }
    }

    #[test]
    fn injected_keys_and_auth_tokens_go_at_any_depth() {
        let mut v = json!({
            "execution_id": 612345678901234567u64,
            "path": "demo/echo",
            "workload": {
                "greeting": "hi",
                "request_id": "0123456789abcdef0123456789abcdef",
                "gateway_url": "http://gateway-internal:8091",
                "callback_token": "c0ffee00c0ffee00c0ffee00c0ffee00",
            },
            "events": [{"result": {"session_token": "sess-abcdefgh", "user": {"id": 1}}},
                       {"context": {"workload": {"auth0_token": "eyJhbGciOi.x.y", "AuthToken": 1}}}],
            "headers": {"Authorization": "Bearer abcdefghijkl"},
            "camel": {"sessionToken": "s", "ID-Token": "t", "refresh_token": "r", "access_token": "a",
                      "auth0_refresh_token": "rr"},
        });
        assert!(plain().scrub(&mut v));
        assert_eq!(
            v,
            json!({
                "execution_id": 612345678901234567u64,
                "path": "demo/echo",
                "workload": {"greeting": "hi"},
                "events": [{"result": {"user": {"id": 1}}},
                           {"context": {"workload": {"AuthToken": 1}}}],
                "headers": {},
                "camel": {},
            })
        );
    }

    #[test]
    fn json_held_in_a_string_is_scrubbed_and_stays_a_string() {
        let inner = json!({"workload": {"callback_token": "tok-0123456789", "x": 1}}).to_string();
        let mut v = json!({"context": inner, "note": "[not json", "list": "[1,2]"});
        assert!(plain().scrub(&mut v));
        let context: Value = serde_json::from_str(v["context"].as_str().unwrap()).unwrap();
        assert_eq!(context, json!({"workload": {"x": 1}}));
        assert_eq!(v["note"], "[not json");
        assert_eq!(
            v["list"], "[1,2]",
            "a string without secrets is left byte for byte"
        );
    }

    #[test]
    fn a_removed_value_is_redacted_wherever_else_it_appears() {
        let token = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
        let mut v = json!({
            "workload": {"auth0_token": token},
            "events": [{"error": format!("Authentication failed | Context: {{\"t\": \"{token}\"}}")},
                       {"result": {"echo": token}}],
        });
        plain().scrub(&mut v);
        let text = v.to_string();
        assert!(!text.contains(token), "{text}");
        assert!(text.contains("Authentication failed | Context"), "{text}");
        assert_eq!(v["events"][1]["result"]["echo"], REDACTED);
    }

    #[test]
    fn the_gateways_own_values_are_redacted_even_without_their_keys() {
        let tokens = CallbackTokens::new(Some("secret"));
        let request_id = "00112233445566778899aabbccddeeff";
        let token = tokens.token_for(request_id);
        let s = Scrubber::for_gateway("http://gw-internal:8091".into(), tokens);
        // Only the request id is in a removable place; its token shows up elsewhere.
        let mut v = json!({
            "workload": {"request_id": request_id},
            "events": [{"error": format!("POST http://gw-internal:8091/api/internal/callback with Bearer {token}: 500")}],
        });
        assert!(s.scrub(&mut v));
        let text = v.to_string();
        assert!(
            !text.contains(&token) && !text.contains("gw-internal"),
            "{text}"
        );
        // Nothing secret: nothing changes.
        let mut clean = json!({"status": "COMPLETED", "progress": {"total_steps": 3}});
        assert!(!s.scrub(&mut clean));
        assert_eq!(
            s.scrub_json(br#"{"b":1, "a":[1,2.5]}"#).unwrap(),
            None,
            "an unchanged document keeps its own bytes"
        );
        assert!(s.scrub_json(b"{nope").is_err());
    }

    #[test]
    fn a_result_keeps_its_request_id_and_loses_the_workloads_secrets() {
        let tokens = CallbackTokens::new(Some("k"));
        let rid = "00112233445566778899aabbccddeeff";
        let s = Scrubber::for_gateway("http://gw-internal:8091".into(), tokens.clone())
            .also(tokens.token_for(rid));
        let mut ok = PlaybookResult {
            request_id: rid.into(),
            execution_id: Some("1".into()),
            status: "COMPLETED".into(),
            data: Some(json!({"workload": {"greeting": "hi", "request_id": rid,
                "callback_token": tokens.token_for(rid), "gateway_url": "http://gw-internal:8091"}})),
            error: None,
        };
        s.scrub_result(&mut ok);
        assert_eq!(ok.request_id, rid);
        assert_eq!(ok.data, Some(json!({"workload": {"greeting": "hi"}})));
        assert_eq!(ok.error, None);
        let mut failed = PlaybookResult {
            request_id: rid.into(),
            execution_id: None,
            status: "FAILED".into(),
            data: None,
            error: Some(ResultError {
                code: Some("STEP_FAILED".into()),
                message: Some(format!("callback with {} failed", tokens.token_for(rid))),
                data: Some(json!({"session_token": "sess-0123456789"})),
            }),
        };
        s.scrub_result(&mut failed);
        let e = failed.error.expect("still an error");
        assert_eq!(e.code.as_deref(), Some("STEP_FAILED"));
        assert_eq!(
            e.message,
            Some(format!("callback with {REDACTED} failed")),
            "the request's own token is known"
        );
        assert_eq!(e.data, Some(json!({})));
        assert_eq!(failed.data, None);
    }

    #[test]
    fn known_values_are_redacted_from_free_text() {
        let s = Scrubber::new(["http://gw-internal:8091".to_owned()]).also("tok-0123456789".into());
        let mut m =
            "stage 1 done; next POST http://gw-internal:8091/x with tok-0123456789".to_owned();
        s.redact_text(&mut m);
        assert_eq!(
            m,
            format!("stage 1 done; next POST {REDACTED}/x with {REDACTED}")
        );
    }

    #[test]
    fn short_values_are_removed_with_their_key_but_not_hunted() {
        let mut v = json!({"session_token": "x", "step": "x marks the spot"});
        plain().scrub(&mut v);
        assert_eq!(v, json!({"step": "x marks the spot"}));
    }

    #[test]
    fn json_media_types_are_recognised() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_json(&m)
        };
        assert!(h("application/json"));
        assert!(h("Application/JSON; charset=utf-8"));
        assert!(h("application/problem+json"));
        assert!(!h("text/event-stream"));
        assert!(!h("text/plain"));
        assert!(!is_json(&HeaderMap::new()));
    }

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn the_proxy_body_is_scrubbed_bounded_and_never_passed_unchecked() {
        let s = plain();
        let idle = Duration::from_secs(5);
        let h = HeaderMap::new();
        let out = scrubbed_body(
            &h,
            chunks(&[br#"{"workload":{"callback_"#, br#"token":"t","a":1}}"#]),
            1000,
            idle,
            &s,
        )
        .await
        .unwrap();
        assert_eq!(&out[..], br#"{"workload":{"a":1}}"#);
        let err = scrubbed_body(&h, chunks(&[b"{\"a\":", b"[1,2,3]}"]), 8, idle, &s)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_GATEWAY);
        let err = scrubbed_body(&h, chunks(&[b"{\"callback_token\":\"t\""]), 1000, idle, &s)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_GATEWAY);
        assert_eq!(err.code(), "noetl_bad_response");
        let mut gz = HeaderMap::new();
        gz.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let err = scrubbed_body(&gz, chunks(&[b"\x1f\x8b"]), 1000, idle, &s)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_GATEWAY);
        let empty = scrubbed_body(&h, chunks(&[]), 1000, idle, &s)
            .await
            .unwrap();
        assert!(empty.is_empty());
        let stalled = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        let err = scrubbed_body(&h, stalled, 1000, Duration::from_millis(20), &s)
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::GATEWAY_TIMEOUT);
    }

    /// Any JSON without secret-looking keys.
    fn plain_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,8}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Plants `secrets` (key, value) into `doc` at positions chosen by `seeds`, some of
    /// them inside a JSON-encoded string.
    fn plant(doc: Value, secrets: &[(String, String)], seeds: &[u8]) -> Value {
        let mut out = json!({"doc": doc});
        for (i, (key, value)) in secrets.iter().enumerate() {
            let seed = seeds.get(i).copied().unwrap_or(0);
            let carrier = json!({ key.clone(): value.clone(), "keep": "me" });
            let slot = format!("s{i}");
            out[&slot] = match seed % 4 {
                0 => carrier,
                1 => Value::String(carrier.to_string()),
                2 => json!([{"nested": carrier}]),
                _ => json!({"text": Value::String(json!({"deeper": carrier}).to_string())}),
            };
            if seed % 3 == 0 {
                // The same value again under an innocent key, in free text.
                out[format!("echo{i}")] = Value::String(format!("rendered: {value} here"));
            }
        }
        out
    }

    fn secret_key() -> impl Strategy<Value = String> {
        (0..SECRET_KEYS.len(), any::<bool>()).prop_map(|(i, upper)| {
            let k = SECRET_KEYS[i];
            if upper {
                k.to_ascii_uppercase()
            } else {
                k.to_owned()
            }
        })
    }

    proptest! {
        #[test]
        fn no_removed_value_survives_anywhere(
            doc in plain_json(),
            secrets in prop::collection::vec((secret_key(), "[A-Za-z0-9]{16,40}"), 1..6),
            seeds in prop::collection::vec(any::<u8>(), 6),
        ) {
            let mut v = plant(doc, &secrets, &seeds);
            prop_assert!(plain().scrub(&mut v));
            let text = v.to_string();
            for (_, value) in &secrets {
                prop_assert!(!text.contains(value.as_str()), "{} in {}", value, text);
            }
            prop_assert!(text.contains("keep"), "innocent keys stay: {}", text);
            let bytes = serde_json::to_vec(&plant(json!(null), &secrets, &seeds)).unwrap();
            let rewritten = plain().scrub_json(&bytes).unwrap().expect("something removed");
            let rewritten = String::from_utf8(rewritten).unwrap();
            for (_, value) in &secrets {
                prop_assert!(!rewritten.contains(value.as_str()));
            }
        }

        #[test]
        fn documents_without_secrets_are_left_alone(doc in plain_json()) {
            let mut v = doc.clone();
            prop_assert!(!plain().scrub(&mut v));
            prop_assert_eq!(v, doc);
        }
    }
}
