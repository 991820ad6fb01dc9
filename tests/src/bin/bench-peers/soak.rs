//! Figure 6 — the soak (issue 16): one origin on NATS holding N streams for `--soak-secs`,
//! with steady private deliveries and broadcasts, a share of the clients reconnecting every
//! second, and one NATS restart in the middle. Checked at every client, by sequence: every
//! message the gateway accepted arrived exactly once; and the origin's RSS after warm-up.
//!
//! - **Watchers**: client 0 runs `demo/slow` (executePlaybook), every other client follows
//!   that run (subscribeToExecution) — N watchers of one run.
//! - **Private deliveries**: `--soak-callback-clients` clients get a request each
//!   (executePlaybook); progress reports (`POST /api/internal/progress`, the playbook
//!   callback that may repeat) go to them round-robin at `--soak-callback-rate`/s, each
//!   carrying its sequence number in a marker.
//! - **Broadcasts**: NoETL step ends for the run on NATS every `--soak-broadcast-every`
//!   seconds, each marker carrying its sequence number: every client should read each.
//! - **Reconnects**: `--soak-reconnect-pct` % of the clients per second drop their stream
//!   and reopen it with `client_id` and the last frame id they read (`last_event_id=`), as
//!   a browser's EventSource does; a stream the server ends is reopened the same way.
//! - **NATS restart**: at half time nats-server is stopped (SIGTERM) and started again on
//!   the same store. A send that fails is retried (every 250 ms, up to 60 s) as NoETL
//!   retries a callback; a broadcast is retried with the same event id.
//! - **Checks**: per client, the sequence numbers read for each source — none missing of
//!   those accepted, none twice. A progress report whose first attempt failed ambiguously
//!   (a timeout or a 5xx after the request was sent) may legitimately be stored twice
//!   (progress has no idempotency key): such duplicates are counted apart. RSS is sampled
//!   every 5 s; "flat" compares the mean of the first minute after warm-up with the last
//!   minute's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use gateway_tests::bench::sse_conn::{source_address, SseConn, SseTarget};
use gateway_tests::harness::origin::INTERNAL_TOKEN;
use gateway_tests::standin::events::{encode_row, EventKind, EventRow, NewEvent, RowPlace, Shape};
use gateway_tests::standin::ids::{ExecutionId, IdGen};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, World};
use crate::load;
use crate::storm::encode;
use crate::streams::{find_marker, marker, PER_ADDRESS};
use crate::{Args, Octets};

/// The phase numbers of the soak's two sources (any others are ignored).
const PHASE_CALLBACK: u32 = 6_001;
const PHASE_BROADCAST: u32 = 6_002;

/// How long a failing send is retried, and how often.
const RETRY_FOR: Duration = Duration::from_secs(60);
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// What one client read.
#[derive(Default)]
struct Seen {
    callbacks: Vec<u32>,
    broadcasts: Vec<u32>,
    reconnects: u32,
    /// Reopens that failed (retried until one works or the soak ends).
    reopen_failures: u32,
    /// `stream/reset` frames (the gateway could not vouch for a gap).
    resets: u32,
    /// Streams the server ended (evicted, or the server's end of a NATS outage).
    ended_by_server: u32,
}

/// A client of the soak: its stream task's inputs.
struct Client {
    id: String,
    seen: Mutex<Seen>,
    reconnect: Notify,
}

/// What the soak measured.
pub(crate) struct SoakResult {
    pub(crate) n: usize,
    pub(crate) secs: f64,
    pub(crate) callbacks_accepted: usize,
    pub(crate) callbacks_refused: usize,
    /// Refused progress reports by status (0: not accepted within the retry time).
    pub(crate) refusals: std::collections::BTreeMap<u16, usize>,
    pub(crate) callbacks_retried: usize,
    pub(crate) broadcasts_accepted: usize,
    pub(crate) broadcasts_refused: usize,
    pub(crate) callback_lost: usize,
    pub(crate) callback_dup: usize,
    /// Duplicates of progress reports whose first attempt failed ambiguously.
    pub(crate) callback_dup_retried: usize,
    pub(crate) broadcast_lost: usize,
    pub(crate) broadcast_dup: usize,
    pub(crate) clients_with_loss: usize,
    /// Which sequence numbers went missing, with how many clients missed each (the first
    /// few, for the report).
    pub(crate) missing_callbacks: std::collections::BTreeMap<u32, usize>,
    pub(crate) missing_broadcasts: std::collections::BTreeMap<u32, usize>,
    /// When each broadcast and progress report was first sent, seconds after the start.
    pub(crate) sent_at: HashMap<(u32, u32), f64>,
    pub(crate) reconnects: u64,
    pub(crate) reopen_failures: u64,
    pub(crate) resets: u64,
    pub(crate) ended_by_server: u64,
    /// `(seconds since start, RSS KiB)` of the origin.
    pub(crate) rss: Vec<(f64, u64)>,
    pub(crate) warmup: f64,
    pub(crate) restart_at: f64,
    pub(crate) notes: Vec<String>,
}

