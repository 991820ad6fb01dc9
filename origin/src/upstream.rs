//! The HTTP client to the registered backend services ([`crate::services`]): the generic
//! proxy streams through it, and the answers of human-in-the-loop questions are delivered
//! with it ([`crate::questions`]).
//!
//! One `reqwest` client per service, so each backend has its own connection pool: up to
//! 100 idle connections kept per host for 90 s, `TCP_NODELAY`, TCP keep-alive, a connect
//! timeout, and no redirects followed (a redirect is the caller's to follow, never the
//! gateway's with the caller's identity). Like [`crate::noetl::NoetlClient::forward`], a
//! forwarded request is never retried (its body is consumed as it is sent) and carries the
//! request's `traceparent` and `x-request-id`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use url::Url;

use futures::stream::BoxStream;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::combinators::UnsyncBoxBody;

pub(crate) use crate::h1pool::innermost;
use crate::h1pool::{H1Pool, PoolError, PooledBody};
use crate::observe;

/// A request the proxy streams upstream (to NoETL through
/// [`crate::noetl::NoetlClient::forward`], to a service through [`ServiceClient::forward`]).
pub struct Forward<S> {
    /// The caller's method.
    pub method: Method,
    /// The upstream path (`/api/...` on NoETL, `{base path}/...` on a service), already
    /// checked by the proxy's policy.
    pub path: String,
    /// The upstream query, without the session token.
    pub query: Option<String>,
    /// The headers to send (the caller's, filtered, plus the gateway's identity headers).
    pub headers: HeaderMap,
    /// The caller's body, as it arrives.
    pub body: S,
    /// The body's length when known: `Some(0)` for a request without one, the declared
    /// `content-length` otherwise; `None` when it is chunked.
    pub body_len: Option<u64>,
    /// How long the upstream may take to send the answer's head.
    pub first_byte_timeout: Duration,
}

/// The upstream's streamed answer to a [`Forward`].
pub struct Forwarded {
    /// The upstream's status code.
    pub status: u16,
    /// Its headers (unfiltered: the proxy decides what the caller sees).
    pub headers: HeaderMap,
    /// The declared body length, if the upstream declared one.
    pub content_length: Option<u64>,
    /// The body, chunk by chunk.
    pub body: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

/// Why a [`send`] got no answer head.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Not within the request's `first_byte_timeout`.
    Timeout,
    /// The connection failed; the innermost cause.
    Failed(String),
}

/// How a proxied request reaches its upstream: an `http://` base through the pool that
/// runs connections on the request's own task ([`H1Pool`]), an `https://` one through
/// `reqwest` (TLS).
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// Plain HTTP/1.1, pooled on the caller's task.
    H1(H1Pool),
    /// TLS, through `reqwest`'s pool.
    Reqwest(reqwest::Client),
}

impl Transport {
    /// [`Transport::H1`] for an `http://` `base` (pool settings as `reqwest`'s were), else
    /// `http`.
    pub(crate) fn for_base(base: &Url, http: reqwest::Client, connect_timeout: Duration) -> Self {
        // `host_str` already brackets an IPv6 address.
        let authority = base
            .host_str()
            .zip(base.port_or_known_default())
            .map(|(host, port)| format!("{host}:{port}"));
        let host = base[url::Position::BeforeHost..url::Position::AfterPort].to_owned();
        match (base.scheme(), authority, HeaderValue::from_str(&host)) {
            ("http", Some(authority), Ok(host)) => Transport::H1(H1Pool::new(
                authority,
                host,
                connect_timeout,
                POOL_IDLE_PER_HOST,
                POOL_IDLE_TIMEOUT,
            )),
            _ => Transport::Reqwest(http),
        }
    }
}

