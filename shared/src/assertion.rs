//! The edge's signed assertion of who is calling (`x-gateway-assertion`).
//!
//! The edge validates the session once (Workers KV, then the origin) and forwards the
//! request with a 60-second EdDSA (Ed25519) JWT naming the user, the session hash and the
//! request id. The origin verifies it with the edge's public key and trusts it instead of
//! validating the session again. The algorithm is pinned (`EdDSA`), so a token "signed"
//! with `none` or an HMAC over the public key is refused before any key is used; `iss`,
//! `aud` and `exp` are checked with a small leeway.
//!
//! Time is passed in by the caller: Workers have no system clock a library may read.

use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use jwt_compact::alg::Ed25519;
use jwt_compact::prelude::*;
use jwt_compact::ValidationError;
use serde::{Deserialize, Serialize};

pub use ed25519_compact::{PublicKey, SecretKey};

/// `iss` of every assertion.
pub const ISSUER: &str = "noetl-edge";
/// `aud` of every assertion.
pub const AUDIENCE: &str = "noetl-origin";
/// Lifetime of an assertion, in seconds.
pub const LIFETIME_SECS: i64 = 60;
/// The header that carries the assertion.
pub const HEADER: &str = "x-gateway-assertion";

/// Who the edge says is calling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    /// `sub`: NoETL's user id.
    pub sub: String,
    /// The user's e-mail.
    pub email: String,
    /// The user's roles.
    pub roles: Vec<String>,
    /// The session hash (`hex(sha256(token))`), never the token.
    pub sid: String,
    /// The request id the edge assigned or accepted.
    pub rid: String,
    /// Unix seconds when the session itself expires.
    pub session_exp: i64,
    /// Always [`ISSUER`].
    pub iss: String,
    /// Always [`AUDIENCE`].
    pub aud: String,
}

/// Why an assertion was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssertionError {
    /// Not a JWT, or claims of the wrong shape.
    Malformed,
    /// `alg` is not `EdDSA`.
    WrongAlgorithm,
    /// The signature does not verify with the edge's key.
    BadSignature,
    /// `exp` has passed.
    Expired,
    /// `iss` or `aud` is not the gateway's.
    WrongParty,
    /// A key could not be read.
    BadKey,
}

impl AssertionError {
    /// A machine code for JSON errors and logs.
    pub fn code(&self) -> &'static str {
        match self {
            AssertionError::Malformed => "assertion_malformed",
            AssertionError::WrongAlgorithm => "assertion_wrong_algorithm",
            AssertionError::BadSignature => "assertion_bad_signature",
            AssertionError::Expired => "assertion_expired",
            AssertionError::WrongParty => "assertion_wrong_party",
            AssertionError::BadKey => "assertion_bad_key",
        }
    }
}

impl core::fmt::Display for AssertionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.code())
    }
}

fn at(unix: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(unix, 0)
        .single()
        .unwrap_or_else(|| Utc.timestamp_opt(0, 0).unwrap())
}

/// A signing key from its 32-byte seed, base64url (the Workers secret `EDGE_ASSERTION_KEY`).
pub fn signing_key_from_b64(seed_b64: &str) -> Result<SecretKey, AssertionError> {
    use base64::Engine;
    let seed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seed_b64.trim().trim_end_matches('='))
        .map_err(|_| AssertionError::BadKey)?;
    let seed: [u8; 32] = seed.try_into().map_err(|_| AssertionError::BadKey)?;
    // ed25519-compact panics on an all-zero seed; such a "secret" is no key anyway.
    if seed.iter().all(|b| *b == 0) {
        return Err(AssertionError::BadKey);
    }
    Ok(ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(seed)).sk)
}

/// A verifying key from its 32 bytes, base64url (the origin's `EDGE_ASSERTION_PUBLIC_KEY`).
pub fn verifying_key_from_b64(pk_b64: &str) -> Result<PublicKey, AssertionError> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(pk_b64.trim().trim_end_matches('='))
        .map_err(|_| AssertionError::BadKey)?;
    PublicKey::from_slice(&raw).map_err(|_| AssertionError::BadKey)
}

/// The public key of a signing key, base64url (what the origin is configured with).
pub fn public_key_b64(key: &SecretKey) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key().as_ref())
}

