# failover-proxy container image: run it as a sidecar sharing the client's
# network namespace (same Kubernetes pod, or docker run --network
# container:<client>), so the client reaches it on 127.0.0.1.
#
#   docker build -t failover-proxy .
#
# Configure with a file mounted at /etc/failover-proxy/failover-proxy.toml,
# or by environment alone (FAILOVER_PROXY_ROUTE, FAILOVER_PROXY_RESOLVER__..., see README).

# Build stage: the toolchain of rust-version in Cargo.toml.
FROM rust:1.88-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --locked --release \
    && rm -rf src
COPY src ./src
# Newer mtimes than the placeholder build, so cargo rebuilds the crate.
RUN touch src/main.rs src/lib.rs && cargo build --locked --release

# Runtime stage: Debian slim (glibc, as the build) and nothing else.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin failover-proxy
COPY --from=build /src/target/release/failover-proxy /usr/local/bin/failover-proxy
COPY config/failover-proxy.toml /etc/failover-proxy/failover-proxy.toml
USER 10001:10001
# 41000: the example route; 9464: the admin endpoint (metrics, health).
EXPOSE 41000 9464
# SIGTERM: stop accepting, drain for shutdown.drain_timeout, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/failover-proxy"]
CMD ["run"]
