"""What top-1 routing costs next to sampling one expert, router included (goal: <= 1.15x).

Both are timed side by side in one process, interleaved round by round (so machine load hits both
alike), on the same noise, labels, steps and guidance. The experts are DiT-T sized like the quickstart
(weights randomised: cost does not depend on them); the router is the quickstart router *trained* on the
K-way digits shards, so it spreads samples over the experts as it would in real use (a uniform router
would send everything to one expert and hide the gather/scatter cost).

    python benchmarks/routing_cost.py                      # writes benchmarks/results/routing_cost.json
    python benchmarks/routing_cost.py --n 64 --steps 16 --rounds 7 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from archipelago.config import ArchipelagoConfig
from archipelago.ensemble import from_models
from archipelago.eval.flops import dit_forward_flops
from archipelago.experts.dit import DiT
from archipelago.experts.sampling import sample


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="Experts.")
    ap.add_argument("--n", type=int, default=64, help="Samples per batch.")
    ap.add_argument("--steps", type=int, default=16, help="Sampler steps.")
    ap.add_argument("--cfg", type=float, default=2.0, help="Guidance scale (the router runs on the cond half).")
    ap.add_argument("--rounds", type=int, default=7, help="Interleaved timing rounds (medians are reported).")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    ap.add_argument("--work", default=None, help="Where to put data + router (default: a temp dir).")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/routing_cost.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from archipelago.data.prepare import prepare_data
    from archipelago.router.train import train_router

    # ---- a real router on K digit clusters ---------------------------------------------------------
    work = Path(args.work or tempfile.mkdtemp(prefix="routing-cost-"))
    cfg = ArchipelagoConfig()
    cfg.data.num_clusters = args.k
    prepare_data(cfg.data, str(work / "data"), progress=False)
    t0 = time.perf_counter()
    rres = train_router(cfg, str(work / "data"), str(work / "router"))
    from archipelago.router.train import load_router

    router, _ = load_router(rres["router"])
    print(f"router trained in {time.perf_counter() - t0:.1f}s (alignment {rres['metrics']['alignment']:.3f})",
          file=sys.stderr)

    # ---- experts: DiT-T as in the quickstart, randomised weights -----------------------------------
    experts = []
    for k in range(args.k):
        torch.manual_seed(k)
        e = DiT(input_size=16, in_channels=1, patch_size=cfg.expert.patch_size, hidden_size=cfg.expert.hidden_size,
                depth=cfg.expert.depth, num_heads=cfg.expert.num_heads, num_classes=10)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.02 * torch.randn_like(p))
        experts.append(e.eval())
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.n, 1, 16, 16, generator=g)
    y = torch.arange(args.n) % 10
    modes = ["top-1", "top-2", "full"] if args.k >= 2 else ["top-1"]
    ensembles = {m: from_models(experts, router, m) for m in modes}

    class Chunked(torch.nn.Module):
        """One expert run on K equal slices of every batch: the per-call batch sizes top-1 routing produces
        on average, without the router or gather/scatter. top-1 / chunked isolates the routing overhead
        from the CPU's batch-size efficiency (which can make smaller calls cheaper per sample)."""

        def __init__(self, inner: torch.nn.Module, k: int):
            super().__init__()
            self.inner, self.k, self.num_classes = inner, k, inner.num_classes

        def forward(self, x, t, y):
            return torch.cat([self.inner(*a) for a in zip(x.chunk(self.k), t.chunk(self.k), y.chunk(self.k))])

    chunked = Chunked(experts[0], args.k)

    def run(fn) -> tuple[float, float]:
        """(wall s, CPU s of this process) for one full sampling run."""
        w, c = time.perf_counter(), time.process_time()
        sample(fn, noise, y, steps=args.steps, cfg_scale=args.cfg, null_class=10)
        return time.perf_counter() - w, time.process_time() - c

    # Warm-up, then interleaved rounds (expert, top-1, top-2, full, expert, ...). Other jobs share the
    # machine, so each round's ratio is taken between runs that are adjacent in time and the median of
    # the per-round ratios is reported; CPU time of this process is reported beside wall time because it
    # is far less sensitive to what else runs.
    run(experts[0])
    run(chunked)
    for e in ensembles.values():
        run(e)
    names = ["one_expert", "one_expert_chunked", *modes]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    counts: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in names:
            fn = {"one_expert": experts[0], "one_expert_chunked": chunked}.get(name) or ensembles[name]
            if name in ensembles:
                fn.reset_counters()
            w, c = run(fn)
            wall[name].append(w)
            cpu[name].append(c)
            if name in ensembles:
                counts[name] = {"expert_calls": fn.expert_calls, "expert_samples": list(fn.expert_samples),
                                "router_calls": fn.router_calls, "router_samples": fn.router_samples}
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    def ratio(series: dict[str, list[float]], m: str) -> float:
        return statistics.median(a / b for a, b in zip(series[m], series["one_expert"]))

    # ---- FLOPs of the same work ----------------------------------------------------------------------
    from archipelago.router.model import router_forward_flops

    e_flops = dit_forward_flops(experts[0].config_dict)
    r_flops = router_forward_flops(router.config_dict)
    branches = 2 if args.cfg != 1.0 else 1
    one = e_flops * branches * args.n * args.steps
    flops = {"one_expert": one}
    for m in modes:
        flops[m] = e_flops * sum(counts[m]["expert_samples"]) + r_flops * counts[m]["router_samples"]

    result = {
        "benchmark": "routing_cost", "goal": "top-1 wall time <= 1.15x one expert, router included",
        "k": args.k, "n": args.n, "steps": args.steps, "cfg_scale": args.cfg, "rounds": args.rounds,
        "wall_s_median": med, "cpu_s_median": med_cpu, "wall_s_all": wall, "cpu_s_all": cpu,
        "ratio_vs_one_expert": {m: ratio(wall, m) for m in ["one_expert_chunked", *modes]},
        "cpu_ratio_vs_one_expert": {m: ratio(cpu, m) for m in ["one_expert_chunked", *modes]},
        "top1_vs_chunked_expert": statistics.median(
            a / b for a, b in zip(wall["top-1"], wall["one_expert_chunked"])),
        "flops": flops, "flops_ratio_vs_one_expert": {m: flops[m] / one for m in modes},
        "expert_forward_flops_per_sample": e_flops, "router_forward_flops_per_sample": r_flops,
        "router": {"config": router.config_dict, "alignment": rres["metrics"]["alignment"],
                   "params": sum(p.numel() for p in router.parameters())},
        "counts": counts, "machine": _machine(), "created_at": time.time(),
    }
    result["top1_within_goal"] = result["ratio_vs_one_expert"]["top-1"] <= 1.15
    result["load_avg_1m"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sampling cost, K={args.k}, n={args.n}, {args.steps} steps, cfg {args.cfg}")
    for col in ("model", "wall s", "wall x", "CPU x", "FLOPs x", "expert calls", "samples/expert"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("one expert", f"{med['one_expert']:.2f}", "1.00", "1.00", "1.00", str(args.steps),
                  str(branches * args.n * args.steps))
    table.add_row(f"one expert, {args.k} chunks", f"{med['one_expert_chunked']:.2f}",
                  f"{result['ratio_vs_one_expert']['one_expert_chunked']:.2f}",
                  f"{result['cpu_ratio_vs_one_expert']['one_expert_chunked']:.2f}", "1.00",
                  str(args.k * args.steps), str(branches * args.n * args.steps))
    for m in modes:
        table.add_row(f"ensemble {m}", f"{med[m]:.2f}", f"{result['ratio_vs_one_expert'][m]:.2f}",
                      f"{result['cpu_ratio_vs_one_expert'][m]:.2f}", f"{result['flops_ratio_vs_one_expert'][m]:.2f}",
                      str(counts[m]["expert_calls"]), " ".join(str(s) for s in counts[m]["expert_samples"]))
    Console(width=140).print(table)
    print(f"top-1 / one expert: wall {result['ratio_vs_one_expert']['top-1']:.3f}, CPU "
          f"{result['cpu_ratio_vs_one_expert']['top-1']:.3f} (goal <= 1.15; load avg {result['load_avg_1m']:.1f}); "
          f"top-1 / same expert on {args.k} chunks: {result['top1_vs_chunked_expert']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
