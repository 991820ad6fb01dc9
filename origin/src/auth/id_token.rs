//! Verification of Auth0 (OIDC) ID tokens, done by the origin before any session is created.
//!
//! `POST /api/auth/login` hands us whatever a client sends; nothing in it is trusted until
//! [`IdTokenVerifier::verify`] says so (PROTOCOL.md §1, ARCHITECTURE.md "Security model").
//!
//! # What is checked, in this order
//!
//! 1. **Size**: a token over [`MAX_TOKEN_BYTES`] is refused unparsed, so a hostile client cannot
//!    make us base64-decode and JSON-parse megabytes.
//! 2. **Shape**: three base64url parts with a JSON header (jwt-compact's `UntrustedToken`).
//! 3. **Algorithm pinning**: `alg` must be exactly `RS256`, checked *before* any key is looked up.
//!    The algorithm is never taken from the token to choose how to verify it. That rules out
//!    `alg: none`, and the classic HS/RS confusion: an attacker who knows our RSA *public* key
//!    (it is published in the JWKS) signs a token with HS256 using the key's PEM/DER bytes as the
//!    HMAC secret; a verifier that lets the header pick the algorithm "verifies" it with the same
//!    public bytes. Here any `alg` other than `RS256` (HS*, RS384/512, PS*, ES*, …) is
//!    [`IdTokenError::UnsupportedAlgorithm`]. `typ` is ignored.
//! 4. **Key selection**: the header must name a `kid`; the key comes only from the configured JWKS
//!    (never from `jku`/`x5u`/`jwk` header fields), and only keys with `kty: RSA`, `use` absent or
//!    `sig`, `alg` absent or `RS256`, and a modulus of at least 2048 bits are kept.
//! 5. **Signature**: RSASSA-PKCS1-v1_5 with SHA-256 over the raw `header.payload` bytes. The claims
//!    are not even parsed until the signature holds (jwt-compact's `Validator` parses them first;
//!    we verify by hand so unauthenticated JSON is never interpreted).
//! 6. **Claims**: `iss` equals the configured issuer exactly; `aud` (string or array) contains the
//!    configured audience, and `azp`, when present, equals it (OIDC Core 3.1.3.7); `exp` is
//!    required and not past (with leeway); `nbf`, if present, not in the future (with leeway);
//!    `iat` is parsed but not judged; `sub` is required.
//!
//! # JWKS caching and refresh
//!
//! The key set is fetched lazily on the first verification and kept in memory. It is fetched
//! again when
//! - a token names a `kid` we do not hold (Auth0 rotated its signing key), or
//! - the set is older than [`IdTokenConfig::cache_ttl`] (lazy refresh on the next verification).
//!
//! Every fetch attempt, successful or not, is at most once per
//! [`IdTokenConfig::min_refresh_interval`]: tokens with made-up `kid`s cannot turn us into an
//! amplifier against the identity provider. Concurrent refreshes are coalesced: one fetch runs at
//! a time (in its own task, so a cancelled login does not cancel it) and callers that queued
//! behind it reuse its result instead of fetching again. A fetch is bounded by the HTTP client's
//! timeout, a [`JWKS_FETCH_TIMEOUT`] overall deadline and a [`MAX_JWKS_BYTES`] body cap.
//!
//! When a refresh fails, a key we already hold keeps working (an identity-provider outage does
//! not log everyone out of new logins signed with a known key); a `kid` we do not hold then gives
//! [`IdTokenError::JwksUnavailable`] (503, retry later) rather than a 401. A successful refresh
//! replaces the whole set, so a key the provider removed stops verifying.
//!
//! Tokens are never logged. Key ids and refresh events are, at debug/info level.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use jwt_compact::alg::{Rsa, RsaPublicKey, RsaSignature};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmSignature, Claims, UntrustedToken};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Deserializer, Serialize};
use url::Url;

/// Largest ID token accepted, in bytes; larger ones are refused without being parsed.
///
/// Auth0 ID tokens are 1–2 KiB; 16 KiB leaves room for generous custom claims.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Largest JWKS document read from the identity provider, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Overall deadline of one JWKS fetch (connect, headers and body), on top of the HTTP
/// client's own timeout, so a trickling server cannot hold a refresh open.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Default allowed clock skew for `exp` / `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Default minimum spacing of JWKS fetches.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Default age after which the JWKS is fetched again on the next verification.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60 * 60);

/// The only accepted `alg`.
const PINNED_ALG: &str = "RS256";

/// Smallest RSA modulus accepted from the JWKS (RFC 7518 §3.3).
const MIN_RSA_BITS: usize = 2048;

/// Where ID tokens come from and what they must say; built once at start from `Config`.
#[derive(Debug, Clone)]
pub struct IdTokenConfig {
    /// The JWKS document: `AUTH_JWKS_URL`, or `https://{AUTH0_DOMAIN}/.well-known/jwks.json`.
    /// Always from configuration: a client-supplied domain is never trusted.
    pub jwks_url: Url,
    /// The exact `iss` required (Auth0: `https://{domain}/`, trailing slash included).
    pub issuer: String,
    /// The value `aud` must contain: the Auth0 application's client id.
    pub audience: String,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    pub leeway: Duration,
    /// JWKS fetches (for an unknown `kid` or a stale set) happen at most this often.
    pub min_refresh_interval: Duration,
    /// Age after which the JWKS is fetched again on the next verification.
    pub cache_ttl: Duration,
}

impl IdTokenConfig {
    /// A configuration with the default leeway (30 s), refresh interval (10 s) and TTL (1 h).
    pub fn new(jwks_url: Url, issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            jwks_url,
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            cache_ttl: DEFAULT_CACHE_TTL,
        }
    }
}

/// The identity an ID token vouches for, available only once every check has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdClaims {
    /// The provider's stable user id (`auth0|…`, `google-oauth2|…`): the one to key users on.
    pub sub: String,
    /// The user's e-mail, if the token carries one; see `email_verified` before trusting it.
    #[serde(default)]
    pub email: Option<String>,
    /// Whether the provider verified `email`.
    #[serde(default)]
    pub email_verified: Option<bool>,
    /// Full display name, if present.
    #[serde(default)]
    pub name: Option<String>,
    /// Auth0's short name, a fallback when `name` is absent.
    #[serde(default)]
    pub nickname: Option<String>,
    /// The issuer; always equal to [`IdTokenConfig::issuer`].
    pub iss: String,
    /// Every audience of the token (a single-string `aud` becomes a one-element list).
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// When the ID token expires; a session may outlive it (NoETL decides session life).
    pub expires_at: DateTime<Utc>,
    /// When the token was issued, if it says.
    #[serde(default)]
    pub issued_at: Option<DateTime<Utc>>,
}

