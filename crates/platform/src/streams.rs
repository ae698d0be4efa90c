//! An event log on Redis Streams: the order service's outbox relay appends to
//! it, consumer groups (an order-status projector, per-deal sales counters)
//! read it.
//!
//! - **At least once**: an entry is acknowledged only once its handler
//!   succeeded or it was dead-lettered, so a crash between handling and
//!   acknowledging, or a reclaim of an entry whose handler is slow, delivers
//!   it again. Handlers dedupe on [`StreamEvent::event_id`].
//! - **Order**: [`EventStream::publish`] appends in the order given. A group
//!   spreads entries over its consumers and a failed entry is retried after
//!   newer ones, so handlers must not rely on arrival order (compare versions
//!   carried in the payload instead).
//! - **Failures**: a failed entry stays pending; once idle longer than
//!   [`ConsumerSettings::claim_idle`] any consumer of the group reclaims it
//!   (XAUTOCLAIM). After [`ConsumerSettings::max_deliveries`] deliveries it is
//!   moved to the dead-letter stream `<name>.dlq` with the reason, as is an
//!   entry that is malformed or whose payload does not match its SHA-256 at
//!   once.
//! - **Redis outages** do not stop a consumer: it logs, backs off (capped) and
//!   carries on, recreating its group if the stream vanished meanwhile.
//! - **Trimming**: streams are capped at about `max_len` entries (XADD MAXLEN
//!   ~). Entries trimmed before a group handled them are lost to it; the
//!   consumer logs when it notices.

use std::{collections::HashMap, fmt, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::FutureExt;
use opentelemetry::{KeyValue, context::FutureExt as _, trace::SpanKind};
use redis::{
    AsyncConnectionConfig, RedisResult, Value,
    aio::MultiplexedConnection,
    streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply},
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    redis::{RedisHandle, within},
    telemetry::{self, Telemetry},
};

/// How long a quick command (ack, claim, dead-letter) may take before Redis
/// counts as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A publish pipeline carries a whole batch of the relay's events.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its BLOCK time a read may take before its connection
/// is presumed dead (e.g. a network partition without a FIN).
const READ_MARGIN: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Floor of the reclaim period, so a tiny `claim_idle` cannot spin.
const MIN_CLAIM_INTERVAL: Duration = Duration::from_millis(10);

const EVENT_ID: &str = "event_id";
const KEY: &str = "key";
const KIND: &str = "kind";
const PAYLOAD: &str = "payload";
const TRACEPARENT: &str = "traceparent";
const SHA256: &str = "sha256";
/// The fields of every entry, in the order they are written.
const FIELDS: [&str; 6] = [EVENT_ID, KEY, KIND, PAYLOAD, TRACEPARENT, SHA256];

/// What a dead-letter entry says about itself, ahead of the original fields.
const DLQ_REASON: &str = "reason";
const DLQ_ENTRY_ID: &str = "entry_id";
const DLQ_GROUP: &str = "group";
const DLQ_STREAM: &str = "stream";
const DLQ_FIELDS: [&str; 4] = [DLQ_REASON, DLQ_ENTRY_ID, DLQ_GROUP, DLQ_STREAM];

/// One event as it travels through the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// Unique (a UUIDv7 string); consumers dedupe on it.
    pub event_id: String,
    /// The aggregate it belongs to, e.g. an order id.
    pub key: String,
    /// E.g. `order.state_changed`.
    pub kind: String,
    /// Opaque bytes (protobuf).
    pub payload: Vec<u8>,
    /// W3C trace context; may be empty.
    pub traceparent: String,
    /// Lowercase hex SHA-256 of `payload`, computed where the event was
    /// created, so corruption anywhere on the way is noticed.
    pub content_hash: String,
}

impl StreamEvent {
    pub fn new(
        event_id: impl Into<String>,
        key: impl Into<String>,
        kind: impl Into<String>,
        payload: Vec<u8>,
        traceparent: impl Into<String>,
    ) -> Self {
        Self {
            event_id: event_id.into(),
            key: key.into(),
            kind: kind.into(),
            content_hash: content_hash(&payload),
            payload,
            traceparent: traceparent.into(),
        }
    }

    pub fn hash_matches(&self) -> bool {
        content_hash(&self.payload).eq_ignore_ascii_case(&self.content_hash)
    }

    /// What every consumer checks before handling: the ids are there and
    /// the payload is the one that was hashed.
    pub fn verify(&self) -> Result<(), DeadLetterReason> {
        let empty: Vec<&str> = [
            (EVENT_ID, &self.event_id),
            (KEY, &self.key),
            (KIND, &self.kind),
        ]
        .into_iter()
        .filter(|(_, value)| value.is_empty())
        .map(|(name, _)| name)
        .collect();
        if !empty.is_empty() {
            return Err(DeadLetterReason::Malformed(format!(
                "empty {}",
                empty.join(", ")
            )));
        }
        if !self.hash_matches() {
            return Err(DeadLetterReason::HashMismatch);
        }
        Ok(())
    }

