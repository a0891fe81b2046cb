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


# Test modules that mostly wait (on miniflare, a fake Cloudflare on its own time scale, a Docker
# engine starting containers): run in a second process beside the rest, so the suite keeps
# under 10 minutes on 2 cores.
BESIDE = ("test_cloudflare", "test_cloudflare_platform", "test_cloudflare_limits", "test_docker")
RESULT_MARK = "TYOW-RESULT "


def _module_of(suite):
    for test in _tests_in(suite):
        return test.id().split(".")[1] if test.id().count(".") >= 2 else None
    return None


def _tests_in(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _tests_in(item)
        else:
            yield item


def _run(suite, stream=None):
    result = unittest.TextTestRunner(verbosity=2, stream=stream).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    return {"ran": result.testsRun, "failed": failed,
            "skipped": [[t.id(), reason] for t, reason in result.skipped],
            "ok": result.wasSuccessful()}


def main(argv):
    import json
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    suite = unittest.defaultTestLoader.discover(here, top_level_dir=os.path.dirname(here))
    side = argv[1:2] == ["--beside"]
    serial = os.environ.get("TYOW_TEST_SERIAL") == "1"
    mine = unittest.TestSuite(
        s for s in suite if serial or (_module_of(s) in BESIDE) == side)
    if side:  # the second process: its result, for the first to add up
        print(RESULT_MARK + json.dumps(_run(mine, sys.stdout)), flush=True)
        return 0
    child = out = None
    if not serial:
        out = tempfile.TemporaryFile(mode="w+")
        child = subprocess.Popen([sys.executable, "-m", "tests", "--beside"], stdout=out,
                                 stderr=subprocess.STDOUT, cwd=os.path.dirname(here))
    results = [_run(mine)]
    if child is not None:
        child.wait()
        out.seek(0)
        text = out.read()
        sys.stderr.write(text)  # its tests' lines, after ours
        mark = [ln for ln in text.splitlines() if ln.startswith(RESULT_MARK)]
        results.append(json.loads(mark[-1][len(RESULT_MARK):]) if mark else
                       {"ran": 0, "failed": 1, "skipped": [], "ok": False})
    ran = sum(r["ran"] for r in results)
    failed = sum(r["failed"] for r in results)
    skipped = [s for r in results for s in r["skipped"]]
    print("%d passed, %d failed, %d skipped%s" % (
        ran - failed - len(skipped), failed, len(skipped),
        ": " + skipped_line(skipped) if skipped else ""))
    return 0 if all(r["ok"] for r in results) and ran else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
