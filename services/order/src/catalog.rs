//! The catalog service as the order service sees it: ReserveStock and
//! ReleaseStock over gRPC, with the order service's own token, a deadline on
//! every call, bounded retries of retry-safe failures, and a circuit breaker
//! so a dead catalog fails fast instead of holding every buyer for a timeout.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use flashmesh_platform::{
    config::Transport,
    metrics::Metrics,
    observe::ClientTraceLayer,
    telemetry::{self, Attribute},
    upstream::{UpstreamSettings, UpstreamUrlError, balanced_channel, system_resolver},
};
use flashmesh_proto::catalog::v1::{
    self as pb, ReleaseStockRequest, ReserveStockRequest,
    catalog_service_client::CatalogServiceClient,
};
use tonic::{Code, Status, body::Body, metadata::MetadataValue};
use tonic_types::StatusExt;
use tower::{ServiceBuilder, util::BoxCloneSyncService};
use tower_resilience_circuitbreaker::{CircuitBreakerError, CircuitBreakerLayer, CircuitState};

use crate::domain::{Refusal, RefusalKind};

/// Marks a status the breaker produced without calling the catalog.
const BREAKER_OPEN: &str = "x-flashmesh-breaker-open";

/// Where the order service's `role=service` token comes from.
pub trait ServiceToken: Send + Sync {
    fn current(&self) -> Result<String, String>;
}

/// A token minted in-process (under `flashmesh up`), re-minted after half
/// its lifetime.
pub struct MintedToken<F> {
    mint: F,
    lifetime: Duration,
    cached: Mutex<Option<(String, Instant)>>,
}

impl<F> MintedToken<F>
where
    F: Fn(Duration) -> Result<String, String> + Send + Sync,
{
    pub fn new(lifetime: Duration, mint: F) -> Self {
        Self {
            mint,
            lifetime,
            cached: Mutex::new(None),
        }
    }
}

impl<F> ServiceToken for MintedToken<F>
where
    F: Fn(Duration) -> Result<String, String> + Send + Sync,
{
    fn current(&self) -> Result<String, String> {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((token, minted)) = cached.as_ref()
            && minted.elapsed() < self.lifetime / 2
        {
            return Ok(token.clone());
        }
        let token = (self.mint)(self.lifetime)?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// A token kept in a file (a mounted Secret renewed by a job), read again
/// whenever the file changes.
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(String, SystemTime)>>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
        }
    }
}

impl ServiceToken for TokenFile {
    fn current(&self) -> Result<String, String> {
        let unreadable = |e: std::io::Error| {
            format!(
                "cannot read FLASHMESH_ORDER_TOKEN_FILE {}: {e}",
                self.path.display()
            )
        };
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(unreadable)?;
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((token, at)) = cached.as_ref()
            && *at == modified
        {
            return Ok(token.clone());
        }
        let token = std::fs::read_to_string(&self.path)
            .map_err(unreadable)?
            .trim()
            .to_owned();
        *cached = Some((token.clone(), modified));
        Ok(token)
    }
}

/// Units the catalog took for a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub unit_price_cents: i64,
}

/// How a catalog call failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogCallError {
    /// The catalog said no; nothing was taken.
    #[error("refused: {}", .0.message)]
    Refused(Refusal),
    /// The breaker is open: the call was never sent.
    #[error("the catalog circuit breaker is open")]
    BreakerOpen,
    /// The call may or may not have taken effect.
    #[error("no answer from the catalog: {0}")]
    NoAnswer(String),
    /// The attempt outlived its claim and was swept; its reservation id can
    /// no longer take stock.
    #[error("the attempt was swept before the catalog answered")]
    Superseded,
    /// The caller's deadline ran out; the call may or may not have taken
    /// effect.
    #[error("the deadline passed")]
    DeadlineExceeded,
    /// An answer the order service never expects (a bad service token, a
    /// reservation id reused).
    #[error("unexpected catalog answer: {0}")]
    Unexpected(Status),
}

