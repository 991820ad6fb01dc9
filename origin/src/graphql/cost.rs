//! What one GraphQL operation may ask for (PROTOCOL.md §2, "Limits"), checked on the parsed
//! document before any field runs — over HTTP and on every graphql-ws `subscribe` alike.
//!
//! The schema's depth and complexity limits price fields by their shape; they do not see
//! that one `executePlaybook` starts a run and one `execution` costs NoETL two calls. So
//! [`CostGuard`], a schema extension, looks at the selected operation in its
//! `prepare_request` hook (the one hook both transports run, before parsing is even
//! finished by the library) and refuses, with one GraphQL error and nothing executed:
//! - more than `GRAPHQL_MAX_ROOT_FIELDS` root fields, or more than `GRAPHQL_MAX_ALIASES`
//!   aliases anywhere (`QUERY_TOO_COSTLY`);
//! - more than `GRAPHQL_MAX_EXECUTE_PER_REQUEST` `executePlaybook` fields;
//! - more than `GRAPHQL_MAX_NOETL_FIELDS` root fields that call NoETL ([`NOETL_FIELDS`]):
//!   the fan-out of one request is bounded by the count, and its concurrency by
//!   [`NoetlPermits`]: all of an operation's fields share [`NOETL_CALLS_AT_ONCE`] calls in
//!   flight;
//! - a mutation over the caller's `GRAPHQL_MUTATION_RATE_LIMIT`, or `executePlaybook`
//!   fields over `EXECUTE_RATE_LIMIT` (per user, GCRA: [`KeyedLimiter`]) → `RATE_LIMITED`
//!   with `retryAfter`; the HTTP shell answers it 429 with `Retry-After`.
//!
//! Counting follows fragments: a spread counts its fragment's fields each time it is spread
//! (inline fragments likewise), so fragments cannot hide fields. Each fragment's counts are
//! computed once and reused, so a document whose fragments spread each other exponentially
//! costs linear time to count (and its counts saturate, then are refused); a fragment that
//! spreads itself (a cycle, which validation refuses afterwards) adds nothing the second
//! time; nesting deeper than [`MAX_WALK_DEPTH`] is refused outright. More than [`MAX_FIELDS`]
//! fields in all — over every operation of the document, selected or not — is refused too:
//! the library's own depth and complexity checks walk every operation's fragments without
//! memory, exponentially in such a document. Fields are counted with
//! multiplicity: a document naming one field twice is counted twice, even though GraphQL
//! would merge them.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationDefinition, OperationType, Selection,
    SelectionSet,
};
use async_graphql::{Name, Positioned, Request, ServerError, ServerResult};

use crate::auth::Caller;
use crate::ratelimit::{KeyedLimiter, RateSpec, RetryAfter};

/// The GraphQL error code of a refused operation (too many fields, aliases, runs).
pub const TOO_COSTLY: &str = "QUERY_TOO_COSTLY";

/// The GraphQL error code of a rate-limited operation (HTTP: 429).
pub const RATE_LIMITED: &str = "RATE_LIMITED";

/// The root field that starts a run.
pub const EXECUTE_FIELD: &str = "executePlaybook";

/// Root fields whose resolvers call NoETL (each one call or more).
pub const NOETL_FIELDS: [&str; 6] = [
    "execution",
    "myExecutions",
    "executePlaybook",
    "cancelExecution",
    "subscribeToExecution",
    "executionEvents",
];

/// Deepest nesting (selection sets and fragment spreads together) the count follows; the
/// schema refuses anything deeper than 32 anyway.
pub const MAX_WALK_DEPTH: usize = 64;

/// Most fields, at every depth with fragments expanded, an operation may select: the
/// schema's complexity limit (1000, each field costing at least 1) would refuse more, but
/// only after its own walk, which follows every spread without memory — a 1.5 KB document
/// whose fragments each spread the next twice costs that walk 2^30 visits (minutes of CPU).
/// Counting here is linear, so such a document is refused first.
pub const MAX_FIELDS: u64 = 1000;

