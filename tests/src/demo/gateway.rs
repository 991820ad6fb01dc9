//! The demo service's one HTTP client to the gateway's internal listener: posts questions
//! (`/api/internal/questions`) and events (`/api/internal/events`) with the service token,
//! and hands back the gateway's answer to relay as it came.
//!
//! The target can be set after start (`POST /_demo/gateway`): a test starts the service
//! first, then the origin with `SERVICE_DEMO_URL`, and only then knows the origin's
//! internal URL.

use super::error::DemoError;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use std::sync::RwLock;
use std::time::Duration;

/// Largest gateway answer read (anything longer is a 502: the gateway's answers are small).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;
/// How long one call to the gateway may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the gateway's internal listener is, and the token it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8091`.
    pub url: String,
    /// `Authorization: Bearer <token>` (none: no header sent).
    pub token: Option<String>,
}

/// The gateway's answer: its status and its body (JSON, or its text wrapped in an error).
#[derive(Debug, Clone)]
pub struct Relayed {
    /// The gateway's status.
    pub status: StatusCode,
    /// The gateway's body.
    pub body: Value,
}

/// The client, with its current target.
#[derive(Debug)]
pub struct Gateway {
    http: reqwest::Client,
    target: RwLock<Option<Target>>,
}

impl Gateway {
    /// A client aimed at `target` (none: calls answer 503 until [`Gateway::set_target`]).
    pub fn new(target: Option<Target>) -> anyhow::Result<Self> {
        Ok(Self {
            // No proxy from the environment: the gateway is reached directly.
            http: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .no_proxy()
                .build()?,
            target: RwLock::new(target),
        })
    }

    /// Aims later calls at `target`.
    pub fn set_target(&self, target: Target) {
        *self.target.write().unwrap_or_else(|p| p.into_inner()) = Some(target);
    }

    /// The current target.
    pub fn target(&self) -> Option<Target> {
        self.target
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `POST <gateway><path>` with `body` and the service token; the gateway's answer,
    /// whatever its status. 503 `gateway_not_configured` without a target, 502
    /// `gateway_unavailable` if it cannot be reached or its answer is too long.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Relayed, DemoError> {
        let target = self.target().ok_or_else(|| {
            DemoError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway_not_configured",
                "no gateway internal URL: start with --gateway-internal-url or POST /_demo/gateway",
            )
        })?;
        let mut req = self.http.post(format!("{}{path}", target.url)).json(body);
        if let Some(token) = &target.token {
            req = req.bearer_auth(token);
        }
        let unavailable = |e: String| {
            DemoError::new(
                StatusCode::BAD_GATEWAY,
                "gateway_unavailable",
                format!("POST {path} at the gateway: {e}"),
            )
        };
        let mut resp = req.send().await.map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status();
        let mut buf = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| unavailable(e.to_string()))? {
            if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(unavailable(format!(
                    "its answer is longer than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Relayed {
            status,
            body: relayed_body(status, buf.freeze()),
        })
    }
}

/// The gateway's body as JSON; a body that is not JSON (empty, text) becomes
/// `{"error":{"code":"gateway_error","message":<its text>}}` on an error status, `null`
/// otherwise.
fn relayed_body(status: StatusCode, body: Bytes) -> Value {
    match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) if status.is_client_error() || status.is_server_error() => serde_json::json!({
            "error": {"code": "gateway_error", "message": String::from_utf8_lossy(&body)}
        }),
        Err(_) => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_is_relayed_as_it_came_and_text_errors_are_wrapped() {
        let ok = relayed_body(StatusCode::CREATED, Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(ok, json!({"a": 1}));
        let text = relayed_body(StatusCode::UNAUTHORIZED, Bytes::from_static(b"nope"));
        assert_eq!(text["error"]["code"], "gateway_error");
        assert_eq!(text["error"]["message"], "nope");
        assert_eq!(
            relayed_body(StatusCode::ACCEPTED, Bytes::new()),
            Value::Null
        );
    }

    #[tokio::test]
    async fn without_a_target_a_call_is_503() {
        let g = Gateway::new(None).unwrap();
        let e = g
            .post("/api/internal/events", &json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "gateway_not_configured");
    }
}
