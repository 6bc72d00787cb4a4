"""DualParal long-video generation: latency and peak memory per rank for world size 1 and 2 at two video
lengths, bytes sent per iteration, and temporal consistency at block boundaries vs a naive baseline.

    OMP_NUM_THREADS=1 python benchmarks/dualparal.py                       # trains the tiny expert first
    OMP_NUM_THREADS=1 python benchmarks/dualparal.py --expert CKPT --frames 64 256
    OMP_NUM_THREADS=1 python benchmarks/dualparal.py --random-init         # no training

Expert: by default `train_expert` trains configs/moving-digits-video.yaml's tiny VideoDiT (8-frame 16x16
clips) on shard 0 under runs/bench-dualparal (reused when already trained; the JSON records whether it was
trained here and how long it took). `--random-init` uses a random VideoDiT with perturbed weights instead.

Every world size runs in freshly spawned processes (gloo on CPU, nccl on GPU, 1 thread per rank) through
the same `run_video_rank` the torchrun and Ray launchers call: one untimed warm-up, then per length the
fastest of `--timed-runs` runs (slowest rank), then one run with the live-tensor probe (peak working
tensor bytes per rank, parameters excluded; sampled after every slot; it slows the run, so it is separate).
Consistency: mean |frame change| across block boundaries / inside blocks, on pixels and on 4x4-pooled
frames, for DualParal (the N=1 output; N=2 is checked equal), its ablations, and the naive baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import machine, write_report

from archipelago import storage
from archipelago.eval.video import boundary_consistency, video_memory_bytes
from archipelago.experts.checkpoint import (
    EMA,
    FORMAT_VERSION,
    META,
    encode_tensors,
    load_expert,
    model_record,
)
from archipelago.experts.video_dit import VideoDiT
from archipelago.inference.dualparal import (
    DualParal,
    DualParalConfig,
    naive_blockwise,
    remove_twins,
)
from archipelago.inference.video_cli import VideoSpec, launch_local_runs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "dualparal.json"
CONFIG = REPO / "configs" / "moving-digits-video.yaml"


# ----------------------------------------------------------------------------------------------------
# The expert
# ----------------------------------------------------------------------------------------------------

def trained_expert(root: Path, steps: int | None) -> tuple[str, dict[str, Any]]:
    """Train (or reuse) expert 0 of configs/moving-digits-video.yaml under `root`."""
    from archipelago.config import load_config
    from archipelago.data.prepare import prepare_data
    from archipelago.experts.train import train_expert

    overrides = [f"storage.root={root}"] + ([f"expert.steps={steps}"] if steps else [])
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    prepare_data(cfg.data, str(root / "data"), progress=False)
    result = train_expert(cfg, 0, str(root / "data"), str(root / "experts" / "expert-0"))
    wall = time.perf_counter() - t0
    sidecar = root / "train_info.json"            # the training time of a reused expert
    if not result.get("cached"):
        sidecar.write_text(json.dumps({"train_wall_s": round(wall, 1), "trained_at": time.ctime()}))
    info = {"kind": "trained", "config": str(CONFIG.relative_to(REPO)), "steps": result["steps"],
            "final_loss": result["final_loss"], "reused_from_earlier_run": bool(result.get("cached")),
            **(json.loads(sidecar.read_text()) if sidecar.exists() else {"train_wall_s": round(wall, 1)}),
            "clip_frames": cfg.data.video_frames, "checkpoint": result["final_checkpoint"]}
    return result["final_checkpoint"], info


def random_expert(root: Path) -> tuple[str, dict[str, Any]]:
    torch.manual_seed(0)
    model = VideoDiT(input_size=16, in_channels=1, patch_size=4, hidden_size=64, depth=4, num_heads=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    url = str(root / "random-video-dit")
    digest = storage.write_bytes(storage.join(url, EMA), encode_tensors(model.state_dict(), "ema"))
    storage.write_json(storage.join(url, META), {
        "format_version": FORMAT_VERSION, "step": 0, "final": True, "strategy": "single", "world_size": 1,
        "model": model_record(model), "files": {EMA: digest}, "metrics": {}, "created_at": time.time(),
        "torch_version": torch.__version__})
    return url, {"kind": "random-init, weights perturbed N(0, 0.1^2)", "clip_frames": 8, "checkpoint": url}


# ----------------------------------------------------------------------------------------------------
# Latency, memory, traffic
# ----------------------------------------------------------------------------------------------------

def performance(expert: str, worlds: list[int], frames: list[int], base: dict[str, Any], timed_runs: int,
                device: str) -> tuple[list[dict[str, Any]], dict[int, torch.Tensor]]:
    rows, videos = [], {}
    for world in worlds:
        warm = VideoSpec(expert=expert, frames=2 * base["block"], device=device, **{**base, "steps": 2})
        specs = [warm]
        for f in frames:
            specs += [VideoSpec(expert=expert, frames=f, device=device, **base)] * timed_runs
            specs.append(VideoSpec(expert=expert, frames=f, device=device, collect=False,
                                   measure_tensors=device == "cpu", **base))
        print(f"world size {world}: {len(specs)} runs in one set of processes ...", flush=True)
        runs = launch_local_runs(specs, world, timeout_s=3600)[1:]
        per = timed_runs + 1
        for i, f in enumerate(frames):
            timed, probed = runs[i * per:i * per + timed_runs], runs[i * per + timed_runs]
            best = min(timed, key=lambda ranks: max(r.latency_s for r in ranks))
            cfg = best[0].describe
            iters = len(best[0].bytes_per_iteration)
            row = {
                "world_size": world, "frames": f, "describe": cfg, "iterations": iters,
                "latency_s": max(r.latency_s for r in best),
                "latency_s_per_frame": max(r.latency_s for r in best) / f,
                "wait_s_per_rank": [round(r.wait_s, 4) for r in best],
                "layers_per_rank": [list(r.layers) for r in best],
                "peak_working_tensor_bytes_per_rank": [r.peak_tensor_bytes for r in probed],
                "peak_mem_bytes_per_rank": [r.peak_mem_bytes for r in best],   # RSS growth (CPU) / CUDA peak
                "param_bytes_per_rank": [r.param_bytes for r in best],
                "bytes_sent_per_rank": [r.comm.get("total_bytes", 0) for r in best],
                "bytes_per_iteration_mean_per_rank": [sum(r.bytes_per_iteration) / iters for r in best],
                "bytes_per_iteration_max_per_rank": [max(r.bytes_per_iteration) for r in best],
            }
            rows.append(row)
            if best[0].video is not None:
                videos[(world, f)] = best[0].video
            print(f"   {f} frames: {row['latency_s']:.3f}s, working tensors/rank "
                  f"{row['peak_working_tensor_bytes_per_rank']}, bytes/iteration "
                  f"{[round(b) for b in row['bytes_per_iteration_mean_per_rank']]}", flush=True)
    base_lat = {r["frames"]: r["latency_s"] for r in rows if r["world_size"] == 1}
    for r in rows:
        r["speedup_vs_world1"] = base_lat.get(r["frames"], r["latency_s"]) / r["latency_s"]
    return rows, videos


# ----------------------------------------------------------------------------------------------------
# Consistency
# ----------------------------------------------------------------------------------------------------

def consistency(expert: str, frames: int, base: dict[str, Any], labels: list[int]) -> list[dict[str, Any]]:
    model, _ = load_expert(expert)
    y = torch.tensor(labels)
    block = base["block"]
    common = {"num_frames": frames, "block_frames": block, "steps": base["steps"], "cfg_scale": base["cfg_scale"]}
    variants = {
        "dualparal (absolute positions)": {"num_cat": base["num_cat"]},
        "dualparal (local positions)": {"num_cat": base["num_cat"], "positions": "local"},
        "dualparal, independent noise": {"num_cat": base["num_cat"], "noise": "independent"},
        "dualparal, no neighbour K/V": {"num_cat": base["num_cat"], "kv_cache": False},
        "dualparal, num_cat=0 (coordinated noise only)": {"num_cat": 0},
    }
    rows = []
    for name, kw in variants.items():
        cfg = DualParalConfig(**common, **kw)
        video = DualParal(model, cfg).generate(y)
        rows.append(_consistency_row(name, video, block))
    remove_twins(model)
    rows.append(_consistency_row("naive (blocks independent)", naive_blockwise(
        model, DualParalConfig(**common, num_cat=0), y), block))
    rows.append(_consistency_row("reference: real training clips, concatenated", real_clips(model, frames, block),
                                 block))
    return rows


def real_clips(model: torch.nn.Module, frames: int, block: int) -> torch.Tensor:
    """Moving-digits clips of `block` frames laid end to end: what a temporally coherent model produces
    inside blocks, and the jump a naive concatenation of unrelated clips makes at every boundary."""
    from archipelago.data.sources import load_moving_digits

    clips = load_moving_digits(num_videos=frames // block, frames=block, size=model.input_size, seed=1).images
    return torch.cat(list(clips), dim=1).unsqueeze(0)                        # [1, C, frames, H, W]


def _consistency_row(name: str, video: torch.Tensor, block: int) -> dict[str, Any]:
    px, pooled = boundary_consistency(video, block), boundary_consistency(video, block, pool=4)
    row = {"variant": name, "pixel_boundary": px["boundary"], "pixel_inside": px["inside"],
           "pixel_ratio": px["ratio"], "pooled_boundary": pooled["boundary"], "pooled_inside": pooled["inside"],
           "pooled_ratio": pooled["ratio"]}
    print(f"   {name}: boundary/inside pixel {px['ratio']:.2f}, pooled {pooled['ratio']:.2f}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def tables(perf: list[dict[str, Any]], cons: list[dict[str, Any]]) -> str:
    kib = 1024
    lines = [("| world | frames | iterations | latency s | s/frame | vs world 1 | working tensors KiB/rank "
             "| RSS growth MiB/rank | params KiB/rank | KiB sent/iteration/rank (mean, max) | recv wait s/rank |"),
             "|" + "---|" * 11]
    for r in perf:
        work = ", ".join("-" if b is None else f"{b / kib:.0f}" for b in r["peak_working_tensor_bytes_per_rank"])
        rss = ", ".join(f"{b / 2**20:.1f}" for b in r["peak_mem_bytes_per_rank"])
        par = ", ".join(f"{b / kib:.0f}" for b in r["param_bytes_per_rank"])
        sent = ", ".join(f"{m / kib:.0f}/{x / kib:.0f}" for m, x in zip(
            r["bytes_per_iteration_mean_per_rank"], r["bytes_per_iteration_max_per_rank"], strict=True))
        wait = ", ".join(f"{w:.3f}" for w in r["wait_s_per_rank"])
        lines.append(f"| {r['world_size']} | {r['frames']} | {r['iterations']} | {r['latency_s']:.3f} | "
                     f"{r['latency_s_per_frame'] * 1e3:.2f}ms | {r['speedup_vs_world1']:.2f}x | {work} | {rss} | "
                     f"{par} | {sent} | {wait} |")
    lines += ["", ("| variant | boundary (px) | inside (px) | ratio (px) | boundary (4x4) | inside (4x4) "
              "| ratio (4x4) |"), "|" + "---|" * 7]
    for c in cons:
        lines.append(f"| {c['variant']} | {c['pixel_boundary']:.3f} | {c['pixel_inside']:.3f} | "
                     f"{c['pixel_ratio']:.2f} | {c['pooled_boundary']:.3f} | {c['pooled_inside']:.3f} | "
                     f"{c['pooled_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert", help="video expert checkpoint (default: train configs/moving-digits-video.yaml)")
    ap.add_argument("--random-init", action="store_true", help="random VideoDiT with perturbed weights")
    ap.add_argument("--train-steps", type=int, help="override expert.steps of the config when training")
    ap.add_argument("--root", default=str(REPO / "runs" / "bench-dualparal"))
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--frames", type=int, nargs=2, default=[64, 256], help="two video lengths")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--num-cat", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8,
                    help="Euler steps per block (memory is flat once the video has >= steps blocks)")
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--timed-runs", type=int, default=2)
    ap.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], default=[0, 3, 5, 7],
                    help="videos for the consistency metric")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    info_machine = machine(args.device)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)

    # ---- expert ---------------------------------------------------------------------------------------
    if args.expert:
        expert, info = args.expert, {"kind": "given", "checkpoint": args.expert}
    elif args.random_init:
        expert, info = random_expert(root)
    else:
        print("training the tiny video expert (configs/moving-digits-video.yaml) ...", flush=True)
        expert, info = trained_expert(root, args.train_steps)
    print(f"expert: {info}", flush=True)
    base = {"block": args.block, "num_cat": args.num_cat, "steps": args.steps, "cfg_scale": args.cfg_scale}

    # ---- latency / memory / traffic ---------------------------------------------------------------------
    perf, videos = performance(expert, args.worlds, args.frames, base, args.timed_runs, args.device)
    equal = {}
    for (world, f), v in videos.items():
        if world != 1 and (1, f) in videos:
            equal[f"world{world}_vs_world1_{f}frames_max_abs_diff"] = float((v - videos[(1, f)]).abs().max())
    print(f"ring pipeline vs single device: {equal}", flush=True)

    # ---- consistency ----------------------------------------------------------------------------------------
    print(f"consistency on {args.frames[0]} frames, labels {args.labels} ...", flush=True)
    cons = consistency(expert, args.frames[0], base, args.labels)

    model, _ = load_expert(expert)
    analytic = {f: video_memory_bytes(DualParalConfig(num_frames=f, block_frames=args.block, num_cat=args.num_cat,
                                                      steps=args.steps), model) for f in args.frames}
    report = {"benchmark": "dualparal", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": info_machine, "expert": info, "settings": {**base, "frames": args.frames,
                                                                     "timed_runs": args.timed_runs},
              "performance": perf, "ring_equals_single_device": equal, "consistency": cons,
              "rank0_state_bytes_analytic": analytic}
    text = tables(perf, cons)
    print("\n" + text)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
