//! The `flashmesh` binary as users run it, driven by the clients they use:
//! grpcurl, a Python grpcio client, buf.

use std::time::Duration;

use crate::common::{
    Backend, StackEnv, configuration_variables, create_admin, flashmesh, repo_root, tools,
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

on_both_backends!(
    up_serves_auth_to_grpcurl,
    grpcurl_creates_a_deal_and_watches_it,
    python_client_uses_the_contracts,
    grpcurl_places_an_order_through_up,
    admin_command_creates_and_promotes_admins,
);

/// `flashmesh up`, running until dropped or stopped.
struct Stack {
    child: Child,
    auth_addr: String,
    catalog_addr: String,
    order_addr: String,
    /// The admin listener's `/metrics` URL.
    metrics_url: String,
}

impl Stack {
    async fn up(stack: &StackEnv) -> Self {
        let mut child = flashmesh(stack, &["up"])
            .spawn()
            .expect("spawn flashmesh up");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (auth_addr, catalog_addr, order_addr, metrics_url) =
            tokio::time::timeout(Duration::from_secs(30), async {
                let (mut auth, mut catalog, mut order) = (None, None, None);
                while let Some(line) = lines.next_line().await.expect("read stdout") {
                    let line = line.trim();
                    if let Some(addr) = line.strip_prefix("auth     grpc://") {
                        auth = Some(addr.to_owned());
                    }
                    if let Some(addr) = line.strip_prefix("catalog  grpc://") {
                        catalog = Some(addr.to_owned());
                    }
                    if let Some(addr) = line.strip_prefix("order    grpc://") {
                        order = Some(addr.to_owned());
                    }
                    if let Some(url) = line.strip_prefix("metrics  ") {
                        return (
                            auth.expect("auth is printed first"),
                            catalog.expect("catalog is printed before order"),
                            order.expect("order is printed before metrics"),
                            url.to_owned(),
                        );
                    }
                }
                panic!("flashmesh up exited without printing the service addresses");
            })
            .await
            .expect("flashmesh up starts within 30 s");
        // Keep reading so the child never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            auth_addr,
            catalog_addr,
            order_addr,
            metrics_url,
        }
    }

    /// SIGTERM, then the exit status must be success (a graceful drain).
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().await;
        assert!(killed.expect("kill").success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stops within 30 s of SIGTERM")
            .expect("wait");
        assert!(status.success(), "flashmesh up exited with {status}");
    }
}

