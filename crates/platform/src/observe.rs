//! The tower layers that observe calls: [`ServerObserveLayer`], outermost on
//! every gRPC server (the caller's trace context, a server span when
//! sampled, RED metrics), and [`ClientTraceLayer`] on channels to other
//! services (a client span when sampled, and `traceparent` either way).

use std::{
    collections::HashMap,
    fmt::Display,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::Instant,
};

use futures::future::{BoxFuture, Either};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::{
    Context, KeyValue,
    context::FutureExt,
    trace::{SpanKind, Status as SpanStatus, TraceContextExt},
};
use tonic::{Code, Status, body::Body};
use tower::{BoxError, Layer, Service};

use crate::{
    error::code_name,
    metrics::{RequestFamilies, RouteMetrics},
    telemetry::{self, Telemetry},
};

/// Every gRPC status code, by number.
const GRPC_CODES: usize = 17;

/// Observes every call of one server.
#[derive(Clone)]
pub struct ServerObserveLayer {
    shared: Arc<Shared>,
}

struct Shared {
    telemetry: Telemetry,
    /// By request path, `/package.Service/Method`.
    rpcs: HashMap<String, Arc<Rpc>>,
    /// Paths of no known RPC (reflection, unknown methods).
    other: Arc<Rpc>,
}

struct Rpc {
    /// `package.Service/Method`: the span name and the `rpc` label.
    name: String,
    /// Shared with every span's `rpc.service` and `rpc.method`.
    service: Arc<str>,
    method: Arc<str>,
    /// The status of a server-streaming call is known only at its end.
    server_streaming: bool,
    metrics: RouteMetrics,
}

impl ServerObserveLayer {
    /// `rpcs`: every method served, as (`package.Service/Method`, server
    /// streaming).
    pub fn new(telemetry: &Telemetry, rpcs: impl IntoIterator<Item = (String, bool)>) -> Self {
        let families = RequestFamilies::new(
            telemetry.metrics(),
            [
                "flashmesh_rpc_server_requests",
                "flashmesh_rpc_server_duration_seconds",
                "flashmesh_rpc_server_in_flight",
            ],
            ("rpc", "code"),
            GRPC_CODES,
            |code| code_name(Code::from(i32::try_from(code).unwrap_or(2))).to_owned(),
        );
        let rpc = |name: String, server_streaming: bool| {
            let (service, method) = name.split_once('/').unwrap_or((name.as_str(), ""));
            Arc::new(Rpc {
                service: service.into(),
                method: method.into(),
                server_streaming,
                metrics: families.route(&name),
                name,
            })
        };
        let rpcs = rpcs
            .into_iter()
            .map(|(name, streaming)| (format!("/{name}"), rpc(name, streaming)))
            .collect();
        Self {
            shared: Arc::new(Shared {
                telemetry: telemetry.clone(),
                rpcs,
                other: rpc("other".to_owned(), true),
            }),
        }
    }
}

impl<S> Layer<S> for ServerObserveLayer {
    type Service = ServerObserve<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerObserve {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ServerObserve<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    fn context(&self, rpc: &Rpc, headers: &HeaderMap) -> Option<Context> {
        self.telemetry
            .start_request(headers, &rpc.name, SpanKind::Server, || {
                // Room for the status code set at the end.
                let mut attributes = Vec::with_capacity(4);
                attributes.extend([
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", rpc.service.clone()),
                    KeyValue::new("rpc.method", rpc.method.clone()),
                ]);
                attributes
            })
    }
}

impl<S> Service<http::Request<Body>> for ServerObserve<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let rpc = self
            .shared
            .rpcs
            .get(request.uri().path())
            .unwrap_or(&self.shared.other)
            .clone();
        rpc.metrics.in_flight.inc();
        let cx = self.shared.context(&rpc, request.headers());
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
        let observed = Observed {
            rpc,
            started: Instant::now(),
            cx,
            finished: false,
        };
        Box::pin(async move {
            match call.await {
                Ok(response) => Ok(observed.answered(response)),
                Err(error) => {
                    let error: BoxError = error.into();
                    let code = error
                        .downcast_ref::<Status>()
                        .map_or(Code::Unknown, Status::code);
                    observed.finish(code);
                    Err(error)
                }
            }
        })
    }
}

/// One call being observed; counted once, when its status is known, or as
/// CANCELLED if dropped before (the client went away).
struct Observed {
    rpc: Arc<Rpc>,
    started: Instant,
    cx: Option<Context>,
    finished: bool,
}

fn header_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from)
}

