//! A real stack — one `flashmesh up`, or a process per service as deployed —
//! on a fresh PostgreSQL database (and, with Redis, under a Redis key prefix
//! of its own), torn down after the bench.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flashmesh_platform::{
    config::Transport,
    upstream::{UpstreamChannel, UpstreamSettings, lazy_channel},
};
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
/// database under it), Redis and the `flashmesh` binary.
pub struct Backends {
    pub database_url: String,
    pub redis_url: String,
    pub flashmesh: PathBuf,
}

impl Backends {
    pub fn from_env() -> Self {
        Self {
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            flashmesh: binary(),
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

/// A running stack — `flashmesh up`, or a process per service — and what
/// the bench needs to call it.
pub struct Stack {
    /// `flashmesh up` alone, or `auth`, `catalog`, `order` and `gateway`.
    pub processes: Vec<StackProcess>,
    /// The stack's own database (DATABASE_URL of its processes).
    pub database_url: String,
    storage: Storage,
    /// The edge gateway's HTTP address.
    pub gateway_addr: String,
    pub auth_addr: String,
    pub catalog_addr: String,
    pub order_addr: String,
    pub admin_email: String,
    pub admin_token: String,
    pub order_token: String,
    /// How the services serve and call each other.
    pub transport: Transport,
    /// The `flashmesh` binary, and what every command of this stack runs
    /// with.
    binary: PathBuf,
    env: Vec<(String, String)>,
    /// Held so the directory lives as long as the stack.
    _data_dir: tempfile::TempDir,
}

/// One `flashmesh` process of a stack; killed when dropped.
pub struct StackProcess {
    /// Its command: `up`, `auth`, `catalog`, `order` or `gateway`.
    pub name: &'static str,
    pub child: Child,
    /// Its admin listener, serving `/metrics`.
    pub metrics_addr: String,
}

/// A `flashmesh gateway` process; killed when dropped.
pub struct StandaloneGateway {
    pub child: Child,
    pub addr: String,
}

/// Where the processes of a stack with a process per service listen, and
/// how the gateway is started.
pub struct Placement {
    /// The services' listen address (loopback, or the host end of a veth).
    pub services_ip: IpAddr,
    /// The gateway's listen address.
    pub gateway_ip: IpAddr,
    /// Words in front of the gateway's command (`ip netns exec NAME`).
    pub gateway_prefix: Vec<String>,
    /// The gateway reaches Redis (else its limits stay in-process).
    pub gateway_redis: bool,
}

impl Placement {
    /// Everything on 127.0.0.1.
    pub fn loopback() -> Self {
        Self {
            services_ip: IpAddr::from([127, 0, 0, 1]),
            gateway_ip: IpAddr::from([127, 0, 0, 1]),
            gateway_prefix: Vec::new(),
            gateway_redis: true,
        }
    }
}

/// The default `flashmesh` binary: `FLASHMESH_BIN`, else the release build in
/// `CARGO_TARGET_DIR` (as cargo resolves it: relative to the working
/// directory), else the workspace's `target/release`.
fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("FLASHMESH_BIN") {
        return PathBuf::from(bin);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("release/flashmesh")
}

/// Limits far above anything a bench reaches, so none throttles it.
pub const UNTHROTTLED: &[(&str, &str)] = &[
    ("FLASHMESH_RATE_LIMIT_IP", "1000000/s:1000000"),
    ("FLASHMESH_RATE_LIMIT_USER", "1000000/s:1000000"),
    ("FLASHMESH_UPSTREAM_MAX_OUTSTANDING", "1000000"),
];

/// Cheap password hashing, so that signing up and logging in thousands of
/// users takes seconds when passwords are not what a bench measures.
pub const CHEAP_HASHING: &[(&str, &str)] = &[
    ("FLASHMESH_ARGON2_MEMORY_KIB", "256"),
    ("FLASHMESH_ARGON2_ITERATIONS", "1"),
];

pub const ADMIN_PASSWORD: &str = "bench admin password";
const USER_PASSWORD: &str = "bench user password";

/// A stack before its services run: its database, Redis prefix, data
/// directory, admin and the order service's token.
struct Prepared {
    database_url: String,
    storage: Storage,
    admin_email: String,
    order_token: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    data_dir: tempfile::TempDir,
}

impl Prepared {
    /// A fresh database under `backends` (and a Redis prefix in `mode`
    /// RedisGate), the admin created with `flashmesh admin` and a token
    /// minted with `flashmesh token`; `extra_env` goes to every `flashmesh`
    /// command after the bench's defaults (so it may override them).
    async fn new(
        mode: Mode,
        backends: &Backends,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let storage = Storage::create(backends, mode == Mode::RedisGate).await?;
        let data_dir = tempfile::tempdir()?;
        let mut url = url::Url::parse(&storage.admin_url).context("DATABASE_URL")?;
        url.set_path(&storage.database);
        let database_url = url.to_string();
        let mut env = stack_env(&database_url, data_dir.path());
        if let Some((url, prefix)) = &storage.redis {
            env.push(("REDIS_URL".into(), url.clone()));
            env.push(("FLASHMESH_REDIS_KEY_PREFIX".into(), prefix.clone()));
        }
        if mode == Mode::ColdCache {
            env.push(("FLASHMESH_CACHE_L1_TTL".into(), "1ms".into()));
        }
        env.extend(extra_env.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())));

        let admin_email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
        let binary = backends.flashmesh.clone();
        let mut create_admin = command(&binary, &["admin", "--email", &admin_email], &env)
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        if let Some(mut stdin) = create_admin.stdin.take() {
            stdin
                .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())
                .await?;
        }
        if !create_admin.wait().await?.success() {
            bail!("flashmesh admin failed");
        }
        let token = command(
            &binary,
            &["token", "--service", "order", "--ttl", "1h"],
            &env,
        )
        .output()
        .await?;
        if !token.status.success() {
            bail!(
                "flashmesh token failed: {}",
                String::from_utf8_lossy(&token.stderr)
            );
        }
        let order_token = String::from_utf8(token.stdout)?.trim().to_owned();
        Ok(Self {
            database_url,
            storage,
            admin_email,
            order_token,
            binary,
            env,
            data_dir,
        })
    }

