//! Serving a listener: hyper for every request, except that a connection whose first
//! request is `GET /events` is answered by a lean HTTP/1.1 writer of our own.
//!
//! Why: an SSE stream is a connection that is idle almost all the time, and there may be
//! 20k of them per process. hyper keeps an 8 KiB read buffer and an 8 KiB header buffer
//! for every HTTP/1 connection for as long as it lives (measured: a trivial axum SSE
//! server holds ~20 KiB per idle stream), which would be most of an idle stream's cost.
//! The lean path reads the request head into a short-lived buffer, runs the request
//! through the very same axum router (every middleware, extractor and error body is the
//! same), then writes the response itself: the head once, the body as chunks straight
//! from the body's `Bytes`, and between frames it holds no buffer at all.
//!
//! Decisions:
//! - **Only a connection's first request**, only `GET /events` over HTTP/1.1 with no body
//!   and no `Upgrade`, and only when nothing follows the head (no pipelining). Anything
//!   else — including a head that does not parse, HTTP/1.0 and the HTTP/2 preface — is
//!   handed to hyper with the bytes already read put back in front of the socket, so
//!   hyper sees exactly what the client sent and answers as it always did.
//! - **The connection closes when the response ends.** An SSE stream ends only when the
//!   server stops it (eviction, shutdown, a newer connection); an error response (401,
//!   403, 400) is followed by `connection: close`. EventSource reconnects on a new
//!   connection either way.
//! - **Limits**: the head must arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`]
//!   bytes (otherwise hyper gets the bytes and answers with its own limits); a chunk that
//!   the client does not take within [`WRITE_STALL`] closes the connection, so a peer that
//!   stops reading cannot pin a stream forever.
//! - **A client that goes away** is noticed by reading: the socket is watched for
//!   readability between frames; end of file (or an error) drops the body at once, which
//!   unregisters the stream. Bytes a client sends after the head are read and discarded.
//! - **Shutdown**: no new connections; hyper connections shut down gracefully; SSE bodies
//!   end on the same cancellation token (see `events`), and their connections close.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The longest request head the lean path reads; longer ones go to hyper.
pub const MAX_HEAD: usize = 16 * 1024;

/// How long a client may take to send its first request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one chunk may wait for the client to take it before the connection closes.
pub const WRITE_STALL: Duration = Duration::from_secs(60);

/// Which requests take the lean path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeanPath {
    /// `GET /events` as described in the module docs.
    Events,
    /// Never: every connection is hyper's (the internal listener).
    Off,
}

/// Accepts connections until `shutdown`, serving each with `app`; then waits for open
/// connections to finish (the caller bounds that with its grace period).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    lean: LeanPath,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(
            stream,
            peer,
            app.clone(),
            lean,
            shutdown.clone(),
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Serves one connection: the lean path when its first request qualifies, hyper otherwise.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    lean: LeanPath,
    shutdown: CancellationToken,
) {
    let mut prefix = Bytes::new();
    if lean == LeanPath::Events {
        // Boxed: the head buffer lives only until the request is built.
        match Box::pin(read_head(&mut stream, &shutdown)).await {
            Head::Lean(req) => {
                serve_lean(stream, peer, app, *req).await;
                return;
            }
            Head::Other(bytes) => prefix = bytes,
            Head::Gone => return,
        }
    }
    // Boxed: hyper's connection future is large, and the task's size is the largest of
    // its states for as long as it lives — a lean stream must not pay for it.
    Box::pin(serve_hyper(stream, prefix, peer, app, shutdown)).await;
}

/// What the first bytes of a connection turned out to be.
enum Head {
    /// A request for the lean path.
    Lean(Box<Request<Body>>),
    /// Anything else: the bytes read so far, for hyper.
    Other(Bytes),
    /// Closed, timed out or shut down before a head arrived.
    Gone,
}

async fn read_head(stream: &mut TcpStream, shutdown: &CancellationToken) -> Head {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()).max(1024));
        }
        let read = tokio::select! {
            () = shutdown.cancelled() => return Head::Gone,
            () = tokio::time::sleep_until(deadline) => return Head::Gone,
            r = tokio::io::AsyncReadExt::read_buf(stream, &mut buf) => r,
        };
        match read {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(_) => {}
        }
        match parse_lean(&buf) {
            Parsed::Lean(req) => return Head::Lean(req),
            Parsed::NotLean => return Head::Other(Bytes::from(buf)),
            Parsed::Partial if buf.len() >= MAX_HEAD => return Head::Other(Bytes::from(buf)),
            Parsed::Partial => {}
        }
    }
}

