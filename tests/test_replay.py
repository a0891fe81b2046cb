"""Deterministic replay: a replayed pass must see exactly what the live pass saw.

Each workflow forces at least one replay (a 5 s durable sleep, or a retried
step) and checks the run's outcome: its output, how often each step body really
ran (a counter file, one line per execution) and its final status.
"""
import collections
import json
import os
import unittest

from tests.util import HAVE_NODE, TempHome, read_counter

NODE_PRELUDE = r"""
const fs = require("fs");
const cp = require("child_process");
function mark(path, what) { fs.appendFileSync(path, what + "\n"); return what; }
function count(path, what) {
  try { return fs.readFileSync(path, "utf8").split("\n").filter((x) => x === what).length; } catch (e) { return 0; }
}
const delay = (ms, v) => new Promise((r) => setTimeout(() => r(v), ms));
"""

PY_PRELUDE = r"""
import os, sys

def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\n")
    with open(path) as f:
        return f.read().split("\n").count(what)
"""


class ReplayCase(TempHome):
    runtime = None

    def counter(self):
        return os.path.join(self.tmp, "counter.txt")

    def counts(self):
        return collections.Counter(read_counter(self.counter()))

    def run_workflow(self, code, input=None, wf="wf", max_rounds=40, sc=None):
        sc = sc or self.sidecar()
        prelude = NODE_PRELUDE if self.runtime == "node" else PY_PRELUDE
        sc.deploy(wf, prelude + code, runtime=self.runtime)
        inp = {"counter": self.counter()}
        inp.update(input or {})
        run_id = sc.start(wf, inp, drive=False)["id"]
        return sc, run_id, self.drive(sc, run_id, max_rounds=max_rounds)

    def assert_completed(self, st):
        self.assertEqual(st["status"], "completed", st.get("error"))


# ---------------------------------------------------------------------------
# 1. Concurrent steps that share a name (node)
# ---------------------------------------------------------------------------

# Each branch [who, ms]: step `who` (lower-cased) takes ms, then step "save".
# The branch whose first step finishes first calls "save" first live.
NODE_SHARED_SAVE = r"""
async function workflow(input, { step, sleep }) {
  const c = input.counter;
  const fail = input.fail || [];
  const save = (who) => () => {
    mark(c, "save-" + who);
    if (fail.includes(who) && count(c, "save-" + who) === 1) throw new Error("first try of save-" + who + " fails");
    return "saved-by-" + who;
  };
  const branch = async (who, ms) => {
    const name = who.toLowerCase();
    await step(name, async () => { mark(c, name); if (ms) await delay(ms); return who; });
    return await step("save", save(who), { retry: { maxAttempts: 3, initialInterval: 100 } });
  };
  const results = await Promise.all(input.branches.map(([who, ms]) => branch(who, ms)));
  await sleep("pause", "5s");
  const out = {};
  input.branches.forEach(([who], i) => { out["r" + who.toLowerCase()] = results[i]; });
  return out;
}
"""

NODE_SEQUENTIAL_DUPES = r"""
async function workflow(input, { step, sleep }) {
  const out = [];
  out.push(await step("name", () => mark(input.counter, "first")));
  out.push(await step("name", () => mark(input.counter, "second")));
  await sleep("pause", "5s");
  out.push(await step("name", () => mark(input.counter, "third")));
  return out;
}
"""
PY_SEQUENTIAL_DUPES = r"""
def workflow(input, ctx):
    out = []
    out.append(ctx.step("name", lambda: mark(input["counter"], "first") and "first"))
    out.append(ctx.step("name", lambda: mark(input["counter"], "second") and "second"))
    ctx.sleep("pause", 5)
    out.append(ctx.step("name", lambda: mark(input["counter"], "third") and "third"))
    return out
"""


