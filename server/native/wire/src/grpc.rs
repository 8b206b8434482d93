//! The gRPC front end: tonic's framing, compression and status handling over hyper's HTTP/2,
//! with Convoy's own routing. ModelInfer and each ModelStreamInfer message take the native
//! path when the model table vouches for them; every other call (and every request the table
//! cannot vouch for) is forwarded, message bytes and metadata, to the Python handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::call::{Answer, Failure, GrpcForward, Item, LogLevel, Param, Protocol};
use crate::errors::{self, INTERNAL_MESSAGE};
use crate::grpc_infer::{self, Envelope};
use crate::hub::{monotonic_ns, Hub, SlotGuard};
use crate::proto::inference::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};

const SERVICE: &str = "/inference.GRPCInferenceService/";

/// Methods answered by the Python handlers (everything but the two inference methods).
const FORWARDED: &[&str] = &[
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
];

/// Requests a ModelStreamInfer call may have read but not yet answered (as the Python front
/// end's STREAM_BACKLOG): a client that never reads its answers stops being read.
pub const STREAM_BACKLOG: usize = 256;

/// What goes out: a message the native path built, or bytes Python serialized.
pub enum Outgoing {
    Infer(Box<ModelInferResponse>),
    Stream(Box<ModelStreamInferResponse>),
    Raw(Bytes),
}

/// Messages in as bytes (decoded by the handler, so that what the native path cannot serve
/// is forwarded as it came), out as `Outgoing`.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawDecoder;
pub struct OutgoingEncoder;

impl Codec for RawCodec {
    type Encode = Outgoing;
    type Decode = Bytes;
    type Encoder = OutgoingEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // A slice of tonic's receive buffer, not a copy.
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Infer(message) => message.encode(dst).map_err(|e| Status::internal(e.to_string())),
            Outgoing::Stream(message) => message.encode(dst).map_err(|e| Status::internal(e.to_string())),
            Outgoing::Raw(bytes) => {
                dst.put(bytes);
                Ok(())
            }
        }
    }
}

/// The gRPC front end's shared state.
pub struct GrpcFront {
    pub hub: Arc<Hub>,
    pub max_message_bytes: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl GrpcFront {
    fn grpc(&self) -> tonic::server::Grpc<RawCodec> {
        tonic::server::Grpc::new(RawCodec)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Deflate)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// Serve one HTTP/2 request (one call).
    pub async fn serve<B>(self: Arc<Self>, request: http::Request<B>) -> Result<http::Response<tonic::body::Body>, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    {
        let method = request.uri().path().strip_prefix(SERVICE).unwrap_or("").to_owned();
        let mut grpc = self.grpc();
        let response = match method.as_str() {
            "ModelInfer" => grpc.unary(Unary { front: self, method: None }, request).await,
            "ModelStreamInfer" => grpc.streaming(StreamCall { front: self }, request).await,
            name if FORWARDED.contains(&name) => {
                let method = FORWARDED.iter().find(|m| **m == name).copied();
                grpc.unary(Unary { front: self, method }, request).await
            }
            _ => Status::unimplemented("Method not found!").into_http(),
        };
        Ok(too_large_as_resource_exhausted(response))
    }
}

/// tonic refuses an oversized message OUT_OF_RANGE; gRPC's own servers (and the Python front
/// end) say RESOURCE_EXHAUSTED.
fn too_large_as_resource_exhausted(response: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    match response.extensions().get::<Status>() {
        Some(status) if is_too_large(status) => resource_exhausted(status).into_http(),
        _ => response,
    }
}

fn is_too_large(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains("message length too large")
}

fn resource_exhausted(status: &Status) -> Status {
    Status::resource_exhausted(format!("Received message larger than max: {}", status.message()))
}

/// The deadline a `grpc-timeout` header gives, in monotonic ns (gRPC's wire format: at most
/// 8 digits and a unit).
pub fn deadline(metadata: &MetadataMap, received_ns: u64) -> Option<u64> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    let nanos = match unit {
        "H" => amount.checked_mul(3_600_000_000_000)?,
        "M" => amount.checked_mul(60_000_000_000)?,
        "S" => amount.checked_mul(1_000_000_000)?,
        "m" => amount.checked_mul(1_000_000)?,
        "u" => amount.checked_mul(1_000)?,
        "n" => amount,
        _ => return None,
    };
    received_ns.checked_add(nanos)
}

