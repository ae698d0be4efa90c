//! Orders and their rules: plain types, no I/O.

use std::collections::BTreeMap;

use flashmesh_platform::error::FieldViolation;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderState {
    /// The units are held for the buyer.
    Confirmed,
    /// Given back by the buyer. Final.
    Cancelled,
}

impl OrderState {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "confirmed" => Some(Self::Confirmed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }

    /// The contract's name, for error metadata.
    pub fn name(self) -> &'static str {
        match self {
            Self::Confirmed => "ORDER_STATE_CONFIRMED",
            Self::Cancelled => "ORDER_STATE_CANCELLED",
        }
    }

    /// No further change can happen.
    pub fn is_final(self) -> bool {
        self == Self::Cancelled
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderItem {
    pub deal_id: String,
    pub product_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub reservation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub state: OrderState,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub idempotency_key: String,
    /// 1 at creation, one more per change.
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Order {
    /// A confirmed order for units the catalog has reserved.
    pub fn confirmed(
        id: String,
        user_id: String,
        idempotency_key: String,
        item: OrderItem,
        now: i64,
    ) -> Self {
        Self {
            id,
            user_id,
            state: OrderState::Confirmed,
            total_cents: item.unit_price_cents * i64::from(item.quantity),
            items: vec![item],
            idempotency_key,
            version: 1,
            created_at: now,
            updated_at: now,
        }
    }
}

/// One change to an order: what the outbox records and consumers apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderChange {
    pub order: Order,
    /// `None` for the order's creation.
    pub previous: Option<OrderState>,
    pub occurred_at: i64,
}

/// A validated PlaceOrder request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrder {
    pub deal_id: String,
    pub quantity: i32,
    pub idempotency_key: String,
}

impl PlaceOrder {
    pub fn parse(
        deal_id: &str,
        quantity: i32,
        idempotency_key: &str,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if let Err(v) = parse_id("deal_id", deal_id) {
            violations.push(v);
        }
        if quantity < 1 {
            violations.push(FieldViolation::new("quantity", "must be at least 1"));
        }
        if idempotency_key.is_empty() {
            violations.push(FieldViolation::new(
                "idempotency_key",
                "is required: generate one per purchase attempt and reuse it on retries",
            ));
        } else if idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !idempotency_key.bytes().all(|b| b.is_ascii_graphic())
        {
            violations.push(FieldViolation::new(
                "idempotency_key",
                format!("must be 1..{MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"),
            ));
        }
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(Self {
            deal_id: deal_id.to_ascii_lowercase(),
            quantity,
            idempotency_key: idempotency_key.to_owned(),
        })
    }

    /// What a retry under the same key must repeat exactly.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(format!("{}\n{}", self.deal_id, self.quantity));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `value` as a canonical UUID string, or a violation naming `field`.
pub fn parse_id(field: &'static str, value: &str) -> Result<String, FieldViolation> {
    uuid::Uuid::parse_str(value)
        .map(|id| id.to_string())
        .map_err(|_| FieldViolation::new(field, "must be a UUID"))
}

/// Why the catalog turned a purchase down. Remembered under the idempotency
/// key, so a retry gets the same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    DealNotFound,
    DealNotActive,
    SoldOut,
    LimitExceeded,
}

impl RefusalKind {
    /// The catalog's ErrorInfo reason, which PlaceOrder passes through.
    pub fn reason(self) -> &'static str {
        match self {
            Self::DealNotFound => "DEAL_NOT_FOUND",
            Self::DealNotActive => "DEAL_NOT_ACTIVE",
            Self::SoldOut => "SOLD_OUT",
            Self::LimitExceeded => "LIMIT_EXCEEDED",
        }
    }

    pub fn from_reason(reason: &str) -> Option<Self> {
        [
            Self::DealNotFound,
            Self::DealNotActive,
            Self::SoldOut,
            Self::LimitExceeded,
        ]
        .into_iter()
        .find(|kind| kind.reason() == reason)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
    pub metadata: BTreeMap<String, String>,
}

