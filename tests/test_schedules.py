"""Cron schedules: the parser (Vixie day rules, names, steps, macros, time zones), the commands, and fires
that start exactly one run each, under several schedulers and across a fire lost half-way."""
import datetime
import json
import threading
import unittest

from tests.util import TempHome, tow

ONE = "def workflow(input, ctx):\n    return ctx.step('s', lambda: input)\n"


def at(text, tz="UTC"):
    return int(datetime.datetime.fromisoformat(text).replace(tzinfo=tow._zone(tz)).timestamp() * 1000)


def fires(expr, start, n=3, tz="UTC"):
    c, ms, out = tow.Cron(expr), at(start, tz), []
    for _ in range(n):
        ms = c.next_after(ms, tz)
        out.append(datetime.datetime.fromtimestamp(ms / 1000, tow._zone(tz)).strftime("%a %Y-%m-%d %H:%M"))
    return out


class Parser(unittest.TestCase):
    def test_fire_times(self):
        table = [
            ("*/15 * * * *", "2026-12-02T07:50:00", ["Wed 2026-12-02 08:00", "Wed 2026-12-02 08:15",
                                                      "Wed 2026-12-02 08:30"]),
            ("0 9 * * mon-fri", "2026-12-04T10:00:00", ["Mon 2026-12-07 09:00", "Tue 2026-12-08 09:00",
                                                         "Wed 2026-12-09 09:00"]),
            # Vixie: both day fields restricted -> either matches
            ("0 0 13 * fri", "2026-12-01T00:00:00", ["Fri 2026-12-04 00:00", "Fri 2026-12-11 00:00",
                                                      "Sun 2026-12-13 00:00"]),
            # a day field written with * (here */2) must match too
            ("0 0 */2 * mon", "2026-12-01T00:00:00", ["Mon 2026-12-07 00:00", "Mon 2026-12-21 00:00",
                                                       "Mon 2027-01-11 00:00"]),
            ("@monthly", "2026-12-15T00:00:00", ["Fri 2027-01-01 00:00", "Mon 2027-02-01 00:00",
                                                 "Mon 2027-03-01 00:00"]),
            ("@hourly", "2026-12-15T10:30:00", ["Tue 2026-12-15 11:00", "Tue 2026-12-15 12:00",
                                                "Tue 2026-12-15 13:00"]),
            ("0 12 * * 7", "2026-12-01T00:00:00", ["Sun 2026-12-06 12:00", "Sun 2026-12-13 12:00",
                                                    "Sun 2026-12-20 12:00"]),
            ("5,10-12 1 1 jan,JUL *", "2026-12-01T00:00:00", ["Fri 2027-01-01 01:05", "Fri 2027-01-01 01:10",
                                                               "Fri 2027-01-01 01:11"]),
            ("0 0 29 feb *", "2026-12-01T00:00:00", ["Tue 2028-02-29 00:00", "Sun 2032-02-29 00:00",
                                                      "Fri 2036-02-29 00:00"]),
        ]
        for expr, start, want in table:
            with self.subTest(expr=expr):
                self.assertEqual(fires(expr, start), want)

    def test_time_zones_and_a_skipped_dst_hour(self):
        self.assertEqual(fires("30 2 * * *", "2027-03-27T00:00:00", tz="Europe/Paris"),
                         ["Sat 2027-03-27 02:30", "Mon 2027-03-29 02:30", "Tue 2027-03-30 02:30"])
        self.assertEqual(fires("0 9 * * *", "2026-12-02T00:00:00", n=1, tz="Asia/Tokyo"), ["Wed 2026-12-02 09:00"])

    def test_the_repeated_hour_of_a_dst_change(self):
        # Every-15-minute jobs run through both copies of 01:xx; a fixed-time job runs once.
        got = fires("*/15 * * * *", "2024-11-03T00:50:00", n=9, tz="America/New_York")
        self.assertEqual(got.count("Sun 2024-11-03 01:15"), 2, got)
        self.assertEqual(got[-1], "Sun 2024-11-03 02:00")
        self.assertEqual(fires("30 1 * * *", "2024-11-03T00:00:00", n=2, tz="America/New_York"),
                         ["Sun 2024-11-03 01:30", "Mon 2024-11-04 01:30"])

    def test_bad_expressions_say_what_is_wrong(self):
        for expr, msg in (("* * *", "five fields"), ("60 * * * *", "out of range 0-59 in the minute"),
                          ("*/0 * * * *", "bad step"), ("5-1 * * * *", "backwards"), ("x * * * *", "not a number"),
                          ("* * * foo *", "month field"), ("* * 32 * *", "day of month"), ("@often", "@hourly")):
            with self.subTest(expr=expr):
                with self.assertRaises(ValueError) as cm:
                    tow.Cron(expr)
                self.assertIn(msg, str(cm.exception))