/// NoETL calls one operation's fields make at once, all fields together ([`NoetlPermits`]).
pub const NOETL_CALLS_AT_ONCE: usize = 16;

/// The operation's share of NoETL: every resolver that calls NoETL holds one permit per
/// call in flight, so five `myExecutions` of 100 runs each still read 16 statuses at once,
/// not 80. Put in each operation's data by [`CostGuard`].
#[derive(Debug, Clone)]
pub struct NoetlPermits(Arc<tokio::sync::Semaphore>);

impl Default for NoetlPermits {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(NOETL_CALLS_AT_ONCE)))
    }
}

impl NoetlPermits {
    /// Waits for a permit; held until dropped.
    pub async fn acquire(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.0
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// The operation's permits, or a fresh set (outside an operation the guard saw).
    pub fn of(ctx: &async_graphql::Context<'_>) -> Self {
        ctx.data_opt::<NoetlPermits>().cloned().unwrap_or_default()
    }
}

/// The configured limits (config.rs, `GRAPHQL_*` and `EXECUTE_RATE_LIMIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostLimits {
    /// Root fields per operation.
    pub max_root_fields: u64,
    /// Aliases per operation, at any depth.
    pub max_aliases: u64,
    /// `executePlaybook` fields per request.
    pub max_execute: u64,
    /// Root fields that call NoETL ([`NOETL_FIELDS`]) per operation.
    pub max_noetl_fields: u64,
}

/// What an operation asks for, fragments expanded (saturating counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Fields at every depth, in every operation of the document.
    pub fields: u64,
    /// Root fields.
    pub root_fields: u64,
    /// Aliased fields, at any depth.
    pub aliases: u64,
    /// Root `executePlaybook` fields.
    pub executes: u64,
    /// Root fields that call NoETL.
    pub noetl_fields: u64,
    /// Whether the operation is a mutation.
    pub mutation: bool,
}

impl Cost {
    /// Adds `other`'s counts (a batch's requests together).
    pub fn add(&mut self, other: &Cost) {
        self.fields = self.fields.saturating_add(other.fields);
        self.root_fields = self.root_fields.saturating_add(other.root_fields);
        self.aliases = self.aliases.saturating_add(other.aliases);
        self.executes = self.executes.saturating_add(other.executes);
        self.noetl_fields = self.noetl_fields.saturating_add(other.noetl_fields);
        self.mutation |= other.mutation;
    }

    /// The first limit this cost exceeds, as the message the client gets.
    pub fn exceeds(&self, limits: &CostLimits) -> Option<String> {
        let checks = [
            (self.fields, MAX_FIELDS, "fields (fragments expanded)"),
            (self.root_fields, limits.max_root_fields, "root fields"),
            (self.aliases, limits.max_aliases, "aliases"),
            (self.executes, limits.max_execute, "executePlaybook fields"),
            (
                self.noetl_fields,
                limits.max_noetl_fields,
                "fields that call NoETL (execution, myExecutions, executePlaybook, cancelExecution, subscribeToExecution, executionEvents)",
            ),
        ];
        checks.into_iter().find_map(|(n, max, what)| {
            (n > max).then(|| format!("at most {max} {what} per request; this one has {n}"))
        })
    }
}

/// Why an operation cannot be counted: it is refused as too costly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncountable(pub String);

/// Counts of one selection set: its own level (root fields when it is the operation's) and
/// its aliases at every depth.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    total: u64,
    fields: u64,
    executes: u64,
    noetl: u64,
    aliases: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.total = self.total.saturating_add(o.total);
        self.fields = self.fields.saturating_add(o.fields);
        self.executes = self.executes.saturating_add(o.executes);
        self.noetl = self.noetl.saturating_add(o.noetl);
        self.aliases = self.aliases.saturating_add(o.aliases);
    }
}

/// A fragment's counts: being computed (a cycle if met again) or known.
enum Memo {
    InProgress,
    Done(Counts),
}

struct Walk<'a> {
    doc: &'a ExecutableDocument,
    memo: HashMap<&'a Name, Memo>,
}

