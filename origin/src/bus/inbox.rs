//! A subscription's inbox: frames handed to it by a publisher or router, waiting to be
//! taken by the subscription's stream. Both buses use it for live delivery.
//!
//! Unlike a channel it allocates nothing until frames arrive (an idle subscription is a
//! mutex, an empty `VecDeque` and a `Notify`), and its bound is a flag rather than a
//! preallocated ring: past `backlog` frames it drops what it holds and reports the
//! subscriber as fallen behind, which the subscription turns into an error (or, while
//! it re-reads a stream anyway, ignores).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::BusFrame;

/// Frames routed to one subscription of this process, waiting to be taken.
#[derive(Default)]
pub(crate) struct Inbox {
    slot: Mutex<Slot>,
    pub(crate) notify: Notify,
}

#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) frames: VecDeque<BusFrame>,
    /// More than the backlog of frames were routed without being taken.
    pub(crate) overflowed: bool,
    /// The router saw frames leave the stream before it delivered them: read the stream
    /// forward (checking for drops) before trusting the next routed frame.
    pub(crate) recheck: bool,
    /// The router cannot vouch for completeness any more: the subscription ends.
    pub(crate) broken: Option<String>,
}

/// What a subscription found in its inbox.
pub(crate) enum Taken {
    Frame(BusFrame),
    Overflowed,
    Recheck,
    Broken(String),
    Empty,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Inbox")
            .field("queued", &s.frames.len())
            .field("overflowed", &s.overflowed)
            .field("broken", &s.broken)
            .finish()
    }
}

impl Inbox {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame, or marks the inbox overflowed when `backlog` frames already wait.
    pub(crate) fn push(&self, frame: BusFrame, backlog: usize) {
        {
            let mut s = self.lock();
            if s.overflowed || s.broken.is_some() {
                return;
            }
            if s.frames.len() >= backlog {
                s.overflowed = true;
                s.frames = VecDeque::new();
            } else {
                s.frames.push_back(frame);
            }
        }
        self.notify.notify_one();
    }

    /// Changes the inbox's flags and wakes the subscription to look at them.
    pub(crate) fn flag(&self, f: impl FnOnce(&mut Slot)) {
        f(&mut self.lock());
        self.notify.notify_one();
    }

    /// While catching up, whatever was routed is read from the stream anyway: an overflow
    /// then costs nothing but the queued copies.
    /// True if it had overflowed.
    pub(crate) fn absorb_overflow(&self) -> bool {
        let mut s = self.lock();
        if s.overflowed {
            s.overflowed = false;
            s.frames = VecDeque::new();
            return true;
        }
        false
    }

    /// The next thing the subscription must handle: a failure first, then flags, then
    /// the oldest queued frame.
    pub(crate) fn take(&self) -> Taken {
        let mut s = self.lock();
        if let Some(why) = s.broken.take() {
            return Taken::Broken(why);
        }
        if s.overflowed {
            return Taken::Overflowed;
        }
        if s.recheck {
            s.recheck = false;
            // What is queued is read again from the stream, with the drop check.
            s.frames = VecDeque::new();
            return Taken::Recheck;
        }
        match s.frames.pop_front() {
            Some(f) => {
                if s.frames.is_empty() && s.frames.capacity() > 8 {
                    s.frames = VecDeque::new();
                }
                Taken::Frame(f)
            }
            None => Taken::Empty,
        }
    }
}
