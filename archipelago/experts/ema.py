"""Exponential moving average of an expert's weights: the weights we sample from and checkpoint.

Kept as a plain single-device nn.Module (a deep copy), so sampling and `load_expert` never need to know
which training strategy produced it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

# Prefixes added by wrappers (DDP / DeepSpeed `.module`, torch.compile `._orig_mod`) that the shadow lacks.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


class EMA:
    """shadow <- decay * shadow + (1 - decay) * params, on a frozen deep copy of the model.

    Create it from the *unwrapped* model before applying a strategy (as DiT's train.py does), then call
    `update(...)` after every optimizer step:
      - single / DDP / torch.compile: `ema.update(model)` (wrapper name prefixes are stripped);
      - FSDP2 / DeepSpeed ZeRO-3: parameters are sharded, so the caller passes *full* tensors, e.g.
        `{n: p.full_tensor() for n, p in model.named_parameters()}` (FSDP2, a collective on every rank) or
        the params gathered with `deepspeed.zero.GatheredParameters`; a Mapping name -> tensor is accepted.
    Buffers (e.g. the fixed pos_embed) are copied, not averaged.

    With `warmup` the decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n: a short run
    (a few hundred steps at decay 0.999) would otherwise sample from weights still dominated by the
    initialisation. `num_updates` is part of the training state; resume restores it (= the step).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: nn.Module = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """One EMA step from the current weights (a module with full params, or a name -> tensor mapping)."""
        # Looked up on every call: Module.to() replaces buffer objects, so cached references would go stale.
        params = dict(self.shadow.named_parameters())
        shadow_buffers = dict(self.shadow.named_buffers())
        if isinstance(model, nn.Module):
            source = {_strip(n): p for n, p in model.named_parameters()}
            buffers = {_strip(n): b for n, b in model.named_buffers()}
        else:
            source = {_strip(n): p for n, p in model.items() if _strip(n) in params}
            buffers = {_strip(n): b for n, b in model.items() if _strip(n) in shadow_buffers}
        missing = params.keys() - source.keys()
        if missing:
            raise KeyError(f"EMA.update: {len(missing)} parameters missing, e.g. {sorted(missing)[:3]}")
        decay = self.current_decay()
        self.num_updates += 1
        for name, ema_p in params.items():
            p = source[name].detach()
            ema_p.lerp_(p.to(device=ema_p.device, dtype=ema_p.dtype), 1.0 - decay)
        for name, b in buffers.items():
            if name in shadow_buffers:
                shadow_buffers[name].copy_(b)

    def current_decay(self) -> float:
        """The decay the next update uses (ramped while `num_updates` is small, see class docstring)."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the unwrapped model's state_dict."""
        return self.shadow.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Restore averaged weights (resume)."""
        self.shadow.load_state_dict(state_dict)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite a plain (unsharded) model's parameters and buffers with the averaged ones."""
        model.load_state_dict(self.shadow.state_dict())

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow (e.g. keep it on CPU to save accelerator memory)."""
        self.shadow.to(device)
        return self
