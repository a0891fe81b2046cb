"""What the cloudflare adapter costs on the platform's budgets, and how fast it recovers a lost response.

python3 tests/bench_cloudflare.py [--runs N]

Runs N runs of a 4-step workflow through the real Worker in miniflare behind
tests/fake_cloudflare.py (its platform behaviours on, scaled delays), then
cuts responses and times the recovery from late KV. Prints API calls and KV
writes per run (the budgets that matter: 1,200 API calls per 5 minutes, 1,000
KV writes a day on Free) and recovery times. Needs `make cf-tools`.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fake_cloudflare import FakeCloudflare, Platform, have_miniflare  # noqa: E402
import ty_openworkflow as tow  # noqa: E402

CODE = """async function workflow(input, { step }) {
  let x = input.x;
  for (const name of ["a", "b", "c", "d"]) x = await step(name, () => x + 1);
  return x;
}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cuts", type=int, default=5)
    ap.add_argument("--kv-delay", type=float, default=1.5, help="the fake's KV visibility delay, max seconds")
    args = ap.parse_args()
    if not have_miniflare():
        print("bench_cloudflare: skipped, miniflare is not installed (run `make cf-tools`)")
        return
    tmp = tempfile.mkdtemp(prefix="tyow-cfbench-")
    cf = FakeCloudflare(os.path.join(tmp, "cf"), platform=Platform.scaled(kv_delay_s=args.kv_delay))
    try:
        with open(os.path.join(tmp, "token"), "w") as f:
            f.write(cf.token)
        cfg = os.path.join(tmp, "config.yaml")
        with open(cfg, "w") as f:
            f.write("data_dir: %s/data\ntaskyou:\n  auto_create_tasks: false\nadapters:\n%s"
                    % (tmp, cf.config("cat %s/token" % tmp)))
        sc = tow.Sidecar(config_path=cfg)
        sc.deploy("bench", CODE, adapter="cloudflare")
        api0, writes0 = len(cf.calls), cf.kv_usage["write"]
        t0 = time.monotonic()
        ids = [sc.start("bench", {"x": i}, drive=False)["id"] for i in range(args.runs)]
        sc.tick()
        wall = time.monotonic() - t0
        done = sum(sc.status(r)["status"] == "completed" for r in ids)
        api_per_run = (len(cf.calls) - api0) / args.runs
        writes_per_run = (cf.kv_usage["write"] - writes0) / args.runs
        events = statistics.mean(len(sc.events(r)) for r in ids)
        recov = []
        for i in range(args.cuts):
            run_id = sc.start("bench", {"x": 100 + i}, drive=False)["id"]
            cf.cut_stream_after = 1
            t = time.monotonic()
            sc.tick()
            st = sc.status(run_id)
            if st["status"] == "completed":
                recov.append(time.monotonic() - t)
        out = {"runs": args.runs, "completed": done, "wall_s": round(wall, 2),
               "api_calls_per_run": round(api_per_run, 2), "kv_writes_per_run": round(writes_per_run, 2),
               "events_per_run": round(events, 1), "kv_delay_max_s": args.kv_delay,
               "lost_response_recovered": "%d/%d" % (len(recov), args.cuts),
               "recovery_s_median": round(statistics.median(recov), 2) if recov else None,
               "recovery_s_max": round(max(recov), 2) if recov else None}
        print(json.dumps(out, indent=2))
        sc.close()
    finally:
        cf.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
