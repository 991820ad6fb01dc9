//! Plain `workerd serve` for benchmarks (`bench-edge`): the runtime itself, configured by a
//! capnp file, without `wrangler dev` in front (a development server that tops out near
//! 600 req/s here whatever the worker does).
//!
//! [`render`] fills a configuration template's `@@NAME@@` placeholders; [`Workerd::start`]
//! runs one named configuration of a file as its own process (so its CPU time belongs to
//! that configuration alone) and waits until it answers. The binary is the one wrangler
//! bundles (`node_modules/.bin/workerd`, from `@cloudflare/workerd-linux-64`).

use crate::harness::{listener_owned_by, wait_until_ok, workspace_root, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The workerd binary `make setup` installs with wrangler.
pub fn workerd_bin() -> PathBuf {
    workspace_root().join("node_modules/.bin/workerd")
}

/// `workerd --version`, e.g. `workerd 2026-11-17`; `None` if it cannot be run.
pub fn version() -> Option<String> {
    let out = Command::new(workerd_bin()).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Replaces every `@@NAME@@` in `template` by its value. Values go inside capnp string
/// literals, so quotes, backslashes and line breaks are refused; a placeholder left
/// unfilled is an error too.
pub fn render(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_owned();
    for (name, value) in values {
        anyhow::ensure!(
            !value.contains(['"', '\\', '\n', '\r']),
            "{name} holds a character a capnp string literal cannot take as is"
        );
        out = out.replace(&format!("@@{name}@@"), value);
    }
    if let Some(at) = out.find("@@") {
        let rest = &out[at..];
        let end = rest[2..].find("@@").map_or(rest.len(), |e| e + 4);
        anyhow::bail!("placeholder {} was not filled", &rest[..end]);
    }
    Ok(out)
}

/// One `workerd serve CONFIG NAME` process; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Workerd {
    /// Base URL of its HTTP socket, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The configuration's name (the capnp constant).
    pub name: String,
    guard: ChildGuard,
}

impl Workerd {
    /// Starts the configuration `name` of `config` (which listens on `port`) with its log in
    /// `log`, and waits until `ready_path` answers 2xx. Fails if the process exits, the
    /// socket never answers, or the listener on `port` is not this process's (another
    /// process took the port first: the caller picks fresh ports and tries again).
    pub async fn start(
        config: &Path,
        name: &str,
        port: u16,
        ready_path: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let bin = workerd_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run `make setup` (it installs wrangler and its workerd)",
            bin.display()
        );
        let mut cmd = Command::new(&bin);
        cmd.arg("serve").arg(config).arg(name).env_clear();
        for keep in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        if let Some(dir) = config.parent() {
            cmd.current_dir(dir);
        }
        let mut guard = ChildGuard::spawn(&format!("workerd {name}"), cmd, log)?;
        let url = format!("http://127.0.0.1:{port}");
        let up = wait_until_ok(&format!("{url}{ready_path}"), Duration::from_secs(30)).await;
        if let Err(e) = up {
            let running = guard.is_running();
            let log = guard.log_text();
            guard.stop(Duration::from_secs(2));
            anyhow::bail!(
                "workerd {name} {}: {e}\n{log}",
                if running { "did not answer" } else { "exited" }
            );
        }
        if !listener_owned_by(port, &[guard.pid()]) {
            guard.stop(Duration::from_secs(2));
            anyhow::bail!(
                "port {port} was taken by another process before workerd {name} bound it"
            );
        }
        Ok(Self {
            url,
            name: name.to_owned(),
            guard,
        })
    }

    /// The process id (its CPU time is in `/proc/<pid>/stat`).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The process's output so far (worker `console.*` lines, errors).
    pub fn log_text(&self) -> String {
        self.guard.log_text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_leftovers_or_quotes_refused() {
        let t = "a = \"@@A@@\", b = \"@@B@@\"";
        let ok = render(t, &[("A", "1".into()), ("B", "x:y".into())]).unwrap();
        assert_eq!(ok, "a = \"1\", b = \"x:y\"");
        let left = render(t, &[("A", "1".into())]).unwrap_err().to_string();
        assert!(left.contains("@@B@@"), "{left}");
        assert!(render(t, &[("A", "\"".into()), ("B", String::new())]).is_err());
    }
}
