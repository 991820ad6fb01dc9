//! Where sessions are decided: NoETL's synchronous auth routes (`AUTH_MODE=rest`) or its
//! auth playbooks answered through callbacks (`AUTH_MODE=playbook`, PROTOCOL.md §6).
//!
//! Both sit behind [`AuthBackend`], so the session service, its cache and its revocation
//! rules are the same in either mode.
//!
//! The playbook mode is the realtime path in miniature: the gateway writes a request entry,
//! starts watching the shared K/V key the answer will land on, runs the playbook with
//! `request_id`, `gateway_url` and a per-request `callback_token` in its workload, and waits.
//! The playbook's HTTP step calls back `/api/internal/callback` on whichever replica the
//! load balancer picks; that replica stores the body under `result.<request_id>`, and the
//! watch wakes the waiting replica. A playbook that never answers is cancelled after
//! `AUTH_PLAYBOOK_TIMEOUT` and the caller gets a 504, not a hang.
//!
//! Runs are bounded per replica (`AUTH_PLAYBOOK_CONCURRENCY`, default 32): a run waits at
//! most [`PERMIT_WAIT`] for a free slot, else the caller gets 503 `auth_busy` with
//! `Retry-After: 1` — a flood of random tokens cannot have a replica start thousands of
//! playbooks, each waiting up to 15 s. (Concurrent validations of one token are already
//! one run: the session service coalesces them.)

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::auth::session::now_unix;
use crate::error::{AppError, AUTH_BUSY_CODE};
use crate::metrics::Metrics;
use crate::noetl::{
    access_outcome, login_outcome, validate_outcome, AccessReply, LoginOutcome, LoginRequest,
    NoetlClient, NoetlError, NoetlSession,
};
use crate::requests::{self, CallbackTokens, RequestEntry};
use crate::store::{Bucket, KvEvent, KvStore};

/// The four questions the gateway asks NoETL about sessions.
#[async_trait]
pub trait AuthBackend: Send + Sync + 'static {
    /// Creates a session for an ID token the gateway has already verified.
    async fn login(&self, req: &LoginRequest<'_>) -> Result<LoginOutcome, AppError>;
    /// The session behind a token, if NoETL says it is valid.
    async fn validate_session(&self, token: &str) -> Result<Option<NoetlSession>, AppError>;
    /// Whether the session may perform `action` on `playbook_path`.
    async fn check_access(
        &self,
        token: &str,
        playbook_path: &str,
        action: &str,
    ) -> Result<AccessReply, AppError>;
    /// Ends the session at NoETL where it can (best effort).
    async fn logout(&self, token: &str) -> Result<(), AppError>;
}

#[async_trait]
impl AuthBackend for NoetlClient {
    async fn login(&self, req: &LoginRequest<'_>) -> Result<LoginOutcome, AppError> {
        Ok(NoetlClient::login(self, req).await?)
    }
    async fn validate_session(&self, token: &str) -> Result<Option<NoetlSession>, AppError> {
        Ok(NoetlClient::validate_session(self, token).await?)
    }
    async fn check_access(
        &self,
        token: &str,
        playbook_path: &str,
        action: &str,
    ) -> Result<AccessReply, AppError> {
        Ok(NoetlClient::check_access(self, token, playbook_path, action).await?)
    }
    async fn logout(&self, token: &str) -> Result<(), AppError> {
        Ok(NoetlClient::logout(self, token).await?)
    }
}

/// The auth playbooks' paths.
#[derive(Debug, Clone)]
pub struct AuthPlaybooks {
    /// Creates a session (`api_integration/auth0/auth0_login`).
    pub login: String,
    /// Validates a session (`api_integration/auth0/auth0_validate_session`).
    pub validate: String,
    /// Checks playbook access (`api_integration/auth0/check_playbook_access`).
    pub check_access: String,
}

impl Default for AuthPlaybooks {
    fn default() -> Self {
        Self {
            login: "api_integration/auth0/auth0_login".into(),
            validate: "api_integration/auth0/auth0_validate_session".into(),
            check_access: "api_integration/auth0/check_playbook_access".into(),
        }
    }
}

/// The longest an auth playbook run waits for a free slot before `auth_busy`.
pub const PERMIT_WAIT: Duration = Duration::from_secs(1);

