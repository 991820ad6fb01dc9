//! One event through the bridge: order guard → interest → terminal guard → the run's
//! status → frames → publish → (a failed or cancelled run's result, [`crate::settle`]) →
//! ack, NAK or hold (see the module docs of [`super`]). This file does the I/O; [`policy`]
//! decides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use gateway_shared::frames::{event, notification, PlaybookState};
use gateway_shared::ids::ExecutionId;

use super::policy::{
    self, ForwardList, OrderGuard, Parsed, Resolution, RetryLimits, RetryReason, RetryVerdict,
    StatusCheck,
};
use super::pool::Job;
use super::BridgeConfig;
use crate::bus::Bus;
use crate::interest;
use crate::noetl::NoetlClient;
use crate::scrub::Scrubber;
use crate::settle::{SettleError, Settler};
use crate::store::{Bucket, KvStore};

/// One message as the handler sees it, whichever mode delivered it.
pub(super) struct Delivery<'a> {
    pub(super) subject: &'a str,
    pub(super) payload_len: usize,
    /// What the reader made of the payload.
    pub(super) parsed: &'a Result<Parsed, policy::Malformed>,
    /// Increasing per execution in delivery order (stream sequence, or a local counter).
    pub(super) seq: u64,
    /// Since NATS stored it (durable) or this replica received it (core).
    pub(super) age: Duration,
    /// The event's identity when the payload has no `event_id`.
    pub(super) fallback_key: &'a str,
}

/// What to do with the message (or, for the HTTP fallback, with the record's event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Ack: forwarded, ignored, malformed or dropped.
    Done,
    /// Try again after [`policy::retry_delay`].
    Retry(RetryReason),
}

/// Everything one event needs; shared by the reader (parsing) and the workers.
pub(super) struct Handler {
    kv: Arc<dyn KvStore>,
    bus: Arc<dyn Bus>,
    noetl: NoetlClient,
    prefix: String,
    forward: ForwardList,
    limits: RetryLimits,
    retry_delay: Duration,
    settle: Settler,
}

impl Handler {
    /// The handler for `config`.
    pub(super) fn new(
        kv: Arc<dyn KvStore>,
        bus: Arc<dyn Bus>,
        noetl: NoetlClient,
        scrubber: Scrubber,
        config: &BridgeConfig,
    ) -> Self {
        Self {
            settle: Settler::new(kv.clone(), bus.clone(), noetl.clone(), scrubber),
            kv,
            bus,
            noetl,
            prefix: config.prefix().to_owned(),
            forward: ForwardList::new(&config.forward),
            limits: RetryLimits {
                max_interest_wait: config.max_interest_wait,
                max_confirm_wait: config.max_confirm_wait,
            },
            retry_delay: config.retry_delay,
        }
    }

    pub(super) fn parse(&self, subject: &str, payload: &[u8]) -> Result<Parsed, policy::Malformed> {
        policy::parse_event(subject, payload, &self.prefix, &self.forward)
    }

    /// Handles one job, then acks or NAKs it.
    pub(super) async fn process(&self, job: Job, guard: &mut OrderGuard) {
        let outcome = self.handle(&job.delivery(), guard).await;
        let msg = &job.msg;
        let acked = match outcome {
            Outcome::Done => msg.ack().await,
            Outcome::Retry(reason) => {
                crate::metrics::global().bridge_naks.inc();
                let delay = policy::retry_delay(reason, self.retry_delay);
                msg.ack_with(AckKind::Nak(Some(delay))).await
            }
        };
        if let Err(e) = acked {
            tracing::warn!(subject = %msg.subject, error = %e, "bridge: ack failed; the event comes back after ack_wait");
        }
    }

    /// One event the HTTP fallback read from NoETL's execution record (`poll`): the same
    /// path as an event from NATS. `key` identifies it when it has no `event_id`; `age` is
    /// how long the fallback has been trying to deliver it.
    pub(super) async fn deliver_polled(
        &self,
        ev: &policy::ExecutionEvent,
        key: &str,
        age: Duration,
    ) -> Outcome {
        self.deliver(ev, key, age).await
    }

