//! `flashmesh-loadtest tracing`: what observability costs.
//!
//! 1. End to end: cache-hot `GET /v1/deals/{id}` (edge span, catalog span,
//!    cache event), or `POST /v1/orders` (`--workload orders`: the whole
//!    order path, its outbox event and the consumers that count it, with
//!    their spans), through the gateway of a real `flashmesh up`, with trace
//!    export off, on at 100% and on at 10% sampling (parent-based ratio,
//!    decided at the edge), against a real OTLP/gRPC sink: an in-process
//!    TraceService per mode that decodes every export and counts its spans.
//!    The three stacks run at once and take turns: `rounds` cycles of a
//!    slice each, so a machine whose speed drifts over minutes (a shared VM)
//!    moves every mode of a cycle alike, and each cycle's ratio to "off"
//!    cancels it; the report gives the median ratio with a confidence
//!    interval. The load is closed-loop callers (the stack at saturation)
//!    or, with `--rate`, calls started on schedule (latency at a set load).
//!    The sinks run on a thread of their own, as a collector would, not on
//!    the threads that send the load and time it.
//! 2. The server layer alone: [`ServerObserveLayer`] around a no-op service,
//!    called in a loop, next to the bare service — the per-call cost of the
//!    RED metrics (tracing off) and of the sampling decision and spans.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::ValueEnum;
use flashmesh_platform::{
    config::Env,
    metrics::Metrics,
    observe::ServerObserveLayer,
    telemetry::{Telemetry, TelemetryConfig},
};
use flashmesh_proto::order::v1::order_service_client::OrderServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tokio::net::TcpListener;
use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tower::{Layer, Service, ServiceExt};

use crate::{
    gateway::{http_callers, order_callers},
    orders::sales_reaching,
    procfs::{process_cpu_split, ticks_per_second},
    run::{Outcome, Row, median_interval, ms_at, run, run_paced},
    stack::{Backends, CHEAP_HASHING, Mode, Stack, UNTHROTTLED},
};

pub struct TracingOptions {
    pub workload: Workload,
    pub duration: Duration,
    pub callers: usize,
    /// Calls per second (open loop) instead of closed-loop callers.
    pub rate: Option<u32>,
    pub rounds: usize,
    pub layer_calls: usize,
}

/// What every caller does, over and over.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Workload {
    /// `GET /v1/deals/{id}`, answered from the catalog's cache: the
    /// cheapest request, so the largest share for tracing.
    Read,
    /// `POST /v1/orders` of one unit under a fresh idempotency key, each
    /// caller as a user of its own; a slice ends once the sales consumer
    /// has counted every order it placed.
    Orders,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Self::Read => "GetDeal (cache hot) via gateway",
            Self::Orders => "POST /v1/orders via gateway",
        }
    }
}

/// (label, short label, sampling ratio; `None` = no exporter). "Off" comes
/// first: the others are compared with it.
const MODES: [(&str, &str, Option<&str>); 3] = [
    ("export off", "off", None),
    ("export on, 100% sampled", "100%", Some("1.0")),
    ("export on, 10% sampled", "10%", Some("0.1")),
];

/// An OTLP/gRPC collector that counts the spans it receives.
#[derive(Clone, Default)]
struct SpanCounter(Arc<AtomicU64>);

impl SpanCounter {
    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl TraceService for SpanCounter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A sink on `runtime`: a collector's decoding runs on threads of its own,
/// as it would in a collector's process, never on the threads that send
/// the load and time its answers.
fn start_sink(runtime: &tokio::runtime::Runtime) -> anyhow::Result<(String, SpanCounter)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let counter = SpanCounter::default();
    let listener = {
        let _sinks = runtime.enter();
        TcpListener::from_std(listener)?
    };
    runtime.spawn(sink(listener, counter.clone()));
    Ok((format!("http://{addr}"), counter))
}

fn sink(
    listener: TcpListener,
    counter: SpanCounter,
) -> impl Future<Output = Result<(), tonic::transport::Error>> {
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(counter))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
}

/// The sink alone on `addr`, printing the spans received every second.
pub async fn serve_sink(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let counter = SpanCounter::default();
    let spans = counter.0.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = spans.load(Ordering::Relaxed);
            if now != seen {
                eprintln!("spans received: {now}");
                seen = now;
            }
        }
    });
    sink(listener, counter).await?;
    Ok(())
}