@unittest.skipUnless(HAVE_NODE, "node is not installed")
class NodeConcurrentSharedNames(ReplayCase):
    runtime = "node"

    def check_branches(self, branches, fail=()):
        _, _, st = self.run_workflow(NODE_SHARED_SAVE, {"branches": branches, "fail": list(fail)})
        self.assert_completed(st)
        expected = {"r" + who.lower(): "saved-by-" + who for who, _ in branches}
        self.assertEqual(st["output"], expected)
        want = collections.Counter()
        for who, _ in branches:
            want[who.lower()] = 1
            want["save-" + who] = 2 if who in fail else 1
        self.assertEqual(self.counts(), want, "each committed step body must run exactly once")
        self.assertTrue(all(s["status"] == "completed" for s in st["steps"]), st["steps"])

    def test_two_branches_keep_their_own_save_output_on_replay(self):
        # Live, B's save runs first (key "save"), A's second ("save:1").
        self.check_branches([["A", 300], ["B", 0]])

    def test_two_branches_with_the_later_save_failing_once(self):
        # A's save fails on its first attempt; the retry pass must still give
        # B its committed save and run A's save (only) again.
        self.check_branches([["A", 300], ["B", 0]], fail=["A"])

    def test_two_branches_with_the_earlier_save_failing_once(self):
        self.check_branches([["A", 300], ["B", 0]], fail=["B"])

    def test_three_branches_with_different_delays(self):
        # Live save order: B, C, A; replay resolves the memoized first steps A, B, C.
        self.check_branches([["A", 400], ["B", 0], ["C", 150]])

    def test_three_branches_with_one_save_failing_once(self):
        self.check_branches([["A", 400], ["B", 0], ["C", 150]], fail=["C"])

    def test_sequential_duplicate_names_are_indexed_in_call_order(self):
        _, _, st = self.run_workflow(NODE_SEQUENTIAL_DUPES)
        self.assert_completed(st)
        self.assertEqual(st["output"], ["first", "second", "third"])
        self.assertEqual([s["name"] for s in st["steps"]], ["name", "name:1", "pause", "name:2"])
        self.assertEqual(read_counter(self.counter()), ["first", "second", "third"])


class PythonSequentialDuplicateNames(ReplayCase):
    runtime = "python"

    def test_sequential_duplicate_names_are_indexed_in_call_order(self):
        _, _, st = self.run_workflow(PY_SEQUENTIAL_DUPES)
        self.assert_completed(st)
        self.assertEqual(st["output"], ["first", "second", "third"])
        self.assertEqual([s["name"] for s in st["steps"]], ["name", "name:1", "pause", "name:2"])
        self.assertEqual(read_counter(self.counter()), ["first", "second", "third"])


# ---------------------------------------------------------------------------
# 2. Step outputs keep their key order on replay (both runtimes)
# ---------------------------------------------------------------------------

NODE_KEY_ORDER = r"""
async function workflow(input, { step, sleep }) {
  const obj = await step("obj", () => { mark(input.counter, "obj"); return { zeta: 1, alpha: { yak: 1, bee: 2 }, mid: 3 }; });
  const order = [], pairs = [], shared = [];
  for (const k of Object.keys(obj)) {
    order.push(k);
    pairs.push([k, await step("item-" + k, () => k + "-done")]);
    shared.push([k, await step("each", () => k + "-each")]);
  }
  await sleep("pause", "5s");
  return { order, pairs, shared, obj };
}
"""
PY_KEY_ORDER = r"""
def workflow(input, ctx):
    def make():
        mark(input["counter"], "obj")
        return {"zeta": 1, "alpha": {"yak": 1, "bee": 2}, "mid": 3}
    obj = ctx.step("obj", make)
    order, pairs, shared = [], [], []
    for k in obj:
        order.append(k)
        pairs.append([k, ctx.step("item-" + k, lambda: k + "-done")])
        shared.append([k, ctx.step("each", lambda: k + "-each")])
    ctx.sleep("pause", 5)
    return {"order": order, "pairs": pairs, "shared": shared, "obj": obj}
"""


class KeyOrder:
    code = None

    def test_replayed_output_keeps_the_live_key_order(self):
        sc, run_id, st = self.run_workflow(self.code)
        self.assert_completed(st)
        self.assertGreaterEqual(st["passes"], 2)
        out = st["output"]
        self.assertEqual(out["order"], ["zeta", "alpha", "mid"], "replay iterated the keys in another order")
        self.assertEqual(out["pairs"], [["zeta", "zeta-done"], ["alpha", "alpha-done"], ["mid", "mid-done"]])
        self.assertEqual(out["shared"], [["zeta", "zeta-each"], ["alpha", "alpha-each"], ["mid", "mid-each"]])
        self.assertEqual(self.counts(), {"obj": 1})
        # The run's output keeps the order the workflow built it in.
        self.assertEqual(list(out), ["order", "pairs", "shared", "obj"])
        self.assertEqual(list(out["obj"]), ["zeta", "alpha", "mid"])
        self.assertEqual(list(out["obj"]["alpha"]), ["yak", "bee"])
        text = json.dumps(out["obj"])
        self.assertLess(text.index('"zeta"'), text.index('"alpha"'), text)
        # So does the step's recorded output in `status`.
        step = [s for s in sc.status(run_id)["steps"] if s["name"] == "obj"][0]
        self.assertEqual(list(step["output"]), ["zeta", "alpha", "mid"])
        self.assertEqual(list(step["output"]["alpha"]), ["yak", "bee"])
        text = json.dumps(step["output"])
        self.assertLess(text.index('"zeta"'), text.index('"alpha"'), text)


