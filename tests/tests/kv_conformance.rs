//! The K/V conformance suite: one set of checks, run against every [`KvStore`].
//!
//! The origin may run on the embedded [`MemoryKv`] or on NATS JetStream ([`NatsKv`]), and
//! nothing above the trait may tell them apart. Each check below is written once against
//! `&dyn KvStore` and instantiated by [`conformance!`] for both stores — `memory_kv::…` and
//! `nats_kv::…` — so a behaviour the NATS store gains but the memory store lacks (or the
//! reverse) fails here first. The NATS runs use a real nats-server each (own port and store
//! directory), so all tests run in parallel. Buckets get short TTLs (sessions 2 s) to keep
//! expiry checks quick. A few NATS-only checks (existing buckets, prefixes, losing the
//! server) follow in `nats_only`.

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use gateway_tests::harness::nats::NatsServer;
use origin::store::memory::MemoryKv;
use origin::store::nats::NatsKv;
use origin::store::{Bucket, BucketTtls, BucketWatchItem, KvEvent, KvStore, StoreError};
use std::time::{Duration, Instant};

/// Short bucket TTLs: `sessions` expires fast for the expiry checks; the others outlive
/// any test so they never expire under a check that is not about expiry.
fn suite_ttls() -> BucketTtls {
    BucketTtls {
        sessions: Duration::from_secs(2),
        requests: Duration::from_secs(30),
        interest: Duration::from_secs(30),
        revoked: Duration::from_secs(30),
        clients: Duration::from_secs(30),
        owners: Duration::from_secs(30),
        questions: Duration::from_secs(30),
    }
}

/// How long to wait for a watch event that must come.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How early an expiry may be seen: timers on the server may fire a hair before the
/// deadline measured here (which starts before the write is sent).
const EARLY_TOLERANCE: Duration = Duration::from_millis(50);

/// A store under test, with what the checks need to know about it.
struct Subject {
    kv: Box<dyn KvStore>,
    /// How late an expiry may be seen: the memory store is exact, NATS expires on a
    /// server-side timer and counts per-key TTLs in whole seconds.
    expiry_slack: Duration,
    /// Dropped after `kv` (field order), so the client goes before its server.
    _server: Option<NatsServer>,
}

async fn memory_store() -> anyhow::Result<Subject> {
    Ok(Subject {
        kv: Box::new(MemoryKv::new(suite_ttls())),
        expiry_slack: Duration::from_millis(500),
        _server: None,
    })
}

async fn nats_store() -> anyhow::Result<Subject> {
    let server = NatsServer::start().await?;
    let client = async_nats::connect(&server.url).await?;
    let kv = NatsKv::open(client, suite_ttls(), None).await?;
    ensure!(
        kv.config_mismatches().is_empty(),
        "fresh buckets cannot mismatch: {:?}",
        kv.config_mismatches()
    );
    Ok(Subject {
        kv: Box::new(kv),
        expiry_slack: Duration::from_millis(2500),
        _server: Some(server),
    })
}

/// Instantiates every check once per store, as `#[tokio::test]`s named after the check.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod memory_kv {
            $(
                #[tokio::test]
                async fn $check() -> anyhow::Result<()> {
                    let subject = super::memory_store().await?;
                    super::$check(&subject).await
                }
            )*
        }
        mod nats_kv {
            $(
                #[tokio::test]
                async fn $check() -> anyhow::Result<()> {
                    let subject = super::nats_store().await?;
                    super::$check(&subject).await
                }
            )*
        }
    };
}

