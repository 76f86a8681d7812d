//! `sluice.v1.AgreementService`: consumers request agreements for offers;
//! provider admins (`admins:` in the policy file) approve, reject and revoke
//! them. Every change is also an audit record (event `agreement`).

use std::sync::Arc;
use std::time::SystemTime;

use sluice_policy::Principal;
use sluice_proto::v1 as pb;
use sluice_proto::v1::agreement_service_server::{AgreementService, AgreementServiceServer};
use tonic::{Request, Response, Status};

use super::catalog::rfc3339;
use super::{is_admin, require_admin};
use crate::agreements::{Agreement, AgreementError, AgreementState};
use crate::audit::{self, Entry};
use crate::identity;
use crate::query::QueryEngine;

pub struct AgreementDesk {
    engine: Arc<QueryEngine>,
}

impl AgreementDesk {
    pub fn new(engine: Arc<QueryEngine>) -> Self {
        Self { engine }
    }

    pub fn into_service(self) -> AgreementServiceServer<Self> {
        AgreementServiceServer::new(self)
    }

    /// The agreement `id` if `principal` may see it (its organization's, or
    /// any for an admin); NOT_FOUND otherwise, as if it did not exist.
    fn visible(&self, principal: &Principal, id: &str) -> Result<Agreement, Status> {
        let found = self
            .engine
            .agreements()
            .get(id, SystemTime::now())
            .map_err(status)?
            .filter(|a| {
                is_admin(&self.engine, principal)
                    || a.organization == audit::organization_key(principal)
            });
        found.ok_or_else(|| Status::not_found(format!("no agreement `{id}` of yours")))
    }

    fn record(
        &self,
        principal: &Principal,
        outcome: &str,
        agreement: &Agreement,
    ) -> Result<(), Status> {
        record_change(&self.engine, principal, outcome, agreement)
    }

    fn decide(
        &self,
        principal: &Principal,
        request: pb::DecideAgreementRequest,
        decision: Decision,
    ) -> Result<Agreement, Status> {
        let verb = decision.verb();
        require_admin(&self.engine, principal, &format!("{verb} agreements"))?;
        let store = self.engine.agreements();
        let now = SystemTime::now();
        let (id, reason) = (request.id.as_str(), request.reason.as_str());
        let decided = match decision {
            Decision::Approve => {
                let current = self.visible(principal, id)?;
                let gate = self.engine.policy().current();
                let offer = gate
                    .policy_set()
                    .and_then(|p| p.any_offer(&current.offer_id))
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "offer `{}` is no longer in the usage policy; reject the request instead",
                            current.offer_id
                        ))
                    })?;
                store.approve(id, &offer, &principal.id, reason, now)
            }
            Decision::Reject => store.reject(id, &principal.id, reason, now),
            Decision::Revoke => store.revoke(id, &principal.id, reason, now),
        }
        .map_err(status)?;
        self.record(principal, decision.outcome(), &decided)?;
        tracing::info!(agreement = %decided.id, admin = %principal, verb, "agreement decided");
        Ok(decided)
    }
}

#[tonic::async_trait]
impl AgreementService for AgreementDesk {
    async fn request_agreement(
        &self,
        request: Request<pb::RequestAgreementRequest>,
    ) -> Result<Response<pb::Agreement>, Status> {
        let principal = identity::direct_principal(&request)?;
        let ask = request.into_inner();
        let gate = self.engine.policy().current();
        let offer = gate
            .policy_set()
            .and_then(|p| p.offer(&principal, &ask.offer_id))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no offer `{}` is made to you (GetDataset lists your offers)",
                    ask.offer_id
                ))
            })?;
        let agreement = self
            .engine
            .agreements()
            .request(
                &offer,
                &audit::organization_key(&principal),
                &principal.id,
                ask.purpose.trim(),
                SystemTime::now(),
            )
            .map_err(status)?;
        self.record(&principal, "requested", &agreement)?;
        Ok(Response::new(message(&agreement)))
    }

    async fn get_agreement(
        &self,
        request: Request<pb::GetAgreementRequest>,
    ) -> Result<Response<pb::Agreement>, Status> {
        let principal = identity::direct_principal(&request)?;
        let agreement = self.visible(&principal, &request.into_inner().id)?;
        Ok(Response::new(message(&agreement)))
    }

    async fn list_agreements(
        &self,
        request: Request<pb::ListAgreementsRequest>,
    ) -> Result<Response<pb::ListAgreementsResponse>, Status> {
        let principal = identity::direct_principal(&request)?;
        let filter = request.into_inner();
        let organization = match is_admin(&self.engine, &principal) {
            true => None,
            false => Some(audit::organization_key(&principal)),
        };
        let offer = (!filter.offer_id.is_empty()).then_some(filter.offer_id.as_str());
        let state = pb::AgreementState::try_from(filter.state)
            .map_err(|_| Status::invalid_argument(format!("unknown state {}", filter.state)))?;
        let agreements = self
            .engine
            .agreements()
            .list(organization.as_deref(), offer, SystemTime::now())
            .map_err(status)?
            .iter()
            .map(message)
            .filter(|a| state == pb::AgreementState::Unspecified || a.state == state as i32)
            .collect();
        Ok(Response::new(pb::ListAgreementsResponse { agreements }))
    }

    async fn approve_agreement(
        &self,
        request: Request<pb::DecideAgreementRequest>,
    ) -> Result<Response<pb::Agreement>, Status> {
        let principal = identity::direct_principal(&request)?;
        let decided = self.decide(&principal, request.into_inner(), Decision::Approve)?;
        Ok(Response::new(message(&decided)))
    }

    async fn reject_agreement(
        &self,
        request: Request<pb::DecideAgreementRequest>,
    ) -> Result<Response<pb::Agreement>, Status> {
        let principal = identity::direct_principal(&request)?;
        let decided = self.decide(&principal, request.into_inner(), Decision::Reject)?;
        Ok(Response::new(message(&decided)))
    }

    async fn revoke_agreement(
        &self,
        request: Request<pb::DecideAgreementRequest>,
    ) -> Result<Response<pb::Agreement>, Status> {
        let principal = identity::direct_principal(&request)?;
        let decided = self.decide(&principal, request.into_inner(), Decision::Revoke)?;
        Ok(Response::new(message(&decided)))
    }
}

