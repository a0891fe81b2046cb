"""Edges of issue 15: prints from a step's threads, hostile dashboard requests, a typo'd config
variable, and runs held back by task updates that never reach TaskYou.

- a Python warm worker routes what a pass's threads (and pool work it submits) print to that
  pass, as process mode does;
- the dashboard refuses a bad, oversized or chunked body before reading it, checks the token
  first, and holds no more connections (threads) than dashboard.max_connections;
- TY_OPENWORKFLOW_CONFIG naming a missing file is refused like --config, and touches no store;
- prune and retention get runs whose task updates never left the outbox out, saying how many
  updates went (`prune --drop-undelivered`, taskyou.outbox_expiry).
"""
import json
import os
import socket
import threading
import time
import unittest

from tests.test_bridge import BridgeCase
from tests.util import TempHome, tow, wait_for

DAY = 86400 * 1000

# A step whose pool threads print (stdout and stderr), a plain thread, and work for a pool that
# lives as long as the worker: its threads are made by one pass and reused by the next.
THREADED = """
import concurrent.futures, sys, threading
SHARED = concurrent.futures.ThreadPoolExecutor(2)

def workflow(input, ctx):
    tag = input["tag"]
    def say(i):
        print("pool line %d of %s\\n" % (i, tag), end="")  # one write: whole lines in either mode
        sys.stderr.write("pool err %d of %s\\n" % (i, tag))
        return i
    def work():
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            return list(pool.map(say, range(3)))
    out = ctx.step("pool", work)
    ctx.step("shared", lambda: SHARED.submit(print, "shared line of %s" % tag).result())
    t = threading.Thread(target=lambda: print("thread line of %s" % tag))
    t.start()
    t.join()
    return out
"""


class StepThreadsPrintToTheirPass(TempHome):
    """`logs` shows what a pass's threads printed, in warm mode as in process mode."""

    def lines(self, sc, run_id):
        text = "".join(r["text"] for r in sc.logs(run_id))
        return sorted(line for line in text.splitlines() if line.strip())

    def expected(self, tag):
        return sorted(["pool line %d of %s" % (i, tag) for i in range(3)]
                      + ["pool err %d of %s" % (i, tag) for i in range(3)]
                      + ["shared line of %s" % tag, "thread line of %s" % tag])

    def run_both(self, sc):
        sc.deploy("threaded", THREADED, runtime="python")
        got = {}
        for tag in ("a", "b"):  # one after the other: b's pass reuses threads a's pass made
            run_id = sc.start("threaded", {"tag": tag}, drive=False)["id"]
            sc.tick()
            st = sc.status(run_id)
            self.assertEqual(st["status"], "completed", st.get("error"))
            got[tag] = self.lines(sc, run_id)
        return got

    def test_warm_and_process_mode_log_the_same_lines(self):
        self.write_config(adapter="    mode: process\n")
        process = self.run_both(self.sidecar())
        self.assertEqual(process, {"a": self.expected("a"), "b": self.expected("b")})
        self.write_config()  # warm, the default
        warm = self.run_both(self.sidecar())
        self.assertEqual(warm, process)


