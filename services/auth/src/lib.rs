//! The auth service: users and credentials. It issues short-lived EdDSA access
//! tokens that every service verifies locally, and opaque refresh tokens that
//! rotate on every use with reuse detection.
//!
//! Layers: [`transport`] (tonic, thin) → [`service`] (use cases) → [`domain`]
//! (rules, no I/O) and [`storage`] (sqlx) / [`keys`] / [`password`].

pub mod config;
pub mod domain;
pub mod error;
pub mod keys;
pub mod password;
pub mod service;
pub mod storage;
pub mod transport;

use std::sync::Arc;

use flashmesh_platform::{
    config::PlatformConfig,
    db::{Database, StoreError},
    grpc::{GrpcServer, ServeError},
    identity::TokenVerifier,
    limits::window_counter,
    redis::RedisHandle,
    telemetry::Telemetry,
};
use flashmesh_proto::auth::v1::auth_service_server::AuthServiceServer;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::AuthConfig,
    error::AuthError,
    keys::{KeyError, SigningKeys},
    password::PasswordHasher,
    service::AuthService,
    storage::{RefreshTokenStore, UserStore},
    transport::AuthGrpc,
};

/// The auth schema's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/auth");

/// The schema (PostgreSQL) or file (SQLite) the auth service owns.
pub const SCHEMA: &str = "auth";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// A ready-to-serve auth service.
pub struct AuthApp {
    pub service: AuthService,
    keys: Arc<SigningKeys>,
    platform: PlatformConfig,
    db: Database,
    telemetry: Telemetry,
}

impl AuthApp {
    /// Opens storage, runs migrations and loads keys.
    pub async fn build(
        platform: &PlatformConfig,
        config: AuthConfig,
        redis: Option<&RedisHandle>,
        telemetry: &Telemetry,
    ) -> Result<Self, StartError> {
        let db = Database::connect(platform, SCHEMA).await?;
        db.migrate(&MIGRATOR).await?;
        db.observe(telemetry.metrics(), SCHEMA);
        let keys = Arc::new(SigningKeys::load(&config.keys)?);
        let service = AuthService::new(
            UserStore::new(db.pool().clone()),
            RefreshTokenStore::new(db.pool().clone()),
            PasswordHasher::new(config.password_cost)?,
            keys.clone(),
            window_counter(redis, "auth:login-failures"),
            config,
            platform.tokens.clone(),
        );
        Ok(Self {
            service,
            keys,
            platform: platform.clone(),
            db,
            telemetry: telemetry.clone(),
        })
    }

    /// Serves gRPC on `listener` until `shutdown` is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        // The auth service verifies its own tokens with the keys it holds.
        let verifier = TokenVerifier::new(self.keys.clone(), self.platform.tokens.clone());
        let served = GrpcServer::new(
            &self.platform.server,
            self.platform.transport,
            &self.telemetry,
        )
        .with_identity(Arc::new(verifier))
        .add_service(AuthServiceServer::new(AuthGrpc::new(self.service)))
        .serve(listener, shutdown)
        .await;
        self.db.close().await;
        served
    }
}
