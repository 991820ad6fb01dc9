#!/usr/bin/env bash
# Runs every test against the build `make build` just made (nothing is rebuilt):
# format check, unit tests of every host crate, the end-to-end suites (real nats-server,
# origin binary, NoETL stand-in) and the edge crate's host tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== tests (unit + end-to-end)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci --no-tests=fail
else
  cargo test --workspace --locked
fi
