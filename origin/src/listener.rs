//! Serving a listener: hyper for every request, except that a connection whose first
//! request is `GET /events` is answered by a lean HTTP/1.1 writer of our own.
//!
//! Why: an SSE stream is a connection that is idle almost all the time, and there may be
//! 20k of them per process. hyper keeps an 8 KiB read buffer and an 8 KiB header buffer
//! for every HTTP/1 connection for as long as it lives (measured: a trivial axum SSE
//! server holds ~20 KiB per idle stream), which would be most of an idle stream's cost.
//! The lean path reads the request head into a short-lived buffer, runs the request
//! through the very same axum router (every middleware, extractor and error body is the
//! same), then writes the response itself: the head once (in the same write as the
//! frames the body has ready by then, so an SSE open is one segment), the body as chunks
//! straight from the body's `Bytes`, and between frames it holds no buffer at all.
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
//! - **Limits** (lean path): the head must arrive within the listener's header timeout
//!   and fit in [`MAX_HEAD`] bytes (otherwise hyper gets the bytes and answers with its own
//!   limits); a chunk that the client does not take within [`WRITE_STALL`] closes the
//!   connection, so a peer that stops reading cannot pin a stream forever.
//! - **A client that goes away** is noticed by reading: the socket is watched for
//!   readability between frames; end of file (or an error) drops the body at once, which
//!   unregisters the stream. Bytes a client sends after the head are read and discarded.
//! - **Shutdown**: no new connections; hyper connections shut down gracefully; SSE bodies
//!   end on the same cancellation token (see `events`), and their connections close.
//!
//! Connection limits ([`ConnLimits`], `HEADER_READ_TIMEOUT` and friends), on both listeners
//! and both paths, so no client can pin connections:
//! - **At most `max_connections` open** per listener. One more is accepted, answered `503`
//!   `too_many_connections` with `Retry-After` and `connection: close`, and closed; the
//!   listener serves again as soon as connections close. Refusals are logged at most once
//!   per [`REFUSAL_LOG_EVERY`], with their count.
//! - **A request head within `header_timeout`**: from accept for a connection's first
//!   request (the lean path's head read and hyper's share the one deadline), from the first
//!   byte of the next one on a kept-alive connection; a connection that misses it is closed.
//! - **A kept-alive connection idles at most `idle_timeout`** (no request in flight, no
//!   byte received), then closes gracefully. hyper's own `header_read_timeout` is not used
//!   for this: in hyper 1.x its timer starts whenever the connection waits for a head,
//!   idle included, so it would close every idle connection at the header timeout — sooner
//!   than the idle timeout of a load balancer in front, which then races the close (a
//!   request sent on a connection the origin is closing fails). Each hyper connection has
//!   a watchdog instead (`Activity`, `next_deadline`): its socket notes bytes read, its
//!   service notes requests starting and responses ending.
//! - **A request body within `body_timeout`** from the end of its head: every request
//!   body is wrapped in [`DeadlineBody`], so whatever reads it (JSON routes, the proxy's
//!   upload) fails at the deadline and the JSON routes answer 408 `body_timeout`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::extract::DeadlineBody;

/// The longest request head the lean path reads; longer ones go to hyper.
pub const MAX_HEAD: usize = 16 * 1024;

/// How long one chunk may wait for the client to take it before the connection closes.
pub const WRITE_STALL: Duration = Duration::from_secs(60);

/// Refusals over the connection cap are logged at most this often (with their count).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a refused connection is kept to take the client's request bytes after the
/// `503` was written (closing with unread bytes would reset it and could lose the answer).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Refused connections kept lingering at once; past that a refusal is written and the
/// socket closed at once.
const MAX_LINGERING_REFUSALS: usize = 256;

/// The limits one listener puts on its connections (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// The listener's name in metrics (`public`, `internal`).
    pub name: &'static str,
    /// Time to send a whole request head.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may idle between requests.
    pub idle_timeout: Duration,
    /// Time a request body has to arrive whole, from the end of its head.
    pub body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// The limits a listener's requests are answered within (composed as layers in `app.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Time to the response head (finite routes and the start of streams).
    pub request_timeout: Duration,
    /// Requests being answered at once before new ones are shed.
    pub max_inflight: usize,
}

