//! The report's chart (SVG, with plotters): per scenario and transport, the
//! latency percentiles (p50, p95, p99; log scale) above and the throughput
//! below (medians over the rounds).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use super::{
    Network, SCENARIOS,
    hop::Hop,
    k6::Run,
    report::{Summary, median},
};

/// One group of bars: a scenario (or the hop) over one transport.
struct Bars {
    group: String,
    transport: &'static str,
    /// p50, p95, p99 in ms.
    latency: [f64; 3],
    per_second: f64,
}

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 900;
const PERCENTILES: [&str; 3] = ["p50", "p95", "p99"];

/// Medians over the rounds, per scenario (per network) and transport, then
/// the hop's.
fn bars(summary: &Summary) -> Vec<Bars> {
    let mut networks: Vec<&Network> = Vec::new();
    for run in &summary.runs {
        if !networks.contains(&&run.network) {
            networks.push(&run.network);
        }
    }
    let mut bars = Vec::new();
    for network in networks {
        for scenario in SCENARIOS {
            for transport in summary.transports() {
                let runs = summary.runs_of(scenario.name, transport, network);
                let figure = |f: &dyn Fn(&Run) -> f64| median(&runs, f);
                let (Some(p50), Some(p95), Some(p99), Some(per_second)) = (
                    figure(&|r| r.latency_ms.p50),
                    figure(&|r| r.latency_ms.p95),
                    figure(&|r| r.latency_ms.p99),
                    figure(&|r| r.requests_per_second),
                ) else {
                    continue;
                };
                bars.push(Bars {
                    group: match network {
                        Network::Loopback => scenario.name.to_owned(),
                        Network::Delayed { rtt_ms } => format!("{} +{rtt_ms}ms", scenario.name),
                    },
                    transport,
                    latency: [p50, p95, p99],
                    per_second,
                });
            }
        }
    }
    for transport in summary.transports() {
        let hops = summary.hops_of(transport);
        let figure = |f: &dyn Fn(&Hop) -> f64| median(&hops, f);
        if let (Some(p50), Some(p95), Some(p99), Some(per_second)) = (
            figure(&|h| h.p50_ms),
            figure(&|h| h.p95_ms),
            figure(&|h| h.p99_ms),
            figure(&|h| h.calls_per_second),
        ) {
            bars.push(Bars {
                group: "reserve (hop)".to_owned(),
                transport,
                latency: [p50, p95, p99],
                per_second,
            });
        }
    }
    bars
}

/// A transport's colour, lighter for the lower percentiles.
fn colour(transport: &str, shade: usize) -> RGBColor {
    let base = if transport == "grpc" {
        (31.0, 119.0, 180.0)
    } else {
        (255.0, 127.0, 14.0)
    };
    let lighten = |c: f64| (c + (255.0 - c) * (2 - shade.min(2)) as f64 * 0.3) as u8;
    RGBColor(lighten(base.0), lighten(base.1), lighten(base.2))
}

pub fn draw(path: &Path, summary: &Summary) -> anyhow::Result<()> {
    let bars = bars(summary);
    let mut groups: Vec<&str> = Vec::new();
    let mut transports: Vec<&str> = Vec::new();
    for bar in &bars {
        if !groups.contains(&bar.group.as_str()) {
            groups.push(&bar.group);
        }
        if !transports.contains(&bar.transport) {
            transports.push(bar.transport);
        }
    }
    transports.sort_by_key(|t| *t != "grpc");
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let plot = |e: &dyn std::fmt::Display| anyhow!("drawing the chart: {e}");
    root.fill(&WHITE).map_err(|e| plot(&e))?;
    let (top, bottom) = root.split_vertically(HEIGHT * 11 / 20);
    let x_range = -0.5..(groups.len().max(1) as f64 - 0.5);
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 {
            groups
                .get(i as usize)
                .map_or(String::new(), |g| (*g).to_owned())
        } else {
            String::new()
        }
    };
    // Each group's slot is 0.8 wide, shared by its transports' bars.
    let slot = |group: usize, transport: usize, bar: usize, bars_per_transport: usize| {
        let width = 0.8 / (transports.len() * bars_per_transport) as f64;
        let left = group as f64 - 0.4 + (transport * bars_per_transport + bar) as f64 * width;
        (left, left + width * 0.9)
    };
    let index = |bar: &Bars| {
        (
            groups.iter().position(|g| *g == bar.group).unwrap_or(0),
            transports
                .iter()
                .position(|t| *t == bar.transport)
                .unwrap_or(0),
        )
    };

    let lowest = bars
        .iter()
        .map(|b| b.latency[0])
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let highest = bars.iter().map(|b| b.latency[2]).fold(0.0, f64::max);
    let floor = if lowest.is_finite() {
        lowest / 2.0
    } else {
        0.1
    };
    let mut latency = ChartBuilder::on(&top)
        .caption("Latency percentiles (ms, log scale)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            x_range.clone(),
            (floor..(highest * 2.0).max(floor * 10.0)).log_scale(),
        )
        .map_err(|e| plot(&e))?;
    latency
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() + 1)
        .x_label_formatter(&label)
        .y_desc("ms")
        .draw()
        .map_err(|e| plot(&e))?;
    for (t, transport) in transports.iter().enumerate() {
        for (p, percentile) in PERCENTILES.iter().enumerate() {
            let fill = colour(transport, p);
            latency
                .draw_series(bars.iter().filter(|b| b.transport == *transport).map(|b| {
                    let (group, _) = index(b);
                    let (left, right) = slot(group, t, p, PERCENTILES.len());
                    Rectangle::new(
                        [(left, floor), (right, b.latency[p].max(floor))],
                        fill.filled(),
                    )
                }))
                .map_err(|e| plot(&e))?
                .label(format!("{transport} {percentile}"))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fill.filled()));
        }
    }
    latency
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot(&e))?;

    let most = bars.iter().map(|b| b.per_second).fold(0.0, f64::max);
    let mut throughput = ChartBuilder::on(&bottom)
        .caption(
            "Throughput (requests/s; calls/s for the hop)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, 0.0..(most * 1.15).max(1.0))
        .map_err(|e| plot(&e))?;
    throughput
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() + 1)
        .x_label_formatter(&label)
        .y_desc("per second")
        .draw()
        .map_err(|e| plot(&e))?;
    for (t, transport) in transports.iter().enumerate() {
        let fill = colour(transport, 2);
        throughput
            .draw_series(bars.iter().filter(|b| b.transport == *transport).map(|b| {
                let (group, _) = index(b);
                let (left, right) = slot(group, t, 0, 1);
                Rectangle::new([(left, 0.0), (right, b.per_second)], fill.filled())
            }))
            .map_err(|e| plot(&e))?
            .label(*transport)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fill.filled()));
    }
    throughput
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot(&e))?;
    root.present().map_err(|e| plot(&e))?;
    Ok(())
}
