//! Responses the edge makes, and the one exit every response leaves through.
//!
//! `finish` puts the CORS headers, `Vary: Origin` and `x-request-id` on every response,
//! whether the edge made it or the origin did. A Response returned by `fetch` has
//! immutable headers (setting one throws), so `finish` never edits them in place: it
//! reads them (one crossing, `crate::boundary`), decides in Rust which to keep and what to
//! add, and builds a new Response around the *same* body stream, status and WebSocket from
//! one string of headers — nothing is read or buffered, so an SSE stream still reaches
//! the client frame by frame.
//!
//! A `GET /events` (or its alias `GET /api/v1/events/{client_id}`) that fails for a
//! passing reason — the origin unreachable, restarting or overloaded (502, 503, 504, the edge's own or the origin's) — leaves as
//! `unavailable_stream`: a 200 event stream that says `stream/unavailable` with `retry:`
//! and ends. A browser's EventSource gives up for good on an error status, but reconnects
//! by itself (same URL, `Last-Event-ID`) after a stream that ends, so this is what keeps a
//! plain `new EventSource(url)` alive through an origin restart (PROTOCOL §3).

/// The body of `/health` at the edge: the edge is up, whatever the origin is doing.
pub fn health_body() -> String {
    serde_json::json!({
        "status": "ok",
        "component": "edge",
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
}

/// Whether an origin response header is passed on to the client. Hop-by-hop headers
/// belong to the origin connection; CORS, `Vary` and `x-request-id` are the edge's.
pub fn keep_response_header(name: &str) -> bool {
    !(crate::forward::is_hop_by_hop(name)
        || crate::cors::is_cors_header(name)
        || name.eq_ignore_ascii_case("vary")
        || name.eq_ignore_ascii_case("x-request-id"))
}

/// Whether a request is a browser's event stream (`GET /events`, or its alias
/// `GET /api/v1/events/{client_id}`: `gateway_shared::routes::is_event_stream`), whose
/// passing failures are answered with an event stream that says retry instead of an error
/// status.
pub fn is_event_stream_request(method: &str, path: &str) -> bool {
    gateway_shared::routes::is_event_stream(method, path)
}

/// The code and message of the retry answer that replaces an origin answer of `status` on
/// `/events`, or `None` when the origin's answer goes out as it is (a stream, or a refusal
/// that is not passing: 401, 403, 429, …).
pub fn origin_status_as_unavailable(status: u16) -> Option<(&'static str, String)> {
    gateway_shared::frames::answers_as_unavailable_stream(status).then(|| {
        (
            "origin_unavailable",
            format!("the origin answered {status}; reconnect"),
        )
    })
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::*;
    use crate::boundary::{self, Head};
    use worker::worker_sys::web_sys;
    use worker::{Headers, Response, ResponseBuilder};

    /// A response with a JSON body.
    pub fn json(status: u16, body: String) -> Response {
        let headers = Headers::new();
        let _ = headers.set("content-type", "application/json");
        let _ = headers.set("cache-control", "no-store");
        ResponseBuilder::new()
            .with_status(status)
            .with_headers(headers)
            .fixed(body.into_bytes())
    }

    /// A response without a body (preflights).
    pub fn empty(status: u16) -> Response {
        ResponseBuilder::new().with_status(status).empty()
    }

    /// `/health`, answered at the edge.
    pub fn health() -> Response {
        json(200, health_body())
    }

    /// The answer to an `/events` request that failed for a passing reason: `200
    /// text/event-stream`, `retry:` and one `stream/unavailable` frame, then the end.
    pub fn unavailable_stream(code: &str, message: &str) -> Response {
        let headers = Headers::new();
        let _ = headers.set("content-type", "text/event-stream");
        let _ = headers.set("cache-control", "no-store");
        ResponseBuilder::new()
            .with_status(200)
            .with_headers(headers)
            .fixed(gateway_shared::frames::unavailable_stream(code, message))
    }

    /// The response as it leaves the edge: the origin's end-to-end headers, then the
    /// edge's CORS headers (`Vary` merged with the origin's), then `x-request-id` — read
    /// in one crossing and written in one (`crate::boundary`), around the same status,
    /// body stream and WebSocket.
    pub fn finish(
        resp: web_sys::Response,
        cors: &[(&'static str, String)],
        rid: &str,
    ) -> Result<web_sys::Response, String> {
        let upstream = Head::of_response(&resp);
        let mut list = String::with_capacity(256);
        for (name, value) in upstream.headers() {
            if keep_response_header(name) {
                boundary::push(&mut list, name, value);
            }
        }
        // The kept headers hold no CORS header, `Vary` or `x-request-id`, so appending
        // these is setting them.
        for (name, value) in cors.iter().filter(|(n, _)| *n != "vary") {
            boundary::push(&mut list, name, value);
        }
        let vary = crate::cors::merge_vary(upstream.get("vary"));
        boundary::push(&mut list, "vary", &vary);
        boundary::push(&mut list, "x-request-id", rid);
        boundary::respond(&resp, &list)
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{empty, finish, health, json, unavailable_stream};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_says_edge() {
        let v: serde_json::Value = serde_json::from_str(&health_body()).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["component"], "edge");
    }

    #[test]
    fn only_passing_failures_of_get_events_become_a_stream_that_says_retry() {
        assert!(is_event_stream_request("GET", "/events"));
        assert!(is_event_stream_request("GET", "/api/v1/events/c1"));
        for (m, p) in [
            ("POST", "/events"),
            ("GET", "/events/x"),
            ("GET", "/graphql"),
            ("HEAD", "/events"),
            ("POST", "/api/v1/events/c1"),
            ("POST", "/api/v1/events/c1/response"),
            ("GET", "/api/v1/events/c1/response"),
            ("GET", "/api/v1/demo/stream"),
        ] {
            assert!(!is_event_stream_request(m, p), "{m} {p}");
        }
        for s in [502, 503, 504] {
            let (code, message) = origin_status_as_unavailable(s).expect("passing");
            assert_eq!(code, "origin_unavailable");
            assert!(message.contains(&s.to_string()));
        }
        for s in [200, 401, 403, 404, 429, 500] {
            assert_eq!(origin_status_as_unavailable(s), None, "{s}");
        }
    }

    #[test]
    fn the_edge_owns_cors_vary_and_request_id_on_the_way_out() {
        for h in [
            "access-control-allow-origin",
            "Access-Control-Allow-Credentials",
            "vary",
            "x-request-id",
            "transfer-encoding",
            "connection",
        ] {
            assert!(!keep_response_header(h), "{h}");
        }
        for h in [
            "content-type",
            "cache-control",
            "set-cookie",
            "retry-after",
            "content-encoding",
        ] {
            assert!(keep_response_header(h), "{h}");
        }
    }
}
