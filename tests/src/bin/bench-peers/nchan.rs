//! nginx + nchan, the realtime peer: Debian's nginx with Debian's `libnginx-mod-nchan`
//! (both unpacked by `scripts/setup.sh` under `$GATEWAY_TOOLS/nginx`), loaded with
//! `load_module`, run as a child from a scratch prefix with a config rendered here.
//!
//! `GET /sub/<channel>` is an EventSource subscriber (`nchan_subscriber eventsource`), `POST
//! /pub/<channel>` the HTTP publisher; one channel per client for private delivery, one
//! shared channel for broadcast. Access log off, `worker_processes` = `--nchan-workers`.

use std::path::PathBuf;

use gateway_tests::bench::nginx::{nginx_bin, Nginx, NginxConfig};
use gateway_tests::harness::tools_dir;

pub(crate) use gateway_tests::bench::nginx::nginx_version;

/// A running nginx + nchan.
pub(crate) struct Nchan {
    /// `http://127.0.0.1:<port>`.
    pub(crate) url: String,
    /// The listener.
    pub(crate) addr: std::net::SocketAddr,
    nginx: Nginx,
}

/// The nchan module next to that nginx (`usr/sbin/nginx` → `usr/lib/nginx/modules/`).
pub(crate) fn nchan_module() -> PathBuf {
    let bin = nginx_bin();
    bin.parent()
        .and_then(|sbin| sbin.parent())
        .map(|usr| usr.join("lib/nginx/modules/ngx_nchan_module.so"))
        .unwrap_or_else(|| tools_dir().join("nginx/usr/lib/nginx/modules/ngx_nchan_module.so"))
}

impl Nchan {
    /// Starts nginx + nchan with `workers` worker processes on a free port.
    pub(crate) async fn start(workers: usize, nofile: u64) -> anyhow::Result<Self> {
        let module = nchan_module();
        anyhow::ensure!(
            module.exists(),
            "{} is missing: run scripts/setup.sh (make bench does)",
            module.display()
        );
        let http = |port: u16| {
            format!(
                "    server {{
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
    }}"
            )
        };
        let nginx = Nginx::start(NginxConfig {
            name: "nginx+nchan",
            main: format!(
                "load_module {};\nworker_rlimit_nofile {nofile};\n",
                module.display()
            ),
            workers,
            connections: nofile,
            http: &http,
            probe: "/health",
        })
        .await?;
        Ok(Self {
            url: nginx.url.clone(),
            addr: format!("127.0.0.1:{}", nginx.port).parse()?,
            nginx,
        })
    }

    /// The master and its workers (whose memory is summed).
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.nginx.pids()
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub(crate) fn stop(self) {
        self.nginx.stop();
    }
}
