//! Test helpers: spawn real services on random loopback ports over real
//! storage, and talk to them as clients would.
//!
//! Two backends: `Embedded` (a SQLite file in a temp dir, in-process limits)
//! and `Postgres` (a fresh PostgreSQL database per test plus Redis under a
//! per-test key prefix). PostgreSQL and Redis come from `DATABASE_URL` and
//! `REDIS_URL`, defaulting to the local servers; when they are unreachable the
//! test fails, it never skips.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
};

use flashmesh_auth::{
    AuthApp,
    config::{AuthConfig, KeyLocation},
    keys::SigningKeys,
};
use flashmesh_catalog::{CatalogApp, config::CatalogConfig, service::CatalogService};
use flashmesh_order::{
    OrderApp,
    catalog::{MintedToken, ServiceToken},
    config::OrderConfig,
    service::OrderService,
};
use flashmesh_platform::time::timestamp_from_millis;
use flashmesh_platform::{
    config::{Env, PlatformConfig},
    identity::{AccessClaims, Role},
    metrics::Metrics,
    redis::RedisHandle,
    telemetry::Telemetry,
};
use flashmesh_proto::{
    auth::v1::{LoginRequest, SignUpRequest, TokenPair, auth_service_client::AuthServiceClient},
    catalog::v1::{self as catalog_pb, catalog_service_client::CatalogServiceClient},
    order::v1::order_service_client::OrderServiceClient,
};
use sqlx::{Connection, Executor, PgConnection};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Status, transport::Channel};
use tonic_types::StatusExt;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Postgres,
}

/// Generates one test per backend for each `async fn(Backend)`, and after
/// `; with warnings:` for each `async fn(Backend, Warnings)` (see
/// [`with_warnings`]).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)? $(; with warnings: $($logged:ident),* $(,)?)?) => {
        mod embedded {
            backend_tests!(Embedded; $($name),*; $($($logged),*)?);
        }
        mod postgres {
            backend_tests!(Postgres; $($name),*; $($($logged),*)?);
        }
    };
}

macro_rules! backend_tests {
    ($backend:ident; $($name:ident),*; $($logged:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($crate::common::Backend::$backend).await
            }
        )*
        $(
            #[test]
            fn $logged() {
                $crate::common::with_warnings(|warnings| {
                    super::$logged($crate::common::Backend::$backend, warnings)
                })
            }
        )*
    };
}

/// What the services of one test logged at WARN and above, one line per
/// event ("WARN target: message").
#[derive(Clone, Default)]
pub struct Warnings(Arc<Mutex<Vec<u8>>>);

impl Warnings {
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().expect("warnings"))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Warnings {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("warnings").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Warnings {
    type Writer = Warnings;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Runs `test` on a runtime of its own (two workers, as `#[tokio::test]`s
/// here) every thread of which logs its warnings to the [`Warnings`] handed
/// to `test`: the services' logs, unmixed with those of tests running beside
/// it.
pub fn with_warnings<F>(test: impl FnOnce(Warnings) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let warnings = Warnings::default();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .without_time()
            .with_writer(warnings.clone())
            .finish(),
    );
    let on_worker = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        // The default lasts as long as the thread, which ends with the
        // runtime: no guard to keep.
        .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&on_worker)))
        .build()
        .expect("a runtime");
    let _on_test_thread = tracing::dispatcher::set_default(&dispatch);
    runtime.block_on(test(warnings));
}

/// A PostgreSQL database that exists for one test.
pub struct TestDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let name = format!("flashmesh_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is unreachable at {admin_url} (DATABASE_URL): {e}")
        });
        admin
            .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
            .await
            .expect("create the test database");
        let mut url = url::Url::parse(&admin_url).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            url: url.to_string(),
            admin_url,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside async context; a short-lived runtime on its own
        // thread does the cleanup.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = admin
                        .execute(
                            format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str(),
                        )
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// The configuration a test stack runs with: cheap argon2 so tests are fast,
/// a temp data dir, and for `Postgres` a fresh database and Redis prefix.
pub struct StackEnv {
    pub env: Env,
    pub data_dir: tempfile::TempDir,
    pub database: Option<TestDatabase>,
    /// The stack's one registry, as under `flashmesh up`.
    pub metrics: Metrics,
    /// Every service's telemetry, to flush spans.
    telemetries: Mutex<Vec<Telemetry>>,
}

