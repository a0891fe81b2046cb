"""The cloudflare adapter against the platform as it behaves: late KV, lost responses, limits, caps, errors.

Each test turns one of the fake's platform behaviours (tests/fake_cloudflare.py,
where each is cited) up to where it bites, and checks that runs still end as
they would on a kind platform: every committed step ran once, nothing skipped.
"""
import json
import os
import time
import unittest

from tests.fake_cloudflare import FakeCloudflare, Platform, have_miniflare
from tests.util import TempHome, tow

STEPS = """async function workflow(input, { step, sleep }) {
  const out = [];
  for (const name of ["a", "b", "c", "d"]) {
    out.push(await step(name, () => new Promise((r) => setTimeout(() => r(name.toUpperCase()), 400))));
  }
  await sleep("nap", "5s");
  out.push(await step("e", () => "E"));
  return out;
}
"""

SLOW = """async function workflow(input, { step }) {
  const a = await step("a", () => "A");
  const slow = await step("slow", async (info) => {
    if (info.attempt === 1) await new Promise((r) => setTimeout(r, 6000));
    return "S" + info.attempt;
  });
  return [a, slow];
}
"""


def started(sc, run_id):
    return [json.loads(e["data"])["step"] for e in sc.events(run_id) if e["type"] == "step_started"]


def failures(sc, run_id):
    return sc.store.query_one("SELECT pass_failures FROM runs WHERE id = ?", (run_id,))["pass_failures"]


@unittest.skipUnless(have_miniflare(), "miniflare is not installed: `make test` installs it from npm (or `make cf-tools`)")
class PlatformCase(TempHome):
    platform = None  # Platform.scaled() unless a test class says otherwise
    cf_extra = ""

    def setUp(self):
        super().setUp()
        self.cf = FakeCloudflare(os.path.join(self.tmp, "cf"), platform=self.platform or Platform.scaled())
        token_sh = os.path.join(self.tmp, "token.sh")
        with open(token_sh, "w") as f:
            f.write("printf %%s \"$(cat '%s')\"\n" % os.path.join(self.tmp, "token"))
        self.set_token(self.cf.token)
        self.adapter_config = self.cf.config("/bin/sh " + token_sh, self.cf_extra)
        self.write_config()

    def set_token(self, token):
        with open(os.path.join(self.tmp, "token"), "w") as f:
            f.write(token)

    def tearDown(self):
        self.cf.stop()
        super().tearDown()
        from tests.util import wait_for
        wait_for(lambda: not self.cf.leftovers(), what="the fake's miniflare processes to be gone")

    def calls(self, method=None, part=""):
        return [c for c in self.cf.calls if (method is None or c[0] == method) and part in c[1]]


class LateKv(PlatformCase):
    platform = Platform.scaled(kv_delay_s=3.0, seed=7)

    def test_a_lost_response_is_recovered_in_order_from_late_out_of_order_kv(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        self.cf.cut_stream_after = 1  # only step_started of "a" arrives on the stream
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping", st)
        self.assertEqual([s["name"] for s in st["steps"]], ["a", "b", "c", "d", "nap"], "a late KV key was skipped")
        self.assertIn("recovered from KV", "".join(r["text"] for r in sc.logs(run_id)))
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], ["A", "B", "C", "D", "E"])
        self.assertEqual(started(sc, run_id), ["a", "b", "c", "d", "e"], "a committed step ran again")
        # The copies were grouped: fewer KV writes than events.
        self.assertLess(self.cf.kv_usage["write"], len(sc.events(run_id)))

    def test_lists_are_followed_page_by_page_through_empty_pages(self):
        sc = self.sidecar()
        adapter = sc.adapter("cloudflare")
        ns = self.cf.kv[self.cf.namespace]
        lines = [json.dumps({"type": "step_started", "pass": "p1", "step": "s%d" % i, "seq": i}) for i in range(1, 1301)]
        for i, line in enumerate(lines, 1):
            ns.versions["ev:p1:%06d" % i] = [(0, line, {"last": i, "v": line}, None)]
        got = adapter.kv_events("p1", after_seq=0)
        self.assertEqual(len(got), 1300)
        self.assertGreater(len(self.calls("GET", "/keys")), 2, "more than one page was read")


