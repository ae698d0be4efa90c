//! Publish/subscribe for notifications between replicas (cache invalidation,
//! stock changes): Redis PUBLISH/SUBSCRIBE when `REDIS_URL` is set, an
//! in-process broadcast otherwise, with the same semantics.
//!
//! Delivery is at most once. Whenever messages may have been lost — a
//! subscriber fell more than [`CHANNEL_CAPACITY`] messages behind, or the
//! Redis connection dropped and was re-established — subscribers receive
//! [`Delivery::Missed`], so they can fall back to something safe (a cache
//! drops everything) instead of silently diverging.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use redis::{
    RedisError,
    aio::{PubSubSink, PubSubStream},
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::redis::{RedisHandle, within};

/// Messages buffered per channel for the slowest subscriber; beyond that it
/// is told [`Delivery::Missed`] rather than holding memory without bound.
pub const CHANNEL_CAPACITY: usize = 1024;

/// How long a connect or a subscribe may take before the connection counts
/// as lost.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection that silently died (no FIN, e.g. a network partition) is
/// noticed by its next ping.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("message bus unavailable: {0}")]
pub struct BusError(#[from] RedisError);

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Message(Arc<[u8]>),
    /// Messages may have been lost since the previous delivery.
    Missed,
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Sends `payload` to every current subscriber of `channel`, in every
    /// replica. Nobody listening is not an error.
    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BusError>;
    /// Starts listening on `channel`. When it returns, messages published
    /// from then on are delivered; if the bus could not confirm that (Redis
    /// down), the subscription gets [`Delivery::Missed`] once it is live.
    async fn subscribe(&self, channel: &str) -> Subscription;
}

/// The bus the configuration asks for.
pub fn bus(redis: Option<&RedisHandle>) -> Arc<dyn Bus> {
    match redis {
        Some(redis) => Arc::new(RedisBus::new(redis)),
        None => Arc::new(LocalBus::default()),
    }
}

pub struct Subscription {
    receiver: broadcast::Receiver<Delivery>,
}

