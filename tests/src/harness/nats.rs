//! A real `nats-server` with JetStream on, on its own port and store directory.

use super::{free_port, tools_dir, ChildGuard};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A running nats-server; killed on drop.
pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    /// The client port.
    pub port: u16,
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

/// The nats-server binary: `$NATS_SERVER_BIN`, else the one `scripts/setup.sh` installed.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("venv/bin/nats-server"))
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = super::scratch_dir("gw-nats-");
        let port = free_port();
        let bin = nats_server_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run scripts/setup.sh (make test does)",
            bin.display()
        );
        let mut cmd = Command::new(&bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path().join("js"));
        let guard = ChildGuard::spawn("nats-server", cmd, dir.path().join("nats.log"))?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not listen on {port}: {}",
                guard.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            url,
            port,
            guard,
            _dir: dir,
        })
    }

    /// The process guard (to stop or signal the server in failure tests).
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}
