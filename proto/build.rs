//! Generates the Rust types, clients and servers from the `.proto` files.
//!
//! `protox` compiles the protos in pure Rust, so the build needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "orders/v1/orders.proto",
    "stock/v1/stock.proto",
    "shipping/v1/shipping.proto",
    "payment/v1/payment.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;

    // `file_descriptor_set_path()` is ignored by `compile_fds`, so the set that
    // server reflection serves is written out by hand.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = fds.encode_to_vec();
    fs::write(out_dir.join("ordersaga_descriptor.bin"), &descriptors)?;

    // serde for every message and enum, in the proto3 JSON mapping (what
    // grpcurl prints): `<package>.serde.rs` beside the types.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .out_dir(&out_dir)
        .build(&[".orders.v1", ".stock.v1", ".shipping.v1", ".payment.v1"])?;

    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        // Timestamps with their JSON mapping (RFC 3339 strings).
        .extern_path(".google.protobuf.Timestamp", "::pbjson_types::Timestamp")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