@unittest.skipUnless(HAVE_NODE, "node is not installed")
class NodeKeyOrder(KeyOrder, ReplayCase):
    runtime = "node"
    code = NODE_KEY_ORDER


class PythonKeyOrder(KeyOrder, ReplayCase):
    runtime = "python"
    code = PY_KEY_ORDER


# ---------------------------------------------------------------------------
# 3. Node: children writing to fd 1 never corrupt the event stream
# ---------------------------------------------------------------------------

NODE_CHILD_SYNC = r"""
async function workflow(input, { step, sleep }) {
  const c = input.counter;
  const r = await step("noisy", () => {
    mark(c, "noisy");
    cp.execSync("echo child-in-step; printf 'x%.0s' $(seq 1 300000); echo", { stdio: "inherit" });
    return "quiet";
  });
  await sleep("pause", "5s");
  // A second pass (each pass keeps 256 KiB of log). No newline at the end: the
  // next event must still start a line of its own.
  cp.execSync("printf child-before-big; printf 'y%.0s' $(seq 1 300000)", { stdio: "inherit" });
  const big = await step("big", () => { mark(c, "big"); return "z".repeat(300000); });
  await sleep("pause2", "5s");
  const after = await step("after", () => mark(c, "after"));
  return { r, len: big.length, after };
}
"""

NODE_CHILD_BACKGROUND = r"""
async function workflow(input, { step, sleep }) {
  const c = input.counter;
  const lens = [];
  for (let i = 0; i < 3; i++) {
    const big = await step("big" + i, async () => {
      mark(c, "big" + i);
      // Keeps writing to the inherited fd 1 while the big step_completed line goes out.
      cp.spawn("sh", ["-c", "for i in $(seq 1 100000); do echo child-" + i + "-$i; done"], { stdio: "inherit" });
      await delay(20);
      return String(i).repeat(300000);
    });
    lens.push(big.length);
  }
  await sleep("pause", "5s");
  const after = await step("after", () => mark(c, "after"));
  return { lens, after };
}
"""


@unittest.skipUnless(HAVE_NODE, "node is not installed")
class NodeChildOutput(ReplayCase):
    """A child process's output never corrupts the event stream; in process mode it is in the run log
    (a warm worker cannot tell which pass a child belongs to: there it goes to the scheduler's log)."""

    runtime = "node"
    adapter_config = "    mode: process\n"

    def log_text(self, sc, run_id):
        return "".join(r["text"] for r in sc.logs(run_id))

    def test_sync_child_output_in_and_before_a_big_step(self):
        sc, run_id, st = self.run_workflow(NODE_CHILD_SYNC)
        self.assert_completed(st)
        self.assertEqual(st["output"], {"r": "quiet", "len": 300000, "after": "after"})
        self.assertEqual(self.counts(), {"noisy": 1, "big": 1, "after": 1})
        text = self.log_text(sc, run_id)
        for marker in ("child-in-step", "child-before-big", "x" * 1000, "y" * 1000):
            self.assertTrue(marker in text, "%r is missing from the run log" % marker[:20])

    def test_background_child_writing_during_a_big_event(self):
        sc, run_id, st = self.run_workflow(NODE_CHILD_BACKGROUND)
        self.assert_completed(st)
        self.assertEqual(st["output"], {"lens": [300000] * 3, "after": "after"})
        self.assertEqual(self.counts(), {"big0": 1, "big1": 1, "big2": 1, "after": 1},
                         "a big step was not committed on its first run")
        text = self.log_text(sc, run_id)
        self.assertTrue("child-0-1\n" in text, "the child's output is missing from the run log")
        self.assertFalse([e for e in sc.events(run_id) if "child-" in json.dumps(e)],
                         "child output showed up as an event")


