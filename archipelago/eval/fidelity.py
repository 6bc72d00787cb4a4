"""How close an approximate parallel mode comes to the single-device output from the same noise (PSNR):
the quality a parallel mode is judged by, beside its latency and traffic."""
from __future__ import annotations

import math

import torch


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of x against ref; data_range defaults to ref's max - min.

    Identical tensors give +inf. DistriFusion reports PSNR (and LPIPS/FID) of the parallel output against
    the single-device output from the same noise, not against data.
    """
    ref = ref.detach().double()
    err = (x.detach().double() - ref).pow(2).mean().item()
    rng = float(ref.max() - ref.min()) if data_range is None else data_range
    if err == 0:
        return math.inf
    return 10 * math.log10(rng * rng / err)
