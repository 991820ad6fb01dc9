//! The request store: what the gateway promised to deliver, shared by every replica.
//!
//! executePlaybook writes an entry (K/V `requests`, key = request id) **before** it calls
//! NoETL, so a callback that arrives on any replica — even before NoETL's `/api/execute`
//! has answered — finds who to deliver to. A callback marks the request delivered with an
//! atomic create-if-absent (`delivered.<request_id>`), which is what makes a repeated
//! callback a no-op on every replica. The same marker, created the same way, is what a
//! result the gateway synthesises for a run that ended without a callback claims
//! (`crate::settle`), so exactly one of the two is delivered; its value says which
//! ([`Delivered`]).
//!
//! Request ids are 128-bit random. A request's callback token is
//! `hex(HMAC-SHA256(GATEWAY_CALLBACK_SECRET, request_id))`: a playbook can authenticate its
//! own callback without knowing the service token, and a token for one request is useless
//! for another.

use bytes::Bytes;
use gateway_shared::ids::{ClientId, ExecutionId, RequestId};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::store::{Bucket, KvStore, StoreError};

/// One promised delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEntry {
    /// The gateway's request id.
    pub request_id: RequestId,
    /// The client the result goes to (`None`: nobody is listening; kept for status).
    pub client_id: Option<ClientId>,
    /// The user who asked.
    pub user_id: String,
    /// NoETL's execution id, once `/api/execute` answered.
    pub execution_id: Option<ExecutionId>,
    /// The playbook path.
    pub playbook_path: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A new random request id: 128 bits, hex.
pub fn new_request_id() -> RequestId {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    RequestId::parse(&hex::encode(b)).expect("32 hex characters are a valid request id")
}

/// Signs and checks per-request callback tokens.
#[derive(Clone)]
pub struct CallbackTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for CallbackTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackTokens(<redacted>)")
    }
}

impl CallbackTokens {
    /// Tokens keyed by `secret`, or by a random per-process key when there is none (then
    /// only this replica can check them: fine for one replica, logged at start).
    pub fn new(secret: Option<&str>) -> Self {
        let key = match secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                let mut k = vec![0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                k
            }
        };
        Self { key }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    /// The callback token for `request_id`.
    pub fn token_for(&self, request_id: &str) -> String {
        let mut mac = self.mac();
        mac.update(request_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// True iff `token` is `request_id`'s token; constant time.
    pub fn verify(&self, request_id: &str, token: &str) -> bool {
        let Ok(raw) = hex::decode(token) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(request_id.as_bytes());
        mac.verify_slice(&raw).is_ok()
    }
}

/// Writes a new entry.
pub async fn put(kv: &dyn KvStore, entry: &RequestEntry) -> Result<(), StoreError> {
    let value = serde_json::to_vec(entry).expect("a request entry is plain data");
    kv.put(
        Bucket::Requests,
        entry.request_id.as_str(),
        Bytes::from(value),
    )
    .await
}

/// Reads an entry; an unreadable one is treated as absent (and logged).
pub async fn get(
    kv: &dyn KvStore,
    request_id: &RequestId,
) -> Result<Option<RequestEntry>, StoreError> {
    Ok(kv
        .get(Bucket::Requests, request_id.as_str())
        .await?
        .and_then(|b| match serde_json::from_slice(&b) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "unreadable request entry");
                None
            }
        }))
}

/// The `delivered` marker's value when a callback created it.
const BY_CALLBACK: &[u8] = b"1";
/// …when the gateway claimed it for a synthesised result not yet published.
const SETTLING: &[u8] = b"settling";
/// …when the gateway published that synthesised result.
const SETTLED: &[u8] = b"settled";

/// Marks the request delivered; `Ok(false)` if it already was (a duplicate callback, or a
/// result the gateway synthesised first).
pub async fn mark_delivered(kv: &dyn KvStore, request_id: &RequestId) -> Result<bool, StoreError> {
    kv.create(
        Bucket::Requests,
        &delivered_key(request_id),
        Bytes::from_static(BY_CALLBACK),
    )
    .await
}

/// Who holds a request's `delivered` marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Nobody: the result is still owed.
    No,
    /// A callback (any value but the gateway's own two).
    ByCallback,
    /// The gateway claimed it for a synthesised result and has not published it yet: a
    /// redelivery of the bridge event that claimed it carries on.
    Settling,
    /// The gateway published a synthesised result.
    Settled,
}

impl Delivered {
    fn of(marker: Option<&[u8]>) -> Self {
        match marker {
            None => Self::No,
            Some(SETTLING) => Self::Settling,
            Some(SETTLED) => Self::Settled,
            Some(_) => Self::ByCallback,
        }
    }
}

