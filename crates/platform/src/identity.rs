//! Caller identity: access-token claims, their verification against the auth
//! service's published keys, and the tower layer that hands verified callers
//! to handlers.
//!
//! Identity only ever comes from a signed token: the layer verifies the bearer
//! token in `authorization` metadata and stores a [`Caller`] in the request
//! extensions; no unsigned header is trusted.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use flashmesh_proto::auth::v1::{GetJwksRequest, Jwk, auth_service_client::AuthServiceClient};
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};
use tonic::Code;

use crate::{
    config::Transport,
    error::{DomainError, to_status},
    upstream::{UpstreamChannel, UpstreamSettings, UpstreamUrlError, lazy_channel},
};

/// The only algorithm access tokens may use.
pub const TOKEN_ALGORITHM: Algorithm = Algorithm::EdDSA;

/// What an access token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
    /// Another flashmesh service; its `sub` names it (e.g. `order`).
    Service,
}

/// The claims of a flashmesh access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    pub jti: String,
    pub role: Role,
}

/// A caller whose token has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub role: Role,
    pub token_id: String,
}

impl Caller {
    /// The verified caller of `request`, or UNAUTHENTICATED.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<&Caller, tonic::Status> {
        request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| to_status(&TokenError::Missing))
    }
}

/// What the verifier checks besides the signature.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// How long fetched keys are trusted before they are fetched again.
    pub keys_ttl: Duration,
    /// At most one fetch per interval for tokens naming an unknown `kid`, so
    /// forged kids cannot turn the verifier into a load on the auth service.
    pub min_refresh_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("this call needs an access token: send `authorization: Bearer <token>`")]
    Missing,
    #[error("the authorization metadata must be `Bearer <token>`")]
    MalformedHeader,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is invalid")]
    Invalid,
    #[error("the access token is signed with an unknown key")]
    UnknownKey,
    #[error("the token signing keys cannot be fetched")]
    KeysUnavailable(#[source] BoxError),
}

