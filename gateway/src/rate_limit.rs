//! GCRA rate limiting at the edge: one bucket per key (the caller's IP or
//! user id, scoped by the caller to a route), its quota chosen per route.
//!
//! The generic cell rate algorithm keeps one number per bucket, the
//! theoretical arrival time (TAT): when the bucket would be full again if
//! requests kept arriving at the sustained rate. A request is allowed when
//! adding one emission interval to the TAT keeps it within `burst` intervals
//! of now. Every implementation runs the same arithmetic in microseconds.
//!
//! A request spends from several buckets ([`Checks`]: its IP's, its user's,
//! the route's own) and the limiter takes them all in one call: in order, the
//! first refusal stops, and the answer is the tightest decision. One call per
//! request is what lets the Redis limiter answer a request in at most one
//! round trip (none when its buckets' tokens are leased here).
//!
//! * [`LocalLimiter`] — in process: sharded mutexes over hash tables of TATs
//!   keyed by a keyed 64-bit hash of (key, quota). A check is a hash, an
//!   uncontended lock and a probe (moka's `and_compute_with`, used before,
//!   cost ~10k instructions a check: per-key async locks, an owned key, the
//!   expiry bookkeeping). Memory stays bounded by a bucket cap per shard: a
//!   bucket that is full again is the same as an absent one, so when a shard
//!   is at its cap the full ones are swept out, and if too few were, those
//!   nearest to full are forgotten (which hands their keys a full bucket);
//!   each sweep leaves an eighth of the shard free, so sweeping is amortized.
//!   Chosen over `governor`'s keyed limiter because that one fixes one quota
//!   per limiter (we need a quota per route), grows its keyed store until
//!   someone calls `retain_recent`, and only reports "remaining" through a
//!   middleware while not reporting the time until the bucket is full.
//! * [`RedisLimiter`] — one Lua script, Redis `TIME` as the clock every
//!   replica shares, so all replicas draw from one budget. Concurrent
//!   requests are batched naturally: a request's checks go straight out when
//!   no call is in flight, and otherwise wait for it to return, when all that
//!   queued meanwhile (up to [`MAX_BATCH`] requests) goes out as one EVALSHA.
//!   The script runs the groups in order, atomically, so each gets exactly
//!   what sequential checks would give it; what batching saves is the
//!   per-call cost on both ends (syscalls, task wake-ups, Redis's command
//!   dispatch), which was most of a Redis-backed check's CPU. A bucket that
//!   several requests of a batch spend from (a route's own, or one address's
//!   behind a NAT) goes in once and is read and written once: Redis's CPU
//!   per check is then mostly the script's loop (~3 µs against ~10 µs when
//!   every check reads and writes its key). At low load a batch holds one
//!   request and the latency is one round trip, as before. A bucket that
//!   several requests of a batch spend from, or that is called for again
//!   within 50 ms, is hot: the call also leases a block of its tokens to
//!   this replica (taken from the shared bucket at once, at most a
//!   sixteenth of its burst, spendable for 50 ms), and the requests that
//!   follow spend them without a round trip.
//! * [`FallbackLimiter`] — Redis first, bounded to ~50 ms; on an error or a
//!   timeout, the local limiter answers (per-replica budgets beat failing
//!   every request, or admitting all of them).

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use flashmesh_platform::{metrics::Metrics, redis::RedisHandle};
use hashbrown::HashTable;
use http::{HeaderName, HeaderValue, StatusCode, header};
use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionManager;
use tokio::sync::oneshot;

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
            "too many requests; slow down and retry after the time in Retry-After",
        );
        self.headers()
            .into_iter()
            .fold(problem, |problem, (name, value)| {
                problem.with_header(name, value)
            })
    }

    /// A refusal whose bucket is full again in `reset_after_us` and admits
    /// one more request in `retry_after_us`.
    fn denied(quota: Quota, reset_after_us: u64, retry_after_us: u64) -> Self {
        Self {
            allowed: false,
            limit: quota.burst(),
            remaining: 0,
            reset_after: Duration::from_micros(reset_after_us),
            retry_after: Some(Duration::from_micros(retry_after_us.max(1))),
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
        (
            None,
            Decision::denied(quota, tat - now_us, allow_at - now_us),
        )
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

/// One bucket to spend from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Check {
    pub key: String,
    pub quota: Quota,
}

/// The buckets one request spends from, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checks {
    first: Check,
    more: Vec<Check>,
}

impl Checks {
    pub fn new(key: String, quota: Quota) -> Self {
        Self {
            first: Check { key, quota },
            more: Vec::new(),
        }
    }

    /// `self`, then `key`'s bucket.
    #[must_use]
    pub fn then(mut self, key: String, quota: Quota) -> Self {
        self.more.push(Check { key, quota });
        self
    }

    /// A request's checks: per client IP; per user when signed in; and, on a
    /// route with a quota of its own, per caller (the user, else the IP) on
    /// that route.
    pub fn for_request(
        client: IpAddr,
        ip_quota: Quota,
        user: Option<(&str, Quota)>,
        route: Option<(&str, Quota)>,
    ) -> Self {
        let ip = format!("ip:{client}");
        let user = user.map(|(id, quota)| (format!("user:{id}"), quota));
        let route = route.map(|(rpc, quota)| {
            let who = user.as_ref().map_or(&ip, |(user, _)| user);
            (format!("route:{rpc}:{who}"), quota)
        });
        [user, route]
            .into_iter()
            .flatten()
            .fold(Self::new(ip, ip_quota), |checks, (key, quota)| {
                checks.then(key, quota)
            })
    }

    fn iter(&self) -> impl Iterator<Item = &Check> {
        std::iter::once(&self.first).chain(&self.more)
    }

    fn len(&self) -> usize {
        1 + self.more.len()
    }
}

/// Folds a group's decisions, taken in order, into the one the client is
/// told: the first refusal (nothing after it is taken from `more`, which may
/// spend lazily), or else the allowed decision with the fewest requests
/// remaining.
fn tightest(first: Decision, more: impl IntoIterator<Item = Decision>) -> Decision {
    let mut tightest = first;
    let mut more = more.into_iter();
    while tightest.allowed {
        let Some(decision) = more.next() else { break };
        if !decision.allowed || decision.remaining < tightest.remaining {
            tightest = decision;
        }
    }
    tightest
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Spends one request from each of `checks`' buckets in order, up to the
    /// first that has none left; answers the tightest decision.
    async fn check(&self, checks: &Checks) -> Decision;
}

/// The limiter the configuration asks for: Redis-backed, falling back to the
/// process when Redis fails, when `REDIS_URL` is set (its answers counted
/// in `metrics`); in process otherwise.
pub fn limiter(redis: Option<&RedisHandle>, metrics: &Metrics) -> Arc<dyn RateLimiter> {
    match redis {
        Some(redis) => {
            Arc::new(FallbackLimiter::new(RedisLimiter::new(redis)).counted(Answered::new(metrics)))
        }
        None => Arc::new(LocalLimiter::default()),
    }
}

/// Requests whose checks the shared limiter answered, by what answered
/// them: `flashmesh_rate_limit_checks_total{answered_by}`, `redis` (a round
/// trip), `lease` (tokens leased to this replica) or `fallback` (the
/// process's own buckets, Redis failing). Unregistered by default.
#[derive(Clone, Debug, Default)]
pub struct Answered {
    redis: Counter,
    lease: Counter,
    fallback: Counter,
}

impl Answered {
    pub fn new(metrics: &Metrics) -> Self {
        let family = metrics.counter_family::<1>(
            "flashmesh_rate_limit_checks",
            "Requests whose rate limits the Redis-backed limiter answered, by what answered them: redis (a round trip), lease (tokens leased to this replica), fallback (in-process buckets while Redis fails)",
        );
        // One statement each: the family's read guard lives to the end of
        // the statement, and creating the next label set needs its write lock.
        let by = |name: &str| {
            family
                .get_or_create(&[("answered_by", name.to_owned())])
                .clone()
        };
        let redis = by("redis");
        let lease = by("lease");
        let fallback = by("fallback");
        Self {
            redis,
            lease,
            fallback,
        }
    }
}

// ---------------------------------------------------------------------------
// In process

/// Lock shards: enough that concurrent requests rarely meet on one.
const SHARDS: usize = 64;

/// In-process GCRA: TATs in sharded hash tables keyed by a hash of
/// `(key, quota)`. The hash is SipHash under per-process random keys, so a
/// client cannot aim a collision at someone else's bucket; two buckets
/// sharing a 64-bit hash by chance (odds ~n²/2⁶⁵) would share a budget.
pub struct LocalLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    shard_capacity: usize,
    epoch: Instant,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl LocalLimiter {
    /// At most about `max_buckets` buckets (rounded up to a multiple of the
    /// shard count); beyond that the ones nearest to full are forgotten.
    pub fn new(max_buckets: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            shard_capacity: max_buckets.div_ceil(SHARDS).max(8),
            epoch: Instant::now(),
        }
    }

    /// [`RateLimiter::check`], without the future.
    pub fn check_now(&self, checks: &Checks) -> Decision {
        let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        tightest(
            self.spend(&checks.first, now_us),
            checks.more.iter().map(|check| self.spend(check, now_us)),
        )
    }

    fn spend(&self, check: &Check, now_us: u64) -> Decision {
        let hash = self.hasher.hash_one((&check.key, check.quota));
        // The low bits pick the table slot, the top seven its tag: the shard
        // comes from bits neither uses much.
        let shard = usize::try_from(hash >> 32).unwrap_or_default() % SHARDS;
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .spend(hash, now_us, check.quota, self.shard_capacity)
    }

    /// Buckets held (full ones not yet swept included).
    pub fn buckets(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .tats
                    .len()
            })
            .sum()
    }
}

#[async_trait]
impl RateLimiter for LocalLimiter {
    async fn check(&self, checks: &Checks) -> Decision {
        self.check_now(checks)
    }
}

