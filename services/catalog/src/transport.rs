//! The gRPC face of the catalog: decode, call the use case, encode.

use std::{pin::Pin, sync::Arc};

use flashmesh_platform::{
    error::FieldViolation,
    identity::Caller,
    time::{millis_from_timestamp, timestamp_from_millis},
};
use flashmesh_proto::catalog::v1 as pb;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    domain::{Deal, DealState, Product, Reservation, ReserveRequest},
    error::CatalogError,
    service::{CatalogService, DealDraft, ProductUpdate, ReleaseOutcome, now_ms},
    watch::{DealEvent, DealEventKind, deal_events},
};

pub struct CatalogGrpc {
    service: Arc<CatalogService>,
}

impl CatalogGrpc {
    pub fn new(service: Arc<CatalogService>) -> Self {
        Self { service }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchDealResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for CatalogGrpc {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CreateProductResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let r = request.into_inner();
        let product = self
            .service
            .create_product(
                &caller,
                &r.name,
                &r.description,
                r.image_url.as_deref(),
                r.price_cents,
            )
            .await?;
        Ok(Response::new(pb::CreateProductResponse {
            product: Some(product_message(product)),
        }))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::GetProductResponse>, Status> {
        let product = self.service.product(&request.into_inner().id).await?;
        Ok(Response::new(pb::GetProductResponse {
            product: Some(product_message(product)),
        }))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let r = request.into_inner();
        let page = self.service.products(r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListProductsResponse {
            products: page.items.into_iter().map(product_message).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_product(
        &self,
        request: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::UpdateProductResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let r = request.into_inner();
        let paths = r.update_mask.map(|mask| mask.paths).unwrap_or_default();
        let product = self
            .service
            .update_product(
                &caller,
                ProductUpdate {
                    id: &r.id,
                    paths: &paths,
                    name: &r.name,
                    description: &r.description,
                    image_url: &r.image_url,
                    price_cents: r.price_cents,
                },
            )
            .await?;
        Ok(Response::new(pb::UpdateProductResponse {
            product: Some(product_message(product)),
        }))
    }

    async fn create_deal(
        &self,
        request: Request<pb::CreateDealRequest>,
    ) -> Result<Response<pb::CreateDealResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let r = request.into_inner();
        let deal = self
            .service
            .create_deal(
                &caller,
                DealDraft {
                    product_id: &r.product_id,
                    price_cents: r.price_cents,
                    stock: r.stock,
                    per_user_limit: r.per_user_limit,
                    starts_at: r.starts_at.as_ref().map(millis_from_timestamp),
                    ends_at: r.ends_at.as_ref().map(millis_from_timestamp),
                },
            )
            .await?;
        Ok(Response::new(pb::CreateDealResponse {
            deal: Some(deal_message(deal, now_ms())),
        }))
    }

    async fn get_deal(
        &self,
        request: Request<pb::GetDealRequest>,
    ) -> Result<Response<pb::GetDealResponse>, Status> {
        let deal = self.service.deal(&request.into_inner().id).await?;
        Ok(Response::new(pb::GetDealResponse {
            deal: Some(deal_message(deal, now_ms())),
        }))
    }

    async fn list_deals(
        &self,
        request: Request<pb::ListDealsRequest>,
    ) -> Result<Response<pb::ListDealsResponse>, Status> {
        let r = request.into_inner();
        let states = r
            .states
            .iter()
            .map(|&raw| deal_state(raw))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                CatalogError::InvalidInput(vec![FieldViolation::new(
                    "states",
                    "must be DEAL_STATE_SCHEDULED, _ACTIVE, _SOLD_OUT or _ENDED",
                )])
            })?;
        let page = self
            .service
            .deals(&states, &r.product_id, r.page_size, &r.page_token)
            .await?;
        let now = now_ms();
        Ok(Response::new(pb::ListDealsResponse {
            deals: page
                .items
                .into_iter()
                .map(|d| deal_message(d, now))
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    type WatchDealStream = EventStream;

    async fn watch_deal(
        &self,
        request: Request<pb::WatchDealRequest>,
    ) -> Result<Response<Self::WatchDealStream>, Status> {
        let (deal, changes) = self.service.watch(&request.into_inner().id).await?;
        let events = deal_events(deal, changes, self.service.watch_min_interval()).map(|event| {
            Ok(pb::WatchDealResponse {
                event: Some(event_message(event)),
            })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn reserve_stock(
        &self,
        request: Request<pb::ReserveStockRequest>,
    ) -> Result<Response<pb::ReserveStockResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let r = request.into_inner();
        let reserve = ReserveRequest::parse(&r.deal_id, &r.user_id, r.quantity, &r.reservation_id)?;
        let reservation = self.service.reserve(&caller, reserve).await?;
        Ok(Response::new(pb::ReserveStockResponse {
            remaining_stock: reservation.remaining_after,
            reservation: Some(reservation_message(reservation)),
        }))
    }

    async fn release_stock(
        &self,
        request: Request<pb::ReleaseStockRequest>,
    ) -> Result<Response<pb::ReleaseStockResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let outcome = self
            .service
            .release(&caller, &request.into_inner().reservation_id)
            .await?;
        let (outcome, reservation, remaining_stock) = match outcome {
            ReleaseOutcome::Released(r, remaining) => {
                (pb::ReleaseOutcome::Released, Some(r), remaining)
            }
            ReleaseOutcome::AlreadyReleased(r, remaining) => {
                (pb::ReleaseOutcome::AlreadyReleased, Some(r), remaining)
            }
            ReleaseOutcome::NotReserved => (pb::ReleaseOutcome::NotReserved, None, 0),
        };
        Ok(Response::new(pb::ReleaseStockResponse {
            outcome: outcome.into(),
            reservation: reservation.map(reservation_message),
            remaining_stock,
        }))
    }
}

fn deal_state(raw: i32) -> Option<DealState> {
    match pb::DealState::try_from(raw).ok()? {
        pb::DealState::Scheduled => Some(DealState::Scheduled),
        pb::DealState::Active => Some(DealState::Active),
        pb::DealState::SoldOut => Some(DealState::SoldOut),
        pb::DealState::Ended => Some(DealState::Ended),
        pb::DealState::Unspecified => None,
    }
}

fn state_message(state: DealState) -> pb::DealState {
    match state {
        DealState::Scheduled => pb::DealState::Scheduled,
        DealState::Active => pb::DealState::Active,
        DealState::SoldOut => pb::DealState::SoldOut,
        DealState::Ended => pb::DealState::Ended,
    }
}

fn product_message(product: Product) -> pb::Product {
    pb::Product {
        id: product.id,
        name: product.name,
        description: product.description,
        image_url: product.image_url,
        price_cents: product.price_cents,
        created_at: Some(timestamp_from_millis(product.created_at)),
        updated_at: Some(timestamp_from_millis(product.updated_at)),
    }
}

fn deal_message(deal: Deal, now: i64) -> pb::Deal {
    let state = state_message(deal.state(now));
    pb::Deal {
        id: deal.id,
        product_id: deal.product.id.clone(),
        price_cents: deal.price_cents,
        stock: deal.stock,
        remaining_stock: deal.remaining_stock.max(0),
        per_user_limit: deal.per_user_limit,
        starts_at: Some(timestamp_from_millis(deal.starts_at)),
        ends_at: Some(timestamp_from_millis(deal.ends_at)),
        state: state.into(),
        created_at: Some(timestamp_from_millis(deal.created_at)),
        updated_at: Some(timestamp_from_millis(deal.updated_at)),
        product: Some(pb::ProductSummary {
            id: deal.product.id,
            name: deal.product.name,
            image_url: deal.product.image_url,
            price_cents: deal.product.price_cents,
        }),
    }
}

fn reservation_message(reservation: Reservation) -> pb::Reservation {
    pb::Reservation {
        id: reservation.id,
        deal_id: reservation.deal_id,
        user_id: reservation.user_id,
        quantity: reservation.quantity,
        unit_price_cents: reservation.unit_price_cents,
        reserved_at: Some(timestamp_from_millis(reservation.reserved_at)),
        released_at: reservation.released_at.map(timestamp_from_millis),
    }
}

fn event_message(event: DealEvent) -> pb::DealEvent {
    let now = event.occurred_at;
    pb::DealEvent {
        deal_id: event.deal_id,
        sequence: event.sequence,
        r#type: match event.kind {
            DealEventKind::Snapshot => pb::DealEventType::Snapshot,
            DealEventKind::StockChanged => pb::DealEventType::StockChanged,
            DealEventKind::StateChanged => pb::DealEventType::StateChanged,
        }
        .into(),
        remaining_stock: event.remaining_stock.max(0),
        state: state_message(event.state).into(),
        occurred_at: Some(timestamp_from_millis(event.occurred_at)),
        deal: event.deal.map(|deal| deal_message(deal, now)),
    }
}
