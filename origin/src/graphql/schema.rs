//! The schema: queries, mutations and the services they use. The subscription root lives
//! in [`super::subscription`]; it shares this file's access check and error mapping.

use std::sync::Arc;

use async_graphql::{Context, Enum, ErrorExtensions, Json, Object, Schema, SimpleObject, ID};
use futures::StreamExt;
use gateway_shared::frames::PendingRequest;
use gateway_shared::ids::{ClientId, ExecutionId, RequestId};
use serde_json::Value;

use super::cost::{CostGuard, CostLimits, CostPolicy, NoetlPermits};
use super::subscription::{OperationLimit, Subscription};
use crate::auth::session::{is_valid_playbook_path, now_unix, SessionService};
use crate::auth::Caller;
use crate::bus::Bus;
use crate::clients;
use crate::config::Config;
use crate::error::AppError;
use crate::interest::{self, Interested};
use crate::noetl::NoetlClient;
use crate::owners::{self, OwnerRecord, Owners, Recorded};
use crate::requests::{self, CallbackTokens, RequestEntry};
use crate::scrub::Scrubber;
use crate::store::KvStore;

/// The gateway's GraphQL schema.
pub type GatewaySchema = Schema<Query, Mutation, Subscription>;

/// The services resolvers use (schema-wide data).
#[derive(Clone)]
pub struct Services {
    /// Configuration (callback URL, limits).
    pub config: Arc<Config>,
    /// Shared state.
    pub kv: Arc<dyn KvStore>,
    /// NoETL.
    pub noetl: NoetlClient,
    /// Access checks.
    pub sessions: Arc<SessionService>,
    /// Per-request callback tokens.
    pub tokens: CallbackTokens,
    /// Client delivery: `executionEvents` reads an execution's `playbook/state` frames here.
    pub bus: Arc<dyn Bus>,
    /// Who started each execution: every read or action on one is its owner's (or a
    /// read-all role's), and `myExecutions` lists the caller's.
    pub owners: Owners,
    /// Human-in-the-loop questions: `pendingQuestions`, `answerQuestion`.
    pub questions: Arc<crate::questions::Questions>,
}

/// A human-in-the-loop question asked of one of the caller's clients.
#[derive(SimpleObject)]
pub struct Question {
    /// The question's id.
    pub question_id: String,
    /// What the service asks.
    pub prompt: String,
    /// The answers it accepts; empty: any text.
    pub options: Vec<String>,
    /// When it expires unanswered (RFC 3339).
    pub expires_at: String,
    /// The asking service.
    pub service: String,
}

/// Builds the schema with the protocol's limits. Depth and complexity limits hold for every
/// operation, over HTTP and WebSocket alike; [`OperationLimit`] adds the per-socket cap and
/// [`CostGuard`] adds the per-operation cost limits and per-user rates (`cost.rs`); its
/// policy is schema data, so the HTTP shell reads the same limits for batches.
pub fn build_schema(services: Services, introspection: bool) -> GatewaySchema {
    let policy = Arc::new(cost_policy(&services.config));
    let batch = BatchMode(services.config.graphql_batch);
    let mut b = builder()
        .data(services)
        .data(policy.clone())
        .data(batch)
        .extension(OperationLimit)
        .extension(CostGuard(policy))
        .limit_depth(16)
        .limit_complexity(1000)
        .limit_recursive_depth(32);
    if !introspection {
        b = b.disable_introspection();
    }
    b.finish()
}

/// The schema's root types: [`build_schema`] serves them, [`sdl`] prints them.
fn builder() -> async_graphql::SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(Query, Mutation, Subscription)
}

/// The served schema as SDL: what `docs/schema.graphql` holds (the same root types as
/// [`build_schema`]; data, extensions and limits do not change the SDL). The contracts
/// test (`tests/tests/contracts.rs`) keeps the file equal to it.
pub fn sdl() -> String {
    builder().finish().sdl()
}

/// The cost policy the configuration describes.
pub fn cost_policy(config: &Config) -> CostPolicy {
    CostPolicy::new(
        CostLimits {
            max_root_fields: config.graphql_max_root_fields,
            max_aliases: config.graphql_max_aliases,
            max_execute: config.graphql_max_execute_per_request,
            max_noetl_fields: config.graphql_max_noetl_fields,
        },
        config.graphql_mutation_rate_limit,
        config.execute_rate_limit,
    )
}