/// Which requests take the lean path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeanPath {
    /// `GET /events` as described in the module docs.
    Events,
    /// Never: every connection is hyper's (the internal listener).
    Off,
}

/// Accepts connections until `shutdown`, serving each with `app` within `limits`; then
/// waits for open connections to finish (the caller bounds that with its grace period).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    lean: LeanPath,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let listening = Arc::new(Listening {
        app,
        lean,
        limits,
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
    });
    let tracker = listening.tracker.clone();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS));
    let refusal = Bytes::from(refusal_response());
    let local = listener.local_addr().ok();
    let mut refusals = RefusalLog::default();
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
        let Ok(permit) = open.clone().try_acquire_owned() else {
            crate::metrics::global().refused(limits.name, "too_many_connections");
            if let Some(count) = refusals.note(Instant::now()) {
                tracing::warn!(
                    listener = ?local, refused = count, max = limits.max_connections,
                    "connections refused: the listener is at its connection cap"
                );
            }
            match lingering.clone().try_acquire_owned() {
                Ok(linger) => {
                    tracker.spawn(refuse(stream, refusal.clone(), linger));
                }
                Err(_) => {
                    // Too many lingering already: answer if the socket takes it at once.
                    let _ = stream.try_write(&refusal);
                }
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(stream, peer, permit, listening.clone()));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    // Kept until every stream has ended: the app's state owns the bus, and dropping the
    // last of it would end the streams' subscriptions before their drain.
    drop(listening);
    Ok(())
}

