//! Request ids: the one id that follows a request through the edge, the origin and NoETL.
//!
//! A client (or a proxy in front of the edge) may bring its own `x-request-id`; it is kept
//! only if [`accept_client_request_id`] says so (short, a safe alphabet: it lands in log
//! lines and in the signed assertion; the origin applies the same rule). Anything else is
//! replaced by 128 random bits, hex.

use gateway_shared::headers::accept_client_request_id;

/// 16 random bytes as 32 lowercase hex characters.
pub fn hex_id(bytes: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0x0f)] as char);
    }
    s
}

/// The request id to use: the client's if acceptable, else a fresh one from `mint`.
pub fn choose(client: Option<&str>, mint: impl FnOnce() -> String) -> String {
    match client.map(str::trim) {
        Some(id) if accept_client_request_id(id) => id.to_owned(),
        _ => mint(),
    }
}

/// The request id for an incoming request (see [`choose`]); random bits from the runtime's
/// `crypto.getRandomValues`.
#[cfg(target_arch = "wasm32")]
pub fn request_id(client: Option<&str>) -> String {
    choose(client, || {
        let mut bytes = [0u8; 16];
        match getrandom::fill(&mut bytes) {
            Ok(()) => hex_id(&bytes),
            // getRandomValues does not fail for 16 bytes; if it ever did, an id that is
            // unique enough for correlation beats refusing the request.
            Err(_) => format!("edge-{}", crate::time::now_millis()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_client_ids_are_kept_and_others_replaced() {
        let mint = || "minted".to_owned();
        assert_eq!(choose(Some("abc-123_x.y:z"), mint), "abc-123_x.y:z");
        assert_eq!(choose(Some(" padded "), mint), "padded");
        for bad in [
            "",
            "has space",
            "new\nline",
            "quote\"",
            "semi;colon",
            "caf\u{e9}",
            &"x".repeat(129),
        ] {
            assert_eq!(choose(Some(bad), mint), "minted", "{bad:?}");
        }
        assert_eq!(choose(None, mint), "minted");
        assert_eq!(choose(Some(&"x".repeat(128)), mint), "x".repeat(128));
    }

    #[test]
    fn minted_ids_are_32_hex_characters() {
        let id = hex_id(&[0xab; 16]);
        assert_eq!(id, "ab".repeat(16));
        assert!(accept_client_request_id(&hex_id(&[0; 16])));
    }
}
