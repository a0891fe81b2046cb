"""The docker adapter on a real engine: the same contract as exec, plus containers that must not outlive passes."""
import os
import signal
import subprocess
import sys
import time
import unittest

from tests import workflows
from tests.docker_env import DOCKER_CONFIG, HAVE_ENGINE, NODE_IMAGE, WHY_NOT
from tests.test_contract import AdapterContract
from tests.util import MODULE, TempHome, read_counter, tow, wait_for


def store_label(data_dir):
    """The label value of a store's containers: its store id."""
    store = tow.Store(data_dir)
    try:
        return store.store_id
    finally:
        store.close()


def docker(*args, timeout=30):
    return subprocess.run(["docker"] + list(args), capture_output=True, text=True, timeout=timeout)


class DockerCase(TempHome):
    adapter_config = DOCKER_CONFIG
    adapter = "docker"

    def setUp(self):
        super().setUp()
        # Side effects go to a folder mounted at the same path inside every container,
        # writable by the container's unprivileged user.
        self.shared = os.path.join(self.tmp, "shared")
        os.makedirs(self.shared)
        os.chmod(self.shared, 0o777)
        self.adapter_config = DOCKER_CONFIG + '    volumes:\n      "%s": "%s"\n' % (self.shared, self.shared)
        self.write_config()

    def shared_dir(self):
        return self.shared

    def containers(self, all_=False):
        install = store_label(self.data_dir)
        args = ["ps", "--filter", "label=ty-openworkflow.install=%s" % install, "--format", "{{.Names}}"]
        if all_:
            args.insert(1, "-a")
        return docker(*args).stdout.split()

    def tearDown(self):
        for name in self.containers(all_=True):
            docker("rm", "-f", name)
        super().tearDown()


@unittest.skipUnless(HAVE_ENGINE, WHY_NOT)
class DockerNodeContract(AdapterContract, DockerCase):
    runtime = "node"
    adapter = "docker"
    shared_dir = DockerCase.shared_dir
    killed_text = "exited with status 137"

    def shim_processes(self):
        return self.containers()

    def kill_shims(self):
        for name in self.containers():
            docker("kill", "--signal", "KILL", name)


@unittest.skipUnless(HAVE_ENGINE, WHY_NOT)
class DockerPythonContract(DockerNodeContract):
    runtime = "python"


@unittest.skipUnless(HAVE_ENGINE, WHY_NOT)
class DockerContainers(DockerCase):
    def test_cancel_mid_step_kills_the_container(self):
        sc = self.sidecar(clock=False)
        sc.deploy("hang", workflows.NODE["hang"], adapter="docker")
        counter = os.path.join(self.shared, "c.txt")
        run_id = sc.start("hang", {"counter": counter}, drive=False)["id"]
        tick = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "tick"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: "forever" in read_counter(counter), what="the hanging step", timeout=30)
            self.assertEqual(len(self.containers()), 1)
            sc.cancel(run_id)
            t0 = time.time()
            wait_for(lambda: not self.containers(all_=True), timeout=10, what="the container to go")
            self.assertLess(time.time() - t0, 5)
            self.assertEqual(tick.wait(20), 0)
        finally:
            if tick.poll() is None:
                tick.kill()
                tick.wait()
        self.assertEqual(sc.status(run_id)["status"], "canceled")

    def test_a_killed_docker_client_leaves_no_container(self):
        sc = self.sidecar()
        sc.deploy("spin", "async function workflow(input, { step }) {\n"
                          "  await step('spin', () => { while (true) {} });\n}\n", adapter="docker")
        run_id = sc.start("spin", {}, drive=False)["id"]
        import threading
        ticker = threading.Thread(target=sc.tick)
        ticker.start()
        wait_for(self.containers, timeout=30, what="the container")
        clients = [int(p) for p in subprocess.run(["pgrep", "-f", "docker run --rm -i --name tyow-"],
                                                  capture_output=True, text=True).stdout.split()]
        self.assertTrue(clients)
        for pid in clients:
            os.kill(pid, signal.SIGKILL)
        ticker.join(30)
        self.assertFalse(ticker.is_alive())
        wait_for(lambda: not self.containers(all_=True), timeout=15, what="the orphaned container to be removed")
        self.assertEqual(sc.status(run_id)["status"], "pending")

    def test_a_replay_never_runs_beside_the_lost_pass_container(self):
        self.lease_ttl = "2s"
        self.write_config()
        sc = self.sidecar(clock=False)
        counter = os.path.join(self.shared, "c.txt")
        sc.deploy("spin", """const fs = require("fs");
async function workflow(input, { step }) {
  return await step("spin", () => {
    fs.appendFileSync(input.counter, "x\\n");
    if (fs.readFileSync(input.counter, "utf8").length === 2) { while (true) {} }  // first time: stuck
    return "done";
  });
}""", adapter="docker")
        run_id = sc.start("spin", {"counter": counter}, drive=False)["id"]
        first = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "serve"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: read_counter(counter), timeout=30, what="the stuck step")
            first.kill()  # SIGKILL: the busy container never sees its stdin close
            first.wait()
            self.assertEqual(len(self.containers()), 1)
            # Once the lease expires the run is replayed, and the lost container goes first.
            wait_for(lambda: (sc.tick(), sc.status(run_id)["status"] == "completed")[1], timeout=30,
                     what="the replay")
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        st = sc.status(run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", "done"))
        self.assertEqual(self.containers(all_=True), [])
        self.assertEqual(read_counter(counter), ["x", "x"])

    def test_serve_removes_orphaned_containers(self):
        install = store_label(self.data_dir)
        sc = self.sidecar(clock=False)
        sc.store  # create the data dir
        proc = docker("run", "-d", "--name", "tyow-orphan-%d" % os.getpid(),
                      "--label", "ty-openworkflow=1", "--label", "ty-openworkflow.install=%s" % install,
                      "--label", "ty-openworkflow.run=run_gone", "--label", "ty-openworkflow.pass=pass_gone",
                      "--network", "none", NODE_IMAGE, "node", "-e", "setTimeout(() => {}, 600000)")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(self.containers()), 1)
        serve = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "serve"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: not self.containers(all_=True), timeout=30, what="serve's clean-up")
        finally:
            serve.terminate()
            self.assertEqual(serve.wait(30), 0)
        self.assertIn("removed 1 orphaned container", serve.stderr.read().decode())
        serve.stderr.close()

    def test_missing_image_is_a_clear_error(self):
        self.write_config(adapter=DOCKER_CONFIG.replace(NODE_IMAGE, "ty-openworkflow-test/absent:none"))
        before = self.db_snapshot()
        code, out, err = self.cli("deploy", "x", "-a", "docker", stdin=workflows.NODE["hello"])
        self.assertEqual(code, 1)
        self.assertIn("docker image ty-openworkflow-test/absent:none (for node workflows) is not present; "
                      "run `docker pull ty-openworkflow-test/absent:none`", err)
        self.assertEqual(self.db_snapshot(), before)


