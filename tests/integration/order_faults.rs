//! The order service when its neighbours fail (the catalog stops, Redis
//! stops, a stream entry arrives corrupted) and when its callers give up
//! mid-call.

use std::{
    collections::HashSet,
    net::TcpListener as StdListener,
    path::Path,
    process::{Child, Command, Stdio},
    task::Poll,
    time::{Duration, Instant},
};

use crate::{
    common::{
        Backend, OrderStack, StackEnv, Warnings, create_deal, now_ms, open_window, reason,
        redis_url,
    },
    order::{
        count, deal_remaining, deal_sales, eventually, live_reservations, new_key, place, users,
    },
};
use flashmesh_order::{
    domain::{Order, OrderChange, OrderItem},
    events::outbox_row,
    storage::{Claim, ClaimOutcome, OrderStore, OutboxRow},
};
use flashmesh_platform::db::Database;
use flashmesh_proto::order::v1::{self as pb, order_service_client::OrderServiceClient};
use futures::future::join_all;
use redis::AsyncCommands;
use sqlx::{Connection, PgConnection};
use tonic::Code;

on_both_backends!(
    a_transaction_given_up_at_any_await_never_swallows_later_writes;
    with warnings: orders_given_up_by_their_callers_lose_nothing_and_leave_no_transaction_open,
);

/// One entry of the order stream, as a test reads it.
pub struct Entry {
    pub key: String,
    pub event_id: String,
}

async fn entries(url: &str, stream: &str) -> Vec<Entry> {
    let mut redis = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis is reachable");
    let reply: redis::streams::StreamRangeReply = redis.xrange_all(stream).await.unwrap();
    reply
        .ids
        .into_iter()
        .map(|entry| Entry {
            key: entry.get("key").unwrap_or_default(),
            event_id: entry.get("event_id").unwrap_or_default(),
        })
        .collect()
}

/// The order stream's entries (Postgres backend, shared Redis).
pub async fn order_stream_entries(env: &StackEnv) -> Vec<Entry> {
    entries(
        &redis_url(),
        &format!("{}flashmesh.orders.v1", env.redis_prefix()),
    )
    .await
}

/// A redis-server of this test's own, which it may stop and restart; its
/// append-only file survives restarts, as a production Redis's does.
struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    process: Option<Child>,
}

