//! N concurrent callers for a fixed time, their answers tallied and their
//! latencies in an HDR histogram.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::stack::Mode;

/// A call's answer, other than an error.
pub enum Outcome {
    /// Done; `units` of stock it took (0 for reads and replays).
    Ok { units: u64 },
    /// FAILED_PRECONDITION (SOLD_OUT, LIMIT_EXCEEDED, …): a correct, fast
    /// answer, counted apart by its ErrorInfo reason.
    Refused(String),
}

/// FAILED_PRECONDITION is a refusal; any other status is an error.
pub fn refusal(status: Status) -> Result<Outcome, Status> {
    if status.code() == Code::FailedPrecondition {
        Ok(Outcome::Refused(
            reason(&status).unwrap_or_else(|| "FAILED_PRECONDITION".to_owned()),
        ))
    } else {
        Err(status)
    }
}

/// The google.rpc.ErrorInfo reason of a status, if it carries one.
fn reason(status: &Status) -> Option<String> {
    status
        .check_error_details()
        .ok()?
        .error_info()
        .map(|info| info.reason.clone())
}

/// `CODE` or `CODE/REASON`, e.g. `UNAVAILABLE/CATALOG_UNAVAILABLE`.
fn error_label(status: &Status) -> String {
    let code = flashmesh_platform::error::code_name(status.code());
    match reason(status) {
        Some(reason) => format!("{code}/{reason}"),
        None => code.to_owned(),
    }
}

/// What one scenario measured.
pub struct Row {
    pub scenario: String,
    pub mode: Mode,
    pub callers: usize,
    pub ok: u64,
    /// Units taken, summed over OK answers.
    pub units: u64,
    /// Refusals by reason.
    pub refused: BTreeMap<String, u64>,
    /// Errors by `CODE/REASON`, with the first message seen.
    pub errors: BTreeMap<String, (u64, String)>,
    pub elapsed: Duration,
    /// When the last OK answer arrived, from the start.
    pub last_ok: Option<Duration>,
    /// Every answer.
    pub latency: Histogram<u64>,
    /// OK answers only.
    pub ok_latency: Histogram<u64>,
}

