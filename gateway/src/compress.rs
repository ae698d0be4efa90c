//! gzip/br for large answers, by tower-http's compression, paid only by the
//! answers that get compressed.
//!
//! tower-http's `CompressionLayer` wraps every body in a `CompressionBody`,
//! whose encoder states make it about 6 KB; axum boxes each body, so every
//! answer (a 400-byte deal, each open SSE stream) would carry that
//! allocation. [`CompressLargeLayer`] asks the same predicate first and hands
//! only a qualifying answer, with the caller's `Accept-Encoding`, to
//! tower-http's `Compression`.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    task::{Context, Poll},
};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, header},
    response::Response,
};
use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt};
use tower_http::compression::{
    Compression, Predicate,
    predicate::{And, DefaultPredicate, SizeAbove},
};

type CompressWhen = And<DefaultPredicate, SizeAbove>;

/// Compresses answers of at least `min_bytes` (and of a compressible type,
/// as tower-http's default predicate says) for callers that accept it.
#[derive(Clone)]
pub struct CompressLargeLayer {
    predicate: CompressWhen,
}

impl CompressLargeLayer {
    pub fn new(min_bytes: u16) -> Self {
        Self {
            predicate: DefaultPredicate::new().and(SizeAbove::new(min_bytes)),
        }
    }
}

impl<S> Layer<S> for CompressLargeLayer {
    type Service = CompressLarge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CompressLarge {
            inner,
            predicate: self.predicate.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CompressLarge<S> {
    inner: S,
    predicate: CompressWhen,
}

impl<S> Service<Request> for CompressLarge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let accepted = request.headers().get(header::ACCEPT_ENCODING).cloned();
        let predicate = self.predicate.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            match accepted {
                Some(accepted) if predicate.should_compress(&response) => {
                    Ok(compress(response, accepted, predicate).await)
                }
                _ => Ok(response),
            }
        })
    }
}

/// `response` through tower-http's `Compression`, negotiated against the
/// caller's `Accept-Encoding`.
async fn compress(response: Response, accepted: HeaderValue, predicate: CompressWhen) -> Response {
    let mut negotiation = Request::new(Body::empty());
    negotiation
        .headers_mut()
        .insert(header::ACCEPT_ENCODING, accepted);
    let compressed = Compression::new(Answered(Some(response)))
        .compress_when(predicate)
        .oneshot(negotiation)
        .await;
    match compressed {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    }
}

/// A service that answers its one call with a response already made.
struct Answered(Option<Response>);

impl Service<Request> for Answered {
    type Response = Response;
    type Error = Infallible;
    type Future = Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> Self::Future {
        // Called once, by `oneshot`.
        ready(Ok(self.0.take().unwrap_or_default()))
    }
}