/// Signs `claims` (whose `iss`/`aud` are overwritten with the gateway's) for
/// [`LIFETIME_SECS`] from `now_unix`.
pub fn sign(
    claims: &AssertionClaims,
    key: &SecretKey,
    now_unix: i64,
) -> Result<String, AssertionError> {
    let mut c = claims.clone();
    c.iss = ISSUER.to_owned();
    c.aud = AUDIENCE.to_owned();
    let mut jwt = Claims::new(c);
    jwt.issued_at = Some(at(now_unix));
    jwt.expiration = Some(at(now_unix + LIFETIME_SECS));
    Ed25519
        .token(&Header::empty().with_token_type("JWT"), &jwt, key)
        .map_err(|_| AssertionError::Malformed)
}

/// Verifies an assertion at `now_unix` with `leeway_secs` of clock skew allowed.
pub fn verify(
    token: &str,
    key: &PublicKey,
    now_unix: i64,
    leeway_secs: i64,
) -> Result<AssertionClaims, AssertionError> {
    if token.len() > 8 * 1024 {
        return Err(AssertionError::Malformed);
    }
    let untrusted = UntrustedToken::new(token).map_err(|_| AssertionError::Malformed)?;
    if untrusted.algorithm() != "EdDSA" {
        return Err(AssertionError::WrongAlgorithm);
    }
    let token: Token<AssertionClaims> =
        Ed25519
            .validator(key)
            .validate(&untrusted)
            .map_err(|e| match e {
                ValidationError::InvalidSignature | ValidationError::MalformedSignature(_) => {
                    AssertionError::BadSignature
                }
                _ => AssertionError::Malformed,
            })?;
    let claims = token.claims();
    let options = TimeOptions::new(ChronoDuration::seconds(leeway_secs), move || at(now_unix));
    claims
        .validate_expiration(&options)
        .map_err(|_| AssertionError::Expired)?;
    let c = &claims.custom;
    if c.iss != ISSUER || c.aud != AUDIENCE {
        return Err(AssertionError::WrongParty);
    }
    Ok(c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn key() -> SecretKey {
        signing_key_from_b64(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]))
            .unwrap()
    }

    fn claims() -> AssertionClaims {
        AssertionClaims {
            sub: "612345678901234567".into(),
            email: "ada@example.com".into(),
            roles: vec!["user".into()],
            sid: "ab".repeat(32),
            rid: "req-1".into(),
            session_exp: 2_000_000_000,
            iss: String::new(),
            aud: String::new(),
        }
    }

    #[test]
    fn a_fresh_assertion_verifies_and_names_the_caller() {
        let k = key();
        let t = sign(&claims(), &k, 1_000).unwrap();
        let pk = verifying_key_from_b64(&public_key_b64(&k)).unwrap();
        let c = verify(&t, &pk, 1_030, 5).unwrap();
        assert_eq!(c.sub, "612345678901234567");
        assert_eq!(c.iss, ISSUER);
    }

    #[test]
    fn expired_foreign_and_forged_assertions_are_refused() {
        let k = key();
        let pk = k.public_key();
        let t = sign(&claims(), &k, 1_000).unwrap();
        assert_eq!(
            verify(&t, &pk, 1_000 + LIFETIME_SECS + 10, 5),
            Err(AssertionError::Expired)
        );
        let other = signing_key_from_b64(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9u8; 32]),
        )
        .unwrap();
        let forged = sign(&claims(), &other, 1_000).unwrap();
        assert_eq!(
            verify(&forged, &pk, 1_000, 5),
            Err(AssertionError::BadSignature)
        );
        let parts: Vec<&str> = t.split('.').collect();
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            parts[1]
        );
        assert_eq!(
            verify(&none, &pk, 1_000, 5),
            Err(AssertionError::WrongAlgorithm)
        );
        let mut tampered: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap();
        tampered["roles"] = serde_json::json!(["admin"]);
        let t2 = format!(
            "{}.{}.{}",
            parts[0],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tampered.to_string()),
            parts[2]
        );
        assert_eq!(
            verify(&t2, &pk, 1_000, 5),
            Err(AssertionError::BadSignature)
        );
        assert_eq!(
            verify("garbage", &pk, 1_000, 5),
            Err(AssertionError::Malformed)
        );
        assert!(signing_key_from_b64("short").is_err());
        let zero = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert_eq!(
            signing_key_from_b64(&zero).err(),
            Some(AssertionError::BadKey)
        );
    }
}
