"""Regressions from adversarial review: hostile workflow code, odd input, orphaned passes."""
import os
import signal
import subprocess
import sys
import unittest

from tests.util import HAVE_NODE, MODULE, TempHome, processes_mentioning, read_counter, tow, wait_for


class HostileWorkflowCode(TempHome):
    """Each case must end the run with a clear message, never a stuck or looping run."""

    def run_wf(self, code, runtime, input=None):
        sc = self.sidecar()
        sc.deploy("wf", code, runtime=runtime)
        run_id = sc.start("wf", input if input is not None else {"counter": os.path.join(self.tmp, "c.txt")},
                          drive=False)["id"]
        return sc, self.drive(sc, run_id)

    def assert_failed_with(self, st, text):
        self.assertEqual(st["status"], "failed", st)
        self.assertIn(text, st["error"]["message"])

    @unittest.skipUnless(HAVE_NODE, "node is not on PATH")
    def test_node_cases(self):
        cases = [
            ('return await step("s", () => "x\\ud800y");', "lone UTF-16 surrogate"),
            ('let v = 1; for (let i = 0; i < 1200; i++) v = [v]; return await step("s", () => v);',
             "nested more than 100 levels"),
            ('await sleep("long", 1e300);', "invalid duration"),
            ('await sleep("neg", -5);', "invalid duration"),
            ('return await step("s", () => { throw new Error("x"); }, { retry: { maxAttempts: "three" } });',
             "retry.maxAttempts must be a whole number"),
            ('return await step("outer", async () => step("inner", () => 1));',
             'step "inner" was called inside step "outer"'),
            ('return await step("x".repeat(250), () => 1);', "the limit is 200"),
            ('throw "a plain string";', "a plain string"),
        ]
        for body, expected in cases:
            with self.subTest(body=body):
                code = "async function workflow(input, { step, sleep }) {\n  %s\n}\n" % body
                sc, st = self.run_wf(code, "node")
                self.assert_failed_with(st, expected)

    def test_python_cases(self):
        cases = [
            ('return ctx.step("s", lambda: "x\\ud800y")', "lone surrogate"),
            ('v = 1\n    for _ in range(1200):\n        v = [v]\n    return ctx.step("s", lambda: v)',
             "nested more than 100 levels"),
            ('ctx.sleep("long", 1e300)', "invalid duration"),
            ('ctx.step("s", lambda: 1, backoff=float("nan"))', "retry backoff must be a number"),
            ('ctx.step("s", lambda: 1, max_attempts="three")', "retry max_attempts must be a whole number"),
            ('return ctx.step("outer", lambda: ctx.step("inner", lambda: 1))',
             "'inner' was called inside step 'outer'"),
            ('return ctx.step("y" * 250, lambda: 1)', "the limit is 200"),
            ('ctx.step("s", lambda: 1, colour="red")', "unknown retry option 'colour'"),
        ]
        for body, expected in cases:
            with self.subTest(body=body):
                sc, st = self.run_wf("def workflow(input, ctx):\n    %s\n" % body, "python")
                self.assert_failed_with(st, expected)

    def test_explicit_keys_never_collide_with_auto_indexed_ones(self):
        for runtime in ("python",) + (("node",) if HAVE_NODE else ()):
            with self.subTest(runtime=runtime):
                if runtime == "node":
                    code = """async function workflow(input, { step, sleep }) {
  const x = await step("a", () => "first a");
  const y = await step("a:1", () => "explicit a:1");
  const z = await step("a", () => "second a");
  await sleep("s", 3000);
  return [x, y, z];
}"""
                else:
                    code = """def workflow(input, ctx):
    x = ctx.step("a", lambda: "first a")
    y = ctx.step("a:1", lambda: "explicit a:1")
    z = ctx.step("a", lambda: "second a")
    ctx.sleep("s", 3)
    return [x, y, z]
"""
                sc, st = self.run_wf(code, runtime)
                self.assertEqual(st["output"], ["first a", "explicit a:1", "second a"])
                self.assertEqual([s["name"] for s in st["steps"]], ["a", "a:1", "a:2", "s"])

    @unittest.skipUnless(HAVE_NODE, "node is not on PATH")
    def test_child_writing_a_partial_line_to_stdout_cannot_swallow_an_event(self):
        code = """const fs = require("fs");
async function workflow(input, { step, sleep }) {
  await step("a", () => {
    fs.appendFileSync(input.counter, "a\\n");
    require("child_process").execSync("printf 'progress 100%%'", { stdio: "inherit" });
    return 1;
  });
  await sleep("s", 2000);
  return "done";
}"""
        sc, st = self.run_wf(code, "node")
        self.assertEqual((st["status"], st["output"]), ("completed", "done"))
        self.assertEqual(read_counter(os.path.join(self.tmp, "c.txt")), ["a"])
        self.assertEqual(st["steps"][0]["attempts"], 1)

    def test_retry_cap_counts_retries_not_steps(self):
        self.write_config("limits:\n  max_step_attempts: 5\n")
        code = "def workflow(input, ctx):\n    return [ctx.step('s', lambda i=i: i) for i in range(20)]\n"
        sc, st = self.run_wf(code, "python")
        self.assertEqual((st["status"], len(st["output"])), ("completed", 20))
        code = ("def boom():\n    raise RuntimeError('again')\n\n"
                "def workflow(input, ctx):\n    ctx.step('flaky', boom, max_attempts=50, initial=0.01)\n")
        sc, st = self.run_wf(code, "python")
        self.assert_failed_with(st, "over limits.max_step_attempts (5); stopped as a runaway")


