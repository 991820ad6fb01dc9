//! NoETL's own `/api` routes: health, execute, executions, catalog (auth lives in
//! [`super::auth`], debug routes in [`super::debug`]).
//!
//! `/api/execute` answers `execution_id` as a string; every other reply carries it as a
//! JSON number above 2^53, exactly like the real server. Path ids are parsed as `u64`.

use super::http::{ApiError, JsonBody};
use super::ids::ExecutionId;
use super::playbooks::{self, Playbook, Workload};
use super::state::Shared;
use super::store::{Admission, CancelRefusal, NewExecution};
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// `GET /api/health`.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Body of `POST /api/execute`.
#[derive(Debug, Deserialize)]
pub struct ExecuteRequest {
    /// Catalog path of the playbook.
    pub path: String,
    /// The run's input (`payload` accepted as an alias, as the real server does).
    #[serde(default, alias = "payload")]
    pub workload: Option<Value>,
    /// `playbook` or `agent`; recorded only.
    #[serde(default)]
    pub resource_kind: Option<String>,
    /// Ignored by the real server; accepted so old clients are not refused.
    #[serde(default)]
    pub args: Option<Value>,
}

/// `POST /api/execute`: `{execution_id: "<string>", status: started|duplicate,
/// commands_generated}`; unknown path → 404 `{"error":"Playbook not found: x","status":404}`.
pub async fn execute(
    State(st): State<Shared>,
    JsonBody(req): JsonBody<ExecuteRequest>,
) -> Result<Json<Value>, ApiError> {
    let playbook = Playbook::find(&req.path)
        .ok_or_else(|| ApiError::NotFound(format!("Playbook not found: {}", req.path)))?;
    let workload = Workload::parse(req.workload.unwrap_or_else(|| json!({})));
    let spec = NewExecution {
        path: playbook.path().to_owned(),
        catalog_id: playbook.catalog_id(),
        workload: workload.raw.clone(),
        resource_kind: req.resource_kind,
        request_id: workload.request_id.clone(),
        total_steps: playbook.plan(&workload, st.config.step_delay()).len() as u32,
    };
    let (id, status, commands) = match st.store.admit(spec) {
        Admission::Started(id) => {
            tracing::info!(execution_id = %id, path = playbook.path(), "execution started");
            playbooks::spawn(st.clone(), id, playbook, workload);
            (id, "started", 1)
        }
        Admission::Duplicate(id) => (id, "duplicate", 0),
    };
    Ok(Json(json!({
        "execution_id": id.to_string(),
        "status": status,
        "commands_generated": commands,
    })))
}

fn parse_id(raw: &str) -> Result<ExecutionId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid execution id: {raw}")))
}

fn unknown(id: ExecutionId) -> ApiError {
    ApiError::NotFound(format!("Execution not found: {id}"))
}

/// `GET /api/executions`: a JSON array of records, newest first, without events.
pub async fn list_executions(State(st): State<Shared>) -> Json<Vec<Value>> {
    Json(st.store.list())
}

/// `GET /api/executions/{id}`: the record with its events.
pub async fn get_execution(
    State(st): State<Shared>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    st.store.record(id).map(Json).ok_or_else(|| unknown(id))
}

/// `GET /api/executions/{id}/status`.
pub async fn execution_status(
    State(st): State<Shared>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    st.store
        .status_reply(id)
        .map(Json)
        .ok_or_else(|| unknown(id))
}

/// `POST /api/executions/{id}/cancel`: `{execution_id, status:"CANCELLED"}`; a run that
/// already ended is 409 naming its status.
pub async fn cancel_execution(
    State(st): State<Shared>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    match st.store.cancel(id) {
        Ok(()) => {
            tracing::info!(execution_id = %id, "execution cancelled");
            Ok(Json(json!({ "execution_id": id, "status": "CANCELLED" })))
        }
        Err(CancelRefusal::NotFound) => Err(unknown(id)),
        Err(CancelRefusal::Finished(s)) => Err(ApiError::Conflict(format!(
            "Execution {id} already finished: {}",
            s.as_str()
        ))),
    }
}

/// `GET /api/catalog/playbooks`: `{playbooks:[{path, catalog_id, kind, description}], count}`.
pub async fn catalog() -> Json<Value> {
    let entries: Vec<Value> = Playbook::all()
        .iter()
        .map(|p| {
            json!({
                "path": p.path(),
                "catalog_id": p.catalog_id(),
                "kind": "Playbook",
                "version": 1,
                "description": p.description(),
            })
        })
        .collect();
    Json(json!({ "count": entries.len(), "playbooks": entries }))
}
