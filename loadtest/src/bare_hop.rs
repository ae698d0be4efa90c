//! A bare REST → gRPC pass-through built for the gateway bench: an axum
//! server with two routes (`GET /deals/{id}` → CatalogService.GetDeal,
//! `GET /me` → AuthService.GetMe with the caller's `authorization` header)
//! and a few fields of the answer as JSON. No JWT check, no rate limits, no
//! transcoding: the floor a gateway hop can cost.
//!
//! It runs inside the loadtest process but on a runtime of its own whose
//! threads are all named [`THREAD_NAME`], so its CPU time can be read apart
//! from the bench's clients (see [`threads_cpu_ticks`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::get,
};
use flashmesh_proto::{
    auth::v1::{GetMeRequest, auth_service_client::AuthServiceClient},
    catalog::v1::{GetDealRequest, catalog_service_client::CatalogServiceClient},
};
use serde_json::{Value, json};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};

/// Name of every thread of the hop's runtime (at most 15 bytes: the kernel
/// truncates `comm`).
pub const THREAD_NAME: &str = "bare-hop";

/// The running hop; dropping it stops it.
pub struct BareHop {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for BareHop {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[derive(Clone)]
struct Upstreams {
    catalog: Vec<CatalogServiceClient<Channel>>,
    auth: Vec<AuthServiceClient<Channel>>,
    next: Arc<AtomicUsize>,
}

impl Upstreams {
    fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// Starts the hop on `threads` worker threads, with `channels` HTTP/2
/// connections to each upstream (the gateway keeps one per upstream).
pub async fn start(
    catalog_addr: &str,
    auth_addr: &str,
    threads: usize,
    channels: usize,
) -> anyhow::Result<BareHop> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(THREAD_NAME)
        .enable_all()
        .build()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (catalog_url, auth_url) = (
        format!("http://{catalog_addr}"),
        format!("http://{auth_addr}"),
    );
    // Connect on the hop's runtime so the connections' tasks run there.
    let upstreams = runtime
        .spawn(async move {
            let mut upstreams = Upstreams {
                catalog: Vec::new(),
                auth: Vec::new(),
                next: Arc::new(AtomicUsize::new(0)),
            };
            for _ in 0..channels.max(1) {
                let channel = Channel::from_shared(catalog_url.clone())?.connect().await?;
                upstreams.catalog.push(CatalogServiceClient::new(channel));
                let channel = Channel::from_shared(auth_url.clone())?.connect().await?;
                upstreams.auth.push(AuthServiceClient::new(channel));
            }
            anyhow::Ok(upstreams)
        })
        .await?
        .context("bare hop connecting to the services")?;
    let app = Router::new()
        .route("/deals/{id}", get(get_deal))
        .route("/me", get(get_me))
        .with_state(upstreams);
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    });
    Ok(BareHop {
        addr,
        runtime: Some(runtime),
    })
}

fn bad_gateway(status: &tonic::Status) -> (StatusCode, String) {
    (StatusCode::BAD_GATEWAY, status.message().to_owned())
}

async fn get_deal(
    State(upstreams): State<Upstreams>,
    Path(id): Path<String>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let mut client = upstreams.catalog[upstreams.pick() % upstreams.catalog.len()].clone();
    let deal = client
        .get_deal(GetDealRequest { id })
        .await
        .map_err(|s| bad_gateway(&s))?
        .into_inner()
        .deal
        .unwrap_or_default();
    Ok(Json(json!({
        "id": deal.id,
        "productId": deal.product_id,
        "priceCents": deal.price_cents.to_string(),
        "stock": deal.stock,
        "remainingStock": deal.remaining_stock,
    })))
}

async fn get_me(
    State(upstreams): State<Upstreams>,
    headers: HeaderMap,
) -> Result<Json<Value>, (StatusCode, String)> {
    let mut client = upstreams.auth[upstreams.pick() % upstreams.auth.len()].clone();
    let mut request = Request::new(GetMeRequest {});
    if let Some(value) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<MetadataValue<Ascii>>().ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    let user = client
        .get_me(request)
        .await
        .map_err(|s| bad_gateway(&s))?
        .into_inner()
        .user
        .unwrap_or_default();
    Ok(Json(json!({
        "id": user.id,
        "email": user.email,
        "displayName": user.display_name,
        "role": user.role,
    })))
}

/// utime + stime, in clock ticks, of this process's threads named
/// [`THREAD_NAME`] (live threads only; the hop's never exit while it runs).
pub fn threads_cpu_ticks() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter(|stat| {
            stat.split_once('(')
                .and_then(|(_, rest)| rest.rsplit_once(')'))
                .is_some_and(|(comm, _)| comm == THREAD_NAME)
        })
        .filter_map(|stat| crate::procfs::stat_cpu_ticks(&stat))
        .sum()
}
