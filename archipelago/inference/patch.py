"""Patch parallelism for the image DiT: naive patches, sync patch, and DistriFusion (displaced patches;
its attention twin and stale-K/V exchange live in `inference/distrifusion.py`).

Each rank of a patch group owns a band of token rows. Parallel twins wrap the untouched model modules:
the root twin embeds only this rank's rows (with *their* slice of the positional table) and gathers the
final-layer tokens; attention twins call `Attention.project_qkv / attend / project_out` and differ only in
where the other ranks' K/V come from:

  naive_patch    nowhere: local tokens attend to local tokens (fast, seams at band borders)
  sync_patch     a blocking all-gather of K/V in every layer at every evaluation (exact)
  distrifusion   after `warmup_steps` synchronous steps, the other bands' K/V from the previous evaluation
                 (stale) plus this rank's fresh K/V; the fresh K/V is all-gathered asynchronously, batched
                 per `comm_group_layers` layers, and each layer waits on its handle at its next forward,
                 so the exchange overlaps a whole evaluation of compute (DistriFusion, Li et al. 2024)

The DiT has no GroupNorm or spatial convolution inside its blocks (LayerNorm and the MLP are per token,
the patch embedding has stride = kernel), so attention is the only layer that mixes bands.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archipelago.errors import ConfigError
from archipelago.experts.dit import Attention, DiT
from archipelago.inference.comm import Comm, Group
from archipelago.inference.config import Mode
from archipelago.inference.distrifusion import DisplacedKVAttention, DisplacedKVExchange


@dataclass
class PatchContext:
    """State shared by the twins of one patch-parallel model: where this rank sits and which step it is."""

    comm: Comm
    group: Group                      # the patch group (ranks sharing one image)
    scheme: Mode                      # naive_patch | sync_patch | distrifusion
    warmup_steps: int = 1
    comm_group_layers: int = 1
    step: int = 0                     # sampler step of the current evaluation, set by the root twin
    num_layers: int = 0               # attention twins registered (DistriFusion layer indices)
    exchange: DisplacedKVExchange | None = None

    def synchronous(self) -> bool:
        """DistriFusion's rule: exact K/V while `step < warmup_steps`, stale K/V afterwards."""
        return self.step < self.warmup_steps


# ----------------------------------------------------------------------------------------------------
# Attention twins
# ----------------------------------------------------------------------------------------------------

class SyncKVAttention(nn.Module):
    """Exact patch attention: local queries against the all-gathered K/V of every band."""

    def __init__(self, module: Attention, ctx: PatchContext):
        super().__init__()
        self.module = module
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, ctx = self.module, self.ctx
        q, k, v = attn.project_qkv(x)                                            # 3 x [N, H, Tl, Dh]
        kv = torch.stack([k, v])                                                 # [2, N, H, Tl, Dh]
        kv_all = ctx.comm.all_gather(kv, ctx.group, "attn_kv", dim=3)            # [2, N, H, T, Dh]
        return attn.project_out(attn.attend(q, kv_all[0], kv_all[1]))            # [N, Tl, D]


# ----------------------------------------------------------------------------------------------------
# Root twin
# ----------------------------------------------------------------------------------------------------

class PatchParallelDiT(nn.Module):
    """A DiT whose tokens are split by rows over a patch group; forward returns the full velocity.

    forward(x, t, y, step): every rank gets the full latent x (all ranks hold the same x because the
    velocity is gathered at every evaluation), embeds its band of token rows, runs the blocks (whose
    attention twins exchange K/V), applies the final layer to its tokens, and all-gathers them.
    """

    def __init__(self, module: DiT, ctx: PatchContext):
        super().__init__()
        self.module = module
        self.ctx = ctx
        self.num_classes = module.num_classes

    def rows(self, grid: int) -> tuple[int, int]:
        """This rank's band [first, last) of token rows."""
        degree = self.ctx.group.size
        if grid % degree:
            raise ConfigError(f"patch_degree={degree} must divide the {grid} token rows of the latent "
                              f"(input_size / patch_size)")
        per = grid // degree
        return self.ctx.group.index * per, (self.ctx.group.index + 1) * per

    def embed_rows(self, x: torch.Tensor, t: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DiT.embed restricted to this rank's rows: patch embedding of its pixel rows + its pos-embed rows.

        Not `module.embed(x)[:, band]`: that would embed every row on every rank. The positional table is
        sliced at the band's absolute rows (never re-centred), so a band sees the positions it has in the
        whole image - which is also what makes naive patches differ from the full image only at seams.
        """
        m = self.module
        p, grid = m.patch_size, m.grid_size
        r0, r1 = self.rows(grid)
        x_band = x[:, :, r0 * p:r1 * p, :]                                        # [N, C, (r1-r0)p, W]
        tokens = m.x_embedder(x_band).flatten(2).transpose(1, 2)                 # [N, Tl, D]
        tokens = tokens + m.pos_embed[:, r0 * grid:r1 * grid]                    # [N, Tl, D]
        c = m.t_embedder(t) + m.y_embedder(y, m.training)                        # [N, D]
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        ctx, m = self.ctx, self.module
        if step is None:
            if ctx.scheme is Mode.distrifusion:
                raise ValueError("distrifusion needs the sampler step: call model_fn(x, t, y, step=k)")
            step = 0
        ctx.step = step
        ctx.comm.step = step
        if x.shape[-2] != m.input_size or x.shape[-1] != m.input_size:
            raise ValueError(f"latent {tuple(x.shape)} does not match the DiT input_size={m.input_size}")
        tokens, c = self.embed_rows(x, t, y)                                     # [N, Tl, D], [N, D]
        tokens = m.run_blocks(tokens, c)                                         # [N, Tl, D]
        out = m.final_layer(tokens, c)                                           # [N, Tl, p*p*C]
        out = ctx.comm.all_gather(out, ctx.group, "output", dim=1)               # [N, T, p*p*C]
        return m.unpatchify(out)                                                 # [N, C, H, W]

    def finish(self) -> None:
        if self.ctx.exchange is not None:
            self.ctx.exchange.drain()


# Registry: model class -> root twin, and per scheme: layer class -> twin (applied by parallelize.py).
ROOT_TWINS: dict[type[nn.Module], type[nn.Module]] = {DiT: PatchParallelDiT}
LAYER_TWINS: dict[Mode, dict[type[nn.Module], type[nn.Module]]] = {
    Mode.naive_patch: {},
    Mode.sync_patch: {Attention: SyncKVAttention},
    Mode.distrifusion: {Attention: DisplacedKVAttention},
}
