//! A read-through cache in two tiers in front of a loader (the database):
//! L1 in process (moka), L2 in Redis when `REDIS_URL` is set, shared by the
//! replicas.
//!
//! - **Single flight**: concurrent misses of one key in one replica run one
//!   L2 lookup and at most one load; the others wait for its result.
//! - **Staleness**: writers call [`TieredCache::invalidate`], which reaches
//!   every replica through the bus. Without it — or when an invalidation is
//!   lost, or races a load that read the old row — a value is at most
//!   `l1_ttl + l2_ttl` old (`l1_ttl` without L2). When the bus reports
//!   missed messages, L1 is emptied.
//! - **Not found** is cached in L1 only, for `negative_ttl`: enough to absorb
//!   a burst of requests for a missing id, short enough that a creation is
//!   seen soon even without an invalidation.
//! - **Redis trouble** never fails a read: L2 is skipped (logged) and the
//!   loader answers.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use moka::{Expiry, future::Cache};
use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    metrics::Metrics,
    pubsub::{Bus, BusError, Delivery},
    redis::{RedisHandle, within},
    telemetry::{self, Attribute},
};

/// L2 is an optimisation: when Redis is slow or reconnecting, the loader
/// answers sooner than waiting would.
const L2_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Names this cache's L2 keys and invalidation channel, e.g. `catalog:deal`.
    pub namespace: String,
    pub l1_ttl: Duration,
    /// Most entries kept in L1; the least useful are evicted beyond it.
    pub l1_capacity: u64,
    pub l2_ttl: Duration,
    /// How long "not found" is remembered (L1 only).
    pub negative_ttl: Duration,
    /// Where lookups are counted: `flashmesh_cache_lookups_total{cache,
    /// tier, result}`, so hit ratios per tier follow.
    pub metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidateError {
    #[error("cannot delete the L2 cache entry: {0}")]
    L2(#[from] redis::RedisError),
    #[error("cannot tell the other replicas: {0}")]
    Publish(#[from] BusError),
}

/// Counts since the cache was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub l1_hits: u64,
    pub l2_hits: u64,
    /// Loader runs.
    pub loads: u64,
}

/// Lookups by tier and result, resolved once per cache.
struct Counters {
    l1_hits: Counter,
    l1_misses: Counter,
    l2_hits: Counter,
    l2_misses: Counter,
    /// Loader runs (not exported: L2 misses, or L1 misses without L2).
    loads: Counter,
}

impl Counters {
    fn new(metrics: &Metrics, namespace: &str) -> Self {
        let family = metrics.counter_family::<3>(
            "flashmesh_cache_lookups",
            "Cache lookups by cache, tier (l1, l2) and result (hit, miss)",
        );
        let counter = |tier: &str, result: &str| {
            family
                .get_or_create(&[
                    ("cache", namespace.to_owned()),
                    ("tier", tier.to_owned()),
                    ("result", result.to_owned()),
                ])
                .clone()
        };
        Self {
            l1_hits: counter("l1", "hit"),
            l1_misses: counter("l1", "miss"),
            l2_hits: counter("l2", "hit"),
            l2_misses: counter("l2", "miss"),
            loads: Counter::default(),
        }
    }
}

struct L2 {
    redis: RedisHandle,
    /// Prefix of every L2 key of this cache.
    prefix: String,
    ttl_ms: u64,
}

pub struct TieredCache<V> {
    l1: Cache<String, Option<V>>,
    l2: Option<L2>,
    bus: Arc<dyn Bus>,
    /// Shared with every `cache.lookup` event rather than copied into each.
    channel: Arc<str>,
    counters: Counters,
    /// Stops the invalidation listener when the cache is dropped.
    _listener: DropGuard,
}

impl<V> TieredCache<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// `redis` enables L2. Invalidations are received from the moment this
    /// returns (see [`Bus::subscribe`]).
    pub async fn new(config: CacheConfig, redis: Option<&RedisHandle>, bus: Arc<dyn Bus>) -> Self {
        let l1 = Cache::builder()
            .max_capacity(config.l1_capacity)
            .expire_after(Lifetimes {
                found: config.l1_ttl,
                not_found: config.negative_ttl,
            })
            .build();
        let l2 = redis.map(|redis| L2 {
            redis: redis.clone(),
            prefix: redis.key(&format!("cache:{}:", config.namespace)),
            ttl_ms: u64::try_from(config.l2_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        });
        let channel = format!("cache:{}", config.namespace);
        let counters = Counters::new(&config.metrics, &config.namespace);
        let subscription = bus.subscribe(&channel).await;
        let stop = CancellationToken::new();
        tokio::spawn(apply_invalidations(l1.clone(), subscription, stop.clone()));
        Self {
            l1,
            l2,
            bus,
            channel: channel.into(),
            counters,
            _listener: stop.drop_guard(),
        }
    }

    /// The value of `key`: from L1, else L2, else `load` (whose result then
    /// fills both). `None` is "not found". A load error is not cached and
    /// reaches every caller that waited for that load.
    pub async fn get<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<V>, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Send + Sync + 'static,
    {
        if let Some(value) = self.l1.get(key).await {
            self.counters.l1_hits.inc();
            self.lookup_event("l1_hit");
            return Ok(value);
        }
        self.counters.l1_misses.inc();
        // moka runs one `fill` per key at a time; concurrent callers wait for it.
        self.l1.try_get_with_by_ref(key, self.fill(key, load)).await
    }

    async fn fill<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        if let Some(value) = self.l2_get(key).await {
            self.counters.l2_hits.inc();
            self.lookup_event("l2_hit");
            return Ok(Some(value));
        }
        if self.l2.is_some() {
            self.counters.l2_misses.inc();
        }
        self.lookup_event("miss");
        self.counters.loads.inc();
        let value = load().await?;
        if let Some(value) = &value {
            self.l2_set(key, value).await;
        }
        Ok(value)
    }

    /// A `cache.lookup` event on the current span, if it is sampled.
    fn lookup_event(&self, result: &'static str) {
        telemetry::event("cache.lookup", || {
            vec![
                Attribute::new("cache", self.channel.clone()),
                Attribute::new("cache.result", result),
            ]
        });
    }

    async fn l2_get(&self, key: &str) -> Option<V> {
        let l2 = self.l2.as_ref()?;
        let read = telemetry::redis(
            "cache.l2_get",
            within(
                L2_TIMEOUT,
                redis::cmd("GET")
                    .arg(format!("{}{key}", l2.prefix))
                    .query_async::<Option<Vec<u8>>>(&mut l2.redis.connection()),
            ),
        )
        .await;
        let bytes = match read {
            Ok(bytes) => bytes?,
            Err(e) => {
                tracing::warn!(error = %e, cache = %self.channel, "L2 cache read failed; loading instead");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                // E.g. written by a version with another shape; the load overwrites it.
                tracing::warn!(error = %e, cache = %self.channel, "undecodable L2 cache entry; loading instead");
                None
            }
        }
    }

    async fn l2_set(&self, key: &str, value: &V) {
        let Some(l2) = &self.l2 else { return };
        let bytes = match serde_json::to_vec(value) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, cache = %self.channel, "value not serialisable; L2 skipped");
                return;
            }
        };
        let write = within(
            L2_TIMEOUT,
            redis::cmd("SET")
                .arg(format!("{}{key}", l2.prefix))
                .arg(bytes)
                .arg("PX")
                .arg(l2.ttl_ms)
                .query_async::<()>(&mut l2.redis.connection()),
        )
        .await;
        if let Err(e) = write {
            tracing::warn!(error = %e, cache = %self.channel, "L2 cache write failed");
        }
    }

    /// Forgets `key` here and in every replica; call it after the source
    /// changed. L2 goes first so that no L1 refills from it. Every step is
    /// tried; the first failure is returned (the value then stays at most
    /// within the staleness bound).
    pub async fn invalidate(&self, key: &str) -> Result<(), InvalidateError> {
        let deleted = match &self.l2 {
            Some(l2) => {
                within(
                    L2_TIMEOUT,
                    redis::cmd("DEL")
                        .arg(format!("{}{key}", l2.prefix))
                        .query_async::<()>(&mut l2.redis.connection()),
                )
                .await
            }
            None => Ok(()),
        };
        self.l1.invalidate(key).await;
        let published = self.bus.publish(&self.channel, key.as_bytes()).await;
        deleted?;
        published?;
        Ok(())
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            l1_hits: self.counters.l1_hits.get(),
            l2_hits: self.counters.l2_hits.get(),
            loads: self.counters.loads.get(),
        }
    }
}

