//! Per-request observation: the W3C trace context, the HTTP metrics and the access log.
//!
//! One step ([`observe`]) of both routers' one layer (`crate::app`'s `front`), after the
//! request id is settled and around everything else. Because it is in a router layer, the
//! listener's lean `GET /events` path — which runs the request through the same router —
//! is observed like any other request. For each request it:
//! - **continues the trace**: a valid incoming `traceparent` (the edge forwards the
//!   client's, or mints one) gives the trace id and the parent; without one, or with an
//!   invalid one, the origin starts a trace. The origin's own span gets a fresh span id.
//!   The context ([`RequestContext`]) is the task-local [`current`] while the request is
//!   answered (until its head), so the NoETL client sends it on ([`outgoing`]) and the
//!   JSON log formatter stamps every line with `trace_id` and `span_id`;
//! - **measures** the time to the response head into
//!   `gateway_http_request_duration_seconds{listener,route,method,status}` (route = the
//!   matched template, `unmatched` for none) and the in-flight gauge, unless
//!   `METRICS_ENABLED=false`;
//! - **logs one access line** at info (probes of `/health` and `/ready` at debug),
//!   target `access` (`RUST_LOG=access=off` silences it): method, route, path without its
//!   query (the query may carry a session token), status, duration, request id, trace and
//!   span ids, the parent span id when the trace was continued (absent: the origin started
//!   it), and the body length when declared.
//!
//! Background work (the bridge, settling runs) has no request: its NoETL calls start a
//! trace of their own ([`outgoing`]). With OTLP export on (`otel`), each request also
//! gets an exported span whose ids are the ones above.

use std::borrow::Cow;
use std::future::Future;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use gateway_shared::trace::{TraceParent, FLAG_SAMPLED};
use http::{header, HeaderValue, Method};

use tracing::Instrument;

use crate::{metrics, otel};

/// The header W3C Trace Context travels in.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C trace context: the trace, this hop's span, and whether the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero: the span that is the parent of the next hop.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace (random ids, sampled).
    pub fn fresh() -> Self {
        Self {
            trace_id: nonzero_id(),
            span_id: nonzero_id(),
            sampled: true,
        }
    }

    /// A new span of this trace (the trace id and flags kept, a fresh span id).
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_id(),
            ..*self
        }
    }

    /// Parses a `traceparent` header (W3C rules, `gateway_shared::trace`, the same parser
    /// as the edge's). The span id is the sender's, i.e. the parent of ours.
    pub fn parse(value: &str) -> Option<Self> {
        TraceParent::parse(value).map(|tp| Self {
            trace_id: tp.trace_id,
            span_id: tp.parent_id,
            sampled: tp.flags & FLAG_SAMPLED != 0,
        })
    }

    /// The `traceparent` value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: self.span_id,
            flags: if self.sampled { FLAG_SAMPLED } else { 0 },
        }
        .to_string()
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The span id as 16 lower-case hex digits.
    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }
}

fn nonzero_id<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = std::array::from_fn(|_| rand::random());
        if id != [0; N] {
            return id;
        }
    }
}

/// What the request being answered is, for the code that answers it.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request's `x-request-id` (accepted or minted by `crate::app`'s `front` layer).
    pub request_id: String,
    /// The origin's span of the request's trace.
    pub trace: TraceContext,
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// The context of the request this task is answering, if any.
pub fn current() -> Option<RequestContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `f` with the current request's context, if any (no clone).
pub fn with_current<R>(f: impl FnOnce(Option<&RequestContext>) -> R) -> R {
    let mut f = Some(f);
    match CURRENT.try_with(|c| (f.take().expect("called once"))(Some(c))) {
        Ok(r) => r,
        Err(_) => (f.take().expect("not called"))(None),
    }
}

/// The `traceparent` and `x-request-id` for a call to NoETL: the current request's trace
/// (its origin span as the parent) and id, or — outside a request — a new trace and id.
pub fn outgoing() -> (HeaderValue, HeaderValue) {
    let (trace, id) = with_current(|c| match c {
        Some(c) => (c.trace, c.request_id.clone()),
        None => (TraceContext::fresh(), uuid::Uuid::new_v4().to_string()),
    });
    (
        HeaderValue::from_str(&trace.traceparent()).expect("hex is a valid header value"),
        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid")),
    )
}

