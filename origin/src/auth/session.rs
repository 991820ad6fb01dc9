//! The session service: login, validation with a shared cache, access checks, logout.
//!
//! NoETL is the source of truth for sessions; the gateway only caches. A validated session
//! is cached in K/V `sessions` under its [`SessionHash`] for the session's remaining life,
//! stamped with when NoETL last confirmed it, and is *served* from there only for
//! `SESSION_CACHE_TTL` after that and only while [`SessionRecord::is_honoured`]; an older
//! entry is asked about again, and tells the gateway it has seen the token.
//!
//! Revocations ([`Revocations`], fed by a watch on K/V `revoked`): a logout — or NoETL
//! reporting a session the gateway had seen invalid — writes a marker kept until the
//! session's own expiry, so the token is refused on every replica, as a token or behind an
//! edge assertion, even if NoETL cannot end sessions itself.
//!
//! Invalid tokens are cheap ([`super::negative`]): when neither the revocation set nor
//! the shared cache can answer, a token NoETL called invalid in the last
//! `SESSION_NEGATIVE_TTL` is refused from memory, and concurrent validations of one token
//! share one NoETL call (one auth playbook run). The shared cache is read first, so a
//! session a login just cached is never hidden by a negative entry; a login also clears
//! its token's entry on the replica that made it.
//!
//! The store is an optimisation for the session *cache*: if a cache read fails or is slow,
//! validation falls back to NoETL. It is not for the *revocation* check: when the
//! revocation set is not current and the direct `revoked` read fails, validation answers
//! 503 `revocations_unavailable` — never a session that might be logged out
//! (ARCHITECTURE.md "Failure behaviour").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_shared::session::{SessionHash, SessionRecord};
use serde::{Deserialize, Serialize};

use super::backend::AuthBackend;
use super::id_token::IdTokenError;
use super::jwks::IdTokenVerifier;
use super::local::{LocalSessions, LOCAL_MAX};
use super::negative::{Coalescer, NegativeCache, NEGATIVE_MAX};
use super::revocations::{RevocationMarker, RevocationStatus, Revocations};
use crate::error::{AppError, REVOCATIONS_UNAVAILABLE_CODE};
use crate::metrics::Metrics;
use crate::noetl::{AccessReply, LoginOutcome, LoginRequest, NoetlSession};
use crate::store::{Bucket, KvStore, StoreError};

/// Longest a cache lookup may take before the request goes to NoETL instead.
const STORE_TIMEOUT: Duration = Duration::from_millis(750);
/// Asserted sessions whose last check this replica remembers before the map is swept.
const CONFIRMED_MAX: usize = 100_000;
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
    /// Longest a revocation is kept (`REVOKED_MAX_AGE`, the `revoked` bucket's max age):
    /// a marker lives for its session's remaining life up to this, and this long when that
    /// life is unknown.
    pub revoked_keep: Duration,
    /// How long an access decision is reused.
    pub access_ttl: Duration,
    /// The Auth0 domain sent to NoETL with a login (from config, never from the client).
    pub auth0_domain: String,
    /// How long a token NoETL called invalid is refused from memory (`SESSION_NEGATIVE_TTL`).
    pub negative_ttl: Duration,
    /// Longest a validated session is served from this replica's memory without reading
    /// the shared cache (`SESSION_LOCAL_TTL`; `0s`: off; never past `cache_ttl`).
    pub local_ttl: Duration,
}

/// NoETL's answer about a token, shared by the validations that waited for it.
type Answer = Result<Option<NoetlSession>, Arc<AppError>>;

type AccessKey = (String, String, String);

/// A K/V `sessions` entry: the record, and when NoETL last confirmed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedSession {
    #[serde(flatten)]
    record: SessionRecord,
    /// Seconds since the epoch. Absent in entries written before it existed, whose K/V TTL
    /// was the cache TTL: their presence alone means fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checked_at: Option<i64>,
}

impl CachedSession {
    fn is_fresh(&self, now_unix: i64, cache_ttl: Duration) -> bool {
        let ttl = i64::try_from(cache_ttl.as_secs()).unwrap_or(i64::MAX);
        self.checked_at
            .is_none_or(|at| now_unix < at.saturating_add(ttl))
    }

