#!/usr/bin/env bash
# Bring up / tear down a private Docker engine for the ty-openworkflow test suite,
# and build an offline runtime image (no registry is reachable here) from the
# host's own `node` and `python3`.
#
# Usage:
#   bash .ci/docker-engine.sh up          # install (if needed) + start dockerd + build image + verify
#   bash .ci/docker-engine.sh down [--purge]   # stop everything it started; --purge also deletes the state dir
#   bash .ci/docker-engine.sh env         # print DOCKER_HOST=... if the engine answers, else exit 1
#   bash .ci/docker-engine.sh verify      # re-run the container smoke checks
#
# `up` and `env` print exactly one line on stdout: DOCKER_HOST=unix://$DIR/docker.sock
# (all progress goes to stderr), so callers can do:
#   eval "export $(bash .ci/docker-engine.sh up)"
#
# Environment:
#   TOWF_DOCKER_DIR     state dir (default /tmp/towf-docker): socket, pidfile, log, data-root, exec-root
#   TOWF_DOCKER_STORAGE storage driver (default overlay2)
#   TOWF_NODE           node binary to put in the image (default: `command -v node`)
#   TOWF_PYTHON         python3 to put in the image (default: `command -v python3`, resolved to sys.executable)
#
# Images produced (all the same image):
#   ty-openworkflow-test/runtime:local, ty-openworkflow-test/node:local, ty-openworkflow-test/python:local
#   /usr/local/bin/node, /usr/local/bin/python3 (stdlib in /usr/local/lib/python3.X), /bin/sh (dash),
#   users root(0) and nobody(65534), empty /tmp (1777).
set -euo pipefail

DIR="${TOWF_DOCKER_DIR:-/tmp/towf-docker}"
DIR="${DIR%/}"
SOCK="$DIR/docker.sock"
HOST_URL="unix://$SOCK"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
STORAGE="${TOWF_DOCKER_STORAGE:-overlay2}"
IMG_RUNTIME="ty-openworkflow-test/runtime:local"
IMG_NODE="ty-openworkflow-test/node:local"
IMG_PYTHON="ty-openworkflow-test/python:local"
START_TIMEOUT=30
ME="docker-engine.sh"

