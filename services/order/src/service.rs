//! The order use cases. PlaceOrder is a saga across two services:
//!
//! 1. claim the idempotency key (one atomic insert) with the ids this attempt
//!    will use;
//! 2. reserve the units in the catalog under that reservation id;
//! 3. commit the order, its items and its event, completing the claim, in one
//!    transaction.
//!
//! Whatever fails after step 2 may have taken stock, so it queues the
//! reservation for release in the same transaction that gives the key back
//! (compensation); a crash between 2 and 3 leaves a claim whose lease runs
//! out, and the sweeper does the same for it. The catalog's release is
//! idempotent and tombstones ids it never saw, so stock is returned exactly
//! once and an in-flight reservation can never take stock afterwards.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use flashmesh_platform::{
    identity::{Caller, Role},
    paging::{PageTokens, page_size},
    pubsub::{Bus, Delivery},
};
use flashmesh_proto::order::v1 as pb;
use futures::Stream;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    catalog::{CatalogCallError, CatalogClient},
    config::OrderConfig,
    consumers::status_channel,
    domain::{DealSales, Order, OrderChange, OrderItem, OrderState, PlaceOrder, Refusal, parse_id},
    error::OrderError,
    events::outbox_row,
    storage::{Claim, ClaimOutcome, ClaimState, OrderStore},
    wire::snapshot_message,
};

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Time kept back from the caller's deadline for committing the order.
const COMMIT_MARGIN: Duration = Duration::from_millis(50);
/// How long a compensation or cancellation may wait on the catalog before
/// leaving the release to the sweeper.
const RELEASE_DEADLINE: Duration = Duration::from_secs(2);

/// One page of orders and the token for the next.
pub struct OrderPage {
    pub orders: Vec<Order>,
    pub next_page_token: String,
}

#[derive(Serialize, Deserialize)]
struct OrderCursor {
    before: String,
}

pub struct OrderService {
    store: Arc<OrderStore>,
    catalog: CatalogClient,
    bus: Arc<dyn Bus>,
    pages: PageTokens,
    config: OrderConfig,
    relay_wake: Arc<Notify>,
    products: moka::future::Cache<String, String>,
}

