//! A parser for the origin's `/metrics` text (OpenMetrics / Prometheus exposition): one
//! [`Sample`] per series line, with its labels parsed (quoted values with `\\`, `\"` and
//! `\n` escapes), so tests look series up by name and labels instead of grepping text.

use std::collections::BTreeMap;

/// The origin's metric families (issue 14's catalogue) as `/metrics` declares them
/// (`# TYPE <family> <type>`; a counter family is named without its samples' `_total`).
/// `tests/tests/metrics.rs` holds a live origin to exactly this list, and
/// `tests/tests/deploy.rs` the chart's dashboard and alert rules.
pub const CATALOGUE: &[(&str, &str)] = &[
    ("gateway_build_info", "gauge"),
    ("gateway_ready", "gauge"),
    ("gateway_http_request_duration_seconds", "histogram"),
    ("gateway_http_requests_in_flight", "gauge"),
    ("gateway_noetl_request_duration_seconds", "histogram"),
    ("gateway_noetl_up", "gauge"),
    ("gateway_noetl_retries", "counter"),
    ("gateway_noetl_retries_over_budget", "counter"),
    ("gateway_service_request_duration_seconds", "histogram"),
    ("gateway_service_events", "counter"),
    ("gateway_questions", "counter"),
    ("gateway_kv_operation_duration_seconds", "histogram"),
    ("gateway_bus_operation_duration_seconds", "histogram"),
    ("gateway_bridge_lag_seconds", "histogram"),
    ("gateway_bridge_events", "counter"),
    ("gateway_bridge_naks", "counter"),
    ("gateway_bridge_reader", "gauge"),
    ("gateway_sse_streams_open", "gauge"),
    ("gateway_sse_streams", "counter"),
    ("gateway_sse_streams_evicted", "counter"),
    ("gateway_sse_replayed_frames", "counter"),
    ("gateway_sse_resets", "counter"),
    ("gateway_sse_presence_deferred", "counter"),
    ("gateway_callbacks", "counter"),
    ("gateway_jwks_refreshes", "counter"),
    ("gateway_rate_limited", "counter"),
    ("gateway_connections_refused", "counter"),
    ("gateway_auth_validate_requests", "counter"),
    ("gateway_session_negative_hits", "counter"),
    ("gateway_session_validations_coalesced", "counter"),
    ("gateway_auth_busy", "counter"),
    ("gateway_revocations", "gauge"),
    ("gateway_revocations_current", "gauge"),
];

/// One series line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name (`gateway_http_request_duration_seconds_count`, …).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
    raw_series: String,
}

impl Sample {
    /// The series as the exposition wrote it (`name{a="b",c="d"}` or `name`).
    pub fn series(&self) -> &str {
        &self.raw_series
    }

    /// The value as a whole number, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        (self.value >= 0.0 && self.value.fract() == 0.0 && self.value < 1.8e19)
            .then_some(self.value as u64)
    }

    /// True if every `(name, value)` in `want` is among the labels.
    pub fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|x| x == v))
    }
}

/// Every series line of `text` (comments, `# EOF` and blank lines skipped); a line that
/// does not parse panics, naming it — the exposition is the origin's contract.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_line(l).unwrap_or_else(|| panic!("not an exposition line: {l:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    let raw_series;
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // name="value" pairs separated by commas, up to '}'.
            let (start, c) = *chars.peek()?;
            if c == '}' {
                chars.next();
                let after = start + 1;
                raw_series = line[..name_end + 1 + after].to_owned();
                rest = &inner[after..];
                break;
            }
            if c == ',' {
                chars.next();
                continue;
            }
            let eq = inner[start..].find('=')? + start;
            let key = inner[start..eq].trim().to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
    } else {
        raw_series = name.clone();
    }
    // The value, then an optional timestamp or exemplar.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
        raw_series,
    })
}

/// The samples named `name` whose labels include `want`.
pub fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && s.has(want))
        .collect()
}

/// The sum of the values of [`find`].
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    find(samples, name, want).iter().map(|s| s.value).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_lines_parse_with_labels_and_escapes() {
        let text = "# HELP x y\n# TYPE a counter\na_total 3\n\
                    h_bucket{route=\"/noetl/{*path}\",le=\"0.5\"} 2\n\
                    g{v=\"a\\\"b,c\\\\\"} 1.5\n# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_total");
        assert_eq!(s[0].as_u64(), Some(3));
        assert_eq!(s[0].series(), "a_total");
        assert_eq!(s[1].labels["route"], "/noetl/{*path}");
        assert_eq!(s[1].labels["le"], "0.5");
        assert_eq!(
            s[1].series(),
            "h_bucket{route=\"/noetl/{*path}\",le=\"0.5\"}"
        );
        assert_eq!(s[2].labels["v"], "a\"b,c\\");
        assert_eq!(s[2].value, 1.5);
        assert_eq!(s[2].as_u64(), None);
        assert_eq!(sum(&s, "h_bucket", &[("le", "0.5")]), 2.0);
    }
}
