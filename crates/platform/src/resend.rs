//! Calls that never left this process, sent again.
//!
//! A server that closes an HTTP/2 connection gracefully (GOAWAY, as ours do
//! after `FLASHMESH_MAX_CONNECTION_AGE`) lets the calls it has started
//! finish, but calls already queued on that connection here, not yet
//! written, are dropped: hyper fails them as "canceled", which tonic reports
//! as CANCELLED, so a buyer would be told that they closed their own
//! request; and calls the server's GOAWAY says it did not take fail as an
//! h2 protocol error (INTERNAL). No server processed such a call, so sending
//! it again is safe for any RPC, idempotent or not (what gRPC calls a
//! transparent retry).
//! [`ResendWhenSafe`] keeps each call's request until the channel has taken
//! it, and sends it again, on a connection of its own, up to [`SENDS`] times
//! in all.
//!
//! A call whose connection was lost after it went out (closed or reset with
//! no answer yet) may have been processed. It is sent again only if its
//! contract declares it idempotent (`idempotency_level`: PlaceOrder under its
//! idempotency key, ReserveStock under its reservation id, reads), since
//! taking it twice then does no harm. Any other call fails as UNAVAILABLE,
//! as gRPC reports a connection lost mid-call, rather than as tonic's
//! UNKNOWN, which the gateway would have to answer with a 500; so does a
//! call whose answer had begun when its connection broke (never sent again:
//! the service took it).

use std::{
    error::Error as StdError,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use tonic::{Status, body::Body};
use tower::{Service, ServiceExt};

/// Sends of one call at most, the first included.
const SENDS: usize = 3;

/// A tonic channel whose calls are sent again when they never went out, or
/// when they are idempotent and their connection was lost.
/// For calls with one request message (unary and server-streaming, all
/// that flashmesh's channels carry): the message is buffered, so that a
/// second send has it.
#[derive(Clone)]
pub struct ResendWhenSafe<S> {
    inner: S,
    /// Whether the method at a call's path may be taken twice.
    idempotent: fn(&str) -> bool,
}

impl<S> ResendWhenSafe<S> {
    /// Resends as the flashmesh contracts allow.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            idempotent: flashmesh_proto::idempotent,
        }
    }
}

impl<S> Service<http::Request<Body>> for ResendWhenSafe<S>
where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = tonic::transport::Error,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx).map_err(status)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was polled ready takes the call; the clone left
        // behind is polled for the next one.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        Box::pin(send(ready, request, self.idempotent))
    }
}

async fn send<S>(
    mut ready: S,
    request: http::Request<Body>,
    idempotent: fn(&str) -> bool,
) -> Result<http::Response<Body>, Status>
where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = tonic::transport::Error,
        >,
{
    let (parts, body) = request.into_parts();
    let message = body.collect().await?.to_bytes();
    let mut sends = 1;
    loop {
        match ready.call(copy(&parts, &message)).await {
            Err(error)
                if sends < SENDS
                    && (unprocessed(&error)
                        || lost_connection(&error) && idempotent(parts.uri.path())) =>
            {
                sends += 1;
                ready.ready().await.map_err(status)?;
            }
            answer => {
                // An answer cut off by a lost connection is UNAVAILABLE as well.
                return answer
                    .map(|response| {
                        response.map(|body| Body::new(body.map_err(lost_to_unavailable)))
                    })
                    .map_err(status);
            }
        }
    }
}

