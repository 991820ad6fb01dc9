//! Identifiers shaped like the real server's: execution and event ids are snowflake-like
//! numbers above 2^53 (so a client that parses them as f64 loses digits, and the gateway's
//! tests catch it), user ids are stable per email.

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The first id handed out is at least this (5·10^17 > 2^53 ≈ 9·10^15).
const ID_FLOOR: u64 = 500_000_000_000_000_000;
/// Random start offset so ids differ between runs (JetStream dedupes on `Nats-Msg-Id`,
/// and a restarted stand-in must not reuse the previous run's event ids).
const ID_START_SPREAD: u64 = 1_000_000_000_000_000;

/// A NoETL execution id. A JSON number everywhere except the `/api/execute` reply and
/// callback bodies, where the real server writes it as a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(pub u64);

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ExecutionId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ExecutionId)
    }
}

/// An event id (the `Nats-Msg-Id` of the Rust-shape events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub u64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A user id: a JSON number, stable per email, usually above 2^53.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub u64);

impl UserId {
    /// The id for `email` (case-insensitive): the first 8 bytes of SHA-256, masked below
    /// 2^62 so it fits every signed 64-bit column.
    pub fn for_email(email: &str) -> Self {
        let digest = Sha256::digest(email.trim().to_ascii_lowercase().as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        UserId(u64::from_be_bytes(first) & ((1u64 << 62) - 1))
    }
}

/// Hands out increasing ids shared by executions and events, like one snowflake source.
#[derive(Debug)]
pub struct IdGen {
    next: AtomicU64,
}

impl IdGen {
    /// A generator starting at a random point above `ID_FLOOR`.
    pub fn new() -> Self {
        let start = ID_FLOOR + rand::rngs::OsRng.gen_range(0..ID_START_SPREAD);
        Self::starting_at(start)
    }

    /// A generator starting at `start` (for tests).
    pub fn starting_at(start: u64) -> Self {
        Self {
            next: AtomicU64::new(start),
        }
    }

    /// The next execution id.
    pub fn execution(&self) -> ExecutionId {
        ExecutionId(self.bump())
    }

    /// The next event id.
    pub fn event(&self) -> EventId {
        EventId(self.bump())
    }

    fn bump(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_above_2_pow_53_and_below_2_pow_63() {
        let g = IdGen::new();
        let a = g.execution().0;
        let b = g.event().0;
        assert!(a > 1 << 53 && a < 1 << 63);
        assert_eq!(b, a + 1);
    }

    #[test]
    fn execution_ids_serialise_as_exact_json_numbers() {
        let id = ExecutionId(500_000_000_000_000_123);
        assert_eq!(
            serde_json::to_string(&id).expect("serialises"),
            "500000000000000123"
        );
        assert_eq!("500000000000000123".parse::<ExecutionId>(), Ok(id));
    }

    #[test]
    fn user_ids_are_stable_per_email_and_ignore_case() {
        let a = UserId::for_email("Alice@Example.com");
        assert_eq!(a, UserId::for_email("alice@example.com"));
        assert_ne!(a, UserId::for_email("bob@example.com"));
        assert!(a.0 < 1 << 62);
    }
}
