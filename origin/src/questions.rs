//! Human-in-the-loop questions (PROTOCOL.md §3, §4): a backend service asks a user's client
//! a question, the client's owner answers it, and the answer goes back to the service.
//!
//! - **Ask** — `POST /api/internal/questions` (internal listener, service token): the target
//!   (a client, a client of a named user, or all of a user's active clients), the prompt,
//!   the options (none: free text), a timeout (capped by `QUESTION_MAX_TIMEOUT`) and where
//!   the outcome goes (`reply_to.url`, which must lie under a registered service's base
//!   URL). The question is stored in K/V `questions` (`q.<id>`), then published as a
//!   `question` frame on each target client's stream — retained and replayed like every
//!   frame — and listed in the init frame's `pendingQuestions` while it is open.
//! - **Answer** — `POST /api/v1/events/{client_id}/response` (the client's owner only; any
//!   other caller, client or question is 404 `question_not_found`) or GraphQL
//!   `answerQuestion`. The first answer wins across replicas: the outcome is an atomic K/V
//!   create of `final.<id>`; a later answer, or one after expiry, is 409 `question_closed`.
//!   Every target client gets `question/answered` (another tab closes its card).
//! - **Expire** — every replica sweeps the questions it knows (a watch on the bucket keeps
//!   its index); the one whose create of `final.<id>` wins publishes `question/expired`
//!   and the asker gets a timeout notice.
//! - **Deliver, at least once** — the outcome is POSTed to `reply_to.url` with
//!   `idempotency-key: <question_id>` (the asker dedupes) until it answers 2xx, then
//!   `done.<id>` is written. One replica delivers at a time (a K/V lease, `lease.<id>`); a
//!   replica that dies mid-delivery leaves the lease to expire and another one's sweep
//!   delivers. Attempts back off (1 s, 2 s, … 30 s) for up to [`DELIVERY_WINDOW`] after the
//!   question's expiry, which the bucket's TTL covers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use gateway_shared::frames::{event, notification, QuestionParams};
use gateway_shared::ids::ClientId;
use gateway_shared::session::User;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::auth::session::SessionService;
use crate::auth::Caller;
use crate::bus::Bus;
use crate::clients;
use crate::config::Secret;
use crate::error::{json_response, AppError};
use crate::extract::{read_json, BodyLimit};
use crate::service_events::{check_service_token, resolve_targets};
use crate::store::{Bucket, BucketWatchItem, KvEvent, KvStore};
use crate::upstream::ServiceClient;
use gateway_shared::error::ErrorBody;

/// How long after a question's expiry its outcome is still delivered (and its records
/// kept): the bucket's TTL is `QUESTION_MAX_TIMEOUT` plus this.
pub const DELIVERY_WINDOW: Duration = Duration::from_secs(3600);

/// One delivery attempt's timeout.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one replica holds a question's delivery before another may take it.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// The longest wait between two delivery attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often each replica sweeps for expired questions and undelivered outcomes.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// An outcome younger than this is left to the replica that made it (it delivers at once).
const HANDOVER_AFTER: Duration = Duration::from_secs(3);
/// The longest prompt, option, free-text answer; the most options.
const MAX_PROMPT: usize = 4000;
const MAX_OPTION: usize = 200;
const MAX_OPTIONS: usize = 20;
const MAX_ANSWER: usize = 4000;
/// Open questions one replica indexes; beyond it new questions are refused (503).
const MAX_OPEN: usize = 100_000;

/// Where an outcome goes: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyTo {
    /// A URL under a registered service's base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A NATS subject captured by the asker's JetStream stream (not the gateway's nor
    /// NoETL's subjects: [`is_reply_subject`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// True for a subject a service may have outcomes published to: dot-separated tokens of
