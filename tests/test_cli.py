"""The CLI through main(argv): every seed command and flag, and every misuse with its message."""
import json
import os
import sqlite3
import unittest

from tests import workflows
from tests.util import HAVE_NODE, TempHome, tow

HELLO_JS = workflows.NODE["hello"]
HELLO_PY = workflows.PYTHON["hello"]


class Commands(TempHome):
    def test_deploy_list_start_status_logs(self):
        path = os.path.join(self.tmp, "wf.py")
        with open(path, "w") as f:
            f.write(HELLO_PY)
        code, out, err = self.cli("deploy", "greeter", "-f", path, "--runtime", "python", "--name", "Greeter",
                                  "--description", "says hello", "--version", "2.0.0", "-a", "exec")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "deployed greeter version 1 (2.0.0, python, exec)\n")
        code, out, err = self.cli("deploy", "greeter", "--file", path, "--runtime", "python", "--version", "2.0.0")
        self.assertEqual(out, "greeter is unchanged (version 1, 2.0.0)\n")
        code, out, err = self.cli("list", "workflows", "--json")
        [wf] = json.loads(out)
        self.assertEqual((wf["id"], wf["name"], wf["description"], wf["label"], wf["runtime"]),
                         ("greeter", "Greeter", "says hello", "2.0.0", "python"))
        self.assertIn("greeter", self.cli("list", "workflows")[1])

        input_path = os.path.join(self.tmp, "in.json")
        with open(input_path, "w") as f:
            f.write('{"name": "File"}')
        sc = self.sidecar()
        run_id = sc.start("greeter", {"name": "World"}, drive=False)["id"]
        code, out, err = self.cli("start", "greeter", "--input-file", input_path, "--json", "-t", "Say hi")
        self.assertEqual(code, 0, err)
        started = json.loads(out)
        self.assertEqual(started["input"], {"name": "File"})
        self.assertEqual({k: started["task"][k] for k in ("requested", "title", "id")},
                         {"requested": True, "title": "Say hi", "id": None})
        code, out, err = self.cli("status", run_id, "--json")
        self.assertEqual(json.loads(out)["status"], "pending")
        code, out, err = self.cli("status", run_id)
        self.assertIn("status    pending", out)

        self.drive(sc, run_id)
        code, out, err = self.cli("status", run_id)
        self.assertIn("status    completed", out)
        self.assertIn('output    {"message": "Hello, World!", "n": 1}', out)
        self.assertIn("greet     completed", out)
        code, out, err = self.cli("list", "runs", "-w", "greeter", "-s", "completed", "-n", "5", "--json")
        self.assertIn(run_id, [r["id"] for r in json.loads(out)])
        code, out, err = self.cli("list", "runs", "--workflow", "nope")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no workflow 'nope'", err)  # not "no runs": the workflow is unknown
        code, out, err = self.cli("logs", run_id, "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), [])
        code, out, err = self.cli("status", run_id[:12])
        self.assertEqual(code, 0, err)  # a unique prefix is enough

    def test_redeploy_keeps_the_label_unless_given(self):
        sc = self.sidecar()
        self.assertEqual(sc.deploy("w", HELLO_PY, runtime="python")["label"], "1.0.0")
        again = sc.deploy("w", HELLO_PY, runtime="python", version="3.0.0")
        self.assertEqual((again["version"], again["label"], again["created"]), (2, "3.0.0", True))
        same = sc.deploy("w", HELLO_PY, runtime="python")
        self.assertEqual((same["version"], same["label"], same["created"]), (2, "3.0.0", False))
        code, out, err = self.cli("deploy", "w", "--runtime", "python", stdin=HELLO_PY)
        self.assertEqual(out, "w is unchanged (version 2, 3.0.0)\n")

    def test_create_task_flag_is_stored(self):
        sc = self.sidecar()
        sc.deploy("hello", HELLO_PY, runtime="python")
        code, out, err = self.cli("start", "hello", "-i", '{"name": "x"}', "--create-task", "--json")
        self.assertEqual(code, 0, err)
        task = json.loads(out)["task"]
        self.assertEqual({k: task[k] for k in ("requested", "title", "id", "pending_updates")},
                         {"requested": True, "title": "Workflow: hello", "id": None, "pending_updates": 1})

    def test_adapters_report(self):
        code, out, err = self.cli("adapters", "--json")
        rows = {r["name"]: r for r in json.loads(out)}
        self.assertEqual(set(rows), {"exec", "docker", "cloudflare"})
        self.assertTrue(rows["exec"]["default"])
        self.assertEqual(rows["exec"]["available"], HAVE_NODE)
        self.assertFalse(rows["docker"]["enabled"])
        self.assertIn("adapters.docker.enabled: true", rows["docker"]["reason"])
        code, out, err = self.cli("adapters")
        self.assertIn("exec (default)", out)

    def test_tick_with_nothing_due(self):
        code, out, err = self.cli("tick")
        self.assertEqual((code, out), (0, "tick: 0 passes\n"))

    def test_version_and_help(self):
        code, out, err = self.cli("--help")
        self.assertEqual(code, 0)
        self.assertIn("TY_OPENWORKFLOW_CONFIG", out)
        for command in ("init", "deploy", "start", "status", "list", "cancel", "logs", "adapters", "tick", "serve"):
            self.assertIn(command, out)


class Misuse(TempHome):
    """Bad input: one clear line, a non-zero exit, and the store unchanged."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("hello", HELLO_PY, runtime="python")
        self.run_id = self.sc.start("hello", {"name": "x"}, drive=False)["id"]

    def check(self, argv, code, message, stdin=None):
        return self.assert_refused(argv, code, message, stdin)

    def test_bad_input_json(self):
        err = self.check(["start", "hello", "-i", '{"name": '], 2, "invalid JSON in --input at line 1 column 10")
        self.assertIn("Expecting value", err)
        path = os.path.join(self.tmp, "bad.json")
        with open(path, "w") as f:
            f.write("{\n  'single': 1\n}")
        self.check(["start", "hello", "--input-file", path], 2, "invalid JSON in %s at line 2 column 3" % path)

    def test_input_file_missing(self):
        self.check(["start", "hello", "--input-file", "/nonexistent/in.json"], 2,
                   "input file /nonexistent/in.json not found")

    def test_input_twice(self):
        self.check(["start", "hello", "-i", "{}", "--input-file", "x.json"], 2, "not both")

    def test_unknown_workflow_and_run(self):
        self.check(["start", "nope"], 1, "no workflow 'nope'; deploy it first")
        for cmd in ("status", "cancel", "logs"):
            with self.subTest(cmd=cmd):
                self.check([cmd, "run_doesnotexist"], 1, "no run 'run_doesnotexist'")

    def test_deploy_empty_code(self):
        self.check(["deploy", "empty", "-f", "-"], 2, "the workflow code is empty", stdin="")
        self.check(["deploy", "empty", "--runtime", "python"], 2, "the workflow code is empty", stdin="  \n")

    def test_deploy_file_missing(self):
        self.check(["deploy", "x", "-f", "/nonexistent.js"], 2, "workflow file /nonexistent.js not found")

    def test_unknown_runtime_and_adapter(self):
        self.check(["deploy", "x", "--runtime", "ruby"], 2, "invalid choice: 'ruby'", stdin="x")
        self.check(["deploy", "x", "-a", "lambda"], 2, "invalid choice: 'lambda'", stdin="x")
        with self.assertRaises(tow.InputError):
            self.sc.deploy("x", HELLO_PY, runtime="ruby")

    def test_adapter_disabled(self):
        self.check(["deploy", "x", "-a", "docker", "--runtime", "python"], 1,
                   "adapter 'docker' is disabled; set adapters.docker.enabled: true", stdin=HELLO_PY)

    def test_runtime_binary_missing(self):
        self.write_config("adapters:\n  exec:\n    node: node-missing-xyz\n    python: python-missing-xyz\n"
                          .replace("adapters:\n  exec:\n", "") if False else "")
        with open(self.config_path) as f:
            text = f.read()
        text = text.replace("    timeout:", "    node: node-missing-xyz\n    python: python-missing-xyz\n    timeout:")
        with open(self.config_path, "w") as f:
            f.write(text)
        self.check(["deploy", "x"], 1, "node-missing-xyz not found on PATH (needed for node workflows); "
                   "install Node >= 18, or set adapters.exec.node", stdin=HELLO_JS)
        self.check(["deploy", "x", "--runtime", "python"], 1, "python-missing-xyz not found on PATH", stdin=HELLO_PY)
        self.check(["start", "hello"], 1, "python-missing-xyz not found on PATH")

    @unittest.skipUnless(HAVE_NODE, "node is not on PATH")
    def test_javascript_syntax_error(self):
        err = self.check(["deploy", "x"], 2, "syntax error in the workflow code at line 3",
                         stdin="async function workflow(input, { step }) {\n  const a = 1;\n  const = 2;\n}\n")
        self.assertIn("SyntaxError", err)

    def test_python_syntax_error(self):
        self.check(["deploy", "x", "--runtime", "python"], 2, "syntax error in the workflow code at line 2",
                   stdin="def workflow(input, ctx):\n    return (\n")

    def test_code_without_a_workflow_function(self):
        self.check(["deploy", "x", "--runtime", "python"], 2, "defines no top-level function named `workflow`",
                   stdin="def main(input, ctx):\n    return 1\n")

    @unittest.skipUnless(HAVE_NODE, "node is not on PATH")
    def test_module_syntax_and_python_as_javascript(self):
        self.check(["deploy", "x"], 2, "ES module syntax (import/export) is not supported",
                   stdin='import fs from "node:fs";\nasync function workflow(input, { step }) { return 1; }\n')
        self.check(["deploy", "x"], 2, "this looks like Python (def workflow); deploy it with --runtime python",
                   stdin=HELLO_PY)

    def test_bad_workflow_id(self):
        self.check(["deploy", "../etc", "--runtime", "python"], 2, "invalid workflow id '../etc'", stdin=HELLO_PY)

    def test_bad_list_filters(self):
        self.check(["list", "runs", "-s", "done"], 2, "unknown status 'done'")
        self.check(["list", "runs", "-n", "0"], 2, "--limit must be between 1 and 100000")
        self.check(["list", "runs", "-n", "99999999999999999999"], 2, "--limit must be between 1 and 100000")
        self.check(["list", "things"], 2, "invalid choice: 'things'")

    def test_double_cancel(self):
        got, out, err = self.cli("cancel", self.run_id)
        self.assertEqual(got, 0, err)
        self.check(["cancel", self.run_id], 1, "is already canceled; nothing to cancel")

    def test_bad_deadline(self):
        self.check(["start", "hello", "--deadline", "soon"], 2, "--deadline: invalid duration 'soon'")


class BrokenStore(TempHome):
    def db_path(self):
        return os.path.join(self.data_dir, tow.DB_FILE)

    def check_refused(self, message):
        with open(self.db_path(), "rb") as f:
            before = f.read()
        code, out, err = self.cli("list", "runs")
        self.assertEqual(code, 1)
        self.assertIn(message, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        with open(self.db_path(), "rb") as f:
            self.assertEqual(f.read(), before, "the file was changed")

    def test_corrupted_file(self):
        os.makedirs(self.data_dir)
        with open(self.db_path(), "wb") as f:
            f.write(os.urandom(8192))
        self.check_refused("is not a ty-openworkflow database")

    def test_foreign_sqlite_database(self):
        os.makedirs(self.data_dir)
        conn = sqlite3.connect(self.db_path())
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('mine')")
        conn.commit()
        conn.close()
        self.check_refused("is not a ty-openworkflow database (it holds other data)")

    def test_newer_schema(self):
        self.sidecar().store.close()
        conn = sqlite3.connect(self.db_path())
        conn.execute("PRAGMA user_version = 99")
        conn.close()
        self.check_refused("has schema version 99, newer than this ty-openworkflow")

    def test_data_dir_is_not_a_directory(self):
        with open(self.data_dir, "w") as f:
            f.write("a file")
        code, out, err = self.cli("list", "runs")
        self.assertEqual(code, 1)
        self.assertIn("data dir %s is not a directory" % self.data_dir, err)

    def test_data_dir_cannot_be_created(self):
        blocker = os.path.join(self.tmp, "blocker")
        with open(blocker, "w") as f:
            f.write("x")
        os.environ[tow.DATA_DIR_ENV] = os.path.join(blocker, "data")
        code, out, err = self.cli("list", "runs")
        self.assertEqual(code, 1)
        self.assertIn("cannot create data dir %s/data" % blocker, err)

    @unittest.skipIf(os.geteuid() == 0, "root can write to read-only folders")
    def test_data_dir_read_only(self):
        os.makedirs(self.data_dir)
        os.chmod(self.data_dir, 0o500)
        try:
            code, out, err = self.cli("list", "runs")
        finally:
            os.chmod(self.data_dir, 0o700)
        self.assertEqual(code, 1)
        self.assertIn("is not writable", err)

    def test_closed_store(self):
        sc = self.sidecar()
        sc.store.close()
        with self.assertRaises(tow.StoreError) as cm:
            sc.list_runs()
        self.assertIn("the store is closed", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
