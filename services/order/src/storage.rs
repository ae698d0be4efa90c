//! sqlx repositories for idempotency claims, orders, the outbox, pending
//! stock releases and the consumers' read models, in SQL that PostgreSQL and
//! SQLite share.
//!
//! Every multi-statement transaction starts with a write, so SQLite takes its
//! write lock up front (and queues on `busy_timeout`) instead of failing to
//! upgrade a read lock mid-transaction.

use std::collections::HashMap;

use flashmesh_platform::{
    db::{self, Backend},
    telemetry,
};
use sqlx::{Any, AnyPool, FromRow, Transaction};

use crate::domain::{DealSales, Order, OrderItem, OrderState, SalesDelta};

/// A request's hold on an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub user_id: String,
    pub key: String,
    pub fingerprint: String,
    pub order_id: String,
    pub reservation_id: String,
}

/// The state of a key somebody else claimed first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimState {
    InProgress,
    Completed,
    /// The stored refusal (JSON).
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingClaim {
    pub claim: Claim,
    pub state: ClaimState,
}

pub enum ClaimOutcome {
    /// The caller owns the key now.
    Claimed,
    Existing(ExistingClaim),
}

/// An event written with the change it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub event_id: String,
    pub order_id: String,
    pub version: i64,
    pub kind: String,
    pub payload: Vec<u8>,
    pub traceparent: String,
    pub created_at: i64,
}

#[derive(FromRow)]
struct ClaimRow {
    user_id: String,
    idem_key: String,
    fingerprint: String,
    state: String,
    order_id: String,
    reservation_id: String,
    refusal: Option<String>,
    expires_at: i64,
}

#[derive(FromRow)]
struct OrderRow {
    id: String,
    user_id: String,
    state: String,
    total_cents: i64,
    idempotency_key: String,
    version: i64,
    created_at: i64,
    updated_at: i64,
}

#[derive(FromRow)]
struct ItemRow {
    order_id: String,
    deal_id: String,
    product_id: String,
    quantity: i64,
    unit_price_cents: i64,
    reservation_id: String,
}

#[derive(FromRow)]
struct OutboxRecord {
    event_id: String,
    order_id: String,
    version: i64,
    kind: String,
    payload: Vec<u8>,
    traceparent: String,
    created_at: i64,
}

#[derive(FromRow)]
struct SalesRow {
    deal_id: String,
    units_sold: i64,
    orders_confirmed: i64,
    orders_cancelled: i64,
    updated_at: i64,
}

const ORDER_COLUMNS: &str =
    "id, user_id, state, total_cents, idempotency_key, version, created_at, updated_at";
const ITEM_COLUMNS: &str =
    "order_id, deal_id, product_id, quantity, unit_price_cents, reservation_id";

/// `$first, $first+1, …` for `count` values.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn assemble(rows: Vec<OrderRow>, items: Vec<ItemRow>) -> Result<Vec<Order>, sqlx::Error> {
    let mut by_order: HashMap<String, Vec<OrderItem>> = HashMap::new();
    for item in items {
        by_order.entry(item.order_id).or_default().push(OrderItem {
            deal_id: item.deal_id,
            product_id: item.product_id,
            quantity: i32::try_from(item.quantity).unwrap_or(i32::MAX),
            unit_price_cents: item.unit_price_cents,
            reservation_id: item.reservation_id,
        });
    }
    rows.into_iter()
        .map(|row| {
            let state = OrderState::parse(&row.state).ok_or_else(|| {
                sqlx::Error::Decode(format!("unknown order state {:?}", row.state).into())
            })?;
            Ok(Order {
                items: by_order.remove(&row.id).unwrap_or_default(),
                id: row.id,
                user_id: row.user_id,
                state,
                total_cents: row.total_cents,
                idempotency_key: row.idempotency_key,
                version: row.version,
                created_at: row.created_at,
                updated_at: row.updated_at,
            })
        })
        .collect()
}