# The caller's docker settings must not redirect our client calls.
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH DOCKER_HOST || true
export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { printf '%s: %s\n' "$ME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

case "$DIR" in
  /*) ;;
  *) die "TOWF_DOCKER_DIR must be an absolute path (got '$DIR')" ;;
esac
[ "$DIR" != "/" ] || die "TOWF_DOCKER_DIR must not be /"
# unix socket paths are limited to 108 bytes; containerd puts deeper sockets under exec/.
[ "${#DIR}" -le 60 ] || die "TOWF_DOCKER_DIR is too long for unix sockets (${#DIR} > 60 chars): $DIR"

dk() { docker -H "$HOST_URL" "$@"; }

engine_answers() {
  [ -S "$SOCK" ] || return 1
  timeout "${1:-10}" docker -H "$HOST_URL" info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

pid_alive() {  # running and not a zombie
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local st; st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ "$st" != Z ]
}

pidfile_pid() {
  local p=""
  [ -f "$PIDFILE" ] && p="$(tr -dc '0-9' <"$PIDFILE" 2>/dev/null || true)"
  printf '%s' "$p"
}

# Exclusive lock on the state dir so concurrent up/down calls serialize (bounded wait).
take_lock() {
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock -w 300 9 || die "could not lock $DIR/.lock within 300 s (another up/down running?)"
}

# ---------------------------------------------------------------- install
ensure_installed() {
  if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 \
     && command -v containerd >/dev/null 2>&1 && command -v runc >/dev/null 2>&1; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "dockerd is not installed and we are not root to apt-get install docker.io"
  command -v apt-get >/dev/null 2>&1 || die "dockerd is not installed and apt-get is not available"
  log "installing Debian docker.io (dockerd not on PATH) ..."
  # Keep the package's maintainer scripts from starting a system-wide daemon.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local rc=0
  timeout 600 apt-get update -qq >&2 || rc=$?
  if [ "$rc" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold docker.io >&2 || rc=$?
  fi
  [ "$made_policy" = 1 ] && rm -f "$policy"
  [ "$rc" = 0 ] || die "apt-get install docker.io failed (exit $rc)"
  command -v dockerd >/dev/null 2>&1 || die "docker.io installed but dockerd still not on PATH"
  command -v docker >/dev/null 2>&1 || die "docker.io installed but no docker client on PATH"
}

# ---------------------------------------------------------------- daemon
start_engine() {
  local pid
  pid="$(pidfile_pid)"
  if pid_alive "$pid"; then
    if engine_answers; then
      log "reusing running engine (pid $pid) at $HOST_URL"
      return 0
    fi
    # Maybe still starting: give it the normal start window.
    local t=0
    while [ "$t" -lt "$START_TIMEOUT" ]; do
      engine_answers 3 && { log "reusing engine (pid $pid) at $HOST_URL"; return 0; }
      pid_alive "$pid" || break
      sleep 1; t=$((t + 1))
    done
    log "engine pid $pid does not answer; restarting it"
    stop_all
  elif [ -n "$(engine_pids)" ] || awk -v d="$DIR/" 'index($2, d) == 1 {f=1} END {exit !f}' /proc/mounts; then
    log "cleaning up leftovers of an earlier engine in $DIR"
    stop_all
  fi

  mkdir -p "$DIR/data" "$DIR/exec"
  rm -f "$PIDFILE"
  [ -S "$SOCK" ] && rm -f "$SOCK"
  case "$STORAGE" in
    overlay2) grep -qw overlay /proc/filesystems 2>/dev/null || modprobe overlay 2>/dev/null || true
              grep -qw overlay /proc/filesystems 2>/dev/null \
                || die "kernel has no overlay filesystem; retry with TOWF_DOCKER_STORAGE=vfs" ;;
  esac

  log "starting dockerd (state in $DIR, log $LOG) ..."
  printf '\n==== %s dockerd start ====\n' "$(date -u +%FT%TZ)" >>"$LOG"
  # New session, all fds detached (incl. our lock fd 9) so `$(... up)` callers never hang on it.
  setsid dockerd \
    --host "$HOST_URL" \
    --data-root "$DIR/data" \
    --exec-root "$DIR/exec" \
    --pidfile "$PIDFILE" \
    --storage-driver="$STORAGE" \
    --iptables=false --ip6tables=false --bridge=none \
    </dev/null >>"$LOG" 2>&1 9>&- &
  local bgpid=$!

  local t=0
  while [ "$t" -lt $((START_TIMEOUT * 2)) ]; do
    if engine_answers 3; then
      log "engine up after ~$((t / 2)) s: $(dk info --format 'server {{.ServerVersion}}, {{.Driver}}, cgroup {{.CgroupDriver}} v{{.CgroupVersion}}' 2>/dev/null || echo '?')"
      return 0
    fi
    if ! pid_alive "$bgpid"; then
      log "dockerd exited during startup; last log lines:"
      tail -n 25 "$LOG" >&2 || true
      die "dockerd failed to start (see $LOG)"
    fi
    sleep 0.5; t=$((t + 1))
  done
  log "dockerd did not answer within ${START_TIMEOUT} s; last log lines:"
  tail -n 25 "$LOG" >&2 || true
  stop_all
  die "dockerd did not answer on $HOST_URL within ${START_TIMEOUT} s (see $LOG)"
}

# pids of dockerd/containerd/shims/docker-proxy whose command line mentions $DIR
engine_pids() {
  local d cmd argv0 base
  for d in /proc/[0-9]*; do
    [ -r "$d/cmdline" ] || continue
    cmd="$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null || true)"
    case "$cmd" in *"$DIR/"*|*"$DIR "*) ;; *) continue ;; esac
    argv0="${cmd%% *}"; base="${argv0##*/}"
    case "$base" in
      dockerd|containerd|containerd-shim*|docker-proxy) printf '%s %s\n' "${d#/proc/}" "$base" ;;
    esac
  done
}

wait_gone() {  # wait_gone SECONDS PID...
  local secs="$1"; shift
  local t=0 p alive
  while [ "$t" -lt $((secs * 4)) ]; do
    alive=0
    for p in "$@"; do pid_alive "$p" && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.25; t=$((t + 1))
  done
  return 1
}

