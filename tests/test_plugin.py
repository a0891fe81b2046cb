"""The TaskYou plugin: `plugin install`, its files, its hooks and actions, and the event feed.

TaskYou's side is the fake `ty` (tests/fake_ty.py), which follows TaskYou's own plugin loader,
daemon, hooks, actions, services and HTTP API (its docstring cites the files); the plugin's
scripts are run as TaskYou runs them (no arguments, cwd the plugin dir, TASK_* variables).
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

from tests import fake_ty
from tests.util import MODULE, ROOT, TempHome, tow, wait_for

APPROVAL = """
def workflow(input, ctx):
    r = ctx.wait_for_task("Approve the deploy", body="version 2")
    return {"approved": r["approved"], "task": r["task"]}
"""
FAILS = """
def workflow(input, ctx):
    ctx.step("boom", lambda: 1 / 0, max_attempts=1)
"""
WAITS = """
def workflow(input, ctx):
    return ctx.wait_for_signal("go")
"""
ECHO = """
def workflow(input, ctx):
    return ctx.step("echo", lambda: input)
"""


class PluginCase(TempHome):
    """A fake `ty` first on PATH, TaskYou's plugins dir in the test's tree."""

    extra_config = "poll_interval: 10m\n"

    def setUp(self):
        super().setUp()
        self.bin_dir = os.path.join(self.tmp, "bin")
        self.state = os.path.join(self.tmp, "ty-state.json")
        fake_ty.install(self.bin_dir, self.state)
        self.plugins = os.path.join(self.tmp, "plugins")
        self._saved = {k: os.environ.get(k) for k in ("PATH", "TY_PLUGINS_DIR", "TY_API_URL")}
        os.environ["PATH"] = self.bin_dir + os.pathsep + os.environ.get("PATH", os.defpath)
        os.environ["TY_PLUGINS_DIR"] = self.plugins
        os.environ.pop("TY_API_URL", None)
        self.plugin_dir = os.path.join(self.plugins, "openworkflow")

    def tearDown(self):
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        super().tearDown()

    def install(self, *extra):
        code, out, err = self.cli("plugin", "install", *extra)
        self.assertEqual(code, 0, err)
        return out

    def script(self, rel, task_id=None, event=None, **env):
        """Run a plugin script as TaskYou does: no arguments, cwd the plugin dir."""
        full = dict(os.environ, TASK_PLUGIN_NAME="openworkflow", TASK_PLUGIN_DIR=self.plugin_dir)
        if task_id is not None:
            full.update(TASK_ID=str(task_id), TASK_TITLE="t", TASK_STATUS="processing",
                        TASK_PROJECT="personal", TASK_TYPE="code", WORKTREE_PATH="")
        if event is not None:
            full.update(TASK_EVENT=event, TASK_MESSAGE="")
        full.update(env)
        return subprocess.run([os.path.join(self.plugin_dir, rel)], cwd=self.plugin_dir,
                              env=full, capture_output=True, text=True, timeout=60)

    def ty(self, *argv):
        out = subprocess.run(["ty"] + list(argv), capture_output=True, text=True, check=True)
        return out.stdout

    def new_task(self, title="A task"):
        return json.loads(self.ty("create", "--json", "--", title))["id"]

    def waiting_on_task(self, sc):
        """A run of APPROVAL waiting on the task the bridge created for it: (run id, task id)."""
        sc.deploy("approve", APPROVAL, runtime="python")
        run_id = sc.start("approve", {}, drive=False)["id"]
        sc.tick()
        sc.bridge.deliver_due()
        waits = sc.store.task_waits()
        self.assertEqual(len(waits), 1, waits)
        return run_id, waits[0][2]


class Install(PluginCase):

    def test_install_writes_the_plugin_and_again_updates_it_in_place(self):
        out = self.install()
        self.assertIn(self.plugin_dir, out)
        self.assertIn("ty daemon restart", out)
        self.assertIn("ty plugins remove openworkflow", out)
        with open(os.path.join(self.plugin_dir, "plugin.yaml")) as f:
            manifest = f.read()
        self.assertIn("\nname: openworkflow\n", manifest)
        for event in ("task.done", "task.blocked", "task.failed"):
            self.assertIn("  %s: hooks/task-event\n" % event, manifest)
        for action in ("runs", "cancel", "retry"):
            self.assertIn('  - id: "%s"\n' % action, manifest)
            mode = os.stat(os.path.join(self.plugin_dir, "actions", action)).st_mode
            self.assertTrue(mode & stat.S_IXUSR, action)
        self.assertIn('command: "exec ./ty-openworkflow serve --shutdown-grace 2s"', manifest)
        with open(os.path.join(self.plugin_dir, "ty-openworkflow")) as f:
            launcher = f.read()
        self.assertIn(sys.executable, launcher)
        self.assertIn(os.path.abspath(MODULE), launcher)
        self.assertIn("--config " + self.config_path, launcher)  # the store this install uses
        before = self.read_all()
        self.assertEqual(self.install(), out)
        self.assertEqual(self.read_all(), before)

    def test_the_plugins_dir_is_TY_PLUGINS_DIR_else_the_default_and_dir_overrides_both(self):
        other = os.path.join(self.tmp, "elsewhere")
        self.install("--dir", other)
        self.assertTrue(os.path.isfile(os.path.join(other, "openworkflow", "plugin.yaml")))
        self.install()
        self.assertTrue(os.path.isfile(os.path.join(self.plugin_dir, "plugin.yaml")))
        del os.environ["TY_PLUGINS_DIR"]
        os.environ["PATH"] = os.defpath  # no `ty` to ask: XDG_CONFIG_HOME, else ~/.config
        self.install()
        self.assertTrue(os.path.isfile(os.path.join(self.home, ".config", "task", "plugins",
                                                    "openworkflow", "plugin.yaml")))

    def test_another_plugin_in_the_way_is_refused_in_one_line_and_left_alone(self):
        os.makedirs(self.plugin_dir)
        with open(os.path.join(self.plugin_dir, "plugin.yaml"), "w") as f:
            f.write("name: someone-else\nhooks:\n  task.done: x.sh\n")
        code, out, err = self.cli("plugin", "install")
        self.assertEqual(code, 1, (out, err))
        self.assertIn("holds another plugin", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(os.listdir(self.plugin_dir), ["plugin.yaml"])
        os.remove(os.path.join(self.plugin_dir, "plugin.yaml"))
        os.makedirs(os.path.join(self.plugin_dir, ".git"))
        code, out, err = self.cli("plugin", "install")
        self.assertNotEqual(code, 0)
        self.assertIn("git checkout", err)

    def test_the_plugin_a_clone_carries_is_what_the_module_writes(self):
        want = tow.plugin_files(tow.CLONE_LAUNCHER)
        base = os.path.join(ROOT, "runtimes", "openworkflow")
        got = {}
        for dirpath, _, names in os.walk(base):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    got[os.path.relpath(path, base)] = f.read()
                if not name.endswith(".yaml"):
                    self.assertTrue(os.stat(path).st_mode & stat.S_IXUSR, path)
        self.assertEqual(got, want, "runtimes/openworkflow is stale: run `make plugin-files`")

    def test_deploy_keeps_the_start_actions_in_step_while_the_plugin_is_installed(self):
        sc = self.sidecar()
        sc.deploy("first", ECHO, runtime="python", name="The first one")
        self.install()
        sc.deploy("second", ECHO, runtime="python")
        with open(os.path.join(self.plugin_dir, "plugin.yaml")) as f:
            manifest = f.read()
        self.assertIn('  - id: "start-first"\n    label: "The first one"', manifest)
        self.assertIn('  - id: "start-second"\n    label: "second"', manifest)
        self.assertTrue(os.access(os.path.join(self.plugin_dir, "actions", "start-second"),
                                  os.X_OK))
        shutil.rmtree(self.plugin_dir)  # `ty plugins remove openworkflow`
        sc.deploy("third", ECHO, runtime="python")
        self.assertFalse(os.path.exists(self.plugin_dir))
        self.assertEqual(sc.plugin._installed(), [])


    def test_the_single_file_build_alone_installs_a_plugin_that_works(self):
        alone = os.path.join(self.tmp, "alone")
        os.makedirs(alone)
        build = os.path.join(alone, "ty_openworkflow.py")
        code, _, err = self.cli("dist", build)
        self.assertEqual(code, 0, err)
        out = subprocess.run([sys.executable, build, "--config", self.config_path, "plugin",
                              "install"], capture_output=True, text=True, cwd=alone)
        self.assertEqual(out.returncode, 0, out.stderr)
        with open(os.path.join(self.plugin_dir, "ty-openworkflow")) as f:
            self.assertIn(build, f.read())
        self.assertNotIn(ROOT + "/", "".join(self.read_all().values()))
        task_id = self.new_task()
        ran = self.script("actions/runs", task_id=task_id)
        self.assertEqual((ran.returncode, ran.stdout), (0, "task #%d has no workflow runs\n"
                                                           % task_id), ran.stderr)

    def read_all(self):
        out = {}
        for dirpath, _, names in os.walk(self.plugin_dir):
            for name in names:
                with open(os.path.join(dirpath, name)) as f:
                    out[os.path.relpath(os.path.join(dirpath, name), self.plugin_dir)] = f.read()
        return out

    def test_init_mentions_the_plugin_when_ty_is_found(self):
        code, out, _ = self.cli("init", "--force")
        self.assertEqual(code, 0)
        self.assertIn("ty-openworkflow plugin install", out)
        os.environ["PATH"] = os.defpath
        code, out, _ = self.cli("init", "--force")
        self.assertNotIn("plugin install", out)


class Actions(PluginCase):

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar(clock=False)
        self.sc.deploy("echo", ECHO, runtime="python")
        self.sc.deploy("fails", FAILS, runtime="python")
        self.install()

    def test_without_a_task_each_action_says_what_it_needs_in_one_line(self):
        for action in ("runs", "cancel", "retry", "start-echo"):
            out = self.script("actions/" + action)
            self.assertEqual(out.returncode, 2, out)
            self.assertEqual(out.stdout, "")
            self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
            self.assertIn("needs a task", out.stderr)

    def test_start_links_the_run_to_the_task_with_the_task_as_input_and_creates_no_task(self):
        task_id = self.new_task("Deploy the site")
        out = self.script("actions/start-echo", task_id=task_id)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("started echo", out.stdout.splitlines()[0])
        run_id = out.stdout.split("(run ")[1].split(")")[0]
        st = wait_for(lambda: (lambda s: s if s["status"] == "completed" else None)(
            self.sc.status(run_id)), timeout=30, what="the run to complete")
        self.assertEqual(st["output"]["task"]["id"], task_id)
        self.assertEqual(st["output"]["task"]["title"], "Deploy the site")
        self.assertEqual(st["task"]["id"], task_id)
        self.assertEqual(len(fake_ty.tasks(self.state)), 1, "a task was created")
        runs = self.script("actions/runs", task_id=task_id)
        self.assertEqual(runs.returncode, 0)
        lines = runs.stdout.splitlines()
        self.assertEqual(lines[0], "task #%d: 1 workflow run (1 completed)" % task_id)
        self.assertIn(run_id, lines[1])

    def test_retry_and_cancel_act_on_this_tasks_runs_only(self):
        self.sc.deploy("waits", WAITS, runtime="python")
        task_id, other = self.new_task(), self.new_task("other")
        mine = self.sc.start("fails", {}, drive=False, task_id=task_id)["id"]
        theirs = self.sc.start("fails", {}, drive=False, task_id=other)["id"]
        out = self.script("actions/retry", task_id=task_id)
        self.assertEqual(out.returncode, 1)
        self.assertIn("no failed workflow run", out.stderr)
        self.sc.tick()
        self.assertEqual(self.sc.status(mine)["status"], "failed")
        out = self.script("actions/retry", task_id=task_id)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("retrying run %s" % mine, out.stdout)
        self.assertEqual(self.sc.status(mine)["retries"], 1)
        wait_for(lambda: self.sc.status(mine)["status"] == "failed", timeout=30,
                 what="the retried run to fail again")
        self.assertEqual(self.sc.status(theirs)["retries"], 0)
        waiting = [self.sc.start("waits", {}, drive=False, task_id=task_id)["id"]
                   for _ in range(2)]
        held = self.sc.start("waits", {}, drive=False, task_id=other)["id"]
        out = self.script("actions/cancel", task_id=task_id)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("canceled 2 workflow runs of task #%d" % task_id, out.stdout)
        for run_id in waiting:
            self.assertEqual(self.sc.status(run_id)["status"], "canceled")
        self.assertEqual(self.sc.status(held)["status"], "pending")
        out = self.script("actions/cancel", task_id=task_id)
        self.assertIn("no unfinished workflow runs", out.stdout)


class Hooks(PluginCase):

    def test_a_hook_for_a_task_no_run_waits_on_does_nothing_quietly(self):
        self.install()
        before = len(fake_ty.calls(self.state))
        for event in ("task.done", "task.blocked", "task.failed"):
            out = self.script("hooks/task-event", task_id=4242, event=event)
            self.assertEqual((out.returncode, out.stdout, out.stderr), (0, "", ""))
        out = self.script("hooks/task-event", TASK_ID="not-a-number", TASK_EVENT="task.done")
        self.assertEqual((out.returncode, out.stdout, out.stderr), (0, "", ""))
        self.assertEqual(len(fake_ty.calls(self.state)), before, "`ty` was asked about it")

    def test_done_and_blocked_resolve_the_wait_at_once_with_what_polling_would_give(self):
        self.install()
        sc = self.sidecar(clock=False)
        for status, approved in (("done", True), ("blocked", False)):
            run_id, task_id = self.waiting_on_task(sc)
            self.ty("status", str(task_id), status)
            out = self.script("hooks/task-event", task_id=task_id,
                              event="task.done" if approved else "task.blocked")
            self.assertEqual(out.returncode, 0, out.stderr)
            st = sc.status(run_id)
            wait = [s for s in st["steps"] if s["kind"] == "wait"][0]
            self.assertEqual(wait["status"], "completed")
            shown = json.loads(self.ty("show", str(task_id), "--json"))
            self.assertEqual(wait["output"], {"value": {"approved": approved, "task": shown}})
            sc.tick()
            self.assertEqual(sc.status(run_id)["output"], {"approved": approved, "task": shown})

    def test_a_hook_before_the_task_shows_its_change_leaves_it_to_the_next_poll(self):
        sc = self.sidecar(clock=False)
        run_id, task_id = self.waiting_on_task(sc)
        saved = tow.HOOK_PATIENCE_S
        tow.HOOK_PATIENCE_S = 0.3
        try:
            resolved = sc.plugin.hook({"TASK_ID": str(task_id), "TASK_EVENT": "task.done"})
        finally:
            tow.HOOK_PATIENCE_S = saved
        self.assertEqual(resolved, 0)
        self.assertEqual(sc.store.approvals_due(tow.now_ms(), 600000)[0][:2],
                         (run_id, sc.store.task_waits()[0][1]),
                         "the wait is not due for the next poll")


SLOW = """
import os, time
def workflow(input, ctx):
    def slow():
        end = time.time() + 30
        while not os.path.exists(input["go"]) and time.time() < end:
            time.sleep(0.05)
        return "slept"
    return ctx.step("slow", slow, max_attempts=1)
