//! The auth service over real gRPC, on both backends.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::common::{
    Backend, PASSWORD, StackEnv, bad_tokens, claims, login, reason, sign_up, unique_email,
    violated_fields, with_bearer,
};
use flashmesh_auth::{
    config::KeyLocation,
    keys::{SigningKeys, rotate},
};
use flashmesh_platform::config::Transport;
use flashmesh_platform::identity::{
    AuthServiceKeys, BoxError, KeySource, Role, TokenError, TokenPolicy, TokenVerifier,
};
use flashmesh_proto::auth::v1::{
    GetJwksRequest, GetMeRequest, Jwk, LogoutRequest, RefreshRequest, SignUpRequest,
};
use futures::future::join_all;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

on_both_backends!(
    sign_up_login_and_get_me,
    health_reports_serving_then_not_serving_while_draining,
    emails_are_unique_case_insensitively_even_when_racing,
    bad_input_gets_field_violations,
    login_failure_does_not_reveal_whether_the_email_exists,
    repeated_login_failures_are_throttled,
    tampered_forged_and_expired_tokens_are_unauthenticated,
    refresh_rotates_and_reuse_revokes_the_family,
    racing_refreshes_of_one_token_let_exactly_one_win,
    logout_revokes_the_session,
    other_services_verify_tokens_with_jwks_over_grpc,
    tokens_signed_before_a_key_rotation_stay_valid,
    load_is_shed_and_slow_calls_time_out,
    shutdown_drains_calls_in_flight,
);

async fn sign_up_login_and_get_me(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;

    let email = unique_email();
    let signed_up = client
        .sign_up(SignUpRequest {
            email: format!("  {}  ", email.to_uppercase()),
            password: PASSWORD.into(),
            display_name: "Ada Lovelace".into(),
        })
        .await
        .expect("sign up")
        .into_inner();
    let user = signed_up.user.expect("user");
    assert_eq!(user.email, email, "email is normalised");
    assert_eq!(user.display_name, "Ada Lovelace");
    assert_eq!(user.role(), flashmesh_proto::auth::v1::Role::User);
    assert!(uuid::Uuid::parse_str(&user.id).unwrap().get_version_num() == 7);

    let tokens = login(&mut client, &email, PASSWORD).await.expect("login");
    assert_eq!(tokens.token_type, "Bearer");
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &tokens.access_token))
        .await
        .expect("get me")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(me.id, user.id);
    assert_eq!(me.email, email);

    let missing = client.get_me(GetMeRequest {}).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(reason(&missing), "TOKEN_MISSING");
    auth.stop().await;
}

