//! Optional OTLP trace export: off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! When on, `tracing` spans are exported through `tracing-opentelemetry` and the OTLP
//! exporter, HTTP/protobuf only (no gRPC stack), in batches from the SDK's own thread. The
//! exporter reads the standard variables itself (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `…_HEADERS`, `…_TIMEOUT`, the `…_TRACES_…` variants); the resource reads
//! `OTEL_SERVICE_NAME` (default `noetl-gateway-origin`) and `OTEL_RESOURCE_ATTRIBUTES`.
//! Requests are sent with the origin's reqwest (so one TLS stack, no second HTTP client
//! version), each on the tokio runtime the origin runs on — which is why this module
//! imports reqwest (the tidy test allows it here, beside `noetl.rs` and `auth/jwks.rs`).
//!
//! `observe` gives every request a span of its own and, through [`continue_trace`], makes
//! it the child of the incoming `traceparent`; the ids it then reads back are the ones
//! exported, sent to NoETL and written in the logs, so the three agree. With export off
//! nothing here runs: one atomic load per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer as _;

/// The name of the one span per request that is exported (`observe` makes it).
pub const SERVER_SPAN: &str = "http.request";

/// The export layer, boxed (its filter's type is long).
pub type BoxedLayer<S> = Box<dyn tracing_subscriber::Layer<S> + Send + Sync>;

/// The service name when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "noetl-gateway-origin";

/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether spans are exported (set once by [`layer`]).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// True while spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The configured endpoint, if export is on.
pub fn endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
}

/// The export layer and its provider (shut it down at exit to flush), when an endpoint
/// is set; `Err` when it is set but the exporter cannot be built. Call inside the tokio
/// runtime.
///
/// Only the request spans ([`SERVER_SPAN`], made by `observe`) are exported, without the
/// log events inside them: one span per request, so export costs little per request
/// (every span and event through `tracing-opentelemetry` would cost several times more,
/// measured with `bench-observability`). Logs stay in the log, linked by trace id.
pub fn layer<S>() -> Result<Option<(BoxedLayer<S>, SdkTracerProvider)>, String>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if endpoint().is_none() {
        return Ok(None);
    }
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let client = ReqwestClient {
        http: reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("OTLP HTTP client: {e}"))?,
        runtime: tokio::runtime::Handle::try_current()
            .map_err(|e| format!("OTLP export needs the tokio runtime: {e}"))?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(client)
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |n| n.is_empty()) {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("noetl-gateway-origin");
    ENABLED.store(true, Ordering::Relaxed);
    let only_requests =
        tracing_subscriber::filter::filter_fn(|meta| meta.is_span() && meta.name() == SERVER_SPAN);
    Ok(Some((
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_requests)
            .boxed(),
        provider,
    )))
}

/// Makes `span` the child of the remote span `parent` (`(trace id, span id, sampled)`)
/// — or the root of a new trace — and returns the ids it was given. `None` when export
/// is off or the span is disabled.
pub fn continue_trace(
    span: &tracing::Span,
    parent: Option<([u8; 16], [u8; 8], bool)>,
) -> Option<([u8; 16], [u8; 8], bool)> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    if let Some((trace, id, sampled)) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(trace),
            SpanId::from_bytes(id),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    own.is_valid().then(|| {
        (
            own.trace_id().to_bytes(),
            own.span_id().to_bytes(),
            own.is_sampled(),
        )
    })
}

/// The exporter's HTTP client: the origin's reqwest, run on the origin's runtime (the
/// SDK's batch thread has none).
#[derive(Debug)]
struct ReqwestClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for ReqwestClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let http = self.http.clone();
        let send = async move {
            let (parts, body) = request.into_parts();
            let resp = http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            let mut out = Response::new(body);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok::<_, HttpError>(out)
        };
        self.runtime.spawn(send).await.map_err(HttpError::from)?
    }
}