/// Which listener a router serves (the `listener` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener(pub &'static str);

/// The method as a label from a closed set.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Observes one request (see the module docs) while `inner` answers it, inside the
/// request's trace context ([`current`]) and its exported span. `request_id` is the id
/// already settled for it (and set as its `x-request-id`), passed rather than read back.
pub async fn observe<F>(
    Listener(listener): Listener,
    request_id: &str,
    req: Request,
    inner: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    let started = Instant::now();
    let route: Cow<'static, str> = match req.extensions().get::<MatchedPath>() {
        Some(p) => Cow::Owned(p.as_str().to_owned()),
        None => Cow::Borrowed("unmatched"),
    };
    let method = method_label(req.method());
    let request_id = request_id.to_owned();
    let parent = req
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    // With OTLP export on, the request gets a span of its own whose ids are the exported
    // ones; otherwise the ids are ours alone.
    let span = if otel::enabled() {
        // The name is `otel::SERVER_SPAN` (a macro needs the literal).
        tracing::info_span!(
            "http.request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            http.request.method = method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    let exported = otel::continue_trace(&span, parent.map(|p| (p.trace_id, p.span_id, p.sampled)));
    let trace = match exported {
        Some((trace_id, span_id, sampled)) => TraceContext {
            trace_id,
            span_id,
            sampled,
        },
        None => parent.map_or_else(TraceContext::fresh, |parent| parent.child()),
    };
    let parent_span_id = parent.map(|p| p.span_id_hex());
    // Probes (`/health`, `/ready`: the kubelet's, every few seconds) log at debug.
    let probe = matches!(&*route, "/health" | "/ready");
    let access = if probe {
        tracing::enabled!(target: "access", tracing::Level::DEBUG)
    } else {
        tracing::enabled!(target: "access", tracing::Level::INFO)
    };
    let path = if access {
        req.uri().path().to_owned()
    } else {
        String::new()
    };
    let on = metrics::enabled();
    let in_flight = on.then(|| metrics::global().in_flight(listener));
    if let Some(g) = &in_flight {
        g.inc();
    }
    let ctx = RequestContext { request_id, trace };
    let request_span = span.clone();
    let resp = CURRENT
        .scope(ctx, async move {
            let resp = inner(req).instrument(request_span).await;
            let took = started.elapsed();
            if access {
                with_current(|c| {
                    let c = c.expect("inside the scope");
                    let bytes = resp
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    macro_rules! access_line {
                        ($level:expr) => {
                            tracing::event!(
                                target: "access",
                                $level,
                                method,
                                route = %route,
                                path = %path,
                                status = resp.status().as_u16(),
                                duration_ms = (took.as_secs_f64() * 1e6).round() / 1e3,
                                request_id = %c.request_id,
                                trace_id = %c.trace.trace_id_hex(),
                                span_id = %c.trace.span_id_hex(),
                                parent_span_id,
                                bytes,
                                "request"
                            )
                        };
                    }
                    if probe {
                        access_line!(tracing::Level::DEBUG);
                    } else {
                        access_line!(tracing::Level::INFO);
                    }
                });
            }
            if on {
                metrics::global().observe_http(
                    listener,
                    route,
                    method,
                    resp.status().as_u16(),
                    took,
                );
            }
            resp
        })
        .await;
    if let Some(g) = &in_flight {
        g.dec();
    }
    span.record("http.response.status_code", resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips_and_invalid_ones_are_refused() {
        let t = TraceContext::parse(GOOD).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id_hex(), "00f067aa0ba902b7");
        assert!(t.sampled);
        assert_eq!(t.traceparent(), GOOD);
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra")
                .is_some(),
            "a later version may append fields"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn outside_a_request_a_call_starts_its_own_trace_and_inside_it_continues() {
        let (tp, id) = outgoing();
        assert!(TraceContext::parse(tp.to_str().unwrap()).is_some());
        assert!(!id.is_empty());
        let trace = TraceContext::parse(GOOD).unwrap().child();
        let ctx = RequestContext {
            request_id: "req-1".into(),
            trace,
        };
        let (tp, id) = CURRENT.scope(ctx, async { outgoing() }).await;
        assert_eq!(tp.to_str().unwrap(), trace.traceparent());
        assert_eq!(id, "req-1");
    }
}