async fn health_reports_serving_then_not_serving_while_draining(backend: Backend) {
    let mut stack = StackEnv::new(backend).await;
    stack.set("FLASHMESH_SHUTDOWN_DRAIN_DELAY", "2s");
    let auth = stack.start_auth().await;
    let mut health = HealthClient::new(auth.channel().await);
    for service in ["", "flashmesh.auth.v1.AuthService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    auth.shutdown.cancel();
    let mut observed = ServingStatus::Serving;
    for _ in 0..50 {
        observed = health
            .check(HealthCheckRequest {
                service: "flashmesh.auth.v1.AuthService".into(),
            })
            .await
            .expect("health answers while draining")
            .into_inner()
            .status();
        if observed == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(observed, ServingStatus::NotServing);
    auth.stop().await;
}

async fn emails_are_unique_case_insensitively_even_when_racing(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let client = auth.auth_client().await;
    let email = unique_email();

    let attempts = (0..200).map(|i| {
        let mut client = client.clone();
        let email = if i % 2 == 0 {
            email.clone()
        } else {
            email.to_uppercase()
        };
        async move {
            client
                .sign_up(SignUpRequest {
                    email,
                    password: PASSWORD.into(),
                    display_name: String::new(),
                })
                .await
        }
    });
    let results = join_all(attempts).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    let taken: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(created, 1, "exactly one account per email");
    assert_eq!(taken.len(), 199);
    for status in taken {
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(reason(status), "EMAIL_TAKEN");
    }
    auth.stop().await;
}

async fn bad_input_gets_field_violations(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;

    let cases = [
        (
            "not-an-email",
            PASSWORD.to_owned(),
            String::new(),
            vec!["email"],
        ),
        (
            &*format!("{}@example.com", "a".repeat(10_000)),
            PASSWORD.into(),
            String::new(),
            vec!["email"],
        ),
        (
            "ok@example.com",
            "short".into(),
            String::new(),
            vec!["password"],
        ),
        (
            "ok@example.com",
            "p".repeat(10_000),
            String::new(),
            vec!["password"],
        ),
        (
            "ok@example.com",
            PASSWORD.into(),
            "n".repeat(101),
            vec!["display_name"],
        ),
        (
            "",
            String::new(),
            "bell\u{7}".into(),
            vec!["email", "password", "display_name"],
        ),
    ];
    for (email, password, display_name, fields) in cases {
        let status = client
            .sign_up(SignUpRequest {
                email: email.into(),
                password,
                display_name,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(reason(&status), "INVALID_ARGUMENT");
        assert_eq!(violated_fields(&status), fields, "{}", status.message());
    }

    let status = login(&mut client, "nope", "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["email", "password"]);
    auth.stop().await;
}

async fn login_failure_does_not_reveal_whether_the_email_exists(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (email, _) = sign_up(&mut client).await;

    let wrong_password = login(&mut client, &email, "not the password")
        .await
        .unwrap_err();
    let unknown_email = login(&mut client, &unique_email(), PASSWORD)
        .await
        .unwrap_err();
    for status in [&wrong_password, &unknown_email] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(status), "INVALID_CREDENTIALS");
    }
    assert_eq!(wrong_password.message(), unknown_email.message());
    auth.stop().await;
}

async fn repeated_login_failures_are_throttled(backend: Backend) {
    let mut stack = StackEnv::new(backend).await;
    stack.set("FLASHMESH_LOGIN_MAX_FAILURES", "3");
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (email, _) = sign_up(&mut client).await;

    for _ in 0..3 {
        let status = login(&mut client, &email, "wrong password")
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    }
    let throttled = login(&mut client, &email, PASSWORD).await.unwrap_err();
    assert_eq!(throttled.code(), Code::ResourceExhausted);
    assert_eq!(reason(&throttled), "TOO_MANY_LOGIN_ATTEMPTS");

    // Another email is unaffected, and in Postgres mode the count lives in
    // Redis, so a second replica sees it too.
    let (other, _) = sign_up(&mut client).await;
    login(&mut client, &other, PASSWORD)
        .await
        .expect("other user logs in");
    if backend == Backend::Postgres {
        let replica = stack.start_auth().await;
        let mut replica_client = replica.auth_client().await;
        let status = login(&mut replica_client, &email, PASSWORD)
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "TOO_MANY_LOGIN_ATTEMPTS");
        replica.stop().await;
    }
    auth.stop().await;
}

async fn tampered_forged_and_expired_tokens_are_unauthenticated(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (_, tokens) = sign_up(&mut client).await;
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &tokens.access_token))
        .await
        .expect("valid token")
        .into_inner()
        .user
        .unwrap();

    for bad in bad_tokens(&stack, &tokens.access_token, &me.id) {
        let status = client
            .get_me(with_bearer(GetMeRequest {}, &bad.token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{}", bad.case);
        assert_eq!(reason(&status), bad.reason, "{}", bad.case);
    }

    let mut request = tonic::Request::new(GetMeRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    let status = client.get_me(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "TOKEN_INVALID");

    // A correctly signed token with the real key still works.
    let real_key = SigningKeys::load(&KeyLocation::Generated {
        dir: stack.key_dir(),
    })
    .unwrap();
    let minted = real_key.sign(&claims(&me.id)).unwrap();
    client
        .get_me(with_bearer(GetMeRequest {}, &minted))
        .await
        .expect("a well-formed token from the real key is accepted");
    auth.stop().await;
}

async fn refresh_rotates_and_reuse_revokes_the_family(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (email, first) = sign_up(&mut client).await;
    // A second login is a separate session that reuse elsewhere leaves alone.
    let other_session = login(&mut client, &email, PASSWORD).await.unwrap();

    let refresher = client.clone();
    let refresh = |token: String| {
        let mut client = refresher.clone();
        async move {
            client
                .refresh(RefreshRequest {
                    refresh_token: token,
                })
                .await
                .map(|r| r.into_inner().tokens.unwrap())
        }
    };

    let second = refresh(first.refresh_token.clone()).await.expect("refresh");
    assert_ne!(second.refresh_token, first.refresh_token, "rotated");
    assert_ne!(second.access_token, first.access_token);
    client
        .get_me(with_bearer(GetMeRequest {}, &second.access_token))
        .await
        .expect("new access token works");

    let reused = refresh(first.refresh_token.clone()).await.unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated);
    assert_eq!(reason(&reused), "REFRESH_TOKEN_REUSED");

    let revoked = refresh(second.refresh_token.clone()).await.unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert_eq!(
        reason(&revoked),
        "REFRESH_TOKEN_INVALID",
        "the whole family is revoked"
    );

    refresh(other_session.refresh_token)
        .await
        .expect("the other session is untouched");

    let unknown = refresh("made-up".into()).await.unwrap_err();
    assert_eq!(reason(&unknown), "REFRESH_TOKEN_INVALID");
    auth.stop().await;
}

async fn racing_refreshes_of_one_token_let_exactly_one_win(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (_, tokens) = sign_up(&mut client).await;

    let racers = (0..1000).map(|_| {
        let mut client = client.clone();
        let token = tokens.refresh_token.clone();
        async move {
            client
                .refresh(RefreshRequest {
                    refresh_token: token,
                })
                .await
        }
    });
    let results = join_all(racers).await;
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "one refresh token is exchanged once");
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            ["REFRESH_TOKEN_REUSED", "REFRESH_TOKEN_INVALID"].contains(&reason(status).as_str()),
            "{status:?}"
        );
    }
    auth.stop().await;
}