enum Parsed {
    Lean(Box<Request<Body>>),
    NotLean,
    Partial,
}

/// Decides from the bytes read so far whether the request takes the lean path, and builds
/// it if so.
fn parse_lean(buf: &[u8]) -> Parsed {
    // Cheap prefix check first: most connections are not SSE.
    let probe = b"GET /events";
    if buf.len() < probe.len() {
        return if probe.starts_with(buf) {
            Parsed::Partial
        } else {
            Parsed::NotLean
        };
    }
    if !buf.starts_with(probe) || !matches!(buf[probe.len()], b' ' | b'?') {
        return Parsed::NotLean;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotLean,
    };
    if len != buf.len() || parsed.version != Some(1) {
        return Parsed::NotLean;
    }
    let Some(path) = parsed.path else {
        return Parsed::NotLean;
    };
    let mut req = Request::new(Body::empty());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    let Ok(uri) = path.parse() else {
        return Parsed::NotLean;
    };
    *req.uri_mut() = uri;
    for h in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::NotLean;
        };
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0"
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Parsed::NotLean;
        }
        req.headers_mut().append(name, value);
    }
    Parsed::Lean(Box::new(req))
}

/// Runs the request through the router and writes the response as HTTP/1.1.
async fn serve_lean(mut stream: TcpStream, peer: SocketAddr, app: Router, req: Request<Body>) {
    // Boxed: answering and writing the head is a large state the stream must not keep.
    if let Some(body) = Box::pin(respond(&mut stream, peer, app, req)).await {
        stream_chunks(stream, body).await;
    }
}

/// Gets the response and writes its head; a finite response is written whole and the
/// connection shut down (`None`), a streaming one is returned for [`stream_chunks`].
async fn respond(
    stream: &mut TcpStream,
    peer: SocketAddr,
    app: Router,
    mut req: Request<Body>,
) -> Option<Body> {
    req.extensions_mut().insert(ConnectInfo(peer));
    let resp = match app.oneshot(req).await {
        Ok(resp) => resp,
        Err(e) => match e {},
    };
    let (parts, body) = resp.into_parts();
    let exact = http_body::Body::size_hint(&body).exact();
    let head = encode_head(&parts, exact);
    // The response's header map is a few hundred bytes of heap: not kept for the stream.
    drop(parts);
    write_stalling(stream, &[IoSlice::new(&head)]).await.ok()?;
    let Some(len) = exact else {
        return Some(body);
    };
    // A finite response (an error body): written whole, then the connection closes.
    if len > 0 {
        if let Ok(bytes) = body.collect().await.map(|c| c.to_bytes()) {
            let _ = write_stalling(stream, &[IoSlice::new(&bytes)]).await;
        }
    }
    let _ = stream.shutdown().await;
    None
}

/// Writes a streaming body as chunks until it ends, the client goes away or stalls.
async fn stream_chunks(mut stream: TcpStream, mut body: Body) {
    loop {
        // Hand-polled rather than `select!` over `readable()`: no readiness future (and
        // its intrusive waiter) lives in the task while the stream idles.
        let next = std::future::poll_fn(|cx| next_event(&stream, &mut body, cx)).await;
        match next {
            Next::Data(data) => {
                let size = format!("{:x}\r\n", data.len());
                let parts = [
                    IoSlice::new(size.as_bytes()),
                    IoSlice::new(&data),
                    IoSlice::new(b"\r\n"),
                ];
                if Box::pin(write_stalling(&mut stream, &parts)).await.is_err() {
                    return;
                }
            }
            Next::End => {
                let _ = Box::pin(write_stalling(&mut stream, &[IoSlice::new(b"0\r\n\r\n")])).await;
                let _ = stream.shutdown().await;
                return;
            }
            Next::Gone => return,
        }
    }
}

/// What happened next on a streaming connection.
enum Next {
    Data(Bytes),
    /// The body ended: write the last chunk.
    End,
    /// The client went away, or the body failed: close.
    Gone,
}

