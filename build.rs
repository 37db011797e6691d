//! Generates the gRPC code from proto/ (needs `protoc`: Debian `protobuf-compiler`).
fn main() {
    println!("cargo:rerun-if-changed=proto/etask/v1/etask.proto");
    if let Err(e) =
        tonic_prost_build::configure().compile_protos(&["proto/etask/v1/etask.proto"], &["proto"])
    {
        panic!("cannot compile proto/etask/v1/etask.proto (is protoc installed? apt-get install protobuf-compiler): {e}");
    }
}