async fn logout_revokes_the_session(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (_, tokens) = sign_up(&mut client).await;
    let rotated = client
        .refresh(RefreshRequest {
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();

    client
        .logout(LogoutRequest {
            refresh_token: rotated.refresh_token.clone(),
        })
        .await
        .expect("logout");
    client
        .logout(LogoutRequest {
            refresh_token: rotated.refresh_token.clone(),
        })
        .await
        .expect("logout is idempotent");
    let status = client
        .refresh(RefreshRequest {
            refresh_token: rotated.refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "REFRESH_TOKEN_INVALID");
    auth.stop().await;
}

/// Counts fetches so the test can check the refresh rate bound.
struct CountingKeys {
    inner: AuthServiceKeys,
    fetches: AtomicUsize,
}

#[async_trait::async_trait]
impl KeySource for CountingKeys {
    async fn public_keys(&self) -> Result<Vec<Jwk>, BoxError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.inner.public_keys().await
    }
}

fn policy(min_refresh_interval: Duration) -> TokenPolicy {
    TokenPolicy {
        issuer: "flashmesh-auth".into(),
        audience: "flashmesh".into(),
        leeway: Duration::from_secs(30),
        keys_ttl: Duration::from_secs(300),
        min_refresh_interval,
    }
}

async fn other_services_verify_tokens_with_jwks_over_grpc(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (_, tokens) = sign_up(&mut client).await;

    let source = Arc::new(CountingKeys {
        inner: AuthServiceKeys::new(&auth.endpoint(), Transport::Grpc).unwrap(),
        fetches: AtomicUsize::new(0),
    });
    let verifier = TokenVerifier::new(source.clone(), policy(Duration::from_millis(300)));
    let verifications = (0..500).map(|_| verifier.verify(&tokens.access_token));
    for caller in join_all(verifications).await {
        assert_eq!(caller.expect("verified").role, Role::User);
    }
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1, "keys are cached");

    // Tokens naming unknown kids trigger at most one refetch per interval:
    // none right after a fetch, then one for a whole burst.
    let forged_dir = tempfile::tempdir().unwrap();
    let forged = SigningKeys::load(&KeyLocation::Generated {
        dir: forged_dir.path().to_owned(),
    })
    .unwrap()
    .sign(&claims("intruder"))
    .unwrap();
    for expected_fetches in [1, 2] {
        if expected_fetches == 2 {
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
        let forged_results = join_all((0..200).map(|_| verifier.verify(&forged))).await;
        assert!(
            forged_results
                .iter()
                .all(|r| matches!(r, Err(TokenError::UnknownKey)))
        );
        assert_eq!(source.fetches.load(Ordering::SeqCst), expected_fetches);
    }

    // Known keys keep verifying while the auth service is down.
    auth.stop().await;
    verifier
        .verify(&tokens.access_token)
        .await
        .expect("cached keys outlive the auth service");
}

async fn tokens_signed_before_a_key_rotation_stay_valid(backend: Backend) {
    let stack = StackEnv::new(backend).await;
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (email, before) = sign_up(&mut client).await;
    let old_kid = client
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys[0]
        .kid
        .clone();
    auth.stop().await;

    let new_kid = rotate(&stack.key_dir()).expect("rotate");
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let kids: Vec<_> = client
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(kids, [new_kid.clone(), old_kid]);
    client
        .get_me(with_bearer(GetMeRequest {}, &before.access_token))
        .await
        .expect("a token from the previous key is still accepted");
    let after = login(&mut client, &email, PASSWORD).await.unwrap();
    let header = jsonwebtoken::decode_header(&after.access_token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));
    auth.stop().await;
}

async fn load_is_shed_and_slow_calls_time_out(backend: Backend) {
    let mut stack = StackEnv::new(backend).await;
    // Expensive hashing makes each login hold its slot for a while.
    stack
        .set("FLASHMESH_ARGON2_MEMORY_KIB", "16384")
        .set("FLASHMESH_CONCURRENCY_LIMIT", "2");
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let (email, _) = sign_up(&mut client).await;
    let results = join_all((0..50).map(|_| {
        let mut client = client.clone();
        let email = email.clone();
        async move { login(&mut client, &email, PASSWORD).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let shed = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::Unavailable))
        .count();
    assert_eq!(
        ok + shed,
        50,
        "every call either ran or was shed: {results:?}"
    );
    assert!(ok >= 1 && shed >= 1, "ok={ok} shed={shed}");
    auth.stop().await;

    stack.set("FLASHMESH_REQUEST_TIMEOUT", "1ms");
    let auth = stack.start_auth().await;
    let mut client = auth.auth_client().await;
    let status = login(&mut client, &email, PASSWORD).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    auth.stop().await;
}

async fn shutdown_drains_calls_in_flight(backend: Backend) {
    let mut stack = StackEnv::new(backend).await;
    // Costly hashing queues the sign-ups on the hashing pool, so most of them
    // are still running when the shutdown starts.
    stack
        .set("FLASHMESH_ARGON2_MEMORY_KIB", "65536")
        .set("FLASHMESH_ARGON2_ITERATIONS", "3");
    let auth = stack.start_auth().await;
    let client = auth.auth_client().await;
    let sign_ups = tokio::spawn(join_all((0..8).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .sign_up(SignUpRequest {
                    email: unique_email(),
                    password: PASSWORD.into(),
                    display_name: String::new(),
                })
                .await
        }
    })));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !sign_ups.is_finished(),
        "the sign-ups are in flight when the shutdown starts"
    );
    let stopped = tokio::spawn(auth.stop());
    let results = sign_ups.await.unwrap();
    stopped.await.unwrap();
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "calls in flight at shutdown failed: {failures:?}"
    );
}
