//! The SSE streams this process holds on one server (the gateway's `/events` or an nchan
//! subscriber), each with a reader that reports the frames carrying a bench marker.
//!
//! A frame is recognised by its payload only — a string `pbench-<phase>-<k>-<t>` anywhere in
//! its JSON data (a callback's body, a step name, an nchan message) — never by its `id:`,
//! whose form may change. `<t>` is the send time ([`now_ns`]), so latency is measured on
//! this process's one clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::bench::now_ns;
use gateway_tests::bench::sse_conn::{source_address, SseConn, SseTarget};
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// Connections per source address (one address has ~28k ephemeral ports).
pub(crate) const PER_ADDRESS: usize = 10_000;
/// The prefix of every marker the bench puts into a payload.
const MARK: &str = "pbench-";

/// The marker for delivery `k` of phase `phase`, sent at `t` (ns).
pub(crate) fn marker(phase: u32, k: u32, t: u64) -> String {
    format!("{MARK}{phase}-{k}-{t}")
}

/// `(phase, k, t)` of the first marker in `s`.
fn parse_marker(s: &str) -> Option<(u32, u32, u64)> {
    let rest = &s[s.find(MARK)? + MARK.len()..];
    let mut it = rest.splitn(3, '-');
    let phase = it.next()?.parse().ok()?;
    let k = it.next()?.parse().ok()?;
    let t = it.next()?;
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    Some((phase, k, t[..end].parse().ok()?))
}

/// The first marker anywhere in a frame's JSON data.
pub(crate) fn find_marker(v: &Value) -> Option<(u32, u32, u64)> {
    match v {
        Value::String(s) => parse_marker(s),
        Value::Array(a) => a.iter().find_map(find_marker),
        Value::Object(o) => o.values().find_map(find_marker),
        _ => None,
    }
}

/// One marked frame, as its reader saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery {
    /// The phase the marker names.
    pub(crate) phase: u32,
    /// The index the sender gave it (a request, a channel, an event).
    pub(crate) k: u32,
    /// Send time (ns).
    pub(crate) sent: u64,
    /// Arrival time (ns).
    pub(crate) at: u64,
    /// Which stream read it (index into [`StreamSet::ids`]).
    pub(crate) client: u32,
}

impl Delivery {
    /// Send → read, ns.
    pub(crate) fn latency(&self) -> u64 {
        self.at.saturating_sub(self.sent)
    }
}

/// What to open: one target per stream, and whether each first sends the gateway's init
/// frame (whose `result.clientId` becomes the stream's id).
pub(crate) struct OpenSpec {
    /// The streams, each with the id it has if it sends no init frame (an nchan channel).
    pub(crate) targets: Vec<(SseTarget, String)>,
    /// Read the gateway's init frame before counting a stream open.
    pub(crate) init: bool,
    /// Streams being opened at once.
    pub(crate) concurrency: usize,
    /// Source addresses 127.0.0.`first_octet` … ([`PER_ADDRESS`] each).
    pub(crate) first_octet: u8,
    /// Per-stream open timeout.
    pub(crate) timeout: Duration,
}

/// Open streams and their readers.
pub(crate) struct StreamSet {
    /// Per stream: the gateway's client id, or the nchan channel ("" if it failed to open).
    pub(crate) ids: Vec<String>,
    readers: Vec<Option<JoinHandle<Option<String>>>>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    /// Every marked frame read so far (see [`StreamSet::pump`]).
    pub(crate) got: Vec<Delivery>,
    /// Streams whose reader ended (the server closed or failed them).
    pub(crate) ended: Arc<AtomicU64>,
    /// Streams that failed to open.
    pub(crate) failed: usize,
    /// The first open error.
    pub(crate) first_error: Option<String>,
    /// First connect → last stream open.
    pub(crate) open_time: Duration,
    /// When the last stream opened.
    pub(crate) opened_at: Instant,
}

async fn read(
    mut conn: SseConn,
    client: u32,
    tx: mpsc::UnboundedSender<Delivery>,
    ended: Arc<AtomicU64>,
) -> Option<String> {
    let mut last = None;
    while let Ok(Some(f)) = conn.next_frame().await {
        let at = now_ns();
        if let Some((phase, k, sent)) = find_marker(&f.data) {
            let _ = tx.send(Delivery {
                phase,
                k,
                sent,
                at,
                client,
            });
        }
        if f.event_id.is_some() {
            last = f.event_id;
        }
    }
    ended.fetch_add(1, Ordering::Relaxed);
    last
}

