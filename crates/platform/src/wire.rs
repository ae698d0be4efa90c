//! What a server's connections carry: every accepted connection (gRPC or the
//! HTTP/1.1 JSON baseline) is wrapped in a [`CountedIo`] that adds the bytes
//! read and written to process-wide counters and keeps a gauge of open
//! connections. These are application-layer bytes, as the socket sees them
//! (HTTP/2 or HTTP/1.1 framing and headers included, TCP/IP headers not), so
//! the two transports can be compared on what they put on the wire.

use std::{
    io::IoSlice,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// The counters every accepted server connection adds to. Cheap to clone.
#[derive(Clone, Debug)]
pub struct WireMetrics {
    received: Counter,
    sent: Counter,
    open: Gauge,
    accepted: Counter,
}

impl WireMetrics {
    /// The process's counters, registered in `metrics` by the first server
    /// that asks (every server of a `flashmesh up` process shares them).
    pub fn new(metrics: &Metrics) -> Self {
        let bytes = metrics.counter_family::<1>(
            "flashmesh_server_transport_bytes",
            "Bytes read from and written to accepted server connections (application layer: HTTP/2 or HTTP/1.1 framing included, TCP/IP headers not)",
        );
        // One statement each: the family's read guard lives to the end of
        // the statement, and creating the next label set needs its write lock.
        let direction = |name: &str| [("direction", name.to_owned())];
        let received = bytes.get_or_create(&direction("received")).clone();
        let sent = bytes.get_or_create(&direction("sent")).clone();
        Self {
            received,
            sent,
            open: metrics.family(
                "flashmesh_server_connections_open",
                "Accepted server connections open now",
                Gauge::default,
            ),
            accepted: metrics.family(
                "flashmesh_server_connections_accepted",
                "Server connections accepted",
                Counter::default,
            ),
        }
    }

    /// `io`, counted until it is dropped.
    pub fn count<T>(&self, io: T) -> CountedIo<T> {
        self.accepted.inc();
        self.open.inc();
        CountedIo {
            inner: io,
            metrics: self.clone(),
        }
    }
}

/// A connection whose traffic is counted in [`WireMetrics`]; it leaves the
/// open-connections gauge when dropped.
#[derive(Debug)]
pub struct CountedIo<T> {
    inner: T,
    metrics: WireMetrics,
}

impl<T> Drop for CountedIo<T> {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

fn add(counter: &Counter, poll: &Poll<std::io::Result<usize>>) {
    if let Poll::Ready(Ok(n)) = poll {
        counter.inc_by(*n as u64);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.metrics
                .received
                .inc_by((buf.filled().len() - before) as u64);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        add(&self.metrics.sent, &poll);
        poll
    }

    // Delegated so that hyper and h2 keep writing several buffers per
    // syscall, as they do on a bare TcpStream.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        add(&self.metrics.sent, &poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for CountedIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn value(text: &str, series: &str) -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .map(|rest| rest.trim().to_owned())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    }

    #[tokio::test]
    async fn bytes_both_ways_and_open_connections_are_counted() {
        let metrics = Metrics::default();
        let wire = WireMetrics::new(&metrics);
        let (client, server) = tokio::io::duplex(64);
        let mut server = wire.count(server);
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        let mut received = [0u8; 5];
        server.read_exact(&mut received).await.unwrap();
        server.write_all(b"hi there").await.unwrap();
        server.flush().await.unwrap();
        let text = metrics.render();
        assert_eq!(
            value(
                &text,
                r#"flashmesh_server_transport_bytes_total{direction="received"}"#
            ),
            "5"
        );
        assert_eq!(
            value(
                &text,
                r#"flashmesh_server_transport_bytes_total{direction="sent"}"#
            ),
            "8"
        );
        assert_eq!(value(&text, "flashmesh_server_connections_open "), "1");
        // A second server in the process shares the counters.
        let second = WireMetrics::new(&metrics).count(tokio::io::duplex(8).1);
        drop(server);
        let text = metrics.render();
        assert_eq!(value(&text, "flashmesh_server_connections_open "), "1");
        assert_eq!(
            value(&text, "flashmesh_server_connections_accepted_total "),
            "2"
        );
        drop(second);
        assert_eq!(
            value(&metrics.render(), "flashmesh_server_connections_open "),
            "0"
        );
    }
}
