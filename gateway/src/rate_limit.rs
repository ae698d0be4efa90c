//! GCRA rate limiting at the edge: one bucket per key (the caller's IP or
//! user id, scoped by the caller to a route), its quota chosen per route.
//!
//! The generic cell rate algorithm keeps one number per bucket, the
//! theoretical arrival time (TAT): when the bucket would be full again if
//! requests kept arriving at the sustained rate. A request is allowed when
//! adding one emission interval to the TAT keeps it within `burst` intervals
//! of now. Both implementations run the same arithmetic in microseconds:
//!
//! * [`LocalLimiter`] — in process, over a bounded moka cache whose entries
//!   expire exactly when their bucket is full again (a missing bucket and a
//!   full one are the same thing). Chosen over `governor`'s keyed limiter
//!   because that one fixes one quota per limiter (we need a quota per
//!   route), grows its keyed store until someone calls `retain_recent`, and
//!   only reports "remaining" through a middleware while not reporting the
//!   time until the bucket is full; a 20-line GCRA gives exact headers and
//!   is the same arithmetic the Redis script runs, so both answer alike.
//! * [`RedisLimiter`] — one Lua script, one round trip, Redis `TIME` as the
//!   clock every replica shares, so all replicas draw from one budget.
//! * [`FallbackLimiter`] — Redis first, bounded to ~50 ms; on an error or a
//!   timeout, the local limiter answers (per-replica budgets beat failing
//!   every request, or admitting all of them).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use flashmesh_platform::redis::RedisHandle;
use http::{HeaderName, HeaderValue, StatusCode, header};
use moka::{Expiry, future::Cache, ops::compute::Op};

use crate::problem::Problem;

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

const MICROS_PER_SECOND: u64 = 1_000_000;

/// A route's allowance: `burst` requests at once, refilled at `per_second`.
/// Zero in either field is treated as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Sustained rate.
    pub per_second: u32,
    /// Bucket size: how many requests may arrive at once.
    pub burst: u32,
}

impl Quota {
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }

    /// Microseconds between two requests at the sustained rate.
    fn interval_us(self) -> u64 {
        (MICROS_PER_SECOND / u64::from(self.per_second.max(1))).max(1)
    }

    fn burst(self) -> u32 {
        self.burst.max(1)
    }
}

/// One check's answer, with what the client should be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst.
    pub limit: u32,
    /// Requests that could be made right now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// When denied: until one request would be allowed.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds,
    /// rounded up) per draft-ietf-httpapi-ratelimit-headers, and `Retry-After`
    /// (seconds, rounded up) when denied.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = vec![
            (RATELIMIT_LIMIT, HeaderValue::from(self.limit)),
            (RATELIMIT_REMAINING, HeaderValue::from(self.remaining)),
            (
                RATELIMIT_RESET,
                HeaderValue::from(ceil_seconds(self.reset_after)),
            ),
        ];
        if let Some(retry_after) = self.retry_after {
            headers.push((
                header::RETRY_AFTER,
                HeaderValue::from(ceil_seconds(retry_after).max(1)),
            ));
        }
        headers
    }

    /// The 429 for a denied request, all headers attached.
    pub fn problem(&self) -> Problem {
        let problem = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "too many requests; retry after the time in Retry-After",
        );
        self.headers()
            .into_iter()
            .fold(problem, |problem, (name, value)| {
                problem.with_header(name, value)
            })
    }

    /// What to answer when there is no verdict: allowed, headers truthful
    /// about the quota only.
    fn unknown(quota: Quota) -> Self {
        Self {
            allowed: true,
            limit: quota.burst(),
            remaining: quota.burst().saturating_sub(1),
            reset_after: Duration::ZERO,
            retry_after: None,
        }
    }
}

