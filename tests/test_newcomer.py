"""What a new user trips on (issue 20): options that are checked, usage errors that point to the
right help, and the smaller things a first walk through the commands finds."""
import json
import os
import shutil
import unittest

from tests import test_cloudflare as cloudflare_tests
from tests.fake_cloudflare import have_miniflare
from tests.util import ROOT, TempHome, tow

ONE = "def workflow(input, ctx):\n    return ctx.step('s', lambda: input)\n"


class ShortRunIds(TempHome):
    """The short id `list runs` shows is unique in the store and works wherever an id is taken;
    old ids (time first) keep working in full and by prefix."""

    extra_config = "store:\n  synchronous: normal\n"  # 100,000 runs made fast; nothing to sync

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar(clock=False)
        self.sc.deploy("hello", ONE, runtime="python")

    def make_runs(self, n, old_style=False, batch=5000):
        """``n`` runs straight through the store (``old_style``: ids as they were made before,
        time first, many in one millisecond)."""
        store, now, made = self.sc.store, tow.now_ms(), []
        for i in range(0, n, batch):
            with store.transaction() as c:
                for _ in range(min(batch, n - i)):
                    run_id = tow.new_id("run") if old_style else None
                    made.append(store.runs.add_run(c, run_id, "hello", 1, "null", now)[0])
        return made

    def test_short_ids_of_100000_runs_are_unique_and_resolve(self):
        import bisect
        import random
        import time
        old = self.make_runs(2000, old_style=True)
        new = self.make_runs(98000)
        t0 = time.monotonic()
        rows = self.sc.list_runs(limit=100000)
        list_s = time.monotonic() - t0
        self.assertEqual(len(rows), 100000)
        shown = {r["id"]: r["short_id"] for r in rows}
        self.assertEqual(len(set(shown.values())), 100000, "two runs show the same short id")
        self.assertEqual({len(shown[i]) for i in new}, {tow.RUN_SHORT_LEN})
        self.assertGreaterEqual(min(len(shown[i]) for i in old), tow.RUN_SHORT_LEN)
        # Each short id is the start of exactly one id of the store.
        ids = sorted(shown)
        for run_id, short in shown.items():
            at = bisect.bisect_left(ids, short)
            self.assertEqual(ids[at], run_id)
            self.assertTrue(at + 1 == len(ids) or not ids[at + 1].startswith(short), short)
        # ... and resolves to it, through the API and the CLI, also once more runs were made.
        more = self.make_runs(1000)
        sample = random.Random(20).sample(sorted(shown), 2000) + old[:50] + more[:50]
        t0 = time.monotonic()
        for run_id in sample:
            short = shown.get(run_id) or self.sc.status(run_id)["short_id"]
            self.assertEqual(self.sc.run(short)["id"], run_id)
        resolve_ms = (time.monotonic() - t0) * 1000 / len(sample)
        for run_id in sample[:5] + old[:5]:
            code, out, err = self.cli("status", shown[run_id], "--json")
            self.assertEqual((code, json.loads(out)["id"]), (0, run_id), err)
        self.assertLess(list_s, 30, "list runs -n 100000 took %.1fs" % list_s)
        self.assertLess(resolve_ms, 50, "resolving a short id took %.1f ms" % resolve_ms)

    def test_the_short_id_works_wherever_an_id_is_taken(self):
        st = self.sc.start("hello", {"n": 1}, drive=False)
        code, out, err = self.cli("list", "runs")
        short = out.splitlines()[1].split()[0]
        self.assertEqual(short, st["id"][:tow.RUN_SHORT_LEN])
        self.assertEqual(st["short_id"], short)
        self.assertEqual(json.loads(self.cli("list", "runs", "--json")[1])[0]["short_id"], short)
        for argv in (["status", short], ["signal", short, "go", "-d", "1"], ["logs", short],
                     ["cancel", short], ["retry", short], ["fork", short]):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual(code, 0, err)
        # The dashboard's JSON API takes it too.
        import urllib.request
        board = self.sc.dashboard(host="127.0.0.1", port=0).start()
        try:
            url = "http://127.0.0.1:%d/api/runs" % board.port
            with urllib.request.urlopen(url + "/" + short, timeout=10) as r:
                self.assertEqual(json.loads(r.read())["id"], st["id"])
            with urllib.request.urlopen(url, timeout=10) as r:
                rows = json.loads(r.read())["runs"]
            self.assertIn(short, [row["short_id"] for row in rows])
        finally:
            board.stop()

    def test_old_ids_keep_working_in_full_and_by_prefix(self):
        old_id = tow.new_id("run")  # as ids were made: time first, then 8 random hex digits
        a, b = old_id[:-8] + "3f57a441", old_id[:-8] + "3f9e0b12"  # in one millisecond
        with self.sc.store.transaction() as c:
            for run_id in (a, b):
                self.sc.store.runs.add_run(c, run_id, "hello", 1, "null", tow.now_ms())
        for run_id in (a, b):
            self.assertEqual(self.cli("status", run_id, "--json")[0], 0)
            short = self.sc.status(run_id)["short_id"]
            self.assertEqual(short, run_id[:-5])  # as long as it takes to tell them apart
            self.assertEqual(self.sc.run(short)["id"], run_id)
        self.assert_refused(["status", a[:-6]], 1, "is ambiguous")


