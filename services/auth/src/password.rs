//! Argon2id password hashing off the async runtime, bounded to the machine's
//! cores so a login burst queues instead of exhausting memory.

use std::sync::Arc;

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{
        PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString, rand_core::OsRng,
    },
};
use tokio::sync::Semaphore;

use crate::{config::PasswordCost, error::AuthError};

#[derive(Clone)]
pub struct PasswordHasher {
    argon2: Argon2<'static>,
    slots: Arc<Semaphore>,
    /// Verified against when the email is unknown, so a login takes as long
    /// whether or not the account exists.
    decoy_hash: Arc<str>,
}

impl PasswordHasher {
    pub fn new(cost: PasswordCost) -> Result<Self, AuthError> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| AuthError::PasswordHashing(format!("invalid argon2 parameters: {e}")))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let decoy_hash = hash_with(&argon2, "decoy password never matched")?.into();
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Ok(Self {
            argon2,
            slots: Arc::new(Semaphore::new(cores)),
            decoy_hash,
        })
    }

    /// A PHC string (`$argon2id$v=19$m=...`) carrying its own salt and cost.
    pub async fn hash(&self, password: &str) -> Result<String, AuthError> {
        let argon2 = self.argon2.clone();
        let password = password.to_owned();
        self.blocking(move || hash_with(&argon2, &password)).await?
    }

    /// Whether `password` matches `hash`, or the decoy when there is no hash.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, AuthError> {
        let argon2 = self.argon2.clone();
        let password = password.to_owned();
        let known = hash.is_some();
        let hash = hash.map_or_else(|| self.decoy_hash.to_string(), str::to_owned);
        let matched = self
            .blocking(move || {
                let parsed = PasswordHash::new(&hash).map_err(|e| {
                    AuthError::PasswordHashing(format!("stored hash unreadable: {e}"))
                })?;
                Ok::<_, AuthError>(argon2.verify_password(password.as_bytes(), &parsed).is_ok())
            })
            .await??;
        Ok(known && matched)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| AuthError::PasswordHashing(e.to_string()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| AuthError::PasswordHashing(e.to_string()))
    }
}

fn hash_with(argon2: &Argon2<'_>, password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::PasswordHashing(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHasher {
        PasswordHasher::new(PasswordCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_only_their_password() {
        let hasher = cheap();
        let hash = hasher.hash("correct horse").await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        assert!(hasher.verify("correct horse", Some(&hash)).await.unwrap());
        assert!(!hasher.verify("wrong horse", Some(&hash)).await.unwrap());
        assert!(
            !hasher
                .verify("decoy password never matched", None)
                .await
                .unwrap()
        );
    }

    #[test]
    fn invalid_cost_is_refused() {
        let cost = PasswordCost {
            memory_kib: 8,
            iterations: 1,
            parallelism: 4,
        };
        assert!(PasswordHasher::new(cost).is_err());
    }
}
