//! Traces: one OpenTelemetry tracer provider per service, exporting over
//! OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT` through a batch processor (a
//! request only queues its spans; a full queue drops them, it never waits).
//! With no endpoint no exporter runs and no span is ever created.
//!
//! **Sampling is decided once, where a trace enters a service** (the gateway's
//! edge layer, a gRPC server layer, an event consumer): W3C `traceparent`
//! flags of the caller when parent-based, else the configured ratio. Only a
//! sampled request gets spans; an unsampled one carries a non-recording span
//! context whose `traceparent` (flags `00`) tells the services behind it to
//! skip too. Child spans ([`child`], [`traced`]) are created only inside a
//! sampled span, so an unsampled request pays one thread-local read per
//! would-be span.
//!
//! Spans are made with the OpenTelemetry API directly rather than bridged from
//! `tracing` spans: `flashmesh up` runs four services in one process, each
//! with its own `service.name`, and the tracer travels in the OpenTelemetry
//! [`Context`] with the request, which a process-wide `tracing` subscriber
//! cannot do. Logs stay on `tracing` and carry the context's `trace_id` and
//! `span_id` (see [`crate::runtime::init_logging`]).

use std::{borrow::Cow, fmt::Display, future::Future, str::FromStr, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    context::FutureExt,
    trace::{
        Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer, TracerProvider,
    },
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider},
};

use crate::{
    config::{ConfigError, Env},
    metrics::Metrics,
};

pub use opentelemetry::{KeyValue as Attribute, trace::SpanKind as Kind};

/// `OTEL_*` settings, read once like every other variable.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
    /// an OTLP/gRPC collector, e.g. `http://otel-collector:4317`. Unset: no
    /// spans, no exporter.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME`; see [`TelemetryConfig::service_name`].
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,key=value`.
    pub resource_attributes: Vec<(String, String)>,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: SamplerSetting,
    /// `OTEL_BSP_SCHEDULE_DELAY` (milliseconds): how often batches are sent.
    pub batch_delay: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans queued before new ones are dropped.
    pub max_queue_size: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans sent at most per export;
    /// 128 rather than the SDK's 512 by default. Each export converts and
    /// encodes its batch in one burst, which every request in flight waits
    /// out: smaller bursts spare the latency tail, for a little more CPU per
    /// span (README, Measured → Tracing).
    pub max_export_batch_size: usize,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` or `OTEL_EXPORTER_OTLP_TIMEOUT`
    /// (milliseconds): how long one export may take.
    pub export_timeout: Duration,
}

/// Which traces are kept, as `OTEL_TRACES_SAMPLER` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSetting {
    /// `parentbased_*`: a caller's decision (its `traceparent` flags) wins.
    pub parent_based: bool,
    /// Fraction of new traces kept: 1 (`always_on`), 0 (`always_off`) or
    /// `OTEL_TRACES_SAMPLER_ARG` (`traceidratio`).
    pub ratio: f64,
}

