//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates
//! tonic/prost code plus the encoded FileDescriptorSet that reflection and the
//! gateway read.

use std::{env, fmt::Write, fs, path::PathBuf};

use prost_types::{FileDescriptorSet, method_options::IdempotencyLevel};

const CONTRACTS: &[&str] = &[
    "flashmesh/auth/v1/auth.proto",
    "flashmesh/catalog/v1/catalog.proto",
    "flashmesh/order/v1/order.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(CONTRACTS)?;
    let descriptors = compiler.file_descriptor_set();
    // protox's own encoding keeps extension options (the google.api.http
    // annotations the gateway routes by); prost_types' drops them.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("flashmesh_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    fs::write(
        out_dir.join("idempotent_methods.rs"),
        idempotent_methods(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// The call paths of every method whose contract declares it `IDEMPOTENT` or
/// `NO_SIDE_EFFECTS`, as a Rust constant.
fn idempotent_methods(descriptors: &FileDescriptorSet) -> String {
    let mut paths = String::new();
    for file in &descriptors.file {
        for service in &file.service {
            for method in &service.method {
                let level = method
                    .options
                    .as_ref()
                    .map_or(IdempotencyLevel::IdempotencyUnknown, |o| {
                        o.idempotency_level()
                    });
                if level != IdempotencyLevel::IdempotencyUnknown {
                    let _ = writeln!(
                        paths,
                        "    \"/{}.{}/{}\",",
                        file.package(),
                        service.name(),
                        method.name()
                    );
                }
            }
        }
    }
    format!("const IDEMPOTENT_METHODS: &[&str] = &[\n{paths}];\n")
}
