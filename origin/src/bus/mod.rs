//! Client delivery: the bus every frame for a client travels on.
//!
//! A browser's SSE stream lands on one replica; the callback or NATS event that produces a
//! frame for it may be handled by another. So frames are never handed to a connection
//! directly: they are published on the bus under the client id, and the replica holding
//! that client's stream subscribes. The bus also keeps recent frames, so a client that
//! reconnects with `Last-Event-ID` — to any replica — gets what it missed.
//!
//! Frame ids are assigned by the bus at publish time, increase monotonically per client
//! (not necessarily contiguously), and are what the SSE `id:` line carries.
//!
//! **Runs are broadcast, not copied** (issue 16, `docs/design/broadcast.md`): a run's
//! `playbook/state` frame is published once, to the run ([`Bus::publish_run`]), and reaches
//! every client watching it. Who watches what belongs to the client: a subscription is
//! opened with the client's watch list ([`Bus::subscribe_with`]), and a watch added while a
//! stream is open reaches it through [`Bus::watch`]. A subscription yields its client's own
//! frames and its runs' frames merged in one id order (ids are one bus-wide sequence), so
//! one `Last-Event-ID` resumes both. The rules:
//! - live, a run's frames published after the watch reached the bus are delivered;
//! - a resume (`After(n)`, `Retained`) replays the client's frames and every watched run's
//!   retained frames above the start point, so a reconnecting watcher also gets run frames
//!   from before it began watching, if the run's retention still holds them;
//! - the reset rule applies per subject: a run that dropped frames the client was owed
//!   resets the client's stream like its own subject would.
//!
//! Two implementations pass one conformance suite (`tests/tests/bus_conformance.rs`):
//! - [`memory::MemoryBus`] — in-process, for the embedded default (one replica);
//! - [`nats::NatsBus`] — NATS: the stream `GATEWAY_FRAMES` over `gateway.clients.>` keeps
//!   every frame; one ordered consumer per replica routes them to the replica's
//!   subscriptions, so an idle connection costs the server nothing.
//!
//! Both decide when a resume must start with `stream/reset` by one rule, `reset::must_reset`.
//! Either is wrapped in [`instrumented::InstrumentedBus`], which times every operation.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use gateway_shared::ids::{ClientId, ExecutionId};
use std::time::Duration;

mod inbox;
pub mod instrumented;
pub mod memory;
pub mod nats;
mod reset;

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS (or the stream) could not be reached or refused the operation.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The event name is not one visible-ASCII token (it travels as an SSE `event:` line
    /// and a NATS header, where a CR/LF would forge protocol lines).
    #[error("invalid event name")]
    InvalidEvent,
    /// The subscriber fell further behind than the bus holds for it (its live backlog):
    /// its stream ends rather than skip frames, and the client resumes with
    /// `Last-Event-ID` (nothing is lost: the frames are still retained).
    #[error("subscriber lagged")]
    Lagged,
}

/// One frame as stored and delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusFrame {
    /// The frame id (SSE `id:`), monotonic per client.
    pub id: u64,
    /// The SSE event name, e.g. `playbook/result`.
    pub event: String,
    /// The frame's JSON data, encoded once and shared by every writer.
    pub data: Bytes,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Every frame still retained for the client, then live ones (a first connection:
    /// frames published before it connected are delivered).
    Retained,
    /// Frames with an id greater than this (`Last-Event-ID`), then live ones.
    After(u64),
    /// Only frames published from now on: nothing is replayed (a resume over the
    /// user's replay limit, `quotas.rs`; the stream says `stream/reset` first).
    Live,
    /// A client id the caller has just made ([`crate::clients::new_id`]) and stored
    /// nowhere yet: nothing can have been published for it, so nothing is read back. The
    /// caller subscribes before it stores the id, which is what makes that hold; every
    /// frame from then on is delivered, like [`StartAt::Retained`]. Watching runs is
    /// [`StartAt::Retained`] (their frames predate the client).
    Unseen,
    /// Every frame still retained for a client none of whose frames can be at or below this
    /// id — the [`Subscription::position`] of its first, [`StartAt::Unseen`] subscription,
    /// kept in its record — then live ones: the frames of [`StartAt::Retained`], never a
    /// reset. The NATS bus reads nothing back when the client watches no runs and its router
    /// has been delivered every frame above the id and none of the client's; any other bus
    /// takes it as `Retained`.
    Since(u64),
}