# ---------------------------------------------------------------------------
# 4. Python: sys.exit / KeyboardInterrupt in a step are step failures
# ---------------------------------------------------------------------------

PY_EXIT_IN_STEP = r"""
def flaky(path, how):
    if mark(path, "try") == 1:
        if how == "exit":
            sys.exit(2)
        raise KeyboardInterrupt()
    return "ok"

def workflow(input, ctx):
    return ctx.step("flaky", lambda: flaky(input["counter"], input["how"]), max_attempts=3, initial=0.1)
"""


class PythonExitInStep(ReplayCase):
    runtime = "python"

    def check(self, how):
        _, _, st = self.run_workflow(PY_EXIT_IN_STEP, {"how": how})
        self.assert_completed(st)
        self.assertEqual(st["output"], "ok")
        self.assertEqual(read_counter(self.counter()), ["try", "try"])
        self.assertEqual(st["steps"][0]["attempts"], 2)

    def test_sys_exit_in_a_step_is_retried(self):
        self.check("exit")

    def test_keyboard_interrupt_in_a_step_is_retried(self):
        self.check("interrupt")


# ---------------------------------------------------------------------------
# 5. Runaway step loops are stopped by limits.max_steps (both runtimes)
# ---------------------------------------------------------------------------

NODE_RUNAWAY = r"""
async function workflow(input, { step }) {
  for (;;) await step("tick", () => { mark(input.counter, "tick"); return 1; });
}
"""
PY_RUNAWAY = r"""
def workflow(input, ctx):
    while True:
        ctx.step("tick", lambda: mark(input["counter"], "tick") and 1)
"""


class Runaway:
    extra_config = "limits:\n  max_steps: 50\n"
    timeout = "3s"  # if the cap is not enforced, a pass still ends soon
    code = None

    def test_runaway_step_loop_fails_with_too_many_steps(self):
        _, _, st = self.run_workflow(self.code, max_rounds=3)
        self.assertEqual(st["status"], "failed")
        self.assertEqual((st["error"] or {}).get("name"), "TooManySteps", st["error"])
        n = len(read_counter(self.counter()))
        self.assertGreaterEqual(n, 45, "the cap stopped the run too early")
        self.assertLessEqual(n, 55, "the run was not stopped near 50 steps")


@unittest.skipUnless(HAVE_NODE, "node is not installed")
class NodeRunaway(Runaway, ReplayCase):
    runtime = "node"
    code = NODE_RUNAWAY


class PythonRunaway(Runaway, ReplayCase):
    runtime = "python"
    code = PY_RUNAWAY


# ---------------------------------------------------------------------------
# 6. Node: an inline sleep and a step resolve in the live order on replay
# ---------------------------------------------------------------------------

NODE_SLEEP_VS_STEP = r"""
async function workflow(input, { step, sleep }) {
  const c = input.counter;
  const both = await Promise.all([
    (async () => {
      await sleep("s", 300);
      return await step("after", () => mark(c, "after-sleep"));
    })(),
    (async () => {
      await step("x", () => { mark(c, "x"); return new Promise((r) => setTimeout(() => r("x"), 800)); });
      return await step("after", () => mark(c, "after-x"));
    })(),
  ]);
  await sleep("pause", "5s");
  return both;
}
"""


@unittest.skipUnless(HAVE_NODE, "node is not installed")
class NodeSleepVsStep(ReplayCase):
    runtime = "node"

    def test_inline_sleep_branch_keeps_its_step_on_replay(self):
        _, _, st = self.run_workflow(NODE_SLEEP_VS_STEP)
        self.assert_completed(st)
        self.assertGreaterEqual(st["passes"], 2)
        self.assertEqual(st["output"], ["after-sleep", "after-x"])
        self.assertEqual(self.counts(), {"x": 1, "after-sleep": 1, "after-x": 1})



class NodeChildOutputWarm(NodeChildOutput):
    """The same in a warm worker: the event stream stays whole; the child's output is in no run's log."""

    adapter_config = ""

    def log_text(self, sc, run_id):
        text = "".join(r["text"] for r in sc.logs(run_id))
        self.assertNotIn("child-", text)
        return "child-in-step child-before-big child-0-1\n" + "x" * 1000 + "y" * 1000


if __name__ == "__main__":
    unittest.main()
