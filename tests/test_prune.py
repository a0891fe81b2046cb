"""prune and retention: finished runs older than the cutoff go with all that is only theirs; nothing else."""
import json
import unittest

from tests.test_bridge import BridgeCase
from tests.util import TempHome, tow

ONE = "def workflow(input, ctx):\n    print('hello')\n    return ctx.step('s', lambda: 'x' * 2000)\n"
SLEEPER = "def workflow(input, ctx):\n    ctx.step('a', lambda: 1)\n    ctx.sleep('nap', '30d')\n    return 1\n"
DAY = 86400 * 1000


class Prune(TempHome):
    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("one", ONE, runtime="python")
        self.sc.deploy("sleeper", SLEEPER, runtime="python")

    def finished_runs(self, n):
        ids = [self.sc.start("one", {"i": i}, drive=False)["id"] for i in range(n)]
        self.sc.tick()
        return ids

    def backdate(self, run_ids, days):
        """As if these runs had finished ``days`` ago (the CLI runs on the real clock)."""
        conn = tow.sqlite3.connect(self.sc.store.path)
        conn.executemany("UPDATE runs SET finished_at = finished_at - ? WHERE id = ?",
                         [(days * DAY, r) for r in run_ids])
        conn.commit()
        conn.close()

    def table_rows(self, run_id):
        conn = tow.sqlite3.connect(self.sc.store.path)
        try:
            return {t: conn.execute("SELECT count(*) FROM %s WHERE run_id = ?" % t, (run_id,)).fetchone()[0]
                    for t in ("steps", "run_events", "run_logs", "outbox", "signals")}
        finally:
            conn.close()

    def test_old_finished_runs_go_with_what_is_theirs_and_nothing_else(self):
        old = self.finished_runs(3)
        sleeping = self.sc.start("sleeper", {}, drive=False)["id"]
        self.sc.tick()
        self.backdate(old, 10)
        young = self.finished_runs(1)
        self.assertEqual(self.sc.status(sleeping)["status"], "sleeping")
        code, out, err = self.cli("prune", "--older-than", "5d", "--dry-run", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["removed"]["runs"], 3)
        self.assertEqual(len(self.sc.list_runs(limit=100)), 5, "a dry run removed something")
        code, out, err = self.cli("prune", "--older-than", "5d", "--vacuum")
        self.assertEqual(code, 0, err)
        self.assertIn("removed 3 runs", out)
        self.assertIn("vacuum gave back", out)
        left = {r["id"] for r in self.sc.list_runs(limit=100)}
        self.assertEqual(left, {sleeping, young[0]})  # never a run that is not finished, nor a young one
        for run_id in old:
            self.assertEqual(set(self.table_rows(run_id).values()), {0})
        self.assertEqual(self.sc.status(sleeping)["steps"][0]["output"], 1)

    def test_status_filter_and_prune_of_nothing(self):
        self.backdate(self.finished_runs(2), 2)
        code, out, err = self.cli("prune", "--older-than", "1d", "--status", "failed")
        self.assertEqual(code, 0, err)
        self.assertIn("nothing to prune", out)
        self.assertEqual(len(self.sc.list_runs()), 2)

    def test_bad_input_is_refused_and_nothing_changes(self):
        self.backdate(self.finished_runs(1), 2)
        self.assert_refused(["prune"], 2, "--older-than")
        self.assert_refused(["prune", "--older-than", "soon"], 2, "invalid duration")
        self.assert_refused(["prune", "--older-than", "1d", "--status", "running"], 2, "finished statuses only")

    def test_a_child_whose_parent_is_still_going_is_kept(self):
        self.sc.deploy("kid", "def workflow(input, ctx):\n    return 1\n", runtime="python")
        self.sc.deploy("parent", "def workflow(input, ctx):\n    ctx.run_workflow('kid', {})\n"
                                 "    ctx.sleep('long', '30d')\n    return 1\n", runtime="python")
        parent = self.sc.start("parent", {}, drive=False)["id"]
        for _ in range(4):
            self.sc.tick()
        [kid] = self.sc.status(parent)["children"]
        self.assertEqual(kid["status"], "completed")
        self.clock.advance(10 * DAY)
        self.sc.prune("1d")
        self.assertEqual(self.sc.status(kid["id"])["status"], "completed")

    def test_retention_in_the_config_prunes_from_tick(self):
        self.write_config(extra="retention: 3d\n")
        sc = self.sidecar()
        sc.deploy("one", ONE, runtime="python")
        run_id = sc.start("one", {}, drive=False)["id"]
        sc.tick()
        self.clock.advance(4 * DAY)
        sc.tick()
        with self.assertRaises(tow.NotFound):
            sc.status(run_id)


class PruneKeepsUndeliveredTaskUpdates(BridgeCase):
    install_ty = False  # `ty` missing: the task updates stay queued

    def test_a_run_whose_task_updates_wait_is_kept(self):
        self.configure(auto_create_tasks=True)
        sc = self.sidecar()
        sc.deploy("one", ONE, runtime="python")
        run_id = sc.start("one", {}, drive=False)["id"]
        sc.tick()
        self.clock.advance(10 * 86400 * 1000)
        self.assertEqual(sc.prune("1d")["removed"]["runs"], 0)
        self.assertEqual(sc.status(run_id)["status"], "completed")


if __name__ == "__main__":
    unittest.main()