class StoreRules(TempHome):
    """Rules the store enforces whatever a runtime sends."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("wf", "def workflow(input, ctx):\n    return ctx.step('a', lambda: 1)\n", runtime="python")
        self.run_id = self.sc.start("wf", {}, drive=False)["id"]

    def claim(self):
        runs = self.sc.store.claim_due("test-owner", self.clock(), 10, 1000)
        return runs[0]["pass_id"] if runs else None

    def test_an_oversized_result_ends_the_pass_and_fails_the_run(self):
        pass_id = self.claim()
        defaults = self.sc.defaults()
        defaults["max_output_bytes"] = 10
        store = self.sc.store
        self.assertEqual(store.apply_event(self.run_id, pass_id, {"type": "step_started", "step": "a"},
                                           self.clock(), defaults), tow.APPLIED)
        outcome = store.apply_event(self.run_id, pass_id, {"type": "step_completed", "step": "a", "output": "x" * 50},
                                    self.clock(), defaults)
        self.assertEqual(outcome, tow.ENDED)
        st = self.sc.status(self.run_id)
        self.assertEqual(st["status"], "failed")
        self.assertIn("over the limit of 10 bytes", st["error"]["message"])

    def test_a_pass_lost_again_and_again_fails_the_run(self):
        for _ in range(tow.PASS_RETRY["max_attempts"]):
            self.assertIsNotNone(self.claim())
            self.clock.advance(2000)  # its scheduler died: the lease runs out
        self.assertIsNone(self.claim())
        st = self.sc.status(self.run_id)
        self.assertEqual(st["status"], "failed")
        self.assertIn("lost %d times in a row" % tow.PASS_RETRY["max_attempts"], st["error"]["message"])


class OrphanedPasses(TempHome):
    """A pass never outlives the scheduler that runs it, even one stuck in a busy loop."""

    def check_dies_with_scheduler(self, code, runtime):
        sc = self.sidecar(clock=False)
        sc.deploy("busy", code, runtime=runtime)
        counter = os.path.join(self.tmp, "c.txt")
        sc.start("busy", {"counter": counter}, drive=False)
        tick = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "tick"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: read_counter(counter), what="the busy step to start")
            shims = processes_mentioning(os.path.join(self.data_dir, "exec", "runtimes"))
            self.assertTrue(shims)
            tick.send_signal(signal.SIGKILL)
            tick.wait()
            wait_for(lambda: not processes_mentioning(os.path.join(self.data_dir, "exec", "runtimes")), timeout=5,
                     what="the orphaned shim to die")
        finally:
            if tick.poll() is None:
                tick.kill()
                tick.wait()

    @unittest.skipUnless(HAVE_NODE, "node is not on PATH")
    def test_node_busy_loop(self):
        self.check_dies_with_scheduler("""const fs = require("fs");