    /// What is left of the entry's freshness at `now_unix` (an entry without `checked_at`
    /// is fresh for its K/V TTL, unknown here: one local TTL is assumed).
    fn fresh_for(&self, now_unix: i64, cache_ttl: Duration) -> Duration {
        match self.checked_at {
            None => cache_ttl,
            Some(at) => {
                let ttl = i64::try_from(cache_ttl.as_secs()).unwrap_or(i64::MAX);
                Duration::from_secs(u64::try_from(at.saturating_add(ttl) - now_unix).unwrap_or(0))
            }
        }
    }
}

/// Login, validation, access checks and logout, shared by every route that needs a user.
pub struct SessionService {
    kv: Arc<dyn KvStore>,
    backend: Arc<dyn AuthBackend>,
    verifier: IdTokenVerifier,
    settings: SessionSettings,
    revocations: Arc<Revocations>,
    access: Mutex<HashMap<AccessKey, (AccessReply, Instant)>>,
    /// When this replica last had NoETL's word (directly or through the shared cache) on a
    /// session that reaches it behind edge assertions.
    confirmed: Mutex<HashMap<SessionHash, Instant>>,
    /// Tokens NoETL recently called invalid.
    negative: NegativeCache,
    /// Sessions this replica validated recently, served without a K/V read.
    local: LocalSessions,
    /// NoETL validations in flight, one per token.
    validations: Coalescer<SessionHash, Answer>,
    metrics: Arc<Metrics>,
}