fn next_event(stream: &TcpStream, body: &mut Body, cx: &mut Context<'_>) -> Poll<Next> {
    loop {
        match http_body::Body::poll_frame(Pin::new(&mut *body), cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => return Poll::Ready(Next::Data(data)),
                _ => continue, // empty data or trailers: SSE has neither
            },
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body failed; closing");
                return Poll::Ready(Next::Gone);
            }
            Poll::Ready(None) => return Poll::Ready(Next::End),
            Poll::Pending => break,
        }
    }
    // Bytes a client sends after the head are read and dropped; end of file or an error
    // means it went away.
    let mut probe = [0u8; 64];
    loop {
        match stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => match stream.try_read(&mut probe) {
                Ok(0) => return Poll::Ready(Next::Gone),
                Ok(_) => continue,
                // Readiness is cleared: the next poll registers for the next bytes.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Poll::Ready(Next::Gone),
            },
            Poll::Ready(Err(_)) => return Poll::Ready(Next::Gone),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// The status line and headers, with the framing this writer uses.
fn encode_head(parts: &http::response::Parts, exact: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match exact {
        Some(len) => out.extend_from_slice(
            format!("content-length: {len}\r\nconnection: close\r\n").as_bytes(),
        ),
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes every byte of `parts`, failing if the client takes longer than [`WRITE_STALL`].
async fn write_stalling(stream: &mut TcpStream, parts: &[IoSlice<'_>]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let write = async {
        let mut written = 0;
        while written < total {
            // Rebuild the slices past what was written (rare: only on a partial write).
            let mut skip = written;
            let mut rest: Vec<IoSlice<'_>> = Vec::new();
            let slices: &[IoSlice<'_>] = if skip == 0 {
                parts
            } else {
                for p in parts {
                    if skip >= p.len() {
                        skip -= p.len();
                    } else {
                        rest.push(IoSlice::new(&p[skip..]));
                        skip = 0;
                    }
                }
                &rest
            };
            let n = stream.write_vectored(slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            written += n;
        }
        Ok(())
    };
    tokio::time::timeout(WRITE_STALL, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// hyper for everything else, with the bytes already read put back first.
async fn serve_hyper(
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) {
    let service = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.map(Body::new)
    });
    let io = TokioIo::new(Rewind {
        prefix,
        inner: stream,
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            return;
        }
        () = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// A socket with some bytes already read from it put back in front.
struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn lean(buf: &str) -> Option<Request<Body>> {
        match parse_lean(buf.as_bytes()) {
            Parsed::Lean(r) => Some(*r),
            _ => None,
        }
    }

    #[test]
    fn only_a_complete_bodiless_http11_get_of_events_is_lean() {
        let r = lean("GET /events?client_id=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n")
            .expect("lean");
        assert_eq!(r.uri().query(), Some("client_id=a"));
        assert_eq!(r.headers()["last-event-id"], "7");
        assert!(lean("GET /events HTTP/1.1\r\nHost: x\r\n\r\n").is_some());
        for other in [
            "GET /eventsx HTTP/1.1\r\n\r\n",
            "GET /events HTTP/1.0\r\n\r\n",
            "POST /events HTTP/1.1\r\n\r\n",
            "GET /health HTTP/1.1\r\n\r\n",
            "GET /events HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /events HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /events HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse_lean(other.as_bytes()), Parsed::NotLean),
                "{other:?}"
            );
        }
        for partial in ["GE", "GET /ev", "GET /events HTTP/1.1\r\nHost: x\r\n"] {
            assert!(
                matches!(parse_lean(partial.as_bytes()), Parsed::Partial),
                "{partial:?}"
            );
        }
    }

    #[test]
    fn the_head_frames_streams_as_chunked_and_finite_bodies_with_a_length() {
        let resp = Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .header("content-length", "99")
            .body(())
            .unwrap();
        let (parts, ()) = resp.into_parts();
        let head = String::from_utf8(encode_head(&parts, None)).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let head = String::from_utf8(encode_head(&parts, Some(12))).unwrap();
        assert!(
            head.ends_with("content-length: 12\r\nconnection: close\r\n\r\n"),
            "{head}"
        );
        assert!(!head.contains("99"));
    }

    #[tokio::test]
    async fn a_connection_task_stays_small_while_it_streams() {
        // The task's allocation is the size of its largest state for as long as it lives;
        // the big futures (head reading, the router call, hyper) are boxed so an idle SSE
        // stream does not carry them.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let fut = connection(
            stream,
            peer,
            Router::new(),
            LeanPath::Events,
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1024, "connection future is {size} bytes");
    }
}