fn text(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Every ASCII metadata entry, for the Python handlers (they read keys, traces, routing).
fn ascii_metadata(metadata: &MetadataMap) -> Vec<(String, String)> {
    metadata
        .iter()
        .filter_map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) => value.to_str().ok().map(|v| (key.as_str().to_owned(), v.to_owned())),
            KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}

/// A failure as a gRPC status, with gRFC A6's pushback for a retrying client.
pub fn status_of(failure: Failure) -> Status {
    let code = Code::from_i32(failure.grpc_code);
    match failure.retry_after_ms {
        Some(wait) => {
            let mut trailers = MetadataMap::new();
            if let Ok(value) = MetadataValue::try_from(wait.max(1).to_string()) {
                trailers.insert("grpc-retry-pushback-ms", value);
            }
            Status::with_metadata(code, failure.message, trailers)
        }
        None => Status::new(code, failure.message),
    }
}

/// ModelInfer (method None) or a forwarded unary method.
#[derive(Clone)]
struct Unary {
    front: Arc<GrpcFront>,
    method: Option<&'static str>,
}

impl tower_service::Service<Request<Bytes>> for Unary {
    type Response = Response<Outgoing>;
    type Error = Status;
    type Future = BoxFuture<Result<Response<Outgoing>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let front = self.front.clone();
        let method = self.method;
        Box::pin(errors::guard_async(front.hub.clone(), async move { unary(front, method, request).await }, |_| {
            Err(Status::internal(INTERNAL_MESSAGE))
        }))
    }
}

async fn unary(front: Arc<GrpcFront>, method: Option<&'static str>, request: Request<Bytes>) -> Result<Response<Outgoing>, Status> {
    let received_ns = monotonic_ns();
    let (metadata, _, message) = request.into_parts();
    let hub = &front.hub;
    let (slot, receiver) = hub.register_once();
    let mut guard = SlotGuard::new(hub, slot);
    let deadline_ns = deadline(&metadata, received_ns);
    let mut native = None;
    if method.is_none() {
        if let Ok(decoded) = ModelInferRequest::decode(message.clone()) {
            let envelope = Envelope {
                slot,
                protocol: Protocol::Grpc,
                received_ns,
                deadline_ns,
                authorization: text(&metadata, "authorization"),
                traceparent: text(&metadata, "traceparent"),
                metadata: Some(&metadata),
            };
            native = grpc_infer::decode(&hub.models(), decoded, envelope);
        }
    }
    let answering = match native {
        Some(call) => {
            let names = (call.model.clone(), call.id.clone());
            hub.submit(Item::Infer(call));
            Some(names)
        }
        None => {
            hub.submit(Item::Grpc(GrpcForward {
                slot,
                method: method.unwrap_or("ModelInfer").to_owned(),
                metadata: ascii_metadata(&metadata),
                message,
                received_ns,
                deadline_ns,
            }));
            None
        }
    };
    let answer = receiver.await;
    guard.disarm();
    match answer {
        Ok(Answer::Outputs { version, outputs, parameters }) => {
            let (model, id) = answering.unwrap_or_default();
            let response = grpc_infer::encode_response(model, id, version, outputs, &parameters);
            Ok(Response::new(Outgoing::Infer(Box::new(response))))
        }
        Ok(Answer::Message(bytes)) => Ok(Response::new(Outgoing::Raw(bytes))),
        Ok(Answer::Failed(failure)) => Err(status_of(failure)),
        Ok(other) => {
            hub.log(LogLevel::Error, format!("gRPC call answered with {other:?}"));
            Err(Status::internal(INTERNAL_MESSAGE))
        }
        // The answering side went away: the server is stopping.
        Err(_) => Err(Status::unavailable("server is shutting down")),
    }
}

