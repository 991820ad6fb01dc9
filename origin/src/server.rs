//! Start-up and shutdown: connect what the configuration names, build the state, serve
//! both listeners, and stop cleanly on SIGTERM / Ctrl-C.
//!
//! Shutdown order (GKE sends SIGTERM, then SIGKILL after the pod's
//! `terminationGracePeriodSeconds`, which must exceed `DRAIN_DELAY + SHUTDOWN_GRACE`):
//! 1. **Readiness fails first.** `/ready` answers 503 `draining`; everything else is still
//!    served — new connections included — for `DRAIN_DELAY`, the time the endpoint's
//!    removal takes to reach kube-proxy and the load balancer. Responses meanwhile carry
//!    `connection: close`, so kept-alive clients reconnect to a replica that stays.
//! 2. **The listeners close** (the shutdown token): no new connection; hyper connections
//!    finish their in-flight request and close; the bridge and the watches stop.
//! 3. **Open SSE streams end spread out** over the first three quarters of
//!    `SHUTDOWN_GRACE`, each at its own random instant and with a jittered `retry:`, so
//!    the clients of this replica do not all come back to the others in one burst; they
//!    resume there with `Last-Event-ID` and lose nothing (frames live in the bus).
//! 4. **Exit** when every connection has closed, or at the end of `SHUTDOWN_GRACE`.
//!
//! A second SIGTERM (or Ctrl-C) skips what is left of the drain delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::{internal_router, public_router};
use crate::auth::backend::{AuthBackend, AuthPlaybooks, PlaybookBackend};
use crate::auth::edge::EdgeTrust;
use crate::auth::jwks::{IdTokenConfig, IdTokenVerifier};
use crate::auth::revocations::Revocations;
use crate::auth::routes::{AuthLimits, AuthRoutesState};
use crate::auth::session::{SessionService, SessionSettings};
use crate::bridge::BridgeConfig;
use crate::bus::instrumented::InstrumentedBus;
use crate::bus::memory::MemoryBus;
use crate::bus::nats::NatsBus;
use crate::bus::{Bus, Retention};
use crate::callbacks::CallbackState;
use crate::config::{AuthMode, Config, ConfigError};
use crate::events::{EventsState, SseTimers};
use crate::extract::BodyLimit;
use crate::graphql::{build_schema, schema::Services, GraphqlState, KeepAlive};
use crate::health::Readiness;
use crate::hub::Hub;
use crate::listener::{self, ConnLimits, LeanPath, RequestLimits};
use crate::metrics::MetricsState;
use crate::noetl::{NoetlClient, RetryBudget};
use crate::owners::Owners;
use crate::proxy::{AllowList, ProxiedService, Proxy, ProxyState};
use crate::questions::{Questions, QuestionsState};
use crate::quotas::{QuotaSettings, RealtimeQuotas};
use crate::ratelimit::TrustedProxies;
use crate::requests::CallbackTokens;
use crate::scrub::Scrubber;
use crate::service_events::ServiceEventsState;
use crate::state::AppState;
use crate::store::instrumented::InstrumentedKv;
use crate::store::memory::MemoryKv;
use crate::store::nats::NatsKv;
use crate::store::{BucketTtls, KvStore};
use crate::upstream::ServiceClient;

/// How long start-up waits for the revocation set's initial load.
const REVOCATIONS_START_WAIT: Duration = Duration::from_secs(5);

/// How many times the first NATS connection is tried before start-up fails.
const NATS_CONNECT_ATTEMPTS: u32 = 10;

/// Checks the settings whose syntax is a component's policy rather than the
/// configuration's (`PROXY_ALLOW`, the bridge's stream, subject, consumer and forward
/// list), so a bad value stops start-up with exit code 2 like any other bad setting. Kept
/// here, not in `config.rs`, so the configuration depends on no component.
pub fn check_policies(config: &Config) -> Result<(), ConfigError> {
    AllowList::parse(&config.proxy_allow).map_err(|e| ConfigError(format!("PROXY_ALLOW: {e}")))?;
    crate::services::from_config(config).map_err(|e| ConfigError(format!("services: {e}")))?;
    BridgeConfig::from_config(config)
        .validate()
        .map_err(|e| ConfigError(format!("bridge: {e}")))
}

