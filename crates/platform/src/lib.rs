//! What every flashmesh service shares, written once: typed configuration,
//! storage, Redis adapters, the gRPC server with its tower layers, the mapping
//! from domain errors to gRPC statuses, and caller identity.

pub mod cache;
pub mod call;
pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod paging;
pub mod pubsub;
pub mod redis;
pub mod runtime;
pub mod streams;
pub mod telemetry;
pub mod time;
pub mod upstream;
