//! DoGet: verify the ticket, redeem the approved plan, settle its holds,
//! compute the private answer if it is one, record the release, execute.
//!
//! ```text
//! verify ─▶ redeem ─▶ policy and agreements still in force ─▶ execution slot ─▶ settle holds
//!        ─▶ [DP: bounded statistics ─▶ OpenDP noise ─▶ commit] ─▶ record release ─▶ execute ─▶ conform ─▶ meter rows
//! ```
//!
//! Until the holds are settled, any error drops the pending query and with
//! it its holds: nothing was read, the quota and budget come back.

use std::time::SystemTime;

use futures::StreamExt;
use sluice_policy::{DecisionRecord, Principal};
use tokio::time::Instant;

use super::execute::ExecutionLimits;
use super::rows::RowMeter;
use super::slots::Slot;
use super::ticket::{Claims, PendingQuery};
use super::{Batches, QueryEngine, QueryError, QueryRun, release};
use crate::audit::{self, Completion, PlanFacts};
use crate::blocking::blocking;
use crate::catalog::DataReads;

impl QueryEngine {
    /// DoGet: verifies the ticket for `principal` and starts executing the
    /// plan it names. Waits for a free execution slot up to the query's
    /// deadline. Rejected tickets, revoked agreements and failures before
    /// the release are on record too.
    pub async fn redeem(
        &self,
        principal: &Principal,
        ticket: &[u8],
    ) -> Result<QueryRun, QueryError> {
        let mut facts = PlanFacts::default();
        match self.redeem_recorded(principal, ticket, &mut facts).await {
            Ok(run) => Ok(run),
            Err(e) => {
                let version = self.policy.version();
                let entry = audit::refused("release", principal, &version, &facts, e.refusal());
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
        let query_id = hex::encode(&claims.query_id);
        facts.query_id = Some(query_id.clone());
        // The query's span (flight/stream.rs), for what execution logs.
        tracing::Span::current().record("query_id", query_id.as_str());
        let pending = self.pending.redeem(&claims)?;
        *facts = PlanFacts {
            plan_hash: Some(hex::encode(&pending.plan_hash)),
            datasets: pending.approval.record.datasets.clone(),
            purpose: pending.approval.record.purpose.clone(),
            query_id: Some(query_id.clone()),
        };
        let (slot, deadline) = self.start_run(&claims, &pending).await?;
        let limits = ExecutionLimits {
            deadline,
            ..self.limits_from_now()
        };
        let PendingQuery {
            approval,
            schema,
            holds,
            plan_hash,
            ..
        } = pending;
        let cached = holds.privacy().is_some_and(|t| t.cached.is_some());
        let plan_hash = hex::encode(&plan_hash);
        let record = approval.record;
        // From here on the query counts and its budget is spent.
        let privacy = blocking(|| holds.settle(record.quota.as_ref()))?;
        // What each dataset was when it was read, for the release record.
        let reads = DataReads::new();
        // A DP answer uses its slot for the statistics; finishing runs over
        // a few noisy rows in memory.
        let (plan, schema, slot, finish_reads) = match (approval.dp, privacy) {
            (Some(query), Some(ticket)) => {
                let (plan, schema) = self
                    .private_answer(*query, &ticket, &schema, limits, slot, &reads)
                    .await?;
                (plan, schema, None, DataReads::new())
            }
            _ => (approval.plan, schema, Some(slot), reads.clone()),
        };
        let receiver = self
            .executor
            .start(self.catalog.clone(), plan, limits, slot, finish_reads);
        // Nothing leaves before its release is on record, and the record
        // names the data that answers: the scans have started (files
        // listed, database snapshots taken) once the first batch, the end
        // or an error is here.
        let mut receiver = tokio_stream::wrappers::ReceiverStream::new(receiver).peekable();
        std::pin::Pin::new(&mut receiver).peek().await;
        // A revocation during the wait for a slot or the noise still counts.
        self.check_agreements(&record, &principal.id)?;
        let release = audit::Entry {
            data_versions: if cached {
                vec!["none read: a cached differentially private answer".into()]
            } else {
                reads.lines()
            },
            ..audit::release(principal, &record, &plan_hash, &query_id, cached)
        };
        let receipt = self.audit.append(release.clone())?;
        let completion = receipt
            .as_ref()
            .map(|r| Completion::new(self.audit.clone(), &release, r));
        let conform_to = schema.clone();
        let batches =
            receiver.map(move |item| item.and_then(|batch| release::conform(batch, &conform_to)));
        let mut batches: Batches = Box::pin(batches);
        if let Some(charge) = record.quota {
            batches = RowMeter::new(self.quotas.clone(), charge).meter(batches);
        }
        Ok(QueryRun {
            query_id,
            schema,
            batches,
            receipt,
            completion,
        })
    }

    /// Checks what must hold before anything is read, and waits for an
    /// execution slot (fairly shared between organizations).
    async fn start_run(
        &self,
        claims: &Claims,
        pending: &PendingQuery,
    ) -> Result<(Slot, Instant), QueryError> {
        let in_force = self.policy.version();
        if !pending.approval.record.is_explanation() && claims.policy_version != in_force {
            return Err(QueryError::TicketRejected(format!(
                "ticket rejected: the usage policy changed since it was issued ({} → {in_force}); call GetFlightInfo again",
                claims.policy_version
            )));
        }
        if claims.reservation != pending.holds.reservation() {
            return Err(QueryError::TicketRejected(
                "ticket rejected: it names another privacy-budget reservation".into(),
            ));
        }
        self.check_agreements(&pending.approval.record, &claims.principal_id)?;
        let slot = self
            .executions
            .acquire(
                &pending.organization,
                Instant::now() + self.limits.queue_timeout,
            )
            .await
            .map_err(|why| {
                super::busy(&self.executions, &pending.organization, why, "executing")
            })?;
        // The query's time limit starts when it starts running.
        let deadline = Instant::now() + self.limits.query_timeout;
        Ok((slot, deadline))
    }

    /// A ticket is only as good as the agreements it was issued under: one
    /// revoked or expired since, or a token-bound one whose transfer has
    /// ended since, makes it useless.
    pub(super) fn check_agreements(
        &self,
        decision: &DecisionRecord,
        principal: &str,
    ) -> Result<(), QueryError> {
        let now = SystemTime::now();
        for id in &decision.agreements {
            let active = self.agreements.is_usable(id, principal, now)?;
            if !active {
                return Err(QueryError::Denied(sluice_policy::Denial {
                    kind: sluice_policy::DenialKind::Precondition,
                    rule: "agreement".into(),
                    message: format!(
                        "agreement `{id}` is no longer active (revoked or expired, or its transfer ended) since this ticket was issued; request a new agreement"
                    ),
                }));
            }
        }
        Ok(())
    }
}
