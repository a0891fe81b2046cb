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


if __name__ == "__main__":
    unittest.main()
