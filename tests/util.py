"""Shared test helpers: temp homes and configs, a settable clock, CLI capture, `serve`
subprocesses, process checks."""
import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ty_openworkflow as tow  # noqa: E402

MODULE = os.path.join(ROOT, "ty_openworkflow.py")
HAVE_NODE = shutil.which("node") is not None
RUNTIMES = [rt for rt in ("node", "python") if rt == "python" or HAVE_NODE]


class FakeClock:
    """Real time plus an offset the test can advance (shims follow it via the pass's `now`)."""

    def __init__(self):
        self.offset_ms = 0

    def __call__(self):
        return tow.now_ms() + self.offset_ms

    def advance(self, ms):
        self.offset_ms += int(ms)

    def advance_to(self, at_ms):
        gap = at_ms - self()
        if gap > 0:
            self.offset_ms += gap


CONFIG_TEMPLATE = """\
data_dir: {data_dir}
default_adapter: exec
adapters:
  exec:
    enabled: true
    work_dir: {data_dir}/exec
    timeout: {timeout}
{adapter_extra}taskyou:
  auto_create_tasks: false
runner_linger: {linger}
lease_ttl: {lease_ttl}
{extra}
"""


class TempHome(unittest.TestCase):
    """A test case with its own HOME, config file and data dir, all removed afterwards."""

    linger = "3s"
    lease_ttl = "30s"
    timeout = "60s"
    extra_config = ""
    adapter_config = ""  # more adapter blocks, indented under `adapters:`

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="tyow-test-")
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(self.home)
        self.data_dir = os.path.join(self.tmp, "data")
        self.config_path = os.path.join(self.tmp, "config.yaml")
        self.write_config()
        self._env = {k: os.environ.get(k) for k in ("HOME", tow.CONFIG_ENV, tow.DATA_DIR_ENV)}
        os.environ["HOME"] = self.home
        os.environ[tow.CONFIG_ENV] = self.config_path
        os.environ.pop(tow.DATA_DIR_ENV, None)
        self.clock = FakeClock()
        self._sidecars = []

    def write_config(self, extra=None, adapter=None):
        with open(self.config_path, "w") as f:
            f.write(CONFIG_TEMPLATE.format(data_dir=self.data_dir, linger=self.linger, lease_ttl=self.lease_ttl,
                                           timeout=self.timeout,
                                           adapter_extra=self.adapter_config if adapter is None else adapter,
                                           extra=self.extra_config if extra is None else extra))

    def tearDown(self):
        for sc in self._sidecars:
            sc.close()
        kill_strays(self.tmp)
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.tmp, ignore_errors=True)
        super().tearDown()

    def sidecar(self, clock=True):
        sc = tow.Sidecar(config_path=self.config_path, clock=self.clock if clock else None)
        self._sidecars.append(sc)
        return sc

    def cli(self, *argv, stdin=None):
        """Run main(argv) in-process; returns (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = tow.main(["--config", self.config_path] + list(argv))
        finally:
            sys.stdin = old_stdin
        return code, out.getvalue(), err.getvalue()

    def assert_refused(self, argv, code, message, stdin=None):
        """Bad input: exit ``code``, one line on stderr holding ``message``, the store unchanged."""
        before = self.db_snapshot()
        got, out, err = self.cli(*argv, stdin=stdin)
        self.assertEqual(got, code, (out, err))
        self.assertIn(message, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(self.db_snapshot(), before, "the store changed")
        return err

    def db_snapshot(self):
        """Every row of every table, to prove a failed command changed nothing."""
        path = os.path.join(self.data_dir, tow.DB_FILE)
        if not os.path.exists(path):
            return None
        conn = sqlite3.connect(path)
        try:
            return list(conn.iterdump())
        finally:
            conn.close()

    def drive(self, sc, run_id, max_rounds=40):
        """Tick until the run is terminal, jumping the clock to each wake/retry time."""
        for _ in range(max_rounds):
            sc.tick()
            st = sc.status(run_id)
            if st["status"] in tow.TERMINAL:
                return st
            due = st.get("wake_at") or st.get("available_at")
            if due:
                self.clock.advance_to(due)
        self.fail("run %s did not finish in %d rounds: %s" % (run_id, max_rounds, st["status"]))


class ServeCase(TempHome):
    """Real `serve` subprocesses, each in a process group of its own and logging to a file of its
    own; what is still alive at the end is killed, group and all."""

    lease_ttl = "2s"
    linger = "1s"

    def setUp(self):
        super().setUp()
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            p.log_file.close()
        super().tearDown()

    def spawn(self, argv):
        """Start ``argv`` in a new session, stderr to serve-N.log; it is killed at tearDown."""
        log_path = os.path.join(self.tmp, "serve-%d.log" % len(self.procs))
        f = open(log_path, "w")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
        p.log_file, p.log_path = f, log_path
        self.procs.append(p)
        return p

    def serve(self, *extra, busy_timeout_ms=None):
        """A `serve` of this test's config, once it registered (optionally with the module's
        SQLITE_BUSY_TIMEOUT_MS patched)."""
        if busy_timeout_ms is None:
            argv = [sys.executable, MODULE, "--config", self.config_path, "serve"] + list(extra)
        else:
            code = ("import sys; sys.path.insert(0, %r); import ty_openworkflow as t; "
                    "t.SQLITE_BUSY_TIMEOUT_MS = %d; sys.exit(t.main(%r))"
                    % (ROOT, busy_timeout_ms, ["--config", self.config_path, "serve"] + list(extra)))
            argv = [sys.executable, "-c", code]
        p = self.spawn(argv)
        self.wait_registered(p, self.sidecar(clock=False))
        return p

    def wait_registered(self, p, sc):
        """Wait until ``p`` shows among ``sc``'s live schedulers; fail with its log if it exits."""
        wait_for(lambda: p.poll() is not None
                 or any(s["pid"] == p.pid for s in sc.store.live_schedulers(tow.now_ms(), 60000)),
                 what="serve to register")
        self.assertIsNone(p.poll(), self.serve_log(p))

    def serve_log(self, p):
        with open(p.log_path) as f:
            return f.read()

    def wait_status(self, sc, run_id, statuses, timeout=30, proc=None):
        """The run's status once it is one of ``statuses``; fails at once if ``proc`` exits."""
        def check():
            if proc is not None and proc.poll() is not None:
                raise AssertionError("serve exited with %s while waiting for run %s:\n%s"
                                     % (proc.returncode, run_id, self.serve_log(proc)))
            st = sc.status(run_id)
            return st if st["status"] in statuses else None
        return wait_for(check, timeout=timeout, what="run %s to be %s" % (run_id, statuses))

    def shims(self):
        """Pids of the exec adapter's shims still running for this test's data dir."""
        return processes_mentioning(os.path.join(self.data_dir, "exec", "runtimes"))

    def integrity(self):
        conn = sqlite3.connect(db_path(self))
        try:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()


def db_path(case):
    return os.path.join(case.data_dir, tow.DB_FILE)


@contextlib.contextmanager
def write_lock(path):
    """Hold the database's write lock from another connection."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


def proc_state(pid):
    """The state letter of ``pid`` in /proc (R, S, T, Z, ...); OSError if it is gone."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def proc_state_or_none(pid):
    try:
        return proc_state(pid)
    except OSError:
        return None


def processes_mentioning(text):
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open("/proc/%s/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if text in cmd:
            found.append(int(pid))
    return found


def kill_strays(text):
    """Kill every process a test left behind (runners, serves, shims) under its temp dir."""
    for pid in processes_mentioning(text):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))


def run_module(args, env=None, input_text=None, timeout=60, cwd=None):
    """Run ty_openworkflow.py as a subprocess, as a user would."""
    return subprocess.run([sys.executable, MODULE] + list(args), input=input_text, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def read_counter(path):
    """Lines appended by a step's side effect: one per execution."""
    try:
        with open(path) as f:
            return [ln for ln in f.read().splitlines() if ln]
    except FileNotFoundError:
        return []


def js(value):
    return json.dumps(value)
