//! `sluice.v1.ConsoleService`: sign-in links for the web console, minted
//! over mTLS for the caller's own principal (`sluice console`).

use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1 as pb;
use sluice_proto::v1::console_service_server::{ConsoleService, ConsoleServiceServer};
use tonic::{Request, Response, Status};

use super::Console;
use super::session::LinkError;
use crate::identity;

pub struct ConsoleLinks {
    /// `None`: this connector serves no console.
    console: Option<Arc<Console>>,
}

impl ConsoleLinks {
    pub fn new(console: Option<Arc<Console>>) -> Self {
        Self { console }
    }

    pub fn into_service(self) -> ConsoleServiceServer<Self> {
        ConsoleServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ConsoleService for ConsoleLinks {
    async fn create_login_link(
        &self,
        request: Request<pb::CreateLoginLinkRequest>,
    ) -> Result<Response<pb::LoginLink>, Status> {
        // A broker cannot mint a session for whomever it relays.
        identity::direct_principal(&request)?;
        let caller = identity::caller(&request)?;
        let console = self.console.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this connector serves no web console; its operator sets [console] listen (docs/console.md)",
            )
        })?;
        if !super::admitted(&console.engine, &caller.principal) {
            return Err(Status::permission_denied(
                super::ConsoleError::NotAdmitted(caller.principal.id.clone()).to_string(),
            ));
        }
        let ttl = Duration::from_secs(u64::from(request.into_inner().ttl_seconds));
        let principal = caller.principal.id.clone();
        let (token, expires) = console
            .sessions()
            .mint_link(caller, ttl)
            .map_err(|e| match e {
                LinkError::TooLong { .. } => Status::invalid_argument(e.to_string()),
                LinkError::TooManyForPrincipal { .. } | LinkError::TooMany => {
                    Status::resource_exhausted(e.to_string())
                }
            })?;
        tracing::info!(%principal, "web console sign-in link issued");
        Ok(Response::new(pb::LoginLink {
            url: console.link_url(&token),
            expires_at: chrono::DateTime::<chrono::Utc>::from(expires)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            principal_id: principal,
        }))
    }
}
