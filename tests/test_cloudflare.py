"""The cloudflare adapter: the real Worker in miniflare, Cloudflare's REST API faked faithfully."""
import http.client
import json
import os
import threading
import time
import unittest

from tests.fake_cloudflare import FakeCloudflare, have_miniflare
from tests.test_contract import AdapterContract
from tests.util import TempHome, wait_for

NO_FS = "uses the filesystem or processes, which Workers do not have; the same engine runs it under exec/node"


class CloudflareCase(TempHome):
    adapter = "cloudflare"

    def setUp(self):
        super().setUp()
        self.cf = FakeCloudflare(os.path.join(self.tmp, "cf"))
        # The token comes from a command whose argv does not hold it, like `op read`.
        token_sh = os.path.join(self.tmp, "token.sh")
        with open(token_sh, "w") as f:
            f.write("printf %%s '%s'\n" % self.cf.token)
        self.adapter_config = self.cf.config("/bin/sh " + token_sh)
        self.write_config()

    def tearDown(self):
        self.cf.stop()
        super().tearDown()
        from tests.util import wait_for
        wait_for(lambda: not self.cf.leftovers(), what="the fake's miniflare processes to be gone")


@unittest.skipUnless(have_miniflare(), "miniflare is not installed: `make test` installs it from npm (or `make cf-tools`)")
class CloudflareNodeContract(AdapterContract, CloudflareCase):
    runtime = "node"
    adapter = "cloudflare"

    def shim_processes(self):
        return []  # nothing local runs a pass

    test_completed_steps_never_run_again = unittest.skip(NO_FS)(AdapterContract.test_completed_steps_never_run_again)
    test_step_retries_with_backoff_then_succeeds = unittest.skip(NO_FS)(
        AdapterContract.test_step_retries_with_backoff_then_succeeds)
    test_killed_pass_is_retried_and_committed_steps_do_not_rerun = unittest.skip(NO_FS)(
        AdapterContract.test_killed_pass_is_retried_and_committed_steps_do_not_rerun)
    test_cancel_stops_a_running_pass_and_nothing_after_counts = unittest.skip(NO_FS)(
        AdapterContract.test_cancel_stops_a_running_pass_and_nothing_after_counts)
    test_prints_never_count_as_events_and_land_in_the_log = unittest.skip(
        "console output of a Worker goes to Cloudflare's logs (wrangler tail), not the run log")(
        AdapterContract.test_prints_never_count_as_events_and_land_in_the_log)


