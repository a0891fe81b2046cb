#!/usr/bin/env python3
"""Benchmarks (not tests): wake lateness, start-to-first-step latency, idle CPU of serve, pass overhead.

Usage: python3 tests/bench.py [--quick] [--docker]    (or `make bench`)

Prints figures with median and spread. Timings on shared machines are noisy:
compare runs made on the same machine, back to back.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ty_openworkflow as tow  # noqa: E402

MODULE = os.path.join(ROOT, "ty_openworkflow.py")

STAMP_JS = """
const fs = require("fs");
async function workflow(input, { step, sleep }) {
  if (input.sleep_ms) await sleep("nap", input.sleep_ms);
  return await step("stamp", () => { fs.appendFileSync(input.counter, input.tag + " " + Date.now() + "\\n"); return 1; });
}
"""
STAMP_PY = """
import time
def workflow(input, ctx):
    if input.get("sleep_ms"):
        ctx.sleep("nap", input["sleep_ms"] / 1000.0)
    def stamp():
        with open(input["counter"], "a") as f:
            f.write("%s %d\\n" % (input["tag"], int(time.time() * 1000)))
        return 1
    return ctx.step("stamp", stamp)
"""


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(values):
    return "median %.0f ms, p90 %.0f, p99 %.0f, min %.0f, max %.0f (n=%d)" % (
        statistics.median(values), pct(values, 0.9), pct(values, 0.99), min(values), max(values), len(values))


class Bench:
    def __init__(self, extra_config=""):
        self.tmp = tempfile.mkdtemp(prefix="tyow-bench-")
        extra_config = extra_config.replace("{shared}", os.path.join(self.tmp, "shared"))
        self.config = os.path.join(self.tmp, "config.yaml")
        with open(self.config, "w") as f:
            f.write("data_dir: %s/data\ntaskyou:\n  auto_create_tasks: false\n%s" % (self.tmp, extra_config))
        self.sc = tow.Sidecar(config_path=self.config)
        self.serve_proc = None

    def serve(self):
        self.serve_proc = subprocess.Popen([sys.executable, MODULE, "--config", self.config, "serve"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if any(s["pid"] == self.serve_proc.pid for s in self.sc.store.live_schedulers(tow.now_ms(), 60000)):
                return self.serve_proc
            time.sleep(0.05)
        raise SystemExit("serve did not start")

    def wait_done(self, run_ids, timeout=120):
        deadline = time.time() + timeout
        pending = set(run_ids)
        while pending and time.time() < deadline:
            for r in list(pending):
                if self.sc.status(r)["status"] in tow.TERMINAL:
                    pending.discard(r)
            time.sleep(0.05)
        if pending:
            raise SystemExit("runs did not finish: %s" % sorted(pending))

    def stamps(self, counter):
        out = {}
        with open(counter) as f:
            for line in f:
                tag, at = line.split()
                out[tag] = int(at)
        return out

    def close(self):
        if self.serve_proc:
            self.serve_proc.terminate()
            self.serve_proc.wait(30)
        self.sc.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def bench_start_latency(runtime, n, adapter="exec", extra_config=""):
    b = Bench(extra_config)
    try:
        b.sc.deploy("stamp", STAMP_JS if runtime == "node" else STAMP_PY, runtime=runtime, adapter=adapter)
        b.serve()
        shared = os.path.join(b.tmp, "shared")
        os.makedirs(shared)
        os.chmod(shared, 0o777)  # docker passes run as an unprivileged user
        counter = os.path.join(shared, "c.txt")
        t0s, runs = {}, []
        for i in range(n):
            tag = "r%d" % i
            t0s[tag] = tow.now_ms()
            runs.append(b.sc.start("stamp", {"counter": counter, "tag": tag})["id"])
            b.wait_done([runs[-1]])
        stamps = b.stamps(counter)
        claim = []
        for i, r in enumerate(runs):
            started = [e["at"] for e in b.sc.events(r) if e["type"] == "pass_started"][0]
            claim.append(started - t0s["r%d" % i])
        return [stamps[t] - t0s[t] for t in t0s], claim
    finally:
        b.close()


def bench_wake_lateness(n, runtime="python"):
    b = Bench()
    try:
        b.sc.deploy("stamp", STAMP_PY if runtime == "python" else STAMP_JS, runtime=runtime)
        b.serve()
        counter = os.path.join(b.tmp, "c.txt")
        runs = []
        for i in range(n):
            # Staggered sleeps of 1.5-4.5 s so wake-ups do not all coincide.
            runs.append(b.sc.start("stamp", {"counter": counter, "tag": "r%d" % i,
                                             "sleep_ms": 1500 + (i * 97) % 3000})["id"])
            time.sleep(0.02)
        b.wait_done(runs)
        stamps = b.stamps(counter)
        claim, step = [], []
        for i, r in enumerate(runs):
            st = b.sc.status(r)
            wake = st["steps"][0]["wake_at"]
            started = [e["at"] for e in b.sc.events(r) if e["type"] == "pass_started"][1]
            claim.append(started - wake)
            step.append(stamps["r%d" % i] - wake)
        return claim, step
    finally:
        b.close()


HANG_PY = """
import time
def workflow(input, ctx):
    def hang():
        with open(input["counter"], "a") as f:
            f.write("%s 0\\n" % input["tag"])
        time.sleep(600)
    ctx.step("hang", hang)
