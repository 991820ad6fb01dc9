//! This replica's open SSE connections, by client id, with connection generations.
//!
//! A client that reconnects (a new tab, a network blip) opens a new stream before the old
//! one is noticed as closed. The new connection takes over: the old one is told to stop,
//! and when it finally cleans up it must not unregister the new one. Each registration gets
//! a generation number; [`Hub::unregister`] only removes the entry if its generation is
//! still the current one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use gateway_shared::ids::ClientId;
use tokio_util::sync::CancellationToken;

/// A connection's registration: its generation and the token that stops it when a newer
/// connection for the same client arrives.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Monotonic across the hub.
    pub generation: u64,
    /// Cancelled when this connection is superseded.
    pub superseded: CancellationToken,
}

/// The registry of open streams on this replica.
#[derive(Debug, Default)]
pub struct Hub {
    next: AtomicU64,
    open: Mutex<HashMap<ClientId, Registration>>,
}

impl Hub {
    /// Registers a connection for `client_id`, superseding any older one on this replica.
    pub fn register(&self, client_id: &ClientId) -> Registration {
        self.register_under(client_id, None)
    }

    /// Like [`Hub::register`], with the connection's token a child of `parent` (the
    /// server's shutdown token): one token then stops the stream for either reason.
    pub fn register_under(
        &self,
        client_id: &ClientId,
        parent: Option<&CancellationToken>,
    ) -> Registration {
        let reg = Registration {
            generation: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            superseded: parent.map_or_else(CancellationToken::new, CancellationToken::child_token),
        };
        let old = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.clone(), reg.clone());
        if let Some(old) = old {
            old.superseded.cancel();
        }
        reg
    }

    /// Removes the registration if `generation` is still current; true if it was.
    pub fn unregister(&self, client_id: &ClientId, generation: u64) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open
            .get(client_id)
            .is_some_and(|r| r.generation == generation)
        {
            open.remove(client_id);
            true
        } else {
            false
        }
    }

    /// Number of open streams on this replica.
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if `client_id` has an open stream on this replica.
    pub fn is_connected(&self, client_id: &ClientId) -> bool {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_close_never_unregisters_a_newer_stream() {
        let hub = Hub::default();
        let c = ClientId::parse("c").expect("valid");
        let old = hub.register(&c);
        let new = hub.register(&c);
        assert!(old.superseded.is_cancelled());
        assert!(!new.superseded.is_cancelled());
        assert!(
            !hub.unregister(&c, old.generation),
            "stale close must not remove the new stream"
        );
        assert!(hub.is_connected(&c));
        assert!(hub.unregister(&c, new.generation));
        assert!(hub.is_empty());
    }
}
