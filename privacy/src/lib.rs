//! # sluice-privacy: the private pillar
//!
//! Steps 7a and 8 of a query: differentially private release and the
//! privacy budget. [`noise`] builds OpenDP mechanisms, [`release`] turns
//! the exact bounded statistics into a noisy aggregate, [`ledger`] is the
//! durable budget ledger (SQLite), and [`Privacy`] holds, starts, commits
//! and returns a query's budget and keeps the answer cache. No gRPC here:
//! the connector maps [`PrivacyError`] to a status.
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

pub mod ledger;
pub mod noise;
pub mod release;
mod settlement;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use ring::digest;
use sluice_policy::PrivacyCharge;
use sluice_policy::dp::{DpQuery, Period};

use ledger::{Account, Charge, Ledger, LedgerError};
pub use release::{NoisyAggregate, PlanNoiseError, ReleaseError};
use settlement::Settlement;

/// Why a budget could not be reserved, started or committed, or a cached
/// answer not stored or read.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// The ledger refused or failed: [`LedgerError::Exhausted`] when the
    /// charge does not fit in what remains of the budget.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// DoGet presented a ticket whose reservation was already started,
    /// committed or returned.
    #[error(
        "ticket rejected: its privacy-budget reservation was already used or returned; call GetFlightInfo again"
    )]
    ReservationSpent,
    /// A noisy answer could not be written to or read from the cache.
    #[error("the cached differentially private answer cannot be encoded or decoded: {0}")]
    Encoding(#[from] ArrowError),
}

impl PrivacyError {
    /// Whether the budget is used up (as opposed to a fault).
    pub fn is_exhausted(&self) -> bool {
        matches!(self, PrivacyError::Ledger(LedgerError::Exhausted { .. }))
    }
}

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
    pub fn start(mut self) -> Result<PrivacyTicket, PrivacyError> {
        let ticket = self
            .ticket
            .take()
            .expect("a hold keeps its ticket until started");
        match self.privacy.start(&ticket) {
            Ok(()) => Ok(ticket),
            Err(e) => {
                // Nothing was read.
                self.privacy.return_later(&ticket);
                Err(e)
            }
        }
    }
}

impl Drop for BudgetHold {
    /// Returns the reservation through the settlement thread: a drop can
    /// happen anywhere, an async worker included, and a refund is an fsync.
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.privacy.return_later(&ticket);
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
///
/// Every method that writes the ledger commits (an fsync) before it
/// returns: call them where blocking is allowed. Returning a hold is the
/// exception: [`BudgetHold`]'s drop queues the refund for a settlement
/// thread, and [`Privacy::settled`] waits until the queue is empty.
pub struct Privacy {
    ledger: Arc<Ledger>,
    settlement: Settlement,
}

impl Privacy {
    pub fn new(ledger: Arc<Ledger>) -> Self {
        let settlement = Settlement::start(ledger.clone());
        Self { ledger, settlement }
    }

    /// Waits until every refund queued by a dropped hold is in the ledger
    /// (for shutdown, and for tests that read the ledger afterwards).
    pub fn settled(&self) {
        self.settlement.flush();
    }

    fn return_later(&self, ticket: &PrivacyTicket) {
        if let Some(id) = &ticket.reservation {
            self.settlement.refund(id.clone());
        }
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
    ) -> Result<BudgetHold, PrivacyError> {
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
    ) -> Result<PrivacyTicket, PrivacyError> {
        let at: DateTime<Utc> = at.into();
        let account = account(charge)?;
        let period_key = account.period.key(at);
        let cache_key = query.cache.then(|| cache_key(charge, query));
        if let Some(key) = &cache_key
            && let Some(answer) = self.ledger.cache_get(&charge.key, key, &period_key)?
        {
            let balance = self.ledger.balance(&account, at)?;
            return Ok(PrivacyTicket {
                reservation: None,
                organization: charge.key.clone(),
                period_key,
                cache_key,
                cached: Some(answer),
                remaining: remaining(charge, &balance),
            });
        }
        let amount = ledger_charge(charge)?;
        let ttl = expires_at
            .duration_since(at.into())
            .ok()
            .and_then(|d| chrono::TimeDelta::from_std(d).ok())
            .unwrap_or(ledger::DEFAULT_TICKET_TTL);
        let reservation = self.ledger.reserve_with_ttl(&account, amount, at, ttl)?;
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
    pub fn start(&self, ticket: &PrivacyTicket) -> Result<(), PrivacyError> {
        let Some(id) = &ticket.reservation else {
            return Ok(());
        };
        match self.ledger.start(id)? {
            true => Ok(()),
            false => Err(PrivacyError::ReservationSpent),
        }
    }

    /// The answer is about to leave: the charge is final, and the answer is
    /// kept for identical repeats.
    pub fn commit(&self, ticket: &PrivacyTicket, answer: &RecordBatch) -> Result<(), PrivacyError> {
        if let Some(id) = &ticket.reservation {
            self.ledger.commit(id)?;
        }
        if let (Some(key), None) = (&ticket.cache_key, &ticket.cached) {
            // A concurrent identical query may have stored its answer
            // first; both were charged, so releasing either is sound.
            let bytes = encode(answer)?;
            self.ledger
                .cache_put(&ticket.organization, key, &ticket.period_key, &bytes)?;
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

fn account(charge: &PrivacyCharge) -> Result<Account, LedgerError> {
    let (limit_epsilon, limit_delta, period) = match &charge.budget {
        Some(b) => (
            ledger::epsilon_limit_units(b.epsilon)?,
            ledger::delta_limit_units(b.delta)?,
            b.period,
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

/// What the ledger records for a query: its ε and δ, or under zCDP
/// accounting its ρ and its selection's δ.
fn ledger_charge(charge: &PrivacyCharge) -> Result<Charge, LedgerError> {
    Ok(match &charge.zcdp {
        None => Charge {
            epsilon: ledger::epsilon_units(charge.epsilon)?,
            delta: ledger::delta_units(charge.delta)?,
            rho: 0,
        },
        Some(cost) => Charge {
            epsilon: 0,
            delta: ledger::delta_units(cost.delta)?,
            rho: ledger::rho_units(cost.rho)?,
        },
    })
}

fn remaining(charge: &PrivacyCharge, balance: &ledger::Balance) -> Option<(f64, f64)> {
    charge.budget.as_ref()?;
    Some((
        ledger::epsilon_from_units(balance.remaining_epsilon()),
        ledger::delta_from_units(balance.remaining_delta()),
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
    // groups, the noise and the bounds it chooses from the data, so that a
    // query decided under other DP terms (say, a broker's stricter grant)
    // never gets this answer.
    let text = format!(
        "{}\n{}\n{}\n{}\n{:?}\n{}\n{}\n{:?}\n{:?}\n{:?}\n{:?} {} {}\n{}\n{:?} {}",
        charge.key,
        charge.dataset,
        charge.epsilon,
        charge.delta,
        charge.zcdp,
        plan.display_indent_schema(),
        stats_plan.display_indent_schema(),
        query.statistics,
        query.bias,
        query.groups,
        query.noise,
        query.max_groups,
        query.max_rows,
        query.data_version,
        query.auto.as_ref().map(|auto| &auto.choices),
        query.auto_epsilon,
    );
    digest::digest(&digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

/// Arrow IPC bytes of a noisy aggregate (schema metadata included).
pub fn encode(batch: &RecordBatch) -> Result<Vec<u8>, PrivacyError> {
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(out)
}

/// The noisy aggregate [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> Result<RecordBatch, PrivacyError> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(datafusion::arrow::compute::concat_batches(
        &schema, &batches,
    )?)
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