/// The answer to a connection over the cap: `503 too_many_connections`, then close.
fn refusal_response() -> Vec<u8> {
    let body = serde_json::to_vec(&gateway_shared::error::ErrorBody::new(
        "too_many_connections",
        "the server has too many open connections, try again shortly",
    ))
    .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Writes the refusal, stops writing, and takes what the client sends for a moment before
/// closing (closing on unread bytes would reset the connection, and the client could lose
/// the answer before reading it).
async fn refuse(mut stream: TcpStream, refusal: Bytes, _linger: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&refusal).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// Counts refusals and says when to log them: the first at once, then at most once per
/// [`REFUSAL_LOG_EVERY`], each time with how many there were since the last line.
#[derive(Debug, Default)]
struct RefusalLog {
    unlogged: u64,
    last: Option<Instant>,
}

impl RefusalLog {
    /// Notes one refusal at `now`; `Some(count)` when a line is due.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What every connection of one listener shares.
struct Listening {
    app: Router,
    lean: LeanPath,
    limits: ConnLimits,
    shutdown: CancellationToken,
    /// Every connection's task (and every stream's): waited for at shutdown.
    tracker: TaskTracker,
}

/// Serves one connection: the lean path when its first request qualifies, hyper otherwise.
/// The permit is the connection's place under the cap, given back when it closes (by the
/// stream's own task, for a lean stream).
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    l: Arc<Listening>,
) {
    let accepted = Instant::now();
    let mut prefix = Bytes::new();
    if l.lean == LeanPath::Events {
        // Boxed: the head buffer lives only until the request is built.
        let deadline = accepted + l.limits.header_timeout;
        match Box::pin(read_head(&mut stream, deadline, &l.shutdown)).await {
            Head::Lean(req) => {
                // Boxed: answering and writing the head is a large state. The stream then
                // gets a task of its own, sized for streaming: a task's allocation is its
                // largest state for as long as it lives, and this one's (head reading,
                // the router call, hyper) would be most of an idle stream's memory.
                if let Some(body) = Box::pin(respond(&mut stream, peer, &l, req)).await {
                    l.tracker.spawn(stream_chunks(stream, body, permit));
                }
                return;
            }
            Head::Other(bytes) => prefix = bytes,
            Head::Gone => return,
        }
    }
    // Boxed: hyper's connection future is large, and the task's size is the largest of
    // its states for as long as it lives — a lean stream must not pay for it.
    let conn = HyperConn {
        stream,
        prefix,
        peer,
        limits: l.limits,
        accepted,
        permit,
    };
    Box::pin(serve_hyper(conn, l.app.clone(), l.shutdown.clone())).await;
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

async fn read_head(
    stream: &mut TcpStream,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Head {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()).max(1024));
        }
        let read = tokio::select! {
            () = shutdown.cancelled() => return Head::Gone,
            () = tokio::time::sleep_until(deadline) => return Head::Gone,
            r = stream.read_buf(&mut buf) => r,
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

/// Runs the request through the router and writes the response's head as HTTP/1.1; a
/// finite response is written whole and the connection shut down (`None`), a streaming one
/// is returned for [`stream_chunks`].
async fn respond(
    stream: &mut TcpStream,
    peer: SocketAddr,
    l: &Listening,
    req: Box<Request<Body>>,
) -> Option<Body> {
    // Unboxed here, so the box is freed with this future, not kept by the stream.
    let mut req = *req;
    req.extensions_mut().insert(ConnectInfo(peer));
    let resp = match l.app.clone().oneshot(req).await {
        Ok(resp) => resp,
        Err(e) => match e {},
    };
    let (parts, mut body) = resp.into_parts();
    let exact = http_body::Body::size_hint(&body).exact();
    let head = encode_head(&parts, exact);
    // The response's header map is a few hundred bytes of heap: not kept for the stream.
    drop(parts);
    let Some(len) = exact else {
        // A stream's first frames (its `init`, and a resume's replay when read already)
        // go out with the head: one write, one segment, one wake-up of the client.
        let Next::Data(batch, end) =
            std::future::poll_fn(|cx| Poll::Ready(ready_frames(&mut body, cx))).await
        else {
            return None;
        };
        write_chunks(stream, &head, &batch, end).await.ok()?;
        if end {
            let _ = stream.shutdown().await;
            return None;
        }
        return Some(body);
    };
    // A finite response (an error body): written whole with its head, then the
    // connection closes.
    let bytes = if len > 0 {
        body.collect().await.ok()?.to_bytes()
    } else {
        Bytes::new()
    };
    let _ = write_stalling(stream, &[IoSlice::new(&head), IoSlice::new(&bytes)]).await;
    let _ = stream.shutdown().await;
    None
}

/// Writes a streaming body as chunks until it ends, the client goes away or stalls; the
/// connection's slot (`_permit`) is freed when it ends. This is the whole of an SSE
/// connection's task while it streams, written by hand rather than as an `async fn` so it
/// is only what it holds: the socket, the body, the slot and, while a write runs, the box
/// of that write (which owns the socket meanwhile). An `async fn` keeps its arguments
/// twice and the largest of its states for as long as it lives.
struct Streaming {
    /// `None` while a write owns it.
    stream: Option<TcpStream>,
    body: Body,
    writing: Option<Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>>,
    /// The write in flight is the last one (the body ended).
    ended: bool,
    _permit: OwnedSemaphorePermit,
}

fn stream_chunks(stream: TcpStream, body: Body, permit: OwnedSemaphorePermit) -> Streaming {
    Streaming {
        stream: Some(stream),
        body,
        writing: None,
        ended: false,
        _permit: permit,
    }
}

impl Future for Streaming {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            if let Some(write) = this.writing.as_mut() {
                match std::task::ready!(write.as_mut().poll(cx)) {
                    Ok(stream) if !this.ended => {
                        this.writing = None;
                        this.stream = Some(stream);
                    }
                    _ => return Poll::Ready(()),
                }
            }
            let Some(stream) = this.stream.as_ref() else {
                return Poll::Ready(());
            };
            // Hand-polled rather than `select!` over `readable()`: no readiness future (and
            // its intrusive waiter) lives in the task while the stream idles.
            let Next::Data(batch, end) = std::task::ready!(next_event(stream, &mut this.body, cx))
            else {
                return Poll::Ready(());
            };
            let stream = this.stream.take().expect("checked above");
            this.ended = end;
            this.writing = Some(Box::pin(write_batch(stream, batch, end)));
        }
    }
}

