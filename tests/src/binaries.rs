//! Helpers for tests that run services as real processes.

/// A free loopback port (bound then released), for a process that needs a fixed one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