/// One lock's buckets: `(hash, TAT in µs since the limiter's epoch)`.
#[derive(Default)]
struct Shard {
    tats: HashTable<(u64, u64)>,
}

impl Shard {
    fn spend(&mut self, hash: u64, now_us: u64, quota: Quota, capacity: usize) -> Decision {
        if let Some((_, tat)) = self.tats.find_mut(hash, |&(stored, _)| stored == hash) {
            let (new_tat, decision) = gcra(Some(*tat), now_us, quota);
            if let Some(new_tat) = new_tat {
                *tat = new_tat;
            }
            return decision;
        }
        let (new_tat, decision) = gcra(None, now_us, quota);
        if let Some(new_tat) = new_tat {
            if self.tats.len() >= capacity {
                self.make_room(now_us, capacity);
            }
            self.tats
                .insert_unique(hash, (hash, new_tat), |&(stored, _)| stored);
        }
        decision
    }

    /// Drops the buckets that are full again; if that leaves less than an
    /// eighth of `capacity` free, also the ones nearest to full (they lose
    /// the least by being forgotten), so the next sweep is that many
    /// insertions away.
    fn make_room(&mut self, now_us: u64, capacity: usize) {
        self.tats.retain(|&mut (_, tat)| tat > now_us);
        let keep = capacity - capacity / 8;
        if self.tats.len() > keep {
            let mut tats: Vec<u64> = self.tats.iter().map(|&(_, tat)| tat).collect();
            let excess = tats.len() - keep;
            let (_, &mut cutoff, _) = tats.select_nth_unstable(excess - 1);
            self.tats.retain(|&mut (_, tat)| tat > cutoff);
        }
    }
}

// ---------------------------------------------------------------------------
// Redis

#[derive(Debug, Clone, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate-limit store failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("rate-limit store answered {0} where the checks needed otherwise")]
    Reply(String),
    #[error("too many checks waiting for the rate-limit store")]
    Overloaded,
    #[error("the batch carrying this check was abandoned")]
    Abandoned,
}

/// A limiter whose buckets live elsewhere and whose calls can fail: the seam
/// [`FallbackLimiter`] wraps.
#[async_trait]
pub trait SharedLimiter: Send + Sync {
    /// The decision if it can be had without a call (from tokens leased
    /// earlier), spending them; `None` otherwise.
    fn try_leased(&self, _checks: &Checks) -> Option<Decision> {
        None
    }

    async fn try_check(&self, checks: &Checks) -> Result<Decision, RateLimitError>;
}

/// GCRA over a batch of check groups in one round trip. `KEYS` holds the
/// batch's distinct buckets once each; `ARGV` holds per bucket its emission
/// interval (µs), burst, the tokens this replica gives back (leased and not
/// spent) and the tokens it asks to lease, then per group its number of
/// checks and each check's bucket (1-based index into `KEYS`). One `TIME`
/// read is the clock of the whole batch. Refunds go back first; then each
/// group's checks are spent in order up to the first refusal; then each
/// bucket leases out up to what was asked of what is left. A bucket is read
/// once and written once per batch, however many checks spend from it (a
/// route's bucket, or many callers behind one address, is hot); its TAT is
/// kept in µs of Redis `TIME`, expiring when the bucket is full again.
/// Returns, flat: `{status, reset_after_us, retry_after_us}` per check in
/// order (status 1 allowed, 0 refused, 2 not taken after a refusal in its
/// group), then `{leased, reset_after_us}` per bucket.
const GCRA_BATCH_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval, burst, refund, want = {}, {}, {}, {}
for b = 1, #KEYS do
  interval[b] = tonumber(ARGV[4 * b - 3])
  burst[b] = tonumber(ARGV[4 * b - 2])
  refund[b] = tonumber(ARGV[4 * b - 1])
  want[b] = tonumber(ARGV[4 * b])
end
local tats, written = {}, {}
local function tat_of(b)
  local name = KEYS[b]
  local tat = tats[name]
  if tat == nil then
    tat = tonumber(redis.call('GET', name) or now)
  end
  if tat < now then tat = now end
  return tat
end
local function store(b, tat)
  local name = KEYS[b]
  if not written[name] then
    written[name] = true
    written[#written + 1] = name
  end
  tats[name] = tat
end
for b = 1, #KEYS do
  if refund[b] > 0 then
    store(b, math.max(tat_of(b) - refund[b] * interval[b], now))
  end
end
local out, n = {}, 0
local arg, args = 4 * #KEYS + 1, #ARGV
while arg <= args do
  local checks = tonumber(ARGV[arg])
  local refused = false
  for c = arg + 1, arg + checks do
    if refused then
      out[n + 1], out[n + 2], out[n + 3] = 2, 0, 0
    else
      local b = tonumber(ARGV[c])
      local tat = tat_of(b)
      local new_tat = tat + interval[b]
      local allow_at = new_tat - burst[b] * interval[b]
      if now < allow_at then
        tats[KEYS[b]] = tat
        out[n + 1], out[n + 2], out[n + 3] = 0, tat - now, allow_at - now
        refused = true
      else
        store(b, new_tat)
        out[n + 1], out[n + 2], out[n + 3] = 1, new_tat - now, 0
      end
    end
    n = n + 3
  end
  arg = arg + 1 + checks
end
for b = 1, #KEYS do
  local tat = tat_of(b)
  local leased = math.min(want[b], math.floor((now + burst[b] * interval[b] - tat) / interval[b]))
  if leased > 0 then
    tat = tat + leased * interval[b]
    store(b, tat)
  else
    leased = 0
  end
  out[n + 1], out[n + 2] = leased, tat - now
  n = n + 2
end
for i = 1, #written do
  local tat = tats[written[i]]
  if tat > now then
    redis.call('SET', written[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
  else
    redis.call('DEL', written[i])
  end
end
return out
";

/// The script's status for a check after a refusal in its group.
const NOT_TAKEN: i64 = 2;

/// The most requests one EVALSHA carries.
pub const MAX_BATCH: usize = 128;
/// Requests waiting for the next batch at most; beyond that a check fails
/// (and the fallback answers it).
const QUEUE_CAPACITY: usize = 32 * MAX_BATCH;

/// How long leased tokens may be spent here. Tokens are taken from the
/// shared bucket when leased, so admitting with them later shifts those
/// admissions by at most this much; unspent ones go back with this
/// replica's next call for the bucket.
pub const LEASE_TTL: Duration = Duration::from_millis(50);
/// A lease is at most this many tokens, and at most a sixteenth of the
/// burst: what other replicas can be refused early (while this one holds
/// tokens it has not spent) stays small, and a bucket of under 32 is never
/// leased, so a small quota (a login's) stays exact.
pub const MAX_LEASE: u32 = 1024;
const LEASE_SHARE_OF_BURST: u32 = 16;
/// Buckets holding a lease at most; beyond that no new bucket is leased
/// until expired leases are swept out.
const MAX_LEASED_BUCKETS: usize = 4096;

/// GCRA shared by every replica through Redis, concurrent requests batched
/// into one call, hot buckets' tokens leased in blocks.
///
/// No task of its own: the request that finds no call in flight sends the
/// batch itself (at low load, just its own checks: the same path and cost
/// as an unbatched call); requests arriving meanwhile queue, and when the
/// call returns its sender answers them and hands the right to send the
/// next batch to the first one still waiting. A batching task would cost
/// every request two more task wake-ups, which is what batching saves.
///
/// Even batched, every request waited for a round trip, and that wait (the
/// task parked, then woken; a timer armed) cost the gateway more CPU than
/// the script cost Redis. So a bucket that several requests of one batch
/// spend from, or that is called for again within [`LEASE_TTL`] (one
/// caller's back-to-back requests), is hot, and the call also leases a
/// block of its tokens to this replica: they leave the shared bucket at
/// once, and the requests that follow spend them here without waiting. A
/// lease down to half its block is renewed in the background, sized by
/// the demand since its grant; one that expires with tokens left gives
/// them back to the shared bucket and its block halves. What a lease
/// changes: another replica may be refused while this one holds tokens (at
/// most a lease each), and an answer from a lease reports
/// `RateLimit-Remaining` as of the emptiest answer lately recorded plus the
/// tokens still held (after a give-back it may say less than is left,
/// never more).
/// What it keeps: no replica admits a request the shared bucket did not
/// pay for.
pub struct RedisLimiter {
    batches: Arc<Batches>,
}

struct Batches {
    queue: Mutex<Queue>,
    leases: Mutex<Leases>,
    connection: ConnectionManager,
    script: redis::Script,
    /// The namespace of every bucket's key.
    prefix: String,
}

#[derive(Default)]
struct Queue {
    /// Whether a request holds the [`Leadership`].
    led: bool,
    waiting: VecDeque<Follower>,
}

/// A check sent to Redis, and the tokens an expired lease of its bucket
/// left, which go back to the bucket first.
#[derive(Debug, Clone)]
struct Ask {
    check: Check,
    refund: u32,
}

/// A request's checks on their way to Redis: those whose buckets hold a
/// live lease are spent from it here, the rest are sent.
#[derive(Debug)]
struct Plan {
    sent: Vec<Ask>,
    /// Per check, in order: its decision when spent from a lease.
    leased: Vec<Option<Decision>>,
}

/// A request waiting for the next batch.
struct Follower {
    asks: Vec<Ask>,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    /// The group's raw answer.
    Group(Result<Vec<i64>, RateLimitError>),
    /// Send the next batch, starting with these, your own checks.
    Lead(Leadership, Vec<Ask>),
}

/// What a request joining the batches does.
enum Turn {
    Lead(Leadership, Vec<Ask>),
    Wait(oneshot::Receiver<Answer>),
}

/// The right, and the duty, to send the next batch. Dropping it (done, or
/// cancelled by the caller's timeout, or never received) passes it on to the
/// first request still waiting, so the queue never stalls.
struct Leadership {
    batches: Arc<Batches>,
    /// False once passed on.
    held: bool,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if self.held {
            self.batches.hand_over();
        }
    }
}

impl RedisLimiter {
    pub fn new(redis: &RedisHandle) -> Self {
        Self {
            batches: Arc::new(Batches {
                queue: Mutex::default(),
                leases: Mutex::default(),
                connection: redis.connection(),
                script: redis::Script::new(GCRA_BATCH_SCRIPT),
                prefix: redis.key("gateway:rl:"),
            }),
        }
    }

    /// Checks answered from leased tokens, without a round trip.
    pub fn leased_checks(&self) -> u64 {
        self.batches.leases().spent
    }

    /// Renews `due` leases in the background: the request that found one
    /// low does not wait for it.
    fn renew_in_background(&self, due: Vec<Check>) {
        for check in due {
            let batches = self.batches.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(async move { batches.renew(check).await })),
                Err(_) => batches.leases().renewal_failed(&check),
            }
        }
    }

    /// The raw answer for `asks`, one group of the next batch.
    async fn call(&self, asks: Vec<Ask>) -> Result<Vec<i64>, RateLimitError> {
        let (leadership, asks) = match self.batches.join(asks)? {
            Turn::Lead(leadership, asks) => (leadership, asks),
            Turn::Wait(answered) => match answered.await {
                Ok(Answer::Group(group)) => return group,
                Ok(Answer::Lead(leadership, asks)) => (leadership, asks),
                Err(_) => return Err(RateLimitError::Abandoned),
            },
        };
        let group = self.batches.send(&asks).await;
        // The next batch goes out before this one's answer is read.
        drop(leadership);
        group
    }
}

