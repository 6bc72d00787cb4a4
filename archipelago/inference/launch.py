"""What `archipelago generate --parallel MODE` runs: one sampling job on N ranks through a chosen launcher.

    spec = sampling_spec("runs/q/ensemble.json", routing="top-1", n=16, steps=32, cfg_scale=2.0)
    samples, ranks = generate_parallel(spec, ParallelConfig(mode="expert_parallel", world_size=4),
                                       launcher="ray")

Every launcher ends in the same `run_parallel_sampling` on every rank, with the same seeded noise, so the
three give the same samples: `local` (spawned processes here), `torchrun` (a `torch.distributed.run`
subprocess of `python -m archipelago.inference`), `ray` (actors in a placement group on the Ray cluster at
`ray_address` / $RAY_ADDRESS, or a local Ray: how a job spans nodes). The samples come back to the caller,
which writes the picture, so the output lands where the user asked whatever node rank 0 ran on.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from archipelago.errors import ConfigError
from archipelago.inference.config import ParallelConfig
from archipelago.inference.runner import (
    SamplingSpec,
    check_layout_fits_expert,
    read_samples,
    run_parallel_sampling,
)
from archipelago.inference.torchrun import run_torchrun

LAUNCHERS: tuple[str, ...] = ("torchrun", "ray", "local")   # image and video inference alike


def resolve_members(source: str) -> tuple[list[str], str | None, dict[str, Any], list[list[int]] | None]:
    """(expert URLs in shard order, router URL or None, first expert's model record, per-shard class
    counts or None) of an ensemble.json URL (verified without loading weights) or of one expert checkpoint
    directory."""
    from archipelago import storage
    from archipelago.ensemble import ENSEMBLE_FILE, verified_members
    from archipelago.experts.checkpoint import read_meta

    if source.endswith(".json") or storage.exists(storage.join(source, ENSEMBLE_FILE)):
        spec, experts, router, metas = verified_members(source)
        return ([experts[k] for k in sorted(experts)], router, metas[min(metas)].get("model") or {},
                spec.shard_class_counts)
    return [source], None, read_meta(source).get("model") or {}, None


def sampling_spec(source: str, routing: str = "top-1", n: int = 16, cfg_scale: float = 1.0, seed: int = 0,
                  steps: int = 32, sampler: str = "euler", device: str = "auto",
                  compile: bool = False) -> SamplingSpec:
    """The SamplingSpec of `archipelago generate`: classes 0..C-1 repeated (as the single-device path); a
    video expert samples clips of its training length (meta.json's image_shape [C, F, H, W])."""
    experts, router, record, class_counts = resolve_members(source)
    if record.get("class") not in (None, "DiT", "VideoDiT"):
        raise ConfigError(f"{source}: a {record.get('class')} expert cannot be sampled in parallel")
    shape = None
    if record.get("class") == "VideoDiT":   # the clip length is not part of the model: the training clips'
        from archipelago.experts.checkpoint import read_meta

        shape = read_meta(experts[0]).get("image_shape")
    num_classes = int((record.get("args") or {}).get("num_classes", 1))
    labels = [i % max(num_classes, 1) for i in range(n)]
    return SamplingSpec(experts=experts, router=router, routing=routing, class_counts=class_counts,
                        num_samples=n, labels=labels, sample_shape=shape,
                        seed=seed, steps=steps, sampler=sampler, cfg_scale=cfg_scale, device=device,
                        compile=compile)


def generate_parallel(spec: SamplingSpec, pcfg: ParallelConfig, launcher: str = "torchrun",
                      ray_address: str | None = None, timeout_s: float = 3600,
                      rank_resources: list[str] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(samples [N, C, H, W] on the CPU, every rank's measurement summary in rank order).

    rank_resources (ray only): a Ray resource per rank that pins it, e.g. ["node_1", "node_2"]."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}; allowed: {' | '.join(LAUNCHERS)}")
    spec = spec.model_copy(update={"out": None})
    check_layout_fits_expert(spec, pcfg)   # one line here, before any process or actor starts
    if pcfg.world_size == 1:
        r = run_parallel_sampling(spec, pcfg)
        return r.samples, [r.summary()]
    if launcher == "local":
        from archipelago.inference.local import launch_local

        results = launch_local(spec, pcfg, timeout_s=timeout_s)
        return results[0].samples, [r.summary() for r in results]
    if launcher == "ray":
        return _via_ray(spec, pcfg, ray_address, timeout_s, rank_resources)
    return _via_torchrun(spec, pcfg, timeout_s)


def _via_ray(spec: SamplingSpec, pcfg: ParallelConfig, ray_address: str | None, timeout_s: float,
             rank_resources: list[str] | None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    from archipelago.inference.ray_launcher import launch_ray, on_ray

    results = on_ray(lambda env: launch_ray(spec, pcfg, timeout_s=timeout_s, env=env,
                                            rank_resources=rank_resources),
                     ray_address, hint="fix --ray-address / RAY_ADDRESS")
    return torch.as_tensor(results[0].samples).clone(), [r.summary() for r in results]


def _via_torchrun(spec: SamplingSpec, pcfg: ParallelConfig,
                  timeout_s: float) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    from archipelago import storage

    with tempfile.TemporaryDirectory(prefix="archipelago-generate-") as tmp:
        out, stats = os.path.join(tmp, "samples.safetensors"), os.path.join(tmp, "stats.json")
        run_torchrun("archipelago.inference",
                     ["--spec-json", spec.model_copy(update={"out": out}).model_dump_json(),
                      "--parallel-json", pcfg.model_dump_json(), "--stats", stats],
                     pcfg.world_size, timeout_s, "generate")
        return read_samples(out), storage.read_json(stats)["ranks"]
