"""The dashboard's HTTP surface: the page, its JSON API, /metrics, /healthz; actions only with the token.

Real HTTP on 127.0.0.1; /metrics is also checked with `promtool check metrics` when promtool is installed
(`.ci/run` installs Debian's prometheus package for it).
"""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import unittest

from tests.util import MODULE, TempHome, tow

WF = "async function workflow(input, { step, sleep }) { const a = await step('a', () => input.n); " \
     "await sleep('nap', '1h'); return a; }"


class DashboardCase(TempHome):
    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("wf", WF)
        self.board = self.sc.dashboard(host="127.0.0.1", port=0).start()
        self.addCleanup(self.board.stop)

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.board.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.getheader("Content-Type", "")
            return resp.status, (json.loads(data) if ctype.startswith("application/json") else data.decode())
        finally:
            conn.close()

    def token(self):
        return {"Authorization": "Bearer " + self.board.token}


class Api(DashboardCase):
    def test_page_health_runs_and_a_run(self):
        run_id = self.sc.start("wf", {"n": 3}, drive=False)["id"]
        self.sc.tick()
        status, page = self.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertIn("<title>ty-openworkflow</title>", page)
        self.assertNotIn("http://", page.replace("http://www.w3.org", ""), "the page must load nothing from elsewhere")
        self.assertEqual(self.request("GET", "/healthz"), (200, {"ok": True, "store": "ok", "version": tow.__version__}))
        status, doc = self.request("GET", "/api/runs?status=sleeping")
        self.assertEqual([r["id"] for r in doc["runs"]], [run_id])
        self.assertEqual(self.request("GET", "/api/runs?status=completed")[1]["runs"], [])
        self.assertEqual([r["id"] for r in self.request("GET", "/api/runs?q=" + run_id[:10])[1]["runs"]], [run_id])
        status, st = self.request("GET", "/api/runs/" + run_id)
        self.assertEqual((status, st["status"], st["steps"][0]["output"]), (200, "sleeping", 3))
        self.assertIn("pass_started", [e["type"] for e in st["events"]])
        self.assertEqual(self.request("GET", "/api/runs/run_nosuchrun")[0], 404)
        self.assertEqual(self.request("GET", "/api/runs?status=bogus")[0], 400)
        self.assertEqual(self.request("GET", "/api/workflows")[1]["workflows"][0]["id"], "wf")

    def test_odd_requests(self):
        self.assertEqual(self.request("GET", "/api/runs?before=99999999999999999999:x")[0], 400)
        self.assertEqual(self.request("GET", "/api/runs?limit=x")[0], 400)
        conn = http.client.HTTPConnection("127.0.0.1", self.board.port, timeout=10)
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.read()), (200, b""))
        conn.close()
        # DNS rebinding: a page served under another name must not read the API.
        self.assertEqual(self.request("GET", "/api/runs", headers={"Host": "evil.example:%d" % self.board.port})[0],
                         421)

    def test_pages_of_runs(self):
        ids = [self.sc.start("wf", {"n": i}, drive=False)["id"] for i in range(7)]
        seen, before = [], ""
        for _ in range(4):
            doc = self.request("GET", "/api/runs?limit=3" + ("&before=%s" % before if before else ""))[1]
            seen += [r["id"] for r in doc["runs"]]
            if not doc["next"]:
                break
            before = doc["next"]
            self.clock.advance(0)
        self.assertEqual(sorted(seen), sorted(ids))

    def test_actions_need_the_token_and_gets_change_nothing(self):
        run_id = self.sc.start("wf", {"n": 1}, drive=False)["id"]
        self.sc.tick()
        before = self.db_snapshot()
        for path in ("/", "/metrics", "/api/runs", "/api/runs/" + run_id, "/api/runs/%s/cancel" % run_id):
            self.request("GET", path)
        self.assertEqual(self.db_snapshot(), before, "a GET changed the store")
        self.assertEqual(self.request("POST", "/api/runs/%s/cancel" % run_id, b"{}")[0], 401)
        self.assertEqual(self.request("POST", "/api/runs/%s/cancel" % run_id, b"{}",
                                      {"Authorization": "Bearer wrong"})[0], 401)
        cross = dict(self.token(), Origin="http://evil.example")
        self.assertEqual(self.request("POST", "/api/runs/%s/cancel" % run_id, b"{}", cross)[0], 403)
        self.assertEqual(self.db_snapshot(), before, "a refused action changed the store")
        status, doc = self.request("POST", "/api/runs/%s/signal" % run_id, json.dumps({"name": "go", "data": 1}),
                                   self.token())
        self.assertEqual((status, doc["buffered"]), (200, True))
        status, doc = self.request("POST", "/api/runs/%s/cancel" % run_id, b"{}", self.token())
        self.assertEqual((status, doc["status"]), (200, "canceled"))
        status, doc = self.request("POST", "/api/runs/%s/retry" % run_id, b"{}", self.token())
        self.assertEqual((status, doc["status"]), (200, "pending"))
        self.assertEqual(self.request("POST", "/api/runs/%s/cancel" % run_id, b"{}", self.token())[0], 200)
        self.assertEqual(self.request("POST", "/api/runs/%s/cancel" % run_id, b"{}", self.token())[0], 409)

    def test_metrics(self):
        run_id = self.sc.start("wf", {"n": 1}, drive=False)["id"]
        self.sc.tick()
        self.sc.cancel(run_id)
        status, text = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        for line in ('tyow_runs{status="canceled"} 1', 'tyow_runs_started_total{workflow="wf"} 1',
                     'tyow_runs_canceled_total{workflow="wf"} 1', "tyow_pass_duration_seconds_count",
                     "tyow_taskyou_outbox_backlog 0", 'tyow_warm_workers{runtime="node"}', "tyow_leases_held 0"):
            self.assertIn(line, text)
        self.assertNotIn(run_id, text, "run ids must never be labels")
        self.sc.prune("0s")
        text = self.request("GET", "/metrics")[1]
        self.assertIn('tyow_runs_started_total{workflow="wf"} 1', text, "a counter went down with prune")
        if shutil.which("promtool"):
            res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

    @unittest.skipUnless(shutil.which("promtool"), "promtool is not installed (Debian's prometheus package)")
    def test_promtool_accepts_the_metrics(self):
        text = self.request("GET", "/metrics")[1]
        res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)


