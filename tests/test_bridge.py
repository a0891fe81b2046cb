"""The TaskYou bridge: runs kept in step with `ty` tasks through the durable outbox.

Every test puts the fake ``ty`` (tests/fake_ty.py) first on PATH; the fake
accepts exactly the grammar of ../shared/ty-cli.md and exits 1 on anything
else, so asserting that every recorded call exited 0 proves the bridge speaks
the real grammar. Failures, hangs, crashes and a missing binary are injected
through the fake's control file; retries are reached by jumping the FakeClock
past the outbox's next attempt, never by sleeping.
"""
import os
import threading
import time
import unittest

from tests import fake_ty, workflows
from tests.util import TempHome, run_module, tow, wait_for

# Past the outbox's longest retry gap (OUTBOX_RETRY max_ms is 5 minutes).
PAST_RETRY_MS = 301000

# Completes after a 5 s sleep: the first tick delivers create + processing,
# a later one the completion.
HELLO = workflows.PYTHON["hello"]
HELLO_OUTPUT = {"message": "Hello, World!", "n": 1}
# Completes in one pass.
DOUBLE = workflows.PYTHON["nosteps"]
# Step "always" fails twice, then the run fails.
EXHAUSTED = workflows.PYTHON["exhausted"]
# Step "flaky" fails twice, then succeeds on its third attempt.
FLAKY = workflows.PYTHON["flaky"]

_TASKYOU_DEFAULT = "taskyou:\n  auto_create_tasks: false\n"


class BridgeCase(TempHome):
    """A TempHome with a fake `ty` first on PATH and settable `taskyou:` keys."""

    install_ty = True           # False: PATH has the (empty) bin dir but no `ty` in it
    projects = ("personal",)

    def setUp(self):
        self.taskyou = {"auto_create_tasks": "false"}
        super().setUp()
        self.bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(self.bin_dir)
        self.state = os.path.join(self.tmp, "ty-state.json")
        self._old_path = os.environ.get("PATH")
        # Keep the system dirs (node, python3) reachable behind the fake.
        os.environ["PATH"] = self.bin_dir + os.pathsep + (self._old_path or os.defpath)
        if self.install_ty:
            self.install()

    def tearDown(self):
        if self._old_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = self._old_path
        super().tearDown()

    # -- config -----------------------------------------------------------------

    def write_config(self, *args, **kwargs):
        """The shared test config, with its `taskyou:` block replaced by ``self.taskyou``."""
        super().write_config(*args, **kwargs)
        with open(self.config_path) as f:
            text = f.read()
        assert _TASKYOU_DEFAULT in text, "tests/util.py CONFIG_TEMPLATE changed its taskyou block"
        block = "taskyou:\n" + "".join("  %s: %s\n" % kv for kv in sorted(self.taskyou.items()))
        with open(self.config_path, "w") as f:
            f.write(text.replace(_TASKYOU_DEFAULT, block))

    def configure(self, **taskyou):
        """Set `taskyou.*` keys (raw YAML scalars) before the sidecar is made."""
        self.taskyou.update({k: str(v).lower() if isinstance(v, bool) else v for k, v in taskyou.items()})
        self.write_config()

    # -- the fake ---------------------------------------------------------------

    def install(self):
        return fake_ty.install(self.bin_dir, self.state, projects=self.projects)

    def calls(self):
        return fake_ty.calls(self.state) if os.path.exists(self.state) else []

    def argvs(self, since=0):
        return [c["argv"] for c in self.calls()[since:]]

    @staticmethod
    def head(argv):
        """A call's command and first operand; for create that is the title, after `--`."""
        return ["create", argv[-1]] if argv[0] == "create" else argv[:2]

    def tasks(self):
        return fake_ty.tasks(self.state) if os.path.exists(self.state) else []

    def assert_all_ok(self, since=0):
        bad = [(c["argv"], c["exit"], c["stderr"]) for c in self.calls()[since:] if c["exit"] != 0]
        self.assertEqual(bad, [], "ty calls that did not exit 0")

    # -- runs -------------------------------------------------------------------

    def deploy(self, sc, code, workflow_id="wf"):
        sc.deploy(workflow_id, code, runtime="python")

    def recover(self, sc):
        """Jump past every outbox retry time and deliver what is due; returns how many landed."""
        self.clock.advance(PAST_RETRY_MS)
        return sc.bridge.deliver_due()

    def assert_nothing_due(self, sc):
        """deliver_due() sends nothing while every retry is in the future (the clock is held back
        a minute, so a slow machine cannot make the first 1 s retry due meanwhile)."""
        self.clock.advance(-60000)
        try:
            self.assertEqual(sc.bridge.deliver_due(), 0)
        finally:
            self.clock.advance(60000)

    def assert_created(self, argv, title, run_id, input_text, project=None):
        """`ty create --body BODY --json [--project P] -- TITLE`, the body naming the run; returns BODY."""
        tail = ["--json"] + (["--project", project] if project else []) + ["--", title]
        self.assertEqual(argv[:2], ["create", "--body"])
        self.assertEqual(argv[3:], tail)
        body = argv[2]
        self.assertIn("workflow: wf", body)
        self.assertIn("run: %s" % run_id, body)
        self.assertIn("input: %s" % input_text, body)
        self.assertIn(tow.TASK_MARKER % run_id, body)
        return body

    def assert_delivered(self, st, task_id):
        task = st["task"]
        self.assertTrue(task["requested"])
        self.assertEqual(task["id"], task_id)
        self.assertEqual(task["pending_updates"], 0)
        self.assertTrue(task["delivered"])
        self.assertNotIn("last_error", task)


