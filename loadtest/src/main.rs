//! Bench commands that drive a real `flashmesh up` over loopback gRPC.
//!
//! `loadtest/bench-catalog` builds the release binaries and runs
//! `flashmesh-loadtest catalog`: the catalog's hot paths on PostgreSQL, with
//! and without the Redis stock gate and cache, next to a no-op gRPC call
//! (grpc.health.v1 Check) for scale. `loadtest/bench-orders` runs
//! `flashmesh-loadtest orders`: PlaceOrder (flash rush, sustained, idempotent
//! replay) with and without the gate, and a count of every unit afterwards.
//! `loadtest/bench-tracing` runs `flashmesh-loadtest tracing`: the gateway
//! with trace export off, on at 100% and at 10% sampling, and the server
//! observation layer's cost per call.
//! `loadtest/compare` runs `flashmesh-loadtest compare`: the gRPC stack
//! next to the HTTP/1.1 JSON baseline on the k6 scenarios, written up as a
//! report with a chart and a JSON summary.
//! The others print Markdown tables.

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use clap::{Parser, Subcommand};
use flashmesh_loadtest::{
    catalog,
    compare::{self, CompareOptions, Scenario},
    gateway,
    orders::{self, OrdersOptions},
    stack::Backends,
    trace_bench,
};
use flashmesh_platform::{config::Transport, runtime::shutdown_on_signal};

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
    /// PlaceOrder through the order service to the catalog, with the Redis
    /// stock gate and without: a flash rush, a sustained rate and an
    /// idempotent replay, each followed by a count of the units sold.
    Orders {
        /// How long each scenario runs.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Concurrent callers.
        #[arg(long, default_value_t = 256)]
        callers: usize,
        /// Distinct buyers, signed up before timing starts.
        #[arg(long, default_value_t = 2_000)]
        users: usize,
        /// Sign-ups in flight at once.
        #[arg(long, default_value_t = 32)]
        signup_parallel: usize,
        /// Units on sale in the flash rush.
        #[arg(long, default_value_t = 3_000)]
        rush_stock: i32,
        /// Units one buyer may hold in the flash rush.
        #[arg(long, default_value_t = 2)]
        rush_limit: i32,
        /// Units on sale (and the per-buyer limit) in the sustained scenario.
        #[arg(long, default_value_t = 1_000_000)]
        sustained_stock: i32,
    },
    /// Memory per WatchDeal watcher and the time for one change to reach
    /// them all.
    Watchers {
        /// Concurrent WatchDeal streams on one deal.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// The edge gateway next to direct gRPC and a bare REST → gRPC hop
    /// (GetDeal cache-hot, GetMe), and memory per SSE stream.
    Gateway {
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 64)]
        callers: usize,
        #[arg(long, default_value_t = 4)]
        grpc_channels: usize,
        #[arg(long, default_value_t = 2)]
        hop_threads: usize,
        #[arg(long, default_value_t = 10_000)]
        sse: usize,
        #[arg(long, default_value_t = 256)]
        sse_parallel: usize,
        /// Without Redis: in-process rate limits and cache.
        #[arg(long)]
        no_redis: bool,
        /// Times every row is measured, in turn; the ratios are medians of
        /// each round's.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Cache-hot GET /v1/deals/{id} (or POST /v1/orders) through the
    /// gateway with trace export off, on at 100% and on at 10% sampling (to
    /// an in-process OTLP sink), and the server observation layer's cost per
    /// call.
    Tracing {
        /// What the callers send.
        #[arg(long, value_enum, default_value_t = trace_bench::Workload::Read)]
        workload: trace_bench::Workload,
        /// How long each mode's slice of a cycle lasts (after a 2 s warm-up
        /// of each stack at the start).
        #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Concurrent callers, each calling again as soon as it is answered
        /// (the stack at saturation); with `--rate`, the keep-alive
        /// connections the calls are spread over.
        #[arg(long, default_value_t = 64)]
        callers: usize,
        /// Calls started per second, on schedule whatever the answers take
        /// (open loop), instead of closed-loop callers: latency at a set
        /// load below saturation.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
        /// Cycles: in each, every mode's stack gets one slice, in turn.
        #[arg(long, default_value_t = 12)]
        rounds: usize,
        /// Calls per mode in the layer measurement.
        #[arg(long, default_value_t = 1_000_000)]
        layer_calls: usize,
    },
    /// The gRPC stack next to the HTTP/1.1 JSON baseline: every scenario
    /// over each transport on a fresh stack (a process per service), with
    /// the same VUs, warm-up and duration; writes
    /// `<out-dir>/<date>-<short sha>.{md,svg,json}`.
    Compare {
        /// Measured phase of each scenario.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Warm-up before it.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// k6 virtual users (and callers of the ReserveStock hop).
        #[arg(long, default_value_t = 32)]
        vus: usize,
        /// Comma-separated: browse, auth, history, journey, rush, reserve.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "browse,auth,history,journey,rush,reserve"
        )]
        scenarios: Vec<Scenario>,
        /// Comma-separated transports: grpc, http1-json.
        #[arg(long, value_delimiter = ',', default_value = "grpc,http1-json")]
        modes: Vec<Transport>,
        /// Runs of every scenario over every transport (alternating which
        /// goes first); the report shows medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also run every scenario with this round trip between the gateway
        /// and the services (network namespace + tc netem; needs root).
        #[arg(long, value_parser = humantime::parse_duration)]
        latency: Option<Duration>,
        /// Units on sale in the rush, and the most one buyer may take.
        #[arg(long, default_value_t = 1_000)]
        rush_stock: u32,
        #[arg(long, default_value_t = 2)]
        rush_limit: u32,
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/reports"))]
        out_dir: PathBuf,
        /// The k6 binary (default: the pinned one `scripts/tools` installs).
        #[arg(long)]
        k6: Option<PathBuf>,
    },
    /// The bench's OTLP/gRPC sink on its own, for `bench-tracing-instructions`:
    /// accepts span exports on `addr` until stopped.
    OtlpSink {
        #[arg(long, default_value = "127.0.0.1:4317")]
        addr: std::net::SocketAddr,
    },
}