/// `[A-Za-z0-9_-]`, at most 256 bytes, no wildcard, and not under `$` (NATS's own APIs,
/// K/V buckets), `gateway.` (the clients' frames) or `noetl.` (NoETL's events, which the
/// bridge reads): a service must not be able to forge either.
pub fn is_reply_subject(subject: &str) -> bool {
    let tokens_ok = subject.split('.').all(|t| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    let lower = subject.to_ascii_lowercase();
    !subject.is_empty()
        && subject.len() <= 256
        && tokens_ok
        && !lower.starts_with("gateway.")
        && !lower.starts_with("noetl.")
        && !lower.starts_with('$')
}

/// A stored question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// `q-` and 32 hex digits.
    pub question_id: String,
    /// The asking service.
    pub service: String,
    /// The user who may answer.
    pub user_id: String,
    /// The clients asked; empty: every client of the user.
    pub client_ids: Vec<ClientId>,
    /// The question.
    pub prompt: String,
    /// Accepted answers; empty: any text.
    pub options: Vec<String>,
    /// The service's own data, returned with the outcome.
    #[serde(default)]
    pub context: Value,
    /// Expiry, Unix milliseconds.
    pub expires_at_ms: i64,
    /// Where the outcome goes.
    pub reply_to: ReplyTo,
}

impl Question {
    /// The question as the client sees it (`question` frame, `pendingQuestions`).
    pub fn params(&self) -> QuestionParams {
        QuestionParams {
            question_id: self.question_id.clone(),
            prompt: self.prompt.clone(),
            options: self.options.clone(),
            expires_at: rfc3339(self.expires_at_ms),
            service: self.service.clone(),
            client_id: match self.client_ids.as_slice() {
                [one] => Some(one.to_string()),
                _ => None,
            },
        }
    }

    /// True if `client_id` of `user_id` was asked.
    pub fn asks(&self, user_id: &str, client_id: &ClientId) -> bool {
        self.user_id == user_id
            && (self.client_ids.is_empty() || self.client_ids.contains(client_id))
    }
}

/// A question's one outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `answered` or `expired`.
    pub status: String,
    /// The answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Who answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Answerer>,
    /// From which client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// When, Unix milliseconds.
    pub at_ms: i64,
}

/// The user who answered, as the asker is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answerer {
    /// NoETL's user id.
    pub user_id: String,
    /// Their email.
    pub email: String,
}