/// Runs grpcurl; returns (success, stdout + stderr).
async fn grpcurl(args: &[&str]) -> (bool, String) {
    let output = Command::new(tools().join("grpcurl"))
        .args(args)
        .output()
        .await
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Calls `method` on `addr` with grpcurl, with an optional JSON body and an
/// optional `authorization` metadata line (sent on the call only, not on
/// the reflection requests).
async fn invoke(
    addr: &str,
    method: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> (bool, String) {
    let mut args = vec!["-plaintext"];
    if let Some(auth) = auth {
        args.extend(["-rpc-header", auth]);
    }
    if let Some(body) = body {
        args.extend(["-d", body]);
    }
    args.extend([addr, method]);
    grpcurl(&args).await
}

async fn invoke_json(addr: &str, method: &str, body: Option<&str>, auth: Option<&str>) -> Value {
    let (ok, text) = invoke(addr, method, body, auth).await;
    assert!(ok, "grpcurl {method} failed: {text}");
    parse_json(&text)
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("grpcurl printed non-JSON ({e}): {text}"))
}

async fn up_serves_auth_to_grpcurl(backend: Backend) {
    let env = StackEnv::new(backend).await;
    let stack = Stack::up(&env).await;
    let addr = stack.auth_addr.as_str();

    let (ok, listed) = grpcurl(&["-plaintext", addr, "list"]).await;
    assert!(ok, "{listed}");
    let services: Vec<_> = listed.lines().collect();
    assert_eq!(
        services,
        [
            "flashmesh.auth.v1.AuthService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    );

    let health = invoke_json(addr, "grpc.health.v1.Health/Check", None, None).await;
    assert_eq!(health["status"], "SERVING");

    let email = crate::common::unique_email();
    let credentials =
        serde_json::json!({"email": email, "password": crate::common::PASSWORD}).to_string();
    let signed_up = invoke_json(
        addr,
        "flashmesh.auth.v1.AuthService/SignUp",
        Some(&credentials),
        None,
    )
    .await;
    assert_eq!(signed_up["user"]["email"], email.as_str());
    let logged_in = invoke_json(
        addr,
        "flashmesh.auth.v1.AuthService/Login",
        Some(&credentials),
        None,
    )
    .await;
    let access = logged_in["tokens"]["accessToken"]
        .as_str()
        .expect("access token");
    let me = invoke_json(
        addr,
        "flashmesh.auth.v1.AuthService/GetMe",
        None,
        Some(&format!("authorization: Bearer {access}")),
    )
    .await;
    assert_eq!(me["user"]["id"], signed_up["user"]["id"]);

    let tampered = format!("{access}x");
    let (ok, rejected) = invoke(
        addr,
        "flashmesh.auth.v1.AuthService/GetMe",
        None,
        Some(&format!("authorization: Bearer {tampered}")),
    )
    .await;
    assert!(!ok);
    assert!(rejected.contains("Code: Unauthenticated"), "{rejected}");
    assert!(
        rejected.contains("\"reason\":\"TOKEN_INVALID\""),
        "{rejected}"
    );

    // Refresh rotates; presenting the spent token again is reuse.
    let first = logged_in["tokens"]["refreshToken"]
        .as_str()
        .expect("refresh token");
    let refresh_body = serde_json::json!({"refresh_token": first}).to_string();
    let rotated = invoke_json(
        addr,
        "flashmesh.auth.v1.AuthService/Refresh",
        Some(&refresh_body),
        None,
    )
    .await;
    assert_ne!(rotated["tokens"]["refreshToken"].as_str(), Some(first));
    let (ok, reused) = invoke(
        addr,
        "flashmesh.auth.v1.AuthService/Refresh",
        Some(&refresh_body),
        None,
    )
    .await;
    assert!(!ok);
    assert!(
        reused.contains("\"reason\":\"REFRESH_TOKEN_REUSED\""),
        "{reused}"
    );
    let second =
        serde_json::json!({"refresh_token": rotated["tokens"]["refreshToken"]}).to_string();
    let (ok, revoked) = invoke(
        addr,
        "flashmesh.auth.v1.AuthService/Refresh",
        Some(&second),
        None,
    )
    .await;
    assert!(!ok, "the family is revoked after reuse: {revoked}");

    let (ok, described) = grpcurl(&[
        "-plaintext",
        addr,
        "describe",
        "flashmesh.auth.v1.AuthService",
    ])
    .await;
    assert!(ok && described.contains("rpc GetJwks"), "{described}");
    stack.stop().await;
}

/// The `authorization` metadata line for whoever `credentials` log in.
async fn bearer(stack: &Stack, credentials: &str) -> String {
    let login = invoke_json(
        &stack.auth_addr,
        "flashmesh.auth.v1.AuthService/Login",
        Some(credentials),
        None,
    )
    .await;
    format!(
        "authorization: Bearer {}",
        login["tokens"]["accessToken"].as_str().expect("token")
    )
}

/// Creates a product and an active deal ending in `ends_in` seconds, as an
/// admin with grpcurl; returns the CreateDeal answer.
async fn create_deal_with_grpcurl(catalog: &str, bearer: &str, ends_in: i64) -> Value {
    let product = invoke_json(
        catalog,
        "flashmesh.catalog.v1.CatalogService/CreateProduct",
        Some(r#"{"name":"Mechanical keyboard","price_cents":12900}"#),
        Some(bearer),
    )
    .await;
    let at = |offset: i64| {
        (chrono::Utc::now() + chrono::Duration::seconds(offset))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let deal_request = serde_json::json!({
        "product_id": product["product"]["id"],
        "price_cents": 9900,
        "stock": 50,
        "per_user_limit": 2,
        "starts_at": at(-1),
        "ends_at": at(ends_in),
    });
    invoke_json(
        catalog,
        "flashmesh.catalog.v1.CatalogService/CreateDeal",
        Some(&deal_request.to_string()),
        Some(bearer),
    )
    .await
}

async fn grpcurl_creates_a_deal_and_watches_it(backend: Backend) {
    let env = StackEnv::new(backend).await;
    let (_, admin) = create_admin(&env).await;
    let stack = Stack::up(&env).await;
    let bearer = bearer(&stack, &admin).await;
    let catalog = stack.catalog_addr.as_str();
    let deal = create_deal_with_grpcurl(catalog, &bearer, 3).await;
    assert_eq!(deal["deal"]["state"], "DEAL_STATE_ACTIVE");
    assert_eq!(deal["deal"]["remainingStock"], 50);

    // The stream ends by itself once the deal ends, and grpcurl with it.
    let watch = serde_json::json!({"id": deal["deal"]["id"]}).to_string();
    let (ok, events) = tokio::time::timeout(
        Duration::from_secs(20),
        invoke(
            catalog,
            "flashmesh.catalog.v1.CatalogService/WatchDeal",
            Some(&watch),
            None,
        ),
    )
    .await
    .expect("WatchDeal ends when the deal ends");
    assert!(ok, "{events}");
    assert!(events.contains("DEAL_EVENT_TYPE_SNAPSHOT"), "{events}");
    assert!(events.contains("DEAL_STATE_ENDED"), "{events}");
    stack.stop().await;
}

async fn python_client_uses_the_contracts(backend: Backend) {
    let env = StackEnv::new(backend).await;
    let stack = Stack::up(&env).await;
    let output = Command::new(tools().join("python"))
        .arg(repo_root().join("tests/python/auth_client.py"))
        .arg(&stack.auth_addr)
        .arg(repo_root().join("proto"))
        .output()
        .await
        .expect("run python");
    assert!(
        output.status.success(),
        "python client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    stack.stop().await;
}

async fn admin_command_creates_and_promotes_admins(backend: Backend) {
    let env = StackEnv::new(backend).await;
    let (_, credentials) = create_admin(&env).await;
    let stack = Stack::up(&env).await;
    let logged_in = invoke_json(
        &stack.auth_addr,
        "flashmesh.auth.v1.AuthService/Login",
        Some(&credentials),
        None,
    )
    .await;
    assert_eq!(logged_in["user"]["role"], "ROLE_ADMIN");

    let user = crate::common::unique_email();
    let user_credentials =
        serde_json::json!({"email": user, "password": crate::common::PASSWORD}).to_string();
    let signed_up = invoke_json(
        &stack.auth_addr,
        "flashmesh.auth.v1.AuthService/SignUp",
        Some(&user_credentials),
        None,
    )
    .await;
    assert_eq!(signed_up["user"]["role"], "ROLE_USER");
    let promoted = flashmesh(&env, &["admin", "--email", &user])
        .output()
        .await
        .expect("promote");
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    let relogged = invoke_json(
        &stack.auth_addr,
        "flashmesh.auth.v1.AuthService/Login",
        Some(&user_credentials),
        None,
    )
    .await;
    assert_eq!(relogged["user"]["role"], "ROLE_ADMIN");
    stack.stop().await;
}

#[tokio::test]
async fn bad_configuration_fails_start_up_naming_the_variable() {
    let env = StackEnv::new(Backend::Embedded).await;
    let token_file = env.data_dir.path().join("order.token");
    std::fs::write(&token_file, "not-checked-at-start-up").unwrap();
    let token_file = token_file.display().to_string();
    for (command, var, value) in [
        ("auth", "FLASHMESH_REQUEST_TIMEOUT", "soon"),
        ("auth", "FLASHMESH_AUTH_ADDR", "localhost"),
        ("auth", "FLASHMESH_ARGON2_ITERATIONS", "0"),
        ("auth", "DATABASE_MAX_CONNECTIONS", "many"),
        ("order", "FLASHMESH_CLAIM_LEASE", "10s"),
        ("order", "FLASHMESH_CATALOG_RETRIES", "11"),
        ("order", "FLASHMESH_CATALOG_URL", "not a url"),
        ("order", "FLASHMESH_ORDER_TOKEN_FILE", ""),
        ("order", "FLASHMESH_SWEEP_INTERVAL", "0s"),
        ("catalog", "FLASHMESH_WARM_INTERVAL", "0ms"),
        ("gateway", "FLASHMESH_SSE_HEARTBEAT", "0s"),
        ("gateway", "FLASHMESH_DNS_REFRESH", "0s"),
        ("gateway", "FLASHMESH_RATE_LIMIT_ROUTES", "PlaceOrder=1/s"),
    ] {
        let output = flashmesh(&env, &[command])
            .env("FLASHMESH_ORDER_TOKEN_FILE", &token_file)
            .env(var, value)
            .output()
            .await
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{var}={value} was accepted");
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
}

#[tokio::test]
async fn migrate_creates_each_service_schema_in_postgres() {
    let env = StackEnv::new(Backend::Postgres).await;
    // As the Kubernetes Job runs it: with the services' configuration but
    // without the signing key mounted, which migrating does not need.
    let output = flashmesh(&env, &["migrate"])
        .env("FLASHMESH_JWT_SIGNING_KEY_FILE", "/nonexistent/signing.pem")
        .output()
        .await
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let url = &env.database.as_ref().expect("postgres").url;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    for (schema, expected) in [
        ("auth", &["_sqlx_migrations", "refresh_tokens", "users"][..]),
        (
            "catalog",
            &[
                "_sqlx_migrations",
                "deal_holdings",
                "deals",
                "products",
                "reservations",
            ],
        ),
        (
            "order_service",
            &[
                "_sqlx_migrations",
                "consumed_events",
                "dead_letters",
                "deal_sales",
                "idempotency_keys",
                "order_items",
                "order_status",
                "orders",
                "outbox",
                "stock_releases",
            ],
        ),
    ] {
        let tables: Vec<(String,)> = sqlx::query_as(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = $1 ORDER BY table_name",
        )
        .bind(schema)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let tables: Vec<_> = tables.into_iter().map(|(t,)| t).collect();
        assert_eq!(tables, expected, "{schema}");
    }
}

#[test]
fn contracts_pass_buf_lint_and_build() {
    for args in [
        &["lint"][..],
        &["build", "-o", "/dev/null"],
        &["format", "--diff", "--exit-code"],
    ] {
        let output = std::process::Command::new(tools().join("buf"))
            .args(args)
            .current_dir(repo_root())
            .output()
            .expect("run buf");
        assert!(
            output.status.success(),
            "buf {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn readme_documents_every_configuration_variable() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let missing: Vec<_> = configuration_variables()
        .into_iter()
        .filter(|var| !readme.contains(&format!("`{var}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not document {missing:?}"
    );
}

async fn grpcurl_places_an_order_through_up(backend: Backend) {
    let env = StackEnv::new(backend).await;
    let (_, admin) = create_admin(&env).await;
    let stack = Stack::up(&env).await;
    let admin = bearer(&stack, &admin).await;
    let deal = create_deal_with_grpcurl(&stack.catalog_addr, &admin, 3600).await;
    let deal_id = deal["deal"]["id"].as_str().expect("deal id");
    let order_addr = stack.order_addr.as_str();

    let (ok, listed) = grpcurl(&["-plaintext", order_addr, "list"]).await;
    assert!(
        ok && listed.contains("flashmesh.order.v1.OrderService"),
        "{listed}"
    );

    let email = crate::common::unique_email();
    let credentials =
        serde_json::json!({"email": email, "password": crate::common::PASSWORD}).to_string();
    invoke_json(
        &stack.auth_addr,
        "flashmesh.auth.v1.AuthService/SignUp",
        Some(&credentials),
        None,
    )
    .await;
    let buyer = bearer(&stack, &credentials).await;
    let request = serde_json::json!({
        "deal_id": deal_id, "quantity": 2, "idempotency_key": "checkout-1"
    })
    .to_string();
    let placed = invoke_json(
        order_addr,
        "flashmesh.order.v1.OrderService/PlaceOrder",
        Some(&request),
        Some(&buyer),
    )
    .await;
    assert_eq!(placed["order"]["state"], "ORDER_STATE_CONFIRMED");
    assert_eq!(placed["order"]["totalCents"], "19800");
    let replayed = invoke_json(
        order_addr,
        "flashmesh.order.v1.OrderService/PlaceOrder",
        Some(&request),
        Some(&buyer),
    )
    .await;
    assert_eq!(replayed["order"]["id"], placed["order"]["id"]);

    let listed = invoke_json(
        order_addr,
        "flashmesh.order.v1.OrderService/ListOrders",
        None,
        Some(&buyer),
    )
    .await;
    assert_eq!(listed["orders"].as_array().map(Vec::len), Some(1));

    let (ok, refused) = invoke(
        order_addr,
        "flashmesh.order.v1.OrderService/PlaceOrder",
        Some(&serde_json::json!({"deal_id": deal_id, "quantity": 1, "idempotency_key": "checkout-2"}).to_string()),
        Some(&buyer),
    )
    .await;
    assert!(!ok);
    assert!(refused.contains("Code: FailedPrecondition"), "{refused}");
    assert!(
        refused.contains("\"reason\":\"LIMIT_EXCEEDED\""),
        "{refused}"
    );

    // The sales counter catches up with the order event.
    let sales_request = serde_json::json!({ "deal_id": deal_id }).to_string();
    let started = std::time::Instant::now();
    loop {
        let sales = invoke_json(
            order_addr,
            "flashmesh.order.v1.OrderService/GetDealSales",
            Some(&sales_request),
            Some(&admin),
        )
        .await;
        if sales["sales"]["unitsSold"] == "2" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "sales counted: {sales}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One admin listener serves every service's metrics.
    let metrics = reqwest::get(&stack.metrics_url)
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    for sample in [
        r#"flashmesh_rpc_server_requests_total{rpc="flashmesh.order.v1.OrderService/PlaceOrder",code="OK"} 2"#,
        r#"flashmesh_rpc_server_requests_total{rpc="flashmesh.order.v1.OrderService/PlaceOrder",code="FAILED_PRECONDITION"} 1"#,
        r#"flashmesh_rpc_server_requests_total{rpc="flashmesh.catalog.v1.CatalogService/CreateDeal",code="OK"} 1"#,
    ] {
        assert!(metrics.contains(sample), "{sample} in {metrics}");
    }
    stack.stop().await;
}
