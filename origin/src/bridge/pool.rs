//! The worker pool: a fixed set of worker tasks, each with a bounded queue, that the
//! reader hands [`Job`]s to — every event of one execution to the same worker (so they are
//! handled in delivery order), different executions in parallel — and core mode's retry
//! timers ([`CoreRetry`]), which put an event back on its worker's queue after a delay.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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

/// One message on its way through a worker, whichever mode delivered it; parsed once, by
/// the reader, which needs the execution id to pick the worker.
pub(super) struct Job {
    pub(super) msg: Incoming,
    pub(super) parsed: Result<Parsed, policy::Malformed>,
    /// Increasing per execution in delivery order (stream sequence, or a local counter).
    pub(super) seq: u64,
    /// The event's identity when the payload has no `event_id`.
    key: String,
    /// What its age is measured from.
    since: Since,
}

/// The message as NATS delivered it: what is acked (durable) or held (core).
pub(super) enum Incoming {
    /// Boxed: with its JetStream context it is twice a core message.
    Durable(Box<jetstream::Message>),
    Core(async_nats::Message),
}

/// What a job's age is measured from.
enum Since {
    /// When NATS stored it (durable).
    Stored(SystemTime),
    /// When this replica first received it (core).
    Received(Instant),
}

impl Job {
    /// A JetStream message as a job; `None` (logged) if it has no ack metadata.
    pub(super) fn durable(msg: jetstream::Message, handler: &Handler) -> Option<Self> {
        let (seq, published) = match msg.info() {
            Ok(info) => (info.stream_sequence, SystemTime::from(info.published)),
            Err(e) => {
                // No ack subject to answer on: nothing to do but report it.
                tracing::warn!(subject = %msg.subject, error = %e, "bridge: JetStream message without ack metadata skipped");
                return None;
            }
        };
        let key = msg_id(msg.headers.as_ref()).unwrap_or_else(|| format!("seq-{seq}"));
        let parsed = handler.parse(msg.subject.as_str(), &msg.payload);
        Some(Self {
            msg: Incoming::Durable(Box::new(msg)),
            parsed,
            seq,
            key,
            since: Since::Stored(published),
        })
    }

    /// A core message as a job.
    pub(super) fn core(msg: async_nats::Message, seq: u64, key: String, handler: &Handler) -> Self {
        let parsed = handler.parse(msg.subject.as_str(), &msg.payload);
        Self {
            msg: Incoming::Core(msg),
            parsed,
            seq,
            key,
            since: Since::Received(Instant::now()),
        }
    }

    pub(super) fn subject(&self) -> &str {
        match &self.msg {
            Incoming::Durable(m) => m.subject.as_str(),
            Incoming::Core(m) => m.subject.as_str(),
        }
    }

    fn payload(&self) -> &[u8] {
        match &self.msg {
            Incoming::Durable(m) => &m.payload,
            Incoming::Core(m) => &m.payload,
        }
    }

    pub(super) fn delivery(&self) -> Delivery<'_> {
        Delivery {
            subject: self.subject(),
            payload_len: self.payload().len(),
            parsed: &self.parsed,
            seq: self.seq,
            age: match self.since {
                Since::Stored(at) => SystemTime::now().duration_since(at).unwrap_or_default(),
                Since::Received(at) => at.elapsed(),
            },
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

/// Core mode's retries: timers in this process, bounded across all workers.
#[derive(Clone)]
pub(super) struct CoreRetries {
    /// Events currently waiting on a timer.
    pub(super) held: Arc<AtomicUsize>,
    /// Beyond this many, an event that needs a retry is dropped.
    pub(super) max_held: usize,
}

/// What a core worker needs to retry: the shared bound and its own queue to come back to.
pub(super) struct CoreRetry {
    retries: CoreRetries,
    requeue: mpsc::Sender<Job>,
}

impl CoreRetry {
    /// Puts `job` back on this worker's queue after `delay`, unless too many are held.
    pub(super) fn hold(&self, job: Job, delay: Duration) {
        let held = &self.retries.held;
        if held.fetch_add(1, AtomicOrdering::SeqCst) >= self.retries.max_held {
            held.fetch_sub(1, AtomicOrdering::SeqCst);
            tracing::warn!(subject = %job.subject(), held = self.retries.max_held, "bridge: core retry queue full; event dropped");
            return;
        }
        let (queue, held) = (self.requeue.clone(), held.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // Fails only once the worker stopped (shutdown): the event is dropped with it.
            let _ = queue.send(job).await;
            held.fetch_sub(1, AtomicOrdering::SeqCst);
        });
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
    workers: Vec<Worker>,
    /// Where the next message without an execution goes first.
    next_any: usize,
    /// Cancelled by [`Pool::stop`], after the reader stopped reading.
    stop: CancellationToken,
    core: Option<CoreRetries>,
}

impl Pool {
    pub(super) fn start(
        handler: Arc<Handler>,
        concurrency: usize,
        core: Option<CoreRetries>,
    ) -> Self {
        let mut pool = Self {
            handler,
            workers: Vec::with_capacity(concurrency),
            next_any: 0,
            stop: CancellationToken::new(),
            core,
        };
        for _ in 0..concurrency {
            let w = pool.spawn_worker();
            pool.workers.push(w);
        }
        pool
    }

    fn spawn_worker(&self) -> Worker {
        let (queue, rx) = mpsc::channel(WORKER_QUEUE);
        let retry = self.core.clone().map(|retries| CoreRetry {
            retries,
            requeue: queue.clone(),
        });
        let task = tokio::spawn(run_worker(
            self.handler.clone(),
            rx,
            retry,
            self.stop.clone(),
        ));
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
        let waiting_retries = self.core.map_or(0, |c| c.held.load(AtomicOrdering::SeqCst));
        // Given back = NAKed for redelivery (durable) or dropped (core).
        tracing::info!(
            queued_unhandled = given_back,
            dropped_retries = waiting_retries,
            "bridge stopped"
        );
    }
}

/// One worker: handles its queue in order until the pool stops, then gives back what is
/// still queued. Its [`OrderGuard`] sees every event of its executions (they all hash
/// here), so it is as good as a guard shared by the whole replica.
async fn run_worker(
    handler: Arc<Handler>,
    mut rx: mpsc::Receiver<Job>,
    retry: Option<CoreRetry>,
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
        handler.process(job, &mut guard, retry.as_ref()).await;
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
