//! The catalog's rules as plain types: what a valid product, deal and
//! reservation request are, and what state a deal is in. No I/O here.

use flashmesh_platform::error::FieldViolation;
use serde::{Deserialize, Serialize};

use crate::error::CatalogError;

pub const NAME_MAX_CHARS: usize = 200;
pub const DESCRIPTION_MAX_CHARS: usize = 5000;
pub const IMAGE_URL_MAX_LEN: usize = 2048;
/// More units than any flash sale puts on offer; keeps sums far from overflow.
pub const STOCK_MAX: i32 = 10_000_000;
/// A price of a million currency units in cents; keeps `quantity × price` in
/// range.
pub const PRICE_MAX_CENTS: i64 = 100_000_000;
pub const USER_ID_MAX_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub description: String,
    pub image_url: Option<String>,
    pub price_cents: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A deal with the product it sells, as reads return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deal {
    pub id: String,
    pub product: ProductSummary,
    pub price_cents: i64,
    pub stock: i32,
    pub remaining_stock: i32,
    pub per_user_limit: i32,
    pub starts_at: i64,
    pub ends_at: i64,
    /// Bumped by every change to the deal's stock.
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductSummary {
    pub id: String,
    pub name: String,
    pub image_url: Option<String>,
    pub price_cents: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DealState {
    Scheduled,
    Active,
    SoldOut,
    Ended,
}

impl DealState {
    /// The state at `now` (epoch ms) for a window and remaining stock.
    pub fn at(now: i64, starts_at: i64, ends_at: i64, remaining_stock: i32) -> Self {
        if now >= ends_at {
            Self::Ended
        } else if now < starts_at {
            Self::Scheduled
        } else if remaining_stock <= 0 {
            Self::SoldOut
        } else {
            Self::Active
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Scheduled => "DEAL_STATE_SCHEDULED",
            Self::Active => "DEAL_STATE_ACTIVE",
            Self::SoldOut => "DEAL_STATE_SOLD_OUT",
            Self::Ended => "DEAL_STATE_ENDED",
        }
    }
}

impl Deal {
    pub fn state(&self, now: i64) -> DealState {
        DealState::at(now, self.starts_at, self.ends_at, self.remaining_stock)
    }

    /// Whether units can be reserved at `now` (ignoring stock).
    pub fn window_open(&self, now: i64) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

/// Collects violations so a request reports every bad field at once.
#[derive(Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn check(&mut self, ok: bool, field: &'static str, description: impl Into<String>) {
        if !ok {
            self.0.push(FieldViolation::new(field, description));
        }
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    pub fn into_result(self) -> Result<(), CatalogError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(CatalogError::InvalidInput(self.0))
        }
    }
}

/// An id that must be a UUID (ids here are UUIDv7; reservation ids any UUID).
pub fn parse_id(field: &'static str, raw: &str) -> Result<String, FieldViolation> {
    uuid::Uuid::parse_str(raw.trim())
        .map(|id| id.to_string())
        .map_err(|_| FieldViolation::new(field, "must be a UUID"))
}

pub fn check_name(v: &mut Violations, name: &str) -> String {
    let name = name.trim();
    let chars = name.chars().count();
    v.check(
        (1..=NAME_MAX_CHARS).contains(&chars),
        "name",
        format!("must be 1 to {NAME_MAX_CHARS} characters"),
    );
    name.to_owned()
}

pub fn check_description(v: &mut Violations, description: &str) -> String {
    v.check(
        description.chars().count() <= DESCRIPTION_MAX_CHARS,
        "description",
        format!("must be at most {DESCRIPTION_MAX_CHARS} characters"),
    );
    description.to_owned()
}

/// `None` for an empty URL (no image).
pub fn check_image_url(v: &mut Violations, raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let valid = raw.len() <= IMAGE_URL_MAX_LEN
        && url::Url::parse(raw).is_ok_and(|u| u.scheme() == "https" && u.host().is_some());
    v.check(
        valid,
        "image_url",
        format!("must be an absolute https URL of at most {IMAGE_URL_MAX_LEN} characters"),
    );
    Some(raw.to_owned())
}

