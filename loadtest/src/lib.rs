//! Bench commands that drive a real flashmesh stack over loopback gRPC (and,
//! for the comparison, the HTTP/1.1 JSON baseline). `main.rs` is their
//! command line; the integration tests run [`compare`] directly.

mod bare_hop;
pub mod catalog;
pub mod compare;
pub mod gateway;
pub mod orders;
mod procfs;
mod run;
pub mod stack;
pub mod trace_bench;
