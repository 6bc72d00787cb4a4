"""`run_parallel_sampling`: the one per-rank entry point that the torchrun and Ray launchers both call.

It joins (or reuses) the process group, loads only the weights this rank needs, applies the parallel mode,
samples from seeded noise that is identical on every rank, measures latency / peak memory / traffic, and
lets rank 0 write the output. `parallel_sample` is `experts.sampling.sample` with the explicit step.
"""
from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from archipelago.errors import ConfigError
from archipelago.experts.sampling import SAMPLERS, euler_step, guided_velocity, heun_step, timesteps
from archipelago.inference.comm import Comm
from archipelago.inference.config import Mode, ParallelConfig, check_layout_fits, experts_for_rank
from archipelago.inference.measure import PeakMemory, param_bytes
from archipelago.inference.parallelize import StepAware, parallelize_expert_shard, parallelize_for_inference
from archipelago.inference.progress import StepFile
from archipelago.inference.rank import process_group, rank_device


class SamplingSpec(BaseModel):
    """What to sample (model checkpoints, batch, sampler); identical on every rank. Plain data, picklable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts: list[str] = Field(min_length=1, description="Expert checkpoint URLs (several: an ensemble).")
    router: str | None = Field(None, description="Router checkpoint URL (expert_parallel).")
    routing: str = Field("top-1", pattern=r"^(full|top-\d+|sample-once)$",
                         description="Ensemble routing: full | top-k | sample-once.")
    class_counts: list[list[int]] | None = Field(
        None, description="Per-shard class counts [K][C] of the ensemble's data (sample-once routing).")
    num_samples: int = Field(4, ge=1, description="Images in the batch.")
    sample_shape: list[int] | None = Field(
        None, description="One sample [C, H, W], or [C, F, H, W] for a video expert (its frame count is not "
        "part of the model); default: the expert's [C, input_size, input_size].")
    labels: list[int] | None = Field(None, description="Class labels (default: seeded random classes).")
    seed: int = Field(0, description="Noise (and label) seed: same on every rank.")
    steps: int = Field(8, ge=1, description="Sampler steps.")
    sampler: Literal["euler", "heun"] = Field("euler", description="ODE solver.")
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale (1: none).")
    ema: bool = Field(True, description="Load EMA weights (else the raw trained weights).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda:LOCAL_RANK if available.")
    compile: bool = Field(False, description="torch.compile each expert and the router (expert.compile) "
                          "before the parallel twins are swapped in.")
    out: str | None = Field(None, description="Rank 0 writes the samples: *.png grid, else safetensors.")
    progress: str | None = Field(None, description="Local file where rank 0 counts its finished sampler steps "
                                 "(the launcher's progress bar; archipelago.inference.progress).")


@dataclass
class SamplingResult:
    """What one rank measured; `samples` is the full output (every mode ends with it on every rank)."""

    rank: int
    world_size: int
    samples: torch.Tensor
    latency_s: float
    peak_mem_bytes: int          # GPU: max allocated; CPU: RSS high-water mark growth during the run
    param_bytes: int             # weights this rank holds
    cpu_s: float = 0.0           # process CPU time of the run (all threads): work, not waiting
    peak_rss_bytes: int = 0      # CPU: absolute RSS high-water mark during the run (runtime + weights + work)
    comm: dict[str, Any] = field(default_factory=dict)
    describe: str = ""
    node: str = ""               # where the rank ran (the Ray node IP under the Ray launcher)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "samples"}


# ----------------------------------------------------------------------------------------------------
# Sampling with an explicit step
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def parallel_sample(model_fn: Callable, noise: torch.Tensor, y: torch.Tensor, steps: int,
                    sampler: str = "euler", cfg_scale: float = 1.0,
                    null_class: int | None = None, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """`experts.sampling.sample`, passing `step=k` (the sampler step) to step-aware parallel model_fns.

    Heun's two evaluations of step k both get step k, so `warmup_steps >= steps` is always exact.
    on_step(k) is called after step k (a progress bar).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {' | '.join(SAMPLERS)}")
    if cfg_scale != 1.0 and null_class is None:
        null_class = model_fn.num_classes
    x = noise.float()
    for k, (t, t_next) in enumerate(itertools.pairwise(timesteps(steps).tolist())):
        fn = functools.partial(model_fn, step=k) if isinstance(model_fn, StepAware) else model_fn
        v = guided_velocity(fn, x, t, y, cfg_scale, null_class)
        x_euler = euler_step(x, v, t, t_next)
        if sampler == "heun" and t_next > 0:
            x = heun_step(x, v, guided_velocity(fn, x_euler, t_next, y, cfg_scale, null_class), t, t_next)
        else:
            x = x_euler
        if on_step is not None:
            on_step(k)
    return x