"""


def shim_pids(data_dir):
    """Pids of live workflow processes of this data dir."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if (data_dir + "/exec/code").encode() in f.read():
                        out.append(pid)
            except OSError:
                pass
    return out


def bench_cancel(n):
    """cancel (from another process's API) -> the pass's process gone, while serve runs it."""
    b = Bench()
    try:
        b.sc.deploy("hang", HANG_PY, runtime="python")
        b.serve()
        counter = os.path.join(b.tmp, "c.txt")
        data_dir = b.sc.config.data_dir
        out = []
        for i in range(n):
            tag = "r%d" % i
            run_id = b.sc.start("hang", {"counter": counter, "tag": tag})["id"]
            deadline = time.time() + 30
            while time.time() < deadline and tag not in (open(counter).read() if os.path.exists(counter) else ""):
                time.sleep(0.01)
            t0 = time.time()
            b.sc.cancel(run_id)
            while shim_pids(data_dir) and time.time() - t0 < 30:
                time.sleep(0.005)
            out.append((time.time() - t0) * 1000)
        return out
    finally:
        b.close()


def bench_idle_cpu(seconds):
    b = Bench()
    try:
        p = b.serve()
        time.sleep(1)

        def cpu():
            with open("/proc/%d/stat" % p.pid) as f:
                parts = f.read().rsplit(")", 1)[1].split()
            return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

        c0, t0 = cpu(), time.time()
        time.sleep(seconds)
        used = cpu() - c0
        with open("/proc/%d/status" % p.pid) as f:
            rss = [ln for ln in f if ln.startswith("VmRSS")][0].split()[1]
        return 100.0 * used / (time.time() - t0), int(rss)
    finally:
        b.close()


def runtime_startup(argv, n=10):
    times = []
    for _ in range(n):
        t0 = time.time()
        subprocess.run(argv, check=True, capture_output=True)
        times.append((time.time() - t0) * 1000)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--docker", action="store_true", help="also measure the docker adapter (needs an engine)")
    args = ap.parse_args()
    n = 10 if args.quick else 30
    print("machine: %d cores, python %s, node %s" % (os.cpu_count(), sys.version.split()[0],
                                                      subprocess.run(["node", "--version"], capture_output=True,
                                                                     text=True).stdout.strip()))
    print("runtime start-up alone: node %s" % summary(runtime_startup(["node", "-e", ""])))
    print("runtime start-up alone: python3 %s" % summary(runtime_startup(["python3", "-c", ""])))
    for runtime in ("node", "python"):
        first, claim = bench_start_latency(runtime, n)
        print("start -> pass claimed by serve (%s): %s" % (runtime, summary(claim)))
        print("start -> first step running (%s, exec): %s" % (runtime, summary(first)))
    claim, step = bench_wake_lateness(2 * n)
    print("wake lateness, pass claimed: %s" % summary(claim))
    print("wake lateness, step after the sleep running (python): %s" % summary(step))
    print("cancel -> running pass killed (serve, exec/python): %s" % summary(bench_cancel(n // 2)))
    cpu, rss = bench_idle_cpu(10 if args.quick else 30)
    print("idle serve: %.2f%% CPU, RSS %d KiB" % (cpu, rss))
    if args.docker:
        images = os.environ.get("TOWF_BENCH_IMAGES", "ty-openworkflow-test/node:local,ty-openworkflow-test/python:local")
        node_img, py_img = images.split(",")
        extra = ("adapters:\n  docker:\n    enabled: true\n    node_image: %s\n    python_image: %s\n"
                 "    volumes:\n      \"{shared}\": \"{shared}\"\n" % (node_img, py_img))
        for runtime in ("node", "python"):
            first, _ = bench_start_latency(runtime, n, adapter="docker", extra_config=extra)
            print("start -> first step running (%s, docker): %s" % (runtime, summary(first)))


if __name__ == "__main__":
    main()
