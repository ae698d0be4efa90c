//! The gRPC face of the order service: decode, call the use case, encode.

use std::{pin::Pin, sync::Arc, time::Duration};

use flashmesh_platform::{
    call::{deadline, traceparent},
    error::FieldViolation,
    identity::Caller,
};
use flashmesh_proto::order::v1 as pb;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    domain::PlaceOrder,
    error::OrderError,
    service::OrderService,
    wire::{order_message, sales_message, state_from_message},
};

pub struct OrderGrpc {
    service: Arc<OrderService>,
    request_timeout: Duration,
}

impl OrderGrpc {
    pub fn new(service: Arc<OrderService>, request_timeout: Duration) -> Self {
        Self {
            service,
            request_timeout,
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchOrderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::order_service_server::OrderService for OrderGrpc {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let deadline = deadline(&request, self.request_timeout);
        let traceparent = traceparent(&request);
        let r = request.into_inner();
        let place = PlaceOrder::parse(&r.deal_id, r.quantity, &r.idempotency_key)
            .map_err(OrderError::InvalidInput)?;
        let order = self
            .service
            .place(&caller, place, deadline, &traceparent)
            .await?;
        Ok(Response::new(pb::PlaceOrderResponse {
            order: Some(order_message(&order)),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let order = self
            .service
            .order(&caller, &request.into_inner().id)
            .await?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(order_message(&order)),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let r = request.into_inner();
        let states = r
            .states()
            .map(|state| {
                state_from_message(state).ok_or_else(|| {
                    FieldViolation::new("states", "ORDER_STATE_UNSPECIFIED is not a state")
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|v| OrderError::InvalidInput(vec![v]))?;
        if r.states.len() != r.states().count() {
            return Err(OrderError::InvalidInput(vec![FieldViolation::new(
                "states",
                "contains an unknown OrderState value",
            )])
            .into());
        }
        let page = self
            .service
            .orders(&caller, &states, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListOrdersResponse {
            orders: page.orders.iter().map(order_message).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let traceparent = traceparent(&request);
        let order = self
            .service
            .cancel(&caller, &request.into_inner().id, &traceparent)
            .await?;
        Ok(Response::new(pb::CancelOrderResponse {
            order: Some(order_message(&order)),
        }))
    }

    type WatchOrderStream = EventStream;

    async fn watch_order(
        &self,
        request: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let caller = Caller::of(&request)?.clone();
        let events = self
            .service
            .watch(&caller, &request.into_inner().id)
            .await?
            .map(|event| Ok(pb::WatchOrderResponse { event: Some(event) }));
        Ok(Response::new(Box::pin(events)))
    }

    async fn get_deal_sales(
        &self,
        request: Request<pb::GetDealSalesRequest>,
    ) -> Result<Response<pb::GetDealSalesResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let sales = self
            .service
            .deal_sales(&caller, &request.into_inner().deal_id)
            .await?;
        Ok(Response::new(pb::GetDealSalesResponse {
            sales: Some(sales_message(sales)),
        }))
    }
}
