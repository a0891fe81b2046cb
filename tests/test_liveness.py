"""Liveness that knows what it is looking at: a scheduler touches only its own store's processes,
and a pid is judged only in the PID namespace that gives it its meaning.

- `serve` of one store leaves alone what a dead scheduler of another store left behind, and a
  process whose TYOW_OWNER is stray or copied, while it still stops its own store's orphans;
- a scheduler whose pid proves nothing here (another PID namespace, or none recorded by older
  code) is never judged dead by its pid: its runs are taken only once their lease has run out;
- a second `serve` in its own PID namespace (unshare) sharing the data dir does not rob a live
  first one, and takes its run once it died and the lease expired.
"""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import unittest

from tests.util import (CONFIG_TEMPLATE, MODULE, ServeCase, TempHome, db_path, proc_state_or_none,
                        read_counter, tow, wait_for)
from tests.workflows import ONE_STEP_PY, ORPHAN_MAKER


def unused_pid():
    """A pid no process of this namespace has."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while os.path.exists("/proc/%d" % pid):
        pid -= 1
    return pid


def owner_value(pid):
    """The TYOW_OWNER a process carries in its environment."""
    with open("/proc/%d/environ" % pid, "rb") as f:
        for item in f.read().split(b"\0"):
            if item.startswith(b"TYOW_OWNER="):
                return item.split(b"=", 1)[1].decode()
    return None


def unshare_works():
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    try:
        argv = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


HAVE_UNSHARE = unshare_works()


class Strays:
    """Plain `sleep` processes carrying a given TYOW_OWNER mark, killed after the test."""

    def setUp(self):
        super().setUp()
        self.strays = []

    def tearDown(self):
        for p in self.strays:
            if p.poll() is None:
                p.kill()
            p.wait()
        super().tearDown()

    def stray(self, owner):
        p = subprocess.Popen(["sleep", "300"], env=dict(os.environ, TYOW_OWNER=owner))
        self.strays.append(p)
        return p


class OtherStores(Strays, ServeCase):
    """Two stores of one user: each `serve` stops only its own store's orphans."""

    lease_ttl = "60s"
    linger = "3s"

    def setUp(self):
        super().setUp()
        self.other_dir = os.path.join(self.tmp, "other-data")
        self.other_config = os.path.join(self.tmp, "other.yaml")
        with open(self.other_config, "w") as f:
            f.write(CONFIG_TEMPLATE.format(data_dir=self.other_dir, linger="3s", lease_ttl="60s",
                                           timeout="60s", adapter_extra="", extra=""))

    def serve_of(self, config_path):
        p = self.spawn([sys.executable, MODULE, "--config", config_path, "serve"])
        sc = tow.Sidecar(config_path=config_path)
        self._sidecars.append(sc)
        self.wait_registered(p, sc)
        return p, sc

    def orphan_of(self, config_path, name):
        """A step's child left behind by a SIGKILLed `serve` of the store of ``config_path``."""
        first, sc = self.serve_of(config_path)
        sc.deploy("orphan", ORPHAN_MAKER, runtime="python")
        pidfile = os.path.join(self.tmp, name + ".pid")
        sc.start("orphan", {"pidfile": pidfile})
        child = int(wait_for(lambda: read_counter(pidfile), what="the step's child")[0])
        os.killpg(first.pid, signal.SIGKILL)  # serve only: the step's child lives on
        first.wait()
        return child

    def test_serve_stops_only_its_own_stores_orphans(self):
        theirs = self.orphan_of(self.other_config, "theirs")
        copied = self.stray(owner_value(theirs))  # a real mark of the other store, copied
        ours = self.orphan_of(self.config_path, "ours")
        time.sleep(0.3)
        self.assertEqual(proc_state_or_none(ours), "S", "our orphan should still be there to reap")
        self.serve_of(self.config_path)
        wait_for(lambda: proc_state_or_none(ours) in (None, "Z"), timeout=10,
                 what="our orphan to be stopped")
        # One sweep judged them all: what is not ours is still running.
        self.assertEqual(proc_state_or_none(theirs), "S", "the other store's process was killed")
        self.assertIsNone(copied.poll(), "a sleep with the other store's mark was killed")
        os.kill(theirs, signal.SIGKILL)


