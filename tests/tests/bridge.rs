//! The NATS bridge end to end: a real nats-server, the `noetl-standin` binary publishing
//! events exactly as NoETL does (bursts, both subject shapes, the real traps), a real
//! `NoetlClient` pointed at the stand-in for status confirmation, and the in-memory K/V for
//! interest. The one double is [`RecordingBus`], an implementation of our own `Bus` trait
//! that records what the bridge publishes; the end-to-end suites use the real buses.
//!
//! Each test builds its own world (own nats-server, own stand-in) on free ports. Bridges
//! get their own NATS connection each, like replicas. Frames are compared after the
//! terminal frame arrived plus a settle period, so a late duplicate would be seen.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::ids::{ClientId, ExecutionId};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use origin::bridge::{self, Bridge, BridgeConfig, BridgeMode, CancellationToken};
use origin::bus::{Bus, BusError, StartAt, Subscription};
use origin::interest;
use origin::noetl::NoetlClient;
use origin::scrub::Scrubber;
use origin::store::memory::MemoryKv;
use origin::store::{BucketTtls, KvStore};
use serde_json::{json, Value};

/// How long a test waits for frames before failing.
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);
/// How long after the terminal frame a test keeps listening for strays and duplicates.
const SETTLE: Duration = Duration::from_millis(1200);

// ---------------------------------------------------------------------------------------
// The recording bus
// ---------------------------------------------------------------------------------------

/// One publish the bridge made.
#[derive(Debug, Clone)]
struct Recorded {
    /// Which bridge ("replica") published it.
    replica: &'static str,
    client_id: String,
    event: String,
    data: Bytes,
}

impl Recorded {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.data).expect("the bridge publishes JSON")
    }

    fn params(&self) -> Value {
        self.json()["params"].clone()
    }
}

/// Shared by every bridge of a test, so "each frame once in total" can be checked.
#[derive(Default)]
struct Log {
    frames: Mutex<Vec<Recorded>>,
    /// Execution id → the clients watching it (`Bus::watch`, or the test's `interest`).
    watchers: Mutex<std::collections::HashMap<String, Vec<String>>>,
}

impl Log {
    fn add_watcher(&self, execution_id: &str, client_id: &str) {
        let mut w = self.watchers.lock().expect("log lock");
        let list = w.entry(execution_id.to_owned()).or_default();
        if !list.iter().any(|c| c == client_id) {
            list.push(client_id.to_owned());
        }
    }

    fn watchers_of(&self, execution_id: &str) -> Vec<String> {
        self.watchers
            .lock()
            .expect("log lock")
            .get(execution_id)
            .cloned()
            .unwrap_or_default()
    }

    fn all(&self) -> Vec<Recorded> {
        self.frames.lock().expect("log lock").clone()
    }

    /// Frames for one execution, in publish order.
    fn for_execution(&self, execution_id: &str) -> Vec<Recorded> {
        self.all()
            .into_iter()
            .filter(|r| r.params()["execution_id"] == execution_id)
            .collect()
    }

