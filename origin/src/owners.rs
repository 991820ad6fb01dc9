//! Who started each execution, and who may therefore read it or act on it (K/V `owners`).
//!
//! NoETL's access rules are about playbooks (`view`, `execute`), not runs: every user who may
//! view `demo/*` could read every `demo/*` run, its workload and its callback token included.
//! So the gateway records, when `executePlaybook` succeeds, which user started the run, and
//! every read or action on one execution asks [`may_read`] first: the owner and callers with
//! a read-all role (`READ_ALL_ROLES`) pass; anyone else is told the run does not exist (404,
//! never 403, so a guessed id confirms nothing). A run the gateway did not start (no record:
//! NoETL's own runs, the auth playbooks) is read-all only.
//!
//! Keys in [`Bucket::Owners`] (all expire with the bucket's TTL, `EXECUTION_OWNER_TTL`):
//! - `exec/<execution_id>` → [`OwnerRecord`], written with `create`, so a run's first owner
//!   is never replaced (NoETL answering a duplicate start with an existing id); it names
//!   the request that started the run, so a result can be synthesised for it;
//! - `user/<hex(sha256(user_id))>/<n>` → the same record, the user's `n`-th run: `n` is
//!   claimed with `create` from 1 upwards, so two replicas recording runs of one user at
//!   once take different slots and neither is lost, without compare-and-swap or a scan;
//! - `user/<hash>/head` → the last slot taken, a hint only: a stale hint (a lost race
//!   between two `put`s) costs a few extra reads, since readers probe upwards from it.
//!
//! Slots are taken in start order and expire in that order, so a user's runs are the
//! contiguous slots below the top: `myExecutions` reads a page by slot number, newest
//! first, and walks at most [`MAX_LISTED_PER_USER`] slots back.
//!
//! **One replica takes one user's slots in turn.** Writers that race for a slot cost a
//! failed create each, and every writer of a burst probes up from the same hint: a user (a
//! partner system with one account) starting N runs at once cost O(N) failed creates per
//! run — 1,114 for 48 runs at once, 28,632 for 2,000 runs 32 at a time. So a replica's
//! records of one user wait for each other ([`Owners::record`]'s lane, held while the slot
//! is created; at most [`LANE_WAIT`], then the record probes without it, as before), and
//! each goes on from the slot the last one took, which the lane remembers while a record
//! holds or waits for it (the hint is read when it starts). Only replicas race: a lost
//! race costs one failed create, a read of the hint and the next slot. A slot is
//! remembered only once created, so a failed write leaves no hole (the listing ends at the
//! first one).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use gateway_shared::ids::{ExecutionId, RequestId};
use gateway_shared::session::User;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lanes::Lanes;
use crate::store::{Bucket, KvStore, StoreError};

/// The page size of `myExecutions` when `first` is not given.
pub const DEFAULT_PAGE: usize = 20;
/// The largest page `myExecutions` serves.
pub const MAX_PAGE: usize = 100;
/// How many of a user's runs can be listed, newest first; older ones are still readable
/// by id until their records expire.
pub const MAX_LISTED_PER_USER: u64 = 1000;
/// How many slots above the hint a writer or reader probes before giving up (a hint that
/// far behind means the store is misbehaving).
const MAX_PROBE: u64 = 4096;
/// How long a record waits for the record of the same user ahead of it on this replica
/// before it probes for a slot without waiting (a store that hangs must not queue a user's
/// runs behind it for longer than its own timeouts).
pub const LANE_WAIT: Duration = Duration::from_secs(2);

/// Who started an execution through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// NoETL's execution id (a valid [`ExecutionId`]).
    pub execution_id: String,
    /// The user who started it (NoETL's user id).
    pub user_id: String,
    /// The playbook it runs.
    pub playbook_path: String,
    /// When `executePlaybook` started it (unix seconds).
    pub started_at: i64,
    /// The gateway's request that started it: where a result the gateway synthesises for
    /// a run that ends without a callback goes (`crate::settle`). Absent in records
    /// written before it was kept, and then nothing is synthesised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
}