/// Whether batched requests (a JSON array) are served (`GRAPHQL_BATCH`); schema data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMode(pub bool);

pub(super) fn gql_error(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", code))
}

pub(super) fn from_app(e: AppError) -> async_graphql::Error {
    let code = match e.status().as_u16() {
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        409 => "CONFLICT",
        400 | 413 | 415 => "BAD_USER_INPUT",
        401 => "UNAUTHENTICATED",
        502..=504 => "UPSTREAM_UNAVAILABLE",
        _ => "INTERNAL",
    };
    let message = e.body().error.message;
    async_graphql::Error::new(message).extend_with(|_, ext| {
        ext.set("code", code);
        ext.set("reason", e.code());
    })
}

/// The `executionId` argument, checked once here. An id that could never name an
/// execution is answered as the interest store used to refuse it (an invalid key).
pub(super) fn execution_id_arg(id: &str) -> async_graphql::Result<ExecutionId> {
    ExecutionId::parse(id)
        .map_err(|_| from_app(crate::store::StoreError::InvalidKey(id.to_owned()).into()))
}

pub(super) fn ctx_parts<'a>(
    ctx: &'a Context<'_>,
) -> async_graphql::Result<(&'a Services, &'a Caller)> {
    Ok((ctx.data::<Services>()?, ctx.data::<Caller>()?))
}

/// A user as GraphQL shows it.
#[derive(SimpleObject)]
pub struct User {
    /// NoETL's user id (exact decimal text).
    pub user_id: String,
    /// E-mail address.
    pub email: String,
    /// Display name.
    pub display_name: String,
    /// Roles.
    pub roles: Vec<String>,
}

/// An execution's status (NoETL `/api/executions/{id}/status`).
#[derive(SimpleObject)]
pub struct ExecutionStatus {
    /// Execution id (string: NoETL ids exceed 2^53).
    pub execution_id: String,
    /// RUNNING, COMPLETED, FAILED or CANCELLED.
    pub status: String,
    /// The step running now, if any.
    pub current_step: Option<String>,
    /// NoETL's progress counters.
    pub progress: Option<Json<Value>>,
}

/// What executePlaybook returns (compat field names).
#[derive(SimpleObject)]
pub struct ExecuteResult {
    /// Same as `executionId` (older clients read `id`).
    pub id: String,
    /// NoETL's execution id.
    pub execution_id: String,
    /// The gateway's request id; the `playbook/result` frame carries it.
    pub request_id: Option<String>,
    /// The playbook path.
    pub name: Option<String>,
    /// `started` or `duplicate`.
    pub status: Option<String>,
}

/// One of the caller's runs, as `myExecutions` lists it.
#[derive(SimpleObject)]
pub struct ExecutionSummary {
    /// NoETL's execution id (exact decimal text).
    pub execution_id: String,
    /// The playbook it runs.
    pub playbook_path: String,
    /// When the gateway started it (RFC 3339).
    pub started_at: String,
    /// NoETL's status now (RUNNING, COMPLETED, …), or UNKNOWN when NoETL did not say.
    pub status: String,
    /// Pass as `after` to list the runs older than this one.
    pub cursor: String,
}

/// A page of the caller's runs, newest first.
#[derive(SimpleObject)]
pub struct ExecutionPage {
    /// The runs.
    pub items: Vec<ExecutionSummary>,
    /// The last item's cursor, if any.
    pub end_cursor: Option<String>,
    /// True when older runs follow.
    pub has_next_page: bool,
}

/// How many status reads to NoETL one `myExecutions` page makes at once.
const STATUS_READS_AT_ONCE: usize = 16;

/// What kind of resource to execute.
#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(rename_items = "lowercase")]
pub enum ExecutableResourceKind {
    /// A playbook.
    Playbook,
    /// An agent.
    Agent,
}

/// Queries.
pub struct Query;

