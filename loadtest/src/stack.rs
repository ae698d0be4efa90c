//! One real `flashmesh up` on a fresh PostgreSQL database (and, with Redis,
//! under a Redis key prefix of its own), torn down after the bench.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flashmesh_proto::{
    auth::v1::{LoginRequest, SignUpRequest, auth_service_client::AuthServiceClient},
    catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient},
    order::v1::order_service_client::OrderServiceClient,
};
use futures::{StreamExt, TryStreamExt};
use sqlx::{Connection, Executor, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tonic_health::pb::health_client::HealthClient;

/// Where the bench finds PostgreSQL (an admin URL: each stack gets a fresh
/// database under it) and Redis.
pub struct Backends {
    pub database_url: String,
    pub redis_url: String,
}

impl Backends {
    pub fn from_env() -> Self {
        Self {
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    RedisGate,
    DatabaseOnly,
    ColdCache,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Self::RedisGate => "PostgreSQL + Redis (gate, L1+L2 cache)",
            Self::DatabaseOnly => "PostgreSQL alone (L1 cache)",
            Self::ColdCache => "PostgreSQL alone, cache TTL 1 ms",
        }
    }
}

/// A `flashmesh up` child process and what the bench needs to call it.
pub struct Stack {
    pub child: Child,
    /// The stack's own database (DATABASE_URL of the child).
    pub database_url: String,
    database: String,
    admin_url: String,
    /// Redis URL and key prefix, when the stack uses Redis.
    redis: Option<(String, String)>,
    /// The edge gateway's HTTP address.
    pub gateway_addr: String,
    pub auth_addr: String,
    pub catalog_addr: String,
    pub order_addr: String,
    pub admin_token: String,
    pub order_token: String,
    /// What every `flashmesh` command of this stack runs with.
    env: Vec<(String, String)>,
    /// Held so the directory lives as long as the stack.
    _data_dir: tempfile::TempDir,
}

/// A `flashmesh gateway` process; killed when dropped.
pub struct StandaloneGateway {
    pub child: Child,
    pub addr: String,
}

/// The `flashmesh` binary: `FLASHMESH_BIN`, else the release build in
/// `CARGO_TARGET_DIR` (as cargo resolves it: relative to the working
/// directory), else the workspace's `target/release`.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("FLASHMESH_BIN") {
        return PathBuf::from(bin);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("release/flashmesh")
}

const ADMIN_PASSWORD: &str = "bench admin password";
const USER_PASSWORD: &str = "bench user password";

