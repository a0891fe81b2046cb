"""The Worker's runtime limits, each turned up where it bites, and named truthfully when it does.

One class per limit of tests/fake_cloudflare.py (where each is cited): CPU time per
request, runtime restarts, KV delays past a minute, KV operations per invocation,
one write a second per key, routes that still flap after readiness, the Free
plan's request and subrequest limits, KV errors while a lost response is
reconciled, and the fake's own measures (metadata as the runtime sizes it).
"""
import http.server
import json
import os
import socket
import threading
import time
import unittest

from tests.fake_cloudflare import FakeCloudflare, Platform
from tests.test_cloudflare_platform import STEPS, PlatformCase, failures, started
from tests.util import TempHome, tow, wait_for

CRUNCH = """async function workflow(input, { step }) {
  const nap = (ms) => new Promise((r) => setTimeout(r, ms, "A"));
  const a = await step("a", () => (input.ms ? nap(input.ms) : "A"));
  if (input.warm) return a;
  const n = await step("crunch", () => {
    let x = 0;
    for (let i = 0; i < 4e8; i++) x = (x + i) % 7919;
    return x;
  });
  return [a, n];
}
"""

LONG = """async function workflow(input, { step }) {
  const a = await step("a", () => "A");
  const b = await step("long", () => new Promise((r) => setTimeout(() => r("B"), 2500)));
  return [a, b];
}
"""


FETCHES = """async function workflow(input, { step }) {
  return await step("fetch", async () => {
    for (let i = 0; i < 51; i++) await (await fetch(input.url)).text();
    return "fetched";
  }, { retry: { maxAttempts: 1 } });
}
"""


def many_steps(n, ms):
    """A workflow of ``n`` steps of ``ms`` each (an event pair each), then a nap."""
    return ("async function workflow(input, { step, sleep }) {\n"
            "  for (let i = 0; i < %d; i++) {\n"
            "    await step('s' + i, () => new Promise((r) => setTimeout(() => r(i), %d)));\n"
            "  }\n"
            "  await sleep('nap', '5s');\n"
            "  return 'done';\n}\n" % (n, ms))


class LimitCase(PlatformCase):
    """A PlatformCase whose recovery window has less margin: its passes end by a limit, and
    the window is waited out."""

    def setUp(self):
        super().setUp()
        token_cmd = "/bin/sh " + os.path.join(self.tmp, "token.sh")
        self.adapter_config = self.cf.config(token_cmd, self.cf_extra, margin_s=1.0)
        self.write_config()


def journal(sc, run_id, kind):
    return [json.loads(e["data"] or "{}") for e in sc.events(run_id) if e["type"] == kind]


def log_text(sc, run_id):
    return "".join(r["text"] for r in sc.logs(run_id))


