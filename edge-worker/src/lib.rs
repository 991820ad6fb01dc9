//! The edge worker: the Cloudflare Workers front door of the gateway.
//!
//! TODO(issue 4): CORS, rate limiting, the KV session cache, routing and the signed
//! assertion. Until then the worker answers `/health` itself and forwards every other
//! request to `ORIGIN_URL` unchanged, so `wrangler dev` already fronts the origin.

/// The origin URL for a request path and query: `origin` without its trailing `/`,
/// then the path, then `?query` when there is one.
pub fn origin_target(origin: &str, path: &str, query: Option<&str>) -> String {
    let base = origin.trim_end_matches('/');
    match query {
        Some(q) if !q.is_empty() => format!("{base}{path}?{q}"),
        _ => format!("{base}{path}"),
    }
}

#[cfg(target_arch = "wasm32")]
mod entry {
    use gateway_shared::error::ErrorBody;
    use worker::*;

    #[event(fetch)]
    async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
        let url = req.url()?;
        if url.path() == "/health" {
            return Response::from_json(&serde_json::json!({"status": "ok", "component": "edge"}));
        }
        let origin = match env.var("ORIGIN_URL") {
            Ok(v) => v.to_string(),
            Err(_) => {
                let body = ErrorBody::new("edge_misconfigured", "ORIGIN_URL is not set");
                return Ok(Response::ok(body.to_json())?.with_status(500));
            }
        };
        let target = crate::origin_target(&origin, url.path(), url.query());
        let mut init = RequestInit::new();
        init.with_method(req.method());
        init.with_headers(req.headers().clone());
        if let Some(body) = req.inner().body() {
            init.with_body(Some(body.into()));
        }
        Fetch::Request(Request::new_with_init(&target, &init)?)
            .send()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_target_joins_origin_path_and_query() {
        assert_eq!(
            origin_target("http://o:1/", "/a/b", Some("x=1")),
            "http://o:1/a/b?x=1"
        );
        assert_eq!(origin_target("http://o:1", "/a", Some("")), "http://o:1/a");
        assert_eq!(origin_target("http://o:1", "/a", None), "http://o:1/a");
    }
}
