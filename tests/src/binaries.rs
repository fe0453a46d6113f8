//! Helpers for tests that run services as real processes.

/// A free loopback port, for a process that needs a fixed one: outside the
/// kernel's ephemeral range and never handed out twice (see
/// `chaos::processes::free_port`).
pub fn free_port() -> u16 {
    chaos::processes::free_port().expect("free port")
}
