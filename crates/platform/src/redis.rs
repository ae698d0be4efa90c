//! Redis connections and the key namespace every adapter writes under.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to Redis at REDIS_URL: {0}")]
pub struct RedisConnectError(#[from] redis::RedisError);

/// A multiplexed, self-reconnecting Redis connection plus the key prefix
/// (`FLASHMESH_REDIS_KEY_PREFIX`) that keeps flashmesh's keys apart from
/// anything else sharing the server.
#[derive(Clone)]
pub struct RedisHandle {
    connection: ConnectionManager,
    prefix: String,
}

impl RedisHandle {
    /// Connects eagerly, so a wrong `REDIS_URL` fails start-up.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, RedisConnectError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let connection = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
        })
    }

    /// The connection; cheap to clone.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// `key` under this deployment's prefix.
    pub fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}
