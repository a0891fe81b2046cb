"""Tests of the fake ``ty``'s plugin system, daemon and HTTP API (tests/fake_ty.py).

Each behaviour is checked against what TaskYou's code does (internal/hooks,
cmd/task/plugins.go, runDaemon in cmd/task/main.go, internal/executor and
internal/web); the fake's docstring names the file per behaviour.  Everything
runs through the installed wrapper, with PATH = the fake's bin dir + /usr/bin:/bin
(plugins need sh and git).
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request

from tests import fake_ty

TIMEOUT_S = 15
SYSTEM_PATH = "/usr/bin:/bin"


def write_plugin(root, rel_dir, manifest, scripts=None, mode=0o755):
    """A plugin dir under root with plugin.yaml (None: no manifest) and scripts."""
    directory = os.path.join(root, rel_dir)
    os.makedirs(directory, exist_ok=True)
    if manifest is not None:
        with open(os.path.join(directory, "plugin.yaml"), "w") as f:
            f.write(manifest)
    for name, body in (scripts or {}).items():
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(body)
        os.chmod(path, mode)
    return directory


def hook_manifest(name, events, script="hook.sh"):
    return "name: %s\nhooks:\n%s" % (name, "".join("  %s: %s\n" % (e, script) for e in events))


ECHO = "#!/bin/sh\necho \"$TASK_EVENT $TASK_ID\"\n"


class PluginCase(unittest.TestCase):
    """Fresh bin dir, state and plugins dir; self.ty(...) runs the fake."""

    def setUp(self):
        self.tmp = os.path.realpath(tempfile.mkdtemp(prefix="fake-ty-plugins-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.bin = os.path.join(self.tmp, "bin")
        self.state = os.path.join(self.tmp, "state.json")
        fake_ty.install(self.bin, self.state)
        self.plugins = os.path.join(self.tmp, "plugins")
        os.makedirs(self.plugins)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TASK_", "TY_", "FAKE_TY_", "WORKTREE_"))}
        env.update(PATH=self.bin + ":" + SYSTEM_PATH, TY_PLUGINS_DIR=self.plugins,
                   HOME=self.tmp, XDG_CONFIG_HOME=os.path.join(self.tmp, "config"))
        self.env = env

    def ty(self, *args, env=None, timeout=TIMEOUT_S):
        return subprocess.run(["ty", *args], env=env or self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.tmp)

    def ok(self, *args, env=None):
        r = self.ty(*args, env=env)
        self.assertEqual(r.returncode, 0, "ty %s: %s" % (" ".join(args), r.stderr))
        return r

    def err(self, *args, message):
        """Exit 1 with the RunE message printed twice (cobra, then TaskYou's main)."""
        r = self.ty(*args)
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("Error: %s\nError: %s\n" % (message, message), r.stderr)
        return r

    def create(self, title="T"):
        return json.loads(self.ok("create", title, "--json").stdout)["id"]


class Discovery(PluginCase):

    def test_plugins_dir_resolution(self):
        self.assertEqual(self.ok("plugins", "dir").stdout, self.plugins + "\n")
        env = dict(self.env)
        del env["TY_PLUGINS_DIR"]
        self.assertEqual(self.ok("plugins", "dir", env=env).stdout,
                         os.path.join(self.tmp, "config", "task", "plugins") + "\n")
        del env["XDG_CONFIG_HOME"]                      # os.UserConfigDir: $HOME/.config
        self.assertEqual(self.ok("plugins", "dir", env=env).stdout,
                         os.path.join(self.tmp, ".config", "task", "plugins") + "\n")
        env["XDG_CONFIG_HOME"] = "relative/dir"         # UserConfigDir errors: no dir
        self.assertEqual(self.ok("plugins", "dir", env=env).stdout, "\n")

    def test_depth_nesting_hidden_dirs_and_symlinks(self):
        for rel in ("a", "c1/b", "c1/c2/c3/c4/d", "c1/c2/c3/c4/c5/too-deep", ".git/hidden",
                    "a/nested-in-plugin"):
            name = os.path.basename(rel)
            write_plugin(self.plugins, rel, hook_manifest(name, ["task.done"]),
                         {"hook.sh": ECHO})
        write_plugin(self.plugins, "empty-collection", None, {"x.sh": ECHO})
        with open(os.path.join(self.plugins, "loose.yaml"), "w") as f:
            f.write("name: loose\n")
        os.symlink(os.path.join(self.plugins, "a"), os.path.join(self.plugins, "link"))
        plugins, warnings = fake_ty.load_plugins(self.plugins)
        self.assertEqual(warnings, [])
        # depth 0..4 listings find plugins up to five levels down; .git is searched;
        # a plugin's own subdirs and a symlinked dir are not.
        self.assertEqual([p["name"] for p in plugins], ["a", "b", "d", "hidden"])
        self.assertEqual(plugins[2]["dir"], os.path.join(self.plugins, "c1/c2/c3/c4/d"))
        r = self.ok("plugins", "list")
        self.assertEqual(r.stderr, "")
        self.assertIn("  d (\u2014)\n    hook   task.done          \u2192 hook.sh\n",
                      r.stdout)

    def test_list_format_and_no_plugins(self):
        r = self.ok("plugins")
        self.assertEqual(r.stdout, "No plugins installed in %s\nAdd one by creating "
                         "<name>/plugin.yaml there. See docs/plugins.md.\n" % self.plugins)
        write_plugin(self.plugins, "p", "name: zed\nversion: 1.2\ndescription: Does it.\n"
                     "hooks:\n  task.done: d.sh\n  task.blocked: b.sh\nactions:\n"
                     "  - id: sync\n    label: Sync it\n    command: s.sh\n  - id: raw\n"
                     "    command: s.sh\nservices:\n  - name: srv\n    command: ./run x\n",
                     {"d.sh": ECHO, "b.sh": ECHO, "s.sh": ECHO, "workflows/review.yaml": "",
                      "routines/poll/prompt.md": ""})
        write_plugin(self.plugins, "q", "name: alpha\nactions:\n  - {id: x, command: s.sh}\n",
                     {"s.sh": ECHO})
        r = self.ok("plugins", "list")
        self.assertIn("warning: plugin q: invalid plugin.yaml: fake ty cannot parse line 3: "
                      "a flow mapping", r.stderr)
        self.assertEqual(r.stdout, (
            "Plugins in %s:\n\n"
            "  zed (1.2)\n"
            "    Does it.\n"
            "    hook   task.blocked       \u2192 b.sh\n"
            "    hook   task.done          \u2192 d.sh\n"
            "    action Sync it            \u2192 s.sh  (ty plugins run zed sync)\n"
            "    action raw                \u2192 s.sh  (ty plugins run zed raw)\n"
            "    workflow review           (ty pipeline -d review \"<goal>\")\n"
            "    service  srv              \u2192 ./run x  (supervised while the daemon runs)\n"
            "    routine  poll             (ty run poll)\n\n") % self.plugins)
        self.assertEqual(self.ok("plugins", "bogus-word").stdout, r.stdout)  # non-root: list

    def test_validation_warnings_skip_and_drop(self):
        write_plugin(self.plugins, "noname", "hooks:\n  task.done: h.sh\n", {"h.sh": ECHO})
        write_plugin(self.plugins, "empty", "name: empty\nversion: 1\n")
        write_plugin(self.plugins, "allgone", "name: allgone\nhooks:\n  task.done: nope.sh\n")
        write_plugin(self.plugins, "partial", "name: partial\nhooks:\n  task.done: h.sh\n"
                     "  task.failed: gone.sh\nactions:\n  - id: a\n  - id: b\n    command: x\n"
                     "services:\n  - name: s\n", {"h.sh": ECHO})
        write_plugin(self.plugins, "dupe", "name: dupe\nhooks:\n  task.done: h.sh\n"
                     "  task.done: h.sh\n", {"h.sh": ECHO})
        write_plugin(self.plugins, "typed", "name: typed\nactions: run.sh\n")
        write_plugin(self.plugins, "broken", "name: x\n  bad: indent\n")
        write_plugin(self.plugins, "anchor", "name: &n anchor\nhooks:\n  task.done: h.sh\n",
                     {"h.sh": ECHO})
        write_plugin(self.plugins, "fine", "# comment\nname: 'fine'   # trailing\nservices:\n"
                     "  - name: s\n    command: \"sleep 1\"\n    env: [\"A=b\", 'C=d']\n")
        plugins, warnings = fake_ty.load_plugins(self.plugins)
        self.assertEqual([p["name"] for p in plugins], ["fine", "partial"])
        self.assertEqual(plugins[0]["services"][0]["env"], ["A=b", "C=d"])
        self.assertEqual(plugins[1]["hooks"], {"task.done": "h.sh"})
        self.assertEqual(warnings, [
            "plugin \"allgone\": no usable hook, action, workflow, service, or routine found; "
            "skipping",
            "plugin anchor: invalid plugin.yaml: fake ty cannot parse line 1: an anchor (the "
            "fake rejects YAML it does not model instead of guessing)",
            "plugin broken: invalid plugin.yaml: yaml: line 2: mapping values are not allowed "
            "in this context",
            "plugin dupe: invalid plugin.yaml: yaml: unmarshal errors:\n  line 4: mapping key "
            "\"task.done\" already defined at line 3",
            "plugin \"empty\": manifest declares no hooks, actions, workflows, services, or "
            "routines; skipping",
            "plugin noname: manifest is missing a name",
            "plugin \"partial\": ignored entries with missing/invalid scripts: "
            "[action:<malformed> action:b hook:task.failed service:<malformed>]",
            "plugin typed: invalid plugin.yaml: yaml: unmarshal errors:\n  line 2: cannot "
            "unmarshal !!str `run.sh` into []hooks.Action",
        ])
        r = self.ok("plugins", "list")
        self.assertEqual(r.stderr, "".join("warning: %s\n" % w for w in warnings))

    def test_yaml_subset(self):
        parse = fake_ty.parse_manifest
        p = parse('---\nname: "a\\tb\\u00e9"\nversion: 1.0\ndescription: x#y # c\nhooks:\n'
                  '  "task.done": it\'s.sh\nactions:\n- id: a\n  label: \'it\'\'s\'\n'
                  '  command: a.sh\nservices:\n  -\n    name: s\n    command: run\n'
                  '    env:\n      - K=v\n      - ~\n')
        self.assertEqual((p["name"], p["version"], p["description"]), ("a\tb\u00e9", "1.0", "x#y"))
        self.assertEqual(p["hooks"], {"task.done": "it's.sh"})
        self.assertEqual(p["actions"], [{"id": "a", "label": "it's", "command": "a.sh"}])
        self.assertEqual(p["services"][0]["env"], ["K=v", ""])
        self.assertEqual(parse("name: null\nunknown: {}\n")["name"], "")
        for text, message in [
            ("name: |\n  x\n", "a block scalar"),
            ("name: *x\n", "an alias"),
            ("name: !!str x\n", "a tag"),
            ("name: a\n  b\n", "a value continued on the next line"),
            ("name: [a, [b]]\n", "a nested flow collection"),
            ("name: \"open\n", "a quoted scalar continued"),
            ("name: x\n---\nname: y\n", "a second document"),
            ("\tname: x\n", "found character that cannot start any token"),
            ("name: \"\\q\"\n", "found unknown escape character"),
            ("name: - x\n", "block sequence entries are not allowed"),
            ("name: [a]\n", "cannot unmarshal !!seq into string"),
            ("hooks:\n  task.done:\n    x: y\n", "line 3: cannot unmarshal !!map into string"),
            ("- a\n", "cannot unmarshal !!seq into hooks.Plugin"),
            ("name: a\nname: b\n", "line 2: field name already set in type hooks.Plugin"),
        ]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as cm:
                    parse(text)
                self.assertIn(message, str(cm.exception))


class AddRemove(PluginCase):

    def git_repo(self, rel, plugins):
        """A git repo under tmp holding plugins {subdir ('' = root): manifest}."""
        repo = os.path.join(self.tmp, rel)
        for sub, manifest in plugins.items():
            write_plugin(repo, sub or ".", manifest, {"h.sh": ECHO})
        os.makedirs(repo, exist_ok=True)
        genv = dict(self.env, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "c"]):
            subprocess.run(["git", *cmd], cwd=repo, env=genv, check=True, capture_output=True)
        return repo

    def test_add_update_name_and_rollback(self):
        repo = self.git_repo("src/notify.git/", {"": hook_manifest("notify", ["task.done"],
                                                                       "h.sh")})
        r = self.ok("plugins", "add", repo)
        self.assertEqual(r.stdout, "Installed 1 plugin(s): notify. Run `ty plugins list` to "
                                   "see what they provide.\n")
        self.assertTrue(os.path.isdir(os.path.join(self.plugins, "notify", ".git")))
        self.assertEqual(self.ok("plugins", "add", repo).stdout,
                         "Updated 1 plugin(s): notify. Run `ty plugins list` to see what they "
                         "provide.\n")
        self.ok("plugins", "add", "--name", "other", "file://" + repo)
        self.assertEqual([p["name"] for p in fake_ty.load_plugins(self.plugins)[0]],
                         ["notify", "notify"])
        os.makedirs(os.path.join(self.plugins, "manual"))
        self.err("plugins", "add", repo, "--name", "manual",
                 message="%s/manual already exists and is not a git checkout; remove it or "
                         "use --name" % self.plugins)
        empty = self.git_repo("src/empty", {"": "name: nothing\n"})
        self.err("plugins", "add", empty, message="%s contains no usable plugins (need a "
                                                  "plugin.yaml with a hook, action, or "
                                                  "workflow)" % empty)
        self.assertFalse(os.path.exists(os.path.join(self.plugins, "empty")))   # rolled back
        r = self.ty("plugins", "add", os.path.join(self.tmp, "missing"))
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith("Error: clone %s: exit status 128\n"
                                            % os.path.join(self.tmp, "missing")), r.stderr)
        self.err("plugins", "add", message="accepts 1 arg(s), received 0")

    def test_collection_remove_and_aliases(self):
        repo = self.git_repo("coll", {"one": hook_manifest("one", ["task.done"], "h.sh"),
                                      "group/two": hook_manifest("two", ["task.done"], "h.sh")})
        self.assertEqual(self.ok("plugins", "add", repo).stdout,
                         "Installed 2 plugin(s): one, two. Run `ty plugins list` to see what "
                         "they provide.\n")
        r = self.ok("plugins", "rm", "two")
        self.assertEqual(r.stdout, "Removed plugin \"two\" (%s/coll/group/two).\nNote: it was "
                         "part of a shared git checkout; its sibling plugins remain, and "
                         "re-adding that source may restore it.\n" % self.plugins)
        write_plugin(self.plugins, "dirname", hook_manifest("manifest-name", ["task.done"]),
                     {"hook.sh": ECHO})
        self.assertEqual(self.ok("plugins", "uninstall", "dirname").stdout,
                         "Removed plugin \"dirname\" (%s/dirname).\n" % self.plugins)
        # A collection dir is no plugin: only plugin names and plugin dir names match.
        self.err("plugins", "remove", "coll",
                 message="no plugin named \"coll\" installed in %s; run `ty plugins list` to "
                         "see what's installed" % self.plugins)
        self.ok("plugins", "remove", "one")
        self.assertFalse(os.path.exists(os.path.join(self.plugins, "coll", "one")))
        self.assertTrue(os.path.isdir(os.path.join(self.plugins, "coll", ".git")))
        self.err("plugins", "remove", "ghost",
                 message="no plugin named \"ghost\" installed in %s; run `ty plugins list` to "
                         "see what's installed" % self.plugins)


