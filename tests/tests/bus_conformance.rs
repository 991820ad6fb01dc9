//! The bus conformance suite: one set of checks, run against every [`Bus`].
//!
//! The SSE layer may run on the embedded [`MemoryBus`] or on NATS ([`NatsBus`]), and nothing
//! above the trait may tell them apart. Each check below is written once against `&dyn Bus`
//! and instantiated by [`conformance!`] for both buses — `memory_bus::…` and `nats_bus::…` —
//! with the retention it needs: [`LONG`] when nothing should expire, [`BY_COUNT`] (5 frames
//! per client) and [`BY_AGE`] (2 s) for the retention checks. The NATS runs use a real
//! nats-server each (own port and store directory), so all tests run in parallel.
//!
//! Ids are the NATS stream sequence, shared by all clients, so checks interleave other
//! clients' frames to keep ids non-contiguous and never assume `id + 1`. Where the buses may
//! legitimately differ — a reset a bus cannot rule out, a subscriber too far behind ending
//! with an error rather than being served from a buffer — a check accepts either outcome
//! but never a gap. What only one bus has follows in `nats_only` (replicas, an existing
//! stream, lost live copies, a reconnect, losing the server) and `memory_only` (the lag
//! error).

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::ids::{ClientId, ExecutionId};
use gateway_tests::harness::nats::NatsServer;
use origin::bus::memory::MemoryBus;
use origin::bus::nats::NatsBus;
use origin::bus::{Bus, BusError, BusFrame, Retention, StartAt, Subscription};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Nothing expires during a check.
const LONG: Retention = Retention {
    max_age: Duration::from_secs(60),
    max_frames_per_client: 1000,
};

/// At most five frames per client; nothing expires by age during a check.
const BY_COUNT: Retention = Retention {
    max_age: Duration::from_secs(60),
    max_frames_per_client: 5,
};

/// Frames expire after two seconds.
const BY_AGE: Retention = Retention {
    max_age: Duration::from_secs(2),
    max_frames_per_client: 1000,
};

/// How long to wait for a frame that must come.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a NATS subscription must stay silent to count as "nothing more to deliver"
/// (the memory bus delivers synchronously, so it gets a shorter window).
const QUIET: Duration = Duration::from_millis(200);

/// A bus under test, with a way to look behind it.
struct Subject {
    bus: Arc<dyn Bus>,
    probe: Probe,
    /// How long a subscription must stay silent to count as "nothing more to deliver".
    quiet: Duration,
    /// Dropped after the bus and probe (field order), so clients go before their server.
    _server: Option<NatsServer>,
}

/// A client id the checks know to be valid.
fn cid(s: &str) -> ClientId {
    ClientId::parse(s).expect("a valid client id")
}

/// An execution id the checks know to be valid.
fn eid(s: &str) -> ExecutionId {
    ExecutionId::parse(s).expect("a valid execution id")
}

/// How a check sees whether a client still has a live subscriber.
enum Probe {
    Memory(MemoryBus),
    /// The bus's own count of the subscriptions its router feeds.
    Nats(Box<NatsBus>),
}

impl Subject {
    async fn assert_quiet(&self, sub: &mut Subscription) -> anyhow::Result<()> {
        if let Ok(item) = tokio::time::timeout(self.quiet, sub.frames.next()).await {
            bail!("expected nothing more, got {item:?}");
        }
        Ok(())
    }

    async fn has_live_subscriber(&self, _client_id: &str) -> anyhow::Result<bool> {
        match &self.probe {
            Probe::Memory(bus) => Ok(bus.stats().live_subscribers > 0),
            Probe::Nats(bus) => Ok(bus.live_subscribers() > 0),
        }
    }
}

async fn memory_subject(retention: Retention) -> anyhow::Result<Subject> {
    let bus = MemoryBus::new(retention);
    Ok(Subject {
        bus: Arc::new(bus.clone()),
        probe: Probe::Memory(bus),
        quiet: Duration::from_millis(50),
        _server: None,
    })
}

async fn nats_subject(retention: Retention) -> anyhow::Result<Subject> {
    let server = NatsServer::start().await?;
    let bus = NatsBus::open(async_nats::connect(&server.url).await?, retention, None).await?;
    ensure!(
        bus.config_mismatches().is_empty(),
        "a fresh stream cannot mismatch: {:?}",
        bus.config_mismatches()
    );
    Ok(Subject {
        bus: Arc::new(bus.clone()),
        probe: Probe::Nats(Box::new(bus)),
        quiet: QUIET,
        _server: Some(server),
    })
}

/// Instantiates every check once per bus, as `#[tokio::test]`s named after the check, each
/// with the retention given next to it. Multi-threaded, so racing tasks really race.
macro_rules! conformance {
    ($($check:ident with $retention:ident),* $(,)?) => {
        mod memory_bus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let subject = super::memory_subject(super::$retention).await?;
                    super::$check(&subject).await
                }
            )*
        }
        mod nats_bus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let subject = super::nats_subject(super::$retention).await?;
                    super::$check(&subject).await
                }
            )*
        }
    };
}

conformance!(
    retained_frames_are_replayed_in_id_order_then_live_frames_follow with LONG,
    a_resume_replays_only_frames_after_its_id_without_a_reset with LONG,
    a_resume_from_the_newest_id_is_not_a_reset_and_waits_for_live_frames with LONG,
    a_live_start_replays_nothing_and_delivers_what_comes_next with LONG,
    a_new_client_subscribed_before_anyone_knows_it_gets_every_frame_from_its_first with LONG,
    an_id_the_bus_never_issued_resets_to_the_oldest_retained_frame with LONG,
    frames_beyond_the_per_client_limit_are_dropped_oldest_first_and_a_resume_before_them_resets with BY_COUNT,
    frames_older_than_max_age_are_not_replayed_and_a_resume_before_them_resets with BY_AGE,
    clients_are_isolated_even_when_one_id_is_a_prefix_of_another with LONG,
    every_subscription_to_a_client_gets_every_frame with LONG,
    publishers_racing_the_subscribe_call_cause_no_gap_and_no_duplicate with LONG,
    a_subscriber_further_behind_than_retention_gets_everything_or_an_error_never_a_gap with BY_COUNT,
    a_slow_subscriber_blocks_neither_publishers_nor_other_subscribers_and_never_skips with LONG,
    a_dropped_subscription_stops_listening_and_the_others_carry_on with LONG,
    invalid_client_ids_and_event_names_are_refused with LONG,
    frame_data_with_arbitrary_bytes_round_trips with LONG,
    the_bus_reports_itself_healthy with LONG,
    a_run_frame_reaches_every_watcher_once_and_no_one_else with LONG,
    a_watch_added_while_a_stream_is_open_delivers_the_runs_later_frames with LONG,
    a_resume_merges_the_clients_and_its_runs_frames_in_one_id_order with LONG,
    a_run_that_dropped_frames_a_resume_is_owed_resets_it with BY_COUNT,
    publishers_racing_a_watcher_subscribing_cause_no_gap_and_no_duplicate with LONG,
    a_run_keyed_twice_is_delivered_once_and_control_frames_never_reach_a_subscriber with LONG,
);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn frame(id: u64, event: &str, data: &str) -> BusFrame {
    BusFrame {
        id,
        event: event.to_owned(),
        data: b(data),
    }
}

async fn next_frame(sub: &mut Subscription) -> anyhow::Result<BusFrame> {
    match tokio::time::timeout(FRAME_TIMEOUT, sub.frames.next()).await {
        Err(_) => bail!("no frame within {FRAME_TIMEOUT:?}"),
        Ok(None) => bail!("the subscription ended"),
        Ok(Some(Err(e))) => bail!("the subscription failed: {e}"),
        Ok(Some(Ok(frame))) => Ok(frame),
    }
}

async fn next_ids(sub: &mut Subscription, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            next_frame(sub)
                .await
                .with_context(|| format!("frame {i} of {n}, after {ids:?}"))?
                .id,
        );
    }
    Ok(ids)
}

