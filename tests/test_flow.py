"""Flow control (issue 18): concurrency, per-key and rate limits, priorities, decided in the claim.

Overlap is measured from the steps' own clocks, not from status polling: every step execution
(replays included) appends "S|E <run> <step> <ms>" to a log when it begins and ends, and a run
is active from its first begin to its last end. The bursts run under one `serve`, two `serve`s
on one store, and a `serve` SIGKILLed mid-burst and replaced; the rest uses `tick` (as cron).
"""
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import unittest

from tests.util import ServeCase, TempHome, read_counter, tow, wait_for

STAMP_PY = """
import time

def mark(path, run_id, key, work):
    with open(path, "a") as f:
        f.write("S %s %s %d\\n" % (run_id, key, time.time() * 1000))
    time.sleep(work)
    with open(path, "a") as f:
        f.write("E %s %s %d\\n" % (run_id, key, time.time() * 1000))
    return int(time.time() * 1000)

def workflow(input, ctx):
    path, work = input["log"], input.get("work", 0)
    begin = ctx.step("begin", lambda: mark(path, ctx.run_id, "begin", work))
    if input.get("nap"):
        ctx.sleep("nap", input["nap"])
    end = ctx.step("end", lambda: mark(path, ctx.run_id, "end", 0))
    return {"begin": begin, "end": end}
"""

# A run that sleeps an hour between two steps (a FakeClock jumps over it): it holds its slot.
NAP_PY = """
def workflow(input, ctx):
    ctx.step("a", lambda: 1)
    ctx.sleep("nap", "1h")
    return ctx.step("b", lambda: 2)
"""

PARENT_PY = """
def workflow(input, ctx):
    kw = {k: input[k] for k in ("priority", "key") if k in input}
    return ctx.run_workflow("nap", {}, **kw)
"""

PARENT_JS = """
async function workflow(input, { runWorkflow }) {
  return await runWorkflow("nap", {}, { priority: input.priority, key: input.key });
}
"""


def spans(path):
    """{run id: (first begin, last end)} of every step execution in the log."""
    out = {}
    for line in read_counter(path):
        _, run_id, _, ms = line.split()
        lo, hi = out.get(run_id, (math.inf, -math.inf))
        out[run_id] = (min(lo, int(ms)), max(hi, int(ms)))
    return out


