"""One contract, run against every runtime on the exec adapter: same workflows, same histories."""
import json
import os
import threading
import time
import unittest

from tests import workflows
from tests.util import HAVE_NODE, TempHome, processes_mentioning, read_counter, tow, wait_for


class AdapterContract:
    """Mixed into one TestCase per runtime (and, later, per adapter)."""

    runtime = None
    adapter = "exec"

    def deploy(self, sc, name, workflow_id=None, code=None):
        table = workflows.NODE if self.runtime == "node" else workflows.PYTHON
        return sc.deploy(workflow_id or name, code or table[name], adapter=self.adapter, runtime=self.runtime)

    def counter(self):
        return os.path.join(self.shared_dir(), "counter-%d.txt" % id(self))

    def shared_dir(self):
        """Where step side effects are written (docker mounts it into the containers)."""
        return self.tmp

    def start(self, sc, wf, input=None):
        return sc.start(wf, input if input is not None else {"counter": self.counter()}, drive=False)["id"]

    def steps(self, st):
        return [(s["name"], s["kind"], s["status"]) for s in st["steps"]]

    killed_text = "killed by signal 9"

    def shim_processes(self):
        """What runs passes right now (pids for exec, containers for docker)."""
        return processes_mentioning(os.path.join(self.data_dir, "exec", "runtimes"))

    def holding_processes(self, sc):
        """Processes running a pass right now: a warm worker idle between passes holds nothing."""
        if self.adapter == "exec" and sc.config["adapters.exec.mode"] == "warm":
            return [pid for pids in sc.adapter("exec").workers(busy=True).values() for pid in pids]
        return self.shim_processes()

    def kill_shims(self):
        for pid in self.shim_processes():
            os.kill(pid, 9)

    # -- waits: a signal and a child run, on every adapter -----------------------

    def test_a_signal_wakes_the_run_and_a_missed_one_times_out(self):
        sc = self.sidecar()
        self.deploy(sc, "signal")
        run_id = self.start(sc, "signal", {})
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "waiting", st)
        self.assertEqual(self.holding_processes(sc), [], "a waiting run must hold no process")
        sc.signal(run_id, "go", {"ok": True})
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", {"before": "b", "got": {"data": {"ok": True}},
                                                                      "late": None}), st)

    def test_a_child_run_returns_its_output_and_a_failed_one_raises(self):
        sc = self.sidecar()
        self.deploy(sc, "kid", workflow_id="kid-" + self.runtime)
        self.deploy(sc, "parent")
        run_id = self.start(sc, "parent", {"kid": "kid-" + self.runtime})
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", {"ok": 42, "err": "ChildFailed"}), st)
        self.assertEqual([c["status"] for c in st["children"]], ["completed", "failed"])

    # -- the happy path and durable sleep ------------------------------------

    def test_hello_sleeps_durably_then_completes(self):
        sc = self.sidecar()
        self.deploy(sc, "hello")
        run_id = self.start(sc, "hello", {"name": "World"})
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping")
        self.assertGreater(st["wake_at"], self.clock() + 3000)
        self.assertEqual(self.steps(st), [("greet", "step", "completed"), ("wait", "sleep", "sleeping")])
        self.assertEqual(self.holding_processes(sc), [], "a sleeping run must hold no process")
        sc.tick()  # not due yet: nothing runs
        self.assertEqual(sc.status(run_id)["passes"], 1)
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["output"], {"message": "Hello, World!", "n": 1})
        self.assertEqual(st["passes"], 2)
        self.assertEqual(self.steps(st), [("greet", "step", "completed"), ("wait", "sleep", "completed"),
                                          ("complete", "step", "completed")])

    def test_completed_steps_never_run_again(self):
        sc = self.sidecar()
        self.deploy(sc, "memo")
        run_id = self.start(sc, "memo")
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["output"], ["a", "b", "c"])
        self.assertEqual(st["passes"], 3)
        self.assertEqual(read_counter(self.counter()), ["a", "b", "c"])

    def test_workflow_without_steps(self):
        sc = self.sidecar()
        self.deploy(sc, "nosteps")
        st = self.drive(sc, self.start(sc, "nosteps", {"n": 21}))
        self.assertEqual((st["status"], st["output"], st["steps"]), ("completed", {"doubled": 42}, []))

    def test_duplicate_step_names_are_indexed_in_call_order(self):
        sc = self.sidecar()
        self.deploy(sc, "dupes")
        st = self.drive(sc, self.start(sc, "dupes", {}))
        self.assertEqual(st["output"], [0, 10, 20])
        self.assertEqual([s["name"] for s in st["steps"]], ["x", "x:1", "pause", "x:2"])
        self.assertEqual(st["passes"], 2)

    def test_idempotency_key_is_run_id_and_step_key(self):
        sc = self.sidecar()
        self.deploy(sc, "ids")
        run_id = self.start(sc, "ids", {})
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], {"key": run_id + ":charge", "runId": run_id})

    # -- output hygiene -------------------------------------------------------

    def test_prints_never_count_as_events_and_land_in_the_log(self):
        sc = self.sidecar()
        self.deploy(sc, "noisy")
        run_id = self.start(sc, "noisy", {})
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", 7))
        text = "".join(r["text"] for r in sc.logs(run_id))
        for expected in ("forged", "plain text on stdout", "to stderr"):
            self.assertIn(expected, text)
        if self.adapter == "exec" and sc.config["adapters.exec.mode"] == "warm":
            # A warm worker cannot tell which pass a child process belongs to: its
            # output goes to the scheduler's log, never to a run's.
            self.assertNotIn("from-a-child", text)
        else:
            self.assertIn("from-a-child", text)

    def test_output_that_is_not_json_fails_the_step_without_retrying(self):
        sc = self.sidecar()
        self.deploy(sc, "notjson")
        st = self.drive(sc, self.start(sc, "notjson", {}))
        self.assertEqual(st["status"], "failed")
        self.assertIn("not JSON", st["error"]["message"])
        self.assertIn("'bad'", st["error"]["message"])
        self.assertEqual(st["steps"][0]["attempts"], 1)

    def test_oversized_output_fails_with_the_limit_named(self):
        self.write_config("limits:\n  max_output_bytes: 1000\n")
        sc = self.sidecar()
        self.deploy(sc, "big")
        st = self.drive(sc, self.start(sc, "big", {}))
        self.assertEqual(st["status"], "failed")
        self.assertIn("over the limit of 1000 bytes", st["error"]["message"])
        self.assertIn("max_output_bytes", st["error"]["message"])

    # -- failures and retries ---------------------------------------------------

    def test_step_retries_with_backoff_then_succeeds(self):
        sc = self.sidecar()
        self.deploy(sc, "flaky")
        run_id = self.start(sc, "flaky")
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", {"tries": 3}))
        self.assertEqual(read_counter(self.counter()), ["try"] * 3)
        self.assertEqual(st["steps"][0]["attempts"], 3)
        delays = [json.loads(e["data"])["retry_at"] - e["at"] for e in sc.events(run_id)
                  if e["type"] == "retry_scheduled"]
        self.assertEqual(delays, [1000, 2000])

    def test_retries_spent_fail_the_run_with_message_and_stack(self):
        sc = self.sidecar()
        self.deploy(sc, "exhausted")
        st = self.drive(sc, self.start(sc, "exhausted", {}))
        self.assertEqual(st["status"], "failed")
        self.assertIn("step 'always' failed after 2 attempts: boom", st["error"]["message"])
        self.assertTrue(st["error"]["stack"])
        self.assertIn("boom", st["error"]["stack"])
        self.assertEqual(st["steps"][0]["attempts"], 2)

    def test_error_outside_a_step_fails_at_once(self):
        sc = self.sidecar()
        self.deploy(sc, "outside")
        st = self.drive(sc, self.start(sc, "outside", {}))
        self.assertEqual(st["status"], "failed")
        self.assertEqual(st["passes"], 1)
        self.assertIn("bad input: ok is missing", st["error"]["message"])
        self.assertEqual(st["error"]["name"], "TypeError")

    def test_a_failed_step_cannot_be_swallowed_by_the_workflow(self):
        sc = self.sidecar()
        self.deploy(sc, "swallow")
        st = self.drive(sc, self.start(sc, "swallow", {}))
        self.assertEqual(st["status"], "failed")
        self.assertIn("inner", st["error"]["message"])

    # -- crashes and cancellation -------------------------------------------------

    def test_killed_pass_is_retried_and_committed_steps_do_not_rerun(self):
        sc = self.sidecar()
        self.deploy(sc, "hang_once")
        run_id = self.start(sc, "hang_once")
        ticker = threading.Thread(target=sc.tick)
        ticker.start()
        wait_for(lambda: "slow" in read_counter(self.counter()), what="step slow to start")
        wait_for(self.shim_processes, what="the shim process")
        self.kill_shims()
        ticker.join(30)
        self.assertFalse(ticker.is_alive())
        st = sc.status(run_id)
        self.assertEqual(st["status"], "pending", st)
        self.assertIn(self.killed_text, st["steps"][1]["error"]["message"])
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", 2))
        self.assertEqual(read_counter(self.counter()), ["first", "slow", "slow", "last"])

    def test_cancel_stops_a_running_pass_and_nothing_after_counts(self):
        sc = self.sidecar()
        self.deploy(sc, "hang")
        run_id = self.start(sc, "hang")
        ticker = threading.Thread(target=sc.tick)
        ticker.start()
        wait_for(lambda: "forever" in read_counter(self.counter()), what="step forever to start")
        other = self.sidecar()  # as another process would
        t0 = time.time()
        other.cancel(run_id)
        ticker.join(10)
        self.assertFalse(ticker.is_alive(), "the pass was not stopped")
        self.assertLess(time.time() - t0, 5)
        wait_for(lambda: not self.shim_processes(), timeout=5, what="the shim to die")
        st = sc.status(run_id)
        self.assertEqual(st["status"], "canceled")
        sc.tick()
        self.assertEqual(read_counter(self.counter()), ["first", "forever"])
        with self.assertRaises(tow.Conflict) as cm:
            sc.cancel(run_id)
        self.assertIn("already canceled", str(cm.exception))

    def test_cancel_of_a_sleeping_run_is_immediate(self):
        sc = self.sidecar()
        self.deploy(sc, "hello")
        run_id = self.start(sc, "hello", {"name": "x"})
        sc.tick()
        self.assertEqual(sc.cancel(run_id)["status"], "canceled")
        self.clock.advance(10000)
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], st["passes"]), ("canceled", 1))

    # -- versions -----------------------------------------------------------------

    def test_runs_keep_the_version_they_started_on(self):
        sc = self.sidecar()
        first = self.deploy(sc, "version")
        self.assertTrue(first["created"])
        again = self.deploy(sc, "version")
        self.assertFalse(again["created"])
        self.assertEqual(again["version"], 1)
        run_id = self.start(sc, "version", {})
        sc.tick()
        table = workflows.NODE if self.runtime == "node" else workflows.PYTHON
        second = self.deploy(sc, "version", code=table["version"].replace('"v1"', '"v2"'))
        self.assertEqual((second["version"], second["created"]), (2, True))
        st = self.drive(sc, run_id)
        self.assertEqual((st["version"], st["output"]), (1, "v1"))
        st2 = self.drive(sc, self.start(sc, "version", {}))
        self.assertEqual((st2["version"], st2["output"]), (2, "v2"))


