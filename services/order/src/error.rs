//! Everything that can go wrong with an order, and what callers see.

use std::collections::HashMap;

use flashmesh_platform::error::{DomainError, FieldViolation, describe_violations, to_status};
use tonic::Code;

use crate::domain::{Refusal, RefusalKind};

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidInput(Vec<FieldViolation>),
    #[error("this call needs an admin token")]
    AdminRequired,
    #[error("no order of yours has this id")]
    OrderNotFound,
    #[error("this idempotency_key was already used for a different deal_id or quantity")]
    IdempotencyKeyReused,
    #[error("a request with this idempotency_key is still in progress; retry shortly")]
    RequestInProgress,
    #[error("{}", .0.message)]
    Refused(Refusal),
    #[error("the catalog service is unavailable: {detail}")]
    CatalogUnavailable { detail: String, breaker_open: bool },
    #[error("the call's deadline passed before the catalog answered")]
    DeadlineExceeded,
    /// The catalog answered in a way the order service never expects (a
    /// misconfigured service token, say).
    #[error("unexpected answer from the catalog: {0}")]
    Catalog(tonic::Status),
    #[error("storage failed")]
    Storage(#[from] sqlx::Error),
}

impl DomainError for OrderError {
    fn code(&self) -> Code {
        match self {
            Self::InvalidInput(_) => Code::InvalidArgument,
            Self::AdminRequired => Code::PermissionDenied,
            Self::OrderNotFound => Code::NotFound,
            Self::IdempotencyKeyReused => Code::FailedPrecondition,
            Self::RequestInProgress => Code::Aborted,
            Self::Refused(refusal) => match refusal.kind {
                RefusalKind::DealNotFound => Code::NotFound,
                RefusalKind::DealNotActive | RefusalKind::SoldOut | RefusalKind::LimitExceeded => {
                    Code::FailedPrecondition
                }
            },
            Self::CatalogUnavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Catalog(_) => Code::Internal,
            Self::Storage(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => Code::Unavailable,
            Self::Storage(_) => Code::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidInput(_) => "INVALID_ARGUMENT",
            Self::AdminRequired => "ADMIN_REQUIRED",
            Self::OrderNotFound => "ORDER_NOT_FOUND",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::RequestInProgress => "REQUEST_IN_PROGRESS",
            Self::Refused(refusal) => refusal.kind.reason(),
            Self::CatalogUnavailable { .. } => "CATALOG_UNAVAILABLE",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Catalog(_) => "CATALOG_FAILURE",
            Self::Storage(_) => "STORAGE_FAILURE",
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            Self::Refused(refusal) => refusal
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            Self::CatalogUnavailable { breaker_open, .. } => {
                HashMap::from([("breakerOpen".to_owned(), breaker_open.to_string())])
            }
            _ => HashMap::new(),
        }
    }

    fn field_violations(&self) -> &[FieldViolation] {
        match self {
            Self::InvalidInput(violations) => violations,
            _ => &[],
        }
    }
}

impl From<OrderError> for tonic::Status {
    fn from(err: OrderError) -> Self {
        to_status(&err)
    }
}
