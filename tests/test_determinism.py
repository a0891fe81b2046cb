"""The determinism guard: on replay the n-th durable call must be the n-th one recorded.

A workflow that branches outside its steps (here: on a file that appears while the run sleeps)
fails at once with NonDeterministicWorkflow, naming both calls and the position, and the
mismatched step's function never runs. Concurrent steps (Promise.all) replay fine.
"""
import os
import unittest

from tests.util import HAVE_NODE, TempHome, read_counter

BRANCHY = {
    "node": """
const fs = require("fs");
function mark(path, what) { fs.appendFileSync(path, what + "\\n"); return what; }
async function workflow(input, { step, sleep }) {
  await step("first", () => mark(input.counter, "first"));
  if (fs.existsSync(input.flag)) {
    await step("other", () => mark(input.counter, "other"));
  } else {
    await step("usual", () => mark(input.counter, "usual"));
  }
  await sleep("nap", "5s");
  return await step("last", () => mark(input.counter, "last"));
}
""",
    "python": """
import os
def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")
    return what

def workflow(input, ctx):
    ctx.step("first", lambda: mark(input["counter"], "first"))
    if os.path.exists(input["flag"]):
        ctx.step("other", lambda: mark(input["counter"], "other"))
    else:
        ctx.step("usual", lambda: mark(input["counter"], "usual"))
    ctx.sleep("nap", "5s")
    return ctx.step("last", lambda: mark(input["counter"], "last"))
""",
}


class NodeGuard(TempHome):
    runtime = "node"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()

    def start(self, sc):
        sc.deploy("branchy", BRANCHY[self.runtime], runtime=self.runtime)
        self.counter, self.flag = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "flag")
        return sc.start("branchy", {"counter": self.counter, "flag": self.flag}, drive=False)["id"]

    def test_a_replay_that_takes_another_path_fails_at_once(self):
        sc = self.sidecar()
        run_id = self.start(sc)
        sc.tick()
        self.assertEqual(sc.status(run_id)["status"], "sleeping")
        open(self.flag, "w").close()  # the code now branches the other way on replay
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "failed", st)
        self.assertEqual(st["error"]["name"], "NonDeterministicWorkflow", st["error"])
        message = st["error"]["message"]
        for part in ("#2", "other", "usual"):
            self.assertIn(part, message)
        self.assertEqual(read_counter(self.counter), ["first", "usual"], "the mismatched step ran")
        self.assertEqual(st["passes"], 2, "a non-deterministic replay must not be retried")

    def test_the_same_path_replays_and_completes(self):
        sc = self.sidecar()
        run_id = self.start(sc)
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", "last"), st)
        self.assertEqual(read_counter(self.counter), ["first", "usual", "last"])


class PythonGuard(NodeGuard):
    runtime = "python"


if __name__ == "__main__":
    unittest.main()