def most_at_once(intervals):
    """The most intervals open at one moment (one that ends as another begins: not both)."""
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def most_in_window(times, window_ms):
    """The most of ``times`` in any half-open window [t, t + window_ms)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + window_ms) for i, t in enumerate(times)),
               default=0)


class Helpers(unittest.TestCase):
    def test_the_overlap_measures(self):
        self.assertEqual(most_at_once([(0, 10), (10, 20), (5, 15)]), 2)
        self.assertEqual(most_at_once([(0, 10), (1, 9), (2, 8)]), 3)
        self.assertEqual(most_in_window([0, 1, 1999, 2000, 2001], 2000), 3)

    def test_rates_parse_and_print(self):
        for text, want, shown in (("10/1m", (10, 60000), "10/1m"), ("3/2s", (3, 2000), "3/2s"),
                                  ("100/h", (100, 3600000), "100/1h"),
                                  (" 5 / 500ms", (5, 500), "5/500ms"),
                                  ("7/90s", (7, 90000), "7/90s")):
            with self.subTest(text=text):
                self.assertEqual(tow.parse_rate(text), want)
                self.assertEqual(tow.format_rate(*want), shown)
        for bad in ("", "10", "10/", "/1m", "0/1m", "3/0s", "-1/1s", "x/1s", "3/2x", "1.5/1s"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                tow.parse_rate(bad)


class Bursts(ServeCase):
    """Four workflows' bursts at once: under --concurrency 2, --per-key 1, priorities under
    --concurrency 1, and --rate 3/2s; the overlap each allowed, measured from the steps."""

    lease_ttl = "5s"

    def burst(self, mode):
        sc = self.sidecar(clock=False)
        logs = {}
        for wf, limits in (("c2", {"concurrency": 2}), ("pk", {"per_key": 1}),
                           ("prio", {"concurrency": 1}), ("rate", {"rate": "3/2s"})):
            sc.deploy(wf, STAMP_PY, runtime="python")
            sc.set_limits(wf, **limits)
            logs[wf] = os.path.join(self.tmp, wf + ".log")
        runs = {"c2": [sc.start("c2", {"log": logs["c2"], "work": 0.3}, drive=False)["id"]
                       for _ in range(20)],
                "pk": [sc.start("pk", {"log": logs["pk"], "work": 0.25}, key="ab"[i % 2],
                                drive=False)["id"] for i in range(10)],
                "rate": [sc.start("rate", {"log": logs["rate"]}, drive=False)["id"]
                         for _ in range(9)]}
        priorities = [0, 3, 1, 3, 2, -1]
        runs["prio"] = [sc.start("prio", {"log": logs["prio"], "work": 0.05}, priority=p,
                                 drive=False)["id"] for p in priorities]
        self.assertEqual(sc.status(runs["c2"][0])["status"], "pending")
        first = self.serve()
        if mode == "two":
            self.serve()
        if mode == "killed":
            def in_flight():  # a c2 step that began and has not ended: the kill lands mid-step
                marks = [ln.split()[:2] for ln in read_counter(logs["c2"])]
                begun = [r for kind, r in marks if kind == "S"]
                return len(begun) >= 5 and len(begun) > len([r for k, r in marks if k == "E"])
            wait_for(in_flight, timeout=30, what="a c2 step in flight mid-burst")
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            self.serve()
        for wf, ids in runs.items():
            for run_id in ids:
                st = self.wait_status(sc, run_id, tow.TERMINAL, timeout=60)
                self.assertEqual(st["status"], "completed", (wf, st.get("error")))
        got = {wf: spans(path) for wf, path in logs.items()}
        self.assertEqual(most_at_once(got["c2"].values()), 2, "--concurrency 2")
        keys = {k: [got["pk"][r] for i, r in enumerate(runs["pk"]) if "ab"[i % 2] == k]
                for k in "ab"}
        self.assertEqual([most_at_once(keys[k]) for k in "ab"], [1, 1], "--per-key 1, one key")
        self.assertEqual(most_at_once(got["pk"].values()), 2, "two keys run side by side")
        order = sorted(runs["prio"], key=lambda r: got["prio"][r][0])
        want = [runs["prio"][i] for i in sorted(range(len(priorities)),
                                                key=lambda i: (-priorities[i], i))]
        self.assertEqual(order, want, "higher priority first, then the oldest")
        self.assertEqual(most_at_once(got["prio"].values()), 1)
        starts = [got["rate"][r][0] for r in runs["rate"]]
        self.assertEqual(most_in_window(starts, 2000), 3, "--rate 3/2s: %s" % sorted(starts))
        if mode == "killed":
            replayed = [r for ids in runs.values() for r in ids
                        if "lease_expired" in [e["type"] for e in sc.events(r)]]
            self.assertTrue(replayed, "the kill should have cut a pass short")
        self.assertEqual(self.integrity(), "ok")

    def test_under_one_serve(self):
        self.burst("one")

    def test_under_two_serves_on_one_store(self):
        self.burst("two")

    def test_with_a_serve_killed_mid_burst(self):
        self.burst("killed")


class Held(TempHome):
    """What holds and what does not, driven by `tick` (as from cron) with a settable clock."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("nap", NAP_PY, runtime="python")

    def start(self, **kw):
        return self.sc.start("nap", {}, drive=False, **kw)["id"]

    def test_a_sleeping_run_holds_its_slot_and_every_view_says_why(self):
        self.sc.set_limits("nap", concurrency=1)
        a = self.start()
        self.sc.tick()
        self.assertEqual(self.sc.status(a)["status"], "sleeping")
        b = self.start(key="repo-1", priority=5)
        self.sc.tick()
        st = self.sc.status(b)
        reason = "queued: 1 of 1 active runs of nap (%s)" % a
        self.assertEqual((st["status"], st["queued"]["reason"], st["queued"]["limit"]),
                         ("pending", reason, "concurrency"))
        self.assertEqual((st["queued"]["ahead"], st["priority"], st["concurrency_key"]),
                         (0, 5, "repo-1"))
        code, out, err = self.cli("status", b)
        self.assertIn("status    pending, " + reason, out)
        self.assertIn("flow      key 'repo-1', priority 5", out)
        code, out, err = self.cli("list", "runs")
        self.assertIn("pending (queued: 1/1 active)", out)
        code, out, err = self.cli("list", "runs", "--json")
        self.assertEqual({r["id"]: r["queued"] for r in json.loads(out)}, {a: None, b: reason})
        board = self.sc.dashboard(host="127.0.0.1", port=0).start()
        self.addCleanup(board.stop)
        doc = self.get(board, "/api/runs/" + b)
        self.assertEqual((doc["status"], doc["queued"]["reason"]), ("pending", reason))
        rows = {r["id"]: r["queued"] for r in self.get(board, "/api/runs")["runs"]}
        self.assertEqual((rows[a], rows[b]["reason"]), (None, reason))
        metrics = self.get(board, "/metrics")
        self.assertIn('tyow_runs_queued{workflow="nap",reason="concurrency"} 1', metrics)
        self.assertIn('tyow_runs_active{workflow="nap"} 1', metrics)
        if shutil.which("promtool"):
            res = subprocess.run(["promtool", "check", "metrics"], input=metrics,
                                 capture_output=True, text=True)
            self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.clock.advance(3600 * 1000 + 1000)
        self.sc.tick()  # a ends: b takes its slot in the same tick
        self.assertEqual(self.sc.status(a)["status"], "completed")
        st = self.sc.status(b)
        self.assertEqual((st["status"], st["queued"]), ("sleeping", None))
        ended = [e["at"] for e in self.sc.events(a) if e["type"] == "completed"][0]
        began = [e["at"] for e in self.sc.events(b) if e["type"] == "pass_started"][0]
        self.assertGreaterEqual(began, ended)

    @staticmethod
    def get(board, path):
        conn = http.client.HTTPConnection("127.0.0.1", board.port, timeout=10)
        try:
            conn.request("GET", path)
            data = conn.getresponse().read().decode()
        finally:
            conn.close()
        return data if path == "/metrics" else json.loads(data)

    def test_lowering_a_limit_never_stops_running_work(self):
        self.sc.set_limits("nap", concurrency=3)
        runs = [self.start() for _ in range(3)]
        self.sc.tick()
        self.sc.set_limits("nap", concurrency=1, drive=False)
        late = self.start()
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in runs], ["sleeping"] * 3)
        self.assertIn("queued: 3 of 1 active runs of nap", self.sc.status(late)["queued"]["reason"])
        self.clock.advance(3600 * 1000 + 1000)
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in runs], ["completed"] * 3)
        self.assertEqual(self.sc.status(late)["status"], "sleeping")
        # Raised again: it takes effect at the next claim.
        more = [self.start() for _ in range(3)]
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in more], ["pending"] * 3)
        self.sc.set_limits("nap", concurrency=3, drive=False)
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in more],
                         ["sleeping", "sleeping", "pending"])

    def test_per_key_holds_one_key_and_lets_keyless_runs_by(self):
        self.sc.set_limits("nap", per_key=1)
        a1, a2, b1, free = (self.start(key="a"), self.start(key="a"), self.start(key="b"),
                            self.start())
        self.sc.tick()
        got = {r: self.sc.status(r) for r in (a1, a2, b1, free)}
        self.assertEqual([got[r]["status"] for r in (a1, a2, b1, free)],
                         ["sleeping", "pending", "sleeping", "sleeping"])
        self.assertEqual(got[a2]["queued"]["reason"],
                         "queued: 1 of 1 active runs of nap with key 'a' (%s)" % a1)

    def test_a_rate_holds_the_next_start_until_its_window_passes(self):
        self.sc.set_limits("nap", rate="2/1m")
        runs = [self.start() for _ in range(3)]
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in runs],
                         ["sleeping", "sleeping", "pending"])
        why = self.sc.status(runs[2])["queued"]
        self.assertEqual(why["limit"], "rate")
        self.assertIn("queued: 2 of 2 starts of nap in 1m; the next at ", why["reason"])
        self.clock.advance(60000)  # the window, but not its slack (a twentieth, at most 1 s)
        self.sc.tick()
        self.assertEqual(self.sc.status(runs[2])["status"], "pending")
        self.clock.advance(1500)  # (the window counts from the first step, a moment after)
        self.sc.tick()
        self.assertEqual(self.sc.status(runs[2])["status"], "sleeping")

    def test_priority_then_age_decides_who_goes_first(self):
        self.sc.set_limits("nap", concurrency=1)
        runs = [self.start(priority=p) for p in (0, 2, 0, 2, 1)]
        order = []
        for _ in runs:
            self.sc.tick()
            now = [r for r in runs if r not in order and self.sc.status(r)["status"] != "pending"]
            self.assertEqual(len(now), 1)
            order += now
            for r in runs:
                if r not in order:
                    st = self.sc.status(r)
                    self.assertEqual(st["queued"]["limit"], "concurrency")
            self.clock.advance(3600 * 1000 + 1000)
        self.assertEqual(order, [runs[1], runs[3], runs[4], runs[0], runs[2]])

    def test_retries_forks_children_and_schedule_fires_are_held_too(self):
        self.sc.set_limits("nap", concurrency=1)
        a = self.start()
        self.sc.tick()
        self.sc.cancel(a)
        b = self.start(priority=4, key="k")
        self.sc.tick()
        self.assertEqual(self.sc.status(b)["status"], "sleeping")
        self.sc.retry(a, drive=False)
        fork = self.sc.fork(b, drive=False)
        for run_id in (a, fork["id"]):
            st = self.sc.status(run_id)
            self.assertEqual(st["queued"]["reason"], "queued: 1 of 1 active runs of nap (%s)" % b)
        self.assertEqual((fork["priority"], fork["concurrency_key"]), (4, "k"))
        self.sc.deploy("parent", PARENT_PY, runtime="python")
        kids = []
        for given in ({}, {"priority": 9, "key": "repo"}):
            p = self.sc.start("parent", given, priority=2, drive=False)["id"]
            self.sc.tick()
            child = self.sc.status(p)["children"][0]["id"]
            st = self.sc.status(child)
            self.assertEqual(st["status"], "pending")
            self.assertEqual(st["queued"]["limit"], "concurrency")
            kids.append((st["priority"], st["concurrency_key"]))
        self.assertEqual(kids, [(2, None), (9, "repo")], "a child inherits its parent's priority")
        self.sc.schedule_add("nap", "* * * * *", name="every-minute")
        self.clock.advance(61000)
        self.sc.tick()
        fired = self.sc.schedule("every-minute")["last_run_id"]
        self.assertEqual(self.sc.status(fired)["queued"]["limit"], "concurrency")

    @unittest.skipUnless(shutil.which("node"), "node is not installed")
    def test_run_workflow_takes_a_priority_and_a_key_in_node(self):
        self.sc.set_limits("nap", concurrency=1)
        self.sc.deploy("parent", PARENT_JS)
        p = self.sc.start("parent", {"priority": -3, "key": "k2"}, drive=False)["id"]
        self.sc.tick()
        child = self.sc.status(self.sc.status(p)["children"][0]["id"])
        self.assertEqual((child["priority"], child["concurrency_key"]), (-3, "k2"))

    def test_a_held_run_still_fails_at_its_deadline(self):
        self.sc.set_limits("nap", concurrency=1)
        self.start()
        self.sc.tick()
        late = self.sc.start("nap", {}, deadline="2s", drive=False)["id"]
        self.sc.tick()
        self.assertEqual(self.sc.status(late)["status"], "pending")
        self.clock.advance(2500)
        self.sc.tick()
        st = self.sc.status(late)
        self.assertEqual((st["status"], st["error"]["name"], st["queued"]),
                         ("failed", "DeadlineExceeded", None))

    def test_clearing_lets_the_held_runs_go(self):
        self.sc.set_limits("nap", concurrency=1)
        runs = [self.start() for _ in range(3)]
        self.sc.tick()
        self.assertEqual(self.sc.set_limits("nap", drive=False)["concurrency"], None)
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in runs], ["sleeping"] * 3)

    def test_raising_a_limit_with_no_scheduler_alive_starts_the_runner(self):
        sc = self.sidecar(clock=False)
        sc.set_limits("nap", concurrency=1, drive=False)
        runs = [sc.start("nap", {}, drive=False)["id"] for _ in range(2)]
        sc.tick()
        self.assertEqual(sc.status(runs[1])["status"], "pending")
        sc.set_limits("nap", concurrency=2)  # as `limits nap --concurrency 2` does
        wait_for(lambda: sc.status(runs[1])["status"] == "sleeping", timeout=20,
                 what="the background runner to admit the held run")

    # -- found by a review ---------------------------------------------------------------

    def test_a_retried_or_forked_run_begins_its_start_and_frees_its_window(self):
        self.sc.set_limits("nap", rate="1/2s")
        first = self.start()
        self.sc.tick()
        self.sc.cancel(first)
        self.clock.advance(3000)
        self.sc.retry(first, drive=False)
        self.sc.tick()  # admitted again; its first event begins its start
        self.assertEqual(self.sc.status(first)["status"], "sleeping")
        self.clock.advance(3000)  # past the window (and its slack) of that start
        second = self.start()
        self.sc.tick()
        self.assertEqual(self.sc.status(second)["status"], "sleeping",
                         self.sc.status(second).get("queued"))
        self.clock.advance(3000)
        fork = self.sc.fork(second, from_step="nap", drive=False)["id"]
        self.sc.tick()
        self.clock.advance(3000)
        third = self.start()
        self.sc.tick()
        self.assertEqual([self.sc.status(r)["status"] for r in (fork, third)],
                         ["sleeping", "sleeping"])

    def test_a_start_not_begun_has_the_scheduler_look_again_soon_not_at_its_wait_cap(self):
        self.sc.set_limits("nap", rate="1/1s")
        held = [self.start() for _ in range(2)]
        now = self.clock()
        claimed = self.sc.store.claim_due("sched_test", now, 5, 30000)  # no event yet
        self.assertEqual([c["id"] for c in claimed], held[:1])
        self.assertLessEqual(self.sc.store.next_due_at(now), now + tow.RATE_RECHECK_MS)

    def test_a_child_held_by_its_own_parents_says_it_cannot_start(self):
        self.sc.deploy("self", "def workflow(input, ctx):\n"
                       "    if input.get('depth', 0) < 1:\n"
                       "        return ctx.run_workflow('self', {'depth': 1})\n"
                       "    return 'leaf'\n", runtime="python")
        self.sc.set_limits("self", concurrency=1)
        parent = self.sc.start("self", {}, drive=False)["id"]
        self.sc.tick()
        child = self.sc.status(parent)["children"][0]["id"]
        why = self.sc.status(child)["queued"]
        self.assertTrue(why.get("deadlock"), why)
        self.assertIn("own parents", why["reason"])
        self.assertIn("--concurrency` is raised above 1", why["reason"])

    def test_a_rate_given_as_numbers_is_checked_like_one_given_as_text(self):
        before = self.db_snapshot()
        for rate in ((0, 0), (-5, 1000), (3, -1), ("x", 5), (1, 2, 3), (True, 1000)):
            with self.assertRaises(tow.InputError, msg=repr(rate)):
                self.sc.set_limits("nap", rate=rate)
        self.assertEqual(self.db_snapshot(), before)
        self.assertEqual(self.sc.set_limits("nap", rate=(3, 2000))["rate"], "3/2s")

    def test_cancel_with_no_scheduler_alive_lets_the_held_run_go(self):
        sc = self.sidecar(clock=False)
        sc.set_limits("nap", concurrency=1, drive=False)
        runs = [sc.start("nap", {}, drive=False)["id"] for _ in range(2)]
        sc.tick()
        self.assertEqual(sc.status(runs[1])["status"], "pending")
        sc.cancel(runs[0])
        wait_for(lambda: sc.status(runs[1])["status"] == "sleeping", timeout=20,
                 what="the background runner to admit the held run")


