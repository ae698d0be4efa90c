//! Bench commands that drive a real `flashmesh up` over loopback gRPC.
//!
//! `loadtest/bench-catalog` builds the release binaries and runs
//! `flashmesh-loadtest catalog`: the catalog's hot paths on PostgreSQL, with
//! and without the Redis stock gate and cache, next to a no-op gRPC call
//! (grpc.health.v1 Check) for scale. It prints a Markdown table.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flashmesh_proto::{
    auth::v1::{LoginRequest, auth_service_client::AuthServiceClient},
    catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient},
};
use hdrhistogram::Histogram;
use sqlx::{Connection, Executor, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use tonic::{Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Deals the cold-cache scenario spreads its reads over.
const COLD_DEALS: usize = 2_000;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The catalog's hot paths: ReserveStock with the Redis gate vs the
    /// database alone, GetDeal cache-hot vs cache-cold, and a no-op call.
    Catalog {
        /// How long each scenario runs.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Concurrent callers in the ReserveStock scenarios.
        #[arg(long, default_value_t = 500)]
        reserve_callers: usize,
        /// Concurrent callers in the read scenarios.
        #[arg(long, default_value_t = 64)]
        read_callers: usize,
        /// Units on sale in the flash-rush scenarios.
        #[arg(long, default_value_t = 2_000)]
        rush_stock: i32,
    },
    /// Memory per WatchDeal watcher and the time for one change to reach
    /// them all.
    Watchers {
        /// Concurrent WatchDeal streams on one deal.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    match Cli::parse().command {
        Bench::Catalog {
            duration,
            reserve_callers,
            read_callers,
            rush_stock,
        } => {
            catalog(
                &database_url,
                &redis_url,
                duration,
                reserve_callers,
                read_callers,
                rush_stock,
            )
            .await
        }
        Bench::Watchers { count } => watchers(&database_url, &redis_url, count).await,
    }
}

/// Opens `count` WatchDeal streams, reads the catalog process's RSS before
/// and after, then times one stock change reaching every watcher.
async fn watchers(database_url: &str, redis_url: &str, count: usize) -> anyhow::Result<()> {
    let stack = Stack::up(Mode::RedisGate, database_url, redis_url).await?;
    let deal = stack.create_deal(1_000_000, 1_000_000).await?;
    let pid = stack.child.id().context("running")?;
    // Streams per HTTP/2 connection stay well under the server's limit.
    let clients = stack.catalog_clients(count.div_ceil(100).max(1)).await?;
    let rss_before = rss_kib(pid)?;
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
    let rss_after = rss_kib(pid)?;
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

/// Resident set size of a process, from /proc.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

async fn catalog(
    database_url: &str,
    redis_url: &str,
    duration: Duration,
    reserve_callers: usize,
    read_callers: usize,
    rush_stock: i32,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for mode in [Mode::RedisGate, Mode::DatabaseOnly, Mode::ColdCache] {
        eprintln!("== {} ==", mode.label());
        let stack = Stack::up(mode, database_url, redis_url).await?;
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
                                .map(|_| Outcome::Ok)
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
            .map(|_| Outcome::Ok)
    }
}

fn reserve_call(
    catalog: &[CatalogServiceClient<Channel>],
    deal: &str,
    token: &Arc<String>,
    i: usize,
) -> impl std::future::Future<Output = Result<Outcome, tonic::Status>> + use<> {
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
            Ok(_) => Ok(Outcome::Ok),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(Outcome::Refused),
            Err(status) => Err(status),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    RedisGate,
    DatabaseOnly,
    ColdCache,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::RedisGate => "PostgreSQL + Redis (gate, L1+L2 cache)",
            Self::DatabaseOnly => "PostgreSQL alone (L1 cache)",
            Self::ColdCache => "PostgreSQL alone, cache TTL 1 ms",
        }
    }
}

enum Outcome {
    Ok,
    /// SOLD_OUT or LIMIT_EXCEEDED: a correct, fast answer, counted apart.
    Refused,
}

