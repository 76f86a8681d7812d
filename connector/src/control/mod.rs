//! Sluice's own gRPC services (`proto/sluice/v1`), served on the same mTLS
//! port as Flight SQL: the control plane of a data space.
//!
//! | service | what | module |
//! |---|---|---|
//! | `ConnectorService` | who am I, server facts | [`connector`] |
//! | `CatalogService` | datasets, visible schema, offers | [`catalog`] |
//! | `AgreementService` | request, approve, revoke agreements | [`agreements`] |
//! | `BudgetService` | privacy budget left | [`budget`] |
//! | `AuditService` | receipts, chain head | [`audit`] |

mod agreements;
pub(crate) mod audit;
mod budget;
mod catalog;
mod connector;

pub use agreements::AgreementDesk;
pub(crate) use agreements::record_change;
pub use audit::AuditReceipts;
pub use budget::Budgets;
pub use catalog::CatalogDirectory;
pub use connector::ConnectorInfo;

use sluice_policy::Principal;
use tonic::Status;

use crate::query::QueryEngine;

/// Whether the policy in force makes `principal` a provider admin.
pub(crate) fn is_admin(engine: &QueryEngine, principal: &Principal) -> bool {
    engine
        .policy()
        .current()
        .policy_set()
        .is_some_and(|p| p.is_admin(principal))
}

/// PERMISSION_DENIED unless `principal` is an admin.
fn require_admin(engine: &QueryEngine, principal: &Principal, what: &str) -> Result<(), Status> {
    match is_admin(engine, principal) {
        true => Ok(()),
        false => Err(Status::permission_denied(format!(
            "only provider admins may {what}; `{principal}` matches no entry under `admins:` in the usage policy"
        ))),
    }
}
