//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates
//! tonic/prost code plus the encoded FileDescriptorSet that reflection and the
//! gateway read.

use std::{env, fs, path::PathBuf};

use prost::Message;

const CONTRACTS: &[&str] = &[
    "flashmesh/auth/v1/auth.proto",
    "flashmesh/catalog/v1/catalog.proto",
    "flashmesh/order/v1/order.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let descriptors = protox::compile(CONTRACTS, [&root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("flashmesh_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
