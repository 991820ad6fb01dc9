//! Rate limits at the origin: GCRA limiters keyed by client address or user, and the rule
//! for who the client is when proxies stand in front.
//!
//! Semantics are the edge's (`RATE_LIMIT_*`, docs/EDGE.md): a limit is "N requests per
//! period" ([`RateSpec`], written `N/period`, e.g. `30/1m`), with a burst of N. The origin
//! counts with GCRA ([`governor`]): one 16-byte cell per key, no window edges to game, and
//! an exact "retry after" instead of the period. Over the limit → 429
//! `{"error":{"code":"rate_limited",...}}` with `Retry-After` (whole seconds, at least 1).
//!
//! The limits are per replica (each replica's state is its own); behind a load balancer
//! spreading clients evenly, the effective limit is N × replicas. They protect capacity —
//! NoETL, the playbook runtime, the realtime fan-out — they are not an authorisation check.
//!
//! **Who the client is** ([`ClientIp`], resolved once per request by [`note_client_ip`]):
//! the connection's peer, unless the peer is a configured trusted proxy
//! (`TRUSTED_PROXIES`, CIDRs: the GKE load balancer's ranges, the edge's egress, an
//! ingress). Then `x-forwarded-for` is read from the right, skipping trusted hops; the
//! first address that is not a trusted proxy is the client. A client's own
//! `x-forwarded-for` is never believed on its own: with no trusted proxies the header is
//! ignored. Keys: an IPv4 address as is, an IPv6 address by its /64 (one subscriber's
//! allocation — a /128 key would give one home network 2^64 buckets).
//!
//! **Memory**: keyed state grows with distinct keys; [`KeyedLimiter`] drops keys whose state
//! is back to "fresh" (the GCRA cell has fully drained) every [`SWEEP_EVERY`] checks, so the
//! map holds only keys active within one period.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::AppError;

/// The 429 code, the same the edge answers with.
pub const RATE_LIMITED_CODE: &str = "rate_limited";

/// How many checks pass between two sweeps of drained keys.
pub const SWEEP_EVERY: u64 = 4096;

/// A limit: `count` requests per `period`, burst `count`. Written `N/period` (`30/1m`,
/// `5/10s`); `off` disables it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// Requests allowed per period (also the burst).
    pub count: NonZeroU32,
    /// The period.
    pub period: Duration,
}

impl RateSpec {
    /// The GCRA quota: one request replenished every `period / count`, burst `count`.
    pub fn quota(self) -> Quota {
        let per_cell = (self.period / self.count.get()).max(Duration::from_nanos(1));
        Quota::with_period(per_cell)
            .expect("a period of at least 1 ns")
            .allow_burst(self.count)
    }
}

/// Parses `N/period` or `off` (→ `None`), for configuration flags.
pub fn parse_rate(s: &str) -> Result<Option<RateSpec>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (n, period) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected N/period (e.g. 30/1m) or off"))?;
    let count: NonZeroU32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: the count must be a whole number above 0"))?;
    let period = humantime::parse_duration(period.trim())
        .map_err(|e| format!("{s:?}: {e} (use e.g. 1s, 1m)"))?;
    if period.is_zero() {
        return Err(format!("{s:?}: the period must be above 0"));
    }
    Ok(Some(RateSpec { count, period }))
}

/// A refusal: how long until the key may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for the `Retry-After` header, at least 1.
    pub fn secs(self) -> u64 {
        let s = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        s.max(1)
    }

    /// The 429 for this refusal; `what` says which limit, for the caller.
    pub fn into_error(self, what: &str) -> AppError {
        AppError::TooManyRequests {
            code: RATE_LIMITED_CODE,
            message: format!("too many {what}; retry after {} s", self.secs()),
            retry_after: self.secs(),
        }
    }
}

/// A GCRA limiter per key, or no limit at all (`off`). Cheap to clone (shared state).
#[derive(Clone)]
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    inner: Option<Arc<Inner<K>>>,
}

struct Inner<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("on", &self.inner.is_some())
            .field("keys", &self.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter for `spec`, or one that never refuses for `None`.
    pub fn new(spec: Option<RateSpec>) -> Self {
        Self {
            inner: spec.map(|spec| {
                Arc::new(Inner {
                    limiter: RateLimiter::keyed(spec.quota()),
                    checks: AtomicU64::new(0),
                })
            }),
        }
    }

    /// Counts one request for `key`: `Ok` if it is within the limit, else how long to wait.
    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        if inner.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            inner.limiter.retain_recent();
            inner.limiter.shrink_to_fit();
        }
        inner.limiter.check_key(key).map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Keys currently held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.limiter.len())
    }

    /// No key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a client address is counted by: IPv4 as is (an IPv4-mapped IPv6 address is its
/// IPv4 address), IPv6 by its /64.
/// The rule is the edge's too: `gateway_shared::client_ip`.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    gateway_shared::client_ip::rate_key(ip)
}

/// An address range, `addr/len` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, len })
    }
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.len)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, len: u8) -> bool {
    if len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(len));
    a & mask == b & mask
}

/// The proxies whose `x-forwarded-for` the origin believes (`TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[Cidr]>);

