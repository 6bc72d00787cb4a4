"""Long-video generation with DualParal: the per-rank entry point, run by the launchers image sampling uses
(torchrun, Ray actors, local spawn), plus `generate_video`, which `archipelago generate-video` calls.

    # one process (the single-device reference of the same block-wise schedule):
    archipelago generate-video --expert CKPT --frames 256 --block 8 --num-cat 2 --steps 16 --out video.gif
    # ring pipeline over 2 processes, gloo on CPU / nccl on GPU (the CLI relaunches itself under torchrun):
    archipelago generate-video --expert CKPT --frames 256 --world-size 2 --launcher torchrun --out video.gif
    # the same, started by hand:
    torchrun --standalone --nproc-per-node 2 -m archipelago.inference.video_cli --expert CKPT \\
        --frames 256 --block 8 --num-cat 2 --steps 16 --out video.gif
    # Ray actors (one rank each; a cluster: RAY_ADDRESS=auto, and an s3:// --out that every node can reach):
    archipelago generate-video --expert CKPT --frames 256 --world-size 2 --launcher ray --out video.gif

Rank 0 writes the GIF (imaging.save_gif) and the raw video [N, C, F, H, W] as safetensors (`--out` with a
.safetensors suffix unless --tensor-out is given), and optionally every rank's measurements as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from archipelago.errors import ArchipelagoError, CheckpointError, ConfigError
from archipelago.inference.comm import Comm
from archipelago.inference.dualparal import (
    DualParal,
    DualParalConfig,
    LiveTensorBytes,
    keep_only_stage,
    stage_layers,
)
from archipelago.inference.launch import LAUNCHERS
from archipelago.inference.local import set_threads, spawn_ranks
from archipelago.inference.measure import PeakMemory, param_bytes
from archipelago.inference.progress import StepFile
from archipelago.inference.rank import (
    close_group,
    init_process_group,
    process_group,
    rank_device,
    rank_error_line,
    rank_exit,
)
from archipelago.inference.ray_launcher import InferenceWorker, launch_actors, on_ray
from archipelago.inference.torchrun import inside_torchrun, run_torchrun


class VideoSpec(BaseModel):
    """What to generate; identical on every rank. Plain data (picklable, JSON round-trip)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert: str = Field(description="Video expert checkpoint URL (a VideoDiT).")
    frames: int = Field(256, ge=1, description="Frames of the output video.")
    block: int = Field(8, ge=1, description="Frames per block.")
    num_cat: int = Field(2, ge=0, description="Context / neighbour-K/V frames between adjacent blocks.")
    steps: int = Field(16, ge=1, description="Euler steps per block.")
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale.")
    labels: list[int] = Field(default_factory=lambda: [0], min_length=1, description="One class per video.")
    seed: int = Field(0, description="Noise seed.")
    noise: Literal["coordinated", "independent"] = Field("coordinated", description="Block noise init.")
    positions: Literal["absolute", "local"] = Field("absolute", description="Temporal positions of blocks.")
    kv_cache: bool = Field(True, description="Neighbour K/V cache on.")
    ema: bool = Field(True, description="Load EMA weights.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda:LOCAL_RANK if available.")
    out: str | None = Field(None, description="GIF URL written by rank 0 (None: nothing written).")
    tensor_out: str | None = Field(None, description="safetensors URL (default: `out` with .safetensors).")
    fps: int = Field(8, ge=1, description="GIF frame rate.")
    stats: str | None = Field(None, description="JSON URL for every rank's measurements (rank 0 writes).")
    collect: bool = Field(True, description="Rank 0 keeps the whole video (needed for out/tensor_out).")
    measure_tensors: bool = Field(False, description="Sample live tensor bytes after every slot (CPU, slow).")
    progress: str | None = Field(None, description="Local file where rank 0 counts its finished pipeline "
                                 "iterations (the launcher's progress bar; archipelago.inference.progress).")

    @classmethod
    def create(cls, **kwargs: Any) -> VideoSpec:
        """Like the constructor, but a bad value is one ConfigError line (for CLIs and launchers)."""
        from pydantic import ValidationError

        try:
            return cls(**kwargs)
        except ValidationError as exc:
            msgs = [f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
            raise ConfigError("generate-video: " + "; ".join(msgs)) from None

    def dualparal(self) -> DualParalConfig:
        return DualParalConfig.create(
            num_frames=self.frames, block_frames=self.block, num_cat=self.num_cat, steps=self.steps,
            cfg_scale=self.cfg_scale, seed=self.seed, noise=self.noise, positions=self.positions,
            kv_cache=self.kv_cache)

    def tensor_url(self) -> str | None:
        if self.tensor_out or not self.out:
            return self.tensor_out
        stem = self.out.rsplit(".", 1)[0] if "." in self.out.rsplit("/", 1)[-1] else self.out
        return stem + ".safetensors"


@dataclass
class VideoResult:
    """What one rank measured; `video` [N, C, F, H, W] on rank 0 only (when collected)."""

    rank: int
    world_size: int
    layers: tuple[int, int]
    latency_s: float
    wait_s: float
    peak_mem_bytes: int                  # CUDA: max allocated; CPU: peak RSS growth during the run
    peak_tensor_bytes: int | None        # CPU, measure_tensors: peak live tensor bytes above the start
    param_bytes: int
    slots: int
    bytes_per_iteration: list[int] = field(default_factory=list)
    comm: dict[str, Any] = field(default_factory=dict)
    video: Any = None
    describe: str = ""

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "video"}


