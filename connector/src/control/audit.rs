//! `sluice.v1.AuditService`: a consumer reads the records about its own
//! organization (receipts), a provider admin reads all; anyone may read the
//! chain head and the public key that signs the log.

use std::sync::Arc;

use sluice_policy::Principal;
use sluice_proto::v1 as pb;
use sluice_proto::v1::audit_service_server::{AuditService, AuditServiceServer};
use tonic::{Request, Response, Status};

use super::is_admin;
use crate::audit::{self, AuditLog};
use crate::identity;
use crate::query::QueryEngine;
use sluice_audit::SignedRecord;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub struct AuditReceipts {
    engine: Arc<QueryEngine>,
}

impl AuditReceipts {
    pub fn new(engine: Arc<QueryEngine>) -> Self {
        Self { engine }
    }

    pub fn into_service(self) -> AuditServiceServer<Self> {
        AuditServiceServer::new(self)
    }

    fn log(&self) -> Result<&AuditLog, Status> {
        self.engine
            .audit()
            .log()
            .ok_or_else(|| Status::unavailable("this connector runs without an audit log"))
    }

    /// Whether `principal` may read `record`.
    pub(crate) fn readable(&self, principal: &Principal) -> impl Fn(&SignedRecord) -> bool + use<> {
        let admin = is_admin(&self.engine, principal);
        let organization = audit::organization_key(principal);
        move |record| admin || record.record.entry.organization.as_deref() == Some(&organization)
    }
}

#[tonic::async_trait]
impl AuditService for AuditReceipts {
    async fn list_receipts(
        &self,
        request: Request<pb::ListReceiptsRequest>,
    ) -> Result<Response<pb::ListReceiptsResponse>, Status> {
        let principal = identity::direct_principal(&request)?;
        let ask = request.into_inner();
        let from = match ask.page_token.as_str() {
            "" => 0,
            token => token.parse::<u64>().map_err(|_| {
                Status::invalid_argument("page_token is not one this service returned")
            })?,
        };
        let limit = match ask.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let readable = self.readable(&principal);
        let event = ask.event;
        let log = self.log()?;
        let (records, next) = crate::blocking::blocking(|| {
            log.scan(from, limit, |r| {
                readable(r) && (event.is_empty() || r.record.entry.event == event)
            })
        })
        .map_err(internal)?;
        Ok(Response::new(pb::ListReceiptsResponse {
            records: records.iter().map(message).collect(),
            next_page_token: next.map(|seq| seq.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_receipt(
        &self,
        request: Request<pb::GetReceiptRequest>,
    ) -> Result<Response<pb::AuditRecord>, Status> {
        let principal = identity::direct_principal(&request)?;
        let id = request.into_inner().receipt_id;
        let log = self.log()?;
        let found = crate::blocking::blocking(|| log.get(&id)).map_err(internal)?;
        found
            .filter(self.readable(&principal))
            .map(|r| Response::new(message(&r)))
            .ok_or_else(|| Status::not_found(format!("no receipt `{id}` of yours")))
    }

    async fn get_chain_head(
        &self,
        request: Request<pb::GetChainHeadRequest>,
    ) -> Result<Response<pb::ChainHead>, Status> {
        identity::direct_principal(&request)?;
        let log = self.log()?;
        let head = log.head();
        Ok(Response::new(pb::ChainHead {
            records: head.records,
            hash: head.hash,
            time: head.time.unwrap_or_default(),
            key_id: log.key().key_id(),
            public_key_pem: log.key().public_key_pem(),
        }))
    }
}

fn internal(e: sluice_audit::StoreError) -> Status {
    tracing::error!(error = %e, "reading the audit log failed");
    Status::internal("reading the audit log failed (see the connector log)")
}

/// A stored record as the protobuf message, with the canonical JSON the
/// hash covers.
pub(crate) fn message(r: &SignedRecord) -> pb::AuditRecord {
    let e = &r.record.entry;
    pb::AuditRecord {
        receipt_id: r.record.receipt_id.clone(),
        seq: r.record.seq,
        time: r.record.time.clone(),
        event: e.event.clone(),
        outcome: e.outcome.clone(),
        principal: e.principal.clone(),
        organization: e.organization.clone().unwrap_or_default(),
        datasets: e.datasets.clone(),
        purpose: e.purpose.clone().unwrap_or_default(),
        agreements: e.agreements.clone(),
        plan_hash: e.plan_hash.clone().unwrap_or_default(),
        policy_version: e.policy_version.clone(),
        code: e.code.clone().unwrap_or_default(),
        rule: e.rule.clone().unwrap_or_default(),
        rows: e.rows,
        bytes: e.bytes,
        epsilon: e.epsilon,
        delta: e.delta,
        refers_to: e.refers_to.clone().unwrap_or_default(),
        prev_hash: r.record.prev_hash.clone(),
        hash: r.hash.clone(),
        key_id: r.key_id.clone(),
        signature: r.signature.clone(),
        record_json: serde_json::to_string(&r.record).unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        query_id: e.query_id.clone().unwrap_or_default(),
        data_versions: e.data_versions.clone(),
    }
}
