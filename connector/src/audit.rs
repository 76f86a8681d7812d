//! Step 9: the audit log. Every decision (allowed or refused) and every
//! release is appended to a hash-chained, Ed25519-signed log in the state
//! directory before anything leaves, and the consumer gets a receipt.
//!
//! ```text
//! GetFlightInfo ─▶ decision record  (allowed / denied: rule, code, plan hash, ε reserved)
//! DoGet         ─▶ release record   (before the first byte; receipt in `x-sluice-receipt`)
//! end of stream ─▶ completion record (rows and bytes that left, or why it stopped)
//! ```
//!
//! The `sluice-audit` crate is the record format, chain, signing, store and
//! offline verification; this module turns queries into its [`Entry`]s.

use std::path::Path;
use std::sync::Arc;

use sluice_audit::StoreError;
use sluice_policy::{DecisionRecord, Principal, QueryContext};

pub use sluice_audit::{AuditLog, Entry, Receipt};

/// The connector's audit log, or nothing when a benchmark switched it off.
pub struct Audit {
    log: Option<AuditLog>,
}

impl Audit {
    /// Opens (or creates) the log and signing key in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let log = AuditLog::open_with_notices(dir, log_notice)?;
        Ok(Self { log: Some(log) })
    }

    /// No audit log at all. Only the server's `ServeHooks` reach this, so
    /// that benchmarks can measure what auditing costs.
    pub fn disabled() -> Self {
        Self { log: None }
    }

    pub fn log(&self) -> Option<&AuditLog> {
        self.log.as_ref()
    }

    /// Appends durably (fsync) before returning. The write runs off the
    /// async worker, so a slow disk does not stall other requests.
    pub fn append(&self, entry: Entry) -> Result<Option<Receipt>, StoreError> {
        let Some(log) = &self.log else {
            return Ok(None);
        };
        crate::blocking::blocking(|| log.append(entry)).map(Some)
    }
}

/// What the audit store reports while it works (a new key, a torn tail
/// removed), in the connector's log.
fn log_notice(notice: &sluice_audit::Notice) {
    use sluice_audit::NoticeLevel;
    match notice.level() {
        NoticeLevel::Info => tracing::info!("{notice}"),
        NoticeLevel::Warning => tracing::warn!("{notice}"),
        NoticeLevel::Error => tracing::error!("{notice}"),
    }
}

/// The organization that agreements, budgets and receipts belong to: the
/// certificate's O, else the principal id.
pub fn organization_key(principal: &Principal) -> String {
    principal
        .organization
        .clone()
        .unwrap_or_else(|| principal.id.clone())
}

/// What every record about a principal's request starts with.
fn about(principal: &Principal, policy_version: &str) -> Entry {
    Entry {
        principal: principal.id.clone(),
        organization: Some(organization_key(principal)),
        via: principal.via.as_ref().map(|b| b.id.clone()),
        policy_version: policy_version.to_string(),
        ..Entry::default()
    }
}

/// The record of an allowed decision.
pub fn allowed(
    request: &QueryContext,
    decision: &DecisionRecord,
    plan_hash: &str,
    query_id: &str,
) -> Entry {
    Entry {
        event: "decision".into(),
        outcome: "allowed".into(),
        query_id: Some(query_id.to_string()),
        ..described(
            about(&request.principal, &decision.policy_version),
            decision,
            plan_hash,
        )
    }
}

/// The record of a statement a client prepared (ADBC executes every query
/// this way): the decision taken with NULL parameters. Executing it later
/// is a decision of its own, recorded with its own plan and ticket.
pub fn prepared(request: &QueryContext, decision: &DecisionRecord, plan_hash: &str) -> Entry {
    Entry {
        event: "prepare".into(),
        outcome: "allowed".into(),
        ..described(
            about(&request.principal, &decision.policy_version),
            decision,
            plan_hash,
        )
    }
}

