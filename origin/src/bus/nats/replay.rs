//! A subscription's reads of the stream: where it starts (and whether it must begin with
//! `stream/reset`, per [`must_reset`]), the catch-up that reads forward before routed
//! frames are trusted, and the checks that no frame owed was dropped in between.

use super::super::inbox::Taken;
use super::super::reset::must_reset;
use super::super::{BusError, BusFrame, StartAt};
use super::router::Registration;
use super::stream::limit;
use super::{unavailable, EVENT_HEADER};
use async_nats::jetstream::stream::{self as js, RawMessageErrorKind};
use futures::StreamExt;
use std::collections::VecDeque;

/// How many frames a catch-up reads before checking, once for all of them, that none was
/// dropped in between — so a long replay costs about one read per frame, not two.
const READ_AHEAD: usize = 32;

/// What the reset rule needs to know about the stream and the client's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamFacts {
    first_seq: u64,
    last_seq: u64,
    /// The stream's per-subject limit as stored (-1: none).
    max_per_subject: i64,
    /// Frames the client's subject holds now.
    subject_frames: u64,
}

/// The highest id of the client's that may have left the stream as a whole: everything
/// below the stream's first sequence went, and some of it may have been this client's
/// (frames leave a limits stream oldest first).
fn stream_dropped_up_to(facts: &StreamFacts) -> u64 {
    facts.first_seq.saturating_sub(1)
}

/// The per-subject limit may have dropped a frame of the client above `n`, given that the
/// first retained one above `n` is `first_after`. Only a full subject drops, and only its
/// oldest frames: a retained frame at or below `n` (checked separately) rules it out.
fn count_limit_may_have_dropped(n: u64, facts: &StreamFacts, first_after: u64) -> bool {
    facts.max_per_subject > 0
        && facts.subject_frames >= facts.max_per_subject.unsigned_abs()
        && first_after > n.saturating_add(1)
}

/// The stream's facts for `subject`: one `STREAM.INFO` with a subject filter, which also
/// counts the subject's frames.
async fn facts<I>(stream: &js::Stream<I>, subject: &str) -> Result<StreamFacts, BusError> {
    let what = || format!("stream info for {subject}");
    let mut info = stream
        .info_with_subjects(subject)
        .await
        .map_err(|e| unavailable(what(), e))?;
    // The filter is one literal subject: the first page holds it or nothing (polling a
    // second time would request another page).
    let subject_frames = match info.next().await {
        Some(Ok((s, count))) if s == subject => count as u64,
        Some(Err(e)) => return Err(unavailable(what(), e)),
        _ => 0,
    };
    Ok(StreamFacts {
        first_seq: info.info.state.first_sequence,
        last_seq: info.info.state.last_sequence,
        max_per_subject: limit(info.info.config.max_messages_per_subject),
        subject_frames,
    })
}

/// The first frame of `subject` with id ≥ `from`, or `None` when there is none.
/// Messages not written by this bus (no `Gw-Event`) are skipped.
async fn frame_from<I>(
    stream: &js::Stream<I>,
    subject: &str,
    mut from: u64,
) -> Result<Option<BusFrame>, BusError> {
    loop {
        match stream
            .get_first_raw_message_by_subject(subject, from.max(1))
            .await
        {
            Ok(m) => match m.headers.get(EVENT_HEADER) {
                Some(event) => {
                    return Ok(Some(BusFrame {
                        id: m.sequence,
                        event: event.as_str().to_owned(),
                        data: m.payload,
                    }))
                }
                None => {
                    tracing::warn!(
                        subject,
                        seq = m.sequence,
                        "message without {EVENT_HEADER} on a frames subject; skipped"
                    );
                    from = m.sequence.saturating_add(1);
                }
            },
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(unavailable(format!("read {subject} from {from}"), e)),
        }
    }
}

/// True if a frame at or below `n` is still retained on `subject`: retention drops a
/// client's frames oldest first, so then none above `n` has been dropped.
async fn retains_one_at_or_below<I>(
    stream: &js::Stream<I>,
    subject: &str,
    n: u64,
) -> Result<bool, BusError> {
    Ok(matches!(frame_from(stream, subject, 1).await?, Some(oldest) if oldest.id <= n))
}

