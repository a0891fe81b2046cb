"""Run trees and many waits: no recursion, no crash of the scheduler, every approval polled.

Deep and wide trees of child runs are built through the store (a claim, then the events a
pass would send), so a 450-deep chain takes a second, not 900 passes; the limits tests run
real passes in both runtimes.
"""
import threading
import time
import unittest
from unittest import mock

from tests import fake_ty
from tests.test_bridge import BridgeCase
from tests.util import HAVE_NODE, TempHome, tow, wait_for

# A workflow that starts itself as a child until ``n`` reaches 0 (the leaf waits for a signal).
CHAIN = """
def workflow(input, ctx):
    if input["n"] == 0:
        return ctx.wait_for_signal("never")
    return ctx.run_workflow("chain", {"n": input["n"] - 1})
"""

# The same in both runtimes, catching what its runWorkflow raises: the error's name and message.
RECURSE = {
    "node": """
async function workflow(input, { runWorkflow }) {
  try { return await runWorkflow("recurse", { depth: input.depth + 1 }); }
  catch (e) {
    if (e.name !== "ChildLimitExceeded") throw e;
    return { name: e.name, message: e.message, depth: input.depth };
  }
}
""",
    "python": """
def workflow(input, ctx):
    try:
        return ctx.run_workflow("recurse", {"depth": input["depth"] + 1})
    except ctx.WaitError as e:
        if e.name != "ChildLimitExceeded":
            raise
        return {"name": e.name, "message": str(e), "depth": input["depth"]}
""",
}
UNCAUGHT = "def workflow(input, ctx):\n    return ctx.run_workflow('uncaught', {})\n"
GO = "def workflow(input, ctx):\n    return ctx.wait_for_signal('go')\n"
SLOW = """
import time
def workflow(input, ctx):
    return ctx.step("slow", lambda: time.sleep(3) or 1)
"""


def wait_event(key, spec, call=0):
    return {"type": "wait", "step": key, "wait": spec, "timeout_at": None, "call": call}


def child_spec(input):
    return {"kind": "child", "workflow_id": "chain", "input": input}


SUSPENDED = {"type": "suspended", "waiting": True, "wake_at": None}


