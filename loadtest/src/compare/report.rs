//! The comparison's results: `<date>-<short sha>.md` (tables per scenario,
//! the hop, the rush, the targets), `.svg` (the chart) and `.json` (the same
//! figures for machines), side by side in the output directory.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, PgConnection};

use super::{CompareOptions, Network, SCENARIOS, chart, hop::Hop, k6::Run, rush::Rush};
use crate::stack::Backends;

/// The files written.
#[derive(Debug)]
pub struct Written {
    pub markdown: PathBuf,
    pub chart: PathBuf,
    pub json: PathBuf,
    /// Every figure, as written to `json`.
    pub summary: Summary,
}

/// What the figures were measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgresql: String,
    pub redis: String,
    /// 1-minute load average when the comparison began.
    pub load_average_at_start: String,
}

impl Machine {
    pub async fn describe(backends: &Backends) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let field = |text: &str, name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let memory_kib: f64 = field(&meminfo, "MemTotal")
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0.0);
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: field(&cpuinfo, "model name"),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            postgresql: postgresql_version(&backends.database_url)
                .await
                .unwrap_or_else(|e| format!("unknown ({e})")),
            redis: redis_version(&backends.redis_url)
                .await
                .unwrap_or_else(|e| format!("unknown ({e})")),
            load_average_at_start: load_average(),
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

async fn postgresql_version(url: &str) -> anyhow::Result<String> {
    let mut connection = PgConnection::connect(url).await?;
    let (version,): (String,) = sqlx::query_as("SHOW server_version")
        .fetch_one(&mut connection)
        .await?;
    connection.close().await?;
    Ok(version)
}

async fn redis_version(url: &str) -> anyhow::Result<String> {
    let mut connection = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await?;
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
        .context("no redis_version in INFO")
}

/// The runs behind a delayed link, or why there are none.
#[derive(Clone, Debug, Serialize)]
pub enum LatencyRuns {
    Ran {
        network: Network,
        /// TCP connect round trip measured across the link.
        measured_rtt_ms: f64,
    },
    Skipped {
        reason: String,
    },
}

/// One of the targets, on the loopback runs.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub wanted: String,
    /// gRPC's figure over the baseline's.
    pub ratio: Option<f64>,
    pub met: Option<bool>,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub date: String,
    pub commit: String,
    pub command: String,
    pub machine: Machine,
    pub vus: usize,
    pub duration_seconds: f64,
    pub warmup_seconds: f64,
    pub rounds: usize,
    pub runs: Vec<Run>,
    pub reserve_hop: Vec<Hop>,
    pub latency: Option<LatencyRuns>,
    pub targets: Vec<Target>,
    /// 1-minute load average when the comparison ended.
    pub load_average_at_end: String,
}

impl Summary {
    pub fn new(
        options: &CompareOptions,
        machine: Machine,
        runs: Vec<Run>,
        reserve_hop: Vec<Hop>,
        latency: Option<LatencyRuns>,
    ) -> Self {
        let targets = targets(&runs);
        Self {
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10]
                .to_owned(),
            commit: commit(),
            command: options.command_line(),
            machine,
            vus: options.vus,
            duration_seconds: options.duration.as_secs_f64(),
            warmup_seconds: options.warmup.as_secs_f64(),
            rounds: options.rounds,
            runs,
            reserve_hop,
            latency,
            targets,
            load_average_at_end: load_average(),
        }
    }

    /// `<date>-<short sha>`.
    fn stem(&self) -> String {
        format!("{}-{}", self.date, self.commit.trim_end_matches("-dirty"))
    }

    /// Every round's run of `scenario` over `transport` on `network`.
    pub(super) fn runs_of(&self, scenario: &str, transport: &str, network: &Network) -> Vec<&Run> {
        self.runs
            .iter()
            .filter(|r| r.scenario == scenario && r.transport == transport && r.network == *network)
            .collect()
    }

    /// Every round's ReserveStock hop over `transport`.
    pub(super) fn hops_of(&self, transport: &str) -> Vec<&Hop> {
        self.reserve_hop
            .iter()
            .filter(|h| h.transport == transport)
            .collect()
    }

    /// The transports, gRPC first.
    pub(super) fn transports(&self) -> Vec<&'static str> {
        let mut seen = Vec::new();
        let all = self.runs.iter().map(|r| r.transport);
        for transport in all.chain(self.reserve_hop.iter().map(|h| h.transport)) {
            if !seen.contains(&transport) {
                seen.push(transport);
            }
        }
        // gRPC first, so the ratio column reads gRPC / baseline.
        seen.sort_by_key(|t| *t != "grpc");
        seen
    }
}

