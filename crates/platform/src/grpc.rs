//! The gRPC server every service runs: health (NOT_SERVING while draining),
//! reflection (v1 and v1alpha, so grpcurl needs no proto files), graceful
//! shutdown, and the tower layers for observation (trace context, server
//! span, RED metrics), caller identity, request timeout, concurrency limit
//! and load shedding.

use std::{convert::Infallible, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    body::Body,
    server::NamedService,
    service::RoutesBuilder,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;
use tower::{
    BoxError, ServiceBuilder,
    limit::GlobalConcurrencyLimitLayer,
    load_shed::{LoadShedLayer, error::Overloaded},
    timeout::{TimeoutLayer, error::Elapsed},
    util::MapErrLayer,
};

use crate::{
    config::ServerConfig,
    identity::{IdentityLayer, TokenVerifier},
    observe::ServerObserveLayer,
    telemetry::Telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Builds and runs one service's gRPC server.
pub struct GrpcServer {
    config: ServerConfig,
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    verifier: Option<Arc<TokenVerifier>>,
    telemetry: Telemetry,
}

impl GrpcServer {
    pub fn new(config: &ServerConfig, telemetry: &Telemetry) -> Self {
        Self {
            config: config.clone(),
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            verifier: None,
            telemetry: telemetry.clone(),
        }
    }

    /// Serves `service` and reports its health.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Verifies bearer tokens with `verifier` and hands callers to handlers.
    pub fn with_identity(mut self, verifier: Arc<TokenVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Serves on `listener` until `shutdown` is cancelled, then reports
    /// NOT_SERVING, waits the drain delay, stops accepting, and lets in-flight
    /// calls finish for up to the shutdown timeout.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let Self {
            config,
            mut routes,
            service_names,
            verifier,
            telemetry,
        } = self;

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in service_names.iter().copied().chain([""]) {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        // Advertise what this server serves, not every service in the
        // shared descriptor set.
        let advertised = service_names.iter().copied().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        let reflection = || {
            advertised.clone().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(flashmesh_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    // google.rpc error details, so grpcurl can print them.
                    .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET),
                tonic_reflection::server::Builder::with_service_name,
            )
        };
        routes
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);

        let observe = ServerObserveLayer::new(&telemetry, served_rpcs(&service_names));
        let layers = ServiceBuilder::new()
            .layer(observe)
            .layer(MapErrLayer::new(status_for_layer_error))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::new(config.concurrency_limit))
            .layer(TimeoutLayer::new(config.request_timeout))
            .option_layer(verifier.map(IdentityLayer::new));

        let draining = CancellationToken::new();
        let drain = {
            let draining = draining.clone();
            let delay = config.drain_delay;
            async move {
                shutdown.cancelled().await;
                for name in service_names.iter().copied().chain([""]) {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
                tokio::time::sleep(delay).await;
                draining.cancel();
            }
        };
        let server = Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            // Long-lived HTTP/2 connections would pin each client to the
            // replicas that existed when it connected: GOAWAY after an age
            // makes clients reconnect (calls in flight finish first).
            .max_connection_age(config.max_connection_age)
            .layer(layers)
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(
                // Without NODELAY small answers wait on the peer's delayed
                // ACK: a 40 ms floor at low concurrency.
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                drain,
            );

        tokio::select! {
            served = server => Ok(served?),
            () = async {
                draining.cancelled().await;
                tokio::time::sleep(config.shutdown_timeout).await;
            } => {
                tracing::warn!(
                    timeout = ?config.shutdown_timeout,
                    "in-flight calls outlived the shutdown timeout; abandoning them"
                );
                Ok(())
            }
        }
    }
}

/// Every method of `services` and of the health service, as
/// (`package.Service/Method`, server streaming), from the descriptors.
fn served_rpcs(services: &[&'static str]) -> Vec<(String, bool)> {
    use prost::Message;
    let sets = [
        flashmesh_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    sets.into_iter()
        .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
        .flat_map(|set| set.file)
        .flat_map(|file| {
            let package = file.package.unwrap_or_default();
            file.service.into_iter().map(move |service| {
                (
                    format!("{package}.{}", service.name.unwrap_or_default()),
                    service.method,
                )
            })
        })
        .filter(|(service, _)| {
            services.contains(&service.as_str()) || service == "grpc.health.v1.Health"
        })
        .flat_map(|(service, methods)| {
            methods.into_iter().map(move |method| {
                (
                    format!("{service}/{}", method.name.unwrap_or_default()),
                    method.server_streaming.unwrap_or(false),
                )
            })
        })
        .collect()
}

/// Errors raised by the layers themselves become statuses here (tonic sends a
/// `Status` found in an error as the response).
fn status_for_layer_error(error: BoxError) -> BoxError {
    if error.is::<Overloaded>() {
        Box::new(Status::unavailable(
            "the server is at its concurrency limit; nothing was executed, retry with backoff",
        ))
    } else if error.is::<Elapsed>() {
        Box::new(Status::deadline_exceeded(
            "the call exceeded the server's request timeout",
        ))
    } else {
        error
    }
}