class DockerMisuse(TempHome):
    """What `adapters` and `deploy -a docker` say when docker cannot be used (no engine needed)."""

    adapter_config = DOCKER_CONFIG

    def test_docker_binary_missing(self):
        self.write_config(adapter=DOCKER_CONFIG + "    docker: docker-missing-xyz\n")
        code, out, err = self.cli("deploy", "x", "-a", "docker", "--runtime", "python",
                                  stdin=workflows.PYTHON["hello"])
        self.assertEqual(code, 1)
        self.assertIn("docker-missing-xyz not found on PATH; install Docker", err)
        rows = {r["name"]: r for r in self.sidecar().adapters_report()}
        self.assertFalse(rows["docker"]["available"])

    def test_engine_unreachable(self):
        old = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = "unix://%s/no.sock" % self.tmp
        try:
            code, out, err = self.cli("deploy", "x", "-a", "docker", "--runtime", "python",
                                      stdin=workflows.PYTHON["hello"])
        finally:
            if old is None:
                os.environ.pop("DOCKER_HOST")
            else:
                os.environ["DOCKER_HOST"] = old
        self.assertEqual(code, 1)
        if "not found on PATH" not in err:
            self.assertIn("the docker engine is not reachable", err)

    def test_run_argv_has_isolation_and_limits(self):
        self.write_config(adapter=DOCKER_CONFIG + "    network: backend\n    memory: 256m\n    cpus: \"0.5\"\n"
                                          "    pids_limit: 64\n")
        sc = self.sidecar()
        adapter = sc.adapter("docker")
        version = {"runtime": "node", "code": "async function workflow() {}", "label": "1"}
        spec = tow.PassSpec({"pass_id": "pass_x", "run_id": "run_y"}, version)
        argv = adapter.run_argv(spec, "tyow-pass-x")
        joined = " ".join(argv)
        for part in ("run --rm -i --name tyow-pass-x", "--label ty-openworkflow.run=run_y",
                     "--label ty-openworkflow.pass=pass_x", "--pull never", "--network backend", "--memory 256m",
                     "--cpus 0.5", "--pids-limit 64", "--user 65534:65534", "--read-only", "--tmpfs /tmp",
                     "-e TYOW_EVENT_FD=3 " + NODE_IMAGE + " /bin/sh -c",
                     "exec 3>&1 1>&2 && exec \"$0\" \"$@\" node /ow/node_shim.js /ow/workflow.js"):
            self.assertIn(part, joined)
        self.assertIn(":/ow/workflow.js:ro", joined)
        self.assertNotIn("--network none", joined)

    def test_bad_pull_value(self):
        self.write_config(adapter=DOCKER_CONFIG + "    pull: sometimes\n")
        code, out, err = self.cli("list", "runs")
        self.assertEqual(code, 1)
        self.assertIn("adapters.docker.pull must be never, missing or always", err)


if __name__ == "__main__":
    unittest.main()
