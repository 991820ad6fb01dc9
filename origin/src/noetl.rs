//! The one HTTP client to the NoETL server (PROTOCOL.md §6).
//!
//! Every call has a timeout; only idempotent calls (reads, session validation, access
//! checks) are retried, and only on failures that say nothing reached NoETL's logic
//! (connect errors, 502/503/504). Retries wait an exponential backoff with full jitter
//! (a random wait up to 100 ms, then up to 200 ms, …, at most 2 s), and draw on a
//! [`RetryBudget`]: over any 10 s, retries add at most `NOETL_RETRY_BUDGET` (20 %) to the
//! calls made, plus `NOETL_RETRY_MIN_PER_SEC` — so when NoETL is overloaded and every call
//! fails, a replica sends it ~1.2× its load, not `NOETL_RETRIES + 1`×. Answers are
//! size-capped and parsed into typed replies; ids that NoETL sends as numbers above 2^53
//! are kept as exact decimal strings.
//!
//! The `/noetl/*` proxy streams through the same client ([`NoetlClient::forward`]): one
//! connection pool, one connect timeout, one redirect policy — none: a redirect from NoETL
//! is passed to the caller, never followed by the gateway with the caller's identity.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use gateway_shared::session::{string_or_number, User};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::metrics::{self, Metrics};
use crate::observe;

/// Largest NoETL answer the client reads (not proxied bodies: those stream).
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Why a NoETL call failed. Mapped to 502/503/504 by [`crate::error::AppError`].
#[derive(Debug, Clone, thiserror::Error)]
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
            NoetlError::Unreachable(crate::upstream::innermost(&e))
        } else {
            NoetlError::BadResponse(crate::upstream::innermost(&e))
        }
    }
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

pub use crate::upstream::{Forward, Forwarded};

/// The first retry waits a random time up to this; each further one up to twice as long.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest wait before one retry.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Full jitter: a uniformly random wait in `[0, min(cap, base × 2^(retry-1))]`, so the
/// retries of many callers that failed together do not arrive together.
pub fn backoff(retry: u32) -> Duration {
    use rand::Rng;
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

/// The window a [`RetryBudget`] counts over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Slots the window is counted in (each `BUDGET_WINDOW / BUDGET_SLOTS` long).
const BUDGET_SLOTS: usize = 10;

/// How many retries the client may make: over the last [`BUDGET_WINDOW`], at most
/// `ratio` × the calls made plus `min_per_sec` × the window's seconds (the retry-budget
/// idea of Finagle and tower). Calls and retries are counted in slots of a second; a slot
/// older than the window is forgotten. Shared by every clone of the client.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor: u64,
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// `(calls, retries)` per slot.
    slots: [(u64, u64); BUDGET_SLOTS],
    /// The slot `current` began at.
    current_start: Instant,
    current: usize,
}

impl RetryBudget {
    /// A budget of `ratio` (0..=1) of the calls, plus `min_per_sec` retries a second.
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        Self::new_at(ratio, min_per_sec, Instant::now())
    }

    fn new_at(ratio: f64, min_per_sec: u32, now: Instant) -> Self {
        Self {
            ratio: ratio.clamp(0.0, 1.0),
            floor: u64::from(min_per_sec) * BUDGET_WINDOW.as_secs(),
            state: Mutex::new(BudgetState {
                slots: [(0, 0); BUDGET_SLOTS],
                current_start: now,
                current: 0,
            }),
        }
    }

    fn lock_at(&self, now: Instant) -> std::sync::MutexGuard<'_, BudgetState> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let slot = BUDGET_WINDOW / BUDGET_SLOTS as u32;
        let mut passed = 0;
        while now.duration_since(st.current_start) >= slot && passed < BUDGET_SLOTS {
            st.current = (st.current + 1) % BUDGET_SLOTS;
            let i = st.current;
            st.slots[i] = (0, 0);
            st.current_start += slot;
            passed += 1;
        }
        if now.duration_since(st.current_start) >= slot {
            // Idle for longer than the window: everything above was cleared.
            st.current_start = now;
        }
        st
    }

    /// Counts one call (a first attempt).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    fn deposit_at(&self, now: Instant) {
        let mut st = self.lock_at(now);
        let i = st.current;
        st.slots[i].0 += 1;
    }

    /// Takes one retry from the budget: `false` when it is spent (do not retry).
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(Instant::now())
    }

    fn withdraw_at(&self, now: Instant) -> bool {
        let mut st = self.lock_at(now);
        let (calls, retries) = st
            .slots
            .iter()
            .fold((0u64, 0u64), |(c, r), (sc, sr)| (c + sc, r + sr));
        let allowed = self.floor + (calls as f64 * self.ratio) as u64;
        if retries >= allowed {
            return false;
        }
        let i = st.current;
        st.slots[i].1 += 1;
        true
    }
}

impl Default for RetryBudget {
    /// 20 % of the calls plus 5 retries a second (the configuration's defaults).
    fn default() -> Self {
        Self::new(0.2, 5)
    }
}

