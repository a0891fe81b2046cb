"""Waits: signals (buffered, FIFO, idempotent, timeouts), child runs, TaskYou approvals.

A wait parks the run (`waiting`) like a sleep: nothing stays alive; whatever resolves it commits
the resolution and wakes the run, and the next pass replays it.
"""
import json
import os
import unittest

from tests import fake_ty
from tests.test_bridge import BridgeCase
from tests.util import HAVE_NODE, TempHome, read_counter, tow

WAITER = {
    "node": """
const fs = require("fs");
async function workflow(input, { step, waitForSignal }) {
  await step("before", () => { fs.appendFileSync(input.counter, "before\\n"); return 1; });
  const first = await waitForSignal("go", { timeout: input.timeout });
  const second = await waitForSignal("go", { timeout: input.timeout });
  await step("after", () => { fs.appendFileSync(input.counter, "after\\n"); return 2; });
  return { first, second };
}
""",
    "python": """
def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")
    return what

def workflow(input, ctx):
    ctx.step("before", lambda: mark(input["counter"], "before"))
    first = ctx.wait_for_signal("go", timeout=input.get("timeout"))
    second = ctx.wait_for_signal("go", timeout=input.get("timeout"))
    ctx.step("after", lambda: mark(input["counter"], "after"))
    return {"first": first, "second": second}
""",
}

PARENT = {
    "node": """
async function workflow(input, { step, runWorkflow }) {
  const ok = await runWorkflow("kid", { n: 20 });
  let err = null;
  try { await runWorkflow("kid", { fail: true }, { name: "failing" }); } catch (e) { err = { name: e.name, message: e.message, runId: e.runId || null }; }
  return { ok, err };
}
""",
    "python": """
def workflow(input, ctx):
    ok = ctx.run_workflow("kid", {"n": 20})
    err = None
    try:
        ctx.run_workflow("kid", {"fail": True}, name="failing")
    except Exception as e:
        err = {"name": e.name, "message": str(e), "runId": e.run_id}
    return {"ok": ok, "err": err}
""",
}

KID = """
def workflow(input, ctx):
    if input.get("fail"):
        ctx.step("boom", lambda: 1 / 0, max_attempts=1)
    return ctx.step("double", lambda: input["n"] * 2 + 2)
"""

LONG_KID = "def workflow(input, ctx):\n    ctx.wait_for_signal('never')\n    return 1\n"
HOLDER = "async function workflow(input, { runWorkflow }) { return await runWorkflow('longkid', {}); }"

APPROVAL = {
    "node": """
async function workflow(input, { waitForTask }) {
  const r = await waitForTask("Approve the deploy", { body: "version 2", timeout: input.timeout });
  return r === null ? "timed out" : { approved: r.approved, status: r.task.status };
}
""",
    "python": """
def workflow(input, ctx):
    r = ctx.wait_for_task("Approve the deploy", body="version 2", timeout=input.get("timeout"))
    return "timed out" if r is None else {"approved": r["approved"], "status": r["task"]["status"]}
""",
}


