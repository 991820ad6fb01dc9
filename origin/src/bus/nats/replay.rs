//! A subscription's reads of the stream: where it starts (and whether it must begin with
//! `stream/reset`, per [`must_reset`]), the catch-up that reads forward before routed
//! frames are trusted, and the checks that no frame owed was dropped in between.

use super::super::inbox::Taken;
use super::super::reset::must_reset;
use super::super::{BusError, BusFrame, StartAt, WATCH_EVENT};
use super::reader::{At, Reader};
use super::router::Registration;
use super::stream::limit;
use super::{unavailable, EVENT_HEADER};
use futures::StreamExt;
use gateway_shared::ids::ExecutionId;
use std::collections::VecDeque;
use std::sync::Arc;

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
async fn facts(reader: &Reader, subject: &str) -> Result<StreamFacts, BusError> {
    let what = || format!("stream info for {subject}");
    let mut info = reader
        .stream
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
    reader.note(&info.info);
    Ok(StreamFacts {
        first_seq: info.info.state.first_sequence,
        last_seq: info.info.state.last_sequence,
        max_per_subject: limit(info.info.config.max_messages_per_subject),
        subject_frames,
    })
}

/// The first frame of `subject` with id ≥ `from`, or `None` when there is none.
/// Messages not written by this bus (no `Gw-Event`) are skipped.
async fn frame_from(
    reader: &Reader,
    subject: &str,
    mut from: u64,
) -> Result<Option<BusFrame>, BusError> {
    while let Some(m) = reader.first_from(subject, from).await? {
        match m.headers.get(EVENT_HEADER) {
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
        }
    }
    Ok(None)
}

/// True if a frame at or below `n` is still retained on `subject`: retention drops a
/// client's frames oldest first, so then none above `n` has been dropped.
async fn retains_one_at_or_below(reader: &Reader, subject: &str, n: u64) -> Result<bool, BusError> {
    Ok(matches!(frame_from(reader, subject, 1).await?, Some(oldest) if oldest.id <= n))
}

/// True if no frame of `subject` in (`last`, `found`) can have been dropped while owed to
/// a subscriber; called after `found` (the first retained frame above `last`) was read.
/// Only the per-subject limit is considered: for age to drop a frame a live subscriber is
/// owed, the subscriber would have to be `max_age` behind (see the module docs).
async fn nothing_dropped_between(
    reader: &Reader,
    subject: &str,
    last: u64,
    found: u64,
) -> Result<bool, BusError> {
    if found <= last.saturating_add(1) {
        return Ok(true);
    }
    let facts = facts(reader, subject).await?;
    if !count_limit_may_have_dropped(last, &facts, found) {
        return Ok(true);
    }
    retains_one_at_or_below(reader, subject, last).await
}

/// One subject a subscription reads: the client's own, or a watched run's.
pub(super) struct Source {
    subject: String,
    /// Frames of this subject above this are owed and not read yet.
    cursor: u64,
    /// Skip the drop check before the next read: a `Retained` start, a reset or a new
    /// watch owes what is retained, not what may have been before it.
    trust_next: bool,
    /// Frames read and checked, ascending, all above `cursor` when read.
    queued: VecDeque<BusFrame>,
    /// Read up to the catch-up's mark: nothing more of it to read this round.
    done: bool,
}

impl Source {
    fn new(subject: String, cursor: u64, trust_next: bool) -> Self {
        Self {
            subject,
            cursor,
            trust_next,
            queued: VecDeque::new(),
            done: false,
        }
    }

    /// The client's own subject: the only one a `gw/watch` control frame can be on.
    fn is_clients(&self) -> bool {
        self.subject.starts_with(super::FRAMES_PREFIX)
    }
}

/// The stream's last sequence now: what a catch-up over several subjects reads up to
/// (every frame stored after it is routed, since the registration came first).
async fn high_water(reader: &Reader) -> Result<u64, BusError> {
    let info = reader
        .stream
        .get_info()
        .await
        .map_err(|e| unavailable("stream info", e))?;
    reader.note(&info);
    Ok(info.state.last_sequence)
}

