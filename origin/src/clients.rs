//! SSE clients as shared state: who owns a client id, what it still waits for, and whether
//! it is connected anywhere — all in K/V `clients`, so every replica sees the same answer.
//!
//! A client id is assigned by the server (UUID v4) and bound to the user that created it:
//! resuming or naming someone else's client id is refused (PROTOCOL §3, ARCHITECTURE
//! "Security model"). Updates to a record are read-modify-write; the only concurrent
//! writers of one client are its own requests, which a browser issues one at a time, and
//! a lost update can only drop an entry from the informational `pendingRequests` list.

use std::time::Duration;

use bytes::Bytes;
use gateway_shared::frames::PendingRequest;
use gateway_shared::ids::{ClientId, RequestId};
use serde::{Deserialize, Serialize};

use crate::store::{Bucket, KvStore, StoreError};

/// How long a presence marker lives without a refresh (an SSE connection refreshes it
/// with every ping).
pub const PRESENCE_TTL: Duration = Duration::from_secs(75);

/// Pending requests listed per client, at most (oldest dropped).
const MAX_PENDING: usize = 100;

/// What the gateway knows about a client id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The user the client belongs to.
    pub user_id: String,
    /// Requests whose results have not been delivered yet.
    #[serde(default)]
    pub pending: Vec<PendingRequest>,
}

/// Creates a new client id owned by `user_id`.
pub async fn create(kv: &dyn KvStore, user_id: &str) -> Result<ClientId, StoreError> {
    let id =
        ClientId::parse(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a valid client id");
    save(
        kv,
        &id,
        &ClientRecord {
            user_id: user_id.to_owned(),
            pending: Vec::new(),
        },
    )
    .await?;
    Ok(id)
}

/// The record of `client_id`, if it exists.
pub async fn get(
    kv: &dyn KvStore,
    client_id: &ClientId,
) -> Result<Option<ClientRecord>, StoreError> {
    Ok(kv
        .get(Bucket::Clients, client_id.as_str())
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

async fn save(
    kv: &dyn KvStore,
    client_id: &ClientId,
    record: &ClientRecord,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(record).expect("a client record is plain data");
    kv.put(Bucket::Clients, client_id.as_str(), Bytes::from(bytes))
        .await
}

/// Adds a pending request to the client's init-frame list.
pub async fn add_pending(
    kv: &dyn KvStore,
    client_id: &ClientId,
    pending: PendingRequest,
) -> Result<(), StoreError> {
    let Some(mut record) = get(kv, client_id).await? else {
        return Ok(());
    };
    record
        .pending
        .retain(|p| p.request_id != pending.request_id);
    record.pending.push(pending);
    if record.pending.len() > MAX_PENDING {
        let excess = record.pending.len() - MAX_PENDING;
        record.pending.drain(..excess);
    }
    save(kv, client_id, &record).await
}

/// Removes a delivered request from the client's list.
pub async fn remove_pending(
    kv: &dyn KvStore,
    client_id: &ClientId,
    request_id: &RequestId,
) -> Result<(), StoreError> {
    let Some(mut record) = get(kv, client_id).await? else {
        return Ok(());
    };
    let before = record.pending.len();
    record
        .pending
        .retain(|p| p.request_id != request_id.as_str());
    if record.pending.len() != before {
        save(kv, client_id, &record).await?;
    }
    Ok(())
}

fn presence_key(client_id: &ClientId) -> String {
    format!("presence.{client_id}")
}

/// Records that the client has an open stream (refreshed by the stream's pings).
pub async fn mark_present(kv: &dyn KvStore, client_id: &ClientId) -> Result<(), StoreError> {
    kv.put_with_ttl(
        Bucket::Clients,
        &presence_key(client_id),
        Bytes::from_static(b"1"),
        PRESENCE_TTL,
    )
    .await
}

/// Records that the client's stream closed.
pub async fn mark_absent(kv: &dyn KvStore, client_id: &ClientId) -> Result<(), StoreError> {
    kv.delete(Bucket::Clients, &presence_key(client_id)).await
}

/// True if the client has an open stream on some replica (as of its last ping).
pub async fn is_present(kv: &dyn KvStore, client_id: &ClientId) -> Result<bool, StoreError> {
    Ok(kv
        .get(Bucket::Clients, &presence_key(client_id))
        .await?
        .is_some())
}
