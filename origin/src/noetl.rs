//! The one HTTP client to the NoETL server (PROTOCOL.md §6).
//!
//! Every call has a timeout; only idempotent calls (reads, session validation, access
//! checks) are retried, and only on failures that say nothing reached NoETL's logic
//! (connect errors, 502/503/504). Answers are size-capped and parsed into typed replies;
//! ids that NoETL sends as numbers above 2^53 are kept as exact decimal strings.
//!
//! The `/noetl/*` proxy streams through the same client ([`NoetlClient::forward`]): one
//! connection pool, one connect timeout, one redirect policy — none: a redirect from NoETL
//! is passed to the caller, never followed by the gateway with the caller's identity.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use gateway_shared::session::{string_or_number, User};
use http::{HeaderMap, Method};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

/// Largest NoETL answer the client reads (not proxied bodies: those stream).
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Why a NoETL call failed. Mapped to 502/503/504 by [`crate::error::AppError`].
#[derive(Debug, thiserror::Error)]
pub enum NoetlError {
    /// No connection could be made (refused, DNS, reset before an answer).
    #[error("NoETL is unreachable: {0}")]
    Unreachable(String),
    /// NoETL did not answer within the configured timeout.
    #[error("NoETL did not answer in time")]
    Timeout,
    /// NoETL answered with an error status.
    #[error("NoETL answered HTTP {status}: {message}")]
    Status {
        /// The HTTP status NoETL sent.
        status: u16,
        /// NoETL's error message, if it sent one (trimmed).
        message: String,
    },
    /// NoETL answered 2xx with a body the gateway cannot use.
    #[error("NoETL sent an unexpected answer: {0}")]
    BadResponse(String),
}

impl NoetlError {
    /// The machine code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            NoetlError::Unreachable(_) => "noetl_unavailable",
            NoetlError::Timeout => "noetl_timeout",
            NoetlError::Status { status: 503, .. } => "noetl_overloaded",
            NoetlError::Status { status: 404, .. } => "noetl_not_found",
            NoetlError::Status { .. } => "noetl_error",
            NoetlError::BadResponse(_) => "noetl_bad_response",
        }
    }

    /// True for failures where retrying an idempotent call may help.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            NoetlError::Unreachable(_)
                | NoetlError::Status {
                    status: 502..=504,
                    ..
                }
        )
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            NoetlError::Timeout
        } else if e.is_connect() || e.is_request() {
            NoetlError::Unreachable(root_cause(&e))
        } else {
            NoetlError::BadResponse(root_cause(&e))
        }
    }
}

/// The innermost error message (reqwest's outer ones only say "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A session NoETL created or confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoetlSession {
    /// The user it belongs to.
    pub user: User,
    /// Expiry as NoETL wrote it.
    pub expires_at: String,
    /// Expiry in Unix seconds.
    pub expires_at_unix: i64,
}

/// The outcome of a login NoETL answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// A new session.
    Authenticated {
        /// The raw session token (a secret: returned to the client once, never logged).
        session_token: String,
        /// The session.
        session: NoetlSession,
    },
    /// NoETL refused the login.
    Rejected {
        /// NoETL's reason.
        message: String,
    },
}

/// NoETL's access decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessReply {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// NoETL's explanation.
    pub message: String,
}

/// NoETL's answer to `POST /api/execute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteReply {
    /// The execution id, as exact decimal text.
    #[serde(deserialize_with = "string_or_number")]
    pub execution_id: String,
    /// `started` or `duplicate`.
    #[serde(default)]
    pub status: String,
}

/// The login request body NoETL expects.
#[derive(Debug, Serialize)]
pub struct LoginRequest<'a> {
    /// The ID token the gateway has already verified.
    pub auth0_token: &'a str,
    /// The configured Auth0 domain (never a client-supplied one).
    pub auth0_domain: &'a str,
    /// The caller's address, informational.
    pub client_ip: &'a str,
}

/// A request the `/noetl/*` proxy streams to NoETL ([`NoetlClient::forward`]).
pub struct Forward<S> {
    /// The caller's method.
    pub method: Method,
    /// The upstream path (`/api/...`), already checked by the proxy's policy.
    pub path: String,
    /// The upstream query, without the session token.
    pub query: Option<String>,
    /// The headers to send (the caller's, filtered, plus the gateway's identity headers).
    pub headers: HeaderMap,
    /// The caller's body, as it arrives.
    pub body: S,
    /// How long NoETL may take to send the answer's head.
    pub first_byte_timeout: Duration,
}

