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
use http::{HeaderMap, Method};

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

/// Sends `req` to `base`'s host through `http` with the request's `traceparent` and
/// `x-request-id`, and waits for the answer's head within `req.first_byte_timeout`: the
/// answer (or why there is none) and how long it took. The one send of NoETL's proxy and
/// every service's.
pub(crate) async fn send<S>(
    http: &reqwest::Client,
    base: &Url,
    req: Forward<S>,
) -> (Result<reqwest::Response, SendError>, Duration)
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let mut url = base.clone();
    url.set_path(&req.path);
    url.set_query(req.query.as_deref());
    let mut headers = req.headers;
    let (traceparent, request_id) = observe::outgoing();
    headers.insert(observe::TRACEPARENT, traceparent);
    headers.insert("x-request-id", request_id);
    let started = Instant::now();
    let send = http
        .request(req.method, url)
        .headers(headers)
        .body(reqwest::Body::wrap_stream(req.body))
        .send();
    let r = match tokio::time::timeout(req.first_byte_timeout, send).await {
        Err(_) => Err(SendError::Timeout),
        Ok(Err(e)) if e.is_timeout() => Err(SendError::Timeout),
        Ok(Err(e)) => Err(SendError::Failed(innermost(&e))),
        Ok(Ok(r)) => Ok(r),
    };
    (r, started.elapsed())
}

/// An answer's head and its body as a stream.
pub(crate) fn forwarded(resp: reqwest::Response) -> Forwarded {
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

/// The innermost error message (reqwest's outer ones only say "error sending request").
pub(crate) fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
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
        Ok(Self { name, http, base })
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
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let (resp, took) = send(&self.http, &self.base, req).await;
        let resp = resp.map_err(|e| match e {
            SendError::Timeout => self.timeout(),
            SendError::Failed(message) => UpstreamError::Unreachable {
                service: self.name.to_owned(),
                message,
            },
        });
        let outcome = match &resp {
            Ok(r) if r.status().is_server_error() => "server_error",
            Ok(r) if r.status().is_client_error() => "client_error",
            Ok(_) => "ok",
            Err(UpstreamError::Timeout { .. }) => "timeout",
            Err(UpstreamError::Unreachable { .. }) => "unavailable",
        };
        crate::metrics::global().observe_service(self.name, outcome, took);
        Ok(forwarded(resp?))
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
