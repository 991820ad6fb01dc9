//! A small SSE client for tests: reads `/events` over real HTTP and yields parsed frames.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

/// One parsed SSE frame.
#[derive(Debug, Clone)]
pub struct SseFrame {
    /// The frame's position: the number of its `id:` (`<client_id>.<n>`, or a bare `<n>`),
    /// if the frame had one.
    pub id: Option<u64>,
    /// `id:` as written (what a browser sends back as `Last-Event-ID`).
    pub event_id: Option<String>,
    /// `event:` (default `message`).
    pub event: String,
    /// `data:` parsed as JSON (`Null` if it was not JSON).
    pub data: Value,
    /// `retry:`, if present.
    pub retry: Option<u64>,
}

/// An open `/events` stream.
pub struct SseClient {
    rx: mpsc::Receiver<SseFrame>,
    task: tokio::task::JoinHandle<()>,
    /// The HTTP status of the response.
    pub status: u16,
    /// The response headers (which HTTP path wrote the response shows in them).
    pub headers: reqwest::header::HeaderMap,
    /// The highest frame position seen so far.
    pub last_id: Option<u64>,
    /// The `id:` of the last frame that had one, as written: what a browser's
    /// EventSource sends as `Last-Event-ID` when it reconnects.
    pub last_event_id: Option<String>,
}

/// Parses one frame block (the text between blank lines); `None` for comments only.
pub fn parse_frame(block: &str) -> Option<SseFrame> {
    let (mut event_id, mut event, mut data, mut retry) =
        (None, String::from("message"), String::new(), None);
    let mut any = false;
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line
            .split_once(':')
            .map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)))
            .unwrap_or((line, ""));
        any = true;
        match field {
            "id" => event_id = Some(value.to_owned()),
            "event" => event = value.to_owned(),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            "retry" => retry = value.parse().ok(),
            _ => {}
        }
    }
    let id = event_id
        .as_deref()
        .and_then(|v: &str| v.rsplit_once('.').map_or(v, |(_, seq)| seq).parse().ok());
    any.then(|| SseFrame {
        id,
        event_id,
        event,
        data: serde_json::from_str(&data).unwrap_or(Value::Null),
        retry,
    })
}

impl SseClient {
    /// Opens `url` (with the query already in it) with optional bearer token and a bare
    /// numeric `Last-Event-ID` (resumed only with `?client_id=`). A non-200 answer is
    /// returned with its body as a JSON value.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        last_event_id: Option<u64>,
    ) -> anyhow::Result<Result<SseClient, (u16, Value)>> {
        Self::resume(url, token, last_event_id.map(|n| n.to_string()).as_deref()).await
    }

    /// Opens `url` as a browser's EventSource reconnects: the same URL, and
    /// `Last-Event-ID` exactly as the last frame's `id:` said (see
    /// [`SseClient::last_event_id`]).
    pub async fn resume(
        url: &str,
        token: Option<&str>,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Result<SseClient, (u16, Value)>> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Self::resume_with(&client, url, token, last_event_id).await
    }

    /// [`SseClient::resume`] through `client` (building a client is costly: a test that
    /// opens hundreds of streams at once shares one; each stream still gets its own
    /// connection, as the pool has no idle one while streams are open).
    pub async fn resume_with(
        client: &reqwest::Client,
        url: &str,
        token: Option<&str>,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Result<SseClient, (u16, Value)>> {
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Ok(Err((
                status,
                serde_json::from_str(&body).unwrap_or(Value::String(body)),
            )));
        }
        let (tx, rx) = mpsc::channel(10_000);
        let task = tokio::spawn(async move {
            let mut stream = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(pos) = buf.find("\n\n") {
                    let block: String = buf.drain(..pos + 2).collect();
                    if let Some(frame) = parse_frame(&block) {
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Ok(SseClient {
            rx,
            task,
            status,
            headers,
            last_id: None,
            last_event_id: None,
        }))
    }

    /// The next frame (pings included), or `None` at the end of the stream or after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseFrame> {
        let f = tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()?;
        if let Some(id) = f.id {
            self.last_id = Some(self.last_id.map_or(id, |l| l.max(id)));
        }
        if let Some(raw) = &f.event_id {
            self.last_event_id = Some(raw.clone());
        }
        Some(f)
    }

    /// Frames (pings skipped) until `done` says stop or `timeout` passes in total.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[SseFrame]) -> bool,
    ) -> Vec<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(f) if f.event == "ping" => {}
                Some(f) => out.push(f),
                None => break,
            }
        }
        out
    }

    /// Closes the connection (as a browser tab closing would).
    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
