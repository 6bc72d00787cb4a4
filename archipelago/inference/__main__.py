"""torchrun launcher: every process calls `run_parallel_sampling`; rank 0 writes the samples.

    # one machine, 2 processes (gloo on CPU, nccl on GPU):
    torchrun --nproc-per-node 2 -m archipelago.inference --expert runs/q/experts/0/final \\
        --mode distrifusion --warmup-steps 2 --steps 16 --out grid.png
    # CFG branches on 2 ranks x sync patches on 2 ranks:
    torchrun --nproc-per-node 4 -m archipelago.inference --expert CKPT --mode cfg_parallel \\
        --patch-mode sync_patch --cfg-scale 2 --out x.safetensors
    # sequence parallel (exact): Ulysses 2 x ring 2, or CFG branches x Ulysses; PipeFusion in 2 stages:
    torchrun --nproc-per-node 4 -m archipelago.inference --expert CKPT --mode usp --ulysses-degree 2 \
        --ring-degree 2 --out x.safetensors
    torchrun --nproc-per-node 4 -m archipelago.inference --expert CKPT --mode ulysses --cfg-degree 2 \
        --cfg-scale 2 --out x.safetensors
    torchrun --nproc-per-node 2 -m archipelago.inference --expert CKPT --mode pipefusion --pipe-patches 4 \
        --warmup-steps 2 --out x.safetensors
    # experts on different ranks, top-1 routing:
    torchrun --nproc-per-node 2 -m archipelago.inference --expert E0 --expert E1 --router R \\
        --mode expert_parallel --routing top-1 --out x.safetensors
    # several nodes: torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 8 ...

`archipelago generate --parallel MODE --launcher torchrun` starts this module with --spec-json and
--parallel-json (the exact SamplingSpec / ParallelConfig) and reads --stats (every rank's measurements).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

from archipelago.errors import ArchipelagoError, ConfigError
from archipelago.inference.config import Mode, ParallelConfig
from archipelago.inference.rank import process_group, rank_device, rank_error_line, rank_exit
from archipelago.inference.runner import SamplingSpec, check_layout_fits_expert, run_parallel_sampling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m archipelago.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec-json", help="the whole SamplingSpec as JSON (replaces the sampling flags)")
    p.add_argument("--parallel-json", help="the whole ParallelConfig as JSON (replaces the layout flags)")
    p.add_argument("--expert", action="append", help="expert checkpoint URL (repeat for ensembles)")
    p.add_argument("--router", help="router checkpoint URL (expert_parallel)")
    p.add_argument("--routing", default="top-1", help="ensemble routing: full | top-k")
    p.add_argument("--mode", default="single", choices=[m.value for m in Mode])
    p.add_argument("--patch-degree", type=int)
    p.add_argument("--cfg-degree", type=int)
    p.add_argument("--expert-degree", type=int)
    p.add_argument("--ulysses-degree", type=int, help="ulysses | usp: ranks splitting the heads")
    p.add_argument("--ring-degree", type=int, help="ring | usp: ranks passing K/V round a ring")
    p.add_argument("--pipe-degree", type=int, help="pipefusion: layer stages")
    p.add_argument("--pipe-patches", type=int, help="pipefusion: patches per image (default: the stages)")
    p.add_argument("--patch-mode", default="sync_patch",
                   choices=["naive_patch", "sync_patch", "distrifusion"])
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--comm-group-layers", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], help="comma-separated labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="*.png grid or safetensors file, written by rank 0")
    p.add_argument("--stats", help="JSON file with every rank's latency, memory and traffic (rank 0 writes)")
    return p.parse_args(argv)


def _spec_and_layout(args: argparse.Namespace) -> tuple[SamplingSpec, ParallelConfig]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel_json:
        pcfg = ParallelConfig.model_validate_json(args.parallel_json)
    else:
        pcfg = ParallelConfig.create(
            mode=args.mode, world_size=world, patch_degree=args.patch_degree, cfg_degree=args.cfg_degree,
            expert_degree=args.expert_degree, patch_mode=args.patch_mode, warmup_steps=args.warmup_steps,
            comm_group_layers=args.comm_group_layers, ulysses_degree=args.ulysses_degree,
            ring_degree=args.ring_degree, pipe_degree=args.pipe_degree, pipe_patches=args.pipe_patches)
    if pcfg.world_size != world:
        raise ConfigError(f"{pcfg.describe()} needs {pcfg.world_size} processes, torchrun started {world}")
    if args.spec_json:
        return SamplingSpec.model_validate_json(args.spec_json), pcfg
    if not args.expert:
        raise ConfigError("--expert CKPT (or --spec-json) is required")
    spec = SamplingSpec(experts=args.expert, router=args.router, routing=args.routing,
                        num_samples=args.num_samples, labels=args.labels, seed=args.seed, steps=args.steps,
                        sampler=args.sampler, cfg_scale=args.cfg_scale, device=args.device, out=args.out)
    return spec, pcfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec, pcfg = _spec_and_layout(args)
        check_layout_fits_expert(spec, pcfg)   # one line on every rank, before a rendezvous that could wait forever
        # joined here (not inside run_parallel_sampling) so the ranks' summaries can be gathered after
        with process_group(pcfg.world_size, None, None, rank_device(spec.device)):
            result = run_parallel_sampling(spec, pcfg)
            summaries = [result.summary()]
            if pcfg.world_size > 1:
                summaries = [None] * pcfg.world_size
                dist.all_gather_object(summaries, result.summary())
    except Exception as exc:  # noqa: BLE001 - every rank reports its own cause as one line, then exits
        print(rank_error_line(exc), file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ArchipelagoError) else 1
    if result.rank == 0:
        summary = summaries[0]
        print(json.dumps({k: summary[k] for k in ("describe", "latency_s", "peak_mem_bytes")}))
        if args.stats:
            from archipelago import storage

            storage.write_json(args.stats, {**summary, "ranks": summaries})
    return 0


if __name__ == "__main__":
    rank_exit(main())