impl Default for SamplerSetting {
    fn default() -> Self {
        Self {
            parent_based: true,
            ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let invalid = |var: &str, reason: &str| ConfigError {
            var: var.to_owned(),
            value: env.raw(var).unwrap_or_default().to_owned(),
            reason: reason.to_owned(),
        };
        let arg: Option<f64> = env.optional("OTEL_TRACES_SAMPLER_ARG")?;
        if arg.is_some_and(|ratio| !(0.0..=1.0).contains(&ratio)) {
            return Err(invalid(
                "OTEL_TRACES_SAMPLER_ARG",
                "must be between 0 and 1",
            ));
        }
        let sampler = match env
            .raw("OTEL_TRACES_SAMPLER")
            .map_or("parentbased_always_on", str::trim)
        {
            "always_on" => (false, 1.0),
            "always_off" => (false, 0.0),
            "traceidratio" => (false, arg.unwrap_or(1.0)),
            "parentbased_always_on" => (true, 1.0),
            "parentbased_always_off" => (true, 0.0),
            "parentbased_traceidratio" => (true, arg.unwrap_or(1.0)),
            _ => {
                return Err(invalid(
                    "OTEL_TRACES_SAMPLER",
                    "expected always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio",
                ));
            }
        };
        let resource_attributes = match env.raw("OTEL_RESOURCE_ATTRIBUTES") {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    pair.split_once('=')
                        .filter(|(key, _)| !key.trim().is_empty())
                        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
                        .ok_or_else(|| {
                            invalid("OTEL_RESOURCE_ATTRIBUTES", "expected key=value,key=value")
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        // No exporter, whatever the endpoint says, when the SDK is disabled
        // or the traces exporter is `none`.
        let disabled = match env
            .raw("OTEL_SDK_DISABLED")
            .map(|value| value.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(invalid("OTEL_SDK_DISABLED", "expected true or false")),
        };
        let exporting = match env.raw("OTEL_TRACES_EXPORTER").map(str::trim) {
            None | Some("otlp") => true,
            Some("none") => false,
            Some(_) => {
                return Err(invalid(
                    "OTEL_TRACES_EXPORTER",
                    "expected otlp or none (traces go out over OTLP only)",
                ));
            }
        };
        // What only one value is built in for is refused otherwise, rather
        // than ignored (`opentelemetry-otlp` would only warn about an
        // algorithm it lacks).
        for (traces, general, built_in, reason) in [
            (
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "grpc",
                "only grpc (OTLP/gRPC) is supported",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                "OTEL_EXPORTER_OTLP_COMPRESSION",
                "none",
                "no compression is built in: leave it unset or none",
            ),
        ] {
            let var = traces_first(env, traces, general);
            if env
                .raw(var)
                .is_some_and(|value| !value.trim().eq_ignore_ascii_case(built_in))
            {
                return Err(invalid(var, reason));
            }
        }
        let timeout_var = traces_first(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        );
        let endpoint_var = traces_first(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        );
        let otlp_endpoint = match env.raw(endpoint_var).map(str::trim) {
            Some(url) if exporting && !disabled => {
                // Checked here, so the error names the variable that was
                // read and says what to do in an operator's terms.
                let uri = url.parse::<http::Uri>().ok().filter(|u| u.host().is_some());
                match uri.as_ref().and_then(http::Uri::scheme_str) {
                    Some("http") => Some(url.to_owned()),
                    Some("https") => {
                        return Err(invalid(
                            endpoint_var,
                            "TLS to the collector is not built in: use http:// to a collector \
                             nearby (in the cluster or on the host), which may forward over TLS",
                        ));
                    }
                    _ => {
                        return Err(invalid(
                            endpoint_var,
                            "expected an http:// URL, e.g. http://otel-collector:4317",
                        ));
                    }
                }
            }
            _ => None,
        };
        let max_queue_size = env.ranged_or("OTEL_BSP_MAX_QUEUE_SIZE", 8192, 16..=1_000_000)?;
        let max_export_batch_size: usize =
            env.ranged_or("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 128, 1..=1_000_000)?;
        if max_export_batch_size > max_queue_size {
            return Err(invalid(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                "must not exceed OTEL_BSP_MAX_QUEUE_SIZE",
            ));
        }
        Ok(Self {
            otlp_endpoint,
            service_name: env.raw("OTEL_SERVICE_NAME").map(|s| s.trim().to_owned()),
            resource_attributes,
            sampler: SamplerSetting {
                parent_based: sampler.0,
                ratio: sampler.1,
            },
            batch_delay: Duration::from_millis(env.ranged_or(
                "OTEL_BSP_SCHEDULE_DELAY",
                1000,
                1..=60_000,
            )?),
            max_queue_size,
            max_export_batch_size,
            export_timeout: Duration::from_millis(env.ranged_or(timeout_var, 5000, 1..=600_000)?),
        })
    }

    /// The `service.name` of `part` (`auth`, `gateway`, …): `OTEL_SERVICE_NAME`
    /// when one service runs alone, else `flashmesh-<part>`. Several services
    /// in one process (`flashmesh up`) are `<OTEL_SERVICE_NAME or
    /// flashmesh>-<part>`, so their spans stay apart.
    pub fn service_name(&self, part: &str, shared_process: bool) -> String {
        match (&self.service_name, shared_process) {
            (Some(name), false) => name.clone(),
            (Some(name), true) => format!("{name}-{part}"),
            (None, _) => format!("flashmesh-{part}"),
        }
    }
}

/// The traces-only variable if it is set, else the general one: the OTLP
/// exporter's precedence (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` over
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, and so on).
fn traces_first<'a>(env: &Env, traces: &'a str, general: &'a str) -> &'a str {
    if env.raw(traces).is_some() {
        traces
    } else {
        general
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// One service's telemetry: its tracer (when exporting) and the metrics
/// registry it registers into. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    service: String,
    tracing: Option<Tracing>,
    metrics: Metrics,
}

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    sampler: SamplerSetting,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(tracing) = &self.tracing
            && let Err(error) = tracing.provider.shutdown()
        {
            tracing::debug!(%error, service = %self.service, "span exporter shutdown");
        }
    }
}

/// The tracer of the sampled span in a [`Context`], so child spans need no
/// handle of their own. Present only inside sampled spans.
#[derive(Clone)]
struct ActiveTracer(SdkTracer);

/// The caller's `x-request-id`, for log lines.
#[derive(Clone)]
pub struct RequestId(pub HeaderValue);

impl Telemetry {
    /// Telemetry of `service` (its `service.name`), registering metrics in
    /// `metrics`. Must run inside a Tokio runtime when an endpoint is set
    /// (the exporter's channel lives there).
    pub fn new(
        config: &TelemetryConfig,
        service: String,
        metrics: &Metrics,
    ) -> Result<Self, TelemetryError> {
        let tracing = match &config.otlp_endpoint {
            None => None,
            Some(endpoint) => {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(config.export_timeout)
                    .build()?;
                let processor = BatchSpanProcessor::builder(exporter)
                    .with_batch_config(
                        BatchConfigBuilder::default()
                            .with_scheduled_delay(config.batch_delay)
                            .with_max_queue_size(config.max_queue_size)
                            .with_max_export_batch_size(config.max_export_batch_size)
                            .build(),
                    )
                    .build();
                let resource = Resource::builder_empty()
                    .with_attributes(
                        config
                            .resource_attributes
                            .iter()
                            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                    )
                    .with_service_name(service.clone())
                    .build();
                // Every decision is made by [`Telemetry::start`] before a span
                // is built; the SDK records whatever it is given.
                let provider = SdkTracerProvider::builder()
                    .with_span_processor(processor)
                    .with_sampler(Sampler::AlwaysOn)
                    .with_resource(resource)
                    .build();
                let tracer = provider.tracer("flashmesh");
                Some(Tracing {
                    provider,
                    tracer,
                    sampler: config.sampler,
                })
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                service,
                tracing,
                metrics: metrics.clone(),
            }),
        })
    }

    /// No spans, and a registry of its own (unit tests, tools).
    pub fn disabled(service: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                service: service.to_owned(),
                tracing: None,
                metrics: Metrics::default(),
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether spans are made and exported at all.
    pub fn tracing(&self) -> bool {
        self.inner.tracing.is_some()
    }

    /// Sends every finished span now (tests, shutdown).
    pub fn flush(&self) {
        if let Some(tracing) = &self.inner.tracing
            && let Err(error) = tracing.provider.force_flush()
        {
            tracing::warn!(%error, service = %self.inner.service, "spans not flushed");
        }
    }

    /// The context a request runs in: a span of `kind` named `name`, child
    /// of `parent` (a caller's remote context, or empty for a new trace),
    /// sampled as configured. Unsampled, it carries a non-recording span
    /// context that propagates the decision (flags `00`); `None` when
    /// tracing is off. The name is copied and `attributes` are built only
    /// for a sampled span.
    pub fn start(
        &self,
        parent: &Context,
        name: &str,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        let tracing = self.inner.tracing.as_ref()?;
        let parent_span = parent.span();
        let parent_context = parent_span.span_context();
        let trace_id = if parent_context.is_valid() {
            parent_context.trace_id()
        } else {
            random_trace_id()
        };
        if !tracing.sampler.samples(parent_context, trace_id) {
            // An unsampled caller's context already says "not sampled"
            // downstream; no span of ours will ever refer to a new id.
            if parent_context.is_valid() && !parent_context.is_sampled() {
                return Some(parent.clone());
            }
            let unsampled = SpanContext::new(
                trace_id,
                random_span_id(),
                TraceFlags::default(),
                false,
                parent_context.trace_state().clone(),
            );
            return Some(parent.with_remote_span_context(unsampled));
        }
        let span = tracing
            .tracer
            .span_builder(name.to_owned())
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&tracing.tracer, parent);
        Some(
            parent
                .with_span(span)
                .with_value(ActiveTracer(tracing.tracer.clone())),
        )
    }

    /// The context a received request runs in: a [`Telemetry::start`] span
    /// under the trace context the caller sent in `headers`, carrying the
    /// caller's `x-request-id` for log lines; `None` when there is neither.
    pub fn start_request(
        &self,
        headers: &HeaderMap,
        name: &str,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        let request_id = headers.get(X_REQUEST_ID).cloned().map(RequestId);
        let cx = if self.tracing() {
            self.start(&extract(headers), name, kind, attributes)
        } else {
            None
        };
        match (cx, request_id) {
            (Some(cx), Some(id)) => Some(cx.with_value(id)),
            (Some(cx), None) => Some(cx),
            (None, Some(id)) => Some(Context::new().with_value(id)),
            (None, None) => None,
        }
    }

    /// A consumer's root span for an event caused by the request whose span
    /// context `cause` is: a new trace *linked* to that request, kept when
    /// the request was (a consumer follows its cause's decision), or by the
    /// ratio when there is no cause.
    pub fn start_linked(
        &self,
        cause: Option<SpanContext>,
        name: &str,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        let tracing = self.inner.tracing.as_ref()?;
        let sampled = match &cause {
            Some(cause) => cause.is_sampled(),
            None => tracing
                .sampler
                .samples(&SpanContext::NONE, random_trace_id()),
        };
        if !sampled {
            return None;
        }
        let span = tracing
            .tracer
            .span_builder(name.to_owned())
            .with_kind(kind)
            .with_attributes(attributes())
            .with_links(cause.map(Link::with_context).into_iter().collect())
            .start_with_context(&tracing.tracer, &Context::new());
        Some(
            Context::new()
                .with_span(span)
                .with_value(ActiveTracer(tracing.tracer.clone())),
        )
    }
}

impl SamplerSetting {
    /// Whether a span of trace `trace_id` under `parent` (invalid for a new
    /// trace) is sampled: the SDK's `ParentBased` and `TraceIdRatioBased`
    /// rules, worked out here because this runs for every call a service
    /// receives and the SDK's sampler builds a whole result for it.
    fn samples(self, parent: &SpanContext, trace_id: TraceId) -> bool {
        if self.parent_based && parent.is_valid() {
            return parent.is_sampled();
        }
        if self.ratio >= 1.0 {
            return true;
        }
        // The SDK's rule: the trace id's low 63 bits against the ratio, so
        // every service deciding on the same trace agrees.
        let bound = (self.ratio.max(0.0) * (1u64 << 63) as f64) as u64;
        let low = u128::from_be_bytes(trace_id.to_bytes()) as u64;
        (low >> 1) < bound
    }
}

fn random_trace_id() -> TraceId {
    TraceId::from(rand::random::<u128>() | 1)
}

fn random_span_id() -> SpanId {
    SpanId::from(rand::random::<u64>() | 1)
}

/// A child span of the current span, if that one is sampled: the context to
/// run the child's work in. The child ends when [`end`] is called on it or
/// the last clone of the context drops.
pub fn child(
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<Context> {
    Context::map_current(|current| {
        let tracer = current.get::<ActiveTracer>()?;
        let span = tracer
            .0
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&tracer.0, current);
        Some(current.with_span(span))
    })
}

/// Whether the current span is sampled (child spans would be made).
pub fn sampled() -> bool {
    Context::map_current(|current| current.get::<ActiveTracer>().is_some())
}

/// Ends the span of `cx`, marking it failed with `error` if there is one.
pub fn end(cx: &Context, error: Option<&dyn Display>) {
    let span = cx.span();
    if let Some(error) = error {
        span.set_status(Status::error(error.to_string()));
    }
    span.end();
}

/// Runs `work` in a child span `name` of the current sampled span (see
/// [`child`]); without one, just runs it. An `Err` marks the span failed.
pub async fn traced<T, E: Display>(
    name: &'static str,
    kind: SpanKind,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let Some(cx) = child(name, kind, attributes) else {
        return work.await;
    };
    let result = work.with_context(cx.clone()).await;
    end(&cx, result.as_ref().err().map(|e| e as &dyn Display));
    result
}

/// A database statement, named (e.g. `catalog.reserve_stock`), never with
/// its parameters.
pub async fn db<T, E: Display>(
    statement: &'static str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    traced(
        statement,
        SpanKind::Client,
        || {
            vec![
                KeyValue::new("db.operation.name", statement),
                KeyValue::new("db.system.name", "sql"),
            ]
        },
        work,
    )
    .await
}

