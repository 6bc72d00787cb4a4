"""Two ways a training run must end cleanly instead of quietly: divergence (a loss of nan raises nowhere by
itself, and NaN weights must never become a `final` checkpoint) and preemption (a spot node's SIGTERM
leaves a short grace period in which the last finished step can still be checkpointed).

Both are decided once per optimizer step from one small flag tensor, all-reduced (MAX) across ranks when
there are several, so every rank stops, skips or checkpoints at the same step: the checkpoint is a
collective, and a rank that decided alone would hang its peers.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from archipelago.errors import DivergenceError

log = logging.getLogger(__name__)

PREEMPT_TIMEOUT_EXIT = 128 + signal.SIGTERM   # what a plain SIGTERM death reports: no checkpoint in time


def params_finite(modules: Iterable[torch.nn.Module | None]) -> bool:
    """True when every parameter/buffer of `modules` (this rank's shard of a DTensor) is finite."""
    for module in modules:
        if module is None:
            continue
        for t in (*module.parameters(), *module.buffers()):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
                return False
    return True


def agree(flags: list[float], device: torch.device) -> list[float]:
    """Element-wise max of `flags` over all ranks (the flags themselves without a multi-rank group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(flags, dtype=torch.float32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [float(x) for x in t.cpu()]
    return list(flags)


class NonFiniteGuard:
    """Counts non-finite steps and decides: stop at once (`stop`), or skip up to `max_skips` steps (`skip`).

    `what` names the run in the error line ("expert 0 (runs/x/expert-0)"); `setting` the config field.
    """

    def __init__(self, mode: str, max_skips: int, what: str, setting: str):
        self.mode, self.max_skips, self.what, self.setting = mode, max_skips, what, setting
        self.skipped = 0
        self.last_good: str | None = None      # URL of the newest checkpoint written from finite weights

    def check(self, step: int, loss: float, grad_norm: float, weights_ok: bool = True) -> bool:
        """True if the step is good; False if it was skipped; DivergenceError if the run must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm) and weights_ok:
            return True
        bad = (f"loss {loss}" if not math.isfinite(loss) else
               f"grad norm {grad_norm}" if not math.isfinite(grad_norm) else "non-finite weights")
        if self.mode == "skip" and weights_ok and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning("%s: non-finite %s at step %d: step skipped (%d of at most %d, %s=skip)", self.what, bad,
                        step, self.skipped, self.max_skips, self.setting)
            return False
        why = (f"after {self.skipped} skipped step(s), the most {self.setting}=skip allows"
               if self.mode == "skip" and weights_ok else f"{self.setting}={self.mode}")
        raise DivergenceError(
            f"{self.what}: non-finite {bad} at step {step}; stopped ({why}), no final checkpoint written; "
            f"last good checkpoint: {self.last_good or 'none'}; lower the learning rate or resume from it")


class PreemptionHandler:
    """SIGTERM -> `requested`; the loop checkpoints its last finished step and raises Preempted.

    A watchdog started by the signal exits the process with PREEMPT_TIMEOUT_EXIT after `grace_s` if that has
    not happened by then (the node would kill us anyway; the line says which checkpoint the resume uses).
    Installed only from the main thread (Python's rule for signal handlers; Ray Train runs the train
    function in another thread, where Ray's own handling applies). A context manager: restores the old
    handler on exit.
    """

    def __init__(self, grace_s: float, what: str):
        self.grace_s, self.what = grace_s, what
        self.requested_at: float | None = None
        self.last_checkpoint: str | None = None
        self._old: Any = None
        self._installed = False
        self._done = threading.Event()

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._installed:
            signal.signal(signal.SIGTERM, self._old)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        log.warning("%s: SIGTERM: checkpointing the current step within %.0fs, then exiting", self.what,
                    self.grace_s)
        threading.Thread(target=self._watchdog, name="preempt-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        if self._done.wait(self.grace_s):
            return
        import sys

        print(f"error: {self.what}: SIGTERM and no checkpoint within expert.preempt_grace_s={self.grace_s:g}s; "
              f"a resume starts from {self.last_checkpoint or 'the beginning'}", file=sys.stderr, flush=True)
        os._exit(PREEMPT_TIMEOUT_EXIT)

    def elapsed(self) -> float:
        return 0.0 if self.requested_at is None else time.monotonic() - self.requested_at