impl DomainError for TokenError {
    fn code(&self) -> Code {
        match self {
            Self::KeysUnavailable(_) => Code::Unavailable,
            _ => Code::Unauthenticated,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "TOKEN_MISSING",
            Self::MalformedHeader | Self::Invalid | Self::UnknownKey => "TOKEN_INVALID",
            Self::Expired => "TOKEN_EXPIRED",
            Self::KeysUnavailable(_) => "JWKS_UNAVAILABLE",
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the public token keys come from.
#[async_trait]
pub trait KeySource: Send + Sync {
    async fn public_keys(&self) -> Result<Vec<Jwk>, BoxError>;
}

/// The auth service's `GetJwks`, over `FLASHMESH_TRANSPORT`.
pub struct AuthServiceKeys {
    client: AuthServiceClient<UpstreamChannel>,
}

impl AuthServiceKeys {
    /// Connects lazily to the auth service at `endpoint` (e.g.
    /// `http://127.0.0.1:50051`).
    pub fn new(endpoint: &str, transport: Transport) -> Result<Self, UpstreamUrlError> {
        let channel = lazy_channel(
            endpoint,
            &UpstreamSettings {
                connect_timeout: Duration::from_secs(2),
                call_timeout: Some(Duration::from_secs(5)),
                refresh: Duration::from_secs(60),
                transport,
            },
        )?;
        Ok(Self {
            client: AuthServiceClient::new(channel),
        })
    }
}

#[async_trait]
impl KeySource for AuthServiceKeys {
    async fn public_keys(&self) -> Result<Vec<Jwk>, BoxError> {
        let response = self.client.clone().get_jwks(GetJwksRequest {}).await?;
        Ok(response.into_inner().keys)
    }
}

struct KeyCache {
    keys: HashMap<String, DecodingKey>,
    fetched_at: Option<Instant>,
}

/// Verifies access tokens against keys from a [`KeySource`], cached.
pub struct TokenVerifier {
    source: Arc<dyn KeySource>,
    policy: TokenPolicy,
    validation: Validation,
    cache: RwLock<KeyCache>,
    refreshing: Mutex<()>,
}

impl TokenVerifier {
    pub fn new(source: Arc<dyn KeySource>, policy: TokenPolicy) -> Self {
        let mut validation = Validation::new(TOKEN_ALGORITHM);
        validation.set_issuer(&[&policy.issuer]);
        validation.set_audience(&[&policy.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
        validation.validate_nbf = true;
        validation.leeway = policy.leeway.as_secs();
        Self {
            source,
            policy,
            validation,
            cache: RwLock::new(KeyCache {
                keys: HashMap::new(),
                fetched_at: None,
            }),
            refreshing: Mutex::new(()),
        }
    }

    /// The caller a token speaks for, if its signature, algorithm, issuer,
    /// audience and lifetime all check out.
    pub async fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        Ok(self.verify_with_expiry(token).await?.0)
    }

    /// As [`Self::verify`], with the token's `exp` (Unix seconds), for
    /// callers that cache verified tokens until they expire.
    pub async fn verify_with_expiry(&self, token: &str) -> Result<(Caller, u64), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.alg != TOKEN_ALGORITHM {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        let key = self.key(&kid).await?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            },
        )?;
        Ok((
            Caller {
                user_id: data.claims.sub,
                role: data.claims.role,
                token_id: data.claims.jti,
            },
            data.claims.exp,
        ))
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        if let Some(key) = self.cached(kid, true).await {
            return Ok(key);
        }
        let _one_fetch_at_a_time = self.refreshing.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(key) = self.cached(kid, true).await {
            return Ok(key);
        }
        let fetched_at = self.cache.read().await.fetched_at;
        let stale = fetched_at.is_none_or(|at| at.elapsed() >= self.policy.keys_ttl);
        let may_refetch =
            fetched_at.is_none_or(|at| at.elapsed() >= self.policy.min_refresh_interval);
        if stale || may_refetch {
            match self.source.public_keys().await {
                Ok(jwks) => self.replace_keys(&jwks).await,
                // Keys already known keep working while the source is down.
                Err(e) => {
                    return self
                        .cached(kid, false)
                        .await
                        .ok_or(TokenError::KeysUnavailable(e));
                }
            }
        }
        self.cached(kid, false).await.ok_or(TokenError::UnknownKey)
    }

    async fn cached(&self, kid: &str, fresh_only: bool) -> Option<DecodingKey> {
        let cache = self.cache.read().await;
        let fresh = cache
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.policy.keys_ttl);
        if fresh_only && !fresh {
            return None;
        }
        cache.keys.get(kid).cloned()
    }

    async fn replace_keys(&self, jwks: &[Jwk]) {
        let keys = jwks
            .iter()
            .filter(|jwk| jwk.kty == "OKP" && jwk.crv == "Ed25519")
            .filter_map(|jwk| {
                let key = DecodingKey::from_ed_components(&jwk.x).ok()?;
                Some((jwk.kid.clone(), key))
            })
            .collect();
        *self.cache.write().await = KeyCache {
            keys,
            fetched_at: Some(Instant::now()),
        };
    }
}

/// Verifies the bearer token of every request that carries one and stores the
/// [`Caller`] for handlers. Requests without a token pass through; handlers
/// that need a caller ask [`Caller::of`]. A token that fails verification is
/// rejected here, before any handler runs.
#[derive(Clone)]
pub struct IdentityLayer {
    verifier: Arc<TokenVerifier>,
}

impl IdentityLayer {
    pub fn new(verifier: Arc<TokenVerifier>) -> Self {
        Self { verifier }
    }
}

impl<S> tower::Layer<S> for IdentityLayer {
    type Service = IdentityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentityService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    verifier: Arc<TokenVerifier>,
}

impl<S, B> tower::Service<http::Request<B>> for IdentityService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is the one that was driven to readiness.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let verified = match bearer_token(request.headers()) {
                Ok(None) => Ok(None),
                Ok(Some(token)) => verifier.verify(token).await.map(Some),
                Err(e) => Err(e),
            };
            match verified {
                Ok(Some(caller)) => {
                    request.extensions_mut().insert(caller);
                }
                Ok(None) => {}
                Err(e) => return Ok(to_status(&e).into_http()),
            }
            inner.call(request).await
        })
    }
}

fn bearer_token(headers: &http::HeaderMap) -> Result<Option<&str>, TokenError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| TokenError::MalformedHeader)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(TokenError::MalformedHeader);
    }
    Ok(Some(token.trim()))
}
