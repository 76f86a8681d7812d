//! Rows leave under the daily row quota: each batch takes its rows from the
//! organization's allowance just before it is sent.
//!
//! Taking rows as they leave, rather than reserving a query's worst case at
//! GetFlightInfo, means a query holds nothing it has not sent: a ticket that
//! is never redeemed, a stream that fails, or two analysts of one
//! organization querying at once cannot lock up the day's allowance.

use std::sync::Arc;
use std::time::SystemTime;

use datafusion::arrow::record_batch::RecordBatch;
use futures::StreamExt;
use sluice_policy::QuotaCharge;

use super::{Batches, QueryError};
use crate::quota::{QuotaStore, rows_used_up};

/// Meters a result stream against one organization's daily rows.
pub struct RowMeter {
    quotas: Arc<QuotaStore>,
    charge: QuotaCharge,
    sent: u64,
}

impl RowMeter {
    pub fn new(quotas: Arc<QuotaStore>, charge: QuotaCharge) -> Self {
        Self {
            quotas,
            charge,
            sent: 0,
        }
    }

    /// `batches`, each taking its rows from the quota before it leaves.
    /// When the quota runs out mid-stream, the rows that fit are sent and
    /// the stream ends with RESOURCE_EXHAUSTED saying so.
    pub fn meter(self, batches: Batches) -> Batches {
        let state = Metering {
            input: batches,
            meter: self,
            then: None,
            done: false,
        };
        Box::pin(futures::stream::unfold(state, |mut state| async move {
            if state.done {
                return None;
            }
            if let Some(error) = state.then.take() {
                state.done = true;
                return Some((Err(error), state));
            }
            let item = match state.input.next().await? {
                Ok(batch) => state.meter.admit(batch),
                Err(e) => Err(e),
            };
            match item {
                Ok((batch, None)) => Some((Ok(batch), state)),
                Ok((batch, Some(then))) => {
                    state.then = Some(then);
                    Some((Ok(batch), state))
                }
                Err(e) => {
                    state.done = true;
                    Some((Err(e), state))
                }
            }
        }))
    }

    /// The part of `batch` the quota admits, and the error to end the
    /// stream with when that is not all of it.
    fn admit(
        &mut self,
        batch: RecordBatch,
    ) -> Result<(RecordBatch, Option<QueryError>), QueryError> {
        let wanted = batch.num_rows() as u64;
        let granted = self
            .quotas
            .take_rows(&self.charge, wanted, SystemTime::now())?;
        self.sent += granted;
        if granted == wanted {
            return Ok((batch, None));
        }
        let limit = self.charge.quotas.rows_per_day.unwrap_or_default();
        let mut denial = rows_used_up(&self.charge.key, limit);
        denial.message = format!(
            "{}; this result was cut off after {} rows",
            denial.message, self.sent
        );
        let error = QueryError::Denied(denial);
        if granted == 0 {
            return Err(error);
        }
        Ok((batch.slice(0, granted as usize), Some(error)))
    }
}

struct Metering {
    input: Batches,
    meter: RowMeter,
    /// The error that follows the last, partial batch.
    then: Option<QueryError>,
    done: bool,
}
