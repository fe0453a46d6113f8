//! Bounds on `WatchOrder` streams: in total, per connection, and in time.
//!
//! A watch holds a task, a channel and a subscription for as long as the
//! client keeps it open. Unbounded, one client could open streams until the
//! orchestrator ran out of memory, and a forgotten stream would live forever.
//! Past a limit the call is answered RESOURCE_EXHAUSTED at once, naming the
//! limit; a stream that reaches its lifetime ends with UNAVAILABLE, which
//! tells the client to watch again.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Args;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Most WatchOrder streams open at once on this server.
    #[arg(long, env = "MAX_WATCH_STREAMS", value_name = "MAX_WATCH_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watch_streams: u32,

    /// Most WatchOrder streams open at once on one client connection.
    #[arg(long, env = "MAX_WATCH_STREAMS_PER_CONNECTION", value_name = "MAX_WATCH_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_watch_streams_per_connection: u32,

    /// Longest a WatchOrder stream stays open, in seconds; then it ends with
    /// UNAVAILABLE and the client watches again.
    #[arg(long, env = "WATCH_STREAM_MAX_SECS", value_name = "WATCH_STREAM_MAX_SECS", default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub watch_stream_max_secs: u64,
}

impl Default for WatchArgs {
    fn default() -> Self {
        WatchArgs {
            max_watch_streams: 10_000,
            max_watch_streams_per_connection: 100,
            watch_stream_max_secs: 3_600,
        }
    }
}

/// The streams open now.
#[derive(Clone)]
pub struct WatchLimits {
    total: Arc<Semaphore>,
    max_total: u32,
    per_connection: Arc<Mutex<HashMap<SocketAddr, u32>>>,
    max_per_connection: u32,
    pub lifetime: Duration,
}

/// One open stream; its place is given back when dropped.
pub struct WatchSlot {
    _total: OwnedSemaphorePermit,
    connection: Option<SocketAddr>,
    per_connection: Arc<Mutex<HashMap<SocketAddr, u32>>>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let Some(connection) = self.connection else {
            return;
        };
        let mut open = self.per_connection.lock().unwrap();
        if let Some(count) = open.get_mut(&connection) {
            *count -= 1;
            if *count == 0 {
                open.remove(&connection);
            }
        }
    }
}

impl WatchLimits {
    pub fn new(args: &WatchArgs) -> Self {
        WatchLimits {
            total: Arc::new(Semaphore::new(args.max_watch_streams as usize)),
            max_total: args.max_watch_streams,
            per_connection: Arc::default(),
            max_per_connection: args.max_watch_streams_per_connection,
            lifetime: Duration::from_secs(args.watch_stream_max_secs),
        }
    }

    /// A place for one more stream from `connection` (the client's address;
    /// `None` when the transport does not tell), or RESOURCE_EXHAUSTED.
    pub fn open(&self, connection: Option<SocketAddr>) -> Result<WatchSlot, Status> {
        let total = self.total.clone().try_acquire_owned().map_err(|_| {
            too_many_watches(format!(
                "{} WatchOrder streams are open on this server, the limit (MAX_WATCH_STREAMS); watch again later",
                self.max_total
            ))
        })?;
        if let Some(connection) = connection {
            let mut open = self.per_connection.lock().unwrap();
            let count = open.entry(connection).or_default();
            if *count >= self.max_per_connection {
                return Err(too_many_watches(format!(
                    "{} WatchOrder streams are open on this connection, the limit (MAX_WATCH_STREAMS_PER_CONNECTION)",
                    self.max_per_connection
                )));
            }
            *count += 1;
        }
        Ok(WatchSlot {
            _total: total,
            connection,
            per_connection: self.per_connection.clone(),
        })
    }
}

fn too_many_watches(message: String) -> Status {
    svc_kit::error::refusal(
        tonic::Code::ResourceExhausted,
        crate::error::DOMAIN,
        "TOO_MANY_WATCHES",
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_bounded_per_connection_and_in_total_and_given_back() {
        let limits = WatchLimits::new(&WatchArgs {
            max_watch_streams: 3,
            max_watch_streams_per_connection: 2,
            watch_stream_max_secs: 1,
        });
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:1000".parse().unwrap(),
            "10.0.0.3:1000".parse().unwrap(),
        );
        let first = limits.open(Some(a)).unwrap();
        let _second = limits.open(Some(a)).unwrap();
        let refused = limits.open(Some(a)).err().unwrap();
        assert!(refused.message().contains("this connection"), "{refused:?}");
        let _third = limits.open(Some(b)).unwrap();
        let refused = limits.open(Some(c)).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("this server"), "{refused:?}");
        drop(first);
        limits
            .open(Some(c))
            .expect("a closed stream gives its place back");
    }
}
