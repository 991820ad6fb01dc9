//! The stand-in's configuration: one struct, read once at start (clap, each flag also from
//! the environment), printed at start-up. Nothing else reads the environment.

use super::events::{v4, EventShape};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use std::net::SocketAddr;
use std::time::Duration;

/// Command-line and environment configuration of `noetl-standin`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "noetl-standin",
    about = "NoETL server stand-in: the HTTP API, auth routes, a dev identity provider and NATS execution events (PROTOCOL.md §6)"
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "STANDIN_ADDR", default_value = "127.0.0.1:8082")]
    pub addr: SocketAddr,

    /// The URL clients use to reach this server; the dev IdP issuer is `<public-url>/dev/`.
    /// Default: `http://<bound address>`.
    #[arg(long, env = "STANDIN_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// NATS server for execution events; without it no events are published.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,

    /// Session lifetime in seconds.
    #[arg(long, env = "STANDIN_SESSION_TTL", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub session_ttl: u64,

    /// Time each playbook step takes, in milliseconds.
    #[arg(long, env = "STANDIN_STEP_DELAY_MS", default_value_t = 200)]
    pub step_delay_ms: u64,

    /// Events are buffered and published in a burst every this many milliseconds, like the
    /// real server tailing its event table.
    #[arg(long, env = "STANDIN_TAIL_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tail_interval_ms: u64,

    /// Which NoETL the execution events look like: `rust` (the Rust control plane,
    /// default), `python` (the older Python server), `v4` (NoETL 4.x's event mirror) or
    /// `none` (no events on NATS at all).
    #[arg(long, env = "STANDIN_EVENT_SHAPE", value_enum)]
    pub event_shape: Option<EventShape>,

    /// The older spelling of `--event-shape python` (kept working).
    #[arg(long, env = "STANDIN_PYTHON_EVENTS", action = ArgAction::SetTrue,
          value_parser = BoolishValueParser::new())]
    pub python_events: bool,

    /// `v4`: the JetStream stream (4.x's `NOETL_EVENT_NATS_STREAM`); created with
    /// `<prefix>.>` if missing.
    #[arg(long, env = "STANDIN_V4_STREAM", default_value = v4::STREAM_NAME)]
    pub v4_stream: String,

    /// `v4`: the subject prefix (4.x's `NOETL_EVENT_NATS_SUBJECT_PREFIX`; a trailing `.>`
    /// is dropped).
    #[arg(long, env = "STANDIN_V4_SUBJECT_PREFIX", default_value = v4::SUBJECT_PREFIX)]
    pub v4_subject_prefix: String,

    /// `v4`: the envelope's `tenant_id` (sanitised into the subject: `acme/EU west` →
    /// `acme-EU-west`).
    #[arg(long, env = "STANDIN_TENANT", default_value = v4::DEFAULT_TOKEN)]
    pub tenant: String,

    /// `v4`: the envelope's `organization_id` (sanitised into the subject).
    #[arg(long, env = "STANDIN_ORGANIZATION", default_value = v4::DEFAULT_TOKEN)]
    pub organization: String,

    /// `v4`: the subject's last token is `execution_id % shard-count`.
    #[arg(long, env = "STANDIN_SHARD_COUNT", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub shard_count: u32,

    /// The `aud` the dev IdP puts in its ID tokens (and that login requires).
    #[arg(long, env = "STANDIN_AUDIENCE", default_value = "noetl-gateway-dev")]
    pub audience: String,
}

impl Config {
    /// The event shape of this run: `--python-events` means `python`, else
    /// `--event-shape`, default `rust`.
    pub fn event_shape(&self) -> EventShape {
        if self.python_events {
            EventShape::Python
        } else {
            self.event_shape.unwrap_or(EventShape::Rust)
        }
    }

