//! nginx + nchan, the realtime peer: Debian's nginx with Debian's `libnginx-mod-nchan`
//! (both unpacked by `scripts/setup.sh` under `$GATEWAY_TOOLS/nginx`), loaded with
//! `load_module`, run as a child from a scratch prefix with a config rendered here.
//!
//! `GET /sub/<channel>` is an EventSource subscriber (`nchan_subscriber eventsource`), `POST
//! /pub/<channel>` the HTTP publisher; one channel per client for private delivery, one
//! shared channel for broadcast. Access log off, `worker_processes` = `--nchan-workers`.

use std::path::PathBuf;
use std::time::Duration;

use gateway_tests::bench::procfs::children_of;
use gateway_tests::harness::{
    free_port, listener_owned_by, scratch_dir, tools_dir, wait_until_ok, ChildGuard,
};

/// A running nginx + nchan.
pub(crate) struct Nchan {
    /// `http://127.0.0.1:<port>`.
    pub(crate) url: String,
    /// The listener.
    pub(crate) addr: std::net::SocketAddr,
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

/// `$NGINX_BIN`, else the binary `scripts/setup.sh` unpacked.
fn nginx_bin() -> PathBuf {
    std::env::var_os("NGINX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("nginx/usr/sbin/nginx"))
}

/// The nchan module next to that nginx (`usr/sbin/nginx` → `usr/lib/nginx/modules/`).
pub(crate) fn nchan_module() -> PathBuf {
    let bin = nginx_bin();
    bin.parent()
        .and_then(|sbin| sbin.parent())
        .map(|usr| usr.join("lib/nginx/modules/ngx_nchan_module.so"))
        .unwrap_or_else(|| tools_dir().join("nginx/usr/lib/nginx/modules/ngx_nchan_module.so"))
}

/// `nginx -v` (it prints to stderr).
pub(crate) fn nginx_version() -> String {
    std::process::Command::new(nginx_bin())
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|e| format!("nginx -v failed: {e}"))
}

impl Nchan {
    /// Starts nginx + nchan with `workers` worker processes on a free port.
    pub(crate) async fn start(workers: usize, nofile: u64) -> anyhow::Result<Self> {
        let (bin, module) = (nginx_bin(), nchan_module());
        for p in [&bin, &module] {
            anyhow::ensure!(
                p.exists(),
                "{} is missing: run scripts/setup.sh (make bench does)",
                p.display()
            );
        }
        let mut last = None;
        for _ in 0..3 {
            let dir = scratch_dir("gw-bench-nchan-");
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
                "load_module {module};
{user}daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /health {{ return 200 'ok'; }}
        location ~ ^/sub/(\\w+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
        }}
        location ~ ^/pub/(\\w+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
        }}
    }}
}}
",
                module = module.display()
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
            let mut guard = ChildGuard::spawn("nginx+nchan", cmd, dir.path().join("nginx.out"))?;
            let url = format!("http://127.0.0.1:{port}");
            let up = wait_until_ok(&format!("{url}/health"), Duration::from_secs(10)).await;
            let mut pids = vec![guard.pid()];
            pids.extend(children_of(guard.pid()));
            if up.is_ok() && listener_owned_by(port, &pids) {
                return Ok(Self {
                    addr: format!("127.0.0.1:{port}").parse()?,
                    url,
                    guard,
                    _dir: dir,
                });
            }
            let err = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            last = Some(anyhow::anyhow!(
                "nginx + nchan did not start on its own port: {up:?}\n{}{err}",
                guard.log_text()
            ));
            guard.stop(Duration::from_secs(2));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nginx + nchan did not start")))
    }

    /// The master and its workers (whose memory is summed).
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.guard.pid()];
        pids.extend(children_of(self.guard.pid()));
        pids
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub(crate) fn stop(mut self) {
        self.guard.stop(Duration::from_secs(3));
    }
}
