//! The life of a query, one module per step:
//!
//! ```text
//! GetFlightInfo:  plan::parse → plan::plan → plan::analyze → (agreements) → PlanGate::decide → release::advertised_schema → ticket → audit (decision)
//! DoGet:          ticket::verify → ticket::redeem → (agreements still active) → execute::start → audit (release) → release::conform → client → audit (completion)
//! ```
//!
//! Identity (step 1) comes from [`crate::identity`]; the decision and rewrite
//! (steps 3–4) from the [`PlanGate`] in `sluice-policy`. [`QueryEngine`] ties
//! the steps together and knows nothing about Flight: the protocol layer in
//! [`crate::flight`] translates requests into these calls.

pub mod deadline;
mod error;
pub mod execute;
mod explain;
pub mod plan;
pub mod release;
pub mod ticket;

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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use error::{QueryError, human_bytes};
use execute::{ExecutionLimits, Executor};
use ticket::{Claims, PendingQueries, PendingQuery, TicketSigner};

use crate::agreements::Agreements;
use crate::audit::{self, Audit, Completion, PlanFacts, Receipt};
use crate::catalog::Catalog;
use crate::config::Limits;
use crate::privacy::{self, Privacy, PrivacyTicket};
use crate::quota::QuotaStore;
use crate::usage_policy::PolicyHandle;

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
    pub batches: std::pin::Pin<Box<dyn Stream<Item = Result<RecordBatch, QueryError>> + Send>>,
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
    permits: Arc<Semaphore>,
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
            pending: PendingQueries::new(limits.max_outstanding_tickets),
            permits: Arc::new(Semaphore::new(limits.max_concurrent_queries)),
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

    /// Parses and plans SQL; the plan may hold parameter placeholders.
    pub async fn plan_sql(&self, sql: &str) -> Result<LogicalPlan, QueryError> {
        let state = self.catalog.session().state();
        let statement = plan::parse(&state, sql, self.limits.max_sql_bytes)?;
        plan::plan(&state, &self.catalog, statement).await
    }

    /// GetFlightInfo for a SQL statement (or `EXPLAIN POLICY <query>`).
    pub async fn issue_for_sql(
        &self,
        request: &QueryContext,
        sql: &str,
    ) -> Result<IssuedTicket, QueryError> {
        if let Some(query) = explain::strip_explain_policy(sql) {
            let request = self.with_agreements(request)?;
            let plan = self.plan_sql(query).await?;
            let state = self.catalog.session().state();
            let analyzed = plan::analyze(&state, plan)?;
            let gate = self.policy.current();
            let explanation =
                explain::explain(gate.decide(&request, analyzed), gate.version(), |plan| {
                    gate.describe_plan(&request.principal, plan)
                })?;
            let issued = self.ticket(
                &request,
                explanation,
                DecisionRecord::explain(gate.version()),
                None,
            )?;
            return self.recorded_approval(&request, issued);
        }
        let plan = match self.plan_sql(sql).await {
            Ok(plan) => plan,
            Err(e) => return self.recorded_refusal(request, &PlanFacts::default(), e),
        };
        self.issue(request, plan, None)
    }

    /// Analyzes a plan (binding `params` first, if any), asks the policy,
    /// charges the quota and issues a ticket for the approved plan. The
    /// decision, allowed or not, is in the audit log when this returns.
    pub fn issue(
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
    /// decision cannot be recorded is withdrawn.
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
                if let Some(pending) = self.pending.cancel(&issued.query_id)
                    && let Some(ticket) = &pending.privacy
                {
                    self.privacy.refund(ticket);
                }
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
        let Approval { plan, record, dp } = self.policy.current().decide(request, analyzed)?;
        // The rewrite injected filters and masks: coerce their types too.
        let mut plan = plan::analyze(&state, plan)?;
        let dp = match dp {
            Some(mut query) => {
                query.stats_plan = plan::analyze(&state, query.stats_plan)?;
                Some(query)
            }
            None => None,
        };
        let mut rows_quota = None;
        if let Some(charge) = &record.quota {
            let reservation = self.quotas.reserve(charge, record.max_rows, request.at)?;
            if let Some(rows) = reservation.rows {
                plan = plan::cap_rows(plan, rows)?;
                rows_quota = Some(RowsReserved {
                    key: charge.key.clone(),
                    rows,
                    at: request.at,
                });
            }
        }
        let expires_at = SystemTime::now() + self.limits.ticket_ttl;
        let privacy = match (&dp, &record.privacy) {
            (Some(query), Some(charge)) => Some(
                self.privacy
                    .reserve(charge, query, request.at, expires_at)?,
            ),
            _ => None,
        };
        self.ticket_with(
            request,
            Approval { plan, record, dp },
            rows_quota,
            privacy,
            expires_at,
        )
    }

    /// The result schema announced when a statement is prepared. The policy
    /// decides now, with every parameter bound to a NULL of its type (a
    /// decision never depends on values), so a forbidden statement fails at
    /// once and the schema is the one DoGet will stream. Execution decides
    /// again with the bound values.
    pub fn prepared_schema(
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

    /// Signs a ticket for an approved plan and keeps the plan until DoGet.
    fn ticket(
        &self,
        request: &QueryContext,
        plan: LogicalPlan,
        decision: DecisionRecord,
        rows_quota: Option<RowsReserved>,
    ) -> Result<IssuedTicket, QueryError> {
        let approval = Approval {
            plan,
            record: decision,
            dp: None,
        };
        let expires_at = SystemTime::now() + self.limits.ticket_ttl;
        self.ticket_with(request, approval, rows_quota, None, expires_at)
    }

    fn ticket_with(
        &self,
        request: &QueryContext,
        approval: Approval,
        rows_quota: Option<RowsReserved>,
        privacy: Option<PrivacyTicket>,
        expires_at: SystemTime,
    ) -> Result<IssuedTicket, QueryError> {
        let decision = approval.record.clone();
        let mut schema =
            release::with_classification(release::advertised_schema(&approval.plan), &decision);
        if let (Some(query), Some(charge)) = (&approval.dp, &decision.privacy) {
            let state = self.catalog.session().state();
            let announced = privacy::announced_schema(query, &state).inspect_err(|_| {
                if let Some(ticket) = &privacy {
                    self.privacy.refund(ticket);
                }
            })?;
            schema = privacy::result_schema(&schema, &announced, announced.metadata().clone());
            schema = release::with_privacy(schema, charge, privacy.as_ref());
        }
        let ordered = release::is_ordered(&approval.plan);
        let plan_hash = plan_hash(&approval.plan);
        let now = SystemTime::now();
        let principal = &request.principal;
        let reservation = privacy
            .as_ref()
            .and_then(|p| p.reservation.clone())
            .unwrap_or_default();
        let pending = PendingQuery {
            principal_id: ticket::holder_id(principal),
            approval,
            schema: schema.clone(),
            plan_hash: plan_hash.clone(),
            expires_at,
            rows_quota,
            privacy: privacy.clone(),
        };
        let id = match self.pending.insert(pending, now) {
            Ok(id) => id,
            Err(e) => {
                if let Some(p) = &privacy {
                    self.privacy.refund(p);
                }
                return Err(e);
            }
        };
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
        let privacy = pending.privacy.clone();
        *facts = PlanFacts {
            plan_hash: Some(crate::identity::hex(&pending.plan_hash)),
            datasets: pending.approval.record.datasets.clone(),
            purpose: pending.approval.record.purpose.clone(),
            query_id: Some(query_id.clone()),
        };
        let rows_quota = pending.rows_quota.clone();
        let started = self.start_run(&claims, pending).await;
        if started.is_err() {
            // Nothing was read: the reservations come back.
            if let Some(ticket) = &privacy {
                self.privacy.refund(ticket);
            }
            if let Some(rows) = &rows_quota {
                self.return_rows(rows);
            }
        }
        let (pending, deadline, permit) = started?;
        let limits = ExecutionLimits {
            memory: self.limits.query_memory,
            deadline,
            timeout: self.limits.query_timeout,
        };
        let PendingQuery {
            approval,
            schema,
            rows_quota,
            privacy,
            plan_hash,
            ..
        } = pending;
        let cached = privacy.as_ref().is_some_and(|p| p.cached.is_some());
        let release = audit::release(
            principal,
            &approval.record,
            &crate::identity::hex(&plan_hash),
            &query_id,
            cached,
        );
        let approval_record = approval.record.clone();
        // A DP answer uses its slot for the statistics; finishing runs over
        // a few noisy rows in memory.
        let (plan, schema, permit) = match (approval.dp, privacy) {
            (Some(query), Some(ticket)) => {
                let (plan, schema) = self
                    .private_answer(*query, &ticket, &schema, limits, permit)
                    .await?;
                (plan, schema, None)
            }
            _ => (approval.plan, schema, Some(permit)),
        };
        // A revocation during the wait for a slot or the noise still counts,
        // and nothing leaves before its release is on record.
        let recorded = self
            .check_agreements(&approval_record)
            .and_then(|()| self.audit.append(release.clone()));
        let receipt = match recorded {
            Ok(receipt) => receipt,
            Err(e) => {
                if let Some(rows) = &rows_quota {
                    self.return_rows(rows);
                }
                return Err(e);
            }
        };
        let completion = receipt
            .as_ref()
            .map(|r| Completion::new(self.audit.clone(), &release, r));
        let receiver = self
            .executor
            .start(self.catalog.clone(), plan, limits, permit);
        let conform_to = schema.clone();
        let batches = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let rows = rows_quota.map(|reserved| RowCounter::new(self.quotas.clone(), reserved));
        let batches = batches.map(move |item| {
            let batch = item.and_then(|batch| release::conform(batch, &conform_to))?;
            if let Some(counter) = &rows {
                counter.sent(batch.num_rows());
            }
            Ok(batch)
        });
        Ok(QueryRun {
            query_id,
            schema,
            batches: Box::pin(batches),
            receipt,
            completion,
        })
    }

    /// Checks what must hold before anything is read, and waits for an
    /// execution slot.
    async fn start_run(
        &self,
        claims: &Claims,
        pending: PendingQuery,
    ) -> Result<(PendingQuery, Instant, OwnedSemaphorePermit), QueryError> {
        let in_force = self.policy.version();
        if !pending.approval.record.is_explanation() && claims.policy_version != in_force {
            return Err(QueryError::TicketRejected(format!(
                "ticket rejected: the usage policy changed since it was issued ({} → {in_force}); call GetFlightInfo again",
                claims.policy_version
            )));
        }
        let reservation = pending
            .privacy
            .as_ref()
            .and_then(|p| p.reservation.clone())
            .unwrap_or_default();
        if claims.reservation != reservation {
            return Err(QueryError::TicketRejected(
                "ticket rejected: it names another privacy-budget reservation".into(),
            ));
        }
        self.check_agreements(&pending.approval.record)?;
        let deadline = Instant::now() + self.limits.query_timeout;
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                QueryError::ResourcesExhausted(format!(
                    "the connector is busy: {} queries are running (limits.max_concurrent_queries) and none finished within the query's time limit",
                    self.limits.max_concurrent_queries
                ))
            })?
            .map_err(|_| QueryError::Internal("the connector is shutting down".into()))?;
        if let Some(ticket) = &pending.privacy {
            self.privacy.start(ticket)?;
        }
        Ok((pending, deadline, permit))
    }

    /// Gives a refused query's reserved rows back to its daily quota.
    fn return_rows(&self, rows: &RowsReserved) {
        self.quotas
            .settle(&rows.key, rows.rows, 0, rows.at, SystemTime::now());
        self.quotas.flush();
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
    async fn private_answer(
        &self,
        query: DpQuery,
        ticket: &PrivacyTicket,
        advertised: &SchemaRef,
        limits: ExecutionLimits,
        permit: OwnedSemaphorePermit,
    ) -> Result<(LogicalPlan, SchemaRef), QueryError> {
        let noisy = match &ticket.cached {
            Some(bytes) => {
                drop(permit);
                privacy::decode(bytes)?
            }
            None => {
                let receiver = self.executor.start(
                    self.catalog.clone(),
                    query.stats_plan.clone(),
                    limits,
                    Some(permit),
                );
                let batches: Vec<RecordBatch> =
                    tokio_stream::wrappers::ReceiverStream::new(receiver)
                        .collect::<Vec<_>>()
                        .await
                        .into_iter()
                        .collect::<Result<_, _>>()?;
                let exact = privacy::release::exact_statistics(&query, &batches)
                    .map_err(QueryError::Internal)?;
                let for_noise = query.clone();
                let noisy = tokio::task::spawn_blocking(move || {
                    privacy::release::add_noise(&for_noise, exact)
                })
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
                let batch = noisy
                    .batch
                    .with_schema(schema)
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                self.privacy.commit(ticket, &batch)?;
                batch
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

    /// The ticket lifetime, for FlightEndpoint.expiration_time.
    pub fn ticket_ttl(&self) -> Duration {
        self.limits.ticket_ttl
    }
}

/// Rows reserved against a daily quota when the ticket was issued.
#[derive(Debug, Clone)]
pub struct RowsReserved {
    pub key: String,
    pub rows: u64,
    pub at: SystemTime,
}

/// Counts the rows a stream sends; when the stream ends (or is dropped)
/// returns the unsent part of the reservation and writes the usage.
struct RowCounter {
    quotas: Arc<QuotaStore>,
    reserved: RowsReserved,
    sent: std::sync::atomic::AtomicU64,
}

impl RowCounter {
    fn new(quotas: Arc<QuotaStore>, reserved: RowsReserved) -> Self {
        Self {
            quotas,
            reserved,
            sent: Default::default(),
        }
    }

    fn sent(&self, rows: usize) {
        self.sent
            .fetch_add(rows as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for RowCounter {
    fn drop(&mut self) {
        let sent = self.sent.load(std::sync::atomic::Ordering::Relaxed);
        let r = &self.reserved;
        self.quotas
            .settle(&r.key, r.rows, sent, r.at, SystemTime::now());
        self.quotas.flush();
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
