//! The flashmesh contracts as Rust types, clients and servers.

// Comments are copied verbatim from the .proto files, whose list style is
// protobuf's, not rustdoc's.
#![allow(clippy::doc_lazy_continuation)]

/// Encoded `google.protobuf.FileDescriptorSet` of every contract and its
/// imports, for server reflection and gRPC transcoding.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flashmesh_descriptor.bin"));

pub mod auth {
    pub mod v1 {
        tonic::include_proto!("flashmesh.auth.v1");
    }
}

pub mod catalog {
    pub mod v1 {
        tonic::include_proto!("flashmesh.catalog.v1");
    }
}

pub mod order {
    pub mod v1 {
        tonic::include_proto!("flashmesh.order.v1");
    }
}
