//! The gateway's ids as types: [`ClientId`], [`RequestId`], [`ExecutionId`].
//!
//! Each id ends up in a NATS subject or a K/V key, so each is checked once, where it enters
//! (a query string, a callback body, a NoETL event), and from then on travels as its type:
//! a function that takes a `ClientId` cannot be handed an unchecked string, and the rule for
//! what an id may look like is written here and nowhere else. All three accept
//! `[A-Za-z0-9_-]` only (safe as a subject token and a key); they differ in length.
//!
//! Serde: each serialises as its plain string and refuses, when deserialised, a value that
//! does not parse — so a stored record cannot smuggle a bad id back in.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not an id of some kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidId {
    /// Which kind of id was expected: `client_id`, `request_id` or `execution_id`.
    pub kind: &'static str,
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a valid {}", self.kind)
    }
}

impl std::error::Error for InvalidId {}

/// True if `s` is 1..=`max` characters of `[A-Za-z0-9_-]`.
fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The longest id of this kind accepted.
            pub const MAX_LEN: usize = $max;

            /// Checks `s` and keeps it as this id.
            pub fn parse(s: &str) -> Result<Self, InvalidId> {
                if is_token(s, Self::MAX_LEN) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(InvalidId { kind: $kind })
                }
            }

            /// True if `s` would parse.
            pub fn is_valid(s: &str) -> bool {
                is_token(s, Self::MAX_LEN)
            }

            /// The id as text (for keys, subjects and JSON).
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, owned.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                if is_token(&s, Self::MAX_LEN) {
                    Ok(Self(s))
                } else {
                    Err(InvalidId { kind: $kind })
                }
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::try_from(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A client's id: one browser tab's event stream (`/events`), bound to one user. Server
    /// ids are 36-character UUIDs; up to 64 characters are accepted.
    ClientId,
    "client_id",
    64
);

id_type!(
    /// A gateway request id: one promised delivery (a playbook's result for a client).
    /// Minted ids are 32 hex characters; up to 128 characters are accepted.
    RequestId,
    "request_id",
    128
);

id_type!(
    /// A NoETL execution id. NoETL's are decimal numbers above 2^53, so they are kept as
    /// text and never go through a float; up to 200 characters are accepted.
    ExecutionId,
    "execution_id",
    200
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_kind_takes_subject_safe_tokens_up_to_its_length() {
        assert!(ClientId::parse("4b1c2e3f-aaaa-bbbb-cccc-0123456789ab").is_ok());
        assert!(ClientId::parse(&"a".repeat(64)).is_ok());
        assert!(ClientId::parse(&"a".repeat(65)).is_err());
        assert!(RequestId::parse(&"f".repeat(128)).is_ok());
        assert!(RequestId::parse(&"f".repeat(129)).is_err());
        assert!(ExecutionId::parse("318374598412345678901").is_ok());
        assert!(ExecutionId::parse(&"1".repeat(201)).is_err());
        for bad in ["", "a b", "a.b", "a*", "a>", "é", "a/b", "a\n"] {
            assert!(ClientId::parse(bad).is_err(), "{bad:?}");
            assert!(RequestId::parse(bad).is_err(), "{bad:?}");
            assert!(ExecutionId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            ClientId::parse("a.b").unwrap_err().to_string(),
            "not a valid client_id"
        );
    }

    #[test]
    fn serde_is_the_plain_string_and_refuses_a_bad_id() {
        let id = ExecutionId::parse("318374598412345678901").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"318374598412345678901\""
        );
        let back: ExecutionId = serde_json::from_str("\"318374598412345678901\"").unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<ClientId>("\"a.b\"").is_err());
        assert!(serde_json::from_str::<RequestId>("\"\"").is_err());
    }

    proptest! {
        #[test]
        fn parse_accepts_exactly_the_token_alphabet(s in "\\PC{0,80}") {
            let token = !s.is_empty()
                && s.len() <= ClientId::MAX_LEN
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            prop_assert_eq!(ClientId::parse(&s).is_ok(), token);
            if let Ok(id) = ClientId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
            }
        }
    }
}
