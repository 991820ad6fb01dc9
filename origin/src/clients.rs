//! SSE clients as shared state: who owns a client id, what it still waits for, and whether
//! it is connected anywhere — all in K/V `clients`, so every replica sees the same answer.
//!
//! A client id is bound to the user that first used it: the server assigns one (UUID v4)
//! when a page names none ([`create_bounded`]), and a page may propose its own — a
//! well-formed id nobody holds is bound to the caller on first use ([`claim`], an atomic
//! K/V create, so of two users racing for one id exactly one gets it). Resuming or naming
//! someone else's client id is refused (PROTOCOL §3, ARCHITECTURE "Invariants"). Updates to
//! a record are read-modify-write; the only concurrent writers of one client are its own
//! requests, which a browser issues one at a time, and a lost update can only drop an entry
//! from the informational `pendingRequests` list.
//!
//! **Client ids per user are bounded** (`USER_MAX_CLIENTS`, [`create_bounded`], [`claim`]):
//! each user has an index, `user.<hex(sha256(user_id))>` → `{"clients":[…]}` oldest first,
//! and a new client id beyond the cap retires the user's oldest client that has no open
//! stream. When every one of them is connected somewhere the new one is refused (429
//! `too_many_clients`): a page opening tabs keeps working, a loop creating ids cannot grow
//! the bucket beyond what the stream-open rate allows. "Open" is read from the presence
//! marker: a client resumed in a reconnect storm writes its marker at its stream's first
//! ping (`events`), so until then one whose old marker had expired counts as idle here.
//!
//! **A retired client stays bound to its user.** Its record is replaced by a small
//! tombstone (`retired: true`, the pending list dropped) instead of being deleted: frames
//! of its runs may still be on the bus, and a callback or an execution event may still
//! target it, so the id must not become free for another user to claim. The owner may
//! name it again: it is then counted against the cap once more (retiring another idle
//! one) and resumes like any other. Records keep the bucket's TTL (the longest session)
//! rather than a shorter one for ids that never reconnect: a page may name its id (a
//! resume, or executePlaybook's `clientId`) at any time during its session, and the
//! per-user cap, not age, is what bounds them. The index is read-modify-write like the
//! records, and written back with a compare-and-set ([`KvStore::update`]): a create that
//! finds the index written since it read it (another replica's create) reads it again and
//! makes room again, so no create is lost from it and the cap holds across replicas. On one
//! replica a user's creates also take it in turn ([`crate::lanes`], from reading it to
//! writing it back, at most [`INDEX_TURN_WAIT`] waited for), so they do not spend their
//! attempts on each other: twelve streams opened at once with a cap of 3 used to all read
//! the same index and all get a client id.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use gateway_shared::frames::PendingRequest;
use gateway_shared::ids::{ClientId, RequestId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lanes::Lanes;
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

/// How long a create waits for the user's index turn on this replica (module docs) before
/// it goes on without it.
pub const INDEX_TURN_WAIT: Duration = Duration::from_secs(2);

/// The turns at each user's index on this replica, by index key.
static INDEX_TURNS: LazyLock<Lanes<()>> = LazyLock::new(|| Lanes::new(INDEX_TURN_WAIT));

/// What the gateway knows about a client id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The user the client belongs to.
    pub user_id: String,
    /// Requests whose results have not been delivered yet.
    #[serde(default)]
    pub pending: Vec<PendingRequest>,
    /// Retired by the per-user cap: still the user's (so no one else can claim the id),
    /// but not counted until the owner names it again (module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
    /// A frame id none of the client's frames can be at or below: the bus's position when
    /// the server made the id (`bus::Subscription::position`). A resume that has read
    /// nothing yet starts after it (`bus::StartAt::Since`), which lets a replica whose
    /// router has seen nothing for the client skip reading the stream. Absent in records
    /// of ids a page proposed, and of older records: they resume as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

impl ClientRecord {
    /// A new, active client of `user_id` with nothing pending.
    pub fn new(user_id: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            pending: Vec::new(),
            retired: false,
            since: None,
        }
    }
}

