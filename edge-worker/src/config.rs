//! The worker's configuration: read from the Workers environment once per isolate,
//! validated, and shared by every request the isolate serves.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `ORIGIN_URL` | the origin's public listener | required |
//! | `EDGE_ASSERTION_KEY` | secret: 32-byte Ed25519 seed, base64url | required |
//! | `CORS_ALLOWED_ORIGINS` | comma-separated exact browser origins | none allowed |
//! | `ROUTES` | the route table (`kind:path,…`) | [`DEFAULT_ROUTES`] |
//! | `EDGE_SESSION_TTL` | longest a validated session stays in KV, seconds | 300 |
//! | `RATE_LIMIT_PERIOD` | the rate-limit bindings' period, sent as `Retry-After` | 10 |
//! | `EDGE_L1_TTL` | how long an isolate reuses a session answer before asking KV again, seconds (0 = off, at most 60) | 10 |
//! | `EDGE_MAX_BODY` | largest request body forwarded, bytes ([`crate::limits`]) | 10485760 |
//! | `EDGE_BODY_LIMITS` | lower limits per route, `path=bytes,…` | `/graphql=2097152,/api/auth/=65536,/api/v1/events/=8192` |
//!
//! A malformed value is an error naming the variable, never a silent default: a typo in
//! the CORS list or the route table must not widen what the edge lets through.

use gateway_shared::assertion::{signing_key_from_b64, SecretKey};
use gateway_shared::cors::CorsPolicy;
use gateway_shared::routes::{RouteTable, DEFAULT_ROUTES};

use crate::limits::BodyLimits;

/// KV's minimum `expirationTtl`, and so the shortest session-cache TTL.
pub const MIN_SESSION_TTL_SECS: u64 = 60;
/// `EDGE_SESSION_TTL` when unset (the origin's own session cache TTL).
pub const DEFAULT_SESSION_TTL_SECS: u64 = 300;
/// `RATE_LIMIT_PERIOD` when unset.
pub const DEFAULT_RATE_LIMIT_PERIOD_SECS: u64 = 10;

/// Everything a request needs to know about the deployment.
#[derive(Clone)]
pub struct EdgeConfig {
    /// The origin's base URL, without a trailing `/`.
    pub origin_url: String,
    /// The browser origins allowed to call with credentials.
    pub cors: CorsPolicy,
    /// What the edge does with each path.
    pub routes: RouteTable,
    /// Cap on how long a validated session is served from KV.
    pub session_ttl_secs: u64,
    /// Seconds a rate-limited client is told to wait.
    pub rate_limit_period_secs: u64,
    /// How long an isolate keeps a session answer in memory ([`crate::l1`]); 0 = off.
    pub l1_ttl_secs: u64,
    /// The largest request body forwarded to each route.
    pub body_limits: BodyLimits,
    /// The key `x-gateway-assertion` is signed with.
    pub signing_key: SecretKey,
}

impl std::fmt::Debug for EdgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeConfig")
            .field("origin_url", &self.origin_url)
            .field("cors", &self.cors)
            .field("routes", &self.routes)
            .field("session_ttl_secs", &self.session_ttl_secs)
            .field("rate_limit_period_secs", &self.rate_limit_period_secs)
            .field("l1_ttl_secs", &self.l1_ttl_secs)
            .field("body_limits", &self.body_limits)
            .field("signing_key", &"<redacted>")
            .finish()
    }
}

