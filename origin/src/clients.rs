//! SSE clients as shared state: who owns a client id, what it still waits for, and whether
//! it is connected anywhere — all in K/V `clients`, so every replica sees the same answer.
//!
//! A client id is assigned by the server (UUID v4) and bound to the user that created it:
//! resuming or naming someone else's client id is refused (PROTOCOL §3, ARCHITECTURE
//! "Security model"). Updates to a record are read-modify-write; the only concurrent
//! writers of one client are its own requests, which a browser issues one at a time, and
//! a lost update can only drop an entry from the informational `pendingRequests` list.
//!
//! **Client ids per user are bounded** (`USER_MAX_CLIENTS`, [`create_bounded`]): each user
//! has an index, `user.<hex(sha256(user_id))>` → `{"clients":[…]}` oldest first, and a new
//! client id beyond the cap replaces the user's oldest client that has no open stream (its
//! record is deleted: a later resume of it gets 403 `unknown_client`, and a page then starts
//! as a new client). When every one of them is connected somewhere the new one is refused
//! (429 `too_many_clients`): a page opening tabs keeps working, a loop creating ids cannot
//! grow the bucket. Records keep the bucket's TTL (the longest session) rather than a
//! shorter one for ids that never reconnect: a page may name its id (a resume, or
//! executePlaybook's `clientId`) at any time during its session, and the per-user cap, not
//! age, is what bounds them. The index is read-modify-write like the records; a lost update between
//! two replicas creating clients for one user at the same instant leaves one record out
//! of the index, which then lives out the bucket's TTL uncounted — bounded by the user's
//! stream-open rate.

use std::time::Duration;

use bytes::Bytes;
use gateway_shared::frames::PendingRequest;
use gateway_shared::ids::{ClientId, RequestId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Bucket, KvStore, StoreError};

/// How long a presence marker lives without a refresh (an SSE connection refreshes it
/// from its pings, at most every [`PRESENCE_REFRESH`]).
pub const PRESENCE_TTL: Duration = Duration::from_secs(75);

/// How long a presence marker written by a stream is trusted before the stream's next
/// ping refreshes it: pings (jittered per stream, `events`) write only when the last write
/// is at least this old, so the marker is refreshed about every ping interval and at most
/// every this long, well within [`PRESENCE_TTL`].
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(25);

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

/// Why [`create_bounded`] made no client id.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The user holds the cap of client ids and every one has an open stream.
    #[error("the user holds {0} client ids and every one is connected")]
    Full(usize),
}

impl From<CreateError> for crate::error::AppError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::Store(e) => e.into(),
            CreateError::Full(n) => crate::error::AppError::TooManyRequests {
                code: "too_many_clients",
                message: format!(
                    "this user holds {n} client ids, all connected; close a tab or reuse a client_id"
                ),
                retry_after: crate::quotas::STREAMS_RETRY_AFTER_SECS,
            },
        }
    }
}

/// The user's index of client ids, oldest first.
#[derive(Debug, Default, Serialize, Deserialize)]
struct UserIndex {
    #[serde(default)]
    clients: Vec<String>,
}

fn user_index_key(user_id: &str) -> String {
    format!("user.{}", hex::encode(Sha256::digest(user_id.as_bytes())))
}

/// Creates a new client id owned by `user_id`, keeping the user's client ids at most `max`
/// (0: no cap): beyond it the oldest one with no open stream is deleted first (one whose
/// record is already gone just leaves the index); when all are connected →
/// [`CreateError::Full`]. See the module docs.
pub async fn create_bounded(
    kv: &dyn KvStore,
    user_id: &str,
    max: usize,
) -> Result<ClientId, CreateError> {
    if max == 0 {
        return Ok(create(kv, user_id).await?);
    }
    let key = user_index_key(user_id);
    let mut index: UserIndex = kv
        .get(Bucket::Clients, &key)
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    index.clients.retain(|c| ClientId::parse(c).is_ok());
    while index.clients.len() >= max {
        let mut freed = None;
        for (i, raw) in index.clients.iter().enumerate() {
            let id = ClientId::parse(raw).expect("checked above");
            if get(kv, &id).await?.is_none() {
                freed = Some(i);
                break;
            }
            if !is_present(kv, &id).await? {
                kv.delete(Bucket::Clients, id.as_str()).await?;
                tracing::info!(client = %id, user = %user_id, "client id limit: oldest idle client replaced");
                freed = Some(i);
                break;
            }
        }
        match freed {
            Some(i) => {
                index.clients.remove(i);
            }
            None => return Err(CreateError::Full(index.clients.len())),
        }
    }
    let id = create(kv, user_id).await?;
    index.clients.push(id.as_str().to_owned());
    let bytes = serde_json::to_vec(&index).expect("an index is plain data");
    kv.put(Bucket::Clients, &key, Bytes::from(bytes)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryKv;
    use crate::store::BucketTtls;

    #[tokio::test]
    async fn a_user_keeps_at_most_max_clients_and_the_oldest_idle_one_goes_first() {
        let kv = MemoryKv::new(BucketTtls::default());
        let a: Vec<ClientId> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(create_bounded(&kv, "alice", 3).await.unwrap());
            }
            v
        };
        // The oldest is connected: the second-oldest (idle) is the one replaced.
        mark_present(&kv, &a[0]).await.unwrap();
        let fourth = create_bounded(&kv, "alice", 3).await.unwrap();
        assert!(get(&kv, &a[0]).await.unwrap().is_some(), "connected: kept");
        assert!(
            get(&kv, &a[1]).await.unwrap().is_none(),
            "oldest idle: replaced"
        );
        assert!(get(&kv, &a[2]).await.unwrap().is_some());
        assert!(get(&kv, &fourth).await.unwrap().is_some());
        // Another user's ids are their own.
        create_bounded(&kv, "bob", 3).await.unwrap();
        assert!(get(&kv, &a[2]).await.unwrap().is_some());
        // All connected: refused, nothing deleted.
        for id in [&a[2], &fourth] {
            mark_present(&kv, id).await.unwrap();
        }
        assert!(matches!(
            create_bounded(&kv, "alice", 3).await,
            Err(CreateError::Full(3))
        ));
        // A record that expired (or was deleted) just leaves the index.
        kv.delete(Bucket::Clients, a[2].as_str()).await.unwrap();
        create_bounded(&kv, "alice", 3).await.unwrap();
        assert!(get(&kv, &a[0]).await.unwrap().is_some());
        assert!(get(&kv, &fourth).await.unwrap().is_some());
        // No cap: plain creation.
        for _ in 0..10 {
            create_bounded(&kv, "carol", 0).await.unwrap();
        }
    }
}