    /// The stack of these `processes`, its admin logged in over
    /// `transport`.
    async fn running(
        self,
        processes: Vec<StackProcess>,
        [gateway_addr, auth_addr, catalog_addr, order_addr]: [String; 4],
        transport: Transport,
    ) -> anyhow::Result<Stack> {
        let admin_token = AuthServiceClient::new(channel(&auth_addr, transport)?)
            .login(LoginRequest {
                email: self.admin_email.clone(),
                password: ADMIN_PASSWORD.into(),
            })
            .await
            .context("admin Login")?
            .into_inner()
            .tokens
            .context("Login answered no tokens")?
            .access_token;
        Ok(Stack {
            processes,
            database_url: self.database_url,
            storage: self.storage,
            gateway_addr,
            auth_addr,
            catalog_addr,
            order_addr,
            admin_email: self.admin_email,
            admin_token,
            order_token: self.order_token,
            transport,
            binary: self.binary,
            env: self.env,
            _data_dir: self.data_dir,
        })
    }
}

impl Stack {
    /// Starts `flashmesh up` in `mode`; `extra_env` goes to every
    /// `flashmesh` command after the bench's defaults (so it may override
    /// them).
    pub async fn up(
        mode: Mode,
        backends: &Backends,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let prepared = Prepared::new(mode, backends, extra_env).await?;
        let mut child = command(&prepared.binary, &["up"], &prepared.env)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs: [Option<String>; 5] = Default::default();
        while let Some(line) = lines.next_line().await? {
            // `  gateway  http://…`, `  auth     grpc://…`, `  metrics  http://…/metrics`
            let Some((name, url)) = line.trim().split_once(' ') else {
                continue;
            };
            let slot = match name {
                "gateway" => 0,
                "auth" => 1,
                "catalog" => 2,
                "order" => 3,
                "metrics" => 4,
                _ => continue,
            };
            let addr = url.trim().split_once("://").map_or("", |(_, rest)| rest);
            addrs[slot] = Some(addr.trim_end_matches("/metrics").to_owned());
            if addrs.iter().all(Option::is_some) {
                break;
            }
        }
        let [
            Some(gateway),
            Some(auth),
            Some(catalog),
            Some(order),
            Some(metrics),
        ] = addrs
        else {
            bail!(
                "flashmesh up did not start (no gateway, auth, catalog, order and metrics lines in its banner)"
            );
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let up = StackProcess {
            name: "up",
            child,
            metrics_addr: metrics,
        };
        prepared
            .running(vec![up], [gateway, auth, catalog, order], Transport::Grpc)
            .await
    }

    /// Starts `flashmesh auth`, `catalog`, `order` and `gateway`, each in a
    /// process of its own as a deployment runs them, serving over
    /// `transport`, placed as `placement` says; ready (the gateway's
    /// `/readyz` answers 200) when this returns.
    pub async fn per_service(
        mode: Mode,
        transport: Transport,
        backends: &Backends,
        extra_env: &[(&str, &str)],
        placement: &Placement,
    ) -> anyhow::Result<Self> {
        let mut env = vec![("FLASHMESH_TRANSPORT", transport.as_str())];
        env.extend_from_slice(extra_env);
        let mut prepared = Prepared::new(mode, backends, &env).await?;
        let migrate = command(&prepared.binary, &["migrate"], &prepared.env)
            .output()
            .await?;
        if !migrate.status.success() {
            bail!(
                "flashmesh migrate failed: {}",
                String::from_utf8_lossy(&migrate.stderr)
            );
        }
        let token_file = prepared.data_dir.path().join("order.token");
        std::fs::write(&token_file, &prepared.order_token)?;
        prepared.env.push((
            "FLASHMESH_ORDER_TOKEN_FILE".into(),
            token_file.display().to_string(),
        ));
        let services = free_addrs(placement.services_ip, 6)?;
        let gateway = free_addrs(placement.gateway_ip, 2)?;
        let url = |addr: &SocketAddr| format!("http://{addr}");
        let upstreams = [
            ("FLASHMESH_AUTH_URL", url(&services[0])),
            ("FLASHMESH_CATALOG_URL", url(&services[1])),
            ("FLASHMESH_ORDER_URL", url(&services[2])),
        ];
        let mut processes = Vec::with_capacity(4);
        for (i, name, listen_var) in [
            (0, "auth", "FLASHMESH_AUTH_ADDR"),
            (1, "catalog", "FLASHMESH_CATALOG_ADDR"),
            (2, "order", "FLASHMESH_ORDER_ADDR"),
            (3, "gateway", "FLASHMESH_GATEWAY_ADDR"),
        ] {
            let (listen, metrics) = if name == "gateway" {
                (gateway[0], gateway[1])
            } else {
                (services[i], services[i + 3])
            };
            let mut env = prepared.env.clone();
            env.extend(upstreams.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            env.push((listen_var.into(), listen.to_string()));
            env.push(("FLASHMESH_METRICS_ADDR".into(), metrics.to_string()));
            let mut process = if name == "gateway" {
                if !placement.gateway_redis {
                    env.retain(|(k, _)| k != "REDIS_URL");
                }
                prefixed_command(&placement.gateway_prefix, &prepared.binary, &[name], &env)
            } else {
                command(&prepared.binary, &[name], &env)
            };
            processes.push(StackProcess {
                name,
                child: process.stdout(Stdio::null()).kill_on_drop(true).spawn()?,
                metrics_addr: metrics.to_string(),
            });
        }
        wait_ready(&gateway[0].to_string()).await?;
        prepared
            .running(
                processes,
                [gateway[0], services[0], services[1], services[2]].map(|a| a.to_string()),
                transport,
            )
            .await
    }

    /// A client channel to `addr` over this stack's transport, set up as
    /// the services' own (connecting on first use).
    pub fn channel(&self, addr: &str) -> anyhow::Result<UpstreamChannel> {
        channel(addr, self.transport)
    }

    /// The process named `name` (`up`, `auth`, …).
    pub fn process(&self, name: &str) -> anyhow::Result<&StackProcess> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no {name} process in this stack"))
    }

    /// The Redis the stack uses, if it uses one.
    pub fn redis_url(&self) -> Option<&str> {
        self.storage.redis.as_ref().map(|(url, _)| url.as_str())
    }

    /// The pid of the process named `name`, while it runs.
    pub fn pid(&self, name: &str) -> anyhow::Result<u32> {
        self.process(name)?
            .child
            .id()
            .with_context(|| format!("the {name} process has exited"))
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
        let child = command(&self.binary, &["gateway"], &env)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        wait_ready(&addr.to_string()).await?;
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
        let mut client = CatalogServiceClient::new(self.channel(&self.catalog_addr)?);
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
        // The gateway first, so the services see no calls while they stop.
        for process in self.processes.iter_mut().rev() {
            if let Some(pid) = process.child.id() {
                Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await?;
            }
            process.child.wait().await?;
        }
        self.storage.remove().await
    }
}

/// A stack's database and Redis keys. Removed by [`Storage::remove`], or
/// when dropped: a stack that fails to start, or a run that is interrupted,
/// leaves nothing behind.
struct Storage {
    admin_url: String,
    database: String,
    /// Redis URL and key prefix, when the stack uses Redis.
    redis: Option<(String, String)>,
    removed: bool,
}

impl Storage {
    /// A fresh database under `backends`' admin URL, and a Redis prefix of
    /// its own if `redis`.
    async fn create(backends: &Backends, redis: bool) -> anyhow::Result<Self> {
        let admin_url = backends.database_url.clone();
        let database = format!("flashmesh_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .with_context(|| format!("PostgreSQL at {admin_url} (DATABASE_URL)"))?;
        admin
            .execute(format!(r#"CREATE DATABASE "{database}""#).as_str())
            .await
            .with_context(|| format!("creating database {database}"))?;
        admin.close().await?;
        let redis = redis.then(|| {
            (
                backends.redis_url.clone(),
                format!("flashmesh-bench:{}:", uuid::Uuid::new_v4().simple()),
            )
        });
        Ok(Self {
            admin_url,
            database,
            redis,
            removed: false,
        })
    }

    /// Drops the database and deletes the Redis keys.
    async fn remove(&mut self) -> anyhow::Result<()> {
        self.removed = true;
        remove_storage(&self.admin_url, &self.database, self.redis.as_ref()).await
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (admin_url, database, redis) = (
            self.admin_url.clone(),
            self.database.clone(),
            self.redis.clone(),
        );
        // Drop cannot await: a short-lived runtime on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(remove_storage(&admin_url, &database, redis.as_ref()))
        });
        if let Ok(Err(error)) = cleanup.join() {
            eprintln!("cannot clean up after a stack: {error:#}");
        }
    }
}

async fn remove_storage(
    admin_url: &str,
    database: &str,
    redis: Option<&(String, String)>,
) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    admin
        .execute(format!(r#"DROP DATABASE IF EXISTS "{database}" WITH (FORCE)"#).as_str())
        .await
        .with_context(|| format!("dropping database {database}"))?;
    if let Some((url, prefix)) = redis {
        delete_redis_keys(url, prefix)
            .await
            .with_context(|| format!("deleting Redis keys {prefix}*"))?;
    }
    Ok(())
}

fn channel(addr: &str, transport: Transport) -> anyhow::Result<UpstreamChannel> {
    Ok(lazy_channel(
        &format!("http://{addr}"),
        &UpstreamSettings {
            connect_timeout: Duration::from_secs(5),
            call_timeout: None,
            refresh: Duration::from_secs(60),
            transport,
        },
    )?)
}

/// Waits up to 30 s for the gateway at `addr` to answer `/readyz` with
/// 200 (every upstream SERVING).
async fn wait_ready(addr: &str) -> anyhow::Result<()> {
    let ready = format!("http://{addr}/readyz");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client.get(&ready).send().await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("flashmesh gateway at {addr} not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` addresses on `ip` with distinct ports that are free right now (bound
/// together on every local address, then released for the processes to
/// bind). `ip` may be in another network namespace.
pub fn free_addrs(ip: IpAddr, n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("no free port")?;
    listeners
        .iter()
        .map(|listener| Ok(SocketAddr::new(ip, listener.local_addr()?.port())))
        .collect()
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

fn command(binary: &Path, args: &[&str], env: &[(String, String)]) -> Command {
    prefixed_command(&[], binary, args, env)
}

/// `binary args…` run through `prefix` (e.g. `ip netns exec NAME`), if
/// any, with `env` and nothing of the bench's own REDIS_URL.
fn prefixed_command(
    prefix: &[String],
    binary: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> Command {
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    command
        .args(args)
        .env_remove("REDIS_URL")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}