/// A new client id (a random UUID), not stored anywhere yet: nobody else can know it
/// until [`create_bounded_as`] writes its record.
pub fn new_id() -> ClientId {
    ClientId::parse(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a valid client id")
}

/// Creates a new client id owned by `user_id`.
pub async fn create(kv: &dyn KvStore, user_id: &str) -> Result<ClientId, StoreError> {
    let id = new_id();
    save(kv, &id, &ClientRecord::new(user_id)).await?;
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
            CreateError::Full(n) => {
                crate::metrics::global().rate_limited("clients");
                crate::error::AppError::TooManyRequests {
                code: "too_many_clients",
                message: format!(
                    "this user holds {n} client ids, all connected; close a tab or reuse a client_id"
                ),
                retry_after: crate::quotas::STREAMS_RETRY_AFTER_SECS,
                }
            }
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

/// Reads the user's index and retires their oldest clients with no open stream until one
/// more fits under `max` (entries whose record is gone, retired already, or not the
/// user's — a lost race — just leave the index); when every one is connected →
/// [`CreateError::Full`]. The caller adds its client and writes the index back.
async fn make_room(
    kv: &dyn KvStore,
    user_id: &str,
    max: usize,
) -> Result<(UserIndex, u64), CreateError> {
    let read = kv
        .get_versioned(Bucket::Clients, &user_index_key(user_id))
        .await?;
    let mut index: UserIndex = read
        .value
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    index.clients.retain(|c| ClientId::parse(c).is_ok());
    while index.clients.len() >= max {
        let mut freed = None;
        for (i, raw) in index.clients.iter().enumerate() {
            let id = ClientId::parse(raw).expect("checked above");
            let record = match get(kv, &id).await? {
                Some(r) if r.user_id == user_id && !r.retired => r,
                _ => {
                    freed = Some(i);
                    break;
                }
            };
            if !is_present(kv, &id).await? {
                retire(kv, &id, record).await?;
                tracing::info!(client = %id, user = %user_id, "client id limit: oldest idle client retired");
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
    Ok((index, read.revision))
}

/// Adds `id` to the user's index (made room for by [`make_room`], read at `revision`) and
/// writes it back if nobody wrote it since; `Ok(false)` when someone did.
async fn add_to_index(
    kv: &dyn KvStore,
    user_id: &str,
    mut index: UserIndex,
    revision: u64,
    id: &ClientId,
) -> Result<bool, StoreError> {
    index.clients.retain(|c| c != id.as_str());
    index.clients.push(id.as_str().to_owned());
    let bytes = serde_json::to_vec(&index).expect("an index is plain data");
    kv.update(
        Bucket::Clients,
        &user_index_key(user_id),
        Bytes::from(bytes),
        revision,
    )
    .await
}

/// How many times a create reads the user's index again after another replica wrote it
/// in between, before it gives up (503: the store is unavailable, in effect).
const INDEX_ATTEMPTS: usize = 8;

/// Makes room for `id` in `user_id`'s index and enters it there, in this replica's turn at
/// the index and compare-and-set against other replicas (module docs). `record`, when
/// given, is written once room was first made and before the index is; if the id is then
/// not entered after all (a later read found the index full, or the store failed), it is
/// deleted again, so a refused id leaves no record behind (and a refusal at the first read
/// writes nothing).
async fn enter_index(
    kv: &dyn KvStore,
    user_id: &str,
    max: usize,
    id: &ClientId,
    mut record: Option<&ClientRecord>,
) -> Result<(), CreateError> {
    let _turn = INDEX_TURNS.turn(&user_index_key(user_id)).await;
    let mut written = false;
    let entered = async {
        for _ in 0..INDEX_ATTEMPTS {
            let (index, revision) = make_room(kv, user_id, max).await?;
            if let Some(record) = record.take() {
                written = true;
                save(kv, id, record).await?;
            }
            if add_to_index(kv, user_id, index, revision, id).await? {
                return Ok(());
            }
            tracing::debug!(user = %user_id, "client index written by another replica meanwhile; read again");
        }
        Err(StoreError::Unavailable(format!(
            "the client index of a user changed under {INDEX_ATTEMPTS} attempts in a row"
        ))
        .into())
    }
    .await;
    if entered.is_err() && written {
        let _ = kv.delete(Bucket::Clients, id.as_str()).await;
    }
    entered
}

/// Replaces the record with its tombstone: the owner stays, nothing else.
async fn retire(
    kv: &dyn KvStore,
    client_id: &ClientId,
    record: ClientRecord,
) -> Result<(), StoreError> {
    let tombstone = ClientRecord {
        retired: true,
        ..ClientRecord::new(&record.user_id)
    };
    save(kv, client_id, &tombstone).await
}

/// The user's client ids that are theirs and not retired, oldest first (from the user's
/// index: with `USER_MAX_CLIENTS=0` there is none, and the answer is empty).
pub async fn active_clients_of(
    kv: &dyn KvStore,
    user_id: &str,
) -> Result<Vec<ClientId>, StoreError> {
    let index: UserIndex = kv
        .get(Bucket::Clients, &user_index_key(user_id))
        .await?
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default();
    let mut out = Vec::new();
    for raw in index.clients {
        let Ok(id) = ClientId::parse(&raw) else {
            continue;
        };
        if get(kv, &id)
            .await?
            .is_some_and(|r| r.user_id == user_id && !r.retired)
        {
            out.push(id);
        }
    }
    Ok(out)
}

/// Creates a new client id owned by `user_id`, keeping the user's client ids at most `max`
/// (0: no cap): beyond it the oldest one with no open stream is retired first; when all
/// are connected → [`CreateError::Full`]. See the module docs.
pub async fn create_bounded(
    kv: &dyn KvStore,
    user_id: &str,
    max: usize,
) -> Result<ClientId, CreateError> {
    let id = new_id();
    create_bounded_as(kv, user_id, max, &id, None).await?;
    Ok(id)
}

/// [`create_bounded`] for an id the caller made with [`new_id`] (the SSE handler
/// subscribes to it first, so nothing published for it can be missed), recording `since`
/// ([`ClientRecord::since`]) when the bus gave one.
pub async fn create_bounded_as(
    kv: &dyn KvStore,
    user_id: &str,
    max: usize,
    id: &ClientId,
    since: Option<u64>,
) -> Result<(), CreateError> {
    let record = ClientRecord {
        since,
        ..ClientRecord::new(user_id)
    };
    if max == 0 {
        return Ok(save(kv, id, &record).await?);
    }
    enter_index(kv, user_id, max, id, Some(&record)).await
}

/// Why [`claim`] gave the caller no client.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The store failed, or the user's client ids are all connected.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The id is bound to another user.
    #[error("the client id belongs to another user")]
    NotYours,
}

impl From<StoreError> for ClaimError {
    fn from(e: StoreError) -> Self {
        ClaimError::Create(CreateError::Store(e))
    }
}

impl From<ClaimError> for crate::error::AppError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Create(e) => e.into(),
            ClaimError::NotYours => crate::error::AppError::forbidden(
                "client_not_yours",
                "this client id belongs to another session",
            ),
        }
    }
}

/// A client [`claim`] gave the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Its record (active).
    pub record: ClientRecord,
    /// False when the id was bound by this claim: it has no past of the caller's to
    /// resume.
    pub existed: bool,
}