impl Observed {
    /// Unary answers and refusals carry their status in the headers (tonic
    /// sends a failed call as trailers-only); a stream's comes in its
    /// trailers.
    fn answered(self, response: http::Response<Body>) -> http::Response<Body> {
        match header_code(response.headers()) {
            Some(code) => {
                self.finish(code);
                response
            }
            None if !self.rpc.server_streaming => {
                self.finish(Code::Ok);
                response
            }
            None => response.map(|body| {
                Body::new(ObservedBody {
                    body,
                    observed: Some(self),
                    code: None,
                })
            }),
        }
    }

    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        let metrics = &self.rpc.metrics;
        metrics.in_flight.dec();
        metrics.finish(code as usize, self.started.elapsed());
        if let Some(cx) = &self.cx {
            let span = cx.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
                if is_server_error(code) {
                    span.set_status(SpanStatus::error(code_name(code)));
                }
                span.end();
            }
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

/// The codes OpenTelemetry counts as a server's failure.
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// A streaming answer's body, watched for the status in its trailers.
struct ObservedBody {
    body: Body,
    observed: Option<Observed>,
    code: Option<Code>,
}

impl HttpBody for ObservedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(header_code) {
                    self.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.code = Some(status.code()),
            Poll::Ready(None) => {
                let code = self.code.unwrap_or(Code::Ok);
                if let Some(observed) = self.observed.take() {
                    observed.finish(code);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(observed) = self.observed.take() {
            // Trailers seen but not the end: the status is known.
            observed.finish(self.code.unwrap_or(Code::Cancelled));
        }
    }
}

/// On a channel to another service: a client span per call when the caller
/// is sampled, and the caller's `traceparent` (sampled or not) on the call.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientTraceLayer;

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ClientTrace<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for ClientTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Error: Display,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<BoxFuture<'static, Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let span = telemetry::sampled().then(|| {
            let name = request.uri().path().trim_start_matches('/').to_owned();
            telemetry::child(name, SpanKind::Client, || {
                vec![KeyValue::new("rpc.system", "grpc")]
            })
        });
        let Some(Some(cx)) = span else {
            Context::map_current(|cx| telemetry::inject(cx, request.headers_mut()));
            return Either::Right(self.inner.call(request));
        };
        telemetry::inject(&cx, request.headers_mut());
        let call = self.inner.call(request);
        Either::Left(Box::pin(async move {
            let result = call.await;
            match &result {
                Ok(response) => {
                    let code = header_code(response.headers()).unwrap_or(Code::Ok);
                    let span = cx.span();
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
                    if code != Code::Ok {
                        span.set_status(SpanStatus::error(code_name(code)));
                    }
                    span.end();
                }
                Err(error) => telemetry::end(&cx, Some(error)),
            }
            result
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;

    const RPC: &str = "flashmesh.test.v1.TestService/Get";

    fn request() -> http::Request<Body> {
        http::Request::builder()
            .uri(format!("/{RPC}"))
            .body(Body::empty())
            .expect("request")
    }

    fn count(telemetry: &Telemetry, code: &str) -> Option<String> {
        let text = telemetry.metrics().render();
        let prefix =
            format!(r#"flashmesh_rpc_server_requests_total{{rpc="{RPC}",code="{code}"}} "#);
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
    }

    #[tokio::test]
    async fn statuses_are_counted_from_headers_and_cancellation() {
        let telemetry = Telemetry::disabled("test");
        let layer = ServerObserveLayer::new(&telemetry, [(RPC.to_owned(), false)]);
        let ok = tower::service_fn(|_: http::Request<Body>| async {
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        });
        layer.layer(ok).oneshot(request()).await.expect("answer");
        let refused = tower::service_fn(|_: http::Request<Body>| async {
            Ok::<_, Infallible>(Status::not_found("no").into_http())
        });
        layer
            .layer(refused)
            .oneshot(request())
            .await
            .expect("answer");
        let shed = tower::service_fn(|_: http::Request<Body>| async {
            Err::<http::Response<Body>, BoxError>(Box::new(Status::unavailable("busy")))
        });
        assert!(layer.layer(shed).oneshot(request()).await.is_err());
        let never = tower::service_fn(|_: http::Request<Body>| {
            futures::future::pending::<Result<http::Response<Body>, Infallible>>()
        });
        let abandoned = layer.layer(never).oneshot(request());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), abandoned)
                .await
                .is_err()
        );
        assert_eq!(count(&telemetry, "OK").as_deref(), Some("1"));
        assert_eq!(count(&telemetry, "NOT_FOUND").as_deref(), Some("1"));
        assert_eq!(count(&telemetry, "UNAVAILABLE").as_deref(), Some("1"));
        assert_eq!(count(&telemetry, "CANCELLED").as_deref(), Some("1"));
        let text = telemetry.metrics().render();
        assert!(
            text.contains(&format!(
                r#"flashmesh_rpc_server_in_flight{{rpc="{RPC}"}} 0"#
            )),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_stream_is_counted_at_its_end_with_its_trailers() {
        let telemetry = Telemetry::disabled("test");
        let layer = ServerObserveLayer::new(&telemetry, [(RPC.to_owned(), true)]);
        let streaming = tower::service_fn(|_: http::Request<Body>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
            let frames = futures::stream::iter([
                Ok::<_, Status>(Frame::data(bytes::Bytes::from_static(b"x"))),
                Ok(Frame::trailers(trailers)),
            ]);
            Ok::<_, Infallible>(http::Response::new(Body::new(
                http_body_util::StreamBody::new(frames),
            )))
        });
        let response = layer
            .layer(streaming)
            .oneshot(request())
            .await
            .expect("answer");
        assert_eq!(
            count(&telemetry, "DEADLINE_EXCEEDED"),
            None,
            "not before the end"
        );
        let body = response.into_body();
        let collected = http_body_util::BodyExt::collect(body).await.expect("body");
        assert!(collected.trailers().is_some());
        assert_eq!(count(&telemetry, "DEADLINE_EXCEEDED").as_deref(), Some("1"));
    }
}
