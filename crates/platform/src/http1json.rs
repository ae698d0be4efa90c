//! The HTTP/1.1 JSON baseline transport (`FLASHMESH_TRANSPORT=http1-json`):
//! the architecture flashmesh is measured against, built from the very same
//! service implementations.
//!
//! - [`JsonAdapter`] serves a gRPC service (the tonic routes with all their
//!   layers) as `POST /{package.Service}/{Method}` with a proto3 JSON body:
//!   the JSON becomes the protobuf message, is framed as a gRPC request and
//!   handed to the service in-process; the answer is unframed and turned back
//!   into JSON. Server-streaming RPCs answer newline-delimited JSON, one
//!   `{"result": ...}` per message and a final `{"error": ...}` if the stream
//!   fails.
//! - [`JsonChannel`] is the client half: a tower service taking gRPC-framed
//!   requests (so generated tonic clients and `tonic::client::Grpc` run over
//!   it unchanged) and sending them as JSON over pooled keep-alive HTTP/1.1
//!   connections.
//!
//! Metadata travels as HTTP headers. A failure answers the HTTP status mapped
//! from its code, the `grpc-status`, `grpc-message` and
//! `grpc-status-details-bin` headers, and a JSON body `{"code", "status",
//! "message", "details"}` (`details`: the base64 `google.rpc.Status` bytes),
//! so the client rebuilds an identical `tonic::Status`, `ErrorInfo`
//! included.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{StreamExt, future::BoxFuture};
use http::{HeaderMap, HeaderValue, Method, header};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Full, Limited, StreamBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};
use tonic::{Code, ConnectError, Status, TimeoutExpired, body::Body};
use tower::{BoxError, Service, ServiceExt};

use crate::error::{code_name, http_status};

/// The largest request or answer body accepted, as tonic's default.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const GRPC: &str = "application/grpc";

/// Idle pooled connections are closed after this long (hyper's default).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per replica: one per call in flight at the peak,
/// up to the services' default concurrency limit.
pub const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// TCP keep-alive probes, at the gRPC channels' HTTP/2 keep-alive interval.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// Proto3 JSON with proto field names, zero values emitted, 64-bit integers
/// as strings, enums as names, Timestamps as RFC 3339: what the gateway
/// answers and what the baseline transport carries.
pub fn to_json(message: &DynamicMessage) -> Result<Vec<u8>, serde_json::Error> {
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false);
    let mut serializer = serde_json::Serializer::new(Vec::new());
    message.serialize_with_options(&mut serializer, &options)?;
    Ok(serializer.into_inner())
}

/// A message of type `desc` from proto3 JSON (proto or JSON field names;
/// unknown fields refused).
fn from_json(desc: MessageDescriptor, json: &[u8]) -> Result<DynamicMessage, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let message = DynamicMessage::deserialize_with_options(
        desc,
        &mut deserializer,
        &DeserializeOptions::new(),
    )?;
    deserializer.end()?;
    Ok(message)
}

/// Every unary and server-streaming RPC the stack serves, by HTTP path.
fn rpcs() -> &'static HashMap<String, MethodDescriptor> {
    static RPCS: OnceLock<HashMap<String, MethodDescriptor>> = OnceLock::new();
    RPCS.get_or_init(|| {
        let mut pool = DescriptorPool::new();
        for set in [
            flashmesh_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            // Compiled into the binary: a failure is a build defect.
            pool.decode_file_descriptor_set(set)
                .expect("the embedded descriptor sets are valid");
        }
        pool.services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .filter(|method| !method.is_client_streaming())
            .map(|method| {
                (
                    format!("/{}/{}", method.parent_service().full_name(), method.name()),
                    method,
                )
            })
            .collect()
    })
}

fn rpc(path: &str) -> Result<&'static MethodDescriptor, Status> {
    rpcs()
        .get(path)
        .ok_or_else(|| Status::unimplemented(format!("no unary or server-streaming RPC at {path}")))
}

/// `message` framed as one uncompressed gRPC message.
fn frame(message: &DynamicMessage) -> Bytes {
    let payload = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + payload.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    framed.put_slice(&payload);
    framed.freeze()
}

/// Splits a gRPC body, fed chunk by chunk, into its messages.
#[derive(Default)]
struct Deframer {
    buffer: BytesMut,
}

impl Deframer {
    fn push(&mut self, chunk: impl Buf) {
        self.buffer.put(chunk);
    }

