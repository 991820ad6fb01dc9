//! The OpenAPI 3.1 document of the origin's HTTP routes (`docs/openapi.json`), generated with
//! `utoipa` from the handlers' `#[utoipa::path]` annotations and the wire types' schemas.
//!
//! Both listeners are in one document; each operation's tag says where it is served:
//! `auth`, `events`, `graphql`, `proxy` on the public listener (through the edge), `internal`
//! on the internal listener only (never through the edge), `health` on both. Routes whose
//! handlers live in modules this file does not annotate (GraphQL, the `/noetl` proxy,
//! `/metrics`) are described here by doc-only functions. The JSON bodies the handlers build
//! with `json!` are described by doc-only schema types beside each handler (GraphQL's
//! here); `tests/tests/contracts.rs` keeps
//! the committed file equal to [`document`] and checks that every route `app.rs` serves is
//! in it. PROTOCOL.md stays the prose contract; this is its machine-readable half.

use gateway_shared::error::ErrorBody;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// A GraphQL request (GraphQL over HTTP); the schema is `docs/schema.graphql`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GraphqlRequest {
    /// The document.
    pub query: String,
    /// Which operation of the document to run.
    pub operation_name: Option<String>,
    /// The variables.
    #[schema(value_type = Option<Object>)]
    pub variables: Option<serde_json::Value>,
}

/// A GraphQL response: `data` and/or `errors` (each with `extensions.code`).
#[derive(Serialize, ToSchema)]
pub struct GraphqlResponse {
    /// The result.
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
    /// Errors, if any.
    #[schema(value_type = Option<Vec<Object>>)]
    pub errors: Option<Vec<serde_json::Value>>,
}

/// `POST /graphql`.
#[utoipa::path(
    post, operation_id = "graphql", path = "/graphql", tag = "graphql",
    request_body(content = GraphqlRequest, description = "One operation, or (with `GRAPHQL_BATCH`) a JSON array of them"),
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "The GraphQL response (operation errors are in `errors`, status 200)", body = GraphqlResponse),
        (status = 400, description = "`invalid_json`, `batch_not_enabled` (a JSON array while `GRAPHQL_BATCH` is off), `empty_batch`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_session`", body = ErrorBody),
        (status = 413, description = "`payload_too_large` (2 MiB)", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 429, description = "`rate_limited` (per-user operation rates), with `Retry-After`", body = ErrorBody),
    )
)]
pub fn graphql_doc() {}

/// `GET /graphql`: the GraphiQL page.
#[utoipa::path(
    get, operation_id = "graphiql", path = "/graphql", tag = "graphql",
    responses((status = 200, description = "GraphiQL (HTML)", content_type = "text/html", body = String))
)]
pub fn graphiql_doc() {}

/// `GET /graphql/ws`: GraphQL over WebSocket (`graphql-transport-ws`, or the legacy `graphql-ws`).
#[utoipa::path(
    get, operation_id = "graphql_ws", path = "/graphql/ws", tag = "graphql",
    params(("Sec-WebSocket-Protocol" = String, Header, description = "`graphql-transport-ws` or `graphql-ws`")),
    responses(
        (status = 101, description = "Switching protocols; the session token comes in `connection_init`'s payload (`connectionParams`) or the request's own credential"),
        (status = 400, description = "`websocket_required`, `unsupported_subprotocol`", body = ErrorBody),
        (status = 429, description = "Too many sockets for this user", body = ErrorBody),
    )
)]
pub fn graphql_ws_doc() {}