/// ModelStreamInfer.
#[derive(Clone)]
struct StreamCall {
    front: Arc<GrpcFront>,
}

/// A stream message in progress: what its error response names, and its backlog place.
struct InFlight {
    model: String,
    version: String,
    id: String,
    _permit: OwnedSemaphorePermit,
}

type InFlightMap = Arc<Mutex<HashMap<u64, InFlight>>>;

impl tower_service::Service<Request<Streaming<Bytes>>> for StreamCall {
    type Response = Response<ResponseStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Response<ResponseStream>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let front = self.front.clone();
        Box::pin(async move {
            let received_ns = monotonic_ns();
            let (metadata, _, inbound) = request.into_parts();
            // Triton's header: the first error ends the stream with its status.
            let grpc_errors = text(&metadata, GRPC_ERROR_HEADER).as_deref() == Some("true");
            let (sender, receiver) = mpsc::unbounded_channel();
            let in_flight: InFlightMap = Arc::default();
            let reader = tokio::spawn(read_stream(front.clone(), metadata, received_ns, inbound, sender, in_flight.clone()));
            Ok(Response::new(ResponseStream {
                hub: front.hub.clone(),
                receiver,
                in_flight,
                reader,
                reader_done: false,
                grpc_errors,
            }))
        })
    }
}

/// The request header of Triton's that makes a stream's first error end it with its status.
const GRPC_ERROR_HEADER: &str = "triton_grpc_error";
/// The response parameter every ModelStreamInferResponse carries: whether it is its request's
/// last (always, for a model that is not decoupled).
const FINAL_FLAG: &str = "triton_final_response";

/// Slot 0 on a stream's channel: the reader's own news (the client half-closed, or its
/// messages could not be read).
const READER: u64 = 0;

async fn read_stream(
    front: Arc<GrpcFront>,
    metadata: MetadataMap,
    received_ns: u64,
    mut inbound: Streaming<Bytes>,
    sender: mpsc::UnboundedSender<(u64, Answer)>,
    in_flight: InFlightMap,
) {
    let hub = front.hub.clone();
    let backlog = Arc::new(Semaphore::new(STREAM_BACKLOG));
    let deadline_ns = deadline(&metadata, received_ns);
    let authorization = text(&metadata, "authorization");
    let traceparent = text(&metadata, "traceparent");
    let forwarded_metadata = ascii_metadata(&metadata);
    loop {
        let Ok(permit) = backlog.clone().acquire_owned().await else { return };
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => {
                let _ = sender.send((READER, Answer::Finished));
                return;
            }
            Err(status) => {
                let status = if is_too_large(&status) { resource_exhausted(&status) } else { status };
                let failure = Failure {
                    grpc_code: status.code() as i32,
                    http_status: 500,
                    message: status.message().to_owned(),
                    retry_after_ms: None,
                    fatal: true,
                };
                let _ = sender.send((READER, Answer::Failed(failure)));
                return;
            }
        };
        let slot = hub.register_many(&sender);
        let arrived = monotonic_ns();
        let decoded = ModelInferRequest::decode(message.clone()).ok();
        let names = decoded
            .as_ref()
            .map(|m| (m.model_name.clone(), m.model_version.clone(), m.id.clone()))
            .unwrap_or_default();
        let native = decoded.and_then(|decoded| {
            let envelope = Envelope {
                slot,
                protocol: Protocol::GrpcStream,
                received_ns: arrived,
                deadline_ns,
                authorization: authorization.clone(),
                traceparent: traceparent.clone(),
                metadata: Some(&metadata),
            };
            grpc_infer::decode(&hub.models(), decoded, envelope)
        });
        in_flight.lock().insert(
            slot,
            InFlight { model: names.0, version: names.1, id: names.2, _permit: permit },
        );
        match native {
            Some(call) => hub.submit(Item::Infer(call)),
            None => hub.submit(Item::Grpc(GrpcForward {
                slot,
                method: "ModelStreamInfer".to_owned(),
                metadata: forwarded_metadata.clone(),
                message,
                received_ns: arrived,
                deadline_ns,
            })),
        }
    }
}

