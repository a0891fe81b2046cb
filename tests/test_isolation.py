"""A shared warm worker never shares fates: whatever one run does to its worker, other runs pay
nothing but time.

- a step that kills its worker (exit, out of memory) fails alone; the runs that were in flight
  with it complete, with no attempt counted;
- a worker that logs heavily while it is fed large pass documents keeps going (no deadlock);
- a Python worker never holds more passes than its slots;
- a pass still waiting for a worker slot can be canceled before its step starts, and its wait
  does not count towards its timeout.
"""
import os
import threading
import time
import unittest
from unittest import mock

from tests.util import HAVE_NODE, TempHome, kill_strays, read_counter, tow, wait_for

# One step that notes it started, then waits for input.gate.
GATED = {
    "node": """
const fs = require("fs");
async function workflow(input, { step }) {
  return await step("wait", async () => {
    fs.appendFileSync(input.counter, input.tag + "\\n");
    while (!fs.existsSync(input.gate)) await new Promise((r) => setTimeout(r, 20));
    return input.tag;
  });
}
""",
    "python": """
import os, time
def wait(input):
    with open(input["counter"], "a") as f:
        f.write(input["tag"] + "\\n")
    while not os.path.exists(input["gate"]):
        time.sleep(0.02)
    return input["tag"]

def workflow(input, ctx):
    return ctx.step("wait", lambda: wait(input))
""",
}

# A step that kills the process it runs in, every time.
EXIT = {
    "node": """
async function workflow(input, { step }) {
  return await step("boom", () => { process.exit(1); },
                    { retry: { maxAttempts: 3, initialInterval: 100 } });
}
""",
    "python": """
import os
def workflow(input, ctx):
    return ctx.step("boom", lambda: os._exit(1), retry={"max_attempts": 3, "initial": 0.1})
""",
}

# A step that allocates without bound.
HOG = {
    "node": """
async function workflow(input, { step }) {
  return await step("hog", () => { const a = []; for (;;) a.push(new Array(1e6).fill(1)); },
                    { retry: { maxAttempts: 2, initialInterval: 100 } });
}
""",
    "python": """
def hog():
    a = []
    while True:
        a.append(bytearray(8 * 1024 * 1024))

def workflow(input, ctx):
    return ctx.step("hog", hog, retry={"max_attempts": 2, "initial": 0.1})
""",
}

# Logs in bursts (yielding between them) until input.gate exists.
NOISY = """
const fs = require("fs");
async function workflow(input, { step }) {
  return await step("noise", async () => {
    const line = "x".repeat(120);
    let n = 0;
    while (!fs.existsSync(input.gate)) {
      for (let i = 0; i < 3000; i++) console.log(line + " " + n++);
      await new Promise((r) => setImmediate(r));
    }
    return n;
  });
}
"""

BIG = """
async function workflow(input, { step }) {
  return await step("size", () => input.blob.length);
}
"""

# Notes each start of its step; the first attempt hangs (input.hang: a file that never appears).
HANG_ONCE = """
import os, time
def work(input):
    with open(input["counter"], "a") as f:
        f.write("started\\n")
    with open(input["counter"]) as f:
        if len(f.read().splitlines()) == 1:
            while not os.path.exists(input["hang"]):
                time.sleep(0.05)
    return "ok"

def workflow(input, ctx):
    return ctx.step("work", lambda: work(input), retry={"max_attempts": 3, "initial": 0.1})
"""


