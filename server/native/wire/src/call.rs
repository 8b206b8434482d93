//! What crosses between the native front end and Python: `Item`s going in (one call per burst,
//! `Hub::take`), `Answer`s coming back (one call per loop turn, `Hub::deliver`).

use std::net::SocketAddr;

use bytes::Bytes;

use crate::tensor::Dtype;

/// Which front end received an inference request (the access log and traces name it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    GrpcStream,
    Http,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcStream => "grpc-stream",
            Protocol::Http => "http",
        }
    }
}

/// A request parameter's value (InferParameter's choices; JSON scalars over HTTP).
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(String),
}

/// One input tensor, checked against its model: `data` is a slice of the received bytes
/// (or, for typed gRPC contents and JSON, the values converted once to the wire layout).
#[derive(Clone, Debug)]
pub struct InTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

/// An inference request the native front end parsed and checked.
#[derive(Debug)]
pub struct InferCall {
    pub slot: u64,
    pub protocol: Protocol,
    pub model: String,
    pub version: String,
    pub id: String,
    /// ModelSpec::token of the spec the request was checked against.
    pub token: u64,
    pub rows: i64,
    pub inputs: Vec<InTensor>,
    /// Requested output names, in the order asked (empty: every output).
    pub outputs: Vec<String>,
    pub parameters: Vec<(String, Param)>,
    /// Monotonic nanoseconds (CLOCK_MONOTONIC, as Python's time.monotonic_ns).
    pub received_ns: u64,
    /// The client's deadline (gRPC timeout), monotonic ns.
    pub deadline_ns: Option<u64>,
    pub authorization: Option<String>,
    pub traceparent: Option<String>,
    /// The value of the header the model's roll-out splits callers by, when it has one.
    pub split_key: Option<String>,
}

/// An HTTP request answered by the Python handlers (the ASGI app): everything but the infer
/// requests the native path serves itself.
#[derive(Debug)]
pub struct HttpForward {
    pub slot: u64,
    pub method: String,
    /// The request target's path, still percent-encoded, and its query string.
    pub raw_path: Bytes,
    pub query: Bytes,
    /// Lower-case names, in arrival order.
    pub headers: Vec<(Bytes, Bytes)>,
    pub body: Bytes,
    pub client: Option<SocketAddr>,
    pub server: SocketAddr,
    pub tls: bool,
}

/// A gRPC call (or one message of a ModelStreamInfer stream) answered by the Python handlers.
#[derive(Debug)]
pub struct GrpcForward {
    pub slot: u64,
    /// The method name, e.g. "ModelConfig".
    pub method: String,
    /// ASCII metadata (lower-case keys); binary (-bin) entries are left out.
    pub metadata: Vec<(String, String)>,
    pub message: Bytes,
    pub received_ns: u64,
    pub deadline_ns: Option<u64>,
}

/// What goes into Python.
#[derive(Debug)]
pub enum Item {
    Infer(InferCall),
    Http(HttpForward),
    Grpc(GrpcForward),
    /// The client went away (connection closed, call cancelled) before its answer.
    Cancel(u64),
    /// A line for the server log (the native side never writes logs itself: no GIL here).
    Log(LogLevel, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

/// One output of a served request.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    /// The wire bytes (BYTES: length-prefixed elements).
    pub data: Bytes,
}

/// The refusal or failure of a request, as convoy/errors.py's table words it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// gRPC status code (tonic::Code's numbers).
    pub grpc_code: i32,
    pub http_status: u16,
    pub message: String,
    /// Overloaded: how long the client should wait (gRPC pushback, HTTP Retry-After).
    pub retry_after_ms: Option<u64>,
    /// On a ModelStreamInfer stream: the whole call ends with this status (an undecodable
    /// message; Triton's `triton_grpc_error` mode), instead of one error response.
    pub fatal: bool,
}

/// What comes back out of Python for a slot.
#[derive(Debug)]
pub enum Answer {
    /// An inference request's outputs.
    Outputs {
        version: String,
        outputs: Vec<OutTensor>,
        parameters: Vec<(String, Param)>,
    },
    Failed(Failure),
    /// A forwarded gRPC call's serialized response (for a stream slot: one
    /// ModelStreamInferResponse; more may follow until `Finished`).
    Message(Bytes),
    /// A stream slot sends nothing more.
    Finished,
    /// A forwarded HTTP request's response head, with its body when `more` is false, or the
    /// first part of it.
    HttpHead {
        status: u16,
        headers: Vec<(Bytes, Bytes)>,
        body: Bytes,
        more: bool,
    },
    /// More of a forwarded HTTP response's body.
    HttpBody { chunk: Bytes, more: bool },
}

impl Answer {
    /// Whether no answer follows this one for its slot.
    pub fn is_last(&self) -> bool {
        match self {
            Answer::Outputs { .. } | Answer::Failed(_) | Answer::Finished => true,
            Answer::Message(_) => false,
            Answer::HttpHead { more, .. } | Answer::HttpBody { more, .. } => !more,
        }
    }
}