/// Sends `req` to `base`'s host through `transport` with the request's `traceparent` and
/// `x-request-id`, and waits for the answer's head within `req.first_byte_timeout`: the
/// answer (or why there is none) and how long it took. The one send of NoETL's proxy and
/// every service's.
pub(crate) async fn send<S>(
    transport: &Transport,
    base: &Url,
    req: Forward<S>,
) -> (Result<Forwarded, SendError>, Duration)
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static,
{
    let mut headers = req.headers;
    let (traceparent, request_id) = observe::outgoing();
    headers.insert(observe::TRACEPARENT, traceparent);
    headers.insert("x-request-id", request_id);
    let started = Instant::now();
    let r = match transport {
        Transport::H1(pool) => {
            let mut target = req.path;
            if let Some(q) = req.query.as_deref() {
                target.push('?');
                target.push_str(q);
            }
            let body = UpstreamBody {
                stream: req.body,
                len: req.body_len,
            };
            let mut request = http::Request::new(UnsyncBoxBody::new(body));
            *request.method_mut() = req.method;
            *request.headers_mut() = headers;
            match http::Uri::try_from(target) {
                Err(e) => Err(SendError::Failed(e.to_string())),
                Ok(uri) => {
                    *request.uri_mut() = uri;
                    match tokio::time::timeout(req.first_byte_timeout, pool.send(request)).await {
                        Err(_) | Ok(Err(PoolError::ConnectTimeout)) => Err(SendError::Timeout),
                        Ok(Err(PoolError::Failed(cause))) => Err(SendError::Failed(cause)),
                        Ok(Ok(resp)) => Ok(pooled(resp)),
                    }
                }
            }
        }
        Transport::Reqwest(http) => {
            let mut url = base.clone();
            url.set_path(&req.path);
            url.set_query(req.query.as_deref());
            let send = http
                .request(req.method, url)
                .headers(headers)
                .body(reqwest::Body::wrap_stream(req.body))
                .send();
            match tokio::time::timeout(req.first_byte_timeout, send).await {
                Err(_) => Err(SendError::Timeout),
                Ok(Err(e)) if e.is_timeout() => Err(SendError::Timeout),
                Ok(Err(e)) => Err(SendError::Failed(innermost(&e))),
                Ok(Ok(r)) => Ok(forwarded(r)),
            }
        }
    };
    (r, started.elapsed())
}

/// The request body sent through the pool: the caller's stream, with its length when
/// known (so a body-less request is sent without one, and a sized one with its
/// `content-length`, not chunked).
struct UpstreamBody<S> {
    stream: S,
    len: Option<u64>,
}

