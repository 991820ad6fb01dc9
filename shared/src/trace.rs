//! W3C Trace Context (`traceparent`): parse, format, and the edge's policy — continue the
//! client's trace, or start one.
//!
//! `traceparent` is `version-traceid-parentid-flags`, lower-case hex:
//! `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`. A value is valid when its
//! version is not `ff`, the trace id (16 bytes) and parent id (8 bytes) are not all zero,
//! and every field has its exact length. Version `00` is exactly 55 characters; a later
//! version may append fields after a `-`, and is read as version `00` (the spec's rule
//! for a version this reader does not know), so the edge forwards `00`.
//!
//! The policy ([`TraceParent::continue_or_start`]): a valid incoming value keeps its trace
//! id and flags and gets the edge's own span as the new parent id; an absent or invalid
//! one is replaced by a fresh trace (random trace id and span id, flags `01`: sampled).
//! Randomness comes from the caller (the edge reads the runtime's `crypto`), so everything
//! here is pure and unit-tested on the host.

use std::fmt;

/// The `traceparent` header name.
pub const HEADER: &str = "traceparent";

/// The `tracestate` header name: kept only with a continued `traceparent` (the spec:
/// a vendor's state means nothing under a trace id it did not see).
pub const STATE_HEADER: &str = "tracestate";

/// The `sampled` trace flag.
pub const FLAG_SAMPLED: u8 = 0x01;

/// The length of a version-`00` `traceparent`.
const LEN: usize = 55;

/// One parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id: 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The parent (span) id: 8 bytes, never all zero.
    pub parent_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Where a request's trace came from (for logs and for keeping `tracestate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's valid `traceparent` was continued.
    Continued,
    /// None, or an invalid one, arrived: the edge started the trace.
    Started,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when it is not a valid one (see the module docs).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches([' ', '\t']);
        let b = value.as_bytes();
        if b.len() < LEN {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != LEN) {
            return None;
        }
        // A later version may add fields, after a '-'.
        if b.len() > LEN && b[LEN] != b'-' {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, out) in parent_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace this request travels under: the incoming value continued with the
    /// edge's span `span_id` as its parent id (trace id and flags kept), or, when
    /// `incoming` is absent or invalid, a new trace `fresh_trace_id` with `span_id` and
    /// flags `01`. An all-zero random id (which would be invalid) is nudged to non-zero.
    pub fn continue_or_start(
        incoming: Option<&str>,
        span_id: [u8; 8],
        fresh_trace_id: [u8; 16],
    ) -> (Self, Origin) {
        let parent_id = nonzero(span_id);
        match incoming.and_then(Self::parse) {
            Some(tp) => (
                Self {
                    parent_id,
                    // The spec: a forwarded flags field keeps only the bits this version
                    // knows (sampled).
                    flags: tp.flags & FLAG_SAMPLED,
                    ..tp
                },
                Origin::Continued,
            ),
            None => (
                Self {
                    trace_id: nonzero(fresh_trace_id),
                    parent_id,
                    flags: FLAG_SAMPLED,
                },
                Origin::Started,
            ),
        }
    }

    /// The trace id as 32 lower-case hex characters (what logs carry).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The parent (span) id as 16 lower-case hex characters.
    pub fn parent_id_hex(&self) -> String {
        hex::encode(self.parent_id)
    }
}

impl fmt::Display for TraceParent {
    /// The version-`00` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.parent_id_hex(),
            self.flags
        )
    }
}

/// `bytes` unless all zero, else the same with its last byte 1.
fn nonzero<const N: usize>(mut bytes: [u8; N]) -> [u8; N] {
    if bytes.iter().all(|b| *b == 0) {
        bytes[N - 1] = 1;
    }
    bytes
}

/// Two lower-case hex digits as a byte (upper case is invalid in `traceparent`).
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const SPAN: [u8; 8] = [0xaa; 8];
    const FRESH: [u8; 16] = [0x11; 16];

    #[test]
    fn a_valid_value_round_trips() {
        let tp = TraceParent::parse(VALID).expect("valid");
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), VALID);
        assert_eq!(TraceParent::parse(&format!(" {VALID}\t")), Some(tp));
    }

    #[test]
    fn invalid_values_are_refused() {
        let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zero_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        let version_ff = "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let short = "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01";
        let long_00 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x";
        let long_trace = "00-4bf92f3577b34da6a3ce929d0e0e47360-0f067aa0ba902b7-01";
        let bad_sep = "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let non_hex = "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01";
        let bad_flags = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x";
        let later_no_dash = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        let multibyte = "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01";
        for bad in [
            "",
            "00",
            zero_trace,
            zero_parent,
            upper,
            version_ff,
            short,
            long_00,
            long_trace,
            bad_sep,
            non_hex,
            bad_flags,
            later_no_dash,
            multibyte,
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_00_and_may_carry_more_fields() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        let tp = TraceParent::parse(later).expect("a later version is readable");
        assert_eq!(tp.to_string(), VALID);
    }

    #[test]
    fn a_valid_trace_is_continued_with_the_edges_span() {
        let (tp, origin) = TraceParent::continue_or_start(Some(VALID), SPAN, FRESH);
        assert_eq!(origin, Origin::Continued);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id, SPAN);
        assert_eq!(tp.flags, 1);
        let unsampled = VALID.replace("-01", "-00");
        let (tp, _) = TraceParent::continue_or_start(Some(&unsampled), SPAN, FRESH);
        assert_eq!(tp.flags, 0, "flags are kept");
        let unknown_bits = VALID.replace("-01", "-ff");
        let (tp, _) = TraceParent::continue_or_start(Some(&unknown_bits), SPAN, FRESH);
        assert_eq!(tp.flags, 1, "only the known bit is forwarded");
    }

    #[test]
    fn absent_or_invalid_starts_a_sampled_trace() {
        let upper = VALID.to_uppercase();
        for incoming in [None, Some("garbage"), Some(upper.as_str())] {
            let (tp, origin) = TraceParent::continue_or_start(incoming, SPAN, FRESH);
            assert_eq!(origin, Origin::Started, "{incoming:?}");
            assert_eq!(tp.trace_id, FRESH);
            assert_eq!(tp.parent_id, SPAN);
            assert_eq!(tp.flags, FLAG_SAMPLED);
            assert_eq!(TraceParent::parse(&tp.to_string()), Some(tp));
        }
    }

    #[test]
    fn all_zero_random_ids_never_produce_an_invalid_value() {
        let (tp, _) = TraceParent::continue_or_start(None, [0; 8], [0; 16]);
        assert!(TraceParent::parse(&tp.to_string()).is_some(), "{tp}");
    }
}