impl<'a> Walk<'a> {
    fn selection_set(
        &mut self,
        set: &'a Positioned<SelectionSet>,
        depth: usize,
    ) -> Result<Counts, Uncountable> {
        if depth > MAX_WALK_DEPTH {
            return Err(Uncountable(format!(
                "the query nests deeper than {MAX_WALK_DEPTH} levels"
            )));
        }
        let mut counts = Counts::default();
        for selection in &set.node.items {
            match &selection.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    let name = field.name.node.as_str();
                    counts.total = counts.total.saturating_add(1);
                    counts.fields = counts.fields.saturating_add(1);
                    counts.executes = counts
                        .executes
                        .saturating_add(u64::from(name == EXECUTE_FIELD));
                    counts.noetl = counts
                        .noetl
                        .saturating_add(u64::from(NOETL_FIELDS.contains(&name)));
                    counts.aliases = counts
                        .aliases
                        .saturating_add(u64::from(field.alias.is_some()));
                    if !field.selection_set.node.items.is_empty() {
                        // Below this level only aliases and the total count.
                        let inner = self.selection_set(&field.selection_set, depth + 1)?;
                        counts.aliases = counts.aliases.saturating_add(inner.aliases);
                        counts.total = counts.total.saturating_add(inner.total);
                    }
                }
                Selection::InlineFragment(inline) => {
                    counts.add(self.selection_set(&inline.node.selection_set, depth + 1)?);
                }
                Selection::FragmentSpread(spread) => {
                    let name = &spread.node.fragment_name.node;
                    counts.add(self.fragment(name, depth + 1)?);
                }
            }
        }
        Ok(counts)
    }

    fn fragment(&mut self, name: &'a Name, depth: usize) -> Result<Counts, Uncountable> {
        match self.memo.get(name) {
            Some(Memo::Done(c)) => return Ok(*c),
            // A cycle: validation refuses it after this; it adds nothing here.
            Some(Memo::InProgress) => return Ok(Counts::default()),
            None => {}
        }
        // An unknown fragment is validation's to report.
        let Some(def) = self.doc.fragments.get(name) else {
            return Ok(Counts::default());
        };
        self.memo.insert(name, Memo::InProgress);
        let counts = self.selection_set(&def.node.selection_set, depth)?;
        self.memo.insert(name, Memo::Done(counts));
        Ok(counts)
    }
}

/// The cost of the operation a request selects (`operation_name`, or the document's only
/// one). Its `fields` count every operation of the document, which the library's checks
/// walk whether selected or not; when the document selects no operation (the library then
/// reports that, after those checks) only `fields` is set.
pub fn operation_cost(
    doc: &ExecutableDocument,
    operation_name: Option<&str>,
) -> Result<Cost, Uncountable> {
    let mut walk = Walk {
        doc,
        memo: HashMap::new(),
    };
    let named: Vec<(Option<&str>, &Positioned<OperationDefinition>)> = match &doc.operations {
        DocumentOperations::Single(op) => vec![(None, op)],
        DocumentOperations::Multiple(ops) => {
            ops.iter().map(|(n, op)| (Some(n.as_str()), op)).collect()
        }
    };
    let only_one = named.len() == 1;
    let mut cost = Cost::default();
    for (name, op) in named {
        let counts = walk.selection_set(&op.node.selection_set, 0)?;
        cost.fields = cost.fields.saturating_add(counts.total);
        let selected = match (name, operation_name) {
            (None, _) => true,
            (Some(n), Some(wanted)) => n == wanted,
            (Some(_), None) => only_one,
        };
        if selected {
            cost.root_fields = counts.fields;
            cost.aliases = counts.aliases;
            cost.executes = counts.executes;
            cost.noetl_fields = counts.noetl;
            cost.mutation = op.node.ty == OperationType::Mutation;
        }
    }
    Ok(cost)
}

/// A GraphQL error with `extensions.code`.
fn refusal(code: &'static str, message: String) -> ServerError {
    let mut e = ServerError::new(message, None);
    e.extensions
        .get_or_insert_with(Default::default)
        .set("code", code);
    e
}

