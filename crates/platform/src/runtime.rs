//! Process plumbing shared by every binary: logging and shutdown signals.

use std::{fmt as stdfmt, io::IsTerminal, time::SystemTime};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter,
    fmt::{self, FmtContext, FormatEvent, FormatFields, format::Writer},
    prelude::*,
    registry::LookupSpan,
};

use crate::telemetry;

/// Logs as JSON lines when stderr is not a terminal (containers, CI) and as
/// readable text when it is. The level comes from `RUST_LOG` (default `info`).
///
/// A JSON line has `timestamp`, `level`, `target`, `message`, the event's
/// fields, and — inside a request — `trace_id`, `span_id` (the request's
/// OpenTelemetry span, sampled or not) and `request_id`. Nothing logs
/// passwords, tokens or keys: handlers log errors and ids, never requests.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if std::io::stderr().is_terminal() {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .event_format(JsonLines)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    // A second initialisation (tests, embedding) keeps the first subscriber.
    drop(result);
}

/// One JSON object per event, with the request's trace context.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> stdfmt::Result {
        writeln!(writer, "{}", json_line(event))
    }
}

fn json_line(event: &Event<'_>) -> Value {
    let metadata = event.metadata();
    let mut line = Map::new();
    line.insert(
        "timestamp".into(),
        humantime::format_rfc3339_micros(SystemTime::now())
            .to_string()
            .into(),
    );
    line.insert("level".into(), metadata.level().as_str().into());
    line.insert("target".into(), metadata.target().into());
    let mut fields = Map::new();
    event.record(&mut JsonFields(&mut fields));
    line.insert(
        "message".into(),
        fields.remove("message").unwrap_or_default(),
    );
    if let Some((trace_id, span_id)) = telemetry::current_ids() {
        line.insert("trace_id".into(), trace_id.to_string().into());
        line.insert("span_id".into(), span_id.to_string().into());
    }
    if let Some(id) = telemetry::current_request_id()
        && let Ok(id) = id.to_str()
    {
        line.insert("request_id".into(), id.into());
    }
    for (name, value) in fields {
        line.entry(name).or_insert(value);
    }
    Value::Object(line)
}

struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn stdfmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}

/// A token cancelled on the first SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            drop(tokio::signal::ctrl_c().await);
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    drop(tokio::signal::ctrl_c().await);
}

/// Runs `tick` every `interval` (the first at once; a slow tick delays the
/// next rather than bunching them) until `shutdown` is cancelled.
pub async fn every<F, Fut>(interval: std::time::Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tick().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::{
        Context,
        trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    };
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_trace_context() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .event_format(JsonLines)
                .with_writer(captured.clone()),
        );
        let remote = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex"),
            SpanId::from_hex("00f067aa0ba902b7").expect("hex"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new()
            .with_remote_span_context(remote)
            .with_value(telemetry::RequestId(http::HeaderValue::from_static(
                "req-7",
            )));
        tracing::subscriber::with_default(subscriber, || {
            let _entered = cx.attach();
            tracing::warn!(order_id = "o-1", attempts = 3, "catalog slow");
        });
        let text = String::from_utf8(captured.0.lock().expect("buffer").clone()).expect("utf-8");
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "catalog slow");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span_id"], "00f067aa0ba902b7");
        assert_eq!(line["request_id"], "req-7");
        assert_eq!(line["order_id"], "o-1");
        assert_eq!(line["attempts"], 3);
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(
            line["target"]
                .as_str()
                .is_some_and(|t| t.contains("runtime"))
        );
    }
}
