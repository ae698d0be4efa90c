//! What every flashmesh service shares, written once: typed configuration,
//! storage, Redis adapters, the gRPC server with its tower layers, the mapping
//! from domain errors to gRPC statuses, caller identity, and the HTTP/1.1
//! JSON baseline transport.

pub mod cache;
pub mod call;
pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod http1json;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod paging;
pub mod pubsub;
pub mod redis;
pub mod resend;
pub mod runtime;
pub mod streams;
pub mod telemetry;
pub mod time;
pub mod upstream;
pub mod wire;
