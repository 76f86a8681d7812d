//! The life of a query. One function per RPC, each reading as its steps:
//!
//! ```text
//! GetFlightInfo  issue::issue      plan (plan.rs, bounded_dialect.rs, view.rs) → decide (PlanGate; DP: private.rs) → take holds (holds.rs: quota, ε/δ) → ticket (ticket.rs) → record the decision
//! Prepare        issue::prepare_recorded   plan → decide with NULL parameters → record the decision (`prepare`)
//! DoGet          redeem::redeem    verify → redeem → slot (slots.rs) → settle holds → [DP: private.rs] → record the release → execute (execute.rs) → conform (release.rs) → meter rows (rows.rs) → record the completion
//! ```
//!
//! Identity (step 1) comes from [`crate::identity`]; the decision and rewrite
//! (steps 3–4) from the [`PlanGate`] in `sluice-policy`. [`QueryEngine`] ties
//! the steps together and knows nothing about Flight: the protocol layer in
//! The Flight SQL service translates requests into these calls.
//!
//! Shared capacity is shared fairly: planning and execution slots are capped
//! per organization ([`slots::FairSlots`]), outstanding tickets per principal
//! and organization ([`ticket::TenantCaps`]), and a query holds only what it
//! uses: its quota and budget holds are owned by its pending ticket and
//! returned on every path that does not read data (`holds.rs`), and rows
//! are taken from the daily quota as they leave (`rows::RowMeter`).

pub mod bounded_dialect;
mod constants;
mod error;
pub mod execute;
mod explain;
mod holds;
mod independent;
mod issue;
pub mod plan;
mod private;
mod redeem;
pub mod release;
mod rows;
pub mod slots;
pub mod ticket;
mod unit_shuffle;
mod view;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use futures::Stream;
use ring::digest;
use sluice_policy::{DecisionRecord, Principal, QueryContext};
use tokio::time::Instant;

pub use error::QueryError;
use execute::{ExecutionLimits, Executor};
use slots::FairSlots;
use ticket::{PendingQueries, TicketSigner};

use crate::agreements::Agreements;
use crate::audit::{self, Audit, Completion, Receipt};
use crate::catalog::Catalog;
use crate::config::Limits;
use crate::quota::QuotaStore;
use crate::usage_policy::PolicyHandle;
use sluice_privacy::Privacy;

/// The queue in front of the planning and execution slots.
fn queue_limits(limits: &Limits) -> slots::QueueLimits {
    slots::QueueLimits {
        total: limits.max_queued_queries,
        per_organization: limits.max_queued_queries_per_organization,
    }
}

/// The refusal when no slot was handed out: it says which limit was
/// reached and what to do. It counts only the caller's own organization's
/// queries: how busy other tenants are is not the caller's to learn.
fn busy(slots: &FairSlots, organization: &str, why: slots::NoSlot, work: &str) -> QueryError {
    let (_, own) = slots.held(organization);
    let queue = slots.queue();
    let reason = match why {
        slots::NoSlot::QueueFull => format!(
            "the queue of waiting queries is full (limits.max_queued_queries = {}, per organization {})",
            queue.total, queue.per_organization
        ),
        slots::NoSlot::TimedOut => "no slot came free within limits.queue_timeout".to_string(),
    };
    QueryError::ResourcesExhausted(format!(
        "the connector is busy {work}: your organization has {own} running (limits.max_concurrent_queries = {}, per organization {}) and {reason}; retry after a pause",
        slots.total(),
        slots.per_organization()
    ))
}

/// A result on its way to the client.
pub type Batches = Pin<Box<dyn Stream<Item = Result<RecordBatch, QueryError>> + Send>>;

/// A query approved at GetFlightInfo, described by its signed ticket.
#[derive(Debug, Clone)]
pub struct IssuedTicket {
    /// Hex id, for logs.
    pub query_id: String,
    /// Opaque signed ticket bytes.
    pub ticket: Vec<u8>,
    /// The schema DoGet will stream.
    pub schema: SchemaRef,
    pub expires_at: SystemTime,
    /// Whether the result order is meaningful (the plan sorts at the top).
    pub ordered: bool,
    /// Hex SHA-256 of the approved plan, as the ticket binds it.
    pub plan_hash: String,
    pub decision: DecisionRecord,
    /// The receipt of the decision's audit record.
    pub receipt: Option<Receipt>,
}

/// A query being executed for DoGet.
pub struct QueryRun {
    pub query_id: String,
    pub schema: SchemaRef,
    pub batches: Batches,
    /// The receipt of the release record, written before the first batch.
    pub receipt: Option<Receipt>,
    /// Writes the completion record when the stream ends.
    pub completion: Option<Completion>,
}