impl<S> http_body::Body for UpstreamBody<S>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.len == Some(0) {
            return std::task::Poll::Ready(None);
        }
        self.stream
            .poll_next_unpin(cx)
            .map(|chunk| chunk.map(|r| r.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.len == Some(0)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.len {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

/// A pooled answer's head and its body as a stream.
fn pooled(resp: http::Response<PooledBody>) -> Forwarded {
    let (parts, body) = resp.into_parts();
    Forwarded {
        status: parts.status.as_u16(),
        content_length: parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        headers: parts.headers,
        body: body.boxed(),
    }
}

/// An answer's head and its body as a stream.
fn forwarded(resp: reqwest::Response) -> Forwarded {
    Forwarded {
        status: resp.status().as_u16(),
        content_length: resp.content_length(),
        headers: resp.headers().clone(),
        body: resp
            .bytes_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed(),
    }
}

/// Idle connections kept per backend host.
pub const POOL_IDLE_PER_HOST: usize = 100;
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a call to a service failed. Mapped to 502/504 by [`crate::error::AppError`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made, or it broke before an answer's head.
    #[error("service {service} is unreachable: {message}")]
    Unreachable {
        /// The service's name.
        service: String,
        /// What failed (the innermost cause).
        message: String,
    },
    /// The service did not send the answer's head in time.
    #[error("service {service} did not answer in time")]
    Timeout {
        /// The service's name.
        service: String,
    },
}

/// The client for one service.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    name: &'static str,
    http: reqwest::Client,
    transport: Transport,
    base: Url,
}

impl ServiceClient {
    /// A client for the service `name` at `base`, with its own pool.
    pub fn new(name: &str, base: Url, connect_timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client for service {name}: {e}"))?;
        // Metric labels are `&'static str`; service names are a closed set made once at start.
        let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let transport = Transport::for_base(&base, http.clone(), connect_timeout);
        Ok(Self {
            name,
            http,
            transport,
            base,
        })
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// The service's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Streams `req` to the service (`req.path` is the full path on the service's host)
    /// and returns the answer's head with its body as a stream; the head must arrive
    /// within `req.first_byte_timeout`.
    pub async fn forward<S>(&self, req: Forward<S>) -> Result<Forwarded, UpstreamError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static,
    {
        let (resp, took) = send(&self.transport, &self.base, req).await;
        let resp = resp.map_err(|e| match e {
            SendError::Timeout => self.timeout(),
            SendError::Failed(message) => UpstreamError::Unreachable {
                service: self.name.to_owned(),
                message,
            },
        });
        let outcome = match &resp {
            Ok(r) if r.status >= 500 => "server_error",
            Ok(r) if r.status >= 400 => "client_error",
            Ok(_) => "ok",
            Err(UpstreamError::Timeout { .. }) => "timeout",
            Err(UpstreamError::Unreachable { .. }) => "unavailable",
        };
        crate::metrics::global().observe_service(self.name, outcome, took);
        resp
    }

    /// `POST url` with a JSON body and extra headers, within `timeout`; the answer's status
    /// (the body is read and dropped, at most 64 KiB of it). `url` must lie under the
    /// service's base URL (checked by the caller when the URL was accepted).
    pub async fn post_json(
        &self,
        url: &Url,
        body: &serde_json::Value,
        headers: &[(&'static str, String)],
        timeout: Duration,
    ) -> Result<u16, UpstreamError> {
        let (traceparent, request_id) = observe::outgoing();
        let mut req = self
            .http
            .post(url.clone())
            .timeout(timeout)
            .header(observe::TRACEPARENT, traceparent)
            .header("x-request-id", request_id)
            .json(body);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let started = Instant::now();
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                self.timeout()
            } else {
                self.unreachable(&e)
            }
        });
        let outcome = match &resp {
            Ok(r) if r.status().is_success() => "ok",
            Ok(r) if r.status().is_client_error() => "client_error",
            Ok(_) => "server_error",
            Err(UpstreamError::Timeout { .. }) => "timeout",
            Err(UpstreamError::Unreachable { .. }) => "unavailable",
        };
        crate::metrics::global().observe_service(self.name, outcome, started.elapsed());
        let mut resp = resp?;
        let status = resp.status().as_u16();
        let mut read = 0usize;
        while let Ok(Some(chunk)) = resp.chunk().await {
            read += chunk.len();
            if read > 64 * 1024 {
                break;
            }
        }
        Ok(status)
    }

    fn timeout(&self) -> UpstreamError {
        UpstreamError::Timeout {
            service: self.name.to_owned(),
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> UpstreamError {
        UpstreamError::Unreachable {
            service: self.name.to_owned(),
            message: innermost(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h1(base: &str) -> Option<String> {
        let url = Url::parse(base).unwrap();
        match Transport::for_base(&url, reqwest::Client::new(), Duration::from_secs(1)) {
            Transport::H1(pool) => Some(format!("{pool:?}")),
            Transport::Reqwest(_) => None,
        }
    }

    #[test]
    fn plain_http_goes_through_the_on_task_pool_and_tls_through_reqwest() {
        assert!(h1("http://svc.ns:8080/base")
            .unwrap()
            .contains("\"svc.ns:8080\""));
        assert!(h1("http://svc/").unwrap().contains("\"svc:80\""));
        assert!(h1("http://[::1]:9000/").unwrap().contains("\"[::1]:9000\""));
        assert!(h1("https://svc/").is_none());
    }
}