/// Reads the request's `delivered` marker.
pub async fn delivered(kv: &dyn KvStore, request_id: &RequestId) -> Result<Delivered, StoreError> {
    let marker = kv.get(Bucket::Requests, &delivered_key(request_id)).await?;
    Ok(Delivered::of(marker.as_deref()))
}

/// Claims the request's delivery for a result the gateway synthesises: true if the marker
/// was created now, or was already the gateway's unpublished claim (only the bridge event
/// that owns the execution's terminal frame settles it, so that claim is this event's, from
/// an attempt whose publish failed or whose replica stopped). False when a callback holds
/// it, or the synthesised result was published already.
pub async fn claim_settlement(
    kv: &dyn KvStore,
    request_id: &RequestId,
) -> Result<bool, StoreError> {
    let key = delivered_key(request_id);
    if kv
        .create(Bucket::Requests, &key, Bytes::from_static(SETTLING))
        .await?
    {
        return Ok(true);
    }
    Ok(delivered(kv, request_id).await? == Delivered::Settling)
}

/// Records that the synthesised result was published: a redelivery of the event that
/// claimed it then publishes nothing.
pub async fn mark_settled(kv: &dyn KvStore, request_id: &RequestId) -> Result<(), StoreError> {
    kv.put(
        Bucket::Requests,
        &delivered_key(request_id),
        Bytes::from_static(SETTLED),
    )
    .await
}

/// Whether the request's result was delivered (its [`mark_delivered`] marker exists):
/// progress for it is refused.
pub async fn is_delivered(kv: &dyn KvStore, request_id: &RequestId) -> Result<bool, StoreError> {
    Ok(kv
        .get(Bucket::Requests, &delivered_key(request_id))
        .await?
        .is_some())
}

/// Undoes [`mark_delivered`] when the delivery itself failed, so NoETL's retry succeeds.
pub async fn unmark_delivered(kv: &dyn KvStore, request_id: &RequestId) -> Result<(), StoreError> {
    kv.delete(Bucket::Requests, &delivered_key(request_id))
        .await
}

fn delivered_key(request_id: &RequestId) -> String {
    format!("delivered.{request_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_tokens_bind_to_their_request() {
        let t = CallbackTokens::new(Some("a-shared-secret-of-some-length"));
        let tok = t.token_for("r1");
        assert!(t.verify("r1", &tok));
        assert!(!t.verify("r2", &tok));
        assert!(!t.verify("r1", "zz"));
        assert!(!t.verify("r1", ""));
        let other = CallbackTokens::new(Some("another-secret-entirely-different"));
        assert!(!other.verify("r1", &tok));
    }

    #[test]
    fn a_marker_names_who_delivered() {
        assert_eq!(Delivered::of(None), Delivered::No);
        assert_eq!(Delivered::of(Some(BY_CALLBACK)), Delivered::ByCallback);
        assert_eq!(Delivered::of(Some(b"anything else")), Delivered::ByCallback);
        assert_eq!(Delivered::of(Some(SETTLING)), Delivered::Settling);
        assert_eq!(Delivered::of(Some(SETTLED)), Delivered::Settled);
    }

    #[tokio::test]
    async fn a_callback_and_a_settlement_exclude_each_other() {
        use crate::store::memory::MemoryKv;
        use crate::store::BucketTtls;
        let kv = MemoryKv::new(BucketTtls::default());
        let (a, b) = (new_request_id(), new_request_id());
        // Callback first: the gateway's claim fails, and so does a second callback.
        assert!(mark_delivered(&kv, &a).await.unwrap());
        assert!(!claim_settlement(&kv, &a).await.unwrap());
        assert!(!mark_delivered(&kv, &a).await.unwrap());
        // The gateway first: its own claim holds on a retry, a callback is a duplicate,
        // and once published nothing claims it again.
        assert!(claim_settlement(&kv, &b).await.unwrap());
        assert!(claim_settlement(&kv, &b).await.unwrap());
        assert!(!mark_delivered(&kv, &b).await.unwrap());
        mark_settled(&kv, &b).await.unwrap();
        assert_eq!(delivered(&kv, &b).await.unwrap(), Delivered::Settled);
        assert!(!claim_settlement(&kv, &b).await.unwrap());
        assert!(is_delivered(&kv, &b).await.unwrap());
    }

    #[test]
    fn request_ids_are_128_bit_hex() {
        let a = new_request_id();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_request_id());
    }
}