class IsolationCase(TempHome):
    runtime = "node"
    extra_config = "concurrency: 1\n"  # one warm worker: every pass shares it

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.loops = []

    def tearDown(self):
        for sched, loop in self.loops:
            sched.stop(hurry=True)
        for sched, loop in self.loops:
            loop.join(12)
        kill_strays(self.tmp)  # a wedged worker must not hold the tear-down
        for sched, loop in self.loops:
            loop.join(20)
        super().tearDown()

    def serve_in_thread(self, sc, concurrency):
        sched = tow.Scheduler(sc, kind="serve", concurrency=concurrency)
        loop = threading.Thread(target=sched.loop, daemon=True)
        loop.start()
        self.loops.append((sched, loop))
        return sched

    def finished(self, sc, run_id, timeout=30):
        def ended():
            st = sc.status(run_id)
            return st if st["status"] in tow.TERMINAL else None
        return wait_for(ended, timeout=timeout, what="run %s to end" % run_id)

    def gated_runs(self, sc, sched, n, counter, gate):
        sc.deploy("gated", GATED[self.runtime], runtime=self.runtime)
        runs = [sc.start("gated", {"tag": "g%d" % i, "counter": counter, "gate": gate},
                         drive=False)["id"] for i in range(n)]
        sched.wake()
        wait_for(lambda: len(read_counter(counter)) >= n, what="%d gated steps to start" % n)
        return runs

    def assert_spared(self, sc, runs, gate):
        """The gated runs complete, each with one attempt of its step counted."""
        with open(gate, "w"):
            pass
        for run_id in runs:
            st = self.finished(sc, run_id)
            self.assertEqual(st["status"], "completed", st)
            self.assertEqual([s["attempts"] for s in st["steps"]], [1], st)

    def culprit_fails_alone(self, code, name, expected):
        sc = self.sidecar(clock=False)
        counter, gate = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "gate")
        sched = self.serve_in_thread(sc, concurrency=4)
        runs = self.gated_runs(sc, sched, 3, counter, gate)
        sc.deploy(name, code[self.runtime], runtime=self.runtime)
        culprit = sc.start(name, {}, drive=False)["id"]
        sched.wake()
        st = self.finished(sc, culprit, timeout=60)
        self.assertEqual(st["status"], "failed", st)
        self.assertIn(expected, st["error"]["message"], st)
        for run_id in runs:  # the worker died under them, maybe more than once: not their failure
            self.assertNotEqual(sc.status(run_id)["status"], "failed")
        self.assert_spared(sc, runs, gate)
        self.assertEqual(sorted(read_counter(counter)), ["g0", "g0", "g1", "g1", "g2", "g2"])
        self.assertEqual([sc.status(r)["isolated"] for r in runs + [culprit]], [True] * 4)


class NodeCrashFailsOnlyItsRun(IsolationCase):
    def test_a_step_that_exits_its_worker_fails_alone(self):
        self.culprit_fails_alone(EXIT, "boom", "exited with status 1")


class PythonCrashFailsOnlyItsRun(NodeCrashFailsOnlyItsRun):
    runtime = "python"


class NodeOutOfMemoryFailsOnlyItsRun(IsolationCase):
    extra_config = "concurrency: 1\nlimits:\n  pass_memory: 200MiB\n"

    def test_a_pass_over_its_memory_fails_alone_and_says_so(self):
        self.culprit_fails_alone(HOG, "hog", "ran out of memory (limits.pass_memory: 200MiB)")


class PythonOutOfMemoryFailsOnlyItsRun(NodeOutOfMemoryFailsOnlyItsRun):
    runtime = "python"


class NoDeadlock(IsolationCase):
    def test_a_noisy_pass_and_large_pass_documents_share_a_worker(self):
        sc = self.sidecar(clock=False)
        sc.deploy("noisy", NOISY, runtime="node")
        sc.deploy("big", BIG, runtime="node")
        gate = os.path.join(self.tmp, "gate")
        sched = self.serve_in_thread(sc, concurrency=6)
        noisy = sc.start("noisy", {"gate": gate}, drive=False)["id"]
        sched.wake()
        wait_for(lambda: sc.status(noisy)["steps"], what="the noisy step to start")
        blob = "b" * 1000000  # just under limits.max_input_bytes
        bigs = [sc.start("big", {"blob": blob, "n": i}, drive=False)["id"] for i in range(4)]
        sched.wake()
        for run_id in bigs:  # while the noisy pass still logs
            st = self.finished(sc, run_id, timeout=20)
            self.assertEqual((st["status"], st["output"]), ("completed", 1000000), st["status"])
        self.assertEqual(sc.status(noisy)["status"], "running")
        with open(gate, "w"):
            pass
        self.assertEqual(self.finished(sc, noisy, timeout=20)["status"], "completed")


class _Worker:
    """Stands in for a WarmWorker: it takes a while to start, and records what it is given."""

    def __init__(self, pool, argv, env, cwd, address_space):
        time.sleep(0.2)  # requests pile up while a worker starts
        self.pool = pool
        self.passes = {}
        self.reserved = 0
        self.served = 0
        self.draining = False
        self.dead = None
        self.idle_since = time.monotonic()
        self.most = 0

    @property
    def load(self):
        return len(self.passes) + self.reserved

    def submit(self, execution, code_path, doc):
        with self.pool._lock:
            self.passes[execution.pass_id] = execution
            self.reserved = max(0, self.reserved - 1)
            self.most = max(self.most, len(self.passes))

    def close(self):
        pass


class _Registry(list):
    """pool.workers, noting each worker's load at the moment it becomes visible to others."""

    def __init__(self):
        super().__init__()
        self.loads_seen = []

    def append(self, worker):
        self.loads_seen.append(worker.load)
        super().append(worker)