/// Appends an `agreement` record for a change `principal` made, however
/// it came (this service or a DSP negotiation). The change is already
/// stored: if it cannot be recorded, the caller hears so instead of a
/// silent success.
pub(crate) fn record_change(
    engine: &QueryEngine,
    principal: &Principal,
    outcome: &str,
    agreement: &Agreement,
) -> Result<(), Status> {
    let entry = Entry {
        event: "agreement".into(),
        outcome: outcome.into(),
        principal: principal.id.clone(),
        organization: Some(agreement.organization.clone()),
        datasets: vec![agreement.dataset.clone()],
        purpose: Some(agreement.purpose.clone()),
        agreements: vec![agreement.id.clone()],
        policy_version: engine.policy_version(),
        message: agreement.reason.clone(),
        ..Entry::default()
    };
    engine.audit().append(entry).map(drop).map_err(|e| {
        tracing::error!(error = %e, agreement = %agreement.id, "the audit log cannot be written");
        let unrecorded = format!(
            "agreement `{}` is {}, but the audit log cannot be written",
            agreement.id, agreement.state
        );
        match audit_disk_full(&e) {
            true => Status::unavailable(format!(
                "{unrecorded} (the disk is full), so the change has no audit record yet. \
                 The provider must {FREE_SPACE}"
            )),
            false => Status::internal(format!("{unrecorded} (see the connector log)")),
        }
    })
}

/// What a provider admin does to an agreement.
#[derive(Clone, Copy)]
enum Decision {
    Approve,
    Reject,
    Revoke,
}

impl Decision {
    fn verb(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::Revoke => "revoke",
        }
    }

    /// The outcome of its audit record.
    fn outcome(self) -> &'static str {
        match self {
            Decision::Approve => "approved",
            Decision::Reject => "rejected",
            Decision::Revoke => "revoked",
        }
    }
}

fn status(e: impl Into<AgreementError>) -> Status {
    match e.into() {
        AgreementError::Invalid(m) => Status::invalid_argument(m),
        AgreementError::NotFound(m) => Status::not_found(m),
        AgreementError::WrongState(m) => Status::failed_precondition(m),
        AgreementError::Store(e) => {
            tracing::error!(error = %format!("{e:#}"), "agreement store failed");
            match e.is_disk_full() {
                true => Status::unavailable(format!(
                    "the agreement store cannot be written (the disk is full), so nothing was \
                     changed. Try again later; the provider must {FREE_SPACE}"
                )),
                false => Status::internal("the agreement store failed (see the connector log)"),
            }
        }
    }
}

/// What a provider does about a full disk (no path: that is in its log).
const FREE_SPACE: &str = "free space on the disk that holds the connector's state directory";

/// Whether the audit log failed for want of space.
fn audit_disk_full(e: &sluice_audit::StoreError) -> bool {
    use sluice_audit::StoreError;
    use std::io::ErrorKind;
    match e {
        StoreError::Append { cause, .. }
        | StoreError::Open { cause, .. }
        | StoreError::Truncate { cause, .. } => {
            matches!(
                cause.kind(),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded
            )
        }
        _ => false,
    }
}

fn message(a: &Agreement) -> pb::Agreement {
    let state = match a.state {
        AgreementState::Pending => pb::AgreementState::Pending,
        AgreementState::Active => pb::AgreementState::Active,
        AgreementState::Rejected => pb::AgreementState::Rejected,
        AgreementState::Revoked => pb::AgreementState::Revoked,
        AgreementState::Expired => pb::AgreementState::Expired,
    };
    pb::Agreement {
        id: a.id.clone(),
        offer_id: a.offer_id.clone(),
        dataset: a.dataset.clone(),
        organization: a.organization.clone(),
        requested_by: a.requested_by.clone(),
        purpose: a.purpose.clone(),
        state: state as i32,
        requested_at: rfc3339(a.requested_at),
        decided_at: a.decided_at.map(rfc3339).unwrap_or_default(),
        decided_by: a.decided_by.clone().unwrap_or_default(),
        expires_at: a.expires_at.map(rfc3339).unwrap_or_default(),
        reason: a.reason.clone().unwrap_or_default(),
    }
}
