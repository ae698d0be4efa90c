//! Redis connections and the key namespace every adapter writes under.

use redis::{
    RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use std::{future::Future, io, time::Duration};

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to Redis at REDIS_URL: {0}")]
pub struct RedisConnectError(#[from] redis::RedisError);

/// A multiplexed, self-reconnecting Redis connection plus the key prefix
/// (`FLASHMESH_REDIS_KEY_PREFIX`) that keeps flashmesh's keys apart from
/// anything else sharing the server.
#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
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
        let connection = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(Self {
            client,
            connection,
            prefix: prefix.to_owned(),
        })
    }

    /// The connection; cheap to clone.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The client, for connections that cannot be shared: a subscribed
    /// pub/sub connection takes no other commands.
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// `key` under this deployment's prefix.
    pub fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}

/// `call`, failed when Redis has not answered within `limit`. The connection
/// manager waits out its own reconnection attempts (seconds) before failing a
/// call; callers that can do without Redis should not wait that long.
pub(crate) async fn within<T>(
    limit: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from Redis within {limit:?}"),
        )
        .into())
    })
}
