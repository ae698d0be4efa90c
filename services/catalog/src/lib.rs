//! The catalog service: products, flash deals and their stock — the hottest
//! data of a flash sale, read by everyone and written by thousands of buyers
//! in the same second.
//!
//! Layers: [`transport`] (tonic, thin) → [`service`] (use cases) → [`domain`]
//! (rules, no I/O), with [`storage`] (sqlx, the source of truth), [`gate`]
//! (the Redis stock gate), the platform's tiered cache, and [`feed`] /
//! [`watch`] for live deal streams.

pub mod config;
pub mod domain;
pub mod error;
pub mod feed;
pub mod gate;
pub mod service;
pub mod storage;
pub mod transport;
pub mod watch;

use std::{sync::Arc, time::Duration};

use flashmesh_platform::{
    cache::{CacheConfig, TieredCache},
    config::PlatformConfig,
    db::{Database, StoreError},
    grpc::{GrpcServer, ServeError},
    identity::{AuthServiceKeys, TokenVerifier},
    paging::{PageSecretError, PageTokens},
    pubsub::bus,
    redis::RedisHandle,
    telemetry::Telemetry,
    upstream::UpstreamUrlError,
};
use flashmesh_proto::catalog::v1::catalog_service_server::CatalogServiceServer;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::CatalogConfig,
    feed::DealFeed,
    gate::StockGate,
    service::{CatalogService, ReadCaches},
    storage::CatalogStore,
    transport::CatalogGrpc,
};

/// The catalog schema's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/catalog");

/// The schema (PostgreSQL) or file (SQLite) the catalog owns.
pub const SCHEMA: &str = "catalog";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    PageSecret(#[from] PageSecretError),
    #[error("FLASHMESH_AUTH_URL: {0}")]
    AuthUrl(#[from] UpstreamUrlError),
}

/// A ready-to-serve catalog service.
pub struct CatalogApp {
    pub service: Arc<CatalogService>,
    config: CatalogConfig,
    verifier: Arc<TokenVerifier>,
    platform: PlatformConfig,
    db: Database,
    telemetry: Telemetry,
}

fn cache_config(namespace: &str, config: &CatalogConfig, telemetry: &Telemetry) -> CacheConfig {
    CacheConfig {
        metrics: telemetry.metrics().clone(),
        namespace: namespace.to_owned(),
        l1_ttl: config.cache_l1_ttl,
        l1_capacity: 100_000,
        l2_ttl: config.cache_l2_ttl,
        negative_ttl: Duration::from_millis(200),
    }
}

impl CatalogApp {
    /// Opens storage, runs migrations, and wires the cache, gate and feed.
    pub async fn build(
        platform: &PlatformConfig,
        config: CatalogConfig,
        redis: Option<&RedisHandle>,
        telemetry: &Telemetry,
    ) -> Result<Self, StartError> {
        let db = Database::connect(platform, SCHEMA).await?;
        db.observe(telemetry.metrics(), SCHEMA);
        db.migrate(&MIGRATOR).await?;
        let bus = bus(redis);
        let caches = ReadCaches {
            products: TieredCache::new(
                cache_config("catalog:product", &config, telemetry),
                redis,
                bus.clone(),
            )
            .await,
            deals: TieredCache::new(
                cache_config("catalog:deal", &config, telemetry),
                redis,
                bus.clone(),
            )
            .await,
            deal_pages: TieredCache::new(
                cache_config("catalog:deal-page", &config, telemetry),
                redis,
                bus.clone(),
            )
            .await,
        };
        let service = CatalogService::new(
            Arc::new(CatalogStore::new(db.pool().clone())),
            caches,
            redis.map(|redis| {
                StockGate::new(redis.clone(), config.stock_gate_ttl, telemetry.metrics())
            }),
            DealFeed::new(bus).await,
            PageTokens::configured(platform.page_token_secret.as_deref(), &platform.data_dir)?,
            config.clone(),
        );
        let verifier = TokenVerifier::new(
            Arc::new(AuthServiceKeys::new(
                &platform.auth_url,
                platform.transport,
            )?),
            platform.tokens.clone(),
        );
        Ok(Self {
            service: Arc::new(service),
            config,
            verifier: Arc::new(verifier),
            platform: platform.clone(),
            db,
            telemetry: telemetry.clone(),
        })
    }

    /// Serves gRPC on `listener` until `shutdown` is cancelled, preparing
    /// upcoming deals in the background meanwhile.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let warmer = tokio::spawn(prepare_upcoming_deals(
            self.service.clone(),
            self.config.warm_ahead,
            self.config.warm_interval,
            shutdown.clone(),
        ));
        let served = GrpcServer::new(
            &self.platform.server,
            self.platform.transport,
            &self.telemetry,
        )
        .with_identity(self.verifier)
        .add_service(CatalogServiceServer::new(CatalogGrpc::new(self.service)))
        .serve(listener, shutdown)
        .await;
        warmer.abort();
        self.db.close().await;
        served
    }
}

async fn prepare_upcoming_deals(
    service: Arc<CatalogService>,
    ahead: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    flashmesh_platform::runtime::every(interval, shutdown, || async {
        if let Err(e) = service.prepare_upcoming(ahead).await {
            tracing::warn!(error = %e, "upcoming deals not prepared");
        }
    })
    .await;
}
