//! Debian's nginx as a benchmark peer (`bench-services`' reverse proxy, `bench-peers`'
//! nginx + nchan): the binary `scripts/setup.sh` unpacked under `$GATEWAY_TOOLS/nginx`
//! (`NGINX_BIN` overrides it), run as a child from a scratch prefix with a config
//! rendered here around the caller's `http` block, on a free port it is checked to own.

use std::path::PathBuf;
use std::time::Duration;

use super::procfs::children_of;
use crate::harness::{
    free_port, listener_owned_by, scratch_dir, tools_dir, wait_until_ok, ChildGuard,
};

/// `$NGINX_BIN`, else the binary `scripts/setup.sh` unpacked.
pub fn nginx_bin() -> PathBuf {
    std::env::var_os("NGINX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("nginx/usr/sbin/nginx"))
}

/// `nginx -v` (it prints to stderr).
pub fn nginx_version() -> String {
    std::process::Command::new(nginx_bin())
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|e| format!("nginx -v failed: {e}"))
}

/// What a peer's config adds to the common one.
pub struct NginxConfig<'a> {
    /// A name for logs and errors (`nginx`, `nginx+nchan`).
    pub name: &'a str,
    /// Lines for the main context (`load_module …;`, `worker_rlimit_nofile …;`).
    pub main: String,
    /// `worker_processes`.
    pub workers: usize,
    /// `worker_connections`.
    pub connections: u64,
    /// The rest of the `http` block for a server that listens on the given port.
    pub http: &'a dyn Fn(u16) -> String,
    /// A path that answers 200 once the server is up.
    pub probe: &'a str,
}

/// A running nginx (master and workers).
pub struct Nginx {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `config` on a free port: access log off, keep-alive connections
    /// never closed for their request count, temp paths in the scratch prefix; three tries
    /// (a port can be taken between choosing and binding it).
    pub async fn start(config: NginxConfig<'_>) -> anyhow::Result<Self> {
        let bin = nginx_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run scripts/setup.sh (make bench does)",
            bin.display()
        );
        let name = config.name;
        let mut last = None;
        for _ in 0..3 {
            let dir = scratch_dir(&format!("gw-bench-{name}-"));
            let port = free_port();
            let d = dir.path().display().to_string();
            // As root the master would drop its workers to `nobody`, who cannot use the
            // scratch directory; run them as whoever runs the bench.
            // SAFETY: geteuid has no preconditions and cannot fail.
            let user = if unsafe { libc::geteuid() } == 0 {
                "user root;\n"
            } else {
                ""
            };
            let conf = format!(
                "{main}{user}daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}
}}
",
                main = config.main,
                workers = config.workers,
                connections = config.connections,
                http = (config.http)(port),
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf)?;
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf_path);
            let mut guard = ChildGuard::spawn(name, cmd, dir.path().join("nginx.out"))?;
            let url = format!("http://127.0.0.1:{port}");
            let up =
                wait_until_ok(&format!("{url}{}", config.probe), Duration::from_secs(10)).await;
            let mut pids = vec![guard.pid()];
            pids.extend(children_of(guard.pid()));
            if up.is_ok() && listener_owned_by(port, &pids) {
                return Ok(Self {
                    url,
                    port,
                    guard,
                    _dir: dir,
                });
            }
            let err = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            last = Some(anyhow::anyhow!(
                "{name} did not start on its own port: {up:?}\n{}{err}",
                guard.log_text()
            ));
            guard.stop(Duration::from_secs(2));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} did not start")))
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.guard.pid()];
        pids.extend(children_of(self.guard.pid()));
        pids
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub fn stop(mut self) {
        self.guard.stop(Duration::from_secs(3));
    }
}
