//! Test fixtures for ID tokens: RSA keys (generated once per test binary), JWKS entries shaped
//! like Auth0's, and signed tokens with good or altered claims. Used by the tests of
//! [`super::id_token`] and [`super::jwks`].

use std::sync::OnceLock;

use chrono::Utc;
use jwt_compact::alg::{Rsa, RsaPrivateKey};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmExt, Claims, Header};
use serde_json::{json, Value};

use super::id_token::{ClaimRules, KeySet};

/// The issuer every good token names.
pub const ISS: &str = "https://tenant.example.auth0.com/";
/// The audience every good token names.
pub const AUD: &str = "client-id-123";

fn key(slot: &'static OnceLock<RsaPrivateKey>, bits: usize) -> &'static RsaPrivateKey {
    slot.get_or_init(|| {
        RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).expect("RSA key generation")
    })
}

/// The provider's signing key "a".
pub fn key_a() -> &'static RsaPrivateKey {
    static K: OnceLock<RsaPrivateKey> = OnceLock::new();
    key(&K, 2048)
}

/// Another 2048-bit key: a rotated-in key, or an attacker's.
pub fn key_b() -> &'static RsaPrivateKey {
    static K: OnceLock<RsaPrivateKey> = OnceLock::new();
    key(&K, 2048)
}

/// A key below the 2048-bit minimum.
pub fn weak_key() -> &'static RsaPrivateKey {
    static K: OnceLock<RsaPrivateKey> = OnceLock::new();
    key(&K, 1024)
}

/// A JWKS entry shaped like Auth0's (extra `x5c`/`x5t` fields included).
pub fn jwk(key: &RsaPrivateKey, kid: &str) -> Value {
    let public = key.to_public_key();
    let mut entry = serde_json::to_value(JsonWebKey::from(&public)).expect("JWK serialises");
    let obj = entry.as_object_mut().expect("a JWK is an object");
    obj.insert("kid".into(), json!(kid));
    obj.insert("use".into(), json!("sig"));
    obj.insert("alg".into(), json!("RS256"));
    obj.insert("x5c".into(), json!(["MIIDDTCCAfWgAwIBAgIJ"]));
    obj.insert("x5t".into(), json!("q4y1nJxJ7Ym3fHbMd2fQm1k9nqY"));
    entry
}

/// A JWKS document with these entries.
pub fn jwks(entries: Vec<Value>) -> String {
    json!({ "keys": entries }).to_string()
}

/// The key set a provider publishing only key "a" gives.
pub fn keys_a() -> KeySet {
    KeySet::from_jwks(jwks(vec![jwk(key_a(), "a")]).as_bytes()).expect("key a is usable")
}

/// The rules good tokens satisfy (default leeway).
pub fn rules() -> ClaimRules {
    ClaimRules::new(ISS, AUD)
}

/// Now, in Unix seconds.
pub fn now() -> i64 {
    Utc::now().timestamp()
}

/// Claims that pass every rule, expiring in ten minutes.
pub fn good_claims() -> Value {
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "auth0|ada",
        "email": "ada@example.com",
        "email_verified": true,
        "name": "Ada Lovelace",
        "iat": now(),
        "exp": now() + 600,
    })
}

/// [`good_claims`] with these fields replaced or added.
pub fn claims_with(changes: Value) -> Value {
    let mut claims = good_claims();
    for (k, v) in changes.as_object().expect("changes is an object") {
        claims[k] = v.clone();
    }
    claims
}

fn header(kid: Option<&str>) -> Header {
    match kid {
        Some(kid) => Header::empty().with_key_id(kid),
        None => Header::empty(),
    }
}

/// A token signed with any algorithm and key, with or without a `kid`.
pub fn sign_with<A: Algorithm>(
    alg: &A,
    key: &A::SigningKey,
    kid: Option<&str>,
    claims: Value,
) -> String {
    alg.token(&header(kid), &Claims::new(claims), key)
        .expect("test token serialises")
}

/// An RS256 token naming `kid`.
pub fn sign(key: &RsaPrivateKey, kid: &str, claims: Value) -> String {
    sign_with(&Rsa::rs256(), key, Some(kid), claims)
}