    /// Waits for the execution's terminal frame, then `SETTLE`, and returns its frames.
    async fn until_terminal(&self, execution_id: &str) -> Vec<Recorded> {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        while !self
            .for_execution(execution_id)
            .iter()
            .any(|r| r.params()["terminal"] == true)
        {
            assert!(
                Instant::now() < deadline,
                "no terminal frame for {execution_id} within {FRAME_TIMEOUT:?}; got {:#?}",
                summary(&self.for_execution(execution_id))
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(SETTLE).await;
        self.for_execution(execution_id)
    }
}

/// A `Bus` that records; `fail_next` makes the next N publishes fail as if NATS were down.
/// `delay_us` + a random share of `jitter_us` is how long each publish takes (a slow or
/// uneven NATS); `in_flight` / `max_in_flight` count publishes under way.
struct RecordingBus {
    replica: &'static str,
    log: Arc<Log>,
    fail_next: AtomicUsize,
    ids: AtomicUsize,
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl RecordingBus {
    fn new(replica: &'static str, log: Arc<Log>) -> Arc<Self> {
        Arc::new(Self {
            replica,
            log,
            fail_next: AtomicUsize::new(0),
            ids: AtomicUsize::new(0),
            delay_us: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn publish_time(&self) -> Duration {
        let jitter = self.jitter_us.load(Ordering::SeqCst);
        let extra = if jitter > 0 {
            rand::random::<u64>() % jitter
        } else {
            0
        };
        Duration::from_micros(self.delay_us.load(Ordering::SeqCst) + extra)
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl RecordingBus {
    /// One publish (failing if the test injected a failure), recorded once per client.
    fn record(
        &self,
        clients: Vec<String>,
        event: String,
        data: Bytes,
    ) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move {
            let failing = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(BusError::Unavailable("injected by the test".into()));
            }
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let takes = self.publish_time();
            if !takes.is_zero() {
                tokio::time::sleep(takes).await;
            }
            {
                let mut frames = self.log.frames.lock().expect("log lock");
                for client_id in clients {
                    frames.push(Recorded {
                        replica: self.replica,
                        client_id,
                        event: event.clone(),
                        data: data.clone(),
                    });
                }
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(self.ids.fetch_add(1, Ordering::SeqCst) as u64 + 1)
        })
    }
}

// `Bus` is an `#[async_trait]` trait; these are the signatures that macro expands to
// (this crate does not depend on async-trait).
impl Bus for RecordingBus {
    fn publish_external<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        subject: &'life1 str,
        _data: Bytes,
        _msg_id: &'life2 str,
    ) -> BoxFuture<'async_trait, Result<(), BusError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let subject = subject.to_owned();
        Box::pin(async move { Err(BusError::Unavailable(format!("no subject {subject} here"))) })
    }

    fn has_external_subjects(&self) -> bool {
        false
    }

    fn unwatched(&self, _client_id: &ClientId) -> Option<std::ops::RangeInclusive<u64>> {
        None
    }

    // Records every publish, keyed or not: the tests count what the bridge sent.
    fn publish_once<'life0, 'life1, 'life2, 'life3, 'async_trait>(
        &'life0 self,
        client_id: &'life1 ClientId,
        event: &'life2 str,
        data: Bytes,
        _key: &'life3 str,
    ) -> BoxFuture<'async_trait, Result<u64, BusError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        'life3: 'async_trait,
        Self: 'async_trait,
    {
        self.publish(client_id, event, data)
    }

    fn publish<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        client_id: &'life1 ClientId,
        event: &'life2 str,
        data: Bytes,
    ) -> BoxFuture<'async_trait, Result<u64, BusError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.record(vec![client_id.to_string()], event.to_owned(), data)
    }

    // A run's frame is recorded once per watcher, as the real buses deliver it.
    fn publish_run<'life0, 'life1, 'life2, 'life3, 'async_trait>(
        &'life0 self,
        execution_id: &'life1 ExecutionId,
        event: &'life2 str,
        data: Bytes,
        _key: &'life3 str,
    ) -> BoxFuture<'async_trait, Result<u64, BusError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        'life3: 'async_trait,
        Self: 'async_trait,
    {
        let watchers = self.log.watchers_of(execution_id.as_str());
        self.record(watchers, event.to_owned(), data)
    }

    fn watch<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        client_id: &'life1 ClientId,
        execution_id: &'life2 ExecutionId,
    ) -> BoxFuture<'async_trait, Result<(), BusError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.log
            .add_watcher(execution_id.as_str(), client_id.as_str());
        Box::pin(async { Ok(()) })
    }

    fn subscribe_with<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _client_id: &'life1 ClientId,
        _start: StartAt,
        _watching: &'life2 [ExecutionId],
    ) -> BoxFuture<'async_trait, Result<Subscription, BusError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            Ok(Subscription {
                reset: false,
                frames: futures::stream::empty().boxed(),
                position: None,
            })
        })
    }

    fn is_healthy<'life0, 'async_trait>(&'life0 self) -> BoxFuture<'async_trait, bool>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async { true })
    }
}

// ---------------------------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------------------------

/// One test's processes and shared state.
struct World {
    nats: NatsServer,
    standin: StandIn,
    kv: Arc<MemoryKv>,
    log: Arc<Log>,
    noetl: NoetlClient,
    http: reqwest::Client,
}

/// A running bridge with its own NATS connection ("a replica").
struct Replica {
    bridge: Bridge,
    stop: CancellationToken,
    conn: async_nats::Client,
    bus: Arc<RecordingBus>,
}

impl Replica {
    /// Stops the bridge and closes its connection, as a replica going down would.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.bridge.task)
            .await
            .expect("the bridge stops within 10 s of shutdown")
            .expect("the bridge task does not panic");
        let _ = self.conn.drain().await;
    }
}

impl World {
    /// nats-server + a stand-in publishing there (`python_events` picks the shape).
    async fn start(python_events: bool) -> Self {
        Self::start_with(StandInOptions {
            python_events,
            ..Default::default()
        })
        .await
    }

    /// Like [`World::start`] with any stand-in options (`nats_url` is filled in).
    async fn start_with(opts: StandInOptions) -> Self {
        let nats = NatsServer::start().await.expect("nats-server starts");
        let standin = StandIn::start(StandInOptions {
            nats_url: Some(nats.url.clone()),
            ..opts
        })
        .await
        .expect("the stand-in starts");
        let world = Self::with(nats, standin);
        world.wait_for_stream().await;
        world
    }

    fn with(nats: NatsServer, standin: StandIn) -> Self {
        let noetl = NoetlClient::new(
            reqwest::Url::parse(&standin.url).expect("stand-in URL"),
            Duration::from_secs(2),
            Duration::from_secs(5),
            1,
            "/api/health".into(),
        )
        .expect("NoETL client builds");
        Self {
            nats,
            standin,
            kv: Arc::new(MemoryKv::new(BucketTtls::default())),
            log: Arc::default(),
            noetl,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
        }
    }

    async fn connect(&self) -> async_nats::Client {
        async_nats::connect(&self.nats.url)
            .await
            .expect("NATS accepts a connection")
    }