    /// Refuses settings that contradict each other (`--python-events` with another
    /// `--event-shape`).
    pub fn validate(&self) -> anyhow::Result<()> {
        if let (true, Some(shape)) = (self.python_events, self.event_shape) {
            anyhow::ensure!(
                shape == EventShape::Python,
                "--python-events contradicts --event-shape {}",
                shape.as_str()
            );
        }
        Ok(())
    }

    /// The public base URL without a trailing slash; `bound` is the address actually bound
    /// (so `--addr 127.0.0.1:0` still yields a usable URL).
    pub fn public_url_for(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            // Bound to every interface: loopback is the address that surely reaches us.
            None if bound.ip().is_unspecified() => format!("http://127.0.0.1:{}", bound.port()),
            None => format!("http://{bound}"),
        }
    }

    /// How long one playbook step takes.
    pub fn step_delay(&self) -> Duration {
        Duration::from_millis(self.step_delay_ms)
    }

    /// How often buffered events are flushed to NATS.
    pub fn tail_interval(&self) -> Duration {
        Duration::from_millis(self.tail_interval_ms)
    }

    /// How long a session lives.
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::try_parse_from(["noetl-standin"]).expect("defaults parse");
        assert_eq!(c.addr.to_string(), "127.0.0.1:8082");
        assert_eq!(c.session_ttl, 86_400);
        assert_eq!(c.step_delay_ms, 200);
        assert_eq!(c.tail_interval_ms, 500);
        assert!(!c.python_events);
        assert_eq!(c.event_shape(), EventShape::Rust);
        assert_eq!(
            (c.v4_stream.as_str(), c.v4_subject_prefix.as_str()),
            ("NOETL_EVENTS", "noetl.events")
        );
        assert_eq!(
            (c.tenant.as_str(), c.organization.as_str()),
            ("default", "default")
        );
        assert_eq!(c.shard_count, 1);
        assert_eq!(c.audience, "noetl-gateway-dev");
        assert_eq!(
            c.public_url_for("127.0.0.1:9000".parse().expect("literal")),
            "http://127.0.0.1:9000"
        );
    }

    #[test]
    fn the_event_shape_is_chosen_by_flag_and_the_old_flag_means_python() {
        let shape = |args: &[&str]| {
            let c = Config::try_parse_from(["noetl-standin"].iter().chain(args)).expect("parses");
            c.validate().map(|()| c.event_shape())
        };
        assert_eq!(shape(&["--event-shape", "v4"]).ok(), Some(EventShape::V4));
        assert_eq!(
            shape(&["--event-shape", "none"]).ok(),
            Some(EventShape::None)
        );
        assert_eq!(
            shape(&["--event-shape", "rust"]).ok(),
            Some(EventShape::Rust)
        );
        assert_eq!(shape(&["--python-events"]).ok(), Some(EventShape::Python));
        assert_eq!(
            shape(&["--python-events", "--event-shape", "python"]).ok(),
            Some(EventShape::Python)
        );
        assert!(shape(&["--python-events", "--event-shape", "v4"]).is_err());
        assert!(Config::try_parse_from(["noetl-standin", "--event-shape", "v5"]).is_err());
        assert!(Config::try_parse_from(["noetl-standin", "--shard-count", "0"]).is_err());
        let c = Config::try_parse_from([
            "noetl-standin",
            "--tenant",
            "acme/EU west",
            "--shard-count",
            "4",
        ])
        .expect("parses");
        assert_eq!((c.tenant.as_str(), c.shard_count), ("acme/EU west", 4));
    }

    #[test]
    fn a_zero_tail_interval_is_refused() {
        assert!(Config::try_parse_from(["noetl-standin", "--tail-interval-ms", "0"]).is_err());
    }

    #[test]
    fn public_url_loses_its_trailing_slash() {
        let c = Config::try_parse_from(["noetl-standin", "--public-url", "http://h:1/"])
            .expect("parses");
        assert_eq!(
            c.public_url_for("127.0.0.1:1".parse().expect("literal")),
            "http://h:1"
        );
    }
}
