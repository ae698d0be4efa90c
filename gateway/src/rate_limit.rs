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
//! round trip.
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
//!   request and the latency is one round trip, as before.
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
use flashmesh_platform::redis::RedisHandle;
use hashbrown::HashTable;
use http::{HeaderName, HeaderValue, StatusCode, header};
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
/// process when Redis fails, when `REDIS_URL` is set; in process otherwise.
pub fn limiter(redis: Option<&RedisHandle>) -> Arc<dyn RateLimiter> {
    match redis {
        Some(redis) => Arc::new(FallbackLimiter::new(RedisLimiter::new(redis))),
        None => Arc::new(LocalLimiter::default()),
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
    async fn try_check(&self, checks: &Checks) -> Result<Decision, RateLimitError>;
}

/// GCRA over a batch of check groups in one round trip. `KEYS` holds the
/// batch's distinct buckets once each; `ARGV` holds per bucket its emission
/// interval (µs) and burst, then per group its number of checks and each
/// check's bucket (1-based index into `KEYS`). One `TIME` read is the clock
/// of the whole batch. Each group's checks are spent in order up to the
/// first refusal. A bucket is read once and written once per batch, however
/// many checks spend from it (a route's bucket, or many callers behind one
/// address, is hot); its TAT is kept in µs of Redis `TIME`, expiring when
/// the bucket is full again. Returns `{status, reset_after_us,
/// retry_after_us}` per check, flat, in order: status 1 allowed, 0 refused,
/// 2 not taken (after a refusal in its group).
const GCRA_BATCH_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval, burst = {}, {}
for b = 1, #KEYS do
  interval[b] = tonumber(ARGV[2 * b - 1])
  burst[b] = tonumber(ARGV[2 * b])
end
local tats, spent = {}, {}
local out, n = {}, 0
local arg, args = 2 * #KEYS + 1, #ARGV
while arg <= args do
  local checks = tonumber(ARGV[arg])
  local refused = false
  for c = arg + 1, arg + checks do
    if refused then
      out[n + 1], out[n + 2], out[n + 3] = 2, 0, 0
    else
      local b = tonumber(ARGV[c])
      local name = KEYS[b]
      local tat = tats[name]
      if tat == nil then
        tat = tonumber(redis.call('GET', name) or now)
      end
      if tat < now then tat = now end
      local new_tat = tat + interval[b]
      local allow_at = new_tat - burst[b] * interval[b]
      if now < allow_at then
        tats[name] = tat
        out[n + 1], out[n + 2], out[n + 3] = 0, tat - now, allow_at - now
        refused = true
      else
        if not spent[name] then
          spent[name] = true
          spent[#spent + 1] = name
        end
        tats[name] = new_tat
        out[n + 1], out[n + 2], out[n + 3] = 1, new_tat - now, 0
      end
    end
    n = n + 3
  end
  arg = arg + 1 + checks
end
for i = 1, #spent do
  local tat = tats[spent[i]]
  redis.call('SET', spent[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
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

/// A bucket's full Redis key and its quota.
type Bucket = (String, Quota);

/// GCRA shared by every replica through Redis, concurrent requests batched
/// into one call.
///
/// No task of its own: the request that finds no call in flight sends the
/// batch itself (at low load, just its own checks: the same path and cost
/// as an unbatched call); requests arriving meanwhile queue, and when the
/// call returns its sender answers them and hands the right to send the
/// next batch to the first one still waiting. A batching task would cost
/// every request two more task wake-ups, which is what batching saves.
pub struct RedisLimiter {
    batches: Arc<Batches>,
    /// The namespace of every bucket's key.
    prefix: String,
}

struct Batches {
    queue: Mutex<Queue>,
    connection: ConnectionManager,
    script: redis::Script,
}

#[derive(Default)]
struct Queue {
    /// Whether a request holds the [`Leadership`].
    led: bool,
    waiting: VecDeque<Follower>,
}

/// A request waiting for the next batch.
struct Follower {
    buckets: Vec<Bucket>,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    /// The group's raw answer.
    Group(Result<Vec<i64>, RateLimitError>),
    /// Send the next batch, starting with these, your own buckets.
    Lead(Leadership, Vec<Bucket>),
}

/// What a request joining the batches does.
enum Turn {
    Lead(Leadership, Vec<Bucket>),
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
                connection: redis.connection(),
                script: redis::Script::new(GCRA_BATCH_SCRIPT),
            }),
            prefix: redis.key("gateway:rl:"),
        }
    }
}

