//! The rate-limit step: the Workers rate-limiting binding, per client IP and per session.
//!
//! Two bindings (`[[ratelimits]]` in wrangler.toml): [`Limiter::Ip`] counts every
//! forwarded request by client IP (`cf-connecting-ip`; an IPv6 client by its /64),
//! [`Limiter::Session`] counts
//! session-route requests by session hash, so one stolen token cannot be used from many
//! addresses faster than one user could. Over either limit → 429 with `Retry-After`.
//!
//! The binding answers only `{success}`: it does not say when its window ends, so
//! `Retry-After` is the configured period (`RATE_LIMIT_PERIOD`, matching `simple.period`).
//! A missing binding or a failing `limit()` call lets the request through (logged): the
//! limiter protects capacity, it is not an authorisation check, and a Cloudflare hiccup
//! must not take the API down.
//!
//! Under `wrangler dev` the binding is simulated locally by Miniflare: a counter per
//! (key, period) in a fixed window aligned to the wall clock (`floor(now / period)`), kept
//! in the `--persist-to` directory; `cf-connecting-ip` is the socket's address
//! (127.0.0.1) unless the client sent one. See docs/EDGE.md.

use gateway_shared::session::SessionHash;

/// Which limiter a key is counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    /// Per client IP, every forwarded request.
    Ip,
    /// Per session, session routes only.
    Session,
}

impl Limiter {
    /// The binding's name in wrangler.toml.
    pub fn binding(self) -> &'static str {
        match self {
            Limiter::Ip => "IP_RATE_LIMITER",
            Limiter::Session => "SESSION_RATE_LIMITER",
        }
    }
}

/// The key used when no client address is known (`wrangler dev` without a proxy in front
/// sets one; a bare test harness may not): every such request shares one bucket.
pub const UNKNOWN_IP_KEY: &str = "ip:local";

/// The IP limiter's key for a `cf-connecting-ip` value: the address's rate-limit bucket
/// (`gateway_shared::client_ip`: an IPv6 client counts by its /64, so one home network
/// is one bucket, not 2^64). Anything that is not an IPv4 or IPv6 literal counts as
/// unknown. (On Cloudflare the header is set by the platform and cannot be forged; under
/// `wrangler dev` a client may send its own.)
pub fn ip_key(cf_connecting_ip: Option<&str>) -> String {
    match cf_connecting_ip
        .filter(|ip| ip.len() <= 64)
        .and_then(gateway_shared::client_ip::rate_key_of)
    {
        Some(key) => format!("ip:{key}"),
        None => UNKNOWN_IP_KEY.to_owned(),
    }
}

/// The session limiter's key: the session hash, never the token.
pub fn session_key(session: &SessionHash) -> String {
    format!("sid:{}", session.as_str())
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::Limiter;
    use crate::boundary::{rate_limit, rate_limits, Limit};
    use crate::error::EdgeError;
    use std::sync::atomic::{AtomicBool, Ordering};

    static WARNED_MISSING: AtomicBool = AtomicBool::new(false);

    /// Counts one request for `key`; `Err(RateLimited)` once the limit is reached.
    pub async fn check(
        env: &worker::Env,
        limiter: Limiter,
        key: String,
        retry_after_secs: u64,
    ) -> Result<(), EdgeError> {
        verdict(
            limiter,
            rate_limit(env, limiter.binding(), &key).await,
            retry_after_secs,
        )
    }

    /// Counts one request with two limiters at once (one wait); the first refusal wins.
    pub async fn check_both(
        env: &worker::Env,
        (a, key_a): (Limiter, String),
        (b, key_b): (Limiter, String),
        retry_after_secs: u64,
    ) -> Result<(), EdgeError> {
        let [ra, rb] = rate_limits(env, (a.binding(), &key_a), (b.binding(), &key_b)).await;
        verdict(a, ra, retry_after_secs).and(verdict(b, rb, retry_after_secs))
    }

    /// What one limiter's answer means for the request: through, or 429.
    fn verdict(
        limiter: Limiter,
        outcome: Result<Limit, String>,
        retry_after_secs: u64,
    ) -> Result<(), EdgeError> {
        match outcome {
            Ok(Limit::Allowed) => Ok(()),
            Ok(Limit::Limited) => Err(EdgeError::RateLimited { retry_after_secs }),
            Ok(Limit::NoBinding) => {
                if !WARNED_MISSING.swap(true, Ordering::Relaxed) {
                    worker::console_warn!(
                        "rate limiting off: binding {} unavailable",
                        limiter.binding()
                    );
                }
                Ok(())
            }
            Err(e) => {
                worker::console_warn!("{} failed, request let through: {e}", limiter.binding());
                Ok(())
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{check, check_both};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_accept_ip_literals_only() {
        assert_eq!(ip_key(Some("203.0.113.9")), "ip:203.0.113.9");
        assert_eq!(ip_key(Some("2001:DB8::1")), "ip:2001:db8::");
        assert_eq!(ip_key(Some("::ffff:203.0.113.9")), "ip:203.0.113.9");
        assert_eq!(ip_key(None), UNKNOWN_IP_KEY);
        assert_eq!(ip_key(Some("")), UNKNOWN_IP_KEY);
        assert_eq!(ip_key(Some("evil.example")), UNKNOWN_IP_KEY);
        assert_eq!(ip_key(Some(&"1".repeat(46))), UNKNOWN_IP_KEY);
        assert_eq!(ip_key(Some("1.2.3")), UNKNOWN_IP_KEY);
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64() {
        let home = ip_key(Some("2001:db8:aa:bb:1:2:3:4"));
        assert_eq!(home, "ip:2001:db8:aa:bb::");
        for other_host in ["2001:db8:aa:bb::1", "2001:db8:aa:bb:ffff:ffff:ffff:ffff"] {
            assert_eq!(ip_key(Some(other_host)), home, "{other_host}");
        }
        assert_ne!(ip_key(Some("2001:db8:aa:bc::1")), home, "the next /64");
        assert_ne!(ip_key(Some("10.0.0.1")), ip_key(Some("10.0.0.2")));
    }

    #[test]
    fn session_keys_hold_the_hash_not_the_token() {
        let k = session_key(&SessionHash::of("secret-token"));
        assert!(k.starts_with("sid:") && !k.contains("secret-token"));
        assert_eq!(k.len(), 4 + 64);
        assert_ne!(Limiter::Ip.binding(), Limiter::Session.binding());
    }
}
