//! The catalog use cases: the domain rules put to work against storage, the
//! tiered cache, the stock gate and the live deal feed.

use std::sync::Arc;

use flashmesh_platform::{
    cache::TieredCache,
    identity::{Caller, Role},
    paging::{PageTokens, page_size},
};
use serde::{Deserialize, Serialize};

use crate::{
    config::CatalogConfig,
    domain::{
        Deal, DealState, NewDeal, NewProduct, Product, ProductPatch, Reservation, ReserveRequest,
        Violations, check_description, check_image_url, check_name, check_price, parse_id,
    },
    error::CatalogError,
    feed::{DealFeed, StockLevel},
    gate::{GateDecision, StockGate},
    storage::{CatalogStore, DealCursor, Released},
};

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One page of a list and the token for the next.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

/// The fields an UpdateProduct may name in its mask, with their values.
pub struct ProductUpdate<'a> {
    pub id: &'a str,
    pub paths: &'a [String],
    pub name: &'a str,
    pub description: &'a str,
    pub image_url: &'a str,
    pub price_cents: i64,
}

/// A new deal as the request gives it (times in epoch ms).
pub struct DealDraft<'a> {
    pub product_id: &'a str,
    pub price_cents: i64,
    pub stock: i32,
    pub per_user_limit: i32,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
}

/// What ReleaseStock did, with the deal's remaining stock after it.
pub enum ReleaseOutcome {
    Released(Reservation, i32),
    AlreadyReleased(Reservation, i32),
    NotReserved,
}

/// How the database answered a reservation.
enum Taken {
    /// Stock taken now; the deal's new version.
    Now(Reservation, i64),
    /// Stock taken earlier under the same id.
    Replayed(Reservation),
}

#[derive(Serialize, Deserialize)]
struct DealPageCursor {
    starts_at: i64,
    id: String,
}

/// The tiered caches in front of the catalog's reads.
pub struct ReadCaches {
    pub products: TieredCache<Product>,
    pub deals: TieredCache<Deal>,
    pub deal_pages: TieredCache<Page<Deal>>,
}

pub struct CatalogService {
    store: Arc<CatalogStore>,
    products: TieredCache<Product>,
    deals: TieredCache<Deal>,
    deal_pages: TieredCache<Page<Deal>>,
    gate: Option<StockGate>,
    feed: DealFeed,
    page_tokens: PageTokens,
    config: CatalogConfig,
}

fn require_admin(caller: &Caller) -> Result<(), CatalogError> {
    if caller.role == Role::Admin {
        Ok(())
    } else {
        Err(CatalogError::AdminRequired)
    }
}

impl CatalogService {
    pub fn new(
        store: Arc<CatalogStore>,
        caches: ReadCaches,
        gate: Option<StockGate>,
        feed: DealFeed,
        page_tokens: PageTokens,
        config: CatalogConfig,
    ) -> Self {
        Self {
            store,
            products: caches.products,
            deals: caches.deals,
            deal_pages: caches.deal_pages,
            gate,
            feed,
            page_tokens,
            config,
        }
    }

    pub fn store(&self) -> &CatalogStore {
        &self.store
    }

    fn require_stock_caller(&self, caller: &Caller) -> Result<(), CatalogError> {
        if caller.role == Role::Service && self.config.stock_callers.contains(&caller.user_id) {
            Ok(())
        } else {
            Err(CatalogError::CallerNotAllowed)
        }
    }

    pub async fn create_product(
        &self,
        caller: &Caller,
        name: &str,
        description: &str,
        image_url: Option<&str>,
        price_cents: i64,
    ) -> Result<Product, CatalogError> {
        require_admin(caller)?;
        let product = NewProduct::parse(name, description, image_url, price_cents)?;
        let id = uuid::Uuid::now_v7().to_string();
        let created = self.store.insert_product(&id, &product, now_ms()).await?;
        // A lookup of this id just before may have cached "not found".
        self.invalidate_product(&id).await;
        Ok(created)
    }

    pub async fn product(&self, id: &str) -> Result<Product, CatalogError> {
        let id = parse_id("id", id).map_err(|v| CatalogError::InvalidInput(vec![v]))?;
        self.products
            .get(&id, || self.store.product(&id))
            .await
            .map_err(CatalogError::unshare)?
            .ok_or(CatalogError::ProductNotFound)
    }

