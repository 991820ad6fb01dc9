//! The demo service's configuration: one struct, read once at start (clap, each flag also
//! from the environment), validated and printed with the token redacted. Nothing else
//! reads the environment.

use clap::Parser;
use std::net::SocketAddr;

/// Command-line and environment configuration of `demo-service`.
#[derive(Clone, Parser)]
#[command(
    name = "demo-service",
    about = "A backend service stand-in behind the gateway's /api/v1/<name>/*: echo, slow and SSE routes, and a human-in-the-loop asker"
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed as
    /// `listening on http://ADDR`).
    #[arg(long, env = "DEMO_ADDR", default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,

    /// The service's name in the gateway's registry: the `service` of its questions and
    /// events, and what `/echo` reports.
    #[arg(long, env = "DEMO_NAME", default_value = "demo")]
    pub name: String,

    /// The gateway's internal listener (e.g. `http://127.0.0.1:8091`), where questions and
    /// events are posted. Unset: `/ask` and `/emit` answer 503 until a test sets it
    /// (`POST /_demo/gateway`).
    #[arg(long, env = "GATEWAY_INTERNAL_URL")]
    pub gateway_internal_url: Option<String>,

    /// The gateway's service token (`Authorization: Bearer …` on the internal listener).
    #[arg(long, env = "GATEWAY_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,

    /// How the gateway reaches this service (the base of `reply_to.url`, which must lie
    /// under the service's registered URL). Default: `http://<bound address>`.
    #[arg(long, env = "DEMO_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .field("gateway_internal_url", &self.gateway_internal_url)
            .field(
                "internal_token",
                &self.internal_token.as_ref().map(|_| "<redacted>"),
            )
            .field("public_url", &self.public_url)
            .finish()
    }
}

impl Config {
    /// Refuses a name the gateway's registry would refuse (`[a-z0-9_-]{1,32}`) and URLs
    /// that are not absolute http(s) URLs.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            valid_service_name(&self.name),
            "--name {:?}: a service name is 1 to 32 of [a-z0-9_-]",
            self.name
        );
        for (flag, url) in [
            ("--gateway-internal-url", &self.gateway_internal_url),
            ("--public-url", &self.public_url),
        ] {
            if let Some(url) = url {
                check_http_url(url).map_err(|e| anyhow::anyhow!("{flag} {url:?}: {e}"))?;
            }
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
}

/// The gateway's rule for a service name: `[a-z0-9_-]{1,32}`.
pub fn valid_service_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// An absolute `http`/`https` URL with a host, or why not.
pub fn check_http_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some() => Ok(()),
        "http" | "https" => Err("no host".into()),
        other => Err(format!("scheme {other:?} is not http or https")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("demo-service").chain(args.iter().copied()))
            .expect("the arguments parse")
    }

    #[test]
    fn defaults_are_a_free_loopback_port_and_the_name_demo() {
        let c = parse(&[]);
        assert_eq!(c.addr.to_string(), "127.0.0.1:0");
        assert_eq!(c.name, "demo");
        assert!(c.validate().is_ok());
        assert_eq!(
            c.public_url_for("127.0.0.1:4321".parse().unwrap()),
            "http://127.0.0.1:4321"
        );
        assert_eq!(
            c.public_url_for("0.0.0.0:4321".parse().unwrap()),
            "http://127.0.0.1:4321"
        );
    }

    #[test]
    fn a_public_url_loses_its_trailing_slash() {
        let c = parse(&["--public-url", "http://demo.internal:9000/"]);
        assert_eq!(
            c.public_url_for("127.0.0.1:1".parse().unwrap()),
            "http://demo.internal:9000"
        );
    }

    #[test]
    fn names_and_urls_the_gateway_would_refuse_are_refused_at_start() {
        for bad in ["", "Demo", "a/b", "x".repeat(33).as_str()] {
            assert!(parse(&["--name", bad]).validate().is_err(), "{bad:?}");
        }
        assert!(parse(&["--name", "my_svc-2"]).validate().is_ok());
        for bad in ["ftp://h/", "not a url", "http://"] {
            assert!(
                parse(&["--gateway-internal-url", bad]).validate().is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_token_never_appears_in_the_printed_config() {
        let c = parse(&["--internal-token", "s3cret"]);
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }
}