# ----------------------------------------------------------------------------------------------------
# The per-rank entry point
# ----------------------------------------------------------------------------------------------------

def _load_video_expert(spec: VideoSpec, device: torch.device) -> torch.nn.Module:
    from archipelago.experts.checkpoint import load_expert
    from archipelago.experts.video_dit import VideoDiT

    model, _ = load_expert(spec.expert, ema=spec.ema, device=device)
    if not isinstance(model, VideoDiT):
        raise CheckpointError(f"{spec.expert}: generate-video needs a video expert (VideoDiT), this checkpoint "
                              f"holds a {type(model).__name__}; train one with configs/moving-digits-video.yaml")
    return model


def run_video_rank(spec: VideoSpec, rank: int | None = None, world_size: int | None = None,
                   init_method: str | None = None) -> VideoResult:
    """Generate `spec` on this rank; every rank of the group calls it. rank/world_size/init_method None:
    torchrun's env (RANK, WORLD_SIZE, env://). An existing default process group is reused."""
    spec = VideoSpec.model_validate(spec)
    cfg = spec.dualparal()
    device = rank_device(spec.device)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    with process_group(world_size, rank, init_method, device):
        comm = Comm(device)
        model = _load_video_expert(spec, device)
        start, end = stage_layers(len(model.blocks), comm.world_size, comm.rank)
        keep_only_stage(model, start, end)
        held = param_bytes(model)
        y = torch.tensor(spec.labels, dtype=torch.long)
        if int(y.max()) >= model.num_classes or int(y.min()) < 0:
            raise ConfigError(f"labels {spec.labels}: the expert has classes 0..{model.num_classes - 1}")
        pipeline = DualParal(model, cfg, comm)
        probe = LiveTensorBytes() if spec.measure_tensors and device.type == "cpu" else None

        comm.barrier()
        mem = PeakMemory(device)
        mem.start()
        tensors0 = LiveTensorBytes.current() if probe is not None else 0
        ticks = StepFile(spec.progress, cfg.num_iterations).tick if spec.progress and comm.rank == 0 else None
        video = pipeline.generate(y, collect=spec.collect, probe=probe, on_iteration=ticks)
        comm.barrier()
        st = pipeline.stats
        result = VideoResult(
            rank=comm.rank, world_size=comm.world_size, layers=(start, end), latency_s=st.latency_s,
            wait_s=st.wait_s, peak_mem_bytes=mem.added(),
            peak_tensor_bytes=None if probe is None else max(probe.peak - tensors0, 0), param_bytes=held,
            slots=st.slots, bytes_per_iteration=st.bytes_per_iteration, comm=st.comm, video=video,
            describe=(f"dualparal world={comm.world_size} frames={cfg.num_frames} block={cfg.block_frames} "
                      f"num_cat={cfg.num_cat} steps={cfg.steps} blocks={cfg.num_blocks} "
                      f"iterations={cfg.num_iterations}"))
        summaries = [result.summary()]
        if comm.world_size > 1:
            summaries = [None] * comm.world_size
            dist.all_gather_object(summaries, result.summary())
        if comm.rank == 0:
            write_outputs(spec, video, summaries)
        comm.barrier()
        return result


