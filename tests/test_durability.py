"""What a commit survives: a power cut in the middle of a burst (store.synchronous), and the
group commit that lets concurrent writers share one fsync.

The power cut is simulated the way SQLite's own crash tests think of a disk: only what was
synced survives. A small LD_PRELOAD library (built here with the system C compiler) copies
the store's files each time SQLite syncs one; the burst process is then SIGKILLed at a random
moment, and the store is rebuilt from the copies alone: what a machine would find after
losing power at that instant. Every run the burst was told was created (start() returned)
and every cancel it was told was done must be there."""
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

from tests.util import ROOT, TempHome, tow

CUT_LIB_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* On fsync/fdatasync of a file whose path contains $TYOW_CUT_MATCH, keep a copy of the
   file as it is now at PATH.synced: the content a power cut at any later moment leaves. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void keep(int fd) {
    const char *match = getenv("TYOW_CUT_MATCH");
    char link[64], path[4096], tmp[4200], dst[4200], buf[65536];
    ssize_t n;
    if (!match || !*match) return;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = 0;
    if (!strstr(path, match)) return;
    pthread_mutex_lock(&mu);
    snprintf(tmp, sizeof tmp, "%s.synced-tmp", path);
    snprintf(dst, sizeof dst, "%s.synced", path);
    int in = open(path, O_RDONLY), out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in >= 0 && out >= 0) {
        while ((n = read(in, buf, sizeof buf)) > 0) {
            if (write(out, buf, n) != n) break;
        }
        rename(tmp, dst);
    }
    if (in >= 0) close(in);
    if (out >= 0) close(out);
    pthread_mutex_unlock(&mu);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    keep(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    keep(fd);
    return real(fd);
}
"""

# The burst: threads that start runs and cancel some, each printing an acknowledgement
# only after the call returned (the caller was told it is stored).
BURST = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
import ty_openworkflow as tow
sc = tow.Sidecar(config_path=sys.argv[2])
out_lock = threading.Lock()

def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def worker(n):
    i = 0
    while True:
        run = sc.start("burst", {"n": n, "i": i}, drive=False)
        say("started " + run["id"])
        if i % 3 == 0:
            sc.cancel(run["id"])
            say("canceled " + run["id"])
        i += 1

def watcher():
    # What a user sees: a run shown completed must stay completed.
    while True:
        for run in sc.list_runs(status="completed", limit=5):
            say("seen " + run["id"])

say("ready")
for n in range(6):
    threading.Thread(target=worker, args=(n,), daemon=True).start()
if sys.argv[3] == "serve":  # a scheduler in this process: its own commits are quiet
    threading.Thread(target=sc.scheduler("serve").loop, daemon=True).start()
    threading.Thread(target=watcher, daemon=True).start()
threading.Event().wait()
"""


def _build_cut_lib(folder):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    src = os.path.join(folder, "cut.c")
    lib = os.path.join(folder, "libtyowcut.so")
    with open(src, "w") as f:
        f.write(CUT_LIB_C)
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", lib, src, "-ldl", "-lpthread"],
                          capture_output=True, text=True)
    return lib if proc.returncode == 0 else None