    /// The entry's fields, as written by [`EventStream::publish`].
    fn fields(&self) -> [(&'static str, &[u8]); 6] {
        [
            (EVENT_ID, self.event_id.as_bytes()),
            (KEY, self.key.as_bytes()),
            (KIND, self.kind.as_bytes()),
            (PAYLOAD, &self.payload),
            (TRACEPARENT, self.traceparent.as_bytes()),
            (SHA256, self.content_hash.as_bytes()),
        ]
    }

    /// Reads an entry's fields. The hash is not checked here: see
    /// [`StreamEvent::verify`].
    fn from_entry(map: &HashMap<String, Value>) -> Result<Self, DeadLetterReason> {
        let field = |name: &str| map.get(name).and_then(value_bytes);
        let missing: Vec<&str> = FIELDS
            .into_iter()
            .filter(|name| field(name).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(DeadLetterReason::Malformed(format!(
                "missing {}",
                missing.join(", ")
            )));
        }
        let text = |name: &str| {
            std::str::from_utf8(field(name).unwrap_or_default())
                .map(str::to_owned)
                .map_err(|_| DeadLetterReason::Malformed(format!("{name} is not UTF-8")))
        };
        Ok(Self {
            event_id: text(EVENT_ID)?,
            key: text(KEY)?,
            kind: text(KIND)?,
            payload: field(PAYLOAD).unwrap_or_default().to_vec(),
            traceparent: text(TRACEPARENT)?,
            content_hash: text(SHA256)?,
        })
    }
}

/// Lowercase hex SHA-256 of `payload`.
pub fn content_hash(payload: &[u8]) -> String {
    format!("{:x}", Sha256::digest(payload))
}

/// Why an event was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// What is missing or wrong.
    Malformed(String),
    HashMismatch,
    HandlerFailed {
        attempts: u64,
        error: String,
    },
}

impl DeadLetterReason {
    /// Human-readable; stored in the dead-letter entry's `reason` field.
    pub fn describe(&self) -> String {
        match self {
            Self::Malformed(what) => format!("malformed entry: {what}"),
            Self::HashMismatch => {
                "content hash mismatch: sha256 does not match the payload".to_owned()
            }
            Self::HandlerFailed { attempts, error } => {
                format!("handler failed after {attempts} attempt(s): {error}")
            }
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Must be idempotent: an event may be delivered more than once.
    async fn handle(
        &self,
        event: &StreamEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// What to do with an event after one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledge it.
    Handled,
    /// Leave it to be delivered again; the handler's error.
    Retry(String),
    /// Move it to the dead-letter stream, then acknowledge it.
    DeadLetter(DeadLetterReason),
}

/// Verifies and handles one event on its `delivery`-th attempt (1-based),
/// the policy shared by the Redis consumer and the in-process dispatcher.
///
/// An event that fails verification is dead-lettered without reaching the
/// handler. A failure on delivery `max_deliveries` (at least 1) dead-letters
/// it. A delivery beyond `max_deliveries` means earlier ones ended without an
/// outcome — the consumer stopped or crashed while handling it, perhaps
/// because of it — so it is dead-lettered without another try rather than
/// take every replica down in turn. A panicking handler counts as failing.
pub async fn process(
    handler: &dyn EventHandler,
    event: &StreamEvent,
    delivery: u64,
    max_deliveries: u64,
) -> Outcome {
    if let Err(reason) = event.verify() {
        return Outcome::DeadLetter(reason);
    }
    let max_deliveries = max_deliveries.max(1);
    if delivery > max_deliveries {
        let attempts = delivery - 1;
        return Outcome::DeadLetter(DeadLetterReason::HandlerFailed {
            attempts,
            error: format!(
                "no outcome after {attempts} deliveries (the consumer stopped or crashed while handling it)"
            ),
        });
    }
    let error = match AssertUnwindSafe(handler.handle(event)).catch_unwind().await {
        Ok(Ok(())) => return Outcome::Handled,
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("handler panicked: {}", panic_message(panic.as_ref())),
    };
    if delivery >= max_deliveries {
        Outcome::DeadLetter(DeadLetterReason::HandlerFailed {
            attempts: delivery,
            error,
        })
    } else {
        Outcome::Retry(error)
    }
}

/// Handles each event in a consumer span *linked* to the request that
/// caused it (its `traceparent`), in a trace of its own; kept when that
/// request was sampled.
pub struct TracedHandler {
    inner: Arc<dyn EventHandler>,
    telemetry: Telemetry,
    group: &'static str,
}

impl TracedHandler {
    /// `inner` as consumer group `group` of `telemetry`'s service.
    pub fn wrap(
        inner: Arc<dyn EventHandler>,
        telemetry: &Telemetry,
        group: &'static str,
    ) -> Arc<dyn EventHandler> {
        if !telemetry.tracing() {
            return inner;
        }
        Arc::new(Self {
            inner,
            telemetry: telemetry.clone(),
            group,
        })
    }
}

#[async_trait]
impl EventHandler for TracedHandler {
    async fn handle(
        &self,
        event: &StreamEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let cause = telemetry::parse_traceparent(&event.traceparent, None);
        let span = self
            .telemetry
            .start_linked(cause, self.group, SpanKind::Consumer, || {
                vec![
                    KeyValue::new("messaging.operation.type", "process"),
                    KeyValue::new("messaging.consumer.group.name", self.group),
                    KeyValue::new("messaging.message.id", event.event_id.clone()),
                    KeyValue::new("messaging.message.kind", event.kind.clone()),
                ]
            });
        let Some(cx) = span else {
            return self.inner.handle(event).await;
        };
        let result = self.inner.handle(event).with_context(cx.clone()).await;
        telemetry::end(&cx, result.as_ref().err().map(|e| e as &dyn fmt::Display));
        result
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

/// A named stream (a key under the [`RedisHandle`] prefix) and its
/// dead-letter stream `<name>.dlq`.
#[derive(Clone)]
pub struct EventStream {
    redis: RedisHandle,
    key: String,
    dead_letter_key: String,
    max_len: usize,
}

impl EventStream {
    /// Both streams are trimmed to about `max_len` entries (at least 1).
    pub fn new(redis: &RedisHandle, name: &str, max_len: usize) -> Self {
        Self {
            redis: redis.clone(),
            key: redis.key(name),
            dead_letter_key: redis.key(&format!("{name}.dlq")),
            max_len: max_len.max(1),
        }
    }

    /// The stream's Redis key (prefix included).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The dead-letter stream's Redis key (prefix included).
    pub fn dead_letter_key(&self) -> String {
        self.dead_letter_key.clone()
    }

    /// Appends `events` in the given order (one pipeline on one connection,
    /// so Redis applies them in order; not atomic). Err when Redis is
    /// unreachable — then some of them may have been appended all the same,
    /// so a retry may duplicate them, which consumers dedupe.
    pub async fn publish(&self, events: &[StreamEvent]) -> RedisResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for event in events {
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*");
            for (name, value) in event.fields() {
                pipe.arg(name).arg(value);
            }
            pipe.ignore();
        }
        within(
            PUBLISH_TIMEOUT,
            pipe.query_async::<()>(&mut self.redis.connection()),
        )
        .await
    }

    /// Creates `group` reading from the start of the stream, and the stream
    /// if need be. An existing group is left as it is.
    pub async fn create_group(&self, group: &str) -> RedisResult<()> {
        let created = within(
            COMMAND_TIMEOUT,
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&self.key)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut self.redis.connection()),
        )
        .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Acknowledges `entry_ids` in `group`.
    pub async fn ack(&self, group: &str, entry_ids: &[String]) -> RedisResult<()> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        within(
            COMMAND_TIMEOUT,
            redis::cmd("XACK")
                .arg(&self.key)
                .arg(group)
                .arg(entry_ids)
                .query_async::<()>(&mut self.redis.connection()),
        )
        .await
    }

    /// Entries in the dead-letter stream.
    pub async fn dead_letter_len(&self) -> RedisResult<u64> {
        within(
            COMMAND_TIMEOUT,
            redis::cmd("XLEN")
                .arg(&self.dead_letter_key)
                .query_async(&mut self.redis.connection()),
        )
        .await
    }

    /// Appends entry `entry_id` to the dead-letter stream — `reason`,
    /// `entry_id`, `group` and `stream`, then its original `fields` (one that
    /// clashes with those four is renamed `original.<name>`) — and
    /// acknowledges it in `group`, both or neither (MULTI).
    pub async fn dead_letter(
        &self,
        group: &str,
        entry_id: &str,
        fields: &[(String, Vec<u8>)],
        reason: &DeadLetterReason,
    ) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(&self.dead_letter_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg(DLQ_REASON)
            .arg(reason.describe())
            .arg(DLQ_ENTRY_ID)
            .arg(entry_id)
            .arg(DLQ_GROUP)
            .arg(group)
            .arg(DLQ_STREAM)
            .arg(&self.key);
        for (name, value) in fields {
            if DLQ_FIELDS.contains(&name.as_str()) {
                pipe.arg(format!("original.{name}"));
            } else {
                pipe.arg(name);
            }
            pipe.arg(value);
        }
        pipe.ignore()
            .cmd("XACK")
            .arg(&self.key)
            .arg(group)
            .arg(entry_id)
            .ignore();
        within(
            COMMAND_TIMEOUT,
            pipe.query_async::<()>(&mut self.redis.connection()),
        )
        .await
    }
}

/// The bytes of a field value; entries hold bulk strings.
fn value_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// An entry's fields as they are copied into the dead-letter stream, sorted
/// by name.
fn entry_fields(map: &HashMap<String, Value>) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = map
        .iter()
        .map(|(name, value)| {
            let bytes = value_bytes(value)
                .map(<[u8]>::to_vec)
                .unwrap_or_else(|| format!("{value:?}").into_bytes());
            (name.clone(), bytes)
        })
        .collect();
    fields.sort();
    fields
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// E.g. `order-status-projector`.
    pub group: String,
    /// Unique per process: see [`unique_consumer_name`].
    pub consumer: String,
    /// COUNT for XREADGROUP and XAUTOCLAIM.
    pub batch: usize,
    /// XREADGROUP BLOCK; also bounds how long a stop takes.
    pub block: Duration,
    /// Pending entries idle longer than this are reclaimed. Must exceed the
    /// slowest handler, or entries being handled are handled twice.
    pub claim_idle: Duration,
    /// Dead-letter after this many failed deliveries. A delivery cut short by
    /// a stop or a crash counts too, so leave some headroom.
    pub max_deliveries: u64,
}

impl ConsumerSettings {
    /// Defaults for `group` under a fresh [`unique_consumer_name`].
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_owned(),
            consumer: unique_consumer_name(group),
            batch: 100,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
        }
    }
}