conformance!(
    a_put_value_is_read_back_and_an_overwrite_replaces_it,
    an_absent_key_reads_as_none,
    a_deleted_key_reads_as_none_and_deleting_an_absent_key_succeeds,
    create_stores_only_when_the_key_is_absent_and_again_after_a_delete,
    an_entry_disappears_once_its_bucket_ttl_has_passed_and_watchers_are_not_told,
    put_with_ttl_expires_before_the_bucket_ttl_and_a_plain_put_restores_it,
    put_with_ttl_is_capped_at_the_bucket_ttl,
    buckets_are_isolated_from_each_other,
    a_watch_sees_only_future_puts_and_deletes_of_its_own_key,
    invalid_keys_are_refused_by_every_operation,
    values_with_arbitrary_bytes_round_trip,
    concurrent_creates_of_the_same_key_have_exactly_one_winner,
    the_store_reports_itself_healthy,
    a_bucket_watch_delivers_the_live_values_then_current_then_changes,
    a_lease_has_one_holder_is_renewed_by_it_and_passes_on_after_its_ttl,
    concurrent_takers_of_a_free_lease_have_exactly_one_winner,
    an_update_replaces_only_the_revision_it_was_read_at,
    concurrent_read_modify_writes_through_update_lose_nothing,
);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put_event(key: &str, value: Bytes) -> KvEvent {
    KvEvent::Put {
        key: key.to_owned(),
        value,
    }
}

fn delete_event(key: &str) -> KvEvent {
    KvEvent::Delete {
        key: key.to_owned(),
    }
}

async fn next_event(watch: &mut BoxStream<'static, KvEvent>) -> anyhow::Result<KvEvent> {
    tokio::time::timeout(EVENT_TIMEOUT, watch.next())
        .await
        .context("no watch event in time")?
        .context("the watch stream ended")
}

