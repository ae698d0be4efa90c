//! Typed configuration, read once at start-up from environment variables.
//!
//! Every reader goes through [`Env`], so a bad value fails start-up with an
//! error that names the variable, and tests can build configuration from a
//! plain map instead of mutating the process environment.

use crate::{identity::TokenPolicy, telemetry::TelemetryConfig};
use std::{
    collections::HashMap, fmt::Display, net::SocketAddr, path::PathBuf, str::FromStr,
    time::Duration,
};

/// A configuration variable that is set but unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

/// Where configuration values come from.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }

    /// Explicit values, for tests and embedding.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// Sets one value, replacing any earlier one.
    pub fn set(&mut self, var: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(var.into(), value.into());
    }

    /// Every variable, e.g. to hand to a child process.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The raw value; empty counts as unset.
    pub fn raw(&self, var: &str) -> Option<&str> {
        self.vars
            .get(var)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// A value parsed with `FromStr`, or `None` when unset.
    pub fn optional<T>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.raw(var)
            .map(|raw| {
                raw.trim().parse().map_err(|e: T::Err| ConfigError {
                    var: var.to_owned(),
                    value: raw.to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// A value parsed with `FromStr`, or `default` when unset.
    pub fn parse_or<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.optional(var)?.unwrap_or(default))
    }

    /// A duration in humantime syntax (`15m`, `500ms`, `30d`), or `default`.
    pub fn duration_or(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        Ok(self
            .optional::<humantime::Duration>(var)?
            .map_or(default, Into::into))
    }

    /// Like [`Env::duration_or`], but zero is refused (periods of timers).
    pub fn period_or(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        let period = self.duration_or(var, default)?;
        if period.is_zero() {
            return Err(ConfigError {
                var: var.to_owned(),
                value: self.raw(var).unwrap_or_default().to_owned(),
                reason: "must be longer than zero".to_owned(),
            });
        }
        Ok(period)
    }

    /// A number that must lie in `range`, or `default` when unset.
    pub fn ranged_or<T>(
        &self,
        var: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display + Copy,
        T::Err: Display,
    {
        let value = self.parse_or(var, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError {
                var: var.to_owned(),
                value: value.to_string(),
                reason: format!("must be between {} and {}", range.start(), range.end()),
            })
        }
    }
}

/// How services serve their RPCs and how clients inside the stack call
/// them (`FLASHMESH_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// gRPC over HTTP/2: one multiplexed connection per replica.
    #[default]
    Grpc,
    /// The baseline: the same RPCs as proto3 JSON over plain HTTP/1.1, with
    /// pooled keep-alive connections (see [`crate::http1json`]).
    Http1Json,
}

impl Transport {
    /// The value of `FLASHMESH_TRANSPORT` that selects it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http1Json => "http1-json",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Grpc, Self::Http1Json]
            .into_iter()
            .find(|transport| transport.as_str() == s)
            .ok_or_else(|| "expected grpc or http1-json".to_owned())
    }
}

/// Settings every service shares.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// `DATABASE_URL`: PostgreSQL; unset means SQLite files under `data_dir`.
    pub database_url: Option<String>,
    /// `DATABASE_MAX_CONNECTIONS`: pool size per service.
    pub database_max_connections: u32,
    /// `REDIS_URL`: Redis; unset means in-process adapters.
    pub redis_url: Option<String>,
    /// `FLASHMESH_REDIS_KEY_PREFIX`: prepended to every Redis key.
    pub redis_key_prefix: String,
    /// `FLASHMESH_DATA_DIR`: SQLite files and generated keys (embedded mode).
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    /// How access tokens are verified (and, by the auth service, issued).
    pub tokens: TokenPolicy,
    /// `FLASHMESH_AUTH_URL`: where services fetch the token keys (JWKS).
    pub auth_url: String,
    /// `FLASHMESH_PAGE_TOKEN_SECRET`: signs page tokens; unset means a
    /// secret generated once under the data dir.
    pub page_token_secret: Option<String>,
    /// `FLASHMESH_DNS_REFRESH`: how often upstream host names are resolved
    /// again, so replicas behind one name are found as they come and go.
    pub dns_refresh: Duration,
    /// `OTEL_*`: trace export and sampling.
    pub telemetry: TelemetryConfig,
    /// `FLASHMESH_METRICS_ADDR`: the admin listener serving `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `FLASHMESH_TRANSPORT`: what every server listens with and every
    /// client inside the stack calls with.
    pub transport: Transport,
}

/// How a gRPC server treats its requests and its shutdown.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `FLASHMESH_REQUEST_TIMEOUT`: the longest a unary call may run.
    pub request_timeout: Duration,
    /// `FLASHMESH_CONCURRENCY_LIMIT`: calls in flight per service; more are
    /// shed with UNAVAILABLE.
    pub concurrency_limit: usize,
    /// `FLASHMESH_SHUTDOWN_DRAIN_DELAY`: how long health reports NOT_SERVING
    /// before the listener closes, so load balancers stop sending traffic.
    pub drain_delay: Duration,
    /// `FLASHMESH_SHUTDOWN_TIMEOUT`: the longest in-flight calls may take to
    /// finish once the listener has closed.
    pub shutdown_timeout: Duration,
    /// `FLASHMESH_MAX_CONNECTION_AGE`: after this long a client connection
    /// is sent GOAWAY (calls in flight finish), so clients reconnect and
    /// re-balance over replicas that came up since.
    pub max_connection_age: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            concurrency_limit: 1024,
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(25),
            max_connection_age: Duration::from_secs(300),
        }
    }
}