def make_inputs(spec: SamplingSpec, shape: tuple[int, ...],
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded CPU noise [N, *shape] and labels [N]: bitwise the same on every rank and every launcher."""
    gen = torch.Generator().manual_seed(spec.seed)
    noise = torch.randn((spec.num_samples, *shape), generator=gen)
    if spec.labels is not None:
        if len(spec.labels) != spec.num_samples:
            raise ConfigError(f"labels: {len(spec.labels)} given for num_samples={spec.num_samples}")
        y = torch.tensor(spec.labels, dtype=torch.long)
    else:
        y = torch.randint(0, max(num_classes, 1), (spec.num_samples,), generator=gen)
    return noise, y


# ----------------------------------------------------------------------------------------------------
# Models: only what this rank runs
# ----------------------------------------------------------------------------------------------------

def _load_expert(url: str, spec: SamplingSpec, device: torch.device) -> nn.Module:
    from archipelago.experts.checkpoint import load_expert

    model, _ = load_expert(url, ema=spec.ema, device=device)
    if spec.compile:
        from archipelago.experts.precision import compile_module

        compile_module(model)
    return model


class RemoteExpert(nn.Module):
    """Stand-in for an expert whose weights live on another rank (expert_parallel): never called here."""

    def __init__(self, index: int, num_classes: int):
        super().__init__()
        self.index, self.num_classes = index, num_classes

    def forward(self, *args: object) -> torch.Tensor:
        raise RuntimeError(f"expert {self.index} is held by another rank")


def build_model_fn(spec: SamplingSpec, pcfg: ParallelConfig, comm: Comm, device: torch.device):
    """(model_fn, latent shape, num_classes, parameter bytes held by this rank).

    An ensemble is built with its real routing (`archipelago.ensemble.Ensemble.route`), but under
    expert_parallel a rank loads only its own experts; the others are `RemoteExpert` stand-ins.
    """
    if len(spec.experts) == 1 and spec.router is None:
        model = _load_expert(spec.experts[0], spec, device)
        shape = tuple(spec.sample_shape or (model.in_channels, model.input_size, model.input_size))
        return parallelize_for_inference(model, pcfg, comm), shape, model.num_classes, param_bytes(model)
    from archipelago.ensemble import Ensemble
    from archipelago.router import load_router

    if spec.router is None:
        raise ConfigError("an ensemble (several experts) needs router=URL")
    if pcfg.mode not in (Mode.single, Mode.expert_parallel):
        raise ConfigError(f"an ensemble runs with mode=expert_parallel or single, not {pcfg.mode.value}")
    router, _ = load_router(spec.router, device=device)
    if spec.compile:
        from archipelago.experts.precision import compile_module

        compile_module(router)
    degree = pcfg.expert_degree
    mine = experts_for_rank(len(spec.experts), degree, comm.rank % degree)
    local = {k: _load_expert(spec.experts[k], spec, device) for k in mine}
    first = local[mine[0]]
    shape = (first.in_channels, first.input_size, first.input_size)
    held = sum(param_bytes(m) for m in [router, *local.values()])
    experts = [local[k] if k in local else RemoteExpert(k, first.num_classes)
               for k in range(len(spec.experts))]
    ensemble = Ensemble(experts, router, class_counts=spec.class_counts).eval()
    ensemble.mode = spec.routing
    if pcfg.world_size == 1:
        return ensemble, shape, first.num_classes, held
    fn = parallelize_expert_shard(local, ensemble.route, len(spec.experts), first.num_classes, pcfg, comm)
    return fn, shape, first.num_classes, held


def check_layout_fits_expert(spec: SamplingSpec, pcfg: ParallelConfig) -> None:
    """Fail before the rendezvous (one line on every rank) when the layout does not fit the expert (rows,
    tokens or heads not divisible, too few blocks, a mode its kind lacks), from its metadata only, instead
    of after every rank has joined the group and loaded its weights."""
    from archipelago.errors import CheckpointError
    from archipelago.experts.checkpoint import read_meta

    if pcfg.world_size == 1:
        return
    try:
        meta = read_meta(spec.experts[0])
    except CheckpointError:
        return   # reported with its own line where the expert is loaded
    record = meta.get("model") or {}
    check_layout_fits(pcfg, record.get("class"), record.get("args") or {},
                      spec.sample_shape or meta.get("image_shape"), where=spec.experts[0])


# ----------------------------------------------------------------------------------------------------
# The per-rank entry point
# ----------------------------------------------------------------------------------------------------

def run_parallel_sampling(spec: SamplingSpec, pcfg: ParallelConfig, rank: int | None = None,
                          init_method: str | None = None, warmup_runs: int = 0,
                          timed_runs: int = 1) -> SamplingResult:
    """Sample `spec` with layout `pcfg` on this rank; every rank of the group calls it.

    rank/init_method: None under torchrun (env://, RANK); the Ray launcher passes tcp://ADDR:PORT and the
    actor's rank. An existing default process group is reused (and left alive). warmup_runs: untimed runs
    before the measured ones (first-call allocations and lazy init out of the latency); timed_runs: the
    latency is the fastest of these (traffic and peak memory are those of the last).
    """
    spec = SamplingSpec.model_validate(spec)
    pcfg = ParallelConfig.model_validate(pcfg)
    device = rank_device(spec.device)
    check_layout_fits_expert(spec, pcfg)
    with process_group(pcfg.world_size, rank, init_method, device):
        comm = Comm(device)
        if comm.world_size != pcfg.world_size:
            raise ConfigError(f"{pcfg.describe()} but the process group has {comm.world_size} ranks")
        fn, shape, num_classes, held = build_model_fn(spec, pcfg, comm, device)
        noise, y = make_inputs(spec, shape, num_classes)
        noise, y = noise.to(device), y.to(device)
        runs = warmup_runs + max(timed_runs, 1)
        ticks = StepFile(spec.progress, runs * spec.steps).tick if spec.progress and comm.rank == 0 else None

        def run() -> torch.Tensor:
            out = parallel_sample(fn, noise, y, spec.steps, spec.sampler, spec.cfg_scale, num_classes, ticks)
            if isinstance(fn, StepAware):
                fn.finish()
            return out

        for _ in range(warmup_runs):
            run()
        latency, cpu_s = float("inf"), float("inf")
        mem = PeakMemory(device)
        for _ in range(max(timed_runs, 1)):
            comm.reset_stats()
            comm.barrier()
            mem.start()
            t0, c0 = time.perf_counter(), time.process_time()
            samples = run()
            comm.sync()
            comm.barrier()
            latency = min(latency, time.perf_counter() - t0)
            cpu_s = min(cpu_s, time.process_time() - c0)
        result = SamplingResult(rank=comm.rank, world_size=comm.world_size, samples=samples.cpu(),
                                latency_s=latency, peak_mem_bytes=mem.added(), param_bytes=held, cpu_s=cpu_s,
                                peak_rss_bytes=mem.peak_rss(),
                                comm=comm.stats.as_dict(), describe=pcfg.describe())
        if comm.rank == 0 and spec.out:
            write_samples(result.samples, spec.out)
        comm.barrier()
        return result


def write_samples(samples: torch.Tensor, url: str) -> str:
    """*.png: an image grid; anything else: safetensors {"samples": [N, C, H, W]} (never a pickle)."""
    from archipelago import storage

    if url.endswith(".png"):
        from archipelago.imaging import save_grid

        return save_grid(samples, url)
    from safetensors.torch import save

    storage.write_bytes(url, save({"samples": samples.contiguous()}, metadata={"archipelago": "samples"}))
    return url


def read_samples(url: str) -> torch.Tensor:
    from safetensors.torch import load

    from archipelago import storage

    return load(storage.read_bytes(url))["samples"]