/// True if the run's subject may have dropped a frame above `n` (the per-subject limit;
/// the stream-wide rule is decided on the client's subject). Also returns the first frame
/// above `n`, so the feed need not read it again.
async fn run_dropped_after(
    reader: &Reader,
    subject: &str,
    n: u64,
) -> Result<(bool, Option<BusFrame>), BusError> {
    let first = frame_from(reader, subject, n.saturating_add(1)).await?;
    let Some(f) = &first else {
        return Ok((false, first));
    };
    let dropped = !nothing_dropped_between(reader, subject, n, f.id).await?;
    Ok((dropped, first))
}

impl Source {
    /// A source whose first frame above `cursor` was read already (`None`: there was none
    /// when read, after the subscription registered — so any later one is routed).
    fn seeded(subject: String, cursor: u64, first: Option<BusFrame>) -> Self {
        let mut source = Self::new(subject, cursor, false);
        match first {
            Some(f) => {
                source.cursor = f.id;
                source.queued.push_back(f);
            }
            None => source.done = true,
        }
        source
    }
}

/// The start point of a subscription with nothing to read: every frame of the client and of
/// its `runs` above `after` the stream may hold will be routed to it (the router's `Seen`
/// index said so after the subscription registered). The state reads that found nothing
/// leave, every source done: a recheck reads them all from `after`, with the drop check.
pub(super) fn nothing_to_read(
    subject: &str,
    runs: &[String],
    after: u64,
) -> (bool, u64, Vec<Source>, Option<u64>) {
    let sources = std::iter::once(subject)
        .chain(runs.iter().map(String::as_str))
        .map(|s| Source::seeded(s.to_owned(), after, None))
        .collect();
    (false, after, sources, None)
}

/// The start point of a resume after `after` for which the router's index names, per
/// subject (`subject`, then `runs`), the one frame above `after` it may hold (`frames`,
/// [`super::router::Router::sole_frames_above`]): each named frame is read by its sequence
/// and every source is then done — every later frame is routed. A named frame on another
/// subject (a slot shared) means none of this one's. Nothing owed can have been dropped
/// (each frame above `after` is found), so there is no reset. `None` when a named frame is
/// gone, or is not one this bus wrote: the caller reads the stream as usual then.
pub(super) async fn sole_frames(
    reader: &Reader,
    subject: &str,
    runs: &[String],
    frames: &[Option<u64>],
    after: u64,
) -> Result<Option<(bool, u64, Vec<Source>, Option<u64>)>, BusError> {
    let subjects: Vec<&str> = std::iter::once(subject)
        .chain(runs.iter().map(String::as_str))
        .collect();
    let reads = subjects.iter().zip(frames).map(|(&s, &seq)| async move {
        let Some(seq) = seq else {
            return Ok(Some(None));
        };
        Ok::<_, BusError>(match reader.at(s, seq).await? {
            // The slot's one frame above `after` is another subject's: none of this one's.
            At::Other => Some(None),
            At::Gone => None,
            At::Found(m) => m.headers.get(EVENT_HEADER).map(|event| {
                Some(BusFrame {
                    id: m.sequence,
                    event: event.as_str().to_owned(),
                    data: m.payload,
                })
            }),
        })
    });
    let mut mark = after;
    let mut sources = Vec::with_capacity(frames.len());
    let read = futures::future::try_join_all(reads).await?;
    for (s, read) in subjects.into_iter().zip(read) {
        let Some(first) = read else {
            return Ok(None);
        };
        mark = mark.max(first.as_ref().map_or(0, |f| f.id));
        let mut source = Source::seeded(s.to_owned(), after, first);
        source.done = true;
        sources.push(source);
    }
    // Up to the highest frame read: what is routed above it is owed, and handled after.
    Ok(Some((false, after, sources, Some(mark))))
}