/// A client's frames: replayed ones first, then live ones, in id order, none twice.
pub struct Subscription {
    /// True when the requested `After(id)` could not be honoured exactly: frames after it
    /// may have expired, or the id is not one this bus issued. The SSE layer then sends
    /// `stream/reset` first, so the client re-reads state instead of trusting a silent gap.
    pub reset: bool,
    /// The frames. The stream ends only when it cannot go on without a gap: the bus failed,
    /// or this subscriber fell further behind than the bus can hold for it (the memory bus's
    /// live buffer, NATS retention). One `Err` item says why, then the stream ends; the SSE
    /// layer then closes the connection and the client resumes with `Last-Event-ID`.
    pub frames: BoxStream<'static, Result<BusFrame, BusError>>,
    /// For a [`StartAt::Unseen`] subscription, an id no frame of the client can be at or
    /// below (the NATS bus's position in the stream when it registered), for the client's
    /// record: a later resume of the client with nothing read starts there
    /// ([`StartAt::Since`]). `None` when the bus has none to give.
    pub position: Option<u64>,
}

/// How long and how much the bus keeps for replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Frames older than this are dropped (PROTOCOL §7: 10 min). Zero: no age limit, as
    /// `max_age = 0` means for a NATS stream.
    pub max_age: Duration,
    /// At most this many frames per client are kept (oldest dropped first). Zero: no limit.
    pub max_frames_per_client: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(600),
            max_frames_per_client: 1000,
        }
    }
}

/// The event of the control frame [`Bus::watch`] publishes on a client's own subject (NATS
/// bus): the replica holding the client's stream learns the watch in stream order. Never
/// yielded to a subscriber, never written to a browser.
pub const WATCH_EVENT: &str = "gw/watch";

/// Most runs one subscription follows; beyond it the oldest watch is dropped (a watch list
/// is bounded the same way, `interest::MAX_WATCHED_PER_CLIENT`).
pub const MAX_WATCHED_PER_SUBSCRIPTION: usize = 256;

/// The newest [`MAX_WATCHED_PER_SUBSCRIPTION`] of a watch list (oldest first): what one
/// subscription follows.
pub(crate) fn newest_watches(watching: &[ExecutionId]) -> &[ExecutionId] {
    &watching[watching.len().saturating_sub(MAX_WATCHED_PER_SUBSCRIPTION)..]
}

/// Refuses event names that are not one visible-ASCII token of at most 256 bytes.
pub(crate) fn check_event(event: &str) -> Result<(), BusError> {
    if !event.is_empty() && event.len() <= 256 && event.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(BusError::InvalidEvent)
    }
}

