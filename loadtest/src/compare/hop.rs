//! The order → catalog hop alone: ReserveStock from this process to a
//! catalog started with the transport under test, through the same
//! generated client over the platform's channel of that transport (tonic's
//! HTTP/2 `Channel`, or the baseline's pooled HTTP/1.1 `JsonChannel`), set
//! up as the order service sets up its own. Same callers, same duration,
//! on a deal whose stock never runs out.

use std::sync::Arc;

use anyhow::Context;
use flashmesh_platform::config::Transport;
use flashmesh_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use serde::Serialize;

use super::{CompareOptions, Plan, Progress, scrape::Snapshot, start_stack};
use crate::{
    catalog::reserve_call,
    procfs,
    run::{ms_at, run as drive},
    stack::{Backends, Mode, Placement, Stack},
};

/// ReserveStock over one transport.
#[derive(Clone, Debug, Serialize)]
pub struct Hop {
    pub round: usize,
    pub transport: &'static str,
    pub callers: usize,
    pub duration_seconds: f64,
    pub calls: u64,
    pub calls_per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU per call of the catalog process, and of this process (the
    /// client side: encoding, the channel, decoding).
    pub catalog_cpu_us_per_call: f64,
    pub client_cpu_us_per_call: f64,
    /// What the catalog's server read and wrote per call.
    pub bytes_per_call: f64,
    /// Connections the catalog held at the end.
    pub connections: f64,
}

pub async fn run(
    backends: &Backends,
    options: &CompareOptions,
    plan: &Plan<'_>,
    progress: &Progress,
) -> anyhow::Result<Hop> {
    let (round, transport) = (plan.round, plan.transport);
    let label = plan.label();
    progress.step(format!("{label}: starting the stack"));
    let stack = start_stack(backends, transport, &Placement::loopback()).await?;
    let result = measure(&stack, options, round, transport, &label).await;
    stack.down().await?;
    progress.step(format!("{label}: done"));
    result
}

async fn measure(
    stack: &Stack,
    options: &CompareOptions,
    round: usize,
    transport: Transport,
    label: &str,
) -> anyhow::Result<Hop> {
    let deal = stack.create_deal(10_000_000, 10_000_000).await?;
    let client = [CatalogServiceClient::new(
        stack.channel(&stack.catalog_addr)?,
    )];
    let token = Arc::new(stack.order_token.clone());
    let call = |i| reserve_call(&client, &deal, &token, i);
    drive(
        &format!("{label}, warm-up"),
        Mode::RedisGate,
        options.vus,
        options.warmup,
        call,
    )
    .await;
    let http = reqwest::Client::new();
    let catalog = stack
        .processes
        .iter()
        .position(|p| p.name == "catalog")
        .context("the stack has no catalog process")?;
    let own_ticks = procfs::process_cpu_ticks(std::process::id());
    let before = Snapshot::take(stack, &http).await?;
    let row = drive(label, Mode::RedisGate, options.vus, options.duration, call).await;
    let after = Snapshot::take(stack, &http).await?;
    let own_ticks = procfs::process_cpu_ticks(std::process::id()).saturating_sub(own_ticks);
    let used = before.until(&after);
    let calls = row.calls().max(1) as f64;
    let us_per_call = |ticks: u64| ticks as f64 * 1e6 / procfs::ticks_per_second() / calls;
    Ok(Hop {
        round,
        transport: transport.as_str(),
        callers: options.vus,
        duration_seconds: row.elapsed.as_secs_f64(),
        calls: row.calls(),
        calls_per_second: row.throughput(),
        p50_ms: ms_at(&row.latency, 0.50),
        p95_ms: ms_at(&row.latency, 0.95),
        p99_ms: ms_at(&row.latency, 0.99),
        errors: row.errors_total() + row.refused_total(),
        catalog_cpu_us_per_call: us_per_call(used.cpu_ticks[catalog]),
        client_cpu_us_per_call: us_per_call(own_ticks),
        bytes_per_call: used.wire[catalog].bytes() / calls,
        connections: used.wire[catalog].open,
    })
}
