//! Generates the Open Inference Protocol messages from the repository's own protos (the same
//! files Python's grpcio-tools compiles), with protoc from the protoc-bin-vendored crate.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let protos = manifest.join("../../../protos");
    let service = protos.join("grpc_service.proto");
    println!("cargo:rerun-if-changed={}", service.display());
    println!("cargo:rerun-if-changed={}", protos.join("model_config.proto").display());
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored has a protoc for this host");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Tensor bytes stay slices of the received buffer (bytes::Bytes): no copy on decode.
    config.bytes(["."]);
    config
        .compile_protos(&[service], &[protos])
        .expect("protoc compiles protos/grpc_service.proto");
}
