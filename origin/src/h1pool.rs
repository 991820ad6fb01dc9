//! A plain-HTTP/1.1 connection pool whose connections run on the request's own task.
//!
//! The proxy's forward to an `http://` upstream (a registered service, or NoETL) goes
//! through this pool instead of `reqwest`. A `reqwest`/`hyper-util` pool runs every
//! connection as a task of its own, so each proxied request is handed to that task and its
//! answer handed back — two cross-thread wake-ups per request, the largest cost left on
//! the proxy path once the session check was local (docs/BENCHMARKS.md, issue 16). Here a
//! connection is a plain [`hyper::client::conn::http1`] pair: the request's future drives
//! the connection while it waits for the answer's head, and the answer's body
//! ([`PooledBody`]) drives it while it is read; when the body has ended, the connection
//! goes back to the pool for the next request. Nothing runs between requests.
//!
//! Rules kept from the `reqwest` pool it replaces: up to `max_idle` idle connections
//! (the upstream module's 100), each kept at most `idle_timeout` (90 s), `TCP_NODELAY`,
//! a connect timeout, no redirects (none are ever followed here), no retry of a request
//! once any of it was sent. A pooled connection the upstream closed while idle is noticed
//! when it is taken (its state is polled first) or, if the close races the request, by
//! hyper handing the unsent request back — then it is sent once on a new connection.
//! A body dropped before its end (the caller went away) closes its connection.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The request body type every pooled connection takes.
pub type UpBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// One upstream host's pool (cheap to clone: the pool is shared).
#[derive(Clone)]
pub struct H1Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("authority", &self.inner.authority)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// `host:port` to connect to.
    authority: String,
    /// The `host` header every request carries.
    host: HeaderValue,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

/// One connection: the handle requests are sent through, and the state machine that does
/// its I/O (polled by whoever is using the connection).
struct Conn {
    sender: SendRequest<UpBody>,
    driver: Pin<Box<Connection<TokioIo<TcpStream>, UpBody>>>,
    /// The driver has finished: the connection is closed.
    done: bool,
}

impl Conn {
    /// Polls the connection's I/O; notes when it has closed.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && self.driver.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
    }
}

/// The innermost error message (the outer ones only say "error sending request").
pub fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Why no answer head came back.
#[derive(Debug)]
pub enum PoolError {
    /// The TCP connection could not be made within the connect timeout.
    ConnectTimeout,
    /// The connection failed (the innermost cause).
    Failed(String),
}

impl H1Pool {
    /// A pool for `host:port` (`authority`), sending `host` as the `host` header.
    pub fn new(
        authority: String,
        host: HeaderValue,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                authority,
                host,
                connect_timeout,
                max_idle,
                idle_timeout,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Idle connections held now.
    pub fn idle_len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Sends `req` (its URI the path and query; the pool adds `host`) and waits for the
    /// answer's head, driving the connection on this task. The answer's body keeps the
    /// connection until it ends.
    pub async fn send(&self, mut req: Request<UpBody>) -> Result<Response<PooledBody>, PoolError> {
        req.headers_mut()
            .insert(http::header::HOST, self.inner.host.clone());
        loop {
            let (mut conn, reused) = match self.inner.checkout() {
                Some(conn) => (conn, true),
                None => (self.inner.connect().await?, false),
            };
            let ready = poll_fn(|cx| {
                conn.drive(cx);
                conn.sender.poll_ready(cx)
            })
            .await;
            if let Err(e) = ready {
                if reused {
                    continue;
                }
                return Err(PoolError::Failed(innermost(&e)));
            }
            let mut answer = std::pin::pin!(conn.sender.try_send_request(req));
            let answer = poll_fn(|cx| {
                conn.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = PooledBody {
                        inner: body,
                        conn: Some(conn),
                        pool: self.inner.clone(),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    // Not a byte of it was sent: the pooled connection had closed. Once,
                    // on a new connection.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(PoolError::Failed(innermost(e.error()))),
                },
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, Instant)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let (mut conn, since) = self.lock().pop()?;
            if since.elapsed() >= self.idle_timeout {
                continue;
            }
            // Anything the upstream did while the connection sat idle (a close) is read now.
            conn.drive(&mut Context::from_waker(Waker::noop()));
            if !conn.done && !conn.sender.is_closed() {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        if conn.done || conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<Conn, PoolError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| PoolError::ConnectTimeout)?
            .map_err(|e| PoolError::Failed(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (sender, driver) = Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| PoolError::Failed(innermost(&e)))?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver),
            done: false,
        })
    }
}

/// An answer's body that drives its connection while it is read and returns the connection
/// to the pool at its end.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<Inner>,
}

impl Stream for PooledBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(conn) = this.conn.as_mut() {
            conn.drive(cx);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        // The last bytes of a sized body: the reader may stop here without
                        // asking for the end (hyper's server does once it has written
                        // `content-length` bytes), so the connection goes back now.
                        if this.inner.is_end_stream() {
                            this.release(cx);
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    // Trailers: not forwarded.
                }
                Poll::Ready(Some(Err(e))) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => {
                    this.release(cx);
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, None)
    }
}

impl PooledBody {
    /// Returns the connection to the pool once the answer has been read to its end.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(mut conn) = self.conn.take() {
            // Let the connection see the answer's end before it is reused.
            conn.drive(cx);
            self.pool.checkin(conn);
        }
    }

    /// Whether the body is known to be empty already (a `204`, a `HEAD` answer, `content-length: 0`).
    pub fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A raw HTTP/1.1 upstream answering `hello` to every request; `close_after` answers
    /// per connection before it closes it (without saying so). Counts connections.
    async fn upstream(close_after: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..close_after {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn pool(addr: &str) -> H1Pool {
        H1Pool::new(
            addr.to_owned(),
            HeaderValue::from_str(addr).unwrap(),
            Duration::from_secs(1),
            4,
            Duration::from_secs(90),
        )
    }

    fn get() -> Request<UpBody> {
        let body = Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        Request::get("/x").body(body).unwrap()
    }

    async fn read_all(resp: Response<PooledBody>) -> String {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (addr, conns) = upstream(usize::MAX).await;
        let pool = pool(&addr);
        for _ in 0..5 {
            let resp = pool.send(get()).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(read_all(resp).await, "hello");
            assert_eq!(pool.idle_len(), 1);
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection for five requests"
        );
    }

    #[tokio::test]
    async fn a_sized_body_read_to_its_length_frees_its_connection_without_reading_the_end() {
        let (addr, conns) = upstream(usize::MAX).await;
        let pool = pool(&addr);
        for _ in 0..3 {
            let mut body = pool.send(get()).await.unwrap().into_body();
            assert_eq!(&body.next().await.unwrap().unwrap()[..], b"hello");
            // Dropped after its five bytes, as a server writing `content-length` bytes does.
            drop(body);
            assert_eq!(pool.idle_len(), 1);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
        let (addr, conns) = upstream(1).await;
        let pool = pool(&addr);
        for _ in 0..3 {
            let resp = pool.send(get()).await.unwrap();
            assert_eq!(read_all(resp).await, "hello");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, conns) = upstream(usize::MAX).await;
        let pool = pool(&addr);
        let resp = pool.send(get()).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_len(), 0);
        let resp = pool.send(get()).await.unwrap();
        assert_eq!(read_all(resp).await, "hello");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_not_a_hang() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(matches!(
            pool(&addr).send(get()).await,
            Err(PoolError::Failed(_))
        ));
    }
}
