//! The HTTP/1.1 JSON baseline (`FLASHMESH_TRANSPORT=http1-json`): every
//! service serves its RPCs as JSON over plain HTTP/1.1, and every client
//! inside the stack (gateway → services, order → catalog, JWKS) calls them
//! that way. The same journey as over gRPC must hold, and a service called
//! directly keeps its gRPC codes and error details.

use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use reqwest::{StatusCode, Version};
use serde_json::{Value, json};
use tonic_types::StatusExt;

use crate::{
    common::{Backend, StackEnv, http, json_of, now_ms, rfc3339},
    gateway::{buyer_journey, gateway_stack},
};

on_both_backends!(
    the_buyer_journey_runs_over_http1_json,
    services_answer_json_over_http1_with_grpc_errors_intact,
);

fn baseline_env(env: &mut StackEnv) {
    env.set("FLASHMESH_TRANSPORT", "http1-json");
}

async fn the_buyer_journey_runs_over_http1_json(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    baseline_env(&mut env);
    let (stack, gateway) = gateway_stack(&mut env).await;
    // The services really speak HTTP/1.1 JSON, not gRPC.
    let health = http()
        .post(format!(
            "{}/grpc.health.v1.Health/Check",
            stack.order.running.endpoint()
        ))
        .json(&json!({}))
        .send()
        .await
        .expect("the order service answers HTTP/1.1");
    assert_eq!(health.version(), Version::HTTP_11);
    let (status, content_type, body) = json_of(health).await;
    assert_eq!(
        (status, content_type.as_str()),
        (StatusCode::OK, "application/json")
    );
    assert_eq!(body, json!({"status": "SERVING"}));

    buyer_journey(&stack, &gateway).await;
}

/// `POST {base}/{rpc}` with `body`, and optionally an admin's token.
async fn call(base: &str, rpc: &str, body: Value, token: Option<&str>) -> reqwest::Response {
    let request = http().post(format!("{base}/{rpc}")).json(&body);
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    request.send().await.expect("the service answers")
}

const CATALOG: &str = "flashmesh.catalog.v1.CatalogService";

async fn services_answer_json_over_http1_with_grpc_errors_intact(backend: Backend) {
    let mut env = StackEnv::new(backend).await;
    baseline_env(&mut env);
    let stack = env.start_orders().await;
    let catalog = stack.catalog.catalog.running.endpoint();
    let admin = stack.catalog.admin_token.as_str();

    // A gRPC client gets nowhere: the listener is HTTP/1.1 only.
    let mut grpc = tonic_health::pb::health_client::HealthClient::new(
        stack.catalog.catalog.running.channel().await,
    );
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        grpc.check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await
    .expect("the gRPC call ends");
    assert!(refused.is_err(), "{refused:?}");

    // An unknown deal: 404 with the gRPC status in headers and body, and the
    // details a tonic client rebuilds into the same ErrorInfo.
    let missing = call(
        &catalog,
        &format!("{CATALOG}/GetDeal"),
        json!({"id": uuid::Uuid::now_v7().to_string()}),
        None,
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(missing.headers()["grpc-status"], "5");
    let rebuilt = tonic::Status::from_header_map(missing.headers()).expect("a grpc-status");
    assert_eq!(rebuilt.code(), tonic::Code::NotFound);
    assert_eq!(
        rebuilt
            .get_error_details()
            .error_info()
            .map(|info| info.reason.as_str()),
        Some("DEAL_NOT_FOUND")
    );
    let (_, content_type, body) = json_of(missing).await;
    assert_eq!(content_type, "application/json");
    assert_eq!(
        (body["code"].as_i64(), body["status"].as_str()),
        (Some(5), Some("NOT_FOUND"))
    );
    assert_eq!(body["message"], rebuilt.message());
    let details = base64::engine::general_purpose::STANDARD
        .decode(body["details"].as_str().expect("details"))
        .expect("base64 details");
    let from_body = tonic::Status::with_details(tonic::Code::NotFound, "", details.into());
    assert_eq!(
        from_body
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone()),
        Some("DEAL_NOT_FOUND".to_owned())
    );

    // A user's token on an admin RPC: PERMISSION_DENIED keeps its reason.
    let denied = call(
        &catalog,
        &format!("{CATALOG}/CreateProduct"),
        json!({"name": "Kettle", "price_cents": "2500"}),
        Some(&stack.catalog.order_token),
    )
    .await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let denied = tonic::Status::from_header_map(denied.headers()).expect("a grpc-status");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        denied
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone()),
        Some("ADMIN_REQUIRED".to_owned())
    );

    // A body that is not the request message: INVALID_ARGUMENT, nothing run.
    let malformed = call(
        &catalog,
        &format!("{CATALOG}/GetDeal"),
        json!({"nope": 1}),
        None,
    )
    .await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(malformed.headers()["grpc-status"], "3");

    // An admin's writes, then the deal's event stream as NDJSON.
    let (status, _, product) = json_of(
        call(
            &catalog,
            &format!("{CATALOG}/CreateProduct"),
            json!({"name": "Kettle", "price_cents": "2500"}),
            Some(admin),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{product}");
    let (status, _, deal) = json_of(
        call(
            &catalog,
            &format!("{CATALOG}/CreateDeal"),
            json!({
                "product_id": product["product"]["id"],
                "price_cents": 1500,
                "stock": 5,
                "per_user_limit": 2,
                "starts_at": rfc3339(now_ms() - 1_000),
                "ends_at": rfc3339(now_ms() + 3_600_000),
            }),
            Some(admin),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{deal}");
    assert_eq!(deal["deal"]["remaining_stock"], 5);
    let watch = call(
        &catalog,
        &format!("{CATALOG}/WatchDeal"),
        json!({"id": deal["deal"]["id"]}),
        None,
    )
    .await;
    assert_eq!(watch.status(), StatusCode::OK);
    assert_eq!(watch.headers()["content-type"], "application/x-ndjson");
    let mut lines = watch.bytes_stream();
    let mut buffer = Vec::new();
    let first: Value = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let chunk = lines.next().await.expect("a line").expect("a chunk");
            buffer.extend_from_slice(&chunk);
            if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                return serde_json::from_slice(&buffer[..end]).expect("a JSON line");
            }
        }
    })
    .await
    .expect("the stream answers");
    assert!(first["result"].is_object(), "{first}");

    let unknown = call(
        &catalog,
        &format!("{CATALOG}/WatchDeal"),
        json!({"id": uuid::Uuid::now_v7().to_string()}),
        None,
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers()["grpc-status"], "5");

    // No such RPC.
    let nowhere = call(&catalog, &format!("{CATALOG}/Nothing"), json!({}), None).await;
    assert_eq!(nowhere.status(), StatusCode::NOT_IMPLEMENTED);
}