impl StackEnv {
    pub async fn new(backend: Backend) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut env = Env::from_pairs([
            ("FLASHMESH_DATA_DIR", data_dir.path().display().to_string()),
            ("FLASHMESH_ARGON2_MEMORY_KIB", "256".to_owned()),
            ("FLASHMESH_ARGON2_ITERATIONS", "1".to_owned()),
            ("DATABASE_MAX_CONNECTIONS", "5".to_owned()),
        ]);
        let database = match backend {
            Backend::Embedded => None,
            Backend::Postgres => {
                let database = TestDatabase::create().await;
                env.set("DATABASE_URL", &database.url);
                env.set("REDIS_URL", redis_url());
                env.set(
                    "FLASHMESH_REDIS_KEY_PREFIX",
                    format!("flashmesh-test:{}:", uuid::Uuid::new_v4().simple()),
                );
                Some(database)
            }
        };
        Self {
            env,
            data_dir,
            database,
            metrics: Metrics::default(),
            telemetries: Mutex::new(Vec::new()),
        }
    }

    /// The telemetry of service `part`, as `flashmesh up` makes it.
    pub fn telemetry(&self, part: &str) -> Telemetry {
        let config = &self.platform().telemetry;
        let telemetry = Telemetry::new(config, config.service_name(part, true), &self.metrics)
            .expect("telemetry");
        self.telemetries
            .lock()
            .expect("telemetries")
            .push(telemetry.clone());
        telemetry
    }

    /// Exports every finished span now (on the blocking pool: a flush
    /// waits for the exporter, which runs on this runtime).
    pub async fn flush_spans(&self) {
        let telemetries = self.telemetries.lock().expect("telemetries").clone();
        tokio::task::spawn_blocking(move || {
            for telemetry in telemetries {
                telemetry.flush();
            }
        })
        .await
        .expect("flush");
    }

    pub fn set(&mut self, var: &str, value: impl Into<String>) -> &mut Self {
        self.env.set(var, value);
        self
    }

    /// The configuration as environment variables, for a child process.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.vars()
    }

    /// This test's Redis key prefix (Postgres backend).
    pub fn redis_prefix(&self) -> String {
        self.env
            .raw("FLASHMESH_REDIS_KEY_PREFIX")
            .expect("the postgres backend sets a prefix")
            .to_owned()
    }

    pub fn key_dir(&self) -> PathBuf {
        self.data_dir.path().join("auth-keys")
    }

    pub fn platform(&self) -> PlatformConfig {
        PlatformConfig::from_env(&self.env).expect("platform config")
    }

    async fn redis(&self, platform: &PlatformConfig) -> Option<RedisHandle> {
        match &platform.redis_url {
            Some(url) => Some(
                RedisHandle::connect(url, &platform.redis_key_prefix)
                    .await
                    .unwrap_or_else(|e| panic!("Redis is unreachable at {url} (REDIS_URL): {e}")),
            ),
            None => None,
        }
    }

    async fn auth_app(&self) -> AuthApp {
        let platform = self.platform();
        let config = AuthConfig::from_env(&self.env, &platform.data_dir).expect("auth config");
        let redis = self.redis(&platform).await;
        AuthApp::build(&platform, config, redis.as_ref(), &self.telemetry("auth"))
            .await
            .expect("auth service starts")
    }

    /// Builds and starts the auth service on a random port.
    pub async fn start_auth(&self) -> RunningService {
        let app = self.auth_app().await;
        serve(|listener, shutdown| app.serve(listener, shutdown)).await
    }

    /// Starts auth and catalog, with an admin and the order service's token.
    pub async fn start_catalog(&mut self) -> CatalogStack {
        let auth_app = self.auth_app().await;
        let accounts = auth_app.service.clone();
        let auth = serve(|listener, shutdown| auth_app.serve(listener, shutdown)).await;
        self.set("FLASHMESH_AUTH_URL", auth.endpoint());
        let catalog = self.start_catalog_replica().await;
        let admin_email = unique_email();
        accounts
            .create_user(&admin_email, PASSWORD, "", Role::Admin)
            .await
            .expect("create admin");
        let (_, admin) = accounts
            .login(&admin_email, PASSWORD)
            .await
            .expect("admin login");
        let order_token = accounts
            .issue_service_token("order", std::time::Duration::from_secs(3600))
            .expect("service token");
        CatalogStack {
            auth,
            catalog,
            admin_token: admin.access_token,
            order_token,
        }
    }

    /// Another catalog replica on this stack's storage.
    pub async fn start_catalog_replica(&self) -> CatalogReplica {
        self.start_catalog_replica_on("127.0.0.1:0").await
    }

    /// A catalog replica on `addr` (e.g. where a stopped one served).
    pub async fn start_catalog_replica_on(&self, addr: &str) -> CatalogReplica {
        let platform = self.platform();
        let config = CatalogConfig::from_env(&self.env).expect("catalog config");
        let redis = self.redis(&platform).await;
        let app = CatalogApp::build(
            &platform,
            config,
            redis.as_ref(),
            &self.telemetry("catalog"),
        )
        .await
        .expect("catalog service starts");
        let service = app.service.clone();
        let running = serve_on(addr, |listener, shutdown| app.serve(listener, shutdown)).await;
        CatalogReplica { running, service }
    }

    /// Starts auth, catalog and order.
    pub async fn start_orders(&mut self) -> OrderStack {
        let catalog = self.start_catalog().await;
        self.set("FLASHMESH_CATALOG_URL", catalog.catalog.running.endpoint());
        let order = self.start_order_replica(&catalog.order_token).await;
        OrderStack { catalog, order }
    }

    /// The gateway in front of `stack`'s services.
    pub async fn start_gateway(&mut self, stack: &OrderStack) -> GatewayReplica {
        self.set("FLASHMESH_AUTH_URL", stack.catalog.auth.endpoint());
        // By name, so the gateway's DNS resolution is on the path.
        self.set(
            "FLASHMESH_CATALOG_URL",
            format!(
                "http://localhost:{}",
                stack.catalog.catalog.running.addr.port()
            ),
        );
        self.set("FLASHMESH_ORDER_URL", stack.order.running.endpoint());
        let platform = self.platform();
        let config =
            flashmesh_gateway::config::GatewayConfig::from_env(&self.env, &platform.auth_url)
                .expect("gateway config");
        let redis = self.redis(&platform).await;
        let app = flashmesh_gateway::GatewayApp::build(
            &platform,
            config,
            redis.as_ref(),
            &self.telemetry("gateway"),
        )
        .await
        .expect("gateway starts");
        let gateway = app.gateway();
        let running = serve(|listener, shutdown| app.serve(listener, shutdown)).await;
        GatewayReplica { running, gateway }
    }

    /// An order replica on this stack's storage, calling the catalog at
    /// `FLASHMESH_CATALOG_URL` with `order_token`.
    pub async fn start_order_replica(&self, order_token: &str) -> OrderReplica {
        let platform = self.platform();
        let config = OrderConfig::from_env(&self.env, &platform.server).expect("order config");
        let redis = self.redis(&platform).await;
        let order_token = order_token.to_owned();
        let token: Arc<dyn ServiceToken> = Arc::new(MintedToken::new(
            std::time::Duration::from_secs(3600),
            move |_| Ok(order_token.clone()),
        ));
        let app = OrderApp::build(
            &platform,
            config,
            redis.as_ref(),
            token,
            &self.telemetry("order"),
        )
        .await
        .expect("order service starts");
        let service = app.service.clone();
        let running = serve(|listener, shutdown| app.serve(listener, shutdown)).await;
        OrderReplica { running, service }
    }
}