    /// The next whole message, if one has arrived.
    fn next(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        if self.buffer[0] != 0 {
            return Err(Status::internal(
                "compressed gRPC messages are not supported",
            ));
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > MAX_MESSAGE {
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes is over the {MAX_MESSAGE}-byte limit"
            )));
        }
        if self.buffer.len() < 5 + len {
            return Ok(None);
        }
        self.buffer.advance(5);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }
}

/// The headers that are call metadata (`authorization`, `x-request-id`,
/// `traceparent`, `grpc-timeout`, ...), without those of either transport.
fn metadata(headers: &HeaderMap) -> HeaderMap {
    let mut metadata = headers.clone();
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::HOST,
        header::TE,
        header::ACCEPT,
        header::ACCEPT_ENCODING,
    ] {
        metadata.remove(name);
    }
    for name in [
        "keep-alive",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
    ] {
        metadata.remove(name);
    }
    metadata
}

/// A status as JSON: the code by number and by name, the message, and the
/// `google.rpc.Status` details in base64.
fn status_json(status: &Status) -> serde_json::Value {
    serde_json::json!({
        "code": status.code() as i32,
        "status": code_name(status.code()),
        "message": status.message(),
        "details": STANDARD.encode(status.details()),
    })
}

/// The status [`status_json`] wrote.
fn status_from_json(json: &serde_json::Value) -> Status {
    let code = json
        .get("code")
        .and_then(serde_json::Value::as_i64)
        .and_then(|code| i32::try_from(code).ok())
        .map_or(Code::Unknown, Code::from_i32);
    let message = json
        .get("message")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let details = json
        .get("details")
        .and_then(serde_json::Value::as_str)
        .and_then(|details| STANDARD.decode(details).ok())
        .unwrap_or_default();
    Status::with_details(code, message, details.into())
}

/// One NDJSON line: `{"result": <message>}` or `{"error": <status>}`.
fn result_line(output: &MessageDescriptor, payload: Bytes) -> Result<Bytes, Status> {
    let message = DynamicMessage::decode(output.clone(), payload)
        .map_err(|e| Status::internal(format!("undecodable answer: {e}")))?;
    let json =
        to_json(&message).map_err(|e| Status::internal(format!("unencodable answer: {e}")))?;
    let mut line = BytesMut::with_capacity(json.len() + 12);
    line.put_slice(b"{\"result\":");
    line.put_slice(&json);
    line.put_slice(b"}\n");
    Ok(line.freeze())
}

fn error_line(status: &Status) -> Bytes {
    let mut line = serde_json::json!({ "error": status_json(status) }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn grpc_trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

fn status_of(error: impl Into<BoxError>) -> Status {
    let error = error.into();
    match error.downcast::<Status>() {
        Ok(status) => *status,
        Err(error) => Status::from_error(error),
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// Serves the gRPC service `inner` as JSON over HTTP/1.1 (see the module
/// documentation). Every call goes through `inner` with its layers, so the
/// business logic, identity, limits and observation are the gRPC ones.
#[derive(Clone)]
pub struct JsonAdapter<S> {
    inner: S,
}

impl<S> JsonAdapter<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<http::Request<B>> for JsonAdapter<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the inner service's, awaited per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(serve(inner, request).await.unwrap_or_else(error_response)) })
    }
}

async fn serve<S, B>(inner: S, request: http::Request<B>) -> Result<http::Response<Body>, Status>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let method = rpc(parts.uri.path())?;
    if parts.method != Method::POST {
        return Err(Status::unimplemented("RPCs are called with POST"));
    }
    let body = Limited::new(body, MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("cannot read the request body: {e}")))?
        .to_bytes();
    let json: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    let message = from_json(method.input(), json).map_err(|e| {
        Status::invalid_argument(format!(
            "the body is not a valid {}: {e}",
            method.input().full_name()
        ))
    })?;

    let mut grpc = http::Request::new(Body::new(Full::new(frame(&message))));
    *grpc.method_mut() = Method::POST;
    *grpc.uri_mut() = parts.uri;
    *grpc.headers_mut() = metadata(&parts.headers);
    grpc.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(GRPC));
    grpc.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    *grpc.extensions_mut() = parts.extensions;

    let response = inner.oneshot(grpc).await.map_err(status_of)?;
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    let mut headers = metadata(&parts.headers);
    let output = method.output();
    let body = if method.is_server_streaming() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        Body::new(StreamBody::new(grpc_to_ndjson(output, body)))
    } else {
        let collected = body.collect().await?;
        if let Some(status) = collected.trailers().and_then(Status::from_header_map)
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        let mut deframer = Deframer::default();
        deframer.push(collected.to_bytes());
        let payload = deframer
            .next()?
            .ok_or_else(|| Status::internal("the service answered no message"))?;
        let message = DynamicMessage::decode(output, payload)
            .map_err(|e| Status::internal(format!("undecodable answer: {e}")))?;
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
        Body::new(Full::new(Bytes::from(to_json(&message).map_err(|e| {
            Status::internal(format!("unencodable answer: {e}"))
        })?)))
    };
    let mut response = http::Response::new(body);
    *response.headers_mut() = headers;
    Ok(response)
}

