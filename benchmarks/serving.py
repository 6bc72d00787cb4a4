"""`archipelago serve` under load on 127.0.0.1: latency, throughput, the gain from batching, memory per replica.

A K=2 ensemble of quickstart-sized experts (DiT width 64, depth 4; trained a few steps: cost does not depend
on the weights) is served on a private local Ray. For each server setting (serve.batch merging up to 8 calls
with exact per-request numbers; batching off; merged calls sharing one forward) a bounded load of R requests
runs at each concurrency; the same R requests are also sampled in-process with `archipelago generate`'s code
(one process, one after another): what the service adds or saves for the same work. Memory: RSS of every
Serve replica process next to one process holding the whole ensemble after sampling.

    python benchmarks/serving.py                      # writes benchmarks/results/serving.json
    python benchmarks/serving.py --requests 200 --concurrency 1,8,32 --n 2 --steps 8
    python benchmarks/serving.py --quick              # tiny sizes, meaningless numbers (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_common import machine, train_small_ensemble, write_report

CFG = 2.0   # the service's default guidance (expert.cfg_scale), given explicitly to both sides
QUICKSTART_DIMS = {"hidden_size": 64, "depth": 4, "num_heads": 4}
SETTINGS = {   # name -> serve: overrides
    "batched": {"batch_max_size": 8, "exact": True},
    "unbatched": {"batch_max_size": 1, "exact": True},
    "batched-shared-forward": {"batch_max_size": 8, "exact": False},
}
RSS_OF_WHOLE = """
import json, sys, psutil, torch
torch.set_num_threads(1)
from archipelago.ensemble import load_ensemble
from archipelago.generate import generate
m = load_ensemble(sys.argv[1]); generate(m, int(sys.argv[2]), cfg_scale=2.0, steps=int(sys.argv[3]))
print(json.dumps({"rss_bytes": psutil.Process().memory_info().rss}))
"""


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _summary(latencies: list[float], wall: float, errors: int) -> dict[str, Any]:
    return {"requests": len(latencies) + errors, "errors": errors, "wall_s": round(wall, 3),
            "throughput_rps": round(len(latencies) / wall, 3) if wall else None,
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(1000 * _percentile(latencies, 0.99), 1) if latencies else None}


def _request(body: dict[str, Any]) -> dict[str, Any]:
    """One request body: seed varies, the rest is fixed (the same work for the service and in-process)."""
    return {"steps": body["steps"], "n": body["n"], "seed": body["seed"], "cfg": CFG, "routing": "top-1",
            "output": "safetensors"}


def load_test(base: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    def one(body: dict[str, Any]) -> float | None:
        t0 = time.perf_counter()
        req = urllib.request.Request(base + "/v1/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                resp.read()
        except (urllib.error.URLError, TimeoutError):
            return None
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        times = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    ok = [t for t in times if t is not None]
    return _summary(ok, wall, len(times) - len(ok))


def in_process(ens: str, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The same requests sampled one after another in this process (generate's code, the whole ensemble)."""
    from archipelago.ensemble import load_ensemble
    from archipelago.generate import generate

    model = load_ensemble(ens)
    lat = []
    t0 = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        model.mode = b["routing"]
        generate(model, b["n"], cfg_scale=b["cfg"], seed=b["seed"], steps=b["steps"])
        lat.append(time.perf_counter() - t)
    return _summary(lat, time.perf_counter() - t0, 0)


def replica_rss() -> dict[str, int]:
    """RSS of this machine's Serve replica processes of the app (ray::ServeReplica:archipelago:<name>)."""
    import psutil

    out: dict[str, int] = {}
    me = psutil.Process()
    for p in me.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            if "ServeReplica:archipelago:" in title:
                name = title.split("ServeReplica:archipelago:", 1)[1].split()[0].split(".")[0]
                out[name] = out.get(name, 0) + p.memory_info().rss
        except psutil.Error:
            pass
    return out


