//! The one mapping from domain errors to `tonic::Status`.
//!
//! Every service's error enum implements [`DomainError`]; [`to_status`] turns
//! it into a status whose details carry `google.rpc.ErrorInfo` (domain
//! [`ERROR_DOMAIN`], an UPPER_SNAKE reason, metadata) and, for bad input,
//! `google.rpc.BadRequest` field violations, so clients in any language can
//! branch on them. Server faults are logged here with their cause and reach
//! the client only as a generic message.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `google.rpc.ErrorInfo.domain` of every flashmesh error.
pub const ERROR_DOMAIN: &str = "flashmesh.dev";

/// One offending request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

/// `field description; field description`, for error messages.
pub fn describe_violations(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{} {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a domain error tells its caller.
pub trait DomainError: std::error::Error {
    /// The gRPC code. `Internal` and `Unavailable` are server-side faults.
    fn code(&self) -> Code;
    /// `ErrorInfo.reason`, UPPER_SNAKE.
    fn reason(&self) -> &'static str;
    /// `ErrorInfo.metadata`, lowerCamelCase keys.
    fn metadata(&self) -> HashMap<String, String> {
        HashMap::new()
    }
    /// `BadRequest.field_violations`.
    fn field_violations(&self) -> &[FieldViolation] {
        &[]
    }
}

/// The gRPC code's canonical UPPER_SNAKE name (`FAILED_PRECONDITION`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The HTTP status for a gRPC code, as Google's API design guide maps them
/// (FAILED_PRECONDITION as 400: callers that know a reason may say 409).
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // 499 Client Closed Request, as nginx and Google's guide say.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Builds the status for `err`.
pub fn to_status(err: &(impl DomainError + ?Sized)) -> Status {
    let code = err.code();
    let message = match code {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            tracing::error!(error = %error_chain(err), reason = err.reason(), "request failed");
            "internal error".to_owned()
        }
        Code::Unavailable => {
            tracing::warn!(error = %error_chain(err), reason = err.reason(), "dependency unavailable");
            "temporarily unavailable, retry with backoff".to_owned()
        }
        _ => err.to_string(),
    };
    let mut details = ErrorDetails::new();
    details.set_error_info(err.reason(), ERROR_DOMAIN, err.metadata());
    for violation in err.field_violations() {
        details.add_bad_request_violation(violation.field, &violation.description);
    }
    Status::with_error_details(code, message, details)
}

/// `err` and its sources, joined, for logs.
fn error_chain(err: &(impl std::error::Error + ?Sized)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum SampleError {
        #[error("the request is malformed")]
        Invalid(Vec<FieldViolation>),
        #[error("database down")]
        Storage(#[source] std::io::Error),
    }

    impl DomainError for SampleError {
        fn code(&self) -> Code {
            match self {
                Self::Invalid(_) => Code::InvalidArgument,
                Self::Storage(_) => Code::Internal,
            }
        }
        fn reason(&self) -> &'static str {
            match self {
                Self::Invalid(_) => "INVALID_ARGUMENT",
                Self::Storage(_) => "INTERNAL",
            }
        }
        fn field_violations(&self) -> &[FieldViolation] {
            match self {
                Self::Invalid(v) => v,
                Self::Storage(_) => &[],
            }
        }
    }

    #[test]
    fn status_carries_error_info_and_field_violations() {
        let err = SampleError::Invalid(vec![FieldViolation::new("email", "not an address")]);
        let status = to_status(&err);
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.domain, ERROR_DOMAIN);
        let bad = details.bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "email");
        assert_eq!(bad.field_violations[0].description, "not an address");
    }

    #[test]
    fn server_faults_hide_their_cause() {
        let err = SampleError::Storage(std::io::Error::other("password=hunter2 in DSN"));
        let status = to_status(&err);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
