//! The bridge's settings: [`BridgeConfig`], its defaults (PROTOCOL §6), its validation,
//! and how it is read from the origin's one [`Config`].

use std::time::Duration;

use super::policy;
use super::BridgeError;
use crate::config::Config;

/// Upper bound of [`BridgeConfig::concurrency`].
pub const MAX_CONCURRENCY: usize = 1024;

/// The bridge's settings. `Default` is PROTOCOL §6 and a single-digit-second budget for
/// late interest; the server fills it from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The JetStream streams NoETL may publish into, tried in order; the first that exists
    /// is read (default `noetl_events`, the Rust control plane's, then `NOETL_EVENTS`,
    /// NoETL 4.x's event mirror). None found (or none configured) → the HTTP fallback.
    pub streams: Vec<String>,
    /// The subjects to read (`noetl.events.>`); must end in `.>`. Its prefix is what both
    /// subject shapes are parsed under.
    pub subject: String,
    /// The durable consumer's name (`gateway-bridge`). Every replica must use the same
    /// one, or each replica gets every event.
    pub consumer: String,
    /// Event types forwarded, normalised names (default [`policy::DEFAULT_FORWARD`]).
    pub forward: Vec<String>,
    /// An event whose execution still has no interest after this long (since NATS
    /// stored it) is dropped (default 10 s).
    pub max_interest_wait: Duration,
    /// How long a status NoETL cannot confirm is retried before the event's own claim is
    /// used (default 30 s).
    pub max_confirm_wait: Duration,
    /// Delay before an event is retried (NAK delay; ×4 for store, bus and NoETL
    /// failures). Default 500 ms, about NoETL's burst interval.
    pub retry_delay: Duration,
    /// JetStream ack wait: an un-acked message is redelivered after this — how soon the
    /// next reader gets the events a reader that died had pulled (default 5 s). A message
    /// still queued or being handled on the live reader when it comes back is recognised
    /// by its stream sequence and left to the copy in hand (`pool`), so a short wait costs
    /// a redelivery, never a second handling.
    pub ack_wait: Duration,
    /// JetStream max un-acked messages across all replicas (default 10 000; see the
    /// module docs for sizing). Only applied when the consumer is created.
    pub max_ack_pending: i64,
    /// Messages pulled per request (default 32). The client asks for the next batch when
    /// half of one is left, so the reader keeps up to ~1.5 batches in hand besides the
    /// workers' queues. Small keeps a slow replica from sitting on messages another
    /// replica could handle.
    pub batch: usize,
    /// Worker tasks handling events concurrently (default 32, at most
    /// [`MAX_CONCURRENCY`]). Every event of one execution goes to the same worker (a hash
    /// of its id) and is handled in delivery order; different executions are handled in
    /// parallel. At most `concurrency × WORKER_QUEUE` (16) events wait in memory.
    pub concurrency: usize,
    /// HTTP fallback: the shortest interval between two reads of one execution's record
    /// (default 250 ms: at most 4 requests/s per followed execution, besides the status
    /// confirmations a terminal needs). Used while the run produces events, and at once
    /// after a NoETL event on NATS names the execution.
    pub poll_interval: Duration,
    /// HTTP fallback: the longest interval, reached by backing off (×1.5 per read without
    /// news; default 2 s, at most a third of `lease_ttl`).
    pub poll_max_interval: Duration,
    /// How long a replica's lease lasts without renewal (default 6 s): the durable
    /// reader's (one replica reads at a time) and the HTTP fallback's per execution — the
    /// longest either goes unread after its replica died.
    pub lease_ttl: Duration,
    /// HTTP fallback: most executions one replica follows at once (default 1000); more
    /// wait for a slot (another replica may take them).
    pub poll_max_followed: usize,
    /// HTTP fallback: a run not ended after this long is no longer followed (default 1 h,
    /// the interest records' life).
    pub poll_max_follow: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            streams: vec!["noetl_events".into(), "NOETL_EVENTS".into()],
            subject: "noetl.events.>".into(),
            consumer: "gateway-bridge".into(),
            forward: policy::DEFAULT_FORWARD
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            max_interest_wait: Duration::from_secs(10),
            max_confirm_wait: Duration::from_secs(30),
            retry_delay: Duration::from_millis(500),
            ack_wait: Duration::from_secs(5),
            max_ack_pending: 10_000,
            batch: 32,
            concurrency: 32,
            poll_interval: Duration::from_millis(250),
            poll_max_interval: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(6),
            poll_max_followed: 1000,
            poll_max_follow: Duration::from_secs(3600),
        }
    }
}

impl BridgeConfig {
    /// The bridge's settings from the origin's configuration (the rest keep the defaults).
    pub fn from_config(config: &Config) -> Self {
        let defaults = Self::default();
        Self {
            streams: config
                .noetl_events_stream
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            subject: config.noetl_events_subject.clone(),
            consumer: config.bridge_consumer.clone(),
            forward: config
                .bridge_forward
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            max_interest_wait: config.bridge_max_interest_wait,
            concurrency: config.bridge_concurrency,
            ack_wait: config.bridge_ack_wait,
            poll_interval: config.bridge_poll_interval,
            poll_max_interval: config.bridge_poll_max_interval,
            lease_ttl: config.bridge_lease_ttl,
            poll_max_followed: config.bridge_poll_max_followed,
            ..defaults
        }
    }