/// `/noetl/{path}`: NoETL's API at `{NOETL_BASE_URL}/api/{path}`, for allow-listed
/// `METHOD /api/prefix` pairs (`PROXY_ALLOW`).
#[utoipa::path(
    method(get, post, put, patch, delete), operation_id = "proxy", path = "/noetl/{path}", tag = "proxy",
    params(("path" = String, Path, description = "NoETL's API path below `/api/` (any depth; normalised, refused if it escapes `/api/`)")),
    request_body(content = Option<Object>, description = "Forwarded as it is (`PROXY_MAX_BODY`, 10 MiB)"),
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "NoETL's answer, streamed; a JSON answer has secrets removed (PROTOCOL §5). Any status NoETL answers passes through"),
        (status = 401, description = "`missing_token`, `invalid_session`", body = ErrorBody),
        (status = 403, description = "`proxy_route_forbidden`: not allow-listed", body = ErrorBody),
        (status = 404, description = "`not_found`: another user's execution, or a path that escapes `/api/`", body = ErrorBody),
        (status = 405, description = "`method_not_allowed`: an allow-listed path with another method", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 502, description = "NoETL unreachable, `noetl_bad_response`", body = ErrorBody),
        (status = 504, description = "NoETL too slow", body = ErrorBody),
    )
)]
pub fn proxy_doc() {}

/// `/noetl` and `/noetl/`: no NoETL path named.
#[utoipa::path(
    method(get, post, put, patch, delete), operation_id = "proxy_root", path = "/noetl", tag = "proxy",
    responses((status = 404, description = "`not_found`: name a NoETL API path after `/noetl/`", body = ErrorBody))
)]
pub fn proxy_root_doc() {}

/// `/noetl/` (the same as `/noetl`).
#[utoipa::path(
    method(get, post, put, patch, delete), operation_id = "proxy_root_slash", path = "/noetl/", tag = "proxy",
    responses((status = 404, description = "`not_found`: name a NoETL API path after `/noetl/`", body = ErrorBody))
)]
pub fn proxy_root_slash_doc() {}

/// `/api/v1/{service}/{path}`: a registered service's `{base URL}/{path}` (`SERVICES`,
/// `SERVICE_<NAME>_URL`), for its allow-listed `METHOD /prefix` pairs.
#[utoipa::path(
    method(get, post, put, patch, delete, head, options), operation_id = "service_proxy", path = "/api/v1/{service}/{path}", tag = "proxy",
    params(
        ("service" = String, Path, description = "A registered service's name (`noetl` is NoETL's API, as `/noetl/{path}`)"),
        ("path" = String, Path, description = "The path below the service's base URL (any depth; normalised, refused if it escapes it)"),
    ),
    request_body(content = Option<Object>, description = "Streamed as it is (the service's `max_body`, default `PROXY_MAX_BODY`)"),
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "The service's answer, streamed as it comes (an SSE answer frame by frame). Any status the service answers passes through; `x-noetl-user-*` identity headers were set by the gateway, the caller's own stripped"),
        (status = 400, description = "`invalid_proxy_path`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_session`", body = ErrorBody),
        (status = 403, description = "`proxy_route_forbidden`: not on the service's allow-list", body = ErrorBody),
        (status = 404, description = "`service_not_found`: no service of that name; `not_found`: no path after the name", body = ErrorBody),
        (status = 405, description = "`method_not_allowed`: an allow-listed path with another method", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 502, description = "`service_unavailable`: the service is unreachable", body = ErrorBody),
        (status = 504, description = "`service_timeout`: no answer head within the service's timeout", body = ErrorBody),
    )
)]
pub fn service_proxy_doc() {}

/// `/api/v1/{service}` and `/api/v1/{service}/`: no path named.
#[utoipa::path(
    method(get, post, put, patch, delete, head, options), operation_id = "service_proxy_root", path = "/api/v1/{service}", tag = "proxy",
    params(("service" = String, Path, description = "A service's name")),
    responses((status = 404, description = "`not_found`: name a path after the service", body = ErrorBody))
)]
pub fn service_proxy_root_doc() {}