class CpuTime(LimitCase):
    platform = Platform.scaled(plan="free", waituntil_s=1.0, kv_delay_s=0.5)

    def out_of_cpu(self, sc, ms):
        """Drive a run that runs out of CPU time after its first step's ``ms``: its error."""
        run_id = sc.start("crunch", {"ms": ms}, drive=False)["id"]
        st = self.drive(sc, run_id, max_rounds=6)
        self.assertEqual(st["status"], "failed", st)
        message = st["error"]["message"]
        self.assertNotIn("\n", message)
        for words in ("CPU time limit", "Workers Free: 10 ms", "adapters.cloudflare.cpu_ms",
                      "split the work", "3 times at the same point"):
            self.assertIn(words, message)
        self.assertNotIn("30 s once its caller is gone", message)
        self.assertLessEqual(st["passes"], 4, "the same cut was retried past its bound")
        return run_id, message

    def test_a_pass_out_of_cpu_on_the_free_plan_ends_with_the_limit_and_its_fix_named(self):
        sc = self.sidecar()
        sc.deploy("crunch", CRUNCH, adapter="cloudflare")
        # Warm the Worker's isolate first (its code compiled), as a busy Worker's is.
        warm = self.drive(sc, sc.start("crunch", {"warm": True}, drive=False)["id"])
        self.assertEqual(warm["output"], "A")
        # Its response started (the first step waits on a timer): the stream is cut mid-way, and
        # KV shows no sign of the Worker past it. (What the step's end and the busy step said
        # in the same turn of its event loop never left the Worker.)
        run_id, message = self.out_of_cpu(sc, 50)
        self.assertIn("the Worker was ended after its event 1 (step_started 'a')", message)
        released = [r["message"] for r in journal(sc, run_id, "released")]
        self.assertTrue(any("not counted" in m for m in released), released)
        # All in one turn of its event loop: the Worker had not answered yet (error 1102).
        run_id, message = self.out_of_cpu(sc, 0)
        self.assertIn("Cloudflare ended the Worker before it answered (error 1102)", message)
        self.assertTrue(self.cf.outcomes)
        self.assertTrue(all(o["outcome"] == "exceededCpu" and o["limit_ms"] == 10
                            for o in self.cf.outcomes), self.cf.outcomes)


class RuntimeRestart(LimitCase):
    platform = Platform.scaled(waituntil_s=1.0, kv_delay_s=0.5)

    def test_a_pass_cut_by_a_runtime_restart_completes_without_a_charged_attempt(self):
        sc = self.sidecar()
        sc.deploy("long", LONG, adapter="cloudflare")
        run_id = sc.start("long", {}, drive=False)["id"]
        ticker = threading.Thread(target=sc.tick)
        ticker.start()
        wait_for(lambda: "long" in [s["name"] for s in sc.status(run_id)["steps"]],
                 what="the long step")
        self.cf.restart_runtime(grace_s=0.3)  # the old process ends mid-step, 0.3 s on
        ticker.join(30)
        self.assertIn("a runtime restart ended it", [k[2] for k in self.cf.kills])
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", ["A", "B"]))
        attempts = {s["name"]: s["attempts"] for s in st["steps"]}
        self.assertEqual(attempts, {"a": 1, "long": 1}, "the cut was charged to the step")
        self.assertEqual(started(sc, run_id), ["a", "long", "long"])
        self.assertEqual(failures(sc, run_id), 0)
        released = [r["message"] for r in journal(sc, run_id, "released")]
        self.assertEqual(len(released), 1, released)
        self.assertIn("the Worker was ended after its event 3 (step_started 'long')", released[0])
        self.assertIn("not counted", released[0])


class KvLaterThanAMinute(LimitCase):
    platform = Platform.scaled(waituntil_s=2.5, kv_delay_s=0.3)

    def test_a_copy_later_than_the_window_is_waited_for_while_later_ones_show(self):
        sc = self.sidecar()
        window_s = sc.config["adapters.cloudflare.recovery_window"] / 1000.0
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        # The second copy (from event 2, which the cut stream lost) shows after the window.
        self.cf.kv_late_keys = {":000002": window_s + 1.0}
        self.cf.cut_stream_after = 1
        t0 = time.time()
        sc.tick()
        self.assertGreater(time.time() - t0, window_s)
        self.assertIn("recovered from KV", log_text(sc, run_id))
        st = self.drive(sc, run_id)
        self.assertEqual((st["output"], failures(sc, run_id)), (["A", "B", "C", "D", "E"], 0))
        self.assertEqual(started(sc, run_id), ["a", "b", "c", "d", "e"], "a lost pass was retried")


