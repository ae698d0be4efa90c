//! `flashmesh-loadtest gateway`: what the edge gateway costs. Cache-hot
//! `GET /v1/deals/{id}` and authenticated `GET /v1/me` through the gateway,
//! next to the same RPCs called directly over gRPC and through a bare
//! pass-through hop ([`crate::bare_hop`]); then the memory of 10,000
//! concurrent SSE streams (`GET /v1/deals/{id}/events`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flashmesh_proto::{auth::v1::GetMeRequest, catalog::v1::GetDealRequest};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
};

use crate::{
    bare_hop, procfs,
    run::{Outcome, Row, median, ms_at, run},
    stack::{Backends, Mode, Stack, UNTHROTTLED},
};

pub struct GatewayOptions {
    pub duration: Duration,
    pub callers: usize,
    pub grpc_channels: usize,
    pub hop_threads: usize,
    pub sse: usize,
    pub sse_parallel: usize,
    /// Run the stack without Redis: in-process rate limits and cache.
    pub no_redis: bool,
    /// Times every row is measured, in turn.
    pub rounds: usize,
}

pub async fn gateway(backends: &Backends, options: &GatewayOptions) -> anyhow::Result<()> {
    let mode = if options.no_redis {
        Mode::DatabaseOnly
    } else {
        Mode::RedisGate
    };
    let stack = Stack::up(mode, backends, UNTHROTTLED).await?;
    let result = bench(&stack, options).await;
    stack.down().await?;
    result
}

/// One measured scenario: the run, and CPU ticks spent meanwhile by the
/// `flashmesh up` process, the whole loadtest process and the edge in
/// front of the services (the standalone gateway process, or the hop's
/// threads), and the CPU time Redis spent (when the stack uses one).
struct Measured {
    target: &'static str,
    row: Row,
    server_ticks: u64,
    loadtest_ticks: u64,
    edge_ticks: u64,
    redis_cpu: Option<Duration>,
}

/// Redis's own CPU time (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`):
/// on this machine it competes with the stack for the same two cores, so a
/// row that makes Redis work pays for it in throughput.
struct RedisCpu(redis::aio::MultiplexedConnection);

impl RedisCpu {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        Ok(Self(client.get_multiplexed_async_connection().await?))
    }

    async fn used(&mut self) -> anyhow::Result<Duration> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.0)
            .await?;
        let seconds = |field: &str| -> anyhow::Result<f64> {
            info.lines()
                .find_map(|line| line.strip_prefix(field))
                .with_context(|| format!("{field} in INFO cpu"))?
                .trim()
                .parse()
                .with_context(|| format!("{field} in INFO cpu"))
        };
        Duration::try_from_secs_f64(seconds("used_cpu_user:")? + seconds("used_cpu_sys:")?)
            .context("CPU seconds in INFO cpu")
    }
}

/// The edge a row's HTTP calls go through.
#[derive(Clone, Copy)]
enum Edge {
    /// `flashmesh gateway` in its own process, as deployed.
    Gateway(u32),
    /// The gateway inside `flashmesh up`, sharing its runtime with the
    /// services.
    InProcess,
    BareHop,
    /// No edge: gRPC straight to the service.
    Direct,
}

impl Edge {
    fn target(self) -> &'static str {
        match self {
            Self::Gateway(_) => "gateway",
            Self::InProcess => "gateway inside `flashmesh up`",
            Self::BareHop => "bare hop",
            Self::Direct => "direct gRPC",
        }
    }

    fn ticks(self) -> u64 {
        match self {
            Self::Gateway(pid) => procfs::process_cpu_ticks(pid),
            Self::BareHop => bare_hop::threads_cpu_ticks(),
            Self::InProcess | Self::Direct => 0,
        }
    }
}

