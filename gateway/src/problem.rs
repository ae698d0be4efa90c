//! RFC 9457 `application/problem+json` bodies for every non-2xx answer.
//!
//! Upstream gRPC statuses are mapped to HTTP the way Google's API design
//! guide does ([`Problem::from_status`]); the `google.rpc.ErrorInfo` reason
//! becomes the stable, UPPER_SNAKE `code` clients branch on, and
//! `google.rpc.BadRequest` field violations become `errors`. Server faults
//! never carry the upstream message.

use std::{
    collections::BTreeMap,
    ops::{Deref, DerefMut},
};

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde::Serialize;
use tonic::Code;
use tonic_types::StatusExt;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where problem types are documented: `{PROBLEM_TYPE_BASE}sold-out`.
pub const PROBLEM_TYPE_BASE: &str = "https://flashmesh.dev/problems/";

/// `FAILED_PRECONDITION` reasons that mean "the resource is not in a state
/// that allows this" — a conflict (409) rather than a bad request (400).
const CONFLICT_REASONS: &[&str] = &[
    "SOLD_OUT",
    "LIMIT_EXCEEDED",
    "DEAL_NOT_ACTIVE",
    "IDEMPOTENCY_KEY_REUSED",
    "RESERVATION_RELEASED",
    "ORDER_NOT_CANCELLABLE",
];

/// The status the gateway answers with when the client went away first
/// (nginx's convention; no registered reason phrase).
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// One offending request field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub description: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// An RFC 9457 problem document plus the headers that go with it.
///
/// Boxed, so `Result<T, Problem>` stays pointer-sized on the hot path (and
/// clippy's `result_large_err` stays quiet at every call site); the fields
/// are reached through `Deref`/`DerefMut`: `problem.status`, `problem.code`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Problem(Box<ProblemDetails>);

/// The fields of a [`Problem`].
#[derive(Debug, Clone, Serialize)]
pub struct ProblemDetails {
    /// A URI naming the problem type, derived from `code`, or `about:blank`
    /// when the problem means no more than its HTTP status.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP reason phrase.
    pub title: String,
    pub status: u16,
    /// Human-readable; never an upstream server fault's message.
    pub detail: String,
    /// Stable, UPPER_SNAKE: the upstream `ErrorInfo.reason`, or the gateway's
    /// own (`ROUTE_NOT_FOUND`, `RATE_LIMITED`, `UPSTREAM_UNAVAILABLE`, ...).
    pub code: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// `ErrorInfo.metadata`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// `Retry-After`, `WWW-Authenticate`, `Allow`, ...
    #[serde(skip)]
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Deref for Problem {
    type Target = ProblemDetails;

    fn deref(&self) -> &ProblemDetails {
        &self.0
    }
}

impl DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut ProblemDetails {
        &mut self.0
    }
}

