//! The life of a query, one module per step:
//!
//! ```text
//! GetFlightInfo:  (planning slot) → plan::parse → plan::plan → plan::analyze → (agreements) → PlanGate::decide → release::advertised_schema → quota → budget hold → ticket → audit (decision)
//! DoGet:          ticket::verify → ticket::redeem → (agreements still active) → execution slot → execute::start → audit (release) → release::conform → rows::RowMeter → client → audit (completion)
//! ```
//!
//! Identity (step 1) comes from [`crate::identity`]; the decision and rewrite
//! (steps 3–4) from the [`PlanGate`] in `sluice-policy`. [`QueryEngine`] ties
//! the steps together and knows nothing about Flight: the protocol layer in
//! [`crate::flight`] translates requests into these calls.
//!
//! Shared capacity is shared fairly: planning and execution slots are capped
//! per organization ([`slots::FairSlots`]), outstanding tickets per principal
//! and organization ([`ticket::TenantCaps`]), and a query holds only what it
//! uses: its budget reservation is a [`privacy::BudgetHold`] owned by its
//! pending ticket, returned on every path that does not read data, and rows
//! are taken from the daily quota as they leave (`rows::RowMeter`).

mod constants;
pub mod deadline;
mod error;
pub mod execute;
mod explain;
pub mod guard;
pub mod plan;
pub mod release;
mod rows;
pub mod slots;
pub mod ticket;
mod total;
mod view;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use futures::{Stream, StreamExt};
use ring::digest;
use sluice_policy::dp::DpQuery;
use sluice_policy::{Approval, DecisionRecord, Principal, QueryContext};
use tokio::time::Instant;

pub use error::{QueryError, human_bytes};
use execute::{ExecutionLimits, Executor};
use rows::RowMeter;
use slots::{FairSlots, Slot};
use ticket::{Claims, PendingQueries, PendingQuery, TicketSigner};

use crate::agreements::Agreements;
use crate::audit::{self, Audit, Completion, PlanFacts, Receipt};
use crate::catalog::Catalog;
use crate::config::Limits;
use crate::privacy::{self, BudgetHold, Privacy, PrivacyTicket};
use crate::quota::QuotaStore;
use crate::usage_policy::PolicyHandle;

