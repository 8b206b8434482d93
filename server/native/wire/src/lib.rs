//! Convoy's native data plane: the Open Inference Protocol over HTTP/1.1 and gRPC on tokio
//! threads that never hold the GIL. Inference requests are parsed and checked here against the
//! model table Python pushes; everything else is forwarded to the Python handlers through the
//! `Hub`, the one hand-off between these threads and Python's event loop.

pub mod call;
pub mod errors;
pub mod grpc;
pub mod grpc_infer;
pub mod http;
pub mod http_infer;
pub mod hub;
pub mod listen;
pub mod model;
pub mod tensor;
pub mod tls;
pub mod validate;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    pub mod inference {
        include!(concat!(env!("OUT_DIR"), "/inference.rs"));
    }
}
