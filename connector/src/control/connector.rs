//! `sluice.v1.ConnectorService`: who the connector thinks you are, and what
//! it serves.

use std::sync::Arc;

use sluice_proto::v1::connector_service_server::{ConnectorService, ConnectorServiceServer};
use sluice_proto::v1::{
    GetServerInfoRequest, GetServerInfoResponse, WhoAmIRequest, WhoAmIResponse,
};
use tonic::{Request, Response, Status};

use crate::identity;
use crate::query::QueryEngine;

pub struct ConnectorInfo {
    engine: Arc<QueryEngine>,
}

impl ConnectorInfo {
    pub fn new(engine: Arc<QueryEngine>) -> Self {
        Self { engine }
    }

    pub fn into_service(self) -> ConnectorServiceServer<Self> {
        ConnectorServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ConnectorService for ConnectorInfo {
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let caller = identity::caller(&request)?;
        let p = &caller.principal;
        Ok(Response::new(WhoAmIResponse {
            principal_id: p.id.clone(),
            organization: p.organization.clone().unwrap_or_default(),
            common_name: p.common_name.clone().unwrap_or_default(),
            san_uris: p.san_uris.clone(),
            certificate_sha256: caller.certificate_sha256.clone(),
            not_after_unix: caller.not_after,
        }))
    }

    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        let caller = identity::caller(&request)?;
        let limits = self.engine.limits();
        Ok(Response::new(GetServerInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            arrow_version: crate::ARROW_VERSION.into(),
            // Only what the caller may use: a dataset it has no grant for
            // does not exist for it, here as in queries and GetTables.
            datasets: self
                .engine
                .catalog()
                .datasets()
                .iter()
                .filter(|d| {
                    self.engine
                        .visible_columns(&caller.principal, &d.name)
                        .is_some()
                })
                .map(|d| d.name.clone())
                .collect(),
            query_memory_limit_bytes: limits.query_memory as u64,
            query_timeout_ms: limits.query_timeout.as_millis() as u64,
            ticket_ttl_ms: limits.ticket_ttl.as_millis() as u64,
            policy_version: self.engine.policy_version(),
        }))
    }
}
