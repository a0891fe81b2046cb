#!/usr/bin/env bash
# miniflare for the cloudflare tests, without root: `make test` runs this first.
#   bash .ci/miniflare.sh VERSION CACHE_DIR
# Prints the node_modules folder that holds miniflare (nothing if there is none) on stdout,
# and says on stderr what it did or why there is none. It uses .ci/node_modules when
# `make cf-tools` put it there (as CI does: nothing to install), else CACHE_DIR, outside the
# checkout and shared by clones, installing it there from npm on first use.
set -uo pipefail
version=$1
cache=$2
cd "$(dirname "$0")/.."

if [ -d .ci/node_modules/miniflare ]; then
  echo "$PWD/.ci/node_modules"
  exit 0
fi
if [ -d "$cache/node_modules/miniflare" ]; then
  echo "$cache/node_modules"
  exit 0
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "make test: no node or npm on PATH, so no miniflare: the cloudflare tests will be skipped" >&2
  exit 0
fi

echo "make test: installing miniflare $version from npm into $cache (once) for the cloudflare tests" >&2
mkdir -p "$(dirname "$cache")"
tmp=$(mktemp -d "$cache.tmp-XXXXXX")
log=$tmp.log
# Into a folder of its own, then renamed: an install cut short is never taken for one.
if timeout 300 npm install --prefix "$tmp" "miniflare@$version" --no-save --no-audit --no-fund \
     --fetch-retries=1 --fetch-timeout=30000 >"$log" 2>&1 \
   && [ -d "$tmp/node_modules/miniflare" ]; then
  mv -T "$tmp" "$cache" 2>/dev/null || rm -rf "$tmp"  # another make test was quicker: fine
  rm -f "$log"
  echo "$cache/node_modules"
else
  echo "make test: npm could not install miniflare (unreachable? see below); the cloudflare tests will be skipped. npm said:" >&2
  tail -n 3 "$log" | sed 's/^/  /' >&2
  rm -rf "$tmp" "$log"
fi
exit 0
