//! The gateway's configuration, read once at start-up.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use flashmesh_platform::config::{ConfigError, Env, listen_addr};

use crate::rate_limit::Quota;

/// RPCs callable without a token (full method names). Everything else needs
/// a valid access token at the edge; admin checks stay in the services.
pub const DEFAULT_PUBLIC_RPCS: &[&str] = &[
    "flashmesh.auth.v1.AuthService/SignUp",
    "flashmesh.auth.v1.AuthService/Login",
    "flashmesh.auth.v1.AuthService/Refresh",
    "flashmesh.auth.v1.AuthService/GetJwks",
    "flashmesh.catalog.v1.CatalogService/GetProduct",
    "flashmesh.catalog.v1.CatalogService/ListProducts",
    "flashmesh.catalog.v1.CatalogService/GetDeal",
    "flashmesh.catalog.v1.CatalogService/ListDeals",
    "flashmesh.catalog.v1.CatalogService/WatchDeal",
];

/// Where each service answers: one or more addresses, balanced per call.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Full gRPC service name, e.g. `flashmesh.auth.v1.AuthService`.
    pub service: String,
    pub urls: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `FLASHMESH_GATEWAY_ADDR`
    pub listen_addr: SocketAddr,
    pub upstreams: Vec<Upstream>,
    /// `FLASHMESH_GATEWAY_REFLECTION_URLS`: upstreams whose contracts are
    /// fetched through server reflection at start-up; their annotated RPCs
    /// are routed like the compiled-in ones.
    pub reflection_urls: Vec<String>,
    /// `FLASHMESH_GATEWAY_TIMEOUT`: deadline of an upstream call unless the
    /// client asks for less (`grpc-timeout` or `X-Request-Timeout`, ms).
    pub default_timeout: Duration,
    /// `FLASHMESH_GATEWAY_MAX_TIMEOUT`: the most a client may ask for.
    pub max_timeout: Duration,
    /// `FLASHMESH_GATEWAY_BODY_LIMIT`: largest request body, bytes.
    pub body_limit: usize,
    /// `FLASHMESH_GATEWAY_PUBLIC_RPCS`: comma-separated full method names
    /// served without a token.
    pub public_rpcs: Vec<String>,
    /// `FLASHMESH_UPSTREAM_MAX_OUTSTANDING`: calls in flight per upstream;
    /// beyond it the gateway answers 503 at once.
    pub max_outstanding: usize,
    /// `FLASHMESH_RATE_LIMIT_IP`: per client IP, `RATE/s` or `RATE/s:BURST`.
    pub ip_quota: Quota,
    /// `FLASHMESH_RATE_LIMIT_USER`: per authenticated user.
    pub user_quota: Quota,
    /// `FLASHMESH_RATE_LIMIT_ROUTES`: `Service/Method=RATE/s[:BURST]`, comma
    /// separated; each caller (user, else IP) gets its own bucket per RPC.
    pub route_quotas: HashMap<String, Quota>,
    /// `FLASHMESH_CORS_ORIGINS`: comma-separated allowed origins, `*` for
    /// any; unset means no CORS headers.
    pub cors_origins: Vec<String>,
    /// `FLASHMESH_SSE_HEARTBEAT`: comment lines that keep idle event
    /// streams open through proxies.
    pub sse_heartbeat: Duration,
    /// `FLASHMESH_GATEWAY_TRUSTED_PROXIES`: addresses or CIDRs of the proxies
    /// (an ingress controller) whose `X-Forwarded-For` names the client for
    /// per-IP limits; empty means the connection's own address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `FLASHMESH_GATEWAY_PUBLIC_METRICS`: also answer `GET /metrics` on the
    /// public listener. Off by default: metrics are served on the admin
    /// address (`FLASHMESH_METRICS_ADDR`), not to the internet.
    pub public_metrics: bool,
}

pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