/// The responses of one ModelStreamInfer call, in the order they complete.
pub struct ResponseStream {
    hub: Arc<Hub>,
    receiver: mpsc::UnboundedReceiver<(u64, Answer)>,
    in_flight: InFlightMap,
    reader: tokio::task::JoinHandle<()>,
    reader_done: bool,
    /// `triton_grpc_error: true`: an error ends the call with its status.
    grpc_errors: bool,
}

impl ResponseStream {
    fn error_response(flight: &InFlight, message: String) -> Outgoing {
        Outgoing::Stream(Box::new(ModelStreamInferResponse {
            error_message: message,
            infer_response: Some(ModelInferResponse {
                model_name: flight.model.clone(),
                model_version: flight.version.clone(),
                id: flight.id.clone(),
                ..Default::default()
            }),
        }))
    }
}

impl futures_core::Stream for ResponseStream {
    type Item = Result<Outgoing, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.reader_done && self.in_flight.lock().is_empty() {
                return Poll::Ready(None);
            }
            let Some((slot, answer)) = std::task::ready!(self.receiver.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if slot == READER {
                self.reader_done = true;
                if let Answer::Failed(failure) = answer {
                    return Poll::Ready(Some(Err(status_of(failure))));
                }
                continue;
            }
            let outgoing = match answer {
                Answer::Outputs { version, outputs, parameters } => {
                    let Some(flight) = self.in_flight.lock().remove(&slot) else { continue };
                    let mut response = grpc_infer::encode_response(flight.model, flight.id, version, outputs, &parameters);
                    response.parameters.insert(FINAL_FLAG.to_owned(), grpc_infer::to_infer_parameter(&Param::Bool(true)));
                    Outgoing::Stream(Box::new(ModelStreamInferResponse { error_message: String::new(), infer_response: Some(response) }))
                }
                Answer::Failed(failure) => {
                    let Some(flight) = self.in_flight.lock().remove(&slot) else { continue };
                    if failure.fatal || self.grpc_errors {
                        return Poll::Ready(Some(Err(status_of(failure))));
                    }
                    Self::error_response(&flight, failure.message)
                }
                Answer::Message(bytes) => Outgoing::Raw(bytes),
                Answer::Finished => {
                    self.in_flight.lock().remove(&slot);
                    continue;
                }
                _ => continue,
            };
            return Poll::Ready(Some(Ok(outgoing)));
        }
    }
}

impl Drop for ResponseStream {
    /// The call ended (finished, or the client went away): stop reading, and cancel every
    /// request of it still in progress.
    fn drop(&mut self) {
        self.reader.abort();
        let slots: Vec<u64> = self.in_flight.lock().drain().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.hub.abandon(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_wire_format_says() {
        let mut metadata = MetadataMap::new();
        let at = |value: &str, metadata: &mut MetadataMap| {
            metadata.insert("grpc-timeout", value.parse().unwrap());
            deadline(metadata, 1_000)
        };
        assert_eq!(at("5S", &mut metadata), Some(5_000_001_000));
        assert_eq!(at("250m", &mut metadata), Some(250_001_000));
        assert_eq!(at("7n", &mut metadata), Some(1_007));
        assert_eq!(at("2H", &mut metadata), Some(7_200_000_001_000));
        assert_eq!(at("123456789S", &mut metadata), None);
        assert_eq!(at("5x", &mut metadata), None);
        assert_eq!(at("S", &mut metadata), None);
    }
}
