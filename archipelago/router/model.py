"""The router r(x_t, t[, y]) -> logits over the K experts: a small time-conditioned CNN.

It is what makes sparse (top-1 / top-k) ensembling possible, so it must be cheap next to one expert: the
stem patchifies (stride 2) and the residual blocks halve the resolution down to 4x4, so on 16x16 digits a
width-64, depth-3 router costs about half of one DiT-T forward per sample and, since under CFG it runs on
the conditional half only, about a quarter of what one expert costs per sampler step.
Time (and optionally the class, as in the DDM paper's router) enters every block by FiLM on the
normalised activations, initialised to the identity.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archipelago.experts.dit import LabelEmbedder, TimestepEmbedder


def _groups(channels: int) -> int:
    """Largest of 8, 4, 2, 1 dividing `channels` (GroupNorm needs an exact division)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class FiLMResBlock(nn.Module):
    """Pre-norm residual block: x + conv(SiLU(FiLM_c(GN(conv(SiLU(GN(x))))))), optional 2x downsampling."""

    def __init__(self, channels: int, cond_dim: int, downsample: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)             # 2 x [N, C, 1, 1]
        h = self.conv1(F.silu(self.norm1(x)))                                     # [N, C, H, W]
        h = self.norm2(h) * (1 + scale) + shift                                   # [N, C, H, W]
        x = x + self.conv2(F.silu(h))                                             # [N, C, H, W]
        return F.avg_pool2d(x, 2) if self.downsample else x                       # [N, C, H', W']


class Router(nn.Module):
    """Time-conditioned CNN classifier of noised samples into the K data clusters.

    forward(x [N,C,H,W], t float [N] in [0,1], y long [N] or None) -> logits [N, K]. With num_classes > 0
    the class label conditions the router too (the null class num_classes means "no label", trained by
    label dropout); with num_classes == 0 it is r(x_t, t) and y is ignored.
    """

    def __init__(self, in_channels: int, input_size: int, num_experts: int, hidden_size: int = 64,
                 depth: int = 3, num_classes: int = 0, class_dropout: float = 0.1):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        self.config_dict: dict[str, Any] = {
            "in_channels": in_channels, "input_size": input_size, "num_experts": num_experts,
            "hidden_size": hidden_size, "depth": depth, "num_classes": num_classes,
            "class_dropout": float(class_dropout)}
        self.in_channels, self.input_size = in_channels, input_size
        self.num_experts, self.num_classes = num_experts, num_classes
        stride = 2 if input_size >= 8 else 1
        self.stem = nn.Conv2d(in_channels, hidden_size, 3, stride=stride, padding=1)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout) if num_classes > 0 else None
        blocks, size = [], input_size // stride
        for _ in range(depth):
            down = size > 4
            blocks.append(FiLMResBlock(hidden_size, hidden_size, downsample=down))
            size = size // 2 if down else size
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(_groups(hidden_size), hidden_size)
        self.head = nn.Linear(hidden_size, num_experts)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """FiLM starts as the identity (zero scale/shift) and the head at zero (uniform routing)."""
        for block in self.blocks:
            nn.init.zeros_(block.film[-1].weight)
            nn.init.zeros_(block.film[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.t_embedder(t)                                                    # [N, D]
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, self.training)                             # [N, D]
        h = self.stem(x)                                                          # [N, D, H/2, W/2]
        for block in self.blocks:
            h = block(h, c)                                                       # [N, D, h, w]
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))                             # [N, D]
        return self.head(h)                                                       # [N, K]


def build_router(router_cfg: Any, image_shape: list[int], num_experts: int, num_classes: int = 0,
                 class_dropout: float = 0.1) -> Router:
    """The router for `router_cfg` (a RouterConfig) over images [C, H, W] (video: [C, F, H, W] is refused)."""
    if len(image_shape) != 3:
        raise ValueError(f"the router handles images [C,H,W]; got shape {image_shape}")
    return Router(in_channels=image_shape[0], input_size=image_shape[-1], num_experts=num_experts,
                  hidden_size=router_cfg.hidden_size, depth=router_cfg.depth, num_classes=num_classes,
                  class_dropout=class_dropout)


def router_forward_flops(config: dict[str, Any]) -> int:
    """Forward FLOPs (2 x multiply-adds) of one sample through a Router with constructor kwargs `config`."""
    c_in, s, d = config["in_channels"], config["input_size"], config["hidden_size"]
    stride = 2 if s >= 8 else 1
    size = s // stride
    macs = size * size * 9 * c_in * d                                             # stem
    macs += 256 * d + d * d                                                       # t embedder MLP
    for _ in range(config["depth"]):
        macs += 2 * size * size * 9 * d * d + d * 2 * d                           # two convs + FiLM
        size = size // 2 if size > 4 else size
    macs += d * config["num_experts"]
    return 2 * macs
