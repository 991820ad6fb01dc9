//! Who the edge says is calling, and the `x-gateway-assertion` that says it.
//!
//! Every request the edge forwards carries an assertion, so the origin (with
//! `REQUIRE_EDGE_ASSERTION=true`) can tell edge traffic from direct traffic. On session
//! routes it names the user the session belongs to; on public and service routes it is
//! anonymous (empty `sub` and `sid`) and only proves the request came through the edge —
//! the origin then checks whatever credential the request carries itself.

use gateway_shared::assertion::{self, AssertionClaims, AssertionError, SecretKey};
use gateway_shared::session::{SessionHash, SessionRecord};

/// The caller of one request, as far as the edge knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Not authenticated by the edge (public and service routes).
    Anonymous,
    /// A session the edge validated (KV hit or the origin's answer).
    User {
        /// The session's record: user and expiry.
        record: SessionRecord,
        /// The hash of the session's token (`sid`).
        session: SessionHash,
    },
}

impl Caller {
    /// The assertion's claims for request `rid` (`iss`/`aud` are set by `sign`).
    pub fn claims(&self, rid: &str) -> AssertionClaims {
        let (sub, email, roles, sid, session_exp) = match self {
            Caller::Anonymous => (String::new(), String::new(), Vec::new(), String::new(), 0),
            Caller::User { record, session } => (
                record.user.user_id.clone(),
                record.user.email.clone(),
                record.user.roles.clone(),
                session.as_str().to_owned(),
                record.expires_at_unix,
            ),
        };
        AssertionClaims {
            sub,
            email,
            roles,
            sid,
            rid: rid.to_owned(),
            session_exp,
            iss: String::new(),
            aud: String::new(),
        }
    }

    /// The signed `x-gateway-assertion` value for request `rid` at `now_unix`.
    pub fn assertion(
        &self,
        rid: &str,
        key: &SecretKey,
        now_unix: i64,
    ) -> Result<String, AssertionError> {
        assertion::sign(&self.claims(rid), key, now_unix)
    }
}

/// A signing key and callers for this crate's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use gateway_shared::assertion::signing_key_from_b64;
    use gateway_shared::session::User;

    pub(crate) fn key() -> SecretKey {
        signing_key_from_b64("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc").unwrap()
    }

    /// A signed-in user with these roles, session token `the-token`.
    pub(crate) fn user(roles: &[&str]) -> Caller {
        Caller::User {
            record: SessionRecord {
                user: User {
                    user_id: "612345678901234567".into(),
                    email: "ada@example.com".into(),
                    display_name: "Ada".into(),
                    roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                },
                expires_at: "2033-05-18T03:33:20Z".into(),
                expires_at_unix: 2_000_000_000,
                is_active: true,
            },
            session: SessionHash::of("the-token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::key;
    use super::*;
    use gateway_shared::assertion::{verify, LIFETIME_SECS};

    fn user() -> Caller {
        super::fixtures::user(&["user"])
    }

    #[test]
    fn a_users_assertion_names_user_session_and_request_and_verifies() {
        let k = key();
        let t = user().assertion("rid-1", &k, 1_000).unwrap();
        let c = verify(&t, &k.public_key(), 1_000 + LIFETIME_SECS - 1, 0).unwrap();
        assert_eq!(c.sub, "612345678901234567");
        assert_eq!(c.email, "ada@example.com");
        assert_eq!(c.roles, ["user"]);
        assert_eq!(c.sid, SessionHash::of("the-token").as_str());
        assert_eq!(c.rid, "rid-1");
        assert_eq!(c.session_exp, 2_000_000_000);
        assert!(!t.contains("the-token"));
    }

    #[test]
    fn an_anonymous_assertion_names_nobody_but_still_verifies() {
        let k = key();
        let t = Caller::Anonymous.assertion("rid-2", &k, 1_000).unwrap();
        let c = verify(&t, &k.public_key(), 1_000, 0).unwrap();
        assert!(c.sub.is_empty() && c.sid.is_empty() && c.roles.is_empty());
        assert_eq!(c.rid, "rid-2");
    }
}
