//! The dev identity provider: what Auth0 is to the real NoETL server.
//!
//! An RSA-2048 key is made at start (OsRng); `/dev/token` signs RS256 ID tokens with it and
//! `/dev/.well-known/jwks.json` publishes the public half, so the gateway can verify tokens
//! exactly as it verifies Auth0's. The overrides (`iss`, `aud`, `ttl`, `nbf_in`, `kid`)
//! exist so the gateway's hostile-input tests can mint wrong tokens with a valid signature.
//! Login on the stand-in verifies tokens against this same key (real NoETL asks Auth0).

use chrono::{DateTime, Duration, Utc};
use jwt_compact::alg::Rsa;
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt, Claims, Header, TimeOptions, UntrustedToken};
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fmt;

/// The `kid` of the one signing key (what the JWKS lists and login expects).
pub const DEV_KID: &str = "standin-dev-1";
/// Key size: what Auth0 uses, and the smallest size gateways should accept.
pub const KEY_BITS: usize = 2048;
/// Lifetime of a dev token unless `ttl=` says otherwise.
const DEFAULT_TTL_SECS: i64 = 3600;
/// `ttl`/`nbf_in` are clamped to ±10 years so hostile values cannot overflow time maths.
const MAX_OFFSET_SECS: i64 = 10 * 365 * 86_400;

/// Makes the signing key (CPU-heavy: call it on a blocking thread).
pub fn generate_key() -> anyhow::Result<RsaPrivateKey> {
    Ok(RsaPrivateKey::new(&mut rand::rngs::OsRng, KEY_BITS)?)
}

/// Query of `GET /dev/token`: the identity plus optional deliberate defects.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct TokenRequest {
    /// `sub` claim; default derived from the email.
    pub sub: Option<String>,
    /// `email` claim; default `dev@example.com`.
    pub email: Option<String>,
    /// `name` claim; omitted by default.
    pub name: Option<String>,
    /// Override of `iss` (a wrong issuer).
    pub iss: Option<String>,
    /// Override of `aud` (a wrong audience).
    pub aud: Option<String>,
    /// Lifetime in seconds; negative → already expired.
    pub ttl: Option<i64>,
    /// `nbf` this many seconds in the future (a token not yet valid).
    pub nbf_in: Option<i64>,
    /// Override of the header `kid` (a key the JWKS does not list).
    pub kid: Option<String>,
    /// `email_verified` claim; default `true`, as Auth0 sends for a verified address.
    pub email_verified: Option<bool>,
    /// `iat` this many seconds in the past (a token issued long ago; `ttl` counts from it).
    pub iat_ago: Option<i64>,
}

/// A verified identity out of an ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `sub` claim.
    pub sub: String,
    /// The `email` claim (required: sessions are keyed by email).
    pub email: String,
    /// The `name` claim, if any.
    pub name: Option<String>,
}

/// Why an ID token was refused; the message goes back to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts, or a header that is not JSON.
    Malformed(String),
    /// `alg` other than RS256 (`none`, HS256 keyed with the public key, …).
    Algorithm(String),
    /// A `kid` the JWKS does not list.
    UnknownKey(String),
    /// Signature or claims invalid (bad signature, expired, not yet valid, …).
    Invalid(String),
    /// `iss` is not this IdP.
    Issuer(String),
    /// `aud` does not include the configured audience.
    Audience,
    /// No `email` claim.
    NoEmail,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed token: {e}"),
            Self::Algorithm(a) => write!(f, "unsupported algorithm {a:?} (RS256 required)"),
            Self::UnknownKey(k) => write!(f, "unknown signing key {k:?}"),
            Self::Invalid(e) => write!(f, "token rejected: {e}"),
            Self::Issuer(i) => write!(f, "unexpected issuer {i:?}"),
            Self::Audience => f.write_str("token audience does not include this application"),
            Self::NoEmail => f.write_str("token has no email claim"),
        }
    }
}

impl std::error::Error for TokenError {}

/// `aud` may be one string or a list (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Self::One(a) => a == wanted,
            Self::Many(list) => list.iter().any(|a| a == wanted),
        }
    }
}

/// The ID-token claims beyond `exp`/`nbf`/`iat` (which jwt-compact handles).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
}

/// The identity provider: signing key, issuer, audience and the published key forms.
pub struct DevIdp {
    key: RsaPrivateKey,
    public: RsaPublicKey,
    issuer: String,
    audience: String,
    jwks: Value,
    pem: String,
}

