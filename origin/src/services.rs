//! The service registry: the backends the gateway fronts, by name, from configuration
//! alone (PROTOCOL.md §5).
//!
//! Each entry has a name (`[a-z0-9_-]`, at most 32 bytes), a base URL (http or https, no
//! credentials, no query), an allow-list of `METHOD /prefix` pairs, and its own limits: the
//! time to the answer's head, the longest pause between two chunks, the largest body each
//! way. `/api/v1/{name}/{path}` goes to `{base}/{path}` ([`crate::proxy`]).
//!
//! Where entries come from, merged by name (a later source fills what an earlier left
//! unset, and the same setting twice for one name is an error):
//! - `SERVICES`: `name=url` pairs separated by commas, or a JSON array of
//!   `{"name", "url", "allow": ["GET /x", …], "timeout": "30s", "idle_timeout": "60s",
//!   "max_body": bytes}`;
//! - `SERVICE_<NAME>_URL`, `SERVICE_<NAME>_ALLOW`, `SERVICE_<NAME>_TIMEOUT`,
//!   `SERVICE_<NAME>_IDLE_TIMEOUT`, `SERVICE_<NAME>_MAX_BODY` variables (the name
//!   lower-cased: `SERVICE_MY_SVC_URL` registers `my_svc`).
//!
//! An entry without an allow-list proxies every method on every path below its base URL
//! (said at start, at warn). NoETL is the built-in entry `noetl` (`NOETL_BASE_URL`,
//! `PROXY_ALLOW`, `PROXY_*` limits), also reachable under its historical `/noetl/*`; the
//! name `events` is reserved for `/api/v1/events/{client_id}` (`crate::events`).
//!
//! Parsing is pure (settings in, entries or a message out), so a bad entry stops start-up
//! with exit code 2 and the message an operator needs.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::Method;
use serde::Deserialize;
use url::Url;

pub use crate::proxy::Limits;
use crate::proxy::{AllowList, NOETL};

/// Names no configured service may take.
pub const RESERVED: [&str; 2] = [NOETL, "events"];

/// The longest service name.
pub const MAX_NAME_LEN: usize = 32;

/// Methods an entry without an allow-list proxies.
const EVERY_METHOD: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// One registered backend service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Its name: the `{service}` of `/api/v1/{service}/…`.
    pub name: String,
    /// Its base URL; a request's path is appended below it.
    pub base: Url,
    /// What may be proxied.
    pub allow: AllowList,
    /// True when the entry named no allow-list (everything below the base is proxied).
    pub allow_all: bool,
    /// Its limits.
    pub limits: Limits,
}

impl ServiceSpec {
    /// The base URL as printed at start (credentials cannot occur: refused at parse).
    pub fn describe(&self) -> String {
        let allow = if self.allow_all {
            "every path".to_owned()
        } else {
            self.allow.to_string()
        };
        format!(
            "{}={} (allow: {allow}; timeout {:?}, idle {:?}, max body {} B)",
            self.name,
            self.base,
            self.limits.timeout,
            self.limits.idle_timeout,
            self.limits.max_body
        )
    }
}

/// One entry as written in `SERVICES` (JSON form) or gathered from the variables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    url: Option<String>,
    allow: Option<Vec<String>>,
    timeout: Option<String>,
    idle_timeout: Option<String>,
    max_body: Option<u64>,
}

/// True for a valid service name: `[a-z0-9_-]{1,32}`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The services `config` registers (`SERVICES` and `SERVICE_<NAME>_*`), with the `PROXY_*`
/// limits as their defaults.
pub fn from_config(config: &crate::config::Config) -> Result<Vec<ServiceSpec>, String> {
    parse(
        config.services.as_deref(),
        &config.service_vars,
        Limits {
            timeout: config.proxy_timeout,
            idle_timeout: config.proxy_idle_timeout,
            max_body: config.proxy_max_body,
        },
    )
}