async fn bench(stack: &Stack, options: &GatewayOptions) -> anyhow::Result<()> {
    let pid = stack.pid("up")?;
    let deal = stack.create_deal(1_000_000, 1_000_000).await?;
    let bearer = stack.sign_up_users(1, 1).await?.pop().context("one user")?;
    let edge = stack.standalone_gateway().await?;
    let edge_pid = edge.child.id().context("gateway running")?;
    let gateway = edge.addr.clone();
    let in_process = stack.gateway_addr.clone();
    let hop = bare_hop::start(
        &stack.catalog_addr,
        &stack.auth_addr,
        options.hop_threads,
        1,
    )
    .await?;

    let sse = sse_memory(
        [edge_pid, pid],
        &gateway,
        &deal,
        options.sse,
        options.sse_parallel,
    )
    .await?;

    let mut redis = match stack.redis_url() {
        Some(url) => Some(RedisCpu::connect(url).await?),
        None => None,
    };
    let mut rows = Vec::new();
    let http = |url: String, bearer: Option<String>| http_callers(options.callers, url, bearer);
    let deal_path = format!("/v1/deals/{deal}");
    let hop_deal_path = format!("/deals/{deal}");
    let bearer_str = bearer.to_str()?.to_owned();

    // GetDeal, cache-hot: one call first so the deal is cached.
    let catalog = Arc::new(stack.catalog_clients(options.grpc_channels).await?);
    catalog[0]
        .clone()
        .get_deal(GetDealRequest { id: deal.clone() })
        .await?;
    let deal = Arc::new(deal.clone());
    let auth = Arc::new(stack.auth_clients(options.grpc_channels).await?);
    // Every row once per round, in the same order: the ratios are taken
    // within a round, so a slow spell of the machine moves both sides.
    for round in 1..=options.rounds {
        rows.push((
            round,
            measure(
                pid,
                &mut redis,
                Edge::Gateway(edge_pid),
                "GetDeal",
                options,
                http(format!("http://{gateway}{deal_path}"), None),
            )
            .await?,
        ));
        rows.push((
            round,
            measure(pid, &mut redis, Edge::InProcess, "GetDeal", options, {
                http(format!("http://{in_process}{deal_path}"), None)
            })
            .await?,
        ));
        rows.push((
            round,
            measure(pid, &mut redis, Edge::Direct, "GetDeal", options, {
                let (catalog, deal) = (catalog.clone(), deal.clone());
                move |i: usize| {
                    let mut client = catalog[i % catalog.len()].clone();
                    let id = deal.as_ref().clone();
                    async move {
                        client.get_deal(GetDealRequest { id }).await?;
                        Ok::<_, Status>(Outcome::Ok { units: 0 })
                    }
                }
            })
            .await?,
        ));
        rows.push((
            round,
            measure(pid, &mut redis, Edge::BareHop, "GetDeal", options, {
                http(format!("http://{}{hop_deal_path}", hop.addr), None)
            })
            .await?,
        ));

        // GetMe with a signed-up user's token.
        rows.push((
            round,
            measure(
                pid,
                &mut redis,
                Edge::Gateway(edge_pid),
                "GetMe",
                options,
                http(format!("http://{gateway}/v1/me"), Some(bearer_str.clone())),
            )
            .await?,
        ));
        rows.push((
            round,
            measure(pid, &mut redis, Edge::InProcess, "GetMe", options, {
                http(
                    format!("http://{in_process}/v1/me"),
                    Some(bearer_str.clone()),
                )
            })
            .await?,
        ));
        rows.push((
            round,
            measure(pid, &mut redis, Edge::Direct, "GetMe", options, {
                let (auth, bearer): (_, MetadataValue<Ascii>) = (auth.clone(), bearer.clone());
                move |i: usize| {
                    let mut client = auth[i % auth.len()].clone();
                    let mut request = Request::new(GetMeRequest {});
                    request
                        .metadata_mut()
                        .insert("authorization", bearer.clone());
                    async move {
                        client.get_me(request).await?;
                        Ok::<_, Status>(Outcome::Ok { units: 0 })
                    }
                }
            })
            .await?,
        ));
        rows.push((
            round,
            measure(pid, &mut redis, Edge::BareHop, "GetMe", options, {
                http(format!("http://{}/me", hop.addr), Some(bearer_str.clone()))
            })
            .await?,
        ));
    }
    drop(hop);
    drop(edge);

    print_report(options, &rows, &sse);
    Ok(())
}

/// `GET url` (with `authorization: bearer` if given) for caller `i` of
/// `callers`, each with its own client and so its own HTTP/1.1 keep-alive
/// connection.
pub(crate) fn http_callers(
    callers: usize,
    url: String,
    bearer: Option<String>,
) -> impl Fn(usize) -> BoxFuture<'static, Result<Outcome, Status>> + Clone {
    let clients = keep_alive_clients(callers);
    let (url, bearer) = (Arc::new(url), Arc::new(bearer));
    move |i: usize| {
        let mut request = clients[i % clients.len()].get(url.as_str());
        if let Some(bearer) = bearer.as_deref() {
            request = request.header("authorization", bearer);
        }
        answer(request, Outcome::Ok { units: 0 }).boxed()
    }
}

