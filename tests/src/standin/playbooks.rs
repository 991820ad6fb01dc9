//! The demo catalog and the runner that plays a run in the background.
//!
//! A playbook is data: a path, a plan of steps (name, duration, whether its call fails,
//! whether a progress report follows it) and how it ends. The runner plays any plan the
//! same way, interpreting the beats [`super::script`] makes of it in the store's event
//! vocabulary — on the Rust server per step `command.issued`, `command.claimed`,
//! `command.started`, the wait, `call.done` + `command.completed` + `step.enter`, or
//! `call.error` + `command.failed` and the run ends FAILED with no `playbook.failed`; on
//! 4.x `step.enter` before the wait, `call.done` + `step.exit` + `command.completed`, and
//! `workflow.*` + `playbook.*` at the end, failures included — then computes the outcome
//! and calls the gateway back.
//!
//! | path | steps | ends | result data |
//! |---|---|---|---|
//! | `demo/echo` | `echo` | COMPLETED | the workload minus gateway fields |
//! | `demo/steps` | `step_1..3` | COMPLETED | `{steps:3, workload}` |
//! | `demo/fail` | `fail_step` (fails) | FAILED, no terminal event (4.x: `workflow.failed`, `playbook.failed`) | error `STEP_FAILED` |
//! | `demo/fail_silent` | `fail_step` (fails) | FAILED, no terminal event, **no callback** (its callback step never runs, as on NoETL 3.54) | — |
//! | `demo/slow` | `sleep` (`workload.seconds`, default 5, max 3600) | COMPLETED | `{slept_seconds}` |
//! | `demo/progress` | `stage_1..4`, progress 0.25…1.0 after each | COMPLETED | `{stages:4}` |
//! | `demo/lying` | `lie` | FAILED but emits `playbook.completed` (4.x: and `workflow.completed`) | error `STEP_FAILED` |
//! | `admin/purge` | `purge` | COMPLETED | `{purged:0}` |
//! | `api_integration/auth0/*` | one step (its result is the answer) | COMPLETED; answer via the sync callback | auth data |
//!
//! As on the real server, the start event's `context` holds the workload verbatim (and
//! `GET /api/executions/{id}` returns it), and step results land in the event rows: an auth
//! playbook's step result carries the session token it created.

use super::auth;
use super::callbacks::CallbackKind;
use super::events::{v4, Carries, Cue, EventKind, NewEvent, Vocabulary};
use super::ids::ExecutionId;
use super::script::{script, Beat};
use super::state::Shared;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Workload keys the gateway injects; they never reach a playbook's result data.
pub const GATEWAY_KEYS: [&str; 3] = ["gateway_url", "callback_token", "request_id"];
/// `demo/slow` sleeps this long unless `workload.seconds` says otherwise.
const SLOW_DEFAULT_SECS: f64 = 5.0;
/// …and never longer than this (an hour: the soak's runs outlast its 10 minutes).
const SLOW_MAX_SECS: f64 = 3600.0;
/// What `demo/fail`'s step reports, verbatim from a real failed HTTP step.
const FAIL_MESSAGE: &str = "HTTP 500 from https://example.invalid";

/// Every playbook the stand-in knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Playbook {
    /// Echoes the workload.
    Echo,
    /// Three steps.
    Steps,
    /// A failing HTTP step.
    Fail,
    /// A failing HTTP step, and no callback: the playbook's callback step never runs.
    FailSilent,
    /// Sleeps, cancellable.
    Slow,
    /// Reports progress after each of four stages.
    Progress,
    /// Says completed, is failed.
    Lying,
    /// Admin-only (the gateway enforces it through check-access).
    Purge,
    /// `AUTH_MODE=playbook` login.
    AuthLogin,
    /// `AUTH_MODE=playbook` session validation.
    AuthValidate,
    /// `AUTH_MODE=playbook` access check.
    AuthCheckAccess,
}

const CATALOG: [Playbook; 11] = [
    Playbook::Echo,
    Playbook::Steps,
    Playbook::Fail,
    Playbook::Slow,
    Playbook::Progress,
    Playbook::Lying,
    Playbook::Purge,
    Playbook::AuthLogin,
    Playbook::AuthValidate,
    Playbook::AuthCheckAccess,
    Playbook::FailSilent,
];

/// Catalog ids are big numbers too, like every id of the real server.
const CATALOG_ID_BASE: u64 = 480_000_000_000_000_000;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// The step's name (`node_name` of its events).
    pub name: String,
    /// How long its call takes.
    pub duration: Duration,
    /// Whether its call errors.
    pub fails: bool,
    /// Progress to report after it (`demo/progress`).
    pub progress: Option<f64>,
}

