//! The service binaries built with this test package (see tests/Cargo.toml).

pub const STOCK: &str = env!("CARGO_BIN_EXE_e2e-stock-svc");
pub const SHIPPING: &str = env!("CARGO_BIN_EXE_e2e-shipping-svc");
pub const PAYMENT: &str = env!("CARGO_BIN_EXE_e2e-payment-svc");
pub const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_e2e-orchestrator");
pub const ORDERCTL: &str = env!("CARGO_BIN_EXE_e2e-orderctl");
