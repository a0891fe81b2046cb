#!/usr/bin/env python3
"""DBOS Transact (PyPI `dbos`, SQLite system database) under tests/bench.py's workloads.

Usage (from the venv that has dbos; tests/peers/run.sh sets it up):
    python tests/peers/dbos_bench.py [--reps N] [--only W1,W2,W3,W4,steps,cli,idle] [--json FILE]
                                     [--w1-mode live|enqueue] [--w1-runs 500] [--quick]

The shape mirrors ty-openworkflow's `serve` + `Sidecar.start()`: a worker process (this file with
--role worker: DBOS(config) with the workflows below, DBOS.launch(), DBOS.register_queue("bench") with
DBOS's defaults: no concurrency limits, 1 s queue polling) runs the workflows; this driver process
starts runs from outside with DBOSClient.enqueue(queue "bench") and watches the system database
(a read-only SQLite connection) for their end. Workloads, clocks and figure keys are bench.py's:

  W1  500 enqueues while the worker runs (warmed by one run); first enqueue -> 500th seen SUCCESS.
      DBOS's defaults for concurrency (the brief: "default for DBOS"), so one W1 figure (w1_default).
  W2  enqueue -> seen SUCCESS (1 ms polling), median of 20. Also, as a variant (w2_inproc), the
      app starting its own workflow: DBOS.start_workflow(...).get_result() in one process, no queue.
  W3  step a; DBOS.sleep(2); step b returns time.time()*1000; lateness = b - the sleep's recorded
      wake time (the DBOS.sleep step's output: its end time). 10 runs 250 ms apart.
  W4  a 3 s step; 1 s in, SIGKILL the worker's process group; start a new worker at once (same
      executor id, so DBOS.launch() recovers the run); (kill -> seen SUCCESS) - 3 s.
  steps  200 and 2000 @DBOS.step calls in one workflow: (enqueue -> SUCCESS) / steps.
  cli  `dbos workflow list -s sqlite:///...` vs `python -c 0` (the venv's interpreter).
  idle the worker process after the runs: CPU% over 10 s, RSS (with any children).
"""
import argparse
import atexit
import os
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: bench.py's figures, process tracking and table
import bench as B  # noqa: E402

QUEUE = "bench"
DONE = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


# ---------------------------------------------------------------------------
# worker role: the DBOS application
# ---------------------------------------------------------------------------

def worker_main(db_path):
    from dbos import DBOS

    DBOS(config={"name": "tyowbench", "system_database_url": "sqlite:///" + db_path, "log_level": "WARNING"})

    @DBOS.step()
    def add(x):
        return x + 1

    @DBOS.workflow(name="w")
    def w(x, n):
        for _ in range(n):
            x = add(x)
        return x

    @DBOS.step()
    def one():
        return 1

    @DBOS.step()
    def stamp():
        return time.time() * 1000

    @DBOS.workflow(name="wake")
    def wake(i):
        one()
        DBOS.sleep(2)
        return stamp()

    @DBOS.step()
    def long_step(marker, ms):
        with open(marker, "a") as f:
            f.write("%d\n" % int(time.time() * 1000))
        time.sleep(ms / 1000.0)
        return 1

    @DBOS.workflow(name="long")
    def long(marker, ms):
        return long_step(marker, ms)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    DBOS.launch()
    DBOS.register_queue(QUEUE)

    def watch_stdin():  # the driver holds our stdin: when it goes, so do we
        try:
            while sys.stdin.buffer.read(1):
                pass
        finally:
            stop.set()
    threading.Thread(target=watch_stdin, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)
    return 0


def inproc_main(db_path, n):
    """W2's variant: the app starts its own workflow (DBOS.start_workflow, no queue) and waits for it."""
    import json
    from dbos import DBOS

    DBOS(config={"name": "tyowbench", "system_database_url": "sqlite:///" + db_path, "log_level": "WARNING"})

    @DBOS.step()
    def add(x):
        return x + 1

    @DBOS.workflow(name="w")
    def w(x, n):
        for _ in range(n):
            x = add(x)
        return x

    DBOS.launch()
    try:
        DBOS.start_workflow(w, 0, 4).get_result()  # warm
        out = []
        for _ in range(n):
            t0 = time.time()
            if DBOS.start_workflow(w, 0, 4).get_result() != 4:
                raise RuntimeError("a workflow returned something else than 4")
            out.append((time.time() - t0) * 1000)
        sys.stdout.write(json.dumps(out) + "\n")
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=5)
    return 0