/// Connects NATS (if configured), builds the application state and starts the NATS
/// bridge. `shutdown` is cancelled on SIGTERM: SSE streams and the bridge stop with it.
pub async fn build_state(config: Config, shutdown: CancellationToken) -> anyhow::Result<AppState> {
    build(config, None, shutdown).await
}

/// [`build_state`] over a given store instead of the embedded one, for a configuration
/// without `NATS_URL` (the in-process handler tests wrap the memory store to make it fail).
pub async fn build_state_with_store(
    config: Config,
    kv: Arc<dyn KvStore>,
    shutdown: CancellationToken,
) -> anyhow::Result<AppState> {
    anyhow::ensure!(
        config.nats_url.is_none(),
        "a given store replaces the embedded one only without NATS_URL"
    );
    build(config, Some(kv), shutdown).await
}

async fn build(
    config: Config,
    given_kv: Option<Arc<dyn KvStore>>,
    shutdown: CancellationToken,
) -> anyhow::Result<AppState> {
    let config = Arc::new(config);
    let ttls = BucketTtls {
        // Entries live for their session's life (they tell the gateway it has seen a
        // token); they are served for SESSION_CACHE_TTL only (auth/session.rs).
        sessions: config.session_max_life,
        requests: config.request_ttl,
        interest: config.request_ttl,
        revoked: config.revoked_max_age,
        clients: config.session_max_life,
        owners: config.execution_owner_ttl,
        questions: config.question_max_timeout + crate::questions::DELIVERY_WINDOW,
    };
    let (kv, nats): (Arc<dyn KvStore>, _) = match &config.nats_url {
        Some(url) => {
            let client = connect_nats(url).await?;
            let kv = NatsKv::open(client.clone(), ttls, config.nats_kv_prefix.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!("NATS K/V buckets: {e}"))?;
            if let Some(n) = config.nats_replicas {
                crate::store::nats::ensure_replicas(&client, &kv.stream_names(), n).await;
            }
            tracing::info!("shared state: NATS JetStream K/V");
            (Arc::new(kv), Some(client))
        }
        None => {
            tracing::warn!("NATS_URL is unset: embedded in-memory store, run ONE replica only");
            let kv = given_kv.unwrap_or_else(|| Arc::new(MemoryKv::new(ttls)));
            (kv, None)
        }
    };
    crate::metrics::set_enabled(config.metrics_enabled);
    let kv: Arc<dyn KvStore> = Arc::new(InstrumentedKv::new(kv));
    let metrics = crate::metrics::global().clone();
    let noetl = NoetlClient::new(
        config.noetl_base_url.clone(),
        config.noetl_connect_timeout,
        config.noetl_timeout,
        config.noetl_retries,
        config.noetl_health_path.clone(),
    )?
    .with_retry_budget(RetryBudget::new(
        config.noetl_retry_budget,
        config.noetl_retry_min_per_sec,
    ))
    .with_metrics(metrics.clone());
    let verifier = IdTokenVerifier::with_default_client(IdTokenConfig {
        jwks_url: config.jwks_url(),
        issuer: config.issuer(),
        audience: config.auth_audience.clone(),
        leeway: config.auth_leeway,
        max_age: (!config.auth_max_token_age.is_zero()).then_some(config.auth_max_token_age),
        allow_unverified_email: config.auth_allow_unverified_email,
        min_refresh_interval: Duration::from_secs(10),
        cache_ttl: Duration::from_secs(3600),
    })?;
    let auth0_domain = config.auth0_domain.clone().unwrap_or_else(|| {
        url::Url::parse(&config.issuer())
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default()
    });
    if config.callback_secret.is_none() {
        tracing::warn!("GATEWAY_CALLBACK_SECRET is unset: callback tokens are per-process, run ONE replica only");
    }
    let callback_tokens = CallbackTokens::new(config.callback_secret.as_ref().map(|s| s.expose()));
    let backend: Arc<dyn AuthBackend> = match config.auth_mode {
        AuthMode::Rest => Arc::new(noetl.clone()),
        AuthMode::Playbook => {
            tracing::info!(timeout = ?config.auth_playbook_timeout, "auth through NoETL playbooks and callbacks");
            Arc::new(
                PlaybookBackend::new(
                    noetl.clone(),
                    kv.clone(),
                    callback_tokens.clone(),
                    config.callback_url(),
                    AuthPlaybooks::default(),
                    config.auth_playbook_timeout,
                )
                .with_concurrency(config.auth_playbook_concurrency, metrics.clone()),
            )
        }
    };
    let revocations = Revocations::new(config.revoked_max_age);
    revocations.spawn_watch(kv.clone(), shutdown.clone());
    wait_until_current(&revocations).await;
    let sessions = SessionService::new(
        kv.clone(),
        backend,
        verifier,
        SessionSettings {
            cache_ttl: config.session_cache_ttl,
            revoked_keep: config.revoked_max_age,
            access_ttl: config.access_cache_ttl,
            auth0_domain,
            negative_ttl: config.session_negative_ttl,
            local_ttl: config.session_local_ttl,
        },
        revocations.clone(),
    )
    .with_metrics(metrics.clone());
    let owners = Owners::new(kv.clone(), config.read_all_roles());
    let allow =
        AllowList::parse(&config.proxy_allow).map_err(|e| anyhow::anyhow!("PROXY_ALLOW: {e}"))?;
    let proxy = Proxy::new(
        noetl.clone(),
        allow,
        owners.clone(),
        config.proxy_max_body,
        config.proxy_timeout,
        config.proxy_idle_timeout,
    )
    .with_scrubber(Scrubber::for_gateway(
        config.callback_url(),
        callback_tokens.clone(),
    ));
    let service_specs =
        crate::services::from_config(&config).map_err(|e| anyhow::anyhow!("services: {e}"))?;
    let mut service_clients = Vec::new();
    for spec in &service_specs {
        let level_warn = spec.allow_all;
        if level_warn {
            tracing::warn!(service = %spec.describe(), "service registered without an allow-list: every path below its URL is proxied");
        } else {
            tracing::info!(service = %spec.describe(), "service registered");
        }
        let client =
            ServiceClient::new(&spec.name, spec.base.clone(), config.noetl_connect_timeout)
                .map_err(|e| anyhow::anyhow!(e))?;
        service_clients.push((spec.clone(), client));
    }
    let proxy = proxy.with_services(
        service_clients
            .iter()
            .map(|(spec, client)| {
                ProxiedService::service(client.clone(), spec.allow.clone(), spec.limits)
            })
            .collect(),
    );
    let retention = Retention {
        max_age: config.frame_retention,
        max_frames_per_client: config.frame_retention_per_client,
    };
    let bus: Arc<dyn Bus> = match &nats {
        Some(client) => {
            let bus = NatsBus::open(client.clone(), retention, None)
                .await
                .map_err(|e| anyhow::anyhow!("NATS frame stream: {e}"))?
                .with_backlog(config.sse_queue);
            if let Some(n) = config.nats_replicas {
                let frames = [crate::bus::nats::DEFAULT_STREAM_NAME.to_owned()];
                crate::store::nats::ensure_replicas(client, &frames, n).await;
                // Reads follow the replicas it has now (direct gets on one replica only).
                if let Err(e) = bus.recheck_stream().await {
                    tracing::warn!(error = %e, "NATS frames stream not read again after NATS_REPLICAS; reads follow it from the router's next start");
                }
            }
            Arc::new(bus)
        }
        None => Arc::new(MemoryBus::with_backlog(retention, config.sse_queue)),
    };
    let bus: Arc<dyn Bus> = Arc::new(InstrumentedBus::new(bus));
    crate::bridge::spawn(
        nats.clone(),
        kv.clone(),
        bus.clone(),
        noetl.clone(),
        Scrubber::for_gateway(config.callback_url(), callback_tokens.clone()),
        BridgeConfig::from_config(&config),
        shutdown.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("NoETL event bridge: {e}"))?;
    let sessions = Arc::new(sessions);
    let questions = Arc::new(Questions::new(
        kv.clone(),
        bus.clone(),
        service_clients.iter().map(|(_, c)| c.clone()).collect(),
        config.question_default_timeout,
        config.question_max_timeout,
    ));
    questions.spawn(shutdown.clone());
    let internal_body_limit =
        crate::callbacks::effective_body_limit(config.callback_body_limit, bus.as_ref());
    let graphql = build_schema(
        Services {
            config: config.clone(),
            kv: kv.clone(),
            noetl: noetl.clone(),
            sessions: sessions.clone(),
            tokens: callback_tokens.clone(),
            bus: bus.clone(),
            owners,
            questions: questions.clone(),
        },
        config.graphql_introspection,
    );
    let edge_trust = EdgeTrust::new(
        config.edge_assertion_public_key.as_deref(),
        config.require_edge_assertion,
    );
    let hub = Arc::new(Hub::default());
    let quotas = RealtimeQuotas::new(QuotaSettings {
        max_streams: config.user_max_streams,
        open_rate: config.stream_open_rate_limit,
        replay_rate: config.replay_rate_limit,
        max_clients: config.user_max_clients,
    });
    Ok(AppState {
        auth: AuthRoutesState {
            sessions: sessions.clone(),
            body_limit: BodyLimit(config.auth_body_limit),
            metrics: metrics.clone(),
            limits: AuthLimits::new(config.auth_rate_limit, config.login_rate_limit),
        },
        graphql: GraphqlState {
            schema: graphql,
            sessions: sessions.clone(),
            shutdown: shutdown.clone(),
            drain_spread: crate::events::drain_spread(config.shutdown_grace),
            keepalive: KeepAlive(config.sse_keepalive_interval),
            quotas: quotas.clone(),
        },
        events: EventsState {
            sessions: sessions.clone(),
            kv: kv.clone(),
            bus: bus.clone(),
            hub: hub.clone(),
            shutdown: shutdown.clone(),
            timers: SseTimers {
                ping_every: config.sse_ping_interval,
                keepalive_every: config.sse_keepalive_interval,
                drain_spread: crate::events::drain_spread(config.shutdown_grace),
            },
            quotas,
            opens: Arc::new(crate::quotas::OpenTurns::new(
                crate::quotas::STREAM_OPENS_AT_ONCE,
                crate::quotas::STREAM_OPEN_WAIT,
            )),
            questions: questions.clone(),
        },
        proxy: ProxyState {
            proxy: Arc::new(proxy),
            sessions: sessions.clone(),
        },
        service_events: ServiceEventsState {
            kv: kv.clone(),
            bus: bus.clone(),
            service_token: config.internal_token.clone(),
            body_limit: internal_body_limit,
        },
        questions: QuestionsState {
            questions: questions.clone(),
            sessions,
            service_token: config.internal_token.clone(),
            body_limit: internal_body_limit,
        },
        callbacks: CallbackState {
            kv: kv.clone(),
            bus: bus.clone(),
            hub: hub.clone(),
            tokens: callback_tokens,
            service_token: config.internal_token.clone(),
            body_limit: crate::callbacks::effective_body_limit(
                config.callback_body_limit,
                bus.as_ref(),
            ),
            metrics: metrics.clone(),
        },
        readiness: Readiness {
            kv,
            bus,
            noetl,
            revocations: revocations.clone(),
            embedded: nats.is_none(),
            metrics: metrics.clone(),
            draining: Arc::default(),
        },
        metrics: MetricsState {
            metrics,
            hub,
            revocations,
        },
        edge_trust,
        trusted_proxies: TrustedProxies::new(&config.trusted_proxies),
        limits: RequestLimits {
            request_timeout: config.request_timeout,
            max_inflight: config.max_inflight_requests,
        },
        shutdown,
    })
}