/// `POST /v1/orders` of one unit of `deal` on `gateway`, each under a fresh
/// idempotency key, caller `i` as user `bearers[i % bearers.len()]` over
/// its own keep-alive connection (as [`http_callers`]).
pub(crate) fn order_callers(
    callers: usize,
    gateway: &str,
    deal: &str,
    bearers: Vec<String>,
) -> impl Fn(usize) -> BoxFuture<'static, Result<Outcome, Status>> + Clone + use<> {
    let clients = keep_alive_clients(callers);
    let url = Arc::new(format!("http://{gateway}/v1/orders"));
    let body = serde_json::json!({ "deal_id": deal, "quantity": 1 }).to_string();
    let bearers = Arc::new(bearers);
    move |i: usize| {
        let request = clients[i % clients.len()]
            .post(url.as_str())
            .header("authorization", bearers[i % bearers.len()].as_str())
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .header("content-type", "application/json")
            .body(body.clone());
        answer(request, Outcome::Ok { units: 1 }).boxed()
    }
}

/// A client per caller, so each keeps its own HTTP/1.1 connection.
fn keep_alive_clients(callers: usize) -> Arc<Vec<reqwest::Client>> {
    Arc::new(
        (0..callers)
            .map(|_| {
                reqwest::Client::builder()
                    .http1_only()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("HTTP client")
            })
            .collect(),
    )
}

/// Sends `request`: `ok` for a 2xx answer (its body read), any other
/// status an error with the body.
async fn answer(request: reqwest::RequestBuilder, ok: Outcome) -> Result<Outcome, Status> {
    let response = request
        .send()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    if status.is_success() {
        Ok(ok)
    } else {
        Err(Status::unknown(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        )))
    }
}

async fn measure<F, Fut>(
    pid: u32,
    redis: &mut Option<RedisCpu>,
    edge: Edge,
    rpc: &str,
    options: &GatewayOptions,
    call: F,
) -> anyhow::Result<Measured>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, Status>> + Send + 'static,
{
    let redis_before = match redis.as_mut() {
        Some(redis) => Some(redis.used().await?),
        None => None,
    };
    let (server, loadtest, edge_before) = (
        procfs::process_cpu_ticks(pid),
        procfs::process_cpu_ticks(std::process::id()),
        edge.ticks(),
    );
    let target = edge.target();
    let row = run(
        &format!("{rpc} via {target}"),
        Mode::RedisGate,
        options.callers,
        options.duration,
        call,
    )
    .await;
    let (server_ticks, loadtest_ticks, edge_ticks) = (
        procfs::process_cpu_ticks(pid).saturating_sub(server),
        procfs::process_cpu_ticks(std::process::id()).saturating_sub(loadtest),
        edge.ticks().saturating_sub(edge_before),
    );
    let redis_cpu = match (redis, redis_before) {
        (Some(redis), Some(before)) => Some(redis.used().await?.saturating_sub(before)),
        _ => None,
    };
    Ok(Measured {
        target,
        row,
        server_ticks,
        loadtest_ticks,
        edge_ticks,
        redis_cpu,
    })
}

struct SseMemory {
    wanted: usize,
    opened: usize,
    failures: Vec<(usize, String)>,
    open_time: Duration,
    /// KiB, per process: the gateway's, then `flashmesh up`'s.
    rss_before: [u64; 2],
    rss_after: [u64; 2],
    rss_closed: [u64; 2],
}

/// Opens `count` SSE streams through the gateway, `parallel` at a time, each
/// a raw TCP connection read until its first `data:` line; RSS of the
/// gateway's process and of `flashmesh up` (whose catalog serves the
/// WatchDeal calls behind the streams) before, with all open, and after
/// closing them.
async fn sse_memory(
    pids: [u32; 2],
    gateway: &str,
    deal: &str,
    count: usize,
    parallel: usize,
) -> anyhow::Result<SseMemory> {
    eprintln!("  SSE: {count} streams on GET /v1/deals/{{id}}/events");
    let request = Arc::new(format!(
        "GET /v1/deals/{deal}/events HTTP/1.1\r\nHost: {gateway}\r\nAccept: text/event-stream\r\n\r\n"
    ));
    // One stream first, so lazily built state (routes, upstream channel) is
    // not counted per connection.
    drop(open_sse(gateway, &request).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pids)?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let results: Vec<anyhow::Result<TcpStream>> = futures::stream::iter(0..count)
        .map(|_| {
            let request = request.clone();
            async move {
                tokio::time::timeout_at(deadline, open_sse(gateway, &request))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no snapshot within 90 s")))
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let open_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pids)?;
    let mut streams = Vec::with_capacity(count);
    let mut failures: Vec<(usize, String)> = Vec::new();
    for result in results {
        match result {
            Ok(stream) => streams.push(stream),
            Err(e) => {
                let message = format!("{e:#}");
                match failures.iter_mut().find(|(_, m)| *m == message) {
                    Some((n, _)) => *n += 1,
                    None => failures.push((1, message)),
                }
            }
        }
    }
    let opened = streams.len();
    drop(streams);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_closed = rss_kib(pids)?;
    eprintln!("    {opened} open in {open_time:?}");
    for (n, message) in &failures {
        eprintln!("    {n} × failed: {message}");
    }
    Ok(SseMemory {
        wanted: count,
        opened,
        failures,
        open_time,
        rss_before,
        rss_after,
        rss_closed,
    })
}

async fn open_sse(gateway: &str, request: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(gateway).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut received = Vec::with_capacity(1024);
    let mut buffer = [0u8; 2048];
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            bail!(
                "closed before the first event: {}",
                String::from_utf8_lossy(&received)
            );
        }
        received.extend_from_slice(&buffer[..n]);
        if received.windows(6).any(|w| w == b"\ndata:") {
            break;
        }
        if received.len() > 64 * 1024 {
            bail!("no data: line in the first 64 KiB");
        }
    }
    if !received.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&received);
        bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(stream)
}

