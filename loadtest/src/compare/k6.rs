//! One k6 script against a stack: k6 runs it (`loadtest/k6/<scenario>.js`:
//! seeding in `setup()`, a `warmup` scenario, then `main`), its REST API
//! (`--address`) says when the test proper begins, and the main phase —
//! `warmup` after that, for `duration` — is bracketed by snapshots of every
//! process's CPU time and every service's wire counters. The figures for
//! requests and latency come from the `{scenario:main}` metrics of k6's
//! summary export.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::{
    CompareOptions, Network, Plan, Progress, Scenario, rush,
    scrape::{Snapshot, Wire},
};
use crate::{
    procfs,
    stack::{ADMIN_PASSWORD, Placement, Stack, free_addrs},
};

/// k6's execution status once `setup()` is done and scenarios run
/// (`lib.ExecutionStatusRunning`).
const RUNNING: u64 = 7;
/// k6's exit code when a threshold failed (the run itself completed).
const THRESHOLDS_FAILED: i32 = 99;

/// Latency percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// One process over the main phase.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessUse {
    pub name: &'static str,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_1k_requests: f64,
    /// VmHWM: the largest RSS over the process's life, which is this run.
    pub peak_rss_mib: f64,
}

/// What the services' servers carried over the main phase (requests from
/// the gateway, and the order service's calls to the catalog).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BetweenServices {
    pub bytes_received: f64,
    pub bytes_sent: f64,
    pub bytes_per_request: f64,
    /// The most connections the services held at once (sampled every
    /// second), and how many they accepted during the main phase.
    pub peak_connections: f64,
    pub accepted_connections: f64,
}

/// One scenario in one transport.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub round: usize,
    pub scenario: &'static str,
    pub transport: &'static str,
    pub network: Network,
    pub vus: usize,
    /// Length of the main phase (shorter than asked when the scenario
    /// ends by itself), and its requests.
    pub duration_seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    pub latency_ms: Latency,
    /// Failed requests (k6's `http_req_failed`; expected refusals such as
    /// the rush's SOLD_OUT are not failures).
    pub error_rate: f64,
    /// k6 thresholds of the script that failed.
    pub thresholds_failed: Vec<String>,
    pub processes: Vec<ProcessUse>,
    /// k6's own CPU over the main phase, per 1,000 requests: it shares the
    /// machine with the stack.
    pub k6_cpu_seconds_per_1k_requests: f64,
    pub between_services: BetweenServices,
    pub rush: Option<rush::Rush>,
}

