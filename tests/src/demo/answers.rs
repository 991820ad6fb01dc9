//! What the gateway delivered to `POST /answers`: every delivery as it arrived (duplicates
//! included, so a test can count them) and each question's outcome, the first delivery's;
//! and [`Refusals`], the deliveries a test asked the service to refuse (to see the gateway
//! retry).
//!
//! Pure and bounded: the newest [`MAX_DELIVERIES`] deliveries and [`MAX_QUESTIONS`]
//! outcomes are kept, older ones dropped, so a long `make dev` session cannot grow it
//! without end.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};

/// Most deliveries kept (oldest dropped first).
pub const MAX_DELIVERIES: usize = 10_000;
/// Most question outcomes kept (oldest dropped first).
pub const MAX_QUESTIONS: usize = 10_000;

/// One `POST /answers` as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The body's `question_id`.
    pub question_id: String,
    /// The `idempotency-key` header (`None` if absent).
    pub idempotency_key: Option<String>,
    /// The whole JSON body.
    pub body: Value,
}

/// How a question ended, as the gateway told it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Someone answered: the delivery's whole body (`answer`, `user`, `client_id`,
    /// `answered_at`).
    Answered(Value),
    /// Nobody answered in time: the delivery's whole body (`expired_at`).
    Expired(Value),
}

impl Outcome {
    /// The body of `GET /answers/{question_id}`: `{question_id, status, answer, user}`,
    /// `answer` and `user` null for an expired question, plus the delivery's other fields.
    pub fn to_json(&self) -> Value {
        let (mut out, body) = match self {
            Self::Answered(body) => (
                json!({"status": "answered", "answer": body["answer"], "user": body["user"]}),
                body,
            ),
            Self::Expired(body) => (
                json!({"status": "expired", "answer": null, "user": null}),
                body,
            ),
        };
        if let (Some(out), Some(body)) = (out.as_object_mut(), body.as_object()) {
            for (k, v) in body {
                out.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        out
    }
}

/// The record of deliveries and outcomes.
#[derive(Debug, Default)]
pub struct Answers {
    deliveries: VecDeque<Delivery>,
    outcomes: HashMap<String, Outcome>,
    /// Question ids in the order their outcome was first recorded (for eviction).
    order: VecDeque<String>,
}

impl Answers {
    /// Records one delivery; the first delivery of a question decides its outcome (the
    /// gateway delivers at least once, so later ones are duplicates). A body that is not
    /// `{"question_id": <non-empty string>, "status": "answered" | "expired", …}` is refused
    /// with the reason and not recorded.
    pub fn record(&mut self, idempotency_key: Option<String>, body: Value) -> Result<(), String> {
        let question_id = match body.get("question_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => return Err("the body has no question_id string".into()),
        };
        let outcome = match body.get("status").and_then(Value::as_str) {
            Some("answered") => Outcome::Answered(body.clone()),
            Some("expired") => Outcome::Expired(body.clone()),
            other => {
                return Err(format!(
                    "status {other:?} is neither \"answered\" nor \"expired\""
                ))
            }
        };
        if !self.outcomes.contains_key(&question_id) {
            if self.order.len() >= MAX_QUESTIONS {
                if let Some(old) = self.order.pop_front() {
                    self.outcomes.remove(&old);
                }
            }
            self.order.push_back(question_id.clone());
            self.outcomes.insert(question_id.clone(), outcome);
        }
        if self.deliveries.len() >= MAX_DELIVERIES {
            self.deliveries.pop_front();
        }
        self.deliveries.push_back(Delivery {
            question_id,
            idempotency_key,
            body,
        });
        Ok(())
    }

    /// The outcome of a question, if one was delivered.
    pub fn outcome(&self, question_id: &str) -> Option<&Outcome> {
        self.outcomes.get(question_id)
    }

    /// Every delivery kept, oldest first.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.iter().cloned().collect()
    }
}

/// Deliveries to refuse: the next `remaining` are answered `status` and not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Refusals {
    /// How many of the next deliveries are refused.
    pub remaining: u32,
    /// The status they are answered (a 5xx or 429 makes the gateway retry).
    pub status: u16,
    /// How many were refused since start.
    pub refused: u64,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            remaining: 0,
            status: 503,
            refused: 0,
        }
    }
}

impl Refusals {
    /// Refuses the next `count` deliveries with `status`.
    pub fn refuse_next(&mut self, count: u32, status: u16) {
        self.remaining = count;
        self.status = status;
    }

    /// Whether this delivery is refused, and with which status (counted).
    pub fn take(&mut self) -> Option<u16> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        self.refused += 1;
        Some(self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(id: &str, answer: &str) -> Value {
        json!({"question_id": id, "status": "answered", "answer": answer,
               "user": {"user_id": "u1", "email": "ada@example.com"},
               "client_id": "c1", "answered_at": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn an_unknown_question_has_no_outcome() {
        assert_eq!(Answers::default().outcome("q-1"), None);
    }

    #[test]
    fn the_first_delivery_decides_and_duplicates_are_still_listed() {
        let mut a = Answers::default();
        a.record(Some("q-1".into()), answered("q-1", "yes"))
            .unwrap();
        a.record(Some("q-1".into()), answered("q-1", "no")).unwrap();
        let out = a.outcome("q-1").unwrap().to_json();
        assert_eq!(out["status"], "answered");
        assert_eq!(out["answer"], "yes");
        assert_eq!(out["user"]["email"], "ada@example.com");
        assert_eq!(out["client_id"], "c1");
        let all = a.deliveries();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].body["answer"], "no");
        assert_eq!(all[0].idempotency_key.as_deref(), Some("q-1"));
    }

    #[test]
    fn an_expiry_reads_as_null_answer_and_user() {
        let mut a = Answers::default();
        a.record(
            None,
            json!({"question_id": "q-2", "status": "expired", "expired_at": "t"}),
        )
        .unwrap();
        let out = a.outcome("q-2").unwrap().to_json();
        assert_eq!(
            out,
            json!({"question_id": "q-2", "status": "expired", "answer": null, "user": null, "expired_at": "t"})
        );
    }

    #[test]
    fn malformed_deliveries_are_refused_and_not_recorded() {
        let mut a = Answers::default();
        for bad in [
            json!({}),
            json!([1]),
            json!({"question_id": "", "status": "answered"}),
            json!({"question_id": 7, "status": "answered"}),
            json!({"question_id": "q", "status": "maybe"}),
            json!({"question_id": "q"}),
        ] {
            assert!(a.record(None, bad.clone()).is_err(), "{bad}");
        }
        assert!(a.deliveries().is_empty());
        assert_eq!(a.outcome("q"), None);
    }

    #[test]
    fn refusals_are_counted_down_then_deliveries_pass() {
        let mut r = Refusals::default();
        assert_eq!(r.take(), None);
        r.refuse_next(2, 500);
        assert_eq!(r.take(), Some(500));
        assert_eq!(r.take(), Some(500));
        assert_eq!(r.take(), None);
        assert_eq!(r.refused, 2);
    }

    #[test]
    fn the_record_is_bounded_oldest_first() {
        let mut a = Answers::default();
        for i in 0..MAX_QUESTIONS + 1 {
            a.record(None, answered(&format!("q-{i}"), "yes")).unwrap();
        }
        assert_eq!(a.outcome("q-0"), None);
        assert!(a.outcome(&format!("q-{MAX_QUESTIONS}")).is_some());
        assert_eq!(a.deliveries().len(), MAX_DELIVERIES);
        assert_eq!(a.deliveries()[0].question_id, "q-1");
    }
}