#[Object]
impl Query {
    /// `"ok"` while the origin serves GraphQL.
    async fn health(&self) -> &'static str {
        "ok"
    }

    /// The gateway's version.
    async fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    /// The calling user.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<User> {
        let (_, caller) = ctx_parts(ctx)?;
        let u = &caller.record.user;
        Ok(User {
            user_id: u.user_id.clone(),
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            roles: u.roles.clone(),
        })
    }

    /// The caller's own runs (those it started through the gateway), newest first: `first`
    /// runs (default 20, at most 100) older than the cursor `after`.
    async fn my_executions(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<ExecutionPage> {
        let (svc, caller) = ctx_parts(ctx)?;
        let first = match first {
            None => owners::DEFAULT_PAGE,
            Some(n) if (1..=owners::MAX_PAGE as i32).contains(&n) => n as usize,
            Some(_) => {
                return Err(gql_error(
                    "BAD_USER_INPUT",
                    format!("first must be between 1 and {}", owners::MAX_PAGE),
                ))
            }
        };
        let after = match after.as_deref() {
            None | Some("") => None,
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                gql_error("BAD_USER_INPUT", "after is not a cursor from myExecutions")
            })?),
        };
        let page = svc
            .owners
            .page(&caller.record.user.user_id, first, after)
            .await
            .map_err(|e| from_app(e.into()))?;
        let ids: Vec<String> = page
            .items
            .iter()
            .map(|(_, run)| run.execution_id.clone())
            .collect();
        let permits = NoetlPermits::of(ctx);
        let statuses: Vec<String> = futures::stream::iter(ids)
            .map(|id| {
                let noetl = svc.noetl.clone();
                let permits = permits.clone();
                async move {
                    let _permit = permits.acquire().await;
                    match noetl.execution_status(&id).await {
                        Ok(v) => v["status"].as_str().unwrap_or("UNKNOWN").to_owned(),
                        Err(e) => {
                            tracing::warn!(execution = %id, error = %e, "status unknown for myExecutions");
                            "UNKNOWN".to_owned()
                        }
                    }
                }
            })
            .buffered(STATUS_READS_AT_ONCE)
            .collect()
            .await;
        let items: Vec<ExecutionSummary> = page
            .items
            .into_iter()
            .zip(statuses)
            .map(|((slot, run), status)| ExecutionSummary {
                execution_id: run.execution_id,
                playbook_path: run.playbook_path,
                started_at: chrono::DateTime::from_timestamp(run.started_at, 0)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default(),
                status,
                cursor: slot.to_string(),
            })
            .collect();
        Ok(ExecutionPage {
            end_cursor: items.last().map(|i| i.cursor.clone()),
            has_next_page: page.has_next,
            items,
        })
    }

    /// The open questions one of the caller's clients was asked, soonest expiry first.
    async fn pending_questions(
        &self,
        ctx: &Context<'_>,
        client_id: String,
    ) -> async_graphql::Result<Vec<Question>> {
        let (svc, caller) = ctx_parts(ctx)?;
        let client = own_client(svc, caller, Some(client_id))
            .await?
            .ok_or_else(|| gql_error("BAD_USER_INPUT", "clientId is required"))?;
        Ok(svc
            .questions
            .pending_for(&caller.record.user.user_id, &client)
            .into_iter()
            .map(|q| Question {
                question_id: q.question_id,
                prompt: q.prompt,
                options: q.options,
                expires_at: q.expires_at,
                service: q.service,
            })
            .collect())
    }

    /// An execution's status, if the caller started it (or reads all) and may view its
    /// playbook.
    async fn execution(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Option<ExecutionStatus>> {
        let (svc, caller) = ctx_parts(ctx)?;
        let _permit = NoetlPermits::of(ctx).acquire().await;
        require_execution_access(svc, caller, &id, "view").await?;
        let mut v = svc
            .noetl
            .execution_status(&id)
            .await
            .map_err(|e| from_app(e.into()))?;
        // NoETL's reply goes out as JSON (`progress`): nothing injected or secret in it.
        Scrubber::for_gateway(svc.config.callback_url(), svc.tokens.clone()).scrub(&mut v);
        Ok(Some(ExecutionStatus {
            execution_id: v["execution_id"].as_str().unwrap_or(&id).to_owned(),
            status: v["status"].as_str().unwrap_or("UNKNOWN").to_owned(),
            current_step: v["current_step"].as_str().map(str::to_owned),
            progress: v.get("progress").cloned().map(Json),
        }))
    }
}