class NodeSignals(TempHome):
    runtime = "node"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("waiter", WAITER[self.runtime], runtime=self.runtime)
        self.counter = os.path.join(self.tmp, "c.txt")

    def start(self, **extra):
        return self.sc.start("waiter", dict({"counter": self.counter}, **extra), drive=False)["id"]

    def test_a_signal_wakes_the_waiting_run_and_a_buffered_one_is_consumed_in_order(self):
        run_id = self.start()
        self.sc.tick()
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "waiting")
        self.assertEqual([w["name"] for w in st["waiting_for"]], ["go"])
        self.assertEqual([r["id"] for r in self.sc.list_runs(status="waiting")], [run_id])
        code, out, err = self.cli("signal", run_id, "go", "-d", '{"n": 1}', "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["consumed_by"], "signal:go")
        self.sc.signal(run_id, "go", {"n": 2})  # nobody waits yet for the second: kept (FIFO)
        self.sc.signal(run_id, "go", {"n": 3})
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", {"first": {"data": {"n": 1}},
                                                                      "second": {"data": {"n": 2}}}), st)
        self.assertEqual(read_counter(self.counter), ["before", "after"])
        self.assertEqual([g["data"] for g in st["signals_pending"]], [{"n": 3}])  # never consumed: shown

    def test_a_signal_sent_before_the_run_waits_is_kept_for_it(self):
        run_id = self.start()
        self.sc.signal(run_id, "go", "early")
        self.sc.signal(run_id, "go", "earlier-than-second")
        st = self.drive(self.sc, run_id)
        self.assertEqual(st["output"], {"first": {"data": "early"}, "second": {"data": "earlier-than-second"}})

    def test_a_timeout_resolves_the_wait_with_null(self):
        run_id = self.start(timeout="30s")
        self.sc.tick()
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "waiting")
        self.assertIsNotNone(st["wake_at"])
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", {"first": None, "second": None}), st)

    def test_the_same_idempotency_key_is_applied_once(self):
        run_id = self.start()
        self.sc.tick()
        first = self.sc.signal(run_id, "go", 1, idempotency_key="k")
        again = self.sc.signal(run_id, "go", 1, idempotency_key="k")
        self.assertTrue(first["applied"])
        self.assertFalse(again["applied"])
        self.assertEqual(len(self.sc.store.signals(run_id)), 1)

    def test_bad_signals_are_refused_and_nothing_is_stored(self):
        run_id = self.start()
        self.assert_refused(["signal", "run_nosuchrun", "go"], 1, "no run")
        self.assert_refused(["signal", run_id, "go", "-d", "{bad"], 2, "invalid JSON")
        big = json.dumps("x" * (1 << 21))
        self.assert_refused(["signal", run_id, "go", "-d", big], 2, "max_input_bytes")
        self.sc.cancel(run_id)
        self.assert_refused(["signal", run_id, "go"], 1, "already canceled")


class PythonSignals(NodeSignals):
    runtime = "python"


