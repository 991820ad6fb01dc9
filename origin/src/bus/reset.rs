//! The replay-reset rule, decided once for both buses: when a subscriber resuming with
//! `Last-Event-ID` must be sent `stream/reset` instead of a replay.
//!
//! A replay is only honest if it holds every frame of the client after the resume point.
//! Each bus knows two facts about that — the last id it has issued, and the highest id of
//! a frame of this client that retention may have dropped (a watermark; over-estimating
//! it costs a spurious reset, which is safe; under-estimating it would be a silent gap,
//! which is not). [`must_reset`] turns those facts into the answer; the memory bus and the
//! NATS bus only differ in how they learn the facts.

/// True if a subscription resuming after frame `after` cannot be replayed exactly and must
/// start with `stream/reset`: `after` is above `last_issued` (an id this bus never issued:
/// another bus, or an earlier process or stream), or a frame of the client above `after`
/// may have been dropped (`after` is below `dropped_up_to`, the highest id that may have
/// been; 0 when none). Retention drops a client's frames oldest first, so the highest
/// dropped id says whether any frame after `after` went.
pub(crate) fn must_reset(after: u64, last_issued: u64, dropped_up_to: u64) -> bool {
    after > last_issued || after < dropped_up_to
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_resume_resets_for_an_id_never_issued_or_a_dropped_frame_after_it() {
        assert!(
            !must_reset(0, 0, 0),
            "a fresh bus: nothing issued, nothing lost"
        );
        assert!(must_reset(1, 0, 0), "never issued");
        assert!(
            !must_reset(7, 20, 7),
            "the dropped frames are all at or below 7"
        );
        assert!(must_reset(6, 20, 7), "frame 7 came after 6 and was dropped");
        assert!(!must_reset(u64::MAX, u64::MAX, 0));
    }

    proptest! {
        /// A client's frames are `ids` (ascending, among others' ids up to `last_issued`);
        /// retention dropped its oldest `dropped`. With the exact watermark, a resume after
        /// `n` resets exactly when `n` was never issued or a dropped frame came after it:
        /// never a silent gap, never a needless reset.
        #[test]
        fn with_the_exact_watermark_a_reset_means_exactly_a_gap_or_a_foreign_id(
            ids in proptest::collection::btree_set(1u64..500, 0..40),
            dropped in 0usize..40,
            others_after in 0u64..50,
            n in 0u64..600,
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            let dropped = &ids[..dropped.min(ids.len())];
            let last_issued = ids.last().copied().unwrap_or(0) + others_after;
            let watermark = dropped.last().copied().unwrap_or(0);
            let gap = dropped.iter().any(|&id| id > n);
            prop_assert_eq!(must_reset(n, last_issued, watermark), n > last_issued || gap);
        }

        /// A watermark above the true one (what a bus knows after forgetting a client, or
        /// about a whole stream) only adds resets; it never removes one.
        #[test]
        fn an_overestimated_watermark_only_adds_resets(
            n in any::<u64>(),
            last_issued in any::<u64>(),
            exact in any::<u64>(),
            more in any::<u64>(),
        ) {
            let over = exact.saturating_add(more);
            prop_assert!(!must_reset(n, last_issued, exact) || must_reset(n, last_issued, over));
        }
    }
}
