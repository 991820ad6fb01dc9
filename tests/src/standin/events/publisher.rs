//! The event queue and the task that flushes it to NATS every tail interval, in bursts.
//!
//! Rust shape: JetStream publishes with `Nats-Msg-Id` into `noetl_events`, acknowledged
//! (core publishes if the stream cannot be ensured). Python shape: core publishes. 4.x
//! shape: JetStream publishes without `Nats-Msg-Id` into the configured stream (created
//! with `<prefix>.>` when missing, as 4.x does; core publishes if that fails). `none`: no
//! connection at all, every row counted as skipped. NATS unreachable at start is a warning;
//! its events are dropped and counted (`GET /_standin/stats`), never retried.

use super::row::{encode_row, EventRow, Outgoing, Shape};
use super::v4::{self, V4Mirror};
use super::{EventShape, STREAM_MAX_AGE, STREAM_NAME, STREAM_SUBJECTS};
use crate::standin::config::Config;
use async_nats::jetstream::{self, message::PublishMessage};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Counters visible at `GET /_standin/stats`.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Rows queued for publishing.
    pub queued: AtomicU64,
    /// Messages the server accepted (acknowledged, for JetStream).
    pub published: AtomicU64,
    /// Messages lost (no connection, publish error, no ack).
    pub dropped: AtomicU64,
    /// Rows with no counterpart in the chosen shape.
    pub skipped: AtomicU64,
}

impl EventStats {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        json!({
            "queued": self.queued.load(Ordering::Relaxed),
            "published": self.published.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "skipped": self.skipped.load(Ordering::Relaxed),
        })
    }
}

/// The write end of the event queue; a no-op when no NATS URL is configured.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: Option<mpsc::UnboundedSender<EventRow>>,
    /// Without a queue, count every row as skipped (`--event-shape none`).
    count_skipped: bool,
    stats: Arc<EventStats>,
}

impl EventSink {
    /// A sink that publishes nothing (no `--nats-url`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            count_skipped: false,
            stats: Arc::default(),
        }
    }

    /// A sink that publishes nothing by design and counts each row as skipped
    /// (`--event-shape none`: a NoETL without the event mirror).
    pub fn silent() -> Self {
        Self {
            count_skipped: true,
            ..Self::disabled()
        }
    }

    /// Queues a row for the next burst. Never blocks: it is called under the store's lock,
    /// which is what keeps the published order equal to the table's order.
    pub fn enqueue(&self, row: &EventRow) {
        if let Some(tx) = &self.tx {
            if tx.send(row.clone()).is_ok() {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        } else if self.count_skipped {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The publishing counters.
    pub fn stats(&self) -> &EventStats {
        &self.stats
    }
}

/// How rows become messages.
enum Encoder {
    /// The Rust server's whole row ([`Shape::Rust`]).
    Rust,
    /// The Python server's dict ([`Shape::Python`]).
    Python,
    /// 4.x's canonical envelope.
    V4(V4Mirror),
}

impl Encoder {
    fn encode(&self, row: &EventRow) -> Option<Outgoing> {
        match self {
            Self::Rust => encode_row(row, Shape::Rust),
            Self::Python => encode_row(row, Shape::Python),
            Self::V4(mirror) => Some(mirror.encode(row)),
        }
    }
}

/// How bursts leave the process.
enum Transport {
    /// JetStream publishes (with `Nats-Msg-Id` where the shape sends it), acknowledged.
    JetStream(jetstream::Context),
    /// Core publishes (Python shape, or no stream available).
    Core(async_nats::Client),
    /// NATS unreachable at start: every row is dropped and counted.
    Down,
}

/// The background task that flushes the queue every tail interval.
pub struct Publisher {
    sink: EventSink,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Connects (if `--nats-url` is set), ensures the stream and starts flushing.
    /// An unreachable NATS is a warning, not an error: HTTP keeps being served.
    pub async fn start(config: &Config) -> Self {
        let idle = |sink| Self {
            sink,
            stop: None,
            task: None,
        };
        let shape = config.event_shape();
        let encoder = match shape {
            EventShape::None => {
                tracing::info!("--event-shape none: execution events are not published (the record and /status are the only signal)");
                return idle(EventSink::silent());
            }
            EventShape::Rust => Encoder::Rust,
            EventShape::Python => Encoder::Python,
            EventShape::V4 => Encoder::V4(V4Mirror::new(
                &config.v4_subject_prefix,
                &config.tenant,
                &config.organization,
                config.shard_count,
            )),
        };
        let Some(url) = config.nats_url.as_deref() else {
            tracing::info!("no NATS_URL: execution events are not published");
            return idle(EventSink::disabled());
        };
        let transport = connect(url, &encoder, &config.v4_stream).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = EventSink {
            tx: Some(tx),
            count_skipped: false,
            stats: Arc::default(),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let flusher = Flusher {
            rx,
            transport,
            encoder,
            stats: sink.stats.clone(),
        };
        let task = tokio::spawn(flusher.run(config.tail_interval(), stop_rx));
        Self {
            sink,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// The queue's write end.
    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// Publishes what is still queued (bounded wait), then stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                tracing::warn!("event publisher did not finish its last burst in 3 s");
            }
        }
    }
}

async fn connect(url: &str, encoder: &Encoder, v4_stream: &str) -> Transport {
    let client = match async_nats::ConnectOptions::new()
        .name("noetl-standin")
        .connection_timeout(Duration::from_secs(3))
        .connect(url)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%url, error = %e, "NATS unreachable: events will be dropped (counted at /_standin/stats)");
            return Transport::Down;
        }
    };
    let js = jetstream::new(client.clone());
    if let Encoder::V4(mirror) = encoder {
        return ensure_v4_stream(js, client, url, mirror, v4_stream).await;
    }
    let stream = jetstream::stream::Config {
        name: STREAM_NAME.into(),
        subjects: vec![STREAM_SUBJECTS.into()],
        max_age: STREAM_MAX_AGE,
        ..Default::default()
    };
    match js.get_or_create_stream(stream).await {
        Ok(_) => tracing::info!(%url, stream = STREAM_NAME, "JetStream stream ready"),
        Err(e) => {
            tracing::warn!(%url, error = %e, "cannot ensure stream {STREAM_NAME}: publishing with core NATS");
            return Transport::Core(client);
        }
    }
    match encoder {
        Encoder::Python => Transport::Core(client),
        _ => Transport::JetStream(js),
    }
}