/// `/api/v1/{service}/` (the same as `/api/v1/{service}`).
#[utoipa::path(
    method(get, post, put, patch, delete, head, options), operation_id = "service_proxy_root_slash", path = "/api/v1/{service}/", tag = "proxy",
    params(("service" = String, Path, description = "A service's name")),
    responses((status = 404, description = "`not_found`: name a path after the service", body = ErrorBody))
)]
pub fn service_proxy_root_slash_doc() {}

/// `GET /metrics` (internal listener).
#[utoipa::path(
    get, operation_id = "metrics", path = "/metrics", tag = "internal",
    responses((status = 200, description = "Prometheus / OpenMetrics text (docs/OPERATIONS.md lists the series)", content_type = "text/plain", body = String))
)]
pub fn metrics_doc() {}

/// The security schemes the operations name.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The gateway session token from login"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "session_token",
                "The session token as a cookie",
            ))),
        );
        components.add_security_scheme(
            "callback_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`GATEWAY_INTERNAL_TOKEN` (the service token) or the request's own \
                         `callback_token` (HMAC-SHA256(secret, request_id))",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "NoETL edge gateway — origin HTTP API",
        description = "The origin's REST routes. Public listener (through the edge): `auth`, `events`, `graphql`, `proxy`, `health`. Internal listener (in-cluster only; 404 at the edge): `internal`, `health`. Every error the gateway makes itself is `{\"error\":{\"code\",\"message\"}}` (`ErrorBody`); the prose contract is docs/PROTOCOL.md, the GraphQL schema docs/schema.graphql.",
        license(name = "Apache-2.0"),
    ),
    paths(
        crate::auth::routes::login,
        crate::auth::routes::validate,
        crate::auth::routes::check_access,
        crate::auth::routes::logout,
        crate::events::events,
        crate::events::ticket,
        graphql_doc,
        graphiql_doc,
        graphql_ws_doc,
        proxy_doc,
        proxy_root_doc,
        proxy_root_slash_doc,
        service_proxy_doc,
        service_proxy_root_doc,
        service_proxy_root_slash_doc,
        crate::events::events_alias,
        crate::questions::respond,
        crate::questions::ask,
        crate::service_events::publish,
        crate::health::health,
        crate::health::ready,
        metrics_doc,
        crate::callbacks::sync_callback,
        crate::callbacks::async_callback,
        crate::callbacks::progress,
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "auth", description = "Sessions (PROTOCOL §1). Public."),
        (name = "events", description = "Server-sent events (PROTOCOL §3). Public, session required."),
        (name = "graphql", description = "GraphQL (PROTOCOL §2; docs/schema.graphql). Public, session required."),
        (name = "proxy", description = "Registered services and NoETL's API, allow-listed (PROTOCOL §5). Public, session required."),
        (name = "health", description = "Liveness and readiness, on both listeners."),
        (name = "internal", description = "Internal listener only: playbook callbacks, service events and questions (PROTOCOL §4), and metrics."),
    )
)]
pub struct ApiDoc;

/// The document as committed in `docs/openapi.json`: pretty JSON, ending in a newline.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    unique_operation_ids(&mut doc);
    let mut json = doc
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    json.push('\n');
    json
}

/// An operation id must be unique in a document, but one `#[utoipa::path]` with several
/// methods (the proxy's) gives each the same: those get `_<method>` appended.
fn unique_operation_ids(doc: &mut utoipa::openapi::OpenApi) {
    for item in doc.paths.paths.values_mut() {
        let ops = [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("options", &mut item.options),
            ("head", &mut item.head),
            ("patch", &mut item.patch),
            ("trace", &mut item.trace),
        ];
        let mut ops: Vec<_> = ops
            .into_iter()
            .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
            .collect();
        let shared = ops.len() > 1
            && ops
                .windows(2)
                .all(|w| w[0].1.operation_id == w[1].1.operation_id);
        if shared {
            for (method, op) in &mut ops {
                if let Some(id) = &mut op.operation_id {
                    id.push('_');
                    id.push_str(method);
                }
            }
        }
    }
}
