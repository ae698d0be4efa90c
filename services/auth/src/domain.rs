//! The auth service's rules as plain types: what a valid email, password and
//! display name are, and when a refresh token may be used. No I/O here.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use flashmesh_platform::{error::FieldViolation, identity::Role};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::AuthError;

pub const EMAIL_MAX_LEN: usize = 254;
pub const PASSWORD_MIN_CHARS: usize = 8;
/// Caps the work one request can ask argon2 to hash.
pub const PASSWORD_MAX_CHARS: usize = 128;
pub const DISPLAY_NAME_MAX_CHARS: usize = 100;

/// A syntactically valid email, trimmed and lower-cased so that one address
/// has one account however it is typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        let normalised = raw.trim().to_lowercase();
        if normalised.is_empty() {
            return Err(FieldViolation::new("email", "is required"));
        }
        if normalised.len() > EMAIL_MAX_LEN {
            return Err(FieldViolation::new(
                "email",
                format!("must be at most {EMAIL_MAX_LEN} bytes"),
            ));
        }
        if !email_address::EmailAddress::is_valid(&normalised) || !normalised.contains('.') {
            return Err(FieldViolation::new(
                "email",
                "is not a valid email address (expected name@example.com)",
            ));
        }
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before `@`, the default display name.
    fn local_part(&self) -> &str {
        self.0.split('@').next().unwrap_or_default()
    }
}

/// A password of acceptable length. Its characters are the user's business.
pub struct Password<'a>(&'a str);

impl<'a> Password<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, FieldViolation> {
        let chars = raw.chars().count();
        if chars < PASSWORD_MIN_CHARS {
            return Err(FieldViolation::new(
                "password",
                format!("must be at least {PASSWORD_MIN_CHARS} characters"),
            ));
        }
        if chars > PASSWORD_MAX_CHARS {
            return Err(FieldViolation::new(
                "password",
                format!("must be at most {PASSWORD_MAX_CHARS} characters"),
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        self.0
    }
}

/// A validated sign-up.
pub struct NewUser<'a> {
    pub email: Email,
    pub password: Password<'a>,
    pub display_name: String,
}

impl<'a> NewUser<'a> {
    /// Checks every field and reports every violation at once.
    pub fn parse(email: &str, password: &'a str, display_name: &str) -> Result<Self, AuthError> {
        let email = Email::parse(email);
        let password = Password::parse(password);
        let display_name = parse_display_name(display_name);
        match (email, password, display_name) {
            (Ok(email), Ok(password), Ok(display_name)) => {
                let display_name = display_name.unwrap_or_else(|| email.local_part().to_owned());
                Ok(Self {
                    email,
                    password,
                    display_name,
                })
            }
            (email, password, display_name) => Err(AuthError::InvalidInput(
                [email.err(), password.err(), display_name.err()]
                    .into_iter()
                    .flatten()
                    .collect(),
            )),
        }
    }
}

/// Login input. Only the shape is checked: a password shorter than today's
/// minimum may still be someone's, so it is refused as a wrong password would
/// be, never as malformed.
pub struct Credentials<'a> {
    pub email: Email,
    pub password: &'a str,
}

impl<'a> Credentials<'a> {
    pub fn parse(email: &str, password: &'a str) -> Result<Self, AuthError> {
        let mut violations = Vec::new();
        let email = Email::parse(email).map_err(|v| violations.push(v)).ok();
        if password.is_empty() {
            violations.push(FieldViolation::new("password", "is required"));
        } else if password.chars().count() > PASSWORD_MAX_CHARS {
            violations.push(FieldViolation::new(
                "password",
                format!("must be at most {PASSWORD_MAX_CHARS} characters"),
            ));
        }
        match email {
            Some(email) if violations.is_empty() => Ok(Self { email, password }),
            _ => Err(AuthError::InvalidInput(violations)),
        }
    }
}

