//! The gateway's HTTP face: one fallback handler routes every request by the
//! contracts' annotations, checks the token and the rate limits, transcodes
//! JSON to the RPC's message, calls the upstream over its HTTP/2 channel, and
//! answers JSON, SSE, NDJSON or problem+json.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use flashmesh_platform::{
    call::parse_grpc_timeout,
    config::Transport,
    identity::TokenError,
    telemetry,
    upstream::{
        BalancedChannel, UpstreamSettings, UpstreamUrlError, balanced_channel, system_resolver,
    },
};
use futures::{Stream, StreamExt};
use opentelemetry::Context;
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use tokio::sync::Semaphore;

use crate::{
    client_ip::client_ip,
    config::GatewayConfig,
    edge_auth::EdgeAuth,
    problem::Problem,
    rate_limit::{Checks, RateLimiter},
    transcode::{GatewayCodec, Route, RouteLookup, RouteTable, build_request},
};

/// One service's channel and its bound on calls in flight.
pub struct UpstreamChannel {
    pub balanced: BalancedChannel,
    permits: Arc<Semaphore>,
}

pub struct Gateway {
    pub routes: RouteTable,
    upstreams: HashMap<String, UpstreamChannel>,
    auth: EdgeAuth,
    public: HashSet<String>,
    limiter: Arc<dyn RateLimiter>,
    config: GatewayConfig,
    upstream_calls: AtomicU64,
    /// `/openapi.json` and `/docs`, rendered once from the same routes.
    openapi: String,
    docs: String,
}

/// How long a call waits for an upstream connection before the gateway
/// answers 503: a service that is down must not hold clients until their
/// deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Gateway {
    pub async fn new(
        routes: RouteTable,
        auth: EdgeAuth,
        limiter: Arc<dyn RateLimiter>,
        config: GatewayConfig,
        dns_refresh: Duration,
        transport: Transport,
    ) -> Result<Self, UpstreamUrlError> {
        let settings = UpstreamSettings {
            connect_timeout: CONNECT_TIMEOUT,
            call_timeout: None,
            refresh: dns_refresh,
            transport,
        };
        let mut upstreams = HashMap::new();
        for upstream in &config.upstreams {
            let balanced = balanced_channel(&upstream.urls, &settings, system_resolver()).await?;
            upstreams.insert(
                upstream.service.to_owned(),
                UpstreamChannel {
                    balanced,
                    permits: Arc::new(Semaphore::new(config.max_outstanding)),
                },
            );
        }
        let public: HashSet<String> = config.public_rpcs.iter().cloned().collect();
        let document = crate::openapi::document(&routes, &public, None);
        let docs = crate::openapi::docs_page(&document);
        Ok(Self {
            openapi: document.to_string(),
            docs,
            routes,
            upstreams,
            auth,
            public,
            limiter,
            config,
            upstream_calls: AtomicU64::new(0),
        })
    }

    /// Calls sent upstream so far (tests count them; metrics will export).
    pub fn upstream_calls(&self) -> u64 {
        self.upstream_calls.load(Ordering::Relaxed)
    }

    /// The axum app: health, readiness, the OpenAPI document, and every
    /// annotated RPC behind the fallback.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route(
                "/openapi.json",
                get(|State(gateway): State<Arc<Gateway>>| async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        gateway.openapi.clone(),
                    )
                }),
            )
            .route(
                "/docs",
                get(|State(gateway): State<Arc<Gateway>>| async move {
                    axum::response::Html(gateway.docs.clone())
                }),
            )
            .fallback(dispatch)
            .with_state(self)
    }
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Problem> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|token| Some(token.trim()))
        .ok_or_else(|| {
            unauthorized(
                "TOKEN_INVALID",
                "the Authorization header is not `Bearer <token>`",
            )
        })
}

fn unauthorized(code: &str, detail: &str) -> Problem {
    let error = if code == "TOKEN_MISSING" {
        "Bearer realm=\"flashmesh\"".to_owned()
    } else {
        format!(
            "Bearer realm=\"flashmesh\", error=\"invalid_token\", error_description=\"{detail}\""
        )
    };
    Problem::new(StatusCode::UNAUTHORIZED, code, detail).with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&error).unwrap_or(HeaderValue::from_static("Bearer")),
    )
}

