use clap::Parser;

// jemalloc, not glibc's malloc: less CPU per call under load, the same
// memory (see the workspace's Cargo.toml and docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    payment_svc::run(payment_svc::Settings::parse()).await
}