fn urls(env: &Env, var: &str, default: &str) -> Vec<String> {
    env.raw(var)
        .unwrap_or(default)
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn quota(env: &Env, var: &str, default: Quota) -> Result<Quota, ConfigError> {
    env.raw(var)
        .map_or(Ok(default), |raw| parse_quota(var, raw))
}

fn parse_quota(var: &str, raw: &str) -> Result<Quota, ConfigError> {
    let invalid = || ConfigError {
        var: var.to_owned(),
        value: raw.to_owned(),
        reason: "expected RATE/s or RATE/s:BURST with positive integers, e.g. 20/s:40".to_owned(),
    };
    let (rate, burst) = raw
        .trim()
        .split_once(':')
        .map_or((raw.trim(), None), |(r, b)| (r, Some(b)));
    let per_second: u32 = rate
        .strip_suffix("/s")
        .and_then(|r| r.trim().parse().ok())
        .filter(|r| *r > 0)
        .ok_or_else(invalid)?;
    let burst = match burst {
        Some(b) => b
            .trim()
            .parse()
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(invalid)?,
        None => per_second,
    };
    Ok(Quota { per_second, burst })
}

/// `package.Service/Method=RATE/s[:BURST],…`
fn route_quotas(env: &Env, var: &str) -> Result<HashMap<String, Quota>, ConfigError> {
    let Some(raw) = env.raw(var) else {
        return Ok(HashMap::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (rpc, quota) = entry
                .split_once('=')
                .filter(|(rpc, _)| rpc.contains('/'))
                .ok_or_else(|| ConfigError {
                    var: var.to_owned(),
                    value: raw.to_owned(),
                    reason: format!("{entry:?} is not `package.Service/Method=RATE/s[:BURST]`"),
                })?;
            Ok((rpc.trim().to_owned(), parse_quota(var, quota)?))
        })
        .collect()
}

fn trusted_proxies(env: &Env, var: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let raw = env.raw(var).unwrap_or_default();
    crate::client_ip::parse_networks(raw).map_err(|reason| ConfigError {
        var: var.to_owned(),
        value: raw.to_owned(),
        reason,
    })
}

impl GatewayConfig {
    /// `auth_url` is the platform's `FLASHMESH_AUTH_URL`.
    pub fn from_env(env: &Env, auth_url: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            listen_addr: listen_addr(env, "FLASHMESH_GATEWAY_ADDR", DEFAULT_ADDR)?,
            upstreams: vec![
                Upstream {
                    service: "flashmesh.auth.v1.AuthService".to_owned(),
                    urls: urls(env, "FLASHMESH_AUTH_URL", auth_url),
                },
                Upstream {
                    service: "flashmesh.catalog.v1.CatalogService".to_owned(),
                    urls: urls(env, "FLASHMESH_CATALOG_URL", "http://127.0.0.1:50052"),
                },
                Upstream {
                    service: "flashmesh.order.v1.OrderService".to_owned(),
                    urls: urls(env, "FLASHMESH_ORDER_URL", "http://127.0.0.1:50053"),
                },
            ],
            reflection_urls: urls(env, "FLASHMESH_GATEWAY_REFLECTION_URLS", ""),
            default_timeout: env
                .duration_or("FLASHMESH_GATEWAY_TIMEOUT", Duration::from_secs(10))?,
            max_timeout: env
                .duration_or("FLASHMESH_GATEWAY_MAX_TIMEOUT", Duration::from_secs(30))?,
            body_limit: env.ranged_or(
                "FLASHMESH_GATEWAY_BODY_LIMIT",
                64 * 1024,
                1024..=16 << 20,
            )?,
            public_rpcs: env.raw("FLASHMESH_GATEWAY_PUBLIC_RPCS").map_or_else(
                || {
                    DEFAULT_PUBLIC_RPCS
                        .iter()
                        .map(|s| (*s).to_owned())
                        .collect()
                },
                |raw| {
                    raw.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                },
            ),
            max_outstanding: env.ranged_or(
                "FLASHMESH_UPSTREAM_MAX_OUTSTANDING",
                1024,
                1..=1_000_000,
            )?,
            ip_quota: quota(
                env,
                "FLASHMESH_RATE_LIMIT_IP",
                Quota {
                    per_second: 200,
                    burst: 400,
                },
            )?,
            user_quota: quota(
                env,
                "FLASHMESH_RATE_LIMIT_USER",
                Quota {
                    per_second: 50,
                    burst: 100,
                },
            )?,
            route_quotas: route_quotas(env, "FLASHMESH_RATE_LIMIT_ROUTES")?,
            cors_origins: urls(env, "FLASHMESH_CORS_ORIGINS", ""),
            sse_heartbeat: env.period_or("FLASHMESH_SSE_HEARTBEAT", Duration::from_secs(15))?,
            trusted_proxies: trusted_proxies(env, "FLASHMESH_GATEWAY_TRUSTED_PROXIES")?,
            public_metrics: env.parse_or("FLASHMESH_GATEWAY_PUBLIC_METRICS", false)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_parse_or_name_their_variable() {
        let env = Env::from_pairs([("FLASHMESH_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8,fd00::1")]);
        let config = GatewayConfig::from_env(&env, "http://127.0.0.1:50051").unwrap();
        assert_eq!(config.trusted_proxies.len(), 2);
        let env = Env::from_pairs([("FLASHMESH_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/40")]);
        let err = GatewayConfig::from_env(&env, "http://127.0.0.1:50051").unwrap_err();
        assert_eq!(err.var, "FLASHMESH_GATEWAY_TRUSTED_PROXIES");
        let config = GatewayConfig::from_env(&Env::default(), "http://127.0.0.1:50051").unwrap();
        assert!(config.trusted_proxies.is_empty());
    }

    #[test]
    fn quotas_parse_or_name_their_variable() {
        let env = Env::from_pairs([
            ("FLASHMESH_RATE_LIMIT_IP", "20/s:40"),
            ("FLASHMESH_RATE_LIMIT_USER", "5/s"),
        ]);
        let config = GatewayConfig::from_env(&env, "http://127.0.0.1:50051").unwrap();
        assert_eq!(
            config.ip_quota,
            Quota {
                per_second: 20,
                burst: 40
            }
        );
        assert_eq!(
            config.user_quota,
            Quota {
                per_second: 5,
                burst: 5
            }
        );
        let env = Env::from_pairs([(
            "FLASHMESH_RATE_LIMIT_ROUTES",
            "flashmesh.order.v1.OrderService/PlaceOrder=2/s:4, flashmesh.auth.v1.AuthService/SignUp=1/s",
        )]);
        let config = GatewayConfig::from_env(&env, "http://127.0.0.1:50051").unwrap();
        assert_eq!(
            config.route_quotas["flashmesh.order.v1.OrderService/PlaceOrder"],
            Quota::new(2, 4)
        );
        assert_eq!(
            config.route_quotas["flashmesh.auth.v1.AuthService/SignUp"],
            Quota::new(1, 1)
        );
        for bad in [
            "PlaceOrder=2/s",
            "flashmesh.order.v1.OrderService/PlaceOrder",
        ] {
            let env = Env::from_pairs([("FLASHMESH_RATE_LIMIT_ROUTES", bad)]);
            let err = GatewayConfig::from_env(&env, "http://127.0.0.1:50051").unwrap_err();
            assert_eq!(err.var, "FLASHMESH_RATE_LIMIT_ROUTES", "{bad}");
        }
        for bad in ["20", "0/s", "20/s:0", "fast"] {
            let env = Env::from_pairs([("FLASHMESH_RATE_LIMIT_IP", bad)]);
            let err = GatewayConfig::from_env(&env, "http://127.0.0.1:50051").unwrap_err();
            assert_eq!(err.var, "FLASHMESH_RATE_LIMIT_IP", "{bad}");
        }
    }
}
