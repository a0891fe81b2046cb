"""Benchmark (not a test): does a load on the dashboard and /metrics slow the runs down?

A real `serve` with the dashboard on runs 200 runs (4 trivial steps each, node): alone, under a
steady load (10 clients, each fetching /api/runs, a run page, /metrics or /api/summary every 0.5 s:
20 requests/s, a room full of open pages and scrapers), and under a flood (4 clients as fast as
they can). Prints the wall times, the ratios to alone, and the rate and latency each load got.
Run: `python3 tests/bench_dashboard.py`.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "ty_openworkflow.py")
sys.path.insert(0, ROOT)
import ty_openworkflow as tow  # noqa: E402

WF = ("async function workflow(input, { step }) { let x = input.x; for (let i = 0; i < 4; i++) "
      "x = await step('s' + i, () => x + 1); return x; }")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(runs, clients, pause_s):
    tmp = tempfile.mkdtemp(prefix="tyow-dashbench-")
    port = free_port()
    cfg = os.path.join(tmp, "config.yaml")
    with open(cfg, "w") as f:
        f.write("data_dir: %s/data\ntaskyou:\n  auto_create_tasks: false\ndashboard:\n  enabled: true\n"
                "  host: 127.0.0.1\n  port: %d\n" % (tmp, port))
    for k in [k for k in os.environ if k.startswith("TY_OPENWORKFLOW_")]:
        del os.environ[k]
    sc = tow.Sidecar(config_path=cfg)
    sc.deploy("w", WF)
    serve = subprocess.Popen([sys.executable, MODULE, "--config", cfg, "serve"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    base = "http://127.0.0.1:%d" % port
    stop, lat, errors = threading.Event(), [], []
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        warm = sc.start("w", {"x": 0})["id"]
        while sc.store.get_run(warm)["status"] != "completed":
            time.sleep(0.01)

        def hammer(n):
            paths = ["/api/runs?limit=50", "/api/runs/" + warm, "/metrics", "/api/summary"]
            i = n
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    urllib.request.urlopen(base + paths[i % len(paths)], timeout=10).read()
                    lat.append(time.perf_counter() - t0)
                except OSError as exc:
                    errors.append(str(exc))
                i += 1
                if pause_s:
                    stop.wait(pause_s)
        threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(clients)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        ids = [sc.start("w", {"x": 0})["id"] for _ in range(runs)]
        while sc.store.query_one("SELECT count(*) AS n FROM runs WHERE status = 'completed'")["n"] < runs + 1:
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(10)
        assert len(ids) == runs
        return wall, lat, errors
    finally:
        stop.set()
        serve.terminate()
        serve.wait(20)
        sc.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if not shutil.which("node"):
        print("node not on PATH: nothing to measure")
        return 0
    out = {"runs": 200, "reps": 3}
    for name, clients, pause_s in (("alone", 0, 0), ("steady", 10, 0.5), ("flood", 4, 0)):
        walls, rates, lats, errs = [], [], [], 0
        for _ in range(3):
            wall, lat, errors = one_round(200, clients, pause_s)
            walls.append(wall)
            rates.append(len(lat) / wall)
            lats += lat
            errs += len(errors)
        out[name] = {"wall_s": round(statistics.median(walls), 3)}
        if clients:
            out[name].update(requests_per_s=round(statistics.median(rates), 1), errors=errs,
                             latency_ms_median=round(1000 * statistics.median(lats), 1),
                             latency_ms_p99=round(1000 * sorted(lats)[int(0.99 * (len(lats) - 1))], 1),
                             ratio_to_alone=round(statistics.median(walls) / out["alone"]["wall_s"], 3))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
