//! A run as data: the beats a playbook's plan plays in one event vocabulary.
//!
//! [`script`] is pure: which events a run writes, in which order, where the call's time
//! passes, where progress is reported and how the run ends. The runner in
//! [`super::playbooks`] only interprets the beats (ids, results, sleeps, callbacks), so
//! every playbook's sequence per shape is unit-tested here without a server.

use super::events::{Cue, Vocabulary};
use super::playbooks::{Playbook, StepPlan};
use super::store::ExecStatus;
use std::time::Duration;

/// One thing a run does.
#[derive(Debug, Clone, PartialEq)]
pub enum Beat {
    /// Write one event; `step` is the plan index when the event is on a step.
    Emit {
        /// The event.
        cue: Cue,
        /// The step it belongs to (also for run-level events written mid-step: none are).
        step: Option<usize>,
    },
    /// Step `step`'s call runs for `duration`.
    Work {
        /// The plan index.
        step: usize,
        /// How long.
        duration: Duration,
    },
    /// A progress report after step `step`.
    Progress {
        /// The plan index.
        step: usize,
        /// The fraction done.
        progress: f64,
    },
    /// The run ends with `status`, writing `cues` atomically with the status change;
    /// `failed_step` names the step whose call failed, if one did.
    End {
        /// The final status (FAILED for `demo/lying`, whose events say completed).
        status: ExecStatus,
        /// The terminal events.
        cues: &'static [Cue],
        /// The failed step's plan index.
        failed_step: Option<usize>,
    },
}