/// Polls until `key` reads as absent; returns how long after `start` that was first seen.
async fn wait_until_absent(
    kv: &dyn KvStore,
    bucket: Bucket,
    key: &str,
    start: Instant,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if kv.get(bucket, key).await?.is_none() {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < deadline,
            "{}/{key} still present {:?} after it was written",
            bucket.name(),
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn a_put_value_is_read_back_and_an_overwrite_replaces_it(s: &Subject) -> anyhow::Result<()> {
    let kv = &*s.kv;
    kv.put(Bucket::Requests, "req-1", b("first")).await?;
    assert_eq!(kv.get(Bucket::Requests, "req-1").await?, Some(b("first")));
    kv.put(Bucket::Requests, "req-1", b("second")).await?;
    assert_eq!(kv.get(Bucket::Requests, "req-1").await?, Some(b("second")));
    Ok(())
}

async fn an_absent_key_reads_as_none(s: &Subject) -> anyhow::Result<()> {
    for bucket in Bucket::ALL {
        assert_eq!(s.kv.get(bucket, "never-written").await?, None);
    }
    Ok(())
}

async fn a_deleted_key_reads_as_none_and_deleting_an_absent_key_succeeds(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    kv.put(Bucket::Requests, "doomed", b("v")).await?;
    kv.delete(Bucket::Requests, "doomed").await?;
    assert_eq!(kv.get(Bucket::Requests, "doomed").await?, None);
    kv.delete(Bucket::Requests, "doomed").await?;
    kv.delete(Bucket::Requests, "never-written").await?;
    assert_eq!(kv.get(Bucket::Requests, "never-written").await?, None);
    // A deleted key can be written again.
    kv.put(Bucket::Requests, "doomed", b("back")).await?;
    assert_eq!(kv.get(Bucket::Requests, "doomed").await?, Some(b("back")));
    Ok(())
}

async fn create_stores_only_when_the_key_is_absent_and_again_after_a_delete(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    assert!(kv.create(Bucket::Interest, "exec-1", b("a")).await?);
    assert!(!kv.create(Bucket::Interest, "exec-1", b("b")).await?);
    assert_eq!(kv.get(Bucket::Interest, "exec-1").await?, Some(b("a")));

    kv.delete(Bucket::Interest, "exec-1").await?;
    assert!(kv.create(Bucket::Interest, "exec-1", b("c")).await?);
    assert!(!kv.create(Bucket::Interest, "exec-1", b("d")).await?);
    assert_eq!(kv.get(Bucket::Interest, "exec-1").await?, Some(b("c")));

    kv.put(Bucket::Interest, "exec-2", b("put")).await?;
    assert!(!kv.create(Bucket::Interest, "exec-2", b("create")).await?);
    assert_eq!(kv.get(Bucket::Interest, "exec-2").await?, Some(b("put")));
    Ok(())
}

async fn an_entry_disappears_once_its_bucket_ttl_has_passed_and_watchers_are_not_told(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let ttl = suite_ttls().sessions;
    let mut watch = kv.watch(Bucket::Sessions, "sess-1").await?;
    let start = Instant::now();
    kv.put(Bucket::Sessions, "sess-1", b("v")).await?;
    assert_eq!(next_event(&mut watch).await?, put_event("sess-1", b("v")));
    assert_eq!(kv.get(Bucket::Sessions, "sess-1").await?, Some(b("v")));

    let gone =
        wait_until_absent(kv, Bucket::Sessions, "sess-1", start, ttl + s.expiry_slack).await?;
    ensure!(
        gone + EARLY_TOLERANCE >= ttl,
        "gone after {gone:?}, before the {ttl:?} TTL"
    );

    // An expired key is free for `create`, and the expiry itself was not an event: the
    // next event is this create.
    assert!(kv.create(Bucket::Sessions, "sess-1", b("again")).await?);
    assert_eq!(
        next_event(&mut watch).await?,
        put_event("sess-1", b("again"))
    );
    Ok(())
}

async fn put_with_ttl_expires_before_the_bucket_ttl_and_a_plain_put_restores_it(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let ttl = Duration::from_secs(1);
    assert!(ttl * 10 < suite_ttls().requests);
    kv.put(Bucket::Requests, "short", b("old")).await?;
    let start = Instant::now();
    kv.put_with_ttl(Bucket::Requests, "short", b("new"), ttl)
        .await?;
    kv.put_with_ttl(Bucket::Requests, "renewed", b("v1"), ttl)
        .await?;
    kv.put(Bucket::Requests, "renewed", b("v2")).await?;
    assert_eq!(kv.get(Bucket::Requests, "short").await?, Some(b("new")));

    let gone =
        wait_until_absent(kv, Bucket::Requests, "short", start, ttl + s.expiry_slack).await?;
    ensure!(
        gone + EARLY_TOLERANCE >= ttl,
        "gone after {gone:?}, before its {ttl:?} TTL"
    );
    assert_eq!(kv.get(Bucket::Requests, "renewed").await?, Some(b("v2")));
    Ok(())
}

async fn put_with_ttl_is_capped_at_the_bucket_ttl(s: &Subject) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let ttl = suite_ttls().sessions;
    let start = Instant::now();
    kv.put_with_ttl(Bucket::Sessions, "long", b("v"), Duration::from_secs(3600))
        .await?;
    assert_eq!(kv.get(Bucket::Sessions, "long").await?, Some(b("v")));
    let gone = wait_until_absent(kv, Bucket::Sessions, "long", start, ttl + s.expiry_slack).await?;
    ensure!(
        gone + EARLY_TOLERANCE >= ttl,
        "gone after {gone:?}, before the {ttl:?} bucket TTL"
    );
    Ok(())
}

async fn buckets_are_isolated_from_each_other(s: &Subject) -> anyhow::Result<()> {
    let kv = &*s.kv;
    for bucket in Bucket::ALL {
        kv.put(bucket, "shared-key", b(bucket.name())).await?;
    }
    for bucket in Bucket::ALL {
        assert_eq!(kv.get(bucket, "shared-key").await?, Some(b(bucket.name())));
    }
    kv.delete(Bucket::Interest, "shared-key").await?;
    for bucket in Bucket::ALL {
        let expected = (bucket != Bucket::Interest).then(|| b(bucket.name()));
        assert_eq!(kv.get(bucket, "shared-key").await?, expected, "{bucket:?}");
    }
    assert!(kv.create(Bucket::Revoked, "only-here", b("r")).await?);
    for bucket in [Bucket::Sessions, Bucket::Requests, Bucket::Interest] {
        assert_eq!(kv.get(bucket, "only-here").await?, None, "{bucket:?}");
        assert!(kv.create(bucket, "only-here", b("x")).await?, "{bucket:?}");
    }
    Ok(())
}

async fn a_watch_sees_only_future_puts_and_deletes_of_its_own_key(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    kv.put(Bucket::Requests, "w", b("before")).await?;
    let mut watch = kv.watch(Bucket::Requests, "w").await?;

    // Neighbours: other keys (including ones that share a prefix), the same key elsewhere.
    kv.put(Bucket::Requests, "w-other", b("x")).await?;
    kv.put(Bucket::Requests, "w.sub", b("x")).await?;
    kv.put(Bucket::Requests, "other", b("x")).await?;
    kv.put(Bucket::Interest, "w", b("x")).await?;
    kv.put(Bucket::Requests, "w", b("v1")).await?;
    kv.delete(Bucket::Requests, "w-other").await?;
    kv.put(Bucket::Requests, "w", b("v2")).await?;
    kv.delete(Bucket::Requests, "w").await?;
    kv.delete(Bucket::Interest, "w").await?;
    assert!(kv.create(Bucket::Requests, "w", b("v3")).await?);
    kv.put_with_ttl(Bucket::Requests, "w", b("v4"), Duration::from_secs(20))
        .await?;

    // No initial value ("before"), nothing from the neighbours, the changes in order, the
    // latest always. A watcher behind the writes may miss intermediate values (the contract;
    // NATS buckets keep one revision per key, so a put the watch had not reached yet is
    // gone from the stream when the next lands), never the latest.
    let changes = [
        put_event("w", b("v1")),
        put_event("w", b("v2")),
        delete_event("w"),
        put_event("w", b("v3")),
        put_event("w", b("v4")),
    ];
    let mut seen = Vec::new();
    while seen.last() != changes.last() {
        seen.push(next_event(&mut watch).await?);
    }
    let mut rest = changes.iter();
    ensure!(
        seen.iter().all(|event| rest.any(|change| change == event)),
        "the watch's events are the key's changes in order, without others: {seen:?}"
    );

    // Nothing else is pending: after more neighbour traffic the next event is ours.
    kv.put(Bucket::Requests, "other", b("y")).await?;
    kv.put(Bucket::Requests, "w", b("last")).await?;
    assert_eq!(next_event(&mut watch).await?, put_event("w", b("last")));

    // Two watchers of one key both see its changes.
    let mut second = kv.watch(Bucket::Requests, "w").await?;
    kv.delete(Bucket::Requests, "w").await?;
    assert_eq!(next_event(&mut watch).await?, delete_event("w"));
    assert_eq!(next_event(&mut second).await?, delete_event("w"));
    Ok(())
}

async fn invalid_keys_are_refused_by_every_operation(s: &Subject) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let too_long = "k".repeat(257);
    let bad = [
        "",
        "has space",
        "star*",
        "gt>",
        ".leading-dot",
        "trailing-dot.",
        "ünïcode",
        "tab\there",
        "new\nline",
        "back\\slash",
        too_long.as_str(),
    ];
    let refused = |r: Result<(), StoreError>, op: &str, key: &str| match r {
        Err(StoreError::InvalidKey(k)) if k == key => Ok(()),
        other => Err(anyhow::anyhow!("{op}({key:?}) gave {other:?}")),
    };
    for key in bad {
        let bucket = Bucket::Requests;
        refused(kv.get(bucket, key).await.map(drop), "get", key)?;
        refused(kv.put(bucket, key, b("v")).await, "put", key)?;
        refused(
            kv.put_with_ttl(bucket, key, b("v"), Duration::from_secs(5))
                .await,
            "put_with_ttl",
            key,
        )?;
        refused(
            kv.create(bucket, key, b("v")).await.map(drop),
            "create",
            key,
        )?;
        refused(kv.delete(bucket, key).await, "delete", key)?;
        refused(
            kv.get_versioned(bucket, key).await.map(drop),
            "get_versioned",
            key,
        )?;
        refused(
            kv.update(bucket, key, b("v"), 0).await.map(drop),
            "update",
            key,
        )?;
        refused(kv.watch(bucket, key).await.map(drop), "watch", key)?;
    }
    // The widest valid key is fine everywhere.
    let widest = format!("A-z_0/9=.{}", "k".repeat(247));
    assert_eq!(widest.len(), 256);
    kv.put(Bucket::Requests, &widest, b("ok")).await?;
    assert_eq!(kv.get(Bucket::Requests, &widest).await?, Some(b("ok")));
    Ok(())
}

