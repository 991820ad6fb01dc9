//! The identity provider's key set, fetched over HTTP and cached, and the [`IdTokenVerifier`]
//! that pairs it with the pure check in [`super::id_token`].
//!
//! # JWKS caching and refresh
//!
//! The key set is fetched lazily on the first verification and kept in memory. It is fetched
//! again when
//! - a token names a `kid` we do not hold (Auth0 rotated its signing key), or
//! - the set is older than [`IdTokenConfig::cache_ttl`] (lazy refresh on the next verification).
//!
//! A token refused before a key is needed (too large, malformed, wrong `alg`, no `kid`) never
//! causes a fetch. Every fetch attempt, successful or not, is at most once per
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

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use url::Url;

use super::id_token::{sanitize, ClaimRules, IdClaims, IdTokenError, KeySet, ParsedIdToken};

/// Largest JWKS document read from the identity provider, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Overall deadline of one JWKS fetch (connect, headers and body), on top of the HTTP
/// client's own timeout, so a trickling server cannot hold a refresh open.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Default minimum spacing of JWKS fetches.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Default age after which the JWKS is fetched again on the next verification.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60 * 60);

/// Connect timeout of the HTTP client [`IdTokenVerifier::with_default_client`] builds.
const JWKS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// Clock skew tolerated when checking `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The longest time since `iat` a token is exchanged for a session (`AUTH_MAX_TOKEN_AGE`).
    pub max_age: Option<Duration>,
    /// Accept `email_verified: false` (`AUTH_ALLOW_UNVERIFIED_EMAIL`).
    pub allow_unverified_email: bool,
    /// JWKS fetches (for an unknown `kid` or a stale set) happen at most this often.
    pub min_refresh_interval: Duration,
    /// Age after which the JWKS is fetched again on the next verification.
    pub cache_ttl: Duration,
}

impl IdTokenConfig {
    /// A configuration with the default leeway (30 s), refresh interval (10 s) and TTL (1 h).
    pub fn new(jwks_url: Url, issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        let rules = ClaimRules::new(issuer, audience);
        Self {
            jwks_url,
            issuer: rules.issuer,
            audience: rules.audience,
            leeway: rules.leeway,
            max_age: rules.max_age,
            allow_unverified_email: rules.allow_unverified_email,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            cache_ttl: DEFAULT_CACHE_TTL,
        }
    }

    /// The claim rules this configuration names.
    pub fn rules(&self) -> ClaimRules {
        ClaimRules {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            leeway: self.leeway,
            max_age: self.max_age,
            allow_unverified_email: self.allow_unverified_email,
        }
    }
}

/// Verifies ID tokens: the pure check of [`super::id_token`] over the keys [`Jwks`] holds.
///
/// Cheap to clone (one `Arc`); clones share the key cache, so build one at start and hand it to
/// every handler.
#[derive(Clone)]
pub struct IdTokenVerifier {
    jwks: Jwks,
    rules: Arc<ClaimRules>,
}

impl fmt::Debug for IdTokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdTokenVerifier")
            .field("rules", &self.rules)
            .field("jwks", &self.jwks)
            .finish()
    }
}

impl IdTokenVerifier {
    /// A verifier that fetches the JWKS lazily, on the first [`Self::verify`].
    ///
    /// `http` should carry a request timeout; fetches are also capped at [`JWKS_FETCH_TIMEOUT`].
    pub fn new(config: IdTokenConfig, http: reqwest::Client) -> Self {
        Self {
            rules: Arc::new(config.rules()),
            jwks: Jwks::new(config, http),
        }
    }

    /// [`Self::new`] with the HTTP client the origin uses for the JWKS: 3 s to connect, 5 s
    /// per request.
    pub fn with_default_client(config: IdTokenConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(JWKS_CONNECT_TIMEOUT)
            .timeout(JWKS_FETCH_TIMEOUT)
            .build()?;
        Ok(Self::new(config, http))
    }

    /// Checks `token` completely (see [`super::id_token`]) and returns who it vouches for.
    ///
    /// Must run inside a tokio runtime (a JWKS fetch is spawned as its own task).
    pub async fn verify(&self, token: &str) -> Result<IdClaims, IdTokenError> {
        let parsed = ParsedIdToken::parse(token)?;
        let keys = self.jwks.keys_for(parsed.kid()).await?;
        parsed.verify(&keys, &self.rules, Utc::now())
    }
}

/// The provider's key set as last fetched, refreshed by the policy in the module docs.
///
/// Cheap to clone (one `Arc`); clones share the cache.
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<Inner>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.read_state();
        f.debug_struct("Jwks")
            .field("config", &self.inner.config)
            .field("kids", &state.keys.kids())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// A cache that fetches `config.jwks_url` with `http` on first use.
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

    /// The current key set, once it holds `kid`, refreshing it when the policy allows.
    ///
    /// `Err` is [`IdTokenError::UnknownKey`] when the provider does not publish `kid` (or we
    /// may not ask again yet), [`IdTokenError::JwksUnavailable`] when it could not be asked.
    pub async fn keys_for(&self, kid: &str) -> Result<Arc<KeySet>, IdTokenError> {
        self.inner.keys_for(kid).await
    }
}

