//! The consumers of order events. Both are idempotent, as at-least-once
//! delivery requires: the projector by version, the counter by event id.

use std::sync::Arc;

use async_trait::async_trait;
use flashmesh_platform::{
    pubsub::Bus,
    streams::{EventHandler, StreamEvent},
};
use prost::Message;

use crate::{
    domain::SalesDelta, events::decode, service::now_ms, storage::OrderStore, wire::change_message,
};

type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The bus channel on which an order's status changes reach WatchOrder
/// streams in every replica.
pub fn status_channel(order_id: &str) -> String {
    format!("order-status:{order_id}")
}

/// Keeps each order's latest status and tells watchers about changes.
pub struct StatusProjector {
    store: Arc<OrderStore>,
    bus: Arc<dyn Bus>,
}

impl StatusProjector {
    pub const GROUP: &'static str = "order-status-projector";

    pub fn new(store: Arc<OrderStore>, bus: Arc<dyn Bus>) -> Self {
        Self { store, bus }
    }
}

#[async_trait]
impl EventHandler for StatusProjector {
    async fn handle(&self, event: &StreamEvent) -> Result<(), HandlerError> {
        let change = decode(event)?;
        let order = &change.order;
        let changed = self
            .store
            .project_status(&order.id, order.state, order.version, now_ms())
            .await?;
        if changed {
            // At most once, like the bus: a watcher that misses it reads the
            // order again when it reconnects.
            if let Err(e) = self
                .bus
                .publish(
                    &status_channel(&order.id),
                    &change_message(&change).encode_to_vec(),
                )
                .await
            {
                tracing::warn!(error = %e, order_id = %order.id, "order status not broadcast");
            }
        }
        Ok(())
    }
}

/// Per-deal sales counters.
pub struct SalesCounter {
    store: Arc<OrderStore>,
}

impl SalesCounter {
    pub const GROUP: &'static str = "deal-sales-counter";

    pub fn new(store: Arc<OrderStore>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl EventHandler for SalesCounter {
    async fn handle(&self, event: &StreamEvent) -> Result<(), HandlerError> {
        let change = decode(event)?;
        self.store
            .count_sales(
                Self::GROUP,
                &event.event_id,
                &SalesDelta::of(&change),
                change.occurred_at,
            )
            .await?;
        Ok(())
    }
}