fn copy(parts: &http::request::Parts, message: &Bytes) -> http::Request<Body> {
    let mut request = http::Request::new(Body::new(Full::new(message.clone())));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

/// Whether no server processed the call: hyper failed it as "canceled"
/// (still queued when the connection closed, never written), or h2 failed
/// it with the server's GOAWAY, which h2 does only to streams the GOAWAY
/// says the server did not take (above its last stream id) and to streams
/// opened after it. Calls the server did take end otherwise (answered, or
/// a broken pipe if it dies), and are not sent again.
fn unprocessed(error: &tonic::transport::Error) -> bool {
    causes(error)
        .find_map(|cause| {
            if cause
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
            {
                return Some(true);
            }
            let h2 = cause.downcast_ref::<h2::Error>()?;
            Some(h2.is_go_away() && h2.is_remote())
        })
        .unwrap_or(false)
}

/// A transport failure as the status tonic's clients would report (a
/// refused connection is UNAVAILABLE, an HTTP/2 reset by its reason),
/// except that a call still unprocessed after every try is UNAVAILABLE too,
/// never CANCELLED (nobody cancelled it) or INTERNAL (nothing went wrong but
/// a closing connection); see [`lost_to_unavailable`] for the rest.
fn status(error: tonic::transport::Error) -> Status {
    if unprocessed(&error) {
        return Status::unavailable(UNPROCESSED);
    }
    lost_to_unavailable(Status::from_error(Box::new(error)))
}

/// A call whose connection broke before its answer was complete as
/// UNAVAILABLE, as gRPC reports a connection lost mid-call, where tonic
/// leaves it UNKNOWN.
fn lost_to_unavailable(status: Status) -> Status {
    if status.code() == tonic::Code::Unknown && lost_connection(&status) {
        return Status::unavailable(CONNECTION_LOST);
    }
    status
}

const UNPROCESSED: &str = "the connection closed before the service took the call";
const CONNECTION_LOST: &str = "the connection was lost before the answer was complete";

/// Whether the call failed on an I/O error of its connection (closed or
/// reset by the other end).
fn lost_connection(error: &(dyn StdError + 'static)) -> bool {
    causes(error)
        .find_map(|cause| {
            if cause.is::<std::io::Error>() {
                return Some(true);
            }
            cause.downcast_ref::<h2::Error>().map(h2::Error::is_io)
        })
        .unwrap_or(false)
}

/// `error` and the errors under it, outermost first; the first h2 error
/// met decides both questions above, since the layers below it are h2's.
fn causes<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&cause| cause.source())
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use prost::Message;
    use tonic::transport::{Channel, Server, server::TcpIncoming};
    use tonic_health::pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
        health_client::HealthClient,
    };
    use tower::util::BoxCloneSyncService;

    use super::*;

    /// A health server that sends GOAWAY on every connection after `age`.
    async fn ageing_server(age: Duration) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, service) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .max_connection_age(age)
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        addr
    }

    /// `callers` concurrent loops of Health/Check over `channel` for
    /// `duration`: (calls answered, statuses of the calls that failed).
    async fn hammer(
        channel: BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>,
        callers: usize,
        duration: Duration,
    ) -> (u64, Vec<Status>) {
        let deadline = Instant::now() + duration;
        let loops = (0..callers).map(|_| {
            let mut client = HealthClient::new(channel.clone());
            tokio::spawn(async move {
                let (mut answered, mut failures) = (0, Vec::new());
                while Instant::now() < deadline {
                    match client.check(HealthCheckRequest::default()).await {
                        Ok(_) => answered += 1,
                        Err(status) => failures.push(status),
                    }
                }
                (answered, failures)
            })
        });
        let mut total = (0, Vec::new());
        for outcome in futures::future::join_all(loops).await {
            let (answered, failures) = outcome.unwrap();
            total.0 += answered;
            total.1.extend(failures);
        }
        total
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_racing_a_goaway_are_sent_again_and_answered() {
        // A GOAWAY every 100 ms under 64 callers: some thirty connections
        // close with calls queued on them (without resending, hundreds of
        // calls fail). Rarely, on a loaded machine, a connection also ends
        // under calls already sent (tens of 20,000+ in one CI run); Check
        // has no side effects, so those are sent again too.
        let addr = ageing_server(Duration::from_millis(100)).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let (answered, failures) = hammer(
            BoxCloneSyncService::new(ResendWhenSafe {
                inner: channel,
                idempotent: |_| true,
            }),
            64,
            Duration::from_secs(3),
        )
        .await;
        assert!(answered > 1_000, "only {answered} calls answered");
        // What remains: now and then the server's graceful close (hyper's)
        // cuts off an answer it has begun (one call in 1 of 100 runs with a
        // core kept busy), which must be reported as the connection lost.
        let cut = failures
            .iter()
            .filter(|s| s.code() == tonic::Code::Unavailable && s.message() == CONNECTION_LOST);
        assert_eq!(cut.count(), failures.len(), "{failures:?}");
        assert!(
            failures.len() as u64 * 1_000 < answered,
            "{} of {answered} calls failed",
            failures.len()
        );
    }

    /// Where [`breaking_server`] closes a connection under a call.
    #[derive(Clone, Copy)]
    enum Cut {
        /// Before any answer: the call may have been processed.
        BeforeAnswer,
        /// After the answer's headers, before its message.
        MidAnswer,
    }

    /// A server that takes each call and closes the connection under the
    /// first `breaks` of them where `cut` says, then answers the rest
    /// SERVING: the address and the count of calls taken.
    async fn breaking_server(breaks: u64, cut: Cut) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let taken = Arc::new(AtomicU64::new(0));
        let count = taken.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(socket).await.unwrap();
                    while let Some(Ok((_, mut respond))) = connection.accept().await {
                        let head = || {
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap()
                        };
                        if count.fetch_add(1, Ordering::Relaxed) < breaks {
                            let mut body = None;
                            if let Cut::MidAnswer = cut {
                                body = Some(respond.send_response(head(), false).unwrap());
                                // Polling the connection sends the headers.
                                let sent = Duration::from_millis(200);
                                let _ = tokio::time::timeout(sent, connection.accept()).await;
                            }
                            // The connection goes; the call's handles stay,
                            // so that no reset of the stream is sent.
                            drop(connection);
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            drop((respond, body));
                            return;
                        }
                        let mut body = respond.send_response(head(), false).unwrap();
                        let message = HealthCheckResponse {
                            status: ServingStatus::Serving as i32,
                        }
                        .encode_to_vec();
                        // gRPC framing: not compressed, then the length.
                        let mut frame = vec![0];
                        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                        frame.extend_from_slice(&message);
                        body.send_data(frame.into(), false).unwrap();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        body.send_trailers(trailers).unwrap();
                    }
                });
            }
        });
        (addr, taken)
    }

    #[tokio::test]
    async fn a_call_whose_connection_breaks_is_unavailable_and_not_sent_again() {
        let (addr, taken) = breaking_server(1, Cut::BeforeAnswer).await;
        let status = check(addr, ResendWhenSafe::new).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), CONNECTION_LOST, "{status:?}");
        assert_eq!(taken.load(Ordering::Relaxed), 1, "sent once only");
    }

    #[tokio::test]
    async fn an_idempotent_call_whose_connection_breaks_is_sent_again() {
        let (addr, taken) = breaking_server(2, Cut::BeforeAnswer).await;
        let answer = check(addr, checks_idempotent).await.unwrap();
        assert_eq!(answer.status, ServingStatus::Serving as i32);
        assert_eq!(taken.load(Ordering::Relaxed), 3, "sent three times");
    }

    #[tokio::test]
    async fn an_answer_cut_off_is_unavailable_and_not_sent_again() {
        // Even an idempotent call: its answer was on its way.
        let (addr, taken) = breaking_server(1, Cut::MidAnswer).await;
        let status = check(addr, checks_idempotent).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), CONNECTION_LOST, "{status:?}");
        assert_eq!(taken.load(Ordering::Relaxed), 1, "sent once only");
    }

    /// Resends with Health/Check declared idempotent.
    fn checks_idempotent(inner: Channel) -> ResendWhenSafe<Channel> {
        ResendWhenSafe {
            inner,
            idempotent: |path| path == "/grpc.health.v1.Health/Check",
        }
    }

    #[tokio::test]
    async fn a_call_that_cannot_be_sent_is_unavailable() {
        // Nothing listens there: the connection is refused, every time.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let status = check(addr, ResendWhenSafe::new).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    /// One Health/Check to `addr` through the resending channel `resend`
    /// makes.
    async fn check(
        addr: SocketAddr,
        resend: fn(Channel) -> ResendWhenSafe<Channel>,
    ) -> Result<HealthCheckResponse, Status> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut client = HealthClient::new(resend(channel));
        client
            .check(HealthCheckRequest::default())
            .await
            .map(tonic::Response::into_inner)
    }
}
