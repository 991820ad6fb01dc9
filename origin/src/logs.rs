//! The JSON log line (`LOG_FORMAT=json`): one object per line that Cloud Logging reads
//! without a parser.
//!
//! Members: `timestamp` (RFC 3339, µs), `severity` (Cloud Logging's names: `DEBUG`,
//! `INFO`, `WARNING`, `ERROR`; `TRACE` is `DEBUG`), `level` (tracing's own, kept for
//! existing readers), `target`, the event's fields (`message` among them), `span` (the
//! innermost span's name and fields) and — on a line written while a request is being
//! answered (`observe::current`) — `trace_id`, `span_id` and `request_id`, with
//! `logging.googleapis.com/spanId`, `logging.googleapis.com/trace_sampled` and, when the
//! project is known (`GOOGLE_CLOUD_PROJECT`), `logging.googleapis.com/trace` as
//! `projects/<project>/traces/<trace id>`, so the logs of one request line up with its
//! trace. An event that carries its own `trace_id` (the access line) keeps it.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::observe;

/// Cloud Logging's severity for a tracing level.
pub fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// The JSON event format (see the module docs). Use with
/// `tracing_subscriber::fmt::format::JsonFields` as the field formatter, so span fields
/// are stored as JSON.
#[derive(Debug, Clone, Default)]
pub struct JsonLines {
    /// The Google Cloud project, for `logging.googleapis.com/trace`.
    pub project: Option<String>,
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("severity".into(), Value::from(severity(meta.level())));
        line.insert("level".into(), Value::from(meta.level().as_str()));
        line.insert("target".into(), Value::from(meta.target()));
        event.record(&mut Fields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            let mut fields = span
                .extensions()
                .get::<FormattedFields<N>>()
                .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                .unwrap_or_default();
            fields.insert("name".into(), Value::from(span.name()));
            line.insert("span".into(), Value::Object(fields));
        }
        if !line.contains_key("trace_id") {
            observe::with_current(|c| {
                if let Some(c) = c {
                    line.insert("trace_id".into(), Value::from(c.trace.trace_id_hex()));
                    line.insert("span_id".into(), Value::from(c.trace.span_id_hex()));
                    line.insert("request_id".into(), Value::from(c.request_id.as_str()));
                }
            });
        }
        let ids = (
            line.get("trace_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            line.get("span_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        );
        if let (Some(trace), Some(span)) = ids {
            if let Some(project) = &self.project {
                line.insert(
                    "logging.googleapis.com/trace".into(),
                    Value::from(format!("projects/{project}/traces/{trace}")),
                );
            }
            line.insert("logging.googleapis.com/spanId".into(), Value::from(span));
            line.insert(
                "logging.googleapis.com/trace_sampled".into(),
                Value::from(true),
            );
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_cloud_logging_severities() {
        assert_eq!(severity(&Level::WARN), "WARNING");
        assert_eq!(severity(&Level::TRACE), "DEBUG");
        assert_eq!(severity(&Level::ERROR), "ERROR");
        assert_eq!(severity(&Level::INFO), "INFO");
    }
}
