//! The worker pool: a fixed set of worker tasks, each with a bounded queue, that the
//! durable reader hands [`Job`]s to — every event of one execution to the same worker (so
//! they are handled in delivery order), different executions in parallel.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_nats::jetstream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::handler::{Delivery, Handler};
use super::policy::{self, OrderGuard, Parsed};
use super::source::msg_id;
use super::CancellationToken;

/// Most events queued for one worker. When the worker an event belongs to has this many
/// waiting, the reader stops pulling until it takes one: memory stays bounded and
/// JetStream keeps the rest (a slow execution's neighbours wait only once it is full).
const WORKER_QUEUE: usize = 16;

/// One message on its way through a worker; parsed once, by the reader, which needs the
/// execution id to pick the worker.
pub(super) struct Job {
    /// The message as JetStream delivered it: what is acked or NAKed.
    pub(super) msg: Box<jetstream::Message>,
    pub(super) parsed: Result<Parsed, policy::Malformed>,
    /// Increasing per execution in delivery order (the stream sequence).
    pub(super) seq: u64,
    /// The event's identity when the payload has no `event_id`.
    key: String,
    /// When NATS stored it: what its age is measured from.
    stored: SystemTime,
    /// Its place among the messages this reader holds (released when the job is dropped).
    _held: Held,
}

/// The stream sequences of the messages the reader holds — queued for a worker or being
/// handled. The ack wait is short (a dead reader's messages must come back soon), so a
/// message that waits behind a slow one can be redelivered while still in hand: that copy
/// is recognised here and dropped unacked, and the one in hand acks (or NAKs) it.
#[derive(Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<HashSet<u64>>>);

impl InFlight {
    /// Holds `seq`; `None` if it is already held.
    fn hold(&self, seq: u64) -> Option<Held> {
        let fresh = self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(seq);
        fresh.then(|| Held {
            set: self.clone(),
            seq,
        })
    }

    /// How many messages are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One held stream sequence; dropping it releases it.
struct Held {
    set: InFlight,
    seq: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.seq);
    }
}

impl Job {
    /// A JetStream message as a job; `None` (logged) if it has no ack metadata, or if it is
    /// a redelivery of a message this reader still holds.
    pub(super) fn durable(
        msg: jetstream::Message,
        handler: &Handler,
        in_flight: &InFlight,
    ) -> Option<Self> {
        let (seq, published) = match msg.info() {
            Ok(info) => (info.stream_sequence, SystemTime::from(info.published)),
            Err(e) => {
                // No ack subject to answer on: nothing to do but report it.
                tracing::warn!(subject = %msg.subject, error = %e, "bridge: JetStream message without ack metadata skipped");
                return None;
            }
        };
        let Some(held) = in_flight.hold(seq) else {
            tracing::debug!(
                stream_sequence = seq,
                "bridge: redelivery of a message still in hand left to that copy"
            );
            return None;
        };
        let key = msg_id(msg.headers.as_ref()).unwrap_or_else(|| format!("seq-{seq}"));
        let parsed = handler.parse(msg.subject.as_str(), &msg.payload);
        Some(Self {
            msg: Box::new(msg),
            parsed,
            seq,
            key,
            stored: published,
            _held: held,
        })
    }

    pub(super) fn delivery(&self) -> Delivery<'_> {
        Delivery {
            subject: self.msg.subject.as_str(),
            payload_len: self.msg.payload.len(),
            parsed: &self.parsed,
            seq: self.seq,
            age: SystemTime::now()
                .duration_since(self.stored)
                .unwrap_or_default(),
            fallback_key: &self.key,
        }
    }

    /// The worker every event of this execution goes to; `None` for a message that is
    /// only acked (malformed or not forwarded), which any worker can take.
    fn route(&self, workers: usize) -> Option<usize> {
        match &self.parsed {
            Ok(Parsed::Forward(ev)) => Some(policy::worker_for(&ev.execution_id, workers)),
            _ => None,
        }
    }
}

/// One worker: its queue and its task (which returns how many queued events it gave back
/// at shutdown).
struct Worker {
    queue: mpsc::Sender<Job>,
    task: JoinHandle<usize>,
}

/// The fixed set of workers the reader hands messages to.
pub(super) struct Pool {
    pub(super) handler: Arc<Handler>,
    /// The messages this pool holds.
    pub(super) in_flight: InFlight,
    workers: Vec<Worker>,
    /// Where the next message without an execution goes first.
    next_any: usize,
    /// Cancelled by [`Pool::stop`], after the reader stopped reading.
    stop: CancellationToken,
}