    /// Shutdown: an event this replica will not handle. NAKed so another replica gets it
    /// now — or, when an earlier event of its execution is waiting for a redelivery (per
    /// `guard`; with no guard, always), after a delay longer than any retry's, so it comes
    /// back behind that one. Never acked.
    pub(super) async fn give_back(&self, job: Job, guard: Option<&mut OrderGuard>) {
        let msg = &job.msg;
        let behind = policy::give_back_delay(self.retry_delay);
        let delay = match (&job.parsed, guard) {
            (Ok(Parsed::Forward(ev)), Some(guard)) => {
                let now = Instant::now();
                guard.must_wait(&ev.execution_id, job.seq, now).then(|| {
                    guard.park(&ev.execution_id, job.seq, now + behind);
                    behind
                })
            }
            (Ok(Parsed::Forward(_)), None) => Some(behind),
            _ => None,
        };
        if let Err(e) = msg.ack_with(AckKind::Nak(delay)).await {
            tracing::warn!(subject = %msg.subject, error = %e, "bridge: NAK at shutdown failed; the event comes back after ack_wait");
        }
    }

    /// Keep order, deliver; parks or releases the event in `guard`.
    async fn handle(&self, d: &Delivery<'_>, guard: &mut OrderGuard) -> Outcome {
        let ev = match d.parsed {
            Ok(Parsed::Forward(ev)) => ev,
            Ok(Parsed::Ignored { .. }) => {
                crate::metrics::global().bridge_event("ignored");
                return Outcome::Done;
            }
            Err(e) => {
                tracing::warn!(subject = %d.subject, bytes = d.payload_len, error = %e, "bridge: malformed NoETL event skipped");
                crate::metrics::global().bridge_event("failed");
                return Outcome::Done;
            }
        };
        let outcome = if guard.must_wait(&ev.execution_id, d.seq, Instant::now()) {
            Outcome::Retry(RetryReason::WaitingBehind)
        } else {
            self.deliver(ev, d.fallback_key, d.age).await
        };
        match outcome {
            Outcome::Retry(reason) => {
                let overdue = policy::overdue_after(reason, self.retry_delay);
                guard.park(&ev.execution_id, d.seq, Instant::now() + overdue);
            }
            Outcome::Done => guard.release(&ev.execution_id, d.seq),
        }
        outcome
    }