/// Tokens of hot buckets leased to this replica.
#[derive(Default)]
struct Leases {
    buckets: HashMap<Check, Lease>,
    /// Checks spent from a lease.
    spent: u64,
    /// Leases down to half their block, to be renewed.
    due: Vec<Check>,
    /// When expired leases were last swept out for room.
    swept: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    /// Leased, not yet spent.
    tokens: u32,
    /// Until when they may be spent here.
    expires: Instant,
    /// The block the latest grant asked for.
    size: u32,
    /// Tokens spent since the latest grant: the demand a renewal is sized by.
    spent: u32,
    /// The shared bucket as the newest answer left it: requests it could
    /// still admit, and when it is full again.
    shared_remaining: u32,
    full_at: Instant,
    /// A renewal is on its way.
    renewing: bool,
}

impl Lease {
    fn live(&self, now: Instant) -> bool {
        self.tokens > 0 && now < self.expires
    }
}

/// The largest block `quota`'s bucket is leased in; under 2, none.
fn lease_cap(quota: Quota) -> u32 {
    (quota.burst() / LEASE_SHARE_OF_BURST).min(MAX_LEASE)
}

impl Leases {
    /// The request's decision if every one of its buckets holds a live
    /// lease, each then one token poorer; `None` (nothing spent) otherwise.
    fn spend(&mut self, checks: &Checks, now: Instant) -> Option<Decision> {
        let mut decisions = Vec::with_capacity(checks.len());
        for check in checks.iter() {
            let Some(decision) = self.spend_one(check, now) else {
                // The request goes to Redis: undo what it spent.
                self.give_back(checks.iter().take(decisions.len()));
                return None;
            };
            decisions.push(decision);
        }
        let mut decisions = decisions.into_iter();
        let first = decisions.next()?;
        Some(tightest(first, decisions))
    }

    /// A token of `check`'s lease, if it holds a live one. A lease down to
    /// half its block becomes due for renewal, so that demand meets a
    /// fresh block rather than a round trip.
    fn spend_one(&mut self, check: &Check, now: Instant) -> Option<Decision> {
        let lease = self
            .buckets
            .get_mut(check)
            .filter(|lease| lease.live(now))?;
        lease.tokens -= 1;
        lease.spent += 1;
        self.spent += 1;
        if !lease.renewing && lease.size >= 4 && lease.tokens <= lease.size / 2 {
            lease.renewing = true;
            self.due.push(check.clone());
        }
        Some(leased(check.quota, lease, now))
    }

    /// Which of the request's checks are spent from a lease here and which
    /// go to Redis (with what an expired lease of theirs gives back).
    fn plan(&mut self, checks: &Checks, now: Instant) -> Plan {
        let mut plan = Plan {
            sent: Vec::with_capacity(checks.len()),
            leased: Vec::with_capacity(checks.len()),
        };
        for check in checks.iter() {
            let mut refund = 0;
            let from_lease = self.spend_one(check, now);
            if let Some(lease) = self.buckets.get_mut(check)
                && now >= lease.expires
                && lease.tokens > 0
            {
                refund = std::mem::take(&mut lease.tokens);
                lease.size /= 2;
            }
            if from_lease.is_none() {
                plan.sent.push(Ask {
                    check: check.clone(),
                    refund,
                });
            }
            plan.leased.push(from_lease);
        }
        plan
    }

    /// Puts back a token taken from each of `checks`' leases for a request
    /// that did not get to spend it.
    fn give_back<'a>(&mut self, checks: impl IntoIterator<Item = &'a Check>) {
        for check in checks {
            if let Some(lease) = self.buckets.get_mut(check) {
                lease.tokens += 1;
                lease.spent = lease.spent.saturating_sub(1);
                self.spent -= 1;
            }
        }
    }

    /// The block to lease for a bucket `checks` checks of this batch spend
    /// from: none while its lease holds tokens (an expired one's go back
    /// first) or is being renewed; twice the last one if the bucket was
    /// called for again within [`LEASE_TTL`] (demand emptied its lease, or
    /// it was seen once before: a caller's sequential requests); the last
    /// one (halved if it expired unspent) after that; and for a bucket not
    /// seen lately, as many as this batch brought. Never more than the cap,
    /// and none under two.
    fn want(&mut self, check: &Check, checks: u32, now: Instant) -> u32 {
        let cap = lease_cap(check.quota);
        if cap < 2 {
            return 0;
        }
        let seen = self.buckets.get(check).map(|lease| {
            (
                lease.tokens > 0 || lease.renewing,
                lease.expires,
                lease.size,
            )
        });
        let block = match seen {
            Some((true, ..)) => 0,
            Some((_, expires, size)) if now < expires => size.saturating_mul(2).max(checks),
            Some((.., size)) => size.max(checks),
            None if checks >= 2 && self.room(now) => checks,
            None => 0,
        };
        let block = block.min(cap);
        // A block of one saves nothing.
        if block < 2 { 0 } else { block }
    }

    /// The block a due lease is renewed with: what it would spend in half
    /// the TTL at the rate it has been spent since its latest grant, so
    /// that blocks are renewed before they expire and rarely expire with
    /// tokens left. None (and no renewal) under two, or if the lease
    /// expired or went meanwhile.
    fn renewal(&mut self, check: &Check, now: Instant) -> u32 {
        let Some(lease) = self.buckets.get_mut(check) else {
            return 0;
        };
        let granted_at = lease.expires.checked_sub(LEASE_TTL).unwrap_or(now);
        let elapsed = now
            .saturating_duration_since(granted_at)
            .as_micros()
            .max(1_000);
        let demand = u128::from(lease.spent) * (LEASE_TTL / 2).as_micros() / elapsed;
        let block = u32::try_from(demand)
            .unwrap_or(u32::MAX)
            .min(lease_cap(check.quota));
        if now >= lease.expires || block < 2 {
            lease.renewing = false;
            return 0;
        }
        block
    }

    /// A renewal that got no answer: the next call for the bucket asks.
    fn renewal_failed(&mut self, check: &Check) {
        if let Some(lease) = self.buckets.get_mut(check) {
            lease.renewing = false;
        }
    }

    /// Whether another bucket may be tracked: expired leases are swept out
    /// (their unspent tokens refill at the bucket's rate) when the table is
    /// full, at most once per [`LEASE_TTL`].
    fn room(&mut self, now: Instant) -> bool {
        if self.buckets.len() >= MAX_LEASED_BUCKETS
            && self
                .swept
                .is_none_or(|swept| now.duration_since(swept) >= LEASE_TTL)
        {
            self.swept = Some(now);
            self.buckets.retain(|_, lease| now < lease.expires);
        }
        self.buckets.len() < MAX_LEASED_BUCKETS
    }

    /// Records a batch's answer for a bucket: `granted` more tokens (asked
    /// for `asked`), and the shared bucket full again in `reset_after_us`.
    /// A bucket that could be leased is remembered for [`LEASE_TTL`] even
    /// with nothing granted, so that a second call for it within that time
    /// asks for a block.
    fn record(
        &mut self,
        check: &Check,
        asked: u32,
        granted: u32,
        reset_after_us: u64,
        now: Instant,
    ) {
        if lease_cap(check.quota) < 2 {
            return;
        }
        let full_at = now + Duration::from_micros(reset_after_us);
        let shared_remaining = allowed(check.quota, reset_after_us).remaining;
        if let Some(lease) = self.buckets.get_mut(check) {
            // A batch's answer and a renewal's may be recorded in either
            // order. Between two answers the shared bucket only empties,
            // unless tokens went back to it, so the one that has it full
            // later is the newer: an older one would report tokens that a
            // renewal already took out, on top of the tokens held here.
            if full_at >= lease.full_at {
                lease.shared_remaining = shared_remaining;
                lease.full_at = full_at;
            }
            if asked > 0 {
                lease.size = asked;
                lease.spent = 0;
                lease.tokens += granted;
                lease.expires = now + LEASE_TTL;
                lease.renewing = false;
            } else if lease.tokens == 0 && !lease.renewing {
                lease.size = 1;
                lease.expires = now + LEASE_TTL;
            }
        } else if self.room(now) {
            self.buckets.insert(
                check.clone(),
                Lease {
                    tokens: granted,
                    expires: now + LEASE_TTL,
                    size: asked.max(1),
                    spent: 0,
                    shared_remaining,
                    full_at,
                    renewing: false,
                },
            );
        }
    }
}

