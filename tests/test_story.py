"""What `status`, `list runs` and `serve` tell a user about a run's story (issue #20, 2/3/7)."""
import os
import subprocess
import sys

from tests.util import MODULE, TempHome, tow, wait_for

FLAKY = """
import os
def workflow(input, ctx):
    def s():
        n = int(open(input["f"]).read()) if os.path.exists(input["f"]) else 0
        with open(input["f"], "w") as f:
            f.write(str(n + 1))
        if n < input["fails"]:
            raise RuntimeError("boom %d" % n)
        return n
    return ctx.step("s", s, max_attempts=1)
"""


class Story(TempHome):

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("flaky", FLAKY, runtime="python")

    def test_status_tells_retries_failed_attempts_and_a_true_last_pass(self):
        run_id = self.sc.start("flaky", {"f": os.path.join(self.tmp, "n"), "fails": 2},
                               drive=False)["id"]
        self.drive(self.sc, run_id)
        for _ in range(2):
            self.sc.retry(run_id, drive=False)
            self.drive(self.sc, run_id)
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual([h["event"] for h in st["history"]],
                         ["failed", "retried", "failed", "retried", "completed"])
        self.assertIn("boom 0", st["history"][0]["message"])
        self.assertEqual(st["failed_attempts"], 2)
        self.assertEqual(st["last_pass"]["pass"], st["passes"])
        self.assertEqual(st["last_pass"]["reason"], "completed")
        code, out, _ = self.cli("status", run_id)
        self.assertEqual(code, 0)
        self.assertIn("last pass 3 ended", out)
        self.assertIn("history", out)
        self.assertIn("failed: step 's' failed after 1 attempt: boom 1", out)
        self.assertIn("attempts  2 failed step attempts", out)

    def test_a_fork_says_where_it_comes_from_and_gets_a_task_as_a_start_would(self):
        run_id = self.sc.start("flaky", {"f": os.path.join(self.tmp, "m"), "fails": 0},
                               drive=False)["id"]
        self.drive(self.sc, run_id)
        fork = self.sc.fork(run_id, drive=False)["id"]
        code, out, _ = self.cli("status", fork)
        self.assertIn("forked    from run %s" % run_id, out)
        self.assertFalse(self.sc.status(fork)["task"]["requested"])  # auto_create_tasks: false
        self.write_config(extra="taskyou:\n  auto_create_tasks: true\n")
        with open(self.config_path) as f:
            text = f.read().replace("taskyou:\n  auto_create_tasks: false\n", "", 1)
        with open(self.config_path, "w") as f:
            f.write(text)
        sc = self.sidecar()
        fork2 = sc.fork(run_id, drive=False)["id"]
        self.assertTrue(sc.status(fork2)["task"]["requested"])
        self.assertEqual([i["kind"] for i in sc.store.outbox_for_run(fork2)], ["create"])
        code, out, _ = self.cli("list", "runs")
        line = [ln for ln in out.splitlines() if ln.startswith(fork2[:tow.RUN_SHORT_LEN])][0]
        self.assertIn(" queued ", line)  # its task is on its way, not "-"


class Noise(TempHome):
    """No TaskYou here: say so once, where it matters."""

    def test_serve_says_nothing_of_ty_when_no_run_asks_for_a_task(self):
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin")
        p = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "serve"],
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            sc = self.sidecar(clock=False)
            wait_for(lambda: sc.store.live_schedulers(tow.now_ms(), 60000), timeout=20,
                     what="serve to register")
        finally:
            p.terminate()
            _, err = p.communicate(timeout=20)
        self.assertNotIn("not found on PATH", err)

    def test_status_says_why_task_updates_wait_in_one_short_line(self):
        self.write_config(extra="")
        with open(self.config_path) as f:
            text = f.read().replace("auto_create_tasks: false", "auto_create_tasks: true")
        with open(self.config_path, "w") as f:
            f.write(text)
        sc = self.sidecar()
        sc.deploy("flaky", FLAKY, runtime="python")
        run_id = sc.start("flaky", {"f": os.path.join(self.tmp, "k"), "fails": 0},
                          drive=False)["id"]
        saved = os.environ["PATH"]
        os.environ["PATH"] = os.path.dirname(sys.executable)  # no `ty`
        try:
            sc.bridge.deliver_due()
        finally:
            os.environ["PATH"] = saved
        code, out, _ = self.cli("status", run_id)
        task = [ln for ln in out.splitlines() if ln.startswith("task")]
        self.assertEqual(len(task), 1, out)
        self.assertLessEqual(len(task[0]), 100, task[0])
        self.assertIn("not found on PATH", task[0])
