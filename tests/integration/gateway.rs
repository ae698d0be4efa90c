//! The edge gateway over HTTP/1.1 with a real HTTP client, in front of the
//! real services.

use std::time::{Duration, Instant};

use crate::common::{
    Backend, GatewayReplica, OrderStack, StackEnv, bad_tokens, http, json_of, now_ms, problem,
    rfc3339, sign_up_and_login,
};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    a_buyer_goes_from_signup_to_order_over_http,
    bad_requests_get_problem_json_and_never_reach_upstream,
);

/// Auth, catalog, order and the gateway in front of them.
pub async fn gateway_stack(env: &mut StackEnv) -> (OrderStack, GatewayReplica) {
    env.set("FLASHMESH_CONCURRENCY_LIMIT", "10000");
    let stack = env.start_orders().await;
    let gateway = env.start_gateway(&stack).await;
    (stack, gateway)
}

/// The gateway stack with an open deal of 10 units, at most 2 per buyer.
pub async fn gateway_with_open_deal(
    env: &mut StackEnv,
) -> (
    OrderStack,
    GatewayReplica,
    flashmesh_proto::catalog::v1::Deal,
) {
    let (stack, gateway) = gateway_stack(env).await;
    let mut catalog = stack.catalog.catalog_client().await;
    let deal = crate::common::create_deal(
        &mut catalog,
        &stack.catalog.admin_token,
        10,
        2,
        crate::common::open_window(),
    )
    .await;
    (stack, gateway, deal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_is_answered_while_connections_are_recycled() {
    // Every service sends GOAWAY on each connection after 100 ms, dozens of
    // times during the run: calls queued on a closing connection must go
    // out again on a new one, not come back as CANCELLED (which the edge
    // would show as 499, "client closed request").
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_MAX_CONNECTION_AGE", "100ms")
        .set("FLASHMESH_RATE_LIMIT_IP", "1000000/s:1000000")
        .set("FLASHMESH_RATE_LIMIT_USER", "1000000/s:1000000");
    let (stack, gateway) = gateway_stack(&mut env).await;
    let mut catalog = stack.catalog.catalog_client().await;
    let deal = crate::common::create_deal(
        &mut catalog,
        &stack.catalog.admin_token,
        100_000,
        100_000,
        crate::common::open_window(),
    )
    .await;
    let http = http();
    const BUYERS: usize = 24;
    const ORDERS_EACH: usize = 64;
    let tokens = futures::future::join_all((0..BUYERS).map(|_| sign_up_and_login(&http, &gateway)))
        .await
        .into_iter()
        .map(|tokens| tokens["access_token"].as_str().unwrap().to_owned());
    let buyers = tokens.map(|token| {
        let (http, url, deal_id) = (http.clone(), gateway.url("/v1/orders"), deal.id.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..ORDERS_EACH {
                let answer = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                    .json(&json!({"deal_id": deal_id, "quantity": 1}))
                    .send()
                    .await
                    .unwrap();
                if answer.status() != StatusCode::OK {
                    failures.push(format!(
                        "{}: {}",
                        answer.status(),
                        answer.text().await.unwrap()
                    ));
                }
            }
            failures
        })
    });
    let failures: Vec<String> = futures::future::join_all(buyers)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} orders failed, e.g. {:?}",
        failures.len(),
        BUYERS * ORDERS_EACH,
        failures.first()
    );
    // Every order answered is one sold, counted once.
    let placed = (BUYERS * ORDERS_EACH) as i64;
    let started = Instant::now();
    let mut sales = crate::order::deal_sales(&stack, &deal.id).await;
    while sales.units_sold < placed && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sales = crate::order::deal_sales(&stack, &deal.id).await;
    }
    assert_eq!((sales.units_sold, sales.orders_confirmed), (placed, placed));
}

async fn a_buyer_goes_from_signup_to_order_over_http(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    let (stack, gateway) = gateway_stack(&mut env).await;
    buyer_journey(&stack, &gateway).await;
}

