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
]


def skipped_line(skipped):
    """'12 need miniflare (`make cf-tools`), 1 needs promtool (`...`), 3 do not apply here'
    for a run's skipped tests (pairs of test and reason): those something can enable grouped
    by what they need, most first, then those that never run here (Workers have no files,
    root can write anywhere, ...)."""
    groups, by_design = {}, 0
    for _, reason in skipped:
        fix = next(((what, cmd) for key, what, cmd in SKIP_FIXES if key in reason), None)
        if fix is None:
            by_design += 1
        else:
            groups[fix] = groups.get(fix, 0) + 1
    parts = ["%d %s %s (`%s`)" % (n, "needs" if n == 1 else "need", what, cmd)
             for (what, cmd), n in sorted(groups.items(), key=lambda g: -g[1])]
    if by_design:
        parts.append("%d %s not apply here (see their reasons above)"
                     % (by_design, "does" if by_design == 1 else "do"))
    return ", ".join(parts)


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
