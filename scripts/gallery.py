"""Regenerate docs/gallery.md and its pictures from models this script trains itself, on the CPU, in a few
minutes: so every picture in the gallery is what the code produces today, never an edited file.

    python scripts/gallery.py                      # tiny experts + router + video expert, minutes on 2 CPUs
    python scripts/gallery.py --ensemble runs/quickstart/ensemble.json   # the images from a quickstart run

What it draws (docs/gallery/):
  quickstart.png             the ensemble (top-1 routing), classes 0..9 in columns
  routing-<mode>.png         the same noise under full | top-1 | top-2 | sample-once routing
  distrifusion.png           expert 0 on one device, sync patch on 2 ranks (exact), DistriFusion on 2 ranks
  dualparal.gif              a video 4x longer than the training clips, DualParal over a 2-rank ring
The numbers in gallery.md (PSNR against one device, seconds, bytes sent) are measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ROUTINGS = ("full", "top-1", "top-2", "sample-once")

# Image experts: the quickstart's shapes (digits 16x16, K=4), fewer steps so the whole script fits in minutes.
IMAGE_OVERRIDES = ["expert.steps=1000", "expert.lr=0.001", "expert.ema_decay=0.99", "expert.checkpoint_every=10000",
                   "router.steps=200", "tracking.enabled=false"]
# Video expert: one shard of moving digits, a small VideoDiT (8-frame clips; the GIF is 4x longer).
VIDEO_CONFIG: dict[str, Any] = {
    "name": "gallery-video",
    "data": {"source": "moving_digits", "video_frames": 8, "video_size": 16, "num_videos": 128,
             "num_clusters": 1, "embedder": "pixel_pca", "embed_dim": 8},
    "expert": {"patch_size": 4, "hidden_size": 48, "depth": 2, "num_heads": 4, "steps": 250, "batch_size": 16,
               "lr": 0.002, "warmup_steps": 10, "checkpoint_every": 10000, "ema_decay": 0.95},
    "tracking": {"enabled": False},
}


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Models: trained here (or an existing ensemble)
# ----------------------------------------------------------------------------------------------------

def train_image_ensemble(work: Path, t0: float) -> str:
    """Digits -> 4 shards -> 4 experts + router (in this process, no Ray) -> ensemble.json URL."""
    from archipelago.config import load_config
    from archipelago.data.prepare import prepare_data
    from archipelago.ensemble import write_ensemble
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    cfg = load_config(REPO / "configs" / "digits-quickstart.yaml", IMAGE_OVERRIDES)
    data = str(work / "data")
    prepare_data(cfg.data, data, progress=False)
    experts = []
    for k in range(cfg.data.num_clusters):
        experts.append(train_expert(cfg, k, data, str(work / f"expert-{k}"))["final_checkpoint"])
        _log(f"expert {k} trained", t0)
    router = train_router(cfg, data, str(work / "router"))["router"]
    _log("router trained", t0)
    url = str(work / "ensemble.json")
    write_ensemble(url, experts, router, data, config_hash=cfg.config_hash(), name="gallery")
    return url


def train_video_expert(work: Path, t0: float) -> str:
    from archipelago.config import ArchipelagoConfig
    from archipelago.data.prepare import prepare_data
    from archipelago.experts.train import train_expert

    cfg = ArchipelagoConfig.model_validate(VIDEO_CONFIG)
    data = str(work / "video-data")
    prepare_data(cfg.data, data, progress=False)
    ckpt = train_expert(cfg, 0, data, str(work / "video-expert"))["final_checkpoint"]
    _log("video expert trained", t0)
    return ckpt


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------

def routing_grids(ensemble: str, out: Path, n: int, steps: int, cfg_scale: float) -> list[str]:
    """quickstart.png (top-1) and one grid per routing mode, same seed: the noise is the same in each."""
    from archipelago.generate import generate, load_sampler_model
    from archipelago.imaging import save_grid

    rows = []
    for mode in ROUTINGS:
        model = load_sampler_model(ensemble, mode=mode)
        t = time.perf_counter()
        x = generate(model, n, cfg_scale=cfg_scale, seed=0, steps=steps)
        seconds = time.perf_counter() - t
        save_grid(x, str(out / f"routing-{mode}.png"), nrow=10)
        if mode == "top-1":
            save_grid(x, str(out / "quickstart.png"), nrow=10)
        rows.append(f"| `{mode}` | ![{mode}](gallery/routing-{mode}.png) | {seconds:.1f} s |")
    return rows


def distrifusion_grid(ensemble: str, out: Path, n: int, steps: int, cfg_scale: float) -> list[str]:
    """Expert 0 on one device vs 2 ranks (sync patch: exact; DistriFusion: stale neighbour K/V after one
    warm-up step). Patch modes split one model's image, so this is one expert, drawn on its shard's classes."""
    from archipelago.eval.fidelity import psnr
    from archipelago.imaging import save_grid
    from archipelago.inference.config import ParallelConfig
    from archipelago.inference.launch import generate_parallel, resolve_members, sampling_spec

    experts, _, _, class_counts = resolve_members(ensemble)
    counts = (class_counts or [[1] * 10])[0]
    own = sorted(range(len(counts)), key=lambda c: -counts[c])[:5]         # expert 0's most common classes
    spec = sampling_spec(experts[0], n=n, cfg_scale=cfg_scale, seed=0, steps=steps, device="cpu")
    spec = spec.model_copy(update={"labels": [own[i % len(own)] for i in range(n)]})
    runs: dict[str, tuple[torch.Tensor, list[dict[str, Any]]]] = {}
    for name, pcfg in (("one device", ParallelConfig(mode="single", world_size=1)),
                       ("sync patch, 2 ranks", ParallelConfig(mode="sync_patch", world_size=2)),
                       ("DistriFusion, 2 ranks", ParallelConfig(mode="distrifusion", world_size=2,
                                                                warmup_steps=1))):
        runs[name] = generate_parallel(spec, pcfg, launcher="local", timeout_s=600)
    ref = runs["one device"][0]
    save_grid(torch.cat([x for x, _ in runs.values()]), str(out / "distrifusion.png"), nrow=n)
    rows = []
    for name, (x, ranks) in runs.items():
        db = psnr(x, ref)
        sent = sum(r["comm"].get("total_bytes", 0) for r in ranks)
        rows.append(f"| {name} | {'identical' if db == float('inf') else f'{db:.1f} dB'} | "
                    f"{max(r['latency_s'] for r in ranks):.2f} s | {sent / 2**10:.0f} KiB |")
    return rows


def dualparal_gif(expert: str, out: Path, work: Path) -> str:
    from archipelago.inference.video_cli import VideoSpec, generate_video

    spec = VideoSpec(expert=expert, frames=32, block=8, num_cat=2, steps=12, labels=[3, 7], seed=0,
                     device="cpu", out=str(out / "dualparal.gif"), tensor_out=str(work / "dualparal.safetensors"))
    ranks = generate_video(spec, world_size=2, launcher="local", timeout_s=600)
    sent = sum(r["comm"].get("total_bytes", 0) for r in ranks)
    return (f"`{ranks[0]['describe']}`: pipeline {max(r['latency_s'] for r in ranks):.1f} s, "
            f"{sent / 2**20:.2f} MiB sent between the 2 ranks")


# ----------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------

def write_page(page: Path, source: str, routing: list[str], distri: list[str], video: str, seconds: float) -> None:
    page.write_text(f"""# Gallery