impl TrustedProxies {
    /// From the configured ranges.
    pub fn new(ranges: &[Cidr]) -> Self {
        Self(ranges.into())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client's address: the peer, or — when the peer is a trusted proxy — the
    /// right-most `x-forwarded-for` entry that is not itself a trusted proxy. A malformed
    /// entry ends the walk at the last trusted hop (never a guess from the client's part).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// The client's address for this request, as [`TrustedProxies::client_ip`] resolved it
/// (put in the request's extensions by [`note_client_ip`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl ClientIp {
    /// The key rate limits count this client by ([`ip_key`]).
    pub fn key(self) -> IpAddr {
        ip_key(self.0)
    }
}

/// Resolves [`ClientIp`] once, before anything else reads it (`crate::app`'s `front`
/// layer, before every route of the public listener).
pub fn note_client_ip(trusted: &TrustedProxies, req: &mut Request) {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        let ip = trusted.client_ip(peer.ip(), req.headers());
        req.extensions_mut().insert(ClientIp(ip));
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ip) = parts.extensions.get::<ClientIp>() {
            return Ok(*ip);
        }
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| ClientIp(c.0.ip()))
            .ok_or_else(|| AppError::Internal("no peer address on the request".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rates_parse_as_count_per_period_or_off() {
        let r = parse_rate("30/1m").unwrap().unwrap();
        assert_eq!(r.count.get(), 30);
        assert_eq!(r.period, Duration::from_secs(60));
        assert_eq!(parse_rate("OFF").unwrap(), None);
        for bad in ["30", "0/1s", "x/1s", "5/0s", "5/soon", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_gets_its_burst_then_waits_and_other_keys_are_unaffected() {
        let limiter = KeyedLimiter::new(parse_rate("3/1m").unwrap());
        for _ in 0..3 {
            limiter.check(&1).unwrap();
        }
        let wait = limiter.check(&1).unwrap_err();
        // One cell every 20 s.
        assert!(wait.0 > Duration::from_secs(15) && wait.0 <= Duration::from_secs(20));
        assert_eq!(wait.secs(), wait.0.as_secs() + 1);
        limiter.check(&2).unwrap();
        let off = KeyedLimiter::<u8>::new(None);
        for _ in 0..10_000 {
            off.check(&1).unwrap();
        }
    }

    #[test]
    fn drained_keys_are_swept() {
        let limiter = KeyedLimiter::new(parse_rate("1000/1ms").unwrap());
        for k in 0..SWEEP_EVERY - 1 {
            limiter.check(&k).unwrap();
        }
        assert_eq!(limiter.len() as u64, SWEEP_EVERY - 1);
        std::thread::sleep(Duration::from_millis(5));
        // The next check is the sweep's turn; every earlier key has drained.
        limiter.check(&u64::MAX).unwrap();
        assert_eq!(limiter.len(), 1, "only the newest key is held");
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_by_the_ipv4() {
        assert_eq!(
            ip_key(ip("2001:db8:1:2:aaaa::1")),
            ip_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(ip_key(ip("2001:db8:1:2::1")), ip_key(ip("2001:db8:1:3::1")));
        assert_eq!(ip_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(ip_key(ip("10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn cidrs_match_their_prefix_only() {
        let c: Cidr = "130.211.0.0/22".parse().unwrap();
        assert!(c.contains(ip("130.211.3.255")));
        assert!(c.contains(ip("::ffff:130.211.1.1")));
        assert!(!c.contains(ip("130.211.4.0")));
        assert!(!c.contains(ip("2001:db8::1")));
        let one: Cidr = "10.0.0.7".parse().unwrap();
        assert!(one.contains(ip("10.0.0.7")) && !one.contains(ip("10.0.0.8")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "x/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_through_trusted_hops() {
        let lb = [
            "130.211.0.0/22".parse().unwrap(),
            "34.1.2.3".parse().unwrap(),
        ];
        let trusted = TrustedProxies::new(&lb);
        // Not from a trusted proxy: the header is the client's own claim, ignored.
        assert_eq!(
            trusted.client_ip(ip("203.0.113.9"), &headers(&["1.1.1.1"])),
            ip("203.0.113.9")
        );
        // Through the balancer: `<client>, <lb ip>` — skip the trusted hops from the right.
        assert_eq!(
            trusted.client_ip(ip("130.211.0.5"), &headers(&["198.51.100.7, 34.1.2.3"])),
            ip("198.51.100.7")
        );
        // A client prepending its own entries cannot pick its key.
        assert_eq!(
            trusted.client_ip(
                ip("130.211.0.5"),
                &headers(&["9.9.9.9, 198.51.100.7", "34.1.2.3"])
            ),
            ip("198.51.100.7")
        );
        // Garbage ends the walk at the last trusted hop.
        assert_eq!(
            trusted.client_ip(ip("130.211.0.5"), &headers(&["nonsense, 34.1.2.3"])),
            ip("34.1.2.3")
        );
        // No header: the proxy itself.
        assert_eq!(
            trusted.client_ip(ip("130.211.0.5"), &HeaderMap::new()),
            ip("130.211.0.5")
        );
        // Nothing trusted: never read.
        assert_eq!(
            TrustedProxies::default().client_ip(ip("127.0.0.1"), &headers(&["1.1.1.1"])),
            ip("127.0.0.1")
        );
    }
}