impl PlatformConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = ServerConfig::default();
        Ok(Self {
            database_url: env.raw("DATABASE_URL").map(str::to_owned),
            database_max_connections: env.ranged_or("DATABASE_MAX_CONNECTIONS", 10, 1..=1000)?,
            redis_url: env.raw("REDIS_URL").map(str::to_owned),
            redis_key_prefix: env
                .raw("FLASHMESH_REDIS_KEY_PREFIX")
                .unwrap_or("flashmesh:")
                .to_owned(),
            data_dir: env.parse_or("FLASHMESH_DATA_DIR", PathBuf::from("data"))?,
            server: ServerConfig {
                request_timeout: env
                    .duration_or("FLASHMESH_REQUEST_TIMEOUT", defaults.request_timeout)?,
                concurrency_limit: env.ranged_or(
                    "FLASHMESH_CONCURRENCY_LIMIT",
                    defaults.concurrency_limit,
                    1..=1_000_000,
                )?,
                drain_delay: env
                    .duration_or("FLASHMESH_SHUTDOWN_DRAIN_DELAY", defaults.drain_delay)?,
                shutdown_timeout: env
                    .duration_or("FLASHMESH_SHUTDOWN_TIMEOUT", defaults.shutdown_timeout)?,
                max_connection_age: env
                    .period_or("FLASHMESH_MAX_CONNECTION_AGE", defaults.max_connection_age)?,
            },
            tokens: TokenPolicy {
                issuer: env.parse_or("FLASHMESH_JWT_ISSUER", "flashmesh-auth".to_owned())?,
                audience: env.parse_or("FLASHMESH_JWT_AUDIENCE", "flashmesh".to_owned())?,
                leeway: env.duration_or("FLASHMESH_JWT_LEEWAY", Duration::from_secs(30))?,
                keys_ttl: env.duration_or("FLASHMESH_JWKS_TTL", Duration::from_secs(300))?,
                min_refresh_interval: env.duration_or(
                    "FLASHMESH_JWKS_MIN_REFRESH_INTERVAL",
                    Duration::from_secs(10),
                )?,
            },
            auth_url: env
                .raw("FLASHMESH_AUTH_URL")
                .unwrap_or("http://127.0.0.1:50051")
                .to_owned(),
            page_token_secret: env.raw("FLASHMESH_PAGE_TOKEN_SECRET").map(str::to_owned),
            dns_refresh: env.period_or("FLASHMESH_DNS_REFRESH", Duration::from_secs(5))?,
            telemetry: TelemetryConfig::from_env(env)?,
            metrics_addr: crate::metrics::metrics_addr(env)?,
            transport: env.parse_or("FLASHMESH_TRANSPORT", Transport::Grpc)?,
        })
    }
}

/// A listen address from `var`, or `default`.
pub fn listen_addr(env: &Env, var: &str, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
    env.parse_or(var, default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_variable() {
        let env = Env::from_pairs([("FLASHMESH_REQUEST_TIMEOUT", "soon")]);
        let err = PlatformConfig::from_env(&env).unwrap_err();
        assert_eq!(err.var, "FLASHMESH_REQUEST_TIMEOUT");
        assert!(
            err.to_string().contains("FLASHMESH_REQUEST_TIMEOUT"),
            "{err}"
        );

        let env = Env::from_pairs([("DATABASE_MAX_CONNECTIONS", "0")]);
        let err = PlatformConfig::from_env(&env).unwrap_err();
        assert_eq!(err.var, "DATABASE_MAX_CONNECTIONS");
        assert!(err.reason.contains("between 1 and 1000"), "{err}");

        let env = Env::from_pairs([("FLASHMESH_MAX_CONNECTION_AGE", "0s")]);
        let err = PlatformConfig::from_env(&env).unwrap_err();
        assert_eq!(err.var, "FLASHMESH_MAX_CONNECTION_AGE");

        let env = Env::from_pairs([("FLASHMESH_TRANSPORT", "http2-json")]);
        let err = PlatformConfig::from_env(&env).unwrap_err();
        assert_eq!(err.var, "FLASHMESH_TRANSPORT");
        assert!(err.reason.contains("grpc or http1-json"), "{err}");
    }

    #[test]
    fn transport_defaults_to_grpc() {
        let config = PlatformConfig::from_env(&Env::default()).unwrap();
        assert_eq!(config.transport, Transport::Grpc);
        let env = Env::from_pairs([("FLASHMESH_TRANSPORT", "http1-json")]);
        let config = PlatformConfig::from_env(&env).unwrap();
        assert_eq!(config.transport, Transport::Http1Json);
    }

    #[test]
    fn unset_and_empty_values_take_defaults() {
        let env = Env::from_pairs([
            ("DATABASE_URL", " "),
            ("FLASHMESH_REQUEST_TIMEOUT", "1500ms"),
        ]);
        let config = PlatformConfig::from_env(&env).unwrap();
        assert_eq!(config.database_url, None);
        assert_eq!(config.server.request_timeout, Duration::from_millis(1500));
        assert_eq!(config.server.concurrency_limit, 1024);
        assert_eq!(config.server.max_connection_age, Duration::from_secs(300));
    }
}
