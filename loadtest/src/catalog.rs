//! `flashmesh-loadtest catalog` and `flashmesh-loadtest watchers`: the
//! catalog's hot paths, and WatchDeal memory per watcher.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use flashmesh_proto::catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient};
use tonic::{
    Request,
    client::GrpcService,
    codegen::{Body, Bytes, StdError},
    transport::Channel,
};
use tonic_health::pb::HealthCheckRequest;

use crate::{
    procfs,
    run::{Outcome, Row, ms_at, refusal, run},
    stack::{Backends, Mode, Stack},
};

/// Deals the cold-cache scenario spreads its reads over.
const COLD_DEALS: usize = 2_000;

/// Opens `count` WatchDeal streams, reads the catalog process's RSS before
/// and after, then times one stock change reaching every watcher.
pub async fn watchers(backends: &Backends, count: usize) -> anyhow::Result<()> {
    let stack = Stack::up(Mode::RedisGate, backends, &[]).await?;
    let deal = stack.create_deal(1_000_000, 1_000_000).await?;
    let pid = stack.pid("up")?;
    // Streams per HTTP/2 connection stay well under the server's limit.
    let clients = stack.catalog_clients(count.div_ceil(100).max(1)).await?;
    let rss_before = procfs::rss_kib(pid)?;
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let mut client = clients[i % clients.len()].clone();
        let mut stream = client
            .watch_deal(pb::WatchDealRequest { id: deal.clone() })
            .await?
            .into_inner();
        stream.message().await?.context("snapshot")?;
        streams.push(stream);
    }
    let rss_after = procfs::rss_kib(pid)?;
    let token = Arc::new(stack.order_token.clone());
    let started = Instant::now();
    reserve_call(&clients, &deal, &token, 0).await?;
    let delivered = futures::future::join_all(
        streams
            .iter_mut()
            .map(|stream| async move { matches!(stream.message().await, Ok(Some(_))) }),
    )
    .await;
    let fan_out = started.elapsed();
    let reached = delivered.iter().filter(|&&ok| ok).count();
    println!("flashmesh-loadtest watchers --count {count}\n");
    println!("| watchers | catalog RSS before | after | per watcher | one change reached | in |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {count} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {reached} | {:.0} ms |",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_after.saturating_sub(rss_before) as f64 / count as f64,
        fan_out.as_secs_f64() * 1000.0,
    );
    drop(streams);
    stack.down().await
}

pub async fn catalog(
    backends: &Backends,
    duration: Duration,
    reserve_callers: usize,
    read_callers: usize,
    rush_stock: i32,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for mode in [Mode::RedisGate, Mode::DatabaseOnly, Mode::ColdCache] {
        eprintln!("== {} ==", mode.label());
        let stack = Stack::up(mode, backends, &[]).await?;
        let catalog = stack.catalog_clients(8).await?;
        if mode == Mode::RedisGate {
            let health = stack.health_clients(8).await?;
            rows.push(
                run(
                    "no-op gRPC call (Health/Check)",
                    mode,
                    read_callers,
                    duration,
                    |i| {
                        let mut client = health[i % health.len()].clone();
                        async move {
                            client
                                .check(HealthCheckRequest::default())
                                .await
                                .map(|_| Outcome::Ok { units: 0 })
                        }
                    },
                )
                .await,
            );
        }
        let deal = stack.create_deal(10_000_000, 10_000_000).await?;
        if mode == Mode::RedisGate {
            rows.push(
                run("GetDeal, cache hot", mode, read_callers, duration, |i| {
                    get_deal_call(&catalog, std::slice::from_ref(&deal), i)
                })
                .await,
            );
        }
        if mode == Mode::ColdCache {
            // Reads spread over many deals with a 1 ms TTL: nearly every
            // read misses and loads from the database.
            let mut deals = Vec::with_capacity(COLD_DEALS);
            for _ in 0..COLD_DEALS {
                deals.push(stack.create_deal(10, 10).await?);
            }
            rows.push(
                run(
                    "GetDeal, cache cold (1 ms TTL, 2,000 deals)",
                    mode,
                    read_callers,
                    duration,
                    |i| get_deal_call(&catalog, &deals, i),
                )
                .await,
            );
            stack.down().await?;
            continue;
        }
        let token = Arc::new(stack.order_token.clone());
        rows.push(
            run(
                "ReserveStock, stock never runs out",
                mode,
                reserve_callers,
                duration,
                |i| reserve_call(&catalog, &deal, &token, i),
            )
            .await,
        );
        let rush = stack.create_deal(rush_stock, rush_stock).await?;
        rows.push(
            run(
                &format!("ReserveStock, flash rush ({rush_stock} units, then SOLD_OUT)"),
                mode,
                reserve_callers,
                duration,
                |i| reserve_call(&catalog, &rush, &token, i),
            )
            .await,
        );
        stack.down().await?;
    }
    print_report(&rows, duration, reserve_callers, read_callers);
    Ok(())
}

/// GetDeal of the `i`-th caller: deals and connections taken round-robin.
fn get_deal_call(
    catalog: &[CatalogServiceClient<Channel>],
    deals: &[String],
    i: usize,
) -> impl std::future::Future<Output = Result<Outcome, tonic::Status>> + use<> {
    let mut client = catalog[i % catalog.len()].clone();
    let id = deals[i % deals.len()].clone();
    async move {
        client
            .get_deal(pb::GetDealRequest { id })
            .await
            .map(|_| Outcome::Ok { units: 0 })
    }
}

/// ReserveStock of one unit for the `i`-th caller (a buyer of its own),
/// with the order service's token, over any channel.
pub(crate) fn reserve_call<T>(
    catalog: &[CatalogServiceClient<T>],
    deal: &str,
    token: &Arc<String>,
    i: usize,
) -> impl std::future::Future<Output = Result<Outcome, tonic::Status>> + use<T>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<StdError>,
    T::Future: Send,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut client = catalog[i % catalog.len()].clone();
    let mut request = Request::new(pb::ReserveStockRequest {
        deal_id: deal.to_owned(),
        user_id: format!("bench-{i}"),
        quantity: 1,
        reservation_id: uuid::Uuid::new_v4().to_string(),
    });
    let bearer = format!("Bearer {token}").parse();
    async move {
        request.metadata_mut().insert(
            "authorization",
            bearer.map_err(|_| tonic::Status::internal("token"))?,
        );
        match client.reserve_stock(request).await {
            Ok(_) => Ok(Outcome::Ok { units: 1 }),
            Err(status) => refusal(status),
        }
    }
}

fn print_report(rows: &[Row], duration: Duration, reserve_callers: usize, read_callers: usize) {
    let noop = rows.first().map_or(0.0, Row::throughput);
    println!(
        "flashmesh-loadtest catalog --duration {} --reserve-callers {reserve_callers} --read-callers {read_callers}\n",
        humantime::format_duration(duration)
    );
    println!(
        "| scenario | mode | callers | calls/s | × no-op | p50 ms | p99 ms | refused | errors |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let rate = row.throughput();
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            row.scenario,
            row.mode.label(),
            row.callers,
            rate,
            if noop > 0.0 { rate / noop } else { 0.0 },
            ms_at(&row.latency, 0.5),
            ms_at(&row.latency, 0.99),
            row.refused_total(),
            row.errors_total(),
        );
    }
}
