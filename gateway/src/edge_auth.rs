//! Access tokens checked at the edge, before any upstream call: the
//! platform's verifier (EdDSA only, exp/nbf with leeway, iss, aud, JWKS
//! fetched from the auth service and refetched on an unknown `kid` at a
//! bounded rate) behind a cache of verified tokens, so a client's repeated
//! requests skip the signature check.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flashmesh_platform::identity::{Caller, TokenError, TokenVerifier};
use moka::{Expiry, future::Cache};
use sha2::{Digest, Sha256};

/// A verified token and when it stops being valid.
#[derive(Clone)]
struct Verified {
    caller: Caller,
    expires_at: SystemTime,
}

struct UntilExpiry;

impl Expiry<[u8; 32], Verified> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Verified,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }
}

pub struct EdgeAuth {
    verifier: Arc<TokenVerifier>,
    verified: Cache<[u8; 32], Verified>,
}

impl EdgeAuth {
    pub fn new(verifier: Arc<TokenVerifier>, capacity: u64) -> Self {
        Self {
            verifier,
            verified: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExpiry)
                .build(),
        }
    }

    /// The caller a bearer token proves. The cache is keyed by the token's
    /// SHA-256, so tokens are never held in memory longer than needed.
    pub async fn caller(&self, token: &str) -> Result<Caller, TokenError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.verified.get(&key).await
            && hit.expires_at > SystemTime::now()
        {
            return Ok(hit.caller);
        }
        let (caller, exp) = self.verifier.verify_with_expiry(token).await?;
        self.verified
            .insert(
                key,
                Verified {
                    caller: caller.clone(),
                    expires_at: UNIX_EPOCH + Duration::from_secs(exp),
                },
            )
            .await;
        Ok(caller)
    }
}