impl OrderService {
    pub fn new(
        store: Arc<OrderStore>,
        catalog: CatalogClient,
        bus: Arc<dyn Bus>,
        pages: PageTokens,
        config: OrderConfig,
        relay_wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            catalog,
            bus,
            pages,
            config,
            relay_wake,
            products: moka::future::Cache::new(100_000),
        }
    }

    pub fn store(&self) -> &Arc<OrderStore> {
        &self.store
    }

    pub fn bus(&self) -> Arc<dyn Bus> {
        self.bus.clone()
    }

    pub async fn place(
        &self,
        caller: &Caller,
        request: PlaceOrder,
        deadline: Instant,
        traceparent: &str,
    ) -> Result<Order, OrderError> {
        let now = now_ms();
        let claim = Claim {
            user_id: caller.user_id.clone(),
            key: request.idempotency_key.clone(),
            fingerprint: request.fingerprint(),
            order_id: uuid::Uuid::now_v7().to_string(),
            reservation_id: uuid::Uuid::now_v7().to_string(),
        };
        let claimed = self
            .store
            .claim(
                &claim,
                now + millis(self.config.claim_lease),
                now + millis(self.config.idempotency_ttl),
                now,
            )
            .await?;
        if let ClaimOutcome::Existing(existing) = claimed {
            return self.replay(&claim, existing.claim, existing.state).await;
        }

        let catalog_deadline = deadline.checked_sub(COMMIT_MARGIN).unwrap_or(deadline);
        let product_id = match self.product_of(&request.deal_id, catalog_deadline).await {
            Ok(product_id) => product_id,
            // Nothing was reserved yet, so nothing needs compensating.
            Err(e) => return Err(self.fail(&claim, e, false).await),
        };
        let reserved = match self
            .catalog
            .reserve(
                &request.deal_id,
                &caller.user_id,
                request.quantity,
                &claim.reservation_id,
                catalog_deadline,
            )
            .await
        {
            Ok(reserved) => reserved,
            Err(e) => return Err(self.fail(&claim, e, true).await),
        };

        let order = Order::confirmed(
            claim.order_id.clone(),
            caller.user_id.clone(),
            request.idempotency_key.clone(),
            OrderItem {
                deal_id: request.deal_id.clone(),
                product_id,
                quantity: request.quantity,
                unit_price_cents: reserved.unit_price_cents,
                reservation_id: claim.reservation_id.clone(),
            },
            now_ms(),
        );
        let event = outbox_row(
            &OrderChange {
                order: order.clone(),
                previous: None,
                occurred_at: order.created_at,
            },
            traceparent,
        );
        match self.store.commit_order(&claim, &order, &event).await {
            Ok(true) => {
                self.relay_wake.notify_one();
                Ok(order)
            }
            // The claim outlived its lease and was swept, which queued the
            // release; this attempt is void.
            Ok(false) => {
                self.release_soon(claim.reservation_id.clone());
                Err(OrderError::RequestInProgress)
            }
            Err(e) => {
                self.give_up(&claim, true).await;
                Err(e.into())
            }
        }
    }

    /// The answer for a key claimed before.
    async fn replay(
        &self,
        ours: &Claim,
        theirs: Claim,
        state: ClaimState,
    ) -> Result<Order, OrderError> {
        if theirs.fingerprint != ours.fingerprint {
            return Err(OrderError::IdempotencyKeyReused);
        }
        match state {
            ClaimState::InProgress => Err(OrderError::RequestInProgress),
            ClaimState::Completed => self
                .store
                .order(&theirs.order_id)
                .await?
                .ok_or(OrderError::RequestInProgress),
            ClaimState::Refused(stored) => {
                let refusal: Refusal = serde_json::from_str(&stored)
                    .map_err(|e| OrderError::Storage(sqlx::Error::Decode(Box::new(e))))?;
                Err(OrderError::Refused(refusal))
            }
        }
    }

    async fn product_of(
        &self,
        deal_id: &str,
        deadline: Instant,
    ) -> Result<String, CatalogCallError> {
        self.products
            .try_get_with(
                deal_id.to_owned(),
                self.catalog.product_of(deal_id, deadline),
            )
            .await
            .map_err(|shared| {
                Arc::try_unwrap(shared).unwrap_or_else(|shared| match shared.as_ref() {
                    CatalogCallError::Refused(refusal) => {
                        CatalogCallError::Refused(refusal.clone())
                    }
                    CatalogCallError::BreakerOpen => CatalogCallError::BreakerOpen,
                    CatalogCallError::DeadlineExceeded => CatalogCallError::DeadlineExceeded,
                    CatalogCallError::Superseded => CatalogCallError::Superseded,
                    other => CatalogCallError::NoAnswer(other.to_string()),
                })
            })
    }

    /// Settles the claim after a failed catalog call and says what the
    /// caller hears. `may_hold_stock`: the call could have taken units.
    async fn fail(
        &self,
        claim: &Claim,
        error: CatalogCallError,
        may_hold_stock: bool,
    ) -> OrderError {
        match error {
            CatalogCallError::Refused(refusal) => {
                let stored = serde_json::to_string(&refusal).unwrap_or_default();
                if let Err(e) = self.store.refuse(claim, &stored).await {
                    return e.into();
                }
                OrderError::Refused(refusal)
            }
            CatalogCallError::BreakerOpen => {
                self.give_up(claim, false).await;
                OrderError::CatalogUnavailable {
                    detail: "circuit breaker open".to_owned(),
                    breaker_open: true,
                }
            }
            CatalogCallError::NoAnswer(detail) => {
                self.give_up(claim, may_hold_stock).await;
                OrderError::CatalogUnavailable {
                    detail,
                    breaker_open: false,
                }
            }
            CatalogCallError::DeadlineExceeded => {
                self.give_up(claim, may_hold_stock).await;
                OrderError::DeadlineExceeded
            }
            CatalogCallError::Superseded => OrderError::RequestInProgress,
            CatalogCallError::Unexpected(status) => {
                self.give_up(claim, may_hold_stock).await;
                OrderError::Catalog(status)
            }
        }
    }

    /// Frees the key for a retry; with `release`, queues the reservation's
    /// release in the same transaction and tries it at once.
    async fn give_up(&self, claim: &Claim, release: bool) {
        match self.store.abandon(claim, release, now_ms()).await {
            Ok(()) if release => self.release_soon(claim.reservation_id.clone()),
            Ok(()) => {}
            // The claim stays in progress; the sweeper releases it when its
            // lease runs out.
            Err(e) => tracing::warn!(error = %e, "claim not given back; the sweeper will"),
        }
    }

    /// Tries a queued release now, off the caller's path; the sweeper retries
    /// whatever fails.
    fn release_soon(&self, reservation_id: String) {
        let catalog = self.catalog.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            release_queued(&catalog, &store, &reservation_id).await;
        });
    }

    pub async fn order(&self, caller: &Caller, id: &str) -> Result<Order, OrderError> {
        let id = parse_id("id", id).map_err(|v| OrderError::InvalidInput(vec![v]))?;
        self.store
            .order(&id)
            .await?
            .filter(|order| order.user_id == caller.user_id)
            .ok_or(OrderError::OrderNotFound)
    }

    pub async fn orders(
        &self,
        caller: &Caller,
        states: &[OrderState],
        requested_page_size: i32,
        page_token: &str,
    ) -> Result<OrderPage, OrderError> {
        let size = page_size(requested_page_size).map_err(|v| OrderError::InvalidInput(vec![v]))?;
        let mut names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let query = format!("orders?user={}&states={}", caller.user_id, names.join(","));
        let cursor: Option<OrderCursor> = if page_token.is_empty() {
            None
        } else {
            Some(
                self.pages
                    .decode(&query, page_token)
                    .map_err(|v| OrderError::InvalidInput(vec![v]))?,
            )
        };
        let mut orders = self
            .store
            .orders_of(
                &caller.user_id,
                states,
                cursor.as_ref().map(|c| c.before.as_str()),
                i64::from(size) + 1,
            )
            .await?;
        let next_page_token = if orders.len() > usize::try_from(size).unwrap_or(usize::MAX) {
            orders.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            orders
                .last()
                .map(|last| {
                    self.pages.encode(
                        &query,
                        &OrderCursor {
                            before: last.id.clone(),
                        },
                    )
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(OrderPage {
            orders,
            next_page_token,
        })
    }

    pub async fn cancel(
        &self,
        caller: &Caller,
        id: &str,
        traceparent: &str,
    ) -> Result<Order, OrderError> {
        let id = parse_id("id", id).map_err(|v| OrderError::InvalidInput(vec![v]))?;
        let now = now_ms();
        let cancelled = self
            .store
            .cancel(&id, &caller.user_id, now, |order| {
                outbox_row(
                    &OrderChange {
                        order: order.clone(),
                        previous: Some(OrderState::Confirmed),
                        occurred_at: now,
                    },
                    traceparent,
                )
            })
            .await?;
        let Some(order) = cancelled else {
            // Not this user's confirmed order: already cancelled (answer it
            // unchanged), or not theirs at all.
            return self.order(caller, &id).await;
        };
        self.relay_wake.notify_one();
        for item in &order.items {
            release_queued(&self.catalog, &self.store, &item.reservation_id).await;
        }
        Ok(order)
    }

    /// The order's snapshot, then its changes, until it is final.
    pub async fn watch(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<impl Stream<Item = pb::OrderEvent> + Send + 'static, OrderError> {
        let id = parse_id("id", id).map_err(|v| OrderError::InvalidInput(vec![v]))?;
        // Subscribe first, so no change between the snapshot and the
        // subscription goes unseen.
        let mut changes = self.bus.subscribe(&status_channel(&id)).await;
        let order = self.order(caller, &id).await?;
        let store = self.store.clone();
        Ok(async_stream::stream! {
            let mut sequence = order.version;
            let mut done = order.state.is_final();
            yield snapshot_message(&order, now_ms());
            while !done {
                let event = match changes.recv().await {
                    None => break,
                    Some(Delivery::Message(payload)) => match pb::OrderEvent::decode(&*payload) {
                        Ok(event) => event,
                        Err(_) => continue,
                    },
                    // Updates may have been lost: read the order again.
                    Some(Delivery::Missed) => match store.order(&order.id).await {
                        Ok(Some(current)) if current.version > sequence => {
                            snapshot_message(&current, now_ms())
                        }
                        _ => continue,
                    },
                };
                if event.sequence <= sequence {
                    continue;
                }
                sequence = event.sequence;
                done = event
                    .order
                    .as_ref()
                    .is_some_and(|o| o.state() == pb::OrderState::Cancelled);
                yield event;
            }
        })
    }

    pub async fn deal_sales(
        &self,
        caller: &Caller,
        deal_id: &str,
    ) -> Result<DealSales, OrderError> {
        if caller.role != Role::Admin {
            return Err(OrderError::AdminRequired);
        }
        let deal_id =
            parse_id("deal_id", deal_id).map_err(|v| OrderError::InvalidInput(vec![v]))?;
        Ok(self.store.deal_sales(&deal_id).await?)
    }

    /// One round of background repair: claims whose holder died, releases
    /// the catalog has not confirmed yet, keys past their expiry.
    pub async fn sweep(&self) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let swept = self.store.sweep_expired_claims(now, 500).await?;
        if swept > 0 {
            tracing::warn!(swept, "released reservations of abandoned order attempts");
        }
        for (reservation_id, attempts) in self.store.due_releases(now, 500).await? {
            if !release_queued(&self.catalog, &self.store, &reservation_id).await {
                let backoff = 1_000_i64.saturating_mul(1 << attempts.clamp(0, 6));
                self.store
                    .release_failed(&reservation_id, now_ms() + backoff)
                    .await?;
            }
        }
        let ttl = millis(self.config.idempotency_ttl);
        self.store.sweep_expired_keys(now, now - ttl).await?;
        Ok(())
    }
}

/// Releases a queued reservation and, once the catalog confirms, dequeues
/// it. `false` when the catalog could not be reached.
async fn release_queued(catalog: &CatalogClient, store: &OrderStore, reservation_id: &str) -> bool {
    match catalog
        .release(reservation_id, Instant::now() + RELEASE_DEADLINE)
        .await
    {
        Ok(_) => {
            if let Err(e) = store.release_done(reservation_id).await {
                tracing::warn!(error = %e, reservation_id, "release done but not dequeued; it will repeat harmlessly");
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, reservation_id, "stock release failed; will retry");
            false
        }
    }
}
