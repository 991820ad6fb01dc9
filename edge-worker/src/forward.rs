//! The forward step: the request goes to the origin, and the origin's answer comes back,
//! streaming both ways.
//!
//! - Bodies are never buffered: the outbound request gets the client's body stream, and
//!   the client gets the origin's body stream (an SSE response reaches the client frame by
//!   frame; `reply::finish` rebuilds the response around the same stream).
//! - Hop-by-hop headers (and those the `Connection` header names) are dropped, except the
//!   `Upgrade`/`Connection` pair of a WebSocket handshake, which Workers proxy natively.
//! - Client-sent identity headers (`x-user-*`, `x-noetl-*`, `x-gateway-*`,
//!   `x-forwarded-*`, `forwarded`, `x-real-ip`, `cf-*`: the shared
//!   [`is_client_identity_header`] rule) are dropped: only the edge says who is calling, in its
//!   signed `x-gateway-assertion`, and who the client's address is, in `x-forwarded-for`.
//! - Method-override and URL-rewrite headers (`x-http-method-override`, `x-original-url`, …:
//!   the shared [`is_request_override_header`] rule) are dropped: the route table decided on
//!   the request's own method and path.
//! - `x-request-id` is the edge's (accepted or minted). `traceparent` is the edge's too:
//!   the client's valid trace continued with the edge's span as parent, else a new trace
//!   (`crate::ids`, `gateway_shared::trace`); the client's `tracestate` goes with a
//!   continued trace only.
//! - `Authorization` and cookies pass through: the origin needs the token for NoETL's
//!   own access checks, and binds the assertion to it (`sid`).
//! - Redirects are the client's business (`redirect: manual`).

use gateway_shared::headers::{is_client_identity_header, is_request_override_header};

/// How long the origin may take to send its response headers. Bodies (SSE streams) are
/// not bounded here: once the headers arrived, the stream lives as long as both ends.
pub const FORWARD_TIMEOUT_MS: u64 = 60_000;

/// The origin URL for a request path and query: `origin` without its trailing `/`,
/// then the path, then `?query` when there is one.
pub fn origin_target(origin: &str, path: &str, query: Option<&str>) -> String {
    let base = origin.trim_end_matches('/');
    match query {
        Some(q) if !q.is_empty() => format!("{base}{path}?{q}"),
        _ => format!("{base}{path}"),
    }
}

/// The most of an oversized chunked body the edge reads (and drops) before it answers
/// 413, so that a client still sending it gets the answer rather than a reset.
pub const DRAIN_MAX: u64 = 16 * 1024 * 1024;

/// Whether a request of `method` may carry a body to the origin. The Fetch API refuses a
/// GET or HEAD request with one (a runtime error, which was a 500): such a body is
/// dropped, as the origin's GET and HEAD routes ignore it anyway.
pub fn carries_body(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD")
}

/// The methods the edge forwards, in their canonical spelling; `None` → 405.
pub fn forwardable_method(method: &str) -> Option<&'static str> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        .into_iter()
        .find(|m| *m == method)
}