pub fn check_price(v: &mut Violations, field: &'static str, cents: i64) {
    v.check(
        (1..=PRICE_MAX_CENTS).contains(&cents),
        field,
        format!("must be between 1 and {PRICE_MAX_CENTS} cents"),
    );
}

/// A validated new product.
pub struct NewProduct {
    pub name: String,
    pub description: String,
    pub image_url: Option<String>,
    pub price_cents: i64,
}

impl NewProduct {
    pub fn parse(
        name: &str,
        description: &str,
        image_url: Option<&str>,
        price_cents: i64,
    ) -> Result<Self, CatalogError> {
        let mut v = Violations::default();
        let product = Self {
            name: check_name(&mut v, name),
            description: check_description(&mut v, description),
            image_url: check_image_url(&mut v, image_url.unwrap_or_default()),
            price_cents,
        };
        check_price(&mut v, "price_cents", price_cents);
        v.into_result().map(|()| product)
    }
}

/// The fields an UpdateProduct writes; `None` leaves a field as it is.
#[derive(Default)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub image_url: Option<Option<String>>,
    pub price_cents: Option<i64>,
}

impl ProductPatch {
    pub fn apply(self, product: &mut Product) {
        if let Some(name) = self.name {
            product.name = name;
        }
        if let Some(description) = self.description {
            product.description = description;
        }
        if let Some(image_url) = self.image_url {
            product.image_url = image_url;
        }
        if let Some(price_cents) = self.price_cents {
            product.price_cents = price_cents;
        }
    }
}

/// A validated new deal.
pub struct NewDeal {
    pub product_id: String,
    pub price_cents: i64,
    pub stock: i32,
    pub per_user_limit: i32,
    pub starts_at: i64,
    pub ends_at: i64,
}

impl NewDeal {
    /// `starts_at`/`ends_at` are epoch ms, `None` when the field was absent.
    pub fn parse(
        product_id: &str,
        price_cents: i64,
        stock: i32,
        per_user_limit: i32,
        starts_at: Option<i64>,
        ends_at: Option<i64>,
        now: i64,
    ) -> Result<Self, CatalogError> {
        let mut v = Violations::default();
        let product_id = parse_id("product_id", product_id)
            .map_err(|e| v.push(e))
            .unwrap_or_default();
        check_price(&mut v, "price_cents", price_cents);
        v.check(
            (1..=STOCK_MAX).contains(&stock),
            "stock",
            format!("must be between 1 and {STOCK_MAX}"),
        );
        v.check(
            per_user_limit >= 1 && per_user_limit <= stock.max(1),
            "per_user_limit",
            "must be between 1 and stock",
        );
        v.check(starts_at.is_some(), "starts_at", "is required");
        v.check(ends_at.is_some(), "ends_at", "is required");
        if let (Some(starts), Some(ends)) = (starts_at, ends_at) {
            v.check(ends > starts, "ends_at", "must be after starts_at");
            v.check(ends > now, "ends_at", "must be in the future");
        }
        v.into_result()?;
        Ok(Self {
            product_id,
            price_cents,
            stock,
            per_user_limit,
            starts_at: starts_at.unwrap_or_default(),
            ends_at: ends_at.unwrap_or_default(),
        })
    }
}

/// A validated ReserveStock request.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub deal_id: String,
    pub user_id: String,
    pub quantity: i32,
    pub reservation_id: String,
}

impl ReserveRequest {
    pub fn parse(
        deal_id: &str,
        user_id: &str,
        quantity: i32,
        reservation_id: &str,
    ) -> Result<Self, CatalogError> {
        let mut v = Violations::default();
        let deal_id = parse_id("deal_id", deal_id)
            .map_err(|e| v.push(e))
            .unwrap_or_default();
        let reservation_id = parse_id("reservation_id", reservation_id)
            .map_err(|e| v.push(e))
            .unwrap_or_default();
        let user_id = user_id.trim();
        v.check(
            !user_id.is_empty() && user_id.len() <= USER_ID_MAX_LEN,
            "user_id",
            format!("must be 1 to {USER_ID_MAX_LEN} bytes"),
        );
        v.check(
            (1..=STOCK_MAX).contains(&quantity),
            "quantity",
            format!("must be between 1 and {STOCK_MAX}"),
        );
        v.into_result()?;
        Ok(Self {
            deal_id,
            user_id: user_id.to_owned(),
            quantity,
            reservation_id,
        })
    }
}

