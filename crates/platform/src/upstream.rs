//! Client channels to a service that may run as several replicas. Each URL
//! is an address, or a DNS name re-resolved every `refresh` (a Kubernetes
//! headless Service, say), and calls are balanced per request over every
//! address found, so new pods get calls and gone ones stop getting them.
//!
//! With `FLASHMESH_TRANSPORT=grpc` a channel is tonic's HTTP/2 balance
//! channel; with `http1-json` it is a [`JsonChannel`] spreading calls round
//! robin over pooled HTTP/1.1 connections to the same addresses. Either way
//! it is a tower service of gRPC requests, so clients do not know which.

use std::{
    collections::HashSet,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, PoisonError, RwLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::{
    Status,
    body::Body,
    transport::{Channel, Endpoint, channel::Change},
};
use tower::util::BoxCloneSyncService;

use crate::{
    config::Transport,
    http1json::{JsonChannel, Targets},
    resend::ResendWhenSafe,
};

/// A client channel of either transport: gRPC requests in, gRPC answers out.
pub type UpstreamChannel = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>;

/// How the channel's connections behave.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Per-call timeout set on every endpoint, if any.
    pub call_timeout: Option<Duration>,
    /// How often DNS names are looked up again.
    pub refresh: Duration,
    /// `FLASHMESH_TRANSPORT`: gRPC or the HTTP/1.1 JSON baseline.
    pub transport: Transport,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid upstream URL {url:?}: {reason}")]
pub struct UpstreamUrlError {
    pub url: String,
    pub reason: String,
}

/// Looks a host name up; the system resolver unless a test swaps it.
pub type Resolver = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (`getaddrinfo` via tokio).
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    })
}

