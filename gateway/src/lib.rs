//! The edge gateway: the stack's only public entry point. REST/JSON in,
//! gRPC out, routed by the contracts' `google.api.http` annotations — adding
//! an annotated RPC to a contract exposes it, with no handler code here.
//!
//! Layers: [`app`] (axum: routing, edge auth, limits, streams) over
//! [`transcode`] (routes and JSON ↔ protobuf from the descriptors),
//! [`edge_auth`] (token verification with a cache), [`rate_limit`] (GCRA,
//! Redis or in-process) and [`problem`] (every error as problem+json), with
//! [`observe`] (edge span, trace context upstream, HTTP metrics) around it.

pub mod app;
pub mod client_ip;
pub mod compress;
pub mod config;
pub mod discovery;
pub mod edge_auth;
mod listen;
pub mod observe;
pub mod openapi;
pub mod problem;
pub mod rate_limit;
pub mod transcode;
pub mod wire_json;

use std::{sync::Arc, time::Duration};

use axum::http::HeaderValue;
use flashmesh_platform::{
    config::PlatformConfig,
    identity::{AuthServiceKeys, TokenVerifier},
    redis::RedisHandle,
    telemetry::{self, Telemetry},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    cors::{AllowOrigin, Any, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
};

use crate::{
    app::Gateway,
    compress::CompressLargeLayer,
    config::{GatewayConfig, Upstream},
    edge_auth::EdgeAuth,
    observe::EdgeObserveLayer,
    transcode::RouteTable,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the compiled-in descriptors are invalid: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("the contracts' HTTP annotations are invalid: {0}")]
    Routes(#[from] transcode::RouteError),
    #[error("FLASHMESH_AUTH_URL: {0}")]
    AuthUrl(#[source] flashmesh_platform::upstream::UpstreamUrlError),
    #[error(transparent)]
    Upstream(#[from] flashmesh_platform::upstream::UpstreamUrlError),
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
}

/// How long start-up waits for a reflection upstream to answer.
const REFLECTION_WAIT: Duration = Duration::from_secs(15);

/// Answers at least this large are gzip- or brotli-compressed when the
/// client accepts it.
const COMPRESS_ABOVE_BYTES: u16 = 1024;

/// Verified tokens remembered at once.
const TOKEN_CACHE_CAPACITY: u64 = 100_000;

pub struct GatewayApp {
    gateway: Arc<Gateway>,
    cors_origins: Vec<String>,
    telemetry: Telemetry,
    public_metrics: bool,
}

impl GatewayApp {
    pub async fn build(
        platform: &PlatformConfig,
        mut config: GatewayConfig,
        redis: Option<&RedisHandle>,
        telemetry: &Telemetry,
    ) -> Result<Self, StartError> {
        let mut pool = prost_reflect::DescriptorPool::decode(flashmesh_proto::FILE_DESCRIPTOR_SET)?;
        for url in config.reflection_urls.clone() {
            for service in discovery::discover(&mut pool, &url, REFLECTION_WAIT).await? {
                tracing::info!(%service, %url, "routing a service learned by reflection");
                config.upstreams.push(Upstream {
                    service,
                    urls: vec![url.clone()],
                });
            }
        }
        let routes = RouteTable::from_descriptors(&pool, &[])?;
        let verifier = TokenVerifier::new(
            Arc::new(
                AuthServiceKeys::new(&platform.auth_url, platform.transport)
                    .map_err(StartError::AuthUrl)?,
            ),
            platform.tokens.clone(),
        );
        let auth = EdgeAuth::new(Arc::new(verifier), TOKEN_CACHE_CAPACITY);
        let cors_origins = config.cors_origins.clone();
        let public_metrics = config.public_metrics;
        let gateway = Gateway::new(
            routes,
            auth,
            rate_limit::limiter(redis, telemetry.metrics()),
            config,
            platform.dns_refresh,
            platform.transport,
        )
        .await?;
        Ok(Self {
            gateway: Arc::new(gateway),
            cors_origins,
            telemetry: telemetry.clone(),
            public_metrics,
        })
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// Serves HTTP/1.1 and HTTP/2 (h2c) on `listener` until `shutdown`, then
    /// lets requests in flight finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let request_id = telemetry::X_REQUEST_ID;
        let mut router = self
            .gateway
            .clone()
            .router()
            // Small answers cost more to compress than they save.
            .layer(CompressLargeLayer::new(COMPRESS_ABOVE_BYTES))
            .layer(EdgeObserveLayer::new(
                &self.telemetry,
                &self.gateway,
                self.public_metrics,
            ))
            .layer(PropagateRequestIdLayer::new(request_id.clone()))
            .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid));
        if !self.cors_origins.is_empty() {
            let origins = if self.cors_origins.iter().any(|o| o == "*") {
                AllowOrigin::any()
            } else {
                AllowOrigin::list(
                    self.cors_origins
                        .iter()
                        .filter_map(|o| HeaderValue::from_str(o).ok()),
                )
            };
            router = router.layer(
                CorsLayer::new()
                    .allow_origin(origins)
                    .allow_methods(Any)
                    .allow_headers(Any),
            );
        }
        listen::serve(listener, router, shutdown).await
    }
}