/// Everything the body had ready, as one chunk in one write (and the last chunk, then a
/// shutdown, when the body `end`ed): an SSE frame is several body frames (its head, the
/// shared data, the blank line), and a write per body frame was a syscall (and a timer)
/// each.
async fn write_batch(mut stream: TcpStream, batch: Vec<Bytes>, end: bool) -> io::Result<TcpStream> {
    write_chunks(&mut stream, &[], &batch, end).await?;
    if end {
        let _ = stream.shutdown().await;
    }
    Ok(stream)
}

/// Writes `prefix` (a response head, or nothing) and then `batch` as one chunk (none when
/// it is empty), and the last chunk when the body `end`ed — all in one write.
async fn write_chunks(
    stream: &mut TcpStream,
    prefix: &[u8],
    batch: &[Bytes],
    end: bool,
) -> io::Result<()> {
    let len: usize = batch.iter().map(Bytes::len).sum();
    let size = format!("{len:x}\r\n");
    let mut parts = Vec::with_capacity(batch.len() + 4);
    if !prefix.is_empty() {
        parts.push(IoSlice::new(prefix));
    }
    if len > 0 {
        parts.push(IoSlice::new(size.as_bytes()));
        parts.extend(batch.iter().map(|d| IoSlice::new(d)));
        parts.push(IoSlice::new(b"\r\n"));
    }
    if end {
        parts.push(IoSlice::new(b"0\r\n\r\n"));
    }
    write_stalling(stream, &parts).await
}

/// The most body frames gathered into one write.
const MAX_BATCH: usize = 32;

/// What happened next on a streaming connection.
enum Next {
    /// Body frames ready now (at most [`MAX_BATCH`]; none when the body just ended, and
    /// none from [`ready_frames`] when nothing was ready), and whether the body ended after
    /// them.
    Data(Vec<Bytes>, bool),
    /// The client went away, or the body failed: close.
    Gone,
}

/// The body frames ready now (at most [`MAX_BATCH`], possibly none) and whether the body
/// ended after them (then it must not be polled again), or `Gone` when it failed. Polls
/// with `cx`, so the task is woken when more is ready.
fn ready_frames(body: &mut Body, cx: &mut Context<'_>) -> Next {
    let mut batch = Vec::new();
    loop {
        match http_body::Body::poll_frame(Pin::new(&mut *body), cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => {
                    batch.push(data);
                    if batch.len() >= MAX_BATCH {
                        return Next::Data(batch, false);
                    }
                }
                _ => continue, // empty data or trailers: SSE has neither
            },
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body failed; closing");
                return Next::Gone;
            }
            // Not polled again after its end: the last frames (if any) and the end in one
            // write.
            Poll::Ready(None) => return Next::Data(batch, true),
            Poll::Pending => return Next::Data(batch, false),
        }
    }
}

