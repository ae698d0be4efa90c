//! The catalog service over real gRPC, on both backends.

use std::{collections::HashMap, time::Duration};

use crate::common::{
    Backend, StackEnv, create_deal, create_product, now_ms, open_window, reason, violated_fields,
    with_bearer,
};
use flashmesh_platform::time::timestamp_from_millis;
use flashmesh_proto::catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient};
use futures::{StreamExt, future::join_all};
use tonic::{Code, transport::Channel};

on_both_backends!(
    products_and_deals_need_an_admin_and_valid_input,
    a_flash_sale_never_oversells_and_replays_change_nothing,
    cold_reads_are_single_flight_and_sold_out_skips_the_database,
    watch_deal_streams_a_snapshot_then_changes_and_ends,
    lists_page_with_signed_tokens,
);

async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(crate::common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis is reachable at REDIS_URL")
}

/// The units the stock gate holds for a deal, if it has a count.
async fn gate_remaining(env: &StackEnv, deal_id: &str) -> Option<i64> {
    redis::cmd("GET")
        .arg(format!(
            "{}gate:{{{deal_id}}}:remaining",
            env.redis_prefix()
        ))
        .query_async(&mut redis_connection().await)
        .await
        .unwrap()
}

/// Deletes every key of this test's Redis prefix: a flush of our own data,
/// leaving other tests' keys alone.
async fn flush_redis(env: &StackEnv) -> usize {
    let prefix = env.redis_prefix();
    let mut conn = redis_connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_mid_sale_rebuilds_the_gate_from_the_database() {
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_CONCURRENCY_LIMIT", "10000");
    let stack = env.start_catalog().await;
    let mut client = stack.catalog_client().await;
    let deal = create_deal(&mut client, &stack.admin_token, 100, 2, open_window()).await;

    let wave = |users: std::ops::Range<usize>| {
        let client = client.clone();
        let deal_id = deal.id.clone();
        let token = stack.order_token.clone();
        join_all(users.map(move |i| {
            let mut client = client.clone();
            let request = reserve(
                &deal_id,
                &format!("user-{}", i % 300),
                1,
                &uuid::Uuid::new_v4().to_string(),
                &token,
            );
            async move {
                client
                    .reserve_stock(request)
                    .await
                    .map(|_| format!("user-{}", i % 300))
            }
        }))
    };
    // Half the stock goes before the flush, the rest races it.
    let first = wave(0..50).await;
    assert_eq!(first.iter().filter(|r| r.is_ok()).count(), 50);
    let racing = tokio::spawn(wave(50..2_050));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(flush_redis(&env).await > 0, "the gate had keys to lose");
    let second = racing.await.unwrap();

    let mut held: HashMap<String, i32> = HashMap::new();
    for user in first.into_iter().chain(second).filter_map(Result::ok) {
        *held.entry(user).or_default() += 1;
    }
    assert_eq!(held.values().sum::<i32>(), 100, "exactly the stock is sold");
    assert!(held.values().all(|&units| units <= 2));
    assert_eq!(
        stack
            .catalog
            .service
            .fresh_deal(&deal.id)
            .await
            .unwrap()
            .remaining_stock,
        0
    );

    // The gate was rebuilt from the database. (A reseed that raced requests
    // still in flight may sit above the truth until its TTL: it then costs
    // database work, never stock.)
    let late = client
        .reserve_stock(new_reservation(&deal.id, "late", 1, &stack.order_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&late), "SOLD_OUT");
    let gate = gate_remaining(&env, &deal.id).await;
    assert!(
        gate.is_some_and(|units| units >= 0),
        "gate rebuilt: {gate:?}"
    );
    assert_eq!(
        stack
            .catalog
            .service
            .fresh_deal(&deal.id)
            .await
            .unwrap()
            .remaining_stock,
        0
    );
}

async fn get_product(client: &mut CatalogServiceClient<Channel>, id: &str) -> pb::Product {
    client
        .get_product(pb::GetProductRequest { id: id.into() })
        .await
        .expect("get product")
        .into_inner()
        .product
        .expect("product")
}

fn reserve(
    deal_id: &str,
    user: &str,
    quantity: i32,
    reservation_id: &str,
    token: &str,
) -> tonic::Request<pb::ReserveStockRequest> {
    with_bearer(
        pb::ReserveStockRequest {
            deal_id: deal_id.into(),
            user_id: user.into(),
            quantity,
            reservation_id: reservation_id.into(),
        },
        token,
    )
}

/// A ReserveStock under a fresh reservation id.
fn new_reservation(
    deal_id: &str,
    user: &str,
    quantity: i32,
    token: &str,
) -> tonic::Request<pb::ReserveStockRequest> {
    reserve(
        deal_id,
        user,
        quantity,
        &uuid::Uuid::new_v4().to_string(),
        token,
    )
}

async fn products_and_deals_need_an_admin_and_valid_input(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    let stack = env.start_catalog().await;
    let mut client = stack.catalog_client().await;
    let (_, user) = crate::common::sign_up(&mut stack.auth.auth_client().await).await;

    let request = || pb::CreateProductRequest {
        name: "Kettle".into(),
        description: String::new(),
        image_url: None,
        price_cents: 2_500,
    };
    let anonymous = client.create_product(request()).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let as_user = client
        .create_product(with_bearer(request(), &user.access_token))
        .await
        .unwrap_err();
    assert_eq!(as_user.code(), Code::PermissionDenied);
    assert_eq!(reason(&as_user), "ADMIN_REQUIRED");

    let invalid = client
        .create_product(with_bearer(
            pb::CreateProductRequest {
                name: "x".repeat(201),
                description: String::new(),
                image_url: Some("ftp://nope".into()),
                price_cents: 0,
            },
            &stack.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&invalid),
        ["name", "image_url", "price_cents"]
    );

    let product = create_product(&mut client, &stack.admin_token).await;
    let fetched = get_product(&mut client, &product.id).await;
    assert_eq!(fetched, product);

    let updated = client
        .update_product(with_bearer(
            pb::UpdateProductRequest {
                id: product.id.clone(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["price_cents".into(), "image_url".into()],
                }),
                price_cents: 45_000,
                ..Default::default()
            },
            &stack.admin_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .product
        .unwrap();
    assert_eq!(updated.price_cents, 45_000);
    assert_eq!(updated.image_url, None);
    assert_eq!(updated.name, product.name);
    let read_back = get_product(&mut client, &product.id).await;
    assert_eq!(read_back, updated, "the write invalidated the cache");

    let bad_mask = client
        .update_product(with_bearer(
            pb::UpdateProductRequest {
                id: product.id.clone(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["stock".into()],
                }),
                ..Default::default()
            },
            &stack.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad_mask), ["update_mask"]);

    let missing = client
        .get_product(pb::GetProductRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(reason(&missing), "PRODUCT_NOT_FOUND");
    let malformed = client
        .get_deal(pb::GetDealRequest {
            id: "42; DROP TABLE deals".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&malformed), ["id"]);

    let now = now_ms();
    let bad_deal = client
        .create_deal(with_bearer(
            pb::CreateDealRequest {
                product_id: product.id.clone(),
                price_cents: -1,
                stock: 0,
                per_user_limit: 5,
                starts_at: Some(timestamp_from_millis(now + 10_000)),
                ends_at: Some(timestamp_from_millis(now)),
            },
            &stack.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_deal.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&bad_deal),
        [
            "price_cents",
            "stock",
            "per_user_limit",
            "ends_at",
            "ends_at"
        ]
    );
    let unknown_product = client
        .create_deal(with_bearer(
            pb::CreateDealRequest {
                product_id: uuid::Uuid::now_v7().to_string(),
                price_cents: 100,
                stock: 10,
                per_user_limit: 1,
                starts_at: Some(timestamp_from_millis(now)),
                ends_at: Some(timestamp_from_millis(now + 60_000)),
            },
            &stack.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown_product), "PRODUCT_NOT_FOUND");

    let deal = create_deal(&mut client, &stack.admin_token, 10, 2, open_window()).await;
    assert_eq!(deal.state(), pb::DealState::Active);
    assert_eq!(deal.remaining_stock, 10);
    assert_eq!(deal.product.as_ref().unwrap().name, "Espresso machine");

    // Only the order service may take stock.
    let by_user = client
        .reserve_stock(new_reservation(&deal.id, "u", 1, &user.access_token))
        .await
        .unwrap_err();
    assert_eq!(by_user.code(), Code::PermissionDenied);
    assert_eq!(reason(&by_user), "CALLER_NOT_ALLOWED");
    let zero = client
        .reserve_stock(reserve(&deal.id, "u", 0, "not-a-uuid", &stack.order_token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&zero), ["reservation_id", "quantity"]);
}

async fn a_flash_sale_never_oversells_and_replays_change_nothing(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    env.set("FLASHMESH_CONCURRENCY_LIMIT", "10000");
    let stack = env.start_catalog().await;
    let mut client = stack.catalog_client().await;
    let deal = create_deal(&mut client, &stack.admin_token, 100, 2, open_window()).await;

    // 2,000 calls from 500 users, one unit each, all at once.
    let calls: Vec<(String, String)> = (0..2_000)
        .map(|i| {
            (
                format!("user-{}", i % 500),
                uuid::Uuid::new_v4().to_string(),
            )
        })
        .collect();
    let results = join_all(calls.iter().map(|(user, id)| {
        let mut client = client.clone();
        let request = reserve(&deal.id, user, 1, id, &stack.order_token);
        async move { client.reserve_stock(request).await }
    }))
    .await;

    let mut held: HashMap<&str, i32> = HashMap::new();
    let mut refusals: HashMap<String, usize> = HashMap::new();
    for ((user, _), result) in calls.iter().zip(&results) {
        match result {
            Ok(response) => {
                let reservation = response.get_ref().reservation.as_ref().unwrap();
                assert_eq!(reservation.quantity, 1);
                *held.entry(user).or_default() += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                *refusals.entry(reason(status)).or_default() += 1;
            }
        }
    }
    let sold: i32 = held.values().sum();
    assert_eq!(
        sold, 100,
        "exactly the stock is sold; refusals: {refusals:?}"
    );
    assert!(
        held.values().all(|&units| units <= 2),
        "no user above the limit"
    );
    assert_eq!(refusals.values().sum::<usize>(), 1_900);
    assert!(
        refusals
            .keys()
            .all(|r| r == "SOLD_OUT" || r == "LIMIT_EXCEEDED"),
        "{refusals:?}"
    );
    let fresh = stack.catalog.service.fresh_deal(&deal.id).await.unwrap();
    assert_eq!(fresh.remaining_stock, 0);

    // Replaying every successful reservation id returns the first answer.
    let winners: Vec<_> = calls
        .iter()
        .zip(&results)
        .filter_map(|(call, result)| Some((call, result.as_ref().ok()?.get_ref().clone())))
        .collect();
    let replays = join_all(winners.iter().map(|((user, id), _)| {
        let mut client = client.clone();
        let request = reserve(&deal.id, user, 1, id, &stack.order_token);
        async move { client.reserve_stock(request).await }
    }))
    .await;
    for ((_, first), replay) in winners.iter().zip(replays) {
        assert_eq!(&replay.expect("replay succeeds").into_inner(), first);
    }
    assert_eq!(
        stack
            .catalog
            .service
            .fresh_deal(&deal.id)
            .await
            .unwrap()
            .remaining_stock,
        0
    );

    // A replay with a different quantity is refused.
    let ((user, id), _) = &winners[0];
    let reused = client
        .reserve_stock(reserve(&deal.id, user, 2, id, &stack.order_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    // Releasing every reservation twice, concurrently, restores stock once.
    let releases = join_all(winners.iter().flat_map(|((_, id), _)| {
        [id.clone(), id.clone()].map(|id| {
            let mut client = client.clone();
            let request = with_bearer(
                pb::ReleaseStockRequest { reservation_id: id },
                &stack.order_token,
            );
            async move { client.release_stock(request).await }
        })
    }))
    .await;
    let mut outcomes: HashMap<i32, usize> = HashMap::new();
    for release in releases {
        *outcomes
            .entry(release.expect("release").into_inner().outcome)
            .or_default() += 1;
    }
    assert_eq!(
        outcomes.get(&(pb::ReleaseOutcome::Released as i32)),
        Some(&100)
    );
    assert_eq!(
        outcomes.get(&(pb::ReleaseOutcome::AlreadyReleased as i32)),
        Some(&100)
    );
    assert_eq!(
        stack
            .catalog
            .service
            .fresh_deal(&deal.id)
            .await
            .unwrap()
            .remaining_stock,
        100
    );

    // A released id can never take stock again; an unknown id becomes a tombstone.
    let again = client
        .reserve_stock(reserve(&deal.id, user, 1, id, &stack.order_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&again), "RESERVATION_RELEASED");
    let unknown = uuid::Uuid::new_v4().to_string();
    let released = client
        .release_stock(with_bearer(
            pb::ReleaseStockRequest {
                reservation_id: unknown.clone(),
            },
            &stack.order_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.outcome(), pb::ReleaseOutcome::NotReserved);
    let late = client
        .reserve_stock(reserve(&deal.id, "late", 1, &unknown, &stack.order_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&late), "RESERVATION_RELEASED");
}

async fn cold_reads_are_single_flight_and_sold_out_skips_the_database(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    env.set("FLASHMESH_CONCURRENCY_LIMIT", "10000");
    let stack = env.start_catalog().await;
    let mut client = stack.catalog_client().await;
    let deal = create_deal(&mut client, &stack.admin_token, 5, 5, open_window()).await;
    // Let the entry the creation may have cached expire.
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let counts = stack.catalog.service.store().counts();
    let reads_before = counts.reads();
    let reads = join_all((0..1_000).map(|_| {
        let mut client = client.clone();
        let id = deal.id.clone();
        async move { client.get_deal(pb::GetDealRequest { id }).await }
    }))
    .await;
    assert!(reads.iter().all(Result::is_ok));
    let db_reads = counts.reads() - reads_before;
    assert!(
        db_reads <= 2,
        "1,000 cold reads made {db_reads} database reads"
    );

    // Sell out, then 1,000 more buyers.
    client
        .reserve_stock(new_reservation(&deal.id, "whale", 5, &stack.order_token))
        .await
        .expect("takes the whole stock");
    let writes_before = counts.writes();
    let late = join_all((0..1_000).map(|i| {
        let mut client = client.clone();
        let request = new_reservation(&deal.id, &format!("late-{i}"), 1, &stack.order_token);
        async move { client.reserve_stock(request).await }
    }))
    .await;
    for result in &late {
        assert_eq!(reason(result.as_ref().unwrap_err()), "SOLD_OUT");
    }
    let db_writes = counts.writes() - writes_before;
    if backend == Backend::Postgres {
        assert_eq!(
            db_writes, 0,
            "with the Redis gate, sold-out requests never write"
        );
    } else {
        // Without Redis the database decides every request (and stays right).
        assert!(db_writes > 0);
    }
}

async fn watch_deal_streams_a_snapshot_then_changes_and_ends(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    env.set("FLASHMESH_WATCH_MIN_INTERVAL", "50ms");
    let stack = env.start_catalog().await;
    let mut client = stack.catalog_client().await;
    let now = now_ms();
    let deal = create_deal(
        &mut client,
        &stack.admin_token,
        10,
        10,
        (now - 1_000, now + 3_000),
    )
    .await;

    let mut events = client
        .watch_deal(pb::WatchDealRequest {
            id: deal.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = events.next().await.unwrap().unwrap().event.unwrap();
    assert_eq!(snapshot.r#type(), pb::DealEventType::Snapshot);
    assert_eq!(snapshot.remaining_stock, 10);
    assert_eq!(snapshot.deal.unwrap().id, deal.id);

    for units in [3, 7] {
        client
            .reserve_stock(new_reservation(
                &deal.id,
                &format!("u{units}"),
                units,
                &stack.order_token,
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = vec![snapshot.sequence];
    let mut last = None;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the stream ends by itself when the deal ends")
    {
        let event = message.expect("stream ok").event.unwrap();
        assert!(event.sequence > *seen.last().unwrap(), "sequences increase");
        seen.push(event.sequence);
        last = Some(event);
    }
    let last = last.expect("events after the snapshot");
    assert_eq!(last.state(), pb::DealState::Ended);
    assert_eq!(last.r#type(), pb::DealEventType::StateChanged);
    assert_eq!(last.remaining_stock, 0);
    assert!(seen.len() >= 3, "stock changes and the end: {seen:?}");
}

async fn lists_page_with_signed_tokens(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    let stack = env.start_catalog().await;
    let mut client = stack.catalog_client().await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(
            create_deal(&mut client, &stack.admin_token, 3, 1, open_window())
                .await
                .id,
        );
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_deals(pb::ListDealsRequest {
                states: vec![pb::DealState::Active as i32],
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.deals.len() <= 2);
        listed.extend(page.deals.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected = created.clone();
    expected.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, expected, "every deal exactly once");

    let products = client
        .list_products(pb::ListProductsRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(products.products.len(), 3);
    let other_query = client
        .list_deals(pb::ListDealsRequest {
            page_token: products.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&other_query), ["page_token"]);
    let mut forged = products.next_page_token.clone();
    forged.insert(0, 'A');
    let tampered = client
        .list_products(pb::ListProductsRequest {
            page_size: 3,
            page_token: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&tampered), ["page_token"]);
    let too_big = client
        .list_products(pb::ListProductsRequest {
            page_size: 101,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&too_big), ["page_size"]);
    let unspecified = client
        .list_deals(pb::ListDealsRequest {
            states: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&unspecified), ["states"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deals_about_to_start_are_prepared_and_changes_reach_other_replicas() {
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_WARM_INTERVAL", "100ms")
        .set("FLASHMESH_WATCH_MIN_INTERVAL", "10ms");
    let stack = env.start_catalog().await;
    let replica = env.start_catalog_replica().await;
    let mut client = stack.catalog_client().await;
    let now = now_ms();
    let starts_at = now + 3_000;
    let deal = create_deal(
        &mut client,
        &stack.admin_token,
        20,
        20,
        (starts_at, now + 60_000),
    )
    .await;

    // Before the sale starts, a replica has seeded the stock gate.
    let mut gate = None;
    while gate.is_none() && now_ms() < starts_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate = gate_remaining(&env, &deal.id).await;
    }
    assert_eq!(gate, Some(20), "the gate is seeded before the deal starts");

    // 1,000 watchers on the other replica see a sale made through this one.
    let mut watcher_client = CatalogServiceClient::new(replica.running.channel().await);
    let mut streams = Vec::new();
    for _ in 0..1_000 {
        let stream = watcher_client
            .watch_deal(pb::WatchDealRequest {
                id: deal.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    for stream in &mut streams {
        let snapshot = stream.next().await.unwrap().unwrap().event.unwrap();
        assert_eq!(snapshot.r#type(), pb::DealEventType::Snapshot);
    }
    let until_start = u64::try_from(starts_at + 100 - now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(until_start)).await;
    client
        .reserve_stock(new_reservation(&deal.id, "buyer", 5, &stack.order_token))
        .await
        .expect("reserve on the first replica");
    let latest = join_all(streams.iter_mut().map(|stream| async move {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("an update arrives")
                .unwrap()
                .unwrap()
                .event
                .unwrap();
            if event.remaining_stock == 15 {
                return event;
            }
        }
    }))
    .await;
    assert!(latest.iter().all(|e| e.state() == pb::DealState::Active));
}
