//! Compiles `sluice/v1/*.proto` with protox (pure Rust, no system `protoc`)
//! and generates prost messages and tonic services from the descriptor set.
//! The descriptor set is also written to OUT_DIR for gRPC server reflection.

#[cfg(feature = "grpc")]
const PROTOS: &[&str] = &[
    "sluice/v1/connector.proto",
    "sluice/v1/budget.proto",
    "sluice/v1/catalog.proto",
    "sluice/v1/agreement.proto",
    "sluice/v1/audit.proto",
    "sluice/v1/console.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without the `grpc` feature the crate is only the wire contract.
    #[cfg(feature = "grpc")]
    generate()?;
    Ok(())
}

#[cfg(feature = "grpc")]
fn generate() -> Result<(), Box<dyn std::error::Error>> {
    use prost::Message;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("sluice_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
