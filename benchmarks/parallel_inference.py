"""Parallel inference modes side by side, one table per resolution: latency, speedup, bytes per step, peak
memory, quality vs one device.

Every row runs in freshly spawned processes (gloo on CPU, 1 thread per rank) through the same
`run_parallel_sampling` the torchrun and Ray launchers call; each rank does one untimed warm-up run, then
the fastest of `--timed-runs` runs is reported (slowest rank). Approximate modes are compared with the
single-device output from the same noise (the baseline named in the row).

    OMP_NUM_THREADS=1 python benchmarks/parallel_inference.py                  # 256 and 1,024 tokens, N=1,2,4
    OMP_NUM_THREADS=1 python benchmarks/parallel_inference.py --sizes 32 --worlds 1 2   # one quick table
    OMP_NUM_THREADS=1 python benchmarks/parallel_inference.py --quick          # smoke run (meaningless numbers)

The latency tables use DiTs with random weights perturbed fan-in-scaled (see `perturbed`): the adaLN-Zero
init would output exactly 0, and no trained model of these sizes exists offline. Stale-K/V quality
depends on how smoothly a model's activations change between steps, so the quality that matters is the
`trained` section: a digits expert trained here, DistriFusion / PipeFusion / naive patches vs one device in PSNR and in
Fréchet distance in the digits classifier's features (the offline stand-in for FID; LPIPS needs weights
we cannot download).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import machine, write_report

from archipelago.eval.fidelity import psnr
from archipelago.experts.checkpoint import save_for_inference
from archipelago.experts.dit import DiT
from archipelago.inference.config import ParallelConfig
from archipelago.inference.local import launch_local
from archipelago.inference.runner import SamplingSpec

RESULTS = Path(__file__).resolve().parent / "results" / "parallel_inference.json"
MODEL = {"input_size": 32, "in_channels": 4, "patch_size": 2, "hidden_size": 256, "depth": 8, "num_heads": 8,
         "num_classes": 10, "class_dropout": 0.1}   # input_size 32: 16x16 = 256 tokens; 64: 32x32 = 1,024


def model_args(size: int) -> dict[str, Any]:
    return {**MODEL, "input_size": size}


def tokens(size: int) -> int:
    return (size // MODEL["patch_size"]) ** 2
WEIGHT_GAIN = 0.5
PIPE_PATCHES = 4   # PipeFusion patches per image: a bubble of (N-1)/(M+N-1) per evaluation
SPLIT_MODES = ("naive_patch", "sync_patch", "distrifusion (warmup 1, group 1)", "ulysses", "ring",
               "usp (ulysses 2 x ring 2)", f"pipefusion (warmup 1, M={PIPE_PATCHES})")


# ----------------------------------------------------------------------------------------------------
# Checkpoints (random-init, perturbed) written in the real formats the launchers read
# ----------------------------------------------------------------------------------------------------

def perturbed(module: torch.nn.Module, seed: int, gain: float = WEIGHT_GAIN) -> torch.nn.Module:
    """Add N(0, (gain / sqrt(fan_in))^2) to every weight and N(0, 0.02^2) to every bias / 1-D parameter.

    Scaling by fan-in keeps activations O(1) at any width, like a trained model; an unscaled perturbation
    makes a 256-wide, 8-block DiT chaotic in t (its velocity decorrelates between sampler steps), which
    is the worst case for stale K/V (see the notes in the results file).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = gain / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.02
            p.add_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def perturbed_router(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def save_expert(model: DiT, url: str) -> str:
    return save_for_inference(model, url)


def save_router(num_experts: int, url: str, seed: int, size: int) -> str:
    from archipelago.router.model import Router
    from archipelago.router.train import save_router as save

    router = Router(in_channels=MODEL["in_channels"], input_size=size, num_experts=num_experts,
                    hidden_size=32, depth=2, num_classes=MODEL["num_classes"])
    router = perturbed_router(router, seed)
    with torch.no_grad():   # a strong label path, so one batch is split between experts
        router.y_embedder.embedding_table.weight.mul_(20)
    return save(router, url, {})


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------

def plan(worlds: list[int], expert: str, ensembles: dict[int, tuple[list[str], str]], steps: int,
         num_samples: int, quick: bool = False) -> list[dict[str, Any]]:
    """(name, baseline, spec, pcfg, threads) of every row, baselines first."""
    base = SamplingSpec(experts=[expert], num_samples=num_samples, steps=steps, device="cpu", seed=0)
    cfg = base.model_copy(update={"cfg_scale": 2.0})
    rows: list[dict[str, Any]] = []

    def add(name: str, baseline: str | None, spec: SamplingSpec, threads: int = 1, **pcfg: Any) -> None:
        rows.append({"name": name, "baseline": baseline, "spec": spec, "threads": threads,
                     "pcfg": ParallelConfig(**pcfg)})

    add("single", None, base)
    add("single (2 threads)", "single", base, threads=2)
    add("single +CFG", None, cfg)
    for k, (urls, router) in ensembles.items():
        add(f"single ensemble K={k} top-1", None, base.model_copy(update={"experts": urls, "router": router}))
    for w in [w for w in worlds if w > 1]:
        add("naive_patch", "single", base, mode="naive_patch", world_size=w)
        add("sync_patch", "single", base, mode="sync_patch", world_size=w)
        add("distrifusion (warmup 1, group 1)", "single", base, mode="distrifusion", world_size=w,
            warmup_steps=1)
        add(f"distrifusion (warmup 1, group {MODEL['depth']})", "single", base, mode="distrifusion",
            world_size=w, warmup_steps=1, comm_group_layers=MODEL["depth"])
        if w == 2:
            add("cfg_parallel", "single +CFG", cfg, mode="cfg_parallel", world_size=2)
        else:
            add(f"cfg_parallel x sync_patch ({w // 2})", "single +CFG", cfg, mode="cfg_parallel",
                world_size=w, patch_mode="sync_patch")
            add(f"cfg_parallel x distrifusion ({w // 2})", "single +CFG", cfg, mode="cfg_parallel",
                world_size=w, patch_mode="distrifusion", warmup_steps=1)
        add("ulysses", "single", base, mode="ulysses", world_size=w)
        if not quick:
            add("ring", "single", base, mode="ring", world_size=w)
        if w >= 4:
            add(f"usp (ulysses 2 x ring {w // 2})", "single", base, mode="usp", world_size=w, ulysses_degree=2)
            add(f"cfg_parallel x ulysses ({w // 2})", "single +CFG", cfg, mode="ulysses", world_size=w,
                cfg_degree=2)
        add(f"pipefusion (warmup 1, M={PIPE_PATCHES})", "single", base, mode="pipefusion", world_size=w,
            warmup_steps=1, pipe_patches=PIPE_PATCHES)
        if w in ensembles:
            urls, router = ensembles[w]
            add(f"expert_parallel K={w} top-1", f"single ensemble K={w} top-1",
                base.model_copy(update={"experts": urls, "router": router}), mode="expert_parallel",
                world_size=w)
    return rows


def run_row(row: dict[str, Any], timed_runs: int) -> dict[str, Any]:
    pcfg: ParallelConfig = row["pcfg"]
    t0 = time.perf_counter()
    results = launch_local(row["spec"], pcfg, warmup_runs=1, timed_runs=timed_runs,
                           threads_per_rank=row["threads"], timeout_s=600, spawn=True)
    r0 = results[0]
    steps = row["spec"].steps
    return {
        "name": row["name"], "baseline": row["baseline"], "describe": pcfg.describe(),
        "world_size": pcfg.world_size, "threads_per_rank": row["threads"],
        "latency_s": max(r.latency_s for r in results),
        "cpu_s_max_rank": max(r.cpu_s for r in results),
        "cpu_s_all_ranks": sum(r.cpu_s for r in results),
        "peak_rss_mib": max(r.peak_rss_bytes for r in results) / 2**20,
        "peak_rss_growth_mib": max(r.peak_mem_bytes for r in results) / 2**20,
        "param_mib_per_rank": max(r.param_bytes for r in results) / 2**20,
        "bytes_per_step_rank0": r0.comm.get("total_bytes", 0) / steps,
        "bytes_per_step_all_ranks": sum(r.comm.get("total_bytes", 0) for r in results) / steps,
        "comm_by_type_rank0": r0.comm.get("by_type", {}),
        "comm_wait_s_rank0": sum(c["seconds"] for c in r0.comm.get("by_type", {}).values()),
        "wall_s_incl_spawn": time.perf_counter() - t0,
        "_samples": r0.samples,
    }


def trained_quality(work: Path, worlds: list[int], steps_list: list[int], n: int,
                    train_steps: int) -> dict[str, Any]:
    """A digits expert trained here; approximate modes vs one device in PSNR and in feature FD, per step count.

    FD columns: `fd_vs_single` compares the parallel samples with the single-device samples (how far the
    approximation moves the distribution), `fd_vs_data` with the data (what a user sees; single's own
    value is the reference).
    """
    from archipelago.config import load_config
    from archipelago.data.prepare import prepare_data
    from archipelago.data.shards import read_shard
    from archipelago.eval.classifier import load_or_train_classifier
    from archipelago.eval.metrics import feature_distance
    from archipelago.experts.train import train_expert
    from archipelago.inference.launch import sampling_spec

    cfg = load_config(None, ["data.num_clusters=1", "expert.hidden_size=64", "expert.depth=4",
                             "expert.num_heads=4", f"expert.steps={train_steps}", "expert.batch_size=64",
                             "expert.lr=0.001", f"expert.checkpoint_every={train_steps}",
                             "expert.ema_decay=0.99", "tracking.enabled=false"])
    data = str(work / "digits")
    t0 = time.perf_counter()
    prepare_data(cfg.data, data, progress=False)
    expert = train_expert(cfg, 0, data, str(work / "digits-expert"))["final_checkpoint"]
    train_s = time.perf_counter() - t0
    classifier, _ = load_or_train_classifier(data)
    images = read_shard(data, 0).images
    rows = []
    for steps in steps_list:
        spec = sampling_spec(str(expert), n=n, steps=steps, cfg_scale=2.0, seed=0, device="cpu")
        ref = launch_local(spec, ParallelConfig(), timeout_s=1200)[0].samples
        row: dict[str, Any] = {"steps": steps, "single_fd_vs_data": feature_distance(ref, images, classifier)}
        for w in [w for w in worlds if w > 1]:
            for name, pcfg in (("naive_patch", ParallelConfig(mode="naive_patch", world_size=w)),
                               ("distrifusion", ParallelConfig(mode="distrifusion", world_size=w,
                                                               warmup_steps=1)),
                               ("pipefusion", ParallelConfig(mode="pipefusion", world_size=w, warmup_steps=1,
                                                             pipe_patches=PIPE_PATCHES)),
                               ("sync_patch", ParallelConfig(mode="sync_patch", world_size=w))):
                got = launch_local(spec, pcfg, timeout_s=1200)[0].samples
                p = psnr(got, ref)
                row[f"{name}@{w}"] = {"psnr_db": "inf" if math.isinf(p) else round(p, 2),
                                      "fd_vs_single": feature_distance(got, ref, classifier),
                                      "fd_vs_data": feature_distance(got, images, classifier)}
        print(f"   trained, {steps} steps: " + json.dumps(row, default=float)[:400], flush=True)
        rows.append(row)
    return {"model": "DiT 16x16 (64 tokens), hidden 64, depth 4, trained on all 1,797 digits",
            "train_steps": train_steps, "train_s": train_s, "num_samples": n, "sampler": "euler",
            "cfg_scale": 2.0, "rows": rows}


def trained_table(q: dict[str, Any]) -> str:
    lines = ["| steps | mode | world | PSNR dB vs single | FD vs single | FD vs data (single: ...) |",
             "|---|---|---|---|---|---|"]
    for row in q["rows"]:
        for key, v in row.items():
            if "@" not in key:
                continue
            mode, w = key.split("@")
            lines.append(f"| {row['steps']} | {mode} | {w} | {v['psnr_db']} | {v['fd_vs_single']:.2f} | "
                         f"{v['fd_vs_data']:.1f} (single {row['single_fd_vs_data']:.1f}) |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| mode | world | latency s | vs baseline | CPU s (max rank) | peak RSS MiB | RSS growth MiB "
            "| params MiB/rank | KiB/step rank0 | KiB/step all | comm wait s | async msgs | PSNR dB "
            "| max abs diff |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        kv = r["comm_by_type_rank0"].get("attn_kv", {})
        p = r.get("psnr_db")
        psnr_s = "-" if p is None else ("exact (inf)" if math.isinf(p) else f"{p:.1f}")
        lines.append(
            f"| {r['name']} | {r['world_size']} | {r['latency_s']:.3f} | "
            f"{r.get('speedup', 1.0):.2f}x | {r['cpu_s_max_rank']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_growth_mib']:.1f} | {r['param_mib_per_rank']:.1f} | "
            f"{r['bytes_per_step_rank0'] / 1024:.1f} | {r['bytes_per_step_all_ranks'] / 1024:.1f} | "
            f"{r['comm_wait_s_rank0']:.3f} | {kv.get('async_calls', 0)} | {psnr_s} | "
            f"{r.get('max_abs_diff', 0.0):.2e} |")
    return "\n".join(lines)


def run_size(size: int, worlds: list[int], steps: int, num_samples: int, timed_runs: int,
             tmp: str, only: list[str] | None = None) -> list[dict[str, Any]]:
    expert = save_expert(perturbed(DiT(**model_args(size)), seed=0), f"{tmp}/s{size}/expert")
    ensembles = {}
    for k in sorted({w for w in worlds if w > 1}):
        urls = [save_expert(perturbed(DiT(**model_args(size)), seed=10 * k + i), f"{tmp}/s{size}/ens{k}/e{i}")
                for i in range(k)]
        ensembles[k] = (urls, save_router(k, f"{tmp}/s{size}/ens{k}/router", seed=k, size=size))
    done: dict[str, dict[str, Any]] = {}
    rows = plan(worlds, expert, ensembles, steps, num_samples, quick=only == ["quick"])
    if only and only != ["quick"]:   # the rows named, and the baselines they are measured against
        keep = {r["name"] for r in rows if any(o in r["name"] for o in only)}
        keep |= {r["baseline"] for r in rows if r["name"] in keep}
        rows = [r for r in rows if r["name"] in keep]
    for row in rows:
        print(f"-- {tokens(size)} tokens: {row['name']} ({row['pcfg'].describe()})", flush=True)
        res = run_row(row, timed_runs)
        base = done.get(f"{row['baseline']}@1") if row["baseline"] else None
        if base is not None:
            res["speedup"] = base["latency_s"] / res["latency_s"]
            res["psnr_db"] = psnr(res["_samples"], base["_samples"])
            res["max_abs_diff"] = float((res["_samples"] - base["_samples"]).abs().max())
        done[f"{res['name']}@{res['world_size']}"] = res
        print(f"   latency {res['latency_s']:.3f}s  cpu {res['cpu_s_max_rank']:.2f}s  "
              f"rss {res['peak_rss_mib']:.0f} MiB  "
              f"{res['bytes_per_step_rank0'] / 1024:.1f} KiB/step  psnr {res.get('psnr_db')}", flush=True)
    return list(done.values())


def crossover(tables: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per resolution and world size: speedup of the modes that split one image over one device with one thread and with
    as many threads as the ranks use together (the fair CPU baseline)."""
    out = []
    for size, rows in tables.items():
        by = {(r["name"], r["world_size"]): r for r in rows}
        single, single2 = by.get(("single", 1)), by.get(("single (2 threads)", 1))
        for (name, w), r in by.items():
            if w == 1 or name not in SPLIT_MODES:
                continue
            out.append({"tokens": tokens(size), "mode": name, "world_size": w,
                        "speedup_vs_1_thread": single["latency_s"] / r["latency_s"],
                        "speedup_vs_2_threads": (single2["latency_s"] / r["latency_s"]) if single2 else None})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64],
                    help="latent sizes (patch 2): 32 -> 256 tokens, 64 -> 1,024 tokens")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--timed-runs", type=int, default=2)
    ap.add_argument("--quality-steps", type=int, nargs="*", default=[8, 16, 32],
                    help="step counts of the trained-expert quality sweep; none to skip")
    ap.add_argument("--quality-samples", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=400, help="steps of the trained digits expert")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and counts")
    ap.add_argument("--only", nargs="+", help="run only the rows whose name contains one of these (and their "
                    "baselines), e.g. --only ulysses ring usp pipefusion")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.worlds, args.steps, args.timed_runs = [16], [1, 2], 2, 1
        args.quality_steps, args.quality_samples, args.train_steps = [4], 32, 10
        if args.out == str(RESULTS):
            args.out = str(Path(tempfile.gettempdir()) / "parallel_inference-quick.json")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    info = machine()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="arch-bench-") as tmp:
        only = ["quick"] if args.quick else args.only
        tables = {size: run_size(size, args.worlds, args.steps, args.num_samples, args.timed_runs, tmp, only)
                  for size in args.sizes}
        quality = (trained_quality(Path(tmp), args.worlds, args.quality_steps, args.quality_samples,
                                   args.train_steps) if args.quality_steps else None)

    cross = crossover(tables)
    report_tables = {}
    for size, rows in tables.items():
        md = table(rows)
        print(f"\n{tokens(size)} tokens (latent {MODEL['in_channels']}x{size}x{size}, patch "
              f"{MODEL['patch_size']})\n" + md)
        out_rows = [{k: v for k, v in r.items() if k != "_samples"} for r in rows]
        for r in out_rows:
            if r.get("psnr_db") is not None and math.isinf(r["psnr_db"]):
                r["psnr_db"] = "inf"
        report_tables[str(tokens(size))] = {"input_size": size, "model": model_args(size), "rows": out_rows,
                                            "table_md": md}
    print("\nspeedup of the patch modes (crossover):")
    for c in cross:
        v2 = c["speedup_vs_2_threads"]
        print(f"  {c['tokens']:5d} tokens  {c['mode']:<34} N={c['world_size']}  "
              f"vs 1 thread {c['speedup_vs_1_thread']:.2f}x  vs 2 threads "
              + ("-" if v2 is None else f"{v2:.2f}x"))
    if quality:
        print("\ntrained digits expert, quality vs one device:\n" + trained_table(quality))
    report = {
        "benchmark": "parallel_inference", "created_at": time.time(), "wall_s": time.perf_counter() - t0,
        "machine": info, "quick": args.quick, "only": args.only,
        "sampling": {"steps": args.steps, "num_samples": args.num_samples, "sampler": "euler",
                     "cfg_scale_for_cfg_rows": 2.0, "timed_runs": args.timed_runs, "warmup_runs": 1,
                     "weights": f"random init + N(0, ({WEIGHT_GAIN}/sqrt(fan_in))^2) weight perturbation, "
                                "N(0, 0.02^2) on biases (not trained)"},
        "notes": [
            ("latency: fastest timed run, slowest rank; peak mem: CPU RSS high-water mark during the timed "
             "run minus RSS before it (largest rank); bytes: what rank 0 receives (all_gather: (n-1) x "
             "local, all_reduce: 2(n-1)/n x size), per sampler step"),
            (f"{info['cpu_count']} CPU cores (load average at start {info['loadavg_at_start']}, at end "
             f"{os.getloadavg()}): world 4 oversubscribes them; 'single (2 threads)' is the fair baseline for "
             "world 2; the machine was shared with other jobs, so latencies carry that noise"),
            ("ulysses / ring / usp are exact (PSNR inf or float rounding); their bytes are all-to-all "
             "(attn_a2a: (n-1)/n of q,k,v out and o back) and ring hops (attn_ring: this rank's K/V per hop); "
             "pipefusion moves hidden states of one patch between stages (pipe_hidden) and broadcasts the "
             "velocity (output), never K/V"),
        ],
        "tables": report_tables, "crossover": cross, "trained": quality,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
