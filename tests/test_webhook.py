"""The signed webhook: valid callbacks apply once; every bad request gets a 4xx and changes nothing."""
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests.util import MODULE, TempHome, tow, wait_for

PY_WF = "def workflow(input, ctx):\n    return ctx.step('a', lambda: 1)\n"


class WebhookCase(TempHome):
    extra_config = "webhook:\n  host: 127.0.0.1\n  read_timeout: 1s\n  max_body_bytes: 65536\n"

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar(clock=False)
        self.sc.deploy("wf", PY_WF, runtime="python")
        self.server = self.sc.webhook(port=0).start()
        self.secret = tow.webhook_secret(self.data_dir)

    def tearDown(self):
        self.server.stop()
        super().tearDown()

    def new_run(self, claim=False):
        run_id = self.sc.start("wf", {}, drive=False)["id"]
        if claim:
            [run] = [r for r in self.sc.store.claim_due("remote-test", tow.now_ms(), 100, 60000) if r["id"] == run_id]
            return run_id, run["pass_id"]
        return run_id, None

    def request(self, method="POST", path="/webhook", body=b"", headers=None, sign=True, timestamp=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        hdrs = dict(headers or {})
        if sign:
            hdrs.update(tow.sign_callback(self.secret, body, timestamp))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (json.loads(data) if data else None)
        finally:
            conn.close()


class Callbacks(WebhookCase):
    def test_events_apply_like_a_pass(self):
        run_id, pass_id = self.new_run(claim=True)
        status, reply = self.request(body={"runId": run_id, "passId": pass_id, "events": [
            {"type": "step_started", "step": "a", "attempt": 1},
            {"type": "step_completed", "step": "a", "output": {"v": 1}},
            {"type": "sleep", "step": "nap", "wake_at": tow.now_ms() + 60000},
            {"type": "suspended", "wake_at": tow.now_ms() + 60000}]})
        self.assertEqual((status, reply), (200, {"ok": True, "applied": 4}))
        st = self.sc.status(run_id)
        self.assertEqual(st["status"], "sleeping")
        self.assertEqual(st["steps"][0]["output"], {"v": 1})

    def test_a_signal_callback_is_kept_for_the_run(self):
        run_id, _ = self.new_run()
        body = {"runId": run_id, "signal": "approved", "data": {"by": "remote"}, "idempotencyKey": "cb-1"}
        status, reply = self.request(body=body)
        self.assertEqual((status, reply), (200, {"ok": True, "applied": 1}))
        self.assertEqual([(g["name"], json.loads(g["data"])) for g in self.sc.store.signals(run_id)],
                         [("approved", {"by": "remote"})])
        status, reply = self.request(body=dict(body, extra=1))  # a new body, the same key: applied once
        self.assertEqual(status, 200, reply)
        self.assertEqual(len(self.sc.store.signals(run_id)), 1)
        status, reply = self.request(body={"runId": run_id, "signal": ""})
        self.assertEqual(status, 422, reply)

    def test_completion_shape(self):
        run_id, _ = self.new_run()
        status, reply = self.request(body={"runId": run_id, "status": "completed", "output": [1, 2]})
        self.assertEqual(status, 200, reply)
        st = self.sc.status(run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", [1, 2]))
        run2, _ = self.new_run()
        status, reply = self.request(body={"runId": run2, "status": "failed", "error": "remote boom"})
        self.assertEqual(status, 200, reply)
        st = self.sc.status(run2)
        self.assertEqual((st["status"], st["error"]["message"]), ("failed", "remote boom"))

    def test_same_body_twice_changes_nothing_the_second_time(self):
        run_id, pass_id = self.new_run(claim=True)
        body = {"runId": run_id, "passId": pass_id, "events": [{"type": "step_started", "step": "a"}]}
        first = int(time.time())
        self.assertEqual(self.request(body=body, timestamp=first)[0], 200)
        before = self.db_snapshot()
        # Another signature (a second timestamp), the same body. (Taking "now - 1" here made the
        # same signature when a second passed between the two: a replay, 409.)
        status, reply = self.request(body=body, timestamp=first - 1)
        self.assertEqual((status, reply["duplicate"]), (200, True))
        self.assertEqual(self.db_snapshot(), before)
        self.assertEqual(self.sc.status(run_id)["steps"][0]["attempts"], 1)

    def test_terminal_and_canceled_runs_ignore_callbacks(self):
        run_id, pass_id = self.new_run(claim=True)
        self.sc.cancel(run_id)
        before = self.db_snapshot()
        status, reply = self.request(body={"runId": run_id, "status": "completed", "output": 1})
        self.assertEqual((status, reply["ignored"]), (200, "run is canceled"))
        self.assertEqual(self.sc.status(run_id)["status"], "canceled")
        status, reply = self.request(body={"runId": run_id, "passId": pass_id,
                                           "events": [{"type": "completed", "output": 2}]})
        self.assertEqual(reply["ignored"], "run is canceled")
        self.assertEqual(self.db_snapshot(), before)

    def test_healthz(self):
        self.assertEqual(self.request("GET", "/healthz", sign=False), (200, {"ok": True, "store": "ok",
                                                                           "version": tow.__version__}))

    def test_sign_cli_matches(self):
        body = os.path.join(self.tmp, "body.json")
        run_id, _ = self.new_run()
        with open(body, "w") as f:
            f.write(json.dumps({"runId": run_id, "status": "completed", "output": "signed by cli"}))
        code, out, err = self.cli("sign", "-f", body, "--json")
        self.assertEqual(code, 0, err)
        headers = json.loads(out)
        self.assertNotIn(self.secret.decode(), out)
        with open(body, "rb") as f:
            status, reply = self.request(body=f.read(), headers=headers, sign=False)
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.sc.status(run_id)["output"], "signed by cli")

    def test_secret_file_is_private(self):
        mode = os.stat(os.path.join(self.data_dir, tow.WEBHOOK_SECRET_FILE)).st_mode & 0o777
        self.assertEqual(mode, 0o600)


class BadRequests(WebhookCase):
    def setUp(self):
        super().setUp()
        self.run_id, self.pass_id = self.new_run(claim=True)
        self.good = {"runId": self.run_id, "status": "completed", "output": 1}

    def check(self, expected_status, fragment, **kw):
        before = self.db_snapshot()
        status, reply = self.request(**kw)
        self.assertEqual(status, expected_status, reply)
        if fragment:
            self.assertIn(fragment, reply["error"])
        self.assertEqual(self.db_snapshot(), before, "a bad request changed the store")
        return reply

    def test_each_bad_request(self):
        good = json.dumps(self.good).encode()
        self.check(401, "unsigned", body=good, sign=False)
        self.check(401, "bad signature", body=good, sign=False,
                   headers={tow.TIMESTAMP_HEADER: str(int(time.time())), tow.SIGNATURE_HEADER: "v1=" + "0" * 64})
        self.check(401, "stale timestamp", body=good, timestamp=int(time.time()) - 3600)
        self.check(401, "stale timestamp", body=good, timestamp=int(time.time()) + 3600)
        self.check(401, "bad X-Openworkflow-Timestamp", body=good, sign=False,
                   headers={tow.TIMESTAMP_HEADER: "yesterday", tow.SIGNATURE_HEADER: "v1=00"})
        self.check(404, "callbacks go to /webhook", path="/other", body=good)
        self.check(405, "use POST", method="GET", path="/webhook", sign=False)
        self.check(405, "use POST", method="PUT", body=good)
        self.check(400, "not JSON", body=b"{nope")
        self.check(400, "not JSON", body=b"\xff\xfe")
        self.check(422, "must be a JSON object", body=b"[1]")
        self.check(422, "runId", body={"status": "completed"})
        self.check(422, "status must be", body={"runId": self.run_id, "status": "done"})
        self.check(422, "needs an error", body={"runId": self.run_id, "status": "failed"})
        self.check(422, "events[0] is not a pass event", body={"runId": self.run_id, "passId": self.pass_id,
                                                               "events": [{"type": "explode"}]})
        self.check(422, "events must be a list", body={"runId": self.run_id, "passId": self.pass_id, "events": []})
        self.check(404, "no run", body={"runId": "run_nope", "status": "completed"})

    def test_replayed_signature(self):
        body = json.dumps({"runId": self.run_id, "passId": self.pass_id,
                           "events": [{"type": "step_started", "step": "a"}]}).encode()
        headers = tow.sign_callback(self.secret, body)
        self.assertEqual(self.request(body=body, headers=headers, sign=False)[0], 200)
        self.check(409, "replayed", body=body, headers=headers, sign=False)

    def test_oversized_body_is_refused_unread(self):
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
        try:
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
            data = sock.recv(4096)
        finally:
            sock.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 413"), data[:40])

    def test_missing_length(self):
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
        try:
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n\r\n")
            data = sock.recv(4096)
        finally:
            sock.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 411"), data[:40])

    def test_slow_partial_body_times_out_and_the_server_keeps_serving(self):
        before = self.db_snapshot()
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        try:
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"runId\":")
            t0 = time.time()
            self.assertEqual(self.request("GET", "/healthz", sign=False)[0], 200)  # not blocked meanwhile
            data = sock.recv(4096)
            self.assertLess(time.time() - t0, 5)
        finally:
            sock.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data[:40])
        self.assertEqual(self.db_snapshot(), before)

    def trickle(self, first, then, seconds):
        """Send ``first``, then one byte of ``then`` every 0.2 s; returns what came back and when."""
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        t0 = time.time()
        data = b""
        try:
            sock.sendall(first)
            for i in range(int(seconds / 0.2)):
                try:
                    sock.sendall(then[i:i + 1] or b"x")
                except OSError:
                    break
                time.sleep(0.2)
                sock.setblocking(False)
                try:
                    data += sock.recv(4096)
                except (BlockingIOError, OSError):
                    pass
                sock.setblocking(True)
                if data:
                    break
        finally:
            sock.close()
        return data, time.time() - t0

    def test_trickled_headers_are_cut_off(self):
        before = self.db_snapshot()
        data, took = self.trickle(b"POST /webhook HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100, 6)
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data[:40])
        self.assertLess(took, 4)  # read_timeout is 1 s here
        self.assertEqual(self.db_snapshot(), before)

    def test_trickled_body_is_cut_off(self):
        before = self.db_snapshot()
        data, took = self.trickle(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
                                  b"{" * 1000, 6)
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data[:40])
        self.assertLess(took, 4)
        self.assertEqual(self.db_snapshot(), before)

    def test_non_finite_numbers_are_refused(self):
        for body in (b'{"runId": "%s", "status": "completed", "output": NaN}' % self.run_id.encode(),
                     b'{"runId": "%s", "passId": "%s", "events": [{"type": "sleep", "step": "s", "wake_at": 1e400}]}'
                     % (self.run_id.encode(), self.pass_id.encode()),
                     b'{"runId": "%s", "passId": "%s", "events": [{"type": "suspended", "wake_at": 1e300}]}'
                     % (self.run_id.encode(), self.pass_id.encode())):
            with self.subTest(body=body):
                reply = self.check(400 if b"NaN" in body else 422, None, body=body)
                self.assertFalse(reply["ok"])

    def test_unexpected_error_is_500_without_details(self):
        original = self.server.apply

        def explode(headers, body):
            raise RuntimeError("secret internals /etc/passwd")

        self.server.apply = explode
        try:
            reply = self.check(500, "internal error", body=self.good)
        finally:
            self.server.apply = original
        self.assertNotIn("passwd", json.dumps(reply))
        self.assertEqual(self.request(body=self.good)[0], 200)

    def test_fuzz_thousands_of_forged_and_malformed_requests(self):
        rnd = random.Random(1234)
        before = self.db_snapshot()
        now = int(time.time())
        bodies = [b"", b"{}", b"[]", b"null", b"\x00" * 50, b"{" * 500, json.dumps(self.good).encode(),
                  json.dumps({"runId": self.run_id, "passId": self.pass_id, "events": [{"type": "completed"}]}).encode(),
                  json.dumps({"runId": self.run_id * 50, "status": "completed"}).encode()]
        counts = {}
        for i in range(2500):
            body = rnd.choice(bodies)
            if rnd.random() < 0.3:
                body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 200)))
            headers = {}
            mode = rnd.randint(0, 6)
            if mode == 1:
                headers = {tow.TIMESTAMP_HEADER: str(now), tow.SIGNATURE_HEADER: "v1=" + "%064x" % rnd.getrandbits(256)}
            elif mode == 2:
                headers = tow.sign_callback(b"wrong secret", body)
            elif mode == 3:
                headers = tow.sign_callback(self.secret, body + b" ")
            elif mode == 4:
                headers = tow.sign_callback(self.secret, body, now - rnd.choice([400, 10 ** 6]))
            elif mode == 5:
                headers = {tow.TIMESTAMP_HEADER: rnd.choice(["", "-1", "1e9", "9" * 30]), tow.SIGNATURE_HEADER: "x"}
            elif mode == 6 and b"completed" not in body:
                headers = tow.sign_callback(self.secret, body)  # signed, but malformed
            path = rnd.choice(["/webhook", "/webhook", "/", "/webhook/../x", "/healthz?x", "/%00"])
            method = rnd.choice(["POST", "POST", "POST", "PUT", "DELETE", "PATCH"])
            if mode == 6 and b"completed" in body:
                method = "PATCH"
            status, _ = self.request(method, path, body=body, headers=headers, sign=False)
            counts[status] = counts.get(status, 0) + 1
            self.assertTrue(400 <= status < 500, (status, method, path, body[:60], headers))
        self.assertEqual(self.db_snapshot(), before, "the fuzz changed the store")
        self.assertEqual(self.request("GET", "/healthz", sign=False)[0], 200)
        self.assertGreater(len(counts), 4, counts)


