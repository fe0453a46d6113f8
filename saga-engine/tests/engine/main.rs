//! The engine on a scripted saga: in-process steps that succeed, refuse, lose
//! their reply, fail or hang on cue, against a real store. Each case runs on
//! SQLite and on PostgreSQL (`TEST_POSTGRES_URL`, a fresh database per test).

/// Runs each named `async fn(Backend)` once per store.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$case(crate::store::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$case(crate::store::Backend::Postgres).await
                }
            }
        )*
    };
}

mod admission;
mod cancel;
mod compensation;
mod events;
mod outbox_index;
mod properties;
mod recovery;
mod replicas;
mod scripted;
mod store;
mod writer;
