//! Steps 7 and 8: differentially private release and the privacy budget.
//!
//! ```text
//! GetFlightInfo: PlanGate::decide → DpQuery ─▶ Privacy::reserve (ledger, durable) ─▶ ticket carries the reservation
//! DoGet:         Privacy::start ─▶ bounded statistics (DataFusion) ─▶ release::add_noise (OpenDP, blocking thread)
//!                ─▶ Privacy::commit (ledger + answer cache) ─▶ HAVING / ORDER BY / LIMIT over the noisy rows ─▶ client
//! ```
//!
//! The budget is charged before anything is read (as BigQuery does): a
//! crash between the charge and the answer costs the consumer budget, never
//! the data subjects privacy. A reservation comes back only when the query
//! fails before it reads data.

pub mod noise;
pub mod release;

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use ring::digest;
use sluice_policy::PrivacyCharge;
use sluice_policy::dp::DpQuery;

use crate::ledger::{self, Account, Charge, Ledger, LedgerError, Period};
use crate::query::QueryError;

/// Schema metadata with the budget left after this query.
pub const REMAINING_EPSILON: &str = "sluice.dp.remaining_epsilon";
pub const REMAINING_DELTA: &str = "sluice.dp.remaining_delta";
/// `true` when the answer is a repeat served from the cache at no cost.
pub const CACHED: &str = "sluice.dp.cached";

/// The privacy side of a ticket.
#[derive(Debug, Clone)]
pub struct PrivacyTicket {
    /// The ledger reservation; `None` for a cached answer (nothing spent).
    pub reservation: Option<String>,
    pub organization: String,
    pub period_key: String,
    pub cache_key: Option<String>,
    /// A cached noisy aggregate (Arrow IPC), served instead of new noise.
    pub cached: Option<Vec<u8>>,
    /// Budget left after this query: ε and δ (None: no budget set).
    pub remaining: Option<(f64, f64)>,
}

/// A privacy-budget reservation held by an approved query that has not
/// started reading. However the query ends before that (its ticket expires
/// or is evicted, its issue fails after the reservation, DoGet refuses it),
/// dropping the hold returns the reservation: no path has to remember to.
pub struct BudgetHold {
    privacy: Arc<Privacy>,
    ticket: Option<PrivacyTicket>,
}

impl BudgetHold {
    pub fn ticket(&self) -> &PrivacyTicket {
        self.ticket
            .as_ref()
            .expect("a hold keeps its ticket until started")
    }

    /// The query is about to read data: from now on the charge stands,
    /// whatever happens (BigQuery's rule; a failure after this point is
    /// never refunded, since it may depend on the data).
    pub fn start(mut self) -> Result<PrivacyTicket, QueryError> {
        let ticket = self
            .ticket
            .take()
            .expect("a hold keeps its ticket until started");
        match self.privacy.start(&ticket) {
            Ok(()) => Ok(ticket),
            Err(e) => {
                // Nothing was read.
                self.privacy.refund(&ticket);
                Err(e)
            }
        }
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.privacy.refund(&ticket);
        }
    }
}

impl std::fmt::Debug for BudgetHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetHold")
            .field("ticket", &self.ticket)
            .finish()
    }
}

/// The budget ledger and the answer cache.
pub struct Privacy {
    ledger: Arc<Ledger>,
}

impl Privacy {
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self { ledger }
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// [`Privacy::reserve`], as a hold that returns the reservation unless
    /// the query starts.
    pub fn hold(
        self: &Arc<Self>,
        charge: &PrivacyCharge,
        query: &DpQuery,
        at: SystemTime,
        expires_at: SystemTime,
    ) -> Result<BudgetHold, QueryError> {
        let ticket = self.reserve(charge, query, at, expires_at)?;
        Ok(BudgetHold {
            privacy: self.clone(),
            ticket: Some(ticket),
        })
    }