impl StepPlan {
    fn ok(name: impl Into<String>, duration: Duration) -> Self {
        Self {
            name: name.into(),
            duration,
            fails: false,
            progress: None,
        }
    }
}

impl Playbook {
    /// Every playbook, in catalog order.
    pub fn all() -> &'static [Playbook] {
        &CATALOG
    }

    /// The catalog path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Echo => "demo/echo",
            Self::Steps => "demo/steps",
            Self::Fail => "demo/fail",
            Self::FailSilent => "demo/fail_silent",
            Self::Slow => "demo/slow",
            Self::Progress => "demo/progress",
            Self::Lying => "demo/lying",
            Self::Purge => "admin/purge",
            Self::AuthLogin => "api_integration/auth0/auth0_login",
            Self::AuthValidate => "api_integration/auth0/auth0_validate_session",
            Self::AuthCheckAccess => "api_integration/auth0/check_playbook_access",
        }
    }

    /// One line for the catalog listing.
    pub fn description(self) -> &'static str {
        match self {
            Self::Echo => "echoes its workload",
            Self::Steps => "three steps, 200 ms apart",
            Self::Fail => "an HTTP step fails; the run ends FAILED without playbook.failed",
            Self::FailSilent => "an HTTP step fails; the run ends FAILED and never calls back",
            Self::Slow => "sleeps workload.seconds (default 5); cancellable",
            Self::Progress => "four stages with a progress callback after each",
            Self::Lying => "emits playbook.completed but ends FAILED",
            Self::Purge => "admin only; purges nothing",
            Self::AuthLogin => "verifies an ID token and opens a session",
            Self::AuthValidate => "validates a session token",
            Self::AuthCheckAccess => "checks a session's access to a playbook",
        }
    }

    /// The playbook at `path`.
    pub fn find(path: &str) -> Option<Self> {
        CATALOG.into_iter().find(|p| p.path() == path)
    }

    /// Its catalog id.
    pub fn catalog_id(self) -> u64 {
        let index = CATALOG.iter().position(|p| *p == self).unwrap_or(0);
        CATALOG_ID_BASE + index as u64
    }

    /// The steps a run plays for `workload`.
    pub fn plan(self, workload: &Workload, step: Duration) -> Vec<StepPlan> {
        match self {
            Self::Echo => vec![StepPlan::ok("echo", step)],
            Self::Steps => (1..=3)
                .map(|i| StepPlan::ok(format!("step_{i}"), step))
                .collect(),
            Self::Fail | Self::FailSilent => vec![StepPlan {
                fails: true,
                ..StepPlan::ok("fail_step", step)
            }],
            Self::Slow => vec![StepPlan::ok("sleep", slow_duration(&workload.raw))],
            Self::Progress => (1..=4)
                .map(|i| StepPlan {
                    progress: Some(f64::from(i) / 4.0),
                    ..StepPlan::ok(format!("stage_{i}"), step)
                })
                .collect(),
            Self::Lying => vec![StepPlan::ok("lie", step)],
            Self::Purge => vec![StepPlan::ok("purge", step)],
            Self::AuthLogin => vec![StepPlan::ok("auth0_login", step)],
            Self::AuthValidate => vec![StepPlan::ok("validate_session", step)],
            Self::AuthCheckAccess => vec![StepPlan::ok("check_access", step)],
        }
    }

    fn is_auth(self) -> bool {
        matches!(
            self,
            Self::AuthLogin | Self::AuthValidate | Self::AuthCheckAccess
        )
    }
}

/// `workload.seconds` as a duration, default 5 s, clamped to [0, 3600] s.
fn slow_duration(workload: &Value) -> Duration {
    let secs = workload
        .get("seconds")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite())
        .unwrap_or(SLOW_DEFAULT_SECS)
        .clamp(0.0, SLOW_MAX_SECS);
    Duration::from_secs_f64(secs)
}

/// A workload with the gateway's fields picked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// As given (stored verbatim in the execution record).
    pub raw: Value,
    /// `request_id` (a string; a number is taken as its decimal text).
    pub request_id: Option<String>,
    /// `gateway_url`, if it is an http(s) URL.
    pub gateway_url: Option<String>,
    /// `callback_token`, sent back as a bearer token.
    pub callback_token: Option<String>,
}