impl PrivateRedis {
    async fn start() -> Self {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            process: None,
        };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        self.process = Some(spawn_redis(self.port, self.dir.path()));
        let start = Instant::now();
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_redis(port: u16, dir: &Path) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (the machine's Redis package)")
}

/// Places `count` orders of one unit, ten at a time; all must succeed.
async fn place_all(
    stack: &OrderStack,
    deal_id: &str,
    tokens: &[String],
    count: usize,
) -> Vec<String> {
    let channel = stack.order.running.channel().await;
    let mut ids = Vec::new();
    for batch in (0..count).collect::<Vec<_>>().chunks(10) {
        let calls = batch.iter().map(|&i| {
            let mut client = OrderServiceClient::new(channel.clone());
            let request = place(deal_id, 1, &new_key(), &tokens[i % tokens.len()]);
            async move { client.place_order(request).await }
        });
        for answer in join_all(calls).await {
            ids.push(
                answer
                    .expect("orders commit")
                    .into_inner()
                    .order
                    .unwrap()
                    .id,
            );
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_catalog_fails_fast_and_orders_resume_when_it_returns() {
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_BREAKER_OPEN_FOR", "1s")
        .set("FLASHMESH_CATALOG_TIMEOUT", "500ms")
        .set("FLASHMESH_SWEEP_INTERVAL", "100ms");
    let mut stack = env.start_orders().await;
    let mut catalog = stack.catalog.catalog_client().await;
    let deal = create_deal(
        &mut catalog,
        &stack.catalog.admin_token,
        100,
        100,
        open_window(),
    )
    .await;
    let tokens = users(&stack, 1).await;
    let mut client = stack.order.client().await;
    place_all(&stack, &deal.id, &tokens, 5).await;

    let addr = stack.catalog.catalog.running.addr;
    let stopped = std::mem::replace(
        &mut stack.catalog.catalog,
        env.start_catalog_replica().await,
    );
    stopped.running.stop().await;
    // The stand-in replica must not be what the order service reaches.
    assert_ne!(stack.catalog.catalog.running.addr, addr);

    let deadline = Duration::from_secs(2);
    let mut fast_failures = 0;
    let key = new_key();
    for _ in 0..20 {
        let mut request = place(&deal.id, 1, &key, &tokens[0]);
        request.set_timeout(deadline);
        let started = Instant::now();
        let status = client.place_order(request).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{status:?}"
        );
        assert!(
            took < deadline + Duration::from_millis(500),
            "answered within the deadline: {took:?}"
        );
        if status.code() == Code::Unavailable {
            assert_eq!(reason(&status), "CATALOG_UNAVAILABLE");
        }
        if crate::order::error_metadata(&status, "breakerOpen").as_deref() == Some("true") {
            assert!(
                took < Duration::from_millis(200),
                "an open breaker fails fast: {took:?}"
            );
            fast_failures += 1;
        }
    }
    assert!(fast_failures > 0, "the breaker opened");
    let metrics = env.metrics.render();
    assert!(
        metrics.contains(r#"flashmesh_circuit_breaker_state{breaker="catalog"} 2"#)
            || metrics.contains(r#"flashmesh_circuit_breaker_state{breaker="catalog"} 1"#),
        "the breaker's state is reported: {metrics}"
    );
    assert!(
        !metrics.contains(
            r#"flashmesh_circuit_breaker_transitions_total{breaker="catalog",to="open"} 0"#
        ),
        "its opening is counted: {metrics}"
    );

    // The catalog returns on its address; the breaker lets a trial through
    // and orders flow again, the failed key included.
    let returned = env.start_catalog_replica_on(&addr.to_string()).await;
    stack.catalog.catalog = returned;
    let started = Instant::now();
    let order = loop {
        match client
            .place_order(place(&deal.id, 1, &key, &tokens[0]))
            .await
        {
            Ok(response) => break response.into_inner().order.unwrap(),
            Err(status) => {
                assert!(
                    matches!(status.code(), Code::Unavailable | Code::Aborted),
                    "{status:?}"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "the service recovers"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(order.state(), pb::OrderState::Confirmed);
    let metrics = env.metrics.render();
    assert!(
        metrics.contains(r#"flashmesh_circuit_breaker_state{breaker="catalog"} 0"#),
        "the breaker is reported closed again: {metrics}"
    );

    // Nothing was taken by the failed attempts, or it was given back.
    eventually(
        Duration::from_secs(10),
        "failed attempts hold no stock",
        || {
            let stack = &stack;
            let deal_id = deal.id.clone();
            async move {
                deal_remaining(stack, &deal_id).await == 94
                    && live_reservations(stack, &deal_id).await == (6, 6)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_commit_while_redis_is_down_and_every_event_arrives_once() {
    let redis = PrivateRedis::start().await;
    let mut redis = redis;
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_OUTBOX_POLL", "100ms")
        .set("FLASHMESH_CONSUMER_CLAIM_IDLE", "1s");
    let catalog = env.start_catalog().await;
    env.set("FLASHMESH_CATALOG_URL", catalog.catalog.running.endpoint());
    // The order service's Redis is the one this test stops; the catalog
    // keeps the shared one.
    env.set("REDIS_URL", redis.url());
    let order = env.start_order_replica(&catalog.order_token).await;
    let stack = OrderStack { catalog, order };
    let mut catalog_client = stack.catalog.catalog_client().await;
    let deal = create_deal(
        &mut catalog_client,
        &stack.catalog.admin_token,
        1000,
        1000,
        open_window(),
    )
    .await;
    let tokens = users(&stack, 10).await;

    let mut ids = place_all(&stack, &deal.id, &tokens, 50).await;
    redis.kill();
    ids.extend(place_all(&stack, &deal.id, &tokens, 50).await);
    let store = stack.order.service.store().clone();
    assert!(
        store.unpublished_events().await.unwrap() > 0,
        "events wait in the outbox"
    );
    redis.restart().await;
    ids.extend(place_all(&stack, &deal.id, &tokens, 50).await);

    let orders = i64::try_from(ids.len()).unwrap();
    eventually(
        Duration::from_secs(60),
        "every event published, projected and counted",
        || {
            let stack = &stack;
            let store = store.clone();
            let deal_id = deal.id.clone();
            async move {
                store.unpublished_events().await.unwrap() == 0
                    && count(store.pool(), "SELECT COUNT(*) FROM order_status").await == orders
                    && deal_sales(stack, &deal_id).await.units_sold == orders
            }
        },
    )
    .await;
    let sales = deal_sales(&stack, &deal.id).await;
    assert_eq!(sales.orders_confirmed, orders, "counted once each");

    let stream = format!("{}flashmesh.orders.v1", env.redis_prefix());
    let entries = entries(&redis.url(), &stream).await;
    let mut event_of: std::collections::HashMap<String, String> = Default::default();
    for entry in &entries {
        let first = event_of
            .entry(entry.key.clone())
            .or_insert_with(|| entry.event_id.clone());
        assert_eq!(
            first, &entry.event_id,
            "an order's duplicates share one event id"
        );
    }
    let expected: std::collections::HashSet<String> = ids.into_iter().collect();
    let published: std::collections::HashSet<String> = event_of.into_keys().collect();
    assert_eq!(published, expected, "no event lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_stream_entry_is_dead_lettered_and_acknowledged() {
    let (env, stack) = crate::order::order_stack(Backend::Postgres).await;
    let stream = format!("{}flashmesh.orders.v1", env.redis_prefix());
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis is reachable");
    // A real order first, so both consumer groups exist and are reading.
    let mut catalog = stack.catalog.catalog_client().await;
    let deal = create_deal(
        &mut catalog,
        &stack.catalog.admin_token,
        10,
        2,
        open_window(),
    )
    .await;
    let tokens = users(&stack, 1).await;
    place_all(&stack, &deal.id, &tokens, 1).await;
    let store = stack.order.service.store().clone();
    eventually(
        Duration::from_secs(10),
        "the real order is projected",
        || {
            let store = store.clone();
            async move { count(store.pool(), "SELECT COUNT(*) FROM order_status").await == 1 }
        },
    )
    .await;

    let _: String = redis
        .xadd(
            &stream,
            "*",
            &[
                ("event_id", uuid::Uuid::now_v7().to_string().into_bytes()),
                ("key", uuid::Uuid::now_v7().to_string().into_bytes()),
                ("kind", b"order.state_changed".to_vec()),
                ("payload", b"tampered".to_vec()),
                ("traceparent", Vec::new()),
                ("sha256", "0".repeat(64).into_bytes()),
            ],
        )
        .await
        .unwrap();

    let dead_letters = format!("{stream}.dlq");
    eventually(
        Duration::from_secs(10),
        "both groups dead-letter the entry",
        || {
            let mut redis = redis.clone();
            let dead_letters = dead_letters.clone();
            async move { redis.xlen::<_, usize>(&dead_letters).await.unwrap_or(0) == 2 }
        },
    )
    .await;
    let reply: redis::streams::StreamRangeReply = redis.xrange_all(&dead_letters).await.unwrap();
    for entry in &reply.ids {
        let why: String = entry.get("reason").unwrap_or_default();
        assert!(why.to_lowercase().contains("hash"), "{why}");
    }
    for group in ["order-status-projector", "deal-sales-counter"] {
        let pending: redis::streams::StreamPendingReply =
            redis.xpending(&stream, group).await.unwrap();
        assert_eq!(pending.count(), 0, "{group} acknowledged everything");
    }
    assert_eq!(
        count(store.pool(), "SELECT COUNT(*) FROM order_status").await,
        1
    );
}

/// Polls `future` until it has waited `awaits` times, then drops it there,
/// as a caller past its deadline or gone (a dropped handler) does.
async fn give_up_after<F: Future>(future: F, awaits: usize) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut waited = 0;
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => {
            waited += 1;
            if waited >= awaits {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }
    })
    .await
}

fn new_claim() -> Claim {
    Claim {
        user_id: uuid::Uuid::now_v7().to_string(),
        key: new_key(),
        fingerprint: "f".to_owned(),
        order_id: uuid::Uuid::now_v7().to_string(),
        reservation_id: uuid::Uuid::now_v7().to_string(),
    }
}

/// A one-unit order under `claim`, and its creation event.
fn order_under(claim: &Claim) -> (Order, OutboxRow) {
    let order = Order::confirmed(
        claim.order_id.clone(),
        claim.user_id.clone(),
        claim.key.clone(),
        OrderItem {
            deal_id: uuid::Uuid::now_v7().to_string(),
            product_id: uuid::Uuid::now_v7().to_string(),
            quantity: 1,
            unit_price_cents: 100,
            reservation_id: claim.reservation_id.clone(),
        },
        now_ms(),
    );
    let event = outbox_row(
        &OrderChange {
            order: order.clone(),
            previous: None,
            occurred_at: order.created_at,
        },
        "",
    );
    (order, event)
}

async fn claim(store: &OrderStore, claim: &Claim) {
    let now = now_ms();
    let outcome = store
        .claim(claim, now + 60_000, now + 60_000, now)
        .await
        .expect("claim");
    assert!(matches!(outcome, ClaimOutcome::Claimed), "a fresh key");
}

/// A caller that gives up while a transaction is under way (at BEGIN, mid
/// statement, at COMMIT) must leave the pooled connection outside any
/// transaction: otherwise the next caller's "autocommit" writes run inside
/// the leftover transaction, unseen by everyone else and lost when it rolls
/// back (a PlaceOrder whose claim nobody else can see fails).
async fn a_transaction_given_up_at_any_await_never_swallows_later_writes(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    // One connection, so every call reuses the one a given-up call held.
    env.set("DATABASE_MAX_CONNECTIONS", "1");
    let platform = env.platform();
    let db = Database::connect(&platform, flashmesh_order::SCHEMA)
        .await
        .expect("the order database");
    db.migrate(&flashmesh_order::MIGRATOR)
        .await
        .expect("migrations");
    let store = OrderStore::new(db.pool().clone(), db.backend());
    let observer = Database::connect(&platform, flashmesh_order::SCHEMA)
        .await
        .expect("a second pool");

    for awaits in 1..=8 {
        for round in 0..16 {
            let taken = new_claim();
            claim(&store, &taken).await;
            let operation = if round % 2 == 0 {
                if let Some(done) =
                    give_up_after(store.abandon(&taken, true, now_ms()), awaits).await
                {
                    done.expect("abandon");
                }
                "abandon"
            } else {
                let (order, event) = order_under(&taken);
                if let Some(done) =
                    give_up_after(store.commit_order(&taken, &order, &event), awaits).await
                {
                    assert!(done.expect("commit_order"), "the claim is the caller's");
                }
                "commit_order"
            };

            let probe = new_claim();
            claim(&store, &probe).await;
            let seen = count(
                observer.pool(),
                &format!(
                    "SELECT COUNT(*) FROM idempotency_keys WHERE reservation_id = '{}'",
                    probe.reservation_id
                ),
            )
            .await;
            assert_eq!(
                seen, 1,
                "a claim written after {operation} was given up at await {awaits} \
                 is visible to other connections"
            );
        }
    }
}

/// Callers that give up mid-PlaceOrder, at every step (claim, reserve,
/// commit), by deadline (`grpc-timeout`: the server drops the call) or by
/// hanging up (the stream is reset: the server drops the call).
async fn orders_given_up_by_their_callers_lose_nothing_and_leave_no_transaction_open(
    backend: Backend,
    warnings: Warnings,
) {
    const CALLS: usize = 2000;
    const WAVE: usize = 50;
    const STOCK: i32 = 1000;
    let mut env = StackEnv::new(backend).await;
    env.set("FLASHMESH_CONCURRENCY_LIMIT", "10000")
        .set("FLASHMESH_REQUEST_TIMEOUT", "1s")
        .set("FLASHMESH_CLAIM_LEASE", "2s")
        .set("FLASHMESH_SWEEP_INTERVAL", "100ms")
        // Commits wake the relay; no poll, so no transaction runs once the
        // calls and the sweeps are over.
        .set("FLASHMESH_OUTBOX_POLL", "1h");
    let stack = env.start_orders().await;
    let mut catalog = stack.catalog.catalog_client().await;
    let deal = create_deal(
        &mut catalog,
        &stack.catalog.admin_token,
        STOCK,
        STOCK,
        open_window(),
    )
    .await;
    let tokens = users(&stack, 200).await;
    // Waves of concurrent calls, each wave on a connection of its own: a
    // server resets a connection on which too many streams were reset.
    let mut answers = Vec::new();
    for wave in 0..CALLS / WAVE {
        let channel = stack.order.running.channel().await;
        let calls = (wave * WAVE..(wave + 1) * WAVE).map(|i| {
            let mut client = OrderServiceClient::new(channel.clone());
            let mut request = place(
                &deal.id,
                1 + i32::from(i % 2 == 1),
                &new_key(),
                &tokens[i % tokens.len()],
            );
            // Most give up within 80 ms, a tenth waits long enough.
            let patience = if i % 10 == 9 {
                Duration::from_millis(900)
            } else {
                Duration::from_millis(1 + u64::try_from(i * 7 % 80).unwrap())
            };
            async move {
                if i % 3 == 0 {
                    tokio::time::timeout(patience, client.place_order(request))
                        .await
                        .unwrap_or_else(|_| Err(tonic::Status::cancelled("hung up")))
                } else {
                    request.set_timeout(patience);
                    client.place_order(request).await
                }
            }
        });
        answers.extend(join_all(calls).await);
    }
    let mut accepted = HashSet::new();
    let mut unexpected = Vec::new();
    for answer in answers {
        match answer {
            Ok(response) => {
                accepted.insert(response.into_inner().order.expect("an order").id);
            }
            Err(status) => match status.code() {
                Code::DeadlineExceeded | Code::Cancelled | Code::Unavailable => {}
                Code::FailedPrecondition
                    if ["SOLD_OUT", "LIMIT_EXCEEDED"].contains(&reason(&status).as_str()) => {}
                _ => unexpected.push(status),
            },
        }
    }
    assert!(
        unexpected.is_empty(),
        "fresh keys fail only by deadline, hang-up or refusal: {unexpected:?}"
    );
    assert!(!accepted.is_empty(), "some callers waited long enough");

    // Attempts given up after reserving are swept back once their lease
    // runs out.
    let store = stack.order.service.store().clone();
    eventually(
        Duration::from_secs(30),
        "every given-up attempt settled",
        || {
            let store = store.clone();
            async move {
                count(
                    store.pool(),
                    "SELECT COUNT(*) FROM idempotency_keys WHERE state = 'in_progress'",
                )
                .await
                    == 0
                    && count(store.pool(), "SELECT COUNT(*) FROM stock_releases").await == 0
            }
        },
    )
    .await;

    let stored: HashSet<String> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(store.pool())
        .await
        .expect("order ids")
        .into_iter()
        .collect();
    assert!(
        accepted.is_subset(&stored),
        "every accepted order is stored: {} of {} missing",
        accepted.difference(&stored).count(),
        accepted.len()
    );
    let ordered_units = count(
        store.pool(),
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM order_items",
    )
    .await;
    let orders = i64::try_from(stored.len()).unwrap();
    assert_eq!(
        live_reservations(&stack, &deal.id).await,
        (orders, ordered_units),
        "every live reservation belongs to an order, and every order holds its units"
    );
    assert_eq!(
        deal_remaining(&stack, &deal.id).await,
        i64::from(STOCK) - ordered_units,
        "the stock taken is the stock ordered, never more"
    );

    if let Some(database) = &env.database {
        let mut admin = PgConnection::connect(&database.url)
            .await
            .expect("PostgreSQL");
        let open: Vec<(String, String)> = sqlx::query_as(
            "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() \
             AND state LIKE 'idle in transaction%'",
        )
        .fetch_all(&mut admin)
        .await
        .expect("pg_stat_activity");
        assert!(
            open.is_empty(),
            "connections left inside a transaction: {open:?}"
        );
    }
    let logged = |warning: &str| {
        warnings
            .lines()
            .iter()
            .filter(|line| line.contains(warning))
            .count()
    };
    assert_eq!(
        (
            logged("already a transaction in progress"),
            logged("no transaction in progress")
        ),
        (0, 0),
        "every transaction ends as it was told to: no BEGIN inside a transaction left \
         open on a pooled connection, no ROLLBACK queued behind a COMMIT given up on"
    );
    println!(
        "{} of {CALLS} calls accepted, {orders} orders stored, {ordered_units} units ordered",
        accepted.len()
    );
}
