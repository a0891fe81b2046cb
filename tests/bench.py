#!/usr/bin/env python3
"""Benchmark harness (not a test): ty-openworkflow measured from outside, as a user runs it.

Usage: python3 tests/bench.py [--reps N] [--runtimes node,python] [--only W1,W2,...] [--json FILE]
                              [--peers FILE ...] [--from-json FILE ...] [--quick]
       (`make bench` runs it with the defaults: 3 reps, both runtimes, every workload: about 3 min on 2
        cores with warm workers, longer when every pass is a process)

Every figure comes from a real `serve` subprocess (its own process group) on a throwaway config and data
dir, runs started through the Python API (`tow.Sidecar(config_path=...).start(...)`), the exec adapter.
Each workload is repeated --reps times (reps interleave the runtimes); the table shows the median of the
reps with their min and max. Workloads (the workflow is 4 steps each returning x + 1, from x = 0):

  W1  throughput: serve running (warmed by one run); 500 `start()` calls in a loop from this process
      (drive=True, as a user would); wall time from the first start() until this process sees the 500th
      run completed in the store (polled every 10 ms); runs/s. With the default config,
      `concurrency: 16` and `concurrency: 100`. (--w1-mode enqueue: the 500 runs are stored with
      drive=False first, then serve starts; the clock still starts at the first start().
      --w1-limit N: the workflow has a flow-control limit, `limits w --concurrency N`.)
  W2  latency: one run at a time, start() -> the run seen completed in the store (a read-only SQLite
      connection polled every 1 ms; serve's own finished_at stamp is kept in the JSON as well),
      median of 20 per rep, serve warmed by one run.
  W3  wake precision: step a; sleep 2 s; step b returns Date.now() / time.time()*1000; lateness = b's
      value - the sleep step's wake_at (as `status --json` shows it); 10 runs per rep, started 250 ms
      apart; median, max, and how many were early (negative).
  W4  recovery: a 3 s step; 1 s into it the serve's whole process group is SIGKILLed; a new serve is
      started at once; (kill -> run completed) - 3 s. lease_ttl at its default (30s).
  steps: one run of 200 trivial steps and one of 2000: (start -> completed) / steps.
  cli: `python3 ty_openworkflow.py --config C list runs` vs `python3 -c 0`, median of 10 each, ratio.
  idle: serve after the runs above: CPU% over 10 s and RSS of serve plus all its descendants.

--json FILE writes every figure (samples per rep, raw values). --peers FILE merges figures that
tests/peers/ wrote (same JSON shape) into the table; --from-json prints the table of saved files only.
Timings on a shared machine are noisy: compare runs made on the same machine, back to back.
"""
import argparse
import atexit
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "ty_openworkflow.py")
SCHEMA = "tyow-bench/1"

# ---------------------------------------------------------------------------
# Figures: the shared vocabulary of bench.py and tests/peers/ (same keys in the JSON)
# ---------------------------------------------------------------------------

# key, label, unit, decimals
FIGURES = [
    ("w1_default", "W1 throughput, default concurrency", "runs/s", 1),
    ("w1_c16", "W1 throughput, concurrency 16", "runs/s", 1),
    ("w1_c100", "W1 throughput, concurrency 100", "runs/s", 1),
    ("w2_latency", "W2 start -> completed (median of 20)", "ms", 1),
    ("w2_inproc", "W2 variant: started inside the worker process", "ms", 1),
    ("w3_late_median", "W3 wake lateness, median of 10", "ms", 1),
    ("w3_late_max", "W3 wake lateness, max of 10", "ms", 1),
    ("w3_early", "W3 early wake-ups (negative), count", "runs", 0),
    ("w4_recovery", "W4 recovery: kill -> done, minus 3 s", "ms", 0),
    ("w4_restep", "W4 kill -> the step running again", "ms", 0),
    ("step_200", "per-step cost, 200 steps", "ms/step", 2),
    ("step_2000", "per-step cost, 2000 steps", "ms/step", 2),
    ("cli_cold", "CLI cold start (`list runs`), median of 10", "ms", 1),
    ("cli_base", "interpreter alone (`-c 0`), median of 10", "ms", 1),
    ("cli_ratio", "CLI cold start / interpreter alone", "x", 2),
    ("cli_installed", "CLI cold start as `make install` sets it up", "ms", 1),
    ("cli_installed_ratio", "installed CLI / interpreter alone", "x", 2),
    ("idle_cpu", "idle scheduler CPU over 10 s (with children)", "%", 2),
    ("idle_rss", "idle scheduler RSS (with children)", "MiB", 1),
    ("idle_procs", "idle scheduler processes (itself + children)", "procs", 0),
]
FIGURE_KEYS = [f[0] for f in FIGURES]


