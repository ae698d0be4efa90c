//! Everything that can go wrong in the auth service, and what callers see.

use std::{collections::HashMap, time::Duration};

use flashmesh_platform::error::{DomainError, FieldViolation, describe_violations, to_status};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidInput(Vec<FieldViolation>),
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("too many failed logins for this email; try again later")]
    TooManyLoginAttempts { retry_after: Duration },
    #[error("the refresh token is not valid")]
    RefreshTokenInvalid,
    #[error("the refresh token has expired; log in again")]
    RefreshTokenExpired,
    #[error("the refresh token was already used; every session from that login is revoked")]
    RefreshTokenReused,
    #[error("the user no longer exists")]
    UserNotFound,
    #[error("storage failed")]
    Storage(#[from] sqlx::Error),
    #[error("password hashing failed: {0}")]
    PasswordHashing(String),
    #[error("token signing failed")]
    TokenSigning(#[from] jsonwebtoken::errors::Error),
}

impl DomainError for AuthError {
    fn code(&self) -> Code {
        match self {
            Self::InvalidInput(_) => Code::InvalidArgument,
            Self::EmailTaken => Code::AlreadyExists,
            Self::InvalidCredentials
            | Self::RefreshTokenInvalid
            | Self::RefreshTokenExpired
            | Self::RefreshTokenReused => Code::Unauthenticated,
            Self::TooManyLoginAttempts { .. } => Code::ResourceExhausted,
            Self::UserNotFound => Code::NotFound,
            Self::Storage(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => Code::Unavailable,
            Self::Storage(_) | Self::PasswordHashing(_) | Self::TokenSigning(_) => Code::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidInput(_) => "INVALID_ARGUMENT",
            Self::EmailTaken => "EMAIL_TAKEN",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::TooManyLoginAttempts { .. } => "TOO_MANY_LOGIN_ATTEMPTS",
            Self::RefreshTokenInvalid => "REFRESH_TOKEN_INVALID",
            Self::RefreshTokenExpired => "REFRESH_TOKEN_EXPIRED",
            Self::RefreshTokenReused => "REFRESH_TOKEN_REUSED",
            Self::UserNotFound => "USER_NOT_FOUND",
            Self::Storage(_) => "STORAGE_FAILURE",
            Self::PasswordHashing(_) => "PASSWORD_HASHING_FAILURE",
            Self::TokenSigning(_) => "TOKEN_SIGNING_FAILURE",
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        match self {
            Self::TooManyLoginAttempts { retry_after } => HashMap::from([(
                "retryAfterSeconds".to_owned(),
                retry_after.as_secs().to_string(),
            )]),
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

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        to_status(&err)
    }
}
