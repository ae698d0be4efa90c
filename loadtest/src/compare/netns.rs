//! `--latency`: the gateway (and k6) in a network namespace of their own,
//! joined to the host by a veth pair with `tc netem` delaying each end by
//! half the round trip. The services stay on the host and listen on the
//! host's end of the pair, so every gateway → service call crosses the
//! delayed link (the order service's calls to the catalog stay on the
//! host). The gateway cannot reach the host's loopback from there, so its
//! rate limits stay in-process in these runs.
//!
//! Needs root, iproute2 and a kernel with netem (`CONFIG_NET_SCH_NETEM`);
//! [`DelayedLink::create`] fails with the reason otherwise, and the caller
//! skips these runs. The namespace and the pair are removed by
//! [`DelayedLink::remove`], or when the link is dropped (an error, Ctrl-C).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::stack::Placement;

pub struct DelayedLink {
    namespace: String,
    host_end: String,
    host_ip: Ipv4Addr,
    namespace_ip: Ipv4Addr,
    removed: bool,
}

impl DelayedLink {
    /// The namespace, the pair and the delays; `rtt` zero adds no delay
    /// (the same layout, for a control run).
    pub async fn create(rtt: Duration) -> anyhow::Result<Self> {
        let id = std::process::id();
        // Interface names are at most 15 bytes; a subnet per process.
        let subnet = 1 + id % 250;
        let link = Self {
            namespace: format!("flashmesh-compare-{id}"),
            host_end: format!("fmc{id}h"),
            host_ip: Ipv4Addr::new(10, 213, u8::try_from(subnet)?, 1),
            namespace_ip: Ipv4Addr::new(10, 213, u8::try_from(subnet)?, 2),
            removed: false,
        };
        let inner_end = format!("fmc{id}n");
        let (ns, host, inner) = (link.namespace.as_str(), link.host_end.as_str(), &inner_end);
        let (host_cidr, inner_cidr) = (
            format!("{}/24", link.host_ip),
            format!("{}/24", link.namespace_ip),
        );
        let exec = ["ip", "netns", "exec", ns];
        ip(&["ip", "netns", "add", ns]).await?;
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "ip", "link", "add", host, "type", "veth", "peer", "name", inner,
            ],
            vec!["ip", "link", "set", inner, "netns", ns],
            vec!["ip", "addr", "add", &host_cidr, "dev", host],
            vec!["ip", "link", "set", host, "up"],
            [&exec[..], &["ip", "addr", "add", &inner_cidr, "dev", inner]].concat(),
            [&exec[..], &["ip", "link", "set", inner, "up"]].concat(),
            [&exec[..], &["ip", "link", "set", "lo", "up"]].concat(),
        ];
        for step in &steps {
            ip(step).await?;
        }
        if !rtt.is_zero() {
            let half = format!("{}us", rtt.as_micros() / 2);
            ip(&netem_delay(host, &half))
                .await
                .context("tc netem is not available (a kernel without CONFIG_NET_SCH_NETEM?)")?;
            ip(&[&exec[..], &netem_delay(inner, &half)[..]].concat()).await?;
        }
        Ok(link)
    }

    /// Services on the host's end, the gateway inside the namespace.
    pub fn placement(&self) -> Placement {
        Placement {
            services_ip: IpAddr::V4(self.host_ip),
            gateway_ip: IpAddr::V4(self.namespace_ip),
            gateway_prefix: ["ip", "netns", "exec", &self.namespace]
                .map(str::to_owned)
                .to_vec(),
            gateway_redis: false,
        }
    }

    /// The round trip across the link, in ms: the median time for a TCP
    /// connection to a closed port in the namespace to be refused (one
    /// SYN out, one RST back).
    pub async fn measure_rtt_ms(&self) -> anyhow::Result<f64> {
        let target = SocketAddr::new(IpAddr::V4(self.namespace_ip), 9);
        let mut samples = Vec::with_capacity(9);
        for _ in 0..9 {
            let started = Instant::now();
            match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(target),
            )
            .await
            {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    samples.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                other => bail!("probing {target} across the link: {other:?}"),
            }
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    }

    /// Deletes the namespace (and with it the pair).
    pub async fn remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        ip(&["ip", "netns", "del", &self.namespace]).await
    }
}

impl Drop for DelayedLink {
    fn drop(&mut self) {
        if !self.removed {
            // Best effort on the way out of an error or an interruption.
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.namespace])
                .status();
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.host_end])
                .status();
        }
    }
}

/// `tc` delaying every packet leaving `dev` by `delay`.
fn netem_delay<'a>(dev: &'a str, delay: &'a str) -> [&'a str; 9] {
    [
        "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", delay,
    ]
}

/// Runs `argv` (`ip …`, `tc …`); fails with its stderr.
async fn ip(argv: &[&str]) -> anyhow::Result<()> {
    let (program, args) = argv.split_first().context("an empty command")?;
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program} (iproute2)"))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