/// A Redis command or script, named (e.g. `stock_gate.admit`).
pub async fn redis<T, E: Display>(
    operation: &'static str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    traced(
        operation,
        SpanKind::Client,
        || {
            vec![
                KeyValue::new("db.system.name", "redis"),
                KeyValue::new("db.operation.name", operation),
            ]
        },
        work,
    )
    .await
}

/// Adds an event to the current span if it is sampled (a decision, a state
/// change); `attributes` are built only then.
pub fn event(name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
    Context::map_current(|current| {
        if current.get::<ActiveTracer>().is_some() {
            current.span().add_event(name, attributes());
        }
    });
}

/// The W3C propagation headers, resolved once: they are read and written
/// on every call, traced or not.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// The request id every service logs and passes on.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The remote context a caller sent in `traceparent`/`tracestate`, or an
/// empty one (a new trace) when absent or malformed.
pub fn extract(headers: &HeaderMap) -> Context {
    match headers
        .get(TRACEPARENT)
        .and_then(|v| parse_traceparent_bytes(v.as_bytes(), headers.get(TRACESTATE)))
    {
        Some(remote) => Context::new().with_remote_span_context(remote),
        None => Context::new(),
    }
}

/// Writes `cx`'s span context as `traceparent` (and `tracestate`) into
/// `headers`, replacing what was there; leaves them alone without a valid one.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if write_trace_headers(cx, headers) == Some(false) {
        headers.remove(TRACESTATE);
    }
}