/// Units of a deal held for a user, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub deal_id: String,
    pub user_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
    /// The deal's remaining stock right after this reservation was taken,
    /// replayed to retries.
    pub remaining_after: i32,
    pub reserved_at: i64,
    pub released_at: Option<i64>,
}

impl Reservation {
    /// A tombstone: released without ever having taken stock.
    pub fn is_tombstone(&self) -> bool {
        self.quantity == 0
    }

    /// What a retry of `request` under this reservation's id gets.
    pub fn replay(&self, request: &ReserveRequest) -> Result<Reservation, CatalogError> {
        if self.released_at.is_some() {
            return Err(CatalogError::ReservationReleased);
        }
        if self.deal_id != request.deal_id
            || self.user_id != request.user_id
            || self.quantity != request.quantity
        {
            return Err(CatalogError::ReservationIdReused);
        }
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_clock_and_stock() {
        assert_eq!(DealState::at(5, 10, 20, 3), DealState::Scheduled);
        assert_eq!(DealState::at(10, 10, 20, 3), DealState::Active);
        assert_eq!(DealState::at(15, 10, 20, 0), DealState::SoldOut);
        assert_eq!(DealState::at(20, 10, 20, 3), DealState::Ended);
        assert_eq!(DealState::at(25, 10, 20, 0), DealState::Ended);
    }

    fn fields(err: CatalogError) -> Vec<&'static str> {
        match err {
            CatalogError::InvalidInput(v) => v.iter().map(|v| v.field).collect(),
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn new_deals_are_checked_field_by_field() {
        let err = NewDeal::parse("nope", 0, 0, 0, Some(10), Some(5), 0)
            .err()
            .unwrap();
        assert_eq!(
            fields(err),
            [
                "product_id",
                "price_cents",
                "stock",
                "per_user_limit",
                "ends_at"
            ]
        );
        let id = uuid::Uuid::now_v7().to_string();
        let err = NewDeal::parse(&id, 100, 10, 11, None, Some(5), 0)
            .err()
            .unwrap();
        assert_eq!(fields(err), ["per_user_limit", "starts_at"]);
        let err = NewDeal::parse(&id, i64::MAX, i32::MAX, 1, Some(1), Some(2), 10)
            .err()
            .unwrap();
        assert_eq!(fields(err), ["price_cents", "stock", "ends_at"]);
        assert!(NewDeal::parse(&id, 100, 10, 2, Some(1), Some(20), 10).is_ok());
    }

    #[test]
    fn products_need_a_name_a_price_and_an_https_image() {
        let err = NewProduct::parse(" ", &"d".repeat(5001), Some("http://x.test/a.png"), -1)
            .err()
            .unwrap();
        assert_eq!(
            fields(err),
            ["name", "description", "image_url", "price_cents"]
        );
        let product =
            NewProduct::parse(" Mug ", "", Some("https://cdn.test/mug.png"), 1299).unwrap();
        assert_eq!(product.name, "Mug");
        assert_eq!(
            product.image_url.as_deref(),
            Some("https://cdn.test/mug.png")
        );
    }

    #[test]
    fn replays_return_the_first_answer_or_refuse() {
        let request = ReserveRequest::parse(
            &uuid::Uuid::now_v7().to_string(),
            "user-1",
            2,
            &uuid::Uuid::new_v4().to_string(),
        )
        .unwrap();
        let reservation = Reservation {
            id: request.reservation_id.clone(),
            deal_id: request.deal_id.clone(),
            user_id: "user-1".into(),
            quantity: 2,
            unit_price_cents: 100,
            remaining_after: 7,
            reserved_at: 1,
            released_at: None,
        };
        assert_eq!(reservation.replay(&request).unwrap(), reservation);
        let other = ReserveRequest {
            quantity: 1,
            ..request.clone()
        };
        assert!(matches!(
            reservation.replay(&other),
            Err(CatalogError::ReservationIdReused)
        ));
        let released = Reservation {
            released_at: Some(2),
            ..reservation
        };
        assert!(matches!(
            released.replay(&request),
            Err(CatalogError::ReservationReleased)
        ));
    }
}