/// A rate limit's refusal: `RATE_LIMITED` with `retryAfter` (seconds), and the wait as the
/// error's source, which the HTTP shell reads ([`retry_after_of`]).
fn rate_refusal(wait: RetryAfter, what: &str) -> ServerError {
    let mut e = refusal(
        RATE_LIMITED,
        format!("too many {what}; retry after {} s", wait.secs()),
    );
    e.extensions
        .get_or_insert_with(Default::default)
        .set("retryAfter", wait.secs());
    e.source = Some(Arc::new(wait));
    e
}

/// The wait of a response refused by a rate limit (its one error is [`RATE_LIMITED`]):
/// the HTTP shell answers it 429 with `Retry-After`.
pub fn retry_after_of(response: &async_graphql::Response) -> Option<RetryAfter> {
    match response.errors.as_slice() {
        [only] if response.data == async_graphql::Value::Null => {
            only.source::<RetryAfter>().copied()
        }
        _ => None,
    }
}

/// The refusal of a request costing `cost` under `limits`, if any (no rate limits here).
pub fn check_cost(cost: &Cost, limits: &CostLimits) -> Result<(), ServerError> {
    match cost.exceeds(limits) {
        Some(message) => Err(refusal(TOO_COSTLY, message)),
        None => Ok(()),
    }
}

/// The limits and the per-user limiters: the extension's state, one per schema.
#[derive(Debug)]
pub struct CostPolicy {
    /// The static limits.
    pub limits: CostLimits,
    /// Mutation operations per user (`GRAPHQL_MUTATION_RATE_LIMIT`).
    pub mutations: KeyedLimiter<String>,
    /// `executePlaybook` fields per user (`EXECUTE_RATE_LIMIT`).
    pub executes: KeyedLimiter<String>,
}

impl CostPolicy {
    /// The policy for these limits and rates (`None`: that rate is off).
    pub fn new(
        limits: CostLimits,
        mutation_rate: Option<RateSpec>,
        execute_rate: Option<RateSpec>,
    ) -> Self {
        Self {
            limits,
            mutations: KeyedLimiter::new(mutation_rate),
            executes: KeyedLimiter::new(execute_rate),
        }
    }

    /// Counts the request against `user`'s rates: a mutation once, each `executePlaybook`
    /// once more.
    fn charge(&self, user: &str, cost: &Cost) -> Result<(), ServerError> {
        if !cost.mutation {
            return Ok(());
        }
        let key = user.to_owned();
        self.mutations
            .check(&key)
            .map_err(|w| rate_refusal(w, "mutations"))?;
        for _ in 0..cost.executes {
            self.executes
                .check(&key)
                .map_err(|w| rate_refusal(w, "executePlaybook calls"))?;
        }
        Ok(())
    }
}

/// The schema extension that applies a [`CostPolicy`] to every operation (module docs).
#[derive(Clone)]
pub struct CostGuard(pub Arc<CostPolicy>);

impl CostGuard {
    /// Counts the request's selected operation, then charges `user`'s rates.
    fn check(&self, request: &mut Request, user: Option<&str>) -> Result<(), ServerError> {
        let operation_name = request.operation_name.clone();
        // Parsed once here; the library reuses this document.
        let doc = request.parsed_query()?;
        let cost = operation_cost(doc, operation_name.as_deref())
            .map_err(|Uncountable(m)| refusal(TOO_COSTLY, m))?;
        check_cost(&cost, &self.0.limits)?;
        match user {
            Some(user) => self.0.charge(user, &cost),
            None => Ok(()),
        }
    }
}