def write_outputs(spec: VideoSpec, video: torch.Tensor | None, summaries: list[dict[str, Any]]) -> None:
    """Rank 0: GIF + safetensors of the video, and the per-rank stats JSON."""
    from archipelago import storage

    tensor_url = spec.tensor_url()
    if (spec.out or tensor_url) and video is None:
        raise ConfigError("out/tensor_out need collect=True (rank 0 keeps the video)")
    if spec.out:
        from archipelago.imaging import save_gif

        frames = video.permute(0, 2, 1, 3, 4)                                     # [N, F, C, H, W]
        save_gif(frames[0] if frames.shape[0] == 1 else frames, spec.out, fps=spec.fps)
    if tensor_url:
        from archipelago.tensorfile import save_bytes

        meta = {"archipelago": "video", "expert": spec.expert, "frames": str(spec.frames),
                "block": str(spec.block), "num_cat": str(spec.num_cat), "steps": str(spec.steps),
                "world_size": str(len(summaries)), "labels": json.dumps(spec.labels)}
        storage.write_bytes(tensor_url, save_bytes({"video": video.contiguous()}, metadata=meta))
    if spec.stats:
        storage.write_json(spec.stats, {"spec": spec.model_dump(mode="json"), "ranks": summaries})


def read_video(url: str) -> torch.Tensor:
    """The [N, C, F, H, W] tensor a run wrote with `tensor_out`."""
    from safetensors.torch import load

    from archipelago import storage

    return load(storage.read_bytes(url))["video"]


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def _local_worker(rank: int, init_method: str, world: int, specs: list[dict[str, Any]], threads: int,
                  out: Any) -> None:
    set_threads(threads)
    try:
        if world > 1:
            init_process_group(rank, world, init_method, rank_device(VideoSpec(**specs[0]).device))
        results = []
        for spec in specs:                 # one process group for every run: startup paid once
            result = run_video_rank(VideoSpec(**spec), rank=rank, world_size=world, init_method=init_method)
            # Plain arrays, not tensors: torch's pickler would share them by fd, gone once this process exits.
            result.video = None if result.video is None else result.video.numpy()
            results.append(result)
        if world > 1:
            close_group(ok=True)
        out.put((rank, results, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        out.put((rank, None, traceback.format_exc()))


def launch_local(spec: VideoSpec, world_size: int, threads_per_rank: int = 1, timeout_s: float = 300,
                 in_process: bool = True) -> list[VideoResult]:
    """`world_size` spawned processes on this machine (TCP rendezvous on 127.0.0.1); world size 1 runs in
    the calling process unless `in_process=False` (a clean process: fair memory numbers). Every rank's
    result in rank order; a failing rank raises RuntimeError."""
    if world_size == 1 and in_process:
        return [run_video_rank(spec, rank=0, world_size=1)]
    return launch_local_runs([spec], world_size, threads_per_rank, timeout_s)[0]


def launch_local_runs(specs: list[VideoSpec], world_size: int, threads_per_rank: int = 1,
                      timeout_s: float = 300) -> list[list[VideoResult]]:
    """Several runs, one after the other, in the same `world_size` spawned processes (benchmarks, tests:
    process start-up and lazy init are paid once). Returns, per spec, every rank's result in rank order."""
    results = spawn_ranks(_local_worker, world_size,
                          (world_size, [s.model_dump() for s in specs], threads_per_rank), timeout_s)
    for res in results:
        for r in res:
            if r.video is not None:
                r.video = torch.from_numpy(r.video)
    return [[results[r][i] for r in range(world_size)] for i in range(len(specs))]


class VideoWorker(InferenceWorker):
    """A Ray actor rank: the inference package's worker (env, threads, rendezvous address) + DualParal."""

    def run_video(self, spec: dict[str, Any], rank: int, world_size: int, init_method: str) -> VideoResult:
        os.environ.setdefault("LOCAL_RANK", "0")   # one GPU per actor: Ray sets CUDA_VISIBLE_DEVICES
        result = run_video_rank(VideoSpec(**spec), rank=rank, world_size=world_size, init_method=init_method)
        result.video = None if result.video is None else result.video.numpy()
        return result


def launch_ray_video(spec: VideoSpec, world_size: int, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                     timeout_s: float = 600, env: dict[str, str] | None = None) -> list[VideoResult]:
    """`world_size` Ray actors in a placement group form the ring (`ray_launcher.launch_actors`, as image
    sampling does); needs a connected Ray (ray.init)."""
    results = launch_actors(VideoWorker, world_size,
                            lambda a, rank, init_method: a.run_video.remote(spec.model_dump(), rank, world_size,
                                                                            init_method),
                            cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, timeout_s=timeout_s,
                            env=env)
    for r in results:
        if r.video is not None:
            r.video = torch.from_numpy(r.video.copy())   # Ray hands back read-only arrays
    return results


def generate_video(spec: VideoSpec, world_size: int = 1, launcher: str = "torchrun",
                   ray_address: str | None = None, timeout_s: float = 3600) -> list[dict[str, Any]]:
    """What `archipelago generate-video` runs: every rank's measurement summary (rank order).

    world_size 1 runs here. torchrun: inside a torchrun job already, this process is one rank; otherwise
    `torchrun --standalone --nproc-per-node N -m archipelago.inference.video_cli` is started and its stats
    read back. ray: actors on the Ray cluster at ray_address ($RAY_ADDRESS, else a local Ray).
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={launcher!r}; allowed: {' | '.join(LAUNCHERS)}")
    spec.dualparal()                                    # validate before starting anything
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1")
    if world_size == 1:
        return [run_video_rank(spec, rank=0, world_size=1).summary()]
    if launcher == "local":
        return [r.summary() for r in launch_local(spec, world_size, timeout_s=timeout_s)]
    if launcher == "ray":
        results = on_ray(lambda env: launch_ray_video(spec, world_size, timeout_s=timeout_s, env=env),
                         ray_address, hint="fix RAY_ADDRESS")
        return [r.summary() for r in results]
    if inside_torchrun(world_size):
        return [run_video_rank(spec).summary()]
    with tempfile.TemporaryDirectory(prefix="archipelago-video-") as tmp:
        stats = spec.stats or os.path.join(tmp, "stats.json")
        run_spec = spec.model_copy(update={"stats": stats})
        run_torchrun("archipelago.inference.video_cli", ["--spec-json", run_spec.model_dump_json()], world_size,
                     timeout_s, "generate-video")
        from archipelago import storage

        return storage.read_json(stats)["ranks"]


# ----------------------------------------------------------------------------------------------------
# torchrun entry point
# ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m archipelago.inference.video_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec-json", help="the whole VideoSpec as JSON (what generate_video passes)")
    p.add_argument("--expert", help="video expert checkpoint URL")
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--num-cat", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="coordinated", choices=["coordinated", "independent"])
    p.add_argument("--positions", default="absolute", choices=["absolute", "local"])
    p.add_argument("--no-kv-cache", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="GIF URL (rank 0)")
    p.add_argument("--tensor-out", help="safetensors URL (default: --out with .safetensors)")
    p.add_argument("--stats", help="JSON URL with every rank's measurements")
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> VideoSpec:
    if args.spec_json:
        return VideoSpec.model_validate_json(args.spec_json)
    if not args.expert:
        raise ConfigError("--expert CKPT is required")
    return VideoSpec(expert=args.expert, frames=args.frames, block=args.block, num_cat=args.num_cat,
                     steps=args.steps, cfg_scale=args.cfg_scale, labels=args.labels, seed=args.seed,
                     noise=args.noise, positions=args.positions, kv_cache=not args.no_kv_cache,
                     device=args.device, out=args.out, tensor_out=args.tensor_out, stats=args.stats)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_video_rank(spec_from_args(args))
    except Exception as exc:  # noqa: BLE001 - every rank reports its own cause as one line, then exits
        print(rank_error_line(exc), file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ArchipelagoError) else 1
    if result.rank == 0:
        s = result.summary()
        print(json.dumps({k: s[k] for k in ("describe", "latency_s", "peak_mem_bytes")}))
    return 0


if __name__ == "__main__":
    rank_exit(main())
