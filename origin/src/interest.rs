//! Interest records: which clients want an execution's `playbook/state` frames.
//!
//! One key per execution in [`Bucket::Interest`]: key `<execution_id>`, value
//! `{"clients": ["<client_id>", …]}`. Written by executePlaybook (after NoETL's
//! `/api/execute` answered, since only then is the id known) and by
//! subscribeToExecution; read by the bridge with one `get` per event, by execution id —
//! never by scanning the bucket. Records expire with the bucket's TTL (≥ the longest
//! playbook), so nothing has to clean them up.
//!
//! The same bucket also holds the bridge's claims, `terminal.<execution_id>` and
//! `failed.<execution_id>.<step hash>` (see [`crate::bridge::policy::terminal_key`] and
//! [`crate::bridge::policy::failure_key`]); execution ids never contain a `.`, so the kinds
//! of key cannot collide.

use bytes::Bytes;
use gateway_shared::ids::{ClientId, ExecutionId};
use serde::{Deserialize, Serialize};

use crate::store::{Bucket, KvStore, StoreError};

/// Most clients kept per execution; beyond it the oldest is dropped, so one popular
/// execution cannot grow a record (and every event's read of it) without bound.
pub const MAX_CLIENTS_PER_EXECUTION: usize = 256;

/// How often [`add_interest`] retries when another writer created the record between its
/// read and its create.
const CREATE_RACE_ATTEMPTS: usize = 3;

/// The stored value.
#[derive(Debug, Default, Serialize, Deserialize)]
struct InterestRecord {
    #[serde(default)]
    clients: Vec<ClientId>,
}

impl InterestRecord {
    /// Reads a stored value leniently: a record this code did not write (or a corrupted
    /// one) yields the valid client ids it holds, never an error that would make the
    /// bridge retry an event forever.
    fn decode(execution_id: &ExecutionId, raw: &[u8]) -> Self {
        match serde_json::from_slice::<serde_json::Value>(raw) {
            Ok(v) => Self {
                clients: v
                    .get("clients")
                    .and_then(|c| c.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c.as_str())
                            .filter_map(|c| ClientId::parse(c).ok())
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            Err(e) => {
                tracing::warn!(%execution_id, error = %e, "unreadable interest record ignored");
                Self::default()
            }
        }
    }

    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a list of strings always serialises"))
    }
}

/// Records that `client_id` wants the frames of `execution_id` (idempotent).
///
/// Read-modify-write: the store has no compare-and-swap on updates, so two clients added
/// to an *existing* record at the same instant (on two replicas) can lose one of them —
/// the later `put` wins. The first write is safe: it goes through `create`, and a lost
/// create race re-reads and retries. The common case is one client per execution,
/// recorded once by executePlaybook, so the window is small; a subscriber that must not
/// miss it can call this again (it is idempotent).
///
/// Errors: the store's own. Both ids are checked types, so neither can make a bad key.
pub async fn add_interest(
    kv: &dyn KvStore,
    execution_id: &ExecutionId,
    client_id: &ClientId,
) -> Result<(), StoreError> {
    let key = execution_id.as_str();
    for _ in 0..CREATE_RACE_ATTEMPTS {
        match kv.get(Bucket::Interest, key).await? {
            None => {
                let record = InterestRecord {
                    clients: vec![client_id.clone()],
                };
                if kv.create(Bucket::Interest, key, record.encode()).await? {
                    return Ok(());
                }
                // Someone created it between our get and create: read it again.
            }
            Some(raw) => {
                let mut record = InterestRecord::decode(execution_id, &raw);
                if record.clients.iter().any(|c| c == client_id) {
                    return Ok(());
                }
                record.clients.push(client_id.clone());
                if record.clients.len() > MAX_CLIENTS_PER_EXECUTION {
                    let excess = record.clients.len() - MAX_CLIENTS_PER_EXECUTION;
                    tracing::warn!(%execution_id, dropped = excess, "interest record full: oldest clients dropped");
                    record.clients.drain(..excess);
                }
                return kv.put(Bucket::Interest, key, record.encode()).await;
            }
        }
    }
    Err(StoreError::Unavailable(format!(
        "interest record for {execution_id} kept changing during {CREATE_RACE_ATTEMPTS} attempts"
    )))
}

/// The clients interested in `execution_id`, oldest first; empty if none (yet).
///
pub async fn interested_clients(
    kv: &dyn KvStore,
    execution_id: &ExecutionId,
) -> Result<Vec<ClientId>, StoreError> {
    Ok(kv
        .get(Bucket::Interest, execution_id.as_str())
        .await?
        .map(|raw| InterestRecord::decode(execution_id, &raw).clients)
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
        add_interest(&kv, &eid(), &cid("c1")).await.unwrap();
        add_interest(&kv, &eid(), &cid("c2")).await.unwrap();
        add_interest(&kv, &eid(), &cid("c1")).await.unwrap();
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
            add_interest(&kv, &eid(), &cid(&format!("c{i}")))
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
}