/// Why an ID token was refused. Each maps to one stable machine code via [`Self::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    /// Not a JWT we can read: too large, bad base64/JSON, or a required claim is missing or of
    /// the wrong type.
    #[error("the ID token is not a well-formed JWT")]
    Malformed,
    /// The header names an algorithm other than RS256 (shown sanitised and truncated).
    #[error("ID token algorithm `{0}` is not accepted; only RS256 is")]
    UnsupportedAlgorithm(String),
    /// No `kid` in the header, or no usable key with that id in the provider's JWKS.
    #[error("the ID token is not signed by a known key of the identity provider")]
    UnknownKey,
    /// The RS256 signature does not match the key.
    #[error("the ID token signature is invalid")]
    BadSignature,
    /// `iss` is missing or not the configured issuer.
    #[error("the ID token was issued by an unexpected issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience (or `azp` names someone else).
    #[error("the ID token is not meant for this application")]
    WrongAudience,
    /// `exp` is in the past, beyond the leeway.
    #[error("the ID token has expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("the ID token is not valid yet")]
    NotYetValid,
    /// The provider's key set could not be fetched; the message says what an operator should
    /// look at (URL, status, cause). Never contains a token.
    #[error("the identity provider's signing keys are unavailable: {0}")]
    JwksUnavailable(String),
}

impl IdTokenError {
    /// The stable `snake_case` code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed => "id_token_malformed",
            Self::UnsupportedAlgorithm(_) => "id_token_unsupported_algorithm",
            Self::UnknownKey => "id_token_unknown_key",
            Self::BadSignature => "id_token_bad_signature",
            Self::WrongIssuer => "id_token_wrong_issuer",
            Self::WrongAudience => "id_token_wrong_audience",
            Self::Expired => "id_token_expired",
            Self::NotYetValid => "id_token_not_yet_valid",
            Self::JwksUnavailable(_) => "id_token_jwks_unavailable",
        }
    }

    /// `true` when the token itself is at fault (→ 401); `false` only for
    /// [`Self::JwksUnavailable`], which is our side's problem (→ 503, retry later).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::JwksUnavailable(_))
    }
}

/// Verifies ID tokens against the provider's JWKS, which it caches and refreshes itself.
///
/// Cheap to clone (one `Arc`); clones share the key cache, so build one at start and hand it to
/// every handler.
#[derive(Clone)]
pub struct IdTokenVerifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for IdTokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.read_state();
        f.debug_struct("IdTokenVerifier")
            .field("config", &self.inner.config)
            .field("kids", &state.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl IdTokenVerifier {
    /// A verifier that fetches the JWKS lazily, on the first [`Self::verify`].
    ///
    /// `http` should carry a request timeout; fetches are also capped at [`JWKS_FETCH_TIMEOUT`].
    pub fn new(config: IdTokenConfig, http: reqwest::Client) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                http,
                state: RwLock::new(KeyCache::default()),
                refresh_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Checks `token` completely (see the module docs) and returns who it vouches for.
    ///
    /// Must run inside a tokio runtime (a JWKS fetch is spawned as its own task).
    pub async fn verify(&self, token: &str) -> Result<IdClaims, IdTokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(IdTokenError::Malformed);
        }
        let untrusted = UntrustedToken::new(token).map_err(|_| IdTokenError::Malformed)?;
        if untrusted.algorithm() != PINNED_ALG {
            return Err(IdTokenError::UnsupportedAlgorithm(sanitize(
                untrusted.algorithm(),
                32,
            )));
        }
        let kid = match untrusted.header().key_id.as_deref() {
            Some(kid) if !kid.is_empty() => kid,
            _ => return Err(IdTokenError::UnknownKey),
        };
        let key = self.inner.key_for(kid).await?;

        // The signing input is the token up to its last dot, exactly the bytes jwt-compact
        // would verify; `UntrustedToken::new` already proved there are three parts.
        let (signing_input, _) = token.rsplit_once('.').ok_or(IdTokenError::Malformed)?;
        let signature = RsaSignature::try_from_slice(untrusted.signature_bytes())
            .map_err(|_| IdTokenError::BadSignature)?;
        if !Rsa::rs256().verify_signature(&signature, &key, signing_input.as_bytes()) {
            tracing::debug!(kid = %sanitize(kid, 64), "ID token signature mismatch");
            return Err(IdTokenError::BadSignature);
        }

        let claims = untrusted
            .deserialize_claims_unchecked::<RawIdClaims>()
            .map_err(|_| IdTokenError::Malformed)?;
        check_claims(claims, &self.inner.config, Utc::now())
    }
}

/// The claims as they appear in the token, before the policy in [`check_claims`] is applied.
/// Duplicate keys are a parse error (serde derive), so no parser-differential games.
#[derive(Debug, Deserialize)]
struct RawIdClaims {
    sub: String,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default, deserialize_with = "opt_one_or_many")]
    aud: Option<Vec<String>>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    nickname: Option<String>,
}