/// How long a GetFlightInfo waits for a planning slot before it is told the
/// connector is busy.
const PLANNING_WAIT: Duration = Duration::from_secs(30);

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
            ),
            planning: FairSlots::new(
                limits.max_concurrent_queries,
                limits.max_concurrent_queries_per_organization,
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
    /// the decision needs (a grant may require one).
    fn with_agreements(&self, request: &QueryContext) -> Result<QueryContext, QueryError> {
        let consumer = &request.principal;
        let mut active = self.active_agreements(consumer, request)?;
        // A relayed query may also rest on the broker's own grant, and so on
        // the broker's agreements for the offers that grant makes; never on
        // them for the end consumer's offers.
        if let Some(broker) = request.principal.via.as_deref() {
            let gate = self.policy.current();
            if let Some(policy) = gate.policy_set() {
                let direct = consumer.direct();
                for (offer, agreement) in self.active_agreements(broker, request)? {
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

    fn active_agreements(
        &self,
        principal: &Principal,
        request: &QueryContext,
    ) -> Result<std::collections::BTreeMap<String, sluice_policy::ActiveAgreement>, QueryError>
    {
        let organization = audit::organization_key(principal);
        self.agreements
            .active(&organization, request.purpose.as_deref(), request.at)
            .map_err(|e| {
                tracing::error!(error = %e, "reading agreements failed");
                QueryError::Internal(
                    "the agreement store cannot be read (see the connector log)".into(),
                )
            })
    }

    /// Tickets issued and not yet redeemed or expired.
    pub fn outstanding_tickets(&self) -> usize {
        self.pending.purge_expired(SystemTime::now());
        self.pending.len()
    }

    /// Drops the tickets that expired unredeemed; each returns its budget.
    pub fn purge_expired(&self) {
        self.pending.purge_expired(SystemTime::now());
    }

    /// Parses and plans SQL against `principal`'s view of the catalog
    /// (what it may not use does not exist for it); the plan may hold
    /// parameter placeholders.
    async fn plan_sql(&self, principal: &Principal, sql: &str) -> Result<LogicalPlan, QueryError> {
        let state = self.catalog.session().state();
        let statement = plan::parse(&state, sql, self.limits.max_sql_bytes)?;
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
        let organization = audit::organization_key(&request.principal);
        let slot = self
            .planning
            .acquire(&organization, Instant::now() + PLANNING_WAIT)
            .await
            .map_err(|_| {
                QueryError::ResourcesExhausted(format!(
                    "the connector is busy planning other queries of your organization (at most {} at once, limits.max_concurrent_queries_per_organization); try again shortly",
                    self.planning.per_organization()
                ))
            })?;
        let engine = self.clone();
        self.executor
            .spawn(async move {
                let _slot = slot;
                work(engine).await
            })
            .await
            .map_err(|e| QueryError::Internal(format!("the planning task failed: {e}")))?
    }

    /// Refuses, on the record, a principal that no plan could be allowed
    /// for: the decision on a plan that reads nothing fails only when no
    /// consumer entry admits the principal (or its broker is not trusted).
    fn refuse_strangers(&self, request: &QueryContext) -> Result<(), QueryError> {
        let nothing = LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(datafusion::common::DFSchema::empty()),
        });
        match self.policy.current().decide(request, nothing) {
            Ok(_) => Ok(()),
            Err(denial) => {
                self.recorded_refusal(request, &PlanFacts::default(), QueryError::from(denial))
            }
        }
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
    /// NULL parameters, so a forbidden statement fails here).
    pub async fn prepare(
        self: &Arc<Self>,
        request: QueryContext,
        sql: String,
    ) -> Result<(LogicalPlan, SchemaRef, SchemaRef), QueryError> {
        self.planned(&request.clone(), move |engine| async move {
            let plan = engine.plan_sql(&request.principal, &sql).await?;
            let parameters = Arc::new(plan::parameter_schema(&plan)?);
            let results = engine.prepared_schema(&request, &plan)?;
            Ok((plan, parameters, results))
        })
        .await
    }

    async fn issue_for_sql(
        &self,
        request: &QueryContext,
        sql: &str,
    ) -> Result<IssuedTicket, QueryError> {
        if let Some(query) = explain::strip_explain_policy(sql) {
            let request = self.with_agreements(request)?;
            let plan = self.plan_sql(&request.principal, query).await?;
            let state = self.catalog.session().state();
            let analyzed = plan::analyze(&state, plan)?;
            let gate = self.policy.current();
            let explanation =
                explain::explain(gate.decide(&request, analyzed), gate.version(), |plan| {
                    gate.describe_plan(&request.principal, plan)
                })?;
            let approval = Approval {
                plan: explanation,
                record: DecisionRecord::explain(gate.version()),
                dp: None,
            };
            let issued = self.ticket(&request, approval, None, None)?;
            return self.recorded_approval(&request, issued);
        }
        let plan = match self.plan_sql(&request.principal, sql).await {
            Ok(plan) => plan,
            Err(e) => return self.recorded_refusal(request, &PlanFacts::default(), e),
        };
        self.issue(request, plan, None)
    }

    /// Analyzes a plan (binding `params` first, if any), asks the policy,
    /// charges the quota and issues a ticket for the approved plan. The
    /// decision, allowed or not, is in the audit log when this returns.
    fn issue(
        &self,
        request: &QueryContext,
        plan: LogicalPlan,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<IssuedTicket, QueryError> {
        let mut facts = PlanFacts {
            purpose: request.purpose.clone(),
            ..PlanFacts::default()
        };
        let issued = self
            .with_agreements(request)
            .and_then(|request| self.issue_approved(&request, plan, params, &mut facts));
        match issued {
            Ok(issued) => self.recorded_approval(request, issued),
            Err(e) => self.recorded_refusal(request, &facts, e),
        }
    }

    /// Appends the decision record of an issued ticket. A ticket whose
    /// decision cannot be recorded is withdrawn (and what it held returned).
    fn recorded_approval(
        &self,
        request: &QueryContext,
        mut issued: IssuedTicket,
    ) -> Result<IssuedTicket, QueryError> {
        let entry = audit::allowed(
            request,
            &issued.decision,
            &issued.plan_hash,
            &issued.query_id,
        );
        match self.audit.append(entry) {
            Ok(receipt) => {
                issued.receipt = receipt;
                Ok(issued)
            }
            Err(e) => {
                drop(self.pending.cancel(&issued.query_id));
                Err(e)
            }
        }
    }

    /// Appends the record of a refusal and names its receipt in the error.
    fn recorded_refusal<T>(
        &self,
        request: &QueryContext,
        facts: &PlanFacts,
        error: QueryError,
    ) -> Result<T, QueryError> {
        let entry = audit::refused(
            "decision",
            &request.principal,
            &self.policy.version(),
            facts,
            &error,
        );
        Err(match self.audit.append(entry) {
            Ok(Some(receipt)) => error.recorded(receipt.receipt_id),
            Ok(None) | Err(_) => error,
        })
    }

    fn issue_approved(
        &self,
        request: &QueryContext,
        plan: LogicalPlan,
        params: Option<Vec<ScalarValue>>,
        facts: &mut PlanFacts,
    ) -> Result<IssuedTicket, QueryError> {
        let state = self.catalog.session().state();
        let plan = match params {
            Some(values) => plan::bind(plan, values)?,
            None => plan,
        };
        let analyzed = plan::analyze(&state, plan)?;
        facts.plan_hash = Some(crate::identity::hex(&plan_hash(&analyzed)));
        facts.datasets = plan::scanned_tables(&analyzed);
        // The policy's check walks the whole plan (lineage through every
        // join): synchronous work that must not hold a runtime worker.
        let gate = self.policy.current();
        let Approval { plan, record, dp } =
            self::guard::blocking(|| gate.decide(request, analyzed))?;
        // The rewrite injected filters and masks: coerce their types too.
        let plan = plan::analyze(&state, plan)?;
        let dp = match dp {
            Some(mut query) => {
                query.stats_plan = plan::analyze(&state, query.stats_plan)?;
                Some(query)
            }
            None => None,
        };
        // Everything about the noise that can fail is decided now, before
        // the budget is reserved and long before any data is read.
        let announced = match &dp {
            Some(query) => Some(privacy::announced_schema(query, &state)?),
            None => None,
        };
        // So is everything in the statistics plan that can fail without
        // reading data (folding constants, evaluating those that fold to an
        // error): such a failure comes before the reservation, as a plain
        // refusal, not after it as a withheld answer.
        if let Some(query) = &dp {
            self.executor.check_before_data(
                &self.catalog,
                &query.stats_plan,
                self.limits_from_now(),
            )?;
        }
        // Checked before anything is charged; the insert checks again.
        self.pending.check_room(&request.principal)?;
        if let Some(charge) = &record.quota {
            self.quotas.admit(charge, request.at)?;
        }
        let expires_at = SystemTime::now() + self.limits.ticket_ttl;
        let budget = match (&dp, &record.privacy) {
            (Some(query), Some(charge)) => {
                Some(self.privacy.hold(charge, query, request.at, expires_at)?)
            }
            _ => None,
        };
        let approval = Approval { plan, record, dp };
        self.ticket(request, approval, budget.zip(announced), Some(expires_at))
    }

    /// The result schema announced when a statement is prepared. The policy
    /// decides now, with every parameter bound to a NULL of its type (a
    /// decision never depends on values), so a forbidden statement fails at
    /// once and the schema is the one DoGet will stream. Execution decides
    /// again with the bound values.
    fn prepared_schema(
        &self,
        request: &QueryContext,
        plan: &LogicalPlan,
    ) -> Result<SchemaRef, QueryError> {
        let request = &self.with_agreements(request)?;
        let state = self.catalog.session().state();
        let plan = match plan::parameter_schema(plan)?.fields() {
            fields if fields.is_empty() => plan.clone(),
            fields => {
                let nulls = fields
                    .iter()
                    .map(|f| ScalarValue::try_from(f.data_type()).unwrap_or(ScalarValue::Null))
                    .collect();
                plan::bind(plan.clone(), nulls)?
            }
        };
        let analyzed = plan::analyze(&state, plan)?;
        let Approval { plan, record, .. } = self.policy.current().decide(request, analyzed)?;
        let plan = plan::analyze(&state, plan)?;
        Ok(release::with_classification(
            release::advertised_schema(&plan),
            &record,
        ))
    }

    /// Signs a ticket for an approved plan and keeps the plan (with the
    /// budget it holds, if any) until DoGet. `private`: the budget hold of
    /// a DP query and the noisy schema announced for it.
    fn ticket(
        &self,
        request: &QueryContext,
        approval: Approval,
        private: Option<(BudgetHold, SchemaRef)>,
        expires_at: Option<SystemTime>,
    ) -> Result<IssuedTicket, QueryError> {
        let expires_at = expires_at.unwrap_or_else(|| SystemTime::now() + self.limits.ticket_ttl);
        let decision = approval.record.clone();
        let mut schema =
            release::with_classification(release::advertised_schema(&approval.plan), &decision);
        let (budget, reservation) = match (private, &decision.privacy) {
            (Some((budget, announced)), Some(charge)) => {
                schema = privacy::result_schema(&schema, &announced, announced.metadata().clone());
                schema = release::with_privacy(schema, charge, Some(budget.ticket()));
                let reservation = budget.ticket().reservation.clone().unwrap_or_default();
                (Some(budget), reservation)
            }
            _ => (None, String::new()),
        };
        let ordered = release::is_ordered(&approval.plan);
        let plan_hash = plan_hash(&approval.plan);
        let principal = &request.principal;
        let pending = PendingQuery {
            principal_id: ticket::holder_id(principal),
            organization: audit::organization_key(principal),
            approval,
            schema: schema.clone(),
            plan_hash: plan_hash.clone(),
            expires_at,
            budget,
        };
        // Refused, the pending query is dropped and its budget comes back.
        let id = self.pending.insert(pending, SystemTime::now())?;
        let ticket = self.signer.sign(&Claims {
            version: 1,
            query_id: id.to_vec(),
            principal_id: ticket::holder_id(principal),
            expires_at_ms: ticket::unix_ms(expires_at),
            plan_hash: plan_hash.clone(),
            policy_version: decision.policy_version.clone(),
            reservation,
        });
        Ok(IssuedTicket {
            query_id: crate::identity::hex(&id),
            ticket,
            schema,
            expires_at,
            ordered,
            decision,
            plan_hash: crate::identity::hex(&plan_hash),
            receipt: None,
        })
    }

    /// DoGet: verifies the ticket for `principal` and starts executing the
    /// plan it names. Waits for a free execution slot up to the query's
    /// deadline.
    pub async fn redeem(
        &self,
        principal: &Principal,
        ticket: &[u8],
    ) -> Result<QueryRun, QueryError> {
        let mut facts = PlanFacts::default();
        match self.redeem_recorded(principal, ticket, &mut facts).await {
            Ok(run) => Ok(run),
            // Rejected tickets, revoked agreements and failures before the
            // release are on record too.
            Err(e) => {
                let version = self.policy.version();
                let entry = audit::refused("release", principal, &version, &facts, &e);
                Err(match self.audit.append(entry) {
                    Ok(Some(receipt)) => e.recorded(receipt.receipt_id),
                    _ => e,
                })
            }
        }
    }

    async fn redeem_recorded(
        &self,
        principal: &Principal,
        ticket: &[u8],
        facts: &mut PlanFacts,
    ) -> Result<QueryRun, QueryError> {
        let claims = self.signer.verify(ticket, principal, SystemTime::now())?;
        let query_id = crate::identity::hex(&claims.query_id);
        facts.query_id = Some(query_id.clone());
        let pending = self.pending.redeem(&claims)?;
        *facts = PlanFacts {
            plan_hash: Some(crate::identity::hex(&pending.plan_hash)),
            datasets: pending.approval.record.datasets.clone(),
            purpose: pending.approval.record.purpose.clone(),
            query_id: Some(query_id.clone()),
        };
        // Until the budget is started below, any error drops `pending` and
        // with it the budget hold: nothing was read, the budget comes back.
        let (slot, deadline) = self.start_run(&claims, &pending).await?;
        let limits = ExecutionLimits {
            deadline,
            ..self.limits_from_now()
        };
        let PendingQuery {
            approval,
            schema,
            budget,
            plan_hash,
            ..
        } = pending;
        let cached = budget.as_ref().is_some_and(|b| b.ticket().cached.is_some());
        let release = audit::release(
            principal,
            &approval.record,
            &crate::identity::hex(&plan_hash),
            &query_id,
            cached,
        );
        let record = approval.record;
        // A DP answer uses its slot for the statistics; finishing runs over
        // a few noisy rows in memory.
        let (plan, schema, slot) = match (approval.dp, budget) {
            (Some(query), Some(budget)) => {
                let ticket = budget.start()?;
                let (plan, schema) = self
                    .private_answer(*query, &ticket, &schema, limits, slot)
                    .await?;
                (plan, schema, None)
            }
            _ => (approval.plan, schema, Some(slot)),
        };
        // A revocation during the wait for a slot or the noise still counts,
        // and nothing leaves before its release is on record.
        self.check_agreements(&record)?;
        let receipt = self.audit.append(release.clone())?;
        let completion = receipt
            .as_ref()
            .map(|r| Completion::new(self.audit.clone(), &release, r));
        let receiver = self
            .executor
            .start(self.catalog.clone(), plan, limits, slot);
        let conform_to = schema.clone();
        let batches = tokio_stream::wrappers::ReceiverStream::new(receiver)
            .map(move |item| item.and_then(|batch| release::conform(batch, &conform_to)));
        let mut batches: Batches = Box::pin(batches);
        if let Some(charge) = record.quota {
            batches = RowMeter::new(self.quotas.clone(), charge).meter(batches);
        }
        Ok(QueryRun {
            query_id,
            schema,
            batches,
            receipt,
            completion,
        })
    }

    /// Checks what must hold before anything is read, and waits for an
    /// execution slot (fairly shared between organizations).
    async fn start_run(
        &self,
        claims: &Claims,
        pending: &PendingQuery,
    ) -> Result<(Slot, Instant), QueryError> {
        let in_force = self.policy.version();
        if !pending.approval.record.is_explanation() && claims.policy_version != in_force {
            return Err(QueryError::TicketRejected(format!(
                "ticket rejected: the usage policy changed since it was issued ({} → {in_force}); call GetFlightInfo again",
                claims.policy_version
            )));
        }
        let reservation = pending
            .budget
            .as_ref()
            .and_then(|b| b.ticket().reservation.clone())
            .unwrap_or_default();
        if claims.reservation != reservation {
            return Err(QueryError::TicketRejected(
                "ticket rejected: it names another privacy-budget reservation".into(),
            ));
        }
        self.check_agreements(&pending.approval.record)?;
        let deadline = Instant::now() + self.limits.query_timeout;
        let slot = self
            .executions
            .acquire(&pending.organization, deadline)
            .await
            .map_err(|_| {
                let (all, own) = self.executions.held(&pending.organization);
                QueryError::ResourcesExhausted(format!(
                    "the connector is busy: {all} queries are running ({own} of your organization's; limits.max_concurrent_queries = {}, per organization {}) and no slot came free within the query's time limit",
                    self.executions.total(),
                    self.executions.per_organization()
                ))
            })?;
        Ok((slot, deadline))
    }

    /// A ticket is only as good as the agreements it was issued under: one
    /// revoked or expired since makes it useless.
    fn check_agreements(&self, decision: &DecisionRecord) -> Result<(), QueryError> {
        let now = SystemTime::now();
        for id in &decision.agreements {
            let active = self.agreements.is_active(id, now).map_err(|e| {
                tracing::error!(error = %e, "reading agreements failed");
                QueryError::Internal(
                    "the agreement store cannot be read (see the connector log)".into(),
                )
            })?;
            if !active {
                return Err(QueryError::Denied(sluice_policy::Denial {
                    kind: sluice_policy::DenialKind::Precondition,
                    rule: "agreement".into(),
                    message: format!(
                        "agreement `{id}` is no longer active (revoked or expired) since this ticket was issued; request a new agreement"
                    ),
                }));
            }
        }
        Ok(())
    }

    /// Computes (or fetches from the cache) the noisy aggregate of a DP
    /// query, commits its charge, and returns the plan that finishes the
    /// answer from it with the schema it streams.
    ///
    /// Whether a DP query is answered, and which error it gets, may depend
    /// on the query, the policy and the budget, never on the data: the
    /// statistics plan cannot fail on a value, everything about the noise
    /// was checked at GetFlightInfo, and any failure that is left (a limit
    /// reached, a read error) ends in one error that says nothing about
    /// which, with the budget charged.
    async fn private_answer(
        &self,
        query: DpQuery,
        ticket: &PrivacyTicket,
        advertised: &SchemaRef,
        limits: ExecutionLimits,
        slot: Slot,
    ) -> Result<(LogicalPlan, SchemaRef), QueryError> {
        let noisy = match &ticket.cached {
            Some(bytes) => {
                drop(slot);
                privacy::decode(bytes)?
            }
            None => {
                let noisy = self
                    .noisy_aggregate(&query, limits, slot)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "a differentially private answer failed after its budget was charged");
                        QueryError::PrivateAnswerWithheld
                    })?;
                self.privacy.commit(ticket, &noisy)?;
                noisy
            }
        };
        let table =
            datafusion::datasource::MemTable::try_new(noisy.schema(), vec![vec![noisy.clone()]])
                .map_err(|e| QueryError::Internal(e.to_string()))?;
        let source = datafusion::datasource::provider_as_source(Arc::new(table));
        let plan = query
            .finish_plan(source)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let state = self.catalog.session().state();
        let plan = plan::analyze(&state, plan)?;
        let mut extra = noisy.schema().metadata().clone();
        extra.insert(privacy::CACHED.into(), ticket.cached.is_some().to_string());
        let schema = privacy::result_schema(advertised, plan.schema().as_arrow(), extra);
        Ok((plan, schema))
    }

    /// The bounded statistics (DataFusion, in the query's slot) with OpenDP
    /// noise (on a blocking thread), as the aggregate's noisy rows.
    async fn noisy_aggregate(
        &self,
        query: &DpQuery,
        limits: ExecutionLimits,
        slot: Slot,
    ) -> Result<RecordBatch, QueryError> {
        let receiver = self.executor.start(
            self.catalog.clone(),
            query.stats_plan.clone(),
            limits,
            Some(slot),
        );
        let batches: Vec<RecordBatch> = tokio_stream::wrappers::ReceiverStream::new(receiver)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let exact =
            privacy::release::exact_statistics(query, &batches).map_err(QueryError::Internal)?;
        let for_noise = query.clone();
        let noisy =
            tokio::task::spawn_blocking(move || privacy::release::add_noise(&for_noise, exact))
                .await
                .map_err(|e| QueryError::Internal(format!("the noise task failed: {e}")))?
                .map_err(|e| QueryError::Internal(format!("adding noise failed: {e}")))?;
        let mut metadata = noisy.batch.schema().metadata().clone();
        metadata.insert(privacy::release::BUDGET_SPLIT.into(), noisy.split.clone());
        let schema = Arc::new(
            noisy
                .batch
                .schema()
                .as_ref()
                .clone()
                .with_metadata(metadata),
        );
        noisy
            .batch
            .with_schema(schema)
            .map_err(|e| QueryError::Internal(e.to_string()))
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
