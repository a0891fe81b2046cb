"""Reliability regressions: fd leaks, store errors in the scheduler loop, disk full, self-reclaimed
passes, the tick exit race, backoff overflow, shutdown/launch edge cases, closed pipes, config ranges.

Every test asserts on what a user can observe (run status, how often a step's side effect ran,
whether a process is alive, fd counts, store rows), not on the wording of errors.
"""
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

from tests import workflows
from tests.util import (HAVE_NODE, MODULE, ServeCase, TempHome, db_path, processes_mentioning,
                        read_counter, tow, wait_for, write_lock)
from tests.workflows import ONE_STEP_PY


def fd_count(pid="self"):
    return len(os.listdir("/proc/%s/fd" % pid))


def run_row(case, run_id):
    conn = sqlite3.connect(db_path(case))
    try:
        cur = conn.execute("SELECT status, pass_id, lease_owner, lease_expires_at, available_at FROM runs "
                           "WHERE id = ?", (run_id,))
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# 1. file descriptors stay flat
# ---------------------------------------------------------------------------


class FdLeak(ServeCase):
    def test_serve_fd_count_stays_flat_over_many_passes(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        p = self.serve()

        def run_batch(n):
            ids = [sc.start("one", {}, drive=False)["id"] for _ in range(n)]
            sc.poke_schedulers()
            for r in ids:
                self.wait_status(sc, r, ("completed", "failed"), timeout=60, proc=p)
            self.assertEqual({sc.status(r)["status"] for r in ids}, {"completed"})
            time.sleep(0.3)  # passes fully wound down (pipes closed)
            return fd_count(p.pid)

        # The first batch warms up what is pooled and bounded (SQLite connections, at most 8 idle,
        # 3 fds each; warm workers, one per core); a leak grows with every later pass.
        first = run_batch(70)
        after = run_batch(140)
        self.assertIsNone(p.poll())
        self.assertLess(after, first + 10, "serve's open fds grew from %d to %d over 140 passes" % (first, after))
        self.assertLess(after, 60, "serve holds %d fds after 210 passes" % after)

    def test_store_query_from_200_short_lived_threads_keeps_fds_flat(self):
        store = self.sidecar().store
        store.query("SELECT 1")
        before = fd_count()
        errors = []

        def work():
            try:
                store.query("SELECT count(*) FROM runs")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        for _ in range(200):
            t = threading.Thread(target=work)
            t.start()
            t.join()
        self.assertEqual(errors, [])
        grown = fd_count() - before
        self.assertLessEqual(grown, 5, "200 short-lived threads left %d more fds open" % grown)


# ---------------------------------------------------------------------------
# 2. a store error in the main loop does not end serve
# ---------------------------------------------------------------------------


class LoopSurvivesStoreErrors(ServeCase):
    def test_serve_outlives_a_write_lock_held_past_the_busy_timeout(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        p = self.serve(busy_timeout_ms=300)
        with write_lock(db_path(self)):
            t0 = time.time()
            while time.time() - t0 < 2.0:
                sc.poke_schedulers()  # a read: makes the loop look at the store (and hit the lock)
                time.sleep(0.25)
        time.sleep(0.3)
        self.assertIsNone(p.poll(), "serve exited (%s) on a locked store:\n%s" % (p.returncode, self.serve_log(p)))
        counter = os.path.join(self.tmp, "c.txt")
        run_id = sc.start("one", {"counter": counter})["id"]
        st = self.wait_status(sc, run_id, ("completed", "failed"), timeout=30, proc=p)
        self.assertEqual(st["status"], "completed", st)
        self.assertEqual(read_counter(counter), ["s"])
        self.assertIsNone(p.poll())


# ---------------------------------------------------------------------------
# 3. disk full is a retried pass
# ---------------------------------------------------------------------------

BIG_PY = """
def workflow(input, ctx):
    out = ctx.step("big", lambda: "x" * 400000)
    return len(out)
"""


class DiskFull(TempHome):
    def test_sqlite_full_mid_pass_is_retried_not_failed(self):
        sc0 = self.sidecar()
        sc0.deploy("big", BIG_PY, runtime="python")
        run_id = sc0.start("big", {}, drive=False)["id"]
        sc0.close()
        conn = sqlite3.connect(db_path(self))
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.close()
        state = {"limit": pages + 16}  # room for claims and journal rows, not for a 400 KB output
        conns = []
        orig = tow.Store._connect

        def limited(store):
            c = orig(store)
            if state["limit"]:
                c.execute("PRAGMA max_page_count = %d" % state["limit"]).fetchall()
            conns.append(c)
            return c

        with mock.patch.object(tow.Store, "_connect", limited):
            sc = self.sidecar()
            sc.tick()
            st = sc.status(run_id)
            self.assertNotEqual(st["status"], "failed", st["error"])
            self.assertNotEqual(st["status"], "completed", "the limit did not bite; the test proves nothing")
            # Lift the limit everywhere (connections may be reused), then drive on.
            state["limit"] = None
            for c in conns:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("PRAGMA max_page_count = 1073741823").fetchall()
            sc.close()
        sc2 = self.sidecar()
        if sc2.status(run_id)["status"] == "running":  # tolerate a pass left to its lease, never a failed run
            self.clock.advance(31000)
        st = self.drive(sc2, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", 400000), st.get("error"))

    def test_error_after_sqlite_already_rolled_back_is_a_store_error(self):
        store = self.sidecar().store
        with self.assertRaises(tow.StoreError):
            with store.transaction() as c:
                c.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL
                raise sqlite3.OperationalError("database or disk is full")
        # The store is still usable afterwards.
        with store.transaction() as c:
            c.execute("SELECT 1")
        self.assertEqual(store.query("SELECT 1 AS x"), [{"x": 1}])


# ---------------------------------------------------------------------------
# 4. a scheduler never reclaims its own live pass
# ---------------------------------------------------------------------------


class NoSelfReclaim(ServeCase):
    def test_serve_with_lease_stalled_by_a_write_lock_runs_the_step_once(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        p = self.serve()  # real 10 s busy timeout: the loop and heartbeat block, they do not fail
        run_id = sc.start("one", {"counter": counter, "work": 4.0})["id"]
        wait_for(lambda: read_counter(counter), what="the step to start")
        with write_lock(db_path(self)):
            time.sleep(3.5)  # longer than lease_ttl (2s): no heartbeat can renew meanwhile
        st = self.wait_status(sc, run_id, ("completed", "failed"), timeout=30, proc=p)
        self.assertEqual(st["status"], "completed", st)
        self.assertEqual(read_counter(counter), ["s"], "the step ran more than once")


class NoSelfReclaimInProcess(TempHome):
    lease_ttl = "30s"  # heartbeat every 10 s: none happens during the test

    def test_scheduler_does_not_reclaim_its_own_active_pass_when_its_lease_lapses(self):
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        sched = tow.Scheduler(sc, kind="serve", clock=self.clock)
        loop = threading.Thread(target=sched.loop, daemon=True)
        loop.start()
        try:
            run_id = sc.start("one", {"counter": counter, "work": 1.5}, drive=False)["id"]
            sched.wake()
            wait_for(lambda: read_counter(counter), what="the step to start")
            self.clock.advance(60000)  # the pass's lease lapses while it is still running here
            sched.wake()
            wait_for(lambda: sc.status(run_id)["status"] in tow.TERMINAL, timeout=20, what="the run to end")
            time.sleep(0.3)
        finally:
            sched.stop(hurry=True)
            loop.join(20)
        self.assertFalse(loop.is_alive())
        st = sc.status(run_id)
        self.assertEqual(st["status"], "completed", st)
        self.assertEqual(read_counter(counter), ["s"], "the scheduler replayed its own live pass")


# ---------------------------------------------------------------------------
# 5. a start during tick's exit is not stranded
# ---------------------------------------------------------------------------


class TickExitRace(TempHome):
    def test_run_started_while_tick_unregisters_is_still_driven(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        other = self.sidecar(clock=False)
        orig = sc.store.unregister_scheduler
        seen = {}

        def racing_unregister(sched_id):
            if not seen:
                seen["run_id"] = other.start("one", {}, drive=False)["id"]
                # What start() does next: find live schedulers; the tick is one, so no runner is spawned.
                seen["live"] = [s["id"] for s in other.poke_schedulers()]
                seen["sched_id"] = sched_id
            return orig(sched_id)

        sc.store.unregister_scheduler = racing_unregister
        sc.tick()
        self.assertIn("run_id", seen, "tick never unregistered")
        self.assertIn(seen["sched_id"], seen["live"], "the tick did not look alive to start()")
        run_id = seen["run_id"]
        wait_for(lambda: other.status(run_id)["status"] in tow.TERMINAL, timeout=10,
                 what="the run started during tick's exit to be driven")
        self.assertEqual(other.status(run_id)["status"], "completed")


# ---------------------------------------------------------------------------
# 6. retry backoff never overflows
# ---------------------------------------------------------------------------

ALWAYS_FAILS_PY = """
import os
def attempt(path):
    with open(path, "a") as f:
        f.write("try\\n")
    if not os.path.exists(path + ".ok"):
        raise RuntimeError("not yet")
    return "done"

def workflow(input, ctx):
    return ctx.step("s", lambda: attempt(input["counter"]), max_attempts=10000, backoff=100)
"""


class BackoffOverflow(TempHome):
    extra_config = "limits:\n  max_step_attempts: 1000000\n"

    def test_backoff_ms_caps_huge_exponents(self):
        policy = {"initial_ms": 1000, "backoff": 100.0, "max_ms": 100000}
        for attempts in (155, 156, 200, 500, 10000):
            with self.subTest(attempts=attempts):
                self.assertEqual(tow.backoff_ms(policy, attempts), 100000)
        self.assertEqual(tow.backoff_ms(policy, 1), 1000)
        self.assertEqual(tow.backoff_ms(policy, 2), 100000)

    def test_a_step_retried_hundreds_of_times_keeps_retrying(self):
        sc = self.sidecar()
        sc.deploy("flaky", ALWAYS_FAILS_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        run_id = sc.start("flaky", {"counter": counter}, drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "pending")
        # Fast-forward: the step has already been tried 300 times (100 ** 299 overflows a float).
        conn = sqlite3.connect(db_path(self))
        with conn:
            conn.execute("UPDATE steps SET attempts = 300 WHERE run_id = ? AND key = 's'", (run_id,))
        conn.close()
        for _ in range(3):
            self.clock.advance_to(st["available_at"])
            sc.tick()
            st = sc.status(run_id)
            self.assertNotEqual(st["status"], "failed", st["error"])
            self.assertEqual(st["status"], "pending")
            self.assertLessEqual(st["available_at"] - self.clock(), 100000 + 5000)
        self.assertEqual(st["steps"][0]["attempts"], 303)
        with open(counter + ".ok", "w"):
            pass
        self.clock.advance_to(st["available_at"])
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", "done"), st.get("error"))


# ---------------------------------------------------------------------------
# 7. suspected defects
# ---------------------------------------------------------------------------


class ShutdownBeforeLaunch(TempHome):
    def test_pass_released_before_it_launched_is_given_back(self):
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        sched = tow.Scheduler(sc, kind="serve", clock=self.clock)
        orig = sc.store.history
        entered = threading.Event()

        def slow_history(run_id):
            if not entered.is_set():
                entered.set()
                deadline = time.time() + 10
                while time.time() < deadline:  # hold the pass until shutdown has marked it for release
                    if sched.hurry.is_set() and all(ap.release for ap in list(sched.active.values())):
                        break
                    time.sleep(0.01)
                time.sleep(0.05)
            return orig(run_id)

        sc.store.history = slow_history
        loop = threading.Thread(target=sched.loop, daemon=True)
        loop.start()
        try:
            run_id = sc.start("one", {}, drive=False)["id"]
            sched.wake()
            self.assertTrue(entered.wait(10), "the pass never started")
        finally:
            sched.stop(hurry=True)
            loop.join(20)
        self.assertFalse(loop.is_alive())
        row = run_row(self, run_id)
        self.assertEqual((row["status"], row["lease_owner"], row["pass_id"]), ("pending", None, None), row)
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")


@unittest.skipUnless(HAVE_NODE, "node is not on PATH")
class ParallelStepsKilled(TempHome):
    CODE = """const fs = require("fs");
async function workflow(input, { step }) {
  const slow = (name) => step(name, async () => {
    fs.appendFileSync(input.counter, name + "\\n");
    await new Promise((r) => setTimeout(r, 30000));
    return name;
  });
  return await Promise.all([slow("a"), slow("b")]);
}
"""

    def test_killed_pass_leaves_no_step_running(self):
        sc = self.sidecar()
        sc.deploy("par", self.CODE, runtime="node")
        counter = os.path.join(self.tmp, "c.txt")
        run_id = sc.start("par", {"counter": counter}, drive=False)["id"]
        tick = threading.Thread(target=sc.tick, daemon=True)
        tick.start()
        try:
            watcher = self.sidecar()
            wait_for(lambda: len(read_counter(counter)) == 2 and
                     [s["status"] for s in watcher.store.steps(run_id)] == ["running", "running"],
                     what="both steps in flight")
            shims = processes_mentioning(os.path.join(self.data_dir, "exec", "runtimes"))
            self.assertTrue(shims)
            for pid in shims:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            tick.join(20)
        self.assertFalse(tick.is_alive())
        st = sc.status(run_id)
        self.assertEqual(st["status"], "pending", st)
        self.assertEqual([s["name"] for s in st["steps"]], ["a", "b"])
        for s in st["steps"]:
            self.assertNotEqual(s["status"], "running", st["steps"])


class CannotStartThread(TempHome):
    def test_launch_raising_cant_start_new_thread_is_retried(self):
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        adapter = sc.adapter("exec")
        orig = adapter.launch
        calls = []

        def launch(spec):
            calls.append(spec.pass_id)
            if len(calls) == 1:
                raise RuntimeError("can't start new thread")
            return orig(spec)

        adapter.launch = launch
        run_id = sc.start("one", {"counter": counter}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed", st["error"])
        self.assertGreaterEqual(len(calls), 2)
        self.assertEqual(read_counter(counter), ["s"])

    def test_pass_thread_that_cannot_start_does_not_crash_the_loop(self):
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        run_id = sc.start("one", {"counter": counter}, drive=False)["id"]
        orig_start = threading.Thread.start
        refused = []

        def flaky_start(thread):
            target = getattr(getattr(thread, "_target", None), "__name__", "")
            if not refused and (thread.name.startswith("tyow-pass-") or target in ("_drive_safe", "_drive")):
                refused.append(thread.name)
                raise RuntimeError("can't start new thread")
            return orig_start(thread)

        with mock.patch.object(threading.Thread, "start", flaky_start):
            sc.tick()  # must not raise
        self.assertTrue(refused, "the pass thread was never started")
        self.assertNotEqual(sc.status(run_id)["status"], "failed")
        # Once threads are available again the run is driven again (waiting out its lease is tolerated).
        if sc.status(run_id)["status"] == "running":
            self.clock.advance(31000)
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed", st["error"])
        self.assertEqual(read_counter(counter), ["s"])


# ---------------------------------------------------------------------------
# 8. closed stdout pipe; config ranges
# ---------------------------------------------------------------------------

LOUD_PY = """
import sys
def workflow(input, ctx):
    for i in range(3000):
        sys.stderr.write("log line %05d %s\\n" % (i, "z" * 60))
    return ctx.step("big", lambda: "y" * 300000)
"""


class ClosedPipe(TempHome):
    def test_status_logs_and_list_runs_into_a_closed_pipe(self):
        sc = self.sidecar()
        sc.deploy("loud", LOUD_PY, runtime="python")
        run_id = sc.start("loud", {}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        version = sc.workflow("loud")["latest_version"]
        now = tow.now_ms()
        for n in range(2, 6):  # more passes' logs: `logs` keeps writing after the reader is gone
            sc.store.add_log(run_id, "pass_filler%d" % n, n, "exec", ("w" * 79 + "\n") * 1000, now)
        with sc.store.transaction() as c:  # enough runs for `list runs` to fill the pipe
            for i in range(1500):
                c.execute("INSERT INTO runs (id, workflow_id, version, status, input, available_at, "
                          "task_requested, created_at, updated_at) VALUES (?, 'loud', ?, 'canceled', '{}', "
                          "NULL, 0, ?, ?)", ("run_filler%06d" % i, version, now, now))
        for argv in (["status", run_id], ["logs", run_id], ["list", "runs", "-n", "100000"]):
            with self.subTest(argv=argv):
                p = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path] + argv,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                try:
                    first = p.stdout.readline()
                    self.assertTrue(first)
                    p.stdout.close()  # like `| head -1`
                    err = p.stderr.read().decode("utf-8", "replace")
                    p.wait(20)
                finally:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                    p.stderr.close()
                self.assertNotIn("Traceback", err)
                self.assertNotIn("BrokenPipeError", err)


class ConfigRanges(TempHome):
    def test_webhook_port_out_of_range_is_refused_at_load(self):
        for port in ("99999", "65536", "-1"):
            with self.subTest(port=port):
                self.write_config("webhook:\n  port: %s\n" % port)
                self.assert_refused(["list", "runs"], tow.ConfigError.exit_code, "webhook.port")

    def test_serve_with_an_out_of_range_port_exits_cleanly(self):
        self.write_config("webhook:\n  enabled: true\n  port: 99999\n")
        p = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "serve"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            self.fail("serve kept running with webhook.port 99999")
        self.assertEqual(p.returncode, tow.ConfigError.exit_code, err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("OverflowError", err)
        self.assertIn("webhook.port", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)


# ---------------------------------------------------------------------------
# 9. status says why the last pass died
# ---------------------------------------------------------------------------


class StatusShowsPassEnd(TempHome):
    timeout = "1s"

    def check(self, code):
        sc = self.sidecar(clock=False)
        sc.deploy("slow", code, runtime="python")
        run_id = sc.start("slow", {}, drive=False)["id"]
        sc.tick()
        self.assertEqual(sc.status(run_id)["status"], "pending")
        rc, out, err = self.cli("status", run_id, "--json")
        self.assertEqual(rc, 0, err)
        self.assertIn("timed out", out)
        rc, out, err = self.cli("status", run_id)
        self.assertEqual(rc, 0, err)
        self.assertIn("timed out", out)

    def test_timeout_while_a_step_runs(self):
        self.check("import time\ndef workflow(input, ctx):\n    return ctx.step('s', lambda: time.sleep(5))\n")

    def test_timeout_outside_any_step(self):
        self.check("import time\ndef workflow(input, ctx):\n    time.sleep(5)\n    return ctx.step('s', lambda: 1)\n")


# ---------------------------------------------------------------------------
# 10. small ones
# ---------------------------------------------------------------------------


class SmallOnes(TempHome):
    def test_sidecar_with_a_missing_config_path_raises_config_error(self):
        with self.assertRaises(tow.ConfigError):
            tow.Sidecar(config_path=os.path.join(self.tmp, "missing.yaml"))

    def test_start_wait_json_prints_the_run_id(self):
        self.sidecar().deploy("one", ONE_STEP_PY, runtime="python")
        proc = subprocess.run([sys.executable, MODULE, "--config", self.config_path, "start", "one", "-i", "{}",
                               "--wait", "--json"], capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        [run] = self.sidecar().list_runs()
        json_lines = []
        for line in proc.stdout.splitlines():
            with contextlib.suppress(ValueError):
                json_lines.append(json.loads(line))
        self.assertTrue(any(run["id"] in json.dumps(doc) for doc in json_lines), proc.stdout)

    def test_deploy_a_py_file_without_runtime_deploys_python(self):
        path = os.path.join(self.tmp, "x.py")
        with open(path, "w") as f:
            f.write(workflows.PYTHON["hello"])
        code, out, err = self.cli("deploy", "wf", "-f", path)
        self.assertEqual(code, 0, err)
        code, out, err = self.cli("list", "workflows", "--json")
        [wf] = json.loads(out)
        self.assertEqual((wf["id"], wf["runtime"]), ("wf", "python"))

    def test_sleep_step_is_not_completed_while_the_run_sleeps(self):
        sc = self.sidecar()
        sc.deploy("hello", workflows.PYTHON["hello"], runtime="python")
        run_id = sc.start("hello", {"name": "x"}, drive=False)["id"]
        sc.tick()
        code, out, err = self.cli("status", run_id, "--json")
        st = json.loads(out)
        self.assertEqual(st["status"], "sleeping")
        [nap] = [s for s in st["steps"] if s["kind"] == "sleep"]
        self.assertNotEqual(nap["status"], "completed")
        self.clock.advance_to(st["wake_at"] + 1000)  # due, but no tick has run yet
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping")
        [nap] = [s for s in st["steps"] if s["kind"] == "sleep"]
        self.assertNotEqual(nap["status"], "completed", "the sleep shows completed while the run still sleeps")
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")


if __name__ == "__main__":
    unittest.main()