class _Adapter:
    config = {"concurrency": 8, "adapters.exec.timeout": None, "limits.pass_memory": None}
    work_dir = "/nonexistent"

    def worker_argv(self, runtime):
        return ["true"]

    def worker_env(self):
        return {}

    def address_space(self, runtime):
        return None


class PythonWorkerSlots(unittest.TestCase):
    def test_a_fresh_worker_is_reserved_before_anyone_else_sees_it(self):
        with mock.patch.object(tow, "WarmWorker", _Worker):
            pool = tow.WorkerPool(_Adapter(), "python")
            self.addCleanup(pool.close)
            pool.workers = _Registry()
            n = pool.size * pool.slots
            specs = [tow.PassSpec({"pass_id": "p%d" % i, "run_id": "r%d" % i},
                                  {"runtime": "python"}) for i in range(n)]
            threads = [threading.Thread(target=pool.run, args=(spec, "code", {}), daemon=True)
                       for spec in specs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            self.assertFalse(any(t.is_alive() for t in threads), "a request never got a worker")
        workers = list(pool.workers)
        self.assertEqual(sum(len(w.passes) for w in workers), n)
        self.assertLessEqual(max(w.most for w in workers), tow.PYTHON_WORKER_SLOTS)
        self.assertNotIn(0, pool.workers.loads_seen,
                         "a new worker was visible as idle before its requester had it")


class WaitingForASlot(IsolationCase):
    runtime = "python"  # a Python worker has slots: a fifth pass waits for one

    def test_a_pass_canceled_while_it_waits_for_a_slot_never_starts_its_step(self):
        sc = self.sidecar(clock=False)
        counter, gate = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "gate")
        sched = self.serve_in_thread(sc, concurrency=5)
        runs = self.gated_runs(sc, sched, tow.PYTHON_WORKER_SLOTS, counter, gate)
        late_counter = os.path.join(self.tmp, "late.txt")
        late = sc.start("gated", {"tag": "late", "counter": late_counter, "gate": gate},
                        drive=False)["id"]
        sched.wake()
        wait_for(lambda: sc.status(late)["status"] == "running",
                 what="the fifth pass to wait for a slot")
        time.sleep(0.5)
        sc.cancel(late)
        time.sleep(0.5)  # the scheduler sees the cancel while the pass still waits
        with open(gate, "w"):
            pass
        for run_id in runs:
            self.assertEqual(self.finished(sc, run_id)["status"], "completed")
        time.sleep(1.0)  # long enough for a pass that was not stopped to run its step
        self.assertEqual(read_counter(late_counter), [])
        self.assertEqual(sc.status(late)["status"], "canceled")


class WaitIsNotTimedOut(IsolationCase):
    runtime = "python"

    def test_the_timeout_counts_from_when_the_pass_starts_not_from_its_wait(self):
        sc = self.sidecar(clock=False)
        counter, gate = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "gate")
        sched = self.serve_in_thread(sc, concurrency=5)
        runs = self.gated_runs(sc, sched, tow.PYTHON_WORKER_SLOTS, counter, gate)
        # Passes from now on time out after 3s (the gated ones keep their 60s).
        sc.adapter("exec").config.values["adapters.exec.timeout"] = 3000
        sc.deploy("hang", HANG_ONCE, runtime="python")
        late_counter = os.path.join(self.tmp, "late.txt")
        late = sc.start("hang", {"counter": late_counter, "hang": os.path.join(self.tmp, "never")},
                        drive=False)["id"]
        sched.wake()
        time.sleep(4.0)  # past the timeout, still waiting for a slot
        self.assertEqual(read_counter(late_counter), [])
        with open(gate, "w"):
            pass
        for run_id in runs:
            self.assertEqual(self.finished(sc, run_id)["status"], "completed")
        # It starts now; its first attempt hangs, times out three seconds later, and is retried.
        st = self.finished(sc, late, timeout=20)
        self.assertEqual((st["status"], st["output"]), ("completed", "ok"), st)
        self.assertEqual(read_counter(late_counter), ["started", "started"])
        self.assertEqual([s["attempts"] for s in st["steps"]], [2], st)


if __name__ == "__main__":
    unittest.main()


# Leaves a timer behind that kills the worker after the pass has ended.
STRAGGLER = """
async function workflow(input, { step }) {
  return await step("arm", () => { setTimeout(() => process.exit(7), input.after_ms); return 1; });
}
"""

# A step that never yields: only killing its worker stops it.
BUSY = """
async function workflow(input, { step }) {
  return await step("spin", () => { for (;;) {} });
}
"""


