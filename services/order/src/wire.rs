//! Domain ↔ protobuf, in one place: the gRPC answers and the order events on
//! the stream use the same messages.

use flashmesh_platform::time::{millis_from_timestamp, timestamp_from_millis};
use flashmesh_proto::order::v1 as pb;

use crate::domain::{DealSales, Order, OrderChange, OrderItem, OrderState};

pub fn state_message(state: OrderState) -> pb::OrderState {
    match state {
        OrderState::Confirmed => pb::OrderState::Confirmed,
        OrderState::Cancelled => pb::OrderState::Cancelled,
    }
}

pub fn state_from_message(state: pb::OrderState) -> Option<OrderState> {
    match state {
        pb::OrderState::Confirmed => Some(OrderState::Confirmed),
        pb::OrderState::Cancelled => Some(OrderState::Cancelled),
        pb::OrderState::Unspecified => None,
    }
}

pub fn order_message(order: &Order) -> pb::Order {
    pb::Order {
        id: order.id.clone(),
        user_id: order.user_id.clone(),
        state: state_message(order.state).into(),
        items: order
            .items
            .iter()
            .map(|item| pb::OrderItem {
                deal_id: item.deal_id.clone(),
                product_id: item.product_id.clone(),
                quantity: item.quantity,
                unit_price_cents: item.unit_price_cents,
                reservation_id: item.reservation_id.clone(),
            })
            .collect(),
        total_cents: order.total_cents,
        idempotency_key: order.idempotency_key.clone(),
        created_at: Some(timestamp_from_millis(order.created_at)),
        updated_at: Some(timestamp_from_millis(order.updated_at)),
    }
}

fn order_from_message(order: pb::Order, version: i64) -> Option<Order> {
    Some(Order {
        state: state_from_message(order.state())?,
        id: order.id,
        user_id: order.user_id,
        items: order
            .items
            .into_iter()
            .map(|item| OrderItem {
                deal_id: item.deal_id,
                product_id: item.product_id,
                quantity: item.quantity,
                unit_price_cents: item.unit_price_cents,
                reservation_id: item.reservation_id,
            })
            .collect(),
        total_cents: order.total_cents,
        idempotency_key: order.idempotency_key,
        version,
        created_at: order.created_at.as_ref().map_or(0, millis_from_timestamp),
        updated_at: order.updated_at.as_ref().map_or(0, millis_from_timestamp),
    })
}

/// The message for `order` as it is now (a WatchOrder snapshot).
pub fn snapshot_message(order: &Order, now: i64) -> pb::OrderEvent {
    pb::OrderEvent {
        order: Some(order_message(order)),
        r#type: pb::OrderEventType::Snapshot.into(),
        sequence: order.version,
        occurred_at: Some(timestamp_from_millis(now)),
        previous_state: pb::OrderState::Unspecified.into(),
    }
}

/// The message for one change: a stream event's payload and a WatchOrder
/// update.
pub fn change_message(change: &OrderChange) -> pb::OrderEvent {
    pb::OrderEvent {
        order: Some(order_message(&change.order)),
        r#type: pb::OrderEventType::StateChanged.into(),
        sequence: change.order.version,
        occurred_at: Some(timestamp_from_millis(change.occurred_at)),
        previous_state: change
            .previous
            .map_or(pb::OrderState::Unspecified, state_message)
            .into(),
    }
}

pub fn change_from_message(event: pb::OrderEvent) -> Option<OrderChange> {
    let previous = match event.previous_state() {
        pb::OrderState::Unspecified => None,
        state => Some(state_from_message(state)?),
    };
    Some(OrderChange {
        occurred_at: event.occurred_at.as_ref().map_or(0, millis_from_timestamp),
        order: order_from_message(event.order?, event.sequence)?,
        previous,
    })
}

pub fn sales_message(sales: DealSales) -> pb::DealSales {
    pb::DealSales {
        deal_id: sales.deal_id,
        units_sold: sales.units_sold,
        orders_confirmed: sales.orders_confirmed,
        orders_cancelled: sales.orders_cancelled,
        updated_at: sales.updated_at.map(timestamp_from_millis),
    }
}
