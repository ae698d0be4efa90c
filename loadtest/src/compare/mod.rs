//! `flashmesh-loadtest compare` (`loadtest/compare`): the gRPC stack next to
//! the HTTP/1.1 JSON baseline it replaces, on the same scenarios.
//!
//! Every (scenario, transport) run gets a fresh stack — `flashmesh auth`,
//! `catalog`, `order` and `gateway` in processes of their own on a new
//! PostgreSQL database and Redis prefix, `FLASHMESH_TRANSPORT` set — and
//! the same k6 script with the same VUs, warm-up and duration
//! (`loadtest/k6/<scenario>.js`). The order of the transports alternates
//! from one scenario to the next, so drift on a shared machine hits both.
//! While the main phase runs, each process's CPU time, each service's
//! bytes and connections (`flashmesh_server_*` metrics) are read; after
//! it, each process's peak RSS. The order → catalog hop (ReserveStock) is
//! also driven alone over both channels, and with `--latency` the gateway
//! moves behind a delayed link (see [`netns`]). The report, its chart and
//! a JSON summary go to `--out-dir`.

mod chart;
mod hop;
mod k6;
mod netns;
mod report;
mod rush;
mod scrape;

use std::{
    io::IsTerminal,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flashmesh_platform::config::Transport;
use serde::Serialize;

use crate::stack::{Backends, CHEAP_HASHING, Mode, Placement, Stack, UNTHROTTLED};

pub use report::Written;

/// A scenario: its name on the command line (and the k6 script's), and
/// what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
}

/// Every scenario, in the order they run.
pub const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "browse",
        title: "Browse deals (anonymous reads)",
    },
    Scenario {
        name: "auth",
        title: "Sign up, log in, refresh, GetMe",
    },
    Scenario {
        name: "history",
        title: "Order history",
    },
    Scenario {
        name: "journey",
        title: "Full order journey",
    },
    Scenario {
        name: "rush",
        title: "Flash-sale rush",
    },
    Scenario {
        name: "reserve",
        title: "The order → catalog hop alone (ReserveStock)",
    },
];

/// The scenario that is not a k6 script: ReserveStock driven from here.
const HOP: &str = "reserve";

impl std::str::FromStr for Scenario {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        SCENARIOS
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                format!(
                    "unknown scenario {name:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// What to run, and where the results go.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Main phase of every scenario.
    pub duration: Duration,
    /// Warm-up before it (not measured).
    pub warmup: Duration,
    /// k6 virtual users, and callers of the ReserveStock hop.
    pub vus: usize,
    pub scenarios: Vec<Scenario>,
    pub modes: Vec<Transport>,
    /// Times every (scenario, transport) runs; the report shows medians.
    pub rounds: usize,
    /// Round trip added between the gateway and the services, for a second
    /// set of runs (`None`: loopback only).
    pub latency: Option<Duration>,
    /// Units and per-buyer limit of the rush's deal.
    pub rush_stock: u32,
    pub rush_limit: u32,
    pub out_dir: PathBuf,
    /// The k6 binary and the directory of its scripts.
    pub k6: PathBuf,
    pub scripts: PathBuf,
}

impl CompareOptions {
    /// The command line that repeats this run.
    pub fn command_line(&self) -> String {
        let list = |names: Vec<&str>| names.join(",");
        let mut line = format!(
            "loadtest/compare --duration {} --warmup {} --vus {} --scenarios {} --modes {} --rounds {} --rush-stock {} --rush-limit {}",
            humantime::format_duration(self.duration),
            humantime::format_duration(self.warmup),
            self.vus,
            list(self.scenarios.iter().map(|s| s.name).collect()),
            list(self.modes.iter().map(|m| m.as_str()).collect()),
            self.rounds,
            self.rush_stock,
            self.rush_limit,
        );
        if let Some(latency) = self.latency {
            line.push_str(&format!(
                " --latency {}",
                humantime::format_duration(latency)
            ));
        }
        line
    }
}

/// Where a run's gateway sits relative to the services.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub enum Network {
    /// Everything on 127.0.0.1.
    Loopback,
    /// The gateway (and k6) in a network namespace, `rtt_ms` away.
    Delayed { rtt_ms: f64 },
}

impl Network {
    pub fn label(&self) -> String {
        match self {
            Self::Loopback => "loopback".to_owned(),
            Self::Delayed { rtt_ms } => format!("{rtt_ms} ms round trip gateway ↔ services"),
        }
    }
}

/// Progress on stderr: one line per step with the time since the start.
pub struct Progress {
    started: Instant,
    terminal: bool,
}

impl Progress {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn elapsed(&self) -> String {
        format!("[{:>6.1}s]", self.started.elapsed().as_secs_f64())
    }

    pub fn step(&self, message: impl std::fmt::Display) {
        if self.terminal {
            // Clears a status line left by `status`.
            eprint!("\r\x1b[2K");
        }
        eprintln!("{} {message}", self.elapsed());
    }

    /// A status that changes while a phase runs: rewritten in place on a
    /// terminal, else printed every `every` calls.
    pub fn status(&self, tick: u64, every: u64, message: impl std::fmt::Display) {
        if self.terminal {
            eprint!("\r\x1b[2K{} {message}", self.elapsed());
        } else if tick.is_multiple_of(every) {
            eprintln!("{} {message}", self.elapsed());
        }
    }
}

/// The k6 scripts: the repository's `loadtest/k6`.
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("k6")
}

