"""Rectified flow: the straight path x_t = (1-t) x0 + t eps, its velocity eps - x0, and the training loss.

t = 0 is data and t = 1 is noise; samplers integrate from 1 to 0. Kept separate from the model so the
router, the ensemble and the samplers all share one definition of the path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def sample_t(n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
             mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """n flow times from the logit-normal: sigmoid(mean + std * z), z ~ N(0,1); float32 [n] in (0, 1).

    Logit-normal (SD3) puts more training signal on mid-range t, where the velocity is hardest to predict.
    Drawn on the generator's device (then moved to `device`) so a seeded CPU generator works for GPU runs.
    """
    draw_device = generator.device if generator is not None else device
    z = torch.randn(n, generator=generator, device=draw_device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z).to(device if device is not None else z.device)


def _expand_t(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Scalar or per-sample t [N] -> broadcastable against `like` [N, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps for inputs of any rank; t is a scalar or one value per sample [N]."""
    t = _expand_t(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d x_t / d t along the straight path: eps - x0 (independent of t)."""
    return eps - x0


def flow_matching_loss(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                       x0: torch.Tensor, y: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Scalar MSE between model(x_t, t, y) and eps - x0, with eps and t drawn from `generator`.

    Passing a per-rank seeded generator makes the noise of every step reproducible (and different across
    ranks), independent of whatever else consumes the global RNG. The MSE is computed in fp32.
    """
    draw_device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=torch.float32)
    eps = eps.to(device=x0.device, dtype=x0.dtype)                                # [N, ...]
    t = sample_t(x0.shape[0], generator=generator, device=x0.device)              # [N]
    x_t = interpolate(x0, eps, t)                                                 # [N, ...]
    v = model(x_t, t, y)                                                          # [N, ...]
    return F.mse_loss(v.float(), velocity_target(x0, eps).float())