impl fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("DevIdp")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl DevIdp {
    /// An IdP at `<public_url>/dev/` signing with `key` for `audience`.
    pub fn new(key: RsaPrivateKey, public_url: &str, audience: &str) -> anyhow::Result<Self> {
        let public = key.to_public_key();
        let pem = public.to_public_key_pem(LineEnding::LF)?;
        let mut jwk = serde_json::to_value(JsonWebKey::from(&public))?;
        if let Some(obj) = jwk.as_object_mut() {
            obj.insert("kid".into(), DEV_KID.into());
            obj.insert("alg".into(), "RS256".into());
            obj.insert("use".into(), "sig".into());
        }
        Ok(Self {
            key,
            public,
            issuer: format!("{}/dev/", public_url.trim_end_matches('/')),
            audience: audience.to_owned(),
            jwks: json!({ "keys": [jwk] }),
            pem,
        })
    }

    /// The `iss` of every token (`<public-url>/dev/`, with the trailing slash Auth0 uses).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Where the JWKS is served.
    pub fn jwks_url(&self) -> String {
        format!("{}.well-known/jwks.json", self.issuer)
    }

    /// The audience tokens are minted for and login requires.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The JWKS document (`{"keys":[{kty,n,e,kid,alg,use}]}`).
    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    /// The public key as SPKI PEM (for tests that forge HS256 tokens keyed with it).
    pub fn public_key_pem(&self) -> &str {
        &self.pem
    }

    /// An OpenID discovery document, for clients that start from the issuer.
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url(),
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    }

    /// Mints an RS256 ID token for `req` (with its deliberate defects, if any).
    pub fn issue(&self, req: &TokenRequest) -> anyhow::Result<String> {
        self.issue_at(req, Utc::now())
    }

    fn issue_at(&self, req: &TokenRequest, now: DateTime<Utc>) -> anyhow::Result<String> {
        let email = req
            .email
            .clone()
            .unwrap_or_else(|| "dev@example.com".into());
        let custom = IdClaims {
            iss: Some(req.iss.clone().unwrap_or_else(|| self.issuer.clone())),
            aud: Some(Audience::One(
                req.aud.clone().unwrap_or_else(|| self.audience.clone()),
            )),
            sub: Some(req.sub.clone().unwrap_or_else(|| default_sub(&email))),
            email: Some(email),
            name: req.name.clone(),
            email_verified: Some(req.email_verified.unwrap_or(true)),
        };
        let now = now - Duration::seconds(clamp_offset(req.iat_ago.unwrap_or(0)));
        let ttl = clamp_offset(req.ttl.unwrap_or(DEFAULT_TTL_SECS));
        let nbf = clamp_offset(req.nbf_in.unwrap_or(0));
        let clock = TimeOptions::new(Duration::zero(), move || now);
        let claims = Claims::new(custom)
            .set_duration_and_issuance(&clock, Duration::seconds(ttl))
            .set_not_before(now + Duration::seconds(nbf));
        let header = Header::empty().with_key_id(req.kid.clone().unwrap_or_else(|| DEV_KID.into()));
        Ok(Rsa::rs256().token(&header, &claims, &self.key)?)
    }

    /// Verifies an ID token the way a relying party must: RS256 only, known `kid`,
    /// signature, `exp`, `nbf`, `iss`, `aud`; and the session needs an email.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        self.verify_at(token, Utc::now())
    }

    fn verify_at(&self, token: &str, now: DateTime<Utc>) -> Result<Identity, TokenError> {
        let untrusted =
            UntrustedToken::new(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if untrusted.algorithm() != "RS256" {
            return Err(TokenError::Algorithm(untrusted.algorithm().to_owned()));
        }
        if let Some(kid) = &untrusted.header().key_id {
            if kid != DEV_KID {
                return Err(TokenError::UnknownKey(kid.clone()));
            }
        }
        let token = Rsa::rs256()
            .validator::<IdClaims>(&self.public)
            .validate(&untrusted)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let claims = token.claims();
        let clock = TimeOptions::new(Duration::zero(), move || now);
        claims
            .validate_expiration(&clock)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        if claims.not_before.is_some() {
            claims
                .validate_maturity(&clock)
                .map_err(|e| TokenError::Invalid(e.to_string()))?;
        }
        self.identity_from(&claims.custom)
    }

    fn identity_from(&self, c: &IdClaims) -> Result<Identity, TokenError> {
        match &c.iss {
            Some(iss) if *iss == self.issuer => {}
            other => return Err(TokenError::Issuer(other.clone().unwrap_or_default())),
        }
        if !c.aud.as_ref().is_some_and(|a| a.contains(&self.audience)) {
            return Err(TokenError::Audience);
        }
        let email = c
            .email
            .clone()
            .filter(|e| !e.trim().is_empty())
            .ok_or(TokenError::NoEmail)?;
        Ok(Identity {
            sub: c.sub.clone().unwrap_or_else(|| default_sub(&email)),
            email,
            name: c.name.clone().filter(|n| !n.trim().is_empty()),
        })
    }
}