fn parse_display_name(raw: &str) -> Result<Option<String>, FieldViolation> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.chars().count() > DISPLAY_NAME_MAX_CHARS {
        return Err(FieldViolation::new(
            "display_name",
            format!("must be at most {DISPLAY_NAME_MAX_CHARS} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            "display_name",
            "must not contain control characters",
        ));
    }
    Ok(Some(trimmed.to_owned()))
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Admin => "admin",
        Role::Service => "service",
    }
}

pub fn parse_role(name: &str) -> Option<Role> {
    match name {
        "user" => Some(Role::User),
        "admin" => Some(Role::Admin),
        _ => None,
    }
}

/// A user as stored.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub role: Role,
    pub password_hash: String,
    /// Unix epoch milliseconds.
    pub created_at: i64,
}

/// A new refresh token: 256 random bits, shown to the client once.
pub struct RefreshSecret(String);

impl RefreshSecret {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// What is stored instead of a refresh token: its SHA-256, hex. The token's
/// entropy makes a slow hash unnecessary.
pub fn refresh_token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stored refresh token.
#[derive(Debug, Clone)]
pub struct StoredRefreshToken {
    pub id: String,
    pub family_id: String,
    pub user_id: String,
    pub expires_at: i64,
    pub spent_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// Why a stored refresh token cannot be exchanged.
#[derive(Debug, PartialEq, Eq)]
pub enum RefreshRejection {
    /// Its family was revoked (logout or detected reuse).
    Revoked,
    /// It was already exchanged: someone replays a stolen or stale token, so
    /// the whole family must be revoked.
    Reused,
    Expired,
}

impl StoredRefreshToken {
    pub fn check_usable(&self, now: i64) -> Result<(), RefreshRejection> {
        if self.revoked_at.is_some() {
            Err(RefreshRejection::Revoked)
        } else if self.spent_at.is_some() {
            Err(RefreshRejection::Reused)
        } else if self.expires_at <= now {
            Err(RefreshRejection::Expired)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_validated() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@@example.com",
            "ada@localhost",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn sign_up_reports_every_bad_field() {
        let Err(AuthError::InvalidInput(violations)) =
            NewUser::parse("nope", "short", &"x".repeat(101))
        else {
            panic!("accepted");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field).collect();
        assert_eq!(fields, ["email", "password", "display_name"]);
    }

    #[test]
    fn display_name_defaults_to_the_local_part() {
        let user = NewUser::parse("grace@example.com", "correct horse", " ").unwrap();
        assert_eq!(user.display_name, "grace");
    }

    #[test]
    fn password_length_counts_characters() {
        assert!(Password::parse("ééééééé").is_err());
        assert!(Password::parse("éééééééé").is_ok());
        assert!(Password::parse(&"p".repeat(129)).is_err());
    }

    #[test]
    fn refresh_tokens_are_usable_once_until_expiry() {
        let token = StoredRefreshToken {
            id: "t".into(),
            family_id: "f".into(),
            user_id: "u".into(),
            expires_at: 1_000,
            spent_at: None,
            revoked_at: None,
        };
        assert_eq!(token.check_usable(999), Ok(()));
        assert_eq!(token.check_usable(1_000), Err(RefreshRejection::Expired));
        let spent = StoredRefreshToken {
            spent_at: Some(5),
            ..token.clone()
        };
        assert_eq!(spent.check_usable(10), Err(RefreshRejection::Reused));
        let revoked = StoredRefreshToken {
            revoked_at: Some(6),
            ..spent
        };
        assert_eq!(revoked.check_usable(10), Err(RefreshRejection::Revoked));
    }

    #[test]
    fn refresh_secrets_are_random_and_hashed() {
        let a = RefreshSecret::generate();
        let b = RefreshSecret::generate();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.as_str().len(), 43);
        assert_eq!(refresh_token_hash(a.as_str()).len(), 64);
        assert_ne!(
            refresh_token_hash(a.as_str()),
            refresh_token_hash(b.as_str())
        );
    }
}