/// The median of `f` over `items` (`None` if there are none).
pub(super) fn median<T>(items: &[&T], f: &dyn Fn(&T) -> f64) -> Option<f64> {
    crate::run::median(items.iter().map(|item| f(item)))
}

/// The short commit of the working tree, `-dirty` if it has changes.
fn commit() -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(sha) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_owned();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if changes.is_empty() => sha,
        _ => format!("{sha}-dirty"),
    }
}

/// The targets, from the loopback journey (medians over rounds).
fn targets(runs: &[Run]) -> Vec<Target> {
    let journey = |transport: &str| -> Vec<&Run> {
        runs.iter()
            .filter(|r| {
                r.scenario == "journey"
                    && r.transport == transport
                    && r.network == Network::Loopback
            })
            .collect()
    };
    let (grpc, json) = (journey("grpc"), journey("http1-json"));
    if grpc.is_empty() || json.is_empty() {
        return vec![Target {
            name: "every target".to_owned(),
            wanted: "the journey in both modes".to_owned(),
            ratio: None,
            met: None,
            detail:
                "not measured: the targets need the journey scenario over both grpc and http1-json"
                    .to_owned(),
        }];
    }
    // gRPC's median, the baseline's median, and their ratio.
    let compare = |f: &dyn Fn(&Run) -> f64| {
        let (g, j) = (
            median(&grpc, f).unwrap_or(f64::NAN),
            median(&json, f).unwrap_or(f64::NAN),
        );
        (g, j, if j > 0.0 { g / j } else { f64::NAN })
    };
    let throughput = compare(&|r| r.requests_per_second);
    let p99 = compare(&|r| r.latency_ms.p99);
    let bytes = compare(&|r| r.between_services.bytes_per_request);
    let connections = compare(&|r| r.between_services.peak_connections);
    let stack_cpu = compare(&|r| {
        r.processes
            .iter()
            .map(|p| p.cpu_seconds_per_1k_requests)
            .sum()
    });
    let why = format!(
        "the stack used {:.3} vs {:.3} CPU s per 1,000 requests ({:.2}×)",
        stack_cpu.0, stack_cpu.1, stack_cpu.2
    );
    vec![
        Target {
            name: "journey throughput at equal VUs".to_owned(),
            wanted: "gRPC ≥ 0.95 × baseline".to_owned(),
            ratio: Some(throughput.2),
            met: Some(throughput.2 >= 0.95),
            detail: format!(
                "{:.0} vs {:.0} requests/s{}",
                throughput.0,
                throughput.1,
                missed_by(throughput.2, 0.95, true, &why)
            ),
        },
        Target {
            name: "journey p99".to_owned(),
            wanted: "gRPC ≤ baseline".to_owned(),
            ratio: Some(p99.2),
            met: Some(p99.2 <= 1.0),
            detail: format!(
                "{:.1} vs {:.1} ms{}",
                p99.0,
                p99.1,
                missed_by(p99.2, 1.0, false, &why)
            ),
        },
        Target {
            name: "bytes between services per journey request".to_owned(),
            wanted: "gRPC ≤ 0.6 × baseline".to_owned(),
            ratio: Some(bytes.2),
            met: Some(bytes.2 <= 0.6),
            detail: format!(
                "{:.0} vs {:.0} bytes{}",
                bytes.0,
                bytes.1,
                missed_by(bytes.2, 0.6, false, "")
            ),
        },
        Target {
            name: "connections the services hold during the journey".to_owned(),
            wanted: "far fewer with gRPC (counted met at ≤ 0.25 ×)".to_owned(),
            ratio: Some(connections.2),
            met: Some(connections.2 <= 0.25),
            detail: format!("{:.0} vs {:.0} at the peak", connections.0, connections.1),
        },
    ]
}

