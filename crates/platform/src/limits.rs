//! Fixed-window counters: "how many times has this key been hit in the current
//! window?" — shared through Redis across replicas when `REDIS_URL` is set, in
//! process otherwise, with the same semantics.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;

use crate::redis::RedisHandle;

#[derive(Debug, thiserror::Error)]
#[error("counter store unavailable: {0}")]
pub struct CounterError(#[from] redis::RedisError);

#[async_trait]
pub trait WindowCounter: Send + Sync {
    /// Counts one hit on `key` and returns the hits in the window, this one
    /// included. The window starts with the first hit and lasts `window`.
    async fn hit(&self, key: &str, window: Duration) -> Result<u64, CounterError>;
    /// The hits in the current window, without counting one.
    async fn peek(&self, key: &str) -> Result<u64, CounterError>;
    /// Forgets `key`.
    async fn reset(&self, key: &str) -> Result<(), CounterError>;
}

/// The counter the configuration asks for.
pub fn window_counter(redis: Option<&RedisHandle>, namespace: &str) -> Arc<dyn WindowCounter> {
    match redis {
        Some(redis) => Arc::new(RedisWindowCounter {
            redis: redis.clone(),
            namespace: format!("{namespace}:"),
        }),
        None => Arc::new(LocalWindowCounter::default()),
    }
}

/// One round trip: increment, and start the expiry clock on the first hit.
const HIT_SCRIPT: &str = r"
local hits = redis.call('INCR', KEYS[1])
if hits == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return hits
";

pub struct RedisWindowCounter {
    redis: RedisHandle,
    namespace: String,
}

impl RedisWindowCounter {
    fn key(&self, key: &str) -> String {
        self.redis.key(&format!("{}{key}", self.namespace))
    }
}

#[async_trait]
impl WindowCounter for RedisWindowCounter {
    async fn hit(&self, key: &str, window: Duration) -> Result<u64, CounterError> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let hits = redis::Script::new(HIT_SCRIPT)
            .key(self.key(key))
            .arg(window_ms)
            .invoke_async(&mut self.redis.connection())
            .await?;
        Ok(hits)
    }

    async fn peek(&self, key: &str) -> Result<u64, CounterError> {
        let hits: Option<u64> = redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut self.redis.connection())
            .await?;
        Ok(hits.unwrap_or(0))
    }

    async fn reset(&self, key: &str) -> Result<(), CounterError> {
        redis::cmd("DEL")
            .arg(self.key(key))
            .query_async::<()>(&mut self.redis.connection())
            .await?;
        Ok(())
    }
}

/// In-process windows; expired ones are dropped as the map grows.
#[derive(Default)]
pub struct LocalWindowCounter {
    windows: Mutex<HashMap<String, (u64, Instant)>>,
}

impl LocalWindowCounter {
    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        // A panic while holding the lock cannot leave a count half-written.
        self.windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl WindowCounter for LocalWindowCounter {
    async fn hit(&self, key: &str, window: Duration) -> Result<u64, CounterError> {
        let now = Instant::now();
        let mut windows = self.windows();
        if windows.len() >= 10_000 {
            windows.retain(|_, (_, ends)| *ends > now);
        }
        let entry = windows.entry(key.to_owned()).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += 1;
        Ok(entry.0)
    }

    async fn peek(&self, key: &str) -> Result<u64, CounterError> {
        let now = Instant::now();
        Ok(self
            .windows()
            .get(key)
            .filter(|(_, ends)| *ends > now)
            .map_or(0, |(hits, _)| *hits))
    }

    async fn reset(&self, key: &str) -> Result<(), CounterError> {
        self.windows().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_windows_count_then_expire() {
        let counter = LocalWindowCounter::default();
        let window = Duration::from_millis(50);
        assert_eq!(counter.hit("a", window).await.unwrap(), 1);
        assert_eq!(counter.hit("a", window).await.unwrap(), 2);
        assert_eq!(counter.hit("b", window).await.unwrap(), 1);
        assert_eq!(counter.peek("a").await.unwrap(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(counter.peek("a").await.unwrap(), 0);
        assert_eq!(counter.hit("a", window).await.unwrap(), 1);
        counter.reset("a").await.unwrap();
        assert_eq!(counter.peek("a").await.unwrap(), 0);
    }
}