/// Gives the revocation watch a moment to load before the listeners open, so the first
/// assertion-only callers are not refused with 503 for nothing. Never fails start-up: a
/// set that is not current refuses fail-closed until it is.
async fn wait_until_current(revocations: &Revocations) {
    let deadline = tokio::time::Instant::now() + REVOCATIONS_START_WAIT;
    while !revocations.is_current() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "revocation set not loaded yet; assertion-only callers get 503 until it is"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(revocations = revocations.len(), "revocation set loaded");
}

async fn connect_nats(url: &str) -> anyhow::Result<async_nats::Client> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=NATS_CONNECT_ATTEMPTS {
        let connect = async_nats::ConnectOptions::new()
            .name("noetl-gateway-origin")
            .connection_timeout(Duration::from_secs(3))
            .connect(url);
        match connect.await {
            Ok(client) => return Ok(client),
            Err(e) if attempt < NATS_CONNECT_ATTEMPTS => {
                tracing::warn!(attempt, error = %e, "NATS not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
            Err(e) => anyhow::bail!("cannot connect to NATS after {attempt} attempts: {e}"),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// Serves both listeners; when `drain` is cancelled (SIGTERM), drains in the order the
/// module docs give: readiness fails, `DRAIN_DELAY` later the state's shutdown token is
/// cancelled and the listeners close, and the process returns within `SHUTDOWN_GRACE` of
/// that. Cancelling the shutdown token directly skips the drain delay.
pub async fn serve(
    config: &Config,
    state: AppState,
    drain: CancellationToken,
) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    tokio::spawn(drain_then_close(
        drain,
        state.readiness.clone(),
        shutdown.clone(),
        config.drain_delay,
        config.shutdown_grace,
    ));
    let public = bind(config.public_addr, "public").await?;
    let internal = bind(config.internal_addr, "internal").await?;
    tracing::info!(
        public = %public.local_addr()?, internal = %internal.local_addr()?,
        noetl = %config.noetl_base_url, "origin listening"
    );
    warn_if_fds_below_caps(config);
    let public_app = public_router(state.clone());
    let internal_app = internal_router(state);
    let lean = if config.sse_lean_http {
        LeanPath::Events
    } else {
        LeanPath::Off
    };
    let limits = |name, max_connections| ConnLimits {
        name,
        header_timeout: config.header_read_timeout,
        idle_timeout: config.keepalive_idle_timeout,
        body_timeout: config.body_read_timeout,
        max_connections,
    };
    let (public_limits, internal_limits) = (
        limits("public", config.public_max_connections),
        limits("internal", config.internal_max_connections),
    );
    let servers = async {
        tokio::try_join!(
            listener::serve(public, public_app, lean, public_limits, shutdown.clone()),
            listener::serve(
                internal,
                internal_app,
                LeanPath::Off,
                internal_limits,
                shutdown.clone()
            ),
        )
    };
    let grace = config.shutdown_grace;
    tokio::select! {
        r = servers => { r?; }
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "shutdown grace period over; closing remaining connections");
        }
    }
    tracing::info!("origin stopped");
    Ok(())
}

/// Step 1 of the shutdown order: on `drain`, fail readiness, keep serving for `delay`
/// (cut short if `shutdown` is cancelled meanwhile), then cancel `shutdown`.
async fn drain_then_close(
    drain: CancellationToken,
    readiness: crate::health::Readiness,
    shutdown: CancellationToken,
    delay: Duration,
    grace: Duration,
) {
    tokio::select! {
        () = drain.cancelled() => {}
        () = shutdown.cancelled() => return,
    }
    readiness.start_draining();
    tracing::info!(
        drain_delay = ?delay,
        "draining: /ready answers 503, requests are still served until the listeners close"
    );
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = shutdown.cancelled() => {}
    }
    tracing::info!(
        shutdown_grace = ?grace,
        streams_end_within = ?crate::events::drain_spread(grace),
        "listeners closing; open event streams end spread out"
    );
    shutdown.cancel();
}

