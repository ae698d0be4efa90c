//! `loadtest/compare` end to end, at a scale CI affords: the journey, the
//! rush and the ReserveStock hop over both transports, each on a fresh stack
//! of real `flashmesh` processes (this build's binary) with the pinned k6,
//! into a temp directory; the report, chart and JSON summary must be there,
//! name both transports, and show the rush sold its stock with no oversell.

use std::{path::PathBuf, time::Duration};

use flashmesh_loadtest::{
    compare::{CompareOptions, compare, scripts_dir},
    stack::Backends,
};
use flashmesh_platform::config::Transport;

use crate::common::{BINARY, tools};

const RUSH_STOCK: u32 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_writes_a_report_a_chart_and_a_summary_for_both_transports() {
    let out = tempfile::tempdir().expect("temp dir");
    let options = CompareOptions {
        duration: Duration::from_secs(2),
        warmup: Duration::from_secs(1),
        vus: 8,
        scenarios: ["journey", "rush", "reserve"]
            .map(|name| name.parse().expect("a scenario"))
            .to_vec(),
        modes: vec![Transport::Grpc, Transport::Http1Json],
        rounds: 1,
        latency: None,
        rush_stock: RUSH_STOCK,
        rush_limit: 2,
        out_dir: out.path().to_owned(),
        k6: tools().join("k6"),
        scripts: scripts_dir(),
    };
    let backends = Backends {
        flashmesh: PathBuf::from(BINARY),
        ..Backends::from_env()
    };
    let written = compare(&backends, &options)
        .await
        .expect("the comparison runs");

    let markdown = std::fs::read_to_string(&written.markdown).expect("the report");
    for expected in [
        "| | grpc | http1-json | gRPC / baseline |",
        "## Full order journey (`journey`, loopback)",
        "## The order → catalog hop alone (ReserveStock, loopback)",
        "## The flash-sale rush in numbers (loopback)",
        "bytes between services per request",
        &options.command_line(),
    ] {
        assert!(
            markdown.contains(expected),
            "no {expected:?} in\n{markdown}"
        );
    }
    let chart = std::fs::read_to_string(&written.chart).expect("the chart");
    assert!(
        chart.starts_with("<svg") && chart.contains("http1-json p99"),
        "{chart}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&written.json).expect("the summary"))
            .expect("the summary is JSON");
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(4), "{json}");
    assert_eq!(
        json["reserve_hop"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );

    let summary = &written.summary;
    for run in &summary.runs {
        let label = format!("{} over {}", run.scenario, run.transport);
        assert!(run.requests > 0, "{label}: no requests");
        assert!(
            run.between_services.bytes_per_request > 0.0,
            "{label}: no bytes counted"
        );
        assert!(
            run.between_services.peak_connections >= 1.0,
            "{label}: no connections"
        );
        for process in &run.processes {
            assert!(
                process.peak_rss_mib > 0.0,
                "{label}: no RSS for {}",
                process.name
            );
        }
        if let Some(rush) = &run.rush {
            assert_eq!(rush.oversell, 0, "{label}: {rush:?}");
            assert_eq!(
                rush.units_accepted,
                u64::from(RUSH_STOCK),
                "{label}: {rush:?}"
            );
            assert_eq!(
                rush.units_taken_from_deal,
                i64::from(RUSH_STOCK),
                "{label}: {rush:?}"
            );
            assert!(rush.sold_out_answers > 0, "{label}: {rush:?}");
        }
    }
    for hop in &summary.reserve_hop {
        assert!(
            hop.calls > 0 && hop.errors == 0,
            "ReserveStock over {}: {hop:?}",
            hop.transport
        );
    }
    // gRPC multiplexes a client's calls on one connection per upstream; the
    // baseline keeps one per call in flight.
    let connections = |transport: &str| {
        summary
            .runs
            .iter()
            .find(|r| r.scenario == "journey" && r.transport == transport)
            .map(|r| r.between_services.peak_connections)
    };
    assert!(
        connections("grpc") < connections("http1-json"),
        "{:?} vs {:?}",
        connections("grpc"),
        connections("http1-json")
    );
    assert_eq!(summary.targets.len(), 4, "{:?}", summary.targets);
}
