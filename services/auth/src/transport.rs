//! The gRPC face of the auth service: decode, call the use case, encode.

use flashmesh_platform::{
    identity::{Caller, Role},
    time::timestamp_from_millis,
};
use flashmesh_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use crate::{
    domain::User,
    service::{AuthService, IssuedTokens},
};

pub struct AuthGrpc {
    service: AuthService,
}

impl AuthGrpc {
    pub fn new(service: AuthService) -> Self {
        Self { service }
    }
}

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for AuthGrpc {
    async fn sign_up(
        &self,
        request: Request<pb::SignUpRequest>,
    ) -> Result<Response<pb::SignUpResponse>, Status> {
        let request = request.into_inner();
        let (user, tokens) = self
            .service
            .sign_up(&request.email, &request.password, &request.display_name)
            .await?;
        Ok(Response::new(pb::SignUpResponse {
            user: Some(user_message(&user)),
            tokens: Some(token_pair(tokens)),
        }))
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let request = request.into_inner();
        let (user, tokens) = self
            .service
            .login(&request.email, &request.password)
            .await?;
        Ok(Response::new(pb::LoginResponse {
            user: Some(user_message(&user)),
            tokens: Some(token_pair(tokens)),
        }))
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let tokens = self
            .service
            .refresh(&request.into_inner().refresh_token)
            .await?;
        Ok(Response::new(pb::RefreshResponse {
            tokens: Some(token_pair(tokens)),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        self.service
            .logout(&request.into_inner().refresh_token)
            .await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(pb::GetJwksResponse {
            keys: self.service.keys().jwks(),
        }))
    }

    async fn get_me(
        &self,
        request: Request<pb::GetMeRequest>,
    ) -> Result<Response<pb::GetMeResponse>, Status> {
        let user = self.service.me(Caller::of(&request)?).await?;
        Ok(Response::new(pb::GetMeResponse {
            user: Some(user_message(&user)),
        }))
    }
}

fn user_message(user: &User) -> pb::User {
    pb::User {
        id: user.id.clone(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        role: match user.role {
            Role::User => pb::Role::User,
            Role::Admin => pb::Role::Admin,
            Role::Service => pb::Role::Service,
        }
        .into(),
        created_at: Some(timestamp_from_millis(user.created_at)),
    }
}

fn token_pair(tokens: IssuedTokens) -> pb::TokenPair {
    pb::TokenPair {
        access_token: tokens.access_token,
        access_token_expires_at: Some(timestamp_from_millis(tokens.access_expires_at)),
        refresh_token: tokens.refresh_token,
        refresh_token_expires_at: Some(timestamp_from_millis(tokens.refresh_expires_at)),
        token_type: "Bearer".into(),
    }
}
