//! Constant-time comparison of secrets (service tokens, callback tokens).
//!
//! A plain `==` on byte strings returns at the first difference, which lets an attacker
//! learn a token byte by byte from response times.

use subtle::ConstantTimeEq;

/// True iff `a` and `b` are equal, in time that depends only on their lengths.
///
/// The length itself is not secret (tokens have a fixed, public format), so unequal
/// lengths return early.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_and_unequal_secrets() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(secrets_equal(b"", b""));
    }
}
