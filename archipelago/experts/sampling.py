"""Samplers for the rectified-flow ODE dx/dt = v(x, t), integrated from noise (t=1) to data (t=0).

Steps are stateless functions of tensors in fp32, so a pipeline that keeps many frame blocks at different
noise levels (DualParal) can hold one (x, t) per block and call the same step. `sample` works with any
`model_fn(x, t, y) -> v`: one expert (DiT), an Ensemble, or a parallel wrapper.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS: tuple[str, ...] = ("euler", "heun")


def timesteps(steps: int) -> torch.Tensor:
    """steps+1 equally spaced times from 1 (noise) to 0 (data), float32."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampler step")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One explicit Euler step in fp32: x + (t_next - t) v."""
    return x.float() + (t_next - t) * v.float()


def heun_step(x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Heun (trapezoidal) correction in fp32: x + (t_next - t) (v + v_next) / 2.

    `v_next` is the velocity at (euler_step(x, v, t, t_next), t_next).
    """
    return x.float() + (t_next - t) * 0.5 * (v.float() + v_next.float())


def guided_velocity(model_fn: VelocityFn, x: torch.Tensor, t: float, y: torch.Tensor,
                    cfg_scale: float = 1.0, null_class: int | None = None) -> torch.Tensor:
    """Velocity at scalar time t in fp32; with cfg_scale != 1, v_u + s (v_c - v_u) from one batch [cond; null]."""
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)   # [N]
    if cfg_scale == 1.0:
        return model_fn(x, tt, y).float()                                           # [N, ...]
    if null_class is None:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs null_class")
    null = torch.full_like(y, null_class)
    v = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).float()  # [2N, ...]
    v_cond, v_uncond = v.chunk(2)                                                   # 2 x [N, ...]
    return v_uncond + cfg_scale * (v_cond - v_uncond)                               # [N, ...]


@torch.no_grad()
def sample(model_fn: VelocityFn, noise: torch.Tensor, y: torch.Tensor, steps: int = 32, sampler: str = "euler",
           cfg_scale: float = 1.0, null_class: int | None = None, progress: bool = False) -> torch.Tensor:
    """Integrate from `noise` at t=1 to x0 at t=0 with `steps` steps; returns fp32 x0 shaped like noise.

    sampler: "euler" (steps evaluations) or "heun" (2*steps - 1: the last step, to t=0, is plain Euler).
    null_class defaults to `model_fn.num_classes` (DiT, Ensemble) when guidance needs it. Modules must
    already be in eval mode (label dropout would otherwise randomly drop the condition).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {' | '.join(SAMPLERS)}")
    if cfg_scale != 1.0 and null_class is None:
        null_class = getattr(model_fn, "num_classes", None)
        if null_class is None:
            raise ValueError("cfg_scale != 1 needs null_class (model_fn has no num_classes attribute)")
    ts = timesteps(steps).tolist()
    pairs = list(itertools.pairwise(ts))
    if progress:
        from rich.progress import track
        pairs = track(pairs, description=f"{sampler} x{steps}")

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model_fn, x, t, y, cfg_scale, null_class)

    x = noise.float()
    for t, t_next in pairs:
        v = velocity(x, t)
        x_euler = euler_step(x, v, t, t_next)
        if sampler == "heun" and t_next > 0:
            x = heun_step(x, v, velocity(x_euler, t_next), t, t_next)
        else:
            x = x_euler
    return x