/// A gRPC answer stream as NDJSON lines.
fn grpc_to_ndjson(
    output: MessageDescriptor,
    body: Body,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Status>> + Send {
    async_stream::stream! {
        let mut frames = BodyStream::new(body);
        let mut deframer = Deframer::default();
        while let Some(frame) = frames.next().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(status) => {
                    yield Ok(Frame::data(error_line(&status)));
                    return;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    deframer.push(data);
                    loop {
                        match deframer.next().and_then(|payload| {
                            payload.map(|p| result_line(&output, p)).transpose()
                        }) {
                            Ok(Some(line)) => yield Ok(Frame::data(line)),
                            Ok(None) => break,
                            Err(status) => {
                                yield Ok(Frame::data(error_line(&status)));
                                return;
                            }
                        }
                    }
                }
                Err(frame) => {
                    if let Some(status) = frame.trailers_ref().and_then(Status::from_header_map)
                        && status.code() != Code::Ok
                    {
                        yield Ok(Frame::data(error_line(&status)));
                    }
                    return;
                }
            }
        }
    }
}

/// A failure as HTTP: the mapped status code, the gRPC status headers and a
/// JSON body.
fn error_response(status: Status) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(
        status_json(&status).to_string(),
    ))));
    *response.status_mut() = http_status(status.code());
    *response.headers_mut() = grpc_trailers(&status);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// Base URLs (`http://10.0.0.7:50052`) calls are spread over, round robin;
/// replaced as DNS answers change.
pub type Targets = Arc<RwLock<Vec<String>>>;

/// The client half: takes gRPC requests, sends them as JSON over pooled
/// keep-alive HTTP/1.1 connections to one of `targets`, and answers gRPC.
#[derive(Clone)]
pub struct JsonChannel {
    client: Client<HttpConnector, Full<Bytes>>,
    targets: Targets,
    next: Arc<AtomicUsize>,
    call_timeout: Option<Duration>,
}

impl JsonChannel {
    pub fn new(
        targets: Targets,
        connect_timeout: Duration,
        call_timeout: Option<Duration>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Self {
            client,
            targets,
            next: Arc::new(AtomicUsize::new(0)),
            call_timeout,
        }
    }

    fn target(&self) -> Option<String> {
        let targets = self.targets.read().unwrap_or_else(PoisonError::into_inner);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        targets.get(n.checked_rem(targets.len())?).cloned()
    }