    pub async fn products(&self, size: i32, token: &str) -> Result<Page<Product>, CatalogError> {
        const QUERY: &str = "products";
        let size = page_size(size).map_err(|v| CatalogError::InvalidInput(vec![v]))?;
        let after: Option<String> = self.decode_token(QUERY, token)?;
        let mut items = self
            .store
            .products(after.as_deref(), i64::from(size) + 1)
            .await?;
        let next_page_token = self.next_token(QUERY, &mut items, size, |last| last.id.clone());
        Ok(Page {
            items,
            next_page_token,
        })
    }

    pub async fn update_product(
        &self,
        caller: &Caller,
        update: ProductUpdate<'_>,
    ) -> Result<Product, CatalogError> {
        require_admin(caller)?;
        let mut v = Violations::default();
        let id = parse_id("id", update.id)
            .map_err(|e| v.push(e))
            .unwrap_or_default();
        v.check(
            !update.paths.is_empty(),
            "update_mask",
            "must name at least one field",
        );
        let mut patch = ProductPatch::default();
        for path in update.paths {
            match path.as_str() {
                "name" => patch.name = Some(check_name(&mut v, update.name)),
                "description" => {
                    patch.description = Some(check_description(&mut v, update.description))
                }
                "image_url" => patch.image_url = Some(check_image_url(&mut v, update.image_url)),
                "price_cents" => {
                    check_price(&mut v, "price_cents", update.price_cents);
                    patch.price_cents = Some(update.price_cents);
                }
                other => v.check(
                    false,
                    "update_mask",
                    format!("unknown path {other:?} (name, description, image_url, price_cents)"),
                ),
            }
        }
        v.into_result()?;
        let mut product = self
            .store
            .product(&id)
            .await?
            .ok_or(CatalogError::ProductNotFound)?;
        patch.apply(&mut product);
        product.updated_at = now_ms();
        self.store.update_product(&product).await?;
        self.invalidate_product(&id).await;
        Ok(product)
    }

    pub async fn create_deal(
        &self,
        caller: &Caller,
        draft: DealDraft<'_>,
    ) -> Result<Deal, CatalogError> {
        require_admin(caller)?;
        let now = now_ms();
        let deal = NewDeal::parse(
            draft.product_id,
            draft.price_cents,
            draft.stock,
            draft.per_user_limit,
            draft.starts_at,
            draft.ends_at,
            now,
        )?;
        if self.store.product(&deal.product_id).await?.is_none() {
            return Err(CatalogError::ProductNotFound);
        }
        let id = uuid::Uuid::now_v7().to_string();
        self.store.insert_deal(&id, &deal, now).await?;
        self.invalidate_deal(&id).await;
        self.store
            .deal(&id)
            .await?
            .ok_or(CatalogError::DealNotFound)
    }

    /// A deal through the tiered cache: at most L1 + L2 TTL old.
    pub async fn deal(&self, id: &str) -> Result<Deal, CatalogError> {
        let id = parse_id("id", id).map_err(|v| CatalogError::InvalidInput(vec![v]))?;
        self.cached_deal(&id).await
    }

    async fn cached_deal(&self, id: &str) -> Result<Deal, CatalogError> {
        self.deals
            .get(id, || self.store.deal(id))
            .await
            .map_err(CatalogError::unshare)?
            .ok_or(CatalogError::DealNotFound)
    }

    /// A deal read from the database, bypassing the cache.
    pub async fn fresh_deal(&self, id: &str) -> Result<Deal, CatalogError> {
        let id = parse_id("id", id).map_err(|v| CatalogError::InvalidInput(vec![v]))?;
        self.store
            .deal(&id)
            .await?
            .ok_or(CatalogError::DealNotFound)
    }

    pub async fn deals(
        &self,
        states: &[DealState],
        product_id: &str,
        size: i32,
        token: &str,
    ) -> Result<Page<Deal>, CatalogError> {
        let mut v = Violations::default();
        let size = page_size(size).map_err(|e| v.push(e)).unwrap_or_default();
        let product_id = if product_id.trim().is_empty() {
            None
        } else {
            parse_id("product_id", product_id)
                .map_err(|e| v.push(e))
                .ok()
        };
        v.into_result()?;
        let states: Vec<DealState> = if states.is_empty() {
            vec![DealState::Scheduled, DealState::Active]
        } else {
            states.to_vec()
        };
        let query = format!(
            "deals?states={}&product_id={}",
            states
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(","),
            product_id.as_deref().unwrap_or_default()
        );
        let after: Option<DealPageCursor> = self.decode_token(&query, token)?;
        // Pages are cached like single deals (same staleness bound); a burst
        // of identical listings makes one query.
        let key = format!("{query}&size={size}&after={token}");
        let page = self
            .deal_pages
            .get(&key, || async {
                let cursor = after.map(|c| DealCursor {
                    starts_at: c.starts_at,
                    id: c.id,
                });
                let mut items = self
                    .store
                    .deals(
                        &states,
                        product_id.as_deref(),
                        cursor.as_ref(),
                        i64::from(size) + 1,
                        now_ms(),
                    )
                    .await?;
                let next_page_token =
                    self.next_token(&query, &mut items, size, |last| DealPageCursor {
                        starts_at: last.starts_at,
                        id: last.id.clone(),
                    });
                Ok::<_, CatalogError>(Some(Page {
                    items,
                    next_page_token,
                }))
            })
            .await
            .map_err(CatalogError::unshare)?;
        // The loader always yields a page; an empty one stands in regardless.
        Ok(page.unwrap_or_else(|| Page {
            items: Vec::new(),
            next_page_token: String::new(),
        }))
    }