pub struct OrderStore {
    pool: AnyPool,
    backend: Backend,
}

impl OrderStore {
    pub fn new(pool: AnyPool, backend: Backend) -> Self {
        Self { pool, backend }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    // ---- idempotency claims ------------------------------------------------

    /// Claims `claim.key` for `claim.user_id` with one atomic insert; if the
    /// key is taken, returns who holds it. A key past its expiry is freed
    /// first, so an expired key behaves as a new one.
    pub async fn claim(
        &self,
        claim: &Claim,
        lease_until: i64,
        expires_at: i64,
        now: i64,
    ) -> Result<ClaimOutcome, sqlx::Error> {
        telemetry::db("order.claim", async {
            for _ in 0..2 {
                let inserted = sqlx::query(
                    "INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, state, order_id, \
                     reservation_id, lease_until, created_at, expires_at) \
                     VALUES ($1, $2, $3, 'in_progress', $4, $5, $6, $7, $8) \
                     ON CONFLICT (user_id, idem_key) DO NOTHING",
                )
                .bind(&claim.user_id)
                .bind(&claim.key)
                .bind(&claim.fingerprint)
                .bind(&claim.order_id)
                .bind(&claim.reservation_id)
                .bind(lease_until)
                .bind(now)
                .bind(expires_at)
                .execute(&self.pool)
                .await?;
                if inserted.rows_affected() == 1 {
                    return Ok(ClaimOutcome::Claimed);
                }
                let Some(row) = sqlx::query_as::<_, ClaimRow>(
                    "SELECT user_id, idem_key, fingerprint, state, order_id, reservation_id, refusal, \
                     expires_at FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2",
                )
                .bind(&claim.user_id)
                .bind(&claim.key)
                .fetch_optional(&self.pool)
                .await?
                else {
                    // Freed between the two statements: claim again.
                    continue;
                };
                if row.expires_at <= now && row.state != "in_progress" {
                    sqlx::query(
                        "DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 \
                         AND expires_at <= $3 AND state <> 'in_progress'",
                    )
                    .bind(&claim.user_id)
                    .bind(&claim.key)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                    continue;
                }
                let state = match row.state.as_str() {
                    "completed" => ClaimState::Completed,
                    "refused" => ClaimState::Refused(row.refusal.unwrap_or_default()),
                    _ => ClaimState::InProgress,
                };
                return Ok(ClaimOutcome::Existing(ExistingClaim {
                    claim: Claim {
                        user_id: row.user_id,
                        key: row.idem_key,
                        fingerprint: row.fingerprint,
                        order_id: row.order_id,
                        reservation_id: row.reservation_id,
                    },
                    state,
                }));
            }
            // Two rounds lost to concurrent sweeps: let the caller retry.
            Ok(ClaimOutcome::Existing(ExistingClaim {
                claim: claim.clone(),
                state: ClaimState::InProgress,
            }))
        })
        .await
    }

    /// Records the catalog's refusal under the claim, if the claim is still
    /// the caller's. Nothing was reserved, so nothing else changes.
    pub async fn refuse(&self, claim: &Claim, refusal: &str) -> Result<bool, sqlx::Error> {
        telemetry::db("order.refuse", async {
            let updated = sqlx::query(
                "UPDATE idempotency_keys SET state = 'refused', refusal = $1, lease_until = 0 \
                 WHERE reservation_id = $2 AND state = 'in_progress'",
            )
            .bind(refusal)
            .bind(&claim.reservation_id)
            .execute(&self.pool)
            .await?;
            Ok(updated.rows_affected() == 1)
        })
        .await
    }

    /// Gives the key back (the request failed without an answer worth
    /// remembering). With `release`, the claim's reservation is queued for
    /// release in the same transaction, for when stock may have been taken.
    pub async fn abandon(&self, claim: &Claim, release: bool, now: i64) -> Result<(), sqlx::Error> {
        telemetry::db("order.abandon", async {
            let mut tx = db::begin(&self.pool).await?;
            let deleted = sqlx::query(
                "DELETE FROM idempotency_keys WHERE reservation_id = $1 AND state = 'in_progress'",
            )
            .bind(&claim.reservation_id)
            .execute(&mut *tx)
            .await?;
            if release && deleted.rows_affected() == 1 {
                queue_release(&mut tx, &claim.reservation_id, now).await?;
            }
            db::commit(tx).await
        })
        .await
    }

    /// Writes the order, its items and its creation event, and completes the
    /// claim, in one transaction. `false` (nothing written) when the claim is
    /// no longer the caller's: it outlived its lease and was swept.
    pub async fn commit_order(
        &self,
        claim: &Claim,
        order: &Order,
        event: &OutboxRow,
    ) -> Result<bool, sqlx::Error> {
        telemetry::db("order.commit_order", async {
            let mut tx = db::begin(&self.pool).await?;
            let completed = sqlx::query(
                "UPDATE idempotency_keys SET state = 'completed', lease_until = 0 \
                 WHERE reservation_id = $1 AND state = 'in_progress'",
            )
            .bind(&claim.reservation_id)
            .execute(&mut *tx)
            .await?;
            if completed.rows_affected() != 1 {
                return Ok(false);
            }
            sqlx::query(&format!(
                "INSERT INTO orders ({ORDER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(&order.id)
            .bind(&order.user_id)
            .bind(order.state.as_str())
            .bind(order.total_cents)
            .bind(&order.idempotency_key)
            .bind(order.version)
            .bind(order.created_at)
            .bind(order.updated_at)
            .execute(&mut *tx)
            .await?;
            for (line, item) in order.items.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO order_items (order_id, line, deal_id, product_id, quantity, \
                     unit_price_cents, reservation_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&order.id)
                .bind(i64::try_from(line).unwrap_or(i64::MAX))
                .bind(&item.deal_id)
                .bind(&item.product_id)
                .bind(i64::from(item.quantity))
                .bind(item.unit_price_cents)
                .bind(&item.reservation_id)
                .execute(&mut *tx)
                .await?;
            }
            insert_event(&mut tx, event).await?;
            db::commit(tx).await?;
            Ok(true)
        })
        .await
    }

    /// Claims whose holder outlived its lease (a crash between reserving and
    /// committing): each is deleted and its reservation queued for release,
    /// atomically. Returns how many were swept.
    pub async fn sweep_expired_claims(&self, now: i64, limit: i64) -> Result<u64, sqlx::Error> {
        let expired: Vec<(String,)> = sqlx::query_as(
            "SELECT reservation_id FROM idempotency_keys \
             WHERE state = 'in_progress' AND lease_until < $1 LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut swept = 0;
        for (reservation_id,) in expired {
            let mut tx = db::begin(&self.pool).await?;
            let deleted = sqlx::query(
                "DELETE FROM idempotency_keys \
                 WHERE reservation_id = $1 AND state = 'in_progress' AND lease_until < $2",
            )
            .bind(&reservation_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if deleted.rows_affected() == 1 {
                queue_release(&mut tx, &reservation_id, now).await?;
                swept += 1;
            }
            db::commit(tx).await?;
        }
        Ok(swept)
    }

    /// Forgets keys past their expiry, and published events as old.
    pub async fn sweep_expired_keys(
        &self,
        now: i64,
        events_before: i64,
    ) -> Result<u64, sqlx::Error> {
        let keys = sqlx::query(
            "DELETE FROM idempotency_keys WHERE expires_at <= $1 AND state <> 'in_progress'",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < $1")
            .bind(events_before)
            .execute(&self.pool)
            .await?;
        Ok(keys.rows_affected())
    }

    // ---- stock releases ----------------------------------------------------

    /// Reservations due for another release attempt.
    pub async fn due_releases(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT reservation_id, attempts FROM stock_releases WHERE next_at <= $1 \
             ORDER BY next_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn release_done(&self, reservation_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM stock_releases WHERE reservation_id = $1")
            .bind(reservation_id)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    pub async fn release_failed(
        &self,
        reservation_id: &str,
        next_at: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE stock_releases SET attempts = attempts + 1, next_at = $1 \
             WHERE reservation_id = $2",
        )
        .bind(next_at)
        .bind(reservation_id)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    // ---- orders ------------------------------------------------------------

    pub async fn order(&self, id: &str) -> Result<Option<Order>, sqlx::Error> {
        telemetry::db("order.order", async {
            let rows: Vec<OrderRow> =
                sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await?;
            let items = self.items_of(&rows).await?;
            Ok(assemble(rows, items)?.pop())
        })
        .await
    }

    /// The user's orders newest first, after `before` (an order id), in any
    /// of `states` (empty: all): two queries whatever the page size.
    pub async fn orders_of(
        &self,
        user_id: &str,
        states: &[OrderState],
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Order>, sqlx::Error> {
        telemetry::db("order.orders_of", async {
            let mut sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1");
            let mut next = 2;
            if before.is_some() {
                sql.push_str(&format!(" AND id < ${next}"));
                next += 1;
            }
            if !states.is_empty() {
                sql.push_str(&format!(
                    " AND state IN ({})",
                    placeholders(next, states.len())
                ));
                next += states.len();
            }
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ${next}"));
            let mut query = sqlx::query_as::<_, OrderRow>(&sql).bind(user_id);
            if let Some(before) = before {
                query = query.bind(before);
            }
            for state in states {
                query = query.bind(state.as_str());
            }
            let rows = query.bind(limit).fetch_all(&self.pool).await?;
            let items = self.items_of(&rows).await?;
            assemble(rows, items)
        })
        .await
    }

    async fn items_of(&self, rows: &[OrderRow]) -> Result<Vec<ItemRow>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {ITEM_COLUMNS} FROM order_items WHERE order_id IN ({}) ORDER BY order_id, line",
            placeholders(1, rows.len())
        );
        let mut query = sqlx::query_as::<_, ItemRow>(&sql);
        for row in rows {
            query = query.bind(&row.id);
        }
        query.fetch_all(&self.pool).await
    }

    /// Cancels the user's confirmed order: the state change, its event
    /// (built by `event` from the cancelled order) and the release of its
    /// reservations, in one transaction. `None` when the order is not the
    /// user's confirmed order (unknown, someone else's, already cancelled).
    pub async fn cancel(
        &self,
        order_id: &str,
        user_id: &str,
        now: i64,
        event: impl FnOnce(&Order) -> OutboxRow,
    ) -> Result<Option<Order>, sqlx::Error> {
        telemetry::db("order.cancel", async {
            let mut tx = db::begin(&self.pool).await?;
            let updated = sqlx::query(
                "UPDATE orders SET state = 'cancelled', version = version + 1, updated_at = $1 \
                 WHERE id = $2 AND user_id = $3 AND state = 'confirmed'",
            )
            .bind(now)
            .bind(order_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() != 1 {
                return Ok(None);
            }
            let rows: Vec<OrderRow> =
                sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
                    .bind(order_id)
                    .fetch_all(&mut *tx)
                    .await?;
            let items: Vec<ItemRow> = sqlx::query_as(&format!(
                "SELECT {ITEM_COLUMNS} FROM order_items WHERE order_id = $1 ORDER BY line"
            ))
            .bind(order_id)
            .fetch_all(&mut *tx)
            .await?;
            let Some(order) = assemble(rows, items)?.pop() else {
                return Ok(None);
            };
            for item in &order.items {
                queue_release(&mut tx, &item.reservation_id, now).await?;
            }
            insert_event(&mut tx, &event(&order)).await?;
            db::commit(tx).await?;
            Ok(Some(order))
        })
        .await
    }

    // ---- outbox ------------------------------------------------------------

    /// Hands the oldest unpublished events to `publish` and marks them
    /// published once it succeeds. Only the head of each order's queue is
    /// eligible, so an order's events leave in version order. On PostgreSQL
    /// the rows stay locked (`FOR UPDATE SKIP LOCKED`) until marked, so
    /// relay replicas never publish the same row concurrently, and a crashed
    /// relay's rows unlock with its connection. SQLite (embedded) has one
    /// relay, in-process.
    pub async fn relay_batch<F, Fut, E>(
        &self,
        limit: i64,
        now: i64,
        publish: F,
    ) -> Result<usize, RelayError<E>>
    where
        F: FnOnce(Vec<OutboxRow>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let mut sql = String::from(
            "SELECT o.event_id, o.order_id, o.version, o.kind, o.payload, o.traceparent, \
             o.created_at FROM outbox o WHERE o.published_at IS NULL AND NOT EXISTS (\
             SELECT 1 FROM outbox e WHERE e.order_id = o.order_id \
             AND e.published_at IS NULL AND e.version < o.version) \
             ORDER BY o.created_at, o.event_id LIMIT $1",
        );
        if self.backend == Backend::Postgres {
            sql.push_str(" FOR UPDATE SKIP LOCKED");
        }
        let mut tx = match self.backend {
            Backend::Postgres => Some(db::begin(&self.pool).await?),
            Backend::Sqlite => None,
        };
        let query = sqlx::query_as::<_, OutboxRecord>(&sql).bind(limit);
        let records = match tx.as_mut() {
            Some(tx) => query.fetch_all(&mut **tx).await?,
            None => query.fetch_all(&self.pool).await?,
        };
        if records.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = records.iter().map(|r| r.event_id.clone()).collect();
        let rows = records
            .into_iter()
            .map(|r| OutboxRow {
                event_id: r.event_id,
                order_id: r.order_id,
                version: r.version,
                kind: r.kind,
                payload: r.payload,
                traceparent: r.traceparent,
                created_at: r.created_at,
            })
            .collect();
        publish(rows).await.map_err(RelayError::Publish)?;
        let mark = format!(
            "UPDATE outbox SET published_at = $1 WHERE event_id IN ({})",
            placeholders(2, ids.len())
        );
        let mut update = sqlx::query(&mark).bind(now);
        for id in &ids {
            update = update.bind(id);
        }
        match tx {
            Some(mut tx) => {
                update.execute(&mut *tx).await?;
                db::commit(tx).await?;
            }
            None => {
                update.execute(&self.pool).await?;
            }
        }
        Ok(ids.len())
    }

    /// Unpublished events, for tests and the README's "nothing lost" checks.
    pub async fn unpublished_events(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await
    }

    /// Unpublished outbox rows and when the oldest was written (ms), for the
    /// relay's lag.
    pub async fn outbox_backlog(&self) -> Result<(i64, Option<i64>), sqlx::Error> {
        sqlx::query_as("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await
    }

    /// Events dead-lettered in process (embedded mode).
    pub async fn dead_letter_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters")
            .fetch_one(&self.pool)
            .await
    }

    // ---- read models -------------------------------------------------------

    /// Records `state` at `version` for the order unless a later version is
    /// already recorded; `true` when this changed the projection.
    pub async fn project_status(
        &self,
        order_id: &str,
        state: OrderState,
        version: i64,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        telemetry::db("order.project_status", async {
            let changed = sqlx::query(
                "INSERT INTO order_status (order_id, state, version, updated_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO UPDATE \
                 SET state = excluded.state, version = excluded.version, updated_at = excluded.updated_at \
                 WHERE order_status.version < excluded.version",
            )
            .bind(order_id)
            .bind(state.as_str())
            .bind(version)
            .bind(now)
            .execute(&self.pool)
            .await?;
            Ok(changed.rows_affected() == 1)
        })
        .await
    }

    /// Applies `deltas` once per (`consumer`, `event_id`): the dedupe record
    /// and the counters commit together. `false` for a duplicate.
    pub async fn count_sales(
        &self,
        consumer: &str,
        event_id: &str,
        deltas: &[SalesDelta],
        occurred_at: i64,
    ) -> Result<bool, sqlx::Error> {
        telemetry::db("order.count_sales", async {
            let mut tx = db::begin(&self.pool).await?;
            let first = sqlx::query(
                "INSERT INTO consumed_events (consumer, event_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer, event_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(event_id)
            .execute(&mut *tx)
            .await?;
            if first.rows_affected() != 1 {
                return Ok(false);
            }
            for delta in deltas {
                sqlx::query(
                    "INSERT INTO deal_sales (deal_id, units_sold, orders_confirmed, orders_cancelled, \
                     updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (deal_id) DO UPDATE SET \
                     units_sold = deal_sales.units_sold + excluded.units_sold, \
                     orders_confirmed = deal_sales.orders_confirmed + excluded.orders_confirmed, \
                     orders_cancelled = deal_sales.orders_cancelled + excluded.orders_cancelled, \
                     updated_at = CASE WHEN excluded.updated_at > deal_sales.updated_at \
                     THEN excluded.updated_at ELSE deal_sales.updated_at END",
                )
                .bind(&delta.deal_id)
                .bind(delta.units_sold)
                .bind(delta.orders_confirmed)
                .bind(delta.orders_cancelled)
                .bind(occurred_at)
                .execute(&mut *tx)
                .await?;
            }
            db::commit(tx).await?;
            Ok(true)
        })
        .await
    }

    pub async fn deal_sales(&self, deal_id: &str) -> Result<DealSales, sqlx::Error> {
        telemetry::db("order.deal_sales", async {
            let row: Option<SalesRow> = sqlx::query_as(
                "SELECT deal_id, units_sold, orders_confirmed, orders_cancelled, updated_at \
                 FROM deal_sales WHERE deal_id = $1",
            )
            .bind(deal_id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map_or_else(
                || DealSales {
                    deal_id: deal_id.to_owned(),
                    ..DealSales::default()
                },
                |row| DealSales {
                    deal_id: row.deal_id,
                    units_sold: row.units_sold,
                    orders_confirmed: row.orders_confirmed,
                    orders_cancelled: row.orders_cancelled,
                    updated_at: Some(row.updated_at),
                },
            ))
        })
        .await
    }

    /// Records an event no consumer could apply (embedded mode).
    pub async fn dead_letter(
        &self,
        consumer: &str,
        event_id: &str,
        reason: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<(), sqlx::Error> {
        telemetry::db("order.dead_letter", async {
            sqlx::query(
                "INSERT INTO dead_letters (event_id, consumer, reason, payload, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, event_id) DO NOTHING",
            )
            .bind(event_id)
            .bind(consumer)
            .bind(reason)
            .bind(payload)
            .bind(now)
            .execute(&self.pool)
            .await
            .map(drop)
        })
        .await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError<E> {
    #[error("storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("publishing failed: {0}")]
    Publish(E),
}

async fn queue_release(
    tx: &mut Transaction<'_, Any>,
    reservation_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock_releases (reservation_id, attempts, next_at, created_at) \
         VALUES ($1, 0, $2, $2) ON CONFLICT (reservation_id) DO NOTHING",
    )
    .bind(reservation_id)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map(drop)
}

async fn insert_event(tx: &mut Transaction<'_, Any>, event: &OutboxRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (event_id, order_id, version, kind, payload, traceparent, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&event.event_id)
    .bind(&event.order_id)
    .bind(event.version)
    .bind(&event.kind)
    .bind(&event.payload)
    .bind(&event.traceparent)
    .bind(event.created_at)
    .execute(&mut **tx)
    .await
    .map(drop)
}