/// Where the connector keeps account of use: daily quotas, the privacy
/// budget ledger, agreements and the audit log.
pub struct Books {
    pub quotas: Arc<QuotaStore>,
    pub privacy: Arc<Privacy>,
    pub agreements: Arc<Agreements>,
    pub audit: Arc<Audit>,
}

/// Plans, decides, issues tickets for and executes queries.
pub struct QueryEngine {
    catalog: Arc<Catalog>,
    policy: Arc<PolicyHandle>,
    quotas: Arc<QuotaStore>,
    privacy: Arc<Privacy>,
    agreements: Arc<Agreements>,
    audit: Arc<Audit>,
    signer: TicketSigner,
    pending: PendingQueries,
    limits: Limits,
    executor: Executor,
    executions: Arc<FairSlots>,
    planning: Arc<FairSlots>,
}

impl QueryEngine {
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    pub fn new(
        catalog: Arc<Catalog>,
        policy: Arc<PolicyHandle>,
        books: Books,
        limits: Limits,
        executor: Executor,
    ) -> Self {
        Self {
            pending: PendingQueries::new(limits.tickets),
            executions: FairSlots::new(
                limits.max_concurrent_queries,
                limits.max_concurrent_queries_per_organization,
                queue_limits(&limits),
            ),
            planning: FairSlots::new(
                limits.max_concurrent_queries,
                limits.max_concurrent_queries_per_organization,
                queue_limits(&limits),
            ),
            signer: TicketSigner::generate(),
            catalog,
            policy,
            quotas: books.quotas,
            privacy: books.privacy,
            agreements: books.agreements,
            audit: books.audit,
            limits,
            executor,
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn policy_version(&self) -> String {
        self.policy.version()
    }

    pub fn policy(&self) -> &Arc<PolicyHandle> {
        &self.policy
    }

    /// The columns of `dataset` that `principal` may see in listings.
    pub fn visible_columns(
        &self,
        principal: &Principal,
        dataset: &str,
    ) -> Option<Vec<datafusion::arrow::datatypes::Field>> {
        self.policy.current().visible_columns(principal, dataset)
    }

    pub fn privacy(&self) -> &Arc<Privacy> {
        &self.privacy
    }

    pub fn agreements(&self) -> &Arc<Agreements> {
        &self.agreements
    }

    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }

    /// The request with the active agreements of its organization, which
    /// the decision needs (a grant may require one). A token-bound (DSP)
    /// agreement counts only for a query presenting one of its live tokens;
    /// a token that is not live for this principal refuses the query.
    fn with_agreements(&self, request: &QueryContext) -> Result<QueryContext, QueryError> {
        let consumer = &request.principal;
        let unlocked = self.unlocked_agreement(request)?;
        let mut active = self.active_agreements(consumer, request, unlocked.as_deref())?;
        // A relayed query may also rest on the broker's own grant, and so on
        // the broker's agreements for the offers that grant makes; never on
        // them for the end consumer's offers.
        if let Some(broker) = request.principal.via.as_deref() {
            let gate = self.policy.current();
            if let Some(policy) = gate.policy_set() {
                let direct = consumer.direct();
                for (offer, agreement) in self.active_agreements(broker, request, None)? {
                    if policy.offer(broker, &offer).is_some()
                        && policy.offer(&direct, &offer).is_none()
                    {
                        active.insert(offer, agreement);
                    }
                }
            }
        }
        Ok(QueryContext {
            agreements: active,
            ..request.clone()
        })
    }

    /// The agreement the request's access token unlocks, if it presents
    /// one. The same refusal for a token that is unknown, expired, revoked
    /// or another principal's: its holder learns nothing about it.
    fn unlocked_agreement(&self, request: &QueryContext) -> Result<Option<String>, QueryError> {
        let Some(token) = &request.access_token else {
            return Ok(None);
        };
        let refused = || {
            QueryError::Denied(sluice_policy::Denial {
                kind: sluice_policy::DenialKind::Forbidden,
                rule: "access token".into(),
                message: "the access token (authorization: Bearer …) is not valid for you: it is \
                          unknown, expired, revoked (its transfer was suspended, completed or \
                          terminated) or another consumer's. Start a new transfer \
                          (`sluice dsp transfer`) for a new token"
                    .into(),
            })
        };
        if request.principal.via.is_some() {
            return Err(refused());
        }
        let grant = self
            .agreements
            .redeem_token(token.reveal(), &request.principal.id, request.at)?
            .ok_or_else(refused)?;
        Ok(Some(grant.agreement_id))
    }

    fn active_agreements(
        &self,
        principal: &Principal,
        request: &QueryContext,
        unlocked: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, sluice_policy::ActiveAgreement>, QueryError>
    {
        let organization = audit::organization_key(principal);
        Ok(self.agreements.active(
            &organization,
            request.purpose.as_deref(),
            request.at,
            unlocked,
        )?)
    }

    /// Tickets issued and not yet redeemed or expired.
    pub fn outstanding_tickets(&self) -> usize {
        self.pending.purge_expired(SystemTime::now());
        self.pending.len()
    }

    /// Drops the tickets that expired unredeemed; each returns its holds.
    pub fn purge_expired(&self) {
        self.pending.purge_expired(SystemTime::now());
    }

    /// Withdraws every unredeemed ticket (at shutdown); each returns its
    /// holds.
    pub fn withdraw_all(&self) {
        self.pending.withdraw_all();
    }

    /// The daily query and row counters.
    pub fn quotas(&self) -> &Arc<QuotaStore> {
        &self.quotas
    }

    /// Parses and plans SQL against `principal`'s view of the catalog
    /// (what it may not use does not exist for it); the plan may hold
    /// parameter placeholders.
    async fn plan_sql(&self, principal: &Principal, sql: &str) -> Result<LogicalPlan, QueryError> {
        let state = self.catalog.session().state();
        let statement = plan::parse(&state, sql, self.limits.max_sql_bytes)?;
        plan::refuse_unreached(&state, &self.catalog, &statement)?;
        let gate = self.policy.current();
        let view = view::session_for(&state, &self.catalog, gate.as_ref(), principal).await?;
        view::check_tables_visible(&view, &statement)?;
        let plan = plan::plan(&view, &self.catalog, statement).await?;
        view::real_scans(plan)
    }

    /// Runs planning work for `request` on the query runtime, in a planning
    /// slot: never on the threads that accept connections and answer health
    /// checks, and only a few at once per organization, so one tenant's
    /// costly statements cannot stall everyone else's. A principal that no
    /// rule admits is refused before any of that: its refusal is cheap and
    /// takes no shared capacity.
    async fn planned<T, F, Fut>(
        self: &Arc<Self>,
        request: &QueryContext,
        work: F,
    ) -> Result<T, QueryError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, QueryError>> + Send + 'static,
    {
        self.refuse_strangers(request)?;
        self.planned_for(&audit::organization_key(&request.principal), work)
            .await
    }

    /// [`Self::planned`] in a planning slot of `organization`, with no
    /// check of who asks (the caller made it).
    async fn planned_for<T, F, Fut>(
        self: &Arc<Self>,
        organization: &str,
        work: F,
    ) -> Result<T, QueryError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, QueryError>> + Send + 'static,
    {
        let organization = organization.to_string();
        let slot = self
            .planning
            .acquire(&organization, Instant::now() + self.limits.queue_timeout)
            .await
            .map_err(|why| busy(&self.planning, &organization, why, "planning"))?;
        let engine = self.clone();
        self.executor
            .spawn(async move {
                let _slot = slot;
                work(engine).await
            })
            .await
            .map_err(|e| QueryError::Internal(format!("the planning task failed: {e}")))?
    }

    /// GetFlightInfo for a SQL statement (or `EXPLAIN POLICY <query>`).
    pub async fn issue_statement(
        self: &Arc<Self>,
        request: QueryContext,
        sql: String,
    ) -> Result<IssuedTicket, QueryError> {
        self.planned(&request.clone(), move |engine| async move {
            engine.issue_for_sql(&request, &sql).await
        })
        .await
    }

    /// GetFlightInfo for a prepared statement with its bound values.
    pub async fn issue_prepared(
        self: &Arc<Self>,
        request: QueryContext,
        plan: LogicalPlan,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<IssuedTicket, QueryError> {
        self.planned(&request.clone(), move |engine| async move {
            engine.issue(&request, plan, params)
        })
        .await
    }

    /// CreatePreparedStatement: the planned statement, its parameters and
    /// the schema its results will have (the policy decides at once, with
    /// NULL parameters, so a forbidden statement fails here, on the record).
    pub async fn prepare(
        self: &Arc<Self>,
        request: QueryContext,
        sql: String,
    ) -> Result<(LogicalPlan, SchemaRef, SchemaRef), QueryError> {
        self.planned(&request.clone(), move |engine| async move {
            engine.prepare_recorded(&request, &sql).await
        })
        .await
    }

    /// The execution limits of a query that starts now.
    fn limits_from_now(&self) -> ExecutionLimits {
        ExecutionLimits {
            memory: self.limits.query_memory,
            deadline: tokio::time::Instant::now() + self.limits.query_timeout,
            timeout: self.limits.query_timeout,
        }
    }

    /// The ticket lifetime, for FlightEndpoint.expiration_time.
    pub fn ticket_ttl(&self) -> Duration {
        self.limits.ticket_ttl
    }
}

/// SHA-256 of the plan's canonical text (with schemas), binding a ticket to
/// the exact plan that was approved.
fn plan_hash(plan: &LogicalPlan) -> Vec<u8> {
    let text = plan.display_indent_schema().to_string();
    digest::digest(&digest::SHA256, text.as_bytes())
        .as_ref()
        .to_vec()
}