impl Problem {
    /// A problem with a documented type derived from `code`.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self(Box::new(ProblemDetails {
            kind: type_uri(code),
            title: title(status),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_owned(),
            errors: Vec::new(),
            metadata: BTreeMap::new(),
            headers: Vec::new(),
        }))
    }

    /// A problem that means no more than its HTTP status (`type: about:blank`).
    fn generic(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        let mut problem = Self::new(status, code, detail);
        problem.kind = "about:blank".to_owned();
        problem
    }

    /// Adds a response header; a header of the same name is replaced.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.retain(|(existing, _)| *existing != name);
        self.headers.push((name, value));
        self
    }

    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The headers the response will carry besides `Content-Type`.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// The HTTP status (500 if `status` was set to something invalid).
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The HTTP answer for an upstream gRPC failure.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let info = details.error_info();
        let reason = info
            .map(|info| info.reason.as_str())
            .filter(|r| !r.is_empty());
        let message = status.message();

        let http = match status.code() {
            Code::FailedPrecondition
                if reason.is_some_and(|reason| CONFLICT_REASONS.contains(&reason)) =>
            {
                StatusCode::CONFLICT
            }
            // OK is not a failure; reaching here with it is a gateway bug.
            Code::Ok | Code::Internal | Code::Unknown | Code::DataLoss => {
                return Self::generic(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL",
                    "internal error",
                );
            }
            code => flashmesh_platform::error::http_status(code),
        };

        // Upstream transport failures (connect refused, ...) carry addresses
        // and library wording: the client gets a fixed sentence instead.
        let mut problem = match status.code() {
            Code::Unavailable => Self::from_reason(
                http,
                reason.unwrap_or("UPSTREAM_UNAVAILABLE"),
                "the service is temporarily unavailable; retry later",
                reason.is_some(),
            ),
            Code::DeadlineExceeded => Self::from_reason(
                http,
                reason.unwrap_or("DEADLINE_EXCEEDED"),
                "the service did not answer in time",
                reason.is_some(),
            ),
            Code::Unimplemented => Self::from_reason(
                http,
                reason.unwrap_or("UNIMPLEMENTED"),
                "this operation is not implemented",
                reason.is_some(),
            ),
            code => Self::from_reason(
                http,
                reason.unwrap_or_else(|| flashmesh_platform::error::code_name(code)),
                message,
                reason.is_some(),
            ),
        };

        if let Some(info) = info {
            problem.metadata = info
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        if let Some(bad) = details.bad_request() {
            problem.errors = bad
                .field_violations
                .iter()
                .map(|v| FieldError::new(&v.field, &v.description))
                .collect();
        }

        match status.code() {
            Code::Unauthenticated => problem.with_header(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            ),
            Code::ResourceExhausted => {
                let seconds = problem
                    .metadata
                    .get("retryAfterSeconds")
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .or_else(|| {
                        details
                            .retry_info()
                            .and_then(|info| info.retry_delay)
                            .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0))
                    })
                    .unwrap_or(1)
                    .max(1);
                problem.with_header(header::RETRY_AFTER, HeaderValue::from(seconds))
            }
            Code::Unavailable => {
                problem.with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            _ => problem,
        }
    }

    fn from_reason(status: StatusCode, code: &str, detail: &str, documented: bool) -> Self {
        if documented {
            Self::new(status, code, detail)
        } else {
            Self::generic(status, code, detail)
        }
    }
}

impl From<tonic::Status> for Problem {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(&status)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| {
            // Serializing strings and maps cannot fail; keep a body anyway.
            br#"{"type":"about:blank","title":"Internal Server Error","status":500,"detail":"internal error","code":"INTERNAL"}"#.to_vec()
        });
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (name, value) in self.0.headers {
            headers.insert(name, value);
        }
        response
    }
}

/// `SOLD_OUT` → `https://flashmesh.dev/problems/sold-out`.
fn type_uri(code: &str) -> String {
    let slug: String = code
        .chars()
        .map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    if slug.is_empty() {
        "about:blank".to_owned()
    } else {
        format!("{PROBLEM_TYPE_BASE}{slug}")
    }
}

