//! The pure check of an Auth0 (OIDC) ID token: signature and claims, over a given key set
//! and claim rules, with no I/O.
//!
//! `POST /api/auth/login` hands us whatever a client sends; nothing in it is trusted until
//! [`verify`] says so (PROTOCOL.md §1, ARCHITECTURE.md "Security model"). Where the keys come
//! from (fetching, caching and rotating the provider's JWKS) is [`super::jwks`]'s job; this
//! file only decides, from a [`KeySet`], [`ClaimRules`] and `now`, whether a token holds.
//!
//! # What is checked, in this order
//!
//! 1. **Size**: a token over [`MAX_TOKEN_BYTES`] is refused unparsed, so a hostile client cannot
//!    make us base64-decode and JSON-parse megabytes.
//! 2. **Shape**: three base64url parts with a JSON header (jwt-compact's `UntrustedToken`).
//! 3. **Algorithm pinning**: `alg` must be exactly `RS256`, checked *before* any key is looked up.
//!    The algorithm is never taken from the token to choose how to verify it. That rules out
//!    `alg: none`, and the classic HS/RS confusion: an attacker who knows our RSA *public* key
//!    (it is published in the JWKS) signs a token with HS256 using the key's PEM/DER bytes as the
//!    HMAC secret; a verifier that lets the header pick the algorithm "verifies" it with the same
//!    public bytes. Here any `alg` other than `RS256` (HS*, RS384/512, PS*, ES*, …) is
//!    [`IdTokenError::UnsupportedAlgorithm`]. `typ` is ignored.
//! 4. **Key selection**: the header must name a `kid`; the key comes only from the [`KeySet`]
//!    (never from `jku`/`x5u`/`jwk` header fields). [`KeySet::from_jwks`] keeps only keys with
//!    `kty: RSA`, `use` absent or `sig`, `alg` absent or `RS256`, and a modulus of at least
//!    2048 bits.
//! 5. **Signature**: RSASSA-PKCS1-v1_5 with SHA-256 over the raw `header.payload` bytes. The claims
//!    are not even parsed until the signature holds (jwt-compact's `Validator` parses them first;
//!    we verify by hand so unauthenticated JSON is never interpreted).
//! 6. **Claims** ([`ClaimRules`]): `iss` equals the configured issuer exactly; `aud` (string or
//!    array) contains the configured audience, and `azp`, when present, equals it (OIDC Core
//!    3.1.3.7); `exp` is required and not past (with leeway); `nbf`, if present, not in the future
//!    (with leeway); `iat` is parsed but not judged; `sub` is required.
//!
//! Steps 1–4 up to the `kid` are [`ParsedIdToken::parse`], so a caller that must *find* the key
//! (possibly fetching it) only does so for a token that got that far. Tokens are never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use jwt_compact::alg::{Rsa, RsaPublicKey, RsaSignature};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmSignature, Claims, UntrustedToken};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Deserializer, Serialize};

/// Largest ID token accepted, in bytes; larger ones are refused without being parsed.
///
/// Auth0 ID tokens are 1–2 KiB; 16 KiB leaves room for generous custom claims.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Default allowed clock skew for `exp` / `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Default longest time since `iat` an ID token may be exchanged for a session: a leaked ID
/// token must not mint sessions for the hours until its `exp`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);

/// The only accepted `alg`.
const PINNED_ALG: &str = "RS256";

/// Smallest RSA modulus accepted from the JWKS (RFC 7518 §3.3).
const MIN_RSA_BITS: usize = 2048;

/// What the claims of a correctly signed ID token must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRules {
    /// The exact `iss` required (Auth0: `https://{domain}/`, trailing slash included).
    pub issuer: String,
    /// The value `aud` must contain (and `azp`, when present, must equal): the Auth0
    /// application's client id.
    pub audience: String,
    /// Clock skew tolerated when checking `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The longest time since `iat` a token is accepted (a token without `iat` is then
    /// refused); `None`: no limit beyond `exp`.
    pub max_age: Option<Duration>,
    /// Accept a token whose `email_verified` is `false` (a missing claim is always accepted:
    /// not every connection has e-mail).
    pub allow_unverified_email: bool,
}

impl ClaimRules {
    /// Rules with the default leeway ([`DEFAULT_LEEWAY`]) and maximum age
    /// ([`DEFAULT_MAX_AGE`]), refusing unverified e-mail.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY,
            max_age: Some(DEFAULT_MAX_AGE),
            allow_unverified_email: false,
        }
    }
}