    /// Serves a repeat from the cache, or reserves the query's (ε, δ);
    /// over budget is RESOURCE_EXHAUSTED with what remains.
    pub fn reserve(
        &self,
        charge: &PrivacyCharge,
        query: &DpQuery,
        at: SystemTime,
        expires_at: SystemTime,
    ) -> Result<PrivacyTicket, QueryError> {
        let at: DateTime<Utc> = at.into();
        let account = account(charge)?;
        let period_key = account.period.key(at);
        let cache_key = query.cache.then(|| cache_key(charge, query));
        if let Some(key) = &cache_key
            && let Some(answer) = self
                .ledger
                .cache_get(&charge.key, key, &period_key)
                .map_err(ledger_error)?
        {
            let balance = self.ledger.balance(&account, at).map_err(ledger_error)?;
            return Ok(PrivacyTicket {
                reservation: None,
                organization: charge.key.clone(),
                period_key,
                cache_key,
                cached: Some(answer),
                remaining: remaining(charge, &balance),
            });
        }
        let amount = Charge {
            epsilon: ledger::epsilon_units(charge.epsilon).map_err(ledger_error)?,
            delta: ledger::delta_units(charge.delta).map_err(ledger_error)?,
        };
        let ttl = expires_at
            .duration_since(at.into())
            .ok()
            .and_then(|d| chrono::TimeDelta::from_std(d).ok())
            .unwrap_or(ledger::DEFAULT_TICKET_TTL);
        let reservation = blocking(|| self.ledger.reserve_with_ttl(&account, amount, at, ttl))
            .map_err(ledger_error)?;
        Ok(PrivacyTicket {
            reservation: Some(reservation.id),
            organization: charge.key.clone(),
            remaining: remaining(charge, &reservation.remaining),
            period_key: reservation.period_key,
            cache_key,
            cached: None,
        })
    }

    /// DoGet is about to read data: from now on the charge stands.
    pub fn start(&self, ticket: &PrivacyTicket) -> Result<(), QueryError> {
        let Some(id) = &ticket.reservation else {
            return Ok(());
        };
        match blocking(|| self.ledger.start(id)).map_err(ledger_error)? {
            true => Ok(()),
            false => Err(QueryError::TicketRejected(
                "ticket rejected: its privacy-budget reservation was already used or returned; call GetFlightInfo again".into(),
            )),
        }
    }

    /// The query failed before reading data: the reservation comes back.
    pub fn refund(&self, ticket: &PrivacyTicket) {
        if let Some(id) = &ticket.reservation
            && let Err(e) = blocking(|| self.ledger.refund(id))
        {
            tracing::error!(error = %e, reservation = %id, "could not return a privacy-budget reservation");
        }
    }

    /// The answer is about to leave: the charge is final, and the answer is
    /// kept for identical repeats.
    pub fn commit(&self, ticket: &PrivacyTicket, answer: &RecordBatch) -> Result<(), QueryError> {
        if let Some(id) = &ticket.reservation {
            blocking(|| self.ledger.commit(id)).map_err(ledger_error)?;
        }
        if let (Some(key), None) = (&ticket.cache_key, &ticket.cached) {
            // A concurrent identical query may have stored its answer
            // first; both were charged, so releasing either is sound.
            let bytes = encode(answer)?;
            blocking(|| {
                self.ledger
                    .cache_put(&ticket.organization, key, &ticket.period_key, &bytes)
            })
            .map_err(ledger_error)?;
        }
        Ok(())
    }

    /// Tickets that expired unredeemed read nothing: their reservations
    /// come back.
    pub fn expire(&self, now: SystemTime) {
        match self.ledger.expire_unstarted(now.into()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(reservations = n, "returned the budget of expired tickets"),
            Err(e) => tracing::error!(error = %e, "could not expire privacy-budget reservations"),
        }
    }
}

