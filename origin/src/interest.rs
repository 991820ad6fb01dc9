//! Interest records: which clients want an execution's `playbook/state` frames.
//!
//! One key per execution in [`Bucket::Interest`]: key `<execution_id>`, value
//! `{"clients": ["<client_id>", …], "owner": ["<client_id>", …]}`. Written by
//! executePlaybook (after NoETL's `/api/execute` answered, since only then is the id known)
//! and by subscribeToExecution and `executionEvents`; read by the bridge with one `get` per
//! event, by execution id — never by scanning the bucket. Records expire with the bucket's
//! TTL (≥ the longest playbook), so nothing has to clean them up.
//!
//! **The run's owner is never pushed out** (issue 12): clients of the user who started the
//! run ([`Interested::Owner`]) and everyone else's ([`Interested::Other`], users with a
//! read-all role) are bounded separately, each list dropping its own oldest: a viewer
//! subscribing hundreds of clients only displaces other non-owners. `clients` holds every
//! id, the owner's first, so a reader that knows only `clients` (a replica of the previous
//! version during a rollout) still delivers to all; `owner` says which of them are the
//! owner's. A record without `owner` (written before) reads as all others.
//!
//! **Delivery does not read this record any more** (issue 16, broadcast): the bridge
//! publishes a run's frames once, to the run (`Bus::publish_run`), and each client's
//! stream follows the runs in the client's **watch list**, `watch.<client_id>` in this
//! bucket (`{"executions": [...]}`, oldest first, at most [`MAX_WATCHED_PER_CLIENT`]). The
//! record above still says *whether* anyone is interested (the bridge waits for it before
//! publishing) and whose clients they are (service events to an execution's watchers).
//! [`follow`] is the one way in: it checks nothing itself — its callers have checked that
//! the client is the caller's and the caller may read the run — and writes, in order, the
//! watch list, the bus's watch (so a stream open now learns it), then the record (so the
//! bridge publishes only once every watcher's stream can receive the frames).
//!
//! The same bucket also holds the bridge's claims, `terminal.<execution_id>` and
//! `failed.<execution_id>.<step hash>` (see [`crate::bridge::policy::terminal_key`] and
//! [`crate::bridge::policy::failure_key`]); execution ids and client ids never contain a
//! `.`, so the kinds of key cannot collide.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use gateway_shared::ids::{ClientId, ExecutionId};
use serde::{Deserialize, Serialize};

use crate::bus::{Bus, BusError};
use crate::lanes::Lanes;
use crate::store::{Bucket, KvStore, StoreError};

/// Most clients of users other than the run's owner kept per execution; beyond it their
/// oldest is dropped, so one popular execution cannot grow a record (and every event's read
/// of it) without bound.
pub const MAX_CLIENTS_PER_EXECUTION: usize = 256;

/// Most clients of the run's owner kept per execution (their own oldest dropped beyond
/// it; only the owner's own subscriptions can displace them).
pub const MAX_OWNER_CLIENTS_PER_EXECUTION: usize = 256;

/// How often [`add_interest`] retries when another writer created the record between its
/// read and its create.
const CREATE_RACE_ATTEMPTS: usize = 3;

/// Whose client is being added: the run owner's, or another user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interested {
    /// The user who started the run.
    Owner,
    /// Anyone else allowed to follow it (a read-all role).
    Other,
}

/// The stored record, as two lists (each oldest first).
#[derive(Debug, Default, PartialEq, Eq)]
struct InterestRecord {
    owner: Vec<ClientId>,
    others: Vec<ClientId>,
}

/// The wire form: every id in `clients` (the owner's first), the owner's again in `owner`.
#[derive(Serialize)]
struct Wire<'a> {
    clients: Vec<&'a ClientId>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    owner: Vec<&'a ClientId>,
}

fn valid_ids(v: &serde_json::Value, field: &str) -> Vec<ClientId> {
    v.get(field)
        .and_then(|c| c.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str())
                .filter_map(|c| ClientId::parse(c).ok())
                .collect()
        })
        .unwrap_or_default()
}

impl InterestRecord {
    /// Reads a stored value leniently: a record this code did not write (or a corrupted
    /// one) yields the valid client ids it holds, never an error that would make the
    /// bridge retry an event forever.
    fn decode(execution_id: &ExecutionId, raw: &[u8]) -> Self {
        match serde_json::from_slice::<serde_json::Value>(raw) {
            Ok(v) => {
                let mut owner = valid_ids(&v, "owner");
                dedup(&mut owner);
                let mut others: Vec<ClientId> = valid_ids(&v, "clients")
                    .into_iter()
                    .filter(|c| !owner.contains(c))
                    .collect();
                dedup(&mut others);
                Self { owner, others }
            }
            Err(e) => {
                tracing::warn!(%execution_id, error = %e, "unreadable interest record ignored");
                Self::default()
            }
        }
    }

