//! Connection limits end to end (issue 12): half-open connections on both listeners and
//! both paths (the lean `GET /events` writer and hyper) are closed at the header timeout
//! while `/health` keeps answering; an idle kept-alive connection is closed at the idle
//! timeout; a body trickled at 1 byte/s gets 408 (the JSON routes and the proxy's
//! upload); the connection over the cap is refused with a JSON 503 and the listener serves
//! again once connections close; a declared body over a route's limit gets 413 before a
//! byte of it is sent.

use std::time::{Duration, Instant};

use gateway_tests::harness::flows::login;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{complete_response, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The header timeout the tests configure (short, so they run fast).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// `host:port` of a listener URL.
fn authority(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Reads until the peer closes (or `limit` passes); what was read and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response (head and a `content-length` body) from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a response within 10 s")
            .expect("the read succeeds");
        assert!(n > 0, "closed before a whole response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((status, body)) = complete_response(&buf) {
            let json = serde_json::from_slice(&buf[body]).unwrap_or(Value::Null);
            return (status, json);
        }
    }
}

/// Connects and sends `bytes`.
async fn send(authority: &str, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(authority).await.expect("connects");
    s.write_all(bytes).await.expect("sends");
    s
}

/// `GET /health` on a fresh connection; how long the answer took.
async fn health_latency(authority: &str) -> Duration {
    let start = Instant::now();
    let mut s = send(authority, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    start.elapsed()
}

async fn origin_with(standin: &StandIn, env: &[(&str, &str)]) -> Origin {
    let opts = OriginOptions::default().envs(env);
    Origin::start(standin, opts).await.unwrap()
}

#[tokio::test]
async fn half_open_connections_on_both_listeners_and_paths_close_at_the_header_timeout() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = origin_with(&standin, &[("HEADER_READ_TIMEOUT", "2s")]).await;
    for (listener, url) in [("public", &origin.url), ("internal", &origin.internal_url)] {
        let addr = authority(url);
        // 200 on the lean path's probe (the head of a `GET /events` without its final
        // CRLF) and 200 on hyper's (a partial POST head); the internal listener has no
        // lean path, so hyper gets both there.
        let opened = Instant::now();
        let mut held = Vec::new();
        for i in 0..400 {
            let partial: &[u8] = if i % 2 == 0 {
                b"GET /events HTTP/1.1\r\nHost: x\r\n"
            } else {
                b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            };
            held.push((send(&addr, partial).await, Instant::now()));
        }
        // While they are held, /health answers at once on fresh connections.
        let watch_health = {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let until = Instant::now() + HEADER_TIMEOUT + Duration::from_millis(500);
                while Instant::now() < until {
                    samples.push(health_latency(&addr).await);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                samples
            })
        };
        let closes = held.into_iter().map(|(mut s, sent)| {
            tokio::spawn(async move {
                let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
                (closed, got.len(), sent, Instant::now())
            })
        });
        let mut latest = opened;
        let mut slowest = Duration::ZERO;
        for c in futures::future::join_all(closes).await {
            let (closed, got, sent, at) = c.unwrap();
            assert!(
                closed,
                "{listener}: a half-open connection is still open after 10 s"
            );
            assert_eq!(got, 0, "{listener}: a half-open connection got an answer");
            latest = latest.max(at);
            // Each one is held until its own timeout (not refused at once), and closed then.
            let held_for = at - sent;
            assert!(
                held_for >= HEADER_TIMEOUT - Duration::from_millis(300),
                "{listener}: closed after {held_for:?}, before the header timeout"
            );
            slowest = slowest.max(held_for);
        }
        assert!(
            slowest <= HEADER_TIMEOUT + Duration::from_millis(1500),
            "{listener}: a half-open connection was closed {slowest:?} after its partial head"
        );
        let all_closed = latest - opened;
        let mut samples = watch_health.await.unwrap();
        samples.sort();
        let p95 = samples[samples.len() * 95 / 100];
        let max = *samples.last().unwrap();
        eprintln!(
            "{listener}: 400 half-open closed within {all_closed:?}; /health p95 {p95:?}, max {max:?} over {} samples",
            samples.len()
        );
        assert!(
            samples.len() >= 10,
            "{listener}: /health sampled {} times",
            samples.len()
        );
        assert!(
            p95 < Duration::from_millis(100) && max < Duration::from_secs(1),
            "{listener}: /health p95 {p95:?}, max {max:?} while half-open connections are held"
        );
    }
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_at_the_idle_timeout_and_a_busy_one_is_not() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = origin_with(
        &standin,
        &[
            ("HEADER_READ_TIMEOUT", "5s"),
            ("KEEPALIVE_IDLE_TIMEOUT", "1s"),
        ],
    )
    .await;
    for url in [&origin.url, &origin.internal_url] {
        let addr = authority(url);
        // One request, then nothing: closed ~1 s after the answer (before the 5 s head
        // timeout would have).
        let mut idle = send(&addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(read_response(&mut idle).await.0, 200);
        let answered = Instant::now();
        // A connection that sends a request every 400 ms stays open past the idle timeout.
        let mut busy = send(&addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(read_response(&mut busy).await.0, 200);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            busy.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("the busy connection is still open");
            assert_eq!(read_response(&mut busy).await.0, 200);
        }
        let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
        let after = answered.elapsed();
        assert!(closed, "{url}: the idle connection is still open");
        assert!(
            after >= Duration::from_millis(800) && after < Duration::from_millis(4000),
            "{url}: the idle connection closed {after:?} after its answer"
        );
    }
}