class DashboardRefusesBeforeReading(TempHome):
    """Hostile requests to the dashboard, over real HTTP on 127.0.0.1."""

    cap = 8
    extra_config = "dashboard:\n  max_connections: %d\n" % cap

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("one", "def workflow(input, ctx):\n    return ctx.wait_for_signal('go')\n",
                       runtime="python")
        self.run_id = self.sc.start("one", {}, drive=False)["id"]
        self.sc.tick()
        self.board = self.sc.dashboard(host="127.0.0.1", port=0).start()
        self.addCleanup(self.board.stop)

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.board.port), timeout=5)

    def exchange(self, head, body=b"", token=False):
        """Send a POST's head (and ``body``) on a connection left open; the answer's first line."""
        auth = "Authorization: Bearer %s\r\n" % self.board.token if token else ""
        sock = self.connect()
        try:
            sock.sendall(("POST /api/runs/%s/cancel HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s\r\n"
                          % (self.run_id, auth, head)).encode() + body)
            t0 = time.monotonic()
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)  # times out (5 s) if the server waits for the body
                if not chunk:
                    break
                data += chunk
            self.assertLess(time.monotonic() - t0, 3)
            return data.split(b"\r\n", 1)[0].decode()
        finally:
            sock.close()

    def test_bad_lengths_are_refused_unread(self):
        cases = [("Content-Length: -1\r\n", "400"), ("Content-Length: 99999999999\r\n", "413"),
                 ("Content-Length: 12abc\r\n", "400"),
                 ("Content-Length: 2\r\nContent-Length: 9\r\n", "400"),
                 ("Transfer-Encoding: chunked\r\n", "411")]
        for head, status in cases:
            with self.subTest(head=head):
                self.assertEqual(self.exchange(head, b"{}" * 100, token=True).split()[1], status)
        self.assertEqual(self.sc.status(self.run_id)["status"], "waiting")

    def test_no_token_is_refused_before_the_body(self):
        line = self.exchange("Content-Length: 1000000\r\n")  # the body never comes
        self.assertEqual(line.split()[1], "401")
        self.assertEqual(self.sc.status(self.run_id)["status"], "waiting")

    def test_an_action_without_a_body_and_one_with_it(self):
        self.assertEqual(self.exchange("Content-Length: 2\r\n", b"{}", token=True).split()[1],
                         "200")
        self.assertEqual(self.sc.status(self.run_id)["status"], "canceled")
        self.assertEqual(self.exchange("", token=True).split()[1], "409")  # already canceled

    def get_status(self):
        sock = self.connect()
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(4096).split(b"\r\n", 1)[0].decode().split()[1]
        finally:
            sock.close()

    def test_a_flood_of_idle_connections_is_capped_and_the_dashboard_recovers(self):
        import select
        before = threading.active_count()
        flood = [self.connect() for _ in range(self.cap * 5)]
        try:
            refused, deadline = set(), time.monotonic() + 5
            while len(refused) < len(flood) - self.cap and time.monotonic() < deadline:
                ready = select.select([s for s in flood if s not in refused], [], [], 0.2)[0]
                for sock in ready:
                    if sock.recv(4096).startswith(b"HTTP/1.1 503"):
                        refused.add(sock)
            self.assertEqual(len(refused), len(flood) - self.cap)  # at once, without a thread
            self.assertLessEqual(threading.active_count() - before, self.cap)
            self.assertEqual(self.get_status(), "503")  # the slots are all held
        finally:
            for sock in flood:
                sock.close()
        wait_for(lambda: self.get_status() == "200", timeout=5, what="the dashboard to answer")
        self.assertLessEqual(threading.active_count() - before, self.cap)


class ConfigVariableTypo(TempHome):
    """TY_OPENWORKFLOW_CONFIG naming a missing file is refused as --config is; init writes it."""

    def main(self, *argv):
        import contextlib
        import io
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = tow.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def default_store(self):
        """A store where a config-less command would look (HOME's default), with one old run."""
        cfg = tow.load_config(os.path.join(self.home, ".config/ty-openworkflow/config.yaml"))
        sc = tow.Sidecar(cfg)
        self._sidecars.append(sc)
        sc.deploy("one", "def workflow(input, ctx):\n    return 1\n", runtime="python")
        run_id = sc.start("one", {}, drive=False)["id"]
        sc.tick()
        conn = tow.sqlite3.connect(sc.store.path)
        conn.execute("UPDATE runs SET finished_at = finished_at - ?", (10 * DAY,))
        conn.commit()
        conn.close()
        return sc, run_id

    def test_commands_refuse_a_missing_file_and_create_no_store(self):
        typo = os.path.join(self.tmp, "cofnig.yaml")
        os.environ[tow.CONFIG_ENV] = typo
        for argv in (["list", "runs"], ["prune", "--older-than", "1d"], ["status", "run_abcdef"]):
            with self.subTest(argv=argv):
                code, out, err = self.main(*argv)
                self.assertEqual(code, 1, (out, err))
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(typo, err)
                self.assertIn("$TY_OPENWORKFLOW_CONFIG", err)
                self.assertIn("not found", err)
                self.assertFalse(os.path.exists(os.path.join(self.home, ".config")),
                                 "a store was made")
                self.assertFalse(os.path.exists(typo))

    def test_prune_with_a_typo_leaves_the_default_store_alone(self):
        sc, run_id = self.default_store()
        os.environ[tow.CONFIG_ENV] = os.path.join(self.tmp, "cofnig.yaml")
        code, out, err = self.main("prune", "--older-than", "1d")
        self.assertEqual(code, 1, (out, err))
        self.assertEqual(sc.status(run_id)["status"], "completed",
                         "prune went to the default store")

    def test_init_writes_where_the_variable_points(self):
        path = os.path.join(self.tmp, "new", "config.yaml")
        os.environ[tow.CONFIG_ENV] = path
        code, out, err = self.main("init", "--data-dir", os.path.join(self.tmp, "newdata"))
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(path))
        code, out, err = self.main("list", "runs", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), [])