/// What a release achieved; every variant means the units are (now) back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Now,
    Already,
    NeverTaken,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogClientError {
    #[error("FLASHMESH_CATALOG_URL: {0}")]
    Url(#[from] UpstreamUrlError),
    #[error("the catalog circuit breaker is misconfigured: {0}")]
    Breaker(#[from] tower_resilience_circuitbreaker::CircuitBreakerConfigError),
}

/// One call's future, boxed so the retry loop stays `Send` for any call.
type CallFuture<Res> = futures::future::BoxFuture<'static, Result<tonic::Response<Res>, Status>>;

type CatalogTransport = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>;

#[derive(Clone)]
pub struct CatalogClient {
    client: CatalogServiceClient<CatalogTransport>,
    token: Arc<dyn ServiceToken>,
    call_timeout: Duration,
    retries: u32,
}

pub struct CatalogClientSettings {
    /// One or more catalog URLs; host names are re-resolved every
    /// `dns_refresh` and calls balanced over every address.
    pub urls: Vec<String>,
    pub dns_refresh: Duration,
    /// `FLASHMESH_TRANSPORT`: gRPC or the HTTP/1.1 JSON baseline.
    pub transport: Transport,
    pub call_timeout: Duration,
    pub retries: u32,
    pub breaker_open_for: Duration,
    /// Where the breaker's state is reported.
    pub metrics: Metrics,
}

impl CatalogClient {
    /// Connects lazily: the catalog may start after the order service.
    pub async fn new(
        settings: &CatalogClientSettings,
        token: Arc<dyn ServiceToken>,
    ) -> Result<Self, CatalogClientError> {
        let channel = balanced_channel(
            &settings.urls,
            &UpstreamSettings {
                connect_timeout: Duration::from_secs(1),
                call_timeout: Some(settings.call_timeout),
                refresh: settings.dns_refresh,
                transport: settings.transport,
            },
            system_resolver(),
        )
        .await?
        .channel;
        let state = settings.metrics.gauge_family::<1>(
            "flashmesh_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        );
        let state = state
            .get_or_create(&[("breaker", "catalog".to_owned())])
            .clone();
        let transitions = settings.metrics.counter_family::<2>(
            "flashmesh_circuit_breaker_transitions",
            "Circuit breaker state changes, by the state entered",
        );
        let opened = transitions
            .get_or_create(&[("breaker", "catalog".to_owned()), ("to", "open".to_owned())])
            .clone();
        let half_opened = transitions
            .get_or_create(&[
                ("breaker", "catalog".to_owned()),
                ("to", "half_open".to_owned()),
            ])
            .clone();
        let closed = transitions
            .get_or_create(&[
                ("breaker", "catalog".to_owned()),
                ("to", "closed".to_owned()),
            ])
            .clone();
        // Transport errors (refused connections, timeouts) and UNAVAILABLE /
        // DEADLINE_EXCEEDED answers count as failures; refusals such as
        // SOLD_OUT are the catalog working.
        let breaker = CircuitBreakerLayer::builder()
            .name("catalog")
            .failure_rate_threshold(0.5)
            .sliding_window_size(20)
            .minimum_number_of_calls(5)
            .wait_duration_in_open(settings.breaker_open_for)
            .permitted_calls_in_half_open(1)
            .on_state_transition(move |from, to| {
                let (value, counter, name) = match to {
                    CircuitState::Closed => (0, &closed, "closed"),
                    CircuitState::HalfOpen => (1, &half_opened, "half_open"),
                    CircuitState::Open => (2, &opened, "open"),
                };
                state.set(value);
                counter.inc();
                tracing::warn!(breaker = "catalog", from = ?from, to = name, "circuit breaker state changed");
                // On the span of the call whose outcome moved it.
                telemetry::event("circuit_breaker.state_change", || {
                    vec![
                        Attribute::new("breaker", "catalog"),
                        Attribute::new("breaker.state", name),
                    ]
                });
            })
            .failure_classifier(
                |result: &Result<http::Response<Body>, Status>| match result {
                    Err(_) => true,
                    Ok(response) => matches!(
                        response.headers().get("grpc-status").map(|v| v.as_bytes()),
                        Some(b"14" | b"4")
                    ),
                },
            )
            .build()?;
        let transport = ServiceBuilder::new()
            .layer(ClientTraceLayer)
            .map_err(breaker_status)
            .layer(breaker)
            .service(channel);
        Ok(Self {
            client: CatalogServiceClient::new(BoxCloneSyncService::new(transport)),
            token,
            call_timeout: settings.call_timeout,
            retries: settings.retries,
        })
    }

    /// Takes `quantity` units of `deal_id` for `user_id` under
    /// `reservation_id`, retrying what is safe to retry (the call is
    /// idempotent on the id) until `deadline`.
    pub async fn reserve(
        &self,
        deal_id: &str,
        user_id: &str,
        quantity: i32,
        reservation_id: &str,
        deadline: Instant,
    ) -> Result<Reserved, CatalogCallError> {
        let request = ReserveStockRequest {
            deal_id: deal_id.to_owned(),
            user_id: user_id.to_owned(),
            quantity,
            reservation_id: reservation_id.to_owned(),
        };
        let response = self
            .with_retries(
                deadline,
                |mut client, request| Box::pin(async move { client.reserve_stock(request).await }),
                request,
            )
            .await?;
        let reservation = response.reservation.ok_or_else(|| {
            CatalogCallError::Unexpected(Status::internal("ReserveStock answered no reservation"))
        })?;
        Ok(Reserved {
            unit_price_cents: reservation.unit_price_cents,
        })
    }

    /// Gives a reservation's units back (or makes sure the id can never take
    /// any). Safe to repeat.
    pub async fn release(
        &self,
        reservation_id: &str,
        deadline: Instant,
    ) -> Result<Released, CatalogCallError> {
        let request = ReleaseStockRequest {
            reservation_id: reservation_id.to_owned(),
        };
        let response = self
            .with_retries(
                deadline,
                |mut client, request| Box::pin(async move { client.release_stock(request).await }),
                request,
            )
            .await?;
        Ok(match response.outcome() {
            pb::ReleaseOutcome::Released => Released::Now,
            pb::ReleaseOutcome::AlreadyReleased => Released::Already,
            _ => Released::NeverTaken,
        })
    }

    /// The product a deal sells (deals never change product).
    pub async fn product_of(
        &self,
        deal_id: &str,
        deadline: Instant,
    ) -> Result<String, CatalogCallError> {
        let request = pb::GetDealRequest {
            id: deal_id.to_owned(),
        };
        let response = self
            .with_retries(
                deadline,
                |mut client, request| Box::pin(async move { client.get_deal(request).await }),
                request,
            )
            .await?;
        response
            .deal
            .and_then(|deal| deal.product.map(|p| p.id))
            .ok_or_else(|| {
                CatalogCallError::Unexpected(Status::internal("GetDeal answered no product"))
            })
    }

    async fn with_retries<Req, Res, F>(
        &self,
        deadline: Instant,
        call: F,
        message: Req,
    ) -> Result<Res, CatalogCallError>
    where
        Req: Clone,
        F: Fn(CatalogServiceClient<CatalogTransport>, tonic::Request<Req>) -> CallFuture<Res>,
    {
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(CatalogCallError::DeadlineExceeded);
            }
            let timeout = remaining.min(self.call_timeout);
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(timeout);
            let token = self.token.current().map_err(|e| {
                CatalogCallError::Unexpected(Status::unauthenticated(format!(
                    "no service token for the catalog: {e}"
                )))
            })?;
            let bearer = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                CatalogCallError::Unexpected(Status::unauthenticated(
                    "the service token is not a valid header value",
                ))
            })?;
            request.metadata_mut().insert("authorization", bearer);
            let outcome = tokio::time::timeout(timeout, call(self.client.clone(), request)).await;
            let status = match outcome {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) if Instant::now() >= deadline => {
                    return Err(CatalogCallError::DeadlineExceeded);
                }
                Err(_) => Status::deadline_exceeded("the catalog did not answer in time"),
            };
            let error = classify(status);
            let retryable = matches!(error, CatalogCallError::NoAnswer(_));
            attempt += 1;
            if !retryable || attempt > self.retries || Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff *= 2;
        }
    }
}

