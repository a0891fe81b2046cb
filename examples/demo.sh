#!/usr/bin/env bash
# The Quick Start end to end in a throwaway data dir: init, deploy, start, status.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export TY_OPENWORKFLOW_CONFIG="$tmp/config.yaml"
tow() { "$py" "$here/ty_openworkflow.py" "$@"; }

tow init --data-dir "$tmp/data"
tow deploy my-workflow -f - < "$here/examples/hello.js"
run=$(tow start my-workflow -i '{"name": "World"}')
echo "started $run"
sleep 1
tow status "$run"
echo
echo "... the run sleeps durably for 5 s; nothing of it stays alive meanwhile ..."
for _ in $(seq 1 60); do
  state=$(tow status "$run" --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case "$state" in completed|failed|canceled) break ;; esac
  sleep 0.5
done
echo
tow status "$run"
[ "$state" = completed ]
