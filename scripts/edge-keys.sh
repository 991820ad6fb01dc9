#!/usr/bin/env bash
# The edge's assertion key pair (Ed25519): the edge signs x-gateway-assertion with the
# 32-byte seed (Workers secret EDGE_ASSERTION_KEY), the origin verifies with the public key
# (EDGE_ASSERTION_PUBLIC_KEY). Both are base64url without padding.
#
#   scripts/edge-keys.sh [DEV_VARS]   ensure DEV_VARS (default: <repo>/.dev.vars, which
#                                     `wrangler dev` reads as secrets) holds an
#                                     EDGE_ASSERTION_KEY, generating one if absent; print the
#                                     matching public key on stdout (the only stdout line),
#                                     e.g. EDGE_ASSERTION_PUBLIC_KEY=$(scripts/edge-keys.sh)
#   scripts/edge-keys.sh --new        print a fresh pair (EDGE_ASSERTION_KEY=… and
#                                     EDGE_ASSERTION_PUBLIC_KEY=… lines) and touch no file:
#                                     for staging/production (see docs/EDGE.md)
#
# Needs openssl (1.1.1+, Ed25519) or, failing that, python3 with `cryptography`.
# Idempotent: an existing key is kept; the seed is never printed except with --new.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; echo; }
unb64url() {
  local s=${1//-/+}
  s=${s//_//}
  while (( ${#s} % 4 )); do s+="="; done
  printf '%s' "$s" | base64 -d
}

# PKCS#8 DER prefix of an Ed25519 private key; the 32-byte seed follows it.
PKCS8_PREFIX=302e020100300506032b657004220420

have_openssl() { openssl genpkey -algorithm ed25519 -outform DER >/dev/null 2>&1; }

new_seed() {
  if have_openssl; then
    openssl genpkey -algorithm ed25519 -outform DER | tail -c 32 | b64url
  else
    python3 - <<'EOF'
import base64
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization as s
raw = Ed25519PrivateKey.generate().private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())
print(base64.urlsafe_b64encode(raw).decode().rstrip("="))
EOF
  fi
}

public_of() { # seed (base64url) → public key (base64url)
  local seed=$1
  if have_openssl; then
    { printf '%s' "$PKCS8_PREFIX" | xxd -r -p; unb64url "$seed"; } |
      openssl pkey -inform DER -pubout -outform DER | tail -c 32 | b64url
  else
    SEED=$seed python3 - <<'EOF'
import base64, os
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization as s
seed = os.environ["SEED"]
raw = base64.urlsafe_b64decode(seed + "=" * (-len(seed) % 4))
pub = Ed25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
print(base64.urlsafe_b64encode(pub).decode().rstrip("="))
EOF
  fi
}

valid_seed() { # 43 base64url characters that decode to 32 bytes, not all zero
  [[ $1 =~ ^[A-Za-z0-9_-]{43}$ ]] && [[ ! $1 =~ ^A+$ ]] &&
    [ "$(unb64url "$1" | wc -c)" -eq 32 ]
}

if [ "${1:-}" = "--new" ]; then
  seed=$(new_seed)
  echo "EDGE_ASSERTION_KEY=$seed"
  echo "EDGE_ASSERTION_PUBLIC_KEY=$(public_of "$seed")"
  exit 0
fi

DEV_VARS=${1:-$ROOT/.dev.vars}
seed=""
if [ -f "$DEV_VARS" ]; then
  seed=$(sed -n 's/^EDGE_ASSERTION_KEY *= *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$DEV_VARS" | tail -n 1)
fi
if [ -z "$seed" ]; then
  seed=$(new_seed)
  touch "$DEV_VARS"
  chmod 600 "$DEV_VARS"
  # Keep whatever else the file holds; end it with a newline before appending.
  if [ -s "$DEV_VARS" ] && [ -n "$(tail -c 1 "$DEV_VARS")" ]; then echo >>"$DEV_VARS"; fi
  echo "EDGE_ASSERTION_KEY=$seed" >>"$DEV_VARS"
  echo "edge-keys: generated a new EDGE_ASSERTION_KEY in $DEV_VARS" >&2
elif ! valid_seed "$seed"; then
  echo "edge-keys: EDGE_ASSERTION_KEY in $DEV_VARS is not a base64url 32-byte seed; remove the line to regenerate" >&2
  exit 1
fi
public_of "$seed"