/// The provider's usable RS256 signing keys, by `kid`.
///
/// Cheap to clone (the keys are shared); the only way keys get in is [`Self::from_jwks`], so
/// every key in a set has passed the usability rules in the module docs.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Arc<RsaPublicKey>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .finish_non_exhaustive()
    }
}

/// The JWKS document: only `keys` matters; each key is judged on its own.
#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Reads a JWKS document, keeping the keys usable for RS256 signatures.
    ///
    /// Unusable entries (EC keys, `enc` keys, other algorithms, weak moduli, no `kid`) are
    /// skipped, not fatal: a provider may publish them alongside the signing key. A set with
    /// no usable key at all is an error; the `Err` is operator-facing text.
    pub fn from_jwks(body: &[u8]) -> Result<Self, String> {
        let doc: JwksDocument = serde_json::from_slice(body)
            .map_err(|err| format!("not a JWKS document (JSON with a `keys` array): {err}"))?;
        let mut keys = HashMap::new();
        for entry in &doc.keys {
            let field = |name: &str| entry.get(name).and_then(serde_json::Value::as_str);
            let Some(kid) = field("kid").filter(|kid| !kid.is_empty()) else {
                tracing::debug!("JWKS entry without kid skipped");
                continue;
            };
            let kid_shown = sanitize(kid, 64);
            let usable = field("kty") == Some("RSA")
                && entry.get("use").is_none_or(|u| u.as_str() == Some("sig"))
                && entry
                    .get("alg")
                    .is_none_or(|a| a.as_str() == Some(PINNED_ALG));
            if !usable {
                tracing::debug!(kid = %kid_shown, "JWKS entry is not an RS256 signing key; skipped");
                continue;
            }
            let key = match serde_json::from_value::<JsonWebKey<'static>>(entry.clone())
                .map_err(|err| err.to_string())
                .and_then(|jwk| RsaPublicKey::try_from(&jwk).map_err(|err| err.to_string()))
            {
                Ok(key) => key,
                Err(why) => {
                    tracing::warn!(kid = %kid_shown, %why, "JWKS RSA key unreadable; skipped");
                    continue;
                }
            };
            if key.n().bits() < MIN_RSA_BITS {
                tracing::warn!(kid = %kid_shown, bits = key.n().bits(), "JWKS RSA key too weak; skipped");
                continue;
            }
            if keys.contains_key(kid) {
                tracing::warn!(kid = %kid_shown, "duplicate kid in JWKS; first one kept");
                continue;
            }
            keys.insert(kid.to_owned(), Arc::new(key));
        }
        if keys.is_empty() {
            return Err(format!(
                "JWKS has no usable key ({} entries; need kty RSA, use sig, alg RS256 or none, \
                 a kid, ≥ {MIN_RSA_BITS} bits)",
                doc.keys.len()
            ));
        }
        Ok(Self { keys })
    }

    /// Whether the set holds a key with this `kid`.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The key ids held, sorted (for logs).
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

/// The identity an ID token vouches for, available only once every check has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdClaims {
    /// The provider's stable user id (`auth0|…`, `google-oauth2|…`): the one to key users on.
    pub sub: String,
    /// The user's e-mail, if the token carries one; see `email_verified` before trusting it.
    #[serde(default)]
    pub email: Option<String>,
    /// Whether the provider verified `email`.
    #[serde(default)]
    pub email_verified: Option<bool>,
    /// Full display name, if present.
    #[serde(default)]
    pub name: Option<String>,
    /// Auth0's short name, a fallback when `name` is absent.
    #[serde(default)]
    pub nickname: Option<String>,
    /// The issuer; always equal to [`ClaimRules::issuer`].
    pub iss: String,
    /// Every audience of the token (a single-string `aud` becomes a one-element list).
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// When the ID token expires; a session may outlive it (NoETL decides session life).
    pub expires_at: DateTime<Utc>,
    /// When the token was issued, if it says.
    #[serde(default)]
    pub issued_at: Option<DateTime<Utc>>,
}

