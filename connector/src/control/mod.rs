//! Sluice's own gRPC services (`proto/sluice/v1`), served on the same mTLS
//! port as Flight SQL.

mod budget;
mod connector;

pub use budget::Budgets;
pub use connector::ConnectorInfo;