class TreeCase(TempHome):
    """Builds trees of waiting child runs through the store, as passes would."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("chain", CHAIN, runtime="python")
        # Limits raised for the trees built here (the defaults would refuse them).
        self.defaults = dict(self.sc.defaults(), max_child_depth=10000, max_children=100000)

    def claim_one(self, run_id=None):
        """Claim the next due run (or ``run_id`` among those due) as a pass would."""
        limit = 1 if run_id is None else 100
        runs = self.sc.store.claim_due("builder", self.clock(), limit, 60000)
        return [r for r in runs if run_id in (None, r["id"])][0]

    def chain(self, depth, deadline=None, levels=None):
        """A root and ``depth`` generations of children, each waiting on the next; their ids.
        With ``levels``, only that many runs pass (the last one's child may be refused)."""
        root = self.sc.start("chain", {"n": depth}, deadline=deadline, drive=False)["id"]
        ids = []
        for level in range(depth + 1 if levels is None else levels):
            run = self.claim_one()
            n = depth - level
            ev = (wait_event("child:chain", child_spec({"n": n - 1})) if n
                  else wait_event("signal:never", {"kind": "signal", "name": "never"}))
            self.assertEqual(self.apply(run, [ev, SUSPENDED]), tow.ENDED)
            ids.append(run["id"])
        self.assertEqual(ids[0], root)
        return ids

    def apply(self, run, events):
        """Commit ``events`` as the run's pass would send them (with the raised limits)."""
        return self.sc.store.apply_events(run["id"], run["pass_id"], events, self.clock(),
                                          self.defaults)[0]

    def children(self, run_id):
        rows = self.sc.store.query("SELECT id FROM runs WHERE parent_run_id = ?", (run_id,))
        return [r["id"] for r in rows]

    def statuses(self, ids):
        rows = self.sc.store.query("SELECT id, status FROM runs")
        by_id = {r["id"]: r["status"] for r in rows}
        return [by_id[i] for i in ids]


class DeepAndWideTrees(TreeCase):
    def test_a_deadline_on_the_root_of_a_450_deep_chain_ends_the_tree_and_the_tick_goes_on(self):
        ids = self.chain(450, deadline="1m")
        self.assertEqual(set(self.statuses(ids)), {"waiting"})
        self.clock.advance(61000)
        self.sc.tick()  # raised RecursionError here, and in every tick after it
        root = self.sc.status(ids[0])
        self.assertEqual((root["status"], root["error"]["name"]), ("failed", "DeadlineExceeded"),
                         root["error"])
        self.assertEqual(set(self.statuses(ids[1:])), {"canceled"})
        leaf = self.sc.status(ids[-1])
        self.assertIn("its parent run %s was canceled" % ids[-2], leaf["error"]["message"])
        self.sc.tick()  # nothing left due: a later tick is quiet too

    def test_cancel_of_the_root_of_a_450_deep_chain_from_the_cli_cancels_all(self):
        ids = self.chain(450)
        code, out, err = self.cli("cancel", ids[0])
        self.assertEqual(code, 0, err[-2000:])
        self.assertEqual(set(self.statuses(ids)), {"canceled"})
        self.assertEqual(self.sc.store.counters()[("canceled", "chain")], 451)

    def test_cancel_of_a_root_with_2000_children_cancels_them_all(self):
        root = self.sc.start("chain", {"n": 1}, drive=False)["id"]
        waits = [wait_event("child:kid%d" % i, child_spec({"n": 0}), i) for i in range(2000)]
        self.apply(self.claim_one(), waits + [SUSPENDED])
        kids = self.children(root)
        self.assertEqual(len(kids), 2000)
        started = time.monotonic()
        code, out, err = self.cli("cancel", root, "--json")
        self.assertEqual(code, 0, err[-2000:])
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(set(self.statuses([root] + kids)), {"canceled"})


class ChildLimitsInTheStore(TreeCase):
    def test_the_depth_limit_refuses_the_child_that_passes_it(self):
        self.defaults["max_child_depth"] = 3
        ids = self.chain(5, levels=4)  # levels 0-3 exist; level 3's child would be 4 deep
        self.assertEqual(len(ids), 4)
        self.assertEqual(self.sc.store.query_one("SELECT count(*) AS n FROM runs")["n"], 4)
        st = self.sc.status(ids[-1])
        self.assertEqual(st["status"], "waiting")
        [wait] = [s for s in st["steps"] if s["name"] == "child:chain"]
        self.assertEqual(wait["status"], "completed")
        self.assertEqual(wait["output"]["error"]["name"], "ChildLimitExceeded")
        self.assertIn("4 levels below its root run, over limits.max_child_depth (3)",
                      wait["output"]["error"]["message"])

    def test_the_children_limit_counts_unfinished_children(self):
        self.defaults["max_children"] = 2
        root = self.sc.start("chain", {"n": 1}, drive=False)["id"]
        spec = child_spec({"n": 0})
        waits = [wait_event("child:k%d" % i, spec, i) for i in range(3)]
        self.apply(self.claim_one(), waits + [SUSPENDED])
        steps = {s["name"]: s for s in self.sc.status(root)["steps"]}
        self.assertEqual([steps["child:k%d" % i]["status"] for i in range(3)],
                         ["waiting", "waiting", "completed"])
        error = steps["child:k2"]["output"]["error"]
        self.assertEqual(error["name"], "ChildLimitExceeded")
        self.assertIn("already has 2 unfinished child runs, the limit (limits.max_children)",
                      error["message"])
        # One child ends: the next one may start.
        first = self.sc.status(root)["children"][0]["id"]
        self.sc.cancel(first)
        self.apply(self.claim_one(root), [wait_event("child:k3", spec, 3), SUSPENDED])
        self.assertEqual(len(self.sc.status(root)["children"]), 3)

    def test_the_limits_are_read_and_checked_in_the_config(self):
        self.write_config(extra="limits:\n  max_child_depth: 7\n  max_children: 9\n")
        sc = tow.Sidecar(config_path=self.config_path)
        self._sidecars.append(sc)
        self.assertEqual((sc.defaults()["max_child_depth"], sc.defaults()["max_children"]), (7, 9))
        for bad in ("max_child_depth: 0", "max_children: 0"):
            with self.subTest(bad=bad):
                self.write_config(extra="limits:\n  %s\n" % bad)
                key = bad.split(":")[0]
                with self.assertRaisesRegex(tow.ConfigError, "limits.%s must be from 1" % key):
                    tow.Sidecar(config_path=self.config_path)
        self.write_config(extra="")
        sc = tow.Sidecar(config_path=self.config_path)
        self._sidecars.append(sc)
        defaults = sc.defaults()
        self.assertEqual((defaults["max_child_depth"], defaults["max_children"]), (100, 1000))


def raising_for(run_id, real):
    """``real`` (a Store method), raising RuntimeError when called for ``run_id``."""
    def method(store, c, rid, *args, **kwargs):
        if rid == run_id:
            raise RuntimeError("injected for %s" % rid)
        return real(store, c, rid, *args, **kwargs)
    return method


class OneRunCannotStopTheScheduler(TempHome):
    """An unexpected error while handling one run is that run's, never the scheduler's end."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("go", GO, runtime="python")

    def two_woken_runs(self):
        bad, good = (self.sc.start("go", {}, drive=False)["id"] for _ in range(2))
        self.sc.tick()
        for run_id in (bad, good):
            self.sc.signal(run_id, "go", run_id)
        return bad, good

    def test_a_run_whose_claim_raises_is_set_aside_then_failed_and_others_go_on(self):
        bad, good = self.two_woken_runs()
        broken = raising_for(bad, tow.WaitLedger.time_out_waits)
        with mock.patch.object(tow.WaitLedger, "time_out_waits", broken):
            self.sc.tick()  # raised RuntimeError: the loop only caught StoreError
            self.assertEqual(self.sc.status(good)["status"], "completed")
            st = self.sc.status(bad)
            self.assertEqual(st["status"], "waiting")
            self.assertGreater(self.sc.store.get_run(bad)["available_at"], self.clock(),
                               "set aside with a backoff, not tried again at once")
            self.assertIn("RuntimeError: injected", st["last_pass"]["reason"])
            for _ in range(10):
                self.clock.advance(61000)
                self.sc.tick()
        st = self.sc.status(bad)
        self.assertEqual((st["status"], st["error"]["name"]), ("failed", "SidecarError"), st)
        self.assertIn("failed 5 times in a row while handling this run (RuntimeError: injected",
                      st["error"]["message"])
        sets = [e for e in self.sc.events(bad) if e["type"] == "set_aside"]
        self.assertEqual(len(sets), 4)

    def test_serve_keeps_running_while_one_run_keeps_failing(self):
        bad, good = self.two_woken_runs()
        sched = self.sc.scheduler("serve")
        broken = raising_for(bad, tow.WaitLedger.time_out_waits)
        with mock.patch.object(tow.WaitLedger, "time_out_waits", broken):
            thread = threading.Thread(target=sched.loop, daemon=True)
            thread.start()
            try:
                wait_for(lambda: self.sc.status(good)["status"] == "completed",
                         what="the good run")
                wait_for(lambda: any(e["type"] == "set_aside" for e in self.sc.events(bad)),
                         what="the bad run set aside")
                time.sleep(0.5)
                self.assertTrue(thread.is_alive(), "serve ended")
            finally:
                sched.stop(hurry=True)
                thread.join(30)
        self.assertFalse(thread.is_alive())

    def test_an_error_in_a_round_is_logged_and_the_loop_goes_on(self):
        run_id = self.sc.start("go", {}, drive=False)["id"]
        real, calls = tow.Sidecar.fire_schedules, []

        def fire_once_broken(sidecar):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected into a round")
            return real(sidecar)
        with mock.patch.object(tow.Sidecar, "fire_schedules", fire_once_broken):
            with self.assertLogs("ty_openworkflow", "ERROR") as logs:
                self.sc.tick()
        self.assertIn("injected into a round", "\n".join(logs.output))
        self.assertEqual(self.sc.status(run_id)["status"], "waiting")

    def test_a_deadline_check_that_raises_stops_that_pass_only(self):
        self.sc.deploy("slow", SLOW, runtime="python")
        run_id = self.sc.start("slow", {}, deadline="1s", drive=False)["id"]

        def broken(store, rid, pass_id, now, error):
            raise RuntimeError("injected into the deadline check")
        with mock.patch.object(tow.Store, "fail_run", broken):
            self.sc.tick()  # raised RuntimeError out of Scheduler._check_active
        st = self.drive(self.sc, run_id)
        self.assertEqual((st["status"], st["error"]["name"]), ("failed", "DeadlineExceeded"), st)

    def test_a_run_whose_cascade_raises_is_failed_on_its_own(self):
        run_id = self.sc.start("go", {}, drive=False)["id"]
        self.sc.tick()  # waiting: it is failed outside a pass, as a deadline would
        broken = raising_for(run_id, tow.WaitLedger.after_finish)
        with mock.patch.object(tow.WaitLedger, "after_finish", broken):
            self.assertTrue(self.sc.store.fail_run(run_id, None, self.clock(), {
                "message": "stop", "name": "Test", "stack": None}))
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "failed")
        self.assertIn("stop (ending its tree failed too, RuntimeError", st["error"]["message"])


class NodeChildLimits(TempHome):
    runtime = "node"
    extra_config = "limits:\n  max_child_depth: 2\n"

    def setUp(self):
        if self.runtime == "node" and not HAVE_NODE:
            self.skipTest("node is not installed")
        super().setUp()
        self.sc = self.sidecar()

    def test_run_workflow_past_the_depth_limit_raises_a_catchable_error(self):
        self.sc.deploy("recurse", RECURSE[self.runtime], runtime=self.runtime)
        root = self.sc.start("recurse", {"depth": 0}, drive=False)["id"]
        st = self.drive(self.sc, root)
        self.assertEqual(st["status"], "completed", st)
        out = st["output"]
        self.assertEqual((out["name"], out["depth"]), ("ChildLimitExceeded", 2), out)
        self.assertIn("limits.max_child_depth (2)", out["message"])
        self.assertEqual(self.sc.store.query_one("SELECT count(*) AS n FROM runs")["n"], 3)

    def test_an_uncaught_limit_error_fails_the_run_with_the_limit_named(self):
        self.sc.deploy("uncaught", UNCAUGHT, runtime="python")
        root = self.sc.start("uncaught", {}, drive=False)["id"]
        st = self.drive(self.sc, root)
        self.assertEqual(st["status"], "failed", st)  # its grandchild failed, so did each parent
        deepest = self.sc.status(self.sc.status(st["children"][0]["id"])["children"][0]["id"])
        self.assertEqual(deepest["status"], "failed")
        self.assertIn("limits.max_child_depth", deepest["error"]["message"])


class PythonChildLimits(NodeChildLimits):
    runtime = "python"


class EveryApprovalIsPolled(BridgeCase):
    """More open approval waits than one round polls: each is looked at in turn."""

    waits = 230
    approved = 5

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        code = "def workflow(input, ctx):\n    return ctx.wait_for_task('ok?')\n"
        self.sc.deploy("approve", code, runtime="python")

    def waiting_runs(self):
        """``waits`` runs waiting on a task each (made in the fake at once, not by the bridge)."""
        runs = [self.sc.start("approve", {}, drive=False)["id"] for _ in range(self.waits)]
        claimed = self.sc.store.claim_due("t", self.clock(), self.waits, 60000)
        claimed = {r["id"]: r for r in claimed}
        with fake_ty.locked_state(self.state) as state:
            for i, run_id in enumerate(runs):
                run = claimed[run_id]
                ev = {"type": "wait", "step": "task:ok?", "wait": {"kind": "task", "title": "ok?"},
                      "timeout_at": None, "call": 0}
                suspended = {"type": "suspended", "waiting": True, "wake_at": None}
                self.sc.store.apply_events(run_id, run["pass_id"], [ev, suspended], self.clock(),
                                           self.sc.defaults())
                code, out, _ = fake_ty.run(["create", "--json", "--", "ok? %d" % i], state)
                self.assertEqual(code, 0)
                self.sc.store.set_wait_task(run_id, "task:ok?", fake_ty.json.loads(out)["id"],
                                            self.clock())
        return runs

    def approve(self, runs):
        tasks = {self.sc.store.wait_task(run_id, "task:ok?"): run_id for run_id in runs}
        with fake_ty.locked_state(self.state) as state:
            for t in state["tasks"]:
                if t["id"] in tasks:
                    t["status"] = "done"

    def test_approvals_past_the_first_200_waits_are_polled_in_a_bounded_number_of_rounds(self):
        runs = self.waiting_runs()
        last = runs[-self.approved:]
        self.approve(last)
        shows = []
        self.clock.advance(self.sc.config["poll_interval"])
        for _ in range(4):  # rounds a few seconds apart: 3 of 100 reach all 230
            before = len(self.calls())
            self.clock.advance(5000)
            self.sc.bridge.poll_approvals()
            shows.append(len(self.calls()) - before)
            if not any(self.sc.status(r)["waiting_for"] for r in last):
                break
        for run_id in last:
            st = self.sc.status(run_id)
            self.assertEqual(st["waiting_for"], [], "approved task never polled (`ty` calls per "
                             "round: %s)" % shows)
            [wait] = [s for s in st["steps"] if s["name"] == "task:ok?"]
            self.assertEqual(wait["output"]["value"]["approved"], True)
        self.assertLessEqual(max(shows), tow.APPROVAL_POLL_BATCH)
        self.assert_all_ok()

    def test_a_wait_looked_at_is_last_in_line_and_a_finished_run_leaves_the_line(self):
        self.waits = 3
        runs = self.waiting_runs()
        store, every = self.sc.store, self.sc.config["poll_interval"]
        self.assertEqual(store.approvals_due(self.clock(), every), [])  # just looked at
        self.clock.advance(every + 1000)
        self.assertEqual(sorted(r for r, _, _ in store.approvals_due(self.clock(), every)),
                         sorted(runs))
        first = store.approvals_due(self.clock(), every, limit=2)
        store.set_wait_task(first[0][0], "task:ok?", first[0][2]["task_id"], self.clock())
        after = [r for r, _, _ in store.approvals_due(self.clock(), every, limit=1000)]
        self.assertNotIn(first[0][0], after)
        self.clock.advance(every + 1000)
        after = [r for r, _, _ in store.approvals_due(self.clock(), every, limit=1000)]
        self.assertEqual(after[-1], first[0][0], "the wait just looked at must come last")
        self.sc.cancel(runs[1])
        after = [r for r, _, _ in store.approvals_due(self.clock(), every, limit=1000)]
        self.assertNotIn(runs[1], after)
        left = store.query_one("SELECT count(*) AS n FROM steps WHERE polled_at IS NOT NULL "
                               "AND run_id = ?", (runs[1],))
        self.assertEqual(left["n"], 0)


    def test_the_migration_puts_waits_stored_before_it_first_in_line(self):
        self.waits = 2
        runs = self.waiting_runs()
        self.sc.cancel(runs[1])
        added = "ALTER TABLE steps ADD COLUMN polled_at INTEGER"
        [migration] = [m for m in tow.MIGRATIONS if added in m]
        with self.sc.store.transaction() as c:
            c.execute("UPDATE steps SET polled_at = NULL")  # as the column was added
            c.execute(migration[1])
        rows = self.sc.store.query("SELECT run_id, polled_at FROM steps ORDER BY run_id")
        self.assertEqual({r["run_id"]: r["polled_at"] for r in rows}, {runs[0]: 0, runs[1]: None})

if __name__ == "__main__":
    unittest.main()