/// [`inject`] into the headers of a new call, which hold no trace context
/// yet (so nothing is removed); whether `cx` had a valid span context.
pub fn inject_new(cx: &Context, headers: &mut HeaderMap) -> bool {
    write_trace_headers(cx, headers).is_some()
}

/// Inserts `cx`'s `traceparent`, and its `tracestate` when not empty:
/// `None` without a valid span context, else whether `tracestate` was set.
fn write_trace_headers(cx: &Context, headers: &mut HeaderMap) -> Option<bool> {
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return None;
    }
    if let Ok(mut value) = HeaderValue::from_bytes(&traceparent_bytes(context)) {
        set_never_indexed(&mut value);
        headers.insert(TRACEPARENT, value);
    }
    let state = context.trace_state();
    let state = (*state != TraceState::NONE)
        .then(|| HeaderValue::from_str(&state.header()).ok())
        .flatten()
        .filter(|value| !value.is_empty());
    Some(state.is_some_and(|value| {
        headers.insert(TRACESTATE, value);
        true
    }))
}

/// Marks a header value that differs on every call (`traceparent`, a
/// request id) as HPACK "never indexed": indexing it would cost both ends
/// of every HTTP/2 hop a table insertion and an eviction per call, and
/// push out the entries that do repeat, for a value no later call reuses.
/// h2 offers no "without indexing" representation, and "never indexed"
/// (RFC 7541 §6.2.3) costs the same bytes.
pub fn set_never_indexed(value: &mut HeaderValue) {
    value.set_sensitive(true);
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn format_traceparent(context: &SpanContext) -> String {
    String::from_utf8_lossy(&traceparent_bytes(context)).into_owned()
}

const TRACEPARENT_LEN: usize = 55;

fn traceparent_bytes(context: &SpanContext) -> [u8; TRACEPARENT_LEN] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    // The lengths are fixed by the types, so the encodings cannot fail.
    let _ = hex::encode_to_slice(context.trace_id().to_bytes(), &mut out[3..35]);
    let _ = hex::encode_to_slice(context.span_id().to_bytes(), &mut out[36..52]);
    let _ = hex::encode_to_slice([context.trace_flags().to_u8()], &mut out[53..55]);
    out
}