fn ceil_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// One GCRA step at `now_us`, given the stored TAT (absent = full bucket).
/// Returns the TAT to store when allowed, and the decision.
fn gcra(stored_tat_us: Option<u64>, now_us: u64, quota: Quota) -> (Option<u64>, Decision) {
    let interval = quota.interval_us();
    let burst = quota.burst();
    let capacity = interval.saturating_mul(u64::from(burst));
    let tat = stored_tat_us.unwrap_or(now_us).max(now_us);
    let new_tat = tat.saturating_add(interval);
    let allow_at = new_tat.saturating_sub(capacity);
    if now_us < allow_at {
        let decision = Decision {
            allowed: false,
            limit: burst,
            remaining: 0,
            reset_after: Duration::from_micros(tat - now_us),
            retry_after: Some(Duration::from_micros(allow_at - now_us)),
        };
        (None, decision)
    } else {
        (Some(new_tat), allowed(quota, new_tat - now_us))
    }
}

/// The decision for an allowed request whose bucket is now full again in
/// `reset_after_us`.
fn allowed(quota: Quota, reset_after_us: u64) -> Decision {
    let interval = quota.interval_us();
    let burst = quota.burst();
    let capacity = interval.saturating_mul(u64::from(burst));
    let remaining = capacity.saturating_sub(reset_after_us) / interval;
    Decision {
        allowed: true,
        limit: burst,
        remaining: u32::try_from(remaining).unwrap_or(burst).min(burst),
        reset_after: Duration::from_micros(reset_after_us),
        retry_after: None,
    }
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Spends one request from `key`'s bucket, if it has one left.
    async fn check(&self, key: &str, quota: Quota) -> Decision;
}

/// The limiter the configuration asks for: Redis-backed, falling back to the
/// process when Redis fails, when `REDIS_URL` is set; in process otherwise.
pub fn limiter(redis: Option<&RedisHandle>) -> Arc<dyn RateLimiter> {
    match redis {
        Some(redis) => Arc::new(FallbackLimiter::new(RedisLimiter::new(redis.clone()))),
        None => Arc::new(LocalLimiter::default()),
    }
}

// ---------------------------------------------------------------------------
// In process

/// In-process GCRA over a bounded cache keyed by `(key, quota)`.
pub struct LocalLimiter {
    /// TAT in microseconds since `epoch`.
    buckets: Cache<(String, Quota), u64>,
    epoch: Instant,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl LocalLimiter {
    /// At most `max_buckets` buckets; beyond that the least useful are
    /// forgotten (which hands their keys a full bucket).
    pub fn new(max_buckets: u64) -> Self {
        let epoch = Instant::now();
        Self {
            buckets: Cache::builder()
                .max_capacity(max_buckets)
                .expire_after(FullAtTat { epoch })
                .build(),
            epoch,
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

#[async_trait]
impl RateLimiter for LocalLimiter {
    async fn check(&self, key: &str, quota: Quota) -> Decision {
        let mut decision = None;
        // Calls on one key are serialized by the cache's per-key lock.
        self.buckets
            .entry((key.to_owned(), quota))
            .and_compute_with(|entry| {
                let (tat, verdict) = gcra(entry.map(|e| e.into_value()), self.now_us(), quota);
                decision = Some(verdict);
                std::future::ready(tat.map_or(Op::Nop, Op::Put))
            })
            .await;
        decision.unwrap_or_else(|| Decision::unknown(quota))
    }
}

/// Buckets leave the cache when they are full again.
struct FullAtTat {
    epoch: Instant,
}

impl FullAtTat {
    fn until_full(&self, tat_us: u64, at: Instant) -> Duration {
        (self.epoch + Duration::from_micros(tat_us)).saturating_duration_since(at)
    }
}

impl Expiry<(String, Quota), u64> for FullAtTat {
    fn expire_after_create(
        &self,
        _key: &(String, Quota),
        tat_us: &u64,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(self.until_full(*tat_us, created_at))
    }

    fn expire_after_update(
        &self,
        _key: &(String, Quota),
        tat_us: &u64,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.until_full(*tat_us, updated_at))
    }
}

// ---------------------------------------------------------------------------
// Redis

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate-limit store failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
}

/// A limiter whose buckets live elsewhere and whose calls can fail: the seam
/// [`FallbackLimiter`] wraps.
#[async_trait]
pub trait SharedLimiter: Send + Sync {
    async fn try_check(&self, key: &str, quota: Quota) -> Result<Decision, RateLimitError>;
}

/// GCRA in one round trip. `KEYS[1]` the bucket, `ARGV[1]` the emission
/// interval (µs), `ARGV[2]` the burst. The TAT is stored in µs of Redis
/// `TIME`, expiring when the bucket is full again. Returns
/// `{allowed, reset_after_us, retry_after_us}`.
const GCRA_SCRIPT: &str = r"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat),
  'PX', math.ceil((new_tat - now) / 1000))
return {1, new_tat - now, 0}
";

/// GCRA shared by every replica through Redis.
pub struct RedisLimiter {
    redis: RedisHandle,
    script: redis::Script,
}

impl RedisLimiter {
    pub fn new(redis: RedisHandle) -> Self {
        Self {
            redis,
            script: redis::Script::new(GCRA_SCRIPT),
        }
    }