/// Drops the L1 entries other replicas invalidate — all of them when some
/// invalidations may have been missed.
async fn apply_invalidations<V>(
    l1: Cache<String, Option<V>>,
    mut subscription: crate::pubsub::Subscription,
    stop: CancellationToken,
) where
    V: Clone + Send + Sync + 'static,
{
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return,
            delivery = subscription.recv() => delivery,
        };
        match delivery {
            Some(Delivery::Message(key)) => match std::str::from_utf8(&key) {
                Ok(key) => l1.invalidate(key).await,
                // Not from a TieredCache; play safe.
                Err(_) => l1.invalidate_all(),
            },
            Some(Delivery::Missed) => l1.invalidate_all(),
            None => return,
        }
    }
}

/// Found values live `found`, "not found" lives `not_found`.
struct Lifetimes {
    found: Duration,
    not_found: Duration,
}

impl<V> Expiry<String, Option<V>> for Lifetimes {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Option<V>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(if value.is_some() {
            self.found
        } else {
            self.not_found
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering::SeqCst},
    };

    use serde::Deserialize;

    use super::*;
    use crate::pubsub::{
        LocalBus, RedisBus,
        tests::{Proxy, redis_handle, unique_prefix},
    };

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Deal {
        id: String,
        stock: u32,
    }