struct Row {
    scenario: String,
    mode: Mode,
    callers: usize,
    calls: u64,
    refused: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

/// Runs `call` from `callers` concurrent loops for `duration`.
async fn run<F, Fut>(scenario: &str, mode: Mode, callers: usize, duration: Duration, call: F) -> Row
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, tonic::Status>> + Send + 'static,
{
    eprintln!("  {scenario}: {callers} callers for {duration:?}");
    let call = Arc::new(call);
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut loops = Vec::with_capacity(callers);
    for caller in 0..callers {
        let call = call.clone();
        loops.push(async move {
            let mut latency = latency_histogram();
            let (mut refused, mut errors, mut n) = (0u64, 0u64, 0usize);
            while Instant::now() < deadline {
                let began = Instant::now();
                match call(caller + n * callers).await {
                    Ok(Outcome::Ok) => {}
                    Ok(Outcome::Refused) => refused += 1,
                    Err(_) => errors += 1,
                }
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                latency.saturating_record(micros.max(1));
                n += 1;
            }
            (latency, refused, errors)
        });
    }
    let results = futures::future::join_all(loops).await;
    let elapsed = started.elapsed();
    let mut latency = latency_histogram();
    let (mut refused, mut errors) = (0, 0);
    for (histogram, r, e) in results {
        latency.add(histogram).expect("same bounds");
        refused += r;
        errors += e;
    }
    Row {
        scenario: scenario.to_owned(),
        mode,
        callers,
        calls: latency.len(),
        refused,
        errors,
        elapsed,
        latency,
    }
}

fn print_report(rows: &[Row], duration: Duration, reserve_callers: usize, read_callers: usize) {
    let noop = rows.first().map_or(0.0, throughput);
    println!(
        "flashmesh-loadtest catalog --duration {} --reserve-callers {reserve_callers} --read-callers {read_callers}\n",
        humantime::format_duration(duration)
    );
    println!(
        "| scenario | mode | callers | calls/s | × no-op | p50 ms | p99 ms | refused | errors |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let rate = throughput(row);
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            row.scenario,
            row.mode.label(),
            row.callers,
            rate,
            if noop > 0.0 { rate / noop } else { 0.0 },
            ms(row.latency.value_at_quantile(0.5)),
            ms(row.latency.value_at_quantile(0.99)),
            row.refused,
            row.errors,
        );
    }
}

/// 1 µs to 60 s at 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn throughput(row: &Row) -> f64 {
    row.calls as f64 / row.elapsed.as_secs_f64()
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// One `flashmesh up` on a fresh PostgreSQL database.
struct Stack {
    child: Child,
    database: String,
    admin_url: String,
    catalog_addr: String,
    admin_token: String,
    order_token: String,
    /// Held so the directory lives as long as the stack.
    _data_dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    std::env::var_os("FLASHMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/flashmesh")
        })
}

