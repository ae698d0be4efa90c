//! The flashmesh contracts as Rust types, clients and servers.

// Comments are copied verbatim from the .proto files, whose list style is
// protobuf's, not rustdoc's.
#![allow(clippy::doc_lazy_continuation)]

/// Encoded `google.protobuf.FileDescriptorSet` of every contract and its
/// imports, for server reflection and gRPC transcoding.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flashmesh_descriptor.bin"));

include!(concat!(env!("OUT_DIR"), "/idempotent_methods.rs"));

/// Whether the RPC at `path` (a call's URI path, `/package.Service/Method`)
/// is declared `idempotency_level = IDEMPOTENT` or `NO_SIDE_EFFECTS` in its
/// contract: taking such a call twice has the effect of taking it once, so a
/// caller may send it again when it cannot tell whether it was taken.
pub fn idempotent(path: &str) -> bool {
    IDEMPOTENT_METHODS.contains(&path)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contracts_declare_which_calls_may_be_taken_twice() {
        for path in [
            "/flashmesh.order.v1.OrderService/PlaceOrder",
            "/flashmesh.order.v1.OrderService/GetOrder",
            "/flashmesh.catalog.v1.CatalogService/GetDeal",
            "/flashmesh.catalog.v1.CatalogService/ReserveStock",
        ] {
            assert!(idempotent(path), "{path}");
        }
        for path in [
            "/flashmesh.auth.v1.AuthService/Refresh",
            "/flashmesh.auth.v1.AuthService/SignUp",
            "/flashmesh.catalog.v1.CatalogService/CreateDeal",
            "/flashmesh.order.v1.OrderService/PlaceOrder/",
            "",
        ] {
            assert!(!idempotent(path), "{path}");
        }
    }
}