async fn values_with_arbitrary_bytes_round_trip(s: &Subject) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let mut noise = Vec::with_capacity(64 * 1024);
    let mut x: u32 = 0x9e37_79b9;
    while noise.len() < 64 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let values: Vec<Bytes> = vec![
        Bytes::new(),
        Bytes::from((0..=255u8).collect::<Vec<u8>>()),
        Bytes::from_static(b"\r\nNATS/1.0\r\nKV-Operation: DEL\r\n\r\n"),
        Bytes::from_static(b"\0\0\0"),
        Bytes::from(noise),
    ];
    let mut watch = kv.watch(Bucket::Requests, "bytes-watched").await?;
    for (i, value) in values.into_iter().enumerate() {
        let key = format!("bytes-{i}");
        kv.put(Bucket::Requests, &key, value.clone()).await?;
        assert_eq!(
            kv.get(Bucket::Requests, &key).await?,
            Some(value.clone()),
            "put {i}"
        );

        let key = format!("bytes-created-{i}");
        assert!(kv.create(Bucket::Requests, &key, value.clone()).await?);
        assert_eq!(
            kv.get(Bucket::Requests, &key).await?,
            Some(value.clone()),
            "create {i}"
        );

        let key = format!("bytes-ttl-{i}");
        kv.put_with_ttl(
            Bucket::Requests,
            &key,
            value.clone(),
            Duration::from_secs(20),
        )
        .await?;
        assert_eq!(
            kv.get(Bucket::Requests, &key).await?,
            Some(value.clone()),
            "ttl {i}"
        );

        kv.put(Bucket::Requests, "bytes-watched", value.clone())
            .await?;
        assert_eq!(
            next_event(&mut watch).await?,
            put_event("bytes-watched", value),
            "watch {i}"
        );
    }
    Ok(())
}