impl Row {
    pub fn calls(&self) -> u64 {
        self.latency.len()
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    /// Answers per second.
    pub fn throughput(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64()
    }

    /// OK answers per second.
    pub fn ok_throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// One answer to a call started at `began`, the run having started at
    /// `started`.
    fn record(&mut self, began: Instant, started: Instant, answer: Result<Outcome, Status>) {
        let micros = u64::try_from(began.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.latency.saturating_record(micros);
        match answer {
            Ok(Outcome::Ok { units }) => {
                self.ok += 1;
                self.units += units;
                self.ok_latency.saturating_record(micros);
                self.last_ok = Some(started.elapsed());
            }
            Ok(Outcome::Refused(reason)) => *self.refused.entry(reason).or_default() += 1,
            Err(status) => {
                self.errors
                    .entry(error_label(&status))
                    .or_insert_with(|| (0, status.message().to_owned()))
                    .0 += 1;
            }
        }
    }

    fn print_errors(&self) {
        for (label, (n, sample)) in &self.errors {
            eprintln!("    {n} × {label}, first: {sample}");
        }
    }

    fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        self.units += other.units;
        for (reason, n) in other.refused {
            *self.refused.entry(reason).or_default() += n;
        }
        for (label, (n, sample)) in other.errors {
            self.errors.entry(label).or_insert((0, sample)).0 += n;
        }
        self.last_ok = self.last_ok.max(other.last_ok);
        // Same bounds, so adding cannot fail.
        let _ = self.latency.add(other.latency);
        let _ = self.ok_latency.add(other.ok_latency);
    }

    fn empty(scenario: &str, mode: Mode, callers: usize) -> Self {
        Self {
            scenario: scenario.to_owned(),
            mode,
            callers,
            ok: 0,
            units: 0,
            refused: BTreeMap::new(),
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
            last_ok: None,
            latency: latency_histogram(),
            ok_latency: latency_histogram(),
        }
    }
}

/// Runs `call` from `callers` concurrent loops for `duration`. Caller `c`
/// passes `c`, `c + callers`, `c + 2 * callers`, … to its successive calls.
pub async fn run<F, Fut>(
    scenario: &str,
    mode: Mode,
    callers: usize,
    duration: Duration,
    call: F,
) -> Row
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, Status>> + Send + 'static,
{
    eprintln!("  {scenario}: {callers} callers for {duration:?}");
    let call = Arc::new(call);
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut loops = Vec::with_capacity(callers);
    for caller in 0..callers {
        let call = call.clone();
        loops.push(async move {
            let mut row = Row::empty(scenario, mode, callers);
            let mut n = 0usize;
            while Instant::now() < deadline {
                let began = Instant::now();
                let answer = call(caller + n * callers).await;
                row.record(began, started, answer);
                n += 1;
            }
            row
        });
    }
    let results = futures::future::join_all(loops).await;
    let mut row = Row::empty(scenario, mode, callers);
    row.elapsed = started.elapsed();
    for result in results {
        row.merge(result);
    }
    row.print_errors();
    row
}

/// Starts `call` `rate` times a second for `duration`, on schedule whatever
/// the answers take (open loop, like `ghz --rps` or k6's
/// constant-arrival-rate), passing `0, 1, 2, …`. Each latency counts from
/// the moment its call was due, so a stall also delays the calls that were
/// due during it (no coordinated omission). The row's `callers` is 0.
pub async fn run_paced<F, Fut>(
    scenario: &str,
    mode: Mode,
    rate: u32,
    duration: Duration,
    call: F,
) -> Row
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Outcome, Status>> + Send + 'static,
{
    eprintln!("  {scenario}: {rate} calls/s for {duration:?}");
    let runtime = tokio::runtime::Handle::current();
    let interval = Duration::from_secs(1) / rate.max(1);
    let started = Instant::now();
    let answers = Arc::new(std::sync::Mutex::new(Row::empty(scenario, mode, 0)));
    let dispatch = {
        let answers = answers.clone();
        // A thread of its own: the runtime's timer ticks in milliseconds,
        // which would send the calls in bursts.
        tokio::task::spawn_blocking(move || {
            let mut calls = Vec::new();
            for n in 0.. {
                let due = started + interval * n;
                if due.duration_since(started) >= duration {
                    break;
                }
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let answer = call(n as usize);
                let answers = answers.clone();
                calls.push(runtime.spawn(async move {
                    let answer = answer.await;
                    if let Ok(mut row) = answers.lock() {
                        row.record(due, started, answer);
                    }
                }));
            }
            calls
        })
    };
    // A call whose task panicked goes uncounted (the callers return errors
    // as answers; they do not panic).
    for call in dispatch.await.unwrap_or_default() {
        let _ = call.await;
    }
    let mut row = match Arc::try_unwrap(answers).map(std::sync::Mutex::into_inner) {
        Ok(Ok(row)) => row,
        _ => Row::empty(scenario, mode, 0),
    };
    row.elapsed = started.elapsed();
    row.print_errors();
    row
}

/// 1 µs to 60 s at 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// The median of `values` (`None` if there are none): over several rounds,
/// the round a disturbance hit moves it least.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The median of `values` and an approximate 95% confidence interval of it
/// (`None` if there are none): the order statistics n/2 ∓ 0.98·√n, which
/// assume nothing about how the values are distributed.
pub fn median_interval(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64, f64)> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let middle = median(values.iter().copied())?;
    let half_width = 0.98 * (n as f64).sqrt();
    let half = n as f64 / 2.0;
    // Ranks counted from 1: ⌊n/2 − 0.98·√n⌋ and ⌈n/2 + 1 + 0.98·√n⌉.
    let low = ((half - half_width).floor().max(1.0) as usize - 1).min(n - 1);
    let high = ((half + half_width).ceil() as usize).min(n - 1);
    Some((middle, values[low], values[high]))
}

/// Milliseconds at quantile `q`.
pub fn ms_at(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_widens_with_fewer_values() {
        let thirty = (1..=30).map(f64::from);
        // Ranks 9 and 22 of 30: 15 ∓ 5.37, the upper one plus one.
        assert_eq!(median_interval(thirty), Some((15.5, 9.0, 22.0)));
        let five = [5.0, 1.0, 4.0, 2.0, 3.0];
        // Too few for a narrower interval than all of them.
        assert_eq!(median_interval(five), Some((3.0, 1.0, 5.0)));
        assert_eq!(median_interval([]), None);
    }

    /// Open loop: calls start on schedule however long the answers take,
    /// unlike a closed-loop caller, which would manage 5 of these in 250 ms.
    #[tokio::test]
    async fn paced_calls_start_on_schedule_whatever_the_answers_take() {
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let calls = started.clone();
        let row = run_paced(
            "paced",
            Mode::RedisGate,
            200,
            Duration::from_millis(250),
            move |n| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if n % 10 == 9 {
                        Err(Status::unavailable("every tenth fails"))
                    } else {
                        Ok(Outcome::Ok { units: 1 })
                    }
                }
            },
        )
        .await;
        // One call due every 5 ms from 0 up to (not including) 250 ms.
        assert_eq!(started.load(std::sync::atomic::Ordering::Relaxed), 50);
        assert_eq!((row.ok, row.units, row.errors_total()), (45, 45, 5));
        assert_eq!(row.calls(), 50);
        // Each answer took 50 ms, counted from when its call was due.
        assert!(row.latency.min() >= 50_000, "{}", row.latency.min());
        assert!(
            row.elapsed >= Duration::from_millis(295),
            "{:?}",
            row.elapsed
        );
    }
}
