//! Floors for per-connection memory: trivial SSE servers run as child processes of the
//! benchmark, measured in the same run as the origin.
//!
//! - [`PeerKind::Axum`] (`bench-realtime --peer-sse ADDR`): axum answers every
//!   `GET /events` with the shape of stream the origin sends — an init frame with a fresh
//!   client id, then a `:` keep-alive every 15 s — and does nothing else: no auth, no bus
//!   subscription, no pump task, no queue. Same axum, hyper and tokio as the origin and the
//!   same runtime shape, so "origin minus this" is what the origin's own state costs.
//! - [`PeerKind::Raw`] (`bench-realtime --peer-raw ADDR`): the same bytes written by one
//!   tokio task per socket with no HTTP library, so "axum minus this" is what hyper's
//!   per-connection buffers cost.
//!
//! A peer exits when its stdin closes, so it never outlives the benchmark that spawned it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::Deadline;

/// The keep-alive comment interval, the origin's default.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Which floor server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// axum + hyper, one streaming body per connection.
    Axum,
    /// A tokio task per socket writing the bytes by hand.
    Raw,
}

impl PeerKind {
    fn flag(self) -> &'static str {
        match self {
            Self::Axum => "--peer-sse",
            Self::Raw => "--peer-raw",
        }
    }
}

fn init_frame() -> String {
    let id = uuid::Uuid::new_v4();
    format!(
        "retry: 2000\nevent: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{{\"clientId\":\"{id}\"}}}}\n\n"
    )
}

async fn events() -> Response {
    let init = init_frame();
    let keepalive = futures::stream::unfold((), |()| async {
        tokio::time::sleep(KEEPALIVE).await;
        Some((Ok::<_, Infallible>(Bytes::from_static(b":\n\n")), ()))
    });
    let body = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(init)) })
        .chain(keepalive);
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// The child's side: serves until killed.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/events", get(events))
        .route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Resolves when stdin closes: the parent that spawned this peer (with a pipe) is gone.
pub async fn parent_gone() {
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while let Ok(n) = stdin.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// The raw floor's side: a task per socket, serves until killed.
pub async fn serve_raw(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(raw_connection(sock));
            }
            // Out of file descriptors or similar: let the holders see failures, keep going.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads the request head (at most 1 KiB; anything else is dropped), answers with a chunked
/// `text/event-stream` holding the init frame, then idles with keep-alives.
async fn raw_connection(mut sock: TcpStream) {
    if !read_head(&mut sock).await {
        return;
    }
    let body = init_frame();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
        body.len()
    );
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    drop((head, body));
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.tick().await;
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            r = sock.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { return },
            _ = tick.tick() => if sock.write_all(b"3\r\n:\n\n\r\n").await.is_err() { return },
        }
    }
}

async fn read_head(sock: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
    }
    false
}

/// The parent's handle on a running peer server; killed on drop.
pub struct PeerServer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
}

impl PeerServer {
    /// Spawns `exe --peer-sse|--peer-raw <addr>` on a free port and waits until it accepts.
    pub async fn start(exe: &Path, kind: PeerKind, deadline: Deadline) -> anyhow::Result<Self> {
        let port = crate::harness::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(exe)
            .arg(kind.flag())
            .arg(addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawn the peer SSE server")?;
        let pid = child.id().context("a just-spawned child has a pid")?;
        let ready = Deadline::after(deadline.within(Duration::from_secs(10)));
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(!ready.passed(), "the peer SSE server never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, addr, pid })
    }

    /// Kills the server and waits (bounded) for it to be reaped.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}