/// The same allocator as `flashmesh`, so the bare hop (which runs in this
/// process) is measured on equal terms with the gateway.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let backends = Backends::from_env();
    match Cli::parse().command {
        Bench::Catalog {
            duration,
            reserve_callers,
            read_callers,
            rush_stock,
        } => {
            catalog::catalog(
                &backends,
                duration,
                reserve_callers,
                read_callers,
                rush_stock,
            )
            .await
        }
        Bench::Orders {
            duration,
            callers,
            users,
            signup_parallel,
            rush_stock,
            rush_limit,
            sustained_stock,
        } => {
            orders::orders(
                &backends,
                &OrdersOptions {
                    duration,
                    callers,
                    users,
                    signup_parallel,
                    rush_stock,
                    rush_limit,
                    sustained_stock,
                },
            )
            .await
        }
        Bench::Watchers { count } => catalog::watchers(&backends, count).await,
        Bench::Gateway {
            duration,
            callers,
            grpc_channels,
            hop_threads,
            sse,
            sse_parallel,
            no_redis,
            rounds,
        } => {
            let options = gateway::GatewayOptions {
                duration,
                callers,
                grpc_channels,
                hop_threads,
                sse,
                sse_parallel,
                no_redis,
                rounds: rounds.max(1),
            };
            gateway::gateway(&backends, &options).await
        }
        Bench::Tracing {
            workload,
            duration,
            callers,
            rate,
            rounds,
            layer_calls,
        } => {
            let options = trace_bench::TracingOptions {
                workload,
                duration,
                callers,
                rate,
                rounds,
                layer_calls,
            };
            trace_bench::tracing(&backends, &options).await
        }
        Bench::Compare {
            duration,
            warmup,
            vus,
            scenarios,
            modes,
            rounds,
            latency,
            rush_stock,
            rush_limit,
            out_dir,
            k6,
        } => {
            let k6 = match k6 {
                Some(k6) => k6,
                None => compare::pinned_k6()?,
            };
            let options = CompareOptions {
                duration,
                warmup,
                vus,
                scenarios,
                modes,
                rounds,
                latency,
                rush_stock,
                rush_limit,
                out_dir,
                k6,
                scripts: compare::scripts_dir(),
            };
            // Ctrl-C or SIGTERM drops the run: its processes are killed and
            // a network namespace it made is removed.
            let stop = shutdown_on_signal();
            tokio::select! {
                written = compare::compare(&backends, &options) => written.map(drop),
                () = stop.cancelled() => bail!("interrupted"),
            }
        }
        Bench::OtlpSink { addr } => trace_bench::serve_sink(addr).await,
    }
}
