//! The gateway's accept loop: HTTP/1.1 and h2c on one port.
//!
//! `axum::serve` tells the two apart by reading the first bytes and handing
//! hyper a stream that replays them; hyper's HTTP/1.1 reader then grows its
//! 8 KiB buffer to 16 KiB to fit the replayed bytes plus a full read, on
//! every connection — 8 KiB more for each of thousands of idle SSE clients.
//! Here the first bytes are *peeked* from the socket, so hyper reads the
//! request itself and its buffer stays at 8 KiB.

use std::time::Duration;

use axum::{Router, extract::ConnectInfo};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a new connection may take to send its first bytes.
const PREFACE_WAIT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown`, then lets every open
/// connection finish, as `axum::serve` with graceful shutdown does.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: keep serving the others.
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // SSE events and small answers go out at once, not after an ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = router
            .clone()
            .map_request(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(PREFACE_WAIT, speaks_h2(&tcp)).await {
                Ok(Ok(true)) => {
                    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
                    watcher.watch(connection).await
                }
                Ok(Ok(false)) => {
                    // The timer arms hyper's header-read timeout (30 s): a
                    // client trickling its request head cannot hold a slot.
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
                    watcher.watch(connection).await
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "connection closed before its first request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no request within {PREFACE_WAIT:?}");
                    return;
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Whether the client opened with the HTTP/2 preface (prior knowledge h2c),
/// read without consuming it. Waits only as long as the bytes so far could
/// still be the preface.
async fn speaks_h2(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0; H2_PREFACE.len()];
    loop {
        let n = tcp.peek(&mut first).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A partial preface (rare: clients send it in one piece). Peeking
        // leaves the socket readable, so wait a little rather than spin.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