class PowerCut(TempHome):
    """A burst of starts and cancels, cut at a random moment; the store from synced bytes only."""

    def setUp(self):
        super().setUp()
        self.lib = _build_cut_lib(self.tmp)
        if self.lib is None:
            self.skipTest("no C compiler (cc) to build the power-cut library")

    def _prepare(self, synchronous):
        self.write_config(extra="store:\n  synchronous: %s\n" % synchronous)
        sc = self.sidecar(clock=False)
        sc.deploy("burst", "def workflow(input, ctx):\n    return input\n", runtime="python")
        sc.close()
        self._sidecars.remove(sc)
        db = os.path.join(self.data_dir, tow.DB_FILE)
        self._baseline(db)
        return db

    @staticmethod
    def _baseline(db):
        """The disk as it is before a burst: everything there now counts as synced."""
        for ext in ("", "-wal"):
            if os.path.exists(db + ext + ".synced"):
                os.remove(db + ext + ".synced")
            if os.path.exists(db + ext):
                shutil.copyfile(db + ext, db + ext + ".synced")

    def _cut(self, db, after_s, serve=False, want="started", count=30):
        """Run the burst until it acknowledged ``count`` lines starting with ``want``, then
        ``after_s`` more, and cut the power."""
        env = dict(os.environ, LD_PRELOAD=self.lib, TYOW_CUT_MATCH=tow.DB_FILE)
        argv = [sys.executable, "-c", BURST, ROOT, self.config_path, "serve" if serve else "-"]
        proc = subprocess.Popen(argv, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        acks = []
        reader = threading.Thread(target=lambda: acks.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 60
        while sum(1 for a in list(acks) if a.startswith(want)) < count:
            if proc.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.05)
        time.sleep(after_s)
        proc.kill()  # the power cut: whatever was not synced by now is gone
        proc.wait()
        reader.join(5)
        err = proc.stderr.read()
        proc.stderr.close()
        proc.stdout.close()
        self.assertIn("ready\n", acks, err[-2000:])
        # The machine comes back: only the synced copies are on its disk.
        after = os.path.join(self.tmp, "after")
        shutil.rmtree(after, ignore_errors=True)
        os.makedirs(after)
        for ext in ("", "-wal"):
            if os.path.exists(db + ext + ".synced"):
                shutil.copyfile(db + ext + ".synced", os.path.join(after, tow.DB_FILE + ext))
        return acks, os.path.join(after, tow.DB_FILE)

    def _lost(self, acks, path):
        conn = sqlite3.connect(path)
        try:
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            status = dict(conn.execute("SELECT id, status FROM runs"))
        finally:
            conn.close()
        lost = []
        for line in acks:
            what, _, run_id = line.strip().partition(" ")
            if what == "started" and run_id not in status:
                lost.append(line.strip())
            elif what == "canceled" and status.get(run_id) != "canceled":
                lost.append(line.strip() + " (now %s)" % status.get(run_id))
            elif what == "seen" and status.get(run_id) != "completed":
                lost.append(line.strip() + " completed (now %s)" % status.get(run_id))
        return lost

    def test_full_keeps_every_acknowledged_commit(self):
        db = self._prepare("full")
        acks, path = self._cut(db, random.uniform(0.2, 1.0))
        started = [a for a in acks if a.startswith("started")]
        self.assertGreater(len(started), 20, "the burst made too few runs to say anything")
        self.assertEqual(self._lost(acks, path), [])

    def test_full_keeps_what_a_scheduler_did_once_it_was_shown(self):
        """A scheduler's own commits are quiet; a run shown completed was synced before."""
        db = self._prepare("full")
        acks, path = self._cut(db, random.uniform(0.2, 1.0), serve=True, want="seen", count=10)
        seen = [a for a in acks if a.startswith("seen")]
        self.assertGreater(len(seen), 5, "no run was seen completed: %s" % acks[-5:])
        self.assertEqual(self._lost(acks, path), [])

    def test_normal_loses_acknowledged_commits(self):
        """The opt-out survives a crash of the process, not of the machine: the cut shows it."""
        db = self._prepare("normal")
        for _ in range(3):
            before = os.stat(db + ".synced").st_mtime_ns
            acks, path = self._cut(db, 0.0, count=30)
            self.assertGreater(len([a for a in acks if a.startswith("started")]), 20, acks[-3:])
            if os.stat(db + ".synced").st_mtime_ns == before:
                break  # no checkpoint (which syncs all before it) happened before the cut
            self._baseline(db)  # a slow machine got to one: again, from here
        self.assertTrue(self._lost(acks, path), "store.synchronous: normal lost nothing to a "
                        "power cut (%d acknowledged)" % len(acks))


class GroupCommit(TempHome):
    """Writers share syncs, never failures: each returns once its own commit is on the disk."""

    def test_concurrent_writers_all_commit_and_share_syncs(self):
        store = tow.Store(self.data_dir)
        self.addCleanup(store.close)
        with store.transaction() as c:
            c.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
        synced, real_sync, seen = [], tow._fdatasync, []

        def slow_sync(fd):
            synced.append(fd)
            time.sleep(0.02)  # a slow disk: writers that commit meanwhile share the next sync
            real_sync(fd)

        def writer(n):
            for i in range(25):
                try:
                    with store.transaction() as c:
                        c.execute("INSERT INTO t VALUES (?, ?)", ("%d-%d" % (n, i), i))
                        if i % 5 == 4:
                            raise tow.Conflict("undone")
                except tow.Conflict:
                    continue
                seen.append("%d-%d" % (n, i))

        tow._fdatasync = slow_sync
        try:
            threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            tow._fdatasync = real_sync
        with store.connection() as c:
            self.assertEqual({r[0] for r in c.execute("SELECT k FROM t")}, set(seen))
        self.assertEqual(len(seen), 8 * 20)
        # 160 commits, each returned only after a sync that began after it: shared, not one each.
        self.assertTrue(synced, "store.synchronous: full synced nothing")
        self.assertLess(len(synced), 160 / 2, "%d syncs for 160 commits" % len(synced))

    def test_a_commit_returns_only_once_synced(self):
        store = tow.Store(self.data_dir)
        self.addCleanup(store.close)
        events, real_sync = [], tow._fdatasync

        def sync(fd):
            events.append("sync")
            real_sync(fd)

        tow._fdatasync = sync
        try:
            with store.transaction() as c:
                c.execute("CREATE TABLE t (k TEXT)")
            events.append("returned")
            with store.quiet_commits():
                with store.transaction() as c:
                    c.execute("INSERT INTO t VALUES ('quiet')")
            events.append("quiet returned")
            with store.connection() as c:  # a read for someone to see: synced before shown
                c.execute("SELECT count(*) FROM t").fetchone()
            store.sync_shown()
            events.append("read shown")
            time.sleep(0.06)  # past the file times' grain: the WAL's version can be trusted
            store.sync_shown()
            store.sync_shown()  # nothing written since: no sync
            with store.quiet_commits():
                store.sync_shown()  # a scheduler's own read: not synced
            events.append("end")
        finally:
            tow._fdatasync = real_sync
        self.assertEqual(events, ["sync", "returned", "quiet returned", "sync", "read shown",
                                  "sync", "end"])


class SyncSetting(TempHome):
    def test_default_is_full_and_a_bad_value_is_refused(self):
        sc = self.sidecar()
        self.assertEqual(sc.store.synchronous, "full")
        self.write_config(extra="store:\n  synchronous: fast\n")
        code, out, err = self.cli("list", "runs")
        self.assertEqual(code, 1, out + err)
        self.assertIn("store.synchronous must be full", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_normal_is_honoured(self):
        self.write_config(extra="store:\n  synchronous: normal\n")
        sc = self.sidecar()
        self.assertEqual(sc.store.synchronous, "normal")


if __name__ == "__main__":
    unittest.main()


class TrustedWalVersion(TempHome):
    """A sync is skipped only if the WAL cannot have been written since the last one."""

    def _syncs(self, versions, slow_s=0.0):
        store = tow.Store(self.data_dir)
        self.addCleanup(store.close)
        with store.transaction() as c:  # a WAL to sync (a pooled connection keeps it)
            c.execute("CREATE TABLE IF NOT EXISTS t (x)")
        calls, real = [], tow._fdatasync
        tow._fdatasync = lambda fd: calls.append(fd) or time.sleep(slow_s) or real(fd)
        seen, fresh = iter(versions), []

        def version(path):
            got = next(seen)
            if got == "fresh":  # written in the tick of our first look
                fresh[:] = fresh or [time.time_ns()]
                got = (1, 4096, fresh[0])
            return got

        try:
            with mock.patch.object(tow, "_file_version", version):
                for _ in versions:
                    store._synced_from = 0  # as if each call came after a new commit
                    store.sync()
        finally:
            tow._fdatasync = real
        return len(calls)

    def test_a_fresh_time_stamp_is_not_trusted(self):
        # A write in the same coarse tick as our look leaves the same (inode, size, mtime): a
        # version that was fresh when looked at is not trusted, however long the sync took
        # (the second look finds it settled, so the third call may skip).
        slow = tow.FILE_TIME_GRAIN_NS / 1e9 * 1.5
        self.assertEqual(self._syncs(["fresh"] * 3, slow_s=slow), 2)

    def test_a_settled_time_stamp_is_trusted(self):
        old = time.time_ns() - 10 * tow.FILE_TIME_GRAIN_NS
        self.assertEqual(self._syncs([(1, 4096, old)] * 3), 1)
        self.assertEqual(self._syncs([(1, 4096, old), (1, 8192, old), (1, 8192, old + 1)]), 3)


class TrustedWalVersionMore(TrustedWalVersion):
    def test_whole_second_time_stamps_are_never_trusted(self):
        # A file system that keeps seconds only: a write a moment later keeps the same stamp.
        whole = (time.time_ns() // 10 ** 9 - 5) * 10 ** 9
        self.assertEqual(self._syncs([(1, 4096, whole)] * 3), 3)

    def test_a_commit_of_ours_is_always_synced(self):
        store = tow.Store(self.data_dir)
        self.addCleanup(store.close)
        with store.transaction() as c:
            c.execute("CREATE TABLE t (x)")
        old = (2, 4096, time.time_ns() - 10 * tow.FILE_TIME_GRAIN_NS + 1)
        calls, real = [], tow._fdatasync
        tow._fdatasync = lambda fd: calls.append(fd) or real(fd)
        try:
            with mock.patch.object(tow, "_file_version", lambda path: old):
                store.sync()  # the version is now trusted
                store.sync()  # nothing new: skipped
                with store.transaction() as c:  # a commit the (fake) version does not show
                    c.execute("INSERT INTO t VALUES (1)")
        finally:
            tow._fdatasync = real
        self.assertEqual(len(calls), 2)


class QuietSyncer(TempHome):
    def test_the_syncer_ends_with_its_store_and_close_syncs_first(self):
        import gc
        import weakref

        def syncers():
            return [t for t in threading.enumerate() if t.name == "tyow-store-sync"]

        before = len(syncers())
        store = tow.Store(self.data_dir)
        with store.quiet_commits():
            with store.transaction() as c:
                c.execute("CREATE TABLE t (x)")
        self.assertEqual(len(syncers()), before + 1)
        calls, real = [], tow._fdatasync
        tow._fdatasync = lambda fd: calls.append(fd) or real(fd)
        try:
            with store.quiet_commits():
                with store.transaction() as c:
                    c.execute("INSERT INTO t VALUES (1)")
            store.close()  # its quiet commit is put on the disk first
        finally:
            tow._fdatasync = real
        self.assertTrue(calls)
        deadline = time.time() + 5
        while len(syncers()) > before and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(syncers()), before)
        # A store dropped without close() is not kept alive by its syncer.
        other = tow.Store(os.path.join(self.tmp, "other"))
        with other.quiet_commits():
            with other.transaction() as c:
                c.execute("CREATE TABLE t (x)")
        ref = weakref.ref(other)
        del other, c
        gc.collect()
        deadline = time.time() + 5
        while (ref() is not None or len(syncers()) > before) and time.time() < deadline:
            gc.collect()
            time.sleep(0.05)
        self.assertIsNone(ref())
        self.assertEqual(len(syncers()), before)
