//! The order service: turns a buyer's claim on a deal into an order, exactly
//! once, across two services and a crash.
//!
//! Layers: [`transport`] (tonic, thin) → [`service`] (the saga and the
//! reads) → [`domain`] (rules, no I/O), with [`storage`] (sqlx: claims,
//! orders, outbox, read models), [`catalog`] (the catalog client with its
//! deadline, retries and circuit breaker), [`events`] (the outbox relay) and
//! [`consumers`] (status projector, sales counter).

pub mod catalog;
pub mod config;
pub mod consumers;
pub mod domain;
pub mod error;
pub mod events;
pub mod service;
pub mod storage;
pub mod transport;
pub mod wire;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use flashmesh_platform::{
    config::PlatformConfig,
    db::{Database, StoreError},
    grpc::{GrpcServer, ServeError},
    identity::{AuthServiceKeys, TokenVerifier},
    metrics::Metrics,
    paging::{PageSecretError, PageTokens},
    pubsub::bus,
    redis::RedisHandle,
    streams::{ConsumerSettings, EventStream, TracedHandler, run_consumer, unique_consumer_name},
    telemetry::Telemetry,
    upstream::UpstreamUrlError,
};
use flashmesh_proto::order::v1::order_service_server::OrderServiceServer;
use prometheus_client::metrics::gauge::Gauge;
use sqlx::migrate::Migrator;
use tokio::{net::TcpListener, sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::{CatalogClient, CatalogClientError, CatalogClientSettings, ServiceToken},
    config::OrderConfig,
    consumers::{SalesCounter, StatusProjector},
    events::{EventSink, LocalConsumer, OutboxRelay},
    service::OrderService,
    storage::OrderStore,
    transport::OrderGrpc,
};

/// The order schema's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/order");

/// The schema (PostgreSQL) or file (SQLite) the order service owns.
pub const SCHEMA: &str = "order_service";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    PageSecret(#[from] PageSecretError),
    #[error("FLASHMESH_AUTH_URL: {0}")]
    AuthUrl(#[from] UpstreamUrlError),
    #[error(transparent)]
    Catalog(#[from] CatalogClientError),
}

/// A ready-to-serve order service.
pub struct OrderApp {
    pub service: Arc<OrderService>,
    config: OrderConfig,
    verifier: Arc<TokenVerifier>,
    platform: PlatformConfig,
    db: Database,
    store: Arc<OrderStore>,
    redis: Option<RedisHandle>,
    relay_wake: Arc<Notify>,
    telemetry: Telemetry,
}

impl OrderApp {
    /// Opens storage, runs migrations, and wires the catalog client.
    pub async fn build(
        platform: &PlatformConfig,
        config: OrderConfig,
        redis: Option<&RedisHandle>,
        token: Arc<dyn ServiceToken>,
        telemetry: &Telemetry,
    ) -> Result<Self, StartError> {
        let db = Database::connect(platform, SCHEMA).await?;
        db.migrate(&MIGRATOR).await?;
        db.observe(telemetry.metrics(), SCHEMA);
        let store = Arc::new(OrderStore::new(db.pool().clone(), db.backend()));
        let catalog = CatalogClient::new(
            &CatalogClientSettings {
                urls: config
                    .catalog_url
                    .split(',')
                    .map(|url| url.trim().to_owned())
                    .filter(|url| !url.is_empty())
                    .collect(),
                dns_refresh: platform.dns_refresh,
                transport: platform.transport,
                call_timeout: config.catalog_timeout,
                retries: config.catalog_retries,
                breaker_open_for: config.breaker_open_for,
                metrics: telemetry.metrics().clone(),
            },
            token,
        )
        .await?;
        let relay_wake = Arc::new(Notify::new());
        let service = OrderService::new(
            store.clone(),
            catalog,
            bus(redis),
            PageTokens::configured(platform.page_token_secret.as_deref(), &platform.data_dir)?,
            config.clone(),
            relay_wake.clone(),
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
            store,
            redis: redis.cloned(),
            relay_wake,
            telemetry: telemetry.clone(),
        })
    }

    /// Serves gRPC on `listener` until `shutdown` is cancelled, running the
    /// outbox relay, the event consumers and the sweeper beside it.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        // The relay, consumers and sweeper outlive the listener: calls still
        // draining after a shutdown signal commit events they must publish.
        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let projector = TracedHandler::wrap(
            Arc::new(StatusProjector::new(self.store.clone(), self.service.bus())),
            &self.telemetry,
            StatusProjector::GROUP,
        );
        let counter = TracedHandler::wrap(
            Arc::new(SalesCounter::new(self.store.clone())),
            &self.telemetry,
            SalesCounter::GROUP,
        );
        let dead_letters = self
            .redis
            .as_ref()
            .map(|redis| EventStream::new(redis, &self.config.stream, self.config.stream_max_len));
        tasks.spawn(observe_events(
            self.store.clone(),
            dead_letters,
            self.telemetry.metrics().clone(),
            self.config.sweep_interval,
            background.clone(),
        ));
        let sink = match &self.redis {
            Some(redis) => {
                let stream =
                    EventStream::new(redis, &self.config.stream, self.config.stream_max_len);
                for (group, handler) in [
                    (StatusProjector::GROUP, projector),
                    (SalesCounter::GROUP, counter),
                ] {
                    let settings = ConsumerSettings {
                        group: group.to_owned(),
                        consumer: unique_consumer_name(group),
                        batch: 128,
                        block: Duration::from_secs(1),
                        claim_idle: self.config.consumer_claim_idle,
                        max_deliveries: self.config.consumer_max_deliveries,
                    };
                    tasks.spawn(run_consumer(
                        stream.clone(),
                        settings,
                        handler,
                        background.clone(),
                    ));
                }
                EventSink::Stream(Box::new(stream))
            }
            None => EventSink::Local {
                consumers: vec![
                    LocalConsumer {
                        name: StatusProjector::GROUP,
                        handler: projector,
                    },
                    LocalConsumer {
                        name: SalesCounter::GROUP,
                        handler: counter,
                    },
                ],
                max_deliveries: self.config.consumer_max_deliveries,
            },
        };
        let relay = OutboxRelay::new(
            self.store.clone(),
            sink,
            self.relay_wake.clone(),
            self.config.outbox_poll,
        );
        tasks.spawn(relay.run(background.clone()));
        tasks.spawn(sweep(
            self.service.clone(),
            self.config.sweep_interval,
            background.clone(),
        ));

        let served = GrpcServer::new(
            &self.platform.server,
            self.platform.transport,
            &self.telemetry,
        )
        .with_identity(self.verifier)
        .add_service(OrderServiceServer::new(OrderGrpc::new(
            self.service,
            self.platform.server.request_timeout,
        )))
        .serve(listener, shutdown)
        .await;
        background.cancel();
        while tasks.join_next().await.is_some() {}
        self.db.close().await;
        served
    }
}

