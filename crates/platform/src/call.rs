//! What a call carries besides its message: the caller's deadline
//! (`grpc-timeout`) and W3C trace context (`traceparent`), so a service can
//! pass both on to the calls and events it causes.

use std::time::{Duration, Instant};

/// When the caller stops waiting: now plus its `grpc-timeout`, never later
/// than `limit` from now (the server's own request timeout).
pub fn deadline<T>(request: &tonic::Request<T>, limit: Duration) -> Instant {
    let asked = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Instant::now() + asked.map_or(limit, |asked| asked.min(limit))
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The trace context to record with what this call causes (an outbox
/// event): the current span's when the call is traced (sampled or not),
/// else the caller's `traceparent` if well-formed, else a new sampled trace.
pub fn traceparent<T>(request: &tonic::Request<T>) -> String {
    if let Some(current) = crate::telemetry::current_traceparent() {
        return current;
    }
    request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_traceparent(v))
        .map_or_else(new_traceparent, str::to_owned)
}

fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [version, trace, span, flags]
        if hex(version, 2) && *version != "ff" && hex(trace, 32) && hex(span, 16) && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0') && span.bytes().any(|b| b != b'0'))
}

fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn deadline_is_capped_by_the_limit() {
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "100S".parse().unwrap());
        let d = deadline(&request, Duration::from_secs(1));
        assert!(d <= Instant::now() + Duration::from_secs(1));
        request
            .metadata_mut()
            .insert("grpc-timeout", "10m".parse().unwrap());
        assert!(
            deadline(&request, Duration::from_secs(1))
                <= Instant::now() + Duration::from_millis(10)
        );
    }

    #[test]
    fn traceparent_is_kept_or_made() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("traceparent", given.parse().unwrap());
        assert_eq!(traceparent(&request), given);
        request
            .metadata_mut()
            .insert("traceparent", "garbage".parse().unwrap());
        let made = traceparent(&request);
        assert_ne!(made, given);
        assert!(is_traceparent(&made), "{made}");
    }
}