class NodeChildren(TempHome):
    runtime = "node"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("kid", KID, runtime="python")
        self.sc.deploy("parent", PARENT[self.runtime], runtime=self.runtime)

    def test_a_parent_gets_a_child_output_and_catches_a_failed_child(self):
        run_id = self.sc.start("parent", {}, drive=False)["id"]
        st = self.drive(self.sc, run_id)
        self.assertEqual(st["status"], "completed", st)
        self.assertEqual(st["output"]["ok"], 42)
        err = st["output"]["err"]
        self.assertEqual(err["name"], "ChildFailed")
        self.assertIn("division by zero", err["message"])
        kids = st["children"]
        self.assertEqual([k["status"] for k in kids], ["completed", "failed"])
        self.assertEqual(err["runId"], kids[1]["id"])
        self.assertEqual(self.sc.status(kids[0]["id"])["parent"]["run_id"], run_id)
        # Exactly once: each child wait made one run, however many passes the parent took.
        self.assertEqual(len([r for r in self.sc.list_runs(limit=100) if r["workflow_id"] == "kid"]), 2)

    def test_canceling_a_parent_cancels_its_running_child(self):
        self.sc.deploy("longkid", LONG_KID, runtime="python")
        self.sc.deploy("holder", HOLDER, runtime="node")
        run_id = self.sc.start("holder", {}, drive=False)["id"]
        self.sc.tick()
        self.sc.tick()
        kids = self.sc.status(run_id)["children"]
        self.assertEqual([k["status"] for k in kids], ["waiting"])
        self.sc.cancel(run_id)
        self.assertEqual(self.sc.status(kids[0]["id"])["status"], "canceled")


    def test_a_pass_lost_after_the_child_was_made_makes_no_second_child(self):
        self.sc.deploy("longkid", LONG_KID, runtime="python")
        self.sc.deploy("holder", HOLDER, runtime="node")
        run_id = self.sc.start("holder", {}, drive=False)["id"]
        [run] = self.sc.store.claim_due("test", self.clock(), 10, 60000)
        store, defaults = self.sc.store, self.sc.defaults()
        ev = {"type": "wait", "step": "child:longkid", "wait": {"kind": "child", "workflow_id": "longkid", "input": {}},
              "timeout_at": None, "call": 0}
        self.assertEqual(store.apply_event(run_id, run["pass_id"], ev, self.clock(), defaults), tow.APPLIED)
        store.end_pass_without_result(run_id, run["pass_id"], self.clock(), defaults, "killed before it suspended")
        for _ in range(4):
            self.clock.advance(120000)
            self.sc.tick()
        kids = self.sc.status(run_id)["children"]
        self.assertEqual(len(kids), 1, kids)
        self.assertEqual(self.sc.status(run_id)["status"], "waiting")

    def test_a_child_canceled_or_timed_out_raises_in_the_parent(self):
        self.sc.deploy("longkid", LONG_KID, runtime="python")
        code = {"node": "async function workflow(input, { runWorkflow }) { try { await runWorkflow('longkid', {}, "
                         "{ timeout: input.timeout }); return 'done'; } catch (e) { return e.name; } }",
                "python": "def workflow(input, ctx):\n    try:\n        ctx.run_workflow('longkid', {}, "
                          "timeout=input.get('timeout'))\n        return 'done'\n"
                          "    except (ctx.ChildCanceled, ctx.ChildTimeout) as e:\n"
                          "        return type(e).__name__\n"}[self.runtime]
        self.sc.deploy("catcher", code, runtime=self.runtime)
        run_id = self.sc.start("catcher", {}, drive=False)["id"]
        self.sc.tick()
        self.sc.tick()
        [kid] = self.sc.status(run_id)["children"]
        self.sc.cancel(kid["id"])
        self.assertEqual(self.drive(self.sc, run_id)["output"], "ChildCanceled")
        run_id = self.sc.start("catcher", {"timeout": "1m"}, drive=False)["id"]
        st = self.drive(self.sc, run_id)
        self.assertEqual(st["output"], "ChildTimeout", st)
        self.assertEqual(self.sc.status(st["children"][0]["id"])["status"], "canceled")


    def test_a_retried_parent_makes_a_new_child_for_one_canceled_with_it(self):
        self.sc.deploy("longkid", LONG_KID, runtime="python")
        self.sc.deploy("holder", HOLDER, runtime="node")
        run_id = self.sc.start("holder", {}, drive=False)["id"]
        self.sc.tick()
        self.sc.tick()
        [first] = self.sc.status(run_id)["children"]
        self.sc.cancel(run_id)
        self.assertEqual(self.sc.status(first["id"])["status"], "canceled")
        self.sc.retry(run_id, drive=False)
        self.sc.tick()
        self.sc.tick()
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "waiting", st)
        kids = st["children"]
        self.assertEqual([k["status"] for k in kids], ["canceled", "waiting"])
        self.sc.signal(kids[1]["id"], "never")
        self.assertEqual(self.drive(self.sc, run_id)["output"], 1)

    def test_a_child_keeps_its_versions_deadline(self):
        self.sc.deploy("longkid", LONG_KID, runtime="python", deadline="1m")
        self.sc.deploy("holder", HOLDER, runtime="node")
        run_id = self.sc.start("holder", {}, drive=False)["id"]
        self.sc.tick()
        self.sc.tick()
        [kid] = self.sc.status(run_id)["children"]
        self.assertIsNotNone(self.sc.status(kid["id"])["deadline_at"])


class PythonChildren(NodeChildren):
    runtime = "python"