/// `AUTH_MODE=playbook`: each question is a playbook run answered by a callback.
pub struct PlaybookBackend {
    noetl: NoetlClient,
    kv: Arc<dyn KvStore>,
    tokens: CallbackTokens,
    callback_url: String,
    playbooks: AuthPlaybooks,
    timeout: Duration,
    runs: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl PlaybookBackend {
    /// A backend that waits at most `timeout` for each playbook's callback.
    pub fn new(
        noetl: NoetlClient,
        kv: Arc<dyn KvStore>,
        tokens: CallbackTokens,
        callback_url: String,
        playbooks: AuthPlaybooks,
        timeout: Duration,
    ) -> Self {
        Self {
            noetl,
            kv,
            tokens,
            callback_url,
            playbooks,
            timeout,
            runs: Arc::new(Semaphore::new(32)),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The same backend running at most `concurrency` playbooks at once (at least 1),
    /// counting its `auth_busy` refusals in `metrics`.
    pub fn with_concurrency(mut self, concurrency: usize, metrics: Arc<Metrics>) -> Self {
        self.runs = Arc::new(Semaphore::new(concurrency.max(1)));
        self.metrics = metrics;
        self
    }

    /// Runs `playbook` with `fields` and returns the callback's `(status_ok, data)`.
    async fn ask(&self, playbook: &str, fields: Value) -> Result<(bool, Value), AppError> {
        let _slot = match tokio::time::timeout(PERMIT_WAIT, self.runs.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                self.metrics.auth_busy.inc();
                return Err(AppError::Unavailable {
                    code: AUTH_BUSY_CODE,
                    message: "too many auth playbooks running, retry shortly".into(),
                });
            }
        };
        let request_id = requests::new_request_id();
        let entry = RequestEntry {
            request_id: request_id.clone(),
            client_id: None,
            user_id: String::new(),
            execution_id: None,
            playbook_path: playbook.to_owned(),
            created_at: now_unix(),
        };
        requests::put(self.kv.as_ref(), &entry).await?;
        let key = format!("result.{request_id}");
        // Watch before running: the callback may land (on any replica) before execute returns.
        let mut watch = self.kv.watch(Bucket::Requests, &key).await?;
        let mut workload = fields;
        workload["request_id"] = json!(request_id);
        workload["gateway_url"] = json!(self.callback_url);
        workload["callback_token"] = json!(self.tokens.token_for(request_id.as_str()));
        let execution = self
            .noetl
            .execute(playbook, &workload, Some("playbook"))
            .await?;

        let wait = async {
            if let Some(b) = self.kv.get(Bucket::Requests, &key).await? {
                return Ok::<_, AppError>(Some(b));
            }
            while let Some(event) = watch.next().await {
                if let KvEvent::Put { value, .. } = event {
                    return Ok(Some(value));
                }
            }
            Ok(None)
        };
        let body = match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => {
                return Err(AppError::Unavailable {
                    code: "store_unavailable",
                    message: "lost the shared store while waiting for the auth playbook".into(),
                })
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::warn!(%playbook, execution = %execution.execution_id, "auth playbook timed out; cancelling it");
                if let Err(e) = self.noetl.cancel(&execution.execution_id).await {
                    tracing::warn!(error = %e, "cancelling the timed-out auth playbook failed");
                }
                return Err(AppError::Noetl(NoetlError::Timeout));
            }
        };
        let _ = self.kv.delete(Bucket::Requests, &key).await;
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            AppError::Noetl(NoetlError::BadResponse(format!(
                "auth playbook callback: {e}"
            )))
        })?;
        let status = v["status"].as_str().unwrap_or_default();
        let ok = !(status.eq_ignore_ascii_case("error") || status.eq_ignore_ascii_case("failed"));
        Ok((ok, v["data"].clone()))
    }
}

#[async_trait]
impl AuthBackend for PlaybookBackend {
    async fn login(&self, req: &LoginRequest<'_>) -> Result<LoginOutcome, AppError> {
        let fields = json!({"auth0_token": req.auth0_token, "auth0_domain": req.auth0_domain, "client_ip": req.client_ip});
        let (ok, data) = self.ask(&self.playbooks.login, fields).await?;
        Ok(login_outcome(ok, &data)?)
    }

    async fn validate_session(&self, token: &str) -> Result<Option<NoetlSession>, AppError> {
        let (ok, data) = self
            .ask(&self.playbooks.validate, json!({"session_token": token}))
            .await?;
        if !ok {
            return Ok(None);
        }
        Ok(validate_outcome(&data)?)
    }

    async fn check_access(
        &self,
        token: &str,
        playbook_path: &str,
        action: &str,
    ) -> Result<AccessReply, AppError> {
        let fields =
            json!({"session_token": token, "playbook_path": playbook_path, "action": action});
        let (ok, data) = self.ask(&self.playbooks.check_access, fields).await?;
        if !ok {
            return Ok(AccessReply {
                allowed: false,
                message: data["message"]
                    .as_str()
                    .unwrap_or("access check failed")
                    .to_owned(),
            });
        }
        Ok(access_outcome(&data)?)
    }

    async fn logout(&self, token: &str) -> Result<(), AppError> {
        // There is no logout playbook; NoETL's REST logout, where it exists, is best effort.
        Ok(self.noetl.logout(token).await?)
    }
}
