//! `flashmesh-loadtest tracing`: what observability costs.
//!
//! 1. End to end: cache-hot `GET /v1/deals/{id}` through the gateway (edge
//!    span, catalog span, cache event) on a real `flashmesh up`, with trace
//!    export off, on at 100% and on at 10% sampling (parent-based ratio,
//!    decided at the edge), against a real OTLP/gRPC sink: an in-process
//!    TraceService that decodes every export and counts its spans. Each mode
//!    runs `rounds` times, interleaved (every other round in reverse order),
//!    on a fresh stack.
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

use anyhow::Context;
use flashmesh_platform::{
    config::Env,
    metrics::Metrics,
    observe::ServerObserveLayer,
    telemetry::{Telemetry, TelemetryConfig},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tokio::net::TcpListener;
use tonic::Status;
use tower::{Layer, Service, ServiceExt};

use crate::{
    gateway::http_callers,
    procfs::{process_cpu_ticks, ticks_per_second},
    run::{Row, median, ms_at, run},
    stack::{Backends, Mode, Stack, UNTHROTTLED},
};

pub struct TracingOptions {
    pub duration: Duration,
    pub callers: usize,
    pub rounds: usize,
    pub layer_calls: usize,
}

/// (label, sampling ratio; `None` = no exporter).
const MODES: [(&str, Option<&str>); 3] = [
    ("export off", None),
    ("export on, 100% sampled", Some("1.0")),
    ("export on, 10% sampled", Some("0.1")),
];

/// An OTLP/gRPC collector that counts the spans it receives.
#[derive(Clone, Default)]
struct SpanCounter(Arc<AtomicU64>);

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

async fn start_sink() -> anyhow::Result<(String, SpanCounter)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counter = SpanCounter::default();
    tokio::spawn(sink(listener, counter.clone()));
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

struct Measured {
    mode: usize,
    /// 1-minute load average when the run began: other work on the machine.
    load: String,
    row: Row,
    server_us_per_request: f64,
    spans_per_request: f64,
}

pub async fn tracing(backends: &Backends, options: &TracingOptions) -> anyhow::Result<()> {
    let (endpoint, spans) = start_sink().await?;
    let mut measured = Vec::new();
    for round in 1..=options.rounds {
        // Even rounds run the modes in reverse, so a machine that slows down
        // (or speeds up) in the course of a round does not favour the mode
        // that always runs first.
        let mut order: Vec<usize> = (0..MODES.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for mode in order {
            let (label, ratio) = MODES[mode];
            eprintln!("round {round}/{}: {label}", options.rounds);
            let mut env = UNTHROTTLED.to_vec();
            if let Some(ratio) = ratio {
                env.extend([
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", ratio),
                ]);
            }
            let stack = Stack::up(Mode::RedisGate, backends, &env).await?;
            let result = measure(&stack, mode, options, &spans).await;
            stack.down().await?;
            measured.push(result?);
        }
    }
    let layer = layer_costs(options.layer_calls, &endpoint).await?;
    print_report(options, &measured, &layer);
    Ok(())
}

async fn measure(
    stack: &Stack,
    mode: usize,
    options: &TracingOptions,
    spans: &SpanCounter,
) -> anyhow::Result<Measured> {
    let pid = stack.pid("up")?;
    let deal = stack.create_deal(1_000_000, 1_000_000).await?;
    let call = http_callers(
        options.callers,
        format!("http://{}/v1/deals/{deal}", stack.gateway_addr),
        None,
    );
    // Warm-up: connections, caches, lazily built state.
    run(
        "GetDeal via gateway (warm-up)",
        Mode::RedisGate,
        options.callers,
        Duration::from_secs(2),
        call.clone(),
    )
    .await;
    // Spans of the warm-up still in the exporter's queue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans_before = spans.0.load(Ordering::Relaxed);
    let cpu_before = process_cpu_ticks(pid);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    let row = run(
        &format!("GetDeal via gateway, {}", MODES[mode].0),
        Mode::RedisGate,
        options.callers,
        options.duration,
        call,
    )
    .await;
    let cpu = process_cpu_ticks(pid).saturating_sub(cpu_before);
    // The batch exporter sends every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let exported = spans.0.load(Ordering::Relaxed).saturating_sub(spans_before);
    let requests = row.ok.max(1) as f64;
    Ok(Measured {
        mode,
        load,
        server_us_per_request: cpu as f64 * 1e6 / ticks_per_second() / requests,
        spans_per_request: exported as f64 / requests,
        row,
    })
}

/// Nanoseconds per call of the server layer's modes, and of no layer.
struct LayerCosts {
    bare: f64,
    modes: Vec<(&'static str, f64)>,
}

async fn layer_costs(calls: usize, endpoint: &str) -> anyhow::Result<LayerCosts> {
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
            env.set("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
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

fn print_report(options: &TracingOptions, measured: &[Measured], layer: &LayerCosts) {
    println!(
        "flashmesh-loadtest tracing --duration {:?} --callers {} --rounds {} --layer-calls {}\n",
        options.duration, options.callers, options.rounds, options.layer_calls
    );
    println!("Every run, in the order run:\n");
    println!(
        "| round | trace export | load avg | requests/s | p50 ms | p99 ms | errors | `flashmesh up` CPU µs/req | spans exported/req |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (n, m) in measured.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {:.1} | {:.2} |",
            n / MODES.len() + 1,
            MODES[m.mode].0,
            m.load,
            m.row.ok_throughput(),
            ms_at(&m.row.ok_latency, 0.50),
            ms_at(&m.row.ok_latency, 0.99),
            m.row.errors_total(),
            m.server_us_per_request,
            m.spans_per_request,
        );
    }
    // The median: a run disturbed by other work on the machine moves it
    // least.
    let median = |mode: usize, f: &dyn Fn(&Measured) -> f64| {
        median(measured.iter().filter(|m| m.mode == mode).map(f)).unwrap_or(f64::NAN)
    };
    // Within a round the modes run back to back, so a slow spell of the
    // machine moves all of them: the median of each round's own ratio.
    let within_rounds = |mode: usize, f: &dyn Fn(&Measured) -> f64| {
        let rounds = measured.chunks(MODES.len()).filter_map(|round| {
            let value = |mode: usize| round.iter().find(|m| m.mode == mode).map(f);
            Some(value(mode)? / value(0)?)
        });
        crate::run::median(rounds).map_or(f64::NAN, |ratio| (ratio - 1.0) * 100.0)
    };
    let off_rps = median(0, &|m| m.row.ok_throughput());
    let off_cpu = median(0, &|m| m.server_us_per_request);
    println!("\nMedians over the rounds:\n");
    println!(
        "| trace export | requests/s | vs off | vs off within each round | p99 ms | vs off within each round | `flashmesh up` CPU µs/req | vs off | vs off within each round | spans exported/req |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (mode, (label, _)) in MODES.iter().enumerate() {
        let rps = median(mode, &|m| m.row.ok_throughput());
        let cpu = median(mode, &|m| m.server_us_per_request);
        println!(
            "| {label} | {rps:.0} | {:+.1}% | {:+.1}% | {:.2} | {:+.1}% | {cpu:.1} | {:+.1}% | {:+.1}% | {:.2} |",
            (rps / off_rps - 1.0) * 100.0,
            within_rounds(mode, &|m| m.row.ok_throughput()),
            median(mode, &|m| ms_at(&m.row.ok_latency, 0.99)),
            within_rounds(mode, &|m| ms_at(&m.row.ok_latency, 0.99)),
            (cpu / off_cpu - 1.0) * 100.0,
            within_rounds(mode, &|m| m.server_us_per_request),
            median(mode, &|m| m.spans_per_request),
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
