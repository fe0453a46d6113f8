//! End-to-end tests: real services over real sockets, on SQLite and PostgreSQL.
//!
//! One binary, one module per subject. `on_both_stores!` turns each
//! `async fn case(Backend)` into a `case::sqlite` and a `case::postgres` test.

/// Runs each named `async fn(Backend)` once per store.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread")]
                async fn sqlite() {
                    super::$case(ordersaga_tests::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread")]
                async fn postgres() {
                    super::$case(ordersaga_tests::Backend::Postgres).await
                }
            }
        )*
    };
}

mod assertions;
mod audit;
mod auth;
mod batches;
mod bench;
mod bins;
mod cancellation;
mod cancelled_requests;
mod chaos;
mod combined;
mod compose;
mod config;
mod contract;
mod crash_points;
mod durability;
mod edge;
mod events;
mod explorer;
mod faults;
mod fuzz;
mod group_commit;
mod grpcurl;
mod metrics;
mod observability;
mod operator;
mod overload;
mod payment;
mod rapid_reset;
mod recovery;
mod replicas;
mod rich_errors;
mod saga;
mod schema;
mod sdks;
mod shipping;
mod stock;
mod tls;
mod unknown_outcomes;