/// Where a subscription starts: `(reset, the id every later frame is above, the sources
/// to read, the catch-up's mark)`. `subject` is the client's, `runs` the watched runs'
/// subjects. The mark is `u64::MAX` ("to the end") with one source, or the stream's last
/// sequence when a catch-up merges several; `None` when there is nothing to read.
pub(super) async fn start_point(
    reader: &Reader,
    subject: &str,
    runs: &[String],
    start: StartAt,
) -> Result<(bool, u64, Vec<Source>, Option<u64>), BusError> {
    let mut sources = Vec::with_capacity(1 + runs.len());
    let (reset, last, stream_last) = match start {
        StartAt::Live => {
            // Every frame the stream holds now is behind the start point.
            let last = facts(reader, subject).await?.last_seq;
            sources.push(Source::new(subject.to_owned(), last, true));
            sources.extend(runs.iter().map(|r| Source::new(r.clone(), last, true)));
            return Ok((false, last, sources, None));
        }
        StartAt::After(n) => {
            // Read first, then the facts: a frame dropped before the read shows in them.
            let first = frame_from(reader, subject, n.saturating_add(1)).await?;
            let facts = facts(reader, subject).await?;
            let mut dropped_up_to = stream_dropped_up_to(&facts);
            if let Some(f) = &first {
                // The extra read only when the stream's own facts do not decide already.
                if !must_reset(n, facts.last_seq, dropped_up_to)
                    && count_limit_may_have_dropped(n, &facts, f.id)
                    && !retains_one_at_or_below(reader, subject, n).await?
                {
                    // The subject's oldest frames went, up to the first one still held.
                    dropped_up_to = dropped_up_to.max(f.id.saturating_sub(1));
                }
            }
            let mut lost = must_reset(n, facts.last_seq, dropped_up_to);
            sources.push(Source::seeded(subject.to_owned(), n, first));
            for run in runs {
                if lost {
                    break;
                }
                let (dropped, first) = run_dropped_after(reader, run, n).await?;
                lost = dropped;
                sources.push(Source::seeded(run.clone(), n, first));
            }
            if lost {
                sources.clear();
            }
            (lost, n, facts.last_seq)
        }
        // Nothing can be stored for it yet: every frame is routed (the registration came
        // first). With runs, their retained frames are owed: read like `Retained`.
        StartAt::Unseen if runs.is_empty() => {
            sources.push(Source::seeded(subject.to_owned(), 0, None));
            return Ok((false, 0, sources, None));
        }
        StartAt::Retained | StartAt::Unseen | StartAt::Since(_) => (false, 0, 0),
    };
    let mut last = last;
    if sources.is_empty() {
        // Retained, or a reset: everything retained from the client's oldest frame on
        // (what was dropped before now is not owed), and the runs' retained frames above it.
        let oldest = frame_from(reader, subject, 1).await?;
        last = match (&oldest, reset) {
            // Retained owes the runs' retained frames too, older ones included.
            (_, false) if !runs.is_empty() => 0,
            (Some(o), _) => o.id.saturating_sub(1),
            (None, true) => stream_last,
            (None, false) => 0,
        };
        sources.push(Source::seeded(subject.to_owned(), last, oldest));
        sources.extend(runs.iter().map(|r| Source::new(r.clone(), last, true)));
    }
    let mark = if sources.len() == 1 {
        // One subject: read to the end; a first read that found nothing means any later
        // frame is routed (the registration came first).
        (!sources[0].done).then_some(u64::MAX)
    } else {
        // Several: read each up to one mark, taken before their reads — except the
        // client's first read, which may have come before it: read that one again.
        sources[0].done = false;
        Some(match start {
            StartAt::After(_) => stream_last,
            _ => high_water(reader).await?,
        })
    };
    Ok((reset, last, sources, mark))
}