impl Subscription {
    /// The next delivery; `None` once the bus is gone.
    pub async fn recv(&mut self) -> Option<Delivery> {
        match self.receiver.recv().await {
            Ok(delivery) => Some(delivery),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Delivery::Missed),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// The subscribers of each channel, shared by both buses.
#[derive(Default)]
struct Channels(Mutex<HashMap<String, broadcast::Sender<Delivery>>>);

impl Channels {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<Delivery>>> {
        // Every update is a single map operation; a panic cannot leave one half done.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn subscribe(&self, name: &str) -> Subscription {
        let receiver = self
            .lock()
            .entry(name.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        Subscription { receiver }
    }

    /// Hands `delivery` to the subscribers of `name`; false, and the channel
    /// is forgotten, when there are none left.
    fn deliver(&self, name: &str, delivery: Delivery) -> bool {
        let mut channels = self.lock();
        let Some(sender) = channels.get(name) else {
            return false;
        };
        if sender.send(delivery).is_ok() {
            return true;
        }
        channels.remove(name);
        false
    }

    /// The channels somebody still listens on.
    fn names(&self) -> Vec<String> {
        let mut channels = self.lock();
        channels.retain(|_, sender| sender.receiver_count() > 0);
        channels.keys().cloned().collect()
    }
}

/// In-process: reaches subscribers of this process only.
#[derive(Default)]
pub struct LocalBus {
    channels: Channels,
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BusError> {
        self.channels
            .deliver(channel, Delivery::Message(payload.into()));
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Subscription {
        self.channels.subscribe(channel)
    }
}

/// Redis channels under the key prefix. Publishing goes through the shared
/// connection; receiving needs a connection of its own, kept by a background
/// task that reconnects with backoff and resubscribes until the bus is
/// dropped.
pub struct RedisBus {
    redis: RedisHandle,
    channels: Arc<Channels>,
    requests: mpsc::Sender<SubscribeRequest>,
}

struct SubscribeRequest {
    channel: String,
    confirm: oneshot::Sender<()>,
}

impl RedisBus {
    /// Returns at once; the pub/sub connection is opened in the background.
    pub fn new(redis: &RedisHandle) -> Self {
        let channels = Arc::new(Channels::default());
        let (requests, inbox) = mpsc::channel(16);
        tokio::spawn(listen(redis.client().clone(), channels.clone(), inbox));
        Self {
            redis: redis.clone(),
            channels,
            requests,
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BusError> {
        within(
            COMMAND_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(self.redis.key(channel))
                .arg(payload)
                .query_async::<()>(&mut self.redis.connection()),
        )
        .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Subscription {
        let channel = self.redis.key(channel);
        let subscription = self.channels.subscribe(&channel);
        let (confirm, confirmed) = oneshot::channel();
        if self
            .requests
            .send(SubscribeRequest { channel, confirm })
            .await
            .is_ok()
        {
            // Dropped unconfirmed while Redis is unreachable: the channel is
            // already registered, so the next connection subscribes it and
            // reports the gap.
            drop(confirmed.await);
        }
        subscription
    }
}

/// Keeps one connection subscribed to every channel somebody listens on.
async fn listen(
    client: redis::Client,
    channels: Arc<Channels>,
    mut requests: mpsc::Receiver<SubscribeRequest>,
) {
    // Channels whose subscribers may have missed messages: subscribed on a
    // connection that was lost, or released unconfirmed during an outage.
    let mut gaps: HashSet<String> = HashSet::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect(&client, &channels).await {
            Ok((sink, stream, mut subscribed)) => {
                backoff = MIN_BACKOFF;
                for name in gaps.drain().filter(|name| subscribed.contains(name)) {
                    channels.deliver(&name, Delivery::Missed);
                }
                match serve(sink, stream, &mut subscribed, &channels, &mut requests).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis pub/sub connection lost; reconnecting");
                        gaps.extend(subscribed);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot open the Redis pub/sub connection");
            }
        }
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                // Dropping the request releases its caller unconfirmed.
                request = requests.recv() => match request {
                    Some(request) => { gaps.insert(request.channel); }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(
    client: &redis::Client,
    channels: &Channels,
) -> Result<(PubSubSink, PubSubStream, HashSet<String>), RedisError> {
    let (mut sink, stream) = within(COMMAND_TIMEOUT, client.get_async_pubsub())
        .await?
        .split();
    let names = channels.names();
    if !names.is_empty() {
        within(COMMAND_TIMEOUT, sink.subscribe(&names)).await?;
    }
    Ok((sink, stream, names.into_iter().collect()))
}

/// Forwards messages and takes new subscriptions until the connection fails
/// (`Err`) or the bus is dropped (`Ok`).
async fn serve(
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    subscribed: &mut HashSet<String>,
    channels: &Channels,
    requests: &mut mpsc::Receiver<SubscribeRequest>,
) -> Result<(), RedisError> {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "Redis closed the pub/sub connection",
                    )
                    .into());
                };
                let name = message.get_channel_name();
                let payload = Delivery::Message(message.get_payload_bytes().into());
                if !channels.deliver(name, payload) {
                    // Nobody listens any more; stop Redis sending it.
                    subscribed.remove(name);
                    within(COMMAND_TIMEOUT, sink.unsubscribe(name)).await?;
                }
            }
            request = requests.recv() => {
                let Some(SubscribeRequest { channel, confirm }) = request else {
                    return Ok(());
                };
                // Recorded first: if this fails, the caller is released
                // unconfirmed and the channel is owed a gap report.
                if subscribed.insert(channel.clone()) {
                    within(COMMAND_TIMEOUT, sink.subscribe(&channel)).await?;
                }
                // The caller may have given up waiting; nothing to undo.
                let _ = confirm.send(());
            }
            _ = ping.tick() => {
                within(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await?;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use tokio::{net::TcpListener, task::JoinHandle};

    use super::*;

    const WAIT: Duration = Duration::from_secs(15);

    pub(crate) fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// A handle on the test Redis under a prefix of this test's own.
    pub(crate) async fn redis_handle(prefix: &str) -> RedisHandle {
        let url = redis_url();
        RedisHandle::connect(&url, prefix)
            .await
            .unwrap_or_else(|e| {
                panic!("these tests need Redis at {url} (set REDIS_URL, or run scripts/test): {e}")
            })
    }

    pub(crate) fn unique_prefix() -> String {
        format!("test:{}:", uuid::Uuid::new_v4())
    }

    /// A TCP relay in front of the test Redis that can be taken down and
    /// brought back on the same port: a Redis outage that affects nobody else.
    pub(crate) struct Proxy {
        addr: SocketAddr,
        upstream: String,
        relay: Option<JoinHandle<()>>,
    }

    impl Proxy {
        pub(crate) async fn start() -> Self {
            let url = redis_url();
            let client = redis::Client::open(url.as_str()).expect("REDIS_URL is not a Redis URL");
            let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr() else {
                panic!("the outage tests relay TCP; REDIS_URL={url} is not plain TCP");
            };
            let upstream = format!("{host}:{port}");
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the relay");
            let addr = listener.local_addr().expect("relay address");
            let mut proxy = Self {
                addr,
                upstream,
                relay: None,
            };
            proxy.relay = Some(tokio::spawn(relay(listener, proxy.upstream.clone())));
            proxy
        }

        /// The Redis URL through the relay (database and credentials as in REDIS_URL).
        pub(crate) fn url(&self) -> String {
            let client = redis::Client::open(redis_url().as_str()).expect("REDIS_URL");
            let info = client.get_connection_info().redis_settings();
            let auth = match (info.username(), info.password()) {
                (Some(user), Some(password)) => format!("{user}:{password}@"),
                (None, Some(password)) => format!(":{password}@"),
                _ => String::new(),
            };
            format!("redis://{auth}{}/{}", self.addr, info.db())
        }

        /// Closes the listener and every relayed connection.
        pub(crate) async fn stop(&mut self) {
            if let Some(relay) = self.relay.take() {
                relay.abort();
                drop(relay.await);
            }
        }

        pub(crate) async fn restart(&mut self) {
            let listener = TcpListener::bind(self.addr)
                .await
                .expect("rebind the relay");
            self.relay = Some(tokio::spawn(relay(listener, self.upstream.clone())));
        }
    }

    async fn relay(listener: TcpListener, upstream: String) {
        // Dropped with this task, the set aborts every connection.
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            connections.spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    drop(tokio::io::copy_bidirectional(&mut client, &mut server).await);
                }
            });
        }
    }

    async fn next(subscription: &mut Subscription) -> Delivery {
        tokio::time::timeout(WAIT, subscription.recv())
            .await
            .expect("no delivery in time")
            .expect("bus gone")
    }

    fn message(payload: &str) -> Delivery {
        Delivery::Message(payload.as_bytes().into())
    }

    /// Two subscribers of `a` and one of `b` all get what `b` publishes.
    async fn fan_out(a: &dyn Bus, b: &dyn Bus) {
        let mut first = a.subscribe("deals").await;
        let mut second = a.subscribe("deals").await;
        let mut third = b.subscribe("deals").await;
        let mut other = a.subscribe("orders").await;
        b.publish("deals", b"42").await.unwrap();
        b.publish("orders", b"7").await.unwrap();
        assert_eq!(next(&mut first).await, message("42"));
        assert_eq!(next(&mut second).await, message("42"));
        assert_eq!(next(&mut third).await, message("42"));
        assert_eq!(next(&mut other).await, message("7"));
    }

    #[tokio::test]
    async fn local_bus_delivers_to_every_subscriber() {
        let bus = LocalBus::default();
        fan_out(&bus, &bus).await;
    }

    #[tokio::test]
    async fn redis_bus_delivers_to_every_subscriber_in_every_replica() {
        let redis = redis_handle(&unique_prefix()).await;
        fan_out(&RedisBus::new(&redis), &RedisBus::new(&redis)).await;
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_it_missed_messages() {
        let bus = LocalBus::default();
        let mut subscription = bus.subscribe("deals").await;
        for i in 0..=CHANNEL_CAPACITY {
            bus.publish("deals", i.to_string().as_bytes())
                .await
                .unwrap();
        }
        assert_eq!(next(&mut subscription).await, Delivery::Missed);
        assert_eq!(next(&mut subscription).await, message("1"));
    }

    #[tokio::test]
    async fn redis_bus_resubscribes_after_an_outage_and_reports_the_gap() {
        let prefix = unique_prefix();
        let publisher = RedisBus::new(&redis_handle(&prefix).await);
        let mut proxy = Proxy::start().await;
        let through_proxy = RedisHandle::connect(&proxy.url(), &prefix)
            .await
            .expect("connect through the relay");
        let bus = RedisBus::new(&through_proxy);
        let mut deals = bus.subscribe("deals").await;
        let mut orders = bus.subscribe("orders").await;
        publisher.publish("deals", b"before").await.unwrap();
        assert_eq!(next(&mut deals).await, message("before"));

        proxy.stop().await;
        publisher.publish("deals", b"lost").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.restart().await;

        assert_eq!(next(&mut deals).await, Delivery::Missed);
        assert_eq!(next(&mut orders).await, Delivery::Missed);
        publisher.publish("deals", b"after").await.unwrap();
        publisher.publish("orders", b"after").await.unwrap();
        assert_eq!(next(&mut deals).await, message("after"));
        assert_eq!(next(&mut orders).await, message("after"));
    }
}