    fn key(&self, key: &str) -> String {
        self.redis.key(&format!("gateway:rl:{key}"))
    }
}

#[async_trait]
impl SharedLimiter for RedisLimiter {
    async fn try_check(&self, key: &str, quota: Quota) -> Result<Decision, RateLimitError> {
        let (allowed_flag, reset_after_us, retry_after_us): (i64, i64, i64) = self
            .script
            .key(self.key(key))
            .arg(quota.interval_us())
            .arg(quota.burst())
            .invoke_async(&mut self.redis.connection())
            .await?;
        let reset_after_us = u64::try_from(reset_after_us).unwrap_or(0);
        if allowed_flag == 1 {
            Ok(allowed(quota, reset_after_us))
        } else {
            Ok(Decision {
                allowed: false,
                limit: quota.burst(),
                remaining: 0,
                reset_after: Duration::from_micros(reset_after_us),
                retry_after: Some(Duration::from_micros(
                    u64::try_from(retry_after_us).unwrap_or(0).max(1),
                )),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Fallback

/// How long a check may wait for Redis before the local limiter answers.
pub const PRIMARY_TIMEOUT: Duration = Duration::from_millis(50);
/// After a failure, how long checks go straight to the local limiter before
/// Redis is tried again (so a hung Redis costs one timeout per interval, not
/// one per request).
pub const PRIMARY_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// At most one warning per this interval while degraded.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// `primary` (Redis) while it answers in time; the process's own buckets
/// when it does not.
pub struct FallbackLimiter<P = RedisLimiter> {
    primary: P,
    fallback: LocalLimiter,
    timeout: Duration,
    retry_interval: Duration,
    epoch: Instant,
    /// µs since `epoch` before which the primary is not tried.
    skip_primary_until_us: AtomicU64,
    degraded: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl<P: SharedLimiter> FallbackLimiter<P> {
    pub fn new(primary: P) -> Self {
        Self::with_timeouts(primary, PRIMARY_TIMEOUT, PRIMARY_RETRY_INTERVAL)
    }

    /// `timeout` bounds each primary call; after a failure the primary is
    /// left alone for `retry_interval`.
    pub fn with_timeouts(primary: P, timeout: Duration, retry_interval: Duration) -> Self {
        Self {
            primary,
            fallback: LocalLimiter::default(),
            timeout,
            retry_interval,
            epoch: Instant::now(),
            skip_primary_until_us: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        }
    }

    /// Checks the local limiter answered because the primary failed, timed
    /// out, or was being left alone after a failure.
    pub fn degraded_checks(&self) -> u64 {
        self.degraded.load(Ordering::Relaxed)
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn primary_failed(&self, error: &RateLimitError) {
        let until = self
            .now_us()
            .saturating_add(u64::try_from(self.retry_interval.as_micros()).unwrap_or(u64::MAX));
        self.skip_primary_until_us
            .fetch_max(until, Ordering::Relaxed);
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL) {
            *last = Some(now);
            drop(last);
            tracing::warn!(
                %error,
                degraded_checks = self.degraded_checks(),
                "rate limiting falls back to per-replica buckets"
            );
        }
    }
}

#[async_trait]
impl<P: SharedLimiter> RateLimiter for FallbackLimiter<P> {
    async fn check(&self, key: &str, quota: Quota) -> Decision {
        if self.now_us() >= self.skip_primary_until_us.load(Ordering::Relaxed) {
            let answer = tokio::time::timeout(self.timeout, self.primary.try_check(key, quota))
                .await
                .unwrap_or(Err(RateLimitError::Timeout(self.timeout)));
            match answer {
                Ok(decision) => return decision,
                Err(error) => {
                    self.degraded.fetch_add(1, Ordering::Relaxed);
                    self.primary_failed(&error);
                }
            }
        } else {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        }
        self.fallback.check(key, quota).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    const SECOND: u64 = MICROS_PER_SECOND;

    // -- the arithmetic ----------------------------------------------------

    #[test]
    fn gcra_allows_the_burst_then_refills_at_the_rate() {
        let quota = Quota::new(10, 3); // 100 ms apart, 3 at once
        let mut tat = None;
        for remaining in [2, 1, 0] {
            let (next, decision) = gcra(tat, SECOND, quota);
            assert!(decision.allowed);
            assert_eq!(decision.remaining, remaining);
            assert_eq!(decision.limit, 3);
            assert_eq!(decision.retry_after, None);
            tat = next;
        }
        let (next, denied) = gcra(tat, SECOND, quota);
        assert_eq!(next, None);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Some(Duration::from_millis(100)));
        assert_eq!(denied.reset_after, Duration::from_millis(300));

        // 100 ms later exactly one more.
        let (next, decision) = gcra(tat, SECOND + 100_000, quota);
        assert!(decision.allowed);
        assert_eq!(decision.remaining, 0);
        let (_, decision) = gcra(next, SECOND + 100_000, quota);
        assert!(!decision.allowed);

        // Long idle: full again.
        let (_, decision) = gcra(tat, 10 * SECOND, quota);
        assert_eq!(decision.remaining, 2);
        assert_eq!(decision.reset_after, Duration::from_millis(100));
    }

    #[test]
    fn zero_quota_fields_mean_one() {
        let quota = Quota::new(0, 0);
        let (tat, decision) = gcra(None, 0, quota);
        assert!(decision.allowed);
        assert_eq!(decision.limit, 1);
        let (_, decision) = gcra(tat, 0, quota);
        assert_eq!(decision.retry_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn headers_round_up_to_seconds() {
        let decision = Decision {
            allowed: false,
            limit: 10,
            remaining: 0,
            reset_after: Duration::from_millis(1_200),
            retry_after: Some(Duration::from_millis(100)),
        };
        let headers: Vec<(String, String)> = decision
            .headers()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let expected = [
            ("ratelimit-limit", "10"),
            ("ratelimit-remaining", "0"),
            ("ratelimit-reset", "2"),
            ("retry-after", "1"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()));
        assert_eq!(headers, expected);

        let allowed = Decision {
            allowed: true,
            remaining: 3,
            retry_after: None,
            reset_after: Duration::from_secs(2),
            ..decision.clone()
        };
        assert!(
            !allowed
                .headers()
                .iter()
                .any(|(n, _)| *n == header::RETRY_AFTER)
        );

        let problem = decision.problem();
        assert_eq!(problem.status, 429);
        assert_eq!(problem.code, "RATE_LIMITED");
        assert_eq!(problem.headers().len(), 4);
    }

    // -- in process --------------------------------------------------------

    #[tokio::test]
    async fn local_allows_exactly_the_burst_then_refills() {
        let limiter = LocalLimiter::default();
        let quota = Quota::new(20, 5); // one per 50 ms
        for _ in 0..5 {
            assert!(limiter.check("ip:1", quota).await.allowed);
        }
        let denied = limiter.check("ip:1", quota).await;
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
        let retry_after = denied.retry_after.expect("retry_after when denied");
        assert!(
            retry_after > Duration::ZERO && retry_after <= Duration::from_millis(50),
            "{retry_after:?}"
        );
        assert!(denied.reset_after <= Duration::from_millis(250));

        // Another key, and the same key under another quota, are untouched.
        assert_eq!(limiter.check("ip:2", quota).await.remaining, 4);
        assert!(limiter.check("ip:1", Quota::new(20, 6)).await.allowed);

        tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        assert!(limiter.check("ip:1", quota).await.allowed);
        assert!(!limiter.check("ip:1", quota).await.allowed);
    }

    #[tokio::test]
    async fn local_concurrent_checks_spend_one_budget() {
        let limiter = Arc::new(LocalLimiter::default());
        let quota = Quota::new(1, 10);
        let checks = (0..40).map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.check("user:7", quota).await.allowed })
        });
        let mut allowed = 0;
        for check in checks {
            allowed += usize::from(check.await.expect("task"));
        }
        assert_eq!(allowed, 10);
    }

    #[tokio::test]
    async fn limiter_without_redis_is_local() {
        let limiter = limiter(None);
        let quota = Quota::new(1, 1);
        assert!(limiter.check("k", quota).await.allowed);
        assert!(!limiter.check("k", quota).await.allowed);
    }

    // -- Redis -------------------------------------------------------------

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// A connection under a prefix no other test uses; fails the test when
    /// Redis is unreachable.
    async fn connect(url: &str, prefix: &str) -> RedisHandle {
        RedisHandle::connect(url, prefix)
            .await
            .unwrap_or_else(|e| panic!("these tests need Redis at {url}: {e}"))
    }

    fn unique_prefix() -> String {
        format!("flashmesh-test-{}:", uuid::Uuid::new_v4().simple())
    }

    async fn clean_up(redis: &RedisHandle) {
        let mut connection = redis.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(redis.key("*"))
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut connection)
                .await
                .expect("DEL");
        }
    }

    #[tokio::test]
    async fn redis_allows_the_burst_then_refills() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = RedisLimiter::new(redis.clone());
        let quota = Quota::new(10, 3);
        for remaining in [2, 1, 0] {
            let decision = limiter.try_check("ip:1", quota).await.expect("check");
            assert!(decision.allowed);
            assert_eq!(decision.remaining, remaining);
            assert_eq!(decision.limit, 3);
        }
        let denied = limiter.try_check("ip:1", quota).await.expect("check");
        assert!(!denied.allowed);
        let retry_after = denied.retry_after.expect("retry_after when denied");
        assert!(
            retry_after > Duration::ZERO && retry_after <= Duration::from_millis(100),
            "{retry_after:?}"
        );

        let ttl: i64 = redis::cmd("PTTL")
            .arg(redis.key("gateway:rl:ip:1"))
            .query_async(&mut redis.connection())
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= 300, "the bucket expires when full: {ttl}");

        tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        assert!(
            limiter
                .try_check("ip:1", quota)
                .await
                .expect("check")
                .allowed
        );
        assert!(
            !limiter
                .try_check("ip:1", quota)
                .await
                .expect("check")
                .allowed
        );
        clean_up(&redis).await;
    }