/// NoETL's streamed answer to a [`Forward`].
pub struct Forwarded {
    /// NoETL's status code.
    pub status: u16,
    /// NoETL's headers (unfiltered: the proxy decides what the caller sees).
    pub headers: HeaderMap,
    /// The declared body length, if NoETL declared one.
    pub content_length: Option<u64>,
    /// The body, chunk by chunk.
    pub body: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

/// The client for one NoETL server.
#[derive(Debug, Clone)]
pub struct NoetlClient {
    http: reqwest::Client,
    base: Url,
    timeout: Duration,
    retries: u32,
    health_path: String,
}

impl NoetlClient {
    /// Builds the client. `timeout` bounds each attempt; `retries` applies to idempotent calls.
    pub fn new(
        base: Url,
        connect_timeout: Duration,
        timeout: Duration,
        retries: u32,
        health_path: String,
    ) -> Result<Self, NoetlError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("noetl-edge-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NoetlError::Unreachable(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            timeout,
            retries,
            health_path,
        })
    }

    /// The NoETL base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, NoetlError> {
        self.base
            .join(path)
            .map_err(|e| NoetlError::BadResponse(format!("bad NoETL URL for {path}: {e}")))
    }

    /// `GET {health_path}`: is NoETL up?
    pub async fn health(&self, timeout: Duration) -> Result<(), NoetlError> {
        let url = self.url(&self.health_path)?;
        let resp = self
            .http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(NoetlError::from_reqwest)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(NoetlError::Status {
                status: resp.status().as_u16(),
                message: "health check failed".into(),
            })
        }
    }

    /// `POST /api/auth/login`: asks NoETL to create a session for a verified ID token.
    /// Not retried: a retry could create two sessions.
    pub async fn login(&self, req: &LoginRequest<'_>) -> Result<LoginOutcome, NoetlError> {
        #[derive(Deserialize)]
        struct Reply {
            status: String,
            data: Value,
        }
        let (_, reply): (_, Reply) = self
            .call(
                reqwest::Method::POST,
                "/api/auth/login",
                Some(req),
                false,
                true,
            )
            .await?;
        login_outcome(reply.status == "success", &reply.data)
    }

    /// `POST /api/auth/session/validate`: the session if NoETL says it is valid.
    pub async fn validate_session(&self, token: &str) -> Result<Option<NoetlSession>, NoetlError> {
        let body = serde_json::json!({ "session_token": token });
        let (_, reply): (_, Value) = self
            .call(
                reqwest::Method::POST,
                "/api/auth/session/validate",
                Some(&body),
                true,
                false,
            )
            .await?;
        validate_outcome(&reply)
    }

    /// `POST /api/auth/check-playbook-access`.
    pub async fn check_access(
        &self,
        token: &str,
        playbook_path: &str,
        action: &str,
    ) -> Result<AccessReply, NoetlError> {
        let body = serde_json::json!({
            "session_token": token, "playbook_path": playbook_path, "action": action,
        });
        let (_, reply): (_, Value) = self
            .call(
                reqwest::Method::POST,
                "/api/auth/check-playbook-access",
                Some(&body),
                true,
                false,
            )
            .await?;
        access_outcome(&reply["data"])
    }

    /// `POST /api/auth/logout`, where NoETL supports it: a 404 or 405 means it does not,
    /// which is not an error (the gateway's own revocation still holds).
    pub async fn logout(&self, token: &str) -> Result<(), NoetlError> {
        let body = serde_json::json!({ "session_token": token });
        match self
            .call::<Value, _>(
                reqwest::Method::POST,
                "/api/auth/logout",
                Some(&body),
                true,
                false,
            )
            .await
        {
            Ok(_)
            | Err(NoetlError::Status {
                status: 404 | 405, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `POST /api/execute`. Not retried: NoETL deduplicates by request_id, but a retry
    /// after a timeout would still double-dispatch on servers that do not.
    pub async fn execute(
        &self,
        path: &str,
        workload: &Value,
        resource_kind: Option<&str>,
    ) -> Result<ExecuteReply, NoetlError> {
        let mut body = serde_json::json!({ "path": path, "workload": workload });
        if let Some(kind) = resource_kind {
            body["resource_kind"] = Value::String(kind.to_owned());
        }
        let (_, reply) = self
            .call(
                reqwest::Method::POST,
                "/api/execute",
                Some(&body),
                false,
                false,
            )
            .await?;
        Ok(reply)
    }

    /// `GET /api/executions/{id}/status`, with `execution_id` turned into a string.
    pub async fn execution_status(&self, id: &str) -> Result<Value, NoetlError> {
        let path = format!("/api/executions/{}/status", encode_segment(id));
        let (_, mut reply): (_, Value) = self
            .call::<Value, ()>(reqwest::Method::GET, &path, None, true, false)
            .await?;
        stringify_id(&mut reply, "execution_id");
        Ok(reply)
    }

    /// The playbook path of an execution (`GET /api/executions/{id}`), for access checks.
    /// Only `path` is read: the record also holds the workload, secrets included.
    pub async fn execution_path(&self, id: &str) -> Result<String, NoetlError> {
        let path = format!("/api/executions/{}", encode_segment(id));
        let (_, reply): (_, Value) = self
            .call::<Value, ()>(reqwest::Method::GET, &path, None, true, false)
            .await?;
        reply["path"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| NoetlError::BadResponse("execution record without a path".into()))
    }

    /// `POST /api/executions/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<(), NoetlError> {
        let path = format!("/api/executions/{}/cancel", encode_segment(id));
        self.call::<Value, ()>(reqwest::Method::POST, &path, None, false, false)
            .await
            .map(|_| ())
    }

    /// Streams a proxied request to NoETL and returns its answer's head with the body as a
    /// stream. Never retried (the body is consumed as it is sent); the head must arrive
    /// within `first_byte_timeout`, after which the body streams for as long as it lasts
    /// (the caller bounds pauses and size). The request carries no user agent of the
    /// gateway's: its headers are the caller's, as the proxy filtered them.
    pub async fn forward<S>(&self, req: Forward<S>) -> Result<Forwarded, NoetlError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let mut url = self.base.clone();
        url.set_path(&req.path);
        url.set_query(req.query.as_deref());
        let send = self
            .http
            .request(req.method, url)
            .headers(req.headers)
            .body(reqwest::Body::wrap_stream(req.body))
            .send();
        let resp = match tokio::time::timeout(req.first_byte_timeout, send).await {
            Err(_) => return Err(NoetlError::Timeout),
            Ok(Err(e)) if e.is_timeout() => return Err(NoetlError::Timeout),
            Ok(Err(e)) => {
                return Err(NoetlError::Unreachable(format!(
                    "proxy: {}",
                    root_cause(&e)
                )))
            }
            Ok(Ok(r)) => r,
        };
        Ok(Forwarded {
            status: resp.status().as_u16(),
            content_length: resp.content_length(),
            headers: resp.headers().clone(),
            body: resp
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other))
                .boxed(),
        })
    }

    /// One call with retries for idempotent requests. `accept_client_errors` lets routes
    /// whose 4xx answers carry a meaningful body (login) parse them.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        idempotent: bool,
        accept_client_errors: bool,
    ) -> Result<(u16, T), NoetlError> {
        let url = self.url(path)?;
        let attempts = if idempotent { self.retries + 1 } else { 1 };
        let mut backoff = Duration::from_millis(50);
        let mut last = NoetlError::Timeout;
        for attempt in 1..=attempts {
            match self
                .attempt(method.clone(), url.clone(), body, accept_client_errors)
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(e) if e.is_transient() && attempt < attempts => {
                    tracing::debug!(%path, attempt, error = %e, "retrying NoETL call");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn attempt<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&B>,
        accept_client_errors: bool,
    ) -> Result<(u16, T), NoetlError> {
        let mut req = self.http.request(method, url).timeout(self.timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(NoetlError::from_reqwest)?;
        let status = resp.status();
        let bytes = read_capped(resp).await?;
        let usable = status.is_success() || (accept_client_errors && status.is_client_error());
        if !usable {
            return Err(NoetlError::Status {
                status: status.as_u16(),
                message: error_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes)
            .map(|v| (status.as_u16(), v))
            .map_err(|e| {
                NoetlError::BadResponse(format!("HTTP {status} body is not the expected JSON: {e}"))
            })
    }
}

/// Reads a reply body up to [`MAX_REPLY_BYTES`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, NoetlError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(NoetlError::from_reqwest)? {
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(NoetlError::BadResponse(format!(
                "reply larger than {MAX_REPLY_BYTES} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// NoETL's error text: `{"error": "..."}`, `{"detail": "..."}`, `{"data":{"message"}}`, or
/// a short prefix of a non-JSON body.
fn error_message(bytes: &[u8]) -> String {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let text = v["error"]
        .as_str()
        .or_else(|| v["detail"].as_str())
        .or_else(|| v["message"].as_str())
        .or_else(|| v["data"]["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
    text.chars().take(300).collect()
}

/// A login answer's `data` (REST reply or auth-playbook callback) as an outcome.
pub fn login_outcome(success: bool, data: &Value) -> Result<LoginOutcome, NoetlError> {
    if !success {
        let message = data["message"]
            .as_str()
            .or_else(|| data["error"].as_str())
            .unwrap_or("login refused")
            .to_owned();
        return Ok(LoginOutcome::Rejected { message });
    }
    let session_token = data["session_token"]
        .as_str()
        .filter(|t| gateway_shared::session::is_well_formed_token(t))
        .ok_or_else(|| {
            NoetlError::BadResponse("login reply without a usable session_token".into())
        })?
        .to_owned();
    let session = parse_session(&data["user"], &data["expires_at"])?;
    Ok(LoginOutcome::Authenticated {
        session_token,
        session,
    })
}

/// A validation answer (`{valid, user?, expires_at?}`) as the session, if valid.
pub fn validate_outcome(reply: &Value) -> Result<Option<NoetlSession>, NoetlError> {
    if reply["valid"].as_bool() != Some(true) {
        return Ok(None);
    }
    parse_session(&reply["user"], &reply["expires_at"]).map(Some)
}

/// An access answer's `data` (`{allowed, message}`).
pub fn access_outcome(data: &Value) -> Result<AccessReply, NoetlError> {
    let allowed = data["allowed"]
        .as_bool()
        .ok_or_else(|| NoetlError::BadResponse("check-access reply without data.allowed".into()))?;
    Ok(AccessReply {
        allowed,
        message: data["message"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Builds a session from NoETL's `user` and `expires_at` fields.
fn parse_session(user: &Value, expires_at: &Value) -> Result<NoetlSession, NoetlError> {
    let user: User = User::deserialize(user)
        .map_err(|e| NoetlError::BadResponse(format!("session user: {e}")))?;
    let expires_at = expires_at
        .as_str()
        .ok_or_else(|| NoetlError::BadResponse("session without expires_at".into()))?
        .to_owned();
    let expires_at_unix = parse_timestamp(&expires_at)
        .ok_or_else(|| NoetlError::BadResponse(format!("unreadable expires_at {expires_at:?}")))?;
    Ok(NoetlSession {
        user,
        expires_at,
        expires_at_unix,
    })
}

/// RFC 3339, or a naive ISO timestamp taken as UTC (NoETL's Python generation sent those).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.timestamp())
        .ok()
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|d| d.and_utc().timestamp())
        })
}

/// Replaces a numeric id field by its exact decimal text.
fn stringify_id(v: &mut Value, field: &str) {
    if let Some(n) = v.get(field).and_then(Value::as_number) {
        if n.is_u64() || n.is_i64() {
            v[field] = Value::String(n.to_string());
        }
    }
}

/// Percent-encodes an id for use as one path segment.
fn encode_segment(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_both_noetl_generations_parse() {
        assert_eq!(parse_timestamp("1970-01-01T00:01:40Z"), Some(100));
        assert_eq!(parse_timestamp("1970-01-01T00:01:40+00:00"), Some(100));
        assert_eq!(parse_timestamp("1970-01-01T00:01:40.123456"), Some(100));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn numeric_ids_become_exact_strings() {
        let mut v: Value = serde_json::from_str(r#"{"execution_id": 612345678901234567}"#).unwrap();
        stringify_id(&mut v, "execution_id");
        assert_eq!(v["execution_id"], "612345678901234567");
    }

    #[test]
    fn noetl_error_texts_are_extracted_and_bounded() {
        assert_eq!(
            error_message(br#"{"error":"Playbook not found: x","status":404}"#),
            "Playbook not found: x"
        );
        assert_eq!(error_message(br#"{"detail":"nope"}"#), "nope");
        assert_eq!(error_message(&[b'a'; 1000]).len(), 200);
    }
}