/// Serves on a random loopback port.
async fn serve<F, Fut, E>(start: F) -> RunningService
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    serve_on("127.0.0.1:0", start).await
}

async fn serve_on<F, Fut, E>(addr: &str, start: F) -> RunningService
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let served = start(listener, shutdown.clone());
    let task = tokio::spawn(async move { served.await.map_err(|e| e.to_string()) });
    RunningService {
        addr,
        shutdown,
        task: Some(task),
    }
}

/// A catalog replica and its service, for reading its counters.
pub struct CatalogReplica {
    pub running: RunningService,
    pub service: Arc<CatalogService>,
}

/// Auth plus catalog, with tokens for an admin and the order service.
pub struct CatalogStack {
    pub auth: RunningService,
    pub catalog: CatalogReplica,
    pub admin_token: String,
    pub order_token: String,
}

impl CatalogStack {
    pub async fn catalog_client(&self) -> CatalogServiceClient<Channel> {
        CatalogServiceClient::new(self.catalog.running.channel().await)
    }
}

pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

pub async fn create_product(
    client: &mut CatalogServiceClient<Channel>,
    admin: &str,
) -> catalog_pb::Product {
    client
        .create_product(with_bearer(
            catalog_pb::CreateProductRequest {
                name: "Espresso machine".into(),
                description: "Makes coffee.".into(),
                image_url: Some("https://cdn.example.com/espresso.png".into()),
                price_cents: 49_900,
            },
            admin,
        ))
        .await
        .expect("create product")
        .into_inner()
        .product
        .expect("product")
}