/// The record of a refused or failed request: `denied` (policy, quota,
/// budget, agreement, ticket), `invalid` (bad SQL, unknown table) or
/// `failed`. Messages never carry data values (a refusal is decided on the
/// plan, execution errors are reduced to their kind), so they are kept.
pub fn refused(
    event: &str,
    principal: &Principal,
    policy_version: &str,
    facts: &PlanFacts,
    refusal: Refusal,
) -> Entry {
    Entry {
        event: event.into(),
        outcome: refusal.outcome.into(),
        datasets: facts.datasets.clone(),
        purpose: facts.purpose.clone(),
        plan_hash: facts.plan_hash.clone(),
        query_id: facts.query_id.clone(),
        code: Some(refusal.code.to_string()),
        rule: refusal.rule,
        message: Some(refusal.message),
        ..about(principal, policy_version)
    }
}

/// What the record of a refusal says about it (the query module derives
/// it from its error).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// `denied`, `invalid` or `failed`.
    pub outcome: &'static str,
    /// The gRPC code name the caller got.
    pub code: &'static str,
    /// The policy rule that refused, if a rule did.
    pub rule: Option<String>,
    /// The message the caller got.
    pub message: String,
}

/// The record written before an answer leaves. A differentially private
/// answer served from the cache charged nothing: its ε and δ are 0.
pub fn release(
    principal: &Principal,
    decision: &DecisionRecord,
    plan_hash: &str,
    query_id: &str,
    cached: bool,
) -> Entry {
    let described = described(
        about(principal, &decision.policy_version),
        decision,
        plan_hash,
    );
    let free = |charge: Option<f64>| charge.map(|c| if cached { 0.0 } else { c });
    Entry {
        event: "release".into(),
        outcome: "released".into(),
        query_id: Some(query_id.to_string()),
        message: cached.then(|| "cached differentially private answer: nothing charged".into()),
        epsilon: free(described.epsilon),
        delta: free(described.delta),
        ..described
    }
}

fn described(base: Entry, decision: &DecisionRecord, plan_hash: &str) -> Entry {
    let zcdp = decision.privacy.as_ref().and_then(|p| p.zcdp.as_ref());
    Entry {
        consumers: decision.consumers.clone(),
        datasets: decision.datasets.clone(),
        purpose: decision.purpose.clone(),
        agreements: decision.agreements.clone(),
        plan_hash: Some(plan_hash.to_string()),
        rule: decision.rules.first().cloned(),
        epsilon: decision.privacy.as_ref().map(|p| p.epsilon),
        delta: decision.privacy.as_ref().map(|p| p.delta),
        rho: zcdp.map(|cost| cost.rho),
        charged_delta: zcdp.map(|cost| cost.delta),
        ..base
    }
}

/// What is known about a request before (or without) a decision, for the
/// record of a refusal.
#[derive(Debug, Clone, Default)]
pub struct PlanFacts {
    pub plan_hash: Option<String>,
    pub datasets: Vec<String>,
    pub purpose: Option<String>,
    pub query_id: Option<String>,
}

/// Writes the completion record of a released answer when its stream ends.
pub struct Completion {
    audit: Arc<Audit>,
    entry: Entry,
}

impl Completion {
    /// `release` is the release record's entry; `receipt` its receipt.
    pub fn new(audit: Arc<Audit>, release: &Entry, receipt: &Receipt) -> Self {
        let entry = Entry {
            event: "completion".into(),
            refers_to: Some(receipt.receipt_id.clone()),
            ..release.clone()
        };
        Self { audit, entry }
    }

    /// Records how the stream ended. Runs on a blocking thread: it is
    /// called from a stream's drop, on an async worker.
    pub fn finish(self, outcome: &str, rows: u64, bytes: u64) {
        let entry = Entry {
            outcome: outcome.to_string(),
            rows: Some(rows),
            bytes: Some(bytes),
            ..self.entry
        };
        let audit = self.audit;
        let write = move || {
            if let Err(e) = audit.append(entry) {
                tracing::error!(error = %e, "the completion record could not be written");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}