    fn encode(&self) -> Bytes {
        let wire = Wire {
            clients: self.owner.iter().chain(&self.others).collect(),
            owner: self.owner.iter().collect(),
        };
        Bytes::from(serde_json::to_vec(&wire).expect("a list of strings always serialises"))
    }

    /// Every interested client, the owner's first.
    fn all(self) -> Vec<ClientId> {
        let mut all = self.owner;
        all.extend(self.others);
        all
    }

    /// Adds `client_id` to its list (moving an id that was another's to the owner's);
    /// false if it was there already. Drops the oldest of that list beyond its cap.
    fn add(&mut self, execution_id: &ExecutionId, client_id: &ClientId, who: Interested) -> bool {
        let (list, cap) = match who {
            Interested::Owner => {
                if self.owner.contains(client_id) {
                    return false;
                }
                self.others.retain(|c| c != client_id);
                (&mut self.owner, MAX_OWNER_CLIENTS_PER_EXECUTION)
            }
            Interested::Other => {
                if self.owner.contains(client_id) || self.others.contains(client_id) {
                    return false;
                }
                (&mut self.others, MAX_CLIENTS_PER_EXECUTION)
            }
        };
        list.push(client_id.clone());
        if list.len() > cap {
            let excess = list.len() - cap;
            tracing::warn!(%execution_id, dropped = excess, owner = (who == Interested::Owner), "interest list full: its oldest clients dropped");
            list.drain(..excess);
        }
        true
    }
}

fn dedup(ids: &mut Vec<ClientId>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|c| seen.insert(c.clone()));
}

/// Records that `client_id` (the run owner's or another user's, `who`) wants the frames
/// of `execution_id` (idempotent).
///
/// Read-modify-write, written back without a compare-and-set: two clients added to an
/// *existing* record at the same instant can lose one of them — the later `put` wins. The
/// record no longer carries delivery (module docs), and a compare-and-set with turns per
/// run makes every subscriber of a popular run wait for the one before (9,999 subscribers
/// of one run, 32 at once: 15.6 s, where this plain write took 5.5–7.4 s; docs/BENCHMARKS.md,
/// "Shared records under concurrent writers"), so it stays a plain write. The first write
/// is safe: it goes through `create`, and a lost create race re-reads and retries. The common case is one client per execution,
/// recorded once by executePlaybook, so the window is small; a subscriber that must not
/// miss it can call this again (it is idempotent).
///
/// Errors: the store's own. Both ids are checked types, so neither can make a bad key.
pub async fn add_interest(
    kv: &dyn KvStore,
    execution_id: &ExecutionId,
    client_id: &ClientId,
    who: Interested,
) -> Result<(), StoreError> {
    let key = execution_id.as_str();
    for _ in 0..CREATE_RACE_ATTEMPTS {
        match kv.get(Bucket::Interest, key).await? {
            None => {
                let mut record = InterestRecord::default();
                record.add(execution_id, client_id, who);
                if kv.create(Bucket::Interest, key, record.encode()).await? {
                    return Ok(());
                }
                // Someone created it between our get and create: read it again.
            }
            Some(raw) => {
                let mut record = InterestRecord::decode(execution_id, &raw);
                if !record.add(execution_id, client_id, who) {
                    return Ok(());
                }
                return kv.put(Bucket::Interest, key, record.encode()).await;
            }
        }
    }
    Err(StoreError::Unavailable(format!(
        "interest record for {execution_id} kept changing during {CREATE_RACE_ATTEMPTS} attempts"
    )))
}

/// Most runs one client's watch list keeps (its oldest dropped beyond): what a stream
/// opened later follows, so it bounds one subscription's reads on a resume.
pub const MAX_WATCHED_PER_CLIENT: usize = crate::bus::MAX_WATCHED_PER_SUBSCRIPTION;

fn watch_key(client_id: &ClientId) -> String {
    format!("watch.{client_id}")
}

/// A client's watch list as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WatchList {
    #[serde(default)]
    executions: Vec<String>,
}

/// The runs `client_id` follows, oldest first (invalid entries skipped; none if the list
/// is absent or unreadable).
pub async fn watched_by(
    kv: &dyn KvStore,
    client_id: &ClientId,
) -> Result<Vec<ExecutionId>, StoreError> {
    let Some(raw) = kv.get(Bucket::Interest, &watch_key(client_id)).await? else {
        return Ok(Vec::new());
    };
    let list: WatchList = serde_json::from_slice(&raw).unwrap_or_default();
    Ok(list
        .executions
        .iter()
        .filter_map(|e| ExecutionId::parse(e).ok())
        .collect())
}