/// One mode's slice of a cycle.
struct Slice {
    mode: usize,
    row: Row,
    /// `flashmesh up`'s CPU time from the slice's start until the exporter
    /// has sent its spans, in seconds: (user, kernel).
    cpu: (f64, f64),
}

impl Slice {
    fn throughput(&self) -> f64 {
        self.row.ok_throughput()
    }

    fn p99_ms(&self) -> f64 {
        ms_at(&self.row.ok_latency, 0.99)
    }

    fn cpu_us_per_request(&self) -> f64 {
        us_per_request(self.cpu.0 + self.cpu.1, self.row.ok)
    }
}

/// Microseconds of CPU per request.
fn us_per_request(cpu_seconds: f64, requests: u64) -> f64 {
    cpu_seconds * 1e6 / requests.max(1) as f64
}

/// A cycle: every mode's slice, in the order they ran.
struct Cycle {
    /// 1-minute load average when the cycle began: other work on the
    /// machine.
    load: String,
    slices: Vec<Slice>,
}

impl Cycle {
    fn slice(&self, mode: usize) -> Option<&Slice> {
        self.slices.iter().find(|s| s.mode == mode)
    }

    /// `f` of `mode`'s slice over `f` of the "off" slice of this cycle.
    fn ratio(&self, mode: usize, f: &dyn Fn(&Slice) -> f64) -> Option<f64> {
        Some(f(self.slice(mode)?) / f(self.slice(0)?))
    }
}

/// One stack per mode, all running at once; the modes take turns.
struct Contender {
    stack: Stack,
    spans: SpanCounter,
    deal: String,
    /// One user's `authorization` per caller (orders only).
    bearers: Vec<String>,
    /// Asks for the deal's sales (orders only).
    sales: Option<(OrderServiceClient<Channel>, MetadataValue<Ascii>)>,
    /// Units the callers were told they bought, so far.
    units: AtomicU64,
}

impl Contender {
    /// `workload` for `duration`: `options.callers` concurrent loops, or
    /// `options.rate` calls a second over that many connections; for
    /// orders, also waits until the sales consumer has counted every unit
    /// sold.
    async fn load(
        &self,
        options: &TracingOptions,
        scenario: &str,
        duration: Duration,
    ) -> anyhow::Result<Row> {
        let gateway = &self.stack.gateway_addr;
        let callers = options.callers;
        let row = match options.workload {
            Workload::Read => {
                let url = format!("http://{gateway}/v1/deals/{}", self.deal);
                let call = http_callers(callers, url, None);
                drive(options, scenario, duration, call).await
            }
            Workload::Orders => {
                let call = order_callers(callers, gateway, &self.deal, self.bearers.clone());
                drive(options, scenario, duration, call).await
            }
        };
        let units = self.units.fetch_add(row.units, Ordering::Relaxed) + row.units;
        if let Some((orders, admin)) = &self.sales {
            let sold = sales_reaching(
                &mut orders.clone(),
                admin,
                &self.deal,
                i64::try_from(units)?,
            )
            .await?
            .units_sold;
            if sold != i64::try_from(units)? {
                bail!(
                    "{scenario}: the callers bought {units} units, the sales counter says {sold}"
                );
            }
        }
        Ok(row)
    }
}

/// `call` for `duration` as `options` say: closed-loop callers, or a rate.
async fn drive<F, Fut>(options: &TracingOptions, scenario: &str, duration: Duration, call: F) -> Row
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Outcome, Status>> + Send + 'static,
{
    match options.rate {
        None => run(scenario, Mode::RedisGate, options.callers, duration, call).await,
        Some(rate) => run_paced(scenario, Mode::RedisGate, rate, duration, call).await,
    }
}

/// The order of the modes in each cycle, in turn: every mode runs first,
/// second and last equally often, and after each other mode equally
/// often, so neither a machine that drifts in the course of a cycle nor
/// what one mode leaves behind (warm caches, an exporter still sending)
/// favours any mode.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
    [1, 0, 2],
    [0, 2, 1],
];