impl Outcome {
    /// The body POSTed to the asker.
    pub fn delivery_body(&self, q: &Question) -> Value {
        let mut body = if self.status == "answered" {
            json!({
                "question_id": q.question_id,
                "status": "answered",
                "answer": self.answer,
                "user": self.user,
                "client_id": self.client_id,
                "answered_at": rfc3339(self.at_ms),
            })
        } else {
            json!({
                "question_id": q.question_id,
                "status": "expired",
                "expired_at": rfc3339(self.at_ms),
            })
        };
        if !q.context.is_null() {
            body["context"] = q.context.clone();
        }
        body
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

fn new_question_id() -> String {
    format!("q-{}", uuid::Uuid::new_v4().simple())
}

/// True for a question id the gateway could have made (`q-` and 32 lowercase hex digits).
pub fn is_question_id(id: &str) -> bool {
    id.len() == 34
        && id.starts_with("q-")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What this replica knows of the bucket (fed by its watch).
#[derive(Debug, Default)]
struct Index {
    questions: HashMap<String, Question>,
    finals: HashMap<String, Outcome>,
    done: HashSet<String>,
    /// Local delivery state: attempts made and when the next may start.
    retry: HashMap<String, (u32, tokio::time::Instant)>,
    /// Deliveries running on this replica.
    inflight: HashSet<String>,
}

/// The question service of one replica.
pub struct Questions {
    kv: Arc<dyn KvStore>,
    bus: Arc<dyn Bus>,
    /// Registered services' clients, by base URL (a `reply_to.url` must be under one).
    services: Vec<ServiceClient>,
    default_timeout: Duration,
    max_timeout: Duration,
    holder: String,
    index: Mutex<Index>,
}

/// A question as a service asks it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    service: String,
    client_id: Option<String>,
    user_id: Option<String>,
    prompt: String,
    #[serde(default)]
    options: Vec<String>,
    timeout_seconds: Option<u64>,
    reply_to: ReplyTo,
    #[serde(default)]
    context: Value,
}

/// A client's answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    question_id: String,
    answer: String,
}

impl Questions {
    /// The service over the shared store and bus; `services` are the registered services'
    /// clients (answers are delivered through them).
    pub fn new(
        kv: Arc<dyn KvStore>,
        bus: Arc<dyn Bus>,
        services: Vec<ServiceClient>,
        default_timeout: Duration,
        max_timeout: Duration,
    ) -> Self {
        Self {
            kv,
            bus,
            services,
            default_timeout: default_timeout.min(max_timeout),
            max_timeout,
            holder: format!("questions-{}", uuid::Uuid::new_v4().simple()),
            index: Mutex::new(Index::default()),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The service client whose base URL `url` lies under.
    fn service_for(&self, url: &Url) -> Option<&ServiceClient> {
        self.services.iter().find(|s| {
            let base = s.base_url();
            let same_origin = url.scheme() == base.scheme()
                && url.host_str() == base.host_str()
                && url.port_or_known_default() == base.port_or_known_default();
            let root = base.path().trim_end_matches('/');
            let path = url.path();
            same_origin
                && (path == root
                    || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/')))
        })
    }

    /// The open questions `client_id` of `user_id` was asked, oldest expiry first.
    pub fn pending_for(&self, user_id: &str, client_id: &ClientId) -> Vec<QuestionParams> {
        let now = now_ms();
        let index = self.index();
        let mut open: Vec<&Question> = index
            .questions
            .values()
            .filter(|q| {
                q.asks(user_id, client_id)
                    && q.expires_at_ms > now
                    && !index.finals.contains_key(&q.question_id)
            })
            .collect();
        open.sort_by_key(|q| q.expires_at_ms);
        open.into_iter().map(Question::params).collect()
    }

    async fn ask(&self, b: AskBody) -> Result<(String, String), AppError> {
        if !crate::services::is_valid_name(&b.service) {
            return Err(AppError::bad_request(
                "invalid_service",
                "service must be a service name",
            ));
        }
        let prompt = b.prompt.trim();
        if prompt.is_empty() || prompt.chars().count() > MAX_PROMPT {
            return Err(AppError::bad_request(
                "invalid_prompt",
                format!("prompt must be 1–{MAX_PROMPT} characters"),
            ));
        }
        if b.options.len() > MAX_OPTIONS
            || b.options
                .iter()
                .any(|o| o.trim().is_empty() || o.chars().count() > MAX_OPTION)
        {
            return Err(AppError::bad_request(
                "invalid_options",
                format!("at most {MAX_OPTIONS} options of 1–{MAX_OPTION} characters"),
            ));
        }
        match (&b.reply_to.url, &b.reply_to.subject) {
            (Some(url), None) => {
                let reply_url = Url::parse(url).ok();
                if reply_url
                    .as_ref()
                    .and_then(|u| self.service_for(u))
                    .is_none()
                {
                    return Err(AppError::bad_request(
                        "reply_to_not_allowed",
                        "reply_to.url must lie under a registered service's base URL",
                    ));
                }
            }
            (None, Some(subject)) => {
                if !is_reply_subject(subject) {
                    return Err(AppError::bad_request(
                        "reply_to_not_allowed",
                        "reply_to.subject must be a plain NATS subject outside gateway.*, noetl.* and $*",
                    ));
                }
                if !self.bus.has_external_subjects() {
                    return Err(AppError::bad_request(
                        "reply_to_not_supported",
                        "this gateway runs without NATS: reply_to.subject cannot be used",
                    ));
                }
            }
            _ => {
                return Err(AppError::bad_request(
                    "invalid_reply_to",
                    "reply_to names exactly one of url or subject",
                ))
            }
        }
        if self.index().questions.len() >= MAX_OPEN {
            return Err(AppError::Unavailable {
                code: "too_many_questions",
                message: "too many open questions; try again later".into(),
            });
        }
        let timeout = b
            .timeout_seconds
            .map_or(self.default_timeout, Duration::from_secs)
            .clamp(Duration::from_secs(1), self.max_timeout);
        // The user the question is for: named, or the named client's owner.
        let targets = resolve_targets(
            self.kv.as_ref(),
            b.client_id.as_deref(),
            b.user_id.as_deref(),
            None,
        )
        .await?;
        let user_id = match (&b.user_id, &b.client_id) {
            (Some(u), _) => u.clone(),
            (None, Some(_)) => {
                let record = clients::get(self.kv.as_ref(), &targets[0]).await?;
                record
                    .map(|r| r.user_id)
                    .ok_or_else(|| AppError::not_found("client_not_found", "no such client"))?
            }
            (None, None) => unreachable!("resolve_targets refuses a question without a target"),
        };
        let question = Question {
            question_id: new_question_id(),
            service: b.service,
            user_id,
            client_ids: if b.client_id.is_some() {
                targets.clone()
            } else {
                Vec::new()
            },
            prompt: prompt.to_owned(),
            options: b.options.iter().map(|o| o.trim().to_owned()).collect(),
            context: b.context,
            expires_at_ms: now_ms() + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
            reply_to: b.reply_to,
        };
        let id = question.question_id.clone();
        let raw = serde_json::to_vec(&question).expect("a question always serialises");
        self.kv
            .put(Bucket::Questions, &format!("q.{id}"), Bytes::from(raw))
            .await?;
        self.index().questions.insert(id.clone(), question.clone());
        let frame = Bytes::from(notification(event::QUESTION, &question.params()));
        for client in &targets {
            self.bus
                .publish_once(
                    client,
                    event::QUESTION,
                    frame.clone(),
                    &format!("{id}.{client}"),
                )
                .await
                .map_err(|e| AppError::Unavailable {
                    code: "bus_unavailable",
                    message: format!("the question could not be published: {e}"),
                })?;
        }
        crate::metrics::global().question("asked");
        tracing::info!(question = %id, service = %question.service, user = %question.user_id, clients = targets.len(), "question asked");
        Ok((id, rfc3339(question.expires_at_ms)))
    }

    async fn question(&self, id: &str) -> Result<Option<Question>, AppError> {
        Ok(self
            .kv
            .get(Bucket::Questions, &format!("q.{id}"))
            .await?
            .and_then(|raw| serde_json::from_slice(&raw).ok()))
    }

    /// `user`'s answer from `client_id`: the first one wins (module docs).
    pub async fn answer(
        self: &Arc<Self>,
        user: &User,
        client_id: &str,
        question_id: &str,
        answer: &str,
    ) -> Result<(), AppError> {
        let not_found = || {
            AppError::not_found(
                "question_not_found",
                "no such open question for this client",
            )
        };
        let client = ClientId::parse(client_id).map_err(|_| not_found())?;
        if !is_question_id(question_id) {
            return Err(not_found());
        }
        let owner = clients::get(self.kv.as_ref(), &client).await?;
        if owner.is_none_or(|r| r.user_id != user.user_id) {
            return Err(not_found());
        }
        let q = self.question(question_id).await?.ok_or_else(not_found)?;
        if !q.asks(&user.user_id, &client) {
            return Err(not_found());
        }
        let answer = answer.trim();
        if answer.is_empty() || answer.chars().count() > MAX_ANSWER {
            return Err(AppError::bad_request(
                "invalid_answer",
                format!("the answer must be 1–{MAX_ANSWER} characters"),
            ));
        }
        if !q.options.is_empty() && !q.options.iter().any(|o| o == answer) {
            return Err(AppError::bad_request(
                "invalid_answer",
                "the answer is not one of the question's options",
            ));
        }
        let closed = || {
            AppError::conflict(
                "question_closed",
                "the question was already answered or has expired",
            )
        };
        if now_ms() >= q.expires_at_ms {
            return Err(closed());
        }
        let outcome = Outcome {
            status: "answered".into(),
            answer: Some(answer.to_owned()),
            user: Some(Answerer {
                user_id: user.user_id.clone(),
                email: user.email.clone(),
            }),
            client_id: Some(client.to_string()),
            at_ms: now_ms(),
        };
        if !self.settle(&q, &outcome).await? {
            return Err(closed());
        }
        crate::metrics::global().question("answered");
        tracing::info!(question = %q.question_id, user = %user.user_id, client = %client, "question answered");
        let frame = Bytes::from(notification(
            event::QUESTION_ANSWERED,
            &json!({"question_id": q.question_id, "answer": answer}),
        ));
        self.tell_clients(&q, event::QUESTION_ANSWERED, frame).await;
        let me = self.clone();
        let id = q.question_id.clone();
        tokio::spawn(async move { me.deliver(&id).await });
        Ok(())
    }

    /// Writes the question's one outcome; false if it already had one.
    async fn settle(&self, q: &Question, outcome: &Outcome) -> Result<bool, AppError> {
        let raw = serde_json::to_vec(outcome).expect("an outcome always serialises");
        let won = self
            .kv
            .create(
                Bucket::Questions,
                &format!("final.{}", q.question_id),
                Bytes::from(raw),
            )
            .await?;
        if won {
            self.index()
                .finals
                .insert(q.question_id.clone(), outcome.clone());
        }
        Ok(won)
    }

    /// Publishes `frame` to the clients asked (a user-wide question: the user's active
    /// clients now). Failures are logged: the outcome is settled and delivered anyway.
    async fn tell_clients(&self, q: &Question, name: &str, frame: Bytes) {
        let clients = if q.client_ids.is_empty() {
            clients::active_clients_of(self.kv.as_ref(), &q.user_id)
                .await
                .unwrap_or_default()
        } else {
            q.client_ids.clone()
        };
        for client in &clients {
            let key = format!("{}.{name}.{client}", q.question_id);
            if let Err(e) = self
                .bus
                .publish_once(client, name, frame.clone(), &key)
                .await
            {
                tracing::warn!(question = %q.question_id, client = %client, error = %e, "question frame not published");
            }
        }
    }

    /// One delivery attempt of the question's outcome, if this replica gets the lease.
    async fn deliver(&self, id: &str) {
        {
            let mut index = self.index();
            if index.done.contains(id) || !index.inflight.insert(id.to_owned()) {
                return;
            }
        }
        let result = self.try_deliver(id).await;
        let mut index = self.index();
        index.inflight.remove(id);
        match result {
            Ok(true) => {
                index.done.insert(id.to_owned());
                index.retry.remove(id);
            }
            Ok(false) => {}
            Err(e) => {
                let (n, _) = index
                    .retry
                    .get(id)
                    .copied()
                    .unwrap_or((0, tokio::time::Instant::now()));
                let wait = Duration::from_secs(1u64 << n.min(5)).min(BACKOFF_MAX);
                index
                    .retry
                    .insert(id.to_owned(), (n + 1, tokio::time::Instant::now() + wait));
                crate::metrics::global().question("delivery_failed");
                tracing::warn!(question = %id, attempt = n + 1, retry_in = ?wait, error = %e, "question outcome not delivered; will retry");
            }
        }
    }

    /// Ok(true): delivered; Ok(false): another replica holds it, or nothing to deliver.
    async fn try_deliver(&self, id: &str) -> Result<bool, String> {
        let kv = self.kv.as_ref();
        let lease = format!("lease.{id}");
        if !kv
            .lease(Bucket::Questions, &lease, &self.holder, LEASE_TTL)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(false);
        }
        if kv
            .get(Bucket::Questions, &format!("done.{id}"))
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(true);
        }
        let q = self.question(id).await.map_err(|e| e.to_string())?;
        let outcome: Option<Outcome> = kv
            .get(Bucket::Questions, &format!("final.{id}"))
            .await
            .map_err(|e| e.to_string())?
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        let (Some(q), Some(outcome)) = (q, outcome) else {
            return Ok(false);
        };
        let body = outcome.delivery_body(&q);
        match (&q.reply_to.url, &q.reply_to.subject) {
            (Some(url), _) => {
                let url = Url::parse(url).map_err(|e| format!("reply_to.url: {e}"))?;
                let client = self.service_for(&url).ok_or_else(|| {
                    "reply_to.url is no longer under a registered service".to_owned()
                })?;
                let status = client
                    .post_json(
                        &url,
                        &body,
                        &[("idempotency-key", q.question_id.clone())],
                        DELIVERY_TIMEOUT,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                if !(200..300).contains(&status) {
                    return Err(format!("the asker answered HTTP {status}"));
                }
            }
            (None, Some(subject)) => {
                let data = Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"));
                self.bus
                    .publish_external(subject, data, &q.question_id)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            (None, None) => return Err("the question has no reply_to".into()),
        }
        let _ = kv
            .put(
                Bucket::Questions,
                &format!("done.{id}"),
                Bytes::from_static(b"1"),
            )
            .await;
        let _ = kv.delete(Bucket::Questions, &lease).await;
        crate::metrics::global().question("delivered");
        tracing::info!(question = %id, status = %outcome.status, "question outcome delivered");
        Ok(true)
    }

    /// One sweep: expire what is due, deliver what is undelivered and not another
    /// replica's to deliver now, forget what is past the delivery window.
    async fn sweep(self: &Arc<Self>) {
        let now = now_ms();
        let window = i64::try_from(DELIVERY_WINDOW.as_millis()).unwrap_or(i64::MAX);
        let handover = i64::try_from(HANDOVER_AFTER.as_millis()).unwrap_or(0);
        let (expired, undelivered) = {
            let mut index = self.index();
            let forget: Vec<String> = index
                .questions
                .values()
                .filter(|q| q.expires_at_ms + window < now)
                .map(|q| q.question_id.clone())
                .collect();
            for id in forget {
                index.questions.remove(&id);
                index.finals.remove(&id);
                index.done.remove(&id);
                index.retry.remove(&id);
            }
            let expired: Vec<Question> = index
                .questions
                .values()
                .filter(|q| q.expires_at_ms <= now && !index.finals.contains_key(&q.question_id))
                .cloned()
                .collect();
            let t = tokio::time::Instant::now();
            let undelivered: Vec<String> = index
                .finals
                .iter()
                .filter(|(id, o)| {
                    !index.done.contains(*id)
                        && !index.inflight.contains(*id)
                        && o.at_ms + handover <= now
                        && index.retry.get(*id).is_none_or(|(_, next)| *next <= t)
                })
                .map(|(id, _)| id.clone())
                .collect();
            (expired, undelivered)
        };
        for q in expired {
            let outcome = Outcome {
                status: "expired".into(),
                answer: None,
                user: None,
                client_id: None,
                at_ms: now,
            };
            match self.settle(&q, &outcome).await {
                Ok(true) => {
                    crate::metrics::global().question("expired");
                    tracing::info!(question = %q.question_id, "question expired unanswered");
                    let frame = Bytes::from(notification(
                        event::QUESTION_EXPIRED,
                        &json!({"question_id": q.question_id}),
                    ));
                    self.tell_clients(&q, event::QUESTION_EXPIRED, frame).await;
                    let me = self.clone();
                    let id = q.question_id.clone();
                    tokio::spawn(async move { me.deliver(&id).await });
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(question = %q.question_id, error = %e, "question expiry not recorded")
                }
            }
        }
        for id in undelivered {
            let me = self.clone();
            tokio::spawn(async move { me.deliver(&id).await });
        }
    }

    fn apply(&self, change: KvEvent) {
        let mut index = self.index();
        match change {
            KvEvent::Put { key, value } => {
                if let Some(id) = key.strip_prefix("q.") {
                    if let Ok(q) = serde_json::from_slice::<Question>(&value) {
                        index.questions.insert(id.to_owned(), q);
                    }
                } else if let Some(id) = key.strip_prefix("final.") {
                    if let Ok(o) = serde_json::from_slice::<Outcome>(&value) {
                        index.finals.insert(id.to_owned(), o);
                    }
                } else if let Some(id) = key.strip_prefix("done.") {
                    index.done.insert(id.to_owned());
                }
            }
            KvEvent::Delete { key } => {
                if let Some(id) = key.strip_prefix("q.") {
                    index.questions.remove(id);
                }
            }
        }
    }

    /// Keeps this replica's index from a watch on the bucket and sweeps it, until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(250);
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let watch = tokio::select! {
                    () = stop.cancelled() => return,
                    w = me.kv.watch_bucket(Bucket::Questions) => w,
                };
                match watch {
                    Ok(mut items) => loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = sweep.tick() => me.sweep().await,
                            item = items.next() => match item {
                                Some(BucketWatchItem::Change(c)) => me.apply(c),
                                Some(BucketWatchItem::Current) => delay = Duration::from_millis(250),
                                None => {
                                    tracing::warn!("questions watch ended; watching again");
                                    break;
                                }
                            },
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "questions watch did not start"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        })
    }
}

/// What the question routes need.
#[derive(Clone, FromRef)]
pub struct QuestionsState {
    /// The question service.
    pub questions: Arc<Questions>,
    /// Who is calling (the answer route).
    pub sessions: Arc<SessionService>,
    /// `GATEWAY_INTERNAL_TOKEN` (the ask route).
    pub service_token: Option<Secret>,
    /// The largest question body.
    pub body_limit: BodyLimit,
}

/// The largest answer body.
pub const ANSWER_BODY_LIMIT: usize = 8 * 1024;

/// `POST /api/internal/questions` (internal listener).
pub fn internal_router() -> Router<QuestionsState> {
    Router::new().route("/api/internal/questions", post(ask))
}

/// `POST /api/v1/events/{client_id}/response` (public listener).
pub fn public_router() -> Router<QuestionsState> {
    Router::new().route("/api/v1/events/{client_id}/response", post(respond))
}

/// Documentation of `POST /api/internal/questions`'s body.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct AskDoc {
    /// The asking service (`[a-z0-9_-]`).
    service: String,
    /// The client asked (with `user_id`: it must be that user's).
    client_id: Option<String>,
    /// The user asked: all their active clients (or, with `client_id`, its owner).
    user_id: Option<String>,
    /// The question (1–4000 characters).
    prompt: String,
    /// Accepted answers (at most 20); none: any text.
    options: Option<Vec<String>>,
    /// Seconds before it expires (default `QUESTION_DEFAULT_TIMEOUT`, at most `QUESTION_MAX_TIMEOUT`).
    timeout_seconds: Option<u64>,
    /// `{"url": …}` under a registered service's base URL (the outcome is POSTed there), or
    /// `{"subject": …}`, a NATS subject the asker's JetStream stream captures (published
    /// with `Nats-Msg-Id: <question_id>`; not under `gateway.`, `noetl.` or `$`).
    #[schema(value_type = Object)]
    reply_to: Value,
    /// Returned with the outcome.
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
}

/// Documentation of the answer to an asked question.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct AskedDoc {
    /// `q-` and 32 hex digits.
    question_id: String,
    /// RFC 3339.
    expires_at: String,
}

