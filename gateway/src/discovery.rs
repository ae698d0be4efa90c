//! Contracts learned at start-up from an upstream's gRPC server reflection
//! (v1), so a service written in any language joins the gateway by
//! annotating its proto with `google.api.http` and registering its address
//! (`FLASHMESH_GATEWAY_REFLECTION_URLS`) — no rebuild of the gateway.

use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, Instant},
};

use prost::Message;
use prost_reflect::DescriptorPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Streaming,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};
use tonic_prost::ProstCodec;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("FLASHMESH_GATEWAY_REFLECTION_URLS: {url:?} is not a URL: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach {url} for server reflection within {waited:?}: {reason}")]
    Unreachable {
        url: String,
        waited: Duration,
        reason: String,
    },
    #[error("server reflection at {url} failed: {reason}")]
    Reflection { url: String, reason: String },
    #[error("the descriptors reflected by {url} are invalid: {source}")]
    Descriptors {
        url: String,
        source: prost_reflect::DescriptorError,
    },
}

/// Reflection's streaming method, v1 first; v1alpha has the same messages
/// on the wire and is all that some servers (Python's, say) offer.
const REFLECTION_PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// One reflection stream: a question, then its answer.
struct Reflection {
    url: String,
    questions: mpsc::Sender<ServerReflectionRequest>,
    answers: Streaming<ServerReflectionResponse>,
}

