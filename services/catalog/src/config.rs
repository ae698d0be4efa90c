//! The catalog service's configuration, read once at start-up.

use std::{net::SocketAddr, time::Duration};

use flashmesh_platform::config::{ConfigError, Env, listen_addr};

#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// `FLASHMESH_CATALOG_ADDR`
    pub listen_addr: SocketAddr,
    /// `FLASHMESH_STOCK_CALLERS`: service identities (the `sub` of a
    /// `role=service` token) allowed to call ReserveStock and ReleaseStock.
    pub stock_callers: Vec<String>,
    /// `FLASHMESH_STOCK_GATE_TTL`: how long the Redis stock gate trusts its
    /// counts before it is reseeded from the database.
    pub stock_gate_ttl: Duration,
    /// `FLASHMESH_CACHE_L1_TTL`: in-process cache lifetime of products and deals.
    pub cache_l1_ttl: Duration,
    /// `FLASHMESH_CACHE_L2_TTL`: Redis cache lifetime. Displayed stock is at
    /// most L1 + L2 TTL old.
    pub cache_l2_ttl: Duration,
    /// `FLASHMESH_WATCH_MIN_INTERVAL`: WatchDeal sends at most one stock
    /// update per interval per watcher; changes in between are coalesced.
    pub watch_min_interval: Duration,
    /// `FLASHMESH_WARM_AHEAD`: deals starting within this long are prepared
    /// (gate seeded, cache loaded) before they start.
    pub warm_ahead: Duration,
    /// `FLASHMESH_WARM_INTERVAL`: how often upcoming deals are prepared.
    pub warm_interval: Duration,
}

pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50052);

impl CatalogConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            listen_addr: listen_addr(env, "FLASHMESH_CATALOG_ADDR", DEFAULT_ADDR)?,
            stock_callers: env
                .raw("FLASHMESH_STOCK_CALLERS")
                .unwrap_or("order")
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            stock_gate_ttl: env.duration_or("FLASHMESH_STOCK_GATE_TTL", Duration::from_secs(30))?,
            cache_l1_ttl: env.duration_or("FLASHMESH_CACHE_L1_TTL", Duration::from_millis(500))?,
            cache_l2_ttl: env.duration_or("FLASHMESH_CACHE_L2_TTL", Duration::from_millis(500))?,
            watch_min_interval: env
                .duration_or("FLASHMESH_WATCH_MIN_INTERVAL", Duration::from_millis(200))?,
            warm_ahead: env.duration_or("FLASHMESH_WARM_AHEAD", Duration::from_secs(60))?,
            warm_interval: env.period_or("FLASHMESH_WARM_INTERVAL", Duration::from_secs(5))?,
        })
    }
}