# ---------------------------------------------------------------------------
# driver role
# ---------------------------------------------------------------------------

def now_ms():
    return time.time() * 1000.0


class DbosInstall:
    def __init__(self):
        from dbos import DBOS, DBOSClient
        self.tmp = tempfile.mkdtemp(prefix="tyow-peer-dbos-")
        B._DIRS.append(self.tmp)
        self.db_path = os.path.join(self.tmp, "dbos.sqlite")
        self.url = "sqlite:///" + self.db_path
        DBOS.migrate(self.url)
        self.client = DBOSClient(system_database_url=self.url)
        self.worker = None
        self._ro = None

    def db(self):
        if self._ro is None:
            self._ro = sqlite3.connect("file:%s?mode=ro" % self.db_path, uri=True, timeout=10,
                                       check_same_thread=False)
        return self._ro

    def status(self, wid):
        row = self.db().execute("SELECT status FROM workflow_status WHERE workflow_uuid = ?", (wid,)).fetchone()
        return row[0] if row else None

    def wait(self, wid, timeout=60, interval=0.001):
        st = B.wait_for(lambda: (lambda s: s if s in DONE else None)(self.status(wid)), timeout,
                        "workflow %s to finish" % wid, interval)
        if st != "SUCCESS":
            raise RuntimeError("workflow %s ended %s" % (wid, st))
        return now_ms()

    def enqueue(self, name, *args):
        return self.client.enqueue({"queue_name": QUEUE, "workflow_name": name}, *args).workflow_id

    def start_worker(self, timeout=60):
        log = open(os.path.join(self.tmp, "worker.log"), "ab")
        p = B.popen([sys.executable, os.path.abspath(__file__), "--role", "worker", "--db", self.db_path],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self.tmp)
        log.close()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"ready\n" not in buf:
            if p.poll() is not None:
                raise RuntimeError("the DBOS worker exited %s (see %s/worker.log)" % (p.returncode, self.tmp))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the DBOS worker did not get ready in %ds" % timeout)
            r, _, _ = select.select([p.stdout], [], [], min(left, 0.5))
            if r:
                buf += os.read(p.stdout.fileno(), 4096)
        self.worker = p
        return p

    def stop_worker(self):
        if self.worker is not None:
            B.kill_tree(self.worker, graceful_s=15)
            B.untrack(self.worker)
            self.worker = None

    def warm(self):
        self.wait(self.enqueue("w", 0, 4), 60)

    def close(self):
        self.stop_worker()
        if self._ro is not None:
            self._ro.close()
        try:
            self.client.destroy()
        except Exception:  # noqa: BLE001
            pass
        B.sweep([self.tmp])
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.tmp in B._DIRS:
            B._DIRS.remove(self.tmp)


def w1(inst, n, mode):
    if mode == "live":
        inst.start_worker()
        inst.warm()
    else:  # the queue must exist: a worker registers it, then goes away while the runs are stored
        inst.start_worker()
        inst.stop_worker()
    t0 = now_ms()
    ids = [inst.enqueue("w", 0, 4) for _ in range(n)]
    t_enq = now_ms()
    if mode != "live":
        inst.start_worker()
    ph = ",".join("?" * len(ids))
    q = "SELECT count(*) FROM workflow_status WHERE status IN ('SUCCESS','ERROR','CANCELLED'," \
        "'MAX_RECOVERY_ATTEMPTS_EXCEEDED') AND workflow_uuid IN (%s)" % ph
    B.wait_for(lambda: inst.db().execute(q, ids).fetchone()[0] == n, 300, "%d workflows to finish" % n, 0.01)
    t_seen = now_ms()
    bad = inst.db().execute("SELECT count(*) FROM workflow_status WHERE status != 'SUCCESS' AND workflow_uuid "
                            "IN (%s)" % ph, ids).fetchone()[0]
    if bad:
        raise RuntimeError("%d of %d workflows did not succeed" % (bad, n))
    sample = inst.client.retrieve_workflow(ids[-1]).get_result()
    if sample != 4:
        raise RuntimeError("a W1 workflow returned %r" % (sample,))
    return n / ((t_seen - t0) / 1000.0), {"elapsed_ms": t_seen - t0, "enqueue_ms": t_enq - t0}


def w2(inst, n):
    out = []
    for _ in range(n):
        t0 = now_ms()
        wid = inst.enqueue("w", 0, 4)
        out.append(inst.wait(wid, 30) - t0)
    return out