/// Shared state behind [`Jwks`].
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
    keys: Arc<KeySet>,
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
    /// The set, if it holds the `kid` asked for.
    keys: Option<Arc<KeySet>>,
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
            keys: state.keys.contains(kid).then(|| Arc::clone(&state.keys)),
            fresh: state
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.config.cache_ttl),
            loaded: state.fetched_at.is_some(),
            attempts: state.attempts,
            last_error: state.last_error.clone(),
        }
    }

    /// A key set holding `kid`, refreshing the JWKS when the policy allows.
    async fn keys_for(self: &Arc<Self>, kid: &str) -> Result<Arc<KeySet>, IdTokenError> {
        let seen = self.lookup(kid);
        if let (Some(keys), true) = (&seen.keys, seen.fresh) {
            return Ok(keys.clone());
        }
        let reason = match (&seen.keys, seen.loaded) {
            (Some(_), _) => "key set older than cache_ttl",
            (None, false) => "first use",
            (None, true) => "unknown kid",
        };
        tracing::debug!(kid = %sanitize(kid, 64), reason, "JWKS refresh wanted");
        let outcome = self.refresh(seen.attempts, reason).await;

        let after = self.lookup(kid);
        if let Some(keys) = after.keys {
            return Ok(keys);
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
            crate::metrics::global().jwks_refresh(if result.is_ok() { "ok" } else { "error" });
            let mut state = inner.write_state();
            state.attempts += 1;
            state.last_attempt = Some(Instant::now());
            match result {
                Ok(keys) => {
                    tracing::info!(
                        jwks_url = %shown_url(&inner.config.jwks_url),
                        kids = ?keys.kids(),
                        reason,
                        "JWKS refreshed"
                    );
                    state.keys = Arc::new(keys);
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
    async fn fetch_jwks(&self) -> Result<KeySet, String> {
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
            KeySet::from_jwks(&body).map_err(|why| format!("GET {url}: {why}"))
        };
        tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("GET {url} timed out after {JWKS_FETCH_TIMEOUT:?}"))?
    }
}

/// The JWKS URL as shown to operators: any userinfo removed.
fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    // Both fail only for URLs that cannot have credentials, which is fine to ignore.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use jwt_compact::alg::{Hs256, Hs256Key, Rsa};
    use serde_json::json;

    use crate::auth::id_token::MAX_TOKEN_BYTES;
    use crate::auth::test_tokens::*;

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

    #[test]
    fn the_config_names_the_claim_rules() {
        let mut cfg = config(Url::parse("http://127.0.0.1:1/").expect("url"));
        cfg.leeway = Duration::from_secs(7);
        let rules = cfg.rules();
        assert_eq!(
            (rules.issuer.as_str(), rules.audience.as_str(), rules.leeway),
            (ISS, AUD, Duration::from_secs(7))
        );
    }

    #[tokio::test]
    async fn the_first_verify_fetches_the_jwks_lazily_and_later_ones_reuse_it() {
        let (verifier, server) = verifier_with_key_a().await;
        assert_eq!(
            server.hits(),
            0,
            "nothing is fetched before the first verify"
        );
        let claims = verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("a good token verifies");
        assert_eq!(claims.sub, "auth0|ada");
        assert_eq!(server.hits(), 1, "the first verify fetches the JWKS lazily");

        verifier
            .verify(&sign(key_a(), "a", good_claims()))
            .await
            .expect("second verify");
        assert_eq!(server.hits(), 1, "the cached key set is reused");
    }

    #[tokio::test]
    async fn the_verifier_applies_the_configured_claim_rules() {
        let (verifier, _server) = verifier_with_key_a().await;
        let wrong_iss = sign(
            key_a(),
            "a",
            claims_with(json!({"iss": "https://evil.example.com/"})),
        );
        assert_eq!(
            verifier.verify(&wrong_iss).await,
            Err(IdTokenError::WrongIssuer)
        );
        let wrong_aud = sign(key_a(), "a", claims_with(json!({"aud": "someone-else"})));
        assert_eq!(
            verifier.verify(&wrong_aud).await,
            Err(IdTokenError::WrongAudience)
        );
        let expired = sign(key_a(), "a", claims_with(json!({"exp": now() - 120})));
        assert_eq!(verifier.verify(&expired).await, Err(IdTokenError::Expired));
        let signed_by_b = sign(key_b(), "a", good_claims());
        assert_eq!(
            verifier.verify(&signed_by_b).await,
            Err(IdTokenError::BadSignature)
        );
    }

    #[tokio::test]
    async fn tokens_refused_before_a_key_is_needed_never_fetch_the_jwks() {
        let (verifier, server) = verifier_with_key_a().await;
        let signed = sign_with(
            &jwt_compact::Renamed::new(Hs256, "none"),
            &Hs256Key::new(b"irrelevant"),
            Some("a"),
            good_claims(),
        );
        let (unsigned, _) = signed.rsplit_once('.').expect("three parts");
        let alg_none = format!("{unsigned}.");
        let hs256 = sign_with(&Hs256, &Hs256Key::new(b"secret"), Some("a"), good_claims());
        let no_kid = sign_with(&Rsa::rs256(), key_a(), None, good_claims());
        let oversize = sign(
            key_a(),
            "a",
            claims_with(json!({"pad": "x".repeat(MAX_TOKEN_BYTES)})),
        );
        for (token, want) in [
            (alg_none, IdTokenError::UnsupportedAlgorithm("none".into())),
            (hs256, IdTokenError::UnsupportedAlgorithm("HS256".into())),
            (no_kid, IdTokenError::UnknownKey),
            (oversize, IdTokenError::Malformed),
            ("a.b.c.d".to_owned(), IdTokenError::Malformed),
            ("e30.e30.".to_owned(), IdTokenError::Malformed),
        ] {
            assert_eq!(verifier.verify(&token).await, Err(want));
        }
        assert_eq!(server.hits(), 0, "no key lookup for a token refused first");
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
}
