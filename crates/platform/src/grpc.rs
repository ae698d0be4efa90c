//! The gRPC server every service runs: health (NOT_SERVING while draining),
//! reflection (v1 and v1alpha, so grpcurl needs no proto files), graceful
//! shutdown, and the tower layers for observation (trace context, server
//! span, RED metrics), caller identity, request timeout, concurrency limit
//! and load shedding. Every accepted connection's bytes are counted
//! ([`crate::wire`]).
//!
//! With `FLASHMESH_TRANSPORT=http1-json` the same routes behind the same
//! layers are served as JSON over plain HTTP/1.1 through
//! [`crate::http1json::JsonAdapter`] instead.

use std::{convert::Infallible, sync::Arc};

use futures::TryStreamExt;
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
    config::{ServerConfig, Transport},
    http1json::JsonAdapter,
    identity::{IdentityLayer, TokenVerifier},
    observe::ServerObserveLayer,
    telemetry::Telemetry,
    wire::WireMetrics,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the HTTP/1.1 JSON server cannot accept connections: {0}")]
    Accept(#[from] std::io::Error),
}

/// Builds and runs one service's gRPC server.
pub struct GrpcServer {
    config: ServerConfig,
    transport: Transport,
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    verifier: Option<Arc<TokenVerifier>>,
    telemetry: Telemetry,
}

impl GrpcServer {
    /// A server listening with `transport` (`FLASHMESH_TRANSPORT`).
    pub fn new(config: &ServerConfig, transport: Transport, telemetry: &Telemetry) -> Self {
        Self {
            config: config.clone(),
            transport,
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
            transport,
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
                    .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                    // Both reflection versions in each, so either resolves
                    // every service it lists (k6 resolves them all).
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                tonic_reflection::server::Builder::with_service_name,
            )
        };
        routes
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);

        let observe = ServerObserveLayer::new(&telemetry, served_rpcs(&service_names));
        let wire = WireMetrics::new(telemetry.metrics());
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
        if transport == Transport::Http1Json {
            let service = JsonAdapter::new(layers.service(routes.routes()));
            return serve_http1(listener, wire, service, drain, config.shutdown_timeout).await;
        }
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
                TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .map_ok(move |stream| wire.count(stream)),
                drain,
            );

        tokio::select! {
            served = server => Ok(served?),
            () = async {
                draining.cancelled().await;
                tokio::time::sleep(config.shutdown_timeout).await;
            } => {
                abandoned(config.shutdown_timeout);
                Ok(())
            }
        }
    }
}

fn abandoned(timeout: std::time::Duration) {
    tracing::warn!(
        ?timeout,
        "in-flight calls outlived the shutdown timeout; abandoning them"
    );
}

/// The baseline: `service` over plain HTTP/1.1 (hyper's http1 only, with
/// keep-alive) until `drain` completes, then in-flight calls get up to
/// `shutdown_timeout` to finish.
async fn serve_http1<S>(
    listener: TcpListener,
    wire: WireMetrics,
    service: S,
    drain: impl std::future::Future<Output = ()>,
    shutdown_timeout: std::time::Duration,
) -> Result<(), ServeError>
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut drain = std::pin::pin!(drain);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: keep serving the others.
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut drain => break,
        };
        stream.set_nodelay(true)?;
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(
                hyper_util::rt::TokioIo::new(wire.count(stream)),
                hyper_util::service::TowerToHyperService::new(service.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP/1.1 connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        abandoned(shutdown_timeout);
    }
    Ok(())
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
