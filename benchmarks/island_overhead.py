"""Platform overhead of an island: the same expert on the same shard trained by `train_expert` in-process
and as an island (Ray Train TorchTrainer, 1 worker, gloo, MLflow metrics from rank 0, ray.train.report at
every checkpoint), alternated in one run (DESIGN.md §7 goal: <= 10% per step).

Per run, from the run's own metrics.jsonl:
  step_s        median seconds per optimizer step over the loop's metric windows after the first
                (checkpoint writes and the callbacks around them excluded by the loop itself)
  loop_step_s   (time of the last metric line - time of the first) / steps between them: everything
                inside the loop, checkpoints, Ray reports and MLflow flushes included
  wall_s        the whole call: in-process = train_expert; island = TrainerFit incl. worker start-up
Both sides use the same torch thread count (--threads = the island's cpus_per_worker).

    python benchmarks/island_overhead.py                      # writes benchmarks/results/island_overhead.json
    python benchmarks/island_overhead.py --steps 100 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "island_overhead.json"


def metrics_timing(path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    windows = [r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]]
    loop = (rows[-1]["time"] - rows[0]["time"]) / max(1, rows[-1]["step"] - rows[0]["step"])
    return {"step_s": statistics.median(windows), "loop_step_s": loop, "windows": len(windows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads = the island's cpus_per_worker")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    import mlflow
    import ray
    import torch

    from archipelago.cluster.spec import ClusterSpec
    from archipelago.config import ArchipelagoConfig
    from archipelago.data.prepare import prepare_data
    from archipelago.experts.train import train_expert
    from archipelago.orchestration.islands import run_island
    from archipelago.orchestration.tracking import Tracker

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="arch-island-overhead-"))
    raw = {"name": "island-overhead", "data": {"num_clusters": 2, "seed": 0},
           "expert": {"hidden_size": args.hidden, "depth": args.depth, "num_heads": 4, "steps": args.steps,
                      "batch_size": args.batch, "warmup_steps": 10, "checkpoint_every": max(1, args.steps // 4),
                      "log_every": 10},
           "islands": {"num_workers": 1, "cpus_per_worker": float(args.threads), "max_failures": 0},
           "tracking": {"experiment": "island-overhead"}, "storage": {"root": str(work)}}
    cfg = ArchipelagoConfig.model_validate(raw)
    data_url = str(work / "data")
    manifest = prepare_data(cfg.data, data_url, progress=False)
    spec = ClusterSpec.from_config(cfg, manifest, data_url=data_url, root=str(work))
    tracker = Tracker.open(cfg, str(work))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, logging_level="ERROR")
    ray_init_s = time.perf_counter() - t0

    runs: list[dict] = []
    for rep in range(args.repeats):
        # ---- in-process: the bare train_expert call ----------------------------------------------------
        out = work / f"inproc-{rep}"
        t0 = time.perf_counter()
        train_expert(cfg, args.shard, data_url, str(out), resume=False)
        runs.append({"kind": "in_process", "repeat": rep, "wall_s": time.perf_counter() - t0,
                     **metrics_timing(out / "metrics.jsonl")})
        # ---- island: TorchTrainer with 1 worker, MLflow + Ray reports ----------------------------------
        plan = spec.islands[args.shard]
        out = work / f"island-{rep}"
        from dataclasses import replace

        plan = replace(plan, name=f"island-{args.shard}-rep{rep}", out_url=str(out))
        run_id = tracker.child(plan.name, plan.name, {}, {"archipelago.shard": args.shard})
        t0 = time.perf_counter()
        res = run_island(plan, cfg, str(work), max_failures=0, tracking=tracker.worker_tracking(run_id))
        if res.status != "trained":
            print(f"island failed: {res.error}", file=sys.stderr)
            return 1
        runs.append({"kind": "island", "repeat": rep, "wall_s": time.perf_counter() - t0,
                     **metrics_timing(out / "metrics.jsonl")})
        print(json.dumps(runs[-2]), json.dumps(runs[-1]), sep="\n", flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["kind"] == kind)

    ratios = [b["step_s"] / a["step_s"] for a, b in zip(runs[::2], runs[1::2])]
    loop_ratios = [b["loop_step_s"] / a["loop_step_s"] for a, b in zip(runs[::2], runs[1::2])]
    result = {
        "benchmark": "island_overhead",
        "what": "seconds per optimizer step: train_expert in-process vs the same call inside a 1-worker Ray "
                "Train island (gloo, MLflow rank-0 metrics, ray.train.report per checkpoint), alternated",
        "goal": "island step time <= 1.10x in-process (DESIGN.md section 7)",
        "config": {"steps": args.steps, "repeats": args.repeats, "threads": args.threads, "hidden": args.hidden,
                   "depth": args.depth, "batch": args.batch, "shard": args.shard,
                   "shard_samples": manifest.counts[args.shard], "image_shape": manifest.image_shape,
                   "checkpoint_every": cfg.expert.checkpoint_every, "log_every": cfg.expert.log_every},
        "in_process": {"step_s": med("in_process", "step_s"), "loop_step_s": med("in_process", "loop_step_s"),
                       "wall_s": med("in_process", "wall_s")},
        "island": {"step_s": med("island", "step_s"), "loop_step_s": med("island", "loop_step_s"),
                   "wall_s": med("island", "wall_s")},
        "ratio_step": statistics.median(ratios),
        "ratio_loop_step": statistics.median(loop_ratios),
        "ratios_per_repeat": ratios,
        "island_startup_s": med("island", "wall_s") - med("island", "loop_step_s") * args.steps,
        "ray_init_s": ray_init_s,
        "runs": runs,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "ray": ray.__version__, "mlflow": mlflow.__version__,
                    "torch_threads": args.threads, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result["meets_goal"] = result["ratio_step"] <= 1.10
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"in-process {result['in_process']['step_s'] * 1e3:.2f} ms/step, island "
          f"{result['island']['step_s'] * 1e3:.2f} ms/step: ratio {result['ratio_step']:.3f} "
          f"(loop incl. checkpoints/reports {result['ratio_loop_step']:.3f}); island start-up "
          f"{result['island_startup_s']:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