class Actions(PluginCase):

    def setUp(self):
        super().setUp()
        self.dir = write_plugin(self.plugins, "tools", (
            "name: tools\nactions:\n  - id: env\n    command: bin/env.sh\n"
            "  - id: fail\n    command: fail.sh\n  - id: slow\n    command: slow.sh\n"
            "  - id: noexec\n    command: noexec.sh\n  - id: nested\n"
            "    command: nested.sh\n"), {
            "bin/env.sh": "#!/bin/sh\necho \"argc=$# cwd=$(pwd)\"\n"
                          "env | grep -E '^(TASK_|WORKTREE_)' | sort\nprintf no-newline",
            "fail.sh": "#!/bin/sh\necho out; echo err >&2; exit 3\n",
            "nested.sh": "#!/bin/sh\nty show \"$TASK_ID\" --json | grep '\"status\"'\n",
            "slow.sh": "#!/bin/sh\nexec sleep 30\n"})
        write_plugin(self.plugins, "tools", None, {"noexec.sh": "#!/bin/sh\n"}, mode=0o644)

    def test_env_with_and_without_task(self):
        task_id = self.create("Fix it")
        self.ok("status", str(task_id), "blocked")
        r = self.ok("plugins", "run", "tools", "env", str(task_id))
        self.assertEqual(r.stdout, (
            "argc=0 cwd=%s\nTASK_ID=1\nTASK_PLUGIN_DIR=%s\nTASK_PLUGIN_NAME=tools\n"
            "TASK_PROJECT=personal\nTASK_STATUS=blocked\nTASK_TITLE=Fix it\nTASK_TYPE=code\n"
            "WORKTREE_PATH=\nno-newline\n") % (self.dir, self.dir))
        for args in ((), ("0",), ("999",)):      # no task, id 0, unknown id: no TASK_* vars
            with self.subTest(args=args):
                r = self.ok("plugins", "run", "tools", "env", *args)
                self.assertEqual(r.stdout, "argc=0 cwd=%s\nTASK_PLUGIN_DIR=%s\n"
                                 "TASK_PLUGIN_NAME=tools\nno-newline\n" % (self.dir, self.dir))
        # An action may call ty itself: `plugins run` holds no lock meanwhile.
        self.assertEqual(self.ok("plugins", "run", "tools", "nested", "1").stdout,
                         '  "status": "blocked",\n')
        runs = fake_ty.plugin_runs(self.state, "action", action="env")
        self.assertEqual([(r["action"], r["task_id"], r["exit"]) for r in runs],
                         [("env", 1, 0), ("env", None, 0), ("env", None, 0), ("env", None, 0)])
        self.assertEqual(runs[0]["argv"], [os.path.join(self.dir, "bin/env.sh")])
        self.assertEqual(runs[0]["env"]["TASK_STATUS"], "blocked")

    def test_failures_and_errors(self):
        r = self.err("plugins", "run", "tools", "fail",
                     message="action tools/fail failed: exit status 3")
        self.assertEqual(r.stdout, "out\nerr\n")             # combined output, then the error
        self.err("plugins", "run", "tools", "noexec", message="action tools/noexec failed: "
                 "fork/exec %s/noexec.sh: permission denied" % self.dir)
        self.err("plugins", "run", "nope", "x", message="no plugin named \"nope\"")
        self.err("plugins", "run", "tools", "x", message="plugin \"tools\" has no action \"x\"")
        self.err("plugins", "run", "tools", message="accepts between 2 and 3 arg(s), received 1")
        self.err("plugins", "run", "tools", "env", "1x", message="invalid task id \"1x\": "
                 "strconv.ParseInt: parsing \"1x\": invalid syntax")
        env = dict(self.env, FAKE_TY_ACTION_TIMEOUT="0.3")
        t0 = time.monotonic()
        r = self.ty("plugins", "run", "tools", "slow", env=env)
        self.assertLess(time.monotonic() - t0, 5)
        self.assertIn("Error: action tools/slow failed: signal: killed\n", r.stderr)
        self.assertTrue(fake_ty.plugin_runs(self.state, action="slow")[0]["timed_out"])