HELLO_JS = ("async function workflow(input, { step }) {\n"
            "  return await step(\"greet\", () => \"hi \" + input);\n}\n")
HELLO_PY = "def workflow(input, ctx):\n    return ctx.step('greet', lambda: 'hi %s' % input)\n"
HELLO_PY2 = "def workflow(input, ctx):\n    return ctx.step('greet', lambda: 'hey %s' % input)\n"


class DeploySaysWhatChanged(TempHome):
    """A deploy says what it changed; a runtime switch must be asked for; new code gets a new
    label, and a label names one code."""

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    @unittest.skipUnless(tow.shutil.which("node"), "node is not on PATH")
    def test_a_py_file_over_a_javascript_workflow_is_refused_without_runtime(self):
        js, py = self.write("hello.js", HELLO_JS), self.write("hello.py", HELLO_PY)
        self.assertEqual(self.cli("deploy", "hello", "-f", js)[0], 0)
        err = self.assert_refused(["deploy", "hello", "-f", py], 2,
                                  "hello runs on node and %s is python by its name" % py)
        self.assertIn("--runtime python", err)
        code, out, err = self.cli("deploy", "hello", "-f", py, "--runtime", "python")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines(), [
            "deployed hello version 2 (1.0.1, python, exec)",
            "  code      changed",
            "  runtime   node -> python (runs in flight keep node)",
            "  label     1.0.0 -> 1.0.1 (new code, next label; --version LABEL picks one)"])

    def test_code_of_the_other_runtime_on_stdin_is_refused_with_the_way_to_switch(self):
        py = self.write("a.py", HELLO_PY)
        self.assertEqual(self.cli("deploy", "w", "-f", py)[0], 0)
        err = self.assert_refused(["deploy", "w", "-f", "-"], 2,
                                  "(w runs on python; --runtime node switches it)",
                                  stdin=HELLO_JS)
        self.assertIn("syntax error", err)

    def test_changed_code_gets_the_next_label_and_a_label_names_one_code(self):
        py, py2 = self.write("a.py", HELLO_PY), self.write("b.py", HELLO_PY2)
        self.assertEqual(self.cli("deploy", "w", "-f", py, "--version", "0.2.0")[0], 0)
        code, out, err = self.cli("deploy", "w", "-f", py2, "--json")
        doc = json.loads(out)
        self.assertEqual((doc["version"], doc["label"]), (2, "0.2.1"))
        self.assertEqual([c["what"] for c in doc["changes"]], ["code", "label"])
        # The same code again: nothing new, whatever it is called by default.
        self.assertEqual(self.cli("deploy", "w", "-f", py2)[1], "w is unchanged (version 2, 0.2.1)\n")
        # A label given that names other code is kept (scripts pin --version), and said.
        code, out, err = self.cli("deploy", "w", "-f", py, "--version", "0.2.1")
        self.assertEqual(code, 0, err)
        self.assertIn("deployed w version 3 (0.2.1, python, exec)", out)
        self.assertIn("label     0.2.1 already names version 2, with other code: both read "
                      "0.2.1 now (--version 0.2.2, or none, tells them apart)", out)
        # Other code under the first label: kept and said too.
        code, out, err = self.cli("deploy", "w", "-f", py2, "--version", "0.2.0")
        self.assertEqual(code, 0, err)
        self.assertIn("deployed w version 4 (0.2.0, python, exec)", out)
        self.assertIn("already names version 1", out)
        labels = [v["label"] for v in self.sidecar().store.versions("w")]
        self.assertEqual(labels, ["0.2.0", "0.2.1", "0.2.1", "0.2.0"])

    def test_the_runtime_carries_over_and_a_dropped_deadline_is_said(self):
        sc = self.sidecar()
        sc.deploy("w", HELLO_PY, runtime="python")
        code, out, err = self.cli("deploy", "w", stdin=HELLO_PY2)  # no --runtime: still python
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[0], "deployed w version 2 (1.0.1, python, exec)")
        res = sc.deploy("w", HELLO_PY2, deadline="1h")
        self.assertEqual(res["changes"], [{"what": "deadline", "from": None, "to": 3600000}])
        code, out, err = self.cli("deploy", "w", stdin=HELLO_PY2)
        self.assertIn("  deadline  1h00m -> none", out.splitlines())

    def test_next_label(self):
        for label, taken, want in (("1.0.0", (), "1.0.1"), ("0.2.9", (), "0.2.10"),
                                   ("v7", (), "v8"), ("beta", (), "beta.1"),
                                   ("2026-01-09", (), "2026-01-10"), ("1.0", ("1.1",), "1.2"),
                                   ("1.0.0-rc1", (), "1.0.0-rc2")):
            with self.subTest(label=label):
                self.assertEqual(tow.next_label(label, set(taken)), want)