class KilledAfterDisconnect(PlatformCase):
    platform = Platform.scaled(waituntil_s=2.0, kv_delay_s=0.5)

    def test_a_pass_that_outlives_its_lost_response_is_retried_and_says_why(self):
        sc = self.sidecar()
        sc.deploy("slow", SLOW, adapter="cloudflare")
        run_id = sc.start("slow", {}, drive=False)["id"]
        self.cf.cut_stream_after = 2  # a's two events arrive; the response is lost at slow's start
        t0 = time.time()
        sc.tick()
        st = sc.status(run_id)
        self.assertLess(time.time() - t0, 30, "the recovery window was not bounded")
        self.assertTrue(self.cf.kills, "the fake did not stop the Worker 30 s (scaled) after the disconnect")
        self.assertIn("runs at most 30 s once its caller is gone", st["last_pass"]["reason"])
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], ["A", "S2"])
        self.assertEqual(started(sc, run_id), ["a", "slow", "slow"], "step a ran again")

    def test_a_stalled_stream_is_noticed_by_its_missing_heartbeats(self):
        self.adapter_config = self.adapter_config + "    heartbeat: 200ms\n"
        self.write_config()
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        self.cf.stall_stream_after = 2
        t0 = time.time()
        sc.tick()
        self.assertLess(time.time() - t0, 25)
        st = sc.status(run_id)
        self.assertEqual(st["status"], "sleeping", st)
        self.assertIn("not even a heartbeat", "".join(r["text"] for r in sc.logs(run_id)))
        self.assertEqual(self.drive(sc, run_id)["output"], ["A", "B", "C", "D", "E"])

    def test_heartbeats_keep_a_quiet_pass_alive_and_never_reach_the_events_or_log(self):
        self.adapter_config = self.adapter_config + "    heartbeat: 200ms\n"
        self.write_config()
        sc = self.sidecar()
        sc.deploy("quiet", "async function workflow(input, { step }) {\n"
                           "  return await step('q', () => new Promise((r) => setTimeout(() => r(1), 7000)));\n}\n",
                  adapter="cloudflare")
        run_id = sc.start("quiet", {}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual((st["status"], st["output"], st["passes"]), ("completed", 1, 1))
        self.assertNotIn("heartbeat", json.dumps(sc.events(run_id)) + json.dumps(sc.logs(run_id)))


class RateLimited(PlatformCase):
    platform = Platform.scaled(rate_limit=5, rate_window_s=60.0, rate_block_s=2.0)

    def test_a_429_blocks_every_call_for_its_retry_after_then_all_goes_on(self):
        sc = self.sidecar()
        t0 = time.time()
        for i in range(3):  # 3 calls each: the subdomain once, then PUT + POST per workflow
            sc.deploy("w%d" % i, STEPS.replace("nap", "nap%d" % i), adapter="cloudflare")
        limited = [c for c in self.cf.calls if c[2] == 429]
        self.assertEqual(len(limited), 1, "calls went on during the block: %s" % self.cf.calls)
        self.assertGreaterEqual(time.time() - t0, 2.0)
        self.assertEqual(len(self.cf.scripts), 3)

    def test_a_block_longer_than_the_patience_is_a_clear_error_and_stores_nothing(self):
        self.cf.platform.rate_block_s = 600.0
        self.cf.platform.rate_limit = 1
        before = self.db_snapshot()
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare", stdin=STEPS)
        self.assertEqual(code, 1)
        self.assertIn("rate-limiting this account", err)
        self.assertIn("calls resume in", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(self.db_snapshot(), before)


class TransientErrors(PlatformCase):
    def test_5xx_and_429_answers_are_retried_with_backoff(self):
        self.cf.fail_next.extend([("PUT", "/workers/scripts/", 503, None), ("POST", "/subdomain", 429, 1),
                                  ("PUT", "/workers/scripts/", 502, None)])
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        self.assertEqual(len(self.cf.scripts), 1)
        self.assertEqual([c[2] for c in self.calls("PUT")], [503, 502, 200])
        run_id = sc.start("steps", {}, drive=False)["id"]
        self.assertEqual(self.drive(sc, run_id)["status"], "completed")


    def test_a_429_that_says_retry_at_once_is_still_paced(self):
        self.cf.fail_next.extend([("PUT", "/workers/scripts/", 429, 0), ("PUT", "/workers/scripts/", 429, 0)])
        sc = self.sidecar()
        t0 = time.time()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        self.assertEqual([c[2] for c in self.calls("PUT")], [429, 429, 200])
        self.assertGreaterEqual(time.time() - t0, 2.9, "Retry-After: 0 made a tight loop")


class Scripts(PlatformCase):
    platform = Platform.scaled(script_cap=2)

    def age_scripts(self, sc):
        """Make every remembered upload an hour old (as if its passes ended long ago)."""
        with sc.store.transaction() as c:
            c.execute("UPDATE cf_scripts SET uploaded_at = uploaded_at - 3600000, "
                      "last_used_at = last_used_at - 3600000")

    def test_uploads_are_remembered_so_a_new_process_does_not_upload_again(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        self.drive(sc, sc.start("steps", {}, drive=False)["id"])
        puts, gets = len(self.calls("PUT")), len(self.calls("GET", "/workers/subdomain"))
        code, out, err = self.cli("start", "steps")
        self.assertEqual(code, 0, err)
        code, out, err = self.cli("tick")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.calls("PUT")), puts, "a tick uploaded the Worker again")
        self.assertEqual(len(self.calls("GET", "/workers/subdomain")), gets, "a tick asked for the subdomain again")

    def test_scripts_no_run_needs_are_deleted_and_the_cap_makes_room(self):
        sc = self.sidecar()
        v1 = STEPS
        sc.deploy("w", v1, adapter="cloudflare")
        self.drive(sc, sc.start("w", {}, drive=False)["id"])
        sc.deploy("w", v1.replace('"E"', '"E2"'), adapter="cloudflare")
        self.assertEqual(len(self.cf.scripts), 2)
        self.age_scripts(sc)
        # The cap is reached: the upload of v3 deletes v1 (no run needs it), never v2 (the newest until now).
        sc.deploy("w", v1.replace('"E"', '"E3"'), adapter="cloudflare")
        self.assertEqual(len(self.cf.deletes), 1)
        self.assertEqual(len(self.cf.scripts), 2)
        rows = {r["name"]: r for r in sc.adapters_report()}
        self.assertEqual(rows["cloudflare"]["scripts"], 2)
        self.assertIn("2 Workers uploaded by this install", rows["cloudflare"]["reason"])
        # v2 is no one's now: maintenance deletes it.
        self.age_scripts(sc)
        self.assertEqual(sc.adapter("cloudflare").collect(force=True), 1)
        self.assertEqual(len(self.cf.scripts), 1)

    def test_a_script_an_unfinished_run_needs_is_kept_and_the_cap_is_a_clear_error(self):
        sc = self.sidecar()
        sc.deploy("w", STEPS, adapter="cloudflare")
        run_id = sc.start("w", {}, drive=False)["id"]
        sc.tick()  # sleeping on v1
        self.assertEqual(sc.status(run_id)["status"], "sleeping")
        sc.deploy("w", STEPS.replace('"E"', '"E2"'), adapter="cloudflare")
        self.age_scripts(sc)
        code, out, err = self.cli("deploy", "w", "-a", "cloudflare", stdin=STEPS.replace('"E"', '"E3"'))
        self.assertEqual(code, 1)
        self.assertIn("holds as many Workers as its plan allows", err)
        self.assertIn("10037", err)
        self.assertEqual(self.cf.deletes, [])
        self.assertEqual(self.drive(sc, run_id)["output"], ["A", "B", "C", "D", "E"])

    def test_a_re_upload_lets_the_requests_in_flight_finish_on_the_old_version(self):
        sc = self.sidecar()
        sc.deploy("slow", SLOW.replace("6000", "3000"), adapter="cloudflare")
        run_id = sc.start("slow", {}, drive=False)["id"]
        import threading
        ticker = threading.Thread(target=sc.tick)
        ticker.start()
        from tests.util import wait_for
        wait_for(lambda: "slow" in [s["name"] for s in sc.status(run_id)["steps"]], what="the slow step")
        upload = self.cf.uploads[0]
        self.cf.upload(upload["name"], *_multipart(upload))  # the same script uploaded again meanwhile
        ticker.join(30)
        st = sc.status(run_id)
        self.assertEqual((st["status"], st["output"]), ("completed", ["A", "S1"]))


def _multipart(upload):
    body, ctype = tow.multipart([("metadata", None, "application/json", json.dumps(upload["metadata"]).encode()),
                                 ("worker.mjs", "worker.mjs", "application/javascript+module", upload["module"])])
    return ctype, body


class Readiness(PlatformCase):
    platform = Platform.scaled(route_delay_s=2.0)

    def test_the_first_pass_waits_for_the_new_route_without_losing_an_attempt(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["status"], "completed")
        self.assertEqual(failures(sc, run_id), 0)
        posts = [r for r in self.cf.worker_requests if r[1] == "POST"]
        self.assertTrue(all(r[3] == 200 for r in posts), posts)
        self.assertTrue(any(r[1] == "GET" and r[3] in (404, 523) for r in self.cf.worker_requests))

    def test_a_route_that_is_still_not_ready_gives_the_pass_back(self):
        self.cf.platform.route_delay_s = 4.0
        sc = self.sidecar()
        sc.adapter("cloudflare").READY_TRY_S = 0.5
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertEqual((st["status"], failures(sc, run_id)), ("pending", 0), st)
        self.assertIn("not reachable yet", st["last_pass"]["reason"])
        time.sleep(4.0)
        self.assertEqual(self.drive(sc, run_id)["status"], "completed")
        self.assertEqual(failures(sc, run_id), 0)


    def test_a_404_after_the_route_answered_once_costs_no_attempt(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        self.cf.route_flaps = 1
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], ["A", "B", "C", "D", "E"])
        self.assertEqual(failures(sc, run_id), 0)
        self.assertEqual(len(self.calls("PUT")), 1, "a 404 while the route spreads uploaded the Worker again")