/// The client for one NoETL server.
#[derive(Debug, Clone)]
pub struct NoetlClient {
    http: reqwest::Client,
    /// The proxy's way to NoETL (`forward`): the on-task pool for an `http://` base.
    transport: crate::upstream::Transport,
    base: Url,
    timeout: Duration,
    retries: u32,
    health_path: String,
    budget: Arc<RetryBudget>,
    metrics: Option<Arc<Metrics>>,
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
        let transport = crate::upstream::Transport::for_base(&base, http.clone(), connect_timeout);
        Ok(Self {
            http,
            transport,
            base,
            timeout,
            retries,
            health_path,
            budget: Arc::new(RetryBudget::default()),
            metrics: None,
        })
    }

    /// The same client drawing its retries on `budget` (`NOETL_RETRY_BUDGET`).
    pub fn with_retry_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    /// The same client counting its retries (and the retries the budget refused).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
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
        let started = Instant::now();
        let (traceparent, request_id) = observe::outgoing();
        let r = match self
            .http
            .get(url)
            .timeout(timeout)
            .header(observe::TRACEPARENT, traceparent)
            .header("x-request-id", request_id)
            .send()
            .await
        {
            Err(e) => Err(NoetlError::from_reqwest(e)),
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(NoetlError::Status {
                status: resp.status().as_u16(),
                message: "health check failed".into(),
            }),
        };
        metrics::global().observe_noetl("health", outcome(&r), started.elapsed());
        r
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
                ("/api/auth/login", "/api/auth/login"),
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
                ("/api/auth/session/validate", "/api/auth/session/validate"),
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
                (
                    "/api/auth/check-playbook-access",
                    "/api/auth/check-playbook-access",
                ),
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
                ("/api/auth/logout", "/api/auth/logout"),
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
                ("/api/execute", "/api/execute"),
                Some(&body),
                false,
                false,
            )
            .await?;
        Ok(reply)
    }

    /// `GET /api/executions/{id}/status`, with `execution_id` turned into a string.
    pub async fn execution_status(&self, id: &str) -> Result<Value, NoetlError> {
        const ROUTE: &str = "/api/executions/{id}/status";
        let path = format!("/api/executions/{}/status", encode_segment(id));
        let (_, mut reply): (_, Value) = self
            .call::<Value, ()>(reqwest::Method::GET, (ROUTE, &path), None, true, false)
            .await?;
        stringify_id(&mut reply, "execution_id");
        Ok(reply)
    }

    /// An execution's whole record (`GET /api/executions/{id}`: its `status` and `events`),
    /// for the bridge's HTTP fallback and the error a failed run reports. Ids in it stay
    /// exact (`u64` in the JSON value). It holds the workload — what the gateway injected
    /// included — and step results: callers read only what they need, and scrub whatever of
    /// it reaches a client.
    pub async fn execution_record(&self, id: &str) -> Result<Value, NoetlError> {
        const ROUTE: &str = "/api/executions/{id}";
        let path = format!("/api/executions/{}", encode_segment(id));
        let (_, reply): (_, Value) = self
            .call::<Value, ()>(reqwest::Method::GET, (ROUTE, &path), None, true, false)
            .await?;
        Ok(reply)
    }

    /// The playbook path of an execution (`GET /api/executions/{id}`), for access checks.
    /// Only `path` is read: the record also holds the workload, secrets included.
    pub async fn execution_path(&self, id: &str) -> Result<String, NoetlError> {
        const ROUTE: &str = "/api/executions/{id}";
        let path = format!("/api/executions/{}", encode_segment(id));
        let (_, reply): (_, Value) = self
            .call::<Value, ()>(reqwest::Method::GET, (ROUTE, &path), None, true, false)
            .await?;
        reply["path"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| NoetlError::BadResponse("execution record without a path".into()))
    }

    /// `POST /api/executions/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<(), NoetlError> {
        const ROUTE: &str = "/api/executions/{id}/cancel";
        let path = format!("/api/executions/{}/cancel", encode_segment(id));
        self.call::<Value, ()>(reqwest::Method::POST, (ROUTE, &path), None, false, false)
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
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static,
    {
        let (sent, took) = crate::upstream::send(&self.transport, &self.base, req).await;
        let sent = sent.map_err(|e| match e {
            crate::upstream::SendError::Timeout => NoetlError::Timeout,
            crate::upstream::SendError::Failed(cause) => {
                NoetlError::Unreachable(format!("proxy: {cause}"))
            }
        });
        match sent {
            Ok(r) => {
                metrics::global().observe_noetl("proxy", status_outcome(r.status), took);
                Ok(r)
            }
            Err(e) => {
                metrics::global().observe_noetl("proxy", outcome::<()>(&Err(e.clone())), took);
                Err(e)
            }
        }
    }

    /// One call with retries for idempotent requests (jittered backoff, within the retry
    /// budget). `accept_client_errors` lets routes whose 4xx answers carry a meaningful
    /// body (login) parse them.
    ///
    /// `route` is the path's template (ids as `{id}`) for
    /// `gateway_noetl_request_duration_seconds`, which times the call, retries included.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        (route, path): (&'static str, &str),
        body: Option<&B>,
        idempotent: bool,
        accept_client_errors: bool,
    ) -> Result<(u16, T), NoetlError> {
        let started = Instant::now();
        let r = self
            .call_timed(method, path, body, idempotent, accept_client_errors)
            .await;
        metrics::global().observe_noetl(route, outcome(&r), started.elapsed());
        r
    }

    async fn call_timed<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        idempotent: bool,
        accept_client_errors: bool,
    ) -> Result<(u16, T), NoetlError> {
        let url = self.url(path)?;
        let attempts = if idempotent { self.retries + 1 } else { 1 };
        self.budget.deposit();
        let mut attempt = 1;
        loop {
            let e = match self
                .attempt(method.clone(), url.clone(), body, accept_client_errors)
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if !e.is_transient() || attempt >= attempts {
                return Err(e);
            }
            if !self.budget.withdraw() {
                if let Some(m) = &self.metrics {
                    m.noetl_retries_over_budget.inc();
                }
                tracing::debug!(%path, attempt, error = %e, "NoETL call not retried: retry budget spent");
                return Err(e);
            }
            if let Some(m) = &self.metrics {
                m.noetl_retries.inc();
            }
            tracing::debug!(%path, attempt, error = %e, "retrying NoETL call");
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn attempt<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&B>,
        accept_client_errors: bool,
    ) -> Result<(u16, T), NoetlError> {
        let (traceparent, request_id) = observe::outgoing();
        let mut req = self
            .http
            .request(method, url)
            .timeout(self.timeout)
            .header(observe::TRACEPARENT, traceparent)
            .header("x-request-id", request_id);
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

/// The `outcome` label of a NoETL call's result.
fn outcome<T>(r: &Result<T, NoetlError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(NoetlError::Status { status, .. }) => status_outcome(*status),
        Err(NoetlError::Timeout) => "timeout",
        Err(NoetlError::Unreachable(_)) => "unavailable",
        Err(NoetlError::BadResponse(_)) => "server_error",
    }
}

/// The `outcome` label of an HTTP status NoETL answered.
fn status_outcome(status: u16) -> &'static str {
    match status {
        500.. => "server_error",
        400..=499 => "client_error",
        _ => "ok",
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
    fn backoff_is_jittered_below_a_doubling_ceiling() {
        for retry in 1..=8u32 {
            let ceiling = (BACKOFF_BASE * (1 << (retry - 1))).min(BACKOFF_CAP);
            let waits: Vec<Duration> = (0..200).map(|_| backoff(retry)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "retry {retry}");
            let distinct: std::collections::HashSet<_> = waits.iter().collect();
            assert!(distinct.len() > 100, "full jitter, not a fixed wait");
        }
        assert!(backoff(60) <= BACKOFF_CAP);
    }

    #[test]
    fn under_sustained_failure_retries_stay_within_the_budget() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(0.2, 5, t0);
        // 100 calls a second for 60 s, every one failing and wanting 2 retries.
        let (mut calls, mut retries) = (0u64, 0u64);
        let mut per_window = std::collections::VecDeque::new();
        for ms in (0..60_000u64).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            budget.deposit_at(now);
            calls += 1;
            let mut made = 0;
            for _ in 0..2 {
                if budget.withdraw_at(now) {
                    made += 1;
                }
            }
            retries += made;
            per_window.push_back((ms, made));
            while per_window.front().is_some_and(|(t, _)| ms - t >= 10_000) {
                per_window.pop_front();
            }
            let in_window: u64 = per_window.iter().map(|(_, m)| m).sum();
            // 1000 calls in 10 s: 200 from the ratio, 50 from the floor — plus what the
            // oldest second made, which the budget (counting whole slots) may have
            // already forgotten: at most a slot's share, 25.
            assert!(
                in_window <= 200 + 50 + 25,
                "{in_window} retries in 10 s at {ms} ms"
            );
        }
        assert!(
            retries as f64 <= calls as f64 * 0.2 + 5.0 * 60.0 + 50.0,
            "{retries} retries for {calls} calls"
        );
        assert!(
            retries > calls / 10,
            "the budget does allow retries: {retries}"
        );
    }

    #[test]
    fn a_quiet_client_may_retry_and_an_idle_budget_refills() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(0.0, 1, t0);
        // Floor: 1 a second over 10 s.
        assert_eq!((0..20).filter(|_| budget.withdraw_at(t0)).count(), 10);
        assert!(!budget.withdraw_at(t0 + Duration::from_secs(5)));
        assert!(budget.withdraw_at(t0 + Duration::from_secs(11)));
        assert!(budget.withdraw_at(t0 + Duration::from_secs(300)));
        let none = RetryBudget::new_at(0.0, 0, t0);
        none.deposit_at(t0);
        assert!(!none.withdraw_at(t0), "a zero budget never retries");
    }

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
