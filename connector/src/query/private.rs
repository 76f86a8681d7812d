//! Step 7a, the private answer: the schema a DP query announces at
//! GetFlightInfo, and at DoGet the bounded statistics, OpenDP noise (the
//! `sluice-privacy` crate) and the finishing plan over the noisy rows.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::logical_expr::LogicalPlan;
use futures::StreamExt;
use sluice_policy::dp::{AutoBounds, DpQuery};
use sluice_privacy::{PrivacyTicket, release};
use sluice_proto::wire::dp;

use super::execute::ExecutionLimits;
use super::slots::Slot;
use super::{QueryEngine, QueryError, plan};
use crate::blocking::blocking;
use crate::catalog::DataReads;

/// The schema announced at GetFlightInfo for a DP query: the finishing plan
/// over an empty noisy table that carries each output's noise metadata, so
/// clients that read the FlightInfo schema (ADBC does) see it too.
pub fn announced_schema(
    query: &DpQuery,
    state: &datafusion::execution::SessionState,
) -> Result<SchemaRef, QueryError> {
    let (schema, split) = release::announced(query)?;
    let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let source = datafusion::datasource::provider_as_source(Arc::new(table));
    let plan = query
        .finish_plan(source)
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let plan = plan::analyze(state, plan)?;
    let finished = plan.schema().as_arrow().clone();
    let metadata = HashMap::from([(dp::BUDGET_SPLIT.to_string(), split)]);
    Ok(Arc::new(finished.with_metadata(metadata)))
}

impl QueryEngine {
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
    pub(super) async fn private_answer(
        &self,
        query: DpQuery,
        ticket: &PrivacyTicket,
        advertised: &SchemaRef,
        limits: ExecutionLimits,
        slot: Slot,
        reads: &Arc<DataReads>,
    ) -> Result<(LogicalPlan, SchemaRef), QueryError> {
        let noisy = match &ticket.cached {
            Some(bytes) => {
                drop(slot);
                sluice_privacy::decode(bytes)?
            }
            None => {
                let noisy = self
                    .noisy_aggregate(&query, limits, slot, reads)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "a differentially private answer failed after its budget was charged");
                        QueryError::PrivateAnswerWithheld
                    })?;
                blocking(|| self.privacy.commit(ticket, &noisy))?;
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
        extra.insert(
            sluice_proto::wire::dp::CACHED.into(),
            ticket.cached.is_some().to_string(),
        );
        let schema = sluice_privacy::result_schema(advertised, plan.schema().as_arrow(), extra);
        Ok((plan, schema))
    }

    /// The bounded statistics (DataFusion, in the query's slot) with OpenDP
    /// noise (on a blocking thread), as the aggregate's noisy rows.
    async fn noisy_aggregate(
        &self,
        query: &DpQuery,
        limits: ExecutionLimits,
        slot: Slot,
        reads: &Arc<DataReads>,
    ) -> Result<RecordBatch, QueryError> {
        let chosen;
        let query = match &query.auto {
            Some(auto) => {
                chosen = self.choose_bounds(query, auto, limits, reads).await?;
                &chosen
            }
            None => query,
        };
        let batches = self
            .collect(query.stats_plan.clone(), limits, Some(slot), reads)
            .await?;
        let exact = release::exact_statistics(query, &batches).map_err(release_failed)?;
        let for_noise = query.clone();
        let noisy = tokio::task::spawn_blocking(move || release::add_noise(&for_noise, exact))
            .await
            .map_err(|e| QueryError::Internal(format!("the noise task failed: {e}")))?
            .map_err(release_failed)?;
        let mut metadata = noisy.batch.schema().metadata().clone();
        metadata.insert(
            sluice_proto::wire::dp::BUDGET_SPLIT.into(),
            noisy.split.clone(),
        );
        if let Some(chosen) = &query.chosen {
            metadata.insert(dp::AUTO_BOUNDS.into(), chosen.sentence());
        }
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
}

impl QueryEngine {
    /// Step 7a's first half for a query with `auto` bounds: the per-unit
    /// plan (run while the caller holds the query's slot), the DP
    /// quantiles on a blocking thread, and the query planned again with
    /// the bounds they chose.
    async fn choose_bounds(
        &self,
        query: &DpQuery,
        auto: &AutoBounds,
        limits: ExecutionLimits,
        reads: &Arc<DataReads>,
    ) -> Result<DpQuery, QueryError> {
        let batches = self.collect(auto.plan.clone(), limits, None, reads).await?;
        let for_choice = query.clone();
        let values =
            tokio::task::spawn_blocking(move || release::choose_bounds(&for_choice, &batches))
                .await
                .map_err(|e| QueryError::Internal(format!("the bounds task failed: {e}")))?
                .map_err(release_failed)?;
        let mut chosen = query
            .with_chosen(&values)
            .map_err(|e| QueryError::Internal(format!("planning with the chosen bounds: {e}")))?;
        let state = self.catalog.session().state();
        chosen.stats_plan = plan::analyze(&state, chosen.stats_plan)?;
        Ok(chosen)
    }

    /// Runs `plan` to the end and keeps every batch.
    async fn collect(
        &self,
        plan: LogicalPlan,
        limits: ExecutionLimits,
        slot: Option<Slot>,
        reads: &Arc<DataReads>,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let receiver = self
            .executor
            .start(self.catalog.clone(), plan, limits, slot, reads.clone());
        tokio_stream::wrappers::ReceiverStream::new(receiver)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }
}

/// The noisy answer could not be built: never because of a value (the
/// statistics' types and every mechanism were fixed at GetFlightInfo), so
/// the cause is ours; the caller gets the one withheld-answer error.
fn release_failed(e: sluice_privacy::ReleaseError) -> QueryError {
    QueryError::Internal(format!("adding noise failed: {e}"))
}
