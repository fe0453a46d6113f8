//! The workspace's built binaries, for tests that run a service as a real process.

use std::path::PathBuf;

/// Path of a binary of this workspace, next to the test executable's folder.
/// `cargo test --workspace` builds every binary before it runs the tests.
pub fn path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing; build it first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// A free loopback port (bound then released), for a process that needs a fixed one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