fn next_event(stream: &TcpStream, body: &mut Body, cx: &mut Context<'_>) -> Poll<Next> {
    match ready_frames(body, cx) {
        // Nothing ready and not ended: watch the socket.
        Next::Data(batch, false) if batch.is_empty() => {}
        // The waker is registered: a batch returned now is written, and the body polled
        // again (with this task's waker) before the task sleeps.
        next => return Poll::Ready(next),
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
/// The common case — the socket takes it all at once — is one non-blocking write with no
/// timer; the timed loop only runs when the socket's buffer is full.
async fn write_stalling(stream: &mut TcpStream, parts: &[IoSlice<'_>]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let first = match stream.try_write_vectored(parts) {
        Ok(n) if n == total => return Ok(()),
        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let write = async {
        let mut written = first;
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

/// A connection handed to hyper, with what the lean path learnt of it.
struct HyperConn {
    stream: TcpStream,
    /// Bytes already read (by the lean path's head probe), put back in front.
    prefix: Bytes,
    peer: SocketAddr,
    limits: ConnLimits,
    /// When it was accepted: its first head is due `header_timeout` after.
    accepted: Instant,
    permit: OwnedSemaphorePermit,
}

/// hyper for everything else, with the bytes already read put back first, watched for
/// the header, idle and body deadlines.
async fn serve_hyper(conn: HyperConn, app: Router, shutdown: CancellationToken) {
    let HyperConn {
        stream,
        prefix,
        peer,
        limits,
        accepted,
        permit,
    } = conn;
    let activity = Arc::new(Activity::new(accepted));
    let (started, ended) = (activity.clone(), activity.clone());
    let body_timeout = limits.body_timeout;
    let service = app
        .map_request(move |mut req: Request<hyper::body::Incoming>| {
            started.request_started();
            req.extensions_mut().insert(ConnectInfo(peer));
            req.map(|body| {
                if http_body::Body::is_end_stream(&body) {
                    Body::new(body)
                } else {
                    Body::new(DeadlineBody::new(body, body_timeout))
                }
            })
        })
        .map_response(move |resp: axum::response::Response| {
            let done = RequestDone(ended.clone());
            resp.map(|body| Body::new(Tracked { body, _done: done }))
        });
    let io = TokioIo::new(Rewind {
        prefix,
        inner: stream,
        activity: activity.clone(),
        _permit: permit,
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The timer is hyper's clock; its header timer stays off because it would also close
    // idle connections at the header timeout (module docs): the watchdog below does both.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            verdict = watch(&activity, &limits, closing) => match verdict {
                Verdict::Close => {
                    tracing::trace!(%peer, "connection closed by its watchdog");
                    return;
                }
                Verdict::Graceful => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
            },
        }
    }
}

/// What the watchdog of one hyper connection knows: when a head started to be awaited,
/// when the connection last went idle, how many requests are in flight. Written by the
/// socket ([`Rewind`]) and the service, read by [`watch`]; times in milliseconds since
/// `origin`.
struct Activity {
    origin: Instant,
    /// When the awaited head began ([`NO_HEAD`]: none is awaited).
    head_since: AtomicU64,
    /// When the last response ended (or the connection was accepted).
    idle_since: AtomicU64,
    in_flight: AtomicU32,
    wake: Notify,
}

/// `Activity::head_since` when no head is awaited.
const NO_HEAD: u64 = u64::MAX;

impl Activity {
    /// A connection accepted at `origin`, awaiting its first head from then.
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            wake: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Bytes arrived: on an idle connection they are the start of the next head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_since
                .compare_exchange(NO_HEAD, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The head deadline is sooner than the idle one the watchdog sleeps towards.
            self.wake.notify_one();
        }
    }

    /// hyper parsed a head and called the service.
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NO_HEAD, Ordering::Release);
    }

    /// A response body ended (or was dropped).
    fn request_ended(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Release);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }

    fn snapshot(&self) -> Watched {
        let head = self.head_since.load(Ordering::Acquire);
        Watched {
            head_since: (head != NO_HEAD).then(|| Duration::from_millis(head)),
            idle_since: Duration::from_millis(self.idle_since.load(Ordering::Acquire)),
            in_flight: self.in_flight.load(Ordering::Acquire),
        }
    }
}

/// One reading of a connection's [`Activity`], times since it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watched {
    head_since: Option<Duration>,
    idle_since: Duration,
    in_flight: u32,
}

/// What the watchdog does when a deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Drop the connection (a head that did not come in time).
    Close,
    /// Ask hyper to close it when idle (keep-alive over).
    Graceful,
}

/// The connection's next deadline (time since accept) and what happens then; `None`
/// while a request is in flight (its body and response have their own limits). `closing`:
/// a graceful close was asked for that long after accept — an idle connection then gets
/// one header timeout more to go.
fn next_deadline(
    w: Watched,
    limits: &ConnLimits,
    closing: Option<Duration>,
) -> Option<(Duration, Verdict)> {
    if let Some(head) = w.head_since {
        return Some((head + limits.header_timeout, Verdict::Close));
    }
    if w.in_flight > 0 {
        return None;
    }
    Some(match closing {
        Some(at) => (at + limits.header_timeout, Verdict::Close),
        None => (w.idle_since + limits.idle_timeout, Verdict::Graceful),
    })
}

