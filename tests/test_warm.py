"""Warm workers (adapters.exec.mode: warm): shared processes, never shared results.

- passes running at once in one worker keep their prints apart (`logs` never shows another run's);
- a worker busy in a loop that cannot answer a cancel is killed, and the other pass it ran is
  given back at no cost (its step's attempt is not counted) without re-running its committed steps;
- workers are reused (no more of them than the pool's size) and idle ones exit.
"""
import os
import threading
import time
import unittest

from tests.util import HAVE_NODE, TempHome, read_counter, tow, wait_for

CHATTY = {
    "node": """
async function workflow(input, { step }) {
  for (let i = 0; i < 20; i++) {
    console.log("line " + i + " of " + input.tag);
    await step("s" + i, async () => { await new Promise((r) => setTimeout(r, 2)); process.stdout.write(input.tag + "\\n"); return i; });
  }
  return input.tag;
}
""",
    "python": """
import time
def workflow(input, ctx):
    for i in range(20):
        print("line %d of %s" % (i, input["tag"]))
        ctx.step("s%d" % i, lambda i=i: (time.sleep(0.002), print(input["tag"]), i)[2])
    return input["tag"]
""",
}

# Two steps: "first" is committed; "second" waits on a file, so the pass is in flight while the test acts.
GATED = {
    "node": """
const fs = require("fs");
function mark(path, what) { fs.appendFileSync(path, what + "\\n"); return what; }
async function workflow(input, { step }) {
  await step("first", () => mark(input.counter, "first"));
  return await step("second", async () => {
    mark(input.counter, "second");
    while (!fs.existsSync(input.gate)) await new Promise((r) => setTimeout(r, 20));
    return "done";
  });
}
""",
}

SPIN = """
const fs = require("fs");
async function workflow(input, { step }) {
  return await step("spin", () => { fs.appendFileSync(input.counter, "spin\\n"); for (;;) {} });
}
"""


class WarmCase(TempHome):
    runtime = "node"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()

    def serve_in_thread(self, sc, concurrency=8):
        sched = tow.Scheduler(sc, kind="serve", concurrency=concurrency)
        loop = threading.Thread(target=sched.loop, daemon=True)
        loop.start()
        self.addCleanup(lambda: (sched.stop(hurry=True), loop.join(20)))
        return sched

    def finished(self, sc, run_id, timeout=30):
        return wait_for(lambda: (lambda st: st if st["status"] in tow.TERMINAL else None)(sc.status(run_id)),
                        timeout=timeout, what="run %s to end" % run_id)


class NodeLogsStayApart(WarmCase):
    def test_concurrent_passes_in_one_worker_keep_their_prints_apart(self):
        self.write_config(extra="concurrency: 1\n")  # one worker for sure, several passes at once in it
        sc = self.sidecar(clock=False)
        sc.deploy("chatty", CHATTY[self.runtime], runtime=self.runtime)
        runs = [sc.start("chatty", {"tag": "tag-%d" % i}, drive=False)["id"] for i in range(4)]
        sched = self.serve_in_thread(sc, concurrency=4)
        sched.wake()
        for run_id in runs:
            self.assertEqual(self.finished(sc, run_id)["status"], "completed")
        self.assertEqual(len(sc.adapter("exec").workers()[self.runtime]), 1)
        for i, run_id in enumerate(runs):
            text = "".join(r["text"] for r in sc.logs(run_id))
            mine = "tag-%d" % i
            self.assertIn("line 19 of " + mine, text)
            others = [t for t in ("tag-%d" % j for j in range(4)) if t != mine and t in text]
            self.assertEqual(others, [], "run %s's log holds another run's prints" % mine)


class PythonLogsStayApart(NodeLogsStayApart):
    runtime = "python"


class NodeBusyWorker(WarmCase):
    def test_a_worker_too_busy_to_cancel_is_killed_and_its_other_pass_given_back(self):
        self.write_config(extra="concurrency: 1\n")  # one worker: both passes share it
        sc = self.sidecar(clock=False)
        sc.deploy("gated", GATED["node"], runtime="node")
        sc.deploy("spin", SPIN, runtime="node")
        counter, spin_counter = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "spin.txt")
        gate = os.path.join(self.tmp, "gate")
        gated = sc.start("gated", {"counter": counter, "gate": gate}, drive=False)["id"]
        sched = self.serve_in_thread(sc, concurrency=2)
        sched.wake()
        wait_for(lambda: "second" in read_counter(counter), what="the gated step to start")
        spin = sc.start("spin", {"counter": spin_counter}, drive=False)["id"]
        sched.wake()
        wait_for(lambda: read_counter(spin_counter), what="the busy loop to start")
        t0 = time.time()
        first_pass = sc.status(gated)["passes"]
        sc.cancel(spin)
        # The worker cannot answer (its only thread spins): it is killed, the gated pass with it,
        # and that pass is given back at once (a new pass of the run starts).
        wait_for(lambda: sc.status(gated)["passes"] > first_pass, timeout=10,
                 what="the gated pass to be lost")
        self.assertLess(time.time() - t0, 8)
        with open(gate, "w"):
            pass
        st = self.finished(sc, gated)
        self.assertEqual((st["status"], st["output"]), ("completed", "done"), st)
        self.assertEqual(read_counter(counter), ["first", "second", "second"])  # first ran once
        # Its pass died for another run's doing: not counted as a failed attempt of "second".
        self.assertEqual([s["attempts"] for s in st["steps"]], [1, 1], st)
        self.assertEqual(sc.status(spin)["status"], "canceled")


class WorkersAreReused(WarmCase):
    def test_many_runs_use_no_more_workers_than_the_pool_and_idle_ones_exit(self):
        sc = self.sidecar(clock=False)
        sc.deploy("chatty", CHATTY["node"], runtime="node")
        runs = [sc.start("chatty", {"tag": "t%d" % i}, drive=False)["id"] for i in range(12)]
        pids = set()
        old_idle = tow.WORKER_IDLE_S
        tow.WORKER_IDLE_S = 1.5
        self.addCleanup(setattr, tow, "WORKER_IDLE_S", old_idle)
        sched = self.serve_in_thread(sc)
        sched.wake()
        for run_id in runs:
            pids.update(sc.adapter("exec").workers().get("node", []))
            self.finished(sc, run_id)
        size = tow.WorkerPool(sc.adapter("exec"), "node").size
        self.assertLessEqual(len(pids), size)
        wait_for(lambda: not sc.adapter("exec").workers().get("node"), timeout=10, what="idle workers to exit")
        for pid in pids:
            wait_for(lambda: not os.path.exists("/proc/%d" % pid) or open("/proc/%d/stat" % pid).read()
                     .rsplit(")", 1)[1].split()[0] == "Z", timeout=5, what="worker %d to exit" % pid)


if __name__ == "__main__":
    unittest.main()
