//! The gRPC methods of the contract (`proto/`), by their URL path.
//!
//! Only these get their own metric series and a server span. A request to any
//! other path is answered UNIMPLEMENTED by tonic, but it still passes the
//! layers first, before any key check: labelled by its raw path, a stream of
//! random paths from anyone who can open a connection grew every service's
//! memory and its `/metrics` output without bound.

use std::{collections::HashSet, sync::OnceLock};

use prost::Message;

/// The label of every path that is not a method of the contract.
pub const OTHER: &str = "other";

/// Whether `path` (e.g. `/stock.v1.StockService/ReserveStock`) is a method
/// of one of the contract's services.
pub fn is_known(path: &str) -> bool {
    known().contains(path)
}

/// The method as a metric label: `stock.v1.StockService/ReserveStock`, or
/// [`OTHER`].
pub fn label(path: &str) -> &str {
    if is_known(path) {
        path.trim_start_matches('/')
    } else {
        OTHER
    }
}

/// Whether `path` is a batch method of the contract (`.../ReserveStockBatch`):
/// its items get what a call gets (see `crate::batch`).
pub fn is_batch(path: &str) -> bool {
    path.ends_with("Batch") && is_known(path)
}

fn known() -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let set = prost_types::FileDescriptorSet::decode(ordersaga_proto::FILE_DESCRIPTOR_SET)
            .expect("the contract's descriptor set is built with the crate");
        set.file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.service.iter().flat_map(move |service| {
                    let package = package.clone();
                    service.method.iter().map(move |method| {
                        format!("/{package}.{}/{}", service.name(), method.name())
                    })
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_methods_are_known_and_nothing_else() {
        assert!(is_known("/stock.v1.StockService/ReserveStock"));
        assert!(is_known("/orders.v1.OrderService/CreateOrder"));
        assert!(is_known("/payment.v1.PaymentService/Refund"));
        assert!(is_batch("/stock.v1.StockService/ReserveStockBatch"));
        assert!(!is_batch("/stock.v1.StockService/ReserveStock"));
        assert!(!is_batch("/stock.v1.StockService/NopeBatch"));
        assert!(!is_known("/stock.v1.StockService/Nope"));
        assert!(!is_known("/x"));
        assert_eq!(
            label("/orders.v1.OrderService/GetOrder"),
            "orders.v1.OrderService/GetOrder"
        );
        assert_eq!(label("/random/1234"), OTHER);
    }
}
