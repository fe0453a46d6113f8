//! The gRPC contract of the order saga system.
//!
//! One module per proto package, each holding the messages, the client and the
//! server of its service, generated at build time from `proto/`:
//!
//! - [`orders::v1`]: the public `OrderService`, served by the orchestrator.
//! - [`stock::v1`], [`shipping::v1`], [`payment::v1`]: the domain services the saga drives.
//! - [`client`]: [`client::OrderClient`], a thin typed client of `OrderService`
//!   that sends the API key with every call.
//! - [`codec`]: the protobuf codec they all use (prost's, with small buffers).
//!
//! [`FILE_DESCRIPTOR_SET`] is what the servers publish through gRPC reflection.

pub mod orders {
    pub mod v1 {
        tonic::include_proto!("orders.v1");
        include!(concat!(env!("OUT_DIR"), "/orders.v1.serde.rs"));
    }
}

pub mod stock {
    pub mod v1 {
        tonic::include_proto!("stock.v1");
        include!(concat!(env!("OUT_DIR"), "/stock.v1.serde.rs"));
    }
}

pub mod shipping {
    pub mod v1 {
        tonic::include_proto!("shipping.v1");
        include!(concat!(env!("OUT_DIR"), "/shipping.v1.serde.rs"));
    }
}

pub mod payment {
    pub mod v1 {
        tonic::include_proto!("payment.v1");
        include!(concat!(env!("OUT_DIR"), "/payment.v1.serde.rs"));
    }
}

/// The messages' timestamp type: prost's, with the proto3 JSON mapping.
pub use pbjson_types::Timestamp;

pub mod batch;
pub mod client;
pub mod codec;
pub mod errors;

/// The encoded descriptors of every proto package, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ordersaga_descriptor");