/// Units on sale, and any one user's limit: more than a run sells.
const DEAL_STOCK: i32 = 10_000_000;

/// The exporter sends every second (`OTEL_BSP_SCHEDULE_DELAY`): after a
/// slice its stack is given this long, still counted, to send the spans the
/// slice made, before the next slice starts.
const SETTLE: Duration = Duration::from_millis(1500);

pub async fn tracing(backends: &Backends, options: &TracingOptions) -> anyhow::Result<()> {
    let sinks = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-sink")
        .enable_all()
        .build()?;
    let result = take_part(backends, options, &sinks).await;
    sinks.shutdown_background();
    result
}

async fn take_part(
    backends: &Backends,
    options: &TracingOptions,
    sinks: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let mut contenders = Vec::new();
    for (label, _, ratio) in MODES {
        eprintln!("starting the stack with trace {label}");
        // A sink per stack, so each mode's spans are counted apart.
        let (endpoint, spans) = start_sink(sinks)?;
        let mut env = UNTHROTTLED.to_vec();
        env.extend_from_slice(CHEAP_HASHING);
        // Three stacks of three services each share PostgreSQL's default
        // 100 connections: 3 × 3 × 10 fit, the bench's default 20 do not.
        env.push(("DATABASE_MAX_CONNECTIONS", "10"));
        if let Some(ratio) = ratio {
            env.extend([
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", ratio),
            ]);
        }
        let stack = Stack::up(Mode::RedisGate, backends, &env).await?;
        let deal = stack.create_deal(DEAL_STOCK, DEAL_STOCK).await?;
        let (bearers, sales) = match options.workload {
            Workload::Read => (Vec::new(), None),
            Workload::Orders => {
                let users = stack.sign_up_users(options.callers, 8).await?;
                let bearers = users
                    .iter()
                    .map(|b| b.to_str().map(str::to_owned))
                    .collect::<Result<_, _>>()?;
                let orders = stack
                    .order_clients(1)
                    .await?
                    .pop()
                    .context("an order client")?;
                (bearers, Some((orders, stack.admin_bearer()?)))
            }
        };
        contenders.push(Contender {
            stack,
            spans,
            deal,
            bearers,
            sales,
            units: AtomicU64::new(0),
        });
    }
    let result = take_turns(&contenders, options).await;
    for contender in contenders {
        contender.stack.down().await?;
    }
    let (cycles, spans_per_request) = result?;
    let layer = layer_costs(options.layer_calls, sinks).await?;
    print_report(options, &cycles, &spans_per_request, &layer);
    Ok(())
}

/// Warms every stack up, then runs `options.rounds` cycles; also returns
/// each mode's spans exported per request over all its slices.
async fn take_turns(
    contenders: &[Contender],
    options: &TracingOptions,
) -> anyhow::Result<(Vec<Cycle>, Vec<f64>)> {
    for (contender, (label, _, _)) in contenders.iter().zip(MODES) {
        // Connections, caches, lazily built state.
        let scenario = format!("{}, trace {label} (warm-up)", options.workload.label());
        contender
            .load(options, &scenario, Duration::from_secs(2))
            .await?;
    }
    tokio::time::sleep(SETTLE).await;
    let spans_before: Vec<u64> = contenders.iter().map(|c| c.spans.count()).collect();
    let hz = ticks_per_second();
    let mut cycles = Vec::new();
    for round in 0..options.rounds {
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default();
        let mut slices = Vec::new();
        for mode in ORDERS[round % ORDERS.len()] {
            eprintln!(
                "cycle {}/{}: trace {}",
                round + 1,
                options.rounds,
                MODES[mode].0
            );
            slices.push(slice(&contenders[mode], mode, options, hz).await?);
        }
        cycles.push(Cycle { load, slices });
    }
    let spans_per_request = (0..MODES.len())
        .map(|mode| {
            let requests: u64 = cycles
                .iter()
                .filter_map(|c| c.slice(mode))
                .map(|s| s.row.ok)
                .sum();
            let spans = contenders[mode]
                .spans
                .count()
                .saturating_sub(spans_before[mode]);
            spans as f64 / requests.max(1) as f64
        })
        .collect();
    Ok((cycles, spans_per_request))
}

