"""Idempotent starts: one run per (workflow, idempotency key), also under concurrent starts."""
import json
import subprocess
import sys
import threading
import unittest

from tests.util import MODULE, TempHome

ONE = "def workflow(input, ctx):\n    return ctx.step('s', lambda: input)\n"


class IdempotentStart(TempHome):
    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("one", ONE, runtime="python")
        self.sc.deploy("two", ONE, runtime="python")

    def test_a_second_start_with_the_key_returns_the_first_run_and_creates_nothing(self):
        first = self.sc.start("one", {"n": 1}, idempotency_key="order-42", drive=False)
        self.assertFalse(first["existing"])
        self.sc.tick()
        again = self.sc.start("one", {"n": 2}, idempotency_key="order-42", drive=False)
        self.assertEqual(again["id"], first["id"])
        self.assertTrue(again["existing"])
        self.assertEqual(again["status"], "completed")
        self.assertEqual(again["output"], {"n": 1})
        self.assertEqual(len(self.sc.list_runs()), 1)
        other = self.sc.start("two", {}, idempotency_key="order-42", drive=False)  # keys are per workflow
        self.assertNotEqual(other["id"], first["id"])

    def test_the_cli_says_so_and_json_has_a_flag(self):
        code, out, err = self.cli("start", "one", "-i", "{}", "--idempotency-key", "k1", "--json")
        self.assertEqual(code, 0, err)
        first = json.loads(out)
        code, out, err = self.cli("start", "one", "-i", "{}", "--idempotency-key", "k1")
        self.assertEqual((code, out.strip()), (0, first["id"]))
        self.assertIn("already started", err)
        code, out, err = self.cli("start", "one", "-i", "{}", "--idempotency-key", "k1", "--json")
        self.assertTrue(json.loads(out)["existing"])

    def test_concurrent_starts_with_one_key_make_one_run(self):
        procs = [subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "start", "one", "-i", "{}",
                                   "--idempotency-key", "same"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        ids = set()
        lock = threading.Lock()

        def start_here():
            st = self.sidecar().start("one", {}, idempotency_key="same", drive=False)
            with lock:
                ids.add(st["id"])
        threads = [threading.Thread(target=start_here) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0, err)
            ids.add(out.strip())
        self.assertEqual(len(ids), 1, ids)
        self.assertEqual(len([r for r in self.sc.list_runs() if r["workflow_id"] == "one"]), 1)

    def test_a_bad_key_is_refused_and_nothing_is_stored(self):
        self.assert_refused(["start", "one", "-i", "{}", "--idempotency-key", " "], 2, "--idempotency-key")
        self.assert_refused(["start", "one", "-i", "{}", "--idempotency-key", "x" * 201], 2, "--idempotency-key")


if __name__ == "__main__":
    unittest.main()
