//! The stand-in's configuration: one struct, read once at start (clap, each flag also from
//! the environment), printed at start-up. Nothing else reads the environment.

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

    /// Publish the older Python server's event shape instead of the Rust server's.
    #[arg(long, env = "STANDIN_PYTHON_EVENTS", action = ArgAction::SetTrue,
          value_parser = BoolishValueParser::new())]
    pub python_events: bool,

    /// The `aud` the dev IdP puts in its ID tokens (and that login requires).
    #[arg(long, env = "STANDIN_AUDIENCE", default_value = "noetl-gateway-dev")]
    pub audience: String,
}

impl Config {
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
        assert_eq!(c.audience, "noetl-gateway-dev");
        assert_eq!(
            c.public_url_for("127.0.0.1:9000".parse().expect("literal")),
            "http://127.0.0.1:9000"
        );
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