/// A deal's sales counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DealSales {
    pub deal_id: String,
    pub units_sold: i64,
    pub orders_confirmed: i64,
    pub orders_cancelled: i64,
    pub updated_at: Option<i64>,
}

/// What one order change adds to one deal's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalesDelta {
    pub deal_id: String,
    pub units_sold: i64,
    pub orders_confirmed: i64,
    pub orders_cancelled: i64,
}

impl SalesDelta {
    /// The counters `change` moves, one delta per deal in the order.
    pub fn of(change: &OrderChange) -> Vec<SalesDelta> {
        let (units_sign, confirmed, cancelled) = match (change.previous, change.order.state) {
            (None, OrderState::Confirmed) => (1, 1, 0),
            (Some(OrderState::Confirmed), OrderState::Cancelled) => (-1, 0, 1),
            _ => return Vec::new(),
        };
        change
            .order
            .items
            .iter()
            .map(|item| SalesDelta {
                deal_id: item.deal_id.clone(),
                units_sold: units_sign * i64::from(item.quantity),
                orders_confirmed: confirmed,
                orders_cancelled: cancelled,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAL: &str = "0190b5a0-0000-7000-8000-000000000001";

    #[test]
    fn place_order_names_every_bad_field() {
        let err = PlaceOrder::parse("nope", 0, "").unwrap_err();
        let fields: Vec<_> = err.iter().map(|v| v.field).collect();
        assert_eq!(fields, ["deal_id", "quantity", "idempotency_key"]);

        let long = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1);
        let err = PlaceOrder::parse(DEAL, 1, &long).unwrap_err();
        assert_eq!(err[0].field, "idempotency_key");
        let err = PlaceOrder::parse(DEAL, 1, "has space").unwrap_err();
        assert_eq!(err[0].field, "idempotency_key");
        assert!(PlaceOrder::parse(DEAL, 1, &"k".repeat(MAX_IDEMPOTENCY_KEY_LEN)).is_ok());
    }

    #[test]
    fn fingerprint_tells_requests_apart() {
        let a = PlaceOrder::parse(DEAL, 1, "k").unwrap();
        let b = PlaceOrder::parse(DEAL, 2, "k").unwrap();
        let upper = PlaceOrder::parse(&DEAL.to_uppercase(), 1, "other").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), upper.fingerprint());
    }

    #[test]
    fn sales_count_confirmations_and_cancellations_once() {
        let item = OrderItem {
            deal_id: DEAL.to_owned(),
            product_id: "p".to_owned(),
            quantity: 3,
            unit_price_cents: 100,
            reservation_id: "r".to_owned(),
        };
        let order = Order::confirmed("o".into(), "u".into(), "k".into(), item, 1);
        assert_eq!(order.total_cents, 300);
        let created = OrderChange {
            order: order.clone(),
            previous: None,
            occurred_at: 1,
        };
        assert_eq!(SalesDelta::of(&created)[0].units_sold, 3);
        let cancelled = OrderChange {
            order: Order {
                state: OrderState::Cancelled,
                version: 2,
                ..order
            },
            previous: Some(OrderState::Confirmed),
            occurred_at: 2,
        };
        let delta = &SalesDelta::of(&cancelled)[0];
        assert_eq!((delta.units_sold, delta.orders_cancelled), (-3, 1));
    }

    #[test]
    fn refusal_reasons_round_trip() {
        for kind in [
            RefusalKind::DealNotFound,
            RefusalKind::DealNotActive,
            RefusalKind::SoldOut,
            RefusalKind::LimitExceeded,
        ] {
            assert_eq!(RefusalKind::from_reason(kind.reason()), Some(kind));
        }
        assert_eq!(RefusalKind::from_reason("CALLER_NOT_ALLOWED"), None);
    }
}
