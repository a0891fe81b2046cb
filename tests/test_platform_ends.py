"""The count of the platform's ends at one point of a run (a Worker's CPU limit, a runtime
restart) outlives a pass given back in between: a 1015 between two CPU cuts must not make the
second one uncounted again, or a run could be retried forever without a charge."""
from tests.util import TempHome, tow

WAITS = "def workflow(input, ctx):\n    return ctx.wait_for_signal('go')\n"


class PlatformEnds(TempHome):

    def claim(self, sc):
        self.clock.advance(3600000)  # past any retry backoff
        claimed = sc.store.claim_due("sched_test", self.clock(), 1, 30000)
        self.assertEqual(len(claimed), 1)
        return claimed[0]["pass_id"]

    def test_a_pass_given_back_between_two_ends_at_one_point_keeps_their_count(self):
        sc = self.sidecar()
        sc.deploy("w", WAITS, runtime="python")
        run_id = sc.start("w", {}, drive=False)["id"]
        policy = sc.run_policy()
        pass_id = self.claim(sc)
        self.assertTrue(sc.store.platform_end(run_id, pass_id, self.clock(), policy, "cut",
                                              "CPU"))
        self.assertEqual(sc.status(run_id)["last_pass"]["ends"], 1)  # given back uncounted
        pass_id = self.claim(sc)
        sc.store.release(run_id, pass_id, self.clock(), "Cloudflare error 1015")
        pass_id = self.claim(sc)
        sc.store.platform_end(run_id, pass_id, self.clock(), policy, "cut", "CPU")
        st = sc.status(run_id)
        self.assertEqual(st["last_pass"]["ends"], 2, st["last_pass"])
        pass_id = self.claim(sc)
        sc.store.platform_end(run_id, pass_id, self.clock(), policy, "cut", "CPU")
        st = sc.status(run_id)
        self.assertEqual(st["status"], "failed", st["last_pass"])
        self.assertIn("ended %d times at the same point" % tow.PLATFORM_ENDS_MAX,
                      st["error"]["message"])