class Schedules(TempHome):
    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("one", ONE, runtime="python")

    def test_add_list_pause_resume_rm(self):
        code, out, err = self.cli("schedule", "add", "one", "--cron", "*/5 * * * *", "-i", '{"n": 1}', "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual((doc["name"], doc["cron"], doc["input"]), ("one", "*/5 * * * *", {"n": 1}))
        self.assertGreater(doc["next_fire_at"], self.clock())
        code, out, err = self.cli("schedule", "list")
        self.assertIn("*/5 * * * *", out)
        self.assertTrue(json.loads(self.cli("schedule", "pause", "one", "--json")[1])["paused"])
        self.assertFalse(json.loads(self.cli("schedule", "resume", "one", "--json")[1])["paused"])
        self.assertEqual(self.cli("schedule", "rm", "one")[0], 0)
        self.assertEqual(self.sc.schedules(), [])

    def test_bad_input_is_refused_and_nothing_is_stored(self):
        self.assert_refused(["schedule", "add", "one", "--cron", "61 * * * *"], 2, "out of range")
        self.assert_refused(["schedule", "add", "one", "--cron", "* * * * *", "--tz", "Mars/Olympus"], 2,
                            "unknown time zone")
        self.assert_refused(["schedule", "add", "nope", "--cron", "* * * * *"], 1, "no workflow")
        self.assert_refused(["schedule", "rm", "ghost"], 1, "no schedule")
        self.assert_refused(["schedule", "add", "one"], 2, "needs --cron")
        self.sc.schedule_add("one", "* * * * *")
        self.assert_refused(["schedule", "add", "one", "--cron", "@daily"], 1, "exists")

    def test_each_fire_starts_one_run_under_two_schedulers(self):
        self.sc.schedule_add("one", "* * * * *", {"from": "cron"})
        other = self.sidecar()
        started = []
        for minute in range(5):
            self.clock.advance(60000)
            threads = [threading.Thread(target=lambda s=s: started.extend(s.fire_schedules()))
                       for s in (self.sc, other, self.sc, other)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.assertEqual(len(started), 5)
        self.assertEqual(len(set(started)), 5)
        runs = self.sc.list_runs(limit=100)
        self.assertEqual(len(runs), 5)
        st = self.sc.status(runs[0]["id"])
        self.assertEqual(st["schedule"], "one")
        self.assertEqual(st["input"], {"from": "cron"})
        self.assertIn("schedule", self.cli("status", runs[0]["id"])[1])

    def test_a_fire_whose_commit_was_lost_is_not_started_twice(self):
        self.sc.schedule_add("one", "* * * * *")
        self.clock.advance(60000)
        [first] = self.sc.fire_schedules()
        row = self.sc.store.schedules("one")[0]
        # As if the scheduler died after starting the run but before moving the schedule on.
        conn = tow.sqlite3.connect(self.sc.store.path)
        conn.execute("UPDATE schedules SET next_fire_at = ? WHERE name = 'one'", (row["last_fire_at"],))
        conn.commit()
        conn.close()
        self.assertEqual(self.sc.fire_schedules(), [])
        self.assertEqual([r["id"] for r in self.sc.list_runs()], [first])

    def test_after_downtime_only_the_latest_missed_fire_runs_or_all_or_none(self):
        for mode, want in (("latest", 1), ("all", 4), ("none", 0)):
            with self.subTest(mode=mode):
                doc = self.sc.schedule_add("one", "*/10 * * * *", name="s-" + mode, catch_up=mode)
                # Down for four fires; the latest was 2 minutes ago (`none` runs only a fire within a minute).
                self.clock.advance_to(doc["next_fire_at"] + 3 * 600000 + 120000)
                self.assertEqual(len(self.sc.fire_schedules()), want)
                self.assertEqual(len(self.sc.fire_schedules()), 0)
                self.sc.schedule_rm("s-" + mode)

    def test_a_long_outage_fires_the_latest_once_and_quickly(self):
        import time
        self.sc.schedule_add("one", "* * * * *")
        self.clock.advance(100 * 86400 * 1000)
        t0 = time.monotonic()
        self.assertEqual(len(self.sc.fire_schedules()), 1)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertEqual(self.sc.fire_schedules(), [])
        self.assertGreater(self.sc.schedule("one")["next_fire_at"], self.clock())

    def test_resuming_a_schedule_that_is_not_paused_keeps_its_due_fire(self):
        self.sc.schedule_add("one", "* * * * *")
        self.clock.advance(61000)
        self.sc.schedule_pause("one", paused=False)
        self.assertEqual(len(self.sc.fire_schedules()), 1)

    def test_tick_starts_and_drives_a_due_fire(self):
        self.sc.schedule_add("one", "* * * * *", {"n": 2})
        self.clock.advance(61000)
        self.sc.tick()
        [run] = self.sc.list_runs()
        self.assertEqual((run["status"], run["schedule_name"]), ("completed", "one"))


if __name__ == "__main__":
    unittest.main()