/// `; missed by N%` and why, or nothing when `ratio` is on the right side
/// of `limit` (`at_least`: it must not be below).
fn missed_by(ratio: f64, limit: f64, at_least: bool, why: &str) -> String {
    let missed = if at_least {
        ratio < limit
    } else {
        ratio > limit
    };
    if !missed {
        return String::new();
    }
    let by = (ratio / limit - 1.0).abs() * 100.0;
    if why.is_empty() {
        format!("; missed by {by:.1}%")
    } else {
        format!("; missed by {by:.1}%, while {why}")
    }
}

/// Writes the three files into `dir` (created if needed).
pub fn write(dir: &Path, summary: &Summary) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = summary.stem();
    let chart_path = dir.join(format!("{stem}.svg"));
    chart::draw(&chart_path, summary)?;
    let markdown = dir.join(format!("{stem}.md"));
    std::fs::write(&markdown, markdown_report(summary, &format!("{stem}.svg")))
        .with_context(|| format!("writing {}", markdown.display()))?;
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(summary)?)
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(Written {
        markdown,
        chart: chart_path,
        json,
        summary: summary.clone(),
    })
}

fn markdown_report(summary: &Summary, chart_file: &str) -> String {
    let mut md = String::new();
    let machine = &summary.machine;
    let _ = writeln!(
        md,
        "# gRPC vs the HTTP/1.1 JSON baseline — {}, {}\n",
        summary.date, summary.commit
    );
    let _ = writeln!(md, "Command: `{}`\n", summary.command);
    let _ = writeln!(
        md,
        "Machine: {} cores ({}), {:.0} GiB, Linux {}; PostgreSQL {} and Redis {} on the same machine, and k6 too. \
         Load average {} at the start, {} at the end. A shared machine is noisy: compare the modes of one run, not figures across runs.\n",
        machine.cores,
        machine.cpu_model,
        machine.memory_gib,
        machine.kernel,
        machine.postgresql,
        machine.redis,
        machine.load_average_at_start,
        summary.load_average_at_end,
    );
    md.push_str(METHOD);
    let _ = writeln!(
        md,
        "\nEach scenario: {} VUs, {} s warm-up, then {} s measured; {} round(s){}.\n",
        summary.vus,
        summary.warmup_seconds,
        summary.duration_seconds,
        summary.rounds,
        if summary.rounds > 1 {
            ", each figure the median over the rounds (every round is in the JSON)"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "![latency percentiles and throughput]({chart_file})\n");

    let _ = writeln!(md, "## Targets (loopback)\n");
    let _ = writeln!(md, "| target | wanted | gRPC / baseline | met | figures |");
    let _ = writeln!(md, "| --- | --- | ---: | --- | --- |");
    for target in &summary.targets {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            target.name,
            target.wanted,
            target.ratio.map_or("–".to_owned(), |r| format!("{r:.2}")),
            match target.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            },
            target.detail
        );
    }
    md.push('\n');

    let transports = summary.transports();
    write_scenarios(&mut md, summary, &transports, &Network::Loopback);
    write_hop(&mut md, summary, &transports);
    write_rush(&mut md, summary, &transports, &Network::Loopback);
    match &summary.latency {
        None => {}
        Some(LatencyRuns::Skipped { reason }) => {
            let _ = writeln!(
                md,
                "## With latency between the gateway and the services\n\nSkipped: {reason}\n"
            );
        }
        Some(LatencyRuns::Ran {
            network,
            measured_rtt_ms,
        }) => {
            let delay = match network {
                Network::Delayed { rtt_ms } if *rtt_ms > 0.0 => {
                    "delayed with `tc netem` by half the round trip at each end"
                }
                _ => "with no delay added (a control for the layout itself)",
            };
            let _ = writeln!(
                md,
                "## With {}\n\nThe gateway and k6 ran in a network namespace behind a veth pair {delay} \
                 (measured TCP round trip across it: {measured_rtt_ms:.2} ms); the services on the host. The gateway's rate \
                 limits were in-process (it cannot reach the host's Redis from there). The order → catalog hop stays on the host.\n",
                network.label()
            );
            write_scenarios(&mut md, summary, &transports, network);
            write_rush(&mut md, summary, &transports, network);
        }
    }
    md
}

