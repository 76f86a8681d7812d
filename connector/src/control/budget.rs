//! `sluice.v1.BudgetService`: the caller's organization's privacy budget,
//! read from the ledger.

use std::sync::Arc;

use sluice_proto::v1::budget_service_server::{BudgetService, BudgetServiceServer};
use sluice_proto::v1::{BudgetLine, GetBudgetRequest, GetBudgetResponse};
use tonic::{Request, Response, Status};

use crate::identity;
use crate::query::QueryError;
use sluice_privacy::Privacy;
use sluice_privacy::ledger::{self, Balance};

pub struct Budgets {
    privacy: Arc<Privacy>,
}

impl Budgets {
    pub fn new(privacy: Arc<Privacy>) -> Self {
        Self { privacy }
    }

    pub fn into_service(self) -> BudgetServiceServer<Self> {
        BudgetServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl BudgetService for Budgets {
    async fn get_budget(
        &self,
        request: Request<GetBudgetRequest>,
    ) -> Result<Response<GetBudgetResponse>, Status> {
        let principal = identity::direct_principal(&request)?;
        // Budgets are kept per organization, as the policy charges them.
        let organization = principal.organization.clone().unwrap_or(principal.id);
        let wanted = request.into_inner().dataset;
        let ledger = self.privacy.ledger().clone();
        let owner = organization.clone();
        let balances =
            tokio::task::spawn_blocking(move || ledger.balances(Some(&owner), chrono::Utc::now()))
                .await
                .map_err(|e| Status::internal(format!("the ledger task failed: {e}")))?
                .map_err(|e| QueryError::from(sluice_privacy::PrivacyError::from(e)))?;
        let budgets = balances
            .iter()
            .filter(|b| wanted.is_empty() || b.dataset == wanted)
            .map(line)
            .collect();
        Ok(Response::new(GetBudgetResponse {
            organization,
            budgets,
        }))
    }
}

fn line(balance: &Balance) -> BudgetLine {
    let unlimited = balance.limit_epsilon == i64::MAX;
    let eps = ledger::epsilon_from_units;
    let delta = ledger::delta_from_units;
    // Without a limit, limits and remainders are 0 and `unlimited` says so.
    let limited = |value: f64| if unlimited { 0.0 } else { value };
    BudgetLine {
        dataset: balance.dataset.clone(),
        period: balance.period_key.clone(),
        epsilon_limit: limited(eps(balance.limit_epsilon)),
        // ρ spent cannot be converted once the policy's δ limit is 0.
        epsilon_spent: match balance.total_epsilon() {
            i64::MAX => f64::INFINITY,
            units => eps(units),
        },
        epsilon_remaining: limited(eps(balance.remaining_epsilon())),
        delta_limit: limited(delta(balance.limit_delta)),
        delta_spent: delta(balance.total_delta()),
        delta_remaining: limited(delta(balance.remaining_delta())),
        epsilon_reserved: eps(balance.reserved_epsilon),
        queries: balance.queries,
        unlimited,
        rho_spent: ledger::rho_from_units(balance.spent_rho),
    }
}