/// Runs a ledger call (an fsync, 0.3 ms here, milliseconds on real disks)
/// without stalling the other tasks of a multi-threaded runtime's worker.
pub(crate) fn blocking<T>(call: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

fn account(charge: &PrivacyCharge) -> Result<Account, QueryError> {
    let (limit_epsilon, limit_delta, period) = match &charge.budget {
        Some(b) => (
            ledger::epsilon_limit_units(b.epsilon).map_err(ledger_error)?,
            ledger::delta_limit_units(b.delta).map_err(ledger_error)?,
            Period::parse(&b.period).unwrap_or(Period::Total),
        ),
        None => (i64::MAX, i64::MAX, Period::Total),
    };
    Ok(Account {
        organization: charge.key.clone(),
        dataset: charge.dataset.clone(),
        period,
        limit_epsilon,
        limit_delta,
    })
}

fn remaining(charge: &PrivacyCharge, balance: &ledger::Balance) -> Option<(f64, f64)> {
    charge.budget.as_ref()?;
    Some((
        ledger::epsilon_from_units(balance.limit_epsilon - balance.spent_epsilon),
        ledger::delta_from_units(balance.limit_delta - balance.spent_delta),
    ))
}

/// Same organization, same approved plan (parameters are bound into it),
/// same ε and δ: the same answer. The plans are compared with the columns
/// they do not use pruned away, since a query is planned against its
/// caller's view: asked directly or through a broker (whose view may be
/// narrower), the same question reads the same columns.
fn cache_key(charge: &PrivacyCharge, query: &DpQuery) -> String {
    let plan = without_unused_columns(&query.plan);
    let stats_plan = without_unused_columns(&query.stats_plan);
    // Everything the noisy answer depends on: the bounded statistics plan
    // (clamps, per-unit caps), each statistic's sensitivity and share, the
    // groups and the noise, so that a query decided under other DP terms
    // (say, a broker's stricter grant) never gets this answer.
    let text = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n{:?}\n{:?}\n{:?} {} {}",
        charge.key,
        charge.dataset,
        charge.epsilon,
        charge.delta,
        plan.display_indent_schema(),
        stats_plan.display_indent_schema(),
        query.statistics,
        query.groups,
        query.noise,
        query.max_groups,
        query.max_rows
    );
    crate::identity::hex(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
}

/// `plan` as DataFusion's projection pruning leaves it, for comparing.
fn without_unused_columns(
    plan: &datafusion::logical_expr::LogicalPlan,
) -> datafusion::logical_expr::LogicalPlan {
    use datafusion::optimizer::optimize_projections::OptimizeProjections;
    use datafusion::optimizer::{OptimizerContext, OptimizerRule};
    OptimizeProjections::new()
        .rewrite(plan.clone(), &OptimizerContext::new())
        .map(|t| t.data)
        .unwrap_or_else(|_| plan.clone())
}

fn ledger_error(e: LedgerError) -> QueryError {
    match e {
        LedgerError::Exhausted { .. } => QueryError::ResourcesExhausted(e.to_string()),
        other => {
            tracing::error!(error = %other, "privacy ledger failure");
            QueryError::Internal(format!("the privacy ledger failed: {other}"))
        }
    }
}

/// Arrow IPC bytes of a noisy aggregate (schema metadata included).
pub fn encode(batch: &RecordBatch) -> Result<Vec<u8>, QueryError> {
    let mut out = Vec::new();
    let failed = |e: datafusion::arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let mut writer = StreamWriter::try_new(&mut out, &batch.schema()).map_err(failed)?;
    writer.write(batch).map_err(failed)?;
    writer.finish().map_err(failed)?;
    drop(writer);
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<RecordBatch, QueryError> {
    let failed = |e: datafusion::arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let reader = StreamReader::try_new(Cursor::new(bytes), None).map_err(failed)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(failed)?;
    datafusion::arrow::compute::concat_batches(&schema, &batches).map_err(failed)
}

/// The schema announced at GetFlightInfo for a DP query: the finishing plan
/// over an empty noisy table that carries each output's noise metadata, so
/// clients that read the FlightInfo schema (ADBC does) see it too.
pub fn announced_schema(
    query: &DpQuery,
    state: &datafusion::execution::SessionState,
) -> Result<SchemaRef, QueryError> {
    let (schema, split) = release::announced(query).map_err(|e| match e {
        release::PlanNoiseError::EpsilonTooSmall { .. } => {
            QueryError::InvalidRequest(e.to_string())
        }
        release::PlanNoiseError::Mechanism(_) => {
            tracing::error!(error = %e, "planning the noise of a DP query failed");
            QueryError::Internal(e.to_string())
        }
    })?;
    let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let source = datafusion::datasource::provider_as_source(Arc::new(table));
    let plan = query
        .finish_plan(source)
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let plan = crate::query::plan::analyze(state, plan)?;
    let finished = plan.schema().as_arrow().clone();
    let metadata = HashMap::from([(release::BUDGET_SPLIT.to_string(), split)]);
    Ok(Arc::new(finished.with_metadata(metadata)))
}

/// The schema a DP answer streams with: the advertised one, with the noisy
/// columns' metadata (carried through the finishing plan by position) and
/// the query's budget facts.
pub fn result_schema(
    advertised: &SchemaRef,
    finished: &Schema,
    extra: HashMap<String, String>,
) -> SchemaRef {
    let fields: Vec<_> = advertised
        .fields()
        .iter()
        .zip(finished.fields())
        .map(|(field, executed)| {
            let mut metadata = field.metadata().clone();
            metadata.extend(executed.metadata().clone());
            field.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    let mut metadata = advertised.metadata().clone();
    metadata.extend(extra);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}