/// The one ownership rule: the run's owner, or a caller with a role in `read_all_roles`,
/// may read and act on it. `owner` is `None` for a run the gateway did not start.
pub fn may_read(user: &User, owner: Option<&OwnerRecord>, read_all_roles: &[String]) -> bool {
    let reads_all = user.roles.iter().any(|r| read_all_roles.contains(r));
    let owns = owner.is_some_and(|o| !o.user_id.is_empty() && o.user_id == user.user_id);
    reads_all || owns
}

/// What [`Owners::record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The run is now the user's, listed in slot `n`.
    New(u64),
    /// The run was already recorded for this user (nothing changed).
    Already,
    /// The run was already recorded for another user, who keeps it.
    OwnedByAnother,
}

/// One page of a user's runs, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The runs, each with its slot number (its cursor).
    pub items: Vec<(u64, OwnerRecord)>,
    /// True when older runs follow the last item.
    pub has_next: bool,
}

/// The ownership records over the shared store, and the read-all roles.
#[derive(Clone)]
pub struct Owners {
    kv: Arc<dyn KvStore>,
    read_all_roles: Arc<[String]>,
    /// One lane per user recording runs on this replica (module docs), by run-list prefix,
    /// holding the last slot this replica took for the user.
    lanes: Arc<Lanes<Option<u64>>>,
}

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owners")
            .field("read_all_roles", &self.read_all_roles)
            .finish_non_exhaustive()
    }
}

fn exec_key(id: &ExecutionId) -> String {
    format!("exec/{id}")
}

fn user_prefix(user_id: &str) -> String {
    format!("user/{}", hex::encode(Sha256::digest(user_id.as_bytes())))
}

fn encode(record: &OwnerRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(record).expect("an owner record is plain data"))
}

fn decode(raw: &[u8]) -> Option<OwnerRecord> {
    serde_json::from_slice(raw).ok()
}

impl Owners {
    /// The records in `kv`; `read_all_roles` read and act on every run.
    pub fn new(kv: Arc<dyn KvStore>, read_all_roles: Vec<String>) -> Self {
        Self {
            kv,
            read_all_roles: read_all_roles.into(),
            lanes: Arc::new(Lanes::new(LANE_WAIT)),
        }
    }

    /// True when `user` holds a read-all role.
    pub fn reads_all(&self, user: &User) -> bool {
        may_read(user, None, &self.read_all_roles)
    }

    /// Records that `record.user_id` started `record.execution_id`. The first record of a
    /// run wins: a second one for the same id changes nothing.
    pub async fn record(&self, record: &OwnerRecord) -> Result<Recorded, StoreError> {
        let id = ExecutionId::parse(&record.execution_id)
            .map_err(|_| StoreError::InvalidKey(record.execution_id.clone()))?;
        let kv = self.kv.as_ref();
        if !kv
            .create(Bucket::Owners, &exec_key(&id), encode(record))
            .await?
        {
            return Ok(match self.owner(&id).await? {
                Some(o) if o.user_id == record.user_id => Recorded::Already,
                _ => Recorded::OwnedByAnother,
            });
        }
        let prefix = user_prefix(&record.user_id);
        let head_key = format!("{prefix}/head");
        // Held until this record has its slot (module docs). The lane remembers the last slot
        // this replica took for the user; without it (the first record of a burst, or the
        // lane not had in time) the hint is read.
        let mut turn = self.lanes.turn(&prefix).await;
        let remembered = turn.as_deref().copied().flatten();
        let mut hint_read = remembered.is_none();
        let mut n = match remembered {
            Some(last) => last + 1,
            None => self.head(&head_key).await? + 1,
        };
        let limit = n + MAX_PROBE;
        while !kv
            .create(Bucket::Owners, &format!("{prefix}/{n}"), encode(record))
            .await?
        {
            // Another replica took it: past what it wrote, or else one up.
            n = if hint_read {
                n + 1
            } else {
                hint_read = true;
                (self.head(&head_key).await? + 1).max(n + 1)
            };
            if n > limit {
                return Err(StoreError::Unavailable(format!(
                    "no free run slot within {MAX_PROBE} of the hint"
                )));
            }
        }
        if let Some(turn) = turn.as_deref_mut() {
            *turn = Some(n);
        }
        // The next record of the lane goes on from the slot remembered, not the hint.
        drop(turn);
        if let Err(e) = kv
            .put(Bucket::Owners, &head_key, Bytes::from(n.to_string()))
            .await
        {
            tracing::warn!(error = %e, "run-list hint not updated; readers probe past it");
        }
        Ok(Recorded::New(n))
    }