/// Warns when the process may open fewer files than the connection caps allow: past the
/// open-file limit a connection is not refused cleanly, `accept` fails.
fn warn_if_fds_below_caps(config: &Config) {
    let caps = config.public_max_connections + config.internal_max_connections;
    if let Some(limit) = open_file_limit().filter(|&l| l < caps as u64) {
        tracing::warn!(
            open_file_limit = limit,
            connection_caps = caps,
            "RLIMIT_NOFILE is below PUBLIC_MAX_CONNECTIONS + INTERNAL_MAX_CONNECTIONS: past it, connections fail at accept instead of a clean 503"
        );
    }
}

/// This process's soft open-file limit (`/proc/self/limits`), if it can be read.
fn open_file_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The accept queue asked of the kernel (which caps it at `net.core.somaxconn`). std's
/// (and so tokio's `TcpListener::bind`) 128 overflowed hundreds of times in a burst of 10k
/// SSE connects (a reconnect storm), each overflow a client retrying a second later;
/// nginx asks 511.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, which: &str) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({which} listener): {e}"))
}

/// Completes on the next SIGTERM (if `term` listens) or Ctrl-C.
async fn signal_received(term: &mut Option<tokio::signal::unix::Signal>) {
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = term => {} }
}

/// Cancels `drain` on SIGTERM or Ctrl-C, and `shutdown` on the second one (skipping what
/// is left of the drain delay).
pub async fn cancel_on_signal(drain: CancellationToken, shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            None
        }
    };
    signal_received(&mut term).await;
    tracing::info!("shutdown requested: draining");
    drain.cancel();
    signal_received(&mut term).await;
    tracing::info!("second shutdown request: closing the listeners now");
    shutdown.cancel();
}
