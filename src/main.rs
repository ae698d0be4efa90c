//! `flashmesh`: one binary for every service.
//!
//! `flashmesh up` runs the whole stack in one process (each service on its own
//! loopback port, talking real gRPC); `flashmesh auth` runs one service alone,
//! as a Kubernetes Deployment does.

mod health;

/// jemalloc: every request allocates (headers, frames, futures), and
/// glibc's malloc cost ~15% of a gateway request's instructions; jemalloc
/// also holds an idle SSE stream in less memory (12.7 vs 15.1 KiB at
/// 10,000 streams). mimalloc was tried: fast, but 23.9 KiB per stream.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::{
    io::{BufRead, IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flashmesh_auth::{AuthApp, config::AuthConfig};
use flashmesh_catalog::{CatalogApp, config::CatalogConfig};
use flashmesh_gateway::{GatewayApp, config::GatewayConfig};
use flashmesh_order::{
    OrderApp,
    catalog::{MintedToken, ServiceToken, TokenFile},
    config::OrderConfig,
};
use flashmesh_platform::{
    config::{Env, PlatformConfig, Transport},
    db::Database,
    identity::Role,
    metrics::{self, Metrics},
    redis::RedisHandle,
    runtime::{init_logging, shutdown_on_signal},
    telemetry::Telemetry,
};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "flashmesh",
    version,
    about = "Flash-sale microservices over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process, each on its own port.
    Up,
    /// Run the auth service alone.
    Auth,
    /// Run the catalog service alone.
    Catalog,
    /// Run the edge gateway alone (REST/JSON → gRPC).
    Gateway,
    /// Run the order service alone. Needs FLASHMESH_ORDER_TOKEN_FILE (a
    /// `flashmesh token --service order` token) to call the catalog.
    Order,
    /// Apply every service's database migrations, then exit.
    Migrate,
    /// Create an admin, or promote an existing user. The password is read
    /// from standard input, never from the command line.
    Admin {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Print an access token for another service (`role=service`), e.g. the
    /// order service's token for ReserveStock. Needs the signing key.
    Token {
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Write the token to this file (mode 0600, replaced atomically)
        /// instead of printing it.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Keep running and write a fresh token this often (shorter than
        /// --ttl), until SIGTERM: a sidecar keeping the file valid.
        #[arg(long, requires = "output", value_parser = humantime::parse_duration)]
        renew_every: Option<Duration>,
    },
    /// Check a service's health, for container health checks: exit 0 when
    /// it is SERVING, 1 when it answers otherwise, 2 when it cannot be
    /// reached. Reads no configuration.
    Health {
        /// `host:port` for grpc.health.v1, or `http://host:port/path` for an
        /// HTTP GET that must answer 2xx (the gateway's /healthz).
        target: String,
        /// The gRPC service to ask about; empty means the whole server.
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Manage the generated token signing keys (embedded mode).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make the current key the previous one and generate a new current key.
    /// Restart the auth service to start signing with it.
    Rotate,
}

/// Configuration of the whole process, read once.
struct Settings {
    platform: PlatformConfig,
    auth: AuthConfig,
    catalog: CatalogConfig,
    order: OrderConfig,
    gateway: GatewayConfig,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let env = Env::from_process();
        let platform = PlatformConfig::from_env(&env)?;
        let auth = AuthConfig::from_env(&env, &platform.data_dir)?;
        let catalog = CatalogConfig::from_env(&env)?;
        let order = OrderConfig::from_env(&env, &platform.server)?;
        let gateway = GatewayConfig::from_env(&env, &platform.auth_url)?;
        Ok(Self {
            platform,
            auth,
            catalog,
            order,
            gateway,
        })
    }

    /// The telemetry of `part` (`auth`, …); `shared_process` under `up`.
    fn telemetry(
        &self,
        part: &str,
        shared_process: bool,
        metrics: &Metrics,
    ) -> anyhow::Result<Telemetry> {
        let config = &self.platform.telemetry;
        Ok(Telemetry::new(
            config,
            config.service_name(part, shared_process),
            metrics,
        )?)
    }

    /// The admin listener serving `/metrics`.
    async fn metrics_listener(&self) -> anyhow::Result<TcpListener> {
        bind(self.platform.metrics_addr, "FLASHMESH_METRICS_ADDR").await
    }

    async fn redis(&self) -> anyhow::Result<Option<RedisHandle>> {
        match &self.platform.redis_url {
            Some(url) => Ok(Some(
                RedisHandle::connect(url, &self.platform.redis_key_prefix).await?,
            )),
            None => Ok(None),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    init_logging();
    let cli = Cli::parse();
    // Configuration is read by the commands that need it, so `health` runs
    // whatever the environment holds.
    match cli.command {
        Command::Health {
            target,
            service,
            timeout,
        } => return Ok(health::check(&target, &service, timeout).await.report()),
        Command::Up => up(Settings::from_env()?).await?,
        Command::Auth => auth(Settings::from_env()?).await?,
        Command::Catalog => catalog(Settings::from_env()?).await?,
        Command::Order => order(Settings::from_env()?).await?,
        Command::Gateway => gateway(Settings::from_env()?).await?,
        Command::Migrate => {
            let platform = Settings::from_env()?.platform;
            // Migrations only: no keys or other service state is needed.
            for (schema, migrator) in [
                (flashmesh_auth::SCHEMA, &flashmesh_auth::MIGRATOR),
                (flashmesh_catalog::SCHEMA, &flashmesh_catalog::MIGRATOR),
                (flashmesh_order::SCHEMA, &flashmesh_order::MIGRATOR),
            ] {
                Database::migrate_only(&platform, schema, migrator)
                    .await
                    .with_context(|| format!("cannot migrate the {schema} schema"))?;
            }
            println!("migrations applied");
        }
        Command::Admin {
            email,
            display_name,
        } => admin(Settings::from_env()?, &email, &display_name).await?,
        Command::Token {
            service,
            ttl,
            output,
            renew_every,
        } => {
            if renew_every.is_some_and(|every| every >= ttl) {
                bail!("--renew-every must be shorter than --ttl, or the token lapses in between");
            }
            let settings = Settings::from_env()?;
            let app = AuthApp::build(
                &settings.platform,
                settings.auth,
                None,
                &Telemetry::disabled("token"),
            )
            .await?;
            let Some(path) = output else {
                println!("{}", app.service.issue_service_token(&service, ttl)?);
                return Ok(ExitCode::SUCCESS);
            };
            let mint = || app.service.issue_service_token(&service, ttl);
            write_private(&path, &mint()?)?;
            if let Some(every) = renew_every {
                let stop = shutdown_on_signal();
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => write_private(&path, &mint()?)?,
                        () = stop.cancelled() => break,
                    }
                }
            }
        }
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            let settings = Settings::from_env()?;
            let flashmesh_auth::config::KeyLocation::Generated { dir } = &settings.auth.keys else {
                bail!(
                    "FLASHMESH_JWT_SIGNING_KEY_FILE is set: rotate by deploying a new key file \
                     and moving the old one to FLASHMESH_JWT_PREVIOUS_KEY_FILE"
                );
            };
            let kid = flashmesh_auth::keys::rotate(dir)?;
            println!("new signing key {kid}; restart the auth service to use it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `contents` to `path` readable by its owner only, replacing any
/// earlier file in one rename so a reader never sees half a token.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path
        .file_name()
        .with_context(|| format!("--output {} names no file", path.display()))?
        .to_owned();
    name.push(".tmp");
    let temporary = path.with_file_name(name);
    // A leftover from an interrupted run would keep its own mode.
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", temporary.display()));
        }
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    writeln!(file, "{contents}")
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot move the token into {}", path.display()))
}

async fn up(settings: Settings) -> anyhow::Result<()> {
    let redis = settings.redis().await?;
    let auth_listener = bind(settings.auth.listen_addr, "FLASHMESH_AUTH_ADDR").await?;
    let catalog_listener = bind(settings.catalog.listen_addr, "FLASHMESH_CATALOG_ADDR").await?;
    let order_listener = bind(settings.order.listen_addr, "FLASHMESH_ORDER_ADDR").await?;
    let gateway_listener = bind(settings.gateway.listen_addr, "FLASHMESH_GATEWAY_ADDR").await?;
    let metrics_listener = settings.metrics_listener().await?;
    let metrics_addr = metrics_listener.local_addr()?;
    // One registry for the process; a tracer per service, so each has its
    // own service.name.
    let metrics = Metrics::default();
    let telemetry = |part: &str| settings.telemetry(part, true, &metrics);
    let (auth_telemetry, catalog_telemetry, order_telemetry, gateway_telemetry) = (
        telemetry("auth")?,
        telemetry("catalog")?,
        telemetry("order")?,
        telemetry("gateway")?,
    );
    let auth_addr = auth_listener.local_addr()?;
    let catalog_addr = catalog_listener.local_addr()?;
    let order_addr = order_listener.local_addr()?;
    let gateway_addr = gateway_listener.local_addr()?;
    // In one process the services find each other on the ports just bound.
    let mut platform = settings.platform.clone();
    platform.auth_url = format!("http://{auth_addr}");
    let mut order_config = settings.order.clone();
    order_config.catalog_url = format!("http://{catalog_addr}");
    let auth = AuthApp::build(&platform, settings.auth, redis.as_ref(), &auth_telemetry).await?;
    let catalog = CatalogApp::build(
        &platform,
        settings.catalog,
        redis.as_ref(),
        &catalog_telemetry,
    )
    .await?;
    // The order service's token for the catalog, minted with the auth
    // service's key in this process.
    let minter = auth.service.clone();
    let token: Arc<dyn ServiceToken> =
        Arc::new(MintedToken::new(Duration::from_secs(3600), move |ttl| {
            minter
                .issue_service_token("order", ttl)
                .map_err(|e| e.to_string())
        }));
    let order = OrderApp::build(
        &platform,
        order_config,
        redis.as_ref(),
        token,
        &order_telemetry,
    )
    .await?;
    let mut gateway_config = settings.gateway.clone();
    for upstream in &mut gateway_config.upstreams {
        let addr = match upstream.service.as_str() {
            "flashmesh.auth.v1.AuthService" => auth_addr,
            "flashmesh.catalog.v1.CatalogService" => catalog_addr,
            _ => order_addr,
        };
        upstream.urls = vec![format!("http://{addr}")];
    }
    let gateway = GatewayApp::build(
        &platform,
        gateway_config,
        redis.as_ref(),
        &gateway_telemetry,
    )
    .await?;

    let store = platform.database_url.as_deref().map_or_else(
        || format!("SQLite under {}", platform.data_dir.display()),
        |_| "PostgreSQL (DATABASE_URL)".to_owned(),
    );
    let mode = if redis.is_some() {
        "Redis"
    } else {
        "in-process cache and limits"
    };
    let (scheme, try_service) = match platform.transport {
        Transport::Grpc => (
            "grpc",
            format!(
                "grpcurl -plaintext {auth_addr} list\n  \
                 grpcurl -plaintext -d '{{\"email\":\"ada@example.com\",\"password\":\"correct horse\"}}' \
                 {auth_addr} flashmesh.auth.v1.AuthService/SignUp\n  \
                 grpcurl -plaintext {catalog_addr} flashmesh.catalog.v1.CatalogService/ListDeals"
            ),
        ),
        Transport::Http1Json => (
            "http",
            format!(
                "curl -s -XPOST -H 'content-type: application/json' -d '{{}}' \
                 http://{catalog_addr}/flashmesh.catalog.v1.CatalogService/ListDeals"
            ),
        ),
    };
    let banner = format!(
        "flashmesh is up ({store}; {mode})\n  gateway  http://{gateway_addr}\n  auth     {scheme}://{auth_addr}\n  catalog  {scheme}://{catalog_addr}\n  order    {scheme}://{order_addr}\n  metrics  http://{metrics_addr}/metrics\n\n\
         Try:\n  curl -s 'http://{gateway_addr}/v1/deals?states=DEAL_STATE_ACTIVE'\n  {try_service}"
    );
    // The banner is a courtesy: a closed stdout (`flashmesh up | head -1`)
    // must not stop the services, so a failed write is ignored.
    let _ = writeln!(std::io::stdout(), "{banner}");

    let shutdown = shutdown_on_signal();
    tokio::try_join!(
        async { Ok::<_, anyhow::Error>(auth.serve(auth_listener, shutdown.clone()).await?) },
        async { Ok(catalog.serve(catalog_listener, shutdown.clone()).await?) },
        async { Ok(order.serve(order_listener, shutdown.clone()).await?) },
        async { Ok(gateway.serve(gateway_listener, shutdown.clone()).await?) },
        async { Ok(metrics::serve(metrics_listener, metrics.clone(), shutdown.clone()).await?) },
    )?;
    Ok(())
}

/// Serves `app` and the metrics of `telemetry` until a signal.
async fn serve_alone<F, Fut, E>(
    telemetry: &Telemetry,
    admin: TcpListener,
    app: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<anyhow::Error>,
{
    let shutdown = shutdown_on_signal();
    tracing::info!(addr = %admin.local_addr()?, "metrics at /metrics");
    tokio::try_join!(
        async { app(shutdown.clone()).await.map_err(Into::into) },
        async { Ok(metrics::serve(admin, telemetry.metrics().clone(), shutdown.clone()).await?) },
    )?;
    Ok(())
}

async fn auth(settings: Settings) -> anyhow::Result<()> {
    let redis = settings.redis().await?;
    let listener = bind(settings.auth.listen_addr, "FLASHMESH_AUTH_ADDR").await?;
    let admin = settings.metrics_listener().await?;
    tracing::info!(addr = %listener.local_addr()?, "auth service listening");
    let telemetry = settings.telemetry("auth", false, &Metrics::default())?;
    let app = AuthApp::build(
        &settings.platform,
        settings.auth,
        redis.as_ref(),
        &telemetry,
    )
    .await?;
    serve_alone(&telemetry, admin, |shutdown| app.serve(listener, shutdown)).await
}

async fn catalog(settings: Settings) -> anyhow::Result<()> {
    let redis = settings.redis().await?;
    let listener = bind(settings.catalog.listen_addr, "FLASHMESH_CATALOG_ADDR").await?;
    let admin = settings.metrics_listener().await?;
    tracing::info!(addr = %listener.local_addr()?, "catalog service listening");
    let telemetry = settings.telemetry("catalog", false, &Metrics::default())?;
    let app = CatalogApp::build(
        &settings.platform,
        settings.catalog,
        redis.as_ref(),
        &telemetry,
    )
    .await?;
    serve_alone(&telemetry, admin, |shutdown| app.serve(listener, shutdown)).await
}

async fn order(settings: Settings) -> anyhow::Result<()> {
    let Some(token_file) = settings.order.token_file.clone() else {
        bail!(
            "FLASHMESH_ORDER_TOKEN_FILE is not set: the order service needs a token to call \
             the catalog (`flashmesh token --service order > FILE`)"
        );
    };
    let redis = settings.redis().await?;
    let listener = bind(settings.order.listen_addr, "FLASHMESH_ORDER_ADDR").await?;
    let admin = settings.metrics_listener().await?;
    tracing::info!(addr = %listener.local_addr()?, "order service listening");
    let token: Arc<dyn ServiceToken> = Arc::new(TokenFile::new(token_file));
    let telemetry = settings.telemetry("order", false, &Metrics::default())?;
    let app = OrderApp::build(
        &settings.platform,
        settings.order,
        redis.as_ref(),
        token,
        &telemetry,
    )
    .await?;
    serve_alone(&telemetry, admin, |shutdown| app.serve(listener, shutdown)).await
}

async fn gateway(settings: Settings) -> anyhow::Result<()> {
    let redis = settings.redis().await?;
    let listener = bind(settings.gateway.listen_addr, "FLASHMESH_GATEWAY_ADDR").await?;
    let admin = settings.metrics_listener().await?;
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let telemetry = settings.telemetry("gateway", false, &Metrics::default())?;
    let app = GatewayApp::build(
        &settings.platform,
        settings.gateway,
        redis.as_ref(),
        &telemetry,
    )
    .await?;
    serve_alone(&telemetry, admin, |shutdown| app.serve(listener, shutdown)).await
}

async fn admin(settings: Settings, email: &str, display_name: &str) -> anyhow::Result<()> {
    let redis = settings.redis().await?;
    let quiet = Telemetry::disabled("admin");
    let app = AuthApp::build(&settings.platform, settings.auth, redis.as_ref(), &quiet).await?;
    if app.service.promote_to_admin(email).await? {
        println!("{email} is now an admin");
        return Ok(());
    }
    let password = read_password()?;
    let user = app
        .service
        .create_user(email, &password, display_name, Role::Admin)
        .await?;
    println!("created admin {} ({})", user.email, user.id);
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("password for the new admin: ")
            .context("cannot read the password");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn bind(addr: std::net::SocketAddr, var: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({var})"))
}
