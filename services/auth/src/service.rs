//! The auth use cases: the domain rules put to work against storage, the
//! password hasher, the signing keys and the login-failure counter.

use std::{sync::Arc, time::Duration};

use flashmesh_platform::{
    identity::{AccessClaims, Caller, Role, TokenPolicy},
    limits::WindowCounter,
};

use crate::{
    config::AuthConfig,
    domain::{Credentials, NewUser, RefreshRejection, RefreshSecret, User, refresh_token_hash},
    error::AuthError,
    keys::SigningKeys,
    password::PasswordHasher,
    storage::{NewRefreshToken, RefreshTokenStore, UserStore},
};

/// A freshly issued access and refresh token.
pub struct IssuedTokens {
    pub access_token: String,
    /// Unix epoch milliseconds.
    pub access_expires_at: i64,
    pub refresh_token: String,
    pub refresh_expires_at: i64,
}

#[derive(Clone)]
pub struct AuthService {
    users: UserStore,
    refresh_tokens: RefreshTokenStore,
    hasher: PasswordHasher,
    keys: Arc<SigningKeys>,
    login_failures: Arc<dyn WindowCounter>,
    config: Arc<AuthConfig>,
    tokens: Arc<TokenPolicy>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl AuthService {
    pub fn new(
        users: UserStore,
        refresh_tokens: RefreshTokenStore,
        hasher: PasswordHasher,
        keys: Arc<SigningKeys>,
        login_failures: Arc<dyn WindowCounter>,
        config: AuthConfig,
        tokens: TokenPolicy,
    ) -> Self {
        Self {
            users,
            refresh_tokens,
            hasher,
            keys,
            login_failures,
            config: Arc::new(config),
            tokens: Arc::new(tokens),
        }
    }

    pub async fn sign_up(
        &self,
        email: &str,
        password: &str,
        display_name: &str,
    ) -> Result<(User, IssuedTokens), AuthError> {
        let user = self
            .create_user(email, password, display_name, Role::User)
            .await?;
        let tokens = self.start_session(&user).await?;
        Ok((user, tokens))
    }

    /// Creates a user with `role`; `EmailTaken` when the email has an account.
    pub async fn create_user(
        &self,
        email: &str,
        password: &str,
        display_name: &str,
        role: Role,
    ) -> Result<User, AuthError> {
        let new = NewUser::parse(email, password, display_name)?;
        let user = User {
            id: uuid::Uuid::now_v7().to_string(),
            email: new.email.as_str().to_owned(),
            display_name: new.display_name,
            role,
            password_hash: self.hasher.hash(new.password.as_str()).await?,
            created_at: now_ms(),
        };
        if !self.users.insert(&user).await? {
            return Err(AuthError::EmailTaken);
        }
        Ok(user)
    }

    /// Makes an existing user an admin; `false` when no user has that email.
    pub async fn promote_to_admin(&self, email: &str) -> Result<bool, AuthError> {
        let email = crate::domain::Email::parse(email)
            .map_err(|violation| AuthError::InvalidInput(vec![violation]))?;
        match self.users.find_by_email(email.as_str()).await? {
            Some(user) => {
                self.users.set_role(&user.id, Role::Admin, now_ms()).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub async fn login(
        &self,
        email: &str,
        password: &str,
    ) -> Result<(User, IssuedTokens), AuthError> {
        let credentials = Credentials::parse(email, password)?;
        let throttle_key = credentials.email.as_str();
        if self.recent_failures(throttle_key).await >= self.config.login_max_failures {
            return Err(AuthError::TooManyLoginAttempts {
                retry_after: self.config.login_failure_window,
            });
        }
        let user = self.users.find_by_email(throttle_key).await?;
        let matched = self
            .hasher
            .verify(
                credentials.password,
                user.as_ref().map(|u| u.password_hash.as_str()),
            )
            .await?;
        match user {
            Some(user) if matched => {
                self.forget_failures(throttle_key).await;
                let tokens = self.start_session(&user).await?;
                Ok((user, tokens))
            }
            _ => {
                self.count_failure(throttle_key).await;
                Err(AuthError::InvalidCredentials)
            }
        }
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<IssuedTokens, AuthError> {
        let stored = self
            .refresh_tokens
            .find_by_hash(&refresh_token_hash(refresh_token))
            .await?
            .ok_or(AuthError::RefreshTokenInvalid)?;
        let now = now_ms();
        match stored.check_usable(now) {
            Ok(()) => {}
            Err(RefreshRejection::Revoked) => return Err(AuthError::RefreshTokenInvalid),
            Err(RefreshRejection::Expired) => return Err(AuthError::RefreshTokenExpired),
            Err(RefreshRejection::Reused) => {
                return Err(self.reuse_detected(&stored.family_id).await);
            }
        }
        let user = self
            .users
            .find_by_id(&stored.user_id)
            .await?
            .ok_or(AuthError::RefreshTokenInvalid)?;
        let secret = RefreshSecret::generate();
        let (successor, refresh_expires_at) =
            self.new_refresh_token(&user, &stored.family_id, &secret, now);
        if !self
            .refresh_tokens
            .rotate(&stored.id, now, &successor)
            .await?
        {
            return Err(self.reuse_detected(&stored.family_id).await);
        }
        let (access_token, access_expires_at) = self.access_token(&user, now)?;
        Ok(IssuedTokens {
            access_token,
            access_expires_at,
            refresh_token: secret.into_string(),
            refresh_expires_at,
        })
    }

    /// Revokes the session the refresh token belongs to. Unknown tokens are
    /// accepted silently, so logout reveals nothing and can be retried.
    pub async fn logout(&self, refresh_token: &str) -> Result<(), AuthError> {
        if let Some(stored) = self
            .refresh_tokens
            .find_by_hash(&refresh_token_hash(refresh_token))
            .await?
        {
            self.refresh_tokens
                .revoke_family(&stored.family_id, now_ms())
                .await?;
        }
        Ok(())
    }

    pub async fn me(&self, caller: &Caller) -> Result<User, AuthError> {
        self.users
            .find_by_id(&caller.user_id)
            .await?
            .ok_or(AuthError::UserNotFound)
    }

    /// A token naming another service (`sub` = `service`, `role=service`),
    /// for service-to-service calls such as order → catalog ReserveStock.
    pub fn issue_service_token(&self, service: &str, ttl: Duration) -> Result<String, AuthError> {
        Ok(self.sign_token(service, Role::Service, ttl, now_ms())?.0)
    }

    pub fn keys(&self) -> &SigningKeys {
        &self.keys
    }

    async fn reuse_detected(&self, family_id: &str) -> AuthError {
        tracing::warn!(
            family_id,
            "refresh token reuse detected; revoking the session"
        );
        match self.refresh_tokens.revoke_family(family_id, now_ms()).await {
            Ok(()) => AuthError::RefreshTokenReused,
            Err(e) => AuthError::Storage(e),
        }
    }

    async fn start_session(&self, user: &User) -> Result<IssuedTokens, AuthError> {
        let now = now_ms();
        let family_id = uuid::Uuid::now_v7().to_string();
        let secret = RefreshSecret::generate();
        let (token, refresh_expires_at) = self.new_refresh_token(user, &family_id, &secret, now);
        self.refresh_tokens.insert(&token).await?;
        let (access_token, access_expires_at) = self.access_token(user, now)?;
        Ok(IssuedTokens {
            access_token,
            access_expires_at,
            refresh_token: secret.into_string(),
            refresh_expires_at,
        })
    }

    fn new_refresh_token(
        &self,
        user: &User,
        family_id: &str,
        secret: &RefreshSecret,
        now: i64,
    ) -> (NewRefreshToken, i64) {
        let expires_at = now.saturating_add(millis(self.config.refresh_token_ttl));
        let token = NewRefreshToken {
            id: uuid::Uuid::now_v7().to_string(),
            family_id: family_id.to_owned(),
            user_id: user.id.clone(),
            token_hash: refresh_token_hash(secret.as_str()),
            issued_at: now,
            expires_at,
        };
        (token, expires_at)
    }

    fn access_token(&self, user: &User, now: i64) -> Result<(String, i64), AuthError> {
        self.sign_token(&user.id, user.role, self.config.access_token_ttl, now)
    }

    /// A signed access token and its expiry (epoch ms).
    fn sign_token(
        &self,
        subject: &str,
        role: Role,
        ttl: Duration,
        now: i64,
    ) -> Result<(String, i64), AuthError> {
        let issued = u64::try_from(now / 1000).unwrap_or_default();
        let expires_at = now.saturating_add(millis(ttl));
        let claims = AccessClaims {
            iss: self.tokens.issuer.clone(),
            aud: self.tokens.audience.clone(),
            sub: subject.to_owned(),
            iat: issued,
            nbf: issued,
            exp: u64::try_from(expires_at / 1000).unwrap_or_default(),
            jti: uuid::Uuid::now_v7().to_string(),
            role,
        };
        Ok((self.keys.sign(&claims)?, expires_at))
    }

    async fn recent_failures(&self, email: &str) -> u64 {
        // The counter guards against guessing; if its store is down, logins
        // go on rather than every user being locked out.
        self.login_failures.peek(email).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "login failure counter unavailable");
            0
        })
    }

    async fn count_failure(&self, email: &str) {
        if let Err(e) = self
            .login_failures
            .hit(email, self.config.login_failure_window)
            .await
        {
            tracing::warn!(error = %e, "login failure counter unavailable");
        }
    }

    async fn forget_failures(&self, email: &str) {
        if let Err(e) = self.login_failures.reset(email).await {
            tracing::warn!(error = %e, "login failure counter unavailable");
        }
    }
}
