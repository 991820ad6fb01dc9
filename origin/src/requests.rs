//! The request store: what the gateway promised to deliver, shared by every replica.
//!
//! executePlaybook writes an entry (K/V `requests`, key = request id) **before** it calls
//! NoETL, so a callback that arrives on any replica — even before NoETL's `/api/execute`
//! has answered — finds who to deliver to. A callback marks the request delivered with an
//! atomic create-if-absent (`delivered.<request_id>`), which is what makes a repeated
//! callback a no-op on every replica.
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

/// Marks the request delivered; `Ok(false)` if it already was (a duplicate callback).
pub async fn mark_delivered(kv: &dyn KvStore, request_id: &RequestId) -> Result<bool, StoreError> {
    kv.create(
        Bucket::Requests,
        &delivered_key(request_id),
        Bytes::from_static(b"1"),
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
    fn request_ids_are_128_bit_hex() {
        let a = new_request_id();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_request_id());
    }
}