/// True if no frame of `subject` in (`last`, `found`) can have been dropped while owed to
/// a subscriber; called after `found` (the first retained frame above `last`) was read.
/// Only the per-subject limit is considered: for age to drop a frame a live subscriber is
/// owed, the subscriber would have to be `max_age` behind (see the module docs).
async fn nothing_dropped_between<I>(
    stream: &js::Stream<I>,
    subject: &str,
    last: u64,
    found: u64,
) -> Result<bool, BusError> {
    if found <= last.saturating_add(1) {
        return Ok(true);
    }
    let facts = facts(stream, subject).await?;
    if !count_limit_may_have_dropped(last, &facts, found) {
        return Ok(true);
    }
    retains_one_at_or_below(stream, subject, last).await
}

/// Where a subscription starts: `(reset, the id every later frame is above, the first
/// frame to deliver if already read)`.
pub(super) async fn start_point<I>(
    stream: &js::Stream<I>,
    subject: &str,
    start: StartAt,
) -> Result<(bool, u64, Option<BusFrame>), BusError> {
    if start == StartAt::Live {
        // Every frame the stream holds now is behind the start point.
        let facts = facts(stream, subject).await?;
        return Ok((false, facts.last_seq, None));
    }
    if let StartAt::After(n) = start {
        // Read first, then the facts: a frame dropped before the read shows in them.
        let first = frame_from(stream, subject, n.saturating_add(1)).await?;
        let facts = facts(stream, subject).await?;
        let mut dropped_up_to = stream_dropped_up_to(&facts);
        if let Some(f) = &first {
            // The extra read only when the stream's own facts do not decide already.
            if !must_reset(n, facts.last_seq, dropped_up_to)
                && count_limit_may_have_dropped(n, &facts, f.id)
                && !retains_one_at_or_below(stream, subject, n).await?
            {
                // The subject's oldest frames went, up to the first one still held.
                dropped_up_to = dropped_up_to.max(f.id.saturating_sub(1));
            }
        }
        let lost = must_reset(n, facts.last_seq, dropped_up_to);
        if !lost {
            return Ok((false, n, first));
        }
        let oldest = frame_from(stream, subject, 1).await?;
        let above = oldest
            .as_ref()
            .map_or(facts.last_seq, |o| o.id.saturating_sub(1));
        return Ok((true, above, oldest));
    }
    // Everything retained now is owed; what was dropped before now is not.
    let oldest = frame_from(stream, subject, 1).await?;
    let above = oldest.as_ref().map_or(0, |o| o.id.saturating_sub(1));
    Ok((false, above, oldest))
}

/// One subscription's state: its place in the router, the stream to read, and how far
/// the client has got.
pub(super) struct Feed {
    reg: Registration,
    stream: js::Stream<()>,
    subject: String,
    /// Every frame above this is owed to the client: the highest id yielded, or the start
    /// point before anything was.
    last: u64,
    /// Frames read and checked, waiting to be yielded (ascending, all above `last`).
    ready: VecDeque<BusFrame>,
    /// Read the stream forward before taking routed frames.
    catching_up: bool,
    /// Look every routed frame up in the stream before yielding it (an existing stream
    /// with wider subjects, where the router cannot see holes).
    verify_each: bool,
    done: bool,
}

fn fell_behind(last: u64) -> BusError {
    BusError::Unavailable(format!(
        "NATS bus subscriber fell behind retention: frames after {last} may have been dropped"
    ))
}

impl Feed {
    /// A subscription's feed from its start point: `last` is what every later frame is
    /// above, `first` the first frame to deliver if [`start_point`] already read it.
    /// `verify_each` for a stream with wider subjects, where the router cannot see holes.
    pub(super) fn new(
        reg: Registration,
        stream: js::Stream<()>,
        subject: String,
        last: u64,
        first: Option<BusFrame>,
        verify_each: bool,
    ) -> Self {
        Self {
            reg,
            stream,
            subject,
            last,
            // Nothing after the start point when it was read: later frames come routed.
            catching_up: first.is_some(),
            ready: first.into_iter().collect(),
            verify_each,
            done: false,
        }
    }

    fn fail(&mut self, err: BusError) -> Option<Result<BusFrame, BusError>> {
        tracing::warn!(subject = %self.subject, last = self.last, error = %err, "NATS bus subscription ends");
        self.done = true;
        Some(Err(err))
    }

