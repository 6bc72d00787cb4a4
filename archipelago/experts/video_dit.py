"""A spatio-temporal DiT for video clips x [N,C,F,H,W]: the image DiT's blocks over all frames' tokens.

The same `dit.DiTBackbone` (blocks, Attention, adaLN-Zero init) as `dit.DiT`, so every training strategy
and inference wrapper that works on the image expert works here; only embedding (per-frame patches + spatial and
temporal sin-cos positions) and the head differ. `frame_offset` shifts the temporal positions so that a
frame block of a long video (DualParal) sees the positions it has inside the whole clip.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from archipelago.errors import ConfigError
from archipelago.experts.dit import (
    DiTBackbone,
    get_1d_sincos_pos_embed,
    resolve_dims,
)

if TYPE_CHECKING:
    from archipelago.config import ExpertConfig


class VideoDiT(DiTBackbone):
    """Class-conditional video DiT with full attention over all F*T tokens (frame-major order).

    `forward(x, t, y, frame_offset=0) = head(run_blocks(*embed(x, t, y, frame_offset)), c)`; the number of
    frames is read from the input, so a model trained on F-frame clips also runs on shorter frame blocks.
    The spatial table is the backbone's; the temporal table depends on frame_offset and the clip length,
    so it is computed per call (cheap: [F, D]).
    """

    def temporal_embed(self, num_frames: int, frame_offset: int = 0) -> torch.Tensor:
        """Sin-cos embedding of frame positions frame_offset .. frame_offset+F-1 -> [F, D]."""
        pos = torch.arange(num_frames, device=self.pos_embed.device) + frame_offset
        return get_1d_sincos_pos_embed(self.hidden_size, pos).to(self.pos_embed.dtype)

    def unpatchify(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [N, F*T, p*p*C] -> video [N, C, F, H, W]."""
        c, p, h, f = self.out_channels, self.patch_size, self.grid_size, num_frames
        x = x.reshape(x.shape[0], f, h, h, p, p, c)                               # [N, F, h, w, p, p, C]
        x = torch.einsum("nfhwpqc->ncfhpwq", x)                                   # [N, C, F, h, p, w, p]
        return x.reshape(x.shape[0], c, f, h * p, h * p)                          # [N, C, F, H, W]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              frame_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips, times, labels -> (tokens [N, F*T, D] frame-major, conditioning c [N, D])."""
        n, ch, f, hh, ww = x.shape
        frames = x.transpose(1, 2).reshape(n * f, ch, hh, ww)                     # [N*F, C, H, W]
        tokens = self.x_embedder(frames).flatten(2).transpose(1, 2)               # [N*F, T, D]
        tokens = tokens.reshape(n, f, self.num_patches, -1)                       # [N, F, T, D]
        tokens = tokens + self.pos_embed.unsqueeze(1)                             # + spatial [1, 1, T, D]
        tokens = tokens + self.temporal_embed(f, frame_offset)[None, :, None]     # + temporal [1, F, 1, D]
        tokens = tokens.reshape(n, f * self.num_patches, -1)                      # [N, F*T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)                # [N, D]
        return tokens, c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer + unpatchify; tokens [N,F*T,D] -> v [N,C,F,H,W] (F = tokens / tokens-per-frame)."""
        num_frames = tokens.shape[1] // self.num_patches
        return self.unpatchify(self.final_layer(tokens, c), num_frames)           # [N, C, F, H, W]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, frame_offset: int = 0) -> torch.Tensor:
        """x [N,C,F,H,W], t float [N] in [0,1], y long [N] (num_classes = null) -> v [N,C,F,H,W]."""
        tokens, c = self.embed(x, t, y, frame_offset)                             # [N, F*T, D], [N, D]
        tokens = self.run_blocks(tokens, c)                                       # [N, F*T, D]
        return self.head(tokens, c)                                               # [N, C, F, H, W]


def build_video_dit(expert_cfg: ExpertConfig, input_size: int, in_channels: int, num_classes: int) -> VideoDiT:
    """The expert VideoDiT for `expert_cfg` on clips [C=in_channels, F (any), input_size, input_size]."""
    dims = resolve_dims(expert_cfg)
    try:
        return VideoDiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **dims)
    except ValueError as exc:
        raise ConfigError(f"expert model: {exc}") from None