fn token_problem(error: TokenError) -> Problem {
    match error {
        TokenError::Expired => unauthorized("TOKEN_EXPIRED", "the access token has expired"),
        TokenError::KeysUnavailable(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "the token keys cannot be fetched right now; retry shortly",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
        _ => unauthorized("TOKEN_INVALID", "the access token is not valid"),
    }
}

/// The deadline the client asks for (`grpc-timeout`, or `X-Request-Timeout`
/// in milliseconds), capped; else the default.
fn timeout(headers: &HeaderMap, config: &GatewayConfig) -> Duration {
    let asked = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .or_else(|| {
            headers
                .get("x-request-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        });
    asked.map_or(config.default_timeout, |t| t.min(config.max_timeout))
}

/// Headers passed to the upstream as gRPC metadata.
const FORWARDED: [header::HeaderName; 2] = [header::AUTHORIZATION, telemetry::X_REQUEST_ID];
/// The caller's trace context, passed on as it came when the edge does not
/// trace (with tracing on, the upstream call carries the edge's decision).
const TRACE_CONTEXT: [header::HeaderName; 2] = [telemetry::TRACEPARENT, telemetry::TRACESTATE];
/// Headers tonic and hyper add to the same map on the way out (`te`,
/// `content-type`, `grpc-timeout`, `user-agent`, `content-length`): sized
/// for them too, it never grows (a rehash into a new allocation) per call.
const ADDED_ON_THE_WAY_OUT: usize = 5;

fn upstream_request(
    message: DynamicMessage,
    headers: &HeaderMap,
) -> tonic::Request<DynamicMessage> {
    let mut metadata =
        HeaderMap::with_capacity(FORWARDED.len() + TRACE_CONTEXT.len() + ADDED_ON_THE_WAY_OUT);
    let traced = Context::map_current(|cx| telemetry::inject_new(cx, &mut metadata));
    let trace_context: &[header::HeaderName] = if traced { &[] } else { &TRACE_CONTEXT };
    for name in FORWARDED.iter().chain(trace_context) {
        if let Some(value) = headers.get(name) {
            let mut value = value.clone();
            // A bearer token is a secret: HPACK "never indexed" (RFC 7541
            // §7.1.3), so no hop's compression context keeps it. The rest
            // but `tracestate` differ on every call.
            if *name != telemetry::TRACESTATE {
                telemetry::set_never_indexed(&mut value);
            }
            metadata.insert(name.clone(), value);
        }
    }
    tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(metadata),
        tonic::Extensions::default(),
        message,
    )
}

async fn dispatch(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    match gateway.handle(peer, request).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

impl Gateway {
    async fn handle(&self, peer: SocketAddr, request: Request) -> Result<Response, Problem> {
        let (parts, body) = request.into_parts();
        let (route, params) = match self.routes.lookup(&parts.method, parts.uri.path()) {
            RouteLookup::Found { route, params } => (route, params),
            RouteLookup::MethodNotAllowed { allowed } => {
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Problem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "METHOD_NOT_ALLOWED",
                    format!("{} is not allowed here; use {allow}", parts.method),
                )
                .with_header(
                    header::ALLOW,
                    HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("GET")),
                ));
            }
            RouteLookup::NotFound => {
                return Err(Problem::new(
                    StatusCode::NOT_FOUND,
                    "ROUTE_NOT_FOUND",
                    format!("no route for {} {}", parts.method, parts.uri.path()),
                ));
            }
        };

        let rpc = route.rpc();
        let token = bearer(&parts.headers)?;
        let caller = match (token, self.public.contains(rpc)) {
            (_, true) => None,
            (None, false) => {
                return Err(unauthorized(
                    "TOKEN_MISSING",
                    "this route needs a bearer token",
                ));
            }
            (Some(token), false) => Some(self.auth.caller(token).await.map_err(token_problem)?),
        };
        let client = client_ip(peer.ip(), &parts.headers, &self.config.trusted_proxies);
        let checks = Checks::for_request(
            client,
            self.config.ip_quota,
            caller
                .as_ref()
                .map(|caller| (caller.user_id.as_str(), self.config.user_quota)),
            self.config.route_quotas.get(rpc).map(|quota| (rpc, *quota)),
        );
        let limits = self.limiter.check(&checks).await;
        if !limits.allowed {
            return Err(limits.problem());
        }

        let body = self.read_body(route, &parts.headers, body).await?;
        let mut message = build_request(route, &params, parts.uri.query(), &body).map_err(|e| {
            Problem::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", e.to_string()).with_errors(
                vec![crate::problem::FieldError {
                    field: e.field().to_owned(),
                    description: e.description(),
                }],
            )
        })?;
        apply_idempotency_key(&mut message, &parts.headers);

        let upstream = self
            .upstreams
            .get(&route.service)
            .filter(|upstream| upstream.balanced.endpoints() > 0)
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UPSTREAM_UNAVAILABLE",
                    format!("no address of {} is known right now", route.service),
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            })?;
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        let mut response = if route.server_streaming {
            self.stream(upstream, route, message, &parts.headers)
                .await?
        } else {
            self.unary(upstream, route, message, &parts.headers).await?
        };
        for (name, value) in limits.headers() {
            response.headers_mut().insert(name, value);
        }
        Ok(response)
    }

    async fn read_body(
        &self,
        route: &Route,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<bytes::Bytes, Problem> {
        let bytes = axum::body::to_bytes(body, self.config.body_limit)
            .await
            .map_err(|_| {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PAYLOAD_TOO_LARGE",
                    format!("the body exceeds {} bytes", self.config.body_limit),
                )
            })?;
        if !bytes.is_empty() && !matches!(route.body, crate::transcode::BodySpec::None) {
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "the body must be application/json",
                ));
            }
        }
        Ok(bytes)
    }

    async fn unary(
        &self,
        upstream: &UpstreamChannel,
        route: &Route,
        message: DynamicMessage,
        headers: &HeaderMap,
    ) -> Result<Response, Problem> {
        let _permit = upstream.permits.clone().try_acquire_owned().map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UPSTREAM_BUSY",
                format!(
                    "too many calls in flight to {}; retry shortly",
                    route.service
                ),
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        })?;
        let mut request = upstream_request(message, headers);
        let deadline = timeout(headers, &self.config);
        request.set_timeout(deadline);
        let mut grpc = tonic::client::Grpc::new(upstream.balanced.channel.clone());
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("upstream not ready: {e}")))?;
            grpc.unary(request, route.grpc_path.clone(), GatewayCodec)
                .await
        };
        let answer = tokio::time::timeout(deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "the upstream did not answer in time",
                ))
            });
        let message = answer
            .map_err(|status| Problem::from_status(&status))?
            .into_inner();
        let json = route.answer.to_json(&message).map_err(|e| {
            tracing::error!(error = %e, "cannot encode an upstream answer as JSON");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "internal error",
            )
        })?;
        Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
    }

    async fn stream(
        &self,
        upstream: &UpstreamChannel,
        route: &Route,
        message: DynamicMessage,
        headers: &HeaderMap,
    ) -> Result<Response, Problem> {
        let request = upstream_request(message, headers);
        let mut grpc = tonic::client::Grpc::new(upstream.balanced.channel.clone());
        grpc.ready().await.map_err(|e| {
            Problem::from_status(&tonic::Status::unavailable(format!(
                "upstream not ready: {e}"
            )))
        })?;
        let messages = grpc
            .server_streaming(request, route.grpc_path.clone(), GatewayCodec)
            .await
            .map_err(|status| Problem::from_status(&status))?
            .into_inner();
        let ndjson = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/x-ndjson"));
        let answer = route.answer.clone();
        let items = messages.map(move |item| {
            item.map_err(|status| Problem::from_status(&status))
                .and_then(|message| {
                    answer.to_json(&message).map_err(|_| {
                        Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "INTERNAL",
                            "internal error",
                        )
                    })
                })
        });
        if ndjson {
            let lines = items.map(|item| {
                let mut line = match item {
                    Ok(json) => json,
                    Err(problem) => serde_json::to_vec(&problem).unwrap_or_default(),
                };
                line.push(b'\n');
                Ok::<_, Infallible>(line)
            });
            return Ok((
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(lines),
            )
                .into_response());
        }
        Ok(Sse::new(sse_events(items))
            .keep_alive(KeepAlive::new().interval(self.config.sse_heartbeat))
            .into_response())
    }
}