class Limits(TempHome):
    """The `limits` command and set_limits/limits: set, merge, list, clear; bad input."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("deploy-site", NAP_PY, runtime="python")

    def test_set_show_merge_list_and_clear(self):
        self.assertEqual(self.cli("limits"), (0, "no limits; set some with `ty-openworkflow "
                                                 "limits WORKFLOW --concurrency N`\n", ""))
        code, out, err = self.cli("limits", "deploy-site", "--concurrency", "2")
        self.assertEqual((code, out), (0, "deploy-site: concurrency 2 (0 active, 0 queued)\n"))
        self.cli("limits", "deploy-site", "--rate", "10/1m", "--per-key", "1")
        doc = json.loads(self.cli("limits", "deploy-site", "--json")[1])
        self.assertEqual((doc["concurrency"], doc["per_key"], doc["rate"], doc["rate_window_ms"]),
                         (2, 1, "10/1m", 60000))
        self.assertEqual(self.sc.limits(), [doc])
        out = self.cli("limits")[1]
        self.assertIn("deploy-site  2            1        10/1m", out)
        self.cli("limits", "deploy-site", "--clear", "--concurrency", "5")
        self.assertEqual(self.sc.limits("deploy-site")["concurrency"], 5)
        self.assertIsNone(self.sc.limits("deploy-site")["rate"])
        self.assertEqual(self.cli("limits", "deploy-site", "--clear"),
                         (0, "deploy-site: no limits\n", ""))
        self.assertEqual(self.sc.limits(), [])
        # Limits belong to the workflow, not a version: a new deploy keeps them.
        self.sc.set_limits("deploy-site", concurrency=1)
        self.sc.deploy("deploy-site", NAP_PY + "\n# v2\n", runtime="python")
        self.assertEqual(self.sc.limits("deploy-site")["concurrency"], 1)

    def test_bad_input_is_one_line_and_changes_nothing(self):
        self.sc.set_limits("deploy-site", concurrency=2)
        cases = [
            (["limits", "deploy-site", "--concurrency", "0"], 2,
             "--concurrency must be at least 1"),
            (["limits", "deploy-site", "--per-key", "0"], 2, "--per-key must be a whole number"),
            (["limits", "deploy-site", "--per-key", "-3"], 2, "--per-key must be a whole number"),
            (["limits", "deploy-site", "--concurrency", "two"], 2, "invalid int value"),
            (["limits", "deploy-site", "--rate", "3/0s"], 2, "--rate: invalid rate '3/0s'"),
            (["limits", "deploy-site", "--rate", "ten/1m"], 2, "use N/DURATION, like 10/1m"),
            (["limits", "deploy-site", "--rate", "10"], 2, "use N/DURATION"),
            (["limits", "no-such", "--concurrency", "1"], 1, "no workflow 'no-such'"),
            (["limits", "no-such"], 1, "no workflow 'no-such'"),
            (["limits", "--concurrency", "1"], 2, "give the workflow"),
            (["start", "deploy-site", "--concurrency-key", "k" * 201], 2,
             "--concurrency-key must be a non-empty string of at most 200 characters"),
            (["start", "deploy-site", "--concurrency-key", " "], 2, "--concurrency-key must"),
            (["start", "deploy-site", "--priority", "high"], 2, "invalid int value: 'high'"),
            (["start", "deploy-site", "--priority", "1.5"], 2, "invalid int value: '1.5'"),
            (["start", "deploy-site", "--priority", str(1 << 40)], 2, "--priority must be an "
                                                                       "integer from"),
        ]
        for argv, code, message in cases:
            with self.subTest(argv=argv):
                self.assert_refused(argv, code, message)
        for kw in ({"concurrency": 0}, {"per_key": 1.5}, {"concurrency": True}, {"rate": "0/1s"}):
            with self.subTest(kw=kw), self.assertRaises(tow.InputError):
                self.sc.set_limits("deploy-site", **kw)
        for kw in ({"key": "x" * 201}, {"key": 7}, {"priority": "1"}, {"priority": True},
                   {"priority": 2.0}):
            with self.subTest(kw=kw), self.assertRaises(tow.InputError):
                self.sc.start("deploy-site", {}, drive=False, **kw)
        with self.assertRaises(tow.NotFound):
            self.sc.set_limits("no-such", concurrency=1)
        self.assertEqual(self.sc.limits("deploy-site")["concurrency"], 2)
        self.assertEqual(self.sc.list_runs(), [])


if __name__ == "__main__":
    unittest.main()
