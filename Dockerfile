# syntax=docker/dockerfile:1
# The origin (`noetl-gateway-origin`, binary `origin`) as a container image for GKE.
#
#   docker build -t REGISTRY/noetl-gateway-origin:VERSION .
#
# Two stages: a builder pinned to the toolchain of rust-toolchain.toml, and a distroless
# runtime (glibc, libgcc, the Debian CA bundle — reqwest's rustls verifier and async-nats
# read the system roots, e.g. for Auth0's JWKS — no shell, no package manager), running as
# the numeric non-root user the Helm chart's securityContext names. tests/tests/deploy.rs
# checks these assumptions (there is no container engine on the build machines), and
# hadolint lints this file.

# ---- builder: the toolchain of rust-toolchain.toml, on the runtime's Debian release ----
FROM rust:1.95.0-bookworm AS builder
# rust-toolchain.toml also asks for clippy, rustfmt and the wasm32 target, which a release
# build of the origin does not need: name the image's toolchain so rustup installs nothing.
ENV RUSTUP_TOOLCHAIN=1.95.0 \
    CARGO_TERM_COLOR=never
WORKDIR /src
# The whole workspace (the .dockerignore keeps build outputs, node_modules and .git out):
# cargo resolves every member's manifest even to build one package.
COPY . .
# Cache mounts keep the registry and the target directory between builds, so a source
# change recompiles the workspace crates, not the dependencies; the binary is copied out
# of the cached target in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p noetl-gateway-origin --bin origin \
    && install -D -m 0755 /src/target/release/origin /out/origin

# ---- runtime: distroless cc (glibc + libgcc_s + CA certificates), Debian 12 ----
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/origin /usr/local/bin/origin
# In a pod the listeners must not be on loopback; the chart sets both addresses too.
# MIMALLOC_ALLOW_THP=0: 4 KiB pages for the origin even on a node whose transparent huge
# pages are `always` (the build's `no_thp` covers `madvise`; docs/OPERATIONS.md).
ENV PUBLIC_ADDR=0.0.0.0:8090 \
    INTERNAL_ADDR=0.0.0.0:8091 \
    LOG_FORMAT=json \
    MIMALLOC_ALLOW_THP=0
# public: auth, GraphQL, SSE, /noetl/* (behind the load balancer);
# internal: callbacks, /metrics, /health, /ready (in-cluster only).
EXPOSE 8090 8091
# distroless's `nonroot` user; the chart's runAsUser is the same number.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/origin"]