/// The registered services (the built-in `noetl` entry not among them), sorted by name,
/// from `SERVICES` and the `SERVICE_<NAME>_*` variables in `vars` (other variables are
/// ignored).
pub fn parse(
    services: Option<&str>,
    vars: &[(String, String)],
    defaults: Limits,
) -> Result<Vec<ServiceSpec>, String> {
    let mut entries: BTreeMap<String, RawEntry> = BTreeMap::new();
    for raw in parse_services_setting(services.unwrap_or_default())? {
        if entries.contains_key(&raw.name) {
            return Err(format!("SERVICES names {:?} twice", raw.name));
        }
        entries.insert(raw.name.clone(), raw);
    }
    for (key, value) in vars {
        let Some((name, field)) = service_var(key) else {
            continue;
        };
        let e = entries.entry(name.clone()).or_insert_with(|| RawEntry {
            name: name.clone(),
            ..RawEntry::default()
        });
        let twice = || format!("{key}: service {name:?} already has this setting in SERVICES");
        match field {
            Field::Url => set_once(&mut e.url, value.clone(), twice)?,
            Field::Allow => set_once(
                &mut e.allow,
                value.split(',').map(str::to_owned).collect(),
                twice,
            )?,
            Field::Timeout => set_once(&mut e.timeout, value.clone(), twice)?,
            Field::IdleTimeout => set_once(&mut e.idle_timeout, value.clone(), twice)?,
            Field::MaxBody => {
                let n = value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{key}: {value:?} is not a byte count"))?;
                set_once(&mut e.max_body, n, twice)?
            }
        }
    }
    entries.into_values().map(|e| spec(e, defaults)).collect()
}

fn set_once<T>(slot: &mut Option<T>, value: T, twice: impl Fn() -> String) -> Result<(), String> {
    if slot.is_some() {
        return Err(twice());
    }
    *slot = Some(value);
    Ok(())
}

/// The settings a `SERVICE_<NAME>_*` variable can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Url,
    Allow,
    Timeout,
    IdleTimeout,
    MaxBody,
}

/// `SERVICE_MY_SVC_IDLE_TIMEOUT` → (`my_svc`, idle timeout); `None` for any other variable.
fn service_var(key: &str) -> Option<(String, Field)> {
    let rest = key.strip_prefix("SERVICE_")?;
    // Longest suffixes first: `_IDLE_TIMEOUT` also ends in `_TIMEOUT`.
    let (name, field) = [
        ("_IDLE_TIMEOUT", Field::IdleTimeout),
        ("_MAX_BODY", Field::MaxBody),
        ("_TIMEOUT", Field::Timeout),
        ("_ALLOW", Field::Allow),
        ("_URL", Field::Url),
    ]
    .into_iter()
    .find_map(|(suffix, f)| rest.strip_suffix(suffix).map(|n| (n, f)))?;
    (!name.is_empty()).then(|| (name.to_ascii_lowercase(), field))
}

/// `SERVICES` as entries: a JSON array, or `name=url` pairs separated by commas.
fn parse_services_setting(s: &str) -> Result<Vec<RawEntry>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    if s.starts_with('[') {
        return serde_json::from_str(s).map_err(|e| format!("SERVICES is not valid JSON: {e}"));
    }
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, url) = pair
                .split_once('=')
                .ok_or_else(|| format!("SERVICES entry {pair:?} is not `name=url`"))?;
            Ok(RawEntry {
                name: name.trim().to_owned(),
                url: Some(url.trim().to_owned()),
                ..RawEntry::default()
            })
        })
        .collect()
}