/// Signup, login, refresh rotation, an admin's product and deal, buyers
/// racing for it while an SSE client watches, SOLD_OUT as 409 problem+json,
/// and an idempotent replay: everything through the gateway.
pub async fn buyer_journey(stack: &OrderStack, gateway: &GatewayReplica) {
    let http = http();

    // Refresh rotation; presenting a spent refresh token revokes the family.
    let tokens = sign_up_and_login(&http, gateway).await;
    let first = tokens["refresh_token"].as_str().unwrap().to_owned();
    let (status, _, rotated) = json_of(
        http.post(gateway.url("/v1/auth/refresh"))
            .json(&json!({"refresh_token": first}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let second = rotated["tokens"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let reuse = http
        .post(gateway.url("/v1/auth/refresh"))
        .json(&json!({"refresh_token": first}))
        .send()
        .await
        .unwrap();
    problem(reuse, StatusCode::UNAUTHORIZED, "REFRESH_TOKEN_REUSED").await;
    let revoked = http
        .post(gateway.url("/v1/auth/refresh"))
        .json(&json!({"refresh_token": second}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);

    // An admin creates a product and a three-unit deal.
    let admin = &stack.catalog.admin_token;
    let (status, _, product) = json_of(
        http.post(gateway.url("/v1/products"))
            .bearer_auth(admin)
            .json(&json!({"name": "Mechanical keyboard", "price_cents": "12900"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{product}");
    let (status, _, deal) = json_of(
        http.post(gateway.url("/v1/deals"))
            .bearer_auth(admin)
            .json(&json!({
                "product_id": product["product"]["id"],
                "price_cents": 9900,
                "stock": 3,
                "per_user_limit": 1,
                "starts_at": rfc3339(now_ms() - 1_000),
                "ends_at": rfc3339(now_ms() + 3_600_000),
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{deal}");
    let deal_id = deal["deal"]["id"].as_str().unwrap().to_owned();
    let (status, _, read) = json_of(
        http.get(gateway.url(&format!("/v1/deals/{deal_id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["deal"]["remaining_stock"], 3);
    assert_eq!(read["deal"]["state"], "DEAL_STATE_ACTIVE");

    // A watcher follows the stock over SSE while four buyers race for it.
    let events = http
        .get(gateway.url(&format!("/v1/deals/{deal_id}/events")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let watcher = tokio::spawn(async move {
        let mut body = events.bytes_stream();
        let mut buffer = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data: ")
                        && let Ok(value) = serde_json::from_str::<Value>(data)
                    {
                        let _ = seen_tx.send(value);
                    }
                }
            }
        }
    });

    let mut buyers = Vec::new();
    for _ in 0..4 {
        buyers.push(
            sign_up_and_login(&http, gateway).await["access_token"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut orders = Vec::new();
    let mut sold_out = 0;
    for (n, token) in buyers.iter().enumerate() {
        let response = http
            .post(gateway.url("/v1/orders"))
            .bearer_auth(token)
            .header("idempotency-key", format!("checkout-{n}"))
            .json(&json!({"deal_id": deal_id, "quantity": 1}))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::CONFLICT {
            let body = problem(response, StatusCode::CONFLICT, "SOLD_OUT").await;
            assert_eq!(body["metadata"]["remainingStock"], "0", "{body}");
            sold_out += 1;
        } else {
            let (status, _, order) = json_of(response).await;
            assert_eq!(status, StatusCode::OK, "{order}");
            assert_eq!(order["order"]["state"], "ORDER_STATE_CONFIRMED");
            orders.push((
                token.clone(),
                n,
                order["order"]["id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!((orders.len(), sold_out), (3, 1));

    // The same Idempotency-Key replays the same order.
    let (token, n, id) = &orders[0];
    let (status, _, replay) = json_of(
        http.post(gateway.url("/v1/orders"))
            .bearer_auth(token)
            .header("idempotency-key", format!("checkout-{n}"))
            .json(&json!({"deal_id": deal_id, "quantity": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["order"]["id"], id.as_str());
    let (status, _, listed) = json_of(
        http.get(gateway.url("/v1/orders"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["orders"].as_array().map(Vec::len), Some(1));

    // The watcher saw the stock fall to zero.
    let started = Instant::now();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
            .await
            .expect("SSE events arrive")
            .expect("the stream stays open");
        if event["event"]["remaining_stock"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    watcher.abort();

    let anonymous = http.get(gateway.url("/v1/orders")).send().await.unwrap();
    assert!(anonymous.headers().contains_key("www-authenticate"));
    problem(anonymous, StatusCode::UNAUTHORIZED, "TOKEN_MISSING").await;
}

async fn bad_requests_get_problem_json_and_never_reach_upstream(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    let (stack, gateway) = gateway_stack(&mut env).await;
    let http = http();
    let tokens = sign_up_and_login(&http, &gateway).await;
    let valid = tokens["access_token"].as_str().unwrap().to_owned();
    let (status, _, me) = json_of(
        http.get(gateway.url("/v1/me"))
            .bearer_auth(&valid)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    let user_id = me["user"]["id"].as_str().unwrap().to_owned();

    // Every kind of bad token is refused at the edge: no upstream call.
    let before = gateway.gateway.upstream_calls();
    for bad in bad_tokens(&env, &valid, &user_id) {
        let response = http
            .get(gateway.url("/v1/me"))
            .bearer_auth(&bad.token)
            .send()
            .await
            .unwrap();
        let header = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(header.starts_with("Bearer"), "{}: {header}", bad.case);
        let body = problem(response, StatusCode::UNAUTHORIZED, bad.reason).await;
        assert!(body["detail"].is_string(), "{}", bad.case);
    }
    let basic = http
        .get(gateway.url("/v1/me"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    problem(basic, StatusCode::UNAUTHORIZED, "TOKEN_INVALID").await;
    assert_eq!(
        gateway.gateway.upstream_calls(),
        before,
        "no bad token reached a service"
    );

    let missing = http
        .get(gateway.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    problem(missing, StatusCode::NOT_FOUND, "ROUTE_NOT_FOUND").await;
    let wrong_method = http
        .delete(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .send()
        .await
        .unwrap();
    let allow = wrong_method.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    problem(
        wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
    )
    .await;
    let text = http
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .header("content-type", "text/plain")
        .body("deal please")
        .send()
        .await
        .unwrap();
    problem(
        text,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;
    let malformed = http
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .header("content-type", "application/json")
        .body("{\"deal_id\": ")
        .send()
        .await
        .unwrap();
    problem(malformed, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let unknown_field = http
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .json(&json!({"deal_id": "x", "quantity": 1, "idempotency_key": "k", "coupon": "FREE"}))
        .send()
        .await
        .unwrap();
    let body = problem(unknown_field, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    assert!(
        body["errors"][0]["field"]
            .as_str()
            .unwrap_or_default()
            .contains("coupon")
            || body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("coupon"),
        "{body}"
    );
    let too_big = http
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .json(&json!({"idempotency_key": "k".repeat(100_000)}))
        .send()
        .await
        .unwrap();
    problem(too_big, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;

    // A service's own field violations come through as problem errors.
    let invalid = http
        .post(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .json(&json!({"deal_id": "not-a-uuid", "quantity": 0, "idempotency_key": "k"}))
        .send()
        .await
        .unwrap();
    let body = problem(invalid, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["deal_id", "quantity"]);

    // An upstream that is gone answers 503 at once, not a hang.
    let started = Instant::now();
    drop(stack);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone = http
        .get(gateway.url("/v1/orders"))
        .bearer_auth(&valid)
        .send()
        .await
        .unwrap();
    problem(
        gone,
        StatusCode::SERVICE_UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_headers_per_client() {
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_RATE_LIMIT_IP", "1/s:5");
    let (_stack, gateway) = gateway_stack(&mut env).await;
    let http = http();
    let mut allowed = 0;
    let mut limited = 0;
    for _ in 0..12 {
        let response = http.get(gateway.url("/v1/deals")).send().await.unwrap();
        assert!(response.headers().contains_key("ratelimit-limit"));
        assert!(response.headers().contains_key("ratelimit-remaining"));
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry_after), "{retry_after}");
            problem(response, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED").await;
            limited += 1;
        } else {
            assert_eq!(response.status(), StatusCode::OK);
            allowed += 1;
        }
    }
    // The burst, plus at most one refill while the loop ran.
    assert!((5..=6).contains(&allowed), "{allowed} allowed");
    assert_eq!(allowed + limited, 12);
}

/// Counts OK and 429 answers of `n` calls to `path` (as `bearer` if given).
async fn allowed_of(
    http: &reqwest::Client,
    gateway: &GatewayReplica,
    path: &str,
    bearer: Option<&str>,
    n: usize,
) -> usize {
    let mut allowed = 0;
    for _ in 0..n {
        let mut request = http.get(gateway.url(path));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        match response.status() {
            StatusCode::OK => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                problem(response, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED").await;
            }
            other => panic!("{path}: {other}"),
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_can_have_limits_of_their_own_per_caller() {
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set(
        "FLASHMESH_RATE_LIMIT_ROUTES",
        "flashmesh.catalog.v1.CatalogService/ListDeals=1/s:3,flashmesh.auth.v1.AuthService/GetMe=1/s:2",
    );
    let (_stack, gateway) = gateway_stack(&mut env).await;
    let http = http();

    // Anonymous callers are counted by IP on the limited route only.
    let listed = allowed_of(&http, &gateway, "/v1/deals", None, 10).await;
    assert!((3..=4).contains(&listed), "{listed} ListDeals allowed");
    assert_eq!(
        allowed_of(&http, &gateway, "/v1/products", None, 10).await,
        10
    );

    // Signed-in callers by user: one user's use leaves the other's intact.
    let first = sign_up_and_login(&http, &gateway).await;
    let second = sign_up_and_login(&http, &gateway).await;
    let token = |tokens: &Value| tokens["access_token"].as_str().unwrap().to_owned();
    let first_allowed = allowed_of(&http, &gateway, "/v1/me", Some(&token(&first)), 6).await;
    assert!(
        (2..=3).contains(&first_allowed),
        "{first_allowed} GetMe allowed"
    );
    let second_allowed = allowed_of(&http, &gateway, "/v1/me", Some(&token(&second)), 2).await;
    assert_eq!(second_allowed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_come_as_ndjson_when_asked() {
    let mut env = StackEnv::new(Backend::Embedded).await;
    let (_stack, gateway, deal) = gateway_with_open_deal(&mut env).await;
    let response = http()
        .get(gateway.url(&format!("/v1/deals/{}/events", deal.id)))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.bytes_stream();
    let mut line = Vec::new();
    while !line.contains(&b'\n') {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the snapshot arrives")
            .expect("the stream stays open")
            .unwrap();
        line.extend_from_slice(&chunk);
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap();
    let first: Value = serde_json::from_slice(&line[..end]).unwrap();
    assert_eq!(first["event"]["type"], "DEAL_EVENT_TYPE_SNAPSHOT");
    assert_eq!(first["event"]["remaining_stock"], 10);
}

/// Large answers are compressed for clients that accept it; small ones are
/// not worth it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_compressed_small_ones_are_not() {
    let mut env = StackEnv::new(Backend::Embedded).await;
    let (_stack, gateway, deal) = gateway_with_open_deal(&mut env).await;
    let http = http();
    for (encoding, path, compressed) in [
        ("gzip", "/openapi.json".to_owned(), true),
        ("br", "/openapi.json".to_owned(), true),
        ("gzip", format!("/v1/deals/{}", deal.id), false),
    ] {
        let response = http
            .get(gateway.url(&path))
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let got = response
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        let expected = compressed.then(|| encoding.to_owned());
        assert_eq!(got, expected, "{path} with {encoding}");
    }
}

/// Event streams cost the upstream nothing once their clients leave: every
/// WatchDeal call the gateway made ends with its SSE or NDJSON client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_upstream_when_their_clients_leave() {
    let mut env = StackEnv::new(Backend::Embedded).await;
    let (stack, gateway, deal) = gateway_with_open_deal(&mut env).await;
    let url = gateway.url(&format!("/v1/deals/{}/events", deal.id));
    let mut open = Vec::new();
    for n in 0..200 {
        let accept = if n % 2 == 0 {
            "text/event-stream"
        } else {
            "application/x-ndjson"
        };
        // A client each, so leaving closes its connection.
        let response = http()
            .get(&url)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.bytes_stream();
        tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the snapshot arrives")
            .expect("the stream stays open")
            .unwrap();
        open.push(body);
    }
    let watchers = || stack.catalog.catalog.service.watchers(&deal.id);
    assert_eq!(watchers(), 200);

    open.truncate(50);
    let deadline = Instant::now() + Duration::from_secs(10);
    while watchers() > 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(watchers(), 50, "streams left behind by clients that left");
    drop(open);
    while watchers() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(watchers(), 0);
}

/// schemathesis generates requests from `/openapi.json` (valid and invalid
/// ones) and checks every answer: never a 5xx, always what the document says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_schema_violations() {
    let mut env = StackEnv::new(Backend::Postgres).await;
    env.set("FLASHMESH_RATE_LIMIT_IP", "100000/s:100000")
        .set("FLASHMESH_RATE_LIMIT_USER", "100000/s:100000");
    let (_stack, gateway) = gateway_stack(&mut env).await;
    let tokens = sign_up_and_login(&http(), &gateway).await;
    let token = tokens["access_token"].as_str().unwrap();
    let schema = gateway.url("/openapi.json");
    let output = tokio::process::Command::new(crate::common::tools().join("st"))
        .args(["run", &schema, "--url", &gateway.url("")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance",
        ])
        .args([
            "--max-examples",
            "15",
            "--seed",
            "20261122",
            "--request-timeout",
            "10",
        ])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "schemathesis failed:\n{report}");
    // It really exercised the API: every documented operation, hundreds of cases.
    let operations = gateway.gateway.routes.routes().count();
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "{report}"
    );
    let cases = report
        .lines()
        .find(|line| line.contains(" generated, "))
        .unwrap_or_else(|| panic!("no test-case summary:\n{report}"));
    assert!(
        !cases.contains("failed") && !cases.contains("error"),
        "{report}"
    );
}

/// The Python inventory service of `tests/python`, until dropped.
struct PythonInventory {
    child: std::process::Child,
    url: String,
}

impl PythonInventory {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(crate::common::tools().join("python"))
            .arg(crate::common::repo_root().join("tests/python/inventory_server.py"))
            .arg(crate::common::repo_root().join("proto"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the Python inventory service");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("its stdout"))
            .read_line(&mut line)
            .expect("its port");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a port: {line:?}"));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for PythonInventory {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A service in another language joins by annotating its proto and
/// registering its address: the gateway learns it through server reflection
/// (Python's grpcio offers v1alpha only) and routes, guards and documents it
/// like the compiled-in contracts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_joins_through_server_reflection() {
    let inventory = PythonInventory::start();
    let mut env = StackEnv::new(Backend::Embedded).await;
    let public: Vec<&str> = flashmesh_gateway::config::DEFAULT_PUBLIC_RPCS
        .iter()
        .copied()
        .chain(["acme.inventory.v1.InventoryService/GetStock"])
        .collect();
    env.set("FLASHMESH_GATEWAY_REFLECTION_URLS", inventory.url.as_str())
        .set("FLASHMESH_GATEWAY_PUBLIC_RPCS", public.join(","));
    let (_stack, gateway) = gateway_stack(&mut env).await;
    let http = http();

    // Protected by default: no token, no upstream call.
    let calls = gateway.gateway.upstream_calls();
    let response = http
        .post(gateway.url("/v1/inventory/widget:adjust"))
        .json(&json!({"delta": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(gateway.gateway.upstream_calls(), calls);

    let tokens = sign_up_and_login(&http, &gateway).await;
    let token = tokens["access_token"].as_str().unwrap();
    let (status, _, stock) = json_of(
        http.post(gateway.url("/v1/inventory/widget:adjust"))
            .bearer_auth(token)
            .json(&json!({"delta": "7"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{stock}");
    assert_eq!(stock, json!({"sku": "widget", "units": "7"}));

    // Public by configuration: read without a token.
    let (status, _, stock) = json_of(
        http.get(gateway.url("/v1/inventory/widget"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{stock}");
    assert_eq!(stock["units"], "7");

    // The Python service's own errors come back as problem+json.
    let refused = problem(
        http.post(gateway.url("/v1/inventory/widget:adjust"))
            .bearer_auth(token)
            .json(&json!({"delta": -8}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "FAILED_PRECONDITION",
    )
    .await;
    assert_eq!(refused["detail"], "not enough units", "{refused}");
    problem(
        http.post(gateway.url("/v1/inventory/widget:adjust"))
            .bearer_auth(token)
            .json(&json!({"delta": 1, "colour": "red"}))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
    )
    .await;

    // Documented in the same OpenAPI as the rest.
    let (_, _, openapi) =
        json_of(http.get(gateway.url("/openapi.json")).send().await.unwrap()).await;
    assert!(
        openapi["paths"]["/v1/inventory/{sku}"]["get"].is_object(),
        "{}",
        openapi["paths"]
    );
    assert!(openapi["paths"]["/v1/inventory/{sku}:adjust"]["post"].is_object());
}

/// One port serves HTTP/1.1 and prior-knowledge HTTP/2 (h2c), unary and
/// SSE, and tells them apart even when the first bytes arrive in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_speaks_http1_and_h2c() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut env = StackEnv::new(Backend::Embedded).await;
    let (_stack, gateway, deal) = gateway_with_open_deal(&mut env).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let deal_url = gateway.url(&format!("/v1/deals/{}", deal.id));
    for (client, version) in [
        (http(), reqwest::Version::HTTP_11),
        (h2.clone(), reqwest::Version::HTTP_2),
    ] {
        let response = client.get(&deal_url).send().await.unwrap();
        assert_eq!(response.version(), version);
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["deal"]["id"], deal.id.as_str());
    }
    let events = h2
        .get(gateway.url(&format!("/v1/deals/{}/events", deal.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(events.version(), reqwest::Version::HTTP_2);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(10), events.bytes_stream().next())
        .await
        .expect("the snapshot arrives")
        .expect("the stream stays open")
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));

    // First bytes in two pieces, for each protocol: HTTP/1.1 answers the
    // request, HTTP/2 answers the preface with its SETTINGS frame (type 4).
    let halves: [(&[u8], &[u8]); 2] = [
        (b"GE", b"T /healthz HTTP/1.1\r\nhost: x\r\n\r\n"),
        (
            b"PRI * HTTP/2.0\r\n",
            b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ),
    ];
    for (first, rest) in halves {
        let mut tcp = tokio::net::TcpStream::connect(gateway.running.addr)
            .await
            .unwrap();
        tcp.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tcp.write_all(rest).await.unwrap();
        let mut answer = [0; 12];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        if first.starts_with(b"GE") {
            assert_eq!(&answer, b"HTTP/1.1 200");
        } else {
            assert_eq!(answer[3], 4, "a SETTINGS frame: {answer:?}");
        }
    }
}