def serve_and_measure(ens: str, settings: dict[str, dict[str, Any]], bodies: list[dict[str, Any]],
                      concurrency: list[int], port: int) -> tuple[dict[str, Any], dict[str, int]]:
    import ray
    from ray import serve

    from archipelago.config import ServeConfig
    from archipelago.serve.app import APP_NAME, build_app

    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results: dict[str, Any] = {}
    rss: dict[str, int] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for name, over in settings.items():
            cfg = ServeConfig(port=port, token_env=None, max_concurrent=64, **over)
            serve.run(build_app(ens, cfg), name=APP_NAME, route_prefix="/", blocking=False)
            load_test(base, bodies[:4], 2)                                   # warm every replica
            results[name] = {}
            for c in concurrency:
                results[name][str(c)] = row = load_test(base, bodies, c)
                print(f"  {name:24s} c={c:<3d} p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
                      f"{row['throughput_rps']:6.2f} req/s  errors {row['errors']}", flush=True)
            info = json.loads(urllib.request.urlopen(base + "/v1/info", timeout=30).read())
            results[name]["batching"] = info["batching"]
            if not rss:
                rss = replica_rss()
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results, rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="Requests per load level.")
    ap.add_argument("--concurrency", default="1,8,32", help="Comma-separated client concurrency levels.")
    ap.add_argument("--n", type=int, default=2, help="Samples per request.")
    ap.add_argument("--steps", type=int, default=8, help="Sampler steps per request.")
    ap.add_argument("--port", type=int, default=18420)
    ap.add_argument("--quick", action="store_true", help="Tiny sizes (smoke test), numbers are meaningless.")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.steps = 8, "1,4", 2
    concurrency = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    report: dict[str, Any] = {"machine": machine(), "setup": {
        "experts": 2, "expert_dims": QUICKSTART_DIMS if not args.quick else "tiny", "routing": "top-1",
        "cfg": CFG, "n": args.n, "steps": args.steps, "requests": args.requests, "concurrency": concurrency,
        "settings": SETTINGS, "host": "127.0.0.1"}}
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as work:
        print("training a K=2 ensemble (a few steps)...", flush=True)
        ens = train_small_ensemble(Path(work), None if args.quick else QUICKSTART_DIMS, k=2, name="bench")
        bodies = [_request({"n": args.n, "steps": args.steps, "seed": s}) for s in range(args.requests)]
        print("in-process archipelago generate, one request after another:", flush=True)
        report["in_process"] = in_process(ens, bodies)
        r = report["in_process"]
        print(f"  {'in-process':24s}       p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
              f"{r['throughput_rps']:6.2f} req/s", flush=True)
        print("archipelago serve on 127.0.0.1:", flush=True)
        report["serve"], rss = serve_and_measure(ens, SETTINGS, bodies, concurrency, args.port)
        whole = subprocess.run([sys.executable, "-c", RSS_OF_WHOLE, ens, str(args.n), str(args.steps)],
                               capture_output=True, text=True, check=True, env={**os.environ,
                                                                             "PYTHONPATH": str(REPO)})
        report["memory"] = {"replica_rss_bytes": rss,
                            "one_process_whole_ensemble_rss_bytes": json.loads(whole.stdout)["rss_bytes"]}
    best = max(concurrency)
    b, u = report["serve"]["batched"][str(best)], report["serve"]["unbatched"][str(best)]
    s = report["serve"]["batched-shared-forward"][str(best)]
    report["summary"] = {
        "concurrency": best,
        "batching_gain_throughput": round(b["throughput_rps"] / u["throughput_rps"], 3),
        "shared_forward_gain_throughput": round(s["throughput_rps"] / u["throughput_rps"], 3),
        "serve_vs_in_process_throughput": round(b["throughput_rps"] / report["in_process"]["throughput_rps"], 3),
        "mean_batch_size_batched": report["serve"]["batched"]["batching"]["mean_batch_size"],
        "expert_replica_rss_mib": round(statistics.mean(v for k, v in rss.items() if k.startswith("expert"))
                                        / 2**20, 1) if rss else None,
        "whole_ensemble_process_rss_mib": round(report["memory"]["one_process_whole_ensemble_rss_bytes"] / 2**20, 1),
        "loadavg_at_end": os.getloadavg(),
    }
    print(json.dumps(report["summary"], indent=2))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
