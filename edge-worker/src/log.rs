//! The edge's access log: one JSON line per request, written with one `console.log` (one
//! wasm↔JS crossing) as the response leaves (`lib.rs`), which Workers Logs indexes field by
//! field (`[observability]` in wrangler.toml; docs/EDGE.md, "Edge logs").
//!
//! The line names the route-table entry that matched (`/noetl/`), never the raw path, and
//! carries no token, cookie, query string or client address — only what is listed in
//! [`RequestLog`]. The line is built here, in pure Rust, and unit-tested on the host.

use gateway_shared::routes::RouteKind;

/// What a request's log line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog<'a> {
    /// The request id (`x-request-id`).
    pub rid: &'a str,
    /// The W3C trace id (32 hex) the request travels under.
    pub trace_id: &'a str,
    /// The request method (anything but the ordinary methods is logged as `OTHER`).
    pub method: &'a str,
    /// The matched route-table entry (`None`: no entry matched, or no table loaded).
    pub route: Option<&'a str>,
    /// The matched entry's kind (`None` when the configuration did not load).
    pub kind: Option<RouteKind>,
    /// The status the client got.
    pub status: u16,
    /// Milliseconds from the request's arrival to the response head.
    pub ms: u64,
    /// What happened: see [`Outcome`].
    pub outcome: &'a Outcome,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (by the origin, or the edge's `/health`) below 400.
    Ok,
    /// A CORS preflight answered at the edge.
    Preflight,
    /// The edge refused or failed: its error code and that error's status (the client may
    /// have got another one: a `GET /events` or `GET /api/v1/events/{client_id}` failure
    /// leaves as a 200 retry stream).
    Edge(&'static str, u16),
    /// The origin answered with this status (≥ 400).
    Origin(u16),
}

impl Outcome {
    /// The outcome of a response of `status` that the origin made.
    pub fn of_origin(status: u16) -> Self {
        if status >= 400 {
            Outcome::Origin(status)
        } else {
            Outcome::Ok
        }
    }

    /// The log level: `error` for a failure of status ≥ 500 (the edge's or the origin's),
    /// `warn` for a refusal (4xx), `info` otherwise.
    pub fn level(&self) -> &'static str {
        match self {
            Outcome::Edge(_, s) | Outcome::Origin(s) if *s >= 500 => "error",
            Outcome::Edge(..) | Outcome::Origin(_) => "warn",
            Outcome::Ok | Outcome::Preflight => "info",
        }
    }

    /// The `outcome` field: `ok`, `preflight`, the edge's error code, or `origin_<status>`.
    pub fn code(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Preflight => "preflight".into(),
            Outcome::Edge(code, _) => (*code).into(),
            Outcome::Origin(s) => format!("origin_{s}").into(),
        }
    }
}

/// The name of a route kind in the log.
fn kind_name(kind: RouteKind) -> &'static str {
    match kind {
        RouteKind::Public => "public",
        RouteKind::Session => "session",
        RouteKind::Deny => "deny",
        RouteKind::Service => "service",
        RouteKind::Edge => "edge",
    }
}

/// The JSON line for one request: one object, keys in alphabetical order.
pub fn line(log: &RequestLog<'_>) -> String {
    // Serialised straight from a struct (one string, no intermediate `Value` map); the
    // fields are in the order `json!` wrote them (a sorted map), so the line is unchanged.
    #[derive(serde::Serialize)]
    struct Line<'a> {
        kind: Option<&'static str>,
        level: &'static str,
        method: &'a str,
        ms: u64,
        outcome: std::borrow::Cow<'static, str>,
        rid: &'a str,
        route: &'a str,
        status: u16,
        trace_id: &'a str,
    }
    let line = Line {
        kind: log.kind.map(kind_name),
        level: log.outcome.level(),
        method: crate::forward::forwardable_method(log.method).unwrap_or("OTHER"),
        ms: log.ms,
        outcome: log.outcome.code(),
        rid: log.rid,
        route: log.route.unwrap_or("unmatched"),
        status: log.status,
        trace_id: log.trace_id,
    };
    // Serialising strings and integers cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// Writes the line (one `console.log`).
#[cfg(target_arch = "wasm32")]
pub fn emit(log: &RequestLog<'_>) {
    let line = worker::wasm_bindgen::JsValue::from(line(log));
    worker::worker_sys::web_sys::console::log_1(&line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parsed(log: &RequestLog<'_>) -> Value {
        serde_json::from_str(&line(log)).expect("one JSON value")
    }

    #[test]
    fn a_forwarded_request_logs_its_route_entry_not_its_path() {
        let ok = Outcome::of_origin(200);
        let v = parsed(&RequestLog {
            rid: "r1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            method: "GET",
            route: Some("/noetl/"),
            kind: Some(RouteKind::Session),
            status: 200,
            ms: 12,
            outcome: &ok,
        });
        assert_eq!(v["level"], "info");
        assert_eq!(v["rid"], "r1");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["route"], "/noetl/");
        assert_eq!(v["kind"], "session");
        assert_eq!(v["status"], 200);
        assert_eq!(v["ms"], 12);
        assert_eq!(v["outcome"], "ok");
        assert_eq!(
            v.as_object().unwrap().len(),
            9,
            "nothing but the listed fields"
        );
    }

    #[test]
    fn failures_are_errors_refusals_warnings() {
        let cases = [
            (
                Outcome::Edge("origin_unreachable", 502),
                "error",
                "origin_unreachable",
            ),
            (Outcome::Edge("rate_limited", 429), "warn", "rate_limited"),
            (Outcome::of_origin(503), "error", "origin_503"),
            (Outcome::of_origin(404), "warn", "origin_404"),
            (Outcome::of_origin(304), "info", "ok"),
            (Outcome::Preflight, "info", "preflight"),
        ];
        for (outcome, level, code) in cases {
            assert_eq!(outcome.level(), level, "{outcome:?}");
            assert_eq!(outcome.code(), code, "{outcome:?}");
        }
    }

    #[test]
    fn unmatched_routes_and_odd_methods_are_named_not_echoed() {
        let o = Outcome::Edge("method_not_allowed", 405);
        let v = parsed(&RequestLog {
            rid: "r",
            trace_id: "t",
            method: "PROPFIND\"x",
            route: None,
            kind: None,
            status: 405,
            ms: 0,
            outcome: &o,
        });
        assert_eq!(v["method"], "OTHER");
        assert_eq!(v["route"], "unmatched");
        assert_eq!(v["kind"], Value::Null);
        assert_eq!(v["level"], "warn");
    }
}
