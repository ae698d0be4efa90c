//! Metrics: a Prometheus registry per app (one per process under
//! `flashmesh up`), served as text on the admin address
//! (`FLASHMESH_METRICS_ADDR`, `/metrics`).
//!
//! A metric family is registered once per registry by name, whoever asks
//! first ([`Metrics::family`]); components resolve their label sets into
//! handles when they are built, so a request increments atomics and never
//! hashes a label string.

use std::{
    any::Any,
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::{Metric, Registry},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Env};

/// Label sets are small arrays of `(name, value)`.
pub type Labels<const N: usize> = [(&'static str, String); N];

/// Latency buckets, in seconds: 250 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Makes latency histograms for a [`Family`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }
}

pub type CounterFamily<const N: usize> = Family<Labels<N>, Counter>;
pub type GaugeFamily<const N: usize> = Family<Labels<N>, Gauge>;
pub type LatencyFamily<const N: usize> = Family<Labels<N>, Histogram, LatencyHistogram>;

type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// A registry and what refreshes its gauges at scrape time. Cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    registry: Mutex<Registry>,
    families: Mutex<HashMap<&'static str, Box<dyn Any + Send + Sync>>>,
    hooks: Mutex<Vec<ScrapeHook>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// The family `name`, registered with `help` by the first caller; later
    /// callers (another service in the process, another cache) share it.
    ///
    /// # Panics
    /// If `name` was registered with another type: a programming error.
    pub fn family<M>(&self, name: &'static str, help: &str, make: impl FnOnce() -> M) -> M
    where
        M: Metric + Clone + Send + Sync,
    {
        let mut families = lock(&self.inner.families);
        if let Some(existing) = families.get(name) {
            return existing
                .downcast_ref::<M>()
                .unwrap_or_else(|| panic!("metric {name} registered twice with different types"))
                .clone();
        }
        let metric = make();
        lock(&self.inner.registry).register(name, help, metric.clone());
        families.insert(name, Box::new(metric.clone()));
        metric
    }

    pub fn counter_family<const N: usize>(
        &self,
        name: &'static str,
        help: &str,
    ) -> CounterFamily<N> {
        self.family(name, help, Family::default)
    }

    pub fn gauge_family<const N: usize>(&self, name: &'static str, help: &str) -> GaugeFamily<N> {
        self.family(name, help, Family::default)
    }

    pub fn latency_family<const N: usize>(
        &self,
        name: &'static str,
        help: &str,
    ) -> LatencyFamily<N> {
        self.family(name, help, || {
            Family::new_with_constructor(LatencyHistogram)
        })
    }

    /// Runs `hook` before every scrape (gauges read from elsewhere, such as
    /// a pool's size).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        lock(&self.inner.hooks).push(Box::new(hook));
    }

    /// The registry as Prometheus (OpenMetrics) text.
    pub fn render(&self) -> String {
        for hook in lock(&self.inner.hooks).iter() {
            hook();
        }
        let mut text = String::new();
        if let Err(error) = encode(&mut text, &lock(&self.inner.registry)) {
            tracing::error!(%error, "cannot encode the metrics");
        }
        text
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `FLASHMESH_METRICS_ADDR`: the admin listener serving `/metrics`.
pub fn metrics_addr(env: &Env) -> Result<SocketAddr, ConfigError> {
    env.parse_or(
        "FLASHMESH_METRICS_ADDR",
        SocketAddr::from(([127, 0, 0, 1], 9464)),
    )
}

/// Serves `metrics` as `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Requests, latency and in-flight count of one route or RPC, resolved
/// once; [`RouteMetrics::finish`] picks the handles of an outcome without
/// hashing or allocating after the first time it is seen.
pub struct RouteMetrics {
    label: String,
    requests: CounterFamily<2>,
    latency: LatencyFamily<2>,
    pub in_flight: Gauge,
    by_outcome: Box<[OnceLock<(Counter, Histogram)>]>,
    outcome_name: fn(usize) -> String,
    route_label: &'static str,
    outcome_label: &'static str,
}

/// The families one kind of request (gRPC calls, HTTP routes) is counted in.
#[derive(Clone)]
pub struct RequestFamilies {
    requests: CounterFamily<2>,
    latency: LatencyFamily<2>,
    in_flight: GaugeFamily<1>,
    route_label: &'static str,
    outcome_label: &'static str,
    outcomes: usize,
    outcome_name: fn(usize) -> String,
}

impl RequestFamilies {
    /// `<prefix>_requests_total`, `<prefix>_duration_seconds` and
    /// `<prefix>_in_flight`, labelled `route_label` and (but for in-flight)
    /// `outcome_label`, whose value for outcome `i` (below `outcomes`) is
    /// `outcome_name(i)`.
    pub fn new(
        metrics: &Metrics,
        names: [&'static str; 3],
        (route_label, outcome_label): (&'static str, &'static str),
        outcomes: usize,
        outcome_name: fn(usize) -> String,
    ) -> Self {
        let [requests, latency, in_flight] = names;
        Self {
            requests: metrics.counter_family(requests, "Requests handled, by outcome"),
            latency: metrics.latency_family(latency, "Time to answer, by outcome"),
            in_flight: metrics.gauge_family(in_flight, "Requests being handled"),
            route_label,
            outcome_label,
            outcomes,
            outcome_name,
        }
    }

    pub fn route(&self, label: &str) -> RouteMetrics {
        RouteMetrics {
            label: label.to_owned(),
            requests: self.requests.clone(),
            latency: self.latency.clone(),
            in_flight: self
                .in_flight
                .get_or_create(&[(self.route_label, label.to_owned())])
                .clone(),
            by_outcome: (0..self.outcomes).map(|_| OnceLock::new()).collect(),
            outcome_name: self.outcome_name,
            route_label: self.route_label,
            outcome_label: self.outcome_label,
        }
    }
}

impl RouteMetrics {
    /// Counts one request with outcome `outcome` (out of range counts as the
    /// last) that took `elapsed`.
    pub fn finish(&self, outcome: usize, elapsed: Duration) {
        let index = outcome.min(self.by_outcome.len().saturating_sub(1));
        let (requests, latency) = self.by_outcome[index].get_or_init(|| {
            let labels = [
                (self.route_label, self.label.clone()),
                (self.outcome_label, (self.outcome_name)(index)),
            ];
            (
                self.requests.get_or_create(&labels).clone(),
                self.latency.get_or_create(&labels).clone(),
            )
        });
        requests.inc();
        latency.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_registered_once_and_shared() {
        let metrics = Metrics::default();
        let first = metrics.counter_family::<1>("flashmesh_test_things", "Things");
        let second = metrics.counter_family::<1>("flashmesh_test_things", "Things again");
        first.get_or_create(&[("kind", "a".to_owned())]).inc();
        second.get_or_create(&[("kind", "a".to_owned())]).inc();
        let text = metrics.render();
        assert_eq!(
            text.matches("# HELP flashmesh_test_things ").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("flashmesh_test_things_total{kind=\"a\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn route_metrics_count_by_outcome() {
        let metrics = Metrics::default();
        let families = RequestFamilies::new(
            &metrics,
            [
                "flashmesh_test_requests",
                "flashmesh_test_seconds",
                "flashmesh_test_in_flight",
            ],
            ("route", "status"),
            600,
            |status| status.to_string(),
        );
        let route = families.route("GET /x");
        route.in_flight.inc();
        route.finish(200, Duration::from_millis(3));
        route.finish(200, Duration::from_millis(3));
        route.finish(503, Duration::from_secs(20));
        route.in_flight.dec();
        let text = metrics.render();
        assert!(
            text.contains(r#"flashmesh_test_requests_total{route="GET /x",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"flashmesh_test_requests_total{route="GET /x",status="503"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"flashmesh_test_seconds_bucket{le="0.005",route="GET /x",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"flashmesh_test_in_flight{route="GET /x"} 0"#),
            "{text}"
        );
    }
}