class CompletedFlowTest(BridgeCase):

    def check_completed_flow(self, title, task_title=None, create_task=True):
        sc = self.sidecar()
        self.deploy(sc, HELLO)
        st = sc.start("wf", {"name": "World"}, create_task=create_task, task_title=task_title, drive=False)
        run_id = st["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["output"], HELLO_OUTPUT)

        argv = self.argvs()
        self.assertEqual(len(argv), 5, argv)
        body = self.assert_created(argv[0], title, run_id, '{"name": "World"}')
        self.assertEqual(argv[1], ["status", "1", "processing"])
        self.assertEqual(argv[2], ["show", "1", "--json"])
        self.assertEqual(argv[3][:3], ["update", "1", "--body"])
        self.assertEqual(len(argv[3]), 4)
        new_body = argv[3][3]
        self.assertTrue(new_body.startswith(body), "the update must append to the body, not replace it")
        self.assertIn("[ty-openworkflow: run %s completed]" % run_id, new_body)
        self.assertIn('output: {"message": "Hello, World!", "n": 1}', new_body)
        self.assertEqual(argv[4], ["close", "1"])
        self.assert_all_ok()

        tasks = self.tasks()
        self.assertEqual(len(tasks), 1)
        self.assertEqual(tasks[0]["title"], title)
        self.assertEqual(tasks[0]["status"], "done")
        self.assertEqual(tasks[0]["body"], new_body)
        self.assertTrue(tasks[0]["started_at"], "the task went through processing")
        self.assert_delivered(st, 1)
        self.assertEqual(st["task"]["title"], title)
        self.assertEqual(sc.run(run_id)["task_id"], 1)
        self.assertIn("task_linked", [e["type"] for e in sc.events(run_id)])

    def test_completed_flow_default_title(self):
        self.check_completed_flow("Workflow: wf")

    def test_completed_flow_with_task_title(self):
        # A title alone requests the task (`start -t TITLE`).
        self.check_completed_flow("Ship the weekly report", task_title="Ship the weekly report", create_task=False)

    def test_delivery_is_idempotent_once_done(self):
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        st = sc.start("wf", {"n": 2}, create_task=True, drive=False)
        self.drive(sc, st["id"])
        n = len(self.calls())
        self.assertEqual(self.recover(sc), 0)
        sc.tick()
        self.assertEqual(len(self.calls()), n, "nothing is sent twice")


class FailedAndCanceledFlowTest(BridgeCase):

    def test_failed_flow_appends_error_and_blocks(self):
        sc = self.sidecar()
        self.deploy(sc, EXHAUSTED)
        st = sc.start("wf", {"name": "World"}, create_task=True, drive=False)
        run_id = st["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "failed")

        argv = self.argvs()
        self.assertEqual([self.head(a) for a in argv], [["create", "Workflow: wf"], ["status", "1"], ["show", "1"],
                                                 ["update", "1"], ["status", "1"]])
        body = self.assert_created(argv[0], "Workflow: wf", run_id, '{"name": "World"}')
        self.assertEqual(argv[1], ["status", "1", "processing"])
        self.assertEqual(argv[2], ["show", "1", "--json"])
        self.assertEqual(argv[4], ["status", "1", "blocked"])
        new_body = argv[3][3]
        self.assertTrue(new_body.startswith(body))
        self.assertIn("[ty-openworkflow: run %s failed]" % run_id, new_body)
        self.assertIn("error: %s" % st["error"]["message"], new_body)
        self.assertIn("boom", new_body)
        self.assert_all_ok()

        tasks = self.tasks()
        self.assertEqual(len(tasks), 1)
        self.assertEqual(tasks[0]["status"], "blocked")
        self.assertEqual(tasks[0]["body"], new_body)
        self.assert_delivered(st, 1)

    def test_canceled_while_sleeping_appends_note_and_blocks(self):
        sc = self.sidecar()
        self.deploy(sc, HELLO)
        run_id = sc.start("wf", {"name": "World"}, create_task=True, drive=False)["id"]
        sc.tick()
        self.assertEqual(sc.status(run_id)["status"], "sleeping")
        self.assertEqual([a[:3] for a in self.argvs()][1:], [["status", "1", "processing"]])
        st = sc.cancel(run_id)
        self.assertEqual(st["status"], "canceled")
        self.assertEqual(st["task"]["pending_updates"], 1)
        sc.tick()

        argv = self.argvs()
        self.assertEqual([self.head(a) for a in argv], [["create", "Workflow: wf"], ["status", "1"], ["show", "1"],
                                                 ["update", "1"], ["status", "1"]])
        self.assertEqual(argv[4], ["status", "1", "blocked"])
        new_body = argv[3][3]
        self.assertIn("[ty-openworkflow: run %s canceled]" % run_id, new_body)
        self.assertIn("the run was canceled", new_body)
        self.assert_all_ok()
        tasks = self.tasks()
        self.assertEqual(len(tasks), 1)
        self.assertEqual(tasks[0]["status"], "blocked")
        self.assertEqual(tasks[0]["body"], new_body)
        self.assert_delivered(sc.status(run_id), 1)

    def test_canceled_before_any_pass(self):
        sc = self.sidecar()
        self.deploy(sc, HELLO)
        run_id = sc.start("wf", {"name": "World"}, create_task=True, drive=False)["id"]
        sc.cancel(run_id)
        sc.bridge.deliver_due()
        # Never started, so never "processing": create, then the note and blocked.
        self.assertEqual([self.head(a) for a in self.argvs()], [["create", "Workflow: wf"], ["show", "1"],
                                                         ["update", "1"], ["status", "1"]])
        self.assert_all_ok()
        self.assertEqual(self.tasks()[0]["status"], "blocked")
        self.assert_delivered(sc.status(run_id), 1)


class RetriedFlowTest(BridgeCase):

    def test_retried_then_completed_creates_and_closes_once(self):
        sc = self.sidecar()
        self.deploy(sc, FLAKY)
        counter = os.path.join(self.tmp, "counter")
        st = sc.start("wf", {"counter": counter}, create_task=True, drive=False)
        st = self.drive(sc, st["id"])
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["output"], {"tries": 3})
        self.assertGreaterEqual(st["passes"], 3, "the step really was retried across passes")

        argv = self.argvs()
        self.assertEqual([self.head(a) for a in argv], [["create", "Workflow: wf"], ["status", "1"], ["show", "1"],
                                                 ["update", "1"], ["close", "1"]])
        self.assertEqual(argv[1], ["status", "1", "processing"])
        self.assertIn('output: {"tries": 3}', argv[3][3])
        self.assert_all_ok()
        self.assertEqual(len(self.tasks()), 1)
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_delivered(st, 1)


class ProjectTest(BridgeCase):
    projects = ("personal", "work")

    def test_project_is_passed_on_create(self):
        self.configure(project="work")
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 2}, create_task=True, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], {"doubled": 4})
        argv = self.argvs()
        self.assert_created(argv[0], "Workflow: wf", run_id, '{"n": 2}', project="work")
        self.assertEqual([a[:2] for a in argv[1:]], [["status", "1"], ["show", "1"], ["update", "1"], ["close", "1"]])
        self.assert_all_ok()
        self.assertEqual(self.tasks()[0]["project"], "work")
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_delivered(st, 1)

    def test_unknown_project_waits_and_says_why(self):
        self.configure(project="nope")
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 2}, create_task=True, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed", "a rejected create never fails the run")
        self.assertEqual(self.tasks(), [])
        self.assertIsNone(st["task"]["id"])
        self.assertFalse(st["task"]["delivered"])
        self.assertIn("project not found: nope", st["task"]["last_error"])
        self.assertTrue(all(c["exit"] == 1 for c in self.calls()))


