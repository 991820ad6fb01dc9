//! The session service: login, validation with a shared cache, access checks, logout.
//!
//! NoETL is the source of truth for sessions; the gateway only caches. A validated session
//! is cached in K/V `sessions` under its [`SessionHash`] for at most `SESSION_CACHE_TTL`
//! and never past its own expiry, and is served from there only while
//! [`SessionRecord::is_honoured`]. Logout writes a revocation marker (K/V `revoked`, kept
//! for the session's remaining life) that every replica checks together with the cache, so
//! a logged-out token is refused everywhere even if NoETL cannot end sessions itself.
//!
//! The store is an optimisation here, not a dependency: if it fails or is slow, requests
//! fall back to NoETL (slower, still correct — ARCHITECTURE.md "Failure behaviour").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_shared::session::{SessionHash, SessionRecord};

use super::backend::AuthBackend;
use super::id_token::IdTokenError;
use super::jwks::IdTokenVerifier;
use crate::error::AppError;
use crate::noetl::{AccessReply, LoginOutcome, LoginRequest, NoetlSession};
use crate::store::{Bucket, KvStore, StoreError};

/// Longest a cache lookup may take before the request goes to NoETL instead.
const STORE_TIMEOUT: Duration = Duration::from_millis(750);
/// Access decisions kept per replica before the map is swept.
const ACCESS_CACHE_MAX: usize = 10_000;

/// The permissions a playbook access check can ask for (PROTOCOL.md §1).
pub const PERMISSIONS: [&str; 3] = ["execute", "view", "modify"];

/// Longest playbook path accepted in an access check.
const MAX_PLAYBOOK_PATH: usize = 512;

/// A playbook path an access check may name: 1..=512 bytes, no control characters.
pub fn is_valid_playbook_path(p: &str) -> bool {
    !p.is_empty() && p.len() <= MAX_PLAYBOOK_PATH && !p.chars().any(char::is_control)
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoginSuccess {
    /// The new raw session token (returned to the client once).
    pub session_token: String,
    /// The session as cached.
    pub record: SessionRecord,
}

/// Settings of the session service.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Longest a validated session is served from the cache.
    pub cache_ttl: Duration,
    /// Longest a revocation is kept (the longest session life).
    pub max_life: Duration,
    /// How long an access decision is reused.
    pub access_ttl: Duration,
    /// The Auth0 domain sent to NoETL with a login (from config, never from the client).
    pub auth0_domain: String,
}

type AccessKey = (String, String, String);

/// Login, validation, access checks and logout, shared by every route that needs a user.
pub struct SessionService {
    kv: Arc<dyn KvStore>,
    backend: Arc<dyn AuthBackend>,
    verifier: IdTokenVerifier,
    settings: SessionSettings,
    access: Mutex<HashMap<AccessKey, (AccessReply, Instant)>>,
}

impl SessionService {
    /// Builds the service over a store, an auth backend (REST or playbooks) and an
    /// ID-token verifier.
    pub fn new(
        kv: Arc<dyn KvStore>,
        backend: Arc<dyn AuthBackend>,
        verifier: IdTokenVerifier,
        settings: SessionSettings,
    ) -> Self {
        Self {
            kv,
            backend,
            verifier,
            settings,
            access: Mutex::new(HashMap::new()),
        }
    }

    /// Verifies an ID token, asks NoETL for a session, caches it.
    pub async fn login(&self, id_token: &str, client_ip: &str) -> Result<LoginSuccess, AppError> {
        let claims = self
            .verifier
            .verify(id_token)
            .await
            .map_err(id_token_error)?;
        tracing::debug!(sub = %claims.sub, "ID token verified");
        let outcome = self
            .backend
            .login(&LoginRequest {
                auth0_token: id_token,
                auth0_domain: &self.settings.auth0_domain,
                client_ip,
            })
            .await?;
        let (session_token, session) = match outcome {
            LoginOutcome::Authenticated {
                session_token,
                session,
            } => (session_token, session),
            LoginOutcome::Rejected { message } => {
                return Err(AppError::unauthorized("login_refused", message));
            }
        };
        let record = to_record(session);
        let hash = SessionHash::of(&session_token);
        if !record.is_honoured(now_unix()) {
            return Err(AppError::Noetl(crate::noetl::NoetlError::BadResponse(
                "NoETL created a session that is already expired".into(),
            )));
        }
        self.remember(&hash, &record).await;
        tracing::info!(session = hash.short(), user = %record.user.user_id, "session created");
        Ok(LoginSuccess {
            session_token,
            record,
        })
    }