    /// The stand-in creates `noetl_events` as it starts; wait until it is there, so the
    /// bridge picks the durable mode.
    async fn wait_for_stream(&self) {
        let js = jetstream::new(self.connect().await);
        let deadline = Instant::now() + Duration::from_secs(10);
        while js.get_stream("noetl_events").await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the stand-in never created noetl_events"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn bridge(&self, replica: &'static str) -> Replica {
        self.bridge_with(replica, BridgeConfig::default()).await
    }

    async fn bridge_with(&self, replica: &'static str, config: BridgeConfig) -> Replica {
        let conn = self.connect().await;
        let bus = RecordingBus::new(replica, self.log.clone());
        let stop = CancellationToken::new();
        let kv: Arc<dyn KvStore> = self.kv.clone();
        let bus_dyn: Arc<dyn Bus> = bus.clone();
        let bridge = bridge::spawn(
            Some(conn.clone()),
            kv,
            bus_dyn,
            self.noetl.clone(),
            Scrubber::default(),
            config,
            stop.clone(),
        )
        .await
        .expect("the bridge starts");
        Replica {
            bridge,
            stop,
            conn,
            bus,
        }
    }

    /// `POST /api/execute`; the execution id exactly as NoETL wrote it (a string).
    async fn execute(&self, path: &str) -> String {
        let v: Value = self
            .http
            .post(format!("{}/api/execute", self.standin.url))
            .json(&json!({ "path": path, "workload": {} }))
            .send()
            .await
            .expect("the stand-in answers /api/execute")
            .json()
            .await
            .expect("JSON");
        v["execution_id"]
            .as_str()
            .unwrap_or_else(|| panic!("execution_id is a string: {v}"))
            .to_owned()
    }

    async fn interest(&self, execution_id: &str, client_id: &str) {
        let execution_id = ExecutionId::parse(execution_id).expect("a valid execution id");
        let client_id = ClientId::parse(client_id).expect("a valid client id");
        self.log
            .add_watcher(execution_id.as_str(), client_id.as_str());
        interest::add_interest(
            &*self.kv,
            &execution_id,
            &client_id,
            interest::Interested::Owner,
        )
        .await
        .expect("interest recorded");
    }