class TyDownTest(BridgeCase):

    def test_ty_failing_then_back_delivers_in_order_without_duplicates(self):
        fake_ty.write_control(self.state, {"fail": True})
        sc = self.sidecar()
        self.deploy(sc, HELLO)
        r1 = sc.start("wf", {"name": "World"}, create_task=True, drive=False)["id"]
        r2 = sc.start("wf", {"name": "World"}, task_title="Second", drive=False)["id"]
        for run_id in (r1, r2):
            st = self.drive(sc, run_id)
            self.assertEqual(st["status"], "completed", "a failing ty never blocks or fails a run")
            self.assertIsNone(st["task"]["id"])
            self.assertEqual(st["task"]["pending_updates"], 3)
            self.assertFalse(st["task"]["delivered"])
            self.assertIn("injected failure", st["task"]["last_error"])
            self.assertIsNotNone(st["task"]["next_attempt_at"])
        self.assertEqual(self.tasks(), [])
        self.assertTrue(self.calls(), "the bridge did try")
        self.assertTrue(all(c["exit"] == 1 for c in self.calls()))
        # A retry that is not due yet is not attempted.
        n = len(self.calls())
        self.assert_nothing_due(sc)
        self.assertEqual(len(self.calls()), n)

        fake_ty.write_control(self.state, {})
        self.assertEqual(self.recover(sc), 6)
        self.assert_all_ok(since=n)
        tasks = {t["title"]: t for t in self.tasks()}
        self.assertEqual(sorted(tasks), ["Second", "Workflow: wf"], "one task per run, no duplicate")
        self.assertEqual(len(self.tasks()), 2)
        for run_id, title in ((r1, "Workflow: wf"), (r2, "Second")):
            task = tasks[title]
            self.assertIn(tow.TASK_MARKER % run_id, task["body"])
            self.assertEqual(task["status"], "done")
            st = sc.status(run_id)
            self.assert_delivered(st, task["id"])
            # In order per task: created, processing, body appended, closed.
            tid = str(task["id"])
            mine = [a for a in self.argvs(since=n)
                    if (a[0] == "create" and tow.TASK_MARKER % run_id in a[2]) or (len(a) > 1 and a[1] == tid)]
            self.assertEqual(mine[0][0], "create")
            self.assertEqual([a[:3] for a in mine[1:]], [["status", tid, "processing"], ["show", tid, "--json"],
                                                        ["update", tid, "--body"], ["close", tid]])

    def test_fail_next_then_recovers(self):
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        fake_ty.write_control(self.state, {"fail_next": 2})
        run_id = sc.start("wf", {"n": 1}, create_task=True, drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["task"]["pending_updates"], 3)
        self.assertEqual([c["exit"] for c in self.calls()], [1])
        self.assert_nothing_due(sc)
        self.assertEqual(len(self.calls()), 1)
        self.clock.advance(PAST_RETRY_MS)
        sc.tick()   # the second (and last) injected failure
        self.assertEqual([c["exit"] for c in self.calls()], [1, 1])
        self.clock.advance(PAST_RETRY_MS)
        sc.tick()
        self.assertEqual(len(self.tasks()), 1)
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_all_ok(since=2)
        # A failed create, then every retry looks first (`ty list`): the second attempt's
        # lookup is the other injected failure, the third finds nothing and creates.
        self.assertEqual([c["argv"][0] for c in self.calls() if c["argv"][0] in ("create", "list")],
                         ["create", "list", "list", "create"])
        self.assertEqual(sum(1 for c in self.calls() if c["argv"][0] == "create" and c["exit"] == 0), 1)
        self.assert_delivered(sc.status(run_id), 1)

    def test_ty_fails_in_the_middle_of_a_flow(self):
        sc = self.sidecar()
        self.deploy(sc, HELLO)
        run_id = sc.start("wf", {"name": "World"}, create_task=True, drive=False)["id"]
        sc.tick()
        self.assertEqual([a[0] for a in self.argvs()], ["create", "status"])
        fake_ty.write_control(self.state, {"fail_commands": ["close"]})
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["task"]["id"], 1)
        self.assertEqual(st["task"]["pending_updates"], 1)
        self.assertIn("`ty close` failed", st["task"]["last_error"])
        self.assertEqual(self.tasks()[0]["status"], "processing")
        n = len(self.calls())

        fake_ty.write_control(self.state, {})
        self.assertEqual(self.recover(sc), 1)
        # The body was already appended: the retry re-reads it and only closes.
        self.assertEqual(self.argvs(since=n), [["show", "1", "--json"], ["close", "1"]])
        self.assert_all_ok(since=n)
        task = self.tasks()[0]
        self.assertEqual(task["status"], "done")
        self.assertEqual(task["body"].count("[ty-openworkflow: run %s completed]" % run_id), 1)
        self.assertEqual(sum(1 for a in self.argvs() if a[0] == "update"), 1)
        self.assert_delivered(sc.status(run_id), 1)