    #[tokio::test]
    async fn two_replicas_share_one_budget() {
        let prefix = unique_prefix();
        let url = redis_url();
        let replica_a = Arc::new(RedisLimiter::new(connect(&url, &prefix).await));
        let replica_b = Arc::new(RedisLimiter::new(connect(&url, &prefix).await));
        let quota = Quota::new(1, 10);
        let checks = (0..20).map(|i| {
            let limiter = if i % 2 == 0 {
                replica_a.clone()
            } else {
                replica_b.clone()
            };
            tokio::spawn(async move { limiter.try_check("user:42", quota).await })
        });
        let mut allowed = 0;
        for check in checks {
            let decision = check.await.expect("task").expect("Redis answers");
            allowed += usize::from(decision.allowed);
        }
        assert_eq!(allowed, 10);
        clean_up(&replica_a.redis).await;
    }

    #[tokio::test]
    async fn limiter_with_redis_uses_redis() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let fallback = FallbackLimiter::with_timeouts(
            RedisLimiter::new(redis.clone()),
            Duration::from_secs(1),
            PRIMARY_RETRY_INTERVAL,
        );
        let quota = Quota::new(1, 2);
        assert!(fallback.check("k", quota).await.allowed);
        // A second replica sees the spend.
        let other = limiter(Some(&redis));
        assert!(other.check("k", quota).await.allowed);
        assert!(!fallback.check("k", quota).await.allowed);
        assert_eq!(fallback.degraded_checks(), 0);
        clean_up(&redis).await;
    }