class Marks(Strays, TempHome):
    """What a mark says, and that only a mark of this store and this namespace is judged by pid."""

    def setUp(self):
        super().setUp()
        self.store = self.sidecar().store

    def test_a_pass_carries_its_store_and_namespace(self):
        impl = self.sidecar().adapter("exec")
        mark = tow.parse_owner_mark(impl.env(None)[tow.OWNER_ENV])
        self.assertEqual(mark[0], self.store.store_id)
        self.assertEqual(mark[1], os.getpid())
        self.assertEqual(mark[3], tow.pid_namespace())
        self.assertNotEqual(self.store.store_id, tow.Store(os.path.join(self.tmp, "b")).store_id)

    def test_parse_owner_mark(self):
        for text, want in [("s1:12:345:4026531836", ("s1", 12, "345", "4026531836")),
                           ("s1:12::", ("s1", 12, None, None)),
                           ("12:345", None), ("12:", None), (":12:345:4026531836", None),
                           ("s1:x:345:1", None), ("", None), ("a:b:c:d:e", None)]:
            with self.subTest(text=text):
                self.assertEqual(tow.parse_owner_mark(text), want)

    def test_only_our_store_and_namespace_is_judged_by_pid(self):
        dead, ns, sid = unused_pid(), tow.pid_namespace(), self.store.store_id
        ours = self.stray("%s:%d:1:%s" % (sid, dead, ns))
        other_ns = self.stray("%s:%d:1:%s" % (sid, dead, "1"))
        no_ns = self.stray("%s:%d:1:" % (sid, dead))
        other_store = self.stray("%s:%d:1:%s" % ("0" * 32, dead, ns))
        start = tow.process_identity(os.getpid())[0]
        alive = self.stray("%s:%d:%s:%s" % (sid, os.getpid(), start, ns))
        # A stray value as older code wrote it (a dead pid); older code running elsewhere on this
        # machine may kill it, so only what this sweep killed is asserted for it.
        stray = self.stray("%d:" % dead)
        killed = tow.reap_orphans(sid)
        self.assertEqual(killed, [ours.pid])
        self.assertNotIn(stray.pid, killed)
        for p in (other_ns, no_ns, other_store, alive):
            self.assertIsNone(p.poll())


class ForeignSchedulers(TempHome):
    """A scheduler whose pid proves nothing here keeps its runs until their lease runs out."""

    def held_run(self, **row):
        """A run held by scheduler `sched_far` (registered with ``row``) under a 60 s lease."""
        sc = self.sidecar()
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        run_id = sc.start("one", {}, drive=False)["id"]
        now = self.clock()
        self.assertEqual(len(sc.store.claim_due("sched_far", now, 1, 60000)), 1)
        boot = tow.process_identity(os.getpid())[1]
        cols = dict(id="sched_far", kind="serve", pid=unused_pid(), host=tow._hostname(),
                    started_at=now, heartbeat_at=now, proc_start="1", boot_id=boot, **row)
        sql = "INSERT INTO schedulers (%s) VALUES (%s)" % (", ".join(cols),
                                                            ", ".join("?" * len(cols)))
        conn = sqlite3.connect(db_path(self), isolation_level=None)
        conn.execute(sql, list(cols.values()))
        conn.close()
        return sc, run_id, now

    def check_the_lease_decides(self, sc, now):
        self.assertEqual(len(sc.store.live_schedulers(now, 120000)), 1, "it was judged dead")
        self.assertEqual(sc.store.claim_due("sched_near", now + 1000, 1, 60000), [],
                         "its run was taken while its lease held")
        self.assertEqual(len(sc.store.claim_due("sched_near", now + 61000, 1, 60000)), 1,
                         "its run was not taken after its lease ran out")

    def test_a_scheduler_registered_without_a_namespace(self):
        sc, _, now = self.held_run()  # as older code registered it
        self.check_the_lease_decides(sc, now)

    def test_a_scheduler_of_another_pid_namespace(self):
        sc, _, now = self.held_run(pid_ns="1")
        self.check_the_lease_decides(sc, now)

    def test_a_dead_scheduler_of_this_namespace_is_still_taken_over_at_once(self):
        sc, _, now = self.held_run(pid_ns=tow.pid_namespace())
        self.assertEqual(len(sc.store.claim_due("sched_near", now + 1000, 1, 60000)), 1)


