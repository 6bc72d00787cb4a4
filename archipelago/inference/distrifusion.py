"""DistriFusion (Li et al., CVPR 2024; displaced patch parallelism) for the image DiT: the attention twin that
uses this rank's fresh K/V plus the other bands' K/V from the previous evaluation, and the exchange that keeps
those stale buffers and refreshes them with batched asynchronous all-gathers overlapped with compute.

The rule (as in mit-han-lab/distrifuser's attn.py): synchronous all-gather while `step < warmup_steps`,
afterwards stale neighbour K/V from the buffers plus fresh local K/V, enqueued for the async exchange that
each layer waits on at its next forward. The root twin and the other patch schemes are in `patch.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from archipelago.experts.dit import Attention
from archipelago.inference.comm import AsyncGather

if TYPE_CHECKING:   # patch.py imports this module
    from archipelago.inference.patch import PatchContext


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