/// Publish frames to a client; subscribe to a client's frames with replay.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends a frame to the client's stream and returns its id once it is retained
    /// (so a crash after `publish` returns cannot lose it).
    /// The client id is a [`ClientId`], so it is a valid subject token by construction.
    async fn publish(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
    ) -> Result<u64, BusError>;

    /// [`Bus::publish`] of a frame that may be published again for the same cause (the
    /// bridge's redelivered event after a reader died between publish and ack): `key`
    /// names the frame, and a second publish with the same key within the bus's duplicate
    /// window stores nothing and returns the first one's id, so the client gets it once.
    /// The NATS bus sends `key` as `Nats-Msg-Id` (JetStream's duplicate window, 2 min by
    /// default); the embedded bus, which nothing redelivers to, publishes. No default:
    /// a decorator that forgot to pass the key on would silently lose the guarantee.
    async fn publish_once(
        &self,
        client_id: &ClientId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError>;

    /// Publishes `data` on `subject` outside the gateway's own frames — a service's
    /// `reply_to` subject for a question's outcome — with `msg_id` as its idempotency key,
    /// and returns once it is retained: on NATS a JetStream publish acknowledged by the
    /// stream that captures `subject` (none: an error, so the caller retries), with
    /// `Nats-Msg-Id: msg_id`. The embedded bus has no other subjects: always an error. The
    /// caller checks `subject` is not the gateway's or NoETL's (`questions.rs`).
    async fn publish_external(
        &self,
        subject: &str,
        data: Bytes,
        msg_id: &str,
    ) -> Result<(), BusError>;

    /// True if [`Bus::publish_external`] can work at all (a NATS bus).
    fn has_external_subjects(&self) -> bool;

    /// What the bus knows, without a read, of the runs `client_id` follows:
    /// `Some(range)` when a client made at a stream position in `range` (the
    /// [`Subscription::position`] its record keeps, [`StartAt::Since`]) and resuming at
    /// an id at or below the range's end follows no run, so its watch list need not be
    /// read. A run followed later is still delivered: its `gw/watch` frame is above the
    /// range's end, so a subscription opened after this call reads or is routed it.
    /// `None` when only the watch list can tell (the NATS bus: a `gw/watch` frame of the
    /// client was seen, or its router cannot tell; any other bus: always).
    fn unwatched(&self, client_id: &ClientId) -> Option<std::ops::RangeInclusive<u64>>;

    /// Publishes a run's frame once, for every client watching `execution_id` (see the
    /// module docs), and returns its id once retained. `key` names the frame as in
    /// [`Bus::publish_once`]: the same key within the duplicate window stores nothing more.
    async fn publish_run(
        &self,
        execution_id: &ExecutionId,
        event: &str,
        data: Bytes,
        key: &str,
    ) -> Result<u64, BusError>;

    /// Makes the client's open subscriptions (on any replica) deliver `execution_id`'s
    /// frames published from now on. The caller has checked that the client may read the
    /// run, and records the watch in the client's watch list (`interest::follow`) next,
    /// so a subscription opened later is given it by [`Bus::subscribe_with`] — in that
    /// order, so that a client whose watch list names a run has its `gw/watch` frame on
    /// the bus ([`Bus::unwatched`]).
    async fn watch(&self, client_id: &ClientId, execution_id: &ExecutionId)
        -> Result<(), BusError>;

    /// The client's frames and those of the runs in `watching` from `start`, then live
    /// ones, merged in id order.
    async fn subscribe_with(
        &self,
        client_id: &ClientId,
        start: StartAt,
        watching: &[ExecutionId],
    ) -> Result<Subscription, BusError>;

    /// [`Bus::subscribe_with`] watching no run (yet).
    async fn subscribe(
        &self,
        client_id: &ClientId,
        start: StartAt,
    ) -> Result<Subscription, BusError> {
        self.subscribe_with(client_id, start, &[]).await
    }

    /// True if the bus can deliver now (for `/ready`).
    async fn is_healthy(&self) -> bool;

    /// The largest `data` one [`Bus::publish`] of `event` can carry, if the bus limits it
    /// (NATS: the server's `max_payload` less the frame's headers); `None`: no limit.
    fn max_data_len(&self, event: &str) -> Option<usize> {
        let _ = event;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_must_be_one_visible_token() {
        assert!(check_event("playbook/result").is_ok());
        for bad in ["", "a b", "a\r\nGw-Id: 1", "é", &"e".repeat(257)] {
            assert!(
                matches!(check_event(bad), Err(BusError::InvalidEvent)),
                "{bad:?}"
            );
        }
    }
}