/// Ownership first (not the caller's and no read-all role → `NOT_FOUND`, the answer for a
/// run that does not exist, so a guessed id confirms nothing), then the playbook access
/// check on the execution's path.
pub(super) async fn require_execution_access(
    svc: &Services,
    caller: &Caller,
    id: &str,
    permission: &str,
) -> async_graphql::Result<()> {
    if id.is_empty() || id.len() > 40 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(gql_error(
            "BAD_USER_INPUT",
            "execution ids are decimal numbers",
        ));
    }
    if !svc
        .owners
        .may_access(caller.user(), id)
        .await
        .map_err(|e| from_app(e.into()))?
    {
        return Err(gql_error("NOT_FOUND", format!("no execution {id}")));
    }
    let path = svc
        .noetl
        .execution_path(id)
        .await
        .map_err(|e| from_app(e.into()))?;
    let reply = svc
        .sessions
        .check_access(&caller.token, &caller.record, &path, permission)
        .await
        .map_err(from_app)?;
    if !reply.allowed {
        return Err(gql_error(
            "FORBIDDEN",
            format!("not allowed to {permission} {path}"),
        ));
    }
    Ok(())
}

/// Records the caller as the owner of a run it just started by `request_id`. A failure is
/// logged, not returned: the run has started and a retry would start another; until an
/// operator looks, the run is readable by read-all roles only (and no result is synthesised
/// for it if it ends without a callback).
async fn record_owner(
    svc: &Services,
    caller: &Caller,
    execution_id: &str,
    path: &str,
    request_id: &RequestId,
) {
    let record = OwnerRecord {
        execution_id: execution_id.to_owned(),
        user_id: caller.record.user.user_id.clone(),
        playbook_path: path.to_owned(),
        started_at: now_unix(),
        request_id: Some(request_id.clone()),
    };
    match svc.owners.record(&record).await {
        Ok(Recorded::New(_) | Recorded::Already) => {}
        Ok(Recorded::OwnedByAnother) => {
            tracing::warn!(execution = %execution_id, "NoETL answered a start with a run another user owns; ownership unchanged")
        }
        Err(e) => {
            tracing::error!(execution = %execution_id, error = %e, "run owner not recorded: the run is readable by read-all roles only")
        }
    }
}

/// The caller's client id, if given: it must exist and belong to the caller.
async fn own_client(
    svc: &Services,
    caller: &Caller,
    client_id: Option<String>,
) -> async_graphql::Result<Option<ClientId>> {
    let Some(raw) = client_id.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let Ok(id) = ClientId::try_from(raw) else {
        return Err(gql_error(
            "BAD_USER_INPUT",
            "clientId is not a valid client id",
        ));
    };
    match clients::get(svc.kv.as_ref(), &id)
        .await
        .map_err(|e| from_app(e.into()))?
    {
        Some(r) if r.user_id == caller.record.user.user_id => Ok(Some(id)),
        _ => Err(gql_error(
            "FORBIDDEN",
            "this clientId does not belong to your session",
        )),
    }
}

/// Mutations.
pub struct Mutation;