/// [`Subject::assert_quiet`] for the NATS-only tests, which have no [`Subject`].
async fn assert_quiet(sub: &mut Subscription) -> anyhow::Result<()> {
    if let Ok(item) = tokio::time::timeout(QUIET, sub.frames.next()).await {
        bail!("expected nothing more, got {item:?}");
    }
    Ok(())
}

/// Publishes one frame per client in `clients`, in turn, `rounds` times; returns the ids
/// of `clients[0]`'s frames. The others' frames keep ids non-contiguous.
async fn publish_interleaved(
    bus: &dyn Bus,
    clients: &[&str],
    rounds: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for round in 0..rounds {
        for (i, client) in clients.iter().enumerate() {
            let id = bus
                .publish(
                    &cid(client),
                    "playbook/state",
                    Bytes::from(format!("{client}-{round}")),
                )
                .await?;
            if i == 0 {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

async fn retained_frames_are_replayed_in_id_order_then_live_frames_follow(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let one = bus.publish(&cid("c1"), "playbook/state", b("one")).await?;
    bus.publish(&cid("someone-else"), "playbook/state", b("x"))
        .await?;
    let two = bus.publish(&cid("c1"), "playbook/result", b("two")).await?;
    let three = bus
        .publish(&cid("c1"), "playbook/progress", b("three"))
        .await?;
    ensure!(one < two && two < three, "ids {one} {two} {three}");

    let mut sub = bus.subscribe(&cid("c1"), StartAt::Retained).await?;
    assert!(!sub.reset);
    assert_eq!(
        next_frame(&mut sub).await?,
        frame(one, "playbook/state", "one")
    );
    assert_eq!(
        next_frame(&mut sub).await?,
        frame(two, "playbook/result", "two")
    );
    assert_eq!(
        next_frame(&mut sub).await?,
        frame(three, "playbook/progress", "three")
    );
    s.assert_quiet(&mut sub).await?;

    let four = bus.publish(&cid("c1"), "message", b("four")).await?;
    assert!(four > three);
    assert_eq!(next_frame(&mut sub).await?, frame(four, "message", "four"));
    s.assert_quiet(&mut sub).await
}

async fn a_resume_replays_only_frames_after_its_id_without_a_reset(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let ids = publish_interleaved(bus, &["c", "other"], 5).await?;
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(ids[1])).await?;
    assert!(!sub.reset);
    assert_eq!(next_ids(&mut sub, 3).await?, ids[2..]);
    s.assert_quiet(&mut sub).await?;

    // An id from another client's frame, between two of ours, is a fine resume point.
    let others = publish_interleaved(bus, &["other"], 1).await?;
    let six = bus.publish(&cid("c"), "e", b("six")).await?;
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(others[0])).await?;
    assert!(!sub.reset);
    assert_eq!(next_frame(&mut sub).await?, frame(six, "e", "six"));
    s.assert_quiet(&mut sub).await
}

async fn a_resume_from_the_newest_id_is_not_a_reset_and_waits_for_live_frames(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let ids = publish_interleaved(bus, &["c", "other"], 3).await?;
    let newest = *ids.last().expect("three rounds");
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(newest)).await?;
    assert!(!sub.reset);
    s.assert_quiet(&mut sub).await?;
    bus.publish(&cid("other"), "e", b("not for c")).await?;
    let next = bus.publish(&cid("c"), "e", b("next")).await?;
    assert_eq!(next_frame(&mut sub).await?, frame(next, "e", "next"));
    s.assert_quiet(&mut sub).await
}

async fn a_live_start_replays_nothing_and_delivers_what_comes_next(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    publish_interleaved(bus, &["c", "other"], 3).await?;
    let mut sub = bus.subscribe(&cid("c"), StartAt::Live).await?;
    assert!(
        !sub.reset,
        "the caller says reset itself; the bus owes nothing"
    );
    s.assert_quiet(&mut sub).await?;
    bus.publish(&cid("other"), "e", b("not for c")).await?;
    let next = bus.publish(&cid("c"), "e", b("next")).await?;
    assert_eq!(next_frame(&mut sub).await?, frame(next, "e", "next"));
    s.assert_quiet(&mut sub).await?;
    // A client with nothing retained starts live too.
    let mut fresh = bus.subscribe(&cid("fresh"), StartAt::Live).await?;
    let first = bus.publish(&cid("fresh"), "e", b("first")).await?;
    assert_eq!(next_frame(&mut fresh).await?, frame(first, "e", "first"));
    Ok(())
}

/// `Unseen`: the SSE handler subscribes to a client id it has just made before storing it
/// anywhere, so the bus reads nothing back; what two publishers send the moment the
/// subscription exists (a callback racing the open) all arrives, in order, once.
async fn a_new_client_subscribed_before_anyone_knows_it_gets_every_frame_from_its_first(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &s.bus;
    publish_interleaved(&**bus, &["other"], 3).await?;
    let id = origin::clients::new_id();
    let mut sub = bus.subscribe(&id, StartAt::Unseen).await?;
    assert!(!sub.reset);
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let (bus, id) = (Arc::clone(bus), id.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..20 {
                    ids.push(
                        bus.publish(&id, "e", Bytes::from(format!("p{p}-{i}")))
                            .await?,
                    );
                }
                anyhow::Ok(ids)
            })
        })
        .collect();
    let mut published = Vec::new();
    for p in publishers {
        published.extend(p.await??);
    }
    published.sort_unstable();
    assert_eq!(next_ids(&mut sub, published.len()).await?, published);
    s.assert_quiet(&mut sub).await
}

async fn an_id_the_bus_never_issued_resets_to_the_oldest_retained_frame(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    // Nothing issued yet: any id is foreign.
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(7)).await?;
    assert!(sub.reset, "nothing was ever issued");
    s.assert_quiet(&mut sub).await?;
    drop(sub);

    let ids = publish_interleaved(bus, &["c", "other"], 2).await?;
    let foreign = ids[1] + 1000;
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(foreign)).await?;
    assert!(sub.reset, "{foreign} was never issued");
    assert_eq!(
        next_ids(&mut sub, 2).await?,
        ids,
        "from the oldest retained"
    );
    s.assert_quiet(&mut sub).await?;
    let live = bus.publish(&cid("c"), "e", b("live")).await?;
    assert_eq!(next_frame(&mut sub).await?, frame(live, "e", "live"));
    Ok(())
}

async fn frames_beyond_the_per_client_limit_are_dropped_oldest_first_and_a_resume_before_them_resets(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    // p[0..8] for "c"; "other" gets as many, and keeps its own five.
    let p = publish_interleaved(bus, &["c", "other"], 8).await?;
    let kept = &p[3..];

    let mut all = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    assert!(!all.reset);
    assert_eq!(next_ids(&mut all, 5).await?, kept);
    s.assert_quiet(&mut all).await?;

    // From before the dropped frames: a reset, then the five retained ones.
    for n in [p[0], p[1]] {
        let mut sub = bus.subscribe(&cid("c"), StartAt::After(n)).await?;
        assert!(sub.reset, "frames after {n} were dropped");
        assert_eq!(next_ids(&mut sub, 5).await?, kept, "after {n}");
        s.assert_quiet(&mut sub).await?;
    }

    // From the newest dropped frame nothing after it is lost; a bus may still reset
    // (it cannot always tell), but the frames are the same either way.
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(p[2])).await?;
    assert_eq!(next_ids(&mut sub, 5).await?, kept);
    s.assert_quiet(&mut sub).await?;

    // From a retained frame: no reset, only the newer ones.
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(p[4])).await?;
    assert!(!sub.reset);
    assert_eq!(next_ids(&mut sub, 3).await?, p[5..]);
    s.assert_quiet(&mut sub).await?;

    let mut other = bus.subscribe(&cid("other"), StartAt::Retained).await?;
    let other_ids = next_ids(&mut other, 5).await?;
    assert!(other_ids.iter().all(|id| !p.contains(id)));
    s.assert_quiet(&mut other).await
}