impl EdgeConfig {
    /// Reads and validates the configuration through `var` (a variable's value, `None`
    /// when unset). The error names the variable and never echoes a secret.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let origin_url = set("ORIGIN_URL").ok_or("ORIGIN_URL is not set")?;
        let origin_url = origin_url.trim().trim_end_matches('/').to_owned();
        if !(origin_url.starts_with("http://") || origin_url.starts_with("https://")) {
            return Err(format!("ORIGIN_URL {origin_url:?} is not an http(s) URL"));
        }
        let cors = CorsPolicy::parse(&set("CORS_ALLOWED_ORIGINS").unwrap_or_default())
            .map_err(|e| format!("CORS_ALLOWED_ORIGINS: {e}"))?;
        let routes = RouteTable::parse(&set("ROUTES").unwrap_or_else(|| DEFAULT_ROUTES.into()))
            .map_err(|e| format!("ROUTES: {e}"))?;
        let session_ttl_secs = secs(
            "EDGE_SESSION_TTL",
            set("EDGE_SESSION_TTL"),
            DEFAULT_SESSION_TTL_SECS,
        )?
        .max(MIN_SESSION_TTL_SECS);
        let rate_limit_period_secs = secs(
            "RATE_LIMIT_PERIOD",
            set("RATE_LIMIT_PERIOD"),
            DEFAULT_RATE_LIMIT_PERIOD_SECS,
        )?;
        let l1_ttl_secs = crate::l1::parse_ttl(set("EDGE_L1_TTL").as_deref())?;
        let body_limits = BodyLimits::parse(
            set("EDGE_MAX_BODY").as_deref(),
            set("EDGE_BODY_LIMITS").as_deref(),
        )?;
        let key = set("EDGE_ASSERTION_KEY").ok_or(
            "EDGE_ASSERTION_KEY is not set (a Workers secret; `scripts/edge-keys.sh` makes one)",
        )?;
        // An all-zero seed is refused before the shared decoder sees it: ed25519-compact
        // panics on one, and base64url of zero bytes is nothing but 'A's.
        if key.trim().trim_end_matches('=').bytes().all(|b| b == b'A') {
            return Err(
                "EDGE_ASSERTION_KEY is all zeros: generate one with scripts/edge-keys.sh".into(),
            );
        }
        let signing_key = signing_key_from_b64(&key)
            .map_err(|_| "EDGE_ASSERTION_KEY is not a base64url 32-byte Ed25519 seed")?;
        Ok(Self {
            origin_url,
            cors,
            routes,
            session_ttl_secs,
            rate_limit_period_secs,
            l1_ttl_secs,
            body_limits,
            signing_key,
        })
    }
}

fn secs(name: &str, value: Option<String>, default: u64) -> Result<u64, String> {
    match value {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name} {v:?} is not a positive number of seconds")),
        },
    }
}

#[cfg(target_arch = "wasm32")]
mod load {
    use super::EdgeConfig;
    use crate::error::EdgeError;
    use std::cell::OnceCell;
    use std::rc::Rc;

    thread_local! {
        // Vars and secrets are fixed for the life of an isolate, so they are parsed (and
        // the signing key derived) once, not per request. A failure is not cached: the
        // next request tries again and reports the same error.
        static CONFIG: OnceCell<Rc<EdgeConfig>> = const { OnceCell::new() };
    }

    /// The isolate's configuration, read from `env` on first use.
    pub fn load(env: &worker::Env) -> Result<Rc<EdgeConfig>, EdgeError> {
        if let Some(c) = CONFIG.with(|c| c.get().cloned()) {
            return Ok(c);
        }
        let lookup = |name: &str| {
            env.var(name)
                .or_else(|_| env.secret(name))
                .ok()
                .map(|v| v.to_string())
        };
        let config = Rc::new(EdgeConfig::from_lookup(lookup).map_err(EdgeError::Misconfigured)?);
        CONFIG.with(|c| {
            let _ = c.set(config.clone());
        });
        Ok(config)
    }
}