/// One parsed URL: where to connect, and how.
struct Target {
    scheme: String,
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> Result<Self, UpstreamUrlError> {
        let invalid = |reason: &str| UpstreamUrlError {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let scheme = uri
            .scheme_str()
            .filter(|s| matches!(*s, "http" | "https"))
            .ok_or_else(|| invalid("the scheme must be http or https"))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("no host"))?;
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Ok(Self {
            scheme: scheme.to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }

    /// `scheme://host:port`, what paths are appended to.
    fn base(&self) -> String {
        match self.literal() {
            Some(addr) => format!("{}://{addr}", self.scheme),
            None => format!("{}://{}:{}", self.scheme, self.host, self.port),
        }
    }

    fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// A channel over every address its URLs resolve to.
#[derive(Clone)]
pub struct BalancedChannel {
    pub channel: UpstreamChannel,
    endpoints: Arc<AtomicUsize>,
}

impl BalancedChannel {
    /// Addresses calls are balanced over right now; 0 until a name resolves
    /// (calls would wait for one), so callers can fail fast instead.
    pub fn endpoints(&self) -> usize {
        self.endpoints.load(Ordering::Relaxed)
    }
}

/// A channel balancing over every address of `urls`. Literal addresses are
/// fixed; names are resolved before this returns, then again every
/// `settings.refresh` in the background until the channel is dropped.
pub async fn balanced_channel(
    urls: &[String],
    settings: &UpstreamSettings,
    resolver: Resolver,
) -> Result<BalancedChannel, UpstreamUrlError> {
    let targets = urls
        .iter()
        .map(|url| Target::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    let (channel, sink) = match settings.transport {
        Transport::Grpc => {
            let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
            (
                UpstreamChannel::new(ResendWhenSafe::new(channel)),
                Sink::Grpc(changes),
            )
        }
        Transport::Http1Json => {
            let targets = Targets::default();
            (
                json_channel(targets.clone(), settings),
                Sink::Json(Arc::downgrade(&targets)),
            )
        }
    };
    let mut directory = Directory {
        targets,
        resolver,
        settings: settings.clone(),
        sink,
        known: HashSet::new(),
        endpoints: Arc::new(AtomicUsize::new(0)),
    };
    directory.refresh().await;
    let endpoints = directory.endpoints.clone();
    tokio::spawn(directory.run());
    Ok(BalancedChannel { channel, endpoints })
}

/// A channel to the one `url`, connecting on first use; its host name is
/// resolved by the connector, not re-resolved in the background.
pub fn lazy_channel(
    url: &str,
    settings: &UpstreamSettings,
) -> Result<UpstreamChannel, UpstreamUrlError> {
    let target = Target::parse(url)?;
    Ok(match settings.transport {
        Transport::Grpc => {
            let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| UpstreamUrlError {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
            UpstreamChannel::new(ResendWhenSafe::new(
                configure(endpoint, settings).connect_lazy(),
            ))
        }
        Transport::Http1Json => json_channel(Arc::new(RwLock::new(vec![target.base()])), settings),
    })
}

fn json_channel(targets: Targets, settings: &UpstreamSettings) -> UpstreamChannel {
    UpstreamChannel::new(JsonChannel::new(
        targets,
        settings.connect_timeout,
        settings.call_timeout,
    ))
}

/// Where a directory publishes the addresses it found.
enum Sink {
    Grpc(tokio::sync::mpsc::Sender<Change<SocketAddr, Endpoint>>),
    Json(Weak<RwLock<Vec<String>>>),
}

impl Sink {
    fn is_closed(&self) -> bool {
        match self {
            Self::Grpc(changes) => changes.is_closed(),
            Self::Json(targets) => targets.strong_count() == 0,
        }
    }
}

/// Keeps a balanced channel's endpoints in step with what its URLs resolve to.
struct Directory {
    targets: Vec<Target>,
    resolver: Resolver,
    settings: UpstreamSettings,
    sink: Sink,
    known: HashSet<SocketAddr>,
    endpoints: Arc<AtomicUsize>,
}

impl Directory {
    async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.settings.refresh);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if !self.refresh().await {
                return;
            }
        }
    }

    /// Resolves once and applies the difference; `false` once the channel
    /// is gone.
    async fn refresh(&mut self) -> bool {
        if self.sink.is_closed() {
            return false;
        }
        let Some(found) = resolve_all(&self.targets, &self.resolver).await else {
            return true;
        };
        let (added, removed) = diff(&self.known, &found);
        match &self.sink {
            Sink::Grpc(changes) => {
                for addr in removed {
                    self.known.remove(&addr);
                    if changes.send(Change::Remove(addr)).await.is_err() {
                        return false;
                    }
                }
                for (addr, scheme) in added {
                    let Ok(endpoint) = endpoint(scheme, addr, &self.settings) else {
                        continue;
                    };
                    self.known.insert(addr);
                    if changes.send(Change::Insert(addr, endpoint)).await.is_err() {
                        return false;
                    }
                }
            }
            Sink::Json(targets) => {
                let Some(targets) = targets.upgrade() else {
                    return false;
                };
                for addr in removed {
                    self.known.remove(&addr);
                }
                self.known.extend(added.iter().map(|(addr, _)| *addr));
                let mut seen = HashSet::new();
                let bases = found
                    .iter()
                    .filter(|(addr, _)| seen.insert(*addr))
                    .map(|(addr, scheme)| format!("{scheme}://{addr}"))
                    .collect();
                *targets.write().unwrap_or_else(PoisonError::into_inner) = bases;
            }
        }
        self.endpoints.store(self.known.len(), Ordering::Relaxed);
        true
    }
}

/// Every address of every target, with its scheme; `None` when a name did
/// not resolve (the last known addresses then stay in use).
async fn resolve_all(targets: &[Target], resolver: &Resolver) -> Option<Vec<(SocketAddr, String)>> {
    let mut found = Vec::new();
    for target in targets {
        let addrs = match target.literal() {
            Some(addr) => vec![addr],
            None => match resolver(target.host.clone(), target.port).await {
                Ok(addrs) if !addrs.is_empty() => addrs,
                Ok(_) => {
                    tracing::warn!(host = %target.host, "upstream name resolved to nothing");
                    return None;
                }
                Err(error) => {
                    tracing::warn!(host = %target.host, %error, "cannot resolve an upstream");
                    return None;
                }
            },
        };
        found.extend(addrs.into_iter().map(|a| (a, target.scheme.clone())));
    }
    Some(found)
}

/// What to add to and remove from `known` to reach `found`.
fn diff<'a>(
    known: &HashSet<SocketAddr>,
    found: &'a [(SocketAddr, String)],
) -> (Vec<(SocketAddr, &'a str)>, Vec<SocketAddr>) {
    let wanted: HashSet<SocketAddr> = found.iter().map(|(addr, _)| *addr).collect();
    let mut seen = HashSet::new();
    let added = found
        .iter()
        .filter(|(addr, _)| !known.contains(addr) && seen.insert(*addr))
        .map(|(addr, scheme)| (*addr, scheme.as_str()))
        .collect();
    let removed = known
        .iter()
        .filter(|addr| !wanted.contains(addr))
        .copied()
        .collect();
    (added, removed)
}

fn endpoint(
    scheme: &str,
    addr: SocketAddr,
    settings: &UpstreamSettings,
) -> Result<Endpoint, tonic::transport::Error> {
    Ok(configure(
        Endpoint::from_shared(format!("{scheme}://{addr}"))?,
        settings,
    ))
}

fn configure(endpoint: Endpoint, settings: &UpstreamSettings) -> Endpoint {
    let endpoint = endpoint
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    match settings.call_timeout {
        Some(timeout) => endpoint.timeout(timeout),
        None => endpoint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn urls_parse_with_default_ports_or_are_refused() {
        let t = Target::parse("http://catalog.flashmesh.svc:50052").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.literal()),
            ("catalog.flashmesh.svc", 50052, None)
        );
        let t = Target::parse("https://[::1]").unwrap();
        assert_eq!(t.literal(), Some(addr("[::1]:443")));
        let t = Target::parse("http://10.0.0.7").unwrap();
        assert_eq!(t.literal(), Some(addr("10.0.0.7:80")));
        for bad in ["catalog:50052", "ftp://catalog:1", "http://", "not a url"] {
            let err = Target::parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert_eq!(err.url, bad);
        }
    }

    use std::sync::Mutex;
    use tonic_health::{
        ServingStatus,
        pb::{HealthCheckRequest, health_check_response, health_client::HealthClient},
    };

    /// A gRPC server whose health answer for `probe` tells which one it is.
    async fn replica(status: ServingStatus) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("probe", status).await;
        tokio::spawn(async move {
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
        });
        addr
    }