SLEEPY = ("def workflow(input, ctx):\n    ctx.step('a', lambda: 1)\n    ctx.sleep('wait', 2)\n"
          "    return ctx.step('b', lambda: 2)\n")


class TickHandsOver(TempHome):
    """A run `tick` leaves due within runner_linger (a schedule's new run at a short sleep) is
    driven on, as after `start`: tick hands it to the background runner."""

    def test_a_fired_schedules_run_is_driven_past_its_short_sleep(self):
        from tests.util import wait_for
        sc = self.sidecar(clock=False)
        sc.deploy("sleepy", SLEEPY, runtime="python")
        sc.schedule_add("sleepy", "@hourly")
        last_hour = tow.Cron("@hourly").next_after(tow.now_ms() - 3600000)
        conn = tow.sqlite3.connect(sc.store.path)  # as if no scheduler had run since the hour
        conn.execute("UPDATE schedules SET next_fire_at = ?", (last_hour,))
        conn.commit()
        conn.close()
        code, out, err = self.cli("tick")
        self.assertEqual(code, 0, err)
        self.assertIn("left to the background runner it started", out)
        [run] = sc.list_runs()
        self.assertEqual((run["status"], run["schedule_name"]), ("sleeping", "sleepy"))
        wait_for(lambda: sc.status(run["id"])["status"] == "completed", timeout=30,
                 what="the runner to finish the run after its sleep")

    def test_the_python_api_tick_stays_in_its_process(self):
        sc = self.sidecar(clock=False)
        sc.deploy("sleepy", SLEEPY, runtime="python")
        run_id = sc.start("sleepy", drive=False)["id"]
        stats = sc.tick()
        self.assertNotIn("handed_over", stats)
        self.assertEqual(sc.status(run_id)["status"], "sleeping")
        self.assertFalse(sc.store.live_schedulers(tow.now_ms(), 60000))

    def test_nothing_due_soon_starts_no_runner(self):
        sc = self.sidecar(clock=False)
        sc.deploy("sleepy", SLEEPY.replace("ctx.sleep('wait', 2)", "ctx.sleep('wait', 3600)"),
                  runtime="python")
        sc.start("sleepy", drive=False)
        code, out, err = self.cli("tick")
        self.assertEqual(out, "tick: 1 pass\n")
        self.assertFalse(sc.store.live_schedulers(tow.now_ms(), 60000))


