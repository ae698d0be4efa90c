//! Live deal stock for WatchDeal: one `watch` channel per watched deal, fed
//! through the bus so that changes made by any replica reach every replica's
//! watchers. A `watch` channel keeps only the latest value, so a burst of
//! changes costs each watcher one wake-up, and memory stays one value per
//! deal however many watch it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use flashmesh_platform::pubsub::{Bus, Delivery};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

const CHANNEL: &str = "catalog:deal-stock";

/// A deal's stock after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    pub version: i64,
    pub remaining_stock: i32,
    /// Epoch ms.
    pub changed_at: i64,
}

#[derive(Serialize, Deserialize)]
struct StockMessage {
    deal_id: String,
    level: StockLevel,
}

type Senders = Mutex<HashMap<String, watch::Sender<StockLevel>>>;

pub struct DealFeed {
    bus: Arc<dyn Bus>,
    senders: Arc<Senders>,
    _stop: DropGuard,
}

impl DealFeed {
    pub async fn new(bus: Arc<dyn Bus>) -> Self {
        let senders: Arc<Senders> = Arc::default();
        let stop = CancellationToken::new();
        let mut subscription = bus.subscribe(CHANNEL).await;
        let listener = senders.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    () = stopped.cancelled() => return,
                    delivery = subscription.recv() => delivery,
                };
                match delivery {
                    Some(Delivery::Message(payload)) => {
                        if let Ok(message) = serde_json::from_slice::<StockMessage>(&payload) {
                            apply(&listener, &message.deal_id, message.level);
                        }
                    }
                    // Watchers converge with the next change; versions keep
                    // them from going backwards meanwhile.
                    Some(Delivery::Missed) => {}
                    None => return,
                }
            }
        });
        Self {
            bus,
            senders,
            _stop: stop.drop_guard(),
        }
    }

    /// Tells every replica's watchers about a committed change.
    pub async fn publish(&self, deal_id: &str, level: StockLevel) {
        let message = StockMessage {
            deal_id: deal_id.to_owned(),
            level,
        };
        let payload = serde_json::to_vec(&message).unwrap_or_default();
        if let Err(e) = self.bus.publish(CHANNEL, &payload).await {
            tracing::warn!(error = %e, deal_id, "deal change not broadcast; watchers catch up on the next one");
        }
    }

    /// Follows a deal's stock, starting from `current`.
    pub fn watch(&self, deal_id: &str, current: StockLevel) -> watch::Receiver<StockLevel> {
        let mut senders = lock(&self.senders);
        senders.retain(|_, sender| sender.receiver_count() > 0);
        let sender = senders
            .entry(deal_id.to_owned())
            .or_insert_with(|| watch::channel(current).0);
        sender.send_if_modified(|level| newer(level, current));
        sender.subscribe()
    }

    /// Streams following `deal_id` in this replica right now.
    pub fn watchers(&self, deal_id: &str) -> usize {
        lock(&self.senders)
            .get(deal_id)
            .map_or(0, watch::Sender::receiver_count)
    }
}

fn lock(
    senders: &Senders,
) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<StockLevel>>> {
    // Every update is one map operation; a panic cannot leave one half done.
    senders.lock().unwrap_or_else(PoisonError::into_inner)
}

fn apply(senders: &Senders, deal_id: &str, level: StockLevel) {
    if let Some(sender) = lock(senders).get(deal_id) {
        sender.send_if_modified(|current| newer(current, level));
    }
}

/// Replaces `current` with `candidate` if it is a later version.
fn newer(current: &mut StockLevel, candidate: StockLevel) -> bool {
    if candidate.version > current.version {
        *current = candidate;
        true
    } else {
        false
    }
}
