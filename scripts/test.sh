#!/usr/bin/env bash
# Runs every test against the build `make build` just made (the tests are not rebuilt):
# format check, clippy (host and wasm32, warnings are errors, every public item documented),
# rustdoc without warnings, unit tests of every host crate, the end-to-end suites (real
# nats-server, origin binary, NoETL stand-in, the edge in workerd, headless chromium) and the
# edge crate's host tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (host, wasm32 edge)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p edge-worker --target wasm32-unknown-unknown --locked -- -D warnings

echo "== cargo doc (no broken or private links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

echo "== tests (unit + end-to-end)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci --no-tests=fail
else
  cargo test --workspace --locked
fi