async fn an_update_replaces_only_the_revision_it_was_read_at(s: &Subject) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let bucket = Bucket::Clients;
    // Nothing there: read as absent, and an update at that revision creates the key.
    let empty = kv.get_versioned(bucket, "index").await?;
    assert_eq!(empty.value, None);
    assert!(kv.update(bucket, "index", b("one"), empty.revision).await?);
    // A second writer that read the same empty state loses.
    assert!(
        !kv.update(bucket, "index", b("lost"), empty.revision)
            .await?
    );
    let one = kv.get_versioned(bucket, "index").await?;
    assert_eq!(one.value, Some(b("one")));
    assert_ne!(one.revision, empty.revision);
    // A write in between (a plain put) makes the read stale.
    kv.put(bucket, "index", b("two")).await?;
    assert!(!kv.update(bucket, "index", b("stale"), one.revision).await?);
    assert_eq!(kv.get(bucket, "index").await?, Some(b("two")));
    let two = kv.get_versioned(bucket, "index").await?;
    assert!(kv.update(bucket, "index", b("three"), two.revision).await?);
    assert_eq!(kv.get(bucket, "index").await?, Some(b("three")));
    // After a delete: absent again, and only an update at the revision read then lands.
    let three = kv.get_versioned(bucket, "index").await?;
    kv.delete(bucket, "index").await?;
    assert!(
        !kv.update(bucket, "index", b("stale"), three.revision)
            .await?
    );
    let gone = kv.get_versioned(bucket, "index").await?;
    assert_eq!(gone.value, None);
    assert!(kv.update(bucket, "index", b("four"), gone.revision).await?);
    assert_eq!(kv.get(bucket, "index").await?, Some(b("four")));
    Ok(())
}