BAD_PY = ("def helper(x):\n    raise ValueError('boom %s' % x)\n\n\n"
          "def workflow(input, ctx):\n    ctx.step('ok', lambda: 1)\n"
          "    return ctx.step('bad', lambda: helper(input))\n")
BAD_JS = ("function helper(x) {\n  throw new Error('boom ' + x);\n}\n\n"
          "async function workflow(input, { step }) {\n  await step('ok', () => 1);\n"
          "  return await step('bad', () => helper(input));\n}\n")


class TracebacksNameTheWorkflow(TempHome):
    """A failed step's stack names the workflow and its version, with the lines of the code as
    deployed, and none of the files the sidecar wrote (its code copy, its shim)."""

    extra_config = "retry:\n  max_attempts: 1\n"

    def failed_stack(self, workflow_id, runtime, code, version=1):
        sc = self.sidecar()
        for v in range(version):  # the version the run is on shows
            sc.deploy(workflow_id, code + "\n" * v, runtime=runtime)
        st = self.drive(sc, sc.start(workflow_id, "x", drive=False)["id"])
        self.assertEqual(st["status"], "failed")
        return st["error"]["stack"]

    def check(self, runtime, code, lines):
        for mode in ("warm", "process"):
            with self.subTest(runtime=runtime, mode=mode):
                self.write_config(adapter="    mode: %s\n" % mode)
                stack = self.failed_stack("bad-" + mode, runtime, code, version=2)
                for want in lines:
                    self.assertIn(want.replace("workflow bad v2", "workflow bad-%s v2" % mode),
                                  stack)
                for unwanted in ("exec/code", "workflow-", "_shim", self.data_dir):
                    self.assertNotIn(unwanted, stack)
                self.sidecar().store.close()

    def test_python(self):
        self.check("python", BAD_PY, ['File "workflow bad v2", line 7, in <lambda>',
                                      "return ctx.step('bad', lambda: helper(input))",
                                      'File "workflow bad v2", line 2, in helper',
                                      "ValueError: boom x"])

    @unittest.skipUnless(tow.shutil.which("node"), "node is not on PATH")
    def test_node(self):
        self.check("node", BAD_JS, ["Error: boom x", "at helper (workflow bad v2:2:9)",
                                    "at workflow (workflow bad v2:7:"])

    def test_a_failure_of_the_shim_itself_keeps_its_frames(self):
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "python_shim", os.path.join(ROOT, "runtimes", "python_shim.py"))
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
        try:
            shim.duration_ms("soon", "sleep", 1000)
        except TypeError as exc:  # its traceback from the shim's frame on: nothing else
            stack = shim.serialize_error(exc.with_traceback(exc.__traceback__.tb_next))["stack"]
        self.assertIn("python_shim.py", stack)
        self.assertIn("in duration_ms", stack)


@unittest.skipUnless(have_miniflare(), "miniflare is not installed: `make test` installs it from "
                                       "npm (or `make cf-tools`)")
class CloudflareTracebacksNameTheWorkflow(cloudflare_tests.CloudflareCase):
    """The same in the real Worker (miniflare): the workflow's frames by its name and lines."""

    extra_config = "retry:\n  max_attempts: 1\n"

    def test_the_stack_names_the_workflow_and_its_lines(self):
        sc = self.sidecar()
        sc.deploy("bad", BAD_JS, adapter="cloudflare")
        sc.deploy("bad", BAD_JS + "\n", adapter="cloudflare")
        st = self.drive(sc, sc.start("bad", "x", drive=False)["id"])
        stack = st["error"]["stack"]
        for want in ("Error: boom x", "at helper (workflow bad v2:2:9)", "workflow bad v2:7:34",
                     "at workflow (workflow bad v2:7:16)"):
            self.assertIn(want, stack)
        self.assertNotIn("worker.mjs", stack)