    fn decode_token<T: serde::de::DeserializeOwned>(
        &self,
        query: &str,
        token: &str,
    ) -> Result<Option<T>, CatalogError> {
        if token.is_empty() {
            return Ok(None);
        }
        self.page_tokens
            .decode(query, token)
            .map(Some)
            .map_err(|v| CatalogError::InvalidInput(vec![v]))
    }

    /// Trims the extra row fetched to learn whether another page exists, and
    /// signs a token resuming after the last item kept.
    fn next_token<T, C: Serialize>(
        &self,
        query: &str,
        items: &mut Vec<T>,
        size: i32,
        cursor: impl Fn(&T) -> C,
    ) -> String {
        let size = usize::try_from(size).unwrap_or_default();
        if items.len() <= size {
            return String::new();
        }
        items.truncate(size);
        items
            .last()
            .map(|last| self.page_tokens.encode(query, &cursor(last)))
            .unwrap_or_default()
    }

    /// Follows a deal: its current state, then stock changes.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<(Deal, tokio::sync::watch::Receiver<StockLevel>), CatalogError> {
        let deal = self.fresh_deal(id).await?;
        let level = StockLevel {
            version: deal.version,
            remaining_stock: deal.remaining_stock,
            changed_at: deal.updated_at,
        };
        let changes = self.feed.watch(&deal.id, level);
        Ok((deal, changes))
    }

    pub fn watch_min_interval(&self) -> std::time::Duration {
        self.config.watch_min_interval
    }

    /// Takes units of a deal for a user, all or nothing, idempotently.
    pub async fn reserve(
        &self,
        caller: &Caller,
        request: ReserveRequest,
    ) -> Result<Reservation, CatalogError> {
        self.require_stock_caller(caller)?;
        if let Some(existing) = self.store.reservation(&request.reservation_id).await? {
            return existing.replay(&request);
        }
        let now = now_ms();
        let deal = self.cached_deal(&request.deal_id).await?;
        if !deal.window_open(now) {
            return Err(CatalogError::DealNotActive {
                state: deal.state(now),
            });
        }
        let admitted = match &self.gate {
            Some(gate) => self.pass_gate(gate, &deal, &request).await?,
            None => false,
        };
        let taken = self.take_in_database(&request, now).await;
        if admitted && !matches!(taken, Ok(Taken::Now(..))) {
            self.give_back_to_gate(&request.deal_id, &request.user_id, request.quantity)
                .await;
        }
        match taken? {
            Taken::Now(reservation, version) => {
                self.stock_changed(&deal.id, version, reservation.remaining_after, now)
                    .await;
                Ok(reservation)
            }
            Taken::Replayed(reservation) => Ok(reservation),
        }
    }

    async fn take_in_database(
        &self,
        request: &ReserveRequest,
        now: i64,
    ) -> Result<Taken, CatalogError> {
        // A concurrent request with the same id holds the claim: answer as a
        // retry of it would, or, if its claim was rolled back meanwhile, try
        // again.
        for _ in 0..3 {
            if let Some((reservation, version)) = self.store.reserve(request, now).await? {
                return Ok(Taken::Now(reservation, version));
            }
            if let Some(existing) = self.store.reservation(&request.reservation_id).await? {
                return existing.replay(request).map(Taken::Replayed);
            }
        }
        Err(CatalogError::ReservationContended)
    }

    /// Asks the gate; `Ok(true)` when it took units that the database must
    /// now take (or that must be given back). A gate failure falls back to
    /// the database alone, which stays correct, only slower.
    async fn pass_gate(
        &self,
        gate: &StockGate,
        deal: &Deal,
        request: &ReserveRequest,
    ) -> Result<bool, CatalogError> {
        for _ in 0..2 {
            let decision = gate
                .admit(
                    &deal.id,
                    &request.user_id,
                    request.quantity,
                    deal.per_user_limit,
                )
                .await;
            match decision {
                Ok(GateDecision::Admitted) => return Ok(true),
                Ok(GateDecision::SoldOut { remaining }) => {
                    return Err(CatalogError::SoldOut { remaining });
                }
                Ok(GateDecision::LimitExceeded { held }) => {
                    return Err(CatalogError::LimitExceeded {
                        limit: deal.per_user_limit,
                        held,
                    });
                }
                Ok(GateDecision::Unseeded) => {
                    let (remaining, holdings) = self.store.holdings(&deal.id).await?;
                    if let Err(e) = gate.seed(&deal.id, remaining, &holdings).await {
                        tracing::warn!(error = %e, "stock gate unavailable; using the database alone");
                        return Ok(false);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stock gate unavailable; using the database alone");
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }

    async fn give_back_to_gate(&self, deal_id: &str, user_id: &str, quantity: i32) {
        if let Some(gate) = &self.gate
            && let Err(e) = gate.give_back(deal_id, user_id, quantity).await
        {
            // The gate now counts fewer units than exist until its TTL
            // reseeds it from the database.
            tracing::warn!(error = %e, deal_id, "units not given back to the stock gate");
        }
    }

    /// Gives a reservation's units back exactly once.
    pub async fn release(
        &self,
        caller: &Caller,
        reservation_id: &str,
    ) -> Result<ReleaseOutcome, CatalogError> {
        self.require_stock_caller(caller)?;
        let reservation_id = parse_id("reservation_id", reservation_id)
            .map_err(|v| CatalogError::InvalidInput(vec![v]))?;
        let now = now_ms();
        Ok(match self.store.release(&reservation_id, now).await? {
            Released::Now {
                reservation,
                remaining,
                version,
            } => {
                self.give_back_to_gate(
                    &reservation.deal_id,
                    &reservation.user_id,
                    reservation.quantity,
                )
                .await;
                self.stock_changed(&reservation.deal_id, version, remaining, now)
                    .await;
                ReleaseOutcome::Released(reservation, remaining)
            }
            Released::Already {
                reservation,
                remaining,
            } => ReleaseOutcome::AlreadyReleased(reservation, remaining),
            Released::NotReserved => ReleaseOutcome::NotReserved,
        })
    }

    /// WatchDeal streams open on `deal_id` in this replica.
    pub fn watchers(&self, deal_id: &str) -> usize {
        self.feed.watchers(deal_id)
    }

    /// Tells watchers in every replica about a committed stock change.
    async fn stock_changed(&self, deal_id: &str, version: i64, remaining_stock: i32, now: i64) {
        self.feed
            .publish(
                deal_id,
                StockLevel {
                    version,
                    remaining_stock,
                    changed_at: now,
                },
            )
            .await;
    }

    /// Gets deals that start within `ahead` ready for their rush: the stock
    /// gate seeded from the database and the deal loaded into the cache, so
    /// the first second of a sale does not start with every replica missing.
    pub async fn prepare_upcoming(
        &self,
        ahead: std::time::Duration,
    ) -> Result<usize, CatalogError> {
        let now = now_ms();
        let horizon = now.saturating_add(i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX));
        let upcoming = self
            .store
            .deals(
                &[DealState::Scheduled, DealState::Active],
                None,
                None,
                1_000,
                now,
            )
            .await?;
        let mut prepared = 0;
        for deal in upcoming.iter().filter(|deal| deal.starts_at <= horizon) {
            if let Some(gate) = &self.gate {
                let (remaining, holdings) = self.store.holdings(&deal.id).await?;
                if let Err(e) = gate.seed(&deal.id, remaining, &holdings).await {
                    tracing::warn!(error = %e, deal_id = deal.id, "stock gate not seeded ahead of the sale");
                }
            }
            self.cached_deal(&deal.id).await?;
            prepared += 1;
        }
        Ok(prepared)
    }

    async fn invalidate_product(&self, id: &str) {
        if let Err(e) = self.products.invalidate(id).await {
            tracing::warn!(error = %e, id, "product cache invalidation incomplete");
        }
    }

    async fn invalidate_deal(&self, id: &str) {
        if let Err(e) = self.deals.invalidate(id).await {
            tracing::warn!(error = %e, id, "deal cache invalidation incomplete");
        }
    }
}
