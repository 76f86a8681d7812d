//! The life of a query, one module per step:
//!
//! ```text
//! GetFlightInfo:  plan::parse → plan::plan → plan::analyze → PlanGate::decide → release::advertised_schema → ticket
//! DoGet:          ticket::verify → ticket::redeem → execute::start → release::conform → client
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
use futures::Stream;
use ring::digest;
use sluice_policy::{Approval, DecisionRecord, Principal, QueryContext};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use error::{QueryError, human_bytes};
use execute::{ExecutionLimits, Executor};
use ticket::{Claims, PendingQueries, PendingQuery, TicketSigner};

use crate::catalog::Catalog;
use crate::config::Limits;
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
    pub decision: DecisionRecord,
}

/// A query being executed for DoGet.
pub struct QueryRun {
    pub query_id: String,
    pub schema: SchemaRef,
    pub batches: std::pin::Pin<Box<dyn Stream<Item = Result<RecordBatch, QueryError>> + Send>>,
}

/// Plans, decides, issues tickets for and executes queries.
pub struct QueryEngine {
    catalog: Arc<Catalog>,
    policy: Arc<PolicyHandle>,
    quotas: Arc<QuotaStore>,
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
        quotas: Arc<QuotaStore>,
        limits: Limits,
        executor: Executor,
    ) -> Self {
        Self {
            pending: PendingQueries::new(limits.max_outstanding_tickets),
            permits: Arc::new(Semaphore::new(limits.max_concurrent_queries)),
            signer: TicketSigner::generate(),
            catalog,
            policy,
            quotas,
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
            let plan = self.plan_sql(query).await?;
            let state = self.catalog.session().state();
            let analyzed = plan::analyze(&state, plan)?;
            let gate = self.policy.current();
            let explanation =
                explain::explain(gate.decide(request, analyzed), gate.version(), |plan| {
                    gate.describe_plan(&request.principal, plan)
                })?;
            return self.ticket(
                request,
                explanation,
                DecisionRecord::explain(gate.version()),
                None,
            );
        }
        let plan = self.plan_sql(sql).await?;
        self.issue(request, plan, None)
    }

    /// Analyzes a plan (binding `params` first, if any), asks the policy,
    /// charges the quota and issues a ticket for the approved plan.
    pub fn issue(
        &self,
        request: &QueryContext,
        plan: LogicalPlan,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<IssuedTicket, QueryError> {
        let state = self.catalog.session().state();
        let plan = match params {
            Some(values) => plan::bind(plan, values)?,
            None => plan,
        };
        let analyzed = plan::analyze(&state, plan)?;
        let Approval { plan, record } = self.policy.current().decide(request, analyzed)?;
        // The rewrite injected filters and masks: coerce their types too.
        let mut plan = plan::analyze(&state, plan)?;
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
        self.ticket(request, plan, record, rows_quota)
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
        let Approval { plan, record } = self.policy.current().decide(request, analyzed)?;
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
        let schema = release::with_classification(release::advertised_schema(&plan), &decision);
        let ordered = release::is_ordered(&plan);
        let plan_hash = plan_hash(&plan);
        let now = SystemTime::now();
        let expires_at = now + self.limits.ticket_ttl;
        let principal = &request.principal;
        let id = self.pending.insert(
            PendingQuery {
                principal_id: principal.id.clone(),
                approval: Approval {
                    plan,
                    record: decision.clone(),
                },
                schema: schema.clone(),
                plan_hash: plan_hash.clone(),
                expires_at,
                rows_quota,
            },
            now,
        )?;
        let ticket = self.signer.sign(&Claims {
            version: 1,
            query_id: id.to_vec(),
            principal_id: principal.id.clone(),
            expires_at_ms: ticket::unix_ms(expires_at),
            plan_hash,
            policy_version: decision.policy_version.clone(),
        });
        Ok(IssuedTicket {
            query_id: crate::identity::hex(&id),
            ticket,
            schema,
            expires_at,
            ordered,
            decision,
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
        let claims = self.signer.verify(ticket, principal, SystemTime::now())?;
        let pending = self.pending.redeem(&claims)?;
        let in_force = self.policy.version();
        if !pending.approval.record.is_explanation() && claims.policy_version != in_force {
            return Err(QueryError::TicketRejected(format!(
                "ticket rejected: the usage policy changed since it was issued ({} → {in_force}); call GetFlightInfo again",
                claims.policy_version
            )));
        }
        let query_id = crate::identity::hex(&claims.query_id);
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
        let limits = ExecutionLimits {
            memory: self.limits.query_memory,
            deadline,
            timeout: self.limits.query_timeout,
        };
        let receiver =
            self.executor
                .start(self.catalog.clone(), pending.approval.plan, limits, permit);
        let schema = pending.schema;
        let conform_to = schema.clone();
        let batches = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let rows = pending
            .rows_quota
            .map(|reserved| RowCounter::new(self.quotas.clone(), reserved));
        let batches = futures::StreamExt::map(batches, move |item| {
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
        })
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