class DaemonCase(PluginCase):
    """Runs `ty daemon` as a subprocess, stopped with SIGTERM at cleanup."""

    def start_daemon(self, **extra_env):
        env = dict(self.env, **extra_env)
        log = open(os.path.join(self.tmp, "daemon-%d.log" % time.monotonic_ns()), "w+")
        self.addCleanup(log.close)
        proc = subprocess.Popen(["ty", "daemon"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.tmp)
        self.addCleanup(self.stop_daemon, proc)
        proc.log = log
        self.url = fake_ty.api_url(self.state, timeout=TIMEOUT_S)
        self.wait_for(lambda: fake_ty.daemon_info(self.state).get("api_url") == self.url)
        return proc

    def stop_daemon(self, proc, timeout=TIMEOUT_S):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def wait_for(self, predicate, timeout=5.0, what="condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail("timed out waiting for " + what)
            time.sleep(0.05)

    def status(self, task_id):
        return fake_ty.get_task(self.state, task_id)["status"]

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status, resp.headers, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())


class Daemon(DaemonCase):

    def setUp(self):
        super().setUp()
        events = ["task.started", "task.done", "task.blocked", "task.failed"]
        for name in ("zeta", "alpha"):
            write_plugin(self.plugins, name, hook_manifest(name, events), {"hook.sh": ECHO})

    def hooks(self, count, **filters):
        return fake_ty.wait_plugin_runs(self.state, count, kind="hook", **filters)

    def test_second_daemon_lock_and_status(self):
        proc = self.start_daemon()
        r = self.ty("daemon")
        self.assertEqual((r.returncode, r.stderr),
                         (1, "Error: daemon already running (could not acquire lock)\n"))
        self.assertEqual(self.ok("daemon", "status").stdout,
                         "Daemon running (pid %d, safe mode)\n" % proc.pid)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(TIMEOUT_S), 0)
        self.assertFalse(os.path.exists(self.state + ".api"))
        self.assertEqual(self.ok("daemon", "status").stdout, "Daemon not running\n")

    def test_executor_hooks_env_and_stale_task(self):
        self.start_daemon()
        task_id = self.create("Original")
        self.assertEqual(self.ok("execute", str(task_id)).stdout,
                         "Queued task #1: Original (auto mode)\n")
        started = self.hooks(2, event="task.started")
        self.assertEqual(self.status(task_id), "processing")
        self.assertEqual([r["plugin"] for r in started], ["alpha", "zeta"])   # by name
        env = started[0]["env"]
        self.assertEqual({k: env[k] for k in env if k.startswith(("TASK_", "WORKTREE"))}, {
            "TASK_ID": "1", "TASK_TITLE": "Original", "TASK_STATUS": "processing",
            "TASK_PROJECT": "personal", "TASK_TYPE": "code",
            "TASK_MESSAGE": "Starting task #1: Original", "TASK_EVENT": "task.started",
            "WORKTREE_PATH": "", "TASK_PLUGIN_NAME": "alpha",
            "TASK_PLUGIN_DIR": os.path.join(self.plugins, "alpha")})
        self.assertEqual(env["TY_PLUGINS_DIR"], self.plugins)                 # daemon env
        self.assertEqual(started[0]["cwd"], os.path.join(self.plugins, "alpha"))
        self.assertEqual(started[0]["output"], "task.started 1\n")
        self.ok("update", str(task_id), "--title", "Renamed")
        fake_ty.finish(self.state, task_id, "done")
        done = self.hooks(2, event="task.done")
        self.assertEqual(self.status(task_id), "done")
        # The executor hands hooks its own copy of the task, taken when it started.
        self.assertEqual((done[0]["env"]["TASK_STATUS"], done[0]["env"]["TASK_TITLE"],
                          done[0]["env"]["TASK_MESSAGE"]), ("processing", "Original",
                                                             "Task completed"))
        self.assertEqual([l["content"] for l in fake_ty.task_logs(self.state, task_id)],
                         ["Starting task #1: Original", "Task completed"])
        # CLI status changes land in event_log but fire no hooks.
        before = len(fake_ty.plugin_runs(self.state))
        other = self.create("Other")
        self.ok("status", str(other), "blocked")
        self.ok("close", str(other))
        time.sleep(0.5)
        self.assertEqual(len(fake_ty.plugin_runs(self.state)), before)
        self.assertEqual([(e["event_type"], e["message"]) for e in fake_ty.event_log(self.state)
                          if e["task_id"] == other],
                         [("task.created", "Other"), ("task.updated", "Other"),
                          ("task.blocked", "status change"), ("task.updated", "Other"),
                          ("task.completed", "Other")])

    def test_outcomes(self):
        self.start_daemon()
        cases = [
            ("needs_input", "Which DB?", "blocked", "task.blocked", "Which DB?"),
            ("needs_input", "an error occurred", "blocked", "task.failed", "an error occurred"),
            ("failed", "boom", "blocked", "task.failed", "Task failed: boom"),
            ("success", None, "backlog", None, None),
            ("interrupted", None, "backlog", None, None),
        ]
        for outcome, message, status, event, hook_message in cases:
            with self.subTest(outcome=outcome, message=message):
                task_id = self.create(outcome)
                self.ok("status", str(task_id), "queued")
                self.hooks(2, task_id=task_id, event="task.started")
                count = len(fake_ty.plugin_runs(self.state, "hook"))
                fake_ty.finish(self.state, task_id, outcome, message)
                self.assertEqual(self.status(task_id), status)
                if event:
                    runs = self.hooks(2, task_id=task_id, event=event)
                    self.assertEqual(runs[0]["env"]["TASK_MESSAGE"], hook_message)
                time.sleep(0.3)
                self.assertEqual(len(fake_ty.plugin_runs(self.state, "hook")),
                                 count + (2 if event else 0))
        # finish() right after queueing waits for the executor to start the task.
        task_id = self.create("quick")
        self.ok("execute", str(task_id))
        fake_ty.finish(self.state, task_id, "failed", "x")
        self.assertEqual(self.status(task_id), "blocked")
        # Closing a running task from the CLI: the executor notices, as pollTmuxSession.
        task_id = self.create("closed by hand")
        self.ok("execute", str(task_id))
        self.wait_for(lambda: self.status(task_id) == "processing")
        self.ok("close", str(task_id))
        runs = self.hooks(2, task_id=task_id, event="task.done")
        self.assertEqual(runs[0]["env"]["TASK_MESSAGE"], "Task completed")
        with self.assertRaises(fake_ty.FakeTyError):
            fake_ty.finish(self.state, task_id, "done")       # no longer running

    def test_plugins_loaded_once_and_orphans_on_restart(self):
        proc = self.start_daemon()
        write_plugin(self.plugins, "late", hook_manifest("late", ["task.started"]),
                     {"hook.sh": ECHO})
        task_id = self.create()
        self.ok("execute", str(task_id))
        self.hooks(2, event="task.started")
        time.sleep(0.3)
        self.assertEqual(fake_ty.plugin_runs(self.state, plugin="late"), [])
        self.assertEqual(self.stop_daemon(proc), 0)
        self.assertEqual(self.status(task_id), "processing")
        self.start_daemon()
        blocked = self.hooks(2, event="task.blocked")
        self.assertEqual(self.status(task_id), "blocked")
        self.assertTrue(blocked[0]["env"]["TASK_MESSAGE"].startswith(
            "Executor terminated (daemon restart)"))
        self.assertEqual(blocked[0]["env"]["TASK_STATUS"], "processing")
        self.ok("execute", str(task_id))
        self.hooks(1, event="task.started", plugin="late")

    def test_hook_timeout_kills_the_script(self):
        write_plugin(self.plugins, "slow", hook_manifest("slow", ["task.started"]),
                     {"hook.sh": "#!/bin/sh\necho going\nexec sleep 30\n"})
        self.start_daemon(FAKE_TY_HOOK_TIMEOUT="0.5")
        self.ok("execute", str(self.create()))
        run = self.hooks(1, plugin="slow")[0]
        self.assertEqual((run["timed_out"], run["signal"], run["error"], run["output"]),
                         (True, 9, "signal: killed", "going\n"))
        self.assertLess(run["duration_s"], 3)