const METHOD: &str = "How it was measured:

- Every scenario in every mode runs on a **fresh stack**: `flashmesh auth`, `catalog`, `order` and `gateway`, each its own \
process, `FLASHMESH_TRANSPORT` set, on a new PostgreSQL database and Redis key prefix; the same k6 script \
(`loadtest/k6/<scenario>.js`) with the same VUs, warm-up and duration; the modes' order alternates from one scenario to the next. \
Both transports pool connections (one multiplexed HTTP/2 connection per upstream; keep-alive HTTP/1.1, up to 1024 idle per \
upstream) with the same timeouts, and the gateway speaks the same JSON at the edge.
- The gateway's rate limits are raised out of the way; passwords are hashed at a low argon2 cost (256 KiB, 1 pass) in both \
modes, so the 27 ms of a production-cost login does not drown the transport.
- Requests, latency and errors: k6's metrics of the main scenario (`{scenario:main}`), warm-up excluded. The rush's main \
phase ends when the sale is over.
- CPU: each process's utime + stime from `/proc/<pid>/stat` over the main phase, per 1,000 requests of the main scenario. \
Peak RSS: each process's VmHWM, over its life (this scenario only).
- Bytes between services: what the auth, catalog and order servers read and wrote on their accepted connections \
(`flashmesh_server_transport_bytes_total`: application-layer bytes — HTTP/2 or HTTP/1.1 framing and headers included, \
TCP/IP headers not), from the gateway and from the order service (its calls to the catalog and the JWKS fetches); the \
gateway's public port is not counted. Connections: `flashmesh_server_connections_open` summed over the services, sampled \
every second of the main phase (the peak), and connections accepted during it.
";

/// A figure per transport, and gRPC / baseline when both are there.
fn row(md: &mut String, label: &str, values: &[Option<f64>], decimals: usize) {
    cells(md, label, values, decimals, true);
}

/// A figure per transport, where a ratio means nothing (counts, rates
/// that are mostly 0).
fn plain_row(md: &mut String, label: &str, values: &[Option<f64>], decimals: usize) {
    cells(md, label, values, decimals, false);
}

fn cells(md: &mut String, label: &str, values: &[Option<f64>], decimals: usize, ratio: bool) {
    let cells: Vec<String> = values
        .iter()
        .map(|v| v.map_or("–".to_owned(), |v| format!("{v:.decimals$}")))
        .collect();
    let ratio = match values {
        [Some(a), Some(b)] if ratio && *b != 0.0 => format!(" {:.2} |", a / b),
        [_, _] => " – |".to_owned(),
        _ => String::new(),
    };
    let _ = writeln!(md, "| {label} | {} |{ratio}", cells.join(" | "));
}

fn header(md: &mut String, transports: &[&str]) {
    let ratio = if transports.len() == 2 {
        " gRPC / baseline |"
    } else {
        ""
    };
    let _ = writeln!(md, "| | {} |{ratio}", transports.join(" | "));
    let columns = transports.len() + usize::from(transports.len() == 2);
    let _ = writeln!(md, "| --- |{}", " ---: |".repeat(columns));
}