    async fn head(&self, head_key: &str) -> Result<u64, StoreError> {
        Ok(self
            .kv
            .get(Bucket::Owners, head_key)
            .await?
            .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Who started `id` through the gateway, if anyone (within the records' TTL).
    pub async fn owner(&self, id: &ExecutionId) -> Result<Option<OwnerRecord>, StoreError> {
        Ok(self
            .kv
            .get(Bucket::Owners, &exec_key(id))
            .await?
            .and_then(|b| decode(&b)))
    }

    /// [`may_read`] for the execution named `raw_id` (as a client sent it): a read-all caller
    /// passes without a store read; an id that could never be recorded has no owner.
    pub async fn may_access(&self, user: &User, raw_id: &str) -> Result<bool, StoreError> {
        if self.reads_all(user) {
            return Ok(true);
        }
        let Ok(id) = ExecutionId::parse(raw_id) else {
            return Ok(false);
        };
        let owner = self.owner(&id).await?;
        Ok(may_read(user, owner.as_ref(), &self.read_all_roles))
    }

    /// Up to `first` of `user_id`'s runs, newest first, starting below slot `after` (the
    /// previous page's last cursor) or at the newest.
    pub async fn page(
        &self,
        user_id: &str,
        first: usize,
        after: Option<u64>,
    ) -> Result<Page, StoreError> {
        let prefix = user_prefix(user_id);
        let top = self.top(&prefix).await?;
        let floor = top.saturating_sub(MAX_LISTED_PER_USER);
        let start = after.map_or(top, |a| a.saturating_sub(1).min(top));
        // One more than asked, to tell whether a next page exists.
        let wanted = (first.min(MAX_PAGE) + 1) as u64;
        let slots: Vec<u64> = (floor + 1..=start).rev().take(wanted as usize).collect();
        let kv = self.kv.as_ref();
        let keys: Vec<String> = slots.iter().map(|n| format!("{prefix}/{n}")).collect();
        let reads = join_all(keys.iter().map(|k| kv.get(Bucket::Owners, k))).await;
        let mut items = Vec::new();
        for (n, read) in slots.into_iter().zip(reads) {
            // Slots expire oldest first: the first missing one ends the list.
            let Some(raw) = read? else { break };
            if let Some(record) = decode(&raw) {
                items.push((n, record));
            }
        }
        let has_next = items.len() > first.min(MAX_PAGE);
        items.truncate(first.min(MAX_PAGE));
        Ok(Page { items, has_next })
    }

    /// The user's newest slot: the hint, then upwards while slots exist.
    async fn top(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut top = self.head(&format!("{prefix}/head")).await?;
        let limit = top + MAX_PROBE;
        while top < limit
            && self
                .kv
                .get(Bucket::Owners, &format!("{prefix}/{}", top + 1))
                .await?
                .is_some()
        {
            top += 1;
        }
        Ok(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryKv;
    use crate::store::BucketTtls;

    fn user(id: &str, roles: &[&str]) -> User {
        User {
            user_id: id.into(),
            email: format!("{id}@example.test"),
            display_name: id.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn run(id: &str, owner: &str) -> OwnerRecord {
        OwnerRecord {
            execution_id: id.into(),
            user_id: owner.into(),
            playbook_path: "demo/echo".into(),
            started_at: 1_700_000_000,
            request_id: None,
        }
    }

    #[test]
    fn the_owner_and_read_all_roles_may_read_and_nobody_else() {
        let admin = ["admin".to_string()];
        let a = user("1", &["user"]);
        let b = user("2", &["user"]);
        let ops = user("3", &["user", "admin"]);
        let owned_by_a = run("42", "1");
        assert!(may_read(&a, Some(&owned_by_a), &admin));
        assert!(!may_read(&b, Some(&owned_by_a), &admin));
        assert!(may_read(&ops, Some(&owned_by_a), &admin));
        // A run the gateway did not start is read-all only.
        assert!(!may_read(&a, None, &admin));
        assert!(may_read(&ops, None, &admin));
        // No read-all roles configured: only owners.
        assert!(!may_read(&ops, None, &[]));
        assert!(!may_read(&ops, Some(&owned_by_a), &[]));
        // An empty user id never owns anything.
        assert!(!may_read(&user("", &[]), Some(&run("42", "")), &admin));
    }

    fn owners() -> Owners {
        Owners::new(
            Arc::new(MemoryKv::new(BucketTtls::default())),
            vec!["admin".into()],
        )
    }

    #[tokio::test]
    async fn the_first_owner_of_a_run_keeps_it() {
        let o = owners();
        assert_eq!(o.record(&run("42", "1")).await.unwrap(), Recorded::New(1));
        assert_eq!(o.record(&run("42", "1")).await.unwrap(), Recorded::Already);
        assert_eq!(
            o.record(&run("42", "2")).await.unwrap(),
            Recorded::OwnedByAnother
        );
        assert!(o.may_access(&user("1", &[]), "42").await.unwrap());
        assert!(!o.may_access(&user("2", &[]), "42").await.unwrap());
        assert!(o.page("2", 10, None).await.unwrap().items.is_empty());
        assert!(!o.may_access(&user("1", &[]), "43").await.unwrap());
        assert!(!o.may_access(&user("1", &[]), "%34%32").await.unwrap());
        assert!(o.may_access(&user("9", &["admin"]), "43").await.unwrap());
    }

    #[tokio::test]
    async fn pages_run_newest_first_and_concurrent_records_all_land() {
        let o = owners();
        // Twelve runs recorded at once (as by several replicas) each get their own slot.
        let records: Vec<OwnerRecord> = (1..=12).map(|i| run(&i.to_string(), "1")).collect();
        let done = join_all(records.iter().map(|r| o.record(r))).await;
        let mut slots: Vec<u64> = done
            .into_iter()
            .map(|r| match r.unwrap() {
                Recorded::New(n) => n,
                other => panic!("{other:?}"),
            })
            .collect();
        slots.sort_unstable();
        assert_eq!(slots, (1..=12).collect::<Vec<_>>());

        // A stale hint is probed past.
        o.kv.put(
            Bucket::Owners,
            &format!("{}/head", user_prefix("1")),
            "3".into(),
        )
        .await
        .unwrap();
        let first = o.page("1", 5, None).await.unwrap();
        let cursors: Vec<u64> = first.items.iter().map(|(n, _)| *n).collect();
        assert_eq!(cursors, [12, 11, 10, 9, 8]);
        assert!(first.has_next);
        let second = o.page("1", 5, Some(8)).await.unwrap();
        assert_eq!(second.items[0].0, 7);
        let last = o.page("1", 5, Some(3)).await.unwrap();
        assert_eq!(last.items.len(), 2);
        assert!(!last.has_next);
        // Pages are capped.
        assert_eq!(o.page("1", 10_000, None).await.unwrap().items.len(), 12);
        // Another user's list is their own.
        assert!(o.page("2", 5, None).await.unwrap().items.is_empty());
        // A new run after a stale hint takes the next free slot.
        assert_eq!(o.record(&run("99", "1")).await.unwrap(), Recorded::New(13));
    }
}
