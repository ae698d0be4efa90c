//! Observation at the edge, as one tower layer around the router: the edge
//! span (the trace's root unless the client sent a `traceparent`), the
//! sampling decision for the whole request (the context the request runs
//! in, whose `traceparent` the upstream call carries), request count and
//! latency by route and status, requests in flight, and open event streams
//! (SSE, NDJSON).

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::Instant,
};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, Method, header},
    response::Response,
};
use flashmesh_platform::{
    metrics::{CONTENT_TYPE, RequestFamilies, RouteMetrics},
    telemetry::{Attribute, Kind, Telemetry},
};
use futures::future::{BoxFuture, Either};
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::{
    Context,
    context::FutureExt,
    trace::{Status as SpanStatus, TraceContextExt},
};
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service};

use crate::app::Gateway;

/// HTTP statuses are counted by their number.
const STATUSES: usize = 600;
/// Counted when the client left before an answer (nginx's convention).
const CLIENT_CLOSED: usize = 499;
/// The gateway's own routes, outside the contracts.
const OWN_ROUTES: [&str; 5] = ["/healthz", "/readyz", "/openapi.json", "/docs", "/metrics"];

#[derive(Clone)]
pub struct EdgeObserveLayer {
    shared: Arc<Shared>,
}

struct Shared {
    telemetry: Telemetry,
    gateway: Arc<Gateway>,
    /// One per contract route, in [`crate::transcode::RouteTable::routes`] order.
    routes: Vec<Arc<Edge>>,
    own: Vec<(&'static str, Arc<Edge>)>,
    unmatched: Arc<Edge>,
    streams: Gauge,
    public_metrics: bool,
}

struct Edge {
    /// `METHOD /template`: the span name and the `route` label.
    name: String,
    /// Shared with every span's `http.route` rather than copied into each.
    template: Arc<str>,
    metrics: RouteMetrics,
}

impl EdgeObserveLayer {
    pub fn new(telemetry: &Telemetry, gateway: &Arc<Gateway>, public_metrics: bool) -> Self {
        let metrics = telemetry.metrics();
        let families = RequestFamilies::new(
            metrics,
            [
                "flashmesh_http_server_requests",
                "flashmesh_http_server_duration_seconds",
                "flashmesh_http_server_in_flight",
            ],
            ("route", "status"),
            STATUSES,
            |status| status.to_string(),
        );
        let edge = |name: String, template: &str| {
            Arc::new(Edge {
                metrics: families.route(&name),
                name,
                template: template.into(),
            })
        };
        let routes = gateway
            .routes
            .routes()
            .map(|route| {
                edge(
                    format!("{} {}", route.http_method, route.template),
                    &route.template,
                )
            })
            .collect();
        let own = OWN_ROUTES
            .iter()
            .map(|path| (*path, edge(format!("GET {path}"), path)))
            .collect();
        Self {
            shared: Arc::new(Shared {
                telemetry: telemetry.clone(),
                gateway: gateway.clone(),
                routes,
                own,
                unmatched: edge("unmatched".to_owned(), ""),
                streams: metrics.family(
                    "flashmesh_sse_connections",
                    "Open event streams (SSE and NDJSON) at the gateway",
                    Gauge::default,
                ),
                public_metrics,
            }),
        }
    }
}

impl<S> Layer<S> for EdgeObserveLayer {
    type Service = EdgeObserve<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeObserve {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct EdgeObserve<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    fn edge(&self, method: &Method, path: &str) -> &Arc<Edge> {
        if let Some(index) = self.gateway.routes.route_index(method, path) {
            return self.routes.get(index).unwrap_or(&self.unmatched);
        }
        self.own
            .iter()
            .find(|(own, _)| *own == path)
            .map_or(&self.unmatched, |(_, edge)| edge)
    }

    /// The edge span (or the unsampled decision).
    fn context(&self, edge: &Edge, request: &Request) -> Option<Context> {
        self.telemetry
            .start_request(request.headers(), &edge.name, Kind::Server, || {
                // Room for the status code set at the end.
                let mut attributes = Vec::with_capacity(4);
                attributes.extend([
                    Attribute::new("http.request.method", request.method().as_str().to_owned()),
                    Attribute::new("http.route", edge.template.clone()),
                    Attribute::new("url.path", request.uri().path().to_owned()),
                ]);
                attributes
            })
    }
}

impl<S> Service<Request> for EdgeObserve<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let shared = self.shared.clone();
        if shared.public_metrics
            && request.method() == Method::GET
            && request.uri().path() == "/metrics"
        {
            let text = shared.telemetry.metrics().render();
            return Box::pin(async move {
                let mut response = Response::new(Body::from(text));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
                Ok(response)
            });
        }
        let edge = shared.edge(request.method(), request.uri().path()).clone();
        edge.metrics.in_flight.inc();
        let cx = shared.context(&edge, &request);
        let call = match &cx {
            Some(cx) => {
                let _entered = cx.clone().attach();
                self.inner.call(request)
            }
            None => self.inner.call(request),
        };
        let call = match cx.clone() {
            Some(cx) => Either::Left(call.with_context(cx)),
            None => Either::Right(call),
        };
        let mut observed = Observed {
            edge,
            started: Instant::now(),
            cx,
            finished: false,
        };
        Box::pin(async move {
            let Ok(response) = call.await;
            observed.record(usize::from(response.status().as_u16()));
            let streaming = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.starts_with("text/event-stream") || v.starts_with("application/x-ndjson")
                });
            if !streaming {
                return Ok(response);
            }
            shared.streams.inc();
            let streams = shared.streams.clone();
            Ok(response.map(|body| Body::new(CountedStream { body, streams })))
        })
    }
}

/// One request; counted once, at its answer's head, or as 499 when the
/// client went away before it.
struct Observed {
    edge: Arc<Edge>,
    started: Instant,
    cx: Option<Context>,
    finished: bool,
}

impl Observed {
    fn record(&mut self, status: usize) {
        if self.finished {
            return;
        }
        self.finished = true;
        let metrics = &self.edge.metrics;
        metrics.in_flight.dec();
        metrics.finish(status, self.started.elapsed());
        if let Some(cx) = &self.cx {
            let span = cx.span();
            if span.is_recording() {
                span.set_attribute(Attribute::new(
                    "http.response.status_code",
                    i64::try_from(status).unwrap_or_default(),
                ));
                if status >= 500 {
                    span.set_status(SpanStatus::error(status.to_string()));
                }
                span.end();
            }
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.record(CLIENT_CLOSED);
    }
}

/// An event stream's body: counted in `flashmesh_sse_connections` while open.
struct CountedStream {
    body: Body,
    streams: Gauge,
}

impl HttpBody for CountedStream {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.streams.dec();
    }
}
