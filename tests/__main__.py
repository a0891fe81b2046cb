"""`python3 -m tests`: run the whole suite and end with one plain line: 'N passed, N failed,
N skipped', and for skipped tests what they need and the command that enables it."""
import os
import sys
import unittest

# What a skip's reason says it needs -> (what, the command that enables it).
SKIP_FIXES = [
    ("miniflare", "miniflare", "make cf-tools"),
    ("docker", "a Docker engine", "sudo make docker-up"),
    ("chromium", "chromium", "sudo apt-get install chromium chromium-driver"),
    ("promtool", "promtool", "sudo apt-get install prometheus"),
    ("node is not", "node", "install Node >= 18"),
    ("unshare", "PID namespaces", "run the suite as root"),
    ("C compiler", "a C compiler", "sudo apt-get install gcc"),
    ("root can", "a user other than root", "run the suite as another user"),
    ("a real `ty`", "no real ty on PATH", "run the suite without TaskYou's ty on PATH"),
]


def skipped_line(skipped):
    """'12 need miniflare (`make cf-tools`), 1 needs promtool (`...`)' for a run's skipped
    tests (pairs of test and reason), grouped by what they need, most first."""
    groups = {}
    for _, reason in skipped:
        what, cmd = next(((w, c) for key, w, c in SKIP_FIXES if key in reason), (reason, None))
        groups[what, cmd] = groups.get((what, cmd), 0) + 1
    return ", ".join("%d %s %s%s" % (n, "needs" if n == 1 else "need", what,
                                     " (`%s`)" % cmd if cmd else "")
                     for (what, cmd), n in sorted(groups.items(), key=lambda g: -g[1]))


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    suite = unittest.defaultTestLoader.discover(here, top_level_dir=os.path.dirname(here))
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - failed - len(result.skipped)
    print("%d passed, %d failed, %d skipped%s" % (
        passed, failed, len(result.skipped),
        ": " + skipped_line(result.skipped) if result.skipped else ""))
    sys.exit(0 if result.wasSuccessful() and result.testsRun else 1)
