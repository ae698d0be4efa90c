//! Observability end to end: an in-process OTLP receiver (the collector's
//! TraceService) behind `OTEL_EXPORTER_OTLP_ENDPOINT`, one `POST /v1/orders`
//! through the gateway, and the spans and metrics it leaves; then the
//! deployment's scrape config, alert rules and dashboard checked against the
//! real `/metrics`.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use flashmesh_platform::metrics;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    common::{Backend, OtlpReceiver, ReceivedSpan, StackEnv, repo_root, sign_up},
    gateway::gateway_with_open_deal,
};

on_both_backends!(
    one_order_is_one_trace_and_counted_once,
    sampling_is_decided_once_at_the_root,
);

const GATEWAY: &str = "flashmesh-gateway";
const ORDER: &str = "flashmesh-order";
const CATALOG: &str = "flashmesh-catalog";
const PLACE_ORDER: &str = "flashmesh.order.v1.OrderService/PlaceOrder";
const RESERVE_STOCK: &str = "flashmesh.catalog.v1.CatalogService/ReserveStock";
/// The order events' consumer groups, each with a span per event.
const CONSUMER_GROUPS: [&str; 2] = ["deal-sales-counter", "order-status-projector"];

/// OTLP span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CONSUMER: i32 = 5;

async fn one_order_is_one_trace_and_counted_once(backend: Backend) {
    let receiver = OtlpReceiver::start().await;
    let mut env = StackEnv::new(backend).await;
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint());
    env.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    let (stack, gateway, deal) = gateway_with_open_deal(&mut env).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin_addr = admin.local_addr().expect("addr");
    let admin_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(metrics::serve(
        admin,
        env.metrics.clone(),
        admin_stop.clone(),
    ));

    let (_, tokens) = sign_up(&mut stack.catalog.auth.auth_client().await).await;

    let http = reqwest::Client::new();
    let response = http
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&tokens.access_token)
        .header("x-request-id", "obs-test-order")
        .header("idempotency-key", "obs-1")
        .json(&json!({"deal_id": deal.id, "quantity": 1}))
        .send()
        .await
        .expect("POST /v1/orders");
    assert_eq!(response.status(), StatusCode::OK);
    let order: Value = response.json().await.expect("JSON");
    assert_eq!(order["order"]["state"], "ORDER_STATE_CONFIRMED", "{order}");

    // --- One trace: gateway → order → (client) → catalog, and the consumer linked.
    let spans = receiver
        .wait_for(&env, |spans| {
            let Some(edge) = find(spans, GATEWAY, "POST /v1/orders", SERVER) else {
                return false;
            };
            let in_trace = |s: &&ReceivedSpan| s.trace_id == edge.trace_id;
            let placed = spans.iter().filter(in_trace).any(|s| s.name == PLACE_ORDER);
            let reserved = spans
                .iter()
                .filter(in_trace)
                .any(|s| s.service == CATALOG && s.name == RESERVE_STOCK);
            // Each consumer group exports its span in its own batch: wait
            // for both.
            let consumed: BTreeSet<&str> = spans
                .iter()
                .filter(|s| {
                    s.kind == CONSUMER && s.links.iter().any(|(trace, _)| *trace == edge.trace_id)
                })
                .map(|s| s.name.as_str())
                .collect();
            placed && reserved && consumed.len() == CONSUMER_GROUPS.len()
        })
        .await;
    let edge = find(&spans, GATEWAY, "POST /v1/orders", SERVER).expect("the edge span");
    assert!(edge.parent.is_empty(), "the edge span is the trace's root");
    let trace = |service: &str, name: &str, kind: i32| {
        spans
            .iter()
            .find(|s| {
                s.trace_id == edge.trace_id
                    && s.service == service
                    && s.name == name
                    && s.kind == kind
            })
            .unwrap_or_else(|| {
                panic!("no {service} span {name} (kind {kind}) in the trace: {spans:#?}")
            })
    };
    let placed = trace(ORDER, PLACE_ORDER, SERVER);
    assert_eq!(
        placed.parent, edge.span_id,
        "PlaceOrder is a child of the edge span"
    );
    let call = trace(ORDER, RESERVE_STOCK, CLIENT);
    assert_eq!(
        call.parent, placed.span_id,
        "the catalog call is PlaceOrder's child"
    );
    let reserved = trace(CATALOG, RESERVE_STOCK, SERVER);
    assert_eq!(
        reserved.parent, call.span_id,
        "the catalog's span is the call's child"
    );
    let statements: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.trace_id == edge.trace_id && s.name.starts_with("catalog.") && s.kind == CLIENT
        })
        .collect();
    assert!(
        statements.iter().any(|s| s.parent == reserved.span_id),
        "database statements are children of the catalog's span: {statements:#?}"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.trace_id == edge.trace_id)
            .all(|s| s
                .attributes
                .values()
                .all(|v| !v.contains(&tokens.access_token))),
        "no span carries the token"
    );
    let consumers: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == CONSUMER).collect();
    assert!(!consumers.is_empty());
    for consumer in &consumers {
        assert_eq!(consumer.service, ORDER);
        assert_ne!(
            consumer.trace_id, edge.trace_id,
            "a consumer starts a trace of its own"
        );
        assert_eq!(
            consumer.links,
            vec![(edge.trace_id.clone(), placed.span_id.clone())],
            "{} links to the PlaceOrder span that wrote the event",
            consumer.name
        );
    }
    let groups: BTreeSet<&str> = consumers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(groups, BTreeSet::from(CONSUMER_GROUPS));

    // --- The request counted once, under the right labels, on the admin port.
    let text = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    let scrape = parse(&text);
    assert_eq!(
        value(
            &scrape,
            "flashmesh_http_server_requests_total",
            &[("route", "POST /v1/orders"), ("status", "200")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &scrape,
            "flashmesh_rpc_server_requests_total",
            &[("rpc", PLACE_ORDER), ("code", "OK")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "flashmesh_rpc_server_requests_total",
            &[("rpc", RESERVE_STOCK), ("code", "OK")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "flashmesh_rpc_server_duration_seconds_count",
            &[("rpc", PLACE_ORDER), ("code", "OK")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "flashmesh_rpc_server_in_flight",
            &[("rpc", PLACE_ORDER)]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &scrape,
            "flashmesh_db_pool_connections",
            &[("schema", "order_service"), ("state", "max")]
        ),
        Some(5.0)
    );
    // The services' servers counted what crossed their connections (the
    // gateway's calls, the order service's ReserveStock) and still hold them.
    for direction in ["received", "sent"] {
        let bytes = value(
            &scrape,
            "flashmesh_server_transport_bytes_total",
            &[("direction", direction)],
        );
        assert!(bytes.is_some_and(|b| b > 100.0), "{direction}: {text}");
    }
    let open = value(&scrape, "flashmesh_server_connections_open", &[]);
    let accepted = value(&scrape, "flashmesh_server_connections_accepted_total", &[]);
    assert!(
        open.is_some_and(|n| n >= 2.0) && accepted >= open,
        "{open:?} open, {accepted:?} accepted: {text}"
    );
    if backend == Backend::Postgres {
        // The gate is seeded on its first sight of the deal, then admits.
        assert_eq!(
            value(
                &scrape,
                "flashmesh_stock_gate_decisions_total",
                &[("decision", "admitted")]
            ),
            Some(1.0),
            "{text}"
        );
    }

    // --- The deployment's files name only metrics that exist (with Redis, as
    // deployed: the stock gate exists only there).
    if backend == Backend::Postgres {
        check_deployment_files(&scrape);
    }
    admin_stop.cancel();
}

/// With a 0% ratio nothing is recorded anywhere for a new trace; a caller's
/// sampled `traceparent` is followed by the edge and the service behind it,
/// an unsampled one is not.
async fn sampling_is_decided_once_at_the_root(backend: Backend) {
    let receiver = OtlpReceiver::start().await;
    let mut env = StackEnv::new(backend).await;
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint());
    env.set("OTEL_TRACES_SAMPLER", "parentbased_traceidratio");
    env.set("OTEL_TRACES_SAMPLER_ARG", "0");
    let (_stack, gateway, deal) = gateway_with_open_deal(&mut env).await;
    let http = reqwest::Client::new();
    let get = |traceparent: Option<&'static str>| {
        let mut request = http.get(gateway.url(&format!("/v1/deals/{}", deal.id)));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        async move {
            let response = request.send().await.expect("GET the deal");
            assert_eq!(response.status(), StatusCode::OK);
        }
    };
    get(None).await;
    get(Some(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    ))
    .await;
    env.flush_spans().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.spans().len(),
        0,
        "unsampled requests leave no span"
    );

    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    get(Some(sampled)).await;
    let spans = receiver
        .wait_for(&env, |spans| {
            spans.iter().any(|s| s.service == CATALOG) && spans.iter().any(|s| s.service == GATEWAY)
        })
        .await;
    let edge = find(&spans, GATEWAY, "GET /v1/deals/{id}", SERVER).expect("the edge span");
    assert_eq!(edge.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        edge.parent, "00f067aa0ba902b7",
        "the client's span is the parent"
    );
    let served = find(
        &spans,
        CATALOG,
        "flashmesh.catalog.v1.CatalogService/GetDeal",
        SERVER,
    )
    .expect("the catalog's span");
    assert_eq!(served.parent, edge.span_id);
    assert!(
        spans.iter().all(|s| s.trace_id == edge.trace_id),
        "only the sampled trace is recorded: {spans:#?}"
    );
}