impl Stack {
    /// Starts a stack in `mode`; `extra_env` goes to every `flashmesh`
    /// command after the bench's defaults (so it may override them).
    pub async fn up(
        mode: Mode,
        backends: &Backends,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let admin_url = backends.database_url.as_str();
        let database = format!("flashmesh_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("PostgreSQL at {admin_url} (DATABASE_URL)"))?;
        admin
            .execute(format!(r#"CREATE DATABASE "{database}""#).as_str())
            .await
            .with_context(|| format!("creating database {database}"))?;
        admin.close().await?;
        let data_dir = tempfile::tempdir()?;
        let mut url = url::Url::parse(admin_url).context("DATABASE_URL")?;
        url.set_path(&database);
        let database_url = url.to_string();
        let mut env = stack_env(&database_url, data_dir.path());
        let mut redis = None;
        match mode {
            Mode::RedisGate => {
                let prefix = format!("flashmesh-bench:{}:", uuid::Uuid::new_v4().simple());
                env.push(("REDIS_URL".into(), backends.redis_url.clone()));
                env.push(("FLASHMESH_REDIS_KEY_PREFIX".into(), prefix.clone()));
                redis = Some((backends.redis_url.clone(), prefix));
            }
            Mode::DatabaseOnly => {}
            Mode::ColdCache => env.push(("FLASHMESH_CACHE_L1_TTL".into(), "1ms".into())),
        }
        env.extend(extra_env.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())));

        let admin_email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
        let mut create_admin = command(&["admin", "--email", &admin_email], &env)
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary().display()))?;
        if let Some(mut stdin) = create_admin.stdin.take() {
            stdin
                .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())
                .await?;
        }
        if !create_admin.wait().await?.success() {
            bail!("flashmesh admin failed");
        }
        let token = command(&["token", "--service", "order", "--ttl", "1h"], &env)
            .output()
            .await?;
        if !token.status.success() {
            bail!(
                "flashmesh token failed: {}",
                String::from_utf8_lossy(&token.stderr)
            );
        }
        let order_token = String::from_utf8(token.stdout)?.trim().to_owned();

        let mut child = command(&["up"], &env).kill_on_drop(true).spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut auth_addr, mut catalog_addr, mut order_addr) = (None, None, None);
        let mut gateway_addr = None;
        while let Some(line) = lines.next_line().await? {
            if let Some(("gateway", addr)) = line
                .trim()
                .split_once(" http://")
                .map(|(s, a)| (s.trim(), a))
            {
                gateway_addr = Some(addr.trim().to_owned());
                continue;
            }
            let Some((service, addr)) = line.trim().split_once(" grpc://") else {
                continue;
            };
            let slot = match service.trim() {
                "auth" => &mut auth_addr,
                "catalog" => &mut catalog_addr,
                "order" => &mut order_addr,
                _ => continue,
            };
            *slot = Some(addr.trim().to_owned());
            if auth_addr.is_some() && catalog_addr.is_some() && order_addr.is_some() {
                break;
            }
        }
        let (Some(gateway_addr), Some(auth_addr), Some(catalog_addr), Some(order_addr)) =
            (gateway_addr, auth_addr, catalog_addr, order_addr)
        else {
            bail!(
                "flashmesh up did not start (no gateway, auth, catalog and order lines in its banner)"
            );
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let mut auth = AuthServiceClient::connect(format!("http://{auth_addr}"))
            .await
            .context("connecting to the auth service")?;
        let admin_token = auth
            .login(LoginRequest {
                email: admin_email,
                password: ADMIN_PASSWORD.into(),
            })
            .await
            .context("admin Login")?
            .into_inner()
            .tokens
            .context("Login answered no tokens")?
            .access_token;
        Ok(Self {
            child,
            database_url,
            database,
            admin_url: admin_url.to_owned(),
            redis,
            gateway_addr,
            auth_addr,
            catalog_addr,
            order_addr,
            admin_token,
            order_token,
            env,
            _data_dir: data_dir,
        })
    }

    /// `flashmesh gateway` in a process of its own, in front of this
    /// stack's services, as a deployment runs it; ready when this returns.
    pub async fn standalone_gateway(&self) -> anyhow::Result<StandaloneGateway> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut env = self.env.clone();
        env.extend([
            ("FLASHMESH_GATEWAY_ADDR".into(), addr.to_string()),
            (
                "FLASHMESH_AUTH_URL".into(),
                format!("http://{}", self.auth_addr),
            ),
            (
                "FLASHMESH_CATALOG_URL".into(),
                format!("http://{}", self.catalog_addr),
            ),
            (
                "FLASHMESH_ORDER_URL".into(),
                format!("http://{}", self.order_addr),
            ),
        ]);
        let child = command(&["gateway"], &env)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let ready = format!("http://{addr}/readyz");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = client.get(&ready).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("flashmesh gateway at {addr} not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(StandaloneGateway {
            child,
            addr: addr.to_string(),
        })
    }

    async fn channels(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n {
            channels.push(
                Channel::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {addr}"))?,
            );
        }
        Ok(channels)
    }

    pub async fn catalog_clients(
        &self,
        n: usize,
    ) -> anyhow::Result<Vec<CatalogServiceClient<Channel>>> {
        Ok(Self::channels(&self.catalog_addr, n)
            .await?
            .into_iter()
            .map(CatalogServiceClient::new)
            .collect())
    }

    pub async fn auth_clients(&self, n: usize) -> anyhow::Result<Vec<AuthServiceClient<Channel>>> {
        Ok(Self::channels(&self.auth_addr, n)
            .await?
            .into_iter()
            .map(AuthServiceClient::new)
            .collect())
    }

    pub async fn order_clients(
        &self,
        n: usize,
    ) -> anyhow::Result<Vec<OrderServiceClient<Channel>>> {
        Ok(Self::channels(&self.order_addr, n)
            .await?
            .into_iter()
            .map(OrderServiceClient::new)
            .collect())
    }

    pub async fn health_clients(&self, n: usize) -> anyhow::Result<Vec<HealthClient<Channel>>> {
        Ok(Self::channels(&self.catalog_addr, n)
            .await?
            .into_iter()
            .map(HealthClient::new)
            .collect())
    }

    /// Signs up `count` users through AuthService.SignUp, `parallel` at a
    /// time; returns each one's `authorization` header value.
    pub async fn sign_up_users(
        &self,
        count: usize,
        parallel: usize,
    ) -> anyhow::Result<Vec<MetadataValue<Ascii>>> {
        let channels = Self::channels(&self.auth_addr, 4).await?;
        futures::stream::iter(0..count)
            .map(|i| {
                let mut auth = AuthServiceClient::new(channels[i % channels.len()].clone());
                async move {
                    let tokens = auth
                        .sign_up(SignUpRequest {
                            email: format!("buyer-{i}@bench.example.com"),
                            password: USER_PASSWORD.into(),
                            display_name: String::new(),
                        })
                        .await
                        .with_context(|| format!("SignUp of buyer {i}"))?
                        .into_inner()
                        .tokens
                        .context("SignUp answered no tokens")?;
                    format!("Bearer {}", tokens.access_token)
                        .parse::<MetadataValue<Ascii>>()
                        .context("access token is not a valid header value")
                }
            })
            .buffered(parallel.max(1))
            .try_collect()
            .await
    }

    /// The admin's `authorization` header value.
    pub fn admin_bearer(&self) -> anyhow::Result<MetadataValue<Ascii>> {
        format!("Bearer {}", self.admin_token)
            .parse()
            .context("admin token is not a valid header value")
    }

    /// A product and an active deal; returns the deal id.
    pub async fn create_deal(&self, stock: i32, per_user_limit: i32) -> anyhow::Result<String> {
        let mut client = CatalogServiceClient::connect(format!("http://{}", self.catalog_addr))
            .await
            .context("connecting to the catalog")?;
        let bearer = self.admin_bearer()?;
        let mut request = Request::new(pb::CreateProductRequest {
            name: "Bench product".into(),
            description: String::new(),
            image_url: None,
            price_cents: 1_000,
        });
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        let product = client
            .create_product(request)
            .await
            .context("CreateProduct")?
            .into_inner()
            .product
            .context("CreateProduct answered no product")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let now = i64::try_from(now)?;
        let mut request = Request::new(pb::CreateDealRequest {
            product_id: product.id,
            price_cents: 500,
            stock,
            per_user_limit,
            starts_at: Some(prost_types::Timestamp {
                seconds: now - 1,
                nanos: 0,
            }),
            ends_at: Some(prost_types::Timestamp {
                seconds: now + 3_600,
                nanos: 0,
            }),
        });
        request.metadata_mut().insert("authorization", bearer);
        Ok(client
            .create_deal(request)
            .await
            .context("CreateDeal")?
            .into_inner()
            .deal
            .context("CreateDeal answered no deal")?
            .id)
    }

    /// Stops the stack, drops its database and deletes its Redis keys.
    pub async fn down(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        self.child.wait().await?;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        admin
            .execute(
                format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    self.database
                )
                .as_str(),
            )
            .await
            .with_context(|| format!("dropping database {}", self.database))?;
        if let Some((url, prefix)) = &self.redis {
            delete_redis_keys(url, prefix)
                .await
                .with_context(|| format!("deleting Redis keys {prefix}*"))?;
        }
        Ok(())
    }
}

/// Deletes every key under `prefix`, SCAN by SCAN.
async fn delete_redis_keys(url: &str, prefix: &str) -> anyhow::Result<()> {
    let mut connection = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut connection)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn stack_env(database_url: &str, data_dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), database_url.into()),
        ("FLASHMESH_DATA_DIR".into(), data_dir.display().to_string()),
        ("FLASHMESH_GATEWAY_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_AUTH_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_CATALOG_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_ORDER_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_METRICS_ADDR".into(), "127.0.0.1:0".into()),
        ("FLASHMESH_CONCURRENCY_LIMIT".into(), "100000".into()),
        ("DATABASE_MAX_CONNECTIONS".into(), "20".into()),
        ("RUST_LOG".into(), "error".into()),
    ]
}

fn command(args: &[&str], env: &[(String, String)]) -> Command {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("REDIS_URL")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}
