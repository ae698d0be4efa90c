//! Keyset page tokens: opaque to clients, signed so a modified token, or one
//! issued for a different query, is rejected rather than trusted.
//!
//! A token is `base64url(json cursor) "." base64url(HMAC-SHA256(query "\n"
//! json))`. The secret comes from `FLASHMESH_PAGE_TOKEN_SECRET`; the
//! embedded default generates one under the data directory, so tokens
//! survive restarts.

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;

use crate::error::FieldViolation;

pub const PAGE_SIZE_DEFAULT: i32 = 20;
pub const PAGE_SIZE_MAX: i32 = 100;

/// Signs and verifies page tokens.
#[derive(Clone)]
pub struct PageTokens {
    secret: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read or create the page token secret {path}: {source}")]
pub struct PageSecretError {
    path: String,
    source: std::io::Error,
}

impl PageTokens {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
        }
    }

    /// The configured secret, or one generated once under `data_dir`.
    pub fn configured(secret: Option<&str>, data_dir: &Path) -> Result<Self, PageSecretError> {
        if let Some(secret) = secret {
            return Ok(Self::new(secret.as_bytes()));
        }
        let path = data_dir.join("page-token.key");
        let err = |source| PageSecretError {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(&path) {
            Ok(secret) => Ok(Self::new(secret)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = vec![0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                std::fs::create_dir_all(data_dir).map_err(err)?;
                std::fs::write(&path, &secret).map_err(err)?;
                Ok(Self::new(secret))
            }
            Err(e) => Err(err(e)),
        }
    }

    fn mac(&self, query: &str, payload: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(query.as_bytes());
        mac.update(b"\n");
        mac.update(payload);
        mac
    }

    /// A token resuming `query` after `cursor`.
    pub fn encode<T: Serialize>(&self, query: &str, cursor: &T) -> String {
        let payload = serde_json::to_vec(cursor).unwrap_or_default();
        let tag = self.mac(query, &payload).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The cursor in `token`, if this server signed it for `query`.
    pub fn decode<T: DeserializeOwned>(
        &self,
        query: &str,
        token: &str,
    ) -> Result<T, FieldViolation> {
        let invalid = || FieldViolation::new("page_token", "is not a page token from this query");
        let (payload, tag) = token.split_once('.').ok_or_else(invalid)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| invalid())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
        self.mac(query, &payload)
            .verify_slice(&tag)
            .map_err(|_| invalid())?;
        serde_json::from_slice(&payload).map_err(|_| invalid())
    }
}

/// The page size a request asks for: 0 means the default, else 1..=100.
pub fn page_size(requested: i32) -> Result<i32, FieldViolation> {
    match requested {
        0 => Ok(PAGE_SIZE_DEFAULT),
        1..=PAGE_SIZE_MAX => Ok(requested),
        _ => Err(FieldViolation::new(
            "page_size",
            format!("must be between 0 and {PAGE_SIZE_MAX} (0 means {PAGE_SIZE_DEFAULT})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering_and_other_queries() {
        let tokens = PageTokens::new(b"secret".to_vec());
        let token = tokens.encode("deals?states=ACTIVE", &(42_i64, "id-1"));
        let cursor: (i64, String) = tokens.decode("deals?states=ACTIVE", &token).unwrap();
        assert_eq!(cursor, (42, "id-1".to_owned()));

        assert!(
            tokens
                .decode::<(i64, String)>("deals?states=ENDED", &token)
                .is_err()
        );
        let (payload, tag) = token.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"[0,"id-0"]"#);
        assert!(
            tokens
                .decode::<(i64, String)>("deals?states=ACTIVE", &format!("{forged_payload}.{tag}"))
                .is_err()
        );
        assert!(
            tokens
                .decode::<(i64, String)>("deals?states=ACTIVE", payload)
                .is_err()
        );
        assert!(
            tokens
                .decode::<(i64, String)>("deals?states=ACTIVE", "garbage")
                .is_err()
        );
        let other_server = PageTokens::new(b"other".to_vec());
        assert!(
            other_server
                .decode::<(i64, String)>("deals?states=ACTIVE", &token)
                .is_err()
        );
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0).unwrap(), 20);
        assert_eq!(page_size(100).unwrap(), 100);
        assert!(page_size(101).is_err());
        assert!(page_size(-1).is_err());
    }
}