class TyHangsTest(BridgeCase):

    def test_hang_times_out_and_is_retried(self):
        self.configure(timeout="1s")
        fake_ty.write_control(self.state, {"hang_seconds": 20})
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 3}, create_task=True, drive=False)["id"]
        t0 = time.time()
        sc.tick()
        self.assertLess(time.time() - t0, 10, "the hung ty was not cut off at taskyou.timeout")
        st = sc.status(run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["output"], {"doubled": 6})
        self.assertIn("did not answer within", st["task"]["last_error"])
        self.assertEqual(st["task"]["pending_updates"], 3)
        calls = self.calls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0]["argv"][0], "create")
        self.assertIsNone(calls[0]["exit"], "the hung call never finished")
        self.assertFalse(_alive(calls[0]["pid"]), "the hung ty process was killed")
        self.assertEqual(self.tasks(), [])

        fake_ty.write_control(self.state, {})
        self.assertEqual(self.recover(sc), 3)
        self.assert_all_ok(since=1)
        self.assertEqual(len(self.tasks()), 1)
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_delivered(sc.status(run_id), 1)

    def test_hung_ty_does_not_delay_a_pass_under_serve(self):
        self.configure(timeout="2s")
        fake_ty.write_control(self.state, {"hang_seconds": 20})
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 5}, create_task=True, drive=False)["id"]
        stop = threading.Event()
        server = threading.Thread(target=sc.serve, args=(stop,), daemon=True)
        server.start()
        try:
            wait_for(lambda: sc.status(run_id)["status"] == "completed", timeout=10, what="the run to complete")
            # The run finished while `ty` had not answered a single call (the first may even be
            # recorded only now, on a loaded machine).
            calls = wait_for(self.calls, timeout=10, what="the bridge to call ty")
            self.assertEqual([(c["argv"][0], c["exit"]) for c in calls], [("create", None)] * len(calls))
            self.assertEqual(self.tasks(), [])
            fake_ty.write_control(self.state, {})
            wait_for(lambda: sc.status(run_id)["task"]["delivered"], timeout=15, what="the updates to land")
        finally:
            stop.set()
            server.join(15)
        self.assertFalse(server.is_alive())
        self.assertEqual(len(self.tasks()), 1)
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assertEqual(sum(1 for c in self.calls() if c["argv"][0] == "create" and c["exit"] == 0), 1)