/// One slice of `contender`; `hz`: clock ticks per second.
async fn slice(
    contender: &Contender,
    mode: usize,
    options: &TracingOptions,
    hz: f64,
) -> anyhow::Result<Slice> {
    let pid = contender.stack.pid("up")?;
    let before = process_cpu_split(pid);
    let scenario = format!("{}, trace {}", options.workload.label(), MODES[mode].0);
    let row = contender.load(options, &scenario, options.duration).await?;
    tokio::time::sleep(SETTLE).await;
    let after = process_cpu_split(pid);
    Ok(Slice {
        mode,
        row,
        cpu: (
            after.0.saturating_sub(before.0) as f64 / hz,
            after.1.saturating_sub(before.1) as f64 / hz,
        ),
    })
}

/// Nanoseconds per call of the server layer's modes, and of no layer.
struct LayerCosts {
    bare: f64,
    modes: Vec<(&'static str, f64)>,
}

async fn layer_costs(calls: usize, sinks: &tokio::runtime::Runtime) -> anyhow::Result<LayerCosts> {
    let (endpoint, _) = start_sink(sinks)?;
    let rpc = "flashmesh.catalog.v1.CatalogService/GetDeal";
    let noop = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
        Ok::<_, Infallible>(http::Response::new(tonic::body::Body::empty()))
    });
    let bare = time_calls(noop, rpc, calls).await?;
    let mut modes = Vec::new();
    for (label, ratio) in [
        ("metrics only (export off)", None),
        ("export on, 100% sampled", Some("1.0")),
        ("export on, 10% sampled", Some("0.1")),
    ] {
        let mut env = Env::default();
        if let Some(ratio) = ratio {
            env.set("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
            env.set("OTEL_TRACES_SAMPLER", "parentbased_traceidratio");
            env.set("OTEL_TRACES_SAMPLER_ARG", ratio);
        }
        let config = TelemetryConfig::from_env(&env)?;
        let telemetry = Telemetry::new(&config, "flashmesh-bench".into(), &Metrics::default())?;
        let layer = ServerObserveLayer::new(&telemetry, [(rpc.to_owned(), false)]);
        modes.push((label, time_calls(layer.layer(noop), rpc, calls).await?));
        telemetry.flush();
    }
    Ok(LayerCosts { bare, modes })
}

/// Mean nanoseconds per call of `service` over `calls` calls (after as many
/// again to warm up).
async fn time_calls<S>(mut service: S, rpc: &str, calls: usize) -> anyhow::Result<f64>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Error: Into<tower::BoxError>,
{
    let path = format!("/{rpc}");
    let mut elapsed = Duration::ZERO;
    for timed in [false, true] {
        let started = Instant::now();
        for _ in 0..calls {
            let request = http::Request::builder()
                .uri(path.as_str())
                .body(tonic::body::Body::empty())?;
            let response = service
                .ready()
                .await
                .map_err(|e| anyhow::anyhow!(e.into()))?
                .call(request)
                .await
                .map_err(|e| anyhow::anyhow!(e.into()))?;
            drop(response);
        }
        if timed {
            elapsed = started.elapsed();
        }
    }
    Ok(elapsed.as_nanos() as f64 / calls.max(1) as f64)
}

