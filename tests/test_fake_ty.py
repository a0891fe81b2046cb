"""Tests of the fake TaskYou ``ty`` (tests/fake_ty.py) itself.

Every test runs the fake the way the bridge will: as ``ty`` found on PATH,
through the wrapper install() writes, in a subprocess.  PATH holds only the
temp bin dir, so a real ``ty`` on the machine can never answer instead.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from tests import fake_ty

SHOW_KEYS = {"id", "title", "body", "status", "type", "project", "executor", "worktree",
             "branch", "claude_pane_id", "shell_pane_id", "summary", "created_at", "updated_at"}
TIMEOUT_S = 10


class FakeTyCase(unittest.TestCase):
    """A fresh bin dir + state per test; self.ty(...) runs the fake."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="fake-ty-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.bin = os.path.join(self.tmp, "bin")
        self.state_path = os.path.join(self.tmp, "ty-state.json")
        self.wrapper = fake_ty.install(self.bin, self.state_path, projects=("personal", "myapp"))
        env = dict(os.environ, PATH=self.bin)   # only the fake is reachable
        env.pop(fake_ty.STATE_ENV, None)        # the wrapper must bake it in
        self.env = env

    def ty(self, *args, timeout=TIMEOUT_S):
        return subprocess.run(["ty", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.tmp)

    def ok(self, *args):
        r = self.ty(*args)
        self.assertEqual(r.returncode, 0, "ty %s failed: %s" % (" ".join(args), r.stderr))
        return r.stdout

    def rejected(self, *args, message):
        """Assert exit 1, `message` on stderr, nothing on stdout, tasks unchanged."""
        before = fake_ty.tasks(self.state_path)
        r = self.ty(*args)
        self.assertEqual(r.returncode, 1, r)
        self.assertIn(message, r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertEqual(fake_ty.tasks(self.state_path), before)
        return r

    def create(self, title="Task", *more):
        return json.loads(self.ok("create", title, "--json", *more))["id"]

    def task(self, task_id):
        return fake_ty.get_task(self.state_path, task_id)

    def set_control(self, control):
        fake_ty.write_control(self.state_path, control)


class Install(FakeTyCase):

    def test_wrapper_is_executable_and_bakes_state_path(self):
        self.assertTrue(os.access(self.wrapper, os.X_OK))
        with open(self.wrapper) as f:
            text = f.read()
        self.assertIn(self.state_path, text)
        self.assertIn(sys.executable, text)
        self.assertEqual(fake_ty.load_state(self.state_path)["projects"], ["personal", "myapp"])

    def test_missing_state_env_is_a_fake_error(self):
        env = dict(self.env)
        r = subprocess.run([sys.executable, fake_ty.__file__, "list"], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        self.assertEqual(r.returncode, 2)
        self.assertIn("FAKE_TY_STATE", r.stderr)

    def test_install_keeps_an_existing_state(self):
        self.create("keep me")
        fake_ty.install(self.bin, self.state_path)
        self.assertEqual(self.task(1)["title"], "keep me")


class Create(FakeTyCase):

    def test_plain_output_and_stored_task(self):
        self.assertEqual(self.ok("create", "Fix login"), "Created task #1: Fix login\n")
        t = self.task(1)
        self.assertEqual((t["status"], t["type"], t["project"], t["executor"], t["body"]),
                         ("backlog", "code", "personal", "claude", ""))
        self.assertEqual(t["created_at"], t["updated_at"])
        self.assertIsNone(t["started_at"])
        self.assertEqual(self.ok("create", "Second"), "Created task #2: Second\n")

    def test_json_is_one_line_with_exact_keys(self):
        out = self.ok("create", "A <b> & c", "--body", "text", "--json")
        self.assertEqual(out.count("\n"), 1)
        self.assertEqual(out, '{"executor":"claude","id":1,"project":"personal","status":"backlog",'
                              '"title":"A \\u003cb\\u003e \\u0026 c","type":"code"}\n')
        self.assertEqual(json.loads(out)["title"], "A <b> & c")

    def test_flag_forms(self):
        cases = [
            (["--type", "writing"], "writing"), (["--type=thinking"], "thinking"),
            (["-t", "writing"], "writing"), (["-tthinking"], "thinking"), (["-t=writing"], "writing"),
        ]
        for flags, expected in cases:
            with self.subTest(flags=flags):
                self.assertEqual(self.task(self.create("T", *flags))["type"], expected)
        self.assertEqual(self.task(self.create("T", "-p", "myapp"))["project"], "myapp")
        self.assertEqual(self.task(self.create("T", "--project=myapp"))["project"], "myapp")
        tid = json.loads(self.ok("create", "--json", "--body=b", "--", "-dash"))["id"]
        self.assertEqual((self.task(tid)["title"], self.task(tid)["body"]), ("-dash", "b"))

    def test_flags_may_follow_or_precede_the_title(self):
        tid = json.loads(self.ok("create", "--body", "x", "-t", "writing", "Title", "--json"))["id"]
        self.assertEqual(self.task(tid)["title"], "Title")

    def test_body_only_derives_title_and_unescapes_newlines(self):
        out = self.ok("create", "--body", "first line\\nsecond")
        self.assertEqual(out, "Created task #1: first line\n")
        self.assertEqual(self.task(1)["body"], "first line\nsecond")
        self.ok("create", "--body", "x" * 60)
        self.assertEqual(self.task(2)["title"], "x" * 50 + "...")

    def test_rejections(self):
        self.rejected("create", message="Error: either title or --body must be provided")
        self.rejected("create", "  ", "--body", " ", message="either title or --body")
        self.rejected("create", "T", "-t", "poetry",
                      message="Invalid type. Must be one of: code, writing, thinking")
        self.rejected("create", "T", "-p", "nope", message="Error: project not found: nope")
        self.rejected("create", "a", "b", message="Error: accepts at most 1 arg(s), received 2")
        self.rejected("create", "T", "-x", message="Error: unknown shorthand flag: 'x' in -x")
        self.rejected("create", "T", "--execute", message="Error: unknown flag: --execute")
        self.rejected("create", "T", "--tags", "a", message="Error: unknown flag: --tags")
        self.rejected("create", "T", "--body", message="Error: flag needs an argument: --body")
        self.rejected("create", "T", "-t", message="Error: flag needs an argument: 't' in -t")
        self.rejected("create", "T", "--json=yes",
                      message='invalid argument "yes" for "--json" flag: strconv.ParseBool')
        self.assertEqual(fake_ty.load_state(self.state_path)["next_id"], 1)


class Show(FakeTyCase):

    def test_json_fields_and_indent(self):
        self.create("T", "--body", "B")
        out = self.ok("show", "1", "--json")
        self.assertTrue(out.startswith('{\n  "body": "B",\n'))
        doc = json.loads(out)
        self.assertEqual(set(doc), SHOW_KEYS)
        self.assertEqual((doc["id"], doc["title"], doc["status"]), (1, "T", "backlog"))

    def test_started_and_completed_appear_when_set(self):
        self.create()
        self.ok("status", "1", "processing")
        doc = json.loads(self.ok("show", "--json", "1"))
        self.assertIn("started_at", doc)
        self.assertNotIn("completed_at", doc)
        self.ok("close", "1")
        self.assertIn("completed_at", json.loads(self.ok("show", "1", "--json")))

    def test_human_rendering(self):
        self.create("Title", "--body", "Body text", "-p", "myapp")
        out = self.ok("show", "1")
        self.assertTrue(out.startswith("Task #1: Title\n" + "\u2500" * 50 + "\n"))
        for line in ("Status:   backlog", "Type:     code", "Project:  myapp",
                     "Description:\nBody text"):
            self.assertIn(line, out)

    def test_rejections(self):
        self.create()
        self.rejected("show", "99", message="Task #99 not found")
        self.rejected("show", "abc", "--json", message="Invalid task ID: abc")
        self.rejected("show", message="Error: accepts 1 arg(s), received 0")
        self.rejected("show", "1", "2", message="Error: accepts 1 arg(s), received 2")
        self.rejected("show", "1", "--bogus", message="Error: unknown flag: --bogus")

    def test_id_is_scanned_like_sscanf(self):
        self.create()
        self.assertEqual(json.loads(self.ok("show", "001", "--json"))["id"], 1)


class Status(FakeTyCase):

    def test_moves_and_stamps(self):
        self.create()
        self.assertEqual(self.ok("status", "1", "processing"), "Task #1 moved to processing\n")
        self.assertIsNotNone(self.task(1)["started_at"])
        self.assertEqual(self.ok("status", "1", " BLOCKED "), "Task #1 moved to blocked\n")
        t = self.task(1)
        self.assertEqual(t["status"], "blocked")
        self.assertIsNotNone(t["completed_at"])   # blocked after starting stamps completion

    def test_all_valid_statuses(self):
        self.create()
        for status in fake_ty.STATUSES:
            with self.subTest(status=status):
                self.ok("status", "1", status)
                self.assertEqual(self.task(1)["status"], status)

    def test_rejections(self):
        self.create()
        self.rejected("status", "1", "failed", message="Invalid status. Must be one of: "
                      "backlog, queued, processing, blocked, done, archived")
        self.rejected("status", "7", "done", message="Task #7 not found")
        self.rejected("status", "x", "done", message="Invalid task ID: x")
        self.rejected("status", "1", message="Error: accepts 2 arg(s), received 1")


class Close(FakeTyCase):

    def test_close_then_already_done_and_done_alias(self):
        self.create("One")
        self.create("Two")
        self.assertEqual(self.ok("close", "1"), "Closed task #1: One\n")
        self.assertEqual(self.task(1)["status"], "done")
        self.assertEqual(self.ok("close", "1"), "Task #1 is already done\n")
        self.assertEqual(self.ok("done", "2"), "Closed task #2: Two\n")

    def test_rejections(self):
        self.rejected("close", "5", message="Task #5 not found")
        self.rejected("done", message="Error: accepts 1 arg(s), received 0")
        self.rejected("close", "1", "--summary", "x", message="Error: unknown flag: --summary")


class Update(FakeTyCase):

    def test_replaces_given_fields(self):
        self.create("Old", "--body", "old body")
        self.assertEqual(self.ok("update", "1", "--body", "new body", "--title", "New", "-t", "writing",
                                 "-p", "elsewhere", "--tags", "a,b"), "Updated task #1\n")
        t = self.task(1)
        self.assertEqual((t["title"], t["body"], t["type"], t["project"], t["tags"]),
                         ("New", "new body", "writing", "elsewhere", "a,b"))

    def test_no_flags_changes_nothing_and_empty_body_clears(self):
        self.create("T", "--body", "keep")
        self.ok("update", "1")
        self.assertEqual(self.task(1)["body"], "keep")
        self.ok("update", "1", "--body=")
        self.assertEqual(self.task(1)["body"], "")

    def test_rejections(self):
        self.create()
        self.rejected("update", "1", "-t", "poem", message="Invalid type. Must be one of:")
        self.rejected("update", "9", "--title", "x", message="Task #9 not found")
        self.rejected("update", "1", "--message", "x", message="Error: unknown flag: --message")


class List(FakeTyCase):

    def test_filters_limit_and_json(self):
        self.create("A")
        self.create("B", "-p", "myapp")
        self.create("C")
        self.ok("close", "3")
        rows = json.loads(self.ok("list", "--json"))
        self.assertEqual([r["id"] for r in rows], [2, 1])     # done hidden, newest first
        self.assertEqual(set(rows[0]), {"id", "title", "status", "type", "project", "created_at"})
        self.assertEqual([r["id"] for r in json.loads(self.ok("list", "-s", "done", "--json"))], [3])
        self.assertEqual([r["id"] for r in json.loads(self.ok("list", "-p", "myapp", "--json"))], [2])
        self.assertEqual(len(json.loads(self.ok("list", "-n", "1", "--json"))), 1)
        self.assertEqual(len(json.loads(self.ok("list", "--limit=1", "--json"))), 1)

    def test_empty_and_human(self):
        self.assertEqual(self.ok("list", "--json"), "null\n")
        self.assertEqual(self.ok("list"), "No tasks found\n")
        self.create("Hello", "-p", "myapp")
        self.assertEqual(self.ok("list"), "#1    backlog    [myapp] Hello\n")

    def test_rejections(self):
        self.rejected("list", "-n", "many", message='invalid argument "many" for "-n, --limit" flag')
        self.rejected("list", "-z", message="Error: unknown shorthand flag: 'z' in -z")
        self.rejected("list", "--all", message="Error: unknown flag: --all")


class Grammar(FakeTyCase):

    def test_unknown_commands(self):
        for cmd in ("complete", "fail", "comment", "retry"):
            with self.subTest(cmd=cmd):
                self.rejected(cmd, "1", message='Error: unknown command "%s" for "ty"' % cmd)

    def test_help_and_version_and_root(self):
        self.assertIn("Usage:\n  ty create [title] [flags]", self.ok("create", "--help"))
        self.assertIn("ty show <task-id>", self.ok("show", "-h"))     # help wins over arg count
        self.assertIn("Available Commands:", self.ok("--help"))
        self.assertIn("Aliases:\n  close, done", self.ok("help", "done"))
        self.assertEqual(self.ok("--version"), fake_ty.FAKE_VERSION + "\n")
        self.rejected(message="TUI")
        # cobra's stripFlags lets an unknown root flag swallow the next word:
        self.rejected("--json", "create", "T", message='Error: unknown command "T" for "ty"')
        self.rejected("--json", message="Error: unknown flag: --json")
        self.rejected("create", "--help", "--bogus", message="unknown flag: --bogus")

    def test_in_process_run_matches_cli(self):
        state = fake_ty.new_state()
        code, out, err = fake_ty.run(["create", "T", "--json"], state)
        self.assertEqual((code, err, json.loads(out)["id"]), (0, "", 1))
        code, out, err = fake_ty.run(["fail", "1"], state)
        self.assertEqual(code, 1)
        self.assertIn('unknown command "fail"', err)


class CallsLog(FakeTyCase):

    def test_every_call_is_recorded_with_its_outcome(self):
        self.create("T")
        self.ty("comment", "1", "hi")
        self.ok("status", "1", "done")
        log = fake_ty.calls(self.state_path)
        self.assertEqual([c["argv"] for c in log],
                         [["create", "T", "--json"], ["comment", "1", "hi"], ["status", "1", "done"]])
        self.assertEqual([c["exit"] for c in log], [0, 1, 0])
        self.assertEqual(log[2]["stdout"], "Task #1 moved to done\n")
        self.assertIn("unknown command", log[1]["stderr"])
        self.assertEqual([c["seq"] for c in log], [1, 2, 3])
        self.assertEqual(log[0]["cwd"], os.path.realpath(self.tmp))

    def test_concurrent_calls_are_serialized(self):
        procs = [subprocess.Popen(["ty", "create", "T%d" % i, "--json"], env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(8)]
        ids = sorted(json.loads(p.communicate(timeout=TIMEOUT_S)[0])["id"] for p in procs)
        self.assertEqual(ids, list(range(1, 9)))
        self.assertEqual(len(fake_ty.calls(self.state_path)), 8)
        leftovers = [n for n in os.listdir(self.tmp) if n.endswith(".tmp")]
        self.assertEqual(leftovers, [])


class FailureInjection(FakeTyCase):

    def test_fail_everything(self):
        self.create()
        self.set_control({"fail": True})
        self.rejected("status", "1", "done", message=fake_ty.DEFAULT_FAIL_MESSAGE)
        self.assertEqual(self.task(1)["status"], "backlog")
        self.assertEqual(fake_ty.calls(self.state_path)[-1]["injected"], "fail")
        self.set_control({"fail": True, "fail_message": "Error: database is locked"})
        self.rejected("list", message="Error: database is locked")
        self.set_control(None)
        self.ok("status", "1", "done")

    def test_fail_commands_is_alias_aware(self):
        self.create()
        self.set_control({"fail_commands": ["create", "close"]})
        self.rejected("create", "T", message=fake_ty.DEFAULT_FAIL_MESSAGE)
        self.rejected("done", "1", message=fake_ty.DEFAULT_FAIL_MESSAGE)
        self.ok("show", "1")

    def test_fail_next_counts_down(self):
        self.set_control({"fail_next": 2})
        self.rejected("create", "A", message="injected")
        self.rejected("list", message="injected")
        self.assertEqual(fake_ty.read_control(self.state_path), {"fail_next": 0})
        self.create("B")
        self.assertEqual(self.task(1)["title"], "B")

    def test_hang_is_killed_by_a_timeout_and_still_logged(self):
        self.set_control({"hang_seconds": 30})
        with self.assertRaises(subprocess.TimeoutExpired):
            self.ty("create", "T", "--json", timeout=0.5)
        log = fake_ty.calls(self.state_path)
        self.assertEqual(log[-1]["argv"], ["create", "T", "--json"])
        self.assertIsNone(log[-1]["exit"])
        self.assertEqual(fake_ty.tasks(self.state_path), [])

    def test_short_hang_then_normal_answer_and_command_filter(self):
        self.set_control({"hang_seconds": 3, "hang_commands": ["create"]})
        t0 = time.monotonic()
        self.create()
        self.assertGreaterEqual(time.monotonic() - t0, 3)
        t0 = time.monotonic()
        self.ok("show", "1")
        self.assertLess(time.monotonic() - t0, 2.5)  # not hung: a fake ty call takes ~0.05 s

    def test_crash_after_create_keeps_the_side_effect(self):
        self.set_control({"crash_after_create": True})
        r = self.ty("create", "T", "--json")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (1, "", ""))
        self.assertEqual(self.task(1)["title"], "T")
        self.assertEqual(fake_ty.calls(self.state_path)[-1]["injected"], "crash")
        self.ok("status", "1", "processing")        # only create crashes

    def test_crash_after_other_commands(self):
        self.create()
        self.set_control({"crash_after": ["status"]})
        r = self.ty("status", "1", "blocked")
        self.assertEqual((r.returncode, r.stdout), (1, ""))
        self.assertEqual(self.task(1)["status"], "blocked")

    def test_control_change_mid_flow(self):
        self.create()
        self.set_control({"fail": True})
        self.rejected("close", "1", message="injected")
        self.set_control({})
        self.ok("close", "1")
        self.assertFalse(os.path.exists(self.state_path + fake_ty.CONTROL_SUFFIX))

    def test_unknown_control_key_is_a_fake_error(self):
        with open(self.state_path + fake_ty.CONTROL_SUFFIX, "w") as f:
            json.dump({"fial": True}, f)
        r = self.ty("list")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown control key(s) fial", r.stderr)
        with self.assertRaises(ValueError):
            fake_ty.write_control(self.state_path, {"fial": True})


if __name__ == "__main__":
    unittest.main()
