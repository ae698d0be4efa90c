//! `flashmesh health TARGET`: a tiny health checker for container runtimes
//! whose image has no shell, curl or grpcurl (the distroless image).
//!
//! `host:port` or `http://host:port` asks `grpc.health.v1.Health/Check`;
//! a URL with a path (`http://host:port/healthz`) is an HTTP GET instead, for
//! the gateway. It needs no configuration.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// What the target answered, and whether that is healthy.
struct Answer {
    healthy: bool,
    /// `SERVING`, `NOT_SERVING`, `HTTP/1.1 200 OK`, …
    said: String,
}

/// What a check found; each outcome has its own exit code.
pub enum Outcome {
    /// SERVING, or an HTTP 2xx.
    Healthy(String),
    /// The target answered, but not healthy.
    Unhealthy(String),
    /// No answer (refused, timed out, not speaking the protocol).
    Unreachable(anyhow::Error),
}

impl Outcome {
    pub fn report(self) -> ExitCode {
        match self {
            Self::Healthy(said) => {
                println!("{said}");
                ExitCode::SUCCESS
            }
            Self::Unhealthy(status) => {
                eprintln!("unhealthy: {status}");
                ExitCode::from(1)
            }
            Self::Unreachable(error) => {
                eprintln!("unreachable: {error:#}");
                ExitCode::from(2)
            }
        }
    }
}

/// Checks `target` once, giving up after `timeout`.
pub async fn check(target: &str, service: &str, timeout: Duration) -> Outcome {
    let checked = tokio::time::timeout(timeout, async {
        match http_path(target) {
            Some((authority, path)) => check_http(authority, path).await,
            None => check_grpc(target, service).await,
        }
    })
    .await;
    match checked {
        Ok(Ok(Answer {
            healthy: true,
            said,
        })) => Outcome::Healthy(said),
        Ok(Ok(Answer { said, .. })) => Outcome::Unhealthy(said),
        Ok(Err(error)) => Outcome::Unreachable(error),
        Err(_) => Outcome::Unreachable(anyhow::anyhow!("no answer within {timeout:?}")),
    }
}

/// `http://authority/path` with a non-empty path, split in two.
fn http_path(target: &str) -> Option<(&str, &str)> {
    let rest = target.strip_prefix("http://")?;
    let slash = rest.find('/')?;
    let (authority, path) = rest.split_at(slash);
    (path.len() > 1).then_some((authority, path))
}

async fn check_grpc(target: &str, service: &str) -> anyhow::Result<Answer> {
    let url = if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("{target:?} is not host:port or a URL"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await;
    match response {
        Ok(answer) => {
            let status = answer.into_inner().status();
            Ok(Answer {
                healthy: status == ServingStatus::Serving,
                said: status.as_str_name().to_owned(),
            })
        }
        // NOT_FOUND (unknown service) is an answer, not an outage.
        Err(status) if status.code() == tonic::Code::NotFound => Ok(Answer {
            healthy: false,
            said: format!("unknown service {service:?}"),
        }),
        Err(status) => Err(status).context("the health check failed"),
    }
}

/// Healthy on a 2xx answer; says its status line.
async fn check_http(authority: &str, path: &str) -> anyhow::Result<Answer> {
    let mut stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need.
    let mut head = Vec::new();
    let mut buf = [0; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buf[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default();
    let Some(code) = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
    else {
        bail!("{authority} did not answer HTTP: {status_line:?}");
    };
    Ok(Answer {
        healthy: code.starts_with('2'),
        said: status_line.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::http_path;

    #[test]
    fn a_path_makes_an_http_check() {
        assert_eq!(
            http_path("http://127.0.0.1:8080/healthz"),
            Some(("127.0.0.1:8080", "/healthz"))
        );
        assert_eq!(http_path("http://auth:50051"), None);
        assert_eq!(http_path("http://auth:50051/"), None);
        assert_eq!(http_path("auth:50051"), None);
    }
}