What the code draws today. Every picture below is regenerated by `make gallery` (`python scripts/gallery.py`)
from {source}; the numbers are measured in the same run (this one took {seconds / 60:.0f} min on
{os.cpu_count()} CPUs). Digits are 16x16 (shown 4x), one column per class 0..9.

## Quickstart

The ensemble of 4 experts with top-1 routing (what `archipelago quickstart` writes to
`runs/quickstart/samples/`):

![quickstart](gallery/quickstart.png)

## Routing modes

The same noise and labels under each routing mode (`archipelago generate --mode MODE`):

| mode | samples | time |
|---|---|---|
{chr(10).join(routing)}

## DistriFusion vs one device

Expert 0 (patch modes split one model's image; an ensemble runs on one device or expert-parallel), on its
shard's most common classes. Rows: one device; sync patch on 2 ranks (exact: identical to one device);
DistriFusion on 2 ranks (after one synchronous warm-up step each rank attends to its neighbour's K/V from the
previous step). PSNR is against the one-device output from the same noise.

![distrifusion](gallery/distrifusion.png)

| run | PSNR vs one device | latency | sent |
|---|---|---|---|
{chr(10).join(distri)}

## DualParal video

Two videos (classes 3 and 7), 32 frames from a video expert trained on 8-frame clips: frame blocks enter a
2-rank ring pipeline at decreasing noise levels (`archipelago generate-video --expert CKPT --frames 32 --block 8
--num-cat 2 --steps 12 --labels 3,7 --world-size 2 --launcher local`).
{video}.

![dualparal](gallery/dualparal.gif)
""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", help="use this ensemble.json (e.g. from `make quickstart`) instead of training")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where gallery.md and gallery/ go")
    p.add_argument("--keep", type=Path, help="keep the trained models here (default: a temp dir, removed)")
    p.add_argument("--steps", type=int, default=32, help="sampler steps of the image grids")
    p.add_argument("--threads", type=int, default=1, help="torch threads here (tiny models: more threads mostly "
                   "contend; the parallel ranks use one each)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="archipelago-gallery-"))
    pictures = args.out / "gallery"
    pictures.mkdir(parents=True, exist_ok=True)
    try:
        ensemble = args.ensemble or train_image_ensemble(work, t0)
        source = (f"the ensemble `{args.ensemble}`" if args.ensemble else
                  "tiny models it trains itself on the CPU (the quickstart's 4 digit experts at 1000 steps and\n"
                  "its router, a 2-block video expert at 250 steps)")
        routing = routing_grids(ensemble, pictures, n=20, steps=args.steps, cfg_scale=2.5)
        _log("routing grids", t0)
        distri = distrifusion_grid(ensemble, pictures, n=10, steps=args.steps, cfg_scale=2.5)
        _log("DistriFusion grid", t0)
        video = dualparal_gif(train_video_expert(work, t0), pictures, work)
        _log("DualParal GIF", t0)
        write_page(args.out / "gallery.md", source, routing, distri, video, time.perf_counter() - t0)
        _log(f"wrote {args.out / 'gallery.md'}", t0)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