/// A W3C `traceparent` (version 00, or a later one read as 00), with its
/// `tracestate`; `None` when malformed or all-zero.
pub fn parse_traceparent(value: &str, state: Option<&HeaderValue>) -> Option<SpanContext> {
    parse_traceparent_bytes(value.as_bytes(), state)
}

/// [`parse_traceparent`] of a header's bytes, which need no UTF-8 check:
/// anything but lowercase hex and dashes is refused anyway.
fn parse_traceparent_bytes(value: &[u8], state: Option<&HeaderValue>) -> Option<SpanContext> {
    let value = value.trim_ascii();
    let version = value.get(..2)?;
    // Version 00 is exactly 55 bytes; later versions may append `-…`.
    let well_formed = match value.len() {
        TRACEPARENT_LEN => true,
        len => len > TRACEPARENT_LEN && version != b"00" && value[TRACEPARENT_LEN] == b'-',
    };
    if !well_formed
        || value[2] != b'-'
        || value[35] != b'-'
        || value[52] != b'-'
        || version == b"ff"
    {
        return None;
    }
    let trace_id = TraceId::from_bytes(lower_hex(&value[3..35])?);
    let span_id = SpanId::from_bytes(lower_hex(&value[36..52])?);
    let [flags] = lower_hex(&value[53..55])?;
    lower_hex::<1>(version)?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = state
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceState::from_str(v).ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        state,
    ))
}