/// One subscription's state: its place in the router, the subjects it reads, and how far
/// the client has got.
pub(super) struct Feed {
    reg: Registration,
    /// The stream's reads, shared by every subscription.
    reader: Arc<Reader>,
    /// The client's subject first, then its runs'.
    sources: Vec<Source>,
    /// Every frame yielded is above this: the highest id yielded, or the start point.
    last: u64,
    /// While catching up: read every source up to this stream sequence (`u64::MAX`: to
    /// the end, only with one source) before trusting routed frames.
    catch_up_to: Option<u64>,
    /// Catch up to every routed frame before yielding it (an existing stream with wider
    /// subjects, where the router cannot see holes).
    verify_each: bool,
    done: bool,
}

fn fell_behind(subject: &str, last: u64) -> BusError {
    BusError::Unavailable(format!(
        "NATS bus subscriber fell behind retention: frames of {subject} after {last} may have been dropped"
    ))
}

impl Feed {
    /// A subscription's feed from its start point ([`start_point`]'s answer).
    /// `verify_each` for a stream with wider subjects, where the router cannot see holes.
    pub(super) fn new(
        reg: Registration,
        reader: Arc<Reader>,
        last: u64,
        sources: Vec<Source>,
        catch_up_to: Option<u64>,
        verify_each: bool,
    ) -> Self {
        Self {
            reg,
            reader,
            sources,
            last,
            catch_up_to,
            verify_each,
            done: false,
        }
    }

    fn fail(&mut self, err: BusError) -> Option<Result<BusFrame, BusError>> {
        let subject = self.sources.first().map_or("", |s| s.subject.as_str());
        tracing::warn!(subject, last = self.last, error = %err, "NATS bus subscription ends");
        self.done = true;
        Some(Err(err))
    }

    /// Adds a source for every run the router has this subscription watching that it does
    /// not read yet (watches added by `gw/watch` frames it did not see, e.g. cleared with
    /// a recheck); their frames above `last` are read, none is owed from before.
    fn sync_sources(&mut self) {
        for run in self.reg.watching() {
            let subject = super::runs_subject(&run);
            if !self.sources.iter().any(|s| s.subject == subject) {
                self.sources.push(Source::new(subject, self.last, true));
            }
        }
    }

    /// Starts a catch-up to the stream's current end (a recheck, an overflow while
    /// catching up, a routed frame in verify mode): every source is read again from its
    /// cursor.
    async fn restart_catch_up(&mut self, to: Option<u64>) -> Result<(), BusError> {
        self.sync_sources();
        let high = match to {
            Some(h) => h,
            None if self.sources.len() == 1 => u64::MAX,
            None => high_water(&self.reader).await?,
        };
        for s in &mut self.sources {
            s.done = false;
        }
        self.catch_up_to = Some(high);
        Ok(())
    }

    /// Reads up to [`READ_AHEAD`] frames of source `i` after its cursor (up to `high`)
    /// into its queue, checking once for the whole batch that none was dropped.
    async fn read_ahead(&mut self, i: usize, high: u64) -> Result<(), BusError> {
        let source = &self.sources[i];
        let mut batch = Vec::new();
        let mut from = source.cursor.saturating_add(1);
        let mut done = false;
        while batch.len() < READ_AHEAD {
            match frame_from(&self.reader, &source.subject, from).await? {
                Some(frame) if frame.id <= high => {
                    from = frame.id.saturating_add(1);
                    batch.push(frame);
                }
                // Above the mark: routed (the registration came first).
                Some(_) | None => {
                    done = true;
                    break;
                }
            }
        }
        if let Some(first) = batch.first() {
            if !source.trust_next
                && !nothing_dropped_between(&self.reader, &source.subject, source.cursor, first.id)
                    .await?
            {
                return Err(fell_behind(&source.subject, source.cursor));
            }
        }
        crate::metrics::global()
            .sse_replayed
            .inc_by(batch.len() as u64);
        let source = &mut self.sources[i];
        source.trust_next = false;
        if let Some(last) = batch.last() {
            source.cursor = last.id;
        }
        source.done = done;
        source.queued.extend(batch);
        Ok(())
    }

