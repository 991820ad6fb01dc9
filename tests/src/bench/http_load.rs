//! A closed-loop HTTP/1.1 load generator (`bench-edge`): N keep-alive connections, each
//! sending the same request again as soon as the previous answer's body has been read.
//!
//! Connections are opened by [`connect`] before a window starts, so a measured window holds
//! requests only. Each response's status is checked and its body read to the end; the
//! latency (request written → body read) is kept per request in microseconds. It runs on
//! whatever tokio runtime calls it (the benchmark uses a single-threaded one, so the load
//! generator takes at most one core of the machine it shares with the servers).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The one request a window sends, again and again.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Method.
    pub method: hyper::Method,
    /// Path and query.
    pub path: String,
    /// Headers (`host` and `content-length` are added).
    pub headers: Vec<(String, String)>,
    /// Body (empty: none).
    pub body: Bytes,
    /// The status every answer must have.
    pub expect_status: u16,
}

impl Target {
    /// A target from a base URL (`http://127.0.0.1:port`), without headers or body.
    pub fn new(base_url: &str, method: hyper::Method, path: &str) -> anyhow::Result<Self> {
        let authority = base_url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("{base_url} is not an http:// URL"))?
            .trim_end_matches('/');
        Ok(Self {
            addr: authority.parse()?,
            method,
            path: path.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            expect_status: 200,
        })
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    fn request(&self) -> hyper::Request<Full<Bytes>> {
        let mut b = hyper::Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header("host", self.addr.to_string());
        for (n, v) in &self.headers {
            b = b.header(n.as_str(), v.as_str());
        }
        if !self.body.is_empty() {
            b = b.header("content-length", self.body.len());
        }
        b.body(Full::new(self.body.clone()))
            .expect("a benchmark request is well formed")
    }
}

/// Open keep-alive connections, ready for a window.
pub struct Connections {
    target: Arc<Target>,
    senders: Vec<SendRequest<Full<Bytes>>>,
}

/// Opens `n` HTTP/1.1 connections to `target` (`TCP_NODELAY`, like any HTTP client).
pub async fn connect(target: Arc<Target>, n: usize) -> anyhow::Result<Connections> {
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tokio::net::TcpStream::connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        senders.push(sender);
    }
    Ok(Connections { target, senders })
}

/// What one window did.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Requests answered with the expected status (body read).
    pub ok: u64,
    /// Requests that failed or had another status.
    pub errors: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// From the start of the window until the last connection's last answer.
    pub elapsed: Duration,
    /// Latency of every `ok` request, microseconds.
    pub latencies_us: Vec<u32>,
}

impl Window {
    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Connections {
    /// Sends on every connection, closed-loop, until `duration` has passed (requests in
    /// flight then are awaited and counted). A connection that fails stops.
    pub async fn run(self, duration: Duration) -> Window {
        let started = Instant::now();
        let end = started + duration;
        let mut tasks = Vec::with_capacity(self.senders.len());
        for mut sender in self.senders {
            let target = self.target.clone();
            tasks.push(tokio::spawn(async move {
                let mut w = Window {
                    latencies_us: Vec::with_capacity(16 * 1024),
                    ..Window::default()
                };
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let outcome = async {
                        sender.ready().await?;
                        let resp = sender.send_request(target.request()).await?;
                        let status = resp.status().as_u16();
                        let body = resp.into_body().collect().await?.to_bytes();
                        anyhow::Ok((status, body))
                    }
                    .await;
                    match outcome {
                        Ok((status, _)) if status == target.expect_status => {
                            w.ok += 1;
                            let us = t0.elapsed().as_micros();
                            w.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                        Ok((status, body)) => {
                            w.errors += 1;
                            w.first_error.get_or_insert_with(|| {
                                format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
                            });
                        }
                        Err(e) => {
                            w.errors += 1;
                            w.first_error.get_or_insert_with(|| e.to_string());
                            break;
                        }
                    }
                }
                w
            }));
        }
        let mut total = Window::default();
        for t in tasks {
            match t.await {
                Ok(w) => {
                    total.ok += w.ok;
                    total.errors += w.errors;
                    if total.first_error.is_none() {
                        total.first_error = w.first_error;
                    }
                    total.latencies_us.extend(w.latencies_us);
                }
                Err(e) => {
                    total.errors += 1;
                    total.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        total.elapsed = started.elapsed();
        total
    }
}