async fn concurrent_read_modify_writes_through_update_lose_nothing(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    // Sixteen writers each add their name to one list, read-modify-write with retries:
    // every name lands once (a plain get + put loses all but one of a racing round).
    let add = |i: usize| async move {
        loop {
            let read = kv.get_versioned(Bucket::Clients, "list").await?;
            let mut names: Vec<String> = match &read.value {
                Some(v) => serde_json::from_slice(v)?,
                None => Vec::new(),
            };
            names.push(format!("writer-{i}"));
            let bytes = Bytes::from(serde_json::to_vec(&names)?);
            if kv
                .update(Bucket::Clients, "list", bytes, read.revision)
                .await?
            {
                return anyhow::Ok(());
            }
        }
    };
    for r in futures::future::join_all((0..16).map(add)).await {
        r?;
    }
    let names: Vec<String> =
        serde_json::from_slice(&kv.get(Bucket::Clients, "list").await?.context("the list")?)?;
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 16, "{names:?}");
    assert_eq!(names.len(), 16, "{names:?}");
    Ok(())
}

async fn concurrent_creates_of_the_same_key_have_exactly_one_winner(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    // Round 0 races on a key never written; round 1 on one that was deleted.
    for round in 0..2 {
        let results = futures::future::join_all((0..16).map(|i| {
            kv.create(
                Bucket::Interest,
                "once",
                Bytes::from(format!("creator-{i}")),
            )
        }))
        .await;
        let mut winners = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            if r.with_context(|| format!("round {round}, creator {i}"))? {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(
            kv.get(Bucket::Interest, "once").await?,
            Some(Bytes::from(format!("creator-{}", winners[0]))),
            "round {round}"
        );
        kv.delete(Bucket::Interest, "once").await?;
    }
    Ok(())
}

async fn a_lease_has_one_holder_is_renewed_by_it_and_passes_on_after_its_ttl(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let ttl = Duration::from_secs(1);
    let start = Instant::now();
    assert!(
        kv.lease(Bucket::Interest, "lease.x", "replica-a", ttl)
            .await?
    );
    assert!(
        !kv.lease(Bucket::Interest, "lease.x", "replica-b", ttl)
            .await?
    );
    assert!(
        kv.lease(Bucket::Interest, "lease.x", "replica-a", ttl)
            .await?,
        "the holder renews"
    );
    assert_eq!(
        kv.get(Bucket::Interest, "lease.x").await?,
        Some(b("replica-a"))
    );
    // Not renewed: after its TTL another holder takes it.
    wait_until_absent(kv, Bucket::Interest, "lease.x", start, ttl + s.expiry_slack).await?;
    assert!(
        kv.lease(Bucket::Interest, "lease.x", "replica-b", ttl)
            .await?
    );
    assert!(
        !kv.lease(Bucket::Interest, "lease.x", "replica-a", ttl)
            .await?
    );
    // A deleted lease is free again.
    kv.delete(Bucket::Interest, "lease.x").await?;
    assert!(
        kv.lease(Bucket::Interest, "lease.x", "replica-a", ttl)
            .await?
    );
    Ok(())
}

async fn concurrent_takers_of_a_free_lease_have_exactly_one_winner(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = &*s.kv;
    let holders: Vec<String> = (0..8).map(|i| format!("replica-{i}")).collect();
    let results = futures::future::join_all(
        holders
            .iter()
            .map(|h| kv.lease(Bucket::Interest, "lease.race", h, Duration::from_secs(10))),
    )
    .await;
    let mut winners = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        if r.with_context(|| format!("taker {i}"))? {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners {winners:?}");
    assert_eq!(
        kv.get(Bucket::Interest, "lease.race").await?,
        Some(Bytes::from(holders[winners[0]].clone()))
    );
    Ok(())
}

async fn next_item(
    watch: &mut BoxStream<'static, BucketWatchItem>,
) -> anyhow::Result<BucketWatchItem> {
    tokio::time::timeout(EVENT_TIMEOUT, watch.next())
        .await
        .context("no bucket watch item in time")?
        .context("the bucket watch ended")
}

async fn a_bucket_watch_delivers_the_live_values_then_current_then_changes(
    s: &Subject,
) -> anyhow::Result<()> {
    let kv = s.kv.as_ref();
    let mut empty = kv.watch_bucket(Bucket::Clients).await?;
    ensure!(
        next_item(&mut empty).await? == BucketWatchItem::Current,
        "an empty bucket is current at once"
    );
    kv.put(Bucket::Revoked, "a", b("1")).await?;
    kv.put(Bucket::Revoked, "b", b("2")).await?;
    kv.put(Bucket::Revoked, "b", b("2b")).await?;
    kv.put(Bucket::Revoked, "gone", b("x")).await?;
    kv.delete(Bucket::Revoked, "gone").await?;
    kv.put(Bucket::Sessions, "elsewhere", b("s")).await?;
    let mut watch = kv.watch_bucket(Bucket::Revoked).await?;
    let mut initial = Vec::new();
    loop {
        match next_item(&mut watch).await? {
            BucketWatchItem::Current => break,
            BucketWatchItem::Change(KvEvent::Put { key, value }) => initial.push((key, value)),
            other => anyhow::bail!("only live values before Current, got {other:?}"),
        }
    }
    initial.sort();
    ensure!(
        initial == vec![("a".to_owned(), b("1")), ("b".to_owned(), b("2b"))],
        "initial values: {initial:?}"
    );
    kv.put(Bucket::Sessions, "elsewhere", b("s2")).await?;
    kv.put(Bucket::Revoked, "c", b("3")).await?;
    kv.delete(Bucket::Revoked, "a").await?;
    ensure!(
        next_item(&mut watch).await? == BucketWatchItem::Change(put_event("c", b("3"))),
        "a later put is seen, another bucket's is not"
    );
    ensure!(
        next_item(&mut watch).await?
            == BucketWatchItem::Change(KvEvent::Delete { key: "a".into() }),
        "a later delete is seen"
    );
    Ok(())
}

async fn the_store_reports_itself_healthy(s: &Subject) -> anyhow::Result<()> {
    assert!(s.kv.is_healthy().await);
    Ok(())
}

/// What only the NATS store has: buckets that may already exist, names, a server to lose.
mod nats_only {
    use super::*;
    use async_nats::jetstream;

    #[tokio::test]
    async fn an_existing_bucket_with_another_ttl_is_reported_and_used_as_it_is(
    ) -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let client = async_nats::connect(&server.url).await?;
        let js = jetstream::new(client.clone());
        // Made by someone else: 30 s instead of 2 s, no per-message TTL.
        let theirs = js
            .create_key_value(jetstream::kv::Config {
                bucket: "sessions".into(),
                max_age: Duration::from_secs(30),
                ..Default::default()
            })
            .await?;
        theirs.put("pre-existing", b("kept")).await?;

        let kv = NatsKv::open(client, suite_ttls(), None).await?;
        let mismatches = kv.config_mismatches();
        assert_eq!(mismatches.len(), 1, "{mismatches:?}");
        assert!(
            mismatches[0].contains("sessions")
                && mismatches[0].contains("30s")
                && mismatches[0].contains("2s"),
            "{mismatches:?}"
        );
        // Used as it is: the data survives and max_age is not changed...
        assert_eq!(
            kv.get(Bucket::Sessions, "pre-existing").await?,
            Some(b("kept"))
        );
        let info = js.get_stream("KV_sessions").await?.cached_info().clone();
        assert_eq!(info.config.max_age, Duration::from_secs(30));
        // ...but per-message TTL was switched on, so put_with_ttl works and expires.
        assert!(info.config.allow_message_ttl);
        let start = Instant::now();
        kv.put_with_ttl(Bucket::Sessions, "short", b("v"), Duration::from_secs(1))
            .await?;
        assert_eq!(kv.get(Bucket::Sessions, "short").await?, Some(b("v")));
        wait_until_absent(
            &kv,
            Bucket::Sessions,
            "short",
            start,
            Duration::from_secs(4),
        )
        .await?;
        Ok(())
    }

    #[tokio::test]
    async fn an_existing_bucket_shorter_than_configured_is_raised() -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let client = async_nats::connect(&server.url).await?;
        let js = jetstream::new(client.clone());
        // Made by an older gateway: revocations kept 10 s where 30 s are configured.
        js.create_key_value(jetstream::kv::Config {
            bucket: "revoked".into(),
            max_age: Duration::from_secs(10),
            ..Default::default()
        })
        .await?
        .put("kept", b("1"))
        .await?;
        let kv = NatsKv::open(client, suite_ttls(), None).await?;
        assert!(
            kv.config_mismatches().is_empty(),
            "{:?}",
            kv.config_mismatches()
        );
        let info = js.get_stream("KV_revoked").await?.cached_info().clone();
        assert_eq!(info.config.max_age, suite_ttls().revoked);
        assert_eq!(kv.get(Bucket::Revoked, "kept").await?, Some(b("1")));
        Ok(())
    }

    #[tokio::test]
    async fn buckets_have_their_plain_names_and_a_prefix_keeps_two_gateways_apart(
    ) -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let a = NatsKv::open(async_nats::connect(&server.url).await?, suite_ttls(), None).await?;
        let other = NatsKv::open(
            async_nats::connect(&server.url).await?,
            suite_ttls(),
            Some("gw2_"),
        )
        .await?;
        // A second replica of the first gateway opens the same buckets without complaint.
        let replica =
            NatsKv::open(async_nats::connect(&server.url).await?, suite_ttls(), None).await?;
        assert!(replica.config_mismatches().is_empty());

        let js = jetstream::new(async_nats::connect(&server.url).await?);
        for bucket in Bucket::ALL {
            for name in [bucket.name().to_owned(), format!("gw2_{}", bucket.name())] {
                let stream = js.get_stream(format!("KV_{name}")).await?;
                assert_eq!(stream.cached_info().config.max_age, suite_ttls().of(bucket));
            }
        }

        // A replica waits for a value another replica writes.
        let mut watch = replica.watch(Bucket::Requests, "r1").await?;
        a.put(Bucket::Requests, "r1", b("from-a")).await?;
        other.put(Bucket::Requests, "r1", b("from-other")).await?;
        assert_eq!(next_event(&mut watch).await?, put_event("r1", b("from-a")));
        assert_eq!(
            replica.get(Bucket::Requests, "r1").await?,
            Some(b("from-a"))
        );
        assert_eq!(
            other.get(Bucket::Requests, "r1").await?,
            Some(b("from-other"))
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_bad_prefix_is_a_config_error() -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let client = async_nats::connect(&server.url).await?;
        let r = NatsKv::open(client, suite_ttls(), Some("a.b")).await;
        assert!(matches!(r, Err(StoreError::Config(_))), "{r:?}");
        Ok(())
    }

    #[tokio::test]
    async fn losing_the_server_makes_the_store_unhealthy_and_operations_fail_as_unavailable(
    ) -> anyhow::Result<()> {
        let mut server = NatsServer::start().await?;
        let kv = NatsKv::open(async_nats::connect(&server.url).await?, suite_ttls(), None).await?;
        kv.put(Bucket::Requests, "k", b("v")).await?;
        let mut watch = kv.watch_bucket(Bucket::Revoked).await?;
        ensure!(next_item(&mut watch).await? == BucketWatchItem::Current);
        server.guard().stop(Duration::from_secs(3));
        // A bucket watch ends promptly, so its owner knows it is no longer current.
        let ended = tokio::time::timeout(Duration::from_secs(3), watch.next()).await;
        ensure!(
            matches!(ended, Ok(None)),
            "the bucket watch outlived the connection"
        );

        let deadline = Instant::now() + Duration::from_secs(5);
        while kv.is_healthy().await {
            ensure!(Instant::now() < deadline, "still healthy without a server");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let r = kv.get(Bucket::Requests, "k").await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        Ok(())
    }
}