class TyMissingTest(BridgeCase):
    install_ty = False

    def test_missing_binary_then_installed(self):
        if tow.shutil.which("ty"):
            self.skipTest("a real `ty` is on PATH")
        sc = self.sidecar()
        self.deploy(sc, HELLO)
        run_id = sc.start("wf", {"name": "World"}, create_task=True, drive=False)["id"]
        with self.assertLogs("ty_openworkflow", "WARNING") as logs:
            st = self.drive(sc, run_id)
            self.recover(sc)
            self.recover(sc)
        self.assertEqual(st["status"], "completed", "runs work without ty")
        self.assertEqual(st["output"], HELLO_OUTPUT)
        task = sc.status(run_id)["task"]
        self.assertTrue(task["requested"])
        self.assertIsNone(task["id"])
        self.assertEqual(task["pending_updates"], 3)
        self.assertFalse(task["delivered"])
        self.assertIn("ty not found on PATH", task["last_error"])
        warned = [m for m in logs.output if "not found on PATH" in m]
        self.assertEqual(len(warned), 1, "said once, plainly: %s" % logs.output)
        code, out, _ = self.cli("status", run_id)
        self.assertEqual(code, 0)
        self.assertIn("3 updates waiting: ty not found on PATH", out)

        self.install()
        self.assertEqual(self.recover(sc), 3)
        argv = self.argvs()
        # Past its second attempt the create first looks for a task an earlier try may have made.
        self.assertEqual(argv[0], ["list", "--json", "-n", "500"])
        argv = argv[1:]
        self.assert_created(argv[0], "Workflow: wf", run_id, '{"name": "World"}')
        self.assertEqual([a[:3] for a in argv[1:]], [["status", "1", "processing"], ["show", "1", "--json"],
                                                    ["update", "1", "--body"], ["close", "1"]])
        self.assert_all_ok()
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_delivered(sc.status(run_id), 1)
        code, out, _ = self.cli("status", run_id)
        self.assertIn("#1 Workflow: wf (updates delivered)", out)