impl SoakResult {
    /// Mean RSS (KiB) of the samples in `[from, to)` seconds.
    pub(crate) fn mean_rss(&self, from: f64, to: f64) -> Option<f64> {
        let s: Vec<u64> = self
            .rss
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, r)| *r)
            .collect();
        (!s.is_empty()).then(|| s.iter().sum::<u64>() as f64 / s.len() as f64)
    }
}

/// One client's stream for the whole soak: read, record markers, reopen with the last id
/// when told to or when the server ends it.
async fn client_loop(
    gw: (std::net::SocketAddr, String),
    source: std::net::Ipv4Addr,
    client: Arc<Client>,
    mut conn: SseConn,
    stop: CancellationToken,
) {
    let mut last: Option<String> = None;
    loop {
        let reopen = tokio::select! {
            () = stop.cancelled() => return,
            () = client.reconnect.notified() => {
                client.seen.lock().expect("no panics while held").reconnects += 1;
                true
            }
            f = conn.next_frame() => match f {
                Ok(Some(f)) => {
                    if f.event == "stream/reset" {
                        client.seen.lock().expect("no panics while held").resets += 1;
                    }
                    if let Some((phase, k, _)) = find_marker(&f.data) {
                        let mut seen = client.seen.lock().expect("no panics while held");
                        match phase {
                            PHASE_CALLBACK => seen.callbacks.push(k),
                            PHASE_BROADCAST => seen.broadcasts.push(k),
                            _ => {}
                        }
                    }
                    if f.event_id.is_some() {
                        last = f.event_id;
                    }
                    false
                }
                _ => {
                    client.seen.lock().expect("no panics while held").ended_by_server += 1;
                    true
                }
            },
        };
        if !reopen {
            continue;
        }
        let mut path = format!("/events?client_id={}", encode(&client.id));
        if let Some(l) = &last {
            path.push_str(&format!("&last_event_id={}", encode(l)));
        }
        let target = SseTarget {
            addr: gw.0,
            path,
            token: Some(gw.1.clone()),
        };
        conn = loop {
            if stop.is_cancelled() {
                return;
            }
            let opened = async {
                let mut c = SseConn::open(&target, Some(source), Duration::from_secs(20)).await?;
                c.read_init(Duration::from_secs(20)).await?;
                anyhow::Ok(c)
            }
            .await;
            match opened {
                Ok(c) => break c,
                Err(_) => {
                    client
                        .seen
                        .lock()
                        .expect("no panics while held")
                        .reopen_failures += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
    }
}

/// How a send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Accepted, at the first attempt or after retries that were all clear refusals.
    Accepted,
    /// Accepted after an attempt whose outcome was unknown (it may have been stored).
    AcceptedAfterAmbiguous,
    /// Refused for good (a 4xx: its status) or not accepted within [`RETRY_FOR`] (0).
    Refused(u16),
}

/// A progress report `k` for `request`, retried like NoETL retries a callback.
async fn send_progress(http: reqwest::Client, url: Arc<String>, request: String, k: u32) -> Sent {
    let until = Instant::now() + RETRY_FOR;
    let mut ambiguous = false;
    loop {
        let r = http
            .post(url.as_str())
            .bearer_auth(INTERNAL_TOKEN)
            .json(&json!({
                "request_id": request,
                "step": "soak",
                "message": marker(PHASE_CALLBACK, k, gateway_tests::bench::now_ns()),
            }))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                let _ = r.bytes().await;
                return if ambiguous {
                    Sent::AcceptedAfterAmbiguous
                } else {
                    Sent::Accepted
                };
            }
            Ok(r) if r.status().is_client_error() => return Sent::Refused(r.status().as_u16()),
            // A 5xx after the body was read, a timeout, a reset: the report may be stored.
            Ok(_) | Err(_) => ambiguous = true,
        }
        if Instant::now() >= until {
            return Sent::Refused(0);
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Broadcast `k`: a NoETL step end for `execution` on NATS, with one event id however many
/// times it is retried (the bridge and the stream's duplicate window keep it once).
async fn send_step(js: jetstream::Context, ids: Arc<IdGen>, execution: u64, k: u32) -> Sent {
    let place = RowPlace {
        event_id: ids.event(),
        parent_event_id: None,
        execution_id: ExecutionId(execution),
        catalog_id: 1,
        playbook_path: "demo/slow",
        at: chrono::Utc::now(),
    };
    let row = EventRow::build(
        &place,
        NewEvent::new(
            EventKind::CommandCompleted,
            marker(PHASE_BROADCAST, k, gateway_tests::bench::now_ns()),
        )
        .with_command(u64::from(k) + 1),
    );
    let Some(out) = encode_row(&row, Shape::Rust) else {
        return Sent::Refused(0);
    };
    let until = Instant::now() + RETRY_FOR;
    loop {
        let mut msg = PublishMessage::build().payload(out.payload.clone());
        if out.send_msg_id {
            msg = msg.message_id(&out.msg_id);
        }
        if let Ok(ack) = js.send_publish(out.subject.clone(), msg).await {
            if ack.await.is_ok() {
                return Sent::Accepted;
            }
        }
        if Instant::now() >= until {
            return Sent::Refused(0);
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// What is missing from and doubled in `got` against `want`.
fn lost_and_doubled(want: &[u32], got: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut counts: HashMap<u32, u32> = HashMap::with_capacity(got.len());
    for k in got {
        *counts.entry(*k).or_default() += 1;
    }
    let lost = want
        .iter()
        .filter(|k| !counts.contains_key(k))
        .copied()
        .collect();
    let doubled = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(k, _)| *k)
        .collect();
    (lost, doubled)
}

/// Figure 6.
pub(crate) async fn figure_soak(
    args: &Args,
    world: &mut World,
    http: &reqwest::Client,
    octets: &mut Octets,
) -> anyhow::Result<SoakResult> {
    let n = args.soak_n.unwrap_or(args.n);
    let mut gw = Gateway::start(world, &[], None).await?;
    // The runs outlast the soak: one that ended would deliver its own result, and progress
    // after a result is refused (409), as it should be.
    gw.run_secs = args.soak_secs as u64 + 600;
    let mut notes = Vec::new();

    // The streams, then the run they all follow and the requests progress goes to.
    let first_octet = octets.take(n);
    let clients: Vec<(Arc<Client>, SseConn, std::net::Ipv4Addr)> = {
        let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
        let mut opening = Vec::with_capacity(n);
        for i in 0..n {
            let permit = gate.clone().acquire_owned().await?;
            let target = gw.target("/events");
            let source = source_address(first_octet, PER_ADDRESS, i);
            opening.push(tokio::spawn(async move {
                let r = async {
                    let mut c =
                        SseConn::open(&target, Some(source), Duration::from_secs(60)).await?;
                    let id = c.read_init(Duration::from_secs(60)).await?;
                    anyhow::Ok((c, id))
                }
                .await;
                drop(permit);
                r.map(|(c, id)| (c, id, source))
            }));
        }
        let mut out = Vec::with_capacity(n);
        for h in opening {
            let (conn, id, source) = h.await??;
            let client = Arc::new(Client {
                id,
                seen: Mutex::default(),
                reconnect: Notify::new(),
            });
            out.push((client, conn, source));
        }
        out
    };
    let ids: Vec<String> = clients.iter().map(|(c, _, _)| c.id.clone()).collect();
    let (execution, _) = gw.execute(http, &ids[0]).await?;
    let (ok, err) = gw
        .subscribe_all(http, &execution, &ids[1..], args.setup_concurrency)
        .await;
    notes.push(format!(
        "{n} streams; run {execution} followed by {} clients ({} failed{})",
        ok + 1,
        ids.len() - 1 - ok,
        err.map(|e| format!("; first: {e}")).unwrap_or_default()
    ));
    let m = args.soak_callback_clients.min(n);
    let (requests, err) = gw
        .execute_all(http, &ids[..m], args.setup_concurrency)
        .await;
    let requests: Vec<(usize, String)> = requests
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();
    notes.push(format!(
        "{} requests for progress reports ({} failed{})",
        requests.len(),
        m - requests.len(),
        err.map(|e| format!("; first: {e}")).unwrap_or_default()
    ));
    anyhow::ensure!(!requests.is_empty(), "no request to report progress on");
    let execution: u64 = execution.parse()?;

    // Everything runs from here.
    let stop = CancellationToken::new();
    // The streams read on until the last deliveries had time to arrive.
    let streams_stop = CancellationToken::new();
    let by_index: Vec<Arc<Client>> = clients.iter().map(|(c, _, _)| c.clone()).collect();
    let gw_key = (gw.addr, gw.token.clone());
    let mut tasks = Vec::with_capacity(n);
    for (client, conn, source) in clients {
        tasks.push(tokio::spawn(client_loop(
            gw_key.clone(),
            source,
            client,
            conn,
            streams_stop.clone(),
        )));
    }
    let started = Instant::now();
    let secs = args.soak_secs;
    let total = Duration::from_secs_f64(secs);
    let restart_at = secs / 2.0;
    let warmup = (secs * 0.2).min(120.0);

    // When each message was first sent (for the report of what went missing).
    let sent_at: Arc<Mutex<HashMap<(u32, u32), f64>>> = Arc::default();
    // Private deliveries.
    let cb_log: Arc<Mutex<Vec<(u32, usize, Sent)>>> = Arc::default();
    let cb_task = {
        let (stop, http, log, at) = (stop.clone(), http.clone(), cb_log.clone(), sent_at.clone());
        let url = Arc::new(format!("{}/api/internal/progress", gw.origin.internal_url));
        let requests = Arc::new(requests);
        let rate = args.soak_callback_rate.max(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sends = tokio::task::JoinSet::new();
            let mut k = 0u32;
            while !stop.is_cancelled() {
                tick.tick().await;
                let (client, request) = requests[k as usize % requests.len()].clone();
                at.lock()
                    .expect("no panics while held")
                    .insert((PHASE_CALLBACK, k), started.elapsed().as_secs_f64());
                let (http, url, log) = (http.clone(), url.clone(), log.clone());
                sends.spawn(async move {
                    let sent = send_progress(http, url, request, k).await;
                    log.lock()
                        .expect("no panics while held")
                        .push((k, client, sent));
                });
                k += 1;
                while sends.try_join_next().is_some() {}
            }
            while sends.join_next().await.is_some() {}
        })
    };
    // Broadcasts.
    let bc_log: Arc<Mutex<Vec<(u32, Sent)>>> = Arc::default();
    let bc_task = {
        let (stop, js, log, at) = (
            stop.clone(),
            world.js.clone(),
            bc_log.clone(),
            sent_at.clone(),
        );
        let every = Duration::from_secs_f64(args.soak_broadcast_every.max(0.01));
        tokio::spawn(async move {
            let ids = Arc::new(IdGen::new());
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sends = tokio::task::JoinSet::new();
            let mut k = 0u32;
            while !stop.is_cancelled() {
                tick.tick().await;
                at.lock()
                    .expect("no panics while held")
                    .insert((PHASE_BROADCAST, k), started.elapsed().as_secs_f64());
                let (js, ids, log) = (js.clone(), ids.clone(), log.clone());
                sends.spawn(async move {
                    let sent = send_step(js, ids, execution, k).await;
                    log.lock().expect("no panics while held").push((k, sent));
                });
                k += 1;
                while sends.try_join_next().is_some() {}
            }
            while sends.join_next().await.is_some() {}
        })
    };
    // Reconnects: a random share of the clients every second.
    let rc_task = {
        let (stop, clients) = (stop.clone(), by_index.clone());
        let per_sec = ((n as f64) * args.soak_reconnect_pct / 100.0).round() as usize;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            while !stop.is_cancelled() {
                tick.tick().await;
                for _ in 0..per_sec {
                    // xorshift: no rand dependency, deterministic per run.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    clients[(x % clients.len() as u64) as usize]
                        .reconnect
                        .notify_one();
                }
            }
        })
    };
    // RSS samples, and the NATS restart at half time.
    let mut rss = Vec::new();
    let mut restarted = false;
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = started.elapsed().as_secs_f64();
        rss.push((t, load::memory(&[gw.pid]).rss));
        if !restarted && t >= restart_at {
            restarted = true;
            world.nats.stop();
            tokio::time::sleep(Duration::from_secs(2)).await;
            world.nats.start_again().await?;
            world.nats_pid = world.nats.guard().pid();
            notes.push(format!(
                "nats-server stopped at {t:.0} s and started again 2 s later"
            ));
        }
    }
    stop.cancel();
    rc_task.await?;
    cb_task.await?;
    bc_task.await?;
    // Let the last deliveries arrive (a resumed client's replay, the bridge's retries).
    let mut seen_total = 0;
    let settle_until = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now: usize = by_index
            .iter()
            .map(|c| {
                let s = c.seen.lock().expect("no panics while held");
                s.callbacks.len() + s.broadcasts.len()
            })
            .sum();
        if now == seen_total || Instant::now() >= settle_until {
            break;
        }
        seen_total = now;
    }
    streams_stop.cancel();
    for t in tasks {
        t.abort();
    }

    // The checks.
    let cb_log = std::mem::take(&mut *cb_log.lock().expect("no panics while held"));
    let bc_log = std::mem::take(&mut *bc_log.lock().expect("no panics while held"));
    let mut want_cb: HashMap<usize, Vec<u32>> = HashMap::new();
    let mut refusals: std::collections::BTreeMap<u16, usize> = Default::default();
    let mut ambiguous: std::collections::HashSet<u32> = std::collections::HashSet::new();
    for (k, client, sent) in &cb_log {
        match sent {
            Sent::Accepted => want_cb.entry(*client).or_default().push(*k),
            Sent::AcceptedAfterAmbiguous => {
                want_cb.entry(*client).or_default().push(*k);
                ambiguous.insert(*k);
            }
            Sent::Refused(status) => {
                *refusals.entry(*status).or_default() += 1;
            }
        }
    }
    let want_bc: Vec<u32> = bc_log
        .iter()
        .filter(|(_, s)| !matches!(s, Sent::Refused(_)))
        .map(|(k, _)| *k)
        .collect();
    let mut r = SoakResult {
        n,
        secs,
        callbacks_accepted: cb_log
            .iter()
            .filter(|(_, _, s)| !matches!(s, Sent::Refused(_)))
            .count(),
        callbacks_refused: cb_log
            .iter()
            .filter(|(_, _, s)| matches!(s, Sent::Refused(_)))
            .count(),
        refusals,
        callbacks_retried: ambiguous.len(),
        broadcasts_accepted: want_bc.len(),
        broadcasts_refused: bc_log.len() - want_bc.len(),
        callback_lost: 0,
        callback_dup: 0,
        callback_dup_retried: 0,
        broadcast_lost: 0,
        broadcast_dup: 0,
        clients_with_loss: 0,
        missing_callbacks: Default::default(),
        missing_broadcasts: Default::default(),
        sent_at: std::mem::take(&mut *sent_at.lock().expect("no panics while held")),
        reconnects: 0,
        reopen_failures: 0,
        resets: 0,
        ended_by_server: 0,
        rss,
        warmup,
        restart_at,
        notes,
    };
    for (i, c) in by_index.iter().enumerate() {
        let s = c.seen.lock().expect("no panics while held");
        let (cb_lost, cb_doubled) =
            lost_and_doubled(want_cb.get(&i).map_or(&[][..], Vec::as_slice), &s.callbacks);
        let (bc_lost, bc_doubled) = lost_and_doubled(&want_bc, &s.broadcasts);
        r.callback_lost += cb_lost.len();
        for k in &cb_lost {
            *r.missing_callbacks.entry(*k).or_default() += 1;
        }
        for k in &bc_lost {
            *r.missing_broadcasts.entry(*k).or_default() += 1;
        }
        for k in cb_doubled {
            if ambiguous.contains(&k) {
                r.callback_dup_retried += 1;
            } else {
                r.callback_dup += 1;
            }
        }
        r.broadcast_lost += bc_lost.len();
        r.broadcast_dup += bc_doubled.len();
        if !cb_lost.is_empty() || !bc_lost.is_empty() {
            r.clients_with_loss += 1;
        }
        r.reconnects += u64::from(s.reconnects);
        r.reopen_failures += u64::from(s.reopen_failures);
        r.resets += u64::from(s.resets);
        r.ended_by_server += u64::from(s.ended_by_server);
    }
    Ok(r)
}

