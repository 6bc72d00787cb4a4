"""The two speed switches of an expert, `expert.precision` and `expert.compile`, in one place so training,
sampling and the benchmarks apply them the same way.

bf16 is autocast only: weights, gradients, optimizer state and the EMA stay fp32 (master weights), so a bf16
run resumes, averages and checkpoints exactly like an fp32 one. Compilation is `nn.Module.compile()`, which
compiles in place and keeps the parameter names, so checkpoints of compiled and eager runs are interchangeable.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from archipelago.errors import ConfigError

log = logging.getLogger(__name__)


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse bf16 on a device without it, before any work (one line), instead of silently training fp32."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"field 'expert.precision': bf16 but {device} ({name}) has no bf16 support; "
                          f"use expert.precision=fp32")


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward and loss (backward follows the forward's dtypes); fp32: nothing."""
    device = torch.device(device)
    if precision != "bf16":
        return contextlib.nullcontext()
    check_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_compiler() -> None:
    """torch.compile's CPU backend (inductor) emits C++: without a compiler it fails deep in the first call."""
    import shutil

    if not torch.cuda.is_available() and not (shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")):
        raise ConfigError("field 'expert.compile': true needs a C compiler (gcc/clang) on CPU; install one or "
                          "use expert.compile=false")


def compile_module(module: nn.Module) -> nn.Module:
    """Compile `module` in place (same object, same state_dict keys) and return it."""
    check_compiler()
    module.compile()
    return module


def compile_for_sampling(model: nn.Module) -> nn.Module:
    """Compile what runs at every sampler step: each expert of an ensemble (and its router), or the model."""
    experts = getattr(model, "experts", None)
    if experts is None:
        return compile_module(model)
    for e in experts:
        if any(True for _ in e.parameters()):   # not a stand-in for a remote expert
            compile_module(e)
    router = getattr(model, "router", None)
    if isinstance(router, nn.Module):
        compile_module(router)
    return model