/// The decision for a check spent from `lease`.
fn leased(quota: Quota, lease: &Lease, now: Instant) -> Decision {
    Decision {
        allowed: true,
        limit: quota.burst(),
        remaining: lease
            .shared_remaining
            .saturating_add(lease.tokens)
            .min(quota.burst()),
        reset_after: lease.full_at.saturating_duration_since(now),
        retry_after: None,
    }
}

impl Batches {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `asks` lead the next batch if no request does; otherwise they wait
    /// for an answer, or for the lead.
    fn join(self: &Arc<Self>, asks: Vec<Ask>) -> Result<Turn, RateLimitError> {
        let mut queue = self.queue();
        if !queue.led {
            queue.led = true;
            let leadership = Leadership {
                batches: self.clone(),
                held: true,
            };
            return Ok(Turn::Lead(leadership, asks));
        }
        if queue.waiting.len() >= QUEUE_CAPACITY {
            return Err(RateLimitError::Overloaded);
        }
        let (answer, answered) = oneshot::channel();
        queue.waiting.push_back(Follower { asks, answer });
        Ok(Turn::Wait(answered))
    }

    /// The lead to the first request still waiting, or to whoever comes
    /// next if none is.
    fn hand_over(self: &Arc<Self>) {
        loop {
            let next = {
                let mut queue = self.queue();
                let next = queue.waiting.pop_front();
                queue.led = next.is_some();
                next
            };
            let Some(next) = next else {
                return;
            };
            let leadership = Leadership {
                batches: self.clone(),
                held: true,
            };
            match next.answer.send(Answer::Lead(leadership, next.asks)) {
                Ok(()) => return,
                // Gone (its caller stopped waiting): on to the next one,
                // without the refused lead handing over again on drop.
                Err(refused) => {
                    if let Answer::Lead(mut refused, _) = refused {
                        refused.held = false;
                    }
                }
            }
        }
    }

    /// Sends `own` and up to a batch of waiting requests' checks as one
    /// call; answers the followers, returns `own`'s group.
    async fn send(&self, own: &[Ask]) -> Result<Vec<i64>, RateLimitError> {
        let followers: Vec<Follower> = {
            let mut queue = self.queue();
            let n = queue.waiting.len().min(MAX_BATCH - 1);
            queue.waiting.drain(..n).collect()
        };
        // A caller that stopped waiting (the fallback answered it) must not
        // spend from the shared buckets as well.
        let followers: Vec<Follower> = followers
            .into_iter()
            .filter(|follower| !follower.answer.is_closed())
            .collect();
        let groups: Vec<&[Ask]> = std::iter::once(own)
            .chain(followers.iter().map(|f| &f.asks[..]))
            .collect();
        let answer = self.invoke(&groups).await;
        let mut groups: Vec<Result<Vec<i64>, RateLimitError>> = match answer {
            Ok(flat) => {
                let mut flat = flat.into_iter();
                groups
                    .iter()
                    .map(|group| Ok(flat.by_ref().take(3 * group.len()).collect()))
                    .collect()
            }
            Err(error) => vec![Err(error); groups.len()],
        };
        let others = groups.split_off(1);
        for (follower, group) in followers.into_iter().zip(others) {
            // Nobody listens any more if the caller timed out meanwhile.
            let _ = follower.answer.send(Answer::Group(group));
        }
        groups
            .pop()
            .unwrap_or_else(|| Err(RateLimitError::Reply("no groups".to_owned())))
    }

    /// One EVALSHA for `groups`: each distinct bucket goes once, in `KEYS`,
    /// with what this replica gives back and asks to lease; checks name it
    /// by index. Answers three numbers per check; the leases it records.
    async fn invoke(&self, groups: &[&[Ask]]) -> Result<Vec<i64>, RateLimitError> {
        let checks: usize = groups.iter().map(|group| group.len()).sum();
        // Per distinct bucket: its checks in this batch, and its refunds.
        let mut index: HashMap<&Check, usize> = HashMap::with_capacity(checks);
        let mut buckets: Vec<(&Check, u32, u32)> = Vec::with_capacity(checks);
        for ask in groups.iter().flat_map(|group| group.iter()) {
            let b = *index.entry(&ask.check).or_insert_with(|| {
                buckets.push((&ask.check, 0, 0));
                buckets.len() - 1
            });
            buckets[b].1 += 1;
            buckets[b].2 += ask.refund;
        }
        let asked: Vec<u32> = {
            let mut leases = self.leases();
            let now = Instant::now();
            buckets
                .iter()
                .map(|&(check, count, _)| leases.want(check, count, now))
                .collect()
        };
        let mut invocation = self.script.prepare_invoke();
        for (&(check, _, refund), &want) in buckets.iter().zip(&asked) {
            self.bucket(&mut invocation, check, refund, want);
        }
        for group in groups {
            invocation.arg(group.len());
            for ask in *group {
                invocation.arg(index[&ask.check] + 1);
            }
        }
        let mut flat: Vec<i64> = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        if flat.len() != 3 * checks + 2 * buckets.len() {
            return Err(RateLimitError::Reply(format!(
                "{} numbers for {checks} checks on {} buckets",
                flat.len(),
                buckets.len()
            )));
        }
        let trailer = flat.split_off(3 * checks);
        let mut leases = self.leases();
        let now = Instant::now();
        for ((&(check, ..), &want), pair) in buckets.iter().zip(&asked).zip(trailer.chunks(2)) {
            let (granted, reset_after_us) = lease_answer(pair, want)?;
            leases.record(check, want, granted, reset_after_us, now);
        }
        Ok(flat)
    }

    /// `check`'s bucket into `invocation`: its key, and in `ARGV` its
    /// quota, what goes back to it and the block asked of it.
    fn bucket(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        check: &Check,
        refund: u32,
        want: u32,
    ) {
        invocation
            .key(format!("{}{}", self.prefix, check.key))
            .arg(check.quota.interval_us())
            .arg(check.quota.burst())
            .arg(refund)
            .arg(want);
    }

    /// Leases `check`'s bucket a fresh block: the script with the bucket
    /// and no checks, bounded like a check's call.
    async fn renew(&self, check: Check) {
        let want = self.leases().renewal(&check, Instant::now());
        if want == 0 {
            return;
        }
        let mut invocation = self.script.prepare_invoke();
        self.bucket(&mut invocation, &check, 0, want);
        let mut connection = self.connection.clone();
        let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
        let answer = match tokio::time::timeout(PRIMARY_TIMEOUT, call).await {
            Ok(Ok(pair)) => lease_answer(&pair, want),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(RateLimitError::Timeout(PRIMARY_TIMEOUT)),
        };
        let mut leases = self.leases();
        match answer {
            Ok((granted, reset_after_us)) => {
                leases.record(&check, want, granted, reset_after_us, Instant::now());
            }
            Err(_) => leases.renewal_failed(&check),
        }
    }
}

/// The `{leased, reset_after_us}` pair the script answers for a bucket
/// asked for a block of `want`.
fn lease_answer(pair: &[i64], want: u32) -> Result<(u32, u64), RateLimitError> {
    match *pair {
        [granted, reset_after_us] => {
            match (u32::try_from(granted), u64::try_from(reset_after_us)) {
                (Ok(granted), Ok(reset_after_us)) if granted <= want => {
                    Ok((granted, reset_after_us))
                }
                _ => Err(RateLimitError::Reply(format!("lease {pair:?} of {want}"))),
            }
        }
        _ => Err(RateLimitError::Reply(format!("lease {pair:?}"))),
    }
}

/// A request's decisions, in order up to its first refusal (what it
/// took): from its leases where `leased` has them, else from the group's
/// `{status, reset_after_us, retry_after_us}` triples, one per check sent,
/// checked against what the script may answer.
fn decode(
    checks: &Checks,
    leased: &[Option<Decision>],
    group: &[i64],
) -> Result<Vec<Decision>, RateLimitError> {
    let malformed = || RateLimitError::Reply(format!("{group:?}"));
    let (triples, rest) = group.as_chunks::<3>();
    let sent = leased.iter().filter(|decision| decision.is_none()).count();
    if !rest.is_empty() || triples.len() != sent || leased.len() != checks.len() {
        return Err(malformed());
    }
    let micros = |value: i64| u64::try_from(value).map_err(|_| malformed());
    let mut decisions = Vec::with_capacity(checks.len());
    let mut triples = triples.iter();
    for (check, leased) in checks.iter().zip(leased) {
        let decision = match leased {
            Some(decision) => decision.clone(),
            None => match *triples.next().ok_or_else(malformed)? {
                [1, reset_after_us, _] => allowed(check.quota, micros(reset_after_us)?),
                [0, reset_after_us, retry_after_us] => Decision::denied(
                    check.quota,
                    micros(reset_after_us)?,
                    micros(retry_after_us)?,
                ),
                _ => return Err(malformed()),
            },
        };
        let refused = !decision.allowed;
        decisions.push(decision);
        if refused {
            break;
        }
    }
    // Whatever was sent after a refusal was not taken.
    if triples.any(|&[status, ..]| status != NOT_TAKEN) {
        return Err(malformed());
    }
    Ok(decisions)
}

#[async_trait]
impl SharedLimiter for RedisLimiter {
    fn try_leased(&self, checks: &Checks) -> Option<Decision> {
        let (decision, due) = {
            let mut leases = self.batches.leases();
            let decision = leases.spend(checks, Instant::now());
            (decision, std::mem::take(&mut leases.due))
        };
        self.renew_in_background(due);
        decision
    }