class KvOperationsPerInvocation(LimitCase):
    platform = Platform.scaled(waituntil_s=1.0, kv_delay_s=0.3, kv_ops_per_invocation=2)

    def test_the_platforms_cap_stops_the_copies_cleanly_and_a_later_loss_says_so(self):
        sc = self.sidecar()
        sc.deploy("many", many_steps(8, 400), adapter="cloudflare")
        run_id = sc.start("many", {}, drive=False)["id"]
        self.cf.cut_stream_after = 14  # 7 steps' events: past the third copy (refused, ~2 s in)
        sc.tick()
        self.assertEqual(self.calls("GET", "/keys"), [], "KV was searched for what it cannot hold")
        st = sc.status(run_id)
        reason = st["last_pass"]["reason"]
        self.assertIn("Too many API requests by single Worker invocation", reason)
        self.assertIn("allows 1000 per invocation", reason)
        self.assertNotIn("30 s once its caller is gone", reason)
        self.assertIn("KV refused more operations in this invocation", log_text(sc, run_id))
        self.assertEqual(self.drive(sc, run_id)["output"], "done")

    def test_the_workers_own_budget_holds_the_copies_and_finishes_them_at_the_end(self):
        self.cf.platform.kv_ops_per_invocation = 9
        sc = self.sidecar()
        sc.adapter("cloudflare").KV_OPS_PER_INVOCATION = 9  # 5 copies, 4 kept for the end
        sc.deploy("many", many_steps(10, 500), adapter="cloudflare")
        run_id = sc.start("many", {}, drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping", st)
        text = log_text(sc, run_id)
        self.assertIn("holds its copies of events in KV", text)
        self.assertNotIn("stop after seq", text, "the Worker ran into the platform's cap")
        # Every event of the pass is in KV all the same, its end included, within the budget.
        [pass_id] = {e["pass_id"] for e in sc.events(run_id) if e["type"] == "suspended"}
        adapter = sc.adapter("cloudflare")
        wait_for(lambda: (adapter.kv_events(pass_id)[-1:] or ["{}"])[0].find('"suspended"') > 0,
                 what="the pass's end in KV")
        seqs = [json.loads(line)["seq"] for line in adapter.kv_events(pass_id)]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        self.assertEqual(len(seqs), 22)  # 10 steps, the nap, the end
        self.assertLessEqual(self.cf.kv_usage["write"], 9)


class OneWriteASecondPerKey(LimitCase):
    platform = Platform.scaled(waituntil_s=2.5, kv_delay_s=0.3)

    def test_a_failed_copy_is_retried_without_meeting_the_keys_limit(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        # The copy holding the pass's end fails once, unstored: its retry must land.
        self.cf.kv_put_errors, self.cf.kv_put_error_match = 1, '"type":"suspended"'
        self.cf.cut_stream_after = 1
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], failures(sc, run_id)), ("sleeping", 0), st)
        self.assertEqual(self.cf.kv_put_errors, 0, "the injected failure was not met")
        self.assertEqual(self.cf.kv_rate_limited, 0, "a retry came within a second on its key")
        self.assertEqual(self.drive(sc, run_id)["output"], ["A", "B", "C", "D", "E"])


class RouteFlaps(LimitCase):
    platform = Platform.scaled(route_flap_statuses=(502, 503, 530))

    def test_a_5xx_from_a_fresh_route_after_readiness_costs_no_attempt(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        self.cf.route_flaps = 3
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], ["A", "B", "C", "D", "E"])
        self.assertEqual(failures(sc, run_id), 0)
        flapped = [r[3] for r in self.cf.worker_requests if r[1] == "POST" and r[3] != 200]
        self.assertEqual(len(flapped), 3)
        self.assertTrue(set(flapped) <= {502, 503, 530}, flapped)
        self.assertEqual(len(self.calls("PUT")), 1, "a flap uploaded the Worker again")

    def test_a_route_unreachable_before_the_pass_is_sent_costs_no_attempt(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        self.drive(sc, sc.start("steps", {}, drive=False)["id"])  # the route answered once
        with socket.socket() as s:  # a port nothing listens on: the next pass cannot connect
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        self.adapter_config = self.adapter_config.replace(":%d/__workers" % self.cf.port,
                                                          ":%d/__workers" % closed)
        self.write_config()
        sc = self.sidecar()
        run_id = sc.start("steps", {}, drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], failures(sc, run_id), st["steps"]), ("pending", 0, []))
        self.assertIn("could not be reached", st["last_pass"]["reason"])
        self.assertIn("its route is still spreading", st["last_pass"]["reason"])


