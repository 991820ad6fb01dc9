//! A real `nats-server` with JetStream on, on its own port and store directory; stopped
//! and started again on the same port and store for outage tests.

use super::{free_port, tools_dir, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running nats-server; killed on drop.
pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    /// The client port.
    pub port: u16,
    guard: ChildGuard,
    dir: tempfile::TempDir,
}

/// The nats-server binary: `$NATS_SERVER_BIN`, else the one `scripts/setup.sh` installed.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("venv/bin/nats-server"))
}

/// Spawns nats-server on `port` with its store under `dir` and waits until that very
/// process listens there. `Err` carries the log: the port may be another process's.
async fn spawn_on(dir: &Path, port: u16) -> anyhow::Result<ChildGuard> {
    let bin = nats_server_bin();
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run scripts/setup.sh (make test does)",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("js"));
    // A configuration written by `start_with_max_payload` (flags above take precedence).
    let conf = dir.join("nats.conf");
    if conf.exists() {
        cmd.arg("-c").arg(conf);
    }
    let mut guard = ChildGuard::spawn("nats-server", cmd, dir.join("nats.log"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A connection that succeeds may be answered by another process holding the port;
        // only a listener owned by our (live) child counts.
        let answers = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok();
        if answers && super::listener_owned_by(port, &[guard.pid()]) {
            return Ok(guard);
        }
        if !guard.is_running() || Instant::now() >= deadline {
            let log = guard.log_text();
            guard.stop(Duration::from_secs(2));
            anyhow::bail!("nats-server did not listen on {port} itself:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections on a port it owns; if
    /// another process took the port first, tries again on a fresh one (3 attempts).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_in(super::scratch_dir("gw-nats-")).await
    }

    /// [`Self::start`] with the server's `max_payload` (bytes) set, as an operator would in
    /// its configuration file (kept by [`Self::start_again`]).
    pub async fn start_with_max_payload(bytes: usize) -> anyhow::Result<Self> {
        let dir = super::scratch_dir("gw-nats-");
        std::fs::write(
            dir.path().join("nats.conf"),
            format!("max_payload: {bytes}\n"),
        )?;
        Self::start_in(dir).await
    }

    async fn start_in(dir: tempfile::TempDir) -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            match spawn_on(dir.path(), port).await {
                Ok(guard) => {
                    return Ok(Self {
                        url: format!("nats://127.0.0.1:{port}"),
                        port,
                        guard,
                        dir,
                    })
                }
                Err(e) if attempt >= 3 => return Err(e),
                Err(_) => {}
            }
        }
    }

    /// Stops the server (SIGTERM, SIGKILL after 3 s): an outage. Clients see their
    /// connection drop; the store directory and the port are kept for [`Self::start_again`].
    pub fn stop(&mut self) {
        self.guard.stop(Duration::from_secs(3));
    }

    /// Starts the server again on the same port with the same JetStream store (streams,
    /// K/V buckets and their contents survive), and waits until it owns the port. Fails if
    /// another process took the port meanwhile.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.guard.is_running() {
            self.stop();
        }
        // A port just released can be briefly unavailable; retry until the deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match spawn_on(self.dir.path(), self.port).await {
                Ok(guard) => {
                    self.guard = guard;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The process guard (to stop or signal the server in failure tests).
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}