/// `dev|<24 hex of sha256(email)>`: stable, Auth0-looking, not the email itself.
fn default_sub(email: &str) -> String {
    let digest = hex::encode(Sha256::digest(email.as_bytes()));
    format!("dev|{}", &digest[..24])
}

fn clamp_offset(secs: i64) -> i64 {
    secs.clamp(-MAX_OFFSET_SECS, MAX_OFFSET_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// One key for all unit tests: keygen is the slow part.
    fn idp() -> &'static DevIdp {
        static IDP: OnceLock<DevIdp> = OnceLock::new();
        IDP.get_or_init(|| {
            DevIdp::new(generate_key().expect("keygen"), "http://idp.test", "aud-1").expect("idp")
        })
    }

    fn req(email: &str) -> TokenRequest {
        TokenRequest {
            email: Some(email.into()),
            ..TokenRequest::default()
        }
    }

    #[test]
    fn a_fresh_token_verifies_and_names_the_user() {
        let t = idp().issue(&req("a@x.io")).expect("issues");
        let id = idp().verify(&t).expect("verifies");
        assert_eq!(id.email, "a@x.io");
        assert!(id.sub.starts_with("dev|"));
        assert_eq!(idp().issuer(), "http://idp.test/dev/");
    }

    #[test]
    fn every_deliberate_defect_is_refused() {
        type Expect = fn(&TokenError) -> bool;
        let cases: [(TokenRequest, Expect); 5] = [
            (
                TokenRequest {
                    ttl: Some(-10),
                    ..req("a@x.io")
                },
                |e| matches!(e, TokenError::Invalid(_)),
            ),
            (
                TokenRequest {
                    nbf_in: Some(600),
                    ..req("a@x.io")
                },
                |e| matches!(e, TokenError::Invalid(_)),
            ),
            (
                TokenRequest {
                    iss: Some("https://evil/".into()),
                    ..req("a@x.io")
                },
                |e| matches!(e, TokenError::Issuer(_)),
            ),
            (
                TokenRequest {
                    aud: Some("other".into()),
                    ..req("a@x.io")
                },
                |e| matches!(e, TokenError::Audience),
            ),
            (
                TokenRequest {
                    kid: Some("nope".into()),
                    ..req("a@x.io")
                },
                |e| matches!(e, TokenError::UnknownKey(_)),
            ),
        ];
        for (r, expected) in cases {
            let t = idp().issue(&r).expect("issues");
            let err = idp().verify(&t).expect_err("must be refused");
            assert!(expected(&err), "{r:?} gave {err}");
        }
    }

    #[test]
    fn garbage_and_alg_none_are_refused() {
        assert!(matches!(
            idp().verify("not-a-jwt"),
            Err(TokenError::Malformed(_))
        ));
        // {"alg":"none"}.{"email":"a@x.io"}.
        let none = "eyJhbGciOiJub25lIn0.eyJlbWFpbCI6ImFAeC5pbyJ9.";
        assert!(matches!(idp().verify(none), Err(TokenError::Algorithm(_))));
    }

    #[test]
    fn jwks_and_pem_publish_the_signing_key() {
        let k = &idp().jwks()["keys"][0];
        assert_eq!(k["kty"], "RSA");
        assert_eq!(k["kid"], DEV_KID);
        assert_eq!(k["alg"], "RS256");
        assert_eq!(k["use"], "sig");
        assert!(k["n"].as_str().is_some_and(|n| n.len() > 300));
        assert!(idp()
            .public_key_pem()
            .starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn hostile_offsets_are_clamped_not_overflowed() {
        let r = TokenRequest {
            ttl: Some(i64::MAX),
            nbf_in: Some(i64::MIN),
            ..req("a@x.io")
        };
        assert!(idp().issue(&r).is_ok());
    }
}
