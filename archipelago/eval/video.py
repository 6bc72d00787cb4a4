"""Scores of a long video made block by block (DualParal): do blocks join without jumps, and how much state
does block-wise sampling hold against the whole video's latents."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from archipelago.inference.dualparal import DualParalConfig


def boundary_consistency(video: torch.Tensor, block_frames: int, pool: int = 1) -> dict[str, float]:
    """Mean absolute change between consecutive frames at block boundaries (frame bB-1 -> bB) vs inside
    blocks; video [N, C, F, H, W]. ratio >> 1 means visible jumps where blocks meet. `pool` > 1 compares
    pool x pool average-pooled frames (a low-pass feature: insensitive to pixel-level flicker)."""
    v = video.float()
    if pool > 1:
        n, c, f, h, w = v.shape
        v = torch.nn.functional.avg_pool2d(v.transpose(1, 2).reshape(n * f, c, h, w), pool)
        v = v.reshape(n, f, c, h // pool, w // pool).transpose(1, 2)             # [N, C, F, H/p, W/p]
    diff = (v[:, :, 1:] - v[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))             # [F-1]
    idx = torch.arange(diff.shape[0])
    at_boundary = (idx + 1) % block_frames == 0
    if not at_boundary.any() or at_boundary.all():
        raise ValueError(f"need frames both inside and across blocks (F={video.shape[2]}, B={block_frames})")
    boundary, inside = float(diff[at_boundary].mean()), float(diff[~at_boundary].mean())
    return {"boundary": boundary, "inside": inside, "ratio": boundary / max(inside, 1e-12)}


def video_memory_bytes(cfg: DualParalConfig, model: nn.Module, batch: int = 1) -> dict[str, int]:
    """Analytic size of the state rank 0 holds: blocks in flight + template + tail, vs the whole video's
    latents (what a non-block-wise sampler would hold), fp32."""
    frame = batch * model.in_channels * model.input_size ** 2 * 4
    in_flight = min(cfg.steps, cfg.num_blocks)
    return {"blocks_in_flight": in_flight * cfg.block_frames * frame,
            "template_and_tail": (cfg.block_frames + cfg.num_cat) * frame,
            "whole_video": cfg.num_blocks * cfg.block_frames * frame}
