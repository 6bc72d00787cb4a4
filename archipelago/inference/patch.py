"""Patch parallelism for the image DiT: naive patches, sync patch, and DistriFusion (displaced patches).

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

from dataclasses import dataclass, field

import torch
from torch import nn

from archipelago.errors import ConfigError
from archipelago.experts.dit import Attention, DiT
from archipelago.inference.comm import AsyncGather, Comm, Group
from archipelago.inference.config import Mode


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


class DisplacedKVAttention(nn.Module):
    """DistriFusion attention: fresh local K/V + the other bands' K/V from the previous evaluation."""

    def __init__(self, module: Attention, ctx: PatchContext):
        super().__init__()
        self.module = module
        self.ctx = ctx
        self.layer = ctx.num_layers          # index among this model's attention layers
        ctx.num_layers += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, ctx = self.module, self.ctx
        ex = ctx.exchange
        q, k, v = attn.project_qkv(x)                                            # 3 x [N, H, Tl, Dh]
        kv = torch.stack([k, v])                                                 # [2, N, H, Tl, Dh]
        stale = ex.stale(self.layer, kv.shape)   # waits on last evaluation's async all-gather, if any
        if ctx.synchronous() or stale is None:
            # Warm-up (or nothing stale of this shape yet): exact K/V, which also seeds the stale buffer.
            parts = list(ctx.comm.all_gather(kv, ctx.group, "attn_kv", dim=0).chunk(ctx.group.size))
            ex.keep(self.layer, parts)
        else:
            parts = list(stale)
            parts[ctx.group.index] = kv          # own band is always fresh
            ex.enqueue(self.layer, kv)           # send it for the others' next evaluation
        kv_all = torch.cat(parts, dim=3)                                         # [2, N, H, T, Dh]
        return attn.project_out(attn.attend(q, kv_all[0], kv_all[1]))            # [N, Tl, D]


@dataclass
class _Pending:
    handle: AsyncGather
    offset: int
    shape: torch.Size


@dataclass
class DisplacedKVExchange:
    """Stale K/V buffers of every DistriFusion layer and the batched async all-gathers that refresh them.

    Layers are grouped `comm_group_layers` at a time (by layer index); when the last layer of a group has
    enqueued its fresh K/V, one async all-gather carries the whole group's K/V (fewer, larger messages).
    """

    ctx: PatchContext
    _stale: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _outbox: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)

    def _group_members(self, layer: int) -> list[int]:
        n = self.ctx.comm_group_layers
        first = (layer // n) * n
        return list(range(first, min(first + n, self.ctx.num_layers)))

    def stale(self, layer: int, shape: torch.Size) -> list[torch.Tensor] | None:
        """Other bands' K/V from the previous evaluation (waiting on its all-gather), or None if none fits."""
        pending = self._pending.pop(layer, None)
        if pending is not None:
            gathered = pending.handle.wait()
            numel = pending.shape.numel()
            lo, hi = pending.offset, pending.offset + numel
            self._stale[layer] = [g[lo:hi].view(pending.shape) for g in gathered]
        parts = self._stale.get(layer)
        if parts is None or parts[0].shape != shape:
            return None
        return parts

    def keep(self, layer: int, parts: list[torch.Tensor]) -> None:
        self._stale[layer] = parts

    def enqueue(self, layer: int, kv: torch.Tensor) -> None:
        members = self._group_members(layer)
        box = self._outbox.setdefault(members[0], {})
        box[layer] = kv
        if len(box) < len(members):
            return
        del self._outbox[members[0]]
        flat = torch.cat([box[m].reshape(-1) for m in members])
        handle = self.ctx.comm.all_gather_async(flat, self.ctx.group, "attn_kv")
        offset = 0
        for m in members:
            self._pending[m] = _Pending(handle, offset, box[m].shape)
            offset += box[m].numel()

    def drain(self) -> None:
        """Wait for every in-flight all-gather (end of sampling: nothing may be left on the wire)."""
        for layer in list(self._pending):
            pending = self._pending[layer]
            self.stale(layer, pending.shape)
        self._outbox.clear()


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
