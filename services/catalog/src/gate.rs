//! The flash-sale stock gate: an atomic Redis check-and-decrement in front of
//! the database, so that once a deal is sold out the thousands who arrive
//! after get SOLD_OUT without touching the database.
//!
//! The database stays the source of truth. The gate is seeded from it (stock
//! remaining and what each user holds), expires after a TTL and is reseeded,
//! so drift (a give-back lost while Redis was down, or a flush) heals. A
//! reseed while reservations are in flight can only leave the gate above the
//! truth, which costs database work, never an oversell: the database's
//! conditional decrement decides.

use std::time::Duration;

use flashmesh_platform::{
    metrics::Metrics,
    redis::RedisHandle,
    telemetry::{self, Attribute},
};
use prometheus_client::metrics::counter::Counter;
use redis::{RedisError, Script};

/// What the gate says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateDecision {
    /// Units taken from the gate; the database must now take them too, or
    /// they must be given back.
    Admitted,
    SoldOut {
        remaining: i32,
    },
    LimitExceeded {
        held: i32,
    },
    /// The gate has no count for the deal (never seeded, expired, flushed).
    Unseeded,
}

const ADMIT: &str = r"
local remaining = redis.call('GET', KEYS[1])
if not remaining then return {3, 0} end
remaining = tonumber(remaining)
local qty = tonumber(ARGV[2])
if remaining < qty then return {1, remaining} end
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if held + qty > tonumber(ARGV[3]) then return {2, held} end
redis.call('DECRBY', KEYS[1], qty)
redis.call('HINCRBY', KEYS[2], ARGV[1], qty)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {0, remaining - qty}
";

const GIVE_BACK: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[1], -tonumber(ARGV[2]))
return 1
";

const SEED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
";

#[derive(Clone)]
pub struct StockGate {
    redis: RedisHandle,
    ttl: Duration,
    admit: std::sync::Arc<Script>,
    give_back: std::sync::Arc<Script>,
    seed: std::sync::Arc<Script>,
    decisions: Decisions,
}

/// `flashmesh_stock_gate_decisions_total{decision}`, resolved once.
#[derive(Clone)]
struct Decisions {
    admitted: Counter,
    sold_out: Counter,
    limit_exceeded: Counter,
    unseeded: Counter,
}

impl GateDecision {
    fn name(self) -> &'static str {
        match self {
            GateDecision::Admitted => "admitted",
            GateDecision::SoldOut { .. } => "sold_out",
            GateDecision::LimitExceeded { .. } => "limit_exceeded",
            GateDecision::Unseeded => "unseeded",
        }
    }
}

impl StockGate {
    pub fn new(redis: RedisHandle, ttl: Duration, metrics: &Metrics) -> Self {
        let family = metrics.counter_family::<1>(
            "flashmesh_stock_gate_decisions",
            "Stock gate answers: admitted, sold_out, limit_exceeded, unseeded",
        );
        let counter = |decision: &str| {
            family
                .get_or_create(&[("decision", decision.to_owned())])
                .clone()
        };
        Self {
            redis,
            ttl,
            admit: Script::new(ADMIT).into(),
            give_back: Script::new(GIVE_BACK).into(),
            seed: Script::new(SEED).into(),
            decisions: Decisions {
                admitted: counter("admitted"),
                sold_out: counter("sold_out"),
                limit_exceeded: counter("limit_exceeded"),
                unseeded: counter("unseeded"),
            },
        }
    }

    /// The remaining-units key and the per-user holdings hash of a deal. The
    /// hash tag keeps both in one Redis Cluster slot.
    fn keys(&self, deal_id: &str) -> [String; 2] {
        [
            self.redis.key(&format!("gate:{{{deal_id}}}:remaining")),
            self.redis.key(&format!("gate:{{{deal_id}}}:held")),
        ]
    }

    pub async fn admit(
        &self,
        deal_id: &str,
        user_id: &str,
        quantity: i32,
        per_user_limit: i32,
    ) -> Result<GateDecision, RedisError> {
        let [remaining_key, held_key] = self.keys(deal_id);
        let (verdict, value): (i64, i64) = telemetry::redis(
            "stock_gate.admit",
            self.admit
                .key(remaining_key)
                .key(held_key)
                .arg(user_id)
                .arg(quantity)
                .arg(per_user_limit)
                .invoke_async(&mut self.redis.connection()),
        )
        .await?;
        let value = i32::try_from(value).unwrap_or(i32::MAX);
        let decision = match verdict {
            0 => GateDecision::Admitted,
            1 => GateDecision::SoldOut { remaining: value },
            2 => GateDecision::LimitExceeded { held: value },
            _ => GateDecision::Unseeded,
        };
        match decision {
            GateDecision::Admitted => &self.decisions.admitted,
            GateDecision::SoldOut { .. } => &self.decisions.sold_out,
            GateDecision::LimitExceeded { .. } => &self.decisions.limit_exceeded,
            GateDecision::Unseeded => &self.decisions.unseeded,
        }
        .inc();
        telemetry::event("stock_gate.decision", || {
            vec![
                Attribute::new("stock_gate.decision", decision.name()),
                Attribute::new("deal.id", deal_id.to_owned()),
            ]
        });
        Ok(decision)
    }

    /// Returns units the gate admitted but the database did not take, or that
    /// a release gave back. A no-op when the gate has no count (the next seed
    /// reads the database).
    pub async fn give_back(
        &self,
        deal_id: &str,
        user_id: &str,
        quantity: i32,
    ) -> Result<(), RedisError> {
        let [remaining_key, held_key] = self.keys(deal_id);
        telemetry::redis(
            "stock_gate.give_back",
            self.give_back
                .key(remaining_key)
                .key(held_key)
                .arg(user_id)
                .arg(quantity)
                .invoke_async::<i64>(&mut self.redis.connection()),
        )
        .await?;
        Ok(())
    }

    /// Seeds the gate from the database's counts unless it is already seeded.
    pub async fn seed(
        &self,
        deal_id: &str,
        remaining: i32,
        holdings: &[(String, i32)],
    ) -> Result<(), RedisError> {
        let [remaining_key, held_key] = self.keys(deal_id);
        let ttl_ms = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut invocation = self.seed.key(remaining_key);
        invocation.key(held_key).arg(remaining).arg(ttl_ms);
        for (user, held) in holdings {
            invocation.arg(user).arg(*held);
        }
        invocation
            .invoke_async::<i64>(&mut self.redis.connection())
            .await?;
        Ok(())
    }
}