/// Runs `scenario`'s script against `stack` and measures it.
pub async fn run(
    stack: &Stack,
    options: &CompareOptions,
    plan: &Plan<'_>,
    progress: &Progress,
) -> anyhow::Result<Run> {
    let Plan {
        round,
        scenario,
        transport,
        placement,
        network,
    } = *plan;
    let label = plan.label();
    let files = tempfile::tempdir()?;
    let summary_file = files.path().join("summary.json");
    let log_file = files.path().join("k6.log");
    // k6 runs where the gateway is, so its REST API listens there too.
    let api = free_addrs(placement.gateway_ip, 1)?[0];
    let mut k6 = k6_command(stack, options, scenario, placement, api, &summary_file)?;
    let log = std::fs::File::create(&log_file)?;
    let mut child = k6
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", options.k6.display()))?;
    let client = reqwest::Client::new();
    let api = format!("http://{api}/v1");

    progress.step(format!("{label}: k6 seeding through the API (setup)"));
    let started = Instant::now();
    let running_at = loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "k6 ended before its scenarios began ({status}):\n{}",
                tail(&log_file)
            );
        }
        if k6_status(&client, &api).await.is_some_and(|s| s >= RUNNING) {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    progress.step(format!(
        "{label}: setup took {:.1} s; warm-up {}",
        (running_at - started).as_secs_f64(),
        humantime::format_duration(options.warmup)
    ));
    let main_at = running_at + options.warmup;
    let end_at = main_at + options.duration;
    let mut tick = 0;
    while Instant::now() < main_at {
        tick_until(main_at, &mut tick, progress, || {
            format!("{label}: warm-up, {:.0} s to go", remaining(main_at))
        })
        .await;
    }
    let k6_pid = child.id().context("k6 has exited")?;
    let k6_ticks = procfs::process_cpu_ticks(k6_pid);
    let before = Snapshot::take(stack, &client).await?;
    let requests_before = k6_requests(&client, &api).await;
    let mut peak_connections = 0.0f64;
    // Until `duration` is over, or earlier when the main scenario ends by
    // itself (the rush: every VU got SOLD_OUT).
    let mut k6_ticks_seen = k6_ticks;
    while Instant::now() < end_at {
        // Read before k6 may be reaped below (its /proc entry goes then).
        k6_ticks_seen = k6_ticks_seen.max(procfs::process_cpu_ticks(k6_pid));
        if child.try_wait()?.is_some()
            || k6_status(&client, &api).await.is_some_and(|s| s > RUNNING)
        {
            break;
        }
        peak_connections = peak_connections.max(Snapshot::open_connections(stack, &client).await?);
        let requests = k6_requests(&client, &api)
            .await
            .saturating_sub(requests_before);
        let elapsed = options.duration.as_secs_f64() - remaining(end_at);
        tick_until(end_at, &mut tick, progress, || {
            format!(
                "{label}: main {elapsed:.0}/{} s, {requests} requests ({:.0}/s), {peak_connections} connections between services",
                options.duration.as_secs(),
                requests as f64 / elapsed.max(0.001),
            )
        })
        .await;
    }
    let after = Snapshot::take(stack, &client).await?;
    let k6_ticks = procfs::process_cpu_ticks(k6_pid)
        .max(k6_ticks_seen)
        .saturating_sub(k6_ticks);
    let main_seconds = main_at.elapsed().as_secs_f64();
    let peak_rss: Vec<f64> = stack
        .processes
        .iter()
        .map(|p| {
            p.child
                .id()
                .and_then(|pid| procfs::peak_rss_kib(pid).ok())
                .map_or(0.0, |kib| kib as f64 / 1024.0)
        })
        .collect();
    progress.step(format!("{label}: main phase over; k6 finishing"));
    let status = child.wait().await?;
    let exit = status.code().unwrap_or(-1);
    if exit != 0 && exit != THRESHOLDS_FAILED {
        bail!("k6 failed ({status}):\n{}", tail(&log_file));
    }
    let summary = Summary::read(&summary_file)
        .with_context(|| format!("k6's summary; its log:\n{}", tail(&log_file)))?;
    let used = before.until(&after);
    let requests = summary.count("http_reqs{scenario:main}").context(
        "the summary has no http_reqs{scenario:main} (the script needs a threshold on it)",
    )? as u64;
    let duration = summary.trend("http_req_duration{scenario:main}")?;
    let ticks_per_second = procfs::ticks_per_second();
    let processes = stack
        .processes
        .iter()
        .zip(&used.cpu_ticks)
        .zip(peak_rss)
        .map(|((process, ticks), peak_rss_mib)| {
            let cpu_seconds = *ticks as f64 / ticks_per_second;
            ProcessUse {
                name: process.name,
                cpu_seconds,
                cpu_seconds_per_1k_requests: cpu_seconds * 1000.0 / requests.max(1) as f64,
                peak_rss_mib,
            }
        })
        .collect();
    let wire = Wire::sum(&used.wire);
    let rush = if scenario.name == "rush" {
        Some(rush::Rush::count(stack, options, &summary, duration.p99).await?)
    } else {
        None
    };
    if exit == THRESHOLDS_FAILED {
        progress.step(format!(
            "{label}: thresholds failed: {}",
            summary.failed_thresholds().join(", ")
        ));
    }
    Ok(Run {
        round,
        scenario: scenario.name,
        transport: transport.as_str(),
        network: network.clone(),
        vus: options.vus,
        duration_seconds: main_seconds,
        requests,
        requests_per_second: requests as f64 / main_seconds,
        latency_ms: duration,
        error_rate: summary
            .rate("http_req_failed{scenario:main}")
            .unwrap_or(0.0),
        thresholds_failed: summary.failed_thresholds(),
        processes,
        k6_cpu_seconds_per_1k_requests: k6_ticks as f64 / ticks_per_second * 1000.0
            / requests.max(1) as f64,
        between_services: BetweenServices {
            bytes_received: wire.received,
            bytes_sent: wire.sent,
            bytes_per_request: wire.bytes() / requests.max(1) as f64,
            peak_connections,
            accepted_connections: wire.accepted,
        },
        rush,
    })
}

