#!/usr/bin/env bash
# Installs what the build and the tests need, and nothing when it is all there.
# Debian packages through apt-get, Node's ws client through npm (lock file).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  build-essential cmake pkg-config clang llvm libclang-rt-14-dev
  libuv1-dev node-llhttp libssl-dev libjansson-dev libhiredis-dev
  libyaml-dev libjwt-dev uthash-dev libcmocka-dev
  python3 python3-pytest python3-websockets python3-redis python3-jsonschema
  prometheus redis-server
  nodejs npm
)

missing=()
for p in "${DEBS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# Node and npm may come from elsewhere than Debian; only install them when absent.
if command -v node >/dev/null && command -v npm >/dev/null; then
  keep=()
  for p in "${missing[@]}"; do [[ $p == nodejs || $p == npm ]] || keep+=("$p"); done
  missing=("${keep[@]+"${keep[@]}"}")
fi

if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

node_dir=tests/integration/node
if [[ -f $node_dir/package-lock.json && ! -d $node_dir/node_modules/ws ]]; then
  echo "deps: npm ci in $node_dir"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
