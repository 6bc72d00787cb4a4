"""Sequence parallelism for the image DiT and the video DiT: Ulysses, ring attention and their product, USP.

Each rank of a sequence group (``ulysses_degree x ring_degree`` ranks) owns one contiguous chunk of the
token sequence (image: row-major patches; video: frame-major frames x patches) through every block; the
MLP, LayerNorm and adaLN are per token, so attention is the only place where chunks meet. One attention
twin serves all three modes, which differ only in their degrees:

  ulysses   all-to-all over the Ulysses group turns [all heads, my tokens] into [my heads, the group's
            tokens]; attention is then local; a second all-to-all turns the output back (DeepSpeed-Ulysses,
            Jacobs et al. 2023). Needs heads divisible by the degree.
  ring      queries stay; K/V blocks travel round the ring group (send to the next rank, receive from the
            previous, overlapped with the block's attention), and the partial outputs are merged exactly by
            their log-sum-exp (online softmax; Liu et al. 2023, "Ring Attention").
  usp       Ulysses inside, ring across (Fang & Zhao 2024, "USP"): after the all-to-all, a Ulysses group's
            tokens are one ring block.

Attention has no mask here, so the key order does not matter and every mode is exact (float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archipelago.errors import ConfigError
from archipelago.experts.dit import Attention, DiT
from archipelago.experts.video_dit import VideoDiT
from archipelago.inference.comm import Comm, Group


@dataclass
class SequenceContext:
    """Where this rank sits: its sequence group (token chunks), and inside it its Ulysses and ring groups."""

    comm: Comm
    group: Group                      # every rank holding a chunk of this sample's tokens
    ulysses: Group
    ring: Group


# ----------------------------------------------------------------------------------------------------
# The pieces: head <-> token re-sharding and blockwise attention with log-sum-exp merging
# ----------------------------------------------------------------------------------------------------

def heads_to_tokens(t: torch.Tensor, comm: Comm, group: Group) -> torch.Tensor:
    """[*, H, Tl, Dh] (all heads, my tokens) -> [*, H/U, U*Tl, Dh] (my heads, the group's tokens in order)."""
    u = group.size
    if u == 1:
        return t
    *lead, h, tl, dh = t.shape
    t = t.reshape(*lead, u, h // u, tl, dh).movedim(-4, 0)                     # [U, *, H/U, Tl, Dh] by head group
    t = comm.all_to_all(t, group, "attn_a2a")                                 # [U, *, H/U, Tl, Dh] by token owner
    return t.movedim(0, -3).reshape(*lead, h // u, u * tl, dh)                # [*, H/U, U*Tl, Dh]


def tokens_to_heads(o: torch.Tensor, comm: Comm, group: Group) -> torch.Tensor:
    """Inverse of `heads_to_tokens`: [*, H/U, U*Tl, Dh] -> [*, H, Tl, Dh]."""
    u = group.size
    if u == 1:
        return o
    *lead, hu, t, dh = o.shape
    o = o.reshape(*lead, hu, u, t // u, dh).movedim(-3, 0)                    # [U, *, H/U, Tl, Dh] by token owner
    o = comm.all_to_all(o, group, "attn_a2a")                                 # [U, *, H/U, Tl, Dh] by head group
    return o.movedim(0, -4).reshape(*lead, u * hu, t // u, dh)                # [*, H, Tl, Dh]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one K/V block and its log-sum-exp; q [N,H,Tq,Dh], k/v [N,H,Tk,Dh] ->
    (o [N,H,Tq,Dh], lse [N,H,Tq,1]). Same scale as `Attention.attend` (1/sqrt(Dh))."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                  # [N, H, Tq, Tk]
    lse = torch.logsumexp(scores.float(), dim=-1, keepdim=True)               # [N, H, Tq, 1]
    o = torch.exp(scores.float() - lse).to(v.dtype) @ v                      # [N, H, Tq, Dh]
    return o, lse


def merge_blocks(o: torch.Tensor | None, lse: torch.Tensor | None, o_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: the attention over keys A u B from its parts over A (o, lse) and over B (o_b, lse_b)."""
    if o is None:
        return o_b, lse_b
    new = torch.logaddexp(lse, lse_b)                                         # [N, H, Tq, 1]
    out = torch.exp(lse - new).to(o.dtype) * o + torch.exp(lse_b - new).to(o.dtype) * o_b
    return out, new


def ring_attention(q: torch.Tensor, kv: torch.Tensor, comm: Comm, group: Group) -> torch.Tensor:
    """Exact attention of local queries over every ring member's K/V; q [N,H,Tq,Dh], kv [2,N,H,Tk,Dh].

    Each hop's transfer is posted before the attention of the block in hand, so it overlaps that compute.
    """
    o = lse = None
    for hop in range(group.size):
        nxt = comm.ring_pass(kv, group, "attn_ring") if hop < group.size - 1 else None
        o, lse = merge_blocks(o, lse, *attention_with_lse(q, kv[0], kv[1]))
        if nxt is not None:
            kv = nxt.wait()                                                   # [2, N, H, Tk, Dh] of member i-hop-1
    return o


# ----------------------------------------------------------------------------------------------------
# Twins
# ----------------------------------------------------------------------------------------------------

class SequenceParallelAttention(nn.Module):
    """Attention over the whole sequence from this rank's token chunk: Ulysses all-to-all, then ring (or
    the model's own `attend` when the ring has one member), then the inverse all-to-all."""

    def __init__(self, module: Attention, ctx: SequenceContext):
        super().__init__()
        self.module = module
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, ctx = self.module, self.ctx
        qkv = torch.stack(attn.project_qkv(x))                                # [3, N, H, Tl, Dh]
        qkv = heads_to_tokens(qkv, ctx.comm, ctx.ulysses)                     # [3, N, H/U, U*Tl, Dh]
        if ctx.ring.size > 1:
            o = ring_attention(qkv[0], qkv[1:], ctx.comm, ctx.ring)           # [N, H/U, U*Tl, Dh]
        else:
            o = attn.attend(qkv[0], qkv[1], qkv[2])                           # [N, H/U, U*Tl, Dh]
        return attn.project_out(tokens_to_heads(o, ctx.comm, ctx.ulysses))    # [N, Tl, D]


def unpatchify_tokens(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Final-layer output of every token [N, T, p*p*C] -> the sample (image or video)."""
    if isinstance(model, VideoDiT):
        return model.unpatchify(out, out.shape[1] // model.num_patches)       # [N, C, F, H, W]
    return model.unpatchify(out)                                              # [N, C, H, W]


def token_chunk(tokens: torch.Tensor, group: Group, what: str) -> torch.Tensor:
    """This member's contiguous chunk of tokens [N, T, D] -> [N, T/G, D]."""
    t = tokens.shape[1]
    if t % group.size:
        raise ConfigError(f"{what}: {group.size} ranks must divide the {t} tokens of a sample")
    per = t // group.size
    return tokens[:, group.index * per:(group.index + 1) * per]


class SequenceParallelDiT(nn.Module):
    """A DiT or VideoDiT whose tokens are chunked over the sequence group; forward returns the full velocity.

    Every rank embeds the whole sample (the patch embedding is one per-token linear map, a sliver of a
    block's cost) and keeps its chunk; after the blocks, the final layer runs on the chunk and one
    all-gather of its [N, T/G, p*p*C] output rebuilds the velocity on every rank.
    """

    def __init__(self, module: DiT | VideoDiT, ctx: SequenceContext):
        super().__init__()
        self.module = module
        self.ctx = ctx
        self.num_classes = module.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        ctx, m = self.ctx, self.module
        ctx.comm.step = step or 0
        tokens, c = m.embed(x, t, y)                                          # [N, T, D], [N, D]
        tokens = token_chunk(tokens, ctx.group, "sequence parallel")          # [N, T/G, D]
        tokens = m.run_blocks(tokens, c)                                      # [N, T/G, D]
        out = m.final_layer(tokens, c)                                        # [N, T/G, p*p*C]
        out = ctx.comm.all_gather(out, ctx.group, "output", dim=1)            # [N, T, p*p*C]
        return unpatchify_tokens(m, out)


ROOT_TWINS: dict[type[nn.Module], type[nn.Module]] = {DiT: SequenceParallelDiT, VideoDiT: SequenceParallelDiT}
LAYER_TWINS: dict[type[nn.Module], type[nn.Module]] = {Attention: SequenceParallelAttention}