    /// Reads up to [`READ_AHEAD`] frames after `last` into `ready`, checking once for the
    /// whole batch that none was dropped; ends the catch-up when the stream has no more.
    async fn read_ahead(&mut self) -> Result<(), BusError> {
        let mut batch = Vec::new();
        let mut from = self.last.saturating_add(1);
        while batch.len() < READ_AHEAD {
            match frame_from(&self.stream, &self.subject, from).await? {
                Some(frame) => {
                    from = frame.id.saturating_add(1);
                    batch.push(frame);
                }
                None => {
                    self.catching_up = false;
                    break;
                }
            }
        }
        if let Some(first) = batch.first() {
            if !nothing_dropped_between(&self.stream, &self.subject, self.last, first.id).await? {
                return Err(fell_behind(self.last));
            }
        }
        crate::metrics::global()
            .sse_replayed
            .inc_by(batch.len() as u64);
        self.ready.extend(batch);
        Ok(())
    }

    /// Routed frame `id` (above `last`) arrived in verify mode: queue the stream's first
    /// frame after `last` — `id` itself unless one before it was missed, then catch up.
    async fn verify(&mut self, id: u64) -> Result<(), BusError> {
        match frame_from(&self.stream, &self.subject, self.last.saturating_add(1)).await? {
            Some(found) if found.id <= id => {
                if !nothing_dropped_between(&self.stream, &self.subject, self.last, found.id)
                    .await?
                {
                    return Err(fell_behind(self.last));
                }
                if found.id < id {
                    self.catching_up = true;
                }
                self.ready.push_back(found);
                Ok(())
            }
            // `id` itself is no longer retained.
            _ => Err(fell_behind(self.last)),
        }
    }

    pub(super) async fn next(&mut self) -> Option<Result<BusFrame, BusError>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(frame) = self.ready.pop_front() {
                self.last = frame.id;
                return Some(Ok(frame));
            }
            if self.catching_up {
                // Before the reads: what they return covers every frame routed until now.
                self.reg.inbox.absorb_overflow();
                // Boxed: the reads' futures are large, and an idle subscription (waiting on
                // its inbox below) should not carry their size.
                if let Err(e) = Box::pin(self.read_ahead()).await {
                    return self.fail(e);
                }
                continue;
            }
            match self.reg.inbox.take() {
                Taken::Frame(f) if f.id <= self.last => {}
                Taken::Frame(f) if self.verify_each => {
                    if let Err(e) = Box::pin(self.verify(f.id)).await {
                        return self.fail(e);
                    }
                }
                Taken::Frame(f) => self.ready.push_back(f),
                Taken::Recheck => self.catching_up = true,
                Taken::Overflowed => return self.fail(BusError::Lagged),
                Taken::Broken(why) => return self.fail(BusError::Unavailable(why)),
                Taken::Empty => self.reg.inbox.notify.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(first_seq: u64, last_seq: u64, max: i64, frames: u64) -> StreamFacts {
        StreamFacts {
            first_seq,
            last_seq,
            max_per_subject: max,
            subject_frames: frames,
        }
    }

    /// The stream's own facts through the shared rule.
    fn outside_the_stream(n: u64, f: &StreamFacts) -> bool {
        must_reset(n, f.last_seq, stream_dropped_up_to(f))
    }

    #[test]
    fn an_id_above_the_last_sequence_or_below_the_first_is_outside_the_stream() {
        let f = facts(10, 20, 5, 1);
        assert!(outside_the_stream(21, &f), "never issued here");
        assert!(!outside_the_stream(20, &f));
        assert!(!outside_the_stream(9, &f), "9 + 1 is the first retained");
        assert!(outside_the_stream(8, &f), "9 left the stream");
        // A fresh stream: nothing issued, nothing lost.
        assert!(!outside_the_stream(0, &facts(0, 0, 5, 0)));
        assert!(outside_the_stream(1, &facts(0, 0, 5, 0)));
        // Everything expired: first = last + 1.
        assert!(!outside_the_stream(20, &facts(21, 20, 5, 0)));
        assert!(outside_the_stream(19, &facts(21, 20, 5, 0)));
        assert!(!outside_the_stream(u64::MAX, &facts(0, u64::MAX, 5, 0)));
    }

    #[test]
    fn the_count_limit_matters_only_when_full_and_with_a_hole_after_n() {
        assert!(count_limit_may_have_dropped(3, &facts(1, 50, 5, 5), 7));
        assert!(
            !count_limit_may_have_dropped(3, &facts(1, 50, 5, 5), 4),
            "no hole"
        );
        assert!(
            !count_limit_may_have_dropped(3, &facts(1, 50, 5, 4), 7),
            "not full"
        );
        assert!(
            !count_limit_may_have_dropped(3, &facts(1, 50, -1, 900), 7),
            "no limit"
        );
    }
}
