//! The chaos runner: the whole system as real processes, on PostgreSQL or on
//! SQLite, loaded with orders while faults strike on a seeded schedule, then
//! audited from every service's own store and from the events.
//!
//! - [`schedule`]: the faults of a run, drawn from its seed.
//! - [`system`]: the four service processes, their stores, and the proxies
//!   on the orchestrator's links; [`processes`], [`postgres`] and [`proxy`]
//!   are its parts.
//! - [`world`]: the stock and the accounts a run starts from.
//! - [`load`]: clients that retry each order with its `request_id` until it
//!   is terminal.
//! - [`events`]: a consumer of the order events.
//! - [`audit`]: what must hold afterwards; [`plant`] breaks it on purpose.
//! - [`run`]: one run, start to verdict; [`report`]: what it prints.

pub mod audit;
pub mod events;
pub mod load;
pub mod plant;
pub mod postgres;
pub mod processes;
pub mod proxy;
pub mod report;
pub mod run;
pub mod schedule;
pub mod system;
pub mod world;

pub use plant::Plant;
pub use processes::Binaries;
pub use report::Report;
pub use run::{RunConfig, run};
pub use schedule::{Profile, Schedule};
pub use system::StoreKind;