"""


class Daemon(PluginCase):
    """TaskYou's daemon (the fake's) runs the installed plugin: its service, hooks, feed."""

    lease_ttl = "2s"

    def setUp(self):
        super().setUp()
        self.daemons = []
        self.sc = self.sidecar(clock=False)

    def tearDown(self):
        for p in self.daemons:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait()
        super().tearDown()

    def daemon(self, **env):
        """`ty daemon` with the plugin installed, once its `serve` registered."""
        full = dict(os.environ, **env)
        log = open(os.path.join(self.tmp, "daemon-%d.log" % len(self.daemons)), "w")
        self.addCleanup(log.close)
        p = subprocess.Popen(["ty", "daemon"], env=full, stdout=log, stderr=log,
                             start_new_session=True)
        self.daemons.append(p)
        if env.get("FAKE_TY_API_DISABLED") != "1":
            fake_ty.api_url(self.state)
        wait_for(lambda: p.poll() is not None or self.sc.store.live_schedulers(
            tow.now_ms(), 60000), timeout=30, what="the plugin's serve to register")
        self.assertIsNone(p.poll(), "the daemon exited")
        return p

    def resolved_within(self, run_id, timeout):
        """Seconds until the run's wait on its task resolved (fails past ``timeout``)."""
        began = time.monotonic()

        def done():
            steps = self.sc.status(run_id)["steps"]
            return any(s["kind"] == "wait" and s["status"] == "completed" for s in steps)
        wait_for(done, timeout=timeout, interval=0.05, what="the wait to resolve")
        return time.monotonic() - began

    def test_a_clone_added_with_ty_plugins_add_is_exactly_one_plugin(self):
        out = subprocess.run(["ty", "plugins", "add", ROOT, "--name", "tyow"],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Installed 1 plugin(s): openworkflow.", out.stdout)
        plugins, warnings = fake_ty.load_plugins(self.plugins)
        self.assertEqual([p["name"] for p in plugins], ["openworkflow"], warnings)
        self.assertEqual(warnings, [])
        listed = self.ty("plugins", "list")
        self.assertIn("service  serve", listed)
        task_id = self.new_task()
        run = subprocess.run(["ty", "plugins", "run", "openworkflow", "runs", str(task_id)],
                             capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(run.stdout, "task #%d has no workflow runs\n" % task_id)

    def test_the_feed_resumes_a_wait_soon_after_ty_close_and_blocked_refuses(self):
        # Not UTC: the API gives times in UTC, `ty show` in local time; the run sees the latter.
        self.addCleanup(os.environ.__setitem__, "TZ", os.environ["TZ"]) if "TZ" in os.environ \
            else self.addCleanup(os.environ.pop, "TZ", None)
        os.environ["TZ"] = "Asia/Kolkata"
        self.install()
        self.daemon()
        for how, approved in (("close", True), ("blocked", False)):
            run_id, task_id = self.waiting_on_task(self.sc)
            if how == "close":
                self.ty("close", str(task_id))
            else:
                self.ty("status", str(task_id), "blocked")
            took = self.resolved_within(run_id, timeout=10)  # poll_interval is 10m
            st = self.wait_done(run_id)
            self.assertEqual(st["output"]["approved"], approved)
            self.assertEqual(st["output"]["task"],
                             json.loads(self.ty("show", str(task_id), "--json")))
            print("feed: %s resolved in %.2fs" % (how, took), file=sys.stderr)

    def wait_done(self, run_id):
        return wait_for(lambda: (lambda s: s if s["status"] in tow.TERMINAL else None)(
            self.sc.status(run_id)), timeout=30, what="run %s to finish" % run_id)

    def test_a_hook_resumes_a_wait_when_the_daemon_runs_the_task_without_an_api(self):
        self.install()
        self.daemon(FAKE_TY_API_DISABLED="1")
        for outcome, approved in (("done", True), ("needs_input", False), ("failed", False)):
            run_id, task_id = self.waiting_on_task(self.sc)
            self.ty("execute", str(task_id))
            fake_ty.finish(self.state, task_id, outcome, message="over to you")
            took = self.resolved_within(run_id, timeout=15)
            self.assertEqual(self.wait_done(run_id)["output"]["approved"], approved)
            hooks = fake_ty.wait_plugin_runs(self.state, kind="hook", count=1)
            self.assertTrue(all(h["exit"] == 0 for h in hooks), hooks)
            print("hook: %s resolved in %.2fs" % (outcome, took), file=sys.stderr)

    def test_a_dropped_feed_falls_back_to_polling(self):
        self.extra_config = "poll_interval: 2s\n"
        self.write_config()
        self.install()
        self.daemon()
        fake_ty.write_control(self.state, {"api_drop": True})
        run_id, task_id = self.waiting_on_task(self.sc)
        self.ty("close", str(task_id))
        self.resolved_within(run_id, timeout=20)
        self.assertTrue(self.wait_done(run_id)["output"]["approved"])
        fake_ty.write_control(self.state, {})

    def test_deploy_adds_its_start_action_and_ty_plugins_run_starts_it_on_the_task(self):
        self.install()
        self.sc.deploy("echo", ECHO, runtime="python", name="Echo it")
        self.assertIn("action Echo it ", self.ty("plugins", "list"))
        task_id = self.new_task("Ship it")
        out = subprocess.run(["ty", "plugins", "run", "openworkflow", "start-echo",
                              str(task_id)], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        run_id = out.stdout.split("(run ")[1].split(")")[0]
        st = self.wait_done(run_id)
        self.assertEqual(st["output"]["task"]["title"], "Ship it")
        out = subprocess.run(["ty", "plugins", "run", "openworkflow", "start-echo"],
                             capture_output=True, text=True)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("needs a task", out.stdout + out.stderr)

    def test_sigterm_from_the_daemon_stops_serve_cleanly_and_gives_the_pass_back(self):
        self.install()
        self.sc.deploy("slow", SLOW, runtime="python")
        daemon = self.daemon(FAKE_TY_API_DISABLED="1")
        go = os.path.join(self.tmp, "go")
        run_id = self.sc.start("slow", {"go": go}, drive=False)["id"]
        wait_for(lambda: self.sc.status(run_id)["status"] == "running", timeout=20,
                 what="the pass to start")
        daemon.terminate()
        self.assertEqual(daemon.wait(20), 0)
        service = [r for r in fake_ty.plugin_runs(self.state, kind="service")][0]
        self.assertEqual(service["exit"], 0, service)
        self.assertFalse(service["sigkilled"], service)
        self.assertLess(service["stop_duration_s"], 5.0)
        print("serve stopped in %.2fs" % service["stop_duration_s"], file=sys.stderr)
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "pending", st)  # given back, not failed
        self.assertEqual(st["last_pass"]["reason"], "released: scheduler stopping")
        with open(go, "w"):
            pass
        self.sc.tick()  # its one attempt was not spent on the pass TaskYou stopped
        st = self.sc.status(run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", "slept"), st)

    def test_the_feed_reconnects_when_taskyou_ends_the_stream(self):
        # TaskYou's server ends a stream at its first write past 60 s (its write timeout).
        self.install()
        self.daemon(FAKE_TY_WRITE_TIMEOUT_S="1", FAKE_TY_HEARTBEAT_S="0.5")
        run_id, task_id = self.waiting_on_task(self.sc)
        time.sleep(4)  # several streams ended and were opened again
        self.ty("close", str(task_id))
        self.resolved_within(run_id, timeout=10)  # poll_interval is 10m
        self.assertTrue(self.wait_done(run_id)["output"]["approved"])


class Edges(PluginCase):
    """What a careless setup or a misbehaving TaskYou must not break."""

    def test_labels_are_one_clean_line_and_a_workflow_id_with_a_newline_is_refused(self):
        sc = self.sidecar()
        self.install()
        sc.deploy("odd", ECHO, runtime="python", name="bad\x7fname\nsecond line\u2028x" + "y" * 80)
        plugins, warnings = fake_ty.load_plugins(self.plugins)
        self.assertEqual(warnings, [])
        label = [a for a in plugins[0]["actions"] if a["id"] == "start-odd"][0]["label"]
        self.assertTrue(label.startswith("bad name second line x"), label)
        self.assertLessEqual(len(label), 60)
        with self.assertRaises(tow.InputError):
            sc.deploy("w2\n", ECHO, runtime="python")

    def test_install_refuses_beside_a_clone_added_with_ty_plugins_add(self):
        out = subprocess.run(["ty", "plugins", "add", ROOT, "--name", "tyow"],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        code, _, err = self.cli("plugin", "install")
        self.assertEqual(code, 1)
        self.assertIn("another plugin named openworkflow", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(os.path.exists(self.plugin_dir))

    def test_an_api_that_is_not_taskyous_falls_back_to_ty_show(self):
        import http.server
        import threading

        class NotTaskYou(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"<html>404 page not found</html>"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotTaskYou)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.addCleanup(srv.server_close)
        self.addCleanup(srv.shutdown)
        sc = self.sidecar()
        for url in ("http://127.0.0.1:%d" % srv.server_address[1], "http://127.0.0.1:notaport",
                    "garbage"):
            run_id, task_id = self.waiting_on_task(sc)
            self.ty("close", str(task_id))
            self.clock.advance(11 * 60000)  # past poll_interval
            os.environ["TY_API_URL"] = url
            try:
                self.assertEqual(sc.bridge.poll_approvals(), 1, url)
            finally:
                del os.environ["TY_API_URL"]
            self.assertTrue(sc.status(run_id)["steps"][0]["output"]["value"]["approved"])

    def test_a_hook_whose_ty_hangs_gives_up_within_its_budget_and_leaves_it_to_a_poll(self):
        sc = self.sidecar(clock=False)
        run_id, task_id = self.waiting_on_task(sc)
        fake_ty.write_control(self.state, {"hang": True, "hang_commands": ["show"]})
        saved = tow.HOOK_BUDGET_S
        tow.HOOK_BUDGET_S = 1.0
        began = time.monotonic()
        try:
            resolved = sc.plugin.hook({"TASK_ID": str(task_id), "TASK_EVENT": "task.done"})
        finally:
            tow.HOOK_BUDGET_S = saved
            fake_ty.write_control(self.state, {})
        self.assertEqual(resolved, 0)
        self.assertLess(time.monotonic() - began, 5.0)
        self.assertEqual([w[0] for w in sc.store.approvals_due(tow.now_ms(), 600000)], [run_id])

    def test_the_feed_stops_at_once_even_when_the_api_never_answers(self):
        import socket
        mute = socket.socket()
        mute.bind(("127.0.0.1", 0))
        mute.listen(5)
        self.addCleanup(mute.close)
        sc = self.sidecar(clock=False)
        feed = tow.TaskFeed(sc.bridge, tow.TaskYouApi("http://127.0.0.1:%d"
                                                      % mute.getsockname()[1]), lambda: None)
        feed.start()
        time.sleep(0.5)  # connected, waiting for an answer that never comes
        began = time.monotonic()
        feed.stop()
        self.assertLess(time.monotonic() - began, 1.0)
        feed.thread.join(5)
        self.assertFalse(feed.thread.is_alive())