class MakeTestSetsUpWhatItCan(TempHome):
    """`make test` installs miniflare without root (outside the checkout), says so plainly when
    npm cannot, and the run ends with a line naming what was skipped and how to enable it."""

    def fake_npm(self, script):
        """A fake `npm` first on PATH (the rest of PATH as it is, for bash, node and coreutils)."""
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        with open(os.path.join(bin_dir, "npm"), "w") as f:
            f.write("#!/bin/sh\n" + script)
        os.chmod(os.path.join(bin_dir, "npm"), 0o755)
        return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"])

    def setup_miniflare(self, env):
        """The script as a fresh clone has it: in a checkout of its own, with no .ci/node_modules
        (`make cf-tools`, as CI runs it, puts one in this checkout's)."""
        import subprocess
        script = os.path.join(self.tmp, "checkout", ".ci", "miniflare.sh")
        if not os.path.exists(script):
            os.makedirs(os.path.dirname(script))
            shutil.copy(os.path.join(ROOT, ".ci", "miniflare.sh"), script)
        cache = os.path.join(self.tmp, "cache", "miniflare-9.9.9")
        proc = subprocess.run(["bash", script, "9.9.9", cache],
                              capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return cache, proc.stdout.strip(), proc.stderr

    def setUp(self):
        super().setUp()
        if not tow.shutil.which("node"):
            self.skipTest("node is not on PATH")

    def test_npm_installs_it_into_the_cache_once(self):
        env = self.fake_npm('echo "$@" >> "%s/npm.calls"\nwhile [ "$1" != --prefix ]; do shift; '
                            'done\nmkdir -p "$2/node_modules/miniflare"\n' % self.tmp)
        cache, found, err = self.setup_miniflare(env)
        self.assertEqual(found, os.path.join(cache, "node_modules"))
        self.assertIn("installing miniflare 9.9.9 from npm into %s" % cache, err)
        self.assertEqual(self.setup_miniflare(env)[1], found)  # again: nothing to install
        with open(os.path.join(self.tmp, "npm.calls")) as f:
            calls = f.read().splitlines()
        self.assertEqual(len(calls), 1)
        self.assertIn("install --prefix", calls[0])
        self.assertIn("miniflare@9.9.9", calls[0])
        self.assertFalse([n for n in os.listdir(os.path.dirname(cache)) if ".tmp-" in n])

    def test_unreachable_npm_is_one_clear_line_and_no_miniflare(self):
        env = self.fake_npm('echo "npm ERR! code ENOTFOUND" >&2\necho "npm ERR! network request '
                            'to https://registry.npmjs.org/miniflare failed" >&2\nexit 1\n')
        cache, found, err = self.setup_miniflare(env)
        self.assertEqual(found, "")
        self.assertIn("npm could not install miniflare (unreachable? see below); the cloudflare "
                      "tests will be skipped", err)
        self.assertIn("ENOTFOUND", err)
        self.assertFalse(os.path.exists(cache))

    def test_make_test_installs_outside_the_checkout(self):
        import subprocess
        if not tow.shutil.which("make"):
            self.skipTest("make is not on PATH")
        out = subprocess.run(["make", "-n", "-C", ROOT, "test"], capture_output=True, text=True,
                             env=dict(os.environ, HOME=self.home, XDG_CACHE_HOME="")).stdout
        self.assertIn(".ci/miniflare.sh", out)
        self.assertIn(os.path.join(self.home, ".cache", "ty-openworkflow", "miniflare-"), out)

    def test_the_last_line_names_what_was_skipped_and_how_to_enable_it(self):
        from tests.__main__ import skipped_line
        skips = [(None, "miniflare is not installed: `make test` installs it from npm")] * 3 + [
            (None, "no docker engine answers (start one with `make docker-up`, which needs "
                   "root)")] * 2 + [(None, "promtool is not installed (Debian's prometheus "
                                           "package)"), (None, "something else entirely")]
        self.assertEqual(skipped_line(skips),
                         "3 need miniflare (`make cf-tools`), 2 need a Docker engine "
                         "(`sudo make docker-up`), 1 needs promtool "
                         "(`sudo apt-get install prometheus`), 1 does not apply here (see their "
                         "reasons above)")


class ReadmeDetails(TempHome):
    """Item 12: the README counts the launcher `make install` writes as it is."""

    def test_the_launcher_has_as_many_lines_as_the_readme_says(self):
        import subprocess
        if not tow.shutil.which("make"):
            self.skipTest("make is not on PATH")
        prefix = os.path.join(self.tmp, "prefix")
        os.makedirs(os.path.join(prefix, "bin"))
        plan = subprocess.run(["make", "-n", "-C", ROOT, "install", "PREFIX=" + prefix],
                              capture_output=True, text=True, check=True).stdout
        [printf] = [cmd for cmd in plan.replace("\\\n", " ").splitlines()
                    if cmd.startswith("printf ")]
        subprocess.run(["sh", "-c", printf], check=True)  # just the launcher, no build
        with open(os.path.join(prefix, "bin", "ty-openworkflow")) as f:
            lines = f.read().splitlines()
        words = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = " ".join(f.read().split())
        self.assertIn("a %s-line launcher" % words[len(lines)], readme)
        with open(os.path.join(ROOT, "Makefile")) as f:
            self.assertIn("a %s-line" % words[len(lines)], f.read())


class ScheduleOptions(TempHome):
    """`schedule`'s actions take only their own options; each has its own --help."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("my-workflow", ONE, runtime="python")
        self.sc.schedule_add("my-workflow", "*/5 * * * *")

    def test_options_an_action_does_not_take_are_refused_and_nothing_changes(self):
        for argv, wrong in ((["schedule", "rm", "my-workflow", "--tz", "Mars/Base", "-i", "{bad"],
                             "--tz Mars/Base -i {bad"),
                            (["schedule", "list", "--cron", "bogus"], "--cron bogus"),
                            (["schedule", "pause", "my-workflow", "--catch-up", "all"],
                             "--catch-up all"),
                            (["schedule", "resume", "my-workflow", "--name", "x"], "--name x")):
            with self.subTest(argv=argv):
                action = argv[1]
                err = self.assert_refused(argv, 2, "unrecognized arguments: " + wrong)
                self.assertIn("see `ty-openworkflow schedule %s --help`" % action, err)
        self.assertEqual([s["name"] for s in self.sc.schedules()], ["my-workflow"])

    def test_each_action_has_its_own_help(self):
        helps = {}
        for argv in (["schedule", "--help"], ["schedule", "add", "--help"],
                     ["schedule", "rm", "--help"], ["schedule", "list", "--help"]):
            code, out, err = self.cli(*argv)
            self.assertEqual(code, 0, err)
            helps[" ".join(argv)] = out
        self.assertEqual(len(set(helps.values())), 4)
        self.assertIn("--cron", helps["schedule add --help"])
        self.assertNotIn("--cron", helps["schedule rm --help"])
        self.assertNotIn("--tz", helps["schedule list --help"])

    def test_cron_help_and_readme_name_the_same_macros_as_the_parser(self):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        help_text = " ".join(self.cli("schedule", "add", "--help")[1].split())
        for name in tow.CRON_MACRO_NAMES:
            with self.subTest(name=name):
                tow.Cron(name)  # the parser takes it
                self.assertIn("`%s`" % name, readme)
                self.assertIn(name, help_text)
        self.assertEqual(set(tow.CRON_MACRO_NAMES), set(tow._CRON_MACROS))

    def test_the_readme_forms_still_work(self):
        for argv in (["schedule", "add", "my-workflow", "--cron", "@yearly", "--name", "y",
                      "-i", '{"n": 1}', "--tz", "Europe/Paris", "--catch-up", "none", "--json"],
                     ["schedule", "list"], ["schedule", "list", "--json"],
                     ["schedule", "pause", "y"], ["schedule", "resume", "y", "--json"],
                     ["schedule", "rm", "y"]):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual((code, err), (0, ""))
        self.assert_refused(["schedule", "add", "my-workflow"], 2, "needs --cron")
        self.assert_refused(["schedule", "rm"], 2, "required: NAME")


class UsageErrors(TempHome):
    """A usage error names the subcommand's own --help; an unknown command lists the public
    commands only."""

    def test_a_misspelt_option_points_to_the_subcommands_help(self):
        for argv, where in ((["start", "hello", "--inptu", "{}"], "start"),
                            (["start"], "start"),
                            (["list", "runs", "--bogus"], "list"),
                            (["plugin", "install", "--nope"], "plugin install")):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertTrue(err.startswith("ty-openworkflow %s: " % where), err)
                self.assertIn("see `ty-openworkflow %s --help`" % where, err)

    def test_an_unknown_command_lists_only_the_public_ones(self):
        code, out, err = self.cli("bogus")
        self.assertEqual(code, 2)
        self.assertIn("unknown command 'bogus'", err)
        self.assertIn("schedule", err)
        for internal in ("runner", "dist"):
            self.assertNotIn(internal, err)
        self.assertIn("did you mean status?", self.cli("statsu")[2])


class SmallInconsistencies(TempHome):
    """Item 8's smaller things: an unknown workflow said as such, plurals, one URL, one /healthz
    shape, the input's default in --help."""

    def test_list_runs_of_an_unknown_workflow_says_so(self):
        self.sidecar().deploy("hello", ONE, runtime="python")
        self.assert_refused(["list", "runs", "-w", "nosuch"], 1, "no workflow 'nosuch'")
        self.assertEqual(self.cli("list", "runs", "-w", "hello")[1], "no runs\n")

    def test_counts_are_pluralized(self):
        for n, noun, plural, want in ((0, "signal", None, "0 signals"),
                                      (1, "signal", None, "1 signal"),
                                      (2, "signal", None, "2 signals"),
                                      (1, "log entry", "log entries", "1 log entry"),
                                      (3, "log entry", "log entries", "3 log entries")):
            with self.subTest(n=n, noun=noun):
                self.assertEqual(tow._count(n, noun, plural), want)

    def test_prune_says_one_of_each_in_the_singular(self):
        sc = self.sidecar(clock=False)
        sc.deploy("hello", ONE, runtime="python")
        run_id = sc.start("hello", {"n": 1}, drive=False)["id"]
        sc.signal(run_id, "never-taken", {"x": 1})
        self.drive(sc, run_id)
        import time
        time.sleep(0.01)  # it ended before now - 0s
        code, out, err = self.cli("prune", "--older-than", "0s", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"^would remove 1 run \(1 step, \d+ events, 0 log entries, "
                              r"0 task updates, 1 signal\)\n$")

    def test_start_help_says_the_input_defaults_to_null(self):
        code, out, err = self.cli("start", "--help")
        self.assertIn("(default: null)", " ".join(out.split()))

    def test_the_webhook_and_the_dashboard_answer_healthz_alike(self):
        import urllib.request
        sc = self.sidecar()
        hook = sc.webhook(host="127.0.0.1", port=0).start()
        board = sc.dashboard(host="127.0.0.1", port=0).start()
        try:
            answers = []
            for port in (hook.port, board.port):
                with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=10) as r:
                    answers.append((r.status, json.loads(r.read())))
        finally:
            hook.stop()
            board.stop()
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0], (200, {"ok": True, "store": "ok",
                                            "version": tow.__version__}))

    def test_dashboard_says_its_address_once(self):
        import signal
        import subprocess
        import sys
        from tests.util import MODULE
        proc = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "dashboard",
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            first = proc.stdout.readline()
            self.assertRegex(first, r"^dashboard on http://localhost:\d+/ \(token in ")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
        self.assertEqual((first + out + err).count("http://"), 1, first + out + err)


if __name__ == "__main__":
    unittest.main()