/// The claim policy: a pure function of authenticated claims, the configuration and `now`.
///
/// Time arithmetic is checked: jwt-compact's `validate_maturity` computes `nbf - leeway`
/// with a panicking subtraction, which an extreme `nbf` would trip.
fn check_claims(
    claims: Claims<RawIdClaims>,
    config: &IdTokenConfig,
    now: DateTime<Utc>,
) -> Result<IdClaims, IdTokenError> {
    let raw = claims.custom;
    let iss = raw.iss.ok_or(IdTokenError::WrongIssuer)?;
    if iss != config.issuer {
        return Err(IdTokenError::WrongIssuer);
    }
    let aud = raw.aud.ok_or(IdTokenError::WrongAudience)?;
    if !aud.contains(&config.audience) {
        return Err(IdTokenError::WrongAudience);
    }
    if raw.azp.as_ref().is_some_and(|azp| *azp != config.audience) {
        return Err(IdTokenError::WrongAudience);
    }

    let leeway = TimeDelta::from_std(config.leeway).unwrap_or(TimeDelta::MAX);
    let expires_at = claims.expiration.ok_or(IdTokenError::Malformed)?;
    let latest = expires_at
        .checked_add_signed(leeway)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if now > latest {
        return Err(IdTokenError::Expired);
    }
    if let Some(not_before) = claims.not_before {
        let earliest = not_before
            .checked_sub_signed(leeway)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        if now < earliest {
            return Err(IdTokenError::NotYetValid);
        }
    }

    Ok(IdClaims {
        sub: raw.sub,
        email: raw.email,
        email_verified: raw.email_verified,
        name: raw.name,
        nickname: raw.nickname,
        iss,
        aud,
        expires_at,
        issued_at: claims.issued_at,
    })
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for Vec<String> {
    fn from(value: OneOrMany) -> Self {
        match value {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    OneOrMany::deserialize(d).map(Into::into)
}

fn opt_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Option::<OneOrMany>::deserialize(d).map(|v| v.map(Into::into))
}

/// Attacker-chosen text made safe for logs and error messages: printable ASCII, bounded.
fn sanitize(s: &str, max_chars: usize) -> String {
    s.chars()
        .take(max_chars)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// The JWKS URL as shown to operators: any userinfo removed.
fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    // Both fail only for URLs that cannot have credentials, which is fine to ignore.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Shared state behind [`IdTokenVerifier`].
struct Inner {
    config: IdTokenConfig,
    http: reqwest::Client,
    /// Never held across an `.await`.
    state: RwLock<KeyCache>,
    /// Held for the duration of one fetch: at most one in flight.
    refresh_lock: tokio::sync::Mutex<()>,
}

/// The cached key set and the bookkeeping for the refresh policy.
#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Arc<RsaPublicKey>>,
    /// Last successful fetch; `None` until the first one.
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not: what the rate limit is measured from.
    last_attempt: Option<Instant>,
    /// Number of attempts so far; lets a queued caller see that someone else just fetched.
    attempts: u64,
    /// Why the last attempt failed; `None` if it succeeded.
    last_error: Option<String>,
}

/// What a caller saw in the cache.
struct Lookup {
    key: Option<Arc<RsaPublicKey>>,
    fresh: bool,
    loaded: bool,
    attempts: u64,
    last_error: Option<String>,
}

/// Result of asking for a refresh.
#[derive(Debug)]
enum Refresh {
    /// The key set was fetched (by us or by the fetch we queued behind).
    Done,
    /// The fetch (ours or the one we queued behind) failed.
    Failed(String),
    /// Skipped: the last attempt was less than `min_refresh_interval` ago.
    RateLimited,
}

impl Inner {
    fn read_state(&self) -> RwLockReadGuard<'_, KeyCache> {
        // The cache holds no invariant a panicking writer could break halfway.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, KeyCache> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup(&self, kid: &str) -> Lookup {
        let state = self.read_state();
        Lookup {
            key: state.keys.get(kid).cloned(),
            fresh: state
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.config.cache_ttl),
            loaded: state.fetched_at.is_some(),
            attempts: state.attempts,
            last_error: state.last_error.clone(),
        }
    }

    /// The verifying key for `kid`, refreshing the JWKS when the policy allows.
    async fn key_for(self: &Arc<Self>, kid: &str) -> Result<Arc<RsaPublicKey>, IdTokenError> {
        let seen = self.lookup(kid);
        if let (Some(key), true) = (&seen.key, seen.fresh) {
            return Ok(key.clone());
        }
        let reason = match (&seen.key, seen.loaded) {
            (Some(_), _) => "key set older than cache_ttl",
            (None, false) => "first use",
            (None, true) => "unknown kid",
        };
        tracing::debug!(kid = %sanitize(kid, 64), reason, "JWKS refresh wanted");
        let outcome = self.refresh(seen.attempts, reason).await;

        let after = self.lookup(kid);
        if let Some(key) = after.key {
            return Ok(key);
        }
        match outcome {
            Refresh::Done => {
                tracing::info!(kid = %sanitize(kid, 64), "ID token names a kid absent from the JWKS");
                Err(IdTokenError::UnknownKey)
            }
            Refresh::Failed(msg) => Err(IdTokenError::JwksUnavailable(msg)),
            Refresh::RateLimited if after.loaded => Err(IdTokenError::UnknownKey),
            Refresh::RateLimited => Err(IdTokenError::JwksUnavailable(format!(
                "{}; next attempt within {:?}",
                after
                    .last_error
                    .or(seen.last_error)
                    .unwrap_or_else(|| "JWKS not fetched yet".to_owned()),
                self.config.min_refresh_interval
            ))),
        }
    }

    /// Fetches the JWKS unless someone else just did or the rate limit says no.
    ///
    /// Runs in its own task so that a caller going away (client disconnect) does not cancel a
    /// fetch others are queued behind.
    async fn refresh(self: &Arc<Self>, seen_attempts: u64, reason: &'static str) -> Refresh {
        let inner = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _one_at_a_time = inner.refresh_lock.lock().await;
            {
                let state = inner.read_state();
                if state.attempts != seen_attempts {
                    // A fetch finished while we queued: coalesce onto its result.
                    return match &state.last_error {
                        None => Refresh::Done,
                        Some(msg) => Refresh::Failed(msg.clone()),
                    };
                }
                if state
                    .last_attempt
                    .is_some_and(|at| at.elapsed() < inner.config.min_refresh_interval)
                {
                    tracing::debug!(reason, "JWKS refresh skipped: rate limited");
                    return Refresh::RateLimited;
                }
            }

            let result = inner.fetch_jwks().await;
            let mut state = inner.write_state();
            state.attempts += 1;
            state.last_attempt = Some(Instant::now());
            match result {
                Ok(keys) => {
                    let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
                    kids.sort_unstable();
                    tracing::info!(
                        jwks_url = %shown_url(&inner.config.jwks_url),
                        ?kids,
                        reason,
                        "JWKS refreshed"
                    );
                    state.keys = keys;
                    state.fetched_at = state.last_attempt;
                    state.last_error = None;
                    Refresh::Done
                }
                Err(msg) => {
                    tracing::warn!(error = %msg, reason, "JWKS refresh failed; keeping the previous key set");
                    state.last_error = Some(msg.clone());
                    Refresh::Failed(msg)
                }
            }
        });
        task.await.unwrap_or_else(|err| {
            Refresh::Failed(format!(
                "JWKS refresh task for {} did not finish: {err}",
                shown_url(&self.config.jwks_url)
            ))
        })
    }

    /// One bounded GET of the JWKS, parsed into usable keys. Errors are operator-facing text.
    async fn fetch_jwks(&self) -> Result<HashMap<String, Arc<RsaPublicKey>>, String> {
        let url = shown_url(&self.config.jwks_url);
        let fetch = async {
            let mut response = self
                .http
                .get(self.config.jwks_url.clone())
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|err| format!("GET {url} failed: {}", error_chain(err)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!(
                    "GET {url} answered HTTP {status}; expected 200 with a JWKS document \
                     (check AUTH0_DOMAIN / AUTH_JWKS_URL)"
                ));
            }
            if response
                .content_length()
                .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
            {
                return Err(format!(
                    "GET {url}: JWKS is larger than {MAX_JWKS_BYTES} bytes"
                ));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|err| {
                format!("GET {url}: reading the body failed: {}", error_chain(err))
            })? {
                if body.len() + chunk.len() > MAX_JWKS_BYTES {
                    return Err(format!(
                        "GET {url}: JWKS is larger than {MAX_JWKS_BYTES} bytes"
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            parse_jwks(&body).map_err(|why| format!("GET {url}: {why}"))
        };
        tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("GET {url} timed out after {JWKS_FETCH_TIMEOUT:?}"))?
    }
}

/// A reqwest error with its causes ("connection refused" lives in the source chain).
fn error_chain(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The JWKS document: only `keys` matters; each key is judged on its own.
#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

/// Keeps the keys usable for RS256 signatures, by `kid`. Unusable entries (EC keys, `enc`
/// keys, other algorithms, weak moduli, no `kid`) are skipped, not fatal: a provider may publish
/// them alongside the signing key. A set with no usable key at all is an error.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<RsaPublicKey>>, String> {
    let doc: JwksDocument = serde_json::from_slice(body)
        .map_err(|err| format!("not a JWKS document (JSON with a `keys` array): {err}"))?;
    let mut keys = HashMap::new();
    for entry in &doc.keys {
        let field = |name: &str| entry.get(name).and_then(serde_json::Value::as_str);
        let Some(kid) = field("kid").filter(|kid| !kid.is_empty()) else {
            tracing::debug!("JWKS entry without kid skipped");
            continue;
        };
        let kid_shown = sanitize(kid, 64);
        let usable = field("kty") == Some("RSA")
            && entry.get("use").is_none_or(|u| u.as_str() == Some("sig"))
            && entry
                .get("alg")
                .is_none_or(|a| a.as_str() == Some(PINNED_ALG));
        if !usable {
            tracing::debug!(kid = %kid_shown, "JWKS entry is not an RS256 signing key; skipped");
            continue;
        }
        let key = match serde_json::from_value::<JsonWebKey<'static>>(entry.clone())
            .map_err(|err| err.to_string())
            .and_then(|jwk| RsaPublicKey::try_from(&jwk).map_err(|err| err.to_string()))
        {
            Ok(key) => key,
            Err(why) => {
                tracing::warn!(kid = %kid_shown, %why, "JWKS RSA key unreadable; skipped");
                continue;
            }
        };
        if key.n().bits() < MIN_RSA_BITS {
            tracing::warn!(kid = %kid_shown, bits = key.n().bits(), "JWKS RSA key too weak; skipped");
            continue;
        }
        if keys.contains_key(kid) {
            tracing::warn!(kid = %kid_shown, "duplicate kid in JWKS; first one kept");
            continue;
        }
        keys.insert(kid.to_owned(), Arc::new(key));
    }
    if keys.is_empty() {
        return Err(format!(
            "JWKS has no usable key ({} entries; need kty RSA, use sig, alg RS256 or none, a kid, \
             ≥ {MIN_RSA_BITS} bits)",
            doc.keys.len()
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use jwt_compact::alg::{Hs256, Hs256Key, RsaPrivateKey};
    use jwt_compact::{AlgorithmExt, Header, Renamed};
    use proptest::prelude::*;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use serde_json::{json, Value};

    const ISS: &str = "https://tenant.example.auth0.com/";
    const AUD: &str = "client-id-123";

    fn key(slot: &'static OnceLock<RsaPrivateKey>, bits: usize) -> &'static RsaPrivateKey {
        slot.get_or_init(|| {
            RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).expect("RSA key generation")
        })
    }

    fn key_a() -> &'static RsaPrivateKey {
        static K: OnceLock<RsaPrivateKey> = OnceLock::new();
        key(&K, 2048)
    }

    fn key_b() -> &'static RsaPrivateKey {
        static K: OnceLock<RsaPrivateKey> = OnceLock::new();
        key(&K, 2048)
    }

    fn weak_key() -> &'static RsaPrivateKey {
        static K: OnceLock<RsaPrivateKey> = OnceLock::new();
        key(&K, 1024)
    }

    /// A JWKS entry shaped like Auth0's (extra `x5c`/`x5t` fields included).
    fn jwk(key: &RsaPrivateKey, kid: &str) -> Value {
        let public = key.to_public_key();
        let mut entry = serde_json::to_value(JsonWebKey::from(&public)).expect("JWK serialises");
        let obj = entry.as_object_mut().expect("a JWK is an object");
        obj.insert("kid".into(), json!(kid));
        obj.insert("use".into(), json!("sig"));
        obj.insert("alg".into(), json!("RS256"));
        obj.insert("x5c".into(), json!(["MIIDDTCCAfWgAwIBAgIJ"]));
        obj.insert("x5t".into(), json!("q4y1nJxJ7Ym3fHbMd2fQm1k9nqY"));
        entry
    }

    fn jwks(entries: Vec<Value>) -> String {
        json!({ "keys": entries }).to_string()
    }

    fn now() -> i64 {
        Utc::now().timestamp()
    }

    fn good_claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "auth0|ada",
            "email": "ada@example.com",
            "email_verified": true,
            "name": "Ada Lovelace",
            "iat": now(),
            "exp": now() + 600,
        })
    }

    fn claims_with(changes: Value) -> Value {
        let mut claims = good_claims();
        for (k, v) in changes.as_object().expect("changes is an object") {
            claims[k] = v.clone();
        }
        claims
    }

    fn header(kid: Option<&str>) -> Header {
        match kid {
            Some(kid) => Header::empty().with_key_id(kid),
            None => Header::empty(),
        }
    }

    fn sign_with<A: Algorithm>(
        alg: &A,
        key: &A::SigningKey,
        kid: Option<&str>,
        claims: Value,
    ) -> String {
        alg.token(&header(kid), &Claims::new(claims), key)
            .expect("test token serialises")
    }

    fn sign(key: &RsaPrivateKey, kid: &str, claims: Value) -> String {
        sign_with(&Rsa::rs256(), key, Some(kid), claims)
    }

    /// A JWKS endpoint on 127.0.0.1 whose document and status can be changed mid-test.
    struct JwksServer {
        url: Url,
        hits: Arc<AtomicUsize>,
        doc: Arc<Mutex<(StatusCode, String)>>,
    }

    #[derive(Clone)]
    struct ServerState {
        hits: Arc<AtomicUsize>,
        doc: Arc<Mutex<(StatusCode, String)>>,
    }

    async fn serve_jwks(State(state): State<ServerState>) -> impl IntoResponse {
        state.hits.fetch_add(1, Ordering::SeqCst);
        let (status, body) = state.doc.lock().expect("test lock").clone();
        (status, [("content-type", "application/json")], body)
    }

    impl JwksServer {
        async fn start(body: String) -> Self {
            let hits = Arc::new(AtomicUsize::new(0));
            let doc = Arc::new(Mutex::new((StatusCode::OK, body)));
            let state = ServerState {
                hits: hits.clone(),
                doc: doc.clone(),
            };
            let app = axum::Router::new()
                .route("/.well-known/jwks.json", axum::routing::get(serve_jwks))
                .with_state(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a loopback port");
            let addr = listener.local_addr().expect("bound address");
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            let url = Url::parse(&format!("http://{addr}/.well-known/jwks.json")).expect("url");
            Self { url, hits, doc }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn set(&self, status: StatusCode, body: String) {
            *self.doc.lock().expect("test lock") = (status, body);
        }
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .expect("reqwest client")
    }

    fn config(jwks_url: Url) -> IdTokenConfig {
        IdTokenConfig::new(jwks_url, ISS, AUD)
    }

    async fn verifier_with_key_a() -> (IdTokenVerifier, JwksServer) {
        let server = JwksServer::start(jwks(vec![jwk(key_a(), "a")])).await;
        let verifier = IdTokenVerifier::new(config(server.url.clone()), http());
        (verifier, server)
    }

    #[test]
    fn verifier_is_clone_send_and_sync() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<IdTokenVerifier>();
    }

    #[tokio::test]
    async fn a_good_token_verifies_and_yields_sub_email_and_name() {
        let (verifier, server) = verifier_with_key_a().await;
        let claims = verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("a good token verifies");
        assert_eq!(claims.sub, "auth0|ada");
        assert_eq!(claims.email.as_deref(), Some("ada@example.com"));
        assert_eq!(claims.email_verified, Some(true));
        assert_eq!(claims.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(claims.iss, ISS);
        assert_eq!(claims.aud, vec![AUD.to_owned()]);
        assert!(claims.expires_at > Utc::now());
        assert_eq!(server.hits(), 1, "the first verify fetches the JWKS lazily");

        verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("second verify");
        assert_eq!(server.hits(), 1, "the cached key set is reused");
    }

    #[tokio::test]
    async fn an_audience_array_containing_ours_is_accepted() {
        let (verifier, _server) = verifier_with_key_a().await;
        let token = sign(key_a(), "a", claims_with(json!({"aud": ["other", AUD]})));
        let claims = verifier.verify(&token).await.expect("aud array accepted");
        assert_eq!(claims.aud, vec!["other".to_owned(), AUD.to_owned()]);
    }

    #[tokio::test]
    async fn alg_none_is_refused_before_any_key_lookup() {
        let (verifier, server) = verifier_with_key_a().await;
        for name in ["none", "None", "NONE", ""] {
            let signed = sign_with(
                &Renamed::new(Hs256, name),
                &Hs256Key::new(b"irrelevant"),
                Some("a"),
                good_claims(),
            );
            // Strip the signature: `header.payload.`
            let (unsigned, _) = signed.rsplit_once('.').expect("three parts");
            let token = format!("{unsigned}.");
            assert_eq!(
                verifier.verify(&token).await,
                Err(IdTokenError::UnsupportedAlgorithm(name.to_owned())),
                "alg {name:?}"
            );
        }
        assert_eq!(server.hits(), 0);
    }

    #[tokio::test]
    async fn hs256_signed_with_the_public_key_bytes_is_refused() {
        let (verifier, server) = verifier_with_key_a().await;
        let public = key_a().to_public_key();
        let pem = public
            .to_public_key_pem(LineEnding::LF)
            .expect("PEM encoding");
        let der = public.to_public_key_der().expect("DER encoding");
        let jwk_text = jwk(key_a(), "a").to_string();
        for secret in [pem.as_bytes(), der.as_bytes(), jwk_text.as_bytes()] {
            let token = sign_with(&Hs256, &Hs256Key::new(secret), Some("a"), good_claims());
            let err = verifier.verify(&token).await.expect_err("HS256 refused");
            assert_eq!(err, IdTokenError::UnsupportedAlgorithm("HS256".into()));
            assert_eq!(err.code(), "id_token_unsupported_algorithm");
            assert!(err.is_client_error());
        }
        assert_eq!(server.hits(), 0, "no key lookup for a refused alg");
    }

    #[tokio::test]
    async fn other_rsa_and_ec_algorithms_are_refused() {
        let (verifier, _server) = verifier_with_key_a().await;
        let rs384 = sign_with(&Rsa::rs384(), key_a(), Some("a"), good_claims());
        let rs512 = sign_with(&Rsa::rs512(), key_a(), Some("a"), good_claims());
        let ps256 = sign_with(&Rsa::ps256(), key_a(), Some("a"), good_claims());
        let es256 = sign_with(
            &Renamed::new(Hs256, "ES256"),
            &Hs256Key::new(b"x"),
            Some("a"),
            good_claims(),
        );
        for (token, alg) in [
            (rs384, "RS384"),
            (rs512, "RS512"),
            (ps256, "PS256"),
            (es256, "ES256"),
        ] {
            assert_eq!(
                verifier.verify(&token).await,
                Err(IdTokenError::UnsupportedAlgorithm(alg.into()))
            );
        }
    }

    #[tokio::test]
    async fn a_hostile_alg_name_is_sanitised_and_truncated_in_the_error() {
        let (verifier, _server) = verifier_with_key_a().await;
        let alg: &'static str = "RS256\n\u{1b}[31m-and-a-very-long-tail-that-goes-on-and-on";
        let token = sign_with(
            &Renamed::new(Hs256, alg),
            &Hs256Key::new(b"x"),
            Some("a"),
            good_claims(),
        );
        let Err(IdTokenError::UnsupportedAlgorithm(shown)) = verifier.verify(&token).await else {
            panic!("expected UnsupportedAlgorithm");
        };
        assert_eq!(shown.chars().count(), 32);
        assert!(shown.chars().all(|c| c.is_ascii_graphic()), "{shown:?}");
    }

    #[tokio::test]
    async fn a_token_without_kid_is_an_unknown_key() {
        let (verifier, server) = verifier_with_key_a().await;
        let token = sign_with(&Rsa::rs256(), key_a(), None, good_claims());
        assert_eq!(verifier.verify(&token).await, Err(IdTokenError::UnknownKey));
        assert_eq!(server.hits(), 0);
    }

    #[tokio::test]
    async fn a_wrong_issuer_is_refused() {
        let (verifier, _server) = verifier_with_key_a().await;
        for iss in [
            json!("https://evil.example.com/"),
            json!("https://tenant.example.auth0.com"),
        ] {
            let token = sign(key_a(), "a", claims_with(json!({ "iss": iss })));
            assert_eq!(
                verifier.verify(&token).await,
                Err(IdTokenError::WrongIssuer)
            );
        }
        let mut no_iss = good_claims();
        no_iss.as_object_mut().expect("object").remove("iss");
        let token = sign(key_a(), "a", no_iss);
        assert_eq!(
            verifier.verify(&token).await,
            Err(IdTokenError::WrongIssuer)
        );
    }

    #[tokio::test]
    async fn a_wrong_audience_is_refused() {
        let (verifier, _server) = verifier_with_key_a().await;
        for changes in [
            json!({"aud": "someone-else"}),
            json!({"aud": ["someone-else", "and-another"]}),
            json!({"aud": []}),
            json!({"aud": [AUD, "other"], "azp": "other"}),
        ] {
            let token = sign(key_a(), "a", claims_with(changes.clone()));
            let err = verifier.verify(&token).await.expect_err("wrong aud");
            assert_eq!(err, IdTokenError::WrongAudience, "{changes}");
            assert_eq!(err.code(), "id_token_wrong_audience");
        }
    }

    #[tokio::test]
    async fn an_expired_token_is_refused() {
        let (verifier, _server) = verifier_with_key_a().await;
        let token = sign(key_a(), "a", claims_with(json!({"exp": now() - 120})));
        let err = verifier.verify(&token).await.expect_err("expired");
        assert_eq!(err, IdTokenError::Expired);
        assert_eq!(err.code(), "id_token_expired");
        assert!(err.is_client_error());
    }

    #[tokio::test]
    async fn a_token_without_exp_is_malformed() {
        let (verifier, _server) = verifier_with_key_a().await;
        let mut claims = good_claims();
        claims.as_object_mut().expect("object").remove("exp");
        let token = sign(key_a(), "a", claims);
        assert_eq!(verifier.verify(&token).await, Err(IdTokenError::Malformed));
    }

    #[tokio::test]
    async fn a_token_with_nbf_in_the_future_is_not_yet_valid() {
        let (verifier, _server) = verifier_with_key_a().await;
        let token = sign(key_a(), "a", claims_with(json!({"nbf": now() + 120})));
        assert_eq!(
            verifier.verify(&token).await,
            Err(IdTokenError::NotYetValid)
        );
        let within_leeway = sign(key_a(), "a", claims_with(json!({"nbf": now() + 10})));
        verifier
            .verify(&within_leeway)
            .await
            .expect("nbf within the leeway is fine");
    }

    #[tokio::test]
    async fn a_tampered_payload_is_a_bad_signature() {
        let (verifier, _server) = verifier_with_key_a().await;
        let honest = sign(key_a(), "a", good_claims());
        let forged = sign(key_a(), "a", claims_with(json!({"sub": "auth0|mallory"})));
        let honest_parts: Vec<&str> = honest.split('.').collect();
        let forged_parts: Vec<&str> = forged.split('.').collect();
        // Honest header and signature around the attacker's payload.
        let spliced = format!(
            "{}.{}.{}",
            honest_parts[0], forged_parts[1], honest_parts[2]
        );
        assert_eq!(
            verifier.verify(&spliced).await,
            Err(IdTokenError::BadSignature)
        );
        // Even a payload that is not JSON is a signature failure, not a parse of unsigned data.
        let junk = format!("{}.{}.{}", honest_parts[0], "bm90LWpzb24", honest_parts[2]);
        assert_eq!(
            verifier.verify(&junk).await,
            Err(IdTokenError::BadSignature)
        );
    }

    #[tokio::test]
    async fn a_token_signed_by_another_key_with_our_kid_is_a_bad_signature() {
        let (verifier, _server) = verifier_with_key_a().await;
        let token = sign(key_b(), "a", good_claims());
        assert_eq!(
            verifier.verify(&token).await,
            Err(IdTokenError::BadSignature)
        );
    }

    #[tokio::test]
    async fn an_unknown_kid_triggers_exactly_one_refetch_then_succeeds_after_rotation() {
        let server = JwksServer::start(jwks(vec![jwk(key_a(), "a")])).await;
        let mut cfg = config(server.url.clone());
        cfg.min_refresh_interval = Duration::from_millis(100);
        let verifier = IdTokenVerifier::new(cfg, http());

        verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("old key verifies");
        assert_eq!(server.hits(), 1);

        // Auth0 rotates: the new key is published, the old one withdrawn.
        server.set(StatusCode::OK, jwks(vec![jwk(key_b(), "b")]));
        tokio::time::sleep(Duration::from_millis(150)).await;

        let claims = verifier
            .verify(&sign(key_b(), "b", good_claims()))
            .await
            .expect("new key verifies after one refetch");
        assert_eq!(claims.sub, "auth0|ada");
        assert_eq!(server.hits(), 2, "exactly one refetch");

        verifier
            .verify(&sign(key_b(), "b", good_claims()))
            .await
            .expect("new key is cached");
        assert_eq!(server.hits(), 2);
        assert_eq!(
            verifier.verify(&sign(key_a(), "a", good_claims())).await,
            Err(IdTokenError::UnknownKey),
            "a withdrawn key no longer verifies"
        );
    }

    #[tokio::test]
    async fn a_burst_of_unknown_kid_tokens_does_not_hammer_the_jwks() {
        let (verifier, server) = verifier_with_key_a().await;
        let tokens: Vec<String> = (0..20)
            .map(|i| sign(key_a(), &format!("made-up-{i}"), good_claims()))
            .collect();
        let results = futures::future::join_all(tokens.iter().map(|t| verifier.verify(t))).await;
        assert!(results.iter().all(|r| *r == Err(IdTokenError::UnknownKey)));
        for token in &tokens {
            assert_eq!(verifier.verify(token).await, Err(IdTokenError::UnknownKey));
        }
        let hits = server.hits();
        assert!(hits <= 2, "{hits} JWKS fetches for 40 unknown-kid tokens");
        assert_eq!(
            hits, 1,
            "concurrent first fetches coalesce, later ones are rate limited"
        );
        // The known key still works throughout.
        verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("known key still verifies");
    }

    #[tokio::test]
    async fn a_jwks_server_that_is_down_is_jwks_unavailable_not_a_client_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener); // nothing listens there any more
        let url = Url::parse(&format!("http://{addr}/.well-known/jwks.json")).expect("url");
        let verifier = IdTokenVerifier::new(config(url), http());

        let err = verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect_err("no JWKS, no verification");
        let IdTokenError::JwksUnavailable(msg) = &err else {
            panic!("expected JwksUnavailable, got {err:?}");
        };
        assert!(
            msg.contains(&addr.to_string()),
            "message names the URL: {msg}"
        );
        assert!(!err.is_client_error());
        assert_eq!(err.code(), "id_token_jwks_unavailable");

        // Within the rate limit the failure is reported again without a new attempt.
        let again = verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect_err("still unavailable");
        assert!(
            matches!(again, IdTokenError::JwksUnavailable(_)),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_jwks_answering_500_or_garbage_is_unavailable_with_an_actionable_message() {
        let server = JwksServer::start(String::new()).await;
        let mut cfg = config(server.url.clone());
        cfg.min_refresh_interval = Duration::ZERO;
        let verifier = IdTokenVerifier::new(cfg, http());
        let token = sign(key_a(), "a", good_claims());

        server.set(StatusCode::INTERNAL_SERVER_ERROR, "oops".into());
        let Err(IdTokenError::JwksUnavailable(msg)) = verifier.verify(&token).await else {
            panic!("expected JwksUnavailable");
        };
        assert!(
            msg.contains("500") && msg.contains(server.url.as_str()),
            "{msg}"
        );
        assert!(!msg.contains(&token), "never echo a token");

        server.set(StatusCode::OK, "<html>not json</html>".into());
        let Err(IdTokenError::JwksUnavailable(msg)) = verifier.verify(&token).await else {
            panic!("expected JwksUnavailable");
        };
        assert!(msg.contains("not a JWKS document"), "{msg}");

        server.set(StatusCode::OK, "x".repeat(MAX_JWKS_BYTES + 1));
        let Err(IdTokenError::JwksUnavailable(msg)) = verifier.verify(&token).await else {
            panic!("expected JwksUnavailable");
        };
        assert!(msg.contains("larger than"), "{msg}");
    }

    #[tokio::test]
    async fn only_rsa_signing_keys_of_sufficient_size_are_taken_from_the_jwks() {
        let mut enc = jwk(key_b(), "enc");
        enc["use"] = json!("enc");
        let mut rs512 = jwk(key_b(), "rs512");
        rs512["alg"] = json!("RS512");
        let ec = json!({"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AAAA", "y": "AAAA"});
        let oct = json!({"kty": "oct", "kid": "oct", "k": "c2VjcmV0"});
        let weak = jwk(weak_key(), "weak");
        let mut bare = jwk(key_b(), "bare");
        let bare_obj = bare.as_object_mut().expect("object");
        bare_obj.remove("use");
        bare_obj.remove("alg");
        let server = JwksServer::start(jwks(vec![
            enc,
            rs512,
            ec,
            oct,
            weak,
            bare,
            jwk(key_a(), "a"),
        ]))
        .await;
        let verifier = IdTokenVerifier::new(config(server.url.clone()), http());

        verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("the proper signing key verifies");
        verifier
            .verify(&sign(key_b(), "bare", good_claims()))
            .await
            .expect("use/alg may be absent");
        for (key, kid) in [(key_b(), "enc"), (key_b(), "rs512"), (weak_key(), "weak")] {
            assert_eq!(
                verifier.verify(&sign(key, kid, good_claims())).await,
                Err(IdTokenError::UnknownKey),
                "kid {kid}"
            );
        }
        let oct_token = sign_with(
            &Hs256,
            &Hs256Key::new(b"secret"),
            Some("oct"),
            good_claims(),
        );
        assert_eq!(
            verifier.verify(&oct_token).await,
            Err(IdTokenError::UnsupportedAlgorithm("HS256".into()))
        );
    }

    #[tokio::test]
    async fn stale_keys_are_refetched_after_cache_ttl_and_kept_while_the_provider_is_down() {
        let server = JwksServer::start(jwks(vec![jwk(key_a(), "a")])).await;
        let mut cfg = config(server.url.clone());
        cfg.cache_ttl = Duration::from_millis(50);
        cfg.min_refresh_interval = Duration::ZERO;
        let verifier = IdTokenVerifier::new(cfg, http());
        let token = sign(key_a(), "a", good_claims());

        verifier.verify(&token).await.expect("first");
        assert_eq!(server.hits(), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        verifier.verify(&token).await.expect("after ttl");
        assert_eq!(server.hits(), 2, "a stale set is fetched again");

        server.set(StatusCode::SERVICE_UNAVAILABLE, String::new());
        tokio::time::sleep(Duration::from_millis(80)).await;
        verifier
            .verify(&token)
            .await
            .expect("a known key survives a failed refresh");
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test]
    async fn an_oversize_token_is_malformed_without_parsing() {
        let (verifier, server) = verifier_with_key_a().await;
        let big = sign(
            key_a(),
            "a",
            claims_with(json!({"pad": "x".repeat(MAX_TOKEN_BYTES)})),
        );
        assert!(big.len() > MAX_TOKEN_BYTES);
        assert_eq!(verifier.verify(&big).await, Err(IdTokenError::Malformed));
        assert_eq!(server.hits(), 0);
    }

    #[tokio::test]
    async fn structurally_broken_tokens_are_malformed() {
        let (verifier, server) = verifier_with_key_a().await;
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.???.***",
            "e30.e30.",
            "eyJhbGciOiJSUzI1NiJ9",
        ] {
            assert_eq!(
                verifier.verify(token).await,
                Err(IdTokenError::Malformed),
                "{token:?}"
            );
        }
        assert_eq!(server.hits(), 0);
    }

    #[test]
    fn every_error_has_a_distinct_snake_case_code_and_only_jwks_is_server_side() {
        let all = [
            IdTokenError::Malformed,
            IdTokenError::UnsupportedAlgorithm("HS256".into()),
            IdTokenError::UnknownKey,
            IdTokenError::BadSignature,
            IdTokenError::WrongIssuer,
            IdTokenError::WrongAudience,
            IdTokenError::Expired,
            IdTokenError::NotYetValid,
            IdTokenError::JwksUnavailable("x".into()),
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(IdTokenError::code).collect();
        assert_eq!(codes.len(), all.len());
        assert!(codes
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        let server_side: Vec<_> = all.iter().filter(|e| !e.is_client_error()).collect();
        assert_eq!(
            server_side,
            vec![&IdTokenError::JwksUnavailable("x".into())]
        );
    }

    fn raw(value: Value) -> Claims<RawIdClaims> {
        serde_json::from_value(value).expect("test claims parse")
    }

    #[test]
    fn claim_times_honour_the_leeway_at_the_edges() {
        let cfg = config(Url::parse("http://127.0.0.1:1/").expect("url"));
        let t = Utc::now();
        let at = |secs: i64| t.timestamp() + secs;
        // exp 29 s ago with 30 s leeway: fine; 31 s ago: expired.
        assert!(check_claims(raw(claims_with(json!({"exp": at(-29)}))), &cfg, t).is_ok());
        assert_eq!(
            check_claims(raw(claims_with(json!({"exp": at(-31)}))), &cfg, t),
            Err(IdTokenError::Expired)
        );
        assert!(check_claims(raw(claims_with(json!({"nbf": at(29)}))), &cfg, t).is_ok());
        assert_eq!(
            check_claims(raw(claims_with(json!({"nbf": at(31)}))), &cfg, t),
            Err(IdTokenError::NotYetValid)
        );
    }

    #[test]
    fn extreme_timestamps_and_leeways_do_not_panic() {
        let mut cfg = config(Url::parse("http://127.0.0.1:1/").expect("url"));
        cfg.leeway = Duration::MAX;
        let t = Utc::now();
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        for (exp, nbf) in [(max, min), (min, max), (max, max), (min, min)] {
            let _ = check_claims(raw(claims_with(json!({"exp": exp, "nbf": nbf}))), &cfg, t);
        }
        cfg.leeway = Duration::ZERO;
        assert_eq!(
            check_claims(raw(claims_with(json!({"exp": max, "nbf": min}))), &cfg, t).map(|c| c.sub),
            Ok("auth0|ada".to_owned())
        );
    }

    /// A verifier with key "a" already cached and fetching disabled: no network in proptests.
    fn offline_verifier() -> IdTokenVerifier {
        let mut cfg = config(Url::parse("http://127.0.0.1:1/never").expect("url"));
        cfg.min_refresh_interval = Duration::from_secs(3600);
        let verifier = IdTokenVerifier::new(cfg, http());
        {
            let mut state = verifier.inner.write_state();
            state
                .keys
                .insert("a".into(), Arc::new(key_a().to_public_key()));
            state.fetched_at = Some(Instant::now());
            state.last_attempt = state.fetched_at;
            state.attempts = 1;
        }
        verifier
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
        })
    }

    fn good_token() -> &'static str {
        static T: OnceLock<String> = OnceLock::new();
        T.get_or_init(|| {
            let mut claims = good_claims();
            claims["exp"] = json!(now() + 24 * 3600);
            sign(key_a(), "a", claims)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn garbage_strings_never_panic(s in any::<String>()) {
            let verifier = offline_verifier();
            let result = runtime().block_on(verifier.verify(&s));
            prop_assert!(result.is_err());
        }

        #[test]
        fn jwt_shaped_garbage_never_panics(
            h in "[A-Za-z0-9_-]{0,80}",
            p in "[A-Za-z0-9_-]{0,200}",
            s in "[A-Za-z0-9_-]{0,400}",
        ) {
            let verifier = offline_verifier();
            let token = format!("{h}.{p}.{s}");
            prop_assert!(runtime().block_on(verifier.verify(&token)).is_err());
        }

        #[test]
        fn a_mutated_good_token_never_verifies_as_someone_else(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let verifier = offline_verifier();
            let mut bytes = good_token().as_bytes().to_vec();
            for (index, byte) in &edits {
                let i = index.index(bytes.len());
                bytes[i] = *byte;
            }
            let token = String::from_utf8_lossy(&bytes).into_owned();
            // Only a change the signature does not cover (a non-canonical base64 tail) may
            // still verify, and then it must say exactly what the original said.
            if let Ok(claims) = runtime().block_on(verifier.verify(&token)) {
                prop_assert_eq!(claims.sub, "auth0|ada");
            }
        }
    }
}