class FreePlanRequests(LimitCase):
    platform = Platform.scaled(plan="free", cpu_meter=False)

    def test_more_than_50_subrequests_in_a_pass_are_named(self):
        sc = self.sidecar()
        sc.deploy("fetches", FETCHES, adapter="cloudflare")
        url = "http://127.0.0.1:%d/__echo" % self.cf.port
        run_id = sc.start("fetches", {"url": url}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "failed", st)
        message = st["error"]["message"]
        self.assertIn("Too many subrequests.", message)
        self.assertIn("50 subrequests, fetch() calls, per invocation on the Workers Free plan",
                      message)

    def test_the_daily_and_the_per_minute_request_limits_give_the_pass_back_named(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        sc.tick()
        self.assertEqual(sc.status(run_id)["status"], "sleeping")
        self.clock.advance(6000)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        self.cf.platform.requests_per_day = self.cf.worker_day[day]  # the day's requests are used
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], failures(sc, run_id)), ("pending", 0), st)
        self.assertIn("Cloudflare error 1027", st["last_pass"]["reason"])
        self.assertIn("100,000 a day, reset at 00:00 UTC", st["last_pass"]["reason"])
        self.assertGreater(st["available_at"], self.clock() + 60000)
        self.cf.platform.requests_per_day = None
        self.cf.platform.requests_per_minute = len(self.cf.worker_minute)  # this minute's are used
        self.clock.advance_to(st["available_at"])
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], failures(sc, run_id)), ("pending", 0), st)
        self.assertIn("Cloudflare error 1015", st["last_pass"]["reason"])
        self.assertIn("1,000 a minute", st["last_pass"]["reason"])
        self.cf.platform.requests_per_minute = None
        st = self.drive(sc, run_id)
        self.assertEqual((st["output"], failures(sc, run_id)), (["A", "B", "C", "D", "E"], 0))


class _Cut(http.server.BaseHTTPRequestHandler):
    """A Worker whose response breaks off after its first event."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        line = json.dumps({"type": "step_started", "pass": doc["pass_id"], "step": "a", "seq": 1})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Content-Length", "100000")  # more than comes: the stream is cut
        self.end_headers()
        self.wfile.write(line.encode() + b"\n")
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


class _KvAnswers:
    """The adapter's side of reconciling, with KV answering as a test says (errors or copies)."""

    KV_OPS_PER_INVOCATION = 1000

    def __init__(self, answers, tmp):
        self.answers, self.looks, self.tmp = list(answers), 0, tmp
        self.settings = {"heartbeat": 20000, "recovery_window": 1500, "cpu_ms": 0}

    def cfg(self, key):
        return self.settings[key]

    def invocation_secret(self):
        return b"secret"

    def forget(self, version):
        pass

    def kv_events(self, pass_id, after_seq=0, stop=None):
        """The lines KV shows (an error raised as asked); kv_copy's older form."""
        self.looks += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def kv_copy(self, pass_id, after_seq=0, stop=None):
        lines = self.kv_events(pass_id, after_seq, stop)
        return tow.KvCopy(lines, after_seq + len(lines), False, False, False)