    fn config() -> CacheConfig {
        CacheConfig {
            namespace: "catalog:deal".to_owned(),
            l1_ttl: Duration::from_secs(60),
            l1_capacity: 10_000,
            l2_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(1),
            metrics: Metrics::default(),
        }
    }

    type Loading = std::pin::Pin<Box<dyn Future<Output = Result<Option<Deal>, Infallible>> + Send>>;

    /// A loader that counts its runs and takes a while, so that concurrent
    /// misses overlap.
    #[derive(Clone, Default)]
    struct Source {
        loads: Arc<AtomicUsize>,
    }

    impl Source {
        fn loader(&self, id: &str) -> impl FnOnce() -> Loading + Send + 'static {
            let loads = self.loads.clone();
            let id = id.to_owned();
            move || {
                Box::pin(async move {
                    let stock = u32::try_from(loads.fetch_add(1, SeqCst)).unwrap_or(0) + 100;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Some(Deal { id, stock }))
                })
            }
        }

        fn loads(&self) -> usize {
            self.loads.load(SeqCst)
        }
    }

    /// Two replicas: on Redis (L2 and bus shared) or in one process (bus shared).
    async fn replicas(with_redis: bool) -> (TieredCache<Deal>, TieredCache<Deal>) {
        if with_redis {
            let prefix = unique_prefix();
            let (a, b) = (redis_handle(&prefix).await, redis_handle(&prefix).await);
            (
                TieredCache::new(config(), Some(&a), Arc::new(RedisBus::new(&a))).await,
                TieredCache::new(config(), Some(&b), Arc::new(RedisBus::new(&b))).await,
            )
        } else {
            let bus: Arc<dyn Bus> = Arc::new(LocalBus::default());
            (
                TieredCache::new(config(), None, bus.clone()).await,
                TieredCache::new(config(), None, bus).await,
            )
        }
    }

    async fn thousand_concurrent_misses_load_once(with_redis: bool) {
        let (cache, _) = replicas(with_redis).await;
        let cache = Arc::new(cache);
        let source = Source::default();
        let calls: Vec<_> = (0..1_000)
            .map(|_| {
                let (cache, load) = (cache.clone(), source.loader("d1"));
                tokio::spawn(async move { cache.get("d1", load).await })
            })
            .collect();
        for call in calls {
            let deal = call
                .await
                .expect("get panicked")
                .expect("loader cannot fail");
            assert_eq!(deal.map(|d| d.stock), Some(100));
        }
        assert_eq!(source.loads(), 1);
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.l2_hits), (1, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn thousand_concurrent_misses_load_once_in_process() {
        thousand_concurrent_misses_load_once(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn thousand_concurrent_misses_load_once_with_redis() {
        thousand_concurrent_misses_load_once(true).await;
    }

    #[tokio::test]
    async fn a_replica_reads_what_another_loaded_from_l2() {
        let (a, b) = replicas(true).await;
        let (source_a, source_b) = (Source::default(), Source::default());
        let loaded = a.get("d1", source_a.loader("d1")).await.unwrap();
        let read = b.get("d1", source_b.loader("d1")).await.unwrap();
        assert_eq!(read, loaded);
        assert_eq!((source_a.loads(), source_b.loads()), (1, 0));
        assert_eq!(b.stats().l2_hits, 1);
        b.get("d1", source_b.loader("d1")).await.unwrap();
        assert_eq!(b.stats().l1_hits, 1);
    }

    async fn invalidation_reaches_the_other_replica(with_redis: bool) {
        let (a, b) = replicas(with_redis).await;
        let (source_a, source_b) = (Source::default(), Source::default());
        a.get("d1", source_a.loader("d1")).await.unwrap();
        b.get("d1", source_b.loader("d1")).await.unwrap();
        let b_loads = source_b.loads();
        a.invalidate("d1").await.expect("invalidate");

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while source_b.loads() == b_loads {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica B still serves its L1 copy after A's invalidation"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            b.get("d1", source_b.loader("d1")).await.unwrap();
        }
        assert_eq!(source_b.loads(), b_loads + 1);
        assert_eq!(source_a.loads(), 1);
    }

    #[tokio::test]
    async fn invalidation_reaches_the_other_replica_in_process() {
        invalidation_reaches_the_other_replica(false).await;
    }

    #[tokio::test]
    async fn invalidation_reaches_the_other_replica_with_redis() {
        invalidation_reaches_the_other_replica(true).await;
    }

    #[tokio::test]
    async fn not_found_is_remembered_briefly() {
        let cache = TieredCache::<Deal>::new(config(), None, Arc::new(LocalBus::default())).await;
        let loads = AtomicUsize::new(0);
        let missing = || async {
            loads.fetch_add(1, SeqCst);
            Ok::<_, Infallible>(None)
        };
        assert_eq!(cache.get("gone", missing).await.unwrap(), None);
        assert_eq!(cache.get("gone", missing).await.unwrap(), None);
        assert_eq!(loads.load(SeqCst), 1);
        tokio::time::sleep(config().negative_ttl + Duration::from_millis(100)).await;
        assert_eq!(cache.get("gone", missing).await.unwrap(), None);
        assert_eq!(loads.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn load_errors_are_not_cached() {
        let cache = TieredCache::<Deal>::new(config(), None, Arc::new(LocalBus::default())).await;
        let failing = || async { Err::<Option<Deal>, _>("database down") };
        assert_eq!(
            *cache.get("d1", failing).await.unwrap_err(),
            "database down"
        );
        let source = Source::default();
        assert!(
            cache
                .get("d1", source.loader("d1"))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(source.loads(), 1);
    }

    #[tokio::test]
    async fn redis_down_degrades_to_the_loader() {
        let mut proxy = Proxy::start().await;
        let redis = RedisHandle::connect(&proxy.url(), &unique_prefix())
            .await
            .expect("connect through the relay");
        let cache = TieredCache::new(config(), Some(&redis), Arc::new(LocalBus::default())).await;
        proxy.stop().await;

        let source = Source::default();
        let started = tokio::time::Instant::now();
        let deal = cache.get("d1", source.loader("d1")).await.unwrap();
        assert_eq!(deal.map(|d| d.stock), Some(100));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a read waited {:?} for a Redis that is down",
            started.elapsed()
        );
        assert_eq!(source.loads(), 1);
        assert!(
            cache
                .get("d1", source.loader("d1"))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            cache.stats(),
            CacheStats {
                l1_hits: 1,
                l2_hits: 0,
                loads: 1
            }
        );
        assert!(matches!(
            cache.invalidate("d1").await,
            Err(InvalidateError::L2(_))
        ));
    }
}