fn spec(e: RawEntry, defaults: Limits) -> Result<ServiceSpec, String> {
    let name = e.name;
    if !is_valid_name(&name) {
        return Err(format!(
            "service name {name:?} must be 1–{MAX_NAME_LEN} characters of [a-z0-9_-]"
        ));
    }
    if RESERVED.contains(&name.as_str()) {
        return Err(format!("service name {name:?} is reserved"));
    }
    let url = e
        .url
        .ok_or_else(|| format!("service {name:?} has settings but no URL"))?;
    let base = Url::parse(url.trim()).map_err(|err| format!("service {name:?}: {err}"))?;
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        return Err(format!("service {name:?}: the URL must be http(s)://host…"));
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err(format!(
            "service {name:?}: credentials do not belong in the URL"
        ));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(format!(
            "service {name:?}: the URL may not carry a query or fragment"
        ));
    }
    let duration = |v: Option<String>, d: Duration, what: &str| -> Result<Duration, String> {
        v.map_or(Ok(d), |s| {
            humantime::parse_duration(s.trim())
                .map_err(|err| format!("service {name:?} {what}: {err}"))
        })
    };
    let limits = Limits {
        timeout: duration(e.timeout, defaults.timeout, "timeout")?,
        idle_timeout: duration(e.idle_timeout, defaults.idle_timeout, "idle_timeout")?,
        max_body: e.max_body.unwrap_or(defaults.max_body),
    };
    let (allow, allow_all) = match e.allow {
        Some(rules) => (
            AllowList::parse_under(&rules, "")
                .map_err(|err| format!("service {name:?} allow-list: {err}"))?,
            false,
        ),
        None => (AllowList::everything(&EVERY_METHOD), true),
    };
    Ok(ServiceSpec {
        name,
        base,
        allow,
        allow_all,
        limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Limits = Limits {
        timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        max_body: 1024,
    };

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pairs_json_and_variables_merge_by_name() {
        let specs = parse(
            Some("orchestrator=http://orch:8080, runner=https://runner.internal/base/"),
            &vars(&[
                ("SERVICE_MY_SVC_URL", "http://127.0.0.1:9000"),
                ("SERVICE_MY_SVC_ALLOW", "GET /echo,post /ask"),
                ("SERVICE_MY_SVC_IDLE_TIMEOUT", "5s"),
                ("SERVICE_RUNNER_TIMEOUT", "2s"),
                ("SERVICE_ACCOUNT", "default"),
                ("PATH", "/bin"),
            ]),
            D,
        )
        .unwrap();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["my_svc", "orchestrator", "runner"]);
        let my = &specs[0];
        assert!(!my.allow_all);
        assert_eq!(my.limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(my.limits.timeout, D.timeout);
        assert_eq!(
            my.allow.verdict(&Method::POST, "/ask"),
            crate::proxy::Verdict::Allowed
        );
        assert!(specs[1].allow_all);
        assert_eq!(
            specs[1].allow.verdict(&Method::DELETE, "/anything/below"),
            crate::proxy::Verdict::Allowed
        );
        assert_eq!(specs[2].limits.timeout, Duration::from_secs(2));
        assert_eq!(specs[2].base.path(), "/base/");

        let json = parse(
            Some(r#"[{"name":"hitl","url":"http://h:1","allow":["GET /q"],"max_body":10}]"#),
            &[],
            D,
        )
        .unwrap();
        assert_eq!(json[0].limits.max_body, 10);
    }

    #[test]
    fn bad_entries_stop_start_up_with_a_message() {
        for (services, v, says) in [
            (Some("Bad=http://x"), vec![], "must be"),
            (Some("a=ftp://x"), vec![], "http(s)"),
            (Some("a=http://u:p@x"), vec![], "credentials"),
            (Some("a=http://x?q=1"), vec![], "query"),
            (Some("a=http://x,a=http://y"), vec![], "twice"),
            (Some("events=http://x"), vec![], "reserved"),
            (Some("noetl=http://x"), vec![], "reserved"),
            (Some("nourl"), vec![], "name=url"),
            (Some("[{"), vec![], "JSON"),
            (None, vars(&[("SERVICE_X_ALLOW", "GET /a")]), "no URL"),
            (
                None,
                vars(&[("SERVICE_X_URL", "http://x"), ("SERVICE_X_ALLOW", "/a")]),
                "METHOD",
            ),
            (
                Some("x=http://x"),
                vars(&[("SERVICE_X_URL", "http://y")]),
                "already",
            ),
            (
                None,
                vars(&[("SERVICE_X_URL", "http://x"), ("SERVICE_X_TIMEOUT", "soon")]),
                "timeout",
            ),
            (
                None,
                vars(&[("SERVICE_X_URL", "http://x"), ("SERVICE_X_MAX_BODY", "1k")]),
                "byte count",
            ),
            (
                Some(&*format!("{}=http://x", "a".repeat(33))),
                vec![],
                "must be",
            ),
        ] {
            let e = parse(services, &v, D).unwrap_err();
            assert!(e.contains(says), "{services:?} {v:?}: {e}");
        }
    }

    #[test]
    fn names_are_lowercase_tokens() {
        for ok in ["demo", "my_svc", "a-b", "x1"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Demo", "a.b", "a/b", "a b", "é"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
