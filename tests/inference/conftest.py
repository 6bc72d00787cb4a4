"""Fixtures of the inference tests: small random-init experts and routers written as real checkpoints."""
from __future__ import annotations

import torch
from torch import nn

from archipelago.experts.checkpoint import save_for_inference
from archipelago.experts.dit import DiT


def tiny_dit(seed: int = 0, **kw) -> DiT:
    """A 16x16 DiT (8x8 tokens) with every weight perturbed: adaLN-Zero init would output exactly 0."""
    args = {"input_size": 16, "in_channels": 1, "patch_size": 2, "hidden_size": 32, "depth": 2,
            "num_heads": 4, "num_classes": 10, "class_dropout": 0.1}
    return randomize(DiT(**{**args, **kw}), seed)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def save_expert(model: nn.Module, url: str) -> str:
    """Write `model` as an expert checkpoint (EMA weights = the model) in the format load_expert reads."""
    return save_for_inference(model, url)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    from archipelago.eval.fidelity import psnr as _psnr

    return _psnr(x, ref)
