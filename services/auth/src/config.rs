//! The auth service's configuration, read once at start-up.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use flashmesh_platform::config::{ConfigError, Env, listen_addr};

/// Argon2id cost. The defaults are OWASP's minimum (19 MiB, 2 passes, 1 lane),
/// cheap enough that login stays benchmarkable on 2 cores; the README gives
/// the measured cost (`cargo bench -p flashmesh-auth --bench password`).
#[derive(Debug, Clone, Copy)]
pub struct PasswordCost {
    /// `FLASHMESH_ARGON2_MEMORY_KIB`
    pub memory_kib: u32,
    /// `FLASHMESH_ARGON2_ITERATIONS`
    pub iterations: u32,
    /// `FLASHMESH_ARGON2_PARALLELISM`
    pub parallelism: u32,
}

impl Default for PasswordCost {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Where the token signing keys live.
#[derive(Debug, Clone)]
pub enum KeyLocation {
    /// `FLASHMESH_JWT_SIGNING_KEY_FILE` (PKCS#8 PEM, Ed25519) and optionally
    /// `FLASHMESH_JWT_PREVIOUS_KEY_FILE` (the key before the last rotation,
    /// private or public PEM). Production: mounted from a Secret.
    Files {
        current: PathBuf,
        previous: Option<PathBuf>,
    },
    /// Embedded default: `<FLASHMESH_DATA_DIR>/auth-keys/`, generated on first
    /// start and rotated with `flashmesh keys rotate`.
    Generated { dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `FLASHMESH_AUTH_ADDR`
    pub listen_addr: SocketAddr,
    /// `FLASHMESH_ACCESS_TOKEN_TTL`
    pub access_token_ttl: Duration,
    /// `FLASHMESH_REFRESH_TOKEN_TTL`
    pub refresh_token_ttl: Duration,
    pub password_cost: PasswordCost,
    pub keys: KeyLocation,
    /// `FLASHMESH_LOGIN_MAX_FAILURES`: failed logins per email per window
    /// before further attempts are refused.
    pub login_max_failures: u64,
    /// `FLASHMESH_LOGIN_FAILURE_WINDOW`
    pub login_failure_window: Duration,
}

pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);

impl AuthConfig {
    pub fn from_env(env: &Env, data_dir: &std::path::Path) -> Result<Self, ConfigError> {
        let defaults = PasswordCost::default();
        let keys = match env.optional::<PathBuf>("FLASHMESH_JWT_SIGNING_KEY_FILE")? {
            Some(current) => KeyLocation::Files {
                current,
                previous: env.optional("FLASHMESH_JWT_PREVIOUS_KEY_FILE")?,
            },
            None => KeyLocation::Generated {
                dir: data_dir.join("auth-keys"),
            },
        };
        Ok(Self {
            listen_addr: listen_addr(env, "FLASHMESH_AUTH_ADDR", DEFAULT_ADDR)?,
            access_token_ttl: env
                .duration_or("FLASHMESH_ACCESS_TOKEN_TTL", Duration::from_secs(15 * 60))?,
            refresh_token_ttl: env.duration_or(
                "FLASHMESH_REFRESH_TOKEN_TTL",
                Duration::from_secs(30 * 24 * 3600),
            )?,
            password_cost: PasswordCost {
                memory_kib: env.ranged_or(
                    "FLASHMESH_ARGON2_MEMORY_KIB",
                    defaults.memory_kib,
                    8..=4 * 1024 * 1024,
                )?,
                iterations: env.ranged_or(
                    "FLASHMESH_ARGON2_ITERATIONS",
                    defaults.iterations,
                    1..=100,
                )?,
                parallelism: env.ranged_or(
                    "FLASHMESH_ARGON2_PARALLELISM",
                    defaults.parallelism,
                    1..=64,
                )?,
            },
            keys,
            login_max_failures: env.ranged_or("FLASHMESH_LOGIN_MAX_FAILURES", 10, 1..=1_000_000)?,
            login_failure_window: env.duration_or(
                "FLASHMESH_LOGIN_FAILURE_WINDOW",
                Duration::from_secs(15 * 60),
            )?,
        })
    }
}