fn print_report(
    options: &TracingOptions,
    cycles: &[Cycle],
    spans_per_request: &[f64],
    layer: &LayerCosts,
) {
    let workload = options
        .workload
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned());
    let (rate_flag, load) = match options.rate {
        None => (String::new(), format!("{} callers", options.callers)),
        Some(rate) => (
            format!(" --rate {rate}"),
            format!(
                "{rate} calls/s over {} connections (open loop: each latency counts from when its call was due)",
                options.callers
            ),
        ),
    };
    println!(
        "flashmesh-loadtest tracing --workload {workload} --duration {:?} --callers {}{rate_flag} --rounds {} --layer-calls {}\n",
        options.duration, options.callers, options.rounds, options.layer_calls
    );
    let counted = match options.workload {
        Workload::Read => "",
        Workload::Orders => {
            " A slice ends once the sales consumer has counted every order it placed."
        }
    };
    println!(
        "{}: one `flashmesh up` per mode, all three running at once; in each cycle every mode gets one slice of {:?} with {load}, in the order shown, each followed by {:?} for its exporter to send (its CPU time counted).{counted}\n",
        options.workload.label(),
        options.duration,
        SETTLE
    );
    let columns = |what: &str| {
        MODES
            .map(|(_, short, _)| format!("{short} {what}"))
            .join(" | ")
    };
    println!(
        "| cycle | order | load avg | {} | {} | {} |",
        columns("requests/s"),
        columns("p99 ms"),
        columns("CPU µs/req")
    );
    println!("| ---: | --- | ---: |{}", " ---: |".repeat(3 * MODES.len()));
    for (n, cycle) in cycles.iter().enumerate() {
        let order: Vec<&str> = cycle.slices.iter().map(|s| MODES[s.mode].1).collect();
        let values = |f: &dyn Fn(&Slice) -> f64, digits: usize| {
            (0..MODES.len())
                .map(|mode| {
                    cycle
                        .slice(mode)
                        .map_or("–".to_owned(), |s| format!("{:.digits$}", f(s)))
                })
                .collect::<Vec<_>>()
                .join(" | ")
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            n + 1,
            order.join(", "),
            cycle.load,
            values(&Slice::throughput, 0),
            values(&Slice::p99_ms, 2),
            values(&Slice::cpu_us_per_request, 1),
        );
    }
    // Within a cycle the modes run seconds apart, so a slow spell of the
    // machine moves all of them: each cycle's own ratio to "off", and the
    // median of those with its 95% confidence interval.
    let versus_off = |mode: usize, f: &dyn Fn(&Slice) -> f64| {
        if mode == 0 {
            return "–".to_owned();
        }
        let ratios = cycles.iter().filter_map(|c| c.ratio(mode, f));
        match median_interval(ratios) {
            Some((median, low, high)) => {
                let pct = |ratio: f64| (ratio - 1.0) * 100.0;
                format!(
                    "{:+.1}% ({:+.1}% to {:+.1}%)",
                    pct(median),
                    pct(low),
                    pct(high)
                )
            }
            None => "–".to_owned(),
        }
    };
    println!(
        "\nEvery mode over all its slices; \"vs off\" is the median of the cycles' own ratios, with its 95% confidence interval:\n"
    );
    println!(
        "| trace export | requests/s | vs off | p99 ms | vs off | `flashmesh up` CPU µs/req | of it in the kernel | vs off | spans exported/req |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (mode, (label, _, _)) in MODES.iter().enumerate() {
        let slices: Vec<&Slice> = cycles.iter().filter_map(|c| c.slice(mode)).collect();
        let requests: u64 = slices.iter().map(|s| s.row.ok).sum();
        let seconds: f64 = slices.iter().map(|s| s.row.elapsed.as_secs_f64()).sum();
        let (user, system) = slices
            .iter()
            .fold((0.0, 0.0), |(u, k), s| (u + s.cpu.0, k + s.cpu.1));
        let mut latency = slices.first().map(|s| s.row.ok_latency.clone());
        if let Some(latency) = &mut latency {
            for s in slices.iter().skip(1) {
                // Same bounds, so adding cannot fail.
                let _ = latency.add(&s.row.ok_latency);
            }
        }
        println!(
            "| {label} | {:.0} | {} | {:.2} | {} | {:.1} | {:.0}% | {} | {:.2} |",
            requests as f64 / seconds.max(f64::MIN_POSITIVE),
            versus_off(mode, &Slice::throughput),
            latency.map_or(f64::NAN, |l| ms_at(&l, 0.99)),
            versus_off(mode, &Slice::p99_ms),
            us_per_request(user + system, requests),
            system * 100.0 / (user + system).max(f64::MIN_POSITIVE),
            versus_off(mode, &Slice::cpu_us_per_request),
            spans_per_request[mode],
        );
    }
    println!(
        "\nThe server layer alone (ServerObserveLayer around a no-op service, {} sequential calls, one thread):\n",
        options.layer_calls
    );
    println!("| layer | ns/call | added ns/call |");
    println!("| --- | ---: | ---: |");
    println!("| none (the bare service) | {:.0} | – |", layer.bare);
    for (label, ns) in &layer.modes {
        println!("| {label} | {ns:.0} | {:.0} |", ns - layer.bare);
    }
}