def w3(inst, n, gap_s=0.25):
    ids = []
    for i in range(n):
        ids.append(inst.enqueue("wake", i))
        time.sleep(gap_s)
    late = []
    for wid in ids:
        inst.wait(wid, 60, 0.01)
        steps = inst.client.list_workflow_steps(wid)
        wake = [s for s in steps if s["function_name"] == "DBOS.sleep"][0]["output"] * 1000.0
        b = [s for s in steps if s["function_name"].endswith("stamp")][0]["output"]
        late.append(b - wake)
    return late


def per_step(inst, steps):
    t0 = now_ms()
    wid = inst.enqueue("w", 0, steps)
    t1 = inst.wait(wid, 300, 0.002)
    out = inst.client.retrieve_workflow(wid).get_result()
    if out != steps:
        raise RuntimeError("the %d-step workflow returned %r" % (steps, out))
    return (t1 - t0) / steps


def w4(inst, step_ms=3000, kill_after_s=1.0):
    marker = os.path.join(inst.tmp, "w4-%d.marker" % time.time_ns())
    inst.start_worker()
    wid = inst.enqueue("long", marker, step_ms)
    first = B.wait_for(lambda: os.path.exists(marker) and open(marker).read().split(), 60, "the long step")
    delay = int(first[0]) / 1000.0 + kill_after_s - time.time()
    if delay > 0:
        time.sleep(delay)
    old = inst.worker
    t_kill = now_ms()
    os.killpg(old.pid, signal.SIGKILL)
    inst.worker = None
    inst.start_worker()
    old.wait(10)
    B.untrack(old)
    fin = inst.wait(wid, 120, 0.002)
    stamps = open(marker).read().split()
    restep = int(stamps[1]) - t_kill if len(stamps) > 1 else float("nan")
    inst.stop_worker()
    return fin - t_kill - step_ms, restep


def w2_inproc(n):
    """Run inproc_main in a child on a database of its own; returns its latencies."""
    import json
    tmp = tempfile.mkdtemp(prefix="tyow-peer-dbos-")
    B._DIRS.append(tmp)
    try:
        p = B.popen([sys.executable, os.path.abspath(__file__), "--role", "inproc", "--db",
                     os.path.join(tmp, "dbos.sqlite"), "--w2-runs", str(n)], stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp)
        try:
            out, err = p.communicate(timeout=120)
        finally:
            B.kill_tree(p)
            B.untrack(p)
        if p.returncode != 0:
            raise RuntimeError("the in-process run exited %s: %s" % (p.returncode, err.decode()[-300:]))
        return json.loads(out.decode().strip().splitlines()[-1])
    finally:
        B.sweep([tmp])
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        B._DIRS.remove(tmp)


def cli(inst, n=10):
    dbos_cli = os.path.join(os.path.dirname(sys.executable), "dbos")

    def timed(argv):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            p = B.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        cwd=inst.tmp)
            try:
                _, err = p.communicate(timeout=60)
            finally:
                B.untrack(p)
            out.append((time.perf_counter() - t0) * 1000)
            if p.returncode != 0:
                raise RuntimeError("%s exited %d: %s" % (argv, p.returncode, err.decode()[-300:]))
        return out
    c = timed([dbos_cli, "workflow", "list", "-s", inst.url])
    b = timed([sys.executable, "-c", "0"])
    return B.median(c), B.median(b)