    async fn try_check(&self, checks: &Checks) -> Result<Decision, RateLimitError> {
        let (Plan { sent, leased }, due) = {
            let mut leases = self.batches.leases();
            let plan = leases.plan(checks, Instant::now());
            (plan, std::mem::take(&mut leases.due))
        };
        self.renew_in_background(due);
        let group = if sent.is_empty() {
            Ok(Vec::new())
        } else {
            self.call(sent).await
        };
        let decisions = group.and_then(|group| decode(checks, &leased, &group));
        // Leased tokens after a refusal (or all, on a failure) were not
        // spent after all.
        let taken = decisions.as_ref().map_or(0, Vec::len);
        let unspent = checks
            .iter()
            .zip(&leased)
            .skip(taken)
            .filter_map(|(check, leased)| leased.as_ref().map(|_| check));
        self.batches.leases().give_back(unspent);
        let mut decisions = decisions?.into_iter();
        let first = decisions
            .next()
            .ok_or_else(|| RateLimitError::Reply("no decision".to_owned()))?;
        Ok(tightest(first, decisions))
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
    answered: Answered,
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
            answered: Answered::default(),
            last_warning: Mutex::new(None),
        }
    }

    /// `self`, counting its answers in `answered`.
    #[must_use]
    pub fn counted(mut self, answered: Answered) -> Self {
        self.answered = answered;
        self
    }

    /// Requests (check groups) the local limiter answered because the
    /// primary failed, timed out, or was being left alone after a failure.
    pub fn degraded_checks(&self) -> u64 {
        self.answered.fallback.get()
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
    async fn check(&self, checks: &Checks) -> Decision {
        if let Some(decision) = self.primary.try_leased(checks) {
            self.answered.lease.inc();
            return decision;
        }
        if self.now_us() >= self.skip_primary_until_us.load(Ordering::Relaxed) {
            let answer = tokio::time::timeout(self.timeout, self.primary.try_check(checks))
                .await
                .unwrap_or(Err(RateLimitError::Timeout(self.timeout)));
            match answer {
                Ok(decision) => {
                    self.answered.redis.inc();
                    return decision;
                }
                Err(error) => {
                    self.answered.fallback.inc();
                    self.primary_failed(&error);
                }
            }
        } else {
            self.answered.fallback.inc();
        }
        self.fallback.check_now(checks)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU8};

    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    const SECOND: u64 = MICROS_PER_SECOND;

    fn one(key: &str, quota: Quota) -> Checks {
        Checks::new(key.to_owned(), quota)
    }

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
            assert!(limiter.check(&one("ip:1", quota)).await.allowed);
        }
        let denied = limiter.check(&one("ip:1", quota)).await;
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
        let retry_after = denied.retry_after.expect("retry_after when denied");
        assert!(
            retry_after > Duration::ZERO && retry_after <= Duration::from_millis(50),
            "{retry_after:?}"
        );
        assert!(denied.reset_after <= Duration::from_millis(250));

        // Another key, and the same key under another quota, are untouched.
        assert_eq!(limiter.check(&one("ip:2", quota)).await.remaining, 4);
        assert!(limiter.check(&one("ip:1", Quota::new(20, 6))).await.allowed);

        tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        assert!(limiter.check(&one("ip:1", quota)).await.allowed);
        assert!(!limiter.check(&one("ip:1", quota)).await.allowed);
    }

    #[tokio::test]
    async fn local_concurrent_checks_spend_one_budget() {
        let limiter = Arc::new(LocalLimiter::default());
        let quota = Quota::new(1, 10);
        let checks = (0..40).map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.check(&one("user:7", quota)).await.allowed })
        });
        let mut allowed = 0;
        for check in checks {
            allowed += usize::from(check.await.expect("task"));
        }
        assert_eq!(allowed, 10);
    }

    #[tokio::test]
    async fn limiter_without_redis_is_local() {
        let limiter = limiter(None, &Metrics::default());
        let quota = Quota::new(1, 1);
        assert!(limiter.check(&one("k", quota)).await.allowed);
        assert!(!limiter.check(&one("k", quota)).await.allowed);
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
        let limiter = RedisLimiter::new(&redis);
        let quota = Quota::new(10, 3);
        for remaining in [2, 1, 0] {
            let decision = limiter.try_check(&one("ip:1", quota)).await.expect("check");
            assert!(decision.allowed);
            assert_eq!(decision.remaining, remaining);
            assert_eq!(decision.limit, 3);
        }
        let denied = limiter.try_check(&one("ip:1", quota)).await.expect("check");
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
                .try_check(&one("ip:1", quota))
                .await
                .expect("check")
                .allowed
        );
        assert!(
            !limiter
                .try_check(&one("ip:1", quota))
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
        let redis = connect(&url, &prefix).await;
        let replica_a = Arc::new(RedisLimiter::new(&redis));
        let replica_b = Arc::new(RedisLimiter::new(&connect(&url, &prefix).await));
        let quota = Quota::new(1, 10);
        let checks = (0..20).map(|i| {
            let limiter = if i % 2 == 0 {
                replica_a.clone()
            } else {
                replica_b.clone()
            };
            tokio::spawn(async move { limiter.try_check(&one("user:42", quota)).await })
        });
        let mut allowed = 0;
        for check in checks {
            let decision = check.await.expect("task").expect("Redis answers");
            allowed += usize::from(decision.allowed);
        }
        assert_eq!(allowed, 10);
        clean_up(&redis).await;
    }

    #[tokio::test]
    async fn limiter_with_redis_uses_redis() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let fallback = FallbackLimiter::with_timeouts(
            RedisLimiter::new(&redis),
            Duration::from_secs(1),
            PRIMARY_RETRY_INTERVAL,
        );
        let quota = Quota::new(1, 2);
        assert!(fallback.check(&one("k", quota)).await.allowed);
        // A second replica sees the spend.
        let other = limiter(Some(&redis), &Metrics::default());
        assert!(other.check(&one("k", quota)).await.allowed);
        assert!(!fallback.check(&one("k", quota)).await.allowed);
        assert_eq!(fallback.degraded_checks(), 0);
        clean_up(&redis).await;
    }

    const FORWARD: u8 = 0;
    const BLACKHOLE: u8 = 1;
    const SEVER: u8 = 2;

    /// A TCP proxy to Redis that can be told to fail it: to swallow traffic
    /// (connections stay open and nothing answers, the worst way Redis can
    /// fail), or to sever it (connections close, new ones are refused).
    struct FaultyProxy {
        address: std::net::SocketAddr,
        state: Arc<AtomicU8>,
    }

    impl FaultyProxy {
        async fn start(upstream: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("address");
            let state = Arc::new(AtomicU8::new(FORWARD));
            let shared = state.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if shared.load(Ordering::SeqCst) == SEVER {
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, shared.clone()));
                    tokio::spawn(pump(server_read, client_write, shared.clone()));
                }
            });
            Self { address, state }
        }

        fn blackhole(&self) {
            self.state.store(BLACKHOLE, Ordering::SeqCst);
        }

        fn sever(&self) {
            self.state.store(SEVER, Ordering::SeqCst);
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        state: Arc<AtomicU8>,
    ) {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            match state.load(Ordering::SeqCst) {
                FORWARD if to.write_all(&buffer[..n]).await.is_ok() => {}
                BLACKHOLE => {}
                // Dropping both halves closes the connection both ways.
                _ => return,
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

    /// Redis reached directly, and through a [`FaultyProxy`] (the handle
    /// that goes through it), under one fresh key prefix.
    async fn redis_behind_proxy() -> (RedisHandle, FaultyProxy, RedisHandle) {
        let prefix = unique_prefix();
        let url = redis_url();
        let direct = connect(&url, &prefix).await;
        let (_, upstream) = through(&url, "127.0.0.1:1".parse().expect("address"));
        let proxy = FaultyProxy::start(upstream).await;
        let (proxied_url, _) = through(&url, proxy.address);
        let proxied = connect(&proxied_url, &prefix).await;
        (direct, proxy, proxied)
    }

    #[tokio::test]
    async fn hung_redis_falls_back_to_local_buckets() {
        let (direct, proxy, redis) = redis_behind_proxy().await;
        let limiter = FallbackLimiter::new(RedisLimiter::new(&redis));
        let quota = Quota::new(1, 2);

        // Healthy: Redis decides (the bucket is visible in Redis).
        assert!(limiter.check(&one("ip:9", quota)).await.allowed);
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
        let first = limiter.check(&one("ip:9", quota)).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(first.allowed);
        assert_eq!(first.remaining, 1, "a fresh local bucket");
        assert!(limiter.check(&one("ip:9", quota)).await.allowed);
        assert!(!limiter.check(&one("ip:9", quota)).await.allowed);
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
        async fn try_check(&self, checks: &Checks) -> Result<Decision, RateLimitError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                Ok(allowed(checks.first.quota, 0))
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
        assert!(limiter.check(&one("k", quota)).await.allowed);
        assert!(
            !limiter.check(&one("k", quota)).await.allowed,
            "local bucket spent"
        );
        assert_eq!(limiter.degraded_checks(), 2);
        // The second check did not wait on the failed primary.
        assert_eq!(limiter.primary.calls.load(Ordering::SeqCst), 1);

        limiter.primary.up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            limiter.check(&one("k", quota)).await.allowed,
            "primary again"
        );
        assert_eq!(limiter.degraded_checks(), 2);
        assert_eq!(limiter.primary.calls.load(Ordering::SeqCst), 2);
    }

    // -- check groups ------------------------------------------------------

    #[test]
    fn a_request_spends_ip_then_user_then_route() {
        let ip: IpAddr = "203.0.113.7".parse().expect("address");
        let (q1, q2, q3) = (Quota::new(1, 1), Quota::new(2, 2), Quota::new(3, 3));
        let keys = |checks: &Checks| {
            checks
                .iter()
                .map(|check| (check.key.clone(), check.quota))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&Checks::for_request(ip, q1, None, None)),
            [("ip:203.0.113.7".to_owned(), q1)]
        );
        assert_eq!(
            keys(&Checks::for_request(ip, q1, None, Some(("svc/Rpc", q3)))),
            [
                ("ip:203.0.113.7".to_owned(), q1),
                ("route:svc/Rpc:ip:203.0.113.7".to_owned(), q3)
            ]
        );
        assert_eq!(
            keys(&Checks::for_request(
                ip,
                q1,
                Some(("u1", q2)),
                Some(("svc/Rpc", q3))
            )),
            [
                ("ip:203.0.113.7".to_owned(), q1),
                ("user:u1".to_owned(), q2),
                ("route:svc/Rpc:user:u1".to_owned(), q3)
            ]
        );
    }

    #[test]
    fn the_tightest_decision_is_the_refusal_or_the_fewest_remaining() {
        let quota = Quota::new(1, 10);
        let with_remaining = |remaining: u64| allowed(quota, (10 - remaining) * SECOND);
        let refusal = Decision::denied(quota, 10 * SECOND, SECOND);

        let answer = tightest(with_remaining(5), [with_remaining(2), with_remaining(7)]);
        assert_eq!(answer.remaining, 2);

        // Nothing after the first refusal is taken: `more` is not pulled.
        let mut taken = 0;
        let more = [with_remaining(9), refusal.clone(), with_remaining(0)]
            .into_iter()
            .inspect(|_| taken += 1);
        assert_eq!(tightest(with_remaining(3), more), refusal);
        assert_eq!(taken, 2);
        let never = std::iter::from_fn(|| -> Option<Decision> { panic!("pulled") });
        assert_eq!(tightest(refusal.clone(), never), refusal);
    }

    /// Three buckets where only the middle one runs out, spent `requests`
    /// times at once; `refills` bounds what the 1/s rate may add while the
    /// requests ran, and `unspent` what may be left unspent in a lease when
    /// they end (none in process).
    async fn race_on_one_user(
        limiter: Arc<dyn RateLimiter>,
        requests: u32,
        burst: u32,
        unspent: u32,
    ) {
        let roomy = Quota::new(1, 2 * requests);
        let tight = Quota::new(1, burst);
        let group = one("ip:race", roomy)
            .then("user:race".to_owned(), tight)
            .then("route:race".to_owned(), roomy);
        let started = Instant::now();
        let checks: Vec<_> = (0..requests)
            .map(|_| {
                let limiter = limiter.clone();
                let group = group.clone();
                tokio::spawn(async move { limiter.check(&group).await })
            })
            .collect();
        let mut admitted = 0;
        for check in checks {
            let decision = check.await.expect("task");
            if decision.allowed {
                admitted += 1;
            } else {
                assert_eq!(decision.limit, burst, "the user's bucket refuses");
            }
        }
        let ip_left = limiter.check(&one("ip:race", roomy)).await.remaining;
        let route_left = limiter.check(&one("route:race", roomy)).await.remaining;
        let refills = u32::try_from(started.elapsed().as_secs()).expect("seconds");
        let within = |actual: u32, expected: u32| (expected..=expected + refills).contains(&actual);
        assert!(
            (burst - unspent..=burst + refills).contains(&admitted),
            "{admitted} of {requests} admitted"
        );
        // Every request spent from the IP's bucket, only the admitted ones
        // (and each probe) from the route's.
        assert!(within(ip_left, requests - 1), "{ip_left} left for the IP");
        assert!(
            within(route_left, 2 * requests - admitted - 1),
            "{route_left} left on the route"
        );
    }

    /// A user with one request left: the IP's bucket is spent by both
    /// requests, the route's only by the one the user's admitted.
    async fn later_refusal_stops_the_group(limiter: &dyn RateLimiter) {
        let (ip, user, route) = (Quota::new(1, 100), Quota::new(1, 1), Quota::new(1, 5));
        let group = one("ip:mixed", ip)
            .then("user:mixed".to_owned(), user)
            .then("route:mixed".to_owned(), route);
        let first = limiter.check(&group).await;
        assert!(first.allowed);
        assert_eq!(
            (first.limit, first.remaining),
            (1, 0),
            "the user's is tightest"
        );
        let second = limiter.check(&group).await;
        assert!(!second.allowed);
        assert_eq!(second.limit, 1);
        assert!(second.retry_after.is_some());
        assert_eq!(limiter.check(&one("ip:mixed", ip)).await.remaining, 97);
        assert_eq!(limiter.check(&one("route:mixed", route)).await.remaining, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_races_admit_exactly_the_burst() {
        race_on_one_user(Arc::new(LocalLimiter::default()), 4_000, 1_000, 0).await;
    }

    #[tokio::test]
    async fn local_later_refusal_stops_the_group() {
        later_refusal_stops_the_group(&LocalLimiter::default()).await;
    }

    #[test]
    fn local_buckets_stay_bounded() {
        let limiter = LocalLimiter::new(0);
        let cap = SHARDS * limiter.shard_capacity;
        let slow = Quota::new(1, 10);
        for n in 0..20 * cap {
            assert!(limiter.check_now(&one(&format!("ip:{n}"), slow)).allowed);
        }
        assert!(limiter.buckets() <= cap, "{} > {cap}", limiter.buckets());
    }

    #[test]
    fn full_shards_drop_full_buckets_then_the_nearest_to_full() {
        let quota = Quota::new(1, 10);
        let capacity = 8;
        let mut shard = Shard::default();
        // Bucket n spent at n µs: TAT 1 s + n µs.
        for hash in 0..8 {
            shard.spend(hash, hash, quota, capacity);
        }
        shard.spend(8, 8, quota, capacity);
        assert_eq!(shard.tats.len(), 8, "the earliest one forgotten");
        assert!(shard.tats.find(0, |&(stored, _)| stored == 0).is_none());
        assert!(shard.tats.find(1, |&(stored, _)| stored == 1).is_some());

        // Once they are all full again, they all go.
        shard.spend(100, 3 * SECOND, quota, capacity);
        shard.spend(101, 3 * SECOND, quota, capacity);
        assert_eq!(shard.tats.len(), 2);
        assert_eq!(shard.spend(100, 3 * SECOND, quota, capacity).remaining, 8);
    }

    // -- leases --------------------------------------------------------------

    /// A bucket leased in blocks of at most 100 (a sixteenth of 1,600).
    fn hot() -> (Check, Checks) {
        let quota = Quota::new(1_000, 1_600);
        let check = Check {
            key: "ip:hot".to_owned(),
            quota,
        };
        (check, one("ip:hot", quota))
    }

    /// A renewal's answer recorded before the answer of a batch sent
    /// earlier: the batch's (the bucket fuller) must not count the
    /// renewal's block twice, once as held and once as still in Redis.
    #[test]
    fn an_older_answer_recorded_late_does_not_undo_a_newer_one() {
        let (check, checks) = hot();
        let mut leases = Leases::default();
        let t0 = Instant::now();
        // The renewal: 8 leased, 0.5 s from full (1,100 left in Redis).
        leases.record(&check, 8, 8, 500_000, t0);
        // The batch, answered before the renewal took its block: 0.4 s.
        leases.record(&check, 0, 0, 400_000, t0);
        let decision = leases.spend(&checks, t0).expect("a leased token");
        assert_eq!(decision.remaining, 1_100 + 7);
        assert_eq!(decision.reset_after, Duration::from_millis(500));
        // A newer answer still counts.
        leases.record(&check, 0, 0, 600_000, t0);
        let decision = leases.spend(&checks, t0).expect("a leased token");
        assert_eq!(decision.remaining, 1_000 + 6);
    }

    #[test]
    fn leases_grow_while_demand_empties_them_and_shrink_when_they_expire() {
        let (check, checks) = hot();
        let mut leases = Leases::default();
        let t0 = Instant::now();
        assert_eq!(leases.want(&check, 1, t0), 0, "one check is not hot");
        assert_eq!(leases.want(&check, 3, t0), 3, "what one batch brought");
        // Seen once, and again within the TTL: hot.
        leases.record(&check, 0, 0, 0, t0);
        assert_eq!(leases.buckets[&check].tokens, 0);
        assert_eq!(
            leases.want(&check, 1, t0 + LEASE_TTL),
            0,
            "not again in time"
        );
        assert_eq!(leases.want(&check, 1, t0), 2);

        // Three leased; the shared bucket full again in 0.5 s, so 1,100
        // left in it.
        leases.record(&check, 3, 3, 500_000, t0);
        for held in [2, 1, 0] {
            let decision = leases.spend(&checks, t0).expect("a leased token");
            assert!(decision.allowed);
            assert_eq!(decision.remaining, 1_100 + held);
            assert_eq!(decision.reset_after, Duration::from_millis(500));
        }
        assert_eq!(leases.spent, 3);
        assert_eq!(leases.spend(&checks, t0), None, "emptied");
        assert_eq!(leases.plan(&checks, t0).sent[0].refund, 0, "nothing held");

        // Emptied before it expired: twice the block, up to the cap.
        assert_eq!(leases.want(&check, 1, t0), 6);
        leases.record(&check, 6, 6, 500_000, t0);
        assert_eq!(leases.want(&check, 1, t0), 0, "holds tokens");
        for _ in 0..6 {
            leases.spend(&checks, t0).expect("a leased token");
        }
        // Due for renewal on the way down; say that got no answer.
        assert_eq!(leases.due, std::slice::from_ref(&check));
        leases.renewal_failed(&check);
        let mut size = 6;
        while size < 100 {
            size = (2 * size).min(100);
            assert_eq!(leases.want(&check, 1, t0), size);
            leases.record(&check, size, 0, 500_000, t0);
        }
        assert_eq!(leases.want(&check, 1, t0), 100, "capped");

        // Expired with tokens left: none spent here any more, all go back
        // with the next call, and the block halves.
        leases.record(&check, 100, 40, 500_000, t0);
        let expired = t0 + LEASE_TTL;
        assert_eq!(leases.spend(&checks, expired), None);
        assert_eq!(
            leases.want(&check, 1, expired),
            0,
            "its tokens go back first"
        );
        assert_eq!(leases.plan(&checks, expired).sent[0].refund, 40);
        assert_eq!(leases.want(&check, 1, expired), 50);
    }

    #[test]
    fn a_request_spends_what_its_leases_hold_and_sends_the_rest() {
        let (check, hot_only) = hot();
        let group = hot_only.clone().then("user:cold".to_owned(), check.quota);
        let mut leases = Leases::default();
        let now = Instant::now();
        leases.record(&check, 2, 2, 0, now);
        assert_eq!(leases.spend(&group, now), None, "not all leased");
        assert_eq!(leases.buckets[&check].tokens, 2, "nothing spent");

        // On its way to Redis the leased check is spent here; only the
        // other one goes.
        let plan = leases.plan(&group, now);
        assert!(plan.leased[0].as_ref().is_some_and(|d| d.allowed));
        assert!(plan.leased[1].is_none());
        let sent: Vec<&str> = plan.sent.iter().map(|ask| ask.check.key.as_str()).collect();
        assert_eq!(sent, ["user:cold"]);
        assert_eq!((leases.buckets[&check].tokens, leases.spent), (1, 1));
        // A token the request did not get to spend comes back.
        leases.give_back([&check]);
        assert_eq!((leases.buckets[&check].tokens, leases.spent), (2, 0));

        // A bucket named twice with one token: nothing spent.
        assert!(leases.spend(&hot_only, now).is_some());
        let twice = hot_only.clone().then(check.key.clone(), check.quota);
        assert_eq!(leases.spend(&twice, now), None);
        assert_eq!(leases.buckets[&check].tokens, 1);
    }

    #[test]
    fn a_lease_down_to_half_its_block_is_renewed_once() {
        let (check, checks) = hot();
        let mut leases = Leases::default();
        let t0 = Instant::now();
        leases.record(&check, 8, 8, 0, t0);
        for _ in 0..3 {
            leases.spend(&checks, t0).expect("a leased token");
        }
        assert!(leases.due.is_empty(), "five of eight left");
        leases.spend(&checks, t0).expect("a leased token");
        assert_eq!(leases.due, std::slice::from_ref(&check), "half left");
        leases.spend(&checks, t0).expect("a leased token");
        assert_eq!(leases.due.len(), 1, "due once");
        assert_eq!(leases.want(&check, 5, t0), 0, "being renewed");

        // Five spent since the grant: sized for half the TTL at that rate
        // (the elapsed time counted as at least 1 ms), up to the cap.
        assert_eq!(leases.renewal(&check, t0), 100);
        assert_eq!(leases.renewal(&check, t0 + LEASE_TTL / 2), 5);
        assert_eq!(leases.renewal(&check, t0 + LEASE_TTL * 3 / 4), 3);
        leases.record(&check, 16, 16, 0, t0);
        let lease = &leases.buckets[&check];
        assert_eq!((lease.tokens, lease.size, lease.renewing), (19, 16, false));

        // A lease that expired before its renewal went out is not renewed.
        leases.buckets.get_mut(&check).expect("leased").renewing = true;
        assert_eq!(leases.renewal(&check, t0 + LEASE_TTL), 0);
        assert!(!leases.buckets[&check].renewing);
    }

    #[test]
    fn small_buckets_and_a_full_table_are_not_leased() {
        let mut leases = Leases::default();
        let now = Instant::now();
        let small = Check {
            key: "login".to_owned(),
            quota: Quota::new(10, 31),
        };
        assert_eq!(
            leases.want(&small, 100, now),
            0,
            "a burst under 32 stays exact"
        );

        let quota = Quota::new(1_000, 1_600);
        for n in 0..MAX_LEASED_BUCKETS {
            let check = Check {
                key: format!("ip:{n}"),
                quota,
            };
            leases.record(&check, 2, 2, 0, now);
        }
        let (check, _) = hot();
        assert_eq!(leases.want(&check, 5, now), 0, "no room");
        // Once the leases have expired, a sweep makes room.
        let later = now + LEASE_TTL;
        assert_eq!(leases.want(&check, 5, later), 5);
        assert!(leases.buckets.is_empty());
    }

    // -- Redis, batched ----------------------------------------------------

    /// Calls of `command` (as INFO names it) Redis has served since it
    /// started, scripts' own calls included.
    async fn command_calls(redis: &RedisHandle, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut redis.connection())
            .await
            .expect("INFO");
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }

    /// Redis through the fallback, with a bound no healthy call misses.
    fn patient(redis: &RedisHandle) -> FallbackLimiter {
        FallbackLimiter::with_timeouts(
            RedisLimiter::new(redis),
            Duration::from_secs(10),
            PRIMARY_RETRY_INTERVAL,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_races_admit_at_most_the_burst_in_few_calls() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = Arc::new(patient(&redis));
        let requests = 4_000;
        let calls_before = command_calls(&redis, "evalsha").await;
        let writes_before = command_calls(&redis, "set").await;
        // A renewal that leased the user's last tokens as the requests ran
        // out may leave them unspent: at most a block.
        let unspent = lease_cap(Quota::new(1, 1_000));
        race_on_one_user(limiter.clone(), requests, 1_000, unspent).await;
        let calls = command_calls(&redis, "evalsha").await - calls_before;
        let writes = command_calls(&redis, "set").await - writes_before;
        assert_eq!(limiter.degraded_checks(), 0);
        // Other tests' calls may be counted too; unbatched, this alone would
        // be 4,002.
        assert!(
            calls > 0 && calls < u64::from(requests) / 4,
            "{calls} calls for {requests} requests"
        );
        // A batch writes each of the three buckets at most once (under
        // 3,000 writes here); a write per spending check would be 6,000.
        assert!(
            writes < u64::from(requests),
            "{writes} writes in {calls} calls"
        );
        clean_up(&redis).await;
    }

    #[tokio::test]
    async fn redis_later_refusal_stops_the_group() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = patient(&redis);
        later_refusal_stops_the_group(&limiter).await;
        assert_eq!(limiter.degraded_checks(), 0);
        clean_up(&redis).await;
    }

    /// A leader whose caller gives up mid-call (the fallback's timeout)
    /// passes the lead on: the request queued behind it is still sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_gives_up_hands_over() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = Arc::new(RedisLimiter::new(&redis));
        // Buckets too small to lease, so every check goes to Redis; a
        // fresh one per round, so the follower finds tokens left.
        let quota = Quota::new(1, 30);
        assert!(lease_cap(quota) < 2);
        for round in 0..3 {
            let checks = one(&format!("k{round}"), quota);
            // Loopback Redis may answer within the first poll; until it
            // does not, the leader's call is in flight.
            let mut leader = Box::pin(limiter.try_check(&checks));
            for _ in 0..100 {
                if futures::poll!(leader.as_mut()).is_pending() {
                    break;
                }
                leader = Box::pin(limiter.try_check(&checks));
            }
            let follower = {
                let limiter = limiter.clone();
                let checks = checks.clone();
                tokio::spawn(async move { limiter.try_check(&checks).await })
            };
            let queued = Instant::now();
            while limiter.batches.queue().waiting.is_empty() {
                assert!(queued.elapsed() < Duration::from_secs(5), "never queued");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(leader);
            let decision = tokio::time::timeout(Duration::from_secs(5), follower)
                .await
                .expect("the follower was sent")
                .expect("task")
                .expect("Redis answers");
            assert!(decision.allowed);
        }
        assert!(
            !limiter.batches.queue().led,
            "nobody leads when all is done"
        );
        clean_up(&redis).await;
    }

    /// Two replicas race on one hot bucket, 4,000 checks in waves of 200:
    /// both lease blocks of it, and together they never admit more than it
    /// holds (plus what refills meanwhile); at most a block each is left
    /// unspent when the race ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_leasing_one_bucket_never_admit_more_than_it_holds() {
        let prefix = unique_prefix();
        let url = redis_url();
        let replicas = [
            Arc::new(patient(&connect(&url, &prefix).await)),
            Arc::new(patient(&connect(&url, &prefix).await)),
        ];
        let burst = 1_000;
        let quota = Quota::new(1, burst);
        let started = Instant::now();
        let mut admitted = 0;
        // In waves, so that later waves find the blocks earlier ones leased.
        for _ in 0..20 {
            let checks: Vec<_> = (0..200)
                .map(|n| {
                    let replica = replicas[n % 2].clone();
                    tokio::spawn(async move { replica.check(&one("ip:shared", quota)).await })
                })
                .collect();
            for check in checks {
                admitted += u32::from(check.await.expect("task").allowed);
            }
        }
        let refills = u32::try_from(started.elapsed().as_secs()).expect("seconds");
        let unspent = 2 * lease_cap(quota);
        assert!(
            (burst - unspent..=burst + refills).contains(&admitted),
            "{admitted} admitted of {burst}"
        );
        for replica in &replicas {
            assert_eq!(replica.degraded_checks(), 0);
            assert!(replica.primary.leased_checks() > 0, "hot, so leased");
        }
        let redis = connect(&url, &prefix).await;
        clean_up(&redis).await;
    }

    /// A bucket leasing one a second from 1,600 (blocks up to 100): nothing
    /// refills while a test runs.
    fn slow(key: &str) -> Check {
        Check {
            key: key.to_owned(),
            quota: Quota::new(1, 1_600),
        }
    }

    /// `checks` checks on `check`'s bucket in one batch, which makes it hot
    /// (a block of as many leased, if it held no lease): the tokens held.
    async fn lease(limiter: &RedisLimiter, check: &Check, checks: usize) -> u32 {
        let asks: Vec<Vec<Ask>> = (0..checks)
            .map(|_| {
                vec![Ask {
                    check: check.clone(),
                    refund: 0,
                }]
            })
            .collect();
        let groups: Vec<&[Ask]> = asks.iter().map(Vec::as_slice).collect();
        let flat = limiter
            .batches
            .invoke(&groups)
            .await
            .expect("Redis answers");
        assert_eq!(flat.len(), 3 * checks, "the checks' triples");
        limiter.batches.leases().buckets[check].tokens
    }

    /// Tokens a replica leased and did not spend go back to the shared
    /// bucket once the lease expires: the bucket ends as if they had never
    /// been leased.
    #[tokio::test]
    async fn unspent_leases_go_back_to_the_shared_bucket() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = RedisLimiter::new(&redis);
        let check = slow("ip:hot");
        let checks = one(&check.key, check.quota);
        assert_eq!(lease(&limiter, &check, 2).await, 2);
        let held = limiter.try_leased(&checks).expect("a leased token");
        assert_eq!(held.remaining, 1_596 + 1, "1,596 in Redis, one held");
        assert_eq!(limiter.leased_checks(), 1);

        tokio::time::sleep(LEASE_TTL).await;
        assert_eq!(limiter.try_leased(&checks), None, "expired");
        let decision = limiter.try_check(&checks).await.expect("Redis answers");
        // Four spent in all, the unspent token back: 1,596 left (1,597 if
        // a second passed).
        assert!(
            (1_596..=1_597).contains(&decision.remaining),
            "{decision:?}"
        );
        // The block halved to one: not worth a lease any more.
        assert_eq!(limiter.batches.leases().buckets[&check].tokens, 0);
        clean_up(&redis).await;
    }

    /// The request that takes a lease down to half its block does not
    /// wait: a renewal goes out behind it and tops the lease up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_low_lease_is_renewed_in_the_background() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = RedisLimiter::new(&redis);
        let check = slow("ip:busy");
        assert_eq!(lease(&limiter, &check, 8).await, 8);
        let tokens = || limiter.batches.leases().buckets[&check].tokens;
        let checks = one(&check.key, check.quota);
        for _ in 0..6 {
            assert!(limiter.try_leased(&checks).expect("leased").allowed);
        }
        let waited = Instant::now();
        while tokens() == 2 {
            assert!(waited.elapsed() < Duration::from_secs(5), "never renewed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Whatever the renewal brought, the two left are kept, and what
        // the bucket could still admit is the same: 1,600 less 8 checks
        // and 7 leased tokens spent.
        assert!(tokens() > 2);
        let probe = limiter.try_check(&checks).await.expect("Redis answers");
        assert!(probe.allowed);
        assert_eq!(probe.remaining, 1_600 - 8 - 7);
        assert_eq!(limiter.leased_checks(), 7);
        clean_up(&redis).await;
    }

    /// A request whose IP bucket is leased here and whose user bucket is
    /// not: the IP's token is spent here and only the user's check goes to
    /// Redis. In order, as ever: the IP's token stays spent when the user
    /// is refused after it, and is given back when the user, checked
    /// first, is refused before it.
    #[tokio::test]
    async fn leased_and_sent_checks_keep_their_order() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = RedisLimiter::new(&redis);
        let user = Quota::new(1, 1);
        // Blocks of 8: one request at a time leaves them above half, so no
        // renewal runs behind the test's back.
        let ip = slow("ip:a");
        let tokens = || limiter.batches.leases().buckets[&ip].tokens;
        assert_eq!(lease(&limiter, &ip, 8).await, 8);
        let ip_then_user = one(&ip.key, ip.quota).then("user:a".to_owned(), user);
        let admitted = limiter.try_check(&ip_then_user).await.expect("Redis");
        assert!(admitted.allowed);
        assert_eq!((admitted.limit, admitted.remaining), (1, 0), "the user's");
        assert_eq!(tokens(), 7);
        let refused = limiter.try_check(&ip_then_user).await.expect("Redis");
        assert!(!refused.allowed);
        assert_eq!(tokens(), 6, "taken before the refusal");

        let ip = slow("ip:b");
        let tokens = || limiter.batches.leases().buckets[&ip].tokens;
        assert_eq!(lease(&limiter, &ip, 8).await, 8);
        let user_then_ip = one("user:b", user).then(ip.key.clone(), ip.quota);
        let admitted = limiter.try_check(&user_then_ip).await.expect("Redis");
        assert!(admitted.allowed);
        assert_eq!(tokens(), 7);
        let refused = limiter.try_check(&user_then_ip).await.expect("Redis");
        assert!(!refused.allowed);
        assert_eq!(tokens(), 7, "not reached, so given back");
        assert_eq!(limiter.leased_checks(), 3);
        clean_up(&redis).await;
    }

    #[test]
    fn malformed_answers_are_errors() {
        let quota = Quota::new(1, 3);
        let two = one("a", quota).then("b".to_owned(), quota);
        let sent = [None, None];
        let taken = |decisions: Result<Vec<Decision>, _>| {
            decisions.map(|d| d.iter().map(|d| d.allowed).collect::<Vec<_>>())
        };
        assert_eq!(
            taken(decode(&two, &sent, &[1, 100, 0, 0, 200, 300])).ok(),
            Some(vec![true, false])
        );
        assert_eq!(
            taken(decode(&two, &sent, &[0, 200, 300, 2, 0, 0])).ok(),
            Some(vec![false])
        );
        // With a leased check, only the other one's triple comes back.
        let lease = Some(allowed(quota, 100));
        let first_leased = [lease.clone(), None];
        let second_leased = [None, lease.clone()];
        assert_eq!(
            taken(decode(&two, &first_leased, &[0, 200, 300])).ok(),
            Some(vec![true, false])
        );
        assert_eq!(
            taken(decode(&two, &second_leased, &[0, 200, 300])).ok(),
            Some(vec![false])
        );
        assert_eq!(
            taken(decode(&two, &[lease.clone(), lease], &[])).ok(),
            Some(vec![true, true])
        );
        for group in [
            &[][..],
            &[1, 100],
            &[1, 100, 0],
            &[0, 200, 300],
            &[1, 100, 0, 1, 100, 0, 1, 100, 0],
            &[2, 0, 0, 1, 100, 0],
            &[1, 100, 0, 2, 0, 0],
            &[0, 200, 300, 1, 100, 0],
            &[1, -5, 0, 1, 100, 0],
        ] {
            assert!(decode(&two, &sent, group).is_err(), "{group:?}");
        }
        assert!(decode(&two, &first_leased, &[1, 100, 0, 1, 100, 0]).is_err());
        assert!(decode(&two, &first_leased, &[2, 0, 0]).is_err());
    }

    /// `flashmesh_rate_limit_checks_total{answered_by=by}` as `metrics`
    /// renders it.
    fn answered(metrics: &Metrics, by: &str) -> u64 {
        let series = format!("flashmesh_rate_limit_checks_total{{answered_by=\"{by}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {}", metrics.render()))
    }

    /// 1,000 checks at once on one key (burst 30) through a limiter
    /// whose Redis fails in the way `cut` does after the first wave: the
    /// first wave is answered by Redis, every check of the second by fresh
    /// local buckets, within the bound.
    async fn redis_going_away_mid_run(cut: impl FnOnce(&FaultyProxy)) {
        let (direct, proxy, proxied) = redis_behind_proxy().await;
        let metrics = Metrics::default();
        let limiter = Arc::new(
            FallbackLimiter::with_timeouts(
                RedisLimiter::new(&proxied),
                Duration::from_millis(500),
                PRIMARY_RETRY_INTERVAL,
            )
            .counted(Answered::new(&metrics)),
        );
        // Too small a bucket to lease, so both waves are exact.
        let quota = Quota::new(1, 30);
        assert!(lease_cap(quota) < 2);
        let wave = || {
            let checks: Vec<_> = (0..1_000)
                .map(|_| {
                    let limiter = limiter.clone();
                    tokio::spawn(async move { limiter.check(&one("ip:wave", quota)).await })
                })
                .collect();
            async move {
                let mut admitted = 0;
                for check in checks {
                    admitted += usize::from(check.await.expect("task").allowed);
                }
                admitted
            }
        };
        assert_eq!(wave().await, 30);
        assert_eq!(limiter.degraded_checks(), 0);
        assert_eq!(
            answered(&metrics, "redis"),
            1_000,
            "each request counted once"
        );

        cut(&proxy);
        let started = Instant::now();
        assert_eq!(wave().await, 30, "a fresh local bucket, spent exactly");
        assert_eq!(limiter.degraded_checks(), 1_000);
        assert_eq!(answered(&metrics, "fallback"), 1_000, "on /metrics too");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        clean_up(&direct).await;
    }

    /// Back-to-back requests on one bucket: the first ones go to Redis,
    /// which leases the now hot bucket a block, and the rest are answered
    /// from it; `/metrics` counts each request once, by what answered it.
    #[tokio::test]
    async fn metrics_count_what_answered_each_check() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let metrics = Metrics::default();
        let limiter = patient(&redis).counted(Answered::new(&metrics));
        let check = slow("ip:counted");
        let checks = one(&check.key, check.quota);
        for _ in 0..20 {
            assert!(limiter.check(&checks).await.allowed);
        }
        let (by_redis, by_lease) = (answered(&metrics, "redis"), answered(&metrics, "lease"));
        assert_eq!(by_redis + by_lease, 20, "each request counted once");
        assert!(by_redis >= 2, "the first two made the bucket hot");
        assert!(by_lease > 0, "then it was leased");
        assert_eq!(answered(&metrics, "fallback"), 0);
        clean_up(&redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn severed_redis_mid_run_falls_back() {
        redis_going_away_mid_run(FaultyProxy::sever).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hung_redis_mid_run_falls_back() {
        redis_going_away_mid_run(FaultyProxy::blackhole).await;
    }
}