impl Workload {
    /// Picks the gateway's fields out of `raw` (any JSON: non-objects simply have none).
    pub fn parse(raw: Value) -> Self {
        let text = |key: &str| match raw.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let gateway_url =
            text("gateway_url").filter(|u| u.starts_with("http://") || u.starts_with("https://"));
        Self {
            request_id: text("request_id"),
            callback_token: text("callback_token"),
            gateway_url,
            raw,
        }
    }

    /// The caller's own fields: the workload without [`GATEWAY_KEYS`].
    pub fn user_fields(&self) -> Value {
        match &self.raw {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| !GATEWAY_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Map<_, _>>(),
            ),
            other => other.clone(),
        }
    }

    fn str_field(&self, keys: &[&str]) -> Option<&str> {
        keys.iter()
            .find_map(|k| self.raw.get(*k).and_then(Value::as_str))
    }

    /// Where to deliver, when the gateway asked for a callback.
    fn reply_to(&self) -> Option<(&str, &str)> {
        Some((self.gateway_url.as_deref()?, self.request_id.as_deref()?))
    }
}

/// How a run ended, as the gateway is told.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// A result for `/api/internal/callback/async`.
    Result {
        ok: bool,
        data: Option<Value>,
        error: Option<Value>,
    },
    /// An auth answer for `/api/internal/callback` (`status: success|error`).
    Auth { ok: bool, data: Value },
}

/// The run stopped because it is no longer RUNNING (cancelled).
struct Stopped;

/// Starts a run in the background; the task is registered so a cancel can abort it.
pub fn spawn(st: Shared, id: ExecutionId, playbook: Playbook, workload: Workload) {
    let runner = st.clone();
    let task = tokio::spawn(async move {
        if run(&runner, id, playbook, &workload).await.is_err() {
            tracing::info!(execution_id = %id, "run stopped (cancelled)");
        }
    });
    st.store.set_abort(id, task.abort_handle());
}

