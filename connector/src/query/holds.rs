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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use datafusion::arrow::datatypes::Schema;
    use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
    use sluice_policy::document::Quotas;
    use sluice_policy::{Approval, DecisionRecord, QuotaCharge};

    use super::Holds;
    use crate::config::TenantCaps;
    use crate::query::ticket::{PendingQueries, PendingQuery};
    use crate::quota::QuotaStore;

    fn pending(store: &Arc<QuotaStore>, charge: &QuotaCharge, principal: &str) -> PendingQuery {
        let plan = LogicalPlan::EmptyRelation(EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(datafusion::common::DFSchema::empty()),
        });
        PendingQuery {
            principal_id: principal.into(),
            organization: "Org".into(),
            approval: Approval {
                plan,
                record: DecisionRecord::explain("v"),
                dp: None,
            },
            schema: Arc::new(Schema::empty()),
            plan_hash: vec![0; 32],
            expires_at: SystemTime::now() + std::time::Duration::from_secs(60),
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
            holds: Holds::new(Some(store.hold(charge, SystemTime::now()).unwrap()), None),
        }
    }

    /// The last step of an issue can still fail after the holds were taken:
    /// another request of the same principal took the last ticket first.
    /// The refused pending query gives its hold back.
    #[test]
    fn a_ticket_refused_by_the_caps_gives_its_holds_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(QuotaStore::open(&dir.path().join("q.sqlite"), None).unwrap());
        let charge = QuotaCharge {
            key: "Org".into(),
            quotas: Quotas {
                queries_per_day: Some(10),
                rows_per_day: None,
            },
        };
        let caps = TenantCaps {
            total: 10,
            per_organization: 10,
            per_principal: 1,
            what: "tickets",
            settings: ["a", "b", "c"],
        };
        let tickets = PendingQueries::new(caps);
        let now = SystemTime::now();
        tickets.insert(pending(&store, &charge, "p"), now).unwrap();
        let refused = pending(&store, &charge, "p");
        assert_eq!(store.held("Org", now), 2);
        let error = tickets.insert(refused, now).unwrap_err();
        assert!(error.to_string().contains("limits.c"), "{error}");
        assert_eq!(
            store.held("Org", now),
            1,
            "the refused ticket's hold came back"
        );
        tickets.withdraw_all();
        assert_eq!(store.held("Org", now), 0);
        assert_eq!(store.used("Org", now).unwrap().queries, 0);
    }
}