impl Stack {
    async fn up(mode: Mode, admin_url: &str, redis_url: &str) -> anyhow::Result<Self> {
        let database = format!("flashmesh_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("PostgreSQL at {admin_url} (DATABASE_URL)"))?;
        admin
            .execute(format!(r#"CREATE DATABASE "{database}""#).as_str())
            .await?;
        let data_dir = tempfile::tempdir()?;
        let mut url = url::Url::parse(admin_url)?;
        url.set_path(&database);
        let mut env = stack_env(url.as_str(), data_dir.path());
        match mode {
            Mode::RedisGate => {
                env.push(("REDIS_URL".into(), redis_url.into()));
                env.push((
                    "FLASHMESH_REDIS_KEY_PREFIX".into(),
                    format!("flashmesh-bench:{}:", uuid::Uuid::new_v4().simple()),
                ));
            }
            Mode::DatabaseOnly => {}
            Mode::ColdCache => env.push(("FLASHMESH_CACHE_L1_TTL".into(), "1ms".into())),
        }

        let admin_email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
        let mut create_admin = command(&["admin", "--email", &admin_email], &env)
            .stdin(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = create_admin.stdin.take() {
            stdin.write_all(b"bench admin password\n").await?;
        }
        if !create_admin.wait().await?.success() {
            bail!("flashmesh admin failed");
        }
        let token = command(&["token", "--service", "order", "--ttl", "1h"], &env)
            .output()
            .await?;
        if !token.status.success() {
            bail!(
                "flashmesh token failed: {}",
                String::from_utf8_lossy(&token.stderr)
            );
        }
        let order_token = String::from_utf8(token.stdout)?.trim().to_owned();

        let mut child = command(&["up"], &env).kill_on_drop(true).spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut auth_addr, mut catalog_addr) = (String::new(), String::new());
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.trim().strip_prefix("auth     grpc://") {
                auth_addr = addr.to_owned();
            }
            if let Some(addr) = line.trim().strip_prefix("catalog  grpc://") {
                catalog_addr = addr.to_owned();
                break;
            }
        }
        if catalog_addr.is_empty() {
            bail!("flashmesh up did not start");
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let mut auth = AuthServiceClient::connect(format!("http://{auth_addr}")).await?;
        let admin_token = auth
            .login(LoginRequest {
                email: admin_email,
                password: "bench admin password".into(),
            })
            .await?
            .into_inner()
            .tokens
            .context("tokens")?
            .access_token;
        Ok(Self {
            child,
            database,
            admin_url: admin_url.to_owned(),
            catalog_addr,
            admin_token,
            order_token,
            _data_dir: data_dir,
        })
    }

    async fn channels(&self, addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n {
            channels.push(
                Channel::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?,
            );
        }
        Ok(channels)
    }

    async fn catalog_clients(
        &self,
        n: usize,
    ) -> anyhow::Result<Vec<CatalogServiceClient<Channel>>> {
        Ok(self
            .channels(&self.catalog_addr, n)
            .await?
            .into_iter()
            .map(CatalogServiceClient::new)
            .collect())
    }

    async fn health_clients(&self, n: usize) -> anyhow::Result<Vec<HealthClient<Channel>>> {
        Ok(self
            .channels(&self.catalog_addr, n)
            .await?
            .into_iter()
            .map(HealthClient::new)
            .collect())
    }

    /// A product and an active deal; returns the deal id.
    async fn create_deal(&self, stock: i32, per_user_limit: i32) -> anyhow::Result<String> {
        let mut client =
            CatalogServiceClient::connect(format!("http://{}", self.catalog_addr)).await?;
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", self.admin_token).parse()?;
        let mut request = Request::new(pb::CreateProductRequest {
            name: "Bench product".into(),
            description: String::new(),
            image_url: None,
            price_cents: 1_000,
        });
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        let product = client
            .create_product(request)
            .await?
            .into_inner()
            .product
            .context("product")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let now = i64::try_from(now)?;
        let mut request = Request::new(pb::CreateDealRequest {
            product_id: product.id,
            price_cents: 500,
            stock,
            per_user_limit,
            starts_at: Some(prost_types::Timestamp {
                seconds: now - 1,
                nanos: 0,
            }),
            ends_at: Some(prost_types::Timestamp {
                seconds: now + 3_600,
                nanos: 0,
            }),
        });
        request.metadata_mut().insert("authorization", bearer);
        Ok(client
            .create_deal(request)
            .await?
            .into_inner()
            .deal
            .context("deal")?
            .id)
    }

    async fn down(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        self.child.wait().await?;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        admin
            .execute(
                format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    self.database
                )
                .as_str(),
            )
            .await?;
        Ok(())
    }
}

fn stack_env(database_url: &str, data_dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), database_url.into()),
        ("FLASHMESH_DATA_DIR".into(), data_dir.display().to_string()),
        ("FLASHMESH_AUTH_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_CATALOG_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_CONCURRENCY_LIMIT".into(), "100000".into()),
        ("DATABASE_MAX_CONNECTIONS".into(), "20".into()),
        ("RUST_LOG".into(), "error".into()),
    ]
}

fn command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("REDIS_URL")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}