impl Reflection {
    /// Connects and lists the upstream's services, retrying until `wait` has
    /// passed: upstreams may start after the gateway.
    async fn open(url: &str, wait: Duration) -> Result<(Self, Vec<String>), DiscoveryError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| DiscoveryError::Url {
                url: url.to_owned(),
                source,
            })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5));
        let started = Instant::now();
        loop {
            let reason = match endpoint.connect().await {
                Ok(channel) => match Self::list(url, channel).await {
                    Ok(opened) => return Ok(opened),
                    Err(reason) => reason,
                },
                Err(error) => error.to_string(),
            };
            if started.elapsed() >= wait {
                return Err(DiscoveryError::Unreachable {
                    url: url.to_owned(),
                    waited: wait,
                    reason,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Opens the stream on the first reflection version the server has.
    async fn list(url: &str, channel: Channel) -> Result<(Self, Vec<String>), String> {
        let mut last = String::new();
        for path in REFLECTION_PATHS {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.map_err(|e| e.to_string())?;
            let (questions, asked) = mpsc::channel(4);
            // Asked before the stream opens: some servers (Python's) send no
            // response headers until they have a message to answer.
            questions
                .send(question(MessageRequest::ListServices(String::new())))
                .await
                .map_err(|_| "the stream closed".to_owned())?;
            let opened = grpc
                .streaming(
                    tonic::Request::new(ReceiverStream::new(asked)),
                    PathAndQuery::from_static(path),
                    ProstCodec::default(),
                )
                .await;
            let mut reflection = match opened {
                Ok(answers) => Self {
                    url: url.to_owned(),
                    questions,
                    answers: answers.into_inner(),
                },
                Err(status) if status.code() == Code::Unimplemented => {
                    last = status.message().to_owned();
                    continue;
                }
                Err(status) => return Err(status.message().to_owned()),
            };
            match reflection.answer().await {
                Ok(MessageResponse::ListServicesResponse(list)) => {
                    let names = list.service.into_iter().map(|s| s.name).collect();
                    return Ok((reflection, names));
                }
                Ok(_) => return Err("expected a service list".to_owned()),
                Err(Asked::Unimplemented(message)) => last = message,
                Err(Asked::Failed(reason)) => return Err(reason),
            }
        }
        Err(format!("the server offers no server reflection: {last}"))
    }

    fn failed(&self, reason: impl Into<String>) -> DiscoveryError {
        DiscoveryError::Reflection {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    async fn ask(&mut self, message: MessageRequest) -> Result<MessageResponse, Asked> {
        self.questions
            .send(question(message))
            .await
            .map_err(|_| Asked::Failed("the stream closed".to_owned()))?;
        self.answer().await
    }

    async fn answer(&mut self) -> Result<MessageResponse, Asked> {
        let answer = match self.answers.message().await {
            Ok(answer) => answer.and_then(|response| response.message_response),
            Err(status) if status.code() == Code::Unimplemented => {
                return Err(Asked::Unimplemented(status.message().to_owned()));
            }
            Err(status) => return Err(Asked::Failed(status.message().to_owned())),
        };
        match answer {
            Some(MessageResponse::ErrorResponse(error)) => Err(Asked::Failed(error.error_message)),
            Some(answer) => Ok(answer),
            None => Err(Asked::Failed(
                "the stream ended without an answer".to_owned(),
            )),
        }
    }

    /// The files an answer carries, as encoded `FileDescriptorProto`s.
    async fn files(&mut self, question: MessageRequest) -> Result<Vec<Vec<u8>>, DiscoveryError> {
        let answer = self.ask(question).await.map_err(|asked| match asked {
            Asked::Unimplemented(reason) | Asked::Failed(reason) => self.failed(reason),
        })?;
        match answer {
            MessageResponse::FileDescriptorResponse(files) => Ok(files.file_descriptor_proto),
            _ => Err(self.failed("expected file descriptors")),
        }
    }
}

/// Adds to `pool` the contracts of every service the upstream at `url`
/// serves that the pool does not know yet (gRPC's own health and reflection
/// services aside), and returns their full names.
pub async fn discover(
    pool: &mut DescriptorPool,
    url: &str,
    wait: Duration,
) -> Result<Vec<String>, DiscoveryError> {
    let (mut reflection, listed) = Reflection::open(url, wait).await?;
    let services: Vec<String> = listed
        .into_iter()
        .filter(|name| !name.starts_with("grpc.") && pool.get_service_by_name(name).is_none())
        .collect();

    // Each service's file, then every file those import that the pool lacks
    // (some servers send the imports along, others wait to be asked).
    let mut fetched = Fetched::default();
    for service in &services {
        let files = reflection
            .files(MessageRequest::FileContainingSymbol(service.clone()))
            .await?;
        fetched
            .take(pool, files)
            .map_err(|e| reflection.failed(e.to_string()))?;
    }
    while let Some(name) = fetched.wanted.pop_front() {
        if fetched.lacks(pool, &name) {
            let files = reflection
                .files(MessageRequest::FileByFilename(name))
                .await?;
            fetched
                .take(pool, files)
                .map_err(|e| reflection.failed(e.to_string()))?;
        }
    }

    // As one FileDescriptorSet (field 1, repeated), so files may come in any
    // order and their options — the HTTP annotations — are kept.
    let mut set = Vec::new();
    for file in &fetched.files {
        prost::encoding::bytes::encode(1, file, &mut set);
    }
    pool.decode_file_descriptor_set(set.as_slice())
        .map_err(|source| DiscoveryError::Descriptors {
            url: url.to_owned(),
            source,
        })?;
    Ok(services)
}

fn question(message: MessageRequest) -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    }
}

/// Why a question got no answer.
enum Asked {
    /// The server lacks this reflection version.
    Unimplemented(String),
    Failed(String),
}

/// Files fetched so far, and imports still to fetch.
#[derive(Default)]
struct Fetched {
    files: Vec<Vec<u8>>,
    names: HashSet<String>,
    wanted: VecDeque<String>,
}

impl Fetched {
    fn lacks(&self, pool: &DescriptorPool, name: &str) -> bool {
        pool.get_file_by_name(name).is_none() && !self.names.contains(name)
    }

    fn take(
        &mut self,
        pool: &DescriptorPool,
        encoded: Vec<Vec<u8>>,
    ) -> Result<(), prost::DecodeError> {
        for bytes in encoded {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())?;
            if !self.lacks(pool, file.name()) {
                continue;
            }
            self.names.insert(file.name().to_owned());
            self.wanted.extend(file.dependency);
            self.files.push(bytes);
        }
        Ok(())
    }
}
