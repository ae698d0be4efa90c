//! What a stack's processes have used so far: CPU time from /proc, and each
//! service's server connections from its `/metrics`
//! (`flashmesh_server_transport_bytes_total`,
//! `flashmesh_server_connections_open`,
//! `flashmesh_server_connections_accepted_total`).

use anyhow::Context;

use crate::{procfs, stack::Stack};

/// One service's server connections, as its counters stand.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wire {
    pub received: f64,
    pub sent: f64,
    pub open: f64,
    pub accepted: f64,
}

impl Wire {
    pub fn bytes(&self) -> f64 {
        self.received + self.sent
    }

    /// Sums over services (open connections at the same moment).
    pub fn sum<'a>(wires: impl IntoIterator<Item = &'a Self>) -> Self {
        wires.into_iter().fold(Self::default(), |total, w| Self {
            received: total.received + w.received,
            sent: total.sent + w.sent,
            open: total.open + w.open,
            accepted: total.accepted + w.accepted,
        })
    }
}

/// CPU ticks of every process of a stack and the wire counters of every
/// service (not the gateway, whose public port is not between services),
/// in the order of `Stack::processes`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub cpu_ticks: Vec<u64>,
    pub wire: Vec<Wire>,
}

impl Snapshot {
    pub async fn take(stack: &Stack, client: &reqwest::Client) -> anyhow::Result<Self> {
        let mut cpu_ticks = Vec::with_capacity(stack.processes.len());
        let mut wire = Vec::with_capacity(stack.processes.len());
        for process in &stack.processes {
            cpu_ticks.push(process.child.id().map_or(0, procfs::process_cpu_ticks));
            wire.push(if is_service(process.name) {
                read_wire(client, &process.metrics_addr)
                    .await
                    .with_context(|| format!("the {} service's metrics", process.name))?
            } else {
                Wire::default()
            });
        }
        Ok(Self { cpu_ticks, wire })
    }

    /// The services' connections open now, summed.
    pub async fn open_connections(stack: &Stack, client: &reqwest::Client) -> anyhow::Result<f64> {
        let mut open = 0.0;
        for process in stack.processes.iter().filter(|p| is_service(p.name)) {
            open += read_wire(client, &process.metrics_addr).await?.open;
        }
        Ok(open)
    }

    /// What each process did between `self` and `later`: CPU ticks, and
    /// the wire counters' growth (open connections as `later` saw them).
    pub fn until(&self, later: &Self) -> Self {
        Self {
            cpu_ticks: self
                .cpu_ticks
                .iter()
                .zip(&later.cpu_ticks)
                .map(|(before, after)| after.saturating_sub(*before))
                .collect(),
            wire: self
                .wire
                .iter()
                .zip(&later.wire)
                .map(|(before, after)| Wire {
                    received: after.received - before.received,
                    sent: after.sent - before.sent,
                    open: after.open,
                    accepted: after.accepted - before.accepted,
                })
                .collect(),
        }
    }
}

/// The processes whose servers are between services: not the gateway.
fn is_service(name: &str) -> bool {
    matches!(name, "auth" | "catalog" | "order" | "up")
}

async fn read_wire(client: &reqwest::Client, metrics_addr: &str) -> anyhow::Result<Wire> {
    let text = client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
        .context("/metrics is not Prometheus text")?;
    let value = |metric: &str, direction: Option<&str>| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| direction.is_none_or(|d| s.labels.get("direction") == Some(d)))
            .find_map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .unwrap_or(0.0)
    };
    let bytes = "flashmesh_server_transport_bytes_total";
    Ok(Wire {
        received: value(bytes, Some("received")),
        sent: value(bytes, Some("sent")),
        open: value("flashmesh_server_connections_open", None),
        accepted: value("flashmesh_server_connections_accepted_total", None),
    })
}