    /// Polls NoETL's status until it is final.
    async fn wait_final(&self, execution_id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self
                .noetl
                .execution_status(execution_id)
                .await
                .expect("status");
            let s = v["status"].as_str().unwrap_or_default().to_owned();
            if s != "RUNNING" {
                return s;
            }
            assert!(Instant::now() < deadline, "{execution_id} never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the stand-in has published everything it queued.
    async fn wait_published(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.standin.stats().await;
            let e = &s["events"];
            let queued = e["queued"].as_u64().unwrap_or(0);
            let settled = e["published"].as_u64().unwrap_or(0)
                + e["dropped"].as_u64().unwrap_or(0)
                + e["skipped"].as_u64().unwrap_or(0);
            if queued > 0 && settled >= queued {
                return;
            }
            assert!(Instant::now() < deadline, "events never published: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `(event_type, step_name, status, terminal)` per frame, for readable assertions.
fn summary(frames: &[Recorded]) -> Vec<(String, Option<String>, Option<String>, bool)> {
    frames
        .iter()
        .map(|r| {
            let p = r.params();
            (
                p["event_type"].as_str().unwrap_or("?").to_owned(),
                p["step_name"].as_str().map(str::to_owned),
                p["status"].as_str().map(str::to_owned),
                p["terminal"] == true,
            )
        })
        .collect()
}

fn types(frames: &[Recorded]) -> Vec<String> {
    summary(frames).into_iter().map(|s| s.0).collect()
}

/// The frames of demo/steps from the Rust server, in order: `step.exit` comes from
/// `command.completed`, and the real server emits `step.enter` after it.
const STEPS_RUST: [&str; 8] = [
    "playbook.started",
    "step.exit",
    "step.enter",
    "step.exit",
    "step.enter",
    "step.exit",
    "step.enter",
    "playbook.completed",
];

/// Asserts the shape every frame must have, and exactly one terminal frame, last.
fn assert_well_formed(frames: &[Recorded], execution_id: &str, client_id: &str) {
    assert!(!frames.is_empty());
    for r in frames {
        assert_eq!(r.event, "playbook/state");
        assert_eq!(r.client_id, client_id);
        let v = r.json();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["method"], "playbook/state");
        // A JSON string with every digit, never a number.
        assert_eq!(
            v["params"]["execution_id"],
            Value::String(execution_id.into())
        );
        let text = std::str::from_utf8(&r.data).expect("UTF-8");
        assert!(
            text.contains(&format!("\"execution_id\":\"{execution_id}\"")),
            "{text}"
        );
        assert!(
            v["params"]["at"].as_str().is_some_and(|a| a.ends_with('Z')),
            "{v}"
        );
    }
    let terminals: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, r)| r.params()["terminal"] == true)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        terminals,
        [frames.len() - 1],
        "exactly one terminal frame, last: {:#?}",
        summary(frames)
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn steps_become_started_step_frames_and_one_completed_terminal_in_order() {
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    assert_eq!(
        replica.bridge.mode,
        BridgeMode::Durable {
            stream: "noetl_events".into()
        }
    );

    let id = w.execute("demo/steps").await;
    assert!(
        id.parse::<u64>().is_ok_and(|n| n > 1 << 53),
        "ids exceed 2^53: {id}"
    );
    w.interest(&id, "client-1").await;

    let frames = w.log.until_terminal(&id).await;
    assert_eq!(types(&frames), STEPS_RUST, "{:#?}", summary(&frames));
    assert_well_formed(&frames, &id, "client-1");
    let s = summary(&frames);
    let steps: Vec<_> = s
        .iter()
        .filter(|f| f.0 == "step.exit")
        .map(|f| f.1.clone())
        .collect();
    assert_eq!(
        steps,
        [
            Some("step_1".into()),
            Some("step_2".into()),
            Some("step_3".into())
        ]
    );
    assert_eq!(s[0].1, None, "playbook frames name no step");
    assert_eq!(s[7].2.as_deref(), Some("COMPLETED"));
    replica.stop().await;
}

#[tokio::test]
async fn every_interested_client_gets_the_same_bytes() {
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    let id = w.execute("demo/echo").await;
    w.interest(&id, "client-a").await;
    w.interest(&id, "client-b").await;
    let frames = w.log.until_terminal(&id).await;
    let of = |c: &str| -> Vec<Bytes> {
        frames
            .iter()
            .filter(|r| r.client_id == c)
            .map(|r| r.data.clone())
            .collect()
    };
    assert!(!of("client-a").is_empty());
    assert_eq!(of("client-a"), of("client-b"));
    replica.stop().await;
}

#[tokio::test]
async fn a_failed_step_ends_with_playbook_failed_though_noetl_never_sent_it() {
    let w = World::start(false).await;
    // Watch the raw events too, to show what NoETL did (not) publish.
    let mut raw = w
        .connect()
        .await
        .subscribe("noetl.events.>")
        .await
        .expect("subscribe");
    let replica = w.bridge("a").await;

    let id = w.execute("demo/fail").await;
    w.interest(&id, "client-1").await;
    let frames = w.log.until_terminal(&id).await;

    let s = summary(&frames);
    assert_eq!(
        types(&frames),
        ["playbook.started", "step.failed", "playbook.failed"],
        "{s:#?}"
    );
    assert_eq!(s[1].1.as_deref(), Some("fail_step"));
    assert_eq!(s[2].2.as_deref(), Some("FAILED"));
    assert!(s[2].3, "playbook.failed is terminal");
    assert_well_formed(&frames, &id, "client-1");
    assert_eq!(w.wait_final(&id).await, "FAILED");

    let mut published = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), raw.next()).await {
        published.push(m.subject.to_string());
    }
    assert!(
        published.iter().any(|s| s == "noetl.events.command.failed"),
        "{published:?}"
    );
    assert!(
        published.iter().any(|s| s == "noetl.events.call.error"),
        "{published:?}"
    );
    assert!(
        !published
            .iter()
            .any(|s| s.contains("playbook.failed") || s.contains("playbook_failed")),
        "NoETL published no playbook.failed: {published:?}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn a_lying_playbook_completed_becomes_playbook_failed() {
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    let id = w.execute("demo/lying").await;
    w.interest(&id, "client-1").await;
    let frames = w.log.until_terminal(&id).await;
    let s = summary(&frames);
    let last = s.last().expect("frames");
    assert_eq!(
        (last.0.as_str(), last.2.as_deref(), last.3),
        ("playbook.failed", Some("FAILED"), true),
        "{s:#?}"
    );
    assert!(
        !types(&frames).contains(&"playbook.completed".to_owned()),
        "{s:#?}"
    );
    assert_well_formed(&frames, &id, "client-1");
    replica.stop().await;
}

#[tokio::test]
async fn two_bridges_on_one_nats_record_each_frame_once_in_total() {
    let w = World::start(false).await;
    let a = w.bridge("a").await;
    let b = w.bridge("b").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = w.execute("demo/steps").await;
        w.interest(&id, &format!("client-{i}")).await;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let frames = w.log.until_terminal(id).await;
        // Across replicas the order is not guaranteed; the multiset and the count are.
        let mut got = types(&frames);
        got.sort();
        let mut want: Vec<String> = STEPS_RUST.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(got, want, "{id}: {:#?}", summary(&frames));
        assert_eq!(
            frames
                .iter()
                .filter(|r| r.params()["terminal"] == true)
                .count(),
            1
        );
        assert!(frames.iter().all(|r| r.client_id == format!("client-{i}")));
    }
    let by_replica = |name| w.log.all().iter().filter(|r| r.replica == name).count();
    eprintln!(
        "frames published by replica a: {}, b: {}",
        by_replica("a"),
        by_replica("b")
    );
    assert_eq!(by_replica("a") + by_replica("b"), 4 * STEPS_RUST.len());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn events_published_while_no_bridge_runs_are_delivered_when_one_starts() {
    let w = World::start(false).await;
    // A first start creates the durable consumer; then every "replica" goes down.
    w.bridge("first").await.stop().await;

    let id = w.execute("demo/steps").await;
    w.interest(&id, "client-1").await;
    assert_eq!(w.wait_final(&id).await, "COMPLETED");
    w.wait_published().await;
    assert!(w.log.all().is_empty(), "nothing runs yet");

    let replica = w.bridge("second").await;
    let frames = w.log.until_terminal(&id).await;
    assert_eq!(types(&frames), STEPS_RUST, "{:#?}", summary(&frames));
    assert_well_formed(&frames, &id, "client-1");
    replica.stop().await;
}

#[tokio::test]
async fn interest_recorded_late_still_gets_every_frame_in_order() {
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    let id = w.execute("demo/steps").await;
    // The whole run is over and published before anyone is interested.
    assert_eq!(w.wait_final(&id).await, "COMPLETED");
    w.wait_published().await;
    wait_seen_by_bridge(&w).await;
    assert!(w.log.all().is_empty());

    w.interest(&id, "client-late").await;
    let frames = w.log.until_terminal(&id).await;
    assert_eq!(types(&frames), STEPS_RUST, "{:#?}", summary(&frames));
    assert_well_formed(&frames, &id, "client-late");
    replica.stop().await;
}

#[tokio::test]
async fn interest_recorded_mid_run_keeps_frames_in_order() {
    // Slow steps: new events keep arriving while the first ones wait for a redelivery.
    let w = World::start_with(StandInOptions {
        step_delay_ms: Some(700),
        ..Default::default()
    })
    .await;
    let replica = w.bridge("a").await;
    let id = w.execute("demo/steps").await;
    // Wait until the first burst reached NATS (and so the bridge, which retries it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.standin.stats().await["events"]["published"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "no events published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_seen_by_bridge(&w).await;
    assert!(w.log.all().is_empty());
    w.interest(&id, "client-mid").await;
    let frames = w.log.until_terminal(&id).await;
    assert_eq!(types(&frames), STEPS_RUST, "{:#?}", summary(&frames));
    assert_well_formed(&frames, &id, "client-mid");
    replica.stop().await;
}

#[tokio::test]
async fn events_nobody_is_interested_in_are_dropped_after_the_wait() {
    let w = World::start(false).await;
    let config = BridgeConfig {
        max_interest_wait: Duration::from_secs(2),
        ..Default::default()
    };
    let replica = w.bridge_with("a", config).await;
    let id = w.execute("demo/echo").await;
    assert_eq!(w.wait_final(&id).await, "COMPLETED");
    w.wait_published().await;
    wait_seen_by_bridge(&w).await;
    // Past the interest wait (2 s) every event is acked, i.e. dropped.
    assert_consumer_drained_within(&w, Duration::from_secs(10)).await;
    // Interest after the wait: the events are gone, and nothing is stuck un-acked.
    w.interest(&id, "client-too-late").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.log.for_execution(&id).is_empty());
    let js = jetstream::new(w.connect().await);
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("noetl_events")
        .await
        .expect("stream")
        .get_consumer("gateway-bridge")
        .await
        .expect("consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
    replica.stop().await;
}

#[tokio::test]
async fn python_shaped_events_are_forwarded_too() {
    let w = World::start(true).await;
    let replica = w.bridge("a").await;
    assert_eq!(
        replica.bridge.mode,
        BridgeMode::Durable {
            stream: "noetl_events".into()
        }
    );

    let id = w.execute("demo/steps").await;
    w.interest(&id, "client-1").await;
    let frames = w.log.until_terminal(&id).await;
    // The Python server: step_started → step.enter, step_completed → step.exit.
    assert_eq!(
        types(&frames),
        [
            "playbook.started",
            "step.enter",
            "step.exit",
            "step.enter",
            "step.exit",
            "step.enter",
            "step.exit",
            "playbook.completed"
        ],
        "{:#?}",
        summary(&frames)
    );
    assert_well_formed(&frames, &id, "client-1");

    let id = w.execute("demo/fail").await;
    w.interest(&id, "client-2").await;
    let frames = w.log.until_terminal(&id).await;
    assert_eq!(
        types(&frames),
        [
            "playbook.started",
            "step.enter",
            "step.failed",
            "playbook.failed"
        ],
        "{:#?}",
        summary(&frames)
    );
    assert_well_formed(&frames, &id, "client-2");
    replica.stop().await;
}

#[tokio::test]
async fn a_malformed_message_is_skipped_and_later_events_still_flow() {
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    let js = jetstream::new(w.connect().await);
    for payload in [
        &b"\xff not json at all"[..],
        b"[1,2,3]",
        br#"{"event_type":"playbook_started","execution_id":6.1e17}"#,
        br#"{"event_type":"step.enter"}"#,
    ] {
        js.publish("noetl.events.x", Bytes::copy_from_slice(payload))
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let id = w.execute("demo/steps").await;
    w.interest(&id, "client-1").await;
    let frames = w.log.until_terminal(&id).await;
    assert_eq!(types(&frames), STEPS_RUST, "{:#?}", summary(&frames));

    // Everything was acked, the garbage included: nothing pending, nothing looping.
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("noetl_events")
        .await
        .expect("stream")
        .get_consumer("gateway-bridge")
        .await
        .expect("consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "{info:?}");
    replica.stop().await;
}

#[tokio::test]
async fn a_bus_failure_is_retried_and_no_frame_is_lost() {
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    replica.bus.fail_next.store(3, Ordering::SeqCst);
    let id = w.execute("demo/steps").await;
    w.interest(&id, "client-1").await;
    let frames = w.log.until_terminal(&id).await;
    assert_eq!(
        replica.bus.fail_next.load(Ordering::SeqCst),
        0,
        "the failures happened"
    );
    assert_eq!(types(&frames), STEPS_RUST, "{:#?}", summary(&frames));
    assert_well_formed(&frames, &id, "client-1");
    replica.stop().await;
}

#[tokio::test]
async fn without_a_stream_two_replicas_follow_each_run_over_http_and_send_each_frame_once() {
    // A stand-in without NATS publishes nothing: NoETL's execution record is the only
    // signal. Two bridges find no stream and follow the runs over HTTP, one replica per
    // run (the lease), every frame once, in the record's order.
    let nats = NatsServer::start().await.expect("nats-server starts");
    let standin = StandIn::start(StandInOptions::default())
        .await
        .expect("the stand-in starts");
    let w = World::with(nats, standin);
    let a = w.bridge("a").await;
    let b = w.bridge("b").await;
    assert_eq!(a.bridge.mode, BridgeMode::Poll);
    assert_eq!(b.bridge.mode, BridgeMode::Poll);

    let ids = [
        w.execute("demo/steps").await,
        w.execute("demo/steps").await,
        w.execute("demo/fail").await,
    ];
    for (i, id) in ids.iter().enumerate() {
        w.interest(id, &format!("client-{i}")).await;
    }
    for (i, id) in ids.iter().enumerate() {
        let frames = w.log.until_terminal(id).await;
        let want: &[&str] = if i < 2 {
            &STEPS_RUST
        } else {
            &["playbook.started", "step.failed", "playbook.failed"]
        };
        assert_eq!(types(&frames), want, "{:#?}", summary(&frames));
        assert_well_formed(&frames, id, &format!("client-{i}"));
        let replicas: std::collections::HashSet<_> = frames.iter().map(|f| f.replica).collect();
        assert_eq!(replicas.len(), 1, "one replica follows a run: {replicas:?}");
    }
    a.stop().await;
    b.stop().await;
}

/// A fresh big event id.
fn rand_id() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(800_000_000_000_000_000);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A NoETL `command.completed` row (the bridge makes it a `step.exit` frame for `step`).
fn step_row(execution_id: &str, step: &str) -> Bytes {
    format!(
        r#"{{"event_id":{},"event_type":"command.completed","execution_id":{execution_id},"node_name":"{step}","status":"COMPLETED","event_time":"2026-11-22T10:00:00Z"}}"#,
        rand_id()
    )
    .into()
}

/// Publishes `rows` into `noetl_events` in this order (one connection, so the stream
/// holds them in this order) and waits until every one is stored.
async fn publish_rows(js: &jetstream::Context, rows: Vec<Bytes>) {
    let mut acks = Vec::with_capacity(rows.len());
    for row in rows {
        acks.push(
            js.publish("noetl.events.command.completed", row)
                .await
                .expect("publish"),
        );
    }
    for ack in futures::future::join_all(acks.into_iter().map(IntoFuture::into_future)).await {
        ack.expect("stored");
    }
}

/// The step names of the frames `client_id` got, in publish order.
fn steps_of(log: &Log, client_id: &str) -> Vec<String> {
    log.all()
        .iter()
        .filter(|r| r.client_id == client_id)
        .map(|r| r.params()["step_name"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Waits until `client_ids` together got `want` frames (or fails after `within`).
async fn wait_frames(log: &Log, want: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = log.all().len();
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {want} frames within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the bridge's durable consumer has delivered every event in the stream at
/// least once (the bridge has seen them all, whatever it did with them).
async fn wait_seen_by_bridge(w: &World) {
    let js = jetstream::new(w.connect().await);
    let mut stream = js.get_stream("noetl_events").await.expect("stream");
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer("gateway-bridge")
        .await
        .expect("consumer");
    let deadline = Instant::now() + FRAME_TIMEOUT;
    loop {
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        let info = consumer.info().await.expect("consumer info");
        if last > 0 && info.delivered.stream_sequence >= last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge never saw event {last}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the durable consumer has nothing un-acked and nothing undelivered left.
async fn assert_consumer_drained(w: &World) {
    assert_consumer_drained_within(w, Duration::from_secs(5)).await;
}

/// [`assert_consumer_drained`], waiting up to `within` for it.
async fn assert_consumer_drained_within(w: &World, within: Duration) {
    let js = jetstream::new(w.connect().await);
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("noetl_events")
        .await
        .expect("stream")
        .get_consumer("gateway-bridge")
        .await
        .expect("consumer");
    let deadline = Instant::now() + within;
    loop {
        let info = consumer.info().await.expect("consumer info");
        if (info.num_ack_pending, info.num_pending) == (0, 0) {
            return;
        }
        assert!(Instant::now() < deadline, "left on the consumer: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn interleaved_executions_each_keep_their_order_under_concurrency() {
    // Many executions, their step events interleaved in the stream, handled by 32 workers
    // while every publish takes a random 0–3 ms: if two events of one execution were ever
    // handled concurrently or out of delivery order, their frames would swap. Half the
    // executions are only watched once their events are flowing, so those events are
    // NAKed, parked behind each other and redelivered while the rest stream past.
    const EXECUTIONS: usize = 16;
    const STEPS: usize = 30;
    let w = World::start(false).await;
    let replica = w.bridge("a").await;
    replica.bus.jitter_us.store(3_000, Ordering::SeqCst);
    let id = |i: usize| format!("71000000000000{i:04}");
    let client = |i: usize| format!("client-{i}");
    for i in (0..EXECUTIONS).step_by(2) {
        w.interest(&id(i), &client(i)).await;
    }
    let js = jetstream::new(w.connect().await);
    let mut rows = Vec::new();
    for j in 0..STEPS {
        for i in 0..EXECUTIONS {
            rows.push(step_row(&id(i), &format!("s{j:02}")));
        }
    }
    let later = rows.split_off(rows.len() / 3);
    publish_rows(&js, rows).await;
    for i in (1..EXECUTIONS).step_by(2) {
        w.interest(&id(i), &client(i)).await;
    }
    publish_rows(&js, later).await;

    wait_frames(&w.log, EXECUTIONS * STEPS, FRAME_TIMEOUT).await;
    tokio::time::sleep(SETTLE).await;
    let want: Vec<String> = (0..STEPS).map(|j| format!("s{j:02}")).collect();
    for i in 0..EXECUTIONS {
        assert_eq!(
            steps_of(&w.log, &client(i)),
            want,
            "execution {i} ({}) got its frames out of order or not exactly once",
            if i % 2 == 0 {
                "watched from the start"
            } else {
                "watched late"
            }
        );
    }
    assert_eq!(w.log.all().len(), EXECUTIONS * STEPS, "no duplicates");
    assert!(
        replica.bus.max_in_flight.load(Ordering::SeqCst) > 1,
        "executions were handled concurrently"
    );
    assert_consumer_drained(&w).await;
    replica.stop().await;
}

#[tokio::test]
async fn different_executions_are_handled_concurrently_up_to_the_worker_count() {
    // One event for each of 64 executions, every publish taking 100 ms: handled one at a
    // time that is 6.4 s and one publish in flight; with 16 workers, many at once and
    // never more than 16.
    const EXECUTIONS: usize = 64;
    const WORKERS: usize = 16;
    let w = World::start(false).await;
    let replica = w
        .bridge_with(
            "a",
            BridgeConfig {
                concurrency: WORKERS,
                ..Default::default()
            },
        )
        .await;
    replica.bus.delay_us.store(100_000, Ordering::SeqCst);
    let id = |i: usize| format!("72000000000000{i:04}");
    for i in 0..EXECUTIONS {
        w.interest(&id(i), &format!("client-{i}")).await;
    }
    let js = jetstream::new(w.connect().await);
    let started = Instant::now();
    publish_rows(
        &js,
        (0..EXECUTIONS).map(|i| step_row(&id(i), "s")).collect(),
    )
    .await;
    wait_frames(&w.log, EXECUTIONS, FRAME_TIMEOUT).await;
    let took = started.elapsed();
    let max = replica.bus.max_in_flight.load(Ordering::SeqCst);
    eprintln!("{EXECUTIONS} events in {took:?}, at most {max} publishes in flight");
    assert!(max >= WORKERS / 2, "only {max} events handled at once");
    assert!(
        max <= WORKERS,
        "{max} events at once with {WORKERS} workers"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(w.log.all().len(), EXECUTIONS, "each once");
    assert_consumer_drained(&w).await;
    replica.stop().await;
}

#[tokio::test]
async fn a_replica_stopped_under_load_gives_back_what_it_did_not_handle() {
    // Replica a is slow (30 ms a publish, 4 workers, so events queue up) and is stopped in
    // the middle of 300 events. It must stop promptly, acking only what it handled; what
    // it still had queued is NAKed, so replica b gets it at once rather than after the
    // ack wait. At most the message or two the NATS client had pulled ahead of the reader
    // (batch 1 here) waits for the ack wait. Every event ends up forwarded.
    const EVENTS: usize = 300;
    let ack_wait = Duration::from_secs(8);
    let config = BridgeConfig {
        concurrency: 4,
        batch: 1,
        ack_wait,
        ..Default::default()
    };
    let w = World::start(false).await;
    let a = w.bridge_with("a", config.clone()).await;
    a.bus.delay_us.store(30_000, Ordering::SeqCst);
    let id = |i: usize| format!("73000000000000{i:04}");
    for i in 0..EVENTS {
        w.interest(&id(i), &format!("client-{i}")).await;
    }
    let js = jetstream::new(w.connect().await);
    publish_rows(&js, (0..EVENTS).map(|i| step_row(&id(i), "s")).collect()).await;
    wait_frames(&w.log, 20, FRAME_TIMEOUT).await;
    let stopping = Instant::now();
    a.stop().await;
    let by_a = w.log.all().len();
    eprintln!(
        "replica a forwarded {by_a} events and stopped in {:?}",
        stopping.elapsed()
    );
    assert!(by_a < EVENTS, "a was stopped under load, not after it");

    let b = w.bridge_with("b", config).await;
    let restarted = Instant::now();
    // All but the pulled-ahead message(s) come back at once (the shutdown NAKs)...
    wait_frames(&w.log, EVENTS - 2, Duration::from_secs(6)).await;
    // ... and those after the ack wait.
    wait_frames(&w.log, EVENTS, ack_wait + Duration::from_secs(10)).await;
    eprintln!("b forwarded the rest in {:?}", restarted.elapsed());
    tokio::time::sleep(SETTLE).await;
    let frames = w.log.all();
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for r in &frames {
        *seen.entry(r.client_id.clone()).or_default() += 1;
    }
    for i in 0..EVENTS {
        assert!(
            seen.contains_key(&format!("client-{i}")),
            "event {i} was lost"
        );
    }
    // A graceful stop: a's workers finished (and acked) the events in hand and NAKed the
    // rest without forwarding them, and its connection was drained, so b forwards none of
    // a's events again.
    let duplicates = frames.len() - seen.len();
    assert_eq!(
        duplicates, 0,
        "events forwarded by a and again by b after a graceful stop"
    );
    assert_consumer_drained(&w).await;
    b.stop().await;
}

/// Counts `event_type` among `frames`.
fn count_of(frames: &[Recorded], event_type: &str) -> usize {
    types(frames).iter().filter(|t| *t == event_type).count()
}

/// Two replicas on one NATS, each with a slow bus and batches of one, so one run's events
/// spread over both and a publish takes long enough for the other replica to act meanwhile.
async fn two_slow_bridges(w: &World) -> (Replica, Replica) {
    let config = BridgeConfig {
        batch: 1,
        ..Default::default()
    };
    let a = w.bridge_with("a", config.clone()).await;
    let b = w.bridge_with("b", config).await;
    for r in [&a, &b] {
        r.bus.delay_us.store(50_000, Ordering::SeqCst);
    }
    (a, b)
}

#[tokio::test]
async fn two_bridges_send_one_step_failed_and_one_playbook_failed_per_failed_run() {
    // demo/fail reports its failed step twice (call.error and command.failed, both
    // step.failed) and ends FAILED with no playbook.failed: two terminal candidates. When
    // the two land on different replicas, both see no terminal claim yet; only one may
    // publish, or the client gets step.failed twice.
    const RUNS: usize = 6;
    let w = World::start(false).await;
    let (a, b) = two_slow_bridges(&w).await;
    let mut ids = Vec::new();
    for i in 0..RUNS {
        let id = w.execute("demo/fail").await;
        w.interest(&id, &format!("client-{i}")).await;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let frames = w.log.until_terminal(id).await;
        let s = summary(&frames);
        assert_eq!(count_of(&frames, "playbook.started"), 1, "{id}: {s:#?}");
        assert_eq!(count_of(&frames, "step.failed"), 1, "{id}: {s:#?}");
        assert_eq!(count_of(&frames, "playbook.failed"), 1, "{id}: {s:#?}");
        assert_eq!(frames.len(), 3, "{id}: {s:#?}");
        let terminal = frames
            .iter()
            .find(|r| r.params()["terminal"] == true)
            .expect("until_terminal saw one");
        assert_eq!(terminal.params()["event_type"], "playbook.failed");
        assert_eq!(terminal.params()["status"], "FAILED");
        assert!(frames.iter().all(|r| r.client_id == format!("client-{i}")));
    }
    let by_replica = |name| w.log.all().iter().filter(|r| r.replica == name).count();
    eprintln!(
        "frames published by replica a: {}, b: {}",
        by_replica("a"),
        by_replica("b")
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn two_bridges_turn_a_lying_playbook_completed_into_one_playbook_failed() {
    const RUNS: usize = 4;
    let w = World::start(false).await;
    let (a, b) = two_slow_bridges(&w).await;
    let mut ids = Vec::new();
    for i in 0..RUNS {
        let id = w.execute("demo/lying").await;
        w.interest(&id, &format!("client-{i}")).await;
        ids.push(id);
    }
    for id in &ids {
        let frames = w.log.until_terminal(id).await;
        let s = summary(&frames);
        assert_eq!(count_of(&frames, "playbook.failed"), 1, "{id}: {s:#?}");
        assert_eq!(count_of(&frames, "playbook.completed"), 0, "{id}: {s:#?}");
        assert_eq!(
            frames
                .iter()
                .filter(|r| r.params()["terminal"] == true)
                .count(),
            1,
            "{id}: {s:#?}"
        );
    }
    a.stop().await;
    b.stop().await;
}
