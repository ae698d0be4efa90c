//! The order service's configuration, read once at start-up.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use flashmesh_platform::config::{ConfigError, Env, ServerConfig, listen_addr};

#[derive(Debug, Clone)]
pub struct OrderConfig {
    /// `FLASHMESH_ORDER_ADDR`
    pub listen_addr: SocketAddr,
    /// `FLASHMESH_CATALOG_URL`: where the catalog service answers gRPC.
    pub catalog_url: String,
    /// `FLASHMESH_ORDER_TOKEN_FILE`: a file holding the order service's
    /// `role=service` token for the catalog (`flashmesh token --service
    /// order`), read again whenever it changes. Unset under `flashmesh up`,
    /// which mints the token in-process.
    pub token_file: Option<PathBuf>,
    /// `FLASHMESH_CATALOG_TIMEOUT`: the longest one catalog call may take;
    /// the caller's own deadline shortens it.
    pub catalog_timeout: Duration,
    /// `FLASHMESH_CATALOG_RETRIES`: extra attempts of a catalog call that
    /// failed in a way that is safe to retry (unreachable, contended).
    pub catalog_retries: u32,
    /// `FLASHMESH_BREAKER_OPEN_FOR`: how long the catalog circuit breaker
    /// stays open (failing calls at once) before it lets a trial call through.
    pub breaker_open_for: Duration,
    /// `FLASHMESH_IDEMPOTENCY_TTL`: how long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// `FLASHMESH_CLAIM_LEASE`: how long a PlaceOrder owns its claim on an
    /// idempotency key; a claim older than this (its process died) is swept
    /// and its reservation released. Must exceed the request timeout.
    pub claim_lease: Duration,
    /// `FLASHMESH_SWEEP_INTERVAL`: how often expired claims, pending stock
    /// releases and expired keys are swept.
    pub sweep_interval: Duration,
    /// `FLASHMESH_OUTBOX_POLL`: how often the outbox relay looks for rows
    /// written by other replicas or left behind by a crash (rows written here
    /// wake it at once).
    pub outbox_poll: Duration,
    /// `FLASHMESH_ORDER_STREAM`: the Redis Stream order events go to.
    pub stream: String,
    /// `FLASHMESH_STREAM_MAX_LEN`: entries kept in the stream (approximate).
    pub stream_max_len: usize,
    /// `FLASHMESH_CONSUMER_CLAIM_IDLE`: a stream entry pending this long with
    /// a consumer (crashed or stuck) is reclaimed by another.
    pub consumer_claim_idle: Duration,
    /// `FLASHMESH_CONSUMER_MAX_DELIVERIES`: failed deliveries before an event
    /// goes to the dead-letter stream.
    pub consumer_max_deliveries: u64,
}

pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50053);

impl OrderConfig {
    pub fn from_env(env: &Env, server: &ServerConfig) -> Result<Self, ConfigError> {
        let config = Self {
            listen_addr: listen_addr(env, "FLASHMESH_ORDER_ADDR", DEFAULT_ADDR)?,
            catalog_url: env
                .raw("FLASHMESH_CATALOG_URL")
                .unwrap_or("http://127.0.0.1:50052")
                .to_owned(),
            token_file: env.optional("FLASHMESH_ORDER_TOKEN_FILE")?,
            catalog_timeout: env
                .duration_or("FLASHMESH_CATALOG_TIMEOUT", Duration::from_secs(2))?,
            catalog_retries: env.ranged_or("FLASHMESH_CATALOG_RETRIES", 2, 0..=10)?,
            breaker_open_for: env
                .duration_or("FLASHMESH_BREAKER_OPEN_FOR", Duration::from_secs(5))?,
            idempotency_ttl: env
                .duration_or("FLASHMESH_IDEMPOTENCY_TTL", Duration::from_secs(24 * 3600))?,
            claim_lease: env.duration_or("FLASHMESH_CLAIM_LEASE", Duration::from_secs(60))?,
            sweep_interval: env.period_or("FLASHMESH_SWEEP_INTERVAL", Duration::from_secs(1))?,
            outbox_poll: env.period_or("FLASHMESH_OUTBOX_POLL", Duration::from_millis(500))?,
            stream: env
                .raw("FLASHMESH_ORDER_STREAM")
                .unwrap_or("flashmesh.orders.v1")
                .to_owned(),
            stream_max_len: env.ranged_or(
                "FLASHMESH_STREAM_MAX_LEN",
                1_000_000,
                1_000..=usize::MAX,
            )?,
            consumer_claim_idle: env
                .duration_or("FLASHMESH_CONSUMER_CLAIM_IDLE", Duration::from_secs(30))?,
            consumer_max_deliveries: env.ranged_or(
                "FLASHMESH_CONSUMER_MAX_DELIVERIES",
                5,
                1..=1000,
            )?,
        };
        // A claim must outlive the request that holds it, or a live request
        // could see its reservation swept from under it.
        if config.claim_lease <= server.request_timeout {
            return Err(ConfigError {
                var: "FLASHMESH_CLAIM_LEASE".to_owned(),
                value: humantime::format_duration(config.claim_lease).to_string(),
                reason: format!(
                    "must exceed FLASHMESH_REQUEST_TIMEOUT ({})",
                    humantime::format_duration(server.request_timeout)
                ),
            });
        }
        Ok(config)
    }
}
