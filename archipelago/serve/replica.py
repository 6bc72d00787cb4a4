"""One model of an ensemble (an expert, or the router) as a Ray Serve deployment: it loads only its own
weights, so K experts are K processes that run side by side and scale on their own (expert parallel as a
service), and concurrent calls are merged by `serve.batch`.

Batching and exact numbers: CPU matmuls are not batch-invariant (a [1, d] x [d, h] product can round
differently from the same row inside a [16, d] product), so running two requests' samples as one batch
changes their samples at the 1e-7 level. With `exact` a batch still arrives as one call but runs one
forward per request, and every response equals `archipelago generate` bit for bit; without it the batch
is one forward (what the batching benchmark measures).
"""
from __future__ import annotations

from typing import Any

import torch
from ray import serve

ROUTER = "router"


def load_member(url: str, kind: str) -> torch.nn.Module:
    """An eval-mode expert (kind 'expert') or router (kind 'router') from its checkpoint directory."""
    if kind == ROUTER:
        from archipelago.router.train import load_router

        return load_router(url)[0].eval()
    from archipelago.experts.checkpoint import load_expert

    return load_expert(url)[0].eval()


class ModelReplica:
    """Deployment body: `await handle.remote(x, t, y)` -> (output, size of the batch it ran in)."""

    def __init__(self, url: str, kind: str, batch_max_size: int, batch_wait_s: float, exact: bool,
                 threads: int = 1):
        torch.set_num_threads(threads)   # the CPUs Ray reserved for it (1 when none: replicas share cores)
        self.model, self.exact = load_member(url, kind), exact
        self.forward.set_max_batch_size(batch_max_size)
        self.forward.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return await self.forward((x, t, y))

    def _batched(self, calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, int]]:
        with torch.no_grad():
            if self.exact or len(calls) == 1:
                outs = [self.model(x, t, y).float() for x, t, y in calls]
            else:
                x, t, y = (torch.cat(parts) for parts in zip(*calls, strict=True))
                outs = list(self.model(x, t, y).float().split([c[0].shape[0] for c in calls]))
        return [(o, len(calls)) for o in outs]

    @serve.batch(max_batch_size=8)   # sizes set per deployment in __init__ from `serve:`
    async def forward(self, calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[Any]:
        return self._batched(calls)


def deployment(name: str, url: str, kind: str, serve_cfg: Any, replicas: int) -> Any:
    """The bound deployment of one member: its replicas (fixed or autoscaled) and batching from `serve:`."""
    options: dict[str, Any] = {"name": name, "ray_actor_options": {"num_cpus": serve_cfg.replica_cpus},
                               "max_ongoing_requests": 4 * serve_cfg.batch_max_size,
                               "health_check_period_s": 2.0, "health_check_timeout_s": 10.0,
                               "graceful_shutdown_timeout_s": 5.0}
    if serve_cfg.max_replicas is not None and serve_cfg.max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": serve_cfg.max_replicas,
                                         "target_ongoing_requests": serve_cfg.batch_max_size}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(ModelReplica).options(**options).bind(
        url, kind, serve_cfg.batch_max_size, serve_cfg.batch_wait_s, serve_cfg.exact,
        max(1, int(serve_cfg.replica_cpus)))