fn rss_kib(pids: [u32; 2]) -> anyhow::Result<[u64; 2]> {
    Ok([procfs::rss_kib(pids[0])?, procfs::rss_kib(pids[1])?])
}

fn print_report(options: &GatewayOptions, rows: &[(usize, Measured)], sse: &SseMemory) {
    let tick_us = 1e6 / procfs::ticks_per_second();
    println!(
        "flashmesh-loadtest gateway --duration {:?} --rounds {} --callers {} --grpc-channels {} --hop-threads {} --sse {}{}\n",
        options.duration,
        options.rounds,
        options.callers,
        options.grpc_channels,
        options.hop_threads,
        options.sse,
        if options.no_redis { " --no-redis" } else { "" },
    );
    println!(
        "| round | RPC | via | callers | requests/s | p50 ms | p99 ms | errors | edge CPU µs/req (gateway process or hop threads) | `flashmesh up` CPU µs/req | loadtest process CPU µs/req | Redis CPU µs/req |"
    );
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (round, m) in rows {
        let row = &m.row;
        let per = |ticks: u64| ticks as f64 * tick_us / row.ok.max(1) as f64;
        let rpc = row.scenario.split(' ').next().unwrap_or_default();
        let edge = if m.edge_ticks > 0 {
            format!("{:.1}", per(m.edge_ticks))
        } else {
            "–".to_owned()
        };
        let redis = m.redis_cpu.map_or_else(
            || "–".to_owned(),
            |cpu| format!("{:.1}", cpu.as_secs_f64() * 1e6 / row.ok.max(1) as f64),
        );
        println!(
            "| {round} | {rpc} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {edge} | {:.1} | {:.1} | {redis} |",
            m.target,
            row.callers,
            row.ok_throughput(),
            ms_at(&row.ok_latency, 0.50),
            ms_at(&row.ok_latency, 0.99),
            row.errors_total(),
            per(m.server_ticks),
            per(m.loadtest_ticks),
        );
    }
    println!();
    println!(
        "| RPC | gateway / bare hop throughput, per round | median | gateway / direct gRPC, median |"
    );
    println!("| --- | --- | ---: | ---: |");
    for rpc in ["GetDeal", "GetMe"] {
        let ratio = |round: usize, over: &str| {
            let find = |target: &str| {
                rows.iter()
                    .find(|(r, m)| {
                        *r == round && m.target == target && m.row.scenario.starts_with(rpc)
                    })
                    .map_or(0.0, |(_, m)| m.row.ok_throughput())
            };
            find("gateway") / find(over).max(f64::MIN_POSITIVE)
        };
        let over_hop: Vec<f64> = (1..=options.rounds).map(|r| ratio(r, "bare hop")).collect();
        let listed: Vec<String> = over_hop.iter().map(|r| format!("{r:.2}")).collect();
        let over_direct = (1..=options.rounds).map(|r| ratio(r, "direct gRPC"));
        println!(
            "| {rpc} | {} | {:.2} | {:.2} |",
            listed.join(", "),
            median(over_hop).unwrap_or(f64::NAN),
            median(over_direct).unwrap_or(f64::NAN),
        );
    }
    println!();
    println!(
        "{} of {} SSE streams open (snapshot received) in {:.1} s\n",
        sse.opened,
        sse.wanted,
        sse.open_time.as_secs_f64()
    );
    println!("| process | RSS before | with all open | per stream | 2 s after closing them |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (i, process) in ["gateway", "`flashmesh up` (catalog side)"]
        .into_iter()
        .enumerate()
    {
        println!(
            "| {process} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB |",
            sse.rss_before[i] as f64 / 1024.0,
            sse.rss_after[i] as f64 / 1024.0,
            sse.rss_after[i].saturating_sub(sse.rss_before[i]) as f64 / sse.opened.max(1) as f64,
            sse.rss_closed[i] as f64 / 1024.0,
        );
    }
    for (n, message) in &sse.failures {
        println!("\n{n} streams failed: {message}");
    }
}