    /// Interest → terminal guard → status → frames → publish. `fallback_key` names the
    /// event when it has no `event_id`; `age` is since NATS stored it (or since the HTTP
    /// fallback first tried it).
    async fn deliver(
        &self,
        ev: &policy::ExecutionEvent,
        fallback_key: &str,
        age: Duration,
    ) -> Outcome {
        let id = ev.execution_id.as_str();
        // Someone must be interested (their watch reached the bus before the record was
        // written, `interest::follow`); the frame then goes to the run, for every watcher.
        match interest::interested_clients(&*self.kv, &ev.execution_id).await {
            Ok(c) if c.is_empty() => {
                return self.retry_or_drop(RetryReason::NoInterest, age, ev);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: interest lookup failed");
                return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
            }
        }
        let event_key = ev.event_id.as_deref().unwrap_or(fallback_key);
        match self
            .kv
            .get(Bucket::Interest, &policy::terminal_key(&ev.execution_id))
            .await
        {
            Ok(owner)
                if policy::skipped_after_terminal(owner.as_deref(), event_key, &ev.event_type) =>
            {
                crate::metrics::global().bridge_event("duplicate");
                return self.after_terminal(ev, event_key, age).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: terminal marker lookup failed");
                return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
            }
        }

        if let Some(key) = policy::exit_failure_key(ev) {
            match self.kv.get(Bucket::Interest, &key).await {
                Ok(Some(_)) => {
                    tracing::debug!(execution_id = %id, "bridge: a failed step's step.exit skipped");
                    crate::metrics::global().bridge_event("duplicate");
                    return Outcome::Done;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(execution_id = %id, error = %e, "bridge: step failure marker lookup failed");
                    return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
                }
            }
        }
        let check = if policy::needs_status(&ev.event_type) {
            self.status(id).await
        } else {
            StatusCheck::NotNeeded
        };
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let frames = match policy::resolve(ev, check, &now) {
            Resolution::Frames(f) => *f,
            Resolution::WaitForStatus => {
                let reason = policy::wait_reason(check);
                match policy::retry_verdict(reason, age, &self.limits) {
                    RetryVerdict::Retry => return Outcome::Retry(reason),
                    RetryVerdict::Drop => return Outcome::Done,
                    RetryVerdict::UseEventClaim => {
                        tracing::warn!(execution_id = %id, event_type = %ev.event_type, ?reason, "bridge: run status not confirmed in time; forwarding what the event claims");
                        match policy::resolve(ev, StatusCheck::GaveUp, &now) {
                            Resolution::Frames(f) => *f,
                            Resolution::WaitForStatus => return Outcome::Done,
                        }
                    }
                }
            }
        };

        // Claims first, publishes after: two replicas handling two terminal candidates of
        // one run (call.error and command.failed) must not both publish their step.failed.
        let terminal_claim = match &frames.terminal {
            Some(_) => match self
                .claim(&policy::terminal_key(&ev.execution_id), event_key)
                .await
            {
                Ok(won) => Some(won),
                Err(e) => {
                    tracing::warn!(execution_id = %id, error = %e, "bridge: terminal marker create failed");
                    return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
                }
            },
            None => None,
        };
        let failure_claim = match policy::failure_key(&frames) {
            Some(key) if terminal_claim != Some(false) => match self.claim(&key, event_key).await {
                Ok(won) => Some(won),
                Err(e) => {
                    tracing::warn!(execution_id = %id, error = %e, "bridge: step failure marker create failed");
                    return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
                }
            },
            _ => None,
        };
        // One playbook.started per execution: NoETL 4.x reports a start twice.
        let start = frames
            .progress
            .as_ref()
            .filter(|f| policy::is_start(&f.event_type));
        if start.is_some() {
            match self
                .claim(&policy::started_key(&ev.execution_id), event_key)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(execution_id = %id, event_type = %ev.event_type, "bridge: this run's start was already sent");
                    crate::metrics::global().bridge_event("duplicate");
                    return Outcome::Done;
                }
                Err(e) => {
                    tracing::warn!(execution_id = %id, error = %e, "bridge: start marker create failed");
                    return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
                }
            }
        }
        let plan = policy::publish_plan(&frames, terminal_claim, failure_claim);
        if plan.skipped_any {
            tracing::debug!(execution_id = %id, event_type = %ev.event_type, "bridge: another event already sent this step's failure or the terminal frame");
        }
        let published = !plan.frames.is_empty();
        for frame in plan.frames {
            if !self.publish(&ev.execution_id, frame, event_key).await {
                return self.retry_or_drop(RetryReason::BusUnavailable, age, ev);
            }
        }
        let m = crate::metrics::global();
        if published {
            m.bridge_event("handled");
            if let Some(at) = &ev.at {
                m.observe_bridge_lag(at);
            }
        } else {
            m.bridge_event("duplicate");
        }
        // The run ended FAILED or CANCELLED: its client gets its result even if no callback
        // ever comes (crate::settle; a redelivery resumes it).
        if let Some(terminal) = frames
            .terminal
            .as_ref()
            .filter(|_| terminal_claim == Some(true))
        {
            if let Err(e) = self.settle.after_terminal(&ev.execution_id, terminal).await {
                tracing::warn!(execution_id = %id, error = %e, "bridge: the result of a run that ended without one not delivered; will retry");
                let reason = match e {
                    SettleError::Store(_) => RetryReason::StoreUnavailable,
                    SettleError::Bus(_) => RetryReason::BusUnavailable,
                };
                return self.retry_or_drop(reason, age, ev);
            }
        }
        Outcome::Done
    }

    /// An event skipped because another event owns the execution's terminal frame — unless
    /// it owns its step's failure claim ([`policy::event_failure_key`]): then nobody else
    /// sends that step.failed, so it is sent now, after the terminal rather than never.
    async fn after_terminal(
        &self,
        ev: &policy::ExecutionEvent,
        event_key: &str,
        age: Duration,
    ) -> Outcome {
        let id = ev.execution_id.as_str();
        if let Some(key) = policy::event_failure_key(ev) {
            match self.kv.get(Bucket::Interest, &key).await {
                Ok(owner) if policy::owns_claim(owner.as_deref(), event_key) => {
                    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
                    if let Resolution::Frames(f) = policy::resolve(ev, StatusCheck::GaveUp, &now) {
                        if let Some(step) = &f.progress {
                            tracing::debug!(execution_id = %id, "bridge: a step failure this event claimed is sent after the terminal frame");
                            if !self.publish(&ev.execution_id, step, event_key).await {
                                return self.retry_or_drop(RetryReason::BusUnavailable, age, ev);
                            }
                        }
                    }
                    return Outcome::Done;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(execution_id = %id, error = %e, "bridge: step failure marker lookup failed");
                    return self.retry_or_drop(RetryReason::StoreUnavailable, age, ev);
                }
            }
        }
        tracing::debug!(execution_id = %id, event_type = %ev.event_type, "bridge: event after the terminal frame skipped");
        Outcome::Done
    }

    /// Retry per [`policy::retry_verdict`], or log why the event is dropped.
    fn retry_or_drop(
        &self,
        reason: RetryReason,
        age: Duration,
        ev: &policy::ExecutionEvent,
    ) -> Outcome {
        match policy::retry_verdict(reason, age, &self.limits) {
            RetryVerdict::Retry => Outcome::Retry(reason),
            _ if reason == RetryReason::NoInterest => {
                tracing::debug!(execution_id = %ev.execution_id, event_type = %ev.event_type, age_ms = age.as_millis() as u64, "bridge: no client interested in time; event dropped");
                crate::metrics::global().bridge_event("ignored");
                Outcome::Done
            }
            _ => {
                tracing::warn!(execution_id = %ev.execution_id, event_type = %ev.event_type, ?reason, "bridge: retries exhausted; event dropped");
                crate::metrics::global().bridge_event("failed");
                Outcome::Done
            }
        }
    }

    /// The run's status from NoETL, classified by [`policy::status_check`].
    async fn status(&self, id: &str) -> StatusCheck {
        let reply = self.noetl.execution_status(id).await;
        let check = policy::status_check(reply.as_ref());
        match (&reply, check) {
            (Err(e), StatusCheck::GaveUp) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: NoETL cannot give this run's status; using the event's claim");
            }
            (Err(e), _) => {
                tracing::warn!(execution_id = %id, error = %e, "bridge: NoETL status unavailable; will retry");
            }
            (Ok(_), _) => {}
        }
        check
    }

    /// True if this event owns the claim `key` (the execution's terminal frame, or a step's
    /// failure): it created the marker now, or on an earlier delivery (a redelivery after a
    /// failed publish). Create-if-absent, so across replicas exactly one event owns it.
    async fn claim(&self, key: &str, event_key: &str) -> Result<bool, crate::store::StoreError> {
        let mine = Bytes::copy_from_slice(event_key.as_bytes());
        if self.kv.create(Bucket::Interest, key, mine).await? {
            return Ok(true);
        }
        let owner = self.kv.get(Bucket::Interest, key).await?;
        Ok(policy::owns_claim(owner.as_deref(), event_key))
    }

    /// Encodes `frame` once and publishes it to the run, once for every watcher
    /// (`Bus::publish_run`); false if the publish failed (a retry can fix it). Keyed by
    /// the event and the frame's type ([`policy::frame_key`]), so the same event handled
    /// again — a reader that died between publish and ack, its messages redelivered to
    /// the next — stores the frame once.
    async fn publish(
        &self,
        execution: &ExecutionId,
        frame: &PlaybookState,
        event_key: &str,
    ) -> bool {
        let data = Bytes::from(notification(event::STATE, frame));
        let key = policy::frame_key(event_key, &frame.event_type);
        match self
            .bus
            .publish_run(execution, event::STATE, data, &key)
            .await
        {
            Ok(_) => {
                tracing::debug!(execution_id = %frame.execution_id, event_type = %frame.event_type, "bridge: frame published");
                true
            }
            Err(e) => {
                tracing::warn!(execution_id = %frame.execution_id, error = %e, "bridge: publishing a frame failed; will retry");
                false
            }
        }
    }
}
