//! Sluice's own gRPC services (`proto/sluice/v1`), served on the same mTLS
//! port as Flight SQL.

mod connector;

pub use connector::ConnectorInfo;