async fn frames_older_than_max_age_are_not_replayed_and_a_resume_before_them_resets(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let max_age = BY_AGE.max_age;
    let start = Instant::now();
    let old = publish_interleaved(bus, &["c"], 2).await?;

    // Poll until a fresh subscription replays nothing: both frames have expired.
    loop {
        let mut sub = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        match tokio::time::timeout(s.quiet, sub.frames.next()).await {
            Err(_) => break,
            Ok(Some(Ok(f))) => ensure!(old.contains(&f.id), "unexpected frame {f:?}"),
            Ok(other) => bail!("replay failed: {other:?}"),
        }
        ensure!(
            start.elapsed() < max_age + Duration::from_secs(3),
            "frames still replayed {:?} after publishing",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = start.elapsed();
    ensure!(
        gone + Duration::from_millis(50) >= max_age,
        "expired after {gone:?}, before max_age {max_age:?}"
    );

    let new = bus.publish(&cid("c"), "e", b("new")).await?;
    let mut sub = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    assert_eq!(next_frame(&mut sub).await?, frame(new, "e", "new"));
    s.assert_quiet(&mut sub).await?;

    // Frames after old[0] expired: a reset, starting with the oldest retained frame.
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(old[0])).await?;
    assert!(sub.reset);
    assert_eq!(next_frame(&mut sub).await?, frame(new, "e", "new"));
    s.assert_quiet(&mut sub).await?;

    // From the last expired frame nothing after it was lost.
    let mut sub = bus.subscribe(&cid("c"), StartAt::After(old[1])).await?;
    assert!(!sub.reset);
    assert_eq!(next_frame(&mut sub).await?, frame(new, "e", "new"));
    s.assert_quiet(&mut sub).await
}

async fn clients_are_isolated_even_when_one_id_is_a_prefix_of_another(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let clients = ["abc", "abc-1", "ab", "abc_1", "ABC"];
    let mut live = Vec::new();
    for c in clients {
        live.push(bus.subscribe(&cid(c), StartAt::Retained).await?);
    }
    let mut ids = Vec::new();
    for c in clients {
        ids.push(bus.publish(&cid(c), "e", b(c)).await?);
    }
    for ((c, id), sub) in clients.iter().zip(&ids).zip(&mut live) {
        assert_eq!(next_frame(sub).await?, frame(*id, "e", c), "live for {c}");
        s.assert_quiet(sub).await?;
        let mut replay = bus.subscribe(&cid(c), StartAt::Retained).await?;
        assert_eq!(
            next_frame(&mut replay).await?,
            frame(*id, "e", c),
            "replay for {c}"
        );
        s.assert_quiet(&mut replay).await?;
    }
    Ok(())
}

async fn every_subscription_to_a_client_gets_every_frame(s: &Subject) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let before = bus.publish(&cid("c"), "e", b("before")).await?;
    let mut subs = [
        bus.subscribe(&cid("c"), StartAt::Retained).await?,
        bus.subscribe(&cid("c"), StartAt::Retained).await?,
        bus.subscribe(&cid("c"), StartAt::After(before)).await?,
    ];
    let ids = publish_interleaved(bus, &["c", "other"], 5).await?;
    for (i, sub) in subs.iter_mut().enumerate() {
        let mut expected = ids.clone();
        if i < 2 {
            expected.insert(0, before);
        }
        assert_eq!(
            next_ids(sub, expected.len()).await?,
            expected,
            "subscription {i}"
        );
        s.assert_quiet(sub).await?;
    }
    Ok(())
}