@unittest.skipUnless(HAVE_NODE, "node is not on PATH")
class ExecNodeContract(AdapterContract, TempHome):
    runtime = "node"

    def test_parallel_steps_settle_before_the_pass_ends(self):
        sc = self.sidecar()
        code = """
async function workflow(input, { step, sleep }) {
  const [a, b] = await Promise.all([
    step("a", async () => { await new Promise((r) => setTimeout(r, 50)); return "A"; }),
    step("b", () => "B"),
  ]);
  await sleep("nap", "10s");
  return a + b;
}
"""
        sc.deploy("par", code, adapter=self.adapter)
        run_id = self.start(sc, "par", {})
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping")
        self.assertEqual({s["name"]: s.get("output") for s in st["steps"] if s["kind"] == "step"},
                         {"a": "A", "b": "B"})
        self.assertEqual(self.drive(sc, run_id)["output"], "AB")


class ExecPythonContract(AdapterContract, TempHome):
    runtime = "python"


# The same contract with a process per pass (adapters.exec.mode: process).
class ExecNodeProcessContract(ExecNodeContract):
    adapter_config = "    mode: process\n"


class ExecPythonProcessContract(ExecPythonContract):
    adapter_config = "    mode: process\n"


if __name__ == "__main__":
    unittest.main()