const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// True for headers that describe one connection, not the message (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The header names listed in a `Connection` value (also hop-by-hop), lower-cased.
pub fn connection_tokens(connection: Option<&str>) -> Vec<String> {
    connection
        .unwrap_or_default()
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// True for a WebSocket handshake (`Upgrade: websocket`).
pub fn is_websocket_upgrade(upgrade: Option<&str>) -> bool {
    upgrade.is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
}

/// Whether a client request header is copied to the origin request.
pub fn keep_request_header(name: &str, connection: &[String], websocket: bool) -> bool {
    // The runtime gives names lower-case: a copy only for one that is not.
    let n: std::borrow::Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        name.to_ascii_lowercase().into()
    } else {
        name.into()
    };
    let n = n.as_ref();
    if websocket && (n == "upgrade" || n == "connection") {
        return true;
    }
    !(is_hop_by_hop(n)
        || connection.iter().any(|t| t == n)
        || is_client_identity_header(n)
        || is_request_override_header(n)
        || n == "host"
        || n == "x-request-id"
        || n == gateway_shared::trace::HEADER)
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::*;
    use crate::boundary::{self, Fetched, Head};
    use crate::caller::Caller;
    use crate::config::EdgeConfig;
    use crate::error::EdgeError;
    use crate::sign::Signing;
    use gateway_shared::assertion;
    use gateway_shared::trace::{self, TraceParent};
    use worker::wasm_bindgen::JsValue;
    use worker::worker_sys::web_sys;

    /// What goes to the origin as the request body.
    pub enum Body {
        /// The client's body, streamed through (or none, for GET and friends).
        Stream(Option<JsValue>),
        /// A body the edge had to read first (a logout body).
        Bytes(Vec<u8>),
    }

    impl Body {
        fn into_js(self) -> JsValue {
            match self {
                Body::Stream(s) => s.unwrap_or(JsValue::NULL),
                Body::Bytes(b) if b.is_empty() => JsValue::NULL,
                Body::Bytes(b) => worker::js_sys::Uint8Array::from(b.as_slice()).into(),
            }
        }
    }

    /// One forwarded request.
    pub struct Forward<'a> {
        /// The client's request head (its headers are filtered from it).
        pub head: &'a Head,
        /// Its URL (path and query go to the origin unchanged).
        pub url: &'a boundary::RequestUrl<'a>,
        /// The canonical method.
        pub method: &'static str,
        /// The body to send.
        pub body: Body,
        /// Who the edge says is calling.
        pub caller: &'a Caller,
        /// The request id.
        pub rid: &'a str,
        /// The client's address, for `x-forwarded-for`.
        pub client_ip: Option<&'a str>,
        /// The trace to send (`traceparent`), with the edge's span as parent.
        pub trace: &'a TraceParent,
        /// Whether the client's trace was continued (its `tracestate` goes along).
        pub trace_continued: bool,
        /// The request's arrival, seconds since the epoch (the assertion's `iat`).
        pub now_unix: i64,
    }

    /// Reads a request's whole body, refusing it with 413 once it passes `limit` bytes
    /// (counted as received: chunked bodies have no length to check up front). Past the
    /// limit nothing is kept, but the rest is read and dropped — up to [`DRAIN_MAX`] bytes
    /// in all — before the 413 is sent: a server that answers and closes while the client
    /// is still sending makes the client's TCP stack reset the connection, and the client
    /// then sees a lost connection instead of the answer.
    pub async fn read_bounded(req: &web_sys::Request, limit: u64) -> Result<Vec<u8>, EdgeError> {
        use futures_util::StreamExt;
        let mut body = Vec::new();
        if req.body().is_none() {
            return Ok(body);
        }
        // Rare paths only (a logout, a chunked body): workers-rs' byte stream.
        // `Clone::clone`: the JS reference, not `Request.clone()` (which tees the body).
        let mut stream = worker::Request::from(Clone::clone(req)).stream()?;
        let mut seen: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > limit {
                if seen > DRAIN_MAX {
                    break;
                }
                continue;
            }
            body.extend_from_slice(&chunk);
        }
        if seen > limit {
            return Err(EdgeError::PayloadTooLarge { limit });
        }
        Ok(body)
    }

    /// The body to forward. A body without `Content-Length` (chunked) is read first,
    /// bounded by the route's `limit`: the edge answers 413 itself instead of streaming
    /// into an origin that cuts the upload off at its limit and closes (which surfaces as
    /// a lost connection, not as the origin's 413). Declared bodies were checked against
    /// `limit` already and stream through.
    pub async fn body_for(
        req: &web_sys::Request,
        head: &Head,
        method: &str,
        limit: u64,
    ) -> Result<Body, EdgeError> {
        let declared = head.get("content-length").is_some();
        let stream = req.body();
        if declared || !carries_body(method) || stream.is_none() {
            return Ok(Body::Stream(stream.map(Into::into)));
        }
        Ok(Body::Bytes(read_bounded(req, limit).await?))
    }

    /// The headers the origin gets, as one list for [`boundary::fetch_origin`]: the
    /// client's minus the dropped ones, then the edge's own.
    fn outgoing_headers(f: &Forward<'_>, signed: Option<&str>) -> String {
        let websocket = is_websocket_upgrade(f.head.get("upgrade"));
        let connection = connection_tokens(f.head.get("connection"));
        let mut list = String::with_capacity(1024);
        for (name, value) in f.head.headers() {
            if keep_request_header(name, &connection, websocket)
                && (f.trace_continued || name != trace::STATE_HEADER)
            {
                boundary::push(&mut list, name, value);
            }
        }
        // None of these is kept from the client (`keep_request_header`), so appending
        // them is setting them.
        boundary::push(&mut list, "x-request-id", f.rid);
        boundary::push(&mut list, trace::HEADER, &f.trace.to_string());
        if let Some(ip) = f.client_ip {
            boundary::push(&mut list, "x-forwarded-for", ip);
        }
        if let Some(signed) = signed {
            boundary::push(&mut list, assertion::HEADER, signed);
        }
        list
    }

    /// Sends the request to the origin and returns its response (body still streaming).
    pub async fn forward(
        cfg: &EdgeConfig,
        mut f: Forward<'_>,
    ) -> Result<web_sys::Response, EdgeError> {
        let signing_failed = |e| EdgeError::Internal(format!("signing the assertion failed: {e}"));
        let signing = crate::sign::prepare(f.caller, f.rid, &cfg.signing_key, f.now_unix)
            .await
            .map_err(signing_failed)?;
        let body = if carries_body(f.method) {
            std::mem::replace(&mut f.body, Body::Stream(None)).into_js()
        } else {
            JsValue::NULL
        };
        let target = origin_target(&cfg.origin_url, f.url.path(), f.url.query());
        let fetched = match &signing {
            Signing::WebCrypto { key, input } => {
                let sign = boundary::SignOnTheWay {
                    key,
                    input,
                    name: assertion::HEADER,
                };
                let list = outgoing_headers(&f, None);
                let first = boundary::fetch_origin(
                    &target,
                    f.method,
                    &list,
                    &body,
                    true,
                    FORWARD_TIMEOUT_MS,
                    Some(sign),
                );
                match first.await {
                    // Nothing was sent (the body is untouched): sign in Rust from now on.
                    Fetched::SignFailed(e) => {
                        crate::sign::sign_failed(&e);
                        let signed = f
                            .caller
                            .assertion(f.rid, &cfg.signing_key, f.now_unix)
                            .map_err(signing_failed)?;
                        let list = outgoing_headers(&f, Some(&signed));
                        let again = boundary::fetch_origin(
                            &target,
                            f.method,
                            &list,
                            &body,
                            true,
                            FORWARD_TIMEOUT_MS,
                            None,
                        );
                        again.await
                    }
                    other => other,
                }
            }
            Signing::Signed(signed) => {
                let list = outgoing_headers(&f, Some(signed));
                let only = boundary::fetch_origin(
                    &target,
                    f.method,
                    &list,
                    &body,
                    true,
                    FORWARD_TIMEOUT_MS,
                    None,
                );
                only.await
            }
        };
        outcome(fetched)
    }

    fn outcome(fetched: Fetched) -> Result<web_sys::Response, EdgeError> {
        match fetched {
            Fetched::Response(resp) => Ok(resp),
            Fetched::TimedOut => Err(EdgeError::OriginTimeout),
            Fetched::Failed(e) => Err(EdgeError::OriginUnreachable(e)),
            Fetched::SignFailed(e) => Err(EdgeError::Internal(format!(
                "signing the assertion failed: {e}"
            ))),
        }
    }

    /// Fetches `url`, giving up (and aborting it) if no response headers arrive within
    /// `timeout_ms`: [`EdgeError::OriginTimeout`]. A failed fetch (a refused connection)
    /// is [`EdgeError::OriginUnreachable`]. `manual`: redirects go back to the client.
    pub async fn send(
        url: &str,
        method: &str,
        headers: &str,
        body: &JsValue,
        manual: bool,
        timeout_ms: u64,
    ) -> Result<web_sys::Response, EdgeError> {
        outcome(boundary::fetch_origin(url, method, headers, body, manual, timeout_ms, None).await)
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{body_for, forward, read_bounded, send, Body, Forward};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_head_never_carry_a_body_to_the_origin() {
        assert!(!carries_body("GET") && !carries_body("HEAD"));
        for m in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert!(carries_body(m), "{m}");
        }
    }

    #[test]
    fn origin_target_joins_origin_path_and_query() {
        assert_eq!(
            origin_target("http://o:1/", "/a/b", Some("x=1")),
            "http://o:1/a/b?x=1"
        );
        assert_eq!(origin_target("http://o:1", "/a", Some("")), "http://o:1/a");
        assert_eq!(origin_target("http://o:1", "/a", None), "http://o:1/a");
    }

    #[test]
    fn only_ordinary_methods_are_forwarded() {
        assert_eq!(forwardable_method("PATCH"), Some("PATCH"));
        assert_eq!(forwardable_method("OPTIONS"), Some("OPTIONS"));
        for m in ["TRACE", "CONNECT", "get", "PROPFIND", ""] {
            assert_eq!(forwardable_method(m), None, "{m}");
        }
    }

    #[test]
    fn identity_and_hop_by_hop_headers_never_reach_the_origin() {
        let none: Vec<String> = Vec::new();
        for h in [
            "x-user-id",
            "X-User-Email",
            "x-noetl-user-email",
            "x-gateway-assertion",
            "X-Forwarded-For",
            "forwarded",
            "x-real-ip",
            "cf-connecting-ip",
            "true-client-ip",
            "x-http-method-override",
            "x-original-url",
            "connection",
            "keep-alive",
            "transfer-encoding",
            "te",
            "upgrade",
            "proxy-authorization",
            "host",
            "x-request-id",
            "traceparent",
        ] {
            assert!(!keep_request_header(h, &none, false), "{h} was kept");
        }
        for h in [
            "authorization",
            "cookie",
            "content-type",
            "content-length",
            "accept",
            "last-event-id",
            "tracestate",
            "user-agent",
        ] {
            assert!(keep_request_header(h, &none, false), "{h} was dropped");
        }
    }

    #[test]
    fn headers_named_by_connection_are_dropped_and_websocket_upgrades_kept() {
        let conn = connection_tokens(Some("keep-alive, X-Secret-Hop"));
        assert_eq!(conn, ["keep-alive", "x-secret-hop"]);
        assert!(!keep_request_header("x-secret-hop", &conn, false));
        assert!(is_websocket_upgrade(Some("WebSocket")));
        assert!(!is_websocket_upgrade(Some("h2c")));
        assert!(keep_request_header("upgrade", &[], true));
        assert!(keep_request_header("connection", &[], true));
        assert!(!keep_request_header("x-user-id", &[], true));
    }
}