    async fn send(self, request: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let (parts, body) = request.into_parts();
        let method = match rpc(parts.uri.path()) {
            Ok(method) => method,
            Err(status) => return Ok(status.into_http()),
        };
        let body = Limited::new(body, MAX_MESSAGE)
            .collect()
            .await
            .map_err(|e| Status::internal(format!("cannot read the request: {e}")))?
            .to_bytes();
        let mut deframer = Deframer::default();
        deframer.push(body);
        let payload = deframer
            .next()?
            .ok_or_else(|| Status::internal("the request has no message"))?;
        let json = DynamicMessage::decode(method.input(), payload)
            .map_err(|e| e.to_string())
            .and_then(|message| to_json(&message).map_err(|e| e.to_string()))
            .map_err(|e| Status::internal(format!("unencodable request: {e}")))?;
        let mut headers = metadata(&parts.headers);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
        let body = Full::new(Bytes::from(json));

        // A refused connection sent nothing, so the next replica is tried,
        // as the gRPC balancer routes around a replica that is down.
        let attempts = self
            .targets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            .max(1);
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let target = self
                .target()
                .ok_or_else(|| Status::unavailable("no upstream address is known yet"))?;
            let mut outgoing = http::Request::new(body.clone());
            *outgoing.method_mut() = Method::POST;
            *outgoing.uri_mut() = format!("{target}{}", parts.uri.path())
                .parse()
                .map_err(|e| Status::internal(format!("bad upstream URL {target}: {e}")))?;
            *outgoing.headers_mut() = headers.clone();
            // Failures map as tonic maps its channel's: a refused connection
            // is UNAVAILABLE, an elapsed call timeout CANCELLED.
            let call = self.client.request(outgoing);
            let answer = match self.call_timeout {
                Some(limit) => tokio::time::timeout(limit, call)
                    .await
                    .map_err(|_| Status::from_error(Box::new(TimeoutExpired(()))))?,
                None => call.await,
            };
            match answer {
                Ok(response) => break response,
                Err(e) if e.is_connect() && attempt < attempts => {
                    tracing::debug!(%target, error = %e, "upstream refused; trying the next");
                }
                Err(e) if e.is_connect() => {
                    return Err(Status::from_error(Box::new(ConnectError(Box::new(e)))));
                }
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "the upstream call failed: {e}"
                    )));
                }
            }
        };
        let (head, body) = response.into_parts();
        if !head.status.is_success() {
            let status = Status::from_header_map(&head.headers).unwrap_or_else(|| {
                Status::unknown(format!("the upstream answered HTTP {}", head.status))
            });
            return Ok(status.into_http());
        }
        let mut headers = metadata(&head.headers);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(GRPC));
        let output = method.output();
        let body = if method.is_server_streaming() {
            Body::new(StreamBody::new(ndjson_to_grpc(output, body)))
        } else {
            let answer = Limited::new(body, MAX_MESSAGE)
                .collect()
                .await
                .map_err(|e| Status::unavailable(format!("the upstream answer broke off: {e}")))?
                .to_bytes();
            let message = from_json(output, &answer).map_err(|e| {
                Status::internal(format!("the upstream answered invalid JSON: {e}"))
            })?;
            Body::new(StreamBody::new(futures::stream::iter([
                Ok::<_, Status>(Frame::data(frame(&message))),
                Ok(Frame::trailers(grpc_trailers(&Status::ok("")))),
            ])))
        };
        let mut response = http::Response::new(body);
        *response.headers_mut() = headers;
        Ok(response)
    }
}

