"""Leases under stalls, clock jumps and dead holders: one scheduler per run, at once where it can be proven.

- a pass whose lease could not be renewed in time is frozen (SIGSTOP), and goes on once a renewal
  gets through, so its step runs once;
- a pass whose lease another scheduler took is killed at the next renewal;
- a scheduler whose wall clock jumped an hour ahead does not rob a live `serve` of this host;
- a `serve` killed with its passes is taken over by the next scheduler at once, not after lease_ttl.
"""
import os
import signal
import sqlite3
import threading
import time
import unittest

from tests.util import (ServeCase, TempHome, db_path, proc_state, proc_state_or_none,
                        processes_mentioning, read_counter, tow, wait_for, write_lock)
from tests.workflows import ONE_STEP_PY, ORPHAN_MAKER


class InProcessLeases(TempHome):
    lease_ttl = "2s"

    def start_loop(self, sc, clock=None):
        sched = tow.Scheduler(sc, kind="serve", clock=clock or self.clock)
        loop = threading.Thread(target=sched.loop, daemon=True)
        loop.start()
        self.addCleanup(lambda: (sched.stop(hurry=True), loop.join(20)))
        return sched

    def shim_pid(self):
        pids = processes_mentioning(os.path.join(self.data_dir, "exec", "runtimes"))
        return pids[0] if pids else None

    def test_a_pass_is_frozen_while_its_lease_is_in_doubt_and_thawed_after(self):
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        sched = self.start_loop(sc)
        run_id = sc.start("one", {"counter": counter, "work": 3.0}, drive=False)["id"]
        sched.wake()
        wait_for(lambda: read_counter(counter), what="the step to start")
        pid = wait_for(self.shim_pid, what="the shim")
        with write_lock(db_path(self)):
            # No renewal can get through: within the lease the pass is frozen.
            wait_for(lambda: proc_state(pid) == "T", timeout=5, what="the pass to be frozen")
            time.sleep(0.5)
            self.assertEqual(proc_state(pid), "T")
        wait_for(lambda: proc_state(pid) != "T", timeout=5, what="the pass to be thawed")
        wait_for(lambda: sc.status(run_id)["status"] in tow.TERMINAL, timeout=20, what="the run to end")
        self.assertEqual(sc.status(run_id)["status"], "completed")
        self.assertEqual(read_counter(counter), ["s"])

    def test_a_pass_whose_run_another_scheduler_took_is_killed(self):
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        sched = self.start_loop(sc)
        run_id = sc.start("one", {"counter": counter, "work": 30.0}, drive=False)["id"]
        sched.wake()
        wait_for(lambda: read_counter(counter), what="the step to start")
        pid = wait_for(self.shim_pid, what="the shim")
        conn = sqlite3.connect(db_path(self), isolation_level=None)
        conn.execute("UPDATE runs SET pass_id = 'pass_other', lease_owner = 'sched_other' WHERE id = ?", (run_id,))
        conn.close()
        # The next renewal (every lease_ttl / 4) finds the lease gone and kills the pass.
        wait_for(lambda: not os.path.exists("/proc/%d" % pid) or proc_state(pid) == "Z", timeout=3,
                 what="the pass to be killed")


class ServeLeases(ServeCase):
    lease_ttl = "60s"
    linger = "3s"

    def test_a_clock_an_hour_ahead_does_not_rob_a_live_serve_of_this_host(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        self.serve()
        run_id = sc.start("one", {"counter": counter, "work": 2.0})["id"]
        wait_for(lambda: read_counter(counter), what="the step to start")
        jumped = self.sidecar()  # its clock is an hour ahead: serve's lease looks long expired
        self.clock.advance(3600 * 1000)
        stats = jumped.tick()
        self.assertEqual(stats["passes"], 0, "a tick with a jumped clock claimed a run a live serve holds")
        final = wait_for(lambda: (lambda st: st if st["status"] in tow.TERMINAL else None)(sc.status(run_id)),
                         timeout=20, what="the run to end")
        self.assertEqual(final["status"], "completed")
        self.assertEqual(read_counter(counter), ["s"])

    def test_a_killed_serve_is_taken_over_at_once_not_after_the_lease(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        first = self.serve()
        run_id = sc.start("one", {"counter": counter, "work": 1.0})["id"]
        wait_for(lambda: read_counter(counter), what="the step to start")
        os.killpg(first.pid, signal.SIGKILL)  # serve and its pass, as a machine losing that process tree
        first.wait()
        t0 = time.time()
        self.serve()
        final = wait_for(lambda: (lambda st: st if st["status"] in tow.TERMINAL else None)(sc.status(run_id)),
                         timeout=30, what="the run to end")
        self.assertEqual(final["status"], "completed", final)
        # Far under the 60 s lease: the new serve proved the holder dead and took the run.
        self.assertLess(time.time() - t0, 20)
        self.assertEqual(len(read_counter(counter)), 2)  # the killed step ran again (at-least-once)


class Orphans(ServeCase):
    lease_ttl = "60s"
    linger = "3s"

    def test_what_a_killed_serve_left_behind_is_stopped_by_the_next_one(self):
        for mode in ("warm", "process"):
            with self.subTest(mode=mode):
                self.write_config(adapter="    mode: %s\n" % mode)
                sc = self.sidecar(clock=False)
                sc.deploy("orphan", ORPHAN_MAKER, runtime="python")
                pidfile = os.path.join(self.tmp, "child-%s.pid" % mode)
                first = self.serve()
                sc.start("orphan", {"pidfile": pidfile})
                child = int(wait_for(lambda: read_counter(pidfile), what="the step's child")[0])
                os.killpg(first.pid, signal.SIGKILL)  # serve only: its worker dies with it, the child does not
                first.wait()
                time.sleep(0.3)
                self.assertEqual(proc_state_or_none(child), "S", "the child should still be there to reap")
                self.serve()
                wait_for(lambda: proc_state_or_none(child) in (None, "Z"), timeout=10,
                         what="the orphaned child to be stopped")
                for p in self.procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()


if __name__ == "__main__":
    unittest.main()
