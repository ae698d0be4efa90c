//! The load-test scripts against the real stack. Every k6 script under
//! `loadtest/k6` (HTTP through the gateway, gRPC straight to the catalog)
//! runs for a few seconds with a few VUs, as `loadtest/compare` runs it, and
//! must pass its thresholds (k6 exits 0); its `--summary-export` must show
//! the work was done (the rush sells exactly its stock). The ghz configs
//! under `loadtest/ghz` cannot run here (no ghz), so they are checked
//! against the contracts.

use std::{collections::BTreeSet, path::Path, time::Duration};

use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use serde_json::Value;

use crate::{
    common::{ADMIN_PASSWORD, Backend, StackEnv, create_admin, flashmesh, repo_root, tools},
    gateway::gateway_stack,
};

on_both_backends!(every_k6_script_passes_its_thresholds);

/// Runs of a few seconds: every path taken, the suite kept short.
const VUS: &str = "3";
const WARMUP: &str = "1s";
const DURATION: &str = "2s";
/// The rush: 20 VUs after 50 units, at most 2 per buyer. It ends when
/// every VU has its SOLD_OUT; its DURATION only bounds how long that may take.
const RUSH_VUS: &str = "20";
const RUSH_DURATION: &str = "20s";
const RUSH_STOCK: f64 = 50.0;
const RUSH_LIMIT: &str = "2";

/// How k6 is run against one stack: the caller's side of the scripts'
/// contract (`k6 run --summary-export … -e BASE_URL=… -e VUS=… …`).
struct K6 {
    base_url: String,
    catalog_addr: String,
    admin_email: String,
    service_token: String,
    summaries: tempfile::TempDir,
}

impl K6 {
    /// Runs `loadtest/k6/<script>` with `vars` over the defaults; asserts it
    /// passed its thresholds and returns its summary export.
    async fn run(&self, script: &str, vars: &[(&str, &str)]) -> Value {
        let summary = self
            .summaries
            .path()
            .join(script.replace('/', "-") + ".json");
        let mut command = tokio::process::Command::new(tools().join("k6"));
        command
            .arg("run")
            .args(["--quiet", "--no-color"])
            .arg(format!("--summary-export={}", summary.display()))
            .args(["--summary-trend-stats", "avg,min,med,max,p(90),p(95),p(99)"])
            .env("K6_NO_USAGE_REPORT", "true")
            .kill_on_drop(true);
        let defaults = [
            ("BASE_URL", self.base_url.as_str()),
            ("CATALOG_ADDR", self.catalog_addr.as_str()),
            ("VUS", VUS),
            ("WARMUP", WARMUP),
            ("DURATION", DURATION),
            ("ADMIN_EMAIL", self.admin_email.as_str()),
            ("ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("SERVICE_TOKEN", self.service_token.as_str()),
        ];
        let overridden = |name: &str| vars.iter().any(|(given, _)| *given == name);
        for (name, value) in defaults
            .iter()
            .filter(|(name, _)| !overridden(name))
            .chain(vars)
        {
            command.arg("-e").arg(format!("{name}={value}"));
        }
        command.arg(repo_root().join("loadtest/k6").join(script));
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .unwrap_or_else(|_| panic!("k6 run {script} took over 120 s"))
            .expect("run k6");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "k6 run {script}: {}\n{text}",
            output.status
        );
        let exported = std::fs::read_to_string(&summary)
            .unwrap_or_else(|e| panic!("{script} wrote no summary ({e}):\n{text}"));
        serde_json::from_str(&exported).expect("the summary export is JSON")
    }
}

/// `field` of metric `name` in a summary export (a count, a rate's passes,
/// a trend's max, …).
fn figure(summary: &Value, name: &str, field: &str) -> f64 {
    summary["metrics"][name][field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {name}.{field} in {:#}", summary["metrics"]))
}

/// The scripts under `loadtest/k6`, relative to it (`browse.js`,
/// `grpc/health.js`); `lib/` holds modules, not scripts.
fn k6_scripts() -> BTreeSet<String> {
    let root = repo_root().join("loadtest/k6");
    let mut scripts = BTreeSet::new();
    for dir in ["", "grpc"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("loadtest/k6") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == "js") {
                let relative = path.strip_prefix(&root).expect("under loadtest/k6");
                scripts.insert(relative.to_string_lossy().into_owned());
            }
        }
    }
    scripts
}