/// The beats of `playbook` playing `plan` in `vocabulary`; the last beat is always
/// [`Beat::End`].
pub fn script(playbook: Playbook, plan: &[StepPlan], vocabulary: Vocabulary) -> Vec<Beat> {
    let emit = |cues: &'static [Cue], step: Option<usize>| {
        cues.iter().map(move |&cue| Beat::Emit { cue, step })
    };
    let mut beats: Vec<Beat> = emit(vocabulary.start(), None).collect();
    for (i, s) in plan.iter().enumerate() {
        beats.extend(emit(vocabulary.step_begin(), Some(i)));
        beats.push(Beat::Work {
            step: i,
            duration: s.duration,
        });
        if s.fails {
            beats.extend(emit(vocabulary.step_failed(), Some(i)));
            beats.push(Beat::End {
                status: ExecStatus::Failed,
                cues: vocabulary.run_failed(),
                failed_step: Some(i),
            });
            return beats;
        }
        beats.extend(emit(vocabulary.step_done(), Some(i)));
        if let Some(progress) = s.progress {
            beats.push(Beat::Progress { step: i, progress });
        }
    }
    // demo/lying emits the completed events yet ends FAILED: the trap the bridge must catch.
    let status = if playbook == Playbook::Lying {
        ExecStatus::Failed
    } else {
        ExecStatus::Completed
    };
    beats.push(Beat::End {
        status,
        cues: vocabulary.run_completed(),
        failed_step: None,
    });
    beats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standin::playbooks::Workload;
    use serde_json::json;

    /// `(event_type, node_name)` of every event a script writes, terminal ones included.
    fn events(pb: Playbook, vocabulary: Vocabulary) -> Vec<(&'static str, String)> {
        let plan = pb.plan(&Workload::parse(json!({})), Duration::ZERO);
        let node = |cue: &Cue, step: Option<usize>| match step {
            Some(i) if cue.on_step => plan[i].name.clone(),
            _ => vocabulary.run_node(cue.kind, pb.path()),
        };
        let mut out = Vec::new();
        for beat in script(pb, &plan, vocabulary) {
            match beat {
                Beat::Emit { cue, step } => out.push((cue.kind.event_type(), node(&cue, step))),
                Beat::End { cues, .. } => {
                    out.extend(cues.iter().map(|c| (c.kind.event_type(), node(c, None))));
                }
                _ => {}
            }
        }
        out
    }

    fn end(pb: Playbook, vocabulary: Vocabulary) -> (ExecStatus, Option<usize>) {
        let plan = pb.plan(&Workload::parse(json!({})), Duration::ZERO);
        match script(pb, &plan, vocabulary).pop() {
            Some(Beat::End {
                status,
                failed_step,
                ..
            }) => (status, failed_step),
            other => panic!("a script ends with End, not {other:?}"),
        }
    }

    fn on(step: &str, types: &[&'static str]) -> Vec<(&'static str, String)> {
        types.iter().map(|t| (*t, step.to_owned())).collect()
    }

    const RUST_OK: [&str; 6] = [
        "command.issued",
        "command.claimed",
        "command.started",
        "call.done",
        "command.completed",
        "step.enter",
    ];
    const V4_OK: [&str; 7] = [
        "command.issued",
        "command.claimed",
        "command.started",
        "step.enter",
        "call.done",
        "step.exit",
        "command.completed",
    ];

    fn rust_run(pb: Playbook, steps: &[&str]) -> Vec<(&'static str, String)> {
        let mut want = on(pb.path(), &["playbook_started"]);
        for s in steps {
            want.extend(on(s, &RUST_OK));
        }
        want.extend(on(pb.path(), &["playbook.completed"]));
        want
    }

    fn v4_run(pb: Playbook, steps: &[&str]) -> Vec<(&'static str, String)> {
        let mut want = on(pb.path(), &["playbook.initialized"]);
        want.extend(on("workflow", &["workflow.initialized"]));
        for s in steps {
            want.extend(on(s, &V4_OK));
        }
        want.extend(on("workflow", &["workflow.completed"]));
        want.extend(on(pb.path(), &["playbook.completed"]));
        want
    }

    #[test]
    fn every_completing_playbook_plays_each_step_in_the_servers_order() {
        let cases: [(Playbook, &[&str]); 8] = [
            (Playbook::Echo, &["echo"]),
            (Playbook::Steps, &["step_1", "step_2", "step_3"]),
            (Playbook::Slow, &["sleep"]),
            (
                Playbook::Progress,
                &["stage_1", "stage_2", "stage_3", "stage_4"],
            ),
            (Playbook::Purge, &["purge"]),
            (Playbook::AuthLogin, &["auth0_login"]),
            (Playbook::AuthValidate, &["validate_session"]),
            (Playbook::AuthCheckAccess, &["check_access"]),
        ];
        for (pb, steps) in cases {
            assert_eq!(events(pb, Vocabulary::Rust), rust_run(pb, steps), "{pb:?}");
            assert_eq!(events(pb, Vocabulary::V4), v4_run(pb, steps), "{pb:?}");
            for vocabulary in [Vocabulary::Rust, Vocabulary::V4] {
                assert_eq!(end(pb, vocabulary), (ExecStatus::Completed, None));
            }
        }
    }

    #[test]
    fn demo_fail_has_no_terminal_event_on_the_rust_server_and_both_spellings_on_4x() {
        let rust = events(Playbook::Fail, Vocabulary::Rust);
        let mut want = on("demo/fail", &["playbook_started"]);
        want.extend(on(
            "fail_step",
            &[
                "command.issued",
                "command.claimed",
                "command.started",
                "call.error",
                "command.failed",
            ],
        ));
        assert_eq!(rust, want);

        let v4 = events(Playbook::Fail, Vocabulary::V4);
        let mut want = on("demo/fail", &["playbook.initialized"]);
        want.extend(on("workflow", &["workflow.initialized"]));
        want.extend(on(
            "fail_step",
            &[
                "command.issued",
                "command.claimed",
                "command.started",
                "step.enter",
                "call.error",
                "step.exit",
                "command.failed",
            ],
        ));
        want.extend(on("workflow", &["workflow.failed"]));
        want.extend(on("demo/fail", &["playbook.failed"]));
        assert_eq!(v4, want);
        for vocabulary in [Vocabulary::Rust, Vocabulary::V4] {
            assert_eq!(
                end(Playbook::Fail, vocabulary),
                (ExecStatus::Failed, Some(0))
            );
        }
    }

    #[test]
    fn the_lying_run_says_completed_in_both_vocabularies_and_ends_failed() {
        assert_eq!(
            events(Playbook::Lying, Vocabulary::Rust),
            rust_run(Playbook::Lying, &["lie"])
        );
        assert_eq!(
            events(Playbook::Lying, Vocabulary::V4),
            v4_run(Playbook::Lying, &["lie"])
        );
        for vocabulary in [Vocabulary::Rust, Vocabulary::V4] {
            assert_eq!(end(Playbook::Lying, vocabulary), (ExecStatus::Failed, None));
        }
    }

    #[test]
    fn the_call_time_passes_between_begin_and_result_and_progress_follows_the_step() {
        let plan = Playbook::Progress.plan(&Workload::parse(json!({})), Duration::from_millis(7));
        let beats = script(Playbook::Progress, &plan, Vocabulary::V4);
        let shape: Vec<String> = beats
            .iter()
            .map(|b| match b {
                Beat::Emit { cue, .. } => cue.kind.event_type().to_owned(),
                Beat::Work { step, duration } => format!("work {step} {duration:?}"),
                Beat::Progress { step, progress } => format!("progress {step} {progress}"),
                Beat::End { .. } => "end".to_owned(),
            })
            .collect();
        let first = shape
            .iter()
            .position(|s| s == "work 0 7ms")
            .expect("step 0 works");
        assert_eq!(shape[first - 1], "step.enter");
        assert_eq!(shape[first + 1], "call.done");
        assert_eq!(shape[first + 4], "progress 0 0.25");
        assert_eq!(shape.last().map(String::as_str), Some("end"));
        assert_eq!(
            shape.iter().filter(|s| s.starts_with("progress")).count(),
            4
        );
    }
}
