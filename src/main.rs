//! `flashmesh`: one binary for every service.
//!
//! `flashmesh up` runs the whole stack in one process (each service on its own
//! loopback port, talking real gRPC); `flashmesh auth` runs one service alone,
//! as a Kubernetes Deployment does.

use std::{
    io::{BufRead, IsTerminal, Write},
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
    config::{Env, PlatformConfig},
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
async fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    let settings = Settings::from_env()?;
    match cli.command {
        Command::Up => up(settings).await,
        Command::Auth => auth(settings).await,
        Command::Catalog => catalog(settings).await,
        Command::Order => order(settings).await,
        Command::Gateway => gateway(settings).await,
        Command::Migrate => {
            // Building a service runs its migrations.
            let quiet = Telemetry::disabled("migrate");
            AuthApp::build(&settings.platform, settings.auth, None, &quiet).await?;
            CatalogApp::build(&settings.platform, settings.catalog, None, &quiet).await?;
            OrderApp::migrate(&settings.platform).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Admin {
            email,
            display_name,
        } => admin(settings, &email, &display_name).await,
        Command::Token { service, ttl } => {
            let quiet = Telemetry::disabled("token");
            let app = AuthApp::build(&settings.platform, settings.auth, None, &quiet).await?;
            println!("{}", app.service.issue_service_token(&service, ttl)?);
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            let flashmesh_auth::config::KeyLocation::Generated { dir } = &settings.auth.keys else {
                bail!(
                    "FLASHMESH_JWT_SIGNING_KEY_FILE is set: rotate by deploying a new key file \
                     and moving the old one to FLASHMESH_JWT_PREVIOUS_KEY_FILE"
                );
            };
            let kid = flashmesh_auth::keys::rotate(dir)?;
            println!("new signing key {kid}; restart the auth service to use it");
            Ok(())
        }
    }
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
        let addr = match upstream.service {
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
    let banner = format!(
        "flashmesh is up ({store}; {mode})\n  gateway  http://{gateway_addr}\n  auth     grpc://{auth_addr}\n  catalog  grpc://{catalog_addr}\n  order    grpc://{order_addr}\n  metrics  http://{metrics_addr}/metrics\n\n\
         Try:\n  curl -s 'http://{gateway_addr}/v1/deals?states=DEAL_STATE_ACTIVE'\n  \
         grpcurl -plaintext {auth_addr} list\n  \
         grpcurl -plaintext -d '{{\"email\":\"ada@example.com\",\"password\":\"correct horse\"}}' \
         {auth_addr} flashmesh.auth.v1.AuthService/SignUp\n  \
         grpcurl -plaintext {catalog_addr} flashmesh.catalog.v1.CatalogService/ListDeals"
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
