# The four services' images, from one build:
#
#   docker build --target orchestrator -t ordersaga/orchestrator .
#   (targets: orchestrator, stock-svc, shipping-svc, payment-svc)
#
# docker-compose.yml builds each with its target. Needs BuildKit (the default
# builder since Docker 23): the cache mounts keep the cargo registry and the
# compiled dependencies between builds, so a code change recompiles only the
# workspace's own crates. No protoc: the protos are compiled in Rust (protox).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build: every binary at once, so the four images share one compilation ---
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The target dir is a cache mount (not part of any layer), so the binaries are
# copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p orchestrator -p stock-svc -p shipping-svc -p payment-svc -p grpc-health-check \
    && mkdir -p /out \
    && cp target/release/orchestrator target/release/stock-svc target/release/shipping-svc \
        target/release/payment-svc target/release/grpc-health-check /out/

# --- runtime: Debian slim, CA certificates, an unprivileged user, no toolchain ---
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# Versions are pinned by the Debian release of the base image; pinning the
# package too would break the build at each point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ordersaga \
    && useradd --system --uid 10001 --gid ordersaga --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin ordersaga \
    && install -d -o ordersaga -g ordersaga /app /app/data
# The health check of every container: grpc.health.v1 on the service's PORT.
COPY --from=build /out/grpc-health-check /usr/local/bin/grpc-health-check
WORKDIR /app
USER 10001:10001
# Every setting is an env variable (README.md, Settings; APPLICATION_API_KEY is
# required). Logs go to stdout; SIGTERM drains in-flight calls, then exits.

FROM runtime AS payment-svc
COPY --from=build /out/payment-svc /usr/local/bin/payment-svc
EXPOSE 50054 9094
ENTRYPOINT ["/usr/local/bin/payment-svc"]

FROM runtime AS shipping-svc
COPY --from=build /out/shipping-svc /usr/local/bin/shipping-svc
EXPOSE 50053 9093
ENTRYPOINT ["/usr/local/bin/shipping-svc"]

FROM runtime AS stock-svc
COPY --from=build /out/stock-svc /usr/local/bin/stock-svc
EXPOSE 50052 9092
ENTRYPOINT ["/usr/local/bin/stock-svc"]

# Last, so a plain `docker build .` gives the orchestrator.
FROM runtime AS orchestrator
COPY --from=build /out/orchestrator /usr/local/bin/orchestrator
EXPOSE 50051 9091
ENTRYPOINT ["/usr/local/bin/orchestrator"]