#[tokio::test]
async fn a_body_sent_at_one_byte_a_second_gets_408() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = origin_with(&standin, &[("BODY_READ_TIMEOUT", "2s")]).await;
    let token = login(&origin.url, &standin, "slow@example.com").await;
    let routes = [
        (
            authority(&origin.url),
            format!("POST /graphql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"),
        ),
        (
            authority(&origin.url),
            "POST /api/auth/login HTTP/1.1\r\nHost: x\r\n".to_owned(),
        ),
        // The proxy streams the upload to NoETL: the deadline cuts it there too.
        (
            authority(&origin.url),
            format!("POST /noetl/debug/echo/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"),
        ),
        (
            authority(&origin.internal_url),
            format!(
                "POST /api/internal/callback/async HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INTERNAL_TOKEN}\r\n"
            ),
        ),
    ];
    for (addr, head) in routes {
        let body = br#"{"query":"{ __typename }", "padding": "xxxxxxxxxxxxxxxx"}"#;
        let head = format!(
            "{head}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut s = send(&addr, head.as_bytes()).await;
        let started = Instant::now();
        let (mut rd, mut wr) = s.split();
        let trickle = async {
            for b in body {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let mut got = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::select! {
            () = read => {}
            () = trickle => panic!("{head}: the whole body was trickled without an answer"),
        }
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408 "), "{head}: {text}");
        assert!(text.contains(r#""code":"body_timeout""#), "{text}");
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "{head}: answered after {took:?}"
        );
    }
}

#[tokio::test]
async fn the_connection_over_the_cap_is_refused_and_the_listener_recovers() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = origin_with(
        &standin,
        &[
            ("PUBLIC_MAX_CONNECTIONS", "50"),
            ("INTERNAL_MAX_CONNECTIONS", "20"),
            ("HEADER_READ_TIMEOUT", "30s"),
        ],
    )
    .await;
    for (url, cap) in [(&origin.url, 50), (&origin.internal_url, 20)] {
        let addr = authority(url);
        // Fill the cap with kept-alive connections that each had an answer (so the
        // origin has surely accepted and counted every one).
        let mut held = Vec::new();
        for _ in 0..cap {
            let mut s = send(&addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(read_response(&mut s).await.0, 200);
            held.push(s);
        }
        // One more: a JSON 503 and the connection closed.
        let mut extra = send(&addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (got, closed) = read_until_closed(&mut extra, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            closed,
            "{url}: the refused connection was left open: {text}"
        );
        assert!(text.starts_with("HTTP/1.1 503 "), "{url}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("retry-after: 1"),
            "{text}"
        );
        assert!(text.contains(r#""code":"too_many_connections""#), "{text}");
        // The held ones still work.
        held[0]
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut held[0]).await.0, 200);
        // Close ten: new connections are served again.
        held.truncate(cap - 10);
        wait_for(
            "a new connection is served again",
            Duration::from_secs(5),
            || {
                let addr = addr.clone();
                async move {
                    let mut s = send(&addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    read_response(&mut s).await.0 == 200
                }
            },
        )
        .await;
    }
    let log = origin.log_text();
    let lines = log.matches("the listener is at its connection cap").count();
    assert!(
        (1..=2).contains(&lines),
        "refusals are logged rate-limited, one line per listener here: {lines}"
    );
}

#[tokio::test]
async fn a_declared_body_over_the_route_limit_gets_413_before_it_is_sent() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let origin = origin_with(&standin, &[]).await;
    const MIB: u64 = 1024 * 1024;
    for (url, path, declared) in [
        // 8 MiB against GraphQL's 2 MiB, the auth and callback limits (64 KiB, 1 MiB).
        (&origin.url, "/graphql", 8 * MIB),
        (&origin.url, "/api/auth/login", 8 * MIB),
        (
            &origin.internal_url,
            "/api/internal/callback/async",
            8 * MIB,
        ),
        // 16 MiB against PROXY_MAX_BODY's 10 MiB, without a token: the proxy's own check
        // comes after the caller lookup (401 here); this one before it.
        (&origin.url, "/noetl/debug/echo/x", 16 * MIB),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        );
        // The head only: the body is never sent, so an answer proves it was not waited for.
        let mut s = send(&authority(url), head.as_bytes()).await;
        let (got, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 413 "), "{path}: {text:?}");
        assert!(text.contains(r#""code":"payload_too_large""#), "{text}");
    }
}
