"""The ensemble as the ingress sees it: the same `Ensemble` (same routing, same sums, same sampler) whose
router and experts are stand-ins calling their deployments. Only where the numbers are computed changes,
so a served request gives the samples `archipelago generate` gives; the experts a step needs run at once,
each on its own replica (expert parallel).

A call whose replica died or stopped answering is sent again (another replica takes it, or the restarted
one) until the request's deadline; then the request fails with `Unavailable` (HTTP 503), never hangs.
"""
from __future__ import annotations

import collections
import functools
import threading
import time
from typing import Any

import torch
from torch import nn

from archipelago.ensemble import Ensemble
from archipelago.errors import ArchipelagoError

RETRY_PAUSE_S = 0.2


class Unavailable(ArchipelagoError):
    """A model deployment did not answer before the request's deadline (replica dead, restarting, busy)."""


class BatchStats:
    """How many calls ran in batches of each size (the replicas report the size with every result)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sizes: collections.Counter[int] = collections.Counter()
        self.retries = 0

    def add(self, size: int) -> None:
        with self._lock:
            self.sizes[size] += 1

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def summary(self) -> dict[str, Any]:
        with self._lock:
            calls = sum(self.sizes.values())
            return {"calls": calls, "max_batch_size": max(self.sizes, default=0),
                    "mean_batch_size": round(sum(s * c for s, c in self.sizes.items()) / calls, 3) if calls else 0.0,
                    "calls_by_batch_size": {str(s): c for s, c in sorted(self.sizes.items())},
                    "retried_calls": self.retries}


@functools.cache
def retryable_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning "that replica is gone or slow", not "the model failed": worth another replica."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    return (rex.RayActorError, rex.ActorUnavailableError, TimeoutError, sex.BackPressureError,
            sex.RequestCancelledError)


class Deadline:
    """A request's time budget, shared by all its calls; each call waits at most `call_timeout_s`."""

    def __init__(self, request_timeout_s: float, call_timeout_s: float):
        self.end = time.monotonic() + request_timeout_s
        self.request_timeout_s, self.call_timeout_s = request_timeout_s, call_timeout_s

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise Unavailable(f"{what} did not answer within the request timeout "
                              f"({self.request_timeout_s:g} s): replica dead, restarting or overloaded; retry")
        return min(left, self.call_timeout_s)


class RemoteMember(nn.Module):
    """An expert or the router, evaluated by its deployment: forward(x, t, y) -> output."""

    def __init__(self, name: str, handle: Any, stats: BatchStats, deadline: Deadline, **attrs: Any):
        super().__init__()
        self.name, self.handle, self.stats, self.deadline = name, handle, stats, deadline
        for key, value in attrs.items():
            setattr(self, key, value)

    def submit(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Any:
        return self.handle.remote(x, t, y)

    def result(self, response: Any, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The answer of `response`, re-sent (to whichever replica is live) until the deadline."""
        retryable = retryable_errors()
        while True:
            try:
                out, size = response.result(timeout_s=self.deadline.left(self.name))
                self.stats.add(size)
                return out
            except retryable:
                response.cancel()   # a slow replica may still be on it: the retry replaces it
                self.stats.retried()
                time.sleep(min(RETRY_PAUSE_S, max(0.0, self.deadline.end - time.monotonic())))
                self.deadline.left(self.name)
                response = self.submit(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.result(self.submit(x, t, y), (x, t, y))


class RemoteEnsemble(Ensemble):
    """`Ensemble` whose members are `RemoteMember`s; the experts of one step are called concurrently."""

    def run_experts(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    calls: list[tuple[int, torch.Tensor | None]]) -> list[torch.Tensor]:
        args = [(x, t, y) if idx is None else (x[idx], t[idx], y[idx]) for _, idx in calls]
        pending = [self.experts[k].submit(*a) for (k, _), a in zip(calls, args, strict=True)]
        return [self.experts[k].result(p, a) for (k, _), p, a in zip(calls, pending, args, strict=True)]