/// Sorts a catalog status into what the saga must do about it.
fn classify(status: Status) -> CatalogCallError {
    if status.metadata().get(BREAKER_OPEN).is_some() {
        return CatalogCallError::BreakerOpen;
    }
    match status.code() {
        // ABORTED: the catalog saw this reservation id contended; a retry
        // with the same id is safe.
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted => CatalogCallError::NoAnswer(status.message().to_owned()),
        Code::NotFound | Code::FailedPrecondition => {
            let details = status.get_error_details();
            let Some(info) = details.error_info() else {
                return CatalogCallError::Unexpected(status);
            };
            match RefusalKind::from_reason(&info.reason) {
                Some(kind) => CatalogCallError::Refused(Refusal {
                    kind,
                    message: status.message().to_owned(),
                    metadata: info.metadata.clone().into_iter().collect(),
                }),
                // The sweeper released this attempt's id after its lease ran
                // out: the attempt is over, the key free for a retry.
                None if info.reason == "RESERVATION_RELEASED" => CatalogCallError::Superseded,
                None => CatalogCallError::Unexpected(status),
            }
        }
        _ => CatalogCallError::Unexpected(status),
    }
}

/// The breaker's refusal as a status the client can recognise; transport
/// errors arrive mapped already (connection refused → UNAVAILABLE).
fn breaker_status(error: CircuitBreakerError<Status>) -> Status {
    match error {
        CircuitBreakerError::OpenCircuit => {
            let mut status = Status::unavailable("the catalog circuit breaker is open");
            status
                .metadata_mut()
                .insert(BREAKER_OPEN, MetadataValue::from_static("1"));
            status
        }
        CircuitBreakerError::Inner(status) => status,
    }
}

fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::random_range(0.5..1.5))
}