/// `N` bytes from `2N` lowercase hex digits, as W3C Trace Context demands
/// (the `hex` crate also takes uppercase), in one pass without branches:
/// this runs for every call a service receives.
fn lower_hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    let mut seen = 0;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (high, low) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        seen |= high | low;
        *byte = (high << 4) | low;
    }
    (seen < 16).then_some(out)
}

/// The value of each lowercase hex digit; 0xff for every other byte.
const NIBBLE: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut digit = 0;
    while digit < 16 {
        let ascii = if digit < 10 {
            b'0' + digit
        } else {
            b'a' + digit - 10
        };
        table[ascii as usize] = digit;
        digit += 1;
    }
    table
};

/// The current span context as `traceparent`, if there is a valid one.
pub fn current_traceparent() -> Option<String> {
    Context::map_current(|cx| {
        let span = cx.span();
        let context = span.span_context();
        context.is_valid().then(|| format_traceparent(context))
    })
}

/// Trace and span id of the current span, for log lines.
pub fn current_ids() -> Option<(TraceId, SpanId)> {
    Context::map_current(|cx| {
        let span = cx.span();
        let context = span.span_context();
        context
            .is_valid()
            .then(|| (context.trace_id(), context.span_id()))
    })
}

/// The current request's `x-request-id`, for log lines.
pub fn current_request_id() -> Option<HeaderValue> {
    Context::map_current(|cx| cx.get::<RequestId>().map(|id| id.0.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = parse_traceparent(given, None).expect("valid");
        assert!(parsed.is_sampled());
        assert!(parsed.is_remote());
        assert_eq!(format_traceparent(&parsed), given);
        let unsampled = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        )
        .expect("valid");
        assert!(!unsampled.is_sampled());
        let later = parse_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-what-comes-next",
            None,
        )
        .expect("a later version is read as 00");
        assert!(later.is_sampled());
        assert_eq!(format_traceparent(&later), given);
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736+00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad}");
        }
    }

    /// [`SamplerSetting::samples`] decides as the SDK's samplers would.
    #[test]
    fn sampling_matches_the_sdk() {
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};

        let parents = [
            SpanContext::NONE,
            SpanContext::new(
                random_trace_id(),
                random_span_id(),
                TraceFlags::SAMPLED,
                true,
                TraceState::NONE,
            ),
            SpanContext::new(
                random_trace_id(),
                random_span_id(),
                TraceFlags::default(),
                true,
                TraceState::NONE,
            ),
        ];
        for parent_based in [false, true] {
            for ratio in [0.0, 0.1, 0.5, 1.0] {
                let setting = SamplerSetting {
                    parent_based,
                    ratio,
                };
                let root = if ratio >= 1.0 {
                    Sampler::AlwaysOn
                } else if ratio <= 0.0 {
                    Sampler::AlwaysOff
                } else {
                    Sampler::TraceIdRatioBased(ratio)
                };
                let sdk = if parent_based {
                    Sampler::ParentBased(Box::new(root))
                } else {
                    root
                };
                for parent in &parents {
                    let cx = if parent.is_valid() {
                        Context::new().with_remote_span_context(parent.clone())
                    } else {
                        Context::new()
                    };
                    for _ in 0..200 {
                        let trace_id = if parent.is_valid() {
                            parent.trace_id()
                        } else {
                            random_trace_id()
                        };
                        let expected = sdk
                            .should_sample(Some(&cx), trace_id, "", &SpanKind::Server, &[], &[])
                            .decision
                            == SamplingDecision::RecordAndSample;
                        assert_eq!(
                            setting.samples(parent, trace_id),
                            expected,
                            "{setting:?} {parent:?} {trace_id}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sampler_variables() {
        let config = TelemetryConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(config.sampler, SamplerSetting::default());
        assert_eq!(config.otlp_endpoint, None);
        let env = Env::from_pairs([
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod, team=sales",
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ]);
        let config = TelemetryConfig::from_env(&env).expect("valid");
        assert_eq!(
            config.sampler,
            SamplerSetting {
                parent_based: true,
                ratio: 0.1
            }
        );
        assert_eq!(config.resource_attributes.len(), 2);
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(config.export_timeout, Duration::from_secs(5));
        assert_eq!(config.max_export_batch_size, 128);
        let batches = Env::from_pairs([
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "2048"),
        ]);
        let config = TelemetryConfig::from_env(&batches).expect("valid");
        assert_eq!(
            (config.max_export_batch_size, config.max_queue_size),
            (512, 2048)
        );
        let timeouts = |pairs: &[(&str, &str)]| {
            TelemetryConfig::from_env(&Env::from_pairs(pairs.iter().copied()))
                .map(|config| config.export_timeout)
        };
        assert_eq!(
            timeouts(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]).expect("valid"),
            Duration::from_millis(2500)
        );
        assert_eq!(
            timeouts(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700"),
            ])
            .expect("valid"),
            Duration::from_millis(700),
            "the traces variable wins"
        );
        let endpoint = |pairs: &[(&str, &str)]| {
            let mut env = Env::from_pairs(pairs.iter().copied());
            env.set("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
            TelemetryConfig::from_env(&env)
                .expect("valid")
                .otlp_endpoint
        };
        assert!(endpoint(&[("OTEL_SDK_DISABLED", "false")]).is_some());
        assert!(endpoint(&[("OTEL_TRACES_EXPORTER", "otlp")]).is_some());
        assert!(endpoint(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).is_some());
        assert!(endpoint(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "None")]).is_some());
        assert_eq!(endpoint(&[("OTEL_SDK_DISABLED", "TRUE")]), None);
        assert_eq!(
            endpoint(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")]).as_deref(),
            Some("http://traces:4317"),
            "the traces variable wins"
        );
        let ignored = Env::from_pairs([
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
        ]);
        assert!(
            TelemetryConfig::from_env(&ignored).is_ok(),
            "an endpoint that is not used is not checked"
        );
        assert_eq!(endpoint(&[("OTEL_TRACES_EXPORTER", "none")]), None);
        assert!(
            endpoint(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ])
            .is_some(),
            "the traces variable wins"
        );
        for (var, value) in [
            ("OTEL_SDK_DISABLED", "yes"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "grpc://collector:4317",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8193"),
        ] {
            let err = TelemetryConfig::from_env(&Env::from_pairs([(var, value)])).unwrap_err();
            assert_eq!(err.var, var);
        }
    }

    #[test]
    fn service_names() {
        let mut config = TelemetryConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(config.service_name("order", true), "flashmesh-order");
        assert_eq!(config.service_name("order", false), "flashmesh-order");
        config.service_name = Some("shop".into());
        assert_eq!(config.service_name("order", false), "shop");
        assert_eq!(config.service_name("order", true), "shop-order");
    }
}
