//! sqlx repositories for products, deals, holdings and reservations, in SQL
//! that PostgreSQL and SQLite share. The database is the source of truth for
//! stock: every decrement is conditional (`remaining_stock >= $qty`), backed by
//! a CHECK, with the buyer's holding updated in the same transaction.

use std::sync::atomic::{AtomicU64, Ordering};

use flashmesh_platform::{db, telemetry};
use sqlx::{AnyPool, FromRow};

use crate::{
    domain::{
        Deal, DealState, NewDeal, NewProduct, Product, ProductSummary, Reservation, ReserveRequest,
    },
    error::CatalogError,
};

/// Statements run, by kind; tests and metrics read them.
#[derive(Debug, Default)]
pub struct QueryCounts {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl QueryCounts {
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(FromRow)]
struct ProductRow {
    id: String,
    name: String,
    description: String,
    image_url: Option<String>,
    price_cents: i64,
    created_at: i64,
    updated_at: i64,
}

impl From<ProductRow> for Product {
    fn from(row: ProductRow) -> Self {
        Self {
            id: row.id,
            name: row.name,
            description: row.description,
            image_url: row.image_url,
            price_cents: row.price_cents,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[derive(FromRow)]
struct DealRow {
    id: String,
    product_id: String,
    product_name: String,
    product_image_url: Option<String>,
    product_price_cents: i64,
    price_cents: i64,
    stock: i64,
    remaining_stock: i64,
    per_user_limit: i64,
    starts_at: i64,
    ends_at: i64,
    version: i64,
    created_at: i64,
    updated_at: i64,
}

/// Stock columns are BIGINT for portability; the CHECKs keep them in i32.
fn narrow(value: i64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

impl From<DealRow> for Deal {
    fn from(row: DealRow) -> Self {
        Self {
            id: row.id,
            product: ProductSummary {
                id: row.product_id,
                name: row.product_name,
                image_url: row.product_image_url,
                price_cents: row.product_price_cents,
            },
            price_cents: row.price_cents,
            stock: narrow(row.stock),
            remaining_stock: narrow(row.remaining_stock),
            per_user_limit: narrow(row.per_user_limit),
            starts_at: row.starts_at,
            ends_at: row.ends_at,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

const DEAL_SELECT: &str = "SELECT d.id, d.product_id, p.name AS product_name, \
     p.image_url AS product_image_url, p.price_cents AS product_price_cents, d.price_cents, \
     d.stock, d.remaining_stock, d.per_user_limit, d.starts_at, d.ends_at, d.version, \
     d.created_at, d.updated_at FROM deals d JOIN products p ON p.id = d.product_id";

#[derive(FromRow)]
struct ReservationRow {
    id: String,
    deal_id: String,
    user_id: String,
    quantity: i64,
    unit_price_cents: i64,
    remaining_after: i64,
    reserved_at: i64,
    released_at: Option<i64>,
}

impl From<ReservationRow> for Reservation {
    fn from(row: ReservationRow) -> Self {
        Self {
            id: row.id,
            deal_id: row.deal_id,
            user_id: row.user_id,
            quantity: narrow(row.quantity),
            unit_price_cents: row.unit_price_cents,
            remaining_after: narrow(row.remaining_after),
            reserved_at: row.reserved_at,
            released_at: row.released_at,
        }
    }
}

/// Where a keyset page of deals starts: after this (starts_at, id).
pub struct DealCursor {
    pub starts_at: i64,
    pub id: String,
}

/// What ReleaseStock did.
pub enum Released {
    /// This call gave the units back; the deal now has `remaining` units at
    /// `version`.
    Now {
        reservation: Reservation,
        remaining: i32,
        version: i64,
    },
    /// An earlier call did.
    Already {
        reservation: Reservation,
        remaining: i32,
    },
    /// Nothing was reserved under the id; it is now a tombstone.
    NotReserved,
}

pub struct CatalogStore {
    pool: AnyPool,
    counts: QueryCounts,
}

impl CatalogStore {
    pub fn new(pool: AnyPool) -> Self {
        Self {
            pool,
            counts: QueryCounts::default(),
        }
    }

    /// The pool, for audits that count rows (tests, operators).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn counts(&self) -> &QueryCounts {
        &self.counts
    }

    pub async fn insert_product(
        &self,
        id: &str,
        product: &NewProduct,
        now: i64,
    ) -> Result<Product, CatalogError> {
        telemetry::db("catalog.insert_product", async {
            self.counts.wrote();
            sqlx::query(
                "INSERT INTO products (id, name, description, image_url, price_cents, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(id)
            .bind(&product.name)
            .bind(&product.description)
            .bind(product.image_url.as_deref())
            .bind(product.price_cents)
            .bind(now)
            .execute(&self.pool)
            .await?;
            Ok(Product {
                id: id.to_owned(),
                name: product.name.clone(),
                description: product.description.clone(),
                image_url: product.image_url.clone(),
                price_cents: product.price_cents,
                created_at: now,
                updated_at: now,
            })
        })
        .await
    }

    pub async fn product(&self, id: &str) -> Result<Option<Product>, CatalogError> {
        telemetry::db("catalog.product", async {
            self.counts.read();
            Ok(sqlx::query_as::<_, ProductRow>(
                "SELECT id, name, description, image_url, price_cents, created_at, updated_at \
                 FROM products WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(Product::from))
        })
        .await
    }

    /// Products in id order (UUIDv7: creation order) after `after`.
    pub async fn products(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Product>, CatalogError> {
        telemetry::db("catalog.products", async {
            self.counts.read();
            Ok(sqlx::query_as::<_, ProductRow>(
                "SELECT id, name, description, image_url, price_cents, created_at, updated_at \
                 FROM products WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after.unwrap_or_default())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(Product::from)
            .collect())
        })
        .await
    }

    pub async fn update_product(&self, product: &Product) -> Result<(), CatalogError> {
        telemetry::db("catalog.update_product", async {
            self.counts.wrote();
            sqlx::query(
                "UPDATE products SET name = $1, description = $2, image_url = $3, price_cents = $4, \
                 updated_at = $5 WHERE id = $6",
            )
            .bind(&product.name)
            .bind(&product.description)
            .bind(product.image_url.as_deref())
            .bind(product.price_cents)
            .bind(product.updated_at)
            .bind(&product.id)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn insert_deal(
        &self,
        id: &str,
        deal: &NewDeal,
        now: i64,
    ) -> Result<(), CatalogError> {
        telemetry::db("catalog.insert_deal", async {
            self.counts.wrote();
            sqlx::query(
                "INSERT INTO deals (id, product_id, price_cents, stock, remaining_stock, per_user_limit, \
                 starts_at, ends_at, version, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4, $5, $6, $7, 1, $8, $8)",
            )
            .bind(id)
            .bind(&deal.product_id)
            .bind(deal.price_cents)
            .bind(i64::from(deal.stock))
            .bind(i64::from(deal.per_user_limit))
            .bind(deal.starts_at)
            .bind(deal.ends_at)
            .bind(now)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn deal(&self, id: &str) -> Result<Option<Deal>, CatalogError> {
        telemetry::db("catalog.deal", async {
            self.counts.read();
            Ok(
                sqlx::query_as::<_, DealRow>(&format!("{DEAL_SELECT} WHERE d.id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(Deal::from),
            )
        })
        .await
    }

    /// Deals in any of `states` at `now`, soonest start first, after `after`.
    pub async fn deals(
        &self,
        states: &[DealState],
        product_id: Option<&str>,
        after: Option<&DealCursor>,
        limit: i64,
        now: i64,
    ) -> Result<Vec<Deal>, CatalogError> {
        telemetry::db("catalog.deals", async {
            // $1 = now; each state is a condition on the window and stock.
            let state_filter = states
                .iter()
                .map(|state| match state {
                    DealState::Scheduled => "d.starts_at > $1",
                    DealState::Active => {
                        "(d.starts_at <= $1 AND d.ends_at > $1 AND d.remaining_stock > 0)"
                    }
                    DealState::SoldOut => {
                        "(d.starts_at <= $1 AND d.ends_at > $1 AND d.remaining_stock = 0)"
                    }
                    DealState::Ended => "d.ends_at <= $1",
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!(
                "{DEAL_SELECT} WHERE ({state_filter}) AND ($2 = '' OR d.product_id = $2) \
                 AND (d.starts_at > $3 OR (d.starts_at = $3 AND d.id > $4)) \
                 ORDER BY d.starts_at, d.id LIMIT $5"
            );
            self.counts.read();
            Ok(sqlx::query_as::<_, DealRow>(&sql)
                .bind(now)
                .bind(product_id.unwrap_or_default())
                .bind(after.map_or(i64::MIN, |c| c.starts_at))
                .bind(after.map_or("", |c| c.id.as_str()))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(Deal::from)
                .collect())
        })
        .await
    }

    pub async fn reservation(&self, id: &str) -> Result<Option<Reservation>, CatalogError> {
        telemetry::db("catalog.reservation", async {
            self.counts.read();
            Ok(sqlx::query_as::<_, ReservationRow>(
                "SELECT id, deal_id, user_id, quantity, unit_price_cents, remaining_after, reserved_at, \
                 released_at FROM reservations WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(Reservation::from))
        })
        .await
    }

    /// Units each user holds for a deal, for seeding the stock gate.
    pub async fn holdings(&self, deal_id: &str) -> Result<(i32, Vec<(String, i32)>), CatalogError> {
        telemetry::db("catalog.holdings", async {
            self.counts.read();
            let remaining: Option<(i64,)> =
                sqlx::query_as("SELECT remaining_stock FROM deals WHERE id = $1")
                    .bind(deal_id)
                    .fetch_optional(&self.pool)
                    .await?;
            let remaining = remaining.ok_or(CatalogError::DealNotFound)?.0;
            self.counts.read();
            let held: Vec<(String, i64)> = sqlx::query_as(
                "SELECT user_id, held FROM deal_holdings WHERE deal_id = $1 AND held > 0",
            )
            .bind(deal_id)
            .fetch_all(&self.pool)
            .await?;
            Ok((
                narrow(remaining),
                held.into_iter()
                    .map(|(user, held)| (user, narrow(held)))
                    .collect(),
            ))
        })
        .await
    }

    /// Takes the stock in one transaction, claiming the reservation id first
    /// so that reserve and release lock rows in the same order (reservation,
    /// then deal, then holding). Returns the reservation and the deal's new
    /// version; `Ok(None)` means the id was claimed concurrently.
    pub async fn reserve(
        &self,
        request: &ReserveRequest,
        now: i64,
    ) -> Result<Option<(Reservation, i64)>, CatalogError> {
        telemetry::db("catalog.reserve", async {
            let mut tx = db::begin(&self.pool).await?;
            self.counts.wrote();
            let claimed = sqlx::query(
                "INSERT INTO reservations (id, deal_id, user_id, quantity, unit_price_cents, \
                 remaining_after, reserved_at) VALUES ($1, $2, $3, $4, 0, 0, $5) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&request.reservation_id)
            .bind(&request.deal_id)
            .bind(&request.user_id)
            .bind(i64::from(request.quantity))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 0 {
                db::rollback(tx).await?;
                return Ok(None);
            }

            self.counts.wrote();
            let taken: Option<(i64, i64, i64, i64)> = sqlx::query_as(
                "UPDATE deals SET remaining_stock = remaining_stock - $1, version = version + 1, \
                 updated_at = $2 WHERE id = $3 AND remaining_stock >= $1 AND starts_at <= $2 \
                 AND ends_at > $2 RETURNING remaining_stock, price_cents, per_user_limit, version",
            )
            .bind(i64::from(request.quantity))
            .bind(now)
            .bind(&request.deal_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((remaining, price_cents, limit, version)) = taken else {
                db::rollback(tx).await?;
                return Err(self.why_not_taken(&request.deal_id, now).await?);
            };

            self.counts.wrote();
            let held: Option<(i64,)> = sqlx::query_as(
                "INSERT INTO deal_holdings (deal_id, user_id, held) VALUES ($1, $2, $3) \
                 ON CONFLICT (deal_id, user_id) DO UPDATE SET held = deal_holdings.held + excluded.held \
                 WHERE deal_holdings.held + excluded.held <= $4 RETURNING held",
            )
            .bind(&request.deal_id)
            .bind(&request.user_id)
            .bind(i64::from(request.quantity))
            .bind(limit)
            .fetch_optional(&mut *tx)
            .await?;
            if held.is_none() || i64::from(request.quantity) > limit {
                db::rollback(tx).await?;
                return Err(CatalogError::LimitExceeded {
                    limit: narrow(limit),
                    held: self.held(&request.deal_id, &request.user_id).await?,
                });
            }

            self.counts.wrote();
            sqlx::query(
                "UPDATE reservations SET unit_price_cents = $1, remaining_after = $2 WHERE id = $3",
            )
            .bind(price_cents)
            .bind(remaining)
            .bind(&request.reservation_id)
            .execute(&mut *tx)
            .await?;
            db::commit(tx).await?;
            let reservation = Reservation {
                id: request.reservation_id.clone(),
                deal_id: request.deal_id.clone(),
                user_id: request.user_id.clone(),
                quantity: request.quantity,
                unit_price_cents: price_cents,
                remaining_after: narrow(remaining),
                reserved_at: now,
                released_at: None,
            };
            Ok(Some((reservation, version)))
        })
        .await
    }

    async fn why_not_taken(&self, deal_id: &str, now: i64) -> Result<CatalogError, CatalogError> {
        Ok(match self.deal(deal_id).await? {
            None => CatalogError::DealNotFound,
            Some(deal) if !deal.window_open(now) => CatalogError::DealNotActive {
                state: deal.state(now),
            },
            Some(deal) => CatalogError::SoldOut {
                remaining: deal.remaining_stock,
            },
        })
    }

    async fn held(&self, deal_id: &str, user_id: &str) -> Result<i32, CatalogError> {
        self.counts.read();
        let held: Option<(i64,)> =
            sqlx::query_as("SELECT held FROM deal_holdings WHERE deal_id = $1 AND user_id = $2")
                .bind(deal_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(held.map_or(0, |(held,)| narrow(held)))
    }

    /// Gives a reservation's units back exactly once.
    pub async fn release(&self, reservation_id: &str, now: i64) -> Result<Released, CatalogError> {
        telemetry::db("catalog.release", async {
            // Two rounds at most: a tombstone insert can lose to a reservation
            // committed in between, which the second round then releases.
            for _ in 0..2 {
                let mut tx = db::begin(&self.pool).await?;
                self.counts.wrote();
                let row = sqlx::query_as::<_, ReservationRow>(
                    "UPDATE reservations SET released_at = $1 WHERE id = $2 AND released_at IS NULL \
                     RETURNING id, deal_id, user_id, quantity, unit_price_cents, remaining_after, \
                     reserved_at, released_at",
                )
                .bind(now)
                .bind(reservation_id)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = row {
                    let reservation = Reservation::from(row);
                    self.counts.wrote();
                    let (remaining, version): (i64, i64) = sqlx::query_as(
                        "UPDATE deals SET remaining_stock = remaining_stock + $1, version = version + 1, \
                         updated_at = $2 WHERE id = $3 RETURNING remaining_stock, version",
                    )
                    .bind(i64::from(reservation.quantity))
                    .bind(now)
                    .bind(&reservation.deal_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    self.counts.wrote();
                    sqlx::query(
                        "UPDATE deal_holdings SET held = held - $1 WHERE deal_id = $2 AND user_id = $3",
                    )
                    .bind(i64::from(reservation.quantity))
                    .bind(&reservation.deal_id)
                    .bind(&reservation.user_id)
                    .execute(&mut *tx)
                    .await?;
                    db::commit(tx).await?;
                    return Ok(Released::Now {
                        reservation,
                        remaining: narrow(remaining),
                        version,
                    });
                }
                db::rollback(tx).await?;

                if let Some(reservation) = self.reservation(reservation_id).await? {
                    if reservation.is_tombstone() {
                        return Ok(Released::NotReserved);
                    }
                    let remaining = self
                        .deal(&reservation.deal_id)
                        .await?
                        .map_or(0, |deal| deal.remaining_stock);
                    return Ok(Released::Already {
                        reservation,
                        remaining,
                    });
                }
                self.counts.wrote();
                let tombstone = sqlx::query(
                    "INSERT INTO reservations (id, deal_id, user_id, quantity, unit_price_cents, \
                     remaining_after, reserved_at, released_at) VALUES ($1, '', '', 0, 0, 0, $2, $2) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(reservation_id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                if tombstone.rows_affected() == 1 {
                    return Ok(Released::NotReserved);
                }
            }
            Err(CatalogError::Storage(sqlx::Error::Protocol(
                "reservation changed twice during one release".into(),
            )))
        })
        .await
    }
}