/// Opens every stream of `spec` with bounded concurrency and starts its reader.
pub(crate) async fn open(spec: OpenSpec) -> StreamSet {
    let (tx, rx) = mpsc::unbounded_channel();
    let ended = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let started = Instant::now();
    let n = spec.targets.len();
    let mut opening = Vec::with_capacity(n);
    for (i, (target, id)) in spec.targets.into_iter().enumerate() {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let source = source_address(spec.first_octet, PER_ADDRESS, i);
        let (init, timeout) = (spec.init, spec.timeout);
        let (tx, ended) = (tx.clone(), ended.clone());
        opening.push(tokio::spawn(async move {
            let r = async {
                let mut conn = SseConn::open(&target, Some(source), timeout).await?;
                let id = if init {
                    conn.read_init(timeout).await?
                } else {
                    id
                };
                anyhow::Ok((conn, id))
            }
            .await;
            drop(permit);
            let at = Instant::now();
            // The reader starts as soon as its stream is open: a frame waiting for it (a
            // resumed client's replay) is read when it arrives, not after the last open.
            (
                r.map(|(conn, id)| (tokio::spawn(read(conn, i as u32, tx, ended)), id)),
                at,
            )
        }));
    }
    drop(tx);
    let mut set = StreamSet {
        ids: Vec::with_capacity(n),
        readers: Vec::with_capacity(n),
        rx,
        got: Vec::new(),
        ended,
        failed: 0,
        first_error: None,
        open_time: Duration::ZERO,
        opened_at: started,
    };
    for h in opening {
        match h.await {
            Ok((Ok((reader, id)), at)) => {
                set.opened_at = set.opened_at.max(at);
                set.ids.push(id);
                set.readers.push(Some(reader));
            }
            Ok((Err(e), _)) => {
                set.failed += 1;
                set.first_error.get_or_insert_with(|| format!("{e:#}"));
                set.ids.push(String::new());
                set.readers.push(None);
            }
            Err(e) => {
                set.failed += 1;
                set.first_error.get_or_insert_with(|| e.to_string());
                set.ids.push(String::new());
                set.readers.push(None);
            }
        }
    }
    set.open_time = set.opened_at.duration_since(started);
    set
}

impl StreamSet {
    /// Streams that opened.
    pub(crate) fn open_count(&self) -> usize {
        self.ids.len() - self.failed
    }

    /// Opened streams per second of the open phase.
    pub(crate) fn connect_rate(&self) -> f64 {
        self.open_count() as f64 / self.open_time.as_secs_f64().max(1e-3)
    }

    /// Moves what the readers reported into [`StreamSet::got`].
    pub(crate) fn pump(&mut self) {
        while let Ok(d) = self.rx.try_recv() {
            self.got.push(d);
        }
    }

    /// Marked frames of `phase` read so far.
    pub(crate) fn count(&mut self, phase: u32) -> usize {
        self.pump();
        self.got.iter().filter(|d| d.phase == phase).count()
    }

    /// Waits until `expected` frames of `phase` were read, or `timeout` passed; returns them
    /// (and forgets them, and anything older).
    pub(crate) async fn take(
        &mut self,
        phase: u32,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Delivery> {
        let until = Instant::now() + timeout;
        while self.count(phase) < expected && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Late duplicates of a phase would show as more than expected: let a moment pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.pump();
        let (mine, rest): (Vec<_>, Vec<_>) = self.got.drain(..).partition(|d| d.phase == phase);
        self.got = rest.into_iter().filter(|d| d.phase > phase).collect();
        mine
    }

    /// Closes every stream (their sockets drop with the readers).
    pub(crate) fn close(self) {
        for h in self.readers.into_iter().flatten() {
            h.abort();
        }
    }

    /// Waits (≤ `timeout`) for every reader to end on its own — the server went away — and
    /// returns each stream's last `id:` as written (what a browser resumes with).
    pub(crate) async fn finish(self, timeout: Duration) -> Vec<Option<String>> {
        let until = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.readers.len());
        for h in self.readers {
            out.push(match h {
                Some(h) => {
                    let abort = h.abort_handle();
                    match tokio::time::timeout_at(until, h).await {
                        Ok(Ok(last)) => last,
                        _ => {
                            abort.abort();
                            None
                        }
                    }
                }
                None => None,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn markers_are_found_anywhere_in_a_payload() {
        let m = marker(7, 42, 123_456);
        assert_eq!(parse_marker(&m), Some((7, 42, 123_456)));
        let frame = json!({"params": {"step_name": m, "x": [1, 2]}});
        assert_eq!(find_marker(&frame), Some((7, 42, 123_456)));
        let nested = json!({"result": {"data": {"m": format!("step {m} done")}}});
        assert_eq!(find_marker(&nested), Some((7, 42, 123_456)));
        assert_eq!(find_marker(&json!({"a": "pbench-x"})), None);
    }
}
