//! What an approved query holds between GetFlightInfo and DoGet.
//!
//! A query that may read data takes its holds before its ticket is issued:
//! one of its organization's queries for the day ([`QuotaHold`]) and, for a
//! differentially private query, its (ε, δ) in the ledger ([`BudgetHold`]).
//! The pending ticket owns them. Redeemed, they are settled: the query
//! counts, the budget is spent. However else the query ends (a later step
//! of the issue fails, the decision cannot be recorded, the ticket expires,
//! is evicted or withdrawn, DoGet refuses it before reading), dropping the
//! holds gives both back; no path has to remember to. The budget goes back
//! through the ledger's settlement thread (a refund is an fsync, and a drop
//! may happen on an async worker); the quota hold is in memory.
//!
//! Rows are not held: they are taken from the day's allowance as they
//! leave (`rows.rs`), so a query holds no rows it has not sent.

use sluice_policy::QuotaCharge;
use sluice_privacy::{BudgetHold, PrivacyTicket};

use super::QueryError;
use crate::quota::QuotaHold;

#[derive(Debug, Default)]
pub struct Holds {
    query: Option<QuotaHold>,
    budget: Option<BudgetHold>,
}

impl Holds {
    pub fn new(query: Option<QuotaHold>, budget: Option<BudgetHold>) -> Self {
        Self { query, budget }
    }

    /// The privacy side of the ticket, if the query holds budget.
    pub fn privacy(&self) -> Option<&PrivacyTicket> {
        self.budget.as_ref().map(BudgetHold::ticket)
    }

    /// The reservation id the ticket must name (empty when none).
    pub fn reservation(&self) -> String {
        self.privacy()
            .and_then(|t| t.reservation.clone())
            .unwrap_or_default()
    }

    /// DoGet is about to read data: the query counts against the day's
    /// queries, and its budget is spent from now on whatever happens.
    /// Either step refused gives back what is left (by drop). Blocking:
    /// both commit to the ledger's database.
    pub fn settle(self, quota: Option<&QuotaCharge>) -> Result<Option<PrivacyTicket>, QueryError> {
        let Holds { query, budget } = self;
        if let (Some(hold), Some(charge)) = (query, quota) {
            hold.settle(charge)?;
        }
        match budget {
            Some(budget) => Ok(Some(budget.start()?)),
            None => Ok(None),
        }
    }
}