/// Why an ID token was refused. Each maps to one stable machine code via [`Self::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    /// Not a JWT we can read: too large, bad base64/JSON, or a required claim is missing or of
    /// the wrong type.
    #[error("the ID token is not a well-formed JWT")]
    Malformed,
    /// The header names an algorithm other than RS256 (shown sanitised and truncated).
    #[error("ID token algorithm `{0}` is not accepted; only RS256 is")]
    UnsupportedAlgorithm(String),
    /// No `kid` in the header, or no usable key with that id in the provider's JWKS.
    #[error("the ID token is not signed by a known key of the identity provider")]
    UnknownKey,
    /// The RS256 signature does not match the key.
    #[error("the ID token signature is invalid")]
    BadSignature,
    /// `iss` is missing or not the configured issuer.
    #[error("the ID token was issued by an unexpected issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience (or `azp` names someone else).
    #[error("the ID token is not meant for this application")]
    WrongAudience,
    /// `exp` is in the past, beyond the leeway.
    #[error("the ID token has expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("the ID token is not valid yet")]
    NotYetValid,
    /// `iat` is older than [`ClaimRules::max_age`] (or absent while a maximum age is set).
    #[error("the ID token was issued too long ago; sign in again")]
    TooOld,
    /// `email_verified` is `false` and unverified e-mail is not allowed.
    #[error("the identity provider has not verified this e-mail address")]
    EmailNotVerified,
    /// The provider's key set could not be fetched ([`super::jwks`]); the message says what an
    /// operator should look at (URL, status, cause). Never contains a token. The pure
    /// [`verify`] never returns it.
    #[error("the identity provider's signing keys are unavailable: {0}")]
    JwksUnavailable(String),
}

impl IdTokenError {
    /// The stable `snake_case` code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed => "id_token_malformed",
            Self::UnsupportedAlgorithm(_) => "id_token_unsupported_algorithm",
            Self::UnknownKey => "id_token_unknown_key",
            Self::BadSignature => "id_token_bad_signature",
            Self::WrongIssuer => "id_token_wrong_issuer",
            Self::WrongAudience => "id_token_wrong_audience",
            Self::Expired => "id_token_expired",
            Self::NotYetValid => "id_token_not_yet_valid",
            Self::TooOld => "id_token_too_old",
            Self::EmailNotVerified => "id_token_email_not_verified",
            Self::JwksUnavailable(_) => "id_token_jwks_unavailable",
        }
    }

    /// `true` when the token itself is at fault (→ 401); `false` only for
    /// [`Self::JwksUnavailable`], which is our side's problem (→ 503, retry later).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::JwksUnavailable(_))
    }
}

/// Checks `token` completely (see the module docs) against `keys` and `rules` at time `now`,
/// and returns who it vouches for.
pub fn verify(
    token: &str,
    keys: &KeySet,
    rules: &ClaimRules,
    now: DateTime<Utc>,
) -> Result<IdClaims, IdTokenError> {
    ParsedIdToken::parse(token)?.verify(keys, rules, now)
}

/// A token that passed the checks that need no key (size, shape, `alg`, a `kid`), and nothing
/// more: its claims are still unauthenticated and unread.
pub struct ParsedIdToken<'a> {
    token: &'a str,
    untrusted: UntrustedToken<'a>,
}

impl<'a> ParsedIdToken<'a> {
    /// Steps 1–4 of the module docs up to naming a `kid`; no key is looked up.
    pub fn parse(token: &'a str) -> Result<Self, IdTokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(IdTokenError::Malformed);
        }
        let untrusted = UntrustedToken::new(token).map_err(|_| IdTokenError::Malformed)?;
        if untrusted.algorithm() != PINNED_ALG {
            return Err(IdTokenError::UnsupportedAlgorithm(sanitize(
                untrusted.algorithm(),
                32,
            )));
        }
        match untrusted.header().key_id.as_deref() {
            Some(kid) if !kid.is_empty() => {}
            _ => return Err(IdTokenError::UnknownKey),
        }
        Ok(Self { token, untrusted })
    }

    /// The `kid` the header names (non-empty, attacker-chosen: `sanitize` before logging).
    pub fn kid(&self) -> &str {
        self.untrusted
            .header()
            .key_id
            .as_deref()
            .unwrap_or_default()
    }

    /// Steps 4–6: the key named by [`Self::kid`] from `keys`, the signature, then the claims.
    pub fn verify(
        &self,
        keys: &KeySet,
        rules: &ClaimRules,
        now: DateTime<Utc>,
    ) -> Result<IdClaims, IdTokenError> {
        let kid = self.kid();
        let key = keys.keys.get(kid).ok_or(IdTokenError::UnknownKey)?;

        // The signing input is the token up to its last dot, exactly the bytes jwt-compact
        // would verify; `UntrustedToken::new` already proved there are three parts.
        let (signing_input, _) = self.token.rsplit_once('.').ok_or(IdTokenError::Malformed)?;
        let signature = RsaSignature::try_from_slice(self.untrusted.signature_bytes())
            .map_err(|_| IdTokenError::BadSignature)?;
        if !Rsa::rs256().verify_signature(&signature, key, signing_input.as_bytes()) {
            tracing::debug!(kid = %sanitize(kid, 64), "ID token signature mismatch");
            return Err(IdTokenError::BadSignature);
        }

        let claims = self
            .untrusted
            .deserialize_claims_unchecked::<RawIdClaims>()
            .map_err(|_| IdTokenError::Malformed)?;
        check_claims(claims, rules, now)
    }
}