#[cfg(target_arch = "wasm32")]
pub use load::load;

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::routes::RouteKind;
    use std::collections::HashMap;

    const SEED: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn a_minimal_configuration_gets_safe_defaults() {
        let c = EdgeConfig::from_lookup(lookup(&[
            ("ORIGIN_URL", "http://127.0.0.1:8090/"),
            ("EDGE_ASSERTION_KEY", SEED),
        ]))
        .unwrap();
        assert_eq!(c.origin_url, "http://127.0.0.1:8090");
        assert_eq!(c.session_ttl_secs, DEFAULT_SESSION_TTL_SECS);
        assert_eq!(c.rate_limit_period_secs, DEFAULT_RATE_LIMIT_PERIOD_SECS);
        assert_eq!(c.l1_ttl_secs, crate::l1::DEFAULT_L1_TTL_SECS);
        assert_eq!(c.body_limits, BodyLimits::default());
        assert!(!c.cors.is_allowed("https://anything.example"));
        assert_eq!(c.routes.classify("/metrics"), RouteKind::Deny);
        assert!(!format!("{c:?}").contains(SEED));
    }

    #[test]
    fn every_variable_is_read_and_the_session_ttl_has_kvs_floor() {
        let c = EdgeConfig::from_lookup(lookup(&[
            ("ORIGIN_URL", "https://origin.example.com"),
            ("EDGE_ASSERTION_KEY", SEED),
            ("CORS_ALLOWED_ORIGINS", "https://app.example.com"),
            ("ROUTES", "edge:/health,public:/x"),
            ("EDGE_SESSION_TTL", "5"),
            ("RATE_LIMIT_PERIOD", "60"),
            ("EDGE_L1_TTL", "0"),
            ("EDGE_MAX_BODY", "1000"),
            ("EDGE_BODY_LIMITS", "/graphql=100"),
        ]))
        .unwrap();
        assert_eq!(c.body_limits.for_path("/graphql"), 100);
        assert_eq!(c.body_limits.for_path("/noetl/x"), 1000);
        assert!(c.cors.is_allowed("https://app.example.com"));
        assert_eq!(c.routes.classify("/x"), RouteKind::Public);
        assert_eq!(c.session_ttl_secs, MIN_SESSION_TTL_SECS);
        assert_eq!(c.rate_limit_period_secs, 60);
        assert_eq!(c.l1_ttl_secs, 0);
    }

    #[test]
    fn malformed_values_are_errors_that_name_the_variable_and_not_the_secret() {
        let base = [("ORIGIN_URL", "http://o"), ("EDGE_ASSERTION_KEY", SEED)];
        let with = |k: &'static str, v: &'static str| {
            let mut pairs: Vec<(&str, &str)> =
                base.iter().filter(|(n, _)| *n != k).copied().collect();
            pairs.push((k, v));
            EdgeConfig::from_lookup(lookup(&pairs)).unwrap_err()
        };
        assert!(with("ORIGIN_URL", "").contains("ORIGIN_URL"));
        assert!(with("ORIGIN_URL", "ftp://o").contains("ORIGIN_URL"));
        assert!(with("CORS_ALLOWED_ORIGINS", "*").contains("CORS_ALLOWED_ORIGINS"));
        assert!(with("ROUTES", "open:/x").contains("ROUTES"));
        assert!(with("EDGE_SESSION_TTL", "soon").contains("EDGE_SESSION_TTL"));
        assert!(with("RATE_LIMIT_PERIOD", "0").contains("RATE_LIMIT_PERIOD"));
        assert!(with("EDGE_L1_TTL", "300").contains("EDGE_L1_TTL"));
        assert!(with("EDGE_MAX_BODY", "big").contains("EDGE_MAX_BODY"));
        assert!(with("EDGE_BODY_LIMITS", "graphql").contains("EDGE_BODY_LIMITS"));
        assert!(with(
            "EDGE_ASSERTION_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        )
        .contains("all zeros"));
        let e = with("EDGE_ASSERTION_KEY", "not-a-seed-but-a-secret");
        assert!(e.contains("EDGE_ASSERTION_KEY") && !e.contains("not-a-seed"));
        assert!(
            EdgeConfig::from_lookup(lookup(&[("ORIGIN_URL", "http://o")]))
                .unwrap_err()
                .contains("EDGE_ASSERTION_KEY")
        );
    }
}