/// Documentation of `POST /api/v1/events/{client_id}/response`'s body.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct AnswerDoc {
    /// The question answered.
    question_id: String,
    /// One of its options, or free text (1–4000 characters) when it has none.
    answer: String,
}

/// Documentation of an accepted answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct AnsweredDoc {
    /// The question.
    question_id: String,
    /// `answered`.
    status: String,
}

#[utoipa::path(
    post, path = "/api/internal/questions", tag = "internal",
    request_body = AskDoc,
    security(("callback_token" = [])),
    responses(
        (status = 201, description = "Asked: the clients get a `question` frame; the outcome is POSTed to `reply_to.url` (`idempotency-key: <question_id>`) at least once", body = AskedDoc),
        (status = 400, description = "`invalid_json`, `invalid_service`, `invalid_prompt`, `invalid_options`, `invalid_target`, `reply_to_not_allowed`", body = ErrorBody),
        (status = 403, description = "`invalid_service_token`", body = ErrorBody),
        (status = 404, description = "`client_not_found`: no such client (of that user)", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 503, description = "`service_token_not_configured`, `store_unavailable`, `bus_unavailable`, `too_many_questions`", body = ErrorBody),
    )
)]
pub(crate) async fn ask(
    State(state): State<QuestionsState>,
    req: Request,
) -> Result<Response, AppError> {
    check_service_token(req.headers(), state.service_token.as_ref())?;
    let b: AskBody = read_json(req, state.body_limit.0).await?;
    let (question_id, expires_at) = state.questions.ask(b).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"question_id": question_id, "expires_at": expires_at}),
    ))
}