stop_all() {
  # 1. remove running containers while the API still answers
  if engine_answers; then
    local ids
    ids="$(timeout 15 docker -H "$HOST_URL" ps -aq 2>/dev/null || true)"
    if [ -n "$ids" ]; then
      log "removing containers: $(echo $ids)"
      # shellcheck disable=SC2086
      timeout 60 docker -H "$HOST_URL" rm -f $ids >/dev/null 2>&1 || log "warning: docker rm -f failed"
    fi
  fi

  # 2. dockerd: SIGTERM, 15 s, SIGKILL
  local pids=() p
  p="$(pidfile_pid)"
  pid_alive "$p" && pids+=("$p")
  while read -r p base; do
    [ -n "${p:-}" ] && [ "$base" = dockerd ] && [[ " ${pids[*]} " != *" $p "* ]] && pids+=("$p")
  done < <(engine_pids)
  if [ "${#pids[@]}" -gt 0 ]; then
    log "stopping dockerd (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone 15 "${pids[@]}"; then
      log "dockerd did not exit in 15 s; SIGKILL"
      kill -KILL "${pids[@]}" 2>/dev/null || true
      wait_gone 5 "${pids[@]}" || log "warning: dockerd pid(s) ${pids[*]} still alive"
    fi
  fi

  # 3. processes of our containers that outlived dockerd (cgroupfs driver: .../docker/<id>)
  local cdir id cg killed=" "
  for cdir in "$DIR"/data/containers/*/; do
    [ -d "$cdir" ] || continue
    id="$(basename "$cdir")"
    for cg in /sys/fs/cgroup/docker/"$id" /sys/fs/cgroup/*/docker/"$id" \
              /sys/fs/cgroup/system.slice/docker-"$id".scope /sys/fs/cgroup/*/system.slice/docker-"$id".scope; do
      [ -f "$cg/cgroup.procs" ] || continue
      while read -r p; do
        [ -n "$p" ] && [[ "$killed" != *" $p "* ]] || continue
        killed+="$p "
        log "killing leftover container process $p (${id:0:12})"
        kill -KILL "$p" 2>/dev/null || true
      done <"$cg/cgroup.procs"
      rmdir "$cg" 2>/dev/null || true
    done
  done

  # 4. leftover containerd / shims / docker-proxy started for this DIR
  pids=()
  while read -r p base; do [ -n "${p:-}" ] && pids+=("$p"); done < <(engine_pids)
  if [ "${#pids[@]}" -gt 0 ]; then
    log "stopping leftover engine processes: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait_gone 5 "${pids[@]}" || { kill -KILL "${pids[@]}" 2>/dev/null || true; wait_gone 5 "${pids[@]}" || true; }
  fi

  # 5. unmount anything still mounted under DIR (deepest first)
  local m
  while read -r m; do
    [ -n "$m" ] || continue
    log "umount -l $m"
    timeout 10 umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
  done < <(awk -v d="$DIR" '{ gsub(/\\040/, " ", $2); if ($2 == d || index($2, d "/") == 1) print length($2) "\t" $2 }' /proc/mounts \
             | sort -rn | cut -f2-)

  # 6. exec-root is runtime state (like /run): a stale containerd.pid there whose pid is a
  #    not-yet-reaped zombie makes the next dockerd wait forever for "running" containerd.
  if awk -v d="$DIR/exec" '$2 == d || index($2, d "/") == 1 {f=1} END {exit !f}' /proc/mounts; then
    log "warning: mounts remain under $DIR/exec; leaving it"
  else
    rm -rf "$DIR/exec"
  fi
  rm -f "$PIDFILE" "$SOCK"
}

# ---------------------------------------------------------------- image
resolve_python() {
  local py="${TOWF_PYTHON:-}"
  [ -n "$py" ] || py="$(command -v python3 || true)"
  [ -n "$py" ] || die "no python3 on PATH to put in the image"
  # pyenv shims etc.: ask the interpreter for the real thing.
  "$py" - <<'EOF'
import os, sys, sysconfig
print(os.path.realpath(sys.executable))
print(sysconfig.get_paths()["stdlib"])
print(os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload"))
print(sys.platlibdir)
print("python%d.%d" % sys.version_info[:2])
print(sys.version.replace("\n", " "))
EOF
}

# print absolute paths of shared objects needed by the given ELF files (loader included)
needed_libs() {
  local f
  for f in "$@"; do
    ldd "$f" 2>/dev/null | awk '
      $2 == "=>" && $3 ~ /^\// { print $3; next }
      $2 == "=>" && $3 == "not" { print "MISSING " $1 > "/dev/stderr"; next }
      $1 ~ /^\// { print $1 }' || true
  done | sort -u
}

image_stamp() {
  # content stamp: node + python binaries/versions + this script's build recipe
  local node="$1" pyexe="$2" pyver="$3"
  {
    echo "recipe-v1"
    declare -f build_rootfs
    "$node" --version 2>/dev/null || true
    echo "$pyver"
    sha256sum "$node" "$pyexe" | cut -d' ' -f1
    needed_libs "$pyexe" 2>/dev/null | xargs -r sha256sum | cut -d' ' -f1
  } | sha256sum | cut -c1-16
}

image_label() {
  dk image inspect -f '{{index .Config.Labels "towf.stamp"}}' "$1" 2>/dev/null || true
}

build_rootfs() {
  local root="$1" node="$2" pyexe="$3" stdlib="$4" dynload="$5" platlib="$6" pyname="$7"
  rm -rf "$root"
  mkdir -p "$root"
  # Mirror the host's (merged-)usr layout so library paths from ldd resolve the same way.
  local d tgt
  mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/local/bin" "$root/usr/local/lib"
  for d in bin sbin lib lib64 lib32 libx32; do
    if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$root/$d"; mkdir -p "$root/usr/$d" 2>/dev/null || true
    elif [ -d "/$d" ]; then mkdir -p "$root/$d"; fi
  done
  mkdir -p "$root/etc/ssl/certs" "$root/proc" "$root/sys" "$root/dev" "$root/root" "$root/run" "$root/var/tmp"
  mkdir -p -m 1777 "$root/tmp"; chmod 1777 "$root/tmp" "$root/var/tmp"
  chmod 700 "$root/root"

  # node
  cp -L "$node" "$root/usr/local/bin/node"
  # python: the real binary, stdlib where it looks first (<exe dir>/../lib/pythonX.Y)
  cp -L "$pyexe" "$root/usr/local/bin/$pyname"
  ln -s "$pyname" "$root/usr/local/bin/python3"
  ln -s "$pyname" "$root/usr/local/bin/python"
  local dst="$root/usr/local/$platlib/$pyname"
  mkdir -p "$dst"
  tar -C "$stdlib" \
      --exclude=./test --exclude=./idlelib --exclude=./tkinter --exclude=./turtledemo \
      --exclude=./ensurepip --exclude=./lib2to3 --exclude='./config-*' --exclude=./site-packages \
      --exclude=./lib-dynload --exclude=__pycache__ --exclude=tests --exclude=idle_test \
      --exclude='*.exe' -cf - . | tar -C "$dst" -xf -
  mkdir -p "$dst/site-packages" "$dst/lib-dynload"
  local so sos=()
  for so in "$dynload"/*.so; do
    case "${so##*/}" in _tkinter*|_test*|_ctypes_test*|xxlimited*|_xxtestfuzz*|xxsubtype*) continue ;; esac
    cp -L "$so" "$dst/lib-dynload/"; sos+=("$so")
  done

  # /bin/sh (dash) - cheap, and what subprocess(shell=True) uses
  local sh; sh="$(readlink -f /bin/sh)"
  mkdir -p "$root$(dirname "$sh")"
  cp -L "$sh" "$root$sh"
  [ -e "$root/bin/sh" ] || ln -s "$sh" "$root/bin/sh"

  # shared libraries of everything above (+ the dynamic loader); libraries outside the
  # standard dirs (e.g. pyenv's libpython) go to the multiarch dir the loader always searches
  local libdir; libdir="$(dirname "$(ldd "$sh" | awk '$1 ~ /^libc\.so/ {print $3}')")"
  local lib t
  while read -r lib; do
    [ -n "$lib" ] || continue
    case "$lib" in
      /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*|/lib32/*|/usr/lib32/*) t="$root$lib" ;;
      *) t="$root$libdir/${lib##*/}" ;;
    esac
    mkdir -p "$(dirname "$t")"
    [ -e "$t" ] || cp -L "$lib" "$t"
  done < <(needed_libs "$node" "$pyexe" "$sh" "${sos[@]}")

  # users / groups / misc etc files
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nobody:x:65534:
EOF
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
  : >"$root/etc/hosts"; : >"$root/etc/resolv.conf"; : >"$root/etc/hostname"
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"

  # precompile the stdlib so python starts fast on a read-only rootfs
  "$pyexe" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      -d "/usr/local/$platlib/$pyname" "$dst" >/dev/null 2>&1 \
    || log "warning: compileall reported errors (non-fatal)"

  chmod -R a+rX,go-w "$root/usr" "$root/etc"
}

