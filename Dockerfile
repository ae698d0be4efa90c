# syntax=docker/dockerfile:1
# One image for every service: the container's command picks the role
# (`flashmesh auth`, `catalog`, `order`, `gateway`, `migrate`, `token`,
# `health`). Dependencies are cached in their own layer by cargo-chef, so a
# source change rebuilds only the workspace crates.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
# make: jemalloc (the binary's allocator) is built from source.
RUN apt-get update && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN cargo install cargo-chef --version 0.1.78 --locked

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin flashmesh
COPY . .
RUN cargo build --release --locked --bin flashmesh

# glibc and libgcc only, no shell: health checks run `flashmesh health`.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/flashmesh /flashmesh
USER 65532:65532
WORKDIR /home/nonroot
# auth, catalog, order; the gateway.
EXPOSE 50051 50052 50053 8080
ENTRYPOINT ["/flashmesh"]
CMD ["up"]