/// The k6 binary `scripts/tools` installs (pinned in
/// `scripts/requirements-tools.txt`; `FLASHMESH_TOOLS_DIR` moves its venv).
pub fn pinned_k6() -> anyhow::Result<PathBuf> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/tools");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed ({})", script.display(), output.status);
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()).join("k6"))
}

/// Runs the comparison and writes the report.
pub async fn compare(backends: &Backends, options: &CompareOptions) -> anyhow::Result<Written> {
    if options.scenarios.is_empty() || options.modes.is_empty() || options.rounds == 0 {
        bail!("nothing to run: --scenarios and --modes need an entry, --rounds at least 1");
    }
    let progress = Progress::start();
    progress.step(format!("comparing: {}", options.command_line()));
    let machine = report::Machine::describe(backends).await;
    let mut runs = Vec::new();
    let mut hops = Vec::new();
    run_all(
        backends,
        options,
        &Placement::loopback(),
        &Network::Loopback,
        &progress,
        &mut runs,
        &mut hops,
    )
    .await?;
    let latency = match options.latency {
        None => None,
        Some(latency) => {
            Some(delayed_runs(backends, options, latency, &progress, &mut runs, &mut hops).await?)
        }
    };
    let summary = report::Summary::new(options, machine, runs, hops, latency);
    let written = report::write(&options.out_dir, &summary)?;
    progress.step(format!(
        "report: {} (chart {}, JSON {})",
        written.markdown.display(),
        written.chart.display(),
        written.json.display()
    ));
    Ok(written)
}

/// The runs with the gateway behind a delayed link, or why they were
/// skipped.
async fn delayed_runs(
    backends: &Backends,
    options: &CompareOptions,
    latency: Duration,
    progress: &Progress,
    runs: &mut Vec<k6::Run>,
    hops: &mut Vec<hop::Hop>,
) -> anyhow::Result<report::LatencyRuns> {
    progress.step(format!(
        "setting up a network namespace with {} round trip to the services",
        humantime::format_duration(latency)
    ));
    let link = match netns::DelayedLink::create(latency).await {
        Ok(link) => link,
        Err(reason) => {
            let reason = format!("{reason:#}");
            progress.step(format!("skipping the latency runs: {reason}"));
            return Ok(report::LatencyRuns::Skipped { reason });
        }
    };
    let measured_rtt_ms = link.measure_rtt_ms().await?;
    progress.step(format!(
        "measured round trip across the link: {measured_rtt_ms:.2} ms (TCP connect)"
    ));
    let network = Network::Delayed {
        rtt_ms: latency.as_secs_f64() * 1000.0,
    };
    let result = run_all(
        backends,
        options,
        &link.placement(),
        &network,
        progress,
        runs,
        hops,
    )
    .await;
    link.remove().await?;
    result?;
    Ok(report::LatencyRuns::Ran {
        network,
        measured_rtt_ms,
    })
}

/// One run: a scenario over a transport, in a round, placed on a network.
#[derive(Clone, Copy)]
pub struct Plan<'a> {
    pub round: usize,
    pub scenario: Scenario,
    pub transport: Transport,
    pub placement: &'a Placement,
    pub network: &'a Network,
}

impl Plan<'_> {
    fn label(&self) -> String {
        format!(
            "{} over {} (round {})",
            self.scenario.name,
            self.transport.as_str(),
            self.round
        )
    }
}

/// Every scenario in every mode on `network`, `rounds` times; the modes'
/// order alternates from one scenario (and round) to the next.
async fn run_all(
    backends: &Backends,
    options: &CompareOptions,
    placement: &Placement,
    network: &Network,
    progress: &Progress,
    runs: &mut Vec<k6::Run>,
    hops: &mut Vec<hop::Hop>,
) -> anyhow::Result<()> {
    for round in 1..=options.rounds {
        for (i, scenario) in options.scenarios.iter().enumerate() {
            let mut modes = options.modes.clone();
            if (i + round) % 2 == 0 {
                modes.reverse();
            }
            for transport in modes {
                let plan = Plan {
                    round,
                    scenario: *scenario,
                    transport,
                    placement,
                    network,
                };
                if scenario.name == HOP {
                    // The hop is this process calling the catalog: the
                    // gateway's link does not carry it.
                    if *network == Network::Loopback {
                        hops.push(hop::run(backends, options, &plan, progress).await?);
                    }
                    continue;
                }
                runs.push(run_k6(backends, options, &plan, progress).await?);
            }
        }
    }
    Ok(())
}

/// One k6 scenario in one transport on a fresh stack.
async fn run_k6(
    backends: &Backends,
    options: &CompareOptions,
    plan: &Plan<'_>,
    progress: &Progress,
) -> anyhow::Result<k6::Run> {
    let label = plan.label();
    progress.step(format!("{label}: starting the stack"));
    let stack = start_stack(backends, plan.transport, plan.placement).await?;
    let result = k6::run(&stack, options, plan, progress)
        .await
        .with_context(|| label.clone());
    stack.down().await?;
    progress.step(format!("{label}: done"));
    result
}

/// A stack with a process per service, on PostgreSQL + Redis, with the
/// gateway's limits out of the way and cheap password hashing: the
/// transport is what is compared, and argon2's 27 ms per login would
/// drown it equally in both modes.
async fn start_stack(
    backends: &Backends,
    transport: Transport,
    placement: &Placement,
) -> anyhow::Result<Stack> {
    let env: Vec<(&str, &str)> = [UNTHROTTLED, CHEAP_HASHING].concat();
    Stack::per_service(Mode::RedisGate, transport, backends, &env, placement).await
}