ensure_image() {
  local node py_info pyexe stdlib dynload platlib pyname pyver
  node="${TOWF_NODE:-$(command -v node || true)}"
  [ -n "$node" ] || die "no node on PATH to put in the image"
  node="$(readlink -f "$node")"
  py_info="$(resolve_python)" || die "could not query python3 for its paths"
  { read -r pyexe; read -r stdlib; read -r dynload; read -r platlib; read -r pyname; read -r pyver; } <<<"$py_info"
  [ -x "$pyexe" ] && [ -f "$stdlib/os.py" ] || die "python3 paths look wrong: exe=$pyexe stdlib=$stdlib"

  local stamp; stamp="$(image_stamp "$node" "$pyexe" "$pyver")"
  if [ "$(image_label "$IMG_RUNTIME")" = "$stamp" ] && [ "$(image_label "$IMG_NODE")" = "$stamp" ] \
     && [ "$(image_label "$IMG_PYTHON")" = "$stamp" ]; then
    log "image $IMG_RUNTIME up to date (stamp $stamp)"
    return 0
  fi

  log "building offline image $IMG_RUNTIME (node $("$node" --version), $pyname from $pyexe) ..."
  local root="$DIR/build/rootfs"
  build_rootfs "$root" "$node" "$pyexe" "$stdlib" "$dynload" "$platlib" "$pyname"
  log "rootfs: $(du -sh "$root" | cut -f1)"
  local id
  id="$(tar --numeric-owner -C "$root" -cf - . | timeout 300 docker -H "$HOST_URL" import \
          -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
          -c 'ENV LANG=C.UTF-8' \
          -c 'WORKDIR /' \
          -c "LABEL towf.stamp=$stamp" \
          -m "ty-openworkflow offline runtime (host node + $pyname)" \
          - "$IMG_RUNTIME")" || die "docker import of the runtime rootfs failed"
  dk tag "$IMG_RUNTIME" "$IMG_NODE" || die "docker tag $IMG_NODE failed"
  dk tag "$IMG_RUNTIME" "$IMG_PYTHON" || die "docker tag $IMG_PYTHON failed"
  rm -rf "$DIR/build"
  log "imported $id as $IMG_RUNTIME, $IMG_NODE, $IMG_PYTHON ($(dk image inspect -f '{{.Size}}' "$IMG_RUNTIME" | awk '{printf "%.0f MB", $1/1e6}'))"
  # drop dangling images of earlier builds
  timeout 60 docker -H "$HOST_URL" image prune -f >/dev/null 2>&1 || true
}

