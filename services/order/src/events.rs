//! Order events: written to the outbox with the change they report, then
//! moved by the [`OutboxRelay`] to the Redis Stream (or, embedded, straight
//! to the in-process consumers), at least once and in order per order.

use std::{sync::Arc, time::Duration};

use flashmesh_platform::streams::{EventHandler, EventStream, Outcome, StreamEvent, process};
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    domain::OrderChange,
    service::now_ms,
    storage::{OrderStore, OutboxRow, RelayError},
    wire::{change_from_message, change_message},
};

/// The kind of every order event: the payload is a `flashmesh.order.v1.OrderEvent`.
pub const ORDER_STATE_CHANGED: &str = "order.state_changed";

const RELAY_BATCH: i64 = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The outbox row recording `change`.
pub fn outbox_row(change: &OrderChange, traceparent: &str) -> OutboxRow {
    OutboxRow {
        event_id: uuid::Uuid::now_v7().to_string(),
        order_id: change.order.id.clone(),
        version: change.order.version,
        kind: ORDER_STATE_CHANGED.to_owned(),
        payload: change_message(change).encode_to_vec(),
        traceparent: traceparent.to_owned(),
        created_at: change.occurred_at,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event kind {0:?}")]
    Kind(String),
    #[error("the payload is not an OrderEvent: {0}")]
    Payload(#[from] prost::DecodeError),
    #[error("the OrderEvent lacks its order or has an unknown state")]
    Incomplete,
}

/// The change an event reports.
pub fn decode(event: &StreamEvent) -> Result<OrderChange, DecodeError> {
    if event.kind != ORDER_STATE_CHANGED {
        return Err(DecodeError::Kind(event.kind.clone()));
    }
    let message = flashmesh_proto::order::v1::OrderEvent::decode(event.payload.as_slice())?;
    change_from_message(message).ok_or(DecodeError::Incomplete)
}

fn stream_event(row: OutboxRow) -> StreamEvent {
    StreamEvent::new(
        row.event_id,
        row.order_id,
        row.kind,
        row.payload,
        row.traceparent,
    )
}

/// A consumer that runs in-process when there is no Redis.
pub struct LocalConsumer {
    pub name: &'static str,
    pub handler: Arc<dyn EventHandler>,
}

/// Where the relay puts events.
pub enum EventSink {
    Stream(Box<EventStream>),
    /// Embedded mode: hand each event to every consumer before the row
    /// counts as published, so a crash replays it (consumers dedupe).
    Local {
        consumers: Vec<LocalConsumer>,
        max_deliveries: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the stream is unavailable: {0}")]
    Stream(#[from] redis::RedisError),
    #[error("storage failed: {0}")]
    Storage(#[from] sqlx::Error),
}

pub struct OutboxRelay {
    store: Arc<OrderStore>,
    sink: EventSink,
    wake: Arc<Notify>,
    poll: Duration,
}

impl OutboxRelay {
    pub fn new(store: Arc<OrderStore>, sink: EventSink, wake: Arc<Notify>, poll: Duration) -> Self {
        Self {
            store,
            sink,
            wake,
            poll,
        }
    }

    /// Publishes until `shutdown`: at once when woken by a commit here,
    /// every poll interval for rows other replicas (or a crash) left.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.poll;
        loop {
            let wait = match self.drain().await {
                Ok(()) => {
                    backoff = self.poll;
                    self.poll
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay failed; retrying");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    backoff
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publishes batches until none is left.
    pub async fn drain(&self) -> Result<(), RelayError<SinkError>> {
        while self
            .store
            .relay_batch(RELAY_BATCH, now_ms(), |rows| self.publish(rows))
            .await?
            > 0
        {}
        Ok(())
    }

    async fn publish(&self, rows: Vec<OutboxRow>) -> Result<(), SinkError> {
        let events: Vec<StreamEvent> = rows.into_iter().map(stream_event).collect();
        match &self.sink {
            EventSink::Stream(stream) => Ok(stream.publish(&events).await?),
            EventSink::Local {
                consumers,
                max_deliveries,
            } => {
                for event in &events {
                    for consumer in consumers {
                        self.deliver_locally(consumer, event, *max_deliveries)
                            .await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn deliver_locally(
        &self,
        consumer: &LocalConsumer,
        event: &StreamEvent,
        max_deliveries: u64,
    ) -> Result<(), SinkError> {
        let mut delay = Duration::from_millis(10);
        for delivery in 1..=max_deliveries {
            match process(consumer.handler.as_ref(), event, delivery, max_deliveries).await {
                Outcome::Handled => return Ok(()),
                Outcome::Retry(error) => {
                    tracing::warn!(consumer = consumer.name, event_id = %event.event_id, %error, "event not applied; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Outcome::DeadLetter(reason) => {
                    tracing::error!(consumer = consumer.name, event_id = %event.event_id, reason = %reason.describe(), "event dead-lettered");
                    self.store
                        .dead_letter(
                            consumer.name,
                            &event.event_id,
                            &reason.describe(),
                            &event.payload,
                            now_ms(),
                        )
                        .await?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
