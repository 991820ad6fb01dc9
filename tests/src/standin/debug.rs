//! Debug routes for the gateway's proxy tests: see exactly what arrived upstream
//! (`echo`), a slow upstream (`slow`) and a streamed body (`stream`).
//!
//! The echo body is hashed as it streams in, so a multi-megabyte upload is measured
//! without being held in memory and without a body limit of our own.

use super::http::{ApiError, QueryParams};
use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Longest `slow` sleep (10 minutes).
const MAX_SLOW_MS: u64 = 600_000;
/// Most chunks `stream` sends.
const MAX_CHUNKS: u32 = 10_000;
/// Longest pause between chunks.
const MAX_INTERVAL_MS: u64 = 60_000;

/// `ANY /api/debug/echo[/{*rest}]`: `{method, path, query, headers, header_names,
/// body_len, body_sha256}` with header names lowercased and repeated values joined by ", ".
/// `header_names` lists the names as values too: the gateway removes credential-named keys
/// (`authorization`, …) from the JSON it returns, so only a value can show one arrived.
pub async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                len += bytes.len() as u64;
                hasher.update(&bytes);
            }
            Err(e) => {
                return ApiError::BadRequest(format!("body read failed: {e}")).into_response()
            }
        }
    }
    Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": header_map(&headers),
        "header_names": headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        "body_len": len,
        "body_sha256": hex::encode(hasher.finalize()),
    }))
    .into_response()
}

/// Headers as a JSON object: lowercase names, repeated values joined with ", ".
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

/// Query of `GET /api/debug/slow`.
#[derive(Debug, Deserialize)]
pub struct SlowQuery {
    /// Milliseconds to sleep (default 1000, max 600000).
    pub ms: Option<u64>,
}

/// `GET /api/debug/slow?ms=N`: sleeps, then 200 `{slept_ms}`.
pub async fn slow(QueryParams(q): QueryParams<SlowQuery>) -> Json<Value> {
    let ms = q.ms.unwrap_or(1_000).min(MAX_SLOW_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(json!({ "slept_ms": ms }))
}

/// Query of `GET /api/debug/stream`.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    /// Number of chunks (default 5, max 10000).
    pub chunks: Option<u32>,
    /// Pause between chunks in ms (default 100, max 60000).
    pub interval_ms: Option<u64>,
}

/// `GET /api/debug/stream?chunks=N&interval_ms=M`: a chunked NDJSON body, one line
/// `{"chunk":i,"of":N}` per chunk, the first at once and the rest `M` ms apart — a proxy
/// that buffers shows up as all lines arriving together.
pub async fn stream(QueryParams(q): QueryParams<StreamQuery>) -> Response {
    let chunks = q.chunks.unwrap_or(5).min(MAX_CHUNKS);
    let interval = Duration::from_millis(q.interval_ms.unwrap_or(100).min(MAX_INTERVAL_MS));
    let lines = futures::stream::unfold(0u32, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let line = format!("{}\n", json!({ "chunk": i, "of": chunks }));
        Some((Ok::<_, std::convert::Infallible>(line), i + 1))
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(lines),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn repeated_headers_are_joined_and_names_lowercase() {
        let mut h = HeaderMap::new();
        h.append("X-Thing", HeaderValue::from_static("a"));
        h.append("x-thing", HeaderValue::from_static("b"));
        h.append("Accept", HeaderValue::from_static("*/*"));
        assert_eq!(
            header_map(&h),
            json!({ "x-thing": "a, b", "accept": "*/*" })
        );
    }
}