impl Pool {
    pub(super) fn start(handler: Arc<Handler>, concurrency: usize) -> Self {
        let mut pool = Self {
            handler,
            in_flight: InFlight::default(),
            workers: Vec::with_capacity(concurrency),
            next_any: 0,
            stop: CancellationToken::new(),
        };
        for _ in 0..concurrency {
            let w = pool.spawn_worker();
            pool.workers.push(w);
        }
        pool
    }

    fn spawn_worker(&self) -> Worker {
        let (queue, rx) = mpsc::channel(WORKER_QUEUE);
        let task = tokio::spawn(run_worker(self.handler.clone(), rx, self.stop.clone()));
        Worker { queue, task }
    }

    /// Queues `job` on its worker, waiting while that queue is full (back-pressure on the
    /// reader). Gives the job back if shutdown comes first.
    pub(super) async fn dispatch(
        &mut self,
        job: Job,
        shutdown: &CancellationToken,
    ) -> Result<(), Job> {
        let n = self.workers.len();
        let i = match job.route(n) {
            Some(i) => i,
            None => {
                let start = self.next_any;
                self.next_any = (start + 1) % n;
                first_with_room(start, n, |k| self.workers[k].queue.capacity() > 0)
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(job),
                permit = self.workers[i].queue.reserve() => if let Ok(permit) = permit {
                    permit.send(job);
                    return Ok(());
                },
            }
            // Its receiver is gone: the worker panicked. Its executions need a worker.
            tracing::error!(
                worker = i,
                "bridge: a worker stopped unexpectedly; starting a new one"
            );
            self.workers[i] = self.spawn_worker();
        }
    }

    /// Stops every worker (each finishes the event in hand and gives back what is still
    /// queued), gives back `leftover`, and waits for them. Call after reading stopped.
    pub(super) async fn stop(self, leftover: Option<Job>) {
        self.stop.cancel();
        let mut given_back = 0;
        for (i, w) in self.workers.into_iter().enumerate() {
            drop(w.queue);
            match w.task.await {
                Ok(n) => given_back += n,
                Err(e) => tracing::error!(worker = i, error = %e, "bridge: a worker failed"),
            }
        }
        if let Some(job) = leftover {
            self.handler.give_back(job, None).await;
            given_back += 1;
        }
        // Given back = NAKed for redelivery.
        tracing::info!(queued_unhandled = given_back, "bridge stopped");
    }
}

/// One worker: handles its queue in order until the pool stops, then gives back what is
/// still queued. Its [`OrderGuard`] sees every event of its executions (they all hash
/// here), so it is as good as a guard shared by the whole replica.
async fn run_worker(
    handler: Arc<Handler>,
    mut rx: mpsc::Receiver<Job>,
    stop: CancellationToken,
) -> usize {
    let mut guard = OrderGuard::new();
    loop {
        let job = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        handler.process(job, &mut guard).await;
    }
    rx.close();
    let mut given_back = 0;
    while let Ok(job) = rx.try_recv() {
        handler.give_back(job, Some(&mut guard)).await;
        given_back += 1;
    }
    given_back
}

/// Where a message that is only acked goes: the first of `n` workers with room, looking
/// from `start` on in turn, or `start` itself (to wait for it) when every queue is full.
fn first_with_room(start: usize, n: usize, has_room: impl Fn(usize) -> bool) -> usize {
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&k| has_room(k))
        .unwrap_or(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_sequence_is_held_once_until_its_job_is_dropped() {
        let f = InFlight::default();
        let a = f.hold(7).expect("free");
        assert!(f.hold(7).is_none(), "a redelivery while in hand");
        let b = f.hold(8).expect("another message");
        assert_eq!(f.len(), 2);
        drop(a);
        assert!(f.hold(7).is_some(), "free again once handled");
        drop(b);
    }

    #[test]
    fn an_only_acked_message_goes_to_the_next_worker_with_room_or_waits_for_its_turn() {
        assert_eq!(first_with_room(2, 4, |_| true), 2);
        assert_eq!(first_with_room(2, 4, |k| k != 2), 3);
        assert_eq!(first_with_room(3, 4, |k| k == 1), 1, "wraps around");
        assert_eq!(
            first_with_room(1, 4, |_| false),
            1,
            "all full: wait for its turn"
        );
        assert_eq!(first_with_room(0, 1, |_| false), 0);
    }
}