/// Waits for the connection's next deadline to pass (see [`next_deadline`]).
async fn watch(activity: &Activity, limits: &ConnLimits, closing: Option<Instant>) -> Verdict {
    let closing = closing.map(|at| at.saturating_duration_since(activity.origin));
    loop {
        let notified = activity.wake.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let Some((due, _)) = next_deadline(activity.snapshot(), limits, closing) else {
            notified.await;
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep_until(activity.origin + due) => {}
            () = notified => continue,
        }
        // Activity may have moved the deadline while we slept: act only on a passed one.
        if let Some((due, verdict)) = next_deadline(activity.snapshot(), limits, closing) {
            if activity.origin + due <= Instant::now() {
                return verdict;
            }
        }
    }
}

/// Tells the connection's [`Activity`] that a request ended when dropped.
struct RequestDone(Arc<Activity>);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that reports its end (hyper drops it once written, or when the
/// connection goes) to the connection's watchdog.
struct Tracked {
    body: Body,
    _done: RequestDone,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket with some bytes already read from it put back in front, which tells the
/// connection's watchdog when bytes arrive, and holds the connection's place under the
/// cap for as long as the socket lives (an upgraded socket included).
struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
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
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        read
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
    use futures::StreamExt;
    use http::Response;
    use std::convert::Infallible;

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

    const LIMITS: ConnLimits = ConnLimits {
        name: "public",
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(600),
        body_timeout: Duration::from_secs(30),
        max_connections: 100,
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_head_is_due_within_the_header_timeout_and_an_idle_connection_within_the_idle_one() {
        // Just accepted: the first head is due 10 s after accept.
        let accepted = Watched {
            head_since: Some(secs(0)),
            idle_since: secs(0),
            in_flight: 0,
        };
        assert_eq!(
            next_deadline(accepted, &LIMITS, None),
            Some((secs(10), Verdict::Close))
        );
        // A request in flight: no connection deadline (its body has its own).
        let busy = Watched {
            head_since: None,
            idle_since: secs(0),
            in_flight: 1,
        };
        assert_eq!(next_deadline(busy, &LIMITS, None), None);
        // Idle since its last response at 5 s: closed gracefully at 605 s.
        let idle = Watched {
            head_since: None,
            idle_since: secs(5),
            in_flight: 0,
        };
        assert_eq!(
            next_deadline(idle, &LIMITS, None),
            Some((secs(605), Verdict::Graceful))
        );
        // The next head's first byte at 100 s: due at 110 s, however long it idled.
        let next_head = Watched {
            head_since: Some(secs(100)),
            ..idle
        };
        assert_eq!(
            next_deadline(next_head, &LIMITS, None),
            Some((secs(110), Verdict::Close))
        );
        // Asked to close at 700 s and still there: dropped one header timeout later.
        assert_eq!(
            next_deadline(idle, &LIMITS, Some(secs(700))),
            Some((secs(710), Verdict::Close))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_follows_activity() {
        let a = Arc::new(Activity::new(Instant::now()));
        // No head within 10 s of accept: close.
        assert_eq!(watch(&a, &LIMITS, None).await, Verdict::Close);
        assert_eq!(a.origin.elapsed(), secs(10));

        // A request and its end: idle from then on. The first byte of the next head, 300 s
        // later, wakes the watchdog to the head's sooner deadline.
        a.request_started();
        a.request_ended();
        let idle_from = Instant::now();
        let b = a.clone();
        tokio::spawn(async move {
            tokio::time::sleep(secs(300)).await;
            b.bytes_read();
        });
        assert_eq!(watch(&a, &LIMITS, None).await, Verdict::Close);
        assert_eq!(idle_from.elapsed(), secs(310));

        // That request ends and nothing more comes: a graceful close at the idle timeout.
        a.request_started();
        a.request_ended();
        let idle_from = Instant::now();
        assert_eq!(watch(&a, &LIMITS, None).await, Verdict::Graceful);
        assert_eq!(idle_from.elapsed(), LIMITS.idle_timeout);
    }

    #[test]
    fn refusals_are_logged_once_per_period_with_their_count() {
        let t0 = Instant::now();
        let mut log = RefusalLog::default();
        assert_eq!(log.note(t0), Some(1), "the first at once");
        for _ in 0..99 {
            assert_eq!(log.note(t0 + secs(1)), None);
        }
        assert_eq!(log.note(t0 + REFUSAL_LOG_EVERY), Some(100));
        assert_eq!(log.note(t0 + REFUSAL_LOG_EVERY + secs(1)), None);
    }

    #[test]
    fn the_refusal_is_a_complete_json_503_that_closes() {
        let text = String::from_utf8(refusal_response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("connection: close") && head.contains("retry-after: 1"));
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
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

    /// Serves `app` on a loopback port (lean path on) and returns the raw bytes a client
    /// reads for `GET /events` until the server closes.
    async fn lean_response(app: Router) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            LeanPath::Events,
            LIMITS,
            shutdown.clone(),
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
            .await
            .expect("the server closes the stream")
            .unwrap();
        shutdown.cancel();
        let _ = server.await;
        String::from_utf8(out).unwrap()
    }

    fn sse_app(body: impl Fn() -> Body + Clone + Send + Sync + 'static) -> Router {
        Router::new().route(
            "/events",
            axum::routing::get(move || {
                let body = body.clone();
                async move {
                    http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(body())
                        .unwrap()
                }
            }),
        )
    }

    const SSE_HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

    #[tokio::test]
    async fn frames_ready_with_the_head_are_one_chunk_after_it_and_an_ended_body_closes() {
        let app = sse_app(|| {
            let frames = [Bytes::from_static(b"a\n"), Bytes::from_static(b"bc\n")];
            Body::from_stream(futures::stream::iter(frames.map(Ok::<_, Infallible>)))
        });
        assert_eq!(
            lean_response(app).await,
            format!("{SSE_HEAD}5\r\na\nbc\n\r\n0\r\n\r\n")
        );
        // A body that ends before any frame: the head and the last chunk.
        let app =
            sse_app(|| Body::from_stream(futures::stream::empty::<Result<Bytes, Infallible>>()));
        assert_eq!(lean_response(app).await, format!("{SSE_HEAD}0\r\n\r\n"));
    }

    #[tokio::test]
    async fn a_finite_answer_on_the_lean_path_is_its_head_and_body_then_a_close() {
        let app = Router::new().route(
            "/events",
            axum::routing::get(|| async {
                (
                    http::StatusCode::UNAUTHORIZED,
                    [("content-type", "application/json")],
                    r#"{"error":{"code":"missing_token","message":"no"}}"#,
                )
            }),
        );
        let text = lean_response(app).await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert_eq!(body, r#"{"error":{"code":"missing_token","message":"no"}}"#);
    }

    #[tokio::test]
    async fn frames_after_the_head_are_written_by_the_stream_as_they_come() {
        let app = sse_app(|| {
            let first = futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"init\n"))]);
            let later = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Bytes::from_static(b"later\n"))
            });
            Body::from_stream(first.chain(later))
        });
        assert_eq!(
            lean_response(app).await,
            format!("{SSE_HEAD}5\r\ninit\n\r\n6\r\nlater\n\r\n0\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn a_streaming_connection_task_stays_small() {
        // A task's allocation is the size of its largest state for as long as it lives,
        // rounded up to 128 bytes with tokio's header and trailer (~100 bytes): a stream's
        // task is `Streaming` alone (the head reading, the router call and hyper stay in
        // the connection's first task, which ends) and its writes are boxed, so it fits
        // the 256-byte class (the whole connection future took 1,024).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let fut = stream_chunks(stream, Body::empty(), permit);
        let size = std::mem::size_of_val(&fut);
        assert!(
            size <= 128,
            "a streaming connection's future is {size} bytes"
        );
    }
}