/// 4.x's `connect`: an existing stream is used as it is; a missing one is created with
/// `<prefix>.>`, 24 h, file storage.
async fn ensure_v4_stream(
    js: jetstream::Context,
    client: async_nats::Client,
    url: &str,
    mirror: &V4Mirror,
    name: &str,
) -> Transport {
    if js.get_stream(name).await.is_ok() {
        tracing::info!(%url, stream = name, "using the existing 4.x event stream");
        return Transport::JetStream(js);
    }
    let stream = jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![mirror.stream_subjects()],
        max_age: v4::STREAM_MAX_AGE,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    match js.create_stream(stream).await {
        Ok(_) => {
            tracing::info!(%url, stream = name, subjects = %mirror.stream_subjects(), "created the 4.x event stream");
            Transport::JetStream(js)
        }
        Err(e) => {
            tracing::warn!(%url, error = %e, "cannot create stream {name}: publishing with core NATS");
            Transport::Core(client)
        }
    }
}

/// Owns the read end of the queue and the connection.
struct Flusher {
    rx: mpsc::UnboundedReceiver<EventRow>,
    transport: Transport,
    encoder: Encoder,
    stats: Arc<EventStats>,
}

impl Flusher {
    async fn run(mut self, every: Duration, mut stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush().await,
                _ = &mut stop => {
                    self.flush().await;
                    return;
                }
            }
        }
    }

    /// Takes everything queued so far and publishes it as one burst.
    async fn flush(&mut self) {
        let mut batch = Vec::new();
        while let Ok(row) = self.rx.try_recv() {
            batch.push(row);
        }
        if batch.is_empty() {
            return;
        }
        let messages = self.encode(batch);
        tracing::debug!(count = messages.len(), "publishing event burst");
        match &self.transport {
            Transport::JetStream(js) => publish_jetstream(js, messages, &self.stats).await,
            Transport::Core(client) => publish_core(client, messages, &self.stats).await,
            Transport::Down => {
                let n = messages.len() as u64;
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(dropped = n, "NATS down: event burst dropped");
            }
        }
    }

    fn encode(&self, batch: Vec<EventRow>) -> Vec<Outgoing> {
        batch
            .into_iter()
            .filter_map(|row| {
                let out = self.encoder.encode(&row);
                if out.is_none() {
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                }
                out
            })
            .collect()
    }
}

async fn publish_jetstream(js: &jetstream::Context, messages: Vec<Outgoing>, stats: &EventStats) {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let mut publish = PublishMessage::build().payload(m.payload);
        if m.send_msg_id {
            publish = publish.message_id(&m.msg_id);
        }
        match js.send_publish(m.subject, publish).await {
            Ok(ack) => acks.push(ack),
            Err(e) => drop_one(stats, &e),
        }
    }
    for ack in acks {
        match ack.await {
            Ok(_) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => drop_one(stats, &e),
        }
    }
}

async fn publish_core(client: &async_nats::Client, messages: Vec<Outgoing>, stats: &EventStats) {
    let n = messages.len() as u64;
    for m in messages {
        if let Err(e) = client.publish(m.subject, m.payload).await {
            drop_one(stats, &e);
            continue;
        }
        stats.published.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, count = n, "NATS flush failed");
    }
}

fn drop_one(stats: &EventStats, e: &dyn std::fmt::Display) {
    stats.dropped.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %e, "event dropped");
}
