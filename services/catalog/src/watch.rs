//! WatchDeal as a stream of domain events: a snapshot, then stock changes
//! (coalesced to at most one per interval) and the clock's state changes,
//! ending after the deal ends.

use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

use crate::{
    domain::{Deal, DealState},
    feed::StockLevel,
    service::now_ms,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DealEventKind {
    Snapshot,
    StockChanged,
    StateChanged,
}

#[derive(Debug, Clone)]
pub struct DealEvent {
    pub deal_id: String,
    /// Strictly increasing per deal: `4 × version + phase`, where the phase
    /// (0 before the window, 1 in it, 2 after) only moves forward with the
    /// clock, so clock-driven state changes order after stock changes of the
    /// same version.
    pub sequence: i64,
    pub kind: DealEventKind,
    pub remaining_stock: i32,
    pub state: DealState,
    /// Epoch ms.
    pub occurred_at: i64,
    /// Set on the snapshot.
    pub deal: Option<Deal>,
}

fn phase(state: DealState) -> i64 {
    match state {
        DealState::Scheduled => 0,
        DealState::Active | DealState::SoldOut => 1,
        DealState::Ended => 2,
    }
}

fn sequence(version: i64, state: DealState) -> i64 {
    version.saturating_mul(4).saturating_add(phase(state))
}

/// The events of one watcher.
pub fn deal_events(
    deal: Deal,
    mut changes: watch::Receiver<StockLevel>,
    min_interval: Duration,
) -> impl Stream<Item = DealEvent> + Send {
    async_stream::stream! {
        let now = now_ms();
        let mut state = deal.state(now);
        let mut level = StockLevel {
            version: deal.version,
            remaining_stock: deal.remaining_stock,
            changed_at: now,
        };
        changes.mark_unchanged();
        yield DealEvent {
            deal_id: deal.id.clone(),
            sequence: sequence(level.version, state),
            kind: DealEventKind::Snapshot,
            remaining_stock: level.remaining_stock,
            state,
            occurred_at: now,
            deal: Some(deal.clone()),
        };
        while state != DealState::Ended {
            let boundary = if state == DealState::Scheduled { deal.starts_at } else { deal.ends_at };
            let wait = Duration::from_millis(u64::try_from(boundary - now_ms()).unwrap_or(0));
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
            let latest = *changes.borrow_and_update();
            let stock_moved = latest.version > level.version;
            if stock_moved {
                level = latest;
            }
            let now = now_ms();
            let new_state = deal_state(&deal, now, level.remaining_stock);
            if !stock_moved && new_state == state {
                continue;
            }
            let kind = if new_state == state {
                DealEventKind::StockChanged
            } else {
                DealEventKind::StateChanged
            };
            state = new_state;
            yield DealEvent {
                deal_id: deal.id.clone(),
                sequence: sequence(level.version, state),
                kind,
                remaining_stock: level.remaining_stock,
                state,
                occurred_at: if stock_moved { level.changed_at } else { now },
                deal: None,
            };
            if stock_moved {
                // Coalesce: whatever changes meanwhile arrives as one update.
                tokio::time::sleep(min_interval).await;
            }
        }
    }
}

fn deal_state(deal: &Deal, now: i64, remaining_stock: i32) -> DealState {
    DealState::at(now, deal.starts_at, deal.ends_at, remaining_stock)
}
