//! Request ids: the one id that follows a request through the edge, the origin and NoETL.
//!
//! A client (or a proxy in front of the edge) may bring its own `x-request-id`; it is kept
//! only if [`accept_client_request_id`] says so (short, a safe alphabet: it lands in log
//! lines and in the signed assertion; the origin applies the same rule). Anything else is
//! replaced by 128 random bits, hex.
//!
//! The request's trace (W3C `traceparent`, `gateway_shared::trace`) is decided here too:
//! the client's valid trace is continued with the edge's span as the new parent, else a
//! new trace starts. Every random id of a request — the request id when one is minted,
//! the edge's span id, a new trace id — comes from **one** read of the runtime's
//! `crypto.getRandomValues` ([`RANDOM_BYTES`] bytes): one wasm↔JS crossing per request.

use gateway_shared::headers::accept_client_request_id;
use gateway_shared::trace::{Origin, TraceParent};

/// Random bytes read once per request: 16 for a minted request id, 8 for the edge's span
/// id, 16 for a new trace id.
pub const RANDOM_BYTES: usize = 40;

/// The ids one request travels with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIds {
    /// The request id (`x-request-id`).
    pub rid: String,
    /// The trace, with the edge's span as its parent id (sent as `traceparent`).
    pub trace: TraceParent,
    /// Whether the client's trace was continued (its `tracestate` is kept) or started here.
    pub trace_origin: Origin,
}

/// The request's ids from the client's headers and [`RANDOM_BYTES`] random bytes.
pub fn choose_ids(
    client_rid: Option<&str>,
    client_traceparent: Option<&str>,
    random: &[u8; RANDOM_BYTES],
) -> RequestIds {
    let (rid_bytes, rest) = random.split_at(16);
    let (span, trace_id) = rest.split_at(8);
    let rid = choose(client_rid, || {
        hex_id(rid_bytes.try_into().expect("16 bytes"))
    });
    let (trace, trace_origin) = TraceParent::continue_or_start(
        client_traceparent,
        span.try_into().expect("8 bytes"),
        trace_id.try_into().expect("16 bytes"),
    );
    RequestIds {
        rid,
        trace,
        trace_origin,
    }
}

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
/// The request's ids: the client's `x-request-id` and `traceparent` when acceptable,
/// randomness from one `crypto.getRandomValues` call for the rest. Should the runtime's
/// randomness fail (it does not on Workers), the clock stands in: ids stay well-formed.
#[cfg(target_arch = "wasm32")]
pub fn request_ids(client_rid: Option<&str>, client_traceparent: Option<&str>) -> RequestIds {
    let mut random = [0u8; RANDOM_BYTES];
    if getrandom::fill(&mut random).is_err() {
        let now = crate::time::now_millis().to_be_bytes();
        for (i, b) in random.iter_mut().enumerate() {
            *b = now[i % 8] ^ (i as u8);
        }
    }
    choose_ids(client_rid, client_traceparent, &random)
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
    fn one_random_read_gives_the_request_id_the_span_and_a_new_trace() {
        let mut random = [0u8; RANDOM_BYTES];
        for (i, b) in random.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let ids = choose_ids(None, None, &random);
        assert_eq!(ids.rid, hex_id(&random[..16].try_into().unwrap()));
        assert_eq!(ids.trace.parent_id[..], random[16..24]);
        assert_eq!(ids.trace.trace_id[..], random[24..]);
        assert_eq!(ids.trace_origin, Origin::Started);
        assert_eq!(ids.trace.flags, 1);

        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let ids = choose_ids(Some("client-id"), Some(client), &random);
        assert_eq!(ids.rid, "client-id");
        assert_eq!(ids.trace_origin, Origin::Continued);
        assert_eq!(ids.trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ids.trace.parent_id[..], random[16..24], "the edge's span");
        assert_eq!(ids.trace.flags, 0);
        let ids = choose_ids(None, Some(&client.to_uppercase()), &random);
        assert_eq!(
            ids.trace_origin,
            Origin::Started,
            "an invalid one is replaced"
        );
    }

    #[test]
    fn minted_ids_are_32_hex_characters() {
        let id = hex_id(&[0xab; 16]);
        assert_eq!(id, "ab".repeat(16));
        assert!(accept_client_request_id(&hex_id(&[0; 16])));
    }
}