@unittest.skipUnless(have_miniflare(), "miniflare is not installed: `make test` installs it from npm (or `make cf-tools`)")
class CloudflareWorker(CloudflareCase):
    MEMO = """async function workflow(input, { step, sleep }) {
  const a = await step("a", () => "A");
  await sleep("s1", "5s");
  const b = await step("b", (info) => { if (info.attempt < 3) throw new Error("not yet " + info.attempt); return "B"; },
                       { retry: { maxAttempts: 5, initialInterval: 1000 } });
  await sleep("s2", 5000);
  return [a, b, await step("c", () => "C")];
}
"""

    def test_memoized_steps_and_retries_in_a_worker(self):
        sc = self.sidecar()
        sc.deploy("memo", self.MEMO, adapter="cloudflare")
        run_id = sc.start("memo", {}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", ["A", "B", "C"]))
        attempts = {s["name"]: s["attempts"] for s in st["steps"] if s["kind"] == "step"}
        self.assertEqual(attempts, {"a": 1, "b": 3, "c": 1})
        started = [json.loads(e["data"])["step"] for e in sc.events(run_id) if e["type"] == "step_started"]
        self.assertEqual(started, ["a", "b", "b", "b", "c"], "a committed step ran again")

    def test_upload_is_a_module_worker_with_kv_and_a_secret(self):
        sc = self.sidecar()
        res = sc.deploy("hello", self.MEMO, adapter="cloudflare")
        self.assertTrue(res["created"])
        [upload] = self.cf.uploads
        meta = upload["metadata"]
        self.assertEqual(meta["main_module"], "worker.mjs")
        self.assertIn({"type": "kv_namespace", "name": "STATE", "namespace_id": self.cf.namespace}, meta["bindings"])
        secret = [b for b in meta["bindings"] if b["type"] == "secret_text"]
        self.assertEqual([b["name"] for b in secret], ["TYOW_TOKEN"])
        self.assertTrue(self.cf.scripts[upload["name"]].enabled)
        self.assertRegex(upload["name"], r"^tyow-hello-[0-9a-f]{12}$")
        calls = [(m, p.split("/workers/")[-1]) for m, p, s in self.cf.calls]
        self.assertIn(("PUT", "scripts/" + upload["name"]), calls)
        self.assertIn(("POST", "scripts/%s/subdomain" % upload["name"]), calls)

    def test_the_token_is_never_stored_logged_or_passed_as_an_argument(self):
        sc = self.sidecar()
        sc.deploy("hello", self.MEMO, adapter="cloudflare")
        self.drive(sc, sc.start("hello", {}, drive=False)["id"])
        dump = "\n".join(self.db_snapshot())
        self.assertNotIn(self.cf.token, dump)
        for root, _, files in os.walk(self.data_dir):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    self.assertNotIn(self.cf.token.encode(), f.read(), name)
        with open(self.config_path) as f:
            self.assertNotIn(self.cf.token, f.read())

    def test_a_bad_token_is_a_clear_error_and_stores_nothing(self):
        self.cf.token = "cf-test-" + "0" * 24  # well formed, not the account's
        before = self.db_snapshot()
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare", stdin=self.MEMO)
        self.assertEqual(code, 1)
        self.assertIn("the Cloudflare API refused the token (HTTP 403: 10000 Authentication error)", err)
        self.assertEqual(self.db_snapshot(), before)
        rows = {r["name"]: r for r in self.sidecar().adapters_report()}
        self.assertIn("refused the token", rows["cloudflare"]["reason"])

    def test_python_and_require_are_refused_at_deploy(self):
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare", "--runtime", "python",
                                  stdin="def workflow(input, ctx):\n    return 1\n")
        self.assertEqual(code, 1)
        self.assertIn("runs JavaScript workflows only", err)
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare",
                                  stdin="const fs = require('fs');\nasync function workflow() { return 1; }\n")
        self.assertEqual(code, 2)
        self.assertIn("Workers have no require()", err)

    def test_a_lost_response_is_reconciled_from_kv(self):
        sc = self.sidecar()
        sc.deploy("memo", self.MEMO, adapter="cloudflare")
        run_id = sc.start("memo", {}, drive=False)["id"]
        self.cf.cut_stream_after = 2  # step_started and step_completed of "a" arrive; the rest is lost
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping", st)
        self.assertEqual(st["passes"], 1)
        self.assertEqual([s["name"] for s in st["steps"]], ["a", "s1"])
        self.assertIn("recovered from KV", "".join(r["text"] for r in sc.logs(run_id)))
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], ["A", "B", "C"])

    def _healthz(self, name):
        conn = http.client.HTTPConnection("127.0.0.1", self.cf.port, timeout=10)
        try:
            conn.request("GET", "/__workers/%s/healthz" % name)
            return conn.getresponse().status
        finally:
            conn.close()

    def test_the_worker_refuses_a_wrong_invocation_token(self):
        sc = self.sidecar()
        sc.deploy("memo", self.MEMO, adapter="cloudflare")
        name = self.cf.uploads[0]["name"]
        wait_for(lambda: self._healthz(name) == 200, what="the new route")
        conn = http.client.HTTPConnection("127.0.0.1", self.cf.port, timeout=10)
        conn.request("POST", "/__workers/%s/" % name, body=b"{}", headers={"Authorization": "Bearer nope"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 401)
        conn.close()

    def test_cancel_aborts_the_request(self):
        sc = self.sidecar()
        sc.deploy("slow", "async function workflow(input, { step }) {\n"
                          "  await step('a', () => 1);\n"
                          "  await step('wait', () => new Promise((r) => setTimeout(r, 30000)));\n"
                          "  return await step('never', () => 2);\n}\n", adapter="cloudflare")
        run_id = sc.start("slow", {}, drive=False)["id"]
        ticker = threading.Thread(target=sc.tick)
        ticker.start()
        wait_for(lambda: any(s["name"] == "wait" for s in sc.status(run_id)["steps"]), what="the slow step")
        t0 = time.time()
        self.sidecar().cancel(run_id)
        ticker.join(15)
        self.assertFalse(ticker.is_alive())
        self.assertLess(time.time() - t0, 5)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "canceled")
        self.assertNotIn("never", [s["name"] for s in st["steps"]])


if __name__ == "__main__":
    unittest.main()