class ApiErrors(PlatformCase):
    def test_a_malformed_token_names_codes_and_chain(self):
        self.set_token("not-a-token!!")
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare", stdin=STEPS)
        self.assertEqual(code, 1)
        self.assertIn("HTTP 400: 6003 Invalid request headers [6111 Invalid format for Authorization header]", err)
        self.assertIn("prints the token itself", err)

    def test_a_token_without_the_permission_is_refused_clearly(self):
        for answer in ((403, 10000, "Authentication error"), (401, 10023, "Unauthorized")):
            self.cf.scoped = answer
            code, out, err = self.cli("deploy", "x", "-a", "cloudflare", stdin=STEPS)
            self.assertEqual(code, 1)
            self.assertIn("HTTP %d: %d %s" % answer, err)
            self.assertIn("may edit Workers Scripts and read Workers KV Storage", err)

    def test_an_account_without_a_workers_dev_subdomain_says_what_to_do(self):
        self.cf.subdomain = None
        before = self.db_snapshot()
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare", stdin=STEPS)
        self.assertEqual(code, 1)
        self.assertIn("has no workers.dev subdomain", err)
        self.assertIn("10007", err)
        self.assertEqual(self.db_snapshot(), before)

    def test_every_request_carries_a_user_agent(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        self.drive(sc, sc.start("steps", {}, drive=False)["id"])
        self.assertTrue(self.cf.calls and self.cf.worker_requests)
        self.assertEqual(self.cf.no_user_agent, [])


class UploadSettings(PlatformCase):
    cf_extra = "    cpu_ms: 50000\n    observability: true\n"

    def test_cpu_limit_and_logs_go_in_the_upload(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        meta = self.cf.uploads[0]["metadata"]
        self.assertEqual(meta["limits"], {"cpu_ms": 50000})
        self.assertEqual(meta["observability"], {"enabled": True, "head_sampling_rate": 1})

    def test_a_cpu_limit_on_the_free_plan_is_refused_with_what_to_do(self):
        self.cf.platform.plan = "free"
        code, out, err = self.cli("deploy", "x", "-a", "cloudflare", stdin=STEPS)
        self.assertEqual(code, 1)
        self.assertIn("100328", err)
        self.assertIn("set adapters.cloudflare.cpu_ms: 0", err)

    def test_a_cpu_limit_past_the_platform_is_refused_at_load(self):
        self.adapter_config = self.adapter_config.replace("cpu_ms: 50000", "cpu_ms: 400000")
        self.write_config()
        code, out, err = self.cli("adapters")
        self.assertEqual(code, 1, err)
        self.assertIn("adapters.cloudflare.cpu_ms must be from 0 to 300000", err)


class KvQuota(PlatformCase):
    platform = Platform.scaled(kv_daily={"write": 1, "list": 1000, "read": 100000, "delete": 1000})

    def test_a_spent_write_quota_loses_nothing_while_the_stream_holds(self):
        sc = self.sidecar()
        sc.deploy("steps", STEPS, adapter="cloudflare")
        run_id = sc.start("steps", {}, drive=False)["id"]
        st = self.drive(sc, run_id)
        self.assertEqual(st["output"], ["A", "B", "C", "D", "E"])
        self.assertGreater(self.cf.kv_usage["write"], 1)


class KvWriteErrors(PlatformCase):
    def test_failed_kv_writes_are_retried_as_the_same_chunk_and_a_lost_response_still_recovers(self):
        for lands in (False, True):
            self.cf.kv_put_errors, self.cf.kv_put_lands = 2, lands
            sc = self.sidecar()
            if not lands:
                sc.deploy("steps", STEPS, adapter="cloudflare")
            run_id = sc.start("steps", {}, drive=False)["id"]
            self.cf.cut_stream_after = 1
            sc.tick()
            st = sc.status(run_id)
            self.assertEqual(st["status"], "sleeping", (lands, st))
            self.assertEqual(self.drive(sc, run_id)["output"], ["A", "B", "C", "D", "E"])
            self.assertEqual(started(sc, run_id), ["a", "b", "c", "d", "e"])
            self.assertEqual(self.cf.kv_put_errors, 0, "the injected failures were not met")


if __name__ == "__main__":
    unittest.main()