    /// A TCP proxy to Redis that can be told to swallow traffic: connections
    /// stay open and nothing answers, the worst way Redis can fail.
    struct BlackholeProxy {
        address: std::net::SocketAddr,
        forwarding: Arc<AtomicBool>,
    }

    impl BlackholeProxy {
        async fn start(upstream: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("address");
            let forwarding = Arc::new(AtomicBool::new(true));
            let flag = forwarding.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, flag.clone()));
                    tokio::spawn(pump(server_read, client_write, flag.clone()));
                }
            });
            Self {
                address,
                forwarding,
            }
        }

        fn blackhole(&self) {
            self.forwarding.store(false, Ordering::SeqCst);
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        forwarding: Arc<AtomicBool>,
    ) {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if forwarding.load(Ordering::SeqCst) && to.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    }

    /// `url` with its `host:port` replaced by `address`.
    fn through(url: &str, address: std::net::SocketAddr) -> (String, String) {
        let (scheme, rest) = url.split_once("://").expect("REDIS_URL has a scheme");
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
            None => (String::new(), authority),
        };
        let upstream = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:6379")
        };
        (format!("{scheme}://{userinfo}{address}{path}"), upstream)
    }

    #[tokio::test]
    async fn hung_redis_falls_back_to_local_buckets() {
        let prefix = unique_prefix();
        let url = redis_url();
        let direct = connect(&url, &prefix).await;
        let (_, upstream) = through(&url, "127.0.0.1:1".parse().expect("address"));
        let proxy = BlackholeProxy::start(upstream).await;
        let (proxied_url, _) = through(&url, proxy.address);
        let redis = connect(&proxied_url, &prefix).await;
        let limiter = FallbackLimiter::new(RedisLimiter::new(redis));
        let quota = Quota::new(1, 2);

        // Healthy: Redis decides (the bucket is visible in Redis).
        assert!(limiter.check("ip:9", quota).await.allowed);
        assert_eq!(limiter.degraded_checks(), 0);
        let exists: bool = redis::cmd("EXISTS")
            .arg(direct.key("gateway:rl:ip:9"))
            .query_async(&mut direct.connection())
            .await
            .expect("EXISTS");
        assert!(exists);

        // Hung: each answer within the bound, from fresh local buckets.
        proxy.blackhole();
        let started = Instant::now();
        let first = limiter.check("ip:9", quota).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(first.allowed);
        assert_eq!(first.remaining, 1, "a fresh local bucket");
        assert!(limiter.check("ip:9", quota).await.allowed);
        assert!(!limiter.check("ip:9", quota).await.allowed);
        assert_eq!(limiter.degraded_checks(), 3);
        assert!(started.elapsed() < Duration::from_millis(500));
        clean_up(&direct).await;
    }

    /// A primary that fails while `up` is false.
    struct Flaky {
        up: AtomicBool,
        calls: AtomicU64,
    }

    #[async_trait]
    impl SharedLimiter for Flaky {
        async fn try_check(&self, _key: &str, quota: Quota) -> Result<Decision, RateLimitError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                Ok(Decision::unknown(quota))
            } else {
                Err(RateLimitError::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "connection refused",
                ))))
            }
        }
    }

    #[tokio::test]
    async fn failing_primary_degrades_then_recovers() {
        let limiter = FallbackLimiter::with_timeouts(
            Flaky {
                up: AtomicBool::new(false),
                calls: AtomicU64::new(0),
            },
            PRIMARY_TIMEOUT,
            Duration::from_millis(100),
        );
        let quota = Quota::new(1, 1);
        assert!(limiter.check("k", quota).await.allowed);
        assert!(
            !limiter.check("k", quota).await.allowed,
            "local bucket spent"
        );
        assert_eq!(limiter.degraded_checks(), 2);
        // The second check did not wait on the failed primary.
        assert_eq!(limiter.primary.calls.load(Ordering::SeqCst), 1);

        limiter.primary.up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(limiter.check("k", quota).await.allowed, "primary again");
        assert_eq!(limiter.degraded_checks(), 2);
        assert_eq!(limiter.primary.calls.load(Ordering::SeqCst), 2);
    }
}
