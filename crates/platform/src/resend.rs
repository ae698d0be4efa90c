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
//! [`ResendUnsent`] keeps each call's request until the channel has taken
//! it, and sends it again, on a connection of its own, up to [`SENDS`] times
//! in all.

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

/// A tonic channel whose calls are sent again when they never went out.
/// For calls with one request message (unary and server-streaming, all
/// that flashmesh's channels carry): the message is buffered, so that a
/// second send has it.
#[derive(Clone)]
pub struct ResendUnsent<S> {
    inner: S,
}

impl<S> ResendUnsent<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<http::Request<Body>> for ResendUnsent<S>
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
        Box::pin(send(ready, request))
    }
}

async fn send<S>(mut ready: S, request: http::Request<Body>) -> Result<http::Response<Body>, Status>
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
            Err(error) if unprocessed(&error) && sends < SENDS => {
                sends += 1;
                ready.ready().await.map_err(status)?;
            }
            answer => return answer.map_err(status),
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
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return true;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        source = error.source();
    }
    false
}

/// A transport failure as the status tonic's clients would report (a
/// refused connection is UNAVAILABLE), except that a call still
/// unprocessed after every try is UNAVAILABLE too, never CANCELLED (nobody
/// cancelled it) or INTERNAL (nothing went wrong but a closing connection).
fn status(error: tonic::transport::Error) -> Status {
    if unprocessed(&error) {
        return Status::unavailable("the connection closed before the service took the call");
    }
    Status::from_error(Box::new(error))
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

    use tonic::transport::{Channel, Server, server::TcpIncoming};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
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
    /// `duration`: (answered, failed, one failure's status).
    async fn hammer(
        channel: BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>,
        callers: usize,
        duration: Duration,
    ) -> (u64, u64, Option<Status>) {
        let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let deadline = Instant::now() + duration;
        let loops = (0..callers).map(|_| {
            let mut client = HealthClient::new(channel.clone());
            let (answered, failed) = (answered.clone(), failed.clone());
            tokio::spawn(async move {
                let mut failure = None;
                while Instant::now() < deadline {
                    match client.check(HealthCheckRequest::default()).await {
                        Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            failure = Some(status);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                failure
            })
        });
        let failures = futures::future::join_all(loops).await;
        let failure = failures.into_iter().find_map(|f| f.unwrap());
        (
            answered.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            failure,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_racing_a_goaway_are_sent_again_and_all_answered() {
        // A GOAWAY every 100 ms under 64 callers: some thirty connections
        // close with calls queued on them (without resending, hundreds of
        // calls fail).
        let addr = ageing_server(Duration::from_millis(100)).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let (answered, failed, failure) = hammer(
            BoxCloneSyncService::new(ResendUnsent::new(channel)),
            64,
            Duration::from_secs(3),
        )
        .await;
        assert!(answered > 1_000, "only {answered} calls answered");
        assert_eq!(failed, 0, "{failed} of {answered} failed: {failure:?}");
    }

    #[tokio::test]
    async fn a_call_that_cannot_be_sent_is_unavailable() {
        // Nothing listens there: the connection is refused, every time.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut client = HealthClient::new(ResendUnsent::new(channel));
        let status = client
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}
