"""serve / tick / the background runner: leases, crash recovery, concurrency, cancel, deadlines, SIGTERM.

These tests kill real processes: `serve` subprocesses with SIGKILL mid-step,
shims left orphaned, several schedulers on one database.
"""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import unittest

from tests import workflows
from tests.util import MODULE, ServeCase, TempHome, processes_mentioning, read_counter, tow, wait_for

# Each step body appends "<run_id> <step> <start-ms>" to the counter file, so a
# test can tell when every execution began and compare it with the commit time.
STAMPED_PY = """
import time
def mark(path, run_id, key, work_s=0.0):
    with open(path, "a") as f:
        f.write("%s %s %d\\n" % (run_id, key, int(time.time() * 1000)))
    if work_s:
        time.sleep(work_s)
    return key

def workflow(input, ctx):
    out = []
    for i in range(input.get("steps", 3)):
        out.append(ctx.step("s%d" % i, lambda i=i: mark(input["counter"], ctx.run_id, "s%d" % i, input.get("work", 0))))
    return out
"""


class Serve(ServeCase):
    def test_start_with_serve_alive_is_picked_up_at_once_without_a_runner(self):
        sc = self.sidecar(clock=False)
        sc.deploy("stamped", STAMPED_PY, runtime="python")
        self.serve()
        t0 = tow.now_ms()
        run_id = sc.start("stamped", {"counter": os.path.join(self.tmp, "c.txt"), "steps": 1})["id"]
        st = self.wait_status(sc, run_id, ("completed",))
        first = int(read_counter(os.path.join(self.tmp, "c.txt"))[0].split()[2])
        self.assertLess(first - t0, 3000)  # generous: the figure itself is measured in tests/bench.py
        self.assertEqual(processes_mentioning(self.config_path + " runner"), [])
        self.assertEqual(st["passes"], 1)

    def test_kill9_serve_mid_step_then_a_new_serve_finishes_the_run(self):
        sc = self.sidecar(clock=False)
        sc.deploy("stamped", STAMPED_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        first = self.serve()
        run_id = sc.start("stamped", {"counter": counter, "steps": 3, "work": 1.0})["id"]
        wait_for(lambda: len(read_counter(counter)) >= 2, what="the second step to start")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        # The orphaned shim sees its stdin close and stops by itself.
        wait_for(lambda: not self.shims(), timeout=5, what="the orphaned shim to exit")
        self.assertEqual(sc.status(run_id)["status"], "running")
        note = sc.status(run_id)
        self.serve()
        st = self.wait_status(sc, run_id, ("completed",))
        self.assertEqual(st["output"], ["s0", "s1", "s2"])
        self.assert_no_committed_step_reran(sc, counter)
        self.assertIn("lease_expired", [e["type"] for e in sc.events(run_id)])
        self.assertEqual(self.integrity(), "ok")
        self.assertIn("scheduler", note)

    def test_kill9_loop_many_runs(self):
        """Kill serve at random moments while five runs are mid-step; every run still completes correctly."""
        sc = self.sidecar(clock=False)
        sc.deploy("stamped", STAMPED_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        runs = [sc.start("stamped", {"counter": counter, "steps": 4, "work": 0.3}, drive=False)["id"]
                for _ in range(5)]
        rnd = random.Random(7)
        kills = 0
        deadline = time.time() + 60
        while time.time() < deadline:
            p = self.serve()
            time.sleep(rnd.uniform(0.4, 1.2))
            if all(sc.status(r)["status"] == "completed" for r in runs):
                break
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            if kills >= 5:
                self.serve()
                break
        for r in runs:
            st = self.wait_status(sc, r, ("completed", "failed"), timeout=60)
            self.assertEqual(st["status"], "completed", st)
            self.assertEqual(st["output"], ["s0", "s1", "s2", "s3"])
        self.assertGreater(kills, 0)
        self.assert_no_committed_step_reran(sc, counter)
        self.assertEqual(self.integrity(), "ok")

    def assert_no_committed_step_reran(self, sc, counter):
        completed = {}
        for line in read_counter(counter):
            run_id, key, at = line.split()
            if (run_id, key) not in completed:
                completed[(run_id, key)] = {s["name"]: s for s in sc.status(run_id)["steps"]}
        rows = {}
        conn = sqlite3.connect(os.path.join(self.data_dir, tow.DB_FILE))
        for run_id, key, completed_at in conn.execute("SELECT run_id, key, completed_at FROM steps"):
            rows[(run_id, key)] = completed_at
        conn.close()
        for line in read_counter(counter):
            run_id, key, at = line.split()
            self.assertIsNotNone(rows.get((run_id, key)), line)
            self.assertLessEqual(int(at), rows[(run_id, key)],
                                 "step %s of %s ran after its result was committed" % (key, run_id))

    def test_cancel_reaches_a_pass_in_flight_in_another_process(self):
        sc = self.sidecar(clock=False)
        sc.deploy("hang", workflows.PYTHON["hang"], runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        self.serve()
        run_id = sc.start("hang", {"counter": counter})["id"]
        wait_for(lambda: "forever" in read_counter(counter), what="the hanging step")
        proc = subprocess.run([sys.executable, MODULE, "--config", self.config_path, "cancel", run_id],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        t0 = time.time()
        wait_for(lambda: not self.shims(), timeout=5, what="the pass to be killed")
        self.assertLess(time.time() - t0, 5)  # about 0.1 s here; the figure is in tests/bench.py
        time.sleep(0.3)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "canceled")
        self.assertEqual(read_counter(counter), ["first", "forever"])

    def test_sigterm_lets_a_short_step_finish(self):
        self.write_config("shutdown_grace: 10s\n")
        sc = self.sidecar(clock=False)
        sc.deploy("stamped", STAMPED_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        p = self.serve()
        run_id = sc.start("stamped", {"counter": counter, "steps": 1, "work": 1.0})["id"]
        wait_for(lambda: read_counter(counter), what="the step to start")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)
        self.assertEqual(sc.status(run_id)["status"], "completed")
        log_text = self.serve_log(p)
        self.assertIn("INFO received SIGTERM", log_text)
        self.assertIn("INFO stopped", log_text)

    def test_sigterm_past_the_grace_releases_the_run(self):
        self.write_config("shutdown_grace: 1s\n")
        sc = self.sidecar(clock=False)
        sc.deploy("hang_once", workflows.PYTHON["hang_once"], runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        p = self.serve()
        run_id = sc.start("hang_once", {"counter": counter})["id"]
        wait_for(lambda: "slow" in read_counter(counter), what="the slow step")
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(15), 0)
        self.assertLess(time.time() - t0, 6)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "pending")
        self.assertEqual(st["steps"][1]["status"], "interrupted")
        self.assertIn("released", [e["type"] for e in sc.events(run_id)])
        self.assertEqual(self.shims(), [])
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", 2))
        self.assertEqual(read_counter(counter), ["first", "slow", "slow", "last"])

    def test_a_run_started_while_serve_stops_is_still_driven(self):
        self.write_config("shutdown_grace: 5s\n")
        sc = self.sidecar(clock=False)
        sc.deploy("stamped", STAMPED_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        p = self.serve()
        slow = sc.start("stamped", {"counter": counter, "steps": 1, "work": 2.0})["id"]
        wait_for(lambda: read_counter(counter), what="the slow step")
        p.send_signal(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in self.serve_log(p), what="serve to start stopping")
        late = sc.start("stamped", {"counter": counter, "steps": 1})["id"]  # serve no longer claims
        self.assertEqual(p.wait(15), 0)
        self.assertEqual(self.wait_status(sc, late, ("completed",), timeout=30)["status"], "completed")
        self.assertEqual(sc.status(slow)["status"], "completed")

    def test_wakes_on_time_for_a_sleep(self):
        sc = self.sidecar(clock=False)
        sc.deploy("sleeper", "def workflow(input, ctx):\n    ctx.sleep('nap', 2)\n    return ctx.step('x', lambda: 1)\n",
                  runtime="python")
        self.serve()
        run_id = sc.start("sleeper", {})["id"]
        st = self.wait_status(sc, run_id, ("completed",), timeout=20)
        wake = st["steps"][0]["wake_at"]
        claimed = [e["at"] for e in sc.events(run_id) if e["type"] == "pass_started"][1]
        self.assertGreaterEqual(claimed, wake)
        self.assertLess(claimed - wake, 5000)  # not poll_interval (30 s) late; figures in tests/bench.py


class ManySchedulers(ServeCase):
    lease_ttl = "5s"

    def test_three_schedulers_120_runs_each_step_once(self):
        sc = self.sidecar(clock=False)
        sc.deploy("stamped", STAMPED_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        # Steps that take a little while: warm workers are fast enough for one serve to
        # finish everything before the next one is up, and the work must be shared.
        runs = [sc.start("stamped", {"counter": counter, "steps": 3, "work": 0.02}, drive=False)["id"]
                for _ in range(120)]
        self.serve("--concurrency", "3")
        self.serve("--concurrency", "3")
        ticks = [subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "tick"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        for r in runs:
            self.wait_status(sc, r, ("completed", "failed"), timeout=120)
        for t in ticks:
            self.assertEqual(t.wait(60), 0)
        lines = read_counter(counter)
        seen = {}
        for line in lines:
            run_id, key, _ = line.split()
            seen[(run_id, key)] = seen.get((run_id, key), 0) + 1
        self.assertEqual(len(seen), 360)
        self.assertEqual(set(seen.values()), {1}, "a step ran twice")
        statuses = {sc.status(r)["status"] for r in runs}
        self.assertEqual(statuses, {"completed"})
        self.assertEqual({sc.status(r)["passes"] for r in runs}, {1})
        owners = set()
        for r in runs:
            for e in sc.events(r):
                if e["type"] == "pass_started":
                    owners.add(json.loads(e["data"])["owner"])
        self.assertGreaterEqual(len(owners), 2, "the work was not shared")
        self.assertEqual(self.integrity(), "ok")


class TimeoutsAndDeadlines(TempHome):
    timeout = "1s"

    def test_pass_timeout_kills_and_retries(self):
        sc = self.sidecar()
        sc.deploy("hang_once", workflows.PYTHON["hang_once"], runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        run_id = sc.start("hang_once", {"counter": counter}, drive=False)["id"]
        t0 = time.time()
        sc.tick()
        self.assertLess(time.time() - t0, 10)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "pending")
        self.assertIn("timed out after 1.0s", st["steps"][1]["error"]["message"])
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", 2))

    def test_deadline_fails_a_sleeping_run_on_time(self):
        sc = self.sidecar()
        sc.deploy("hello", workflows.PYTHON["hello"], runtime="python", deadline="1h")
        self.assertIsNotNone(sc.status(sc.start("hello", {"name": "x"}, drive=False)["id"])["deadline_at"])
        run_id = sc.start("hello", {"name": "x"}, deadline="2s", drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping")
        self.clock.advance(2500)
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "failed")
        self.assertEqual(st["error"]["name"], "DeadlineExceeded")
        self.assertIn("passed its deadline", st["error"]["message"])

    def test_deadline_stops_a_running_pass(self):
        self.timeout = "60s"
        self.write_config()
        sc = self.sidecar(clock=False)
        sc.deploy("hang", workflows.PYTHON["hang"], runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        run_id = sc.start("hang", {"counter": counter}, deadline="1500ms", drive=False)["id"]
        t0 = time.time()
        sc.tick()
        self.assertLess(time.time() - t0, 8)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "failed")
        self.assertIn("deadline", st["error"]["message"])


class Runner(TempHome):
    def test_status_says_when_no_scheduler_is_alive(self):
        sc = self.sidecar()
        sc.deploy("hello", workflows.PYTHON["hello"], runtime="python")
        run_id = sc.start("hello", {"name": "x"}, drive=False)["id"]
        code, out, err = self.cli("status", run_id)
        self.assertIn("note      no scheduler is alive to drive this run; run `ty-openworkflow tick`", out)

    def test_background_runner_exits_when_nothing_is_due_soon(self):
        sc = self.sidecar(clock=False)
        sc.deploy("long", "def workflow(input, ctx):\n    ctx.step('a', lambda: 1)\n    ctx.sleep('s', '1h')\n",
                  runtime="python")
        run_id = sc.start("long", {})["id"]
        self.wait_for_status(sc, run_id, "sleeping")
        wait_for(lambda: not processes_mentioning(self.config_path + " runner"), timeout=15,
                 what="the runner to exit")
        self.assertIn("no scheduler is alive", sc.status(run_id)["scheduler"]["message"])

    def wait_for_status(self, sc, run_id, status):
        wait_for(lambda: sc.status(run_id)["status"] == status, timeout=20, what=status)


if __name__ == "__main__":
    unittest.main()
