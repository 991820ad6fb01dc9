//! The state every handler and run shares, built once at start.

use super::callbacks::CallbackClient;
use super::config::Config;
use super::control::Control;
use super::events::EventSink;
use super::idp::DevIdp;
use super::ids::IdGen;
use super::sessions::SessionStore;
use super::store::ExecutionStore;
use std::sync::Arc;

/// Handle to the shared state (cheap to clone into handlers and background runs).
pub type Shared = Arc<AppState>;

/// Everything the stand-in knows.
pub struct AppState {
    /// The configuration read at start.
    pub config: Config,
    /// The base URL clients use.
    pub public_url: String,
    /// The dev identity provider.
    pub idp: DevIdp,
    /// The session table.
    pub sessions: SessionStore,
    /// The execution table (and, through it, the event queue).
    pub store: ExecutionStore,
    /// The id source for executions, events and commands.
    pub ids: Arc<IdGen>,
    /// The gateway-callback client and its log.
    pub callbacks: CallbackClient,
    /// Call counters and injected faults for `/_standin`.
    pub control: Control,
    /// The event queue (for its counters).
    pub events: EventSink,
}

impl AppState {
    /// Assembles the state; fails only if the HTTP client cannot be built.
    pub fn new(
        config: Config,
        public_url: String,
        idp: DevIdp,
        events: EventSink,
    ) -> anyhow::Result<Self> {
        let ids = Arc::new(IdGen::new());
        Ok(Self {
            sessions: SessionStore::new(config.session_ttl()),
            store: ExecutionStore::new(
                ids.clone(),
                events.clone(),
                config.event_shape().vocabulary(),
            ),
            callbacks: CallbackClient::new()?,
            control: Control::default(),
            ids,
            idp,
            public_url,
            events,
            config,
        })
    }
}