class Command(TempHome):
    def test_the_dashboard_command_and_a_port_in_use(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        self.write_config(extra="dashboard:\n  host: 127.0.0.1\n  port: %d\n" % port)
        self.assert_refused(["dashboard"], 1, "cannot listen on 127.0.0.1:%d for the dashboard" % port)
        p = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "dashboard", "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline()
            self.assertIn("dashboard on http://127.0.0.1:", line)
            got = int(line.split(":")[2].split("/")[0])
            conn = http.client.HTTPConnection("127.0.0.1", got, timeout=10)
            conn.request("GET", "/healthz")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        finally:
            p.terminate()
            self.assertEqual(p.wait(10), 0)
            p.stdout.close()
            p.stderr.close()

    def test_a_checkout_without_the_page_says_so(self):
        checkout = os.path.join(self.tmp, "checkout")
        shutil.copytree(os.path.join(os.path.dirname(MODULE), "runtimes"), os.path.join(checkout, "runtimes"),
                        ignore=shutil.ignore_patterns("dashboard.html"))
        module = shutil.copy(MODULE, checkout)
        res = subprocess.run([sys.executable, module, "--config", self.config_path, "dashboard", "--port", "0"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual((res.returncode, res.stdout), (1, ""))
        self.assertIn("runtimes/dashboard.html not found beside ty_openworkflow.py; copy the runtimes/ folder "
                      "with it, or use the single-file build (make dist)", res.stderr)
        self.assertEqual(len(res.stderr.strip().splitlines()), 1, res.stderr)


if __name__ == "__main__":
    unittest.main()
