//! Everything that can go wrong in the catalog, and what callers see.

use std::collections::HashMap;

use flashmesh_platform::error::{DomainError, FieldViolation, describe_violations, to_status};
use tonic::Code;

use crate::domain::DealState;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidInput(Vec<FieldViolation>),
    #[error("this call needs an admin token")]
    AdminRequired,
    #[error("only the order service may reserve or release stock")]
    CallerNotAllowed,
    #[error("no product has this id")]
    ProductNotFound,
    #[error("no deal has this id")]
    DealNotFound,
    #[error("the deal is not active ({})", .state.name())]
    DealNotActive { state: DealState },
    #[error("sold out: {remaining} units remain")]
    SoldOut { remaining: i32 },
    #[error("the per-user limit of {limit} units would be exceeded ({held} held)")]
    LimitExceeded { limit: i32, held: i32 },
    #[error("this reservation_id was used for a different deal, user or quantity")]
    ReservationIdReused,
    #[error("this reservation_id has been released")]
    ReservationReleased,
    #[error("another request with this reservation_id is in progress; retry")]
    ReservationContended,
    #[error("storage failed")]
    Storage(#[from] sqlx::Error),
    /// One failure handed to every caller that waited on the same cache load.
    #[error(transparent)]
    Shared(std::sync::Arc<CatalogError>),
}

impl CatalogError {
    /// Takes back an error a cache load shared among its waiters.
    pub fn unshare(shared: std::sync::Arc<CatalogError>) -> Self {
        std::sync::Arc::try_unwrap(shared).unwrap_or_else(Self::Shared)
    }
}

impl DomainError for CatalogError {
    fn code(&self) -> Code {
        match self {
            Self::Shared(inner) => inner.code(),
            Self::InvalidInput(_) => Code::InvalidArgument,
            Self::AdminRequired | Self::CallerNotAllowed => Code::PermissionDenied,
            Self::ProductNotFound | Self::DealNotFound => Code::NotFound,
            Self::DealNotActive { .. }
            | Self::SoldOut { .. }
            | Self::LimitExceeded { .. }
            | Self::ReservationIdReused
            | Self::ReservationReleased => Code::FailedPrecondition,
            Self::ReservationContended => Code::Aborted,
            Self::Storage(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => Code::Unavailable,
            Self::Storage(_) => Code::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Shared(inner) => inner.reason(),
            Self::InvalidInput(_) => "INVALID_ARGUMENT",
            Self::AdminRequired => "ADMIN_REQUIRED",
            Self::CallerNotAllowed => "CALLER_NOT_ALLOWED",
            Self::ProductNotFound => "PRODUCT_NOT_FOUND",
            Self::DealNotFound => "DEAL_NOT_FOUND",
            Self::DealNotActive { .. } => "DEAL_NOT_ACTIVE",
            Self::SoldOut { .. } => "SOLD_OUT",
            Self::LimitExceeded { .. } => "LIMIT_EXCEEDED",
            Self::ReservationIdReused => "IDEMPOTENCY_KEY_REUSED",
            Self::ReservationReleased => "RESERVATION_RELEASED",
            Self::ReservationContended => "REQUEST_IN_PROGRESS",
            Self::Storage(_) => "STORAGE_FAILURE",
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            Self::Shared(inner) => inner.metadata(),
            Self::DealNotActive { state } => {
                HashMap::from([("state".to_owned(), state.name().to_owned())])
            }
            Self::SoldOut { remaining } => {
                HashMap::from([("remainingStock".to_owned(), remaining.to_string())])
            }
            Self::LimitExceeded { limit, held } => HashMap::from([
                ("perUserLimit".to_owned(), limit.to_string()),
                ("heldQuantity".to_owned(), held.to_string()),
            ]),
            _ => HashMap::new(),
        }
    }

    fn field_violations(&self) -> &[FieldViolation] {
        match self {
            Self::Shared(inner) => inner.field_violations(),
            Self::InvalidInput(violations) => violations,
            _ => &[],
        }
    }
}

impl From<CatalogError> for tonic::Status {
    fn from(err: CatalogError) -> Self {
        to_status(&err)
    }
}