    /// Checks the settings a typo would break silently.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let bad = |m: String| Err(BridgeError::Config(m));
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if let Some(bad_name) = self.streams.iter().find(|s| !name_ok(s)) {
            return bad(format!("stream name {bad_name:?} is not a valid name"));
        }
        if !name_ok(&self.consumer) {
            return bad(format!(
                "consumer name {:?} is not a valid name",
                self.consumer
            ));
        }
        if self.prefix().len() < 2 || self.subject.contains(['*', ' ']) {
            return bad(format!(
                "subject {:?} must be a literal prefix followed by `.>`",
                self.subject
            ));
        }
        if self.forward.is_empty() {
            return bad("the forward allow-list is empty: nothing would be forwarded".into());
        }
        if self.retry_delay.is_zero() || self.retry_delay > Duration::from_secs(60) {
            return bad("retry_delay must be within (0, 60 s]".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return bad("ack_wait must be at least 1 s".into());
        }
        if self.batch == 0 || self.max_ack_pending < self.batch as i64 {
            return bad("batch must be ≥ 1 and max_ack_pending ≥ batch".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad(format!(
                "concurrency must be within 1..={MAX_CONCURRENCY} (got {})",
                self.concurrency
            ));
        }
        if self.poll_interval < Duration::from_millis(50)
            || self.poll_max_interval < self.poll_interval
            || self.lease_ttl < Duration::from_secs(1)
            || self.poll_max_interval * 3 > self.lease_ttl
        {
            return bad(format!(
                "HTTP fallback: need 50 ms ≤ poll interval ({:?}) ≤ max interval ({:?}) ≤ lease TTL ({:?}) / 3, lease ≥ 1 s",
                self.poll_interval, self.poll_max_interval, self.lease_ttl
            ));
        }
        if self.poll_max_followed == 0 {
            return bad("poll_max_followed must be ≥ 1".into());
        }
        Ok(())
    }

    /// `noetl.events.` for `noetl.events.>` (empty if the subject is not of that form).
    pub(super) fn prefix(&self) -> &str {
        self.subject
            .strip_suffix('>')
            .filter(|p| p.ends_with('.'))
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::TEST_REQUIRED_FLAGS as REQUIRED_FLAGS;

    #[test]
    fn the_default_config_is_valid_and_follows_the_protocol() {
        let c = BridgeConfig::default();
        c.validate().expect("defaults are valid");
        assert_eq!(c.streams, ["noetl_events", "NOETL_EVENTS"]);
        assert_eq!(c.subject, "noetl.events.>");
        assert_eq!(c.consumer, "gateway-bridge");
        assert_eq!(c.prefix(), "noetl.events.");
        assert_eq!(c.forward.len(), 8);
        assert_eq!(c.max_interest_wait, Duration::from_secs(10));
        assert_eq!(c.concurrency, 32);
    }

    #[test]
    fn the_origin_flags_fill_it() {
        use clap::Parser;
        let c = Config::try_parse_from(REQUIRED_FLAGS).expect("flags parse");
        assert_eq!(BridgeConfig::from_config(&c), BridgeConfig::default());
        let mut args = REQUIRED_FLAGS.to_vec();
        args.extend([
            "--bridge-ack-wait",
            "2s",
            "--bridge-forward",
            " step.failed , ,playbook.failed",
            "--bridge-consumer",
            "gw-b",
        ]);
        let b = BridgeConfig::from_config(&Config::try_parse_from(args).expect("flags parse"));
        assert_eq!(b.forward, ["step.failed", "playbook.failed"]);
        assert_eq!(b.consumer, "gw-b");
        assert_eq!(b.ack_wait, Duration::from_secs(2));
        b.validate().expect("valid");
    }

    #[test]
    fn the_bridge_concurrency_flag_is_read_and_checked() {
        use clap::Parser;
        let from = |extra: &[&'static str]| {
            let mut args = REQUIRED_FLAGS.to_vec();
            args.extend_from_slice(extra);
            BridgeConfig::from_config(&Config::try_parse_from(args).expect("flags parse"))
        };
        assert_eq!(from(&[]).concurrency, 32);
        let eight = from(&["--bridge-concurrency", "8"]);
        eight.validate().unwrap();
        assert_eq!(eight.concurrency, 8);
        assert!(from(&["--bridge-concurrency", "0"]).validate().is_err());
    }

    #[test]
    fn typos_in_the_config_are_refused() {
        let bad = [
            BridgeConfig {
                subject: "noetl.events".into(),
                ..Default::default()
            },
            BridgeConfig {
                subject: ">".into(),
                ..Default::default()
            },
            BridgeConfig {
                subject: "noetl.*.>".into(),
                ..Default::default()
            },
            BridgeConfig {
                consumer: "gateway.bridge".into(),
                ..Default::default()
            },
            BridgeConfig {
                streams: vec!["noetl.events".into()],
                ..Default::default()
            },
            BridgeConfig {
                poll_max_interval: Duration::from_secs(5),
                ..Default::default()
            },
            BridgeConfig {
                poll_interval: Duration::from_millis(10),
                ..Default::default()
            },
            BridgeConfig {
                poll_max_followed: 0,
                ..Default::default()
            },
            BridgeConfig {
                forward: vec![],
                ..Default::default()
            },
            BridgeConfig {
                retry_delay: Duration::ZERO,
                ..Default::default()
            },
            BridgeConfig {
                batch: 0,
                ..Default::default()
            },
            BridgeConfig {
                concurrency: 0,
                ..Default::default()
            },
            BridgeConfig {
                concurrency: MAX_CONCURRENCY + 1,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(matches!(c.validate(), Err(BridgeError::Config(_))), "{c:?}");
        }
    }
}