fn write_scenarios(md: &mut String, summary: &Summary, transports: &[&str], network: &Network) {
    for scenario in SCENARIOS {
        let runs: Vec<Vec<&Run>> = transports
            .iter()
            .map(|t| summary.runs_of(scenario.name, t, network))
            .collect();
        if runs.iter().all(Vec::is_empty) {
            continue;
        }
        let _ = writeln!(
            md,
            "## {} (`{}`, {})\n",
            scenario.title,
            scenario.name,
            network.label()
        );
        header(md, transports);
        let figure =
            |f: &dyn Fn(&Run) -> f64| runs.iter().map(|r| median(r, f)).collect::<Vec<_>>();
        row(md, "requests/s", &figure(&|r| r.requests_per_second), 0);
        row(md, "p50 ms", &figure(&|r| r.latency_ms.p50), 2);
        row(md, "p95 ms", &figure(&|r| r.latency_ms.p95), 2);
        row(md, "p99 ms", &figure(&|r| r.latency_ms.p99), 2);
        plain_row(md, "error rate %", &figure(&|r| r.error_rate * 100.0), 2);
        let names = runs
            .iter()
            .flatten()
            .next()
            .map(|r| r.processes.iter().map(|p| p.name).collect::<Vec<_>>())
            .unwrap_or_default();
        for name in &names {
            row(
                md,
                &format!("CPU s per 1,000 requests: {name}"),
                &figure(&|r| {
                    r.processes
                        .iter()
                        .find(|p| p.name == *name)
                        .map_or(f64::NAN, |p| p.cpu_seconds_per_1k_requests)
                }),
                3,
            );
        }
        row(
            md,
            "CPU s per 1,000 requests: the stack",
            &figure(&|r| {
                r.processes
                    .iter()
                    .map(|p| p.cpu_seconds_per_1k_requests)
                    .sum()
            }),
            3,
        );
        row(
            md,
            "CPU s per 1,000 requests: k6 (load generator)",
            &figure(&|r| r.k6_cpu_seconds_per_1k_requests),
            3,
        );
        for name in &names {
            row(
                md,
                &format!("peak RSS MiB: {name}"),
                &figure(&|r| {
                    r.processes
                        .iter()
                        .find(|p| p.name == *name)
                        .map_or(f64::NAN, |p| p.peak_rss_mib)
                }),
                1,
            );
        }
        row(
            md,
            "bytes between services per request",
            &figure(&|r| r.between_services.bytes_per_request),
            0,
        );
        row(
            md,
            "MB between services (received + sent)",
            &figure(&|r| (r.between_services.bytes_received + r.between_services.bytes_sent) / 1e6),
            2,
        );
        row(
            md,
            "connections between services (peak open)",
            &figure(&|r| r.between_services.peak_connections),
            0,
        );
        plain_row(
            md,
            "connections accepted by services",
            &figure(&|r| r.between_services.accepted_connections),
            0,
        );
        let failed: Vec<String> = runs
            .iter()
            .flatten()
            .filter(|r| !r.thresholds_failed.is_empty())
            .map(|r| {
                format!(
                    "{} (round {}): {}",
                    r.transport,
                    r.round,
                    r.thresholds_failed.join("; ")
                )
            })
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(md, "\nk6 thresholds failed — {}", failed.join(" — "));
        }
        md.push('\n');
    }
}

