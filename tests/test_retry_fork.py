"""retry and fork: a failed run resumes from its failed step once the cause is fixed; fork replays history."""
import json
import os
import unittest

from tests.util import HAVE_NODE, TempHome, read_counter

# Step "b" fails while input.flag is missing; every step body marks the counter when it runs.
FLAKY = {
    "python": """
import os
def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")
    return what

def need(flag):
    if not os.path.exists(flag):
        raise RuntimeError("the flag is missing")
    return "b"

def workflow(input, ctx):
    a = ctx.step("a", lambda: mark(input["counter"], "a"))
    b = ctx.step("b", lambda: (mark(input["counter"], "b"), need(input["flag"]))[1], max_attempts=2, initial="1ms")
    c = ctx.step("c", lambda: mark(input["counter"], "c"))
    return [a, b, c, input.get("extra")]
""",
    "node": """
const fs = require("fs");
function mark(path, what) { fs.appendFileSync(path, what + "\\n"); return what; }
async function workflow(input, { step }) {
  const a = await step("a", () => mark(input.counter, "a"));
  const b = await step("b", () => { mark(input.counter, "b"); if (!fs.existsSync(input.flag)) throw new Error("the flag is missing"); return "b"; },
                       { retry: { maxAttempts: 2, initialInterval: "1ms" } });
  const c = await step("c", () => mark(input.counter, "c"));
  return [a, b, c, input.extra === undefined ? null : input.extra];
}
""",
}


class PythonRetryFork(TempHome):
    runtime = "python"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("flaky", FLAKY[self.runtime], runtime=self.runtime)
        self.counter, self.flag = os.path.join(self.tmp, "c.txt"), os.path.join(self.tmp, "flag")

    def failed_run(self):
        run_id = self.sc.start("flaky", {"counter": self.counter, "flag": self.flag}, drive=False)["id"]
        st = self.drive(self.sc, run_id)
        self.assertEqual(st["status"], "failed", st)
        self.assertEqual(read_counter(self.counter), ["a", "b", "b"])
        return run_id

    def test_retry_resumes_from_the_failed_step_once_the_cause_is_fixed(self):
        run_id = self.failed_run()
        open(self.flag, "w").close()
        code, out, err = self.cli("retry", run_id)
        self.assertEqual(code, 0, err)
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", ["a", "b", "c", None]), st)
        self.assertEqual(read_counter(self.counter), ["a", "b", "b", "b", "c"])  # "a" never ran again
        self.assertEqual(st["retries"], 1)
        self.assertEqual([s["attempts"] for s in st["steps"] if s["name"] == "b"], [1])  # attempts start again

    def test_retry_latest_runs_the_newest_version(self):
        run_id = self.failed_run()
        fixed = FLAKY[self.runtime].replace("the flag is missing", "still missing").replace(
            "need(input[\"flag\"])", "\"fixed\"").replace(
            "if (!fs.existsSync(input.flag)) throw new Error(\"still missing\"); return \"b\";", "return \"fixed\";")
        self.assertNotEqual(fixed, FLAKY[self.runtime])
        self.sc.deploy("flaky", fixed, runtime=self.runtime)
        code, out, err = self.cli("retry", run_id, "--latest", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["version"], 2)
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["output"][1]), ("completed", "fixed"), st)

    def test_retry_refuses_what_makes_no_sense_and_changes_nothing(self):
        run_id = self.sc.start("flaky", {"counter": self.counter, "flag": self.flag}, drive=False)["id"]
        self.assert_refused(["retry", run_id], 1, "only a failed or canceled run can be retried")
        self.assert_refused(["retry", "run_nosuchrun"], 1, "no run")
        open(self.flag, "w").close()
        self.drive(self.sc, run_id)
        self.assert_refused(["retry", run_id], 1, "fork it")

    def test_fork_replays_the_committed_history_and_runs_the_rest(self):
        open(self.flag, "w").close()
        run_id = self.sc.start("flaky", {"counter": self.counter, "flag": self.flag}, drive=False)["id"]
        self.drive(self.sc, run_id)
        self.assertEqual(read_counter(self.counter), ["a", "b", "c"])
        code, out, err = self.cli("fork", run_id, "--from-step", "c", "-i",
                                  json.dumps({"counter": self.counter, "flag": self.flag, "extra": 7}))
        self.assertEqual(code, 0, err)
        forked = out.strip()
        st = self.drive(self.sc, forked)
        self.assertEqual((st["status"], st["output"]), ("completed", ["a", "b", "c", 7]), st)
        self.assertEqual(read_counter(self.counter), ["a", "b", "c", "c"])  # only "c" ran again
        self.assertEqual(st["forked_from"], run_id)
        code, out, err = self.cli("fork", run_id)  # everything committed: nothing runs again
        st = self.drive(self.sc, out.strip())
        self.assertEqual(st["output"], ["a", "b", "c", None])
        self.assertEqual(read_counter(self.counter), ["a", "b", "c", "c"])
        self.assert_refused(["fork", run_id, "--from-step", "nope"], 2, "has no step 'nope'")


class NodeRetryFork(PythonRetryFork):
    runtime = "node"


if __name__ == "__main__":
    unittest.main()
