"""Sampling for people and benchmarks: load an ensemble (or one expert), draw seeded samples, write a grid.

One entry point for both kinds of model, because an Ensemble has the expert call signature: the same
`generate` drives a single DiT checkpoint and a K-expert ensemble with any routing mode.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from archipelago import storage
from archipelago.errors import CheckpointError, StorageError


def load_sampler_model(url: str, mode: str = "top-1", device: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode model_fn from an ensemble.json URL (or a directory holding one), or an expert
    checkpoint directory (its meta.json). `mode` (full | top-k) applies to ensembles only."""
    from archipelago.ensemble import ENSEMBLE_FILE, load_ensemble
    from archipelago.experts.checkpoint import META, load_expert

    if url.endswith(".json") or storage.exists(storage.join(url, ENSEMBLE_FILE)):
        return load_ensemble(url, mode=mode, device=device)
    if storage.exists(storage.join(url, META)):
        model, meta = load_expert(url, device=device)
        model.image_shape = tuple(meta.get("image_shape") or sample_shape(model))
        model.data_space = meta.get("data_space")
        return model
    raise CheckpointError(f"{url}: neither an ensemble.json nor an expert checkpoint directory (no "
                          f"{ENSEMBLE_FILE} or {META} there)")


def sample_shape(model: nn.Module) -> tuple[int, ...]:
    """Shape of one sample: `model.image_shape` when a loader recorded it (videos: [C, F, H, W], the frame
    count is not part of a VideoDiT), else [C, H, W] from the (first expert's) patch embedding."""
    if getattr(model, "image_shape", None):
        return tuple(int(d) for d in model.image_shape)
    inner = model.experts[0] if hasattr(model, "experts") else model
    c, s = int(inner.in_channels), int(inner.input_size)
    return (c, s, s)


def default_classes(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ...: a balanced, deterministic class set for n samples."""
    return torch.arange(n, dtype=torch.long) % max(1, num_classes)


@torch.no_grad()
def generate(model: nn.Module, n: int, cfg_scale: float = 1.0, seed: int = 0, steps: int = 32,
             sampler: str = "euler", classes: torch.Tensor | None = None,
             device: str | torch.device | None = None) -> torch.Tensor:
    """n samples [n, C, H, W] (fp32, unclamped) from `model` (a DiT or an Ensemble), eval mode.

    Noise is drawn on the CPU from `seed`, so the same seed gives the same samples on any device.
    classes: long [n] (default: `default_classes`). cfg_scale 1 disables guidance.
    """
    from archipelago.experts.sampling import sample

    model.eval()   # label dropout must be off: in train mode the condition would be dropped at random
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    y = default_classes(n, model.num_classes) if classes is None else torch.as_tensor(classes, dtype=torch.long)
    if y.shape != (n,):
        raise ValueError(f"classes must have shape [{n}], got {tuple(y.shape)}")
    if (y < 0).any() or (y >= model.num_classes).any():
        raise ValueError(f"classes must be in [0, {model.num_classes})")
    noise = torch.randn((n, *sample_shape(model)), generator=torch.Generator().manual_seed(seed))
    return sample(model, noise.to(dev), y.to(dev), steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                  null_class=model.num_classes).cpu()


def samples_bytes(samples: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any] | None = None) -> bytes:
    """{"samples": fp32 [N,...], "labels": long [N]} as safetensors bytes (what `archipelago eval` reads)."""
    import json

    from archipelago.tensorfile import save_bytes

    return save_bytes({"samples": samples.float().contiguous(), "labels": labels.long().contiguous()},
                      metadata={"archipelago": "samples", "meta": json.dumps(meta or {}, sort_keys=True)})


def save_samples(url: str, samples: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any] | None = None) -> str:
    """Write `samples_bytes` to url; returns its sha256."""
    return storage.write_bytes(url, samples_bytes(samples, labels, meta))


def load_samples(url: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(samples, labels or None) from a safetensors file written by `save_samples` (or any file with a
    `samples` tensor, or a single tensor)."""
    from safetensors.torch import load

    try:
        t = load(storage.read_bytes(url))
    except Exception as exc:
        if isinstance(exc, StorageError):
            raise
        raise CheckpointError(f"{url}: not a valid safetensors file ({type(exc).__name__})") from None
    if "samples" in t:
        return t["samples"], t.get("labels")
    if len(t) == 1:
        return next(iter(t.values())), None
    raise CheckpointError(f"{url}: no 'samples' tensor (found {', '.join(sorted(t))})")


def picture_bytes(samples: torch.Tensor) -> bytes:
    """PNG grid for images [N,C,H,W]; an animated GIF row for videos [N,C,F,H,W]."""
    from archipelago.imaging import gif_bytes, grid_png_bytes

    if samples.dim() == 5:
        return gif_bytes(samples[:8].movedim(1, 2))
    return grid_png_bytes(samples)


def write_picture(samples: torch.Tensor, url: str) -> str:
    """Write `picture_bytes` to url; returns its sha256."""
    return storage.write_bytes(url, picture_bytes(samples))


def data_space_of(url: str) -> dict[str, Any] | None:
    """The `data_space` an ensemble's experts (or one expert checkpoint) were trained in, from meta.json only."""
    from archipelago.ensemble import ENSEMBLE_FILE, read_spec
    from archipelago.experts.checkpoint import META, read_meta

    if url.endswith(".json") or storage.exists(storage.join(url, ENSEMBLE_FILE)):
        from archipelago.ensemble import _ensemble_file, _resolve

        spec = read_spec(url)
        return read_meta(_resolve(_ensemble_file(url), spec.experts[min(spec.experts)])).get("data_space")
    return read_meta(url).get("data_space") if storage.exists(storage.join(url, META)) else None


def to_pixels(samples: torch.Tensor, space: dict[str, Any] | None, where: str, vae: str | None = None) -> torch.Tensor:
    """Samples as images: decoded with the model's VAE when it learned latents (refused with one line if `vae`
    is another VAE, or given for a pixel model), unchanged for a pixel model."""
    from archipelago.data.latents import decoder_for

    codec = decoder_for(space, where, vae_path=vae)
    return samples if codec is None else codec.decode(samples)


def sample_grid(ckpt_or_ensemble_url: str, grid_url: str, cfg: Any) -> dict[str, Any]:
    """Sample cfg.inference.num_samples images (cfg.expert.cfg_scale / sample_steps / sampler, seed
    cfg.inference.seed, routing cfg.inference.routing for ensembles) and write a PNG grid to grid_url."""
    model = load_sampler_model(ckpt_or_ensemble_url, mode=cfg.inference.routing)
    e = cfg.expert
    x = generate(model, cfg.inference.num_samples, cfg_scale=e.cfg_scale, seed=cfg.inference.seed,
                 steps=e.sample_steps, sampler=e.sampler)
    digest = write_picture(to_pixels(x, getattr(model, "data_space", None), ckpt_or_ensemble_url), grid_url)
    return {"grid": grid_url, "sha256": digest, "n": x.shape[0],
            "expert_calls": getattr(model, "expert_calls", None)}


__all__ = [
    "default_classes",
    "generate",
    "load_sampler_model",
    "load_samples",
    "picture_bytes",
    "sample_grid",
    "sample_shape",
    "samples_bytes",
    "save_samples",
    "to_pixels",
    "write_picture",
]