async fn sweep(service: Arc<OrderService>, interval: Duration, shutdown: CancellationToken) {
    flashmesh_platform::runtime::every(interval, shutdown, || async {
        if let Err(e) = service.sweep().await {
            tracing::warn!(error = %e, "order sweep failed");
        }
    })
    .await;
}

/// Keeps `flashmesh_outbox_pending`, `flashmesh_outbox_lag_seconds` (age of
/// the oldest unpublished event) and `flashmesh_dead_letters` current.
async fn observe_events(
    store: Arc<OrderStore>,
    stream: Option<EventStream>,
    metrics: Metrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let pending = metrics.family(
        "flashmesh_outbox_pending",
        "Order events not yet published",
        Gauge::<i64>::default,
    );
    let lag = metrics.family(
        "flashmesh_outbox_lag_seconds",
        "Age of the oldest order event not yet published (0 when none)",
        Gauge::<f64, AtomicU64>::default,
    );
    let dead = metrics.family(
        "flashmesh_dead_letters",
        "Order events dead-lettered (the .dlq stream, or the dead_letters table without Redis)",
        Gauge::<i64>::default,
    );
    flashmesh_platform::runtime::every(interval, shutdown, || async {
        match store.outbox_backlog().await {
            Ok((count, oldest)) => {
                pending.set(count);
                let age_ms = oldest.map_or(0, |oldest| (service::now_ms() - oldest).max(0));
                #[allow(clippy::cast_precision_loss)] // milliseconds: exact far beyond any lag
                lag.set(age_ms as f64 / 1000.0);
            }
            Err(e) => tracing::debug!(error = %e, "outbox backlog not measured"),
        }
        let dead_letters = match &stream {
            Some(stream) => stream
                .dead_letter_len()
                .await
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
                .map_err(|e| e.to_string()),
            None => store.dead_letter_count().await.map_err(|e| e.to_string()),
        };
        match dead_letters {
            Ok(n) => {
                dead.set(n);
            }
            Err(error) => tracing::debug!(%error, "dead letters not counted"),
        }
    })
    .await;
}