    /// The session behind `token`, or `None` if it is unknown, expired or revoked.
    pub async fn validate(&self, token: &str) -> Result<Option<SessionRecord>, AppError> {
        let hash = SessionHash::of(token);
        let (cached, revoked) = tokio::join!(
            self.store_get(Bucket::Sessions, &hash),
            self.store_get(Bucket::Revoked, &hash)
        );
        if matches!(revoked, Ok(Some(_))) {
            return Ok(None);
        }
        let now = now_unix();
        if let Ok(Some(bytes)) = cached {
            match serde_json::from_slice::<SessionRecord>(&bytes) {
                Ok(record) if record.is_honoured(now) => return Ok(Some(record)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(session = hash.short(), error = %e, "unreadable cached session dropped")
                }
            }
        }
        let Some(session) = self.backend.validate_session(token).await? else {
            self.forget(&hash).await;
            return Ok(None);
        };
        let record = to_record(session);
        if !record.is_honoured(now) {
            return Ok(None);
        }
        self.remember(&hash, &record).await;
        Ok(Some(record))
    }

    /// Whether the session's user may perform `permission` on `playbook_path`, reusing a
    /// recent decision for the same (user, path, permission).
    pub async fn check_access(
        &self,
        token: &str,
        record: &SessionRecord,
        playbook_path: &str,
        permission: &str,
    ) -> Result<AccessReply, AppError> {
        let key = (
            record.user.user_id.clone(),
            playbook_path.to_owned(),
            permission.to_owned(),
        );
        if let Some(hit) = self.access_lookup(&key) {
            return Ok(hit);
        }
        let reply = self
            .backend
            .check_access(token, playbook_path, permission)
            .await?;
        self.access_insert(key, reply.clone());
        Ok(reply)
    }

    /// Ends a session: revocation marker first (so no replica re-caches it), then the cache
    /// entry, then NoETL where it supports logout. Idempotent.
    pub async fn logout(&self, token: &str) -> Result<(), AppError> {
        let hash = SessionHash::of(token);
        let now = now_unix();
        let remaining = match self.store_get(Bucket::Sessions, &hash).await {
            Ok(Some(bytes)) => serde_json::from_slice::<SessionRecord>(&bytes)
                .map(|r| r.remaining_secs(now))
                .ok(),
            _ => None,
        };
        let keep = remaining
            .map(Duration::from_secs)
            .unwrap_or(self.settings.max_life)
            .clamp(Duration::from_secs(1), self.settings.max_life);
        self.kv
            .put_with_ttl(
                Bucket::Revoked,
                hash.as_str(),
                Bytes::from_static(b"1"),
                keep,
            )
            .await?;
        self.forget(&hash).await;
        if let Err(e) = self.backend.logout(token).await {
            tracing::warn!(session = hash.short(), error = %e, "NoETL logout failed; the gateway's revocation still holds");
        }
        tracing::info!(session = hash.short(), "session logged out");
        Ok(())
    }

    async fn store_get(
        &self,
        bucket: Bucket,
        hash: &SessionHash,
    ) -> Result<Option<Bytes>, StoreError> {
        match tokio::time::timeout(STORE_TIMEOUT, self.kv.get(bucket, hash.as_str())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(bucket = bucket.name(), error = %e, "session store read failed; asking NoETL");
                Err(e)
            }
            Err(_) => {
                tracing::warn!(
                    bucket = bucket.name(),
                    "session store read timed out; asking NoETL"
                );
                Err(StoreError::Unavailable("timeout".into()))
            }
        }
    }

    async fn remember(&self, hash: &SessionHash, record: &SessionRecord) {
        let ttl =
            Duration::from_secs(record.remaining_secs(now_unix())).min(self.settings.cache_ttl);
        let value = match serde_json::to_vec(record) {
            Ok(v) => Bytes::from(v),
            Err(e) => return tracing::error!(error = %e, "session record did not serialise"),
        };
        let put = self
            .kv
            .put_with_ttl(Bucket::Sessions, hash.as_str(), value, ttl);
        match tokio::time::timeout(STORE_TIMEOUT, put).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "session not cached"),
            Err(_) => tracing::warn!("session cache write timed out"),
        }
    }

    async fn forget(&self, hash: &SessionHash) {
        if let Err(e) = self.kv.delete(Bucket::Sessions, hash.as_str()).await {
            tracing::warn!(session = hash.short(), error = %e, "cached session not deleted");
        }
    }

    fn access_lookup(&self, key: &AccessKey) -> Option<AccessReply> {
        let map = self.access.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, at)| at.elapsed() < self.settings.access_ttl)
            .map(|(reply, _)| reply.clone())
    }

    fn access_insert(&self, key: AccessKey, reply: AccessReply) {
        let mut map = self.access.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= ACCESS_CACHE_MAX {
            let ttl = self.settings.access_ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= ACCESS_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(key, (reply, Instant::now()));
    }
}

fn to_record(s: NoetlSession) -> SessionRecord {
    SessionRecord {
        user: s.user,
        expires_at: s.expires_at,
        expires_at_unix: s.expires_at_unix,
        is_active: true,
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn id_token_error(e: IdTokenError) -> AppError {
    if e.is_client_error() {
        AppError::unauthorized(e.code(), format!("ID token refused: {e}"))
    } else {
        AppError::Unavailable {
            code: e.code(),
            message: format!("cannot verify ID tokens right now: {e}"),
        }
    }
}