class CrashAfterCreateTest(BridgeCase):
    """`ty create` made the task, then died before the bridge stored its id."""

    def crash_first_create(self, sc, run_id):
        fake_ty.write_control(self.state, {"crash_after_create": True})
        sc.bridge.deliver_due()
        fake_ty.write_control(self.state, {})
        calls = self.calls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0]["argv"][0], "create")
        self.assertEqual(calls[0]["injected"], "crash")
        self.assertEqual(len(self.tasks()), 1, "the crashed create did make the task")
        st = sc.status(run_id)
        self.assertIsNone(st["task"]["id"])
        self.assertEqual(st["task"]["pending_updates"], 1)

    def test_retry_after_crash_finds_the_task(self):
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 2}, create_task=True, drive=False)["id"]
        self.crash_first_create(sc, run_id)
        self.recover(sc)
        self.assertEqual(len(self.tasks()), 1, "a second task was created: %s" % self.argvs())
        argv = self.argvs()
        self.assertEqual(argv[1][:2], ["list", "--json"])
        self.assertEqual(argv[2], ["show", "1", "--json"])
        self.assertEqual(sum(1 for a in argv if a[0] == "create"), 1)
        st = self.drive(sc, run_id)
        self.assert_delivered(st, 1)

    def test_lookup_finds_the_crashed_task_by_its_marker(self):
        # Reaches the lookup the current code does run (from the second retry on),
        # with a same-titled task of another run in the way.
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        crashed = sc.start("wf", {"n": 2}, create_task=True, drive=False)["id"]
        self.crash_first_create(sc, crashed)              # task #1 belongs to `crashed`
        fake_ty.write_control(self.state, {"fail_next": 1})
        self.clock.advance(PAST_RETRY_MS)
        sc.bridge.deliver_due()                            # one plain failure
        self.assertEqual(self.calls()[-1]["injected"], "fail")
        other = sc.start("wf", {"n": 7}, create_task=True, drive=False)["id"]
        sc.bridge.deliver_due()                            # task #2, same title, other run
        self.assertEqual(sc.status(other)["task"]["id"], 2)
        n = len(self.calls())

        self.recover(sc)
        argv = self.argvs(since=n)
        # Newest first: #2 is shown and skipped (not our marker), #1 is ours.
        self.assertEqual(argv, [["list", "--json", "-n", "500"], ["show", "2", "--json"], ["show", "1", "--json"]])
        self.assert_all_ok(since=n)
        self.assertEqual(sc.status(crashed)["task"]["id"], 1)
        for run_id in (crashed, other):
            self.drive(sc, run_id)
        self.assertEqual(len(self.tasks()), 2, "no duplicate task")
        self.assertEqual(sum(1 for c in self.calls() if c["argv"][0] == "create" and c["exit"] == 0), 1)
        by_id = {t["id"]: t for t in self.tasks()}
        self.assertIn(tow.TASK_MARKER % crashed, by_id[1]["body"])
        self.assertIn(tow.TASK_MARKER % other, by_id[2]["body"])
        self.assertEqual([by_id[1]["status"], by_id[2]["status"]], ["done", "done"])
        self.assert_delivered(sc.status(crashed), 1)
        self.assert_delivered(sc.status(other), 2)