/// Prints figure 6.
pub(crate) fn print_soak(args: &Args, r: &SoakResult) {
    println!(
        "figure 6 — soak: {} streams for {:.0} s on one origin; progress reports at {}/s to {} clients, a step end every {} s to all, {} % of the clients reconnecting per second, nats-server restarted at {:.0} s",
        r.n,
        r.secs,
        args.soak_callback_rate,
        args.soak_callback_clients.min(r.n),
        args.soak_broadcast_every,
        args.soak_reconnect_pct,
        r.restart_at
    );
    for note in &r.notes {
        println!("  {note}");
    }
    println!(
        "  private: {} accepted ({} after an ambiguous failure), {} refused {:?}; lost {}, duplicated {} (+{} of reports retried after an ambiguous failure)",
        r.callbacks_accepted, r.callbacks_retried, r.callbacks_refused, r.refusals, r.callback_lost, r.callback_dup, r.callback_dup_retried
    );
    println!(
        "  broadcast: {} accepted, {} refused; deliveries expected {}, lost {}, duplicated {}",
        r.broadcasts_accepted,
        r.broadcasts_refused,
        r.broadcasts_accepted * r.n,
        r.broadcast_lost,
        r.broadcast_dup
    );
    println!(
        "  clients with a loss: {}; reconnects {}, reopen failures {}, streams ended by the server {}, stream/reset frames {}",
        r.clients_with_loss, r.reconnects, r.reopen_failures, r.ended_by_server, r.resets
    );
    let first = r.mean_rss(r.warmup, r.warmup + 60.0);
    let last = r.mean_rss(r.secs - 60.0, r.secs + 1.0);
    let peak = r.rss.iter().map(|(_, v)| *v).max().unwrap_or(0);
    match (first, last) {
        (Some(a), Some(b)) => println!(
            "  origin RSS: {:.1} MiB in the first minute after warm-up ({:.0} s), {:.1} MiB in the last minute ({:+.1} %), peak {:.1} MiB; goal: flat within 5 %",
            a / 1024.0,
            r.warmup,
            b / 1024.0,
            (b - a) / a * 100.0,
            peak as f64 / 1024.0
        ),
        _ => println!("  origin RSS: too few samples"),
    }
    for (name, phase, missing) in [
        ("progress", PHASE_CALLBACK, &r.missing_callbacks),
        ("broadcast", PHASE_BROADCAST, &r.missing_broadcasts),
    ] {
        if !missing.is_empty() {
            let first: Vec<String> = missing
                .iter()
                .take(8)
                .map(|(k, c)| {
                    let at = r.sent_at.get(&(phase, *k)).copied().unwrap_or(f64::NAN);
                    format!("#{k} (sent at {at:.1} s) by {c} clients")
                })
                .collect();
            println!("  missing {name}: {}", first.join(", "));
        }
    }
    let lost = r.callback_lost + r.broadcast_lost;
    let dup = r.callback_dup + r.broadcast_dup;
    println!("goal: soak 0 lost, 0 duplicated — lost {lost}, duplicated {dup}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_and_doubles_are_counted_by_sequence() {
        let (lost, doubled) = lost_and_doubled(&[1, 2, 3, 4], &[1, 3, 3, 4, 9]);
        assert_eq!(lost, [2], "2 never came");
        assert_eq!(doubled, [3]);
        assert_eq!(lost_and_doubled(&[], &[]), (vec![], vec![]));
    }
}