impl SessionService {
    /// Builds the service over a store, an auth backend (REST or playbooks), an
    /// ID-token verifier and the replica's revocation set (fed by its own watch task).
    pub fn new(
        kv: Arc<dyn KvStore>,
        backend: Arc<dyn AuthBackend>,
        verifier: IdTokenVerifier,
        settings: SessionSettings,
        revocations: Arc<Revocations>,
    ) -> Self {
        Self {
            kv,
            backend,
            verifier,
            negative: NegativeCache::new(settings.negative_ttl, NEGATIVE_MAX),
            local: LocalSessions::new(settings.local_ttl.min(settings.cache_ttl), LOCAL_MAX),
            settings,
            revocations,
            access: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(HashMap::new()),
            validations: Coalescer::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The same service counting negative-cache hits and coalesced validations in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The replica's revocation set.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Whether session `hash` may be served as far as revocations go, for a caller that
    /// carries no token (an edge assertion): 401 `invalid_session` when revoked, 503
    /// `revocations_unavailable` while the set is not current — never a pass on doubt.
    pub fn check_not_revoked(&self, hash: &SessionHash) -> Result<(), AppError> {
        match self.revocations.status(hash, now_unix()) {
            RevocationStatus::Clear => Ok(()),
            RevocationStatus::Revoked => Err(AppError::unauthorized(
                crate::error::SESSION_REFUSED_CODE,
                "session is logged out",
            )),
            RevocationStatus::Unknown => Err(revocations_unavailable()),
        }
    }

    /// Re-checks, at most once per `SESSION_CACHE_TTL` per session on this replica, a
    /// session that arrives behind an edge assertion together with its token. The edge caches
    /// a session for minutes and asserts it without asking NoETL again; this is how a session
    /// NoETL ended by itself is noticed there within `SESSION_CACHE_TTL` (it is then revoked
    /// like a logout, and the edge forgets it on the 401). `Ok(false)`: the session is over.
    /// When NoETL cannot answer, the edge's assertion stands and the check is retried in the
    /// next period.
    pub async fn reconfirm_asserted(
        &self,
        hash: &SessionHash,
        token: &str,
    ) -> Result<bool, AppError> {
        if self.confirmed_recently(hash) {
            return Ok(true);
        }
        match self.validate(token).await {
            Ok(Some(_)) => {
                self.mark_confirmed(hash);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) if e.status().is_server_error() => {
                // Not retried before the next period: a NoETL outage must not cost every
                // asserted request a round trip to it.
                self.mark_confirmed(hash);
                tracing::warn!(session = hash.short(), error = %e, "asserted session not re-checked; the edge's assertion stands");
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    fn confirmed_recently(&self, hash: &SessionHash) -> bool {
        let map = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        map.get(hash)
            .is_some_and(|at| at.elapsed() < self.settings.cache_ttl)
    }

    fn mark_confirmed(&self, hash: &SessionHash) {
        let mut map = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CONFIRMED_MAX {
            let ttl = self.settings.cache_ttl;
            map.retain(|_, at| at.elapsed() < ttl);
            if map.len() >= CONFIRMED_MAX {
                map.clear();
            }
        }
        map.insert(hash.clone(), Instant::now());
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
        self.negative.remove(&hash);
        tracing::info!(session = hash.short(), user = %record.user.user_id, "session created");
        Ok(LoginSuccess {
            session_token,
            record,
        })
    }

    /// The session behind `token`, or `None` if it is unknown, expired or revoked; 503
    /// `revocations_unavailable` when whether it is revoked cannot be told.
    pub async fn validate(&self, token: &str) -> Result<Option<SessionRecord>, AppError> {
        let hash = SessionHash::of(token);
        let now = now_unix();
        let cached = match self.revocations.status(&hash, now) {
            RevocationStatus::Revoked => return Ok(None),
            RevocationStatus::Clear => {
                if let Some(record) = self.local.get(&hash, now) {
                    return Ok(Some(record));
                }
                self.store_get(Bucket::Sessions, &hash).await
            }
            // The set cannot answer: read the marker itself, and refuse to guess.
            RevocationStatus::Unknown => {
                let (cached, revoked) = tokio::join!(
                    self.store_get(Bucket::Sessions, &hash),
                    self.store_get(Bucket::Revoked, &hash)
                );
                match revoked {
                    Ok(Some(marker)) => {
                        let exp =
                            RevocationMarker::expiry_of(&marker, now, self.settings.revoked_keep);
                        self.revocations.insert(&hash, exp);
                        return Ok(None);
                    }
                    Ok(None) => {}
                    Err(_) => return Err(revocations_unavailable()),
                }
                cached
            }
        };
        let mut seen = None;
        let absent = matches!(cached, Ok(None));
        if let Ok(Some(bytes)) = cached {
            match serde_json::from_slice::<CachedSession>(&bytes) {
                Ok(c) if c.record.is_honoured(now) && c.is_fresh(now, self.settings.cache_ttl) => {
                    self.local
                        .insert(&hash, &c.record, c.fresh_for(now, self.settings.cache_ttl));
                    return Ok(Some(c.record));
                }
                Ok(c) => seen = Some(c.record),
                Err(e) => {
                    tracing::warn!(session = hash.short(), error = %e, "unreadable cached session dropped")
                }
            }
        }
        if self.negative.contains(&hash) {
            self.metrics.session_negative_hits.inc();
            return Ok(None);
        }
        let Some(session) = self.ask_noetl(&hash, token).await? else {
            // A session the gateway has served and NoETL has ended: revoke it like a
            // logout, so edge assertions and open connections of it end too.
            if let Some(record) = seen.filter(|r| r.expires_at_unix > now) {
                match self.revoke(&hash, Some(record.expires_at_unix)).await {
                    Ok(()) => {
                        tracing::info!(session = hash.short(), "session ended by NoETL; revoked")
                    }
                    Err(e) => {
                        tracing::warn!(session = hash.short(), error = %e, "session ended by NoETL not revoked")
                    }
                }
            }
            if !absent {
                self.forget(&hash).await;
            }
            self.negative.insert(&hash);
            return Ok(None);
        };
        let record = to_record(session);
        if !record.is_honoured(now) {
            self.negative.insert(&hash);
            return Ok(None);
        }
        self.remember(&hash, &record).await;
        Ok(Some(record))
    }

    /// NoETL's word on `token`, asked once however many requests want it at the same time.
    async fn ask_noetl(
        &self,
        hash: &SessionHash,
        token: &str,
    ) -> Result<Option<NoetlSession>, AppError> {
        let backend = self.backend.clone();
        let token = token.to_owned();
        let ask = async move { backend.validate_session(&token).await.map_err(Arc::new) };
        let (answer, joined) = self.validations.run(hash.clone(), ask).await;
        if joined {
            self.metrics.session_validations_coalesced.inc();
        }
        match answer {
            Some(Ok(session)) => Ok(session),
            Some(Err(e)) => Err(Arc::try_unwrap(e).unwrap_or_else(|e| shared_error(&e))),
            None => Err(AppError::Internal(
                "the session validation task failed".into(),
            )),
        }
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

    /// Ends a session: revocation marker first (so no replica re-caches or serves it), kept
    /// until the session's own expiry as the cache or NoETL reports it; then the cache
    /// entry, then NoETL where it supports logout. Idempotent.
    ///
    /// A token that is neither in the shared cache (read and found absent) nor known to
    /// NoETL gets a marker for one `SESSION_CACHE_TTL` only — the longest any cache could
    /// still hold a copy — not `REVOKED_MAX_AGE`: otherwise logging out random tokens would
    /// grow every replica's revocation set for 30 days.
    pub async fn logout(&self, token: &str) -> Result<(), AppError> {
        let hash = SessionHash::of(token);
        let read = self.store_get(Bucket::Sessions, &hash).await;
        let absent_from_cache = matches!(read, Ok(None));
        let cached = match read {
            Ok(Some(bytes)) => serde_json::from_slice::<CachedSession>(&bytes)
                .map(|c| c.record.expires_at_unix)
                .ok(),
            _ => None,
        };
        let expires = match cached {
            Some(exp) => Some(exp),
            None => match self.backend.validate_session(token).await {
                Ok(Some(session)) => Some(session.expires_at_unix),
                Ok(None) if absent_from_cache => {
                    let ttl = i64::try_from(self.settings.cache_ttl.as_secs()).unwrap_or(i64::MAX);
                    Some(now_unix().saturating_add(ttl))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(session = hash.short(), error = %e, "session expiry unknown at logout; keeping the revocation for REVOKED_MAX_AGE");
                    None
                }
            },
        };
        self.revoke(&hash, expires).await?;
        self.forget(&hash).await;
        if let Err(e) = self.backend.logout(token).await {
            tracing::warn!(session = hash.short(), error = %e, "NoETL logout failed; the gateway's revocation still holds");
        }
        tracing::info!(session = hash.short(), "session logged out");
        Ok(())
    }

    /// Writes the revocation marker of `hash`, kept until `expires_at_unix` (at most
    /// `REVOKED_MAX_AGE` from now; that long when unknown), and records it in this
    /// replica's set at once (the others learn it from their watch).
    async fn revoke(
        &self,
        hash: &SessionHash,
        expires_at_unix: Option<i64>,
    ) -> Result<(), AppError> {
        let now = now_unix();
        let cap = i64::try_from(self.settings.revoked_keep.as_secs()).unwrap_or(i64::MAX);
        let latest = now.saturating_add(cap);
        let exp = expires_at_unix.unwrap_or(latest).clamp(now + 1, latest);
        let keep = Duration::from_secs(u64::try_from(exp - now).unwrap_or(1));
        let marker = RevocationMarker {
            expires_at_unix: exp,
        };
        self.kv
            .put_with_ttl(Bucket::Revoked, hash.as_str(), marker.to_bytes(), keep)
            .await?;
        self.revocations.insert(hash, exp);
        self.local.remove(hash);
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

    /// Caches a session NoETL just confirmed, for its remaining life (served for the cache
    /// TTL; after that the entry only says the gateway has seen the token).
    async fn remember(&self, hash: &SessionHash, record: &SessionRecord) {
        self.local.insert(hash, record, self.settings.cache_ttl);
        let now = now_unix();
        let ttl = Duration::from_secs(record.remaining_secs(now));
        let entry = CachedSession {
            record: record.clone(),
            checked_at: Some(now),
        };
        let value = match serde_json::to_vec(&entry) {
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
        self.local.remove(hash);
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

/// How long until the instant `unix` (seconds since the epoch), to the millisecond; zero
/// once it has passed. For a connection that must end at its session's expiry, not after.
pub fn until_unix(unix: i64) -> Duration {
    let left = unix
        .saturating_mul(1000)
        .saturating_sub(chrono::Utc::now().timestamp_millis());
    Duration::from_millis(u64::try_from(left).unwrap_or(0))
}

/// 503 `revocations_unavailable`: whether a session is revoked cannot be told right now.
pub fn revocations_unavailable() -> AppError {
    AppError::Unavailable {
        code: REVOCATIONS_UNAVAILABLE_CODE,
        message: "cannot check session revocations right now, retry shortly".into(),
    }
}

/// A copy of an error one validation got, for the others that waited for the same answer
/// (the failures a backend returns keep their status and code).
fn shared_error(e: &AppError) -> AppError {
    match e {
        AppError::Noetl(n) => AppError::Noetl(n.clone()),
        AppError::Unavailable { code, message } => AppError::Unavailable {
            code,
            message: message.clone(),
        },
        AppError::Unauthorized { code, message } => AppError::Unauthorized {
            code,
            message: message.clone(),
        },
        AppError::Store(s) => AppError::Unavailable {
            code: "store_unavailable",
            message: format!("{s}"),
        },
        other => AppError::Internal(other.to_string()),
    }
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