class TitleTest(BridgeCase):

    def test_title_starting_with_a_dash(self):
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 1}, task_title="-1 day: renew the cert", drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual([t["title"] for t in self.tasks()], ["-1 day: renew the cert"], st["task"])
        self.assert_all_ok()
        self.assert_delivered(st, 1)

    def test_title_with_quotes_shell_chars_and_unicode(self):
        title = 'Rapport "hebdo" — $HOME `x`; rm -rf /'
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 1, "s": "café 'q'"}, task_title=title, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual([t["title"] for t in self.tasks()], [title])
        self.assertIn("café 'q'", self.tasks()[0]["body"])
        self.assert_all_ok()
        self.assert_delivered(st, 1)


class AutoCreateTest(BridgeCase):

    def test_auto_create_tasks_true_creates_without_the_flag(self):
        self.configure(auto_create_tasks=True)
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 4}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(len(self.tasks()), 1)
        self.assertEqual(self.tasks()[0]["title"], "Workflow: wf")
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_all_ok()
        self.assert_delivered(st, 1)

    def test_auto_create_tasks_false_without_the_flag_creates_none(self):
        sc = self.sidecar()
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 4}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(self.calls(), [], "ty is never called")
        self.assertEqual(self.tasks(), [])
        self.assertFalse(st["task"]["requested"])
        self.assertIsNone(st["task"]["id"])
        self.assertEqual(st["task"]["pending_updates"], 0)


class EndToEndTest(BridgeCase):

    def test_subprocess_tick_delivers_the_outbox(self):
        sc = self.sidecar(clock=False)
        self.deploy(sc, DOUBLE)
        run_id = sc.start("wf", {"n": 21}, task_title="Answer", drive=False)["id"]
        self.assertEqual(self.calls(), [])
        proc = run_module(["--config", self.config_path, "tick"], timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(st["output"], {"doubled": 42})
        argv = self.argvs()
        self.assert_created(argv[0], "Answer", run_id, '{"n": 21}')
        self.assertEqual([a[:3] for a in argv[1:]], [["status", "1", "processing"], ["show", "1", "--json"],
                                                    ["update", "1", "--body"], ["close", "1"]])
        self.assertIn('output: {"doubled": 42}', argv[3][3])
        self.assert_all_ok()
        self.assertEqual(self.tasks()[0]["status"], "done")
        self.assert_delivered(st, 1)


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    unittest.main()
