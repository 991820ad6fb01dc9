//! Signing `x-gateway-assertion` with the runtime's WebCrypto Ed25519.
//!
//! [`gateway_shared::assertion::sign`] signs in Rust (`jwt-compact` over `ed25519-compact`).
//! Compiled to wasm32 that is slow: the field arithmetic multiplies 64-bit limbs into
//! 128-bit products, which wasm32 has no instruction for, so every product is a call to
//! compiler-rt's `__multi3`. Measured on plain workerd (`bench-edge`, docs/BENCHMARKS.md)
//! one signature took about a quarter of the edge's CPU per request. The runtime has
//! Ed25519 natively (`crypto.subtle.sign("Ed25519", …)`, BoringSSL), so the edge signs
//! there and keeps the Rust signer only as the fallback for a runtime without it.
//!
//! The token is byte for byte what `assertion::sign` makes apart from the signature
//! itself: the same header, the same claims in the same order (`exp`, `iat`, then the
//! assertion's claims with `iss`/`aud` set), base64url without padding — the unit tests
//! compare the two and verify a token made this way with the origin's verifier. Ed25519
//! signatures verify the same whichever implementation made them.

use gateway_shared::assertion::{AssertionClaims, AUDIENCE, ISSUER, LIFETIME_SECS};
use serde::Serialize;

/// base64url of `{"alg":"EdDSA","typ":"JWT"}`, the header `jwt-compact` writes.
pub const HEADER_B64: &str = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9";

/// The claims as `jwt-compact`'s `Claims` serializes them: `exp`, `iat`, then the rest.
#[derive(Serialize)]
struct Payload<'a> {
    exp: i64,
    iat: i64,
    #[serde(flatten)]
    claims: &'a AssertionClaims,
}

/// base64url without padding.
pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWT signing input (`header.claims`) of an assertion of `claims` at `now_unix`,
/// valid for [`LIFETIME_SECS`]; `iss` and `aud` are set to the gateway's.
pub fn signing_input(mut claims: AssertionClaims, now_unix: i64) -> String {
    claims.iss = ISSUER.to_owned();
    claims.aud = AUDIENCE.to_owned();
    let payload = Payload {
        exp: now_unix + LIFETIME_SECS,
        iat: now_unix,
        claims: &claims,
    };
    // Serializing strings and integers cannot fail.
    let json = serde_json::to_vec(&payload).unwrap_or_default();
    format!("{HEADER_B64}.{}", b64url(&json))
}