#[utoipa::path(
    post, path = "/api/v1/events/{client_id}/response", tag = "events",
    params(("client_id" = String, Path, description = "The caller's client the question was asked of")),
    request_body = AnswerDoc,
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "The answer won: the asker gets it, the clients `question/answered`", body = AnsweredDoc),
        (status = 400, description = "`invalid_json`, `invalid_answer` (not one of the options)", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_session`", body = ErrorBody),
        (status = 404, description = "`question_not_found`: no open question of this client of the caller's", body = ErrorBody),
        (status = 409, description = "`question_closed`: already answered (first answer wins) or expired", body = ErrorBody),
        (status = 413, description = "`payload_too_large` (8 KiB)", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
    )
)]
pub(crate) async fn respond(
    State(state): State<QuestionsState>,
    Path(client_id): Path<String>,
    caller: Caller,
    req: Request,
) -> Result<Response, AppError> {
    let b: AnswerBody = read_json(req, ANSWER_BODY_LIMIT).await?;
    state
        .questions
        .answer(caller.user(), &client_id, &b.question_id, &b.answer)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"question_id": b.question_id, "status": "answered"}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_cannot_reach_the_gateways_or_noetls_own() {
        for ok in ["demo.answers", "hitl.answers.q-1", "A_b-c"] {
            assert!(is_reply_subject(ok), "{ok}");
        }
        for bad in [
            "",
            "gateway.clients.c1",
            "GATEWAY.clients.c1",
            "noetl.events.x",
            "$KV.questions.final",
            "$JS.API.STREAM.CREATE",
            "demo.*",
            "demo.>",
            "demo..x",
            "demo answers",
            "demo.answers\r\nPUB x",
            &"a".repeat(257),
        ] {
            assert!(!is_reply_subject(bad), "{bad}");
        }
    }

    #[test]
    fn question_ids_are_what_new_makes() {
        let id = new_question_id();
        assert!(is_question_id(&id), "{id}");
        for bad in [
            "",
            "q-",
            "q-XYZ",
            &format!("x{}", &id[1..]),
            &format!("{id}0"),
        ] {
            assert!(!is_question_id(bad), "{bad}");
        }
    }

    #[test]
    fn the_asker_is_told_the_answer_or_the_expiry_and_its_context_back() {
        let q = Question {
            question_id: new_question_id(),
            service: "demo".into(),
            user_id: "u1".into(),
            client_ids: vec![ClientId::parse("c1").unwrap()],
            prompt: "Deploy?".into(),
            options: vec!["yes".into(), "no".into()],
            context: json!({"run": 7}),
            expires_at_ms: 1_000,
            reply_to: ReplyTo {
                url: Some("http://demo/answers".into()),
                subject: None,
            },
        };
        let answered = Outcome {
            status: "answered".into(),
            answer: Some("yes".into()),
            user: Some(Answerer {
                user_id: "u1".into(),
                email: "a@b".into(),
            }),
            client_id: Some("c1".into()),
            at_ms: 500,
        }
        .delivery_body(&q);
        assert_eq!(answered["answer"], "yes");
        assert_eq!(answered["user"]["email"], "a@b");
        assert_eq!(answered["context"]["run"], 7);
        assert_eq!(answered["answered_at"], "1970-01-01T00:00:00.500Z");
        let expired = Outcome {
            status: "expired".into(),
            answer: None,
            user: None,
            client_id: None,
            at_ms: 1_000,
        }
        .delivery_body(&q);
        assert_eq!(expired["status"], "expired");
        assert!(expired.get("answer").is_none());
        assert_eq!(q.params().client_id.as_deref(), Some("c1"));
        assert!(q.asks("u1", &ClientId::parse("c1").unwrap()));
        assert!(!q.asks("u2", &ClientId::parse("c1").unwrap()));
        assert!(!q.asks("u1", &ClientId::parse("c2").unwrap()));
    }
}