class WhatAnEarlierPassLeftBehind(IsolationCase):
    def test_a_worker_killed_by_a_finished_pass_charges_nobody(self):
        """An earlier pass's timer kills the worker while another run is alone in it."""
        sc = self.sidecar(clock=False)
        sc.deploy("straggler", STRAGGLER, runtime="node")
        sched = self.serve_in_thread(sc, concurrency=1)
        counter, gate = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "gate")
        armed = sc.start("straggler", {"after_ms": 1500}, drive=False)["id"]
        sched.wake()
        self.assertEqual(self.finished(sc, armed)["status"], "completed")
        runs = self.gated_runs(sc, sched, 1, counter, gate)  # alone in the armed worker
        wait_for(lambda: sc.status(runs[0])["isolated"], timeout=20,
                 what="the timer to kill the worker under the gated run")
        self.assertNotEqual(sc.status(runs[0])["status"], "failed")
        self.assert_spared(sc, runs, gate)


class AKnownCulprit(IsolationCase):
    def test_bystanders_of_a_pass_killed_for_a_cancel_are_not_isolated(self):
        sc = self.sidecar(clock=False)
        counter, gate = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "gate")
        sched = self.serve_in_thread(sc, concurrency=4)
        runs = self.gated_runs(sc, sched, 2, counter, gate)
        sc.deploy("busy", BUSY, runtime="node")
        busy = sc.start("busy", {}, drive=False)["id"]
        sched.wake()
        wait_for(lambda: sc.status(busy)["steps"], what="the busy step to start")
        sc.cancel(busy)  # the worker cannot answer: it is killed for that pass
        self.assertEqual(self.finished(sc, busy)["status"], "canceled")
        self.assert_spared(sc, runs, gate)
        self.assertEqual([sc.status(r)["isolated"] for r in runs], [False, False])


class CancelBeforeItReachesItsWorker(IsolationCase):
    runtime = "python"

    def test_a_pass_canceled_between_getting_a_worker_and_reaching_it_never_runs(self):
        sc = self.sidecar(clock=False)
        sc.deploy("gated", GATED["python"], runtime="python")
        counter, gate = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "gate")
        run = sc.start("gated", {"tag": "g", "counter": counter, "gate": gate}, drive=False)
        adapter = sc.adapter("exec")
        pool = adapter.pool("python")
        doc = {"protocol": tow.PROTOCOL_VERSION, "pass_id": "pass_x", "run_id": run["id"],
               "workflow_id": "gated", "version": run["version"], "version_label": "1.0.0",
               "attempt": 1, "input": run["input"], "now": tow.now_ms(),
               "history": sc.store.history(run["id"]), "inline_sleep_ms": 1000,
               "max_output_bytes": 1 << 20, "max_steps": 100, "callback_url": None}
        spec = tow.PassSpec(doc, sc.store.get_version("gated", run["version"]))
        execution = tow.WarmExecution(pool, spec, None)
        worker = pool._worker(execution)  # it has its worker; its document is not queued yet
        time.sleep(1.5)  # the worker is up: a pass that reached it would start at once
        execution.cancel()
        worker.submit(execution, adapter._code(spec), doc)
        self.assertEqual(execution.finish(grace_s=2), "the pass was stopped")
        self.assertNotIn("pass_x", worker.passes)
        self.assertEqual(worker.load, 0)
        time.sleep(0.5)
        self.assertEqual(read_counter(counter), [])  # its step never ran


class ARuntimeThatCannotStart(IsolationCase):
    runtime = "python"

    def test_a_worker_that_dies_before_it_is_ready_charges_its_passes(self):
        """A runtime that cannot start (a bad interpreter, option or memory limit) costs each
        pass an attempt, as a process per pass would: no pass is given back for free, forever."""
        fake = os.path.join(self.tmp, "python3-broken")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho 'cannot start: a bad option' >&2\nexit 1\n")
        os.chmod(fake, 0o755)
        sc = self.sidecar(clock=False)
        sc.deploy("one", "def workflow(input, ctx):\n    return ctx.step('a', lambda: 1)\n",
                  runtime="python")
        sc.config.values["adapters.exec.python"] = fake  # what a typo'd path would give
        run = sc.start("one", {"pad": "x" * 300000}, drive=False)["id"]  # past a pipe's buffer
        self.serve_in_thread(sc, concurrency=1)
        time.sleep(4)
        st = sc.status(run)
        self.assertLessEqual(st["passes"], 5, "the pass was given back %d times" % st["passes"])
        self.assertIn("exited with status 1: cannot start: a bad option",
                      st["last_pass"]["reason"])