/// The token: the signing input, `.`, the signature in base64url.
pub fn token(signing_input: &str, signature: &[u8]) -> String {
    format!("{signing_input}.{}", b64url(signature))
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use super::*;
    use crate::caller::Caller;
    use gateway_shared::assertion::{AssertionError, SecretKey};
    use std::cell::RefCell;
    use worker::js_sys::{Array, Object, Promise, Reflect, Uint8Array};
    use worker::wasm_bindgen::prelude::*;
    use worker::wasm_bindgen_futures::JsFuture;

    #[wasm_bindgen]
    extern "C" {
        #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = importKey, catch)]
        fn import_key(
            format: &str,
            key: &Object,
            algorithm: &str,
            extractable: bool,
            usages: &Array,
        ) -> Result<Promise, JsValue>;

        #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = sign, catch)]
        fn subtle_sign(algorithm: &JsValue, key: &JsValue, data: &[u8])
            -> Result<Promise, JsValue>;
    }

    enum KeyState {
        /// Not imported yet.
        Unknown,
        /// The signing key as a WebCrypto `CryptoKey` (not extractable).
        Ready(JsValue),
        /// The runtime refused it: sign in Rust from now on.
        Unsupported,
    }

    thread_local! {
        // The key is fixed for the life of an isolate (a secret), so it is imported once.
        static KEY: RefCell<KeyState> = const { RefCell::new(KeyState::Unknown) };
        // The algorithm's name as a JS string, made once: a `&str` would be copied across
        // (and decoded by the runtime) on every signature.
        static ED25519: JsValue = JsValue::from_str("Ed25519");
    }

    fn fail(what: &str, e: JsValue) -> Option<JsValue> {
        worker::console_warn!(
            "WebCrypto Ed25519 {what} failed ({e:?}): assertions are signed in Rust instead"
        );
        KEY.with(|k| *k.borrow_mut() = KeyState::Unsupported);
        None
    }

    /// The isolate's WebCrypto signing key, imported on first use; `None` if the runtime
    /// has no Ed25519 (then never asked again).
    async fn webcrypto_key(key: &SecretKey) -> Option<JsValue> {
        let known = KEY.with(|k| match &*k.borrow() {
            KeyState::Ready(k) => Some(Some(k.clone())),
            KeyState::Unsupported => Some(None),
            KeyState::Unknown => None,
        });
        if let Some(known) = known {
            return known;
        }
        let jwk = Object::new();
        let set = |name: &str, value: &str| {
            Reflect::set(&jwk, &JsValue::from_str(name), &JsValue::from_str(value)).is_ok()
        };
        let complete = set("kty", "OKP")
            && set("crv", "Ed25519")
            && set("d", &b64url(&key.seed()[..]))
            && set("x", &b64url(&key.public_key()[..]));
        if !complete {
            return fail("key import", JsValue::from_str("JWK not built"));
        }
        let usages = Array::of1(&JsValue::from_str("sign"));
        let imported = match import_key("jwk", &jwk, "Ed25519", false, &usages) {
            Ok(p) => JsFuture::from(p).await,
            Err(e) => Err(e),
        };
        match imported {
            Ok(k) => {
                KEY.with(|s| *s.borrow_mut() = KeyState::Ready(k.clone()));
                Some(k)
            }
            Err(e) => fail("key import", e),
        }
    }

    /// The signed `x-gateway-assertion` of `caller` for request `rid` at `now_unix`:
    /// WebCrypto Ed25519 when the runtime has it, else [`Caller::assertion`] (Rust).
    pub async fn assertion(
        caller: &Caller,
        rid: &str,
        key: &SecretKey,
        now_unix: i64,
    ) -> Result<String, AssertionError> {
        if let Some(crypto_key) = webcrypto_key(key).await {
            let input = signing_input(caller.claims(rid), now_unix);
            let signed = match ED25519.with(|alg| subtle_sign(alg, &crypto_key, input.as_bytes())) {
                Ok(p) => JsFuture::from(p).await,
                Err(e) => Err(e),
            };
            match signed {
                Ok(sig) => return Ok(token(&input, &Uint8Array::new(&sig).to_vec())),
                Err(e) => {
                    fail("sign", e);
                }
            }
        }
        caller.assertion(rid, key, now_unix)
    }

    /// An assertion ready to go out with a forwarded request.
    pub enum Signing {
        /// To be signed by WebCrypto as the request leaves (`crate::boundary::fetch_origin`
        /// signs `input` with `key` and appends `.` and the signature, base64url): the
        /// signature never crosses into wasm and back, and costs no promise of its own.
        WebCrypto {
            /// The isolate's `CryptoKey`.
            key: JsValue,
            /// The JWT signing input (`header.claims`).
            input: String,
        },
        /// Signed already (the Rust signer: a runtime without Ed25519).
        Signed(String),
    }

    /// The assertion of `caller` for request `rid` at `now_unix`, to be signed on the way
    /// out when the runtime has Ed25519 (its key imported once per isolate), else signed
    /// here in Rust.
    pub async fn prepare(
        caller: &Caller,
        rid: &str,
        key: &SecretKey,
        now_unix: i64,
    ) -> Result<Signing, AssertionError> {
        match webcrypto_key(key).await {
            Some(key) => Ok(Signing::WebCrypto {
                key,
                input: signing_input(caller.claims(rid), now_unix),
            }),
            None => caller.assertion(rid, key, now_unix).map(Signing::Signed),
        }
    }

    /// The runtime refused to sign with the imported key: from now on this isolate signs
    /// in Rust (logged once).
    pub fn sign_failed(e: &str) {
        fail("sign", JsValue::from_str(e));
    }
}

#[cfg(target_arch = "wasm32")]
pub use glue::{assertion, prepare, sign_failed, Signing};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::fixtures::key;
    use crate::caller::Caller;
    use gateway_shared::assertion::verify;

    fn user() -> Caller {
        crate::caller::fixtures::user(&["user", "admin"])
    }

    #[test]
    fn the_header_is_jwt_compacts() {
        use base64::Engine;
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(HEADER_B64)
            .unwrap();
        assert_eq!(h, br#"{"alg":"EdDSA","typ":"JWT"}"#);
    }

    #[test]
    fn the_signing_input_is_byte_for_byte_what_the_shared_signer_signs() {
        let k = key();
        for caller in [user(), Caller::Anonymous] {
            let reference = caller.assertion("rid-1", &k, 1_000).unwrap();
            let (reference_input, _) = reference.rsplit_once('.').unwrap();
            assert_eq!(
                signing_input(caller.claims("rid-1"), 1_000),
                reference_input
            );
        }
    }

    #[test]
    fn a_token_signed_over_the_input_verifies_at_the_origin() {
        let k = key();
        let input = signing_input(user().claims("rid-2"), 1_000);
        // Any Ed25519 implementation gives a signature that verifies; this one is Rust's.
        let sig = k.sign(input.as_bytes(), None);
        let t = token(&input, sig.as_ref());
        let c = verify(&t, &k.public_key(), 1_000 + LIFETIME_SECS - 1, 0).unwrap();
        assert_eq!(c.sub, "612345678901234567");
        assert_eq!(c.rid, "rid-2");
        assert_eq!(c.iss, ISSUER);
        assert_eq!(c.aud, AUDIENCE);
        assert_eq!(c.roles, ["user", "admin"]);
        let mut forged = t.clone();
        forged.replace_range(t.len() - 4.., "AAAA");
        assert!(verify(&forged, &k.public_key(), 1_000, 0).is_err());
        assert!(verify(&t, &k.public_key(), 1_000 + LIFETIME_SECS + 1, 0).is_err());
    }
}