pub async fn create_deal(
    client: &mut CatalogServiceClient<Channel>,
    admin: &str,
    stock: i32,
    per_user_limit: i32,
    window: (i64, i64),
) -> catalog_pb::Deal {
    let product = create_product(client, admin).await;
    client
        .create_deal(with_bearer(
            catalog_pb::CreateDealRequest {
                product_id: product.id,
                price_cents: 19_900,
                stock,
                per_user_limit,
                starts_at: Some(timestamp_from_millis(window.0)),
                ends_at: Some(timestamp_from_millis(window.1)),
            },
            admin,
        ))
        .await
        .expect("create deal")
        .into_inner()
        .deal
        .expect("deal")
}

pub fn open_window() -> (i64, i64) {
    (now_ms() - 1_000, now_ms() + 3_600_000)
}

/// The gateway in front of an order stack, and its counters.
pub struct GatewayReplica {
    pub running: RunningService,
    pub gateway: Arc<flashmesh_gateway::app::Gateway>,
}

impl GatewayReplica {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.addr)
    }
}

/// An order replica and its service, for reading its storage.
pub struct OrderReplica {
    pub running: RunningService,
    pub service: Arc<OrderService>,
}

impl OrderReplica {
    pub async fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.running.channel().await)
    }
}

/// Auth, catalog and order.
pub struct OrderStack {
    pub catalog: CatalogStack,
    pub order: OrderReplica,
}

/// A service serving on a loopback port; stopped when dropped.
pub struct RunningService {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl RunningService {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn auth_client(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel().await)
    }