fn title(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => reason.to_owned(),
        None if status.as_u16() == CLIENT_CLOSED_REQUEST => "Client Closed Request".to_owned(),
        None => status.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use tonic::Status;
    use tonic_types::ErrorDetails;

    fn with_reason(code: Code, message: &str, reason: &str) -> Status {
        with_info(code, message, reason, HashMap::new())
    }

    fn with_info(
        code: Code,
        message: &str,
        reason: &str,
        metadata: HashMap<String, String>,
    ) -> Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(reason, "flashmesh.dev", metadata);
        Status::with_error_details(code, message, details)
    }

    fn header<'a>(problem: &'a Problem, name: &HeaderName) -> Option<&'a str> {
        problem
            .headers()
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[test]
    fn mapping_table() {
        let rows = [
            (Code::InvalidArgument, "INVALID_ARGUMENT", 400),
            (Code::Unauthenticated, "TOKEN_INVALID", 401),
            (Code::PermissionDenied, "ADMIN_REQUIRED", 403),
            (Code::NotFound, "DEAL_NOT_FOUND", 404),
            (Code::AlreadyExists, "EMAIL_TAKEN", 409),
            (Code::Aborted, "REQUEST_IN_PROGRESS", 409),
            (Code::FailedPrecondition, "SOLD_OUT", 409),
            (Code::FailedPrecondition, "LIMIT_EXCEEDED", 409),
            (Code::FailedPrecondition, "DEAL_NOT_ACTIVE", 409),
            (Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED", 409),
            (Code::FailedPrecondition, "RESERVATION_RELEASED", 409),
            (Code::FailedPrecondition, "ORDER_NOT_CANCELLABLE", 409),
            (Code::FailedPrecondition, "PASSWORD_TOO_OLD", 400),
            (Code::OutOfRange, "PAGE_OUT_OF_RANGE", 400),
            (Code::ResourceExhausted, "TOO_MANY_LOGIN_ATTEMPTS", 429),
            (Code::Cancelled, "CANCELLED", 499),
            (Code::Unavailable, "CATALOG_UNAVAILABLE", 503),
            (Code::DeadlineExceeded, "DEADLINE_EXCEEDED", 504),
            (Code::Unimplemented, "UNIMPLEMENTED", 501),
            (Code::Internal, "STORAGE_FAILURE", 500),
            (Code::Unknown, "WHATEVER", 500),
            (Code::DataLoss, "WHATEVER", 500),
        ];
        for (code, reason, http) in rows {
            let problem = Problem::from_status(&with_reason(code, "upstream says", reason));
            assert_eq!(problem.status, http, "{code:?} {reason}");
        }
    }

    #[test]
    fn failed_precondition_without_reason_is_a_bad_request() {
        let problem = Problem::from_status(&Status::failed_precondition("not yet"));
        assert_eq!(problem.status, 400);
        assert_eq!(problem.code, "FAILED_PRECONDITION");
        assert_eq!(problem.kind, "about:blank");
        assert_eq!(problem.detail, "not yet");
    }

    #[test]
    fn client_errors_carry_reason_message_and_metadata() {
        let status = with_info(
            Code::FailedPrecondition,
            "deal 7 is sold out",
            "SOLD_OUT",
            HashMap::from([("dealId".to_owned(), "7".to_owned())]),
        );
        let problem = Problem::from_status(&status);
        assert_eq!(problem.status, 409);
        assert_eq!(problem.title, "Conflict");
        assert_eq!(problem.code, "SOLD_OUT");
        assert_eq!(problem.kind, "https://flashmesh.dev/problems/sold-out");
        assert_eq!(problem.detail, "deal 7 is sold out");
        assert_eq!(
            problem.metadata.get("dealId").map(String::as_str),
            Some("7")
        );
        assert!(problem.headers().is_empty());
    }

    #[test]
    fn unauthenticated_challenges_for_a_bearer_token() {
        let problem = Problem::from_status(&with_reason(
            Code::Unauthenticated,
            "token expired",
            "TOKEN_EXPIRED",
        ));
        assert_eq!(problem.status, 401);
        assert_eq!(problem.detail, "token expired");
        assert_eq!(
            header(&problem, &header::WWW_AUTHENTICATE),
            Some("Bearer error=\"invalid_token\"")
        );
    }

    #[test]
    fn resource_exhausted_retry_after_from_metadata_else_one() {
        let status = with_info(
            Code::ResourceExhausted,
            "too many login attempts",
            "TOO_MANY_LOGIN_ATTEMPTS",
            HashMap::from([("retryAfterSeconds".to_owned(), "900".to_owned())]),
        );
        let problem = Problem::from_status(&status);
        assert_eq!(problem.status, 429);
        assert_eq!(header(&problem, &header::RETRY_AFTER), Some("900"));

        let problem = Problem::from_status(&Status::resource_exhausted("slow down"));
        assert_eq!(header(&problem, &header::RETRY_AFTER), Some("1"));

        let mut details = ErrorDetails::new();
        details.set_retry_info(Some(std::time::Duration::from_millis(2_500)));
        let status = Status::with_error_details(Code::ResourceExhausted, "later", details);
        let problem = Problem::from_status(&status);
        assert_eq!(header(&problem, &header::RETRY_AFTER), Some("3"));
    }

    #[test]
    fn cancelled_is_499() {
        let problem = Problem::from_status(&Status::cancelled("client went away"));
        assert_eq!(problem.status, 499);
        assert_eq!(problem.title, "Client Closed Request");
        assert_eq!(problem.code, "CANCELLED");
    }

    #[test]
    fn unavailable_is_503_with_retry_after_and_no_transport_detail() {
        let problem = Problem::from_status(&Status::unavailable(
            "tcp connect error: 10.0.3.7:50051 connection refused",
        ));
        assert_eq!(problem.status, 503);
        assert_eq!(problem.code, "UPSTREAM_UNAVAILABLE");
        assert!(!problem.detail.contains("10.0.3.7"));
        assert_eq!(header(&problem, &header::RETRY_AFTER), Some("1"));

        let problem = Problem::from_status(&with_reason(
            Code::Unavailable,
            "catalog down",
            "CATALOG_UNAVAILABLE",
        ));
        assert_eq!(problem.code, "CATALOG_UNAVAILABLE");
        assert_eq!(
            problem.kind,
            "https://flashmesh.dev/problems/catalog-unavailable"
        );
    }

    #[test]
    fn deadline_exceeded_is_504_and_unimplemented_501() {
        let problem = Problem::from_status(&Status::deadline_exceeded("timeout at 10.0.0.1"));
        assert_eq!(problem.status, 504);
        assert_eq!(problem.title, "Gateway Timeout");
        assert!(!problem.detail.contains("10.0.0.1"));
        let problem = Problem::from_status(&Status::unimplemented("no such method"));
        assert_eq!(problem.status, 501);
        assert_eq!(problem.code, "UNIMPLEMENTED");
    }

    #[test]
    fn server_faults_hide_message_reason_and_metadata() {
        for code in [Code::Internal, Code::Unknown, Code::DataLoss, Code::Ok] {
            let status = with_info(
                code,
                "password=hunter2 in DSN",
                "STORAGE_FAILURE",
                HashMap::from([("host".to_owned(), "db-1".to_owned())]),
            );
            let problem = Problem::from_status(&status);
            assert_eq!(problem.status, 500, "{code:?}");
            assert_eq!(problem.detail, "internal error");
            assert_eq!(problem.code, "INTERNAL");
            assert_eq!(problem.kind, "about:blank");
            assert!(problem.metadata.is_empty());
            let json = serde_json::to_string(&problem).expect("json");
            assert!(!json.contains("hunter2") && !json.contains("STORAGE_FAILURE"));
        }
    }

    #[tokio::test]
    async fn response_is_problem_json_with_field_errors() {
        let mut details = ErrorDetails::new();
        details.set_error_info("INVALID_ARGUMENT", "flashmesh.dev", HashMap::new());
        details.add_bad_request_violation("quantity", "must be at least 1");
        details.add_bad_request_violation("deal_id", "must not be empty");
        let status = Status::with_error_details(Code::InvalidArgument, "invalid request", details);

        let response = Problem::from_status(&status).into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(PROBLEM_JSON.as_bytes())
        );
        let body = body_json(response).await;
        assert_eq!(
            body,
            serde_json::json!({
                "type": "https://flashmesh.dev/problems/invalid-argument",
                "title": "Bad Request",
                "status": 400,
                "detail": "invalid request",
                "code": "INVALID_ARGUMENT",
                "errors": [
                    {"field": "quantity", "description": "must be at least 1"},
                    {"field": "deal_id", "description": "must not be empty"},
                ],
            })
        );
    }

    #[tokio::test]
    async fn gateway_problems_carry_headers_and_omit_empty_fields() {
        let response = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "use GET or POST",
        )
        .with_header(header::ALLOW, HeaderValue::from_static("GET, POST"))
        .into_response();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            response.headers().get(header::ALLOW).map(|v| v.as_bytes()),
            Some(&b"GET, POST"[..])
        );
        let body = body_json(response).await;
        assert_eq!(
            body,
            serde_json::json!({
                "type": "https://flashmesh.dev/problems/method-not-allowed",
                "title": "Method Not Allowed",
                "status": 405,
                "detail": "use GET or POST",
                "code": "METHOD_NOT_ALLOWED",
            })
        );
    }

    #[test]
    fn problem_is_pointer_sized() {
        assert_eq!(std::mem::size_of::<Problem>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn with_header_replaces_same_name() {
        let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "slow down")
            .with_header(header::RETRY_AFTER, HeaderValue::from(1u64))
            .with_header(header::RETRY_AFTER, HeaderValue::from(5u64));
        assert_eq!(problem.headers().len(), 1);
        assert_eq!(header(&problem, &header::RETRY_AFTER), Some("5"));
    }
}