class PruneUndeliveredTaskUpdates(BridgeCase):
    """Without `ty`, runs with a task are not kept for ever: prune can drop their updates when
    asked, they expire after taskyou.outbox_expiry, and either way the count is said."""

    install_ty = False  # `ty` missing: updates never leave the outbox

    def setUp(self):
        super().setUp()
        self.configure(auto_create_tasks=True)

    def finished_run(self):
        sc = self.sidecar()
        sc.deploy("one", "def workflow(input, ctx):\n    return ctx.step('s', lambda: 1)\n",
                  runtime="python")
        run_id = sc.start("one", {}, drive=False)["id"]
        sc.tick()
        self.assertEqual(sc.status(run_id)["status"], "completed")
        return sc, run_id

    def backdate(self, sc, days, outbox_days=0):
        """As if the runs had finished ``days`` ago and their updates were queued ``outbox_days``
        ago (the CLI runs on the real clock)."""
        conn = tow.sqlite3.connect(sc.store.path)
        conn.execute("UPDATE runs SET finished_at = finished_at - ?", (days * DAY,))
        conn.execute("UPDATE outbox SET created_at = created_at - ?", (outbox_days * DAY,))
        conn.commit()
        conn.close()

    def undelivered(self, sc, run_id):
        return len([o for o in sc.store.outbox_for_run(run_id) if o["delivered_at"] is None])

    def test_the_refusal_says_the_way_out(self):
        sc, run_id = self.finished_run()
        self.backdate(sc, 2)
        code, out, err = self.cli("prune", "--older-than", "1d")
        self.assertEqual(code, 0, err)
        self.assertIn("kept 1 old run whose TaskYou updates are not delivered yet", out)
        self.assertIn("--drop-undelivered", out)
        self.assertIn("taskyou.outbox_expiry", out)
        code, out, err = self.cli("prune", "--older-than", "1d", "--json")
        doc = json.loads(out)
        self.assertEqual((doc["removed"]["runs"], doc["kept_undelivered"],
                          doc["dropped_task_updates"]), (0, 1, 0))
        self.assertEqual(sc.status(run_id)["status"], "completed")

    def test_drop_undelivered_dry_run_then_for_real(self):
        sc, run_id = self.finished_run()
        queued = self.undelivered(sc, run_id)
        self.assertGreater(queued, 0)
        self.backdate(sc, 2)
        code, out, err = self.cli("prune", "--older-than", "1d", "--drop-undelivered", "--dry-run",
                                  "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual((doc["removed"]["runs"], doc["dropped_task_updates"],
                          doc["kept_undelivered"]), (1, queued, 0))
        code, out, err = self.cli("prune", "--older-than", "1d", "--drop-undelivered", "--dry-run")
        self.assertIn("would remove 1 run", out)
        self.assertIn("would drop %d task updates that never reached TaskYou" % queued, out)
        self.assertEqual(self.undelivered(sc, run_id), queued, "a dry run dropped something")
        code, out, err = self.cli("prune", "--older-than", "1d", "--drop-undelivered")
        self.assertEqual(code, 0, err)
        self.assertIn("removed 1 run", out)
        self.assertIn("dropped %d task updates that never reached TaskYou (--drop-undelivered)"
                      % queued, out)
        with self.assertRaises(tow.NotFound):
            sc.status(run_id)
        self.assertEqual(sc.store.outbox_for_run(run_id), [])

    def test_expired_updates_hold_no_run_back(self):
        sc, run_id = self.finished_run()
        queued = self.undelivered(sc, run_id)
        self.backdate(sc, 40, outbox_days=31)  # past the default expiry, 30d
        code, out, err = self.cli("prune", "--older-than", "1d", "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual((doc["removed"]["runs"], doc["dropped_task_updates"]), (1, queued))
        with self.assertRaises(tow.NotFound):
            sc.status(run_id)

    def test_expiry_off_keeps_them_and_says_how_to_set_it(self):
        self.configure(outbox_expiry="~")
        sc, run_id = self.finished_run()
        self.backdate(sc, 400, outbox_days=400)
        code, out, err = self.cli("prune", "--older-than", "1d")
        self.assertEqual(code, 0, err)
        self.assertIn("kept 1 old run", out)
        self.assertIn("set taskyou.outbox_expiry", out)
        self.assertEqual(sc.status(run_id)["status"], "completed")

    def test_retention_prunes_them_once_expired_and_says_so(self):
        self.write_config(extra="retention: 3d\n")
        sc, run_id = self.finished_run()
        self.clock.advance(10 * DAY)
        with self.assertLogs("ty_openworkflow", "WARNING") as logs:
            sc.tick()
        self.assertEqual(sc.status(run_id)["status"], "completed")  # updates 10 days old: kept
        self.assertIn("--drop-undelivered", "\n".join(logs.output))
        self.clock.advance(21 * DAY)
        self.clock.advance(2 * 3600 * 1000)  # retention prunes at most hourly
        with self.assertLogs("ty_openworkflow", "WARNING") as logs:
            sc.tick()
        with self.assertRaises(tow.NotFound):
            sc.status(run_id)
        self.assertIn("never reached TaskYou", "\n".join(logs.output))


if __name__ == "__main__":
    unittest.main()
