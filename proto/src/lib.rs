//! Generated gRPC code for Sluice's own services (`proto/sluice/v1`).
//!
//! ```no_run
//! use sluice_proto::v1::connector_service_client::ConnectorServiceClient;
//! # async fn demo(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
//! let me = ConnectorServiceClient::new(channel)
//!     .who_am_i(sluice_proto::v1::WhoAmIRequest {})
//!     .await?
//!     .into_inner();
//! println!("the provider sees me as {}", me.principal_id);
//! # Ok(()) }
//! ```

pub mod wire;

/// `package sluice.v1`.
#[cfg(feature = "grpc")]
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

#[cfg(feature = "grpc")]
/// Encoded `FileDescriptorSet` of every Sluice proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