impl Service<http::Request<Body>> for JsonChannel {
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // The pool opens connections as calls need them.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}

/// An NDJSON answer stream as a gRPC body: a message per result line, then
/// trailers with the stream's status.
fn ndjson_to_grpc(
    output: MessageDescriptor,
    body: hyper::body::Incoming,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Status>> + Send {
    async_stream::stream! {
        let mut frames = BodyStream::new(body);
        let mut pending = BytesMut::new();
        let mut status = Status::ok("");
        'read: while let Some(chunk) = frames.next().await {
            let data = match chunk.map(Frame::into_data) {
                Ok(Ok(data)) => data,
                Ok(Err(_trailers)) => continue,
                Err(e) => {
                    status = Status::unavailable(format!("the upstream stream broke: {e}"));
                    break;
                }
            };
            pending.put(data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line = pending.split_to(end + 1);
                match ndjson_line(&output, &line) {
                    Ok(Some(message)) => yield Ok(Frame::data(frame(&message))),
                    Ok(None) => {}
                    Err(failed) => {
                        status = failed;
                        break 'read;
                    }
                }
            }
        }
        yield Ok(Frame::trailers(grpc_trailers(&status)));
    }
}

/// A result line's message, `None` for a blank line, or the stream's error.
fn ndjson_line(output: &MessageDescriptor, line: &[u8]) -> Result<Option<DynamicMessage>, Status> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut json: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Status::internal(format!("the upstream sent an invalid line: {e}")))?;
    if let Some(error) = json.get("error") {
        return Err(status_from_json(error));
    }
    let result = json
        .get_mut("result")
        .map(serde_json::Value::take)
        .ok_or_else(|| Status::internal("the upstream sent a line without a result"))?;
    DynamicMessage::deserialize_with_options(output.clone(), result, &DeserializeOptions::new())
        .map(Some)
        .map_err(|e| Status::internal(format!("the upstream sent an invalid message: {e}")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;
    use crate::{
        config::{ServerConfig, Transport},
        grpc::GrpcServer,
        telemetry::Telemetry,
        upstream::{UpstreamSettings, lazy_channel},
    };

    fn health_request(service: &str) -> DynamicMessage {
        let mut message = DynamicMessage::new(rpc("/grpc.health.v1.Health/Check").unwrap().input());
        message.set_field_by_name("service", prost_reflect::Value::String(service.to_owned()));
        message
    }

    #[test]
    fn frames_come_out_whole_however_they_are_split() {
        let message = health_request("flashmesh.catalog.v1.CatalogService");
        let framed = frame(&message);
        let mut deframer = Deframer::default();
        deframer.push(framed.slice(..7));
        assert_eq!(deframer.next().unwrap(), None);
        deframer.push(framed.slice(7..));
        deframer.push(framed.clone());
        for _ in 0..2 {
            let payload = deframer.next().unwrap().expect("a whole message");
            assert_eq!(payload, message.encode_to_vec());
        }
        assert_eq!(deframer.next().unwrap(), None);

        let mut compressed = BytesMut::from(&framed[..]);
        compressed[0] = 1;
        deframer.push(compressed);
        assert_eq!(deframer.next().unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn a_status_survives_json_with_its_details() {
        let status = Status::with_error_details(
            Code::FailedPrecondition,
            "the deal is sold out",
            ErrorDetails::with_error_info(
                "SOLD_OUT",
                "flashmesh.dev",
                HashMap::from([("remainingStock".to_owned(), "0".to_owned())]),
            ),
        );
        let json = status_json(&status);
        assert_eq!(json["status"], "FAILED_PRECONDITION");
        let back = status_from_json(&serde_json::from_str(&json.to_string()).unwrap());
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.message(), "the deal is sold out");
        let info = back
            .get_error_details()
            .error_info()
            .cloned()
            .expect("ErrorInfo");
        assert_eq!(info.reason, "SOLD_OUT");
        assert_eq!(info.metadata["remainingStock"], "0");

        let headers = grpc_trailers(&status);
        let rebuilt = Status::from_header_map(&headers).expect("grpc-status");
        assert_eq!(rebuilt.details(), status.details());
    }

    #[test]
    fn ndjson_lines_carry_results_and_errors() {
        let output = rpc("/grpc.health.v1.Health/Watch").unwrap().output();
        let line = ndjson_line(&output, br#"{"result":{"status":"SERVING"}}"#)
            .unwrap()
            .expect("a message");
        assert_eq!(
            line.get_field_by_name("status").unwrap().as_enum_number(),
            Some(ServingStatus::Serving as i32)
        );
        assert!(ndjson_line(&output, b" \n").unwrap().is_none());
        let error = error_line(&Status::unavailable("draining"));
        let status = ndjson_line(&output, &error).unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "draining")
        );
        assert_eq!(
            ndjson_line(&output, b"{\"nope\":1}").unwrap_err().code(),
            Code::Internal
        );
    }

    /// A health server and a tonic client over `transport`: what the
    /// client saw for a known service, an unknown one, and a watch.
    async fn health_over(transport: Transport) -> (ServingStatus, Code, ServingStatus) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = GrpcServer::new(
            &ServerConfig::default(),
            transport,
            &Telemetry::disabled("test"),
        );
        let served = tokio::spawn(server.serve(listener, shutdown.clone()));
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(1),
            call_timeout: Some(Duration::from_secs(5)),
            refresh: Duration::from_secs(60),
            transport,
        };
        let mut client = HealthClient::new(lazy_channel(&url, &settings).unwrap());
        let known = client
            .check(HealthCheckRequest::default())
            .await
            .expect("the server answers")
            .into_inner()
            .status();
        let unknown = client
            .check(HealthCheckRequest {
                service: "nope".to_owned(),
            })
            .await
            .expect_err("an unknown service is NOT_FOUND")
            .code();
        let mut watch = client
            .watch(HealthCheckRequest::default())
            .await
            .expect("a stream")
            .into_inner();
        let watched = watch
            .message()
            .await
            .expect("a message")
            .expect("not the end")
            .status();
        drop((watch, client));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        (known, unknown, watched)
    }

    #[tokio::test]
    async fn tonic_clients_see_the_same_answers_over_either_transport() {
        for transport in [Transport::Grpc, Transport::Http1Json] {
            assert_eq!(
                health_over(transport).await,
                (
                    ServingStatus::Serving,
                    Code::NotFound,
                    ServingStatus::Serving
                ),
                "{transport:?}"
            );
        }
    }
}
