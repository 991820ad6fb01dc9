//! `floor-proxy` — the HTTP stack the origin's proxy stands on, with none of the gateway's
//! steps: bench-services' "stack floor" row.
//!
//! What it keeps from the origin: the tokio runtime (multi-threaded, one worker per core),
//! mimalloc, hyper-util's HTTP/1 + HTTP/2 server with hyper's timer, `TCP_NODELAY`, and
//! the origin's own upstream pool (`origin::h1pool`, the connection driven on the request's
//! task), with the upstream's `content-length` passed through. What it leaves out: axum's
//! router, the `front` layer (request id, metrics, access line, span, client address, edge
//! assertion), the session check, the allow-list, the identity and hop-by-hop headers, the
//! body limits and timeouts, the connection watchdog. So its CPU per request is what any
//! proxy built on this stack pays before doing anything of its own, and the gap between it
//! and the gateway's row is what the gateway's steps cost.
//!
//! Not a product: it forwards whatever it is sent, to one upstream, with no limits. It
//! listens on loopback only.
//!
//! Usage: `floor-proxy --port <port> --upstream http://127.0.0.1:<port>`.

use std::convert::Infallible;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use futures::TryStreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use origin::h1pool::{H1Pool, UpBody};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "hyper + the origin's upstream pool, forwarding everything: the proxy's floor")]
struct Args {
    /// Loopback port to listen on.
    #[arg(long)]
    port: u16,
    /// The one upstream, `http://host:port`.
    #[arg(long)]
    upstream: String,
}

type OutBody = UnsyncBoxBody<Bytes, std::io::Error>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let authority = args
        .upstream
        .strip_prefix("http://")
        .context("--upstream must be http://host:port")?
        .trim_end_matches('/')
        .to_owned();
    let host = HeaderValue::from_str(&authority)?;
    // The origin's settings for a service's pool (`upstream.rs`): 100 idle, 90 s.
    let pool = H1Pool::new(
        authority,
        host,
        Duration::from_secs(5),
        100,
        Duration::from_secs(90),
    );
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let pool = pool.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(pool.clone(), req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The client's request as it came (its `host` replaced by the pool's), the upstream's
/// answer as it came; 502 if the upstream could not be reached.
async fn forward(pool: H1Pool, req: Request<Incoming>) -> Result<Response<OutBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .unwrap_or_default();
    let body: UpBody = body.map_err(std::io::Error::other).boxed_unsync();
    match pool.send(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = StreamBody::new(body.map_ok(Frame::data));
            Ok(Response::from_parts(parts, BodyExt::boxed_unsync(body)))
        }
        Err(e) => {
            let mut resp = Response::new(
                Full::new(Bytes::from(format!("upstream: {e:?}\n")))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(resp)
        }
    }
}
