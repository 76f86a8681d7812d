//! GetFlightInfo (and CreatePreparedStatement): plan, decide, take holds,
//! issue the ticket, record the decision.
//!
//! ```text
//! issue:   plan ─▶ decide (PlanGate, DP noise planned) ─▶ take holds (quota, ε/δ) ─▶ ticket ─▶ record
//! prepare: plan ─▶ decide (parameters bound to NULL) ─▶ record
//! ```
//!
//! Every decision, allowed or refused, is in the audit log when these
//! return: refusals carry the receipt of their record.

use std::sync::Arc;
use std::time::SystemTime;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use sluice_policy::dp::DpQuery;
use sluice_policy::{Approval, DecisionRecord, QueryContext};

use super::holds::Holds;
use super::ticket::{Claims, PendingQuery};
use super::{IssuedTicket, QueryEngine, QueryError, explain, plan, plan_hash, private, release};
use crate::audit::{self, PlanFacts};
use crate::blocking::blocking;

/// A plan the policy allowed, ready for its ticket: the approval (with the
/// DP statistics plan, if any) and, for a DP query, the schema announced
/// with its noise.
pub(super) struct Decided {
    approval: Approval,
    announced: Option<SchemaRef>,
}

impl QueryEngine {
    /// Refuses, on the record, a principal that no plan could be allowed
    /// for: the decision on a plan that reads nothing fails only when no
    /// consumer entry admits the principal (or its broker is not trusted).
    pub(super) fn refuse_strangers(&self, request: &QueryContext) -> Result<(), QueryError> {
        let nothing = LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(datafusion::common::DFSchema::empty()),
        });
        match self.policy.current().decide(request, nothing) {
            Ok(_) => Ok(()),
            Err(denial) => self.recorded_refusal(
                "decision",
                request,
                &PlanFacts::default(),
                QueryError::from(denial),
            ),
        }
    }

    /// GetFlightInfo for SQL text: `EXPLAIN POLICY` is answered with the
    /// explanation (holding nothing); anything else is planned and issued.
    pub(super) async fn issue_for_sql(
        &self,
        request: &QueryContext,
        sql: &str,
    ) -> Result<IssuedTicket, QueryError> {
        if let Some(query) = explain::strip_explain_policy(sql) {
            let request = self.with_agreements(request)?;
            let plan = self.plan_sql(&request.principal, query).await?;
            let organization = audit::organization_key(&request.principal);
            let explanation = match self.explain_plan(&request, &organization, plan).await {
                Ok(explanation) => explanation,
                Err(e) => {
                    return self.recorded_refusal("decision", &request, &PlanFacts::default(), e);
                }
            };
            let gate = self.policy.current();
            let approval = Approval {
                plan: explanation,
                record: DecisionRecord::explain(gate.version()),
                dp: None,
            };
            let decided = Decided {
                approval,
                announced: None,
            };
            let expires_at = SystemTime::now() + self.limits.ticket_ttl;
            let issued = self.ticket(&request, decided, Holds::default(), expires_at)?;
            return self.recorded_approval(&request, issued);
        }
        let plan = match self.plan_sql(&request.principal, sql).await {
            Ok(plan) => plan,
            Err(e) => return self.recorded_refusal("decision", request, &PlanFacts::default(), e),
        };
        self.issue(request, plan, None)
    }

    /// The one-row `EXPLAIN POLICY` answer for `plan`: the decision on it
    /// for `request` (whose agreements are filled in) and, when allowed,
    /// where it would run.
    /// Its execution slot, if it takes one, is `organization`'s.
    async fn explain_plan(
        &self,
        request: &QueryContext,
        organization: &str,
        plan: LogicalPlan,
    ) -> Result<LogicalPlan, QueryError> {
        let state = self.catalog.session().state();
        let analyzed = plan::analyze(&state, plan)?;
        let gate = self.policy.current();
        let decision = gate.decide(request, analyzed);
        let stages = match &decision {
            Ok(approval) => self.explain_stages(organization, approval).await?,
            Err(_) => String::new(),
        };
        explain::explain(decision, gate.version(), &stages, |plan| {
            gate.describe_plan(&request.principal, plan)
        })
    }

    /// `EXPLAIN POLICY <sql>` as `request`'s principal would see it, for a
    /// provider `admin`'s playground (the web console). Nothing is issued
    /// or recorded in that principal's name (it did not ask): the audit
    /// record names the admin, and the planning slot is the admin's.
    pub async fn explain_as(
        self: &Arc<Self>,
        admin: &sluice_policy::Principal,
        request: QueryContext,
        sql: String,
    ) -> Result<Vec<datafusion::arrow::record_batch::RecordBatch>, QueryError> {
        let mut entry = audit::Entry {
            event: "explain".into(),
            principal: admin.id.clone(),
            organization: Some(audit::organization_key(admin)),
            policy_version: self.policy.version(),
            message: Some(format!("EXPLAIN POLICY as `{}`", request.principal.id)),
            ..audit::Entry::default()
        };
        let organization = audit::organization_key(admin);
        let slots = organization.clone();
        let explained = self
            .planned_for(&organization, move |engine| async move {
                let request = engine.with_agreements(&request)?;
                let query = explain::strip_explain_policy(&sql).unwrap_or(&sql);
                let plan = engine.plan_sql(&request.principal, query).await?;
                let explanation = engine.explain_plan(&request, &slots, plan).await?;
                let state = engine.catalog.session().state();
                datafusion::dataframe::DataFrame::new(state, explanation)
                    .collect()
                    .await
                    .map_err(|e| QueryError::Internal(format!("explaining failed: {e}")))
            })
            .await;
        entry.outcome = match &explained {
            Ok(_) => "explained".into(),
            Err(e) => e.refusal().outcome.into(),
        };
        self.audit.append(entry).map_err(|e| {
            tracing::error!(error = %e, "the audit log cannot be written");
            QueryError::Internal("the audit log cannot be written (see the connector log)".into())
        })?;
        explained
    }

    /// Where an approved query would run, for `EXPLAIN POLICY`: the
    /// stages of the plan that would execute (a DP query's statistics
    /// plan), planned in an execution slot under the query limits, and not
    /// run.
    async fn explain_stages(
        &self,
        organization: &str,
        approval: &Approval,
    ) -> Result<String, QueryError> {
        if self.executor.cluster().is_none() {
            return Ok(explain::ONE_NODE.to_string());
        }
        let plan = match &approval.dp {
            Some(dp) => dp.stats_plan.clone(),
            None => approval.plan.clone(),
        };
        // As `decide` does: the rewrite's filters and masks get their types.
        let plan = plan::analyze(&self.catalog.session().state(), plan)?;
        let slot = self
            .executions
            .acquire(
                organization,
                tokio::time::Instant::now() + self.limits.queue_timeout,
            )
            .await
            .map_err(|why| super::busy(&self.executions, organization, why, "explaining"))?;
        let stages = self
            .executor
            .stages(self.catalog.clone(), plan, self.limits_from_now(), slot)
            .await?;
        Ok(stages.unwrap_or_else(|| explain::ONE_NODE.to_string()))
    }

    /// Decides on a plan (binding `params` first, if any), takes what the
    /// query holds and issues its ticket. The decision, allowed or not, is
    /// in the audit log when this returns.
    pub(super) fn issue(
        &self,
        request: &QueryContext,
        plan: LogicalPlan,
        params: Option<Vec<ScalarValue>>,
    ) -> Result<IssuedTicket, QueryError> {
        let mut facts = PlanFacts {
            purpose: request.purpose.clone(),
            ..PlanFacts::default()
        };
        let issued = self.with_agreements(request).and_then(|request| {
            let decided = self.decide(&request, plan, params, &mut facts)?;
            // Checked before anything is held; the insert checks again.
            self.pending.check_room(&request.principal)?;
            let expires_at = SystemTime::now() + self.limits.ticket_ttl;
            let holds = self.take_holds(&request, &decided.approval, expires_at)?;
            self.ticket(&request, decided, holds, expires_at)
        });
        match issued {
            Ok(issued) => self.recorded_approval(request, issued),
            Err(e) => self.recorded_refusal("decision", request, &facts, e),
        }
    }

    /// CreatePreparedStatement: the planned statement, its parameters and
    /// the schema its results will have (the policy decides at once, with
    /// NULL parameters, so a forbidden statement fails here). The decision
    /// is recorded as a `prepare` event; executing the statement later is a
    /// decision of its own (GetFlightInfo), recorded once.
    pub(super) async fn prepare_recorded(
        &self,
        request: &QueryContext,
        sql: &str,
    ) -> Result<(LogicalPlan, SchemaRef, SchemaRef), QueryError> {
        let mut facts = PlanFacts {
            purpose: request.purpose.clone(),
            ..PlanFacts::default()
        };
        let prepared = match self.plan_sql(&request.principal, sql).await {
            Ok(plan) => plan::parameter_schema(&plan).and_then(|parameters| {
                let (results, record) = self.prepared_schema(request, &plan, &mut facts)?;
                Ok((plan, parameters, results, record))
            }),
            Err(e) => Err(e),
        };
        match prepared {
            Ok((plan, parameters, results, record)) => {
                let hash = facts.plan_hash.clone().unwrap_or_default();
                let entry = audit::prepared(request, &record, &hash);
                self.audit.append(entry)?;
                Ok((plan, Arc::new(parameters), results))
            }
            Err(e) => self.recorded_refusal("prepare", request, &facts, e),
        }
    }

    /// Steps 2–4: analyzes the plan, asks the policy (check and rewrite),
    /// and for a DP query decides everything about its noise that can fail,
    /// all before anything is held or read.
    fn decide(
        &self,
        request: &QueryContext,
        plan: LogicalPlan,
        params: Option<Vec<ScalarValue>>,
        facts: &mut PlanFacts,
    ) -> Result<Decided, QueryError> {
        let state = self.catalog.session().state();
        let plan = match params {
            Some(values) => plan::bind(plan, values)?,
            None => plan,
        };
        let analyzed = plan::analyze(&state, plan)?;
        facts.plan_hash = Some(hex::encode(plan_hash(&analyzed)));
        facts.datasets = plan::scanned_tables(&analyzed);
        // The policy's check walks the whole plan (lineage through every
        // join): synchronous work that must not hold a runtime worker.
        let gate = self.policy.current();
        let Approval { plan, record, dp } = blocking(|| gate.decide(request, analyzed))?;
        // The rewrite injected filters and masks: coerce their types too.
        let plan = plan::analyze(&state, plan)?;
        let dp = match dp {
            Some(mut query) => {
                query.stats_plan = plan::analyze(&state, query.stats_plan)?;
                if let Some(auto) = &mut query.auto {
                    auto.plan = plan::analyze(&state, auto.plan.clone())?;
                }
                // A cached answer is served only while the data it was
                // computed from is unchanged (docs/sources.md, live data).
                match self.catalog.cache_version(&record.datasets) {
                    Some(version) => query.data_version = version,
                    None => query.cache = false,
                }
                Some(query)
            }
            None => None,
        };
        // Everything about the noise that can fail is decided now, before
        // the budget is reserved and long before any data is read. So is
        // everything in the statistics plan that can fail without reading
        // data (folding constants, evaluating those that fold to an error):
        // such a failure comes before the reservation, as a plain refusal,
        // not after it as a withheld answer.
        let announced = match &dp {
            Some(query) => {
                let announced = private::announced_schema(query, &state)?;
                self.executor.check_before_data(
                    &self.catalog,
                    &query.stats_plan,
                    self.limits_from_now(),
                )?;
                if let Some(auto) = &query.auto {
                    self.executor.check_before_data(
                        &self.catalog,
                        &auto.plan,
                        self.limits_from_now(),
                    )?;
                    self.check_tightest_bounds(query, &state)?;
                }
                Some(announced)
            }
            None => None,
        };
        Ok(Decided {
            approval: Approval { plan, record, dp },
            announced,
        })
    }

    /// Takes what an approved query holds until DoGet: one of the day's
    /// queries, and for a DP query its (ε, δ) (reserved durably: blocking).
    /// If the budget is refused, the quota hold is dropped and given back.
    fn take_holds(
        &self,
        request: &QueryContext,
        approval: &Approval,
        expires_at: SystemTime,
    ) -> Result<Holds, QueryError> {
        let query = match &approval.record.quota {
            Some(charge) => Some(self.quotas.hold(charge, request.at)?),
            None => None,
        };
        let budget = match (&approval.dp, &approval.record.privacy) {
            (Some(dp), Some(charge)) => Some(blocking(|| {
                self.privacy.hold(charge, dp, request.at, expires_at)
            })?),
            _ => None,
        };
        Ok(Holds::new(query, budget))
    }

    /// Step 5: signs a ticket for an approved plan and keeps the plan, with
    /// what it holds, until DoGet.
    fn ticket(
        &self,
        request: &QueryContext,
        decided: Decided,
        holds: Holds,
        expires_at: SystemTime,
    ) -> Result<IssuedTicket, QueryError> {
        let Decided {
            approval,
            announced,
        } = decided;
        let decision = approval.record.clone();
        let mut schema =
            release::with_classification(release::advertised_schema(&approval.plan), &decision);
        if let (Some(announced), Some(charge)) = (&announced, &decision.privacy) {
            schema =
                sluice_privacy::result_schema(&schema, announced, announced.metadata().clone());
            schema = release::with_privacy(schema, charge, holds.privacy());
        }
        let reservation = holds.reservation();
        let ordered = release::is_ordered(&approval.plan);
        let plan_hash = plan_hash(&approval.plan);
        let principal = &request.principal;
        let pending = PendingQuery {
            principal_id: super::ticket::holder_id(principal),
            organization: audit::organization_key(principal),
            approval,
            schema: schema.clone(),
            plan_hash: plan_hash.clone(),
            expires_at,
            // What is left of the TTL, on the clock that cannot be stepped.
            deadline: std::time::Instant::now()
                + expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default(),
            holds,
        };
        // Refused, the pending query is dropped and its holds come back.
        let id = self.pending.insert(pending, SystemTime::now())?;
        let ticket = self.signer.sign(&Claims {
            version: 1,
            query_id: id.to_vec(),
            principal_id: super::ticket::holder_id(principal),
            expires_at_ms: super::ticket::unix_ms(expires_at),
            plan_hash: plan_hash.clone(),
            policy_version: decision.policy_version.clone(),
            reservation,
        });
        Ok(IssuedTicket {
            query_id: hex::encode(id),
            ticket,
            schema,
            expires_at,
            ordered,
            decision,
            plan_hash: hex::encode(&plan_hash),
            receipt: None,
        })
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
        facts: &mut PlanFacts,
    ) -> Result<(SchemaRef, DecisionRecord), QueryError> {
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
        facts.plan_hash = Some(hex::encode(plan_hash(&analyzed)));
        facts.datasets = plan::scanned_tables(&analyzed);
        let gate = self.policy.current();
        let Approval { plan, record, .. } = blocking(|| gate.decide(request, analyzed))?;
        let plan = plan::analyze(&state, plan)?;
        let schema = release::with_classification(release::advertised_schema(&plan), &record);
        Ok((schema, record))
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
                Err(e.into())
            }
        }
    }

    /// Puts a refused request that is not a query (a metadata call, a write,
    /// a transaction) on the audit log as event `request`, naming `method`,
    /// and returns the error with the receipt of its record.
    pub fn refused_on_record(
        &self,
        method: &str,
        principal: &sluice_policy::Principal,
        error: QueryError,
    ) -> QueryError {
        let mut refusal = error.refusal();
        refusal.message = format!("{method}: {}", refusal.message);
        let entry = audit::refused(
            "request",
            principal,
            &self.policy.version(),
            &PlanFacts::default(),
            refusal,
        );
        match self.audit.append(entry) {
            Ok(Some(receipt)) => error.recorded(receipt.receipt_id),
            Ok(None) | Err(_) => error,
        }
    }

    /// A query with `auto` bounds is answered by a plan built after the
    /// charge, from bounds somewhere between the worst case (checked as
    /// the query itself) and the tightest: check the tightest too, so a
    /// failure of either shape is a refusal before the reservation rather
    /// than a withheld answer after it.
    fn check_tightest_bounds(
        &self,
        query: &DpQuery,
        state: &datafusion::execution::SessionState,
    ) -> Result<(), QueryError> {
        let tightest = query
            .with_tightest()
            .map_err(|e| QueryError::Internal(format!("planning with the tightest bounds: {e}")))?;
        let Some(mut tightest) = tightest else {
            return Ok(());
        };
        tightest.stats_plan = plan::analyze(state, tightest.stats_plan)?;
        private::announced_schema(&tightest, state)?;
        self.executor
            .check_before_data(&self.catalog, &tightest.stats_plan, self.limits_from_now())
    }

    /// Appends the record of a refusal (`event`: `decision`, `prepare`) and
    /// names its receipt in the error.
    pub(super) fn recorded_refusal<T>(
        &self,
        event: &str,
        request: &QueryContext,
        facts: &PlanFacts,
        error: QueryError,
    ) -> Result<T, QueryError> {
        let entry = audit::refused(
            event,
            &request.principal,
            &self.policy.version(),
            facts,
            error.refusal(),
        );
        Err(match self.audit.append(entry) {
            Ok(Some(receipt)) => error.recorded(receipt.receipt_id),
            Ok(None) | Err(_) => error,
        })
    }
}