    /// Shuts down gracefully and waits for the server to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A unique email for this test.
pub fn unique_email() -> String {
    format!("user-{}@example.com", uuid::Uuid::new_v4().simple())
}

pub const PASSWORD: &str = "correct horse battery";

/// Signs up a fresh user and returns its email and tokens.
pub async fn sign_up(client: &mut AuthServiceClient<Channel>) -> (String, TokenPair) {
    let email = unique_email();
    let response = client
        .sign_up(SignUpRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .expect("sign up")
        .into_inner();
    (email, response.tokens.expect("tokens"))
}

pub async fn login(
    client: &mut AuthServiceClient<Channel>,
    email: &str,
    password: &str,
) -> Result<TokenPair, Status> {
    let response = client
        .login(LoginRequest {
            email: email.into(),
            password: password.into(),
        })
        .await?;
    Ok(response.into_inner().tokens.expect("tokens"))
}

/// `request` with `authorization: Bearer <token>`.
pub fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// The `google.rpc.ErrorInfo` reason of a status (empty when absent).
pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// The fields named by a status's `google.rpc.BadRequest`.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The `flashmesh` binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_flashmesh");

/// `flashmesh <args>` with the test stack's configuration and nothing
/// inherited that could point it elsewhere.
pub fn flashmesh(stack: &StackEnv, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BINARY);
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .env("FLASHMESH_AUTH_ADDR", "127.0.0.1:0")
        .env("FLASHMESH_CATALOG_ADDR", "127.0.0.1:0")
        .env("FLASHMESH_ORDER_ADDR", "127.0.0.1:0")
        .env("FLASHMESH_GATEWAY_ADDR", "127.0.0.1:0")
        .env("FLASHMESH_METRICS_ADDR", "127.0.0.1:0")
        .envs(stack.vars())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The password of the admins `create_admin` makes.
pub const ADMIN_PASSWORD: &str = "admin password 1";

/// Creates an admin with `flashmesh admin`, as an operator does; returns its
/// email and its credentials as a Login request body.
pub async fn create_admin(env: &StackEnv) -> (String, String) {
    use tokio::io::AsyncWriteExt;
    let email = unique_email();
    let mut admin = flashmesh(env, &["admin", "--email", &email])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn admin");
    let mut stdin = admin.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())
        .await
        .expect("write the password");
    drop(stdin);
    let output = admin.wait_with_output().await.expect("admin finishes");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let credentials = serde_json::json!({"email": email, "password": ADMIN_PASSWORD}).to_string();
    (email, credentials)
}

/// The pinned outside tools (scripts/requirements-tools.txt), installed once per test
/// binary by `scripts/tools`. Returns the directory holding them.
pub fn tools() -> &'static PathBuf {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = repo_root().join("scripts/tools");
        let output = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "scripts/tools failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every environment variable the deployed code reads, found in its
/// sources (the binary, the platform, the services, the gateway; not tests):
/// each quoted `FLASHMESH_*`, `DATABASE_*`, `REDIS_*` or `OTEL_*` name, as
/// the `Env` readers take them, and `RUST_LOG` where tracing's
/// `EnvFilter::from_default_env` reads it.
pub fn configuration_variables() -> BTreeSet<String> {
    let mut variables = BTreeSet::new();
    for dir in ["src", "crates", "services", "gateway"] {
        for file in rust_sources(&repo_root().join(dir)) {
            let code = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            // Unit tests sit at the end of a file, after this marker.
            let code = code
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            variables.extend(quoted_variables(code));
            if code.contains("from_default_env") {
                variables.insert("RUST_LOG".to_owned());
            }
        }
    }
    variables
}

fn rust_sources(dir: &std::path::Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Quoted variable names in `code`: a whole string literal of upper-case
/// letters, digits and underscores with a configuration prefix.
fn quoted_variables(code: &str) -> impl Iterator<Item = String> + '_ {
    code.split('"').skip(1).step_by(2).filter_map(|literal| {
        let configuration = ["FLASHMESH_", "DATABASE_", "REDIS_", "OTEL_"]
            .iter()
            .any(|prefix| literal.starts_with(prefix))
            && literal
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        configuration.then(|| literal.to_owned())
    })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Valid admin claims for `user_id`, to vary one at a time.
pub fn claims(user_id: &str) -> AccessClaims {
    let now = now_secs();
    AccessClaims {
        iss: "flashmesh-auth".into(),
        aud: "flashmesh".into(),
        sub: user_id.into(),
        exp: now + 600,
        iat: now,
        nbf: now,
        jti: "test".into(),
        role: Role::Admin,
    }
}

pub fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token that must be refused, why, and the ErrorInfo reason expected.
pub struct BadToken {
    pub case: &'static str,
    pub token: String,
    pub reason: &'static str,
}

/// Every way a token can be wrong, built from `valid` (a real access token
/// of `user_id`) and the stack's own signing key, so each differs from a
/// good token in one respect only.
pub fn bad_tokens(env: &StackEnv, valid: &str, user_id: &str) -> Vec<BadToken> {
    use hmac::Mac;
    let real_key = SigningKeys::load(&KeyLocation::Generated { dir: env.key_dir() })
        .expect("the stack's signing key");
    let other_dir = tempfile::tempdir().expect("temp dir");
    let forged_key = SigningKeys::load(&KeyLocation::Generated {
        dir: other_dir.path().to_owned(),
    })
    .expect("another key");

    let mut tampered = valid.to_owned();
    let last = tampered.pop().expect("a token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let (header, rest) = valid.split_once('.').expect("a JWT");
    let (_, signature) = rest.rsplit_once('.').expect("a JWT");
    let escalated = base64_url(&serde_json::to_vec(&claims(user_id)).expect("json")); // role: admin
    let payload_swapped = format!("{header}.{escalated}.{signature}");
    let alg_none = format!(
        "{}.{escalated}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#)
    );
    // HS256 keyed with the public key: the classic algorithm confusion.
    let public_key = real_key.jwks()[0].x.clone();
    let hs_header = base64_url(
        format!(
            r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#,
            real_key.kid()
        )
        .as_bytes(),
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(public_key.as_bytes()).expect("hmac");
    mac.update(format!("{hs_header}.{escalated}").as_bytes());
    let hs256 = format!(
        "{hs_header}.{escalated}.{}",
        base64_url(&mac.finalize().into_bytes())
    );
    let unknown_kid = {
        let header = base64_url(br#"{"alg":"EdDSA","typ":"JWT","kid":"no-such-key"}"#);
        format!("{header}.{escalated}.{signature}")
    };
    let sign = |claims: AccessClaims| real_key.sign(&claims).expect("sign");
    let now = now_secs();
    vec![
        BadToken {
            case: "tampered signature",
            token: tampered,
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "swapped payload",
            token: payload_swapped,
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "alg none",
            token: alg_none,
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "HS256 keyed with the public key",
            token: hs256,
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "unknown kid",
            token: unknown_kid,
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "wrong audience",
            token: sign(AccessClaims {
                aud: "someone-else".into(),
                ..claims(user_id)
            }),
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "wrong issuer",
            token: sign(AccessClaims {
                iss: "evil".into(),
                ..claims(user_id)
            }),
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "expired",
            token: sign(AccessClaims {
                exp: now - 3600,
                iat: now - 7200,
                nbf: now - 7200,
                ..claims(user_id)
            }),
            reason: "TOKEN_EXPIRED",
        },
        BadToken {
            case: "not yet valid",
            token: sign(AccessClaims {
                nbf: now + 3600,
                ..claims(user_id)
            }),
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "signed by another key",
            token: forged_key.sign(&claims(user_id)).expect("sign"),
            reason: "TOKEN_INVALID",
        },
        BadToken {
            case: "garbage",
            token: "not.a.jwt".into(),
            reason: "TOKEN_INVALID",
        },
    ]
}

/// A span as an OTLP collector received it; ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    pub attributes: std::collections::HashMap<String, String>,
}

/// An in-process OTLP/gRPC collector: the TraceService from the
/// OpenTelemetry protos, keeping every span it is sent.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    _stop: tokio_util::sync::DropGuard,
}

#[derive(Clone)]
struct TraceSink(Arc<Mutex<Vec<ReceivedSpan>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute_text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for TraceSink
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        Status,
    > {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| attribute_text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                        .collect(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), attribute_text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
        self.0.lock().expect("spans").extend(received);
        Ok(tonic::Response::new(
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse {
                partial_success: None,
            },
        ))
    }
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
            TraceSink(spans.clone()),
        );
        let stopped = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async move { stopped.cancelled().await },
                ),
        );
        Self {
            addr,
            spans,
            _stop: stop.drop_guard(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans").clone()
    }
}

// ---------------------------------------------------------------------------
// Over HTTP, through the gateway
// ---------------------------------------------------------------------------

/// An HTTP/1.1 client, as outside callers use.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

/// The status, content type and JSON body of `response`.
pub async fn json_of(
    response: reqwest::Response,
) -> (reqwest::StatusCode, String, serde_json::Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.expect("a body");
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    (status, content_type, value)
}

/// Asserts a problem+json answer with `status` and `code`; returns it.
pub async fn problem(
    response: reqwest::Response,
    status: reqwest::StatusCode,
    code: &str,
) -> serde_json::Value {
    let (got, content_type, body) = json_of(response).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["title"].is_string() && body["type"].is_string(),
        "{body}"
    );
    body
}

/// Signs a fresh user up through the gateway and logs in; returns the tokens.
pub async fn sign_up_and_login(
    http: &reqwest::Client,
    gateway: &GatewayReplica,
) -> serde_json::Value {
    let credentials = serde_json::json!({"email": unique_email(), "password": PASSWORD});
    let (status, _, signed_up) = json_of(
        http.post(gateway.url("/v1/auth/signup"))
            .json(&credentials)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{signed_up}");
    let (status, _, logged_in) = json_of(
        http.post(gateway.url("/v1/auth/login"))
            .json(&credentials)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{logged_in}");
    logged_in["tokens"].clone()
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("a time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