fn find<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    name: &str,
    kind: i32,
) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && s.kind == kind)
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
        .expect("/metrics parses as Prometheus text")
}

/// The sample `metric{labels…}` (other labels ignored), if exactly one matches.
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{metric} {labels:?} matches {matching:?}"
    );
    matching.first().copied()
}

/// Every family `/metrics` declares, and the names its samples may take.
fn known_names(scrape: &prometheus_parse::Scrape) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for family in scrape.docs.keys() {
        names.insert(family.clone());
        for suffix in ["_total", "_bucket", "_sum", "_count", "_created"] {
            names.insert(format!("{family}{suffix}"));
        }
    }
    names.extend(scrape.samples.iter().map(|s| s.metric.clone()));
    names
}

/// `flashmesh_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("flashmesh_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn check_deployment_files(scrape: &prometheus_parse::Scrape) {
    let dir = repo_root().join("deploy/observability");
    let known = known_names(scrape);
    let unknown = |exprs: &[String]| -> Vec<String> {
        exprs
            .iter()
            .flat_map(|e| metric_names(e))
            .filter(|name| !known.contains(name))
            .collect()
    };

    let prometheus: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("prometheus.yml")).expect("prometheus.yml"),
    )
    .expect("prometheus.yml is YAML");
    let jobs: Vec<&str> = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|job| {
            assert!(
                job["static_configs"].is_sequence() || job["dns_sd_configs"].is_sequence(),
                "job {job:?} has targets"
            );
            job["job_name"].as_str().expect("job_name")
        })
        .collect();
    for job in [
        "flashmesh-gateway",
        "flashmesh-auth",
        "flashmesh-catalog",
        "flashmesh-order",
    ] {
        assert!(
            jobs.contains(&job),
            "prometheus.yml scrapes {job}: {jobs:?}"
        );
    }
    let rule_files = prometheus["rule_files"].as_sequence().expect("rule_files");
    assert!(rule_files.iter().any(|f| f.as_str() == Some("alerts.yml")));

    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml"))
            .expect("alerts.yml is YAML");
    let mut rules: HashMap<String, String> = HashMap::new();
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_owned();
            let expr = rule["expr"].as_str().expect("expr").to_owned();
            assert!(
                rule["labels"]["severity"].is_string(),
                "{name} has a severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name} has a summary"
            );
            rules.insert(name, expr);
        }
    }
    for alert in [
        "FlashmeshHighErrorRate",
        "FlashmeshHighLatencyP99",
        "FlashmeshCircuitBreakerOpen",
        "FlashmeshDeadLettersGrowing",
        "FlashmeshOutboxLagging",
        "FlashmeshCacheHitRatioDropped",
        "FlashmeshRateLimitsDegraded",
    ] {
        assert!(rules.contains_key(alert), "alerts.yml has {alert}");
    }
    let exprs: Vec<String> = rules.values().cloned().collect();
    assert_eq!(
        unknown(&exprs),
        Vec::<String>::new(),
        "alerts.yml names unknown metrics"
    );

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("grafana-dashboard.json"))
            .expect("grafana-dashboard.json"),
    )
    .expect("grafana-dashboard.json is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut titles = Vec::new();
    let mut exprs = Vec::new();
    for panel in panels {
        titles.push(panel["title"].as_str().expect("title").to_lowercase());
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for wanted in [
        "latency",
        "throughput",
        "error rate",
        "cache hit ratio",
        "circuit breaker",
        "sse connections",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "a panel on {wanted}: {titles:?}"
        );
    }
    for quantile in ["0.5", "0.95", "0.99"] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains(&format!("histogram_quantile({quantile}"))),
            "the dashboard shows p{quantile}"
        );
    }
    assert_eq!(
        unknown(&exprs),
        Vec::<String>::new(),
        "the dashboard names unknown metrics"
    );
}

/// How long spans may take to arrive.
pub const SPAN_WAIT: Duration = Duration::from_secs(15);

impl OtlpReceiver {
    /// The spans received once `done` says they are all there (flushing the
    /// stack's exporters meanwhile); fails after [`SPAN_WAIT`].
    pub async fn wait_for(
        &self,
        env: &StackEnv,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + SPAN_WAIT;
        loop {
            env.flush_spans().await;
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans missing after {SPAN_WAIT:?}: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