/// The client `id` for `user_id`: theirs already → its record (a retired one is counted
/// against `max` again first); bound to nobody → bound to them now, atomically (K/V
/// create: of two users racing for one id, one wins and the other gets
/// [`ClaimError::NotYours`]), within `max` like [`create_bounded`]; another user's →
/// [`ClaimError::NotYours`].
pub async fn claim(
    kv: &dyn KvStore,
    user_id: &str,
    max: usize,
    id: &ClientId,
) -> Result<Claimed, ClaimError> {
    match get(kv, id).await? {
        Some(r) if r.user_id != user_id => Err(ClaimError::NotYours),
        Some(record) if !record.retired => Ok(Claimed {
            record,
            existed: true,
        }),
        Some(mut record) => {
            if max > 0 {
                enter_index(kv, user_id, max, id, None).await?;
            }
            record.retired = false;
            save(kv, id, &record).await?;
            tracing::info!(client = %id, user = %user_id, "retired client id named by its owner again");
            Ok(Claimed {
                record,
                existed: true,
            })
        }
        None => {
            let record = ClientRecord::new(user_id);
            let bytes = serde_json::to_vec(&record).expect("a client record is plain data");
            if !kv
                .create(Bucket::Clients, id.as_str(), Bytes::from(bytes))
                .await?
            {
                // Bound meanwhile: by this user's other request, or someone else's.
                return match get(kv, id).await? {
                    Some(r) if r.user_id == user_id && !r.retired => Ok(Claimed {
                        record: r,
                        existed: true,
                    }),
                    _ => Err(ClaimError::NotYours),
                };
            }
            if max > 0 {
                if let Err(e) = enter_index(kv, user_id, max, id, None).await {
                    // Not bound after all: the id stays free.
                    let _ = kv.delete(Bucket::Clients, id.as_str()).await;
                    return Err(e.into());
                }
            }
            tracing::info!(client = %id, user = %user_id, "client id proposed by the page bound to its user");
            Ok(Claimed {
                record,
                existed: false,
            })
        }
    }
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
        let tombstone = get(&kv, &a[1])
            .await
            .unwrap()
            .expect("retired, not deleted");
        assert!(tombstone.retired, "oldest idle: retired");
        assert_eq!(tombstone.user_id, "alice", "and still alice's");
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

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_proposed_id_is_bound_to_its_first_user_and_refused_to_others() {
        let kv = MemoryKv::new(BucketTtls::default());
        let tab = id("page-chosen-4b1c2e3f");
        let first = claim(&kv, "alice", 3, &tab).await.unwrap();
        assert!(!first.existed, "bound now");
        assert_eq!(first.record, ClientRecord::new("alice"));
        assert_eq!(get(&kv, &tab).await.unwrap().unwrap().user_id, "alice");
        let again = claim(&kv, "alice", 3, &tab).await.unwrap();
        assert!(again.existed, "the owner resumes it");
        assert!(matches!(
            claim(&kv, "mallory", 3, &tab).await,
            Err(ClaimError::NotYours)
        ));
        // No cap: bound all the same.
        assert!(!claim(&kv, "bob", 0, &id("bobs-own")).await.unwrap().existed);
    }

    #[tokio::test]
    async fn of_two_users_racing_for_one_id_exactly_one_gets_it() {
        for round in 0..20 {
            let kv = std::sync::Arc::new(MemoryKv::new(BucketTtls::default()));
            let tab = id(&format!("contested-{round}"));
            let (a, b) = tokio::join!(
                claim(kv.as_ref(), "alice", 3, &tab),
                claim(kv.as_ref(), "bob", 3, &tab)
            );
            let won: Vec<bool> = [&a, &b].iter().map(|r| r.is_ok()).collect();
            assert_eq!(won.iter().filter(|w| **w).count(), 1, "{a:?} {b:?}");
            let owner = get(kv.as_ref(), &tab).await.unwrap().unwrap().user_id;
            assert_eq!(owner, if won[0] { "alice" } else { "bob" });
        }
    }

    #[tokio::test]
    async fn a_proposed_id_counts_against_the_cap_and_a_retired_one_stays_its_owners() {
        let kv = MemoryKv::new(BucketTtls::default());
        let (t1, t2, t3) = (id("tab-one"), id("tab-two"), id("tab-three"));
        claim(&kv, "alice", 2, &t1).await.unwrap();
        claim(&kv, "alice", 2, &t2).await.unwrap();
        mark_present(&kv, &t2).await.unwrap();
        // A third retires the oldest idle one (t1), which stays alice's.
        claim(&kv, "alice", 2, &t3).await.unwrap();
        assert!(get(&kv, &t1).await.unwrap().unwrap().retired);
        assert!(
            matches!(
                claim(&kv, "mallory", 2, &t1).await,
                Err(ClaimError::NotYours)
            ),
            "a retired id is not free"
        );
        // All connected: neither a new id nor a retired one comes back, and nothing is
        // bound by the refusal.
        mark_present(&kv, &t3).await.unwrap();
        let t4 = id("tab-four");
        assert!(matches!(
            claim(&kv, "alice", 2, &t4).await,
            Err(ClaimError::Create(CreateError::Full(2)))
        ));
        assert!(get(&kv, &t4).await.unwrap().is_none(), "t4 stays free");
        assert!(matches!(
            claim(&kv, "alice", 2, &t1).await,
            Err(ClaimError::Create(CreateError::Full(2)))
        ));
        // The owner names t1 again once a tab closed: it is active and counted again.
        mark_absent(&kv, &t2).await.unwrap();
        let back = claim(&kv, "alice", 2, &t1).await.unwrap();
        assert!(back.existed && !back.record.retired);
        assert!(!get(&kv, &t1).await.unwrap().unwrap().retired);
        assert!(
            get(&kv, &t2).await.unwrap().unwrap().retired,
            "t2 made room"
        );
        // Server-assigned ids share the cap with proposed ones.
        mark_absent(&kv, &t3).await.unwrap();
        create_bounded(&kv, "alice", 2).await.unwrap();
        assert!(get(&kv, &t3).await.unwrap().unwrap().retired);
    }
}