/// One SSE event per message (`id` counts from 1); an upstream error becomes
/// a final `error` event carrying the problem.
fn sse_events(
    items: impl Stream<Item = Result<Vec<u8>, Problem>> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    items.enumerate().map(|(n, item)| {
        Ok(match item {
            Ok(json) => Event::default()
                .id((n + 1).to_string())
                .data(String::from_utf8_lossy(&json)),
            Err(problem) => Event::default()
                .event("error")
                .data(serde_json::to_string(&problem).unwrap_or_default()),
        })
    })
}

/// `Idempotency-Key` fills the message's `idempotency_key` field when the
/// body left it empty, so REST clients can retry with the usual header.
fn apply_idempotency_key(message: &mut DynamicMessage, headers: &HeaderMap) {
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Some(field) = message.descriptor().get_field_by_name("idempotency_key") else {
        return;
    };
    let empty = message.get_field(&field).as_str().is_none_or(str::is_empty);
    if empty {
        message.set_field(&field, Value::String(key.to_owned()));
    }
}

async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    let checks = gateway
        .upstreams
        .iter()
        .map(|(service, upstream)| async move {
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                upstream.balanced.channel.clone(),
            );
            let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: service.clone(),
            });
            request.set_timeout(Duration::from_secs(1));
            let serving = tokio::time::timeout(Duration::from_secs(1), health.check(request))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|r| {
                    r.into_inner().status()
                        == tonic_health::pb::health_check_response::ServingStatus::Serving
                });
            (service.clone(), serving)
        });
    let results = futures::future::join_all(checks).await;
    let down: Vec<String> = results
        .into_iter()
        .filter(|(_, serving)| !serving)
        .map(|(service, _)| service)
        .collect();
    if down.is_empty() {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"ready"}"#,
        )
            .into_response();
    }
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
        format!("not serving: {}", down.join(", ")),
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    .into_response()
}
