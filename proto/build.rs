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
    fs::write(
        out_dir.join("ordersaga_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