class Results:
    """Figures of one system: key -> list of per-rep samples (plus raw values and notes)."""

    def __init__(self, name, meta=None):
        self.name = name
        self.meta = dict(meta or {})
        self.figures = {}

    def add(self, key, value, raw=None, note=None):
        fig = self.figures.setdefault(key, {"samples": [], "raw": [], "errors": []})
        fig["samples"].append(value)
        if raw is not None:
            fig["raw"].append(raw)
        if note:
            fig["note"] = note

    def error(self, key, message):
        fig = self.figures.setdefault(key, {"samples": [], "raw": [], "errors": []})
        fig["errors"].append(message)

    def to_json(self):
        return {"meta": self.meta, "figures": self.figures}


def stats_of(samples):
    vals = [v for v in samples if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals), len(vals)


def fmt_cell(fig, decimals):
    if not fig:
        return "-"
    st = stats_of(fig.get("samples", []))
    if st is None:
        return "ERROR" if fig.get("errors") else "-"
    med, lo, hi, n = st
    f = "%%.%df" % decimals
    cell = f % med
    if n > 1:
        cell += " [%s-%s]" % (f % lo, f % hi)
    if fig.get("errors"):
        cell += " !%d" % len(fig["errors"])
    return cell


def print_table(systems, out=sys.stdout):
    """systems: list of (name, {"figures": {...}, "meta": {...}}). One column per system."""
    names = [n for n, _ in systems]
    rows = [["figure (median [min-max] of reps)", "unit"] + names]
    for key, label, unit, dec in FIGURES:
        cells = [fmt_cell(doc.get("figures", {}).get(key), dec) for _, doc in systems]
        if all(c == "-" for c in cells):
            continue
        rows.append([label, unit] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "-+-".join("-" * w for w in widths)
    for i, r in enumerate(rows):
        out.write(" | ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(r))
                  + "\n")
        if i == 0:
            out.write(line + "\n")
    notes = []
    for name, doc in systems:
        for key in FIGURE_KEYS:
            fig = doc.get("figures", {}).get(key) or {}
            for e in fig.get("errors", [])[:3]:
                notes.append("%s %s: %s" % (name, key, e))
    if notes:
        out.write("errors (! in the table):\n" + "".join("  %s\n" % n for n in notes))
    for name, doc in systems:
        m = doc.get("meta", {})
        if m.get("setup"):
            out.write("%s: %s\n" % (name, m["setup"]))
    out.flush()


def write_json(path, systems, meta):
    doc = {"schema": SCHEMA, "meta": meta, "systems": {n: d for n, d in systems}}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise SystemExit("%s: not a %s file" % (path, SCHEMA))
    return list(doc["systems"].items())


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------
# Processes: everything started is tracked and killed, also on Ctrl-C and errors
# ---------------------------------------------------------------------------

_PROCS = []  # Popen objects we started (each in its own session)
_DIRS = []  # temp dirs: any process whose argv or cwd is inside one is ours


def proc_table():
    """pid -> (ppid, starttime) for every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[int(name)] = (int(parts[1]), int(parts[19]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def descendants(pid, table=None):
    table = table if table is not None else proc_table()
    kids, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for c, (pp, _) in table.items():
            if pp == p and c not in kids:
                kids.append(c)
                frontier.append(c)
    return kids


def cpu_ticks(pid, with_reaped=False):
    with open("/proc/%d/stat" % pid) as f:
        parts = f.read().rsplit(")", 1)[1].split()
    t = int(parts[11]) + int(parts[12])
    if with_reaped:
        t += int(parts[13]) + int(parts[14])
    return t


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    return 0


def _ours(pid, roots):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read()
        if any(r.encode() in cmd for r in roots):
            return True
        cwd = os.readlink("/proc/%d/cwd" % pid)
        return any(cwd == r or cwd.startswith(r + "/") for r in roots)
    except OSError:
        return False


def sweep(roots):
    """SIGKILL every process whose argv or cwd lies in one of ``roots`` (never ourselves)."""
    me = os.getpid()
    for _ in range(3):
        found = [p for p in proc_table() if p != me and _ours(p, roots)]
        if not found:
            return
        for p in found:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)


def kill_tree(proc, graceful_s=0.0):
    """Stop a process we started: SIGTERM (if graceful_s), then SIGKILL to its group and descendants."""
    if proc.poll() is None and graceful_s > 0:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(graceful_s)
        except subprocess.TimeoutExpired:
            pass
    table = proc_table()
    kids = descendants(proc.pid, table) if proc.poll() is None else []
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # each process we start leads its own group
    except OSError:
        pass
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def cleanup_all():
    while _PROCS:
        kill_tree(_PROCS.pop())
    if _DIRS:
        sweep(list(_DIRS))
    while _DIRS:
        shutil.rmtree(_DIRS.pop(), ignore_errors=True)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def popen(argv, **kw):
    kw.setdefault("start_new_session", True)
    p = subprocess.Popen(argv, **kw)
    _PROCS.append(p)
    return p


def untrack(p):
    if p in _PROCS:
        _PROCS.remove(p)


def wait_for(pred, timeout, what, interval=0.005):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# ---------------------------------------------------------------------------
# ty-openworkflow under test
# ---------------------------------------------------------------------------

WF_JS = """
async function workflow(input, { step }) {
  let x = input.x;
  for (let i = 0; i < input.n; i++) {
    x = await step("s" + i, () => x + 1);
  }
  return x;
}
"""
WF_PY = """
def workflow(input, ctx):
    x = input["x"]
    for i in range(input["n"]):
        x = ctx.step("s%d" % i, lambda: x + 1)
    return x
"""
WAKE_JS = """
async function workflow(input, { step, sleep }) {
  await step("a", () => 1);
  await sleep("s", 2000);
  return await step("b", () => Date.now());
}
"""
WAKE_PY = """
import time
def workflow(input, ctx):
    ctx.step("a", lambda: 1)
    ctx.sleep("s", 2)
    return ctx.step("b", lambda: time.time() * 1000)
"""
LONG_JS = """
const fs = require("fs");
async function workflow(input, { step }) {
  return await step("long", async () => {
    fs.appendFileSync(input.marker, Date.now() + "\\n");
    await new Promise((resolve) => setTimeout(resolve, input.ms));
    return 1;
  });
}
"""
LONG_PY = """
import time
def workflow(input, ctx):
    def long():
        with open(input["marker"], "a") as f:
            f.write("%d\\n" % int(time.time() * 1000))
        time.sleep(input["ms"] / 1000.0)
        return 1
    return ctx.step("long", long)
"""
CODE = {"node": {"w": WF_JS, "wake": WAKE_JS, "long": LONG_JS},
        "python": {"w": WF_PY, "wake": WAKE_PY, "long": LONG_PY}}
TERMINAL = ("completed", "failed", "canceled")
EXEC_MODE_CONFIG = [""]  # --exec-mode: "adapters.exec.mode" for every install ("" = the module's default)


def now_ms():
    return time.time() * 1000.0


class Install:
    """A throwaway config + data dir, the Sidecar API over it, and the serve processes it starts."""

    def __init__(self, tow, runtime, extra_config=""):
        self.tow = tow
        self.runtime = runtime
        self.tmp = tempfile.mkdtemp(prefix="tyow-bench-")
        _DIRS.append(self.tmp)
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(self.home)
        self.data_dir = os.path.join(self.tmp, "data")
        self.config = os.path.join(self.tmp, "config.yaml")
        with open(self.config, "w") as f:
            f.write("data_dir: %s\ntaskyou:\n  auto_create_tasks: false\n%s%s" % (self.data_dir, extra_config,
                                                                                EXEC_MODE_CONFIG[0]))
        self.sc = tow.Sidecar(config_path=self.config)
        self.serve_proc = None
        self._ro = None
        self.failed = False
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TY_OPENWORKFLOW_")}
        self.env["HOME"] = self.home
        for name, code in CODE[runtime].items():
            self.sc.deploy(name, code, runtime=runtime)

    # -- store, read-only and cheap ---------------------------------------------

    def db(self):
        if self._ro is None:
            self._ro = sqlite3.connect("file:%s?mode=ro" % self.sc.store.path, uri=True, timeout=10,
                                       check_same_thread=False)
        return self._ro

    def run_row(self, run_id):
        return self.db().execute("SELECT status, finished_at FROM runs WHERE id = ?", (run_id,)).fetchone()

    def wait_run(self, run_id, timeout=60, interval=0.002):
        row = wait_for(lambda: (lambda r: r if r and r[0] in TERMINAL else None)(self.run_row(run_id)),
                       timeout, "run %s to finish" % run_id, interval)
        if row[0] != "completed":
            st = self.sc.status(run_id)
            raise RuntimeError("run %s ended %s: %s" % (run_id, row[0], (st.get("error") or {}).get("message")))
        return row[1]

    # -- serve --------------------------------------------------------------------

    def start_serve(self, timeout=20):
        log = open(os.path.join(self.tmp, "serve.log"), "ab")
        p = popen([sys.executable, MODULE, "--config", self.config, "serve"], stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=log, env=self.env, cwd=self.tmp)
        log.close()
        self.serve_proc = p

        def ready():
            if p.poll() is not None:
                raise RuntimeError("serve exited with %s (see %s/serve.log)" % (p.returncode, self.tmp))
            return any(s["pid"] == p.pid for s in self.sc.store.live_schedulers(self.tow.now_ms(), 60000))
        wait_for(ready, timeout, "serve to register", 0.01)
        return p

    def stop_serve(self):
        if self.serve_proc is not None:
            kill_tree(self.serve_proc, graceful_s=15)
            untrack(self.serve_proc)
            self.serve_proc = None

    def warm(self):
        run = self.sc.start("w", {"x": 0, "n": 4})
        self.wait_run(run["id"], 60)

    def close(self):
        self.stop_serve()
        if self._ro is not None:
            self._ro.close()
        self.sc.close()
        log = os.path.join(self.tmp, "serve.log")
        if self.failed and os.path.exists(log):
            kept = os.path.join(tempfile.gettempdir(), "tyow-bench-failed-%s-%d.log" % (self.runtime, time.time_ns()))
            shutil.copyfile(log, kept)
            print("    (serve's log kept: %s)" % kept, flush=True)
        sweep([self.tmp])
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.tmp in _DIRS:
            _DIRS.remove(self.tmp)


def w1_throughput(inst, n, mode):
    """Returns (runs/s, info)."""
    ids = []
    if mode == "live":
        inst.start_serve()
        inst.warm()
        t0 = now_ms()
        for _ in range(n):
            ids.append(inst.sc.start("w", {"x": 0, "n": 4})["id"])
        t_enq = now_ms()
    else:
        t0 = now_ms()
        for _ in range(n):
            ids.append(inst.sc.start("w", {"x": 0, "n": 4}, drive=False)["id"])
        t_enq = now_ms()
        inst.start_serve()
    placeholders = ",".join("?" * len(ids))
    q = "SELECT count(*), max(finished_at) FROM runs WHERE status IN ('completed','failed','canceled') " \
        "AND id IN (%s)" % placeholders
    done = wait_for(lambda: (lambda r: r if r[0] == n else None)(inst.db().execute(q, ids).fetchone()),
                    240, "%d runs to finish" % n, 0.01)
    t_seen = now_ms()
    bad = inst.db().execute("SELECT count(*) FROM runs WHERE status != 'completed' AND id IN (%s)"
                            % placeholders, ids).fetchone()[0]
    wrong = inst.db().execute("SELECT count(*) FROM runs WHERE output != '4' AND id IN (%s)" % placeholders,
                              ids).fetchone()[0]
    if bad or wrong:
        raise RuntimeError("%d of %d runs did not complete, %d with a wrong output" % (bad, n, wrong))
    elapsed = t_seen - t0
    return n / (elapsed / 1000.0), {"elapsed_ms": elapsed, "enqueue_ms": t_enq - t0,
                                    "elapsed_committed_ms": done[1] - t0}


def w2_latency(inst, n):
    lat, seen = [], []
    for _ in range(n):
        t0 = now_ms()
        run = inst.sc.start("w", {"x": 0, "n": 4})
        fin = inst.wait_run(run["id"], 30, 0.001)
        seen.append(now_ms() - t0)
        lat.append(fin - t0)
    return lat, seen


def w3_wake(inst, n, gap_s=0.25):
    ids = []
    for i in range(n):
        ids.append(inst.sc.start("wake", {"i": i})["id"])
        time.sleep(gap_s)
    late = []
    for r in ids:
        inst.wait_run(r, 60, 0.01)
        st = inst.sc.status(r)
        wake = [s for s in st["steps"] if s["kind"] == "sleep"][0]["wake_at"]
        late.append(st["output"] - wake)
    return late


def per_step(inst, steps):
    t0 = now_ms()
    run = inst.sc.start("w", {"x": 0, "n": steps})
    inst.wait_run(run["id"], 300, 0.002)
    t_seen = now_ms()
    out = inst.sc.status(run["id"])["output"]
    if out != steps:
        raise RuntimeError("the %d-step run returned %r" % (steps, out))
    return (t_seen - t0) / steps


def cli_cold(inst, n=10):
    def timed(argv):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            p = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      env=inst.env, cwd=inst.tmp)
            try:
                _, err = p.communicate(timeout=60)
            finally:
                untrack(p)
            out.append((time.perf_counter() - t0) * 1000)
            if p.returncode != 0:
                raise RuntimeError("%s exited %d: %s" % (argv, p.returncode, err.decode()[-300:]))
        return out
    cli = timed([sys.executable, MODULE, "--config", inst.config, "list", "runs"])
    base = timed([sys.executable, "-c", "0"])
    # As `make install` sets it up: the single-file build imported by a six-line launcher
    # (the same launcher the Makefile writes), so Python caches its bytecode.
    lib, bindir = os.path.join(inst.tmp, "prefix", "lib"), os.path.join(inst.tmp, "prefix", "bin")
    os.makedirs(lib, exist_ok=True)
    os.makedirs(bindir, exist_ok=True)
    subprocess.run([sys.executable, MODULE, "dist", os.path.join(lib, "ty_openworkflow.py")], check=True,
                   stdout=subprocess.DEVNULL)
    launcher = os.path.join(bindir, "ty-openworkflow")
    with open(launcher, "w") as f:
        f.write("#!%s\nimport sys\nsys.dont_write_bytecode = False\nsys.path.insert(0, %r)\n"
                "from ty_openworkflow import main\nsys.exit(main())\n" % (sys.executable, lib))
    os.chmod(launcher, 0o755)
    timed([launcher, "--config", inst.config, "list", "runs"])[:1]  # the first start writes the bytecode
    installed = timed([launcher, "--config", inst.config, "list", "runs"])
    return median(cli), median(base), median(installed)


def tree_usage(pid):
    """(cpu ticks of pid + live descendants + reaped children, rss KiB, process count)."""
    table = proc_table()
    pids = [pid] + descendants(pid, table)
    ticks, rss, count = 0, 0, 0
    for p in pids:
        try:
            ticks += cpu_ticks(p, with_reaped=(p == pid))
            rss += rss_kib(p)
            count += 1
        except OSError:
            pass
    return ticks, rss, count


def idle(inst, seconds):
    pid = inst.serve_proc.pid
    time.sleep(1.0)
    c0, _, _ = tree_usage(pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    c1, rss, count = tree_usage(pid)
    wall = time.monotonic() - t0
    return 100.0 * (c1 - c0) / os.sysconf("SC_CLK_TCK") / wall, rss / 1024.0, count


def w4_recovery(inst, step_ms=3000, kill_after_s=1.0):
    marker = os.path.join(inst.tmp, "w4-%d.marker" % time.time_ns())
    inst.start_serve()
    run = inst.sc.start("long", {"marker": marker, "ms": step_ms})
    first = wait_for(lambda: os.path.exists(marker) and open(marker).read().split(), 60, "the long step to start")
    t_step = int(first[0])
    delay = t_step / 1000.0 + kill_after_s - time.time()
    if delay > 0:
        time.sleep(delay)
    old = inst.serve_proc
    t_kill = now_ms()
    os.killpg(old.pid, signal.SIGKILL)
    inst.start_serve()  # at once; it does not wait for the old one to be reaped
    old.wait(10)
    untrack(old)
    inst.wait_run(run["id"], 120, 0.002)
    fin = now_ms()
    stamps = open(marker).read().split()
    restep = int(stamps[1]) - t_kill if len(stamps) > 1 else float("nan")
    inst.stop_serve()
    return fin - t_kill - step_ms, restep


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def guarded(res, keys, fn, *args):
    """Run one workload; a failure is recorded against its figures, the bench goes on."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken workload must not stop the others
        for a in args:
            if isinstance(a, Install):
                a.failed = True  # keep its serve log
        msg = "%s: %s" % (type(exc).__name__, exc)
        print("    ERROR %s: %s" % ("/".join(keys), msg), flush=True)
        for k in keys:
            res.error(k, msg)
        return None


def run_rep(tow, runtime, res, args, rep):
    say = lambda s: print("  [%s rep %d] %s" % (runtime, rep, s), flush=True)  # noqa: E731
    # W1 at three concurrency settings, each on a fresh install
    if "W1" in args.only:
        for key, extra in (("w1_default", ""), ("w1_c16", "concurrency: 16\n"), ("w1_c100", "concurrency: 100\n")):
            inst = Install(tow, runtime, extra)
            try:
                if args.w1_limit:
                    inst.sc.set_limits("w", concurrency=args.w1_limit)
                out = guarded(res, [key], w1_throughput, inst, args.w1_runs, args.w1_mode)
                if out:
                    res.add(key, out[0], raw=out[1])
                    say("%s: %.1f runs/s (%d runs in %.0f ms, enqueue %.0f ms)"
                        % (key, out[0], args.w1_runs, out[1]["elapsed_ms"], out[1]["enqueue_ms"]))
            finally:
                inst.close()
    # W2, steps, W3, cli, idle: one install, one serve
    main_set = {"W2", "steps", "W3", "cli", "idle"} & set(args.only)
    if main_set:
        inst = Install(tow, runtime)
        try:
            ok = guarded(res, ["w2_latency"], lambda: (inst.start_serve(), inst.warm(), True)[-1])
            if ok and "W2" in args.only:
                out = guarded(res, ["w2_latency"], w2_latency, inst, args.w2_runs)
                if out:
                    lat, seen = out
                    res.add("w2_latency", median(seen), raw={"observed_ms": seen, "committed_ms": lat})
                    say("W2: median %.1f ms (min %.1f, max %.1f; by serve's finished_at %.1f)"
                        % (median(seen), min(seen), max(seen), median(lat)))
            if ok and "steps" in args.only:
                for steps in (200, 2000):
                    v = guarded(res, ["step_%d" % steps], per_step, inst, steps)
                    if v is not None:
                        res.add("step_%d" % steps, v)
                        say("%d steps: %.2f ms/step" % (steps, v))
            if ok and "W3" in args.only:
                late = guarded(res, ["w3_late_median", "w3_late_max", "w3_early"], w3_wake, inst, args.w3_runs)
                if late:
                    early = sum(1 for v in late if v < 0)
                    res.add("w3_late_median", median(late), raw=late)
                    res.add("w3_late_max", max(late))
                    res.add("w3_early", early)
                    say("W3: lateness median %.1f ms, max %.1f, early %d" % (median(late), max(late), early))
            if ok and "idle" in args.only:
                out = guarded(res, ["idle_cpu", "idle_rss", "idle_procs"], idle, inst, args.idle_seconds)
                if out:
                    res.add("idle_cpu", out[0])
                    res.add("idle_rss", out[1])
                    res.add("idle_procs", out[2])
                    say("idle: %.2f%% CPU, RSS %.1f MiB in %d processes" % out)
            if "cli" in args.only:
                out = guarded(res, ["cli_cold", "cli_base", "cli_ratio", "cli_installed", "cli_installed_ratio"],
                              cli_cold, inst)
                if out:
                    res.add("cli_cold", out[0])
                    res.add("cli_base", out[1])
                    res.add("cli_ratio", out[0] / out[1])
                    res.add("cli_installed", out[2])
                    res.add("cli_installed_ratio", out[2] / out[1])
                    say("cli: list runs %.1f ms (installed: %.1f ms), python3 -c 0 %.1f ms, x%.2f (installed x%.2f)"
                        % (out[0], out[2], out[1], out[0] / out[1], out[2] / out[1]))
        finally:
            inst.close()
    if "W4" in args.only:
        inst = Install(tow, runtime)
        try:
            out = guarded(res, ["w4_recovery", "w4_restep"], w4_recovery, inst)
            if out:
                res.add("w4_recovery", out[0])
                res.add("w4_restep", out[1])
                say("W4: recovery %.0f ms (step running again %.0f ms after the kill)" % out)
        finally:
            inst.close()


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "ty_openworkflow.py",
                                "runtimes"], capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_meta():
    node = shutil.which("node")
    node_v = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip() if node else None
    return {"cores": os.cpu_count(), "python": platform.python_version(), "node": node_v,
            "machine": platform.machine(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every workload (default 3)")
    ap.add_argument("--runtimes", default="node,python", help="comma list: node,python")
    ap.add_argument("--only", default="W1,W2,W3,W4,steps,cli,idle", help="comma list of workloads to run")
    ap.add_argument("--w1-runs", type=int, default=500)
    ap.add_argument("--w1-mode", choices=("live", "enqueue"), default="live",
                    help="live: start() while serve runs (default); enqueue: drive=False first, then serve")
    ap.add_argument("--w1-limit", type=int, metavar="N",
                    help="W1 with the workflow limited to N active runs (`limits w --concurrency N`)")
    ap.add_argument("--exec-mode", choices=("warm", "process"),
                    help="set adapters.exec.mode in every config (default: leave the module's default)")
    ap.add_argument("--w2-runs", type=int, default=20)
    ap.add_argument("--w3-runs", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="1 rep, 100 W1 runs, 5 s idle: a smoke run")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--peers", nargs="+", metavar="FILE", default=[],
                    help="JSON files from tests/peers/ to merge into the table (and --json)")
    ap.add_argument("--from-json", nargs="+", metavar="FILE", help="print the table of saved files; run nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        systems = [s for path in args.from_json for s in read_json(path)]
        print_table(systems)
        return 0
    if args.quick:
        args.reps, args.w1_runs, args.idle_seconds = 1, 100, 5.0
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if "node" in runtimes and not shutil.which("node"):
        print("node not on PATH: skipping the node runtime", file=sys.stderr)
        runtimes.remove("node")
    for k in [k for k in os.environ if k.startswith("TY_OPENWORKFLOW_")]:
        del os.environ[k]  # the bench's own Sidecar reads only its temp config
    sys.path.insert(0, ROOT)
    import ty_openworkflow as tow  # noqa: E402

    atexit.register(cleanup_all)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    if args.exec_mode:
        EXEC_MODE_CONFIG[0] = "adapters:\n  exec:\n    mode: %s\n" % args.exec_mode
    meta = dict(machine_meta(), module_rev=git_rev(), reps=args.reps, w1_mode=args.w1_mode, w1_runs=args.w1_runs,
                exec_mode=args.exec_mode or "default", w1_limit=args.w1_limit)
    setup = ("exec adapter (mode: %s), serve subprocess; W1 %s mode (%s)%s" % (
        args.exec_mode or "the module's default", args.w1_mode,
        "start() while serve runs, drive=True" if args.w1_mode == "live" else "500 x start(drive=False), then serve",
        "; W1's workflow limited to %d active runs" % args.w1_limit if args.w1_limit else ""))
    results = {rt: Results("ty-openworkflow " + rt, {"setup": setup, "runtime": rt}) for rt in runtimes}
    print("ty-openworkflow bench: %s, %d cores, python %s, node %s; %d rep(s) of %s"
          % (meta["module_rev"], meta["cores"], meta["python"], meta["node"], args.reps, ",".join(args.only)),
          flush=True)
    t_start = time.monotonic()
    try:
        for rep in range(1, args.reps + 1):
            for rt in runtimes:
                run_rep(tow, rt, results[rt], args, rep)
    except KeyboardInterrupt:
        print("\ninterrupted; printing what was measured", file=sys.stderr)
    finally:
        cleanup_all()
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    systems = [(r.name, r.to_json()) for r in results.values()]
    for path in args.peers:
        if os.path.exists(path):
            systems += read_json(path)
        else:
            print("no peers file %s (run tests/peers/run.sh)" % path, file=sys.stderr)
    print("\nresults (%.0f s):" % meta["elapsed_s"])
    print_table(systems)
    if args.json:
        write_json(args.json, systems, meta)
        print("wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