/// `group`, the host (`HOSTNAME`, if set), the pid and a random suffix: two
/// replicas, or two consumers of one process, never share a name, which
/// would let one acknowledge what the other is handling.
pub fn unique_consumer_name(group: &str) -> String {
    let pid = std::process::id();
    let nonce: u32 = rand::random();
    match std::env::var("HOSTNAME") {
        Ok(host) if !host.is_empty() => format!("{group}-{host}-{pid}-{nonce:08x}"),
        _ => format!("{group}-{pid}-{nonce:08x}"),
    }
}

/// Runs one consumer of `settings.group` until `shutdown` is cancelled.
///
/// Creates the group if need be (from the start of the stream), reads new
/// entries, reclaims entries left idle longer than `claim_idle` by any
/// consumer of the group (every `claim_idle / 2`), and for each entry
/// follows [`process`]: acknowledges it once handled, leaves it pending to
/// be retried, or dead-letters and acknowledges it. Redis being unreachable,
/// or the group having vanished, is logged and retried with a capped
/// backoff. A stop interrupts the read or the handler in progress (the
/// entry is then reclaimed later) and acknowledges what was handled.
pub async fn run_consumer(
    stream: EventStream,
    settings: ConsumerSettings,
    handler: Arc<dyn EventHandler>,
    shutdown: CancellationToken,
) {
    let mut consumer = Consumer::new(stream, settings, handler, shutdown.clone());
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    while !shutdown.is_cancelled() {
        match consumer.step().await {
            Ok(()) => {
                if failing {
                    tracing::info!(
                        stream = %consumer.stream.key,
                        group = %consumer.settings.group,
                        "event stream consumer recovered"
                    );
                    failing = false;
                }
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                consumer.reset();
                // NOGROUP: the group (or its stream) is gone; UNBLOCKED: the
                // stream was deleted under a blocked read.
                if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) {
                    tracing::warn!(
                        stream = %consumer.stream.key,
                        group = %consumer.settings.group,
                        retry_in = ?backoff,
                        "the consumer group or its stream vanished; recreating it"
                    );
                } else {
                    tracing::warn!(
                        error = %e,
                        stream = %consumer.stream.key,
                        group = %consumer.settings.group,
                        retry_in = ?backoff,
                        "event stream consumer failed; retrying"
                    );
                }
                failing = true;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    tracing::debug!(
        stream = %consumer.stream.key,
        consumer = %consumer.settings.consumer,
        "event stream consumer stopped"
    );
}

struct Consumer {
    stream: EventStream,
    settings: ConsumerSettings,
    handler: Arc<dyn EventHandler>,
    shutdown: CancellationToken,
    /// Blocking reads get a connection of their own: on the shared
    /// multiplexed one, a blocked XREADGROUP would hold up every command
    /// queued behind it (Redis answers a connection's commands in order) and
    /// run into its 2 s response timeout. Everything else is quick and uses
    /// the shared connection.
    reader: Option<MultiplexedConnection>,
    group_ready: bool,
    claim_interval: Duration,
    next_claim: Instant,
}

impl Consumer {
    fn new(
        stream: EventStream,
        mut settings: ConsumerSettings,
        handler: Arc<dyn EventHandler>,
        shutdown: CancellationToken,
    ) -> Self {
        settings.batch = settings.batch.max(1);
        // BLOCK 0 waits forever; min-idle 0 would take entries being handled.
        settings.block = settings.block.max(Duration::from_millis(1));
        settings.claim_idle = settings.claim_idle.max(Duration::from_millis(1));
        let claim_interval = (settings.claim_idle / 2).max(MIN_CLAIM_INTERVAL);
        Self {
            stream,
            settings,
            handler,
            shutdown,
            reader: None,
            group_ready: false,
            claim_interval,
            next_claim: Instant::now(),
        }
    }

    /// After an error, start again from a new connection and make sure of
    /// the group (it may be what vanished).
    fn reset(&mut self) {
        self.reader = None;
        self.group_ready = false;
    }

    /// Reclaims if it is time to, then reads and handles one batch.
    async fn step(&mut self) -> RedisResult<()> {
        if !self.group_ready {
            self.stream.create_group(&self.settings.group).await?;
            self.group_ready = true;
        }
        if Instant::now() >= self.next_claim {
            self.reclaim().await?;
            self.next_claim = Instant::now() + self.claim_interval;
        }
        let until_claim = self.next_claim.saturating_duration_since(Instant::now());
        let entries = self.read(self.settings.block.min(until_claim)).await?;
        self.handle(entries.into_iter().map(|entry| (entry, 1)).collect())
            .await
    }

    /// New entries for this consumer, waiting up to `wait` for some; none
    /// when stopped meanwhile.
    async fn read(&mut self, wait: Duration) -> RedisResult<Vec<StreamId>> {
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(self.settings.block + READ_MARGIN));
                let connection = within(
                    COMMAND_TIMEOUT,
                    self.stream
                        .redis
                        .client()
                        .get_multiplexed_async_connection_with_config(&config),
                )
                .await?;
                self.reader.insert(connection)
            }
        };
        let block_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.settings.batch)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.stream.key)
            .arg(">");
        let reply: Option<StreamReadReply> = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Ok(Vec::new()),
            reply = read.query_async(reader) => reply?,
        };
        Ok(reply
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default())
    }

    /// Claims and handles every entry of the group idle longer than
    /// `claim_idle`, following XAUTOCLAIM's cursor through the pending list.
    async fn reclaim(&mut self) -> RedisResult<()> {
        let min_idle_ms = u64::try_from(self.settings.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = within(
                COMMAND_TIMEOUT,
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.stream.key)
                    .arg(&self.settings.group)
                    .arg(&self.settings.consumer)
                    .arg(min_idle_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(self.settings.batch)
                    .query_async(&mut self.stream.redis.connection()),
            )
            .await?;
            if !reply.deleted_ids.is_empty() {
                tracing::warn!(
                    stream = %self.stream.key,
                    group = %self.settings.group,
                    entries = reply.deleted_ids.len(),
                    "pending entries were trimmed from the stream before they were handled; they are lost to this group"
                );
            }
            if !reply.claimed.is_empty() {
                tracing::info!(
                    stream = %self.stream.key,
                    group = %self.settings.group,
                    consumer = %self.settings.consumer,
                    entries = reply.claimed.len(),
                    "reclaimed idle pending entries"
                );
                let entries = self.with_deliveries(reply.claimed).await?;
                self.handle(entries).await?;
            }
            if reply.next_stream_id == "0-0" || self.shutdown.is_cancelled() {
                return Ok(());
            }
            cursor = reply.next_stream_id;
        }
    }

    /// Pairs claimed entries with their delivery counts (which XAUTOCLAIM
    /// raised). An entry no longer pending for this consumer is left out.
    async fn with_deliveries(&self, claimed: Vec<StreamId>) -> RedisResult<Vec<(StreamId, u64)>> {
        let mut pipe = redis::pipe();
        for entry in &claimed {
            pipe.cmd("XPENDING")
                .arg(&self.stream.key)
                .arg(&self.settings.group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .arg(&self.settings.consumer);
        }
        let pending: Vec<StreamPendingCountReply> = within(
            COMMAND_TIMEOUT,
            pipe.query_async(&mut self.stream.redis.connection()),
        )
        .await?;
        Ok(claimed
            .into_iter()
            .zip(pending)
            .filter_map(|(entry, pending)| {
                let pending = pending.ids.into_iter().find(|p| p.id == entry.id)?;
                let delivery = u64::try_from(pending.times_delivered).unwrap_or(u64::MAX);
                Some((entry, delivery))
            })
            .collect())
    }

    /// Handles entries, each on its given delivery, then acknowledges those
    /// handled, even when dead-lettering one failed.
    async fn handle(&self, entries: Vec<(StreamId, u64)>) -> RedisResult<()> {
        let group = &self.settings.group;
        let mut handled = Vec::new();
        let mut result = Ok(());
        for (entry, delivery) in entries {
            let outcome = match StreamEvent::from_entry(&entry.map) {
                Ok(event) => tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => break,
                    outcome = process(
                        self.handler.as_ref(),
                        &event,
                        delivery,
                        self.settings.max_deliveries,
                    ) => outcome,
                },
                Err(reason) => Outcome::DeadLetter(reason),
            };
            match outcome {
                Outcome::Handled => handled.push(entry.id),
                Outcome::Retry(error) => tracing::warn!(
                    stream = %self.stream.key,
                    group = %group,
                    entry_id = %entry.id,
                    delivery,
                    error = %error,
                    "event handler failed; the entry will be retried"
                ),
                Outcome::DeadLetter(reason) => {
                    tracing::warn!(
                        stream = %self.stream.key,
                        group = %group,
                        entry_id = %entry.id,
                        delivery,
                        reason = %reason,
                        "dead-lettering a stream entry"
                    );
                    let fields = entry_fields(&entry.map);
                    if let Err(e) = self
                        .stream
                        .dead_letter(group, &entry.id, &fields, &reason)
                        .await
                    {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.stream.ack(group, &handled).await?;
        result
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        future::Future,
        sync::{Mutex, MutexGuard},
    };

    use redis::streams::{StreamPendingReply, StreamRangeReply};
    use tokio::{sync::Notify, task::JoinHandle};

    use super::*;
    use crate::pubsub::tests::{Proxy, redis_handle, unique_prefix};

    const WAIT: Duration = Duration::from_secs(5);
    const NAME: &str = "orders.events";
    const GROUP: &str = "order-status-projector";

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().expect("poisoned")
    }

    fn event(i: usize) -> StreamEvent {
        StreamEvent::new(
            uuid::Uuid::now_v7().to_string(),
            format!("order-{}", i % 7),
            "order.state_changed",
            format!("payload {i}").into_bytes(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
    }

    fn events(n: usize) -> Vec<StreamEvent> {
        (0..n).map(event).collect()
    }

    /// Records every attempt and success; fails an event while it has
    /// failures left, or always when `always_fail`.
    #[derive(Default)]
    struct Recorder {
        attempts: Mutex<Vec<String>>,
        handled: Mutex<Vec<String>>,
        failures_left: Mutex<HashMap<String, u32>>,
        always_fail: bool,
        delay: Duration,
    }

    impl Recorder {
        fn failing(event_id: &str, times: u32) -> Self {
            let recorder = Self::default();
            lock(&recorder.failures_left).insert(event_id.to_owned(), times);
            recorder
        }

        fn attempts(&self) -> Vec<String> {
            lock(&self.attempts).clone()
        }

        fn handled(&self) -> Vec<String> {
            lock(&self.handled).clone()
        }

        fn attempts_of(&self, event_id: &str) -> usize {
            lock(&self.attempts)
                .iter()
                .filter(|id| *id == event_id)
                .count()
        }
    }

    #[async_trait]
    impl EventHandler for Recorder {
        async fn handle(
            &self,
            event: &StreamEvent,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            lock(&self.attempts).push(event.event_id.clone());
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.always_fail {
                return Err("boom: the projection store is down".into());
            }
            if let Some(left) = lock(&self.failures_left).get_mut(&event.event_id)
                && *left > 0
            {
                *left -= 1;
                return Err(format!("boom: {left} failures to go").into());
            }
            lock(&self.handled).push(event.event_id.clone());
            Ok(())
        }
    }

    /// Never finishes: a consumer stuck in it is one that crashed mid-handler.
    #[derive(Default)]
    struct Stuck {
        entered: Notify,
    }

    #[async_trait]
    impl EventHandler for Stuck {
        async fn handle(
            &self,
            _: &StreamEvent,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            self.entered.notify_one();
            std::future::pending().await
        }
    }

    /// Waits until `check` holds, failing the test after [`WAIT`].
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + WAIT;
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A stream under a prefix of the test's own, its consumers, and the
    /// clean-up.
    struct Fixture {
        prefix: String,
        redis: RedisHandle,
        stream: EventStream,
        shutdown: CancellationToken,
        consumers: Vec<JoinHandle<()>>,
    }

    impl Fixture {
        async fn new() -> Self {
            let prefix = unique_prefix();
            let redis = redis_handle(&prefix).await;
            let stream = EventStream::new(&redis, NAME, 10_000);
            Self {
                prefix,
                redis,
                stream,
                shutdown: CancellationToken::new(),
                consumers: Vec::new(),
            }
        }

        /// Fast settings: short block, reclaim after 200 ms, 3 deliveries.
        fn settings(&self) -> ConsumerSettings {
            ConsumerSettings {
                group: GROUP.to_owned(),
                consumer: unique_consumer_name(GROUP),
                batch: 50,
                block: Duration::from_millis(200),
                claim_idle: Duration::from_millis(200),
                max_deliveries: 3,
            }
        }

        fn spawn(&mut self, settings: ConsumerSettings, handler: Arc<dyn EventHandler>) {
            self.spawn_on(self.stream.clone(), settings, handler);
        }

        fn spawn_on(
            &mut self,
            stream: EventStream,
            settings: ConsumerSettings,
            handler: Arc<dyn EventHandler>,
        ) {
            self.consumers.push(tokio::spawn(run_consumer(
                stream,
                settings,
                handler,
                self.shutdown.clone(),
            )));
        }

        async fn pending(&self) -> usize {
            redis::cmd("XPENDING")
                .arg(self.stream.key())
                .arg(GROUP)
                .query_async::<StreamPendingReply>(&mut self.redis.connection())
                .await
                .expect("XPENDING")
                .count()
        }

        async fn entries(&self, key: &str) -> Vec<StreamId> {
            redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query_async::<StreamRangeReply>(&mut self.redis.connection())
                .await
                .expect("XRANGE")
                .ids
        }

        async fn dead_letters(&self) -> Vec<StreamId> {
            self.entries(&self.stream.dead_letter_key()).await
        }

        async fn xadd(&self, fields: &[(&str, &[u8])]) -> String {
            let mut add = redis::cmd("XADD");
            add.arg(self.stream.key()).arg("*");
            for (name, value) in fields {
                add.arg(*name).arg(*value);
            }
            add.query_async(&mut self.redis.connection())
                .await
                .expect("XADD")
        }

        /// Stops the consumers, which must be prompt, and deletes the keys.
        async fn finish(self) {
            self.shutdown.cancel();
            for consumer in self.consumers {
                tokio::time::timeout(Duration::from_secs(1), consumer)
                    .await
                    .expect("a consumer did not stop within 1 s")
                    .expect("a consumer panicked");
            }
            let mut connection = self.redis.connection();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.prefix))
                .query_async(&mut connection)
                .await
                .expect("KEYS");
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut connection)
                    .await
                    .expect("DEL");
            }
        }
    }

    fn field(entry: &StreamId, name: &str) -> String {
        entry
            .get::<String>(name)
            .unwrap_or_else(|| panic!("no {name} in {entry:?}"))
    }

    #[tokio::test]
    async fn two_consumers_of_a_group_share_the_events_without_overlap() {
        let mut fx = Fixture::new().await;
        let published = events(500);
        let a = Arc::new(Recorder {
            delay: Duration::from_millis(1),
            ..Recorder::default()
        });
        let b = Arc::new(Recorder {
            delay: Duration::from_millis(1),
            ..Recorder::default()
        });
        let settings = ConsumerSettings {
            // No reclaiming: each entry is delivered once.
            claim_idle: Duration::from_secs(30),
            ..fx.settings()
        };
        fx.spawn(settings.clone(), a.clone());
        fx.spawn(
            ConsumerSettings {
                consumer: unique_consumer_name(GROUP),
                ..settings
            },
            b.clone(),
        );
        fx.stream.publish(&published).await.expect("publish");

        eventually("500 events handled", || {
            let (a, b) = (a.clone(), b.clone());
            async move { a.handled().len() + b.handled().len() >= 500 }
        })
        .await;
        let f = &fx;
        eventually("every entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;

        let (seen_a, seen_b) = (a.handled(), b.handled());
        assert_eq!(
            seen_a.len() + seen_b.len(),
            500,
            "an event was handled twice"
        );
        assert!(
            !seen_a.is_empty() && !seen_b.is_empty(),
            "one consumer got everything"
        );
        let (seen_a, seen_b): (HashSet<_>, HashSet<_>) =
            (seen_a.into_iter().collect(), seen_b.into_iter().collect());
        assert!(seen_a.is_disjoint(&seen_b));
        let all: HashSet<String> = published.iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(&seen_a | &seen_b, all);
        assert!(fx.dead_letters().await.is_empty());
        fx.finish().await;
    }

    #[tokio::test]
    async fn publish_keeps_the_order_and_the_fields() {
        let fx = Fixture::new().await;
        let published = events(20);
        fx.stream.publish(&published).await.expect("publish");
        let stored: Vec<StreamEvent> = fx
            .entries(fx.stream.key())
            .await
            .iter()
            .map(|entry| StreamEvent::from_entry(&entry.map).expect("well-formed"))
            .collect();
        assert_eq!(stored, published);
        fx.finish().await;
    }

    #[tokio::test]
    async fn a_failed_event_is_reclaimed_and_then_handled_once() {
        let mut fx = Fixture::new().await;
        let published = events(5);
        let flaky = &published[2].event_id;
        let handler = Arc::new(Recorder::failing(flaky, 2));
        fx.spawn(
            ConsumerSettings {
                max_deliveries: 5,
                ..fx.settings()
            },
            handler.clone(),
        );
        fx.stream.publish(&published).await.expect("publish");

        let h = handler.clone();
        eventually("all 5 handled", || {
            let h = h.clone();
            async move { h.handled().len() == 5 }
        })
        .await;
        let f = &fx;
        eventually("every entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;

        assert_eq!(handler.attempts_of(flaky), 3);
        let handled = handler.handled();
        assert_eq!(handled.iter().filter(|id| *id == flaky).count(), 1);
        let unique: HashSet<&String> = handled.iter().collect();
        assert_eq!(unique.len(), 5, "an event was handled twice: {handled:?}");
        assert!(fx.dead_letters().await.is_empty());
        fx.finish().await;
    }

    #[tokio::test]
    async fn an_event_that_keeps_failing_is_dead_lettered_and_acknowledged() {
        let mut fx = Fixture::new().await;
        let handler = Arc::new(Recorder {
            always_fail: true,
            ..Recorder::default()
        });
        fx.spawn(fx.settings(), handler.clone());
        let published = event(1);
        fx.stream
            .publish(std::slice::from_ref(&published))
            .await
            .expect("publish");

        let f = &fx;
        eventually("a dead letter", || async move {
            !f.dead_letters().await.is_empty()
        })
        .await;
        eventually("the entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;

        let dead = fx.dead_letters().await;
        assert_eq!(dead.len(), 1);
        let reason = field(&dead[0], "reason");
        assert_eq!(
            reason,
            DeadLetterReason::HandlerFailed {
                attempts: 3,
                error: "boom: the projection store is down".to_owned()
            }
            .describe()
        );
        let original = fx.entries(fx.stream.key()).await;
        assert_eq!(field(&dead[0], "entry_id"), original[0].id);
        assert_eq!(field(&dead[0], "group"), GROUP);
        assert_eq!(field(&dead[0], "stream"), fx.stream.key());
        assert_eq!(field(&dead[0], "event_id"), published.event_id);
        assert_eq!(
            dead[0].get::<Vec<u8>>("payload"),
            Some(published.payload.clone())
        );
        assert_eq!(handler.attempts().len(), 3);
        fx.finish().await;
    }

    #[tokio::test]
    async fn an_entry_whose_hash_does_not_match_is_dead_lettered_unhandled() {
        let mut fx = Fixture::new().await;
        let handler = Arc::new(Recorder::default());
        fx.spawn(fx.settings(), handler.clone());
        let wrong = content_hash(b"another payload");
        let entry_id = fx
            .xadd(&[
                ("event_id", b"e-1"),
                ("key", b"order-1"),
                ("kind", b"order.state_changed"),
                ("payload", b"the payload"),
                ("traceparent", b""),
                ("sha256", wrong.as_bytes()),
            ])
            .await;

        let f = &fx;
        eventually("a dead letter", || async move {
            !f.dead_letters().await.is_empty()
        })
        .await;
        eventually("the entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;
        let dead = fx.dead_letters().await;
        assert_eq!(
            field(&dead[0], "reason"),
            DeadLetterReason::HashMismatch.describe()
        );
        assert_eq!(field(&dead[0], "entry_id"), entry_id);
        assert_eq!(field(&dead[0], "sha256"), wrong);
        assert!(handler.attempts().is_empty(), "the handler was called");
        fx.finish().await;
    }

    #[tokio::test]
    async fn an_entry_missing_fields_is_dead_lettered_as_malformed() {
        let mut fx = Fixture::new().await;
        let handler = Arc::new(Recorder::default());
        fx.spawn(fx.settings(), handler.clone());
        let entry_id = fx
            .xadd(&[("event_id", b"e-1"), ("payload", b"x"), ("reason", b"mine")])
            .await;
        // The consumer goes on with the next entry.
        let good = event(2);
        fx.stream
            .publish(std::slice::from_ref(&good))
            .await
            .expect("publish");

        let h = handler.clone();
        eventually("the good event handled", || {
            let h = h.clone();
            async move { !h.handled().is_empty() }
        })
        .await;
        let f = &fx;
        eventually("every entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;
        let dead = fx.dead_letters().await;
        assert_eq!(dead.len(), 1);
        assert_eq!(
            field(&dead[0], "reason"),
            DeadLetterReason::Malformed("missing key, kind, traceparent, sha256".to_owned())
                .describe()
        );
        assert_eq!(field(&dead[0], "entry_id"), entry_id);
        assert_eq!(field(&dead[0], "event_id"), "e-1");
        assert_eq!(field(&dead[0], "original.reason"), "mine");
        assert_eq!(handler.attempts(), vec![good.event_id]);
        fx.finish().await;
    }

    #[tokio::test]
    async fn entries_of_a_consumer_that_crashed_are_reclaimed_by_another() {
        let mut fx = Fixture::new().await;
        // Published first, so that the first consumer's first read takes all three.
        let published = events(3);
        fx.stream.publish(&published).await.expect("publish");
        let stuck = Arc::new(Stuck::default());
        let crashing = tokio::spawn(run_consumer(
            fx.stream.clone(),
            fx.settings(),
            stuck.clone(),
            fx.shutdown.clone(),
        ));
        tokio::time::timeout(WAIT, stuck.entered.notified())
            .await
            .expect("the first consumer never got an event");
        crashing.abort();
        assert!(crashing.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(fx.pending().await, 3, "the crashed consumer read all three");

        let survivor = Arc::new(Recorder::default());
        fx.spawn(fx.settings(), survivor.clone());
        let s = survivor.clone();
        eventually("the survivor handled all three", || {
            let s = s.clone();
            async move { s.handled().len() == 3 }
        })
        .await;
        let f = &fx;
        eventually("every entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;
        let handled: HashSet<String> = survivor.handled().into_iter().collect();
        let all: HashSet<String> = published.into_iter().map(|e| e.event_id).collect();
        assert_eq!(handled, all);
        assert!(fx.dead_letters().await.is_empty());
        fx.finish().await;
    }

    #[tokio::test]
    async fn a_consumer_survives_a_redis_outage() {
        let mut fx = Fixture::new().await;
        let mut proxy = Proxy::start().await;
        let through_proxy = RedisHandle::connect(&proxy.url(), &fx.prefix)
            .await
            .expect("connect through the relay");
        let remote = EventStream::new(&through_proxy, NAME, 10_000);
        let handler = Arc::new(Recorder::default());
        fx.spawn_on(remote.clone(), fx.settings(), handler.clone());
        fx.stream.publish(&events(1)).await.expect("publish");
        let h = handler.clone();
        eventually("the first event handled", || {
            let h = h.clone();
            async move { h.handled().len() == 1 }
        })
        .await;

        proxy.stop().await;
        assert!(
            remote.publish(&events(1)).await.is_err(),
            "publishing while Redis is unreachable must fail"
        );
        fx.stream.publish(&events(5)).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.restart().await;

        eventually("the events published during the outage handled", || {
            let h = h.clone();
            async move { h.handled().len() == 6 }
        })
        .await;
        let f = &fx;
        eventually("every entry acknowledged", || async move {
            f.pending().await == 0
        })
        .await;
        fx.finish().await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn a_consumer_recreates_a_group_whose_stream_vanished() {
        let mut fx = Fixture::new().await;
        let handler = Arc::new(Recorder::default());
        fx.spawn(fx.settings(), handler.clone());
        fx.stream.publish(&events(1)).await.expect("publish");
        let h = handler.clone();
        eventually("the first event handled", || {
            let h = h.clone();
            async move { h.handled().len() == 1 }
        })
        .await;

        redis::cmd("DEL")
            .arg(fx.stream.key())
            .query_async::<()>(&mut fx.redis.connection())
            .await
            .expect("DEL");
        fx.stream.publish(&events(2)).await.expect("publish");
        eventually("the events after the deletion handled", || {
            let h = h.clone();
            async move { h.handled().len() == 3 }
        })
        .await;

        redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(fx.stream.key())
            .arg(GROUP)
            .query_async::<()>(&mut fx.redis.connection())
            .await
            .expect("XGROUP DESTROY");
        fx.stream.publish(&events(1)).await.expect("publish");
        // Recreated from the start of the stream: the two before come again.
        eventually("the event after the group's deletion handled", || {
            let h = h.clone();
            async move { h.handled().len() == 6 }
        })
        .await;
        fx.finish().await;
    }

    #[test]
    fn content_hash_is_lowercase_hex_sha256() {
        assert_eq!(
            content_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut event = event(1);
        assert!(event.hash_matches());
        event.content_hash = event.content_hash.to_uppercase();
        assert!(event.hash_matches());
        event.payload.push(0);
        assert!(!event.hash_matches());
    }

    #[test]
    fn unique_consumer_names_differ() {
        let (a, b) = (unique_consumer_name(GROUP), unique_consumer_name(GROUP));
        assert_ne!(a, b);
        assert!(a.starts_with(GROUP));
        assert!(a.contains(&std::process::id().to_string()));
    }

    #[test]
    fn entries_are_read_back_or_said_to_be_malformed() {
        let event = event(3);
        let map: HashMap<String, Value> = event
            .fields()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), Value::BulkString(value.to_vec())))
            .collect();
        assert_eq!(StreamEvent::from_entry(&map), Ok(event));

        let mut bad = map.clone();
        bad.insert(KIND.to_owned(), Value::BulkString(vec![0xff, 0xfe]));
        assert_eq!(
            StreamEvent::from_entry(&bad),
            Err(DeadLetterReason::Malformed("kind is not UTF-8".to_owned()))
        );
        let mut bad = map;
        bad.remove(PAYLOAD);
        bad.remove(EVENT_ID);
        assert_eq!(
            StreamEvent::from_entry(&bad),
            Err(DeadLetterReason::Malformed(
                "missing event_id, payload".to_owned()
            ))
        );
    }

    /// Fails its first `fail` calls, or panics.
    struct Scripted {
        fail: u64,
        panic: bool,
        calls: std::sync::atomic::AtomicU64,
    }

    impl Scripted {
        fn new(fail: u64) -> Self {
            Self {
                fail,
                panic: false,
                calls: 0.into(),
            }
        }

        fn calls(&self) -> u64 {
            self.calls.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl EventHandler for Scripted {
        async fn handle(
            &self,
            _: &StreamEvent,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            assert!(!self.panic, "handler bug");
            if call <= self.fail {
                return Err(format!("failure {call}").into());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn process_retries_until_the_last_delivery_then_dead_letters() {
        let event = event(1);
        let flaky = Scripted::new(2);
        assert_eq!(
            process(&flaky, &event, 1, 3).await,
            Outcome::Retry("failure 1".to_owned())
        );
        assert_eq!(
            process(&flaky, &event, 2, 3).await,
            Outcome::Retry("failure 2".to_owned())
        );
        assert_eq!(process(&flaky, &event, 3, 3).await, Outcome::Handled);

        let broken = Scripted::new(u64::MAX);
        assert_eq!(
            process(&broken, &event, 1, 2).await,
            Outcome::Retry("failure 1".to_owned())
        );
        assert_eq!(
            process(&broken, &event, 2, 2).await,
            Outcome::DeadLetter(DeadLetterReason::HandlerFailed {
                attempts: 2,
                error: "failure 2".to_owned()
            })
        );
        // max_deliveries 0 means one try.
        assert!(matches!(
            process(&Scripted::new(u64::MAX), &event, 1, 0).await,
            Outcome::DeadLetter(DeadLetterReason::HandlerFailed { attempts: 1, .. })
        ));
    }

    #[tokio::test]
    async fn process_never_hands_over_an_event_that_fails_verification() {
        let handler = Scripted::new(0);
        let mut tampered = event(1);
        tampered.payload = b"tampered".to_vec();
        assert_eq!(
            process(&handler, &tampered, 1, 3).await,
            Outcome::DeadLetter(DeadLetterReason::HashMismatch)
        );
        let nameless = StreamEvent::new("", "order-1", "", b"x".to_vec(), "");
        assert_eq!(
            process(&handler, &nameless, 1, 3).await,
            Outcome::DeadLetter(DeadLetterReason::Malformed(
                "empty event_id, kind".to_owned()
            ))
        );
        assert_eq!(handler.calls(), 0);
    }

    #[tokio::test]
    async fn process_counts_a_panic_as_a_failure() {
        let handler = Scripted {
            panic: true,
            ..Scripted::new(0)
        };
        assert_eq!(
            process(&handler, &event(1), 1, 3).await,
            Outcome::Retry("handler panicked: handler bug".to_owned())
        );
    }

    #[tokio::test]
    async fn process_gives_up_on_an_event_delivered_past_the_limit_without_an_outcome() {
        let handler = Scripted::new(0);
        let outcome = process(&handler, &event(1), 4, 3).await;
        let Outcome::DeadLetter(DeadLetterReason::HandlerFailed { attempts, error }) = outcome
        else {
            panic!("expected a dead letter, got {outcome:?}");
        };
        assert_eq!(attempts, 3);
        assert!(error.contains("no outcome"), "{error}");
        assert_eq!(handler.calls(), 0);
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            DeadLetterReason::HandlerFailed {
                attempts: 5,
                error: "db down".to_owned()
            }
            .describe(),
            "handler failed after 5 attempt(s): db down"
        );
        assert_eq!(
            DeadLetterReason::Malformed("missing sha256".to_owned()).to_string(),
            "malformed entry: missing sha256"
        );
        assert!(
            DeadLetterReason::HashMismatch
                .describe()
                .contains("hash mismatch")
        );
    }
}