async fn every_k6_script_passes_its_thresholds(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    // Everything comes from one IP and a few users: a load run lifts the
    // gateway's limits, or it measures 429s.
    env.set("FLASHMESH_RATE_LIMIT_IP", "1000000/s:1000000");
    env.set("FLASHMESH_RATE_LIMIT_USER", "1000000/s:1000000");
    let (stack, gateway) = gateway_stack(&mut env).await;
    let (admin_email, _) = create_admin(&env).await;
    let token = flashmesh(&env, &["token", "--service", "order", "--ttl", "10m"])
        .output()
        .await
        .expect("run flashmesh token");
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let k6 = K6 {
        base_url: gateway.url(""),
        catalog_addr: stack.catalog.catalog.running.addr.to_string(),
        admin_email,
        service_token: String::from_utf8_lossy(&token.stdout).trim().to_owned(),
        summaries: tempfile::tempdir().expect("temp dir"),
    };

    let rush_stock = RUSH_STOCK.to_string();
    let rush_knobs = [
        ("VUS", RUSH_VUS),
        ("DURATION", RUSH_DURATION),
        ("RUSH_STOCK", rush_stock.as_str()),
        ("RUSH_LIMIT", RUSH_LIMIT),
    ];
    for script in k6_scripts() {
        let knobs: &[(&str, &str)] = if script == "rush.js" {
            &rush_knobs
        } else {
            &[]
        };
        let summary = k6.run(&script, knobs).await;
        let checked = || figure(&summary, "checks{scenario:main}", "passes") > 0.0;
        match script.as_str() {
            "browse.js" | "auth.js" | "history.js" => {
                assert!(checked());
                assert!(figure(&summary, "http_reqs{scenario:main}", "count") > 0.0);
            }
            "journey.js" => {
                assert!(checked());
                assert!(figure(&summary, "journey_orders{scenario:main}", "count") > 0.0);
            }
            "rush.js" => {
                assert_eq!(figure(&summary, "vus_max", "value").to_string(), RUSH_VUS);
                // Exactly the stock sold, one unit per order; everyone after
                // it told SOLD_OUT; nothing else went wrong.
                assert_eq!(figure(&summary, "rush_units_accepted", "count"), RUSH_STOCK);
                assert_eq!(
                    figure(&summary, "rush_orders_accepted", "count"),
                    RUSH_STOCK
                );
                assert!(figure(&summary, "rush_sold_out", "count") > 0.0);
                assert_eq!(figure(&summary, "rush_unexpected", "count"), 0.0);
                assert!(figure(&summary, "rush_accept_ms", "max") > 0.0);
                assert_eq!(figure(&summary, "checks{rush:oversell}", "fails"), 0.0);
                assert!(figure(&summary, "checks{rush:oversell}", "passes") > 0.0);
            }
            "grpc/health.js" | "grpc/get_deal.js" | "grpc/reserve_stock.js" => {
                assert!(checked());
                assert!(figure(&summary, "grpc_req_duration{scenario:main}", "max") > 0.0);
            }
            other => panic!("loadtest/k6/{other} is not run here: add it with its figures"),
        }
    }
}

/// ghz's config keys (its `runner.Config`, JSON names).
const GHZ_KEYS: &[&str] = &[
    "proto",
    "protoset",
    "call",
    "cacert",
    "cert",
    "key",
    "skipTLS",
    "cname",
    "authority",
    "insecure",
    "total",
    "concurrency",
    "connections",
    "qps",
    "duration",
    "duration-stop",
    "max-duration",
    "timeout",
    "data",
    "data-file",
    "binary-file",
    "metadata",
    "metadata-file",
    "stream-interval",
    "output",
    "format",
    "connect-timeout",
    "keepalive",
    "cpus",
    "import-paths",
    "name",
    "tags",
    "reflect-metadata",
    "debug",
    "host",
    "enable-compression",
];

/// The RPC a ghz `call` names (`pkg.Service.Method` or `pkg.Service/Method`).
fn method(pool: &DescriptorPool, call: &str) -> MethodDescriptor {
    let (service, name) = call
        .rsplit_once('/')
        .or_else(|| call.rsplit_once('.'))
        .unwrap_or_else(|| panic!("call {call:?} names no method"));
    pool.get_service_by_name(service)
        .unwrap_or_else(|| panic!("call {call:?}: no service {service}"))
        .methods()
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("call {call:?}: {service} has no method {name}"))
}

#[test]
fn ghz_configs_call_real_rpcs_with_real_fields() {
    let mut pool = DescriptorPool::decode(flashmesh_proto::FILE_DESCRIPTOR_SET)
        .expect("the contracts' descriptors");
    pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .expect("grpc.health.v1's descriptors");
    let dir = repo_root().join("loadtest/ghz");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("loadtest/ghz") {
        let path = entry.expect("an entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let file = path.display().to_string();
        let config: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("readable"))
                .unwrap_or_else(|e| panic!("{file}: not a JSON object: {e}"));
        for key in config.keys() {
            assert!(
                GHZ_KEYS.contains(&key.as_str()),
                "{file}: {key:?} is no ghz key"
            );
        }
        let call = method(&pool, config["call"].as_str().expect("call"));
        // Paths are relative to the repository root, where ghz is run.
        if let Some(proto) = config.get("proto") {
            let proto = proto.as_str().expect("proto is a path");
            let import_paths: Vec<&str> = config["import-paths"]
                .as_array()
                .expect("import-paths")
                .iter()
                .map(|p| p.as_str().expect("a path"))
                .collect();
            assert!(repo_root().join(proto).is_file(), "{file}: no {proto}");
            // ghz finds the file through an import path, as protoc would
            // name it: that name must be the file declaring the service.
            let declared_in = call.parent_service().parent_file().name().to_owned();
            assert!(
                import_paths
                    .iter()
                    .any(|root| Path::new(root).join(&declared_in) == Path::new(proto)),
                "{file}: {proto} is not {declared_in} under {import_paths:?}"
            );
        }
        assert!(
            config["host"].as_str().is_some_and(|h| h.contains(':')),
            "{file}: host is host:port"
        );
        for key in ["duration", "timeout"] {
            let value = config[key].as_str().expect("a duration");
            humantime::parse_duration(value)
                .unwrap_or_else(|e| panic!("{file}: {key} {value:?}: {e}"));
        }
        // Template actions ({{.UUID}}) are strings, as the fields they fill.
        DynamicMessage::deserialize(call.input(), config["data"].clone())
            .unwrap_or_else(|e| panic!("{file}: data is no {}: {e}", call.input().full_name()));
        if let Some(metadata) = config.get("metadata") {
            assert!(
                metadata
                    .as_object()
                    .is_some_and(|m| m.values().all(Value::is_string)),
                "{file}: metadata maps names to strings"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "health, get_deal, reserve_stock");
}