class Load(WebhookCase):
    extra_config = ("webhook:\n  host: 127.0.0.1\n  read_timeout: 5s\n"
                    "taskyou:\n  auto_create_tasks: true\n")

    def write_config(self, extra=None):
        # auto_create_tasks is set above; the template's own `taskyou:` block would duplicate it.
        super().write_config(extra)
        with open(self.config_path) as f:
            text = f.read().replace("taskyou:\n  auto_create_tasks: false\n", "", 1)
        with open(self.config_path, "w") as f:
            f.write(text)

    def test_many_concurrent_callbacks_nothing_lost_nothing_twice(self):
        runs = [self.new_run()[0] for _ in range(150)]
        errors = []
        base = int(time.time())

        def send(chunk):
            for r in chunk:
                for attempt in range(2):  # every callback arrives twice, freshly signed
                    status, reply = self.request(body={"runId": r, "status": "completed", "output": r},
                                                 timestamp=base - 7 * attempt)
                    if status != 200:
                        errors.append((r, status, reply))

        threads = [threading.Thread(target=send, args=(runs[i::10],)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        for r in runs:
            st = self.sc.status(r)
            self.assertEqual((st["status"], st["output"]), ("completed", r))
            self.assertEqual([e["type"] for e in self.sc.events(r)].count("completed"), 1)
            kinds = [o["kind"] for o in self.sc.store.outbox_for_run(r)]
            self.assertEqual(kinds, ["create", "completed"])


class ServeStartsTheWebhook(TempHome):
    extra_config = "webhook:\n  enabled: true\n  host: 127.0.0.1\n  port: 0\n"

    def test_serve_listens_and_stops(self):
        log_path = os.path.join(self.tmp, "serve.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, MODULE, "--config", self.config_path, "serve"],
                                    stdout=subprocess.DEVNULL, stderr=log)
        try:
            def port():
                with open(log_path) as f:
                    m = re.search(r"webhook listening on http://127\.0\.0\.1:(\d+)/webhook", f.read())
                return m and int(m.group(1))
            p = wait_for(port, what="the webhook to listen")
            conn = http.client.HTTPConnection("127.0.0.1", p, timeout=5)
            conn.request("GET", "/healthz")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        finally:
            proc.terminate()
            self.assertEqual(proc.wait(20), 0)


if __name__ == "__main__":
    unittest.main()
