//! The routes that show what the gateway's proxy does: `/echo` (what arrived: method, path,
//! query, headers, body size), `/slow` (an upstream that takes its time) and `/stream` (an
//! upstream SSE stream, one event at a time), plus `/health`.
//!
//! Every input is bounded: the echoed body is counted as it streams in, never held, and
//! refused past [`super::MAX_BODY_BYTES`]; waits, counts and intervals have ceilings and a
//! value above one is a 400, not silently shortened.

use super::app::Shared;
use super::error::{DemoError, QueryParams};
use super::MAX_BODY_BYTES;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::time::Duration;

/// Longest `/slow` wait (10 minutes).
pub const MAX_SLOW_MS: u64 = 600_000;
/// Most events one `/stream` sends.
pub const MAX_STREAM_COUNT: u32 = 10_000;
/// Longest pause between two `/stream` events.
pub const MAX_STREAM_INTERVAL_MS: u64 = 60_000;

/// `GET /health`: 200 `{"status":"ok","service":<name>}`.
pub async fn health(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"status": "ok", "service": state.name}))
}

/// `ANY /echo` and `ANY /echo/{*rest}`: 200 `{service, method, path, query, headers,
/// header_names, body_bytes}` — the path and query exactly as they arrived (`query` null
/// when there is none), header names lowercased, repeated values joined with ", ".
/// `header_names` repeats the names as values: a gateway may scrub credential-named keys
/// from JSON it relays, and then only a value shows that such a header arrived.
pub async fn echo(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, DemoError> {
    let mut body_bytes: usize = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            DemoError::bad_request("invalid_body", format!("body read failed: {e}"))
        })?;
        body_bytes += chunk.len();
        if body_bytes > MAX_BODY_BYTES {
            return Err(DemoError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is longer than {MAX_BODY_BYTES} bytes"),
            ));
        }
    }
    Ok(Json(json!({
        "service": state.name,
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": header_map(&headers),
        "header_names": headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        "body_bytes": body_bytes,
    })))
}

/// Headers as a JSON object: lowercase names, repeated values joined with ", ", bytes
/// that are not UTF-8 replaced.
pub fn header_map(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        out.insert(name.as_str().to_owned(), Value::String(joined));
    }
    Value::Object(out)
}

/// Query of `GET /slow`.
#[derive(Debug, Deserialize)]
pub struct SlowQuery {
    /// Milliseconds to wait (default 1000, at most [`MAX_SLOW_MS`]).
    pub ms: Option<u64>,
}

/// `GET /slow?ms=N`: waits N ms, then 200 `{"slept_ms":N}`.
pub async fn slow(QueryParams(q): QueryParams<SlowQuery>) -> Result<Json<Value>, DemoError> {
    let ms = q.ms.unwrap_or(1_000);
    if ms > MAX_SLOW_MS {
        return Err(DemoError::bad_request(
            "invalid_query",
            format!("ms is at most {MAX_SLOW_MS}"),
        ));
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(Json(json!({"slept_ms": ms})))
}

/// Query of `GET /stream`.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    /// Events to send (default 5, at most [`MAX_STREAM_COUNT`]).
    pub count: Option<u32>,
    /// Milliseconds between two events (default 1000, at most [`MAX_STREAM_INTERVAL_MS`]).
    pub interval_ms: Option<u64>,
}

/// `GET /stream?count=N&interval_ms=M`: `text/event-stream` of N events `event: tick`,
/// `id: i`, `data: {"i":i}` for i = 1..=N — the first at once, then one every M ms, each
/// written when it is due (never batched) — and then the stream ends.
pub async fn stream(
    QueryParams(q): QueryParams<StreamQuery>,
) -> Result<impl IntoResponse, DemoError> {
    let count = q.count.unwrap_or(5);
    let interval_ms = q.interval_ms.unwrap_or(1_000);
    if count > MAX_STREAM_COUNT || interval_ms > MAX_STREAM_INTERVAL_MS {
        return Err(DemoError::bad_request(
            "invalid_query",
            format!(
                "count is at most {MAX_STREAM_COUNT}, interval_ms at most {MAX_STREAM_INTERVAL_MS}"
            ),
        ));
    }
    Ok(Sse::new(ticks(count, Duration::from_millis(interval_ms))))
}

/// The tick events of one `/stream`.
fn ticks(count: u32, interval: Duration) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(1u32, move |i| async move {
        if i > count {
            return None;
        }
        if i > 1 {
            tokio::time::sleep(interval).await;
        }
        let event = Event::default()
            .event("tick")
            .id(i.to_string())
            .data(json!({"i": i}).to_string());
        Some((Ok(event), i + 1))
    })
}