class ReconcileMeetsKvErrors(TempHome):
    """HttpExecution._reconcile once met a KV error other than 401/403/404 with a TypeError (a
    tuple & a set), and the run failed as "the sidecar could not record this run's pass"."""

    def setUp(self):
        super().setUp()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Cut)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()
        super().tearDown()

    def lost_pass(self, answers):
        adapter = _KvAnswers(answers, self.tmp)
        doc = {"pass_id": "p1", "run_id": "r1"}
        spec = tow.PassSpec(doc, {"runtime": "node", "workflow_id": "w", "code": ""})
        url = "http://127.0.0.1:%d/" % self.server.server_address[1]
        execution = tow.HttpExecution(adapter, url, spec, 30000)
        lines = list(execution.lines())
        return execution, adapter, lines, execution.finish()

    def test_a_kv_error_that_will_not_pass_ends_the_search_and_is_named(self):
        for status, code in ((400, 10013), (429, 10048)):
            with self.subTest(status=status):
                refused = tow.CloudflareError("Cloudflare API GET keys failed (HTTP %d)" % status,
                                              status, (code,), "HTTP %d" % status)
                execution, adapter, lines, how = self.lost_pass([refused])
                self.assertEqual(adapter.looks, 1)
                self.assertEqual(len(lines), 1)
                self.assertIn("could not be read (Cloudflare API GET keys failed (HTTP %d))"
                              % status, how)
                self.assertIsNone(execution.platform_end)

    def test_a_kv_error_that_may_pass_is_looked_past_and_the_events_recovered(self):
        ended = json.dumps({"type": "completed", "pass": "p1", "output": 1, "seq": 2}) + "\n"
        for status, code in ((502, 10013), (429, 971)):
            with self.subTest(status=status):
                busy = tow.CloudflareError("Cloudflare API GET keys failed (HTTP %d)" % status,
                                           status, (code,), "HTTP %d" % status)
                execution, adapter, lines, how = self.lost_pass([busy, [ended]])
                self.assertEqual(adapter.looks, 2)
                self.assertEqual(lines[-1], ended)
                self.assertTrue(execution.saw_terminal)
                self.assertIn("HTTP %d" % status, execution.log_text)


class TheFakeMeasuresAsThePlatform(unittest.TestCase):
    def setUp(self):
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="tyow-fake-")
        self.fakes = []

    def tearDown(self):
        import shutil
        for fake in self.fakes:
            fake.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def fake(self, platform):
        fake = FakeCloudflare(os.path.join(self.tmp, "cf%d" % len(self.fakes)), platform=platform)
        self.fakes.append(fake)
        return fake

    def test_metadata_is_sized_as_json_stringify_makes_it(self):
        def js_json_bytes(value):  # JSON.stringify's text in UTF-8: compact, non-ASCII as is
            return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())

        fake = self.fake(Platform.kind())
        text = "é" * 500  # 2 bytes each in UTF-8, 6 as Python's default \\u00e9
        fits = {"last": 1, "v": text + "x" * (1024 - js_json_bytes({"last": 1, "v": text}))}
        self.assertEqual(js_json_bytes(fits), 1024)
        self.assertGreater(len(json.dumps(fits).encode()), 1024)
        put = {"key": "k", "value": "v", "expirationTtl": 60, "metadata": fits}
        self.assertEqual(fake.handle_kv(fake.namespace, "put", put), {"result": None})
        over = dict(fits, v=fits["v"] + "x")
        answer = fake.handle_kv(fake.namespace, "put", dict(put, key="k2", metadata=over))
        self.assertEqual(answer, {"error": "KV PUT failed: 413 Metadata length of 1025 exceeds "
                                           "limit of 1024."})

    def test_kv_writes_sometimes_take_more_than_a_minute_to_show(self):
        fake = self.fake(Platform(seed=3))
        ns = fake.kv[fake.namespace]
        delays = []
        for i in range(4000):
            before = time.time()
            ns.write("k%d" % i, "v", None, None)
            delays.append(ns.versions["k%d" % i][0][0] - before)  # when REST reads see it
        late = [d for d in delays if d > 60]
        self.assertTrue(50 < len(late) < 400, len(late))
        self.assertLessEqual(max(delays), 120)


if __name__ == "__main__":
    unittest.main()