#[Object]
impl Mutation {
    /// Runs a playbook for the caller. Access is checked first; the request is recorded
    /// before NoETL is called, so its callback can be delivered by any replica.
    #[allow(clippy::too_many_arguments)]
    async fn execute_playbook(
        &self,
        ctx: &Context<'_>,
        name: Option<String>,
        path: Option<String>,
        variables: Option<Json<Value>>,
        workload: Option<Json<Value>>,
        resource_kind: Option<ExecutableResourceKind>,
        client_id: Option<String>,
    ) -> async_graphql::Result<ExecuteResult> {
        let (svc, caller) = ctx_parts(ctx)?;
        let path = path
            .or(name)
            .filter(|p| is_valid_playbook_path(p))
            .ok_or_else(|| {
                gql_error(
                    "BAD_USER_INPUT",
                    "name or path is required (1-512 printable characters)",
                )
            })?;
        let mut workload = workload
            .or(variables)
            .map(|j| j.0)
            .unwrap_or_else(|| Value::Object(Default::default()));
        let Value::Object(fields) = &mut workload else {
            return Err(gql_error(
                "BAD_USER_INPUT",
                "workload must be a JSON object",
            ));
        };
        let access = svc
            .sessions
            .check_access(&caller.token, &caller.record, &path, "execute")
            .await
            .map_err(from_app)?;
        if !access.allowed {
            return Err(gql_error(
                "FORBIDDEN",
                format!("not allowed to execute {path}"),
            ));
        }
        let client_id = own_client(svc, caller, client_id).await?;

        let request_id = requests::new_request_id();
        let entry = RequestEntry {
            request_id: request_id.clone(),
            client_id: client_id.clone(),
            user_id: caller.record.user.user_id.clone(),
            execution_id: None,
            playbook_path: path.clone(),
            created_at: now_unix(),
        };
        requests::put(svc.kv.as_ref(), &entry).await.map_err(|e| {
            gql_error(
                "UNAVAILABLE",
                format!("request store unavailable, nothing was started: {e}"),
            )
        })?;
        fields.insert("request_id".into(), Value::String(request_id.to_string()));
        fields.insert(
            "gateway_url".into(),
            Value::String(svc.config.callback_url()),
        );
        fields.insert(
            "callback_token".into(),
            Value::String(svc.tokens.token_for(request_id.as_str())),
        );

        let kind = resource_kind.map(|k| match k {
            ExecutableResourceKind::Playbook => "playbook",
            ExecutableResourceKind::Agent => "agent",
        });
        let reply = svc
            .noetl
            .execute(&path, &workload, kind)
            .await
            .map_err(|e| from_app(e.into()))?;
        let execution_id = reply.execution_id.clone();
        // Checked once: an id NoETL sends that could never be a key is not recorded.
        let execution = ExecutionId::parse(&execution_id);
        record_owner(svc, caller, &execution_id, &path, &request_id).await;
        let kv = svc.kv.as_ref();
        let recorded = RequestEntry {
            execution_id: execution.clone().ok(),
            ..entry
        };
        if let Err(e) = requests::put(kv, &recorded).await {
            tracing::warn!(request = %request_id, error = %e, "execution id not recorded");
        }
        if let Some(client) = &client_id {
            let added = match &execution {
                Ok(execution) => {
                    interest::follow(kv, svc.bus.as_ref(), execution, client, Interested::Owner)
                        .await
                }
                Err(_) => Err(crate::store::StoreError::InvalidKey(execution_id.clone()).into()),
            };
            if let Err(e) = added {
                tracing::warn!(request = %request_id, error = %e, "interest not recorded; state frames may be missed");
            }
            let pending = PendingRequest {
                request_id: request_id.to_string(),
                execution_id: execution_id.clone(),
                playbook_path: path.clone(),
            };
            if let Err(e) = clients::add_pending(kv, client, pending).await {
                tracing::warn!(error = %e, "pending list not updated");
            }
        }
        tracing::info!(request = %request_id, execution = %execution_id, playbook = %path, user = %caller.record.user.user_id, "playbook executed");
        Ok(ExecuteResult {
            id: execution_id.clone(),
            execution_id,
            request_id: Some(request_id.into_string()),
            name: Some(path),
            status: Some(if reply.status.is_empty() {
                "started".into()
            } else {
                reply.status
            }),
        })
    }

    /// Cancels an execution the caller started (or reads all) and may execute.
    async fn cancel_execution(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<bool> {
        let (svc, caller) = ctx_parts(ctx)?;
        let _permit = NoetlPermits::of(ctx).acquire().await;
        require_execution_access(svc, caller, &id, "execute").await?;
        svc.noetl
            .cancel(&id)
            .await
            .map_err(|e| from_app(e.into()))?;
        Ok(true)
    }

    /// Answers a question one of the caller's clients was asked: the first answer wins
    /// (`CONFLICT` once answered or expired; `NOT_FOUND` for anyone else's question).
    async fn answer_question(
        &self,
        ctx: &Context<'_>,
        client_id: String,
        question_id: String,
        answer: String,
    ) -> async_graphql::Result<bool> {
        let (svc, caller) = ctx_parts(ctx)?;
        svc.questions
            .answer(&caller.record.user, &client_id, &question_id, &answer)
            .await
            .map_err(from_app)?;
        Ok(true)
    }

    /// Sends the `playbook/state` frames of an execution the caller started (or reads all)
    /// to one of the caller's clients.
    async fn subscribe_to_execution(
        &self,
        ctx: &Context<'_>,
        execution_id: ID,
        client_id: String,
    ) -> async_graphql::Result<bool> {
        let (svc, caller) = ctx_parts(ctx)?;
        let client = own_client(svc, caller, Some(client_id))
            .await?
            .ok_or_else(|| gql_error("BAD_USER_INPUT", "clientId is required"))?;
        require_execution_access(svc, caller, &execution_id, "view").await?;
        let execution_id = execution_id_arg(&execution_id)?;
        let who = super::subscription::interest_role(svc, caller, &execution_id).await?;
        interest::follow(
            svc.kv.as_ref(),
            svc.bus.as_ref(),
            &execution_id,
            &client,
            who,
        )
        .await
        .map_err(|e| from_app(e.into()))?;
        Ok(true)
    }
}