verify() {
  local out hard=(--read-only --tmpfs /tmp --user 65534:65534 --pids-limit 64 --memory 256m --init)
  run_check() {  # run_check WANT DESC docker-run-args...
    local want="$1" desc="$2"; shift 2
    out="$(timeout 60 docker -H "$HOST_URL" run --rm --network none "$@" 2>&1)" \
      || die "check failed ($desc): ${out//$'\n'/ | }"
    [ "$(printf '%s' "$out" | tail -n1)" = "$want" ] \
      || die "check failed ($desc): expected '$want', got: ${out//$'\n'/ | }"
    log "ok: $desc"
  }
  run_check 2 "node" "$IMG_NODE" node -e 'console.log(1+1)'
  run_check 2 "python3" "$IMG_PYTHON" python3 -c 'print(1+1)'
  run_check 2 "node hardened" "${hard[@]}" "$IMG_NODE" node -e 'console.log(1+1)'
  run_check 2 "python3 hardened" "${hard[@]}" "$IMG_PYTHON" python3 -c 'print(1+1)'
  run_check ok "python3 required modules" "${hard[@]}" "$IMG_PYTHON" \
    python3 -c 'import json, hashlib, os, subprocess, select, tempfile; subprocess.run(["/bin/sh","-c","true"],check=True); print("ok")'
  if out="$(timeout 60 docker -H "$HOST_URL" run --rm --network none "$IMG_PYTHON" \
              python3 -c 'import sqlite3, ssl; print("ok")' 2>&1)"; then
    log "ok: python3 sqlite3+ssl"
  else
    log "warning: python3 sqlite3/ssl unavailable in image: ${out//$'\n'/ | }"
  fi
}

# ---------------------------------------------------------------- main
cmd="${1:-}"
case "$cmd" in
  up)
    take_lock
    ensure_installed
    start_engine
    ensure_image
    verify
    echo "DOCKER_HOST=$HOST_URL"
    ;;
  down)
    if [ ! -d "$DIR" ]; then exit 0; fi
    take_lock
    stop_all
    if [ "${2:-}" = "--purge" ]; then
      if awk -v d="$DIR" 'index($2, d "/") == 1 || $2 == d {f=1} END {exit !f}' /proc/mounts; then
        log "warning: mounts remain under $DIR; not purging"
      else
        rm -rf "$DIR" && log "purged $DIR"
      fi
    fi
    log "engine down"
    ;;
  env)
    engine_answers || { log "no engine answering on $HOST_URL"; exit 1; }
    echo "DOCKER_HOST=$HOST_URL"
    ;;
  verify)
    engine_answers || die "no engine answering on $HOST_URL (run: $0 up)"
    verify
    ;;
  *)
    echo "usage: $0 {up|down [--purge]|env|verify}" >&2
    exit 2
    ;;
esac