async function workflow(input, { step }) {
  await step("spin", () => { fs.appendFileSync(input.counter, "spin\\n"); while (true) {} });
}""", "node")

    def test_python_busy_loop(self):
        self.check_dies_with_scheduler("""def spin(path):
    with open(path, "a") as f:
        f.write("spin\\n")
    while True:
        pass

def workflow(input, ctx):
    ctx.step("spin", lambda: spin(input["counter"]))
""", "python")


class OddInput(TempHome):
    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("hello", "def workflow(input, ctx):\n    return input\n", runtime="python")

    def check(self, argv, code, message, stdin=None):
        return self.assert_refused(argv, code, message, stdin)

    def test_lone_surrogate_input(self):
        self.check(["start", "hello", "-i", '"\\ud800"'], 2, "lone surrogate")

    def test_deeply_nested_input_file(self):
        path = os.path.join(self.tmp, "deep.json")
        with open(path, "w") as f:
            f.write("[" * 100000)
        self.check(["start", "hello", "--input-file", path], 2, "nested too deeply")

    def test_absurd_deadline(self):
        self.check(["start", "hello", "--deadline", "99999999999999d"], 2, "longer than a century")

    def test_code_that_is_not_utf8(self):
        self.check(["deploy", "x", "--runtime", "python"], 2, "contains a NUL byte",
                   stdin="def workflow(input, ctx):\n    return '\0'\n")

    def test_ambiguous_run_prefix(self):
        a = self.sc.start("hello", {}, drive=False)["id"]
        b = self.sc.start("hello", {}, drive=False)["id"]
        common = os.path.commonprefix([a, b])
        if len(common) >= 6:
            self.check(["status", common], 1, "is ambiguous")

    def test_explicit_config_must_exist(self):
        got, out, err = self.cli("--config", os.path.join(self.tmp, "typo.yaml"), "list", "runs")
        self.assertEqual(got, 1)
        self.assertIn("typo.yaml not found; create it with `ty-openworkflow --config", err)

    def test_config_that_is_a_directory(self):
        for argv in (["list", "runs"], ["init"], ["init", "--force"]):
            with self.subTest(argv=argv):
                got, out, err = self.cli("--config", self.tmp, *argv)
                self.assertEqual(got, 1)
                self.assertIn("is a directory; give the path of a file", err)

    def test_init_with_awkward_data_dirs(self):
        for name in ("it's", "a: b", 'q"uote', "hash #x", "{braces}"):
            with self.subTest(name=name):
                path = os.path.join(self.tmp, "c-%d.yaml" % abs(hash(name)))
                data = os.path.join(self.tmp, name)
                got, out, err = self.cli("--config", path, "init", "--data-dir", data)
                self.assertEqual(got, 0, err)
                cfg = tow.load_config(path)
                self.assertEqual(cfg.data_dir, data)
                self.assertEqual(cfg["adapters.exec.work_dir"], os.path.join(data, "exec"))

    def test_yaml_quotes_and_comments(self):
        cases = [("project: don't # c", "don't"), ('cli: "a\\" # b"', 'a" # b'), ("cli: 'x''y' # z", "x'y"),
                 ("cli: a#b", "a#b"), ('cli: "x" # "y"', "x")]
        for line, expected in cases:
            with self.subTest(line=line):
                data, _ = tow.parse_yaml(line)
                self.assertEqual(list(data.values()), [expected])
        with self.assertRaises(tow.ConfigError):
            tow.parse_yaml('cli: "x" y')

    def test_poll_interval_floor(self):
        self.write_config("poll_interval: 0s\n")
        got, out, err = self.cli("list", "runs")
        self.assertEqual(got, 1)
        self.assertIn("poll_interval must be at least 1s", err)

    def test_format_time_never_raises(self):
        self.assertTrue(tow.format_time(10 ** 18))
        self.assertTrue(tow.format_time(-10 ** 18))


class WaitKeepsDriving(TempHome):
    linger = "1s"

    def test_start_wait_outlasts_the_runner_linger(self):
        self.sidecar().deploy("sleepy", "def workflow(input, ctx):\n    ctx.sleep('s', 4)\n    return 'awake'\n",
                              runtime="python")
        proc = subprocess.run([sys.executable, MODULE, "--config", self.config_path, "start", "sleepy", "--wait"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn('output    "awake"', proc.stdout)


if __name__ == "__main__":
    unittest.main()