async fn publishers_racing_the_subscribe_call_cause_no_gap_and_no_duplicate(
    s: &Subject,
) -> anyhow::Result<()> {
    const PER_PUBLISHER: usize = 150;
    let published: Arc<Mutex<Vec<(u64, Bytes)>>> = Arc::default();
    // Two publishers, like two replicas handling callbacks for one client.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let bus = Arc::clone(&s.bus);
            let published = Arc::clone(&published);
            tokio::spawn(async move {
                for i in 0..PER_PUBLISHER {
                    let data = Bytes::from(format!("p{p}-{i}"));
                    let id = bus.publish(&cid("race"), "e", data.clone()).await?;
                    published
                        .lock()
                        .expect("no panics while held")
                        .push((id, data));
                    tokio::task::yield_now().await;
                }
                anyhow::Ok(())
            })
        })
        .collect();

    // Subscribe at several moments while they run: before, early, midway, late; each
    // subscription is read as it goes (a reader that waits would lag).
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    // Each moment also has a resume from the newest frame published so far: whether the
    // bus's router has been delivered the frames after it yet is exactly what races (the
    // NATS bus reads nothing when it has seen none of the client's).
    let targets = [0, 30, 120, 240]
        .into_iter()
        .flat_map(|t| [(t, false), (t, true)]);
    for (target, newest) in targets {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        let resume = loop {
            let so_far = published.lock().expect("no panics while held").clone();
            if so_far.len() >= target {
                let at = if newest {
                    so_far.iter().map(|(id, _)| *id).max()
                } else {
                    so_far.get(so_far.len() / 2).map(|(id, _)| *id)
                };
                break at;
            }
            ensure!(
                Instant::now() < deadline,
                "publishers stalled at {}",
                so_far.len()
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let start = match resume {
            None => StartAt::Retained,
            Some(id) => StartAt::After(id),
        };
        let sub = s.bus.subscribe(&cid("race"), start).await?;
        ensure!(!sub.reset, "{start:?}");
        readers.push((
            start,
            tokio::spawn(read_until_done(
                Arc::clone(&s.bus),
                start,
                sub,
                Arc::clone(&done),
                s.quiet,
            )),
        ));
    }
    for p in publishers {
        p.await??;
    }
    done.store(true, Ordering::SeqCst);
    let mut all = published.lock().expect("no panics while held").clone();
    all.sort_by_key(|(id, _)| *id);
    assert_eq!(all.len(), 2 * PER_PUBLISHER);

    for (start, reader) in readers {
        let got = reader.await?.with_context(|| format!("{start:?}"))?;
        let from = match start {
            StartAt::Retained => 0,
            StartAt::After(n) => n,
            StartAt::Live | StartAt::Unseen | StartAt::Since(_) => {
                unreachable!("the readers start from retained frames or an id")
            }
        };
        let expected: Vec<_> = all.iter().filter(|(id, _)| *id > from).cloned().collect();
        let got: Vec<_> = got.into_iter().map(|f| (f.id, f.data)).collect();
        assert_eq!(got.len(), expected.len(), "{start:?}");
        assert!(got == expected, "{start:?}: frames differ");
    }
    Ok(())
}

/// Collects a subscription's frames (of client `race`, subscribed from `start`) until
/// `done` is set and nothing came for `quiet`.
///
/// A reader that falls more than the live backlog behind — a task not scheduled while the
/// publishers run, on a busy machine — ends with "subscriber lagged": allowed (never a
/// gap). It then resumes after the last frame it got, as an SSE client does after an
/// eviction, so the frames it collects must still be exactly the ones owed.
async fn read_until_done(
    bus: Arc<dyn Bus>,
    start: StartAt,
    mut sub: Subscription,
    done: Arc<AtomicBool>,
    quiet: Duration,
) -> anyhow::Result<Vec<BusFrame>> {
    let mut got: Vec<BusFrame> = Vec::new();
    loop {
        match tokio::time::timeout(quiet, sub.frames.next()).await {
            Ok(Some(Ok(frame))) => got.push(frame),
            Ok(Some(Err(BusError::Unavailable(m)))) if m == "subscriber lagged" => {
                let resume = match (got.last(), start) {
                    (Some(f), _) => StartAt::After(f.id),
                    (None, start) => start,
                };
                sub = bus.subscribe(&cid("race"), resume).await?;
                ensure!(!sub.reset, "resumed {resume:?} after lagging: reset");
            }
            Ok(Some(Err(e))) => bail!("failed after {} frames: {e}", got.len()),
            Ok(None) => bail!("ended after {} frames", got.len()),
            Err(_) if done.load(Ordering::SeqCst) => return Ok(got),
            Err(_) => {}
        }
    }
}

async fn a_subscriber_further_behind_than_retention_gets_everything_or_an_error_never_a_gap(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let before = bus.publish(&cid("c"), "e", b("before")).await?;
    let mut behind = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    let mut resumed = bus.subscribe(&cid("c"), StartAt::After(before)).await?;
    // Eight frames while neither reads: three more than the client's limit of five.
    let mut ids = vec![before];
    ids.extend(publish_interleaved(bus, &["c", "other"], 8).await?);
    for (name, sub, owed) in [
        ("retained", &mut behind, &ids[..]),
        ("resumed", &mut resumed, &ids[1..]),
    ] {
        let mut delivered = 0;
        while delivered < owed.len() {
            match tokio::time::timeout(FRAME_TIMEOUT, sub.frames.next()).await {
                Err(_) => bail!("{name}: stalled after {delivered} frames"),
                Ok(Some(Ok(f))) => {
                    assert_eq!(f.id, owed[delivered], "{name}: frame {delivered}");
                    delivered += 1;
                }
                Ok(Some(Err(e))) => {
                    // Fell behind its backlog, or behind retention (NATS).
                    assert!(
                        matches!(e, BusError::Lagged | BusError::Unavailable(_)),
                        "{name}: {e:?}"
                    );
                    let end = tokio::time::timeout(s.quiet, sub.frames.next()).await;
                    assert!(matches!(end, Ok(None)), "{name}: after the error: {end:?}");
                    break;
                }
                Ok(None) => bail!("{name}: ended without an error after {delivered}"),
            }
        }
    }
    Ok(())
}

async fn a_slow_subscriber_blocks_neither_publishers_nor_other_subscribers_and_never_skips(
    s: &Subject,
) -> anyhow::Result<()> {
    // More than the memory bus's live backlog, so it overflows there.
    const FRAMES: usize = 600;
    let bus = &*s.bus;
    let mut slow = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    let mut fast = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    let mut ids = Vec::with_capacity(FRAMES);
    for i in 0..FRAMES {
        let id = tokio::time::timeout(
            FRAME_TIMEOUT,
            bus.publish(&cid("c"), "e", Bytes::from(i.to_string())),
        )
        .await
        .with_context(|| format!("publish {i} blocked"))??;
        ids.push(id);
        let got = next_frame(&mut fast)
            .await
            .with_context(|| format!("fast, frame {i}"))?;
        assert_eq!(got.id, id, "fast, frame {i}");
    }

    // The slow one delivers a gap-free prefix, then everything or one error and the end.
    let mut delivered = 0;
    while delivered < FRAMES {
        match tokio::time::timeout(FRAME_TIMEOUT, slow.frames.next()).await {
            Err(_) => bail!("the slow subscriber stalled after {delivered} frames"),
            Ok(Some(Ok(f))) => {
                assert_eq!(f.id, ids[delivered], "slow, frame {delivered}");
                delivered += 1;
            }
            Ok(Some(Err(e))) => {
                // Fell behind its backlog, or (NATS) behind retention while catching up.
                assert!(
                    matches!(e, BusError::Lagged | BusError::Unavailable(_)),
                    "{e:?}"
                );
                let end = tokio::time::timeout(s.quiet, slow.frames.next()).await;
                assert!(matches!(end, Ok(None)), "after the error: {end:?}");
                break;
            }
            Ok(None) => bail!("the slow subscriber ended without an error after {delivered}"),
        }
    }
    Ok(())
}

async fn a_dropped_subscription_stops_listening_and_the_others_carry_on(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    assert!(!s.has_live_subscriber("c").await?);
    let first = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    let mut second = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    assert!(s.has_live_subscriber("c").await?);

    drop(first);
    let id = bus.publish(&cid("c"), "e", b("still here")).await?;
    assert_eq!(next_frame(&mut second).await?, frame(id, "e", "still here"));
    assert!(s.has_live_subscriber("c").await?);

    drop(second);
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.has_live_subscriber("c").await? {
        ensure!(
            Instant::now() < deadline,
            "still subscribed after both were dropped"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

async fn invalid_client_ids_and_event_names_are_refused(s: &Subject) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let too_long = "c".repeat(65);
    for id in [
        "",
        "a.b",
        "a b",
        "a*",
        "a>",
        "gateway.clients.x",
        "ünï",
        "a\n",
        too_long.as_str(),
    ] {
        // The bus takes a `ClientId`: a bad id is refused where it is parsed, so it can
        // reach neither `publish` nor `subscribe`.
        let parsed = ClientId::parse(id);
        assert!(parsed.is_err(), "ClientId::parse({id:?}): {parsed:?}");
    }
    for event in ["", "two words", "line\r\nGw-Id: 1", "tab\there"] {
        let p = bus.publish(&cid("c"), event, b("x")).await;
        assert!(
            matches!(p, Err(BusError::InvalidEvent)),
            "publish with event {event:?}: {p:?}"
        );
    }
    // The widest valid id works, and nothing refused was stored.
    let widest = format!("A-z_0{}", "9".repeat(59));
    assert_eq!(widest.len(), 64);
    let widest = cid(&widest);
    let id = bus.publish(&widest, "playbook/result", b("ok")).await?;
    let mut sub = bus.subscribe(&widest, StartAt::Retained).await?;
    assert_eq!(
        next_frame(&mut sub).await?,
        frame(id, "playbook/result", "ok")
    );
    let mut sub = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    s.assert_quiet(&mut sub).await
}

async fn frame_data_with_arbitrary_bytes_round_trips(s: &Subject) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let mut noise = Vec::with_capacity(64 * 1024);
    let mut x: u32 = 0x9e37_79b9;
    while noise.len() < 64 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let values = [
        Bytes::new(),
        Bytes::from((0..=255u8).collect::<Vec<u8>>()),
        Bytes::from_static(b"\r\nNATS/1.0\r\nGw-Id: 1\r\n\r\nPUB x 1\r\n"),
        Bytes::from_static(b"\0\0\0"),
        Bytes::from(noise),
    ];
    let mut live = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    let mut ids = Vec::new();
    for v in &values {
        ids.push(bus.publish(&cid("c"), "e", v.clone()).await?);
    }
    let mut replay = bus.subscribe(&cid("c"), StartAt::Retained).await?;
    for (i, (id, v)) in ids.iter().zip(&values).enumerate() {
        for (how, sub) in [("live", &mut live), ("replay", &mut replay)] {
            let got = next_frame(sub).await?;
            assert_eq!((got.id, &got.data), (*id, v), "{how} {i}");
        }
    }
    Ok(())
}

async fn the_bus_reports_itself_healthy(s: &Subject) -> anyhow::Result<()> {
    assert!(s.bus.is_healthy().await);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Runs: one publish per event, every watcher (issue 16, broadcast)
// ---------------------------------------------------------------------------------------

/// Reads `n` frames and returns their data as text.
async fn next_texts(sub: &mut Subscription, n: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let f = next_frame(sub)
            .await
            .with_context(|| format!("frame {i} of {n}, after {out:?}"))?;
        out.push(String::from_utf8(f.data.to_vec())?);
    }
    Ok(out)
}

async fn a_run_frame_reaches_every_watcher_once_and_no_one_else(s: &Subject) -> anyhow::Result<()> {
    // More watchers than the 256 clients an interest record keeps: no cap any more.
    const WATCHERS: usize = 300;
    let bus = &*s.bus;
    let run = eid("612345678901234567");
    let mut watchers = Vec::new();
    for w in 0..WATCHERS {
        watchers.push(
            bus.subscribe_with(
                &cid(&format!("w{w}")),
                StartAt::Retained,
                std::slice::from_ref(&run),
            )
            .await?,
        );
    }
    let mut bystander = bus
        .subscribe_with(&cid("bystander"), StartAt::Retained, &[eid("7")])
        .await?;
    let mut expected = Vec::new();
    for i in 0..5 {
        let id = bus
            .publish_run(
                &run,
                "playbook/state",
                Bytes::from(format!("s{i}")),
                &format!("k{i}"),
            )
            .await?;
        expected.push(frame(id, "playbook/state", &format!("s{i}")));
    }
    for (w, sub) in watchers.iter_mut().enumerate() {
        for want in &expected {
            let got = next_frame(sub)
                .await
                .with_context(|| format!("watcher {w}"))?;
            ensure!(&got == want, "watcher {w}: {got:?} != {want:?}");
        }
    }
    s.assert_quiet(&mut watchers[0]).await?;
    s.assert_quiet(&mut bystander).await?;
    Ok(())
}

async fn a_watch_added_while_a_stream_is_open_delivers_the_runs_later_frames(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let run = eid("42");
    let mut sub = bus.subscribe(&cid("late"), StartAt::Retained).await?;
    let mut other = bus.subscribe(&cid("other"), StartAt::Retained).await?;
    bus.publish_run(&run, "playbook/state", b("before"), "k0")
        .await?;
    s.assert_quiet(&mut sub).await?;
    bus.watch(&cid("late"), &run).await?;
    let own = bus
        .publish(&cid("late"), "playbook/result", b("own"))
        .await?;
    let after = bus
        .publish_run(&run, "playbook/state", b("after"), "k1")
        .await?;
    assert_eq!(
        next_frame(&mut sub).await?,
        frame(own, "playbook/result", "own")
    );
    assert_eq!(
        next_frame(&mut sub).await?,
        frame(after, "playbook/state", "after")
    );
    s.assert_quiet(&mut sub).await?;
    s.assert_quiet(&mut other).await?;
    Ok(())
}

async fn a_resume_merges_the_clients_and_its_runs_frames_in_one_id_order(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let (r1, r2) = (eid("101"), eid("202"));
    let mut ids = Vec::new();
    let mut texts = Vec::new();
    for i in 0..4 {
        let own = format!("own{i}");
        ids.push(bus.publish(&cid("m"), "e", b(&own)).await?);
        texts.push(own);
        bus.publish(&cid("not-m"), "e", b("x")).await?;
        let one = format!("r1-{i}");
        ids.push(bus.publish_run(&r1, "e", b(&one), &one).await?);
        texts.push(one);
        let two = format!("r2-{i}");
        ids.push(bus.publish_run(&r2, "e", b(&two), &two).await?);
        texts.push(two);
        bus.publish_run(&eid("303"), "e", b("unwatched"), &format!("u{i}"))
            .await?;
    }
    let watching = [r1.clone(), r2.clone()];
    let mut all = bus
        .subscribe_with(&cid("m"), StartAt::Retained, &watching)
        .await?;
    ensure!(!all.reset);
    assert_eq!(next_texts(&mut all, texts.len()).await?, texts);
    s.assert_quiet(&mut all).await?;
    for cut in [0, 1, 5, 10, texts.len() - 1] {
        let mut sub = bus
            .subscribe_with(&cid("m"), StartAt::After(ids[cut]), &watching)
            .await?;
        ensure!(!sub.reset, "after {}", ids[cut]);
        let rest = texts.len() - cut - 1;
        assert_eq!(
            next_texts(&mut sub, rest).await?,
            texts[cut + 1..],
            "after {cut}"
        );
        // Live frames of both kinds follow, still in one order.
        let live_run = bus
            .publish_run(&r2, "e", b("live-run"), &format!("lr{cut}"))
            .await?;
        let live_own = bus.publish(&cid("m"), "e", b("live-own")).await?;
        assert_eq!(next_frame(&mut sub).await?.id, live_run);
        assert_eq!(next_frame(&mut sub).await?.id, live_own);
        s.assert_quiet(&mut sub).await?;
        ids.extend([live_run, live_own]);
        texts.extend(["live-run".to_owned(), "live-own".to_owned()]);
    }
    Ok(())
}

async fn a_run_that_dropped_frames_a_resume_is_owed_resets_it(s: &Subject) -> anyhow::Result<()> {
    // BY_COUNT: five frames per subject, a run's included.
    let bus = &*s.bus;
    let run = eid("55");
    let own = bus.publish(&cid("d"), "e", b("own")).await?;
    let mut run_ids = Vec::new();
    for i in 0..8 {
        run_ids.push(
            bus.publish_run(&run, "e", b(&format!("r{i}")), &format!("k{i}"))
                .await?,
        );
    }
    let watching = [run.clone()];
    // Nothing of the run after run_ids[2] was dropped (3..8 are the five kept).
    let mut fine = bus
        .subscribe_with(&cid("d"), StartAt::After(run_ids[2]), &watching)
        .await?;
    ensure!(!fine.reset, "nothing owed was dropped");
    assert_eq!(next_ids(&mut fine, 5).await?, run_ids[3..]);
    // After `own`, the run's frames 0..3 were owed and are gone: a reset, then what is kept.
    let mut lost = bus
        .subscribe_with(&cid("d"), StartAt::After(own), &watching)
        .await?;
    ensure!(lost.reset, "the run dropped frames owed after {own}");
    // A reset starts at the client's oldest retained frame, the run's kept ones after it.
    let mut expected = vec![own];
    expected.extend(&run_ids[3..]);
    assert_eq!(next_ids(&mut lost, 6).await?, expected);
    s.assert_quiet(&mut lost).await?;
    Ok(())
}

async fn publishers_racing_a_watcher_subscribing_cause_no_gap_and_no_duplicate(
    s: &Subject,
) -> anyhow::Result<()> {
    const PER_PUBLISHER: usize = 120;
    let run = eid("777");
    let published: Arc<Mutex<Vec<u64>>> = Arc::default();
    // One publisher on the run, one on the client's own subject.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let bus = Arc::clone(&s.bus);
            let published = Arc::clone(&published);
            let run = run.clone();
            tokio::spawn(async move {
                for i in 0..PER_PUBLISHER {
                    let data = Bytes::from(format!("p{p}-{i}"));
                    let id = if p == 0 {
                        bus.publish_run(&run, "e", data, &format!("k{i}")).await?
                    } else {
                        bus.publish(&cid("racer"), "e", data).await?
                    };
                    published.lock().expect("no panics while held").push(id);
                    tokio::task::yield_now().await;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let mut readers = Vec::new();
    for target in [0, 40, 120, 200] {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        let resume = loop {
            let mut so_far = published.lock().expect("no panics while held").clone();
            if so_far.len() >= target {
                so_far.sort_unstable();
                break so_far.get(so_far.len() / 2).copied();
            }
            ensure!(
                Instant::now() < deadline,
                "publishers stalled at {}",
                so_far.len()
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let start = resume.map_or(StartAt::Retained, StartAt::After);
        let mut sub = s
            .bus
            .subscribe_with(&cid("racer"), start, std::slice::from_ref(&run))
            .await?;
        ensure!(!sub.reset, "{start:?}");
        let quiet = s.quiet;
        readers.push((
            start,
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Ok(Some(item)) = tokio::time::timeout(quiet * 5, sub.frames.next()).await
                {
                    got.push(item?.id);
                }
                anyhow::Ok(got)
            }),
        ));
    }
    for p in publishers {
        p.await??;
    }
    let mut all = published.lock().expect("no panics while held").clone();
    all.sort_unstable();
    assert_eq!(all.len(), 2 * PER_PUBLISHER);
    for (start, reader) in readers {
        let got = reader.await?.with_context(|| format!("{start:?}"))?;
        let from = match start {
            StartAt::After(n) => n,
            _ => 0,
        };
        let expected: Vec<u64> = all.iter().copied().filter(|id| *id > from).collect();
        assert_eq!(got, expected, "{start:?}");
    }
    Ok(())
}

async fn a_run_keyed_twice_is_delivered_once_and_control_frames_never_reach_a_subscriber(
    s: &Subject,
) -> anyhow::Result<()> {
    let bus = &*s.bus;
    let run = eid("88");
    let mut sub = bus.subscribe(&cid("k"), StartAt::Retained).await?;
    bus.watch(&cid("k"), &run).await?;
    bus.watch(&cid("k"), &run).await?;
    let first = bus.publish_run(&run, "e", b("once"), "same-key").await?;
    let mut got = vec![next_frame(&mut sub).await?];
    ensure!(got[0] == frame(first, "e", "once"), "{got:?}");
    // The embedded bus has no redelivery to guard against; the NATS bus stores it once.
    if matches!(s.probe, Probe::Nats(_)) {
        let again = bus.publish_run(&run, "e", b("once"), "same-key").await?;
        ensure!(
            again == first,
            "a keyed duplicate is the first copy ({again} != {first})"
        );
    }
    s.assert_quiet(&mut sub).await?;
    // A replay of everything retained shows no control frame either.
    let mut replay = bus
        .subscribe_with(&cid("k"), StartAt::Retained, std::slice::from_ref(&run))
        .await?;
    got = vec![next_frame(&mut replay).await?];
    ensure!(got[0].id == first && got[0].event == "e", "{got:?}");
    s.assert_quiet(&mut replay).await?;
    Ok(())
}

/// What only the NATS bus has: replicas, a stream that may already exist, core NATS
/// losing live copies, a server to lose.
mod nats_only {
    use super::*;
    use async_nats::jetstream::{self, stream};

    /// Stores a frame the way `publish` does, on a connection of its own.
    async fn publish_to_stream(
        js: &jetstream::Context,
        client_id: &str,
        data: &str,
    ) -> anyhow::Result<u64> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Gw-Event", "e");
        Ok(js
            .publish_with_headers(format!("gateway.clients.{client_id}"), headers, b(data))
            .await?
            .await?
            .sequence)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_on_one_server_share_live_delivery_and_replay() -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let name = Some("GW_TEST_FRAMES");
        let a = NatsBus::open(async_nats::connect(&server.url).await?, LONG, name).await?;
        let b_ = NatsBus::open(async_nats::connect(&server.url).await?, LONG, name).await?;
        assert!(
            b_.config_mismatches().is_empty(),
            "{:?}",
            b_.config_mismatches()
        );

        let js = jetstream::new(async_nats::connect(&server.url).await?);
        let config = js
            .get_stream("GW_TEST_FRAMES")
            .await?
            .cached_info()
            .config
            .clone();
        assert_eq!(
            config.subjects,
            ["gateway.clients.>", "gateway.executions.>"]
        );
        assert_eq!(config.max_age, LONG.max_age);
        assert_eq!(config.max_messages_per_subject, 1000);
        assert_eq!(config.storage, stream::StorageType::File);
        assert_eq!(config.discard, stream::DiscardPolicy::Old);

        // Live: published on one replica, delivered on the other.
        let mut on_b = b_.subscribe(&cid("c"), StartAt::Retained).await?;
        let one = a.publish(&cid("c"), "e", b("from a")).await?;
        assert_eq!(next_frame(&mut on_b).await?, frame(one, "e", "from a"));
        let two = b_.publish(&cid("c"), "e", b("from b")).await?;
        assert_eq!(next_frame(&mut on_b).await?, frame(two, "e", "from b"));

        // Replay: a client reconnecting to the other replica.
        let mut on_a = a.subscribe(&cid("c"), StartAt::After(one)).await?;
        assert!(!on_a.reset);
        assert_eq!(next_frame(&mut on_a).await?, frame(two, "e", "from b"));
        let mut all_on_a = a.subscribe(&cid("c"), StartAt::Retained).await?;
        assert_eq!(next_ids(&mut all_on_a, 2).await?, [one, two]);

        let three = a.publish(&cid("c"), "e", b("three")).await?;
        for sub in [&mut on_a, &mut on_b, &mut all_on_a] {
            assert_eq!(next_frame(sub).await?, frame(three, "e", "three"));
            assert_quiet(sub).await?;
        }
        Ok(())
    }

    /// A nats-server and two buses on it with the default stream: two replicas.
    async fn two_replicas() -> anyhow::Result<(NatsServer, NatsBus, NatsBus)> {
        let server = NatsServer::start().await?;
        let a = NatsBus::open(async_nats::connect(&server.url).await?, LONG, None).await?;
        let b = NatsBus::open(async_nats::connect(&server.url).await?, LONG, None).await?;
        Ok((server, a, b))
    }

    /// Resumes on this process's NATS bus by what they read (`gateway_bus_resumes_total`).
    fn resumes(reads: &str) -> u64 {
        let text = origin::metrics::global().encode();
        let series = format!("gateway_bus_resumes_total{{reads=\"{reads}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Publishes to a client nobody else uses on `from` until a stream of it open on `on`
    /// has the frame: `on`'s router has then been delivered every frame stored before.
    async fn sync(from: &NatsBus, on: &NatsBus, tag: &str) -> anyhow::Result<()> {
        let mut sub = on.subscribe(&cid(tag), StartAt::Unseen).await?;
        let id = from.publish(&cid(tag), "e", b(tag)).await?;
        ensure!(next_frame(&mut sub).await?.id == id);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resume_with_nothing_new_on_another_replica_reads_nothing_and_misses_nothing(
    ) -> anyhow::Result<()> {
        let (_server, a, b_) = two_replicas().await?;
        // A new client on A: its subscription gives the position its record keeps.
        let fresh = a.subscribe(&cid("fresh"), StartAt::Unseen).await?;
        let since = fresh
            .position
            .context("a NATS subscription of a new id has a position")?;
        drop(fresh);
        let one = a.publish(&cid("c"), "e", b("one")).await?;
        a.publish(&cid("other"), "e", b("x")).await?;
        let two = a.publish(&cid("c"), "e", b("two")).await?;
        sync(&a, &b_, "sync1").await?;
        let (none, stream) = (resumes("none"), resumes("stream"));

        // Nothing new for them on B: no read, and what comes next arrives once, in order.
        let mut c = b_.subscribe(&cid("c"), StartAt::After(two)).await?;
        let mut f = b_.subscribe(&cid("fresh"), StartAt::Since(since)).await?;
        assert!(!c.reset && !f.reset);
        assert_eq!((resumes("none"), resumes("stream")), (none + 2, stream));
        let three = a.publish(&cid("c"), "e", b("three")).await?;
        let first = a.publish(&cid("fresh"), "e", b("first")).await?;
        assert_eq!(next_frame(&mut c).await?, frame(three, "e", "three"));
        assert_eq!(next_frame(&mut f).await?, frame(first, "e", "first"));
        assert_quiet(&mut c).await?;
        assert_quiet(&mut f).await?;

        // Something new: B reads, and the frames come once each — one frame by its
        // sequence, two from the stream.
        sync(&a, &b_, "sync2").await?;
        let indexed = resumes("indexed");
        let mut again = b_.subscribe(&cid("c"), StartAt::After(one)).await?;
        let mut fresh_again = b_.subscribe(&cid("fresh"), StartAt::Since(since)).await?;
        assert_eq!(
            (resumes("none"), resumes("stream"), resumes("indexed")),
            (none + 2, stream + 1, indexed + 1)
        );
        assert!(!again.reset && !fresh_again.reset);
        assert_eq!(next_ids(&mut again, 2).await?, [two, three]);
        assert_eq!(
            next_frame(&mut fresh_again).await?,
            frame(first, "e", "first")
        );
        assert_quiet(&mut again).await?;
        assert_quiet(&mut fresh_again).await?;

        // An id above what B's router has been delivered may be a frame on its way: read.
        let ahead = b_
            .subscribe(&cid("c"), StartAt::After(three + 1_000))
            .await?;
        assert!(ahead.reset, "an id the stream never issued");
        assert_eq!(resumes("stream"), stream + 2);

        // A client watching a run: the run's frames count too.
        let run = eid("9");
        let watching = std::slice::from_ref(&run);
        let r1 = a.publish_run(&run, "e", b("r1"), "r1").await?;
        sync(&a, &b_, "sync3").await?;
        let mut w = b_
            .subscribe_with(&cid("w"), StartAt::After(r1), watching)
            .await?;
        assert_eq!(
            resumes("none"),
            none + 3,
            "nothing above r1 for w or its run"
        );
        let r2 = a.publish_run(&run, "e", b("r2"), "r2").await?;
        assert_eq!(next_frame(&mut w).await?, frame(r2, "e", "r2"));
        assert_quiet(&mut w).await?;
        sync(&a, &b_, "sync4").await?;
        let mut w_again = b_
            .subscribe_with(&cid("w"), StartAt::After(r1), watching)
            .await?;
        assert_eq!(
            resumes("indexed"),
            indexed + 2,
            "r2, the run's one frame above r1: read by its sequence"
        );
        assert_eq!(next_frame(&mut w_again).await?, frame(r2, "e", "r2"));
        let since_with_run = b_
            .subscribe_with(&cid("w"), StartAt::Since(r2), watching)
            .await?;
        drop(since_with_run);
        assert_eq!(
            resumes("stream"),
            stream + 3,
            "`Since` owes a run's older frames: read"
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resume_with_one_new_frame_reads_it_by_its_sequence_and_falls_back_when_it_is_gone(
    ) -> anyhow::Result<()> {
        let (server, a, b_) = two_replicas().await?;
        let one = a.publish(&cid("c"), "e", b("one")).await?;
        // Other clients' frames between: what NATS would scan for the first frame of `c`.
        for i in 0..50 {
            a.publish(&cid(&format!("o{i}")), "e", b("x")).await?;
        }
        let two = a.publish(&cid("c"), "e", b("two")).await?;
        sync(&a, &b_, "sync1").await?;
        let (indexed, stream) = (resumes("indexed"), resumes("stream"));
        let mut c = b_.subscribe(&cid("c"), StartAt::After(one)).await?;
        assert!(!c.reset);
        assert_eq!(resumes("indexed"), indexed + 1);
        assert_eq!(next_frame(&mut c).await?, frame(two, "e", "two"));
        let three = a.publish(&cid("c"), "e", b("three")).await?;
        assert_eq!(next_frame(&mut c).await?, frame(three, "e", "three"));
        assert_quiet(&mut c).await?;
        drop(c);

        // Two new frames, one of them deleted since: the index names no single frame, so
        // the stream is read and what is left comes.
        let four = a.publish(&cid("c"), "e", b("four")).await?;
        sync(&a, &b_, "sync2").await?;
        let js = async_nats::jetstream::new(async_nats::connect(&server.url).await?);
        ensure!(
            js.get_stream("GATEWAY_FRAMES")
                .await?
                .delete_message(four)
                .await?
        );
        let five = a.publish(&cid("c"), "e", b("five")).await?;
        let mut after_three = b_.subscribe(&cid("c"), StartAt::After(three)).await?;
        assert_eq!(resumes("indexed"), indexed + 1, "two frames above three");
        assert_eq!(resumes("stream"), stream + 1);
        assert_eq!(
            next_frame(&mut after_three).await?,
            frame(five, "e", "five")
        );
        assert_quiet(&mut after_three).await?;
        sync(&a, &b_, "sync3").await?;
        let six = a.publish(&cid("c"), "e", b("six")).await?;
        sync(&a, &b_, "sync4").await?;
        // The one new frame the index names is gone (deleted; retention would do the same):
        // nothing is taken on its word, the stream is read instead.
        ensure!(
            js.get_stream("GATEWAY_FRAMES")
                .await?
                .delete_message(six)
                .await?
        );
        let mut after_five = b_.subscribe(&cid("c"), StartAt::After(five)).await?;
        assert_eq!(
            (resumes("indexed"), resumes("stream")),
            (indexed + 1, stream + 2),
            "the named frame is gone: read from the stream instead"
        );
        assert_quiet(&mut after_five).await?;
        let seven = a.publish(&cid("c"), "e", b("seven")).await?;
        assert_eq!(
            next_frame(&mut after_five).await?,
            frame(seven, "e", "seven")
        );

        // Two clients sharing a slot of the index (its hash, `router.rs` `seen_slot`): the
        // slot's one new frame is the other's, so this one has nothing new — and is told
        // nothing of the other's.
        let slot = |id: &str| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (0u8, id).hash(&mut h);
            h.finish() & 0xFFFF
        };
        let x = "share-0".to_owned();
        let y = (1..)
            .map(|i| format!("share-{i}"))
            .find(|y| slot(y) == slot(&x))
            .context("two ids sharing a slot")?;
        let mine = a.publish(&cid(&x), "e", b("mine")).await?;
        let theirs = a.publish(&cid(&y), "e", b("theirs")).await?;
        sync(&a, &b_, "sync5").await?;
        let mut x_back = b_.subscribe(&cid(&x), StartAt::After(mine)).await?;
        assert_eq!(
            (resumes("indexed"), resumes("stream")),
            (indexed + 2, stream + 2),
            "one frame above {mine} in the slot, {theirs}: the other client's"
        );
        assert_quiet(&mut x_back).await?;
        let later = a.publish(&cid(&x), "e", b("later")).await?;
        assert_eq!(next_frame(&mut x_back).await?, frame(later, "e", "later"));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_reaches_a_stream_on_another_replica_and_a_resume_finds_it_in_the_stream(
    ) -> anyhow::Result<()> {
        let (_server, a, b_) = two_replicas().await?;
        let run = eid("31337");
        let mut on_b = b_.subscribe(&cid("x"), StartAt::Retained).await?;
        let own = a.publish(&cid("x"), "e", b("own")).await?;
        assert_eq!(next_frame(&mut on_b).await?.id, own);
        // Replica A handles the subscribeToExecution; the stream is open on B.
        a.watch(&cid("x"), &run).await?;
        let r1 = a.publish_run(&run, "e", b("r1"), "k1").await?;
        assert_eq!(next_frame(&mut on_b).await?, frame(r1, "e", "r1"));
        assert_quiet(&mut on_b).await?;
        // The client resumes on A with a watch list that lost the update (a read-modify-
        // write race): the control frame in its own subject brings the run back, and the
        // run's frames stored since are read, then routed.
        let mut on_a = a
            .subscribe_with(&cid("x"), StartAt::After(own), &[])
            .await?;
        assert!(!on_a.reset);
        assert_eq!(next_frame(&mut on_a).await?, frame(r1, "e", "r1"));
        let r2 = b_.publish_run(&run, "e", b("r2"), "k2").await?;
        assert_eq!(next_frame(&mut on_a).await?, frame(r2, "e", "r2"));
        assert_eq!(next_frame(&mut on_b).await?, frame(r2, "e", "r2"));
        assert_quiet(&mut on_a).await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_existing_stream_with_other_retention_is_reported_and_used_as_it_is(
    ) -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let client = async_nats::connect(&server.url).await?;
        let js = jetstream::new(client.clone());
        // Made by someone else: 30 s and 3 frames per client instead of 2 s and 5.
        js.create_stream(stream::Config {
            name: "GATEWAY_FRAMES".into(),
            subjects: vec!["gateway.clients.>".into()],
            max_age: Duration::from_secs(30),
            max_messages_per_subject: 3,
            ..Default::default()
        })
        .await?;
        let pre = publish_to_stream(&js, "c", "pre-existing").await?;

        let wanted = Retention {
            max_age: Duration::from_secs(2),
            max_frames_per_client: 5,
        };
        let bus = NatsBus::open(client, wanted, None).await?;
        let m = bus.config_mismatches();
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].contains("max_age") && m[0].contains("30s") && m[0].contains("2s"),
            "{m:?}"
        );
        assert!(
            m[1].contains("max_messages_per_subject") && m[1].contains('3') && m[1].contains('5'),
            "{m:?}"
        );

        // Used as it is: its frames are replayed and its limits apply...
        let mut sub = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        assert_eq!(next_frame(&mut sub).await?, frame(pre, "e", "pre-existing"));
        let mut ids = Vec::new();
        for i in 0..4 {
            let id = bus
                .publish(&cid("c"), "e", Bytes::from(i.to_string()))
                .await?;
            assert_eq!(next_frame(&mut sub).await?.id, id);
            ids.push(id);
        }
        let mut replay = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        assert_eq!(next_ids(&mut replay, 3).await?, ids[1..]);
        assert_quiet(&mut replay).await?;
        let mut resumed = bus.subscribe(&cid("c"), StartAt::After(pre)).await?;
        assert!(
            resumed.reset,
            "the stream's limit of 3 dropped frames after {pre}"
        );
        assert_eq!(next_ids(&mut resumed, 3).await?, ids[1..]);
        // ...and it is not changed.
        let config = js
            .get_stream("GATEWAY_FRAMES")
            .await?
            .cached_info()
            .config
            .clone();
        assert_eq!(config.max_age, Duration::from_secs(30));
        assert_eq!(config.max_messages_per_subject, 3);
        // Except for the runs' subjects, added in place (a stream of the version before
        // run broadcast): a run's frame now reaches its watcher. And direct gets, which
        // the reads use (a stream of the version before them).
        assert_eq!(
            config.subjects,
            ["gateway.clients.>", "gateway.executions.>"]
        );
        assert!(config.allow_direct);
        let run = eid("9001");
        let mut watcher = bus
            .subscribe_with(&cid("w"), StartAt::Live, std::slice::from_ref(&run))
            .await?;
        let id = bus
            .publish_run(&run, "playbook/state", b("step"), "k1")
            .await?;
        assert_eq!(
            next_frame(&mut watcher).await?,
            frame(id, "playbook/state", "step")
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_published_again_with_its_key_is_stored_once_even_from_another_replica(
    ) -> anyhow::Result<()> {
        // The bridge's redelivery: the reader died between publish and ack, and the next
        // reader (another connection) publishes the same frame with the same key.
        let (_server, a, b_) = two_replicas().await?;
        let first = a.publish_once(&cid("c"), "e", b("step"), "k1").await?;
        let again = b_.publish_once(&cid("c"), "e", b("step"), "k1").await?;
        assert_eq!(again, first, "the duplicate's ack names the first copy");
        let other = a.publish_once(&cid("c"), "e", b("next"), "k2").await?;
        let unkeyed = a.publish(&cid("c"), "e", b("step")).await?;
        let mut sub = a.subscribe(&cid("c"), StartAt::Retained).await?;
        assert_eq!(next_frame(&mut sub).await?, frame(first, "e", "step"));
        assert_eq!(next_frame(&mut sub).await?, frame(other, "e", "next"));
        assert_eq!(next_frame(&mut sub).await?, frame(unkeyed, "e", "step"));
        assert_quiet(&mut sub).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_stored_by_another_writer_is_delivered_live() -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let bus = NatsBus::open(async_nats::connect(&server.url).await?, LONG, None).await?;
        let js = jetstream::new(async_nats::connect(&server.url).await?);
        let mut sub = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        let first = bus.publish(&cid("c"), "e", b("first")).await?;
        assert_eq!(next_frame(&mut sub).await?, frame(first, "e", "first"));
        assert_quiet(&mut sub).await?; // done reading the stream: waiting for routed frames

        // Stored by someone else's connection (another replica, an older version): the
        // stream is the only source of truth, so it arrives without any later frame.
        let other = publish_to_stream(&js, "c", "other").await?;
        assert_eq!(next_frame(&mut sub).await?, frame(other, "e", "other"));
        assert_quiet(&mut sub).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_stored_while_the_connection_reconnects_are_delivered_once() -> anyhow::Result<()>
    {
        let server = NatsServer::start().await?;
        let client = async_nats::connect(&server.url).await?;
        let bus = NatsBus::open(client.clone(), LONG, None).await?;
        let js = jetstream::new(async_nats::connect(&server.url).await?);
        let mut sub = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        let first = bus.publish(&cid("c"), "e", b("first")).await?;
        assert_eq!(next_frame(&mut sub).await?, frame(first, "e", "first"));
        assert_quiet(&mut sub).await?;

        // Stored by another connection while this replica's is being re-established.
        client.force_reconnect().await?;
        let mut during = Vec::new();
        for i in 0..20 {
            during.push(publish_to_stream(&js, "c", &format!("during {i}")).await?);
        }
        assert_eq!(next_ids(&mut sub, during.len()).await?, during);
        assert_quiet(&mut sub).await?;
        // Delivery carries on over the new connection.
        let after = bus.publish(&cid("c"), "e", b("after")).await?;
        assert_eq!(next_frame(&mut sub).await?, frame(after, "e", "after"));
        assert_quiet(&mut sub).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_that_overflows_its_backlog_ends_with_a_lag_error_instead_of_skipping(
    ) -> anyhow::Result<()> {
        use origin::bus::nats::LIVE_BACKLOG;
        let server = NatsServer::start().await?;
        let bus = NatsBus::open(async_nats::connect(&server.url).await?, LONG, None).await?;
        let mut slow = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        let mut ids = Vec::new();
        for i in 0..=LIVE_BACKLOG {
            ids.push(
                bus.publish(&cid("c"), "e", Bytes::from(i.to_string()))
                    .await?,
            );
        }
        // Routed asynchronously: give the router time to pass the backlog.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match slow.frames.next().await {
            Some(Err(BusError::Lagged)) => {}
            other => bail!("expected the lag error first, got {other:?}"),
        }
        assert!(slow.frames.next().await.is_none());
        assert_eq!(
            bus.live_subscribers(),
            0,
            "an ended stream leaves nothing routed"
        );
        // Nothing was lost: a resume from before the overflow replays it all.
        let mut resumed = bus.subscribe(&cid("c"), StartAt::After(0)).await?;
        assert!(!resumed.reset);
        assert_eq!(next_ids(&mut resumed, ids.len()).await?, ids);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn losing_the_server_makes_the_bus_unhealthy_and_calls_fail_as_unavailable(
    ) -> anyhow::Result<()> {
        let mut server = NatsServer::start().await?;
        let bus = NatsBus::open(async_nats::connect(&server.url).await?, LONG, None).await?;
        bus.publish(&cid("c"), "e", b("v")).await?;
        server.guard().stop(Duration::from_secs(3));

        let deadline = Instant::now() + Duration::from_secs(5);
        while bus.is_healthy().await {
            ensure!(Instant::now() < deadline, "still healthy without a server");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // Both fail within the bus's operation timeout rather than hanging.
        let limit = Duration::from_secs(8);
        let c = cid("c");
        let (p, r) = tokio::join!(
            tokio::time::timeout(limit, bus.publish(&c, "e", b("w"))),
            tokio::time::timeout(limit, bus.subscribe(&c, StartAt::After(1))),
        );
        assert!(
            matches!(p, Ok(Err(BusError::Unavailable(_)))),
            "publish: {p:?}"
        );
        let r = r.map(|r| r.map(|s| s.reset));
        assert!(
            matches!(r, Ok(Err(BusError::Unavailable(_)))),
            "subscribe: {r:?}"
        );
        Ok(())
    }
}

/// What only the memory bus has: a bounded live buffer per subscriber.
mod memory_only {
    use super::*;
    use origin::bus::memory::LIVE_BACKLOG;

    #[tokio::test]
    async fn a_subscriber_that_overflows_its_live_buffer_ends_with_a_lag_error_instead_of_skipping(
    ) -> anyhow::Result<()> {
        let bus = MemoryBus::new(LONG);
        let mut slow = bus.subscribe(&cid("c"), StartAt::Retained).await?;
        let mut ids = Vec::new();
        for i in 0..=LIVE_BACKLOG {
            ids.push(
                bus.publish(&cid("c"), "e", Bytes::from(i.to_string()))
                    .await?,
            );
        }
        match slow.frames.next().await {
            Some(Err(BusError::Lagged)) => {}
            other => bail!("expected the lag error first, got {other:?}"),
        }
        assert!(slow.frames.next().await.is_none());
        // Nothing was lost: a resume from before the overflow replays it all.
        let mut resumed = bus.subscribe(&cid("c"), StartAt::After(0)).await?;
        assert!(!resumed.reset);
        assert_eq!(next_ids(&mut resumed, ids.len()).await?, ids);
        Ok(())
    }
}