class Services(DaemonCase):

    def test_started_in_own_group_and_stopped_term_then_kill(self):
        write_plugin(self.plugins, "svc", (
            "name: svc\nservices:\n"
            "  - name: polite\n    cwd: work\n    env: [\"EXTRA=yes\", \"TY_DB_PATH=mine\"]\n"
            "    command: echo \"$TY_DB_PATH|$TY_API_URL|$EXTRA|$(pwd)\" > started; "
            "trap 'echo term > got-term; exit 0' TERM; while :; do sleep 0.05; done\n"
            "  - name: stubborn\n"
            "    command: trap '' TERM; while :; do sleep 0.05; done\n"), {"work/.keep": ""})
        proc = self.start_daemon()
        runs = fake_ty.wait_plugin_runs(self.state, 2, kind="service", finished=False)
        work = os.path.join(self.plugins, "svc", "work")
        self.wait_for(lambda: os.path.exists(os.path.join(work, "started")))
        with open(os.path.join(work, "started")) as f:
            self.assertEqual(f.read(), "mine|%s|yes|%s\n" % (self.url, work))
        for run in runs:
            self.assertEqual(run["argv"][:2], ["sh", "-c"])
            self.assertEqual(os.getpgid(run["pid"]), run["pid"])        # its own group
            self.assertNotEqual(os.getpgid(run["pid"]), os.getpgid(proc.pid))
        self.assertEqual(runs[0]["env"]["TY_API_URL"], self.url)
        t0 = time.monotonic()
        self.assertEqual(self.stop_daemon(proc), 0)
        self.assertGreater(time.monotonic() - t0, 4.5)                  # waited 5 s for one
        self.assertTrue(os.path.exists(os.path.join(work, "got-term")))
        polite, stubborn = fake_ty.plugin_runs(self.state, "service")
        self.assertEqual((polite["exit"], polite["sigkilled"]), (0, False))
        self.assertLess(polite["stop_duration_s"], 1)
        self.assertEqual((stubborn["signal"], stubborn["error"], stubborn["sigkilled"]),
                         (9, "signal: killed", True))
        self.assertGreaterEqual(stubborn["stop_duration_s"], 5)
        def group_gone(pgid):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            return False
        for run in (polite, stubborn):
            self.wait_for(lambda: group_gone(run["pgid"]), what="group %d" % run["pgid"])


