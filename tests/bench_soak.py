#!/usr/bin/env python3
"""Soak (not a test): one `serve` drives 10,000 passes; are its open files flat?

Usage: python3 tests/bench_soak.py [--passes N] [--batch N] [--runtimes node,python]

A real `serve` subprocess on a throwaway install (tests/bench.py's Install), warm workers
(the default). Runs of 4 steps (one pass each) are started in batches; after each batch has
finished, serve's open fds (/proc/PID/fd) are counted. Printed per runtime: the count once
warmed up (after the first batch), the highest and the last, and the growth from the warm
count to the last; a leak grows with every batch, a bounded pool does not.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import bench  # noqa: E402


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def fd_kinds(pid):
    """What serve's fds are: {kind: count}, kind being a file's name, pipe, socket, ..."""
    kinds = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target else os.path.basename(target)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def soak(tow, runtime, passes, batch):
    inst = bench.Install(tow, runtime)
    try:
        serve = inst.start_serve()
        inst.warm()
        counts, done, t0 = [], 0, time.time()
        kinds = []
        while done < passes:
            n = min(batch, passes - done)
            ids = [inst.sc.start("w", {"x": 0, "n": 4})["id"] for _ in range(n)]
            for run_id in ids:
                inst.wait_run(run_id, 120, 0.005)
            done += n
            counts.append(fds(serve.pid))
            kinds.append(fd_kinds(serve.pid))
        took = time.time() - t0
        grew = {k: kinds[-1].get(k, 0) - kinds[0].get(k, 0) for k in set(kinds[0]) | set(kinds[-1])}
        return counts, took, {k: v for k, v in grew.items() if v}
    except BaseException:
        inst.failed = True
        raise
    finally:
        inst.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runtimes", default="node,python")
    args = ap.parse_args(argv)
    import ty_openworkflow as tow
    print("soak: %d passes per runtime through one serve, batches of %d, fds counted after each"
          % (args.passes, args.batch), flush=True)
    for runtime in args.runtimes.split(","):
        counts, took, grew = soak(tow, runtime, args.passes, args.batch)
        warm, high, last = counts[0], max(counts), counts[-1]
        print("  %-6s %d passes in %.0f s: fds warm %d, highest %d, last %d (growth %+d); "
              "per batch: %s"
              % (runtime, args.passes, took, warm, high, last, last - warm,
                 " ".join(map(str, counts))), flush=True)
        print("         grew from warm to last, by kind: %s" % (grew or "nothing"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