/// Adds `execution_id` to the client's watch list (idempotent; its oldest dropped beyond
/// [`MAX_WATCHED_PER_CLIENT`]). Read-modify-write with a compare-and-set
/// ([`KvStore::update`]): a page subscribing to several runs at once sends its requests
/// together, maybe to different replicas, and a plain write-back would drop all but one
/// run from what a *later* stream (a reconnect) follows. On one replica a client's adds
/// take the list in turn ([`crate::lanes`]); one that lost to another replica reads again,
/// up to [`WATCH_ATTEMPTS`] times.
pub async fn add_watch(
    kv: &dyn KvStore,
    client_id: &ClientId,
    execution_id: &ExecutionId,
) -> Result<(), StoreError> {
    let key = watch_key(client_id);
    let _turn = WATCH_TURNS.turn(&key).await;
    for _ in 0..WATCH_ATTEMPTS {
        let read = kv.get_versioned(Bucket::Interest, &key).await?;
        let mut list: WatchList = match &read.value {
            Some(raw) => serde_json::from_slice(raw).unwrap_or_default(),
            None => WatchList::default(),
        };
        if list.executions.iter().any(|e| e == execution_id.as_str()) {
            return Ok(());
        }
        list.executions.push(execution_id.to_string());
        let excess = list.executions.len().saturating_sub(MAX_WATCHED_PER_CLIENT);
        list.executions.drain(..excess);
        let value = serde_json::to_vec(&list).expect("a list of strings always serialises");
        if kv
            .update(Bucket::Interest, &key, Bytes::from(value), read.revision)
            .await?
        {
            return Ok(());
        }
    }
    Err(StoreError::Unavailable(format!(
        "the watch list of a client kept changing during {WATCH_ATTEMPTS} attempts"
    )))
}

/// How often [`add_watch`] reads a watch list again that another request wrote in between
/// (a client's own requests: a page subscribing to many runs at once).
pub const WATCH_ATTEMPTS: usize = 8;

/// The turns at each client's watch list on this replica (at most 2 s waited for).
static WATCH_TURNS: LazyLock<Lanes<()>> = LazyLock::new(|| Lanes::new(Duration::from_secs(2)));

/// Why [`follow`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The watch list or the interest record could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus could not tell the client's open streams.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl From<FollowError> for crate::error::AppError {
    fn from(e: FollowError) -> Self {
        match e {
            FollowError::Store(e) => e.into(),
            FollowError::Bus(e) => crate::error::AppError::Unavailable {
                code: "bus_unavailable",
                message: format!("cannot follow the execution: {e}"),
            },
        }
    }
}

/// Makes `client_id` follow `execution_id`'s frames: the bus's watch (a stream open now
/// learns it), then its watch list (a stream opened later reads it), then the interest
/// record (the bridge publishes once it exists). The watch goes first so that a watch list
/// naming a run implies its `gw/watch` frame: a resume the bus knows to follow no run
/// skips the list ([`Bus::unwatched`]). The caller has checked the client is the
/// caller's and the run readable.
pub async fn follow(
    kv: &dyn KvStore,
    bus: &dyn Bus,
    execution_id: &ExecutionId,
    client_id: &ClientId,
    who: Interested,
) -> Result<(), FollowError> {
    bus.watch(client_id, execution_id).await?;
    add_watch(kv, client_id, execution_id).await?;
    add_interest(kv, execution_id, client_id, who).await?;
    Ok(())
}

