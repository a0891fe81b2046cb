"""The seed README's Quick Start and Python example, run as a new user would: subprocesses only."""
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from tests.util import HAVE_NODE, MODULE, ROOT, kill_strays, processes_mentioning, wait_for

SEED_JS = """\
async function workflow(input, { step, sleep }) {
  const greeting = await step("greet", () => {
    return `Hello, ${input.name}!`;
  });

  await sleep("wait", 5000);

  const result = await step("complete", () => {
    return { message: greeting, timestamp: Date.now() };
  });

  return result;
}
"""

SEED_PY = """\
def fetch_data(url):
    return {"url": url, "items": [1, 2, 3]}

def transform(data):
    return {"count": len(data["items"]), "source": data["url"]}

def workflow(input, ctx):
    # Steps are memoized
    data = ctx.step("fetch-data", lambda: fetch_data(input["url"]))

    # Durable sleep
    ctx.sleep("wait", 3)  # seconds

    # Process
    result = ctx.step("process", lambda: transform(data))

    return result
"""


class QuickStart(unittest.TestCase):
    """`init`, `deploy -f -`, `start`, `status`, with HOME pointing at an empty folder."""

    module = MODULE

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tyow-qs-")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TY_OPENWORKFLOW")}
        self.env["HOME"] = os.path.join(self.tmp, "home")
        os.makedirs(self.env["HOME"])

    def tearDown(self):
        kill_strays(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def tow(self, *args, input_text=None, ok=True):
        proc = subprocess.run([sys.executable, self.module] + list(args), input=input_text, capture_output=True,
                              text=True, env=self.env, timeout=60, cwd=self.tmp)
        if ok:
            self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc

    def status(self, run_id):
        return json.loads(self.tow("status", run_id, "--json").stdout)

    def workflow_processes(self):
        return processes_mentioning(os.path.join(self.env["HOME"], ".config/ty-openworkflow/exec/code"))

    def follow(self, run_id, sleep_s):
        st = wait_for(lambda: (lambda s: s if s["status"] == "sleeping" else None)(self.status(run_id)),
                      timeout=20, what="the run to sleep")
        self.assertEqual(self.workflow_processes(), [], "a workflow process is alive while the run sleeps")
        human = self.tow("status", run_id).stdout
        self.assertRegex(human, r"status    sleeping until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in ")
        self.assertGreaterEqual(st["wake_at"], st["created_at"] + sleep_s * 1000)
        started = time.time()
        st = wait_for(lambda: (lambda s: s if s["status"] in ("completed", "failed") else None)(self.status(run_id)),
                      timeout=sleep_s + 20, interval=0.2, what="the run to complete")
        self.assertLess(time.time() - started, sleep_s + 10)
        return st

    @unittest.skipUnless(HAVE_NODE, "node is not on PATH")
    def test_seed_quick_start_verbatim(self):
        out = self.tow("init").stdout
        self.assertIn(".config/ty-openworkflow/config.yaml", out)
        self.tow("deploy", "my-workflow", "-f", "-", input_text=SEED_JS)
        t0 = time.time() * 1000
        run_id = self.tow("start", "my-workflow", "-i", '{"name": "World"}').stdout.strip()
        self.assertRegex(run_id, r"^run_[0-9a-z]+$")
        st = self.follow(run_id, 5)
        self.assertEqual(st["status"], "completed", st)
        self.assertEqual(st["output"]["message"], "Hello, World!")
        self.assertGreaterEqual(st["output"]["timestamp"], t0 + 5000)
        self.assertEqual([s["name"] for s in st["steps"]], ["greet", "wait", "complete"])
        wait_for(lambda: not processes_mentioning(self.tmp), timeout=30, what="the background runner to exit")

    def test_seed_python_example(self):
        self.tow("init")
        self.tow("deploy", "py-workflow", "--runtime", "python", input_text=SEED_PY)
        run_id = self.tow("start", "py-workflow", "-i", '{"url": "https://example.invalid/data"}').stdout.strip()
        st = self.follow(run_id, 3)
        self.assertEqual(st["status"], "completed", st)
        self.assertEqual(st["output"], {"count": 3, "source": "https://example.invalid/data"})

    def test_the_dashboard_serves_its_page(self):
        self.tow("init")
        p = subprocess.Popen([sys.executable, self.module, "dashboard", "--port", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=self.env, cwd=self.tmp)
        try:
            port = re.match(r"dashboard on http://localhost:(\d+)/", p.stdout.readline().decode())
            self.assertTrue(port, "the dashboard did not say where it listens")
            conn = http.client.HTTPConnection("localhost", int(port.group(1)), timeout=10)
            conn.request("GET", "/")
            resp = conn.getresponse()
            page = resp.read()
            conn.close()
        finally:
            p.terminate()
            p.wait(10)
            p.stdout.close()
            p.stderr.close()
        with open(os.path.join(ROOT, "runtimes", "dashboard.html"), "rb") as f:
            self.assertEqual((resp.status, page), (200, f.read()))

    def test_start_wait_follows_the_run(self):
        self.tow("init")
        self.tow("deploy", "py-workflow", "--runtime", "python", input_text=SEED_PY)
        proc = self.tow("start", "py-workflow", "-i", '{"url": "u"}', "--wait")
        lines = proc.stdout.splitlines()
        self.assertTrue(lines[0].startswith('step fetch-data completed: {"url": "u", "items": [1, 2, 3]}'), lines)
        self.assertTrue(lines[1].startswith("sleep wait until "), lines)
        self.assertEqual(lines[2], 'step process completed: {"count": 3, "source": "u"}')
        self.assertIn("status    completed", proc.stdout)
        self.tow("deploy", "bad", "--runtime", "python",
                 input_text="def workflow(input, ctx):\n    raise ValueError('nope')\n")
        proc = self.tow("start", "bad", "--wait", ok=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("error     nope", proc.stdout)


class SingleFileBuild(QuickStart):
    """`make dist` output, copied alone into an empty folder, runs the same Quick Start."""

    @classmethod
    def setUpClass(cls):
        cls.dist_dir = tempfile.mkdtemp(prefix="tyow-dist-")
        # Named as `make install` names it: a command, no .py, nothing beside it.
        out = os.path.join(cls.dist_dir, "ty-openworkflow")
        subprocess.run([sys.executable, MODULE, "dist", out], check=True, capture_output=True)
        cls.module = out

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dist_dir, ignore_errors=True)

    def test_build_is_alone_and_embeds_the_shims(self):
        self.assertEqual(os.listdir(self.dist_dir), ["ty-openworkflow"])
        with open(self.module) as f:
            text = f.read()
        for name in ("node_shim.js", "python_shim.py", "cloudflare_worker.js", "dashboard.html"):
            with open(os.path.join(ROOT, "runtimes", name)) as f:
                self.assertIn(repr(f.read())[1:200], text)

    test_start_wait_follows_the_run = None


if __name__ == "__main__":
    unittest.main()
