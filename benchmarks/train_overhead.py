"""Platform overhead of the island training loop, and samples/s of every strategy at world size 1 and 2.

1. Overhead (DESIGN.md §7: <= 10% per step): `train_expert` (strategy single) against a bare ~20-line torch
   loop doing the same math on the same model, data and batch size (flow-matching loss, AdamW, grad
   clipping, EMA), alternated in one process for several repeats; steady-state seconds per step (the
   first `--warmup` steps and all checkpoint writes are excluded from both); the median ratio is reported.
2. Throughput: `python -m torch.distributed.run --nproc-per-node W -m archipelago.experts.train` for
   single / ddp / fsdp2 / deepspeed ZeRO-1/2/3 at W = 1, 2; samples/s is the median over the loop's
   metric windows after the first (checkpoint time excluded by the loop itself).

    python benchmarks/train_overhead.py                 # prints a table, writes benchmarks/results/...
    python benchmarks/train_overhead.py --steps 60 --repeats 3 --skip-strategies
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from archipelago.config import ArchipelagoConfig
from archipelago.data.prepare import prepare_data
from archipelago.data.shards import load_manifest, read_shard
from archipelago.experts.callbacks import TrainCallback
from archipelago.experts.dit import build_dit
from archipelago.experts.train import train_expert

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_overhead.json"


def bench_cfg(steps: int, **expert: object) -> ArchipelagoConfig:
    # The quickstart-sized expert: DiT-T dims on 16x16 digits, batch 64, checkpoints only at 1 and the end.
    return ArchipelagoConfig.model_validate({
        "name": "bench", "data": {"image_size": 16, "num_clusters": 2},
        "expert": {"hidden_size": 64, "depth": 4, "num_heads": 4, "patch_size": 2, "batch_size": 64,
                   "steps": steps, "warmup_steps": 5, "log_every": 10, "checkpoint_every": 10 ** 6, **expert}})


class _StepClock(TrainCallback):
    def __init__(self):
        self.marks: dict[int, float] = {}

    def on_step(self, step, metrics):
        self.marks[step] = time.perf_counter()


def _window_median(marks: dict[int, float], warmup: int) -> float:
    """Median seconds per step over the windows between consecutive marks after `warmup` (robust to bursts
    of load from other processes on a shared machine)."""
    steps = sorted(s for s in marks if s >= warmup)
    per_step = [(marks[b] - marks[a]) / (b - a) for a, b in itertools.pairwise(steps)]
    return statistics.median(per_step)


def ours_step_time(cfg: ArchipelagoConfig, data_url: str, out: str, warmup: int) -> float:
    """train_expert as users run it (metrics every log_every steps, JSONL, EMA, checkpoint at 1 and end)."""
    clock = _StepClock()
    train_expert(cfg, 0, data_url, out, callbacks=[clock], resume=False)
    return _window_median(clock.marks, warmup)


def bare_step_time(cfg: ArchipelagoConfig, data_url: str, warmup: int) -> float:
    """The loop a researcher would write by hand: the same math, nothing else."""
    e = cfg.expert
    m = load_manifest(data_url)
    shard = read_shard(data_url, 0, manifest=m)
    x_all, y_all = shard.images, shard.labels
    torch.manual_seed(e.seed)
    model = build_dit(e, m.image_shape[-1], m.image_shape[0], m.num_classes)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=e.lr, weight_decay=e.weight_decay, foreach=False)
    g = torch.Generator().manual_seed(e.seed)
    marks: dict[int, float] = {}
    for step in range(1, e.steps + 1):
        idx = torch.randint(0, len(x_all), (e.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(model(x_t, t, y), eps - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), e.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for pe, p in zip(ema, model.parameters()):
                pe.lerp_(p, 1 - e.ema_decay)
        if step % e.log_every == 0:
            loss.item()
            marks[step] = time.perf_counter()
    return _window_median(marks, warmup)


def overhead(data_url: str, steps: int, repeats: int, warmup: int, tmp: Path) -> dict:
    cfg = bench_cfg(steps)
    rows = []
    for r in range(repeats):
        bare = bare_step_time(cfg, data_url, warmup)
        ours = ours_step_time(cfg, data_url, str(tmp / f"overhead-{r}"), warmup)
        rows.append({"bare_s": bare, "ours_s": ours, "ratio": ours / bare})
        print(f"  repeat {r}: bare {bare * 1e3:.2f} ms/step, ours {ours * 1e3:.2f} ms/step, "
              f"ratio {ours / bare:.3f}", flush=True)
    return {"steps": steps, "warmup_steps_excluded": warmup, "repeats": rows,
            "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_bare_ms": 1e3 * statistics.median(r["bare_s"] for r in rows),
            "median_ours_ms": 1e3 * statistics.median(r["ours_s"] for r in rows),
            "threads": torch.get_num_threads()}


def strategy_throughput(data_url: str, steps: int, tmp: Path, worlds: list[int],
                        threads: int | None = None) -> list[dict]:
    cases = [("single", {}), ("ddp", {}), ("fsdp2", {}), ("deepspeed", {"zero_stage": 1}),
             ("deepspeed", {"zero_stage": 2}), ("deepspeed", {"zero_stage": 3})]
    out = []
    for world in worlds:
        for strategy, extra in cases:
            if strategy == "single" and world > 1:
                continue
            name = strategy + (f"-zero{extra['zero_stage']}" if extra else "")
            run = tmp / f"{name}-w{world}"
            cfg = bench_cfg(steps, strategy=strategy, **extra)
            cfg_path = tmp / f"{name}-w{world}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            per_rank = threads or max(1, (os.cpu_count() or 1) // world)
            env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "DS_ACCELERATOR": "cpu",
                   "PYTHONWARNINGS": "ignore"}
            train = ["-m", "archipelago.experts.train", "--config", str(cfg_path), "--shard", "0", "--data",
                     data_url, "--out", str(run), "--no-resume", "--progress", "off"]
            launch = ([sys.executable, *train] if strategy == "single" else
                      [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(world), *train])
            t0 = time.perf_counter()
            proc = subprocess.run(launch, check=False, capture_output=True, text=True, env=env, cwd=REPO)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"  {name} w{world}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                out.append({"strategy": name, "world_size": world, "error": proc.stderr[-500:]})
                continue
            windows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            sps = statistics.median(w["samples_per_s"] for w in windows[1:])
            out.append({"strategy": name, "world_size": world, "samples_per_s": sps,
                        "threads_per_rank": per_rank, "process_wall_s": wall})
            print(f"  {name:16s} world {world}: {sps:8.1f} samples/s  ({wall:.1f}s incl. start-up)", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--warmup", type=int, default=10, help="Steps excluded from the overhead timing.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--strategy-steps", type=int, default=60)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--skip-strategies", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the overhead runs and per rank for the strategy runs "
                        "(default: torch's choice / cpu_count // world size).")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="archipelago-bench-") as tmpdir:
        tmp = Path(tmpdir)
        data_url = str(tmp / "data")
        prepare_data(bench_cfg(1).data, data_url, progress=False)
        print(f"overhead: train_expert (single) vs bare torch loop, {args.repeats} repeats", flush=True)
        ov = overhead(data_url, args.steps, args.repeats, args.warmup, tmp)
        strategies = [] if args.skip_strategies else (
            print("throughput per strategy (torchrun subprocesses):", flush=True)
            or strategy_throughput(data_url, args.strategy_steps, tmp, [int(w) for w in args.worlds.split(",")],
                                   args.threads))

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "model": {"hidden_size": 64, "depth": 4, "image": "1x16x16", "batch_size": 64},
        "overhead": ov, "strategies": strategies, "goal": "median ratio <= 1.10 (DESIGN.md §7)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'measure':34s} {'value':>12s}")
    print(f"{'bare loop ms/step (median)':34s} {ov['median_bare_ms']:12.2f}")
    print(f"{'train_expert ms/step (median)':34s} {ov['median_ours_ms']:12.2f}")
    print(f"{'overhead ratio (median)':34s} {ov['median_ratio']:12.3f}")
    for s in strategies:
        value = f"{s['samples_per_s']:12.1f}" if "samples_per_s" in s else f"{'FAILED':>12s}"
        print(f"{s['strategy'] + ' w' + str(s['world_size']) + ' samples/s':34s} {value}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