/// The clients interested in `execution_id`: the owner's, then everyone else's, each
/// oldest first; empty if none (yet).
pub async fn interested_clients(
    kv: &dyn KvStore,
    execution_id: &ExecutionId,
) -> Result<Vec<ClientId>, StoreError> {
    Ok(kv
        .get(Bucket::Interest, execution_id.as_str())
        .await?
        .map(|raw| InterestRecord::decode(execution_id, &raw).all())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryKv;
    use crate::store::BucketTtls;

    const ID: &str = "612345678901234567";

    fn eid() -> ExecutionId {
        ExecutionId::parse(ID).expect("valid")
    }

    fn cid(s: &str) -> ClientId {
        ClientId::parse(s).expect("valid")
    }

    #[tokio::test]
    async fn interest_is_recorded_once_per_client_in_order() {
        let kv = MemoryKv::new(BucketTtls::default());
        assert!(interested_clients(&kv, &eid()).await.unwrap().is_empty());
        add_interest(&kv, &eid(), &cid("c1"), Interested::Other)
            .await
            .unwrap();
        add_interest(&kv, &eid(), &cid("c2"), Interested::Other)
            .await
            .unwrap();
        add_interest(&kv, &eid(), &cid("c1"), Interested::Other)
            .await
            .unwrap();
        assert_eq!(
            interested_clients(&kv, &eid()).await.unwrap(),
            [cid("c1"), cid("c2")]
        );
        let raw = kv.get(Bucket::Interest, ID).await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v, serde_json::json!({"clients": ["c1", "c2"]}));
    }

    #[tokio::test]
    async fn unusable_ids_are_refused_before_they_become_keys() {
        // The functions take checked ids: an unusable one is refused where it is parsed.
        for e in ["a b", "", "a>b"] {
            assert!(ExecutionId::parse(e).is_err(), "{e:?}");
        }
        for c in ["a.b", ""] {
            assert!(ClientId::parse(c).is_err(), "{c:?}");
        }
    }

    #[tokio::test]
    async fn foreign_or_corrupt_records_yield_their_valid_clients_only() {
        let kv = MemoryKv::new(BucketTtls::default());
        kv.put(Bucket::Interest, ID, Bytes::from_static(b"not json"))
            .await
            .unwrap();
        assert!(interested_clients(&kv, &eid()).await.unwrap().is_empty());
        kv.put(
            Bucket::Interest,
            ID,
            Bytes::from_static(br#"{"clients":["ok-1", 5, "bad.id", "ok-2"]}"#),
        )
        .await
        .unwrap();
        assert_eq!(
            interested_clients(&kv, &eid()).await.unwrap(),
            [cid("ok-1"), cid("ok-2")]
        );
    }

    #[tokio::test]
    async fn a_full_record_drops_its_oldest_clients() {
        let kv = MemoryKv::new(BucketTtls::default());
        for i in 0..=MAX_CLIENTS_PER_EXECUTION {
            add_interest(&kv, &eid(), &cid(&format!("c{i}")), Interested::Other)
                .await
                .unwrap();
        }
        let clients = interested_clients(&kv, &eid()).await.unwrap();
        assert_eq!(clients.len(), MAX_CLIENTS_PER_EXECUTION);
        assert_eq!(clients[0], "c1");
        assert_eq!(
            clients.last().map(ClientId::as_str),
            Some(format!("c{MAX_CLIENTS_PER_EXECUTION}").as_str())
        );
    }

    #[tokio::test]
    async fn the_owners_clients_are_never_pushed_out_by_others() {
        let kv = MemoryKv::new(BucketTtls::default());
        add_interest(&kv, &eid(), &cid("own-1"), Interested::Owner)
            .await
            .unwrap();
        for i in 0..300 {
            add_interest(&kv, &eid(), &cid(&format!("v{i}")), Interested::Other)
                .await
                .unwrap();
        }
        add_interest(&kv, &eid(), &cid("own-2"), Interested::Owner)
            .await
            .unwrap();
        let clients = interested_clients(&kv, &eid()).await.unwrap();
        assert_eq!(clients.len(), 2 + MAX_CLIENTS_PER_EXECUTION);
        assert_eq!(clients[..2], [cid("own-1"), cid("own-2")]);
        assert_eq!(clients[2], "v44", "the others' oldest went");
        // The wire form: every id in `clients`, the owner's named again.
        let raw = kv.get(Bucket::Interest, ID).await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["owner"], serde_json::json!(["own-1", "own-2"]));
        assert_eq!(v["clients"].as_array().unwrap().len(), clients.len());
        // An owner's client that was first recorded as another's moves to the owner's list.
        add_interest(&kv, &eid(), &cid("v299"), Interested::Owner)
            .await
            .unwrap();
        let clients = interested_clients(&kv, &eid()).await.unwrap();
        assert_eq!(clients[2], "v299");
        assert_eq!(clients.iter().filter(|c| c.as_str() == "v299").count(), 1);
        // The owner's own list is bounded by its own cap.
        for i in 0..=MAX_OWNER_CLIENTS_PER_EXECUTION {
            add_interest(&kv, &eid(), &cid(&format!("o{i}")), Interested::Owner)
                .await
                .unwrap();
        }
        let clients = interested_clients(&kv, &eid()).await.unwrap();
        assert_eq!(
            clients.len(),
            MAX_OWNER_CLIENTS_PER_EXECUTION + MAX_CLIENTS_PER_EXECUTION - 1
        );
        assert_eq!(clients[0], "o1");
    }

    #[tokio::test]
    async fn records_written_before_the_owner_list_still_decode() {
        let kv = MemoryKv::new(BucketTtls::default());
        kv.put(
            Bucket::Interest,
            ID,
            Bytes::from_static(br#"{"clients":["a","b","a"]}"#),
        )
        .await
        .unwrap();
        assert_eq!(
            interested_clients(&kv, &eid()).await.unwrap(),
            [cid("a"), cid("b")]
        );
        add_interest(&kv, &eid(), &cid("b"), Interested::Owner)
            .await
            .unwrap();
        assert_eq!(
            interested_clients(&kv, &eid()).await.unwrap(),
            [cid("b"), cid("a")]
        );
    }
}