    /// One step of a catch-up: the next frame in id order over every source, `Ok(None)`
    /// when every source is read up to the mark (`catch_up_to`).
    async fn catch_up_step(&mut self) -> Result<Option<BusFrame>, BusError> {
        loop {
            let high = self.catch_up_to.unwrap_or(u64::MAX);
            for i in 0..self.sources.len() {
                let s = &mut self.sources[i];
                // Above the mark (read before it was set): routed, not read.
                while s.queued.back().is_some_and(|f| f.id > high) {
                    s.queued.pop_back();
                    s.cursor = s.cursor.min(high);
                    s.done = true;
                }
                if s.queued.is_empty() && !s.done {
                    self.read_ahead(i, high).await?;
                }
            }
            let next = (0..self.sources.len())
                .filter_map(|i| self.sources[i].queued.front().map(|f| (f.id, i)))
                .min();
            let Some((_, i)) = next else {
                return Ok(None);
            };
            let source = &mut self.sources[i];
            let frame = source.queued.pop_front().expect("the front was just seen");
            if !source.is_clients() || frame.event != WATCH_EVENT {
                return Ok(Some(frame));
            }
            // A watch added on this client's subject, met in id order: read the run too.
            // If the router had not added it to this subscription (it handled the control
            // frame before this subscription registered), the run's frames stored since
            // were routed to nobody here: read every source up to the stream's end now.
            let Some(run) = std::str::from_utf8(&frame.data)
                .ok()
                .filter(|r| ExecutionId::is_valid(r))
            else {
                continue;
            };
            let newly = self.reg.watch(run);
            let subject = super::runs_subject(run);
            if !self.sources.iter().any(|s| s.subject == subject) {
                self.sources.push(Source::new(subject, self.last, true));
                let mark = if newly || high == u64::MAX {
                    Some(high_water(&self.reader).await?)
                } else {
                    Some(high)
                };
                self.restart_catch_up(mark).await?;
            }
        }
    }

    pub(super) async fn next(&mut self) -> Option<Result<BusFrame, BusError>> {
        if self.done {
            return None;
        }
        loop {
            if self.catch_up_to.is_some() {
                // To the end (one source): the reads cover whatever was routed until now,
                // so an overflow costs nothing. Up to a mark, what was routed above it is
                // still owed: an overflow is handled once the round is read.
                if self.catch_up_to == Some(u64::MAX) {
                    self.reg.inbox.absorb_overflow();
                }
                // Boxed: the reads' futures are large, and an idle subscription (waiting
                // on its inbox below) should not carry their size.
                match Box::pin(self.catch_up_step()).await {
                    Ok(Some(frame)) if frame.id <= self.last => continue,
                    Ok(Some(frame)) => {
                        self.last = frame.id;
                        return Some(Ok(frame));
                    }
                    Ok(None) => {
                        self.catch_up_to = None;
                        if self.reg.inbox.absorb_overflow() {
                            // Frames routed above the mark were dropped: read again, to
                            // the end of the stream now.
                            if let Err(e) = Box::pin(self.restart_catch_up(None)).await {
                                return self.fail(e);
                            }
                        }
                        continue;
                    }
                    Err(e) => return self.fail(e),
                }
            }
            match self.reg.inbox.take() {
                Taken::Frame(f) if f.id <= self.last => {}
                // A guard: the router handles control frames itself and does not route them
                // (`router`), and none may ever reach a browser.
                Taken::Frame(f) if f.event == WATCH_EVENT => {}
                Taken::Frame(f) if self.verify_each => {
                    // Read every source up to it: what the router cannot vouch for.
                    if let Err(e) = Box::pin(self.restart_catch_up(Some(f.id))).await {
                        return self.fail(e);
                    }
                }
                Taken::Frame(f) => {
                    self.last = f.id;
                    return Some(Ok(f));
                }
                Taken::Recheck => {
                    if let Err(e) = Box::pin(self.restart_catch_up(None)).await {
                        return self.fail(e);
                    }
                }
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