fn write_hop(md: &mut String, summary: &Summary, transports: &[&str]) {
    if summary.reserve_hop.is_empty() {
        return;
    }
    let hops: Vec<Vec<&Hop>> = transports.iter().map(|t| summary.hops_of(t)).collect();
    let _ = writeln!(
        md,
        "## The order → catalog hop alone (ReserveStock, loopback)\n\n\
         This process calls the catalog's ReserveStock with the order service's token through the same generated client over \
         the platform's channel of each transport (tonic's HTTP/2 channel, or the baseline's `JsonChannel`), {} callers, \
         on a deal that never runs out. Each call is a PostgreSQL transaction, so the database bounds both.\n",
        summary.vus
    );
    header(md, transports);
    let figure = |f: &dyn Fn(&Hop) -> f64| hops.iter().map(|h| median(h, f)).collect::<Vec<_>>();
    row(md, "calls/s", &figure(&|h| h.calls_per_second), 0);
    row(md, "p50 ms", &figure(&|h| h.p50_ms), 2);
    row(md, "p99 ms", &figure(&|h| h.p99_ms), 2);
    plain_row(md, "errors", &figure(&|h| h.errors as f64), 0);
    row(
        md,
        "catalog CPU µs per call",
        &figure(&|h| h.catalog_cpu_us_per_call),
        1,
    );
    row(
        md,
        "client CPU µs per call",
        &figure(&|h| h.client_cpu_us_per_call),
        1,
    );
    row(md, "bytes per call", &figure(&|h| h.bytes_per_call), 0);
    row(
        md,
        "connections to the catalog",
        &figure(&|h| h.connections),
        0,
    );
    md.push('\n');
}

fn write_rush(md: &mut String, summary: &Summary, transports: &[&str], network: &Network) {
    let rushes: Vec<Vec<&Rush>> = transports
        .iter()
        .map(|t| {
            summary
                .runs_of("rush", t, network)
                .into_iter()
                .filter_map(|r| r.rush.as_ref())
                .collect()
        })
        .collect();
    if rushes.iter().all(Vec::is_empty) {
        return;
    }
    let _ = writeln!(
        md,
        "## The flash-sale rush in numbers ({})\n\n\
         k6's counts, then an independent count after the run through the API: units taken from the deal (stock − remaining) \
         and the units GetDealSales counted from the order events. Oversell is the most any of the three counts exceeds the stock: it must be 0.\n",
        network.label()
    );
    header(md, transports);
    let figure = |f: &dyn Fn(&Rush) -> f64| rushes.iter().map(|r| median(r, f)).collect::<Vec<_>>();
    // Over several rounds, the worst round of what must be 0.
    let worst = |f: &dyn Fn(&Rush) -> f64| {
        rushes
            .iter()
            .map(|r| r.iter().map(|r| f(r)).reduce(f64::max))
            .collect::<Vec<_>>()
    };
    plain_row(md, "VUs", &figure(&|r| r.vus as f64), 0);
    plain_row(md, "units on sale", &figure(&|r| f64::from(r.stock)), 0);
    plain_row(
        md,
        "per-buyer limit",
        &figure(&|r| f64::from(r.per_buyer_limit)),
        0,
    );
    plain_row(
        md,
        "orders accepted",
        &figure(&|r| r.orders_accepted as f64),
        0,
    );
    plain_row(
        md,
        "units accepted",
        &figure(&|r| r.units_accepted as f64),
        0,
    );
    plain_row(
        md,
        "SOLD_OUT answers",
        &figure(&|r| r.sold_out_answers as f64),
        0,
    );
    plain_row(
        md,
        "other answers (unexpected; worst round)",
        &worst(&|r| r.unexpected_answers as f64),
        0,
    );
    plain_row(
        md,
        "units taken from the deal",
        &figure(&|r| r.units_taken_from_deal as f64),
        0,
    );
    plain_row(
        md,
        "units sold (GetDealSales)",
        &figure(&|r| r.units_sold_counted as f64),
        0,
    );
    plain_row(
        md,
        "**oversell** (worst round)",
        &worst(&|r| r.oversell as f64),
        0,
    );
    row(
        md,
        "time to sell out ms",
        &figure(&|r| r.time_to_sell_out_ms),
        0,
    );
    row(
        md,
        "p99 ms (every request of the sale)",
        &figure(&|r| r.p99_ms),
        2,
    );
    md.push('\n');
}
