//! Building blocks of the realtime benchmark (`bench-realtime`), kept out of the binary so
//! each piece has one job and can be read alone.
//!
//! - [`sse_conn`] — a lean HTTP/1.1 `/events` client over a raw socket (optionally bound
//!   to a chosen loopback source address), with chunked decoding and SSE frame parsing.
//!   Tens of thousands of these must fit in one process, so it holds no HTTP client stack.
//! - [`holder`] — the load generator's child processes: `bench-realtime --hold N` opens N
//!   idle streams and reports over stdout; the parent side spawns, watches and kills them.
//!   Needed because one process may hold at most ~20k sockets here (hard `RLIMIT_NOFILE`).
//! - [`peer`] — a trivial axum SSE server, the floor the origin's per-connection memory is
//!   compared against in the same run.
//! - [`procfs`] — what the benchmark reads about a process: RSS, anonymous memory, CPU time.
//! - [`nginx`] — Debian's nginx as a peer (`bench-services`' proxy, `bench-peers'` nginx +
//!   nchan): a scratch prefix, a rendered config, a port it is checked to own.
//! - [`workerd`] and [`http_load`] (`bench-edge`) — plain `workerd serve` processes from a
//!   capnp template, and a closed-loop keep-alive HTTP/1.1 load generator.
//! - [`percentile`], [`us`] and [`arg`] — the figures and flags every `bench-*` binary
//!   shares.
//!
//! A frame's send time travels inside the frame (`t`, nanoseconds since [`now_ns`]'s
//! origin in the process that sent it), so latency is measured by the reader without a
//! shared map between sender and reader.

pub mod holder;
pub mod http_load;
pub mod nginx;
pub mod peer;
pub mod procfs;
pub mod sse_conn;
pub mod workerd;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Nanoseconds since the first call in this process: the clock every send time and
/// arrival time of one process is taken from.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The value at quantile `p` (0..=1) of an ascending slice (nanoseconds, durations); zero
/// (the default) for an empty one. Every `bench-*` binary's percentiles.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Nanoseconds as fractional milliseconds.
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A duration as fractional microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The number after `name` on the command line (`--logouts 200`), or `default` when it is
/// absent or not a number: the `bench-*` binaries' simple flags.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deadline that every wait of the benchmark is bounded by.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `d` from now.
    pub fn after(d: Duration) -> Self {
        Self(Instant::now() + d)
    }

    /// Time left (zero once passed).
    pub fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// True once passed.
    pub fn passed(&self) -> bool {
        self.left().is_zero()
    }

    /// The earlier of this deadline and `d` from now.
    pub fn within(&self, d: Duration) -> Duration {
        self.left().min(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile::<u64>(&[], 0.5), 0);
    }
}