    /// How many of `n` calls reached the SERVING replica and the other one.
    async fn spread(channel: &UpstreamChannel, n: usize) -> (usize, usize) {
        let mut client = HealthClient::new(channel.clone());
        let mut counts = (0, 0);
        for _ in 0..n {
            let answer = client
                .check(HealthCheckRequest {
                    service: "probe".to_owned(),
                })
                .await
                .expect("a replica answers");
            if answer.into_inner().status() == health_check_response::ServingStatus::Serving {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
        counts
    }

    #[tokio::test]
    async fn a_name_is_resolved_again_and_calls_follow_its_addresses() {
        let first = replica(ServingStatus::Serving).await;
        let second = replica(ServingStatus::NotServing).await;
        let answer = Arc::new(Mutex::new(vec![first]));
        let resolver: Resolver = {
            let answer = answer.clone();
            Arc::new(move |host, port| {
                assert_eq!((host.as_str(), port), ("catalog.test", 50052));
                let addrs = answer.lock().unwrap().clone();
                Box::pin(async move { Ok(addrs) })
            })
        };
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(1),
            call_timeout: Some(Duration::from_secs(5)),
            refresh: Duration::from_millis(50),
            transport: Transport::Grpc,
        };
        let balanced = balanced_channel(
            &["http://catalog.test:50052".to_owned()],
            &settings,
            resolver,
        )
        .await
        .unwrap();
        assert_eq!(balanced.endpoints(), 1);
        assert_eq!(spread(&balanced.channel, 20).await, (20, 0));

        // The name moves to the other replica: calls follow once it is seen.
        *answer.lock().unwrap() = vec![second];
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(spread(&balanced.channel, 20).await, (0, 20));

        // Both: calls are spread over both.
        *answer.lock().unwrap() = vec![first, second];
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(balanced.endpoints(), 2);
        let (a, b) = spread(&balanced.channel, 200).await;
        assert!(a > 20 && b > 20, "{a} / {b}");

        // A failed lookup keeps the last addresses.
        *answer.lock().unwrap() = vec![];
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(balanced.endpoints(), 2);
    }

    #[tokio::test]
    async fn a_name_that_never_resolves_leaves_no_endpoints() {
        let resolver: Resolver =
            Arc::new(|_, _| Box::pin(async { Err(io::Error::other("no such host")) }));
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(1),
            call_timeout: None,
            refresh: Duration::from_secs(60),
            transport: Transport::Grpc,
        };
        let balanced = balanced_channel(&["http://nowhere.test".to_owned()], &settings, resolver)
            .await
            .unwrap();
        assert_eq!(balanced.endpoints(), 0);
    }

    #[test]
    fn diff_adds_new_addresses_once_and_removes_gone_ones() {
        let known: HashSet<SocketAddr> = [addr("10.0.0.1:1"), addr("10.0.0.2:1")].into();
        let found = vec![
            (addr("10.0.0.2:1"), "http".to_owned()),
            (addr("10.0.0.3:1"), "http".to_owned()),
            (addr("10.0.0.3:1"), "http".to_owned()),
        ];
        let (added, removed) = diff(&known, &found);
        assert_eq!(added, vec![(addr("10.0.0.3:1"), "http")]);
        assert_eq!(removed, vec![addr("10.0.0.1:1")]);
        let (added, removed) = diff(&HashSet::new(), &[]);
        assert!(added.is_empty() && removed.is_empty());
    }
}