class SSEClient:
    """A minimal reader of a chunked text/event-stream."""

    def __init__(self, url, path="/api/board/stream"):
        host, port = url.split("//")[1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = dict(l.split(": ", 1) for l in lines[1:] if l)
        self.text = ""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("stream closed")
        self.buf += data

    def _until(self, sep):
        while sep not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(sep, 1)
        return head

    def event(self, timeout=5.0):
        """The next (event, data) pair."""
        self.sock.settimeout(timeout)
        while "\n\n" not in self.text:
            size = int(self._until(b"\r\n"), 16)
            while len(self.buf) < size + 2:
                self._fill()
            self.text += self.buf[:size].decode()
            self.buf = self.buf[size + 2:]
        block, self.text = self.text.split("\n\n", 1)
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        return fields["event"], json.loads(fields["data"])

    def close(self):
        self.sock.close()


class Api(DaemonCase):

    def test_task_detail_events_and_board(self):
        self.start_daemon()
        task_id = self.create("A <b> & c")
        self.ok("update", str(task_id), "--body", "text")
        code, headers, body = self.get("/api/tasks/%d" % task_id)
        self.assertEqual((code, headers["Content-Type"], headers["Access-Control-Allow-Origin"]),
                         (200, "application/json", "*"))
        self.assertEqual(list(body), ["logs", "task"])
        self.assertEqual(body["logs"], [])
        task = body["task"]
        self.assertEqual(list(task), ["id", "title", "body", "status", "type", "project",
                                      "executor", "pinned", "tags", "permission_mode",
                                      "branch_name", "has_executor", "pr_url", "created_at",
                                      "updated_at"])
        self.assertEqual((task["title"], task["body"], task["status"]),
                         ("A <b> & c", "text", "backlog"))
        self.assertTrue(task["created_at"].endswith("Z"))
        with urllib.request.urlopen(self.url + "/api/tasks/%d" % task_id) as resp:
            raw = resp.read().decode()
        self.assertIn('"A \\u003cb\\u003e \\u0026 c"', raw)
        self.assertTrue(raw.endswith("}\n"))
        self.assertEqual(self.get("/api/tasks/99")[::2], (404, {"error": "task not found"}))
        self.assertEqual(self.get("/api/tasks/x1")[::2], (400, {"error": "invalid task id"}))
        code, _, events = self.get("/api/events")
        self.assertEqual([(e["id"], e["event_type"]) for e in events],
                         [(2, "task.updated"), (1, "task.created")])
        self.assertEqual(list(events[0]), ["created_at", "event_type", "id", "message",
                                           "metadata", "task_id"])
        self.assertEqual(len(self.get("/api/events?limit=1")[2]), 1)
        self.assertEqual(self.get("/api/events?type=task.created&task_id=1")[2][0]["id"], 1)
        self.assertEqual(self.get("/api/events?task_id=7")[2], [])
        code, _, board = self.get("/api/board")
        self.assertEqual([(c["status"], c["label"], c["count"]) for c in board["columns"]],
                         [("backlog", "Backlog", 1), ("processing", "In Progress", 0),
                          ("blocked", "Blocked", 0), ("done", "Done", 0)])
        self.assertIsNone(board["columns"][1]["tasks"])
        self.assertEqual(list(board["columns"][0]["tasks"][0]),
                         ["id", "title", "project", "type", "pinned", "age_hint"])
        self.assertEqual(self.get("/api/tasks")[0], 501)                 # not modelled

    def test_stream_snapshot_on_change_and_heartbeat(self):
        self.start_daemon(FAKE_TY_HEARTBEAT_S="0.4")
        stream = SSEClient(self.url)
        self.addCleanup(stream.close)
        self.assertEqual((stream.status, stream.headers["Content-Type"],
                          stream.headers["Cache-Control"], stream.headers["Transfer-Encoding"]),
                         (200, "text/event-stream", "no-cache", "chunked"))
        kind, board = stream.event()
        self.assertEqual((kind, board["columns"][0]["count"]), ("board", 0))
        self.assertEqual(stream.event(), ("heartbeat", {}))
        t0 = time.monotonic()
        self.create("New")
        while True:
            kind, data = stream.event()
            if kind == "board":
                break
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertEqual(data["columns"][0]["tasks"][0]["title"], "New")

    def test_api_drop_and_write_timeout(self):
        self.start_daemon(FAKE_TY_WRITE_TIMEOUT_S="1.5", FAKE_TY_HEARTBEAT_S="1")
        stream = SSEClient(self.url)
        self.addCleanup(stream.close)
        stream.event()
        kept = http.client.HTTPConnection(self.url.split("//")[1], timeout=5)
        self.addCleanup(kept.close)
        kept.request("GET", "/api/board")
        self.assertEqual(kept.getresponse().read()[:1], b"{")
        fake_ty.write_control(self.state, {"api_drop": True})
        kept.request("GET", "/api/board")                   # kept-alive: reset too
        with self.assertRaises((ConnectionError, http.client.HTTPException)):
            kept.getresponse()
        with self.assertRaises((EOFError, ConnectionError)):
            while True:
                stream.event()
        with self.assertRaises((ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(self.url + "/api/board", timeout=5).read()
        fake_ty.write_control(self.state, {})
        self.assertEqual(self.get("/api/board")[0], 200)
        stream = SSEClient(self.url)
        self.addCleanup(stream.close)
        stream.event()
        # WriteTimeout: the first write after it (here the 2 s heartbeat) fails and
        # the stream ends, its chunked body unterminated.
        t0 = time.monotonic()
        self.assertEqual(stream.event(), ("heartbeat", {}))
        with self.assertRaises(EOFError):
            stream.event()
        self.assertLess(time.monotonic() - t0, 3)
        self.assertNotIn(b"0\r\n\r\n", stream.buf)


if __name__ == "__main__":
    unittest.main()