impl Batches {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `buckets` lead the next batch if no request does; otherwise they
    /// wait for an answer, or for the lead.
    fn join(self: &Arc<Self>, buckets: Vec<Bucket>) -> Result<Turn, RateLimitError> {
        let mut queue = self.queue();
        if !queue.led {
            queue.led = true;
            let leadership = Leadership {
                batches: self.clone(),
                held: true,
            };
            return Ok(Turn::Lead(leadership, buckets));
        }
        if queue.waiting.len() >= QUEUE_CAPACITY {
            return Err(RateLimitError::Overloaded);
        }
        let (answer, answered) = oneshot::channel();
        queue.waiting.push_back(Follower { buckets, answer });
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
            match next.answer.send(Answer::Lead(leadership, next.buckets)) {
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
    async fn send(&self, own: &[Bucket]) -> Result<Vec<i64>, RateLimitError> {
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
        let groups: Vec<&[Bucket]> = std::iter::once(own)
            .chain(followers.iter().map(|f| &f.buckets[..]))
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
    /// and checks name it by index. Answers three numbers per check.
    async fn invoke(&self, groups: &[&[Bucket]]) -> Result<Vec<i64>, RateLimitError> {
        let checks: usize = groups.iter().map(|group| group.len()).sum();
        let mut index: HashMap<&Bucket, usize> = HashMap::with_capacity(checks);
        let mut invocation = self.script.prepare_invoke();
        for bucket in groups.iter().flat_map(|group| group.iter()) {
            let next = index.len() + 1;
            index.entry(bucket).or_insert_with(|| {
                let (key, quota) = bucket;
                invocation
                    .key(key)
                    .arg(quota.interval_us())
                    .arg(quota.burst());
                next
            });
        }
        for group in groups {
            invocation.arg(group.len());
            for bucket in *group {
                invocation.arg(index[bucket]);
            }
        }
        let flat: Vec<i64> = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        if flat.len() == 3 * checks {
            Ok(flat)
        } else {
            Err(RateLimitError::Reply(format!(
                "{} numbers for {checks} checks",
                flat.len()
            )))
        }
    }
}

/// A group's decision from its `{status, reset_after_us, retry_after_us}`
/// triples, one per check, checked against what the script may answer.
fn decode(checks: &Checks, group: &[i64]) -> Result<Decision, RateLimitError> {
    let malformed = || RateLimitError::Reply(format!("{group:?}"));
    let (triples, rest) = group.as_chunks::<3>();
    if !rest.is_empty() || triples.len() != checks.len() {
        return Err(malformed());
    }
    let micros = |value: i64| u64::try_from(value).map_err(|_| malformed());
    let mut decisions = Vec::with_capacity(triples.len());
    let mut taken = triples.iter();
    for (check, &[status, reset_after_us, retry_after_us]) in checks.iter().zip(taken.by_ref()) {
        let decision = match status {
            1 => allowed(check.quota, micros(reset_after_us)?),
            0 => Decision::denied(
                check.quota,
                micros(reset_after_us)?,
                micros(retry_after_us)?,
            ),
            _ => return Err(malformed()),
        };
        let refused = !decision.allowed;
        decisions.push(decision);
        if refused {
            break;
        }
    }
    // Whatever follows a refusal was not taken.
    if taken.any(|&[status, ..]| status != NOT_TAKEN) {
        return Err(malformed());
    }
    let mut decisions = decisions.into_iter();
    let first = decisions.next().ok_or_else(malformed)?;
    Ok(tightest(first, decisions))
}

#[async_trait]
impl SharedLimiter for RedisLimiter {
    async fn try_check(&self, checks: &Checks) -> Result<Decision, RateLimitError> {
        let buckets = checks
            .iter()
            .map(|check| (format!("{}{}", self.prefix, check.key), check.quota))
            .collect();
        let (leadership, buckets) = match self.batches.join(buckets)? {
            Turn::Lead(leadership, buckets) => (leadership, buckets),
            Turn::Wait(answered) => match answered.await {
                Ok(Answer::Group(group)) => return decode(checks, &group?),
                Ok(Answer::Lead(leadership, buckets)) => (leadership, buckets),
                Err(_) => return Err(RateLimitError::Abandoned),
            },
        };
        let group = self.batches.send(&buckets).await;
        // The next batch goes out before this one's answer is read.
        drop(leadership);
        decode(checks, &group?)
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

    /// Requests (check groups) the local limiter answered because the
    /// primary failed, timed out, or was being left alone after a failure.
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
    async fn check(&self, checks: &Checks) -> Decision {
        if self.now_us() >= self.skip_primary_until_us.load(Ordering::Relaxed) {
            let answer = tokio::time::timeout(self.timeout, self.primary.try_check(checks))
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
        let limiter = limiter(None);
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
        let other = limiter(Some(&redis));
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
    /// requests ran.
    async fn race_on_one_user(limiter: Arc<dyn RateLimiter>, requests: u32, burst: u32) {
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
        assert!(within(admitted, burst), "{admitted} of {requests} admitted");
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
        race_on_one_user(Arc::new(LocalLimiter::default()), 4_000, 1_000).await;
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
    async fn redis_races_admit_exactly_the_burst_in_few_calls() {
        let prefix = unique_prefix();
        let redis = connect(&redis_url(), &prefix).await;
        let limiter = Arc::new(patient(&redis));
        let requests = 4_000;
        let calls_before = command_calls(&redis, "evalsha").await;
        let writes_before = command_calls(&redis, "set").await;
        race_on_one_user(limiter.clone(), requests, 1_000).await;
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
        let checks = one("k", Quota::new(1, 100));
        for _ in 0..3 {
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

    #[test]
    fn malformed_answers_are_errors() {
        let quota = Quota::new(1, 3);
        let two = one("a", quota).then("b".to_owned(), quota);
        assert!(decode(&two, &[1, 100, 0, 0, 200, 300]).is_ok());
        let stopped = decode(&two, &[0, 200, 300, 2, 0, 0]).expect("stopped at a refusal");
        assert!(!stopped.allowed);
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
            assert!(decode(&two, group).is_err(), "{group:?}");
        }
    }

    /// `requests` checks at once on one key (burst 100) through a limiter
    /// whose Redis fails in the way `cut` does after the first wave: the
    /// first wave is answered by Redis, every check of the second by fresh
    /// local buckets, within the bound.
    async fn redis_going_away_mid_run(cut: impl FnOnce(&FaultyProxy)) {
        let (direct, proxy, proxied) = redis_behind_proxy().await;
        let limiter = Arc::new(FallbackLimiter::with_timeouts(
            RedisLimiter::new(&proxied),
            Duration::from_millis(500),
            PRIMARY_RETRY_INTERVAL,
        ));
        let quota = Quota::new(1, 100);
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
        assert_eq!(wave().await, 100);
        assert_eq!(limiter.degraded_checks(), 0);

        cut(&proxy);
        let started = Instant::now();
        assert_eq!(wave().await, 100, "a fresh local bucket, spent exactly");
        assert_eq!(limiter.degraded_checks(), 1_000);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        clean_up(&direct).await;
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