def idle(inst, seconds):
    pid = inst.worker.pid
    time.sleep(1.0)
    c0, _, _ = B.tree_usage(pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    c1, rss, count = B.tree_usage(pid)
    return 100.0 * (c1 - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0), rss / 1024.0, count


def run_rep(res, args, rep):
    say = lambda s: print("  [dbos rep %d] %s" % (rep, s), flush=True)  # noqa: E731
    g = B.guarded
    if "W1" in args.only:
        inst = DbosInstall()
        try:
            out = g(res, ["w1_default"], w1, inst, args.w1_runs, args.w1_mode)
            if out:
                res.add("w1_default", out[0], raw=out[1])
                say("W1: %.1f runs/s (%d in %.0f ms, enqueue %.0f ms)" % (out[0], args.w1_runs,
                                                                          out[1]["elapsed_ms"], out[1]["enqueue_ms"]))
        finally:
            inst.close()
    if {"W2", "steps", "W3", "cli", "idle"} & set(args.only):
        inst = DbosInstall()
        try:
            ok = g(res, ["w2_latency"], lambda: (inst.start_worker(), inst.warm(), True)[-1])
            if ok and "W2" in args.only:
                lat = g(res, ["w2_latency"], w2, inst, args.w2_runs)
                if lat:
                    res.add("w2_latency", B.median(lat), raw={"observed_ms": lat})
                    say("W2: median %.1f ms (min %.1f, max %.1f)" % (B.median(lat), min(lat), max(lat)))
            if "W2" in args.only:
                lat = g(res, ["w2_inproc"], w2_inproc, args.w2_runs)
                if lat:
                    res.add("w2_inproc", B.median(lat), raw={"observed_ms": lat})
                    say("W2 in-process (DBOS.start_workflow + get_result): median %.1f ms" % B.median(lat))
            if ok and "steps" in args.only:
                for steps in (200, 2000):
                    v = g(res, ["step_%d" % steps], per_step, inst, steps)
                    if v is not None:
                        res.add("step_%d" % steps, v)
                        say("%d steps: %.2f ms/step" % (steps, v))
            if ok and "W3" in args.only:
                late = g(res, ["w3_late_median", "w3_late_max", "w3_early"], w3, inst, args.w3_runs)
                if late:
                    early = sum(1 for v in late if v < 0)
                    res.add("w3_late_median", B.median(late), raw=late)
                    res.add("w3_late_max", max(late))
                    res.add("w3_early", early)
                    say("W3: lateness median %.1f ms, max %.1f, early %d" % (B.median(late), max(late), early))
            if ok and "idle" in args.only:
                out = g(res, ["idle_cpu", "idle_rss", "idle_procs"], idle, inst, args.idle_seconds)
                if out:
                    res.add("idle_cpu", out[0])
                    res.add("idle_rss", out[1])
                    res.add("idle_procs", out[2])
                    say("idle: %.2f%% CPU, RSS %.1f MiB in %d processes" % out)
            if "cli" in args.only:
                out = g(res, ["cli_cold", "cli_base", "cli_ratio"], cli, inst)
                if out:
                    res.add("cli_cold", out[0])
                    res.add("cli_base", out[1])
                    res.add("cli_ratio", out[0] / out[1])
                    say("cli: dbos workflow list %.1f ms, python -c 0 %.1f ms, x%.2f" % (out[0], out[1],
                                                                                        out[0] / out[1]))
        finally:
            inst.close()
    if "W4" in args.only:
        inst = DbosInstall()
        try:
            out = g(res, ["w4_recovery", "w4_restep"], w4, inst)
            if out:
                res.add("w4_recovery", out[0])
                res.add("w4_restep", out[1])
                say("W4: recovery %.0f ms (step running again %.0f ms after the kill)" % out)
        finally:
            inst.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=("driver", "worker", "inproc"), default="driver")
    ap.add_argument("--db", help="(worker) the SQLite system database file")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="W1,W2,W3,W4,steps,cli,idle")
    ap.add_argument("--w1-runs", type=int, default=500)
    ap.add_argument("--w1-mode", choices=("live", "enqueue"), default="live")
    ap.add_argument("--w2-runs", type=int, default=20)
    ap.add_argument("--w3-runs", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.role == "worker":
        return worker_main(args.db)
    if args.role == "inproc":
        return inproc_main(args.db, args.w2_runs)
    if args.quick:
        args.reps, args.w1_runs, args.idle_seconds = 1, 100, 5.0
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    import dbos
    from importlib.metadata import version
    atexit.register(B.cleanup_all)
    signal.signal(signal.SIGTERM, B._on_sigterm)
    meta = dict(B.machine_meta(), dbos=version("dbos"), reps=args.reps, w1_mode=args.w1_mode,
                w1_runs=args.w1_runs)
    setup = ("dbos %s, SQLite system database; worker process (DBOS.launch, register_queue defaults: no "
             "concurrency limit, 1 s polling) + DBOSClient.enqueue from the driver; W1 %s mode"
             % (meta["dbos"], args.w1_mode))
    res = B.Results("DBOS", {"setup": setup})
    print("DBOS bench: dbos %s (%s), python %s; %d rep(s)" % (meta["dbos"], os.path.dirname(dbos.__file__),
                                                              meta["python"], args.reps), flush=True)
    t_start = time.monotonic()
    try:
        for rep in range(1, args.reps + 1):
            run_rep(res, args, rep)
    except KeyboardInterrupt:
        print("\ninterrupted; printing what was measured", file=sys.stderr)
    finally:
        B.cleanup_all()
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    systems = [(res.name, res.to_json())]
    print("\nresults (%.0f s):" % meta["elapsed_s"])
    B.print_table(systems)
    if args.json:
        B.write_json(args.json, systems, meta)
        print("wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