@unittest.skipUnless(HAVE_UNSHARE, "needs `unshare --pid --fork --mount-proc` (Linux, as root or "
                                   "with user namespaces)")
class SeparatePidNamespaces(ServeCase):
    """Two `serve`s sharing one data dir, the second in a PID namespace of its own."""

    lease_ttl = "6s"
    linger = "3s"

    def serve_unshared(self):
        # sh is the namespace's init, so serve is an ordinary process in it.
        argv = ["unshare", "--pid", "--fork", "--mount-proc", "/bin/sh", "-c", '"$@" & wait', "sh",
                sys.executable, MODULE, "--config", self.config_path, "serve"]
        return self.spawn(argv)

    def test_a_live_serve_in_another_namespace_is_not_robbed(self):
        sc = self.sidecar(clock=False)
        sc.deploy("one", ONE_STEP_PY, runtime="python")
        counter = os.path.join(self.tmp, "c.txt")
        first = self.serve()
        run_id = sc.start("one", {"counter": counter, "work": 8.0})["id"]
        wait_for(lambda: read_counter(counter), what="the step to start")
        self.serve_unshared()
        wait_for(lambda: sc.store.query("SELECT id FROM schedulers WHERE pid != ?", (first.pid,)),
                 what="the second serve to register")
        time.sleep(3.0)  # the lease (6 s) is renewed all along: nothing may change hands
        row = sc.store.query_one("SELECT lease_expires_at FROM runs WHERE id = ?", (run_id,))
        self.assertEqual(read_counter(counter), ["s"], "the step ran again while its serve lived")
        self.assertEqual(sc.status(run_id)["status"], "running")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        def ended():
            st = sc.status(run_id)
            return st if st["status"] in tow.TERMINAL else None
        final = wait_for(ended, timeout=40, what="the run to be taken over and end")
        self.assertEqual(final["status"], "completed", final)
        self.assertEqual(len(read_counter(counter)), 2)
        taken = sc.store.query("SELECT at FROM run_events WHERE run_id = ? AND "
                               "type = 'lease_expired'", (run_id,))
        self.assertEqual(len(taken), 1, taken)
        self.assertGreaterEqual(taken[0]["at"], row["lease_expires_at"], "taken before the lease")



class CopiedStores(TempHome):
    def test_a_copy_of_the_store_takes_an_id_of_its_own(self):
        """A restored backup or a cloned data dir never takes the original's processes."""
        sc = self.sidecar()
        first = sc.store.store_id
        sc.close()
        self._sidecars.remove(sc)
        copy = os.path.join(self.tmp, "copy")
        shutil.copytree(self.data_dir, copy)
        original, clone = tow.Store(self.data_dir), tow.Store(copy)
        self.addCleanup(original.close)
        self.addCleanup(clone.close)
        self.assertEqual(original.store_id, first)
        self.assertNotEqual(clone.store_id, first)
        again = tow.Store(copy)
        self.addCleanup(again.close)
        self.assertEqual(again.store_id, clone.store_id)  # and keeps it


class CopiedStoresOpenedAtOnce(TempHome):
    def test_two_first_opens_of_a_copy_agree_on_its_id(self):
        import threading
        sc = self.sidecar()
        first = sc.store.store_id
        sc.close()
        self._sidecars.remove(sc)
        for n in range(5):
            copy = os.path.join(self.tmp, "copy%d" % n)
            shutil.copytree(self.data_dir, copy)
            stores = [tow.Store(copy) for _ in range(4)]
            for st in stores:
                self.addCleanup(st.close)
            gate, ids = threading.Barrier(len(stores)), []

            def read(store):
                gate.wait()
                ids.append(store.store_id)

            threads = [threading.Thread(target=read, args=(st,)) for st in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            self.assertEqual(len(set(ids)), 1, ids)
            self.assertNotEqual(ids[0], first)
            again = tow.Store(copy)
            self.addCleanup(again.close)
            self.assertEqual(again.store_id, ids[0])


if __name__ == "__main__":
    unittest.main()