impl ExtensionFactory for CostGuard {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Extension for CostGuard {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        // HTTP: the caller is in the request's data; WebSocket: in the connection's.
        let user = request
            .data
            .get(&std::any::TypeId::of::<Caller>())
            .and_then(|c| c.downcast_ref::<Caller>())
            .or_else(|| ctx.data_opt::<Caller>())
            .map(|c| c.record.user.user_id.clone());
        if let Err(e) = self.check(&mut request, user.as_deref()) {
            tracing::info!(user = user.as_deref().unwrap_or("-"), error = %e.message, "graphql operation refused");
            return Err(e);
        }
        request.data.insert(NoetlPermits::default());
        next.run(ctx, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_graphql::parser::parse_query;
    use std::time::Duration;

    fn cost(q: &str) -> Cost {
        let doc = parse_query(q).expect("parses");
        operation_cost(&doc, None).expect("countable")
    }

    const LIMITS: CostLimits = CostLimits {
        max_root_fields: 10,
        max_aliases: 30,
        max_execute: 1,
        max_noetl_fields: 5,
    };

    #[test]
    fn aliased_root_fields_count_each() {
        let q = format!(
            "mutation {{ {} }}",
            (0..40)
                .map(|i| format!("r{i}: executePlaybook(path: \"p\") {{ id }}"))
                .collect::<String>()
        );
        let c = cost(&q);
        assert_eq!(
            (
                c.root_fields,
                c.aliases,
                c.executes,
                c.noetl_fields,
                c.mutation
            ),
            (40, 40, 40, 40, true)
        );
        assert!(check_cost(&c, &LIMITS).is_err());
        let one = cost("mutation { executePlaybook(path: \"p\") { id } }");
        assert_eq!((one.executes, one.aliases), (1, 0));
        assert!(check_cost(&one, &LIMITS).is_ok());
    }

    #[test]
    fn fragments_and_inline_fragments_count_where_they_are_spread() {
        let c = cost(
            "mutation { ...A ... on Mutation { c: executePlaybook(path: \"p\") { id } } }
             fragment A on Mutation { a: executePlaybook(path: \"p\") { id } ...B ...B }
             fragment B on Mutation { b: cancelExecution(id: \"1\") }",
        );
        assert_eq!((c.root_fields, c.executes, c.noetl_fields), (4, 2, 4));
        assert_eq!(c.aliases, 4);
        // Spread below the root: only its aliases count.
        let c = cost("{ me { ...U } } fragment U on User { a: userId b: email }");
        assert_eq!((c.root_fields, c.aliases), (1, 2));
    }

    #[test]
    fn cycles_end_and_exponential_spreads_saturate_quickly() {
        let c = cost("{ ...A } fragment A on Query { health ...A } ");
        assert_eq!(c.root_fields, 1);
        // 2^60 root fields if expanded: counted in linear time, refused.
        let mut q = String::from("{ ...F0 } ");
        for i in 0..60 {
            q += &format!("fragment F{i} on Query {{ ...F{n} ...F{n} }} ", n = i + 1);
        }
        q += "fragment F60 on Query { health }";
        let started = std::time::Instant::now();
        let c = cost(&q);
        assert_eq!(c.root_fields, 1 << 60);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(check_cost(&c, &LIMITS).is_err());
    }

    #[test]
    fn a_long_fragment_chain_is_refused_not_followed_forever() {
        let mut q = String::from("{ ...F0 } ");
        for i in 0..200 {
            q += &format!("fragment F{i} on Query {{ ...F{} }} ", i + 1);
        }
        q += "fragment F200 on Query { health }";
        let doc = parse_query(&q).unwrap();
        assert!(operation_cost(&doc, None).is_err());
    }

    #[test]
    fn the_named_operation_is_the_one_counted() {
        let q = "query A { health } mutation B { a: executePlaybook(path: \"p\") { id } b: executePlaybook(path: \"p\") { id } }";
        let doc = parse_query(q).unwrap();
        assert_eq!(operation_cost(&doc, Some("A")).unwrap().executes, 0);
        assert_eq!(operation_cost(&doc, Some("B")).unwrap().executes, 2);
        // None selected: only the document's fields count (health, two runs, their ids).
        let none = operation_cost(&doc, None).unwrap();
        assert_eq!(
            (none.fields, none.root_fields, none.mutation),
            (5, 0, false)
        );
    }

    /// The real schema with the guard and the library's own limits (as `build_schema` sets
    /// them), no services: enough for documents refused before any field runs.
    fn guarded_schema() -> async_graphql::Schema<
        super::super::schema::Query,
        super::super::schema::Mutation,
        super::super::subscription::Subscription,
    > {
        let policy = Arc::new(CostPolicy::new(LIMITS, None, None));
        async_graphql::Schema::build(
            super::super::schema::Query,
            super::super::schema::Mutation,
            super::super::subscription::Subscription,
        )
        .extension(CostGuard(policy))
        .limit_depth(16)
        .limit_complexity(1000)
        .limit_recursive_depth(32)
        .finish()
    }

    /// `operations` followed by fragments F0..F30, each spreading the next twice: ~1.5 KB
    /// that expands to 2^30 `userId` fields.
    fn with_exponential_fragments(operations: &str) -> String {
        let mut q = operations.to_owned();
        for i in 0..30 {
            q += &format!("fragment F{i} on User {{ ...F{m} ...F{m} }} ", m = i + 1);
        }
        q + "fragment F30 on User { userId }"
    }

    #[tokio::test]
    async fn the_guarded_schema_refuses_an_exponential_document_at_once() {
        // 2^30 `userId` once expanded, under one root field and no alias: the library's
        // complexity walk alone would take minutes.
        let q = with_exponential_fragments("{ me { ...F0 } } ");
        let schema = guarded_schema();
        let started = std::time::Instant::now();
        let r = schema.execute(q.as_str()).await;
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let code = r.errors[0]
            .extensions
            .as_ref()
            .and_then(|e| e.get("code"))
            .cloned();
        assert_eq!(
            code,
            Some(async_graphql::Value::from(TOO_COSTLY)),
            "{:?}",
            r.errors
        );
    }

    #[tokio::test]
    async fn a_rate_refusal_carries_its_wait_for_the_http_shell() {
        let policy = Arc::new(CostPolicy::new(
            LIMITS,
            crate::ratelimit::parse_rate("1/1m").unwrap(),
            None,
        ));
        let cost = Cost {
            mutation: true,
            ..Cost::default()
        };
        policy.charge("u1", &cost).unwrap();
        let e = policy.charge("u1", &cost).unwrap_err();
        let r = async_graphql::Response::from_errors(vec![e]);
        assert!(retry_after_of(&r).is_some_and(|w| w.secs() >= 1));
        policy.charge("u2", &cost).unwrap();
        // Queries are not mutations.
        policy.charge("u1", &Cost::default()).unwrap();
    }

    #[tokio::test]
    async fn an_unselected_operation_cannot_hide_an_exponential_walk() {
        let q = with_exponential_fragments("query A { health } query B { me { ...F0 } } ");
        let schema = guarded_schema();
        // Selecting the cheap one, naming none, or naming one that is not there.
        for name in [Some("A"), None, Some("Z")] {
            let mut request = async_graphql::Request::new(q.clone());
            if let Some(name) = name {
                request = request.operation_name(name);
            }
            let started = std::time::Instant::now();
            let r = schema.execute(request).await;
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{name:?}"
            );
            let code = r.errors[0]
                .extensions
                .as_ref()
                .and_then(|e| e.get("code"))
                .cloned();
            assert_eq!(
                code,
                Some(async_graphql::Value::from(TOO_COSTLY)),
                "{name:?}: {:?}",
                r.errors
            );
        }
    }

    #[tokio::test]
    async fn an_operations_fields_share_one_set_of_noetl_permits() {
        let permits = NoetlPermits::default();
        let mut held = Vec::new();
        for _ in 0..NOETL_CALLS_AT_ONCE {
            // Each field holds a clone: they all draw on the same permits.
            held.push(permits.clone().acquire().await);
        }
        let next = permits.clone();
        let waiting = tokio::time::timeout(Duration::from_millis(50), next.acquire()).await;
        assert!(waiting.is_err(), "a 17th call waits");
        held.pop();
        let _taken = tokio::time::timeout(Duration::from_secs(1), next.acquire())
            .await
            .expect("a released permit is taken");
    }
}