class ConcurrentWaits(TempHome):
    def setUp(self):
        if not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.sc = self.sidecar()

    def test_waits_and_sleeps_in_one_promise_all_all_start_at_once(self):
        self.sc.deploy("longkid", LONG_KID, runtime="python")
        self.sc.deploy("both", """
async function workflow(input, { waitForSignal, runWorkflow, sleep }) {
  const [a, b] = await Promise.all([
    waitForSignal("a", { timeout: "1m" }),
    waitForSignal("b", { timeout: "1m" }),
    runWorkflow("longkid", {}, { timeout: "1m" }).catch((e) => e.name),
    sleep("nap", "1m"),
  ]);
  return { a, b };
}
""")
        run_id = self.sc.start("both", {}, drive=False)["id"]
        t0 = self.clock()
        self.sc.tick()
        st = self.sc.status(run_id)
        self.assertEqual(sorted(w["kind"] for w in st["waiting_for"]), ["child", "signal", "signal"])
        self.assertEqual(len(st["children"]), 1, "the child must start with the signal waits, not after them")
        self.assertIn("nap", [s["name"] for s in st["steps"]])
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", {"a": None, "b": None}), st)
        self.assertLess(self.clock() - t0, 90000, "the timeouts ran one after another")

    def test_a_signal_does_not_cut_a_retry_backoff_short(self):
        self.sc.deploy("flaky", """
async function workflow(input, { step, waitForSignal }) {
  const [s, w] = await Promise.all([
    step("flaky", async () => { throw new Error("not yet"); }, { retry: { maxAttempts: 3, initialInterval: "100s" } }),
    waitForSignal("go"),
  ]);
  return w;
}
""")
        run_id = self.sc.start("flaky", {}, drive=False)["id"]
        self.sc.tick()
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "pending")
        due = st["available_at"]
        self.sc.signal(run_id, "go")
        self.assertEqual(self.sc.status(run_id)["available_at"], due)


class NodeApprovals(BridgeCase):
    runtime = "node"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("approve", APPROVAL[self.runtime], runtime=self.runtime)

    def the_task(self):
        tasks = [t for t in self.tasks() if t["title"] == "Approve the deploy"]
        self.assertEqual(len(tasks), 1, tasks)
        return tasks[0]

    def test_done_approves_and_blocked_refuses(self):
        for status, approved in (("done", True), ("blocked", False)):
            with self.subTest(status=status):
                run_id = self.sc.start("approve", {}, drive=False)["id"]
                self.sc.tick()
                self.assertEqual(self.sc.status(run_id)["status"], "waiting")
                task = [t for t in self.tasks() if t["title"] == "Approve the deploy"][-1]
                self.assertIn("version 2", task["body"])
                self.sc.tick()  # looked at, still backlog: nothing happens
                self.assertEqual(self.sc.status(run_id)["status"], "waiting")
                with fake_ty.locked_state(self.state) as state:
                    for t in state["tasks"]:
                        if t["id"] == task["id"]:
                            t["status"] = status
                self.clock.advance(60000)  # past poll_interval
                st = self.drive(self.sc, run_id)
                self.assertEqual((st["status"], st["output"]), ("completed", {"approved": approved,
                                                                               "status": status}), st)
        self.assert_all_ok()
        self.assertEqual(len([t for t in self.tasks() if t["title"] == "Approve the deploy"]), 2)  # one per run

    def test_ty_missing_delays_the_answer_and_a_timeout_ends_the_wait(self):
        os.remove(os.path.join(self.bin_dir, "ty"))
        run_id = self.sc.start("approve", {"timeout": "10m"}, drive=False)["id"]
        self.sc.tick()
        self.assertEqual(self.sc.status(run_id)["status"], "waiting")
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", "timed out"), st)
        self.install()  # `ty` is back: nobody waits any more, so no task is made
        self.recover(self.sc)
        self.assertEqual([t for t in self.tasks() if t["title"] == "Approve the deploy"], [])

    def test_a_task_nobody_waits_on_any_more_is_archived(self):
        run_id = self.sc.start("approve", {"timeout": "10m"}, drive=False)["id"]
        self.sc.tick()
        task = self.the_task()
        self.drive(self.sc, run_id)  # the timeout passes
        self.recover(self.sc)
        task = fake_ty.get_task(self.state, task["id"])
        self.assertEqual(task["status"], "archived")
        self.assertIn("no longer waited for", task["body"])


class PythonApprovals(NodeApprovals):
    runtime = "python"


if __name__ == "__main__":
    unittest.main()