/// The claims as they appear in the token, before the policy in [`check_claims`] is applied.
/// Duplicate keys are a parse error (serde derive), so no parser-differential games.
#[derive(Debug, Deserialize)]
struct RawIdClaims {
    sub: String,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default, deserialize_with = "opt_one_or_many")]
    aud: Option<Vec<String>>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    nickname: Option<String>,
}

/// The claim policy: a pure function of authenticated claims, the rules and `now`.
///
/// Time arithmetic is checked: jwt-compact's `validate_maturity` computes `nbf - leeway`
/// with a panicking subtraction, which an extreme `nbf` would trip.
fn check_claims(
    claims: Claims<RawIdClaims>,
    rules: &ClaimRules,
    now: DateTime<Utc>,
) -> Result<IdClaims, IdTokenError> {
    let raw = claims.custom;
    let iss = raw.iss.ok_or(IdTokenError::WrongIssuer)?;
    if iss != rules.issuer {
        return Err(IdTokenError::WrongIssuer);
    }
    let aud = raw.aud.ok_or(IdTokenError::WrongAudience)?;
    if !aud.contains(&rules.audience) {
        return Err(IdTokenError::WrongAudience);
    }
    if raw.azp.as_ref().is_some_and(|azp| *azp != rules.audience) {
        return Err(IdTokenError::WrongAudience);
    }

    let leeway = TimeDelta::from_std(rules.leeway).unwrap_or(TimeDelta::MAX);
    let expires_at = claims.expiration.ok_or(IdTokenError::Malformed)?;
    let latest = expires_at
        .checked_add_signed(leeway)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if now > latest {
        return Err(IdTokenError::Expired);
    }
    if let Some(not_before) = claims.not_before {
        let earliest = not_before
            .checked_sub_signed(leeway)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        if now < earliest {
            return Err(IdTokenError::NotYetValid);
        }
    }
    if let Some(max_age) = rules.max_age {
        let issued_at = claims.issued_at.ok_or(IdTokenError::TooOld)?;
        let max_age = TimeDelta::from_std(max_age).unwrap_or(TimeDelta::MAX);
        let oldest = now
            .checked_sub_signed(max_age)
            .and_then(|t| t.checked_sub_signed(leeway))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        if issued_at < oldest {
            return Err(IdTokenError::TooOld);
        }
    }
    if raw.email_verified == Some(false) && !rules.allow_unverified_email {
        return Err(IdTokenError::EmailNotVerified);
    }

    Ok(IdClaims {
        sub: raw.sub,
        email: raw.email,
        email_verified: raw.email_verified,
        name: raw.name,
        nickname: raw.nickname,
        iss,
        aud,
        expires_at,
        issued_at: claims.issued_at,
    })
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for Vec<String> {
    fn from(value: OneOrMany) -> Self {
        match value {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    OneOrMany::deserialize(d).map(Into::into)
}

fn opt_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Option::<OneOrMany>::deserialize(d).map(|v| v.map(Into::into))
}

/// Attacker-chosen text made safe for logs and error messages: printable ASCII, bounded.
pub(crate) fn sanitize(s: &str, max_chars: usize) -> String {
    s.chars()
        .take(max_chars)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use jwt_compact::alg::{Hs256, Hs256Key};
    use jwt_compact::Renamed;
    use proptest::prelude::*;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use serde_json::{json, Value};

    use crate::auth::test_tokens::*;

    /// The pure verify with key "a", the good rules, now.
    fn check(token: &str) -> Result<IdClaims, IdTokenError> {
        verify(token, &keys_a(), &rules(), Utc::now())
    }

    #[test]
    fn a_good_token_verifies_and_yields_sub_email_and_name() {
        let claims = check(&sign(key_a(), "a", good_claims())).expect("a good token verifies");
        assert_eq!(claims.sub, "auth0|ada");
        assert_eq!(claims.email.as_deref(), Some("ada@example.com"));
        assert_eq!(claims.email_verified, Some(true));
        assert_eq!(claims.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(claims.iss, ISS);
        assert_eq!(claims.aud, vec![AUD.to_owned()]);
        assert!(claims.expires_at > Utc::now());
    }

    #[test]
    fn an_audience_array_containing_ours_is_accepted() {
        let token = sign(key_a(), "a", claims_with(json!({"aud": ["other", AUD]})));
        let claims = check(&token).expect("aud array accepted");
        assert_eq!(claims.aud, vec!["other".to_owned(), AUD.to_owned()]);
    }

    #[test]
    fn alg_none_is_refused_before_any_key_lookup() {
        for name in ["none", "None", "NONE", ""] {
            let signed = sign_with(
                &Renamed::new(Hs256, name),
                &Hs256Key::new(b"irrelevant"),
                Some("a"),
                good_claims(),
            );
            // Strip the signature: `header.payload.`
            let (unsigned, _) = signed.rsplit_once('.').expect("three parts");
            let token = format!("{unsigned}.");
            assert_eq!(
                check(&token),
                Err(IdTokenError::UnsupportedAlgorithm(name.to_owned())),
                "alg {name:?}"
            );
            // No key is needed to refuse it: an empty key set gives the same answer.
            assert_eq!(
                ParsedIdToken::parse(&token).err(),
                Some(IdTokenError::UnsupportedAlgorithm(name.to_owned()))
            );
        }
    }

    #[test]
    fn hs256_signed_with_the_public_key_bytes_is_refused() {
        let public = key_a().to_public_key();
        let pem = public
            .to_public_key_pem(LineEnding::LF)
            .expect("PEM encoding");
        let der = public.to_public_key_der().expect("DER encoding");
        let jwk_text = jwk(key_a(), "a").to_string();
        for secret in [pem.as_bytes(), der.as_bytes(), jwk_text.as_bytes()] {
            let token = sign_with(&Hs256, &Hs256Key::new(secret), Some("a"), good_claims());
            let err = check(&token).expect_err("HS256 refused");
            assert_eq!(err, IdTokenError::UnsupportedAlgorithm("HS256".into()));
            assert_eq!(err.code(), "id_token_unsupported_algorithm");
            assert!(err.is_client_error());
            assert_eq!(
                ParsedIdToken::parse(&token).err(),
                Some(err),
                "refused before any key lookup"
            );
        }
    }

    #[test]
    fn other_rsa_and_ec_algorithms_are_refused() {
        let rs384 = sign_with(&Rsa::rs384(), key_a(), Some("a"), good_claims());
        let rs512 = sign_with(&Rsa::rs512(), key_a(), Some("a"), good_claims());
        let ps256 = sign_with(&Rsa::ps256(), key_a(), Some("a"), good_claims());
        let es256 = sign_with(
            &Renamed::new(Hs256, "ES256"),
            &Hs256Key::new(b"x"),
            Some("a"),
            good_claims(),
        );
        for (token, alg) in [
            (rs384, "RS384"),
            (rs512, "RS512"),
            (ps256, "PS256"),
            (es256, "ES256"),
        ] {
            assert_eq!(
                check(&token),
                Err(IdTokenError::UnsupportedAlgorithm(alg.into()))
            );
        }
    }

    #[test]
    fn a_hostile_alg_name_is_sanitised_and_truncated_in_the_error() {
        let alg: &'static str = "RS256\n\u{1b}[31m-and-a-very-long-tail-that-goes-on-and-on";
        let token = sign_with(
            &Renamed::new(Hs256, alg),
            &Hs256Key::new(b"x"),
            Some("a"),
            good_claims(),
        );
        let Err(IdTokenError::UnsupportedAlgorithm(shown)) = check(&token) else {
            panic!("expected UnsupportedAlgorithm");
        };
        assert_eq!(shown.chars().count(), 32);
        assert!(shown.chars().all(|c| c.is_ascii_graphic()), "{shown:?}");
    }

    #[test]
    fn a_token_without_kid_is_an_unknown_key() {
        let token = sign_with(&Rsa::rs256(), key_a(), None, good_claims());
        assert_eq!(check(&token), Err(IdTokenError::UnknownKey));
        assert_eq!(
            ParsedIdToken::parse(&token).err(),
            Some(IdTokenError::UnknownKey),
            "refused before any key lookup"
        );
    }

    #[test]
    fn a_kid_absent_from_the_key_set_is_an_unknown_key() {
        let token = sign(key_a(), "b", good_claims());
        assert_eq!(check(&token), Err(IdTokenError::UnknownKey));
        assert_eq!(
            verify(
                &sign(key_a(), "a", good_claims()),
                &KeySet::default(),
                &rules(),
                Utc::now()
            ),
            Err(IdTokenError::UnknownKey)
        );
    }

    #[test]
    fn a_wrong_issuer_is_refused() {
        for iss in [
            json!("https://evil.example.com/"),
            json!("https://tenant.example.auth0.com"),
        ] {
            let token = sign(key_a(), "a", claims_with(json!({ "iss": iss })));
            assert_eq!(check(&token), Err(IdTokenError::WrongIssuer));
        }
        let mut no_iss = good_claims();
        no_iss.as_object_mut().expect("object").remove("iss");
        let token = sign(key_a(), "a", no_iss);
        assert_eq!(check(&token), Err(IdTokenError::WrongIssuer));
    }

    #[test]
    fn a_wrong_audience_is_refused() {
        for changes in [
            json!({"aud": "someone-else"}),
            json!({"aud": ["someone-else", "and-another"]}),
            json!({"aud": []}),
            json!({"aud": [AUD, "other"], "azp": "other"}),
        ] {
            let token = sign(key_a(), "a", claims_with(changes.clone()));
            let err = check(&token).expect_err("wrong aud");
            assert_eq!(err, IdTokenError::WrongAudience, "{changes}");
            assert_eq!(err.code(), "id_token_wrong_audience");
        }
    }

    #[test]
    fn an_expired_token_is_refused() {
        let token = sign(key_a(), "a", claims_with(json!({"exp": now() - 120})));
        let err = check(&token).expect_err("expired");
        assert_eq!(err, IdTokenError::Expired);
        assert_eq!(err.code(), "id_token_expired");
        assert!(err.is_client_error());
    }

    #[test]
    fn a_token_without_exp_is_malformed() {
        let mut claims = good_claims();
        claims.as_object_mut().expect("object").remove("exp");
        let token = sign(key_a(), "a", claims);
        assert_eq!(check(&token), Err(IdTokenError::Malformed));
    }

    #[test]
    fn a_token_issued_longer_ago_than_the_max_age_is_refused() {
        // Still unexpired (exp in 10 min), but issued 11 minutes ago: a leaked token.
        let old = sign(key_a(), "a", claims_with(json!({"iat": now() - 660})));
        let err = check(&old).expect_err("too old");
        assert_eq!(err, IdTokenError::TooOld);
        assert_eq!(err.code(), "id_token_too_old");
        assert!(err.is_client_error());
        // Within the age (plus leeway) it is fine.
        check(&sign(
            key_a(),
            "a",
            claims_with(json!({"iat": now() - 590})),
        ))
        .expect("issued within the max age");
        // With a maximum age set, a token that does not say when it was issued is refused.
        let mut no_iat = good_claims();
        no_iat.as_object_mut().expect("object").remove("iat");
        assert_eq!(
            check(&sign(key_a(), "a", no_iat.clone())),
            Err(IdTokenError::TooOld)
        );
        // No maximum age: only exp limits it.
        let rules = ClaimRules {
            max_age: None,
            ..rules()
        };
        verify(&old, &keys_a(), &rules, Utc::now()).expect("no age limit");
        verify(&sign(key_a(), "a", no_iat), &keys_a(), &rules, Utc::now())
            .expect("no iat needed without an age limit");
    }

    #[test]
    fn an_unverified_email_is_refused_unless_allowed() {
        let unverified = sign(key_a(), "a", claims_with(json!({"email_verified": false})));
        let err = check(&unverified).expect_err("unverified");
        assert_eq!(err, IdTokenError::EmailNotVerified);
        assert_eq!(err.code(), "id_token_email_not_verified");
        let rules = ClaimRules {
            allow_unverified_email: true,
            ..rules()
        };
        let claims = verify(&unverified, &keys_a(), &rules, Utc::now()).expect("allowed");
        assert_eq!(claims.email_verified, Some(false));
        // A token without the claim (a connection without e-mail) is not refused for it.
        let mut no_claim = good_claims();
        no_claim
            .as_object_mut()
            .expect("object")
            .remove("email_verified");
        check(&sign(key_a(), "a", no_claim)).expect("no email_verified claim");
    }

    #[test]
    fn a_token_with_nbf_in_the_future_is_not_yet_valid() {
        let token = sign(key_a(), "a", claims_with(json!({"nbf": now() + 120})));
        assert_eq!(check(&token), Err(IdTokenError::NotYetValid));
        let within_leeway = sign(key_a(), "a", claims_with(json!({"nbf": now() + 10})));
        check(&within_leeway).expect("nbf within the leeway is fine");
    }

    #[test]
    fn a_tampered_payload_is_a_bad_signature() {
        let honest = sign(key_a(), "a", good_claims());
        let forged = sign(key_a(), "a", claims_with(json!({"sub": "auth0|mallory"})));
        let honest_parts: Vec<&str> = honest.split('.').collect();
        let forged_parts: Vec<&str> = forged.split('.').collect();
        // Honest header and signature around the attacker's payload.
        let spliced = format!(
            "{}.{}.{}",
            honest_parts[0], forged_parts[1], honest_parts[2]
        );
        assert_eq!(check(&spliced), Err(IdTokenError::BadSignature));
        // Even a payload that is not JSON is a signature failure, not a parse of unsigned data.
        let junk = format!("{}.{}.{}", honest_parts[0], "bm90LWpzb24", honest_parts[2]);
        assert_eq!(check(&junk), Err(IdTokenError::BadSignature));
    }

    #[test]
    fn a_token_signed_by_another_key_with_our_kid_is_a_bad_signature() {
        let token = sign(key_b(), "a", good_claims());
        assert_eq!(check(&token), Err(IdTokenError::BadSignature));
    }

    #[test]
    fn only_rsa_signing_keys_of_sufficient_size_are_taken_from_the_jwks() {
        let mut enc = jwk(key_b(), "enc");
        enc["use"] = json!("enc");
        let mut rs512 = jwk(key_b(), "rs512");
        rs512["alg"] = json!("RS512");
        let ec = json!({"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AAAA", "y": "AAAA"});
        let oct = json!({"kty": "oct", "kid": "oct", "k": "c2VjcmV0"});
        let weak = jwk(weak_key(), "weak");
        let mut bare = jwk(key_b(), "bare");
        let bare_obj = bare.as_object_mut().expect("object");
        bare_obj.remove("use");
        bare_obj.remove("alg");
        let keys = KeySet::from_jwks(
            jwks(vec![enc, rs512, ec, oct, weak, bare, jwk(key_a(), "a")]).as_bytes(),
        )
        .expect("the set has usable keys");
        assert_eq!(keys.kids(), vec!["a", "bare"]);
        let check = |token: &str| verify(token, &keys, &rules(), Utc::now());

        check(&sign(key_a(), "a", good_claims())).expect("the proper signing key verifies");
        check(&sign(key_b(), "bare", good_claims())).expect("use/alg may be absent");
        for (key, kid) in [(key_b(), "enc"), (key_b(), "rs512"), (weak_key(), "weak")] {
            assert_eq!(
                check(&sign(key, kid, good_claims())),
                Err(IdTokenError::UnknownKey),
                "kid {kid}"
            );
        }
        let oct_token = sign_with(
            &Hs256,
            &Hs256Key::new(b"secret"),
            Some("oct"),
            good_claims(),
        );
        assert_eq!(
            check(&oct_token),
            Err(IdTokenError::UnsupportedAlgorithm("HS256".into()))
        );
    }

    #[test]
    fn a_jwks_without_usable_keys_or_not_json_is_refused_with_a_reason() {
        let err = KeySet::from_jwks(b"<html>not json</html>").expect_err("not JSON");
        assert!(err.contains("not a JWKS document"), "{err}");
        let err = KeySet::from_jwks(jwks(vec![jwk(weak_key(), "weak")]).as_bytes())
            .expect_err("only a weak key");
        assert!(err.contains("no usable key"), "{err}");
    }

    #[test]
    fn an_oversize_token_is_malformed_without_parsing() {
        let big = sign(
            key_a(),
            "a",
            claims_with(json!({"pad": "x".repeat(MAX_TOKEN_BYTES)})),
        );
        assert!(big.len() > MAX_TOKEN_BYTES);
        assert_eq!(check(&big), Err(IdTokenError::Malformed));
        assert_eq!(
            ParsedIdToken::parse(&big).err(),
            Some(IdTokenError::Malformed)
        );
    }

    #[test]
    fn structurally_broken_tokens_are_malformed() {
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.???.***",
            "e30.e30.",
            "eyJhbGciOiJSUzI1NiJ9",
        ] {
            assert_eq!(check(token), Err(IdTokenError::Malformed), "{token:?}");
            assert_eq!(
                ParsedIdToken::parse(token).err(),
                Some(IdTokenError::Malformed),
                "{token:?}"
            );
        }
    }

    #[test]
    fn every_error_has_a_distinct_snake_case_code_and_only_jwks_is_server_side() {
        let all = [
            IdTokenError::Malformed,
            IdTokenError::UnsupportedAlgorithm("HS256".into()),
            IdTokenError::UnknownKey,
            IdTokenError::BadSignature,
            IdTokenError::WrongIssuer,
            IdTokenError::WrongAudience,
            IdTokenError::Expired,
            IdTokenError::NotYetValid,
            IdTokenError::JwksUnavailable("x".into()),
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(IdTokenError::code).collect();
        assert_eq!(codes.len(), all.len());
        assert!(codes
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        let server_side: Vec<_> = all.iter().filter(|e| !e.is_client_error()).collect();
        assert_eq!(
            server_side,
            vec![&IdTokenError::JwksUnavailable("x".into())]
        );
    }

    fn raw(value: Value) -> Claims<RawIdClaims> {
        serde_json::from_value(value).expect("test claims parse")
    }

    #[test]
    fn claim_times_honour_the_leeway_at_the_edges() {
        let rules = rules();
        let t = Utc::now();
        let at = |secs: i64| t.timestamp() + secs;
        // exp 29 s ago with 30 s leeway: fine; 31 s ago: expired.
        assert!(check_claims(raw(claims_with(json!({"exp": at(-29)}))), &rules, t).is_ok());
        assert_eq!(
            check_claims(raw(claims_with(json!({"exp": at(-31)}))), &rules, t),
            Err(IdTokenError::Expired)
        );
        assert!(check_claims(raw(claims_with(json!({"nbf": at(29)}))), &rules, t).is_ok());
        assert_eq!(
            check_claims(raw(claims_with(json!({"nbf": at(31)}))), &rules, t),
            Err(IdTokenError::NotYetValid)
        );
    }

    #[test]
    fn extreme_timestamps_and_leeways_do_not_panic() {
        let mut rules = rules();
        rules.leeway = Duration::MAX;
        let t = Utc::now();
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        for (exp, nbf) in [(max, min), (min, max), (max, max), (min, min)] {
            let _ = check_claims(raw(claims_with(json!({"exp": exp, "nbf": nbf}))), &rules, t);
        }
        rules.leeway = Duration::ZERO;
        assert_eq!(
            check_claims(raw(claims_with(json!({"exp": max, "nbf": min}))), &rules, t)
                .map(|c| c.sub),
            Ok("auth0|ada".to_owned())
        );
    }

    fn good_token() -> &'static str {
        static T: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let mut claims = good_claims();
            claims["exp"] = json!(now() + 24 * 3600);
            sign(key_a(), "a", claims)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn garbage_strings_never_panic(s in any::<String>()) {
            prop_assert!(check(&s).is_err());
        }

        #[test]
        fn jwt_shaped_garbage_never_panics(
            h in "[A-Za-z0-9_-]{0,80}",
            p in "[A-Za-z0-9_-]{0,200}",
            s in "[A-Za-z0-9_-]{0,400}",
        ) {
            let token = format!("{h}.{p}.{s}");
            prop_assert!(check(&token).is_err());
        }

        #[test]
        fn a_mutated_good_token_never_verifies_as_someone_else(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = good_token().as_bytes().to_vec();
            for (index, byte) in &edits {
                let i = index.index(bytes.len());
                bytes[i] = *byte;
            }
            let token = String::from_utf8_lossy(&bytes).into_owned();
            // Only a change the signature does not cover (a non-canonical base64 tail) may
            // still verify, and then it must say exactly what the original said.
            if let Ok(claims) = check(&token) {
                prop_assert_eq!(claims.sub, "auth0|ada");
            }
        }
    }
}
