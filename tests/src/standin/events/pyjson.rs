//! JSON text exactly as NoETL 4.x's event mirror writes it: Python's
//! `json.dumps(event, sort_keys=True, separators=(",", ":"))` with its default
//! `ensure_ascii=True`.
//!
//! What differs from `serde_json::to_vec`: keys sorted at every depth (by code point, which
//! is UTF-8 byte order), every character outside printable ASCII escaped as `\uXXXX`
//! (lowercase hex, surrogate pairs above U+FFFF, DEL included), and floats in Python's
//! `repr` (`1e-05`, `1e+16`, `2.0`). Integers are written digit for digit, so ids above
//! 2^53 stay exact.

use serde_json::{Map, Number, Value};

/// `value` as Python's `json.dumps(value, sort_keys=True, separators=(",", ":"))`.
pub fn to_python_json(value: &Value) -> Vec<u8> {
    let mut out = String::new();
    write_value(&mut out, value);
    out.into_bytes()
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

fn write_object(out: &mut String, map: &Map<String, Value>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value);
    }
    out.push('}');
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&python_float_repr(f));
    }
}

/// Python's `repr(float)` for a finite value: the shortest digits that round-trip, in
/// fixed notation when the decimal exponent is in [-4, 16), else `d.ddde±XX`.
pub fn python_float_repr(f: f64) -> String {
    // `{:e}` gives the shortest round-trip digits as `d.ddde<exp>`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let body = if (-4..16).contains(&exp) {
        fixed(&digits, exp)
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", exp.abs())
    };
    format!("{sign}{body}")
}

/// `digits` (d1 d2 …, value d1.d2… × 10^exp) in fixed notation with at least one
/// fractional digit, as Python writes `2.0`.
fn fixed(digits: &str, exp: i32) -> String {
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        return format!("0.{zeros}{digits}");
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        let zeros = "0".repeat(int_len - digits.len());
        format!("{digits}{zeros}.0")
    } else {
        let (int, frac) = digits.split_at(int_len);
        format!("{int}.{frac}")
    }
}

/// A JSON string as Python's `ensure_ascii` encoder writes it.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: &Value) -> String {
        String::from_utf8(to_python_json(v)).expect("ASCII")
    }

    #[test]
    fn keys_are_sorted_at_every_depth_and_separators_are_compact() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": null, "x": true}], "m": "s"}, "A": false});
        assert_eq!(
            text(&v),
            r#"{"A":false,"a":{"m":"s","z":[1,{"x":true,"y":null}]},"b":1}"#
        );
    }

    #[test]
    fn ids_above_2_pow_53_and_negative_ints_are_written_digit_for_digit() {
        let v = json!({"event_id": 600_000_000_000_000_001_u64, "n": -7, "max": u64::MAX});
        assert_eq!(
            text(&v),
            r#"{"event_id":600000000000000001,"max":18446744073709551615,"n":-7}"#
        );
    }

    #[test]
    fn non_ascii_control_and_del_are_escaped_like_python() {
        let v = json!("é\u{7f}\u{1}\"\\\n\t😀 ok/");
        assert_eq!(text(&v), r#""\u00e9\u007f\u0001\"\\\n\t\ud83d\ude00 ok/""#);
    }

    #[test]
    fn floats_follow_python_repr() {
        for (f, want) in [
            (0.5, "0.5"),
            (2.0, "2.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (123_456_789_012_345_680.0, "1.2345678901234568e+17"),
            (-3.25, "-3.25"),
            (0.1 + 0.2, "0.30000000000000004"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
        assert_eq!(text(&json!({"s": 0.5})), r#"{"s":0.5}"#);
    }
}