fn k6_command(
    stack: &Stack,
    options: &CompareOptions,
    scenario: Scenario,
    placement: &Placement,
    api: SocketAddr,
    summary_file: &Path,
) -> anyhow::Result<Command> {
    let script = options.scripts.join(format!("{}.js", scenario.name));
    if !script.is_file() {
        bail!("no k6 script {}", script.display());
    }
    let mut command = match placement.gateway_prefix.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(&options.k6);
            command
        }
        None => Command::new(&options.k6),
    };
    let env = [
        ("BASE_URL", format!("http://{}", stack.gateway_addr)),
        ("VUS", options.vus.to_string()),
        ("DURATION", k6_duration(options.duration)),
        ("WARMUP", k6_duration(options.warmup)),
        ("ADMIN_EMAIL", stack.admin_email.clone()),
        ("ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ("RUSH_STOCK", options.rush_stock.to_string()),
        ("RUSH_LIMIT", options.rush_limit.to_string()),
    ];
    command
        .args(["run", "--quiet", "--no-color", "--no-usage-report"])
        .arg(format!("--summary-export={}", summary_file.display()))
        .args([
            "--summary-trend-stats",
            "avg,min,med,max,p(90),p(95),p(99)",
            "--address",
            &api.to_string(),
        ])
        .stdin(Stdio::null());
    for (name, value) in env {
        command.arg("-e").arg(format!("{name}={value}"));
    }
    command.arg(script);
    Ok(command)
}

/// A duration as k6 reads it: whole milliseconds.
fn k6_duration(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

fn remaining(until: Instant) -> f64 {
    until
        .saturating_duration_since(Instant::now())
        .as_secs_f64()
}

/// Sleeps a second (or less, to `until`) after showing `status`.
async fn tick_until(
    until: Instant,
    tick: &mut u64,
    progress: &Progress,
    status: impl FnOnce() -> String,
) {
    progress.status(*tick, 5, status());
    *tick += 1;
    let next = (Instant::now() + Duration::from_secs(1)).min(until);
    tokio::time::sleep_until(next.into()).await;
}

/// The last lines of k6's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[derive(Deserialize)]
struct ApiAnswer {
    data: ApiData,
}

#[derive(Deserialize)]
struct ApiData {
    attributes: HashMap<String, serde_json::Value>,
}

async fn api_attributes(
    client: &reqwest::Client,
    url: &str,
) -> Option<HashMap<String, serde_json::Value>> {
    let body = client.get(url).send().await.ok()?.bytes().await.ok()?;
    Some(
        serde_json::from_slice::<ApiAnswer>(&body)
            .ok()?
            .data
            .attributes,
    )
}

/// k6's execution status, once its REST API answers.
async fn k6_status(client: &reqwest::Client, api: &str) -> Option<u64> {
    api_attributes(client, &format!("{api}/status"))
        .await?
        .get("status")?
        .as_u64()
}

/// Requests made so far (every scenario; for progress only).
async fn k6_requests(client: &reqwest::Client, api: &str) -> u64 {
    api_attributes(client, &format!("{api}/metrics/http_reqs"))
        .await
        .and_then(|a| a.get("sample")?.get("count")?.as_f64())
        .map_or(0, |n| n as u64)
}

/// k6's `--summary-export` file.
#[derive(Deserialize)]
pub struct Summary {
    metrics: HashMap<String, HashMap<String, serde_json::Value>>,
}

impl Summary {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    fn field(&self, metric: &str, field: &str) -> Option<f64> {
        self.metrics.get(metric)?.get(field)?.as_f64()
    }

    /// A Counter's total (`None` if it never counted: k6 leaves it out).
    pub fn count(&self, metric: &str) -> Option<f64> {
        self.field(metric, "count")
    }

    /// A Rate's share of true values.
    pub fn rate(&self, metric: &str) -> Option<f64> {
        self.field(metric, "value")
    }

    /// A Trend's percentiles.
    pub fn trend(&self, metric: &str) -> anyhow::Result<Latency> {
        let get = |field: &str| {
            self.field(metric, field)
                .with_context(|| format!("no {field} of {metric} in k6's summary"))
        };
        Ok(Latency {
            p50: get("med")?,
            p95: get("p(95)")?,
            p99: get("p(99)")?,
            max: get("max")?,
        })
    }

    /// `metric: threshold` for every threshold that failed (the export
    /// marks a failed one `true`).
    pub fn failed_thresholds(&self) -> Vec<String> {
        let mut failed: Vec<String> = self
            .metrics
            .iter()
            .filter_map(|(metric, fields)| {
                Some((metric, fields.get("thresholds")?.as_object()?.clone()))
            })
            .flat_map(|(metric, thresholds)| {
                thresholds
                    .into_iter()
                    .filter(|(_, failed)| failed.as_bool() == Some(true))
                    .map(move |(threshold, _)| format!("{metric}: {threshold}"))
            })
            .collect();
        failed.sort();
        failed
    }
}