async fn run(st: &Shared, id: ExecutionId, pb: Playbook, wl: &Workload) -> Result<(), Stopped> {
    let vocabulary = st.store.vocabulary();
    let plan = pb.plan(wl, st.config.step_delay());
    // An auth playbook's step answers the question, and its result is the answer, as the
    // real `login_success` step returns the new session token: NoETL keeps step results
    // in its event table and publishes them with the row.
    let mut answer = pb.is_auth().then(|| auth_outcome(st, pb, wl));
    let step_result = match &answer {
        Some(Outcome::Auth { data, .. }) => data.clone(),
        _ => json!({ "status": "ok" }),
    };
    let mut run = Run {
        st,
        pb,
        wl,
        plan: &plan,
        vocabulary,
        step_result,
        commands: vec![None; plan.len()],
        last_step: None,
    };
    for beat in script(pb, &plan, vocabulary) {
        match beat {
            Beat::Emit { cue, step } => {
                let ev = run.event(cue, step);
                emit(st, id, ev)?;
            }
            Beat::Work { duration, .. } => tokio::time::sleep(duration).await,
            Beat::Progress { step, progress } => {
                report_progress(st, id, wl, &plan[step].name, progress, plan.len()).await;
            }
            Beat::End {
                status,
                cues,
                failed_step,
            } => {
                let last: Vec<NewEvent> = cues.iter().map(|&c| run.event(c, None)).collect();
                let outcome = match failed_step {
                    Some(i) => step_failure(&plan[i].name),
                    None => answer.take().unwrap_or_else(|| outcome(st, pb, wl)),
                };
                if st.store.finish(id, status, last) && pb != Playbook::FailSilent {
                    let step = run.last_step.map_or("", |i| plan[i].name.as_str());
                    deliver(st, id, wl, step, outcome).await;
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

fn emit(st: &Shared, id: ExecutionId, ev: NewEvent) -> Result<(), Stopped> {
    st.store.emit(id, ev).map(|_| ()).ok_or(Stopped)
}

/// What a run interpreting its script needs to turn a cue into an event.
struct Run<'a> {
    st: &'a Shared,
    pb: Playbook,
    wl: &'a Workload,
    plan: &'a [StepPlan],
    vocabulary: Vocabulary,
    /// What every step's call returns.
    step_result: Value,
    /// Each step's command id, made when its first command event is written.
    commands: Vec<Option<u64>>,
    /// The last step an event was written on.
    last_step: Option<usize>,
}

impl Run<'_> {
    /// The event for `cue` on step `step` (run-level when `None` or the cue is).
    fn event(&mut self, cue: Cue, step: Option<usize>) -> NewEvent {
        let path = self.pb.path();
        let step = step.filter(|_| cue.on_step);
        if step.is_some() {
            self.last_step = step;
        }
        let node = match step {
            Some(i) => self.plan[i].name.clone(),
            None => self.vocabulary.run_node(cue.kind, path),
        };
        let error = match cue.carries {
            Carries::StepError => json!({ "message": FAIL_MESSAGE, "status_code": 500 }),
            _ => Value::Null,
        };
        let mut ev = NewEvent::new(cue.kind, node);
        if let Some(i) = step.filter(|_| has_command(cue.kind)) {
            let ids = &self.st.ids;
            ev = ev.with_command(*self.commands[i].get_or_insert_with(|| ids.execution().0));
            if matches!(
                cue.kind,
                EventKind::CommandCompleted | EventKind::CommandFailed
            ) {
                ev = ev.with_duration(self.plan[i].duration);
            }
        }
        match cue.carries {
            Carries::StepResult => ev = ev.with_result(self.step_result.clone()),
            Carries::StepError => ev = ev.with_error(error.clone()),
            // Like the real server, the start event's context holds the workload, verbatim.
            Carries::Workload => ev = ev.with_context(json!({ "workload": self.wl.raw })),
            Carries::Nothing => {}
        }
        if self.vocabulary == Vocabulary::V4 {
            let first = self.plan.first().map(|s| s.name.as_str());
            let last = self.last_step.map(|i| self.plan[i].name.as_str());
            if let Some(context) =
                v4::lifecycle_context(cue.kind, path, &self.wl.raw, first, last, &error)
            {
                ev = ev.with_context(context);
            }
        }
        ev
    }
}

/// Events that belong to a step's command (and carry its id).
fn has_command(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::CommandIssued
            | EventKind::CommandClaimed
            | EventKind::CommandStarted
            | EventKind::CallDone
            | EventKind::CallError
            | EventKind::CommandCompleted
            | EventKind::CommandFailed
    )
}

/// The gateway's view of a failed step.
fn step_failure(step: &str) -> Outcome {
    Outcome::Result {
        ok: false,
        data: None,
        error: Some(json!({
            "code": "STEP_FAILED",
            "message": format!("{step}: {FAIL_MESSAGE}"),
            "data": { "step": step },
        })),
    }
}

/// What a run that played all its steps reports (auth playbooks answered in their step).
fn outcome(st: &Shared, pb: Playbook, wl: &Workload) -> Outcome {
    if pb.is_auth() {
        return auth_outcome(st, pb, wl);
    }
    let data = match pb {
        Playbook::Echo => wl.user_fields(),
        Playbook::Steps => json!({ "steps": 3, "workload": wl.user_fields() }),
        Playbook::Slow => json!({ "slept_seconds": slow_duration(&wl.raw).as_secs_f64() }),
        Playbook::Progress => json!({ "stages": 4 }),
        Playbook::Purge => json!({ "purged": 0 }),
        Playbook::Lying => {
            return Outcome::Result {
                ok: false,
                data: None,
                error: Some(json!({
                    "code": "STEP_FAILED",
                    "message": "lie: the run failed although playbook.completed was emitted",
                    "data": { "step": "lie" },
                })),
            }
        }
        _ => Value::Null,
    };
    Outcome::Result {
        ok: true,
        data: Some(data),
        error: None,
    }
}

/// The auth playbooks run the same logic as the REST routes.
fn auth_outcome(st: &Shared, pb: Playbook, wl: &Workload) -> Outcome {
    let missing = |field: &str| Outcome::Auth {
        ok: false,
        data: json!({ "error": "invalid_request", "message": format!("workload.{field} is required") }),
    };
    match pb {
        Playbook::AuthLogin => match wl.str_field(&["auth0_token", "id_token"]) {
            Some(token) => match auth::login(&st.idp, &st.sessions, token) {
                Ok(data) => Outcome::Auth { ok: true, data },
                Err(data) => Outcome::Auth { ok: false, data },
            },
            None => missing("auth0_token"),
        },
        Playbook::AuthValidate => match wl.str_field(&["session_token"]) {
            Some(token) => Outcome::Auth {
                ok: true,
                data: auth::validate(&st.sessions, token),
            },
            None => missing("session_token"),
        },
        _ => {
            let (Some(token), Some(path)) = (
                wl.str_field(&["session_token"]),
                wl.str_field(&["playbook_path"]),
            ) else {
                return missing("session_token and workload.playbook_path");
            };
            let action = wl
                .str_field(&["action", "permission_type"])
                .unwrap_or("execute");
            Outcome::Auth {
                ok: true,
                data: auth::check_access(&st.sessions, token, path, action),
            }
        }
    }
}

/// Sends the outcome to the gateway, if the workload asked for it.
async fn deliver(st: &Shared, id: ExecutionId, wl: &Workload, step: &str, outcome: Outcome) {
    let Some((gateway_url, request_id)) = wl.reply_to() else {
        tracing::debug!(execution_id = %id, "no gateway_url/request_id: no callback");
        return;
    };
    let (kind, body) = match outcome {
        Outcome::Result { ok, data, error } => {
            let mut body = json!({
                "request_id": request_id,
                "execution_id": id.to_string(),
                "step": step,
                "status": if ok { "COMPLETED" } else { "FAILED" },
            });
            if let Some(d) = data {
                body["data"] = d;
            }
            if let Some(e) = error {
                body["error"] = e;
            }
            (CallbackKind::Result, body)
        }
        Outcome::Auth { ok, data } => (
            CallbackKind::Auth,
            json!({
                "request_id": request_id,
                "execution_id": id.to_string(),
                "status": if ok { "success" } else { "error" },
                "data": data,
            }),
        ),
    };
    st.callbacks
        .send(kind, gateway_url, wl.callback_token.as_deref(), &body)
        .await;
}

async fn report_progress(
    st: &Shared,
    id: ExecutionId,
    wl: &Workload,
    step: &str,
    progress: f64,
    steps: usize,
) {
    let Some((gateway_url, request_id)) = wl.reply_to() else {
        return;
    };
    let body = json!({
        "request_id": request_id,
        "execution_id": id.to_string(),
        "step": step,
        "message": format!("{step} done ({:.0}% of {steps} stages)", progress * 100.0),
        "progress": progress,
    });
    st.callbacks
        .send(
            CallbackKind::Progress,
            gateway_url,
            wl.callback_token.as_deref(),
            &body,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalog_path_round_trips() {
        for pb in Playbook::all() {
            assert_eq!(Playbook::find(pb.path()), Some(*pb));
        }
        assert_eq!(Playbook::find("demo/nope"), None);
        assert_ne!(Playbook::Echo.catalog_id(), Playbook::Steps.catalog_id());
    }

    #[test]
    fn gateway_fields_are_picked_out_and_stripped() {
        let wl = Workload::parse(json!({
            "request_id": "r1", "gateway_url": "http://gw:1", "callback_token": "t",
            "greeting": "hi",
        }));
        assert_eq!(wl.request_id.as_deref(), Some("r1"));
        assert_eq!(wl.gateway_url.as_deref(), Some("http://gw:1"));
        assert_eq!(wl.callback_token.as_deref(), Some("t"));
        assert_eq!(wl.user_fields(), json!({ "greeting": "hi" }));
    }

    #[test]
    fn non_http_gateway_urls_and_odd_workloads_get_no_callback() {
        let wl = Workload::parse(json!({ "request_id": "r", "gateway_url": "file:///etc/passwd" }));
        assert_eq!(wl.reply_to(), None);
        let wl = Workload::parse(json!("just a string"));
        assert_eq!(wl.reply_to(), None);
        assert_eq!(wl.user_fields(), json!("just a string"));
    }

    #[test]
    fn slow_seconds_default_and_clamp() {
        assert_eq!(slow_duration(&json!({})), Duration::from_secs(5));
        assert_eq!(
            slow_duration(&json!({ "seconds": 0.5 })),
            Duration::from_millis(500)
        );
        assert_eq!(
            slow_duration(&json!({ "seconds": 1e9 })),
            Duration::from_secs(3600)
        );
        assert_eq!(slow_duration(&json!({ "seconds": -3 })), Duration::ZERO);
        assert_eq!(
            slow_duration(&json!({ "seconds": "x" })),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn plans_match_the_documented_steps() {
        let wl = Workload::parse(json!({}));
        let names = |pb: Playbook| -> Vec<String> {
            pb.plan(&wl, Duration::ZERO)
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(names(Playbook::Steps), ["step_1", "step_2", "step_3"]);
        assert_eq!(names(Playbook::Fail), ["fail_step"]);
        let progress: Vec<Option<f64>> = Playbook::Progress
            .plan(&wl, Duration::ZERO)
            .into_iter()
            .map(|s| s.progress)
            .collect();
        assert_eq!(progress, [Some(0.25), Some(0.5), Some(0.75), Some(1.0)]);
    }
}
