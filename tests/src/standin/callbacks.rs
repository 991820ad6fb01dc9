//! Callbacks to the gateway: what a playbook's final HTTP step does in the real system.
//!
//! Results go to `{gateway_url}/api/internal/callback/async`, auth-playbook answers to
//! `{gateway_url}/api/internal/callback`, progress to `{gateway_url}/api/internal/progress`,
//! each with `Authorization: Bearer <callback_token>` when the workload carries one.
//! Connection errors and 5xx are retried (6 attempts: 100 ms backoff, doubling); 4xx is an
//! answer, not a failure. Every attempt is logged for `GET /_standin/callbacks`; the bearer
//! token is never logged.

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Attempts per callback (the first try plus 5 retries).
pub const MAX_ATTEMPTS: u32 = 6;
/// Wait before the first retry; doubles each time.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Attempts kept in the log.
const LOG_CAPACITY: usize = 1_000;
/// Per-attempt timeout: a hung gateway must not hold a run forever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which gateway endpoint a callback targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackKind {
    /// `POST /api/internal/callback/async` — a playbook result for an SSE client.
    Result,
    /// `POST /api/internal/callback` — an auth playbook's answer a request waits on.
    Auth,
    /// `POST /api/internal/progress`.
    Progress,
}

impl CallbackKind {
    /// The path under `gateway_url`.
    pub fn path(self) -> &'static str {
        match self {
            Self::Result => "/api/internal/callback/async",
            Self::Auth => "/api/internal/callback",
            Self::Progress => "/api/internal/progress",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Result => "async",
            Self::Auth => "sync",
            Self::Progress => "progress",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The gateway answered with this status.
    Answered(u16),
    /// No answer (refused, reset, timed out).
    Unreachable(String),
}

impl Attempt {
    /// Retry on no answer or a 5xx; any other answer is final.
    pub fn should_retry(&self) -> bool {
        match self {
            Self::Answered(code) => *code >= 500,
            Self::Unreachable(_) => true,
        }
    }

    /// Whether the gateway took the callback.
    pub fn delivered(&self) -> bool {
        matches!(self, Self::Answered(code) if (200..300).contains(code))
    }
}

/// The wait before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    FIRST_BACKOFF * 2u32.saturating_pow(n.saturating_sub(1))
}

/// Sends callbacks and remembers every attempt.
#[derive(Debug)]
pub struct CallbackClient {
    http: reqwest::Client,
    log: Mutex<VecDeque<Value>>,
}

impl CallbackClient {
    /// A client with a per-attempt timeout.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(ATTEMPT_TIMEOUT)
                .build()?,
            log: Mutex::default(),
        })
    }

    /// POSTs `body` to `{gateway_url}{kind.path()}`, retrying as documented; true if the
    /// gateway answered 2xx.
    pub async fn send(
        &self,
        kind: CallbackKind,
        gateway_url: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> bool {
        let url = format!("{}{}", gateway_url.trim_end_matches('/'), kind.path());
        for n in 1..=MAX_ATTEMPTS {
            let attempt = self.attempt(&url, bearer, body).await;
            self.remember(kind, &url, n, &attempt, body);
            tracing::info!(%url, attempt = n, outcome = ?attempt, "callback");
            if !attempt.should_retry() || n == MAX_ATTEMPTS {
                return attempt.delivered();
            }
            tokio::time::sleep(backoff(n)).await;
        }
        false
    }

    async fn attempt(&self, url: &str, bearer: Option<&str>, body: &Value) -> Attempt {
        let mut req = self.http.post(url).json(body);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        match req.send().await {
            Ok(resp) => Attempt::Answered(resp.status().as_u16()),
            Err(e) => Attempt::Unreachable(e.to_string()),
        }
    }

    fn remember(&self, kind: CallbackKind, url: &str, n: u32, attempt: &Attempt, body: &Value) {
        let (status, error) = match attempt {
            Attempt::Answered(code) => (Some(*code), None),
            Attempt::Unreachable(e) => (None, Some(e.clone())),
        };
        let entry = json!({
            "kind": kind.label(),
            "url": url,
            "attempt": n,
            "status": status,
            "error": error,
            "body": body,
            "at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(entry);
    }

    /// Every attempt so far, oldest first.
    pub fn log(&self) -> Vec<Value> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_silence_and_5xx_are_retried() {
        assert!(Attempt::Unreachable("refused".into()).should_retry());
        assert!(Attempt::Answered(503).should_retry());
        assert!(!Attempt::Answered(404).should_retry());
        assert!(!Attempt::Answered(200).should_retry());
        assert!(Attempt::Answered(202).delivered());
        assert!(!Attempt::Answered(404).delivered());
    }

    #[test]
    fn backoff_doubles_from_100_ms() {
        let waits: Vec<u128> = (1..MAX_ATTEMPTS).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600]);
    }
}
